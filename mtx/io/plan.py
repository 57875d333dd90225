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


class _Held:
  """A value compared and hashed by identity (data such as Fisher trees)."""

  def __init__(self, value: Any):
    self.value = value

  def __eq__(self, other: Any) -> bool:
    return isinstance(other, _Held) and other.value is self.value

  def __hash__(self) -> int:
    return id(self.value)

  def __repr__(self) -> str:
    return f"<data {type(self.value).__name__}>"


@dataclasses.dataclass(frozen=True)
class Spec:
  """How to merge a set of tensors: a method, its hyperparameters, and the
  scales of the outputs (one output per scale, a sweep).

  Build with :meth:`of`; hashable, so tensors with equal specs are merged
  as one group (one statistics pass, one set of compiled kernels). ``data``
  holds what a method is given as arrays rather than values (Fisher's
  ``fishers``, RegMean's ``grams``), compared by identity.
  """

  method: str
  hparams: tuple[tuple[str, Any], ...] = ()
  coeffs: tuple[tuple[str, Any], ...] = ()
  scales: tuple[Any, ...] = (1.0,)
  data: tuple[tuple[str, _Held], ...] = ()

  @classmethod
  def of(
      cls,
      method: str,
      hparams: Mapping[str, Any] | None = None,
      coeffs: Mapping[str, Any] | None = None,
      scales: Sequence[Any] = (1.0,),
      data: Mapping[str, Any] | None = None,
  ) -> Spec:
    """``Spec.of("ties", {"density": 0.2}, scales=[0.3, 0.5])``;
    ``Spec.of("fisher", data={"fishers": [f1, f2]})``."""
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
        tuple(sorted((k, _Held(v)) for k, v in (data or {}).items())),
    )

  def build(self) -> merging.Merger:
    kw = {k: _thaw(v) for k, v in self.hparams}
    kw.update((k, v.value) for k, v in self.data)
    return merging.get(self.method, **kw)

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
        **({"data": [k for k, _ in self.data]} if self.data else {}),
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
