"""The multi-task benchmark behind experiments/suite.py (no flags here).

Stages, each cached under the work directory (skipped when its outputs are
present and were made from the same inputs and config; see ``STAMP``):

1. ``data``: the suite's tasks (:mod:`mtx.data.tasks`), train / validation /
   test splits.
2. ``pretrain``: a backbone pretrained without any task's labels — rotation
   prediction on the union of the tasks' train images
   (``experiments/finetune_lib.run`` with a trainable head) — then
   ``heads/<task>``: per task a frozen head of unit class embeddings, the
   normalised mean pretrained feature of each class (features L2-normalised,
   logits ``logit_scale · cos``: the analogue of CLIP's zero-shot head). For
   ``clip8`` the backbone is CLIP's vision tower and the heads are CLIP's
   zero-shot heads from class-name prompts.
3. ``finetune/<mode>/<task>``: the encoder fine-tuned per task, head frozen,
   standard and linearised (``finetune_lib.run``).
4. ``evaluate/<mode>``: every registered merging method on the encoders'
   task vectors, ``scale`` and the other hyperparameters chosen on the
   validation splits (each sweep one vmapped, jitted program), TALL-mask
   retrieval, each fine-tuned model on every task, the cosine similarities of
   the task vectors and the weight disentanglement error ξ.
5. ``report``: ``results.json``, ``results.md`` and PNG plots.

Every merged model is evaluated with each task's own frozen head, as in the
CLIP benchmark; accuracy is top-1, normalized accuracy is accuracy divided by
the individual fine-tuned model's accuracy on the same split.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

import mtx
from mtx import checkpoint
from mtx import data as data_lib
from mtx import models
from mtx import ntk
from mtx import task_vectors as tv_lib
from mtx import tree as mtree
from mtx.data import tasks as tasks_lib
from mtx.models import intermediates

import finetune_lib  # pylint: disable=g-bad-import-order
from configs import finetune as finetune_config  # pylint: disable=g-bad-import-order

MODES = ("standard", "linearized")
# Methods whose published form has no scale (a weighted average of the
# models): evaluated at scale 1 only.
SCALE_FREE = (
    "average",
    "weighted_average",
    "model_stock",
    "fisher",
    "regmean",
    "slerp",
)
# Methods whose grid is merged point by point (jax.lax.map) inside the one
# compiled program instead of vmapped: RegMean's batched linear solves, eight
# or more in one program, deadlock XLA's CPU runtime on a 2-thread pool
# (jaxlib 0.10; avoided by XLA_FLAGS=
# --xla_cpu_enable_concurrency_optimized_scheduler=false).
SEQUENTIAL_SWEEP = ("regmean",)
STAMP = "suite_stage.json"
Log = Callable[[str], None]


# ----------------------------------------------------------------------------
# Bookkeeping: stage timing, fingerprints, cache validity.


class Timer:
  """Wall time per stage, and whether the stage came from the cache."""

  def __init__(self, log: Log):
    self.log = log
    self.seconds: dict[str, float] = {}
    self.cached: dict[str, bool] = {}
    self.t0 = time.time()

  def start(self, name: str, index: int, total: int, what: str = ""):
    self.log(f"[stage {index}/{total}: {name}] {what}".rstrip())
    return _StageTimer(self, name)


class _StageTimer:

  def __init__(self, timer: Timer, name: str):
    self.timer, self.name, self.t = timer, name, time.time()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    dt = time.time() - self.t
    self.timer.seconds[self.name] = self.timer.seconds.get(self.name, 0.0) + dt
    if exc[0] is None:
      self.timer.log(
          f"[{self.name}] done in {dt:.1f}s (elapsed"
          f" {time.time() - self.timer.t0:.0f}s)"
      )


def as_list(value) -> list[str]:
  """A config list field: a tuple/list, or a comma-separated string (what
  ``--config.methods=ties,consensus`` gives)."""
  if isinstance(value, str):
    return [v.strip() for v in value.split(",") if v.strip()]
  out = []
  for v in value or ():
    out += as_list(v) if isinstance(v, str) else [v]
  return out


def _hash(*parts: Any) -> str:
  h = hashlib.sha256()
  for p in parts:
    if isinstance(p, np.ndarray):
      h.update(str((p.shape, p.dtype)).encode())
      h.update(np.ascontiguousarray(p).tobytes())
    else:
      h.update(json.dumps(p, sort_keys=True, default=str).encode())
  return h.hexdigest()[:16]


def dataset_hash(splits: dict[str, data_lib.Dataset]) -> str:
  """A fingerprint of a task's splits (images, labels, class count)."""
  parts = []
  for k in sorted(splits):
    d = splits[k]
    parts += [k, d.images, d.labels, d.num_classes]
  return _hash(*parts)


def _read_stamp(directory: Path) -> dict | None:
  """The stage stamp in ``directory``; None if absent or unreadable."""
  try:
    return json.loads((Path(directory) / STAMP).read_text())
  except (OSError, ValueError):
    return None


def stage_done(
    directory: Path, fingerprint: str, outputs: Sequence[str]
) -> bool:
  """Whether a stage in ``directory`` finished with this fingerprint."""
  s = _read_stamp(directory)
  if s is None or s.get("fingerprint") != fingerprint or not s.get("done"):
    return False
  for o in outputs:
    p = directory / o
    if o.endswith(".json"):
      if not p.exists():
        return False
    elif not checkpoint.is_checkpoint(p):
      return False
  return True


def stage_begin(directory: Path, fingerprint: str) -> None:
  """Prepares ``directory`` for a stage: stale outputs (another fingerprint)
  are removed; a run with the same fingerprint resumes."""
  if directory.exists():
    s = _read_stamp(directory)
    if s is None or s.get("fingerprint") != fingerprint:
      shutil.rmtree(directory)
  directory.mkdir(parents=True, exist_ok=True)
  _write_json(directory / STAMP, {"fingerprint": fingerprint, "done": False})


def stage_end(directory: Path, fingerprint: str) -> None:
  _write_json(directory / STAMP, {"fingerprint": fingerprint, "done": True})


