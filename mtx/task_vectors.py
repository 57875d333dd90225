"""Task vectors: ``τ = θ_finetuned − θ_pretrained`` and what to do with them.

Reference:
  Ilharco et al., "Editing Models with Task Arithmetic", ICLR 2023.
  https://arxiv.org/abs/2212.04089

Every floating leaf takes part (biases, norms, embeddings included); integer
leaves are never differenced. Stacked task vectors carry a leading task axis
``T`` on every leaf (:func:`mtx.tree.stack`).

>>> import jax.numpy as jnp
>>> from mtx import task_vectors as tvs
>>> pre = {"w": jnp.array([1.0, 1.0])}
>>> ft = {"w": jnp.array([2.0, 0.0])}
>>> tv = tvs.task_vector(pre, ft)
>>> tvs.apply(pre, tvs.negate(tv), 0.5)["w"].tolist()
[0.5, 1.5]
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mtx import tree as mtree
from mtx.merging import _protocol
from mtx.merging import _source
from mtx.merging import compeft as _compeft
from mtx.merging import consensus as _consensus
from mtx.merging import ties as _ties

PyTree = Any


def _check_float(tree: PyTree, name: str) -> None:
  for p, x in zip(*mtree.flatten(tree)[:2]):
    if not mtree.is_floating(x):
      raise ValueError(
          f"{name} leaf {p!r} has dtype {mtree.dtype_of(x)}; integer "
          "leaves cannot be differenced"
      )


def task_vector(pretrained: PyTree, finetuned: PyTree) -> PyTree:
  """``finetuned − pretrained`` leaf by leaf (same structure, shapes, dtypes).

  Raises:
    ValueError: naming the first path whose structure, shape or dtype
      differs, or an integer leaf.
  """
  mtree.assert_same_structure(
      pretrained, finetuned, names=("pretrained", "finetuned")
  )
  _check_float(pretrained, "pretrained")
  return jax.tree.map(
      lambda a, b: (_acc(b) - _acc(a)).astype(a.dtype), pretrained, finetuned
  )


def _acc(x):
  return jnp.asarray(x).astype(mtree.accum_dtype())


def apply(pretrained: PyTree, task_vector: PyTree, scale: Any = 1.0) -> PyTree:
  """``pretrained + scale · task_vector``.

  ``scale`` is a scalar or a prefix tree of scalars over the params (e.g.
  ``{"encoder": 0.5, "head": 0.0}``); it may be traced.
  """
  mtree.assert_same_structure(
      pretrained, task_vector, names=("pretrained", "task_vector")
  )
  scales = jax.tree.broadcast(scale, pretrained)
  return jax.tree.map(
      lambda p, t, s: (_acc(p) + s * _acc(t)).astype(p.dtype),
      pretrained,
      task_vector,
      scales,
  )


def negate(task_vector: PyTree) -> PyTree:
  """``−τ``: applied to the pretrained model, it forgets the task."""
  return jax.tree.map(jnp.negative, task_vector)


def analogy(tv_a: PyTree, tv_b: PyTree, tv_c: PyTree) -> PyTree:
  """``τC + (τB − τA)``: "A is to B as C is to ?" (float32 arithmetic)."""
  return jax.tree.map(
      lambda a, b, c: (_acc(c) + (_acc(b) - _acc(a))).astype(c.dtype),
      tv_a,
      tv_b,
      tv_c,
  )


def _as_stacked(task_vectors) -> PyTree:
  # Only a list means "one tree per task"; tuples (and NamedTuples) are
  # ordinary pytree containers of a stacked tree.
  if isinstance(task_vectors, list):
    return mtree.stack(task_vectors)
  return task_vectors


def cosine_matrix(task_vectors: Sequence[PyTree] | PyTree) -> jax.Array:
  """The ``[T, T]`` cosine similarities of task vectors (flattened whole).

  Accepts a list of task vectors or a stacked tree (any other container,
  tuples included, is read as a stacked tree).
  """
  stacked = _as_stacked(task_vectors)
  leaves = jax.tree.leaves(stacked)
  acc = mtree.accum_dtype()
  gram = sum(
      (lambda f: f @ f.T)(x.reshape(x.shape[0], -1).astype(acc)) for x in leaves
  )
  n = jnp.sqrt(jnp.diagonal(gram))
  return gram / jnp.maximum(n[:, None] * n[None, :], 1e-12)


def sparsify(
    task_vector: PyTree,
    density: float,
    *,
    scope: str = "per_leaf",
    topk_rule: str = "paper",
) -> PyTree:
  """Keeps the ``density`` fraction of largest ``|τ|`` (per leaf or global).

  Args:
    task_vector: one task vector (no task axis).
    density: fraction kept, in (0, 1].
    scope: ``"per_leaf"`` or ``"global"`` (over all leaves at once).
    topk_rule: ``"paper"`` or ``"reference"`` (see
      :func:`mtx.merging.ties.num_kept`).

  >>> import jax.numpy as jnp
  >>> sparsify({"w": jnp.array([0.1, -3.0, 2.0, 0.5])}, 0.5)["w"].tolist()
  [0.0, -3.0, 2.0, 0.0]
  """
  density = _protocol.check_fraction("density", density)
  _protocol.check_choice("scope", scope, ("per_leaf", "global"))
  _protocol.check_choice("topk_rule", topk_rule, _ties.TOPK_RULES)
  stacked = jax.tree.map(lambda x: jnp.asarray(x)[None], task_vector)
  src = _source.source_from_stacked(stacked)
  paths, leaves, treedef = mtree.flatten(task_vector)
  if scope == "global":
    k = _ties.num_kept(sum(src.sizes), density, topk_rule)
    thr = [src.global_kth_largest(np.array([k]))] * len(leaves)
  else:
    thr = [
        src.leaf_kth_largest(
            i, np.array([_ties.num_kept(n, density, topk_rule)])
        )
        for i, n in enumerate(src.sizes)
    ]
  out = [
      jnp.where(jnp.abs(x) >= jnp.asarray(t[0], x.dtype), x, 0)
      for x, t in zip(leaves, thr)
  ]
  return mtree.unflatten(treedef, out)


# ----------------------------------------------------------------------------
# TALL masks, retrieval, consensus.


def multitask_vector(task_vectors: Sequence[PyTree] | PyTree) -> PyTree:
  """``τMTL = Σt τt`` (unscaled), the default multi-task vector of TALL."""
  stacked = _as_stacked(task_vectors)
  return jax.tree.map(lambda x: jnp.sum(x, axis=0), stacked)


def tall_masks(
    task_vectors: Sequence[PyTree] | PyTree,
    mtl: PyTree | None = None,
    tall_lambda: Any = 0.4,
) -> PyTree:
  """Per-task TALL masks ``m_t = |τt| > λt·|τMTL − τt|``, stacked ``[T, ...]``.

  Args:
    task_vectors: a list of task vectors or a stacked tree.
    mtl: the multi-task vector; default :func:`multitask_vector`.
    tall_lambda: λ, a scalar or ``[T]`` (per task, chosen on validation from
      {0.2, ..., 0.6} in the paper).

  Returns:
    A tree of boolean ``[T, ...]`` masks.
  """
  stacked = _as_stacked(task_vectors)
  if mtl is None:
    mtl = multitask_vector(stacked)
  return jax.tree.map(
      lambda tv, m: jnp.stack(_consensus.tall_masks(tuple(tv), m, tall_lambda)),
      stacked,
      mtl,
  )


def retrieve(
    pretrained: PyTree, mtl: PyTree, masks: PyTree, task: int
) -> PyTree:
  """Task ``task``'s model from the shared vector: ``θ0 + m_t ⊙ τMTL``."""
  return jax.tree.map(
      lambda p, v, m: (_acc(p) + jnp.where(m[task], _acc(v), 0)).astype(
          p.dtype
      ),
      pretrained,
      mtl,
      masks,
  )


