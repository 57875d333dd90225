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

The name tables live in ``_hf_tables``, the tensor conversion in
``_hf_convert``; this module reads and writes folders and is the public
surface.

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

import json
import os
import re
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

from mtx.io import safetensors as st
from mtx.io._hf_convert import _adjust
from mtx.io._hf_convert import _model
from mtx.io._hf_convert import _path
from mtx.io._hf_convert import export_prefix
from mtx.io._hf_convert import from_hf_tensors
from mtx.io._hf_convert import iter_hf_tensors
from mtx.io._hf_convert import param_shapes
from mtx.io._hf_convert import to_hf_tensors
from mtx.io._hf_tables import architecture
from mtx.io._hf_tables import BERT
from mtx.io._hf_tables import CLIP
from mtx.io._hf_tables import config_from_hf
from mtx.io._hf_tables import GPT2
from mtx.io._hf_tables import LLAMA
from mtx.io._hf_tables import Rule
from mtx.io._hf_tables import TABLES
from mtx.models._base import Model


def load(
    path: str | os.PathLike,
    *,
    dtype=None,
    ignore: Sequence[str] = (),
    verify: bool = True,
) -> tuple[Model, Any, dict]:
  """Loads a Hugging Face checkpoint directory.

  Args:
    path: a directory with ``config.json`` and ``model.safetensors`` (or
      sharded safetensors with ``model.safetensors.index.json``).
    dtype: cast params to this dtype (default: the checkpoint's).
    ignore: regexes of tensor names to leave out on purpose (see
      :func:`from_hf_tensors`).
    verify: check each tensor against the SHA-256 its file records (files
      written by mtx; see :mod:`mtx.io.safetensors`); False skips it.

  Returns:
    ``(model, params, hf_config)``: the :class:`~mtx.models.Model` built from
    ``config.json``, its params (jax arrays) and the config dict.

  Raises:
    ValueError: unsupported architecture, a corrupt ``config.json`` or
      safetensors file, a tensor that does not match its recorded hash, or
      tensors that do not match the architecture's table (naming tensor and
      file).
    FileNotFoundError: no ``config.json`` or safetensors files.
  """
  path = os.fspath(path)
  config_file = os.path.join(path, "config.json")
  if not os.path.exists(config_file):
    raise FileNotFoundError(f"no config.json in {path}")
  hf_config = _read_config(config_file)
  arch = architecture(hf_config)
  tensors = st.open_checkpoint(path, verify=verify)
  files = {name: tensors.info(name).file for name in tensors}
  has_pooler = any(n.endswith("pooler.dense.weight") for n in tensors)
  config = _adjust(arch, config_from_hf(hf_config), has_pooler)
  params = from_hf_tensors(
      arch, tensors, config, files=files, dtype=dtype, ignore=ignore
  )
  return _model(arch, config), params, hf_config


def _read_config(path: str) -> dict:
  try:
    with open(path, encoding="utf-8") as f:
      config = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
    msg = str(e) if isinstance(e, json.JSONDecodeError) else type(e).__name__
    raise ValueError(f"{path}: not valid JSON ({msg})") from None
  if not isinstance(config, dict):
    raise ValueError(f"{path}: expected a JSON object")
  return config


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
