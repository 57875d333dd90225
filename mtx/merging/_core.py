"""The merging machinery shared by every method.

A method is a :class:`Merger`: structural hyperparameters are bound when it is
built (``get("ties", density=0.2)``); continuous coefficients (``scale`` and
the method's own, e.g. SLERP's ``t``) are traced call arguments, so one
compiled program serves a sweep under ``jax.vmap`` and ``jax.grad`` reaches
them.

A method is written as two pure pieces:

* ``prepare(static, source, key)`` (optional): global statistics that need
  every leaf at once (TIES/TALL/PCB/ComPEFT thresholds, the TIES majority
  sign). It reads the task vectors leaf by leaf from a :class:`Source`, so the
  memory it needs is one leaf's ``[T, ...]`` task vectors at a time; on host
  arrays it uses numpy selection, on sharded arrays jitted reductions.
* ``leaf(static, tv, ctx)``: the merged task vector of one leaf from its
  task vectors ``tv`` (a tuple of ``T`` arrays, float32 or float64; see
  ``Tasks``) and the context ``ctx`` (statistics, coefficients, per-leaf key,
  pretrained leaf).

:func:`merge` runs ``leaf`` fused with the task-vector subtraction and the
final ``pretrained + merged`` in one jitted kernel per leaf, so peak memory
stays at the inputs plus the output plus one leaf's temporaries.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
import dataclasses
import functools
import inspect
import operator
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mtx import _select
from mtx import tree as mtree
from mtx.merging import _checks

PyTree = Any


class Stats(NamedTuple):
  """What ``prepare`` found: global values and one entry per leaf."""

  glob: PyTree = None
  leaf: tuple[PyTree, ...] | None = None


class Ctx(NamedTuple):
  """Everything a method's ``leaf`` function may read besides ``tv``.

  Attributes:
    glob: ``Stats.glob``.
    stats: this leaf's entry of ``Stats.leaf`` (or None).
    scale: the scale of this leaf: a scalar or a ``[T]`` vector.
    coeffs: dict of the method's continuous coefficients (traced).
    key: this leaf's PRNG key (``fold_in(key, leaf index)``), or None.
    pre: the pretrained leaf (methods that need it), or None.
    data: this leaf's share of the method's data (Fisher, Gram matrices).
    path: the leaf's path, for messages (None inside ``merge``'s kernels).
  """

  glob: PyTree
  stats: PyTree
  scale: jax.Array
  coeffs: Mapping[str, jax.Array]
  key: jax.Array | None
  pre: jax.Array | None
  data: PyTree
  path: str | None


# A leaf's task vectors are a tuple of T arrays, never one stacked [T, ...]
# array: XLA on CPU fuses elementwise work across a tuple at memory speed but
# materialises a stack and reduces over its leading axis ~30x slower.
Tasks = tuple[jax.Array, ...]


def acc_dtype() -> jnp.dtype:
  return mtree.accum_dtype()


def tsum(xs: Sequence[jax.Array]) -> jax.Array:
  """``Σt xs[t]``, unrolled (elementwise adds)."""
  return functools.reduce(operator.add, xs)


def tmean(xs: Sequence[jax.Array]) -> jax.Array:
  return tsum(xs) / len(xs)


def per_task(values: Any, t: int) -> list[Any]:
  """``values[i]`` for each task, or the scalar ``values`` repeated."""
  v = jnp.asarray(values)
  if v.ndim == 0:
    return [v] * t
  return [v[i] for i in range(t)]


def scale_tasks(scale: jax.Array, tv: Tasks) -> Tasks:
  """Multiplies ``tv[t]`` by ``scale[t]`` (or by a scalar ``scale``)."""
  return tuple(
      jnp.asarray(s, x.dtype) * x for s, x in zip(per_task(scale, len(tv)), tv)
  )


def scalar_scale(ctx: Ctx, name: str) -> jax.Array:
  """The leaf's scale, which this method requires to be a scalar."""
  s = jnp.asarray(ctx.scale)
  if s.ndim != 0:
    raise ValueError(
        f"{name} takes a scalar scale per leaf, got shape {s.shape}"
    )
  return s


