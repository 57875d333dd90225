r"""The cost of verifying an orbax checkpoint's hashes on restore.

  python benchmarks/checkpoint_verify.py               # 256 MB of float32
  python benchmarks/checkpoint_verify.py --size_mb=64  # quick

Saves a tree of ``--arrays`` float32 arrays with :func:`mtx.checkpoint.save`
(which records each array's SHA-256), then times
``mtx.checkpoint.restore(path)`` (verifying, the default) and
``restore(path, verify=False)``, alternating, and prints the medians and the
ratio restore-with-verify / restore-without (also the save time).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir))

from mtx import checkpoint  # pylint: disable=g-import-not-at-top,wrong-import-position


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--size_mb", type=int, default=256)
  ap.add_argument("--arrays", type=int, default=16)
  ap.add_argument("--repeats", type=int, default=5)
  ap.add_argument("--tmp", default=tempfile.gettempdir())
  args = ap.parse_args()
  if args.size_mb <= 0 or args.arrays <= 0 or args.repeats <= 0:
    raise SystemExit("--size_mb, --arrays and --repeats must be positive")
  per = args.size_mb * (1 << 20) // 4 // args.arrays
  rng = np.random.default_rng(0)
  tree = {
      f"layer_{k}": {"kernel": rng.standard_normal(per, np.float32)}
      for k in range(args.arrays)
  }
  with tempfile.TemporaryDirectory(dir=args.tmp) as d:
    path = os.path.join(d, "ckpt")
    t0 = time.perf_counter()
    checkpoint.save(path, tree)
    save_s = time.perf_counter() - t0
    checkpoint.restore(path)  # warm the page cache and the code paths
    times = {True: [], False: []}
    for _ in range(args.repeats):
      for verify in (True, False):
        t0 = time.perf_counter()
        out = checkpoint.restore(path, verify=verify)
        times[verify].append(time.perf_counter() - t0)
        del out
  on, off = statistics.median(times[True]), statistics.median(times[False])
  print(
      f"{args.arrays} float32 arrays, {args.size_mb} MB; save {save_s:.2f} s"
      f" (hashes included); restore, median of {args.repeats}:"
  )
  print(f"  verify=True  {on:.3f} s")
  print(f"  verify=False {off:.3f} s")
  print(f"  ratio restore-with-verify / restore-without: {on / off:.2f}")


if __name__ == "__main__":
  main()
