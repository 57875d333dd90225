"""Tests of every public function of ``mtx.tree``.

Small literal fixtures; expected values are computed by hand in comments (or
with numpy where the point is agreement with numpy). bfloat16 examples are
chosen so that computing in bfloat16 and computing in float32 then casting
give different answers.
"""

from __future__ import annotations

import re
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtx import tree as mtree

F32 = jnp.float32
BF16 = jnp.bfloat16


class Layer(NamedTuple):
  """A flax-free custom pytree (NamedTuples are pytree nodes in JAX)."""

  w: object
  b: object


def _nested():
  # dict keys are flattened in sorted order: "enc" < "head".
  return {
      "head": Layer(w=jnp.ones((2, 3)), b=jnp.zeros(3)),
      "enc": [jnp.arange(2.0), (jnp.zeros(1), {"k": jnp.ones((1, 2))})],
  }


_NESTED_PATHS = [
    "enc/0",
    "enc/1/0",
    "enc/1/1/k",
    "head/w",
    "head/b",  # NamedTuple fields keep their declaration order
]


# ----------------------------------------------------------------------------
# Paths, flatten, unflatten, map_with_path, accum_dtype.


def test_path_str_on_key_paths():
  t = {"a": [1.0, {"b": 2.0}], "c": (3.0,)}
  with_path, _ = jax.tree_util.tree_flatten_with_path(t)
  got = [mtree.path_str(p) for p, _ in with_path]
  assert got == ["a/0", "a/1/b", "c/0"]
  assert mtree.path_str(()) == ""


def test_paths_nested_dict_list_tuple_namedtuple():
  assert mtree.paths(_nested()) == _NESTED_PATHS


def test_flatten_unflatten_roundtrip():
  t = _nested()
  paths, leaves, treedef = mtree.flatten(t)
  assert paths == _NESTED_PATHS
  assert len(leaves) == 5
  # leaves in the same order as the paths
  np.testing.assert_array_equal(leaves[0], [0.0, 1.0])
  assert leaves[3].shape == (2, 3)
  back = mtree.unflatten(treedef, [x + 1 for x in leaves])
  assert isinstance(back["head"], Layer)
  assert isinstance(back["enc"][1], tuple)
  np.testing.assert_array_equal(back["enc"][0], [1.0, 2.0])
  np.testing.assert_array_equal(back["head"].b, np.ones(3))
  # unflatten takes any iterable
  back2 = mtree.unflatten(treedef, iter(leaves))
  assert mtree.paths(back2) == _NESTED_PATHS


def test_map_with_path_passes_paths_and_rest():
  a = {"x": jnp.array(1.0), "y": [jnp.array(2.0)]}
  b = {"x": jnp.array(10.0), "y": [jnp.array(20.0)]}
  seen = []

  def fn(p, u, v):
    seen.append(p)
    return u + v

  out = mtree.map_with_path(fn, a, b)
  assert seen == ["x", "y/0"]
  assert float(out["x"]) == 11.0 and float(out["y"][0]) == 22.0


def test_accum_dtype_is_float32_without_x64():
  assert not jax.config.jax_enable_x64
  assert mtree.accum_dtype() == jnp.dtype(jnp.float32)


# ----------------------------------------------------------------------------
# Elementwise algebra: values, dtypes, float32 compute.


def _ab():
  a = {"w": jnp.array([1.0, 2.0, 3.0], F32), "b": jnp.array([4.0], BF16)}
  b = {"w": jnp.array([0.5, 0.5, 0.5], F32), "b": jnp.array([1.0], BF16)}
  return a, b


def test_sub_values_and_dtypes():
  a, b = _ab()
  out = mtree.sub(a, b)
  # w: [1-0.5, 2-0.5, 3-0.5]; b: [4-1]
  np.testing.assert_array_equal(out["w"], [0.5, 1.5, 2.5])
  np.testing.assert_array_equal(np.asarray(out["b"], np.float32), [3.0])
  assert out["w"].dtype == F32 and out["b"].dtype == BF16


