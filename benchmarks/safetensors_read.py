r"""Safetensors read throughput: pread into private buffers vs memory mapping.

  python benchmarks/safetensors_read.py                # 512 MB in 4 MB tensors
  python benchmarks/safetensors_read.py --size_mb=128  # quick

Writes one float32 file with mtx's writer (hashes recorded), then, with the
file in the page cache, times reading every tensor into memory:

* ``mmap``: the former reader (``np.frombuffer`` over a memory map, then a
  copy, as the streaming engine copied every 8-byte aligned tensor);
* ``pread``: ``mtx.io.safetensors`` with ``verify=False``;
* ``pread+sha256``: the default, each tensor checked against its hash;
* ``verify_file``: hashing the whole file in bounded chunks.

Prints GB/s (median of ``--repeats``) and each row's ratio to ``mmap``.
"""

from __future__ import annotations

import argparse
import mmap
import os
import statistics
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir))

from mtx.io import safetensors as st  # pylint: disable=g-import-not-at-top,wrong-import-position


def _mmap_read(path: str) -> int:
  infos, _ = st.read_header(path)
  total = 0
  with open(path, "rb") as f:
    mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
  for info in infos.values():
    n = int(np.prod(info.shape))
    a = np.frombuffer(mm, info.dtype, count=n, offset=info.start)
    total += np.array(a).nbytes
    del a
  mm.close()
  return total


def _pread(path: str, verify: bool) -> int:
  ckpt = st.open_checkpoint(path, verify=verify)
  return sum(ckpt[name].nbytes for name in ckpt)


def _verify_file(path: str) -> int:
  assert st.verify_file(path)
  return st.open_checkpoint(path).nbytes


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--size_mb", type=int, default=512)
  ap.add_argument("--tensor_mb", type=int, default=4)
  ap.add_argument("--repeats", type=int, default=5)
  ap.add_argument("--tmp", default=tempfile.gettempdir())
  args = ap.parse_args()
  if args.size_mb <= 0 or args.tensor_mb <= 0 or args.repeats <= 0:
    raise SystemExit("--size_mb, --tensor_mb and --repeats must be positive")
  n = max(1, args.size_mb // args.tensor_mb)
  rows = args.tensor_mb * (1 << 20) // 4 // 1024
  rng = np.random.default_rng(0)
  with tempfile.TemporaryDirectory(dir=args.tmp) as d:
    path = os.path.join(d, "bench.safetensors")
    st.write(
        path,
        {
            f"t{k:04d}": rng.standard_normal((rows, 1024), np.float32)
            for k in range(n)
        },
    )
    size = os.path.getsize(path)
    cases = {
        "mmap": lambda: _mmap_read(path),
        "pread": lambda: _pread(path, False),
        "pread+sha256": lambda: _pread(path, True),
        "verify_file": lambda: _verify_file(path),
    }
    for fn in cases.values():  # warm the page cache and the code paths
      fn()
    speed = {}
    for name, fn in cases.items():
      times = []
      for _ in range(args.repeats):
        t0 = time.perf_counter()
        nbytes = fn()
        times.append(time.perf_counter() - t0)
      speed[name] = nbytes / statistics.median(times) / 1e9
  print(f"{n} float32 tensors of {args.tensor_mb} MB ({size / 1e6:.0f} MB),")
  print(f"page cache warm, median of {args.repeats}:\n")
  print("| read | GB/s | vs mmap |\n|---|---|---|")
  for name, s in speed.items():
    print(f"| {name} | {s:.2f} | {s / speed['mmap']:.2f} |")


if __name__ == "__main__":
  main()
