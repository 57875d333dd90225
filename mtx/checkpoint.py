"""Checkpoints with orbax: params + JSON metadata, atomic, sharding-aware.

The only module that imports orbax. A checkpoint is a directory holding the
param tree (orbax's standard array format, per-shard, so sharded params are
written and read without gathering) and a JSON metadata item with the mtx
version, the creation time and whatever the caller records (source
checkpoints with their content hashes, the merging method and its
hyperparameters, a training step...).

Writes are atomic: everything goes to ``<path>.partial`` and is renamed into
place only once complete, so a crash mid-write never leaves a directory at
``path`` that restores as valid, and an existing checkpoint is replaced only
after its successor is fully written.

Integrity: :func:`save` (and :meth:`Manager.save`) record in the metadata the
SHA-256 of every array (over its dtype name, shape and bytes, key
``"mtx.sha256"``: ``{array path: hex}``) and of the metadata itself (key
``"mtx.metadata_sha256"``). :func:`restore`, :func:`read_metadata` and the
manager verify them by default (``verify=False`` skips it; the cost is
measured by ``benchmarks/checkpoint_verify.py``): a changed byte anywhere in
the data or the metadata is a ``ValueError`` naming the checkpoint and the
array, never silently different weights. A checkpoint written before mtx
recorded hashes restores with a logged warning (it cannot be verified);
:func:`verify` checks a checkpoint without keeping the restored arrays.
Arrays that are not fully addressable by one process (multi-host shards) are
recorded without a hash and restored unverified.

>>> import tempfile, os, numpy as np
>>> d = tempfile.mkdtemp()
>>> save(os.path.join(d, "ckpt"), {"w": np.ones(3)}, metadata={"step": 1})
>>> restore(os.path.join(d, "ckpt"))["w"].tolist()
[1.0, 1.0, 1.0]
>>> read_metadata(os.path.join(d, "ckpt"))["step"]
1
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp


class _QuietOrbax(logging.Filter):
  """Drops orbax's per-save INFO chatter; its warnings and errors pass."""

  def filter(self, record: logging.LogRecord) -> bool:
    return record.levelno > logging.INFO or "orbax" not in record.pathname


logging.getLogger("absl").addFilter(_QuietOrbax())

_PARAMS = "params"
_META = "metadata"
_PARTIAL = ".partial"
_OLD = ".old"
HASH_KEY = "mtx.sha256"
META_HASH_KEY = "mtx.metadata_sha256"
_log = logging.getLogger(__name__)


def _version() -> str:
  from mtx import __version__  # pylint: disable=g-import-not-at-top

  return __version__


def _checkpointer() -> ocp.Checkpointer:
  return ocp.Checkpointer(
      ocp.CompositeCheckpointHandler(
          **{
              _PARAMS: ocp.StandardCheckpointHandler(),
              _META: ocp.JsonCheckpointHandler(),
          }
      )
  )


def _is_primary() -> bool:
  return jax.process_index() == 0


