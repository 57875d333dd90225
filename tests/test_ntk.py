"""mtx.ntk: linearisation, empirical NTK, kernel regression, disentanglement."""

import functools
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mtx
from mtx import ntk


def mlp_init(key, sizes=(3, 8, 4)):
  ks = jax.random.split(key, len(sizes) - 1)
  return {
      f"layers_{i}": {
          "kernel": jax.random.normal(k, (a, b)) / np.sqrt(a),
          "bias": 0.1 * jax.random.normal(jax.random.fold_in(k, 1), (b,)),
      }
      for i, (k, a, b) in enumerate(zip(ks, sizes[:-1], sizes[1:]))
  }


def mlp(params, x):
  h = x
  n = len(params)
  for i in range(n):
    h = h @ params[f"layers_{i}"]["kernel"] + params[f"layers_{i}"]["bias"]
    if i < n - 1:
      h = jnp.tanh(h)
  return h


@pytest.fixture(scope="module")
def setup():
  p0 = mlp_init(jax.random.key(0))
  p1 = jax.tree.map(
      lambda x: x + 0.3 * jax.random.normal(jax.random.key(1), x.shape), p0
  )
  x = jax.random.normal(jax.random.key(2), (5, 3))
  return p0, p1, x


def test_at_params0_equals_the_model(setup):
  p0, _, x = setup
  np.testing.assert_allclose(
      ntk.linearize(mlp)(p0, p0, x), mlp(p0, x), rtol=1e-6
  )


def test_exactly_linear_in_the_displacement(setup):
  p0, p1, x = setup
  f = ntk.linearize(mlp)
  d = mtx.tree.sub(p1, p0)
  a, b = 0.7, -1.3
  lhs = f(p0, mtx.tree.add_scale(p0, a + b, d), x) - mlp(p0, x)
  rhs = (f(p0, mtx.tree.add_scale(p0, a, d), x) - mlp(p0, x)) + (
      f(p0, mtx.tree.add_scale(p0, b, d), x) - mlp(p0, x)
  )
  np.testing.assert_allclose(lhs, rhs, rtol=1e-4, atol=1e-5)
  # and it differs from the non-linear model away from params0
  assert not np.allclose(f(p0, p1, x), mlp(p1, x), atol=1e-3)


def test_equals_a_model_linear_in_its_params(setup):
  p0, p1, x = setup
  lin_model = lambda p, x: x @ p["layers_0"]["kernel"] + p["layers_0"]["bias"]
  np.testing.assert_allclose(
      ntk.linearize(lin_model)(p0, p1, x),
      lin_model(p1, x),
      rtol=1e-5,
      atol=1e-6,
  )


def test_gradient_matches_finite_differences(setup):
  p0, p1, x = setup
  f = ntk.linearize(mlp)
  loss = lambda p: jnp.sum(f(p0, p, x) ** 2)
  g = jax.grad(loss)(p1)
  d = jax.tree.map(lambda v: jax.random.normal(jax.random.key(5), v.shape), p1)
  eps = 1e-3
  fd = (
      loss(mtx.tree.add_scale(p1, eps, d))
      - loss(mtx.tree.add_scale(p1, -eps, d))
  ) / (2 * eps)
  np.testing.assert_allclose(mtx.tree.vdot(g, d), fd, rtol=2e-2)


def test_jit_and_vmap_agree(setup):
  p0, p1, x = setup
  f = ntk.linearize(mlp)
  eager = f(p0, p1, x)
  np.testing.assert_allclose(jax.jit(f)(p0, p1, x), eager, rtol=1e-5, atol=1e-6)
  per_row = jax.vmap(lambda xi: f(p0, p1, xi[None])[0])(x)
  np.testing.assert_allclose(per_row, eager, rtol=1e-5, atol=1e-6)


def test_partial_linearisation(setup):
  p0, p1, x = setup
  # Only layers_0 linearised; layers_1 enters at its current (p1) value.
  f = ntk.linearize(mlp, include="^layers_0/")
  mixed0 = {"layers_0": p0["layers_0"], "layers_1": p1["layers_1"]}
  d = {
      "layers_0": mtx.tree.sub(p1["layers_0"], p0["layers_0"]),
      "layers_1": jax.tree.map(jnp.zeros_like, p1["layers_1"]),
  }
  out, jvp = jax.jvp(lambda p: mlp(p, x), (mixed0,), (d,))
  np.testing.assert_allclose(f(p0, p1, x), out + jvp, rtol=1e-5, atol=1e-6)
  # excluding everything gives back the model
  g = ntk.linearize(mlp, exclude=".*")
  np.testing.assert_allclose(g(p0, p1, x), mlp(p1, x), rtol=1e-6)


