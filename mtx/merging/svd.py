"""SVD-based merges of 2-D layers: TSV-M and ISO-C.

References:
  Gargiulo et al., "Task Singular Vectors: Reducing Task Interference in
  Model Merging", CVPR 2025. https://arxiv.org/abs/2412.00081
  Marczak et al., "No Task Left Behind: Isotropic Model Merging with Common
  and Task-Specific Subspaces", ICML 2025. https://arxiv.org/abs/2502.04959

Both treat every 2-D leaf as a matrix and average the other leaves (biases,
norms, convolution kernels), as the authors' code does.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mtx.merging import _core


def polar(x: jnp.ndarray) -> jnp.ndarray:
  """The orthogonal polar factor ``P Qᵀ`` of ``x = P Σ Qᵀ``."""
  p, _, qt = jnp.linalg.svd(x, full_matrices=False)
  return p @ qt


def tsv_merge_matrix(tv) -> jnp.ndarray:
  """TSV-M of one layer: ``tv`` is ``T`` matrices ``[m, n]`` (a sequence or
  a stacked ``[T, m, n]`` array).

  Each task keeps its top ``k = int(min(m, n)/T)`` singular triplets; the
  concatenated ``U`` and ``V`` are replaced by their orthogonal polar factors
  (slots beyond ``T·k`` stay zero, as in the authors' code); the result is
  ``U⊥ diag(Σ) V⊥ᵀ``. Only the top-``k`` slices of each task's SVD are
  kept, and no ``[m, min(m, n)]`` padding is built. With more tasks than
  ``min(m, n)`` (``k = 0``) the result is 0, as in the reference.
  """
  tv = list(tv)
  t = len(tv)
  m, n = tv[0].shape
  r = min(m, n)
  k = r // t
  if k == 0:
    return jnp.zeros((m, n), tv[0].dtype)
  us, ss, vts = [], [], []
  for x in tv:
    if us:  # one task's full SVD at a time: task t waits for t-1's slices
      (us[-1], ss[-1], vts[-1]), x = jax.lax.optimization_barrier(
          ((us[-1], ss[-1], vts[-1]), x)
      )
    u, s, vt = jnp.linalg.svd(x, full_matrices=False)
    us.append(u[:, :k])
    ss.append(s[:k])
    vts.append(vt[:k, :])
  u = jnp.concatenate(us, axis=1)  # [m, T·k]
  s = jnp.concatenate(ss)
  vt = jnp.concatenate(vts, axis=0)  # [T·k, n]
  # The reference pads U, Σ, Vᵀ with zero slots up to min(m, n); a zero slot
  # meets a zero singular value, so the polar factors of the unpadded
  # matrices give the same product. Associating the small factors first keeps
  # a single [m, T·k] temporary.
  pu, _, qut = jnp.linalg.svd(u, full_matrices=False)
  return pu @ ((qut * s[None]) @ polar(vt))


def _tsvm_leaf(static, tv, ctx):
  del static
  if tv[0].ndim == 2:
    out = tsv_merge_matrix(tv)
  else:
    out = _core.tmean(tv)
  return _core.scalar_scale(ctx, "tsvm") * out


def tsvm() -> _core.Merger:
  """TSV-M: ``θ0 + scale · TSV(τ1..τT)`` (``scale`` α, 1.0 in FusionBench;
  the authors pick it on validation from {0.1, ..., 3.0}).

  With one task it returns that task's vector unchanged.
  """
  return _core.Merger("tsvm", (), {}, _tsvm_leaf)


def iso_matrix(tv) -> jnp.ndarray:
  """ISO-C of one layer: ``mean(S)·U Vᵀ`` for ``U S Vᵀ = Σt τt``."""
  u, s, vt = jnp.linalg.svd(_core.tsum(tv), full_matrices=False)
  return jnp.mean(s) * (u @ vt)


def _iso_leaf(static, tv, ctx):
  del static
  out = iso_matrix(tv) if tv[0].ndim == 2 else _core.tmean(tv)
  return _core.scalar_scale(ctx, "iso_c") * out


def iso_c() -> _core.Merger:
  """ISO-C: flatten the spectrum of ``Σt τt`` to its mean, per 2-D layer.

  The mean runs over all ``min(m, n)`` singular values; non-matrix leaves
  get the mean task vector. ``scale`` α (the authors tune it on
  {0.1, ..., 3.0}; FusionBench's default 1.0).
  """
  return _core.Merger("iso_c", (), {}, _iso_leaf)
