r"""Streaming merges of checkpoints on disk: wall time and peak memory.

  python benchmarks/streaming_merge.py                   # 4 x 1.5 GB float32
  python benchmarks/streaming_merge.py --size_gb=0.3     # quick

Writes a pretrained and ``--num_models`` fine-tuned float32 checkpoints of a
Llama-like model (embedding, ``L`` decoder layers with q/k/v/o and a SwiGLU
MLP, RMSNorm weights, an untied LM head; ``L`` chosen so a model has about
``--size_gb``) as sharded safetensors with mtx's writer, then for each method:

* runs ``experiments/merge.py`` as a subprocess (streaming: tensor by tensor
  from the memory-mapped files, sharded safetensors out) and reads its wall
  time and peak resident memory (``os.wait4``: the child's ``ru_maxrss``);
* runs the same merge in memory in a subprocess (``mtx.merging.merge`` on
  the loaded models, then written with the same writer);
* checks that both outputs hold identical tensors.

Prints a markdown table. Needs about ``(num_models + 3) x size_gb`` of free
disk under ``--tmp`` (checked first); everything goes to a fresh scratch
folder there, removed at the end.
The in-memory runs need about ``(num_models + 2) x size_gb`` of RAM; they are
skipped (``--skip_in_memory``) or refused when memory is short.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

_ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir)
_BINARY = os.path.join(_ROOT, "experiments", "merge.py")

HIDDEN, FFN, VOCAB = 1024, 2816, 32000


def layer_shapes(i: int) -> dict[str, tuple[int, ...]]:
  p = f"model.layers.{i}."
  return {
      p + "self_attn.q_proj.weight": (HIDDEN, HIDDEN),
      p + "self_attn.k_proj.weight": (HIDDEN, HIDDEN),
      p + "self_attn.v_proj.weight": (HIDDEN, HIDDEN),
      p + "self_attn.o_proj.weight": (HIDDEN, HIDDEN),
      p + "mlp.gate_proj.weight": (FFN, HIDDEN),
      p + "mlp.up_proj.weight": (FFN, HIDDEN),
      p + "mlp.down_proj.weight": (HIDDEN, FFN),
      p + "input_layernorm.weight": (HIDDEN,),
      p + "post_attention_layernorm.weight": (HIDDEN,),
  }


def model_shapes(size_gb: float) -> dict[str, tuple[int, ...]]:
  fixed = 2 * VOCAB * HIDDEN + HIDDEN
  per_layer = sum(int(np.prod(s)) for s in layer_shapes(0).values())
  layers = max(1, round((size_gb * 1e9 / 4 - fixed) / per_layer))
  shapes = {"model.embed_tokens.weight": (VOCAB, HIDDEN)}
  for i in range(layers):
    shapes.update(layer_shapes(i))
  shapes["model.norm.weight"] = (HIDDEN,)
  shapes["lm_head.weight"] = (VOCAB, HIDDEN)
  return shapes


def tensors(shapes, model: int):
  """Yields (name, array): model 0 is the base; model t adds 0.01 noise."""
  from mtx.io import safetensors as st  # pylint: disable=g-import-not-at-top

  del st
  for k, (name, shape) in enumerate(shapes.items()):
    base = np.random.default_rng(k).standard_normal(shape, np.float32)
    base *= 0.02
    if model:
      noise = np.random.default_rng((model, k)).standard_normal(
          shape, np.float32
      )
      base += 0.01 * noise
      del noise
    yield name, base


def write_models(workdir: str, shapes, num_models: int) -> list[str]:
  from mtx.io import safetensors as st  # pylint: disable=g-import-not-at-top

  paths = []
  for m in range(num_models + 1):
    path = os.path.join(workdir, "base" if m == 0 else f"ft{m}")
    t0 = time.time()
    st.write_sharded(path, tensors(shapes, m), "1GB", {"format": "pt"})
    with open(os.path.join(path, "config.json"), "w") as f:
      json.dump({"torch_dtype": "float32"}, f)
    print(f"  wrote {path} in {time.time() - t0:.1f} s", flush=True)
    paths.append(path)
  return paths


def run_measured(cmd: list[str]) -> tuple[float, float, str]:
  """(wall seconds, peak RSS in GB, stderr tail) of a subprocess."""
  t0 = time.time()
  proc = subprocess.Popen(
      cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
  )
  # wait4 gives this child's own rusage (RUSAGE_CHILDREN would be the max
  # over every child so far).
  out, err = "", ""
  import threading  # pylint: disable=g-import-not-at-top

  chunks = {"out": [], "err": []}

  def drain(stream, key):
    for line in stream:
      chunks[key].append(line)

  threads = [
      threading.Thread(target=drain, args=(proc.stdout, "out")),
      threading.Thread(target=drain, args=(proc.stderr, "err")),
  ]
  for th in threads:
    th.start()
  _, status, usage = os.wait4(proc.pid, 0)
  for th in threads:
    th.join()
  proc.returncode = os.waitstatus_to_exitcode(status)
  wall = time.time() - t0
  out, err = "".join(chunks["out"]), "".join(chunks["err"])
  if proc.returncode != 0:
    raise RuntimeError(f"{cmd[:3]}... failed:\n{err[-3000:]}")
  return wall, usage.ru_maxrss * 1024 / 1e9, out + err[-2000:]


IN_MEMORY = r"""
import sys, json
import jax
import mtx
from mtx.io import safetensors as st
pre, fts, method, hparams, scale, out = json.loads(sys.argv[1])
tree = lambda p: dict(st.read(p))
merged = mtx.merging.merge(tree(pre), [tree(f) for f in fts], method,
                           scale=scale, key=jax.random.key(0), **hparams)
