"""Properties of mtx.models.bert / clip / lm (no torch needed)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mtx
from mtx.models import bert
from mtx.models import clip
from mtx.models import heads
from mtx.models import lm

TOL = dict(atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def llama():
  m = lm.model(lm.CONFIGS["tiny-llama"])
  ids = jnp.array([[3, 9, 27, 81, 5, 7]])
  return m, jax.jit(m.init)(jax.random.key(0), ids), jax.jit(m.apply)


@pytest.fixture(scope="module")
def encoder():
  m = bert.model(bert.CONFIGS["tiny"])
  ids = jnp.array([[2, 5, 6, 7, 3, 0, 0]])
  return m, jax.jit(m.init)(jax.random.key(1), ids), jax.jit(m.apply)


def test_registry_presets():
  for name in ("bert", "clip", "lm"):
    module = mtx.models.MODELS[name]
    for preset in module.CONFIGS:
      assert mtx.models.get(name, preset).config == module.CONFIGS[preset]
  m = mtx.models.get("lm", "tiny-gpt2", num_layers=1)
  assert m.config.num_layers == 1 and m.config.family == "gpt2"
  with pytest.raises(ValueError, match="unknown lm preset"):
    mtx.models.get("lm", "gpt5")


def test_real_presets_have_the_published_sizes():
  def size(name, preset):
    m = mtx.models.get(name, preset)
    ids = jax.ShapeDtypeStruct((1, 1), jnp.int32)
    if name == "clip":
      v = m.config.vision
      img = jax.ShapeDtypeStruct(
          (1, v.image_size, v.image_size, 3), jnp.float32
      )
      shapes = jax.eval_shape(m.init, jax.random.key(0), img, ids)
    else:
      shapes = jax.eval_shape(m.init, jax.random.key(0), ids)
    return sum(int(np.prod(s.shape)) for s in jax.tree.leaves(shapes))

  assert size("bert", "minilm-l6") == 22_713_216
  assert size("bert", "bert-base") == 109_482_240
  assert size("lm", "gpt2") == 124_439_808
  assert size("lm", "llama2-7b") == 6_738_415_616
  assert size("clip", "clip-vit-b32") == 151_277_313


def test_bad_configs_raise():
  with pytest.raises(ValueError, match="not divisible"):
    bert.model(dataclasses.replace(bert.CONFIGS["tiny"], num_heads=5))
  with pytest.raises(ValueError, match="unknown activation"):
    bert.model(dataclasses.replace(bert.CONFIGS["tiny"], activation="gelu2"))
  with pytest.raises(ValueError, match="multiple of num_kv_heads"):
    lm.model(dataclasses.replace(lm.CONFIGS["tiny-llama"], num_kv_heads=3))
  with pytest.raises(ValueError, match="family"):
    lm.model(dataclasses.replace(lm.CONFIGS["tiny-llama"], family="t5"))
  cfg = clip.CONFIGS["tiny"]
  bad = dataclasses.replace(
      cfg, vision=dataclasses.replace(cfg.vision, patch_size=5)
  )
  with pytest.raises(ValueError, match="patch_size"):
    clip.model(bad)


def test_lm_is_causal(llama):
  _, params, apply = llama
  a = jnp.array([[3, 9, 27, 81, 5, 7]])
  b = a.at[0, 4:].set(jnp.array([11, 12]))
  la, lb = apply(params, a), apply(params, b)
  np.testing.assert_allclose(la[:, :4], lb[:, :4], **TOL)
  assert not np.allclose(la[:, 4:], lb[:, 4:], **TOL)


def test_rope_depends_on_relative_positions_only(llama):
  _, params, apply = llama
  ids = jnp.array([[3, 9, 27, 81, 5, 7]])
  pos = jnp.arange(6)[None]
  np.testing.assert_allclose(
      apply(params, ids, None, pos), apply(params, ids, None, pos + 17), **TOL
  )
  # ... but not position-free: a different spacing changes the logits.
  assert not np.allclose(
      apply(params, ids, None, pos), apply(params, ids, None, 2 * pos), **TOL
  )


def test_grouped_query_attention_equals_repeated_heads(llama):
  m, params, apply = llama
  c = m.config
  full = lm.model(dataclasses.replace(c, num_kv_heads=c.num_heads))
  group, dh = c.num_heads // c.kv_heads, c.dim_per_head

  def repeat(kernel):  # [D, Hkv * Dh] -> [D, H * Dh], head j serves a group
    d = kernel.shape[0]
    k = kernel.reshape(d, c.kv_heads, 1, dh)
    return jnp.broadcast_to(k, (d, c.kv_heads, group, dh)).reshape(d, -1)

  p2 = jax.tree.map(lambda x: x, params)
  for i in range(c.num_layers):
    layer = dict(p2[f"layer_{i}"])
    for name in ("key", "value"):
      layer[name] = {"kernel": repeat(layer[name]["kernel"])}
    p2 = {**p2, f"layer_{i}": layer}
  ids = jnp.array([[3, 9, 27, 81, 5, 7]])
  np.testing.assert_allclose(
      apply(params, ids), jax.jit(full.apply)(p2, ids), **TOL
  )


def test_left_and_right_padding_leave_real_tokens_alone(encoder):
  _, params, apply = encoder
  ids = jnp.array([[2, 5, 6, 7, 3, 0, 0]])
  mask = (ids != 0).astype(jnp.int32)
  other = ids.at[0, 5:].set(jnp.array([44, 45]))  # garbage under the mask
  np.testing.assert_allclose(
      apply(params, ids, mask)[:, :5], apply(params, other, mask)[:, :5], **TOL
  )
  np.testing.assert_allclose(
      apply(params, ids, mask)[:, :5], apply(params, ids[:, :5])[:, :5], **TOL
  )


def test_mean_pool_ignores_padding():
  h = jnp.arange(12.0).reshape(2, 3, 2)
  mask = jnp.array([[1, 1, 0], [1, 0, 0]])
  np.testing.assert_allclose(
      bert.mean_pool(h, mask), [[1.0, 2.0], [6.0, 7.0]], **TOL
  )


def test_roberta_positions_skip_padding():
  cfg = bert.CONFIGS["tiny-roberta"]
  ids = jnp.array([[0, 7, 8, 2, 1, 1], [0, 2, 1, 1, 1, 1]])
  assert bert.position_ids(cfg, ids).tolist() == [
      [2, 3, 4, 5, 1, 1],
      [2, 3, 1, 1, 1, 1],
  ]
  too_long = jnp.zeros((1, cfg.max_positions - 1), jnp.int32)
  with pytest.raises(ValueError, match="exceeds the position table"):
    bert.model(cfg).init(jax.random.key(0), too_long)


def test_clip_text_pools_the_eos_token_and_is_causal():
  cfg = clip.CONFIGS["tiny"]  # eos_token_id = 127
  enc = clip.text_encoder(cfg)
  ids = jnp.array([[5, 6, 127, 0, 0], [5, 127, 0, 0, 0]])
  mask = (ids != 0).astype(jnp.int32)
  p = jax.jit(enc.init)(jax.random.key(0), ids, mask)
  apply = jax.jit(enc.apply)
  z = apply(p, ids, mask)
  # Tokens after the EOS (even unmasked ones) do not change the embedding.
  later = ids.at[:, 3:].set(9)
  np.testing.assert_allclose(z, apply(p, later, jnp.ones_like(ids)), **TOL)
  assert z.shape == (2, cfg.projection_dim)


def test_clip_image_size_is_checked():
  enc = clip.image_encoder(clip.CONFIGS["tiny"])
  with pytest.raises(ValueError, match="channels last"):
    enc.init(jax.random.key(0), jnp.zeros((1, 3, 16, 16)))


def test_zero_shot_head_averages_normalised_template_embeddings():
  cfg = clip.CONFIGS["tiny"]
  text = clip.text_encoder(cfg)
  p = {"text": jax.jit(text.init)(jax.random.key(0), jnp.zeros((1, 3), int))}
  vocab = {"a": 5, "b": 6, "cat": 7, "dog": 8}

  def tokenize(texts):
    ids = np.array([[vocab[w] for w in t.split()] + [127] for t in texts])
    return ids, np.ones_like(ids)

  classes = ["cat", "dog"]
  head = clip.zero_shot_head(cfg, p, classes, ["a {}", "b {}"], tokenize)
  # One template each: the columns are the normalised text embeddings.
  a = clip.zero_shot_head(cfg, p, classes, ["a {}"], tokenize)["kernel"]
  b = clip.zero_shot_head(cfg, p, classes, ["b {}"], tokenize)["kernel"]
  np.testing.assert_allclose(jnp.linalg.norm(a, axis=0), [1.0, 1.0], **TOL)
  np.testing.assert_allclose(
      head["kernel"], heads.l2_normalize((a + b).T).T, **TOL
  )
  assert head["kernel"].shape == (cfg.projection_dim, 2)
  np.testing.assert_array_equal(head["bias"], [0.0, 0.0])
  with pytest.raises(ValueError, match="at least one"):
    clip.zero_shot_head(cfg, p, [], ["a {}"], tokenize)


def test_llama3_rope_frequencies():
  c = dataclasses.replace(
      lm.CONFIGS["tiny-llama"],
      rope_type="llama3",
      rope_theta=500000.0,
      rope_factor=8.0,
      rope_original_max_positions=8192,
  )
  base = lm.rope_frequencies(dataclasses.replace(c, rope_type="default"))
  scaled = lm.rope_frequencies(c)
  wavelen = 2 * np.pi / np.asarray(base)
  high = wavelen < 8192 / 4  # short wavelengths untouched
  low = wavelen > 8192 / 1  # long ones divided by the factor
  np.testing.assert_allclose(scaled[high], base[high])
  np.testing.assert_allclose(scaled[low], base[low] / 8.0)
  assert high.any() and low.any()
