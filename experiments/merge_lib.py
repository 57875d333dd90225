"""The merge binary's flag parsers (flag text -> value) and its --help text.

Each parser raises ``ValueError`` whose message names the flag and the
offending value in one line; ``experiments/merge.py`` prints it and exits.
"""

from __future__ import annotations

from collections.abc import Sequence
import inspect
import json
import math
import os
import re
from typing import Any

import jax
import numpy as np

import mtx

P = jax.sharding.PartitionSpec
_F32_MAX = float(np.finfo(np.float32).max)
# Methods whose inputs are per-task statistics (arrays), not flag values.
_NEEDS_DATA = ("fishers", "grams")


def parse_value(text: str) -> Any:
  """``"0.2"`` -> 0.2, ``"true"`` -> True, ``"[1, 2]"`` -> [1, 2], else str.

  >>> parse_value("0.2"), parse_value("True"), parse_value("per_leaf")
  (0.2, True, 'per_leaf')
  """
  try:
    return json.loads(text)
  except json.JSONDecodeError:
    pass
  low = text.strip().lower()
  if low in ("true", "false"):
    return low == "true"
  if low == "none":
    return None
  return text


def _check_finite(flag: str, key: str, value: Any) -> None:
  """Refuses NaN/Inf and numbers beyond float32 anywhere in ``value``."""
  if isinstance(value, bool):
    return
  if isinstance(value, int | float):
    if not math.isfinite(value) or abs(value) > _F32_MAX:
      raise ValueError(f"{flag} {key}: {value!r} is not finite in float32")
  elif isinstance(value, list):
    for v in value:
      _check_finite(flag, key, v)
  elif isinstance(value, dict):
    for k, v in value.items():
      _check_finite(flag, f"{key}.{k}", v)


def parse_hparams(items: Sequence[str]) -> dict[str, Any]:
  """``["density=0.2", "scope=per_leaf"]`` -> ``{"density": 0.2, ...}``.

  Raises:
    ValueError: an item without ``=`` or a value, a key given twice, or a
      number that is not finite in float32 (``--hparam`` named).
  """
  out = {}
  for item in items:
    if "=" not in item:
      raise ValueError(f"--hparam {item!r} must look like key=value")
    k, v = item.split("=", 1)
    k = k.strip()
    if not k or not v.strip():
      raise ValueError(f"--hparam {item!r} must look like key=value")
    if k in out:
      raise ValueError(f"--hparam {k} is given twice")
    try:
      out[k] = parse_value(v)
    except (RecursionError, ValueError) as e:
      # JSON nested past the recursion limit, integers of more than 4300
      # digits: name the flag, not the parser's internals.
      shown = v if len(v) <= 40 else v[:40] + "..."
      raise ValueError(
          f"--hparam {k}: cannot parse {shown!r} ({type(e).__name__})"
      ) from None
    _check_finite("--hparam", k, out[k])
  return out


def parse_scales(items: Sequence[str]) -> list[float]:
  """``["0.3", "1"]`` -> ``[0.3, 1.0]``; refuses text, NaN, ±Inf, and values
  beyond float32 (``1e39``), naming ``--scales``.

  >>> parse_scales(["0.3", "1"])
  [0.3, 1.0]
  """
  if not items:
    raise ValueError("--scales is empty")
  out = []
  for s in items:
    try:
      v = float(s)
    except ValueError:
      raise ValueError(f"--scales: {s!r} is not a number") from None
    if not math.isfinite(v) or abs(v) > _F32_MAX:
      raise ValueError(f"--scales: {s!r} is not finite in float32")
    out.append(v)
  return out


def _is_output(path: str) -> bool:
  """Whether folder ``path`` holds one checkpoint this binary wrote (its
  safetensors index or orbax metadata records ``mtx_merge``)."""
  index = os.path.join(path, "model.safetensors.index.json")
  if os.path.isfile(index):
    try:
      with open(index, encoding="utf-8") as f:
        meta = json.load(f).get("metadata")
    except (OSError, ValueError, AttributeError, RecursionError):
      return False
    return isinstance(meta, dict) and "mtx_merge" in meta
  from mtx import checkpoint  # pylint: disable=g-import-not-at-top

  if not checkpoint.is_checkpoint(path):
    return False
  try:
    meta = checkpoint.read_metadata(path, verify=False)
  except Exception:  # pylint: disable=broad-except
    return False
  return "mtx_merge" in meta


def check_replaceable(out: str) -> None:
  """Raises ``ValueError`` unless ``--overwrite`` may replace ``out``: an
  empty folder, or the output of an earlier merge (one checkpoint, or a
  sweep: folders that each are one). A file, a symlink, or a folder holding
  anything else is never deleted, whatever ``--overwrite`` says.

  >>> import tempfile
  >>> check_replaceable(tempfile.mkdtemp())  # empty: fine
  """
  if not os.path.lexists(out):
    return
  why = None
  if os.path.islink(out):
    why = "is a symlink"
  elif not os.path.isdir(out):
    why = "is not a folder"
  else:
    names = [n for n in os.listdir(out) if not n.startswith(".")]
    if names and not _is_output(out):
      subs = [os.path.join(out, n) for n in names]
      if not all(os.path.isdir(p) and _is_output(p) for p in subs):
        why = (
            "is not the output of an earlier merge (no mtx_merge record in"
            " its safetensors index or orbax metadata)"
        )
  if why is not None:
    raise ValueError(
        f"--out={out} {why}, so --overwrite will not replace it; remove it "
        "yourself or choose another --out"
    )


