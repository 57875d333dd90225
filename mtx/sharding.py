"""Mesh helpers: path rules to ``NamedSharding`` trees.

Which parameter is sharded how is a list of first-match regex rules over
parameter paths (as big_vision does), e.g.::

  rules = [
      (r"kernel$", P("data", "model")),   # 2-D kernels: both axes
      (r".*", P()),                        # everything else replicated
  ]
  params = mtx.sharding.shard(params, mesh, rules)

Every merging function accepts params sharded this way, returns them with the
same shardings, and never gathers a model onto one device.
"""

from __future__ import annotations

from collections.abc import Sequence
import re
from typing import Any

import jax
import numpy as np

from mtx import tree as mtree

P = jax.sharding.PartitionSpec
PyTree = Any


def make_mesh(
    axis_shapes: Sequence[int],
    axis_names: Sequence[str],
    *,
    explicit: bool = True,
) -> jax.sharding.Mesh:
  """``jax.make_mesh`` with explicit (default) or auto axis types."""
  kind = (
      jax.sharding.AxisType.Explicit if explicit else jax.sharding.AxisType.Auto
  )
  return jax.make_mesh(
      tuple(axis_shapes),
      tuple(axis_names),
      axis_types=(kind,) * len(axis_names),
  )


def default_spec(shape: Sequence[int], mesh: jax.sharding.Mesh) -> P:
  """The default layout of a tensor on ``mesh``.

  The mesh axis named ``model`` (if any) goes first, then the others in mesh
  order; each takes the largest tensor axis not yet taken whose size it
  divides (ties: the earlier axis). Axes nothing fits are replicated.

  >>> mesh = jax.sharding.AbstractMesh((2, 4), ("data", "model"))
  >>> default_spec((8, 12), mesh), default_spec((3,), mesh)
  (P('data', 'model'), P())
  """
  names = sorted(mesh.axis_names, key=lambda n: n != "model")
  spec: list[Any] = [None] * len(shape)
  for name in names:
    size = mesh.shape[name]
    if size == 1:
      continue
    free = [
        a for a in range(len(shape)) if spec[a] is None and shape[a] % size == 0
    ]
    if free:
      a = max(free, key=lambda a: (shape[a], -a))
      spec[a] = name
  while spec and spec[-1] is None:
    spec.pop()
  return P(*spec)


def check_spec(
    path: str, shape: Sequence[int], spec: P, mesh: jax.sharding.Mesh
) -> None:
  """Raises ``ValueError`` naming ``path`` where ``spec`` does not fit a
  tensor of ``shape`` on ``mesh`` (too many axes, an unknown mesh axis, a
  dimension the mesh axes do not divide)."""
  shape = tuple(shape)
  if len(spec) > len(shape):
    raise ValueError(
        f"spec {spec} for {path!r} has more axes than its shape {shape}"
    )
  for dim, names in zip(shape, spec):
    if names is None:
      continue
    names = (names,) if isinstance(names, str) else tuple(names)
    for n in names:
      if n not in mesh.shape:
        raise ValueError(
            f"spec {spec} for {path!r} names mesh axis {n!r}; the mesh has "
            f"{tuple(mesh.axis_names)}"
        )
    size = int(np.prod([mesh.shape[n] for n in names]))
    if dim % size:
      raise ValueError(
          f"{path!r}: dimension {dim} is not divisible by mesh axes "
          f"{names} of size {size}"
      )


def shardings_for(
    paths: Sequence[str],
    shapes: Sequence[Sequence[int]],
    mesh: jax.sharding.Mesh,
    rules: Sequence[tuple[str, P]] = (),
    *,
    default: P | None = None,
) -> list[jax.sharding.NamedSharding]:
  """One ``NamedSharding`` per tensor: the first rule whose regex matches the
  path (``re.search``), else ``default`` (None: :func:`default_spec`).

  Raises:
    ValueError: a spec that does not fit its tensor (:func:`check_spec`), or
      an invalid regex.
  """
  compiled = []
  for pattern, spec in rules:
    try:
      compiled.append((re.compile(pattern), spec))
    except re.error as e:
      raise ValueError(f"invalid regex {pattern!r}: {e}") from None
  out = []
  for path, shape in zip(paths, shapes):
    spec = next((s for r, s in compiled if r.search(path)), None)
    if spec is None:
      spec = default_spec(shape, mesh) if default is None else default
    check_spec(path, shape, spec, mesh)
    out.append(jax.sharding.NamedSharding(mesh, spec))
  return out


def shardings_from_rules(
    params: PyTree,
    mesh: jax.sharding.Mesh,
    rules: Sequence[tuple[str, P]],
) -> PyTree:
  """A tree of ``NamedSharding`` for ``params`` from first-match path rules
  (leaves no rule matches are replicated).

  A spec longer than a leaf's rank, naming an axis the mesh lacks, or naming
  an axis whose size does not divide the leaf's dimension, raises
  ``ValueError`` naming the path.
  """
  paths, leaves, treedef = mtree.flatten(params)
  out = shardings_for(
      paths, [np.shape(x) for x in leaves], mesh, rules, default=P()
  )
  return treedef.unflatten(out)


def shard(
    params: PyTree,
    mesh: jax.sharding.Mesh,
    rules: Sequence[tuple[str, P]],
) -> PyTree:
  """Places ``params`` on ``mesh`` following ``rules`` (see module docs)."""
  return jax.device_put(params, shardings_from_rules(params, mesh, rules))
