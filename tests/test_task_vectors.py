"""Tests of every public function of ``mtx.task_vectors``.

Small literal fixtures with the arithmetic written in comments. Values are
dyadic where possible so that float32 results are exact.
"""

from __future__ import annotations

import math
import re
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtx import task_vectors as tvs

F32 = jnp.float32
BF16 = jnp.bfloat16


def _np(x):
  return np.asarray(jnp.asarray(x).astype(jnp.float32))


# ----------------------------------------------------------------------------
# task_vector.


def test_task_vector_values_and_dtypes():
  pre = {"w": jnp.array([1.0, 2.0]), "b": jnp.array(0.5, BF16)}
  ft = {"w": jnp.array([3.0, 1.0]), "b": jnp.array(0.25, BF16)}
  tv = tvs.task_vector(pre, ft)
  # w: [3-1, 1-2]; b: 0.25-0.5
  np.testing.assert_array_equal(tv["w"], [2.0, -1.0])
  assert float(tv["b"]) == -0.25
  assert tv["w"].dtype == F32 and tv["b"].dtype == BF16


def test_task_vector_integer_leaf_raises():
  pre = {"w": jnp.zeros(2), "step": jnp.array(3, jnp.int32)}
  ft = {"w": jnp.ones(2), "step": jnp.array(5, jnp.int32)}
  with pytest.raises(ValueError, match=r"leaf 'step' has dtype int32"):
    tvs.task_vector(pre, ft)


def test_task_vector_dtype_mismatch_names_path():
  pre = {"enc": {"w": jnp.zeros(2, F32)}}
  ft = {"enc": {"w": jnp.zeros(2, BF16)}}
  with pytest.raises(
      ValueError,
      match=re.escape(
          "dtype mismatch at 'enc/w': pretrained float32[2] vs finetuned "
          "bfloat16[2]"
      ),
  ):
    tvs.task_vector(pre, ft)


def test_task_vector_shape_mismatch_names_path():
  pre = {"enc": {"w": jnp.zeros((2, 3))}, "head": jnp.zeros(2)}
  ft = {"enc": {"w": jnp.zeros((3, 2))}, "head": jnp.zeros(2)}
  with pytest.raises(ValueError, match=r"shape mismatch at 'enc/w'"):
    tvs.task_vector(pre, ft)


def test_task_vector_structure_mismatch_names_path():
  pre = {"a": jnp.zeros(1), "b": jnp.zeros(1)}
  with pytest.raises(ValueError, match=r"finetuned is missing leaf 'b'"):
    tvs.task_vector(pre, {"a": jnp.zeros(1)})
  with pytest.raises(ValueError, match=r"finetuned has extra leaf 'c'"):
    tvs.task_vector(
        pre, {"a": jnp.zeros(1), "b": jnp.zeros(1), "c": jnp.zeros(1)}
    )


# ----------------------------------------------------------------------------
# apply, negate, analogy.


def _pre_tv():
  pre = {"enc": {"w": jnp.array([1.0, 2.0])}, "head": jnp.array([3.0])}
  tv = {"enc": {"w": jnp.array([2.0, -2.0])}, "head": jnp.array([4.0])}
  return pre, tv


def test_apply_scalar_scale():
  pre, tv = _pre_tv()
  out = tvs.apply(pre, tv, 0.5)
  # enc: [1 + 1, 2 - 1]; head: [3 + 2]
  np.testing.assert_array_equal(out["enc"]["w"], [2.0, 1.0])
  np.testing.assert_array_equal(out["head"], [5.0])
  out = tvs.apply(pre, tv)  # default scale 1
  np.testing.assert_array_equal(out["enc"]["w"], [3.0, 0.0])


def test_apply_prefix_tree_scale():
  pre, tv = _pre_tv()
  out = tvs.apply(pre, tv, {"enc": 0.5, "head": 0.0})
  # enc: [1 + 0.5*2, 2 - 0.5*2]; head untouched: [3]
  np.testing.assert_array_equal(out["enc"]["w"], [2.0, 1.0])
  np.testing.assert_array_equal(out["head"], [3.0])


