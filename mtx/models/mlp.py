"""A multilayer perceptron encoder over flattened inputs.

>>> import jax, jax.numpy as jnp
>>> m = model(Config(hidden=(8, 4)))
>>> p = m.init(jax.random.key(0), jnp.zeros((1, 3, 3)))
>>> sorted(p), m.apply(p, jnp.ones((5, 3, 3))).shape
(['dense_0', 'dense_1'], (5, 4))
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax.numpy as jnp

from mtx.models._base import Model
from mtx.models._base import from_linen

_ACTIVATIONS = {"relu": nn.relu, "gelu": nn.gelu, "tanh": jnp.tanh}


@dataclasses.dataclass(frozen=True)
class Config:
  """MLP config: ``hidden`` widths; the last one is the feature size."""

  hidden: tuple[int, ...] = (256, 256)
  activation: str = "gelu"
  layer_norm: bool = False


CONFIGS = {
    "tiny": Config(hidden=(32, 32)),
    "small": Config(hidden=(256, 256)),
    "base": Config(hidden=(1024, 1024, 512)),
}


class MLP(nn.Module):
  config: Config

  @nn.compact
  def __call__(self, x):
    c = self.config
    x = jnp.asarray(x, jnp.float32)
    x = x.reshape(x.shape[0], -1)
    for i, width in enumerate(c.hidden):
      x = nn.Dense(width, name=f"dense_{i}")(x)
      if c.layer_norm:
        x = nn.LayerNorm(name=f"norm_{i}")(x)
      x = _ACTIVATIONS[c.activation](x)
    return x


def model(config: Config = Config()) -> Model:
  """The MLP as a :class:`~mtx.models.Model` (inputs ``[B, ...]``)."""
  if config.activation not in _ACTIVATIONS:
    raise ValueError(
        f"unknown activation {config.activation!r}; known:"
        f" {sorted(_ACTIVATIONS)}"
    )
  if not config.hidden or min(config.hidden) < 1:
    raise ValueError(f"hidden widths must be positive, got {config.hidden}")
  return from_linen(f"mlp{config.hidden}", MLP(config), config)
