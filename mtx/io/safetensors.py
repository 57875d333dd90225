"""Reading and writing the safetensors format with numpy only.

A safetensors file is an 8-byte little-endian header length ``n``, ``n``
bytes of JSON mapping each tensor name to its ``dtype``, ``shape`` and
``data_offsets`` (``[begin, end)`` relative to the end of the header; an
optional ``"__metadata__"`` entry maps strings to strings), then the raw
little-endian tensor bytes, packed with no gaps. bfloat16 and the float8
types come from ``ml_dtypes``.

Reading memory-maps the file: nothing is copied and a tensor's pages are read
from disk only when its values are used. Writing is atomic: a file is written
to a temporary sibling, fsynced and renamed into place; a sharded checkpoint
is written into a temporary directory renamed into place at the end, so a
failure never leaves a partial checkpoint behind. Files written here are
byte-identical to what the ``safetensors`` package writes for the same tensors
(tensors ordered by decreasing dtype width, then name; compact JSON padded
with spaces to a multiple of 8 bytes).

>>> import os, tempfile, numpy as np
>>> path = os.path.join(tempfile.mkdtemp(), "w.safetensors")
>>> write(path, {"w": np.arange(6, dtype=np.float32).reshape(2, 3)},
...       metadata={"format": "np"})
>>> ckpt = open_checkpoint(path)
>>> ckpt.info("w").shape, ckpt.info("w").dtype, ckpt.metadata
((2, 3), dtype('float32'), {'format': 'np'})
>>> ckpt["w"].tolist()
[[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]]
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
import contextlib
import json
import mmap
import os
import re
import shutil
import tempfile
from typing import Any, NamedTuple

import ml_dtypes
import numpy as np

PathLike = str | os.PathLike

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
# The reference implementation refuses larger headers.
MAX_HEADER_BYTES = 100_000_000
_METADATA_KEY = "__metadata__"

# safetensors dtype name -> numpy dtype (little-endian), in the order of the
# reference implementation's ``Dtype`` enum: files list tensors by decreasing
# position in this order (so every tensor is aligned to its element size),
# then by name.
_DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "U8": np.dtype("<u1"),
    "I8": np.dtype("<i1"),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E8M0": np.dtype(ml_dtypes.float8_e8m0fnu),
    "F8_E4M3FNUZ": np.dtype(ml_dtypes.float8_e4m3fnuz),
    "F8_E5M2FNUZ": np.dtype(ml_dtypes.float8_e5m2fnuz),
    "I16": np.dtype("<i2"),
    "U16": np.dtype("<u2"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I32": np.dtype("<i4"),
    "U32": np.dtype("<u4"),
    "F32": np.dtype("<f4"),
    "C64": np.dtype("<c8"),
    "F64": np.dtype("<f8"),
    "I64": np.dtype("<i8"),
    "U64": np.dtype("<u8"),
}
_RANK = {name: i for i, name in enumerate(_DTYPES)}
_NAMES = {dt: name for name, dt in _DTYPES.items()}
# Sub-byte types of the format that numpy cannot view.
_SUB_BYTE = ("F4", "F6_E2M3", "F6_E3M2")


def dtype_name(dtype: Any) -> str:
  """The safetensors name of a numpy dtype (``float32`` -> ``"F32"``).

  >>> dtype_name(np.float32), dtype_name(ml_dtypes.bfloat16)
  ('F32', 'BF16')
  """
  dt = np.dtype(dtype)
  name = _NAMES.get(dt.newbyteorder("<") if dt.byteorder == ">" else dt)
  if name is None:
    raise ValueError(f"dtype {dt} has no safetensors equivalent")
  return name


def numpy_dtype(name: str) -> np.dtype:
  """The numpy dtype of a safetensors dtype name (``"BF16"`` -> bfloat16)."""
  if name in _DTYPES:
    return _DTYPES[name]
  if name in _SUB_BYTE:
    raise ValueError(f"sub-byte dtype {name} is not supported")
  raise ValueError(f"unknown dtype {name!r}")


class TensorInfo(NamedTuple):
  """Where a tensor lives: its file and byte range (absolute, in the file)."""

  name: str
  dtype: np.dtype
  shape: tuple[int, ...]
  file: str
  start: int
  end: int

  @property
  def nbytes(self) -> int:
    return self.end - self.start


def parse_size(size: str | int) -> int:
  """Bytes from ``"2GB"``, ``"500MB"``, ``"1.5GiB"`` or an int.

  Units as Hugging Face's ``max_shard_size``: KB/MB/GB/TB are powers of 1000,
  KiB/MiB/GiB/TiB powers of 1024; a bare number is bytes.

  >>> parse_size("2GB"), parse_size("1MiB"), parse_size(10)
  (2000000000, 1048576, 10)
  """
  if isinstance(size, int | np.integer):
    n = int(size)
  else:
    m = re.fullmatch(
        r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]i?B|B)?\s*", str(size), re.IGNORECASE
    )
    if not m:
      raise ValueError(f"cannot parse size {size!r} (e.g. '2GB', '500MiB')")
    unit = (m.group(2) or "B").upper()
    base = 1024 if "I" in unit else 1000
    power = {"B": 0, "K": 1, "M": 2, "G": 3, "T": 4}[unit[0]]
    n = int(float(m.group(1)) * base**power)
  if n <= 0:
    raise ValueError(f"size must be positive, got {size!r}")
  return n


# ----------------------------------------------------------------------------
# Reading.


def _no_duplicates(path: str):
  def hook(pairs):
    seen = set()
    for k, _ in pairs:
      if k in seen:
        raise ValueError(f"{path}: tensor {k!r} appears twice in the header")
      seen.add(k)
    return dict(pairs)

  return hook


def _read_header(path: str) -> tuple[dict[str, TensorInfo], dict[str, str]]:
  """Parses and validates a file's header (reads only the header)."""
  try:
    size = os.path.getsize(path)
    f = open(path, "rb")
  except FileNotFoundError:
    raise FileNotFoundError(f"no such safetensors file: {path}") from None
  with f:
    if size < 8:
      raise ValueError(
          f"{path}: truncated safetensors file ({size} bytes; the header "
          "length alone takes 8)"
      )
    n = int.from_bytes(f.read(8), "little")
    if n > MAX_HEADER_BYTES:
      raise ValueError(
          f"{path}: header length {n} exceeds the {MAX_HEADER_BYTES}-byte "
          "limit (not a safetensors file?)"
      )
    if 8 + n > size:
      raise ValueError(
          f"{path}: header length {n} runs beyond the end of the file "
          f"({size} bytes): truncated or not a safetensors file"
      )
    raw = f.read(n)
  try:
    header = json.loads(
        raw.decode("utf-8"), object_pairs_hook=_no_duplicates(path)
    )
  except UnicodeDecodeError as e:
    raise ValueError(f"{path}: header is not UTF-8 ({e})") from None
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}: header is not valid JSON ({e})") from None
  if not isinstance(header, dict):
    raise ValueError(f"{path}: header must be a JSON object")
  meta = header.pop(_METADATA_KEY, None) or {}
  if not isinstance(meta, dict) or not all(
      isinstance(k, str) and isinstance(v, str) for k, v in meta.items()
  ):
    raise ValueError(f"{path}: __metadata__ must map strings to strings")
  data_len = size - 8 - n
  base = 8 + n
  infos = {}
  for name, entry in header.items():
    infos[name] = _entry_info(path, name, entry, base)
  # The data must be covered exactly, in offset order, with no gap or overlap.
  pos = 0
  for info in sorted(infos.values(), key=lambda i: (i.start, i.end)):
    s, e = info.start - base, info.end - base
    if s < pos:
      raise ValueError(
          f"{path}: tensor {info.name!r} has data_offsets [{s}, {e}] "
          f"overlapping the previous tensor (which ends at {pos})"
      )
    if s > pos:
      raise ValueError(
          f"{path}: tensor {info.name!r} starts at {s}, leaving a gap after "
          f"offset {pos}"
      )
    if e > data_len:
      raise ValueError(
          f"{path}: tensor {info.name!r} has data_offsets [{s}, {e}] beyond "
          f"the {data_len} data bytes of the file: truncated file"
      )
    pos = e
  if pos != data_len:
    raise ValueError(
        f"{path}: {data_len - pos} bytes after the last tensor's data "
        "(corrupt file)"
    )
  return infos, dict(meta)


