r"""Cost of a linearised training step vs. the non-linear one (one run).

  python benchmarks/linearized_step.py            # ViT ~5M params, batch 64
  python benchmarks/linearized_step.py --depth=2  # quick

One training step (loss + grad + AdamW update, ``mtx.training``) of an
``mtx.models`` ViT classifier and of its linearisation (``mtx.ntk.linearize``
around the initial params), timed in the same process (best of ``--repeats``), plus each compiled step's temporary
memory from XLA's memory analysis. Prints the ratios (targets: time <= 2.0x,
memory <= 2.0x).
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

import mtx


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--depth", type=int, default=6)
  ap.add_argument("--batch", type=int, default=64)
  ap.add_argument("--repeats", type=int, default=5)
  a = ap.parse_args()
  model = mtx.models.classifier(
      mtx.models.get(
          "vit", patch=4, width=256, depth=a.depth, heads=8, mlp_dim=1024
      ),
      num_classes=10,
  )
  x = jax.random.normal(jax.random.key(1), (a.batch, 32, 32, 3))
  y = jax.random.randint(jax.random.key(2), (a.batch,), 0, 10)
  params0 = model.init(jax.random.key(0), x[:1])
  n = mtx.tree.num_elements(params0)
  opt = mtx.training.make_optimizer(learning_rate=1e-4, steps=1000)
  key = jax.random.key(3)
  res = {}
  for name in ("non-linear", "linearised"):
    step = mtx.training.make_train_step(
        model.apply, opt, linearized=name == "linearised"
    )
    params = jax.tree.map(jnp.copy, params0)
    state = opt.init(params)
    mem = (
        step.lower(params, state, params0, x, y, key)
        .compile()
        .memory_analysis()
    )
    temp = getattr(mem, "temp_size_in_bytes", float("nan"))
    params, state, _ = step(params, state, params0, x, y, key)  # compile
    best = np.inf
    for _ in range(a.repeats):
      t0 = time.perf_counter()
      params, state, m = step(params, state, params0, x, y, key)
      m["loss"].block_until_ready()
      best = min(best, time.perf_counter() - t0)
    res[name] = (best, temp)
    print(
        f"{name:11s} step {best * 1e3:8.1f} ms   temp memory "
        f"{temp / 2**20:8.1f} MiB"
    )
  (t_nl, m_nl), (t_lin, m_lin) = res["non-linear"], res["linearised"]
  print(
      f"\nViT with {n / 1e6:.2f}M params, batch {a.batch}, jax "
      f"{jax.__version__} on {jax.devices()[0].platform}: linearised / "
      f"non-linear step time {t_lin / t_nl:.2f}x (target <= 2.0), temp "
      f"memory {m_lin / m_nl:.2f}x (target <= 2.0)"
  )


if __name__ == "__main__":
  main()
