"""mtx.io.safetensors: round trips, byte compatibility with the safetensors
package both ways, sharding, atomicity and validation of corrupt files."""

import json
import os
import re
import struct

import ml_dtypes
import numpy as np
import pytest

from mtx.io import _st_write
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


def test_read_is_an_aligned_read_only_copy(tmp_path):
  path = tmp_path / "a.safetensors"
  st.write(path, {"w": np.ones((64, 64), np.float32)})
  a = st.read(path)["w"]
  assert not a.flags.writeable and a.ctypes.data % 64 == 0
  os.unlink(path)  # the array owns its bytes: nothing is mapped
  assert float(a.sum()) == 64 * 64
  st.write(path, {"w": np.ones((64, 64), np.float32)})
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
  st.write(ours, tensors, metadata=metadata, hashes=False)
  safetensors_numpy.save_file(tensors, str(theirs), metadata=metadata)
  assert ours.read_bytes() == theirs.read_bytes()
  # With hashes: what the package writes given the same __metadata__ (the
  # same header as JSON; it orders metadata keys as its hash map does).
  st.write(ours, tensors, metadata=metadata)
  _, meta = st.read_header(ours)
  assert set(json.loads(meta[st.HASH_KEY])) == set(tensors)
  safetensors_numpy.save_file(tensors, str(theirs), metadata=meta)
  a, b = ours.read_bytes(), theirs.read_bytes()
  n = int.from_bytes(a[:8], "little")
  assert a[:8] == b[:8] and a[8 + n :] == b[8 + n :]
  assert json.loads(a[8 : 8 + n]) == json.loads(b[8 : 8 + n])


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

  monkeypatch.setattr(_st_write, "_bytes_of", failing)
  with pytest.raises(OSError, match="disk full"):
    st.write(path, {"x": np.zeros(3), "y": np.zeros(4)}, hashes=False)
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


# -- content hashes ---------------------------------------------------------------


def _data_range(path, name):
  info = st.open_checkpoint(path).info(name)
  return info.start, info.end


def _flip(path, pos):
  with open(path, "r+b") as f:
    f.seek(pos)
    b = f.read(1)
    f.seek(pos)
    f.write(bytes([b[0] ^ 0x10]))


def test_hashes_recorded_and_read_by_the_safetensors_package(tmp_path):
  path = tmp_path / "h.safetensors"
  tensors = _tensors()
  st.write(path, tensors, metadata={"k": "v"})
  ckpt = st.open_checkpoint(path)
  assert ckpt.metadata == {"k": "v"} and set(ckpt.hashes) == set(tensors)
  assert st.verify_file(path) is True
  from safetensors import safe_open  # pylint: disable=g-import-not-at-top

  with safe_open(str(path), "np") as f:
    assert json.loads(f.metadata()[st.HASH_KEY]) == ckpt.hashes
    for name in tensors:
      _assert_same(f.get_tensor(name), tensors[name])