def _entry_info(path: str, name: str, entry: Any, base: int) -> TensorInfo:
  if not isinstance(entry, dict) or set(entry) != {
      "dtype",
      "shape",
      "data_offsets",
  }:
    raise ValueError(
        f"{path}: tensor {name!r} must have exactly the keys dtype, shape, "
        f"data_offsets; got {entry!r}"
    )
  try:
    dtype = numpy_dtype(entry["dtype"])
  except (ValueError, TypeError) as e:
    raise ValueError(f"{path}: tensor {name!r}: {e}") from None
  shape, offsets = entry["shape"], entry["data_offsets"]
  if not isinstance(shape, list) or not all(
      type(d) is int and d >= 0 for d in shape
  ):
    raise ValueError(f"{path}: tensor {name!r} has an invalid shape {shape!r}")
  if (
      not isinstance(offsets, list)
      or len(offsets) != 2
      or not all(type(o) is int and o >= 0 for o in offsets)
      or offsets[1] < offsets[0]
  ):
    raise ValueError(
        f"{path}: tensor {name!r} has invalid data_offsets {offsets!r}"
    )
  nbytes = int(np.prod(shape, dtype=object)) * dtype.itemsize
  if offsets[1] - offsets[0] != nbytes:
    raise ValueError(
        f"{path}: tensor {name!r} of dtype {entry['dtype']} and shape "
        f"{tuple(shape)} needs {nbytes} bytes but its data_offsets "
        f"{offsets} span {offsets[1] - offsets[0]}"
    )
  return TensorInfo(
      name, dtype, tuple(shape), path, base + offsets[0], base + offsets[1]
  )