def _sync(tag: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

    multihost_utils.sync_global_devices(tag)


def _path_str(path) -> str:
  return jax.tree_util.keystr(path, simple=True, separator="/")


def array_hash(x: Any) -> str | None:
  """SHA-256 (hex) of an array's dtype name, shape and bytes; None for an
  array this process cannot see whole (not fully addressable).

  >>> a = np.zeros(2, np.float32)
  >>> array_hash(a) == array_hash(a.copy()), array_hash(a) == array_hash(a[:1])
  (True, False)
  """
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return None
  a = np.asarray(x)
  h = hashlib.sha256(f"{a.dtype.name}{list(a.shape)}\0".encode())
  h.update(np.ascontiguousarray(a).reshape(-1).view(np.uint8))
  return h.hexdigest()


def _tree_hashes(tree: Any) -> dict[str, str | None]:
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {_path_str(p): array_hash(x) for p, x in flat}


def _meta_digest(meta: Mapping[str, Any]) -> str:
  import json  # pylint: disable=g-import-not-at-top

  body = {k: v for k, v in meta.items() if k != META_HASH_KEY}
  raw = json.dumps(body, sort_keys=True, separators=(",", ":"))
  return hashlib.sha256(raw.encode()).hexdigest()


def _with_hashes(meta: dict, params: Any) -> dict:
  """``meta`` plus the arrays' hashes and its own digest."""
  meta = dict(meta)
  meta[HASH_KEY] = _tree_hashes(params)
  meta[META_HASH_KEY] = _meta_digest(meta)
  return meta


def _check_meta(where: str, meta: Any, verify: bool) -> dict:
  if not isinstance(meta, Mapping):
    raise ValueError(f"checkpoint {where}: metadata is not a JSON object")
  meta = dict(meta)
  if verify and (HASH_KEY in meta) != (META_HASH_KEY in meta):
    raise ValueError(
        f"checkpoint {where}: metadata has only one of {HASH_KEY!r} and "
        f"{META_HASH_KEY!r} (corrupt metadata)"
    )
  if verify and META_HASH_KEY in meta:
    if meta[META_HASH_KEY] != _meta_digest(meta):
      raise ValueError(
          f"checkpoint {where}: metadata does not match its recorded "
          "SHA-256 (corrupt metadata)"
      )
  return meta


def _check_arrays(where: str, tree: Any, meta: Mapping[str, Any]) -> bool:
  """Compares ``tree``'s arrays with the hashes in ``meta``; False (with a
  warning) when there are none."""
  want = meta.get(HASH_KEY)
  if want is None:
    _log.warning(
        "checkpoint %s records no content hashes (written before mtx "
        "recorded them): restored unverified",
        where,
    )
    return False
  if not isinstance(want, Mapping):
    raise ValueError(f"checkpoint {where}: {HASH_KEY!r} is not a JSON object")
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  got = {_path_str(p): x for p, x in flat}
  for name in sorted(set(want) ^ set(got)):
    side = "restored but has no recorded hash" if name in got else "missing"
    raise ValueError(f"checkpoint {where}: array {name!r} is {side}")
  for name, x in got.items():
    if want[name] is None:
      continue
    h = array_hash(x)
    if h is not None and h != want[name]:
      raise ValueError(
          f"checkpoint {where}: array {name!r} does not match its recorded "
          "SHA-256 (corrupt data)"
      )
  return True


def _orbax_error(where: str, e: Exception) -> ValueError:
  msg = " ".join(str(e).split())[:300]
  return ValueError(
      f"checkpoint {where} cannot be read (corrupt or incomplete): "
      f"{type(e).__name__}: {msg}"
  )


def _rmtree(p: Path) -> None:
  if p.is_dir() and not p.is_symlink():
    shutil.rmtree(p)
  elif p.exists() or p.is_symlink():
    p.unlink()


def save(
    path: str | os.PathLike,
    params: Any,
    *,
    metadata: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> None:
  """Saves a param tree and JSON metadata atomically.

  Args:
    path: the checkpoint directory to create.
    params: a pytree of arrays (numpy or jax, possibly sharded across
      devices and hosts; each host writes its own shards).
    metadata: JSON-serialisable mapping recorded with the checkpoint; the
      keys ``mtx_version`` and ``created`` are added.
    overwrite: replace an existing checkpoint at ``path`` (only once the
      new one is complete). Without it an existing path is an error.

  Raises:
    FileExistsError: ``path`` exists and ``overwrite`` is False.
    ValueError: metadata that is not JSON-serialisable (nothing is written).
  """
  import json  # pylint: disable=g-import-not-at-top

  path = Path(path).absolute()
  if path.exists() and not overwrite:
    raise FileExistsError(
        f"{path} exists; pass overwrite=True (--overwrite) to replace it"
    )
  meta = dict(metadata or {})
  meta.setdefault("mtx_version", _version())
  meta.setdefault("created", time.strftime("%Y-%m-%dT%H:%M:%S%z"))
  try:
    json.dumps(meta)
  except TypeError as e:
    raise ValueError(
        f"checkpoint metadata is not JSON-serialisable: {e}"
    ) from e
  meta = _with_hashes(meta, params)
  partial = path.with_name(path.name + _PARTIAL)
  if _is_primary():
    _rmtree(partial)  # debris of an earlier crash
    path.parent.mkdir(parents=True, exist_ok=True)
  _sync("mtx_ckpt_pre")
  try:
    _checkpointer().save(
        partial,
        args=ocp.args.Composite(
            **{
                _PARAMS: ocp.args.StandardSave(params),
                _META: ocp.args.JsonSave(meta),
            }
        ),
    )
    _sync("mtx_ckpt_written")
    if _is_primary():
      old = path.with_name(path.name + _OLD)
      if path.exists():
        _rmtree(old)
        os.replace(path, old)
      os.replace(partial, path)
      _rmtree(old)
  except BaseException:
    if _is_primary():
      with contextlib.suppress(OSError):
        _rmtree(partial)
    raise
  _sync("mtx_ckpt_done")


def is_checkpoint(path: str | os.PathLike) -> bool:
  """Whether ``path`` is a complete mtx checkpoint."""
  path = Path(path)
  return (
      path.is_dir()
      and not path.name.endswith((_PARTIAL, _OLD))
      and (path / _PARAMS).is_dir()
      and (path / _META).exists()
  )


def _check(path: Path) -> None:
  if not path.exists():
    old = path.with_name(path.name + _OLD)
    if (old / _PARAMS).is_dir() and (old / _META).exists():
      # A save with overwrite=True was killed between its two renames.
      raise FileNotFoundError(
          f"no checkpoint at {path}; an interrupted save left the previous"
          f" checkpoint at {old}: rename it back to {path.name} to use it"
      )
    raise FileNotFoundError(f"no checkpoint at {path}")
  if not is_checkpoint(path):
    raise ValueError(
        f"{path} is not a complete mtx checkpoint (expected the"
        f" '{_PARAMS}' and '{_META}' items written by mtx.checkpoint.save)"
    )


def read_metadata(path: str | os.PathLike, *, verify: bool = True) -> dict:
  """The JSON metadata saved with a checkpoint.

  With ``verify`` (the default), metadata that does not match its recorded
  SHA-256 is a ``ValueError`` naming the checkpoint.
  """
  path = Path(path).absolute()
  _check(path)
  try:
    out = _checkpointer().restore(
        path, args=ocp.args.Composite(**{_META: ocp.args.JsonRestore()})
    )
  except Exception as e:  # pylint: disable=broad-except
    raise _orbax_error(str(path), e) from e
  return _check_meta(str(path), out[_META], verify)


def param_shapes(path: str | os.PathLike) -> Any:
  """The saved tree as ``jax.ShapeDtypeStruct`` leaves (reads no data)."""
  path = Path(path).absolute()
  _check(path)
  try:
    tree = _checkpointer().metadata(path)
    items = getattr(tree, "item_metadata", tree)
    tree = items[_PARAMS]
    tree = getattr(tree, "tree", tree)
    return jax.tree.map(
        lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype),
        tree,
        is_leaf=lambda m: hasattr(m, "shape") and hasattr(m, "dtype"),
    )
  except Exception as e:  # pylint: disable=broad-except
    raise _orbax_error(str(path), e) from e


def restore(
    path: str | os.PathLike,
    *,
    shardings: Any = None,
    target: Any = None,
    verify: bool = True,
) -> Any:
  """Restores the param tree of a checkpoint.

  Args:
    path: a directory written by :func:`save`.
    shardings: optional sharding for the restored arrays — one
      ``jax.sharding.Sharding`` for every leaf or a tree of them matching
      the saved params; each host reads only its shards.
    target: optional tree of arrays or ``jax.ShapeDtypeStruct`` giving the
      expected structure, shapes and dtypes (with their shardings); a
      mismatch is a ValueError naming the path.
    verify: check every array and the metadata against the SHA-256 recorded
      at save (each array is hashed on the host, one at a time); False skips
      it. A checkpoint without hashes restores with a logged warning.

  Returns:
    The params (``jax.Array`` leaves; on the default device unless
    ``shardings``/``target`` say otherwise).

  Raises:
    FileNotFoundError / ValueError: missing or incomplete checkpoint, a
      target that does not match what was saved, or (``verify``) data or
      metadata that do not match their recorded hashes (the checkpoint and
      array are named).
  """
  from mtx import tree as tree_lib  # pylint: disable=g-import-not-at-top

  path = Path(path).absolute()
  saved = param_shapes(path)
  if target is not None:
    want = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), target
    )
    try:
      tree_lib.assert_same_structure(want, saved, names=("target", str(path)))
    except ValueError as e:
      raise ValueError(f"checkpoint {path} does not match target: {e}") from e
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(
            x.shape, x.dtype, sharding=getattr(x, "sharding", None)
        ),
        target,
    )
  else:
    abstract = saved
  if shardings is not None:
    if isinstance(shardings, jax.sharding.Sharding):
      shardings = jax.tree.map(lambda _: shardings, abstract)
    abstract = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        abstract,
        shardings,
    )
  items = {_PARAMS: ocp.args.StandardRestore(abstract)}
  if verify:
    items[_META] = ocp.args.JsonRestore()
  try:
    out = _checkpointer().restore(path, args=ocp.args.Composite(**items))
  except Exception as e:  # pylint: disable=broad-except
    raise _orbax_error(str(path), e) from e
  if verify:
    meta = _check_meta(str(path), out[_META], True)
    _check_arrays(str(path), out[_PARAMS], meta)
  return out[_PARAMS]


