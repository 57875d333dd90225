"""Averaging and task arithmetic.

References:
  Wortsman et al., "Model soups", 2022. https://arxiv.org/abs/2203.05482
  Ilharco et al., "Editing Models with Task Arithmetic", ICLR 2023.
  https://arxiv.org/abs/2212.04089
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from mtx.merging import _checks
from mtx.merging import _core


def _average_leaf(static, tv, ctx):
  del static
  return _core.scalar_scale(ctx, "average") * _core.tmean(tv)


def average() -> _core.Merger:
  """Uniform average of the models: ``θ0 + scale · mean_t τt``.

  With ``scale=1`` this is the plain parameter average ("uniform soup").

  >>> import jax.numpy as jnp, mtx
  >>> pre = {"w": jnp.zeros(2)}
  >>> fts = [{"w": jnp.array([1.0, 2.0])}, {"w": jnp.array([3.0, 0.0])}]
  >>> mtx.merging.merge(pre, fts, "average")["w"].tolist()
  [2.0, 1.0]
  """
  return _core.Merger("average", (), {}, _average_leaf, elementwise=True)


def _weighted_leaf(static, tv, ctx):
  (normalize,) = static
  w = ctx.coeffs["weights"]
  t = len(tv)
  w = jnp.ones((t,), tv[0].dtype) if w is None else jnp.asarray(w, tv[0].dtype)
  out = _core.tsum(_core.scale_tasks(w, tv))
  if normalize:
    out = out / jnp.sum(w)
  return _core.scalar_scale(ctx, "weighted_average") * out


def weighted_average(
    weights: Sequence[float] | jax.Array | None = None, *, normalize=True
) -> _core.Merger:
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
  return _core.Merger(
      "weighted_average",
      (bool(normalize),),
      {"weights": weights},
      _weighted_leaf,
      elementwise=True,
      coeff_specs={"weights": spec},
  )


def _ta_leaf(static, tv, ctx):
  del static
  return _core.tsum(_core.scale_tasks(ctx.scale, tv))


def task_arithmetic() -> _core.Merger:
  """Task arithmetic: ``θ0 + Σt λt τt`` with ``scale`` λ (scalar or ``[T]``).

  The paper picks one λ in {0.0, 0.05, ..., 1.0} on validation data
  (``scale`` is traced: sweep it with ``jax.vmap``).

  >>> import jax.numpy as jnp, mtx
  >>> pre = {"w": jnp.array([1.0, 1.0])}
  >>> fts = [{"w": jnp.array([2.0, 1.0])}, {"w": jnp.array([1.0, 3.0])}]
  >>> mtx.merging.merge(pre, fts, "task_arithmetic", scale=0.5)["w"].tolist()
  [1.5, 2.0]
  """
  return _core.Merger(
      "task_arithmetic", (), {}, _ta_leaf, per_task_scale=True, elementwise=True
  )
