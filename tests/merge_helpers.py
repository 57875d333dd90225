"""Helpers shared by the merge binary's tests (not collected: see conftest)."""

import json
import re

from absl.testing import flagsaver
import numpy as np
import pytest

from mtx.io import safetensors as st


def hf_models(root):
  """A base and two fine-tuned Hugging Face-style folders (one float32
  tensor ``w``, a ``config.json``); returns ``(base, [ft1, ft2])``."""
  rng = np.random.default_rng(0)
  base = {"w": rng.standard_normal((6, 4)).astype(np.float32)}
  paths = []
  for name in ("base", "ft1", "ft2"):
    d = root / name
    d.mkdir()
    t = {
        k: v + rng.standard_normal(v.shape).astype(np.float32)
        for k, v in base.items()
    }
    st.write(d / "model.safetensors", base if name == "base" else t)
    (d / "config.json").write_text(json.dumps({"torch_dtype": "float32"}))
    paths.append(str(d))
  return paths[0], paths[1:]


def run(binary, **flag_values):
  """Runs the loaded merge binary's ``main`` with these flag values."""
  with flagsaver.flagsaver(**flag_values):
    binary.main(["merge"])


def fails(binary, pattern, **flag_values):
  """Runs it expecting one ``merge: error: ...`` line matching ``pattern``."""
  with pytest.raises(SystemExit) as e:
    run(binary, **flag_values)
  msg = str(e.value.code)
  assert msg.startswith("merge: error: ") and "\n" not in msg, msg
  assert re.search(pattern, msg), msg
  return msg
