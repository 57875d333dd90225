"""Model merging: every training-free method behind one registry.

>>> import jax.numpy as jnp, mtx
>>> pre = {"w": jnp.zeros(3)}
>>> fts = [{"w": jnp.array([1.0, -2.0, 0.0])}, {"w": jnp.array([3.0, 2.0, 1.0])}]
>>> mtx.merging.merge(pre, fts, "task_arithmetic", scale=0.5)["w"].tolist()
[2.0, 0.0, 0.5]
>>> sorted(mtx.merging.METHODS)[:3]
['average', 'breadcrumbs', 'compeft']
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax

from mtx.merging import _core
from mtx.merging import basic
from mtx.merging import breadcrumbs as _breadcrumbs
from mtx.merging import compeft as _compeft
from mtx.merging import consensus as _consensus
from mtx.merging import dare as _dare
from mtx.merging import fisher as _fisher
from mtx.merging import interpolation
from mtx.merging import lines as _lines
from mtx.merging import pcb as _pcb
from mtx.merging import svd
from mtx.merging import ties as _ties
from mtx.merging._core import Ctx, Merger, Source, Stats, prepare_leaves

# name -> factory(**hparams) -> Merger. Explicit: nothing registers itself.
METHODS: dict[str, Callable[..., Merger]] = {
    "average": basic.average,
    "weighted_average": basic.weighted_average,
    "task_arithmetic": basic.task_arithmetic,
    "ties": _ties.ties,
    "dare": _dare.dare,
    "breadcrumbs": _breadcrumbs.breadcrumbs,
    "consensus": _consensus.consensus,
    "pcb": _pcb.pcb,
    "lines": _lines.lines,
    "model_stock": interpolation.model_stock,
    "slerp": interpolation.slerp,
    "fisher": _fisher.fisher,
    "regmean": _fisher.regmean,
    "compeft": _compeft.compeft,
    "tsvm": svd.tsvm,
    "iso_c": svd.iso_c,
}


def get(name: str, **hparams: Any) -> Merger:
  """Builds the method ``name`` with structural hyperparameters ``hparams``.

  Raises:
    ValueError: unknown method name or hyperparameter, or an out-of-range
      value (named in the message).
  """
  if not isinstance(name, str) or name not in METHODS:
    raise ValueError(
        f"unknown merging method {name!r}; known: {sorted(METHODS)}"
    )
  return _core.call_factory(name, METHODS[name], hparams)


def merge(
    pretrained: Any,
    finetuned: Sequence[Any],
    method: str | Merger,
    *,
    scale: Any = 1.0,
    key: jax.Array | None = None,
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    check_finite: bool = True,
    **hparams: Any,
) -> Any:
  """Merges fine-tuned models into one: ``θ0 + combine(θt − θ0)``.

  Args:
    pretrained: the pretrained params θ0 (any pytree of float arrays).
    finetuned: a list of ``T`` param trees with θ0's structure, shapes and
      dtypes.
    method: a registry name (see :data:`METHODS`) or a built :class:`Merger`.
    scale: λ: a scalar, a ``[T]`` vector (methods with per-task weights), or a
      prefix tree of those over the params (per-layer scales). Traced: sweep
      it under ``jax.vmap``.
    key: PRNG key for random methods (DARE).
    include: path regex(es); only matching leaves take part.
    exclude: path regex(es); matching leaves keep their pretrained value.
    check_finite: raise if an input leaf holds NaN or Inf.
    **hparams: the method's hyperparameters (when ``method`` is a name) and
      overrides of its continuous coefficients (e.g. SLERP's ``t``).

  Returns:
    The merged params: same structure, shapes, dtypes (and sharding) as
    ``pretrained``. Leaves not selected are ``pretrained``'s own arrays.
    Arithmetic runs in float32 (float64 under x64). No input is modified or
    donated; the caller may keep using every input.

  Raises:
    ValueError: before any work, on mismatched trees (the path is named),
      integer leaves selected, NaN/Inf, no fine-tuned models, an unknown
      method or hyperparameter, out-of-range values, or a random method
      without ``key``.
  """
  if isinstance(method, Merger):
    merger, coeffs = method, hparams
  else:
    if not isinstance(method, str) or method not in METHODS:
      raise ValueError(
          f"unknown merging method {method!r}; known: {sorted(METHODS)}"
      )
    coeffs = {}
    structural = dict(hparams)
    merger = get(method, **structural)
  return _core.merge_models(
      merger,
      pretrained,
      finetuned,
      scale=scale,
      key=key,
      include=include,
      exclude=exclude,
      check_finite=check_finite,
      **coeffs,
  )


__all__ = [
    "METHODS",
    "Ctx",
    "Merger",
    "Source",
    "Stats",
    "get",
    "merge",
    "prepare_leaves",
]
