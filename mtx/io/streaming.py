"""Merging checkpoints on disk tensor by tensor, in bounded memory.

The models are opened lazily (safetensors files are memory-mapped; orbax
checkpoints are restored) and merged one tensor at a time with the very
kernels of :func:`mtx.merging.merge` (through
:func:`mtx.merging._core.prepare_leaves`), so the output equals the in-memory
merge bit for bit while memory holds a few tensors times ``T`` rather than
``T + 1`` models. Tensors larger than ``2 ×`` :data:`PART_ENTRIES` entries
are read in row ranges wherever the result cannot depend on it (top-k
statistics; the merge itself for elementwise methods such as task
arithmetic and TIES), so for those methods memory holds one such part of
each model plus one output tensor, however large the embeddings; other
methods (Model Stock, SLERP, TSV-M, DARE, ...) hold whole tensors of the
``T + 1`` models, about ``(T + 2) ×`` the largest tensor:

1. checks: the fine-tuned models have the pretrained model's tensor names,
   shapes and dtypes; the selected tensors are floating and finite (one
   pass over the data);
2. statistics: methods with global statistics (TIES/TALL/PCB/ComPEFT
   thresholds, the majority sign) read the task vectors ``θt − θ0`` leaf by
   leaf, computed on the fly from the mapped files;
3. merge: each tensor is merged, cast, handed to the writer (sharded
   safetensors, streamed to disk) and its pages released before the next.

Tensor names: a safetensors checkpoint is a flat dict ``{tensor name:
array}`` (the leaf path is the tensor name, e.g. ``model.layers.0.mlp.weight``);
an orbax checkpoint keeps its nested tree (leaf paths ``/``-joined, e.g.
``encoder/layers_0/kernel``). A merged orbax checkpoint has the pretrained
model's structure; safetensors outputs name tensors by leaf path. Models
compared with each other must have the same leaf paths.

>>> import os, tempfile, numpy as np
>>> from mtx.io import safetensors as st
>>> d = tempfile.mkdtemp()
>>> for name, w in [("pre", 0.0), ("a", 1.0), ("b", 3.0)]:
...   st.write(f"{d}/{name}.safetensors", {"w": np.full(3, w, np.float32)})
>>> out = merge_checkpoints(f"{d}/pre.safetensors",
...                         [f"{d}/a.safetensors", f"{d}/b.safetensors"],
...                         Spec.of("task_arithmetic", scales=[0.5]),
...                         f"{d}/merged")
>>> st.read(f"{d}/merged")["w"].tolist()
[2.0, 2.0, 2.0]
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
import dataclasses
import json
import os
import re
import shutil
import tempfile
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mtx import merging
from mtx import tree as mtree
from mtx.io import safetensors as st

PathLike = str | os.PathLike
P = jax.sharding.PartitionSpec

# Files in a Hugging Face model folder that are weights (never copied to the
# output); everything else small (config, tokenizer) is copied.
_WEIGHT_SUFFIXES = (
    ".safetensors",
    ".safetensors.index.json",
    ".bin",
    ".bin.index.json",
    ".pt",
    ".pth",
    ".h5",
    ".msgpack",
    ".ckpt",
    ".gguf",
)
_MAX_COPY_BYTES = 64 << 20


# ----------------------------------------------------------------------------
# Inputs.


class Model:
  """A model on disk, opened lazily.

  Attributes:
    path: what was opened.
    format: ``"safetensors"`` or ``"orbax"``.
    tree: the params: a flat ``{name: array}`` dict of memory-mapped arrays
      (safetensors) or the restored tree (orbax).
    paths: leaf paths in flattening order.
    leaves: the leaves, in the same order.
    metadata: the checkpoint's metadata.
  """

  def __init__(self, path: str, fmt: str, tree: Any, metadata: Mapping):
    self.path = path
    self.format = fmt
    self.tree = tree
    self.paths, self.leaves, self.treedef = mtree.flatten(tree)
    self.metadata = dict(metadata)
    self._ckpt: st.Checkpoint | None = None

  def where(self, name: str) -> str:
    """The file holding tensor ``name`` (for messages)."""
    if self._ckpt is not None and name in self._ckpt:
      return self._ckpt.info(name).file
    return self.path

  def release(self, i: int) -> None:
    """Drops leaf ``i``'s mapped pages from resident memory (safetensors)."""
    if self._ckpt is not None:
      self._ckpt.release(self.paths[i])

  def release_all(self) -> None:
    if self._ckpt is not None:
      self._ckpt.release()

  @property
  def nbytes(self) -> int:
    return sum(_nbytes(x) for x in self.leaves)

  def __repr__(self) -> str:
    return f"Model({self.path!r}, {self.format}, {len(self.leaves)} tensors)"


