"""Pure pieces of a fine-tuning loop: optimizer, loss, train/eval steps.

The loop itself (data, checkpoints, logging) lives in
``experiments/finetune.py``; everything here is a pure function so the same
steps serve the binary, the benchmark suite and user code.

A train step updates ``params`` of ``apply(params, images) -> logits``; with
``linearized=True`` the model is its first-order Taylor expansion around
``params0`` (:func:`mtx.ntk.linearize`), and ``params0`` is an argument of
the step, never a compiled-in constant.

>>> import jax, jax.numpy as jnp, optax
>>> apply = lambda p, x: x @ p["w"]
>>> opt = make_optimizer(learning_rate=0.1, steps=10, warmup_steps=0)
>>> step = make_train_step(apply, opt)
>>> p = {"w": jnp.zeros((2, 3))}
>>> s = opt.init(p)
>>> x, y = jnp.ones((4, 2)), jnp.array([0, 1, 2, 0])
>>> p, s, m = step(p, s, p, x, y, jax.random.key(0))
>>> sorted(m)
['grad_norm', 'loss']
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mtx import ntk
from mtx import tree as mtree

PyTree = Any


def make_optimizer(
    *,
    learning_rate: float,
    steps: int,
    warmup_steps: int = 0,
    weight_decay: float = 0.0,
    clip_norm: float | None = 1.0,
    trainable: PyTree | None = None,
    b1: float = 0.9,
    b2: float = 0.999,
) -> optax.GradientTransformation:
  """AdamW with linear warm-up + cosine decay and global-norm clipping.

  Args:
    learning_rate: peak learning rate (after warm-up).
    steps: total steps (the cosine decays to 0 at ``steps``).
    warmup_steps: linear warm-up from 0.
    weight_decay: decoupled weight decay, applied to leaves with ndim >= 2
      (kernels, embeddings), not to biases and norm scales.
    clip_norm: clip the global gradient norm (of the trainable leaves) to
      this; ``None`` disables clipping.
    trainable: optional tree of bools (same structure as the params; see
      :func:`mtx.tree.select`); ``False`` leaves are frozen (zero updates,
      no optimizer state).

  Returns:
    An ``optax.GradientTransformation``.
  """
  if steps < 1 or not 0 <= warmup_steps < steps:
    raise ValueError(
        f"need 0 <= warmup_steps ({warmup_steps}) < steps ({steps})"
    )
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, learning_rate, warmup_steps, steps
  )
  adamw = optax.adamw(
      schedule,
      b1=b1,
      b2=b2,
      weight_decay=weight_decay,
      mask=lambda p: jax.tree.map(lambda x: jnp.ndim(x) >= 2, p),
  )
  opt = optax.chain(
      optax.clip_by_global_norm(clip_norm) if clip_norm else optax.identity(),
      adamw,
  )
  if trainable is None:
    return opt
  labels = jax.tree.map(lambda t: "train" if t else "freeze", trainable)
  return optax.multi_transform(
      {"train": opt, "freeze": optax.set_to_zero()}, labels
  )


def cross_entropy(
    logits: jax.Array, labels: jax.Array, *, label_smoothing: float = 0.0
) -> jax.Array:
  """Mean softmax cross-entropy with optional label smoothing (float32)."""
  logits = logits.astype(jnp.float32)
  targets = jax.nn.one_hot(labels, logits.shape[-1])
  if label_smoothing:
    targets = optax.smooth_labels(targets, label_smoothing)
  return optax.softmax_cross_entropy(logits, targets).mean()


def model_fn(
    apply_fn: Callable[..., Any],
    *,
    linearized: bool = False,
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
) -> Callable[..., Any]:
  """``f(params0, params, *inputs)``: the model or its linearisation.

  Non-linear: ``params0`` is ignored. Linearised: the Taylor expansion in
  the leaves selected by ``include``/``exclude`` (:func:`mtx.ntk.linearize`).
  """
  if linearized:
    return ntk.linearize(apply_fn, include=include, exclude=exclude)
  return lambda params0, params, *inputs: apply_fn(params, *inputs)


def make_train_step(
    apply_fn: Callable[..., Any],
    optimizer: optax.GradientTransformation,
    *,
    linearized: bool = False,
    linearize_include: str | Sequence[str] | None = None,
    linearize_exclude: str | Sequence[str] | None = None,
    label_smoothing: float = 0.0,
    augment: Callable[[jax.Array, jax.Array], jax.Array] | None = None,
    jit: bool = True,
) -> Callable[..., Any]:
  """One optimizer step of classification fine-tuning.

  Returns ``step(params, opt_state, params0, images, labels, key) ->
  (params, opt_state, metrics)``, jitted with ``params``/``opt_state``
  donated. ``key`` drives the augmentation (``augment(key, images)``).
  """
  f = model_fn(
      apply_fn,
      linearized=linearized,
      include=linearize_include,
      exclude=linearize_exclude,
  )

  def step(params, opt_state, params0, images, labels, key):
    if augment is not None:
      images = augment(key, images)

    def loss_fn(p):
      return cross_entropy(
          f(params0, p, images), labels, label_smoothing=label_smoothing
      )

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    return params, opt_state, {"loss": loss, "grad_norm": mtree.l2_norm(grads)}

  return jax.jit(step, donate_argnums=(0, 1)) if jit else step


def make_eval_step(
    apply_fn: Callable[..., Any],
    *,
    linearized: bool = False,
    linearize_include: str | Sequence[str] | None = None,
    linearize_exclude: str | Sequence[str] | None = None,
) -> Callable[..., Any]:
  """``eval_step(params0, params, images, labels, weights)``.

  Returns the weighted number of correct predictions and the weighted sum
  of losses (weights 0 mark padding).
  """
  f = model_fn(
      apply_fn,
      linearized=linearized,
      include=linearize_include,
      exclude=linearize_exclude,
  )

  @jax.jit
  def eval_step(params0, params, images, labels, weights):
    logits = f(params0, params, images).astype(jnp.float32)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    hit = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
    return jnp.sum(weights * hit), jnp.sum(weights * ce)

  return eval_step


def evaluate(
    eval_step: Callable[..., Any],
    params0: PyTree,
    params: PyTree,
    images: np.ndarray,
    labels: np.ndarray,
    *,
    batch_size: int = 512,
) -> dict[str, float]:
  """Accuracy and mean loss over a whole split, in fixed-size batches.

  The last batch is padded to ``batch_size`` with weight-0 examples, so one
  compiled program serves every batch.
  """
  n = len(labels)
  if n == 0:
    raise ValueError("cannot evaluate on an empty split")
  bs = min(batch_size, n)
  correct, loss = 0.0, 0.0
  for i in range(0, n, bs):
    x, y = images[i : i + bs], labels[i : i + bs]
    w = np.ones(bs, np.float32)
    if len(y) < bs:  # pad to one compiled shape; padding has weight 0
      w[len(y) :] = 0.0
      x = np.concatenate([x, np.zeros((bs - len(y), *x.shape[1:]), x.dtype)])
      y = np.concatenate([y, np.zeros(bs - len(y), y.dtype)])
    c, l_ = eval_step(params0, params, x, y, w)
    correct += float(c)
    loss += float(l_)
  return {"accuracy": correct / n, "loss": loss / n}
