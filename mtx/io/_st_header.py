"""The safetensors format: dtypes, header parsing and validation, header
building and the per-tensor content hashes (private; the public surface is
:mod:`mtx.io.safetensors`).

A file is an 8-byte little-endian header length ``n``, ``n`` bytes of JSON
mapping each tensor name to its ``dtype``, ``shape`` and ``data_offsets``
(``[begin, end)`` relative to the end of the header; an optional
``"__metadata__"`` entry maps strings to strings), then the raw little-endian
tensor bytes, packed with no gaps. A header is validated completely before
any data is read: anything a hostile or damaged file could hold (nesting
bombs, dimensions past 2^62, negative or out-of-file offsets, a length past
the end of the file) is a ``ValueError`` naming the file.
"""

from __future__ import annotations

from collections.abc import Mapping
import hashlib
import json
import os
import re
from typing import Any, NamedTuple

import ml_dtypes
import numpy as np

PathLike = str | os.PathLike

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
# The reference implementation refuses larger headers.
MAX_HEADER_BYTES = 100_000_000
_METADATA_KEY = "__metadata__"
# ``__metadata__`` key of the content hashes mtx's writers record: a JSON
# object {tensor name: SHA-256 hex of tensor_hash()} (metadata values must be
# strings).
HASH_KEY = "mtx.sha256"
# No dimension, and no product of the non-zero dimensions, may reach this:
# sizes stay exact in int64 arithmetic everywhere.
MAX_ELEMENTS = 1 << 62
# A valid header nests 3 deep; anything past this is refused unparsed.
_MAX_DEPTH = 16

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


_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)


def _check_depth(path: str, raw: bytes) -> None:
  """Refuses JSON nested deeper than :data:`_MAX_DEPTH` (brackets inside
  strings do not count), before the parser recurses into it."""
  if raw.count(b"[") + raw.count(b"{") <= _MAX_DEPTH:
    return
  b = np.frombuffer(_STRING.sub(b'""', raw), np.uint8)
  step = np.isin(b, (0x5B, 0x7B)).astype(np.int64) - np.isin(b, (0x5D, 0x7D))
  if step.size and int(np.cumsum(step).max()) > _MAX_DEPTH:
    raise ValueError(
        f"{path}: header nests JSON deeper than {_MAX_DEPTH} levels "
        "(not a safetensors file)"
    )


class FileStamp(NamedTuple):
  """What identifies a file's contents: device, inode, size, mtime."""

  dev: int
  ino: int
  size: int
  mtime_ns: int

  @classmethod
  def of(cls, st: os.stat_result) -> FileStamp:
    return cls(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _read_header(path: str) -> tuple[dict[str, TensorInfo], dict[str, str]]:
  """Parses and validates a file's header (reads only the header)."""
  infos, meta, _ = read_header_stamped(path)
  return infos, meta


def read_header_stamped(
    path: str,
) -> tuple[dict[str, TensorInfo], dict[str, str], FileStamp]:
  """:func:`_read_header` plus the stamp of the file the header came from."""
  try:
    f = open(path, "rb")
  except FileNotFoundError:
    raise FileNotFoundError(f"no such safetensors file: {path}") from None
  with f:
    stamp = FileStamp.of(os.fstat(f.fileno()))
    size = stamp.size
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
    if len(raw) != n:
      raise ValueError(f"{path}: file shrank while its header was read")
  _check_depth(path, raw)
  try:
    header = json.loads(
        raw.decode("utf-8"), object_pairs_hook=_no_duplicates(path)
    )
  except UnicodeDecodeError as e:
    raise ValueError(f"{path}: header is not UTF-8 ({e})") from None
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}: header is not valid JSON ({e})") from None
  except (RecursionError, MemoryError) as e:
    raise ValueError(
        f"{path}: header cannot be parsed ({type(e).__name__})"
    ) from None
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
  return infos, dict(meta), stamp


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
  count = 1
  for d in shape:
    count *= d or 1
  if count >= MAX_ELEMENTS:
    raise ValueError(
        f"{path}: tensor {name!r} has shape {tuple(shape)}, past the "
        f"{MAX_ELEMENTS}-element limit"
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


def tensor_hash(st_dtype: str, shape: tuple[int, ...], data: Any) -> str:
  """SHA-256 (hex) of a tensor's safetensors dtype name, shape and raw
  bytes (``data``: one bytes-like object or an iterable of chunks).

  >>> a = np.arange(3, dtype=np.float32)
  >>> tensor_hash("F32", (3,), a.view(np.uint8)) == tensor_hash(
  ...     "I32", (3,), a.view(np.uint8))
  False
  """
  h = hashlib.sha256(f"{st_dtype}{list(shape)}\0".encode())
  if isinstance(data, bytes | bytearray | memoryview | np.ndarray):
    data = (data,)
  for chunk in data:
    h.update(chunk)
  return h.hexdigest()


def parse_hashes(
    path: str, meta: Mapping[str, str], names: Any
) -> dict[str, str] | None:
  """The hashes recorded in a file's ``__metadata__`` (None if none); they
  must cover exactly the file's tensors ``names``."""
  raw = meta.get(HASH_KEY)
  if raw is None:
    return None
  try:
    hashes = json.loads(raw)
  except (json.JSONDecodeError, RecursionError):
    hashes = None
  if not isinstance(hashes, dict) or not all(
      isinstance(v, str) and len(v) == 64 for v in hashes.values()
  ):
    raise ValueError(
        f"{path}: __metadata__[{HASH_KEY!r}] is not a JSON object of "
        "SHA-256 hex digests (corrupt header)"
    )
  names = set(names)
  for name in sorted(names ^ set(hashes)):
    where = "has no recorded hash" if name in names else "is not in the file"
    raise ValueError(
        f"{path}: tensor {name!r} {where} ({HASH_KEY}; corrupt header)"
    )
  return hashes


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
