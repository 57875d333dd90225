"""Hugging Face tensors <-> mtx params by the name tables (private; the
public surface is :mod:`mtx.io.hf`)."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mtx.io._hf_tables import _ARCHS
from mtx.io._hf_tables import _Arch
from mtx.io._hf_tables import _check_arch
from mtx.io._hf_tables import architecture
from mtx.io._hf_tables import Rule
from mtx.io._hf_tables import TABLES
from mtx.models import clip
from mtx.models._base import Model


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
