"""DARE: drop and rescale task-vector entries, then merge with any method.

Reference:
  Yu et al., "Language Models are Super Mario: Absorbing Abilities from
  Homologous Models as a Free Lunch", ICML 2024. https://arxiv.org/abs/2311.03099
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mtx.merging import _protocol
from mtx.merging import _source
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
    tv: _protocol.Tasks,
    key: jax.Array,
    drop_rate: float | tuple[float, ...],
    rescale: bool | str = True,
) -> _protocol.Tasks:
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


class DropHParams(NamedTuple):
  """How DARE drops entries (the static part of its :class:`Transform`)."""

  drop_rate: float | tuple[float, ...]
  rescale: bool | str
  mode: str


class DareHParams(NamedTuple):
  """Structural hyperparameters of :func:`dare`: the drop and the base."""

  drop_rate: float | tuple[float, ...]
  rescale: bool | str
  mode: str
  base: _protocol.Merger

  def drop(self) -> DropHParams:
    return DropHParams(self.drop_rate, self.rescale, self.mode)


def _drop_leaf(hp: DropHParams | DareHParams, tv, key, thr):
  rates = _rates(hp.drop_rate, len(tv))
  if all(p == 0.0 for p in rates):
    return tv
  if hp.mode == "random":
    return drop(tv, key, hp.drop_rate, hp.rescale)
  out = _ties.trim(tv, thr)
  return tuple(
      _rescaled(x, y, p, hp.rescale) if p > 0 else x
      for x, y, p in zip(tv, out, rates)
  )


def _leaf(hp: DareHParams, tv, ctx):
  base = hp.base
  g = ctx.glob
  thr = None if ctx.stats is None else ctx.stats.get("drop_thr")
  tv = _drop_leaf(hp, tv, ctx.key, thr)
  inner = ctx._replace(
      glob=None if g is None else g.get("base"),
      stats=None if ctx.stats is None else ctx.stats.get("base"),
  )
  return base.leaf_fn(base.static, tv, inner)


def _transform(hp: DropHParams, tv, key, thr):
  return _drop_leaf(hp, tv, key, thr)


def _prepare(hp: DareHParams, src: _source.Source, key):
  base = hp.base
  t = src.num_tasks
  per_leaf = [dict() for _ in range(len(src))]
  rates = _rates(hp.drop_rate, t)
  if hp.mode == "magnitude" and any(p > 0 for p in rates):
    for i, n in enumerate(src.sizes):
      k = np.array([max(1, int(n * (1.0 - p))) for p in rates])
      per_leaf[i]["drop_thr"] = np.asarray(src.leaf_kth_largest(i, k))
  glob = {}
  if base.prepare_fn is not None:
    dropped = src.with_transform(
        _source.Transform(
            _transform,
            hp.drop(),
            key,
            tuple(d.get("drop_thr") for d in per_leaf),
        )
    )
    bstats = base.prepare_fn(base.static, dropped, key)
    glob["base"] = bstats.glob
    if bstats.leaf is not None:
      for d, b in zip(per_leaf, bstats.leaf):
        d["base"] = b
  return _protocol.Stats(glob, tuple(per_leaf))


@_protocol.method(wraps="then")
def dare(
    drop_rate: float | Sequence[float] = 0.5,
    *,
    rescale: bool | str = True,
    then: str | _protocol.Merger = "task_arithmetic",
    mode: str = "random",
    **then_hparams: Any,
) -> _protocol.Merger:
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
    then: the base method: a registry name (``"task_arithmetic"``,
      ``"ties"``, ...; :func:`mtx.merging.get` builds it with
      ``then_hparams``) or a built :class:`~mtx.merging.Merger`.
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
  _protocol.check_choice("mode", mode, ("random", "magnitude"))
  base = _protocol.built_base("dare", "then", then, then_hparams)
  if base.name == "dare":
    raise ValueError("then='dare' would drop twice")
  random = any(r > 0 for r in rates)
  return _protocol.Merger(
      "dare",
      DareHParams(p, rescale if rescale == "l1" else bool(rescale), mode, base),
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
