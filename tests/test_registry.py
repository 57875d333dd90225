"""Properties every registered merging method must have, and input checks."""

import os
import pathlib
import re
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
# every τt = τ), at scale 1, worked out by hand from each method's formula.
# ``tau`` maps paths to numpy leaves; T tasks (2 for SLERP).


def _top_mask(tau, density):
  """``|τ| >= k-th largest |τ|`` over all leaves, k = max(1, int(n·d))."""
  flat = np.concatenate([np.abs(v).ravel() for v in tau.values()])
  k = max(1, int(flat.size * density))
  thr = np.sort(flat)[::-1][k - 1]
  return {p: np.abs(v) >= thr for p, v in tau.items()}


def _ties(tau):  # trim (density 0.2, global), elect sign(τ), mean of T equal
  m = _top_mask(tau, 0.2)
  return {p: np.where(m[p], v, 0) for p, v in tau.items()}


def _compeft(tau):  # Σt α σ sign(τ) mask, σ the unbiased std of τ
  flat = np.concatenate([v.ravel() for v in tau.values()]).astype(np.float64)
  m = _top_mask(tau, 0.2)
  sd = flat.std(ddof=1)
  return {p: T * sd * np.sign(v) * m[p] for p, v in tau.items()}


def _breadcrumbs(tau):  # rows of n: drop the top int(0.2n), keep int(0.5n)
  out = {}
  for p, v in tau.items():
    if v.ndim == 0:
      out[p] = T * v
      continue
    n = v.shape[-1]
    rank = np.argsort(np.argsort(-np.abs(v), axis=-1), axis=-1)
    keep = (rank >= int(0.2 * n)) & (rank < int(0.2 * n) + int(0.5 * n))
    out[p] = T * np.where(keep, v, 0)
  return out


def _dare_magnitude(tau):  # per leaf keep the top half, survivors ·2, sum T
  out = {}
  for p, v in tau.items():
    a = np.sort(np.abs(v).ravel())[::-1]
    thr = a[max(1, int(a.size * 0.5)) - 1]
    out[p] = T * 2.0 * np.where(np.abs(v) >= thr, v, 0)
  return out


def _pcb(tau):  # equal scores: sign(τ)·clip(|τ|, lo, hi) where w > 0
  flat = np.concatenate([np.abs(v).ravel() for v in tau.values()])
  d = flat.size
  asc = np.sort(flat)
  lo, hi = asc[int(d * 1e-4)], asc[int(d * (1 - 1e-4) - 1)]
  scores, clipped = {}, {}
  for p, v in tau.items():
    a = np.clip(np.abs(v), lo, hi)
    clipped[p] = np.sign(v) * a
    scores[p] = np.exp(T * ((a - lo) / (hi - lo)) ** 2) * np.tanh(T * v * v)
  s_lo = np.sort(np.concatenate([s.ravel() for s in scores.values()]))[
      int(d * (1 - 0.1))
  ]
  return {p: np.where(scores[p] > s_lo, clipped[p], 0) for p in tau}


def _lines(tau):  # α = 1/T (norm matching), ·(α + 0.5·ℓ/(L−1)) on Tτ; L=2
  depth = {"encoder/layers_1/kernel": 1.0}
  return {p: (1 / T + 0.5 * depth.get(p, 0.0)) * T * v for p, v in tau.items()}


def _iso_c(tau):  # mean(σ)·U Vᵀ of Σt τt = Tτ per matrix, mean elsewhere
  out = {}
  for p, v in tau.items():
    if v.ndim == 2:
      u, s, vt = np.linalg.svd(T * v, full_matrices=False)
      out[p] = s.mean() * u @ vt
    else:
      out[p] = v
  return out


def _times_t(tau):
  return {p: T * v for p, v in tau.items()}


