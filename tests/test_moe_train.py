"""MoE transformer and experiments/moe_train.py.

One device in-process: forward/grad, causality, upcycling, sharding rules,
the binary in smoke mode. In subprocesses: the sharded model on 8 faked
devices (tests/moe_train_multidevice.py), the binary on 8 faked devices
killed and resumed, and the same binary as 2 jax.distributed processes
(gloo) x 4 faked devices against 1 process x 8 devices on the same global
mesh. The subprocesses share a persistent compilation cache and compile at
XLA's lowest backend optimisation level to keep the test short.
"""

import dataclasses
import fcntl
import functools
import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtx import checkpoint
from mtx import models
from mtx.models import moe_transformer as mt

import binaries
from experiments import moe_train_data
from experiments import moe_train_lib
from experiments.configs import moe_train as moe_train_config

_ROOT = pathlib.Path(__file__).resolve().parents[1]

P = jax.sharding.PartitionSpec
_SMOKE = f"--config={_ROOT / 'experiments/configs/moe_train.py'}:smoke"
_TINY = mt.CONFIGS["tiny"]
# Tests compile at XLA's cheapest settings (3x faster compiles on CPU).
_FAST = {
    "xla_backend_optimization_level": 0,
    "xla_llvm_disable_expensive_passes": True,
}
_jit = functools.partial(jax.jit, compiler_options=_FAST)


# ----------------------------------------------------------------------------
# The model on one device.


def test_forward_grad_and_aux_on_one_device():
  # Dropless in eval mode: routing is per token, so the LM is exactly causal.
  # (Both blocks MoE; the dense blocks are covered by the other tests.)
  config = dataclasses.replace(_TINY, moe_every=1, eval_capacity_factor=None)
  m = models.get("moe_transformer", "tiny", moe_every=1,
                 eval_capacity_factor=None)  # fmt: skip
  assert m.config == config
  tokens = jax.random.randint(jax.random.key(1), (4, 13), 0, 128)
  params = m.init(jax.random.key(0), tokens)
  assert sorted(k for k in params if k.startswith("block_")) == [
      "block_0",
      "block_1",
  ]
  assert params["block_1"]["moe"]["experts"]["wi"].shape == (8, 32, 64)
  assert "moe" in params["block_0"] and "mlp" not in params["block_0"]

  apply = _jit(m.apply, static_argnames="train")
  logits, aux = apply(params, tokens[:, :-1])
  assert logits.shape == (4, 12, 128) and logits.dtype == jnp.float32
  assert sorted(aux["layers"]) == ["block_0", "block_1"]
  want = sum(
      1e-2 * a["load_balance_loss"] + 1e-3 * a["router_z_loss"]
      for a in aux["layers"].values()
  )
  np.testing.assert_allclose(aux["loss"], want, rtol=1e-6)
  for a in aux["layers"].values():
    np.testing.assert_allclose(np.sum(a["expert_load"]), 1.0, rtol=1e-5)
    assert float(a["drop_fraction"]) == 0.0  # dropless eval
  # Causal: changing the last token changes no earlier position.
  changed = tokens.at[:, -2].set((tokens[:, -2] + 1) % 128)
  logits2, _ = apply(params, changed[:, :-1])
  np.testing.assert_array_equal(logits2[:, :-1], logits[:, :-1])
  assert float(jnp.abs(logits2[:, -1] - logits[:, -1]).max()) > 0

  def loss(p):
    return mt.next_token_loss(m.apply, p, tokens, train=True)

  (total, aux), grads = _jit(jax.value_and_grad(loss, has_aux=True))(params)
  np.testing.assert_allclose(
      total, aux["cross_entropy"] + aux["loss"], rtol=1e-6
  )
  assert 4.0 < float(aux["cross_entropy"]) < 6.0  # ~ log(128) at init
  norms = {
      k: float(jnp.linalg.norm(v))
      for k, v in zip(
          ("router", "wi", "emb"),
          (
              grads["block_0"]["moe"]["router"]["kernel"],
              grads["block_1"]["moe"]["experts"]["wi"],
              grads["embed"]["embedding"],
          ),
      )
  }
  assert all(np.isfinite(v) and v > 0 for v in norms.values()), norms


