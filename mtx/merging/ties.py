"""TIES-Merging: trim, elect sign, disjoint merge.

Reference:
  Yadav et al., "TIES-Merging: Resolving Interference When Merging Models",
  NeurIPS 2023. https://arxiv.org/abs/2306.01708
"""

from __future__ import annotations

from collections.abc import Sequence
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mtx.merging import _checks
from mtx.merging import _protocol
from mtx.merging import _source

TOPK_RULES = ("paper", "reference")

# Per-task weights: importance weights, so non-negative and not all zero.
WEIGHTS = _checks.Coeff("per_task", lo=0.0, none_ok=True, nonzero_sum=True)


def num_kept(d: int, density: float, rule: str = "paper") -> int:
  """How many of ``d`` entries a top-``density`` trim keeps (before ties).

  ``"paper"`` keeps ``max(1, int(d·density))`` (the paper's "top k%", as
  MergeKit). ``"reference"`` reproduces the authors' code, which thresholds at
  ``kthvalue(|τ|, d − int(d·density))`` with ``>=`` and so keeps
  ``int(d·density) + 1`` entries (all ``d`` when ``density == 1``).

  >>> num_kept(1000, 0.2), num_kept(1000, 0.2, "reference")
  (200, 201)
  """
  m = int(d * density)
  if rule == "reference":
    return min(d, m + 1)
  return min(d, max(1, m))


def trim(tv: _protocol.Tasks, thresholds) -> _protocol.Tasks:
  """Zeroes entries with ``|τt| < thresholds[t]`` (one array per task)."""
  thr = _protocol.per_task(thresholds, len(tv))
  return tuple(
      jnp.where(jnp.abs(x) >= jnp.asarray(h, x.dtype), x, 0)
      for x, h in zip(tv, thr)
  )


def raw_sign(trimmed: _protocol.Tasks, method: str = "mass") -> jax.Array:
  """``sign(Σt τt)`` ("mass", the paper) or ``sign(Σt sign τt)`` ("count")."""
  if method == "mass":
    return jnp.sign(_protocol.tsum(trimmed))
  return jnp.sign(_protocol.tsum([jnp.sign(x) for x in trimmed]))


def elect_sign(
    trimmed: _protocol.Tasks, method: str = "mass", zero_sign=1.0
) -> jax.Array:
  """The elected sign γ; entries whose sum is 0 take ``zero_sign``.

  The reference sets ``zero_sign = sign(Σ γ)`` over the whole model (see
  :func:`ties`); MergeKit uses ``+1``.
  """
  g = raw_sign(trimmed, method)
  return jnp.where(g == 0, jnp.asarray(zero_sign, g.dtype), g)


def disjoint_merge(
    trimmed: _protocol.Tasks,
    sign: jax.Array,
    reduce: str = "mean",
    weights: jax.Array | None = None,
) -> jax.Array:
  """Combines the entries that agree with ``sign``; zeros never count.

  The kept entries are ``τ > 0`` where ``sign > 0`` and ``τ < 0`` elsewhere
  (as the reference, so a zero sign keeps negative entries).
  ``"mean"`` divides by ``max(count, 1)`` (with ``weights``, the entries are
  taken as already weighted and the divisor is the sum of the agreeing tasks'
  weights, 1 where none agree: MergeKit's normalisation); ``"sum"`` adds;
  ``"max"`` takes the largest magnitude with the elected sign.
  """
  pos = sign > 0
  keep = [jnp.where(pos, x > 0, x < 0) for x in trimmed]
  sel = [jnp.where(k, x, 0) for k, x in zip(keep, trimmed)]
  if reduce == "sum":
    return _protocol.tsum(sel)
  if reduce == "max":
    return functools.reduce(jnp.maximum, [jnp.abs(x) for x in sel]) * sign
  dt = trimmed[0].dtype
  if weights is not None:
    w = _protocol.per_task(weights, len(trimmed))
    den = _protocol.tsum(
        [k.astype(dt) * jnp.asarray(wt, dt) for k, wt in zip(keep, w)]
    )
    return _protocol.tsum(sel) / jnp.where(den == 0, 1, den)
  count = _protocol.tsum([k.astype(dt) for k in keep])
  return _protocol.tsum(sel) / jnp.maximum(count, 1)


