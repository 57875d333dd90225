"""LiNeS: post-training layer scaling of a (merged) task vector.

Reference:
  Wang, Dimitriadis et al., "LiNeS: Post-training Layer Scaling Prevents
  Forgetting and Enhances Model Merging", ICLR 2025.
  https://arxiv.org/abs/2410.17146
"""

from __future__ import annotations

from collections.abc import Callable
import re
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mtx import tree as mtree
from mtx.merging import _checks
from mtx.merging import _protocol
from mtx.merging import _source

_DEPTH_RE = re.compile(
    r"(?:^|[/._])(?:layers?|blocks?|resblocks|h|encoderblock|encoder_layer)"
    r"[._/](\d+)(?=$|[/._])"
)


def default_depth_fn(path: str) -> int | None:
  """The block index in common layer names, else None.

  Recognises ``layers_3``, ``layer.3``, ``blocks/3``, ``resblocks.3``,
  ``h.3``, ``encoderblock_3`` (the first match in the path).

  >>> default_depth_fn("encoder/layers_3/mlp/kernel")
  3
  >>> default_depth_fn("transformer.resblocks.11.attn.in_proj_weight")
  11
  >>> default_depth_fn("embed/embedding") is None
  True
  """
  m = _DEPTH_RE.search(path)
  return None if m is None else int(m.group(1))


def depth_fractions(
    paths: list[str],
    depth_fn: Callable[[str], int | None] = default_depth_fn,
    num_blocks: int | None = None,
) -> list[float]:
  """``ℓ/(L−1)`` per path (0 outside the numbered blocks, and when L = 1)."""
  depths = [depth_fn(p) for p in paths]
  for p, d in zip(paths, depths):
    if d is not None and (
        isinstance(d, bool) or not isinstance(d, int | np.integer)
    ):
      raise ValueError(
          f"depth_fn({p!r}) returned {d!r}; expected an int block index or "
          "None"
      )
  known = [d for d in depths if d is not None]
  if num_blocks is None:
    num_blocks = max(known) + 1 if known else 1
  for p, d in zip(paths, depths):
    if d is not None and not 0 <= d < num_blocks:
      raise ValueError(f"depth {d} of {p!r} is outside [0, {num_blocks})")
  den = max(num_blocks - 1, 1)
  return [0.0 if d is None else d / den for d in depths]


def scale_by_depth(
    task_vector: Any,
    alpha: float | jax.Array,
    beta: float | jax.Array,
    *,
    depth_fn: Callable[[str], int | None] = default_depth_fn,
    num_blocks: int | None = None,
) -> Any:
  """Scales block ``ℓ`` of ``L`` by ``α + β·ℓ/(L−1)``, the rest by ``α``.

  Usable after any method (or on a single task vector: the paper's editing
  setting uses ``α = c, β = 1 − c``).

  >>> import jax.numpy as jnp
  >>> tv = {"layers_0": jnp.ones(1), "layers_2": jnp.ones(1), "head": jnp.ones(1)}
  >>> out = scale_by_depth(tv, 0.5, 1.0)
  >>> [float(out[k][0]) for k in ("layers_0", "layers_2", "head")]
  [0.5, 1.5, 0.5]
  """
  paths, leaves, treedef = mtree.flatten(task_vector)
  fr = depth_fractions(paths, depth_fn, num_blocks)
  return mtree.unflatten(
      treedef,
      [
          ((alpha + beta * f) * x.astype(mtree.accum_dtype())).astype(x.dtype)
          for x, f in zip(leaves, fr)
      ],
  )


class LinesHParams(NamedTuple):
  """Structural hyperparameters of :func:`lines`."""

  base: _protocol.Merger
  depth_fn: Callable[[str], int | None]
  num_blocks: int | None
  auto_alpha: bool


def _leaf(hp: LinesHParams, tv, ctx):
  base = hp.base
  g = ctx.glob
  inner = ctx._replace(
      glob=g["base"], stats=ctx.stats["base"], scale=jnp.ones((), tv[0].dtype)
  )
  merged = base.leaf_fn(base.static, tv, inner)
  alpha = ctx.coeffs["alpha"]
  if alpha is None:
    alpha = g["alpha"]
  s = alpha + ctx.coeffs["beta"] * ctx.stats["depth"]
  return _protocol.scalar_scale(ctx, "lines") * s * merged


