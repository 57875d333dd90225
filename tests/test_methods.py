"""Tests of every training-free merging method in ``mtx.merging.METHODS``.

Three kinds of checks per method:

* hand-computed examples: tiny literal fixtures, the arithmetic in a comment,
  literal expected numbers (``θ0`` is nonzero so the final ``θ0 + merged``
  step is exercised);
* behaviour checks (TIES rules, DARE randomness, LiNeS depth scaling, ...);
* independent numpy reference implementations, written from the authors'
  reference code (see /tmp/research/methods_notes.md), on random float32
  inputs with leaves of different shapes.

Fixtures are written as task vectors ``τt``; the fine-tuned models are
``θt = θ0 + τt``. All literal values are dyadic, so that sum and the
``θt − θ0`` inside ``merge`` are exact in float32 (magnitude ties stay ties).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mtx
from mtx import tree as mtree
from mtx.merging import dare as mdare
from mtx.merging import lines as mlines
from mtx.merging import ties as mties

merge = mtx.merging.merge


# ----------------------------------------------------------------------------
# Helpers.


def _arr(x):
  return jnp.asarray(np.asarray(x, np.float32))


def _tree(t):
  """Nested dict of lists / numbers -> nested dict of float32 jnp arrays."""
  if isinstance(t, dict):
    return {k: _tree(v) for k, v in t.items()}
  return _arr(t)


def models(pre, taus):
  """``θt = θ0 + τt`` for every task vector (exact for dyadic literals)."""
  pre = _tree(pre)
  return pre, [
      jax.tree.map(lambda p, t: p + t, pre, _tree(tau)) for tau in taus
  ]


def merged(pre, taus, method, **kw):
  pre, fts = models(pre, taus)
  return merge(pre, fts, method, **kw)


def assert_tree_close(actual, expected, rtol=1e-6, atol=1e-6):
  if isinstance(expected, dict):
    assert set(actual) == set(expected)
    for k in expected:
      assert_tree_close(actual[k], expected[k], rtol, atol)
  else:
    np.testing.assert_allclose(
        np.asarray(actual, np.float64),
        np.asarray(expected, np.float64),
        rtol=rtol,
        atol=atol,
    )


def random_models(seed, shapes, num_tasks, tau_scale=1.0):
  """Random float32 θ0 and θt; returns (pre, fts, taus) with ``taus[path]``
  the float64 ``[T, ...]`` task vectors exactly as mtx computes them
  (float32 subtraction)."""
  rng = np.random.default_rng(seed)
  pre = {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
  fts = [
      {
          k: (pre[k] + tau_scale * rng.normal(size=s)).astype(np.float32)
          for k, s in shapes.items()
      }
      for _ in range(num_tasks)
  ]
  taus = {
      k: np.stack([(f[k] - pre[k]).astype(np.float64) for f in fts])
      for k in shapes
  }
  to_j = lambda d: {k: jnp.asarray(v) for k, v in d.items()}
  return to_j(pre), [to_j(f) for f in fts], taus, pre


def flat_tasks(taus, keys):
  """``[T, d]``: the concatenation of all leaves in tree (sorted-key) order."""
  t = taus[keys[0]].shape[0]
  return np.concatenate([taus[k].reshape(t, -1) for k in keys], axis=1)


def unflat(vec, taus, keys):
  out, i = {}, 0
  for k in keys:
    shape = taus[k].shape[1:]
    n = int(np.prod(shape))
    out[k] = vec[i : i + n].reshape(shape)
    i += n
  return out


def add_pre(pre_np, merged_tv, scale=1.0):
  return {
      k: pre_np[k].astype(np.float64) + scale * merged_tv[k] for k in merged_tv
  }


# Shapes for the reference comparisons: a 2-D, a 1-D and a 3-D leaf.
SHAPES = {"a": (4, 6), "b": (7,), "c": (2, 3, 5)}
# DARE tests share shapes so that the (slow to compile) PRNG kernels are reused.
DARE_SHAPES = {"a": (4, 6), "b": (7,)}
# For SVD methods: a 1-D leaf and two non-square matrices.
SVD_SHAPES = {"bias": (5,), "w": (7, 4), "x": (3, 6)}


# ----------------------------------------------------------------------------
# Numpy references, written from the authors' code.


def ref_topk_values_mask(m, density, rule):
  """TIES ``topk_values_mask`` on ``[T, d]``: kthvalue + ``>=``.

  rule="reference": k = d − int(d·K), kth = k-th smallest |M| (1-based).
  rule="paper": threshold at the int(d·K)-th largest (at least 1).
  """
  d = m.shape[1]
  a = np.abs(m)
  srt = np.sort(a, axis=1)  # ascending
  if rule == "reference":
    k = d - int(d * density)
    kth = srt[:, k - 1 : k]
  else:
    kept = max(1, int(d * density))
    kth = srt[:, d - kept : d - kept + 1]
  return m * (a >= kth)


def ref_resolve_sign(m):
  s = np.sign(m.sum(0))
  majority = np.sign(s.sum())
  s[s == 0] = majority
  return s


def ref_disjoint_merge(m, reduce, s):
  keep = np.where(s[None] > 0, m > 0, m < 0)
  sel = m * keep
  if reduce == "mean":
    return sel.sum(0) / np.maximum((sel != 0).sum(0), 1)
  if reduce == "sum":
    return sel.sum(0)
  return np.abs(sel).max(0) * s


def ref_ties(flat, density, rule="reference", reduce="mean"):
  trimmed = flat if density >= 1 else ref_topk_values_mask(flat, density, rule)
  return ref_disjoint_merge(trimmed, reduce, ref_resolve_sign(trimmed))


def ref_pcb(flat, ratio, clamp_ratio, lam):
  """``pcb-merging.py`` (variant A): full sorts, min-max per row."""
  t, d = flat.shape

  def normalize(x):
    mn = x.min(1, keepdims=True)
    mx = x.max(1, keepdims=True)
    return (x - mn) / (mx - mn)

  def clamp(x, min_ratio, max_ratio):
    s = np.sort(x, axis=1)
    lo = s[:, int(d * min_ratio)][:, None]
    hi = s[:, int(d * (1 - max_ratio) - 1)][:, None]
    return np.clip(x, lo, hi)

  a = clamp(np.abs(flat), clamp_ratio, clamp_ratio)
  tv_c = np.sign(flat) * a
  intra = np.exp(t * normalize(a) ** 2)
  inter = np.tanh(flat * flat.sum(0, keepdims=True))
  score = intra * inter
  w = normalize(clamp(score, 1 - ratio, 0))
  num = (np.asarray(lam)[:, None] * tv_c * w).sum(0)
  return num / np.maximum(w.sum(0), 1e-12)


def ref_breadcrumbs_mask(x, density, top_remove):
  """Authors' ``TaskVectorMiddleKeep`` on one task's tensor (per last-dim row,
  two top-k's; random data so that top-k has no ties)."""
  if x.ndim == 0:
    return x
  n = x.shape[-1]
  out = x.copy()
  r = int(n * top_remove)
  if r > 0:
    idx = np.argsort(-np.abs(out), axis=-1)[..., :r]
    np.put_along_axis(out, idx, 0.0, axis=-1)
  kk = int(n * density)
  idx = np.argsort(-np.abs(out), axis=-1)[..., :kk]
  mask = np.zeros_like(out)
  np.put_along_axis(mask, idx, 1.0, axis=-1)
  return out * mask


def ref_tsvm_matrix(tvs):
  """``compute_and_sum_svd_mem_reduction`` for one [T, m, n] layer."""
  t, m, n = tvs.shape
  r = min(m, n)
  k = int(r * (1 / t))
  ucat = np.zeros((m, r))
  scat = np.zeros(r)
  vcat = np.zeros((r, n))
  for i in range(t):
    u, s, vh = np.linalg.svd(tvs[i], full_matrices=False)
    ucat[:, i * k : (i + 1) * k] = u[:, :k]
    scat[i * k : (i + 1) * k] = s[:k]
    vcat[i * k : (i + 1) * k, :] = vh[:k, :]
  pu, _, qu = np.linalg.svd(ucat, full_matrices=False)
  pv, _, qv = np.linalg.svd(vcat, full_matrices=False)
  return (pu @ qu) @ np.diag(scat) @ (pv @ qv)


def ref_iso_matrix(tvs):
  u, s, vh = np.linalg.svd(tvs.sum(0), full_matrices=False)
  return u @ np.diag(np.full(s.shape, s.mean())) @ vh


def ref_compeft(flat, density, alpha, rule):
  std = flat.std(axis=1, ddof=1, keepdims=True)
  topk = ref_topk_values_mask(flat, density, rule)
  return (alpha * std) * np.sign(topk)


def ref_stock_mergekit(pre, fts):
  """MergeKit ``model_stock`` on one tensor: mean of pairwise cosines."""
  offs = [(f - pre).ravel() for f in fts]
  n = len(fts)
  cos = []
  for i in range(n):
    for j in range(i + 1, n):
      c = (
          offs[i]
          @ offs[j]
          / max(np.linalg.norm(offs[i]) * np.linalg.norm(offs[j]), 1e-6)
      )
      cos.append(np.clip(c, -1, 1))
  c = np.mean(cos)
  t = n * c / (1 + (n - 1) * c)
  return t * np.mean(fts, axis=0) + (1 - t) * pre


def ref_stock_fusionbench(pre, fts):
  """FusionBench ``ModelStock``: mean of pairwise angles (degrees)."""
  offs = [(f - pre).ravel() for f in fts]
  n = len(fts)
  angles = []
  for i in range(n):
    for j in range(i + 1, n):
      c = np.sum(offs[i] * offs[j]) / (
          np.sqrt(np.sum(offs[i] ** 2) * np.sum(offs[j] ** 2)) + 1e-8
      )
      angles.append(np.rad2deg(np.arccos(np.clip(c, -1, 1))))
  c = np.cos(np.deg2rad(np.mean(angles)))
  t = n * c / ((n - 1) * c + 1 + 1e-8)
  return t * np.mean(fts, axis=0) + (1 - t) * pre


def ref_slerp(t, v0, v1, dot_threshold=0.9995, eps=1e-8):
  """MergeKit ``slerp``."""
  c0, c1 = v0.copy(), v1.copy()
  n0, n1 = np.linalg.norm(v0), np.linalg.norm(v1)
  if n0 > eps:
    v0 = v0 / n0
  if n1 > eps:
    v1 = v1 / n1
  dot = np.sum(v0 * v1)
  if abs(dot) > dot_threshold:
    return (1 - t) * c0 + t * c1
  th = np.arccos(dot)
  s0 = np.sin(th - t * th) / np.sin(th)
  s1 = np.sin(t * th) / np.sin(th)
  return s0 * c0 + s1 * c1


# ============================================================================
# average / weighted_average / task_arithmetic


def test_average_hand():
  # τ1 = [2, 0, -1], τ2 = [0, 4, -1]: mean = [1, 2, -1]; scale 0.5 ->
  # [0.5, 1, -0.5]; θ0 = [1, -1, 0.5] -> [1.5, 0, 0].
  out = merged(
      {"w": [1, -1, 0.5]},
      [{"w": [2, 0, -1]}, {"w": [0, 4, -1]}],
      "average",
      scale=0.5,
  )
  assert_tree_close(out, {"w": [1.5, 0.0, 0.0]})
  # scale 1 is the plain parameter average ("uniform soup"):
  # θ1 = [3, -1, -0.5], θ2 = [1, 3, -0.5] -> [2, 1, -0.5].
  out = merged(
      {"w": [1, -1, 0.5]}, [{"w": [2, 0, -1]}, {"w": [0, 4, -1]}], "average"
  )
  assert_tree_close(out, {"w": [2.0, 1.0, -0.5]})


def test_weighted_average_hand():
  pre = {"w": [1, -1, 0.5]}
  taus = [{"w": [2, 0, -1]}, {"w": [0, 4, -1]}]
  # weights [1, 3], normalised: ([2,0,-1] + 3·[0,4,-1]) / 4 = [0.5, 3, -1];
  # θ0 + that = [1.5, 2, -0.5].
  out = merged(pre, taus, "weighted_average", weights=[1.0, 3.0])
  assert_tree_close(out, {"w": [1.5, 2.0, -0.5]})
  # normalize=False: Σ wt τt = [2, 12, -4]; scale 0.5 -> [1, 6, -2];
  # θ0 + that = [2, 5, -1.5].
  out = merged(
      pre,
      taus,
      "weighted_average",
      weights=[1.0, 3.0],
      normalize=False,
      scale=0.5,
  )
  assert_tree_close(out, {"w": [2.0, 5.0, -1.5]})
  # weights=None is the uniform average.
  out = merged(pre, taus, "weighted_average")
  assert_tree_close(out, {"w": [2.0, 1.0, -0.5]})


def test_task_arithmetic_hand():
  pre = {"w": [1, -1, 0.5], "b": [2.0]}
  taus = [{"w": [2, 0, -1], "b": [1.0]}, {"w": [0, 4, -1], "b": [-3.0]}]
  # scalar λ = 0.5: 0.5·([2,0,-1] + [0,4,-1]) = [1, 2, -1] -> [2, 1, -0.5];
  # b: 2 + 0.5·(1 − 3) = 1.
  out = merged(pre, taus, "task_arithmetic", scale=0.5)
  assert_tree_close(out, {"w": [2.0, 1.0, -0.5], "b": [1.0]})
  # per-task λ = [1, 0.5]: [2,0,-1] + [0,2,-0.5] = [2, 2, -1.5] ->
  # [3, 1, -1]; b: 2 + 1 − 1.5 = 1.5.
  out = merged(pre, taus, "task_arithmetic", scale=jnp.array([1.0, 0.5]))
  assert_tree_close(out, {"w": [3.0, 1.0, -1.0], "b": [1.5]})
  # per-leaf prefix tree of scales: w at 1, b at 0 (b stays θ0).
  out = merged(pre, taus, "task_arithmetic", scale={"w": 1.0, "b": 0.0})
  assert_tree_close(out, {"w": [3.0, 3.0, -1.5], "b": [2.0]})


# ============================================================================
# TIES


def test_ties_hand_global_default():
  # Default ties: density 0.5 here, sign="mass", reduce="mean", global scope,
  # paper top-k (keep int(6·0.5) = 3 per task over both leaves, ties kept).
  # Flattened (a row-major, then b), d = 6:
  #   τ1 = [ 3, -2,  0,  1 |  1,    -1 ]  |τ1| 3rd largest = 1 -> keep >= 1
  #   τ2 = [-1,  2,  4,  0 | -1,   0.5 ]  3rd largest = 1
  #   τ3 = [ 2,  0, -4, .5 | .25,    3 ]  3rd largest = 2
  # trimmed:
  #   t1 = [ 3, -2,  0,  1 |  1, -1 ]
  #   t2 = [-1,  2,  4,  0 | -1,  0 ]
  #   t3 = [ 2,  0, -4,  0 |  0,  3 ]
  # Σ = [4, 0, 0, 1 | 0, 2] -> γ = [+, 0, 0, +, 0, +]; majority = sign(3) = +
  # so γ = + everywhere. Mean of the positive entries:
  #   [(3+2)/2, 2, 4, 1 | 1, 3] = [2.5, 2, 4, 1 | 1, 3]
  # scale 0.5 and θ0 = a [[1,-1],[0.5,2]], b [-0.5, 0.25]:
  #   a = [[2.25, 0], [2.5, 2.5]], b = [0, 1.75]
  pre = {"a": [[1, -1], [0.5, 2]], "b": [-0.5, 0.25]}
  taus = [
      {"a": [[3, -2], [0, 1]], "b": [1, -1]},
      {"a": [[-1, 2], [4, 0]], "b": [-1, 0.5]},
      {"a": [[2, 0], [-4, 0.5]], "b": [0.25, 3]},
  ]
  out = merged(pre, taus, "ties", density=0.5, scale=0.5)
  assert_tree_close(out, {"a": [[2.25, 0.0], [2.5, 2.5]], "b": [0.0, 1.75]})


def test_ties_num_kept_rules():
  # paper: int(d·density) (at least 1); reference: int(d·density) + 1 (≤ d).
  assert mties.num_kept(1000, 0.2) == 200
  assert mties.num_kept(1000, 0.2, "reference") == 201
  assert mties.num_kept(5, 0.4) == 2
  assert mties.num_kept(5, 0.4, "reference") == 3
  assert mties.num_kept(5, 1.0, "reference") == 5
  assert mties.num_kept(3, 0.1) == 1
  assert mties.num_kept(3, 0.1, "reference") == 1


def test_ties_topk_rule_reference_keeps_one_more():
  # d = 5, density 0.4: "paper" keeps 2, "reference" keeps 3
  # (kthvalue(|τ|, 5 − 2 = 3) with >=).
  #   τ1 = [5, -4, 3, -2, 1]   τ2 = [1, -3, -2, 4, 0.5]
  # paper:     t1 = [5,-4,0,0,0]  t2 = [0,-3,0,4,0]
  #   Σ = [5,-7,0,4,0] -> γ = [+,-,maj,+,maj], maj = sign(1-1+1) = +
  #   mean -> [5, (-4-3)/2, 0, 4, 0] = [5, -3.5, 0, 4, 0]
  # reference: t1 = [5,-4,3,0,0]  t2 = [0,-3,-2,4,0]
  #   Σ = [5,-7,1,4,0] -> entry 2: γ = +, only 3 agrees -> 3
  #   -> [5, -3.5, 3, 4, 0]
  # θ0 = 1 everywhere.
  pre = {"w": [1, 1, 1, 1, 1]}
  taus = [{"w": [5, -4, 3, -2, 1]}, {"w": [1, -3, -2, 4, 0.5]}]
  paper = merged(pre, taus, "ties", density=0.4)
  ref = merged(pre, taus, "ties", density=0.4, topk_rule="reference")
  assert_tree_close(paper, {"w": [6.0, -2.5, 1.0, 5.0, 1.0]})
  assert_tree_close(ref, {"w": [6.0, -2.5, 4.0, 5.0, 1.0]})


def test_ties_zero_sum_takes_majority_sign():
  # density 1 (no trim), so only the sign rule matters.
  #   τ1 = [ 1, -2, -3, -1]
  #   τ2 = [-1, -1, -1,  2]
  # Σ = [0, -3, -4, 1]: γ = [0, -, -, +]; Σγ = -1 -> majority = -1.
  # entry 0 (sum exactly 0, values ±1): "majority" -> γ = - -> keeps -1;
  #   "positive" (MergeKit) -> γ = + -> keeps 1.
  # entry 1: mean(-2, -1) = -1.5; entry 2: mean(-3, -1) = -2; entry 3: 2.
  # θ0 = [0.5, 0.5, 0.5, 0.5].
  pre = {"w": [0.5, 0.5, 0.5, 0.5]}
  taus = [{"w": [1, -2, -3, -1]}, {"w": [-1, -1, -1, 2]}]
  out = merged(pre, taus, "ties", density=1.0)
  assert_tree_close(out, {"w": [-0.5, -1.0, -1.5, 2.5]})
  out = merged(pre, taus, "ties", density=1.0, zero_sign="positive")
  assert_tree_close(out, {"w": [1.5, -1.0, -1.5, 2.5]})


def test_ties_zero_sum_with_trimming():
  # The zero-sum rule applies to the *trimmed* sum, and the majority is the
  # sign of the trimmed γ summed over the whole (global) scope.
  # density 0.5, d = 4, keep 2 per task:
  #   τ1 = [ 2, -4, 0.5, -3] -> t1 = [0, -4, 0, -3]
  #   τ2 = [-1,  4, -3,   1] -> t2 = [0,  4, -3, 0]
  #   τ3 = [ 1,  1, -2,  -3] -> t3 = [0,  0, -2, -3]  (|-2| and |-3| kept)
  # Σ = [0, 0, -5, -6]; γ = [0, 0, -, -]; majority = sign(-2) = -.
  # entry 0: all trimmed values are 0 -> 0. entry 1: γ = - -> -4.
  # entry 2: mean(-3, -2) = -2.5; entry 3: mean(-3, -3) = -3.
  # With zero_sign="positive": entry 1 -> +4.
  pre = {"w": [1, 1, 1, 1]}
  taus = [{"w": [2, -4, 0.5, -3]}, {"w": [-1, 4, -3, 1]}, {"w": [1, 1, -2, -3]}]
  out = merged(pre, taus, "ties", density=0.5)
  assert_tree_close(out, {"w": [1.0, -3.0, -1.5, -2.0]})
  out = merged(pre, taus, "ties", density=0.5, zero_sign="positive")
  assert_tree_close(out, {"w": [1.0, 5.0, -1.5, -2.0]})


def test_ties_zero_majority_keeps_negative_entries():
  # If the majority itself is 0, the reference leaves γ = 0 there, and its
  # disjoint merge (keep = τ > 0 if γ > 0 else τ < 0) keeps the negatives.
  #   τ1 = [ 1,  2, -1]
  #   τ2 = [-1, -1, -1]
  # Σ = [0, 1, -2]: γ = [0, +, -]; Σγ = 0 -> majority 0.
  # entry 0 -> -1 (the negative one); entry 1 -> 2; entry 2 -> -1.
  # θ0 = [2, 2, 2].
  pre = {"w": [2, 2, 2]}
  taus = [{"w": [1, 2, -1]}, {"w": [-1, -1, -1]}]
  out = merged(pre, taus, "ties", density=1.0)
  assert_tree_close(out, {"w": [1.0, 4.0, 1.0]})
  np.testing.assert_allclose(
      ref_ties(np.array([[1.0, 2, -1], [-1, -1, -1]]), 1.0), [-1, 2, -1]
  )


def test_ties_reduce_and_count_sign():
  # density 1 (no trim), 3 tasks:
  #   τ1 = [3, -2,  1,  5]
  #   τ2 = [1, -4, -1, -1]
  #   τ3 = [2,  1, -1, -1]
  # mass: Σ = [6, -5, -1, 3] -> γ = [+, -, -, +]
  #   mean: [(3+1+2)/3, (-2-4)/2, (-1-1)/2, 5] = [2, -3, -1, 5]
  #   sum:  [6, -6, -2, 5]
  #   max:  [3, -4, -1, 5]
  # count: Σ sign = [3, -1, -1, -1] -> γ = [+, -, -, -]
  #   mean: [2, -3, -1, (-1-1)/2] = [2, -3, -1, -1]
  # θ0 = [1, 2, 3, 4].
  pre = {"w": [1, 2, 3, 4]}
  taus = [{"w": [3, -2, 1, 5]}, {"w": [1, -4, -1, -1]}, {"w": [2, 1, -1, -1]}]
  p = np.array([1.0, 2, 3, 4])
  for reduce, want in [
      ("mean", [2, -3, -1, 5]),
      ("sum", [6, -6, -2, 5]),
      ("max", [3, -4, -1, 5]),
  ]:
    out = merged(pre, taus, "ties", density=1.0, reduce=reduce)
    assert_tree_close(out, {"w": p + np.array(want)})
  out = merged(pre, taus, "ties", density=1.0, sign="count")
  assert_tree_close(out, {"w": p + np.array([2, -3, -1, -1])})


def test_ties_scope_global_vs_per_leaf():
  # Two leaves of 4, 2 tasks, density 0.5.
  #   τ1: a = [10, 9, 8, 7]     b = [ 1, 0.5, -0.25, 0.125]
  #   τ2: a = [ 1, -2, 0.5, 0]  b = [-8,   6,  0.25,     4]
  # global (keep 4 of 8 per task):
  #   t1: threshold 7 -> a whole, b nothing
  #   t2: |.| = 1,2,.5,0,8,6,.25,4 -> 4th largest = 2 -> a=[0,-2,0,0],
  #       b=[-8,6,0,4]
  #   Σ a = [10,7,8,7] (all +) -> mean a = [10, 9, 8, 7]
  #   Σ b = [-8,6,0,4] -> b = [-8, 6, 0, 4]
  # per_leaf (keep 2 of 4 per task and leaf):
  #   a: t1 = [10,9,0,0], t2 = [1,-2,0,0] -> Σ = [11,7,0,0]
  #      -> [(10+1)/2, 9, 0, 0] = [5.5, 9, 0, 0]
  #   b: t1 = [1,0.5,0,0], t2 = [-8,6,0,0] -> Σ = [-7,6.5,0,0]
  #      -> [-8, (0.5+6)/2, 0, 0] = [-8, 3.25, 0, 0]
  # θ0: a = 1, b = -1.
  pre = {"a": [1, 1, 1, 1], "b": [-1, -1, -1, -1]}
  taus = [
      {"a": [10, 9, 8, 7], "b": [1, 0.5, -0.25, 0.125]},
      {"a": [1, -2, 0.5, 0], "b": [-8, 6, 0.25, 4]},
  ]
  out = merged(pre, taus, "ties", density=0.5)
  assert_tree_close(out, {"a": [11, 10, 9, 8], "b": [-9, 5, -1, 3]})
  out = merged(pre, taus, "ties", density=0.5, scope="per_leaf")
  assert_tree_close(out, {"a": [6.5, 10, 1, 1], "b": [-9, 2.25, -1, -1]})


def test_ties_majority_sign_follows_scope():
  # density 1; the zero-sum entry a[0] takes the majority of its scope.
  #   τ1: a = [ 1, 1]  b = [-1, -1, -1]
  #   τ2: a = [-1, 1]  b = [-1, -1, -1]
  # γ: a = [0, +], b = [-, -, -].
  # global: majority = sign(1 − 3) = - -> a[0] keeps -1 -> a = [-1, 1]
  # per_leaf: a's own majority = + -> a[0] keeps 1 -> a = [1, 1]
  # b = [-1, -1, -1] in both. θ0 = 0.5 everywhere.
  pre = {"a": [0.5, 0.5], "b": [0.5, 0.5, 0.5]}
  taus = [{"a": [1, 1], "b": [-1, -1, -1]}, {"a": [-1, 1], "b": [-1, -1, -1]}]
  out = merged(pre, taus, "ties", density=1.0)
  assert_tree_close(out, {"a": [-0.5, 1.5], "b": [-0.5, -0.5, -0.5]})
  out = merged(pre, taus, "ties", density=1.0, scope="per_leaf")
  assert_tree_close(out, {"a": [1.5, 1.5], "b": [-0.5, -0.5, -0.5]})


@pytest.mark.parametrize(
    "rule,reduce,density",
    [
        ("reference", "mean", 0.2),
        ("paper", "mean", 0.3),
        ("reference", "sum", 0.5),
        ("paper", "max", 0.2),
    ],
)
def test_ties_matches_numpy_reference(rule, reduce, density):
  pre, fts, taus, pre_np = random_models(0, SHAPES, 3)
  keys = sorted(SHAPES)
  want = unflat(
      ref_ties(flat_tasks(taus, keys), density, rule, reduce), taus, keys
  )
  out = merge(
      pre,
      fts,
      "ties",
      density=density,
      topk_rule=rule,
      reduce=reduce,
      scale=0.7,
  )
  assert_tree_close(out, add_pre(pre_np, want, 0.7), rtol=1e-5, atol=1e-5)


# ============================================================================
# DARE


def test_dare_magnitude_mode_hand():
  # mode="magnitude", drop_rate 0.5: per tensor and task keep the
  # max(1, int(4·0.5)) = 2 largest |τ|, divide by 1 − 0.5.
  #   τ1 = [4,   -1, 2,    -3] -> [4, 0, 0, -3] / 0.5 = [8, 0, 0, -6]
  #   τ2 = [-0.5, 1, 0.25,  2] -> [0, 1, 0,  2] / 0.5 = [0, 2, 0,  4]
  # task arithmetic, scale 0.5: 0.5·[8, 2, 0, -2] = [4, 1, 0, -1]
  # rescale=False: 0.5·([4,0,0,-3] + [0,1,0,2]) = [2, 0.5, 0, -0.5]
  # then="ties" (density 1): Σ = [8, 2, 0, -2] -> γ = [+, +, ., -]
  #   -> [8, 2, 0, -6]; scale 0.5 -> [4, 1, 0, -3]
  # θ0 = [1, -1, 2, 0]. No key needed (deterministic).
  pre = {"w": [1, -1, 2, 0]}
  taus = [{"w": [4, -1, 2, -3]}, {"w": [-0.5, 1, 0.25, 2]}]
  p = np.array([1.0, -1, 2, 0])
  out = merged(pre, taus, "dare", drop_rate=0.5, mode="magnitude", scale=0.5)
  assert_tree_close(out, {"w": p + [4, 1, 0, -1]})
  out = merged(
      pre,
      taus,
      "dare",
      drop_rate=0.5,
      mode="magnitude",
      rescale=False,
      scale=0.5,
  )
  assert_tree_close(out, {"w": p + [2, 0.5, 0, -0.5]})
  out = merged(
      pre,
      taus,
      "dare",
      drop_rate=0.5,
      mode="magnitude",
      then="ties",
      density=1.0,
      scale=0.5,
  )
  assert_tree_close(out, {"w": p + [4, 1, 0, -3]})


def test_dare_zero_rate_is_base_method():
  # drop_rate 0 drops nothing: exactly task arithmetic, and no key needed.
  pre = {"w": [1, -1, 0.5]}
  taus = [{"w": [2, 0, -1]}, {"w": [0, 4, -1]}]
  out = merged(pre, taus, "dare", drop_rate=0.0, scale=0.5)
  assert_tree_close(out, {"w": [2.0, 1.0, -0.5]})


def test_dare_requires_key():
  pre = {"w": [1, -1, 0.5]}
  taus = [{"w": [2, 0, -1]}, {"w": [0, 4, -1]}]
  with pytest.raises(ValueError, match="key"):
    merged(pre, taus, "dare", drop_rate=0.5)


def test_dare_key_determinism():
  pre, fts, _, _ = random_models(1, DARE_SHAPES, 3)
  k0, k1 = jax.random.key(0), jax.random.key(1)
  a = merge(pre, fts, "dare", drop_rate=0.3, key=k0)
  b = merge(pre, fts, "dare", drop_rate=0.3, key=k0)
  c = merge(pre, fts, "dare", drop_rate=0.3, key=k1)
  for k in DARE_SHAPES:
    np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]))
    assert not np.allclose(np.asarray(a[k]), np.asarray(c[k]))


