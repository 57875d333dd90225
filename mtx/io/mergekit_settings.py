"""MergeKit parameters: each method's, their defaults, and their settings.

MergeKit evaluates a parameter per tensor: a number, a layer gradient (a
list of numbers interpolated over the layer fraction ``t``) or a list of
``{filter, value}`` conditions matched against the tensor name.
:func:`global_params` and :func:`tensor_params` give the parameters each
method takes (with MergeKit's defaults; :data:`REQUIRED` marks those without
one). Used by :mod:`mtx.io.mergekit`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import re
from typing import Any

# Layer indices in tensor names (HF: model.layers.3..., GPT-2: h.3..., ...).
_LAYER_RE = re.compile(
    r"(?:^|[/._])(?:layers?|blocks?|resblocks|h)[._/](\d+)(?=$|[/._])"
)


def check_setting(where: str, value: Any) -> Any:
  """Validates a parameter setting as MergeKit's ``ParameterSetting``."""
  if isinstance(value, bool | int | float):
    return value
  if isinstance(value, list) and value:
    if all(isinstance(v, bool | int | float) for v in value):
      return value
    if all(isinstance(v, Mapping) for v in value):
      for j, cond in enumerate(value):
        unknown = sorted(set(cond) - {"filter", "value"})
        if unknown:
          raise ValueError(f"unknown MergeKit key {where}[{j}].{unknown[0]}")
        if "value" not in cond:
          raise ValueError(f"{where}[{j}] has no 'value'")
        if cond.get("filter") is not None and not isinstance(
            cond["filter"], str
        ):
          raise ValueError(f"{where}[{j}].filter must be a string")
        check_setting(f"{where}[{j}].value", cond["value"])
      return value
  if isinstance(value, Mapping) and "value" in value:  # a single condition
    return check_setting(where, [value])
  raise ValueError(
      f"{where}: expected a number, a list of numbers (a layer gradient) or "
      f"a list of {{filter, value}} conditions, got {value!r}"
  )


def evaluate(setting: Any, tensor: str, t: float) -> Any:
  """A setting's value for ``tensor`` at layer fraction ``t`` (None when no
  condition matches), as MergeKit's ``evaluate_setting``.

  >>> evaluate([0.0, 0.5, 1.0], "x", 0.25), evaluate(0.3, "x", 0.9)
  (0.25, 0.3)
  >>> evaluate([{"filter": "mlp", "value": 1}, {"value": 2}], "a.mlp.w", 0)
  1
  """
  if isinstance(setting, Mapping):
    setting = [setting]
  if isinstance(setting, bool | int | float):
    return setting
  if all(isinstance(v, int | float) for v in setting):
    scaled = t * (len(setting) - 1)
    i0 = int(scaled)
    i1 = min(len(setting) - 1, i0 + 1)
    frac = scaled - i0
    return (1 - frac) * setting[i0] + frac * setting[i1]
  for cond in setting:
    f = cond.get("filter")
    if f is None or f == "*" or (tensor and f in tensor):
      return evaluate(cond["value"], tensor, t)
  return None


def layer_fractions(names: Sequence[str]) -> dict[str, float]:
  """MergeKit's ``t`` per tensor: ``i/(N−1)`` for layer ``i`` of ``N`` (1
  when ``N = 1``), 0 outside the layers. ``N`` is counted per name prefix
  (the part before the layer number), so towers are counted separately.

  >>> layer_fractions(["emb", "layers.0.w", "layers.2.w", "layers.1.w"])
  {'emb': 0.0, 'layers.0.w': 0.0, 'layers.2.w': 1.0, 'layers.1.w': 0.5}
  """
  found = {}
  count: dict[str, int] = {}
  for name in names:
    m = _LAYER_RE.search(name)
    if m is not None:
      prefix, i = name[: m.start(1)], int(m.group(1))
      found[name] = (prefix, i)
      count[prefix] = max(count.get(prefix, 0), i + 1)
  out = {}
  for name in names:
    if name not in found:
      out[name] = 0.0
      continue
    prefix, i = found[name]
    n = count[prefix]
    out[name] = i / (n - 1) if n > 1 else 1.0
  return out


def num_layers(names: Sequence[str]) -> int:
  """The most layers under one prefix (0 when no name has a layer index)."""
  count: dict[str, int] = {}
  for name in names:
    m = _LAYER_RE.search(name)
    if m is not None:
      prefix = name[: m.start(1)]
      count[prefix] = max(count.get(prefix, 0), int(m.group(1)) + 1)
  return max(count.values(), default=0)


# ----------------------------------------------------------------------------
# Each method's parameters and their defaults.

REQUIRED = object()

GTA = {
    # name: (default normalize, default rescale, sparsification, consensus)
    "task_arithmetic": (False, False, None, False),
    "ties": (True, False, "magnitude", True),
    "dare_ties": (False, True, "random", True),
    "dare_linear": (False, True, "random", False),
    "breadcrumbs": (False, False, "outliers", False),
}


def global_params(method: str) -> dict[str, Any]:
  if method == "linear":
    return {"normalize": True}
  if method == "slerp":
    return {"t": REQUIRED}
  if method == "model_stock":
    return {"filter_wise": False}
  normalize, rescale, _, _ = GTA[method]
  return {
      "int8_mask": False,
      "normalize": normalize,
      "rescale": rescale,
      "lambda": 1.0,
  }


def tensor_params(method: str) -> dict[str, Any]:
  if method == "linear":
    return {"weight": REQUIRED}
  if method in ("slerp", "model_stock"):
    return {}
  out = {"weight": REQUIRED, "density": 1.0}
  if method == "breadcrumbs":
    out["gamma"] = 0.01
  return out


def check_params(
    where: str, params: Any, allowed: Mapping[str, Any], method: str
):
  if params is None:
    return {}
  if not isinstance(params, Mapping):
    raise ValueError(f"{where} must be a mapping, got {params!r}")
  out = {}
  for k, v in params.items():
    if k not in allowed:
      raise ValueError(
          f"unknown MergeKit key {where}.{k} for merge_method {method!r} "
          f"(it takes {sorted(allowed) or 'none'})"
      )
    out[k] = check_setting(f"{where}.{k}", v)
  return out


__all__ = [
    "GTA",
    "REQUIRED",
    "check_params",
    "check_setting",
    "evaluate",
    "global_params",
    "layer_fractions",
    "num_layers",
    "tensor_params",
]
