"""mtx: composing what models learn on many tasks, in JAX.

Modules:
  tree: path-aware pytree math.
  task_vectors: task vectors, their algebra, masks and compression.
  merging: every training-free merging method behind one registry.
  ntk: tangent-space (linearised) models, empirical NTK, disentanglement.
  sharding: mesh helpers; path rules to NamedSharding trees.
"""

from mtx import merging
from mtx import ntk
from mtx import sharding
from mtx import task_vectors
from mtx import tree

__version__ = "0.1.0"

__all__ = [
    "merging",
    "ntk",
    "sharding",
    "task_vectors",
    "tree",
    "__version__",
]