class TiesHParams(NamedTuple):
  """Structural hyperparameters of :func:`ties` (see its Args)."""

  density: float | tuple[float, ...]
  sign: str
  reduce: str
  scope: str
  topk_rule: str
  zero_sign: str


def _densities(density, t: int) -> list[float]:
  """One density per task (a scalar is shared)."""
  if isinstance(density, tuple):
    if len(density) != t:
      raise ValueError(f"ties got {len(density)} densities for {t} models")
    return list(density)
  return [density] * t


def _trims(density) -> bool:
  return any(
      d < 1.0 for d in (density if isinstance(density, tuple) else (density,))
  )


def _thresholds(hp: TiesHParams, ctx):
  if not _trims(hp.density):
    return None
  return ctx.glob["thr"] if hp.scope == "global" else ctx.stats["thr"]


def _zero_sign(hp: TiesHParams, ctx):
  if hp.zero_sign == "positive":
    return 1.0
  if hp.scope == "global":
    return ctx.glob["majority"]
  return ctx.stats["majority"]


def _merged(hp: TiesHParams, tv, ctx):
  """TIES without the final scale."""
  thr = _thresholds(hp, ctx)
  trimmed = tv if thr is None else trim(tv, thr)
  weights = ctx.coeffs.get("weights") if ctx.coeffs else None
  if weights is not None:  # MergeKit: elect and merge the weighted vectors
    trimmed = _protocol.scale_tasks(weights, trimmed)
  sign = elect_sign(trimmed, hp.sign, _zero_sign(hp, ctx))
  return disjoint_merge(trimmed, sign, hp.reduce, weights)


def _leaf(hp: TiesHParams, tv, ctx):
  return _protocol.scalar_scale(ctx, "ties") * _merged(hp, tv, ctx)


def _raw_sign(method, tv, thr):
  return raw_sign(tv if thr is None else trim(tv, thr), method)


def prepare(hp: TiesHParams, src: _source.Source, key=None) -> _protocol.Stats:
  """Trim thresholds and the majority sign, over all leaves or per leaf."""
  del key
  density, scope, rule = hp.density, hp.scope, hp.topk_rule
  t = src.num_tasks
  densities = _densities(density, t)
  glob, per_leaf = {}, [dict() for _ in range(len(src))]
  if _trims(density):
    if scope == "global":
      n = sum(src.sizes)
      k = np.array([num_kept(n, d, rule) for d in densities])
      glob["thr"] = np.asarray(src.global_kth_largest(k))
    else:
      for i, n in enumerate(src.sizes):
        k = np.array([num_kept(n, d, rule) for d in densities])
        per_leaf[i]["thr"] = np.asarray(src.leaf_kth_largest(i, k))
  if hp.zero_sign == "majority":
    total = 0.0
    for i in range(len(src)):
      thr = (
          None
          if not _trims(density)
          else (glob["thr"] if scope == "global" else per_leaf[i]["thr"])
      )
      s = src.sum_of(_raw_sign, hp.sign, i, thr)
      total += s
      per_leaf[i]["majority"] = np.float32(np.sign(s))
    glob["majority"] = np.float32(np.sign(total))
  return _protocol.Stats(glob, tuple(per_leaf))