def read_header(path: PathLike) -> tuple[dict[str, TensorInfo], dict[str, str]]:
  """``({name: TensorInfo}, metadata)`` of one file, validated; no data read.

  Raises:
    FileNotFoundError: no file at ``path``.
    ValueError: a truncated or corrupt file (the file and tensor are named).
  """
  return _read_header(os.fspath(path))


class Checkpoint(Mapping):
  """A read-only mapping ``name -> np.ndarray`` over safetensors files.

  Values are read-only views of memory-mapped files: indexing copies nothing
  and reads nothing until the values are used. ``info(name)`` gives a
  tensor's dtype, shape and location without touching its data.
  ``release(name)`` (or ``release()``) returns the pages a tensor occupied in
  this process's resident memory to the OS (they stay in the page cache); use
  it when streaming through a model larger than memory.

  Build one with :func:`open_checkpoint`.
  """

  def __init__(
      self, path: str, infos: Mapping[str, TensorInfo], metadata: dict
  ):
    self.path = path
    self._infos = dict(infos)
    self.metadata = dict(metadata)
    self._maps: dict[str, mmap.mmap] = {}
    self._files = sorted({i.file for i in self._infos.values()})

  @property
  def files(self) -> list[str]:
    """The files holding the tensors (one per shard)."""
    return list(self._files)

  def info(self, name: str) -> TensorInfo:
    try:
      return self._infos[name]
    except KeyError:
      raise KeyError(f"{self.path} has no tensor {name!r}") from None

  @property
  def nbytes(self) -> int:
    return sum(i.nbytes for i in self._infos.values())

  def _map(self, file: str) -> mmap.mmap | None:
    mm = self._maps.get(file)
    if mm is None:
      with open(file, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
          return None
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
      self._maps[file] = mm
    return mm

  def __getitem__(self, name: str) -> np.ndarray:
    info = self.info(name)
    count = int(np.prod(info.shape, dtype=np.int64))
    if count == 0:
      return np.zeros(info.shape, info.dtype)
    mm = self._map(info.file)
    a = np.frombuffer(mm, dtype=info.dtype, count=count, offset=info.start)
    return a.reshape(info.shape)

  def __iter__(self) -> Iterator[str]:
    return iter(self._infos)

  def __len__(self) -> int:
    return len(self._infos)

  def __contains__(self, name: object) -> bool:
    return name in self._infos

  def release(self, name: str | None = None) -> None:
    """Drops the mapped pages of tensor ``name`` (or of every tensor) from
    this process's resident set; the values stay valid (re-read on use)."""
    if not hasattr(mmap, "MADV_DONTNEED"):
      return
    if name is None:
      for mm in self._maps.values():
        with contextlib.suppress(ValueError, OSError):
          mm.madvise(mmap.MADV_DONTNEED)
      return
    info = self.info(name)
    mm = self._maps.get(info.file)
    if mm is None or info.nbytes == 0:
      return
    page = mmap.PAGESIZE
    start = info.start // page * page
    with contextlib.suppress(ValueError, OSError):
      mm.madvise(mmap.MADV_DONTNEED, start, info.end - start)

  def close(self) -> None:
    """Unmaps the files (arrays still referencing a file keep it mapped)."""
    for mm in self._maps.values():
      with contextlib.suppress(BufferError):
        mm.close()
    self._maps.clear()

  def __enter__(self) -> Checkpoint:
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def __repr__(self) -> str:
    return (
        f"Checkpoint({self.path!r}, {len(self)} tensors, "
        f"{len(self._files)} file(s), {self.nbytes} bytes)"
    )


def _read_index(path: str) -> dict[str, str]:
  try:
    with open(path, encoding="utf-8") as f:
      index = json.load(f)
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}: not valid JSON ({e})") from None
  wm = index.get("weight_map") if isinstance(index, dict) else None
  if not isinstance(wm, dict) or not all(
      isinstance(k, str) and isinstance(v, str) for k, v in wm.items()
  ):
    raise ValueError(
        f"{path}: expected a 'weight_map' object mapping tensor names to "
        "shard files"
    )
  return wm


