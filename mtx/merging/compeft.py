"""ComPEFT as a merging method: ternary-compress each task vector, then add.

Reference:
  Yadav et al., "ComPEFT: Compression for Communicating Parameter Efficient
  Updates via Sparsification and Quantization", 2023.
  https://arxiv.org/abs/2311.13171
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp
import numpy as np

from mtx.merging import _checks
from mtx.merging import _protocol
from mtx.merging import _source
from mtx.merging import ties as _ties


def ternarize(tv: _protocol.Tasks, thresholds, magnitudes) -> _protocol.Tasks:
  """``magnitudes[t] · sign(τt)`` where ``|τt| >= thresholds[t]``, else 0."""
  t = len(tv)
  return tuple(
      jnp.where(
          jnp.abs(x) >= jnp.asarray(h, x.dtype),
          jnp.asarray(m, x.dtype) * jnp.sign(x),
          0,
      )
      for x, h, m in zip(
          tv,
          _protocol.per_task(thresholds, t),
          _protocol.per_task(magnitudes, t),
      )
  )


def _squares(static, tv, c):
  del static
  return tv, tuple(jnp.square(x * c.astype(x.dtype)) for x in tv)


def _moments(src: _source.Source, c: float) -> tuple[np.ndarray, np.ndarray]:
  """Per task ``Σ τ`` and ``Σ (c·τ)²`` over all leaves (float64 sums)."""
  t = src.num_tasks
  s1 = np.zeros(t)
  s2 = np.zeros(t)
  for i in range(len(src)):
    xs, sq = src.run(_squares, None, i, np.float32(c))
    s1 += [src.total(x) for x in xs]
    s2 += [src.total(x) for x in sq]
  return s1, s2


def compeft_stats(src: _source.Source, density: float, topk_rule: str):
  """Global per-task thresholds and unbiased std of the dense task vectors."""
  t = src.num_tasks
  d = sum(src.sizes)
  if d < 2:
    raise ValueError("ComPEFT needs at least 2 entries per task vector")
  k = _ties.num_kept(d, density, topk_rule)
  thr = src.global_kth_largest(np.full((t,), k))
  c = 1.0
  s1, s2 = _moments(src, c)
  if not np.isfinite(s2).all():  # |τ| near 1e19 or more: τ² overflowed
    big = float(np.max(src.global_kth_largest(np.ones((t,), int))))
    c = 1.0 / big
    s1, s2 = _moments(src, c)
  s1 = s1 * c
  var = (s2 - s1 * s1 / d) / (d - 1)
  return np.asarray(thr), np.sqrt(np.maximum(var, 0.0)) / c


class CompeftHParams(NamedTuple):
  """Structural hyperparameters of :func:`compeft`."""

  density: float
  topk_rule: str


def _leaf(static, tv, ctx):
  del static
  g = ctx.glob
  mag = ctx.coeffs["alpha"] * g["std"]
  return _protocol.tsum(
      _protocol.scale_tasks(ctx.scale, ternarize(tv, g["thr"], mag))
  )


def _prepare(hp: CompeftHParams, src, key=None):
  del key
  thr, std = compeft_stats(src, hp.density, hp.topk_rule)
  return _protocol.Stats({"thr": thr, "std": std.astype(np.float32)}, None)


@_protocol.method()
def compeft(
    density: float = 0.2, *, alpha: float = 1.0, topk_rule: str = "paper"
) -> _protocol.Merger:
  """ComPEFT-compressed task arithmetic: ``θ0 + scale · Σt α σt sign(τt) mt``.

  ``mt`` keeps the ``density`` fraction of largest ``|τt|`` over all included
  leaves (the TIES rule; ``topk_rule="reference"`` keeps one more, as the
  authors' code); ``σt`` is the unbiased standard deviation of the dense
  ``τt``. ``alpha`` is a traced coefficient. See
  :func:`mtx.task_vectors.compress` for the packed storage format.
  """
  density = _protocol.check_fraction("density", density)
  _protocol.check_choice("topk_rule", topk_rule, _ties.TOPK_RULES)
  return _protocol.Merger(
      "compeft",
      CompeftHParams(density, topk_rule),
      {"alpha": alpha},
      _leaf,
      _prepare,
      per_task_scale=True,
      coeff_specs={"alpha": _checks.Coeff(lo=0.0)},
  )
