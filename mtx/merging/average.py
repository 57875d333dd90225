"""Averages: the uniform average ("uniform soup") and the weighted average.

Reference:
  Wortsman et al., "Model soups", 2022. https://arxiv.org/abs/2203.05482
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp

from mtx.merging import _checks
from mtx.merging import _protocol


def _average_leaf(static, tv, ctx):
  del static
  return _protocol.scalar_scale(ctx, "average") * _protocol.tmean(tv)


@_protocol.method()
def average() -> _protocol.Merger:
  """Uniform average of the models: ``θ0 + scale · mean_t τt``.

  With ``scale=1`` this is the plain parameter average ("uniform soup").

  >>> import jax.numpy as jnp, mtx
  >>> pre = {"w": jnp.zeros(2)}
  >>> fts = [{"w": jnp.array([1.0, 2.0])}, {"w": jnp.array([3.0, 0.0])}]
  >>> mtx.merging.merge(pre, fts, "average")["w"].tolist()
  [2.0, 1.0]
  """
  return _protocol.Merger("average", (), {}, _average_leaf, elementwise=True)


class WeightedAverageHParams(NamedTuple):
  """Structural hyperparameters of :func:`weighted_average`."""

  normalize: bool


def _weighted_leaf(hp: WeightedAverageHParams, tv, ctx):
  w = ctx.coeffs["weights"]
  t = len(tv)
  w = jnp.ones((t,), tv[0].dtype) if w is None else jnp.asarray(w, tv[0].dtype)
  out = _protocol.tsum(_protocol.scale_tasks(w, tv))
  if hp.normalize:
    out = out / jnp.sum(w)
  return _protocol.scalar_scale(ctx, "weighted_average") * out


@_protocol.method()
def weighted_average(
    weights: Sequence[float] | jax.Array | None = None, *, normalize=True
) -> _protocol.Merger:
  """Weighted average ``θ0 + scale · Σ wt τt / Σ wt`` (MergeKit's ``linear``).

  Args:
    weights: ``[T]`` weights (a traced coefficient: override per call with
      ``weights=...``); None means uniform. Finite; may be negative (task
      negation), but with ``normalize`` they must not sum to 0.
    normalize: divide by ``Σ wt`` (MergeKit's default); else ``Σ wt τt``.

  Raises:
    ValueError: weights that are not finite real numbers, sum to 0 (with
      ``normalize``), or whose length is not the number of models.
  """
  spec = _checks.Coeff("per_task", none_ok=True, nonzero_sum=bool(normalize))
  if weights is not None:
    _checks.coeff("weighted_average", "weights", weights, spec, None)
    weights = jnp.asarray(weights, jnp.float32)
  return _protocol.Merger(
      "weighted_average",
      WeightedAverageHParams(bool(normalize)),
      {"weights": weights},
      _weighted_leaf,
      elementwise=True,
      coeff_specs={"weights": spec},
  )