def test_config_errors():
  with pytest.raises(ValueError, match="needs model\\(config, mesh=\\)"):
    mt.model(dataclasses.replace(_TINY, backend="expert_parallel"))
  with pytest.raises(ValueError, match="unknown router"):
    mt.model(dataclasses.replace(_TINY, router="nope"))
  with pytest.raises(ValueError, match="multiple of num_heads"):
    mt.model(dataclasses.replace(_TINY, num_heads=5))
  m = mt.model(dataclasses.replace(_TINY, group_size=5))
  p = jax.eval_shape(m.init, jax.random.key(0))
  with pytest.raises(ValueError, match="group_size=5"):
    jax.eval_shape(m.apply, p, jnp.zeros((2, 8), jnp.int32))
  with pytest.raises(ValueError, match="exceeds max_len"):
    jax.eval_shape(m.apply, p, jnp.zeros((1, 65), jnp.int32))


def test_upcycled_model_equals_dense():
  dense_model = mt.model(dataclasses.replace(_TINY, moe_every=0))
  dense = dense_model.init(jax.random.key(2))
  assert not any("moe" in k for k in jax.tree_util.keystr(dense).split())
  # Top-2 with renormalised gates, no drops: identical experts = the MLP.
  config = dataclasses.replace(
      _TINY, moe_every=1, capacity_factor=None, eval_capacity_factor=None
  )
  upcycled = mt.upcycle(dense, config, key=jax.random.key(3), router_std=0.5)
  assert "mlp" not in upcycled["block_0"]
  np.testing.assert_array_equal(
      upcycled["block_1"]["moe"]["experts"]["wo"][5],
      dense["block_1"]["mlp"]["wo"],
  )
  tokens = jax.random.randint(jax.random.key(4), (2, 16), 0, 128)
  want, aux_dense = _jit(dense_model.apply)(dense, tokens)
  assert aux_dense["layers"] == {} and float(aux_dense["loss"]) == 0.0
  got, aux = _jit(mt.model(config).apply)(upcycled, tokens)
  np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-5)
  assert float(aux["layers"]["block_0"]["router_entropy"]) > 0
  # With noise the experts differ, and so does the output.
  noisy = mt.upcycle(dense, config, key=jax.random.key(3), noise_std=0.05)
  got2, _ = _jit(mt.model(config).apply)(noisy, tokens)
  assert float(jnp.abs(got2 - want).max()) > 1e-3
  with pytest.raises(ValueError, match="dense version of the config"):
    mt.upcycle(upcycled, config)


def test_sharding_rules():
  mesh = jax.sharding.AbstractMesh((2, 4), ("data", "expert"))
  shapes = jax.eval_shape(mt.model(_TINY).init, jax.random.key(0))
  specs = jax.tree.map(lambda s: s.spec, mt.param_shardings(shapes, mesh))
  assert specs["block_1"]["moe"]["experts"]["wi"] == P("expert")
  assert specs["block_1"]["moe"]["router"]["kernel"] == P()
  assert specs["block_0"]["mlp"]["wi"] == P()
  assert specs["embed"]["embedding"] == P()
  assert mt.batch_sharding(mesh).spec == P(("data", "expert"))
  with pytest.raises(ValueError, match="moe/experts/wi.*not divisible"):
    mt.param_shardings(
        shapes, jax.sharding.AbstractMesh((1, 3), ("data", "expert"))
    )


# ----------------------------------------------------------------------------
# The binary's pieces and an in-process smoke run.


def test_mesh_specs_and_data():
  assert moe_train_lib.parse_mesh("expert=4, data=2") == (
      ("expert", "data"),
      (4, 2),
  )
  for bad, msg in (
      ("data=2", "exactly the axes"),
      ("data=2,expert=x", "bad size"),
      ("data=-1,expert=-1", "at most one"),
      ("data2,expert=1", "name=size"),
  ):
    with pytest.raises(ValueError, match=msg):
      moe_train_lib.parse_mesh(bad)
  with pytest.raises(ValueError, match="has 8 devices"):
    moe_train_lib.make_mesh("data=2,expert=4")
  zen = moe_train_data.load_text("zen")
  assert zen.startswith("The Zen of Python, by Tim Peters")
  assert len(moe_train_data.load_text("stdlib")) > 50_000
  ids = moe_train_data.encode(zen)
  assert ids.max() < 128 and moe_train_data.decode(ids[:7]) == "The Zen"
  a = moe_train_data.batch_starts(len(ids), 4, 17, step=3, seed=0)
  np.testing.assert_array_equal(
      a, moe_train_data.batch_starts(len(ids), 4, 17, step=3, seed=0)
  )
  assert a.max() <= len(ids) - 17


