"""A small convolutional encoder (conv-norm-act blocks, global pooling).

>>> import jax, jax.numpy as jnp
>>> m = model(CONFIGS["tiny"])
>>> p = m.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))
>>> m.apply(p, jnp.ones((2, 8, 8, 1))).shape
(2, 32)
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax.numpy as jnp

from mtx.models._base import Model
from mtx.models._base import from_linen


@dataclasses.dataclass(frozen=True)
class Config:
  """CNN config: 3x3 conv stages (each halves the resolution after the
  first), GroupNorm, ReLU, global average pooling, then a dense feature
  layer of width ``features``."""

  channels: tuple[int, ...] = (32, 64, 128)
  features: int = 128
  groups: int = 8


CONFIGS = {
    "tiny": Config(channels=(8, 16), features=32, groups=4),
    "small": Config(),
}


class CNN(nn.Module):
  config: Config

  @nn.compact
  def __call__(self, x):
    c = self.config
    x = jnp.asarray(x, jnp.float32)
    if x.ndim == 3:  # [B, H, W] -> one channel
      x = x[..., None]
    for i, ch in enumerate(c.channels):
      stride = 1 if i == 0 else 2
      x = nn.Conv(ch, (3, 3), strides=stride, name=f"conv_{i}")(x)
      x = nn.GroupNorm(num_groups=min(c.groups, ch), name=f"norm_{i}")(x)
      x = nn.relu(x)
    x = x.mean(axis=(1, 2))
    return nn.relu(nn.Dense(c.features, name="proj")(x))


def model(config: Config = Config()) -> Model:
  """The CNN as a :class:`~mtx.models.Model` (images ``[B, H, W(, C)]``)."""
  if not config.channels or config.features < 1:
    raise ValueError(f"bad CNN config {config}")
  return from_linen(f"cnn{config.channels}", CNN(config), config)
