"""The fine-tuning loop behind experiments/finetune.py (no flags here).

Importable by other binaries (the suite, the tangent-space demo) and tests:
``run(config, workdir, datasets=None)`` fine-tunes one task and resumes from
``workdir``; see experiments/finetune.py for the outputs.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

import mtx
from mtx import checkpoint
from mtx import data as data_lib
from mtx import models
from mtx import training
from mtx import tree as mtree


def load_task(config) -> dict[str, data_lib.Dataset]:
  """Train / validation / test splits of the configured task."""
  raw = data_lib.load(config.dataset)
  s = data_lib.split(
      raw["train"],
      validation=config.validation_fraction,
      seed=config.split_seed,
  )
  out = {
      "train": s["train"],
      "validation": s["validation"],
      "test": raw["test"],
  }
  return {k: data_lib.transform(v, config.transform) for k, v in out.items()}


def _features(encoder, params, images, batch_size):
  f = jax.jit(encoder.apply)
  return np.concatenate(
      [
          np.asarray(f(params, images[i : i + batch_size]))
          for i in range(0, len(images), batch_size)
      ]
  )


def initial_params(config, encoder, num_classes, train) -> dict[str, Any]:
  """The pretrained ``{"encoder", "head"}`` params for this run."""
  example = train.images[:1]
  if config.pretrained:
    restored = checkpoint.restore(config.pretrained)
    enc = restored.get("encoder", restored)
    head = restored.get("head") if "encoder" in restored else None
    want = jax.eval_shape(encoder.init, jax.random.key(0), example)
    try:
      mtree.assert_same_structure(want, enc, names=("model", config.pretrained))
    except ValueError as e:
      raise ValueError(
          f"--config.pretrained={config.pretrained} does not fit model"
          f" {config.model}/{config.model_preset}: {e}"
      ) from None
  else:
    enc = encoder.init(jax.random.key(config.seed), example)
    head = None
  if config.head == "fit":
    z = _features(encoder, enc, train.images, config.eval_batch_size)
    head = models.heads.fit_logistic(z, train.labels, num_classes)
  elif config.head == "zeros":
    dim = jax.eval_shape(encoder.apply, enc, example).shape[-1]
    head = models.heads.zeros(dim, num_classes)
  elif config.head == "pretrained":
    if head is None:
      raise ValueError(
          "config.head='pretrained' needs a checkpoint with a head"
      )
  else:
    head = checkpoint.restore(config.head)
    head = head.get("head", head)
  return {"encoder": enc, "head": head}


def _write_json(path: Path, obj) -> None:
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text(json.dumps(obj, indent=2, sort_keys=True))
  os.replace(tmp, path)


def run(
    config,
    workdir: str | os.PathLike,
    *,
    datasets: dict[str, data_lib.Dataset] | None = None,
    kill_at_step: int | None = None,
    log: Callable[[str], None] = logging.info,
    encoder: models.Model | None = None,
) -> dict[str, Any]:
  """Fine-tunes per ``config``, resuming from ``workdir`` if possible.

  Args:
    config: see ``experiments/configs/finetune.py``.
    workdir: output directory.
    datasets: optional ``{"train", "validation", "test"}`` user data
      (:class:`mtx.data.Dataset`) instead of ``config.dataset``.
    kill_at_step: testing only; SIGKILL after this step.
    log: progress sink.
    encoder: optional encoder :class:`mtx.models.Model` instead of the one
      ``config.model`` names (e.g. CLIP's vision tower; the suite's clip8).

  Returns:
    The metrics dict also written to ``workdir/metrics.json``.
  """
  workdir = Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  t_start = time.time()
  ds = datasets or load_task(config)
  missing = {"train", "validation", "test"} - set(ds)
  if missing:
    raise ValueError(f"datasets lacks split(s) {sorted(missing)}")
  num_classes = ds["train"].num_classes
  if encoder is None:
    encoder = models.get(
        config.model,
        config.model_preset or None,
        **dict(config.model_overrides),
    )
  clf = models.classifier(encoder, num_classes)

  pre_path = workdir / "pretrained"
  if checkpoint.is_checkpoint(pre_path):
    params0 = checkpoint.restore(pre_path)
  else:
    params0 = initial_params(config, encoder, num_classes, ds["train"])
    checkpoint.save(
        pre_path,
        params0,
        metadata={"source": config.pretrained or f"init(seed={config.seed})"},
        overwrite=True,
    )
  t_init = time.time() - t_start

  trainable = mtree.select(
      params0, exclude="^head/" if config.freeze_head else None
  )
  opt = training.make_optimizer(
      learning_rate=config.learning_rate,
      steps=config.steps,
      warmup_steps=config.warmup_steps,
      weight_decay=config.weight_decay,
      clip_norm=config.clip_norm or None,
      trainable=trainable,
  )
  shift = int(config.augment_shift)
  lin = dict(
      linearized=bool(config.linearized),
      linearize_include=config.linearize_include or None,
  )
  step_fn = training.make_train_step(
      clf.apply,
      opt,
      label_smoothing=config.label_smoothing,
      augment=(lambda k, x: data_lib.augment(k, x, max_shift=shift))
      if shift
      else None,
      **lin,
  )
  eval_step = training.make_eval_step(clf.apply, **lin)

  def evaluate(params, split):
    d = ds[split]
    return training.evaluate(
        eval_step,
        params0,
        params,
        d.images,
        d.labels,
        batch_size=config.eval_batch_size,
    )

  manager = checkpoint.Manager(
      workdir / "checkpoints", max_to_keep=config.keep_checkpoints
  )
  params = jax.tree.map(jnp.array, params0)  # a copy: steps donate it
  opt_state = opt.init(params)
  history, start = [], 0
  latest = manager.latest_step()
  if latest is not None:
    state = manager.restore(latest, target={"params": params, "opt": opt_state})
    params, opt_state = state["params"], state["opt"]
    history = manager.metadata(latest).get("history", [])
    start = latest
    log(f"resumed from step {latest} ({workdir / 'checkpoints'})")

  key = jax.random.key(config.seed)
  train = ds["train"]
  t0, done0, losses = time.time(), start, []
  t_log = t0
  for step in range(start, config.steps):
    idx = data_lib.batch_indices(
        len(train), config.batch_size, step, seed=config.seed
    )
    params, opt_state, m = step_fn(
        params,
        opt_state,
        params0,
        train.images[idx],
        train.labels[idx],
        jax.random.fold_in(key, step),
    )
    losses.append(m["loss"])
    n = step + 1
    if n % config.log_every == 0 or n == config.steps:
      loss = float(np.mean(jax.device_get(losses)))
      losses = []
      now = time.time()
      rate = (n - done0) / max(now - t_log, 1e-9)  # since the last log line
      t_log, done0 = now, n
      eta = (config.steps - n) / rate
      log(
          f"step {n}/{config.steps} loss {loss:.4f} {rate:.2f} steps/s"
          f" ETA {eta:.0f}s"
      )
    if n % config.eval_every == 0 or n == config.steps:
      ev = evaluate(params, "validation")
      history.append(
          {"step": n, "val_accuracy": ev["accuracy"], "val_loss": ev["loss"]}
      )
      log(f"step {n}: validation accuracy {ev['accuracy']:.4f}")
    if n % config.checkpoint_every == 0 or n == config.steps:
      manager.save(
          n, {"params": params, "opt": opt_state}, metadata={"history": history}
      )
    if kill_at_step is not None and n == kill_at_step:
      os.kill(os.getpid(), signal.SIGKILL)
  manager.close()
  t_train = time.time() - t0

  final = {
      "test_accuracy": evaluate(params, "test")["accuracy"],
      "validation_accuracy": evaluate(params, "validation")["accuracy"],
      "pretrained_test_accuracy": evaluate(params0, "test")["accuracy"],
  }
  tv = mtree.sub(params, params0)
  meta = {
      "linearized": bool(config.linearized),
      "task": f"{config.dataset}+{config.transform}",
      "pretrained": str(pre_path),
  }
  checkpoint.save(workdir / "finetuned", params, metadata=meta, overwrite=True)
  checkpoint.save(workdir / "task_vector", tv, metadata=meta, overwrite=True)
  metrics = {
      "config": config.to_dict(),
      "history": history,
      "final": final,
      "task_vector_norm": float(mtree.l2_norm(tv)),
      "timing_s": {
          "init": t_init,
          "train": t_train,
          "total": time.time() - t_start,
      },
      "mtx_version": mtx.__version__,
  }
  _write_json(workdir / "metrics.json", metrics)
  log(
      f"done: test accuracy {final['test_accuracy']:.4f} (pretrained"
      f" {final['pretrained_test_accuracy']:.4f}); outputs in {workdir}"
  )
  return metrics
