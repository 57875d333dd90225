"""Stage 1: the suite's tasks and the encoder that reads them.

``offline8`` / ``digits4`` (or a list of task names) come from
:mod:`mtx.data.tasks`; Fashion-MNIST is read from ``config.data_dir``, else
``$MTX_DATA_DIR``, else ``/usr/share/datasets/fashion-mnist`` (Debian
package ``dataset-fashion-mnist``). ``clip8`` reads the user's image folders
and a Hugging Face CLIP directory; its heads are CLIP's zero-shot heads.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path

import numpy as np

from mtx import checkpoint
from mtx import data as data_lib
from mtx import models
from mtx.data import tasks as tasks_lib

from experiments.suite_lib import cache

Log = cache.Log


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


def normalized_encoder(
    encoder: models.Model, logit_scale: float, mean=None, std=None
) -> models.Model:
  """``encoder`` with features L2-normalised and scaled
  (:func:`mtx.models.heads.scaled_normalized`); same params."""
  apply = models.heads.scaled_normalized(encoder.apply, logit_scale, mean, std)
  return models.Model(
      f"{encoder.name}+cos(x{float(logit_scale):g})",
      encoder.init,
      apply,
      encoder.config,
  )


def data_dir(config) -> str:
  """The data directory: ``config.data_dir``, else ``$MTX_DATA_DIR``."""
  return config.data_dir or os.environ.get(data_lib.DATA_DIR_ENV, "")


def load_offline(config, log: Log) -> Suite:
  """The offline suite's tasks (digits always, Fashion-MNIST if present)."""
  names = cache.as_list(config.tasks) or config.suite
  tasks, skipped = tasks_lib.load_suite(
      names,
      image_size=config.image_size,
      max_train=config.max_train or None,
      max_test=config.max_test or None,
      validation=config.validation_fraction,
      seed=config.split_seed,
      log=lambda m: log(f"[data] {m}"),
      data_dir=config.data_dir or None,
  )
  if skipped:
    log(
        f"[data] FALLBACK: running {len(tasks)} of"
        f" {len(tasks) + len(skipped)} tasks ({', '.join(tasks)}); skipped"
        f" {', '.join(skipped)}. For the full suite install the data:"
        " apt-get install dataset-fashion-mnist, or put the Fashion-MNIST"
        " IDX files in --config.data_dir=DIR or $MTX_DATA_DIR"
        " (DIR or DIR/fashion-mnist)"
    )
  if len(tasks) < 2:
    raise ValueError(
        f"suite {config.suite!r} needs at least two tasks, got {sorted(tasks)}"
        f" (skipped: {skipped})"
    )
  encoder = build_encoder(config)
  if config.head == "prototype":
    encoder = normalized_encoder(encoder, config.logit_scale)
  elif config.head != "fit":
    raise ValueError(
        f"config.head must be 'prototype' or 'fit', got {config.head!r}"
    )
  return Suite(config.suite, tasks, skipped, encoder)


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
  return normalized_encoder(models.clip.image_encoder(cfg), scale, mean, std)


def load_clip8(config, work: Path, log: Log) -> Suite:
  """The CLIP benchmark: tasks from ``config.data_dir``, CLIP weights from
  ``config.clip`` (a Hugging Face directory, read by :mod:`mtx.io.hf`),
  zero-shot heads from class-name prompts."""
  root = data_dir(config)
  if not root or not config.clip:
    raise ValueError(
        "--config.suite=clip8 needs --config.data_dir (image folders"
        " <data_dir>/<task>/<split>/<class_name>/*.png, or TFDS data) and"
        " --config.clip (a Hugging Face CLIP directory)"
    )
  from mtx.io import hf  # pylint: disable=g-import-not-at-top

  model, params, hf_config = hf.load(config.clip)
  if hf.architecture(hf_config) != "clip":
    raise ValueError(f"{config.clip} is not a CLIP checkpoint")
  cfg = model.config
  names = cache.as_list(config.tasks) or list(tasks_lib.CLIP8)
  tasks = tasks_lib.load_folder_suite(
      root,
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
  if not cache.stage_done(d, source, ["encoder"]):
    t0 = time.time()
    cache.stage_begin(d, source)
    checkpoint.save(
        d / "encoder",
        params["vision"],
        metadata={"source": str(config.clip)},
        overwrite=True,
    )
    cache.stage_end(d, source, time.time() - t0)
  heads = {}
  for n in names:
    class_names = tasks[n]["train"].class_names
    templates = tasks_lib.TEMPLATES.get(n, tasks_lib.DEFAULT_TEMPLATES)
    hd = work / "clip" / "heads" / n
    fp = cache.fingerprint(source, list(class_names), list(templates))
    if not cache.stage_done(hd, fp, ["head"]):
      t0 = time.time()
      cache.stage_begin(hd, fp)
      head = models.clip.zero_shot_head(
          cfg, params, class_names, templates, tokenize
      )
      checkpoint.save(
          hd / "head",
          {"head": head},
          metadata={"classes": list(class_names), "templates": list(templates)},
          overwrite=True,
      )
      cache.stage_end(hd, fp, time.time() - t0)
    log(f"[data] {n}: zero-shot head over {len(class_names)} class names")
    heads[n] = str(hd / "head")
  return Suite(
      "clip8", tasks, {}, encoder, pretrained=str(d / "encoder"), heads=heads
  )
