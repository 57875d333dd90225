"""mtx.io.safetensors: round trips, byte compatibility with the safetensors
package both ways, sharding, atomicity and validation of corrupt files."""

import json
import os
import struct

import ml_dtypes
import numpy as np
import pytest

from mtx.io import safetensors as st

safetensors_numpy = pytest.importorskip("safetensors.numpy")


def _tensors():
  rng = np.random.default_rng(0)
  return {
      "embed.weight": rng.standard_normal((5, 3)).astype(np.float32),
      "layers.0.bias": rng.standard_normal(7).astype(np.float16),
      "layers.0.kernel": rng.standard_normal((2, 3)).astype(np.float64),
      "ids": np.arange(6, dtype=np.int64).reshape(2, 3),
      "mask": np.array([True, False, True]),
      "small": np.arange(3, dtype=np.int8),
      "scalar": np.array(2.5, np.float32),
      "empty": np.zeros((0, 4), np.float32),
      "u16": np.arange(3, dtype=np.uint16),
  }


def _assert_same(a, b):
  assert a.dtype == b.dtype and a.shape == b.shape
  np.testing.assert_array_equal(
      np.asarray(a).reshape(-1).view(np.uint8),
      np.asarray(b).reshape(-1).view(np.uint8),
  )


def _raw_file(path, header, data=b"", n=None):
  raw = json.dumps(header).encode()
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(raw) if n is None else n) + raw + data)
  return str(path)


def _no_temp_left(folder):
  return [f for f in os.listdir(folder) if ".tmp" in f or ".old" in f]


# -- round trips and compatibility --------------------------------------------


def test_round_trip_every_dtype(tmp_path):
  tensors = _tensors()
  for dt in (
      ml_dtypes.bfloat16,
      ml_dtypes.float8_e4m3fn,
      ml_dtypes.float8_e5m2,
  ):
    tensors[f"x_{np.dtype(dt).name}"] = np.linspace(-2, 2, 6).astype(dt)
  path = tmp_path / "a.safetensors"
  st.write(path, tensors, metadata={"k": "v"})
  got = st.read(path)
  assert sorted(got) == sorted(tensors)
  for name, x in tensors.items():
    _assert_same(got[name], x)
  assert st.open_checkpoint(path).metadata == {"k": "v"}


def test_read_is_memory_mapped_and_read_only(tmp_path):
  path = tmp_path / "a.safetensors"
  st.write(path, {"w": np.ones((64, 64), np.float32)})
  a = st.read(path)["w"]
  assert not a.flags.writeable and not a.flags.owndata
  with pytest.raises(ValueError):
    a[0, 0] = 2.0
  ckpt = st.open_checkpoint(path)
  info = ckpt.info("w")
  assert info.shape == (64, 64) and info.dtype == np.float32
  assert info.nbytes == 64 * 64 * 4
  ckpt.release("w")  # pages dropped; the values are read again on use
  ckpt.release()
  assert float(ckpt["w"].sum()) == 64 * 64


@pytest.mark.parametrize("metadata", [None, {"format": "pt"}])
def test_byte_identical_to_the_safetensors_package(tmp_path, metadata):
  tensors = {k: v for k, v in _tensors().items()}
  ours, theirs = tmp_path / "ours.safetensors", tmp_path / "theirs.st"
  st.write(ours, tensors, metadata=metadata)
  safetensors_numpy.save_file(tensors, str(theirs), metadata=metadata)
  assert ours.read_bytes() == theirs.read_bytes()


