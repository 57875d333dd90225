"""DARE: drop and rescale task-vector entries, then merge with any method.

Reference:
  Yu et al., "Language Models are Super Mario: Absorbing Abilities from
  Homologous Models as a Free Lunch", ICML 2024. https://arxiv.org/abs/2311.03099
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mtx.merging import _core
from mtx.merging import ties as _ties


def _rates(drop_rate, t: int) -> list[float]:
  if isinstance(drop_rate, tuple):
    if len(drop_rate) != t:
      raise ValueError(f"dare got {len(drop_rate)} drop rates for {t} models")
    return list(drop_rate)
  return [drop_rate] * t


def _rescaled(x, y, p: float, rescale):
  """``y`` (``x`` with entries dropped at rate ``p``) rescaled."""
  if rescale == "l1":  # MergeKit: match the L1 norm of the dense tensor
    before, after = jnp.sum(jnp.abs(x)), jnp.sum(jnp.abs(y))
    tiny = (before < 1e-7) | (after < 1e-7)
    return jnp.where(tiny, y, y * (before / jnp.where(tiny, 1, after)))
  return y / (1.0 - p) if rescale else y


def drop(
    tv: _core.Tasks,
    key: jax.Array,
    drop_rate: float | tuple[float, ...],
    rescale: bool | str = True,
) -> _core.Tasks:
  """Zeroes each entry with probability ``drop_rate`` (an independent mask
  per task, from ``fold_in(key, t)``; a tuple gives each task its rate),
  dividing survivors by ``1 − drop_rate`` when ``rescale`` (``"l1"``:
  scaling them so the tensor keeps its L1 norm, as MergeKit)."""
  out = []
  for t, (x, p) in enumerate(zip(tv, _rates(drop_rate, len(tv)))):
    if p == 0.0:
      out.append(x)
      continue
    keep = jax.random.bernoulli(jax.random.fold_in(key, t), 1.0 - p, x.shape)
    out.append(_rescaled(x, jnp.where(keep, x, 0), p, rescale))
  return tuple(out)


def _drop_leaf(static, tv, key, thr):
  drop_rate, rescale, mode = static[:3]
  rates = _rates(drop_rate, len(tv))
  if all(p == 0.0 for p in rates):
    return tv
  if mode == "random":
    return drop(tv, key, drop_rate, rescale)
  out = _ties.trim(tv, thr)
  return tuple(
      _rescaled(x, y, p, rescale) if p > 0 else x
      for x, y, p in zip(tv, out, rates)
  )


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
  rates = _rates(drop_rate, t)
  if mode == "magnitude" and any(p > 0 for p in rates):
    for i, n in enumerate(src.sizes):
      k = np.array([max(1, int(n * (1.0 - p))) for p in rates])
      per_leaf[i]["drop_thr"] = np.asarray(src.leaf_kth_largest(i, k))
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
    drop_rate: float | Sequence[float] = 0.5,
    *,
    rescale: bool | str = True,
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
    drop_rate: p in [0, 1), or one p per task (MergeKit's per-model
      ``density`` is ``1 − p``).
    rescale: divide survivors by ``1 − p``; ``"l1"`` instead scales each
      task's surviving entries of a tensor so that its L1 norm is unchanged
      (MergeKit's ``rescale``); False keeps them as they are.
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

  many = isinstance(drop_rate, Sequence | np.ndarray) and not isinstance(
      drop_rate, str
  )
  rates = []
  for r in np.asarray(drop_rate, object).ravel() if many else [drop_rate]:
    try:
      p = float(r)
    except (TypeError, ValueError):
      raise ValueError(f"drop_rate must be a number, got {r!r}") from None
    if not 0.0 <= p < 1.0:
      raise ValueError(f"drop_rate must be in [0, 1), got {r!r}")
    rates.append(p)
  if many and not rates:
    raise ValueError("drop_rate must not be an empty list")
  p = tuple(rates) if many else rates[0]
  if rescale not in (True, False, "l1"):
    raise ValueError(f"rescale must be True, False or 'l1', got {rescale!r}")
  _core.check_choice("mode", mode, ("random", "magnitude"))
  if then == "dare":
    raise ValueError("then='dare' would drop twice")
  base = merging.get(then, **then_hparams)
  random = any(r > 0 for r in rates)
  return _core.Merger(
      "dare",
      (p, rescale if rescale == "l1" else bool(rescale), mode, base),
      dict(base.coeffs),
      _leaf,
      _prepare,
      data=base.data,
      needs_key=mode == "random" and random,
      needs_pretrained=base.needs_pretrained,
      per_task_scale=base.per_task_scale,
      min_tasks=base.min_tasks,
      max_tasks=base.max_tasks,
      coeff_specs=base.coeff_specs,
      data_check=base.data_check,
  )
