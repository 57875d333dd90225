"""The merged folder as a working copy of the base: what cannot be copied or
updated is said, by file name, and refused before the merge where it
would make the output wrong."""

import logging
import os

import numpy as np
import pytest

import merge_helpers
from mtx.io import output
from mtx.io import streaming


def test_corrupt_config_with_a_dtype_is_refused_before_the_merge(
    tmp_path, monkeypatch
):
  """It used to fail after the merge with the JSON parser's message alone
  ("Expecting property name ..."), naming no file."""
  pre, fts = merge_helpers.hf_models(tmp_path)
  (tmp_path / "base" / "config.json").write_text("{corrupt")
  merged = []
  real = output.merge_tensors

  def spy(*a, **k):
    merged.append(1)
    return real(*a, **k)

  monkeypatch.setattr(output, "merge_tensors", spy)
  with pytest.raises(ValueError, match=r"base/config\.json: not valid JSON"):
    streaming.merge_checkpoints(
        pre,
        fts,
        streaming.Spec.of("task_arithmetic"),
        tmp_path / "out",
        dtype=np.dtype("float16"),
    )
  assert not merged
  assert sorted(os.listdir(tmp_path)) == ["base", "ft1", "ft2"]
  # Without a dtype the file is copied as it is (it is the user's).
  streaming.merge_checkpoints(
      pre, fts, streaming.Spec.of("task_arithmetic"), tmp_path / "out"
  )
  assert (tmp_path / "out" / "config.json").read_text() == "{corrupt"


def test_a_side_file_over_the_size_limit_is_logged(
    tmp_path, monkeypatch, caplog
):
  """A large tokenizer.json used to be left out of the copy silently."""
  pre, fts = merge_helpers.hf_models(tmp_path)
  monkeypatch.setattr(output, "_MAX_COPY_BYTES", 100)
  (tmp_path / "base" / "tokenizer.json").write_text("x" * 101)
  (tmp_path / "base" / "vocab.txt").write_text("x" * 100)
  with caplog.at_level(logging.WARNING):
    streaming.merge_checkpoints(
        pre, fts, streaming.Spec.of("task_arithmetic"), tmp_path / "out"
    )
  names = os.listdir(tmp_path / "out")
  assert "vocab.txt" in names and "tokenizer.json" not in names
  assert any(
      "not copied" in r.getMessage() and "tokenizer.json" in r.getMessage()
      for r in caplog.records
  ), caplog.text
