r"""Train an MoE transformer (char-level LM) on a (data, expert) device mesh.

  python experiments/moe_train.py --config=experiments/configs/moe_train.py \
      --workdir=/tmp/moe --mesh=data=2,expert=4
  python -m experiments.moe_train \
      --config=experiments/configs/moe_train.py:smoke --workdir=/tmp/moe_smoke

``--config`` is an ml_collections config file (``:smoke`` picks its small
variant); every experiment setting is a config field, overridden with
``--config.<field>=<value>``. The other flags are about the run: the
output directory, the device mesh, the ``jax.distributed`` process group
and the test hook ``--kill_at_step``.

On CPU, fake the devices before JAX starts:
``XLA_FLAGS=--xla_force_host_platform_device_count=8``. Multi-host (here two
local processes with four faked CPU devices each, gloo collectives, the same
global mesh; run both commands, e.g. in two shells):

  XLA_FLAGS=--xla_force_host_platform_device_count=4 \
  python experiments/moe_train.py --config=experiments/configs/moe_train.py \
      --workdir=/tmp/moe2 --mesh=data=2,expert=4 \
      --coordinator=127.0.0.1:12355 --num_processes=2 --process_id=0  # and 1

Trains ``mtx.models.moe_transformer`` (every other block an ``mtx.moe``
layer; the expert-parallel backend when the mesh's expert axis is > 1:
experts sharded on ``expert``, tokens exchanged with all-to-alls) on the
characters of a text shipped with Python, logs loss, aux losses, per-expert
load and drop rate with steps/s and ETA every ``log_every`` steps, evaluates
every ``eval_every`` steps, checkpoints (sharded, every process writes its
shards) every ``checkpoint_every`` steps and resumes from the latest
checkpoint after a kill, bit-identical to an uninterrupted run. Writes under
``--workdir`` (shared by all processes):

  checkpoints/<step>/  training state (params, optimizer state) + history
  params/              the trained params (mtx.checkpoint)
  metrics.json         config, mesh, per-step losses, logged history
                       (aux losses, expert load, drop rate), evaluations
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
from experiments import moe_train_lib

_WORKDIR = flags.DEFINE_string(
    "workdir",
    None,
    "Directory for checkpoints, params and metrics (shared by all processes).",
)
_CONFIG = config_flags.DEFINE_config_file(
    "config",
    None,
    "MoE training config file (ml_collections), e.g."
    " experiments/configs/moe_train.py or"
    " experiments/configs/moe_train.py:smoke.",
    lock_config=True,
)
_MESH = flags.DEFINE_string(
    "mesh",
    "data=-1,expert=1",
    "Global device mesh, e.g. data=2,expert=4 (-1: the remaining devices).",
)
_COORDINATOR = flags.DEFINE_string(
    "coordinator",
    None,
    "host:port of process 0 for jax.distributed (multi-process runs).",
)
_NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", 1, "Number of processes (jax.distributed)."
)
_PROCESS_ID = flags.DEFINE_integer(
    "process_id", 0, "This process's index in [0, num_processes)."
)
_KILL_AT_STEP = flags.DEFINE_integer(
    "kill_at_step",
    None,
    "Test hook, not for normal runs: SIGKILL every process right after this"
    " step (simulates a preemption; rerun the same command to resume).",
)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _NUM_PROCESSES.value > 1 and not _COORDINATOR.value:
    raise app.UsageError("--num_processes > 1 needs --coordinator=host:port")
  moe_train_lib.init_distributed(
      _COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value
  )
  moe_train_lib.run(
      _CONFIG.value,
      _WORKDIR.value,
      mesh_spec=_MESH.value,
      kill_at_step=_KILL_AT_STEP.value,
  )


if __name__ == "__main__":
  cli.run(main, "moe_train")