def test_flipped_data_bytes_are_detected(tmp_path):
  path = tmp_path / "h.safetensors"
  tensors = _tensors()
  st.write(path, tensors)
  original = path.read_bytes()
  for name in ("embed.weight", "ids", "scalar", "mask", "u16"):
    start, end = _data_range(path, name)
    for pos in sorted({start, (start + end) // 2, end - 1}):
      path.write_bytes(original)
      _flip(path, pos)
      msg = rf"h\.safetensors: tensor '{re.escape(name)}' does not match"
      with pytest.raises(ValueError, match=msg):
        st.read(path)
      with pytest.raises(ValueError, match=msg):
        st.verify_file(path)
      # The opt-out reads the changed bytes.
      got = st.read(path, verify=False)[name]
      assert got.tobytes() != tensors[name].tobytes()


def test_flipped_hash_entry_and_name_are_detected(tmp_path):
  path = tmp_path / "h.safetensors"
  st.write(path, {"aa": np.ones(3, np.float32), "bb": np.zeros(2)})
  raw = path.read_bytes()
  path.write_bytes(
      raw.replace(b'\\"aa\\": \\"', b'\\"aa\\": \\"0', 1)[: -0 or None]
  )
  # a digest that is not 64 hex characters: corrupt header, refused on open
  n = int.from_bytes(raw[:8], "little")
  header = raw[8 : 8 + n].decode()
  meta_start = header.index(st.HASH_KEY)
  for k in range(meta_start + 20, meta_start + 120, 7):
    b = bytearray(raw)
    b[8 + k] ^= 0x01
    path.write_bytes(bytes(b))
    with pytest.raises(ValueError, match=r"h\.safetensors"):
      st.read(path)


def test_verify_file_on_sharded_and_foreign_checkpoints(tmp_path):
  out = tmp_path / "m"
  st.write_sharded(out, {"a": np.ones(4), "b": np.arange(4.0)}, 32)
  assert st.verify_file(out) is True
  shard = out / "model-00002-of-00002.safetensors"
  start, _ = _data_range(shard, "b")
  _flip(shard, start + 3)
  with pytest.raises(ValueError, match=r"00002-of-00002.*'b' does not match"):
    st.verify_file(out)
  foreign = tmp_path / "foreign.safetensors"
  safetensors_numpy.save_file({"w": np.ones(3)}, str(foreign))
  assert st.verify_file(foreign) is False
  np.testing.assert_array_equal(st.read(foreign)["w"], np.ones(3))


def test_writer_replaces_copied_hashes(tmp_path):
  src = tmp_path / "a.safetensors"
  st.write(src, {"w": np.ones(2)})
  _, meta = st.read_header(src)
  dst = tmp_path / "b.safetensors"
  st.write(dst, {"w": np.zeros(2)}, metadata=meta)  # stale hashes dropped
  np.testing.assert_array_equal(st.read(dst)["w"], np.zeros(2))
  st.write(dst, {"w": np.zeros(2)}, metadata=meta, hashes=False)
  assert st.HASH_KEY not in st.read_header(dst)[1]


# -- hostile headers ------------------------------------------------------------


@pytest.mark.parametrize(
    "raw,match",
    [
        (b"[" * 100_000 + b"]" * 100_000, "deeper than"),
        (b'{"a":' * 50_000 + b"1" + b"}" * 50_000, "deeper than"),
        (
            b'{"a": {"dtype": "F32", "shape": [1180591620717411303424, 0],'
            b' "data_offsets": [0, 0]}}',
            "'a'.*element limit",
        ),
        (
            b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [-4, 0]}}',
            "'a'.*invalid data_offsets",
        ),
        (
            b'{"a": {"dtype": "F32", "shape": [1], "data_offsets":'
            b" [1180591620717411303424, 1180591620717411303428]}}",
            "'a' starts at 1180591620717411303424",
        ),
        (b'{"a": 1e999999}', "'a' must have exactly"),
    ],
)
def test_hostile_headers_are_value_errors(tmp_path, raw, match):
  path = tmp_path / "evil.safetensors"
  path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * 4)
  with pytest.raises(ValueError, match=r"evil\.safetensors.*" + match):
    st.read(path)
  with pytest.raises(ValueError, match=r"evil\.safetensors"):
    st.verify_file(path)


def test_header_length_past_eof(tmp_path):
  path = tmp_path / "evil.safetensors"
  path.write_bytes(struct.pack("<Q", 1000) + b"{}")
  with pytest.raises(ValueError, match=r"evil\.safetensors.*beyond the end"):
    st.open_checkpoint(path)


# -- files that change while they are read -----------------------------------------


def test_truncated_between_two_reads(tmp_path):
  path = tmp_path / "t.safetensors"
  st.write(path, {"a": np.ones(1000, np.float32), "b": np.ones(1000)})
  ckpt = st.open_checkpoint(path)
  np.testing.assert_array_equal(ckpt["a"], np.ones(1000))
  a_end = ckpt.info("a").end
  os.truncate(path, a_end - 100)
  for read in (
      lambda: ckpt["b"],
      lambda: ckpt["a"],
      lambda: ckpt.read_rows("b", 0, 10),
      ckpt.verify_all,
  ):
    with pytest.raises(ValueError, match=r"t\.safetensors: the file changed"):
      read()


