"""mtx.checkpoint: round trips, metadata, atomicity, overwrite, targets."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from mtx import checkpoint


def _params():
  return {
      "enc": {"w": np.arange(6, dtype=np.float32).reshape(2, 3)},
      "head": {"b": jnp.asarray([1.0, -2.0], jnp.bfloat16)},
  }


def test_round_trip_and_metadata(tmp_path):
  p = tmp_path / "c"
  checkpoint.save(p, _params(), metadata={"method": "ties", "k": [1, 2]})
  out = checkpoint.restore(p)
  np.testing.assert_array_equal(out["enc"]["w"], _params()["enc"]["w"])
  assert out["head"]["b"].dtype == jnp.bfloat16
  meta = checkpoint.read_metadata(p)
  assert meta["method"] == "ties" and meta["k"] == [1, 2]
  assert meta["mtx_version"] and meta["created"]
  shapes = checkpoint.param_shapes(p)
  assert shapes["enc"]["w"].shape == (2, 3)
  assert checkpoint.is_checkpoint(p)
  assert sorted(os.listdir(tmp_path)) == ["c"]  # no debris


def test_existing_path_refused_then_overwritten(tmp_path):
  p = tmp_path / "c"
  checkpoint.save(p, {"w": np.zeros(2)})
  with pytest.raises(FileExistsError, match="overwrite"):
    checkpoint.save(p, {"w": np.ones(2)})
  np.testing.assert_array_equal(checkpoint.restore(p)["w"], np.zeros(2))
  checkpoint.save(p, {"w": np.ones(2)}, overwrite=True)
  np.testing.assert_array_equal(checkpoint.restore(p)["w"], np.ones(2))
  assert sorted(os.listdir(tmp_path)) == ["c"]


def test_crash_mid_write_leaves_nothing_valid(tmp_path, monkeypatch):
  p = tmp_path / "c"
  checkpoint.save(p, {"w": np.zeros(2)})
  real_save = ocp.Checkpointer.save

  def crashing_save(self, directory, *a, **k):
    real_save(self, directory, *a, **k)  # the data is on disk...
    raise KeyboardInterrupt("killed")  # ...but the process dies

  monkeypatch.setattr(ocp.Checkpointer, "save", crashing_save)
  with pytest.raises(KeyboardInterrupt):
    checkpoint.save(p, {"w": np.ones(2)}, overwrite=True)
  with pytest.raises(KeyboardInterrupt):
    checkpoint.save(tmp_path / "new", {"w": np.ones(2)})
  monkeypatch.undo()
  # The old checkpoint is intact, the new one does not exist.
  np.testing.assert_array_equal(checkpoint.restore(p)["w"], np.zeros(2))
  assert not (tmp_path / "new").exists()
  assert not checkpoint.is_checkpoint(tmp_path / "new.partial")


def test_partial_directory_is_not_a_checkpoint(tmp_path):
  (tmp_path / "c" / "params").mkdir(parents=True)
  assert not checkpoint.is_checkpoint(tmp_path / "c")
  with pytest.raises(ValueError, match="not a complete mtx checkpoint"):
    checkpoint.restore(tmp_path / "c")
  with pytest.raises(FileNotFoundError, match="no checkpoint"):
    checkpoint.restore(tmp_path / "missing")


def test_target_checked_and_shardings_applied(tmp_path):
  p = tmp_path / "c"
  checkpoint.save(p, _params())
  bad = {"enc": {"w": np.zeros((3, 2), np.float32)}, "head": _params()["head"]}
  with pytest.raises(ValueError, match="enc/w"):
    checkpoint.restore(p, target=bad)
  dev = jax.devices()[0]
  out = checkpoint.restore(p, shardings=jax.sharding.SingleDeviceSharding(dev))
  assert out["enc"]["w"].sharding.device_set == {dev}


def test_bad_metadata_writes_nothing(tmp_path):
  with pytest.raises(ValueError, match="JSON"):
    checkpoint.save(tmp_path / "c", {"w": np.ones(1)}, metadata={"f": object()})
  assert not os.listdir(tmp_path)


def test_content_hash(tmp_path):
  (tmp_path / "d").mkdir()
  (tmp_path / "d" / "a").write_bytes(b"1")
  h1 = checkpoint.content_hash(tmp_path / "d")
  (tmp_path / "d" / "a").write_bytes(b"2")
  assert checkpoint.content_hash(tmp_path / "d") != h1
  with pytest.raises(FileNotFoundError):
    checkpoint.content_hash(tmp_path / "nope")


def test_manager_keeps_latest_and_restores(tmp_path):
  m = checkpoint.Manager(tmp_path / "ckpts", max_to_keep=2)
  state = {"w": np.zeros(3, np.float32), "step": np.int32(0)}
  for s in range(1, 4):
    m.save(
        s,
        {"w": np.full(3, s, np.float32), "step": np.int32(s)},
        metadata={"loss": s / 10},
    )
  assert m.all_steps() == [2, 3] and m.latest_step() == 3
  out = m.restore(3, target=state)
  np.testing.assert_array_equal(out["w"], np.full(3, 3.0))
  assert m.metadata(3)["loss"] == 0.3
  m.close()
