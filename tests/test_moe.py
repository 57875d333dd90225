"""mtx.moe: routers, backends, LoRA experts and upcycling vs numpy references.

Params come from numpy (no RNG kernels to compile) and shapes are tiny; each
distinct (router, backend, shape) compiles one program, so cases share
shapes where they can.
"""

import ast
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mtx
from mtx import moe
from mtx.moe import lora
from mtx.moe import routing
from mtx.moe import upcycle

D, F, E = 8, 16, 4
ATOL = 2e-5


def make_params(seed=0, d=D, f=F, e=E, width=None, shared=0):
  rng = np.random.default_rng(seed)
  p = {
      "router": {"kernel": rng.normal(size=(d, width or e)).astype(np.float32)},
      "experts": {
          "wi": (rng.normal(size=(e, d, f)) / math.sqrt(d)).astype(np.float32),
          "wo": (rng.normal(size=(e, f, d)) / math.sqrt(f)).astype(np.float32),
      },
  }
  if shared:
    p["shared"] = {
        "wi": rng.normal(size=(shared, d, f)).astype(np.float32),
        "wo": rng.normal(size=(shared, f, d)).astype(np.float32),
    }
  return p


def tokens(seed=1, shape=(3, 8, D)):
  return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


# ----------------------------------------------------------------------------
# numpy references.


def npt(tree):
  """Results as numpy (no eager JAX ops, hence no compiles, in the checks)."""
  return jax.tree.map(np.asarray, tree)


def np_softmax(z, axis=-1):
  z = z - z.max(axis=axis, keepdims=True)
  ez = np.exp(z)
  return ez / ez.sum(axis=axis, keepdims=True)


def np_mlp(wi, wo, x):
  return np.maximum(x @ wi, 0.0) @ wo


def ref_top_k(logits_GSE, k, capacity, *, normalize=None, bpr=False):
  """Per-token top-k with capacity: first choices first, then by priority."""
  g, s, e = logits_GSE.shape
  probs = np_softmax(logits_GSE.astype(np.float64))
  idx = np.zeros((g, s, k), int)
  w = np.zeros((g, s, k))
  kept = np.zeros((g, s, k), bool)
  normalize = k > 1 if normalize is None else normalize
  for gi in range(g):
    order = np.argsort(-probs[gi], axis=-1, kind="stable")[:, :k]
    gates = np.take_along_axis(probs[gi], order, -1)
    if normalize:
      gates = gates / gates.sum(-1, keepdims=True)
    idx[gi] = order
    token_order = (
        np.argsort(-probs[gi].max(-1), kind="stable") if bpr else np.arange(s)
    )
    count = np.zeros(e, int)
    for kk in range(k):
      for t in token_order:
        ex = order[t, kk]
        if capacity is None or count[ex] < capacity:
          kept[gi, t, kk] = True
          w[gi, t, kk] = gates[t, kk]
          count[ex] += 1
  return idx, w, kept, probs


def ref_token_choice_y(params, x_GSD, idx, w):
  wi = params["experts"]["wi"].astype(np.float64)
  wo = params["experts"]["wo"].astype(np.float64)
  y = np.zeros(x_GSD.shape)
  for g, s, k in np.ndindex(*idx.shape):
    if w[g, s, k] != 0:
      e = idx[g, s, k]
      y[g, s] += w[g, s, k] * np_mlp(wi[e], wo[e], x_GSD[g, s].astype(float))
  return y


def np_logits(params, x_GSD):
  return x_GSD.astype(np.float64) @ params["router"]["kernel"].astype(
      np.float64
  )


# ----------------------------------------------------------------------------
# Capacity, losses, hand-checked routing.


def test_capacity_formula():
  assert moe.capacity(8192, 8, 2, 1.25) == 2560
  assert moe.capacity(10, 4, 1, 1.0) == 4  # ceil(2.5) = 3 -> 4
  assert moe.capacity(100, 4, 2, 1.0) == 52  # 50 -> 52
  assert moe.capacity(6, 4, 1, None) == 6
  with pytest.raises(ValueError, match="capacity_factor.*-1"):
    moe.capacity(10, 4, 1, -1.0)
  with pytest.raises(ValueError, match="num_experts.*0"):
    moe.capacity(10, 0, 1, 1.0)


