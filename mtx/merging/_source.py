"""Task vectors read leaf by leaf: the :class:`Source` every method reads.

A :class:`Source` computes the task vectors of one leaf at a time, inside the
jitted kernel that consumes them (statistics, selection, sums), so the memory
a method's ``prepare`` needs is one leaf's ``[T, ...]`` task vectors at a time
(or one task's, for a large leaf: see ``_LAZY_ENTRIES``). On host arrays it
selects with numpy through a reused buffer; on sharded arrays it reduces with
jitted XLA, without a gather. A :class:`Transform` (DARE's drop) applies to
everything a source reads.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mtx import _select
from mtx import tree as mtree

PyTree = Any

# A leaf's task vectors are a tuple of T arrays, never one stacked [T, ...]
# array: XLA on CPU fuses elementwise work across a tuple at memory speed but
# materialises a stack and reduces over its leading axis ~30x slower.
Tasks = tuple[jax.Array, ...]


def acc_dtype() -> jnp.dtype:
  """The accumulation dtype: float32, or float64 under x64."""
  return mtree.accum_dtype()


def tau(pre, fts) -> Tasks:
  """The task vectors of one leaf as a tuple, in the accumulation dtype."""
  acc = acc_dtype()
  if isinstance(fts, tuple | list):
    xs = [jnp.asarray(f).astype(acc) for f in fts]
  else:  # a stacked [T, ...] leaf: slicing a parameter fuses into consumers
    fts = jnp.asarray(fts)
    xs = [fts[i].astype(acc) for i in range(fts.shape[0])]
  if pre is not None:
    p = jnp.asarray(pre).astype(acc)
    xs = [x - p for x in xs]
  return tuple(xs)


class Transform(NamedTuple):
  """A per-leaf map of task vectors applied before statistics (DARE's drop).

  ``fn(static, tv, key, data) -> tv`` runs inside the jitted kernels;
  ``data[i]`` and ``fold_in(key, i)`` are leaf ``i``'s arguments.
  """

  fn: Callable[..., Tasks]
  static: Any
  key: jax.Array | None
  data: tuple[Any, ...] | None


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def _on_leaf(fn, fstatic, tfn, tstatic, pre, fts, tkey, tdata, extra):
  return fn(fstatic, _transformed(pre, fts, tfn, tstatic, tkey, tdata), *extra)


def _transformed(pre, fts, tfn, tstatic, tkey, tdata) -> Tasks:
  tv = tau(pre, fts)
  return tv if tfn is None else tfn(tstatic, tv, tkey, tdata)


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3), donate_argnums=(4,))
def _into(fn, fstatic, tfn, tstatic, buf, pre, fts, tkey, tdata, extra):
  """Writes ``fn``'s (one-task) values of a leaf into the donated ``buf``."""
  tv = _transformed(pre, fts, tfn, tstatic, tkey, tdata)
  (vals,) = fn(fstatic, tv, *extra)
  return jax.lax.dynamic_update_slice(buf, vals.ravel().astype(buf.dtype), (0,))


class _Call(NamedTuple):
  """A function with its static argument (both hashable)."""

  fn: Callable[..., Any]
  fstatic: Any


def _one(call: _Call, tv, *extra):
  return (call.fn(call.fstatic, tv, *extra),)


def _identity(static, tv):
  del static
  return tv


# Leaves at least this large are read one task at a time for selection.
_LAZY_ENTRIES = 1 << 20


class _LazyTasks(Sequence):
  """``T`` per-task arrays computed when indexed (and freed after use)."""

  def __init__(self, n: int, get: Callable[[int], jax.Array]):
    self._n, self._get = n, get

  def __len__(self) -> int:
    return self._n

  def __getitem__(self, j):
    if not -self._n <= j < self._n:
      raise IndexError(j)
    return self._get(j % self._n)


class _Values(NamedTuple):
  """What :func:`_values_of` computes: ``fn(fstatic, tv, *extra)``, its
  ``abs`` if ``absolute``, every ``stride``-th entry, task ``task`` only."""

  fn: Callable[..., Any]
  fstatic: Any
  absolute: bool
  stride: int | None
  task: int | None


def _values_of(v: _Values, tv, *extra):
  """``fn(fstatic, tv, *extra)``, optionally ``abs``-ed, strided, one task."""
  out = v.fn(v.fstatic, tv, *extra)
  if v.task is not None:
    out = (out[v.task],)
  if v.absolute:
    out = tuple(jnp.abs(x) for x in out)
  if v.stride is not None:  # fused: only the sampled entries are computed
    out = tuple(x.ravel()[:: v.stride] for x in out)
  return out


class Source:
  """Task vectors of the selected leaves, computed one leaf at a time.

  Built either from a pretrained model and ``T`` fine-tuned models (each
  leaf's task vectors computed on demand inside the kernel that needs them,
  never all at once) or from an already stacked task-vector tree. An optional
  :class:`Transform` (e.g. DARE's random drop) applies to everything read.

  A source may also read large leaves in parts (``parts[i]``: row ranges of
  the leading axis, ``rows(i, start, stop)`` their raw inputs, as streamed
  checkpoints do). Statistics whose value cannot depend on how a leaf is cut
  (top-k selection of the task vectors' entries, sums of sign counts) then
  read one part at a time, so memory holds a part of each model instead of
  the whole leaf; everything else reads whole leaves.
  """

  def __init__(
      self,
      paths: Sequence[str],
      shapes: Sequence[tuple[int, ...]],
      num_tasks: int,
      raw: Callable[[int], tuple[Any, Any]],
      host: bool,
      transform: Transform | None = None,
      *,
      parts: Sequence[Sequence[tuple[int, int]] | None] | None = None,
      rows: Callable[[int, int, int], tuple[Any, Any]] | None = None,
  ):
    self.paths = list(paths)
    self.shapes = [tuple(s) for s in shapes]
    self.num_tasks = num_tasks
    self.raw = raw  # i -> (pre leaf or None, tuple of T leaves | [T, ...])
    self.host = host
    self.transform = transform
    self.parts = parts if rows is not None else None
    self.rows = rows
    self._buf = None  # reused by _stream

  def __len__(self) -> int:
    return len(self.paths)

  @functools.cached_property
  def sizes(self) -> list[int]:
    return [int(np.prod(s)) for s in self.shapes]

  def _parts(self, i: int) -> list[tuple[int, int] | None]:
    """Leaf ``i``'s row ranges, or ``[None]`` (the whole leaf)."""
    if self.parts is None or self.transform is not None or not self.host:
      return [None]
    return list(self.parts[i] or [None])

  def _part_size(self, i: int, part) -> int:
    if part is None:
      return self.sizes[i]
    shape = self.shapes[i]
    return (part[1] - part[0]) * int(np.prod(shape[1:]))

  def _args(self, i: int, part=None) -> tuple[Any, ...]:
    """Leaf ``i``'s kernel arguments: ``(pre, fts, tfn, tstatic, key, data)``."""
    pre, fts = self.raw(i) if part is None else self.rows(i, *part)
    t = self.transform
    if t is None:
      return pre, fts, None, None, None, None
    key = None if t.key is None else jax.random.fold_in(t.key, i)
    data = None if t.data is None else t.data[i]
    return pre, fts, t.fn, t.static, key, data

  def run(self, fn: Callable[..., Any], fstatic: Any, i: int, *extra) -> Any:
    """``fn(fstatic, tv_i, *extra)`` jitted, ``tv_i`` leaf ``i``'s tasks.

    ``fn`` and ``fstatic`` must be hashable (module-level functions and
    tuples), so that repeated calls reuse one compiled kernel per shape.
    """
    return self._run(fn, fstatic, i, None, *extra)

  def _run(self, fn, fstatic, i: int, part, *extra) -> Any:
    pre, fts, tfn, tstatic, key, data = self._args(i, part)
    return _on_leaf(fn, fstatic, tfn, tstatic, pre, fts, key, data, extra)

  def _stream(self, i: int, static: Any, extra: tuple, part=None) -> np.ndarray:
    """One task's values of leaf ``i`` as a numpy view of a reused buffer.

    The buffer is donated back to the next call, so nothing is page-faulted
    afresh per leaf; the view is valid until then (callers copy what they
    keep).
    """
    pre, fts, tfn, tstatic, key, data = self._args(i, part)
    dt = acc_dtype()
    if self._buf is None or self._buf.dtype != dt:
      biggest = max(
          self._part_size(j, q)
          for j in range(len(self))
          for q in self._parts(j)
      )
      self._buf = jnp.zeros((biggest,), dt)
    buf, self._buf = self._buf, None
    self._buf = _into(
        _values_of, static, tfn, tstatic, buf, pre, fts, key, data, extra
    )
    return np.asarray(self._buf)[: self._part_size(i, part)]

  def task_values(self, i: int) -> Sequence[jax.Array]:
    """Leaf ``i``'s task vectors; a large leaf is computed one task at a
    time as the sequence is indexed (so one task's copy is alive at once)."""
    return self._values(i, absolute=False)

  def with_transform(self, transform: Transform) -> Source:
    if self.transform is not None:
      raise ValueError("a Source takes one transform")
    return Source(
        self.paths,
        self.shapes,
        self.num_tasks,
        self.raw,
        self.host,
        transform,
        parts=self.parts,
        rows=self.rows,
    )

  def _values(
      self, i: int, absolute: bool, fn=None, fstatic=None, extra=(), part=None
  ):
    if fn is None:
      fn = _identity
    if self._part_size(i, part) < _LAZY_ENTRIES:
      return self._run(
          _values_of,
          _Values(fn, fstatic, absolute, None, None),
          i,
          part,
          *extra,
      )
    # A large leaf: one task at a time, so only one task's values are alive.
    return _LazyTasks(
        self.num_tasks,
        lambda j: self._run(
            _values_of, _Values(fn, fstatic, absolute, None, j), i, part, *extra
        )[0],
    )

  def _streamed(
      self, i: int, absolute: bool, fn=None, fstatic=None, extra=(), part=None
  ):
    """Like ``_values`` but each task's array is a view of a reused buffer."""
    if fn is None:
      fn = _identity
    return _LazyTasks(
        self.num_tasks,
        lambda j: self._stream(
            i, _Values(fn, fstatic, absolute, None, j), extra, part
        ),
    )

  def _sample(
      self, i, stride, absolute, fn=None, fstatic=None, extra=(), part=None
  ):
    if fn is None:
      fn = _identity
    return self._run(
        _values_of,
        _Values(fn, fstatic, absolute, stride, None),
        i,
        part,
        *extra,
    )

  def _select(self, units, k, absolute, fn, fstatic, extra):
    """Per-task k-th largest over ``units``: ``(leaf, part)`` pairs, each
    read as a "leaf" of the selection (its result does not depend on how
    the entries are grouped)."""
    return _select.global_kth_largest(
        lambda u: self._values(
            units[u][0], absolute, fn, fstatic, extra, units[u][1]
        ),
        [self._part_size(*u) for u in units],
        np.asarray(k),
        self.host,
        sample=lambda u, stride: self._sample(
            units[u][0], stride, absolute, fn, fstatic, extra, units[u][1]
        ),
        stream=lambda u: self._streamed(
            units[u][0], absolute, fn, fstatic, extra, units[u][1]
        ),
    )

  def global_kth_largest(
      self, k, absolute: bool = True, *, fn=None, fstatic=None, extra=()
  ):
    """Per-task k-th largest ``|τ|`` (or ``τ``) over all leaves.

    With ``fn``, selects among ``fn(fstatic, tv, *extra)`` instead of ``tv``.
    ``k`` is ``[T]`` or ``[T, R]`` (several ranks in the same passes).
    """
    units = [
        (i, q)
        for i in range(len(self))
        for q in (self._parts(i) if fn is None else [None])
    ]
    return self._select(units, k, absolute, fn, fstatic, extra)

  def leaf_kth_largest(self, i: int, k, absolute: bool = True):
    """Per-task k-th largest ``|τ|`` (or ``τ``) within leaf ``i``."""
    units = [(i, q) for q in self._parts(i)]
    return self._select(units, k, absolute, None, None, ())

  def sum_of(
      self, fn: Callable[..., jax.Array], fstatic: Any, i: int, *extra
  ) -> float:
    """``sum(fn(fstatic, tv_i, *extra))`` for an elementwise ``fn``.

    On host arrays the values go through the reused buffer of ``_stream``
    and numpy sums them (no fresh memory per leaf, and numpy's reductions are
    ~10x faster than XLA's fused ones on CPU); sharded arrays are reduced by
    XLA, without a gather. A leaf read in parts is summed part by part (in
    another order, so a sum of non-integers may differ in its last bits).
    """
    if not self.host:
      return float(jnp.sum(self.run(fn, fstatic, i, *extra), dtype=acc_dtype()))
    total = 0.0
    for q in self._parts(i):
      view = self._stream(
          i, _Values(_one, _Call(fn, fstatic), False, None, None), extra, q
      )
      total += float(np.sum(view, dtype=np.float64))
    return total

  def total(self, x: jax.Array) -> float:
    """``float(sum(x))`` of an array a kernel returned.

    Kernels return elementwise arrays and numpy sums them on the host (XLA's
    CPU reductions of fused elementwise work are ~10x slower than numpy);
    sharded arrays are reduced by XLA, without a gather.
    """
    if self.host:
      return float(np.sum(np.asarray(x), dtype=np.float64))
    return float(jnp.sum(x, dtype=acc_dtype()))


def source_from_stacked(task_vectors: PyTree) -> Source:
  """A :class:`Source` over every leaf of a stacked task-vector tree."""
  paths, leaves, _ = mtree.flatten(task_vectors)
  if not leaves:
    raise ValueError("the task-vector tree has no leaves")
  t = num_tasks_stacked(paths, leaves)
  host = all(_select.on_host(x) for x in leaves)
  return Source(
      paths,
      [np.shape(x)[1:] for x in leaves],
      t,
      lambda i: (None, leaves[i]),
      host,
  )


def num_tasks_stacked(paths, leaves) -> int:
  t = None
  for p, x in zip(paths, leaves):
    if np.ndim(x) == 0:
      raise ValueError(
          f"stacked task vectors need a leading task axis; leaf {p!r} is a "
          "scalar"
      )
    if t is None:
      t = np.shape(x)[0]
    elif np.shape(x)[0] != t:
      raise ValueError(
          f"leaf {p!r} has {np.shape(x)[0]} tasks on its leading axis, "
          f"expected {t}"
      )
  return t
