"""Input checks shared by every merging method.

Continuous coefficients (``scale``, SLERP's ``t``, per-task ``weights``, ...)
are traced call arguments: they are checked here when their value is concrete
and passed through untouched when they are tracers (``jax.jit``, ``jax.vmap``,
``jax.grad``), so checking never breaks tracing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mtx import _select
from mtx import tree as mtree


def is_traced(x: Any) -> bool:
  return any(isinstance(v, jax.core.Tracer) for v in jax.tree.leaves(x))


def is_real(dt) -> bool:
  """Whether ``dt`` is a real numeric dtype (bool, integer, float, bfloat16)."""
  return (
      jnp.issubdtype(dt, jnp.floating)
      or jnp.issubdtype(dt, jnp.integer)
      or (jnp.dtype(dt) == jnp.bool_)
  )


def real_array(name: str, value: Any) -> np.ndarray:
  """``value`` as a numpy array of real numbers (concrete values only).

  Raises:
    ValueError: ``value`` is not numeric (a string, None, a bool, an object),
      is complex, holds NaN or Inf, or overflows the accumulation dtype (float32,
      or float64 under x64).
  """
  if value is None or isinstance(value, str | bytes):
    raise ValueError(f"{name} must be a number, got {value!r}")
  try:
    a = np.asarray(value)
  except (TypeError, ValueError):
    raise ValueError(f"{name} must be a number, got {value!r}") from None
  if a.dtype == np.bool_:
    raise ValueError(f"{name} must be a number, not a bool: got {value!r}")
  if not is_real(a.dtype):
    raise ValueError(
        f"{name} must be a real number, got {value!r} (dtype {a.dtype})"
    )
  if jnp.issubdtype(a.dtype, jnp.floating):
    a = a.astype(np.float64)
    with np.errstate(all="ignore"):
      finite = np.isfinite(a).all()
      big = np.abs(a.astype(np.float64)).max(initial=0.0)
    if not finite:
      raise ValueError(f"{name} must be finite, got {_show(a)}")
    acc = mtree.accum_dtype()
    if big > np.finfo(acc).max:
      raise ValueError(
          f"{name} overflows {np.dtype(acc).name}: got {_show(a)} "
          f"(largest magnitude {big:g})"
      )
  return a


def _show(a: np.ndarray) -> str:
  return repr(a.item()) if a.ndim == 0 else np.array2string(a, threshold=8)


def number(
    name: str,
    value: Any,
    *,
    lo: float | None = None,
    hi: float | None = None,
    lo_open: bool = False,
) -> float:
  """A finite real scalar in ``[lo, hi]`` (``(lo, hi]`` when ``lo_open``)."""
  a = real_array(name, value)
  if a.ndim != 0:
    raise ValueError(f"{name} must be a scalar, got shape {a.shape}")
  v = float(a)
  _in_range(name, a, lo, hi, lo_open)
  return v


def _in_range(name, a, lo, hi, lo_open) -> None:
  if lo is not None and (np.any(a <= lo) if lo_open else np.any(a < lo)):
    op = ">" if lo_open else ">="
    raise ValueError(f"{name} must be {op} {lo:g}, got {_show(a)}")
  if hi is not None and np.any(a > hi):
    raise ValueError(f"{name} must be <= {hi:g}, got {_show(a)}")


class Coeff(NamedTuple):
  """How a method checks one continuous coefficient (when it is concrete).

  Attributes:
    shape: ``"scalar"``, ``"per_task"`` (a ``[T]`` vector) or ``"either"``.
    lo: smallest allowed value (None: any).
    hi: largest allowed value (None: any).
    none_ok: None is a valid value (e.g. "uniform weights").
    nonzero_sum: a ``[T]`` vector must not sum to 0 (it is a divisor).
  """

  shape: str = "scalar"
  lo: float | None = None
  hi: float | None = None
  none_ok: bool = False
  nonzero_sum: bool = False


def coeff(
    method: str, name: str, value: Any, spec: Coeff, t: int | None
) -> None:
  """Checks ``value`` of coefficient ``name`` against ``spec`` (``t`` = T,
  None when the number of tasks is not known yet)."""
  label = f"{method} {name}"
  if value is None:
    if spec.none_ok:
      return
    raise ValueError(f"{label} must be a number, got None")
  if is_traced(value):
    return
  a = real_array(label, value)
  if spec.shape == "scalar" and a.ndim != 0:
    raise ValueError(f"{label} must be a scalar, got shape {a.shape}")
  if spec.shape == "per_task" and a.ndim != 1:
    raise ValueError(f"{label} must be a [T] vector, got shape {a.shape}")
  if spec.shape == "either" and a.ndim > 1:
    raise ValueError(
        f"{label} must be a scalar or a [T] vector, got shape {a.shape}"
    )
  if a.ndim == 1 and t is not None and a.shape[0] != t:
    raise ValueError(
        f"{label} has {a.shape[0]} entries for {t} fine-tuned models"
    )
  _in_range(label, a, spec.lo, spec.hi, False)
  if spec.nonzero_sum and a.ndim == 1 and float(a.sum()) == 0.0:
    raise ValueError(f"{label} sum to 0: {_show(a)}")


def key(method: str, value: Any) -> None:
  """Raises unless ``value`` is None or a PRNG key (typed or raw uint32)."""
  if value is None:
    return
  dt = getattr(value, "dtype", None)
  ok = dt is not None and (
      jax.dtypes.issubdtype(dt, jax.dtypes.prng_key)
      or (jnp.dtype(dt) == jnp.uint32 and np.shape(value)[-1:] == (2,))
  )
  if not ok:
    raise ValueError(
        f"method {method!r}: key must be a PRNG key from jax.random.key(...), "
        f"got {value!r}"
    )


def leaf_dtype(path: str, x: Any, name: str = "pretrained") -> None:
  """Raises unless leaf ``x`` is a real floating-point array JAX can hold.

  float64 leaves need ``jax_enable_x64`` (without it JAX would compute and
  return them in float32, silently rounding the pretrained weights).
  """
  dt = mtree.dtype_of(x)
  if dt.kind == "c":
    raise ValueError(
        f"{name} leaf {path!r} is {dt.name}: complex parameters are not "
        "supported (merge the real and imaginary parts as separate leaves)"
    )
  if not mtree.is_floating(x):
    kind = "integer" if dt.kind in "biu" else f"{dt.name}, not a float array"
    raise ValueError(
        f"{name} leaf {path!r} has dtype {dt} ({kind}); integer and "
        "non-numeric leaves cannot be differenced; leave it out with exclude="
    )
  if dt == np.float64 and hasattr(x, "dtype") and not jax.config.jax_enable_x64:
    raise ValueError(
        f"{name} leaf {path!r} is float64 but JAX's x64 mode is off, so it "
        "would be rounded to float32: enable it with "
        "jax.config.update('jax_enable_x64', True) (or JAX_ENABLE_X64=1), "
        "or cast the params to float32"
    )


def finite_host_or_device(x: Any) -> bool:
  """Whether every entry of a (concrete) array is finite."""
  if _select.on_host(x) or isinstance(x, int | float):
    a = np.asarray(x)
    if a.dtype not in (np.float32, np.float64):
      a = a.astype(np.float32)
    a = a.ravel()
    with np.errstate(all="ignore"):
      # A NaN or Inf anywhere makes the sum of squares non-finite, so a
      # finite one proves the array finite (one BLAS pass); only then (an
      # overflow, or a real NaN/Inf) look entry by entry.
      if np.isfinite(np.dot(a, a)):
        return True
    return bool(np.isfinite(a).all())
  return bool(_all_finite(x))


@jax.jit
def _all_finite(x):
  return jnp.all(jnp.isfinite(x))


def by_path(name: str, trees: Sequence[Any]) -> list[dict[str, Any]]:
  """One ``{path: array}`` dict per model from per-model trees (or dicts)."""
  if isinstance(trees, Mapping) or not isinstance(trees, Sequence):
    raise ValueError(f"{name} must be a list with one entry per model")
  out = []
  for t in trees:  # a params-shaped tree, or a flat {path: array} dict
    paths, leaves, _ = mtree.flatten(t)
    out.append(dict(zip(paths, leaves)))
  if len({frozenset(d) for d in out}) > 1:
    raise ValueError(f"the {name} of different models cover different leaves")
  return out
