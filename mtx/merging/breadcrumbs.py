"""Model Breadcrumbs: drop the outliers and the small entries, row by row.

Reference:
  Davari & Belilovsky, "Model Breadcrumbs: Scaling Multi-Task Model Merging
  with Sparse Masks", ECCV 2024. https://arxiv.org/abs/2312.06795
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp
import numpy as np

from mtx import _select
from mtx.merging import _protocol
from mtx.merging import _source


def row_counts(n: int, density: float, top_remove: float) -> tuple[int, int]:
  """``(removed, kept)`` per row of ``n``: ``int(n·top_remove)``, ``int(n·density)``."""
  return int(n * top_remove), int(n * density)


def mask(x: jnp.ndarray, thr: jnp.ndarray) -> jnp.ndarray:
  """Keeps ``thr[..., 1] <= |x| < thr[..., 0]`` per row (``thr`` from the
  row thresholds; ``+inf`` upper bound when nothing is removed)."""
  a = jnp.abs(x)
  return (a >= thr[..., 1:2]) & (a < thr[..., 0:1])


def _row_thresholds(x, n: int, removed: int, kept: int):
  """``[..., 2]``: the removal bound and the keep bound of each row."""
  hi_rank, lo_rank = max(removed, 1), removed + kept
  ks = (hi_rank, max(lo_rank, 1))
  thr = jnp.asarray(_select.row_kth_largest(x, ks), x.dtype)
  hi = thr[..., 0] if removed > 0 else jnp.full_like(thr[..., 0], jnp.inf)
  if kept == 0:
    lo = jnp.full_like(thr[..., 1], jnp.inf)  # keeps nothing
  else:  # (a rank past the row's end selects its minimum: keep the rest)
    lo = thr[..., 1]
  return jnp.stack([hi, lo], axis=-1)


def _tensor_thresholds(src: _source.Source, i: int, removed: int, kept: int):
  """Per task ``[2]``: the bounds of leaf ``i`` as a whole (``axis=None``)."""
  t = src.num_tasks
  ks = np.tile([max(removed, 1), max(removed + kept, 1)], (t, 1))
  thr = np.asarray(src.leaf_kth_largest(i, ks), np.float64)
  out = []
  for j in range(t):
    hi = thr[j, 0] if removed > 0 else np.inf
    lo = np.inf if kept == 0 else thr[j, 1]
    out.append(np.asarray([hi, lo], np.float32))
  return tuple(out)


class BreadcrumbsHParams(NamedTuple):
  """Structural hyperparameters of :func:`breadcrumbs`."""

  density: float
  top_remove: float
  axis: int | None


def _prepare(hp: BreadcrumbsHParams, src: _source.Source, key=None):
  del key
  density, top_remove, axis = hp.density, hp.top_remove, hp.axis
  per_leaf = []
  for i, shape in enumerate(src.shapes):
    if len(shape) == 0 or src.sizes[i] == 0:  # nothing to mask
      per_leaf.append(None)
      continue
    if axis is None:
      n = int(np.prod(shape))
      removed, kept = row_counts(n, density, top_remove)
      per_leaf.append(_tensor_thresholds(src, i, removed, kept))
      continue
    n = shape[-1]
    removed, kept = row_counts(n, density, top_remove)
    per_leaf.append(
        tuple(
            _row_thresholds(x, n, removed, kept)
            for x in src.task_values(i)  # one task at a time if large
        )
    )
  return _protocol.Stats(None, tuple(per_leaf))


def _leaf(static, tv, ctx):
  del static
  if ctx.stats is not None:
    tv = tuple(jnp.where(mask(x, m), x, 0) for x, m in zip(tv, ctx.stats))
  return _protocol.tsum(_protocol.scale_tasks(ctx.scale, tv))


@_protocol.method()
def breadcrumbs(
    density: float = 0.1, top_remove: float = 0.01, *, axis: int | None = -1
) -> _protocol.Merger:
  """Breadcrumbs: ``θ0 + scale · Σt mask_t ⊙ τt``.

  Per task, per row along the last axis (a 1-D tensor is one row; scalars are
  kept whole), drop the ``int(n·top_remove)`` largest ``|τ|`` and keep the next
  ``int(n·density)`` (the authors' per-row rule). ``axis=None`` applies the
  rule to each tensor as a whole (MergeKit's ``breadcrumbs``, with its
  ``gamma`` as ``top_remove``). Entries tied with a threshold are treated
  alike (the authors' ``topk`` breaks ties arbitrarily).

  Args:
    density: fraction of each row kept (the paper's β), in (0, 1].
    top_remove: fraction of each row removed from the top (γ), in [0, 1).
    axis: ``-1`` (rows along the last axis) or None (whole tensors).

  ``scale`` (α) may be a scalar or a ``[T]`` vector.

  >>> import jax.numpy as jnp, mtx
  >>> pre = {"w": jnp.zeros((1, 10))}
  >>> fts = [{"w": jnp.arange(1.0, 11.0)[None]}]
  >>> mtx.merging.merge(pre, fts, "breadcrumbs", density=0.3,
  ...                   top_remove=0.1)["w"].tolist()
  [[0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 7.0, 8.0, 9.0, 0.0]]
  """
  density = _protocol.check_fraction("density", density)
  top_remove = _protocol.check_fraction(
      "top_remove", top_remove, allow_zero=True
  )
  if top_remove >= 1.0:
    raise ValueError(f"top_remove must be < 1, got {top_remove}")
  if axis not in (-1, None):
    raise ValueError(f"axis must be -1 or None, got {axis!r}")
  return _protocol.Merger(
      "breadcrumbs",
      BreadcrumbsHParams(density, top_remove, axis),
      {},
      _leaf,
      _prepare,
      per_task_scale=True,
  )
