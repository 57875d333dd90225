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


def shardings_from_rules(
    params: PyTree,
    mesh: jax.sharding.Mesh,
    rules: Sequence[tuple[str, P]],
) -> PyTree:
  """A tree of ``NamedSharding`` for ``params`` from first-match path rules.

  A spec longer than a leaf's rank, or naming an axis whose size does not
  divide the leaf's dimension, raises ``ValueError`` naming the path.
  """
  specs = mtree.rules_to_tree(params, rules, default=P(), strict=False)
  paths, leaves, treedef = mtree.flatten(params)
  spec_leaves = treedef.flatten_up_to(specs)
  out = []
  for path, x, spec in zip(paths, leaves, spec_leaves):
    shape = np.shape(x)
    if len(spec) > len(shape):
      raise ValueError(
          f"spec {spec} for {path!r} has more axes than its shape {shape}"
      )
    for dim, names in zip(shape, spec):
      if names is None:
        continue
      names = (names,) if isinstance(names, str) else names
      size = int(np.prod([mesh.shape[n] for n in names]))
      if dim % size:
        raise ValueError(
            f"{path!r}: dimension {dim} is not divisible by mesh axes "
            f"{names} of size {size}"
        )
    out.append(jax.sharding.NamedSharding(mesh, spec))
  return treedef.unflatten(out)


def shard(
    params: PyTree,
    mesh: jax.sharding.Mesh,
    rules: Sequence[tuple[str, P]],
) -> PyTree:
  """Places ``params`` on ``mesh`` following ``rules`` (see module docs)."""
  return jax.device_put(params, shardings_from_rules(params, mesh, rules))