def _write_json(path: Path, obj: Any) -> None:
  path = Path(path)
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=_jsonable))
  os.replace(tmp, path)


def _jsonable(x):
  if isinstance(x, (np.floating, np.integer)):
    return x.item()
  if isinstance(x, np.ndarray):
    return x.tolist()
  return str(x)


# ----------------------------------------------------------------------------
# Data.


@dataclasses.dataclass
class Suite:
  """The loaded tasks and how to build the encoder for them."""

  name: str
  tasks: dict[str, dict[str, data_lib.Dataset]]
  skipped: dict[str, str]
  encoder: models.Model
  # clip8: the pretrained encoder checkpoint and per task a zero-shot head
  # checkpoint; otherwise None (pretrained here, heads fitted by finetune_lib).
  pretrained: str | None = None
  heads: dict[str, str] | None = None


def task_info(tasks: dict[str, dict[str, data_lib.Dataset]]) -> dict:
  out = {}
  for n, s in tasks.items():
    spec = tasks_lib.TASKS.get(n)
    out[n] = {
        "classes": s["train"].num_classes,
        "class_names": list(s["train"].class_names),
        "train": len(s["train"]),
        "validation": len(s["validation"]),
        "test": len(s["test"]),
        "image_shape": list(s["train"].images.shape[1:]),
    }
    if spec is not None:
      out[n].update(
          source=spec.source,
          shift=spec.transform,
          description=spec.description,
      )
  return out


def build_encoder(config) -> models.Model:
  return models.get(
      config.model, config.model_preset or None, **dict(config.model_overrides)
  )


def load_offline(config, log: Log) -> Suite:
  """The offline suite's tasks (digits always, Fashion-MNIST if present)."""
  names = as_list(config.tasks) or config.suite
  tasks, skipped = tasks_lib.load_suite(
      names,
      image_size=config.image_size,
      max_train=config.max_train or None,
      max_test=config.max_test or None,
      validation=config.validation_fraction,
      seed=config.split_seed,
      log=log,
  )
  if len(tasks) < 2:
    raise ValueError(
        f"suite {config.suite!r} needs at least two tasks, got {sorted(tasks)}"
        f" (skipped: {skipped})"
    )
  encoder = build_encoder(config)
  if config.head == "prototype":
    encoder = scaled_normalized(encoder, config.logit_scale)
  elif config.head != "fit":
    raise ValueError(
        f"config.head must be 'prototype' or 'fit', got {config.head!r}"
    )
  return Suite(config.suite, tasks, skipped, encoder)


def scaled_normalized(
    encoder: models.Model, logit_scale: float, mean=None, std=None
) -> models.Model:
  """``encoder`` with inputs optionally standardised and features
  L2-normalised and multiplied by ``logit_scale``: with a head of unit class
  embeddings its logits are ``logit_scale · cos`` (CLIP's zero-shot
  classifier). Same params as ``encoder``."""
  scale = float(logit_scale)
  if mean is not None:
    mean = np.asarray(mean, np.float32).reshape(1, 1, 1, -1)
    std = np.asarray(std, np.float32).reshape(1, 1, 1, -1)

  def apply(params, images):
    x = jnp.asarray(images)
    if mean is not None:
      x = (x - mean) / std
    return models.heads.l2_normalize(encoder.apply(params, x)) * scale

  return models.Model(
      f"{encoder.name}+cos(x{scale:g})", encoder.init, apply, encoder.config
  )


# ----------------------------------------------------------------------------
# clip8: CLIP's vision tower with zero-shot heads, on the user's data.

# CLIP's image normalisation (used when the directory has no
# preprocessor_config.json).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def clip_tokenizer(clip_dir: str | os.PathLike, max_length: int):
  """``texts -> (input_ids, attention_mask)`` from ``<clip_dir>/tokenizer.json``.

  Raises:
    FileNotFoundError: no tokenizer.json, saying how to get one.
    ImportError: the ``tokenizers`` package is missing.
  """
  path = Path(clip_dir) / "tokenizer.json"
  if not path.exists():
    raise FileNotFoundError(
        f"{path} not found: the zero-shot heads need CLIP's tokenizer; save it"
        " next to the weights (transformers: CLIPTokenizerFast.from_pretrained"
        "(name).save_pretrained(clip_dir))"
    )
  try:
    import tokenizers  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(
        "clip8 needs the tokenizers package: pip install tokenizers (or"
        ' pip install -e ".[hf]")'
    ) from e
  tok = tokenizers.Tokenizer.from_file(str(path))
  tok.no_padding()
  tok.enable_truncation(max_length)

  def tokenize(texts: list[str]):
    enc = tok.encode_batch(list(texts))
    width = max(len(e.ids) for e in enc)
    ids = np.zeros((len(enc), width), np.int32)
    mask = np.zeros((len(enc), width), np.int32)
    for i, e in enumerate(enc):
      ids[i, : len(e.ids)] = e.ids
      mask[i, : len(e.ids)] = 1
    return ids, mask

  return tokenize


def clip_image_encoder(cfg, logit_scale: float, mean, std) -> models.Model:
  """CLIP's vision tower as an encoder whose features, fed to a zero-shot
  head (unit class embeddings), give CLIP's logits: images in [0, 1] are
  normalised, embedded, L2-normalised and multiplied by ``exp(logit_scale)``."""
  scale = float(np.exp(np.float64(logit_scale)))
  return scaled_normalized(models.clip.image_encoder(cfg), scale, mean, std)