def test_add_values_and_dtypes():
  a, b = _ab()
  out = mtree.add(a, b, b)
  # w: [1+1, 2+1, 3+1]; b: [4+2]
  np.testing.assert_array_equal(out["w"], [2.0, 3.0, 4.0])
  np.testing.assert_array_equal(np.asarray(out["b"], np.float32), [6.0])
  assert out["w"].dtype == F32 and out["b"].dtype == BF16
  # a single tree is returned unchanged
  np.testing.assert_array_equal(mtree.add(a)["w"], a["w"])


def test_add_bfloat16_accumulates_in_float32():
  # bf16 has 8 significant bits: spacing at 256 is 2.
  # In float32: 256 + 1 + 1 = 258, representable in bf16 -> 258.
  # In bf16 step by step: 256 + 1 = 257 -> rounds (to even) to 256, and
  # again -> 256.
  a = {"x": jnp.array([256.0], BF16)}
  one = {"x": jnp.array([1.0], BF16)}
  out = mtree.add(a, one, one)
  assert out["x"].dtype == BF16
  assert float(out["x"][0]) == 258.0


def test_scale_values_dtypes_float32_compute():
  a, _ = _ab()
  out = mtree.scale(2.0, a)
  np.testing.assert_array_equal(out["w"], [2.0, 4.0, 6.0])
  assert out["w"].dtype == F32 and out["b"].dtype == BF16
  # 0.1 * 9 in float32 = 0.9 -> nearest bf16 is 0.8984375; in bf16,
  # 0.1 -> 0.10009765625 and 9 * that = 0.90087890625 -> 0.90234375.
  x = {"x": jnp.array([9.0], BF16)}
  out = mtree.scale(0.1, x)
  assert out["x"].dtype == BF16
  assert float(out["x"][0]) == 0.8984375


def test_scale_traced_under_jit():
  a, _ = _ab()
  out = jax.jit(mtree.scale)(jnp.float32(-1.0), a)
  np.testing.assert_array_equal(out["w"], [-1.0, -2.0, -3.0])


def test_add_scale_values_dtypes_float32_compute():
  a, b = _ab()
  out = mtree.add_scale(a, 2.0, b)
  # w: [1+1, 2+1, 3+1]; b: [4+2]
  np.testing.assert_array_equal(out["w"], [2.0, 3.0, 4.0])
  np.testing.assert_array_equal(np.asarray(out["b"], np.float32), [6.0])
  assert out["w"].dtype == F32 and out["b"].dtype == BF16
  # 1 + 0.3 * 7: float32 gives 3.1 -> bf16 3.09375 (spacing 1/64 at 2..4);
  # bf16 (0.3 -> 0.30078125, *7 -> 2.109375, +1 -> 3.109375) would differ.
  x = {"x": jnp.array([1.0], BF16)}
  y = {"x": jnp.array([7.0], BF16)}
  out = mtree.add_scale(x, 0.3, y)
  assert out["x"].dtype == BF16
  assert float(out["x"][0]) == 3.09375


def test_zeros_like_keeps_dtype_and_shape():
  a, _ = _ab()
  z = mtree.zeros_like(a)
  assert z["w"].dtype == F32 and z["b"].dtype == BF16
  assert z["w"].shape == (3,) and z["b"].shape == (1,)
  assert not np.any(np.asarray(z["w"])) and not np.any(
      np.asarray(z["b"], np.float32)
  )


# ----------------------------------------------------------------------------
# Reductions.


def _rand_trees():
  rng = np.random.default_rng(0)
  a = {
      "m": rng.normal(size=(3, 4)).astype(np.float32),
      "v": [rng.normal(size=5).astype(np.float32)],
      "s": np.float32(rng.normal()),
  }
  b = jax.tree.map(lambda x: (np.float32(0.5) * x + 1).astype(np.float32), a)
  return a, b


def _flat(t):
  return np.concatenate(
      [np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(t)]
  )


