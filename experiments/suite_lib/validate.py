"""The suite config's values checked before any work.

Each bad value is a ``ValueError`` naming the flag that sets it
(``--config.finetune.steps``) and the value, so the binary reports one line
instead of failing minutes later (or, for a NaN learning rate or an unknown
mode, finishing with meaningless results).
"""

from __future__ import annotations

import math
from typing import Any

MODES = ("standard", "linearized")
HEADS = ("prototype", "fit")


def _get(config, dotted: str) -> Any:
  value = config
  for part in dotted.split("."):
    value = value[part]
  return value


def _number(config, dotted: str, *, low: float, low_ok: bool, integer: bool):
  value = _get(config, dotted)
  flag = f"--config.{dotted}"
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    raise ValueError(f"{flag} must be a number, got {value!r}")
  if integer and value != int(value):
    raise ValueError(f"{flag} must be an integer, got {value!r}")
  if not math.isfinite(value):
    raise ValueError(f"{flag} must be finite, got {value!r}")
  if value < low or (value == low and not low_ok):
    sign = ">=" if low_ok else ">"
    raise ValueError(f"{flag} must be {sign} {low:g}, got {value!r}")


def check(config, modes: list[str], methods: list[str], offline: bool) -> None:
  """Raises ``ValueError`` naming the first bad value of ``config`` (the
  normalized suite config; ``modes`` and ``methods`` its lists of modes and
  merging methods; ``offline``: an offline suite, which pretrains its own
  encoder)."""
  import mtx  # pylint: disable=g-import-not-at-top

  unknown = sorted(set(methods) - set(mtx.merging.METHODS))
  if unknown:
    raise ValueError(
        f"--config.methods: unknown merging method(s) {unknown}; known:"
        f" {sorted(mtx.merging.METHODS)}"
    )
  if not modes:
    raise ValueError("--config.modes is empty; give standard and/or linearized")
  bad = [m for m in modes if m not in MODES]
  if bad:
    raise ValueError(
        f"--config.modes: unknown mode(s) {bad}; known: {list(MODES)}"
    )
  if len(set(modes)) != len(modes):
    raise ValueError(f"--config.modes repeats a mode: {modes}")
  if config.head not in HEADS:
    raise ValueError(
        f"--config.head must be one of {list(HEADS)}, got {config.head!r}"
    )
  positive_ints = [
      "finetune.steps",
      "finetune.batch_size",
      "eval_batch_size",
      "sweep_chunk",
      "image_size",
  ]
  stages = ["finetune"]
  if offline:
    positive_ints += ["pretrain.steps", "pretrain.batch_size"]
    stages.append("pretrain")
  for k in positive_ints:
    _number(config, k, low=0, low_ok=False, integer=True)
  for k in ("max_train", "max_test", "max_val_eval", "statistics_examples"):
    _number(config, k, low=0, low_ok=True, integer=True)  # 0: all
  _number(config, "xi_examples", low=0, low_ok=False, integer=True)
  for stage in stages:
    _number(
        config, f"{stage}.learning_rate", low=0, low_ok=False, integer=False
    )
    _number(config, f"{stage}.weight_decay", low=0, low_ok=True, integer=False)
    _number(
        config, f"{stage}.warmup_fraction", low=0, low_ok=True, integer=False
    )
    if _get(config, f"{stage}.warmup_fraction") >= 1:
      raise ValueError(
          f"--config.{stage}.warmup_fraction must be < 1, got"
          f" {_get(config, f'{stage}.warmup_fraction')!r}"
      )
  _number(config, "validation_fraction", low=0, low_ok=False, integer=False)
  if config.validation_fraction >= 1:
    raise ValueError(
        "--config.validation_fraction must be < 1, got"
        f" {config.validation_fraction!r}"
    )
  _number(config, "logit_scale", low=0, low_ok=False, integer=False)
  for k in ("grids.scales", "grids.tall_lambda", "xi_alphas"):
    values = list(_get(config, k))
    if not values:
      raise ValueError(f"--config.{k} is empty")
    for v in values:
      if (
          isinstance(v, bool)
          or not isinstance(v, (int, float))
          or not math.isfinite(v)
      ):
        raise ValueError(f"--config.{k}: {v!r} is not a finite number")
