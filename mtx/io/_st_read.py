"""Reading safetensors checkpoints safely (private; the public surface is
:mod:`mtx.io.safetensors`).

Tensors are read with ``pread`` into private, 64-byte aligned buffers, never
memory-mapped: a file truncated or rewritten while it is being read cannot
fault the process (a mapped page past a new end of file is a SIGBUS); the
short read, or the changed size, inode or mtime seen before and after each
read, is a ``ValueError`` naming the file. Whole-tensor reads are checked
against the SHA-256 that mtx's writers record in ``__metadata__`` (when the
file has them, unless ``verify=False``).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
import json
import os
from typing import Any

import numpy as np

from mtx.io._st_header import dtype_name
from mtx.io._st_header import FileStamp
from mtx.io._st_header import HASH_KEY
from mtx.io._st_header import INDEX_NAME
from mtx.io._st_header import parse_hashes
from mtx.io._st_header import PathLike
from mtx.io._st_header import read_header_stamped
from mtx.io._st_header import SINGLE_NAME
from mtx.io._st_header import tensor_hash
from mtx.io._st_header import TensorInfo

_ALIGN = 64  # jax uses a host buffer without a copy when it is this aligned
_CHUNK = 1 << 26  # bytes per read syscall and per hashing step


def _aligned_empty(nbytes: int) -> np.ndarray:
  buf = np.empty(nbytes + _ALIGN, np.uint8)
  off = -buf.ctypes.data % _ALIGN
  return buf[off : off + nbytes]


class _File:
  """One open file whose stamp is checked around every read."""

  def __init__(self, path: str, stamp: FileStamp):
    self.path, self.stamp = path, stamp
    try:
      self.fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
      raise ValueError(
          f"{path}: the file was removed after its header was read"
      ) from None
    try:
      self.check()
    except BaseException:
      os.close(self.fd)
      raise

  def check(self) -> None:
    now = FileStamp.of(os.fstat(self.fd))
    if now != self.stamp:
      what = (
          f"its size went from {self.stamp.size} to {now.size} bytes"
          if now.size != self.stamp.size
          else "it was replaced or rewritten"
      )
      raise ValueError(
          f"{self.path}: the file changed while it was being read ({what})"
      )

  def read_into(self, out: np.ndarray, offset: int) -> None:
    view, pos, n = memoryview(out).cast("B"), 0, out.nbytes
    while pos < n:
      got = os.preadv(self.fd, [view[pos : pos + _CHUNK]], offset + pos)
      if got <= 0:
        self.check()  # names the change if there is one
        raise ValueError(
            f"{self.path}: the file ends at byte {offset + pos} while "
            f"reading {n} bytes at {offset}: truncated while being read"
        )
      pos += got

  def close(self) -> None:
    os.close(self.fd)

  def __enter__(self) -> _File:
    return self

  def __exit__(self, *exc) -> None:
    self.close()


class Checkpoint(Mapping):
  """A read-only mapping ``name -> np.ndarray`` over safetensors files.

  Indexing reads the tensor into a fresh read-only array (64-byte aligned;
  only the headers are read when the checkpoint is opened), checking it
  against its recorded SHA-256 when the file has one and ``verify`` is on.
  :meth:`read_rows` reads a range of the leading axis (unverified: a hash
  covers a whole tensor) and :meth:`lazy` gives a :class:`LazyTensor` that
  reads on use. ``info(name)`` gives a tensor's dtype, shape and location
  without reading it. Build one with :func:`open_checkpoint`.
  """

  def __init__(
      self,
      path: str,
      infos: Mapping[str, TensorInfo],
      metadata: Mapping[str, str],
      *,
      stamps: Mapping[str, FileStamp] | None = None,
      hashes: Mapping[str, str] | None = None,
      verify: bool = True,
  ):
    self.path = path
    self._infos = dict(infos)
    self.metadata = {k: v for k, v in metadata.items() if k != HASH_KEY}
    self.hashes = dict(hashes or {})
    self.verify = verify
    self._files = sorted({i.file for i in self._infos.values()})
    self._stamps = dict(stamps or {})
    for f in self._files:
      if f not in self._stamps:
        self._stamps[f] = FileStamp.of(os.stat(f))

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

  def _open(self, file: str) -> _File:
    return _File(file, self._stamps[file])

  def __getitem__(self, name: str) -> np.ndarray:
    info = self.info(name)
    buf = _aligned_empty(info.nbytes)
    if info.nbytes:
      with self._open(info.file) as f:
        f.read_into(buf, info.start)
        f.check()
    want = self.hashes.get(name) if self.verify else None
    if want is not None:
      if tensor_hash(dtype_name(info.dtype), info.shape, buf) != want:
        raise ValueError(
            f"{info.file}: tensor {name!r} does not match its recorded "
            "SHA-256 (corrupt data)"
        )
    a = buf.view(info.dtype).reshape(info.shape)
    a.flags.writeable = False
    return a

  def read_rows(self, name: str, start: int, stop: int) -> np.ndarray:
    """Rows ``[start, stop)`` of a tensor's leading axis (not verified)."""
    info = self.info(name)
    if not info.shape:
      raise ValueError(f"{info.file}: tensor {name!r} is a scalar")
    rows = info.shape[0]
    start, stop, _ = slice(start, stop).indices(rows)
    stop = max(start, stop)
    row = info.nbytes // rows if rows else 0
    buf = _aligned_empty((stop - start) * row)
    if buf.nbytes:
      with self._open(info.file) as f:
        f.read_into(buf, info.start + start * row)
        f.check()
    a = buf.view(info.dtype).reshape((stop - start, *info.shape[1:]))
    a.flags.writeable = False
    return a

  def lazy(self, name: str) -> LazyTensor:
    """A :class:`LazyTensor` for ``name`` (reads nothing yet)."""
    self.info(name)
    return LazyTensor(self, name)

  def verify_all(self) -> bool:
    """Checks every tensor against its recorded SHA-256, reading in bounded
    chunks. True if every tensor had a hash, False if some file has none.

    Raises:
      ValueError: a mismatch (file and tensor named) or a file that changed.
    """
    complete = all(n in self.hashes for n in self._infos)
    buf = np.empty(min(_CHUNK, max(1, self.nbytes)), np.uint8)
    for file in self._files:
      names = [n for n, i in self._infos.items() if i.file == file]
      with self._open(file) as f:
        for name in names:
          info, want = self._infos[name], self.hashes.get(name)
          if want is None:
            continue
          if (
              tensor_hash(
                  dtype_name(info.dtype), info.shape, self._chunks(f, info, buf)
              )
              != want
          ):
            raise ValueError(
                f"{file}: tensor {name!r} does not match its recorded "
                "SHA-256 (corrupt data)"
            )
        f.check()
    return complete

  @staticmethod
  def _chunks(f: _File, info: TensorInfo, buf: np.ndarray):
    pos = info.start
    while pos < info.end:
      part = buf[: min(buf.size, info.end - pos)]
      f.read_into(part, pos)
      yield part
      pos += part.size

  def __iter__(self) -> Iterator[str]:
    return iter(self._infos)

  def __len__(self) -> int:
    return len(self._infos)

  def __contains__(self, name: object) -> bool:
    return name in self._infos

  def release(self, name: str | None = None) -> None:
    """Kept for callers written for memory-mapped reads: nothing is mapped
    (each read is a private array, freed with its last reference)."""
    if name is not None:
      self.info(name)

  def close(self) -> None:
    """Nothing to close (files are opened per read)."""

  def __enter__(self) -> Checkpoint:
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def __repr__(self) -> str:
    return (
        f"Checkpoint({self.path!r}, {len(self)} tensors, "
        f"{len(self._files)} file(s), {self.nbytes} bytes)"
    )


