"""mtx.learned.statistics and the prototype heads: hand-computed cases."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mtx
from mtx import models
from mtx.learned import statistics
from mtx.models import intermediates


def test_fisher_diagonal_by_hand_any_batch_size():
  # loss = 0.5 (w·x - y)²: grad_w = (w·x - y) x, squared elementwise.
  x = np.array([[1.0, 2.0], [0.0, 1.0], [3.0, -1.0]], np.float32)
  y = np.array([1.0, 0.0, 2.0], np.float32)
  w = np.array([0.5, -1.0], np.float32)
  r = x @ w - y
  want = np.mean((r[:, None] * x) ** 2, axis=0)

  def loss(p, ex, shift):
    xi, yi = ex
    return 0.5 * (jnp.dot(p["w"], xi) + shift - yi) ** 2

  for bs in (1, 2, 3, 8):  # padding of the last batch is weighted out
    f = statistics.fisher_diagonal(
        loss, {"w": w}, (x, y), jnp.float32(0.0), batch_size=bs
    )
    np.testing.assert_allclose(f["w"], want, rtol=1e-6)
  # Extra arguments are traced inputs of loss_fn.
  f = statistics.fisher_diagonal(loss, {"w": w}, (x, y), jnp.float32(1.0))
  np.testing.assert_allclose(
      f["w"], np.mean(((r + 1)[:, None] * x) ** 2, axis=0), rtol=1e-6
  )
  assert mtx.learned.fisher_diagonal is statistics.fisher_diagonal


def test_fisher_diagonal_bad_inputs():
  loss = lambda p, ex: p * ex
  with pytest.raises(ValueError, match="leading example axis"):
    statistics.fisher_diagonal(loss, 1.0, (np.zeros(3), np.zeros(4)))
  with pytest.raises(ValueError, match="no examples"):
    statistics.fisher_diagonal(loss, 1.0, np.zeros((0,)))
  with pytest.raises(ValueError, match="batch_size"):
    statistics.fisher_diagonal(loss, 1.0, np.zeros(3), batch_size=0)


def test_gram_matrices_by_hand_with_positions():
  # inputs_fn returns [B, P, d] layer inputs: every position is a row.
  rng = np.random.default_rng(0)
  x = rng.normal(size=(5, 3, 2)).astype(np.float32)

  def inputs_fn(p, xb):
    return {"a/kernel": xb * p, "b/kernel": xb[:, 0, :1]}

  for bs in (2, 5, 16):
    g = statistics.gram_matrices(inputs_fn, 2.0, x, batch_size=bs)
    rows = (2.0 * x).reshape(-1, 2)
    np.testing.assert_allclose(g["a/kernel"], rows.T @ rows / 15, rtol=1e-5)
    b = x[:, 0, :1]
    np.testing.assert_allclose(g["b/kernel"], b.T @ b / 5, rtol=1e-5)


def test_gram_matrices_of_a_model_match_the_merging_input():
  enc = models.get("mlp", hidden=(8,))
  x = np.random.default_rng(1).normal(size=(7, 4)).astype(np.float32)
  params = enc.init(jax.random.key(0), x[:1])
  inputs_fn = lambda p, xb: intermediates.dense_inputs(enc.apply, p, xb)[1]
  g = statistics.gram_matrices(inputs_fn, params, x, batch_size=3)
  _, h = intermediates.dense_inputs(enc.apply, params, x)
  for k, v in h.items():
    np.testing.assert_allclose(g[k], v.T @ v / 7, rtol=1e-4, atol=1e-5)
  # The RegMean merge takes them as they come.
  merged = mtx.merging.merge(params, [params, params], "regmean", grams=[g, g])
  jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), merged, params
  )


def test_prototype_heads_by_hand():
  z = np.array([[2.0, 0.0], [4.0, 0.0], [0.0, 1.0], [1.0, 1.0]], np.float32)
  y = np.array([0, 0, 1, 1])
  h = models.heads.prototypes(z, y, 2)
  # Class means (3, 0) and (0.5, 1), normalised column by column.
  m1 = np.array([0.5, 1.0]) / np.linalg.norm([0.5, 1.0])
  np.testing.assert_allclose(h["kernel"], np.stack([[1, 0], m1], 1), atol=1e-6)
  np.testing.assert_array_equal(h["bias"], [0.0, 0.0])
  with pytest.raises(ValueError, match=r"classes \[2\] have no examples"):
    models.heads.prototypes(z, y, 3)
  with pytest.raises(ValueError, match="labels must lie"):
    models.heads.prototypes(z, np.array([0, 0, 1, 5]), 2)


def test_scaled_normalized_gives_scaled_cosine_logits():
  apply = lambda p, x: x @ p
  p = np.array([[1.0, 0.0], [0.0, 2.0]], np.float32)
  f = models.heads.scaled_normalized(apply, 10.0, mean=[1.0, 1.0], std=[2, 2])
  x = np.array([[3.0, 1.0]], np.float32)  # standardised: (1, 0)
  np.testing.assert_allclose(f(p, x), [[10.0, 0.0]], atol=1e-6)
  head = models.heads.prototypes(np.array([[1.0, 0], [0, 1.0]]), [0, 1], 2)
  logits = models.heads.apply(head, f(p, np.array([[3.0, 3.0]])))
  # Features (1, 2)/sqrt5 * 10 against unit axes: 10 cos.
  np.testing.assert_allclose(
      logits, [[10 / np.sqrt(5), 20 / np.sqrt(5)]], rtol=1e-5
  )
  with pytest.raises(ValueError, match="logit_scale must be finite"):
    models.heads.scaled_normalized(apply, float("nan"))
  with pytest.raises(ValueError, match="both mean and std"):
    models.heads.scaled_normalized(apply, 1.0, mean=[0.0])
