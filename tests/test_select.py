"""Tests of ``mtx._select``: exact k-th largest values by selection.

Every result is compared for exact equality with ``np.sort`` of the
concatenated values. Leaves are given as one tuple of ``T`` arrays per leaf
(one array per task). The host backend has three code paths (direct
selection for ``n <= _DIRECT``; a sampled bracket above; a full selection
when the bracket misses); call counting checks which one ran.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mtx
from mtx import _select


@pytest.fixture(autouse=True)
def _bracket_above_64k(monkeypatch):
  # These tests exercise the sampled bracket on ~200k-entry inputs; the
  # library's own crossover to it is higher.
  monkeypatch.setattr(_select, "_DIRECT", 1 << 16)


# ----------------------------------------------------------------------------
# Helpers.


def _reference(leaves, j, k):
  """k-th largest (1-based, clipped to [1, n]) of task j over all leaves."""
  flat = np.concatenate(
      [np.ravel(np.asarray(xs[j], np.float32)) for xs in leaves]
  )
  srt = np.sort(flat)[::-1]
  k = min(max(int(k), 1), flat.size)
  return srt[k - 1]


def _sorted_desc(leaves, j):
  return np.sort(
      np.concatenate([np.ravel(np.asarray(xs[j])) for xs in leaves])
  )[::-1]


class _Counter:
  """``leaf(i)`` for the host backend that counts calls per leaf."""

  def __init__(self, leaves):
    self.leaves = leaves
    self.calls = [0] * len(leaves)

  def __call__(self, i):
    self.calls[i] += 1
    return self.leaves[i]


def _host(leaves, k):
  sizes = [int(np.prod(np.shape(xs[0]))) for xs in leaves]
  return np.asarray(
      _select.global_kth_largest_host(lambda i: leaves[i], sizes, np.asarray(k))
  )


def _device(leaves, k):
  dev = [tuple(jnp.asarray(x) for x in xs) for xs in leaves]
  return np.asarray(
      _select.global_kth_largest_device(dev, jnp.asarray(k, jnp.int32))
  )


def _small_leaves(t, seed=0):
  """3 leaves of different shapes (12 + 5 + 8 = 25 entries per task).

  Task 0: continuous, both signs; task 1: heavy ties (rounded to 3 levels
  {-1, 0, 1}); task 2: all negative, rounded to quarters (ties too).
  """
  rng = np.random.default_rng(seed)
  shapes = [(3, 4), (5,), (2, 2, 2)]
  leaves = []
  for s in shapes:
    xs = []
    for j in range(t):
      x = rng.normal(size=s)
      if j % 3 == 1:
        x = np.clip(np.round(x), -1, 1)
      elif j % 3 == 2:
        x = -np.round(np.abs(x) * 4) / 4 - 0.25
      xs.append(x.astype(np.float32))
    leaves.append(tuple(xs))
  return leaves


# ----------------------------------------------------------------------------
# global_kth_largest_host / _device on small inputs (direct selection).


@pytest.mark.parametrize("t", [1, 3])
def test_global_kth_small_every_k_host_and_device(t):
  leaves = _small_leaves(t)
  n = 25
  assert n <= _select._DIRECT
  for k in range(1, n + 1):
    want = np.array([_reference(leaves, j, k) for j in range(t)])
    ks = np.full((t,), k)
    got_h = _host(leaves, ks)
    got_d = _device(leaves, ks)
    assert got_h.shape == (t,) and got_d.shape == (t,)
    np.testing.assert_array_equal(got_h, want, err_msg=f"host k={k}")
    np.testing.assert_array_equal(got_d, want, err_msg=f"device k={k}")


def test_global_kth_small_different_k_per_task_and_clipping():
  leaves = _small_leaves(3, seed=5)
  ks = np.array([1, 25, 7])
  want = [_reference(leaves, j, k) for j, k in enumerate(ks)]
  np.testing.assert_array_equal(_host(leaves, ks), want)
  np.testing.assert_array_equal(_device(leaves, ks), want)
  # k below 1 is clipped to 1 (the max), above n to n (the min)
  ks = np.array([0, 1000, -3])
  want = [
      _sorted_desc(leaves, 0)[0],
      _sorted_desc(leaves, 1)[-1],
      _sorted_desc(leaves, 2)[0],
  ]
  np.testing.assert_array_equal(_host(leaves, ks), want)
  np.testing.assert_array_equal(_device(leaves, ks), want)


def test_global_kth_hand_computed_with_ties_and_negatives():
  # task 0 over both leaves: [3, -1, 3, 0.5, -2] -> sorted desc
  #   [3, 3, 0.5, -1, -2]
  # task 1: [-5, -5, -5, -4, -6] -> [-4, -5, -5, -5, -6]
  leaves = [
      (np.array([3.0, -1.0], np.float32), np.array([-5.0, -5.0], np.float32)),
      (
          np.array([[3.0, 0.5, -2.0]], np.float32),
          np.array([[-5.0, -4.0, -6.0]], np.float32),
      ),
  ]
  cases = {
      1: [3.0, -4.0],
      2: [3.0, -5.0],
      3: [0.5, -5.0],
      4: [-1.0, -5.0],
      5: [-2.0, -6.0],
  }
  for k, want in cases.items():
    np.testing.assert_array_equal(_host(leaves, [k, k]), want)
    np.testing.assert_array_equal(_device(leaves, [k, k]), want)


def test_global_kth_host_direct_path_reads_each_leaf_once():
  leaves = _small_leaves(2)
  c = _Counter(leaves)
  _select.global_kth_largest_host(c, [12, 5, 8], np.array([3, 4]))
  assert c.calls == [1, 1, 1]


def test_global_kth_host_zero_entries_raises():
  with pytest.raises(ValueError, match="zero entries"):
    _select.global_kth_largest_host(
        lambda i: (np.zeros(0, np.float32),), [0], np.array([1])
    )


def test_global_kth_host_casts_bfloat16():
  x = jnp.array([0.5, -2.0, 1.25, 3.0], jnp.bfloat16)
  got = _select.global_kth_largest_host(lambda i: (x,), [4], np.array([2]))
  # sorted desc [3, 1.25, 0.5, -2] -> 1.25
  assert float(got[0]) == 1.25
  got = _select.global_kth_largest_device([(x,)], jnp.array([2]))
  assert float(got[0]) == 1.25


# ----------------------------------------------------------------------------
# Large inputs: the sampled bracket (n > _DIRECT).


def _large_leaves():
  """3 leaves of different shapes, 200_000 entries per task, T = 3.

  Task 0: continuous normal; task 1: heavy ties (5 levels); task 2: negative
  values with ties (rounded to 1/16).
  """
  rng = np.random.default_rng(7)
  shapes = [(300, 400), (50_000,), (100, 300)]
  leaves = []
  for s in shapes:
    a = rng.normal(size=s).astype(np.float32)
    b = np.clip(np.round(rng.normal(size=s)), -2, 2).astype(np.float32)
    c = (-np.round(np.abs(rng.normal(size=s)) * 16) / 16).astype(np.float32)
    leaves.append((a, b, c))
  return leaves


_LARGE_KS = [
    1,
    2,
    3,
    1000,
    40_000,
    99_999,
    100_000,
    100_001,
    160_000,
    199_999,
    200_000,
]


@pytest.fixture(scope="module")
def large():
  leaves = _large_leaves()
  srt = [_sorted_desc(leaves, j) for j in range(3)]
  return leaves, srt


def test_global_kth_host_large_sampled_bracket(large):
  leaves, srt = large
  n = 200_000
  assert n > _select._DIRECT
  sizes = [120_000, 50_000, 30_000]
  for k in _LARGE_KS:
    c = _Counter(leaves)
    got = _select.global_kth_largest_host(c, sizes, np.array([k, k, k]))
    want = [s[k - 1] for s in srt]
    np.testing.assert_array_equal(got, want, err_msg=f"k={k}")
    # the bracket path reads each leaf twice (sample, count); no fallback
    assert c.calls == [2, 2, 2], (k, c.calls)
  # different ranks per task in one call
  ks = np.array([17, 123_456, 200_000])
  got = _select.global_kth_largest_host(lambda i: leaves[i], sizes, ks)
  np.testing.assert_array_equal(got, [srt[j][k - 1] for j, k in enumerate(ks)])


def test_global_kth_device_large(large):
  leaves, srt = large
  dev = [tuple(jnp.asarray(x) for x in xs) for xs in leaves]
  for ks in ([1, 100_000, 200_000], [3, 99_999, 1000], [160_000, 2, 100_001]):
    got = np.asarray(
        _select.global_kth_largest_device(dev, jnp.asarray(ks, jnp.int32))
    )
    np.testing.assert_array_equal(
        got, [srt[j][k - 1] for j, k in enumerate(ks)], err_msg=str(ks)
    )


def test_global_kth_host_bracket_with_small_thresholds(monkeypatch):
  # Run the bracket path on small data (every k, heavy ties) by lowering the
  # direct-selection threshold and the sample size.
  monkeypatch.setattr(_select, "_DIRECT", 8)
  monkeypatch.setattr(_select, "_SAMPLE", 16)
  leaves = _small_leaves(3, seed=11)
  for k in range(1, 26):
    want = [_reference(leaves, j, k) for j in range(3)]
    np.testing.assert_array_equal(
        _host(leaves, np.full((3,), k)), want, err_msg=f"k={k}"
    )


def _misleading_leaves(stride):
  """Sampled positions (multiples of ``stride`` in each leaf) hold large
  values 1000 + i; every other entry is a small value in [0, 1)."""
  rng = np.random.default_rng(13)
  leaves = []
  for size in (120_000, 50_000, 30_000):
    x = rng.random(size).astype(np.float32)
    x[::stride] = 1000.0 + np.arange(x[::stride].size, dtype=np.float32)
    leaves.append(x)
  return leaves


def test_global_kth_host_bracket_miss_falls_back_exactly(monkeypatch):
  monkeypatch.setattr(_select, "_SAMPLE", 1024)
  n = 200_000
  stride = n // 1024  # as the host backend computes it: 195
  xs = _misleading_leaves(stride)
  # T = 3: task 0 misleading, task 1 its negation, task 2 well behaved.
  rng = np.random.default_rng(17)
  leaves = [(x, -x, rng.normal(size=x.shape).astype(np.float32)) for x in xs]
  srt = [_sorted_desc(leaves, j) for j in range(3)]
  sizes = [x.size for x in xs]
  # k -> expected reads per leaf: 2 (sample, count) + one per missed task.
  # k = 100_000 or 150_000: the sample says the answer is >= 1000 (task 0) or
  # <= -1000 (task 1), but only ~1026 entries are that large: both miss.
  # k = 5000: the expected position lies within the margin of the top of the
  # sample, so task 1's bracket is open above (hi = inf) and holds the answer;
  # only task 0 misses. Task 2 (normal data) never misses.
  expected_calls = {100_000: 4, 150_000: 4, 5000: 3}
  for k, calls in expected_calls.items():
    c = _Counter(leaves)
    got = _select.global_kth_largest_host(c, sizes, np.array([k, k, k]))
    np.testing.assert_array_equal(
        got, [s[k - 1] for s in srt], err_msg=f"k={k}"
    )
    assert c.calls == [calls] * 3, (k, c.calls)


def test_global_kth_host_bracket_miss_single_task(monkeypatch):
  monkeypatch.setattr(_select, "_SAMPLE", 1024)
  xs = _misleading_leaves(200_000 // 1024)
  leaves = [(x,) for x in xs]
  srt = _sorted_desc(leaves, 0)
  c = _Counter(leaves)
  got = _select.global_kth_largest_host(
      c, [x.size for x in xs], np.array([100_000])
  )
  assert got[0] == srt[100_000 - 1]
  assert got[0] < 1.0  # the answer lies among the small values
  assert c.calls == [3, 3, 3]  # sample, count, fallback


# ----------------------------------------------------------------------------
# The device backend under jax.jit with traced inputs; the dispatchers.


def test_global_kth_device_under_jit_traced_inputs():
  leaves = _small_leaves(3, seed=21)
  dev = [tuple(jnp.asarray(x) for x in xs) for xs in leaves]

  @jax.jit
  def f(ls, k):
    # inputs are tracers here; scale the values to make sure they are used
    ls = [tuple(2.0 * x for x in xs) for xs in ls]
    return _select.global_kth_largest_device(ls, k)

  for ks in ([1, 2, 3], [25, 13, 7]):
    got = np.asarray(f(dev, jnp.asarray(ks)))
    want = [2.0 * _reference(leaves, j, k) for j, k in enumerate(ks)]
    np.testing.assert_array_equal(got, want)


def test_global_kth_dispatcher_host_and_device_agree():
  leaves = _small_leaves(2, seed=3)
  sizes = [12, 5, 8]
  ks = np.array([4, 20])
  want = [_reference(leaves, j, k) for j, k in enumerate(ks)]
  for host in (True, False):
    got = _select.global_kth_largest(lambda i: leaves[i], sizes, ks, host)
    np.testing.assert_array_equal(np.asarray(got), want, err_msg=str(host))


def test_on_host():
  assert _select.on_host(np.zeros(3))
  assert _select.on_host(np.float32(1.0))
  assert _select.on_host(jnp.zeros(3))  # a single CPU device here
  assert not _select.on_host([1.0, 2.0])
  seen = []
  jax.jit(lambda x: seen.append(_select.on_host(x)) or x)(jnp.zeros(2))
  assert seen == [False]  # a tracer is never on the host


# ----------------------------------------------------------------------------
# Per-row thresholds.


def _row_reference(x, ks):
  a = np.sort(np.abs(np.asarray(x, np.float32)), axis=-1)[..., ::-1]
  n = a.shape[-1]
  return np.stack([a[..., min(max(k, 1), n) - 1] for k in ks], axis=-1)


def test_row_kth_hand_computed():
  x = np.array(
      [
          [3.0, -1.0, 2.0, -3.0],  # |x| desc: [3, 3, 2, 1]
          [0.0, 0.0, 0.0, 0.0],  # all zeros
          [-0.5, 0.5, -0.5, 0.25],
      ],  # [0.5, 0.5, 0.5, 0.25]
      np.float32,
  )
  ks = (1, 2, 3, 4)
  want = np.array([[3, 3, 2, 1], [0, 0, 0, 0], [0.5, 0.5, 0.5, 0.25]])
  np.testing.assert_array_equal(_select.row_kth_largest_host(x, ks), want)
  np.testing.assert_array_equal(
      _select.row_kth_largest_device(jnp.asarray(x), ks), want
  )


@pytest.mark.parametrize("shape", [(9,), (5, 9), (2, 3, 7)])
def test_row_kth_host_device_numpy_agree(shape):
  rng = np.random.default_rng(sum(shape))
  x = rng.normal(size=shape)
  x[..., ::2] = np.round(x[..., ::2] * 2) / 2  # ties within rows
  x = x.astype(np.float32)
  n = shape[-1]
  ks = (1, 3, n, 2, 3, 0, n + 4)  # duplicates; 0 and n+4 are clipped
  want = _row_reference(x, ks)
  got_h = _select.row_kth_largest_host(x, ks)
  got_d = np.asarray(_select.row_kth_largest_device(jnp.asarray(x), ks))
  assert got_h.shape == shape[:-1] + (len(ks),)
  assert got_d.shape == shape[:-1] + (len(ks),)
  np.testing.assert_array_equal(got_h, want)
  np.testing.assert_array_equal(got_d, want)


def test_row_kth_device_under_jit_and_dispatcher():
  rng = np.random.default_rng(31)
  x = np.round(rng.normal(size=(4, 6)) * 2).astype(np.float32) / 2
  ks = (2, 5)
  want = _row_reference(x, ks)
  f = jax.jit(lambda v: _select.row_kth_largest_device(v * 1.0, ks))
  np.testing.assert_array_equal(np.asarray(f(jnp.asarray(x))), want)
  # the dispatcher: numpy input -> host, traced input -> device
  np.testing.assert_array_equal(_select.row_kth_largest(x, list(ks)), want)
  g = jax.jit(lambda v: _select.row_kth_largest(v, ks))
  np.testing.assert_array_equal(np.asarray(g(jnp.asarray(x))), want)


def test_host_several_ranks_per_task_in_one_call():
  # k of shape [T, R]: every rank equals its own single-rank selection, on
  # both host paths (direct and sampled bracket).
  rng = np.random.default_rng(11)
  for n in (1000, 150_000):
    leaves = [
        [rng.normal(size=n // 2).astype(np.float32) for _ in range(2)],
        [
            np.round(rng.normal(size=n // 2), 1).astype(np.float32)
            for _ in range(2)
        ],
    ]
    k = np.array([[1, 7, n // 3, n], [2, n // 2, n - 1, 5]])
    got = _select.global_kth_largest_host(
        lambda i, lv=leaves: lv[i], [n // 2] * 2, k
    )
    assert got.shape == (2, 4)
    for j in range(2):
      desc = np.sort(np.concatenate([leaves[0][j], leaves[1][j]]))[::-1]
      np.testing.assert_array_equal(got[j], desc[k[j] - 1])


def test_merge_global_threshold_on_a_leaf_read_one_task_at_a_time():
  # A leaf above _LAZY_ENTRIES is read task by task during selection; the
  # TIES threshold must still be the exact global k-th largest |τ|.
  from mtx.merging import _source

  n = _source._LAZY_ENTRIES + 4096
  rng = np.random.default_rng(12)
  pre = {"big": jnp.zeros(n), "small": jnp.zeros(100)}
  taus = [rng.normal(size=n + 100).astype(np.float32) for _ in range(2)]
  fts = [{"big": jnp.asarray(t[:n]), "small": jnp.asarray(t[n:])} for t in taus]
  merger = mtx.merging.get("ties", density=0.1)
  tvs = mtx.tree.stack([mtx.task_vectors.task_vector(pre, f) for f in fts])
  stats = merger.prepare(tvs)
  k = int((n + 100) * 0.1)
  for j, t in enumerate(taus):
    assert stats.glob["thr"][j] == np.sort(np.abs(t))[::-1][k - 1]
