"""ComPEFT as a merging method: ternary-compress each task vector, then add.

Reference:
  Yadav et al., "ComPEFT: Compression for Communicating Parameter Efficient
  Updates via Sparsification and Quantization", 2023.
  https://arxiv.org/abs/2311.13171
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from mtx.merging import _core
from mtx.merging import ties as _ties


def ternarize(tv, thresholds, magnitudes):
  """``magnitudes[t] · sign(τt)`` where ``|τt| >= thresholds[t]``, else 0."""
  nd = tv.ndim
  thr = jnp.asarray(thresholds, tv.dtype).reshape((-1,) + (1,) * (nd - 1))
  mag = jnp.asarray(magnitudes, tv.dtype).reshape((-1,) + (1,) * (nd - 1))
  return jnp.where(jnp.abs(tv) >= thr, mag * jnp.sign(tv), 0)


@jax.jit
def _moments(tv):
  flat = tv.reshape(tv.shape[0], -1)
  return jnp.sum(flat, axis=1), jnp.sum(flat * flat, axis=1)


def compeft_stats(src: _core.Source, density: float, topk_rule: str):
  """Global per-task thresholds and unbiased std of the dense task vectors."""
  t = src.num_tasks
  d = sum(src.sizes)
  if d < 2:
    raise ValueError("ComPEFT needs at least 2 entries per task vector")
  k = _ties.num_kept(d, density, topk_rule)
  thr = src.global_kth_largest(np.full((t,), k))
  s1 = np.zeros(t)
  s2 = np.zeros(t)
  for i in range(len(src)):
    a, b = _moments(src.leaf(i))
    s1 += np.asarray(a, np.float64)
    s2 += np.asarray(b, np.float64)
  var = (s2 - s1 * s1 / d) / (d - 1)
  return np.asarray(thr), np.sqrt(np.maximum(var, 0.0))


def _leaf(static, tv, ctx):
  del static
  g = ctx.glob
  mag = ctx.coeffs["alpha"] * g["std"]
  return jnp.sum(
      _core.scale_tasks(ctx.scale, ternarize(tv, g["thr"], mag)), axis=0
  )


def _prepare(static, src, key=None):
  del key
  density, topk_rule = static
  thr, std = compeft_stats(src, density, topk_rule)
  return _core.Stats({"thr": thr, "std": std.astype(np.float32)}, None)


def compeft(
    density: float = 0.2, *, alpha: float = 1.0, topk_rule: str = "paper"
) -> _core.Merger:
  """ComPEFT-compressed task arithmetic: ``θ0 + scale · Σt α σt sign(τt) mt``.

  ``mt`` keeps the ``density`` fraction of largest ``|τt|`` over all included
  leaves (the TIES rule; ``topk_rule="reference"`` keeps one more, as the
  authors' code); ``σt`` is the unbiased standard deviation of the dense
  ``τt``. ``alpha`` is a traced coefficient. See
  :func:`mtx.task_vectors.compress` for the packed storage format.
  """
  density = _core.check_fraction("density", density)
  _core.check_choice("topk_rule", topk_rule, _ties.TOPK_RULES)
  return _core.Merger(
      "compeft",
      (density, topk_rule),
      {"alpha": alpha},
      _leaf,
      _prepare,
      per_task_scale=True,
  )
