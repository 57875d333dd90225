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

The merge streams tensor by tensor from the files (see
mtx.io.streaming): memory holds a few tensors times T, not the models, and the
output equals mtx.merging.merge on the loaded models. Outputs are written
atomically (a temporary folder renamed into place); an existing --out is
replaced only with --overwrite, and only when it is an earlier output of this
binary. Bad inputs end the run with a one-line error
naming the file and tensor, and a non-zero exit status.

This is a tool like MergeKit's ``mergekit-yaml``, not an experiment: it takes
the merge on its flags (or a MergeKit YAML file as ``--config``), not an
ml_collections config, and writes to ``--out`` rather than a workdir. It runs
as ``python experiments/merge.py`` or ``python -m experiments.merge`` from
the repository root; ``--help`` lists the methods and their hyperparameters.

Safety: ``--out`` may not overlap an input (compared as real paths, so
symlinks are seen through); inputs are checked against the content hashes
their metadata records (``--noverify_inputs`` skips it); what a killed run
left beside ``--out`` (marked ``.partial-*`` folders) is removed by the next
run with the same ``--out``, and said so in the log. Tensors that are not
floating point (integer position ids, masks) pass through from the base
when identical in every model.
"""

from __future__ import annotations

if __package__ in (None, ""):  # run as a script: python experiments/merge.py
  import pathlib
  import sys

  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

# pylint: disable=g-import-not-at-top,wrong-import-position
from collections.abc import Sequence
import os
import time
import traceback

from absl import app
from absl import flags
from absl import logging
import jax
import numpy as np

from experiments import merge_lib
import mtx
from mtx.io import atomic
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
    "method",
    None,
    "A merging method (mtx.merging.METHODS); its hyperparameters go to "
    "--hparam:\n" + merge_lib.methods_help(),
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
    "overwrite",
    False,
    "Replace an existing --out (once the new one is done); only an earlier"
    " output of this binary is replaced, never another file or folder.",
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
_VERIFY_INPUTS = flags.DEFINE_bool(
    "verify_inputs",
    True,
    "Check every input against the content hashes its metadata records "
    "(orbax and safetensors written by mtx); --noverify_inputs skips it.",
)

# Errors reported as they are; anything else also names its type.
_EXPECTED = (ValueError, OSError, KeyError, app.UsageError)


parse_hparams = merge_lib.parse_hparams  # the flag parsers


def _mesh(text: str | None):
  if text is None:
    if _SHARD_RULE.value:
      raise ValueError("--shard_rule needs --mesh")
    return None, ()
  shape, names = merge_lib.parse_mesh(text)
  need = int(np.prod(shape))
  if need != jax.device_count():
    raise ValueError(
        f"--mesh {text} needs {need} devices; {jax.device_count()} found"
    )
  rules = [merge_lib.parse_shard_rule(r) for r in _SHARD_RULE.value]
  return mtx.sharding.make_mesh(shape, names), rules


def _open(path: str) -> streaming.Model:
  """Opens an input; a reader failure of any kind names the file."""
  try:
    return streaming.open_model(path, verify=_VERIFY_INPUTS.value)
  except (ValueError, OSError):
    raise
  except Exception as e:  # pylint: disable=broad-except
    msg = " ".join(str(e).split())[:300]
    raise ValueError(
        f"{path}: cannot be read ({type(e).__name__}: {msg})"
    ) from None


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


def _flag_plan():
  """(pretrained, finetuned, spec, subdirs, record) from the flags."""
  if _PRETRAINED.value is None or not _FINETUNED.value or not _METHOD.value:
    raise app.UsageError(
        "give --pretrained, --finetuned and --method (or --config)"
    )
  scales = merge_lib.parse_scales(_SCALES.value)
  hparams = merge_lib.parse_hparams(_HPARAM.value)
  spec = streaming.Spec.of(_METHOD.value, hparams, scales=scales)
  try:
    spec.build()  # unknown hyperparameters fail before any file is read
  except ValueError as e:
    raise ValueError(f"--method={_METHOD.value} / --hparam: {e}") from None
  subdirs = None if len(scales) == 1 else [f"scale_{s:g}" for s in scales]
  record = {"method": _METHOD.value, "hparams": hparams, "scales": scales}
  return _PRETRAINED.value, list(_FINETUNED.value), spec, subdirs, record


def _config_recipe(path: str) -> mergekit.Recipe:
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
  return recipe


def _source_hashes(sources: Sequence[str]) -> dict[str, str]:
  from mtx import checkpoint  # pylint: disable=g-import-not-at-top

  hashes = {}
  for src in sources:
    files = [src]
    if os.path.isdir(src):  # the weights (and config), not unrelated files
      files = [
          os.path.join(src, n)
          for n in sorted(os.listdir(src))
          if n.endswith((".safetensors", ".json"))
      ] or [src]
    hashes[src] = checkpoint.content_hash(files)
  logging.info("hashed %d source checkpoints (sha256)", len(hashes))
  return hashes


def run(argv: Sequence[str]) -> list[str]:
  """The merge; raises on bad input (``main`` turns that into one line)."""
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not _OUT.value:
    raise app.UsageError("--out is required")
  out = os.path.abspath(_OUT.value)
  # Every flag is parsed before any file is read.
  try:
    shard_size = st.parse_size(_SHARD_SIZE.value)
  except ValueError as e:
    raise ValueError(f"--shard_size: {e}") from None
  mesh, rules = _mesh(_MESH.value)
  recipe = None
  if _CONFIG.value:
    recipe = _config_recipe(_CONFIG.value)
    pre_path, ft_paths = recipe.pretrained, list(recipe.finetuned)
    subdirs, cfg_dtype = None, recipe.dtype
    record = {"mergekit_config": recipe.config, "method": recipe.method}
  else:
    pre_path, ft_paths, plan, subdirs, record = _flag_plan()
    cfg_dtype = None
  dtype = merge_lib.parse_dtype(_DTYPE.value or cfg_dtype)
  inputs = [pre_path, *ft_paths] + ([_CONFIG.value] if recipe else [])
  for src in inputs:
    if atomic.overlapping(out, src):
      raise ValueError(
          f"--out={_OUT.value} overlaps the input {src} (real paths "
          f"{os.path.realpath(out)} and {os.path.realpath(src)}); write the "
          "output elsewhere"
      )
  if atomic.occupied(out) and not _OVERWRITE.value:
    raise FileExistsError(f"--out={out} exists; pass --overwrite to replace it")
  if atomic.occupied(out):
    merge_lib.check_replaceable(out)
  if atomic.reclaim(out):
    logging.warning("reclaimed what interrupted runs left beside %s", out)
  t0 = time.time()
  pre = _open(pre_path)
  fts = [_open(f) for f in ft_paths]
  unverified = [m.path for m in (pre, *fts) if not m.verified]
  if _VERIFY_INPUTS.value and unverified:
    logging.info(
        "no recorded content hashes to verify: %s", ", ".join(unverified)
    )
  if recipe is not None:
    plan = recipe.plan(pre.paths)
  sources = [os.fspath(m.path) for m in (pre, *fts)]
  hashes = _source_hashes(sources) if _HASH_SOURCES.value else {}
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
      out,
      subdirs=subdirs,
      output_format=_FORMAT.value,
      shard_size=shard_size,
      overwrite=_OVERWRITE.value,
      metadata=metadata,
      verify=_VERIFY_INPUTS.value,
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


def one_line(e: BaseException) -> str:
  """``merge: error: <message>``, on one line; errors other than bad input
  (a bug) also name their type."""
  if isinstance(e, KeyError) and e.args:
    msg = str(e.args[0])
  elif isinstance(e, _EXPECTED):
    msg = str(e)
  else:
    msg = f"{type(e).__name__}: {e}"
  return "merge: error: " + (" ".join(msg.split()) or type(e).__name__)


def main(argv: Sequence[str]) -> None:
  try:
    outputs = run(argv)
  except Exception as e:  # pylint: disable=broad-except
    logging.vlog(1, "%s", traceback.format_exc())  # shown with -v 1
    raise SystemExit(one_line(e)) from None
  for o in outputs:
    print(o)


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with its errors as one line (not the usage)."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    raise SystemExit(one_line(ValueError(e))) from None


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
