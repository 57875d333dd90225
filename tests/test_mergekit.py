"""mtx.io.mergekit: MergeKit configs give MergeKit's results.

The references below restate MergeKit's per-tensor formulas (read from
mergekit/merge_methods/generalized_task_arithmetic.py, linear.py, slerp.py,
model_stock.py and sparsify.py) in numpy; each config is translated by
mtx.io.mergekit, run by mtx.io.streaming and compared with them.
"""

import os

from absl.testing import flagsaver
import binaries
import mtx
import numpy as np
import pytest

from mtx.io import mergekit
from mtx.io import safetensors as st
from mtx.io import streaming

NAMES = [
    "model.embed_tokens.weight",
    "model.layers.0.mlp.up_proj.weight",
    "model.layers.0.self_attn.q_proj.weight",
    "model.layers.1.mlp.up_proj.weight",
    "model.layers.1.self_attn.q_proj.weight",
    "model.layers.2.mlp.up_proj.weight",
    "model.layers.2.self_attn.q_proj.weight",
    "model.norm.weight",
]


def _shape(name):
  return (16,) if name.endswith("norm.weight") else (8, 12)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
  """Paths of base, a, b, c (float32, random)."""
  root = tmp_path_factory.mktemp("mk")
  rng = np.random.default_rng(1)
  base = {n: rng.standard_normal(_shape(n)).astype(np.float32) for n in NAMES}
  paths = {}
  for i, name in enumerate(["base", "a", "b", "c"]):
    t = (
        base
        if i == 0
        else {
            n: (x + 0.3 * rng.standard_normal(x.shape)).astype(np.float32)
            for n, x in base.items()
        }
    )
    d = root / name
    d.mkdir()
    st.write(d / "model.safetensors", t)
    paths[name] = str(d)
  return paths


def _run(config, models, key_seed=0):
  recipe = mergekit.parse(config)
  pre = streaming.open_model(recipe.pretrained)
  plan = recipe.plan(pre.paths)
  import jax  # pylint: disable=g-import-not-at-top

  out = dict(
      streaming.merge_tensors(
          pre, recipe.finetuned, plan, key=jax.random.key(key_seed)
      )
  )
  return recipe, {n: np.asarray(v[0]) for n, v in out.items()}


def _t(name):
  return mergekit.layer_fractions(NAMES)[name]


def _tensors(models, *names):
  return [st.read(models[n]) for n in names]


# -- MergeKit's formulas, restated ---------------------------------------------


def _sparsify(delta, d, kind, rescale, gamma=0.01):
  if kind is None or d >= 1:
    return delta
  a = np.abs(delta).ravel()
  n = a.size
  mask = np.zeros(n, np.float32)
  if kind == "magnitude":
    mask[np.argsort(-a, kind="stable")[: int(d * n)]] = 1
  else:  # magnitude_outliers
    n_top, target = int(gamma * n), int(d * n)
    n_bot = n - target - n_top
    if n_bot < 0:
      n_top += n_bot
      n_bot = 0
    mask[np.argsort(a, kind="stable")[n_bot : n - n_top]] = 1
  masked = delta * mask.reshape(delta.shape)
  if rescale:
    before, after = np.abs(delta).sum(), np.abs(masked).sum()
    if before >= 1e-7 and after >= 1e-7:
      masked = masked * (before / after)
  return masked


def _gta(
    base, xs, ws, ds, *, kind, consensus, normalize, rescale, lam, gamma=0.01
):
  deltas = np.stack(
      [_sparsify(x - base, d, kind, rescale, gamma) for x, d in zip(xs, ds)]
  )
  w = np.asarray(ws, np.float32).reshape((-1,) + (1,) * base.ndim)
  wd = deltas * w
  if consensus:
    majority = np.where(wd.sum(0) >= 0, 1.0, -1.0)
    mask = np.sign(wd) == majority
    mixed = (wd * mask).sum(0)
    div = (w * mask).sum(0)
    div[div == 0] = 1
  else:
    mixed = wd.sum(0)
    div = w.sum()
    if abs(div) < 1e-8:
      div = 1.0
  if normalize:
    mixed = mixed / div
  return base + lam * mixed


