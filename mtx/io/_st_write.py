"""Writing safetensors checkpoints atomically (private; the public surface is
:mod:`mtx.io.safetensors`).

Every file records the SHA-256 of each of its tensors (dtype name, shape and
bytes; :func:`mtx.io._st_header.tensor_hash`) in ``__metadata__`` under
``"mtx.sha256"`` as a JSON string ``{name: hex}`` (``hashes=False`` leaves it
out). Also the atomic-rename helpers that streaming outputs use.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
import contextlib
import json
import os
import shutil
import tempfile
from typing import Any

import numpy as np

from mtx.io._st_header import _check_metadata
from mtx.io._st_header import _check_name
from mtx.io._st_header import _DTYPES
from mtx.io._st_header import _header
from mtx.io._st_header import _order
from mtx.io._st_header import dtype_name
from mtx.io._st_header import HASH_KEY
from mtx.io._st_header import parse_size
from mtx.io._st_header import PathLike
from mtx.io._st_header import tensor_hash
from mtx.io.atomic import fsync_dir as _fsync_dir
from mtx.io.atomic import move_into_place as _move_into_place
from mtx.io.atomic import occupied as _occupied
from mtx.io.atomic import umask as _umask


def _with_hashes(
    metadata: dict[str, str] | None, hashes: dict[str, str] | None
) -> dict[str, str] | None:
  """``metadata`` with the hashes entry (replacing any copied one)."""
  meta = {k: v for k, v in (metadata or {}).items() if k != HASH_KEY}
  if hashes is not None:
    meta[HASH_KEY] = json.dumps(dict(sorted(hashes.items())))
  return meta if (meta or metadata is not None) else None


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


def write(
    path: PathLike,
    tensors: Mapping[str, Any],
    metadata: Mapping[str, str] | None = None,
    *,
    hashes: bool = True,
) -> None:
  """Writes ``tensors`` to one safetensors file, atomically.

  The file is written to a temporary file in the same folder, fsynced and
  renamed onto ``path`` (replacing an existing file only then); on any error
  the temporary file is removed and ``path`` is untouched.

  Args:
    path: the file to write.
    tensors: name -> array (numpy, jax, anything ``np.asarray`` accepts).
    metadata: optional ``__metadata__`` (strings to strings).
    hashes: record each tensor's SHA-256 in ``__metadata__["mtx.sha256"]``
      (readers verify them); False writes exactly what the ``safetensors``
      package writes for the same tensors and metadata.

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
  digests = None
  if hashes:
    digests = {
        n: tensor_hash(st, shape, _bytes_of(arrays[n]))
        for n, st, shape, _ in entries
    }
  header = _header(entries, _with_hashes(metadata, digests))
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
  >>> from mtx.io.safetensors import open_checkpoint
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
      hashes: bool = True,
  ):
    self.hashes = hashes
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
    self._digests: dict[str, str] = {}  # the current shard's hashes
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
    data = _bytes_of(a)
    self._body.write(data)
    if self.hashes:
      self._digests[name] = tensor_hash(dtype_name(a.dtype), a.shape, data)
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
    digests, self._digests = self._digests, {}
    header = _header(
        [e[:4] for e in entries],
        _with_hashes(self.metadata, digests if self.hashes else None),
    )
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
          "metadata": {
              **(_with_hashes(self.metadata, None) or {}),
              "total_size": self.total_size,
          },
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


def write_sharded(
    directory: PathLike,
    items: Iterable[tuple[str, Any]] | Mapping[str, Any],
    shard_size: int | str,
    metadata: Mapping[str, str] | None = None,
    *,
    overwrite: bool = False,
    prefix: str = "model",
    hashes: bool = True,
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
    hashes: record each shard's tensors' SHA-256 in its ``__metadata__``.

  Returns:
    The index (``{"metadata": {..., "total_size": n}, "weight_map": ...}``).

  Raises:
    FileExistsError: ``directory`` exists and not ``overwrite``.
    ValueError: a duplicate name, a dtype the format cannot hold, no tensors.
  """
  if isinstance(items, Mapping):
    items = items.items()
  with ShardedWriter(
      directory,
      shard_size,
      metadata,
      overwrite=overwrite,
      prefix=prefix,
      hashes=hashes,
  ) as w:
    for name, array in items:
      w.add(name, array)
  return w.index
