"""Models on disk, opened lazily, and their compatibility.

:func:`open_model` memory-maps a safetensors checkpoint (a file, a folder,
a sharded folder) or restores an orbax checkpoint written by
:func:`mtx.checkpoint.save`, checking it against the content hashes its
metadata records. :func:`check_compatible` compares the fine-tuned models
with the pretrained one; :func:`passthrough` decides what happens to tensors
that are not floating point (they cannot be merged).

Tensor names: a safetensors checkpoint is a flat dict ``{tensor name:
array}``; an orbax checkpoint keeps its nested tree (leaf paths ``/``-joined,
e.g. ``encoder/layers_0/kernel``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import os
from typing import Any

import numpy as np

from mtx import tree as mtree
from mtx.io import safetensors as st

PathLike = str | os.PathLike


class Model:
  """A model on disk, opened lazily.

  Attributes:
    path: what was opened.
    format: ``"safetensors"`` or ``"orbax"``.
    tree: the params: a flat ``{name: array}`` dict of lazily read tensors
      (safetensors) or the restored tree (orbax).
    paths: leaf paths in flattening order.
    leaves: the leaves, in the same order.
    metadata: the checkpoint's metadata.
  """

  def __init__(self, path: str, fmt: str, tree: Any, metadata: Mapping):
    self.path = path
    self.format = fmt
    self.tree = tree
    self.paths, self.leaves, self.treedef = mtree.flatten(tree)
    self.metadata = dict(metadata)
    # Checked against recorded content hashes: every tensor (verified), some
    # as they are read whole (verifying).
    self.verified = False
    self.verifying = False
    self._ckpt: st.Checkpoint | None = None

  def where(self, name: str) -> str:
    """The file holding tensor ``name`` (for messages)."""
    if self._ckpt is not None and name in self._ckpt:
      return self._ckpt.info(name).file
    return self.path

  def release(self, i: int) -> None:
    """Releases what the reader holds of leaf ``i`` (safetensors)."""
    if self._ckpt is not None:
      self._ckpt.release(self.paths[i])

  def release_all(self) -> None:
    if self._ckpt is not None:
      self._ckpt.release()

  @property
  def nbytes(self) -> int:
    return sum(nbytes(x) for x in self.leaves)

  def __repr__(self) -> str:
    return f"Model({self.path!r}, {self.format}, {len(self.leaves)} tensors)"


def nbytes(x) -> int:
  return int(np.prod(np.shape(x), dtype=np.int64)) * mtree.dtype_of(x).itemsize


def _is_safetensors(path: str) -> bool:
  if os.path.isfile(path):
    return True
  try:
    st.resolve(path)
  except FileNotFoundError:
    return False
  return True


def open_model(path: PathLike, *, verify: bool = True) -> Model:
  """Opens a safetensors checkpoint (file, folder, sharded folder) lazily or
  restores an orbax checkpoint written by :func:`mtx.checkpoint.save`.

  The leaves of a safetensors model are lazy tensors
  (:class:`mtx.io.safetensors.LazyTensor`)
  that read nothing until a tensor, or a row range of it, is asked for.

  Args:
    path: the checkpoint (a :class:`Model` is returned as is).
    verify: check the data against the content hashes the checkpoint's
      metadata records, if it records any: each safetensors tensor when it
      is read whole (the streaming merge reads every tensor whole at least
      once when verifying, see :mod:`mtx.io.engine`), an orbax checkpoint
      as it is restored.

  Raises:
    FileNotFoundError: nothing at ``path``, or a folder with neither format.
    ValueError: a corrupt checkpoint, or (``verify``) data that does not
      match its recorded hash (file and tensor named).
  """
  if isinstance(path, Model):
    return path
  path = os.fspath(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f"no such checkpoint: {path}")
  if _is_safetensors(path):
    ckpt = st.open_checkpoint(path, verify=verify)
    tree = {name: ckpt.lazy(name) for name in ckpt}
    model = Model(path, "safetensors", tree, ckpt.metadata)
    model._ckpt = ckpt  # pylint: disable=protected-access
    hashes = getattr(ckpt, "hashes", {})
    model.verifying = verify and bool(hashes)
    model.verified = model.verifying and all(n in hashes for n in ckpt)
    return model
  from mtx import checkpoint  # pylint: disable=g-import-not-at-top

  if checkpoint.is_checkpoint(path):
    model = Model(
        path,
        "orbax",
        checkpoint.restore(path, verify=verify),
        checkpoint.read_metadata(path, verify=verify),
    )
    model.verified = verify and checkpoint.HASH_KEY in model.metadata
    return model
  raise FileNotFoundError(
      f"{path} is neither a safetensors checkpoint ({st.SINGLE_NAME}, "
      f"{st.INDEX_NAME} or *.safetensors) nor an mtx/orbax checkpoint"
  )


def check_compatible(pretrained: Model, finetuned: Sequence[Model]) -> None:
  """Raises ``ValueError`` naming the file and tensor where a fine-tuned
  model's tensor set, a shape or a dtype differs from the pretrained one."""
  pre = dict(zip(pretrained.paths, pretrained.leaves))
  for ft in finetuned:
    names = set(ft.paths)
    for name in pretrained.paths:
      if name not in names:
        raise ValueError(
            f"{ft.path}: tensor {name!r} of the pretrained model "
            f"{pretrained.where(name)} is missing"
        )
    for name, x in zip(ft.paths, ft.leaves):
      if name not in pre:
        raise ValueError(
            f"{ft.where(name)}: tensor {name!r} is not in the pretrained "
            f"model {pretrained.path}"
        )
      y = pre[name]
      if np.shape(x) != np.shape(y):
        raise ValueError(
            f"{ft.where(name)}: tensor {name!r} has shape "
            f"{tuple(np.shape(x))} but the pretrained model's "
            f"({pretrained.where(name)}) is {tuple(np.shape(y))}"
        )
      if mtree.dtype_of(x) != mtree.dtype_of(y):
        raise ValueError(
            f"{ft.where(name)}: tensor {name!r} has dtype "
            f"{mtree.dtype_of(x)} but the pretrained model's "
            f"({pretrained.where(name)}) is {mtree.dtype_of(y)}"
        )
    if ft.treedef != pretrained.treedef:
      raise ValueError(
          f"{ft.path}: tree structure differs from the pretrained model "
          f"{pretrained.path}"
      )