def _nbytes(x) -> int:
  return int(np.prod(np.shape(x), dtype=np.int64)) * mtree.dtype_of(x).itemsize


def _is_safetensors(path: str) -> bool:
  if os.path.isfile(path):
    return True
  try:
    st.resolve(path)
  except FileNotFoundError:
    return False
  return True


def open_model(path: PathLike) -> Model:
  """Opens a safetensors checkpoint (file, folder, sharded folder) lazily or
  restores an orbax checkpoint written by :func:`mtx.checkpoint.save`.

  Raises:
    FileNotFoundError: nothing at ``path``, or a folder with neither format.
    ValueError: a corrupt checkpoint (file and tensor named).
  """
  if isinstance(path, Model):
    return path
  path = os.fspath(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f"no such checkpoint: {path}")
  if _is_safetensors(path):
    ckpt = st.open_checkpoint(path)
    model = Model(path, "safetensors", dict(ckpt), ckpt.metadata)
    model._ckpt = ckpt  # pylint: disable=protected-access
    return model
  from mtx import checkpoint  # pylint: disable=g-import-not-at-top

  if checkpoint.is_checkpoint(path):
    return Model(
        path,
        "orbax",
        checkpoint.restore(path),
        checkpoint.read_metadata(path),
    )
  raise FileNotFoundError(
      f"{path} is neither a safetensors checkpoint ({st.SINGLE_NAME}, "
      f"{st.INDEX_NAME} or *.safetensors) nor an mtx/orbax checkpoint"
  )


def check_compatible(pretrained: Model, finetuned: Sequence[Model]) -> None:
  """Raises ``ValueError`` naming the file and tensor where a fine-tuned
  model's tensor set, a shape or a dtype differs from the pretrained one."""
  pre = dict(zip(pretrained.paths, pretrained.leaves))
  for ft in finetuned:
    names = set(ft.paths)
    for name in pretrained.paths:
      if name not in names:
        raise ValueError(
            f"{ft.path}: tensor {name!r} of the pretrained model "
            f"{pretrained.where(name)} is missing"
        )
    for name, x in zip(ft.paths, ft.leaves):
      if name not in pre:
        raise ValueError(
            f"{ft.where(name)}: tensor {name!r} is not in the pretrained "
            f"model {pretrained.path}"
        )
      y = pre[name]
      if np.shape(x) != np.shape(y):
        raise ValueError(
            f"{ft.where(name)}: tensor {name!r} has shape "
            f"{tuple(np.shape(x))} but the pretrained model's "
            f"({pretrained.where(name)}) is {tuple(np.shape(y))}"
        )
      if mtree.dtype_of(x) != mtree.dtype_of(y):
        raise ValueError(
            f"{ft.where(name)}: tensor {name!r} has dtype "
            f"{mtree.dtype_of(x)} but the pretrained model's "
            f"({pretrained.where(name)}) is {mtree.dtype_of(y)}"
        )
    if ft.treedef != pretrained.treedef:
      raise ValueError(
          f"{ft.path}: tree structure differs from the pretrained model "
          f"{pretrained.path}"
      )


def _finite(x) -> bool:
  a = np.asarray(x).reshape(-1)
  if a.dtype not in (np.float32, np.float64):
    a = a.astype(np.float32)
  # A NaN/Inf makes the sum of squares non-finite (one BLAS pass); only then
  # (or on overflow) look entry by entry.
  return bool(np.isfinite(np.dot(a, a)) or np.isfinite(a).all())


# ----------------------------------------------------------------------------
# What to merge.


def _freeze(v: Any) -> Any:
  if isinstance(v, Mapping):
    return tuple(sorted((k, _freeze(x)) for k, x in v.items()))
  if isinstance(v, list | tuple):
    return tuple(_freeze(x) for x in v)
  if isinstance(v, np.ndarray):
    return tuple(v.tolist())
  return v


def _thaw(v: Any) -> Any:
  if isinstance(v, tuple):
    return [_thaw(x) for x in v]
  return v


