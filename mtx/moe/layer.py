r"""The mixture-of-experts layer: routing, dispatch, experts, combine.

:func:`apply` is the one entry point; ``router`` picks the routing rule
(:data:`ROUTERS`) and ``backend`` how tokens reach the experts
(:data:`BACKENDS`). Every backend computes the same function (up to float
rounding):

* ``"einsum"``: one-hot dispatch and combine tensors ``[G, S, E, C]`` and
  einsums (GShard / V-MoE style). Simple, and its cost grows with
  ``S * E * C``: for small ``E`` and groups.
* ``"sort"``: assignments are ranked by expert, tokens gathered into
  ``[G, E, C, D]`` buffers, the experts run as one batched matmul and the
  outputs gathered back per (token, choice). Dispatch costs ``O(S K D)``;
  the fast one on CPU.
* ``"ragged"``: assignments sorted by expert and fed to
  ``jax.lax.ragged_dot`` (no ``[E, C]`` padding; with
  ``capacity_factor=None`` it is dropless at no extra cost). On GPU/TPU this
  is a grouped matmul; **on CPU XLA lowers ragged_dot densely** (it masks
  the rows per expert and does ``E`` times the FLOPs and memory), so it is
  only there for parity and portability on CPU (see
  ``benchmarks/moe_layer.py``).
* ``"expert_parallel"``: :func:`mtx.moe.sharded.apply` on a device mesh
  (needs ``mesh=``).

Soft MoE is dense by nature: its dispatch and combine are einsums in every
backend.

The expert is an MLP ``act(x @ wi[e]) @ wo[e]``; optional shared experts
(DeepSeek-MoE) in ``params["shared"]`` (``wi`` ``[N, D, F']``, ``wo``
``[N, F', D]``, or one expert without the leading axis) run on every token
with weight 1 and are added to the output. Expert math runs in the params'
dtype; router math and the combine in float32 (float64 under
``jax_enable_x64``); ``y`` has ``x``'s dtype. Each distinct configuration
(router, backend, shapes, structural options) compiles one XLA program,
cached across calls.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from mtx import tree as mtree
from mtx.moe import dispatch as _dispatch
from mtx.moe import routing as _routing
from mtx.moe import sharded as _sharded
from mtx.moe.dispatch import ACTIVATIONS
from mtx.moe.dispatch import ROUTERS
from mtx.moe.dispatch import expert_mlp

_acc = mtree.accum_dtype  # float32, or float64 under jax_enable_x64

__all__ = ["ACTIVATIONS", "BACKENDS", "ROUTERS", "apply", "expert_mlp", "init"]

# How tokens reach the experts (see the module docstring); the first three
# run on one device, "expert_parallel" is mtx.moe.sharded.apply.
BACKENDS = ("einsum", "sort", "ragged", "expert_parallel")

# ----------------------------------------------------------------------------
# Parameters.


def init(
    key: jax.Array,
    *,
    d_model: int,
    hidden: int,
    num_experts: int,
    slots_per_expert: int | None = None,
    num_tasks: int | None = None,
    task_conditioning: str = "per_task",
    num_shared: int = 0,
    router_std: float = 0.02,
    dtype: Any = jnp.float32,
) -> dict[str, Any]:
  """Random MoE params in the layout :func:`apply` takes.

  ``wi`` ~ N(0, 1/D), ``wo`` ~ N(0, 1/F), router ~ N(0, router_std²).

  Args:
    key: PRNG key.
    d_model: ``D``.
    hidden: ``F``, the expert MLP width.
    num_experts: ``E``.
    slots_per_expert: for soft MoE: the router kernel gets ``E * slots``
      columns.
    num_tasks: ``T`` for task-conditioned routing.
    task_conditioning: ``"per_task"`` (router kernel ``[T, D, E]``) or
      ``"embedding"`` (``task_embedding`` ``[T, D]`` added to the input).
    num_shared: shared (always-on) experts, each of width ``hidden``.
    router_std: router init scale.
    dtype: params dtype (the router stays float32).

  Returns:
    ``{"router": {"kernel"}, "experts": {"wi", "wo"}}`` (+ ``"shared"``).

  >>> import jax
  >>> p = init(jax.random.key(0), d_model=8, hidden=16, num_experts=4)
  >>> jax.tree.map(lambda a: a.shape, p)
  {'experts': {'wi': (4, 8, 16), 'wo': (4, 16, 8)}, 'router': {'kernel': (8, 4)}}
  """
  if num_tasks is not None and task_conditioning not in (
      "per_task",
      "embedding",
  ):
    raise ValueError(
        f"task_conditioning must be 'per_task' or 'embedding', got "
        f"{task_conditioning!r}"
    )
  return _init(
      key,
      d_model,
      hidden,
      num_experts,
      slots_per_expert or 1,
      num_tasks,
      task_conditioning,
      num_shared,
      float(router_std),
      jnp.dtype(dtype),
  )


@functools.partial(jax.jit, static_argnums=tuple(range(1, 10)))
def _init(key, d, f, e, slots, t, conditioning, num_shared, router_std, dtype):
  per_task = t is not None and conditioning == "per_task"
  shapes = {
      "kernel": (t, d, e * slots) if per_task else (d, e * slots),
      "wi": (e, d, f),
      "wo": (e, f, d),
      "task_embedding": (t, d) if conditioning == "embedding" and t else (0,),
      "shared_wi": (num_shared, d, f),
      "shared_wo": (num_shared, f, d),
  }
  draw = dict(zip(shapes, _dispatch.normals(key, tuple(shapes.values()))))
  params: dict[str, Any] = {
      "router": {"kernel": router_std * draw["kernel"]},
      "experts": {
          "wi": (draw["wi"] / math.sqrt(d)).astype(dtype),
          "wo": (draw["wo"] / math.sqrt(f)).astype(dtype),
      },
  }
  if t is not None and conditioning == "embedding":
    params["router"]["task_embedding"] = draw["task_embedding"]
  if num_shared:
    params["shared"] = {
        "wi": (draw["shared_wi"] / math.sqrt(d)).astype(dtype),
        "wo": (draw["shared_wo"] / math.sqrt(f)).astype(dtype),
    }
  return params


# ----------------------------------------------------------------------------
# Local backends: tokens [G, S, D] -> experts -> tokens.


def _buffered(method):
  dispatch, combine = _dispatch.DISPATCH[method]

  def run(experts, x_GSD, r, c, act):
    e = experts["wi"].shape[0]
    x_GECD = dispatch(x_GSD, r, c, e)
    o_GECD = expert_mlp(experts, x_GECD, act)
    return combine(o_GECD, r, c, e, x_GSD.shape[1])

  return run


def _ragged(experts, x_GSD, r, c, act):
  """Sorted rows + ``jax.lax.ragged_dot`` (dense on CPU, see module doc)."""
  if isinstance(r, _routing.SoftRouting):
    return _buffered("einsum")(experts, x_GSD, r, c, act)
  act = _dispatch.get_activation(act)
  wi, wo = experts["wi"], experts["wo"]
  e = wi.shape[0]
  g, s, dim = x_GSD.shape
  x = x_GSD.astype(wi.dtype)

  def experts_on(rows, sizes):
    h = jax.lax.ragged_dot(rows, wi, sizes)
    return jax.lax.ragged_dot(act(h), wo, sizes)

  if isinstance(r, _routing.ExpertChoice):
    # Buffers are full: expert-major rows [E * G * C], C * G rows each.
    rows = jax.vmap(lambda xg, t: xg[t])(x, r.token_index)  # [G, E, C, D]
    rows = jnp.swapaxes(rows, 0, 1).reshape(-1, dim)
    sizes = jnp.full((e,), g * c, jnp.int32)
    out = experts_on(rows, sizes).reshape(e, g, c, dim)
    o_GECD = jnp.swapaxes(out, 0, 1)
    return _dispatch.combine_sort(o_GECD, r, c, e, s)
  k = r.expert_index.shape[-1]
  n = g * s * k
  e_flat = jnp.where(r.kept, r.expert_index, e).reshape(n)
  order = jnp.argsort(e_flat, stable=True)  # kept rows by expert, drops last
  sizes = jnp.bincount(e_flat, length=e + 1)[:e].astype(jnp.int32)
  rows = x.reshape(g * s, dim)[order // k]
  out = experts_on(rows, sizes)  # rows past sum(sizes) come out as 0
  back = jnp.zeros((n, dim), out.dtype).at[order].set(out)
  back = back.reshape(g, s, k, dim).astype(_acc())
  return jnp.einsum("gskd,gsk->gsd", back, r.weight)


_LOCAL_BACKENDS = {
    "einsum": _buffered("einsum"),
    "sort": _buffered("sort"),
    "ragged": _ragged,
}


# ----------------------------------------------------------------------------
# The layer.


def apply(
    params: Mapping[str, Any],
    x: jax.typing.ArrayLike,
    *,
    num_selected: int,
    capacity_factor: float | None,
    router: str = "top_k",
    backend: str = "einsum",
    key: jax.Array | None = None,
    **options: Any,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  r"""Mixture-of-experts layer: ``y = Σ_k w_k · expert_{e_k}(x)`` per token.

  Tokens (all leading axes of ``x`` flattened) are split into
  ``num_groups`` equal groups, routed per group with
  ``capacity(S, E, k, capacity_factor)`` slots per expert (see
  :func:`mtx.moe.capacity`), sent to their experts by ``backend`` and
  combined. Dropped assignments contribute 0: add the residual yourself.

  Args:
    params: ``{"router": {"kernel": [D, E]}, "experts": {"wi": [E, D, F],
      "wo": [E, F, D]}}``; optional ``router/bias`` ``[E]``, per-task router
      ``router/kernel`` ``[T, D, E]`` or ``router/task_embedding``
      ``[T, D]``, shared experts ``shared/{wi, wo}``. Soft MoE takes a
      ``[D, E * slots]`` router kernel.
    x: tokens ``[..., D]``.
    num_selected: experts per token ``k`` in ``[1, E]`` (expert choice: the
      capacity uses it as the average experts per token; soft: unused).
    capacity_factor: > 0, or ``None`` for no drops (buffers of ``S``
      slots; cheap only with ``backend="ragged"`` on accelerators).
    router: one of :data:`ROUTERS`.
    backend: one of :data:`BACKENDS`.
    key: PRNG key for noisy gating, GShard's random second expert and
      random routing (folded with the group index, so results do not
      depend on sharding).
    **options: ``activation`` ("gelu"; "relu", "gelu_exact", "silu" or a
      callable), ``num_groups`` (1), ``capacity`` (an explicit ``C``,
      overrides the factor), ``normalize`` (top-k gate renormalisation,
      default ``k > 1``), ``batch_priority`` (False), ``second_expert_policy``
      ("all" or "random"), ``noise_std`` (0.0), ``task_ids`` (int, broadcast
      to ``x.shape[:-1]``), ``token_ids`` (for ``router="hash"``; default
      the flat token position); for ``"expert_parallel"`` also ``mesh``,
      ``data_axis``, ``expert_axis``, ``dispatch``.

  Returns:
    ``(y, aux)``: ``y`` like ``x``; ``aux`` the router metrics
    (``load_balance_loss``, ``router_z_loss``, ``router_entropy``,
    ``expert_load`` [E], ``expert_fill`` [E], ``drop_fraction``; see
    :mod:`mtx.moe.routing`) plus ``capacity`` (the int ``C``).

  Raises:
    ValueError: unknown router, backend or option, bad shapes,
      ``num_selected`` outside ``[1, E]``, a token count not divisible by
      ``num_groups``, or randomness requested without ``key``.

  >>> import jax, numpy as np
  >>> from mtx import moe
  >>> p = moe.init(jax.random.key(0), d_model=8, hidden=16, num_experts=4)
  >>> x = np.cos(np.arange(96.0)).reshape(2, 6, 8)
  >>> y, aux = moe.apply(p, x, num_selected=2, capacity_factor=1.25)
  >>> y.shape, aux["capacity"], aux["expert_load"].shape
  ((2, 6, 8), 8, (4,))
  >>> y2, _ = moe.apply(p, x, num_selected=2, capacity_factor=1.25,
  ...                   backend="sort")
  >>> float(np.abs(y - y2).max()) < 1e-5
  True
  """
  if backend not in BACKENDS:
    raise ValueError(f"unknown backend {backend!r}; known: {list(BACKENDS)}")
  if router not in ROUTERS:
    raise ValueError(f"unknown router {router!r}; known: {list(ROUTERS)}")
  if backend == "expert_parallel":
    if options.get("mesh") is None:
      raise ValueError("backend='expert_parallel' needs mesh=")
    return _sharded.apply(
        params,
        x,
        num_selected=num_selected,
        capacity_factor=capacity_factor,
        router=router,
        key=key,
        **options,
    )
  opts = _dispatch.check_options(options)
  x = jnp.asarray(x)
  e, d, _ = _dispatch.check_params(params, x)
  token_shape = x.shape[:-1]
  n = math.prod(token_shape)
  g = opts["num_groups"]
  if not isinstance(g, int) or g < 1 or n % g:
    raise ValueError(
        f"num_groups must be a positive int dividing the {n} tokens, got {g!r}"
    )
  s = n // g
  plan = _dispatch.make_plan(
      params,
      router=router,
      s=s,
      num_experts=e,
      num_selected=num_selected,
      capacity_factor=capacity_factor,
      opts=opts,
  )
  task_ids = _dispatch.check_ids(opts["task_ids"], "task_ids", token_shape)
  token_ids = _dispatch.check_ids(opts["token_ids"], "token_ids", token_shape)
  _dispatch.check_inputs(router, opts, key, token_ids, task_ids, params)
  y, metrics = _apply_groups(
      params, x, key, task_ids, token_ids, plan, backend, g
  )
  aux = dict(metrics)
  aux["capacity"] = plan.capacity
  return y, aux


@functools.partial(jax.jit, static_argnums=(5, 6, 7))
def _apply_groups(params, x, key, task_ids, token_ids, plan, backend, g):
  """The traced part of :func:`apply` (one compiled program per plan)."""
  token_shape = x.shape[:-1]
  x_GSD = x.reshape(g, -1, x.shape[-1])
  task_ids = _dispatch.ids_GS(task_ids, token_shape, g)
  token_ids = _dispatch.ids_GS(token_ids, token_shape, g, plan)
  r = _dispatch.route(
      params["router"],
      x_GSD,
      plan,
      keys_G=_dispatch.group_keys(key, 0, x_GSD.shape[0]),
      task_ids_GS=task_ids,
      token_ids_GS=token_ids,
  )
  act = _dispatch.get_activation(plan.activation)
  y = _LOCAL_BACKENDS[backend](params["experts"], x_GSD, r, plan.capacity, act)
  if "shared" in params:
    y = y + _dispatch.shared_mlp(params["shared"], x_GSD, act).astype(_acc())
  return y.astype(x.dtype).reshape(x.shape), r.metrics