def finite(x) -> bool:
  """Whether array ``x`` holds no NaN or Inf."""
  a = np.asarray(x).reshape(-1)
  if a.dtype not in (np.float32, np.float64):
    a = a.astype(np.float32)
  # A NaN/Inf makes the sum of squares non-finite (one BLAS pass); only then
  # (or on overflow) look entry by entry.
  return bool(np.isfinite(np.dot(a, a)) or np.isfinite(a).all())


def passthrough(models: Sequence[Model], i: int) -> bool:
  """For a leaf ``i`` that is not floating point (integer or bool buffers
  such as BERT's ``embeddings.position_ids``): True when it is identical in
  every model (it passes through from the pretrained model).

  Raises:
    ValueError: it differs between models (the file and tensor named).
  """
  pre = models[0]
  name = pre.paths[i]
  x = np.asarray(pre.leaves[i])
  for m in models[1:]:
    if not np.array_equal(np.asarray(m.leaves[i]), x):
      raise ValueError(
          f"{m.where(name)}: tensor {name!r} ({mtree.dtype_of(x)}) is not "
          "floating point and differs from the pretrained model's "
          f"({pre.where(name)}), so it cannot be merged; leave it out with "
          "--exclude (exclude= in Python)"
      )
  return True


__all__ = [
    "Model",
    "check_compatible",
    "finite",
    "nbytes",
    "open_model",
    "passthrough",
]
