"""The MoE trainer's data: characters of a text that ships with Python.

Flag-free, used by experiments/moe_train_lib.py. The global batch of step
``s`` is a pure function of ``(seed, s)`` (:func:`batch_starts`), and every
process builds only the rows its devices hold (:func:`global_batch`).
"""

from __future__ import annotations

import ast
import codecs
import functools
import importlib.util
from collections.abc import Sequence
from pathlib import Path

import jax
import numpy as np

__all__ = [
    "STDLIB_MODULES",
    "batch_starts",
    "decode",
    "encode",
    "global_batch",
    "load_text",
    "split_text",
]

# Standard-library modules whose docstrings make the "stdlib" text (a fixed
# list, read from their source files without importing them).
STDLIB_MODULES = (
    "argparse",
    "ast",
    "calendar",
    "collections",
    "configparser",
    "contextlib",
    "csv",
    "dataclasses",
    "datetime",
    "decimal",
    "difflib",
    "doctest",
    "fractions",
    "functools",
    "heapq",
    "inspect",
    "json",
    "logging",
    "optparse",
    "pathlib",
    "pickle",
    "pprint",
    "random",
    "shutil",
    "statistics",
    "string",
    "subprocess",
    "tempfile",
    "textwrap",
    "threading",
    "typing",
    "zipfile",
)


def _source(module: str) -> str:
  spec = importlib.util.find_spec(module)
  if spec is None or not spec.origin or not spec.origin.endswith(".py"):
    raise ValueError(f"no Python source for module {module!r}")
  return Path(spec.origin).read_text(encoding="utf-8")


def _docstrings(source: str) -> list[str]:
  tree = ast.parse(source)
  nodes = [tree] + [
      n
      for n in ast.walk(tree)
      if isinstance(n, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef))
  ]
  return [d for d in (ast.get_docstring(n) for n in nodes) if d]


@functools.cache
def load_text(name: str) -> str:
  """The training text: ``"zen"`` (``import this``) or ``"stdlib"``.

  Read from Python's own source files (no import side effects, no
  downloads). ``"stdlib"`` concatenates the module, class and function
  docstrings of :data:`STDLIB_MODULES` (so it varies a little between
  Python versions; the Zen does not).
  """
  if name == "zen":
    tree = ast.parse(_source("this"))
    for node in tree.body:
      if isinstance(node, ast.Assign) and node.targets[0].id == "s":
        return codecs.decode(ast.literal_eval(node.value), "rot13")
    raise ValueError("could not find the Zen of Python in this.py")
  if name == "stdlib":
    return "\n\n".join(
        d for m in STDLIB_MODULES for d in _docstrings(_source(m))
    )
  raise ValueError(f"unknown text {name!r}; known: 'zen', 'stdlib'")


def encode(text: str) -> np.ndarray:
  """ASCII codes (non-ASCII characters become ``?``): int32 ``[N]``."""
  return np.frombuffer(text.encode("ascii", errors="replace"), np.uint8).astype(
      np.int32
  )


def decode(ids: Sequence[int]) -> str:
  return bytes(int(i) for i in ids).decode("ascii", errors="replace")


def split_text(ids: np.ndarray, validation_fraction: float):
  """``(train, validation)``: the text's head and its last fraction."""
  n_val = int(round(len(ids) * validation_fraction))
  return ids[: len(ids) - n_val], ids[len(ids) - n_val :]


def batch_starts(
    num_tokens: int, batch_size: int, length: int, step: int, seed: int
) -> np.ndarray:
  """Window starts of the global batch of ``step`` (pure in seed, step)."""
  if num_tokens < length:
    raise ValueError(
        f"the text has {num_tokens} tokens, fewer than a window of {length}"
    )
  rng = np.random.default_rng([seed, step])
  return rng.integers(0, num_tokens - length + 1, size=batch_size)


def _local_rows(sharding: jax.sharding.Sharding, shape) -> slice:
  """The contiguous rows of a ``[B, ...]`` array this process's devices hold."""
  idx = sharding.addressable_devices_indices_map(tuple(shape)).values()
  rows = sorted({s[0].indices(shape[0])[:2] for s in idx})
  lo, hi = rows[0][0], rows[-1][1]
  if sum(b - a for a, b in rows) != hi - lo:
    raise ValueError(f"this process's rows {rows} are not contiguous")
  return slice(lo, hi)


def global_batch(
    ids: np.ndarray,
    starts: np.ndarray,
    length: int,
    sharding: jax.sharding.Sharding,
) -> jax.Array:
  """A global ``[B, length]`` token array; this process builds only its rows.

  ``jax.make_array_from_process_local_data`` assembles the global array
  from every process's slice of the batch.
  """
  shape = (len(starts), length)
  rows = _local_rows(sharding, shape)
  local = np.stack([ids[s : s + length] for s in starts[rows]])
  return jax.make_array_from_process_local_data(sharding, local, shape)