def parse_mesh(text: str) -> tuple[tuple[int, ...], tuple[str, ...]]:
  """``"data=4,model=2"`` -> ``((4, 2), ("data", "model"))``."""
  shape, names = [], []
  for part in text.split(","):
    m = re.fullmatch(r"\s*([A-Za-z_]\w*)\s*=\s*(\d+)\s*", part)
    if not m or int(m.group(2)) < 1:
      raise ValueError(f"--mesh: cannot parse {text!r} (e.g. data=4,model=2)")
    names.append(m.group(1))
    shape.append(int(m.group(2)))
  if len(set(names)) != len(names):
    raise ValueError(f"--mesh {text!r} repeats an axis name")
  return tuple(shape), tuple(names)


def parse_spec(text: str) -> P:
  """``"model,None"`` -> ``P("model", None)``; ``"data+model"`` shards one
  axis over two mesh axes; ``""`` is replicated.

  >>> parse_spec("model,None"), parse_spec("data+model")
  (P('model', None), P(('data', 'model'),))
  """
  if not text.strip():
    return P()
  out = []
  for part in text.split(","):
    part = part.strip()
    if part in ("", "None", "none", "_"):
      out.append(None)
    elif "+" in part:
      out.append(tuple(p.strip() for p in part.split("+")))
    else:
      out.append(part)
  return P(*out)


def parse_shard_rule(text: str) -> tuple[str, P]:
  """``"regex=spec"`` (split at the last ``=``) -> ``(regex, P(...))``."""
  if "=" not in text:
    raise ValueError(f"--shard_rule {text!r} must look like regex=spec")
  pattern, spec = text.rsplit("=", 1)
  try:
    re.compile(pattern)
  except re.error as e:
    raise ValueError(f"--shard_rule {text!r}: invalid regex ({e})") from None
  return pattern, parse_spec(spec)


def parse_dtype(name: str | None, flag: str = "--dtype") -> np.dtype | None:
  """A floating dtype from its name (None stays None)."""
  if name is None:
    return None
  try:
    dt = np.dtype(jax.numpy.dtype(name))
  except TypeError:
    raise ValueError(f"{flag}: unknown dtype {name!r}") from None
  if not jax.numpy.issubdtype(dt, jax.numpy.floating):
    raise ValueError(f"{flag} must be a floating dtype, got {name!r}")
  return dt


def _arg_docs(doc: str) -> dict[str, str]:
  """``{argument: its description}`` from a Google-style ``Args:`` block."""
  out: dict[str, str] = {}
  lines = (doc or "").splitlines()
  try:
    start = next(i for i, x in enumerate(lines) if x.strip() == "Args:")
  except StopIteration:
    return out
  indent, name = None, None
  for line in lines[start + 1 :]:
    if not line.strip():
      continue
    ind = len(line) - len(line.lstrip())
    if indent is None:
      indent = ind
    if ind < indent:
      break
    m = re.match(r"\s*\*{0,2}(\w+)(?: \(.*?\))?:\s*(.*)", line)
    if ind == indent and m:
      name = m.group(1)
      out[name] = m.group(2).strip()
    elif name is not None:
      out[name] += " " + line.strip()
  return out


def methods_help(width: int = 76) -> str:
  """Every method of ``mtx.merging.METHODS`` with its hyperparameters, their
  defaults and their meaning and range (from the method's docstring)."""
  lines = []
  for name, factory in sorted(mtx.merging.METHODS.items()):
    params = [
        p
        for p in inspect.signature(factory).parameters.values()
        if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)
    ]
    if any(p.name in _NEEDS_DATA for p in params):
      lines.append(f"{name}: needs per-task statistics (Python API only)")
      continue
    if not params:
      lines.append(f"{name}: no hyperparameters")
      continue
    lines.append(f"{name}:")
    docs = _arg_docs(factory.__doc__)
    for p in params:
      default = "" if p.default is p.empty else f" (default {p.default!r})"
      if callable(p.default):
        default = " (a Python function: not settable here)"
      text = docs.get(p.name, "")
      text = text.split(". ")[0].rstrip(".")
      entry = f"    {p.name}{default}" + (f": {text}" if text else "")
      while len(entry) > width:
        cut = entry.rfind(" ", 0, width)
        if cut <= 8:
          break
        lines.append(entry[:cut])
        entry = "        " + entry[cut + 1 :]
      lines.append(entry)
  return "\n".join(lines)