def _open_index(path: str) -> Checkpoint:
  wm = _read_index(path)
  folder = os.path.dirname(path)
  shards = {}
  for file in sorted(set(wm.values())):
    full = os.path.join(folder, file)
    if os.path.basename(file) != file or not os.path.isfile(full):
      raise ValueError(
          f"{path}: the weight_map points at {file!r}, which is missing"
      )
    shards[file] = _read_header(full)
  infos, owner, meta = {}, {}, {}
  for file, (finfo, fmeta) in shards.items():
    meta = meta or fmeta
    for name, info in finfo.items():
      if name in owner:
        raise ValueError(
            f"{path}: tensor {name!r} appears in both {owner[name]} and {file}"
        )
      owner[name] = file
      infos[name] = info
  for name, file in wm.items():
    if owner.get(name) != file:
      where = (
          f"it is in {owner[name]}" if name in owner else "no shard holds it"
      )
      raise ValueError(
          f"{path}: the weight_map puts tensor {name!r} in {file} but {where}"
      )
  extra = sorted(set(owner) - set(wm))
  if extra:
    raise ValueError(
        f"{path}: tensor {extra[0]!r} in {owner[extra[0]]} is missing from "
        "the weight_map"
    )
  return Checkpoint(path, {n: infos[n] for n in sorted(infos)}, meta)


