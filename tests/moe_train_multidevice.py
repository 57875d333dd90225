"""MoE transformer on 8 faked CPU devices (run in its own process).

  XLA_FLAGS=--xla_force_host_platform_device_count=8 \
      python tests/moe_train_multidevice.py

On a ``data=2 x expert=4`` mesh with explicit axis types checks that
the expert-parallel MoE transformer's loss, aux losses and gradients equal
the single-device model's (``backend="sort"``, same routing groups), that
the params are placed as ``param_shardings`` says (experts' ``E`` on
``expert``, the rest replicated) and that gradients and a jitted update
keep those shardings. (The binary's auto-axis mesh is compared with one device in
tests/test_moe_train.py.) Prints one line per check and exits non-zero on a
failure.
"""

import dataclasses
import os
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax
import numpy as np

import mtx
from mtx.models import moe_transformer as mt

P = jax.sharding.PartitionSpec


class Checks:

  def __init__(self):
    self.failures = 0

  def __call__(self, ok, what):
    self.failures += not ok
    print(("ok   " if ok else "FAIL ") + what, flush=True)

  def close(self, got, want, what, atol=1e-5):
    err = float(np.max(np.abs(np.asarray(got) - np.asarray(want))))
    self(err <= atol, f"{what} (max err {err:.1e})")


def main() -> int:
  assert jax.device_count() == 8, jax.devices()
  check = Checks()
  # capacity 1.0 with top-2 of 8 experts: some tokens are dropped, so the
  # sharded layer's capacity bookkeeping is exercised too.
  config = dataclasses.replace(
      mt.CONFIGS["tiny"], num_layers=2, capacity_factor=1.0
  )
  tokens = jax.random.randint(jax.random.key(1), (16, 9), 0, 128)
  ref = mt.model(config)
  params = ref.init(jax.random.key(0))

  def loss_and_aux(model):
    def f(p, t):
      return mt.next_token_loss(model.apply, p, t, train=True)

    return jax.jit(jax.value_and_grad(f, has_aux=True))

  (want, aux_w), g_want = loss_and_aux(ref)(params, tokens)
  check(float(aux_w["drop_fraction"]) > 0, "reference drops some tokens")
  for kind in ("explicit",):
    mesh = mtx.sharding.make_mesh(
        (2, 4), ("data", "expert"), explicit=kind == "explicit"
    )
    sharded = mt.model(
        dataclasses.replace(config, backend="expert_parallel"), mesh=mesh
    )
    shardings = mt.param_shardings(params, mesh)
    ps = jax.device_put(params, shardings)
    wi = ps["block_1"]["moe"]["experts"]["wi"]
    check(
        wi.sharding.spec == P("expert")
        and wi.addressable_shards[0].data.shape == (2, 32, 64)
        and ps["block_0"]["mlp"]["wi"].sharding.spec == P(),
        f"{kind}: experts split over 'expert' (E=8 -> 2 per device), rest"
        " replicated",
    )
    x = jax.device_put(tokens, mt.batch_sharding(mesh))
    with jax.set_mesh(mesh):
      (got, aux), g_got = loss_and_aux(sharded)(ps, x)
    check.close(got, want, f"{kind}: sharded loss == unsharded")
    for k in ("cross_entropy", "load_balance_loss", "drop_fraction"):
      check.close(aux[k], aux_w[k], f"{kind}: aux {k}")
    check.close(
        aux["layers"]["block_1"]["expert_load"],
        aux_w["layers"]["block_1"]["expert_load"],
        f"{kind}: expert_load",
    )
    errs = {
        path: float(np.max(np.abs(np.asarray(gg) - np.asarray(gw))))
        for path, gw, gg in zip(
            mtx.tree.paths(g_want),
            jax.tree.leaves(g_want),
            jax.tree.leaves(g_got),
        )
    }
    worst = max(errs, key=errs.get)
    check(
        errs[worst] <= 2e-5,
        f"{kind}: gradients == unsharded ({len(errs)} leaves, max err"
        f" {errs[worst]:.1e} at {worst})",
    )
    # Gradients come back in the params' layout; a jitted update keeps it.
    with jax.set_mesh(mesh):
      new = jax.jit(lambda p, g: jax.tree.map(lambda a, b: a - 0.1 * b, p, g))(
          ps, g_got
      )
    for name, tree in (("gradients", g_got), ("updated params", new)):
      same = jax.tree.leaves(
          jax.tree.map(
              lambda a, s: a.sharding.is_equivalent_to(s, a.ndim),
              tree,
              shardings,
          )
      )
      check(all(same), f"{kind}: {name} have the param shardings")

  print("passed" if not check.failures else f"{check.failures} failures")
  return 1 if check.failures else 0


if __name__ == "__main__":
  sys.exit(main())
