"""experiments/merge.py and mtx.io.streaming: streamed merges equal the
in-memory ones; outputs, sweeps, formats; bad input fails cleanly."""

import hashlib
import json
import os
import pathlib
import subprocess
import sys

from absl.testing import flagsaver
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import binaries
import mtx
from mtx.io import safetensors as st
from mtx.io import engine
from mtx.io import streaming

_ROOT = os.path.join(os.path.dirname(__file__), os.pardir)
_BINARY = os.path.join(_ROOT, "experiments", "merge.py")

SHAPES = {
    "model.embed_tokens.weight": (40, 16),
    "model.layers.0.mlp.up_proj.weight": (32, 16),
    "model.layers.0.input_layernorm.weight": (16,),
    "model.layers.1.mlp.up_proj.weight": (32, 16),
    "model.layers.1.input_layernorm.weight": (16,),
    "model.norm.weight": (16,),
    "lm_head.weight": (40, 16),
}


@pytest.fixture
def binary():
  return binaries.load("merge")


def _models(root, t=3, dtype=np.float32, shapes=None, shard=None):
  """Writes a base and ``t`` fine-tuned HF-like folders; returns paths."""
  rng = np.random.default_rng(0)
  shapes = shapes or SHAPES
  base = {k: rng.standard_normal(s).astype(dtype) for k, s in shapes.items()}
  paths = []
  for i in range(t + 1):
    d = root / ("base" if i == 0 else f"ft{i}")
    tensors = (
        base
        if i == 0
        else {
            k: (v + 0.1 * rng.standard_normal(v.shape)).astype(dtype)
            for k, v in base.items()
        }
    )
    if shard is None:
      d.mkdir()
      st.write(d / "model.safetensors", tensors, metadata={"format": "pt"})
    else:
      st.write_sharded(d, tensors, shard)
    (d / "config.json").write_text(json.dumps({"torch_dtype": "float32"}))
    paths.append(str(d))
  return paths[0], paths[1:]


def _in_memory(pre, fts, method, **kw):
  pre_tree = st.read(pre)
  ft_trees = [st.read(f) for f in fts]
  return mtx.merging.merge(pre_tree, ft_trees, method, **kw)


def _hashes(paths):
  out = {}
  for p in paths:
    for dirpath, _, files in os.walk(p):
      for f in files:
        full = os.path.join(dirpath, f)
        with open(full, "rb") as fh:
          out[full] = hashlib.sha256(fh.read()).hexdigest()
  return out


def _leftovers(folder):
  return sorted(f for f in os.listdir(folder) if f.startswith("."))


# -- streaming == in memory ---------------------------------------------------


_CASES = [  # (method, hparams, scale, read in row ranges too)
    ("task_arithmetic", {}, 0.3, True),
    ("ties", {"density": 0.3}, 0.7, True),
    (
        "ties",
        {"density": 0.4, "scope": "per_leaf", "weights": [1, 2, 3]},
        1.0,
        True,
    ),
    (
        "ties",
        {"density": [0.2, 0.5, 1.0], "zero_sign": "positive", "reduce": "sum"},
        0.5,
        True,
    ),
    ("weighted_average", {"weights": [1.0, 2.0, 0.5]}, 1.0, True),
    ("dare", {"drop_rate": 0.5}, 0.5, False),
    ("breadcrumbs", {"density": 0.5, "top_remove": 0.1}, 1.0, False),
    (
        "breadcrumbs",
        {"density": 0.5, "top_remove": 0.1, "axis": None},
        1.0,
        True,
    ),
    ("model_stock", {}, 1.0, False),
    ("compeft", {"density": 0.2}, 1.0, True),
    ("tsvm", {}, 1.0, False),
]


