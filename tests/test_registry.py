"""Properties every registered merging method must have, and input checks."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mtx
from mtx import tree as mtree

T = 3


def _params(key, dtype=jnp.float32):
  k = jax.random.split(key, 4)
  return {
      "encoder": {
          "layers_0": {
              "kernel": jax.random.normal(k[0], (6, 5)).astype(dtype),
              "bias": jax.random.normal(k[1], (5,)).astype(dtype),
          },
          "layers_1": {"kernel": jax.random.normal(k[2], (5, 4)).astype(dtype)},
      },
      "logit_scale": jax.random.normal(k[3], ()).astype(dtype),
  }


def _finetuned(pre, n=T, seed=1, dtype=jnp.float32):
  return [
      jax.tree.map(
          lambda x, i=i: (
              x.astype(jnp.float32)
              + 0.3
              * jax.random.normal(
                  jax.random.fold_in(jax.random.key(seed), i), x.shape
              )
          ).astype(dtype),
          pre,
      )
      for i in range(n)
  ]


def _hparams(name, fts):
  if name == "fisher":
    return {"fishers": [jax.tree.map(lambda x: x * x + 0.1, f) for f in fts]}
  if name == "regmean":
    return {
        "grams": [
            {"encoder/layers_0/kernel": jnp.eye(6) * (i + 1) + 0.1}
            for i in range(len(fts))
        ]
    }
  return {}


def _n(name):
  return 2 if name == "slerp" else T


def _merge(name, pre, fts, **kw):
  key = jax.random.key(7)
  return mtx.merging.merge(pre, fts, name, key=key, **_hparams(name, fts), **kw)


ALL = sorted(mtx.merging.METHODS)


def _close(a, b, tol=1e-5):
  for p, x, y in zip(mtree.paths(a), jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(
        np.asarray(x, np.float32),
        np.asarray(y, np.float32),
        rtol=tol,
        atol=tol,
        err_msg=p,
    )


@pytest.fixture(scope="module")
def pre():
  return _params(jax.random.key(0))


@pytest.mark.parametrize("name", ALL)
def test_zero_task_vectors_give_the_pretrained_model(name, pre):
  fts = [pre] * _n(name)
  out = _merge(name, pre, fts, scale=0.7)
  _close(out, pre, 1e-6)


# What each method returns when every fine-tuned model is the same θ1 (so
# every τt = τ), at scale 1, as their docstrings imply.
IDENTICAL = {
    "average": lambda tau: tau,
    "weighted_average": lambda tau: tau,
    "task_arithmetic": lambda tau: T * tau,
    "ties": lambda tau: tau,  # density 1: every entry agrees -> mean = τ
    "model_stock": lambda tau: tau,  # cos = 1 -> t = 1
    "slerp": lambda tau: tau,  # |cos| > 0.9995 -> lerp of equal tensors
    "fisher": lambda tau: tau,
    "regmean": lambda tau: tau,
    "iso_c": None,  # flattens the spectrum: checked separately below
    "consensus": lambda tau: T * tau,  # λ=0.4: |τ| > 0.4·2|τ| everywhere
    "dare": None,  # random
    "breadcrumbs": None,  # sparse by design
    "pcb": None,
    "lines": None,
    "compeft": None,
    "tsvm": None,
}


@pytest.mark.parametrize(
    "name", [n for n in ALL if IDENTICAL.get(n) is not None]
)
def test_identical_finetuned_models(name, pre):
  ft = _finetuned(pre, 1)[0]
  hp = {"density": 1.0} if name == "ties" else {}
  out = _merge(name, pre, [ft] * _n(name), **hp)
  tau = mtx.task_vectors.task_vector(pre, ft)
  want = mtx.task_vectors.apply(pre, jax.tree.map(IDENTICAL[name], tau))
  _close(out, want, 1e-4)


def test_identical_models_under_iso_c_keep_singular_directions(pre):
  ft = _finetuned(pre, 1)[0]
  out = _merge("iso_c", pre, [ft] * T)
  tau = mtx.task_vectors.task_vector(pre, ft)
  got = mtx.task_vectors.task_vector(pre, out)["encoder"]["layers_0"]["kernel"]
  u, s, vt = np.linalg.svd(
      T * np.asarray(tau["encoder"]["layers_0"]["kernel"]), full_matrices=False
  )
  np.testing.assert_allclose(got, s.mean() * u @ vt, rtol=1e-4, atol=1e-5)


def test_every_method_is_covered_by_the_identical_table():
  assert set(IDENTICAL) == set(mtx.merging.METHODS)


ORDER_FREE = [n for n in ALL if n not in ("slerp", "dare")]


@pytest.mark.parametrize("name", ORDER_FREE)
def test_task_order_does_not_matter(name, pre):
  fts = _finetuned(pre, T)
  perm = [2, 0, 1]
  hp = _hparams(name, fts)
  hp_perm = {k: [v[i] for i in perm] for k, v in hp.items()}
  a = mtx.merging.merge(pre, fts, name, **hp)
  b = mtx.merging.merge(pre, [fts[i] for i in perm], name, **hp_perm)
  _close(a, b, 2e-5)


@pytest.mark.parametrize("name", ALL)
def test_combine_jit_equals_eager(name, pre):
  fts = _finetuned(pre, _n(name))
  tvs = mtree.stack([mtx.task_vectors.task_vector(pre, f) for f in fts])
  merger = mtx.merging.get(name, **_hparams(name, fts))
  key = jax.random.key(3)
  stats = merger.prepare(tvs, key=key)
  eager = merger.combine(tvs, stats, scale=0.8, key=key, pretrained=pre)
  jitted = jax.jit(
      lambda tvs, stats, s, pre: merger.combine(
          tvs, stats, scale=s, key=key, pretrained=pre
      )
  )(tvs, stats, 0.8, pre)
  _close(eager, jitted, 1e-5)


@pytest.mark.parametrize("name", ["task_arithmetic", "ties", "pcb", "tsvm"])
def test_no_recompilation_on_a_second_call(name, pre):
  fts = _finetuned(pre, T)
  _merge(name, pre, fts)  # compiles
  fts2 = _finetuned(pre, T, seed=5)
  with jax.log_compiles():
    import logging

    records = []

    class _H(logging.Handler):

      def emit(self, record):
        records.append(record.getMessage())

    h = _H()
    logging.getLogger("jax").addHandler(h)
    try:
      _merge(name, pre, fts2, scale=0.3)
    finally:
      logging.getLogger("jax").removeHandler(h)
  compiles = [r for r in records if "Compiling" in r]
  assert not compiles, compiles


@pytest.mark.parametrize("name", ALL)
def test_bfloat16_in_bfloat16_out(name):
  pre = _params(jax.random.key(0), jnp.bfloat16)
  fts = _finetuned(pre, _n(name), dtype=jnp.bfloat16)
  out = _merge(name, pre, fts)
  for x in jax.tree.leaves(out):
    assert x.dtype == jnp.bfloat16
  # Same result (to bf16 precision) as merging the float32 upcasts.
  ref = _merge(
      name,
      jax.tree.map(lambda x: x.astype(jnp.float32), pre),
      [jax.tree.map(lambda x: x.astype(jnp.float32), f) for f in fts],
  )
  _close(out, ref, 5e-2)


@pytest.mark.parametrize("name", ["task_arithmetic", "ties", "pcb"])
def test_inputs_are_not_modified_and_stay_usable(name, pre):
  fts = _finetuned(pre, T)
  before = [jax.tree.map(np.array, t) for t in [pre, *fts]]
  out = _merge(name, pre, fts)
  jax.block_until_ready(out)
  for b, t in zip(before, [pre, *fts]):
    _close(t, b, 0)  # still readable (not donated) and unchanged


def test_leaves_left_out_keep_the_pretrained_arrays(pre):
  fts = _finetuned(pre, T)
  out = mtx.merging.merge(pre, fts, "ties", exclude=[r"^encoder/layers_1"])
  assert (
      out["encoder"]["layers_1"]["kernel"]
      is pre["encoder"]["layers_1"]["kernel"]
  )
  assert not np.allclose(
      out["encoder"]["layers_0"]["kernel"], pre["encoder"]["layers_0"]["kernel"]
  )
  inc = mtx.merging.merge(pre, fts, "ties", include="kernel$")
  assert inc["logit_scale"] is pre["logit_scale"]


def test_global_threshold_is_over_included_leaves_only(pre):
  fts = _finetuned(pre, T)
  a = mtx.merging.merge(pre, fts, "ties", include="layers_0/kernel")
  b = mtx.merging.merge(
      {"k": pre["encoder"]["layers_0"]["kernel"]},
      [{"k": f["encoder"]["layers_0"]["kernel"]} for f in fts],
      "ties",
  )
  np.testing.assert_allclose(a["encoder"]["layers_0"]["kernel"], b["k"])


def test_per_layer_scale_prefix_tree(pre):
  fts = _finetuned(pre, T)
  s = {"encoder": {"layers_0": 1.0, "layers_1": 0.0}, "logit_scale": 0.5}
  out = mtx.merging.merge(pre, fts, "task_arithmetic", scale=s)
  tv = [mtx.task_vectors.task_vector(pre, f) for f in fts]
  want = jax.tree.map(
      lambda p, sc, *t: p + sc * sum(t), pre, jax.tree.broadcast(s, pre), *tv
  )
  _close(out, want, 1e-5)


def test_scale_sweep_is_one_vmapped_program(pre):
  fts = _finetuned(pre, T)
  tvs = mtree.stack([mtx.task_vectors.task_vector(pre, f) for f in fts])
  ties = mtx.merging.get("ties", density=0.5)
  stats = ties.prepare(tvs)
  scales = jnp.linspace(0.1, 1.0, 4)
  sweep = jax.jit(
      jax.vmap(
          lambda tvs, s: ties.combine(tvs, stats, scale=s), in_axes=(None, 0)
      )
  )
  out = sweep(tvs, scales)
  for i, s in enumerate(scales):
    want = mtx.merging.merge(pre, fts, "ties", density=0.5, scale=float(s))
    _close(
        jax.tree.map(lambda x, i=i: x[i], out),
        mtx.task_vectors.task_vector(pre, want),
        1e-5,
    )
  # and through merge() itself under vmap
  vm = jax.vmap(
      lambda s: mtx.merging.merge(pre, fts, "task_arithmetic", scale=s)
  )(scales)
  assert vm["logit_scale"].shape == (4,)


def test_grad_reaches_the_scale(pre):
  fts = _finetuned(pre, T)
  tvs = mtree.stack([mtx.task_vectors.task_vector(pre, f) for f in fts])
  ta = mtx.merging.get("task_arithmetic")

  def loss(s):
    merged = ta.combine(tvs, scale=s)
    return mtree.vdot(merged, merged)

  g = jax.grad(loss)(jnp.full((T,), 0.5))
  eps = 1e-3
  fd = [
      (
          loss(jnp.full((T,), 0.5).at[i].add(eps))
          - loss(jnp.full((T,), 0.5).at[i].add(-eps))
      )
      / (2 * eps)
      for i in range(T)
  ]
  np.testing.assert_allclose(g, fd, rtol=1e-2)


def test_x64_run():
  code = (
      "import jax; jax.config.update('jax_enable_x64', True)\n"
      "import jax.numpy as jnp, numpy as np, mtx\n"
      "pre = {'w': jnp.zeros(5, jnp.float64)}\n"
      "fts = [{'w': jnp.array([1e-9, 2., -3., 4., 5.], jnp.float64)},\n"
      "       {'w': jnp.array([1e-9, -2., 3., 4., 1.], jnp.float64)}]\n"
      "for m in mtx.merging.METHODS:\n"
      "  if m in ('fisher', 'regmean'): continue\n"
      "  out = mtx.merging.merge(pre, fts, m, key=jax.random.key(0))\n"
      "  assert out['w'].dtype == jnp.float64, (m, out['w'].dtype)\n"
      "out = mtx.merging.merge(pre, fts, 'average')\n"
      "assert out['w'][0] == 1e-9, out['w'][0]\n"
      "out = mtx.merging.merge(pre, fts, 'ties', density=0.4)\n"
      "np.testing.assert_array_equal(out['w'], [0, 0, 3, 4, 5])\n"
      "print('ok')\n"
  )
  r = subprocess.run(
      [sys.executable, "-c", code],
      capture_output=True,
      text=True,
      env={**os.environ, "JAX_PLATFORMS": "cpu"},
      timeout=300,
  )
  assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-3000:]


# ----------------------------------------------------------------------------
# Bad input: ValueError naming the path or value, before any work.


def test_errors_on_structure_shape_dtype(pre):
  fts = _finetuned(pre, T)
  missing = dict(fts[0])
  del missing["logit_scale"]
  with pytest.raises(
      ValueError, match="finetuned\\[1\\] is missing leaf " "'logit_scale'"
  ):
    mtx.merging.merge(pre, [fts[0], missing], "average")
  extra = {**fts[0], "new": jnp.zeros(2)}
  with pytest.raises(ValueError, match="extra leaf 'new'"):
    mtx.merging.merge(pre, [extra], "average")
  bad = jax.tree.map(lambda x: x, fts[0])
  bad["encoder"]["layers_0"]["kernel"] = jnp.zeros((5, 6))
  with pytest.raises(
      ValueError, match="shape mismatch at " "'encoder/layers_0/kernel'"
  ):
    mtx.merging.merge(pre, [bad], "average")
  bad["encoder"]["layers_0"]["kernel"] = jnp.zeros((6, 5), jnp.bfloat16)
  with pytest.raises(
      ValueError, match="dtype mismatch at " "'encoder/layers_0/kernel'"
  ):
    mtx.merging.merge(pre, [bad], "average")


def test_errors_on_integer_leaves():
  pre = {"w": jnp.zeros(3), "step": jnp.array(3, jnp.int32)}
  fts = [{"w": jnp.ones(3), "step": jnp.array(5, jnp.int32)}]
  with pytest.raises(ValueError, match="'step'.*integer"):
    mtx.merging.merge(pre, fts, "average")
  out = mtx.merging.merge(pre, fts, "average", exclude="^step$")
  assert int(out["step"]) == 3
  with pytest.raises(ValueError, match="'step'"):
    mtx.task_vectors.task_vector(pre, fts[0])


def test_errors_on_nan_and_inf(pre):
  fts = _finetuned(pre, 2)
  bad = jax.tree.map(lambda x: x, fts[1])
  bad["encoder"]["layers_1"]["kernel"] = (
      bad["encoder"]["layers_1"]["kernel"].at[0, 0].set(jnp.nan)
  )
  with pytest.raises(
      ValueError,
      match="finetuned\\[1\\] has NaN or Inf at " "'encoder/layers_1/kernel'",
  ):
    mtx.merging.merge(pre, [fts[0], bad], "ties")
  bad["encoder"]["layers_1"]["kernel"] = (
      bad["encoder"]["layers_1"]["kernel"].at[0, 0].set(jnp.inf)
  )
  with pytest.raises(ValueError, match="NaN or Inf"):
    mtx.merging.merge(pre, [fts[0], bad], "average")
  # switchable off
  out = mtx.merging.merge(pre, [fts[0], bad], "average", check_finite=False)
  assert np.isinf(out["encoder"]["layers_1"]["kernel"][0, 0])


@pytest.mark.parametrize("density", [0.0, -0.1, 1.5, float("nan"), "x"])
def test_errors_on_density_out_of_range(density, pre):
  for name in ("ties", "breadcrumbs", "compeft"):
    with pytest.raises(ValueError, match="density"):
      mtx.merging.merge(pre, [pre], name, density=density)


def test_errors_on_empty_and_unknown(pre):
  with pytest.raises(ValueError, match="no fine-tuned models"):
    mtx.merging.merge(pre, [], "average")
  with pytest.raises(ValueError, match="unknown merging method 'tie'"):
    mtx.merging.merge(pre, [pre], "tie")
  with pytest.raises(ValueError, match="unknown merging method"):
    mtx.merging.get("nope")
  with pytest.raises(ValueError, match="unknown hyperparameter.*'densty'"):
    mtx.merging.merge(pre, [pre], "ties", densty=0.2)
  with pytest.raises(ValueError, match="unknown coefficient"):
    mtx.merging.get("slerp").combine(
        mtree.stack([pre, pre]), pretrained=pre, q=1.0
    )
  with pytest.raises(ValueError, match="reduce must be one of"):
    mtx.merging.get("ties", reduce="median")
  with pytest.raises(ValueError, match="finetuned must be a list"):
    mtx.merging.merge(pre, pre, "average")


def test_errors_on_dare_without_key_and_bad_task_counts(pre):
  with pytest.raises(ValueError, match="key=jax.random.key"):
    mtx.merging.merge(pre, [pre, pre], "dare")
  with pytest.raises(ValueError, match="drop_rate"):
    mtx.merging.get("dare", drop_rate=1.0)
  with pytest.raises(ValueError, match="at most 2"):
    mtx.merging.merge(pre, [pre] * 3, "slerp")
  with pytest.raises(ValueError, match="at least 2"):
    mtx.merging.merge(pre, [pre], "model_stock")


def test_errors_on_bad_scale(pre):
  with pytest.raises(ValueError, match="takes a scalar scale"):
    mtx.merging.merge(pre, [pre, pre], "ties", scale=jnp.ones(2))
  with pytest.raises(ValueError, match="shape"):
    mtx.merging.merge(pre, [pre, pre], "task_arithmetic", scale=jnp.ones(3))
  # A plain list is a per-task vector, not a pytree.
  out = mtx.merging.merge(pre, [pre, pre], "task_arithmetic", scale=[1.0, 0.5])
  _close(out, pre, 0)


def test_errors_on_selection(pre):
  with pytest.raises(ValueError, match="select no leaf"):
    mtx.merging.merge(pre, [pre], "average", include="nothing_matches")
  with pytest.raises(ValueError, match="invalid path regex"):
    mtx.merging.merge(pre, [pre], "average", include="(")