def resolve(path: PathLike) -> str:
  """The file to open for ``path``: a ``.safetensors`` file, the index of a
  sharded checkpoint, or a folder's ``model.safetensors``.

  Raises:
    FileNotFoundError: ``path`` does not exist or holds no safetensors.
  """
  p = os.fspath(path)
  if os.path.isdir(p):
    for name in (INDEX_NAME, SINGLE_NAME):
      if os.path.isfile(os.path.join(p, name)):
        return os.path.join(p, name)
    indexes = sorted(
        f for f in os.listdir(p) if f.endswith(".safetensors.index.json")
    )
    files = sorted(f for f in os.listdir(p) if f.endswith(".safetensors"))
    if len(indexes) == 1:
      return os.path.join(p, indexes[0])
    if not indexes and len(files) == 1:
      return os.path.join(p, files[0])
    raise FileNotFoundError(
        f"{p} holds no safetensors checkpoint (expected {SINGLE_NAME} or "
        f"{INDEX_NAME}; found {indexes + files or 'neither'})"
    )
  if not os.path.exists(p):
    raise FileNotFoundError(f"no such checkpoint: {p}")
  return p


def open_checkpoint(path: PathLike) -> Checkpoint:
  """Opens a safetensors checkpoint lazily (headers only are read).

  Args:
    path: a ``.safetensors`` file, a sharded checkpoint's
      ``*.safetensors.index.json``, or a folder holding either
      (``model.safetensors`` or ``model.safetensors.index.json``, as Hugging
      Face writes them).

  Returns:
    A :class:`Checkpoint`; its ``metadata`` is the first file's
    ``__metadata__``.

  Raises:
    FileNotFoundError: nothing at ``path``.
    ValueError: a corrupt or truncated file, an index naming a missing file
      or a tensor its shard lacks, or a tensor in two shards (the message
      names the file and tensor).
  """
  p = resolve(path)
  if p.endswith(".json"):
    return _open_index(p)
  infos, meta = _read_header(p)
  return Checkpoint(p, {n: infos[n] for n in sorted(infos)}, meta)


def read(path: PathLike) -> dict[str, np.ndarray]:
  """All tensors of a checkpoint as read-only memory-mapped numpy arrays.

  Nothing is copied: each array is a view of the mapped file and its pages
  are read on use. Accepts whatever :func:`open_checkpoint` accepts.
  """
  ckpt = open_checkpoint(path)
  return {name: ckpt[name] for name in ckpt}


# ----------------------------------------------------------------------------
# Writing.


def _as_host(name: str, x: Any) -> np.ndarray:
  a = np.asarray(x)
  try:
    st = dtype_name(a.dtype)
  except ValueError:
    raise ValueError(
        f"tensor {name!r} has dtype {a.dtype}, which safetensors cannot store"
    ) from None
  if a.dtype.byteorder == ">":
    a = a.astype(_DTYPES[st])
  return a


def _bytes_of(a: np.ndarray) -> memoryview:
  """The raw little-endian bytes of ``a`` (a copy only if not contiguous)."""
  return memoryview(np.ascontiguousarray(a).reshape(-1).view(np.uint8))


def _check_name(name: Any) -> str:
  if not isinstance(name, str):
    raise ValueError(f"tensor names must be strings, got {name!r}")
  if name == _METADATA_KEY:
    raise ValueError(f"{_METADATA_KEY!r} is reserved and cannot name a tensor")
  return name


def _check_metadata(
    metadata: Mapping[str, str] | None,
) -> dict[str, str] | None:
  if metadata is None:
    return None
  if not isinstance(metadata, Mapping) or not all(
      isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
  ):
    raise ValueError("metadata must map strings to strings")
  return dict(metadata)


def _header(
    entries: list[tuple[str, str, tuple[int, ...], int]],
    metadata: dict[str, str] | None,
) -> bytes:
  """The padded header for ``entries`` = (name, dtype, shape, nbytes) in
  file order."""
  header: dict[str, Any] = {}
  if metadata is not None:
    header[_METADATA_KEY] = metadata
  pos = 0
  for name, st, shape, nbytes in entries:
    header[name] = {
        "dtype": st,
        "shape": list(shape),
        "data_offsets": [pos, pos + nbytes],
    }
    pos += nbytes
  raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
  raw += b" " * (-len(raw) % 8)
  if len(raw) > MAX_HEADER_BYTES:
    raise ValueError(f"header of {len(raw)} bytes exceeds the format's limit")
  return len(raw).to_bytes(8, "little") + raw