def test_apply_traced_scale_under_jit():
  pre, tv = _pre_tv()
  f = jax.jit(tvs.apply)
  out = f(pre, tv, jnp.float32(0.25))
  # enc: [1 + 0.5, 2 - 0.5]; head: [3 + 1]
  np.testing.assert_array_equal(out["enc"]["w"], [1.5, 1.5])
  np.testing.assert_array_equal(out["head"], [4.0])
  out = f(pre, tv, {"enc": jnp.float32(-1.0), "head": jnp.float32(2.0)})
  # enc: [1 - 2, 2 + 2]; head: [3 + 8]
  np.testing.assert_array_equal(out["enc"]["w"], [-1.0, 4.0])
  np.testing.assert_array_equal(out["head"], [11.0])


def test_apply_traced_scale_under_vmap():
  pre, tv = _pre_tv()
  out = jax.vmap(lambda s: tvs.apply(pre, tv, s))(jnp.array([0.0, 1.0, 2.0]))
  # enc: 1 + 2s, 2 - 2s; head: 3 + 4s
  np.testing.assert_array_equal(
      out["enc"]["w"], [[1.0, 2.0], [3.0, 0.0], [5.0, -2.0]]
  )
  np.testing.assert_array_equal(out["head"], [[3.0], [7.0], [11.0]])
  # vmapped prefix tree (sweep over the encoder scale only)
  out = jax.vmap(lambda s: tvs.apply(pre, tv, {"enc": s, "head": 0.0}))(
      jnp.array([0.5, 1.0])
  )
  np.testing.assert_array_equal(out["enc"]["w"], [[2.0, 1.0], [3.0, 0.0]])
  np.testing.assert_array_equal(out["head"], [[3.0], [3.0]])


def test_apply_keeps_dtype_and_computes_in_float32():
  # 1 + 0.3 * 7 in float32 = 3.1 -> bf16 3.09375 (bf16 arithmetic: 3.109375)
  out = tvs.apply(
      {"w": jnp.array([1.0], BF16)}, {"w": jnp.array([7.0], BF16)}, 0.3
  )
  assert out["w"].dtype == BF16
  assert float(out["w"][0]) == 3.09375


def test_apply_structure_mismatch_raises():
  pre, _ = _pre_tv()
  with pytest.raises(ValueError, match=r"task_vector is missing leaf 'head'"):
    tvs.apply(pre, {"enc": {"w": jnp.zeros(2)}}, 1.0)


def test_negate_and_apply_forgets():
  pre, tv = _pre_tv()
  neg = tvs.negate(tv)
  np.testing.assert_array_equal(neg["enc"]["w"], [-2.0, 2.0])
  np.testing.assert_array_equal(neg["head"], [-4.0])
  # θ0 - 0.5 τ: enc [1 - 1, 2 + 1], head [3 - 2]
  out = tvs.apply(pre, neg, 0.5)
  np.testing.assert_array_equal(out["enc"]["w"], [0.0, 3.0])
  np.testing.assert_array_equal(out["head"], [1.0])
  assert tvs.negate({"x": jnp.ones(2, BF16)})["x"].dtype == BF16


def test_analogy():
  a = {"x": jnp.array([1.0, 0.0])}
  b = {"x": jnp.array([0.0, 1.0])}
  c = {"x": jnp.array([2.0, 2.0])}
  # τC + (τB − τA) = [2 + (0-1), 2 + (1-0)]
  np.testing.assert_array_equal(tvs.analogy(a, b, c)["x"], [1.0, 3.0])


def test_analogy_bfloat16_computes_in_float32():
  # DESIGN: arithmetic in float32, result in the params' dtype.
  # float32: -255 + (256 - (-1)) = 2, representable in bf16 -> 2.
  # bf16 step by step: 256 + 1 = 257 -> 256 (spacing 2), -255 + 256 = 1.
  a = {"x": jnp.array([-1.0], BF16)}
  b = {"x": jnp.array([256.0], BF16)}
  c = {"x": jnp.array([-255.0], BF16)}
  out = tvs.analogy(a, b, c)
  assert out["x"].dtype == BF16
  assert float(out["x"][0]) == 2.0


# ----------------------------------------------------------------------------
# cosine_matrix.


