"""RegMean: per linear layer, the weights that best match every model's
outputs on its own inputs (a least-squares merge from Gram matrices).

The Gram matrices of the inputs are computed from data elsewhere
(``mtx.learned.statistics``); here they are given.

Reference:
  Jin et al., "Dataless Knowledge Fusion by Merging Weights of Language
  Models" (RegMean), ICLR 2023. https://arxiv.org/abs/2212.09849
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp

from mtx.merging import _checks
from mtx.merging import _protocol


class RegMeanHParams(NamedTuple):
  """Structural hyperparameters of :func:`regmean`."""

  layout: str
  ridge: float


def _regmean_leaf(hp: RegMeanHParams, tv, ctx):
  g = None if ctx.data is None else ctx.data["grams"]
  if g is None or tv[0].ndim != 2:
    return _protocol.scalar_scale(ctx, "regmean") * _protocol.tmean(tv)
  dt = tv[0].dtype
  tv = _protocol.stack(tv)
  alpha = jnp.asarray(ctx.coeffs["alpha"], dt)
  g = g.astype(dt)
  diag = jnp.eye(g.shape[-1], dtype=dt)
  g = alpha * g + (1 - alpha) * g * diag  # off-diagonals scaled by α
  w = tv if hp.layout == "in_out" else jnp.swapaxes(tv, 1, 2)
  total = jnp.sum(g, axis=0)
  # A ridge relative to the mean diagonal keeps directions no input ever
  # reached (zero rows of G) at the plain average instead of 0/0.
  lam = hp.ridge * jnp.maximum(jnp.trace(total) / total.shape[0], 1e-30)
  rhs = jnp.einsum("tij,tjk->ik", g, w) + lam * jnp.mean(w, axis=0)
  out = jnp.linalg.solve(total + lam * diag, rhs)
  if hp.layout == "out_in":
    out = out.T
  return _protocol.scalar_scale(ctx, "regmean") * out


@_protocol.method()
def regmean(
    grams: Sequence[Mapping[str, jax.Array]],
    *,
    alpha: float = 0.95,
    layout: str = "in_out",
    ridge: float = 1e-6,
) -> _protocol.Merger:
  """RegMean: ``W* = (Σi G̃i)⁻¹ Σi G̃i Wi`` for each linear layer.

  ``Gi = XiᵀXi / N`` is the Gram matrix of layer ``i``'s inputs under model
  ``i``; ``G̃i`` scales its off-diagonal entries by ``alpha``. Leaves without
  a Gram matrix are averaged.

  Args:
    grams: per model, ``{kernel path: [d_in, d_in] Gram}`` (same paths for
      every model).
    alpha: off-diagonal scaling (traced coefficient), in [0, 1].
    layout: ``"in_out"`` for ``y = x @ W`` kernels (Flax), ``"out_in"`` for
      ``y = x @ W.T`` (PyTorch ``nn.Linear`` weights).
    ridge: numerical guard (not in the paper): solves
      ``(ΣG̃ + λI) W = Σ G̃i Wi + λ mean(Wi)`` with ``λ = ridge·mean(diag ΣG̃)``,
      so input directions no sample reached (singular ``ΣG̃``, e.g. dead
      pixels or ReLU units) get the average instead of NaN. ``ridge=0`` is
      the paper's exact formula. Finite, ``>= 0``.

  Sharding: the linear solve needs whole matrices, so on a mesh a kernel
  with a Gram matrix is gathered inside its leaf's kernel (the merged leaf
  gets the input's sharding back); other leaves are not gathered.

  Each Gram must be finite and ``[d_in, d_in]`` for its kernel (``d_in`` the
  kernel's first axis for ``"in_out"``, its second for ``"out_in"``).
  """
  _protocol.check_choice("layout", layout, ("in_out", "out_in"))
  _checks.number("regmean alpha", alpha, lo=0.0, hi=1.0)
  ridge = _checks.number("regmean ridge", ridge, lo=0.0)
  data = _checks.by_path("grams", grams)
  for d in data:
    for p, g in d.items():
      if len(jnp.shape(g)) != 2 or jnp.shape(g)[0] != jnp.shape(g)[1]:
        raise ValueError(
            f"Gram matrix for {p!r} must be square, got " f"{jnp.shape(g)}"
        )
  return _protocol.Merger(
      "regmean",
      RegMeanHParams(layout, ridge),
      {"alpha": alpha},
      _regmean_leaf,
      data=(("grams", data),),
      coeff_specs={"alpha": _checks.Coeff(lo=0.0, hi=1.0)},
      data_check=lambda name, path, shape: _gram_shape(layout, path, shape),
  )


def _gram_shape(layout: str, path: str, shape) -> tuple[int, int]:
  """The ``[d_in, d_in]`` Gram shape of a 2-D kernel leaf."""
  if len(shape) != 2:
    raise ValueError(
        f"a Gram matrix is given for leaf {path!r} of shape {shape}, which "
        "is not a 2-D kernel"
    )
  d = shape[0] if layout == "in_out" else shape[1]
  return (d, d)
