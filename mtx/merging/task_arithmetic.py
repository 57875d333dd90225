"""Task arithmetic: add the scaled task vectors to the pretrained model.

Reference:
  Ilharco et al., "Editing Models with Task Arithmetic", ICLR 2023.
  https://arxiv.org/abs/2212.04089
"""

from __future__ import annotations

from mtx.merging import _protocol


def _ta_leaf(static, tv, ctx):
  del static
  return _protocol.tsum(_protocol.scale_tasks(ctx.scale, tv))


@_protocol.method()
def task_arithmetic() -> _protocol.Merger:
  """Task arithmetic: ``θ0 + Σt λt τt`` with ``scale`` λ (scalar or ``[T]``).

  The paper picks one λ in {0.0, 0.05, ..., 1.0} on validation data
  (``scale`` is traced: sweep it with ``jax.vmap``).

  >>> import jax.numpy as jnp, mtx
  >>> pre = {"w": jnp.array([1.0, 1.0])}
  >>> fts = [{"w": jnp.array([2.0, 1.0])}, {"w": jnp.array([1.0, 3.0])}]
  >>> mtx.merging.merge(pre, fts, "task_arithmetic", scale=0.5)["w"].tolist()
  [1.5, 2.0]
  """
  return _protocol.Merger(
      "task_arithmetic", (), {}, _ta_leaf, per_task_scale=True, elementwise=True
  )