@dataclasses.dataclass(frozen=True)
class Spec:
  """How to merge a set of tensors: a method, its hyperparameters, and the
  scales of the outputs (one output per scale, a sweep).

  Build with :meth:`of`; hashable, so tensors with equal specs are merged
  as one group (one statistics pass, one set of compiled kernels).
  """

  method: str
  hparams: tuple[tuple[str, Any], ...] = ()
  coeffs: tuple[tuple[str, Any], ...] = ()
  scales: tuple[Any, ...] = (1.0,)

  @classmethod
  def of(
      cls,
      method: str,
      hparams: Mapping[str, Any] | None = None,
      coeffs: Mapping[str, Any] | None = None,
      scales: Sequence[Any] = (1.0,),
  ) -> Spec:
    """``Spec.of("ties", {"density": 0.2}, scales=[0.3, 0.5])``."""
    if method not in merging.METHODS:
      raise ValueError(
          f"unknown merging method {method!r}; known: {sorted(merging.METHODS)}"
      )
    scales = tuple(_freeze(s) for s in scales)
    if not scales:
      raise ValueError("at least one scale is needed")
    return cls(
        method,
        tuple(sorted((k, _freeze(v)) for k, v in (hparams or {}).items())),
        tuple(sorted((k, _freeze(v)) for k, v in (coeffs or {}).items())),
        scales,
    )

  def build(self) -> merging.Merger:
    return merging.get(self.method, **{k: _thaw(v) for k, v in self.hparams})

  def kwargs(self) -> dict[str, Any]:
    return {k: _thaw(v) for k, v in self.coeffs}

  def scale(self, s: int) -> Any:
    v = self.scales[s]
    return np.asarray(v, np.float32) if isinstance(v, tuple) else v

  def describe(self) -> dict[str, Any]:
    return {
        "method": self.method,
        "hparams": {k: _thaw(v) for k, v in self.hparams},
        "coeffs": {k: _thaw(v) for k, v in self.coeffs},
        "scales": [_thaw(s) for s in self.scales],
    }


Plan = Spec | Mapping[str, Spec]


# ----------------------------------------------------------------------------
# Sharding on a mesh.


def parse_mesh(text: str) -> tuple[tuple[int, ...], tuple[str, ...]]:
  """``"data=4,model=2"`` -> ``((4, 2), ("data", "model"))``."""
  shape, names = [], []
  for part in text.split(","):
    m = re.fullmatch(r"\s*([A-Za-z_]\w*)\s*=\s*(\d+)\s*", part)
    if not m:
      raise ValueError(f"cannot parse mesh {text!r} (e.g. 'data=4,model=2')")
    names.append(m.group(1))
    shape.append(int(m.group(2)))
  if len(set(names)) != len(names):
    raise ValueError(f"mesh {text!r} repeats an axis name")
  return tuple(shape), tuple(names)


def parse_spec(text: str) -> P:
  """``"model,None"`` -> ``P("model", None)``; ``"data+model"`` shards one
  axis over two mesh axes; ``""`` is replicated."""
  if not text.strip():
    return P()
  out = []
  for part in text.split(","):
    part = part.strip()
    if part in ("", "None", "none", "_"):
      out.append(None)
    elif "+" in part:
      out.append(tuple(p.strip() for p in part.split("+")))
    else:
      out.append(part)
  return P(*out)


def parse_shard_rule(text: str) -> tuple[str, P]:
  """``"regex=spec"`` (split at the last ``=``) -> ``(regex, P(...))``."""
  if "=" not in text:
    raise ValueError(f"shard rule {text!r} must look like 'regex=spec'")
  pattern, spec = text.rsplit("=", 1)
  try:
    re.compile(pattern)
  except re.error as e:
    raise ValueError(f"invalid regex in shard rule {text!r}: {e}") from None
  return pattern, parse_spec(spec)


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


def shardings_for(
    paths: Sequence[str],
    shapes: Sequence[tuple[int, ...]],
    mesh: jax.sharding.Mesh,
    rules: Sequence[tuple[str, P]] = (),
) -> list[jax.sharding.NamedSharding]:
  """One ``NamedSharding`` per tensor: the first rule whose regex matches
  the path (``re.search``), else :func:`default_spec`.

  Raises:
    ValueError: a rule's spec that does not fit the tensor (path named).
  """
  compiled = [(re.compile(p), s) for p, s in rules]
  out = []
  for path, shape in zip(paths, shapes):
    spec = next((s for r, s in compiled if r.search(path)), None)
    if spec is None:
      spec = default_spec(shape, mesh)
    else:
      if len(spec) > len(shape):
        raise ValueError(
            f"shard rule {spec} for {path!r} has more axes than its shape "
            f"{tuple(shape)}"
        )
      for dim, names in zip(shape, spec):
        if names is None:
          continue
        names = (names,) if isinstance(names, str) else names
        for n in names:
          if n not in mesh.shape:
            raise ValueError(
                f"shard rule {spec} for {path!r} names mesh axis {n!r}; the "
                f"mesh has {tuple(mesh.axis_names)}"
            )
        size = int(np.prod([mesh.shape[n] for n in names]))
        if dim % size:
          raise ValueError(
              f"{path!r}: dimension {dim} is not divisible by mesh axes "
              f"{names} of size {size}"
          )
    out.append(jax.sharding.NamedSharding(mesh, spec))
  return out


