"""The streaming merge engine: checks, statistics, then tensor by tensor.

:func:`merge_tensors` merges models opened by :func:`mtx.io.models.open_model`
one tensor at a time with the very kernels of :func:`mtx.merging.merge`
(through :func:`mtx.merging.prepare_leaves`), so the output equals the
in-memory merge while memory holds a few tensors times ``T`` rather than
``T + 1`` models. Tensors larger than ``2 ×`` :data:`PART_ENTRIES` entries
are read in row ranges wherever the result cannot depend on it (top-k
statistics; the merge itself for elementwise methods such as task
arithmetic and TIES); other methods (Model Stock, SLERP, TSV-M, DARE, ...)
hold whole tensors of the ``T + 1`` models, about ``(T + 2) ×`` the largest
tensor:

1. checks: the fine-tuned models have the pretrained model's tensor names,
   shapes and dtypes; the selected tensors are finite (one pass over the
   data); selected tensors that are not floating point pass through from
   the pretrained model when identical in every model (logged), and are an
   error otherwise;
2. statistics: methods with global statistics (TIES/TALL/PCB/ComPEFT
   thresholds, the majority sign) read the task vectors ``θt − θ0`` leaf by
   leaf, computed on the fly from the files;
3. merge: each tensor is merged, cast, handed to the caller (the writer) and
   its pages released before the next.

:func:`load_sharded` and :func:`merge_on_mesh` place whole models on a
device mesh instead (layouts from :func:`mtx.sharding.shardings_for`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
import dataclasses
import logging
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mtx import _select
from mtx import merging
from mtx import sharding as sharding_lib
from mtx import tree as mtree
from mtx.io import safetensors as st
from mtx.io.models import Model
from mtx.io.models import check_compatible
from mtx.io.models import finite
from mtx.io.models import nbytes
from mtx.io.models import open_model
from mtx.io.models import passthrough
from mtx.io.models import PathLike
from mtx.io.plan import groups as plan_groups
from mtx.io.plan import Plan

P = jax.sharding.PartitionSpec
_log = logging.getLogger(__name__)


def _put(x, sharding) -> jax.Array:
  """A host array placed with ``sharding``, each device taking its slice of
  ``x`` (a safetensors tensor is read whole once, then sliced)."""
  a = x if isinstance(x, np.ndarray) else np.asarray(x)
  return jax.make_array_from_callback(
      np.shape(a), sharding, lambda idx: np.asarray(a[idx])
  )


def load_sharded(
    model: Model | PathLike,
    mesh: jax.sharding.Mesh,
    rules: Sequence[tuple[str, P]] = (),
) -> Any:
  """A model's params placed on ``mesh`` (layouts from :func:`shardings_for`);
  each tensor is read once and each device takes its slice."""
  model = open_model(model)
  sh = sharding_lib.shardings_for(
      model.paths, [np.shape(x) for x in model.leaves], mesh, rules
  )
  leaves = []
  for i, (x, s) in enumerate(zip(model.leaves, sh)):
    leaves.append(_put(x, s))
    model.release(i)
  return mtree.unflatten(model.treedef, leaves)


def merge_on_mesh(
    pretrained: Model | PathLike,
    finetuned: Sequence[Model | PathLike],
    method: str | merging.Merger,
    mesh: jax.sharding.Mesh,
    *,
    rules: Sequence[tuple[str, P]] = (),
    **kwargs: Any,
) -> Any:
  """Loads the models sharded on ``mesh`` and merges them there in memory.

  The models are placed with :func:`load_sharded` (each device holds its
  slices of the ``T + 1`` models) and merged by :func:`mtx.merging.merge`,
  which keeps every leaf's sharding and gathers nothing. Use
  :func:`merge_tensors` (``mesh=``) to stream instead (one tensor of each
  model on the mesh at a time).

  Args:
    pretrained: θ0 (a path or :class:`Model`).
    finetuned: the fine-tuned models.
    method: a registry name or a built merger.
    mesh: the device mesh.
    rules: ``[(regex, PartitionSpec)]`` first-match layouts (default:
      :func:`default_spec`).
    **kwargs: ``mtx.merging.merge`` arguments (``scale``, ``key``,
      ``include``, hyperparameters...).

  Returns:
    The merged params, each leaf sharded like the pretrained one.
  """
  pre = open_model(pretrained)
  fts = [open_model(f) for f in finetuned]
  check_compatible(pre, fts)
  return merging.merge(
      load_sharded(pre, mesh, rules),
      [load_sharded(f, mesh, rules) for f in fts],
      method,
      **kwargs,
  )


@dataclasses.dataclass
class Progress:
  """What :func:`merge_tensors` reports after each tensor."""

  phase: str  # "check", "statistics" or "merge"
  done: int
  total: int
  bytes_done: int
  bytes_total: int
  elapsed: float

  @property
  def eta(self) -> float | None:
    if not self.bytes_done:
      return None
    return self.elapsed * (self.bytes_total - self.bytes_done) / self.bytes_done


def merge_tensors(
    pretrained: Model | PathLike,
    finetuned: Sequence[Model | PathLike],
    plan: Plan,
    *,
    key: jax.Array | None = None,
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    check_finite: bool = True,
    dtype: Any = None,
    mesh: jax.sharding.Mesh | None = None,
    shard_rules: Sequence[tuple[str, P]] = (),
    progress: Callable[[Progress], None] | None = None,
) -> Iterator[tuple[str, list[jax.Array]]]:
  """Merges models tensor by tensor; yields ``(name, outputs)`` in order.

  All checks and the statistics pass run when this is called (errors come
  before any output); the merged tensors are computed as the iterator is
  consumed, one at a time. Consume each before asking for the next (they
  share nothing, but holding them defeats the purpose).

  Args:
    pretrained: θ0 (a :class:`Model` or a path for :func:`open_model`).
    finetuned: the ``T`` fine-tuned models.
    plan: a :class:`Spec` for every selected tensor, or ``{name: Spec}``
      (tensors not named keep their pretrained value). Tensors with equal
      specs are merged together (a method's global statistics span them).
      Every spec must have the same number of scales ``S``.
    key: PRNG key for random methods; group ``g > 0`` of a multi-spec plan
      uses ``fold_in(key, g)``.
    include: path regex(es): only matching tensors are merged.
    exclude: path regex(es): matching tensors keep their pretrained value.
    check_finite: a first pass checks every selected tensor for NaN/Inf.
    dtype: cast every floating output tensor to this dtype.
    mesh: load each tensor sharded on this mesh and merge there.
    shard_rules: ``[(regex, PartitionSpec)]`` first-match layouts on
      ``mesh`` (default: :func:`default_spec`).
    progress: called with a :class:`Progress` after each tensor.

  Yields:
    ``(name, [S arrays])``: the tensor under each scale (jax arrays; with
    ``mesh``, sharded as loaded), in the pretrained model's flattening
    order. With a single spec and no mesh, output ``s`` is bitwise
    ``mtx.merging.merge(pre, fts, method, scale=scales[s], ...)``'s leaf.

  Raises:
    ValueError: mismatched models, a non-floating or non-finite selected
      tensor, an unknown method or hyperparameter (the file and tensor are
      named).
  """
  pre = open_model(pretrained)
  fts = [open_model(f) for f in finetuned]
  if not fts:
    raise ValueError("no fine-tuned models to merge")
  check_compatible(pre, fts)
  models = [pre, *fts]
  paths, t = pre.paths, len(fts)
  selected = jax.tree.leaves(mtree.select(pre.tree, include, exclude))
  specs, groups = plan_groups(paths, selected, plan)
  if not groups:
    raise ValueError(
        f"include={include!r} / exclude={exclude!r} select no tensor"
    )
  num_out = {len(s.scales) for s in specs}
  if len(num_out) != 1:
    raise ValueError("every spec of a plan needs the same number of scales")
  (num_out,) = num_out
  for s in specs:
    s.build()  # unknown methods/hparams: now, before reading any data
  # Tensors that are not floating point pass through when identical.
  kept = []
  for i in sorted(i for g in groups for i in g):
    if not mtree.is_floating(pre.leaves[i]) and passthrough(models, i):
      selected[i] = False
      kept.append(paths[i])
  if kept:
    _log.info(
        "%d tensor(s) that are not floating point and are identical in "
        "every model pass through from the pretrained model: %s",
        len(kept),
        ", ".join(kept),
    )
    specs, groups = plan_groups(paths, selected, plan)
    if not groups:
      raise ValueError(
          f"include={include!r} / exclude={exclude!r} select no floating "
          "point tensor"
      )
  mergers = [s.build() for s in specs]
  merged_idx = sorted(i for g in groups for i in g)
  total_bytes = sum(nbytes(x) for x in pre.leaves) * (t + 1)
  t0 = time.time()

  def report(phase, done, total, done_bytes):
    if progress is not None:
      progress(
          Progress(
              phase, done, total, done_bytes, total_bytes, time.time() - t0
          )
      )

  verifying = any(m.verifying for m in models)
  if check_finite or verifying:  # one whole read of each merged tensor
    done = 0
    for n, i in enumerate(merged_idx):
      for m in models:
        x = np.asarray(m.leaves[i])  # checked against its hash, if recorded
        if check_finite and not finite(x):
          raise ValueError(
              f"{m.where(paths[i])}: tensor {paths[i]!r} holds NaN or Inf "
              "(--nocheck_finite, check_finite=False in Python, skips "
              "this check)"
          )
        del x
        m.release(i)
        done += nbytes(m.leaves[i])
      report("check", n + 1, len(merged_idx), done)

  shardings = None
  if mesh is not None:
    shardings = sharding_lib.shardings_for(
        paths, [np.shape(x) for x in pre.leaves], mesh, shard_rules
    )
  raw = _Loader(models, shardings)
  host = mesh is None and all(
      _on_host(m.leaves[i]) for m in models for i in merged_idx
  )
  parts = {}
  if host and all(m.format == "safetensors" for m in models):
    for i in merged_idx:
      p = row_parts(np.shape(pre.leaves[i]))
      if p is not None:
        parts[i] = p
  leaf_fns = {}
  for g, (spec, merger, idx) in enumerate(zip(specs, mergers, groups)):
    gkey = key if (key is None or g == 0) else jax.random.fold_in(key, g)
    fn = merging.prepare_leaves(
        merger,
        pre.tree,
        t,
        raw,
        idx,
        host=host,
        scales=[spec.scale(s) for s in range(num_out)],
        key=gkey,
        parts=parts,
        rows=raw.rows,
        **spec.kwargs(),
    )
    for i in idx:
      leaf_fns[i] = fn
    report("statistics", g + 1, len(groups), 0)
  raw.release()
  return _emit(
      pre, models, raw, leaf_fns, num_out, dtype, shardings, report, t0
  )


# Leaves larger than twice this many entries are read in row ranges of about
# this many entries where the result cannot depend on it (see
# mtx.merging.prepare_leaves).
PART_ENTRIES = 1 << 22


def row_parts(shape: Sequence[int]) -> list[tuple[int, int]] | None:
  """Row ranges of the leading axis of about :data:`PART_ENTRIES` entries,
  or None for a leaf small enough to read whole.

  >>> row_parts((10, 1 << 21))
  [(0, 2), (2, 4), (4, 6), (6, 8), (8, 10)]
  """
  n = int(np.prod(shape, dtype=np.int64))
  if len(shape) == 0 or n <= 2 * PART_ENTRIES:
    return None
  per_row = n // shape[0]
  step = max(1, PART_ENTRIES // max(per_row, 1))
  if step >= shape[0]:
    return None
  return [(a, min(a + step, shape[0])) for a in range(0, shape[0], step)]


def _on_host(x) -> bool:
  return isinstance(x, st.LazyTensor) or _select.on_host(x)


def _libc():
  try:
    import ctypes  # pylint: disable=g-import-not-at-top

    return ctypes.CDLL("libc.so.6").malloc_trim
  except (OSError, AttributeError):
    return None


_MALLOC_TRIM = _libc()
_TRIM_BYTES = 16 << 20  # trim after releasing leaves at least this large


def _trim() -> None:
  """Returns freed heap memory to the OS (glibc keeps freed blocks of the
  many per-thread arenas XLA's threads allocate from, which would otherwise
  pile up to several tensors' worth of resident memory)."""
  if _MALLOC_TRIM is not None:
    _MALLOC_TRIM(0)


def _aligned(x) -> bool:
  """Whether jax can use a host array without copying it (64-byte aligned)."""
  return not isinstance(x, np.ndarray) or x.ctypes.data % 64 == 0


class _Loader:
  """``raw(i)`` for ``prepare_leaves``: leaf ``i`` of every model.

  On the host, a safetensors tensor (or row range) is read into a 64-byte
  aligned buffer, which jax uses without a copy; other unaligned host arrays
  are copied once into a jax array. Either is reused while the same leaf is
  asked for again (jax would copy an unaligned argument on every call), so a
  leaf costs one read however many kernels use it, and is released when
  another leaf is asked for. On a mesh, the leaf is loaded sharded (and
  cached alike).
  """

  def __init__(self, models: Sequence[Model], shardings):
    self.models = models
    self.shardings = shardings
    self._last = None
    self._cache = None

  def release(self) -> None:
    big = False
    if self._last is not None:
      i, part = self._last
      for m in self.models:
        m.release(i)
      x = self.models[0].leaves[i]
      big = nbytes(x) >= _TRIM_BYTES or part is not None
    self._last, self._cache = None, None
    if big:
      _trim()

  def __call__(self, i: int):
    return self._get(i, None)

  def rows(self, i: int, start: int, stop: int):
    """Rows ``[start, stop)`` of leaf ``i`` (host only)."""
    return self._get(i, (start, stop))

  def _get(self, i: int, part):
    if self._last is not None and self._last != (i, part):
      self.release()
    if self._cache is None:
      if self.shardings is None:
        arrays = [self._host(m, i, part) for m in self.models]
      else:
        sh = self.shardings[i]
        arrays = []
        for m in self.models:
          arrays.append(_put(m.leaves[i], sh).block_until_ready())
          m.release(i)
      self._cache = arrays[0], tuple(arrays[1:])
    self._last = (i, part)
    return self._cache

  @staticmethod
  def _host(m: Model, i: int, part):
    x = m.leaves[i] if part is None else m.leaves[i][part[0] : part[1]]
    x = np.asarray(x)  # a safetensors tensor is read (and verified) here
    if _aligned(x):
      return x
    y = jax.device_put(x).block_until_ready()  # copied: the pages can go
    m.release(i)
    return y


def _emit(pre, models, raw, leaf_fns, num_out, dtype, shardings, report, t0):
  del t0
  n = len(pre.paths)
  done_bytes = 0
  per_leaf_bytes = [sum(nbytes(m.leaves[i]) for m in models) for i in range(n)]
  for i, name in enumerate(pre.paths):
    fn = leaf_fns.get(i)
    if fn is None:
      x = pre.leaves[i]
      if shardings is not None:
        x = _put(x, shardings[i])
      elif isinstance(x, st.LazyTensor):
        x = np.asarray(x)  # read (and verified) now
      outs = [x] * num_out
    else:
      outs = [fn(i, s) for s in range(num_out)]
    if dtype is not None and mtree.is_floating(outs[0]):
      outs = [jnp.asarray(y).astype(dtype) for y in outs]
    yield name, outs
    del outs
    raw.release()
    for m in models:
      m.release(i)
    done_bytes += per_leaf_bytes[i]
    report("merge", i + 1, n, done_bytes)


__all__ = [
    "PART_ENTRIES",
    "Progress",
    "load_sharded",
    "merge_on_mesh",
    "merge_tensors",
    "row_parts",
]