def test_dare_drop_fraction_rescale_and_independent_masks():
  # Two identical task vectors of ones (θ0 = 0.5, θt = 1.5), p = 0.3.
  # Each entry of each task survives with probability 0.7 and then equals
  # 1/0.7, so with independent per-task masks the summed result is
  #   0 w.p. p² = 0.09, 1/0.7 w.p. 2p(1−p) = 0.42, 2/0.7 w.p. 0.49.
  n, p = 20000, 0.3
  pre = {"w": jnp.full((n,), 0.5)}
  fts = [{"w": jnp.full((n,), 1.5)}, {"w": jnp.full((n,), 1.5)}]
  out = (
      np.asarray(
          merge(pre, fts, "dare", drop_rate=p, key=jax.random.key(3))["w"]
      )
      - 0.5
  )
  v = 1 / (1 - p)
  zero, one, two = (np.isclose(out, x, rtol=1e-5) for x in (0.0, v, 2 * v))
  assert np.all(zero | one | two)
  # Binomial(20000, q): std of a fraction ≤ 0.0036.
  assert abs(zero.mean() - p * p) < 0.02
  assert abs(one.mean() - 2 * p * (1 - p)) < 0.02
  assert abs(two.mean() - (1 - p) ** 2) < 0.02
  # rescale=False: survivors keep their value (1 per task).
  out = (
      np.asarray(
          merge(
              pre,
              fts,
              "dare",
              drop_rate=p,
              rescale=False,
              key=jax.random.key(3),
          )["w"]
      )
      - 0.5
  )
  assert set(np.round(out, 5).tolist()) == {0.0, 1.0, 2.0}
  assert abs(np.mean(out == 0.0) - p * p) < 0.02