def _put(x, sharding) -> jax.Array:
  """A host array placed with ``sharding``, each device reading its slice
  straight from ``x`` (memory-mapped: only that slice's pages)."""
  a = x if isinstance(x, np.ndarray) else np.asarray(x)
  return jax.make_array_from_callback(
      np.shape(a), sharding, lambda idx: np.asarray(a[idx])
  )


def load_sharded(
    model: Model | PathLike,
    mesh: jax.sharding.Mesh,
    rules: Sequence[tuple[str, P]] = (),
) -> Any:
  """A model's params placed on ``mesh`` (layouts from :func:`shardings_for`);
  each device reads only its slice of each memory-mapped tensor."""
  model = open_model(model)
  sh = shardings_for(
      model.paths, [np.shape(x) for x in model.leaves], mesh, rules
  )
  leaves = []
  for i, (x, s) in enumerate(zip(model.leaves, sh)):
    leaves.append(_put(x, s))
    model.release(i)
  return mtree.unflatten(model.treedef, leaves)


def merge_on_mesh(
    pretrained: Model | PathLike,
    finetuned: Sequence[Model | PathLike],
    method: str | merging.Merger,
    mesh: jax.sharding.Mesh,
    *,
    rules: Sequence[tuple[str, P]] = (),
    **kwargs: Any,
) -> Any:
  """Loads the models sharded on ``mesh`` and merges them there in memory.

  The models are placed with :func:`load_sharded` (each device holds its
  slices of the ``T + 1`` models) and merged by :func:`mtx.merging.merge`,
  which keeps every leaf's sharding and gathers nothing. Use
  :func:`merge_tensors` (``mesh=``) to stream instead (one tensor of each
  model on the mesh at a time).

  Args:
    pretrained: θ0 (a path or :class:`Model`).
    finetuned: the fine-tuned models.
    method: a registry name or a built merger.
    mesh: the device mesh.
    rules: ``[(regex, PartitionSpec)]`` first-match layouts (default:
      :func:`default_spec`).
    **kwargs: ``mtx.merging.merge`` arguments (``scale``, ``key``,
      ``include``, hyperparameters...).

  Returns:
    The merged params, each leaf sharded like the pretrained one.
  """
  pre = open_model(pretrained)
  fts = [open_model(f) for f in finetuned]
  check_compatible(pre, fts)
  return merging.merge(
      load_sharded(pre, mesh, rules),
      [load_sharded(f, mesh, rules) for f in fts],
      method,
      **kwargs,
  )


# ----------------------------------------------------------------------------
# The streaming merge.


@dataclasses.dataclass
class Progress:
  """What :func:`merge_tensors` reports after each tensor."""

  phase: str  # "check", "statistics" or "merge"
  done: int
  total: int
  bytes_done: int
  bytes_total: int
  elapsed: float

  @property
  def eta(self) -> float | None:
    if not self.bytes_done:
      return None
    return self.elapsed * (self.bytes_total - self.bytes_done) / self.bytes_done


def _groups(
    paths: Sequence[str], selected: Sequence[bool], plan: Plan
) -> tuple[list[Spec], list[list[int]]]:
  if isinstance(plan, Spec):
    specs = [plan if s else None for s in selected]
  else:
    unknown = sorted(set(plan) - set(paths))
    if unknown:
      raise ValueError(
          f"the plan names tensor {unknown[0]!r}, not in the model"
      )
    specs = [plan.get(p) if s else None for p, s in zip(paths, selected)]
  order: dict[Spec, list[int]] = {}
  for i, spec in enumerate(specs):
    if spec is not None:
      order.setdefault(spec, []).append(i)
  return list(order), list(order.values())


