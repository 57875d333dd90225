r"""Fine-tune an mtx.models classifier on one task (standard or linearised).

  python experiments/finetune.py --config=experiments/configs/finetune.py \
      --workdir=/tmp/ft --config.transform=rot90 [--config.linearized=True]
  python -m experiments.finetune \
      --config=experiments/configs/finetune.py:smoke --workdir=/tmp/ft_smoke

``--config`` is an ml_collections config file (``:smoke`` picks its small
variant); every experiment setting is a config field, overridden with
``--config.<field>=<value>``. The only other flags are about the run:
``--workdir`` and the test hook ``--kill_at_step``.

Runs AdamW with warm-up + cosine decay and gradient clipping on the encoder
(the head is fitted on the pretrained features and frozen by default),
evaluates on the validation split every ``eval_every`` steps, checkpoints
every ``checkpoint_every`` steps and resumes from the latest checkpoint in
``--workdir`` after a kill (bit-identical to an uninterrupted run: batches
and augmentation keys are pure functions of the step). Writes under
``--workdir``:

  checkpoints/<step>/  training state (params, optimizer state)
  pretrained/          the starting params {"encoder", "head"}
  finetuned/           the fine-tuned params
  task_vector/         finetuned - pretrained (what the merging methods take)
  metrics.json         config, evaluation history, final accuracies, timing
"""

from __future__ import annotations

import pathlib
import sys
from collections.abc import Sequence

from absl import app
from absl import flags
from ml_collections import config_flags

if __package__ in (None, ""):  # run as a script: python experiments/X.py
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from experiments import cli
from experiments import finetune_lib

_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Directory for checkpoints, params and metrics."
)
_CONFIG = config_flags.DEFINE_config_file(
    "config",
    None,
    "Fine-tuning config file (ml_collections), e.g."
    " experiments/configs/finetune.py or experiments/configs/finetune.py:smoke.",
    lock_config=True,
)
_KILL_AT_STEP = flags.DEFINE_integer(
    "kill_at_step",
    None,
    "Test hook, not for normal runs: SIGKILL this process right after this"
    " step (simulates a preemption; rerun the same command to resume).",
)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  finetune_lib.run(
      _CONFIG.value, _WORKDIR.value, kill_at_step=_KILL_AT_STEP.value
  )


if __name__ == "__main__":
  cli.run(main, "finetune")