def test_dare_then_ties_is_ties_of_the_dropped_vectors():
  # DARE-TIES = TIES applied to the DARE-dropped task vectors. The documented
  # masks: leaf i of the [T, ...] task vectors is dropped with
  # dare.drop(τ, fold_in(key, i), p) (one independent mask per task).
  shapes = DARE_SHAPES
  keys = sorted(shapes)
  pre, fts, taus, pre_np = random_models(2, shapes, 3)
  key = jax.random.key(7)
  dropped = {
      k: np.asarray(
          mdare.drop(
              jnp.asarray(taus[k], jnp.float32), jax.random.fold_in(key, i), 0.3
          ),
          np.float64,
      )
      for i, k in enumerate(keys)
  }
  # about 30 % of the entries were dropped, survivors rescaled by 1/0.7
  flat_d = flat_tasks(dropped, keys)
  flat_t = flat_tasks(taus, keys)
  kept = flat_d != 0
  np.testing.assert_allclose(flat_d[kept], flat_t[kept] / 0.7, rtol=1e-5)
  assert 0.15 < 1 - kept.mean() < 0.45
  # DARE + task arithmetic is the sum of those dropped vectors ...
  out = merge(pre, fts, "dare", drop_rate=0.3, key=key)
  assert_tree_close(
      out,
      add_pre(pre_np, {k: v.sum(0) for k, v in dropped.items()}),
      rtol=1e-5,
      atol=1e-5,
  )
  # ... and DARE + TIES is TIES (numpy reference) of them.
  want = unflat(ref_ties(flat_d, 0.5, "paper", "mean"), taus, keys)
  out = merge(
      pre, fts, "dare", drop_rate=0.3, then="ties", density=0.5, key=key
  )
  assert_tree_close(out, add_pre(pre_np, want), rtol=1e-5, atol=1e-5)


