r"""A small mixture-of-experts transformer (causal LM or encoder), pure JAX.

Pre-LayerNorm blocks (multi-head self-attention, then an MLP) over learned
token and position embeddings, a final LayerNorm and an untied output
projection. Every ``moe_every``-th block (blocks ``moe_every - 1``,
``2 * moe_every - 1``, ...) replaces its dense MLP by an :mod:`mtx.moe`
layer, as in Switch / GShard / V-MoE; ``moe_every=0`` gives the dense
transformer (the starting point of :func:`upcycle`).

Params (``/``-joined paths)::

  embed/embedding        [V, D]      token embeddings
  pos_embed/embedding    [L_max, D]  learned positions
  block_{i}/ln_1, ln_2   {scale, bias} [D]
  block_{i}/attn/qkv     {kernel [D, 3, H, Dh]}
  block_{i}/attn/out     {kernel [H, Dh, D]}
  block_{i}/mlp          {wi [D, F], wo [F, D]}                  dense blocks
  block_{i}/moe          {router: {kernel [D, E]},               MoE blocks
                          experts: {wi [E, D, F], wo [E, F, D]}}
  ln_f                   {scale, bias} [D]
  unembed/kernel         [D, V]

The MoE leaves are exactly :func:`mtx.moe.apply`'s layout, so the
``mtx.moe`` tools (upcycling, pruning, experts from fine-tuned models)
apply to ``params[f"block_{i}"]["moe"]``. For expert parallelism the
experts' leading ``E`` axis goes on an ``expert`` mesh axis and everything
else is replicated (:func:`sharding_rules`, :func:`param_shardings`);
activations are sharded over the batch on ``(data, expert)``
(:func:`batch_sharding`), which is also how the expert-parallel layer
shards its token groups, so no resharding happens around the MoE layers.

``apply(params, tokens, *, train=False, key=None) -> (logits, aux)``:
``logits`` ``[B, L, V]`` float32; ``aux`` holds ``loss`` (the weighted
auxiliary loss summed over MoE layers: ``load_balance_weight *
load_balance_loss + z_loss_weight * router_z_loss``, add it to the task
loss), the layer means of ``load_balance_loss``, ``router_z_loss``,
``router_entropy`` and ``drop_fraction``, and ``layers``: the per-layer
router metrics of :func:`mtx.moe.apply` (``expert_load`` ``[E]`` ...).
``train`` picks ``capacity_factor`` (else ``eval_capacity_factor``) and
enables noisy gating (``noise_std``, needs ``key``).

Routing groups: ``group_size`` tokens (default one sequence) are routed
together with a per-group capacity. A causal LM with a finite capacity
lets a token's fate depend on tokens after it in its group (they compete
for the same slots); use ``capacity_factor=None`` (dropless) where exact
causality matters.

>>> import jax, jax.numpy as jnp
>>> m = model(CONFIGS["tiny"])
>>> tokens = jnp.arange(16).reshape(2, 8)
>>> p = m.init(jax.random.key(0), tokens)
>>> logits, aux = jax.jit(m.apply)(p, tokens)
>>> logits.shape, sorted(aux["layers"]), aux["layers"]["block_1"]["expert_load"].shape
((2, 8, 128), ['block_1'], (8,))

References:
  Switch Transformer: https://arxiv.org/abs/2101.03961
  GShard: https://arxiv.org/abs/2006.16668
  Sparse upcycling: https://arxiv.org/abs/2212.05055
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mtx import moe
from mtx import sharding as sharding_lib
from mtx import tree as mtree
from mtx.models._base import Model

P = jax.sharding.PartitionSpec

__all__ = [
    "CONFIGS",
    "Config",
    "batch_sharding",
    "is_moe_block",
    "model",
    "next_token_loss",
    "param_shardings",
    "sharding_rules",
    "upcycle",
]


@dataclasses.dataclass(frozen=True)
class Config:
  """MoE transformer config.

  Attributes:
    vocab_size: V.
    max_len: L_max, rows of the position table.
    d_model: D.
    num_layers: blocks.
    num_heads: H (``D`` must be a multiple).
    mlp_dim: F, hidden width of the dense MLP and of every expert.
    moe_every: block ``i`` is an MoE block iff ``(i + 1) % moe_every == 0``;
      0 = no MoE blocks (the dense model).
    num_experts: E.
    num_selected: K, experts per token.
    router: a router of :data:`mtx.moe.ROUTERS`.
    backend: a backend of :data:`mtx.moe.BACKENDS` (``"expert_parallel"``
      needs ``model(config, mesh=...)``).
    capacity_factor: training capacity factor (``None`` = dropless).
    eval_capacity_factor: capacity factor with ``train=False``.
    group_size: tokens routed together (must divide ``B * L``); ``None`` =
      one group per sequence.
    activation: MLP / expert activation (:data:`mtx.moe.ACTIVATIONS`).
    noise_std: noisy top-k gating in training (needs ``key``).
    load_balance_weight: weight of the load-balance loss in ``aux["loss"]``.
    z_loss_weight: weight of the router z-loss in ``aux["loss"]``.
    causal: causal self-attention (a decoder LM) or bidirectional.
    norm_eps: LayerNorm epsilon.
    dtype: params dtype (router, norms and softmaxes compute in float32).
  """

  vocab_size: int = 128
  max_len: int = 128
  d_model: int = 128
  num_layers: int = 4
  num_heads: int = 4
  mlp_dim: int = 256
  moe_every: int = 2
  num_experts: int = 8
  num_selected: int = 2
  router: str = "top_k"
  backend: str = "sort"
  capacity_factor: float | None = 1.25
  eval_capacity_factor: float | None = 2.0
  group_size: int | None = None
  activation: str = "gelu"
  noise_std: float = 0.0
  load_balance_weight: float = 1e-2
  z_loss_weight: float = 1e-3
  causal: bool = True
  norm_eps: float = 1e-6
  dtype: str = "float32"


CONFIGS = {
    "tiny": Config(
        max_len=64,
        d_model=32,
        num_layers=2,
        num_heads=4,
        mlp_dim=64,
        num_experts=8,
    ),
    "small": Config(),
    "base": Config(
        max_len=512,
        d_model=512,
        num_layers=8,
        num_heads=8,
        mlp_dim=2048,
        num_experts=32,
    ),
}


def is_moe_block(config: Config, i: int) -> bool:
  """Whether block ``i`` has an MoE layer instead of a dense MLP.

  >>> [is_moe_block(Config(num_layers=4, moe_every=2), i) for i in range(4)]
  [False, True, False, True]
  """
  return config.moe_every > 0 and (i + 1) % config.moe_every == 0


def _check_config(c: Config) -> None:
  if c.d_model % c.num_heads:
    raise ValueError(
        f"d_model={c.d_model} is not a multiple of num_heads={c.num_heads}"
    )
  for name in ("vocab_size", "max_len", "d_model", "num_layers", "mlp_dim"):
    if getattr(c, name) < 1:
      raise ValueError(f"{name} must be >= 1, got {getattr(c, name)}")
  if c.moe_every < 0:
    raise ValueError(f"moe_every must be >= 0, got {c.moe_every}")
  if c.router not in moe.ROUTERS:
    raise ValueError(f"unknown router {c.router!r}; known: {moe.ROUTERS}")
  if c.backend not in moe.BACKENDS:
    raise ValueError(f"unknown backend {c.backend!r}; known: {moe.BACKENDS}")
  if c.activation not in moe.ACTIVATIONS:
    raise ValueError(
        f"unknown activation {c.activation!r}; known: {sorted(moe.ACTIVATIONS)}"
    )
  if c.moe_every and not 1 <= c.num_selected <= c.num_experts:
    raise ValueError(
        f"num_selected={c.num_selected} must be in [1, {c.num_experts}]"
    )


# ----------------------------------------------------------------------------
# Parameters.


def _shapes(c: Config) -> dict[str, Any]:
  d, f, h = c.d_model, c.mlp_dim, c.num_heads
  norm = {"scale": (d,), "bias": (d,)}
  out: dict[str, Any] = {
      "embed": {"embedding": (c.vocab_size, d)},
      "pos_embed": {"embedding": (c.max_len, d)},
  }
  for i in range(c.num_layers):
    block = {
        "ln_1": dict(norm),
        "attn": {
            "qkv": {"kernel": (d, 3, h, d // h)},
            "out": {"kernel": (h, d // h, d)},
        },
        "ln_2": dict(norm),
    }
    if is_moe_block(c, i):
      block["moe"] = {
          "router": {"kernel": (d, c.num_experts)},
          "experts": {
              "wi": (c.num_experts, d, f),
              "wo": (c.num_experts, f, d),
          },
      }
    else:
      block["mlp"] = {"wi": (d, f), "wo": (f, d)}
    out[f"block_{i}"] = block
  out["ln_f"] = dict(norm)
  out["unembed"] = {"kernel": (d, c.vocab_size)}
  return out


def _is_shape(x: Any) -> bool:
  return isinstance(x, tuple) and all(isinstance(n, int) for n in x)


def _init_leaf(path: str, z: jax.Array, c: Config) -> jax.Array:
  """Scales standard normals ``z`` into one leaf (by its path)."""
  name = path.rsplit("/", 1)[-1]
  if name == "scale":
    return jnp.ones(z.shape, jnp.float32)
  if name == "bias":
    return jnp.zeros(z.shape, jnp.float32)
  if name == "embedding" or path.endswith("router/kernel"):
    return 0.02 * z  # N(0, 0.02²); the router stays float32
  if path.endswith(("experts/wi", "experts/wo")):
    fan_in = z.shape[1]
  elif path.endswith("attn/out/kernel"):
    fan_in = z.shape[0] * z.shape[1]
  else:
    fan_in = z.shape[0]
  return (z / math.sqrt(fan_in)).astype(c.dtype)  # N(0, 1/fan_in)


@functools.partial(jax.jit, static_argnums=1)
def _init(key: jax.Array, c: Config) -> dict[str, Any]:
  with_path, treedef = jax.tree_util.tree_flatten_with_path(
      _shapes(c), is_leaf=_is_shape
  )
  shapes = [shape for _, shape in with_path]
  # One RNG draw for the whole model (one kernel to compile), then slices.
  sizes = [math.prod(s) for s in shapes]
  z = jax.random.normal(key, (sum(sizes),), jnp.float32)
  offsets = np.cumsum([0, *sizes[:-1]])
  return jax.tree_util.tree_unflatten(
      treedef,
      [
          _init_leaf(mtree.path_str(path), z[o : o + n].reshape(s), c)
          for (path, s), o, n in zip(with_path, offsets, sizes, strict=True)
      ],
  )


# ----------------------------------------------------------------------------
# Forward pass.


def _embed(table: jax.Array, tokens: jax.Array) -> jax.Array:
  """``table[tokens]``; on explicit meshes the rows follow the tokens."""
  spec = jax.typeof(tokens).sharding.spec
  if any(a is not None for a in spec):  # explicit: say where rows go
    return table.at[tokens].get(out_sharding=P(*spec, None))
  return table[tokens]


def _layer_norm(p: Mapping[str, jax.Array], x: jax.Array, eps: float):
  x = x.astype(jnp.float32)
  mean = x.mean(-1, keepdims=True)
  var = jnp.square(x - mean).mean(-1, keepdims=True)
  return (x - mean) * jax.lax.rsqrt(var + eps) * p["scale"] + p["bias"]


def _attention(p, x: jax.Array, causal: bool) -> jax.Array:
  """Multi-head self-attention ``[B, L, D] -> [B, L, D]``."""
  qkv = jnp.einsum(
      "bld,dthk->tblhk", x.astype(p["qkv"]["kernel"].dtype), p["qkv"]["kernel"]
  )
  q, k, v = qkv[0], qkv[1], qkv[2]
  logits = jnp.einsum("bqhk,bshk->bhqs", q, k).astype(jnp.float32)
  logits = logits / math.sqrt(q.shape[-1])
  if causal:
    n = x.shape[1]
    mask = jnp.tril(jnp.ones((n, n), bool))
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
  w = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  o = jnp.einsum("bhqs,bshk->bqhk", w, v)
  return jnp.einsum("bqhk,hkd->bqd", o, p["out"]["kernel"])


def _mlp(p, x: jax.Array, activation: str) -> jax.Array:
  act = moe.ACTIVATIONS[activation]
  h = act(x.astype(p["wi"].dtype) @ p["wi"])
  return h @ p["wo"]


_SUMMARY = ("load_balance_loss", "router_z_loss", "router_entropy")


def _apply(
    c: Config,
    moe_options: Mapping[str, Any],
    params: Mapping[str, Any],
    tokens: jax.Array,
    *,
    train: bool = False,
    key: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, Any]]:
  tokens = jnp.asarray(tokens)
  if tokens.ndim != 2:
    raise ValueError(f"tokens must be [B, L], got shape {tokens.shape}")
  b, n = tokens.shape
  if n > c.max_len:
    raise ValueError(f"sequence length {n} exceeds max_len={c.max_len}")
  group = n if c.group_size is None else c.group_size
  if (b * n) % group:
    raise ValueError(
        f"group_size={group} does not divide the {b}x{n} tokens of a batch"
    )
  noisy = train and c.noise_std > 0
  if noisy and key is None:
    raise ValueError("noise_std > 0 in training needs an explicit key")
  factor = c.capacity_factor if train else c.eval_capacity_factor

  x = _embed(params["embed"]["embedding"], tokens)
  x = x + params["pos_embed"]["embedding"][:n]
  layers = {}
  for i in range(c.num_layers):
    name = f"block_{i}"
    p = params[name]
    x = x + _attention(
        p["attn"], _layer_norm(p["ln_1"], x, c.norm_eps), c.causal
    ).astype(x.dtype)
    h = _layer_norm(p["ln_2"], x, c.norm_eps)
    if "moe" in p:
      y, metrics = moe.apply(
          p["moe"],
          h,
          num_selected=c.num_selected,
          capacity_factor=factor,
          router=c.router,
          backend=c.backend,
          key=None if key is None else jax.random.fold_in(key, i),
          activation=c.activation,
          noise_std=c.noise_std if noisy else 0.0,
          num_groups=b * n // group,
          **moe_options,
      )
      metrics = dict(metrics)
      metrics.pop("capacity", None)
      layers[name] = metrics
    else:
      y = _mlp(p["mlp"], h, c.activation)
    x = x + y.astype(x.dtype)
  x = _layer_norm(params["ln_f"], x, c.norm_eps)
  logits = jnp.einsum(
      "bld,dv->blv",
      x.astype(params["unembed"]["kernel"].dtype),
      params["unembed"]["kernel"],
  ).astype(jnp.float32)
  return logits, _summarise(c, layers)


def _summarise(c: Config, layers: dict[str, Any]) -> dict[str, Any]:
  zero = jnp.zeros((), jnp.float32)
  ms = list(layers.values())
  aux: dict[str, Any] = {
      "loss": sum(
          (
              moe.aux_loss(
                  m,
                  load_balance_weight=c.load_balance_weight,
                  z_loss_weight=c.z_loss_weight,
              )
              for m in ms
          ),
          zero,
      )
  }
  for k in (*_SUMMARY, "drop_fraction"):
    aux[k] = sum((m[k] for m in ms), zero) / max(len(ms), 1)
  aux["layers"] = layers
  return aux


def model(
    config: Config = Config(),
    *,
    mesh: jax.sharding.Mesh | None = None,
    data_axis: str = "data",
    expert_axis: str = "expert",
) -> Model:
  """The MoE transformer as a :class:`~mtx.models.Model`.

  Args:
    config: the :class:`Config`.
    mesh: the device mesh of the ``"expert_parallel"`` backend (ignored by
      the others).
    data_axis: the mesh axis of pure data parallelism.
    expert_axis: the mesh axis the experts are split over.

  Returns:
    ``Model`` with ``init(key, tokens=None) -> params`` and ``apply(params,
    tokens, *, train=False, key=None) -> (logits, aux)`` (module docstring).

  Raises:
    ValueError: an inconsistent config, or ``"expert_parallel"`` without a
      mesh.
  """
  _check_config(config)
  options: dict[str, Any] = {}
  if config.backend == "expert_parallel":
    if mesh is None:
      raise ValueError("backend='expert_parallel' needs model(config, mesh=)")
    options = dict(mesh=mesh, data_axis=data_axis, expert_axis=expert_axis)

  def init(key: jax.Array, tokens: Any = None) -> dict[str, Any]:
    del tokens  # shapes come from the config
    return _init(key, config)

  name = f"moe_transformer(d={config.d_model}, E={config.num_experts})"
  return Model(name, init, functools.partial(_apply, config, options), config)


# ----------------------------------------------------------------------------
# Loss, sharding and upcycling.


def next_token_loss(
    apply_fn: Any,
    params: Mapping[str, Any],
    tokens: jax.Array,
    *,
    train: bool = True,
    key: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, Any]]:
  """Causal LM loss: cross-entropy of ``tokens[:, 1:]`` given the prefix.

  Args:
    apply_fn: a :func:`model`'s ``apply``.
    params: its params.
    tokens: int ``[B, L + 1]``.
    train: training mode (train capacity factor, noisy gating).
    key: PRNG key for noisy gating / random routers.

  Returns:
    ``(total, aux)``: ``total = cross_entropy + aux["loss"]`` (float32
    scalar); ``aux`` is the model's aux dict plus ``cross_entropy``.

  >>> import jax, jax.numpy as jnp
  >>> m = model(CONFIGS["tiny"])
  >>> p = m.init(jax.random.key(0))
  >>> loss = jax.jit(lambda p, t: next_token_loss(m.apply, p, t))
  >>> total, aux = loss(p, jnp.ones((2, 9), jnp.int32))
  >>> bool(total > aux["cross_entropy"] > 4.0)  # ~ log(128) at init
  True
  """
  logits, aux = apply_fn(params, tokens[:, :-1], train=train, key=key)
  labels = tokens[:, 1:]
  lse = jax.nn.logsumexp(logits, axis=-1)
  picked = jnp.take_along_axis(logits, labels[..., None], axis=-1)[..., 0]
  ce = jnp.mean(lse - picked)
  aux = dict(aux)
  aux["cross_entropy"] = ce
  return ce + aux["loss"], aux


def sharding_rules(
    *, expert_axis: str = "expert"
) -> list[tuple[str, jax.sharding.PartitionSpec]]:
  """First-match path rules: expert weights on ``expert``, rest replicated.

  >>> sharding_rules()
  [('(^|/)moe/experts/', P('expert',)), ('.*', P())]
  """
  return [(r"(^|/)moe/experts/", P(expert_axis)), (r".*", P())]


def param_shardings(
    params: Any, mesh: jax.sharding.Mesh, *, expert_axis: str = "expert"
) -> Any:
  """``NamedSharding`` tree for ``params`` (arrays or shape structs) on ``mesh``.

  The experts' leading ``E`` axis is split over ``expert_axis`` (which must
  divide ``E``); everything else is replicated, i.e. data parallel.

  Raises:
    ValueError: ``E`` not divisible by the ``expert_axis`` size (names the
      leaf).
  """
  return sharding_lib.shardings_from_rules(
      params, mesh, sharding_rules(expert_axis=expert_axis)
  )


def batch_sharding(
    mesh: jax.sharding.Mesh,
    *,
    data_axis: str = "data",
    expert_axis: str = "expert",
) -> jax.sharding.NamedSharding:
  """Token batches ``[B, L]``: ``B`` split over ``(data, expert)``."""
  return jax.sharding.NamedSharding(mesh, P((data_axis, expert_axis)))


def upcycle(
    dense_params: Mapping[str, Any],
    config: Config,
    *,
    key: jax.Array | None = None,
    noise_std: float = 0.0,
    router_std: float = 0.0,
) -> dict[str, Any]:
  """MoE-transformer params from a dense one (sparse upcycling).

  Every MoE block of ``config`` gets :func:`mtx.moe.upcycle.upcycle` of the
  dense model's MLP in that block; all other leaves are copied. With no
  noise the experts are identical and, with renormalised top-k gates
  (``num_selected >= 2``, or a zero router) and no drops, the MoE model
  computes the dense model exactly.

  Args:
    dense_params: params of ``model(dataclasses.replace(config,
      moe_every=0))``.
    config: the MoE config.
    key: PRNG key (required when a std > 0; folded with the block index).
    noise_std: expert weight noise (:func:`mtx.moe.upcycle.upcycle`).
    router_std: router init scale (0 = a zero router).

  Returns:
    Params for ``model(config)``.

  Raises:
    ValueError: ``dense_params`` that do not fit the dense version of
      ``config`` (names the path).
  """
  dense_config = dataclasses.replace(config, moe_every=0)
  want = jax.eval_shape(_init, jax.random.key(0), dense_config)
  try:
    mtree.assert_same_structure(
        want, dense_params, names=("dense model", "dense_params")
    )
  except ValueError as e:
    raise ValueError(
        f"dense_params do not fit the dense version of the config: {e}"
    ) from None
  out = {k: v for k, v in dense_params.items()}
  for i in range(config.num_layers):
    if not is_moe_block(config, i):
      continue
    name = f"block_{i}"
    block = dict(dense_params[name])
    mlp = block.pop("mlp")
    block["moe"] = moe.upcycle.upcycle(
        mlp,
        config.num_experts,
        key=None if key is None else jax.random.fold_in(key, i),
        noise_std=noise_std,
        router_std=router_std,
    )
    out[name] = block
  return out
