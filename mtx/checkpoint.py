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
    raise FileNotFoundError(f"no checkpoint at {path}")
  if not is_checkpoint(path):
    raise ValueError(
        f"{path} is not a complete mtx checkpoint (expected the"
        f" '{_PARAMS}' and '{_META}' items written by mtx.checkpoint.save)"
    )


def read_metadata(path: str | os.PathLike) -> dict:
  """The JSON metadata saved with a checkpoint."""
  path = Path(path).absolute()
  _check(path)
  out = _checkpointer().restore(
      path, args=ocp.args.Composite(**{_META: ocp.args.JsonRestore()})
  )
  return dict(out[_META])


def param_shapes(path: str | os.PathLike) -> Any:
  """The saved tree as ``jax.ShapeDtypeStruct`` leaves (reads no data)."""
  path = Path(path).absolute()
  _check(path)
  tree = _checkpointer().metadata(path)
  items = getattr(tree, "item_metadata", tree)
  tree = items[_PARAMS]
  tree = getattr(tree, "tree", tree)
  return jax.tree.map(
      lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype),
      tree,
      is_leaf=lambda m: hasattr(m, "shape") and hasattr(m, "dtype"),
  )


def restore(
    path: str | os.PathLike,
    *,
    shardings: Any = None,
    target: Any = None,
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

  Returns:
    The params (``jax.Array`` leaves; on the default device unless
    ``shardings``/``target`` say otherwise).

  Raises:
    FileNotFoundError / ValueError: missing or incomplete checkpoint, or a
      target that does not match what was saved.
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
  out = _checkpointer().restore(
      path,
      args=ocp.args.Composite(**{_PARAMS: ocp.args.StandardRestore(abstract)}),
  )
  return out[_PARAMS]


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

  def restore(self, step: int, *, target: Any) -> Any:
    """Restores ``step`` into the structure/shardings of ``target``."""
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(
            np.shape(x),
            np.asarray(x).dtype if not hasattr(x, "dtype") else x.dtype,
            sharding=getattr(x, "sharding", None),
        ),
        target,
    )
    out = self._mgr.restore(
        int(step),
        args=ocp.args.Composite(
            **{_PARAMS: ocp.args.StandardRestore(abstract)}
        ),
    )
    return out[_PARAMS]

  def metadata(self, step: int) -> dict:
    out = self._mgr.restore(
        int(step), args=ocp.args.Composite(**{_META: ocp.args.JsonRestore()})
    )
    return dict(out[_META])

  def close(self) -> None:
    self._mgr.close()