def stack(tv: Tasks) -> jax.Array:
  """``[T, ...]`` (for methods that factorise or contract across tasks)."""
  return jnp.stack(tv)


# ----------------------------------------------------------------------------
# Sources of task vectors.


def _tau(pre, fts) -> Tasks:
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
  tv = _tau(pre, fts)
  return tv if tfn is None else tfn(tstatic, tv, tkey, tdata)


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3), donate_argnums=(4,))
def _into(fn, fstatic, tfn, tstatic, buf, pre, fts, tkey, tdata, extra):
  """Writes ``fn``'s (one-task) values of a leaf into the donated ``buf``."""
  tv = _transformed(pre, fts, tfn, tstatic, tkey, tdata)
  (vals,) = fn(fstatic, tv, *extra)
  return jax.lax.dynamic_update_slice(buf, vals.ravel().astype(buf.dtype), (0,))


def _one(static, tv, *extra):
  fn, fstatic = static
  return (fn(fstatic, tv, *extra),)


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


def _values_of(static, tv, *extra):
  """``fn(fstatic, tv, *extra)``, optionally ``abs``-ed, strided, one task."""
  fn, fstatic, absolute, stride, task = static
  out = fn(fstatic, tv, *extra)
  if task is not None:
    out = (out[task],)
  if absolute:
    out = tuple(jnp.abs(x) for x in out)
  if stride is not None:  # fused: only the sampled entries are computed
    out = tuple(x.ravel()[::stride] for x in out)
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
          _values_of, (fn, fstatic, absolute, None, None), i, part, *extra
      )
    # A large leaf: one task at a time, so only one task's values are alive.
    return _LazyTasks(
        self.num_tasks,
        lambda j: self._run(
            _values_of, (fn, fstatic, absolute, None, j), i, part, *extra
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
            i, (fn, fstatic, absolute, None, j), extra, part
        ),
    )

  def _sample(
      self, i, stride, absolute, fn=None, fstatic=None, extra=(), part=None
  ):
    if fn is None:
      fn = _identity
    return self._run(
        _values_of, (fn, fstatic, absolute, stride, None), i, part, *extra
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
      view = self._stream(i, (_one, (fn, fstatic), False, None, None), extra, q)
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
  t = _num_tasks_stacked(paths, leaves)
  host = all(_select.on_host(x) for x in leaves)
  return Source(
      paths,
      [np.shape(x)[1:] for x in leaves],
      t,
      lambda i: (None, leaves[i]),
      host,
  )


def _num_tasks_stacked(paths, leaves) -> int:
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


# ----------------------------------------------------------------------------
# Mergers.


@dataclasses.dataclass(frozen=True, eq=False)
class Merger:
  """A merging method with its structural hyperparameters bound.

  Call it on stacked task vectors (every leaf ``[T, ...]``) to get one merged
  task vector; use :func:`mtx.merging.merge` to merge models directly.

  Attributes:
    name: the registry name.
    static: hashable structural hyperparameters, passed to ``leaf``/``prepare``.
    coeffs: default continuous coefficients (overridable per call, traced).
    leaf_fn: ``leaf_fn(static, tv, ctx) -> merged leaf``.
    prepare_fn: ``prepare_fn(static, source, key) -> Stats`` or None.
    data: arrays the method needs per leaf (Fisher, Gram matrices): a tuple of
      ``(name, list of T trees)``; looked up by leaf path.
    needs_key: the method is random (``key`` is required).
    needs_pretrained: ``leaf_fn`` reads ``ctx.pre``.
    per_task_scale: ``scale`` may be a ``[T]`` vector (per-task weights).
    min_tasks: the fewest task vectors the method accepts.
    max_tasks: the most it accepts (None: no limit).
    elementwise: ``leaf_fn`` computes each entry from the same entries of
      its inputs and from per-leaf values that do not depend on the position
      (no reductions, no randomness), so a leaf may be merged in row ranges
      with the same result (streamed merges of large leaves do).
    coeff_specs: how each continuous coefficient is checked when concrete
      (``name -> Coeff``; finite real numbers at least).
    data_check: ``data_check(name, path, leaf_shape) -> expected shape`` of
      a leaf's entry of ``data`` (raises ``ValueError`` where the leaf may
      take none); None: the leaf's own shape.
  """

  name: str
  static: Any
  coeffs: Mapping[str, float]
  leaf_fn: Callable[..., jax.Array]
  prepare_fn: Callable[..., Stats] | None = None
  data: tuple[tuple[str, Any], ...] = ()
  needs_key: bool = False
  needs_pretrained: bool = False
  per_task_scale: bool = False
  min_tasks: int = 1
  max_tasks: int | None = None
  elementwise: bool = False
  coeff_specs: Mapping[str, _checks.Coeff] = dataclasses.field(
      default_factory=dict
  )
  data_check: Callable[[str, str, tuple[int, ...]], tuple[int, ...]] | None = (
      None
  )

  def __post_init__(self):
    self._check_coeffs(self.coeffs, None)

  def _identity(self):
    return (self.name, self.static, self.leaf_fn, self.prepare_fn)

  def __eq__(self, other):
    # Equal structure means the same compiled kernels; ``data`` and
    # ``coeffs`` are traced arguments and do not take part.
    return isinstance(other, Merger) and self._identity() == other._identity()

  def __hash__(self):
    return hash(self._identity())

  # -- public API ------------------------------------------------------------

  def prepare(self, task_vectors: PyTree, *, key: jax.Array | None = None):
    """Global statistics of stacked task vectors (concrete arrays).

    Compute them once and pass them to :meth:`combine` to sweep coefficients
    under ``jax.jit``/``jax.vmap`` without recomputing thresholds.
    """
    self._check_key(key)
    src = source_from_stacked(task_vectors)
    self._check_num_tasks(src.num_tasks)
    return self._prepare(src, key)

  def combine(
      self,
      task_vectors: PyTree,
      stats: Stats | None = None,
      *,
      scale: Any = 1.0,
      key: jax.Array | None = None,
      pretrained: PyTree | None = None,
      **coeffs: Any,
  ) -> PyTree:
    """Merges stacked task vectors into one task vector (pure, jittable).

    Args:
      task_vectors: a tree whose leaves are ``[T, ...]``.
      stats: from :meth:`prepare`; computed here when None (then the inputs
        must be concrete).
      scale: scalar, ``[T]`` (methods with per-task weights) or a prefix tree
        of those over ``task_vectors``.
      key: PRNG key for random methods.
      pretrained: the pretrained params (methods that need them, e.g. SLERP).
      **coeffs: overrides of the method's continuous coefficients.

    Returns:
      The merged task vector, leaves ``[...]`` in the input dtype.
    """
    self._check_key(key)
    paths, leaves, treedef = mtree.flatten(task_vectors)
    t = _num_tasks_stacked(paths, leaves)
    self._check_num_tasks(t)
    coeffs = self._coeffs(coeffs, t)
    self._check_data(
        {p: tuple(np.shape(x)[1:]) for p, x in zip(paths, leaves)}, t
    )
    if stats is None:
      stats = self._prepare(source_from_stacked(task_vectors), key)
    scales = _broadcast_scale(scale, task_vectors, self, t)
    pre_leaves = self._pretrained_leaves(pretrained, paths)
    out = []
    for i, (p, x) in enumerate(zip(paths, leaves)):
      ctx = Ctx(
          glob=stats.glob,
          stats=None if stats.leaf is None else stats.leaf[i],
          scale=scales[i],
          coeffs=coeffs,
          key=None if key is None else jax.random.fold_in(key, i),
          pre=None if pre_leaves is None else pre_leaves[i],
          data=self._leaf_data(p),
          path=p,
      )
      y = self.leaf_fn(self.static, _tau(None, x), ctx)
      out.append(y.astype(x.dtype))
    return mtree.unflatten(treedef, out)

  __call__ = combine

  # -- internals ---------------------------------------------------------------

  def _prepare(self, src: Source, key) -> Stats:
    if self.prepare_fn is None:
      return Stats()
    return self.prepare_fn(self.static, src, key)

  def _coeffs(
      self, overrides: Mapping[str, Any], t: int | None = None
  ) -> dict[str, Any]:
    unknown = sorted(set(overrides) - set(self.coeffs))
    if unknown:
      raise ValueError(
          f"unknown coefficient(s) {unknown} for method {self.name!r}; it "
          f"takes {sorted(self.coeffs) or 'none'} besides scale"
      )
    out = {**self.coeffs, **overrides}
    self._check_coeffs(out, t)
    return out

  def _check_coeffs(self, coeffs: Mapping[str, Any], t: int | None) -> None:
    for name, value in coeffs.items():
      spec = self.coeff_specs.get(name, _checks.Coeff())
      _checks.coeff(self.name, name, value, spec, t)

  def _check_key(self, key) -> None:
    if self.needs_key and key is None:
      raise ValueError(
          f"method {self.name!r} is random: pass key=jax.random.key(...)"
      )
    _checks.key(self.name, key)

  def _check_data(self, shapes: Mapping[str, tuple[int, ...]], t: int):
    """Checks the method's data (Fisher, Grams) like params: one tree per
    model, known leaves, expected shapes, real finite values."""
    for name, per_task in self.data:
      if len(per_task) != t:
        raise ValueError(f"{name}: got {len(per_task)} trees for {t} models")
      for j, d in enumerate(per_task):
        for p, v in d.items():
          if p not in shapes:
            raise ValueError(
                f"{name} names leaf {p!r}, which is not a merged leaf"
            )
          want = (
              shapes[p]
              if self.data_check is None
              else tuple(self.data_check(name, p, shapes[p]))
          )
          if tuple(np.shape(v)) != want:
            raise ValueError(
                f"{name}[{j}] for leaf {p!r} has shape {np.shape(v)}; "
                f"expected {want}"
            )
          dt = mtree.dtype_of(v)
          if not _checks.is_real(dt):
            raise ValueError(
                f"{name}[{j}] for leaf {p!r} has dtype {dt}; expected real "
                "numbers"
            )
          if not _checks.is_traced(v) and not _checks.finite_host_or_device(v):
            raise ValueError(f"{name}[{j}] has NaN or Inf at leaf {p!r}")

  def _check_num_tasks(self, t: int) -> None:
    if t < self.min_tasks:
      raise ValueError(
          f"method {self.name!r} needs at least {self.min_tasks} fine-tuned "
          f"model(s), got {t}"
      )
    if self.max_tasks is not None and t > self.max_tasks:
      raise ValueError(
          f"method {self.name!r} merges at most {self.max_tasks} models, "
          f"got {t}"
      )

  def _pretrained_leaves(self, pretrained, paths):
    if not self.needs_pretrained:
      return None
    if pretrained is None:
      raise ValueError(f"method {self.name!r} needs pretrained=...")
    ppaths, pleaves, _ = mtree.flatten(pretrained)
    lookup = dict(zip(ppaths, pleaves))
    missing = [p for p in paths if p not in lookup]
    if missing:
      raise ValueError(f"pretrained is missing leaf {missing[0]!r}")
    return [lookup[p] for p in paths]

  def _leaf_data(self, path: str) -> dict[str, Any] | None:
    if not self.data:
      return None
    out = {}
    for name, per_task in self.data:
      vals = [d.get(path) for d in per_task]
      if all(v is None for v in vals):
        out[name] = None
      elif any(v is None for v in vals):
        raise ValueError(f"{name} is given for {path!r} in some tasks only")
      else:
        out[name] = jnp.stack([jnp.asarray(v) for v in vals])
    return out


def _broadcast_scale(scale, like: PyTree, merger: Merger, t: int) -> list:
  """Per-leaf scales from a scalar, a ``[T]`` vector or a prefix tree."""
  if isinstance(scale, list | tuple) and all(
      isinstance(v, int | float) for v in scale
  ):
    scale = np.asarray(scale, np.float32)  # a per-task list, not a pytree
  try:
    full = jax.tree.broadcast(scale, like)
  except (ValueError, TypeError) as e:
    raise ValueError(
        f"scale must be a scalar, a [T] vector or a prefix tree of the "
        f"params: {e}"
    ) from None
  paths, leaves, _ = mtree.flatten(full)
  if scale is None or len(leaves) != len(jax.tree.leaves(like)):
    raise ValueError(f"scale must be a number or a tree of numbers: {scale!r}")
  for p, s in zip(paths, leaves):
    if not _checks.is_traced(s):
      _checks.real_array(f"scale for {p!r}", s)
    shape = np.shape(s)
    if shape not in ((), (t,)):
      raise ValueError(
          f"scale for {p!r} has shape {shape}; expected () or ({t},)"
      )
    if shape == (t,) and not merger.per_task_scale:
      raise ValueError(
          f"method {merger.name!r} takes a scalar scale; got a per-task "
          f"vector for {p!r}"
      )
  return leaves


# ----------------------------------------------------------------------------
# merge(): models in, model out.


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _merge_leaf(leaf_fn, static, sharding, pre, fts, ctx):
  def body(pre, fts, ctx):
    tv = _tau(pre, fts)
    merged = leaf_fn(static, tv, ctx._replace(pre=pre))
    return (pre.astype(merged.dtype) + merged).astype(pre.dtype)

  if sharding is None:
    return body(pre, fts, ctx)
  mesh = getattr(sharding, "mesh", None)
  explicit = mesh is not None and any(
      t == jax.sharding.AxisType.Explicit for t in mesh.axis_types
  )
  if explicit:
    # Methods contract, sort or factorise within a leaf (SVD, Gram matrices);
    # let XLA choose those intermediate layouts, then pin the output to the
    # input's sharding.
    return jax.sharding.auto_axes(body, out_sharding=sharding)(pre, fts, ctx)
  return jax.lax.with_sharding_constraint(body(pre, fts, ctx), sharding)


def _sharding_of(x):
  """The sharding to give a merged leaf: the pretrained leaf's, if sharded."""
  s = getattr(x, "sharding", None)
  if s is None or isinstance(x, jax.core.Tracer):
    return None
  if len(s.device_set) <= 1:
    return None
  return s


def prepare_leaves(
    merger: Merger,
    like: PyTree,
    num_tasks: int,
    raw: Callable[[int], tuple[Any, Sequence[Any]]],
    selected: Sequence[int],
    *,
    host: bool,
    scales: Sequence[Any] = (1.0,),
    key: jax.Array | None = None,
    parts: Mapping[int, Sequence[tuple[int, int]]] | None = None,
    rows: Callable[[int, int, int], tuple[Any, Sequence[Any]]] | None = None,
    **coeffs: Any,
) -> Callable[..., jax.Array]:
  """The leaf-by-leaf core of :func:`merge_models`, for streaming merges.

  Computes the method's statistics (reading the task vectors one leaf at a
  time through a :class:`Source` over ``raw``), then returns a function that
  merges one leaf on demand, so a caller can load, merge, write and free the
  leaves of a model larger than memory one at a time. ``merge_models`` is
  this plus the input checks, over the leaves of in-memory trees; the same
  inputs give bitwise the same leaves either way.

  Args:
    merger: the method.
    like: a tree with the params' structure whose leaves are arrays or
      ``jax.ShapeDtypeStruct`` (for paths, shapes and scale broadcasting);
      leaves are addressed by their index in its flattening order.
    num_tasks: ``T``.
    raw: ``raw(i) -> (pretrained leaf i, T fine-tuned leaves i)``; called
      once or more per selected leaf by the statistics passes and once per
      merged leaf. It may load leaves lazily (memory-mapped files, a
      per-leaf transfer to sharded device arrays).
    selected: the flat indices of the leaves to merge (floating, included),
      in flattening order; leaf ``selected[j]`` takes ``fold_in(key, j)``.
    host: every selected leaf lives in host memory (numpy selection); False
      for sharded or device arrays (jitted reductions).
    scales: the scales the merged leaves will be asked for (each as
      ``merge``'s ``scale``, validated here before any work).
    key: PRNG key for random methods.
    parts: optional row ranges ``{i: [(start, stop), ...]}`` of the leading
      axis of large host leaves, read with ``rows``: statistics that do not
      depend on how a leaf is cut read them part by part (see
      :class:`Source`), and :attr:`Merger.elementwise` methods merge them
      part by part into one numpy array, so memory holds a part of each
      model rather than the whole leaf. The result is the same.
    rows: ``rows(i, start, stop)`` -> ``raw(i)`` restricted to those rows.
    **coeffs: overrides of the method's continuous coefficients.

  Returns:
    ``merged(i, s=0)``: leaf ``i`` (one of ``selected``) merged with
    ``scales[s]``, in the pretrained leaf's dtype (and sharding).
  """
  merger._check_key(key)
  merger._check_num_tasks(num_tasks)
  coeffs = merger._coeffs(coeffs, num_tasks)
  paths, like_leaves, _ = mtree.flatten(like)
  for i in selected:
    _checks.leaf_dtype(paths[i], like_leaves[i])
  per_scale = [_broadcast_scale(s, like, merger, num_tasks) for s in scales]
  data_paths = [paths[i] for i in selected]
  merger._check_data(
      {paths[i]: tuple(np.shape(like_leaves[i])) for i in selected}, num_tasks
  )
  position = {i: j for j, i in enumerate(selected)}
  parts = dict(parts or {}) if rows is not None and host else {}
  src = Source(
      data_paths,
      [np.shape(like_leaves[i]) for i in selected],
      num_tasks,
      lambda j: raw(selected[j]),
      host,
      parts=[parts.get(i) for i in selected],
      rows=None if not parts else (lambda j, a, b: rows(selected[j], a, b)),
  )
  stats = merger._prepare(src, key)
  del src  # frees the selection buffer before the outputs are allocated

  def merged(i: int, s: int = 0) -> jax.Array:
    j = position[i]
    ctx = Ctx(
        glob=stats.glob,
        stats=None if stats.leaf is None else stats.leaf[j],
        scale=per_scale[s][i],
        coeffs=coeffs,
        key=None if key is None else jax.random.fold_in(key, j),
        pre=None,
        data=merger._leaf_data(paths[i]),
        path=None,  # static strings stay out of the jitted kernel
    )
    if merger.elementwise and parts.get(i):
      out = np.empty(np.shape(like_leaves[i]), mtree.dtype_of(like_leaves[i]))
      for a, b in parts[i]:
        pre, fts = rows(i, a, b)
        out[a:b] = np.asarray(
            _merge_leaf(
                merger.leaf_fn, merger.static, None, pre, tuple(fts), ctx
            )
        )
      return out
    pre, fts = raw(i)
    return _merge_leaf(
        merger.leaf_fn,
        merger.static,
        _sharding_of(pre),
        pre,
        tuple(fts),
        ctx,
    )

  return merged


def merge_models(
    merger: Merger,
    pretrained: PyTree,
    finetuned: Sequence[PyTree],
    *,
    scale: Any = 1.0,
    key: jax.Array | None = None,
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    check_finite: bool = True,
    **coeffs: Any,
) -> PyTree:
  """See :func:`mtx.merging.merge`."""
  if isinstance(finetuned, Mapping) or not isinstance(finetuned, Sequence):
    raise ValueError(
        "finetuned must be a list of fine-tuned param trees, got "
        f"{type(finetuned).__name__}"
    )
  finetuned = list(finetuned)
  if not finetuned:
    raise ValueError("no fine-tuned models to merge")
  merger._check_key(key)
  merger._check_num_tasks(len(finetuned))
  coeffs = merger._coeffs(coeffs, len(finetuned))
  for i, ft in enumerate(finetuned):
    mtree.assert_same_structure(
        pretrained, ft, names=("pretrained", f"finetuned[{i}]")
    )
  paths, pre_leaves, treedef = mtree.flatten(pretrained)
  ft_leaves = [mtree.flatten(ft)[1] for ft in finetuned]
  selected = jax.tree.leaves(mtree.select(pretrained, include, exclude))
  idx = [i for i, s in enumerate(selected) if s]
  if not idx:
    raise ValueError(
        f"include={include!r} / exclude={exclude!r} select no leaf"
    )
  for i in idx:
    _checks.leaf_dtype(paths[i], pre_leaves[i])
    for j, f in enumerate(ft_leaves):
      _checks.leaf_dtype(paths[i], f[i], f"finetuned[{j}]")
      if mtree.dtype_of(f[i]) != mtree.dtype_of(pre_leaves[i]):
        raise ValueError(
            f"dtype mismatch at {paths[i]!r}: pretrained "
            f"{mtree.dtype_of(pre_leaves[i])} vs finetuned[{j}] "
            f"{mtree.dtype_of(f[i])}"
        )
  if check_finite:
    for i in idx:
      for name, x in [("pretrained", pre_leaves[i])] + [
          (f"finetuned[{j}]", f[i]) for j, f in enumerate(ft_leaves)
      ]:
        if not _checks.finite_host_or_device(x):
          raise ValueError(
              f"{name} has NaN or Inf at {paths[i]!r} (pass "
              "check_finite=False to skip this check)"
          )
  host = all(
      _select.on_host(pre_leaves[i])
      and all(_select.on_host(f[i]) for f in ft_leaves)
      for i in idx
  )
  merged = prepare_leaves(
      merger,
      pretrained,
      len(finetuned),
      lambda i: (pre_leaves[i], tuple(f[i] for f in ft_leaves)),
      idx,
      host=host,
      scales=(scale,),
      key=key,
      **coeffs,
  )
  out = list(pre_leaves)
  for i in idx:
    out[i] = merged(i)
  return mtree.unflatten(treedef, out)


# ----------------------------------------------------------------------------
# Factories.


def check_fraction(name: str, value: float, *, allow_zero: bool = False):
  """Raises ``ValueError`` unless ``value`` is in (0, 1] (or [0, 1])."""
  try:
    v = float(value)
  except (TypeError, ValueError):
    raise ValueError(f"{name} must be a number, got {value!r}") from None
  lo_ok = v >= 0 if allow_zero else v > 0
  if not (lo_ok and v <= 1) or np.isnan(v):
    rng = "[0, 1]" if allow_zero else "(0, 1]"
    raise ValueError(f"{name} must be in {rng}, got {value!r}")
  return v


def check_choice(name: str, value: Any, choices: Sequence[Any]):
  if value not in choices:
    raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")
  return value


def call_factory(name: str, factory: Callable[..., Merger], hparams) -> Merger:
  """Calls ``factory(**hparams)``, turning unknown names into ValueError."""
  sig = inspect.signature(factory)
  accepts_var = any(
      p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values()
  )
  if not accepts_var:
    unknown = sorted(set(hparams) - set(sig.parameters))
    if unknown:
      raise ValueError(
          f"unknown hyperparameter(s) {unknown} for method {name!r}; it "
          f"takes {sorted(sig.parameters)}"
      )
  return factory(**hparams)