IDENTICAL = {
    "average": ({}, lambda tau: tau),
    "weighted_average": ({}, lambda tau: tau),
    "task_arithmetic": ({}, _times_t),
    "ties": ({}, _ties),
    "dare": ({"mode": "magnitude"}, _dare_magnitude),
    "breadcrumbs": ({"density": 0.5, "top_remove": 0.2}, _breadcrumbs),
    # λ=0.4: |τ| > 0.4·|Tτ − τ| everywhere, so every mask is full: Tτ.
    "consensus": ({}, _times_t),
    "pcb": ({}, _pcb),
    "lines": ({}, _lines),
    "model_stock": ({}, lambda tau: tau),  # cos = 1 -> t = 1
    "slerp": ({}, lambda tau: tau),  # |cos| > 0.9995 -> lerp of equal tensors
    "fisher": ({}, lambda tau: tau),  # Σ F τ / Σ F
    "regmean": ({}, lambda tau: tau),  # (ΣG)⁻¹ Σ G τ
    "compeft": ({}, _compeft),
    "iso_c": ({}, _iso_c),
    "tsvm": ({}, None),  # not unique: see the test below
}


def _check_tsvm_identical(got, tau):
  """TSV-M: T copies of U_k make the polar factors of the concatenated bases
  non-unique beyond rank k; what is determined is that the top-k singular
  pairs are kept (out V_k = U_k S_k, U_kᵀ out = S_k V_kᵀ, k = min(m, n)
  // T); other leaves get the mean."""
  for p, v in tau.items():
    if v.ndim != 2:
      np.testing.assert_allclose(got[p], v, rtol=1e-4, atol=1e-5)
      continue
    k = min(v.shape) // T
    u, s, vt = np.linalg.svd(v, full_matrices=False)
    np.testing.assert_allclose(
        got[p] @ vt[:k].T, u[:, :k] * s[:k], rtol=1e-4, atol=1e-4
    )
    np.testing.assert_allclose(
        u[:, :k].T @ got[p], s[:k, None] * vt[:k], rtol=1e-4, atol=1e-4
    )


@pytest.mark.parametrize("name", ALL)
def test_identical_finetuned_models(name, pre):
  hp, want_fn = IDENTICAL[name]
  ft = _finetuned(pre, 1)[0]
  out = _merge(name, pre, [ft] * _n(name), **hp)
  got = {
      p: np.asarray(o, np.float64) - np.asarray(q, np.float64)
      for p, o, q in zip(
          mtree.paths(out), jax.tree.leaves(out), jax.tree.leaves(pre)
      )
  }
  tau = mtx.task_vectors.task_vector(pre, ft)
  tau = dict(zip(mtree.paths(tau), map(np.asarray, jax.tree.leaves(tau))))
  if want_fn is None:
    _check_tsvm_identical(got, tau)
    return
  want = want_fn(tau)
  assert set(want) == set(got)
  for p in want:
    np.testing.assert_allclose(
        got[p], want[p], rtol=1e-4, atol=1e-5, err_msg=f"{name} {p}"
    )
  assert any(np.abs(w).max() > 0 for w in want.values())  # not trivially 0


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


class _Compiles:
  """Counts XLA compilations (``jax.log_compiles`` records) in a block."""

  def __enter__(self):
    import logging

    self.records = []
    outer = self

    class _H(logging.Handler):

      def emit(self, record):
        if "Compiling" in record.getMessage():
          outer.records.append(record.getMessage())

    self._h = _H()
    self._log = jax.log_compiles()
    self._log.__enter__()
    logging.getLogger("jax").addHandler(self._h)
    return self

  def __exit__(self, *exc):
    import logging

    logging.getLogger("jax").removeHandler(self._h)
    self._log.__exit__(*exc)

  @property
  def count(self):
    return len(self.records)


