"""BERT-family text encoders: BERT, MiniLM and RoBERTa (post-LayerNorm).

Token + position (+ token-type) embeddings and a LayerNorm, then
``num_layers`` post-LN blocks (multi-head self-attention, GELU MLP), as in
Hugging Face's ``BertModel`` / ``RobertaModel``. ``apply(params, input_ids,
attention_mask=None, token_type_ids=None)`` returns the last hidden state
``[B, L, D]``; :func:`mean_pool` turns it into sentence embeddings
(sentence-transformers' mean pooling) and :func:`pooled_output` applies
BERT's tanh pooler to the first token.

``family="roberta"`` numbers positions from ``pad_token_id + 1`` and skips
padding tokens (fairseq's ``make_positions``); token types default to 0 for
both families. Real checkpoints load with :func:`mtx.io.hf.load`.

>>> import jax, jax.numpy as jnp
>>> m = model(CONFIGS["tiny"])
>>> ids = jnp.array([[5, 6, 7, 0]])
>>> p = m.init(jax.random.key(0), ids)
>>> h = m.apply(p, ids, jnp.array([[1, 1, 1, 0]]))
>>> h.shape, mean_pool(h, jnp.array([[1, 1, 1, 0]])).shape
((1, 4, 32), (1, 32))

The helpers :func:`activation`, :func:`dot_product_attention` and
:func:`layer_norm` are shared with :mod:`mtx.models.clip` and
:mod:`mtx.models.lm`.

References:
  BERT: https://arxiv.org/abs/1810.04805
  MiniLM: https://arxiv.org/abs/2002.10957
  RoBERTa: https://arxiv.org/abs/1907.11692
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from mtx.models._base import Model

_INIT = nn.initializers.normal(0.02)


def _quick_gelu(x):
  return x * jax.nn.sigmoid(1.702 * x)


# Activation names as Hugging Face configs spell them (``hidden_act``).
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_fast": lambda x: jax.nn.gelu(x, approximate=True),
    "quick_gelu": _quick_gelu,
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "tanh": jnp.tanh,
}


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
  """The activation function called ``name`` in :data:`ACTIVATIONS`.

  Raises:
    ValueError: unknown name.
  """
  if name not in ACTIVATIONS:
    raise ValueError(
        f"unknown activation {name!r}; known: {sorted(ACTIVATIONS)}"
    )
  return ACTIVATIONS[name]


def layer_norm(eps: float, name: str) -> nn.LayerNorm:
  """A LayerNorm with two-pass variance (as PyTorch), params scale and bias."""
  return nn.LayerNorm(epsilon=eps, use_fast_variance=False, name=name)


def dot_product_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: jax.Array | None = None,
    *,
    scale: float,
) -> jax.Array:
  """Softmax attention over heads laid out ``[B, L, H, Dh]``.

  ``softmax(scale * q k^T)`` in float32 with masked keys excluded, times
  ``v``. Grouped-query attention: ``k``/``v`` may have fewer heads ``Hkv``
  dividing ``H``; query head ``h`` reads key/value head ``h // (H / Hkv)``.

  Args:
    q: queries ``[B, Lq, H, Dh]``.
    k: keys ``[B, Lk, Hkv, Dh]``.
    v: values ``[B, Lk, Hkv, Dv]``.
    mask: boolean, broadcastable to ``[B, H, Lq, Lk]``; True = attend.
    scale: multiplies the logits (usually ``Dh ** -0.5``).

  Returns:
    ``[B, Lq, H, Dv]`` in ``v``'s dtype.
  """
  heads, kv_heads = q.shape[-2], k.shape[-2]
  if heads != kv_heads:
    k = jnp.repeat(k, heads // kv_heads, axis=-2)
    v = jnp.repeat(v, heads // kv_heads, axis=-2)
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) * scale
  if mask is not None:
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
  weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  return jnp.einsum("bhqk,bkhd->bqhd", weights, v)


def padding_mask(attention_mask: jax.Array | None, shape) -> jax.Array:
  """``[B, L]`` 0/1 (or None = all ones) -> boolean ``[B, 1, 1, L]``."""
  if attention_mask is None:
    return jnp.ones((shape[0], 1, 1, shape[1]), bool)
  return jnp.asarray(attention_mask).astype(bool)[:, None, None, :]


@dataclasses.dataclass(frozen=True)
class Config:
  """BERT / RoBERTa encoder config (Hugging Face names in comments).

  Attributes:
    family: ``"bert"`` (positions 0..L-1) or ``"roberta"`` (positions from
      ``pad_token_id + 1``, padding tokens at ``pad_token_id``).
    vocab_size: V.
    hidden_size: model dim D (``hidden_size``).
    num_layers: blocks (``num_hidden_layers``).
    num_heads: attention heads (``num_attention_heads``).
    intermediate_size: MLP hidden dim.
    max_positions: position table rows (``max_position_embeddings``).
    type_vocab_size: token-type table rows.
    layer_norm_eps: LayerNorm epsilon.
    activation: MLP activation (``hidden_act``), a key of
      :data:`ACTIVATIONS`.
    pad_token_id: the padding token (RoBERTa position numbering).
    pooler: whether params carry the tanh pooler (``pooler.dense``).
  """

  family: str = "bert"
  vocab_size: int = 30522
  hidden_size: int = 768
  num_layers: int = 12
  num_heads: int = 12
  intermediate_size: int = 3072
  max_positions: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12
  activation: str = "gelu"
  pad_token_id: int = 0
  pooler: bool = True


CONFIGS = {
    "tiny": Config(
        vocab_size=128,
        hidden_size=32,
        num_layers=2,
        num_heads=4,
        intermediate_size=64,
        max_positions=64,
    ),
    "tiny-roberta": Config(
        family="roberta",
        vocab_size=128,
        hidden_size=32,
        num_layers=2,
        num_heads=4,
        intermediate_size=64,
        max_positions=66,
        type_vocab_size=1,
        layer_norm_eps=1e-5,
        pad_token_id=1,
    ),
    "bert-base": Config(),
    "bert-large": Config(
        hidden_size=1024, num_layers=24, num_heads=16, intermediate_size=4096
    ),
    # nreimers/MiniLM-L6-H384-uncased, the encoder of all-MiniLM-L6-v2.
    "minilm-l6": Config(
        hidden_size=384, num_layers=6, num_heads=12, intermediate_size=1536
    ),
    "minilm-l12": Config(
        hidden_size=384, num_layers=12, num_heads=12, intermediate_size=1536
    ),
    "roberta-base": Config(
        family="roberta",
        vocab_size=50265,
        max_positions=514,
        type_vocab_size=1,
        layer_norm_eps=1e-5,
        pad_token_id=1,
    ),
    "roberta-large": Config(
        family="roberta",
        vocab_size=50265,
        hidden_size=1024,
        num_layers=24,
        num_heads=16,
        intermediate_size=4096,
        max_positions=514,
        type_vocab_size=1,
        layer_norm_eps=1e-5,
        pad_token_id=1,
    ),
}

_HF_TYPES = {"bert": "bert", "roberta": "roberta", "xlm-roberta": "roberta"}


def config_from_hf(hf_config: dict) -> Config:
  """A :class:`Config` from a Hugging Face ``config.json`` dict.

  Keys absent from the dict take ``BertConfig`` / ``RobertaConfig``
  defaults. ``pooler`` is left True (:func:`mtx.io.hf.load` turns it off
  for checkpoints saved without the pooler).

  >>> config_from_hf({"model_type": "roberta", "hidden_size": 32,
  ...                 "num_attention_heads": 4}).pad_token_id
  1

  Raises:
    ValueError: not a BERT/RoBERTa encoder config, or an unsupported variant
      (relative position embeddings, decoder or cross-attention).
  """
  model_type = hf_config.get("model_type")
  if model_type not in _HF_TYPES:
    raise ValueError(
        f"not a BERT-family config: model_type={model_type!r}; expected one"
        f" of {sorted(_HF_TYPES)}"
    )
  family = _HF_TYPES[model_type]
  pos_type = hf_config.get("position_embedding_type", "absolute")
  if pos_type != "absolute":
    raise ValueError(f"position_embedding_type={pos_type!r} is not supported")
  for key in ("is_decoder", "add_cross_attention"):
    if hf_config.get(key):
      raise ValueError(f"{key}=True is not supported (encoder only)")
  roberta = family == "roberta"
  get = hf_config.get
  return Config(
      family=family,
      vocab_size=get("vocab_size", 50265 if roberta else 30522),
      hidden_size=get("hidden_size", 768),
      num_layers=get("num_hidden_layers", 12),
      num_heads=get("num_attention_heads", 12),
      intermediate_size=get("intermediate_size", 3072),
      max_positions=get("max_position_embeddings", 512),
      type_vocab_size=get("type_vocab_size", 2),
      layer_norm_eps=get("layer_norm_eps", 1e-12),
      activation=get("hidden_act", "gelu"),
      pad_token_id=get("pad_token_id", 1 if roberta else 0),
  )


class SelfAttention(nn.Module):
  """Multi-head self-attention with separate query/key/value/out Dense."""

  hidden_size: int
  num_heads: int

  @nn.compact
  def __call__(self, x, mask):
    b, n, d = x.shape
    dh = self.hidden_size // self.num_heads

    def heads(name):
      y = nn.Dense(self.hidden_size, kernel_init=_INIT, name=name)(x)
      return y.reshape(b, n, self.num_heads, dh)

    y = dot_product_attention(
        heads("query"), heads("key"), heads("value"), mask, scale=dh**-0.5
    )
    return nn.Dense(d, kernel_init=_INIT, name="out")(y.reshape(b, n, -1))


class Layer(nn.Module):
  """A post-LN encoder block."""

  config: Config

  @nn.compact
  def __call__(self, x, mask):
    c = self.config
    y = SelfAttention(c.hidden_size, c.num_heads, name="attention")(x, mask)
    x = layer_norm(c.layer_norm_eps, "attention_norm")(y + x)
    y = nn.Dense(c.intermediate_size, kernel_init=_INIT, name="fc_1")(x)
    y = nn.Dense(c.hidden_size, kernel_init=_INIT, name="fc_2")(
        activation(c.activation)(y)
    )
    return layer_norm(c.layer_norm_eps, "mlp_norm")(y + x)


def position_ids(config: Config, input_ids: jax.Array) -> jax.Array:
  """Position ids ``[B, L]``: ``0..L-1`` (BERT) or RoBERTa's numbering.

  >>> cfg = CONFIGS["tiny-roberta"]  # pad_token_id = 1
  >>> position_ids(cfg, jnp.array([[0, 5, 6, 1, 1]])).tolist()
  [[2, 3, 4, 1, 1]]
  """
  ids = jnp.asarray(input_ids)
  if config.family == "roberta":
    keep = (ids != config.pad_token_id).astype(jnp.int32)
    return jnp.cumsum(keep, axis=1) * keep + config.pad_token_id
  return jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)


class Bert(nn.Module):
  """Embeddings, post-LN blocks; returns the last hidden state."""

  config: Config

  @nn.compact
  def __call__(self, input_ids, attention_mask=None, token_type_ids=None):
    c = self.config
    ids = jnp.asarray(input_ids, jnp.int32)
    if ids.shape[1] > c.max_positions - (
        c.pad_token_id + 1 if c.family == "roberta" else 0
    ):
      raise ValueError(
          f"sequence length {ids.shape[1]} exceeds the position table"
          f" ({c.max_positions} rows, family {c.family!r})"
      )
    if token_type_ids is None:
      token_type_ids = jnp.zeros_like(ids)
    d = c.hidden_size

    def embed(rows, name):
      return nn.Embed(rows, d, embedding_init=_INIT, name=name)

    x = embed(c.vocab_size, "word")(ids)
    x = x + embed(c.type_vocab_size, "token_type")(token_type_ids)
    x = x + embed(c.max_positions, "position")(position_ids(c, ids))
    x = layer_norm(c.layer_norm_eps, "embed_norm")(x)
    mask = padding_mask(attention_mask, ids.shape)
    for i in range(c.num_layers):
      x = Layer(c, name=f"layer_{i}")(x, mask)
    if c.pooler and self.is_initializing():
      nn.Dense(d, kernel_init=_INIT, name="pooler")(x[:, 0])
    return x


def pooled_output(params, hidden: jax.Array) -> jax.Array:
  """BERT's pooler: ``tanh(hidden[:, 0] @ kernel + bias)`` ``[B, D]``.

  Args:
    params: the encoder params (with a ``"pooler"`` entry).
    hidden: the last hidden state ``[B, L, D]``.
  """
  if "pooler" not in params:
    raise ValueError("params have no 'pooler' (config.pooler=False)")
  p = params["pooler"]
  return jnp.tanh(hidden[:, 0] @ p["kernel"] + p["bias"])


def mean_pool(hidden: jax.Array, mask: jax.Array | None = None) -> jax.Array:
  """Mean over non-padding tokens: ``[B, L, D]``, ``[B, L]`` -> ``[B, D]``.

  As sentence-transformers' mean pooling (the count is clamped at 1e-9).

  >>> mean_pool(jnp.arange(6.0).reshape(1, 3, 2), jnp.array([[1, 1, 0]]))
  Array([[1., 2.]], dtype=float32)
  """
  if mask is None:
    return hidden.mean(axis=1)
  m = jnp.asarray(mask, hidden.dtype)[..., None]
  return (hidden * m).sum(axis=1) / jnp.maximum(m.sum(axis=1), 1e-9)


def model(config: Config = Config()) -> Model:
  """The encoder as a :class:`~mtx.models.Model`.

  ``init(key, input_ids)``; ``apply(params, input_ids, attention_mask=None,
  token_type_ids=None) -> [B, L, D]`` (``attention_mask`` 1 = token,
  0 = padding).

  Raises:
    ValueError: inconsistent config.
  """
  if config.family not in ("bert", "roberta"):
    raise ValueError(
        f"family must be 'bert' or 'roberta', got {config.family!r}"
    )
  if config.hidden_size % config.num_heads:
    raise ValueError(
        f"hidden_size {config.hidden_size} is not divisible by num_heads"
        f" {config.num_heads}"
    )
  activation(config.activation)
  module = Bert(config)

  def init(key, input_ids, attention_mask=None, token_type_ids=None):
    return module.init(key, input_ids, attention_mask, token_type_ids)["params"]

  def apply(params, input_ids, attention_mask=None, token_type_ids=None):
    return module.apply(
        {"params": params}, input_ids, attention_mask, token_type_ids
    )

  name = (
      f"{config.family}(d{config.hidden_size},l{config.num_layers},"
      f"h{config.num_heads})"
  )
  return Model(name, init, apply, config)
