"""Vision Transformer encoder (Dosovitskiy et al., 2021), pre-LN.

Patch embedding, a class token, learned position embeddings, ``depth``
pre-LayerNorm blocks (multi-head self-attention, GELU MLP) and a final
LayerNorm; returns the class-token feature (``pool="cls"``) or the mean token
(``pool="gap"``), optionally projected to ``projection`` dims (as CLIP's
vision tower).

>>> import jax, jax.numpy as jnp
>>> m = model(CONFIGS["tiny"])
>>> p = m.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))
>>> m.apply(p, jnp.ones((2, 8, 8, 1))).shape
(2, 32)

References:
  https://arxiv.org/abs/2010.11929
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax.numpy as jnp

from mtx.models._base import Model
from mtx.models._base import from_linen


@dataclasses.dataclass(frozen=True)
class Config:
  """ViT config; ``patch`` in pixels, ``width`` the model dim D."""

  patch: int = 4
  width: int = 192
  depth: int = 6
  heads: int = 3
  mlp_dim: int = 768
  pool: str = "cls"  # "cls" or "gap"
  projection: int | None = None


CONFIGS = {
    "tiny": Config(patch=4, width=32, depth=2, heads=2, mlp_dim=64),
    "small": Config(patch=4, width=192, depth=6, heads=3, mlp_dim=768),
    "S/16": Config(patch=16, width=384, depth=12, heads=6, mlp_dim=1536),
    "B/32": Config(patch=32, width=768, depth=12, heads=12, mlp_dim=3072),
    "B/16": Config(patch=16, width=768, depth=12, heads=12, mlp_dim=3072),
    "L/14": Config(patch=14, width=1024, depth=24, heads=16, mlp_dim=4096),
}


class Block(nn.Module):
  width: int
  heads: int
  mlp_dim: int

  @nn.compact
  def __call__(self, x):
    y = nn.LayerNorm(name="ln_1")(x)
    y = nn.MultiHeadDotProductAttention(num_heads=self.heads, name="attention")(
        y, y
    )
    x = x + y
    y = nn.LayerNorm(name="ln_2")(x)
    y = nn.Dense(self.mlp_dim, name="fc_1")(y)
    y = nn.Dense(self.width, name="fc_2")(nn.gelu(y))
    return x + y


class ViT(nn.Module):
  config: Config

  @nn.compact
  def __call__(self, images):
    c = self.config
    x = jnp.asarray(images, jnp.float32)
    if x.ndim == 3:  # [B, H, W] -> one channel
      x = x[..., None]
    x = nn.Conv(
        c.width, (c.patch, c.patch), strides=c.patch, name="patch_embed"
    )(x)
    b, h, w, d = x.shape
    x = x.reshape(b, h * w, d)
    cls = self.param("cls", nn.initializers.zeros, (1, 1, d))
    x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, d)), x], axis=1)
    pos = self.param(
        "pos_embed", nn.initializers.normal(0.02), (1, h * w + 1, d)
    )
    x = x + pos
    for i in range(c.depth):
      x = Block(c.width, c.heads, c.mlp_dim, name=f"block_{i}")(x)
    x = nn.LayerNorm(name="ln_final")(x)
    z = x[:, 0] if c.pool == "cls" else x[:, 1:].mean(axis=1)
    if c.projection:
      z = nn.Dense(c.projection, use_bias=False, name="projection")(z)
    return z


def model(config: Config = Config()) -> Model:
  """The ViT as a :class:`~mtx.models.Model` (images ``[B, H, W(, C)]``)."""
  if config.width % config.heads:
    raise ValueError(
        f"width {config.width} is not divisible by heads {config.heads}"
    )
  if config.pool not in ("cls", "gap"):
    raise ValueError(f"pool must be 'cls' or 'gap', got {config.pool!r}")
  return from_linen(
      f"vit(p{config.patch},d{config.width},l{config.depth})",
      ViT(config),
      config,
  )