def test_the_safetensors_package_reads_ours_and_we_read_theirs(tmp_path):
  torch = pytest.importorskip("torch")
  from safetensors import torch as safetensors_torch  # pylint: disable=g-import-not-at-top

  x = torch.linspace(-3, 3, 12, dtype=torch.bfloat16).reshape(3, 4)
  theirs = tmp_path / "theirs.safetensors"
  safetensors_torch.save_file({"w": x, "b": torch.ones(3)}, str(theirs))
  got = st.read(theirs)
  assert got["w"].dtype == ml_dtypes.bfloat16
  np.testing.assert_array_equal(
      got["w"].view(np.uint16), x.view(torch.int16).numpy().view(np.uint16)
  )
  ours = tmp_path / "ours.safetensors"
  st.write(ours, {"w": got["w"], "b": got["b"]})
  back = safetensors_torch.load_file(str(ours))
  assert torch.equal(back["w"], x) and torch.equal(back["b"], torch.ones(3))
  tensors = _tensors()
  st.write(ours, tensors)
  loaded = safetensors_numpy.load_file(str(ours))
  for name, a in tensors.items():
    _assert_same(loaded[name], a)


def test_write_accepts_jax_and_non_contiguous_arrays(tmp_path):
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  a = np.arange(12, dtype=np.float32).reshape(3, 4)
  path = tmp_path / "a.safetensors"
  st.write(path, {"t": a.T, "j": jnp.ones(3, jnp.bfloat16)})
  got = st.read(path)
  np.testing.assert_array_equal(got["t"], a.T)
  assert got["j"].dtype == ml_dtypes.bfloat16


def test_big_endian_input_is_written_little_endian(tmp_path):
  path = tmp_path / "a.safetensors"
  st.write(path, {"x": np.arange(3, dtype=">f4")})
  _assert_same(st.read(path)["x"], np.arange(3, dtype="<f4"))


# -- open_checkpoint: files, folders, shards ----------------------------------


def test_open_file_folder_and_sharded_folder(tmp_path):
  tensors = _tensors()
  (tmp_path / "single").mkdir()
  st.write(tmp_path / "single" / "model.safetensors", tensors)
  index = st.write_sharded(tmp_path / "sharded", tensors, shard_size=40)
  files = sorted(os.listdir(tmp_path / "sharded"))
  n = len(files) - 1
  assert n > 2
  assert files[-1] == "model.safetensors.index.json"
  assert files[0] == f"model-00001-of-{n:05d}.safetensors"
  assert index["metadata"]["total_size"] == sum(
      a.nbytes for a in tensors.values()
  )
  assert sorted(index["weight_map"]) == sorted(tensors)
  for path in (
      tmp_path / "single",
      tmp_path / "single" / "model.safetensors",
      tmp_path / "sharded",
      tmp_path / "sharded" / "model.safetensors.index.json",
  ):
    ckpt = st.open_checkpoint(path)
    assert sorted(ckpt) == sorted(tensors) == list(ckpt)
    for name, a in tensors.items():
      _assert_same(ckpt[name], a)
  # Every shard holds at most shard_size bytes unless one tensor is larger,
  # and the safetensors package reads every shard.
  for f in files[:-1]:
    infos, _ = st.read_header(tmp_path / "sharded" / f)
    size = sum(i.nbytes for i in infos.values())
    assert size <= 40 or len(infos) == 1
    assert set(safetensors_numpy.load_file(str(tmp_path / "sharded" / f))) == (
        set(infos)
    )


def test_write_sharded_streams_from_a_generator(tmp_path):
  produced = []

  def items():
    for i in range(5):
      produced.append(i)
      yield f"t{i}", np.full((10,), i, np.float32)

  st.write_sharded(tmp_path / "out", items(), "80B", metadata={"a": "b"})
  ckpt = st.open_checkpoint(tmp_path / "out")
  assert [float(ckpt[f"t{i}"][0]) for i in range(5)] == [0, 1, 2, 3, 4]
  assert len(ckpt.files) == 3 and ckpt.metadata == {"a": "b"}
  assert _no_temp_left(tmp_path) == []


def test_write_sharded_refuses_an_existing_folder_unless_overwrite(tmp_path):
  out = tmp_path / "out"
  st.write_sharded(out, {"a": np.zeros(2)}, 100)
  with pytest.raises(FileExistsError, match="overwrite"):
    st.write_sharded(out, {"a": np.ones(2)}, 100)
  np.testing.assert_array_equal(st.read(out)["a"], np.zeros(2))
  st.write_sharded(out, {"b": np.ones(2)}, 100, overwrite=True)
  assert list(st.read(out)) == ["b"]
  (tmp_path / "empty").mkdir()  # an empty folder is simply replaced
  st.write_sharded(tmp_path / "empty", {"a": np.zeros(2)}, 100)
  assert _no_temp_left(tmp_path) == []


