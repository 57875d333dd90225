r"""Merge demo: fine-tune a small MLP on four digit tasks, merge with every method.

Runs offline on sklearn's bundled 8x8 digits in about a minute on 2 CPU cores:

  python experiments/merge_demo.py --workdir=/tmp/mtx_demo

1. "Pretrain" an MLP on the plain digits (classes 0-9).
2. Fine-tune a copy per task. The tasks share the label set but see shifted
   inputs: identity, inverted intensities, rotated 90 degrees, mirrored.
3. Merge the four fine-tuned models with every registered training-free
   method (Fisher and RegMean use statistics computed here from training
   data); pick ``scale`` per method on a validation split with ONE vmapped,
   jitted program over the whole grid; report test accuracy per task,
   absolute and normalized (merged / individual) means.

Writes ``results.json`` and ``results.md`` under ``--workdir``.
"""

from __future__ import annotations

import functools
import json
import os
import time
from collections.abc import Sequence

from absl import app
from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
import optax

import mtx

_WORKDIR = flags.DEFINE_string("workdir", "/tmp/mtx_demo", "Output folder.")
_PRETRAIN_STEPS = flags.DEFINE_integer("pretrain_steps", 300, "Pretraining.")
_FINETUNE_STEPS = flags.DEFINE_integer("finetune_steps", 300, "Per task.")
_HIDDEN = flags.DEFINE_integer("hidden", 128, "Hidden width of the MLP.")
_SEED = flags.DEFINE_integer("seed", 0, "Random seed.")
_METHODS = flags.DEFINE_list(
    "methods", [], "Methods to run (default: every registered method)."
)

TASKS = ("identity", "inverted", "rotated", "mirrored")
SCALES = np.round(np.arange(0.05, 1.55, 0.05), 2)


def load_digits(seed: int):
  """Digits as float32 [N, 8, 8] in [0, 1], labels, split 60/20/20."""
  from sklearn import datasets  # pylint: disable=g-import-not-at-top

  d = datasets.load_digits()
  x = (d.images / 16.0).astype(np.float32)
  y = d.target.astype(np.int32)
  perm = np.random.default_rng(seed).permutation(len(y))
  x, y = x[perm], y[perm]
  n = len(y)
  a, b = int(0.6 * n), int(0.8 * n)
  return {
      "train": (x[:a], y[:a]),
      "val": (x[a:b], y[a:b]),
      "test": (x[b:], y[b:]),
  }


def shift(task: str, x: np.ndarray) -> np.ndarray:
  if task == "inverted":
    return 1.0 - x
  if task == "rotated":
    return np.rot90(x, 1, axes=(1, 2)).copy()
  if task == "mirrored":
    return x[:, :, ::-1].copy()
  return x


def init_mlp(key, hidden: int):
  sizes = [64, hidden, hidden, 10]
  keys = jax.random.split(key, len(sizes) - 1)
  return {
      f"layers_{i}": {
          "kernel": jax.random.normal(k, (a, b)) * np.sqrt(2.0 / a),
          "bias": jnp.zeros((b,)),
      }
      for i, (k, a, b) in enumerate(zip(keys, sizes[:-1], sizes[1:]))
  }


def apply_mlp(params, x, *, return_inputs=False):
  h = x.reshape(x.shape[0], -1)
  n = len(params)
  inputs = {}
  for i in range(n):
    layer = params[f"layers_{i}"]
    inputs[f"layers_{i}/kernel"] = h
    h = h @ layer["kernel"] + layer["bias"]
    if i < n - 1:
      h = jax.nn.relu(h)
  return (h, inputs) if return_inputs else h