def test_load_balance_and_z_loss_by_hand():
  def metrics(logits):  # every case: [1, 2, 2], k = 1, capacity 4
    r = routing.top_k_routing(
        jnp.asarray(logits, jnp.float32), num_selected=1, capacity=4
    )
    return jax.tree.map(np.asarray, r.metrics)

  # Uniform probabilities: the loss is 1 whatever gets picked.
  assert metrics(np.zeros((1, 2, 2)))["load_balance_loss"] == 1.0
  # Uniform assignment fractions: 1 whatever the probabilities.
  m = metrics([[[3.0, 0.0], [0.0, 1.0]]])
  np.testing.assert_allclose(m["load_balance_loss"], 1.0, rtol=1e-6)
  # All tokens on expert 0 with p0 = 0.8: E * (1 * 0.8) = 1.6.
  m = metrics(np.log([[[0.8, 0.2]] * 2]))
  np.testing.assert_allclose(m["load_balance_loss"], 1.6, rtol=1e-6)
  np.testing.assert_allclose(m["expert_load"], [1.0, 0.0])
  np.testing.assert_allclose(m["expert_fill"], [0.5, 0.0])
  np.testing.assert_allclose(m["drop_fraction"], 0.0)
  # z-loss: mean_tokens logsumexp(logits)^2 = (ln(2)^2 + ln(4)^2) / 2.
  m = metrics([[[0.0, 0.0], [math.log(3.0), 0.0]]])
  want = (math.log(2.0) ** 2 + math.log(4.0) ** 2) / 2
  np.testing.assert_allclose(m["router_z_loss"], want, rtol=1e-6)
  # Both tokens on expert 0; P_0 = (1/2 + 3/4) / 2: loss 2 * 0.625.
  np.testing.assert_allclose(m["load_balance_loss"], 1.25, rtol=1e-6)
  np.testing.assert_allclose(
      routing.aux_loss(m), 1e-2 * 1.25 + 1e-3 * want, rtol=1e-5
  )


def test_drops_and_batch_priority_by_hand():
  # 5 tokens, 2 experts, capacity 2. Gates p0: .6 .9 .7 .2 .95
  p0 = np.array([0.6, 0.9, 0.7, 0.2, 0.95])
  logits = np.log(np.stack([p0, 1 - p0], -1))[None].astype(np.float32)
  r = npt(routing.top_k_routing(logits, num_selected=1, capacity=2))
  # Sequence order: tokens 0, 1 fill expert 0; 2 and 4 are dropped.
  assert r.expert_index[0, :, 0].tolist() == [0, 0, 0, 1, 0]
  assert r.kept[0, :, 0].tolist() == [True, True, False, True, False]
  assert r.position[0, :, 0].tolist() == [0, 1, 2, 0, 3]
  np.testing.assert_allclose(r.weight[0, :, 0], [0.6, 0.9, 0, 0.8, 0], 1e-6)
  np.testing.assert_allclose(r.metrics["drop_fraction"], 2 / 5)
  np.testing.assert_allclose(r.metrics["expert_load"], [0.8, 0.2])
  np.testing.assert_allclose(r.metrics["expert_fill"], [1.0, 0.5])
  # BPR: by decreasing top gate (4: .95, 1: .9, 3: .8, 2: .7, 0: .6).
  r = npt(
      routing.top_k_routing(
          logits, num_selected=1, capacity=2, batch_priority=True
      )
  )
  assert r.kept[0, :, 0].tolist() == [False, True, False, True, True]
  assert r.position[0, :, 0].tolist() == [3, 1, 2, 0, 0]


def test_second_choices_queue_behind_first_choices():
  # 3 tokens all prefer expert 0 then 1; capacity 2. Expert 0: tokens 0, 1
  # (first choices). Expert 1 gets token 2's first choice before any
  # second choice, then token 0's second choice; 1 and 2 miss out.
  logits = np.array([[[2.0, 1.0, 0.0], [2.0, 1.0, 0.0], [0.0, 2.0, 1.0]]])
  r = npt(routing.top_k_routing(logits, num_selected=2, capacity=2))
  assert r.expert_index[0].tolist() == [[0, 1], [0, 1], [1, 2]]
  assert r.kept[0].tolist() == [[True, True], [True, False], [True, True]]
  assert r.position[0].tolist() == [[0, 1], [1, 2], [0, 0]]
  # Renormalised top-2 gates (GShard / Mixtral).
  g = 1 / (1 + math.exp(-1))
  np.testing.assert_allclose(r.weight[0, 0], [g, 1 - g], rtol=1e-6)


def test_gshard_random_second_expert():
  key = jax.random.key(0)
  # g2 ~ 0: never dispatched; g1 = g2: 2 g2 = 1 > u, always dispatched.
  far = np.array([[[30.0, 0.0, -30.0]] * 16], np.float32)
  r = routing.top_k_routing(
      far, num_selected=2, capacity=None, second_expert_policy="random", key=key
  )
  kept = np.asarray(r.kept)
  assert not kept[..., 1].any() and kept[..., 0].all()
  tie = np.zeros((1, 16, 3), np.float32)
  tie[..., 2] = -5.0
  r = routing.top_k_routing(
      tie, num_selected=2, capacity=None, second_expert_policy="random", key=key
  )
  assert np.asarray(r.kept).all()
  with pytest.raises(ValueError, match="key"):
    routing.top_k_routing(
        tie, num_selected=2, capacity=None, second_expert_policy="random"
    )
  with pytest.raises(ValueError, match="num_selected is 1"):
    routing.top_k_routing(
        tie, num_selected=1, capacity=4, second_expert_policy="random", key=key
    )