def _slerp(t, v0, v1, eps=1e-8):
  def unit(v):
    n = np.linalg.norm(v)
    return v / n if n > eps else v

  dot = np.sum(unit(v0) * unit(v1))
  if abs(dot) > 0.9995:
    return (1 - t) * v0 + t * v1
  theta = np.arccos(dot)
  s = np.sin(theta)
  return np.sin(theta - theta * t) / s * v0 + np.sin(theta * t) / s * v1


def _model_stock(base, xs):
  offs = [(x - base).ravel() for x in xs]
  cos = []
  for i in range(len(offs)):
    for j in range(i + 1, len(offs)):
      c = (
          offs[i]
          @ offs[j]
          / max(np.linalg.norm(offs[i]) * np.linalg.norm(offs[j]), 1e-6)
      )
      cos.append(np.clip(c, -1, 1))
  c = np.mean(cos)
  n = len(xs)
  t = n * c / (1 + (n - 1) * c)
  return t * (sum(xs) / n) + (1 - t) * base


def _close(got, want, name):
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-6, err_msg=name)


# -- methods -------------------------------------------------------------------


def test_linear(models):
  cfg = {
      "merge_method": "linear",
      "models": [
          {"model": models["a"], "parameters": {"weight": 1.0}},
          {"model": models["b"], "parameters": {"weight": 3.0}},
      ],
  }
  _, got = _run(cfg, models)
  a, b = _tensors(models, "a", "b")
  for n in NAMES:
    _close(got[n], (a[n] + 3 * b[n]) / 4, n)


@pytest.mark.parametrize("normalize", [False, True])
def test_task_arithmetic_with_weight_gradient(models, normalize):
  cfg = {
      "merge_method": "task_arithmetic",
      "base_model": models["base"],
      "models": [
          {"model": models["a"], "parameters": {"weight": [0.2, 1.0]}},
          {"model": models["b"], "parameters": {"weight": 0.5}},
      ],
      "parameters": {"normalize": normalize, "lambda": 0.8},
  }
  _, got = _run(cfg, models)
  base, a, b = _tensors(models, "base", "a", "b")
  for n in NAMES:
    w = [0.2 + 0.8 * _t(n), 0.5]
    want = _gta(
        base[n],
        [a[n], b[n]],
        w,
        [1, 1],
        kind=None,
        consensus=False,
        normalize=normalize,
        rescale=False,
        lam=0.8,
    )
    _close(got[n], want, n)


@pytest.mark.parametrize(
    "normalize,rescale", [(True, False), (False, False), (True, True)]
)
def test_ties_per_model_weights_and_densities(models, normalize, rescale):
  cfg = {
      "merge_method": "ties",
      "base_model": models["base"],
      "models": [
          {
              "model": models["a"],
              "parameters": {"weight": 1.0, "density": [0.3, 0.7]},
          },
          {"model": models["b"], "parameters": {"weight": 0.4, "density": 0.5}},
          {"model": models["c"], "parameters": {"weight": 2.0}},  # density 1
      ],
      "parameters": {
          "normalize": normalize,
          "rescale": rescale,
          "lambda": 1.5,
          "int8_mask": True,
      },
  }
  recipe, got = _run(cfg, models)
  assert any("int8_mask" in note for note in recipe.notes)
  base, a, b, c = _tensors(models, "base", "a", "b", "c")
  for n in NAMES:
    ds = [0.3 + 0.4 * _t(n), 0.5, 1.0]
    want = _gta(
        base[n],
        [a[n], b[n], c[n]],
        [1.0, 0.4, 2.0],
        ds,
        kind="magnitude",
        consensus=True,
        normalize=normalize,
        rescale=rescale,
        lam=1.5,
    )
    _close(got[n], want, n)


