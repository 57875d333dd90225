r"""Building MoE layers from dense models, and pruning experts.

* :func:`upcycle`: sparse upcycling (Komatsuzaki et al.): one dense MLP
  ``{"wi": [D, F], "wo": [F, D]}`` copied into ``E`` experts, plus optional
  noise. With no noise all experts are identical, so the MoE computes the
  dense MLP exactly whenever a token's combine weights sum to 1 (e.g. top-2
  with renormalised gates and no drops).
* :func:`from_models`: an MoE whose experts are the MLPs of ``T``
  fine-tuned models (MergeKit's ``mergekit-moe``, "clown-car" MoE), with its
  gate modes for the router: ``"hidden"`` (each router column is the
  normalised mean hidden state of that expert's positive prompts minus its
  negative prompts; the caller supplies the activations as arrays),
  ``"random"`` (standard normal) and ``"uniform"`` (MergeKit's
  ``uniform_random``: the ``torch.nn.Linear`` default,
  ``U(-1/sqrt(D), 1/sqrt(D))``). MergeKit builds one router per layer: map
  over layers yourself.
* :func:`prune`: keep the most used experts given a load vector (e.g.
  ``aux["expert_load"]`` averaged over a data set).

>>> import jax, numpy as np
>>> from mtx import moe
>>> dense = {"wi": np.ones((4, 8)), "wo": np.ones((8, 4)) / 8}
>>> p = moe.upcycle.upcycle(dense, 4, key=jax.random.key(0), router_std=1.0)
>>> x = np.arange(12.0).reshape(3, 4) / 10
>>> y, _ = moe.apply(p, x, num_selected=2, capacity_factor=None,
...                  activation="relu")
>>> bool(np.allclose(y, np.maximum(x @ dense["wi"], 0) @ dense["wo"], atol=1e-6))
True
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from mtx import tree as mtree
from mtx.moe import dispatch as _dispatch

__all__ = ["GATE_MODES", "from_models", "prune", "upcycle"]

GATE_MODES = ("hidden", "random", "uniform")

PyTree = Any


def _check_mlp(mlp: Any, name: str) -> tuple[jax.Array, jax.Array]:
  if not isinstance(mlp, Mapping) or set(mlp) != {"wi", "wo"}:
    keys = sorted(mlp) if isinstance(mlp, Mapping) else type(mlp).__name__
    raise ValueError(
        f"{name} must be {{'wi': [D, F], 'wo': [F, D]}}, got {keys}"
    )
  wi, wo = jnp.asarray(mlp["wi"]), jnp.asarray(mlp["wo"])
  if wi.ndim != 2 or wo.shape != wi.shape[::-1]:
    raise ValueError(
        f"{name}: 'wi' must be [D, F] and 'wo' [F, D], got {wi.shape} and "
        f"{wo.shape}"
    )
  return wi, wo


def upcycle(
    mlp: Mapping[str, jax.typing.ArrayLike],
    num_experts: int,
    *,
    key: jax.Array | None = None,
    noise_std: float = 0.0,
    router_std: float = 0.0,
) -> dict[str, Any]:
  """Copies a dense MLP into ``num_experts`` experts (sparse upcycling).

  Args:
    mlp: ``{"wi": [D, F], "wo": [F, D]}``.
    num_experts: ``E``.
    key: PRNG key; required when ``noise_std`` or ``router_std`` > 0.
    noise_std: std of independent Gaussian noise added to every expert
      weight (absolute, in weight units); 0 keeps the copies identical.
    router_std: router kernel ~ N(0, router_std²); 0 gives a zero router
      (uniform probabilities; ties go to the lowest expert index).

  Returns:
    MoE params for :func:`mtx.moe.apply` in the MLP's dtype (router
    float32).

  Raises:
    ValueError: a malformed MLP, ``num_experts < 1``, negative stds, or
      randomness without ``key``.

  References:
    Komatsuzaki et al., Sparse Upcycling, https://arxiv.org/abs/2212.05055.
  """
  wi, wo = _check_mlp(mlp, "mlp")
  if not isinstance(num_experts, int) or num_experts < 1:
    raise ValueError(f"num_experts must be a positive int, got {num_experts!r}")
  if noise_std < 0 or router_std < 0:
    raise ValueError(
        f"noise_std and router_std must be >= 0, got {noise_std!r}, "
        f"{router_std!r}"
    )
  if (noise_std > 0 or router_std > 0) and key is None:
    raise ValueError("noise_std / router_std > 0 need an explicit key")
  return _upcycle(wi, wo, key, noise_std, router_std, num_experts)


@functools.partial(jax.jit, static_argnums=5)
def _upcycle(wi, wo, key, noise_std, router_std, e):
  # With a key, noise and router are always drawn (scaled by the traced
  # stds, so a zero std gives exact copies / a zero router).
  d = wi.shape[0]
  experts = {
      "wi": jnp.broadcast_to(wi, (e, *wi.shape)),
      "wo": jnp.broadcast_to(wo, (e, *wo.shape)),
  }
  if key is None:
    return {
        "router": {"kernel": jnp.zeros((d, e), mtree.accum_dtype())},
        "experts": experts,
    }
  k_noise, k_router = jax.random.split(key)
  experts = _add_noise(experts, k_noise, noise_std)
  kernel = router_std * _dispatch.normals(k_router, ((d, e),))[0]
  return {"router": {"kernel": kernel}, "experts": experts}


def _add_noise(experts, key, std):
  names = sorted(experts)
  z = _dispatch.normals(key, tuple(tuple(experts[n].shape) for n in names))
  return {
      n: (experts[n].astype(jnp.float32) + std * zn).astype(experts[n].dtype)
      for n, zn in zip(names, z)
  }


def from_models(
    mlps: Sequence[Mapping[str, jax.typing.ArrayLike]],
    *,
    gate_mode: str = "hidden",
    hidden_states: Sequence[jax.typing.ArrayLike] | None = None,
    negative_hidden_states: Sequence[jax.typing.ArrayLike | None] | None = None,
    key: jax.Array | None = None,
    noise_std: float | Sequence[float] = 0.0,
    residual_scale: float | Sequence[float] | None = None,
    shared: Sequence[Mapping[str, jax.typing.ArrayLike]] | None = None,
) -> dict[str, Any]:
  r"""An MoE whose expert ``t`` is the MLP of fine-tuned model ``t``.

  Router columns by ``gate_mode`` (MergeKit ``mergekit-moe``):

  * ``"hidden"``: ``u_t = mean(hidden_states[t]) - mean(negative[t])``
    (means over all leading axes of the caller's prompt activations
    ``[..., D]`` at this layer's input), normalised ``u_t / max(|u_t|,
    1e-8)``. Also MergeKit's ``cheap_embed`` when the arrays are token
    embeddings.
  * ``"random"``: ``N(0, 1)`` entries (needs ``key``).
  * ``"uniform"``: ``U(-1/sqrt(D), 1/sqrt(D))`` entries (needs ``key``).

  Args:
    mlps: ``T`` MLPs ``{"wi": [D, F], "wo": [F, D]}`` of equal shapes.
    gate_mode: one of :data:`GATE_MODES`.
    hidden_states: per expert, activations ``[..., D]`` of its positive
      prompts (``"hidden"`` only).
    negative_hidden_states: per expert, activations of its negative prompts,
      or ``None`` entries.
    key: PRNG key for random gates and noise.
    noise_std: per-expert (or one) std of Gaussian noise on its weights
      (MergeKit ``noise_scale``).
    residual_scale: per-expert (or one) factor on ``wo`` (MergeKit
      ``residual_scale``, applied to the down projection).
    shared: optional always-on shared expert MLPs (same ``D``), stacked
      into ``params["shared"]``.

  Returns:
    MoE params for :func:`mtx.moe.apply` with ``E = T``.

  Raises:
    ValueError: unknown gate mode, MLPs of different shapes (names the
      index), missing or mis-shaped hidden states, or randomness without
      ``key``.

  >>> import numpy as np
  >>> mlps = [{"wi": np.full((2, 3), float(t)), "wo": np.ones((3, 2))}
  ...         for t in range(2)]
  >>> h = [np.array([[1.0, 0.0], [3.0, 0.0]]), np.array([[0.0, -2.0]])]
  >>> p = from_models(mlps, gate_mode="hidden", hidden_states=h)
  >>> p["router"]["kernel"].tolist(), p["experts"]["wi"].shape
  ([[1.0, 0.0], [0.0, -1.0]], (2, 2, 3))
  """
  if gate_mode not in GATE_MODES:
    raise ValueError(
        f"unknown gate_mode {gate_mode!r}; known: {list(GATE_MODES)}"
    )
  if not mlps:
    raise ValueError("from_models needs at least one expert MLP")
  pairs = [_check_mlp(m, f"mlps[{t}]") for t, m in enumerate(mlps)]
  shape = (pairs[0][0].shape, pairs[0][1].shape)
  for t, (wi, wo) in enumerate(pairs):
    if (wi.shape, wo.shape) != shape:
      raise ValueError(
          f"mlps[{t}] has shapes {wi.shape}, {wo.shape}; mlps[0] has "
          f"{shape[0]}, {shape[1]}"
      )
  e = len(pairs)
  d = shape[0][0]
  noise = _per_expert(noise_std, e, "noise_std")
  res = _per_expert(residual_scale, e, "residual_scale")
  if (gate_mode != "hidden" or any(n > 0 for n in noise)) and key is None:
    raise ValueError(f"gate_mode={gate_mode!r} / noise need an explicit key")
  pos = neg = None
  if gate_mode == "hidden":
    pos, neg = _check_hidden(hidden_states, negative_hidden_states, e, d)
  params = _from_models(
      [wi for wi, _ in pairs],
      [wo for _, wo in pairs],
      key,
      pos,
      neg,
      gate_mode,
      tuple(float(n) for n in noise),
      tuple(None if r is None else float(r) for r in res),
  )
  if shared:
    sp = [_check_mlp(m, f"shared[{i}]") for i, m in enumerate(shared)]
    for i, (wi, _) in enumerate(sp):
      if wi.shape[0] != d:
        raise ValueError(f"shared[{i}] has D={wi.shape[0]}, experts have {d}")
    params["shared"] = {
        "wi": jnp.stack([p[0] for p in sp]),
        "wo": jnp.stack([p[1] for p in sp]),
    }
  return params


@functools.partial(jax.jit, static_argnums=(5, 6, 7))
def _from_models(wis, wos, key, pos, neg, gate_mode, noise, res):
  e = len(wis)
  d = wis[0].shape[0]
  k_gate, k_noise = jax.random.split(key) if key is not None else (None, None)
  out_wi, out_wo = [], []
  for t, (wi, wo) in enumerate(zip(wis, wos)):
    if noise[t] > 0:
      ex = _add_noise(
          {"wi": wi, "wo": wo}, jax.random.fold_in(k_noise, t), noise[t]
      )
      wi, wo = ex["wi"], ex["wo"]
    if res[t] is not None:
      wo = (wo.astype(jnp.float32) * res[t]).astype(wo.dtype)
    out_wi.append(wi)
    out_wo.append(wo)
  acc = mtree.accum_dtype()
  if gate_mode == "hidden":
    cols = []
    for t in range(e):
      u = pos[t].astype(acc).reshape(-1, d).mean(0)
      if neg[t] is not None:
        u = u - neg[t].astype(acc).reshape(-1, d).mean(0)
      cols.append(u / jnp.maximum(jnp.linalg.norm(u), 1e-8))
    kernel = jnp.stack(cols, axis=1)
  elif gate_mode == "random":
    kernel = _dispatch.normals(k_gate, ((d, e),))[0].astype(acc)
  else:
    bound = 1.0 / math.sqrt(d)
    kernel = jax.random.uniform(
        k_gate, (d, e), acc, minval=-bound, maxval=bound
    )
  return {
      "router": {"kernel": kernel},
      "experts": {"wi": jnp.stack(out_wi), "wo": jnp.stack(out_wo)},
  }


def _per_expert(v: Any, e: int, name: str) -> list[Any]:
  if v is None or isinstance(v, (int, float)):
    vals = [v] * e
  else:
    vals = list(v)
    if len(vals) != e:
      raise ValueError(f"{name} has {len(vals)} entries for {e} experts")
  for x in vals:
    if x is not None and x < 0:
      raise ValueError(f"{name} must be >= 0, got {x!r}")
  return vals


def _check_hidden(pos, neg, e, d):
  """Validates the prompt activations; returns them as lists of arrays."""
  if pos is None or len(pos) != e:
    n = None if pos is None else len(pos)
    raise ValueError(
        f"gate_mode='hidden' needs hidden_states for each of the {e} "
        f"experts, got {n}"
    )
  if neg is None:
    neg = [None] * e
  elif len(neg) != e:
    raise ValueError(
        f"negative_hidden_states has {len(neg)} entries for {e} experts"
    )
  out_pos, out_neg = [], []
  for name, src, dst in (
      ("hidden_states", pos, out_pos),
      ("negative_hidden_states", neg, out_neg),
  ):
    for t, h in enumerate(src):
      if h is None and dst is out_neg:
        dst.append(None)
        continue
      shape = jnp.shape(h)
      if len(shape) < 1 or shape[-1] != d or math.prod(shape) == 0:
        raise ValueError(
            f"{name}[{t}] must be a non-empty [..., {d}], got {shape}"
        )
      dst.append(jnp.asarray(h))
  return out_pos, out_neg


def prune(
    params: Mapping[str, Any],
    expert_load: jax.typing.ArrayLike,
    num_keep: int,
) -> tuple[dict[str, Any], jax.Array]:
  """Keeps the ``num_keep`` most used experts (original order kept).

  Slices every leaf under ``experts/`` on its leading axis, and the
  router's expert axis (the last axis of ``kernel`` and ``bias``; for a
  soft-MoE kernel ``[D, E * slots]`` whole slot groups). Ties in
  ``expert_load`` keep the lower index. Jittable (``num_keep`` static).

  Args:
    params: MoE params.
    expert_load: ``[E]`` usage, e.g. ``aux["expert_load"]`` averaged over
      a data set.
    num_keep: experts to keep, in ``[1, E]``.

  Returns:
    ``(pruned params, kept expert indices [num_keep])``.

  >>> import numpy as np
  >>> p = {"router": {"kernel": np.arange(8.0).reshape(2, 4)},
  ...      "experts": {"wi": np.arange(4.0)[:, None, None] * np.ones((4, 2, 3)),
  ...                  "wo": np.ones((4, 3, 2))}}
  >>> q, kept = prune(p, np.array([0.1, 0.5, 0.1, 0.3]), 2)
  >>> kept.tolist(), q["router"]["kernel"].tolist(), q["experts"]["wi"][:, 0, 0].tolist()
  ([1, 3], [[1.0, 3.0], [5.0, 7.0]], [1.0, 3.0])
  """
  if "experts" not in params or "wi" not in params["experts"]:
    raise ValueError("params is missing 'experts/wi'")
  e = jnp.shape(params["experts"]["wi"])[0]
  load = jnp.asarray(expert_load)
  if load.shape != (e,):
    raise ValueError(f"expert_load must have shape ({e},), got {load.shape}")
  if isinstance(num_keep, bool) or not isinstance(num_keep, int):
    raise ValueError(f"num_keep must be an int, got {num_keep!r}")
  if not 1 <= num_keep <= e:
    raise ValueError(f"num_keep must be in [1, {e}], got {num_keep}")
  return _prune(dict(params), load, num_keep)


@functools.partial(jax.jit, static_argnums=2)
def _prune(params, load, num_keep):
  e = load.shape[0]
  _, top = jax.lax.top_k(load.astype(jnp.float32), num_keep)
  kept = jnp.sort(top).astype(jnp.int32)

  def cut(path: str, leaf: Any) -> Any:
    if path.startswith("experts/"):
      if jnp.shape(leaf)[:1] != (e,):
        raise ValueError(
            f"{path!r} has shape {jnp.shape(leaf)}; expected a leading E={e}"
        )
      return jnp.take(leaf, kept, axis=0)
    if path in ("router/kernel", "router/bias"):
      x = jnp.asarray(leaf)
      if x.shape[-1] % e:
        raise ValueError(
            f"{path!r} has {x.shape[-1]} outputs, not a multiple of E={e}"
        )
      slots = x.shape[-1] // e
      x = x.reshape(*x.shape[:-1], e, slots)
      x = jnp.take(x, kept, axis=-2)
      return x.reshape(*x.shape[:-2], num_keep * slots)
    return leaf

  return mtree.map_with_path(cut, dict(params)), kept