def test_noisy_gating_needs_a_key_and_is_deterministic():
  logits = tokens(2, (1, 16, 4))
  kw = {"num_selected": 1, "capacity": None, "noise_std": 1.0}
  with pytest.raises(ValueError, match="key"):
    routing.top_k_routing(logits, **kw)
  a, b, c = (
      jax.tree.map(np.asarray, routing.top_k_routing(logits, key=k, **kw))
      for k in (jax.random.key(1), jax.random.key(1), jax.random.key(2))
  )
  np.testing.assert_array_equal(a.expert_index, b.expert_index)
  assert not np.array_equal(a.expert_index, c.expert_index)
  clean = np.argmax(logits, -1)[..., None]
  assert not np.array_equal(a.expert_index, clean)
  # Gates are the noisy probabilities; the z-loss uses the clean logits.
  np.testing.assert_allclose(a.weight, a.probs.max(-1, keepdims=True), 1e-6)
  lse = np.log(np.exp(logits.astype(np.float64)).sum(-1))
  np.testing.assert_allclose(a.metrics["router_z_loss"], np.mean(lse**2), 1e-5)


def test_hash_routing():
  ids = jnp.asarray(np.arange(400).reshape(2, 200) % 97)
  r = routing.hash_routing(
      np.zeros((2, 200, 4), np.float32), ids, num_selected=2, capacity=None
  )
  idx = np.asarray(r.expert_index)
  assert (idx[..., 1] == (idx[..., 0] + 1) % 4).all()
  first = {}
  for t, e in zip(np.asarray(ids).ravel(), idx[..., 0].ravel()):
    assert first.setdefault(int(t), int(e)) == e  # same id, same expert
  load = np.asarray(r.metrics["expert_load"])
  assert load.min() > 0.15 and load.max() < 0.35, load
  np.testing.assert_allclose(r.weight, 0.5)


def test_task_conditioned_logits():
  rng = np.random.default_rng(4)
  x = rng.normal(size=(1, 6, D)).astype(np.float32)
  kernels = rng.normal(size=(3, D, E)).astype(np.float32)
  emb = rng.normal(size=(3, D)).astype(np.float32)
  ids = np.array([[0, 2, 1, 1, 0, 2]])
  got = routing.router_logits({"kernel": kernels}, x, task_ids_GS=ids)
  want = np.stack([x[0, s] @ kernels[ids[0, s]] for s in range(6)])[None]
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  got = routing.router_logits(
      {"kernel": kernels[0], "task_embedding": emb}, x, task_ids_GS=ids
  )
  np.testing.assert_allclose(
      got, (x + emb[ids]) @ kernels[0], rtol=1e-5, atol=1e-5
  )
  with pytest.raises(ValueError, match="task_ids"):
    routing.router_logits({"kernel": kernels}, x)


# ----------------------------------------------------------------------------
# The layer: every backend against the per-token reference.

CASES = {
    # name: (num_selected, capacity_factor, num_groups, batch_priority)
    "top2_drops": (2, 0.5, 3, False),
    "top1_dropless": (1, None, 1, False),
    "top2_bpr": (2, 0.75, 1, True),
}


# The config of the "top2_drops" / "sort" case: later tests reuse its program.
KW = {
    "num_selected": 2,
    "capacity_factor": 0.5,
    "backend": "sort",
    "num_groups": 3,
    "activation": "relu",
}


def ref_kw(p, x, g=3):  # numpy reference for KW
  x_GSD = x.reshape(g, -1, D)
  c = moe.capacity(x_GSD.shape[1], E, 2, 0.5)
  idx, w, _, _ = ref_top_k(np_logits(p, x_GSD), 2, c)
  return ref_token_choice_y(p, x_GSD, idx, w).reshape(x.shape)


LOCAL_BACKENDS = ("einsum", "sort", "ragged")


def all_backends(p, x, **kw):
  """``apply`` with every local backend, in one compiled program."""
  return jax.jit(
      lambda p, x: {b: moe.apply(p, x, backend=b, **kw) for b in LOCAL_BACKENDS}
  )(p, x)


