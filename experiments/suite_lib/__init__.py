"""The multi-task benchmark behind experiments/suite.py (no flags here).

Stages, one module each, each cached under the work directory (skipped when
its outputs are present and were made from the same inputs, config and code;
see :mod:`.cache`):

1. ``data`` (:mod:`.data`): the suite's tasks (:mod:`mtx.data.tasks`),
   train / validation / test splits.
2. ``pretrain`` (:mod:`.train`): a backbone pretrained without any task's
   labels — rotation prediction on the union of the tasks' train images —
   then ``heads/<task>``: per task a frozen nearest-class-mean head
   (:func:`mtx.models.heads.prototypes`, logits ``logit_scale · cos``: the
   analogue of CLIP's zero-shot head). For ``clip8`` the backbone is CLIP's
   vision tower and the heads are CLIP's zero-shot heads.
3. ``finetune/<mode>/<task>`` (:mod:`.train`): the encoder fine-tuned per
   task, head frozen, standard and linearised (``finetune_lib.run``).
4. ``evaluate/<mode>`` (:mod:`.evaluate`): every registered merging method,
   hyperparameters from ``config.grids`` chosen on validation, TALL-mask
   retrieval, each fine-tuned model on every task, cosines and ξ; the checks
   (:mod:`.checks`) compare rows with paired tests on per-example hits.
5. ``report`` (:mod:`.report`): ``results.json``, ``results.md``, plots.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from absl import logging

import mtx

from experiments.suite_lib import cache
from experiments.suite_lib import checks as checks_lib
from experiments.suite_lib import data as data_stage
from experiments.suite_lib import evaluate
from experiments.suite_lib import report
from experiments.suite_lib import train
from experiments.suite_lib import validate

Log = cache.Log


_LIST_FIELDS = ("tasks", "methods", "modes", "xi_pairs")


def normalized_config(config):
  """A copy of ``config`` with its list fields as tuples of names, however
  they were given (``--config.methods=ties,consensus`` gives one string), so
  equal settings give equal fingerprints."""
  c = config.copy_and_resolve_references()
  for k in _LIST_FIELDS:
    if k in c:
      c[k] = tuple(cache.as_list(c[k]))
  return c


def run(config, workdir: str | os.PathLike, *, log: Log = logging.info) -> dict:
  """Runs (or resumes) the suite; returns the results written to
  ``workdir/results.json``."""
  config = normalized_config(config)
  validate.check(
      config,
      cache.as_list(config.modes),
      cache.as_list(config.methods),
      offline=config.suite != "clip8",
  )
  work = Path(workdir)
  if work.exists() and not work.is_dir():
    raise ValueError(f"--workdir={workdir} exists and is not a folder")
  work.mkdir(parents=True, exist_ok=True)
  timer = cache.Timer(log)
  with timer.start("data", 1, 5, f"suite {config.suite}"):
    if config.suite == "clip8":
      suite = data_stage.load_clip8(config, work, log)
    else:
      suite = data_stage.load_offline(config, log)
    info = data_stage.task_info(suite.tasks)
    for n, i in info.items():
      log(
          f"[data] {n}: {i['classes']} classes, train {i['train']} /"
          f" validation {i['validation']} / test {i['test']}"
      )
  timer.cached["data"] = False
  if suite.pretrained:
    pre = suite.pretrained
  else:
    with timer.start("pretrain", 2, 5, "rotation prediction, heads") as clock:
      pre = train.pretrain(config, suite, work, clock, log)
      if config.head == "prototype":
        suite.heads = train.prototype_heads(
            config, suite, work, pre, clock, log
        )
  modes_run = cache.as_list(config.modes)
  with timer.start(
      "finetune", 3, 5, f"{len(suite.tasks)} tasks x {modes_run}"
  ) as clock:
    runs = train.finetune(config, suite, work, pre, clock, log)
  modes = {}
  with timer.start("evaluate", 4, 5, "every merging method") as clock:
    for mode in modes_run:
      d = work / "evaluate" / mode
      fp = cache.fingerprint(
          cache.config_dict(config),
          sorted(mtx.merging.METHODS),
          [cache.stage_fingerprint(runs[mode][n]) for n in suite.tasks],
      )
      if cache.stage_done(d, fp, ["results.json"]):
        log(f"[evaluate {mode}] cached in {d}")
        modes[mode] = json.loads((d / "results.json").read_text())
        clock.reused(d)
        timer.cached[f"evaluate/{mode}"] = True
        continue
      t0 = time.time()
      cache.stage_begin(d, fp)
      modes[mode] = evaluate.evaluate_mode(config, suite, runs[mode], mode, log)
      modes[mode]["seconds"] = time.time() - t0
      cache.write_json(d / "results.json", modes[mode])
      dt = time.time() - t0
      cache.stage_end(d, fp, dt)
      clock.computed(dt)
      timer.cached[f"evaluate/{mode}"] = False
  stage_seconds = {}
  for mode in modes_run:
    for n in suite.tasks:
      m = json.loads((runs[mode][n] / "metrics.json").read_text())
      stage_seconds[f"finetune/{mode}/{n}"] = m["timing_s"]["total"]
  results = {
      "suite": suite.name,
      "tasks": list(suite.tasks),
      "skipped_tasks": suite.skipped,
      "task_info": info,
      "modes": modes,
      "checks": checks_lib.checks(modes),
      "config": cache.config_dict(config),
      "mtx_version": mtx.__version__,
      "code_hash": cache.code_hash(),
  }
  with timer.start("report", 5, 5, "plots"):
    results["plots"] = [
        os.path.basename(f) for f in report.plots(results, work)
    ]
  seconds, wall, cached = timer.with_totals()
  results["timing_s"] = {
      **seconds,
      "runs (as recorded when trained)": stage_seconds,
  }
  results["wall_s"] = wall
  results["cached"] = cached
  (work / "results.md").write_text(report.markdown(results))
  cache.write_json(work / "results.json", results)
  log(f"[suite] done in {time.time() - timer.t0:.0f}s; results in {work}")
  return results
