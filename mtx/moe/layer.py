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
import itertools
import math
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mtx import tree as mtree
from mtx.moe import routing as _routing

_acc = mtree.accum_dtype  # float32, or float64 under jax_enable_x64

__all__ = ["ACTIVATIONS", "BACKENDS", "ROUTERS", "apply", "expert_mlp", "init"]

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu": jax.nn.relu,
    "gelu": jax.nn.gelu,  # tanh approximation, as jax.nn.gelu
    "gelu_exact": functools.partial(jax.nn.gelu, approximate=False),
    "silu": jax.nn.silu,
}

# The routing rule; "top_k" covers Switch (k=1), GShard (k=2, with
# second_expert_policy), noisy gating, BPR and task-conditioned routing
# (task_ids with a per-task router or a task embedding).
ROUTERS = ("top_k", "expert_choice", "soft", "hash", "random")

# How tokens reach the experts (see the module docstring); the first three
# run on one device, "expert_parallel" is mtx.moe.sharded.apply.
BACKENDS = ("einsum", "sort", "ragged", "expert_parallel")

_OPTIONS = {
    "activation": "gelu",
    "num_groups": 1,
    "capacity": None,
    "normalize": None,
    "batch_priority": False,
    "second_expert_policy": "all",
    "noise_std": 0.0,
    "task_ids": None,
    "token_ids": None,
}


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
  draw = dict(zip(shapes, _normals(key, tuple(shapes.values()))))
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


def _normals(key: jax.Array, shapes: tuple[tuple[int, ...], ...]):
  """Standard normals of several shapes from one draw (one RNG kernel)."""
  sizes = [math.prod(shape) for shape in shapes]
  z = jax.random.normal(key, (sum(sizes),), jnp.float32)
  offsets = [0, *itertools.accumulate(sizes)]
  return [
      z[o : o + n].reshape(shape) for shape, o, n in zip(shapes, offsets, sizes)
  ]


_normals_jit = jax.jit(_normals, static_argnums=1)


def _activation(name: Any) -> Callable[[jax.Array], jax.Array]:
  if callable(name):
    return name
  if name not in ACTIVATIONS:
    raise ValueError(
        f"unknown activation {name!r}; known: {sorted(ACTIVATIONS)}"
    )
  return ACTIVATIONS[name]


def expert_mlp(
    experts: Mapping[str, jax.Array],
    x_ECD: jax.Array,
    activation: Any = "gelu",
) -> jax.Array:
  """Runs expert ``e`` on ``x_ECD[..., e, :, :]``: ``act(x wi[e]) wo[e]``.

  Args:
    experts: ``{"wi": [E, D, F], "wo": [E, F, D]}``.
    x_ECD: ``[..., E, C, D]`` inputs (any leading axes).
    activation: name in :data:`ACTIVATIONS` or a callable.

  Returns:
    ``[..., E, C, D]`` in the experts' dtype.

  >>> import numpy as np
  >>> ex = {"wi": np.ones((2, 1, 1)), "wo": 2 * np.ones((2, 1, 1))}
  >>> expert_mlp(ex, np.array([[[1.0]], [[-1.0]]]), "relu").tolist()
  [[[2.0]], [[0.0]]]
  """
  act = _activation(activation)
  wi, wo = experts["wi"], experts["wo"]
  h = jnp.einsum("...ecd,edf->...ecf", x_ECD.astype(wi.dtype), wi)
  return jnp.einsum("...ecf,efd->...ecd", act(h), wo)


def _shared(shared: Mapping[str, jax.Array], x: jax.Array, act) -> jax.Array:
  wi, wo = jnp.asarray(shared["wi"]), jnp.asarray(shared["wo"])
  if wi.ndim == 2:
    wi, wo = wi[None], wo[None]
  h = act(jnp.einsum("...d,ndf->...nf", x.astype(wi.dtype), wi))
  return jnp.einsum("...nf,nfd->...d", h, wo)