def _l1_terms(base, tv, coeffs, glob, stats):
  """Elementwise ``|Σt τt|`` and ``|τ_merged|`` of one leaf."""
  ctx = _protocol.Ctx(
      glob, stats, jnp.ones((), tv[0].dtype), coeffs, None, None, None, None
  )
  return jnp.abs(_protocol.tsum(tv)), jnp.abs(
      base.leaf_fn(base.static, tv, ctx)
  )


def _prepare(hp: LinesHParams, src: _source.Source, key):
  base = hp.base
  bstats = (
      base.prepare_fn(base.static, src, key)
      if base.prepare_fn is not None
      else _protocol.Stats()
  )
  fr = depth_fractions(src.paths, hp.depth_fn, hp.num_blocks)
  per_leaf = tuple(
      {
          "depth": np.float32(f),
          "base": None if bstats.leaf is None else bstats.leaf[i],
      }
      for i, f in enumerate(fr)
  )
  g = {"base": bstats.glob}
  if hp.auto_alpha:
    num = den = 0.0
    for i in range(len(src)):
      a, b = src.run(
          _l1_terms,
          base,
          i,
          dict(base.coeffs),
          bstats.glob,
          per_leaf[i]["base"],
      )
      num += src.total(a)
      den += src.total(b)
    g["alpha"] = np.float32(num / max(den, 1e-30) / src.num_tasks)
  return _protocol.Stats(g, per_leaf)


@_protocol.method(wraps="base")
def lines(
    beta: float = 0.5,
    *,
    alpha: float | None = None,
    base: str | _protocol.Merger = "task_arithmetic",
    depth_fn: Callable[[str], int | None] = default_depth_fn,
    num_blocks: int | None = None,
    **base_hparams: Any,
) -> _protocol.Merger:
  """LiNeS on top of a merging method: ``θ0 + scale · (α + β ℓ/(L−1)) τ_merged``.

  ``τ_merged`` is the ``base`` method's merged vector at scale 1. Leaves
  outside the numbered blocks (embeddings, final norm, projection) get α.
  For merging the paper sets ``α = (‖Σt τt‖₁ / ‖τ_merged‖₁) / T`` (``1/T`` for
  task arithmetic): ``alpha=None`` computes exactly that. ``beta`` is tuned
  on validation ({0.1, ..., 1.0}). Both are traced coefficients.

  Args:
    beta: depth slope β.
    alpha: α, or None for the paper's norm-matching value.
    base: the merging method whose output is scaled: a registry name
      (:func:`mtx.merging.get` builds it with ``base_hparams``) or a built
      :class:`~mtx.merging.Merger`.
    depth_fn: ``path -> block index | None``.
    num_blocks: L; by default one more than the largest block index found.
    **base_hparams: the base method's hyperparameters.
  """
  b = _protocol.built_base("lines", "base", base, base_hparams)
  if b.name == "lines":
    raise ValueError("lines cannot wrap itself")
  if alpha is None and (b.needs_key or b.needs_pretrained or b.data):
    raise ValueError(
        f"lines(alpha=None) cannot compute the norm-matching alpha for "
        f"{b.name!r}; pass alpha explicitly"
    )
  return _protocol.Merger(
      "lines",
      LinesHParams(b, depth_fn, num_blocks, alpha is None),
      {"alpha": alpha, "beta": beta, **b.coeffs},
      _leaf,
      _prepare,
      data=b.data,
      needs_key=b.needs_key,
      needs_pretrained=b.needs_pretrained,
      per_task_scale=False,
      min_tasks=b.min_tasks,
      max_tasks=b.max_tasks,
      coeff_specs={
          **b.coeff_specs,
          "alpha": _checks.Coeff(none_ok=True),
          "beta": _checks.Coeff(),
      },
      data_check=b.data_check,
  )
