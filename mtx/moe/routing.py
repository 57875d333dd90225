r"""Routers: pure functions from router logits to a routing decision.

Axis letters as in :mod:`mtx.moe` (``G`` groups, ``S`` tokens per group, ``E``
experts, ``C`` capacity, ``K`` selected, ``T`` tasks, ``D`` model width).
Routing is independent per group; capacity is per group and expert.

A router returns one of three layouts, all NamedTuples of arrays plus a
``metrics`` dict (float32 scalars and ``[E]`` vectors):

* :class:`TokenChoice` (``top_k``, ``hash``, ``random``): every token picks
  ``K`` experts; ``expert_index``/``position``/``weight``/``kept`` are
  ``[G, S, K]``. ``position`` is the slot of the assignment in its expert's
  buffer; an assignment is kept when ``position < capacity``. Buffers are
  filled in priority order: all first choices before any second choice
  (GShard/V-MoE), tokens in sequence order, or by decreasing top gate with
  batch-priority routing (V-MoE BPR). Dropped assignments get weight 0, so a
  token dropped by all its experts produces 0 and passes through the
  caller's residual.
* :class:`ExpertChoice` (Zhou et al.): every expert picks its top-``C``
  tokens; ``token_index``/``weight`` are ``[G, E, C]``.
* :class:`SoftRouting` (Puigcerver et al.): dense ``dispatch``/``combine``
  weights ``[G, S, E, C]`` with ``C`` slots per expert; no token is dropped.

Metrics (every router): ``load_balance_loss`` (Switch: ``E Σ_e f_e P_e``
with ``f_e`` the fraction of routed assignments sent to expert ``e`` and
``P_e`` its mean router probability, averaged over groups; exactly 1.0 when
either is uniform, gradient through ``P`` only), ``router_z_loss``
(ST-MoE: ``mean_tokens logsumexp(logits)²`` of the clean logits),
``router_entropy`` (mean entropy of the router probabilities, nats),
``expert_load`` ``[E]`` (fraction of routed assignments per expert, before
capacity; sums to 1), ``expert_fill`` ``[E]`` (fraction of each expert's
buffer slots used, after capacity) and ``drop_fraction`` (fraction of routed
assignments dropped for lack of capacity). Routers balanced by construction
(expert choice, soft) report ``load_balance_loss = 1.0``. Suggested weights:
1e-2 for the load-balance loss, 1e-3 for the z-loss (:func:`aux_loss`).

All router math is float32 whatever the input dtype (float64 under
``jax_enable_x64``). Randomness (noisy
gating, GShard random second expert, random routing) takes an explicit
``key``: one key, or one key per group (shape ``[G]``); the layers pass
per-group keys so that sharded and unsharded runs draw the same numbers.

Example:

>>> import jax.numpy as jnp
>>> from mtx.moe import routing
>>> logits = jnp.array([[[2.0, 0.0], [3.0, 0.0], [0.0, 1.0]]])  # [G=1,S=3,E=2]
>>> r = routing.top_k_routing(logits, num_selected=1, capacity=1)
>>> r.expert_index[..., 0].tolist(), r.kept[..., 0].tolist()
([[0, 0, 1]], [[True, False, True]])
>>> r = routing.top_k_routing(
...     logits, num_selected=1, capacity=1, batch_priority=True)
>>> r.kept[..., 0].tolist()  # token 1 has the larger gate: it goes first
[[False, True, True]]
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

import jax
import jax.numpy as jnp

from mtx import tree as mtree
from mtx.moe import assignment as _asg
from mtx.moe.assignment import ExpertChoice
from mtx.moe.assignment import Metrics
from mtx.moe.assignment import Routing
from mtx.moe.assignment import SoftRouting
from mtx.moe.assignment import TokenChoice
from mtx.moe.assignment import aux_loss
from mtx.moe.assignment import capacity

_acc = mtree.accum_dtype  # float32, or float64 under jax_enable_x64

__all__ = [
    "ExpertChoice",
    "Metrics",
    "Routing",
    "SoftRouting",
    "TokenChoice",
    "aux_loss",
    "capacity",
    "expert_choice_routing",
    "hash_routing",
    "random_routing",
    "router_logits",
    "soft_routing",
    "top_k_routing",
]


# ----------------------------------------------------------------------------
# Router logits.


def router_logits(
    router: Mapping[str, jax.Array],
    x_GSD: jax.Array,
    *,
    task_ids_GS: jax.Array | None = None,
) -> jax.Array:
  """float32 router logits ``[G, S, X]`` for tokens ``x_GSD``.

  ``router`` holds ``kernel`` ``[D, X]`` (``X = E``, or ``E * slots`` for
  soft MoE) and optionally ``bias`` ``[X]``. Task-conditioned routing
  (M³ViT, Mod-Squad) takes ``task_ids_GS`` (int, one task per token) and
  either a router per task (``kernel`` ``[T, D, X]``) or a learned task
  embedding added to the router input (``task_embedding`` ``[T, D]``).

  Raises:
    ValueError: a task-conditioned router without ``task_ids_GS``, or a
      kernel whose input width is not ``D``.

  >>> import jax.numpy as jnp
  >>> r = {"kernel": jnp.stack([jnp.eye(2), -jnp.eye(2)])}  # T=2 routers
  >>> x = jnp.ones((1, 2, 2)).at[0, :, 1].set(0.0)
  >>> router_logits(r, x, task_ids_GS=jnp.array([[0, 1]])).tolist()
  [[[1.0, 0.0], [-1.0, 0.0]]]
  """
  kshape = jnp.shape(router["kernel"])
  d = jnp.shape(x_GSD)[-1]
  if len(kshape) not in (2, 3):
    raise ValueError(f"router kernel must be [D, E] or [T, D, E], got {kshape}")
  if kshape[-2] != d:
    raise ValueError(
        f"router kernel {list(kshape)} does not take inputs of width {d}"
    )
  if (len(kshape) == 3 or "task_embedding" in router) and task_ids_GS is None:
    raise ValueError(
        "task-conditioned router (kernel [T, D, E] or task_embedding) needs "
        "task_ids"
    )
  return _router_logits(dict(router), x_GSD, task_ids_GS)


@jax.jit
def _router_logits(router, x_GSD, task_ids_GS):
  acc = _acc()
  x = x_GSD.astype(acc)
  kernel = router["kernel"].astype(acc)
  if "task_embedding" in router:
    x = x + router["task_embedding"].astype(acc)[task_ids_GS]
  if kernel.ndim == 3:
    # One [G, S, T, X] product, then each token keeps its task's row: cheap
    # for the handful of tasks this is meant for.
    all_tasks = jnp.einsum("gsd,tdx->gstx", x, kernel)
    logits = jnp.take_along_axis(
        all_tasks, task_ids_GS[..., None, None], axis=2
    )[:, :, 0]
  else:
    logits = jnp.einsum("gsd,dx->gsx", x, kernel)
  if "bias" in router:
    logits = logits + router["bias"].astype(acc)
  return logits


# ----------------------------------------------------------------------------
# Routers.


def top_k_routing(
    logits_GSE: jax.typing.ArrayLike,
    *,
    num_selected: int,
    capacity: int | None,
    normalize: bool | None = None,
    batch_priority: bool = False,
    second_expert_policy: str = "all",
    noise_std: float = 0.0,
    key: jax.Array | None = None,
) -> TokenChoice:
  r"""Top-k token-choice routing (Switch k=1, GShard / Mixtral k=2).

  ``p = softmax(logits)`` over experts; each token picks its ``k`` most
  probable experts with gates ``p_k`` (renormalised to sum to 1 when
  ``normalize``, the GShard / Mixtral rule; Switch uses the raw ``p_1``).
  Assignments beyond ``capacity`` are dropped (weight 0) in priority order:
  all first choices before any second choice; tokens in sequence order, or
  by decreasing top probability with ``batch_priority`` (V-MoE BPR).

  Args:
    logits_GSE: router logits ``[G, S, E]`` (computed in float32).
    num_selected: ``k`` in ``[1, E]``.
    capacity: slots per expert and group (:func:`capacity`), or ``None``
      for no drops.
    normalize: renormalise the top-k gates to sum to 1; default: ``k > 1``.
    batch_priority: fill buffers by decreasing top gate (V-MoE BPR).
    second_expert_policy: ``"all"`` (every token goes to its k experts) or
      ``"random"`` (GShard, ``k = 2``: the second expert is used with
      probability ``min(1, 2 g_2)`` of the renormalised second gate; needs
      ``key``).
    noise_std: standard deviation of Gaussian noise added to the logits
      before selection (noisy gating; needs ``key``). The z-loss uses the
      clean logits, everything else the noisy ones.
    key: PRNG key, or one per group (``[G]``), for noise / random policy.

  Returns:
    A :class:`TokenChoice`.

  Raises:
    ValueError: bad shapes, ``num_selected`` outside ``[1, E]``, unknown
      policy, or randomness requested without ``key``.

  >>> import jax.numpy as jnp
  >>> logits = jnp.log(jnp.array([[[0.5, 0.3, 0.2]]]))
  >>> r = top_k_routing(logits, num_selected=2, capacity=4)
  >>> r.expert_index.tolist(), [round(w, 3) for w in r.weight[0, 0].tolist()]
  ([[[0, 1]]], [0.625, 0.375])

  References:
    Fedus et al., Switch Transformers, https://arxiv.org/abs/2101.03961;
    Lepikhin et al., GShard, https://arxiv.org/abs/2006.16668;
    Riquelme et al., V-MoE, https://arxiv.org/abs/2106.05974.
  """
  clean = _asg.as_logits(logits_GSE)
  e = clean.shape[-1]
  k = _asg.check_k(num_selected, e)
  capacity = _asg.check_capacity(capacity)
  if second_expert_policy not in ("all", "random"):
    raise ValueError(
        f"second_expert_policy must be 'all' or 'random', got "
        f"{second_expert_policy!r}"
    )
  if second_expert_policy == "random" and k != 2:
    raise ValueError(
        f"second_expert_policy='random' is GShard's top-2 rule; num_selected "
        f"is {k}"
    )
  if not noise_std >= 0:
    raise ValueError(f"noise_std must be >= 0, got {noise_std!r}")
  needs_key = noise_std > 0 or second_expert_policy == "random"
  if needs_key and key is None:
    raise ValueError("noisy gating / random second expert need an explicit key")
  if normalize is None:
    normalize = k > 1 or second_expert_policy == "random"
  return _top_k(
      clean,
      key,
      k,
      capacity,
      bool(normalize),
      bool(batch_priority),
      second_expert_policy,
      float(noise_std),
  )


@functools.partial(jax.jit, static_argnums=(2, 3, 4, 5, 6, 7))
def _top_k(clean, key, k, capacity, normalize, batch_priority, policy, noise):
  logits = clean
  probs, lse = _asg.softmax_lse(logits)
  z_loss = _asg.z_loss(lse)
  if noise > 0:
    key, sub = _asg.split_key(key)
    logits = logits + noise * _asg.draw(jax.random.normal, sub, logits.shape)
    probs, lse = _asg.softmax_lse(logits)
  gates, index = jax.lax.top_k(probs, k)
  if normalize:
    gates = gates / jnp.sum(gates, axis=-1, keepdims=True)
  active = jnp.ones(index.shape, bool)
  if policy == "random":
    u = _asg.draw(jax.random.uniform, key, index.shape[:2])
    use_second = u < 2.0 * jax.lax.stop_gradient(gates[..., 1])
    active = active.at[..., 1].set(use_second)
  priority = jax.lax.stop_gradient(probs.max(-1)) if batch_priority else None
  return _asg.token_choice(
      z_loss=z_loss,
      entropy=jnp.mean(_asg.entropy(probs, lse, logits)),
      probs=probs,
      expert_index=index,
      gates=gates,
      active=active,
      capacity=capacity,
      priority=priority,
  )


def expert_choice_routing(
    logits_GSE: jax.typing.ArrayLike, *, capacity: int
) -> ExpertChoice:
  r"""Expert-choice routing: each expert takes its top-``C`` tokens.

  ``p = softmax(logits)`` over experts; expert ``e`` processes the ``C``
  tokens with the largest ``p[:, e]`` (ties: lower token index first) with
  combine weight ``p[s, e]``. A token may be picked by several experts or
  by none (``drop_fraction`` counts the latter). Balanced by construction,
  so ``load_balance_loss`` is 1.0 and ``expert_load`` is uniform.

  Args:
    logits_GSE: router logits ``[G, S, E]``.
    capacity: tokens per expert, ``1 <= C <= S``.

  Returns:
    An :class:`ExpertChoice`.

  >>> import jax.numpy as jnp
  >>> logits = jnp.array([[[1.0, 0.0], [0.0, 1.0], [2.0, 0.0]]])
  >>> expert_choice_routing(logits, capacity=1).token_index.tolist()
  [[[2], [1]]]

  References:
    Zhou et al., Mixture-of-Experts with Expert Choice Routing,
    https://arxiv.org/abs/2202.09368.
  """
  logits = _asg.as_logits(logits_GSE)
  g, s, e = logits.shape
  c = _asg.check_capacity(capacity)
  if c is None or c > s:
    raise ValueError(
        f"expert-choice capacity must be an int in [1, {s}] (tokens per "
        f"group), got {capacity!r}"
    )
  return _expert_choice(logits, c)


@functools.partial(jax.jit, static_argnums=1)
def _expert_choice(logits, c):
  g, s, e = logits.shape
  probs, lse = _asg.softmax_lse(logits)
  weight, token_index = jax.lax.top_k(jnp.swapaxes(probs, 1, 2), c)
  chosen_GS = (
      jnp.zeros((g, s), _acc())
      .at[jnp.arange(g)[:, None], token_index.reshape(g, e * c)]
      .add(1.0)
  )
  metrics = {
      "load_balance_loss": jnp.asarray(1.0, _acc()),
      "router_z_loss": _asg.z_loss(lse),
      "router_entropy": jnp.mean(_asg.entropy(probs, lse, logits)),
      "expert_load": jnp.full((e,), 1.0 / e, _acc()),
      "expert_fill": jnp.ones((e,), _acc()),
      "drop_fraction": jnp.mean((chosen_GS == 0).astype(_acc())),
  }
  return ExpertChoice(
      token_index=token_index.astype(jnp.int32),
      weight=weight,
      probs=probs,
      metrics=metrics,
  )


def soft_routing(
    logits_GSX: jax.typing.ArrayLike, *, num_experts: int
) -> SoftRouting:
  r"""Soft MoE: slots are weighted averages of tokens, outputs of slots.

  ``logits`` ``[G, S, E * C]`` score every token against every slot (``C``
  slots per expert). ``dispatch = softmax over tokens`` (each slot's input
  is a convex combination of the group's tokens) and ``combine = softmax
  over slots`` (each token's output a convex combination of the slots'
  outputs). Nothing is dropped; ``expert_load`` is each expert's share of
  the combine weights.

  Args:
    logits_GSX: ``[G, S, E * C]`` token-slot logits.
    num_experts: ``E``; must divide the last axis.

  Returns:
    A :class:`SoftRouting` with ``[G, S, E, C]`` weights.

  >>> import jax.numpy as jnp
  >>> r = soft_routing(jnp.zeros((1, 4, 6)), num_experts=3)
  >>> r.dispatch.shape, float(r.dispatch[0, 0, 0, 0]), float(r.combine[0, 0, 0, 0])
  ((1, 4, 3, 2), 0.25, 0.1666666716337204)

  References:
    Puigcerver et al., From Sparse to Soft Mixtures of Experts,
    https://arxiv.org/abs/2308.00951.
  """
  logits = _asg.as_logits(logits_GSX, "logits_GSX")
  g, s, x = logits.shape
  if not isinstance(num_experts, int) or num_experts < 1 or x % num_experts:
    raise ValueError(
        f"num_experts must be a positive int dividing the {x} slots, got "
        f"{num_experts!r}"
    )
  return _soft(logits, num_experts)


@functools.partial(jax.jit, static_argnums=1)
def _soft(logits, num_experts):
  g, s, x = logits.shape
  c = x // num_experts
  dispatch = jax.nn.softmax(logits, axis=1).reshape(g, s, num_experts, c)
  combine_flat, lse = _asg.softmax_lse(logits, axis=2)
  combine = combine_flat.reshape(g, s, num_experts, c)
  metrics = {
      "load_balance_loss": jnp.asarray(1.0, _acc()),
      "router_z_loss": _asg.z_loss(lse),
      "router_entropy": jnp.mean(_asg.entropy(combine_flat, lse, logits)),
      "expert_load": combine.sum(-1).mean((0, 1)),
      "expert_fill": jnp.ones((num_experts,), _acc()),
      "drop_fraction": jnp.asarray(0.0, _acc()),
  }
  return SoftRouting(dispatch=dispatch, combine=combine, metrics=metrics)


def _hash32(x: jax.Array) -> jax.Array:
  """A fixed 32-bit integer mix (murmur3 finaliser)."""
  x = x.astype(jnp.uint32)
  x = (x ^ (x >> 16)) * jnp.uint32(0x85EBCA6B)
  x = (x ^ (x >> 13)) * jnp.uint32(0xC2B2AE35)
  return x ^ (x >> 16)


def hash_routing(
    logits_GSE: jax.typing.ArrayLike,
    token_ids_GS: jax.typing.ArrayLike,
    *,
    num_selected: int,
    capacity: int | None,
) -> TokenChoice:
  r"""Hash routing baseline: the expert is a fixed hash of the token id.

  Choice ``k`` of token ``t`` is expert ``(hash(t) + k) mod E`` (so the
  ``k`` experts are distinct), each with weight ``1 / k``. The router
  logits only feed the metrics and auxiliary losses; nothing is learned.

  Args:
    logits_GSE: router logits ``[G, S, E]``.
    token_ids_GS: int ids (vocabulary ids, or positions) ``[G, S]``.
    num_selected: ``k`` in ``[1, E]``.
    capacity: slots per expert and group, or ``None``.

  Returns:
    A :class:`TokenChoice`.

  >>> import jax.numpy as jnp
  >>> ids = jnp.array([[7, 7, 3]])
  >>> r = hash_routing(jnp.zeros((1, 3, 4)), ids, num_selected=1, capacity=4)
  >>> i = r.expert_index[0, :, 0].tolist(); i[0] == i[1]
  True

  References:
    Roller et al., Hash Layers For Large Sparse Models,
    https://arxiv.org/abs/2106.04426.
  """
  logits = _asg.as_logits(logits_GSE)
  e = logits.shape[-1]
  k = _asg.check_k(num_selected, e)
  capacity = _asg.check_capacity(capacity)
  ids = jnp.asarray(token_ids_GS)
  if ids.shape != logits.shape[:2]:
    raise ValueError(
        f"token_ids must have shape {logits.shape[:2]}, got {ids.shape}"
    )
  return _hash(logits, ids, k, capacity)


@functools.partial(jax.jit, static_argnums=(2, 3))
def _hash(logits, ids, k, capacity):
  e = logits.shape[-1]
  base = (_hash32(ids) % jnp.uint32(e)).astype(jnp.int32)
  index = (base[..., None] + jnp.arange(k, dtype=jnp.int32)) % e
  probs, lse = _asg.softmax_lse(logits)
  return _asg.token_choice(
      z_loss=_asg.z_loss(lse),
      entropy=jnp.mean(_asg.entropy(probs, lse, logits)),
      probs=probs,
      expert_index=index,
      gates=jnp.full(index.shape, 1.0 / k, _acc()),
      active=jnp.ones(index.shape, bool),
      capacity=capacity,
      priority=None,
  )


def random_routing(
    logits_GSE: jax.typing.ArrayLike,
    key: jax.Array,
    *,
    num_selected: int,
    capacity: int | None,
) -> TokenChoice:
  """Random routing baseline: ``k`` distinct uniformly random experts.

  Each with weight ``1 / k``; the logits only feed the metrics.

  Args:
    logits_GSE: router logits ``[G, S, E]``.
    key: PRNG key, or one per group.
    num_selected: ``k`` in ``[1, E]``.
    capacity: slots per expert and group, or ``None``.

  Returns:
    A :class:`TokenChoice`.

  >>> import jax, jax.numpy as jnp
  >>> r = random_routing(jnp.zeros((1, 5, 4)), jax.random.key(0),
  ...                    num_selected=2, capacity=None)
  >>> bool((r.expert_index[..., 0] != r.expert_index[..., 1]).all())
  True
  """
  logits = _asg.as_logits(logits_GSE)
  e = logits.shape[-1]
  k = _asg.check_k(num_selected, e)
  capacity = _asg.check_capacity(capacity)
  if key is None:
    raise ValueError("random routing needs an explicit key")
  return _random(logits, key, k, capacity)


@functools.partial(jax.jit, static_argnums=(2, 3))
def _random(logits, key, k, capacity):
  u = _asg.draw(jax.random.uniform, key, logits.shape)
  _, index = jax.lax.top_k(u, k)
  probs, lse = _asg.softmax_lse(logits)
  return _asg.token_choice(
      z_loss=_asg.z_loss(lse),
      entropy=jnp.mean(_asg.entropy(probs, lse, logits)),
      probs=probs,
      expert_index=index,
      gates=jnp.full(index.shape, 1.0 / k, _acc()),
      active=jnp.ones(index.shape, bool),
      capacity=capacity,
      priority=None,
  )
