"""Hugging Face checkpoints in and out: safetensors directories <-> mtx params.

A checkpoint is a directory with ``config.json`` and either
``model.safetensors`` or shards ``model-0000k-of-0000n.safetensors`` listed in
``model.safetensors.index.json`` (what ``save_pretrained`` writes).
:func:`load` reads one into an :mod:`mtx.models` model and its params;
:func:`save` writes params back in the same layout, with the same tensor names
and dtypes and a copy of ``config.json``, so ``transformers``'
``from_pretrained`` loads it unchanged.

Architectures (:func:`architecture`, from ``model_type``): ``"bert"``
(BERT, MiniLM), ``"roberta"`` (RoBERTa, XLM-R) -> :mod:`mtx.models.bert`;
``"clip"`` -> :mod:`mtx.models.clip`; ``"llama"``, ``"gpt2"`` ->
:mod:`mtx.models.lm`.

Names are translated by one explicit table per architecture (:data:`TABLES`):
rows of ``Rule(hf, mtx, transform)`` where ``{i}`` stands for a layer index
and ``transform`` is

- ``"identity"``: same array (embeddings, norms, biases, GPT-2's Conv1D
  ``[in, out]`` weights);
- ``"linear"``: transpose (``torch.nn.Linear`` stores ``[out, in]``, flax
  ``Dense`` ``[in, out]``);
- ``"conv2d"``: ``[out, in, kh, kw]`` <-> ``[kh, kw, in, out]``.

Every tensor must match a row and every param must be filled, else
``ValueError`` naming the tensor and its file. Only non-parameter buffers that
``transformers`` recomputes (``position_ids``, GPT-2's causal ``attn.bias``,
RoPE ``inv_freq``) are dropped on import and not written on export; an
``lm_head.weight`` stored next to tied embeddings is accepted only if it equals
them. Tensors under a head model's prefix (``bert.``, ``roberta.``,
``model.``, ``transformer.``) are read too; export writes the prefix that the
config's ``architectures`` class expects (``model.`` for
``LlamaForCausalLM``, ``transformer.`` for ``GPT2LMHeadModel``, none for the
encoders).

>>> import jax, jax.numpy as jnp
>>> from mtx.models import bert
>>> cfg = bert.CONFIGS["tiny"]
>>> params = bert.model(cfg).init(jax.random.key(0), jnp.zeros((1, 4), int))
>>> tensors = to_hf_tensors("bert", params)
>>> tensors["encoder.layer.1.attention.self.query.weight"].shape
(32, 32)
>>> back = from_hf_tensors("bert", tensors, cfg)
>>> bool((back["layer_1"]["attention"]["query"]["kernel"]
...       == params["layer_1"]["attention"]["query"]["kernel"]).all())
True
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mtx.io import safetensors as st
from mtx.models import bert
from mtx.models import clip
from mtx.models import lm
from mtx.models._base import Model


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


def _pattern(template: str) -> re.Pattern:
  parts = [re.escape(p) for p in template.split("{i}")]
  return re.compile(r"(?P<i>\d+)".join(parts) + r"\Z")


class _Compiled(NamedTuple):
  rule: Rule
  hf: re.Pattern
  mtx: re.Pattern


_COMPILED: dict[str, tuple[_Compiled, ...]] = {}


def _compiled(arch: str) -> tuple[_Compiled, ...]:
  if arch not in _COMPILED:
    _COMPILED[arch] = tuple(
        _Compiled(r, _pattern(r.hf), _pattern(r.mtx)) for r in TABLES[arch]
    )
  return _COMPILED[arch]


def _fill(template: str, match: re.Match) -> str:
  return (
      template.replace("{i}", match.group("i"))
      if "{i}" in template
      else template
  )


def _to_mtx(array: np.ndarray, transform: str) -> np.ndarray:
  if transform == "linear":
    return array.T
  if transform == "conv2d":
    return array.transpose(2, 3, 1, 0)
  return array


def _to_hf(array: np.ndarray, transform: str) -> np.ndarray:
  if transform == "linear":
    return array.T
  if transform == "conv2d":
    return array.transpose(3, 2, 0, 1)
  return array


def _example_inputs(config) -> tuple:
  ids = jax.ShapeDtypeStruct((1, 1), jnp.int32)
  if isinstance(config, clip.Config):
    v = config.vision
    images = (1, v.image_size, v.image_size, v.num_channels)
    return (jax.ShapeDtypeStruct(images, jnp.float32), ids)
  return (ids,)


def _model(arch: str, config) -> Model:
  return _check_arch(arch).module.model(config)


def _path(key_path) -> str:
  return jax.tree_util.keystr(key_path, simple=True, separator="/")


def param_shapes(arch: str, config):
  """The params tree of ``arch`` with ``config`` as ShapeDtypeStructs."""
  m = _model(arch, config)
  return jax.eval_shape(m.init, jax.random.key(0), *_example_inputs(config))


def _where(name: str, files) -> str:
  if isinstance(files, str):
    return files
  if files and name in files:
    return files[name]
  return _sources(files)


def _sources(files) -> str:
  if files is None:
    return "the given tensors"
  if isinstance(files, str):
    return files
  distinct = sorted(set(files.values()))
  if not distinct:
    return "the given tensors"
  more = f" (and {len(distinct) - 1} more files)" if len(distinct) > 1 else ""
  return distinct[0] + more


def _hf_shape(shape: tuple[int, ...], transform: str) -> tuple[int, ...]:
  """The Hugging Face shape of an mtx param of ``shape``."""
  if transform == "linear":
    return tuple(reversed(shape))
  if transform == "conv2d":
    kh, kw, cin, cout = shape
    return (cout, cin, kh, kw)
  return tuple(shape)


def _path_of(rules, hf_name: str) -> str:
  for c in rules:
    m = c.hf.match(hf_name)
    if m:
      return _fill(c.rule.mtx, m)
  raise KeyError(hf_name)


def _buffer(arch: _Arch, name: str) -> bool:
  return any(_pattern(b).match(name) for b in arch.buffers)


def from_hf_tensors(
    arch: str,
    tensors: Mapping[str, Any],
    config,
    *,
    files: str | Mapping[str, str] | None = None,
    dtype=None,
    ignore: Sequence[str] = (),
):
  """Hugging Face tensors -> mtx params of ``arch`` with ``config``.

  Args:
    arch: a key of :data:`TABLES`.
    tensors: name -> array (numpy, or lazy tensors that ``np.asarray``
      materialises); names may carry the base-model prefix.
    config: the mtx model config (e.g. from :func:`config_from_hf`).
    files: where the tensors come from, for error messages: one file, or
      name -> file.
    dtype: cast every param to this dtype (default: keep each tensor's).
    ignore: regexes (``re.match`` on the full name) of tensors to leave out
      on purpose, e.g. ``[r"cls\\."]`` for the pre-training heads of
      ``BertForPreTraining`` checkpoints; they are not exported again.

  Returns:
    The params tree, as ``model.init`` builds it, of jax arrays.

  Raises:
    ValueError: a tensor no table row matches, one whose layer the config
      does not have, a shape mismatch, or a param no tensor fills; the
      message names the tensor and its file.
  """
  a = _check_arch(arch)
  rules = _compiled(arch)
  expected = param_shapes(arch, config)
  shapes = {
      _path(p): s.shape
      for p, s in jax.tree_util.tree_leaves_with_path(expected)
  }
  names = {}  # mtx path -> HF name
  hf_names = {}  # mtx path -> the table's HF name (for missing-tensor errors)
  for path in shapes:
    for c in rules:
      m = c.mtx.match(path)
      if m:
        hf_names[path] = _fill(c.rule.hf, m)
        break
  tied = []
  skip = [re.compile(p) for p in ignore]
  for name in tensors:
    base = name[len(a.prefix) :] if name.startswith(a.prefix) else name
    if _buffer(a, base) or any(p.match(name) for p in skip):
      continue
    path = None
    for c in rules:
      m = c.hf.match(base if c.rule.base else name)
      if m:
        path = _fill(c.rule.mtx, m)
        break
    if path is None:
      raise ValueError(
          f"unknown tensor {name!r} in {_where(name, files)}: no {arch} table"
          " row matches it"
      )
    if path not in shapes:
      if a.tied and name == a.tied[0] and config.tie_embeddings:
        tied.append(name)
        continue
      raise ValueError(
          f"tensor {name!r} in {_where(name, files)} maps to {path!r}, which"
          f" the {arch} model of this config does not have"
      )
    if path in names:
      raise ValueError(
          f"tensors {names[path]!r} and {name!r} in {_where(name, files)} both"
          f" map to {path!r}"
      )
    names[path] = name
  missing = sorted(set(shapes) - set(names))
  if missing:
    first = missing[0]
    raise ValueError(
        f"missing tensor {hf_names.get(first, first)!r} (param {first!r}) in"
        f" {_sources(files)}; {len(missing)} param(s) missing in all:"
        f" {[hf_names.get(p, p) for p in missing[:8]]}"
    )
  transforms = {}
  for path, name in names.items():  # shapes first, before reading any data
    transforms[path] = next(
        c.rule.transform for c in rules if c.mtx.match(path)
    )
    want = _hf_shape(shapes[path], transforms[path])
    if tuple(np.shape(tensors[name])) != want:
      raise ValueError(
          f"tensor {name!r} in {_where(name, files)} has shape"
          f" {tuple(np.shape(tensors[name]))}; {arch} param {path!r} needs"
          f" {want} ({shapes[path]} after {transforms[path]!r})"
      )

  def load(key_path, spec):
    path = _path(key_path)
    array = _to_mtx(np.asarray(tensors[names[path]]), transforms[path])
    return jnp.asarray(array, dtype)

  params = jax.tree_util.tree_map_with_path(load, expected)
  for name in tied:
    embed = tensors[names[_path_of(rules, a.tied[1])]]
    if not np.array_equal(np.asarray(tensors[name]), np.asarray(embed)):
      raise ValueError(
          f"{name!r} in {_where(name, files)} differs from the tied input"
          " embeddings (tie_word_embeddings is set)"
      )
  return params


def iter_hf_tensors(
    arch: str, params, *, prefix: str = ""
) -> Iterator[tuple[str, np.ndarray]]:
  """Yields ``(Hugging Face name, numpy array)`` for each param, lazily.

  Arrays are C-contiguous numpy arrays in the params' dtypes; ``prefix`` goes
  before base-model names (``lm_head.weight`` never takes it).

  Raises:
    ValueError: a param path no table row matches.
  """
  _check_arch(arch)
  rules = _compiled(arch)
  for key_path, leaf in jax.tree_util.tree_leaves_with_path(params):
    path = _path(key_path)
    for c in rules:
      m = c.mtx.match(path)
      if m:
        name = _fill(c.rule.hf, m)
        array = _to_hf(np.asarray(leaf), c.rule.transform)
        if not array.flags.c_contiguous:
          array = array.copy(order="C")
        yield (prefix + name if c.rule.base else name), array
        break
    else:
      raise ValueError(f"param {path!r} has no {arch} table row")


def to_hf_tensors(arch: str, params, *, prefix: str = "") -> dict:
  """mtx params -> ``{Hugging Face name: numpy array}`` (see
  :func:`iter_hf_tensors`)."""
  return dict(iter_hf_tensors(arch, params, prefix=prefix))


def export_prefix(hf_config: Mapping[str, Any]) -> str:
  """The base-model prefix the config's ``architectures`` class expects.

  >>> export_prefix({"model_type": "llama", "architectures": ["LlamaForCausalLM"]})
  'model.'
  >>> export_prefix({"model_type": "bert", "architectures": ["BertForMaskedLM"]})
  ''
  """
  a = _ARCHS[architecture(hf_config)]
  if not a.base_class:  # encoders: always the base model's own names
    return ""
  classes = hf_config.get("architectures") or []
  return "" if classes[:1] == [a.base_class] else a.prefix


def _adjust(arch: str, config, has_pooler: bool):
  if arch in ("bert", "roberta") and config.pooler != has_pooler:
    return dataclasses.replace(config, pooler=has_pooler)
  return config


def load(
    path: str | os.PathLike, *, dtype=None, ignore: Sequence[str] = ()
) -> tuple[Model, Any, dict]:
  """Loads a Hugging Face checkpoint directory.

  Args:
    path: a directory with ``config.json`` and ``model.safetensors`` (or
      sharded safetensors with ``model.safetensors.index.json``).
    dtype: cast params to this dtype (default: the checkpoint's).
    ignore: regexes of tensor names to leave out on purpose (see
      :func:`from_hf_tensors`).

  Returns:
    ``(model, params, hf_config)``: the :class:`~mtx.models.Model` built from
    ``config.json``, its params (jax arrays) and the config dict.

  Raises:
    ValueError: unsupported architecture, or tensors that do not match the
      architecture's table (naming tensor and file).
    FileNotFoundError: no ``config.json`` or safetensors files.
  """
  path = os.fspath(path)
  config_file = os.path.join(path, "config.json")
  if not os.path.exists(config_file):
    raise FileNotFoundError(f"no config.json in {path}")
  with open(config_file) as f:
    hf_config = json.load(f)
  arch = architecture(hf_config)
  tensors = st.open_checkpoint(path)
  files = {name: tensors.info(name).file for name in tensors}
  has_pooler = any(n.endswith("pooler.dense.weight") for n in tensors)
  config = _adjust(arch, config_from_hf(hf_config), has_pooler)
  params = from_hf_tensors(
      arch, tensors, config, files=files, dtype=dtype, ignore=ignore
  )
  return _model(arch, config), params, hf_config


def _write_json(path: str, obj) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2, sort_keys=True)
    f.write("\n")
  os.replace(tmp, path)


def save(
    path: str | os.PathLike,
    params,
    hf_config: Mapping[str, Any],
    *,
    shard_size: int | str | None = None,
) -> None:
  """Writes params as a Hugging Face checkpoint directory.

  Writes ``config.json`` (a copy of ``hf_config``) and ``model.safetensors``,
  or with ``shard_size`` (bytes per shard) ``model-0000k-of-0000n.safetensors``
  shards and ``model.safetensors.index.json``. Tensor names, shapes and
  dtypes are those :func:`load` reads; ``transformers`` loads the directory
  with ``from_pretrained``.

  Args:
    path: the output directory (created if needed).
    params: params of the model ``hf_config`` describes.
    hf_config: the Hugging Face config dict (e.g. from :func:`load`).
    shard_size: maximum bytes per shard (or a size such as ``"2GB"``); None
      writes one file.

  Raises:
    ValueError: params that do not match the config's model (path, shape).
  """
  arch = architecture(hf_config)
  config = _adjust(arch, config_from_hf(hf_config), "pooler" in params)
  expected = {
      _path(p): s.shape
      for p, s in jax.tree_util.tree_leaves_with_path(
          param_shapes(arch, config)
      )
  }
  got = {
      _path(p): np.shape(x)
      for p, x in jax.tree_util.tree_leaves_with_path(params)
  }
  for p in sorted(set(expected) | set(got)):
    if expected.get(p) != got.get(p):
      raise ValueError(
          f"param {p!r}: {got.get(p, 'missing')} in params, the {arch} model"
          f" of hf_config needs {expected.get(p, 'none')}"
      )
  path = os.fspath(path)
  os.makedirs(path, exist_ok=True)
  tensors = iter_hf_tensors(arch, params, prefix=export_prefix(hf_config))
  metadata = {"format": "pt"}
  if shard_size is None:
    single = os.path.join(path, st.SINGLE_NAME)
    st.write(single, dict(tensors), metadata=metadata)
    _remove_weights(path, keep=(st.SINGLE_NAME,))
  else:
    # Shards are written into a fresh sibling folder (atomically), then moved
    # in, replacing the weights of an earlier save; other files stay.
    tmp = tempfile.mkdtemp(dir=os.path.dirname(os.path.abspath(path)))
    staged = os.path.join(tmp, "weights")
    try:
      st.write_sharded(staged, tensors, shard_size, metadata)
      _remove_weights(path, keep=())
      for name in sorted(os.listdir(staged)):
        os.replace(os.path.join(staged, name), os.path.join(path, name))
    finally:
      shutil.rmtree(tmp, ignore_errors=True)
  _write_json(os.path.join(path, "config.json"), dict(hf_config))


_WEIGHTS = re.compile(
    r"model(-\d+-of-\d+)?\.safetensors|model\.safetensors\.index\.json"
)


def _remove_weights(path: str, keep: tuple[str, ...]) -> None:
  for name in os.listdir(path):
    if _WEIGHTS.fullmatch(name) and name not in keep:
      os.remove(os.path.join(path, name))


__all__ = [
    "BERT",
    "CLIP",
    "GPT2",
    "LLAMA",
    "TABLES",
    "Rule",
    "architecture",
    "config_from_hf",
    "export_prefix",
    "from_hf_tensors",
    "iter_hf_tensors",
    "load",
    "param_shapes",
    "save",
    "to_hf_tensors",
]