def _three_tvs():
  return [
      {"x": jnp.array([1.0, 0.0]), "y": jnp.array([0.0])},
      {"x": jnp.array([1.0, 1.0]), "y": jnp.array([0.0])},
      {"x": jnp.array([0.0, 0.0]), "y": jnp.array([2.0])},
  ]


def test_cosine_matrix_hand_computed_list_input():
  c = np.asarray(tvs.cosine_matrix(_three_tvs()))
  # cos(t0, t1) = 1/sqrt(2); t2 is orthogonal to both.
  r = 1 / math.sqrt(2)
  want = np.array([[1, r, 0], [r, 1, 0], [0, 0, 1]])
  assert c.shape == (3, 3)
  np.testing.assert_allclose(c, want, atol=1e-6)


def test_cosine_matrix_against_numpy_list_and_stacked():
  rng = np.random.default_rng(1)
  t = 4
  stacked = {
      "a": jnp.asarray(rng.normal(size=(t, 3, 2)), F32),
      "b": [jnp.asarray(rng.normal(size=(t, 5)), F32)],
  }
  lst = [jax.tree.map(lambda x, i=i: x[i], stacked) for i in range(t)]
  flat = np.concatenate(
      [
          np.asarray(x, np.float64).reshape(t, -1)
          for x in jax.tree.leaves(stacked)
      ],
      axis=1,
  )
  norms = np.linalg.norm(flat, axis=1)
  want = flat @ flat.T / np.outer(norms, norms)
  got_stacked = np.asarray(tvs.cosine_matrix(stacked))
  got_list = np.asarray(tvs.cosine_matrix(lst))
  np.testing.assert_allclose(got_stacked, want, atol=1e-5)
  np.testing.assert_allclose(got_list, want, atol=1e-5)
  np.testing.assert_allclose(np.diag(got_list), np.ones(t), atol=1e-6)
  np.testing.assert_allclose(got_list, got_list.T, atol=1e-7)


class _Layer(NamedTuple):
  w: object
  b: object


def test_stacked_tree_with_namedtuple_root():
  # A stacked tree whose root is a NamedTuple (a legitimate params pytree)
  # is a stacked tree, not a list of task vectors.
  # τ0 = (w [1, 0], b [0]), τ1 = (w [1, 1], b [0]), τ2 = (w [0, 0], b [2])
  stacked = _Layer(
      w=jnp.array([[1.0, 0.0], [1.0, 1.0], [0.0, 0.0]]),
      b=jnp.array([[0.0], [0.0], [2.0]]),
  )
  r = 1 / math.sqrt(2)
  np.testing.assert_allclose(
      tvs.cosine_matrix(stacked),
      [[1, r, 0], [r, 1, 0], [0, 0, 1]],
      atol=1e-6,
  )
  mtl = tvs.multitask_vector(stacked)
  assert isinstance(mtl, _Layer)
  np.testing.assert_array_equal(mtl.w, [2.0, 1.0])
  np.testing.assert_array_equal(mtl.b, [2.0])


def test_cosine_matrix_zero_vector_gives_zero_not_nan():
  lst = [{"x": jnp.array([1.0, 2.0])}, {"x": jnp.zeros(2)}]
  c = np.asarray(tvs.cosine_matrix(lst))
  assert not np.any(np.isnan(c))
  np.testing.assert_allclose(c, [[1.0, 0.0], [0.0, 0.0]], atol=1e-6)


# ----------------------------------------------------------------------------
# sparsify.


def _two_leaves():
  # paths in order: a, b (8 entries in all)
  return {
      "a": jnp.array([10.0, -9.0, 8.0, -7.0]),
      "b": jnp.array([1.0, -2.0, 3.0, -4.0]),
  }


def test_sparsify_per_leaf_vs_global():
  tv = _two_leaves()
  per = tvs.sparsify(tv, 0.5, scope="per_leaf")
  # per leaf: k = int(4 * 0.5) = 2 in each leaf.
  np.testing.assert_array_equal(per["a"], [10.0, -9.0, 0.0, 0.0])
  np.testing.assert_array_equal(per["b"], [0.0, 0.0, 3.0, -4.0])
  glob = tvs.sparsify(tv, 0.5, scope="global")
  # global: k = int(8 * 0.5) = 4 -> |τ| >= 7: all of a, nothing of b.
  np.testing.assert_array_equal(glob["a"], [10.0, -9.0, 8.0, -7.0])
  np.testing.assert_array_equal(glob["b"], [0.0, 0.0, 0.0, 0.0])
  # default scope is per_leaf
  np.testing.assert_array_equal(tvs.sparsify(tv, 0.5)["b"], per["b"])


