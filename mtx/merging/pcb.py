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

from typing import NamedTuple

import jax.numpy as jnp
import numpy as np

from mtx.merging import _protocol
from mtx.merging import _source


def _minmax(x, lo, hi):
  den = hi - lo
  return jnp.where(den > 0, (x - lo) / jnp.where(den > 0, den, 1), 0)


def _clamped(tv, g):
  """``A_t = clip(|τt|, lo_t, hi_t)`` with the bounds, per task."""
  t = len(tv)
  lo, hi = _protocol.per_task(g["lo"], t), _protocol.per_task(g["hi"], t)
  return [
      (
          jnp.clip(jnp.abs(x), a.astype(x.dtype), b.astype(x.dtype)),
          a.astype(x.dtype),
          b.astype(x.dtype),
      )
      for x, a, b in zip(tv, lo, hi)
  ]


def scores(g, tv: _protocol.Tasks) -> _protocol.Tasks:
  """The balanced scores ``intra ⊙ inter`` of one leaf, per task."""
  t = len(tv)
  total = _protocol.tsum(tv)
  return tuple(
      jnp.exp(t * _minmax(a, lo, hi) ** 2) * jnp.tanh(x * total)
      for x, (a, lo, hi) in zip(tv, _clamped(tv, g))
  )


def _leaf(static, tv, ctx):
  del static
  g = ctx.glob
  t = len(tv)
  s_lo, s_hi = _protocol.per_task(g["s_lo"], t), _protocol.per_task(
      g["s_hi"], t
  )
  ws = [
      _minmax(
          jnp.clip(s, a.astype(s.dtype), b.astype(s.dtype)),
          a.astype(s.dtype),
          b.astype(s.dtype),
      )
      for s, a, b in zip(scores(g, tv), s_lo, s_hi)
  ]
  clamped = [jnp.sign(x) * a for x, (a, _, _) in zip(tv, _clamped(tv, g))]
  num = _protocol.tsum(
      [c * w for c, w in zip(_protocol.scale_tasks(ctx.scale, clamped), ws)]
  )
  return num / jnp.maximum(_protocol.tsum(ws), 1e-12)


def _rank_of_ascending(d: int, pos: int) -> int:
  """The descending rank (1-based) of ascending sorted position ``pos``."""
  pos = min(max(pos, 0), d - 1)
  return d - pos


class PcbHParams(NamedTuple):
  """Structural hyperparameters of :func:`pcb`."""

  ratio: float
  clamp: float


def _prepare(hp: PcbHParams, src: _source.Source, key=None):
  del key
  ratio, clamp = hp.ratio, hp.clamp
  d = sum(src.sizes)
  t = src.num_tasks
  k_lo = _rank_of_ascending(d, int(d * clamp))
  k_hi = _rank_of_ascending(d, int(d * (1 - clamp) - 1))
  lohi = np.asarray(src.global_kth_largest(np.tile([k_lo, k_hi], (t, 1))))
  g = {"lo": lohi[:, 0], "hi": lohi[:, 1]}
  k_s = _rank_of_ascending(d, int(d * (1 - ratio)))
  s = np.asarray(
      src.global_kth_largest(
          np.tile([k_s, 1], (t, 1)),
          False,
          fn=_scores,
          fstatic=None,
          extra=(g,),
      )
  )
  g["s_lo"], g["s_hi"] = s[:, 0], s[:, 1]
  return _protocol.Stats(g, None)


def _scores(static, tv, g):
  del static
  return scores(g, tv)


@_protocol.method()
def pcb(ratio: float = 0.1, clamp: float = 1e-4) -> _protocol.Merger:
  """PCB-Merging (see the module docstring for the exact steps).

  Args:
    ratio: fraction of entries per task that receive a weight, in (0, 1].
    clamp: outlier fraction clipped at each end of ``|τ|``, in [0, 0.5).
      The vision scripts of the paper use ``ratio=0.05, clamp=0.01`` with
      ``scale=1.2``.

  ``scale`` (λ) may be a scalar or a ``[T]`` vector of per-task λt.
  """
  ratio = _protocol.check_fraction("ratio", ratio)
  clamp = _protocol.check_fraction("clamp", clamp, allow_zero=True)
  if clamp >= 0.5:
    raise ValueError(f"clamp must be < 0.5, got {clamp}")
  return _protocol.Merger(
      "pcb", PcbHParams(ratio, clamp), {}, _leaf, _prepare, per_task_scale=True
  )
