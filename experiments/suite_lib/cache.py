"""Stage bookkeeping: fingerprints (config, inputs and code), stamps, times.

A stage directory holds ``suite_stage.json``: the stage's fingerprint,
whether it finished, and the seconds it took in the run that computed it.
A rerun skips a stage whose stamp has the same fingerprint and reports the
recorded seconds, not the time it took to read the cache. Every fingerprint
includes :func:`code_hash`, so a change to any ``.py`` file of ``mtx/`` or
``experiments/`` recomputes every stage.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from mtx import checkpoint
from mtx import data as data_lib

STAMP = "suite_stage.json"
Log = Callable[[str], None]
_REPO = Path(__file__).resolve().parents[2]
# The sources whose content enters every fingerprint.
SOURCE_ROOTS = (_REPO / "mtx", _REPO / "experiments")


_CODE_HASHES: dict[tuple[str, ...], str] = {}


def use_compilation_cache(config, workdir: str | os.PathLike) -> None:
  """Keeps compiled XLA programs under ``<workdir>/jax_cache`` when
  ``config.compilation_cache`` (unless a cache folder is already set), so
  identical programs (fine-tuning runs of tasks with equal class counts,
  reruns) compile once."""
  if config.compilation_cache and not jax.config.jax_compilation_cache_dir:
    jax.config.update(
        "jax_compilation_cache_dir", str(Path(workdir) / "jax_cache")
    )
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def _hash_sources(roots: tuple[str, ...]) -> str:
  h = hashlib.sha256()
  for root in roots:
    base = Path(root)
    for p in sorted(base.rglob("*.py")):
      h.update(f"{base.name}/{p.relative_to(base).as_posix()}\0".encode())
      h.update(hashlib.sha256(p.read_bytes()).digest())
  return h.hexdigest()[:16]


def code_hash(*, fresh: bool = False) -> str:
  """A content hash of every ``.py`` file under :data:`SOURCE_ROOTS`
  (relative paths sorted). Computed once per process and root set, so one
  run uses one hash throughout; ``fresh=True`` reads the files again."""
  roots = tuple(str(r) for r in SOURCE_ROOTS)
  if fresh or roots not in _CODE_HASHES:
    _CODE_HASHES[roots] = _hash_sources(roots)
  return _CODE_HASHES[roots]


def hash_parts(*parts: Any) -> str:
  """A short hash of arrays (shape, dtype, bytes) and JSON-able values."""
  h = hashlib.sha256()
  for p in parts:
    if isinstance(p, np.ndarray):
      h.update(str((p.shape, p.dtype)).encode())
      h.update(np.ascontiguousarray(p).tobytes())
    else:
      h.update(json.dumps(p, sort_keys=True, default=str).encode())
  return h.hexdigest()[:16]


def fingerprint(*parts: Any) -> str:
  """A stage fingerprint: its inputs and config, and the code."""
  return hash_parts(code_hash(), *parts)


def dataset_hash(splits: dict[str, data_lib.Dataset]) -> str:
  """A fingerprint of a task's splits (images, labels, class count)."""
  parts = []
  for k in sorted(splits):
    d = splits[k]
    parts += [k, d.images, d.labels, d.num_classes]
  return hash_parts(*parts)


def as_list(value) -> list[str]:
  """A config list field: a tuple/list, or a comma-separated string (what
  ``--config.methods=ties,consensus`` gives)."""
  if isinstance(value, str):
    return [v.strip() for v in value.split(",") if v.strip()]
  out = []
  for v in value or ():
    out += as_list(v) if isinstance(v, str) else [v]
  return out


def read_stamp(directory: Path) -> dict | None:
  """The stage stamp in ``directory``; None if absent or unreadable."""
  try:
    return json.loads((Path(directory) / STAMP).read_text())
  except (OSError, ValueError):
    return None


def stage_done(
    directory: Path, fingerprint_: str, outputs: Sequence[str]
) -> bool:
  """Whether a stage in ``directory`` finished with this fingerprint."""
  s = read_stamp(directory)
  if s is None or s.get("fingerprint") != fingerprint_ or not s.get("done"):
    return False
  for o in outputs:
    p = Path(directory) / o
    if o.endswith(".json"):
      if not p.exists():
        return False
    elif not checkpoint.is_checkpoint(p):
      return False
  return True


