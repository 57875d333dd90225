r"""MoE-LoRA: low-rank adapters whose parts are routed experts.

Both layers adapt a linear map ``x @ kernel`` (``kernel`` ``[D_in, D_out]``,
frozen; any 2-D leaf of a model) and return ``(y, aux)`` with ``aux`` as
the router metrics of :mod:`mtx.moe.routing` (per rank or per adapter).

* Rank-wise MoE-LoRA (:func:`rank_init` / :func:`rank_apply`): the ``R``
  rank-1 components ``a[:, r] b[r]`` of one adapter are the experts; a
  router keeps the top-``k`` ranks per token ("Each Rank Could be an
  Expert" with an explicit router; FlyLoRA with a frozen sparse random
  ``a`` acting as the implicit router, ranks chosen by ``|x a| + bias``).
* LoRA experts (:func:`experts_init` / :func:`experts_apply`, LoRAMoE /
  MoLoRA): ``E`` LoRA adapters on the frozen kernel, ``k`` per token by a
  top-k router.

The low-rank products are computed for all ranks / adapters and masked
(they are ``R`` or ``E r`` columns wide, far cheaper than the frozen
matmul), so there are no capacity drops here.

>>> import jax, numpy as np
>>> from mtx.moe import lora
>>> kernel = np.eye(4)
>>> p = lora.experts_init(jax.random.key(0), 4, 4, num_experts=3, rank=2)
>>> y, aux = lora.experts_apply(kernel, p, np.ones((5, 4)), num_selected=1)
>>> y.shape, bool((np.asarray(y) == 1.0).all())  # b = 0: y = x @ kernel
((5, 4), True)
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from mtx import tree as mtree
from mtx.moe import assignment as _asg
from mtx.moe import dispatch as _dispatch
from mtx.moe import routing as _routing

_acc = mtree.accum_dtype  # float32, or float64 under jax_enable_x64

__all__ = [
    "experts_apply",
    "experts_init",
    "fly_projection",
    "rank_apply",
    "rank_init",
]


def fly_projection(
    key: jax.Array, d_in: int, rank: int, *, nonzeros: int
) -> jax.Array:
  """FlyLoRA's frozen sparse random down-projection ``[D_in, R]``.

  Every rank (column) has exactly ``nonzeros`` non-zero entries drawn from
  ``N(0, 1/R²)`` at random rows.

  >>> import jax, numpy as np
  >>> a = np.asarray(fly_projection(jax.random.key(0), 8, 4, nonzeros=2))
  >>> a.shape, (a != 0).sum(0).tolist()
  ((8, 4), [2, 2, 2, 2])
  """
  if not 1 <= nonzeros <= d_in:
    raise ValueError(f"nonzeros must be in [1, {d_in}], got {nonzeros!r}")
  return _fly_projection(key, d_in, rank, nonzeros)


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _fly_projection(key, d_in, rank, nonzeros):
  # One uniform draw: the first d_in columns order the rows (a random
  # subset per rank), the rest become N(0, 1) values by the inverse CDF.
  u = jax.random.uniform(
      key, (rank, d_in + nonzeros), minval=1e-7, maxval=1.0 - 1e-7
  )
  rows = jnp.argsort(u[:, :d_in], axis=1)[:, :nonzeros]
  vals = jax.scipy.special.ndtri(u[:, d_in:]) / rank
  a = jnp.zeros((rank, d_in)).at[jnp.arange(rank)[:, None], rows].set(vals)
  return a.T


def rank_init(
    key: jax.Array,
    d_in: int,
    d_out: int,
    rank: int,
    *,
    router: str = "explicit",
    nonzeros: int | None = None,
    router_std: float = 0.02,
    dtype: Any = jnp.float32,
) -> dict[str, Any]:
  """Params of a rank-wise MoE-LoRA adapter.

  Args:
    key: PRNG key.
    d_in: ``D_in``.
    d_out: ``D_out``.
    rank: ``R`` (the number of rank-1 experts).
    router: ``"explicit"`` (``a`` ~ N(0, 1/D_in) trainable, router kernel
      ``[D_in, R]``) or ``"implicit"`` (FlyLoRA: ``a`` frozen sparse random
      from :func:`fly_projection`, plus a load-balancing ``bias`` ``[R]``
      the caller may update; no router params).
    nonzeros: FlyLoRA non-zeros per rank (default ``max(1, D_in // 8)``).
    router_std: explicit router init scale.
    dtype: dtype of ``a`` and ``b``.

  Returns:
    ``{"a": [D_in, R], "b": zeros [R, D_out]}`` plus ``"router"`` (explicit)
    or ``"bias"`` (implicit).

  >>> import jax
  >>> sorted(rank_init(jax.random.key(0), 8, 3, 4, router="implicit",
  ...                  nonzeros=2))
  ['a', 'b', 'bias']
  """
  if router not in ("explicit", "implicit"):
    raise ValueError(f"router must be 'explicit' or 'implicit', got {router!r}")
  nz = nonzeros if nonzeros is not None else max(1, d_in // 8)
  if router == "implicit" and not 1 <= nz <= d_in:
    raise ValueError(f"nonzeros must be in [1, {d_in}], got {nz!r}")
  return _rank_init(
      key, d_in, d_out, rank, router, nz, jnp.dtype(dtype), router_std
  )


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4, 5, 6))
def _rank_init(key, d_in, d_out, rank, router, nz, dtype, router_std):
  b = jnp.zeros((rank, d_out), dtype)
  if router == "explicit":
    a, kernel = _dispatch.normals(key, ((d_in, rank), (d_in, rank)))
    return {
        "a": (a / math.sqrt(d_in)).astype(dtype),
        "b": b,
        "router": {"kernel": router_std * kernel},
    }
  return {
      "a": _fly_projection(key, d_in, rank, nz).astype(dtype),
      "b": b,
      "bias": jnp.zeros((rank,), _acc()),
  }


def _check_linear(kernel, x, a_shape_in, d_out, what):
  kernel = jnp.asarray(kernel)
  if kernel.ndim != 2:
    raise ValueError(f"kernel must be [D_in, D_out], got {kernel.shape}")
  if kernel.shape != (a_shape_in, d_out):
    raise ValueError(
        f"{what} is for a [{a_shape_in}, {d_out}] kernel, got "
        f"{list(kernel.shape)}"
    )
  if jnp.shape(x)[-1] != a_shape_in:
    raise ValueError(
        f"x must have shape [..., {a_shape_in}], got {jnp.shape(x)}"
    )
  return kernel


def rank_apply(
    params: Mapping[str, Any],
    x: jax.typing.ArrayLike,
    *,
    num_selected: int,
    scale: float = 1.0,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  r"""The adapter's update ``delta = scale · ((x a) ⊙ w) b`` with top-k ranks.

  With an explicit router (``params["router"]``) ``w`` holds
  ``k · g_r`` on the ``k`` most probable ranks (``g`` the top-k router
  probabilities renormalised to sum to 1, so ``k = R`` with a uniform
  router is plain LoRA) and 0 elsewhere. With the implicit FlyLoRA router
  (no ``router``) ``w`` is the 0/1 mask of the ``k`` ranks with the largest
  ``|x a| + bias``.

  Args:
    params: from :func:`rank_init`.
    x: ``[..., D_in]``.
    num_selected: ranks kept per token, in ``[1, R]``.
    scale: the LoRA ``alpha / r`` factor.

  Returns:
    ``(delta [..., D_out], aux)``; ``aux`` has the router metrics with
    ranks as experts (implicit router: ``expert_load`` and a monitoring
    ``load_balance_loss = R Σ f_r²``, 1.0 when balanced; no z-loss).

  >>> import jax, numpy as np
  >>> p = rank_init(jax.random.key(0), 8, 3, 4, router="implicit",
  ...               nonzeros=2)
  >>> p["a"], p["b"] = np.asarray(p["a"]), np.ones((4, 3))
  >>> x = np.ones((2, 8))
  >>> full, _ = rank_apply(p, x, num_selected=4)  # all ranks: plain LoRA
  >>> bool(np.allclose(full, x @ p["a"] @ p["b"], atol=1e-6))
  True

  References:
    Zou et al., FlyLoRA, https://arxiv.org/abs/2510.08396.
  """
  a, b = jnp.asarray(params["a"]), jnp.asarray(params["b"])
  if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[0]:
    raise ValueError(
        f"'a' and 'b' must be [D_in, R] and [R, D_out], got {a.shape} and "
        f"{b.shape}"
    )
  x = jnp.asarray(x)
  if x.shape[-1] != a.shape[0]:
    raise ValueError(f"x must have shape [..., {a.shape[0]}], got {x.shape}")
  r = a.shape[1]
  k = _asg.check_k(num_selected, r)
  if "router" in params:
    kr = jnp.shape(params["router"]["kernel"])
    if kr != (a.shape[0], r):
      raise ValueError(
          f"'router/kernel' must be [{a.shape[0]}, {r}] (D_in, ranks), got "
          f"{list(kr)}"
      )
  return _rank_apply(params, x, k, scale)


@functools.partial(jax.jit, static_argnums=(2,))
def _rank_apply(params, x, k, scale):
  a, b = params["a"], params["b"]
  r = a.shape[1]
  lead = x.shape[:-1]
  x_GSD = x.reshape(1, -1, x.shape[-1])
  z = jnp.einsum("gsd,dr->gsr", x_GSD.astype(a.dtype), a).astype(_acc())
  if "router" in params:
    logits = _routing.router_logits(params["router"], x_GSD)
    t = _routing.top_k_routing(
        logits, num_selected=k, capacity=None, normalize=True
    )
    idx, w, metrics = t.expert_index, t.weight * k, t.metrics
  else:
    score = jnp.abs(z) + jnp.asarray(params.get("bias", 0.0), _acc())
    _, idx = jax.lax.top_k(jax.lax.stop_gradient(score), k)
    w = jnp.ones(idx.shape, _acc())
    load = jnp.zeros((r,), _acc()).at[idx.reshape(-1)].add(1.0)
    load = load / load.sum()
    metrics = {
        "load_balance_loss": r * jnp.sum(load**2),
        "expert_load": load,
        "drop_fraction": jnp.asarray(0.0, _acc()),
    }
  w_GSR = jnp.zeros(z.shape, _acc())
  w_GSR = jax.vmap(jax.vmap(lambda row, i, v: row.at[i].set(v)))(w_GSR, idx, w)
  delta = scale * jnp.einsum(
      "gsr,rd->gsd", (z * w_GSR).astype(b.dtype), b
  ).astype(_acc())
  return delta.astype(x.dtype).reshape(*lead, b.shape[1]), metrics


def experts_init(
    key: jax.Array,
    d_in: int,
    d_out: int,
    *,
    num_experts: int,
    rank: int,
    router_std: float = 0.02,
    dtype: Any = jnp.float32,
) -> dict[str, Any]:
  """Params of ``E`` LoRA experts: ``a`` ~ N(0, 1/D_in), ``b = 0``.

  Returns:
    ``{"router": {"kernel": [D_in, E]}, "a": [E, D_in, r],
    "b": [E, r, D_out]}``.

  >>> import jax
  >>> p = experts_init(jax.random.key(0), 4, 4, num_experts=3, rank=2)
  >>> p["a"].shape, p["b"].shape, p["router"]["kernel"].shape
  ((3, 4, 2), (3, 2, 4), (4, 3))
  """
  return _experts_init(
      key, d_in, d_out, num_experts, rank, jnp.dtype(dtype), router_std
  )


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4, 5))
def _experts_init(key, d_in, d_out, e, rank, dtype, router_std):
  a, kernel = _dispatch.normals(key, ((e, d_in, rank), (d_in, e)))
  return {
      "router": {"kernel": router_std * kernel},
      "a": (a / math.sqrt(d_in)).astype(dtype),
      "b": jnp.zeros((e, rank, d_out), dtype),
  }


def experts_apply(
    kernel: jax.typing.ArrayLike,
    params: Mapping[str, Any],
    x: jax.typing.ArrayLike,
    *,
    num_selected: int,
    scale: float = 1.0,
    bias: jax.typing.ArrayLike | None = None,
    normalize: bool | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  r"""``y = x kernel (+ bias) + scale Σ_k g_k (x a_{e_k}) b_{e_k}`` per token.

  ``g`` are the top-k router gates (:func:`mtx.moe.routing.top_k_routing`
  without capacity; renormalised when ``k > 1`` unless ``normalize`` says
  otherwise). ``num_selected = E`` with ``normalize=False`` is LoRAMoE's
  dense softmax mixture.

  Args:
    kernel: the frozen ``[D_in, D_out]`` weight.
    params: from :func:`experts_init`.
    x: ``[..., D_in]``.
    num_selected: adapters per token, in ``[1, E]``.
    scale: the LoRA ``alpha / r`` factor.
    bias: optional frozen ``[D_out]`` bias of the linear map.
    normalize: top-k gate renormalisation (default ``k > 1``).

  Returns:
    ``(y [..., D_out], aux)`` with the router metrics.

  Raises:
    ValueError: shapes that do not fit ``kernel`` / ``x``, or
      ``num_selected`` outside ``[1, E]``.

  >>> import numpy as np
  >>> p = {"router": {"kernel": np.array([[10.0, 0.0], [10.0, 0.0]])},
  ...      "a": np.ones((2, 2, 1)),
  ...      "b": np.stack([np.ones((1, 2)), -np.ones((1, 2))])}
  >>> y, _ = experts_apply(np.zeros((2, 2)), p, np.ones((1, 2)),
  ...                      num_selected=1)
  >>> [round(v, 3) for v in y[0].tolist()]  # expert 0, gate ~1: +2
  [2.0, 2.0]

  References:
    Dou et al., LoRAMoE, https://arxiv.org/abs/2312.09979;
    Zadouri et al., MoLoRA, https://arxiv.org/abs/2309.05444.
  """
  a, b = jnp.asarray(params["a"]), jnp.asarray(params["b"])
  if (
      a.ndim != 3
      or b.ndim != 3
      or (a.shape[0], a.shape[2]) != (b.shape[0], b.shape[1])
  ):
    raise ValueError(
        f"'a' and 'b' must be [E, D_in, r] and [E, r, D_out], got {a.shape} "
        f"and {b.shape}"
    )
  e, d_in, _ = a.shape
  kernel = _check_linear(kernel, x, d_in, b.shape[2], "the LoRA experts")
  x = jnp.asarray(x)
  k = _asg.check_k(num_selected, e)
  if jnp.shape(params["router"]["kernel"]) != (d_in, e):
    raise ValueError(
        f"'router/kernel' must be [{d_in}, {e}] (D_in, experts), got "
        f"{list(jnp.shape(params['router']['kernel']))}"
    )
  if normalize is None:
    normalize = k > 1
  return _experts_apply(kernel, params, x, bias, k, bool(normalize), scale)


@functools.partial(jax.jit, static_argnums=(4, 5))
def _experts_apply(kernel, params, x, bias, k, normalize, scale):
  a, b = params["a"], params["b"]
  e, d_in, _ = a.shape
  lead = x.shape[:-1]
  x_GSD = x.reshape(1, -1, d_in)
  logits = _routing.router_logits(params["router"], x_GSD)
  t = _routing.top_k_routing(
      logits, num_selected=k, capacity=None, normalize=normalize
  )
  gate_GSE = jnp.einsum(
      "gske,gsk->gse", jax.nn.one_hot(t.expert_index, e), t.weight
  )
  z = jnp.einsum("gsd,edr->gser", x_GSD.astype(a.dtype), a)
  delta = jnp.einsum(
      "gser,gse,erd->gsd",
      z.astype(_acc()),
      gate_GSE,
      b.astype(_acc()),
  )
  y = jnp.einsum("gsd,df->gsf", x_GSD, kernel).astype(_acc())
  if bias is not None:
    y = y + jnp.asarray(bias, _acc())
  y = y + scale * delta
  return y.astype(x.dtype).reshape(*lead, kernel.shape[1]), t.metrics