@pytest.mark.parametrize("method", ["jacobian", "products"])
def test_empirical_ntk_equals_explicit_jacobian_product(setup, method):
  p0, _, x = setup
  x2 = x[:3] + 0.5
  jac = lambda xx: jnp.concatenate(
      [
          j.reshape(xx.shape[0], 4, -1)
          for j in jax.tree.leaves(jax.jacobian(lambda p: mlp(p, xx))(p0))
      ],
      axis=-1,
  )
  want = jnp.einsum("aip,bjp->aibj", jac(x), jac(x2))
  got = ntk.ntk(mlp, p0, x, x2, method=method)
  assert got.shape == (5, 4, 3, 4)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
  tr = ntk.ntk(mlp, p0, x, x2, method=method, trace=True)
  np.testing.assert_allclose(
      tr, jnp.einsum("aibi->ab", want), rtol=1e-4, atol=1e-5
  )


def test_auto_method_picks_products_under_a_small_budget(setup):
  p0, _, x = setup
  a = ntk.ntk(mlp, p0, x, max_jacobian_bytes=1)
  b = ntk.ntk(mlp, p0, x, method="jacobian")
  np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
  with pytest.raises(ValueError, match="method"):
    ntk.ntk(mlp, p0, x, method="svd")


def test_eigenvalues_are_those_of_the_gram_matrix(setup):
  p0, _, x = setup
  k = ntk.ntk(mlp, p0, x)
  ev = ntk.ntk_eigenvalues(k)
  want = np.sort(np.linalg.eigvalsh(np.asarray(k).reshape(20, 20)))[::-1]
  np.testing.assert_allclose(ev, want, rtol=1e-4, atol=1e-4)
  assert np.all(np.asarray(ev) > -1e-4)  # PSD


def test_kernel_regression_reproduces_training_targets_of_a_linear_model():
  # For f linear in params, kernel regression with the NTK = least squares.
  p = {"w": jnp.zeros((3, 1))}
  f = lambda p, x: x @ p["w"]
  x = jax.random.normal(jax.random.key(0), (3, 3))
  y = jnp.array([[1.0], [-2.0], [0.5]])
  k = ntk.ntk(f, p, x, trace=True)
  np.testing.assert_allclose(k, x @ x.T, rtol=1e-5, atol=1e-6)
  pred = ntk.kernel_regression(k, y, k, ridge=0.0)
  np.testing.assert_allclose(pred, y, rtol=1e-3, atol=1e-4)
  full = ntk.kernel_regression(ntk.ntk(f, p, x), y, ntk.ntk(f, p, x), ridge=0.0)
  np.testing.assert_allclose(full, y, rtol=1e-3, atol=1e-4)


def test_disentanglement_error(setup):
  p0, _, x = setup
  tv1 = jax.tree.map(
      lambda v: 0.8 * jax.random.normal(jax.random.key(7), v.shape), p0
  )
  tv2 = jax.tree.map(
      lambda v: 0.8 * jax.random.normal(jax.random.key(8), v.shape), p0
  )
  alphas = [0.0, 0.5, 1.0]
  xi = ntk.disentanglement_error(mlp, p0, tv1, tv2, x, x + 1, alphas, alphas)
  assert xi.shape == (3, 3)
  assert xi[0, 0] == 0  # nothing added, nothing changes
  assert xi[2, 2] > 0  # two large random vectors interfere somewhere

  # by hand at (1, 1): both tasks' prediction flips
  def pred(p, xx):
    return np.argmax(mlp(p, xx), -1)

  both = mtx.tree.add(p0, tv1, tv2)
  want = np.mean(pred(mtx.tree.add(p0, tv1), x) != pred(both, x)) + np.mean(
      pred(mtx.tree.add(p0, tv2), x + 1) != pred(both, x + 1)
  )
  np.testing.assert_allclose(xi[2, 2], want, rtol=1e-6)
  # at (1, 0) only task 2's term can differ: θ0 vs θ0 + τ1 on D2
  want10 = np.mean(pred(p0, x + 1) != pred(mtx.tree.add(p0, tv1), x + 1))
  np.testing.assert_allclose(xi[2, 0], want10, rtol=1e-6)
  lin = ntk.disentanglement_error(
      mlp, p0, tv1, tv2, x, x + 1, alphas, alphas, linearized=True
  )
  assert lin.shape == (3, 3) and lin[0, 0] == 0
  # Task-specific heads: task 2's data is read through its own output map.
  mlp2 = lambda p, xx: -mlp(p, xx)[:, ::-1]
  xi2 = ntk.disentanglement_error(
      mlp, p0, tv1, tv2, x, x + 1, alphas, alphas, apply_fn2=mlp2
  )

  def pred2(p, xx):
    return np.argmax(mlp2(p, xx), -1)

  want = np.mean(pred(mtx.tree.add(p0, tv1), x) != pred(both, x)) + np.mean(
      pred2(mtx.tree.add(p0, tv2), x + 1) != pred2(both, x + 1)
  )
  np.testing.assert_allclose(xi2[2, 2], want, rtol=1e-6)


