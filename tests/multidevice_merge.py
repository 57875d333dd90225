"""Sharded merging on 8 faked CPU devices (run in its own process).

  XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/multidevice_merge.py

Checks, for every registered method: merging params sharded on a 4x2 mesh
gives the unsharded result and keeps each leaf's sharding; the device
(bisection) top-k backend agrees with the host one; nothing is gathered onto
one device (every output leaf spans all 8 devices where its input did); and
the compiled per-leaf merge kernels contain no all-gather, except for the
methods that say in their docstrings that they gather a leaf (GATHERS).
Prints one line per check and exits non-zero on the first failure.
"""

import os
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax
import jax.numpy as jnp
import numpy as np

import mtx
from mtx import _select

P = jax.sharding.PartitionSpec


def make_params(key):
  k = jax.random.split(key, 4)
  return {
      "layers_0": {
          "kernel": jax.random.normal(k[0], (16, 8)),
          "bias": jax.random.normal(k[1], (8,)),
      },
      "layers_1": {"kernel": jax.random.normal(k[2], (8, 16))},
      "scale": jax.random.normal(k[3], ()),
  }


RULES = [
    (r"layers_0/kernel$", P("data", "model")),
    (r"bias$", P("model")),
    (r"layers_1/kernel$", P("model", "data")),
]


def shard(tree, mesh):
  return mtx.sharding.shard(tree, mesh, RULES)


# Methods whose docstrings say they gather a 2-D leaf (an SVD or a linear
# solve needs the whole matrix); every other method's compiled kernels hold
# no all-gather.
GATHERS = {"tsvm", "iso_c", "regmean"}


class CountGathers:
  """Wraps the per-leaf merge kernel; counts all-gathers in its compiled HLO
  for every call on sharded arrays."""

  def __init__(self):
    self.module = mtx.merging._driver  # pylint: disable=protected-access
    self.kernel = self.module._merge_leaf  # pylint: disable=protected-access
    self.count = 0

  def __enter__(self):
    kernel = self.kernel

    def counted(leaf_fn, static, sharding, *args):
      if sharding is not None:
        hlo = kernel.lower(leaf_fn, static, sharding, *args).compile()
        self.count += hlo.as_text().count("all-gather-start") or (
            hlo.as_text().count(" all-gather(")
        )
      return kernel(leaf_fn, static, sharding, *args)

    self.module._merge_leaf = counted  # pylint: disable=protected-access
    return self

  def __exit__(self, *exc):
    self.module._merge_leaf = self.kernel  # pylint: disable=protected-access


def hparams(name, fts):
  if name == "fisher":
    return {"fishers": [jax.tree.map(lambda x: x * x, f) for f in fts]}
  if name == "regmean":
    return {
        "grams": [
            {"layers_0/kernel": jnp.eye(16) * (i + 1)} for i in range(len(fts))
        ]
    }
  if name == "dare":
    return {"then": "ties", "density": 0.3}
  return {}


def main() -> int:
  assert jax.device_count() == 8, jax.devices()
  base = make_params(jax.random.key(0))
  fts = [
      jax.tree.map(
          lambda x, i=i: x
          + 0.3
          * jax.random.normal(
              jax.random.fold_in(jax.random.key(1), i), x.shape
          ),
          base,
      )
      for i in range(3)
  ]
  failures = 0
  for axis_type in ("explicit", "auto"):
    types = {
        "explicit": (jax.sharding.AxisType.Explicit,) * 2,
        "auto": (jax.sharding.AxisType.Auto,) * 2,
    }[axis_type]
    mesh = mtx.sharding.make_mesh(
        (4, 2), ("data", "model"), explicit=axis_type == "explicit"
    )
    assert mesh.axis_types == types
    pre_s = shard(base, mesh)
    fts_s = [shard(f, mesh) for f in fts]
    for name in mtx.merging.METHODS:
      f_u = fts[:2] if name == "slerp" else fts
      f_s = fts_s[:2] if name == "slerp" else fts_s
      key = jax.random.key(2)
      hp = hparams(name, f_u)
      try:
        want = mtx.merging.merge(base, f_u, name, key=key, **hp)
        with (
            jax.sharding.use_mesh(mesh)
            if hasattr(jax.sharding, "use_mesh")
            else jax.set_mesh(mesh)
        ):
          with CountGathers() as gathers:
            got = mtx.merging.merge(pre_s, f_s, name, key=key, **hp)
        if (gathers.count > 0) != (name in GATHERS):
          raise AssertionError(
              f"{gathers.count} all-gathers in the compiled merge kernels; "
              f"expected {'some' if name in GATHERS else 'none'}"
          )
        for p, w, g, s in zip(
            mtx.tree.paths(want),
            jax.tree.leaves(want),
            jax.tree.leaves(got),
            jax.tree.leaves(pre_s),
        ):
          np.testing.assert_allclose(
              np.asarray(g),
              np.asarray(w),
              rtol=2e-5,
              atol=2e-5,
              err_msg=f"{name} {p}",
          )
          assert g.sharding.is_equivalent_to(
              s.sharding, g.ndim
          ), f"{name} {p}: sharding {g.sharding} != {s.sharding}"
        print(f"ok   {axis_type:8s} {name} ({gathers.count} all-gathers)")
      except Exception as e:  # report every method, then fail
        failures += 1
        print(f"FAIL {axis_type:8s} {name}: {type(e).__name__}: {e}")
  # The two exact top-k backends agree (ties and signs included).
  x = jnp.round(jax.random.normal(jax.random.key(3), (3, 4000)) * 50) / 50
  mesh = jax.make_mesh((8,), ("d",))
  xs = jax.device_put(x, jax.sharding.NamedSharding(mesh, P(None, "d")))
  for k in (1, 7, 800, 3999, 4000):
    for absolute in (True, False):
      f = jnp.abs if absolute else (lambda v: v)
      host = _select.global_kth_largest_host(
          lambda i, f=f: tuple(f(x)), [4000], np.full(3, k)
      )
      dev = _select.global_kth_largest_device([tuple(f(xs))], jnp.full((3,), k))
      if not np.array_equal(host, np.asarray(dev)):
        failures += 1
        print(f"FAIL select k={k} abs={absolute}: host {host} device {dev}")
      else:
        print(f"ok   select k={k} abs={absolute}")
  # A linearised model on sharded params equals the unsharded one.
  mesh = mtx.sharding.make_mesh((4, 2), ("data", "model"), explicit=False)
  model = (
      lambda p, x: jnp.tanh(x @ p["layers_0"]["kernel"])
      @ p["layers_1"]["kernel"]
  )
  x = jax.random.normal(jax.random.key(4), (4, 16))
  f = jax.jit(mtx.ntk.linearize(model))
  want = f(base, fts[0], x)
  got = f(shard(base, mesh), shard(fts[0], mesh), x)
  if np.allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5):
    print("ok   linearize sharded == unsharded")
  else:
    failures += 1
    print("FAIL linearize sharded != unsharded")
  # Rules that do not fit a leaf are rejected with its path.
  try:
    mtx.sharding.shard(base, mesh, [(r"^scale$", P("d"))])
    failures += 1
    print("FAIL sharding rule check: no error")
  except ValueError as e:
    ok = "'scale'" in str(e)
    failures += not ok
    print(("ok  " if ok else "FAIL") + f" sharding rule check: {e}")
  print("passed" if not failures else f"{failures} failures")
  return 1 if failures else 0


if __name__ == "__main__":
  sys.exit(main())
