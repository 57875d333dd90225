"""Data statistics that data-driven merges consume.

* :func:`fisher_diagonal`: the empirical diagonal Fisher information of a
  model, the mean over examples of squared per-example gradients of the
  loss (Fisher merging, Matena & Raffel 2022, arXiv:2111.09832).
* :func:`gram_matrices`: ``XᵀX / N`` of every linear layer's inputs
  (RegMean, Jin et al. 2023, arXiv:2212.09849).

Both are pure functions of params and arrays: examples are processed in
batches of one compiled shape (the last batch is padded and its padding
weighted out), so any number of examples gives the exact mean.

>>> import jax.numpy as jnp
>>> loss = lambda p, ex: 0.5 * (p["w"] * ex[0] - ex[1]) ** 2
>>> f = fisher_diagonal(loss, {"w": jnp.float32(1.0)},
...                     (jnp.array([1.0, 2.0]), jnp.array([0.0, 0.0])))
>>> float(f["w"])  # mean of (w x² - x y)²: (1 + 16) / 2
8.5
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any


def _num_examples(inputs: PyTree) -> int:
  leaves = jax.tree.leaves(inputs)
  if not leaves:
    raise ValueError("inputs has no arrays")
  n = {np.shape(x)[0] if np.ndim(x) else None for x in leaves}
  if len(n) != 1 or None in n:
    raise ValueError(
        "every input array needs the same leading example axis; got"
        f" {sorted(map(str, n))}"
    )
  (count,) = n
  if count == 0:
    raise ValueError("inputs has no examples")
  return count


def _batches(inputs: PyTree, batch_size: int):
  """``(batch, weights)`` pairs of one shape; the last batch zero-padded."""
  if int(batch_size) < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
  n = _num_examples(inputs)
  bs = min(int(batch_size), n)
  for i in range(0, n, bs):
    take = min(bs, n - i)

    def cut(x, i=i, take=take):
      x = np.asarray(x)[i : i + take]
      pad = [(0, bs - take)] + [(0, 0)] * (x.ndim - 1)
      return np.pad(x, pad)

    w = np.zeros(bs, np.float32)
    w[:take] = 1.0
    yield jax.tree.map(cut, inputs), w


@functools.partial(jax.jit, static_argnums=0)
def _fisher_step(loss_fn, total, params, batch, w, args):
  g = jax.vmap(jax.grad(loss_fn), (None, 0) + (None,) * len(args))(
      params, batch, *args
  )
  return jax.tree.map(
      lambda t, a: t
      + jnp.einsum("n,n...->...", w, jnp.square(a.astype(jnp.float32))),
      total,
      g,
  )


def fisher_diagonal(
    loss_fn: Callable[..., jax.Array],
    params: PyTree,
    inputs: PyTree,
    *args: Any,
    batch_size: int = 32,
) -> PyTree:
  """The empirical diagonal Fisher ``mean_i (∇θ loss(θ, x_i))²``.

  Args:
    loss_fn: ``loss_fn(params, example, *args) -> scalar``, the loss of ONE
      example (e.g. the negative log-likelihood of its label); ``example`` is
      a slice of ``inputs`` without the example axis.
    params: the point at which the gradients are taken (w.r.t. these only).
    inputs: a pytree of arrays with a common leading example axis ``N``.
    *args: further arguments of ``loss_fn`` (a frozen head, a linearisation
      point), traced: calls with the same ``loss_fn`` and shapes share one
      compiled program.
    batch_size: examples per compiled step (memory, not the result).

  Returns:
    A tree like ``params`` (float32 leaves) of mean squared gradients.

  Raises:
    ValueError: no examples, or inputs without a common example axis.
  """
  n = _num_examples(inputs)
  total = jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), jnp.float32), params)
  for batch, w in _batches(inputs, batch_size):
    total = _fisher_step(loss_fn, total, params, batch, jnp.asarray(w), args)
  return jax.tree.map(lambda t: t / n, total)


@functools.partial(jax.jit, static_argnums=0)
def _gram_step(inputs_fn, total, params, xb, w):
  out = {}
  for k, h in inputs_fn(params, xb).items():
    h = h.reshape(h.shape[0], -1, h.shape[-1]).astype(jnp.float32)
    g = jnp.einsum("npi,npj->ij", h * w[:, None, None], h)
    out[k] = (total[k][0] + g, total[k][1] + jnp.sum(w) * h.shape[1])
  return out


def gram_matrices(
    inputs_fn: Callable[[PyTree, jax.Array], dict[str, jax.Array]],
    params: PyTree,
    x: jax.typing.ArrayLike,
    *,
    batch_size: int = 256,
) -> dict[str, jax.Array]:
  """``{layer: XᵀX / N}`` of every linear layer's inputs ``X`` (RegMean).

  Args:
    inputs_fn: ``inputs_fn(params, x) -> {layer path: inputs [B, ..., d]}``,
      each layer's input for a batch ``x`` with the example axis first (e.g.
      ``lambda p, x: mtx.models.intermediates.dense_inputs(apply, p, x)[1]``).
      Every position (token, patch) of an example is a row of ``X``. Calls
      with the same ``inputs_fn`` and shapes share one compiled program.
    params: the model's params.
    x: ``[N, ...]`` examples.
    batch_size: examples per compiled step (memory, not the result).

  Returns:
    ``{layer path: [d, d]}`` float32 Gram matrices over all ``N · positions``
    rows.

  Raises:
    ValueError: no examples.
  """
  total = None
  for (xb,), w in _batches((np.asarray(x),), batch_size):
    if total is None:
      shapes = jax.eval_shape(inputs_fn, params, xb)
      total = {
          k: (jnp.zeros((s.shape[-1],) * 2, jnp.float32), jnp.float32(0))
          for k, s in shapes.items()
      }
    total = _gram_step(inputs_fn, total, params, xb, jnp.asarray(w))
  return {k: g / rows for k, (g, rows) in total.items()}
