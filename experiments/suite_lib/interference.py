"""The interference study: how much each task vector costs the other tasks.

For the suite's standard fine-tuning (run first, through the cache), with
``acc_s(θ)`` the test accuracy on task ``s`` and ``θ0`` the pretrained
encoder:

* own: ``mean_t [acc_t(θ0 + τ_t) − acc_t(θ0)]``, the gain on its own task;
* others: ``mean_{t ≠ s} [acc_s(θ0 + τ_t) − acc_s(θ0)]``, the change on the
  other tasks (negative: damage);
* the same with ``τ_t`` restricted to parts of the network (path regexes,
  ``config.interference_parts``; the rest of ``τ_t`` zero);
* task arithmetic's and TIES's normalized accuracy from the suite's rows.

All numbers in points (percent).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from mtx import tree as mtree

from experiments import suite_lib
from experiments.suite_lib import cache
from experiments.suite_lib import data as data_stage
from experiments.suite_lib import evaluate

# Parts of the suite's ViT (mtx.models.vit) whose share of the damage is
# measured when the config names none.
VIT_PARTS = {
    "embeddings": "^(patch_embed|pos_embed|cls)",
    "block 1": "^block_0/",
    "block 2": "^block_1/",
    "all blocks": "^block_",
}


def own_and_others(
    transfer: np.ndarray, pre: np.ndarray
) -> tuple[float, float]:
  """``(own, others)`` in points from ``transfer[t, s]`` (the model
  fine-tuned on ``t``, on task ``s``) and pretrained accuracies ``pre[s]``."""
  delta = np.asarray(transfer, np.float64) - np.asarray(pre)[None, :]
  t = len(pre)
  off = ~np.eye(t, dtype=bool)
  return 100 * float(np.mean(np.diagonal(delta))), 100 * float(
      np.mean(delta[off])
  )


def run(
    config,
    workdir: str | os.PathLike,
    *,
    parts: dict[str, str] | None = None,
    log=print,
) -> dict:
  """Runs the suite (cached) in ``workdir`` and the study; writes
  ``interference.json`` and ``interference.md`` there.

  Args:
    config: a suite config (``interference_a`` / ``interference_b``).
    workdir: the suite's work directory.
    parts: ``{name: path regex}`` of the parts of ``τ_t`` to measure alone
      (default :data:`VIT_PARTS`).
    log: called with progress lines.
  """
  if "standard" not in cache.as_list(config.modes):
    raise ValueError(
        "the interference study needs config.modes to include" " 'standard'"
    )
  config = suite_lib.normalized_config(config)
  work = Path(workdir)
  results = suite_lib.run(config, work, log=log)
  suite = data_stage.load_offline(config, log)
  runs = {n: work / "finetune" / "standard" / n for n in suite.tasks}
  ev = evaluate.ModeEval(config, suite, runs, "standard", log)
  pre = np.asarray([ev.pre_hits[n].mean() for n in ev.names])
  own, others = own_and_others(ev.transfer, pre)
  parts = dict(VIT_PARTS if parts is None else parts)
  by_part = {}
  for name, regex in parts.items():
    models_ = [
        mtree.add(ev.params0, mtree.mask(tv, include=regex)) for tv in ev.tvs
    ]
    acc = ev.test(mtree.stack(models_))
    p_own, p_others = own_and_others(acc, pre)
    by_part[name] = {"regex": regex, "own": p_own, "others": p_others}
    log(
        f"[interference] τ on {name} ({regex}): own {p_own:+.1f},"
        f" others {p_others:+.1f}"
    )
  rows = results["modes"]["standard"]["rows"]
  out = {
      "variant": config.variant,
      "tasks": ev.names,
      "own": own,
      "others": others,
      "normalized": {
          m: 100 * rows[m]["normalized"]
          for m in ("task_arithmetic", "ties")
          if m in rows
      },
      "by_part": by_part,
      "finetune": cache.config_dict(config)["finetune"],
      "code_hash": cache.code_hash(),
  }
  cache.write_json(work / "interference.json", out)
  (work / "interference.md").write_text(markdown(out))
  return out


def markdown(r: dict) -> str:
  """The study's row and per-part table."""
  norm = r["normalized"]
  lines = [
      f"# Interference, `{r['variant']}` ({len(r['tasks'])} tasks)",
      "",
      "| own | others | TA norm | TIES norm |",
      "|---|---|---|---|",
      f"| {r['own']:+.1f} | {r['others']:+.1f} |"
      f" {norm.get('task_arithmetic', float('nan')):.1f} |"
      f" {norm.get('ties', float('nan')):.1f} |",
      "",
      "| τ restricted to | regex | own | others |",
      "|---|---|---|---|",
  ]
  for name, p in r["by_part"].items():
    lines.append(
        f"| {name} | `{p['regex']}` | {p['own']:+.1f} | {p['others']:+.1f} |"
    )
  return "\n".join(lines) + "\n"