def load_clip8(config, work: Path, log: Log) -> Suite:
  """The CLIP benchmark: tasks from ``config.data_dir``, CLIP weights from
  ``config.clip`` (a Hugging Face directory, read by :mod:`mtx.io.hf`),
  zero-shot heads from class-name prompts."""
  if not config.data_dir or not config.clip:
    raise ValueError(
        "--suite=clip8 needs --data_dir (image folders"
        " <data_dir>/<task>/<split>/<class_name>/*.png, or TFDS data) and"
        " --clip (a Hugging Face CLIP directory)"
    )
  from mtx.io import hf  # pylint: disable=g-import-not-at-top

  model, params, hf_config = hf.load(config.clip)
  if hf.architecture(hf_config) != "clip":
    raise ValueError(f"{config.clip} is not a CLIP checkpoint")
  cfg = model.config
  names = as_list(config.tasks) or list(tasks_lib.CLIP8)
  tasks = tasks_lib.load_folder_suite(
      config.data_dir,
      names,
      image_size=cfg.vision.image_size,
      channels=cfg.vision.num_channels,
      validation=config.validation_fraction,
      max_train=config.max_train or None,
      max_test=config.max_test or None,
      seed=config.split_seed,
  )
  mean, std = CLIP_MEAN, CLIP_STD
  pre_cfg = Path(config.clip) / "preprocessor_config.json"
  if pre_cfg.exists():
    pc = json.loads(pre_cfg.read_text())
    mean, std = pc.get("image_mean", mean), pc.get("image_std", std)
  encoder = clip_image_encoder(cfg, params["logit_scale"], mean, std)
  tokenize = clip_tokenizer(config.clip, cfg.text.max_positions)
  source = checkpoint.content_hash(config.clip)[:16]
  d = work / "clip" / "encoder"
  if not stage_done(d, source, ["encoder"]):
    stage_begin(d, source)
    checkpoint.save(
        d / "encoder",
        params["vision"],
        metadata={"source": str(config.clip)},
        overwrite=True,
    )
    stage_end(d, source)
  heads = {}
  for n in names:
    class_names = tasks[n]["train"].class_names
    templates = tasks_lib.TEMPLATES.get(n, tasks_lib.DEFAULT_TEMPLATES)
    hd = work / "clip" / "heads" / n
    fp = _hash(source, list(class_names), list(templates))
    if not stage_done(hd, fp, ["head"]):
      stage_begin(hd, fp)
      head = models.clip.zero_shot_head(
          cfg, params, class_names, templates, tokenize
      )
      checkpoint.save(
          hd / "head",
          {"head": head},
          metadata={"classes": list(class_names), "templates": list(templates)},
          overwrite=True,
      )
      stage_end(hd, fp)
    log(f"[data] {n}: zero-shot head over {len(class_names)} class names")
    heads[n] = str(hd / "head")
  return Suite(
      "clip8", tasks, {}, encoder, pretrained=str(d / "encoder"), heads=heads
  )


# ----------------------------------------------------------------------------
# Pretraining and fine-tuning (experiments/finetune_lib.run).


def _ft_config(config, section, **overrides) -> ml_collections.ConfigDict:
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


def pretrain(config, suite: Suite, work: Path, timer: Timer, log: Log) -> str:
  """Stage 2: the backbone (rotation prediction); returns its checkpoint."""
  d = work / "pretrain"
  with timer.start("pretrain", 2, 5, "rotation prediction on the union"):
    union = rotation_union(suite.tasks)
    c = _ft_config(config, "pretrain", head="zeros", freeze_head=False)
    fp = _hash(c.to_dict(), dataset_hash(union))
    if stage_done(d, fp, ["finetuned", "metrics.json"]):
      log(f"[pretrain] cached in {d}")
      timer.cached["pretrain"] = True
    else:
      timer.cached["pretrain"] = False
      log(
          f"[pretrain] {len(union['train'])} rotated images"
          f" ({len(union['train']) // 4} distinct), {c.steps} steps"
      )
      stage_begin(d, fp)
      finetune_lib.run(
          c, d, datasets=union, log=lambda m: log(f"[pretrain] {m}")
      )
      stage_end(d, fp)
  return str(d / "finetuned")


def prototype_heads(
    config, suite: Suite, work: Path, pretrained: str, log: Log
) -> dict[str, str]:
  """Per task a nearest-class-mean head: the normalised mean of the
  pretrained (normalised) features of each class on the task's train split,
  the analogue of CLIP's zero-shot class embeddings. Returns checkpoints."""
  params = checkpoint.restore(pretrained)
  params = params.get("encoder", params)
  feats = jax.jit(suite.encoder.apply)
  out = {}
  for n, splits in suite.tasks.items():
    d = work / "heads" / n
    fp = _hash(
        _stage_fingerprint(Path(pretrained).parent),
        dataset_hash({"train": splits["train"]}),
        config.logit_scale,
    )
    if not stage_done(d, fp, ["head"]):
      stage_begin(d, fp)
      x, y = splits["train"].images, splits["train"].labels
      bs = config.eval_batch_size
      z = np.concatenate(
          [
              np.asarray(feats(params, x[i : i + bs]))
              for i in range(0, len(x), bs)
          ]
      )
      means = np.stack(
          [z[y == c].mean(0) for c in range(splits["train"].num_classes)], 1
      )
      head = models.heads.from_class_embeddings(means)
      checkpoint.save(
          d / "head",
          {"head": head},
          metadata={
              "kind": "prototype",
              "classes": list(splits["train"].class_names),
          },
          overwrite=True,
      )
      stage_end(d, fp)
    out[n] = str(d / "head")
  log(f"[heads] {len(out)} nearest-class-mean heads in {work / 'heads'}")
  return out


