"""The merge binary's --overwrite replaces only its own earlier outputs, and
hostile --hparam values are one line naming the flag."""

import json
import os
import re

from absl.testing import flagsaver
import numpy as np
import pytest

import binaries
from experiments import merge_lib
from mtx.io import safetensors as st


@pytest.fixture
def binary():
  return binaries.load("merge")


def _models(root):
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


def _flags(pre, fts, out, **kw):
  base = dict(
      pretrained=pre,
      finetuned=fts,
      method="task_arithmetic",
      scales=["0.5"],
      out=str(out),
      hash_sources=False,
  )
  return {**base, **kw}


def _run(binary, **flag_values):
  with flagsaver.flagsaver(**flag_values):
    binary.main(["merge"])


def _fails(binary, pattern, **flag_values):
  with pytest.raises(SystemExit) as e:
    _run(binary, **flag_values)
  msg = str(e.value.code)
  assert msg.startswith("merge: error: ") and "\n" not in msg, msg
  assert re.search(pattern, msg), msg
  return msg


def test_overwrite_never_replaces_what_this_binary_did_not_write(
    binary, tmp_path
):
  """--overwrite over a folder of the user's files, a file or a symlink
  used to delete it (as root, even /dev/null); now it is refused."""
  pre, fts = _models(tmp_path)
  precious = tmp_path / "data"
  precious.mkdir()
  (precious / "notes.txt").write_text("keep me")
  a_file = tmp_path / "a_file"
  a_file.write_text("keep me too")
  link = tmp_path / "link"
  link.symlink_to(precious)
  for out, why in [
      (precious, "is not the output of an earlier merge"),
      (a_file, "is not a folder"),
      (link, "is a symlink"),
  ]:
    _fails(
        binary,
        f"--out=.*{why}.*will not replace",
        **_flags(pre, fts, out, overwrite=True),
    )
  assert (precious / "notes.txt").read_text() == "keep me"
  assert a_file.read_text() == "keep me too"
  assert os.readlink(link) == str(precious)
  assert sorted(os.listdir(tmp_path)) == sorted(
      ["base", "ft1", "ft2", "data", "a_file", "link"]
  )


def test_overwrite_replaces_earlier_outputs_single_sweep_and_orbax(
    binary, tmp_path
):
  pre, fts = _models(tmp_path)
  single, sweep, orbax = (tmp_path / n for n in ("single", "sweep", "orbax"))
  _run(binary, **_flags(pre, fts, single))
  _run(binary, **_flags(pre, fts, single, overwrite=True, scales=["0.7"]))
  sweep_flags = _flags(pre, fts, sweep, scales=["0.1", "0.2"])
  _run(binary, **sweep_flags)
  _run(binary, **{**sweep_flags, "overwrite": True})
  # A sweep folder holding something that is not an output is left alone.
  (sweep / "mine").mkdir()
  (sweep / "mine" / "x.txt").write_text("x")
  _fails(
      binary,
      "not the output of an earlier merge",
      **{**sweep_flags, "overwrite": True},
  )
  assert (sweep / "mine" / "x.txt").exists()
  _run(binary, **_flags(pre, fts, orbax, format="orbax"))
  _run(binary, **_flags(pre, fts, orbax, format="orbax", overwrite=True))
  # An empty folder is not "occupied": no --overwrite needed.
  (tmp_path / "empty").mkdir()
  _run(binary, **_flags(pre, fts, tmp_path / "empty"))


def test_check_replaceable_reads_the_record_not_the_file_names(tmp_path):
  fake = tmp_path / "fake"
  fake.mkdir()
  (fake / "model.safetensors.index.json").write_text(
      json.dumps({"metadata": {"format": "pt"}, "weight_map": {}})
  )
  with pytest.raises(ValueError, match="not the output of an earlier merge"):
    merge_lib.check_replaceable(str(fake))
  (fake / "model.safetensors.index.json").write_text("{corrupt")
  with pytest.raises(ValueError, match="not the output"):
    merge_lib.check_replaceable(str(fake))
  (fake / "model.safetensors.index.json").write_text(
      json.dumps({"metadata": {"mtx_merge": "{}"}, "weight_map": {}})
  )
  merge_lib.check_replaceable(str(fake))


@pytest.mark.parametrize(
    "value, shown",
    [
        ("[" * 20000 + "]" * 20000, "RecursionError"),
        ("1" * 5000, "ValueError"),
    ],
)
def test_hostile_hparam_values_name_the_flag(binary, tmp_path, value, shown):
  """Deeply nested JSON and 5000-digit integers used to surface the JSON
  parser's own message without naming --hparam."""
  pre, fts = _models(tmp_path)
  msg = _fails(
      binary,
      rf"--hparam density: cannot parse .*\({shown}\)",
      **_flags(
          pre, fts, tmp_path / "out", method="ties", hparam=[f"density={value}"]
      ),
  )
  assert len(msg) < 200
  assert not (tmp_path / "out").exists()
