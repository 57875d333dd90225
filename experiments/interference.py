r"""The interference study of BUILD.md: own gain and damage to other tasks.

  python experiments/interference.py --workdir=/tmp/mtx_interference_a \
      --config=experiments/configs/suite.py:interference_a \
      --config.finetune.learning_rate=3e-4
  python -m experiments.interference --workdir=/tmp/mtx_interference_b \
      --config=experiments/configs/suite.py:interference_b \
      --config.finetune.learning_rate=1e-4

Runs the suite with the given config in ``--workdir`` (stages cached, so
rows that share pretraining reuse it) and writes ``interference.md`` /
``interference.json`` there: the mean change of ``acc(θ0 + τ_t)`` on task t
(own) and on the other tasks (others), in points; task arithmetic's and
TIES's normalized accuracy; and the same own / others with ``τ_t``
restricted to parts of the network (first and second block, embeddings, all
blocks). The rows of BUILD.md's table are variants of this command: setting
A or B, ``--config.finetune.learning_rate``, ``--config.finetune.steps``,
``--config.finetune.weight_decay=0``, ``--config.model_overrides.width=128``
and ``--config.head=fit``.
"""

if __package__ in (None, ""):  # run as a script
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
from experiments.suite_lib import cache
from experiments.suite_lib import interference

_DEFAULT = str(Path(__file__).resolve().parent / "configs" / "suite.py")
_CONFIG = config_flags.DEFINE_config_file(
    "config",
    f"{_DEFAULT}:interference_a",
    "Suite config (interference_a or interference_b variant).",
    lock_config=True,
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory.")


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not _WORKDIR.value:
    raise app.UsageError("--workdir is required")
  config = _CONFIG.value
  cache.use_compilation_cache(config, _WORKDIR.value)
  interference.run(config, _WORKDIR.value, log=logging.info)


if __name__ == "__main__":
  cli.run(main, "interference")
