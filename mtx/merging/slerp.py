"""SLERP: spherical interpolation between two models, tensor by tensor.

Reference:
  Shoemake, "Animating rotation with quaternion curves", SIGGRAPH 1985 (SLERP,
  as used for model merging by MergeKit).
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp

from mtx.merging import _protocol

DOT_THRESHOLD = 0.9995


def slerp_arrays(
    t: jnp.ndarray, v0: jnp.ndarray, v1: jnp.ndarray, eps: float = 1e-8
) -> jnp.ndarray:
  """Spherical interpolation of two tensors viewed as flat vectors.

  The direction is measured on the normalised tensors (a tensor with norm
  ``<= eps`` is not normalised); the weights apply to the unnormalised ones;
  when ``|cos| > 0.9995`` it falls back to linear interpolation (MergeKit).
  """
  n0 = _protocol.norm(v0)
  n1 = _protocol.norm(v1)
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


class SlerpHParams(NamedTuple):
  """Structural hyperparameters of :func:`slerp`."""

  space: str


def _slerp_leaf(hp: SlerpHParams, tv, ctx):
  t = jnp.asarray(ctx.coeffs["t"], tv[0].dtype)
  if hp.space == "params":
    pre = ctx.pre.astype(tv[0].dtype)
    out = slerp_arrays(t, pre + tv[0], pre + tv[1]) - pre
  else:
    out = slerp_arrays(t, tv[0], tv[1])
  return _protocol.scalar_scale(ctx, "slerp") * out


@_protocol.method(min_tasks=2, max_tasks=2)
def slerp(t: float = 0.5, *, space: str = "params") -> _protocol.Merger:
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
  _protocol.check_choice("space", space, ("params", "task_vectors"))
  return _protocol.Merger(
      "slerp",
      SlerpHParams(space),
      {"t": t},
      _slerp_leaf,
      needs_pretrained=space == "params",
      min_tasks=2,
      max_tasks=2,
  )
