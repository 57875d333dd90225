"""Stages 2 and 3: pretraining, prototype heads and per-task fine-tuning.

Both run ``experiments/finetune_lib.run``: pretraining by rotation
prediction on the union of the tasks' images (no task labels, trainable
head), then per task a frozen nearest-class-mean head
(:func:`mtx.models.heads.prototypes`) and the encoder fine-tuned with it,
standard and linearised.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import jax
import ml_collections
import numpy as np

from mtx import checkpoint
from mtx import data as data_lib
from mtx import models

from experiments import finetune_lib
from experiments.configs import finetune as finetune_config
from experiments.suite_lib import cache
from experiments.suite_lib.data import Suite

Log = cache.Log


def ft_config(config, section, **overrides) -> ml_collections.ConfigDict:
  """The ``finetune_lib`` config of the suite's pretraining or fine-tuning."""
  s = config[section]
  c = finetune_config.get_config()
  c.model = config.model
  c.model_preset = config.model_preset
  c.model_overrides = ml_collections.ConfigDict(dict(config.model_overrides))
  c.steps = s.steps
  c.batch_size = s.batch_size
  c.learning_rate = s.learning_rate
  c.warmup_steps = max(1, int(s.steps * s.warmup_fraction))
  c.weight_decay = s.weight_decay
  c.label_smoothing = 0.0
  c.augment_shift = 0
  c.seed = config.seed
  c.eval_every = s.steps
  c.checkpoint_every = max(1, s.steps // 2)
  c.keep_checkpoints = 1
  c.log_every = max(1, s.steps // 4)
  c.eval_batch_size = config.eval_batch_size
  c.update(overrides)
  return c


def _unique_rows(x: np.ndarray) -> np.ndarray:
  _, idx = np.unique(x.reshape(len(x), -1), axis=0, return_index=True)
  return x[np.sort(idx)]


def rotation_union(tasks) -> dict[str, data_lib.Dataset]:
  """Rotation prediction on the union of the tasks' train (and, for the
  pretraining run's own metrics, validation) images; no task labels."""
  out = {}
  for split in ("train", "validation"):
    x = _unique_rows(np.concatenate([t[split].images for t in tasks.values()]))
    ds = data_lib.Dataset(x, np.zeros(len(x), np.int32), 1, f"union/{split}")
    out[split] = data_lib.rotation_prediction(ds)
  out["test"] = out["validation"]
  return out


def pretrain(config, suite: Suite, work: Path, clock, log: Log) -> str:
  """The backbone (rotation prediction); returns its checkpoint."""
  d = work / "pretrain"
  union = rotation_union(suite.tasks)
  c = ft_config(config, "pretrain", head="zeros", freeze_head=False)
  fp = cache.fingerprint(c.to_dict(), cache.dataset_hash(union))
  if cache.stage_done(d, fp, ["finetuned", "metrics.json"]):
    log(f"[pretrain] cached in {d}")
    clock.reused(d)
  else:
    log(
        f"[pretrain] {len(union['train'])} rotated images"
        f" ({len(union['train']) // 4} distinct), {c.steps} steps"
    )
    t0 = time.time()
    cache.stage_begin(d, fp)
    finetune_lib.run(c, d, datasets=union, log=lambda m: log(f"[pretrain] {m}"))
    dt = time.time() - t0
    cache.stage_end(d, fp, dt)
    clock.computed(dt)
  return str(d / "finetuned")


def prototype_heads(
    config, suite: Suite, work: Path, pretrained: str, clock, log: Log
) -> dict[str, str]:
  """Per task a nearest-class-mean head (:func:`mtx.models.heads.prototypes`
  of the pretrained features of the task's train split), the analogue of
  CLIP's zero-shot class embeddings. Returns checkpoints."""
  params = checkpoint.restore(pretrained)
  params = params.get("encoder", params)
  feats = jax.jit(suite.encoder.apply)
  out = {}
  for n, splits in suite.tasks.items():
    d = work / "heads" / n
    fp = cache.fingerprint(
        cache.stage_fingerprint(Path(pretrained).parent),
        cache.dataset_hash({"train": splits["train"]}),
        config.logit_scale,
    )
    if cache.stage_done(d, fp, ["head"]):
      clock.reused(d)
    else:
      t0 = time.time()
      cache.stage_begin(d, fp)
      x, y = splits["train"].images, splits["train"].labels
      bs = config.eval_batch_size
      z = np.concatenate(
          [
              np.asarray(feats(params, x[i : i + bs]))
              for i in range(0, len(x), bs)
          ]
      )
      head = models.heads.prototypes(z, y, splits["train"].num_classes)
      checkpoint.save(
          d / "head",
          {"head": head},
          metadata={
              "kind": "prototype",
              "classes": list(splits["train"].class_names),
          },
          overwrite=True,
      )
      dt = time.time() - t0
      cache.stage_end(d, fp, dt)
      clock.computed(dt)
    out[n] = str(d / "head")
  log(f"[heads] {len(out)} nearest-class-mean heads in {work / 'heads'}")
  return out


def finetune(
    config, suite: Suite, work: Path, pretrained: str, clock, log: Log
) -> dict[str, dict[str, Path]]:
  """Every task, every mode; returns ``{mode: {task: run dir}}``."""
  out = {}
  names = list(suite.tasks)
  modes = cache.as_list(config.modes)
  total = len(names) * len(modes)
  done = 0
  t_stage = time.time()
  for mode in modes:
    out[mode] = {}
    for n in names:
      d = work / "finetune" / mode / n
      head = suite.heads[n] if suite.heads else config.head
      c = ft_config(
          config,
          "finetune",
          pretrained=pretrained,
          head=head,
          freeze_head=True,
          linearized=mode == "linearized",
      )
      fp = cache.fingerprint(
          c.to_dict(),
          cache.dataset_hash(suite.tasks[n]),
          cache.stage_fingerprint(Path(pretrained).parent),
          cache.stage_fingerprint(Path(head).parent) if suite.heads else "",
      )
      tag = f"[finetune {mode} {done + 1}/{total}: {n}]"
      if cache.stage_done(d, fp, ["pretrained", "finetuned", "metrics.json"]):
        log(f"{tag} cached")
        clock.reused(d)
      else:
        t0 = time.time()
        cache.stage_begin(d, fp)
        finetune_lib.run(
            c,
            d,
            datasets=suite.tasks[n],
            log=lambda m, tag=tag: log(f"{tag} {m}"),
            encoder=suite.encoder,
        )
        dt = time.time() - t0
        cache.stage_end(d, fp, dt)
        clock.computed(dt)
      done += 1
      m = json.loads((d / "metrics.json").read_text())["final"]
      rate = (time.time() - t_stage) / done
      log(
          f"{tag} pretrained {m['pretrained_test_accuracy']:.3f} ->"
          f" fine-tuned {m['test_accuracy']:.3f} (test); stage ETA"
          f" {rate * (total - done):.0f}s"
      )
      out[mode][n] = d
  return out
