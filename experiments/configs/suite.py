r"""Config of experiments/suite.py, the multi-task merging benchmark.

  python experiments/suite.py --workdir=/tmp/mtx_suite           # smoke
  python experiments/suite.py --config=experiments/configs/suite.py:full \
      --workdir=/tmp/mtx_suite_full
  python experiments/suite.py \
      --config=experiments/configs/suite.py:tiny --workdir=/tmp/mtx_tiny
  python experiments/suite.py --config=experiments/configs/suite.py:full \
      --config.suite=clip8 --config.data_dir=/data/clip8 \
      --config.clip=/models/clip-vit-base-patch32 --workdir=/tmp/mtx_clip8

Variants: ``smoke`` (default: the README's main job, minutes on 2 CPU cores),
``full`` (the complete protocol: larger splits, longer training, the full
hyperparameter grids), ``tiny`` (seconds; tests), ``interference_a`` /
``interference_b`` (the interference study's settings, run by
``experiments/interference.py``). Any field can be overridden, e.g.
``--config.finetune.steps=800 --config.methods=ties,consensus
--config.grids.structural.ties="({'density': 0.1}, {'density': 0.3})"``.
"""

import ml_collections

VARIANTS = ("smoke", "full", "tiny", "interference_a", "interference_b")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The ``smoke`` config, or the ``full`` / ``tiny`` variant."""
  variant = arg or "smoke"
  if variant not in VARIANTS:
    raise ValueError(
        f"unknown suite variant {arg!r}; known: {', '.join(VARIANTS)}"
    )
  c = ml_collections.ConfigDict()
  c.variant = variant
  # Tasks: a suite of mtx.data.tasks (offline8, digits4) or clip8, or an
  # explicit list of task names.
  c.suite = "offline8"
  c.tasks = ()
  c.image_size = 16
  c.max_train = 1200  # train + validation examples per task (0 = all)
  c.max_test = 500  # test examples per task (0 = all)
  c.validation_fraction = 0.1
  c.split_seed = 0
  c.seed = 0
  # Data: offline suites read Fashion-MNIST's IDX files from data_dir (the
  # files, or a fashion-mnist/ folder), else $MTX_DATA_DIR, else
  # /usr/share/datasets/fashion-mnist (apt-get install
  # dataset-fashion-mnist); clip8 reads image folders (or TFDS) from
  # data_dir (else $MTX_DATA_DIR) and a Hugging Face CLIP directory.
  c.data_dir = ""
  c.clip = ""
  # Keep compiled XLA programs under <workdir>/jax_cache, so identical
  # programs (fine-tuning runs of tasks with equal class counts, reruns)
  # compile once.
  c.compilation_cache = True
  # Encoder (offline suites): a registered mtx.models encoder.
  c.model = "vit"
  c.model_preset = ""
  c.model_overrides = ml_collections.ConfigDict(
      {"patch": 4, "width": 32, "depth": 2, "heads": 2, "mlp_dim": 64}
  )
  # Pretraining: rotation prediction on the union of the tasks' images.
  c.pretrain = ml_collections.ConfigDict()
  c.pretrain.steps = 600
  c.pretrain.batch_size = 128
  c.pretrain.learning_rate = 2e-3
  c.pretrain.warmup_fraction = 0.05
  c.pretrain.weight_decay = 0.05
  # Task heads, frozen: "prototype" (nearest class mean of the pretrained
  # features, L2-normalised, logits = logit_scale * cosine: the analogue of
  # CLIP's zero-shot head) or "fit" (logistic regression on the features).
  c.head = "prototype"
  c.logit_scale = 100.0
  # Fine-tuning of the encoder per task (head fitted on pretrained features,
  # frozen), the same recipe for both modes.
  c.finetune = ml_collections.ConfigDict()
  c.finetune.steps = 150
  c.finetune.batch_size = 64
  c.finetune.learning_rate = 3e-4
  c.finetune.warmup_fraction = 0.1
  c.finetune.weight_decay = 0.05
  c.modes = ("standard", "linearized")
  # Merging: every registered method unless listed.
  c.methods = ()
  # Hyperparameter grids, chosen on validation. `structural`: per method the
  # settings compiled separately (a tuple of dicts of factory arguments; a
  # method not listed runs with its defaults); `coefficients`: per method
  # continuous arguments swept with `scale` in one vmapped program.
  c.grids = ml_collections.ConfigDict()
  c.grids.scales = tuple(round(0.1 * i, 2) for i in range(1, 21))
  c.grids.structural = ml_collections.ConfigDict(
      {
          "ties": ({"density": 0.2},),
          "dare": ({"drop_rate": 0.5},),
          "breadcrumbs": ({"density": 0.1},),
          "consensus": ({"k": 2},),
          "pcb": ({"ratio": 0.1},),
          "compeft": ({"density": 0.2},),
      }
  )
  c.grids.coefficients = ml_collections.ConfigDict(
      {
          "lines": {"beta": (0.0, 0.5, 1.0)},
          "regmean": {"alpha": (0.5, 0.95)},
      }
  )
  c.grids.tall_lambda = (0.2, 0.3, 0.4, 0.5, 0.6)
  c.max_val_eval = 100  # validation examples per task for the sweeps (0: all)
  c.statistics_examples = 128  # train examples per task for Fisher / Gram
  c.eval_batch_size = 1024
  c.sweep_chunk = 16  # grid points merged and evaluated per program
  # Weight disentanglement: task pairs "a:b" (pairs with a missing task are
  # dropped; none left -> the first two tasks), α grid, test examples.
  c.xi_pairs = ("digits:fashion",)
  c.xi_alphas = (0.0, 0.5, 1.0, 1.5, 2.0)
  c.xi_examples = 200

  if variant == "full":
    c.max_train = 6000
    c.max_test = 1000
    c.model_overrides = ml_collections.ConfigDict(
        {"patch": 4, "width": 64, "depth": 4, "heads": 4, "mlp_dim": 128}
    )
    c.pretrain.steps = 2000
    c.finetune.steps = 500
    c.grids.scales = tuple(round(0.05 * i, 2) for i in range(1, 41))
    c.grids.structural = ml_collections.ConfigDict(
        {
            "ties": (
                {"density": 0.1},
                {"density": 0.2},
                {"density": 0.4},
                {"density": 0.2, "reduce": "sum"},
            ),
            "dare": ({"drop_rate": 0.5}, {"drop_rate": 0.9}),
            "breadcrumbs": ({"density": 0.1}, {"density": 0.3}),
            "consensus": ({"k": 2}, {"k": 2, "base": "ties"}),
            "pcb": ({"ratio": 0.05}, {"ratio": 0.1}, {"ratio": 0.2}),
            "compeft": ({"density": 0.1}, {"density": 0.2}),
        }
    )
    c.grids.coefficients = ml_collections.ConfigDict(
        {
            "lines": {"beta": (0.0, 0.25, 0.5, 0.75, 1.0)},
            "regmean": {"alpha": (0.5, 0.8, 0.95)},
        }
    )
    c.max_val_eval = 300
    c.statistics_examples = 512
    c.sweep_chunk = 20
    c.xi_pairs = (
        "digits:fashion",
        "digits:digits_inverted",
        "fashion:fashion_tops",
    )
    c.xi_alphas = tuple(round(0.25 * i, 2) for i in range(9))
    c.xi_examples = 500
  elif variant == "tiny":
    c.tasks = ("digits", "digits_inverted", "digits_parity")
    c.image_size = 8
    c.max_train = 400
    c.max_test = 100
    c.model = "mlp"
    c.model_overrides = ml_collections.ConfigDict({"hidden": (32,)})
    c.pretrain.steps = 20
    c.pretrain.batch_size = 64
    c.finetune.steps = 10
    c.finetune.batch_size = 32
    c.grids.scales = (0.5, 1.0)
    c.grids.tall_lambda = (0.2, 0.6)
    c.grids.coefficients.lines.beta = (0.5,)
    c.grids.coefficients.regmean.alpha = (0.95,)
    c.max_val_eval = 40
    c.statistics_examples = 32
    c.eval_batch_size = 256
    c.sweep_chunk = 4
    c.xi_pairs = ("digits:digits_inverted",)
    c.xi_alphas = (0.0, 1.0)
    c.xi_examples = 40
  elif variant.startswith("interference"):
    # The interference study (BUILD.md): the full model and splits, standard
    # fine-tuning of 300 steps, task arithmetic and TIES; setting A: 1500
    # pretraining steps, 6000 examples per task; B: 1000 steps, 3000.
    c.max_train = 6000 if variant == "interference_a" else 3000
    c.max_test = 1000
    c.model_overrides = ml_collections.ConfigDict(
        {"patch": 4, "width": 64, "depth": 4, "heads": 4, "mlp_dim": 128}
    )
    c.pretrain.steps = 1500 if variant == "interference_a" else 1000
    c.finetune.steps = 300
    c.modes = ("standard",)
    c.methods = ("task_arithmetic", "ties")
    c.grids.scales = tuple(round(0.05 * i, 2) for i in range(1, 41))
    c.max_val_eval = 300
    c.xi_examples = 100
    c.xi_alphas = (0.0, 1.0)
  return c