# ============================================================================
# Breadcrumbs


def test_breadcrumbs_hand():
  # density 0.4, top_remove 0.2, per row along the last axis.
  # W (2×5): n = 5 -> remove int(1.0) = 1 largest, keep next int(2.0) = 2.
  #   τ1 row 0 [5, -4, 3, -2, 1]      -> drop 5, keep -4, 3 -> [0,-4,3,0,0]
  #   τ1 row 1 [0.5, -1, 2, 0, 1.5]   -> drop 2, keep 1.5,-1 -> [0,-1,0,0,1.5]
  #   τ2 row 0 [1, 1.5, -2.5, .25, 4] -> drop 4, keep -2.5,1.5 -> [0,1.5,-2.5,0,0]
  #   τ2 row 1 zeros                  -> zeros
  # b (1-D, n = 4): remove int(0.8) = 0, keep int(1.6) = 1.
  #   τ1 [1, -3, 2, 0.5] -> [0, -3, 0, 0];  τ2 [-0.5, .25, .75, 2] -> [0,0,0,2]
  # c (scalar): untouched: τ1 = -2, τ2 = 1.5.
  # α = scale = 0.5:
  #   W: 0.5·[[0,-2.5,0.5,0,0],[0,-1,0,0,1.5]] = [[0,-1.25,.25,0,0],[0,-.5,0,0,.75]]
  #   b: 0.5·[0,-3,0,2] = [0,-1.5,0,1];  c: 0.5·(-0.5) = -0.25
  # θ0: W = 2, b = 0.5, c = 3.
  pre = {"W": [[2] * 5, [2] * 5], "b": [0.5] * 4, "c": 3.0}
  taus = [
      {
          "W": [[5, -4, 3, -2, 1], [0.5, -1, 2, 0, 1.5]],
          "b": [1, -3, 2, 0.5],
          "c": -2.0,
      },
      {
          "W": [[1, 1.5, -2.5, 0.25, 4], [0] * 5],
          "b": [-0.5, 0.25, 0.75, 2],
          "c": 1.5,
      },
  ]
  out = merged(pre, taus, "breadcrumbs", density=0.4, top_remove=0.2, scale=0.5)
  assert_tree_close(
      out,
      {
          "W": [[2, 0.75, 2.25, 2, 2], [2, 1.5, 2, 2, 2.75]],
          "b": [0.5, -1.0, 0.5, 1.5],
          "c": 2.75,
      },
  )
  # per-task α = [1, 0]: only τ1's masked vector.
  out = merged(
      pre,
      taus,
      "breadcrumbs",
      density=0.4,
      top_remove=0.2,
      scale=jnp.array([1.0, 0.0]),
  )
  assert_tree_close(
      out,
      {
          "W": [[2, -2, 5, 2, 2], [2, 1, 2, 2, 3.5]],
          "b": [0.5, -2.5, 0.5, 0.5],
          "c": 1.0,
      },
  )


def test_breadcrumbs_keeps_everything_below_the_removed_top():
  # When int(n·top_remove) + int(n·density) > n, the authors' second top-k
  # (k = int(n·density)) runs on the row with the top entries already
  # zeroed, so every non-removed entry survives (MergeKit likewise clips the
  # kept count). Row [5, -4, 3, -2, 1], density 1.0, top_remove 0.2:
  # remove 1 (the 5), keep top-5 of [0, -4, 3, -2, 1] -> [0, -4, 3, -2, 1].
  # θ0 = 1.
  pre = {"w": [1, 1, 1, 1, 1]}
  taus = [{"w": [5, -4, 3, -2, 1]}]
  out = merged(pre, taus, "breadcrumbs", density=1.0, top_remove=0.2)
  np.testing.assert_allclose(
      ref_breadcrumbs_mask(np.array([5.0, -4, 3, -2, 1]), 1.0, 0.2),
      [0, -4, 3, -2, 1],
  )
  assert_tree_close(out, {"w": [1, -3, 4, -1, 2]})


@pytest.mark.parametrize("density,top_remove", [(0.3, 0.1), (0.5, 0.0)])
def test_breadcrumbs_matches_reference(density, top_remove):
  shapes = {"a": (4, 10), "b": (10,), "c": (2, 3, 10), "s": ()}
  pre, fts, taus, pre_np = random_models(4, shapes, 3)
  lam = np.array([0.5, 1.0, 0.25])
  want = {
      k: sum(
          lam[t] * ref_breadcrumbs_mask(taus[k][t], density, top_remove)
          for t in range(3)
      )
      for k in shapes
  }
  out = merge(
      pre,
      fts,
      "breadcrumbs",
      density=density,
      top_remove=top_remove,
      scale=jnp.asarray(lam),
  )
  assert_tree_close(out, add_pre(pre_np, want), rtol=1e-5, atol=1e-5)


# ============================================================================
# Consensus (TALL masks)

# Shared fixture: 3 tasks, one leaf of 4.
#   τ1 = [1,  2, 0, -1]
#   τ2 = [1, -1, 1,  0]
#   τ3 = [1,  0, 0,  3]
#   τMTL = Σ τt = [3, 1, 1, 2]
CONS_PRE = {"w": [0.5, 0.5, 0.5, 0.5]}
CONS_TAUS = [{"w": [1, 2, 0, -1]}, {"w": [1, -1, 1, 0]}, {"w": [1, 0, 0, 3]}]


def test_consensus_hand_k():
  # TALL masks m_t = |τt| > 0.4·|τMTL − τt| (default λ = 0.4, strict):
  #   entry 0: |τMTL − τt| = 2 -> 1 > 0.8 for all three          -> count 3
  #   entry 1: τ1: 2 > 0.4·1; τ2: 1 > 0.4·2; τ3: 0 > 0.4·1 no    -> count 2
  #   entry 2: τ1: 0 > 0.4 no; τ2: 1 > 0; τ3: 0 > 0.4 no         -> count 1
  #   entry 3: τ1: 1 > 1.2 no; τ2: 0 > 0.8 no; τ3: 3 > 0.4       -> count 1
  # counts [3, 2, 1, 1]; merged = α·τMTL·[count >= k]:
  #   k=2: [3, 1, 0, 0]; k=1: [3, 1, 1, 2]; k=3: [3, 0, 0, 0]; k=0: all.
  # α = 0.5, θ0 = 0.5.
  p = np.full(4, 0.5)
  for k, keep in [
      (2, [3, 1, 0, 0]),
      (1, [3, 1, 1, 2]),
      (3, [3, 0, 0, 0]),
      (0, [3, 1, 1, 2]),
  ]:
    out = merged(CONS_PRE, CONS_TAUS, "consensus", k=k, scale=0.5)
    assert_tree_close(out, {"w": p + 0.5 * np.array(keep, float)})


def test_consensus_tall_lambda():
  p = np.full(4, 0.5)
  # λ = 1.0, k = 1:
  #   entry 0: 1 > 1·2 no (all)                   -> 0
  #   entry 1: τ1: 2 > 1 yes                      -> 1
  #   entry 2: τ2: 1 > 0 yes                      -> 1
  #   entry 3: τ3: 3 > 1 yes                      -> 1
  #   -> keep [0, 1, 1, 2] (τMTL = [3,1,1,2])
  out = merged(CONS_PRE, CONS_TAUS, "consensus", k=1, tall_lambda=1.0)
  assert_tree_close(out, {"w": p + [0, 1, 1, 2]})
  # λ = 0.5 is exactly on the boundary for entry 0 (|τt| = 1 = 0.5·2): the
  # mask is strict, so entry 0 is in no mask. Others: entry 1 τ1 (2 > 0.5),
  # entry 2 τ2 (1 > 0), entry 3 τ3 (3 > 0.5) -> k=1 keeps [0, 1, 1, 2].
  out = merged(CONS_PRE, CONS_TAUS, "consensus", k=1, tall_lambda=0.5)
  assert_tree_close(out, {"w": p + [0, 1, 1, 2]})
  # per-task λ = [0.2, 1.0, 1.0], k = 2:
  #   entry 0: τ1: 1 > 0.2·2 yes; τ2: 1 > 2 no; τ3: 1 > 2 no   -> 1
  #   entry 1: τ1: 2 > 0.2 yes; τ2: 1 > 2 no; τ3: 0 > 1 no     -> 1
  #   entry 2: τ1: 0 > 0.2 no; τ2: 1 > 0 yes; τ3: 0 > 1 no     -> 1
  #   entry 3: τ1: 1 > 0.2·3 yes; τ2: 0 > 2 no; τ3: 3 > 1 yes  -> 2
  #   -> keep only entry 3: [0, 0, 0, 2]
  out = merged(
      CONS_PRE,
      CONS_TAUS,
      "consensus",
      k=2,
      tall_lambda=jnp.array([0.2, 1.0, 1.0]),
  )
  assert_tree_close(out, {"w": p + [0, 0, 0, 2]})


