"""ISO-C: isotropic merging of 2-D layers (a flattened spectrum).

Reference:
  Marczak et al., "No Task Left Behind: Isotropic Model Merging with Common
  and Task-Specific Subspaces", ICML 2025. https://arxiv.org/abs/2502.04959

Every 2-D leaf is treated as a matrix; the other leaves (biases, norms,
convolution kernels) get the mean task vector, as the authors' code does.

Sharding: an SVD needs the whole matrix, so on a mesh ISO-C gathers each 2-D
leaf's task vectors (XLA all-gathers inside the leaf's kernel; the merged
leaf is given back the input's sharding). The other leaves are not gathered.
tests/multidevice_merge.py reads the compiled HLO for this.
"""

from __future__ import annotations

import jax.numpy as jnp

from mtx.merging import _protocol


def iso_matrix(tv) -> jnp.ndarray:
  """ISO-C of one layer: ``mean(S)·U Vᵀ`` for ``U S Vᵀ = Σt τt``."""
  u, s, vt = jnp.linalg.svd(_protocol.tsum(tv), full_matrices=False)
  return jnp.mean(s) * (u @ vt)


def _iso_leaf(static, tv, ctx):
  del static
  out = iso_matrix(tv) if tv[0].ndim == 2 else _protocol.tmean(tv)
  return _protocol.scalar_scale(ctx, "iso_c") * out


@_protocol.method()
def iso_c() -> _protocol.Merger:
  """ISO-C: flatten the spectrum of ``Σt τt`` to its mean, per 2-D layer.

  The mean runs over all ``min(m, n)`` singular values; non-matrix leaves
  get the mean task vector. ``scale`` α (the authors tune it on
  {0.1, ..., 3.0}; FusionBench's default 1.0). On a mesh it gathers each
  2-D leaf (see the module docstring).
  """
  return _protocol.Merger("iso_c", (), {}, _iso_leaf)
