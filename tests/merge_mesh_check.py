"""Merging checkpoints on a mesh of 8 faked CPU devices (own process).

  XLA_FLAGS=--xla_force_host_platform_device_count=8 \
    python tests/merge_mesh_check.py

Checks: streamed merges with every tensor loaded sharded on a data=4,model=2
mesh equal the host (unsharded) streamed merge and keep the layouts the rules
give; merge_on_mesh equals mtx.merging.merge and returns sharded leaves; the
binary's --mesh writes the same checkpoint as without it; bad shard rules
fail with the tensor named. Prints one line per check, "passed" at the end.
"""

import os
import sys
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top

import mtx  # pylint: disable=g-import-not-at-top
from mtx.io import safetensors as st  # pylint: disable=g-import-not-at-top
from mtx.io import streaming  # pylint: disable=g-import-not-at-top

P = jax.sharding.PartitionSpec
SHAPES = {
    "embed.weight": (48, 16),
    "layers.0.up.weight": (32, 16),
    "layers.0.norm.weight": (16,),
    "layers.1.up.weight": (32, 16),
    "odd.weight": (5, 3),
    "scalar": (),
}


def write_models(root, t=3):
  rng = np.random.default_rng(0)
  base = {
      k: np.asarray(rng.standard_normal(s), np.float32)
      for k, s in SHAPES.items()
  }
  paths = []
  for i in range(t + 1):
    tensors = (
        base
        if i == 0
        else {
            k: np.asarray(v + 0.2 * rng.standard_normal(v.shape), np.float32)
            for k, v in base.items()
        }
    )
    path = os.path.join(root, f"m{i}.safetensors")
    st.write(path, tensors)
    paths.append(path)
  return paths[0], paths[1:]


def _norm(spec):
  spec = list(spec)
  while spec and spec[-1] is None:
    spec.pop()
  return tuple(spec)


def check(name, ok, detail=""):
  print(f"{'ok  ' if ok else 'FAIL'} {name} {detail}")
  return 0 if ok else 1


def main() -> int:
  assert jax.device_count() == 8, jax.devices()
  failures = 0
  root = tempfile.mkdtemp()
  pre, fts = write_models(root)
  mesh = mtx.sharding.make_mesh((4, 2), ("data", "model"))
  rules = [(r"^embed", P("model", None))]
  cases = [
      ("task_arithmetic", {}, 0.4, True),
      ("ties", {"density": 0.3}, 1.0, True),
      ("dare", {"drop_rate": 0.3}, 0.5, True),
      ("model_stock", {}, 1.0, False),
  ]
  key = jax.random.key(0)
  for method, hp, scale, exact in cases:
    spec = streaming.Spec.of(method, hp, scales=[scale])
    host = dict(streaming.merge_tensors(pre, fts, spec, key=key))
    sharded = dict(
        streaming.merge_tensors(
            pre, fts, spec, key=key, mesh=mesh, shard_rules=rules
        )
    )
    for name, (x,) in sharded.items():
      want = np.asarray(host[name][0])
      got = np.asarray(x)
      same = (
          np.array_equal(got, want)
          if exact
          else np.allclose(got, want, rtol=1e-5, atol=1e-6)
      )
      failures += check(f"{method} {name} sharded == host", same)
      expect = (
          P("model", None)
          if name == "embed.weight"
          else streaming.default_spec(SHAPES[name], mesh)
      )
      spec_ok = _norm(x.sharding.spec) == _norm(expect)
      spans = len(x.sharding.device_set) == 8
      failures += check(
          f"{method} {name} sharding", spec_ok and spans, str(x.sharding.spec)
      )
  # Default layouts: model on the largest divisible axis, data on the next.
  failures += check(
      "default spec",
      streaming.default_spec((32, 16), mesh) == P("model", "data")
      and streaming.default_spec((5, 3), mesh) == P()
      and streaming.default_spec((16,), mesh) == P("model"),
  )
  # merge_on_mesh: in memory, on the mesh.
  merged = streaming.merge_on_mesh(
      pre, fts, "ties", mesh, rules=rules, density=0.3
  )
  want = mtx.merging.merge(
      st.read(pre), [st.read(f) for f in fts], "ties", density=0.3
  )
  for name, x in merged.items():
    failures += check(
        f"merge_on_mesh {name}",
        np.array_equal(np.asarray(x), np.asarray(want[name]))
        and len(x.sharding.device_set) == 8,
    )
  # Bad rules name the tensor.
  try:
    streaming.shardings_for(
        ["odd.weight"], [(5, 3)], mesh, [("odd", P("model"))]
    )
    failures += check("bad rule raises", False)
  except ValueError as e:
    failures += check("bad rule raises", "'odd.weight'" in str(e), str(e))
  # The binary with --mesh writes what it writes without.
  sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir))
  import importlib.util  # pylint: disable=g-import-not-at-top

  from absl import flags  # pylint: disable=g-import-not-at-top
  from absl.testing import flagsaver  # pylint: disable=g-import-not-at-top

  spec = importlib.util.spec_from_file_location(
      "merge_bin",
      os.path.join(os.path.dirname(__file__), "..", "experiments", "merge.py"),
  )
  binary = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(binary)
  flags.FLAGS.mark_as_parsed()
  outs = {}
  for mesh_flag in (None, "data=4,model=2"):
    out = os.path.join(root, f"out_{mesh_flag is not None}")
    with flagsaver.flagsaver(
        pretrained=pre,
        finetuned=fts,
        method="ties",
        hparam=["density=0.3"],
        out=out,
        mesh=mesh_flag,
        shard_rule=["^embed=model,None"] if mesh_flag else [],
    ):
      binary.main(["merge"])
    outs[mesh_flag] = st.read(out)
  a, b = outs[None], outs["data=4,model=2"]
  failures += check(
      "binary --mesh == no mesh",
      sorted(a) == sorted(b) and all(np.array_equal(a[k], b[k]) for k in a),
  )
  try:
    with flagsaver.flagsaver(
        pretrained=pre,
        finetuned=fts,
        method="ties",
        out=os.path.join(root, "x"),
        mesh="data=3,model=2",
    ):
      binary.main(["merge"])
    failures += check("wrong device count", False)
  except SystemExit as e:
    failures += check(
        "wrong device count",
        "needs 6 devices; 8 found" in str(e.code),
        str(e.code),
    )
  import shutil  # pylint: disable=g-import-not-at-top

  shutil.rmtree(root, ignore_errors=True)
  print("failed" if failures else "passed")
  return 1 if failures else 0


if __name__ == "__main__":
  sys.exit(main())
