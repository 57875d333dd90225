"""The method protocol: :class:`Merger`, :class:`Stats`, :class:`Ctx`.

A method is a :class:`Merger`: structural hyperparameters are bound when it is
built (``get("ties", density=0.2)``); continuous coefficients (``scale`` and
the method's own, e.g. SLERP's ``t``) are traced call arguments, so one
compiled program serves a sweep under ``jax.vmap`` and ``jax.grad`` reaches
them.

A method is written as two pure pieces:

* ``prepare(static, source, key)`` (optional): global statistics that need
  every leaf at once (TIES/TALL/PCB/ComPEFT thresholds, the TIES majority
  sign). It reads the task vectors leaf by leaf from a
  :class:`~mtx.merging.Source`, so the memory it needs is one leaf's
  ``[T, ...]`` task vectors at a time.
* ``leaf(static, tv, ctx)``: the merged task vector of one leaf from its
  task vectors ``tv`` (a tuple of ``T`` arrays, float32 or float64; see
  ``Tasks``) and the context ``ctx`` (statistics, coefficients, per-leaf key,
  pretrained leaf).

``static`` is a hashable NamedTuple of the method's structural
hyperparameters (``TiesHParams``...). This module also holds the helpers
methods share: task sums and means, per-task scales, scale broadcasting,
hyperparameter checks and :func:`method`, which records a factory's
task-count limits so they can be read without building it.
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

from mtx import tree as mtree
from mtx.merging import _checks
from mtx.merging import _source

PyTree = Any
Tasks = _source.Tasks


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


def dot(x: jax.Array, y: jax.Array) -> jax.Array:
  """``Σ x·y`` over all entries; no ``ravel``, so a sharded leaf is reduced
  in place (a reshape of a sharded array would gather it)."""
  return jnp.sum(x * y)


def max_abs(x: jax.Array) -> jax.Array:
  """``max |x|`` (0 for an empty array)."""
  return jnp.max(jnp.abs(x)) if x.size else jnp.zeros((), x.dtype)


def norm(x: jax.Array) -> jax.Array:
  """``‖x‖₂`` without overflow for entries near the dtype's largest."""
  m = max_abs(x)
  safe = jnp.where(m > 0, m, 1)
  return m * jnp.sqrt(dot(x / safe, x / safe))


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
    src = _source.source_from_stacked(task_vectors)
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
    t = _source.num_tasks_stacked(paths, leaves)
    self._check_num_tasks(t)
    coeffs = self._coeffs(coeffs, t)
    self._check_data(
        {p: tuple(np.shape(x)[1:]) for p, x in zip(paths, leaves)}, t
    )
    if stats is None:
      stats = self._prepare(_source.source_from_stacked(task_vectors), key)
    scales = broadcast_scale(scale, task_vectors, self, t)
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
      y = self.leaf_fn(self.static, _source.tau(None, x), ctx)
      out.append(y.astype(x.dtype))
    return mtree.unflatten(treedef, out)

  __call__ = combine

  # -- internals ---------------------------------------------------------------

  def _prepare(self, src: _source.Source, key) -> Stats:
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


def broadcast_scale(scale, like: PyTree, merger: Merger, t: int) -> list:
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
# Factories.


def check_fraction(name: str, value: float, *, allow_zero: bool = False):
  """Raises ``ValueError`` unless ``value`` is in (0, 1] (or [0, 1])."""
  if isinstance(value, bool | np.bool_):
    raise ValueError(f"{name} must be a number, not a bool: got {value!r}")
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


def method(
    *,
    min_tasks: int = 1,
    max_tasks: int | None = None,
    wraps: str | None = None,
    base_defaults: Mapping[str, Mapping[str, Any]] | None = None,
) -> Callable[[Callable[..., Merger]], Callable[..., Merger]]:
  """Records what a factory's registry entry states without building it.

  Sets ``factory.min_tasks`` and ``factory.max_tasks`` (None: no limit), the
  task counts the built :class:`Merger` accepts. A wrapper method (DARE,
  LiNeS, Consensus) names with ``wraps`` the argument that takes its base
  method: ``mtx.merging.get`` builds the base from a registry name given
  there (with the hyperparameters the wrapper does not take itself, over
  ``base_defaults[base name]``) and passes the wrapper the built
  :class:`Merger`. A wrapper's limits are its base's; the ones recorded here
  are those of its default base.
  """

  def record(factory):
    factory.min_tasks = min_tasks
    factory.max_tasks = max_tasks
    factory.wraps = wraps
    factory.base_defaults = dict(base_defaults or {})
    return factory

  return record


def built_base(
    wrapper: str, arg: str, base: Any, base_hparams: Mapping[str, Any]
) -> Merger:
  """The base method a wrapper factory was given (a built :class:`Merger`)."""
  if not isinstance(base, Merger):
    raise ValueError(
        f"{wrapper}: {arg} must be a built Merger here; pass a method name "
        f"through mtx.merging.get({wrapper!r}, {arg}=...), got {base!r}"
    )
  if base_hparams:
    raise ValueError(
        f"unknown hyperparameter(s) {sorted(base_hparams)} for {wrapper} "
        f"with a built {arg} {base.name!r}"
    )
  return base
