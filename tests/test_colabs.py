"""Colabs run in smoke mode, and each .ipynb matches its .py source."""

import glob
import json
import os
import subprocess
import sys

import pytest

_COLABS = os.path.join(os.path.dirname(__file__), os.pardir, "colabs")
SOURCES = sorted(glob.glob(os.path.join(_COLABS, "*.py")))


def test_there_are_colabs():
  assert SOURCES


@pytest.mark.parametrize("path", SOURCES, ids=os.path.basename)
def test_colab_runs_in_smoke_mode(path):
  r = subprocess.run(
      [sys.executable, path],
      capture_output=True,
      text=True,
      timeout=600,
      env={**os.environ, "SMOKE": "1", "JAX_PLATFORMS": "cpu"},
  )
  assert r.returncode == 0, r.stderr[-3000:]


@pytest.mark.parametrize("path", SOURCES, ids=os.path.basename)
def test_notebook_is_paired_and_stripped(path):
  nb_path = path[:-3] + ".ipynb"
  assert os.path.exists(nb_path), f"missing {nb_path}: run jupytext --sync"
  with open(nb_path) as f:
    nb = json.load(f)
  with open(path) as f:
    src = f.read()
  for cell in nb["cells"]:
    if cell["cell_type"] != "code":
      continue
    assert not cell.get("outputs"), "commit notebooks with outputs stripped"
    code = "".join(cell["source"]).strip()
    # jupytext comments out magics in the .py source
    code = "\n".join(
        line[: len(line) - len(line.lstrip())] + "# " + line.lstrip()
        if line.lstrip().startswith("%")
        else line
        for line in code.splitlines()
    )
    assert code in src, f"{nb_path} is out of sync with {path}: {code[:80]!r}"