def test_sparsify_reference_rule_keeps_one_more():
  tv = _two_leaves()
  per = tvs.sparsify(tv, 0.5, scope="per_leaf", topk_rule="reference")
  # per leaf: int(4 * 0.5) + 1 = 3 kept in each leaf
  np.testing.assert_array_equal(per["a"], [10.0, -9.0, 8.0, 0.0])
  np.testing.assert_array_equal(per["b"], [0.0, -2.0, 3.0, -4.0])
  glob = tvs.sparsify(tv, 0.5, scope="global", topk_rule="reference")
  # global: int(8 * 0.5) + 1 = 5 -> |τ| >= 4
  np.testing.assert_array_equal(glob["a"], [10.0, -9.0, 8.0, -7.0])
  np.testing.assert_array_equal(glob["b"], [0.0, 0.0, 0.0, -4.0])


def test_sparsify_ties_at_threshold_are_kept_and_min_one():
  tv = {"w": jnp.array([1.0, -1.0, 1.0, 0.5])}
  # density 0.25: k = 1, threshold 1, all three |τ| = 1 are kept
  np.testing.assert_array_equal(
      tvs.sparsify(tv, 0.25)["w"], [1.0, -1.0, 1.0, 0.0]
  )
  # density 0.1: int(0.4) = 0 -> at least one entry is kept
  tv = {"w": jnp.array([0.5, -3.0, 2.0, 0.25])}
  np.testing.assert_array_equal(
      tvs.sparsify(tv, 0.1)["w"], [0.0, -3.0, 0.0, 0.0]
  )
  # density 1 keeps everything
  np.testing.assert_array_equal(tvs.sparsify(tv, 1.0)["w"], tv["w"])


def test_sparsify_keeps_dtype():
  tv = {"w": jnp.array([0.5, -3.0, 2.0, 0.25], BF16)}
  out = tvs.sparsify(tv, 0.5)
  assert out["w"].dtype == BF16
  np.testing.assert_array_equal(_np(out["w"]), [0.0, -3.0, 2.0, 0.0])


@pytest.mark.parametrize("density", [0.0, -0.1, 1.5, float("nan")])
def test_sparsify_density_out_of_range_raises(density):
  with pytest.raises(ValueError, match="density must be in"):
    tvs.sparsify(_two_leaves(), density)


def test_sparsify_bad_scope_or_rule_raises():
  with pytest.raises(ValueError, match="scope must be one of"):
    tvs.sparsify(_two_leaves(), 0.5, scope="layer")
  with pytest.raises(ValueError, match="topk_rule must be one of"):
    tvs.sparsify(_two_leaves(), 0.5, topk_rule="mergekit")


# ----------------------------------------------------------------------------
# multitask_vector, TALL masks, retrieval, consensus.


def _tall_tvs():
  t1 = {"w": jnp.array([1.0, 2.0, 0.5, -1.0])}
  t2 = {"w": jnp.array([2.0, -1.0, 0.5, 1.0])}
  return [t1, t2]


def test_multitask_vector_list_and_stacked():
  lst = _tall_tvs()
  # Σ τt = [3, 1, 1, 0]
  np.testing.assert_array_equal(
      tvs.multitask_vector(lst)["w"], [3.0, 1.0, 1.0, 0.0]
  )
  stacked = {"w": jnp.stack([lst[0]["w"], lst[1]["w"]])}
  np.testing.assert_array_equal(
      tvs.multitask_vector(stacked)["w"], [3.0, 1.0, 1.0, 0.0]
  )