def merge_tensors(
    pretrained: Model | PathLike,
    finetuned: Sequence[Model | PathLike],
    plan: Plan,
    *,
    key: jax.Array | None = None,
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    check_finite: bool = True,
    dtype: Any = None,
    mesh: jax.sharding.Mesh | None = None,
    shard_rules: Sequence[tuple[str, P]] = (),
    progress: Callable[[Progress], None] | None = None,
) -> Iterator[tuple[str, list[jax.Array]]]:
  """Merges models tensor by tensor; yields ``(name, outputs)`` in order.

  All checks and the statistics pass run when this is called (errors come
  before any output); the merged tensors are computed as the iterator is
  consumed, one at a time. Consume each before asking for the next (they
  share nothing, but holding them defeats the purpose).

  Args:
    pretrained: θ0 (a :class:`Model` or a path for :func:`open_model`).
    finetuned: the ``T`` fine-tuned models.
    plan: a :class:`Spec` for every selected tensor, or ``{name: Spec}``
      (tensors not named keep their pretrained value). Tensors with equal
      specs are merged together (a method's global statistics span them).
      Every spec must have the same number of scales ``S``.
    key: PRNG key for random methods; group ``g > 0`` of a multi-spec plan
      uses ``fold_in(key, g)``.
    include: path regex(es): only matching tensors are merged.
    exclude: path regex(es): matching tensors keep their pretrained value.
    check_finite: a first pass checks every selected tensor for NaN/Inf.
    dtype: cast every floating output tensor to this dtype.
    mesh: load each tensor sharded on this mesh and merge there.
    shard_rules: ``[(regex, PartitionSpec)]`` first-match layouts on
      ``mesh`` (default: :func:`default_spec`).
    progress: called with a :class:`Progress` after each tensor.

  Yields:
    ``(name, [S arrays])``: the tensor under each scale (jax arrays; with
    ``mesh``, sharded as loaded), in the pretrained model's flattening
    order. With a single spec and no mesh, output ``s`` is bitwise
    ``mtx.merging.merge(pre, fts, method, scale=scales[s], ...)``'s leaf.

  Raises:
    ValueError: mismatched models, a non-floating or non-finite selected
      tensor, an unknown method or hyperparameter (the file and tensor are
      named).
  """
  pre = open_model(pretrained)
  fts = [open_model(f) for f in finetuned]
  if not fts:
    raise ValueError("no fine-tuned models to merge")
  check_compatible(pre, fts)
  models = [pre, *fts]
  paths, t = pre.paths, len(fts)
  selected = jax.tree.leaves(mtree.select(pre.tree, include, exclude))
  specs, groups = _groups(paths, selected, plan)
  if not groups:
    raise ValueError(
        f"include={include!r} / exclude={exclude!r} select no tensor"
    )
  num_out = {len(s.scales) for s in specs}
  if len(num_out) != 1:
    raise ValueError("every spec of a plan needs the same number of scales")
  (num_out,) = num_out
  mergers = [s.build() for s in specs]  # unknown methods/hparams: now
  merged_idx = sorted(i for g in groups for i in g)
  for i in merged_idx:
    if not mtree.is_floating(pre.leaves[i]):
      raise ValueError(
          f"{pre.where(paths[i])}: tensor {paths[i]!r} has dtype "
          f"{mtree.dtype_of(pre.leaves[i])}, which cannot be merged; leave it "
          "out with exclude="
      )
  total_bytes = sum(_nbytes(x) for x in pre.leaves) * (t + 1)
  t0 = time.time()

  def report(phase, done, total, nbytes):
    if progress is not None:
      progress(
          Progress(phase, done, total, nbytes, total_bytes, time.time() - t0)
      )

  if check_finite:
    done = 0
    for n, i in enumerate(merged_idx):
      for m in models:
        if not _finite(m.leaves[i]):
          raise ValueError(
              f"{m.where(paths[i])}: tensor {paths[i]!r} holds NaN or Inf "
              "(check_finite=False skips this check)"
          )
        m.release(i)
        done += _nbytes(m.leaves[i])
      report("check", n + 1, len(merged_idx), done)

  shardings = None
  if mesh is not None:
    shardings = shardings_for(
        paths, [np.shape(x) for x in pre.leaves], mesh, shard_rules
    )
  raw = _Loader(models, shardings)
  host = mesh is None and all(
      _on_host(m.leaves[i]) for m in models for i in merged_idx
  )
  parts = {}
  if host and all(m.format == "safetensors" for m in models):
    for i in merged_idx:
      p = row_parts(np.shape(pre.leaves[i]))
      if p is not None:
        parts[i] = p
  leaf_fns = {}
  for g, (spec, merger, idx) in enumerate(zip(specs, mergers, groups)):
    gkey = key if (key is None or g == 0) else jax.random.fold_in(key, g)
    fn = merging._core.prepare_leaves(  # pylint: disable=protected-access
        merger,
        pre.tree,
        t,
        raw,
        idx,
        host=host,
        scales=[spec.scale(s) for s in range(num_out)],
        key=gkey,
        parts=parts,
        rows=raw.rows,
        **spec.kwargs(),
    )
    for i in idx:
      leaf_fns[i] = fn
    report("statistics", g + 1, len(groups), 0)
  raw.release()
  return _emit(
      pre, models, raw, leaf_fns, num_out, dtype, shardings, report, t0
  )