def stage_begin(directory: Path, fingerprint_: str) -> None:
  """Prepares ``directory`` for a stage: stale outputs (another fingerprint)
  are removed; a run with the same fingerprint resumes."""
  directory = Path(directory)
  if directory.exists():
    s = read_stamp(directory)
    if s is None or s.get("fingerprint") != fingerprint_:
      shutil.rmtree(directory)
  directory.mkdir(parents=True, exist_ok=True)
  write_json(directory / STAMP, {"fingerprint": fingerprint_, "done": False})


def stage_end(directory: Path, fingerprint_: str, seconds: float) -> None:
  """Marks the stage done, recording the seconds it took to compute."""
  write_json(
      Path(directory) / STAMP,
      {"fingerprint": fingerprint_, "done": True, "seconds": float(seconds)},
  )


def recorded_seconds(directory: Path) -> float:
  """The seconds recorded by the run that computed the stage (0 if none)."""
  s = read_stamp(directory) or {}
  return float(s.get("seconds", 0.0))


def stage_fingerprint(directory: Path) -> str:
  """The fingerprint recorded by the stage that made ``directory``, else a
  content hash of it (a checkpoint given from outside)."""
  s = read_stamp(directory)
  if s is not None:
    return s.get("fingerprint", "")
  p = Path(directory)
  return checkpoint.content_hash(p) if p.exists() else ""


def write_json(path: Path, obj: Any) -> None:
  """Writes JSON atomically (temporary file, then rename)."""
  path = Path(path)
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=jsonable))
  os.replace(tmp, path)


def jsonable(x):
  if isinstance(x, (np.floating, np.integer)):
    return x.item()
  if isinstance(x, np.ndarray):
    return x.tolist()
  return str(x)


def config_dict(config) -> dict:
  return json.loads(json.dumps(config.to_dict(), default=jsonable))


class Timer:
  """Seconds per stage as computed, this run's wall time, cache use.

  ``seconds[stage]`` is the compute time: for a stage made of cached units
  (fine-tuning runs, evaluation modes) the sum of its units' times, each
  measured by the run that computed it (:func:`recorded_seconds`);
  ``wall[stage]`` is what this run spent, reading caches included.
  """

  def __init__(self, log: Log):
    self.log = log
    self.seconds: dict[str, float] = {}
    self.wall: dict[str, float] = {}
    self.cached: dict[str, bool] = {}
    self.t0 = time.time()

  def start(self, name: str, index: int, total: int, what: str = ""):
    self.log(f"[stage {index}/{total}: {name}] {what}".rstrip())
    return StageClock(self, name)

  def with_totals(self) -> tuple[dict, dict, dict]:
    """``(seconds, wall, cached)`` with a ``"total"`` entry each: the total
    as computed is the sum of the stages' computed times (plus the time
    spent between stages), so it adds up when stages were read from the
    cache; ``wall["total"]`` is this run's time; ``cached["total"]`` says
    whether any stage was read from the cache."""
    wall_total = time.time() - self.t0
    between = max(wall_total - sum(self.wall.values()), 0.0)
    seconds = {**self.seconds, "total": sum(self.seconds.values()) + between}
    wall = {**self.wall, "total": wall_total}
    cached = {**self.cached, "total": any(self.cached.values())}
    return seconds, wall, cached


class StageClock:
  """One stage's clock; units report :meth:`computed` / :meth:`reused`."""

  def __init__(self, timer: Timer, name: str):
    self.timer, self.name, self.t = timer, name, time.time()
    self.units: list[float] = []
    self.reused_units = 0

  def computed(self, seconds: float) -> None:
    self.units.append(float(seconds))

  def reused(self, directory: Path) -> None:
    self.units.append(recorded_seconds(directory))
    self.reused_units += 1

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    dt = time.time() - self.t
    t = self.timer
    t.wall[self.name] = t.wall.get(self.name, 0.0) + dt
    t.seconds[self.name] = t.seconds.get(self.name, 0.0) + (
        sum(self.units) if self.units else dt
    )
    t.cached[self.name] = bool(self.units) and self.reused_units == len(
        self.units
    )
    if exc[0] is None:
      t.log(
          f"[{self.name}] done in {dt:.1f}s (elapsed"
          f" {time.time() - t.t0:.0f}s)"
      )
