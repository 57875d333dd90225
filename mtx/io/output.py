"""Writing merged checkpoints: atomically, as working copies of the base.

:func:`merge_checkpoints` runs the streaming merge
(:func:`mtx.io.engine.merge_tensors`) and streams its tensors into sharded
safetensors files (or an orbax checkpoint), one output per scale, in a
staging folder that :mod:`mtx.io.atomic` renames into place once complete.
:func:`copy_side_files` makes a safetensors output a working copy of the
pretrained folder (config, tokenizer, sentence-transformers modules).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import itertools
import json
import logging
import os
import re
import shutil
from typing import Any

import numpy as np

from mtx import tree as mtree
from mtx.io import atomic
from mtx.io import safetensors as st
from mtx.io.engine import merge_tensors
from mtx.io.models import Model
from mtx.io.models import open_model
from mtx.io.models import PathLike
from mtx.io.plan import Plan

_log = logging.getLogger(__name__)


# Files in a Hugging Face model folder that hold the weights being merged
# (never copied to the output); everything else small (config, tokenizer) is.
_WEIGHT_SUFFIXES = (
    ".safetensors",
    ".safetensors.index.json",
    ".bin",
    ".bin.index.json",
    ".pt",
    ".pth",
    ".h5",
    ".msgpack",
    ".ckpt",
    ".gguf",
    ".onnx",
    ".onnx_data",
    ".tflite",
)
_MAX_COPY_BYTES = 64 << 20
_SKIP_DIRS = re.compile(r"^(\..*|checkpoint-\d+|runs|__pycache__)$")


def _modules(src: str) -> set[str]:
  """The sentence-transformers module folders of ``src`` (``modules.json``):
  copied whole, weights included (they are not part of the merge)."""
  try:
    with open(os.path.join(src, "modules.json"), encoding="utf-8") as f:
      mods = json.load(f)
  except (OSError, ValueError):
    return set()
  if not isinstance(mods, list):
    return set()
  return {
      os.path.normpath(m["path"])
      for m in mods
      if isinstance(m, dict) and isinstance(m.get("path"), str) and m["path"]
  }


def _inside(path: str, folder: str) -> bool:
  return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _link_allowed(full: str, root: str) -> bool:
  """Whether symlink ``full`` may be followed: its target is inside the
  (real) base folder ``root``, or in the ``blobs/`` folder of the Hugging
  Face hub cache entry ``root`` is a snapshot of."""
  target = os.path.realpath(full)
  if _inside(target, root):
    return True
  snapshots = os.path.dirname(root)
  if os.path.basename(snapshots) == "snapshots":
    blobs = os.path.join(os.path.dirname(snapshots), "blobs")
    return _inside(target, blobs) and os.path.isfile(target)
  return False


def copy_side_files(src: PathLike, dst: PathLike, dtype: Any = None) -> None:
  """Makes ``dst`` a working copy of the model folder ``src``, less the
  weights being merged.

  Copied: the top level's files that are not weights (config, tokenizer,
  generation config, ...; each up to 64 MiB), and the subfolders (e.g.
  sentence-transformers' ``1_Pooling/``) without weight files, except the
  module folders ``modules.json`` lists, which are copied whole. Skipped:
  hidden entries, ``checkpoint-*``/``runs`` training folders, and symlinks
  leading out of ``src`` (logged; links into a Hugging Face hub cache's
  ``blobs/`` are followed). For a file ``src`` only its folder's top-level
  files are copied. With ``dtype``, ``config.json``'s ``torch_dtype`` is
  updated.
  """
  src = os.fspath(src)
  recursive = os.path.isdir(src)
  if not recursive:
    src = os.path.dirname(os.path.abspath(src))
  root = os.path.realpath(src)
  modules = _modules(src) if recursive else set()
  for dirpath, dirnames, filenames in os.walk(src):
    rel = os.path.relpath(dirpath, src)
    rel = "" if rel == "." else rel
    whole = any(_inside(rel, m) for m in modules) if rel else False
    keep = []
    for d in sorted(dirnames):
      full = os.path.join(dirpath, d)
      if _SKIP_DIRS.match(d):
        continue
      if os.path.islink(full):
        _log.warning("not copied: %s is a symlink to a folder", full)
        continue
      keep.append(d)
    dirnames[:] = keep if recursive else []
    for name in sorted(filenames):
      full = os.path.join(dirpath, name)
      if name.startswith(".") or not os.path.isfile(full):
        continue
      if not whole and name.endswith(_WEIGHT_SUFFIXES):
        if rel:
          _log.info("not copied: %s holds weights that are not merged", full)
        continue
      if not rel and os.path.getsize(full) > _MAX_COPY_BYTES:
        _log.warning(
            "not copied: %s is %d bytes, over the %d-byte limit for side "
            "files; copy it by hand if the model needs it",
            full,
            os.path.getsize(full),
            _MAX_COPY_BYTES,
        )
        continue
      if os.path.islink(full) and not _link_allowed(full, root):
        _log.warning(
            "not copied: %s links to %s, outside %s",
            full,
            os.path.realpath(full),
            src,
        )
        continue
      os.makedirs(os.path.join(dst, rel), exist_ok=True)
      target = os.path.join(dst, rel, name)
      if not rel and name == "config.json" and dtype is not None:
        if _write_config(full, target, dtype):
          continue
      shutil.copyfile(full, target)


def _read_config(full: str) -> Any:
  """``config.json``'s content; ``ValueError`` naming it when it is not
  JSON (its dtype cannot be updated)."""
  try:
    with open(full, encoding="utf-8") as f:
      return json.load(f)
  except (ValueError, RecursionError) as e:
    raise ValueError(
        f"{full}: not valid JSON ({type(e).__name__}: {e}), so the output "
        "dtype cannot be recorded in it; fix it or leave out the dtype"
    ) from None


def _write_config(full: str, target: str, dtype: Any) -> bool:
  cfg = _read_config(full)
  if not isinstance(cfg, dict):
    return False
  for k in ("torch_dtype", "dtype"):
    if k in cfg:
      cfg[k] = np.dtype(dtype).name
  with open(target, "w", encoding="utf-8") as f:
    json.dump(cfg, f, indent=2)
    f.write("\n")
  return True


def merge_checkpoints(
    pretrained: Model | PathLike,
    finetuned: Sequence[Model | PathLike],
    plan: Plan,
    out: PathLike,
    *,
    subdirs: Sequence[str] | None = None,
    output_format: str = "safetensors",
    shard_size: int | str = "2GB",
    overwrite: bool = False,
    metadata: Mapping[str, Any] | None = None,
    copy_files: bool = True,
    verify: bool = True,
    **kwargs: Any,
) -> list[str]:
  """Merges checkpoints on disk; writes one checkpoint per scale.

  Everything is written into a staging folder beside ``out`` (see
  :mod:`mtx.io.atomic`) that is renamed to ``out`` once complete, so a
  failure leaves nothing behind, an existing ``out`` is replaced only by a
  complete result, and what an interrupted (killed) run leaves is removed by
  the next run with the same ``out``.

  Args:
    pretrained: θ0 (path or :class:`Model`).
    finetuned: the fine-tuned models.
    plan: as for :func:`merge_tensors`; output ``s`` uses each spec's
      ``scales[s]``.
    out: the output path.
    subdirs: one folder name per scale (a sweep: ``out/<subdirs[s]>``);
      None writes the single output (one scale) to ``out`` itself.
    output_format: ``"safetensors"`` (sharded, streamed to disk:
      ``model-0000k-of-0000N.safetensors`` + ``model.safetensors.index.json``,
      plus the pretrained folder's config/tokenizer files) or ``"orbax"``
      (:func:`mtx.checkpoint.save`; the merged model is assembled in memory,
      sharded when merging on a mesh).
    shard_size: bytes per safetensors shard (e.g. ``"2GB"``).
    overwrite: replace an existing ``out`` (only once the new one is
      complete). Without it an existing ``out`` is an error, raised before
      any work.
    metadata: recorded with each output (JSON-serialisable; for safetensors
      stored under ``__metadata__`` as strings, with ``format: pt``).
    copy_files: make each output a working copy of the pretrained folder
      (safetensors; see :func:`copy_side_files`).
    verify: check the inputs against the content hashes their metadata
      records (where it records any) before merging.
    **kwargs: passed to :func:`merge_tensors` (``key``, ``include``,
      ``exclude``, ``check_finite``, ``dtype``, ``mesh``, ``shard_rules``,
      ``progress``).

  Returns:
    The output paths, one per scale.

  Raises:
    FileExistsError: ``out`` exists and not ``overwrite``.
    ValueError: see :func:`merge_tensors`; an output that overlaps an input
      (the same real path, or one inside the other); an input whose data
      does not match its recorded hash.
  """
  out = os.path.abspath(os.fspath(out))
  if output_format not in ("safetensors", "orbax"):
    raise ValueError(
        f"output_format must be 'safetensors' or 'orbax', got "
        f"{output_format!r}"
    )
  sources = [pretrained, *finetuned]
  atomic.check_disjoint(
      out, [m.path if isinstance(m, Model) else m for m in sources]
  )
  if atomic.occupied(out) and not overwrite:
    raise FileExistsError(
        f"{out} exists; pass overwrite=True (--overwrite) to replace it"
    )
  shard_size = st.parse_size(shard_size)
  atomic.reclaim(out)  # what killed runs left, before any work
  if subdirs is not None:
    subdirs = list(subdirs)
    if len(set(subdirs)) != len(subdirs) or not all(
        d and os.path.basename(d) == d and d not in (".", "..") for d in subdirs
    ):
      raise ValueError(f"subdirs must be distinct folder names: {subdirs}")
  pre = open_model(pretrained, verify=verify)
  fts = [open_model(f, verify=verify) for f in finetuned]
  side = copy_files and output_format == "safetensors"
  if side and pre.format == "safetensors" and kwargs.get("dtype"):
    base = pre.path if os.path.isdir(pre.path) else os.path.dirname(pre.path)
    if os.path.isfile(os.path.join(base, "config.json")):
      _read_config(os.path.join(base, "config.json"))  # before any work
  stream = merge_tensors(pre, fts, plan, **kwargs)  # checks, statistics
  num_out = len(subdirs) if subdirs is not None else 1
  first = next(stream, None)
  if first is not None and len(first[1]) != num_out:
    raise ValueError(
        f"the plan has {len(first[1])} scales but {num_out} output(s) were "
        "asked for (give one subdir per scale)"
    )
  created = _missing_ancestor(os.path.dirname(out))
  try:
    with atomic.stage(out, overwrite=overwrite) as staging:
      dirs = (
          [staging.path]
          if subdirs is None
          else [os.path.join(staging.path, d) for d in subdirs]
      )
      items = stream if first is None else itertools.chain([first], stream)
      _write(items, pre, dirs, output_format, shard_size, dict(metadata or {}))
      if copy_files and output_format == "safetensors":
        if pre.format == "safetensors":
          for d in dirs:
            copy_side_files(pre.path, d, kwargs.get("dtype"))
      staging.commit()
  except BaseException:
    if created is not None:
      shutil.rmtree(created, ignore_errors=True)
    raise
  if subdirs is None:
    return [out]
  return [os.path.join(out, d) for d in subdirs]


def _write(items, pre, dirs, output_format, shard_size, meta):
  if output_format == "safetensors":
    st_meta = {"format": "pt"}
    for k, v in meta.items():
      st_meta[k] = v if isinstance(v, str) else json.dumps(v)
    writers = [st.ShardedWriter(d, shard_size, st_meta) for d in dirs]
    try:
      for name, outs in items:
        for w, y in zip(writers, outs):
          w.add(name, y)
      for w in writers:
        w.commit()
    except BaseException:
      for w in writers:
        if not w._done:  # pylint: disable=protected-access
          w.abort()
      raise
    return
  from mtx import checkpoint  # pylint: disable=g-import-not-at-top

  leaves = [[] for _ in dirs]
  for _, outs in items:
    for acc, y in zip(leaves, outs):
      acc.append(y)
  for d, acc in zip(dirs, leaves):
    tree = mtree.unflatten(pre.treedef, acc)
    if os.path.isdir(d) and not os.listdir(d):
      os.rmdir(d)  # checkpoint.save creates it
    checkpoint.save(d, tree, metadata=meta)


def _missing_ancestor(path: str) -> str | None:
  """The highest ancestor of ``path`` (itself included) that does not exist
  (removed again if the merge fails)."""
  path = os.path.abspath(path)
  top = None
  while not os.path.exists(path):
    top = path
    parent = os.path.dirname(path)
    if parent == path:
      break
    path = parent
  return top


__all__ = ["copy_side_files", "merge_checkpoints"]