def test_dare_without_drop_is_the_consensus_merge(models):
  # Random drops cannot match torch's; density 1 checks everything else.
  for method, consensus in (("dare_ties", True), ("dare_linear", False)):
    cfg = {
        "merge_method": method,
        "base_model": models["base"],
        "models": [
            {"model": models["a"], "parameters": {"weight": 0.7}},
            {"model": models["b"], "parameters": {"weight": 0.3}},
        ],
    }
    _, got = _run(cfg, models)
    base, a, b = _tensors(models, "base", "a", "b")
    for n in NAMES:
      want = _gta(
          base[n],
          [a[n], b[n]],
          [0.7, 0.3],
          [1, 1],
          kind=None,
          consensus=consensus,
          normalize=False,
          rescale=True,
          lam=1.0,
      )
      _close(got[n], want, n)


def test_dare_ties_translation_and_l1_rescale(models):
  cfg = {
      "merge_method": "dare_ties",
      "base_model": models["base"],
      "models": [
          {"model": models["a"], "parameters": {"weight": 1.0, "density": 0.5}},
          {"model": models["b"], "parameters": {"weight": 1.0, "density": 0.8}},
      ],
  }
  recipe, got = _run(cfg, models)
  spec = recipe.plan(NAMES)[NAMES[1]]
  hp = dict(spec.hparams)
  assert spec.method == "dare" and hp["then"] == "ties"
  assert hp["rescale"] == "l1" and hp["zero_sign"] == "positive"
  np.testing.assert_allclose(hp["drop_rate"], (0.5, 0.2))
  assert hp["reduce"] == "sum"  # dare_ties does not normalize by default
  # Each kept task vector keeps its L1 norm; the merge stays near the inputs.
  base, a, b = _tensors(models, "base", "a", "b")
  for n in NAMES:
    assert np.isfinite(got[n]).all()
    assert np.abs(got[n] - base[n]).max() < 3 * max(
        np.abs(a[n] - base[n]).max(), np.abs(b[n] - base[n]).max()
    )


def test_breadcrumbs(models):
  cfg = {
      "merge_method": "breadcrumbs",
      "base_model": models["base"],
      "models": [
          {"model": models["a"], "parameters": {"weight": 0.5}},
          {"model": models["b"], "parameters": {"weight": 1.0}},
      ],
      "parameters": {"density": 0.5, "gamma": 0.1},
  }
  _, got = _run(cfg, models)
  base, a, b = _tensors(models, "base", "a", "b")
  for n in NAMES:
    want = _gta(
        base[n],
        [a[n], b[n]],
        [0.5, 1.0],
        [0.5, 0.5],
        kind="outliers",
        consensus=False,
        normalize=False,
        rescale=False,
        lam=1.0,
        gamma=0.1,
    )
    _close(got[n], want, n)


def test_model_stock(models):
  cfg = {
      "merge_method": "model_stock",
      "base_model": models["base"],
      "models": [{"model": models[m]} for m in ("base", "a", "b", "c")],
  }
  _, got = _run(cfg, models)
  base, a, b, c = _tensors(models, "base", "a", "b", "c")
  for n in NAMES:
    _close(got[n], _model_stock(base[n], [a[n], b[n], c[n]]), n)


def test_slerp_slices_with_filtered_gradients(models):
  cfg = {
      "slices": [
          {
              "sources": [
                  {"model": models["base"], "layer_range": [0, 3]},
                  {"model": models["a"], "layer_range": [0, 3]},
              ]
          }
      ],
      "merge_method": "slerp",
      "base_model": models["base"],
      "parameters": {
          "t": [
              {"filter": "self_attn", "value": [0, 0.5, 1]},
              {"filter": "mlp", "value": [1, 0.2]},
              {"value": 0.3},
          ]
      },
      "dtype": "float32",
  }
  recipe, got = _run(cfg, models)
  assert recipe.finetuned == [models["base"], models["a"]]
  base, a = _tensors(models, "base", "a")
  for n in NAMES:
    tt = _t(n)
    if "self_attn" in n:
      t = tt  # [0, 0.5, 1] at layer fraction tt
    elif "mlp" in n:
      t = 1 - 0.8 * tt
    else:
      t = 0.3
    _close(got[n], _slerp(t, base[n], a[n]), n)