def test_consensus_base_ties_hand():
  # base="ties": τMTL is the TIES vector with disjoint SUM (the authors'
  # use_ties). density 0.5 (keep 2 of 4 per task):
  #   τ1 = [ 4, -1,   2,  0.5] -> t1 = [4, 0, 2, 0]
  #   τ2 = [-1,  2,   3, 0.25] -> t2 = [0, 2, 3, 0]
  #   τ3 = [ 2,  1, -0.5,   4] -> t3 = [2, 0, 0, 4]
  #   all sums positive -> τMTL = [6, 2, 5, 4]
  # TALL masks use the raw τt against τMTL, λ = 0.4:
  #   entry 0: τ1 4 > 0.4·2; τ2 1 > 0.4·7 no; τ3 2 > 0.4·4       -> 2
  #   entry 1: τ1 1 > 0.4·3 no; τ2 2 > 0; τ3 1 > 0.4·1           -> 2
  #   entry 2: τ1 2 > 0.4·3; τ2 3 > 0.4·2; τ3 0.5 > 0.4·5.5 no   -> 2
  #   entry 3: τ1 .5 > 1.4 no; τ2 .25 > 1.5 no; τ3 4 > 0         -> 1
  # k = 2 -> [6, 2, 5, 0]; α = 0.5 -> [3, 1, 2.5, 0]; θ0 = 1.
  pre = {"w": [1, 1, 1, 1]}
  taus = [
      {"w": [4, -1, 2, 0.5]},
      {"w": [-1, 2, 3, 0.25]},
      {"w": [2, 1, -0.5, 4]},
  ]
  out = merged(pre, taus, "consensus", base="ties", density=0.5, scale=0.5)
  assert_tree_close(out, {"w": [4, 2, 3.5, 1]})


def test_consensus_matches_reference():
  pre, fts, taus, pre_np = random_models(5, SHAPES, 4)
  lam = np.array([0.2, 0.4, 0.5, 0.6])
  want = {}
  for k in SHAPES:
    tv = taus[k]
    mtl = tv.sum(0)
    masks = np.abs(tv) > lam.reshape((-1,) + (1,) * (tv.ndim - 1)) * np.abs(
        mtl[None] - tv
    )
    want[k] = mtl * (masks.sum(0) >= 2)
  out = merge(
      pre, fts, "consensus", k=2, tall_lambda=jnp.asarray(lam), scale=0.8
  )
  assert_tree_close(out, add_pre(pre_np, want, 0.8), rtol=1e-5, atol=1e-5)


# ============================================================================
# PCB


def test_pcb_hand_no_clamp():
  # ratio 0.5 on d = 4: the score threshold is the ascending-sorted score at
  # index int(4·0.5) = 2, so only each task's single best score gets weight
  # 1 (min-max of the clipped scores), the rest 0. clamp = 0: no clipping.
  #   τ1 = [2, -1, 0.5, 0.25]   τ2 = [1, 0.5, -4, 0.25]   Σ = [3,-.5,-3.5,.5]
  # task 1: minmax|τ1| = [1, .43, .14, 0] -> intra = e^{2x²} = [7.39,1.44,1.04,1]
  #   inter = tanh(τ1·Σ) = tanh([6, .5, -1.75, .125]) = [1.0, .46, -.94, .12]
  #   score ≈ [7.39, 0.67, -0.98, 0.12] -> w1 = [1, 0, 0, 0]
  # task 2: minmax|τ2| = [.2, .07, 1, 0] -> intra ≈ [1.08, 1.01, 7.39, 1]
  #   inter = tanh([3, -.25, 14, .125]) ≈ [.995, -.24, 1.0, .12]
  #   score ≈ [1.08, -0.25, 7.39, 0.12] -> w2 = [0, 0, 1, 0]
  # merged = Σ λt τt wt / max(Σ wt, 1e-12) = [λ1·2, 0, λ2·(-4), 0]
  # λ = [1, 0.5] -> [2, 0, -2, 0]; θ0 = 1 -> [3, 1, -1, 1].
  pre = {"w": [1, 1, 1, 1]}
  taus = [{"w": [2, -1, 0.5, 0.25]}, {"w": [1, 0.5, -4, 0.25]}]
  out = merged(
      pre, taus, "pcb", ratio=0.5, clamp=0.0, scale=jnp.array([1.0, 0.5])
  )
  assert_tree_close(out, {"w": [3, 1, -1, 1]})


def test_pcb_hand_clamped():
  # Same τ, clamp 0.25: |τ| is clipped to [sorted[int(4·.25)=1],
  # sorted[int(4·.75 − 1)=2]] per task.
  # task 1: |τ1| sorted [.25,.5,1,2] -> A1 = clip([2,1,.5,.25], .5, 1)
  #   = [1, 1, .5, .5]; minmax = [1,1,0,0] -> intra = [e², e², 1, 1]
  #   inter = tanh([6, .5, -1.75, .125]) -> score ≈ [7.39, 3.41, -.94, .12]
  #   -> w1 = [1, 0, 0, 0]
  # task 2: |τ2| sorted [.25,.5,1,4] -> A2 = [1, .5, 1, .5] -> intra
  #   [e², 1, e², 1]; inter = tanh([3, -.25, 14, .125])
  #   -> score ≈ [7.352, -.24, 7.389, .12] -> w2 = [0, 0, 1, 0]
  # merged uses the clamped values sign(τ)·A: [1·1, 0, -1·1, 0] = [1,0,-1,0]
  # θ0 = 1 -> [2, 1, 0, 1].
  pre = {"w": [1, 1, 1, 1]}
  taus = [{"w": [2, -1, 0.5, 0.25]}, {"w": [1, 0.5, -4, 0.25]}]
  out = merged(pre, taus, "pcb", ratio=0.5, clamp=0.25)
  assert_tree_close(out, {"w": [2, 1, 0, 1]})
  np.testing.assert_allclose(
      ref_pcb(
          np.array([[2, -1, 0.5, 0.25], [1, 0.5, -4, 0.25]]), 0.5, 0.25, [1, 1]
      ),
      [1, 0, -1, 0],
      atol=1e-12,
  )


@pytest.mark.parametrize("ratio,clamp", [(0.1, 0.01), (0.3, 1e-4)])
def test_pcb_matches_reference(ratio, clamp):
  pre, fts, taus, pre_np = random_models(6, SHAPES, 3, tau_scale=0.5)
  keys = sorted(SHAPES)
  lam = np.array([1.2, 0.8, 1.0])
  want = unflat(ref_pcb(flat_tasks(taus, keys), ratio, clamp, lam), taus, keys)
  out = merge(pre, fts, "pcb", ratio=ratio, clamp=clamp, scale=jnp.asarray(lam))
  assert_tree_close(out, add_pre(pre_np, want), rtol=1e-5, atol=1e-5)


# ============================================================================
# LiNeS

# Blocks layers_0..layers_2 (L = 3) inside "encoder", plus "embed" and
# "head" outside the blocks. 2 tasks; θ0 = 1 everywhere.
LINES_PRE = {
    "embed": [1, 1],
    "head": [1, 1],
    "encoder": {
        "layers_0": {"w": [1, 1]},
        "layers_1": {"w": [1, 1]},
        "layers_2": {"w": [1, 1]},
    },
}
LINES_TAUS = [
    {
        "embed": [2, -2],
        "head": [1, 1],
        "encoder": {
            "layers_0": {"w": [2, 0]},
            "layers_1": {"w": [4, 4]},
            "layers_2": {"w": [-2, 2]},
        },
    },
    {
        "embed": [2, 2],
        "head": [1, -1],
        "encoder": {
            "layers_0": {"w": [2, 2]},
            "layers_1": {"w": [0, -4]},
            "layers_2": {"w": [2, 2]},
        },
    },
]


def _lines_expected(blocks, outside):
  return {
      "embed": outside[0],
      "head": outside[1],
      "encoder": {f"layers_{i}": {"w": b} for i, b in enumerate(blocks)},
  }


def test_lines_auto_alpha_task_arithmetic():
  # Σ τ: embed [4,0], head [2,0], l0 [4,2], l1 [4,0], l2 [0,4].
  # alpha=None -> α = (‖Στ‖₁/‖τ_TA‖₁)/T = 1/2. β = 0.5, L = 3:
  #   l0: 0.5, l1: 0.5 + 0.5·1/2 = 0.75, l2: 0.5 + 0.5 = 1.0; embed/head 0.5
  # merged: embed [2,0], head [1,0], l0 [2,1], l1 [3,0], l2 [0,4]; + θ0 = 1.
  out = merged(LINES_PRE, LINES_TAUS, "lines", beta=0.5)
  assert_tree_close(
      out, _lines_expected([[3, 2], [4, 1], [1, 5]], [[3, 1], [2, 1]])
  )