def _shared_root(tmp_path_factory) -> pathlib.Path:
  """A directory all pytest-xdist workers of this session share."""
  base = tmp_path_factory.getbasetemp()
  return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def _once(tmp_path_factory, name: str, make) -> pathlib.Path:
  """``make(dir)`` once per session, even across xdist workers; the dir."""
  root = _shared_root(tmp_path_factory)
  target = root / name
  with open(root / f"{name}.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
    if not (target / "DONE").exists():
      shutil.rmtree(target, ignore_errors=True)  # debris of a failure
      target.mkdir()
      make(target)
      (target / "DONE").touch()
  return target


def _smoke_in_process(workdir: pathlib.Path) -> None:
  binaries.run_main(
      binaries.load("moe_train"),
      ["moe_train", _SMOKE, f"--workdir={workdir}", "--mesh=data=1,expert=1"],
  )


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
  """The binary in smoke mode, in-process, on a 1-device mesh."""
  return _once(tmp_path_factory, "moe_smoke", _smoke_in_process)


def test_smoke_in_process_one_device(smoke_run):
  workdir = smoke_run
  m = _metrics(workdir)
  assert m["mesh"] == {"data": 1, "expert": 1}
  assert m["model"]["backend"] == "sort"  # expert axis 1: a local backend
  assert len(m["train_losses"]) == 8
  assert [h["step"] for h in m["history"]] == [2, 4, 6, 8]
  assert [e["step"] for e in m["evals"]] == [4, 8]
  assert m["train_losses"][-1] < m["train_losses"][0] - 0.5
  for h in m["history"]:
    assert 0.0 <= h["drop_fraction"] < 1.0 and h["load_balance_loss"] >= 1.0
    layer = h["layers"]["block_0"]
    np.testing.assert_allclose(sum(layer["expert_load"]), 1.0, 1e-5)
    assert 0.0 <= layer["drop_fraction"] < 1.0
  assert checkpoint.Manager(workdir / "checkpoints").all_steps() == [4, 8]
  params = checkpoint.restore(workdir / "params")
  assert sorted(params) == [
      "block_0", "embed", "ln_f", "pos_embed", "unembed"
  ]  # fmt: skip
  assert params["block_0"]["moe"]["experts"]["wi"].shape == (8, 32, 64)
  with pytest.raises(Exception, match="unexpected arguments"):
    binaries.load("moe_train").main(["moe_train", "stray"])


def test_resume_refuses_a_different_config(smoke_run, tmp_path):
  shutil.copytree(smoke_run / "checkpoints", tmp_path / "checkpoints")
  config = moe_train_config.get_config("smoke")
  config.learning_rate = 1.0
  with pytest.raises(ValueError, match="learning_rate: 0.003 -> 1.0"):
    moe_train_lib.run(
        config, tmp_path, mesh_spec="data=1,expert=1", log=lambda _: None
    )


# ----------------------------------------------------------------------------
# Subprocesses: 8 faked devices, kill and resume, 2 processes.


def _env(devices: int, cache: pathlib.Path) -> dict[str, str]:
  return dict(
      os.environ,
      JAX_PLATFORMS="cpu",
      XLA_FLAGS=(
          f"--xla_force_host_platform_device_count={devices}"
          " --xla_backend_optimization_level=0"
          " --xla_llvm_disable_expensive_passes=true"
      ),
      JAX_COMPILATION_CACHE_DIR=str(cache),
      JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
  )


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
  path = _shared_root(tmp_path_factory) / "moe_jax_cache"
  path.mkdir(exist_ok=True)
  return path


def _binary(workdir, cache, *extra, devices=8, wait=True):
  cmd = [
      sys.executable,
      str(_ROOT / "experiments" / "moe_train.py"),
      _SMOKE,
      f"--workdir={workdir}",
      "--mesh=data=2,expert=4",
      *extra,
  ]
  kw = dict(env=_env(devices, cache), text=True)
  if not wait:
    return subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **kw
    )
  return subprocess.run(cmd, capture_output=True, timeout=600, **kw)


def _restore(path):
  """A checkpoint written on 8 (faked) devices, onto this process's device."""
  one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return checkpoint.restore(path, shardings=one)


def _metrics(workdir):
  return json.loads((pathlib.Path(workdir) / "metrics.json").read_text())


def test_sharded_model_on_8_faked_devices(cache_dir):
  proc = subprocess.run(
      [sys.executable, str(_ROOT / "tests" / "moe_train_multidevice.py")],
      env=_env(8, cache_dir),
      capture_output=True,
      text=True,
      timeout=600,
  )
  assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
  assert proc.stdout.strip().endswith("passed"), proc.stdout[-2000:]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cache_dir):
  """The uninterrupted 1-process run on 8 faked devices."""

  def make(workdir):
    proc = _binary(workdir, cache_dir)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "backend=expert_parallel" in proc.stderr

  return _once(tmp_path_factory, "moe_ref", make)