def test_vdot_l1_l2_cosine_against_numpy():
  a, b = _rand_trees()
  fa, fb = _flat(a), _flat(b)
  np.testing.assert_allclose(float(mtree.vdot(a, b)), fa @ fb, rtol=1e-5)
  np.testing.assert_allclose(
      float(mtree.l1_norm(a)), np.abs(fa).sum(), rtol=1e-5
  )
  np.testing.assert_allclose(
      float(mtree.l2_norm(a)), np.linalg.norm(fa), rtol=1e-5
  )
  want = fa @ fb / (np.linalg.norm(fa) * np.linalg.norm(fb))
  np.testing.assert_allclose(float(mtree.cosine(a, b)), want, rtol=1e-5)
  for f in (mtree.vdot(a, b), mtree.l1_norm(a), mtree.l2_norm(a)):
    assert f.dtype == F32 and f.shape == ()


def test_reductions_hand_computed():
  a = {"x": jnp.array([3.0, -4.0]), "y": jnp.array(0.0)}
  b = {"x": jnp.array([1.0, 1.0]), "y": jnp.array(2.0)}
  assert float(mtree.vdot(a, b)) == -1.0  # 3 - 4 + 0
  assert float(mtree.l1_norm(a)) == 7.0  # 3 + 4
  assert float(mtree.l2_norm(a)) == 5.0  # sqrt(9 + 16)
  # cos(a, -a) = -1; cos(a, a) = 1
  np.testing.assert_allclose(float(mtree.cosine(a, a)), 1.0, rtol=1e-6)
  neg = jax.tree.map(jnp.negative, a)
  np.testing.assert_allclose(float(mtree.cosine(a, neg)), -1.0, rtol=1e-6)


def test_reductions_bfloat16_accumulate_in_float32():
  # sum of [256, 1, 1] is 258 in float32 (256 in bf16 step by step).
  a = {"x": jnp.array([256.0, 1.0, 1.0], BF16)}
  ones = {"x": jnp.ones(3, BF16)}
  assert float(mtree.vdot(a, ones)) == 258.0
  assert float(mtree.l1_norm(a)) == 258.0
  assert mtree.vdot(a, ones).dtype == F32


def test_cosine_of_zero_tree_is_zero_not_nan():
  z = {"x": jnp.zeros(3), "y": jnp.zeros(())}
  a = {"x": jnp.array([1.0, 2.0, 3.0]), "y": jnp.array(1.0)}
  assert float(mtree.cosine(z, a)) == 0.0
  assert float(mtree.cosine(a, z)) == 0.0
  c = mtree.cosine(z, z)
  assert not np.isnan(float(c)) and float(c) == 0.0


def test_num_elements():
  # 2 + 1 + 2 + 6 + 3 = 14
  assert mtree.num_elements(_nested()) == 14
  # a scalar leaf counts as one element
  assert mtree.num_elements({"a": jnp.zeros(()), "b": np.zeros((2, 0))}) == 1
  assert mtree.num_elements({}) == 0


# ----------------------------------------------------------------------------
# stack / unstack.


def test_stack_unstack_roundtrip():
  t0 = {"a": jnp.array([1.0, 2.0]), "b": Layer(jnp.zeros((2, 2)), 3.0)}
  t1 = {"a": jnp.array([3.0, 4.0]), "b": Layer(jnp.ones((2, 2)), 5.0)}
  s = mtree.stack([t0, t1])
  assert s["a"].shape == (2, 2) and s["b"].w.shape == (2, 2, 2)
  assert s["b"].b.shape == (2,)
  np.testing.assert_array_equal(s["a"], [[1.0, 2.0], [3.0, 4.0]])
  back = mtree.unstack(s)
  assert len(back) == 2
  for orig, got in zip([t0, t1], back):
    assert isinstance(got["b"], Layer)
    for x, y in zip(jax.tree.leaves(orig), jax.tree.leaves(got)):
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_stack_keeps_dtype():
  t = {"a": jnp.ones(2, BF16)}
  assert mtree.stack([t, t, t])["a"].dtype == BF16
  assert mtree.stack([t, t, t])["a"].shape == (3, 2)


def test_stack_empty_raises():
  with pytest.raises(ValueError, match="at least one tree"):
    mtree.stack([])


