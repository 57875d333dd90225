"""Exact k-th largest magnitudes by selection, never by a full sort.

Top-k thresholds are the expensive part of TIES, TALL, PCB, ComPEFT and
magnitude pruning. Two exact backends compute the same value:

* host (numpy), for arrays that live in host memory (numpy arrays, jax arrays
  on a single CPU device): a strided sample brackets the answer, one counting
  pass collects the few candidates inside the bracket, and a selection
  (``np.partition``) among them finds the exact value. Falls back to a full
  selection when the bracket misses (never silently approximate).
* device (jax), for sharded arrays and accelerators: bisection over the IEEE
  bit patterns of ``|x|`` (monotone for non-negative floats), each step one
  fused counting reduction that XLA partitions across shards, so nothing is
  gathered. About 31 passes for float32 (63 for float64).

All functions return the *value* ``v`` of the k-th largest ``|x|`` (1-based;
``k`` is clipped to ``[1, n]``) so that ``|x| >= v`` keeps at least ``k``
entries, all of them when ties straddle the threshold.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import functools

import jax
import jax.numpy as jnp
import numpy as np

# Per task, the sample used to bracket the answer has about this many entries.
_SAMPLE = 1 << 18
# Up to this many entries per task, select directly among all of them: one
# O(n) partition is cheaper than sorting a sample of a quarter of the data.
_DIRECT = 1 << 20


def on_host(x) -> bool:
  """Whether ``x`` can be viewed as numpy without a transfer or a gather."""
  if isinstance(x, np.ndarray | np.generic):
    return True
  if isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer):
    try:
      devices = x.devices()
    except Exception:  # pylint: disable=broad-except
      return False
    return len(devices) == 1 and next(iter(devices)).platform == "cpu"
  return False


def _host(x) -> np.ndarray:
  a = np.asarray(x)
  if a.dtype not in (np.float32, np.float64):
    a = a.astype(np.float32)
  return a.ravel()


def _kth_largest_np(a: np.ndarray, k: int) -> float:
  """k-th largest of a 1-D array (1-based), by selection."""
  n = a.size
  k = min(max(int(k), 1), n)
  return np.partition(a, n - k)[n - k]


def global_kth_largest_host(
    leaf: Callable[[int], Sequence[np.ndarray]],
    sizes: Sequence[int],
    k: np.ndarray,
    sample: Callable[[int, int], Sequence[np.ndarray]] | None = None,
    stream: Callable[[int], Sequence[np.ndarray]] | None = None,
) -> np.ndarray:
  """Per-task k-th largest value over all leaves, on the host.

  Args:
    leaf: ``leaf(i)`` returns leaf ``i``'s values, one array per task
      (called up to three times per leaf; recomputing it is fine).
    sizes: the number of entries per task of each leaf.
    k: ``[T]`` 1-based ranks, or ``[T, R]`` for ``R`` ranks per task found
      in the same passes over the data.
    sample: ``sample(i, stride)`` returns ``leaf(i)``'s flattened values at
      ``::stride`` (cheaper than computing the whole leaf); by default sliced
      from ``leaf(i)``.
    stream: like ``leaf`` for the counting pass, whose per-task arrays may be
      views of one reused buffer (each is used before the next is asked for).

  Returns:
    Thresholds shaped like ``k`` (numpy float64; the values themselves).
  """
  k = np.asarray(k, np.int64)
  shape = k.shape
  k = k.reshape(shape[0], -1)  # [T, R]
  t, nr = k.shape
  num_leaves = len(sizes)
  n = int(sum(sizes))
  if n == 0:
    raise ValueError("cannot select a top-k over zero entries")
  k = np.clip(k, 1, n)
  if n <= _DIRECT:
    per_task = [[] for _ in range(t)]
    for i in range(num_leaves):
      for j, x in enumerate(leaf(i)):
        per_task[j].append(_host(x))
    out = np.empty((t, nr))
    for j in range(t):
      a = np.concatenate(per_task[j])
      part = np.partition(a, sorted({n - int(r) for r in k[j]}))
      out[j] = [part[n - int(r)] for r in k[j]]
    return out.reshape(shape)
  stride = max(1, n // _SAMPLE)
  samples = [[] for _ in range(t)]
  for i in range(num_leaves):
    xs = (
        [_host(x)[::stride] for x in leaf(i)]
        if sample is None
        else [_host(x) for x in sample(i, stride)]
    )
    for j, x in enumerate(xs):
      samples[j].append(x.copy())
  lo = np.empty((t, nr))
  hi = np.empty((t, nr))
  for j in range(t):
    smp = np.sort(np.concatenate(samples[j]))[::-1]  # descending
    m = smp.size
    for r in range(nr):
      pos = k[j, r] / n * m  # expected 0-based position of the answer
      margin = 6.0 * np.sqrt(pos * (1 - pos / m) + 1.0) + 8
      hi_i = int(np.floor(pos - margin))
      lo_i = int(np.ceil(pos + margin))
      hi[j, r] = np.inf if hi_i < 0 else smp[hi_i]
      lo[j, r] = -np.inf if lo_i >= m else smp[lo_i]
  del samples
  above = np.zeros((t, nr), np.int64)
  cands = [[[] for _ in range(nr)] for _ in range(t)]
  big = max(sizes)
  m1, m2 = np.empty(big, bool), np.empty(big, bool)  # reused scratch masks
  for i in range(num_leaves):
    xs = leaf(i) if stream is None else stream(i)
    for j in range(t):
      a = _host(xs[j])
      b1, b2 = m1[: a.size], m2[: a.size]
      for r in range(nr):
        above[j, r] += np.count_nonzero(np.greater(a, hi[j, r], out=b1))
        np.greater_equal(a, lo[j, r], out=b1)
        np.less_equal(a, hi[j, r], out=b2)
        cands[j][r].append(a[np.logical_and(b1, b2, out=b1)])
      del a
  out = np.empty((t, nr))
  for j in range(t):
    for r in range(nr):
      c = np.concatenate(cands[j][r])
      rank = k[j, r] - above[j, r]  # rank of the answer among candidates
      if 1 <= rank <= c.size:
        out[j, r] = _kth_largest_np(c, rank)
      else:  # the sample bracket missed: select among everything
        allj = np.concatenate([_host(leaf(i)[j]) for i in range(num_leaves)])
        out[j, r] = _kth_largest_np(allj, k[j, r])
  return out.reshape(shape)


def _bits(a: jax.Array) -> jax.Array:
  """Integer views of floats (monotone for non-negative values)."""
  if a.dtype == jnp.float64:
    return jax.lax.bitcast_convert_type(a, jnp.int64)
  return jax.lax.bitcast_convert_type(a.astype(jnp.float32), jnp.int32)


def _from_bits(b: jax.Array) -> jax.Array:
  if b.dtype == jnp.int64:
    return jax.lax.bitcast_convert_type(b, jnp.float64)
  return jax.lax.bitcast_convert_type(b, jnp.float32)


def _wide(x: jax.Array) -> jnp.dtype:
  return jnp.float64 if x.dtype == jnp.float64 else jnp.float32


def _midpoint(lo: jax.Array, hi: jax.Array) -> jax.Array:
  """``floor((lo + hi) / 2)`` without integer overflow."""
  return (lo & hi) + ((lo ^ hi) >> 1)


def _signed_bits(a: jax.Array) -> jax.Array:
  """Monotone integer keys of any (non-NaN) floats."""
  b = _bits(a)
  flip = jnp.asarray(np.iinfo(b.dtype).max, b.dtype)
  return jnp.where(b < 0, b ^ flip, b)


def _from_signed_bits(k: jax.Array) -> jax.Array:
  flip = jnp.asarray(np.iinfo(k.dtype).max, k.dtype)
  return _from_bits(jnp.where(k < 0, k ^ flip, k))


@jax.jit
def global_kth_largest_device(
    leaves: Sequence[Sequence[jax.Array]], k: jax.Array
) -> jax.Array:
  """Per-task k-th largest value over leaves (each a tuple of T arrays).

  Bisection over monotone integer keys; jittable, and works on sharded
  leaves: each step is a counting reduction. Returns ``[T]`` thresholds.
  """
  dt = jnp.result_type(*[_wide(x) for xs in leaves for x in xs])
  # No reshapes: merging sharded axes would need an explicit out sharding.
  keys = [[_signed_bits(x.astype(dt)) for x in xs] for xs in leaves]
  t = len(keys[0])
  n = sum(int(np.prod(xs[0].shape)) for xs in keys)
  itype = keys[0][0].dtype
  k = jnp.clip(jnp.asarray(k).astype(itype), 1, n)
  top = _signed_bits(jnp.asarray(jnp.inf, dt)) + 1
  bottom = _signed_bits(jnp.asarray(-jnp.inf, dt))

  def count(v):  # [T] -> [T]: how many keys >= v, per task
    return jnp.stack(
        [
            sum(jnp.sum(xs[j] >= v[j], dtype=itype) for xs in keys)
            for j in range(t)
        ]
    )

  def cond(state):
    lo, hi = state
    return jnp.any(hi - 1 > lo)  # no overflow: lo < hi

  def body(state):
    lo, hi = state
    mid = _midpoint(lo, hi)
    ok = count(mid) >= k
    return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)

  lo = jnp.full((t,), bottom, itype)
  hi = jnp.full((t,), top, itype)
  lo, _ = jax.lax.while_loop(cond, body, (lo, hi))
  return _from_signed_bits(lo)


def global_kth_largest(
    leaf: Callable[[int], Sequence[jax.Array]],
    sizes: Sequence[int],
    k: np.ndarray,
    host: bool,
    sample: Callable[[int, int], Sequence[jax.Array]] | None = None,
    stream: Callable[[int], Sequence[jax.Array]] | None = None,
) -> np.ndarray | jax.Array:
  """Dispatches to the host or device backend (see module docstring)."""
  if host:
    return global_kth_largest_host(leaf, sizes, k, sample, stream)
  leaves = [tuple(leaf(i)) for i in range(len(sizes))]
  k = np.asarray(k)
  if k.ndim == 1:
    return global_kth_largest_device(leaves, jnp.asarray(k))
  return jnp.stack(
      [
          global_kth_largest_device(leaves, jnp.asarray(k[:, r]))
          for r in range(k.shape[1])
      ],
      axis=1,
  )


# ----------------------------------------------------------------------------
# Per-row thresholds along the last axis.


def row_kth_largest_host(x, ks: Sequence[int]) -> np.ndarray:
  """``[..., len(ks)]``: for each row (last axis) the ``ks``-th largest |x|."""
  a = np.abs(np.asarray(x))
  n = a.shape[-1]
  ks = [min(max(int(k), 1), n) for k in ks]
  idx = sorted({n - k for k in ks})
  part = np.partition(a, idx, axis=-1)
  return np.stack([part[..., n - k] for k in ks], axis=-1)


@functools.partial(jax.jit, static_argnames="ks")
def row_kth_largest_device(x: jax.Array, ks: tuple[int, ...]) -> jax.Array:
  """Device version of :func:`row_kth_largest_host` (bisection per row)."""
  dt = _wide(x)
  keys = _bits(jnp.abs(x.astype(dt)))
  n = x.shape[-1]
  itype = keys.dtype
  top = _bits(jnp.asarray(jnp.inf, dt)) + 1
  outs = []
  for k in ks:
    k = min(max(int(k), 1), n)

    def body(_, state, k=k):
      lo, hi = state
      mid = _midpoint(lo, hi)
      ok = jnp.sum(keys >= mid[..., None], axis=-1, dtype=itype) >= k
      return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)

    row = jnp.max(keys, axis=-1)  # [...]: shaped and sharded like the rows
    lo = jnp.zeros_like(row)
    hi = jnp.full_like(row, top)
    nbits = 64 if itype == jnp.int64 else 32
    lo, _ = jax.lax.fori_loop(0, nbits, body, (lo, hi))
    outs.append(_from_bits(lo))
  return jnp.stack(outs, axis=-1)


def row_kth_largest(x, ks: Sequence[int]):
  if on_host(x):
    return row_kth_largest_host(x, ks)
  return row_kth_largest_device(x, tuple(int(k) for k in ks))