def test_scale_sweep_is_one_vmapped_program(pre):
  fts = _finetuned(pre, T)
  tvs = mtree.stack([mtx.task_vectors.task_vector(pre, f) for f in fts])
  ties = mtx.merging.get("ties", density=0.5)
  stats = ties.prepare(tvs)
  sweep = jax.jit(
      jax.vmap(
          lambda tvs, s: ties.combine(tvs, stats, scale=s), in_axes=(None, 0)
      )
  )
  scales = jnp.linspace(0.1, 1.0, 4)
  with _Compiles() as c:
    out = jax.block_until_ready(sweep(tvs, scales))
  # The whole sweep is one program: one compilation for all 4 scales...
  assert c.count == 1, c.records
  other = jax.block_until_ready(scales[::-1] * 0.5)
  with _Compiles() as c:
    jax.block_until_ready(sweep(tvs, other))
  assert c.count == 0, c.records  # ...and none for new values.
  for i, s in enumerate(scales):
    want = mtx.merging.merge(pre, fts, "ties", density=0.5, scale=float(s))
    _close(
        jax.tree.map(lambda x, i=i: x[i], out),
        mtx.task_vectors.task_vector(pre, want),
        1e-5,
    )
  # and through merge() itself under vmap: compiled once per batch shape.
  vmerge = jax.jit(
      jax.vmap(
          lambda s: mtx.merging.merge(pre, fts, "task_arithmetic", scale=s)
      )
  )
  with _Compiles() as c:
    vm = vmerge(scales)
  assert c.count == 1, c.records
  assert vm["logit_scale"].shape == (4,)
  other = jax.block_until_ready(scales + 1.0)
  with _Compiles() as c:
    jax.block_until_ready(vmerge(other))
  assert c.count == 0, c.records


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
      "data = {'fisher': {'fishers': [{'w': jnp.ones(5)}] * 2},\n"
      "        'regmean': {'grams': [{'m': jnp.eye(3)}, {'m': 2 * jnp.eye(3)}]}}\n"
      "pre['m'] = jnp.zeros((3, 2), jnp.float64)\n"
      "for f in fts: f['m'] = jnp.arange(6.0).reshape(3, 2) + 1e-12\n"
      "assert len(mtx.merging.METHODS) == 16\n"
      "for m in mtx.merging.METHODS:\n"
      "  out = mtx.merging.merge(pre, fts, m, key=jax.random.key(0),\n"
      "                          **data.get(m, {}))\n"
      "  for x in jax.tree.leaves(out):\n"
      "    assert x.dtype == jnp.float64, (m, x.dtype)\n"
      "# Fisher and RegMean of equal matrices are that matrix, to 1e-12.\n"
      "for m in ('fisher', 'regmean'):\n"
      "  out = mtx.merging.merge(pre, fts, m, **data[m])\n"
      "  np.testing.assert_allclose(out['m'], fts[0]['m'], rtol=0, atol=1e-14)\n"
      "  np.testing.assert_allclose(out['w'], (fts[0]['w'] + fts[1]['w']) / 2,\n"
      "                             rtol=1e-12, atol=1e-15)\n"
      "out = mtx.merging.merge(pre, fts, 'average')\n"
      "assert out['w'][0] == 1e-9, out['w'][0]\n"
      "out = mtx.merging.merge(pre, fts, 'ties', density=0.4, include='^w$')\n"
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


@pytest.mark.parametrize("name", ALL)
def test_merger_name_is_the_registry_name(name, pre):
  fts = _finetuned(pre, _n(name))
  hp = {"then": "ties"} if name == "dare" else {}
  assert mtx.merging.get(name, **hp, **_hparams(name, fts)).name == name


# What each method merges, stated by hand (min, max; None: no limit).
TASK_LIMITS = {
    "average": (1, None),
    "weighted_average": (1, None),
    "task_arithmetic": (1, None),
    "ties": (1, None),
    "dare": (1, None),
    "breadcrumbs": (1, None),
    "consensus": (1, None),
    "pcb": (1, None),
    "lines": (1, None),
    "model_stock": (2, None),
    "slerp": (2, 2),
    "fisher": (1, None),
    "regmean": (1, None),
    "compeft": (1, None),
    "tsvm": (1, None),
    "iso_c": (1, None),
}


