"""MergeKit YAML configs as mtx merges, with MergeKit's meaning.

:func:`load` (or :func:`parse`) reads a MergeKit config for a method both
libraries implement and returns a :class:`Recipe`: the pretrained and
fine-tuned checkpoints, the output dtype, and ``recipe.plan(names)``, which
gives every tensor its :class:`mtx.io.plan.Spec` (MergeKit evaluates
parameters per tensor: layer gradients such as ``weight: [0, 0.5, 1]`` and
``filter`` conditions, so specs may differ between tensors). Everything
MergeKit would read but mtx cannot reproduce is an error naming the key;
unknown keys are errors (MergeKit silently ignores them).

How the methods map (θ0 = ``base_model``, τi = θi − θ0, wi/di = a model's
``weight``/``density``, λ = ``lambda``, D = Σ wi where ``normalize``):

=================  ==========================================================
MergeKit           mtx
=================  ==========================================================
linear             ``weighted_average(weights=w)`` over all listed models
                   (θ0 = the first); ``normalize: false`` only when Σ w = 1
task_arithmetic    ``task_arithmetic``, per-task scale ``λ·wi/D``
ties               ``ties(density=[di], scope="per_leaf", zero_sign=
                   "positive", weights=w, reduce="mean"|"sum")``, scale λ
                   (``normalize`` picks mean, dividing by the agreeing
                   weights, or sum); ``rescale: true`` as
                   ``dare(mode="magnitude", rescale="l1", then="ties")``
dare_ties          ``dare(drop_rate=[1−di], rescale="l1"|False, then="ties",
                   density=1, ...)`` as above (MergeKit's ``rescale`` matches
                   each tensor's L1 norm)
dare_linear        ``dare(..., then="task_arithmetic")``, scale ``λ·wi/D``
breadcrumbs        ``breadcrumbs(density=d, top_remove=gamma, axis=None)``
                   (whole tensors), scale ``λ·wi/D``; one ``density`` and
                   ``gamma`` for all models
model_stock        ``model_stock(average="cosine")``
slerp              ``slerp(space="params")`` between the base and the other
                   model (``t=0`` gives the base), ``t`` per tensor
=================  ==========================================================

Refused (an error naming the key): ``della``, ``della_linear``, ``sce``,
``breadcrumbs_ties``, ``nuslerp``, ``multislerp``, ``karcher``,
``arcee_fusion``, ``passthrough``, ``nearswap``, ``ram`` and other methods;
``modules``, ``tokenizer``, ``chat_template``, ``tokenizer_source`` other than
``base``, slices that do not span every layer (frankenmerges), more than one
slice, ``residual_weight``, LoRA references (``model+lora``), model_stock's
``filter_wise``, breadcrumbs with ``rescale``, per-model ``density`` or
``gamma`` that differ for breadcrumbs, linear's ``normalize: false`` with
weights not summing to 1, ``density`` outside (0, 1] (MergeKit clamps a
``density`` above 1 to 1; mtx refuses it, as its ``--hparam=density`` flag
does). Accepted and ignored (noted in
``recipe.notes``): ``int8_mask`` (storage only), ``tokenizer_source: base``
(the base folder's tokenizer files are copied anyway), and parameters MergeKit
defines but ignores for a method (``density``/``rescale`` in
task_arithmetic).

Differences that remain: mtx computes in float32 whatever ``dtype`` says
(MergeKit computes in ``dtype``), so results agree to rounding; ties of
``|τ|`` at a TIES threshold are all kept (MergeKit's argsort keeps exactly
``int(d·n)``); random masks (DARE) come from JAX, not torch; MergeKit's
breadcrumbs keeps nothing in tensors where ``int(gamma·n) = 0`` (a slicing
quirk), mtx keeps the ``int(density·n)`` largest.

Model references are local paths (absolute, relative to the working folder,
or to the config's folder); Hugging Face hub names must be downloaded first.
Layer gradients use the layer index found in tensor names (``layers.3``,
``h.3``, ``blocks.3``...): a layer tensor of layer ``i`` of ``N`` takes
``t = i/(N−1)``; other tensors (embeddings, final norm, head) take ``t = 0``,
as in MergeKit.

>>> recipe = parse({
...     "merge_method": "ties", "base_model": "/m/base",
...     "models": [{"model": "/m/a", "parameters": {"weight": 1.0,
...                                                 "density": 0.5}},
...                {"model": "/m/b", "parameters": {"weight": [0, 1],
...                                                 "density": 0.5}}],
...     "parameters": {"normalize": True}, "dtype": "bfloat16"},
...     check_paths=False)
>>> recipe.finetuned, recipe.dtype
(['/m/a', '/m/b'], 'bfloat16')
>>> plan = recipe.plan(["model.layers.0.w", "model.layers.1.w"])
>>> [dict(plan[n].hparams)["weights"] for n in sorted(plan)]
[(1.0, 0.0), (1.0, 1.0)]
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import dataclasses
import os
from typing import Any

from mtx.io.mergekit_settings import check_params
from mtx.io.mergekit_settings import evaluate
from mtx.io.mergekit_settings import global_params
from mtx.io.mergekit_settings import GTA
from mtx.io.mergekit_settings import REQUIRED
from mtx.io.mergekit_settings import layer_fractions
from mtx.io.mergekit_settings import num_layers
from mtx.io.mergekit_settings import tensor_params
from mtx.io.plan import Spec

PathLike = str | os.PathLike

SUPPORTED = (
    "linear",
    "task_arithmetic",
    "ties",
    "dare_ties",
    "dare_linear",
    "breadcrumbs",
    "model_stock",
    "slerp",
)
_KNOWN_UNSUPPORTED = (
    "breadcrumbs_ties",
    "della",
    "della_linear",
    "sce",
    "nuslerp",
    "multislerp",
    "karcher",
    "arcee_fusion",
    "passthrough",
    "nearswap",
    "ram",
)
_TOP_KEYS = {
    "merge_method",
    "base_model",
    "models",
    "slices",
    "modules",
    "parameters",
    "dtype",
    "out_dtype",
    "tokenizer_source",
    "tokenizer",
    "chat_template",
}
_DTYPES = ("float32", "float16", "bfloat16", "float64")


# ----------------------------------------------------------------------------
# The recipe.


@dataclasses.dataclass
class Recipe:
  """A parsed MergeKit config.

  Attributes:
    method: MergeKit's ``merge_method``.
    pretrained: θ0's path (the ``base_model``; the first model for linear).
    finetuned: the merged models' paths, in config order.
    dtype: the output dtype name (``out_dtype``, else ``dtype``), or None.
    notes: what was accepted but ignored, and why.
    config: the config as read.
  """

  method: str
  pretrained: str
  finetuned: list[str]
  dtype: str | None
  notes: list[str]
  config: dict[str, Any]
  _models: list[str] = dataclasses.field(repr=False, default_factory=list)
  _levels: list[Any] = dataclasses.field(repr=False, default_factory=list)
  _layer_range: tuple[int, int] | None = None

  def plan(self, names: Sequence[str]) -> dict[str, Spec]:
    """The :class:`~mtx.io.plan.Spec` of every tensor in ``names``.

    Raises:
      ValueError: a required parameter missing for a tensor, a value mtx
        cannot reproduce (the key and tensor are named), or slices whose
        ``layer_range`` does not cover the model's layers.
    """
    names = list(names)
    if self._layer_range is not None:
      n = num_layers(names)
      if tuple(self._layer_range) != (0, n):
        raise ValueError(
            f"slices: layer_range {list(self._layer_range)} does not span "
            f"the model's {n} layers; mtx merges whole models (use "
            f"layer_range [0, {n}] or models:)"
        )
    fractions = layer_fractions(names)
    cache: dict[Any, Spec] = {}
    out = {}
    for name in names:
      values = self._values(name, fractions[name])
      key = repr(values)
      if key not in cache:
        cache[key] = self._spec(name, values)
      out[name] = cache[key]
    return out

  # -- per tensor ----------------------------------------------------------

  def _values(self, name: str, t: float):
    """(global values, [per-model tensor values]) for one tensor."""
    model_levels, slice_level, global_level = self._levels

    def lookup(levels, key, default, where):
      for level in levels:
        if level and key in level:
          v = evaluate(level[key], name, t)
          if v is not None:
            return v
      if default is REQUIRED:
        raise ValueError(
            f"missing required MergeKit parameter {key!r} for {where} "
            f"(tensor {name!r})"
        )
      return default

    g = {
        k: lookup([slice_level, global_level], k, d, "the merge")
        for k, d in global_params(self.method).items()
    }
    per_model = []
    for path, level in zip(self._models, model_levels):
      if path == self.pretrained and self.method != "linear":
        continue  # MergeKit skips the base model's task vector
      per_model.append(
          {
              k: lookup([level, slice_level, global_level], k, d, path)
              for k, d in tensor_params(self.method).items()
          }
      )
    return g, per_model

  def _spec(self, name: str, values) -> Spec:
    g, per_model = values
    m = self.method
    if m == "slerp":
      return Spec.of("slerp", {"space": "params"}, coeffs={"t": float(g["t"])})
    if m == "model_stock":
      if g["filter_wise"]:
        raise ValueError(
            "model_stock parameter 'filter_wise: true' (per-row ratios) is "
            "not supported by mtx"
        )
      return Spec.of("model_stock", {"average": "cosine"})
    w = [float(p["weight"]) for p in per_model]
    if m == "linear":
      if not g["normalize"] and abs(sum(w) - 1.0) > 1e-6:
        raise ValueError(
            f"linear with 'normalize: false' and weights summing to "
            f"{sum(w):g} (tensor {name!r}) is not expressible in mtx, which "
            "merges θ0 + Σ w (θi − θ0); use normalize: true or weights "
            "summing to 1"
        )
      return Spec.of("weighted_average", {"weights": w, "normalize": True})
    lam = float(g["lambda"])
    normalize, rescale = bool(g["normalize"]), bool(g["rescale"])
    _, _, sparsify, consensus = GTA[m]
    dens = [float(p["density"]) for p in per_model]
    for d in dens if sparsify is not None else ():
      if not 0.0 < d <= 1.0:
        raise ValueError(
            f"MergeKit parameter 'density' must be in (0, 1], got {d} "
            f"(tensor {name!r}); MergeKit clamps values above 1, mtx refuses "
            "them as its --hparam=density flag does"
        )
    if consensus:
      hp = {
          "scope": "per_leaf",
          "zero_sign": "positive",
          "reduce": "mean" if normalize else "sum",
          "weights": w,
      }
      if sparsify == "magnitude" and not rescale:
        return Spec.of("ties", {"density": _one(dens), **hp}, scales=[lam])
      return Spec.of(
          "dare",
          {
              "drop_rate": _one([1.0 - d for d in dens]),
              "rescale": "l1" if rescale else False,
              "mode": "magnitude" if sparsify == "magnitude" else "random",
              "then": "ties",
              "density": 1.0,
              **hp,
          },
          scales=[lam],
      )
    div = sum(w) if normalize else 1.0
    if abs(div) < 1e-8:
      div = 1.0
    scales = [tuple(lam * x / div for x in w)]
    if sparsify == "random":
      return Spec.of(
          "dare",
          {
              "drop_rate": _one([1.0 - d for d in dens]),
              "rescale": "l1" if rescale else False,
              "then": "task_arithmetic",
          },
          scales=scales,
      )
    if sparsify == "outliers":
      gam = [float(p["gamma"]) for p in per_model]
      if len(set(dens)) > 1 or len(set(gam)) > 1:
        key = "density" if len(set(dens)) > 1 else "gamma"
        raise ValueError(
            f"breadcrumbs with per-model {key!r} values that differ "
            f"({sorted(set(dens if key == 'density' else gam))}, tensor "
            f"{name!r}) is not supported by mtx (one value for all models)"
        )
      if rescale:
        raise ValueError(
            "breadcrumbs parameter 'rescale: true' is not supported by mtx"
        )
      d, gamma = dens[0], gam[0]
      if d < 1.0:
        if not 0.0 <= gamma < 1.0 or d + gamma > 1.0:
          raise ValueError(
              f"breadcrumbs needs 0 <= gamma < 1 and density + gamma <= 1, "
              f"got density {d}, gamma {gamma} (tensor {name!r})"
          )
        return Spec.of(
            "breadcrumbs",
            {"density": d, "top_remove": gamma, "axis": None},
            scales=scales,
        )
    return Spec.of("task_arithmetic", scales=scales)


def _one(values: list[float]) -> float | list[float]:
  """A shared value as a scalar, else the per-model list."""
  return values[0] if len(set(values)) == 1 else values


# ----------------------------------------------------------------------------
# Parsing.


def _resolve(ref: Any, where: str, base_dir: str | None, check: bool) -> str:
  if not isinstance(ref, str):
    raise ValueError(
        f"{where}: expected a path string, got {ref!r} (structured model "
        "references are not supported)"
    )
  if "+" in ref and not os.path.exists(ref):
    raise ValueError(
        f"{where}: LoRA references ({ref!r}) are not supported; merge the "
        "adapter into its model first"
    )
  if not check:
    return ref
  candidates = [ref]
  if base_dir and not os.path.isabs(ref):
    candidates.append(os.path.join(base_dir, ref))
  for c in candidates:
    if os.path.exists(c):
      return os.path.abspath(c)
  raise FileNotFoundError(
      f"{where}: model {ref!r} not found (mtx reads local checkpoints; "
      "download Hugging Face hub models first)"
  )


def parse(
    config: Mapping[str, Any],
    *,
    base_dir: PathLike | None = None,
    check_paths: bool = True,
) -> Recipe:
  """Translates a MergeKit config (the parsed YAML) into a :class:`Recipe`.

  Args:
    config: the config mapping.
    base_dir: folder for relative model paths (besides the working folder).
    check_paths: resolve model paths and require them to exist.

  Raises:
    ValueError: an unknown key, a method or option mtx does not support
      (named), or a malformed value.
    FileNotFoundError: a model path that does not exist.
  """
  if not isinstance(config, Mapping):
    raise ValueError(f"a MergeKit config must be a mapping, got {config!r}")
  for k in config:
    if k not in _TOP_KEYS:
      raise ValueError(f"unknown MergeKit key {k!r}")
  for k in ("modules", "tokenizer", "chat_template"):
    if config.get(k) is not None:
      raise ValueError(f"MergeKit key {k!r} is not supported by mtx")
  notes = []
  tok = config.get("tokenizer_source")
  if tok is not None:
    if tok != "base":
      raise ValueError(
          f"MergeKit key 'tokenizer_source: {tok}' is not supported by mtx "
          "(only 'base')"
      )
    notes.append("tokenizer_source: base: the base folder's files are copied")
  method = config.get("merge_method")
  if method is None:
    raise ValueError("the MergeKit config has no 'merge_method'")
  if method not in SUPPORTED:
    if method in _KNOWN_UNSUPPORTED:
      raise ValueError(
          f"merge_method {method!r} is not supported by mtx (supported: "
          f"{', '.join(SUPPORTED)})"
      )
    raise ValueError(
        f"unknown MergeKit merge_method {method!r} (supported: "
        f"{', '.join(SUPPORTED)})"
    )
  dtype = config.get("out_dtype") or config.get("dtype")
  for k in ("dtype", "out_dtype"):
    if config.get(k) is not None and config[k] not in _DTYPES:
      raise ValueError(f"MergeKit key {k!r}: unknown dtype {config[k]!r}")
  base_dir = None if base_dir is None else os.fspath(base_dir)
  g_allowed = {**global_params(method), **tensor_params(method)}
  t_allowed = tensor_params(method)
  global_level = check_params(
      "parameters", config.get("parameters"), g_allowed, method
  )
  if "int8_mask" in global_level:
    notes.append("int8_mask only changes MergeKit's mask storage; ignored")
  base = config.get("base_model")
  slice_level, layer_range = {}, None
  if config.get("models") is not None and config.get("slices") is not None:
    raise ValueError("give either 'models' or 'slices', not both")
  if config.get("models") is not None:
    entries = config["models"]
    if not isinstance(entries, list) or not entries:
      raise ValueError("'models' must be a non-empty list")
    refs, levels = [], []
    for i, e in enumerate(entries):
      if not isinstance(e, Mapping) or "model" not in e:
        raise ValueError(f"models[{i}] must be a mapping with a 'model'")
      for k in e:
        if k not in ("model", "parameters"):
          raise ValueError(f"unknown MergeKit key models[{i}].{k}")
      refs.append((e["model"], f"models[{i}].model"))
      levels.append(
          check_params(
              f"models[{i}].parameters", e.get("parameters"), t_allowed, method
          )
      )
  elif config.get("slices") is not None:
    slices = config["slices"]
    if not isinstance(slices, list) or len(slices) != 1:
      raise ValueError(
          "'slices' with more than one slice (frankenmerges) is not "
          "supported by mtx"
      )
    sl = slices[0]
    if not isinstance(sl, Mapping) or not sl.get("sources"):
      raise ValueError("slices[0] must be a mapping with 'sources'")
    for k in sl:
      if k not in ("sources", "base_model", "parameters", "residual_weight"):
        raise ValueError(f"unknown MergeKit key slices[0].{k}")
    if sl.get("residual_weight") is not None:
      raise ValueError(
          "MergeKit key 'slices[0].residual_weight' is not supported by mtx"
      )
    if sl.get("base_model") is not None:
      if base is not None and sl["base_model"] != base:
        raise ValueError("slices[0].base_model differs from base_model")
      base = sl["base_model"]
    slice_level = check_params(
        "slices[0].parameters", sl.get("parameters"), g_allowed, method
    )
    refs, levels, ranges = [], [], set()
    for i, src in enumerate(sl["sources"]):
      where = f"slices[0].sources[{i}]"
      if not isinstance(src, Mapping) or "model" not in src:
        raise ValueError(f"{where} must be a mapping with a 'model'")
      for k in src:
        if k not in ("model", "layer_range", "parameters"):
          raise ValueError(f"unknown MergeKit key {where}.{k}")
      lr = src.get("layer_range")
      if (
          not isinstance(lr, list)
          or len(lr) != 2
          or not all(isinstance(x, int) for x in lr)
      ):
        raise ValueError(f"{where}.layer_range must be [start, end]")
      ranges.add(tuple(lr))
      refs.append((src["model"], f"{where}.model"))
      levels.append(
          check_params(
              f"{where}.parameters", src.get("parameters"), t_allowed, method
          )
      )
    if len(ranges) != 1:
      raise ValueError(
          "slices[0].sources have different layer_range values; mtx merges "
          "whole models"
      )
    (layer_range,) = ranges
  else:
    raise ValueError("the MergeKit config needs 'models' or 'slices'")

  paths = [_resolve(r, w, base_dir, check_paths) for r, w in refs]
  if len(set(paths)) != len(paths):
    raise ValueError("a model is listed twice")
  base_path = (
      None
      if base is None
      else _resolve(base, "base_model", base_dir, check_paths)
  )
  if method == "linear":
    if base_path is not None and base_path not in paths:
      raise ValueError(
          "linear: base_model is not among the models (MergeKit would add "
          "it without a weight)"
      )
    pretrained, finetuned = paths[0], list(paths)
  else:
    if base_path is None:
      raise ValueError(f"merge_method {method!r} needs a base_model")
    pretrained = base_path
    finetuned = [p for p in paths if p != base_path]
    if method == "slerp":
      if len(finetuned) != 1:
        raise ValueError(
            "slerp merges exactly two models: the base_model and one other"
        )
      finetuned = [base_path, finetuned[0]]
    elif method == "model_stock" and len(finetuned) < 2:
      raise ValueError("model_stock needs at least two models besides the base")
    elif not finetuned:
      raise ValueError(f"{method}: no models besides the base_model")
  if method == "task_arithmetic":
    for level in [global_level, slice_level, *levels]:
      for k in ("density", "rescale"):
        if k in level:
          notes.append(f"{k} has no effect in task_arithmetic (as in MergeKit)")
  return Recipe(
      method=method,
      pretrained=pretrained,
      finetuned=finetuned,
      dtype=dtype,
      notes=sorted(set(notes)),
      config=dict(config),
      _models=paths,
      _levels=[levels, slice_level, global_level],
      _layer_range=layer_range,
  )


def load(path: PathLike) -> Recipe:
  """Reads a MergeKit YAML file (relative model paths may be relative to its
  folder) and :func:`parse`\\ s it.

  Raises:
    FileNotFoundError: no such file or model.
    ValueError: invalid YAML, or see :func:`parse` (errors name the key).
  """
  import yaml  # pylint: disable=g-import-not-at-top

  path = os.fspath(path)
  try:
    with open(path, encoding="utf-8") as f:
      config = yaml.safe_load(f)
  except FileNotFoundError:
    raise FileNotFoundError(f"no such MergeKit config: {path}") from None
  except yaml.YAMLError as e:
    msg = " ".join(str(e).split())
    raise ValueError(f"{path}: invalid YAML ({msg})") from None
  try:
    return parse(config, base_dir=os.path.dirname(os.path.abspath(path)))
  except ValueError as e:
    raise ValueError(f"{path}: {e}") from None


__all__ = [
    "Recipe",
    "SUPPORTED",
    "evaluate",
    "layer_fractions",
    "load",
    "num_layers",
    "parse",
]