def test_lines_explicit_alpha_and_num_blocks():
  # α = 0.2, β = 0.6: l0 0.2, l1 0.5, l2 0.8, embed/head 0.2.
  #   embed 0.2·[4,0] = [.8,0]; head [.4,0]; l0 .2·[4,2] = [.8,.4];
  #   l1 .5·[4,0] = [2,0]; l2 .8·[0,4] = [0,3.2]
  out = merged(LINES_PRE, LINES_TAUS, "lines", alpha=0.2, beta=0.6)
  assert_tree_close(
      out, _lines_expected([[1.8, 1.4], [3, 1], [1, 4.2]], [[1.8, 1], [1.4, 1]])
  )
  # num_blocks=5 (L − 1 = 4), α auto = 0.5, β = 0.5:
  #   l0 0.5, l1 0.625, l2 0.75 -> l1 [2.5, 0], l2 [0, 3]
  out = merged(LINES_PRE, LINES_TAUS, "lines", beta=0.5, num_blocks=5)
  assert_tree_close(
      out, _lines_expected([[3, 2], [3.5, 1], [1, 4]], [[3, 1], [2, 1]])
  )
  # beta = 0 and alpha = 1 is plain task arithmetic.
  out = merged(LINES_PRE, LINES_TAUS, "lines", alpha=1.0, beta=0.0)
  ta = merged(LINES_PRE, LINES_TAUS, "task_arithmetic")
  assert_tree_close(out, ta)


def test_lines_auto_alpha_ties():
  # base TIES (density 1, mean). Σ signs: embed [+,0], head [+,0],
  # l0 [+,+], l1 [+,0], l2 [0,+] -> majority + fills the zeros.
  # TIES vector: embed [2,2], head [1,1], l0 [2,2], l1 [4,4], l2 [2,2]
  #   ‖τ_TIES‖₁ = 4+2+4+8+4 = 22;  ‖Στ‖₁ = 4+2+6+4+4 = 20
  # α = 20/22/2 = 5/11; β = 0.5:
  #   embed (5/11)·[2,2] = [10/11]·2; head [5/11]·2; l0 [10/11]·2
  #   l1 (5/11 + 1/4)·4 = 31/11; l2 (5/11 + 1/2)·2 = 21/11
  a = 5 / 11
  out = merged(
      LINES_PRE, LINES_TAUS, "lines", beta=0.5, base="ties", density=1.0
  )
  assert_tree_close(
      out,
      _lines_expected(
          [[1 + 2 * a] * 2, [1 + 31 / 11] * 2, [1 + 21 / 11] * 2],
          [[1 + 2 * a] * 2, [1 + a] * 2],
      ),
      rtol=1e-6,
  )


def test_scale_by_depth_and_depth_names():
  # α = 0.5, β = 1, L = 4: layers_ℓ gets 0.5 + ℓ/3; "proj" gets α.
  tv = {f"layers_{i}": jnp.ones(2) for i in range(4)}
  tv["proj"] = jnp.ones(2)
  out = mlines.scale_by_depth(tv, 0.5, 1.0)
  for i in range(4):
    np.testing.assert_allclose(out[f"layers_{i}"], 0.5 + i / 3, rtol=1e-6)
  np.testing.assert_allclose(out["proj"], 0.5)
  # num_blocks overrides L (here L − 1 = 7).
  out = mlines.scale_by_depth(tv, 0.0, 1.0, num_blocks=8)
  np.testing.assert_allclose(out["layers_3"], 3 / 7, rtol=1e-6)
  with pytest.raises(ValueError):
    mlines.scale_by_depth(tv, 0.0, 1.0, num_blocks=3)
  # the single-task editing setting: α = c, β = 1 − c keeps the last block.
  out = mlines.scale_by_depth(tv, 0.3, 0.7)
  np.testing.assert_allclose(out["layers_3"], 1.0, rtol=1e-6)
  np.testing.assert_allclose(out["layers_0"], 0.3, rtol=1e-6)
  # common block names
  d = mlines.default_depth_fn
  assert d("encoder/layers_3/mlp/kernel") == 3
  assert d("transformer.resblocks.11.attn.in_proj_weight") == 11
  assert d("model.layers.7.self_attn.q_proj.weight") == 7
  assert d("blocks/2/attn") == 2
  assert d("transformer.h.5.mlp") == 5
  assert d("encoder/layer.4/out") == 4
  assert d("embed/embedding") is None
  assert d("visual.ln_post.weight") is None


# ============================================================================
# Model Stock


def test_model_stock_hand_two_models():
  # a: τ1 = [1, 0], τ2 = [3, 4]: cos = 3/5 -> t = 2·0.6/(1 + 0.6) = 0.75
  #    θ = t·mean(θi) + (1−t)·θ0 = θ0 + 0.75·[2, 2] = [1, -1] + [1.5, 1.5]
  # b: τ1 = [2, 0, 0], τ2 = [0, 0, 5]: cos = 0 -> t = 0 -> θ0
  pre = {"a": [1, -1], "b": [0.5, 0.5, 0.5]}
  taus = [{"a": [1, 0], "b": [2, 0, 0]}, {"a": [3, 4], "b": [0, 0, 5]}]
  out = merged(pre, taus, "model_stock")
  assert_tree_close(out, {"a": [2.5, 0.5], "b": [0.5, 0.5, 0.5]})
  out = merged(pre, taus, "model_stock", average="angle")  # same for k = 2
  assert_tree_close(out, {"a": [2.5, 0.5], "b": [0.5, 0.5, 0.5]})


def test_model_stock_cosine_vs_angle_three_models():
  # τ1 = [1,0], τ2 = [0,1], τ3 = [1,1]; mean τ = [2/3, 2/3].
  # pairwise cos: 0, 1/√2, 1/√2; angles 90°, 45°, 45°.
  # "cosine" (MergeKit): cos = √2/3 -> t = 3c/(1+2c) = 9√2 − 12 ≈ 0.72792
  #   -> t·2/3 = 6√2 − 8 ≈ 0.485281
  # "angle" (FusionBench): mean angle 60° -> cos = 0.5 -> t = 1.5/2 = 0.75
  #   -> 0.75·2/3 = 0.5
  # θ0 = [1, 1].
  pre = {"w": [1, 1]}
  taus = [{"w": [1, 0]}, {"w": [0, 1]}, {"w": [1, 1]}]
  out = merged(pre, taus, "model_stock")
  c = 1 + 6 * math.sqrt(2) - 8
  assert_tree_close(out, {"w": [c, c]}, rtol=1e-6)
  out = merged(pre, taus, "model_stock", average="angle")
  assert_tree_close(out, {"w": [1.5, 1.5]}, rtol=1e-6)


@pytest.mark.parametrize("average", ["cosine", "angle"])
def test_model_stock_matches_reference(average):
  pre, fts, _, pre_np = random_models(7, SHAPES, 3)
  ref = ref_stock_mergekit if average == "cosine" else ref_stock_fusionbench
  want = {
      k: ref(
          pre_np[k].astype(np.float64),
          [np.asarray(f[k], np.float64) for f in fts],
      )
      for k in SHAPES
  }
  out = merge(pre, fts, "model_stock", average=average)
  assert_tree_close(out, want, rtol=1e-5, atol=1e-5)


# ============================================================================
# SLERP


def test_slerp_hand():
  pre = {"w": _arr([0.5, -0.5])}
  s = math.sqrt(0.5)
  # θ1 = [2, 0], θ2 = [0, 4]: 90° apart; t = 0.5 -> s0 = s1 = sin 45° = √½
  #   -> [2√½, 4√½] = [1.41421, 2.82843] (unnormalised tensors)
  fts = [{"w": _arr([2, 0])}, {"w": _arr([0, 4])}]
  assert_tree_close(merge(pre, fts, "slerp"), {"w": [2 * s, 4 * s]})
  # scale 0.5: θ0 + 0.5·(slerp − θ0) = [0.5 + 0.5·0.91421, -0.5 + 0.5·3.32843]
  assert_tree_close(
      merge(pre, fts, "slerp", scale=0.5),
      {"w": [0.5 + 0.5 * (2 * s - 0.5), -0.5 + 0.5 * (4 * s + 0.5)]},
  )
  # t = 0.25: s0 = sin 67.5° = 0.92388, s1 = sin 22.5° = 0.38268
  #   -> [1.84776, 1.53073];  t = 0 / 1 give the endpoints.
  c, d = math.sin(3 * math.pi / 8), math.sin(math.pi / 8)
  assert_tree_close(
      merge(pre, fts, "slerp", t=0.25), {"w": [2 * c, 4 * d]}, rtol=1e-6
  )
  assert_tree_close(merge(pre, fts, "slerp", t=0.0), {"w": [2, 0]})
  assert_tree_close(merge(pre, fts, "slerp", t=1.0), {"w": [0, 4]})
  # parallel tensors -> |cos| > 0.9995 -> linear: [1,2], [2,4] -> [1.5, 3]
  fts = [{"w": _arr([1, 2])}, {"w": _arr([2, 4])}]
  assert_tree_close(merge(pre, fts, "slerp"), {"w": [1.5, 3]})
  # antiparallel -> linear too: [1,0], [-3,0] -> [-1, 0]
  fts = [{"w": _arr([1, 0])}, {"w": _arr([-3, 0])}]
  assert_tree_close(merge(pre, fts, "slerp"), {"w": [-1, 0]})
  # space="task_vectors": θ0 = [1,1], τ1 = [2,0], τ2 = [0,2]
  #   -> slerp(τ) = [√2, √2] -> [2.41421, 2.41421]
  out = merged(
      {"w": [1, 1]},
      [{"w": [2, 0]}, {"w": [0, 2]}],
      "slerp",
      space="task_vectors",
  )
  assert_tree_close(out, {"w": [1 + 2 * s, 1 + 2 * s]})


def test_slerp_matches_reference():
  pre, fts, _, pre_np = random_models(8, SHAPES, 2)
  for t in (0.3, 0.5):
    want = {
        k: ref_slerp(
            t,
            np.asarray(fts[0][k], np.float64),
            np.asarray(fts[1][k], np.float64),
        )
        for k in SHAPES
    }
    assert_tree_close(merge(pre, fts, "slerp", t=t), want, rtol=1e-5, atol=1e-5)


def test_slerp_needs_two_models():
  pre, fts, _, _ = random_models(8, {"w": (3,)}, 3)
  with pytest.raises(ValueError):
    merge(pre, fts, "slerp")


# ============================================================================
# Fisher