def test_rewritten_in_place_between_reads(tmp_path):
  path = tmp_path / "t.safetensors"
  st.write(path, {"a": np.ones(10, np.float32)})
  ckpt = st.open_checkpoint(path)
  raw = path.read_bytes()
  with open(path, "r+b") as f:  # same size, new contents and mtime
    f.write(raw)
  os.utime(path, ns=(1, 1))
  with pytest.raises(ValueError, match=r"t\.safetensors: the file changed"):
    ckpt["a"]


_READER = """
import sys
import numpy as np
from mtx.io import safetensors as st
ckpt = st.open_checkpoint(sys.argv[1])
float(np.asarray(ckpt["t00"]).sum())  # a memory-mapped reader maps it now
print("open", flush=True)
sys.stdin.readline()
try:
  for _ in range(int(sys.argv[2])):
    for name in ckpt:
      a = np.asarray(ckpt[name])
      assert float(a.sum()) == a.size, name
      if len(a) > 4:
        assert float(ckpt.read_rows(name, 2, 4).sum()) == 2 * a.shape[1]
except ValueError as e:
  print("ValueError:", e)
  sys.exit(3)
print("complete")
"""


@pytest.mark.parametrize("rounds", [1, 200])
def test_truncation_while_reading_never_kills_the_reader(tmp_path, rounds):
  """A file truncated under a reader ends in a ValueError naming the file or
  a correct read, never a signal death (SIGBUS from a mapped page)."""
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top

  path = tmp_path / "big.safetensors"
  st.write(
      path,
      {f"t{k:02d}": np.ones((64, 4096), np.float32) for k in range(32)},
  )
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  proc = subprocess.Popen(
      [sys.executable, "-c", _READER, str(path), str(rounds)],
      stdin=subprocess.PIPE,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
      cwd=root,
      env={**os.environ, "PYTHONPATH": root},
  )
  assert proc.stdout.readline().strip() == "open"
  if rounds == 1:  # deterministic: truncated between two reads
    os.truncate(path, os.path.getsize(path) // 2)
    proc.stdin.write("go\n")
    proc.stdin.flush()
  else:  # racing the reader
    proc.stdin.write("go\n")
    proc.stdin.flush()
    os.truncate(path, os.path.getsize(path) // 3)
  out, err = proc.communicate(timeout=240)
  assert proc.returncode >= 0, (proc.returncode, err[-2000:])
  if rounds == 1:
    assert proc.returncode == 3, (out, err[-2000:])
  if proc.returncode == 3:
    assert "big.safetensors" in out and "ValueError" in out
  else:
    assert proc.returncode == 0 and "complete" in out, (out, err[-2000:])


# -- row ranges and lazy tensors ---------------------------------------------------


def test_read_rows_and_lazy_tensors(tmp_path):
  path = tmp_path / "r.safetensors"
  x = np.arange(60, dtype=np.float32).reshape(10, 6)
  st.write(path, {"x": x, "s": np.array(3.0)})
  ckpt = st.open_checkpoint(path)
  np.testing.assert_array_equal(ckpt.read_rows("x", 2, 5), x[2:5])
  np.testing.assert_array_equal(ckpt.read_rows("x", 8, 20), x[8:])
  assert ckpt.read_rows("x", 5, 5).shape == (0, 6)
  lazy = ckpt.lazy("x")
  assert lazy.shape == (10, 6) and lazy.dtype == np.float32 and len(lazy) == 10
  np.testing.assert_array_equal(lazy[3:7], x[3:7])
  np.testing.assert_array_equal(np.asarray(lazy), x)
  np.testing.assert_array_equal(lazy[:, 1], x[:, 1])
  with pytest.raises(ValueError, match="'s' is a scalar"):
    ckpt.read_rows("s", 0, 1)