class LazyTensor:
  """A tensor of a :class:`Checkpoint` read only when used.

  ``shape``/``dtype``/``ndim``/``size``/``nbytes`` need no read;
  ``x[a:b]`` reads rows ``a..b`` of the leading axis; ``np.asarray(x)``
  reads (and verifies) the whole tensor.
  """

  __slots__ = ("checkpoint", "name", "shape", "dtype")

  def __init__(self, checkpoint: Checkpoint, name: str):
    info = checkpoint.info(name)
    self.checkpoint, self.name = checkpoint, name
    self.shape, self.dtype = info.shape, info.dtype

  ndim = property(lambda self: len(self.shape))
  size = property(lambda self: int(np.prod(self.shape, dtype=np.int64)))
  nbytes = property(lambda self: self.size * self.dtype.itemsize)

  def __len__(self) -> int:
    if not self.shape:
      raise TypeError("len() of a 0-d tensor")
    return self.shape[0]

  def __getitem__(self, key: Any) -> np.ndarray:
    if isinstance(key, slice) and key.step in (None, 1) and self.shape:
      return self.checkpoint.read_rows(self.name, key.start, key.stop)
    return np.asarray(self)[key]

  def __array__(self, dtype=None, copy=None) -> np.ndarray:
    del copy  # always a fresh array
    a = self.checkpoint[self.name]
    return a if dtype is None else a.astype(dtype)

  def __repr__(self) -> str:
    return f"LazyTensor({self.name!r}, {self.shape}, {self.dtype})"