def test_fisher_hand():
  # w: τ1 = [2, 4], τ2 = [6, 0]; F1 = [1, 3], F2 = [3, 1]
  #   entry 0: (1·2 + 3·6)/4 = 5;  entry 1: (3·4 + 1·0)/4 = 3
  #   (ε = 1e-6 is negligible here.)
  # z: F = 0 for both -> ε/2ε weights -> plain mean of [4, -2] = 1
  # b: no Fisher given -> averaged: mean(1, 3) = 2
  # θ0: w = [1, -1], z = 0.5, b = 0
  pre = {"w": [1, -1], "z": [0.5], "b": [0.0]}
  taus = [{"w": [2, 4], "z": [4], "b": [1]}, {"w": [6, 0], "z": [-2], "b": [3]}]
  fis = [
      {"w": _arr([1, 3]), "z": _arr([0])},
      {"w": _arr([3, 1]), "z": _arr([0])},
  ]
  out = merged(pre, taus, "fisher", fishers=fis)
  assert_tree_close(out, {"w": [6, 2], "z": [1.5], "b": [2]}, rtol=1e-5)
  # model weights [1, 3]: w entry 0: (1·1·2 + 3·3·6)/(1 + 9) = 5.6;
  #   entry 1: (1·3·4 + 3·1·0)/(3 + 3) = 2;  z: (4 − 6)/4 = -0.5;
  #   b: (1 + 9)/4 = 2.5
  out = merged(pre, taus, "fisher", fishers=fis, weights=[1.0, 3.0])
  assert_tree_close(
      out, {"w": [6.6, 1], "z": [0.0], "b": [2.5]}, rtol=1e-5, atol=1e-6
  )


def test_fisher_matches_reference():
  pre, fts, _, pre_np = random_models(9, SHAPES, 3)
  rng = np.random.default_rng(10)
  fis = [
      {k: rng.exponential(size=s).astype(np.float32) for k, s in SHAPES.items()}
      for _ in range(3)
  ]
  w = np.array([0.5, 1.0, 2.0])
  want = {}
  for k in SHAPES:  # Σ wi (Fi + ε) θi / Σ wi (Fi + ε), on the raw params
    num = sum(
        w[i] * (fis[i][k] + 1e-6) * np.asarray(fts[i][k], np.float64)
        for i in range(3)
    )
    den = sum(w[i] * (fis[i][k] + 1e-6) for i in range(3))
    want[k] = num / den
  fis_j = [{k: jnp.asarray(v) for k, v in f.items()} for f in fis]
  out = merge(pre, fts, "fisher", fishers=fis_j, weights=list(w))
  assert_tree_close(out, want, rtol=1e-5, atol=1e-5)


# ============================================================================
# RegMean


def test_regmean_hand():
  # kernel W (y = x @ W, [d_in, d_out]), α = 0.5 scales off-diagonals:
  #   G1 = [[2,2],[2,2]] -> G̃1 = [[2,1],[1,2]];  G2 = [[1,0],[0,3]] = G̃2
  #   ΣG̃ = [[3,1],[1,5]], det 14, inverse (1/14)[[5,-1],[-1,3]]
  #   τ1 = [[2,0],[0,2]] -> G̃1τ1 = [[4,2],[2,4]]
  #   τ2 = [[1,1],[1,1]] -> G̃2τ2 = [[1,1],[3,3]];  Σ = [[5,3],[5,7]]
  #   W* = (1/14)[[25−5, 15−7],[−5+15, −3+21]] = [[10/7, 4/7],[5/7, 9/7]]
  # bias (no Gram): mean([1, -1], [3, 1]) = [2, 0]
  # θ0: kernel = 1, bias = [0.5, 0.5]
  pre = {"dense": {"kernel": [[1, 1], [1, 1]], "bias": [0.5, 0.5]}}
  taus = [
      {"dense": {"kernel": [[2, 0], [0, 2]], "bias": [1, -1]}},
      {"dense": {"kernel": [[1, 1], [1, 1]], "bias": [3, 1]}},
  ]
  grams = [
      {"dense/kernel": _arr([[2, 2], [2, 2]])},
      {"dense/kernel": _arr([[1, 0], [0, 3]])},
  ]
  out = merged(pre, taus, "regmean", grams=grams, alpha=0.5)
  want = {
      "dense": {
          "kernel": [[1 + 10 / 7, 1 + 4 / 7], [1 + 5 / 7, 1 + 9 / 7]],
          "bias": [2.5, 0.5],
      }
  }
  assert_tree_close(out, want, rtol=1e-6)
  # layout="out_in" (PyTorch weights, y = x @ Wᵀ): transposed in and out.
  tr = lambda t: {
      "dense": {
          "kernel": np.asarray(t["dense"]["kernel"], np.float32).T.tolist(),
          "bias": t["dense"]["bias"],
      }
  }
  out = merged(
      tr(pre),
      [tr(t) for t in taus],
      "regmean",
      grams=grams,
      alpha=0.5,
      layout="out_in",
  )
  want["dense"]["kernel"] = np.asarray(want["dense"]["kernel"]).T
  assert_tree_close(out, want, rtol=1e-6)
  # α = 1: plain Grams. G1 + G2 = [[3,2],[2,5]] (det 11), Σ GiWi =
  #   [[4,4],[4,4]] + [[1,1],[3,3]] = [[5,5],[7,7]] ->
  #   (1/11)[[5,-2],[-2,3]]·[[5,5],[7,7]] = (1/11)[[11,11],[11,11]] = 1
  out = merged(pre, taus, "regmean", grams=grams, alpha=1.0)
  assert_tree_close(out["dense"]["kernel"], [[2, 2], [2, 2]], rtol=1e-6)


def test_regmean_matches_reference():
  shapes = {"k1": (4, 3), "k2": (3, 5), "bias": (5,)}
  pre, fts, taus, pre_np = random_models(11, shapes, 3)
  rng = np.random.default_rng(12)
  grams = []
  for _ in range(3):
    g = {}
    for name in ("k1", "k2"):
      x = rng.normal(size=(16, shapes[name][0]))
      g[name] = (x.T @ x / 16).astype(np.float32)
    grams.append(g)
  alpha = 0.9
  want = {"bias": taus["bias"].mean(0)}
  for name in ("k1", "k2"):
    gs = []
    for g in grams:
      gg = g[name].astype(np.float64)
      gg = gg * alpha + np.diag(np.diag(gg)) * (1 - alpha)  # off-diag × α
      gs.append(gg)
    rhs = sum(gg @ taus[name][i] for i, gg in enumerate(gs))
    want[name] = np.linalg.solve(sum(gs), rhs)
  grams_j = [{k: jnp.asarray(v) for k, v in g.items()} for g in grams]
  out = merge(pre, fts, "regmean", grams=grams_j, alpha=alpha)
  assert_tree_close(out, add_pre(pre_np, want), rtol=1e-4, atol=1e-5)


# ============================================================================
# ComPEFT


def test_compeft_hand():
  # density 0.4 over d = 5 (keep int(2) per task, ties kept), α = 0.5.
  #   τ1 = [4, 0, 1, 2, -2]: mean 1, deviations [3,-1,0,1,-3], Σ² = 20,
  #        unbiased var 20/4 = 5 -> σ1 = √5. Top |τ1|: 4, then 2 and -2 tie
  #        -> mask [1,0,0,1,1] -> α·√5·[1, 0, 0, 1, -1]
  #   τ2 = [5, 0, 0, 0, 0]:  mean 1, deviations [4,-1,-1,-1,-1], Σ² = 20,
  #        σ2 = √5. Top 2: 5 then 0 (tied zeros are "kept" but sign 0)
  #        -> α·√5·[1, 0, 0, 0, 0]
  # sum: √5/2·[2, 0, 0, 1, -1] = [2.236068, 0, 0, 1.118034, -1.118034]
  # θ0 = 1.
  h = math.sqrt(5) / 2
  pre = {"w": [1, 1, 1, 1, 1]}
  taus = [{"w": [4, 0, 1, 2, -2]}, {"w": [5, 0, 0, 0, 0]}]
  out = merged(pre, taus, "compeft", density=0.4, alpha=0.5)
  assert_tree_close(out, {"w": [1 + 2 * h, 1, 1, 1 + h, 1 - h]}, rtol=1e-6)
  # per-task scale [1, 0]: only τ1's ternary vector.
  out = merged(
      pre, taus, "compeft", density=0.4, alpha=0.5, scale=jnp.array([1.0, 0.0])
  )
  assert_tree_close(out, {"w": [1 + h, 1, 1, 1 + h, 1 - h]}, rtol=1e-6)


@pytest.mark.parametrize("rule", ["paper", "reference"])
def test_compeft_matches_reference(rule):
  pre, fts, taus, pre_np = random_models(13, SHAPES, 3)
  keys = sorted(SHAPES)
  flat = flat_tasks(taus, keys)
  want = unflat(ref_compeft(flat, 0.2, 1.5, rule).sum(0) * 0.5, taus, keys)
  out = merge(
      pre, fts, "compeft", density=0.2, alpha=1.5, topk_rule=rule, scale=0.5
  )
  assert_tree_close(out, add_pre(pre_np, want), rtol=1e-5, atol=1e-5)


def test_compeft_std_of_task_vector_with_nonzero_mean():
  # σ must be the unbiased std of the dense τ (jnp.std(τ, ddof=1)) whatever
  # its mean. Here τ = 3 + 0.01·noise (d = 4096): a float32 two-pass std is
  # accurate to ~1e-6, so the ternary magnitude must match to 1e-4.
  rng = np.random.default_rng(16)
  tau = (3.0 + 0.01 * rng.normal(size=4096)).astype(np.float32)
  sigma = np.std(tau.astype(np.float64), ddof=1)
  out = merge(
      {"w": jnp.zeros(4096)}, [{"w": jnp.asarray(tau)}], "compeft", density=0.5
  )
  mags = np.unique(np.abs(np.asarray(out["w"], np.float64)))
  mags = mags[mags > 0]
  np.testing.assert_allclose(mags, sigma, rtol=1e-4)


# ============================================================================
# TSV-M


