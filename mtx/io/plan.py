"""What a streamed merge does to each tensor: :class:`Spec` and plans.

A :class:`Spec` is a method, its structural hyperparameters, its continuous
coefficients and the scales of the outputs (one output per scale: a sweep).
A *plan* is one :class:`Spec` for every selected tensor, or ``{tensor name:
Spec}``; tensors with equal specs are merged as one group (one statistics
pass, one set of compiled kernels).

>>> Spec.of("ties", {"density": 0.2}, scales=[0.3, 0.5]).describe()["hparams"]
{'density': 0.2}
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import dataclasses
from typing import Any

import numpy as np

from mtx import merging


def _freeze(v: Any) -> Any:
  if isinstance(v, Mapping):
    return tuple(sorted((k, _freeze(x)) for k, x in v.items()))
  if isinstance(v, list | tuple):
    return tuple(_freeze(x) for x in v)
  if isinstance(v, np.ndarray):
    return tuple(v.tolist())
  return v


def _thaw(v: Any) -> Any:
  if isinstance(v, tuple):
    return [_thaw(x) for x in v]
  return v


@dataclasses.dataclass(frozen=True)
class Spec:
  """How to merge a set of tensors: a method, its hyperparameters, and the
  scales of the outputs (one output per scale, a sweep).

  Build with :meth:`of`; hashable, so tensors with equal specs are merged
  as one group (one statistics pass, one set of compiled kernels).
  """

  method: str
  hparams: tuple[tuple[str, Any], ...] = ()
  coeffs: tuple[tuple[str, Any], ...] = ()
  scales: tuple[Any, ...] = (1.0,)

  @classmethod
  def of(
      cls,
      method: str,
      hparams: Mapping[str, Any] | None = None,
      coeffs: Mapping[str, Any] | None = None,
      scales: Sequence[Any] = (1.0,),
  ) -> Spec:
    """``Spec.of("ties", {"density": 0.2}, scales=[0.3, 0.5])``."""
    if method not in merging.METHODS:
      raise ValueError(
          f"unknown merging method {method!r}; known: {sorted(merging.METHODS)}"
      )
    scales = tuple(_freeze(s) for s in scales)
    if not scales:
      raise ValueError("at least one scale is needed")
    return cls(
        method,
        tuple(sorted((k, _freeze(v)) for k, v in (hparams or {}).items())),
        tuple(sorted((k, _freeze(v)) for k, v in (coeffs or {}).items())),
        scales,
    )

  def build(self) -> merging.Merger:
    return merging.get(self.method, **{k: _thaw(v) for k, v in self.hparams})

  def kwargs(self) -> dict[str, Any]:
    return {k: _thaw(v) for k, v in self.coeffs}

  def scale(self, s: int) -> Any:
    v = self.scales[s]
    return np.asarray(v, np.float32) if isinstance(v, tuple) else v

  def describe(self) -> dict[str, Any]:
    return {
        "method": self.method,
        "hparams": {k: _thaw(v) for k, v in self.hparams},
        "coeffs": {k: _thaw(v) for k, v in self.coeffs},
        "scales": [_thaw(s) for s in self.scales],
    }


Plan = Spec | Mapping[str, Spec]


def groups(
    paths: Sequence[str], selected: Sequence[bool], plan: Plan
) -> tuple[list[Spec], list[list[int]]]:
  """The distinct specs of ``plan`` over the selected tensors and, for each,
  the indices of the tensors it merges (in order of first appearance)."""
  if isinstance(plan, Spec):
    specs = [plan if s else None for s in selected]
  else:
    unknown = sorted(set(plan) - set(paths))
    if unknown:
      raise ValueError(
          f"the plan names tensor {unknown[0]!r}, not in the model"
      )
    specs = [plan.get(p) if s else None for p, s in zip(paths, selected)]
  order: dict[Spec, list[int]] = {}
  for i, spec in enumerate(specs):
    if spec is not None:
      order.setdefault(spec, []).append(i)
  return list(order), list(order.values())


__all__ = ["Plan", "Spec", "groups"]