def _read_index(path: str) -> dict[str, str]:
  try:
    with open(path, encoding="utf-8") as f:
      index = json.load(f)
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}: not valid JSON ({e})") from None
  except (RecursionError, UnicodeDecodeError) as e:
    raise ValueError(f"{path}: not valid JSON ({type(e).__name__})") from None
  wm = index.get("weight_map") if isinstance(index, dict) else None
  if not isinstance(wm, dict) or not all(
      isinstance(k, str) and isinstance(v, str) for k, v in wm.items()
  ):
    raise ValueError(
        f"{path}: expected a 'weight_map' object mapping tensor names to "
        "shard files"
    )
  return wm


def _open_index(path: str, verify: bool) -> Checkpoint:
  wm = _read_index(path)
  folder = os.path.dirname(path)
  shards = {}
  for file in sorted(set(wm.values())):
    full = os.path.join(folder, file)
    if os.path.basename(file) != file or not os.path.isfile(full):
      raise ValueError(
          f"{path}: the weight_map points at {file!r}, which is missing"
      )
    shards[file] = read_header_stamped(full)
  infos, owner, meta, stamps, hashes = {}, {}, {}, {}, {}
  for file, (finfo, fmeta, stamp) in shards.items():
    meta = meta or fmeta
    full = os.path.join(folder, file)
    stamps[full] = stamp
    hashes.update(parse_hashes(full, fmeta, finfo) or {})
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
  return Checkpoint(
      path,
      {n: infos[n] for n in sorted(infos)},
      meta,
      stamps=stamps,
      hashes=hashes,
      verify=verify,
  )


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


def open_checkpoint(path: PathLike, *, verify: bool = True) -> Checkpoint:
  """Opens a safetensors checkpoint lazily (headers only are read).

  Args:
    path: a ``.safetensors`` file, a sharded checkpoint's
      ``*.safetensors.index.json``, or a folder holding either
      (``model.safetensors`` or ``model.safetensors.index.json``, as Hugging
      Face writes them).
    verify: check each tensor read whole against the SHA-256 recorded in its
      file's ``__metadata__`` (files written by mtx have them; others are
      read unchecked). False skips the check.

  Returns:
    A :class:`Checkpoint`; its ``metadata`` is the first file's
    ``__metadata__`` (without the hashes, which are in ``hashes``).

  Raises:
    FileNotFoundError: nothing at ``path``.
    ValueError: a corrupt or truncated file, an index naming a missing file
      or a tensor its shard lacks, or a tensor in two shards (the message
      names the file and tensor).
  """
  p = resolve(path)
  if p.endswith(".json"):
    return _open_index(p, verify)
  infos, meta, stamp = read_header_stamped(p)
  return Checkpoint(
      p,
      {n: infos[n] for n in sorted(infos)},
      meta,
      stamps={p: stamp},
      hashes=parse_hashes(p, meta, infos),
      verify=verify,
  )


def read(path: PathLike, *, verify: bool = True) -> dict[str, np.ndarray]:
  """All tensors of a checkpoint as read-only numpy arrays (read now,
  verified against recorded hashes unless ``verify=False``). Accepts
  whatever :func:`open_checkpoint` accepts."""
  ckpt = open_checkpoint(path, verify=verify)
  return {name: ckpt[name] for name in ckpt}


def verify_file(path: PathLike) -> bool:
  """Checks every tensor of a checkpoint against the SHA-256 hashes recorded
  in its files (a file, a folder or a sharded checkpoint's index; reads in
  bounded chunks, keeps nothing).

  Returns:
    True if every tensor carried a hash and matched; False if some file
    records none (written by another tool), whose tensors are unchecked.

  Raises:
    FileNotFoundError: nothing at ``path``.
    ValueError: a corrupt file or a mismatch (the file and tensor named).
  """
  return open_checkpoint(path).verify_all()
