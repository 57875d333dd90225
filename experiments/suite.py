r"""The multi-task merging benchmark: pretrain, fine-tune, merge, report.

  python experiments/suite.py --workdir=/tmp/mtx_suite          # smoke
  python experiments/suite.py --config=experiments/configs/suite.py:full \
      --workdir=/tmp/mtx_suite_full
  python experiments/suite.py --config=experiments/configs/suite.py:full \
      --config.suite=clip8 --config.data_dir=DIR --config.clip=CLIP_DIR \
      --workdir=/tmp/mtx_clip8
  python -m experiments.suite --workdir=/tmp/mtx_suite           # the same

The default (smoke) config runs the offline 8-task suite (``mtx.data.tasks``:
digits always, the four Fashion-MNIST tasks when its IDX files are found in
``--config.data_dir``, ``$MTX_DATA_DIR`` or
``/usr/share/datasets/fashion-mnist`` — Debian package
``dataset-fashion-mnist``; otherwise they are skipped and a FALLBACK line says
how to get them) in minutes on 2 CPU cores; the ``full`` variant runs the
complete protocol. Stages: data, pretraining by rotation prediction on the
union of the tasks' images, per-task fine-tuning of the encoder (standard
and linearised, heads fitted on the pretrained features and frozen),
evaluation of every merging method in ``mtx.merging.METHODS`` with
hyperparameters from ``config.grids`` chosen on validation (vmapped sweeps),
TALL-mask retrieval and the weight disentanglement error, and the report.
Each stage is cached under ``--workdir`` and skipped on a rerun when its
outputs exist and come from the same inputs, config and code.

``--config.suite=clip8`` is the canonical benchmark on the user's data: image
folders ``<data_dir>/<task>/<split>/<class_name>/*.png`` for the tasks
SUN397, Cars, RESISC45, EuroSAT, SVHN, GTSRB, MNIST, DTD (or TFDS when
``tensorflow_datasets`` is installed), and a Hugging Face CLIP directory
(``config.json``, safetensors weights, ``tokenizer.json``) read by
``mtx.io.hf``; the encoder is CLIP's vision tower and each task's head the
zero-shot head from its class names.

Writes under ``--workdir``: ``results.json`` (every number, per-example test
hits, per-stage time), ``results.md`` (the tables, the checks with paired
statistics), ``methods.png``, ``per_task.png``, ``cosine.png``,
``disentanglement.png``, and the stages' checkpoints (``pretrain/``,
``finetune/<mode>/<task>/``, ``evaluate/<mode>/``).
"""

if __package__ in (None, ""):  # run as a script: python experiments/suite.py
  import pathlib
  import sys

  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

# pylint: disable=g-import-not-at-top,wrong-import-position
from collections.abc import Sequence
from pathlib import Path

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from experiments import cli
from experiments import suite_lib

_DEFAULT_CONFIG = str(Path(__file__).resolve().parent / "configs" / "suite.py")
_CONFIG = config_flags.DEFINE_config_file(
    "config",
    _DEFAULT_CONFIG,
    "Suite config (default: smoke; variants: "
    f"--config={_DEFAULT_CONFIG}:full|tiny|interference_a|interference_b).",
    lock_config=True,
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory.")


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not _WORKDIR.value:
    raise app.UsageError("--workdir is required")
  config = _CONFIG.value
  suite_lib.cache.use_compilation_cache(config, _WORKDIR.value)
  suite_lib.run(config, _WORKDIR.value, log=logging.info)


if __name__ == "__main__":
  cli.run(main, "suite")
