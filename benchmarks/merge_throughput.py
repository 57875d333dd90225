r"""Merge throughput and peak memory against this machine's streaming bandwidth.

  python benchmarks/merge_throughput.py                 # ~100M params, T=4,8
  python benchmarks/merge_throughput.py --params_m=10 --tasks=4   # quick

Builds a BERT-base-like float32 pytree (token embedding plus transformer
layers; ~100M parameters in ~165 leaves), ``T`` fine-tuned copies, and, in one
run:

* streaming bandwidth: an in-place add over model-sized arrays (numpy
  ``np.add(a, b, out=a)`` and a donated jitted add; the best of both), in GB/s
  counting 2 reads + 1 write; and the same add into a fresh output, the
  ceiling for any function that returns new arrays;
* for each method, the wall time of ``mtx.merging.merge`` (first call, which
  compiles, and the best of ``--repeats`` warm calls), the effective GB/s
  (``T+1`` models read + 1 written, over the warm time), its ratio to the
  bandwidth, and the peak resident memory above the inputs, in model sizes
  (sampled from /proc every millisecond); with the ``T+1`` input models this
  is the peak the target ``(T+3) x model size`` bounds.

Prints a markdown table.
"""

from __future__ import annotations

import argparse
import gc
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np

import mtx

_PAGE = 4096


def rss_bytes() -> int:
  with open("/proc/self/statm") as f:
    return int(f.read().split()[1]) * _PAGE


class PeakRSS:
  """Samples the resident set size in a thread; ``peak`` after ``stop``."""

  def __init__(self, interval: float = 1e-3):
    self.interval = interval
    self.peak = 0
    self._stop = threading.Event()
    self._t = threading.Thread(target=self._run, daemon=True)

  def _run(self):
    while not self._stop.is_set():
      self.peak = max(self.peak, rss_bytes())
      time.sleep(self.interval)

  def __enter__(self):
    self.peak = rss_bytes()
    self._t.start()
    return self

  def __exit__(self, *exc):
    self._stop.set()
    self._t.join()
    self.peak = max(self.peak, rss_bytes())


def transformer_shapes(params_m: float) -> dict[str, tuple[int, ...]]:
  """BERT-base-like leaves; the layer count is chosen to reach ``params_m``."""
  d, f, vocab = 768, 3072, 30522
  shapes = {
      "embeddings/word": (vocab, d),
      "embeddings/position": (512, d),
      "embeddings/ln/scale": (d,),
      "embeddings/ln/bias": (d,),
      "pooler/kernel": (d, d),
      "pooler/bias": (d,),
  }
  per_layer = {
      "attn/query/kernel": (d, d),
      "attn/query/bias": (d,),
      "attn/key/kernel": (d, d),
      "attn/key/bias": (d,),
      "attn/value/kernel": (d, d),
      "attn/value/bias": (d,),
      "attn/out/kernel": (d, d),
      "attn/out/bias": (d,),
      "attn/ln/scale": (d,),
      "attn/ln/bias": (d,),
      "mlp/wi/kernel": (d, f),
      "mlp/wi/bias": (f,),
      "mlp/wo/kernel": (f, d),
      "mlp/wo/bias": (d,),
      "mlp/ln/scale": (d,),
      "mlp/ln/bias": (d,),
  }
  base = sum(int(np.prod(s)) for s in shapes.values())
  layer = sum(int(np.prod(s)) for s in per_layer.values())
  n_layers = max(1, round((params_m * 1e6 - base) / layer))
  if params_m * 1e6 < base:  # small runs: shrink the vocabulary instead
    shapes["embeddings/word"] = (max(1000, int(params_m * 1e6 / d / 2)), d)
    n_layers = 1
  for i in range(n_layers):
    for k, s in per_layer.items():
      shapes[f"encoder/layers_{i}/{k}"] = s
  return shapes


def build(shapes, t: int, seed: int = 0):
  """Pretrained and ``t`` fine-tuned trees (host numpy -> CPU jax arrays)."""
  rng = np.random.default_rng(seed)

  def tree(fn):
    out = {}
    for path, s in shapes.items():
      node = out
      *parents, leaf = path.split("/")
      for p in parents:
        node = node.setdefault(p, {})
      node[leaf] = jnp.asarray(fn(s))
    return out

  pre = tree(lambda s: rng.standard_normal(s, dtype=np.float32) * 0.02)
  fts = []
  for _ in range(t):
    fts.append(
        jax.tree.map(
            lambda x: x
            + jnp.asarray(
                rng.standard_normal(x.shape, dtype=np.float32) * 1e-3
            ),
            pre,
        )
    )
  return pre, fts