# Leaves larger than twice this many entries are read in row ranges of about
# this many entries where the result cannot depend on it (see
# mtx.merging._core.prepare_leaves).
PART_ENTRIES = 1 << 22


def row_parts(shape: Sequence[int]) -> list[tuple[int, int]] | None:
  """Row ranges of the leading axis of about :data:`PART_ENTRIES` entries,
  or None for a leaf small enough to read whole.

  >>> row_parts((10, 1 << 21))
  [(0, 2), (2, 4), (4, 6), (6, 8), (8, 10)]
  """
  n = int(np.prod(shape, dtype=np.int64))
  if len(shape) == 0 or n <= 2 * PART_ENTRIES:
    return None
  per_row = n // shape[0]
  step = max(1, PART_ENTRIES // max(per_row, 1))
  if step >= shape[0]:
    return None
  return [(a, min(a + step, shape[0])) for a in range(0, shape[0], step)]


def _on_host(x) -> bool:
  from mtx import _select  # pylint: disable=g-import-not-at-top

  return _select.on_host(x)


def _libc():
  try:
    import ctypes  # pylint: disable=g-import-not-at-top

    return ctypes.CDLL("libc.so.6").malloc_trim
  except (OSError, AttributeError):
    return None


_MALLOC_TRIM = _libc()
_TRIM_BYTES = 16 << 20  # trim after releasing leaves at least this large


def _trim() -> None:
  """Returns freed heap memory to the OS (glibc keeps freed blocks of the
  many per-thread arenas XLA's threads allocate from, which would otherwise
  pile up to several tensors' worth of resident memory)."""
  if _MALLOC_TRIM is not None:
    _MALLOC_TRIM(0)


def _aligned(x) -> bool:
  """Whether jax can use a host array without copying it (64-byte aligned)."""
  return not isinstance(x, np.ndarray) or x.ctypes.data % 64 == 0


class _Loader:
  """``raw(i)`` for ``prepare_leaves``: leaf ``i`` of every model.

  On the host, a 64-byte aligned memory-mapped tensor is passed as is (jax
  reads the mapped pages without a copy; only the pages used are read);
  others (safetensors only aligns the data to 8 bytes) are copied once into a
  jax array, reused while the same leaf is asked for again, and their pages
  dropped at once, so a leaf costs one copy however many kernels read it
  (jax would copy an unaligned argument on every call). Whenever another
  leaf is asked for, the previous one's copies and pages are released. On a
  mesh, the leaf is loaded sharded (and cached alike).
  """

  def __init__(self, models: Sequence[Model], shardings):
    self.models = models
    self.shardings = shardings
    self._last = None
    self._cache = None

  def release(self) -> None:
    big = False
    if self._last is not None:
      i, part = self._last
      for m in self.models:
        m.release(i)
      x = self.models[0].leaves[i]
      big = _nbytes(x) >= _TRIM_BYTES or part is not None
    self._last, self._cache = None, None
    if big:
      _trim()

  def __call__(self, i: int):
    return self._get(i, None)

  def rows(self, i: int, start: int, stop: int):
    """Rows ``[start, stop)`` of leaf ``i`` (host only)."""
    return self._get(i, (start, stop))

  def _get(self, i: int, part):
    if self._last is not None and self._last != (i, part):
      self.release()
    if self._cache is None:
      if self.shardings is None:
        arrays = [self._host(m, i, part) for m in self.models]
      else:
        sh = self.shardings[i]
        arrays = []
        for m in self.models:
          arrays.append(_put(m.leaves[i], sh).block_until_ready())
          m.release(i)
      self._cache = arrays[0], tuple(arrays[1:])
    self._last = (i, part)
    return self._cache

  @staticmethod
  def _host(m: Model, i: int, part):
    x = m.leaves[i] if part is None else m.leaves[i][part[0] : part[1]]
    if _aligned(x):
      return x
    y = jax.device_put(x).block_until_ready()  # copied: the pages can go
    m.release(i)
    return y


def _emit(pre, models, raw, leaf_fns, num_out, dtype, shardings, report, t0):
  del t0
  n = len(pre.paths)
  done_bytes = 0
  per_leaf_bytes = [sum(_nbytes(m.leaves[i]) for m in models) for i in range(n)]
  for i, name in enumerate(pre.paths):
    fn = leaf_fns.get(i)
    if fn is None:
      x = pre.leaves[i]
      x = x if shardings is None else _put(x, shardings[i])
      outs = [x] * num_out
    else:
      outs = [fn(i, s) for s in range(num_out)]
    if dtype is not None and mtree.is_floating(outs[0]):
      outs = [jnp.asarray(y).astype(dtype) for y in outs]
    yield name, outs
    del outs
    raw.release()
    for m in models:
      m.release(i)
    done_bytes += per_leaf_bytes[i]
    report("merge", i + 1, n, done_bytes)


# ----------------------------------------------------------------------------
# Writing merged checkpoints.


def copy_side_files(src: PathLike, dst: PathLike, dtype: Any = None) -> None:
  """Copies a Hugging Face folder's non-weight files (config, tokenizer,
  generation config...) from ``src`` to ``dst``; with ``dtype``, the
  config's ``torch_dtype`` is updated."""
  src = os.fspath(src)
  if not os.path.isdir(src):
    src = os.path.dirname(os.path.abspath(src))
  for name in sorted(os.listdir(src)):
    full = os.path.join(src, name)
    if (
        not os.path.isfile(full)
        or name.startswith(".")
        or name.endswith(_WEIGHT_SUFFIXES)
        or os.path.getsize(full) > _MAX_COPY_BYTES
    ):
      continue
    if name == "config.json" and dtype is not None:
      with open(full, encoding="utf-8") as f:
        cfg = json.load(f)
      if isinstance(cfg, dict):
        for k in ("torch_dtype", "dtype"):
          if k in cfg:
            cfg[k] = np.dtype(dtype).name
        with open(os.path.join(dst, name), "w", encoding="utf-8") as f:
          json.dump(cfg, f, indent=2)
          f.write("\n")
        continue
    shutil.copyfile(full, os.path.join(dst, name))


def merge_checkpoints(
    pretrained: Model | PathLike,
    finetuned: Sequence[Model | PathLike],
    plan: Plan,
    out: PathLike,
    *,
    subdirs: Sequence[str] | None = None,
    output_format: str = "safetensors",
    shard_size: int | str = "2GB",
    overwrite: bool = False,
    metadata: Mapping[str, Any] | None = None,
    copy_files: bool = True,
    **kwargs: Any,
) -> list[str]:
  """Merges checkpoints on disk; writes one checkpoint per scale.

  Everything is written into a temporary folder beside ``out`` that is
  renamed to ``out`` once complete, so a failure (or an interruption) leaves
  nothing behind and an existing ``out`` is replaced only by a complete
  result.

  Args:
    pretrained: θ0 (path or :class:`Model`).
    finetuned: the fine-tuned models.
    plan: as for :func:`merge_tensors`; output ``s`` uses each spec's
      ``scales[s]``.
    out: the output path.
    subdirs: one folder name per scale (a sweep: ``out/<subdirs[s]>``);
      None writes the single output (one scale) to ``out`` itself.
    output_format: ``"safetensors"`` (sharded, streamed to disk:
      ``model-0000k-of-0000N.safetensors`` + ``model.safetensors.index.json``,
      plus the pretrained folder's config/tokenizer files) or ``"orbax"``
      (:func:`mtx.checkpoint.save`; the merged model is assembled in memory,
      sharded when merging on a mesh).
    shard_size: bytes per safetensors shard (e.g. ``"2GB"``).
    overwrite: replace an existing ``out`` (only once the new one is
      complete). Without it an existing ``out`` is an error, raised before
      any work.
    metadata: recorded with each output (JSON-serialisable; for safetensors
      stored under ``__metadata__`` as strings, with ``format: pt``).
    copy_files: copy the pretrained folder's non-weight files (safetensors).
    **kwargs: passed to :func:`merge_tensors` (``key``, ``include``,
      ``exclude``, ``check_finite``, ``dtype``, ``mesh``, ``shard_rules``,
      ``progress``).

  Returns:
    The output paths, one per scale.

  Raises:
    FileExistsError: ``out`` exists and not ``overwrite``.
    ValueError: see :func:`merge_tensors`; an output that would replace an
      input.
  """
  out = os.path.abspath(os.fspath(out))
  if output_format not in ("safetensors", "orbax"):
    raise ValueError(
        f"output_format must be 'safetensors' or 'orbax', got "
        f"{output_format!r}"
    )
  if st._occupied(out) and not overwrite:  # pylint: disable=protected-access
    raise FileExistsError(
        f"{out} exists; pass overwrite=True (--overwrite) to replace it"
    )
  shard_size = st.parse_size(shard_size)
  pre = open_model(pretrained)
  fts = [open_model(f) for f in finetuned]
  for m in [pre, *fts]:
    src = os.path.abspath(m.path)
    if src == out or src.startswith(out + os.sep):
      raise ValueError(f"the output {out} would replace the input {m.path}")
  if subdirs is not None:
    subdirs = list(subdirs)
    if len(set(subdirs)) != len(subdirs) or not all(
        d and os.path.basename(d) == d for d in subdirs
    ):
      raise ValueError(f"subdirs must be distinct folder names: {subdirs}")
  stream = merge_tensors(pre, fts, plan, **kwargs)  # checks, statistics
  num_out = len(subdirs) if subdirs is not None else 1
  first = next(stream, None)
  if first is not None and len(first[1]) != num_out:
    raise ValueError(
        f"the plan has {len(first[1])} scales but {num_out} output(s) were "
        "asked for (give one subdir per scale)"
    )
  created = _missing_ancestor(os.path.dirname(out))
  os.makedirs(os.path.dirname(out), exist_ok=True)
  staging = tempfile.mkdtemp(
      dir=os.path.dirname(out), prefix=f".{os.path.basename(out)}.partial-"
  )
  dirs = (
      [staging]
      if subdirs is None
      else [os.path.join(staging, d) for d in subdirs]
  )
  meta = dict(metadata or {})
  try:
    _write(first, stream, pre, dirs, output_format, shard_size, meta, kwargs)
    if copy_files and output_format == "safetensors":
      if pre.format == "safetensors":
        for d in dirs:
          copy_side_files(pre.path, d, kwargs.get("dtype"))
    os.chmod(staging, 0o777 & ~st._umask())  # pylint: disable=protected-access
    st._move_into_place(staging, out, overwrite)  # pylint: disable=protected-access
  except BaseException:
    shutil.rmtree(staging, ignore_errors=True)
    if created is not None:
      shutil.rmtree(created, ignore_errors=True)
    raise
  if subdirs is None:
    return [out]
  return [os.path.join(out, d) for d in subdirs]


def _write(first, stream, pre, dirs, output_format, shard_size, meta, kwargs):
  items = stream if first is None else _chain(first, stream)
  if output_format == "safetensors":
    st_meta = {"format": "pt"}
    for k, v in meta.items():
      st_meta[k] = v if isinstance(v, str) else json.dumps(v)
    writers = [st.ShardedWriter(d, shard_size, st_meta) for d in dirs]
    try:
      for name, outs in items:
        for w, y in zip(writers, outs):
          w.add(name, y)
      for w in writers:
        w.commit()
    except BaseException:
      for w in writers:
        if not w._done:  # pylint: disable=protected-access
          w.abort()
      raise
    return
  from mtx import checkpoint  # pylint: disable=g-import-not-at-top

  del kwargs
  leaves = [[] for _ in dirs]
  for _, outs in items:
    for acc, y in zip(leaves, outs):
      acc.append(y)
  for d, acc in zip(dirs, leaves):
    tree = mtree.unflatten(pre.treedef, acc)
    if os.path.isdir(d) and not os.listdir(d):
      os.rmdir(d)  # checkpoint.save creates it
    checkpoint.save(d, tree, metadata=meta)


def _chain(first, rest):
  yield first
  yield from rest


def _missing_ancestor(path: str) -> str | None:
  """The highest ancestor of ``path`` (itself included) that does not exist
  (removed again if the merge fails)."""
  path = os.path.abspath(path)
  top = None
  while not os.path.exists(path):
    top = path
    parent = os.path.dirname(path)
    if parent == path:
      break
    path = parent
  return top


__all__ = [
    "Model",
    "Progress",
    "Spec",
    "check_compatible",
    "copy_side_files",
    "default_spec",
    "load_sharded",
    "merge_checkpoints",
    "merge_on_mesh",
    "merge_tensors",
    "open_model",
    "parse_mesh",
    "parse_shard_rule",
    "parse_spec",
    "row_parts",
    "shardings_for",
]
