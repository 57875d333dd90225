r"""What the single-device and expert-parallel MoE layers share.

:func:`mtx.moe.layer.apply` and :func:`mtx.moe.sharded.apply` validate the
same params and options, build the same static :class:`Plan`, route with
:func:`route`, move tokens into expert buffers ``[G, E, C, D]`` and back
with one of the :data:`DISPATCH` pairs and run :func:`expert_mlp` on them.
All of that lives here, so neither layer reaches into the other: ``layer``
imports ``sharded`` (for ``backend="expert_parallel"``) and this module;
``sharded`` imports only this module. Axis letters as in :mod:`mtx.moe`.
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
from mtx.moe import assignment as _asg
from mtx.moe import routing as _routing

_acc = mtree.accum_dtype  # float32, or float64 under jax_enable_x64

__all__ = [
    "ACTIVATIONS",
    "DISPATCH",
    "OPTIONS",
    "ROUTERS",
    "Plan",
    "check_ids",
    "check_inputs",
    "check_options",
    "check_params",
    "combine_einsum",
    "combine_sort",
    "dispatch_einsum",
    "dispatch_sort",
    "expert_mlp",
    "get_activation",
    "group_keys",
    "ids_GS",
    "make_plan",
    "normals",
    "route",
    "shared_mlp",
]

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
OPTIONS = {
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
# Parameters and experts.


def normals(key: jax.Array, shapes: tuple[tuple[int, ...], ...]):
  """Standard normals of several shapes from one draw (one RNG kernel)."""
  sizes = [math.prod(shape) for shape in shapes]
  z = jax.random.normal(key, (sum(sizes),), jnp.float32)
  offsets = [0, *itertools.accumulate(sizes)]
  return [
      z[o : o + n].reshape(shape) for shape, o, n in zip(shapes, offsets, sizes)
  ]


def get_activation(name: Any) -> Callable[[jax.Array], jax.Array]:
  """``ACTIVATIONS[name]``, or ``name`` itself when it is a callable."""
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
  act = get_activation(activation)
  wi, wo = experts["wi"], experts["wo"]
  h = jnp.einsum("...ecd,edf->...ecf", x_ECD.astype(wi.dtype), wi)
  return jnp.einsum("...ecf,efd->...ecd", act(h), wo)


def shared_mlp(shared: Mapping[str, jax.Array], x: jax.Array, act) -> jax.Array:
  """Shared (always-on) experts on every token: ``Σ_n act(x wi[n]) wo[n]``."""
  wi, wo = jnp.asarray(shared["wi"]), jnp.asarray(shared["wo"])
  if wi.ndim == 2:
    wi, wo = wi[None], wo[None]
  h = act(jnp.einsum("...d,ndf->...nf", x.astype(wi.dtype), wi))
  return jnp.einsum("...nf,nfd->...d", h, wo)


def check_params(params: Mapping[str, Any], x: jax.Array) -> tuple[int, ...]:
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


def check_options(options: Mapping[str, Any], extra=()) -> dict[str, Any]:
  """:data:`OPTIONS` updated with ``options``; unknown names raise."""
  unknown = sorted(set(options) - set(OPTIONS) - set(extra))
  if unknown:
    raise ValueError(
        f"unknown option(s) {unknown}; known: {sorted(OPTIONS) + list(extra)}"
    )
  out = dict(OPTIONS)
  out.update(options)
  get_activation(out["activation"])
  return out


def check_ids(
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


def ids_GS(ids, token_shape, g, plan=None):
  """Per-token ids as ``[G, S]`` (traced); hash routing defaults to positions."""
  if ids is None:
    if plan is None or plan.router != "hash":
      return None
    return jnp.arange(math.prod(token_shape), dtype=jnp.int32).reshape(g, -1)
  return jnp.broadcast_to(ids, token_shape).reshape(g, -1)


class Plan(NamedTuple):
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


def make_plan(
    params: Mapping[str, Any],
    *,
    router: str,
    s: int,
    num_experts: int,
    num_selected: int,
    capacity_factor: float | None,
    opts: Mapping[str, Any],
) -> Plan:
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
    num_selected = _asg.check_k(num_selected, e)
    c = opts["capacity"]
    if c is None:
      c = _routing.capacity(s, e, num_selected, capacity_factor)
      dropless = capacity_factor is None
    else:
      _asg.check_capacity(c)
    if router == "expert_choice":
      c = min(c, s)
      dropless = False
  return Plan(
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


def route(
    router_params: Mapping[str, Any],
    x_GSD: jax.Array,
    plan: Plan,
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


def check_inputs(router, opts, key, token_ids, task_ids, params):
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


DISPATCH = {
    "einsum": (dispatch_einsum, combine_einsum),
    "sort": (dispatch_sort, combine_sort),
}


def group_keys(key, g0, g):
  """Keys of groups ``g0 .. g0 + g - 1`` (``key`` folded with the index)."""
  if key is None:
    return None
  return jax.vmap(lambda i: jax.random.fold_in(key, i))(
      g0 + jnp.arange(g, dtype=jnp.int32)
  )
