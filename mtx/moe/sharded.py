r"""Expert parallelism: experts sharded on a mesh axis, tokens via all-to-all.

On a mesh with a ``data`` axis and an ``expert`` axis (``n_d x n_e``
devices):

* token groups ``[G, S, D]`` are sharded over both axes (``G`` a multiple
  of ``n_d * n_e``; every device routes its own groups, as in V-MoE);
* expert params (leading ``E`` axis) are sharded over ``expert`` and
  replicated over ``data``; the router and shared experts are replicated.

Inside ``jax.shard_map`` every device routes its groups, packs them into
fixed-capacity buffers ``[G_l, E, C, D]``, and one ``all_to_all`` over
``expert`` sends each expert's slots to the device holding it
(``[n_e G_l, E / n_e, C, D]``); the local experts run; a second
``all_to_all`` brings the outputs back, which are combined locally. The
forward pass has exactly these two all-to-alls (metrics are averaged with
all-reduces). ``ragged_all_to_all`` is not used: it has no CPU
implementation.

Routing is per group and random draws are keyed by the global group index,
so :func:`apply` equals :func:`mtx.moe.apply` with the same ``num_groups``.

Example (on one device the mesh is 1 x 1):

>>> import jax, numpy as np, mtx
>>> mesh = mtx.sharding.make_mesh((1, 1), ("data", "expert"))
>>> p = mtx.moe.init(jax.random.key(0), d_model=8, hidden=16, num_experts=4)
>>> x = np.cos(np.arange(96.0)).reshape(2, 6, 8)
>>> y, aux = mtx.moe.sharded.apply(p, x, mesh=mesh, num_selected=2,
...                                capacity_factor=1.25)
>>> want, _ = mtx.moe.apply(p, x, num_selected=2, capacity_factor=1.25)
>>> float(np.abs(y - want).max()) < 1e-6
True
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from mtx import sharding
from mtx import tree as mtree
from mtx.moe import dispatch as _dispatch

_acc = mtree.accum_dtype  # float32, or float64 under jax_enable_x64

P = jax.sharding.PartitionSpec

__all__ = ["apply", "param_specs", "shard_params"]


def param_specs(
    params: Mapping[str, Any], *, expert_axis: str = "expert"
) -> Any:
  """``PartitionSpec`` tree: ``experts/*`` on ``expert``, the rest replicated.

  >>> import numpy as np
  >>> param_specs({"router": {"kernel": np.ones((4, 2))},
  ...              "experts": {"wi": np.ones((2, 4, 8))}})
  {'experts': {'wi': P('expert',)}, 'router': {'kernel': P()}}
  """
  return mtree.map_with_path(
      lambda path, _: P(expert_axis) if path.startswith("experts/") else P(),
      params,
  )


def shard_params(
    params: Mapping[str, Any],
    mesh: jax.sharding.Mesh,
    *,
    expert_axis: str = "expert",
) -> Any:
  """Places ``params`` on ``mesh`` as :func:`param_specs` says.

  Raises:
    ValueError: ``E`` not divisible by the ``expert`` axis size (names the
      leaf).
  """
  rules = [(r"^experts/", P(expert_axis)), (r".*", P())]
  return sharding.shard(params, mesh, rules)


def _place(x: Any, mesh: jax.sharding.Mesh, spec: Any) -> Any:
  """Gives ``x`` the shardings ``spec`` (a spec or a tree of specs).

  Explicit mesh axes: ``reshard`` (``shard_map`` requires the input
  shardings to match ``in_specs``); auto axes: a sharding constraint.
  """
  explicit = all(t == jax.sharding.AxisType.Explicit for t in mesh.axis_types)

  def put(a, sp):
    s = jax.sharding.NamedSharding(mesh, sp)
    if explicit:
      return jax.sharding.reshard(a, s)
    return jax.lax.with_sharding_constraint(a, s)

  if isinstance(spec, P):
    return jax.tree.map(lambda a: put(a, spec), x)
  return jax.tree.map(put, x, spec, is_leaf=lambda v: isinstance(v, P))


def apply(
    params: Mapping[str, Any],
    x: jax.typing.ArrayLike,
    *,
    mesh: jax.sharding.Mesh,
    num_selected: int,
    capacity_factor: float | None,
    router: str = "top_k",
    key: jax.Array | None = None,
    data_axis: str = "data",
    expert_axis: str = "expert",
    dispatch: str = "sort",
    **options: Any,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Expert-parallel :func:`mtx.moe.apply` on ``mesh``.

  Args:
    params: as :func:`mtx.moe.apply`; best placed with :func:`shard_params`
      (anything else is resharded to that layout first).
    x: tokens ``[..., D]``.
    mesh: a mesh with ``data_axis`` and ``expert_axis`` (explicit or auto
      axis types, e.g. :func:`mtx.sharding.make_mesh`).
    num_selected: experts per token.
    capacity_factor: as :func:`mtx.moe.apply` (``None`` = ``S`` slots).
    router: one of :data:`mtx.moe.ROUTERS`.
    key: PRNG key (per-group draws, as unsharded).
    data_axis: mesh axis of pure data parallelism.
    expert_axis: mesh axis the experts are split over; must divide ``E``.
    dispatch: how buffers are packed locally, ``"sort"`` or ``"einsum"``.
    **options: as :func:`mtx.moe.apply`; ``num_groups`` defaults to the
      number of devices and must be a multiple of it.

  Returns:
    ``(y, aux)`` as :func:`mtx.moe.apply`. ``y`` has ``x``'s shape; when
    flattened to ``[G, S, D]`` it is sharded over ``(data, expert)`` on
    ``G`` (for ``x`` of shape ``[B, ..., D]`` with ``B`` a multiple of
    ``G``, ``y`` is sharded on its first axis). ``aux`` is replicated.

  Raises:
    ValueError: as :func:`mtx.moe.apply`, plus missing mesh axes, ``E``
      not divisible by the expert axis, or groups not divisible by the
      number of devices.
  """
  opts = dict(options)
  opts.pop("backend", None)
  opts = _dispatch.check_options(opts)
  if router not in _dispatch.ROUTERS:
    raise ValueError(
        f"unknown router {router!r}; known: {list(_dispatch.ROUTERS)}"
    )
  if dispatch not in _dispatch.DISPATCH:
    raise ValueError(
        f"unknown dispatch {dispatch!r}; known: {sorted(_dispatch.DISPATCH)}"
    )
  for ax in (data_axis, expert_axis):
    if ax not in mesh.shape:
      raise ValueError(
          f"mesh has no axis {ax!r}; its axes are {tuple(mesh.shape)}"
      )
  x = jnp.asarray(x)
  e, d, _ = _dispatch.check_params(params, x)
  n_e = mesh.shape[expert_axis]
  n_dev = mesh.shape[data_axis] * n_e
  if e % n_e:
    raise ValueError(
        f"{e} experts are not divisible by the {expert_axis!r} axis of "
        f"size {n_e}"
    )
  token_shape = x.shape[:-1]
  n = math.prod(token_shape)
  g = opts["num_groups"] if "num_groups" in options else n_dev
  if not isinstance(g, int) or g < 1 or g % n_dev or n % g:
    raise ValueError(
        f"num_groups must be a multiple of the {n_dev} devices dividing the "
        f"{n} tokens, got {g!r}"
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
  y, metrics = _apply_sharded(
      params,
      x,
      task_ids,
      token_ids,
      key,
      plan,
      mesh,
      (data_axis, expert_axis),
      dispatch,
      g,
  )
  aux = dict(metrics)
  aux["capacity"] = plan.capacity
  return y, aux


@functools.partial(jax.jit, static_argnums=(5, 6, 7, 8, 9))
def _apply_sharded(
    params, x, task_ids, token_ids, key, plan, mesh, tokens, dispatch, g
):
  """The traced part of :func:`apply`: one ``shard_map`` over the mesh."""
  expert_axis = tokens[1]
  e = plan.num_experts
  g_local = g // (mesh.shape[tokens[0]] * mesh.shape[expert_axis])
  dispatch_fn, combine_fn = _dispatch.DISPATCH[dispatch]
  act = _dispatch.get_activation(plan.activation)
  c = plan.capacity

  def body(params, x_GSD, task_ids, token_ids, key):
    g0 = jax.lax.axis_index(tokens) * g_local
    r = _dispatch.route(
        params["router"],
        x_GSD,
        plan,
        keys_G=_dispatch.group_keys(key, g0, g_local),
        task_ids_GS=task_ids,
        token_ids_GS=token_ids,
    )
    x_GECD = dispatch_fn(x_GSD, r, c, e)
    # [G_l, E, C, D] -> [n_e * G_l, E / n_e, C, D]: my experts, all groups.
    x_GECD = jax.lax.all_to_all(
        x_GECD, expert_axis, split_axis=1, concat_axis=0, tiled=True
    )
    o_GECD = _dispatch.expert_mlp(params["experts"], x_GECD, act)
    o_GECD = jax.lax.all_to_all(
        o_GECD, expert_axis, split_axis=0, concat_axis=1, tiled=True
    )
    y = combine_fn(o_GECD, r, c, e, x_GSD.shape[1])
    if "shared" in params:
      y = y + _dispatch.shared_mlp(params["shared"], x_GSD, act).astype(_acc())
    metrics = jax.tree.map(lambda m: jax.lax.pmean(m, tokens), r.metrics)
    return y.astype(x_GSD.dtype), metrics

  task_ids = _dispatch.ids_GS(task_ids, x.shape[:-1], g)
  token_ids = _dispatch.ids_GS(token_ids, x.shape[:-1], g, plan)
  specs = param_specs(params, expert_axis=expert_axis)
  tok = P(tokens)
  none = P()
  in_specs = (
      specs,
      tok,
      tok if task_ids is not None else none,
      tok if token_ids is not None else none,
      none,
  )
  x_GSD = _reshape(x, (g, -1, x.shape[-1]), mesh, tokens)
  args = (params, x_GSD, task_ids, token_ids, key)
  args = tuple(
      a if a is None else _place(a, mesh, sp) for a, sp in zip(args, in_specs)
  )
  fn = jax.shard_map(body, mesh=mesh, in_specs=in_specs, out_specs=(tok, none))
  y, metrics = fn(*args)
  return _reshape(y, x.shape, mesh, tokens), metrics


def _reshape(
    a: jax.Array, shape: tuple[int, ...], mesh, tokens: tuple[str, str]
) -> jax.Array:
  """Reshapes token arrays, sharding the leading axis over ``tokens``.

  On explicit meshes the target sharding must be spelled out: the leading
  axis keeps the token sharding when the devices divide it, else the
  result is replicated.
  """
  explicit = all(t == jax.sharding.AxisType.Explicit for t in mesh.axis_types)
  if not explicit:
    return a.reshape(shape)
  shape = tuple(a.size // -math.prod(shape) if d == -1 else d for d in shape)
  n_dev = math.prod(mesh.shape[t] for t in tokens)
  keep = len(shape) >= 2 and shape[0] % n_dev == 0
  spec = P(tokens) if keep else P()
  return jnp.reshape(
      a, shape, out_sharding=jax.sharding.NamedSharding(mesh, spec)
  )
