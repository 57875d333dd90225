"""The leaf-by-leaf merge driver: models in, model out.

:func:`merge_models` checks the inputs, then :func:`prepare_leaves` computes
the method's statistics (through a :class:`~mtx.merging.Source`) and returns
a function that merges one leaf on demand: ``leaf`` fused with the
task-vector subtraction and the final ``pretrained + merged`` in one jitted
kernel per leaf, so peak memory stays at the inputs plus the output plus one
leaf's temporaries. Streaming merges (``mtx.io``) call
:func:`prepare_leaves` directly with leaves loaded on demand.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
import functools
from typing import Any

import jax
import numpy as np

from mtx import _select
from mtx import tree as mtree
from mtx.merging import _checks
from mtx.merging import _protocol
from mtx.merging import _source

PyTree = Any


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _merge_leaf(leaf_fn, static, sharding, pre, fts, ctx):
  def body(pre, fts, ctx):
    tv = _source.tau(pre, fts)
    merged = leaf_fn(static, tv, ctx._replace(pre=pre))
    return (pre.astype(merged.dtype) + merged).astype(pre.dtype)

  if sharding is None:
    return body(pre, fts, ctx)
  mesh = getattr(sharding, "mesh", None)
  explicit = mesh is not None and any(
      t == jax.sharding.AxisType.Explicit for t in mesh.axis_types
  )
  if explicit:
    # Methods contract, sort or factorise within a leaf (SVD, Gram matrices);
    # let XLA choose those intermediate layouts, then pin the output to the
    # input's sharding.
    return jax.sharding.auto_axes(body, out_sharding=sharding)(pre, fts, ctx)
  return jax.lax.with_sharding_constraint(body(pre, fts, ctx), sharding)


def _sharding_of(x):
  """The sharding to give a merged leaf: the pretrained leaf's, if sharded."""
  s = getattr(x, "sharding", None)
  if s is None or isinstance(x, jax.core.Tracer):
    return None
  if len(s.device_set) <= 1:
    return None
  return s


def prepare_leaves(
    merger: _protocol.Merger,
    like: PyTree,
    num_tasks: int,
    raw: Callable[[int], tuple[Any, Sequence[Any]]],
    selected: Sequence[int],
    *,
    host: bool,
    scales: Sequence[Any] = (1.0,),
    key: jax.Array | None = None,
    parts: Mapping[int, Sequence[tuple[int, int]]] | None = None,
    rows: Callable[[int, int, int], tuple[Any, Sequence[Any]]] | None = None,
    **coeffs: Any,
) -> Callable[..., jax.Array]:
  """The leaf-by-leaf core of :func:`merge_models`, for streaming merges.

  Computes the method's statistics (reading the task vectors one leaf at a
  time through a :class:`Source` over ``raw``), then returns a function that
  merges one leaf on demand, so a caller can load, merge, write and free the
  leaves of a model larger than memory one at a time. ``merge_models`` is
  this plus the input checks, over the leaves of in-memory trees; the same
  inputs give bitwise the same leaves either way.

  Args:
    merger: the method.
    like: a tree with the params' structure whose leaves are arrays or
      ``jax.ShapeDtypeStruct`` (for paths, shapes and scale broadcasting);
      leaves are addressed by their index in its flattening order.
    num_tasks: ``T``.
    raw: ``raw(i) -> (pretrained leaf i, T fine-tuned leaves i)``; called
      once or more per selected leaf by the statistics passes and once per
      merged leaf. It may load leaves lazily (memory-mapped files, a
      per-leaf transfer to sharded device arrays).
    selected: the flat indices of the leaves to merge (floating, included),
      in flattening order; leaf ``selected[j]`` takes ``fold_in(key, j)``.
    host: every selected leaf lives in host memory (numpy selection); False
      for sharded or device arrays (jitted reductions).
    scales: the scales the merged leaves will be asked for (each as
      ``merge``'s ``scale``, validated here before any work).
    key: PRNG key for random methods.
    parts: optional row ranges ``{i: [(start, stop), ...]}`` of the leading
      axis of large host leaves, read with ``rows``: statistics that do not
      depend on how a leaf is cut read them part by part (see
      :class:`Source`), and :attr:`Merger.elementwise` methods merge them
      part by part into one numpy array, so memory holds a part of each
      model rather than the whole leaf. The result is the same.
    rows: ``rows(i, start, stop)`` -> ``raw(i)`` restricted to those rows.
    **coeffs: overrides of the method's continuous coefficients.

  Returns:
    ``merged(i, s=0)``: leaf ``i`` (one of ``selected``) merged with
    ``scales[s]``, in the pretrained leaf's dtype (and sharding).
  """
  merger._check_key(key)
  merger._check_num_tasks(num_tasks)
  coeffs = merger._coeffs(coeffs, num_tasks)
  paths, like_leaves, _ = mtree.flatten(like)
  for i in selected:
    _checks.leaf_dtype(paths[i], like_leaves[i])
  per_scale = [
      _protocol.broadcast_scale(s, like, merger, num_tasks) for s in scales
  ]
  data_paths = [paths[i] for i in selected]
  merger._check_data(
      {paths[i]: tuple(np.shape(like_leaves[i])) for i in selected}, num_tasks
  )
  position = {i: j for j, i in enumerate(selected)}
  parts = dict(parts or {}) if rows is not None and host else {}
  src = _source.Source(
      data_paths,
      [np.shape(like_leaves[i]) for i in selected],
      num_tasks,
      lambda j: raw(selected[j]),
      host,
      parts=[parts.get(i) for i in selected],
      rows=None if not parts else (lambda j, a, b: rows(selected[j], a, b)),
  )
  stats = merger._prepare(src, key)
  del src  # frees the selection buffer before the outputs are allocated

  def merged(i: int, s: int = 0) -> jax.Array:
    j = position[i]
    ctx = _protocol.Ctx(
        glob=stats.glob,
        stats=None if stats.leaf is None else stats.leaf[j],
        scale=per_scale[s][i],
        coeffs=coeffs,
        key=None if key is None else jax.random.fold_in(key, j),
        pre=None,
        data=merger._leaf_data(paths[i]),
        path=None,  # static strings stay out of the jitted kernel
    )
    if merger.elementwise and parts.get(i):
      out = np.empty(np.shape(like_leaves[i]), mtree.dtype_of(like_leaves[i]))
      for a, b in parts[i]:
        pre, fts = rows(i, a, b)
        out[a:b] = np.asarray(
            _merge_leaf(
                merger.leaf_fn, merger.static, None, pre, tuple(fts), ctx
            )
        )
      return out
    pre, fts = raw(i)
    return _merge_leaf(
        merger.leaf_fn,
        merger.static,
        _sharding_of(pre),
        pre,
        tuple(fts),
        ctx,
    )

  return merged