def _check_params(params: Mapping[str, Any], x: jax.Array) -> tuple[int, ...]:
  """Validates the layout; returns ``(E, D, F)``."""
  for top, keys in (("router", ("kernel",)), ("experts", ("wi", "wo"))):
    if not isinstance(params, Mapping) or top not in params:
      raise ValueError(f"params is missing {top!r}")
    for k in keys:
      if k not in params[top]:
        raise ValueError(f"params is missing '{top}/{k}'")
  wi, wo = params["experts"]["wi"], params["experts"]["wo"]
  if jnp.ndim(wi) != 3:
    raise ValueError(f"'experts/wi' must be [E, D, F], got {jnp.shape(wi)}")
  e, d, f = jnp.shape(wi)
  if jnp.shape(wo) != (e, f, d):
    raise ValueError(
        f"'experts/wo' must be [E, F, D] = {[e, f, d]}, got "
        f"{list(jnp.shape(wo))}"
    )
  if jnp.ndim(x) < 1 or jnp.shape(x)[-1] != d:
    raise ValueError(
        f"x must have shape [..., {d}] (D of 'experts/wi'), got {jnp.shape(x)}"
    )
  kernel = params["router"]["kernel"]
  if jnp.ndim(kernel) not in (2, 3) or jnp.shape(kernel)[-2] != d:
    raise ValueError(
        f"'router/kernel' must be [D={d}, E] or [T, D={d}, E], got "
        f"{list(jnp.shape(kernel))}"
    )
  if "shared" in params:
    swi, swo = jnp.shape(params["shared"]["wi"]), jnp.shape(
        params["shared"]["wo"]
    )
    ok = (len(swi) == 2 and swi[0] == d and swo == (swi[1], d)) or (
        len(swi) == 3 and swi[1] == d and swo == (swi[0], swi[2], d)
    )
    if not ok:
      raise ValueError(
          f"'shared/wi' {list(swi)} and 'shared/wo' {list(swo)} must be "
          f"[D, F'] and [F', D] (or with a leading N) for D={d}"
      )
  return e, d, f


def _check_options(options: Mapping[str, Any], extra=()) -> dict[str, Any]:
  unknown = sorted(set(options) - set(_OPTIONS) - set(extra))
  if unknown:
    raise ValueError(
        f"unknown option(s) {unknown}; known: {sorted(_OPTIONS) + list(extra)}"
    )
  out = dict(_OPTIONS)
  out.update(options)
  _activation(out["activation"])
  return out


def _check_ids(
    ids: Any, name: str, token_shape: tuple[int, ...]
) -> jax.Array | None:
  """Validates per-token ids (integers broadcasting to the token shape)."""
  if ids is None:
    return None
  ids = jnp.asarray(ids)
  if not jnp.issubdtype(ids.dtype, jnp.integer):
    raise ValueError(f"{name} must be integers, got {ids.dtype}")
  try:
    if np.broadcast_shapes(ids.shape, token_shape) != token_shape:
      raise ValueError
  except ValueError:
    raise ValueError(
        f"{name} of shape {ids.shape} does not broadcast to the token shape "
        f"{token_shape}"
    ) from None
  return ids


def _ids_GS(ids, token_shape, g, plan=None):
  """Per-token ids as ``[G, S]`` (traced); hash routing defaults to positions."""
  if ids is None:
    if plan is None or plan.router != "hash":
      return None
    return jnp.arange(math.prod(token_shape), dtype=jnp.int32).reshape(g, -1)
  return jnp.broadcast_to(ids, token_shape).reshape(g, -1)


class _Plan(NamedTuple):
  """Static (hashable) description of one routing + dispatch."""

  router: str
  num_experts: int
  num_selected: int
  capacity: int  # buffer slots C per expert and group (soft: slots)
  dropless: bool  # token choice without a capacity limit
  activation: Any
  normalize: bool | None
  batch_priority: bool
  second_expert_policy: str
  noise_std: float


def _plan(
    params: Mapping[str, Any],
    *,
    router: str,
    s: int,
    num_experts: int,
    num_selected: int,
    capacity_factor: float | None,
    opts: Mapping[str, Any],
) -> _Plan:
  """Validates the routing settings for groups of ``s`` tokens."""
  e = num_experts
  kernel = params["router"]["kernel"]
  width = jnp.shape(kernel)[-1]
  dropless = False
  if router == "soft":
    if width % e:
      raise ValueError(
          f"soft routing needs a router kernel with E * slots columns; got "
          f"{width} for E={e}"
      )
    c = width // e
  else:
    if width != e:
      raise ValueError(
          f"'router/kernel' has {width} outputs but there are {e} experts"
      )
    num_selected = _routing._check_k(num_selected, e)
    c = opts["capacity"]
    if c is None:
      c = _routing.capacity(s, e, num_selected, capacity_factor)
      dropless = capacity_factor is None
    else:
      _routing._check_capacity(c)
    if router == "expert_choice":
      c = min(c, s)
      dropless = False
  return _Plan(
      router=router,
      num_experts=e,
      num_selected=num_selected,
      capacity=c,
      dropless=dropless,
      activation=opts["activation"],
      normalize=opts["normalize"],
      batch_priority=bool(opts["batch_priority"]),
      second_expert_policy=opts["second_expert_policy"],
      noise_std=float(opts["noise_std"]),
  )