def test_layer_fractions_and_gradients():
  assert mergekit.evaluate([0.0, 1.0, 0.0], "x", 0.75) == 0.5
  assert mergekit.evaluate([{"filter": "q", "value": 1}], "k_proj", 0) is None
  assert mergekit.evaluate({"filter": "*", "value": 2}, "k_proj", 0) == 2
  f = mergekit.layer_fractions(NAMES)
  assert f["model.layers.1.mlp.up_proj.weight"] == 0.5
  assert f["model.embed_tokens.weight"] == f["model.norm.weight"] == 0.0
  assert mergekit.layer_fractions(["h.0.w"]) == {"h.0.w": 1.0}
  assert mergekit.num_layers(NAMES) == 3


def test_load_resolves_paths_relative_to_the_config(models, tmp_path):
  cfg = tmp_path / "merge.yaml"
  rel_a = os.path.relpath(models["a"], tmp_path)
  cfg.write_text(
      "merge_method: task_arithmetic\n"
      f"base_model: {models['base']}\n"
      "models:\n"
      f"  - model: {rel_a}\n"
      "    parameters:\n      weight: 0.5\n"
      "dtype: bfloat16\n"
  )
  recipe = mergekit.load(cfg)
  assert recipe.finetuned == [models["a"]] and recipe.dtype == "bfloat16"


def test_binary_with_a_mergekit_config(models, tmp_path):
  binary = binaries.load("merge")
  cfg = tmp_path / "ties.yaml"
  cfg.write_text(
      "merge_method: ties\n"
      f"base_model: {models['base']}\n"
      "models:\n"
      f"  - model: {models['a']}\n"
      "    parameters: {weight: 1.0, density: 0.5}\n"
      f"  - model: {models['b']}\n"
      "    parameters: {weight: 0.5, density: 0.5}\n"
      "parameters: {normalize: true}\n"
      "out_dtype: float16\n"
  )
  out = tmp_path / "out"
  with flagsaver.flagsaver(config=str(cfg), out=str(out)):
    binary.main(["merge"])
  got = st.read(out)
  base, a, b = _tensors(models, "base", "a", "b")
  for n in NAMES:
    assert got[n].dtype == np.float16
    want = _gta(
        base[n],
        [a[n], b[n]],
        [1.0, 0.5],
        [0.5, 0.5],
        kind="magnitude",
        consensus=True,
        normalize=True,
        rescale=False,
        lam=1.0,
    )
    np.testing.assert_allclose(got[n], want, rtol=2e-3, atol=2e-3)


# -- what is refused -------------------------------------------------------------


def _base_cfg(paths, change=None, **kw):
  cfg = {
      "merge_method": "ties",
      "base_model": paths["base"],
      "models": [
          {"model": paths["a"], "parameters": {"weight": 1.0, "density": 0.5}},
          {"model": paths["b"], "parameters": {"weight": 1.0, "density": 0.5}},
      ],
  }
  cfg.update(change or {})
  cfg.update(kw)
  return cfg


