"""Intermediate values of a model's forward pass, by parameter path.

:func:`dense_inputs` records what every ``flax.linen.Dense`` layer receives,
keyed by the path of its kernel, e.g. for RegMean's Gram matrices
(``mtx.merging.get("regmean", grams=...)``).

>>> import jax, jax.numpy as jnp
>>> from mtx import models
>>> m = models.get("mlp", hidden=(4,))
>>> p = m.init(jax.random.key(0), jnp.zeros((1, 3)))
>>> _, inputs = dense_inputs(m.apply, p, jnp.ones((2, 3)))
>>> {k: v.shape for k, v in inputs.items()}
{'dense_0/kernel': (2, 3)}
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax


def dense_inputs(
    apply_fn: Callable[..., Any], params: Any, *inputs: Any
) -> tuple[Any, dict[str, jax.Array]]:
  """Runs ``apply_fn(params, *inputs)`` recording every Dense layer's input.

  Works for any model whose ``apply`` calls a flax.linen module (every
  :mod:`mtx.models` model), under ``jax.jit`` too (the recorded values are
  returned, not stored).

  Returns:
    ``(outputs, {"<module path>/kernel": input [..., d_in]})``; a layer
    called several times keeps its last input. Paths are relative to the
    module's params (prefix them when the params sit in a larger tree).
  """
  captured = {}

  def interceptor(next_fun, args, kwargs, context):
    if isinstance(context.module, nn.Dense) and context.method_name == (
        "__call__"
    ):
      captured["/".join(context.module.path) + "/kernel"] = args[0]
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(interceptor):
    out = apply_fn(params, *inputs)
  return out, captured
