r"""Mixture-of-experts: routers, layers, expert parallelism, LoRA experts.

Axis letters, used as array-name suffixes throughout (as in V-MoE):

  ==  =====================================================================
  G   groups: tokens are routed independently per group; capacity is per
      group (one group per device in the expert-parallel layer)
  S   tokens per group
  E   experts
  C   capacity: buffer slots per expert and group (soft MoE: slots per
      expert)
  K   experts selected per token (``num_selected``)
  T   tasks (task-conditioned routers, experts built from T models)
  D   model width;  F  expert hidden width
  ==  =====================================================================

Entry point (every backend sits behind it)::

  y, aux = mtx.moe.apply(params, x, num_selected=2, capacity_factor=1.25,
                         router="top_k", backend="sort")

with ``params = {"router": {"kernel": [D, E]}, "experts": {"wi": [E, D, F],
"wo": [E, F, D]}}``. Capacity is ``ceil(capacity_factor * S * K / E)``
rounded up to a multiple of 4 (:func:`capacity`); the load-balance loss is
normalised so that uniform routing gives exactly 1.0; router math is float32.
Add :func:`aux_loss` (load balance x 1e-2 + z-loss x 1e-3) to the task loss.

Modules:
  routing: pure routers (top-k / Switch / GShard, expert choice, soft MoE,
    hash, random, task-conditioned logits) and their metrics.
  assignment: what the routers share: routing layouts, capacity, losses,
    buffer-slot assignment.
  dispatch: what both layers share: option checks, the routing plan and
    call, dispatch/combine pairs, the expert MLP.
  layer: :func:`apply` with the ``einsum``, ``sort`` and ``ragged`` backends.
  sharded: expert parallelism with ``jax.shard_map`` + ``all_to_all``.
  lora: rank-wise MoE-LoRA and LoRA-experts layers on any linear kernel.
  upcycle: dense MLP -> MoE, MoE from fine-tuned models (MergeKit gate
    modes), expert pruning by usage.

>>> import jax, numpy as np, mtx
>>> p = mtx.moe.init(jax.random.key(0), d_model=8, hidden=16, num_experts=4)
>>> x = np.cos(np.arange(96.0)).reshape(2, 6, 8)  # 12 tokens of width 8
>>> y, aux = mtx.moe.apply(p, x, num_selected=2, capacity_factor=1.25)
>>> y.shape, aux["capacity"], sorted(aux)[:3]
((2, 6, 8), 8, ['capacity', 'drop_fraction', 'expert_fill'])
"""

from mtx.moe import assignment
from mtx.moe import dispatch
from mtx.moe import layer
from mtx.moe import lora
from mtx.moe import routing
from mtx.moe import sharded
from mtx.moe import upcycle
from mtx.moe.layer import ACTIVATIONS
from mtx.moe.layer import BACKENDS
from mtx.moe.layer import ROUTERS
from mtx.moe.layer import apply
from mtx.moe.layer import expert_mlp
from mtx.moe.layer import init
from mtx.moe.routing import aux_loss
from mtx.moe.routing import capacity

__all__ = [
    "assignment",
    "ACTIVATIONS",
    "BACKENDS",
    "ROUTERS",
    "apply",
    "aux_loss",
    "capacity",
    "dispatch",
    "expert_mlp",
    "init",
    "layer",
    "lora",
    "routing",
    "sharded",
    "upcycle",
]