def test_failed_writes_leave_nothing_behind(tmp_path):
  def items():
    yield "a", np.zeros(100, np.float32)
    yield "b", np.zeros(100, np.float32)
    raise RuntimeError("producer failed")

  with pytest.raises(RuntimeError, match="producer failed"):
    st.write_sharded(tmp_path / "out", items(), 100)
  assert os.listdir(tmp_path) == []
  # An existing checkpoint survives a failed overwrite untouched.
  st.write_sharded(tmp_path / "out", {"a": np.ones(2)}, 100)
  with pytest.raises(RuntimeError):
    st.write_sharded(tmp_path / "out", items(), 100, overwrite=True)
  np.testing.assert_array_equal(st.read(tmp_path / "out")["a"], np.ones(2))
  assert _no_temp_left(tmp_path) == []
  # Single files: a bad tensor fails before anything is written; an existing
  # file is replaced only by a complete one.
  path = tmp_path / "f.safetensors"
  st.write(path, {"a": np.ones(2)})
  with pytest.raises(ValueError, match="'bad'.*object"):
    st.write(path, {"z": np.ones(2), "bad": np.array([object()])})
  with pytest.raises(ValueError, match="twice"):
    st.write_sharded(
        tmp_path / "dup", [("a", np.ones(1)), ("a", np.ones(1))], 9
    )
  np.testing.assert_array_equal(st.read(path)["a"], np.ones(2))
  assert _no_temp_left(tmp_path) == [] and not (tmp_path / "dup").exists()


def test_write_interrupted_mid_file_keeps_the_old_file(tmp_path, monkeypatch):
  path = tmp_path / "f.safetensors"
  st.write(path, {"a": np.ones(2)})
  calls = []

  def failing(a):
    calls.append(1)
    if len(calls) == 2:
      raise OSError("disk full")
    return memoryview(np.ascontiguousarray(a).reshape(-1).view(np.uint8))

  monkeypatch.setattr(st, "_bytes_of", failing)
  with pytest.raises(OSError, match="disk full"):
    st.write(path, {"x": np.zeros(3), "y": np.zeros(4)})
  monkeypatch.undo()
  np.testing.assert_array_equal(st.read(path)["a"], np.ones(2))
  assert os.listdir(tmp_path) == ["f.safetensors"]


def test_parse_size():
  assert st.parse_size("2GB") == 2 * 10**9
  assert st.parse_size("1.5 GiB") == int(1.5 * 2**30)
  assert st.parse_size("500mb") == 500 * 10**6
  assert st.parse_size(7) == 7
  for bad in ("", "2XB", "-1", 0, "0GB"):
    with pytest.raises(ValueError):
      st.parse_size(bad)


# -- validation -----------------------------------------------------------------


def _valid(tmp_path):
  path = tmp_path / "ok.safetensors"
  st.write(path, {"a": np.arange(4, dtype=np.float32), "b": np.ones(2)})
  return path


def test_truncated_file_names_the_file_and_tensor(tmp_path):
  path = _valid(tmp_path)
  data = path.read_bytes()
  bad = tmp_path / "cut.safetensors"
  bad.write_bytes(data[:-4])
  with pytest.raises(ValueError, match=r"cut\.safetensors.*'a'.*truncated"):
    st.open_checkpoint(bad)
  bad.write_bytes(data[:5])
  with pytest.raises(ValueError, match="truncated"):
    st.read(bad)
  bad.write_bytes(data[:20])
  with pytest.raises(ValueError, match="beyond the end of the file"):
    st.read(bad)
  bad.write_bytes(data + b"xx")
  with pytest.raises(ValueError, match="2 bytes after the last tensor"):
    st.read(bad)