def _order(entries):
  """File order: decreasing dtype rank (alignment), then name."""
  return sorted(entries, key=lambda e: (-_RANK[e[1]], e[0]))


def _umask() -> int:
  mask = os.umask(0)
  os.umask(mask)
  return mask


def _fsync_dir(path: str) -> None:
  try:
    fd = os.open(path, os.O_RDONLY)
  except OSError:
    return
  try:
    os.fsync(fd)
  except OSError:
    pass
  finally:
    os.close(fd)


def write(
    path: PathLike,
    tensors: Mapping[str, Any],
    metadata: Mapping[str, str] | None = None,
) -> None:
  """Writes ``tensors`` to one safetensors file, atomically.

  The file is written to a temporary file in the same folder, fsynced and
  renamed onto ``path`` (replacing an existing file only then); on any error
  the temporary file is removed and ``path`` is untouched.

  Args:
    path: the file to write.
    tensors: name -> array (numpy, jax, anything ``np.asarray`` accepts).
    metadata: optional ``__metadata__`` (strings to strings).

  Raises:
    ValueError: a name or dtype the format cannot hold, or bad metadata.
  """
  path = os.fspath(path)
  metadata = _check_metadata(metadata)
  arrays = {}
  for name, x in tensors.items():
    arrays[_check_name(name)] = _as_host(name, x)
  entries = _order(
      [(n, dtype_name(a.dtype), a.shape, a.nbytes) for n, a in arrays.items()]
  )
  header = _header(entries, metadata)
  folder = os.path.dirname(os.path.abspath(path))
  fd, tmp = tempfile.mkstemp(
      dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp"
  )
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(header)
      for name, *_ in entries:
        f.write(_bytes_of(arrays[name]))
      f.flush()
      os.fchmod(f.fileno(), 0o666 & ~_umask())
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(FileNotFoundError):
      os.unlink(tmp)
    raise
  _fsync_dir(folder)


def _copy_range(src: int, offset: int, dst: int, count: int) -> None:
  """Copies ``count`` bytes at ``offset`` of fd ``src`` to fd ``dst``'s
  position, in the kernel where possible (no user-space buffer)."""
  while count > 0:
    try:
      n = os.copy_file_range(src, dst, min(count, 1 << 30), offset)
    except (AttributeError, OSError):
      n = 0
    if n <= 0:  # not supported here: a bounded user-space copy
      chunk = os.pread(src, min(count, 1 << 26), offset)
      if not chunk:
        raise OSError("short read while assembling a shard")
      os.write(dst, chunk)
      n = len(chunk)
    offset += n
    count -= n