def verify(path: str | os.PathLike) -> bool:
  """Checks a checkpoint's arrays and metadata against their recorded hashes.

  Restores every array once (on the host, nothing kept) and compares.

  Returns:
    True when every array was checked; False (with a logged warning) for a
    checkpoint written before mtx recorded hashes.

  Raises:
    FileNotFoundError / ValueError: a missing or incomplete checkpoint, or a
      mismatch (the checkpoint and array are named).
  """
  path = Path(path).absolute()
  meta = read_metadata(path)
  if HASH_KEY not in meta:
    _log.warning(
        "checkpoint %s records no content hashes: cannot be verified", path
    )
    return False
  restore(path)
  return True


def content_hash(paths: str | os.PathLike | Iterable[str | os.PathLike]) -> str:
  """SHA-256 over the bytes of files (directories: every file, sorted).

  Used to record which exact source checkpoints a result came from.

  >>> import tempfile, os
  >>> p = os.path.join(tempfile.mkdtemp(), "f")
  >>> _ = open(p, "wb").write(b"abc")
  >>> content_hash(p)[:12]
  'ba7816bf8f01'
  """
  if isinstance(paths, (str, os.PathLike)):
    paths = [paths]
  files = []
  for p in map(Path, paths):
    if not p.exists():
      raise FileNotFoundError(f"cannot hash {p}: no such file or directory")
    files += (
        sorted(q for q in p.rglob("*") if q.is_file()) if p.is_dir() else [p]
    )
  h = hashlib.sha256()
  for f in files:
    with open(f, "rb") as fh:
      while chunk := fh.read(1 << 22):
        h.update(chunk)
  return h.hexdigest()