def test_stack_mismatch_names_path_and_tree_index():
  t0 = {"enc": {"w": jnp.zeros(2), "b": jnp.zeros(1)}}
  t1 = {"enc": {"w": jnp.zeros(2), "b": jnp.zeros(1)}}
  missing = {"enc": {"w": jnp.zeros(2)}}
  with pytest.raises(ValueError, match=r"tree 2 is missing leaf 'enc/b'"):
    mtree.stack([t0, t1, missing])
  bad_shape = {"enc": {"w": jnp.zeros(3), "b": jnp.zeros(1)}}
  with pytest.raises(ValueError, match=r"shape mismatch at 'enc/w'"):
    mtree.stack([t0, bad_shape])
  bad_dtype = {"enc": {"w": jnp.zeros(2, BF16), "b": jnp.zeros(1)}}
  with pytest.raises(ValueError, match=r"dtype mismatch at 'enc/w'"):
    mtree.stack([t0, bad_dtype])


def test_unstack_leaf_without_leading_axis_raises():
  with pytest.raises(ValueError, match=r"leaf 'b' has shape \(\)"):
    mtree.unstack({"a": jnp.zeros((2, 3)), "b": jnp.zeros(())})
  # leading sizes differ: 'b' has 3 where 2 is expected
  with pytest.raises(
      ValueError, match=r"leaf 'b' has shape \(3,\).*leading axis of size 2"
  ):
    mtree.unstack({"a": jnp.zeros((2, 3)), "b": jnp.zeros(3)})


def test_unstack_of_empty_tree_is_empty():
  assert mtree.unstack({}) == []


# ----------------------------------------------------------------------------
# select / mask.


def _params():
  return {
      "enc": {"layer_0": {"w": jnp.ones(2), "b": jnp.ones(1)}},
      "head": {"w": jnp.ones(3), "b": jnp.ones(1)},
  }


def test_select_include_exclude_lists():
  p = _params()
  assert mtree.select(p) == {
      "enc": {"layer_0": {"w": True, "b": True}},
      "head": {"w": True, "b": True},
  }
  assert mtree.select(p, include="^enc/") == {
      "enc": {"layer_0": {"w": True, "b": True}},
      "head": {"w": False, "b": False},
  }
  assert mtree.select(p, exclude=["^head", "/b$"]) == {
      "enc": {"layer_0": {"w": True, "b": False}},
      "head": {"w": False, "b": False},
  }
  # include is a union, exclude wins over include; re.search (not match)
  assert mtree.select(p, include=["layer_0/w", "head/w"], exclude="head") == {
      "enc": {"layer_0": {"w": True, "b": False}},
      "head": {"w": False, "b": False},
  }


def test_mask_zeroes_unselected_leaves():
  p = _params()
  m = mtree.mask(p, include="/w$", exclude="^head")
  np.testing.assert_array_equal(m["enc"]["layer_0"]["w"], [1.0, 1.0])
  np.testing.assert_array_equal(m["enc"]["layer_0"]["b"], [0.0])
  np.testing.assert_array_equal(m["head"]["w"], [0.0, 0.0, 0.0])
  assert m["head"]["w"].shape == (3,)


def test_invalid_regex_raises_value_error():
  with pytest.raises(ValueError, match=re.escape("invalid path regex '(enc'")):
    mtree.select(_params(), include="(enc")
  with pytest.raises(ValueError, match="invalid path regex"):
    mtree.mask(_params(), exclude=["ok", "[unclosed"])
  with pytest.raises(ValueError, match="invalid path regex"):
    mtree.rules_to_tree(_params(), [("*bad", 1.0)])


# ----------------------------------------------------------------------------
# rules_to_tree.


def test_rules_to_tree_first_match_wins():
  p = _params()
  out = mtree.rules_to_tree(
      p, [("^enc/.*/w$", 0.1), ("^enc", 0.2), (".*", 1.0)]
  )
  # enc/layer_0/w matches rule 0 (and 1, 2): first wins -> 0.1
  assert out == {
      "enc": {"layer_0": {"w": 0.1, "b": 0.2}},
      "head": {"w": 1.0, "b": 1.0},
  }


def test_rules_to_tree_default_value():
  p = _params()
  out = mtree.rules_to_tree(p, [("^head", 0.0)], default=0.5)
  assert out == {
      "enc": {"layer_0": {"w": 0.5, "b": 0.5}},
      "head": {"w": 0.0, "b": 0.0},
  }


