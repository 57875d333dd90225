"""Geometric merges of whole tensors: Model Stock and SLERP.

References:
  Jang et al., "Model Stock: All we need is just a few fine-tuned models",
  ECCV 2024. https://arxiv.org/abs/2403.19522
  Shoemake, "Animating rotation with quaternion curves", SIGGRAPH 1985 (SLERP,
  as used for model merging by MergeKit).
"""

from __future__ import annotations

import jax.numpy as jnp

from mtx.merging import _core


def pairwise_cosines(tv, eps: float = 1e-6) -> jnp.ndarray:
  """``[P]`` cosines of the flattened task vectors of one leaf, for the
  pairs ``i < j`` in ``jnp.triu_indices(T, 1)`` order."""
  t = len(tv)
  # Each vector is divided by its largest magnitude m before the products,
  # so vectors of entries near 1e20 do not overflow: cos = u·v / (|u| |v|)
  # for the rescaled u, v where the true norms' product reaches eps, and the
  # true ``dot / eps`` below it.
  ms = [_max_abs(x) for x in tv]
  us = [x / jnp.where(m > 0, m, 1) for x, m in zip(tv, ms)]
  norms = [jnp.sqrt(_dot(u, u)) for u in us]
  cos = []
  for i in range(t):
    for j in range(i + 1, t):
      dot = _dot(us[i], us[j])
      big = (ms[i] * norms[i]) * (ms[j] * norms[j]) >= eps
      safe = jnp.where(big, norms[i] * norms[j], 1)
      cos.append(jnp.where(big, dot / safe, dot * ms[i] * ms[j] / eps))
  return jnp.clip(jnp.stack(cos), -1.0, 1.0)


def _dot(x, y):
  """``Σ x·y`` over all entries; no ``ravel``, so a sharded leaf is reduced
  in place (a reshape of a sharded array would gather it)."""
  return jnp.sum(x * y)


def _max_abs(x):
  return jnp.max(jnp.abs(x)) if x.size else jnp.zeros((), x.dtype)


def _norm(x):
  """``‖x‖₂`` without overflow for entries near the dtype's largest."""
  m = _max_abs(x)
  safe = jnp.where(m > 0, m, 1)
  return m * jnp.sqrt(_dot(x / safe, x / safe))


def stock_ratio(tv, average: str = "cosine") -> jnp.ndarray:
  """Model Stock's interpolation ratio ``t = k·cos / (1 + (k−1)·cos)``.

  ``cos`` is the mean pairwise cosine (``average="cosine"``, MergeKit) or the
  cosine of the mean pairwise angle (``"angle"``, FusionBench / the official
  notebook for ``k > 2``).
  """
  k = len(tv)
  pairs = pairwise_cosines(tv)
  if average == "angle":
    cos = jnp.cos(jnp.mean(jnp.arccos(pairs)))
  else:
    cos = jnp.mean(pairs)
  den = 1.0 + (k - 1) * cos
  return k * cos / jnp.where(den == 0, 1e-8, den)


def _stock_leaf(static, tv, ctx):
  (average,) = static
  t = stock_ratio(tv, average)
  return _core.scalar_scale(ctx, "model_stock") * t * _core.tmean(tv)


def model_stock(average: str = "cosine") -> _core.Merger:
  """Model Stock, per tensor: ``θ = t·mean(θi) + (1 − t)·θ0``.

  In task-vector form ``θ0 + scale · t · mean(τi)`` with ``t`` from
  :func:`stock_ratio`. Needs at least two fine-tuned models.

  Args:
    average: ``"cosine"`` (MergeKit; the default) or ``"angle"``
      (FusionBench). They agree for two models.

  >>> import jax.numpy as jnp, mtx
  >>> pre = {"w": jnp.zeros(2)}
  >>> fts = [{"w": jnp.array([1.0, 0.0])}, {"w": jnp.array([0.0, 1.0])}]
  >>> mtx.merging.merge(pre, fts, "model_stock")["w"].tolist()  # cos=0 -> t=0
  [0.0, 0.0]
  """
  _core.check_choice("average", average, ("cosine", "angle"))
  return _core.Merger("model_stock", (average,), {}, _stock_leaf, min_tasks=2)


DOT_THRESHOLD = 0.9995


def slerp_arrays(
    t: jnp.ndarray, v0: jnp.ndarray, v1: jnp.ndarray, eps: float = 1e-8
) -> jnp.ndarray:
  """Spherical interpolation of two tensors viewed as flat vectors.

  The direction is measured on the normalised tensors (a tensor with norm
  ``<= eps`` is not normalised); the weights apply to the unnormalised ones;
  when ``|cos| > 0.9995`` it falls back to linear interpolation (MergeKit).
  """
  n0 = _norm(v0)
  n1 = _norm(v1)
  u0 = jnp.where(n0 > eps, v0 / jnp.where(n0 > eps, n0, 1), v0)
  u1 = jnp.where(n1 > eps, v1 / jnp.where(n1 > eps, n1, 1), v1)
  dot = jnp.sum(u0 * u1)
  linear = jnp.abs(dot) > DOT_THRESHOLD
  theta = jnp.arccos(jnp.clip(jnp.where(linear, 0.0, dot), -1.0, 1.0))
  sin = jnp.sin(theta)
  safe = jnp.where(linear, 1.0, sin)
  s0 = jnp.where(linear, 1.0 - t, jnp.sin((1.0 - t) * theta) / safe)
  s1 = jnp.where(linear, t, jnp.sin(t * theta) / safe)
  return s0 * v0 + s1 * v1


def _slerp_leaf(static, tv, ctx):
  (space,) = static
  t = jnp.asarray(ctx.coeffs["t"], tv[0].dtype)
  if space == "params":
    pre = ctx.pre.astype(tv[0].dtype)
    out = slerp_arrays(t, pre + tv[0], pre + tv[1]) - pre
  else:
    out = slerp_arrays(t, tv[0], tv[1])
  return _core.scalar_scale(ctx, "slerp") * out


def slerp(t: float = 0.5, *, space: str = "params") -> _core.Merger:
  """SLERP between exactly two fine-tuned models, tensor by tensor.

  ``t=0`` gives the first model, ``t=1`` the second. ``space="params"``
  interpolates the raw weights (MergeKit); ``"task_vectors"`` interpolates
  ``τ1, τ2`` relative to θ0. ``t`` is a traced coefficient; the result is
  ``θ0 + scale · (slerp − θ0)``.

  >>> import jax.numpy as jnp, mtx
  >>> pre = {"w": jnp.zeros(2)}
  >>> fts = [{"w": jnp.array([1.0, 0.0])}, {"w": jnp.array([0.0, 1.0])}]
  >>> [round(v, 4) for v in mtx.merging.merge(pre, fts, "slerp")["w"].tolist()]
  [0.7071, 0.7071]
  """
  _core.check_choice("space", space, ("params", "task_vectors"))
  return _core.Merger(
      "slerp",
      (space,),
      {"t": t},
      _slerp_leaf,
      needs_pretrained=space == "params",
      min_tasks=2,
      max_tasks=2,
  )