@pytest.mark.parametrize("case", sorted(CASES))
def test_top_k_backends_match_reference(case):
  k, cf, g, bpr = CASES[case]
  p, x = make_params(), tokens()
  out = all_backends(
      p,
      x,
      num_selected=k,
      capacity_factor=cf,
      num_groups=g,
      batch_priority=bpr,
      activation="relu",
  )
  x_GSD = x.reshape(g, -1, D)
  s = x_GSD.shape[1]
  c = None if cf is None else moe.capacity(s, E, k, cf)
  idx, w, kept, probs = ref_top_k(np_logits(p, x_GSD), k, c, bpr=bpr)
  want = ref_token_choice_y(p, x_GSD, idx, w).reshape(x.shape)
  routed = np.bincount(idx.ravel(), minlength=E) / idx.size
  want_lb = np.mean(
      [E * np.sum(np.bincount(idx[i].ravel(), minlength=E) / idx[i].size
                  * probs[i].mean(0)) for i in range(g)]
  )  # fmt: skip
  for backend, (y, aux) in out.items():
    err = f"{case} {backend}"
    np.testing.assert_allclose(y, want, atol=ATOL, rtol=1e-4, err_msg=err)
    assert int(aux["capacity"]) == (s if c is None else c), err
    np.testing.assert_allclose(aux["expert_load"], routed, rtol=1e-6)
    np.testing.assert_allclose(
        aux["drop_fraction"], 1 - kept.mean(), atol=1e-6, err_msg=err
    )
    np.testing.assert_allclose(aux["load_balance_loss"], want_lb, rtol=1e-5)
  if case != "top1_dropless":
    assert 0 < 1 - kept.mean() < 1  # the case really drops


def test_expert_choice_backends_match_reference():
  p, x = make_params(), tokens()
  out = all_backends(
      p,
      x,
      num_selected=1,
      capacity_factor=1.0,
      router="expert_choice",
      activation="relu",
  )
  x_GSD = x.reshape(1, -1, D)
  probs = np_softmax(np_logits(p, x_GSD))[0]
  c = 8  # 24 tokens, 4 experts, factor 1
  wi, wo = p["experts"]["wi"], p["experts"]["wo"]
  want = np.zeros(x_GSD.shape[1:])
  chosen = np.zeros(24, bool)
  for e in range(E):
    for t in np.argsort(-probs[:, e], kind="stable")[:c]:
      want[t] += probs[t, e] * np_mlp(wi[e], wo[e], x_GSD[0, t])
      chosen[t] = True
  for backend, (y, aux) in out.items():
    assert int(aux["capacity"]) == c
    np.testing.assert_allclose(
        y, want.reshape(x.shape), atol=ATOL, rtol=1e-4, err_msg=backend
    )
    np.testing.assert_allclose(aux["drop_fraction"], 1 - chosen.mean())


def test_soft_moe_matches_reference():
  p, x = make_params(width=2 * E), tokens()  # 2 slots per expert
  y, aux = moe.apply(
      p, x, num_selected=1, capacity_factor=None, router="soft",
      activation="relu",
  )  # fmt: skip
  assert aux["capacity"] == 2
  logits = np_logits(p, x.reshape(1, -1, D))[0]  # [S, E * 2]
  disp = np_softmax(logits, axis=0).reshape(-1, E, 2)
  comb = np_softmax(logits, axis=1).reshape(-1, E, 2)
  slots = np.einsum("sec,sd->ecd", disp, x.reshape(-1, D))
  wi, wo = p["experts"]["wi"], p["experts"]["wo"]
  out = np.stack([np_mlp(wi[e], wo[e], slots[e]) for e in range(E)])
  want = np.einsum("sec,ecd->sd", comb, out).reshape(x.shape)
  np.testing.assert_allclose(y, want, atol=ATOL, rtol=1e-4)


@pytest.mark.parametrize("router", ["hash", "random"])
def test_hash_and_random_layers_match_their_routing(router):
  p, x = make_params(), tokens()
  key = jax.random.key(5)
  y, aux = moe.apply(
      p, x, num_selected=2, capacity_factor=1.0, router=router, key=key,
      backend="sort", activation="relu",
  )  # fmt: skip
  x_GSD = x.reshape(1, -1, D)
  c = aux["capacity"]
  if router == "hash":  # murmur3 finaliser of the flat token position
    h = np.arange(24, dtype=np.uint32)
    h = (h ^ (h >> 16)) * np.uint32(0x85EBCA6B)
    h = (h ^ (h >> 13)) * np.uint32(0xC2B2AE35)
    h = (h ^ (h >> 16)) % E
    idx = np.stack([h, (h + 1) % E], -1).astype(int)[None]
    count = np.zeros(E, int)
    kept = np.zeros(idx.shape, bool)
    for kk in range(2):
      for t in range(24):
        if count[idx[0, t, kk]] < c:
          kept[0, t, kk] = True
          count[idx[0, t, kk]] += 1
    r = routing.TokenChoice(idx, None, np.where(kept, 0.5, 0.0), kept, None, {})
  else:  # apply folds the group index into the key
    keys = jax.vmap(jax.random.fold_in, (None, 0))  # as apply: per group
    route = lambda k: npt(routing.random_routing(
        np_logits(p, x_GSD), keys(k, np.zeros(1, np.int32)),
        num_selected=2, capacity=c,
    ))  # fmt: skip
    r = route(key)
    again, other = route(key), route(jax.random.key(6))
    np.testing.assert_array_equal(r.expert_index, again.expert_index)
    assert not np.array_equal(r.expert_index, other.expert_index)
    assert (r.expert_index[..., 0] != r.expert_index[..., 1]).all()
    assert r.metrics["expert_load"].min() > 0.1
  want = ref_token_choice_y(p, x_GSD, r.expert_index, r.weight)
  np.testing.assert_allclose(y, want.reshape(x.shape), atol=ATOL, rtol=1e-4)
  np.testing.assert_allclose(r.weight[r.kept], 0.5)