def test_rules_to_tree_array_values():
  p = {"a": jnp.zeros(2), "b": jnp.zeros(2)}
  out = mtree.rules_to_tree(p, [("a", jnp.array([1.0, 2.0])), ("b", 3.0)])
  np.testing.assert_array_equal(out["a"], [1.0, 2.0])
  assert out["b"] == 3.0


def test_rules_to_tree_strict_errors():
  p = _params()
  with pytest.raises(ValueError, match=r"no rule matches leaf 'enc/layer_0/b'"):
    mtree.rules_to_tree(p, [("^head", 1.0), ("/w$", 2.0)])
  with pytest.raises(ValueError, match=r"rule '\^dec' matches no leaf"):
    mtree.rules_to_tree(p, [("^dec", 1.0), (".*", 2.0)])
  # a rule shadowed by an earlier one never matches first: also an error
  with pytest.raises(ValueError, match=r"rule 'head' matches no leaf"):
    mtree.rules_to_tree(p, [(".*", 1.0), ("head", 2.0)])


def test_rules_to_tree_non_strict():
  p = {"a": jnp.zeros(1), "b": jnp.zeros(1)}
  out = mtree.rules_to_tree(p, [("^a", 3.0), ("^zzz", 4.0)], strict=False)
  assert out["a"] == 3.0 and out["b"] is None
  out = mtree.rules_to_tree(p, [("^a", 3.0)], default=7.0, strict=False)
  assert out == {"a": 3.0, "b": 7.0}


# ----------------------------------------------------------------------------
# assert_same_structure.


def _ref():
  return {
      "enc": {"b": jnp.zeros(3), "w": jnp.zeros((2, 3))},
      "head": jnp.zeros(4),
  }


def test_assert_same_structure_passes_on_equal():
  mtree.assert_same_structure(_ref(), _ref())  # no exception
  mtree.assert_same_structure(_nested(), _nested())


def test_assert_same_structure_missing_leaf():
  b = _ref()
  del b["enc"]["b"]
  del b["head"]
  # first missing in a's order: enc/b (before head)
  with pytest.raises(ValueError, match=r"^second is missing leaf 'enc/b'$"):
    mtree.assert_same_structure(_ref(), b)


def test_assert_same_structure_extra_leaf():
  b = _ref()
  b["enc"]["z"] = jnp.zeros(1)
  b["x"] = jnp.zeros(1)
  with pytest.raises(ValueError, match=r"^second has extra leaf 'enc/z'$"):
    mtree.assert_same_structure(_ref(), b)


def test_assert_same_structure_shape_mismatch():
  b = _ref()
  b["enc"]["w"] = jnp.zeros((3, 2))
  b["head"] = jnp.zeros(5)
  with pytest.raises(
      ValueError,
      match=re.escape(
          "shape mismatch at 'enc/w': first float32[2, 3] vs second "
          "float32[3, 2]"
      ),
  ):
    mtree.assert_same_structure(_ref(), b)
  mtree.assert_same_structure(_ref(), b, check_shapes=False)


def test_assert_same_structure_dtype_mismatch_and_names():
  b = _ref()
  b["head"] = jnp.zeros(4, BF16)
  with pytest.raises(
      ValueError,
      match=re.escape(
          "dtype mismatch at 'head': pre float32[4] vs ft bfloat16[4]"
      ),
  ):
    mtree.assert_same_structure(_ref(), b, names=("pre", "ft"))
  mtree.assert_same_structure(_ref(), b, check_dtypes=False)


def test_assert_same_structure_container_type_differs():
  # same paths ("0", "1") but list vs tuple containers
  with pytest.raises(ValueError, match="tree structure differs"):
    mtree.assert_same_structure(
        [jnp.zeros(1), jnp.zeros(1)], (jnp.zeros(1), jnp.zeros(1))
    )


def test_dtype_of_a_string_leaf_is_a_string_dtype():
  # np.result_type("float32") would read the string as a dtype name.
  assert mtree.dtype_of("float32").kind == "U"
  assert mtree.dtype_of(b"vit").kind == "S"
  assert not mtree.is_floating("float32")