def finetune(
    config,
    suite: Suite,
    work: Path,
    pretrained: str | None,
    timer: Timer,
    log: Log,
) -> dict[str, dict[str, Path]]:
  """Stage 3: every task, both modes; returns ``{mode: {task: run dir}}``."""
  out = {}
  names = list(suite.tasks)
  modes = as_list(config.modes)
  total = len(names) * len(modes)
  cached = 0
  done = 0
  t_stage = time.time()
  with timer.start("finetune", 3, 5, f"{len(names)} tasks x {modes}"):
    for mode in modes:
      out[mode] = {}
      for n in names:
        d = work / "finetune" / mode / n
        head = suite.heads[n] if suite.heads else config.head
        c = _ft_config(
            config,
            "finetune",
            pretrained=pretrained,
            head=head,
            freeze_head=True,
            linearized=mode == "linearized",
        )
        fp = _hash(
            c.to_dict(),
            dataset_hash(suite.tasks[n]),
            _stage_fingerprint(Path(pretrained).parent),
            _stage_fingerprint(Path(head).parent) if suite.heads else "",
        )
        tag = f"[finetune {mode} {done + 1}/{total}: {n}]"
        if stage_done(d, fp, ["pretrained", "finetuned", "metrics.json"]):
          log(f"{tag} cached")
          cached += 1
        else:
          stage_begin(d, fp)
          finetune_lib.run(
              c,
              d,
              datasets=suite.tasks[n],
              log=lambda m, tag=tag: log(f"{tag} {m}"),
              encoder=suite.encoder,
          )
          stage_end(d, fp)
        done += 1
        m = json.loads((d / "metrics.json").read_text())["final"]
        rate = (time.time() - t_stage) / done
        log(
            f"{tag} pretrained {m['pretrained_test_accuracy']:.3f} ->"
            f" fine-tuned {m['test_accuracy']:.3f} (test); stage ETA"
            f" {rate * (total - done):.0f}s"
        )
        out[mode][n] = d
  timer.cached["finetune"] = cached == total
  return out


def _stage_fingerprint(directory: Path) -> str:
  """The fingerprint recorded by the stage that made ``directory``, else a
  content hash of it (a checkpoint given from outside)."""
  s = _read_stamp(directory)
  if s is not None:
    return s.get("fingerprint", "")
  p = Path(directory)
  return checkpoint.content_hash(p) if p.exists() else ""


# ----------------------------------------------------------------------------
# Evaluation of many encoders at once.


def feature_fn(encoder: models.Model, linearized: bool):
  """``f(params0, params, x) -> features``: the encoder or its linearisation
  at ``params0``."""
  if linearized:
    return ntk.linearize(encoder.apply)
  return lambda params0, params, x: encoder.apply(params, x)


_COUNTS: dict[Any, Callable] = {}


class Evaluator:
  """Accuracy of stacked encoders ``[S, ...]`` on every task of one split,
  each task through its own frozen head (one jitted program per mode)."""

  def __init__(
      self,
      features: Callable,
      params0: Any,
      heads: dict[str, dict],
      data: dict[str, data_lib.Dataset],
      *,
      batch_size: int,
  ):
    self.tasks = list(data)
    t = len(self.tasks)
    cmax = max(h["kernel"].shape[1] for h in heads.values())
    dim = next(iter(heads.values()))["kernel"].shape[0]
    w = np.zeros((t, dim, cmax), np.float32)
    b = np.full((t, cmax), -1e9, np.float32)  # absent classes never win
    for i, n in enumerate(self.tasks):
      k, c = np.asarray(heads[n]["kernel"]), heads[n]["kernel"].shape[1]
      w[i, :, :c] = k
      b[i, :c] = np.asarray(heads[n]["bias"])
    self.w, self.b = jnp.asarray(w), jnp.asarray(b)
    self.params0 = params0
    x = np.concatenate([data[n].images for n in self.tasks])
    y = np.concatenate([data[n].labels for n in self.tasks]).astype(np.int32)
    tid = np.concatenate(
        [np.full(len(data[n]), i, np.int32) for i, n in enumerate(self.tasks)]
    )
    self.counts = np.bincount(tid, minlength=t).astype(np.float64)
    bs = min(batch_size, len(y))
    pad = (-len(y)) % bs
    wts = np.concatenate(
        [np.ones(len(y), np.float32), np.zeros(pad, np.float32)]
    )
    x = np.concatenate([x, np.zeros((pad, *x.shape[1:]), x.dtype)])
    y, tid = np.pad(y, (0, pad)), np.pad(tid, (0, pad))
    self.batches = [
        (x[i : i + bs], y[i : i + bs], tid[i : i + bs], wts[i : i + bs])
        for i in range(0, len(y), bs)
    ]

    def counts(params0, params_s, w, b, x, y, tid, wts):
      def one(p):
        z = features(params0, p, x)
        logits = jnp.einsum("nd,tdc->ntc", z.astype(jnp.float32), w) + b
        logits = jnp.take_along_axis(logits, tid[:, None, None], 1)[:, 0]
        hit = (jnp.argmax(logits, -1) == y).astype(jnp.float32) * wts
        return jax.ops.segment_sum(hit, tid, num_segments=t)

      return jax.lax.map(one, params_s)

    key = (id(features), t)
    if key not in _COUNTS:
      _COUNTS.clear()  # one mode at a time
      _COUNTS[key] = jax.jit(counts)
    self._counts = _COUNTS[key]

  def __call__(self, params_s) -> np.ndarray:
    """``[S, T]`` accuracies of stacked encoder params ``[S, ...]``."""
    total = 0.0
    for x, y, tid, wts in self.batches:
      total = total + self._counts(
          self.params0, params_s, self.w, self.b, x, y, tid, wts
      )
    return np.asarray(total, np.float64) / self.counts

  def one(self, params) -> np.ndarray:
    return self(jax.tree.map(lambda a: jnp.asarray(a)[None], params))[0]


# ----------------------------------------------------------------------------
# Data statistics for Fisher merging and RegMean.


def fisher_fn(features):
  """``sq(params0, params, head, x, y)``: summed squared per-example
  gradients of the loss w.r.t. the encoder (jitted)."""

  def loss(p, p0, head, xi, yi):
    z = features(p0, p, xi[None])
    logits = models.heads.apply(head, z)[0]
    return -jax.nn.log_softmax(logits)[yi]

  @jax.jit
  def sq(p0, p, head, xb, yb):
    g = jax.vmap(jax.grad(loss), (None, None, None, 0, 0))(p, p0, head, xb, yb)
    return jax.tree.map(lambda a: jnp.sum(jnp.square(a), 0), g)

  return sq


