"""CLIP: a ViT image tower and a causal text tower in one embedding space.

As Hugging Face's ``CLIPModel``. The vision tower embeds patches (no bias),
prepends a class embedding, adds learned positions, applies ``pre_norm``, then
pre-LN blocks (quick-GELU MLP); the class token goes through ``post_norm`` and
a bias-free ``projection``. The text tower adds learned positions to token
embeddings, runs causal pre-LN blocks (padding masked too), a final
LayerNorm, and pools the end-of-text token: the first position holding
``eos_token_id``, or, for configs that still say ``eos_token_id == 2`` (the
original OpenAI checkpoints), the position of the largest token id — as
``transformers``' ``CLIPTextModel`` does. Then a bias-free ``projection``.

``params = {"vision": {...}, "text": {...}, "logit_scale": []}``. Images are
``[B, H, W, C]`` (channels last). :func:`image_encoder` and
:func:`text_encoder` are Models over ``params["vision"]`` and
``params["text"]`` returning projected (unnormalised) embeddings ``[B, P]``;
:func:`model` returns ``logits_per_image = exp(logit_scale) *
cos(image, text)``, ``[B_images, B_texts]``. :func:`zero_shot_head` builds a
classification head from class names and prompt templates.

>>> import jax, jax.numpy as jnp
>>> cfg = CONFIGS["tiny"]
>>> m = model(cfg)
>>> images, ids = jnp.zeros((2, 16, 16, 3)), jnp.array([[3, 4, 127, 0]])
>>> p = m.init(jax.random.key(0), images, ids)
>>> sorted(p), m.apply(p, images, ids, jnp.array([[1, 1, 1, 0]])).shape
(['logit_scale', 'text', 'vision'], (2, 1))
>>> image_encoder(cfg).apply(p["vision"], images).shape
(2, 24)

References:
  https://arxiv.org/abs/2103.00020
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mtx.models import heads as heads_lib
from mtx.models._base import Model
from mtx.models._base import classifier
from mtx.models.bert import activation
from mtx.models.bert import dot_product_attention
from mtx.models.bert import layer_norm
from mtx.models.bert import padding_mask


@dataclasses.dataclass(frozen=True)
class VisionConfig:
  """The image tower (``CLIPVisionConfig``); ``hidden_size`` is D."""

  image_size: int = 224
  patch_size: int = 32
  num_channels: int = 3
  hidden_size: int = 768
  num_layers: int = 12
  num_heads: int = 12
  intermediate_size: int = 3072
  layer_norm_eps: float = 1e-5
  activation: str = "quick_gelu"


@dataclasses.dataclass(frozen=True)
class TextConfig:
  """The text tower (``CLIPTextConfig``).

  ``eos_token_id`` selects the pooled token: 2 means "the largest token id"
  (legacy OpenAI configs), anything else "the first ``eos_token_id``".
  """

  vocab_size: int = 49408
  max_positions: int = 77
  hidden_size: int = 512
  num_layers: int = 12
  num_heads: int = 8
  intermediate_size: int = 2048
  layer_norm_eps: float = 1e-5
  activation: str = "quick_gelu"
  eos_token_id: int = 2


@dataclasses.dataclass(frozen=True)
class Config:
  """CLIP: both towers, the shared embedding dim P and the initial scale."""

  vision: VisionConfig = VisionConfig()
  text: TextConfig = TextConfig()
  projection_dim: int = 512
  logit_scale_init: float = 2.6592  # log(1 / 0.07)


def _vit_b(patch: int) -> VisionConfig:
  return VisionConfig(patch_size=patch)


CONFIGS = {
    "tiny": Config(
        vision=VisionConfig(
            image_size=16,
            patch_size=4,
            hidden_size=32,
            num_layers=2,
            num_heads=4,
            intermediate_size=64,
        ),
        text=TextConfig(
            vocab_size=128,
            max_positions=16,
            hidden_size=32,
            num_layers=2,
            num_heads=4,
            intermediate_size=64,
            eos_token_id=127,
        ),
        projection_dim=24,
    ),
    "clip-vit-b32": Config(vision=_vit_b(32)),
    "clip-vit-b16": Config(vision=_vit_b(16)),
    "clip-vit-l14": Config(
        vision=VisionConfig(
            patch_size=14,
            hidden_size=1024,
            num_layers=24,
            num_heads=16,
            intermediate_size=4096,
        ),
        text=TextConfig(hidden_size=768, num_heads=12, intermediate_size=3072),
        projection_dim=768,
    ),
}


def _from_hf_tower(cls, hf: dict, renames: dict):
  defaults = cls()
  fields = {}
  for field in dataclasses.fields(cls):
    key = renames.get(field.name, field.name)
    fields[field.name] = hf.get(key, getattr(defaults, field.name))
  return cls(**fields)


_TOWER_RENAMES = {
    "num_layers": "num_hidden_layers",
    "num_heads": "num_attention_heads",
    "activation": "hidden_act",
    "max_positions": "max_position_embeddings",
}


def config_from_hf(hf_config: dict) -> Config:
  """A :class:`Config` from a Hugging Face ``CLIPConfig`` dict.

  Keys absent from the dict take ``transformers``' defaults (ViT-B/32), except
  ``eos_token_id`` which defaults to 2 (the original configs' value).

  >>> config_from_hf({"model_type": "clip", "projection_dim": 64}).text
  ... # doctest: +ELLIPSIS
  TextConfig(vocab_size=49408, max_positions=77, hidden_size=512, ...)

  Raises:
    ValueError: not a CLIP config.
  """
  if hf_config.get("model_type") != "clip":
    raise ValueError(
        f"not a CLIP config: model_type={hf_config.get('model_type')!r}"
    )
  return Config(
      vision=_from_hf_tower(
          VisionConfig, hf_config.get("vision_config") or {}, _TOWER_RENAMES
      ),
      text=_from_hf_tower(
          TextConfig, hf_config.get("text_config") or {}, _TOWER_RENAMES
      ),
      projection_dim=hf_config.get("projection_dim", 512),
      logit_scale_init=hf_config.get("logit_scale_init_value", 2.6592),
  )


def _init(std):
  return nn.initializers.normal(std)


class SelfAttention(nn.Module):
  """Multi-head attention: query/key/value/out Dense with biases."""

  hidden_size: int
  num_heads: int

  @nn.compact
  def __call__(self, x, mask):
    b, n, d = x.shape
    dh = self.hidden_size // self.num_heads

    def heads(name):
      y = nn.Dense(self.hidden_size, kernel_init=_init(0.02), name=name)(x)
      return y.reshape(b, n, self.num_heads, dh)

    y = dot_product_attention(
        heads("query"), heads("key"), heads("value"), mask, scale=dh**-0.5
    )
    return nn.Dense(d, kernel_init=_init(0.02), name="out")(y.reshape(b, n, -1))


class Layer(nn.Module):
  """A pre-LN block (CLIP's ``CLIPEncoderLayer``)."""

  config: VisionConfig | TextConfig

  @nn.compact
  def __call__(self, x, mask):
    c = self.config
    y = layer_norm(c.layer_norm_eps, "norm_1")(x)
    x = x + SelfAttention(c.hidden_size, c.num_heads, name="attention")(y, mask)
    y = layer_norm(c.layer_norm_eps, "norm_2")(x)
    y = nn.Dense(c.intermediate_size, kernel_init=_init(0.02), name="fc_1")(y)
    y = activation(c.activation)(y)
    return x + nn.Dense(c.hidden_size, kernel_init=_init(0.02), name="fc_2")(y)


class VisionTower(nn.Module):
  """Images ``[B, H, W, C]`` -> projected class-token embeddings ``[B, P]``."""

  config: VisionConfig
  projection_dim: int

  @nn.compact
  def __call__(self, images):
    c = self.config
    x = jnp.asarray(images)
    if x.ndim != 4 or x.shape[1:] != (
        c.image_size,
        c.image_size,
        c.num_channels,
    ):
      raise ValueError(
          f"images must be [B, {c.image_size}, {c.image_size},"
          f" {c.num_channels}] (channels last), got {x.shape}"
      )
    d = c.hidden_size
    x = nn.Conv(
        d,
        (c.patch_size, c.patch_size),
        strides=c.patch_size,
        padding="VALID",
        use_bias=False,
        kernel_init=_init(0.02),
        name="patch_embed",
    )(x)
    b = x.shape[0]
    x = x.reshape(b, -1, d)
    cls = self.param("class_embedding", _init(d**-0.5), (d,))
    x = jnp.concatenate(
        [jnp.broadcast_to(cls, (b, 1, d)).astype(x.dtype), x], 1
    )
    pos = self.param("position_embedding", _init(0.02), (x.shape[1], d))
    x = layer_norm(c.layer_norm_eps, "pre_norm")(x + pos)
    for i in range(c.num_layers):
      x = Layer(c, name=f"layer_{i}")(x, None)
    pooled = layer_norm(c.layer_norm_eps, "post_norm")(x[:, 0])
    return nn.Dense(
        self.projection_dim,
        use_bias=False,
        kernel_init=_init(d**-0.5),
        name="projection",
    )(pooled)


def eos_positions(config: TextConfig, input_ids: jax.Array) -> jax.Array:
  """The pooled (end-of-text) position of each sequence, ``[B]``.

  >>> eos_positions(TextConfig(eos_token_id=9), jnp.array([[5, 9, 0, 9]]))
  Array([1], dtype=int32)
  >>> eos_positions(TextConfig(eos_token_id=2), jnp.array([[5, 9, 0, 0]]))
  Array([1], dtype=int32)
  """
  ids = jnp.asarray(input_ids)
  if config.eos_token_id == 2:
    return jnp.argmax(ids, axis=-1).astype(jnp.int32)
  return jnp.argmax(ids == config.eos_token_id, axis=-1).astype(jnp.int32)


class TextTower(nn.Module):
  """Token ids ``[B, L]`` -> projected end-of-text embeddings ``[B, P]``."""

  config: TextConfig
  projection_dim: int

  @nn.compact
  def __call__(self, input_ids, attention_mask=None):
    c = self.config
    ids = jnp.asarray(input_ids, jnp.int32)
    b, n = ids.shape
    if n > c.max_positions:
      raise ValueError(
          f"sequence length {n} exceeds max_positions {c.max_positions}"
      )
    d = c.hidden_size
    x = nn.Embed(
        c.vocab_size, d, embedding_init=_init(0.02), name="token_embedding"
    )(ids)
    pos = self.param("position_embedding", _init(0.01), (c.max_positions, d))
    x = x + pos[:n]
    causal = jnp.tril(jnp.ones((n, n), bool))
    mask = padding_mask(attention_mask, (b, n)) & causal
    for i in range(c.num_layers):
      x = Layer(c, name=f"layer_{i}")(x, mask)
    x = layer_norm(c.layer_norm_eps, "final_norm")(x)
    pooled = x[jnp.arange(b), eos_positions(c, ids)]
    return nn.Dense(
        self.projection_dim,
        use_bias=False,
        kernel_init=_init(d**-0.5),
        name="projection",
    )(pooled)


class CLIP(nn.Module):
  """Both towers and the logit scale; returns ``logits_per_image``."""

  config: Config

  def setup(self):
    c = self.config
    self.vision = VisionTower(c.vision, c.projection_dim)
    self.text = TextTower(c.text, c.projection_dim)
    self.logit_scale = self.param(
        "logit_scale", nn.initializers.constant(c.logit_scale_init), ()
    )

  def __call__(self, images, input_ids, attention_mask=None):
    image = heads_lib.l2_normalize(self.vision(images))
    text = heads_lib.l2_normalize(self.text(input_ids, attention_mask))
    return jnp.exp(self.logit_scale) * image @ text.T


def _check(config: Config) -> None:
  for tower in (config.vision, config.text):
    if tower.hidden_size % tower.num_heads:
      raise ValueError(
          f"hidden_size {tower.hidden_size} is not divisible by num_heads"
          f" {tower.num_heads}"
      )
    activation(tower.activation)
  v = config.vision
  if v.image_size % v.patch_size:
    raise ValueError(
        f"image_size {v.image_size} is not a multiple of patch_size"
        f" {v.patch_size}"
    )


def _name(config: Config) -> str:
  v = config.vision
  return f"clip(p{v.patch_size},d{v.hidden_size},l{v.num_layers})"


def model(config: Config = Config()) -> Model:
  """CLIP as a :class:`~mtx.models.Model`.

  ``init(key, images, input_ids)``; ``apply(params, images, input_ids,
  attention_mask=None) -> logits_per_image [B_images, B_texts]``.
  """
  _check(config)
  module = CLIP(config)

  def init(key, images, input_ids, attention_mask=None):
    return module.init(key, images, input_ids, attention_mask)["params"]

  def apply(params, images, input_ids, attention_mask=None):
    return module.apply({"params": params}, images, input_ids, attention_mask)

  return Model(_name(config), init, apply, config)


def image_encoder(config: Config = Config()) -> Model:
  """The vision tower over ``params["vision"]``: images -> ``[B, P]``."""
  _check(config)
  module = VisionTower(config.vision, config.projection_dim)

  def init(key, images):
    return module.init(key, images)["params"]

  def apply(params, images):
    return module.apply({"params": params}, images)

  return Model(_name(config) + ".vision", init, apply, config)


def text_encoder(config: Config = Config()) -> Model:
  """The text tower over ``params["text"]``: ids (, mask) -> ``[B, P]``."""
  _check(config)
  module = TextTower(config.text, config.projection_dim)

  def init(key, input_ids, attention_mask=None):
    return module.init(key, input_ids, attention_mask)["params"]

  def apply(params, input_ids, attention_mask=None):
    return module.apply({"params": params}, input_ids, attention_mask)

  return Model(_name(config) + ".text", init, apply, config)


@functools.lru_cache(maxsize=8)
def _jitted_text_apply(config: Config):
  return jax.jit(text_encoder(config).apply)


Tokenize = Callable[[list[str]], "np.ndarray | tuple[np.ndarray, np.ndarray]"]


def zero_shot_head(
    config: Config,
    params,
    class_names: Sequence[str],
    templates: Sequence[str],
    tokenize: Tokenize,
) -> dict:
  """A zero-shot classification head from class names and prompt templates.

  For each class, every template (``"a photo of a {}."``) is filled with the
  class name, tokenised, embedded by the text tower and L2-normalised; the
  mean over templates is the class embedding, and
  :func:`mtx.models.heads.from_class_embeddings` normalises the columns.
  Pair it with ``classifier(image_encoder(config), C, normalize=True,
  temperature=exp(-logit_scale))`` (see :func:`zero_shot_classifier`).

  >>> import jax, jax.numpy as jnp
  >>> cfg = CONFIGS["tiny"]
  >>> text = text_encoder(cfg)  # only the text tower is needed here
  >>> p = {"text": text.init(jax.random.key(0), jnp.zeros((1, 4), int))}
  >>> tok = lambda texts: np.array([[len(t) % 100, 127] for t in texts])
  >>> head = zero_shot_head(cfg, p, ["cat", "dog", "bird"],
  ...                       ["a {}.", "a photo of a {}."], tok)
  >>> head["kernel"].shape, head["bias"].shape
  ((24, 3), (3,))

  Args:
    config: the CLIP config.
    params: CLIP params (only ``params["text"]`` is used).
    class_names: C class names.
    templates: prompt templates with one ``{}`` for the class name.
    tokenize: ``list[str] -> input_ids [N, L]`` or ``(input_ids,
      attention_mask)``, ending each sequence with the end-of-text token.

  Returns:
    ``{"kernel": [P, C], "bias": [C]}``.

  Raises:
    ValueError: no classes or templates.
  """
  if not class_names or not templates:
    raise ValueError("need at least one class name and one template")
  embed = _jitted_text_apply(config)
  columns = []
  for name in class_names:
    tokens = tokenize([t.format(name) for t in templates])
    ids, mask = tokens if isinstance(tokens, tuple) else (tokens, None)
    z = heads_lib.l2_normalize(embed(params["text"], ids, mask))
    columns.append(z.mean(axis=0))
  return heads_lib.from_class_embeddings(jnp.stack(columns, axis=1))


def zero_shot_classifier(
    config: Config,
    params,
    class_names: Sequence[str],
    templates: Sequence[str],
    tokenize: Tokenize,
) -> tuple[Model, dict]:
  """An image classifier and its params from a zero-shot head.

  Returns ``(classifier Model, {"encoder": params["vision"], "head": ...})``;
  its logits equal CLIP's ``logits_per_image`` against the class embeddings
  (``exp(logit_scale)`` times cosine similarity).
  """
  head = zero_shot_head(config, params, class_names, templates, tokenize)
  scale = float(np.exp(np.asarray(params["logit_scale"], np.float64)))
  clf = classifier(
      image_encoder(config),
      len(class_names),
      normalize=True,
      temperature=1.0 / scale,
  )
  return clf, {"encoder": params["vision"], "head": head}