@pytest.mark.parametrize(
    "method,hparams,scale,part_entries",
    [c[:3] + (None,) for c in _CASES] + [c[:3] + (64,) for c in _CASES if c[3]],
)
def test_streamed_merge_is_bitwise_the_in_memory_merge(
    tmp_path, monkeypatch, method, hparams, scale, part_entries
):
  if part_entries:  # large leaves read (and merged) in row ranges
    monkeypatch.setattr(engine, "PART_ENTRIES", part_entries)
  pre, fts = _models(tmp_path, shard=3000)
  key = jax.random.key(3)
  want = _in_memory(
      pre, fts, method, scale=scale, key=key, exclude="norm", **hparams
  )
  got = dict(
      streaming.merge_tensors(
          pre,
          fts,
          streaming.Spec.of(method, hparams, scales=[scale]),
          key=key,
          exclude="norm",
      )
  )
  assert sorted(got) == sorted(want)
  for name, x in want.items():
    np.testing.assert_array_equal(np.asarray(got[name][0]), np.asarray(x))
    assert got[name][0].dtype == x.dtype


def _fishers(fts):
  rng = np.random.default_rng(5)
  return [
      {
          k: np.abs(rng.standard_normal(v.shape)).astype(np.float32)
          for k, v in st.read(f).items()
          if "norm" not in k  # the merged leaves only
      }
      for f in fts
  ]


def _grams(fts):
  rng = np.random.default_rng(6)
  out = []
  for _ in fts:
    g = {}
    for k, shape in SHAPES.items():
      if len(shape) == 2 and "norm" not in k:
        x = rng.standard_normal((64, shape[1])).astype(np.float32)
        g[k] = x.T @ x / 64
    out.append(g)
  return out


# Every registered method: (hyperparameters, data built from the fine-tuned
# paths or None, scale).
_ALL_METHODS = {
    "average": ({}, None, 1.0),
    "weighted_average": ({"weights": [1.0, 2.0]}, None, 1.0),
    "task_arithmetic": ({}, None, 0.3),
    "ties": ({"density": 0.3}, None, 0.7),
    "dare": ({"drop_rate": 0.5}, None, 0.5),
    "breadcrumbs": ({"density": 0.5, "top_remove": 0.1}, None, 1.0),
    "consensus": ({"k": 2}, None, 1.0),
    "pcb": ({"ratio": 0.3}, None, 1.0),
    "lines": ({"beta": 0.5}, None, 1.0),
    "model_stock": ({}, None, 1.0),
    "slerp": ({"t": 0.3}, None, 1.0),
    "fisher": ({}, lambda fts: {"fishers": _fishers(fts)}, 1.0),
    "regmean": (
        {"layout": "out_in"},
        lambda fts: {"grams": _grams(fts)},
        1.0,
    ),
    "compeft": ({"density": 0.2}, None, 1.0),
    "tsvm": ({}, None, 1.0),
    "iso_c": ({}, None, 1.0),
}


def test_every_method_has_a_streaming_case():
  assert sorted(_ALL_METHODS) == sorted(mtx.merging.METHODS)


@pytest.mark.parametrize("method", sorted(_ALL_METHODS))
def test_every_method_streamed_equals_in_memory(tmp_path, method):
  # Two fine-tuned models (SLERP takes exactly two), three safetensors shards
  # each; the streamed merge runs the in-memory merge's kernels leaf by leaf
  # on the same inputs, so the results are bitwise equal.
  hparams, data, scale = _ALL_METHODS[method]
  pre, fts = _models(tmp_path, t=2, shard=3000)
  data = data(fts) if data else {}
  key = jax.random.key(3)
  want = _in_memory(
      pre, fts, method, scale=scale, key=key, exclude="norm", **hparams, **data
  )
  spec = streaming.Spec.of(method, hparams, scales=[scale], data=data)
  got = dict(streaming.merge_tensors(pre, fts, spec, key=key, exclude="norm"))
  assert sorted(got) == sorted(want)
  for name, x in want.items():
    assert got[name][0].dtype == x.dtype, name
    np.testing.assert_array_equal(
        np.asarray(got[name][0]), np.asarray(x), err_msg=name
    )


def test_large_leaves_take_the_streamed_selection_paths(tmp_path):
  # > 2**20 entries per leaf: one task at a time, sampled global selection.
  shapes = {"a": (1100, 1000), "b": (300,)}
  pre, fts = _models(tmp_path, t=2, shapes=shapes)
  want = _in_memory(pre, fts, "ties", density=0.1)
  got = dict(
      streaming.merge_tensors(
          pre, fts, streaming.Spec.of("ties", {"density": 0.1})
      )
  )
  for name, x in want.items():
    np.testing.assert_array_equal(np.asarray(got[name][0]), np.asarray(x))