def test_task_routing_layer():
  rng = np.random.default_rng(6)
  p = make_params()
  p["router"]["kernel"] = rng.normal(size=(2, D, E)).astype(np.float32)
  x = tokens()
  task_ids = np.array([0, 1, 1])[:, None]  # one task per sequence
  y, _ = moe.apply(
      p, x, num_selected=2, capacity_factor=None, task_ids=task_ids,
      backend="sort", activation="relu",
  )  # fmt: skip
  ids = np.broadcast_to(task_ids, x.shape[:-1]).reshape(1, -1)
  x_GSD = x.reshape(1, -1, D)
  logits = np.einsum("gsd,gsde->gse", x_GSD, p["router"]["kernel"][ids])
  idx, w, _, _ = ref_top_k(logits, 2, None)
  want = ref_token_choice_y(p, x_GSD, idx, w).reshape(x.shape)
  np.testing.assert_allclose(y, want, atol=ATOL, rtol=1e-4)
  with pytest.raises(ValueError, match="task_ids"):
    moe.apply(p, x, num_selected=2, capacity_factor=None)


def test_shared_experts_are_added():
  p = make_params(shared=2)
  x = tokens()
  y, _ = moe.apply(p, x, **KW)
  routed, _ = moe.apply({k: v for k, v in p.items() if k != "shared"}, x, **KW)
  s = p["shared"]
  want = sum(np_mlp(s["wi"][n], s["wo"][n], x) for n in range(2))
  np.testing.assert_allclose(y - routed, want, atol=1e-4, rtol=1e-4)


def test_expert_parallel_on_one_device_equals_sort():
  p, x = make_params(), tokens()
  mesh = mtx.sharding.make_mesh((1, 1), ("data", "expert"))
  want, aux_w = moe.apply(p, x, **KW)
  got, aux = moe.apply(p, x, **{**KW, "backend": "expert_parallel"}, mesh=mesh)
  np.testing.assert_allclose(got, want, atol=1e-6)
  np.testing.assert_allclose(aux["drop_fraction"], aux_w["drop_fraction"])
  assert aux["capacity"] == aux_w["capacity"]


def test_dtypes_bfloat16_tokens_float32_router():
  p = make_params()
  p["experts"] = jax.tree.map(lambda a: a.astype(jnp.bfloat16), p["experts"])
  x = tokens().astype(jnp.bfloat16)  # numpy (ml_dtypes) bfloat16
  y, aux = moe.apply(p, x, num_selected=2, capacity_factor=1.0, backend="sort")
  assert y.dtype == jnp.bfloat16 and y.shape == x.shape
  assert aux["router_z_loss"].dtype == jnp.float32
  assert aux["expert_load"].dtype == jnp.float32


# ----------------------------------------------------------------------------
# jit, vmap, gradients.


def test_jit_equals_eager_and_vmap():
  p, x = make_params(), tokens()
  eager, aux = moe.apply(p, x, **KW)
  jitted, aux_j = jax.jit(lambda p, x: moe.apply(p, x, **KW))(p, x)
  np.testing.assert_allclose(jitted, eager, atol=1e-6)
  np.testing.assert_allclose(aux_j["drop_fraction"], aux["drop_fraction"])
  # vmap over a stack of models (e.g. a sweep): each as on its own.
  q = make_params(9)
  stacked = jax.tree.map(lambda a, b: np.stack([a, b]), p, q)
  ys, _ = jax.vmap(lambda m: moe.apply(m, x, **KW))(stacked)
  np.testing.assert_allclose(ys[0], eager, atol=1e-6)
  np.testing.assert_allclose(ys[1], ref_kw(q, x), atol=ATOL, rtol=1e-4)