def consensus_mask(masks: PyTree, k: int = 2) -> PyTree:
  """Entries active in at least ``k`` of the stacked masks."""
  return jax.tree.map(lambda m: _consensus.consensus_mask(tuple(m), k), masks)


def pack_mask(mask: PyTree) -> dict[str, Any]:
  """Packs a boolean mask tree into bits (8 entries per byte, numpy).

  Returns ``{"bits": tree of uint8 arrays, "shapes": tree of shapes}``;
  :func:`unpack_mask` inverts it.
  """
  bits = jax.tree.map(lambda m: np.packbits(np.asarray(m, bool).ravel()), mask)
  shapes = jax.tree.map(lambda m: tuple(np.shape(m)), mask)
  return {"bits": bits, "shapes": shapes}


def unpack_mask(packed: dict[str, Any]) -> PyTree:
  """Inverse of :func:`pack_mask` (boolean jax arrays)."""
  bits, treedef = jax.tree.flatten(packed["bits"])
  shapes_leaves = treedef.flatten_up_to(packed["shapes"])
  out = []
  for b, s in zip(bits, shapes_leaves):
    n = int(np.prod(s))
    out.append(jnp.asarray(np.unpackbits(b, count=n).astype(bool).reshape(s)))
  return treedef.unflatten(out)


