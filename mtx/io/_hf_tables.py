"""Hugging Face <-> mtx name tables, one per architecture (private; the
public surface is :mod:`mtx.io.hf`).

A table is a tuple of ``Rule(hf, mtx, transform)`` rows (see
:mod:`mtx.io.hf` for the transforms); :data:`TABLES` maps an architecture to
its table and ``_ARCHS`` to what else the conversion needs (the model module,
the head prefix, buffers to drop, tied weights).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, NamedTuple

from mtx.models import bert
from mtx.models import clip
from mtx.models import lm


class Rule(NamedTuple):
  """One row of a name-mapping table.

  Attributes:
    hf: the Hugging Face tensor name, ``{i}`` for a layer index.
    mtx: the mtx param path (``/``-joined), same ``{i}``.
    transform: ``"identity"``, ``"linear"`` or ``"conv2d"`` (see module doc).
    base: whether the name sits under the base model's prefix (False for
      ``lm_head.weight``).
  """

  hf: str
  mtx: str
  transform: str = "identity"
  base: bool = True


def _linear(hf: str, path: str) -> tuple[Rule, ...]:
  return (Rule(f"{hf}.weight", f"{path}/kernel", "linear"),) + _bias(hf, path)


def _conv1d(hf: str, path: str) -> tuple[Rule, ...]:
  return (Rule(f"{hf}.weight", f"{path}/kernel"),) + _bias(hf, path)


def _bias(hf: str, path: str) -> tuple[Rule, ...]:
  return (Rule(f"{hf}.bias", f"{path}/bias"),)


def _norm(hf: str, path: str) -> tuple[Rule, ...]:
  return (Rule(f"{hf}.weight", f"{path}/scale"),) + _bias(hf, path)


def _embed(hf: str, path: str) -> tuple[Rule, ...]:
  return (Rule(f"{hf}.weight", f"{path}/embedding"),)


_BERT_LAYER = "encoder.layer.{i}"
BERT = (
    *_embed("embeddings.word_embeddings", "word"),
    *_embed("embeddings.position_embeddings", "position"),
    *_embed("embeddings.token_type_embeddings", "token_type"),
    *_norm("embeddings.LayerNorm", "embed_norm"),
    *_linear(
        f"{_BERT_LAYER}.attention.self.query", "layer_{i}/attention/query"
    ),
    *_linear(f"{_BERT_LAYER}.attention.self.key", "layer_{i}/attention/key"),
    *_linear(
        f"{_BERT_LAYER}.attention.self.value", "layer_{i}/attention/value"
    ),
    *_linear(
        f"{_BERT_LAYER}.attention.output.dense", "layer_{i}/attention/out"
    ),
    *_norm(
        f"{_BERT_LAYER}.attention.output.LayerNorm", "layer_{i}/attention_norm"
    ),
    *_linear(f"{_BERT_LAYER}.intermediate.dense", "layer_{i}/fc_1"),
    *_linear(f"{_BERT_LAYER}.output.dense", "layer_{i}/fc_2"),
    *_norm(f"{_BERT_LAYER}.output.LayerNorm", "layer_{i}/mlp_norm"),
    *_linear("pooler.dense", "pooler"),
)


def _clip_layers(hf_tower: str, tower: str) -> tuple[Rule, ...]:
  hf, path = f"{hf_tower}.encoder.layers.{{i}}", f"{tower}/layer_{{i}}"
  return (
      *_norm(f"{hf}.layer_norm1", f"{path}/norm_1"),
      *_linear(f"{hf}.self_attn.q_proj", f"{path}/attention/query"),
      *_linear(f"{hf}.self_attn.k_proj", f"{path}/attention/key"),
      *_linear(f"{hf}.self_attn.v_proj", f"{path}/attention/value"),
      *_linear(f"{hf}.self_attn.out_proj", f"{path}/attention/out"),
      *_norm(f"{hf}.layer_norm2", f"{path}/norm_2"),
      *_linear(f"{hf}.mlp.fc1", f"{path}/fc_1"),
      *_linear(f"{hf}.mlp.fc2", f"{path}/fc_2"),
  )


CLIP = (
    Rule("vision_model.embeddings.class_embedding", "vision/class_embedding"),
    Rule(
        "vision_model.embeddings.patch_embedding.weight",
        "vision/patch_embed/kernel",
        "conv2d",
    ),
    Rule(
        "vision_model.embeddings.position_embedding.weight",
        "vision/position_embedding",
    ),
    *_norm("vision_model.pre_layrnorm", "vision/pre_norm"),
    *_clip_layers("vision_model", "vision"),
    *_norm("vision_model.post_layernorm", "vision/post_norm"),
    Rule("visual_projection.weight", "vision/projection/kernel", "linear"),
    *_embed("text_model.embeddings.token_embedding", "text/token_embedding"),
    Rule(
        "text_model.embeddings.position_embedding.weight",
        "text/position_embedding",
    ),
    *_clip_layers("text_model", "text"),
    *_norm("text_model.final_layer_norm", "text/final_norm"),
    Rule("text_projection.weight", "text/projection/kernel", "linear"),
    Rule("logit_scale", "logit_scale"),
)

LLAMA = (
    *_embed("embed_tokens", "embed"),
    Rule("layers.{i}.input_layernorm.weight", "layer_{i}/norm_1/scale"),
    *_linear("layers.{i}.self_attn.q_proj", "layer_{i}/query"),
    *_linear("layers.{i}.self_attn.k_proj", "layer_{i}/key"),
    *_linear("layers.{i}.self_attn.v_proj", "layer_{i}/value"),
    *_linear("layers.{i}.self_attn.o_proj", "layer_{i}/out"),
    Rule(
        "layers.{i}.post_attention_layernorm.weight", "layer_{i}/norm_2/scale"
    ),
    *_linear("layers.{i}.mlp.gate_proj", "layer_{i}/gate"),
    *_linear("layers.{i}.mlp.up_proj", "layer_{i}/up"),
    *_linear("layers.{i}.mlp.down_proj", "layer_{i}/down"),
    Rule("norm.weight", "final_norm/scale"),
    Rule("lm_head.weight", "lm_head/kernel", "linear", base=False),
)

GPT2 = (
    *_embed("wte", "embed"),
    *_embed("wpe", "position"),
    *_norm("h.{i}.ln_1", "layer_{i}/norm_1"),
    *_conv1d("h.{i}.attn.c_attn", "layer_{i}/qkv"),
    *_conv1d("h.{i}.attn.c_proj", "layer_{i}/out"),
    *_norm("h.{i}.ln_2", "layer_{i}/norm_2"),
    *_conv1d("h.{i}.mlp.c_fc", "layer_{i}/fc_1"),
    *_conv1d("h.{i}.mlp.c_proj", "layer_{i}/fc_2"),
    *_norm("ln_f", "final_norm"),
    Rule("lm_head.weight", "lm_head/kernel", "linear", base=False),
)

# Architecture -> its name-mapping table.
TABLES: dict[str, tuple[Rule, ...]] = {
    "bert": BERT,
    "roberta": BERT,
    "clip": CLIP,
    "llama": LLAMA,
    "gpt2": GPT2,
}


@dataclasses.dataclass(frozen=True)
class _Arch:
  module: Any  # the mtx.models module (Config, config_from_hf, model)
  prefix: str  # the head models' base-model prefix
  base_class: str  # the architectures[0] whose tensors carry no prefix
  buffers: tuple[str, ...]  # non-parameter buffers (dropped), {i} allowed
  tied: tuple[str, str] | None = None  # (lm_head name, embedding name)


_ARCHS = {
    "bert": _Arch(
        bert,
        "bert.",
        "",
        ("embeddings.position_ids", "embeddings.token_type_ids"),
    ),
    "roberta": _Arch(
        bert,
        "roberta.",
        "",
        ("embeddings.position_ids", "embeddings.token_type_ids"),
    ),
    "clip": _Arch(
        clip,
        "clip.",
        "",
        (
            "vision_model.embeddings.position_ids",
            "text_model.embeddings.position_ids",
        ),
    ),
    "llama": _Arch(
        lm,
        "model.",
        "LlamaModel",
        ("rotary_emb.inv_freq", "layers.{i}.self_attn.rotary_emb.inv_freq"),
        ("lm_head.weight", "embed_tokens.weight"),
    ),
    "gpt2": _Arch(
        lm,
        "transformer.",
        "GPT2Model",
        ("h.{i}.attn.bias", "h.{i}.attn.masked_bias"),
        ("lm_head.weight", "wte.weight"),
    ),
}

_MODEL_TYPES = {
    "bert": "bert",
    "roberta": "roberta",
    "xlm-roberta": "roberta",
    "clip": "clip",
    "llama": "llama",
    "gpt2": "gpt2",
}


def architecture(hf_config: Mapping[str, Any]) -> str:
  """The mtx architecture of a Hugging Face config (from ``model_type``).

  >>> architecture({"model_type": "xlm-roberta"})
  'roberta'

  Raises:
    ValueError: unsupported ``model_type``.
  """
  model_type = hf_config.get("model_type")
  if model_type not in _MODEL_TYPES:
    raise ValueError(
        f"unsupported model_type {model_type!r}; supported:"
        f" {sorted(_MODEL_TYPES)}"
    )
  return _MODEL_TYPES[model_type]


def config_from_hf(hf_config: Mapping[str, Any]):
  """The mtx model config (``bert``/``clip``/``lm`` ``Config``) of a config."""
  return _ARCHS[architecture(hf_config)].module.config_from_hf(dict(hf_config))


def _check_arch(arch: str) -> _Arch:
  if arch not in _ARCHS:
    raise ValueError(f"unknown architecture {arch!r}; known: {sorted(_ARCHS)}")
  return _ARCHS[arch]
