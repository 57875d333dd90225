"""Path-aware pytree math.

Every function here is a pure map over parameter pytrees (nested dicts, lists,
tuples, ``flax`` states, ...). Leaves are addressed by their *path*: the keys
from the root joined with ``/`` (``"encoder/layers_0/attn/kernel"``), as
produced by :func:`path_str`. Regex rules over those paths select leaves
(``include``/``exclude``) or assign per-leaf values (:func:`rules_to_tree`),
in the first-match style of big_vision.

Arithmetic (:func:`vdot`, norms, :func:`cosine`) accumulates in float32, or in
float64 when ``jax_enable_x64`` is on; elementwise results keep the leaves'
dtype.

Example:

>>> import jax.numpy as jnp
>>> from mtx import tree
>>> a = {"w": jnp.array([1.0, 2.0]), "b": jnp.array(3.0)}
>>> b = {"w": jnp.array([0.5, 0.5]), "b": jnp.array(1.0)}
>>> tree.paths(tree.sub(a, b))
['b', 'w']
>>> float(tree.vdot(a, b))
4.5
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any
Rules = Sequence[tuple[str, Any]]

__all__ = [
    "accum_dtype",
    "add",
    "add_scale",
    "assert_same_structure",
    "cosine",
    "dtype_of",
    "flatten",
    "is_floating",
    "l1_norm",
    "l2_norm",
    "map_with_path",
    "mask",
    "num_elements",
    "path_str",
    "paths",
    "rules_to_tree",
    "scale",
    "select",
    "stack",
    "sub",
    "unflatten",
    "unstack",
    "vdot",
    "zeros_like",
]


def path_str(path: Sequence[Any]) -> str:
  """Returns the ``/``-joined name of a key path (``"a/b/0"``)."""
  return jax.tree_util.keystr(tuple(path), simple=True, separator="/")


def flatten(tree: PyTree) -> tuple[list[str], list[Any], Any]:
  """Returns ``(paths, leaves, treedef)`` of ``tree`` in canonical order."""
  with_path, treedef = jax.tree_util.tree_flatten_with_path(tree)
  return [path_str(p) for p, _ in with_path], [x for _, x in with_path], treedef


def unflatten(treedef: Any, leaves: Iterable[Any]) -> PyTree:
  """Inverse of :func:`flatten`."""
  return jax.tree_util.tree_unflatten(treedef, list(leaves))


def paths(tree: PyTree) -> list[str]:
  """Returns the path of every leaf of ``tree``, in flattening order."""
  return flatten(tree)[0]


def map_with_path(
    fn: Callable[..., Any], tree: PyTree, *rest: PyTree
) -> PyTree:
  """Like ``jax.tree.map`` but ``fn(path_str, leaf, *rest_leaves)``."""
  return jax.tree_util.tree_map_with_path(
      lambda p, x, *r: fn(path_str(p), x, *r), tree, *rest
  )


def accum_dtype() -> jnp.dtype:
  """The accumulation dtype: float64 under ``jax_enable_x64``, else float32."""
  return jnp.dtype(jnp.float64 if jax.config.jax_enable_x64 else jnp.float32)


def _acc(x: jax.typing.ArrayLike) -> jax.Array:
  return jnp.asarray(x).astype(accum_dtype())


# ----------------------------------------------------------------------------
# Structure checks.


def _describe(x: Any) -> str:
  if hasattr(x, "shape") and hasattr(x, "dtype"):
    return f"{jnp.dtype(x.dtype).name}{list(x.shape)}"
  return type(x).__name__


def assert_same_structure(
    a: PyTree,
    b: PyTree,
    *,
    check_shapes: bool = True,
    check_dtypes: bool = True,
    names: tuple[str, str] = ("first", "second"),
) -> None:
  """Raises ``ValueError`` naming the first path where ``a`` and ``b`` differ.

  Compares the set of leaf paths (a missing or extra leaf is named), then
  shapes and dtypes leaf by leaf.

  Args:
    a: a pytree.
    b: a pytree.
    check_shapes: compare leaf shapes.
    check_dtypes: compare leaf dtypes.
    names: how ``a`` and ``b`` are called in the message.

  Raises:
    ValueError: on the first difference, e.g. ``"second is missing leaf
      'enc/w'"`` or ``"shape mismatch at 'enc/w': first float32[2, 3] vs
      second float32[3, 2]"``.
  """
  pa, la, ta = flatten(a)
  pb, lb, tb = flatten(b)
  if pa != pb:
    sa, sb = set(pa), set(pb)
    missing = [p for p in pa if p not in sb]
    extra = [p for p in pb if p not in sa]
    if missing:
      raise ValueError(f"{names[1]} is missing leaf {missing[0]!r}")
    if extra:
      raise ValueError(f"{names[1]} has extra leaf {extra[0]!r}")
    raise ValueError(
        f"leaf order differs between {names[0]} and {names[1]}: "
        f"{pa[:3]}... vs {pb[:3]}..."
    )
  if ta != tb:
    raise ValueError(
        f"tree structure differs between {names[0]} and {names[1]}: "
        f"{ta} vs {tb}"
    )
  for p, x, y in zip(pa, la, lb):
    if check_shapes and np.shape(x) != np.shape(y):
      raise ValueError(
          f"shape mismatch at {p!r}: {names[0]} {_describe(x)} vs "
          f"{names[1]} {_describe(y)}"
      )
    if check_dtypes:
      dx = getattr(x, "dtype", None)
      dy = getattr(y, "dtype", None)
      if dx is not None and dy is not None and jnp.dtype(dx) != jnp.dtype(dy):
        raise ValueError(
            f"dtype mismatch at {p!r}: {names[0]} {_describe(x)} vs "
            f"{names[1]} {_describe(y)}"
        )


# ----------------------------------------------------------------------------
# Elementwise algebra.


def sub(a: PyTree, b: PyTree) -> PyTree:
  """``a - b`` leaf by leaf."""
  return jax.tree.map(jnp.subtract, a, b)


def add(a: PyTree, *rest: PyTree) -> PyTree:
  """``a + b + ...`` leaf by leaf (in float32, cast to ``a``'s dtype)."""
  return jax.tree.map(
      lambda x, *ys: sum((_acc(y) for y in ys), start=_acc(x)).astype(x.dtype),
      a,
      *rest,
  )


def scale(s: jax.typing.ArrayLike, a: PyTree) -> PyTree:
  """``s * a`` leaf by leaf; the result keeps each leaf's dtype."""
  return jax.tree.map(lambda x: (s * _acc(x)).astype(x.dtype), a)


def add_scale(a: PyTree, s: jax.typing.ArrayLike, b: PyTree) -> PyTree:
  """``a + s * b`` leaf by leaf (computed in float32, cast to ``a``'s dtype)."""
  return jax.tree.map(
      lambda x, y: (_acc(x) + s * _acc(y)).astype(x.dtype), a, b
  )


def zeros_like(a: PyTree) -> PyTree:
  """A tree of zeros shaped like ``a``."""
  return jax.tree.map(jnp.zeros_like, a)


# ----------------------------------------------------------------------------
# Reductions (float32 / float64 accumulation).


def vdot(a: PyTree, b: PyTree) -> jax.Array:
  """Sum over leaves of ``<a_leaf, b_leaf>``."""
  parts = jax.tree.leaves(
      jax.tree.map(lambda x, y: jnp.vdot(_acc(x), _acc(y)), a, b)
  )
  return sum(parts, start=jnp.zeros((), accum_dtype()))


def l2_norm(a: PyTree) -> jax.Array:
  """Euclidean norm of the concatenation of all leaves."""
  return jnp.sqrt(vdot(a, a))


def l1_norm(a: PyTree) -> jax.Array:
  """Sum of absolute values over all leaves."""
  parts = [jnp.sum(jnp.abs(_acc(x))) for x in jax.tree.leaves(a)]
  return sum(parts, start=jnp.zeros((), accum_dtype()))


def cosine(a: PyTree, b: PyTree, eps: float = 1e-12) -> jax.Array:
  """Cosine similarity of two trees viewed as flat vectors.

  Returns 0 when either tree is all zeros (``eps`` guards the division).
  """
  return vdot(a, b) / jnp.maximum(l2_norm(a) * l2_norm(b), eps)


def dtype_of(x: Any) -> np.dtype:
  """A leaf's dtype, without converting (or transferring) the leaf."""
  dt = getattr(x, "dtype", None)
  if dt is None and isinstance(x, str | bytes):
    return np.asarray(x).dtype  # np.result_type("float32") reads a dtype name
  return np.dtype(np.result_type(x) if dt is None else dt)


def is_floating(x: Any) -> bool:
  """Whether a leaf has a floating (or complex) dtype."""
  return jnp.issubdtype(dtype_of(x), jnp.inexact)


def num_elements(a: PyTree) -> int:
  """Total number of scalars over all leaves."""
  return sum(math.prod(np.shape(x)) for x in jax.tree.leaves(a))


# ----------------------------------------------------------------------------
# A leading task axis.


def stack(trees: Sequence[PyTree]) -> PyTree:
  """Stacks ``T`` same-structured trees into one tree with leaves ``[T, ...]``.

  Raises:
    ValueError: if ``trees`` is empty or the trees differ (path named).
  """
  if not trees:
    raise ValueError("stack needs at least one tree")
  for i, t in enumerate(trees[1:], start=1):
    assert_same_structure(trees[0], t, names=("tree 0", f"tree {i}"))
  return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def unstack(tree: PyTree) -> list[PyTree]:
  """Inverse of :func:`stack`: splits leaves ``[T, ...]`` into ``T`` trees."""
  leaves, treedef = jax.tree.flatten(tree)
  if not leaves:
    return []
  n = np.shape(leaves[0])[0]
  for p, x in zip(paths(tree), leaves):
    if np.ndim(x) == 0 or np.shape(x)[0] != n:
      raise ValueError(
          f"unstack: leaf {p!r} has shape {np.shape(x)}, expected a leading "
          f"axis of size {n}"
      )
  return [treedef.unflatten([x[i] for x in leaves]) for i in range(n)]


# ----------------------------------------------------------------------------
# Path regexes.


def _compile(patterns: str | Sequence[str] | None) -> list[re.Pattern[str]]:
  if patterns is None:
    return []
  if isinstance(patterns, str):
    patterns = [patterns]
  out = []
  for pat in patterns:
    try:
      out.append(re.compile(pat))
    except re.error as e:
      raise ValueError(f"invalid path regex {pat!r}: {e}") from None
  return out


def select(
    tree: PyTree,
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
) -> PyTree:
  """A tree of Python bools: which leaves are selected.

  A leaf is selected when its path matches (``re.search``) some ``include``
  pattern (all leaves when ``include`` is None) and no ``exclude`` pattern.

  >>> select({"head": 1, "enc": {"w": 2}}, exclude="^head")
  {'enc': {'w': True}, 'head': False}
  """
  inc, exc = _compile(include), _compile(exclude)

  def one(path: str, _):
    if inc and not any(r.search(path) for r in inc):
      return False
    return not any(r.search(path) for r in exc)

  return map_with_path(one, tree)


def mask(
    tree: PyTree,
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
) -> PyTree:
  """``tree`` with unselected leaves (see :func:`select`) set to zero."""
  sel = select(tree, include, exclude)
  return jax.tree.map(lambda x, s: x if s else jnp.zeros_like(x), tree, sel)


def rules_to_tree(
    tree: PyTree, rules: Rules, default: Any = None, *, strict: bool = True
) -> PyTree:
  """Assigns each leaf the value of the first rule whose regex matches its path.

  Args:
    tree: the pytree whose paths are matched.
    rules: ``[(regex, value), ...]``, tried in order with ``re.search``.
    default: the value of a leaf no rule matches.
    strict: raise if a leaf matches no rule and ``default`` is None, or if a
      rule matches no leaf (a typo would otherwise be silently ignored).

  Returns:
    A tree of the same structure holding the chosen values.

  >>> rules_to_tree({"a": {"w": 0}, "b": 0}, [("^a/", 0.5), (".*", 1.0)])
  {'a': {'w': 0.5}, 'b': 1.0}
  """
  compiled = [
      (r, v) for r, (_, v) in zip(_compile([p for p, _ in rules]), rules)
  ]
  used = [False] * len(compiled)

  def one(path: str, _):
    for i, (r, v) in enumerate(compiled):
      if r.search(path):
        used[i] = True
        return v
    if strict and default is None:
      raise ValueError(f"no rule matches leaf {path!r}")
    return default

  # Values may be arrays or None; keep them as leaves of the result.
  out_leaves = [one(p, x) for p, x in zip(*flatten(tree)[:2])]
  if strict:
    for (pat, _), u in zip(rules, used):
      if not u:
        raise ValueError(f"rule {pat!r} matches no leaf")
  return jax.tree_util.tree_unflatten(jax.tree.structure(tree), out_leaves)
