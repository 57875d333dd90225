"""mtx.io.hf: name tables both ways, errors, save/load layout (no torch)."""

import json
import os
import re

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from mtx.io import hf
from mtx import models
from mtx.io import safetensors as st
from mtx.models import clip
from mtx.models import lm

_TINY = dict(
    vocab_size=128,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
)

# Hugging Face configs equivalent to the tiny presets.
HF_CONFIGS = {
    "bert": dict(
        _TINY,
        model_type="bert",
        architectures=["BertModel"],
        max_position_embeddings=64,
    ),
    "roberta": dict(
        _TINY,
        model_type="roberta",
        architectures=["RobertaModel"],
        max_position_embeddings=66,
        type_vocab_size=1,
        layer_norm_eps=1e-5,
        pad_token_id=1,
    ),
    "clip": dict(
        model_type="clip",
        architectures=["CLIPModel"],
        projection_dim=24,
        text_config=dict(_TINY, max_position_embeddings=16, eos_token_id=127),
        vision_config=dict(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            image_size=16,
            patch_size=4,
        ),
    ),
    "llama": dict(
        _TINY,
        model_type="llama",
        architectures=["LlamaForCausalLM"],
        num_key_value_heads=2,
        max_position_embeddings=64,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
    ),
    "gpt2": dict(
        model_type="gpt2",
        architectures=["GPT2LMHeadModel"],
        vocab_size=128,
        n_embd=32,
        n_layer=2,
        n_head=4,
        n_positions=64,
    ),
}

PRESETS = {
    "bert": ("bert", "tiny"),
    "roberta": ("bert", "tiny-roberta"),
    "clip": ("clip", "tiny"),
    "llama": ("lm", "tiny-llama"),
    "gpt2": ("lm", "tiny-gpt2"),
}


def _params(arch, hf_config=None, seed=0):
  """(mtx config, random numpy params) of the tiny model of ``arch``.

  Params are drawn to the shapes ``model.init`` gives (no init is run).
  """
  config = hf.config_from_hf(hf_config or HF_CONFIGS[arch])
  rng = np.random.RandomState(seed)
  params = jax.tree.map(
      lambda s: rng.standard_normal(s.shape).astype(s.dtype),
      hf.param_shapes(arch, config),
  )
  return config, params


def _leaf(params, path):
  for key in path.split("/"):
    params = params[key]
  return params


@pytest.fixture(scope="module", params=sorted(HF_CONFIGS))
def arch(request):
  return request.param


@pytest.fixture(scope="module")
def setup(arch):
  config, params = _params(arch)
  return arch, config, params


def _assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert x.dtype == y.dtype and x.shape == y.shape
    assert np.asarray(x).tobytes() == np.asarray(y).tobytes()


def test_hf_configs_give_the_tiny_presets(arch):
  family, preset = PRESETS[arch]
  want = models.MODELS[family].CONFIGS[preset]
  assert hf.config_from_hf(HF_CONFIGS[arch]) == want


def test_round_trip_through_tables(setup):
  arch, config, params = setup
  tensors = hf.to_hf_tensors(arch, params)
  assert len(tensors) == len(jax.tree.leaves(params))
  back = hf.from_hf_tensors(arch, tensors, config)
  _assert_trees_equal(params, back)


@pytest.mark.parametrize(
    "arch,name,path,transform",
    [
        (
            "bert",
            "encoder.layer.1.attention.self.key.weight",
            "layer_1/attention/key/kernel",
            "linear",
        ),
        ("bert", "embeddings.LayerNorm.weight", "embed_norm/scale", "identity"),
        (
            "clip",
            "vision_model.embeddings.patch_embedding.weight",
            "vision/patch_embed/kernel",
            "conv2d",
        ),
        ("clip", "text_projection.weight", "text/projection/kernel", "linear"),
        ("clip", "logit_scale", "logit_scale", "identity"),
        (
            "llama",
            "model.layers.0.self_attn.k_proj.weight",
            "layer_0/key/kernel",
            "linear",
        ),
        ("llama", "lm_head.weight", "lm_head/kernel", "linear"),
        (
            "gpt2",
            "transformer.h.1.attn.c_attn.weight",
            "layer_1/qkv/kernel",
            "identity",
        ),
    ],
)
def test_named_tensors_and_transforms(arch, name, path, transform):
  _, params = _params(arch)
  prefix = hf.export_prefix(HF_CONFIGS[arch])
  tensors = hf.to_hf_tensors(arch, params, prefix=prefix)
  leaf = _leaf(params, path)
  t = tensors[name]
  if transform == "linear":
    np.testing.assert_array_equal(t, leaf.T)
  elif transform == "conv2d":  # [out, in, kh, kw] vs [kh, kw, in, out]
    np.testing.assert_array_equal(t, leaf.transpose(3, 2, 0, 1))
    assert t.shape == (32, 3, 4, 4)
  else:
    np.testing.assert_array_equal(t, leaf)
  assert t.flags.c_contiguous