def test_router_gradient_matches_finite_differences():
  with jax.enable_x64(True):
    p = make_params()
    p = jax.tree.map(lambda a: a.astype(np.float64), p)
    x = tokens().astype(np.float64)
    r = tokens(7).astype(np.float64)
    kw = {
        "num_selected": 2,
        "capacity_factor": 0.75,
        "backend": "sort",
    }

    @jax.jit
    @jax.value_and_grad
    def loss(kernel):
      q = {**p, "router": {"kernel": kernel}}
      y, aux = moe.apply(q, x, **kw)
      return jnp.sum(y * r) + aux["load_balance_loss"] + aux["router_z_loss"]

    k0 = p["router"]["kernel"]
    _, grad = loss(k0)
    assert grad.dtype == jnp.float64
    grad = np.asarray(grad)
    assert np.abs(grad).max() > 1e-3  # the router does get gradient
    k0 = np.asarray(k0)
    v = np.random.default_rng(8).normal(size=k0.shape)
    eps = 1e-6
    fd = (loss(k0 + eps * v)[0] - loss(k0 - eps * v)[0]) / (2 * eps)
    np.testing.assert_allclose(np.vdot(grad, v), fd, rtol=1e-6)


# ----------------------------------------------------------------------------
# Errors.


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"num_selected": 5}, "num_selected.*5"),
        ({"num_selected": 0}, "num_selected.*0"),
        ({"router": "switchy"}, "router 'switchy'"),
        ({"backend": "magic"}, "backend 'magic'"),
        ({"typo_option": 1}, "typo_option"),
        ({"num_groups": 5}, "num_groups.*5"),
        ({"capacity_factor": -1.0}, "capacity_factor.*-1"),
        ({"activation": "tanhh"}, "activation 'tanhh'"),
        ({"router": "random"}, "key"),
        ({"noise_std": 0.5}, "key"),
        ({"router": "soft"}, "slots"),
        ({"backend": "expert_parallel"}, "mesh"),
    ],
)
def test_errors_name_the_value(kwargs, match):
  p, x = make_params(), tokens()
  kw = {"num_selected": 2, "capacity_factor": 1.0, **kwargs}
  if kw.get("router") == "soft":  # 7 columns are not E * slots for E = 4
    p["router"]["kernel"] = np.zeros((D, 7), np.float32)
  with pytest.raises(ValueError, match=match):
    moe.apply(p, x, **kw)


def test_router_errors():
  logits = np.zeros((1, 4, 2), np.float32)
  with pytest.raises(ValueError, match="capacity.*5"):
    routing.expert_choice_routing(logits, capacity=5)
  with pytest.raises(ValueError, match="num_experts.*3"):
    routing.soft_routing(logits, num_experts=3)
  with pytest.raises(ValueError, match="num_selected.*3"):
    routing.top_k_routing(logits, num_selected=3, capacity=4)
  with pytest.raises(ValueError, match=r"\[G, S, E\].*\(4, 2\)"):
    routing.top_k_routing(logits[0], num_selected=1, capacity=4)
  with pytest.raises(ValueError, match="second_expert_policy.*'sometimes'"):
    routing.top_k_routing(
        logits, num_selected=2, capacity=4, second_expert_policy="sometimes"
    )


def test_shape_errors_name_the_shapes():
  p, x = make_params(), tokens()
  kw = {"num_selected": 1, "capacity_factor": 1.0}
  with pytest.raises(ValueError, match=r"\[\.\.\., 8\]"):
    moe.apply(p, x[..., :5], **kw)
  bad = {**p, "experts": {**p["experts"], "wo": p["experts"]["wo"][:, :3]}}
  with pytest.raises(ValueError, match="experts/wo"):
    moe.apply(bad, x, **kw)
  bad = {**p, "router": {"kernel": np.zeros((D, 3), np.float32)}}
  with pytest.raises(ValueError, match="3 outputs.*4 experts"):
    moe.apply(bad, x, **kw)
  with pytest.raises(ValueError, match="router"):
    moe.apply({"experts": p["experts"]}, x, **kw)


# ----------------------------------------------------------------------------
# Upcycling, MoE from fine-tuned models, pruning.


def test_upcycled_identical_experts_equal_the_dense_mlp():
  rng = np.random.default_rng(10)
  dense = {
      "wi": rng.normal(size=(D, F)).astype(np.float32),
      "wo": rng.normal(size=(F, D)).astype(np.float32),
  }
  p = upcycle.upcycle(dense, E, key=jax.random.key(0), router_std=1.0)
  assert p["experts"]["wi"].shape == (E, D, F)
  x = tokens()
  y, aux = moe.apply(
      p, x, num_selected=2, capacity_factor=None, backend="sort",
      activation="relu",
  )  # fmt: skip
  np.testing.assert_allclose(y, np_mlp(dense["wi"], dense["wo"], x), 1e-4)
  assert float(aux["drop_fraction"]) == 0.0
  noisy = upcycle.upcycle(dense, E, key=jax.random.key(0), noise_std=0.1)
  again = upcycle.upcycle(dense, E, key=jax.random.key(0), noise_std=0.1)
  np.testing.assert_array_equal(noisy["experts"]["wi"], again["experts"]["wi"])
  diff = np.asarray(noisy["experts"]["wi"]) - dense["wi"]
  assert 0.05 < float(np.std(diff)) < 0.2
  assert not np.allclose(diff[0], diff[1])
  with pytest.raises(ValueError, match="key"):
    upcycle.upcycle(dense, E, noise_std=0.1)
  with pytest.raises(ValueError, match="'wi'"):
    upcycle.upcycle({"wi": dense["wi"]}, E)


