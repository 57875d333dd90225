r"""Config for experiments/moe_train.py (a character-level MoE causal LM).

  python experiments/moe_train.py --config=experiments/configs/moe_train.py \
      --workdir=/tmp/moe --mesh=data=-1,expert=1
  XLA_FLAGS=--xla_force_host_platform_device_count=8 \
  python experiments/moe_train.py \
      --config=experiments/configs/moe_train.py:smoke --workdir=/tmp/moe8 \
      --mesh=data=2,expert=4

Any field can be overridden on the command line, e.g.
``--config.steps=2000 --config.model_overrides.num_experts=16``.
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The default config; ``arg="smoke"`` shrinks it to seconds."""
  c = ml_collections.ConfigDict()
  # Model: a preset of mtx.models.moe_transformer + Config field overrides.
  c.model_preset = "small"
  c.model_overrides = ml_collections.ConfigDict()
  # "auto": the expert-parallel backend when the mesh's expert axis is > 1,
  # else the model config's backend; or any mtx.moe backend by name.
  c.backend = "auto"
  # Data: characters (ASCII codes, vocab 128) of a text shipped with Python:
  # "stdlib" (docstrings of a fixed list of standard-library modules,
  # ~100k characters) or "zen" (`import this`, ~850 characters).
  c.text = "stdlib"
  c.validation_fraction = 0.1
  c.seq_len = 64  # tokens per example (the model sees seq_len, predicts
  # the next character at each position)
  c.batch_size = 32  # global batch; a multiple of the number of devices
  c.eval_batch_size = 64
  # Optimisation: AdamW, warm-up + cosine decay, global-norm clipping.
  c.steps = 2000
  c.learning_rate = 3e-3
  c.warmup_steps = 100
  c.weight_decay = 0.01
  c.clip_norm = 1.0
  c.seed = 0
  # Bookkeeping (checkpoint_every must be a multiple of log_every).
  c.log_every = 50
  c.eval_every = 250
  c.checkpoint_every = 250
  c.keep_checkpoints = 2
  if arg == "smoke":
    # One block, an MoE one: the smallest program that exercises routing,
    # dispatch, the experts and the aux losses (compiles in seconds).
    c.model_preset = "tiny"
    c.model_overrides = ml_collections.ConfigDict(
        {"num_layers": 1, "moe_every": 1}
    )
    c.text = "zen"
    c.seq_len = 16
    c.batch_size = 16
    c.eval_batch_size = 16
    c.steps = 8
    c.warmup_steps = 2
    c.log_every = 2
    c.eval_every = 4
    c.checkpoint_every = 4
  elif arg not in (None, ""):
    raise ValueError(f"unknown config variant {arg!r}; known: smoke")
  return c