def test_every_table_row_is_used():
  """Each row of each table maps some param of some supported config."""
  used = {a: set() for a in hf.TABLES}
  variants = dict(HF_CONFIGS)
  variants["llama-bias"] = dict(
      HF_CONFIGS["llama"], attention_bias=True, mlp_bias=True
  )
  variants["gpt2-untied"] = dict(HF_CONFIGS["gpt2"], tie_word_embeddings=False)
  for hf_config in variants.values():
    arch = hf.architecture(hf_config)
    _, params = _params(arch, hf_config)
    for name in hf.to_hf_tensors(arch, params):
      used[arch].add(name)
  for arch, rules in hf.TABLES.items():
    for rule in rules:
      pattern = re.compile(re.escape(rule.hf).replace(r"\{i\}", r"\d+") + "$")
      assert any(pattern.match(n) for n in used[arch]), (arch, rule)


def test_export_prefix():
  assert hf.export_prefix(HF_CONFIGS["llama"]) == "model."
  assert hf.export_prefix(HF_CONFIGS["gpt2"]) == "transformer."
  base = dict(HF_CONFIGS["gpt2"], architectures=["GPT2Model"])
  assert hf.export_prefix(base) == ""
  assert hf.export_prefix(HF_CONFIGS["bert"]) == ""
  masked_lm = dict(HF_CONFIGS["bert"], architectures=["BertForMaskedLM"])
  assert hf.export_prefix(masked_lm) == ""


def test_prefixed_and_buffer_tensors_are_read():
  config, params = _params("bert")
  tensors = {
      "bert." + k: v for k, v in hf.to_hf_tensors("bert", params).items()
  }
  tensors["bert.embeddings.position_ids"] = np.arange(64)[None]
  back = hf.from_hf_tensors("bert", tensors, config)
  _assert_trees_equal(params, back)
  config, params = _params("gpt2")
  tensors = hf.to_hf_tensors("gpt2", params)  # GPT-2's original names
  tensors["h.0.attn.bias"] = np.tril(np.ones((1, 1, 64, 64), bool))
  _assert_trees_equal(params, hf.from_hf_tensors("gpt2", tensors, config))


def test_tied_lm_head_must_equal_the_embeddings():
  config, params = _params("gpt2")
  tensors = hf.to_hf_tensors("gpt2", params, prefix="transformer.")
  tensors["lm_head.weight"] = tensors["transformer.wte.weight"].copy()
  _assert_trees_equal(params, hf.from_hf_tensors("gpt2", tensors, config))
  tensors["lm_head.weight"][0, 0] += 1.0
  with pytest.raises(ValueError, match="lm_head.weight.*differs"):
    hf.from_hf_tensors("gpt2", tensors, config)


def test_unknown_tensor_names_tensor_and_file():
  config, params = _params("llama")
  tensors = hf.to_hf_tensors("llama", params, prefix="model.")
  tensors["model.layers.0.self_attn.rotary.weight"] = np.zeros(3)
  files = {n: "/ckpt/model-00001-of-00002.safetensors" for n in tensors}
  with pytest.raises(
      ValueError,
      match=r"unknown tensor 'model\.layers\.0\.self_attn\.rotary\.weight'"
      r" in /ckpt/model-00001-of-00002\.safetensors",
  ):
    hf.from_hf_tensors("llama", tensors, config, files=files)


def test_missing_tensor_is_named():
  config, params = _params("bert")
  tensors = hf.to_hf_tensors("bert", params)
  del tensors["encoder.layer.1.output.dense.bias"]
  with pytest.raises(
      ValueError,
      match=r"missing tensor 'encoder\.layer\.1\.output\.dense\.bias'.*in"
      r" w\.safetensors",
  ):
    hf.from_hf_tensors("bert", tensors, config, files="w.safetensors")


