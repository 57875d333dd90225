"""Loads experiments/*.py binaries for in-process tests, or runs them.

absl flags are process-global, and different binaries define flags with the
same names (``--workdir``, ``--config``). :func:`load` executes a binary's
module afresh after removing the flags of every binary loaded before, so
tests of several binaries can share one pytest worker. Call it inside each
test (not at import time). A binary loaded by file path imports its
libraries as ``from experiments import X_lib`` (the repository root is on
``sys.path``: tests/conftest.py, and the binary's own script-mode snippet).

:func:`run` runs a binary in a subprocess, as a script
(``python experiments/X.py``) or as a module (``python -m experiments.X``).
"""

import importlib.util
import os
import pathlib
import subprocess
import sys

from absl import flags

ROOT = pathlib.Path(__file__).resolve().parents[1]
EXPERIMENTS = ROOT / "experiments"
_DEFINED: set[str] = set()  # flag names defined by binaries loaded so far


def load(name: str):
  """Imports ``experiments/<name>.py`` freshly and returns the module."""
  fv = flags.FLAGS
  for flag in _DEFINED:
    if flag in fv:
      delattr(fv, flag)
  _DEFINED.clear()
  spec = importlib.util.spec_from_file_location(
      f"_bin_{name}", EXPERIMENTS / f"{name}.py"
  )
  mod = importlib.util.module_from_spec(spec)
  before = set(fv)
  spec.loader.exec_module(mod)
  _DEFINED.update(set(fv) - before)
  if not fv.is_parsed():
    fv.mark_as_parsed()
  return mod


def run_main(mod, argv: list[str]) -> None:
  """Parses ``argv`` into the global flags (restored afterwards), runs main."""
  from absl.testing import flagsaver  # pylint: disable=g-import-not-at-top

  with flagsaver.flagsaver():
    # ml_collections' config flag reads its `--config.x` overrides from
    # sys.argv, as under app.run.
    saved, sys.argv = sys.argv, list(argv)
    try:
      rest = flags.FLAGS(argv)
    finally:
      sys.argv = saved
    mod.main(rest)


def run(
    name: str, *args: str, as_module: bool = False, cwd=None, **kw
) -> subprocess.CompletedProcess:
  """Runs ``experiments/<name>.py`` in a subprocess on CPU; text output.

  ``as_module`` runs ``python -m experiments.<name>`` from the repository
  root (the only place ``-m`` finds the package) instead of the script by
  its path from ``cwd`` (default: the repository root).
  """
  if as_module:
    cmd, cwd = [sys.executable, "-m", f"experiments.{name}"], ROOT
  else:
    cmd = [sys.executable, str(EXPERIMENTS / f"{name}.py")]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("PYTHONPATH", None)  # the binary must find its libraries itself
  return subprocess.run(
      [*cmd, *args],
      cwd=cwd or ROOT,
      env=env,
      capture_output=True,
      text=True,
      timeout=kw.pop("timeout", 600),
      **kw,
  )
