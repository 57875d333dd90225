"""Fisher merging: an average weighted by each model's diagonal Fisher.

The Fisher diagonals are computed from data elsewhere
(``mtx.learned.statistics``); here they are given.

Reference:
  Matena & Raffel, "Merging Models with Fisher-Weighted Averaging",
  NeurIPS 2022. https://arxiv.org/abs/2111.09832
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax.numpy as jnp

from mtx.merging import _checks
from mtx.merging import _protocol
from mtx.merging import ties as _ties


class FisherHParams(NamedTuple):
  """Structural hyperparameters of :func:`fisher`."""

  eps: float


def _fisher_leaf(hp: FisherHParams, tv, ctx):
  w = ctx.coeffs["weights"]
  dt = tv[0].dtype
  t = len(tv)
  w = jnp.ones((t,), dt) if w is None else jnp.asarray(w, dt)
  f = None if ctx.data is None else ctx.data["fishers"]
  if f is None:
    out = _protocol.tsum(_protocol.scale_tasks(w, tv)) / jnp.sum(w)
  else:
    fw = [w[i] * (f[i].astype(dt) + hp.eps) for i in range(t)]
    out = _protocol.tsum([a * x for a, x in zip(fw, tv)]) / _protocol.tsum(fw)
  return _protocol.scalar_scale(ctx, "fisher") * out


@_protocol.method()
def fisher(
    fishers: Sequence[Any],
    *,
    weights: Sequence[float] | None = None,
    eps: float = 1e-6,
) -> _protocol.Merger:
  """Fisher merging: ``θ = Σi wi (Fi + ε) θi / Σi wi (Fi + ε)``, per entry.

  Args:
    fishers: one diagonal-Fisher tree per fine-tuned model (the params'
      structure, or a ``{path: array}`` dict covering some leaves). Leaves
      without a Fisher are (weighted) averaged.
    weights: ``[T]`` model weights (traced coefficient); None = uniform.
      Finite, non-negative, not all 0.
    eps: added to every Fisher entry (the reference's floor), ``>= 0``.

  Each Fisher must have its leaf's shape and be finite.

  >>> import jax.numpy as jnp, mtx
  >>> pre = {"w": jnp.zeros(2)}
  >>> fts = [{"w": jnp.array([1.0, 1.0])}, {"w": jnp.array([3.0, 3.0])}]
  >>> fis = [{"w": jnp.array([1.0, 0.0])}, {"w": jnp.array([0.0, 1.0])}]
  >>> [round(v, 3) for v in mtx.merging.merge(pre, fts, "fisher",
  ...                                          fishers=fis)["w"].tolist()]
  [1.0, 3.0]
  """
  eps = _checks.number("fisher eps", eps, lo=0.0)
  if weights is not None:
    _checks.coeff("fisher", "weights", weights, _ties.WEIGHTS, None)
    weights = jnp.asarray(weights, jnp.float32)
  data = _checks.by_path("fishers", fishers)
  return _protocol.Merger(
      "fisher",
      FisherHParams(eps),
      {"weights": weights},
      _fisher_leaf,
      data=(("fishers", data),),
      coeff_specs={"weights": _ties.WEIGHTS},
  )