def test_tall_masks_hand_computed_strict_boundary():
  m = tvs.tall_masks(_tall_tvs(), tall_lambda=0.5)
  assert m["w"].shape == (2, 4) and m["w"].dtype == jnp.bool_
  # τMTL − τ1 = τ2, τMTL − τ2 = τ1.
  # m1 = |τ1| > 0.5|τ2| = [1 > 1 (no: strict), 2 > 0.5, 0.5 > 0.25, 1 > 0.5]
  # m2 = |τ2| > 0.5|τ1| = [2 > 0.5, 1 > 1 (no: strict), 0.5 > 0.25, 1 > 0.5]
  np.testing.assert_array_equal(
      m["w"], [[False, True, True, True], [True, False, True, True]]
  )


def test_tall_masks_per_task_lambda():
  lam = jnp.array([0.25, 2.0])
  m = tvs.tall_masks(_tall_tvs(), tall_lambda=lam)
  # m1 = |τ1| > 0.25|τ2| = [1 > 0.5, 2 > 0.25, 0.5 > 0.125, 1 > 0.25] all True
  # m2 = |τ2| > 2|τ1|    = [2 > 2, 1 > 4, 0.5 > 1, 1 > 2] all False
  np.testing.assert_array_equal(
      m["w"], [[True, True, True, True], [False, False, False, False]]
  )


def test_tall_masks_stacked_input_and_explicit_mtl():
  lst = _tall_tvs()
  stacked = {"w": jnp.stack([lst[0]["w"], lst[1]["w"]])}
  np.testing.assert_array_equal(
      tvs.tall_masks(stacked, tall_lambda=0.5)["w"],
      tvs.tall_masks(lst, tall_lambda=0.5)["w"],
  )
  # explicit mtl = [1, 2, 0.5, -1] = τ1:
  # m1 = |τ1| > 0.5·0 (true where τ1 != 0)
  # m2 = |τ2| > 0.5|τ1 − τ2| = [2 > 0.5, 1 > 1.5, 0.5 > 0, 1 > 1]
  m = tvs.tall_masks(lst, mtl=lst[0], tall_lambda=0.5)
  np.testing.assert_array_equal(
      m["w"], [[True, True, True, True], [True, False, True, False]]
  )


def test_retrieve_hand_computed():
  lst = _tall_tvs()
  pre = {"w": jnp.array([10.0, 10.0, 10.0, 10.0])}
  mtl = tvs.multitask_vector(lst)  # [3, 1, 1, 0]
  masks = tvs.tall_masks(lst, mtl, 0.5)  # [[F,T,T,T], [T,F,T,T]]
  # task 0: θ0 + [0, 1, 1, 0]; task 1: θ0 + [3, 0, 1, 0]
  np.testing.assert_array_equal(
      tvs.retrieve(pre, mtl, masks, 0)["w"], [10.0, 11.0, 11.0, 10.0]
  )
  np.testing.assert_array_equal(
      tvs.retrieve(pre, mtl, masks, 1)["w"], [13.0, 10.0, 11.0, 10.0]
  )
  pre16 = {"w": pre["w"].astype(BF16)}
  out = tvs.retrieve(pre16, mtl, masks, 1)
  assert out["w"].dtype == BF16
  np.testing.assert_array_equal(_np(out["w"]), [13.0, 10.0, 11.0, 10.0])


def test_consensus_mask_hand_computed():
  masks = {
      "w": jnp.array([[1, 1, 0, 0], [1, 0, 1, 0], [1, 0, 0, 0]], dtype=bool),
      "b": jnp.array([[True], [True], [False]]),
  }
  # counts per entry: w [3, 1, 1, 0], b [2]
  out = tvs.consensus_mask(masks)  # k = 2
  np.testing.assert_array_equal(out["w"], [True, False, False, False])
  np.testing.assert_array_equal(out["b"], [True])
  np.testing.assert_array_equal(
      tvs.consensus_mask(masks, 1)["w"], [True, True, True, False]
  )
  np.testing.assert_array_equal(tvs.consensus_mask(masks, 3)["b"], [False])
  np.testing.assert_array_equal(
      tvs.consensus_mask(masks, 0)["w"], [True, True, True, True]
  )


# ----------------------------------------------------------------------------
# pack_mask / unpack_mask.