# ----------------------------------------------------------------------------
# ComPEFT compression.


@dataclasses.dataclass(frozen=True)
class Compressed:
  """A ComPEFT-compressed task vector.

  Attributes:
    treedef: the task vector's tree structure.
    paths: leaf paths.
    shapes: leaf shapes.
    dtypes: leaf dtype names.
    mask_bits: per leaf, the kept-entry mask packed 8 per byte.
    sign_bits: per leaf, the signs of the kept entries only (1 = positive),
      packed 8 per byte.
    scale: the magnitude ``α·σ`` every kept entry takes.
  """

  treedef: Any
  paths: tuple[str, ...]
  shapes: tuple[tuple[int, ...], ...]
  dtypes: tuple[str, ...]
  mask_bits: tuple[np.ndarray, ...]
  sign_bits: tuple[np.ndarray, ...]
  scale: float


def compress(
    task_vector: PyTree,
    density: float = 0.2,
    *,
    alpha: float = 1.0,
    topk_rule: str = "paper",
) -> Compressed:
  """ComPEFT: keep the top ``density`` of ``|τ|`` (global), store their signs.

  Every kept entry decompresses to ``α·σ·sign(τ)`` with ``σ`` the unbiased
  standard deviation of the dense task vector (the authors' code). Storage is
  one bit per entry for the mask, one bit per kept entry for the sign and one
  float for the scale (host numpy; sharded inputs are gathered leaf by leaf).

  >>> import jax.numpy as jnp
  >>> c = compress({"w": jnp.array([0.1, -3.0, 2.0, 0.5])}, 0.5)
  >>> [round(v, 3) for v in decompress(c)["w"].tolist()]
  [0.0, -2.099, 2.099, 0.0]
  """
  density = _protocol.check_fraction("density", density)
  _protocol.check_choice("topk_rule", topk_rule, _ties.TOPK_RULES)
  _check_float(task_vector, "task_vector")
  stacked = jax.tree.map(lambda x: jnp.asarray(x)[None], task_vector)
  src = _source.source_from_stacked(stacked)
  thr, std = _compeft.compeft_stats(src, density, topk_rule)
  paths, leaves, treedef = mtree.flatten(task_vector)
  masks, signs = [], []
  for x in leaves:
    a = np.asarray(jnp.asarray(x).astype(mtree.accum_dtype()))
    m = np.abs(a) >= thr[0]
    masks.append(np.packbits(m.ravel()))
    signs.append(np.packbits(a[m] > 0))
  return Compressed(
      treedef,
      tuple(paths),
      tuple(tuple(np.shape(x)) for x in leaves),
      tuple(jnp.dtype(x.dtype).name for x in leaves),
      tuple(masks),
      tuple(signs),
      float(alpha * std[0]),
  )


def decompress(c: Compressed) -> PyTree:
  """The dense task vector of a :class:`Compressed` (ternary values)."""
  out = []
  for shape, dt, mb, sb in zip(c.shapes, c.dtypes, c.mask_bits, c.sign_bits):
    n = int(np.prod(shape))
    m = np.unpackbits(mb, count=n).astype(bool)
    k = int(m.sum())
    s = np.unpackbits(sb, count=k).astype(np.float32) * 2 - 1
    dense = np.zeros(n, np.float32)
    dense[m] = s * c.scale
    out.append(jnp.asarray(dense.reshape(shape), dtype=dt))
  return mtree.unflatten(c.treedef, out)


def storage_bytes(c: Compressed) -> dict[str, float]:
  """Stored vs. dense bytes of a :class:`Compressed`.

  Returns ``{"stored": ..., "dense": ..., "ratio": dense / stored}``; stored
  counts the packed mask and sign bits plus one float32 scale.
  """
  stored = sum(b.nbytes for b in c.mask_bits + c.sign_bits) + 4
  dense = sum(
      int(np.prod(s)) * jnp.dtype(d).itemsize
      for s, d in zip(c.shapes, c.dtypes)
  )
  return {"stored": stored, "dense": dense, "ratio": dense / stored}