def _route(
    router_params: Mapping[str, Any],
    x_GSD: jax.Array,
    plan: _Plan,
    *,
    keys_G: jax.Array | None,
    task_ids_GS: jax.Array | None,
    token_ids_GS: jax.Array | None,
) -> _routing.Routing:
  """Routes one set of groups as ``plan`` says."""
  logits = _routing.router_logits(router_params, x_GSD, task_ids_GS=task_ids_GS)
  c = None if plan.dropless else plan.capacity
  k = plan.num_selected
  if plan.router == "soft":
    return _routing.soft_routing(logits, num_experts=plan.num_experts)
  if plan.router == "expert_choice":
    return _routing.expert_choice_routing(logits, capacity=plan.capacity)
  if plan.router == "top_k":
    return _routing.top_k_routing(
        logits,
        num_selected=k,
        capacity=c,
        normalize=plan.normalize,
        batch_priority=plan.batch_priority,
        second_expert_policy=plan.second_expert_policy,
        noise_std=plan.noise_std,
        key=keys_G,
    )
  if plan.router == "hash":
    return _routing.hash_routing(
        logits, token_ids_GS, num_selected=k, capacity=c
    )
  return _routing.random_routing(logits, keys_G, num_selected=k, capacity=c)


def _check_inputs(router, opts, key, token_ids, task_ids, params):
  """Errors that do not need tracing: missing keys and ids."""
  if router == "random" and key is None:
    raise ValueError("router='random' needs an explicit key")
  if router == "top_k" and key is None:
    if opts["noise_std"]:
      raise ValueError("noise_std > 0 (noisy gating) needs an explicit key")
    if opts["second_expert_policy"] == "random":
      raise ValueError("second_expert_policy='random' needs an explicit key")
  r = params["router"]
  if task_ids is None and (jnp.ndim(r["kernel"]) == 3 or "task_embedding" in r):
    raise ValueError(
        "task-conditioned router (kernel [T, D, E] or task_embedding) needs "
        "task_ids"
    )


# ----------------------------------------------------------------------------
# Dispatch / combine: tokens [G, S, D] <-> expert buffers [G, E, C, D].


def dispatch_einsum(
    x_GSD: jax.Array, r: _routing.Routing, c: int, e: int
) -> jax.Array:
  """Tokens into expert buffers with a one-hot ``[G, S, E, C]`` einsum."""
  d = _dense_dispatch(r, c, e, x_GSD.shape[1], weighted=False)
  return jnp.einsum("gsec,gsd->gecd", d.astype(x_GSD.dtype), x_GSD)


def combine_einsum(
    o_GECD: jax.Array, r: _routing.Routing, c: int, e: int, s: int
) -> jax.Array:
  """Expert buffers back to tokens (float32) with the combine tensor."""
  w = _dense_dispatch(r, c, e, s, weighted=True)
  return jnp.einsum("gsec,gecd->gsd", w, o_GECD.astype(_acc()))


def _dense_dispatch(r, c, e, s, *, weighted):
  if isinstance(r, _routing.SoftRouting):
    return r.combine if weighted else r.dispatch
  if isinstance(r, _routing.ExpertChoice):
    oh = jax.nn.one_hot(r.token_index, s, dtype=_acc())  # [G, E, C, S]
    if weighted:
      oh = oh * r.weight[..., None]
    return jnp.transpose(oh, (0, 3, 1, 2))
  oh_e = jax.nn.one_hot(r.expert_index, e, dtype=_acc())
  pos = jnp.where(r.kept, r.position, c)  # out of range -> all-zero row
  oh_c = jax.nn.one_hot(pos, c, dtype=_acc())
  if weighted:
    return jnp.einsum("gske,gskc,gsk->gsec", oh_e, oh_c, r.weight)
  return jnp.einsum("gske,gskc->gsec", oh_e, oh_c)


def _slots(r: _routing.TokenChoice, c: int, e: int) -> jax.Array:
  """Flat buffer slot ``e * C + position`` per assignment; ``E * C`` if dropped."""
  return jnp.where(r.kept, r.expert_index * c + r.position, e * c)


