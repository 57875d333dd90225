"""Tangent-space (NTK-linearised) models, the empirical NTK, disentanglement.

Reference:
  Ortiz-Jiménez, Favero & Frossard, "Task Arithmetic in the Tangent Space:
  Improved Editing of Pre-Trained Models", NeurIPS 2023.
  https://arxiv.org/abs/2305.12827

A model is a pure ``apply(params, *inputs)``. Its linearisation around
``params0`` is ``f(params0) + J(params0)·(params − params0)``, one
``jax.jvp``; ``params0`` is an argument of the returned function, never closed
over, so large trees are not baked into compiled programs.

>>> import jax.numpy as jnp
>>> f = lambda p, x: jnp.tanh(p["w"] * x)
>>> f_lin = linearize(f)
>>> p0, p = {"w": jnp.array(0.0)}, {"w": jnp.array(0.5)}
>>> float(f_lin(p0, p, 2.0))  # tanh(0) + (1 - tanh(0)^2) * 2 * 0.5
1.0
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mtx import tree as mtree

PyTree = Any


def linearize(
    apply_fn: Callable[..., Any],
    *,
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
) -> Callable[..., Any]:
  """The first-order Taylor expansion of ``apply_fn`` in its params.

  Args:
    apply_fn: ``apply_fn(params, *inputs) -> outputs`` (any pytree).
    include: path regex(es) of the leaves to linearise (default: all).
    exclude: path regex(es) of leaves kept non-linear. A leaf left out enters
      ``apply_fn`` at its current value in ``params`` (so it can be frozen or
      trained normally), and the expansion is taken in the other leaves only.

  Returns:
    ``apply_lin(params0, params, *inputs)`` with the outputs of
    ``apply_fn``: ``f(p0) + J(p0)·(p − p0)`` in the linearised leaves. Works
    under ``jax.jit``, ``jax.vmap``, ``jax.grad`` (w.r.t. ``params``) and on
    sharded params.
  """

  def apply_lin(params0, params, *inputs):
    mtree.assert_same_structure(params0, params, names=("params0", "params"))
    if include is None and exclude is None:
      primal = params0
      tangent = jax.tree.map(_delta, params, params0)
    else:
      sel = mtree.select(params0, include, exclude)
      primal = jax.tree.map(lambda s, a, b: a if s else b, sel, params0, params)
      tangent = jax.tree.map(
          lambda s, a, b: _delta(a, b) if s else jnp.zeros_like(a),
          sel,
          params,
          params0,
      )
    out, jvp = jax.jvp(lambda p: apply_fn(p, *inputs), (primal,), (tangent,))
    return jax.tree.map(jnp.add, out, jvp)

  return apply_lin


def _delta(a, b):
  acc = mtree.accum_dtype()
  return (jnp.asarray(a).astype(acc) - jnp.asarray(b).astype(acc)).astype(
      jnp.asarray(a).dtype
  )


def _flat_jacobian(apply_fn, params, x):
  """``[N, O, P]`` Jacobian of ``apply_fn(params, x)`` (outputs ``[N, O]``)."""
  jac = jax.jacrev(lambda p: apply_fn(p, x))(params)
  n, o = jax.eval_shape(lambda: apply_fn(params, x)).shape
  return jnp.concatenate(
      [j.reshape(n, o, -1) for j in jax.tree.leaves(jac)], axis=-1
  )


def ntk(
    apply_fn: Callable[[PyTree, jax.Array], jax.Array],
    params: PyTree,
    x1: jax.Array,
    x2: jax.Array | None = None,
    *,
    method: str = "auto",
    trace: bool = False,
    max_jacobian_bytes: int = 1 << 30,
) -> jax.Array:
  """The empirical NTK ``Θ(x1, x2) = J(x1) J(x2)ᵀ`` at ``params``.

  Args:
    apply_fn: ``apply_fn(params, x) -> [N, O]``.
    params: where the kernel is taken.
    x1: ``[N1, ...]`` inputs.
    x2: ``[N2, ...]`` inputs (default ``x1``).
    method: ``"jacobian"`` contracts explicit Jacobians (fast, memory
      ``(N1 + N2)·O·P``); ``"products"`` builds each column as a VJP then a
      JVP (memory ``O(P)``); ``"auto"`` picks the Jacobians when they fit in
      ``max_jacobian_bytes``.
    trace: sum over the output axis (``[N1, N2]``) instead of the full
      ``[N1, O, N2, O]`` kernel.
    max_jacobian_bytes: the ``"auto"`` budget.

  Returns:
    ``[N1, O, N2, O]`` (or ``[N1, N2]`` with ``trace=True``).
  """
  x2 = x1 if x2 is None else x2
  n1, o = jax.eval_shape(lambda: apply_fn(params, x1)).shape
  n2 = x2.shape[0]
  p = mtree.num_elements(params)
  if method not in ("auto", "jacobian", "products"):
    raise ValueError(f"method must be auto, jacobian or products: {method!r}")
  if method == "auto":
    need = (n1 + n2) * o * p * 4
    method = "jacobian" if need <= max_jacobian_bytes else "products"
  return _ntk(apply_fn, method, trace, x2 is x1, params, x1, x2)


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def _ntk(apply_fn, method, trace, same, params, x1, x2):
  n1, o = jax.eval_shape(lambda: apply_fn(params, x1)).shape
  n2 = x2.shape[0]
  if method == "jacobian":
    j1 = _flat_jacobian(apply_fn, params, x1)
    j2 = j1 if same else _flat_jacobian(apply_fn, params, x2)
    k = jnp.einsum("aip,bjp->aibj", j1, j2)
  else:
    _, vjp2 = jax.vjp(lambda q: apply_fn(q, x2), params)

    def column(ct):  # J1 · J2ᵀ ct
      (t,) = vjp2(ct)
      return jax.jvp(lambda q: apply_fn(q, x1), (params,), (t,))[1]

    basis = jnp.eye(n2 * o, dtype=jnp.result_type(float)).reshape(-1, n2, o)
    cols = jax.lax.map(column, basis)  # [n2*o, n1, o]
    k = jnp.transpose(cols.reshape(n2, o, n1, o), (2, 3, 0, 1))
  if trace:
    return jnp.einsum("aibi->ab", k)
  return k


def ntk_eigenvalues(kernel: jax.Array) -> jax.Array:
  """Eigenvalues (descending) of a kernel ``[N, O, N, O]`` or ``[N, N]``."""
  k = jnp.asarray(kernel)
  if k.ndim == 4:
    k = k.reshape(k.shape[0] * k.shape[1], -1)
  if k.ndim != 2 or k.shape[0] != k.shape[1]:
    raise ValueError(f"kernel must be square, got shape {kernel.shape}")
  return jnp.linalg.eigvalsh((k + k.T) / 2)[::-1]


def kernel_regression(
    k_train: jax.Array,
    y_train: jax.Array,
    k_test_train: jax.Array,
    *,
    ridge: float = 1e-6,
) -> jax.Array:
  """Kernel (ridge) regression mean: ``K*ᵀ (K + ridge·I)⁻¹ y``.

  Args:
    k_train: ``[N, N]`` (traced) or ``[N, O, N, O]`` kernel among training
      inputs.
    y_train: ``[N, O]`` targets (e.g. residuals ``y − f(x; θ0)``).
    k_test_train: ``[M, N]`` or ``[M, O, N, O]``.
    ridge: diagonal regulariser.

  Returns:
    ``[M, O]`` predictions.
  """
  n, o = y_train.shape
  if k_train.ndim == 2:
    a = k_train + ridge * jnp.eye(n, dtype=k_train.dtype)
    return k_test_train @ jnp.linalg.solve(a, y_train)
  a = k_train.reshape(n * o, n * o)
  a = a + ridge * jnp.eye(n * o, dtype=a.dtype)
  coef = jnp.linalg.solve(a, y_train.reshape(n * o))
  m = k_test_train.shape[0]
  return (k_test_train.reshape(m * o, n * o) @ coef).reshape(m, o)


def disentanglement_error(
    apply_fn: Callable[[PyTree, jax.Array], jax.Array],
    params0: PyTree,
    tv1: PyTree,
    tv2: PyTree,
    x1: jax.Array,
    x2: jax.Array,
    alphas1: Sequence[float] | jax.Array,
    alphas2: Sequence[float] | jax.Array,
    *,
    linearized: bool = False,
    apply_fn2: Callable[[PyTree, jax.Array], jax.Array] | None = None,
    per_example: bool = False,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
  """Weight disentanglement error ξ(α1, α2) on a grid.

  ``ξ(α1, α2) = Σ_t mean_{x ∈ D_t} 1[pred(θ0 + αt τt; x) ≠
  pred(θ0 + α1 τ1 + α2 τ2; x)]`` with ``pred`` the argmax of the outputs,
  for the model itself or (``linearized=True``) its linearisation at θ0.

  With task-specific heads (CLIP's zero-shot heads), pass the model with
  task 1's head as ``apply_fn`` and with task 2's head as ``apply_fn2``.

  Args:
    per_example: return the terms of the sum instead, one per example (for
      paired statistics and standard errors over the examples).

  Returns:
    ``[len(alphas1), len(alphas2)]`` numpy array, for plotting; with
    ``per_example``, the pair ``(e1, e2)`` of boolean arrays
    ``[len(alphas1), len(alphas2), len(x1)]`` and ``[..., len(x2)]``
    (whether each example of ``x1`` / ``x2`` changes its prediction), so
    that ξ is ``e1.mean(-1) + e2.mean(-1)``.
  """

  def model(fn):
    if linearized:
      return linearize(fn)
    return lambda p0, p, x: fn(p, x)

  f1 = model(apply_fn)
  f2 = f1 if apply_fn2 is None else model(apply_fn2)

  def pred(f, a1, a2, x):
    p = mtree.add_scale(mtree.add_scale(params0, a1, tv1), a2, tv2)
    return jnp.argmax(f(params0, p, x), axis=-1)

  @jax.jit
  def grid(a1s, a2s):
    def one(a1, a2):
      e1 = pred(f1, a1, 0.0, x1) != pred(f1, a1, a2, x1)
      e2 = pred(f2, 0.0, a2, x2) != pred(f2, a1, a2, x2)
      if per_example:
        return e1, e2
      return jnp.mean(e1) + jnp.mean(e2)

    return jax.vmap(lambda a1: jax.vmap(lambda a2: one(a1, a2))(a2s))(a1s)

  out = grid(
      jnp.asarray(alphas1, jnp.float32), jnp.asarray(alphas2, jnp.float32)
  )
  if per_example:
    return np.asarray(out[0]), np.asarray(out[1])
  return np.asarray(out)


def nonlinear_advantage(
    apply_fn: Callable[[PyTree, jax.Array], jax.Array],
    params0: PyTree,
    tv: PyTree,
    x: jax.Array,
    y: jax.Array,
    scale: float = 1.0,
) -> jax.Array:
  """Accuracy of ``θ0 + scale·τ`` minus that of its post-hoc linearisation.

  The post-hoc linearised model evaluates a task vector fine-tuned the usual
  (non-linear) way through the tangent model at θ0; the paper reports that
  the non-linear model keeps a clear advantage (its "non-linear advantage").
  """
  p = mtree.add_scale(params0, scale, tv)
  acc_nl = jnp.mean(jnp.argmax(apply_fn(p, x), -1) == y)
  acc_lin = jnp.mean(jnp.argmax(linearize(apply_fn)(params0, p, x), -1) == y)
  return acc_nl - acc_lin
