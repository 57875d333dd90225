r"""Standard vs. tangent-space fine-tuning on a pair of tasks: addition, ξ.

  python experiments/tangent_demo.py \
      --config=experiments/configs/tangent_demo.py --workdir=/tmp/mtx_tangent
  python -m experiments.tangent_demo \
      --config=experiments/configs/tangent_demo.py:smoke \
      --workdir=/tmp/mtx_tangent_smoke

The experiment (tasks, steps, learning rate, the alpha grids) is the config
(``experiments/configs/tangent_demo.py``, overridden with
``--config.<field>=<value>``); ``--workdir`` is the only other flag.

A small, offline version of Ortiz-Jiménez et al.'s comparison. A tiny ViT is
pretrained by self-supervised rotation prediction on the images of both tasks
(no task labels), each task gets a linear head fitted on the pretrained
features (frozen), and the encoder is fine-tuned per task twice — normally
and linearised (``experiments/finetune.py``'s ``run``). Then, for each mode:
individual accuracies, task addition ``θ0 + α(τ1 + τ2)`` with α chosen on
validation (absolute and normalised accuracy), and the weight
disentanglement error ξ(α1, α2) on a grid (``mtx.ntk.disentanglement_error``).
Writes ``results.json``, ``results.md`` and the fine-tuning runs under
``--workdir`` (stages are cached: rerunning reuses finished runs).
"""

from __future__ import annotations

import json
import os
import pathlib
import sys
from collections.abc import Sequence

import jax
import numpy as np
from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from mtx import checkpoint
from mtx import data as data_lib
from mtx import models
from mtx import ntk
from mtx import tree as mtree

if __package__ in (None, ""):  # run as a script: python experiments/X.py
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from experiments import cli
from experiments import finetune_lib
from experiments.configs import finetune as finetune_config

_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Directory for the runs and results (stages cached)."
)
_CONFIG = config_flags.DEFINE_config_file(
    "config",
    None,
    "Demo config file (ml_collections), e.g."
    " experiments/configs/tangent_demo.py or"
    " experiments/configs/tangent_demo.py:smoke.",
    lock_config=True,
)
flags.mark_flags_as_required(["config", "workdir"])