def test_pack_unpack_roundtrip_and_packed_sizes():
  rng = np.random.default_rng(2)
  shapes = {
      "a": (1,),
      "b": (7,),
      "c": (8,),
      "d": (9,),
      "e": (13,),
      "f": (3, 5),
      "g": (2, 2, 2),
  }
  mask = {k: jnp.asarray(rng.random(s) < 0.5) for k, s in shapes.items()}
  packed = tvs.pack_mask(mask)
  for k, s in shapes.items():
    n = math.prod(s)
    b = packed["bits"][k]
    assert b.dtype == np.uint8
    assert b.nbytes == math.ceil(n / 8), (k, n, b.nbytes)
    assert tuple(packed["shapes"][k]) == s
  out = tvs.unpack_mask(packed)
  for k, s in shapes.items():
    assert out[k].shape == s and out[k].dtype == jnp.bool_
    np.testing.assert_array_equal(out[k], mask[k])


def test_pack_mask_bit_layout():
  packed = tvs.pack_mask({"m": jnp.array([True, False, True])})
  # big-endian bit order within the byte: 0b1010_0000 = 160
  np.testing.assert_array_equal(packed["bits"]["m"], [160])


def test_pack_unpack_nested_lists_and_scalar():
  mask = {
      "l": [jnp.array([True, False]), jnp.array([[False], [True]])],
      "s": jnp.array(True),
  }
  out = tvs.unpack_mask(tvs.pack_mask(mask))
  np.testing.assert_array_equal(out["l"][0], [True, False])
  np.testing.assert_array_equal(out["l"][1], [[False], [True]])
  assert out["s"].shape == () and bool(out["s"])


def test_pack_unpack_tuple_container_roundtrip():
  # Params may contain tuples (or NamedTuples); the mask tree then does too.
  mask = {"a": (jnp.array([True, False, True]), jnp.ones(5, bool))}
  out = tvs.unpack_mask(tvs.pack_mask(mask))
  assert isinstance(out["a"], tuple) and len(out["a"]) == 2
  np.testing.assert_array_equal(out["a"][0], [True, False, True])
  np.testing.assert_array_equal(out["a"][1], np.ones(5, bool))


# ----------------------------------------------------------------------------
# compress / decompress / storage_bytes (ComPEFT).


def _cpf_tv():
  # flat (paths a, b): [4, 0, -2, 1]; mean 0.75; deviations
  # [3.25, -0.75, -2.75, 0.25], squares sum 10.5625 + 0.5625 + 7.5625
  # + 0.0625 = 18.75; unbiased var 18.75 / 3 = 6.25; std 2.5.
  return {"a": jnp.array([4.0, 0.0]), "b": jnp.array([-2.0, 1.0])}


def test_compress_hand_computed():
  c = tvs.compress(_cpf_tv(), 0.5, alpha=2.0)
  # k = int(4 * 0.5) = 2: keep 4 and -2; values ±alpha·std = ±5
  assert c.scale == pytest.approx(5.0, rel=1e-6)
  assert c.paths == ("a", "b")
  assert c.shapes == ((2,), (2,))
  assert c.dtypes == ("float32", "float32")
  # masks: a [1, 0] -> 0b1000_0000, b [1, 0] -> 0b1000_0000
  assert [m.tolist() for m in c.mask_bits] == [[128], [128]]
  # signs of the kept entries: a [+] -> 128, b [-] -> 0
  assert [s.tolist() for s in c.sign_bits] == [[128], [0]]
  d = tvs.decompress(c)
  np.testing.assert_allclose(d["a"], [5.0, 0.0], rtol=1e-6)
  np.testing.assert_allclose(d["b"], [-5.0, 0.0], rtol=1e-6)


def test_compress_reference_rule_and_default_alpha():
  c = tvs.compress(_cpf_tv(), 0.5, topk_rule="reference")
  # k = int(4 * 0.5) + 1 = 3: keep 4, -2, 1; alpha 1 -> ±2.5
  d = tvs.decompress(c)
  np.testing.assert_allclose(d["a"], [2.5, 0.0], rtol=1e-6)
  np.testing.assert_allclose(d["b"], [-2.5, 2.5], rtol=1e-6)