def test_nonlinear_advantage(setup):
  p0, p1, x = setup
  tv = mtx.tree.sub(p1, p0)
  y = jnp.argmax(mlp(p1, x), -1)  # labels the non-linear model gets right
  adv = ntk.nonlinear_advantage(mlp, p0, tv, x, y)
  acc_lin = np.mean(np.argmax(ntk.linearize(mlp)(p0, p1, x), -1) == y)
  np.testing.assert_allclose(adv, 1.0 - acc_lin, rtol=1e-6)


def test_empirical_ntk_of_a_tiny_vit_equals_explicit_jacobian():
  vit = mtx.models.get("vit", "tiny", depth=1, width=16, mlp_dim=16)
  clf = mtx.models.classifier(vit, num_classes=3)
  x = jax.random.uniform(jax.random.key(0), (3, 8, 8, 1))
  x2 = jax.random.uniform(jax.random.key(1), (2, 8, 8, 1))
  p = clf.init(jax.random.key(2), x)
  p["head"] = jax.tree.map(  # a non-zero head, so every leaf matters
      lambda h: jax.random.normal(jax.random.key(3), h.shape), p["head"]
  )
  xx = jnp.concatenate([x, x2])
  leaves = jax.tree.leaves(jax.jit(jax.jacrev(lambda q: clf.apply(q, xx)))(p))
  jac = jnp.concatenate([j.reshape(5, 3, -1) for j in leaves], axis=-1)
  want = jnp.einsum("aip,bjp->aibj", jac[:3], jac[3:])
  for method in ("jacobian", "products"):
    got = ntk.ntk(clf.apply, p, x, x2, method=method)
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4)


def test_disentanglement_error_per_example_terms(setup):
  """``per_example=True`` gives the terms of ξ, one per example: their
  means are the grid, and each is the hand-computed prediction change (the
  suite's paired statistics read them)."""
  p0, _, x = setup
  tv1 = jax.tree.map(
      lambda v: 0.8 * jax.random.normal(jax.random.key(7), v.shape), p0
  )
  tv2 = jax.tree.map(
      lambda v: 0.8 * jax.random.normal(jax.random.key(8), v.shape), p0
  )
  x2 = jnp.concatenate([x + 1, x - 1])  # a different size from x
  a1s, a2s = [0.0, 0.5, 1.0], [0.0, 1.0]
  mlp2 = lambda p, xx: -mlp(p, xx)[:, ::-1]

  def pred(f, p, xx):
    return np.argmax(f(p, xx), -1)

  for linearized in (False, True):
    kw = dict(linearized=linearized, apply_fn2=mlp2)
    xi = ntk.disentanglement_error(mlp, p0, tv1, tv2, x, x2, a1s, a2s, **kw)
    e1, e2 = ntk.disentanglement_error(
        mlp, p0, tv1, tv2, x, x2, a1s, a2s, per_example=True, **kw
    )
    assert e1.shape == (3, 2, len(x)) and e2.shape == (3, 2, len(x2))
    assert e1.dtype == bool and e2.dtype == bool
    np.testing.assert_allclose(e1.mean(-1) + e2.mean(-1), xi, rtol=1e-6)
    f1, f2 = mlp, mlp2
    if linearized:
      f1 = functools.partial(ntk.linearize(mlp), p0)
      f2 = functools.partial(ntk.linearize(mlp2), p0)
    for i, a1 in enumerate(a1s):
      for j, a2 in enumerate(a2s):
        both = mtx.tree.add_scale(mtx.tree.add_scale(p0, a1, tv1), a2, tv2)
        only1 = mtx.tree.add_scale(p0, a1, tv1)
        only2 = mtx.tree.add_scale(p0, a2, tv2)
        np.testing.assert_array_equal(
            e1[i, j], pred(f1, only1, x) != pred(f1, both, x)
        )
        np.testing.assert_array_equal(
            e2[i, j], pred(f2, only2, x2) != pred(f2, both, x2)
        )
  assert e1[0, 0].sum() == 0 and e2[0, 0].sum() == 0
