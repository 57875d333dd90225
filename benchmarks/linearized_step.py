r"""Cost of a linearised training step vs. the non-linear one (one run).

  python benchmarks/linearized_step.py            # ViT ~5M params, batch 64
  python benchmarks/linearized_step.py --depth=2  # quick

One AdamW step (loss + grad + update) of a small pure-JAX ViT and of its
linearisation ``mtx.ntk.linearize`` around the initial params, timed in the
same process (best of ``--repeats``), plus each compiled step's temporary
memory from XLA's memory analysis. Prints the ratios (targets: time <= 2.0x,
memory <= 2.0x).
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import mtx


def init_vit(key, *, image=32, patch=4, dim=256, depth=6, mlp=1024, classes=10):
  ks = iter(jax.random.split(key, 8 + 8 * depth))

  def dense(a, b):
    return {
        "kernel": jax.random.normal(next(ks), (a, b)) / np.sqrt(a),
        "bias": jnp.zeros((b,)),
    }

  n = (image // patch) ** 2
  p = {
      "embed": dense(patch * patch * 3, dim),
      "pos": 0.02 * jax.random.normal(next(ks), (n + 1, dim)),
      "cls": jnp.zeros((1, 1, dim)),
      "head": dense(dim, classes),
      "norm": {"scale": jnp.ones((dim,)), "bias": jnp.zeros((dim,))},
  }
  for i in range(depth):
    p[f"layers_{i}"] = {
        "ln1": {"scale": jnp.ones((dim,)), "bias": jnp.zeros((dim,))},
        "qkv": dense(dim, 3 * dim),
        "out": dense(dim, dim),
        "ln2": {"scale": jnp.ones((dim,)), "bias": jnp.zeros((dim,))},
        "fc1": dense(dim, mlp),
        "fc2": dense(mlp, dim),
    }
  return p


def _ln(p, x):
  m = x.mean(-1, keepdims=True)
  v = ((x - m) ** 2).mean(-1, keepdims=True)
  return (x - m) / jnp.sqrt(v + 1e-6) * p["scale"] + p["bias"]


def _dense(p, x):
  return x @ p["kernel"] + p["bias"]


def apply_vit(p, images, *, patch=4, heads=8):
  b, h, w, c = images.shape
  x = images.reshape(b, h // patch, patch, w // patch, patch, c)
  x = x.transpose(0, 1, 3, 2, 4, 5).reshape(b, -1, patch * patch * c)
  x = _dense(p["embed"], x)
  cls = jnp.broadcast_to(p["cls"], (b, 1, x.shape[-1]))
  x = jnp.concatenate([cls, x], axis=1) + p["pos"]
  d = x.shape[-1]
  depth = sum(k.startswith("layers_") for k in p)
  for i in range(depth):
    lp = p[f"layers_{i}"]
    y = _ln(lp["ln1"], x)
    q, k, v = jnp.split(_dense(lp["qkv"], y), 3, axis=-1)
    q, k, v = (t.reshape(b, -1, heads, d // heads) for t in (q, k, v))
    att = jax.nn.softmax(
        jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(d // heads), axis=-1
    )
    y = jnp.einsum("bhqk,bkhd->bqhd", att, v).reshape(b, -1, d)
    x = x + _dense(lp["out"], y)
    y = _ln(lp["ln2"], x)
    x = x + _dense(lp["fc2"], jax.nn.gelu(_dense(lp["fc1"], y)))
  return _dense(p["head"], _ln(p["norm"], x[:, 0]))


def make_step(apply_fn, opt):
  def step(params, state, params0, x, y):
    def loss(p):
      logits = apply_fn(params0, p, x)
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    value, g = jax.value_and_grad(loss)(params)
    upd, state = opt.update(g, state, params)
    return optax.apply_updates(params, upd), state, value

  return jax.jit(step, donate_argnums=(0, 1))


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--depth", type=int, default=6)
  ap.add_argument("--batch", type=int, default=64)
  ap.add_argument("--repeats", type=int, default=5)
  a = ap.parse_args()
  params0 = init_vit(jax.random.key(0), depth=a.depth)
  n = mtx.tree.num_elements(params0)
  x = jax.random.normal(jax.random.key(1), (a.batch, 32, 32, 3))
  y = jax.random.randint(jax.random.key(2), (a.batch,), 0, 10)
  opt = optax.adamw(1e-4)
  variants = {
      "non-linear": lambda p0, p, x: apply_vit(p, x),
      "linearised": mtx.ntk.linearize(apply_vit),
  }
  res = {}
  for name, fn in variants.items():
    step = make_step(fn, opt)
    params = jax.tree.map(jnp.copy, params0)
    state = opt.init(params)
    mem = step.lower(params, state, params0, x, y).compile().memory_analysis()
    temp = getattr(mem, "temp_size_in_bytes", float("nan"))
    params, state, _ = step(params, state, params0, x, y)  # compile + warm
    best = np.inf
    for _ in range(a.repeats):
      t0 = time.perf_counter()
      params, state, value = step(params, state, params0, x, y)
      value.block_until_ready()
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