def test_tsvm_hand():
  # w (2×2), T = 2 -> k = 2 // 2 = 1 triplet per task:
  #   τ1 = diag(3, 1): top triplet (3, e1, e1)
  #   τ2 = diag(0, 2): top triplet (2, e2, e2)
  #   U = [e1 e2], V = [e1 e2] already orthonormal -> diag(3, 2)
  #   (τ1's σ = 1 is dropped; task arithmetic would give diag(3, 3)).
  # bias (1-D): mean([1, 2], [3, -2]) = [2, 0].
  # θ0: w = [[1,2],[3,4]], bias = 0.5.
  pre = {"w": [[1, 2], [3, 4]], "bias": [0.5, 0.5]}
  taus = [
      {"w": [[3, 0], [0, 1]], "bias": [1, 2]},
      {"w": [[0, 0], [0, 2]], "bias": [3, -2]},
  ]
  out = merged(pre, taus, "tsvm")
  assert_tree_close(out, {"w": [[4, 2], [3, 6]], "bias": [2.5, 0.5]}, atol=1e-5)
  # 3×3, T = 2 -> k = 1, one zero slot: τ1 = diag(3, 1, 0.5) keeps (3, e1),
  # τ2 = diag(0, 0, 2) keeps (2, e3) -> diag(3, 0, 2); scale 0.5.
  pre = {"w": [[0] * 3] * 3}
  taus = [
      {"w": [[3, 0, 0], [0, 1, 0], [0, 0, 0.5]]},
      {"w": [[0, 0, 0], [0, 0, 0], [0, 0, 2]]},
  ]
  out = merged(pre, taus, "tsvm", scale=0.5)
  assert_tree_close(out, {"w": [[1.5, 0, 0], [0, 0, 0], [0, 0, 1]]}, atol=1e-5)
  # T = 1: TSV-M returns the task vector itself.
  rng = np.random.default_rng(0)
  tau = rng.normal(size=(4, 3)).astype(np.float32)
  out = merged({"w": np.zeros((4, 3))}, [{"w": tau}], "tsvm")
  assert_tree_close(out, {"w": tau}, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("num_tasks", [2, 3])
def test_tsvm_matches_reference(num_tasks):
  pre, fts, taus, pre_np = random_models(14, SVD_SHAPES, num_tasks)
  want = {
      "bias": taus["bias"].mean(0),
      "w": ref_tsvm_matrix(taus["w"]),
      "x": ref_tsvm_matrix(taus["x"]),
  }
  out = merge(pre, fts, "tsvm", scale=0.8)
  assert_tree_close(out, add_pre(pre_np, want, 0.8), rtol=1e-4, atol=1e-4)


# ============================================================================
# ISO-C


def test_iso_c_hand():
  # w (3×2): Σ τ = [[2,0],[0,0],[0,0]] + [[-6,0],[0,0],[0,2]]
  #             = [[-4,0],[0,0],[0,2]]  -> S = [4, 2], mean 3
  #   U Vᵀ = [[-1,0],[0,0],[0,1]] -> 3·U Vᵀ = [[-3,0],[0,0],[0,3]]
  # bias (1-D): the MEAN of [1, -1] and [3, 1] = [2, 0] (not the sum)
  # scale 0.5; θ0: w = 1, bias = [0, 1]
  #   w = [[1-1.5, 1],[1, 1],[1, 1+1.5]], bias = [1, 1]
  pre = {"w": [[1, 1], [1, 1], [1, 1]], "bias": [0, 1]}
  taus = [
      {"w": [[2, 0], [0, 0], [0, 0]], "bias": [1, -1]},
      {"w": [[-6, 0], [0, 0], [0, 2]], "bias": [3, 1]},
  ]
  out = merged(pre, taus, "iso_c", scale=0.5)
  assert_tree_close(
      out, {"w": [[-0.5, 1], [1, 1], [1, 2.5]], "bias": [1, 1]}, atol=1e-5
  )


def test_iso_c_matches_reference():
  pre, fts, taus, pre_np = random_models(15, SVD_SHAPES, 3)
  want = {
      "bias": taus["bias"].mean(0),
      "w": ref_iso_matrix(taus["w"]),
      "x": ref_iso_matrix(taus["x"]),
  }
  out = merge(pre, fts, "iso_c", scale=1.3)
  assert_tree_close(out, add_pre(pre_np, want, 1.3), rtol=1e-4, atol=1e-4)


# ============================================================================
# Merger.combine on stacked task vectors, and vmapped sweeps.


def _combine_configs(shapes, num_tasks):
  rng = np.random.default_rng(20)
  fis = [
      {
          k: jnp.asarray(rng.exponential(size=s).astype(np.float32))
          for k, s in shapes.items()
      }
      for _ in range(num_tasks)
  ]
  grams = []
  for _ in range(num_tasks):
    x = rng.normal(size=(8, shapes["a"][0]))
    grams.append({"a": jnp.asarray((x.T @ x / 8).astype(np.float32))})
  return {
      "average": {},
      "weighted_average": {"weights": [1.0, 2.0, 3.0]},
      "task_arithmetic": {},
      "ties": {"density": 0.4},
      "dare": {"drop_rate": 0.3},
      "breadcrumbs": {"density": 0.5, "top_remove": 0.1},
      "consensus": {"tall_lambda": 0.3},
      "pcb": {"ratio": 0.3, "clamp": 0.05},
      "lines": {"beta": 0.3},
      "model_stock": {},
      "slerp": {"t": 0.3},
      "fisher": {"fishers": fis},
      "regmean": {"grams": grams},
      "compeft": {"density": 0.3},
      "tsvm": {},
      "iso_c": {},
  }


def test_every_method_is_covered():
  assert set(_combine_configs(SHAPES, 3)) == set(mtx.merging.METHODS)


@pytest.mark.parametrize("name", sorted(mtx.merging.METHODS))
def test_combine_equals_merge_minus_pretrained(name):
  num_tasks = 2 if name == "slerp" else 3
  shapes = DARE_SHAPES
  pre, fts, taus, pre_np = random_models(21, shapes, num_tasks)
  hp = _combine_configs(shapes, num_tasks)[name]
  key = jax.random.key(5) if name == "dare" else None
  stacked = mtree.stack(
      [
          {k: jnp.asarray(taus[k][t], jnp.float32) for k in shapes}
          for t in range(num_tasks)
      ]
  )
  merger = mtx.merging.get(name, **hp)
  # combine is pure and jittable once the statistics are prepared.
  stats = merger.prepare(stacked, key=key)
  combine = jax.jit(
      lambda tvs, st, k, p: merger.combine(
          tvs, st, scale=0.7, key=k, pretrained=p
      )
  )
  tv = combine(stacked, stats, key, pre)
  out = merge(pre, fts, name, scale=0.7, key=key, **hp)
  want = {k: np.asarray(out[k], np.float64) - pre_np[k] for k in shapes}
  assert_tree_close(tv, want, rtol=1e-5, atol=2e-6)


def test_vmapped_scale_sweep_matches_per_scale_calls():
  pre, fts, taus, pre_np = random_models(22, SHAPES, 3)
  stacked = mtree.stack(
      [
          {k: jnp.asarray(taus[k][t], jnp.float32) for k in SHAPES}
          for t in range(3)
      ]
  )
  scales = jnp.array([0.1, 0.3, 0.5, 1.0])
  merger = mtx.merging.get("ties", density=0.3)
  stats = merger.prepare(stacked)
  sweep = jax.jit(jax.vmap(merger.combine, in_axes=(None, None)))(
      stacked, stats, scale=scales
  )
  for i, s in enumerate(scales.tolist()):
    one = merge(pre, fts, "ties", density=0.3, scale=s)
    want = {k: np.asarray(one[k], np.float64) - pre_np[k] for k in SHAPES}
    assert_tree_close(
        {k: sweep[k][i] for k in SHAPES}, want, rtol=1e-5, atol=2e-6
    )
  # per-task λ vectors [S, T] (task arithmetic, PCB): vmapped over the rows.
  lams = jnp.array([[0.2, 0.4, 0.6], [1.0, 0.5, 0.0]])
  for name, hp in [
      ("task_arithmetic", {}),
      ("pcb", {"ratio": 0.2, "clamp": 0.01}),
  ]:
    merger = mtx.merging.get(name, **hp)
    stats = merger.prepare(stacked)
    sweep = jax.jit(jax.vmap(merger.combine, in_axes=(None, None)))(
        stacked, stats, scale=lams
    )
    for i in range(lams.shape[0]):
      one = merge(pre, fts, name, scale=lams[i], **hp)
      want = {k: np.asarray(one[k], np.float64) - pre_np[k] for k in SHAPES}
      assert_tree_close(
          {k: sweep[k][i] for k in SHAPES}, want, rtol=1e-5, atol=2e-6
      )


def test_tsvm_large_leaves_factorised_task_by_task_in_prepare(monkeypatch):
  # Leaves above _PRECOMPUTE_ENTRIES get their per-task SVDs in prepare (one
  # task per dispatch); the result must equal the in-kernel path.
  from mtx.merging import tsvm as tsvm_mod

  rng = np.random.default_rng(31)
  pre = {
      "w": jnp.asarray(rng.normal(size=(12, 9)), jnp.float32),
      "b": jnp.zeros(9),
  }
  fts = [
      jax.tree.map(
          lambda x: x + jnp.asarray(rng.normal(size=x.shape), jnp.float32), pre
      )
      for _ in range(3)
  ]
  want = mtx.merging.merge(pre, fts, "tsvm")
  monkeypatch.setattr(tsvm_mod, "_PRECOMPUTE_ENTRIES", 100)
  merger = mtx.merging.get("tsvm")
  stacked = mtx.tree.stack([mtx.task_vectors.task_vector(pre, f) for f in fts])
  stats = merger.prepare(stacked)
  paths = mtx.tree.paths(stacked)
  assert stats.leaf[paths.index("w")] is not None  # precomputed
  assert stats.leaf[paths.index("b")] is None
  got = mtx.merging.merge(pre, fts, "tsvm")
  np.testing.assert_allclose(got["w"], want["w"], rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(got["b"], want["b"], rtol=1e-6)
  tv = merger.combine(stacked, stats)
  np.testing.assert_allclose(
      tv["w"], want["w"] - pre["w"], rtol=1e-4, atol=1e-5
  )


def test_dare_l1_rescale_keeps_the_l1_norm_of_each_tensor():
  # rescale="l1": each task's surviving entries of a tensor are scaled so
  # that the tensor keeps its L1 norm (MergeKit), not divided by 1 − p.
  k = jax.random.split(jax.random.key(0), 2)
  pre = {"a": jnp.zeros((50, 40)), "b": jnp.zeros((300,))}
  tau = {
      "a": jax.random.normal(k[0], (50, 40)),
      "b": jax.random.uniform(k[1], (300,)) ** 3,
  }
  out = merge(
      pre, [tau], "dare", drop_rate=0.6, rescale="l1", key=jax.random.key(4)
  )
  for p in ("a", "b"):
    got, want = np.asarray(out[p]), np.asarray(tau[p])
    np.testing.assert_allclose(
        np.abs(got).sum(), np.abs(want).sum(), rtol=1e-5, err_msg=p
    )
    kept = got != 0
    assert 0.3 < kept.mean() < 0.5  # about 40% survive
    ratio = got[kept] / want[kept]  # one common factor per tensor ...
    np.testing.assert_allclose(ratio, ratio[0], rtol=1e-5)
    assert not np.isclose(ratio[0], 1 / 0.4, rtol=1e-3)  # ... not 1/(1-p)
