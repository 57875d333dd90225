"""mtx: composing what models learn on many tasks, in JAX.

Modules:
  tree: path-aware pytree math.
  task_vectors: task vectors, their algebra, masks and compression.
  merging: every training-free merging method behind one registry.
  ntk: tangent-space (linearised) models, empirical NTK, disentanglement.
  sharding: mesh helpers; path rules to NamedSharding trees.
  moe: routers and mixture-of-experts layers (single device, expert parallel).
  models: Flax models as pure (init, apply) pairs (imports flax).
  data: offline datasets and task suites.
  io: safetensors / Hugging Face checkpoint import and export.
  checkpoint: orbax save/restore with metadata (imports orbax).
  training: optimizer, loss and (linearised) train/eval steps.
  learned: data-driven merging (Fisher diagonals, RegMean Gram matrices).

The last seven load on first use (``mtx.models``), so ``import mtx`` stays
light and the core needs only jax and numpy.
"""

import importlib

from mtx import merging
from mtx import ntk
from mtx import sharding
from mtx import task_vectors
from mtx import tree

__version__ = "0.1.0"

_LAZY = (
    "checkpoint",
    "data",
    "io",
    "learned",
    "models",
    "moe",
    "training",
)


def __getattr__(name):
  if name in _LAZY:
    return importlib.import_module(f"mtx.{name}")
  raise AttributeError(f"module 'mtx' has no attribute {name!r}")


__all__ = [
    "checkpoint",
    "data",
    "io",
    "learned",
    "merging",
    "models",
    "moe",
    "ntk",
    "sharding",
    "task_vectors",
    "training",
    "tree",
    "__version__",
]
