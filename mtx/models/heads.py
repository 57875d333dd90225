"""Linear classification heads as plain param dicts.

A head is ``{"kernel": [D, C], "bias": [C]}``; ``apply(head, z) = z @ kernel +
bias``. Heads are fitted, frozen or built from class embeddings (the CLIP
zero-shot head) separately from the encoder.

>>> import jax.numpy as jnp
>>> h = from_class_embeddings(jnp.eye(3)[:, :2] * 2.0)
>>> apply(h, jnp.array([[1.0, 0.0, 0.0]])).tolist()
[[1.0, 0.0]]
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def zeros(dim: int, num_classes: int, dtype=jnp.float32) -> dict:
  """A zero head (a common start before fitting)."""
  return {
      "kernel": jnp.zeros((dim, num_classes), dtype),
      "bias": jnp.zeros((num_classes,), dtype),
  }


def apply(head: dict, z: jax.Array) -> jax.Array:
  """Logits ``z @ kernel + bias``."""
  return z @ head["kernel"] + head["bias"]


def l2_normalize(z: jax.Array, eps: float = 1e-8) -> jax.Array:
  """``z / ||z||`` along the last axis."""
  return z / jnp.maximum(jnp.linalg.norm(z, axis=-1, keepdims=True), eps)


def from_class_embeddings(embeddings: jax.Array) -> dict:
  """A zero-shot head from per-class embeddings ``[D, C]``.

  Each column is L2-normalised (CLIP's text-derived classifier); the bias is 0.
  Use with normalised features (``classifier(..., normalize=True)``).
  """
  e = jnp.asarray(embeddings, jnp.float32)
  e = e / jnp.maximum(jnp.linalg.norm(e, axis=0, keepdims=True), 1e-8)
  return {"kernel": e, "bias": jnp.zeros((e.shape[1],), jnp.float32)}


def fit_logistic(
    features: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    *,
    l2: float = 1e-4,
    steps: int = 500,
    learning_rate: float = 1.0,
) -> dict:
  """Fits a multinomial logistic-regression head on fixed features.

  Full-batch gradient descent with Nesterov momentum on the mean cross-entropy
  plus ``l2 * ||kernel||²``; deterministic. Used to build a task's frozen head
  from pretrained features (the offline analogue of a zero-shot head).

  Args:
    features: ``[N, D]`` float features.
    labels: ``[N]`` int labels in ``[0, num_classes)``.
    num_classes: C.
    l2: weight decay on the kernel.
    steps: gradient steps.
    learning_rate: step size in units of 1/L (L the loss's smoothness
      bound), so the default is stable for any feature scale.

  Returns:
    A head dict ``{"kernel": [D, C], "bias": [C]}``.
  """
  import optax  # pylint: disable=g-import-not-at-top

  x = jnp.asarray(features, jnp.float32)
  y = jnp.asarray(labels, jnp.int32)
  if x.ndim != 2 or y.shape != (x.shape[0],):
    raise ValueError(
        f"features must be [N, D] and labels [N]; got {x.shape}, {y.shape}"
    )
  # The loss is L-smooth with L <= 0.5 * mean ||z||^2 + 2 * l2; step 1/L is
  # stable whatever the feature scale.
  smooth = 0.5 * float(jnp.mean(jnp.sum(x * x, axis=1))) + 2 * l2
  opt = optax.sgd(learning_rate / smooth, momentum=0.9, nesterov=True)

  def loss(h):
    logits = apply(h, x)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return ce + l2 * jnp.sum(h["kernel"] ** 2)

  @jax.jit
  def run(h):
    def step(carry, _):
      h, s = carry
      g = jax.grad(loss)(h)
      u, s = opt.update(g, s, h)
      return (optax.apply_updates(h, u), s), None

    (h, _), _ = jax.lax.scan(step, (h, opt.init(h)), None, length=steps)
    return h

  return run(zeros(x.shape[1], num_classes))