def dispatch_sort(
    x_GSD: jax.Array, r: _routing.Routing, c: int, e: int
) -> jax.Array:
  """Tokens into expert buffers by index (gather); ``O(S K D)`` data moved."""
  if isinstance(r, _routing.SoftRouting):
    return dispatch_einsum(x_GSD, r, c, e)
  g, s, dim = x_GSD.shape
  if isinstance(r, _routing.ExpertChoice):
    return jax.vmap(lambda xg, t: xg[t])(x_GSD, r.token_index)
  k = r.expert_index.shape[-1]
  slot = _slots(r, c, e).reshape(g, s * k)
  token = jnp.broadcast_to(
      jnp.arange(s, dtype=jnp.int32)[:, None], (s, k)
  ).reshape(s * k)
  # src[g, slot] = token in that slot; empty slots point at a zero row.
  src = jax.vmap(
      lambda sl: jnp.full((e * c,), s, jnp.int32).at[sl].set(token, mode="drop")
  )(slot)
  x_pad = jnp.pad(x_GSD, ((0, 0), (0, 1), (0, 0)))  # keeps G's sharding
  return jax.vmap(lambda xg, i: xg[i])(x_pad, src).reshape(g, e, c, dim)


def combine_sort(
    o_GECD: jax.Array, r: _routing.Routing, c: int, e: int, s: int
) -> jax.Array:
  """Expert outputs back to tokens (float32) by index."""
  if isinstance(r, _routing.SoftRouting):
    return combine_einsum(o_GECD, r, c, e, s)
  g, _, _, dim = o_GECD.shape
  o = o_GECD.astype(_acc())
  if isinstance(r, _routing.ExpertChoice):
    contrib = o * r.weight[..., None]
    return jax.vmap(
        lambda cg, t: jnp.zeros((s, dim), _acc())
        .at[t.reshape(-1)]
        .add(cg.reshape(-1, dim))
    )(contrib, r.token_index)
  k = r.expert_index.shape[-1]
  slot = _slots(r, c, e).reshape(g, s * k)
  o_pad = jnp.pad(o.reshape(g, e * c, dim), ((0, 0), (0, 1), (0, 0)))
  back = jax.vmap(lambda og, i: og[i])(o_pad, slot).reshape(g, s, k, dim)
  return jnp.einsum("gskd,gsk->gsd", back, r.weight)


_DISPATCH = {
    "einsum": (dispatch_einsum, combine_einsum),
    "sort": (dispatch_sort, combine_sort),
}


def _buffered(method):
  dispatch, combine = _DISPATCH[method]

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
  act = _activation(act)
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
    return combine_sort(o_GECD, r, c, e, s)
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


def _group_keys(key, g0, g):
  if key is None:
    return None
  return jax.vmap(lambda i: jax.random.fold_in(key, i))(
      g0 + jnp.arange(g, dtype=jnp.int32)
  )


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
    from mtx.moe import sharded  # pylint: disable=g-import-not-at-top

    return sharded.apply(
        params,
        x,
        num_selected=num_selected,
        capacity_factor=capacity_factor,
        router=router,
        key=key,
        **options,
    )
  opts = _check_options(options)
  x = jnp.asarray(x)
  e, d, _ = _check_params(params, x)
  token_shape = x.shape[:-1]
  n = math.prod(token_shape)
  g = opts["num_groups"]
  if not isinstance(g, int) or g < 1 or n % g:
    raise ValueError(
        f"num_groups must be a positive int dividing the {n} tokens, got {g!r}"
    )
  s = n // g
  plan = _plan(
      params,
      router=router,
      s=s,
      num_experts=e,
      num_selected=num_selected,
      capacity_factor=capacity_factor,
      opts=opts,
  )
  task_ids = _check_ids(opts["task_ids"], "task_ids", token_shape)
  token_ids = _check_ids(opts["token_ids"], "token_ids", token_shape)
  _check_inputs(router, opts, key, token_ids, task_ids, params)
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
  task_ids = _ids_GS(task_ids, token_shape, g)
  token_ids = _ids_GS(token_ids, token_shape, g, plan)
  r = _route(
      params["router"],
      x_GSD,
      plan,
      keys_G=_group_keys(key, 0, x_GSD.shape[0]),
      task_ids_GS=task_ids,
      token_ids_GS=token_ids,
  )
  act = _activation(plan.activation)
  y = _LOCAL_BACKENDS[backend](params["experts"], x_GSD, r, plan.capacity, act)
  if "shared" in params:
    y = y + _shared(params["shared"], x_GSD, act).astype(_acc())
  return y.astype(x.dtype).reshape(x.shape), r.metrics
