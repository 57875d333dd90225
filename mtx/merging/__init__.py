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
import inspect
from typing import Any

import jax

from mtx.merging import _driver
from mtx.merging import _protocol
from mtx.merging import average as _average
from mtx.merging import breadcrumbs as _breadcrumbs
from mtx.merging import compeft as _compeft
from mtx.merging import consensus as _consensus
from mtx.merging import dare as _dare
from mtx.merging import fisher as _fisher
from mtx.merging import iso_c as _iso_c
from mtx.merging import lines as _lines
from mtx.merging import model_stock as _model_stock
from mtx.merging import pcb as _pcb
from mtx.merging import regmean as _regmean
from mtx.merging import slerp as _slerp
from mtx.merging import task_arithmetic as _task_arithmetic
from mtx.merging import ties as _ties
from mtx.merging import tsvm as _tsvm
from mtx.merging._driver import prepare_leaves
from mtx.merging._protocol import Ctx, Merger, Stats
from mtx.merging._source import Source

# name -> factory(**hparams) -> Merger. Explicit: nothing registers itself.
# Each factory carries ``min_tasks``/``max_tasks`` (see :func:`task_limits`).
METHODS: dict[str, Callable[..., Merger]] = {
    "average": _average.average,
    "weighted_average": _average.weighted_average,
    "task_arithmetic": _task_arithmetic.task_arithmetic,
    "ties": _ties.ties,
    "dare": _dare.dare,
    "breadcrumbs": _breadcrumbs.breadcrumbs,
    "consensus": _consensus.consensus,
    "pcb": _pcb.pcb,
    "lines": _lines.lines,
    "model_stock": _model_stock.model_stock,
    "slerp": _slerp.slerp,
    "fisher": _fisher.fisher,
    "regmean": _regmean.regmean,
    "compeft": _compeft.compeft,
    "tsvm": _tsvm.tsvm,
    "iso_c": _iso_c.iso_c,
}


def _factory(name: Any) -> Callable[..., Merger]:
  if not isinstance(name, str) or name not in METHODS:
    raise ValueError(
        f"unknown merging method {name!r}; known: {sorted(METHODS)}"
    )
  return METHODS[name]


def _split_base(
    factory: Callable[..., Merger], hparams: dict[str, Any]
) -> tuple[Any, dict[str, Any], dict[str, Any]]:
  """A wrapper's base (name or Merger), its own and its base's hparams."""
  params = inspect.signature(factory).parameters
  own = {
      k
      for k, p in params.items()
      if p.kind is not inspect.Parameter.VAR_KEYWORD
  }
  base = hparams.get(factory.wraps, params[factory.wraps].default)
  mine = {k: v for k, v in hparams.items() if k in own and k != factory.wraps}
  rest = {k: v for k, v in hparams.items() if k not in own}
  return base, mine, rest


def get(name: str, **hparams: Any) -> Merger:
  """Builds the method ``name`` with structural hyperparameters ``hparams``.

  A wrapper method (``dare``'s ``then``, ``lines``' and ``consensus``'
  ``base``) given its base as a registry name gets it built here, with the
  hyperparameters the wrapper does not take itself:
  ``get("dare", then="ties", density=0.2)``.

  Raises:
    ValueError: unknown method name or hyperparameter, or an out-of-range
      value (named in the message).
  """
  factory = _factory(name)
  if getattr(factory, "wraps", None) is not None:
    base, mine, rest = _split_base(factory, hparams)
    if not isinstance(base, Merger):
      _factory(base)
      if base == name:
        # The wrapper checks its base's name; build the default base here so
        # that the check, not a recursion, answers.
        built = get(base)
      else:
        defaults = factory.base_defaults.get(base, {})
        built = get(base, **{**defaults, **rest})
      hparams = {**mine, factory.wraps: built}
  return _protocol.call_factory(name, factory, hparams)


def task_limits(name: str, **hparams: Any) -> tuple[int, int | None]:
  """``(min, max)`` task counts method ``name`` merges (max None: no limit).

  Read from the registry without building the method (no data needed). A
  wrapper's limits are those of its base: the default one, or the one named
  in ``hparams`` (``task_limits("dare", then="slerp")``).

  >>> import mtx
  >>> mtx.merging.task_limits("slerp"), mtx.merging.task_limits("ties")
  ((2, 2), (1, None))

  Raises:
    ValueError: unknown method name.
  """
  factory = _factory(name)
  if getattr(factory, "wraps", None) is not None:
    base, _, rest = _split_base(factory, hparams)
    if isinstance(base, Merger):
      return base.min_tasks, base.max_tasks
    if base != name:
      return task_limits(base, **rest)
  return factory.min_tasks, factory.max_tasks


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
  return _driver.merge_models(
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
    "task_limits",
]
