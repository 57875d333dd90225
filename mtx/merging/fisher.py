"""Merges weighted by data statistics: Fisher merging and RegMean.

The statistics (diagonal Fisher, per-layer Gram matrices of the inputs) are
computed from data elsewhere (``mtx.learned``); here they are given.

References:
  Matena & Raffel, "Merging Models with Fisher-Weighted Averaging",
  NeurIPS 2022. https://arxiv.org/abs/2111.09832
  Jin et al., "Dataless Knowledge Fusion by Merging Weights of Language
  Models" (RegMean), ICLR 2023. https://arxiv.org/abs/2212.09849
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from mtx import tree as mtree
from mtx.merging import _checks
from mtx.merging import _core
from mtx.merging import ties as _ties


def _by_path(name: str, trees: Sequence[Any]) -> list[dict[str, Any]]:
  if isinstance(trees, Mapping) or not isinstance(trees, Sequence):
    raise ValueError(f"{name} must be a list with one entry per model")
  out = []
  for t in trees:  # a params-shaped tree, or a flat {path: array} dict
    paths, leaves, _ = mtree.flatten(t)
    out.append(dict(zip(paths, leaves)))
  if len({frozenset(d) for d in out}) > 1:
    raise ValueError(f"the {name} of different models cover different leaves")
  return out


def _fisher_leaf(static, tv, ctx):
  (eps,) = static
  w = ctx.coeffs["weights"]
  dt = tv[0].dtype
  t = len(tv)
  w = jnp.ones((t,), dt) if w is None else jnp.asarray(w, dt)
  f = None if ctx.data is None else ctx.data["fishers"]
  if f is None:
    out = _core.tsum(_core.scale_tasks(w, tv)) / jnp.sum(w)
  else:
    fw = [w[i] * (f[i].astype(dt) + eps) for i in range(t)]
    out = _core.tsum([a * x for a, x in zip(fw, tv)]) / _core.tsum(fw)
  return _core.scalar_scale(ctx, "fisher") * out


def fisher(
    fishers: Sequence[Any],
    *,
    weights: Sequence[float] | None = None,
    eps: float = 1e-6,
) -> _core.Merger:
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
  data = _by_path("fishers", fishers)
  return _core.Merger(
      "fisher",
      (eps,),
      {"weights": weights},
      _fisher_leaf,
      data=(("fishers", data),),
      coeff_specs={"weights": _ties.WEIGHTS},
  )


def _regmean_leaf(static, tv, ctx):
  layout, ridge = static
  g = None if ctx.data is None else ctx.data["grams"]
  if g is None or tv[0].ndim != 2:
    return _core.scalar_scale(ctx, "regmean") * _core.tmean(tv)
  dt = tv[0].dtype
  tv = _core.stack(tv)
  alpha = jnp.asarray(ctx.coeffs["alpha"], dt)
  g = g.astype(dt)
  diag = jnp.eye(g.shape[-1], dtype=dt)
  g = alpha * g + (1 - alpha) * g * diag  # off-diagonals scaled by α
  w = tv if layout == "in_out" else jnp.swapaxes(tv, 1, 2)
  total = jnp.sum(g, axis=0)
  # A ridge relative to the mean diagonal keeps directions no input ever
  # reached (zero rows of G) at the plain average instead of 0/0.
  lam = ridge * jnp.maximum(jnp.trace(total) / total.shape[0], 1e-30)
  rhs = jnp.einsum("tij,tjk->ik", g, w) + lam * jnp.mean(w, axis=0)
  out = jnp.linalg.solve(total + lam * diag, rhs)
  if layout == "out_in":
    out = out.T
  return _core.scalar_scale(ctx, "regmean") * out


def regmean(
    grams: Sequence[Mapping[str, jax.Array]],
    *,
    alpha: float = 0.95,
    layout: str = "in_out",
    ridge: float = 1e-6,
) -> _core.Merger:
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
  _core.check_choice("layout", layout, ("in_out", "out_in"))
  _checks.number("regmean alpha", alpha, lo=0.0, hi=1.0)
  ridge = _checks.number("regmean ridge", ridge, lo=0.0)
  data = _by_path("grams", grams)
  for d in data:
    for p, g in d.items():
      if len(jnp.shape(g)) != 2 or jnp.shape(g)[0] != jnp.shape(g)[1]:
        raise ValueError(
            f"Gram matrix for {p!r} must be square, got " f"{jnp.shape(g)}"
        )
  return _core.Merger(
      "regmean",
      (layout, ridge),
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