@pytest.mark.parametrize(
    "header,data,match",
    [
        (
            {
                "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
            },
            12,
            "'b'.*overlapping",
        ),
        (
            {"a": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}},
            12,
            "'a' starts at 4, leaving a gap",
        ),
        (
            {"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}},
            8,
            "'a'.*needs 12 bytes.*span 8",
        ),
        (
            {"a": {"dtype": "Q7", "shape": [2], "data_offsets": [0, 8]}},
            8,
            "'a'.*unknown dtype 'Q7'",
        ),
        (
            {"a": {"dtype": "F4", "shape": [2], "data_offsets": [0, 1]}},
            1,
            "'a'.*sub-byte",
        ),
        (
            {"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}},
            8,
            "'a'.*invalid shape",
        ),
        (
            {"a": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}},
            8,
            "'a'.*invalid data_offsets",
        ),
        ({"a": {"dtype": "F32", "shape": [2]}}, 8, "'a' must have exactly"),
        ({"__metadata__": {"a": 1}}, 0, "__metadata__ must map strings"),
        ([1, 2], 0, "JSON object"),
    ],
)
def test_corrupt_headers(tmp_path, header, data, match):
  path = _raw_file(tmp_path / "bad.safetensors", header, b"\0" * data)
  with pytest.raises(ValueError, match=match):
    st.open_checkpoint(path)


def test_bad_json_and_duplicate_keys(tmp_path):
  path = tmp_path / "bad.safetensors"
  raw = b'{"a": {"dtype": "F32",'
  path.write_bytes(struct.pack("<Q", len(raw)) + raw)
  with pytest.raises(
      ValueError, match=r"bad\.safetensors: header is not valid"
  ):
    st.read(path)
  entry = '{"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}'
  raw = ('{"a": ' + entry + ', "a": ' + entry + "}").encode()
  path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * 4)
  with pytest.raises(ValueError, match="'a' appears twice"):
    st.read(path)
  path.write_bytes(struct.pack("<Q", 2**40) + b"{}")
  with pytest.raises(ValueError, match="exceeds"):
    st.read(path)


def test_sharded_index_errors(tmp_path):
  out = tmp_path / "m"
  st.write_sharded(out, {"a": np.ones(4), "b": np.ones(4)}, 32)
  index_path = out / "model.safetensors.index.json"
  index = json.loads(index_path.read_text())
  # A tensor in two shards.
  st.write(
      out / "model-00002-of-00002.safetensors",
      {"a": np.ones(4), "b": np.ones(4)},
  )
  with pytest.raises(ValueError, match="'a' appears in both"):
    st.open_checkpoint(out)
  st.write(out / "model-00002-of-00002.safetensors", {"b": np.ones(4)})
  # The index points at a missing file.
  index["weight_map"]["b"] = "model-00003-of-00003.safetensors"
  index_path.write_text(json.dumps(index))
  with pytest.raises(ValueError, match="00003.*missing"):
    st.open_checkpoint(out)
  # The index misplaces a tensor / omits one.
  index["weight_map"]["b"] = "model-00001-of-00002.safetensors"
  index_path.write_text(json.dumps(index))
  with pytest.raises(ValueError, match="puts tensor 'b' in.*00001"):
    st.open_checkpoint(out)
  index["weight_map"]["b"] = "model-00002-of-00002.safetensors"
  st.write(
      out / "model-00001-of-00002.safetensors",
      {"a": np.ones(4), "c": np.ones(4)},
  )
  index_path.write_text(json.dumps(index))
  with pytest.raises(ValueError, match="'c'.*missing from the weight_map"):
    st.open_checkpoint(out)
  index_path.write_text("{not json")
  with pytest.raises(ValueError, match="not valid JSON"):
    st.open_checkpoint(out)


def test_missing_paths(tmp_path):
  with pytest.raises(FileNotFoundError, match="nope"):
    st.open_checkpoint(tmp_path / "nope")
  with pytest.raises(FileNotFoundError, match="holds no safetensors"):
    st.open_checkpoint(tmp_path)
  with pytest.raises(KeyError, match="'zz'"):
    st.open_checkpoint(_valid(tmp_path)).info("zz")