class Manager:
  """Periodic training checkpoints in ``directory/<step>`` with resume.

  A thin wrapper of ``orbax.checkpoint.CheckpointManager`` saving a state
  pytree (params, optimizer state, step, data-iterator position...) and JSON
  metadata; keeps the last ``max_to_keep`` steps; orbax finalises each step
  atomically, so :meth:`latest_step` only ever sees complete ones.

  >>> import tempfile, numpy as np
  >>> m = Manager(tempfile.mkdtemp(), max_to_keep=2)
  >>> for s in (1, 2, 3):
  ...   m.save(s, {"w": np.full(2, s)})
  >>> m.latest_step(), m.all_steps()
  (3, [2, 3])
  >>> m.restore(3, target={"w": np.zeros(2, np.int64)})["w"].tolist()
  [3, 3]
  >>> m.close()
  """

  def __init__(self, directory: str | os.PathLike, *, max_to_keep: int = 2):
    self._mgr = ocp.CheckpointManager(
        Path(directory).absolute(),
        options=ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, create=True
        ),
        item_names=(_PARAMS, _META),
    )

  def latest_step(self) -> int | None:
    return self._mgr.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self._mgr.all_steps())

  def save(self, step: int, state: Any, *, metadata=None) -> None:
    meta = {"mtx_version": _version(), "step": int(step), **(metadata or {})}
    meta = _with_hashes(meta, state)
    self._mgr.save(
        int(step),
        args=ocp.args.Composite(
            **{
                _PARAMS: ocp.args.StandardSave(state),
                _META: ocp.args.JsonSave(meta),
            }
        ),
    )
    self._mgr.wait_until_finished()

  def restore(self, step: int, *, target: Any, verify: bool = True) -> Any:
    """Restores ``step`` into the structure/shardings of ``target``;
    ``verify`` checks the arrays against their recorded hashes (see
    :func:`restore`)."""
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(
            np.shape(x),
            np.asarray(x).dtype if not hasattr(x, "dtype") else x.dtype,
            sharding=getattr(x, "sharding", None),
        ),
        target,
    )
    items = {_PARAMS: ocp.args.StandardRestore(abstract)}
    if verify:
      items[_META] = ocp.args.JsonRestore()
    where = f"{self._mgr.directory}/{int(step)}"
    try:
      out = self._mgr.restore(int(step), args=ocp.args.Composite(**items))
    except Exception as e:  # pylint: disable=broad-except
      raise _orbax_error(where, e) from e
    if verify:
      _check_arrays(where, out[_PARAMS], _check_meta(where, out[_META], True))
    return out[_PARAMS]

  def metadata(self, step: int, *, verify: bool = True) -> dict:
    where = f"{self._mgr.directory}/{int(step)}"
    try:
      out = self._mgr.restore(
          int(step),
          args=ocp.args.Composite(**{_META: ocp.args.JsonRestore()}),
      )
    except Exception as e:  # pylint: disable=broad-except
      raise _orbax_error(where, e) from e
    return _check_meta(where, out[_META], verify)

  def close(self) -> None:
    self._mgr.close()
