"""Decoder-only language models: the Llama family and GPT-2.

``family="llama"`` (Llama 1/2/3, TinyLlama and other ``LlamaForCausalLM``
checkpoints): RMSNorm, rotary position embeddings (Hugging Face's
``rotate_half`` layout, ``rope_theta``, optional ``linear`` / ``llama3``
frequency scaling), grouped-query attention (``num_kv_heads`` may divide
``num_heads``), a SwiGLU MLP (``down(silu(gate(x)) * up(x))``), and an output
projection tied to the token embeddings or separate (``lm_head``).

``family="gpt2"``: learned positions, pre-LN blocks with LayerNorm, one fused
``qkv`` projection and ``gelu_new`` MLP whose kernels are ``[in, out]`` like
GPT-2's Conv1D weights, and tied output embeddings.

``apply(params, input_ids, attention_mask=None, position_ids=None)`` returns
logits ``[B, L, V]``; the attention is causal with padding keys masked
(``attention_mask`` 1 = token, 0 = padding) and positions default to
``0..L-1``, as ``transformers`` does without explicit ``position_ids``.

>>> import jax, jax.numpy as jnp
>>> m = model(CONFIGS["tiny-llama"])
>>> ids = jnp.array([[1, 5, 9, 0]])
>>> p = m.init(jax.random.key(0), ids)
>>> m.apply(p, ids, jnp.array([[1, 1, 1, 0]])).shape
(1, 4, 128)

References:
  Llama: https://arxiv.org/abs/2302.13971
  RoPE: https://arxiv.org/abs/2104.09864
  GQA: https://arxiv.org/abs/2305.13245
  GPT-2: https://cdn.openai.com/better-language-models/language_models_are_unsupervised_multitask_learners.pdf
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from mtx.models._base import Model
from mtx.models.bert import activation
from mtx.models.bert import dot_product_attention
from mtx.models.bert import layer_norm
from mtx.models.bert import padding_mask

_INIT = nn.initializers.normal(0.02)


@dataclasses.dataclass(frozen=True)
class Config:
  """Decoder-only LM config (Hugging Face names in comments).

  Attributes:
    family: ``"llama"`` or ``"gpt2"``.
    vocab_size: V.
    hidden_size: model dim D (GPT-2: ``n_embd``).
    num_layers: blocks (``num_hidden_layers`` / ``n_layer``).
    num_heads: query heads (``num_attention_heads`` / ``n_head``).
    num_kv_heads: key/value heads (``num_key_value_heads``); None = heads.
    head_dim: per-head dim; None = ``hidden_size // num_heads``.
    intermediate_size: MLP hidden dim (GPT-2: ``n_inner`` or 4 D).
    max_positions: GPT-2's position table rows (``n_positions``); for
      Llama only a record of ``max_position_embeddings``.
    norm_eps: ``rms_norm_eps`` / ``layer_norm_epsilon``.
    activation: MLP activation (``hidden_act`` / ``activation_function``).
    tie_embeddings: logits use the token embeddings (no ``lm_head``).
    attention_bias: Llama q/k/v/o biases (``attention_bias``).
    mlp_bias: Llama MLP biases (``mlp_bias``).
    rope_theta: RoPE base.
    rope_type: ``"default"``, ``"linear"`` or ``"llama3"``.
    rope_factor: frequency scaling factor (``linear``, ``llama3``).
    rope_low_freq_factor: ``llama3`` ``low_freq_factor``.
    rope_high_freq_factor: ``llama3`` ``high_freq_factor``.
    rope_original_max_positions: ``llama3``
      ``original_max_position_embeddings``.
    scale_attn_weights: GPT-2 scales logits by ``head_dim ** -0.5``.
    scale_attn_by_inverse_layer_idx: GPT-2 also divides by ``layer + 1``.
  """

  family: str = "llama"
  vocab_size: int = 32000
  hidden_size: int = 4096
  num_layers: int = 32
  num_heads: int = 32
  num_kv_heads: int | None = None
  head_dim: int | None = None
  intermediate_size: int = 11008
  max_positions: int = 4096
  norm_eps: float = 1e-5
  activation: str = "silu"
  tie_embeddings: bool = False
  attention_bias: bool = False
  mlp_bias: bool = False
  rope_theta: float = 10000.0
  rope_type: str = "default"
  rope_factor: float = 1.0
  rope_low_freq_factor: float = 1.0
  rope_high_freq_factor: float = 4.0
  rope_original_max_positions: int = 8192
  scale_attn_weights: bool = True
  scale_attn_by_inverse_layer_idx: bool = False

  @property
  def kv_heads(self) -> int:
    return self.num_kv_heads or self.num_heads

  @property
  def dim_per_head(self) -> int:
    return self.head_dim or self.hidden_size // self.num_heads


def _gpt2(**kw) -> Config:
  base = dict(
      family="gpt2",
      vocab_size=50257,
      hidden_size=768,
      num_layers=12,
      num_heads=12,
      intermediate_size=3072,
      max_positions=1024,
      activation="gelu_new",
      tie_embeddings=True,
  )
  return Config(**{**base, **kw})


CONFIGS = {
    "tiny-llama": Config(
        vocab_size=128,
        hidden_size=32,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        intermediate_size=64,
        max_positions=64,
    ),
    "tiny-gpt2": _gpt2(
        vocab_size=128,
        hidden_size=32,
        num_layers=2,
        num_heads=4,
        intermediate_size=128,
        max_positions=64,
    ),
    "llama-7b": Config(max_positions=2048, norm_eps=1e-6),
    "llama2-7b": Config(),
    "llama2-13b": Config(
        hidden_size=5120, num_layers=40, num_heads=40, intermediate_size=13824
    ),
    "llama3-8b": Config(
        vocab_size=128256,
        num_kv_heads=8,
        intermediate_size=14336,
        max_positions=8192,
        rope_theta=500000.0,
    ),
    "tinyllama-1.1b": Config(
        hidden_size=2048,
        num_layers=22,
        num_heads=32,
        num_kv_heads=4,
        intermediate_size=5632,
        max_positions=2048,
    ),
    "gpt2": _gpt2(),
    "gpt2-medium": _gpt2(
        hidden_size=1024, num_layers=24, num_heads=16, intermediate_size=4096
    ),
    "gpt2-large": _gpt2(
        hidden_size=1280, num_layers=36, num_heads=20, intermediate_size=5120
    ),
}


def _rope_fields(hf: dict) -> dict:
  rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
  rope_type = rope.get("rope_type", rope.get("type", "default"))
  if rope_type not in ("default", "linear", "llama3"):
    raise ValueError(f"rope_type {rope_type!r} is not supported")
  if rope.get("partial_rotary_factor", 1.0) != 1.0:
    raise ValueError("partial_rotary_factor != 1 is not supported")
  fields = dict(
      rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
      rope_type=rope_type,
  )
  if rope_type != "default":
    fields["rope_factor"] = float(rope["factor"])
  if rope_type == "llama3":
    fields.update(
        rope_low_freq_factor=float(rope["low_freq_factor"]),
        rope_high_freq_factor=float(rope["high_freq_factor"]),
        rope_original_max_positions=int(
            rope.get(
                "original_max_position_embeddings",
                hf.get("max_position_embeddings", 2048),
            )
        ),
    )
  return fields


def config_from_hf(hf_config: dict) -> Config:
  """A :class:`Config` from a Hugging Face ``config.json`` dict.

  Keys absent from the dict take ``LlamaConfig`` / ``GPT2Config`` defaults.
  Both ``rope_parameters`` (transformers 5) and ``rope_theta`` +
  ``rope_scaling`` (earlier) are read.

  >>> config_from_hf({"model_type": "gpt2", "n_embd": 64, "n_head": 4})
  ... # doctest: +ELLIPSIS
  Config(family='gpt2', vocab_size=50257, hidden_size=64, ...)

  Raises:
    ValueError: not a Llama / GPT-2 config or an unsupported variant.
  """
  get = hf_config.get
  model_type = get("model_type")
  if model_type == "llama":
    if get("pretraining_tp", 1) != 1:
      raise ValueError("pretraining_tp != 1 is not supported")
    heads = get("num_attention_heads", 32)
    return Config(
        vocab_size=get("vocab_size", 32000),
        hidden_size=get("hidden_size", 4096),
        num_layers=get("num_hidden_layers", 32),
        num_heads=heads,
        num_kv_heads=get("num_key_value_heads") or heads,
        head_dim=get("head_dim"),
        intermediate_size=get("intermediate_size", 11008),
        max_positions=get("max_position_embeddings", 2048),
        norm_eps=get("rms_norm_eps", 1e-6),
        activation=get("hidden_act", "silu"),
        tie_embeddings=bool(get("tie_word_embeddings", False)),
        attention_bias=bool(get("attention_bias", False)),
        mlp_bias=bool(get("mlp_bias", False)),
        **_rope_fields(hf_config),
    )
  if model_type == "gpt2":
    if get("add_cross_attention"):
      raise ValueError("add_cross_attention=True is not supported")
    d = get("n_embd", 768)
    return _gpt2(
        vocab_size=get("vocab_size", 50257),
        hidden_size=d,
        num_layers=get("n_layer", 12),
        num_heads=get("n_head", 12),
        intermediate_size=get("n_inner") or 4 * d,
        max_positions=get("n_positions", 1024),
        norm_eps=get("layer_norm_epsilon", 1e-5),
        activation=get("activation_function", "gelu_new"),
        tie_embeddings=bool(get("tie_word_embeddings", True)),
        scale_attn_weights=bool(get("scale_attn_weights", True)),
        scale_attn_by_inverse_layer_idx=bool(
            get("scale_attn_by_inverse_layer_idx", False)
        ),
    )
  raise ValueError(f"not a Llama or GPT-2 config: model_type={model_type!r}")


def rope_frequencies(config: Config) -> jax.Array:
  """Inverse frequencies ``[head_dim / 2]`` (float32), scaling applied.

  >>> rope_frequencies(Config(hidden_size=8, num_heads=2)).tolist()
  [1.0, 0.009999999776482582]
  """
  dim = config.dim_per_head
  inv = 1.0 / (config.rope_theta ** (jnp.arange(0, dim, 2, jnp.float32) / dim))
  if config.rope_type == "linear":
    inv = inv / config.rope_factor
  elif config.rope_type == "llama3":
    factor = config.rope_factor
    low, high = config.rope_low_freq_factor, config.rope_high_freq_factor
    old = config.rope_original_max_positions
    wavelen = 2 * math.pi / inv
    scaled = jnp.where(wavelen > old / low, inv / factor, inv)
    smooth = (old / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old / high) & (wavelen <= old / low)
    inv = jnp.where(medium, smoothed, scaled)
  return inv


def _rotate_half(x):
  x1, x2 = jnp.split(x, 2, axis=-1)
  return jnp.concatenate([-x2, x1], axis=-1)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array):
  """Rotary embedding of ``x [B, L, H, Dh]`` at ``positions [B, L]``.

  Hugging Face's layout: the two halves of each head are the (real,
  imaginary) parts, ``x * cos + rotate_half(x) * sin``.
  """
  freqs = positions[..., None].astype(jnp.float32) * inv_freq
  emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]
  cos, sin = jnp.cos(emb).astype(x.dtype), jnp.sin(emb).astype(x.dtype)
  return x * cos + _rotate_half(x) * sin


class RMSNorm(nn.Module):
  """``scale * x / sqrt(mean(x^2) + eps)``, normalised in float32."""

  eps: float

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", nn.initializers.ones, (x.shape[-1],))
    y = x.astype(jnp.float32)
    y = y * jax.lax.rsqrt(jnp.mean(y * y, axis=-1, keepdims=True) + self.eps)
    return scale * y.astype(x.dtype)


class LlamaLayer(nn.Module):
  config: Config

  @nn.compact
  def __call__(self, x, mask, positions, inv_freq):
    c = self.config
    b, n, _ = x.shape
    dh = c.dim_per_head

    def dense(features, name, bias):
      return nn.Dense(features, use_bias=bias, kernel_init=_INIT, name=name)

    y = RMSNorm(c.norm_eps, name="norm_1")(x)
    bias = c.attention_bias
    q = dense(c.num_heads * dh, "query", bias)(y).reshape(b, n, -1, dh)
    k = dense(c.kv_heads * dh, "key", bias)(y).reshape(b, n, -1, dh)
    v = dense(c.kv_heads * dh, "value", bias)(y).reshape(b, n, -1, dh)
    q, k = apply_rope(q, positions, inv_freq), apply_rope(
        k, positions, inv_freq
    )
    y = dot_product_attention(q, k, v, mask, scale=dh**-0.5)
    x = x + dense(c.hidden_size, "out", bias)(y.reshape(b, n, -1))
    y = RMSNorm(c.norm_eps, name="norm_2")(x)
    gate = dense(c.intermediate_size, "gate", c.mlp_bias)(y)
    up = dense(c.intermediate_size, "up", c.mlp_bias)(y)
    y = activation(c.activation)(gate) * up
    return x + dense(c.hidden_size, "down", c.mlp_bias)(y)


class GPT2Layer(nn.Module):
  config: Config
  index: int

  @nn.compact
  def __call__(self, x, mask):
    c = self.config
    b, n, d = x.shape
    dh = c.dim_per_head
    scale = dh**-0.5 if c.scale_attn_weights else 1.0
    if c.scale_attn_by_inverse_layer_idx:
      scale /= self.index + 1
    y = layer_norm(c.norm_eps, "norm_1")(x)
    qkv = nn.Dense(3 * d, kernel_init=_INIT, name="qkv")(y)
    q, k, v = (t.reshape(b, n, c.num_heads, dh) for t in jnp.split(qkv, 3, -1))
    y = dot_product_attention(q, k, v, mask, scale=scale)
    x = x + nn.Dense(d, kernel_init=_INIT, name="out")(y.reshape(b, n, d))
    y = layer_norm(c.norm_eps, "norm_2")(x)
    y = nn.Dense(c.intermediate_size, kernel_init=_INIT, name="fc_1")(y)
    y = activation(c.activation)(y)
    return x + nn.Dense(d, kernel_init=_INIT, name="fc_2")(y)


class LM(nn.Module):
  """Token ids -> logits ``[B, L, V]``."""

  config: Config

  @nn.compact
  def __call__(self, input_ids, attention_mask=None, position_ids=None):
    c = self.config
    ids = jnp.asarray(input_ids, jnp.int32)
    b, n = ids.shape
    if position_ids is None:
      positions = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (b, n))
    else:
      positions = jnp.broadcast_to(jnp.asarray(position_ids, jnp.int32), (b, n))
    embed = nn.Embed(
        c.vocab_size, c.hidden_size, embedding_init=_INIT, name="embed"
    )
    x = embed(ids)
    causal = jnp.tril(jnp.ones((n, n), bool))
    mask = padding_mask(attention_mask, (b, n)) & causal
    if c.family == "llama":
      inv_freq = rope_frequencies(c)
      for i in range(c.num_layers):
        x = LlamaLayer(c, name=f"layer_{i}")(x, mask, positions, inv_freq)
      x = RMSNorm(c.norm_eps, name="final_norm")(x)
    else:
      if n > c.max_positions:
        raise ValueError(
            f"sequence length {n} exceeds max_positions {c.max_positions}"
        )
      pos = nn.Embed(
          c.max_positions, c.hidden_size, embedding_init=_INIT, name="position"
      )
      x = x + pos(positions)
      for i in range(c.num_layers):
        x = GPT2Layer(c, i, name=f"layer_{i}")(x, mask)
      x = layer_norm(c.norm_eps, "final_norm")(x)
    if c.tie_embeddings:
      return embed.attend(x)
    return nn.Dense(
        c.vocab_size, use_bias=False, kernel_init=_INIT, name="lm_head"
    )(x)


def model(config: Config = Config()) -> Model:
  """The LM as a :class:`~mtx.models.Model`.

  ``init(key, input_ids)``; ``apply(params, input_ids, attention_mask=None,
  position_ids=None) -> logits [B, L, V]``.

  Raises:
    ValueError: inconsistent config.
  """
  c = config
  if c.family not in ("llama", "gpt2"):
    raise ValueError(f"family must be 'llama' or 'gpt2', got {c.family!r}")
  if c.num_heads % c.kv_heads:
    raise ValueError(
        f"num_heads {c.num_heads} is not a multiple of num_kv_heads"
        f" {c.kv_heads}"
    )
  if c.head_dim is None and c.hidden_size % c.num_heads:
    raise ValueError(
        f"hidden_size {c.hidden_size} is not divisible by num_heads"
        f" {c.num_heads}"
    )
  if c.family == "gpt2" and (c.kv_heads != c.num_heads or c.head_dim):
    raise ValueError("gpt2 has no grouped-query attention or head_dim")
  if c.rope_type not in ("default", "linear", "llama3"):
    raise ValueError(f"unknown rope_type {c.rope_type!r}")
  activation(c.activation)
  module = LM(config)

  def init(key, input_ids, attention_mask=None, position_ids=None):
    return module.init(key, input_ids, attention_mask, position_ids)["params"]

  def apply(params, input_ids, attention_mask=None, position_ids=None):
    return module.apply(
        {"params": params}, input_ids, attention_mask, position_ids
    )

  name = f"{c.family}(d{c.hidden_size},l{c.num_layers},h{c.num_heads})"
  return Model(name, init, apply, config)
