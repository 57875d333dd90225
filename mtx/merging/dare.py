"""DARE: drop and rescale task-vector entries, then merge with any method.

Reference:
  Yu et al., "Language Models are Super Mario: Absorbing Abilities from
  Homologous Models as a Free Lunch", ICML 2024. https://arxiv.org/abs/2311.03099
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mtx.merging import _core
from mtx.merging import ties as _ties


def drop(
    tv: _core.Tasks, key: jax.Array, drop_rate: float, rescale: bool = True
) -> _core.Tasks:
  """Zeroes each entry with probability ``drop_rate`` (an independent mask
  per task, from ``fold_in(key, t)``), dividing survivors by
  ``1 − drop_rate`` when ``rescale``."""
  out = []
  for t, x in enumerate(tv):
    keep = jax.random.bernoulli(
        jax.random.fold_in(key, t), 1.0 - drop_rate, x.shape
    )
    y = jnp.where(keep, x, 0)
    out.append(y / (1.0 - drop_rate) if rescale else y)
  return tuple(out)


def _drop_leaf(static, tv, key, thr):
  drop_rate, rescale, mode = static[:3]
  if drop_rate == 0.0:
    return tv
  if mode == "random":
    return drop(tv, key, drop_rate, rescale)
  out = _ties.trim(tv, thr)
  return tuple(x / (1.0 - drop_rate) for x in out) if rescale else out


def _leaf(static, tv, ctx):
  base = static[3]
  g = ctx.glob
  thr = None if ctx.stats is None else ctx.stats.get("drop_thr")
  tv = _drop_leaf(static, tv, ctx.key, thr)
  inner = ctx._replace(
      glob=None if g is None else g.get("base"),
      stats=None if ctx.stats is None else ctx.stats.get("base"),
  )
  return base.leaf_fn(base.static, tv, inner)


def _transform(static, tv, key, thr):
  return _drop_leaf(static, tv, key, thr)


def _prepare(static, src: _core.Source, key):
  drop_rate, _, mode, base = static
  t = src.num_tasks
  per_leaf = [dict() for _ in range(len(src))]
  if mode == "magnitude" and drop_rate > 0:
    for i, n in enumerate(src.sizes):
      k = max(1, int(n * (1.0 - drop_rate)))
      per_leaf[i]["drop_thr"] = np.asarray(
          src.leaf_kth_largest(i, np.full((t,), k))
      )
  glob = {}
  if base.prepare_fn is not None:
    dropped = src.with_transform(
        _core.Transform(
            _transform,
            static[:3],
            key,
            tuple(d.get("drop_thr") for d in per_leaf),
        )
    )
    bstats = base.prepare_fn(base.static, dropped, key)
    glob["base"] = bstats.glob
    if bstats.leaf is not None:
      for d, b in zip(per_leaf, bstats.leaf):
        d["base"] = b
  return _core.Stats(glob, tuple(per_leaf))


def dare(
    drop_rate: float = 0.5,
    *,
    rescale: bool = True,
    then: str = "task_arithmetic",
    mode: str = "random",
    **then_hparams: Any,
) -> _core.Merger:
  """DARE followed by a base merge (``then``), e.g. DARE-TIES.

  Each task vector entry is dropped with probability ``drop_rate`` (mask drawn
  per task from ``key``, folded with the leaf index, so the same key gives the
  same result), survivors divided by ``1 − drop_rate``; then the base method
  ``then`` (any registry name, with ``then_hparams``) merges the result.
  ``mode="magnitude"`` drops the ``drop_rate`` fraction of smallest ``|τ|``
  per tensor instead (deterministic).

  Args:
    drop_rate: p in [0, 1).
    rescale: divide survivors by ``1 − p``.
    then: the base method (``"task_arithmetic"``, ``"ties"``, ...).
    mode: ``"random"`` (the paper) or ``"magnitude"``.
    **then_hparams: hyperparameters of the base method.

  A ``key`` is required at merge time.

  >>> import jax, jax.numpy as jnp, mtx
  >>> pre = {"w": jnp.zeros(1000)}
  >>> fts = [{"w": jnp.ones(1000)}]
  >>> out = mtx.merging.merge(pre, fts, "dare", drop_rate=0.9,
  ...                         key=jax.random.key(0))["w"]
  >>> sorted(set(out.tolist()))   # dropped entries are 0, survivors 1/(1-p)
  [0.0, 10.0]
  """
  from mtx import merging  # pylint: disable=g-import-not-at-top

  try:
    p = float(drop_rate)
  except (TypeError, ValueError):
    raise ValueError(f"drop_rate must be a number, got {drop_rate!r}") from None
  if not 0.0 <= p < 1.0:
    raise ValueError(f"drop_rate must be in [0, 1), got {drop_rate!r}")
  _core.check_choice("mode", mode, ("random", "magnitude"))
  if then == "dare":
    raise ValueError("then='dare' would drop twice")
  base = merging.get(then, **then_hparams)
  return _core.Merger(
      f"dare_{then}",
      (p, bool(rescale), mode, base),
      dict(base.coeffs),
      _leaf,
      _prepare,
      data=base.data,
      needs_key=mode == "random" and p > 0,
      needs_pretrained=base.needs_pretrained,
      per_task_scale=base.per_task_scale,
      min_tasks=base.min_tasks,
      max_tasks=base.max_tasks,
  )