def test_extra_layer_and_bad_shape_are_errors():
  config, params = _params("gpt2")
  tensors = hf.to_hf_tensors("gpt2", params)
  extra = dict(tensors, **{"h.2.ln_1.weight": np.ones(32, np.float32)})
  with pytest.raises(ValueError, match=r"'h\.2\.ln_1\.weight'.*layer_2"):
    hf.from_hf_tensors("gpt2", extra, config)
  bad = dict(tensors, **{"h.0.ln_1.weight": np.ones(31, np.float32)})
  with pytest.raises(ValueError, match=r"'h\.0\.ln_1\.weight'.*\(31,\)"):
    hf.from_hf_tensors("gpt2", bad, config)
  dup = dict(tensors, **{"transformer.ln_f.bias": tensors["ln_f.bias"]})
  with pytest.raises(ValueError, match="both map to 'final_norm/bias'"):
    hf.from_hf_tensors("gpt2", dup, config)


def test_unknown_architecture():
  with pytest.raises(ValueError, match="unsupported model_type 't5'"):
    hf.architecture({"model_type": "t5"})
  with pytest.raises(ValueError, match="unknown architecture"):
    hf.to_hf_tensors("t5", {})


def test_unmapped_param_is_an_error():
  _, params = _params("bert")
  params = dict(params, extra={"kernel": np.zeros((2, 2))})
  with pytest.raises(ValueError, match="param 'extra/kernel' has no bert"):
    hf.to_hf_tensors("bert", params)


@pytest.mark.parametrize("shard_size", [None, 4000])
def test_save_load_layout(setup, tmp_path, shard_size):
  arch, config, params = setup
  hf_config = HF_CONFIGS[arch]
  out = str(tmp_path / "ckpt")
  hf.save(out, params, hf_config, shard_size=shard_size)
  files = sorted(os.listdir(out))
  if shard_size is None:
    assert files == ["config.json", "model.safetensors"]
  else:
    assert "model.safetensors.index.json" in files
    assert "model-00001-of-" in files[1]
  with open(os.path.join(out, "config.json")) as f:
    assert json.load(f) == hf_config
  ckpt = st.open_checkpoint(out)
  assert ckpt.metadata == {"format": "pt"}
  want = hf.to_hf_tensors(arch, params, prefix=hf.export_prefix(hf_config))
  assert set(ckpt) == set(want)
  for name, t in want.items():
    assert ckpt[name].dtype == t.dtype and ckpt[name].tobytes() == t.tobytes()
  model, back, got_config = hf.load(out)
  assert got_config == hf_config and model.config == config
  _assert_trees_equal(params, back)


def test_resave_replaces_the_weights(tmp_path):
  _, params = _params("bert")
  out = str(tmp_path / "ckpt")
  hf.save(out, params, HF_CONFIGS["bert"], shard_size=3000)
  (tmp_path / "ckpt" / "tokenizer.json").write_text("{}")
  hf.save(out, params, HF_CONFIGS["bert"])
  assert sorted(os.listdir(out)) == [
      "config.json",
      "model.safetensors",
      "tokenizer.json",
  ]
  hf.save(out, params, HF_CONFIGS["bert"], shard_size=3000)
  assert "model.safetensors" not in os.listdir(out)
  _assert_trees_equal(params, hf.load(out)[1])


def test_save_checks_params_against_the_config(tmp_path):
  _, params = _params("llama")
  untied = HF_CONFIGS["llama"]
  tied = dict(untied, tie_word_embeddings=True)
  with pytest.raises(ValueError, match="param 'lm_head/kernel'"):
    hf.save(str(tmp_path / "x"), params, tied)
  small = dict(untied, intermediate_size=48)
  with pytest.raises(ValueError, match=r"layer_0/down/kernel.*\(48, 32\)"):
    hf.save(str(tmp_path / "y"), params, small)
  assert not os.path.exists(tmp_path / "x")