def test_compress_against_numpy_random():
  rng = np.random.default_rng(3)
  tv = {
      "m": jnp.asarray(rng.normal(size=(4, 5)) + 0.3, F32),
      "v": jnp.asarray(rng.normal(size=7), F32),
  }
  flat = np.concatenate([np.ravel(tv["m"]), np.ravel(tv["v"])]).astype(
      np.float64
  )
  n = flat.size  # 27
  k = int(n * 0.3)  # 8
  std = np.std(flat, ddof=1)
  kept = np.zeros(n, bool)
  kept[np.argsort(-np.abs(flat))[:k]] = True
  want = np.where(kept, 1.5 * std * np.sign(flat), 0.0)
  d = tvs.decompress(tvs.compress(tv, 0.3, alpha=1.5))
  got = np.concatenate([np.ravel(d["m"]), np.ravel(d["v"])])
  np.testing.assert_allclose(got, want, rtol=1e-5)
  assert np.count_nonzero(got) == k


def test_decompress_keeps_dtype_and_structure():
  tv = {"x": [jnp.array([0.5, -4.0], BF16), jnp.array([[2.0]], BF16)]}
  d = tvs.decompress(tvs.compress(tv, 0.5))
  assert d["x"][0].dtype == BF16 and d["x"][1].dtype == BF16
  assert d["x"][1].shape == (1, 1)
  # flat [0.5, -4, 2], k = int(1.5) = 1 -> keep -4 only
  assert float(d["x"][0][0]) == 0.0 and float(d["x"][0][1]) < 0
  assert float(d["x"][1][0, 0]) == 0.0


@pytest.mark.parametrize("density", [0.0, 1.01, -1.0])
def test_compress_density_out_of_range_raises(density):
  with pytest.raises(ValueError, match="density must be in"):
    tvs.compress(_cpf_tv(), density)


def test_compress_integer_leaf_raises():
  with pytest.raises(ValueError, match=r"leaf 'i' has dtype int32"):
    tvs.compress({"f": jnp.ones(3), "i": jnp.ones(3, jnp.int32)}, 0.5)


def test_storage_bytes_exact_small():
  tv = {
      "a": jnp.array([10.0, 9.0, -8.0, 7.0, -6.0, 0.1, 0.2, 0.3, 0.4, 0.6]),
      "b": jnp.array([5.0, 0.7, -0.8]),
  }
  # n = 13, density 0.5: k = 6 -> keep 10, 9, -8, 7, -6 (a) and 5 (b).
  c = tvs.compress(tv, 0.5)
  s = tvs.storage_bytes(c)
  # mask bits: ceil(10/8) + ceil(3/8) = 2 + 1; sign bits: ceil(5/8) +
  # ceil(1/8) = 1 + 1; scale: 4 -> 9 bytes. dense: 13 * 4 = 52.
  assert s["stored"] == 9
  assert s["dense"] == 52
  assert s["ratio"] == pytest.approx(52 / 9)
  # density 5/13: k = int(5) = 5 -> all kept entries in a; b stores no signs.
  c = tvs.compress(tv, 5 / 13)
  # 2 + 1 (masks) + 1 + 0 (signs) + 4 = 8
  assert tvs.storage_bytes(c)["stored"] == 8
  # bfloat16 dense bytes: 13 * 2
  c16 = tvs.compress(jax.tree.map(lambda x: x.astype(BF16), tv), 0.5)
  assert tvs.storage_bytes(c16)["dense"] == 26


def test_storage_bytes_large_vector_ratio():
  rng = np.random.default_rng(4)
  x = rng.normal(size=100_000).astype(np.float32)
  c = tvs.compress({"w": jnp.asarray(x)}, 0.1)
  s = tvs.storage_bytes(c)
  # k = 10_000 kept (no ties in continuous data): mask 12_500 bytes,
  # signs 1_250 bytes, scale 4 -> 13_754; dense 400_000; ratio ~29.1
  assert s["stored"] == 13_754
  assert s["dense"] == 400_000
  assert s["ratio"] > 20
  # the kept entries are exactly the top 10_000 |x|
  d = np.asarray(tvs.decompress(c)["w"])
  top = np.zeros(x.size, bool)
  top[np.argsort(-np.abs(x))[:10_000]] = True
  np.testing.assert_array_equal(d != 0, top)
  np.testing.assert_allclose(
      np.abs(d[top]), np.std(x.astype(np.float64), ddof=1), rtol=1e-5
  )
  np.testing.assert_array_equal(np.sign(d[top]), np.sign(x[top]))