class ShardedWriter:
  """Writes a sharded safetensors checkpoint one tensor at a time.

  Tensors are appended with :meth:`add`; once adding one would push the
  current shard past ``shard_size`` bytes, the shard is closed (a tensor
  larger than ``shard_size`` gets a shard of its own). Each tensor's bytes go
  straight to disk, so memory holds at most the tensor being added. Shards are
  named ``{prefix}-00001-of-0000N.safetensors`` with an index
  ``{prefix}.safetensors.index.json`` (``metadata.total_size`` and the
  ``weight_map``), as Hugging Face writes them. Everything is written into a
  temporary folder beside ``directory`` and renamed into place by
  :meth:`commit`; :meth:`abort` (or an exception inside a ``with`` block)
  removes it, leaving nothing behind.

  >>> import os, tempfile, numpy as np
  >>> out = os.path.join(tempfile.mkdtemp(), "model")
  >>> with ShardedWriter(out, shard_size=16) as w:
  ...   w.add("a", np.zeros(4, np.float32))
  ...   w.add("b", np.ones(4, np.float32))
  >>> sorted(os.listdir(out))  # doctest: +NORMALIZE_WHITESPACE
  ['model-00001-of-00002.safetensors', 'model-00002-of-00002.safetensors',
   'model.safetensors.index.json']
  >>> open_checkpoint(out)["b"].tolist()
  [1.0, 1.0, 1.0, 1.0]
  """

  def __init__(
      self,
      directory: PathLike,
      shard_size: int | str,
      metadata: Mapping[str, str] | None = None,
      *,
      overwrite: bool = False,
      prefix: str = "model",
  ):
    self.directory = os.path.abspath(os.fspath(directory))
    self.shard_size = parse_size(shard_size)
    self.metadata = _check_metadata(metadata)
    self.overwrite = overwrite
    self.prefix = prefix
    if _occupied(self.directory) and not overwrite:
      raise FileExistsError(
          f"{self.directory} exists; pass overwrite=True (--overwrite) to "
          "replace it"
      )
    parent = os.path.dirname(self.directory)
    os.makedirs(parent, exist_ok=True)
    self._tmp = tempfile.mkdtemp(
        dir=parent, prefix=f".{os.path.basename(self.directory)}.tmp-"
    )
    self._names: set[str] = set()
    self._shards: list[tuple[str, list[str]]] = []  # (file, names)
    self._entries: list[tuple[str, str, tuple[int, ...], int, int]] = []
    self._body = None  # the open data file of the current shard
    self._body_pos = 0
    self.total_size = 0
    self.index: dict[str, Any] | None = None
    self._done = False

  def add(self, name: str, array: Any) -> None:
    """Appends one tensor (converted to host numpy and written at once)."""
    if self._done:
      raise ValueError("the writer is closed")
    _check_name(name)
    if name in self._names:
      raise ValueError(f"tensor {name!r} is added twice")
    a = _as_host(name, array)
    if self._entries and self._body_pos + a.nbytes > self.shard_size:
      self._close_shard()
    if self._body is None:
      self._body = open(
          os.path.join(self._tmp, f"body-{len(self._shards):05d}.tmp"), "w+b"
      )
      self._body_pos = 0
    self._body.write(_bytes_of(a))
    self._entries.append(
        (name, dtype_name(a.dtype), a.shape, a.nbytes, self._body_pos)
    )
    self._names.add(name)
    self._body_pos += a.nbytes
    self.total_size += a.nbytes

  def _close_shard(self) -> None:
    """Writes the current shard: header, then the body's tensors in file
    order (copied within the kernel), then drops the body."""
    body, self._body = self._body, None
    entries = _order(self._entries)
    self._entries = []
    file = f"shard-{len(self._shards):05d}.tmp"
    header = _header([e[:4] for e in entries], self.metadata)
    body.flush()
    with open(os.path.join(self._tmp, file), "wb") as out:
      out.write(header)
      out.flush()
      for _, _, _, nbytes, pos in entries:
        _copy_range(body.fileno(), pos, out.fileno(), nbytes)
      os.fchmod(out.fileno(), 0o666 & ~_umask())
      os.fsync(out.fileno())
    body.close()
    os.unlink(body.name)
    self._shards.append((file, [e[0] for e in entries]))

  def commit(self) -> dict[str, Any]:
    """Finishes the last shard, writes the index and renames the folder into
    place (replacing an existing one only when ``overwrite``). Returns the
    index."""
    if self._done:
      raise ValueError("the writer is closed")
    try:
      if self._body is not None:
        self._close_shard()
      if not self._shards:
        raise ValueError(f"no tensors to write to {self.directory}")
      n = len(self._shards)
      weight_map = {}
      for k, (tmp_name, names) in enumerate(self._shards):
        final = f"{self.prefix}-{k + 1:05d}-of-{n:05d}.safetensors"
        os.rename(
            os.path.join(self._tmp, tmp_name), os.path.join(self._tmp, final)
        )
        for name in names:
          weight_map[name] = final
      index = {
          "metadata": {**(self.metadata or {}), "total_size": self.total_size},
          "weight_map": dict(sorted(weight_map.items())),
      }
      index_path = os.path.join(
          self._tmp, f"{self.prefix}.safetensors.index.json"
      )
      with open(index_path, "w", encoding="utf-8") as f:
        json.dump(index, f, indent=2, ensure_ascii=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
      os.chmod(self._tmp, 0o777 & ~_umask())
      _fsync_dir(self._tmp)
      _move_into_place(self._tmp, self.directory, self.overwrite)
    except BaseException:
      self.abort()
      raise
    self._done = True
    self.index = index
    return index

  def abort(self) -> None:
    """Removes everything written so far; ``directory`` is untouched."""
    if self._body is not None:
      self._body.close()
      self._body = None
    shutil.rmtree(self._tmp, ignore_errors=True)
    self._done = True

  def __enter__(self) -> ShardedWriter:
    return self

  def __exit__(self, exc_type, exc, tb) -> None:
    if exc_type is None:
      self.commit()
    elif not self._done:
      self.abort()


def _occupied(path: str) -> bool:
  """Whether ``path`` exists and is not an empty folder (which a rename
  replaces atomically)."""
  if not os.path.lexists(path):
    return False
  return not (
      os.path.isdir(path) and not os.path.islink(path) and not os.listdir(path)
  )


def _move_into_place(tmp: str, target: str, overwrite: bool) -> None:
  """Renames folder ``tmp`` to ``target``; an existing ``target`` (only with
  ``overwrite``) is moved aside first and removed once ``tmp`` is in place."""
  old = None
  if _occupied(target):
    if not overwrite:
      raise FileExistsError(
          f"{target} exists; pass overwrite=True (--overwrite) to replace it"
      )
    old = tempfile.mkdtemp(
        dir=os.path.dirname(target), prefix=f".{os.path.basename(target)}.old-"
    )
    os.rmdir(old)
    os.rename(target, old)
  try:
    os.rename(tmp, target)
  except BaseException:
    if old is not None:
      os.rename(old, target)
    raise
  _fsync_dir(os.path.dirname(target))
  if old is not None:
    if os.path.isdir(old) and not os.path.islink(old):
      shutil.rmtree(old, ignore_errors=True)
    else:
      os.unlink(old)


def write_sharded(
    directory: PathLike,
    items: Iterable[tuple[str, Any]] | Mapping[str, Any],
    shard_size: int | str,
    metadata: Mapping[str, str] | None = None,
    *,
    overwrite: bool = False,
    prefix: str = "model",
) -> dict[str, Any]:
  """Writes a sharded safetensors checkpoint from ``(name, array)`` pairs.

  Streams: each array is written as it arrives (and may be dropped by the
  producer right after), so an iterator that computes tensors one at a time
  keeps at most one of them in memory. See :class:`ShardedWriter` for the
  layout (``{prefix}-0000k-of-0000N.safetensors`` plus
  ``{prefix}.safetensors.index.json``) and atomicity.

  Args:
    directory: the folder to create (an existing empty folder is fine).
    items: ``(name, array)`` pairs (or a mapping).
    shard_size: maximum bytes per shard (``int`` or e.g. ``"2GB"``).
    metadata: ``__metadata__`` of every shard, also recorded in the index.
    overwrite: replace an existing ``directory`` (only once the new one is
      complete).
    prefix: shard file prefix.

  Returns:
    The index (``{"metadata": {..., "total_size": n}, "weight_map": ...}``).

  Raises:
    FileExistsError: ``directory`` exists and not ``overwrite``.
    ValueError: a duplicate name, a dtype the format cannot hold, no tensors.
  """
  if isinstance(items, Mapping):
    items = items.items()
  with ShardedWriter(
      directory, shard_size, metadata, overwrite=overwrite, prefix=prefix
  ) as w:
    for name, array in items:
      w.add(name, array)
  return w.index


__all__ = [
    "Checkpoint",
    "INDEX_NAME",
    "SINGLE_NAME",
    "ShardedWriter",
    "TensorInfo",
    "dtype_name",
    "numpy_dtype",
    "open_checkpoint",
    "parse_size",
    "read",
    "read_header",
    "resolve",
    "write",
    "write_sharded",
]
