r"""Fine-tune an mtx.models classifier on one task (standard or linearised).

  python experiments/finetune.py --config=experiments/configs/finetune.py \
      --workdir=/tmp/ft --config.transform=rot90 [--linearized]

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

from collections.abc import Sequence
from pathlib import Path

from absl import app
from absl import flags
from ml_collections import config_flags

import finetune_lib  # pylint: disable=g-bad-import-order

_CONFIG = config_flags.DEFINE_config_file(
    "config",
    str(Path(__file__).parent / "configs" / "finetune.py"),
    "Fine-tuning config file (ml_collections).",
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory.")
_LINEARIZED = flags.DEFINE_bool(
    "linearized",
    None,
    "Tangent-space fine-tuning (overrides config.linearized when given).",
)
_KILL_AT_STEP = flags.DEFINE_integer(
    "kill_at_step",
    None,
    "Testing: SIGKILL this process right after this step (simulates a"
    " preemption; rerun the same command to resume).",
)


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not _WORKDIR.value:
    raise app.UsageError("--workdir is required")
  config = _CONFIG.value
  if _LINEARIZED.value is not None:
    config.linearized = _LINEARIZED.value
  finetune_lib.run(config, _WORKDIR.value, kill_at_step=_KILL_AT_STEP.value)


if __name__ == "__main__":
  app.run(main)