def test_bfloat16_models_and_output_dtype(tmp_path):
  pre, fts = _models(tmp_path, dtype=ml_dtypes.bfloat16)
  want = _in_memory(pre, fts, "ties", density=0.5)
  got = dict(
      streaming.merge_tensors(
          pre, fts, streaming.Spec.of("ties", {"density": 0.5})
      )
  )
  for name, x in want.items():
    assert got[name][0].dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(got[name][0]), np.asarray(x))
  f16 = dict(
      streaming.merge_tensors(
          pre,
          fts,
          streaming.Spec.of("ties", {"density": 0.5}),
          dtype=jnp.float16,
      )
  )
  for name, x in want.items():
    np.testing.assert_array_equal(
        np.asarray(f16[name][0]), np.asarray(jnp.asarray(x).astype(jnp.float16))
    )


# -- the binary ---------------------------------------------------------------


def test_binary_sweep_writes_one_checkpoint_per_scale(binary, tmp_path):
  pre, fts = _models(tmp_path, shard=3000)
  out = tmp_path / "out"
  with flagsaver.flagsaver(
      pretrained=pre,
      finetuned=fts,
      method="ties",
      hparam=["density=0.3", "scope=per_leaf"],
      scales=["0.5", "1"],
      out=str(out),
      shard_size="2KB",
      exclude=["lm_head"],
  ):
    binary.main(["merge"])
  assert sorted(os.listdir(out)) == ["scale_0.5", "scale_1"]
  for s in (0.5, 1.0):
    folder = out / f"scale_{s:g}"
    want = _in_memory(
        pre,
        fts,
        "ties",
        scale=s,
        density=0.3,
        scope="per_leaf",
        exclude="lm_head",
    )
    ckpt = st.open_checkpoint(folder)
    assert len(ckpt.files) > 1  # sharded at 2 KB
    for name, x in want.items():
      np.testing.assert_array_equal(ckpt[name], np.asarray(x))
    record = json.loads(ckpt.metadata["mtx_merge"])
    assert record["method"] == "ties" and record["hparams"]["density"] == 0.3
    assert ckpt.metadata["format"] == "pt"
    assert json.loads((folder / "config.json").read_text()) == {
        "torch_dtype": "float32"
    }
  assert _leftovers(tmp_path) == []


def test_binary_single_scale_dtype_and_overwrite(binary, tmp_path):
  pre, fts = _models(tmp_path)
  out = tmp_path / "out"
  flags_ = dict(
      pretrained=pre,
      finetuned=fts,
      method="task_arithmetic",
      scales=["0.4"],
      out=str(out),
      dtype="bfloat16",
  )
  with flagsaver.flagsaver(**flags_):
    binary.main(["merge"])
  want = _in_memory(pre, fts, "task_arithmetic", scale=0.4)
  got = st.read(out)
  for name, x in want.items():
    assert got[name].dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(
        got[name], np.asarray(jnp.asarray(x).astype(jnp.bfloat16))
    )
  cfg = json.loads((out / "config.json").read_text())
  assert cfg["torch_dtype"] == "bfloat16"
  before = _hashes([out])
  with flagsaver.flagsaver(**flags_):
    with pytest.raises(
        SystemExit, match=r"merge: error: .*out exists.*" "overwrite"
    ):
      binary.main(["merge"])
  assert _hashes([out]) == before
  with flagsaver.flagsaver(**{**flags_, "scales": ["0.9"], "overwrite": True}):
    binary.main(["merge"])
  want = _in_memory(pre, fts, "task_arithmetic", scale=0.9)
  for name, x in want.items():
    np.testing.assert_array_equal(
        st.read(out)[name], np.asarray(jnp.asarray(x).astype(jnp.bfloat16))
    )
  assert _leftovers(tmp_path) == []