def test_load_errors_name_the_file(tmp_path):
  config, params = _params("bert")
  out = str(tmp_path / "ckpt")
  hf.save(out, params, HF_CONFIGS["bert"])
  tensors = dict(st.read(out))
  tensors["cls.predictions.bias"] = np.zeros(128, np.float32)
  st.write(os.path.join(out, "model.safetensors"), tensors)
  with pytest.raises(
      ValueError,
      match=r"unknown tensor 'cls\.predictions\.bias' in .*model\.safetensors",
  ):
    hf.load(out)
  # Leaving the pre-training head out has to be asked for.
  _, back, _ = hf.load(out, ignore=[r"cls\."])
  _assert_trees_equal(params, back)
  with pytest.raises(FileNotFoundError, match="config.json"):
    hf.load(str(tmp_path))
  del config


def test_bert_without_pooler(tmp_path):
  _, params = _params("bert")
  params = {k: v for k, v in params.items() if k != "pooler"}
  out = str(tmp_path / "ckpt")
  hf.save(out, params, HF_CONFIGS["bert"])
  model, back, _ = hf.load(out)
  assert model.config.pooler is False and "pooler" not in back
  _assert_trees_equal(params, back)


def test_bfloat16_and_dtype_cast(tmp_path):
  _, params = _params("llama")
  bf16 = jax.tree.map(lambda x: x.astype(ml_dtypes.bfloat16), params)
  out = str(tmp_path / "ckpt")
  hf.save(out, bf16, HF_CONFIGS["llama"])
  assert st.open_checkpoint(out).info("model.norm.weight").dtype == (
      np.dtype(ml_dtypes.bfloat16)
  )
  _assert_trees_equal(bf16, hf.load(out)[1])
  f32 = hf.load(out, dtype=jnp.float32)[1]
  assert {x.dtype for x in jax.tree.leaves(f32)} == {np.dtype(np.float32)}


def test_config_from_hf_variants():
  old = dict(
      HF_CONFIGS["llama"],
      rope_theta=500000.0,
      rope_scaling=dict(
          rope_type="llama3",
          factor=8.0,
          low_freq_factor=1.0,
          high_freq_factor=4.0,
          original_max_position_embeddings=8192,
      ),
  )
  c = hf.config_from_hf(old)
  assert (c.rope_type, c.rope_theta, c.rope_factor) == ("llama3", 500000.0, 8.0)
  new = dict(
      HF_CONFIGS["llama"],
      rope_parameters=dict(rope_theta=5.0, rope_type="default"),
  )
  assert hf.config_from_hf(new).rope_theta == 5.0
  with pytest.raises(ValueError, match="rope_type 'yarn'"):
    hf.config_from_hf(
        dict(HF_CONFIGS["llama"], rope_scaling=dict(type="yarn", factor=2.0))
    )
  gpt2 = hf.config_from_hf(dict(HF_CONFIGS["gpt2"], n_inner=None))
  assert gpt2.intermediate_size == 128 and gpt2.tie_embeddings
  with pytest.raises(ValueError, match="position_embedding_type"):
    hf.config_from_hf(
        dict(HF_CONFIGS["bert"], position_embedding_type="relative_key")
    )
  legacy = hf.config_from_hf({"model_type": "clip"})
  assert legacy == clip.CONFIGS["clip-vit-b32"]
  assert hf.config_from_hf({"model_type": "gpt2"}) == lm.CONFIGS["gpt2"]


def test_load_detects_corrupt_weights_and_config(tmp_path):
  _, params = _params("bert")
  out = tmp_path / "ckpt"
  hf.save(str(out), params, HF_CONFIGS["bert"], shard_size=3000)
  assert st.verify_file(out) is True  # hf.save records hashes
  name = "encoder.layer.1.attention.self.query.weight"
  info = st.open_checkpoint(out).info(name)
  with open(info.file, "r+b") as f:
    f.seek((info.start + info.end) // 2)
    b = f.read(1)
    f.seek((info.start + info.end) // 2)
    f.write(bytes([b[0] ^ 0x40]))
  with pytest.raises(
      ValueError, match=rf"{re.escape(info.file)}: tensor '{re.escape(name)}'"
  ):
    hf.load(out)
  hf.load(out, verify=False)  # the opt-out reads the changed weights
  (out / "config.json").write_text("[" * 100_000 + "]" * 100_000)
  with pytest.raises(ValueError, match=r"config\.json: not valid JSON"):
    hf.load(out)
  (out / "config.json").write_text("[1]")
  with pytest.raises(ValueError, match=r"config\.json: expected a JSON object"):
    hf.load(out)
