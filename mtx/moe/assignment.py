r"""What every router shares: layouts, capacity, losses and slot assignment.

The routers in :mod:`mtx.moe.routing` return one of the layouts defined here
(:class:`TokenChoice`, :class:`ExpertChoice`, :class:`SoftRouting`; see that
module's docstring for their fields and metrics). This module holds the
pieces they have in common: :func:`capacity`, :func:`aux_loss`, argument
checks, keyed draws, the softmax / entropy / z-loss helpers, and
:func:`token_choice`, which ranks token-choice assignments into buffer
slots and computes the metrics. Axis letters as in :mod:`mtx.moe`.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from mtx import tree as mtree

_acc = mtree.accum_dtype  # float32, or float64 under jax_enable_x64

__all__ = [
    "ExpertChoice",
    "Metrics",
    "Routing",
    "SoftRouting",
    "TokenChoice",
    "as_logits",
    "assign_positions",
    "aux_loss",
    "capacity",
    "check_capacity",
    "check_k",
    "draw",
    "entropy",
    "softmax_lse",
    "split_key",
    "token_choice",
    "z_loss",
]

Metrics = dict[str, jax.Array]


class TokenChoice(NamedTuple):
  """Token-choice routing: every token picks ``K`` experts.

  Attributes:
    expert_index: int32 ``[G, S, K]``, the chosen experts (distinct per
      token, best first).
    position: int32 ``[G, S, K]``, slot of the assignment in the expert's
      buffer (meaningful where ``kept``).
    weight: float32 ``[G, S, K]``, combine weight; 0 where not kept.
    kept: bool ``[G, S, K]``, the assignment is processed.
    probs: float32 ``[G, S, E]``, router probabilities.
    metrics: dict of float32 metrics (see the module docstring).
  """

  expert_index: jax.Array
  position: jax.Array
  weight: jax.Array
  kept: jax.Array
  probs: jax.Array
  metrics: Metrics


class ExpertChoice(NamedTuple):
  """Expert-choice routing: every expert picks ``C`` tokens.

  Attributes:
    token_index: int32 ``[G, E, C]``, the tokens each expert processes.
    weight: float32 ``[G, E, C]``, their combine weights.
    probs: float32 ``[G, S, E]``, router probabilities.
    metrics: dict of float32 metrics.
  """

  token_index: jax.Array
  weight: jax.Array
  probs: jax.Array
  metrics: Metrics


class SoftRouting(NamedTuple):
  """Soft MoE routing: every slot is a convex combination of all tokens.

  Attributes:
    dispatch: float32 ``[G, S, E, C]``; softmax over tokens ``S``.
    combine: float32 ``[G, S, E, C]``; softmax over slots ``(E, C)``.
    metrics: dict of float32 metrics.
  """

  dispatch: jax.Array
  combine: jax.Array
  metrics: Metrics


Routing = TokenChoice | ExpertChoice | SoftRouting

# ----------------------------------------------------------------------------
# Capacity and losses.


def capacity(
    num_tokens: int,
    num_experts: int,
    num_selected: int,
    capacity_factor: float | None,
    *,
    multiple: int = 4,
) -> int:
  """Buffer slots per expert: ``ceil(factor * tokens * k / experts)``.

  Rounded up to a multiple of ``multiple`` (4). Train and eval usually use
  different factors (e.g. 1.25 and 2.0): pass the one in use. ``None``
  means no drops: ``num_tokens`` slots (every token fits every expert).

  Args:
    num_tokens: tokens routed together (one group).
    num_experts: number of experts ``E``.
    num_selected: experts per token ``K``.
    capacity_factor: slots relative to a perfectly balanced load, > 0, or
      ``None``.
    multiple: round up to a multiple of this.

  Returns:
    The capacity ``C`` (a Python int, at least ``multiple``).

  Raises:
    ValueError: non-positive sizes or factor.

  >>> capacity(8192, 8, 2, 1.25)
  2560
  >>> capacity(10, 4, 1, 1.0)  # ceil(2.5) = 3 -> 4
  4
  """
  for name, v in (
      ("num_tokens", num_tokens),
      ("num_experts", num_experts),
      ("num_selected", num_selected),
      ("multiple", multiple),
  ):
    if not isinstance(v, numbers.Integral) or v < 1:
      raise ValueError(f"{name} must be a positive int, got {v!r}")
  if capacity_factor is None:
    return num_tokens
  if isinstance(capacity_factor, bool) or not isinstance(
      capacity_factor, numbers.Real
  ):
    raise ValueError(
        "capacity_factor must be a Python number (it sets buffer shapes), "
        f"got {capacity_factor!r}"
    )
  if not capacity_factor > 0:
    raise ValueError(f"capacity_factor must be > 0, got {capacity_factor!r}")
  c = math.ceil(capacity_factor * num_tokens * num_selected / num_experts)
  return max(multiple, -(-c // multiple) * multiple)


def aux_loss(
    aux: Mapping[str, jax.Array],
    *,
    load_balance_weight: float = 1e-2,
    z_loss_weight: float = 1e-3,
) -> jax.Array:
  """The weighted auxiliary loss to add to the task loss.

  ``load_balance_weight * load_balance_loss + z_loss_weight *
  router_z_loss`` with the Switch (1e-2) and ST-MoE (1e-3) defaults.

  >>> import jax.numpy as jnp
  >>> round(float(aux_loss({"load_balance_loss": jnp.float32(1.0),
  ...                       "router_z_loss": jnp.float32(2.0)})), 6)
  0.012
  """
  return load_balance_weight * aux["load_balance_loss"] + (
      z_loss_weight * aux["router_z_loss"]
  )


# ----------------------------------------------------------------------------
# Shared pieces.


def as_logits(logits: jax.typing.ArrayLike, name: str = "logits") -> jax.Array:
  logits = jnp.asarray(logits)
  if logits.ndim != 3:
    raise ValueError(f"{name} must be [G, S, E], got shape {logits.shape}")
  return logits.astype(_acc())


def check_k(num_selected: Any, num_experts: int) -> int:
  if (
      isinstance(num_selected, bool)
      or not isinstance(num_selected, numbers.Integral)
      or not 1 <= num_selected <= num_experts
  ):
    raise ValueError(
        f"num_selected must be an int in [1, {num_experts}] (the number of "
        f"experts), got {num_selected!r}"
    )
  return int(num_selected)


def check_capacity(c: Any) -> int | None:
  if c is None:
    return None
  if isinstance(c, bool) or not isinstance(c, numbers.Integral) or c < 1:
    raise ValueError(f"capacity must be a positive int or None, got {c!r}")
  return int(c)


def draw(
    fn: Callable[[jax.Array, tuple[int, ...]], jax.Array],
    key: jax.Array,
    shape: tuple[int, ...],
) -> jax.Array:
  """``fn(key, shape)``, or per group when ``key`` holds one key per group."""
  key = jnp.asarray(key) if not isinstance(key, jax.Array) else key
  if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
    per_group = key.ndim == 1
  else:  # raw uint32 keys: [2] for one key, [G, 2] per group
    per_group = key.ndim == 2
  if not per_group:
    return fn(key, shape)
  if key.shape[0] != shape[0]:
    raise ValueError(f"got {key.shape[0]} per-group keys for {shape[0]} groups")
  return jax.vmap(lambda k: fn(k, shape[1:]))(key)


def softmax_lse(
    logits: jax.Array, axis: int = -1
) -> tuple[jax.Array, jax.Array]:
  """``(softmax(logits), logsumexp(logits))`` sharing one max and exp."""
  m = jax.lax.stop_gradient(jnp.max(logits, axis=axis, keepdims=True))
  ez = jnp.exp(logits - m)
  total = jnp.sum(ez, axis=axis, keepdims=True)
  return ez / total, m + jnp.log(total)


def entropy(probs, lse, logits, axis=-1):
  """Entropy of ``softmax(logits)``: ``lse - Σ p · logits``."""
  return jnp.squeeze(lse, axis) - jnp.sum(probs * logits, axis=axis)


def z_loss(lse: jax.Array) -> jax.Array:
  """ST-MoE router z-loss: ``mean logsumexp(logits)²``."""
  return jnp.mean(jnp.square(lse))


def assign_positions(
    expert_index_GSK: jax.Array,
    active_GSK: jax.Array,
    num_experts: int,
    priority_GS: jax.Array | None,
) -> tuple[jax.Array, jax.Array]:
  """Buffer slot of every assignment, and the routed count per expert.

  Assignments are ranked by (choice k, token priority); the slot of an
  assignment is the number of higher-ranked assignments to the same expert.
  Inactive assignments are ranked after everything and take no slot.
  """
  g, s, k = expert_index_GSK.shape
  e_total = num_experts + 1
  if e_total * s * k >= 2**31:
    raise ValueError(
        f"too many assignments per group to rank in int32: S={s}, K={k}, "
        f"E={num_experts}; use more groups"
    )
  if priority_GS is None:
    token_rank = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (g, s))
  else:
    order = jnp.argsort(-priority_GS, axis=-1, stable=True)
    token_rank = jnp.argsort(order, axis=-1).astype(jnp.int32)
  choice = jnp.arange(k, dtype=jnp.int32)
  rank_GSK = choice * s + token_rank[..., None]  # unique in [0, S*K)
  e_GSK = jnp.where(active_GSK, expert_index_GSK, num_experts)
  key = (e_GSK * (s * k) + rank_GSK).reshape(g, s * k)
  order = jnp.argsort(key, axis=-1)
  sorted_pos = jnp.argsort(order, axis=-1).reshape(g, s, k)
  counts_GE = jax.vmap(lambda e: jnp.bincount(e, length=e_total))(
      e_GSK.reshape(g, s * k)
  )
  starts_GE = jnp.cumsum(counts_GE, axis=-1) - counts_GE
  start_GSK = jnp.take_along_axis(
      starts_GE, e_GSK.reshape(g, s * k), axis=-1
  ).reshape(g, s, k)
  position = (sorted_pos - start_GSK).astype(jnp.int32)
  return position, counts_GE[:, :num_experts]


def token_choice(
    *,
    z_loss: jax.Array,
    entropy: jax.Array,
    probs: jax.Array,
    expert_index: jax.Array,
    gates: jax.Array,
    active: jax.Array,
    capacity: int | None,
    priority: jax.Array | None,
) -> TokenChoice:
  g, s, k = expert_index.shape
  e = probs.shape[-1]
  position, routed_GE = assign_positions(expert_index, active, e, priority)
  kept = active if capacity is None else active & (position < capacity)
  weight = jnp.where(kept, gates, 0.0).astype(_acc())
  routed_GE = routed_GE.astype(_acc())
  n_routed_G = jnp.maximum(routed_GE.sum(-1), 1.0)
  f_GE = jax.lax.stop_gradient(routed_GE / n_routed_G[:, None])
  p_GE = probs.mean(axis=1)
  n_routed = jnp.maximum(routed_GE.sum(), 1.0)
  # Slots are handed out contiguously, so min(routed, C) were kept.
  slots = s if capacity is None else capacity
  kept_GE = jnp.minimum(routed_GE, slots)
  metrics = {
      "load_balance_loss": jnp.mean(e * jnp.sum(f_GE * p_GE, axis=-1)),
      "router_z_loss": z_loss,
      "router_entropy": entropy,
      "expert_load": routed_GE.sum(0) / n_routed,
      "expert_fill": kept_GE.sum(0) / (g * slots),
      "drop_fraction": 1.0 - kept_GE.sum() / n_routed,
  }
  return TokenChoice(
      expert_index=expert_index.astype(jnp.int32),
      position=position,
      weight=weight,
      kept=kept,
      probs=probs,
      metrics=metrics,
  )


def split_key(key: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Splits one key, or each of a batch of per-group keys."""
  if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
    batched = key.ndim == 1
  else:
    batched = jnp.ndim(key) == 2
  if batched:
    pair = jax.vmap(jax.random.split)(key)
    return pair[:, 0], pair[:, 1]
  a, b = jax.random.split(key)
  return a, b