@pytest.mark.parametrize(
    "change,match",
    [
        ({"merge_methd": "ties"}, r"unknown MergeKit key 'merge_methd'"),
        ({"merge_method": "della"}, r"merge_method 'della' is not supported"),
        ({"merge_method": "frob"}, r"unknown MergeKit merge_method 'frob'"),
        ({"modules": {"text": {}}}, r"key 'modules' is not supported"),
        ({"chat_template": "x"}, r"key 'chat_template' is not supported"),
        ({"tokenizer_source": "union"}, r"tokenizer_source: union"),
        (
            {"parameters": {"epsilon": 0.1}},
            r"unknown MergeKit key parameters\.epsilon",
        ),
        ({"parameters": {"normalize": "yes"}}, r"parameters\.normalize"),
        ({"dtype": "int4"}, r"'dtype': unknown dtype"),
        ({"base_model": None}, r"needs a base_model"),
        (
            {"models": [{"model": "/no/such/model", "parameters": {}}]},
            r"models\[0\]\.model: model '/no/such/model' not found",
        ),
        ({"models": [{"model": "org/m+lora/x"}]}, r"LoRA references"),
    ],
)
def test_refused_configs_name_the_key(models, change, match):
  with pytest.raises((ValueError, FileNotFoundError), match=match):
    mergekit.parse(_base_cfg(models, change))


def test_refused_per_model_and_per_tensor_options(models):
  cfg = _base_cfg(models)
  cfg["models"][0]["parameters"]["normalize"] = True
  with pytest.raises(ValueError, match=r"models\[0\]\.parameters\.normalize"):
    mergekit.parse(cfg)
  cfg = _base_cfg(models)
  del cfg["models"][1]["parameters"]["weight"]
  recipe = mergekit.parse(cfg)
  with pytest.raises(ValueError, match=r"required MergeKit parameter 'weight'"):
    recipe.plan(NAMES)
  cfg = _base_cfg(models, merge_method="breadcrumbs")
  cfg["models"][1]["parameters"]["density"] = 0.3
  with pytest.raises(ValueError, match=r"per-model 'density'"):
    mergekit.parse(cfg).plan(NAMES)
  cfg = _base_cfg(models, merge_method="linear", base_model=None)
  cfg["parameters"] = {"normalize": False}
  for m in cfg["models"]:
    del m["parameters"]["density"]
  with pytest.raises(ValueError, match=r"normalize: false"):
    mergekit.parse(cfg).plan(NAMES)
  cfg = {
      "merge_method": "model_stock",
      "base_model": models["base"],
      "models": [{"model": models["a"]}, {"model": models["b"]}],
      "parameters": {"filter_wise": True},
  }
  with pytest.raises(ValueError, match="filter_wise"):
    mergekit.parse(cfg).plan(NAMES)
  slices = {
      "merge_method": "slerp",
      "base_model": models["base"],
      "parameters": {"t": 0.5},
      "slices": [
          {
              "sources": [
                  {"model": models["base"], "layer_range": [0, 2]},
                  {"model": models["a"], "layer_range": [0, 2]},
              ]
          }
      ],
  }
  with pytest.raises(ValueError, match=r"layer_range \[0, 2\] does not span"):
    mergekit.parse(slices).plan(NAMES)
  slices["slices"] = slices["slices"] * 2
  with pytest.raises(ValueError, match="more than one slice"):
    mergekit.parse(slices)
  three = {
      "merge_method": "slerp",
      "base_model": models["base"],
      "parameters": {"t": 0.5},
      "models": [{"model": models[m]} for m in ("a", "b")],
  }
  with pytest.raises(ValueError, match="exactly two models"):
    mergekit.parse(three)


@pytest.mark.parametrize("method", ["ties", "dare_ties", "task_arithmetic"])
@pytest.mark.parametrize("density", [2.0, 0.0, -0.5])
def test_density_outside_0_1_is_refused_as_by_the_flag(models, method, density):
  # MergeKit clamps density 2 to 1; mtx refuses it in YAML as its flag does.
  cfg = _base_cfg(models, merge_method=method)
  cfg["models"][1]["parameters"]["density"] = density
  if method == "task_arithmetic":  # density has no effect there (noted)
    mergekit.parse(cfg).plan(NAMES)
    return
  with pytest.raises(ValueError, match=r"'density' must be in \(0, 1\]"):
    mergekit.parse(cfg).plan(NAMES)
  with pytest.raises(ValueError, match="density"):
    mtx.merging.get("ties", density=density)
