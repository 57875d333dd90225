"""The field's known behaviours, checked on the results with paired tests.

Every method is scored on the same test examples, so two rows are compared
through their per-example hits (recorded in each row as ``hits``): the
difference of the two means has the paired standard error of the
per-example differences (normal approximation, :func:`paired_difference`),
and the exact McNemar test on the discordant examples gives a p-value
(:func:`mcnemar_exact`). Each check reports the difference and its paired
s.e. whether it holds or not; ``significant`` says whether the test sets
tell the two apart (|z| >= 2).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

MODES = ("standard", "linearized")


# ----------------------------------------------------------------------------
# Per-example hits: packed bits in the results.


def pack_hits(hits) -> str:
  """Booleans ``[n]`` as a hex string (``np.packbits``, big-endian bits)."""
  return np.packbits(np.asarray(hits, bool)).tobytes().hex()


def unpack_hits(packed: str, n: int) -> np.ndarray:
  """The inverse of :func:`pack_hits` for ``n`` examples."""
  bits = np.unpackbits(np.frombuffer(bytes.fromhex(packed), np.uint8))
  if len(bits) < n:
    raise ValueError(f"packed hits hold {len(bits)} bits, expected {n}")
  return bits[:n].astype(bool)


def row_hits(row: Mapping) -> dict[str, np.ndarray] | None:
  """``{task: hits [n]}`` of a results row, or None if it has none."""
  if "hits" not in row:
    return None
  return {
      t: unpack_hits(h, row["test_examples"][t]) for t, h in row["hits"].items()
  }


# ----------------------------------------------------------------------------
# Paired statistics.


def paired_difference(
    a: Mapping[str, np.ndarray],
    b: Mapping[str, np.ndarray],
    weights_a: Mapping[str, float] | None = None,
    weights_b: Mapping[str, float] | None = None,
) -> dict[str, float]:
  """The paired difference of two task-averaged accuracies.

  With per-example hits ``a_i``, ``b_i`` on the same examples of each task
  ``t`` (``n_t`` of them) and per-task weights (``1 / individual accuracy``
  for normalized accuracy; 1 for absolute),

    ``diff = (1/T) Σ_t mean_i d_i``, ``d_i = wa_t a_i − wb_t b_i``,
    ``se = (1/T) sqrt(Σ_t s_t² / n_t)``, ``s_t²`` the sample variance
    (ddof 1) of ``d_i`` over task ``t``'s examples,

  and ``z = diff / se``.

  Returns:
    ``{"diff", "se", "z"}`` (``z`` is ±inf or 0 when ``se`` is 0).

  Raises:
    ValueError: different tasks, or a task's hit vectors of different
      lengths (not paired).
  """
  if set(a) != set(b):
    raise ValueError(f"different tasks: {sorted(a)} vs {sorted(b)}")
  tasks = sorted(a)
  means, var = [], 0.0
  for t in tasks:
    x, y = np.asarray(a[t], np.float64), np.asarray(b[t], np.float64)
    if x.shape != y.shape or x.ndim != 1 or len(x) < 2:
      raise ValueError(
          f"task {t}: hits must be paired vectors of 2+ examples, got"
          f" {x.shape} and {y.shape}"
      )
    wa = 1.0 if weights_a is None else float(weights_a[t])
    wb = 1.0 if weights_b is None else float(weights_b[t])
    d = wa * x - wb * y
    means.append(d.mean())
    var += d.var(ddof=1) / len(d)
  diff = float(np.mean(means))
  se = float(np.sqrt(var) / len(tasks))
  if se > 0:
    z = diff / se
  else:
    z = 0.0 if diff == 0 else math.copysign(math.inf, diff)
  return {"diff": diff, "se": se, "z": float(z)}


def mcnemar_exact(a, b) -> dict[str, float]:
  """Exact two-sided McNemar test of paired hits ``a``, ``b`` (pooled).

  ``n01`` = examples ``a`` gets right and ``b`` wrong, ``n10`` the reverse;
  under equal accuracy ``n01 ~ Binomial(n01 + n10, 1/2)``, and
  ``p = min(1, 2 · P[X <= min(n01, n10)])``.
  """
  a, b = np.asarray(a, bool), np.asarray(b, bool)
  if a.shape != b.shape:
    raise ValueError(f"hits not paired: {a.shape} vs {b.shape}")
  n01 = int(np.sum(a & ~b))
  n10 = int(np.sum(~a & b))
  n = n01 + n10
  k = min(n01, n10)
  tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n if n else 1.0
  return {"a_only": n01, "b_only": n10, "p": float(min(1.0, 2 * tail))}


def compare(
    row_a: Mapping,
    row_b: Mapping,
    metric: str,
    ind_a: Mapping | None = None,
    ind_b: Mapping | None = None,
) -> dict | None:
  """Paired statistics of ``row_a − row_b`` on ``metric`` ("absolute" or
  "normalized", the latter dividing each task by the individual model's
  accuracy of the row's own mode: ``ind_a`` / ``ind_b`` rows). None when a
  row has no recorded hits."""
  ha, hb = row_hits(row_a), row_hits(row_b)
  if ha is None or hb is None:
    return None
  wa = wb = None
  if metric == "normalized":
    ind_a = ind_a or {}
    ind_b = ind_b or ind_a
    wa = {t: 1 / max(ind_a["per_task"][t], 1e-12) for t in ha}
    wb = {t: 1 / max(ind_b["per_task"][t], 1e-12) for t in hb}
  out = paired_difference(ha, hb, wa, wb)
  tasks = sorted(ha)
  out.update(
      mcnemar_exact(
          np.concatenate([ha[t] for t in tasks]),
          np.concatenate([hb[t] for t in tasks]),
      )
  )
  out["significant"] = bool(abs(out["z"]) >= 2)
  return out


def per_task_gain(row_a: Mapping, row_b: Mapping) -> dict[str, dict] | None:
  """Per task ``acc_a − acc_b`` with its paired s.e."""
  ha, hb = row_hits(row_a), row_hits(row_b)
  if ha is None or hb is None:
    return None
  return {t: paired_difference({t: ha[t]}, {t: hb[t]}) for t in ha}


def xi_difference(xa: Mapping, xb: Mapping) -> dict[str, float] | None:
  """Paired difference of two ξ means on the same examples (``xa − xb``).

  Each ξ entry records ``per_example``: per task of the pair, each test
  example's disagreement rate averaged over the α grid; ξ's mean is the
  sum over the two tasks of their means, so its paired s.e. adds the two
  tasks' variances.
  """
  if "per_example" not in xa or "per_example" not in xb:
    return None
  diff, var = 0.0, 0.0
  for u, v in zip(xa["per_example"], xb["per_example"]):
    d = np.asarray(u, np.float64) - np.asarray(v, np.float64)
    diff += d.mean()
    var += d.var(ddof=1) / len(d)
  se = float(np.sqrt(var))
  z = diff / se if se > 0 else (0.0 if diff == 0 else math.copysign(1e9, diff))
  return {"diff": float(diff), "se": se, "z": float(z)}


# ----------------------------------------------------------------------------
# The checks.


def checks(modes: dict) -> dict[str, dict]:
  """Whether the results reproduce the behaviours the literature reports.

  ``holds`` judges the point estimates; ``stats`` gives the paired
  difference (``diff``, ``se``, ``z``, McNemar's ``p``) so that a reader sees
  how far the test sets can tell the rows apart, for passes and failures
  alike.
  """
  out = {}
  for mode, m in modes.items():
    r = m["rows"]
    pre, ind = r["pretrained"], r["individual"]
    gains = {
        t: ind["per_task"][t] - pre["per_task"][t] for t in ind["per_task"]
    }
    gain_stats = per_task_gain(ind, pre)
    out[f"{mode}: individual >> pretrained (every task +5 points or more)"] = {
        "holds": min(gains.values()) >= 0.05,
        "detail": {t: round(g, 4) for t, g in gains.items()},
        "per_task": gain_stats,
    }
    if "task_arithmetic" in r:
      ta = r["task_arithmetic"]
      out[f"{mode}: task arithmetic below individual"] = {
          "holds": ta["absolute"] < ind["absolute"],
          "detail": [ta["absolute"], ind["absolute"]],
          "stats": compare(ta, ind, "absolute"),
      }
      for other in ("ties", "consensus"):
        if other in r:
          out[f"{mode}: {other} >= task arithmetic (normalized)"] = {
              "holds": r[other]["normalized"] >= ta["normalized"] - 1e-9,
              "detail": [r[other]["normalized"], ta["normalized"]],
              "stats": compare(r[other], ta, "normalized", ind, ind),
          }
    tall = r.get("tall_mask_retrieval")
    if tall is not None:
      st = compare(tall, ind, "normalized", ind, ind)
      out[f"{mode}: TALL-mask retrieval >= 99% of individual"] = {
          "holds": tall["normalized"] >= 0.99,
          "detail": tall["normalized"],
          # normalized − 1 with its paired s.e.
          "stats": st,
      }
  if set(modes) >= set(MODES):
    s, lin = modes["standard"], modes["linearized"]
    if "task_arithmetic" in s["rows"] and "task_arithmetic" in lin["rows"]:
      a = s["rows"]["task_arithmetic"]
      b = lin["rows"]["task_arithmetic"]
      out["linearized improves normalized task-addition accuracy"] = {
          "holds": b["normalized"] > a["normalized"],
          "detail": [a["normalized"], b["normalized"]],
          "stats": compare(
              b,
              a,
              "normalized",
              lin["rows"]["individual"],
              s["rows"]["individual"],
          ),
      }
    xs = [x["mean"] for x in s["xi"]]
    xl = [x["mean"] for x in lin["xi"]]
    if xs and xl:
      diffs = [xi_difference(b, a) for a, b in zip(s["xi"], lin["xi"])]
      stats = None
      if diffs and all(d is not None for d in diffs):
        k = len(diffs)
        diff = sum(d["diff"] for d in diffs) / k
        se = float(np.sqrt(sum(d["se"] ** 2 for d in diffs)) / k)
        stats = {
            "diff": diff,
            "se": se,
            "z": diff / se if se > 0 else 0.0,
            "significant": bool(se > 0 and abs(diff / se) >= 2),
        }
      out["linearized lowers disentanglement error"] = {
          "holds": float(np.mean(xl)) < float(np.mean(xs)),
          "detail": [float(np.mean(xs)), float(np.mean(xl))],
          "stats": stats,
      }
  return out
