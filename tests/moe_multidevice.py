"""Expert-parallel MoE on 8 faked CPU devices (run in its own process).

  XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/moe_multidevice.py

On a ``data=2 x expert=4`` mesh (explicit and auto axis types) checks that
``mtx.moe.sharded.apply`` equals the single-device layer with the same
groups (top-k with drops, random and expert-choice routing, shared experts,
both dispatch methods, two groups per device), that ``y`` is sharded over
``(data, expert)``, that the compiled forward pass has exactly two
all-to-alls, and that gradients match.
Prints one line per check and exits non-zero on the first failure.
"""

import os
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax
import jax.numpy as jnp
import numpy as np

import mtx
from mtx import moe

P = jax.sharding.PartitionSpec
D, F, E = 8, 16, 8


def make_params(seed, shared=False):
  rng = np.random.default_rng(seed)
  p = {
      "router": {"kernel": rng.normal(size=(D, E)).astype(np.float32)},
      "experts": {
          "wi": (rng.normal(size=(E, D, F)) / 3).astype(np.float32),
          "wo": (rng.normal(size=(E, F, D)) / 4).astype(np.float32),
      },
  }
  if shared:
    p["shared"] = {
        "wi": rng.normal(size=(D, F)).astype(np.float32) / 3,
        "wo": rng.normal(size=(F, D)).astype(np.float32) / 4,
    }
  return p


def count_all_to_all(hlo: str) -> int:
  return sum(" all-to-all(" in line for line in hlo.splitlines())


class Checks:

  def __init__(self):
    self.failures = 0

  def __call__(self, ok, what):
    self.failures += not ok
    print(("ok   " if ok else "FAIL ") + what)

  def close(self, got, want, what, atol=2e-5):
    err = float(np.max(np.abs(np.asarray(got) - np.asarray(want))))
    self(err <= atol, f"{what} (max err {err:.1e})")


def main() -> int:
  assert jax.device_count() == 8, jax.devices()
  check = Checks()
  x = np.random.default_rng(0).normal(size=(16, 6, D)).astype(np.float32)
  cases = [
      # (mesh kind, router, options)
      ("explicit", "top_k", {"capacity_factor": 0.5}),
      (
          "explicit",
          "random",
          {"capacity_factor": 1.0, "num_groups": 16, "dispatch": "einsum"},
      ),
      ("auto", "expert_choice", {"capacity_factor": 1.0}),
  ]
  meshes = {
      kind: mtx.sharding.make_mesh(
          (2, 4), ("data", "expert"), explicit=kind == "explicit"
      )
      for kind in ("explicit", "auto")
  }
  for kind, router, opts in cases:
    mesh = meshes[kind]
    p = make_params(1, shared=True)
    opts = dict(opts)
    dispatch = opts.pop("dispatch", "sort")
    kw = {"num_selected": 2, "router": router, "key": jax.random.key(3), **opts}
    want, aux_w = moe.apply(
        p, x, backend="sort", **{"num_groups": 8, **kw}
    )  # one group per device, as the sharded default
    ps = moe.sharded.shard_params(p, mesh)
    assert ps["experts"]["wi"].sharding.spec == P("expert")
    f = jax.jit(
        lambda p, x, kw=kw, mesh=mesh, dispatch=dispatch: moe.sharded.apply(
            p, x, mesh=mesh, dispatch=dispatch, **kw
        )
    )
    got, aux = f(ps, x)
    name = f"{kind:8s} {router:13s} {dispatch}"
    check.close(got, want, f"{name}: sharded == unsharded")
    for m in ("load_balance_loss", "drop_fraction", "expert_load"):
      check.close(aux[m], aux_w[m], f"{name}: aux {m}", atol=1e-5)
    spec = got.sharding.spec
    check(
        got.shape == x.shape and spec[0] == ("data", "expert"),
        f"{name}: y sharded over (data, expert) on axis 0 ({spec})",
    )
    n = count_all_to_all(f.lower(ps, x).compile().as_text())
    check(n == 2, f"{name}: {n} all-to-alls in the compiled forward")

  # Gradients through the all-to-alls equal the unsharded ones.
  mesh = meshes["explicit"]
  p = make_params(2)
  r = np.random.default_rng(4).normal(size=x.shape).astype(np.float32)
  kw = {"num_selected": 2, "capacity_factor": 0.5}

  def loss(p, fn):
    y, aux = fn(p)
    return jnp.sum(y * r) + aux["load_balance_loss"] + aux["router_z_loss"]

  g_want = jax.grad(
      lambda p: loss(
          p, lambda q: moe.apply(q, x, backend="sort", num_groups=8, **kw)
      )
  )(p)
  g_got = jax.jit(
      jax.grad(
          lambda p: loss(p, lambda q: moe.sharded.apply(q, x, mesh=mesh, **kw))
      )
  )(moe.sharded.shard_params(p, mesh))
  for path, gw, gg in zip(
      mtx.tree.paths(g_want), jax.tree.leaves(g_want), jax.tree.leaves(g_got)
  ):
    check.close(gg, gw, f"gradient {path}", atol=1e-4)

  # Configuration errors name the value.
  try:
    moe.sharded.apply(
        make_params(0), x, mesh=mtx.sharding.make_mesh((1, 8), ("data", "e")),
        num_selected=1, capacity_factor=1.0,
    )  # fmt: skip
    check(False, "missing mesh axis: no error")
  except ValueError as e:
    check("'expert'" in str(e), f"missing mesh axis: {e}")
  try:
    mesh3 = mtx.sharding.make_mesh((1, 8), ("data", "expert"))
    p6 = make_params(0)
    p6["experts"] = jax.tree.map(lambda a: a[:6], p6["experts"])
    p6["router"]["kernel"] = p6["router"]["kernel"][:, :6]
    moe.sharded.apply(p6, x, mesh=mesh3, num_selected=1, capacity_factor=1.0)
    check(False, "6 experts on 8 devices: no error")
  except ValueError as e:
    check("6 experts" in str(e), f"6 experts on 8 devices: {e}")
  # Local backends on an explicit-axis mesh with group-sharded tokens.
  mesh_e = mtx.sharding.make_mesh((8,), ("data",))
  xg = jax.random.normal(jax.random.key(5), (8, 12, x.shape[-1]))
  xg_s = jax.device_put(xg, jax.sharding.NamedSharding(mesh_e, P("data")))
  with jax.set_mesh(mesh_e):
    for backend in ("sort", "einsum"):
      f = jax.jit(
          lambda p, v, b=backend: moe.apply(
              p,
              v,
              num_selected=2,
              capacity_factor=1.0,
              backend=b,
              num_groups=8,
          )[0]
      )
      want = moe.apply(
          make_params(0),
          xg,
          num_selected=2,
          capacity_factor=1.0,
          backend=backend,
          num_groups=8,
      )[0]
      got = f(make_params(0), xg_s)
      check(
          np.allclose(got, want, atol=1e-5),
          f"{backend} on an explicit mesh differs",
      )
  print("passed" if not check.failures else f"{check.failures} failures")
  return 1 if check.failures else 0


if __name__ == "__main__":
  sys.exit(main())