def fisher_diagonal(sq, params0, params, head, x, y, batch: int = 32):
  """Empirical diagonal Fisher of the task's loss w.r.t. the encoder: the
  mean over examples of squared per-example gradients (``sq`` from
  :func:`fisher_fn`)."""
  bs = min(batch, len(y))
  stop = len(y) - len(y) % bs  # whole batches: one compiled shape
  total = None
  for i in range(0, stop, bs):
    s = sq(params0, params, head, x[i : i + bs], y[i : i + bs])
    total = s if total is None else jax.tree.map(jnp.add, total, s)
  return jax.tree.map(lambda a: a / stop, total)


def gram_fn(encoder):
  """``grams(params, x) -> {kernel path: (XᵀX, rows)}`` (jitted)."""

  @jax.jit
  def grams(p, xb):
    _, inputs = intermediates.dense_inputs(encoder.apply, p, xb)
    out = {}
    for k, h in inputs.items():
      h = h.reshape(-1, h.shape[-1]).astype(jnp.float32)
      out[k] = (h.T @ h, h.shape[0])
    return out

  return grams


def gram_matrices(grams, params, x, batch: int = 256) -> dict[str, jax.Array]:
  """``{kernel path: XᵀX / N}`` of every Dense layer's inputs (RegMean;
  ``grams`` from :func:`gram_fn`)."""
  bs = min(batch, len(x))
  total = None
  for i in range(0, len(x) - len(x) % bs, bs):  # whole batches
    g = grams(params, x[i : i + bs])
    if total is None:
      total = {k: [v[0], v[1]] for k, v in g.items()}
    else:
      for k, v in g.items():
        total[k][0] = total[k][0] + v[0]
        total[k][1] += v[1]
  return {k: v[0] / v[1] for k, v in total.items()}


# ----------------------------------------------------------------------------
# Merging methods with hyperparameters chosen on validation.


def method_grid(name: str, config) -> tuple[list[dict], dict[str, list]]:
  """``(structural hparam settings, {coefficient: values})`` of a method.

  Structural settings are compiled separately; coefficients (and ``scale``)
  are traced and swept together in one vmapped program.
  """
  g = config.grids
  full = g.structural == "full"

  def pick(values, default):
    return [dict(v) for v in values] if full else [dict(default)]

  if name == "ties":
    return (
        pick(
            [
                {"density": 0.1},
                {"density": 0.2},
                {"density": 0.4},
                {"density": 0.2, "reduce": "sum"},
            ],
            {"density": 0.2},
        ),
        {},
    )
  if name == "dare":
    return (
        pick([{"drop_rate": 0.5}, {"drop_rate": 0.9}], {"drop_rate": 0.5}),
        {},
    )
  if name == "breadcrumbs":
    return pick([{"density": 0.1}, {"density": 0.3}], {"density": 0.1}), {}
  if name == "consensus":
    return pick([{"k": 2}, {"k": 2, "base": "ties"}], {"k": 2}), {}
  if name == "pcb":
    return (
        pick([{"ratio": 0.05}, {"ratio": 0.1}, {"ratio": 0.2}], {"ratio": 0.1}),
        {},
    )
  if name == "compeft":
    return pick([{"density": 0.1}, {"density": 0.2}], {"density": 0.2}), {}
  if name == "lines":
    return [{}], {"beta": list(g.lines_beta)}
  if name == "regmean":
    return [{}], {"alpha": list(g.regmean_alpha)}
  return [{}], {}


def _grid_points(scales, coeffs: dict[str, list]) -> list[dict[str, float]]:
  pts = [{"scale": float(s)} for s in scales]
  for k, vals in coeffs.items():
    pts = [{**p, k: float(v)} for p in pts for v in vals]
  return pts


def _fmt(h: dict) -> str:
  return ", ".join(
      f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in h.items()
  )


