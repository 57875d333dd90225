r"""Config for experiments/tangent_demo.py (standard vs. tangent fine-tuning).

  python experiments/tangent_demo.py \
      --config=experiments/configs/tangent_demo.py --workdir=/tmp/mtx_tangent
  python -m experiments.tangent_demo \
      --config=experiments/configs/tangent_demo.py:smoke \
      --workdir=/tmp/mtx_tangent_smoke

Any field can be overridden on the command line, e.g.
``--config.steps=600 --config.tasks="('none', 'rot90')"``. Results are
written to ``<workdir>/results.json`` and ``<workdir>/results.md``.
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The default config; ``arg="smoke"`` shrinks it to seconds."""
  c = ml_collections.ConfigDict()
  # The two tasks: mtx.data.TRANSFORMS of the digits.
  c.tasks = ("none", "invert")
  # Rotation-prediction pretraining of the tiny ViT on both tasks' images.
  c.pretrain_steps = 1500
  # Fine-tuning of the encoder per task (standard and linearised).
  c.steps = 300
  c.learning_rate = 1e-3
  # Task addition: alpha is chosen on validation from this grid.
  c.addition_alphas = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.1, 1.2,
                       1.3, 1.4, 1.5)  # fmt: skip
  # The weight disentanglement error xi(alpha1, alpha2) on this grid.
  c.xi_alphas = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0)
  if arg == "smoke":
    c.pretrain_steps = 20
    c.steps = 10
    c.xi_alphas = (0.0, 1.0)
  elif arg not in (None, ""):
    raise ValueError(f"unknown config variant {arg!r}; known: smoke")
  return c