def test_binary_orbax_in_and_out(binary, tmp_path):
  pre, fts = _models(tmp_path, t=2)
  out = tmp_path / "orbax"
  with flagsaver.flagsaver(
      pretrained=pre,
      finetuned=fts,
      method="ties",
      hparam=["density=0.5"],
      out=str(out),
      format="orbax",
  ):
    binary.main(["merge"])
  from mtx import checkpoint  # pylint: disable=g-import-not-at-top

  assert checkpoint.is_checkpoint(out)
  got = checkpoint.restore(out)
  want = _in_memory(pre, fts, "ties", density=0.5)
  assert sorted(got) == sorted(want)  # a flat dict keyed by tensor name
  for name, x in want.items():
    np.testing.assert_array_equal(np.asarray(got[name]), np.asarray(x))
  assert checkpoint.read_metadata(out)["mtx_merge"]["method"] == "ties"
  # Orbax checkpoints as inputs, nested trees kept nested.
  nested = {
      "enc": {"layers_0": {"kernel": np.ones((4, 3), np.float32)}},
      "head": np.zeros(3, np.float32),
  }
  paths = []
  for i, v in enumerate((0.0, 1.0, 3.0)):
    p = tmp_path / f"nested{i}"
    checkpoint.save(p, jax.tree.map(lambda x, v=v: x + v, nested))
    paths.append(str(p))
  out2 = tmp_path / "nested_out"
  with flagsaver.flagsaver(
      pretrained=paths[0],
      finetuned=paths[1:],
      method="task_arithmetic",
      scales=["0.5"],
      out=str(out2),
      format="orbax",
  ):
    binary.main(["merge"])
  got = checkpoint.restore(out2)
  np.testing.assert_array_equal(got["enc"]["layers_0"]["kernel"], 3.0)
  np.testing.assert_array_equal(got["head"], 2.0)
  out3 = tmp_path / "nested_st"
  with flagsaver.flagsaver(
      pretrained=paths[0],
      finetuned=paths[1:],
      method="task_arithmetic",
      scales=["0.5"],
      out=str(out3),
  ):
    binary.main(["merge"])
  assert sorted(st.read(out3)) == ["enc/layers_0/kernel", "head"]


def test_binary_usage_errors(binary, tmp_path):
  pre, fts = _models(tmp_path, t=2)
  with flagsaver.flagsaver(
      pretrained=pre, finetuned=fts, method="ties", out=str(tmp_path / "o")
  ):
    with pytest.raises(SystemExit, match="unexpected arguments"):
      binary.main(["merge", "stray"])
  with flagsaver.flagsaver(
      pretrained=pre,
      finetuned=fts,
      method="ties",
      hparam=["density"],
      out=str(tmp_path / "o"),
  ):
    with pytest.raises(SystemExit, match="key=value"):
      binary.main(["merge"])
  assert binary.parse_hparams(["a=0.5", "b=true", "c=[1, 2]", "d=x"]) == {
      "a": 0.5,
      "b": True,
      "c": [1, 2],
      "d": "x",
  }


# -- bad input: one clear line, nothing written, inputs untouched ------------


def _corrupt(path):
  data = open(path, "rb").read()
  with open(path, "wb") as f:
    f.write(data[:-5])


