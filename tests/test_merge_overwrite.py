"""The merge binary's --overwrite replaces only its own earlier outputs, and
hostile --hparam values are one line naming the flag."""

import json
import os

import pytest

import binaries
import merge_helpers
from experiments import merge_lib


@pytest.fixture
def binary():
  return binaries.load("merge")


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


def test_overwrite_never_replaces_what_this_binary_did_not_write(
    binary, tmp_path
):
  """--overwrite over a folder of the user's files, a file or a symlink
  used to delete it (as root, even /dev/null); now it is refused."""
  pre, fts = merge_helpers.hf_models(tmp_path)
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
    merge_helpers.fails(
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
  pre, fts = merge_helpers.hf_models(tmp_path)
  single, sweep, orbax = (tmp_path / n for n in ("single", "sweep", "orbax"))
  merge_helpers.run(binary, **_flags(pre, fts, single))
  merge_helpers.run(
      binary, **_flags(pre, fts, single, overwrite=True, scales=["0.7"])
  )
  sweep_flags = _flags(pre, fts, sweep, scales=["0.1", "0.2"])
  merge_helpers.run(binary, **sweep_flags)
  merge_helpers.run(binary, **{**sweep_flags, "overwrite": True})
  # A sweep folder holding something that is not an output is left alone.
  (sweep / "mine").mkdir()
  (sweep / "mine" / "x.txt").write_text("x")
  merge_helpers.fails(
      binary,
      "not the output of an earlier merge",
      **{**sweep_flags, "overwrite": True},
  )
  assert (sweep / "mine" / "x.txt").exists()
  merge_helpers.run(binary, **_flags(pre, fts, orbax, format="orbax"))
  merge_helpers.run(
      binary, **_flags(pre, fts, orbax, format="orbax", overwrite=True)
  )
  # An empty folder is not "occupied": no --overwrite needed.
  (tmp_path / "empty").mkdir()
  merge_helpers.run(binary, **_flags(pre, fts, tmp_path / "empty"))


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
  pre, fts = merge_helpers.hf_models(tmp_path)
  msg = merge_helpers.fails(
      binary,
      rf"--hparam density: cannot parse .*\({shown}\)",
      **_flags(
          pre, fts, tmp_path / "out", method="ties", hparam=[f"density={value}"]
      ),
  )
  assert len(msg) < 200
  assert not (tmp_path / "out").exists()