def test_from_models_gate_modes():
  rng = np.random.default_rng(11)
  mlps = [
      {
          "wi": rng.normal(size=(D, F)).astype(np.float32),
          "wo": rng.normal(size=(F, D)).astype(np.float32),
      }
      for _ in range(3)
  ]
  basis = np.eye(D, dtype=np.float32)[:3] * 5
  hidden = [basis[t] + 0.1 * rng.normal(size=(4, D)) for t in range(3)]
  neg = [None, basis[0][None], None]
  p = npt(upcycle.from_models(
      mlps, gate_mode="hidden", hidden_states=hidden,
      negative_hidden_states=neg, residual_scale=[1.0, 0.5, 1.0],
  ))  # fmt: skip
  k = p["router"]["kernel"]
  u = [h.mean(0) for h in hidden]
  u[1] = u[1] - basis[0]
  want = np.stack([v / np.linalg.norm(v) for v in u], 1)
  np.testing.assert_allclose(k, want, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(p["experts"]["wo"][1], 0.5 * mlps[1]["wo"])
  np.testing.assert_array_equal(p["experts"]["wi"][2], mlps[2]["wi"])
  # Prompt-like tokens go to their experts.
  assert np.argmax(basis @ k, -1).tolist() == [0, 1, 2]
  key = jax.random.key(3)
  r1 = npt(upcycle.from_models(mlps, gate_mode="random", key=key))
  r2 = npt(upcycle.from_models(mlps, gate_mode="random", key=key))
  np.testing.assert_array_equal(r1["router"]["kernel"], r2["router"]["kernel"])
  assert 0.5 < r1["router"]["kernel"].std() < 2  # N(0, 1)
  un = npt(upcycle.from_models(mlps, gate_mode="uniform", key=key))
  bound = 1 / math.sqrt(D)
  assert np.abs(un["router"]["kernel"]).max() <= bound
  assert un["router"]["kernel"].shape == (D, 3)
  with pytest.raises(ValueError, match="gate_mode 'cheap'"):
    upcycle.from_models(mlps, gate_mode="cheap")
  with pytest.raises(ValueError, match="hidden_states"):
    upcycle.from_models(mlps, gate_mode="hidden")
  with pytest.raises(ValueError, match=r"mlps\[1\]"):
    upcycle.from_models(
        [mlps[0], {"wi": mlps[1]["wi"][:, :3], "wo": mlps[1]["wo"][:3]}],
        gate_mode="random", key=key,
    )  # fmt: skip


def test_prune_keeps_the_most_used_experts():
  p, x = make_params(), tokens()
  p["router"]["bias"] = np.array([0.0, -60.0, 0.0, -60.0], np.float32)
  x_GSD = x.reshape(1, -1, D)
  idx, w, _, _ = ref_top_k(np_logits(p, x_GSD) + p["router"]["bias"], 1, None)
  want = ref_token_choice_y(p, x_GSD, idx, w).reshape(x.shape)
  load = np.bincount(idx.ravel(), minlength=E) / idx.size
  assert load[1] == load[3] == 0
  q, kept = upcycle.prune(p, load, 2)
  assert kept.tolist() == [0, 2]
  assert q["experts"]["wi"].shape == (2, D, F)
  np.testing.assert_array_equal(q["router"]["bias"], [0.0, 0.0])
  np.testing.assert_array_equal(
      q["router"]["kernel"], p["router"]["kernel"][:, [0, 2]]
  )
  y, _ = moe.apply(
      q, x, num_selected=1, capacity_factor=None, backend="sort",
      activation="relu",
  )  # fmt: skip
  np.testing.assert_allclose(y, want, atol=ATOL, rtol=1e-4)
  with pytest.raises(ValueError, match="num_keep.*5"):
    upcycle.prune(p, load, 5)
  with pytest.raises(ValueError, match=r"expert_load.*\(3,\)"):
    upcycle.prune(p, load[:3], 2)


# ----------------------------------------------------------------------------
# LoRA experts.


def test_lora_experts_match_per_token_reference():
  rng = np.random.default_rng(12)
  d_in, d_out, e, r = 6, 5, 3, 2
  kernel = rng.normal(size=(d_in, d_out)).astype(np.float32)
  bias = rng.normal(size=(d_out,)).astype(np.float32)
  p = {
      "router": {"kernel": rng.normal(size=(d_in, e)).astype(np.float32)},
      "a": rng.normal(size=(e, d_in, r)).astype(np.float32),
      "b": rng.normal(size=(e, r, d_out)).astype(np.float32),
  }
  x = rng.normal(size=(2, 4, d_in)).astype(np.float32)
  y, aux = lora.experts_apply(
      kernel, p, x, num_selected=2, scale=0.5, bias=bias
  )
  assert y.shape == (2, 4, d_out)
  probs = np_softmax(x @ p["router"]["kernel"])
  want = x @ kernel + bias
  for i in np.ndindex(2, 4):
    top = np.argsort(-probs[i])[:2]
    g = probs[i][top] / probs[i][top].sum()
    for gk, ek in zip(g, top):
      want[i] += 0.5 * gk * (x[i] @ p["a"][ek] @ p["b"][ek])
  np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-4)
  assert aux["expert_load"].shape == (e,)
  with pytest.raises(ValueError, match=r"\[6, 5\] kernel"):
    lora.experts_apply(kernel[:, :4], p, x, num_selected=1)
  with pytest.raises(ValueError, match="num_selected.*4"):
    lora.experts_apply(kernel, p, x, num_selected=4)


