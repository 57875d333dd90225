"""The Model pair and the encoder + head classifier."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from mtx.models import heads as heads_lib


class Model(NamedTuple):
  """A model as two pure functions.

  Attributes:
    name: a short description (model family and preset).
    init: ``init(key, *example_inputs) -> params``.
    apply: ``apply(params, *inputs) -> outputs``.
    config: the model's config dataclass (or ``None``).
  """

  name: str
  init: Callable[..., Any]
  apply: Callable[..., Any]
  config: Any = None


def from_linen(name: str, module, config=None) -> Model:
  """Wraps a deterministic flax.linen module as a :class:`Model`."""

  def init(key, *inputs):
    return module.init(key, *inputs)["params"]

  def apply(params, *inputs):
    return module.apply({"params": params}, *inputs)

  return Model(name, init, apply, config)


def classifier(
    encoder: Model,
    num_classes: int,
    *,
    normalize: bool = False,
    temperature: float = 1.0,
) -> Model:
  """An encoder followed by a linear head, with separate param subtrees.

  ``params = {"encoder": encoder params, "head": {"kernel": [D, C],
  "bias": [C]}}``; ``apply`` returns logits ``[..., C]``. With
  ``normalize=True`` features are L2-normalised before the head and the logits
  divided by ``temperature`` (a CLIP-style zero-shot head).

  Args:
    encoder: a :class:`Model` returning features ``[..., D]``.
    num_classes: number of outputs C.
    normalize: L2-normalise features before the head.
    temperature: logits are divided by this (only with ``normalize``).

  Returns:
    The classifier :class:`Model`; ``init(key, *inputs)`` initialises the
    encoder and a zero head.
  """
  if num_classes < 1:
    raise ValueError(f"num_classes must be >= 1, got {num_classes}")

  def features(params, *inputs):
    z = encoder.apply(params["encoder"], *inputs)
    if normalize:
      z = heads_lib.l2_normalize(z)
    return z

  def init(key, *inputs):
    enc = encoder.init(key, *inputs)
    dim = jax.eval_shape(encoder.apply, enc, *inputs).shape[-1]
    return {"encoder": enc, "head": heads_lib.zeros(dim, num_classes)}

  def apply(params, *inputs):
    logits = heads_lib.apply(params["head"], features(params, *inputs))
    return logits / temperature if normalize else logits

  model = Model(
      f"{encoder.name}+head{num_classes}", init, apply, encoder.config
  )
  return model


def count_params(params) -> int:
  """Total number of scalar parameters in a pytree."""
  return sum(int(jnp.size(x)) for x in jax.tree.leaves(params))
