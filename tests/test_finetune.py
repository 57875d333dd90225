"""experiments/finetune.py: smoke runs, frozen head, linearised, resume."""

import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from mtx import checkpoint
from mtx import models
from mtx import ntk
from mtx import tree as mtree

import binaries
from experiments import finetune_lib
from experiments.configs import finetune as finetune_config

_ROOT = pathlib.Path(__file__).resolve().parents[1]


def _finetune():
  return binaries.load("finetune")


_MLP = ("--config.model=mlp", "--config.model_preset=tiny")


def _config(**overrides):
  c = finetune_config.get_config("smoke")
  c.model, c.model_preset = "mlp", "tiny"
  c.update(overrides)
  return c


def _read(workdir, name):
  return checkpoint.restore(pathlib.Path(workdir) / name)


def test_smoke_in_process_with_flags(tmp_path):
  finetune = _finetune()
  binaries.run_main(
      finetune,
      [
          "finetune",
          f"--config={_ROOT / 'experiments/configs/finetune.py'}:smoke",
          f"--workdir={tmp_path}",
          *_MLP,
      ],
  )
  m = json.loads((tmp_path / "metrics.json").read_text())
  assert [h["step"] for h in m["history"]] == [4, 8]
  assert 0.0 <= m["final"]["test_accuracy"] <= 1.0
  assert m["final"]["pretrained_test_accuracy"] > 0.5  # the fitted head
  pre, ft = _read(tmp_path, "pretrained"), _read(tmp_path, "finetuned")
  tv = _read(tmp_path, "task_vector")
  np.testing.assert_allclose(
      mtree.l2_norm(mtree.sub(mtree.sub(ft, pre), tv)), 0.0, atol=1e-6
  )
  assert float(mtree.l2_norm(tv["encoder"])) > 0
  # Frozen head (the default): exactly unchanged.
  np.testing.assert_array_equal(ft["head"]["kernel"], pre["head"]["kernel"])
  assert (
      checkpoint.read_metadata(tmp_path / "task_vector")["linearized"] is False
  )
  with pytest.raises(Exception, match="unexpected arguments"):
    finetune.main(["finetune", "stray"])


def test_trainable_head_and_label_smoothing(tmp_path):
  m = finetune_lib.run(
      _config(head="zeros", freeze_head=False, label_smoothing=0.1),
      tmp_path,
  )
  pre, ft = _read(tmp_path, "pretrained"), _read(tmp_path, "finetuned")
  assert float(np.abs(pre["head"]["kernel"]).max()) == 0.0
  assert float(np.abs(ft["head"]["kernel"]).max()) > 0.0
  assert m["config"]["label_smoothing"] == 0.1


def test_linearized_run_is_the_linear_model(tmp_path):
  m = finetune_lib.run(_config(linearized=True), tmp_path)
  pre, ft = _read(tmp_path, "pretrained"), _read(tmp_path, "finetuned")
  assert checkpoint.read_metadata(tmp_path / "finetuned")["linearized"]
  # Reported test accuracy is that of the linearised model at `ft`.
  clf = models.classifier(models.get("mlp", "tiny"), 10)
  task = finetune_lib.load_task(_config())
  f = jax.jit(ntk.linearize(clf.apply, include="^encoder/"))
  acc = np.mean(
      np.argmax(f(pre, ft, task["test"].images), -1) == task["test"].labels
  )
  np.testing.assert_allclose(acc, m["final"]["test_accuracy"], atol=1e-6)


def test_pretrained_checkpoint_and_mismatch(tmp_path):
  enc = models.get("mlp", "tiny")
  p = enc.init(jax.random.key(3), np.zeros((1, 8, 8, 1), np.float32))
  checkpoint.save(tmp_path / "pre", p)
  finetune_lib.run(
      _config(
          pretrained=str(tmp_path / "pre"),
          steps=2,
          warmup_steps=1,
          eval_every=2,
          checkpoint_every=2,
      ),
      tmp_path / "ok",
  )
  got = _read(tmp_path / "ok", "pretrained")["encoder"]
  np.testing.assert_array_equal(
      got["dense_0"]["kernel"], p["dense_0"]["kernel"]
  )
  bad = models.get("mlp", hidden=(5,)).init(
      jax.random.key(0), np.zeros((1, 8, 8, 1))
  )
  checkpoint.save(tmp_path / "bad", bad)
  with pytest.raises(ValueError, match="does not fit model"):
    finetune_lib.run(_config(pretrained=str(tmp_path / "bad")), tmp_path / "x")


def _binary(workdir, *extra):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run(
      [
          sys.executable,
          str(_ROOT / "experiments" / "finetune.py"),
          f"--config={_ROOT / 'experiments/configs/finetune.py'}:smoke",
          f"--workdir={workdir}",
          *_MLP,
          *extra,
      ],
      capture_output=True,
      text=True,
      env=env,
      timeout=600,
  )


def test_kill_and_resume_subprocess_matches_uninterrupted(tmp_path):
  ref = tmp_path / "ref"
  finetune_lib.run(_config(linearized=True), ref)
  run = tmp_path / "run"
  killed = _binary(run, "--config.linearized=True", "--kill_at_step=6")
  assert killed.returncode == -9, killed.stderr[-2000:]
  assert not (run / "metrics.json").exists()
  assert checkpoint.Manager(run / "checkpoints").latest_step() == 4
  resumed = _binary(run, "--config.linearized=True")
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  assert "resumed from step 4" in resumed.stderr
  a, b = _read(ref, "task_vector"), _read(run, "task_vector")
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)
  ha = json.loads((ref / "metrics.json").read_text())["history"]
  hb = json.loads((run / "metrics.json").read_text())["history"]
  assert ha == hb
