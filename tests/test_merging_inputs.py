"""Bad input to the merging methods: a one-line ValueError, before any work.

Every test here failed (accepted the input, or raised another error) before
the checks in ``mtx/merging/_checks.py``.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mtx

T = 2
ALL = sorted(mtx.merging.METHODS)


def _pre():
  return {
      "layers_0": {"kernel": jnp.zeros((3, 4)), "bias": jnp.zeros((4,))},
      "layers_1": {"kernel": jnp.zeros((4, 2))},
  }


def _fts(pre, mag=1.0):
  return [
      jax.tree.map(
          lambda x, i=i: x
          + mag
          * jax.random.normal(
              jax.random.fold_in(jax.random.key(1), i), x.shape
          ),
          pre,
      )
      for i in range(T)
  ]


def _hparams(name, pre):
  if name == "fisher":
    return {"fishers": [jax.tree.map(lambda x: x + 1.0, pre)] * T}
  if name == "regmean":
    return {"grams": [{"layers_0/kernel": jnp.eye(3)}] * T}
  return {}


def _merge(name, pre, fts, **kw):
  return mtx.merging.merge(
      pre, fts, name, key=jax.random.key(0), **{**_hparams(name, pre), **kw}
  )


# -- scale ---------------------------------------------------------------------


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf, 1e39])
@pytest.mark.parametrize("name", ALL)
def test_non_finite_or_overflowing_scale(name, value):
  pre = _pre()
  with pytest.raises(ValueError, match="scale for .*(finite|overflows)"):
    _merge(name, pre, _fts(pre), scale=value)


@pytest.mark.parametrize("name", ALL)
def test_non_finite_scale_inside_a_prefix_tree(name):
  pre = _pre()
  scale = {"layers_0": 1.0, "layers_1": {"kernel": jnp.float32(np.nan)}}
  with pytest.raises(ValueError, match="'layers_1/kernel' must be finite"):
    _merge(name, pre, _fts(pre), scale=scale)


@pytest.mark.parametrize("value", ["0.5", None, object(), True])
@pytest.mark.parametrize("name", ALL)
def test_scale_of_the_wrong_type(name, value):
  pre = _pre()
  with pytest.raises(ValueError, match="scale"):
    _merge(name, pre, _fts(pre), scale=value)


@pytest.mark.parametrize(
    "name, hparams",
    [
        ("ties", {"density": True}),
        ("breadcrumbs", {"density": np.bool_(True)}),
        ("slerp", {"t": True}),
        ("lines", {"alpha": False}),
    ],
)
def test_bools_are_not_numbers(name, hparams):
  # `--hparam=density=true` once merged at density 1.0.
  pre = _pre()
  with pytest.raises(ValueError, match="not a bool"):
    _merge(name, pre, _fts(pre), **hparams)


def test_traced_scale_and_coefficients_are_not_checked_concretely():
  pre = _pre()
  fts = _fts(pre)
  tvs = mtx.tree.stack([mtx.task_vectors.task_vector(pre, f) for f in fts])
  slerp = mtx.merging.get("slerp", space="task_vectors")

  def loss(t, s):
    out = slerp.combine(tvs, scale=s, t=t)
    return mtx.tree.vdot(out, out)

  g = jax.grad(loss, argnums=(0, 1))(0.3, 0.7)
  assert all(np.isfinite(x) for x in g)
  vm = jax.vmap(lambda s: _merge("ties", pre, fts, scale=s))(
      jnp.array([0.1, 0.5])
  )
  assert vm["layers_1"]["kernel"].shape == (2, 4, 2)


# -- continuous coefficients -------------------------------------------------


BAD_COEFFS = [
    ("slerp", {"t": np.nan}, "slerp t must be finite"),
    ("slerp", {"t": 1e40}, "slerp t overflows"),
    ("slerp", {"t": "0.5"}, "slerp t must be a number"),
    ("lines", {"alpha": np.inf}, "lines alpha must be finite"),
    ("lines", {"beta": np.nan}, "lines beta must be finite"),
    ("compeft", {"alpha": np.nan}, "compeft alpha must be finite"),
    ("compeft", {"alpha": None}, "compeft alpha must be a number"),
    ("compeft", {"alpha": -1.0}, "compeft alpha must be >= 0"),
    ("regmean", {"alpha": np.nan}, "regmean alpha must be finite"),
    ("consensus", {"tall_lambda": np.nan}, "consensus tall_lambda must be"),
    ("consensus", {"tall_lambda": -0.1}, "tall_lambda must be >= 0"),
    ("consensus", {"tall_lambda": [0.4]}, "1 entries for 2 fine-tuned"),
    ("consensus", {"tall_lambda": [0.4] * 3}, "3 entries for 2 fine-tuned"),
    ("weighted_average", {"weights": [1.0]}, "1 entries for 2 fine-tuned"),
    ("weighted_average", {"weights": [1.0, np.nan]}, "weights must be finite"),
    ("weighted_average", {"weights": [1.0, -1.0]}, "weights sum to 0"),
    ("weighted_average", {"weights": [[1.0, 1.0]]}, "must be a \\[T\\] vector"),
    ("ties", {"weights": [1.0, 1.0, 1.0]}, "3 entries for 2 fine-tuned"),
    ("ties", {"weights": [1.0, -0.5]}, "weights must be >= 0"),
    ("ties", {"weights": [0.0, 0.0]}, "weights sum to 0"),
    ("fisher", {"weights": [1.0]}, "1 entries for 2 fine-tuned"),
    ("fisher", {"weights": [np.inf, 1.0]}, "weights must be finite"),
    ("fisher", {"weights": [-1.0, 2.0]}, "weights must be >= 0"),
    ("fisher", {"eps": np.nan}, "fisher eps must be finite"),
    ("fisher", {"eps": -1.0}, "fisher eps must be >= 0"),
    ("regmean", {"ridge": np.inf}, "regmean ridge must be finite"),
    ("regmean", {"ridge": -1.0}, "regmean ridge must be >= 0"),
]


@pytest.mark.parametrize("name,hp,match", BAD_COEFFS)
def test_bad_coefficients_are_refused(name, hp, match):
  pre = _pre()
  with pytest.raises(ValueError, match=match):
    _merge(name, pre, _fts(pre), **hp)


@pytest.mark.parametrize(
    "name,coeffs,match",
    [
        ("slerp", {"t": np.inf}, "slerp t must be finite"),
        ("weighted_average", {"weights": [1.0]}, "1 entries for 2"),
        ("ties", {"weights": [1.0, 2.0, 3.0]}, "3 entries for 2"),
        ("consensus", {"tall_lambda": [0.2, np.nan]}, "must be finite"),
        ("lines", {"beta": np.inf}, "lines beta must be finite"),
        ("dare", {"weights": [1.0]}, "1 entries for 2"),
    ],
)
def test_bad_coefficient_overrides_at_call_time(name, coeffs, match):
  pre = _pre()
  fts = _fts(pre)
  hp = {"then": "ties"} if name == "dare" else {}
  merger = mtx.merging.get(name, **hp, **_hparams(name, pre))
  with pytest.raises(ValueError, match=match):
    mtx.merging.merge(pre, fts, merger, key=jax.random.key(0), **coeffs)
  tvs = mtx.tree.stack([mtx.task_vectors.task_vector(pre, f) for f in fts])
  with pytest.raises(ValueError, match=match):
    merger.combine(tvs, pretrained=pre, key=jax.random.key(0), **coeffs)


# -- data handed to a method ---------------------------------------------------


def test_fisher_of_the_wrong_shape_names_its_leaf():
  pre = _pre()
  fis = [jax.tree.map(jnp.ones_like, pre) for _ in range(T)]
  fis[1]["layers_1"]["kernel"] = jnp.ones((2, 4))
  with pytest.raises(
      ValueError, match=r"fishers\[1\] for leaf 'layers_1/kernel' has shape"
  ):
    _merge("fisher", pre, _fts(pre), fishers=fis)


def test_fisher_with_nan_names_its_leaf():
  pre = _pre()
  fis = [jax.tree.map(jnp.ones_like, pre) for _ in range(T)]
  fis[0]["layers_0"]["bias"] = fis[0]["layers_0"]["bias"].at[1].set(jnp.nan)
  with pytest.raises(ValueError, match="NaN or Inf at leaf 'layers_0/bias'"):
    _merge("fisher", pre, _fts(pre), fishers=fis)


@pytest.mark.parametrize(
    "grams,match",
    [
        ({"layers_0/kernel": jnp.eye(4)}, "'layers_0/kernel' has shape"),
        ({"layers_0/bias": jnp.eye(4)}, "'layers_0/bias' .*not a 2-D kernel"),
        ({"layers_1/kernel": jnp.full((4, 4), jnp.inf)}, "NaN or Inf"),
        ({"nope": jnp.eye(3)}, "'nope', which is not a merged leaf"),
    ],
)
def test_bad_gram_matrices_name_their_leaf(grams, match):
  pre = _pre()
  with pytest.raises(ValueError, match=match):
    _merge("regmean", pre, _fts(pre), grams=[grams] * T)


def test_gram_size_follows_the_layout():
  pre = _pre()
  grams = [{"layers_1/kernel": jnp.eye(2)}] * T  # [4, 2]: d_in = 2 (out_in)
  _merge("regmean", pre, _fts(pre), grams=grams, layout="out_in")
  with pytest.raises(ValueError, match="expected \\(4, 4\\)"):
    _merge("regmean", pre, _fts(pre), grams=grams)


def test_data_checked_in_combine_too():
  pre = _pre()
  fts = _fts(pre)
  tvs = mtx.tree.stack([mtx.task_vectors.task_vector(pre, f) for f in fts])
  merger = mtx.merging.get("regmean", grams=[{"layers_0/kernel": jnp.eye(5)}])
  with pytest.raises(ValueError, match="grams: got 1 trees for 2 models"):
    merger.combine(tvs)


# -- wrong types ---------------------------------------------------------------


def test_string_leaves():
  pre = {"w": jnp.zeros(2), "name": "vit"}
  fts = [{"w": jnp.ones(2), "name": "vit"}] * T
  with pytest.raises(ValueError, match="leaf 'name' .*not a float array"):
    mtx.merging.merge(pre, fts, "average")
  fts = [
      {"w": jnp.ones(2), "name": jnp.zeros(())},
      {"w": jnp.ones(2), "name": "x"},
  ]
  with pytest.raises(ValueError, match="finetuned\\[1\\] leaf 'name'"):
    mtx.merging.merge(
        {"w": jnp.zeros(2), "name": jnp.zeros(())}, fts, "average"
    )


@pytest.mark.parametrize("key", [0, 1.5, "key", np.zeros(3, np.float32)])
def test_dare_key_of_the_wrong_type(key):
  pre = _pre()
  with pytest.raises(ValueError, match="key must be a PRNG key"):
    mtx.merging.merge(pre, _fts(pre), "dare", key=key)


def test_raw_uint32_key_still_works():
  pre = _pre()
  out = mtx.merging.merge(pre, _fts(pre), "dare", key=jax.random.PRNGKey(0))
  assert np.isfinite(out["layers_0"]["kernel"]).all()


@pytest.mark.parametrize("depth", ["1", 1.5, True, [1]])
def test_lines_depth_fn_returning_a_non_number(depth):
  pre = _pre()
  with pytest.raises(ValueError, match="depth_fn\\('layers_0/bias'\\)"):
    _merge("lines", pre, _fts(pre), alpha=1.0, depth_fn=lambda p: depth)


@pytest.mark.parametrize("name", ALL)
def test_complex_leaves_are_refused(name):
  pre = jax.tree.map(lambda x: x.astype(jnp.complex64), _pre())
  fts = [jax.tree.map(lambda x: x + 1j, pre)] * T
  with pytest.raises(ValueError, match="complex64: complex parameters"):
    _merge(name, pre, fts)


@pytest.mark.parametrize("name", ALL)
def test_float64_leaves_without_x64_are_refused(name):
  assert not jax.config.jax_enable_x64
  pre = jax.tree.map(lambda x: np.asarray(x, np.float64), _pre())
  fts = [jax.tree.map(lambda x: x + 1.0, pre)] * T
  with pytest.raises(ValueError, match="float64 but JAX's x64 mode is off"):
    _merge(name, pre, fts)


# -- valid input that crashed or lost precision ------------------------------


@pytest.mark.parametrize("name", ALL)
def test_zero_size_leaves(name):
  pre = {**_pre(), "empty": jnp.zeros((3, 0))}
  out = _merge(name, pre, _fts(pre))
  assert out["empty"].shape == (3, 0)
  assert np.isfinite(out["layers_0"]["kernel"]).all()


# Methods whose merged task vector is positively homogeneous in the task
# vectors (merge(c·τ) = c·merge(τ)); PCB's tanh score is not.
HOMOGENEOUS = [n for n in ALL if n != "pcb"]


@pytest.mark.parametrize("name", ALL)
def test_finite_inputs_near_1e20(name):
  pre = _pre()
  small = _fts(pre)
  big = [jax.tree.map(lambda x: x * 1e20, f) for f in small]
  out = _merge(name, pre, big)
  for x in jax.tree.leaves(out):
    assert np.isfinite(np.asarray(x)).all(), name
  if name in HOMOGENEOUS:
    ref = _merge(name, pre, small)
    for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(ref)):
      np.testing.assert_allclose(
          np.asarray(a) / 1e20, b, rtol=2e-3, atol=1e-5, err_msg=name
      )