class ModeEval:
  """Everything evaluated for one fine-tuning mode."""

  def __init__(
      self, config, suite: Suite, runs: dict[str, Path], mode: str, log
  ):
    self.config, self.mode, self.log = config, mode, log
    self.lin = mode == "linearized"
    self.names = list(suite.tasks)
    self.encoder = suite.encoder
    starts = {n: checkpoint.restore(runs[n] / "pretrained") for n in self.names}
    self.heads = {n: starts[n]["head"] for n in self.names}
    self.params0 = starts[self.names[0]]["encoder"]
    for n in self.names[1:]:  # one shared pretrained encoder
      mtree.assert_same_structure(
          self.params0, starts[n]["encoder"], names=("pretrained", n)
      )
    self.finetuned = [
        checkpoint.restore(runs[n] / "finetuned")["encoder"] for n in self.names
    ]
    self.tvs = [mtree.sub(f, self.params0) for f in self.finetuned]
    self.stacked = mtree.stack(self.tvs)
    self.features = feature_fn(self.encoder, self.lin)
    val = {
        n: _cap(suite.tasks[n]["validation"], config.max_val_eval)
        for n in self.names
    }
    self.test_data = {n: suite.tasks[n]["test"] for n in self.names}
    self.train_data = suite.tasks
    self.val = Evaluator(
        self.features,
        self.params0,
        self.heads,
        val,
        batch_size=config.eval_batch_size,
    )
    self.test = Evaluator(
        self.features,
        self.params0,
        self.heads,
        self.test_data,
        batch_size=config.eval_batch_size,
    )
    # Reference accuracies.
    self.pre_test = self.test.one(self.params0)
    ft = mtree.stack(self.finetuned)
    self.ind_val = np.diagonal(self.val(ft)).copy()
    # transfer[t, s]: the model fine-tuned on task t, on task s (test).
    self.transfer = self.test(ft)
    self.ind_test = np.diagonal(self.transfer).copy()

  # -- rows ------------------------------------------------------------------

  def row(self, accs: np.ndarray, hparams=None, **extra) -> dict:
    accs = np.asarray(accs, np.float64)
    counts = self.test.counts
    r = {
        "per_task": {n: float(a) for n, a in zip(self.names, accs)},
        "absolute": float(np.mean(accs)),
        "normalized": float(np.mean(accs / self.ind_test)),
        # Binomial standard error of the two means over the test examples.
        "absolute_se": float(
            np.sqrt(np.sum(accs * (1 - accs) / counts)) / len(accs)
        ),
        "normalized_se": float(
            np.sqrt(np.sum(accs * (1 - accs) / counts / self.ind_test**2))
            / len(accs)
        ),
        "hparams": hparams or {},
    }
    r.update(extra)
    return r

  def _normalized_val(self, accs_st: np.ndarray) -> np.ndarray:
    return np.mean(accs_st / np.maximum(self.ind_val, 1e-12)[None], axis=1)

  def statistics(self, needed: set[str]) -> dict[str, Any]:
    """Fisher / Gram statistics of the fine-tuned encoders (train data)."""
    out = {}
    n_stat = self.config.statistics_examples
    if "fisher" in needed:
      sq = fisher_fn(self.features)
      fishers = []
      for i, n in enumerate(self.names):
        d = _cap(self.train_data[n]["train"], n_stat)
        fishers.append(
            fisher_diagonal(
                sq,
                self.params0,
                self.finetuned[i],
                self.heads[n],
                d.images,
                d.labels,
            )
        )
      out["fisher"] = {"fishers": fishers}
    if "regmean" in needed:
      fn = gram_fn(self.encoder)
      grams = []
      for i, n in enumerate(self.names):
        d = _cap(self.train_data[n]["train"], n_stat)
        # Linearised models: the layer inputs at the linearisation point.
        p = self.params0 if self.lin else self.finetuned[i]
        grams.append(gram_matrices(fn, p, d.images))
      out["regmean"] = {"grams": grams}
    return out

  def _sweep_fn(self, merger, stats, key):
    """One jitted program: coefficient points ``[S]`` -> merged encoders."""

    @jax.jit
    def merged(stacked, params0, c):
      def one(c1):
        kw = {k: v for k, v in c1.items() if k != "scale"}
        tv = merger.combine(
            stacked,
            stats,
            scale=c1["scale"],
            key=key,
            pretrained=params0 if merger.needs_pretrained else None,
            **kw,
        )
        return jax.tree.map(lambda p, t: (p + t).astype(p.dtype), params0, tv)

      if merger.name in SEQUENTIAL_SWEEP:
        return jax.lax.map(one, c)
      return jax.vmap(one)(c)

    return merged

  def _chunks(self, points: list[dict]) -> tuple[int, list[dict]]:
    """The grid as padded chunks of one compiled size."""
    names = sorted(points[0])
    chunk = min(self.config.sweep_chunk, _pow2(len(points)))
    out = []
    for i in range(0, len(points), chunk):
      part = points[i : i + chunk]
      part = part + [part[-1]] * (chunk - len(part))
      out.append(
          {k: jnp.asarray([p[k] for p in part], jnp.float32) for k in names}
      )
    return chunk, out

  def sweep(self, merged, points: list[dict]) -> np.ndarray:
    """Validation accuracies ``[len(points), T]``: every chunk of grid
    points is merged by one vmapped program and evaluated at once."""
    _, parts = self._chunks(points)
    out = [self.val(merged(self.stacked, self.params0, c)) for c in parts]
    return np.concatenate(out)[: len(points)]

  def method(self, name: str, data: dict[str, Any]) -> dict:
    """One method: grid on validation, the best setting on test."""
    t0 = time.time()
    structurals, coeff_grid = method_grid(name, self.config)
    scales = [1.0] if name in SCALE_FREE else list(self.config.grids.scales)
    points = _grid_points(scales, coeff_grid)
    key = jax.random.key(self.config.seed)
    best = None
    for hp in structurals:
      merger = mtx.merging.get(name, **hp, **(data.get(name) or {}))
      k = key if merger.needs_key else None
      stats = merger.prepare(self.stacked, key=k)
      merged = self._sweep_fn(merger, stats, k)
      val = self._normalized_val(self.sweep(merged, points))
      i = int(np.argmax(val))
      if best is None or val[i] > best[0]:
        best = (float(val[i]), hp, points[i], merged)
    score, hp, point, merged = best
    # The chosen point through the same compiled program (padded chunk).
    _, (c,) = self._chunks([point] * min(len(points), self.config.sweep_chunk))
    params = jax.tree.map(
        lambda a: a[:1], merged(self.stacked, self.params0, c)
    )
    accs = self.test(params)[0]
    return self.row(
        accs,
        {**hp, **point},
        val_normalized=score,
        grid_size=len(structurals) * len(points),
        seconds=time.time() - t0,
    )

  def tall_retrieval(self) -> dict:
    """TALL masks: per task ``θ0 + m_t ⊙ τMTL``, λ_t on task t's validation."""
    lams = list(self.config.grids.tall_lambda)
    t = len(self.names)

    @jax.jit
    def retrieved(stacked, params0, lam):
      mtl = tv_lib.multitask_vector(stacked)
      masks = tv_lib.tall_masks(stacked, mtl, lam)
      models_ = jax.tree.map(
          lambda p, v, m: (p[None] + jnp.where(m, v[None], 0)).astype(p.dtype),
          params0,
          mtl,
          masks,
      )
      kept = sum(jnp.sum(m) for m in jax.tree.leaves(masks))
      return models_, kept

    val = np.zeros((len(lams), t))
    for j, lam in enumerate(lams):
      ps, _ = retrieved(self.stacked, self.params0, jnp.full((t,), lam))
      val[j] = np.diagonal(self.val(ps))
    chosen = np.asarray([lams[b] for b in np.argmax(val, axis=0)], np.float32)
    ps, kept = retrieved(self.stacked, self.params0, jnp.asarray(chosen))
    accs = np.diagonal(self.test(ps))
    self.tall_lambdas = chosen
    return self.row(
        accs,
        {"tall_lambda": [float(x) for x in chosen]},
        mask_density=float(kept) / (t * mtree.num_elements(self.params0)),
    )

  def disentanglement(self, pair: tuple[str, str]) -> dict:
    """ξ(α1, α2) on a grid for two tasks (test images, each its own head)."""
    a, b = pair
    ia, ib = self.names.index(a), self.names.index(b)
    n = self.config.xi_examples
    xa = _cap(self.test_data[a], n).images
    xb = _cap(self.test_data[b], n).images
    alphas = np.asarray(self.config.xi_alphas, np.float32)

    def with_head(name):
      head = self.heads[name]
      return lambda p, x: models.heads.apply(head, self.encoder.apply(p, x))

    xi = ntk.disentanglement_error(
        with_head(a),
        self.params0,
        self.tvs[ia],
        self.tvs[ib],
        xa,
        xb,
        alphas,
        alphas,
        linearized=self.lin,
        apply_fn2=with_head(b),
    )
    return {
        "pair": [a, b],
        "alphas": alphas.tolist(),
        "grid": xi.tolist(),
        "mean": float(xi.mean()),
    }