def test_expert_parallel_run_on_8_devices_matches_one_device(
    reference, smoke_run
):
  # Same routing groups (one per sequence), so the same training run up to
  # float summation order: sharded == unsharded through 8 optimizer steps.
  one, eight = _metrics(smoke_run), _metrics(reference)
  assert eight["model"]["backend"] == "expert_parallel"
  assert eight["mesh"] == {"data": 2, "expert": 4}
  np.testing.assert_allclose(
      eight["train_losses"], one["train_losses"], rtol=1e-5
  )
  for a, b in zip(eight["history"], one["history"]):
    np.testing.assert_allclose(
        a["layers"]["block_0"]["expert_load"],
        b["layers"]["block_0"]["expert_load"],
        atol=1e-5,
    )
    np.testing.assert_allclose(a["drop_fraction"], b["drop_fraction"], 1e-5)


def test_kill_and_resume_on_8_devices_matches_uninterrupted(
    tmp_path, reference, cache_dir
):
  killed = _binary(tmp_path, cache_dir, "--kill_at_step=6")
  assert killed.returncode == -9, killed.stderr[-4000:]
  assert not (tmp_path / "metrics.json").exists()
  assert checkpoint.Manager(tmp_path / "checkpoints").latest_step() == 4
  resumed = _binary(tmp_path, cache_dir)
  assert resumed.returncode == 0, resumed.stderr[-4000:]
  assert "resumed from step 4" in resumed.stderr
  a, b = _metrics(reference), _metrics(tmp_path)
  assert a["train_losses"] == b["train_losses"]  # bit for bit
  assert a["history"] == b["history"] and a["evals"] == b["evals"]
  pa, pb = _restore(reference / "params"), _restore(tmp_path / "params")
  for x, y in zip(jax.tree.leaves(pa), jax.tree.leaves(pb)):
    np.testing.assert_array_equal(x, y)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _gloo_available() -> bool:
  """False only where this jaxlib is known to lack gloo CPU collectives."""
  try:
    from jax._src.lib import _jax  # pylint: disable=g-import-not-at-top
  except ImportError:  # moved: let the test run (and fail loudly)
    return True
  return hasattr(_jax, "make_gloo_tcp_collectives")


def _two_processes(workdir, cache, *extra) -> list[tuple[int, str]]:
  """Runs the binary as 2 jax.distributed processes x 4 faked devices."""
  coordinator = f"--coordinator=127.0.0.1:{_free_port()}"
  procs = [
      _binary(
          workdir,
          cache,
          coordinator,
          "--num_processes=2",
          f"--process_id={i}",
          *extra,
          devices=4,
          wait=False,
      )
      for i in range(2)
  ]
  outs = []
  try:
    for p in procs:
      outs.append(p.communicate(timeout=600)[0])
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  return [(p.returncode, out) for p, out in zip(procs, outs)]


@pytest.mark.skipif(
    not _gloo_available(), reason="this jaxlib has no gloo CPU collectives"
)
def test_two_processes_match_one_process(tmp_path, reference, cache_dir):
  # Both processes write their shards of the step-4 checkpoint, then die.
  killed = _two_processes(tmp_path, cache_dir, "--kill_at_step=6")
  for rc, out in killed:
    assert rc != 0, out[-4000:]
  assert not (tmp_path / "metrics.json").exists()
  assert checkpoint.Manager(tmp_path / "checkpoints").latest_step() == 4
  # Both restore their shards and finish.
  resumed = _two_processes(tmp_path, cache_dir)
  for i, (rc, out) in enumerate(resumed):
    assert rc == 0, out[-4000:]
    assert f"[process {i}] resumed from step 4" in out, out[-4000:]
  assert "over 2 process(es)" in resumed[0][1]
  one, two = _metrics(reference), _metrics(tmp_path)
  assert two["num_processes"] == 2 and two["mesh"] == one["mesh"]
  # The loss curve (steps 1-4 from the killed run, 5-8 from the resumed
  # one) is the 1-process curve up to cross-process summation order.
  np.testing.assert_allclose(
      two["train_losses"], one["train_losses"], rtol=1e-5
  )
  np.testing.assert_allclose(
      [e["val_loss"] for e in two["evals"]],
      [e["val_loss"] for e in one["evals"]],
      rtol=1e-5,
  )
  assert checkpoint.Manager(tmp_path / "checkpoints").all_steps() == [4, 8]
  pa, pb = _restore(reference / "params"), _restore(tmp_path / "params")
  for x, y in zip(jax.tree.leaves(pa), jax.tree.leaves(pb)):
    np.testing.assert_allclose(x, y, atol=1e-5)
