r"""Fine-tuning config for experiments/finetune.py.

  python experiments/finetune.py --config=experiments/configs/finetune.py \
      --workdir=/tmp/ft
  python experiments/finetune.py \
      --config=experiments/configs/finetune.py:smoke --workdir=/tmp/ft_smoke \
      --config.linearized=True

Any field can be overridden on the command line, e.g.
``--config.steps=2000 --config.transform=rot90``.
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The default config; ``arg="smoke"`` shrinks it to seconds."""
  c = ml_collections.ConfigDict()
  # Model: a registered mtx.models encoder + a linear head.
  c.model = "vit"
  c.model_preset = "tiny"
  c.model_overrides = ml_collections.ConfigDict()
  # Task: a data set from mtx.data, an input transform, and the splits.
  c.dataset = "digits"
  c.transform = "none"
  c.validation_fraction = 0.1
  c.split_seed = 0
  # Starting point: an mtx checkpoint of the encoder (or of {"encoder",
  # "head"}); empty = a random init from `seed` (for smoke tests).
  c.pretrained = ""
  # Head: "fit" (logistic regression on the pretrained features, the
  # analogue of a zero-shot head), "zeros", or an mtx checkpoint path.
  c.head = "fit"
  c.freeze_head = True
  # Tangent-space fine-tuning (linearise the encoder around the pretrained
  # params).
  c.linearized = False
  c.linearize_include = "^encoder/"
  # Optimisation.
  c.steps = 400
  c.batch_size = 64
  c.learning_rate = 1e-3
  c.warmup_steps = 40
  c.weight_decay = 0.05
  c.clip_norm = 1.0
  c.label_smoothing = 0.0
  c.augment_shift = 0  # random translation in pixels (0 = off)
  c.seed = 0
  # Bookkeeping.
  c.eval_every = 100
  c.eval_batch_size = 512
  c.checkpoint_every = 100
  c.keep_checkpoints = 2
  c.log_every = 50
  if arg == "smoke":
    c.steps = 8
    c.warmup_steps = 2
    c.batch_size = 32
    c.eval_every = 4
    c.checkpoint_every = 4
    c.log_every = 2
  elif arg not in (None, ""):
    raise ValueError(f"unknown config variant {arg!r}; known: smoke")
  return c
