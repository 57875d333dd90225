"""PCB-Merging: parameter competition balancing.

Reference:
  Du et al., "Parameter Competition Balancing for Model Merging",
  NeurIPS 2024. https://arxiv.org/abs/2410.02396

mtx follows the authors' ``pcb-merging.py`` (the file their README points to):
on the global vector of each task (all included leaves),

* ``A = clip(|τ|, lo, hi)`` with ``lo``/``hi`` the values at ascending sorted
  positions ``int(d·clamp)`` and ``int(d·(1 − clamp) − 1)``;
* ``intra = exp(T · minmax(A)²)``; ``inter = tanh(τ ⊙ Σj τj)``;
  ``score = intra ⊙ inter``;
* ``w = minmax(clip(score, s_lo, max))`` with ``s_lo`` the score at ascending
  position ``int(d·(1 − ratio))``, so about ``ratio·d`` entries per task get a
  weight in (0, 1] and the rest 0;
* merged ``Σt λt sign(τt)·At·wt / max(Σt wt, 1e-12)``.

Where a min-max row is constant (``max == min``) the normalised value is 0
instead of the reference's NaN.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from mtx.merging import _core


def _col(x, nd):
  return jnp.asarray(x).reshape((-1,) + (1,) * (nd - 1))


def _minmax(x, lo, hi):
  den = hi - lo
  return jnp.where(den > 0, (x - lo) / jnp.where(den > 0, den, 1), 0)


def _clamped(tv, g):
  lo, hi = _col(g["lo"], tv.ndim), _col(g["hi"], tv.ndim)
  a = jnp.clip(jnp.abs(tv), lo, hi)
  return a, lo, hi


def scores(tv: jax.Array, g) -> jax.Array:
  """The balanced scores ``intra ⊙ inter`` of one leaf (``[T, ...]``)."""
  t = tv.shape[0]
  a, lo, hi = _clamped(tv, g)
  intra = jnp.exp(t * _minmax(a, lo, hi) ** 2)
  inter = jnp.tanh(tv * jnp.sum(tv, axis=0, keepdims=True))
  return intra * inter


def _leaf(static, tv, ctx):
  del static
  g = ctx.glob
  a, _, _ = _clamped(tv, g)
  s = scores(tv, g)
  s_lo, s_hi = _col(g["s_lo"], tv.ndim), _col(g["s_hi"], tv.ndim)
  w = _minmax(jnp.clip(s, s_lo, s_hi), s_lo, s_hi)
  clamped = jnp.sign(tv) * a
  num = jnp.sum(_core.scale_tasks(ctx.scale, clamped) * w, axis=0)
  return num / jnp.maximum(jnp.sum(w, axis=0), 1e-12)


def _rank_of_ascending(d: int, pos: int) -> int:
  """The descending rank (1-based) of ascending sorted position ``pos``."""
  pos = min(max(pos, 0), d - 1)
  return d - pos


_scores_jit = jax.jit(scores)


def _prepare(static, src: _core.Source, key=None):
  del key
  ratio, clamp = static
  d = sum(src.sizes)
  t = src.num_tasks
  k_lo = _rank_of_ascending(d, int(d * clamp))
  k_hi = _rank_of_ascending(d, int(d * (1 - clamp) - 1))
  g = {
      "lo": src.global_kth_largest(np.full((t,), k_lo)),
      "hi": src.global_kth_largest(np.full((t,), k_hi)),
  }
  g = {k: jnp.asarray(v) for k, v in g.items()}
  sc = src.with_transform(lambda i, tv: _scores_jit(tv, g))
  k_s = _rank_of_ascending(d, int(d * (1 - ratio)))
  g["s_lo"] = jnp.asarray(sc.global_kth_largest(np.full((t,), k_s), False))
  g["s_hi"] = jnp.asarray(sc.global_kth_largest(np.ones((t,), int), False))
  return _core.Stats(g, None)


def pcb(ratio: float = 0.1, clamp: float = 1e-4) -> _core.Merger:
  """PCB-Merging (see the module docstring for the exact steps).

  Args:
    ratio: fraction of entries per task that receive a weight, in (0, 1].
    clamp: outlier fraction clipped at each end of ``|τ|``, in [0, 0.5).
      The vision scripts of the paper use ``ratio=0.05, clamp=0.01`` with
      ``scale=1.2``.

  ``scale`` (λ) may be a scalar or a ``[T]`` vector of per-task λt.
  """
  ratio = _core.check_fraction("ratio", ratio)
  clamp = _core.check_fraction("clamp", clamp, allow_zero=True)
  if clamp >= 0.5:
    raise ValueError(f"clamp must be < 0.5, got {clamp}")
  return _core.Merger(
      "pcb", (ratio, clamp), {}, _leaf, _prepare, per_task_scale=True
  )