@_protocol.method()
def ties(
    density: float | Sequence[float] = 0.2,
    *,
    sign: str = "mass",
    reduce: str = "mean",
    scope: str = "global",
    topk_rule: str = "paper",
    zero_sign: str = "majority",
    weights: Sequence[float] | jax.Array | None = None,
) -> _protocol.Merger:
  """TIES-Merging: ``θ0 + scale · disjoint_merge(elect(trim(τ)))``.

  1. Trim: per task, keep the ``density`` fraction of largest ``|τt|``, over
     all included leaves at once (``scope="global"``, the paper's code) or
     within each leaf (``"per_leaf"``, as MergeKit). The threshold is found by
     selection; entries tied with it are all kept.
  2. Elect: ``γ = sign(Σt trimmed τt)`` (``sign="mass"``) or the sign of the
     count of positive minus negative entries (``"count"``). Where the sum is
     0, ``zero_sign="majority"`` (the reference) uses ``sign(Σ γ)`` over the
     scope, ``"positive"`` (MergeKit) uses +1.
  3. Disjoint merge of the entries whose sign agrees with γ: ``reduce="mean"``
     (the paper), ``"sum"`` (FusionBench's and AdaMerging's "TIES", usually with
     ``scale=0.3``) or ``"max"``.

  Args:
    density: fraction of entries kept per task, in (0, 1]; or one such
      fraction per task (MergeKit's per-model ``density``).
    sign: ``"mass"`` or ``"count"``.
    reduce: ``"mean"``, ``"sum"`` or ``"max"``.
    scope: ``"global"`` or ``"per_leaf"``.
    topk_rule: ``"paper"`` keeps ``int(d·density)`` entries; ``"reference"``
      reproduces the authors' ``kthvalue`` off-by-one (``int(d·density)+1``).
    zero_sign: ``"majority"`` or ``"positive"``.
    weights: optional ``[T]`` per-task weights ``wt`` (a traced coefficient:
      override per call with ``weights=...``), as MergeKit's per-model
      ``weight``: signs are elected from and the entries merged are the
      weighted ``wt·τt``, and ``reduce="mean"`` divides by the sum of the
      agreeing tasks' weights. The ``"majority"`` fallback sign is computed
      without weights. MergeKit's TIES is ``ties(density, scope="per_leaf",
      zero_sign="positive", weights=w)`` (``reduce="sum"`` when its
      ``normalize`` is false) with ``scale`` = its ``lambda``. Finite,
      non-negative, not all 0, one per model.

  Returns:
    A :class:`~mtx.merging.Merger`; ``scale`` (λ, default 1) is a scalar.

  Example:

  >>> import jax.numpy as jnp, mtx
  >>> pre = {"w": jnp.zeros(4)}
  >>> fts = [{"w": jnp.array([3.0, -1.0, 0.5, 2.0])},
  ...        {"w": jnp.array([1.0, 2.0, -0.4, -2.5])}]
  >>> mtx.merging.merge(pre, fts, "ties", density=0.5)["w"].tolist()
  [3.0, 2.0, 0.0, -2.5]
  """
  if isinstance(density, Sequence | np.ndarray) and not isinstance(
      density, str
  ):
    density = tuple(
        _protocol.check_fraction("density", d)
        for d in np.asarray(density).ravel()
    )
    if not density:
      raise ValueError("density must not be an empty list")
  else:
    density = _protocol.check_fraction("density", density)
  if weights is not None:
    _checks.coeff("ties", "weights", weights, WEIGHTS, None)
    weights = jnp.asarray(weights, jnp.float32)
  _protocol.check_choice("sign", sign, ("mass", "count"))
  _protocol.check_choice("reduce", reduce, ("mean", "sum", "max"))
  _protocol.check_choice("scope", scope, ("global", "per_leaf"))
  _protocol.check_choice("topk_rule", topk_rule, TOPK_RULES)
  _protocol.check_choice("zero_sign", zero_sign, ("majority", "positive"))
  hp = TiesHParams(density, sign, reduce, scope, topk_rule, zero_sign)
  needs_prepare = _trims(density) or zero_sign == "majority"
  return _protocol.Merger(
      "ties",
      hp,
      {"weights": weights},
      _leaf,
      prepare if needs_prepare else None,
      elementwise=True,
      coeff_specs={"weights": WEIGHTS},
  )