st.write_sharded(out, merged.items(), "2GB", {"format": "pt"})
"""


def identical(a: str, b: str) -> bool:
  from mtx.io import safetensors as st  # pylint: disable=g-import-not-at-top

  ca, cb = st.open_checkpoint(a), st.open_checkpoint(b)
  if sorted(ca) != sorted(cb):
    return False
  for name in ca:
    x, y = ca[name], cb[name]
    if x.dtype != y.dtype or x.shape != y.shape or not np.array_equal(x, y):
      return False
    ca.release(name)
    cb.release(name)
  return True


def mem_available_gb() -> float:
  with open("/proc/meminfo") as f:
    for line in f:
      if line.startswith("MemAvailable:"):
        return int(line.split()[1]) * 1024 / 1e9
  return float("inf")


def main() -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--size_gb", type=float, default=1.5)
  ap.add_argument("--num_models", type=int, default=4)
  ap.add_argument(
      "--tmp", default="/tmp", help="where the scratch folder is created"
  )
  ap.add_argument("--methods", default="task_arithmetic,ties")
  ap.add_argument("--skip_in_memory", action="store_true")
  ap.add_argument("--keep", action="store_true", help="keep the files")
  args = ap.parse_args()

  shapes = model_shapes(args.size_gb)
  n_params = sum(int(np.prod(s)) for s in shapes.values())
  model_gb = n_params * 4 / 1e9
  largest = max(int(np.prod(s)) for s in shapes.values()) * 4 / 1e9
  free = shutil.disk_usage(args.tmp).free / 1e9
  need = (args.num_models + 3) * model_gb + 1
  print(
      f"model: {len(shapes)} tensors, {n_params / 1e6:.0f}M params, "
      f"{model_gb:.2f} GB (largest tensor {largest * 1e3:.0f} MB); "
      f"{args.num_models} fine-tuned; disk free {free:.0f} GB, need "
      f"{need:.0f} GB",
      flush=True,
  )
  if free < need:
    print("not enough disk space", file=sys.stderr)
    return 1
  hparams = {"task_arithmetic": {}, "ties": {"density": 0.2}}
  rows = []
  args.workdir = tempfile.mkdtemp(prefix="mtx_streaming_bench-", dir=args.tmp)
  try:
    t0 = time.time()
    pre, *fts = write_models(args.workdir, shapes, args.num_models)
    print(f"models written in {time.time() - t0:.0f} s", flush=True)
    env_python = sys.executable
    for method in args.methods.split(","):
      hp = hparams.get(method, {})
      scale = 0.3 if method == "task_arithmetic" else 1.0
      out_s = os.path.join(args.workdir, f"out_stream_{method}")
      cmd = [
          env_python,
          _BINARY,
          f"--pretrained={pre}",
          f"--finetuned={','.join(fts)}",
          f"--method={method}",
          f"--scales={scale}",
          f"--out={out_s}",
          "--shard_size=1GB",
          *[f"--hparam={k}={v}" for k, v in hp.items()],
      ]
      wall, rss, _ = run_measured(cmd)
      rows.append([method, "streaming (binary)", wall, rss, ""])
      print(f"  {method} streaming: {wall:.1f} s, {rss:.2f} GB", flush=True)
      if args.skip_in_memory:
        continue
      if mem_available_gb() < (args.num_models + 3) * model_gb:
        rows.append(
            [
                method,
                "in memory",
                float("nan"),
                float("nan"),
                "skipped: not enough RAM",
            ]
        )
        continue
      out_m = os.path.join(args.workdir, f"out_memory_{method}")
      payload = json.dumps([pre, fts, method, hp, scale, out_m])
      wall_m, rss_m, _ = run_measured([env_python, "-c", IN_MEMORY, payload])
      same = identical(out_s, out_m)
      rows.append(
          [
              method,
              "in memory",
              wall_m,
              rss_m,
              "identical" if same else "DIFFERENT",
          ]
      )
      rows[-2][4] = "identical" if same else "DIFFERENT"
      print(
          f"  {method} in memory: {wall_m:.1f} s, {rss_m:.2f} GB, "
          f"outputs {'identical' if same else 'DIFFER'}",
          flush=True,
      )
      shutil.rmtree(out_m, ignore_errors=True)
      shutil.rmtree(out_s, ignore_errors=True)
  finally:
    if not args.keep:
      shutil.rmtree(args.workdir, ignore_errors=True)
  print()
  print(
      f"{args.num_models} x {model_gb:.2f} GB float32 models (+ base), "
      f"{len(shapes)} tensors, largest {largest * 1e3:.0f} MB"
  )
  print("| method | mode | wall s | peak RSS GB | output |")
  print("|---|---|---|---|---|")
  for m, mode, wall, rss, note in rows:
    print(f"| {m} | {mode} | {wall:.1f} | {rss:.2f} | {note} |")
  return 0


if __name__ == "__main__":
  sys.exit(main())
