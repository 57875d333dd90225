"""mtx.checkpoint: round trips, metadata, atomicity, overwrite, targets."""

import os
import shutil

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


def test_killed_between_the_two_renames_points_at_the_old_checkpoint(
    tmp_path, monkeypatch
):
  p = tmp_path / "c"
  checkpoint.save(p, {"w": np.zeros(2)})
  real_replace = os.replace

  def dies_after_moving_the_old_one_aside(src, dst):
    real_replace(src, dst)
    if str(dst).endswith(".old"):
      raise KeyboardInterrupt("killed")

  monkeypatch.setattr(os, "replace", dies_after_moving_the_old_one_aside)
  with pytest.raises(KeyboardInterrupt):
    checkpoint.save(p, {"w": np.ones(2)}, overwrite=True)
  monkeypatch.undo()
  with pytest.raises(FileNotFoundError, match=r"c\.old: rename it back"):
    checkpoint.restore(p)
  os.rename(tmp_path / "c.old", p)  # what the message says to do
  np.testing.assert_array_equal(checkpoint.restore(p)["w"], np.zeros(2))


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


# ----------------------------------------------------------------------------
# Integrity: hashes recorded at save, verified on restore.


def _big_params():
  rng = np.random.default_rng(0)
  return {
      "enc": {"w": rng.normal(size=(64, 48)).astype(np.float32)},
      "head": {"b": rng.normal(size=(300,)).astype(np.float32)},
      "step": np.int64(7),
  }


def _files(root):
  return sorted(
      os.path.join(d, f)
      for d, _, fs in os.walk(root)
      for f in fs
      if os.path.getsize(os.path.join(d, f)) > 0
  )


def _flip(path, pos):
  with open(path, "r+b") as f:
    f.seek(pos)
    b = f.read(1)
    f.seek(pos)
    f.write(bytes([b[0] ^ 0x5A]))


def _same(a, b):
  return all(
      np.array_equal(np.asarray(x), np.asarray(y))
      for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
  ) and jax.tree.structure(a) == jax.tree.structure(b)


def test_hashes_recorded_and_verified(tmp_path):
  p = tmp_path / "c"
  checkpoint.save(p, _big_params(), metadata={"step": 7})
  meta = checkpoint.read_metadata(p)
  assert set(meta[checkpoint.HASH_KEY]) == {"enc/w", "head/b", "step"}
  assert meta[checkpoint.HASH_KEY]["enc/w"] == checkpoint.array_hash(
      _big_params()["enc"]["w"]
  )
  assert checkpoint.verify(p) is True
  assert _same(checkpoint.restore(p), _big_params())


def test_flipped_data_bytes_never_restore_silently(tmp_path):
  """Every byte flipped in the params' files is detected (a ValueError
  naming the checkpoint) or leaves the restored values unchanged."""
  pristine = tmp_path / "pristine"
  checkpoint.save(pristine, _big_params())
  data = [f for f in _files(pristine / "params")]
  assert len(data) >= 3
  detected_by_hash, tried = 0, 0
  for k, f in enumerate(data):
    size = os.path.getsize(f)
    for pos in sorted({0, size // 3, size // 2, size - 1, (7 * k) % size}):
      c = tmp_path / f"c{tried}"
      shutil.copytree(pristine, c)
      _flip(c / os.path.relpath(f, pristine), pos)
      tried += 1
      try:
        out = checkpoint.restore(c)
      except ValueError as e:
        assert str(c) in str(e)
        detected_by_hash += "SHA-256" in str(e)
        with pytest.raises(ValueError, match=str(c)):
          checkpoint.verify(c)
      else:
        assert _same(out, _big_params()), (f, pos)
      shutil.rmtree(c)
  # The hashes themselves caught flips that orbax restores without error.
  assert detected_by_hash > 0, tried


def test_flip_in_array_data_names_array(tmp_path):
  p = tmp_path / "c"
  checkpoint.save(p, _big_params())
  # The largest data file holds the largest array's bytes (uncompressed
  # float noise), so a flip in its middle changes a value of enc/w.
  f = max(_files(p / "params"), key=os.path.getsize)
  _flip(f, os.path.getsize(f) // 2)
  with pytest.raises(ValueError, match=r"checkpoint .*c: array 'enc/w'"):
    checkpoint.restore(p)
  out = checkpoint.restore(p, verify=False)  # the opt-out reads it anyway
  assert not np.array_equal(out["enc"]["w"], _big_params()["enc"]["w"])


def test_flipped_metadata_bytes_detected(tmp_path):
  pristine = tmp_path / "pristine"
  checkpoint.save(pristine, _big_params(), metadata={"lr": 0.5, "m": "ties"})
  (meta_file,) = [f for f in _files(pristine / "metadata") if "commit" not in f]
  size = os.path.getsize(meta_file)
  for n, pos in enumerate(range(1, size - 1, max(1, size // 40))):
    c = tmp_path / f"c{n}"
    shutil.copytree(pristine, c)
    _flip(c / os.path.relpath(meta_file, pristine), pos)
    with pytest.raises(ValueError, match=str(c)):
      checkpoint.read_metadata(c)
    with pytest.raises(ValueError, match=str(c)):
      checkpoint.restore(c)
    shutil.rmtree(c)


def test_checkpoint_without_hashes_warns(tmp_path, caplog):
  p = tmp_path / "old"
  ocp.Checkpointer(
      ocp.CompositeCheckpointHandler(
          params=ocp.StandardCheckpointHandler(),
          metadata=ocp.JsonCheckpointHandler(),
      )
  ).save(
      p,
      args=ocp.args.Composite(
          params=ocp.args.StandardSave({"w": np.ones(3, np.float32)}),
          metadata=ocp.args.JsonSave({"mtx_version": "0.0"}),
      ),
  )
  with caplog.at_level("WARNING", logger="mtx.checkpoint"):
    out = checkpoint.restore(p)
    assert checkpoint.verify(p) is False
  np.testing.assert_array_equal(out["w"], np.ones(3))
  assert "no content hashes" in caplog.text


def test_manager_verifies(tmp_path):
  m = checkpoint.Manager(tmp_path / "ckpts", max_to_keep=2)
  state = _big_params()
  m.save(1, state, metadata={"loss": 0.1})
  assert checkpoint.HASH_KEY in m.metadata(1)
  f = max(_files(tmp_path / "ckpts" / "1" / "params"), key=os.path.getsize)
  _flip(f, os.path.getsize(f) // 2)
  with pytest.raises(ValueError, match=r"ckpts/1: array 'enc/w'"):
    m.restore(1, target=state)
  m.close()
