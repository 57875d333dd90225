"""The MoE language-model training loop behind experiments/moe_train.py.

Flag-free and importable: ``run(config, workdir, mesh_spec=...)`` trains
``mtx.models.moe_transformer`` as a character-level causal LM on a text
shipped with Python, on a ``(data, expert)`` device mesh, in one process or
under ``jax.distributed`` (call :func:`init_distributed` first), and resumes
from ``workdir`` after a kill. See experiments/moe_train.py for the outputs.

Determinism: the global batch of step ``s`` and its PRNG key are pure
functions of ``(seed, s)``; every process builds only the rows its devices
hold (:func:`moe_train_data.global_batch`). A resumed run therefore equals an uninterrupted
one bit for bit, and a run on ``n`` processes equals one process with the
same global mesh up to the summation order of the cross-process reductions.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np
import optax
from absl import logging

import mtx
from mtx import checkpoint
from mtx import sharding as sharding_lib
from mtx import training
from mtx import tree as mtree
from mtx.models import moe_transformer as mt

from experiments import moe_train_data as data_lib

# ----------------------------------------------------------------------------
# Mesh and distributed setup.


def parse_mesh(spec: str) -> tuple[tuple[str, ...], tuple[int, ...]]:
  """``"data=2,expert=4"`` -> ``(("data", "expert"), (2, 4))``.

  One size may be ``-1``: all remaining devices. Both ``data`` and
  ``expert`` must appear.

  >>> parse_mesh("data=2,expert=4")
  (('data', 'expert'), (2, 4))
  """
  names, sizes = [], []
  for part in filter(None, (p.strip() for p in spec.split(","))):
    name, eq, size = part.partition("=")
    if not eq or not name:
      raise ValueError(f"bad mesh axis {part!r} in {spec!r}; use name=size")
    try:
      n = int(size)
    except ValueError:
      raise ValueError(f"bad size {size!r} for mesh axis {name!r}") from None
    if n < 1 and n != -1:
      raise ValueError(f"mesh axis {name!r} has size {n}; use >= 1 or -1")
    names.append(name.strip())
    sizes.append(n)
  if sorted(names) != ["data", "expert"]:
    raise ValueError(
        f"the mesh needs exactly the axes 'data' and 'expert', got {names}"
    )
  if sizes.count(-1) > 1:
    raise ValueError(f"at most one mesh axis may be -1, got {spec!r}")
  return tuple(names), tuple(sizes)


def make_mesh(spec: str) -> jax.sharding.Mesh:
  """The global device mesh for ``spec`` (see :func:`parse_mesh`)."""
  names, sizes = parse_mesh(spec)
  total = jax.device_count()
  if -1 in sizes:
    known = int(np.prod([s for s in sizes if s != -1]))
    if total % known:
      raise ValueError(f"mesh {spec!r} does not divide {total} devices")
    sizes = tuple(total // known if s == -1 else s for s in sizes)
  if int(np.prod(sizes)) != total:
    raise ValueError(
        f"mesh {dict(zip(names, sizes))} has {int(np.prod(sizes))} devices;"
        f" there are {total} (over {jax.process_count()} process(es))"
    )
  # Auto axis types: XLA propagates the batch sharding through the dense
  # parts, and the local MoE backends (used when expert=1) run unchanged;
  # the expert-parallel layer shards explicitly inside its shard_map.
  return sharding_lib.make_mesh(sizes, names, explicit=False)


def init_distributed(
    coordinator: str | None, num_processes: int, process_id: int
) -> None:
  """``jax.distributed.initialize`` with gloo CPU collectives.

  Call before any JAX computation. With one process and no coordinator it
  does nothing.
  """
  if num_processes <= 1 and not coordinator:
    return
  if not coordinator:
    raise ValueError("multi-process runs need a coordinator address")
  if not 0 <= process_id < num_processes:
    raise ValueError(f"process_id={process_id} outside [0, {num_processes})")
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(
      coordinator, num_processes=num_processes, process_id=process_id
  )


# ----------------------------------------------------------------------------
# The model and the steps.


def build_model(config, mesh: jax.sharding.Mesh) -> mtx.models.Model:
  """The configured MoE transformer, expert parallel on ``mesh`` if asked."""
  base = mt.CONFIGS[config.model_preset]
  fields = dict(config.model_overrides)
  bad = sorted(set(fields) - {f.name for f in dataclasses.fields(base)})
  if bad:
    raise ValueError(f"unknown model_overrides {bad}")
  mc = dataclasses.replace(base, **fields)
  backend = config.backend
  if backend == "auto":
    backend = "expert_parallel" if mesh.shape["expert"] > 1 else mc.backend
  mc = dataclasses.replace(mc, backend=backend)
  if config.seq_len > mc.max_len:
    raise ValueError(
        f"seq_len={config.seq_len} exceeds the model's max_len={mc.max_len}"
    )
  return mt.model(mc, mesh=mesh)


# Per-MoE-layer metrics logged during training.
_LAYER_METRICS = ("expert_load", "drop_fraction", "load_balance_loss")


def make_train_step(
    model, optimizer, seed: int, *, out_shardings: Any = None
) -> Callable[..., Any]:
  """``step(params, opt_state, tokens [B, L+1], step) -> (params, opt, metrics)``.

  ``out_shardings``: optional ``(param shardings, optimizer-state
  shardings)``; the metrics are replicated.
  """

  def step(params, opt_state, tokens, step):
    key = jax.random.fold_in(jax.random.key(seed), step)
    loss = functools.partial(mt.next_token_loss, model.apply, train=True)
    (total, aux), grads = jax.value_and_grad(loss, has_aux=True)(
        params, tokens, key=key
    )
    updates, opt_state = optimizer.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    metrics = {
        "loss": aux["cross_entropy"],
        "total_loss": total,
        "aux_loss": aux["loss"],
        "load_balance_loss": aux["load_balance_loss"],
        "router_z_loss": aux["router_z_loss"],
        "drop_fraction": aux["drop_fraction"],
        "grad_norm": mtree.l2_norm(grads),
        "layers": {
            name: {k: m[k] for k in _LAYER_METRICS}
            for name, m in aux["layers"].items()
        },
    }
    return params, opt_state, metrics

  if out_shardings is not None:
    out_shardings = (*out_shardings, None)
  return jax.jit(step, donate_argnums=(0, 1), out_shardings=out_shardings)


def make_eval_step(model) -> Callable[..., Any]:
  """``eval_step(params, tokens) -> metrics`` (eval capacity factor)."""

  @jax.jit
  def eval_step(params, tokens):
    _, aux = mt.next_token_loss(model.apply, params, tokens, train=False)
    return {
        "val_loss": aux["cross_entropy"],
        "val_drop_fraction": aux["drop_fraction"],
    }

  return eval_step


# ----------------------------------------------------------------------------
# The loop.


def _write_json(path: Path, obj) -> None:
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text(json.dumps(obj, indent=2, sort_keys=True))
  os.replace(tmp, path)


def _summary(window: list[dict[str, Any]]) -> dict[str, Any]:
  """Means over the steps of one logging window, as JSON-able values."""
  mean = jax.tree.map(lambda *xs: np.mean(np.stack(xs), 0), *window)
  return jax.tree.map(lambda x: x.tolist(), mean)


def _format_loads(layers: dict[str, Any]) -> str:
  return "; ".join(
      f"{name} load [{' '.join(f'{v:.2f}' for v in m['expert_load'])}]"
      f" drop {100 * m['drop_fraction']:.1f}%"
      for name, m in layers.items()
  )


def _check_config(config, mesh) -> None:
  n_dev = mesh.size
  if config.batch_size % n_dev or config.eval_batch_size % n_dev:
    raise ValueError(
        f"batch_size={config.batch_size} and eval_batch_size="
        f"{config.eval_batch_size} must be multiples of the {n_dev} devices"
    )
  if config.checkpoint_every % config.log_every:
    raise ValueError(
        f"checkpoint_every={config.checkpoint_every} must be a multiple of"
        f" log_every={config.log_every}"
    )
  if config.steps < 1:
    raise ValueError(f"steps must be >= 1, got {config.steps}")
  if config.seq_len < 1:
    raise ValueError(f"seq_len must be >= 1, got {config.seq_len}")


# Config fields a resumed run must share with the checkpoint (the rest is
# bookkeeping, and the mesh may change: checkpoints restore onto any mesh).
_RUN_FIELDS = (
    "model_preset",
    "model_overrides",
    "text",
    "validation_fraction",
    "seq_len",
    "batch_size",
    "steps",
    "learning_rate",
    "warmup_steps",
    "weight_decay",
    "clip_norm",
    "seed",
)


def _run_fields(config) -> dict[str, Any]:
  d = config.to_dict()
  return json.loads(json.dumps({k: d[k] for k in _RUN_FIELDS}))


def _check_resume(saved: dict[str, Any], now: dict[str, Any]) -> None:
  diff = sorted(k for k in now if k in saved and saved[k] != now[k])
  if diff:
    raise ValueError(
        "the checkpoint in workdir was written with a different config ("
        + ", ".join(f"{k}: {saved[k]!r} -> {now[k]!r}" for k in diff)
        + "); use a fresh --workdir"
    )


def run(
    config,
    workdir: str | os.PathLike,
    *,
    mesh_spec: str = "data=-1,expert=1",
    kill_at_step: int | None = None,
    log: Callable[[str], None] = logging.info,
) -> dict[str, Any]:
  """Trains per ``config`` on the mesh ``mesh_spec``, resuming from ``workdir``.

  Every process of a multi-process run calls this with the same arguments
  (and a ``workdir`` on a shared file system); all of them write their
  checkpoint shards, process 0 writes ``metrics.json``.

  Args:
    config: see ``experiments/configs/moe_train.py``.
    workdir: output directory.
    mesh_spec: e.g. ``"data=2,expert=4"`` over all (global) devices.
    kill_at_step: testing only; SIGKILL every process right after this step
      (and its checkpoint, if one is due).
    log: progress sink.

  Returns:
    The metrics dict (also in ``workdir/metrics.json``).
  """
  t_start = time.time()
  workdir = Path(workdir)
  primary = jax.process_index() == 0
  if primary:
    workdir.mkdir(parents=True, exist_ok=True)
  prefix = (
      f"[process {jax.process_index()}] " if jax.process_count() > 1 else ""
  )
  mesh = make_mesh(mesh_spec)
  _check_config(config, mesh)
  model = build_model(config, mesh)
  mc = model.config

  ids = data_lib.encode(data_lib.load_text(config.text))
  train_ids, val_ids = data_lib.split_text(ids, config.validation_fraction)
  length = config.seq_len + 1
  if len(val_ids) < length:
    raise ValueError(
        f"the validation text has {len(val_ids)} characters, fewer than a"
        f" window of {length}; raise validation_fraction or lower seq_len"
    )
  tokens_sharding = mt.batch_sharding(mesh)
  val_starts = np.linspace(
      0, len(val_ids) - length, config.eval_batch_size
  ).astype(np.int64)
  val_batch = data_lib.global_batch(
      val_ids, val_starts, length, tokens_sharding
  )

  with jax.set_mesh(mesh):
    shapes = jax.eval_shape(model.init, jax.random.key(0))
    shardings = mt.param_shardings(shapes, mesh)
    params = jax.jit(model.init, out_shardings=shardings)(
        jax.random.key(config.seed)
    )
    opt = training.make_optimizer(
        learning_rate=config.learning_rate,
        steps=config.steps,
        warmup_steps=config.warmup_steps,
        weight_decay=config.weight_decay,
        clip_norm=config.clip_norm or None,
    )
    # The optimizer state's params-like leaves (Adam moments) take the
    # params' shardings, the rest (step counts) is replicated; the step
    # keeps both layouts, so it compiles once.
    replicated = jax.sharding.NamedSharding(mesh, jax.P())
    opt_shardings = optax.tree_map_params(
        opt,
        lambda _, s: s,
        jax.eval_shape(opt.init, shapes),
        shardings,
        transform_non_params=lambda _: replicated,
    )
    opt_state = jax.jit(opt.init, out_shardings=opt_shardings)(params)
    train_step = make_train_step(
        model, opt, config.seed, out_shardings=(shardings, opt_shardings)
    )
    eval_step = make_eval_step(model)

    manager = checkpoint.Manager(
        workdir / "checkpoints", max_to_keep=config.keep_checkpoints
    )
    history, evals, losses, start = [], [], [], 0
    latest = manager.latest_step()
    if latest is not None:
      state = manager.restore(
          latest, target={"params": params, "opt": opt_state}
      )
      params, opt_state = state["params"], state["opt"]
      meta = manager.metadata(latest)
      _check_resume(meta.get("run", {}), _run_fields(config))
      history, evals = meta["history"], meta["evals"]
      losses, start = meta["train_losses"], latest
      log(f"{prefix}resumed from step {latest} ({workdir / 'checkpoints'})")

    capacity = {
        name: mtx.moe.capacity(
            config.seq_len if mc.group_size is None else mc.group_size,
            mc.num_experts,
            mc.num_selected,
            factor,
        )
        for name, factor in (
            ("train", mc.capacity_factor),
            ("eval", mc.eval_capacity_factor),
        )
    }
    log(
        f"{prefix}{model.name} backend={mc.backend} mesh={dict(mesh.shape)}"
        f" over {jax.process_count()} process(es); "
        f"{sum(s.size for s in jax.tree.leaves(shapes)):,} params; capacity"
        " per expert"
        f" and group {capacity}; text {config.text!r}: {len(train_ids):,}"
        f" train / {len(val_ids):,} validation characters"
    )
    t0, t_log, done0, pending = time.time(), time.time(), start, []
    for step in range(start, config.steps):
      starts = data_lib.batch_starts(
          len(train_ids), config.batch_size, length, step, config.seed
      )
      tokens = data_lib.global_batch(train_ids, starts, length, tokens_sharding)
      params, opt_state, m = train_step(
          params, opt_state, tokens, np.int32(step)
      )
      pending.append(m)
      n = step + 1
      if n % config.log_every == 0 or n == config.steps:
        window = jax.device_get(pending)
        pending = []
        losses += [float(w["loss"]) for w in window]
        s = _summary(window)
        history.append({"step": n, **s})
        now = time.time()
        rate = (n - done0) / max(now - t_log, 1e-9)
        t_log, done0 = now, n
        log(
            f"{prefix}step {n}/{config.steps} loss {s['loss']:.4f} aux"
            f" {s['aux_loss']:.4f} (balance {s['load_balance_loss']:.3f},"
            f" z {s['router_z_loss']:.3f}) drop {100 * s['drop_fraction']:.1f}%"
            f" | {rate:.2f} steps/s ETA {(config.steps - n) / rate:.0f}s"
        )
        if s["layers"]:
          log(f"{prefix}step {n}: {_format_loads(s['layers'])}")
      if n % config.eval_every == 0 or n == config.steps:
        ev = {k: float(v) for k, v in eval_step(params, val_batch).items()}
        evals.append({"step": n, **ev})
        log(
            f"{prefix}step {n}: validation loss {ev['val_loss']:.4f}"
            f" (drop {100 * ev['val_drop_fraction']:.1f}%)"
        )
      if n % config.checkpoint_every == 0 or n == config.steps:
        manager.save(
            n,
            {"params": params, "opt": opt_state},
            metadata={
                "run": _run_fields(config),
                "history": history,
                "evals": evals,
                "train_losses": losses,
            },
        )
      if kill_at_step is not None and n == kill_at_step:
        os.kill(os.getpid(), signal.SIGKILL)
    manager.close()
    t_train = time.time() - t0
    checkpoint.save(
        workdir / "params",
        params,
        metadata={"model": dataclasses.asdict(mc), "steps": config.steps},
        overwrite=True,
    )

  metrics = {
      "config": config.to_dict(),
      "model": dataclasses.asdict(mc),
      "mesh": dict(mesh.shape),
      "num_processes": jax.process_count(),
      "num_devices": jax.device_count(),
      "capacity": capacity,
      "history": history,
      "evals": evals,
      "train_losses": losses,
      "final": {
          "train_loss": history[-1]["loss"],
          "val_loss": evals[-1]["val_loss"],
      },
      "timing_s": {"train": t_train, "total": time.time() - t_start},
      "mtx_version": mtx.__version__,
  }
  if primary:
    _write_json(workdir / "metrics.json", metrics)
  log(
      f"{prefix}done: train loss {metrics['final']['train_loss']:.4f},"
      f" validation loss {metrics['final']['val_loss']:.4f}; outputs in"
      f" {workdir}"
  )
  return metrics
