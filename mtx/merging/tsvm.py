"""TSV-M: Task Singular Vectors merging of 2-D layers.

Reference:
  Gargiulo et al., "Task Singular Vectors: Reducing Task Interference in
  Model Merging", CVPR 2025. https://arxiv.org/abs/2412.00081

Every 2-D leaf is treated as a matrix; the other leaves (biases, norms,
convolution kernels) are averaged, as the authors' code does.

Sharding: an SVD needs the whole matrix, so on a mesh TSV-M gathers each 2-D
leaf's task vectors (XLA all-gathers inside the leaf's kernel; the merged
leaf is given back the input's sharding). The other leaves are not gathered.
tests/multidevice_merge.py reads the compiled HLO for this.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from mtx.merging import _protocol


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
    u, s, vt = _top_triplets(x, k)
    us.append(u)
    ss.append(s)
    vts.append(vt)
  return _tsv_combine(
      jnp.concatenate(us, axis=1),
      jnp.concatenate(ss),
      jnp.concatenate(vts, axis=0),
  )


def _top_triplets(x, k):
  u, s, vt = jnp.linalg.svd(x, full_matrices=False)
  return u[:, :k], s[:k], vt[:k, :]


def _tsv_combine(u, s, vt):
  """``polar(U) diag(s) polar(Vᵀ)`` for ``U [m, T·k]``, ``Vᵀ [T·k, n]``.

  The reference pads U, Σ, Vᵀ with zero slots up to min(m, n); a zero slot
  meets a zero singular value, so the polar factors of the unpadded matrices
  give the same product. Associating the small factors first keeps a single
  ``[m, T·k]`` temporary.
  """
  pu, _, qut = jnp.linalg.svd(u, full_matrices=False)
  return pu @ ((qut * s[None]) @ polar(vt))


# 2-D leaves at least this large get their per-task SVDs in ``prepare``, one
# task per dispatch, so only one task's task vector and factors are alive.
_PRECOMPUTE_ENTRIES = 1 << 22


class _TaskTop(NamedTuple):
  """Which task's top-``k`` singular triplets :func:`_task_top` computes."""

  task: int
  k: int


def _task_top(which: _TaskTop, tv):
  return _top_triplets(tv[which.task], which.k)


def _tsvm_prepare(static, src, key=None):
  del static, key
  per_leaf = []
  for i, shape in enumerate(src.shapes):
    k = min(shape) // src.num_tasks if len(shape) == 2 else 0
    if len(shape) != 2 or k == 0 or src.sizes[i] < _PRECOMPUTE_ENTRIES:
      per_leaf.append(None)
      continue
    parts = [
        src.run(_task_top, _TaskTop(j, k), i) for j in range(src.num_tasks)
    ]
    per_leaf.append(
        tuple(
            jnp.concatenate(p, axis=a) for p, a in zip(zip(*parts), (1, 0, 0))
        )
    )
  return _protocol.Stats(None, tuple(per_leaf))


def _tsvm_leaf(static, tv, ctx):
  del static
  if ctx.stats is not None:  # triplets computed task by task in prepare
    out = _tsv_combine(*ctx.stats)
  elif tv[0].ndim == 2:
    out = tsv_merge_matrix(tv)
  else:
    out = _protocol.tmean(tv)
  return _protocol.scalar_scale(ctx, "tsvm") * out


@_protocol.method()
def tsvm() -> _protocol.Merger:
  """TSV-M: ``θ0 + scale · TSV(τ1..τT)`` (``scale`` α, 1.0 in FusionBench;
  the authors pick it on validation from {0.1, ..., 3.0}).

  With one task it returns that task's vector unchanged. On a mesh it
  gathers each 2-D leaf (see the module docstring).
  """
  return _protocol.Merger("tsvm", (), {}, _tsvm_leaf, _tsvm_prepare)