def _config(**kw):
  c = finetune_config.get_config()
  c.update(model="vit", model_preset="tiny", eval_every=10**9, **kw)
  c.checkpoint_every = c.steps
  c.warmup_steps = c.steps // 10
  c.log_every = max(c.steps // 4, 1)
  return c


def _splits(transform: str):
  c = _config(transform=transform)
  return finetune_lib.load_task(c)


def _accuracy(fn, params0, params, ds):
  logits = fn(params0, params, ds.images)
  return float(np.mean(np.argmax(logits, -1) == ds.labels))


def evaluate_mode(clf, lin, tasks, runs, tvs, params0, config) -> dict:
  """Individual, task-addition and ξ results of one fine-tuning mode."""
  if lin:
    f = ntk.linearize(clf.apply, include="^encoder/")
  else:
    f = lambda p0, p, x: clf.apply(p, x)
  f = jax.jit(f)
  total = mtree.add(*tvs.values())

  def added(alpha, t, split):
    p = mtree.add_scale(params0[t], alpha, total)
    return _accuracy(f, params0[t], p, tasks[t][split])

  indiv = {t: runs[t]["final"]["test_accuracy"] for t in tasks}
  indiv_val = {t: runs[t]["final"]["validation_accuracy"] for t in tasks}
  grid = np.asarray(config.addition_alphas, np.float64)
  val = [
      np.mean([added(a, t, "validation") / indiv_val[t] for t in tasks])
      for a in grid
  ]
  best = float(grid[int(np.argmax(val))])
  absolute = {t: added(best, t, "test") for t in tasks}
  alphas = np.asarray(config.xi_alphas, np.float64)
  t1, t2 = list(tasks)

  def with_head(t):
    head = params0[t]["head"]
    return lambda p, x: clf.apply({**p, "head": head}, x)

  enc = lambda tree: {"encoder": tree["encoder"]}
  xi = ntk.disentanglement_error(
      with_head(t1),
      enc(params0[t1]),
      enc(tvs[t1]),
      enc(tvs[t2]),
      tasks[t1]["test"].images,
      tasks[t2]["test"].images,
      alphas,
      alphas,
      linearized=lin,
      apply_fn2=with_head(t2),
  )
  return {
      "individual": indiv,
      "pretrained": {
          t: runs[t]["final"]["pretrained_test_accuracy"] for t in tasks
      },
      "alpha": best,
      "addition_absolute": absolute,
      "addition_absolute_mean": float(np.mean(list(absolute.values()))),
      "addition_normalized_mean": float(
          np.mean([absolute[t] / indiv[t] for t in tasks])
      ),
      "xi_alphas": alphas.tolist(),
      "xi": xi.tolist(),
      "xi_mean": float(xi.mean()),
      "cosine": float(mtree.cosine(tvs[t1], tvs[t2])),
  }


def run(config, work: pathlib.Path) -> None:
  """The demo: stages cached under ``work``; writes the results there."""
  names = list(config.tasks)
  if len(names) != 2 or len(set(names)) != 2:
    raise ValueError(
        f"config.tasks takes exactly two different transforms, got {names}"
    )
  tasks = {t: _splits(t) for t in names}

  # 1. Pretraining: rotation prediction on both tasks' images.
  pre_dir = work / "pretrain"
  if not (pre_dir / "metrics.json").exists():
    logging.info("pretraining (rotation prediction)")
    union = {
        s: data_lib.rotation_prediction(
            data_lib.Dataset(
                np.concatenate([tasks[t][s].images for t in tasks]),
                np.concatenate([tasks[t][s].labels for t in tasks]),
                10,
            )
        )
        for s in ("train", "validation", "test")
    }
    finetune_lib.run(
        _config(steps=config.pretrain_steps, head="zeros", freeze_head=False),
        pre_dir,
        datasets=union,
    )
  encoder_ckpt = str(pre_dir / "finetuned")

  # 2. Fine-tuning per task and mode.
  clf = models.classifier(models.get("vit", "tiny"), 10)
  out = {"tasks": names, "config": config.to_dict(), "modes": {}}
  for mode in ("standard", "linearized"):
    lin = mode == "linearized"
    runs, tvs, params0 = {}, {}, {}
    for t in tasks:
      d = work / f"{mode}_{t}"
      if not (d / "metrics.json").exists():
        logging.info("fine-tuning %s (%s)", t, mode)
        finetune_lib.run(
            _config(
                steps=config.steps,
                learning_rate=config.learning_rate,
                pretrained=encoder_ckpt,
                transform=t,
                linearized=lin,
            ),
            d,
            datasets=tasks[t],
        )
      runs[t] = json.loads((d / "metrics.json").read_text())
      tvs[t] = checkpoint.restore(d / "task_vector")
      params0[t] = checkpoint.restore(d / "pretrained")

    out["modes"][mode] = evaluate_mode(
        clf, lin, tasks, runs, tvs, params0, config
    )
  (work / "results.json").write_text(json.dumps(out, indent=2))
  lines = [
      f"tasks: {', '.join(tasks)} (digits); tiny ViT, rotation-pretrained",
      "",
      "| mode | pretrained | individual | addition abs. | addition norm."
      " | alpha | mean xi | cos(tau1,tau2) |",
      "|---|---|---|---|---|---|---|---|",
  ]
  for mode, r in out["modes"].items():
    lines.append(
        f"| {mode} | {np.mean(list(r['pretrained'].values())):.3f} |"
        f" {np.mean(list(r['individual'].values())):.3f} |"
        f" {r['addition_absolute_mean']:.3f} |"
        f" {r['addition_normalized_mean']:.3f} | {r['alpha']} |"
        f" {r['xi_mean']:.3f} | {r['cosine']:.3f} |"
    )
  (work / "results.md").write_text("\n".join(lines) + "\n")
  print("\n".join(lines))
  os.sync()


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  run(_CONFIG.value, pathlib.Path(_WORKDIR.value))


if __name__ == "__main__":
  cli.run(main, "tangent_demo")
