r"""The multi-task merging benchmark: pretrain, fine-tune, merge, report.

  python experiments/suite.py --workdir=/tmp/mtx_suite          # smoke
  python experiments/suite.py --workdir=/tmp/mtx_suite_full --full
  python experiments/suite.py --suite=clip8 --data_dir=DIR --clip=CLIP_DIR \
      --workdir=/tmp/mtx_clip8 [--full]

The default (smoke) runs the offline 8-task suite (``mtx.data.tasks``:
digits always, Fashion-MNIST tasks when the Debian package
``dataset-fashion-mnist`` is installed; skipped tasks are logged) in minutes
on 2 CPU cores; ``--full`` runs the complete protocol. Stages: data,
pretraining by rotation prediction on the union of the tasks' images,
per-task fine-tuning of the encoder (standard and linearised, heads fitted on
the pretrained features and frozen), evaluation of every merging method in
``mtx.merging.METHODS`` with hyperparameters chosen on validation (vmapped
sweeps), TALL-mask retrieval and the weight disentanglement error, and the
report. Each stage is cached under ``--workdir`` and skipped on a rerun when
its outputs exist and come from the same inputs and config.

``--suite=clip8`` is the canonical benchmark on the user's data: image
folders ``<data_dir>/<task>/<split>/<class_name>/*.png`` for the tasks
SUN397, Cars, RESISC45, EuroSAT, SVHN, GTSRB, MNIST, DTD (or TFDS when
``tensorflow_datasets`` is installed), and a Hugging Face CLIP directory
(``config.json``, safetensors weights, ``tokenizer.json``) read by
``mtx.io.hf``; the encoder is CLIP's vision tower and each task's head the
zero-shot head from its class names.

Writes under ``--workdir``: ``results.json`` (every number, per-stage time),
``results.md`` (the tables), ``methods.png``, ``per_task.png``,
``cosine.png``, ``disentanglement.png``, and the stages' checkpoints
(``pretrain/``, ``finetune/<mode>/<task>/``, ``evaluate/<mode>/``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import jax
from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

import suite_lib  # pylint: disable=g-bad-import-order
from configs import suite as suite_config  # pylint: disable=g-bad-import-order

_DEFAULT_CONFIG = str(Path(__file__).parent / "configs" / "suite.py")
_CONFIG = config_flags.DEFINE_config_file(
    "config", _DEFAULT_CONFIG, "Suite config (default: smoke)."
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory.")
_FULL = flags.DEFINE_bool(
    "full",
    False,
    "Run the complete protocol (the config's full variant) instead of the"
    " smoke run.",
)
_SUITE = flags.DEFINE_string(
    "suite", None, "offline8 (default), digits4 or clip8 (overrides config)."
)
_DATA_DIR = flags.DEFINE_string("data_dir", None, "clip8: the tasks' data.")
_CLIP = flags.DEFINE_string(
    "clip", None, "clip8: a Hugging Face CLIP directory (mtx.io.hf)."
)
_CACHE = flags.DEFINE_bool(
    "compilation_cache",
    True,
    "Keep compiled XLA programs under <workdir>/jax_cache, so identical"
    " programs (fine-tuning runs of tasks with equal class counts, reruns)"
    " compile once.",
)


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not _WORKDIR.value:
    raise app.UsageError("--workdir is required")
  config = _CONFIG.value
  if _FULL.value:
    if config.to_dict() != suite_config.get_config().to_dict():
      raise app.UsageError(
          "--full replaces the config; to change it, use"
          f" --config={_DEFAULT_CONFIG}:full --config.<field>=..."
      )
    config = suite_config.get_config("full")
  if _SUITE.value:
    config.suite = _SUITE.value
  if _DATA_DIR.value:
    config.data_dir = _DATA_DIR.value
  if _CLIP.value:
    config.clip = _CLIP.value
  if _CACHE.value and not jax.config.jax_compilation_cache_dir:
    jax.config.update(
        "jax_compilation_cache_dir", str(Path(_WORKDIR.value) / "jax_cache")
    )
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  suite_lib.run(config, _WORKDIR.value, log=logging.info)


if __name__ == "__main__":
  app.run(main)