def loss_fn(params, x, y):
  logits = apply_mlp(params, x)
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def train(params, x, y, steps: int, lr: float, seed: int):
  opt = optax.adamw(optax.cosine_decay_schedule(lr, steps), weight_decay=1e-4)
  state = opt.init(params)

  @jax.jit
  def step(params, state, xb, yb):
    loss, g = jax.value_and_grad(loss_fn)(params, xb, yb)
    upd, state = opt.update(g, state, params)
    return optax.apply_updates(params, upd), state, loss

  rng = np.random.default_rng(seed)
  for i in range(steps):
    idx = rng.integers(0, len(y), 128)
    params, state, loss = step(params, state, x[idx], y[idx])
    if (i + 1) % max(1, steps // 3) == 0:
      logging.info("  step %d/%d loss %.4f", i + 1, steps, float(loss))
  return params


@jax.jit
def accuracy(params, x, y):
  return jnp.mean(jnp.argmax(apply_mlp(params, x), -1) == y)


def fisher_diag(params, x, y):
  """Empirical diagonal Fisher: mean of squared per-example gradients."""
  g = jax.vmap(jax.grad(loss_fn), in_axes=(None, 0, 0))(
      params, x[:, None], y[:, None]
  )
  return jax.tree.map(lambda a: jnp.mean(a * a, axis=0), g)


def grams(params, x):
  _, inputs = apply_mlp(params, x, return_inputs=True)
  return {p: h.T @ h / h.shape[0] for p, h in inputs.items()}


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  t0 = time.time()
  os.makedirs(_WORKDIR.value, exist_ok=True)
  seed = _SEED.value
  data = load_digits(seed)
  split = {
      s: {t: (shift(t, x), y) for t in TASKS} for s, (x, y) in data.items()
  }

  logging.info(
      "[1/3] pretraining on plain digits (%d steps)", _PRETRAIN_STEPS.value
  )
  pre = init_mlp(jax.random.key(seed), _HIDDEN.value)
  pre = train(pre, *data["train"], _PRETRAIN_STEPS.value, 3e-3, seed)

  logging.info(
      "[2/3] fine-tuning %d tasks (%d steps each)",
      len(TASKS),
      _FINETUNE_STEPS.value,
  )
  fts = []
  for i, t in enumerate(TASKS):
    logging.info(" task %d/%d: %s", i + 1, len(TASKS), t)
    fts.append(
        train(
            pre, *split["train"][t], _FINETUNE_STEPS.value, 1e-3, seed + 1 + i
        )
    )

  def evaluate(params, s="test"):
    return {t: float(accuracy(params, *split[s][t])) for t in TASKS}

  rows = {"pretrained": evaluate(pre)}
  individual = {t: evaluate(ft)[t] for t, ft in zip(TASKS, fts)}
  rows["individual"] = individual

  xtr = {t: split["train"][t] for t in TASKS}
  extra = {
      "fisher": {
          "fishers": [fisher_diag(ft, *xtr[t][:2]) for t, ft in zip(TASKS, fts)]
      },
      "regmean": {"grams": [grams(ft, xtr[t][0]) for t, ft in zip(TASKS, fts)]},
      "slerp": None,  # two models only: not part of the 4-task table
  }
  methods = _METHODS.value or [m for m in mtx.merging.METHODS if m != "slerp"]
  stacked = mtx.tree.stack([mtx.task_vectors.task_vector(pre, f) for f in fts])
  scales = jnp.asarray(SCALES)

  def val_score(params):
    accs = [accuracy(params, *split["val"][t]) for t in TASKS]
    return jnp.mean(jnp.stack(accs))

  logging.info(
      "[3/3] merging with %d methods (scale grid of %d, vmapped)",
      len(methods),
      len(SCALES),
  )
  best = {}
  for name in methods:
    merger = mtx.merging.get(name, **(extra.get(name) or {}))
    key = jax.random.key(seed) if merger.needs_key else None
    stats = merger.prepare(stacked, key=key)

    @functools.partial(jax.jit, static_argnums=())
    def sweep(stacked, stats, pre, scales, key, merger=merger):
      def one(scale):
        tv = merger.combine(stacked, stats, scale=scale, key=key)
        return val_score(mtx.task_vectors.apply(pre, tv))

      return jax.vmap(one)(scales)

    vals = np.asarray(sweep(stacked, stats, pre, scales, key))
    s = float(SCALES[int(np.argmax(vals))])
    merged = mtx.merging.merge(pre, fts, merger, scale=s, key=key)
    rows[name] = evaluate(merged)
    best[name] = s
    logging.info(
        "  %-16s scale %.2f  mean test acc %.4f",
        name,
        s,
        np.mean(list(rows[name].values())),
    )

  table = {}
  for name, accs in rows.items():
    table[name] = {
        "per_task": accs,
        "absolute": float(np.mean(list(accs.values()))),
        "normalized": float(np.mean([accs[t] / individual[t] for t in TASKS])),
        "scale": best.get(name),
    }
  with open(os.path.join(_WORKDIR.value, "results.json"), "w") as f:
    json.dump({"tasks": TASKS, "results": table}, f, indent=2)
  lines = [
      "| method | scale | " + " | ".join(TASKS) + " | absolute | normalized |",
      "|---|---|" + "---|" * len(TASKS) + "---|---|",
  ]
  for name, r in table.items():
    sc = "" if r["scale"] is None else f"{r['scale']:.2f}"
    lines.append(
        f"| {name} | {sc} | "
        + " | ".join(f"{100 * r['per_task'][t]:.1f}" for t in TASKS)
        + f" | {100 * r['absolute']:.1f} | {100 * r['normalized']:.1f} |"
    )
  md = "\n".join(lines)
  with open(os.path.join(_WORKDIR.value, "results.md"), "w") as f:
    f.write(md + "\n")
  print(md)
  print(
      f"\nwrote {_WORKDIR.value}/results.{{json,md}} in "
      f"{time.time() - t0:.0f} s"
  )


if __name__ == "__main__":
  app.run(main)
