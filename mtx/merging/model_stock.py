"""Model Stock: interpolate the average towards the pretrained model.

Reference:
  Jang et al., "Model Stock: All we need is just a few fine-tuned models",
  ECCV 2024. https://arxiv.org/abs/2403.19522
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp

from mtx.merging import _protocol


def pairwise_cosines(tv, eps: float = 1e-6) -> jnp.ndarray:
  """``[P]`` cosines of the flattened task vectors of one leaf, for the
  pairs ``i < j`` in ``jnp.triu_indices(T, 1)`` order."""
  t = len(tv)
  # Each vector is divided by its largest magnitude m before the products,
  # so vectors of entries near 1e20 do not overflow: cos = u·v / (|u| |v|)
  # for the rescaled u, v where the true norms' product reaches eps, and the
  # true ``dot / eps`` below it.
  ms = [_protocol.max_abs(x) for x in tv]
  us = [x / jnp.where(m > 0, m, 1) for x, m in zip(tv, ms)]
  norms = [jnp.sqrt(_protocol.dot(u, u)) for u in us]
  cos = []
  for i in range(t):
    for j in range(i + 1, t):
      dot = _protocol.dot(us[i], us[j])
      big = (ms[i] * norms[i]) * (ms[j] * norms[j]) >= eps
      safe = jnp.where(big, norms[i] * norms[j], 1)
      cos.append(jnp.where(big, dot / safe, dot * ms[i] * ms[j] / eps))
  return jnp.clip(jnp.stack(cos), -1.0, 1.0)


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


class ModelStockHParams(NamedTuple):
  """Structural hyperparameters of :func:`model_stock`."""

  average: str


def _stock_leaf(hp: ModelStockHParams, tv, ctx):
  t = stock_ratio(tv, hp.average)
  return _protocol.scalar_scale(ctx, "model_stock") * t * _protocol.tmean(tv)


@_protocol.method(min_tasks=2)
def model_stock(average: str = "cosine") -> _protocol.Merger:
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
  _protocol.check_choice("average", average, ("cosine", "angle"))
  return _protocol.Merger(
      "model_stock",
      ModelStockHParams(average),
      {},
      _stock_leaf,
      min_tasks=2,
  )