def _pow2(n: int) -> int:
  return 1 << max(0, (n - 1).bit_length())


def _cap(ds: data_lib.Dataset, n: int | None) -> data_lib.Dataset:
  return tasks_lib.subsample(ds, n or None, seed=0) if n else ds


def evaluate_mode(config, suite: Suite, runs, mode: str, log: Log) -> dict:
  """Stage 4 for one mode."""
  ev = ModeEval(config, suite, runs, mode, log)
  t = len(ev.names)
  rows = {
      "pretrained": ev.row(ev.pre_test),
      "individual": ev.row(ev.ind_test),
  }
  log(
      f"[evaluate {mode}] pretrained {rows['pretrained']['absolute']:.3f},"
      f" individual {rows['individual']['absolute']:.3f} (test, mean)"
  )
  methods = as_list(config.methods) or list(mtx.merging.METHODS)
  unknown = sorted(set(methods) - set(mtx.merging.METHODS))
  if unknown:
    raise ValueError(f"unknown merging method(s) {unknown}")
  skipped = {}
  runnable = []
  for name in methods:
    kw = {}
    if name == "fisher":
      kw = {"fishers": [{}] * t}
    elif name == "regmean":
      kw = {"grams": [{}] * t}
    m = mtx.merging.get(name, **kw)
    if t < m.min_tasks or (m.max_tasks is not None and t > m.max_tasks):
      if m.max_tasks == m.min_tasks:
        takes = f"exactly {m.min_tasks}"
      elif m.max_tasks is None:
        takes = f"at least {m.min_tasks}"
      else:
        takes = f"{m.min_tasks} to {m.max_tasks}"
      skipped[name] = f"merges {takes} models; the suite has {t}"
    else:
      runnable.append(name)
  # TALL masks first: Consensus uses the per-task λ chosen here.
  t0 = time.time()
  rows["tall_mask_retrieval"] = ev.tall_retrieval()
  rows["tall_mask_retrieval"]["seconds"] = time.time() - t0
  data = ev.statistics(set(runnable))
  if "consensus" in runnable:
    data["consensus"] = {"tall_lambda": jnp.asarray(ev.tall_lambdas)}
  t_start = time.time()
  for i, name in enumerate(runnable):
    r = ev.method(name, data)
    if name == "consensus":
      r["hparams"]["tall_lambda"] = [float(x) for x in ev.tall_lambdas]
    rows[name] = r
    el = time.time() - t_start
    log(
        f"[evaluate {mode} {i + 1}/{len(runnable)}: {name}]"
        f" {_fmt({k: v for k, v in r['hparams'].items() if not isinstance(v, list)})}"
        f" -> test abs {r['absolute']:.3f} norm {r['normalized']:.3f};"
        f" ETA {el / (i + 1) * (len(runnable) - i - 1):.0f}s"
    )
  cos = np.asarray(tv_lib.cosine_matrix(ev.tvs))
  xi = [ev.disentanglement(p) for p in xi_pairs(config, ev.names)]
  return {
      "rows": rows,
      "skipped_methods": skipped,
      "cosine": cos.tolist(),
      "transfer": ev.transfer.tolist(),
      "xi": xi,
      "task_vector_norms": [float(mtree.l2_norm(x)) for x in ev.tvs],
  }


def xi_pairs(config, names: Sequence[str]) -> list[tuple[str, str]]:
  pairs = []
  for p in as_list(config.xi_pairs):
    a, b = p.split(":")
    if a in names and b in names:
      pairs.append((a, b))
  return pairs or [(names[0], names[1])]


# ----------------------------------------------------------------------------
# The whole pipeline.


def _config_dict(config) -> dict:
  return json.loads(json.dumps(config.to_dict(), default=_jsonable))