def bandwidth(nbytes: int, repeats: int = 5) -> tuple[float, float, float]:
  """GB/s of an add (2 reads + 1 write) over ``nbytes`` arrays.

  Returns numpy in place, a donated jitted add (in place), and a plain jitted
  add into a fresh output (what any function returning new arrays pays: the
  output pages are faulted in on first touch).
  """
  n = nbytes // 4
  a = np.ones(n, np.float32)
  b = np.ones(n, np.float32)
  best_np = np.inf
  for _ in range(repeats):
    t0 = time.perf_counter()
    np.add(a, b, out=a)
    best_np = min(best_np, time.perf_counter() - t0)
  add = jax.jit(lambda x, y: x + y, donate_argnums=0)
  x = jnp.ones(n, jnp.float32)
  y = jnp.ones(n, jnp.float32)
  x = add(x, y).block_until_ready()
  best_jax = np.inf
  for _ in range(repeats):
    t0 = time.perf_counter()
    x = add(x, y).block_until_ready()
    best_jax = min(best_jax, time.perf_counter() - t0)
  fresh = jax.jit(lambda x, y: x + y)
  fresh(x, y).block_until_ready()
  best_fresh = np.inf
  for _ in range(repeats):
    gc.collect()
    t0 = time.perf_counter()
    z = fresh(x, y).block_until_ready()
    best_fresh = min(best_fresh, time.perf_counter() - t0)
    del z
  del a, b, x, y
  return tuple(3 * nbytes / t / 1e9 for t in (best_np, best_jax, best_fresh))


METHODS = {
    "task_arithmetic": {},
    "task_arithmetic (check_finite=False)": {
        "method": "task_arithmetic",
        "check_finite": False,
    },
    "ties (global)": {"method": "ties"},
    "ties (per_leaf)": {"method": "ties", "scope": "per_leaf"},
    "breadcrumbs": {},
    "consensus": {},
    "pcb": {},
    "tsvm": {},
}


def run(params_m: float, tasks: list[int], methods: list[str], repeats: int):
  shapes = transformer_shapes(params_m)
  n = sum(int(np.prod(s)) for s in shapes.values())
  model_bytes = 4 * n
  print(
      f"model: {n / 1e6:.1f}M float32 parameters in {len(shapes)} leaves "
      f"({model_bytes / 1e9:.2f} GB); jax {jax.__version__}, "
      f"{jax.devices()[0].platform}"
  )
  bw_np, bw_jax, bw_fresh = bandwidth(model_bytes)
  bw = max(bw_np, bw_jax)
  print(
      f"streaming bandwidth (in-place add, 2 reads + 1 write): numpy "
      f"{bw_np:.1f} GB/s, donated jit {bw_jax:.1f} GB/s -> {bw:.1f} GB/s; "
      f"a jitted add into a fresh output: {bw_fresh:.1f} GB/s\n"
  )
  print(
      "| T | method | first call s | warm s | GB/s | of bandwidth | "
      "of fresh-output add | peak above inputs (model sizes) | "
      "peak incl. inputs (model sizes; target <= T+3) |"
  )
  print("|---|---|---|---|---|---|---|---|---|")
  for t in tasks:
    gc.collect()
    pre, fts = build(shapes, t)
    jax.block_until_ready((pre, fts))
    inputs_rss = rss_bytes()
    io_bytes = (t + 2) * model_bytes
    for label in methods:
      hp = dict(METHODS[label])
      name = hp.pop("method", label)
      times = []
      peak = 0
      for _ in range(repeats + 1):
        gc.collect()
        with PeakRSS() as mon:
          t0 = time.perf_counter()
          out = mtx.merging.merge(pre, fts, name, **hp)
          jax.block_until_ready(out)
          times.append(time.perf_counter() - t0)
        peak = max(peak, mon.peak)
        del out
      warm = min(times[1:])
      gbs = io_bytes / warm / 1e9
      print(
          f"| {t} | {label} | {times[0]:.2f} | {warm:.2f} | {gbs:.1f} | "
          f"{gbs / bw:.2f} | {gbs / bw_fresh:.2f} | "
          f"{(peak - inputs_rss) / model_bytes:.2f} | "
          f"{t + 1 + (peak - inputs_rss) / model_bytes:.2f} |",
          flush=True,
      )
    del pre, fts


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--params_m", type=float, default=100.0)
  ap.add_argument("--tasks", default="4,8")
  ap.add_argument("--methods", default=",".join(METHODS))
  ap.add_argument("--repeats", type=int, default=2)
  a = ap.parse_args()
  run(
      a.params_m,
      [int(x) for x in a.tasks.split(",")],
      a.methods.split(","),
      a.repeats,
  )


if __name__ == "__main__":
  main()
