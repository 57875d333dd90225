r"""Merge checkpoints on disk: safetensors / Hugging Face folders or orbax.

Task arithmetic over a scale sweep (one output per scale under --out):

  python experiments/merge.py --pretrained=/ckpt/base \
    --finetuned=/ckpt/math,/ckpt/code --method=task_arithmetic \
    --scales=0.3,0.5,1.0 --out=/tmp/merged

TIES with hyperparameters, bfloat16 output in 2 GB shards:

  python experiments/merge.py --pretrained=/ckpt/base \
    --finetuned=/ckpt/math,/ckpt/code --method=ties \
    --hparam=density=0.2 --hparam=scope=per_leaf --scales=1.0 \
    --dtype=bfloat16 --shard_size=2GB --out=/tmp/ties

A MergeKit config (the methods both support; see mtx.io.mergekit):

  python experiments/merge.py --config=merge.yaml --out=/tmp/merged

Merging on a device mesh (each tensor loaded sharded, merged there):

  python experiments/merge.py ... --mesh=data=4,model=2 \
    --shard_rule='embed_tokens=model,None'

The merge streams tensor by tensor from memory-mapped files (see
mtx.io.streaming): memory holds a few tensors times T, not the models, and the
output equals mtx.merging.merge on the loaded models. Outputs are written
atomically (a temporary folder renamed into place); an existing --out is
replaced only with --overwrite. Bad inputs end the run with a one-line error
naming the file and tensor, and a non-zero exit status.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence

from absl import app
from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

import mtx
from mtx.io import mergekit
from mtx.io import safetensors as st
from mtx.io import streaming

_PRETRAINED = flags.DEFINE_string(
    "pretrained", None, "The pretrained checkpoint θ0."
)
_FINETUNED = flags.DEFINE_list(
    "finetuned", [], "Comma-separated fine-tuned checkpoints."
)
_METHOD = flags.DEFINE_string(
    "method", None, "A merging method: a key of mtx.merging.METHODS."
)
_HPARAM = flags.DEFINE_multi_string(
    "hparam",
    [],
    "key=value hyperparameter of the method (repeatable); values parse as "
    "JSON (numbers, true/false, null, lists), else as strings.",
)
_SCALES = flags.DEFINE_list(
    "scales",
    ["1.0"],
    "Scale(s) λ: one value writes --out; several write --out/scale_<λ> each "
    "(one statistics pass serves them all).",
)
_INCLUDE = flags.DEFINE_multi_string(
    "include", None, "Path regex: merge only matching tensors (repeatable)."
)
_EXCLUDE = flags.DEFINE_multi_string(
    "exclude", None, "Path regex: keep matching tensors pretrained."
)
_OUT = flags.DEFINE_string("out", None, "Output path.")
_FORMAT = flags.DEFINE_enum(
    "format", "safetensors", ["safetensors", "orbax"], "Output format."
)
_SHARD_SIZE = flags.DEFINE_string(
    "shard_size", "2GB", "Bytes per safetensors shard (e.g. 2GB, 500MiB)."
)
_HASH_SOURCES = flags.DEFINE_bool(
    "hash_sources",
    True,
    "Record the SHA-256 of every source checkpoint's weight and config files"
    " in the output's metadata (reads each input once more).",
)
_OVERWRITE = flags.DEFINE_bool(
    "overwrite", False, "Replace an existing --out (once the new one is done)."
)
_DTYPE = flags.DEFINE_string(
    "dtype", None, "Output dtype of floating tensors (e.g. bfloat16)."
)
_CONFIG = flags.DEFINE_string(
    "config",
    None,
    "A MergeKit YAML config (replaces --pretrained, "
    "--finetuned, --method, --hparam and --scales).",
)
_SEED = flags.DEFINE_integer("seed", 0, "PRNG seed of random methods (DARE).")
_MESH = flags.DEFINE_string(
    "mesh", None, "Merge on a device mesh, e.g. data=4,model=2."
)
_SHARD_RULE = flags.DEFINE_multi_string(
    "shard_rule",
    [],
    "regex=spec layout of matching tensors on --mesh (first match wins), "
    "e.g. 'embed=model,None'; default: the largest divisible axis on model.",
)
_CHECK_FINITE = flags.DEFINE_bool(
    "check_finite", True, "Check every merged tensor for NaN/Inf first."
)

_ERRORS = (ValueError, FileNotFoundError, FileExistsError, KeyError)


def parse_value(text: str):
  """``"0.2"`` -> 0.2, ``"true"`` -> True, ``"[1, 2]"`` -> [1, 2], else str."""
  try:
    return json.loads(text)
  except json.JSONDecodeError:
    pass
  low = text.strip().lower()
  if low in ("true", "false"):
    return low == "true"
  if low == "none":
    return None
  return text


def parse_hparams(items: Sequence[str]) -> dict:
  out = {}
  for item in items:
    if "=" not in item:
      raise app.UsageError(f"--hparam {item!r} must look like key=value")
    k, v = item.split("=", 1)
    k = k.strip()
    if k in out:
      raise app.UsageError(f"--hparam {k} is given twice")
    out[k] = parse_value(v)
  return out


def _dtype(name: str | None):
  if name is None:
    return None
  try:
    dt = jnp.dtype(name)
  except TypeError:
    raise ValueError(f"unknown dtype {name!r}") from None
  if not jnp.issubdtype(dt, jnp.floating):
    raise ValueError(f"--dtype must be a floating dtype, got {name!r}")
  return dt


def _mesh(text: str | None):
  if text is None:
    if _SHARD_RULE.value:
      raise app.UsageError("--shard_rule needs --mesh")
    return None, ()
  shape, names = streaming.parse_mesh(text)
  need = int(np.prod(shape))
  if need != jax.device_count():
    raise ValueError(
        f"--mesh {text} needs {need} devices; {jax.device_count()} found"
    )
  rules = [streaming.parse_shard_rule(r) for r in _SHARD_RULE.value]
  return mtx.sharding.make_mesh(shape, names), rules


class _Progress:
  """Logs progress at most every few seconds (and at the end)."""

  def __init__(self, every: float = 5.0):
    self.every, self.last = every, 0.0

  def __call__(self, p: streaming.Progress) -> None:
    now = time.time()
    if p.done < p.total and now - self.last < self.every:
      return
    self.last = now
    if p.phase == "merge":
      eta = p.eta
      logging.info(
          "merge: %d/%d tensors, %.2f/%.2f GB read, %.0f s elapsed%s",
          p.done,
          p.total,
          p.bytes_done / 1e9,
          p.bytes_total / 1e9,
          p.elapsed,
          "" if eta is None else f", ETA {eta:.0f} s",
      )
    else:
      logging.info(
          "%s: %d/%d, %.0f s elapsed", p.phase, p.done, p.total, p.elapsed
      )


def _plan_from_flags():
  if _PRETRAINED.value is None or not _FINETUNED.value or not _METHOD.value:
    raise app.UsageError(
        "give --pretrained, --finetuned and --method (or --config)"
    )
  try:
    scales = [float(s) for s in _SCALES.value]
  except ValueError:
    raise app.UsageError(f"--scales must be numbers: {_SCALES.value}") from None
  if not scales:
    raise app.UsageError("--scales is empty")
  hparams = parse_hparams(_HPARAM.value)
  spec = streaming.Spec.of(_METHOD.value, hparams, scales=scales)
  spec.build()  # unknown hyperparameters fail before any file is read
  subdirs = None if len(scales) == 1 else [f"scale_{s:g}" for s in scales]
  record = {"method": _METHOD.value, "hparams": hparams, "scales": scales}
  return (
      _PRETRAINED.value,
      list(_FINETUNED.value),
      spec,
      subdirs,
      None,
      record,
  )


def _plan_from_config(path: str):
  for name, holder in [
      ("pretrained", _PRETRAINED),
      ("finetuned", _FINETUNED),
      ("method", _METHOD),
      ("hparam", _HPARAM),
  ]:
    if holder.value:
      raise app.UsageError(f"--config replaces --{name}; give one or the other")
  if flags.FLAGS["scales"].present:
    raise app.UsageError("--config replaces --scales (use lambda / weight)")
  recipe = mergekit.load(path)
  for note in recipe.notes:
    logging.warning("%s: %s", path, note)
  pre = streaming.open_model(recipe.pretrained)
  plan = recipe.plan(pre.paths)
  record = {"mergekit_config": recipe.config, "method": recipe.method}
  return pre, recipe.finetuned, plan, None, recipe.dtype, record


def run(argv: Sequence[str]) -> list[str]:
  """The merge; raises on bad input (``main`` turns that into one line)."""
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not _OUT.value:
    raise app.UsageError("--out is required")
  if _CONFIG.value:
    pre, fts, plan, subdirs, cfg_dtype, record = _plan_from_config(
        _CONFIG.value
    )
  else:
    pre, fts, plan, subdirs, cfg_dtype, record = _plan_from_flags()
  dtype = _dtype(_DTYPE.value or cfg_dtype)
  mesh, rules = _mesh(_MESH.value)
  t0 = time.time()
  sources = [os.fspath(getattr(pre, "path", pre))] + [os.fspath(f) for f in fts]
  hashes = {}
  if _HASH_SOURCES.value:
    from mtx import checkpoint  # pylint: disable=g-import-not-at-top

    for src in sources:
      if not os.path.exists(src):
        continue  # reported by the merge itself, with its own message
      files = [src]
      if os.path.isdir(src):  # the weights (and config), not unrelated files
        files = [
            os.path.join(src, n)
            for n in sorted(os.listdir(src))
            if n.endswith((".safetensors", ".json"))
        ] or [src]
      hashes[src] = checkpoint.content_hash(files)
    logging.info("hashed %d source checkpoints (sha256)", len(hashes))
  metadata = {
      "mtx_merge": {
          **record,
          "pretrained": sources[0],
          "finetuned": sources[1:],
          "sha256": hashes,
          "include": _INCLUDE.value,
          "exclude": _EXCLUDE.value,
          "seed": _SEED.value,
          "dtype": None if dtype is None else dtype.name,
          "mtx_version": mtx.__version__,
      }
  }
  outputs = streaming.merge_checkpoints(
      pre,
      fts,
      plan,
      _OUT.value,
      subdirs=subdirs,
      output_format=_FORMAT.value,
      shard_size=st.parse_size(_SHARD_SIZE.value),
      overwrite=_OVERWRITE.value,
      metadata=metadata,
      key=jax.random.key(_SEED.value),
      include=_INCLUDE.value,
      exclude=_EXCLUDE.value,
      check_finite=_CHECK_FINITE.value,
      dtype=dtype,
      mesh=mesh,
      shard_rules=rules,
      progress=_Progress(),
  )
  logging.info("wrote %s in %.1f s", ", ".join(outputs), time.time() - t0)
  return outputs


def main(argv: Sequence[str]) -> None:
  try:
    outputs = run(argv)
  except _ERRORS as e:
    msg = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
    raise SystemExit("merge: error: " + " ".join(msg.split())) from None
  for o in outputs:
    print(o)


if __name__ == "__main__":
  app.run(main)