def test_task_limits_cover_every_method():
  assert set(TASK_LIMITS) == set(mtx.merging.METHODS)


@pytest.mark.parametrize("name", ALL)
def test_task_limits_without_building_the_method(name, pre):
  # Read from the registry entry (no data: fisher and regmean need none
  # here), and equal to what the built Merger enforces.
  assert mtx.merging.task_limits(name) == TASK_LIMITS[name]
  factory = mtx.merging.METHODS[name]
  assert (factory.min_tasks, factory.max_tasks) == TASK_LIMITS[name]
  merger = mtx.merging.get(name, **_hparams(name, _finetuned(pre, _n(name))))
  assert (merger.min_tasks, merger.max_tasks) == TASK_LIMITS[name]


def test_task_limits_of_a_wrapper_follow_its_base():
  assert mtx.merging.task_limits("dare", then="slerp") == (2, 2)
  assert mtx.merging.task_limits("lines", base="model_stock") == (2, None)
  assert mtx.merging.task_limits("lines", base="dare", then="slerp") == (2, 2)
  built = mtx.merging.get("dare", then="slerp")
  assert (built.min_tasks, built.max_tasks) == (2, 2)
  with pytest.raises(ValueError, match="unknown merging method"):
    mtx.merging.task_limits("nope")


def test_wrappers_take_a_base_by_name_or_built():
  by_name = mtx.merging.get("dare", then="ties", density=0.5, drop_rate=0.1)
  built = mtx.merging.get(
      "dare", then=mtx.merging.get("ties", density=0.5), drop_rate=0.1
  )
  assert by_name == built
  assert by_name.static.base.name == "ties"
  assert by_name.static.base.static.density == 0.5
  # Consensus over TIES defaults to the authors' disjoint sum.
  c = mtx.merging.get("consensus", base="ties", density=0.3)
  assert c.static.base.static.reduce == "sum"
  assert c.static.base.static.density == 0.3
  assert mtx.merging.get("consensus").static.base is None
  lines = mtx.merging.get("lines", base="ties", density=1.0, alpha=1.0)
  assert lines.static.base.name == "ties"
  with pytest.raises(ValueError, match="would drop twice"):
    mtx.merging.get("dare", then="dare")
  with pytest.raises(ValueError, match="cannot wrap itself"):
    mtx.merging.get("lines", base="lines")
  with pytest.raises(ValueError, match="base must be one of"):
    mtx.merging.get("consensus", base="slerp")
  with pytest.raises(ValueError, match="unknown merging method"):
    mtx.merging.get("dare", then="nope")
  with pytest.raises(ValueError, match="unknown hyperparameter"):
    mtx.merging.get("lines", base="task_arithmetic", nonsense=1)
  with pytest.raises(ValueError, match="unknown hyperparameter"):
    mtx.merging.get("dare", then=mtx.merging.get("ties"), density=0.5)


def test_structural_hyperparameters_are_named():
  ties = mtx.merging.get("ties", density=0.4, scope="per_leaf")
  assert ties.static.scope == "per_leaf" and ties.static.density == 0.4
  assert ties.static._fields == (
      "density",
      "sign",
      "reduce",
      "scope",
      "topk_rule",
      "zero_sign",
  )
  assert mtx.merging.get("slerp", space="task_vectors").static.space == (
      "task_vectors"
  )
  assert mtx.merging.get("dare", drop_rate=0.2).static.drop_rate == 0.2


def test_no_method_reads_its_hyperparameters_by_position():
  root = pathlib.Path(mtx.merging.__file__).parent
  for path in sorted(root.glob("*.py")):
    text = path.read_text()
    assert "static[" not in text, path.name
    assert re.search(r"^\s*[\w, ]+ = static\s*$", text, re.M) is None, path.name
