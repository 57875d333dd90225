"""Stage 5: the report, ``results.md`` and the PNG plots.

``results.md`` names the tasks actually run (and those skipped, with why),
shows every row of ``results.json``, the checks with their paired statistics
(difference ± paired s.e.) and the time per stage as computed (a cached
stage shows the time recorded by the run that computed it).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _row_order(rows: dict) -> list[str]:
  head = ["pretrained", "individual"]
  tail = ["tall_mask_retrieval"]
  mid = [k for k in rows if k not in head + tail]
  return [k for k in head + mid + tail if k in rows]


def _hp_text(h: dict) -> str:
  parts = []
  for k, v in h.items():
    if isinstance(v, list):
      parts.append(f"{k}=[{', '.join(f'{x:g}' for x in v)}]")
    elif isinstance(v, float):
      parts.append(f"{k}={v:g}")
    else:
      parts.append(f"{k}={v}")
  return " ".join(parts)


def markdown(results: dict) -> str:
  """The results tables (percent, one decimal) and the checks."""
  tasks = results["tasks"]
  skipped = results.get("skipped_tasks") or {}
  lines = [
      f"# mtx suite `{results['suite']}`: {len(tasks)} tasks",
      "",
      f"Tasks run: {', '.join(f'`{t}`' for t in tasks)}"
      + (
          f" ({len(skipped)} of the suite's tasks skipped, see below)."
          if skipped
          else "."
      ),
      "",
      "Test accuracy (%) per task with each task's frozen head;"
      " **abs** = mean accuracy, **norm** = mean of accuracy / individual"
      " fine-tuned accuracy. Hyperparameters chosen on validation.",
      "",
  ]
  if results.get("skipped_tasks"):
    for n, why in results["skipped_tasks"].items():
      lines.append(f"- skipped task `{n}`: {why}")
    lines.append("")
  for mode, m in results["modes"].items():
    lines += [
        f"## {mode} fine-tuning",
        "",
        "| method | " + " | ".join(tasks) + " | abs | norm | hyperparameters |",
        "|---|" + "---|" * len(tasks) + "---|---|---|",
    ]
    for name in _row_order(m["rows"]):
      r = m["rows"][name]
      cells = " | ".join(f"{100 * r['per_task'][t]:.1f}" for t in tasks)
      lines.append(
          f"| {name} | {cells} | {100 * r['absolute']:.1f} |"
          f" {100 * r['normalized']:.1f} | {_hp_text(r['hparams'])} |"
      )
    for name, why in m.get("skipped_methods", {}).items():
      lines.append(
          f"| {name} | "
          + " | ".join("–" for _ in tasks)
          + f" | – | – | not run: {why} |"
      )
    lines.append("")
    if m.get("transfer"):
      lines += [
          "",
          "Each fine-tuned model on every task (rows: fine-tuned on; columns:"
          " evaluated on; test accuracy %, diagonal = individual):",
          "",
          "| fine-tuned on | " + " | ".join(tasks) + " |",
          "|---|" + "---|" * len(tasks),
      ]
      for t, row in zip(tasks, m["transfer"]):
        lines.append(
            f"| {t} | " + " | ".join(f"{100 * a:.1f}" for a in row) + " |"
        )
      lines.append("")
    for x in m["xi"]:
      lines.append(
          f"Weight disentanglement error ξ on {x['pair'][0]} + {x['pair'][1]}"
          f" (mean over α ∈ [{x['alphas'][0]:g}, {x['alphas'][-1]:g}]²):"
          f" {x['mean']:.3f}"
          + (f" ± {x['se']:.3f} (s.e. over examples)" if "se" in x else "")
      )
    lines.append("")
  if results.get("checks"):
    lines += [
        "## Expected behaviour",
        "",
        "Differences are paired (the same test examples): difference ±"
        " paired standard error, z, and the exact McNemar p-value on the"
        " pooled examples; ξ's difference is paired over its examples.",
        "",
        "| check | holds | detail | difference ± paired s.e. |",
        "|---|---|---|---|",
    ]
    for k, v in results["checks"].items():
      lines.append(
          f"| {k} | {'yes' if v['holds'] else 'NO'} | {_detail(v)} |"
          f" {_stats_text(v)} |"
      )
    lines.append("")
  if results.get("timing_s"):
    lines += [
        "## Time per stage (s)",
        "",
        "As computed; a stage read from the cache shows the time recorded by"
        " the run that computed it.",
        "",
    ]
    wall = results.get("wall_s", {})
    for k, v in results["timing_s"].items():
      if isinstance(v, (int, float)):
        note = ""
        if results.get("cached", {}).get(k):
          note = f" (cached; read in {wall.get(k, 0.0):.1f})"
          if k == "total":
            note = f" (as computed; this run took {wall.get(k, 0.0):.1f})"
        lines.append(f"- {k}: {v:.1f}{note}")
    lines.append("")
  return "\n".join(lines)


def _detail(v: dict) -> str:
  d = v["detail"]
  if isinstance(d, list):
    return " vs ".join(f"{x:.3f}" for x in d)
  if isinstance(d, dict):
    return ", ".join(f"{t} {100 * g:+.1f}" for t, g in d.items())
  return f"{d:.3f}"


def _pm(st: dict, scale: float = 100.0) -> str:
  return f"{scale * st['diff']:+.1f} ± {scale * st['se']:.1f}"


def _stats_text(v: dict) -> str:
  """The paired statistics of a check, in points (ξ: in units of ξ)."""
  if v.get("per_task"):
    return ", ".join(f"{t} {_pm(st)}" for t, st in v["per_task"].items())
  st = v.get("stats")
  if not st:
    return "–"
  if "p" not in st:  # ξ
    return f"{st['diff']:+.3f} ± {st['se']:.3f} (z {st['z']:+.1f})"
  return f"{_pm(st)} points (z {st['z']:+.1f}, McNemar p {st['p']:.2g})"


def plots(results: dict, work: Path) -> list[str]:
  """Bar chart, per-task heat map, cosine matrix, ξ grid (PNG, Agg)."""
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  tasks = results["tasks"]
  modes = list(results["modes"])
  files = []

  # 1. Bar chart: normalized accuracy of every method, both modes.
  names = _row_order(results["modes"][modes[0]]["rows"])
  fig, ax = plt.subplots(
      figsize=(max(6, 0.6 * len(names) + 2), 4.5), layout="constrained"
  )
  width = 0.8 / len(modes)
  for j, mode in enumerate(modes):
    rows = results["modes"][mode]["rows"]
    ys = [100 * rows[n]["normalized"] if n in rows else 0 for n in names]
    ax.bar(np.arange(len(names)) + j * width, ys, width, label=mode)
  ax.set_xticks(np.arange(len(names)) + width * (len(modes) - 1) / 2)
  ax.set_xticklabels(names, rotation=60, ha="right")
  ax.set_ylabel("normalized accuracy (%)")
  ax.axhline(100, color="k", lw=0.5)
  ax.legend()
  ax.set_title(f"{results['suite']}: merging methods (test)")
  files.append(_save(fig, work / "methods.png"))

  # 2. Heat map: per-task accuracy of every method.
  fig, axes = plt.subplots(
      1,
      len(modes),
      figsize=(2.5 + 0.8 * len(tasks) * len(modes), 0.35 * len(names) + 2.5),
      squeeze=False,
      layout="constrained",
  )
  for j, (ax, mode) in enumerate(zip(axes[0], modes)):
    rows = results["modes"][mode]["rows"]
    ns = [n for n in names if n in rows]
    a = np.asarray([[100 * rows[n]["per_task"][t] for t in tasks] for n in ns])
    im = ax.imshow(a, cmap="viridis", vmin=0, vmax=100, aspect="auto")
    ax.set_xticks(range(len(tasks)))
    ax.set_xticklabels(tasks, rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(len(ns)))
    ax.set_yticklabels(ns if j == 0 else [], fontsize=7)
    for i in range(a.shape[0]):
      for k in range(a.shape[1]):
        ax.text(
            k,
            i,
            f"{a[i, k]:.0f}",
            ha="center",
            va="center",
            fontsize=6,
            color="w",
        )
    ax.set_title(f"{mode}: test accuracy (%)", fontsize=9)
  fig.colorbar(im, ax=axes[0].tolist(), shrink=0.6)
  files.append(_save(fig, work / "per_task.png"))

  # 3. Cosine similarity of the task vectors.
  fig, axes = plt.subplots(
      1,
      len(modes),
      figsize=(1.5 + 4.5 * len(modes), 4.5),
      squeeze=False,
      layout="constrained",
  )
  for j, (ax, mode) in enumerate(zip(axes[0], modes)):
    c = np.asarray(results["modes"][mode]["cosine"])
    im = ax.imshow(c, cmap="RdBu_r", vmin=-1, vmax=1)
    ax.set_xticks(range(len(tasks)))
    ax.set_xticklabels(tasks, rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(len(tasks)))
    ax.set_yticklabels(tasks if j == 0 else [], fontsize=7)
    for i in range(len(tasks)):
      for k in range(len(tasks)):
        ax.text(k, i, f"{c[i, k]:.2f}", ha="center", va="center", fontsize=6)
    ax.set_title(f"{mode}: cos(τi, τj)", fontsize=9)
  fig.colorbar(im, ax=axes[0].tolist(), shrink=0.7)
  files.append(_save(fig, work / "cosine.png"))

  # 4. Disentanglement error grids, one row per task pair.
  npairs = len(results["modes"][modes[0]]["xi"])
  fig, axes = plt.subplots(
      npairs,
      len(modes),
      figsize=(1.5 + 4 * len(modes), 3.6 * npairs),
      squeeze=False,
      layout="constrained",
  )
  vmax = max(
      float(np.max(x["grid"])) for m in modes for x in results["modes"][m]["xi"]
  )
  for j, mode in enumerate(modes):
    for i, x in enumerate(results["modes"][mode]["xi"]):
      ax = axes[i][j]
      al = np.asarray(x["alphas"])
      h = (al[1] - al[0]) / 2 if len(al) > 1 else 0.5
      im = ax.imshow(
          np.asarray(x["grid"]).T,
          origin="lower",
          cmap="magma_r",
          vmin=0,
          vmax=max(vmax, 1e-6),
          extent=(al[0] - h, al[-1] + h, al[0] - h, al[-1] + h),
      )
      ax.set_xlabel(f"α1 ({x['pair'][0]})", fontsize=8)
      ax.set_ylabel(f"α2 ({x['pair'][1]})", fontsize=8)
      ax.set_title(f"{mode}: ξ, mean {x['mean']:.3f}", fontsize=9)
  fig.colorbar(im, ax=[a for r in axes for a in r], shrink=0.7)
  files.append(_save(fig, work / "disentanglement.png"))
  return files


def _save(fig, path: Path) -> str:
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  fig.savefig(path, dpi=120)
  plt.close(fig)
  return str(path)