def merge_models(
    merger: _protocol.Merger,
    pretrained: PyTree,
    finetuned: Sequence[PyTree],
    *,
    scale: Any = 1.0,
    key: jax.Array | None = None,
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    check_finite: bool = True,
    **coeffs: Any,
) -> PyTree:
  """See :func:`mtx.merging.merge`."""
  if isinstance(finetuned, Mapping) or not isinstance(finetuned, Sequence):
    raise ValueError(
        "finetuned must be a list of fine-tuned param trees, got "
        f"{type(finetuned).__name__}"
    )
  finetuned = list(finetuned)
  if not finetuned:
    raise ValueError("no fine-tuned models to merge")
  merger._check_key(key)
  merger._check_num_tasks(len(finetuned))
  coeffs = merger._coeffs(coeffs, len(finetuned))
  for i, ft in enumerate(finetuned):
    mtree.assert_same_structure(
        pretrained, ft, names=("pretrained", f"finetuned[{i}]")
    )
  paths, pre_leaves, treedef = mtree.flatten(pretrained)
  ft_leaves = [mtree.flatten(ft)[1] for ft in finetuned]
  selected = jax.tree.leaves(mtree.select(pretrained, include, exclude))
  idx = [i for i, s in enumerate(selected) if s]
  if not idx:
    raise ValueError(
        f"include={include!r} / exclude={exclude!r} select no leaf"
    )
  for i in idx:
    _checks.leaf_dtype(paths[i], pre_leaves[i])
    for j, f in enumerate(ft_leaves):
      _checks.leaf_dtype(paths[i], f[i], f"finetuned[{j}]")
      if mtree.dtype_of(f[i]) != mtree.dtype_of(pre_leaves[i]):
        raise ValueError(
            f"dtype mismatch at {paths[i]!r}: pretrained "
            f"{mtree.dtype_of(pre_leaves[i])} vs finetuned[{j}] "
            f"{mtree.dtype_of(f[i])}"
        )
  if check_finite:
    for i in idx:
      for name, x in [("pretrained", pre_leaves[i])] + [
          (f"finetuned[{j}]", f[i]) for j, f in enumerate(ft_leaves)
      ]:
        if not _checks.finite_host_or_device(x):
          raise ValueError(
              f"{name} has NaN or Inf at {paths[i]!r} (pass "
              "check_finite=False to skip this check)"
          )
  host = all(
      _select.on_host(pre_leaves[i])
      and all(_select.on_host(f[i]) for f in ft_leaves)
      for i in idx
  )
  merged = prepare_leaves(
      merger,
      pretrained,
      len(finetuned),
      lambda i: (pre_leaves[i], tuple(f[i] for f in ft_leaves)),
      idx,
      host=host,
      scales=(scale,),
      key=key,
      **coeffs,
  )
  out = list(pre_leaves)
  for i in idx:
    out[i] = merged(i)
  return mtree.unflatten(treedef, out)