def _bad_cases(root):
  """(name, setup(pre, fts) -> extra flags, expected message regex)."""

  def missing(pre, fts):
    return {"finetuned": fts + [str(root / "nope")]}

  def extra_tensor(pre, fts):
    t = st.read(fts[0])
    t = {**t, "extra.weight": np.ones(2, np.float32)}
    st.write(os.path.join(fts[0], "model.safetensors"), t)
    return {}

  def missing_tensor(pre, fts):
    t = dict(st.read(fts[1]))
    del t["lm_head.weight"]
    st.write(os.path.join(fts[1], "model.safetensors"), t)
    return {}

  def shape(pre, fts):
    t = dict(st.read(fts[0]))
    t["model.norm.weight"] = np.ones(17, np.float32)
    st.write(os.path.join(fts[0], "model.safetensors"), t)
    return {}

  def dtype(pre, fts):
    t = dict(st.read(fts[0]))
    t["model.norm.weight"] = t["model.norm.weight"].astype(np.float16)
    st.write(os.path.join(fts[0], "model.safetensors"), t)
    return {}

  def truncated(pre, fts):
    _corrupt(os.path.join(fts[1], "model.safetensors"))
    return {}

  def nan(pre, fts):
    t = dict(st.read(fts[0]))
    w = np.array(t["model.layers.1.mlp.up_proj.weight"])
    w[3, 4] = np.nan
    t["model.layers.1.mlp.up_proj.weight"] = w
    st.write(os.path.join(fts[0], "model.safetensors"), t)
    return {}

  def unknown_method(pre, fts):
    return {"method": "tiez"}

  def unknown_hparam(pre, fts):
    return {"hparam": ["densty=0.2"]}

  def mergekit_key(pre, fts):
    cfg = root / "merge.yaml"
    cfg.write_text(
        f"merge_method: ties\nbase_model: {pre}\nmodels:\n"
        f"  - model: {fts[0]}\n    parameters: {{weight: 1, densiti: 0.5}}\n"
    )
    return {
        "config": str(cfg),
        "pretrained": None,
        "finetuned": [],
        "method": None,
        "hparam": [],
    }

  def int_differs(pre, fts):
    for i, path in enumerate([pre, *fts]):
      t = dict(st.read(path))
      t["embeddings.position_ids"] = np.arange(8, dtype=np.int64) + (i == 2)
      st.write(os.path.join(path, "model.safetensors"), t)
    return {}

  def header(path, text):
    raw = text.encode()
    raw += b" " * (-len(raw) % 8)
    with open(os.path.join(path, "model.safetensors"), "wb") as f:
      f.write(len(raw).to_bytes(8, "little") + raw)

  def json_bomb(pre, fts):
    header(fts[0], '{"w": ' + "[" * 100_000 + "]" * 100_000 + "}")
    return {}

  def huge_dim(pre, fts):
    header(
        fts[0],
        json.dumps(
            {"w": {"dtype": "F32", "shape": [2**70], "data_offsets": [0, 4]}}
        ),
    )
    return {}

  def flags(**values):
    return lambda pre, fts: values

  ft1 = r"ft1/model\.safetensors"
  return [
      (
          "int_differs",
          int_differs,
          r"ft2/model\.safetensors: tensor 'embeddings\.position_ids' "
          r"\(int64\) is not floating point and differs.*--exclude",
      ),
      ("json_bomb", json_bomb, ft1),
      ("huge_dim", huge_dim, ft1),
      (
          "hparam_no_value",
          flags(hparam=["density"]),
          r"--hparam 'density' must look like key=value",
      ),
      (
          "hparam_empty_value",
          flags(hparam=["density="]),
          r"--hparam 'density=' must look like key=value",
      ),
      ("hparam_nan", flags(hparam=["density=NaN"]), r"--hparam density"),
      ("density_2", flags(hparam=["density=2"]), r"--hparam.*density"),
      ("scales_abc", flags(scales=["abc"]), r"--scales: 'abc' is not a number"),
      ("scales_nan", flags(scales=["nan"]), r"--scales: 'nan' is not finite"),
      ("scales_inf", flags(scales=["0.5", "-inf"]), r"--scales: '-inf' is"),
      ("scales_1e39", flags(scales=["1e39"]), r"--scales: '1e39' is not"),
      ("shard_size", flags(shard_size="2XB"), r"--shard_size"),
      ("dtype_int", flags(dtype="int8"), r"--dtype must be a floating"),
      ("mesh_bad", flags(mesh="data=x"), r"--mesh: cannot parse"),
      ("missing", missing, r"no such checkpoint: .*nope"),
      ("extra", extra_tensor, ft1 + r": tensor 'extra\.weight' is not in"),
      (
          "missing_tensor",
          missing_tensor,
          r"ft2.*: tensor 'lm_head\.weight' of the pretrained model .* is missing",
      ),
      (
          "shape",
          shape,
          ft1 + r": tensor 'model\.norm\.weight' has shape \(17,\)",
      ),
      (
          "dtype",
          dtype,
          ft1 + r": tensor 'model\.norm\.weight' has dtype float16",
      ),
      (
          "truncated",
          truncated,
          r"ft2/model\.safetensors: tensor '.*' has data_offsets .* truncated",
      ),
      (
          "nan",
          nan,
          ft1 + r": tensor 'model\.layers\.1\.mlp\.up_proj\.weight' holds NaN",
      ),
      ("unknown_method", unknown_method, r"unknown merging method 'tiez'"),
      ("unknown_hparam", unknown_hparam, r"unknown hyperparameter.*densty"),
      (
          "mergekit_key",
          mergekit_key,
          r"merge\.yaml: unknown MergeKit key models\[0\]\.parameters\.densiti",
      ),
  ]