def run(config, workdir: str | os.PathLike, *, log: Log = logging.info) -> dict:
  """Runs (or resumes) the suite; returns the results written to
  ``workdir/results.json``."""
  work = Path(workdir)
  work.mkdir(parents=True, exist_ok=True)
  timer = Timer(log)
  with timer.start("data", 1, 5, f"suite {config.suite}"):
    if config.suite == "clip8":
      suite = load_clip8(config, work, log)
    else:
      suite = load_offline(config, log)
    info = task_info(suite.tasks)
    for n, i in info.items():
      log(
          f"[data] {n}: {i['classes']} classes, train {i['train']} /"
          f" validation {i['validation']} / test {i['test']}"
      )
  timer.cached["data"] = False
  if suite.pretrained:
    pre = suite.pretrained
  else:
    pre = pretrain(config, suite, work, timer, log)
    if config.head == "prototype":
      suite.heads = prototype_heads(config, suite, work, pre, log)
  runs = finetune(config, suite, work, pre, timer, log)
  modes = {}
  with timer.start("evaluate", 4, 5, "every merging method, both modes"):
    for mode in as_list(config.modes):
      d = work / "evaluate" / mode
      fp = _hash(
          _config_dict(config),
          mtx.merging.__name__,
          sorted(mtx.merging.METHODS),
          [_stage_fingerprint(runs[mode][n]) for n in suite.tasks],
      )
      if stage_done(d, fp, ["results.json"]):
        log(f"[evaluate {mode}] cached in {d}")
        modes[mode] = json.loads((d / "results.json").read_text())
        timer.cached[f"evaluate/{mode}"] = True
        continue
      t0 = time.time()
      stage_begin(d, fp)
      modes[mode] = evaluate_mode(config, suite, runs[mode], mode, log)
      modes[mode]["seconds"] = time.time() - t0
      _write_json(d / "results.json", modes[mode])
      stage_end(d, fp)
      timer.cached[f"evaluate/{mode}"] = False
  stage_seconds = {}
  for mode in as_list(config.modes):
    for n in suite.tasks:
      m = json.loads((runs[mode][n] / "metrics.json").read_text())
      stage_seconds[f"finetune/{mode}/{n}"] = m["timing_s"]["total"]
  results = {
      "suite": suite.name,
      "tasks": list(suite.tasks),
      "skipped_tasks": suite.skipped,
      "task_info": info,
      "modes": modes,
      "checks": checks(modes),
      "config": _config_dict(config),
      "mtx_version": mtx.__version__,
  }
  with timer.start("report", 5, 5, "plots"):
    results["plots"] = [os.path.basename(f) for f in plots(results, work)]
  results["timing_s"] = {
      **timer.seconds,
      "total": time.time() - timer.t0,
      "runs (as recorded when trained)": stage_seconds,
  }
  results["cached"] = timer.cached
  (work / "results.md").write_text(markdown(results))
  _write_json(work / "results.json", results)
  log(f"[suite] done in {time.time() - timer.t0:.0f}s; results in {work}")
  return results


# ----------------------------------------------------------------------------
# The field's known behaviour, checked on the results.


def _se_diff(r1: dict, r2: dict, key: str) -> float | None:
  """Standard error of the difference of two rows' means (unpaired, so
  conservative: both are evaluated on the same test examples)."""
  a, b = r1.get(f"{key}_se"), r2.get(f"{key}_se")
  if a is None or b is None:
    return None
  return float(np.hypot(a, b))


def checks(modes: dict) -> dict[str, dict]:
  """Whether the results reproduce the behaviours the literature reports.

  Comparisons of two means also carry ``se``, the standard error of their
  difference; the report marks a failed comparison that lies within two
  standard errors as such (the test sets cannot tell the two apart).
  """
  out = {}
  for mode, m in modes.items():
    r = m["rows"]
    pre, ind = r["pretrained"], r["individual"]
    gains = {
        t: ind["per_task"][t] - pre["per_task"][t] for t in ind["per_task"]
    }
    out[f"{mode}: individual >> pretrained (every task +5 points or more)"] = {
        "holds": min(gains.values()) >= 0.05,
        "detail": {t: round(g, 4) for t, g in gains.items()},
    }
    if "task_arithmetic" in r:
      ta = r["task_arithmetic"]
      out[f"{mode}: task arithmetic below individual"] = {
          "holds": ta["absolute"] < ind["absolute"],
          "detail": [ta["absolute"], ind["absolute"]],
      }
      for other in ("ties", "consensus"):
        if other in r:
          out[f"{mode}: {other} >= task arithmetic (normalized)"] = {
              "holds": r[other]["normalized"] >= ta["normalized"] - 1e-9,
              "detail": [r[other]["normalized"], ta["normalized"]],
              "se": _se_diff(r[other], ta, "normalized"),
          }
    tall = r.get("tall_mask_retrieval")
    if tall is not None:
      out[f"{mode}: TALL-mask retrieval >= 99% of individual"] = {
          "holds": tall["normalized"] >= 0.99,
          "detail": tall["normalized"],
      }
  if set(modes) >= set(MODES):
    s, lin = modes["standard"], modes["linearized"]
    if "task_arithmetic" in s["rows"] and "task_arithmetic" in lin["rows"]:
      a = s["rows"]["task_arithmetic"]["normalized"]
      b = lin["rows"]["task_arithmetic"]["normalized"]
      out["linearized improves normalized task-addition accuracy"] = {
          "holds": b > a,
          "detail": [a, b],
          "se": _se_diff(
              s["rows"]["task_arithmetic"],
              lin["rows"]["task_arithmetic"],
              "normalized",
          ),
      }
    xs = [x["mean"] for x in s["xi"]]
    xl = [x["mean"] for x in lin["xi"]]
    if xs and xl:
      out["linearized lowers disentanglement error"] = {
          "holds": float(np.mean(xl)) < float(np.mean(xs)),
          "detail": [float(np.mean(xs)), float(np.mean(xl))],
      }
  return out


# ----------------------------------------------------------------------------
# Report: markdown, plots.


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
  lines = [
      f"# mtx suite `{results['suite']}`: {len(tasks)} tasks",
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
      )
    lines.append("")
  if results.get("checks"):
    lines += [
        "## Expected behaviour",
        "",
        "| check | holds | detail |",
        "|---|---|---|",
    ]
    for k, v in results["checks"].items():
      d = v["detail"]
      if isinstance(d, list):
        d = " vs ".join(f"{x:.3f}" for x in d)
      elif isinstance(d, dict):
        d = ", ".join(f"{t} {100 * g:+.1f}" for t, g in d.items())
      else:
        d = f"{d:.3f}"
      verdict = "yes" if v["holds"] else "NO"
      se = v.get("se")
      if se and isinstance(v["detail"], list):
        gap = abs(v["detail"][0] - v["detail"][1])
        d += f" (difference {gap / se:.1f} s.e.)"
        if not v["holds"] and gap < 2 * se:
          verdict = "NO, within 2 s.e."
      lines.append(f"| {k} | {verdict} | {d} |")
    lines.append("")
  if results.get("timing_s"):
    lines += ["## Time per stage (s)", ""]
    for k, v in results["timing_s"].items():
      if isinstance(v, (int, float)):
        cached = results.get("cached", {}).get(k)
        lines.append(f"- {k}: {v:.1f}" + (" (cached)" if cached else ""))
    lines.append("")
  return "\n".join(lines)


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
