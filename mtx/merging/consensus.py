"""TALL masks and Consensus merging.

Reference:
  Wang, Dimitriadis et al., "Localizing Task Information for Improved Model
  Merging and Compression", ICML 2024. https://arxiv.org/abs/2405.07813
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from mtx.merging import _checks
from mtx.merging import _protocol


def tall_masks(
    tv: _protocol.Tasks, mtl: jax.Array, tall_lambda: jax.Array | float
) -> tuple[jax.Array, ...]:
  """Per-task masks ``m_t = |τt| > λt·|τMTL − τt|`` (strict, as the code).

  Args:
    tv: the task vectors of one leaf, one array per task.
    mtl: the multi-task vector of that leaf (e.g. ``Σt τt``).
    tall_lambda: λ, a scalar or ``[T]``.

  Returns:
    One boolean mask per task.
  """
  lams = _protocol.per_task(tall_lambda, len(tv))
  return tuple(
      jnp.abs(x) > jnp.asarray(lam, x.dtype) * jnp.abs(mtl - x)
      for x, lam in zip(tv, lams)
  )


def consensus_mask(masks, k: int = 2) -> jax.Array:
  """Entries active in at least ``k`` tasks: ``Σt m_t >= k``."""
  return _protocol.tsum([m.astype(jnp.int32) for m in masks]) >= k


class ConsensusHParams(NamedTuple):
  """Structural hyperparameters of :func:`consensus`: ``k`` and the TIES
  base (None: task arithmetic, the plain sum)."""

  k: int
  base: _protocol.Merger | None


def _mtl(hp: ConsensusHParams, tv, ctx):
  base = hp.base
  if base is None:
    return _protocol.tsum(tv)
  inner = ctx._replace(scale=jnp.ones((), tv[0].dtype))
  return base.leaf_fn(base.static, tv, inner)


def _leaf(hp: ConsensusHParams, tv, ctx):
  mtl = _mtl(hp, tv, ctx)
  masks = tall_masks(tv, mtl, ctx.coeffs["tall_lambda"])
  keep = consensus_mask(masks, hp.k)
  return _protocol.scalar_scale(ctx, "consensus") * jnp.where(keep, mtl, 0)


def _prepare(hp: ConsensusHParams, src, key):
  base = hp.base
  return base.prepare_fn(base.static, src, key)


@_protocol.method(wraps="base", base_defaults={"ties": {"reduce": "sum"}})
def consensus(
    k: int = 2,
    *,
    tall_lambda: Any = 0.4,
    base: str | _protocol.Merger = "task_arithmetic",
    **base_hparams: Any,
) -> _protocol.Merger:
  """Consensus merging: ``θ0 + scale · τMTL ⊙ [Σt m_t >= k]``.

  ``τMTL`` is the unscaled task-arithmetic sum ``Σt τt`` (``base=
  "task_arithmetic"``, the default of the authors' code) or the unscaled TIES
  vector (``base="ties"``; the authors use ``reduce="sum"``, density 0.2,
  which is the default here when ``base="ties"``). ``m_t`` are the TALL masks
  with ``tall_lambda`` λ (a traced coefficient, scalar or ``[T]``; the paper
  picks λt per task from {0.2, ..., 0.6} on validation). ``scale`` α is
  chosen from {0.1, ..., 1.0}. ``k=2`` drops entries used by fewer than two
  tasks ("selfish" and "catastrophic" weights).

  Args:
    k: minimum number of tasks whose TALL mask contains an entry.
    tall_lambda: λ of the TALL masks: a finite ``λ >= 0``, or one per model.
    base: ``"task_arithmetic"`` or ``"ties"`` (:func:`mtx.merging.get`
      builds it with ``base_hparams``), or such a built
      :class:`~mtx.merging.Merger`.
    **base_hparams: TIES hyperparameters when ``base="ties"``.

  >>> import jax.numpy as jnp, mtx
  >>> pre = {"w": jnp.zeros(3)}
  >>> fts = [{"w": jnp.array([1.0, 1.0, 0.0])}, {"w": jnp.array([1.0, 0.0, 1.0])},
  ...        {"w": jnp.array([1.0, 0.0, 0.0])}]
  >>> mtx.merging.merge(pre, fts, "consensus", k=2)["w"].tolist()
  [3.0, 0.0, 0.0]
  """
  if int(k) != k or k < 0:
    raise ValueError(f"k must be a non-negative integer, got {k!r}")
  b = _protocol.built_base("consensus", "base", base, base_hparams)
  _protocol.check_choice("base", b.name, ("task_arithmetic", "ties"))
  if b.name == "task_arithmetic":
    b = None  # the plain sum Σt τt
  return _protocol.Merger(
      "consensus",
      ConsensusHParams(int(k), b),
      {"tall_lambda": tall_lambda},
      _leaf,
      _prepare if b is not None and b.prepare_fn is not None else None,
      coeff_specs={"tall_lambda": _checks.Coeff("either", lo=0.0)},
  )
