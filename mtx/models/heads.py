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

from collections.abc import Callable

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


def prototypes(
    features: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    num_classes: int,
) -> dict:
  """A nearest-class-mean head: column ``c`` is the normalised mean feature
  of class ``c`` (:func:`from_class_embeddings` of the class means).

  With L2-normalised features scaled by ``s`` (:func:`scaled_normalized`)
  its logits are ``s · cos(z, mean_c)``, the offline analogue of CLIP's
  zero-shot head.

  Args:
    features: ``[N, D]`` features.
    labels: ``[N]`` int labels in ``[0, num_classes)``.
    num_classes: C.

  Returns:
    ``{"kernel": [D, C], "bias": zeros [C]}``.

  Raises:
    ValueError: wrong shapes, labels out of range, or a class without
      examples (its prototype would be undefined).

  >>> h = prototypes(jnp.array([[2.0, 0.0], [0.0, 3.0]]), jnp.array([1, 0]), 2)
  >>> h["kernel"].tolist()
  [[0.0, 1.0], [1.0, 0.0]]
  """
  z = np.asarray(features, np.float32)
  y = np.asarray(labels)
  if z.ndim != 2 or y.shape != (z.shape[0],):
    raise ValueError(
        f"features must be [N, D] and labels [N]; got {z.shape}, {y.shape}"
    )
  if y.size and (y.min() < 0 or y.max() >= num_classes):
    raise ValueError(f"labels must lie in [0, {num_classes}); got {y.max()}")
  counts = np.bincount(y, minlength=num_classes)
  if (counts == 0).any():
    raise ValueError(
        f"classes {np.flatnonzero(counts == 0).tolist()} have no examples"
    )
  sums = np.zeros((num_classes, z.shape[1]), np.float64)
  np.add.at(sums, y, z)
  return from_class_embeddings((sums / counts[:, None]).T)


def scaled_normalized(
    apply_fn: Callable[..., jax.Array],
    logit_scale: float,
    mean: jax.typing.ArrayLike | None = None,
    std: jax.typing.ArrayLike | None = None,
) -> Callable[..., jax.Array]:
  """``apply_fn`` with features L2-normalised and multiplied by
  ``logit_scale`` (inputs optionally standardised per channel first,
  ``(x - mean) / std`` on the last axis).

  With a head of unit class embeddings (:func:`from_class_embeddings`,
  :func:`prototypes`) the logits are ``logit_scale · cos``, CLIP's
  zero-shot classifier. Same params as ``apply_fn``.

  >>> f = scaled_normalized(lambda p, x: x * p, 10.0)
  >>> f(2.0, jnp.array([[3.0, 4.0]])).tolist()
  [[6.0, 8.0]]
  """
  scale = float(logit_scale)
  if not np.isfinite(scale):
    raise ValueError(f"logit_scale must be finite, got {logit_scale!r}")
  if (mean is None) != (std is None):
    raise ValueError("pass both mean and std, or neither")
  if mean is not None:
    mean = np.asarray(mean, np.float32)
    std = np.asarray(std, np.float32)

  def apply(params, x, *rest):
    x = jnp.asarray(x)
    if mean is not None:
      x = (x - mean) / std
    return l2_normalize(apply_fn(params, x, *rest)) * scale

  return apply


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
