# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     name: python3
# ---

# %% [markdown]
# # mtx quickstart: task vectors and model merging
#
# Task vectors, the merging registry, a scale sweep as one vmapped program,
# and TALL-mask retrieval, on a small model built here.

# %%
# Guarded install: only in a fresh Colab runtime.
try:
  import mtx
except ImportError:
  # Clone the repository to /content/mtx first, then:
  # %pip install -q -e /content/mtx
  pass

import os

import jax
import jax.numpy as jnp

import mtx

SMOKE = os.environ.get("SMOKE", "0") == "1"  # CI runs the notebook small
WIDTH = 16 if SMOKE else 256

# %% [markdown]
# ## A pretrained model and three fine-tuned copies

# %%
key = jax.random.key(0)
k_pre, k_ft = jax.random.split(key)
pre = {
    f"layers_{i}": {
        "kernel": jax.random.normal(
            jax.random.fold_in(k_pre, i), (WIDTH, WIDTH)
        )
        / WIDTH**0.5,
        "bias": jnp.zeros(WIDTH),
    }
    for i in range(3)
}
finetuned = [
    jax.tree.map(
        lambda x, t=t: x
        + 0.02 * jax.random.normal(jax.random.fold_in(k_ft, t), x.shape),
        pre,
    )
    for t in range(3)
]
tvs = [mtx.task_vectors.task_vector(pre, f) for f in finetuned]
print(
    "cosine similarity of the task vectors:\n",
    mtx.task_vectors.cosine_matrix(tvs),
)

# %% [markdown]
# ## Every training-free method behind one call

# %%
for name in ["task_arithmetic", "ties", "breadcrumbs", "consensus", "tsvm"]:
  merged = mtx.merging.merge(pre, finetuned, name, scale=0.5)
  delta = mtx.tree.l2_norm(mtx.tree.sub(merged, pre))
  print(f"{name:16s} |merged - pretrained| = {float(delta):.4f}")

# %% [markdown]
# ## A scale sweep as one compiled program

# %%
stacked = mtx.tree.stack(tvs)
ties = mtx.merging.get("ties", density=0.2)
stats = ties.prepare(stacked)  # global top-k thresholds, once
sweep = jax.jit(
    jax.vmap(lambda tv, s: ties.combine(tv, stats, scale=s), in_axes=(None, 0))
)
scales = jnp.linspace(0.1, 1.0, 10)
norms = jax.vmap(mtx.tree.l2_norm)(sweep(stacked, scales))
print(dict(zip(scales.round(2).tolist(), norms.round(4).tolist())))

# %% [markdown]
# ## TALL masks: one shared vector, every task's model back

# %%
mtl = mtx.task_vectors.multitask_vector(tvs)
masks = mtx.task_vectors.tall_masks(tvs, mtl, tall_lambda=0.4)
packed = mtx.task_vectors.pack_mask(masks)
model_0 = mtx.task_vectors.retrieve(pre, mtl, masks, 0)
kernel_masks = masks["layers_0"]["kernel"]  # [T, WIDTH, WIDTH] booleans
print("mask density per task:", jnp.mean(kernel_masks, axis=(1, 2)))
print(
    "packed mask bytes:", sum(b.nbytes for b in jax.tree.leaves(packed["bits"]))
)
compressed = mtx.task_vectors.compress(tvs[0], density=0.1)
print("ComPEFT storage:", mtx.task_vectors.storage_bytes(compressed))