# Every case _bad_cases defines (the closures only; nothing is written).
_BAD_CASE_NAMES = [c[0] for c in _bad_cases(pathlib.Path("unused"))]


@pytest.mark.parametrize("name", _BAD_CASE_NAMES)
def test_bad_input_fails_with_one_line_and_leaves_nothing(
    binary, tmp_path, name
):
  setup, pattern = {n: (s, p) for n, s, p in _bad_cases(tmp_path)}[name]
  pre, fts = _models(tmp_path, t=2)
  extra = setup(pre, fts)
  before = _hashes([pre, *fts])
  out = tmp_path / "out" / "merged"  # the parent does not exist either
  flag_values = dict(
      pretrained=pre,
      finetuned=fts,
      method="ties",
      hparam=["density=0.5"],
      out=str(out),
  )
  flag_values.update(extra)
  with flagsaver.flagsaver(**flag_values):
    with pytest.raises(SystemExit) as e:
      binary.main(["merge"])
  msg = str(e.value.code)
  assert msg.startswith("merge: error: ") and "\n" not in msg, (name, msg)
  assert __import__("re").search(pattern, msg), (name, msg)
  assert not (tmp_path / "out").exists(), name
  assert _leftovers(tmp_path) == [], name
  assert _hashes([pre, *fts]) == before, name


def test_failure_mid_merge_leaves_nothing(tmp_path, monkeypatch):
  pre, fts = _models(tmp_path, t=2)
  out = tmp_path / "out"
  st.write_sharded(out, {"old": np.ones(2)}, 100)
  calls = []
  real = st.ShardedWriter.add

  def add(self, name, array):
    calls.append(name)
    if len(calls) == 4:
      raise OSError("disk full")
    return real(self, name, array)

  monkeypatch.setattr(st.ShardedWriter, "add", add)
  with pytest.raises(OSError, match="disk full"):
    streaming.merge_checkpoints(
        pre, fts, streaming.Spec.of("task_arithmetic"), out, overwrite=True
    )
  assert list(st.read(out)) == ["old"]  # the old output is untouched
  assert _leftovers(tmp_path) == []


def test_binary_as_a_subprocess_reports_errors_on_stderr(tmp_path):
  pre, fts = _models(tmp_path, t=2)
  _corrupt(os.path.join(fts[0], "model.safetensors"))
  out = tmp_path / "out"
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run(
      [
          sys.executable,
          _BINARY,
          f"--pretrained={pre}",
          f"--finetuned={','.join(fts)}",
          "--method=task_arithmetic",
          f"--out={out}",
      ],
      capture_output=True,
      text=True,
      timeout=300,
      env=env,
  )
  assert proc.returncode == 1, proc.stderr
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith("merge: error: ") and "ft1/model.safetensors" in last
  assert "truncated" in last
  assert not out.exists() and _leftovers(tmp_path) == []


def test_merging_on_a_mesh_of_8_faked_cpu_devices():
  env = dict(os.environ)
  env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
  env["JAX_PLATFORMS"] = "cpu"
  proc = subprocess.run(
      [
          sys.executable,
          os.path.join(os.path.dirname(__file__), "merge_mesh_check.py"),
      ],
      env=env,
      capture_output=True,
      text=True,
      timeout=600,
  )
  assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
  assert proc.stdout.strip().endswith("passed"), proc.stdout[-2000:]