def test_rank_wise_moe_lora():
  rng = np.random.default_rng(13)
  d_in, d_out, r = 6, 5, 4
  x = rng.normal(size=(7, d_in)).astype(np.float32)
  p = npt(lora.rank_init(jax.random.key(0), d_in, d_out, r, router="implicit"))
  p["b"] = rng.normal(size=(r, d_out)).astype(np.float32)
  a = p["a"]
  assert ((a != 0).sum(0) == 1).all()  # FlyLoRA: d_in // 8 = 0 -> 1 nonzero
  full, _ = lora.rank_apply(p, x, num_selected=r, scale=2.0)
  np.testing.assert_allclose(full, 2.0 * x @ a @ p["b"], rtol=1e-5, atol=1e-5)
  top2, aux = lora.rank_apply(p, x, num_selected=2)
  z = x @ a
  mask = np.zeros_like(z)
  np.put_along_axis(mask, np.argsort(-np.abs(z), -1)[:, :2], 1.0, -1)
  np.testing.assert_allclose(top2, (z * mask) @ p["b"], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.sum(aux["expert_load"]), 1.0, rtol=1e-6)
  # Explicit router: k * renormalised top-k gates on the ranks.
  q = {
      "a": a,
      "b": p["b"],
      "router": {"kernel": rng.normal(size=(d_in, r)).astype(np.float32)},
  }
  y, aux = lora.rank_apply(q, x, num_selected=2)
  probs = np_softmax(x @ q["router"]["kernel"])
  w = np.zeros_like(probs)
  for i in range(7):
    top = np.argsort(-probs[i])[:2]
    w[i, top] = 2 * probs[i, top] / probs[i, top].sum()
  np.testing.assert_allclose(y, (z * w) @ p["b"], rtol=1e-4, atol=1e-5)
  assert "router_z_loss" in aux
  with pytest.raises(ValueError, match="num_selected.*5"):
    lora.rank_apply(q, x, num_selected=5)


# ----------------------------------------------------------------------------
# Module structure.

MOE_DIR = pathlib.Path(mtx.__file__).parent / "moe"


def _moe_imports(name):
  """The mtx.moe modules ``mtx/moe/<name>.py`` imports (also inside defs)."""
  found = set()
  for node in ast.walk(ast.parse((MOE_DIR / f"{name}.py").read_text())):
    if isinstance(node, ast.ImportFrom) and node.module:
      if node.module == "mtx.moe":
        found.update(a.name for a in node.names)
      elif node.module.startswith("mtx.moe."):
        found.add(node.module.split(".")[2])
    elif isinstance(node, ast.Import):
      found.update(
          a.name.split(".")[2]
          for a in node.names
          if a.name.startswith("mtx.moe.")
      )
  return found


def test_moe_modules_do_not_import_each_other():
  """No import cycle inside mtx.moe (layer -> sharded -> dispatch)."""
  names = sorted(p.stem for p in MOE_DIR.glob("*.py") if p.stem != "__init__")
  graph = {n: _moe_imports(n) & set(names) for n in names}
  assert "layer" not in graph["sharded"], graph["sharded"]

  def reach(n, seen):
    for m in graph[n]:
      if m not in seen:
        seen.add(m)
        reach(m, seen)
    return seen

  for n in names:
    assert n not in reach(n, set()), f"import cycle through mtx.moe.{n}"
