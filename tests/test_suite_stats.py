"""The suite's bookkeeping without a pipeline run: paired statistics on
hand-computed cases, the checks and their report, the code-aware cache."""

import math
import pathlib
import re
import shutil

import numpy as np
import pytest

from experiments.suite_lib import cache
from experiments.suite_lib import checks as checks_lib
from experiments.suite_lib import report


def test_pack_hits_round_trip():
  h = np.array([1, 0, 1, 1, 0, 0, 0, 1, 1], bool)
  packed = checks_lib.pack_hits(h)
  assert packed == "b180"  # 10110001 1(0000000)
  np.testing.assert_array_equal(checks_lib.unpack_hits(packed, 9), h)
  with pytest.raises(ValueError, match="expected 17"):
    checks_lib.unpack_hits(packed, 17)


def test_paired_difference_by_hand():
  # One task, four examples: d = a - b = (0, 1, 0, -1)... by hand:
  a = {"t": np.array([1, 1, 0, 0])}
  b = {"t": np.array([1, 0, 0, 1])}
  st = checks_lib.paired_difference(a, b)
  # mean d = 0; sample variance of (0, 1, 0, -1) = 2/3; se = sqrt(2/3 / 4).
  assert st["diff"] == 0.0
  assert st["se"] == pytest.approx(math.sqrt(2 / 3 / 4))
  # Two tasks, weights 1/ind: d_1 = 2*(1,1,1,0) - 2*(1,0,1,0) = (0,2,0,0),
  # d_2 = (1, 1) - (0, 1) = (1, 0). diff = (0.5 + 0.5) / 2 = 0.5;
  # var_1 = var(0,2,0,0; ddof 1) / 4 = 1/4, var_2 = var(1,0; ddof 1) / 2 =
  # 1/4; se = sqrt(1/2) / 2.
  a = {"x": np.array([1, 1, 1, 0]), "y": np.array([1, 1])}
  b = {"x": np.array([1, 0, 1, 0]), "y": np.array([0, 1])}
  w = {"x": 2.0, "y": 1.0}
  st = checks_lib.paired_difference(a, b, w, w)
  assert st["diff"] == pytest.approx(0.5)
  assert st["se"] == pytest.approx(math.sqrt(0.5) / 2)
  assert st["z"] == pytest.approx(0.5 / (math.sqrt(0.5) / 2))
  # The paired s.e. is far below the unpaired one when the rows agree on
  # most examples (the reason for pairing).
  rng = np.random.default_rng(0)
  base = rng.random(1000) < 0.7
  other = base.copy()
  other[:10] = ~other[:10]
  st = checks_lib.paired_difference({"t": base}, {"t": other})
  unpaired = math.hypot(
      base.std(ddof=1) / math.sqrt(1000), other.std(ddof=1) / math.sqrt(1000)
  )
  assert st["se"] < unpaired / 3
  with pytest.raises(ValueError, match="paired"):
    checks_lib.paired_difference({"t": base}, {"t": other[:-1]})


def test_mcnemar_exact_by_hand():
  # 3 examples only a gets right, 0 only b: p = 2 * P[X <= 0 | n=3] = 2/8.
  a = np.array([1, 1, 1, 1, 0], bool)
  b = np.array([0, 0, 0, 1, 0], bool)
  st = checks_lib.mcnemar_exact(a, b)
  assert (st["a_only"], st["b_only"]) == (3, 0)
  assert st["p"] == pytest.approx(0.25)
  # n01 = 1, n10 = 4: p = 2 * (1 + 5) / 32.
  a = np.array([1, 0, 0, 0, 0, 1], bool)
  b = np.array([0, 1, 1, 1, 1, 1], bool)
  assert checks_lib.mcnemar_exact(a, b)["p"] == pytest.approx(12 / 32)
  assert checks_lib.mcnemar_exact(a, a)["p"] == 1.0


def _row(hits: dict[str, np.ndarray], ind=None) -> dict:
  accs = {t: float(np.mean(h)) for t, h in hits.items()}
  ind = ind or {t: 1.0 for t in hits}
  return {
      "per_task": accs,
      "absolute": float(np.mean(list(accs.values()))),
      "normalized": float(np.mean([accs[t] / ind[t] for t in hits])),
      "hparams": {},
      "test_examples": {t: len(h) for t, h in hits.items()},
      "hits": {t: checks_lib.pack_hits(h) for t, h in hits.items()},
  }


def _hits(n, acc, seed):
  rng = np.random.default_rng(seed)
  h = np.zeros(n, bool)
  h[rng.permutation(n)[: int(round(acc * n))]] = True
  return h


def test_checks_report_paired_statistics_for_passes_and_failures():
  n = 400
  ind_h = {"a": _hits(n, 0.9, 0), "b": _hits(n, 0.8, 1)}
  ind = {t: h.mean() for t, h in ind_h.items()}
  ta_h = {"a": _hits(n, 0.7, 2), "b": _hits(n, 0.6, 3)}
  # TIES: task arithmetic with 2 examples of task b flipped to wrong: a
  # real but tiny loss; Consensus: 40 flipped, a large one.
  ties_h = {"a": ta_h["a"].copy(), "b": ta_h["b"].copy()}
  ties_h["b"][np.flatnonzero(ties_h["b"])[:2]] = False
  cons_h = {"a": ta_h["a"].copy(), "b": ta_h["b"].copy()}
  cons_h["b"][np.flatnonzero(cons_h["b"])[:40]] = False
  rows = {
      "pretrained": _row({"a": _hits(n, 0.5, 4), "b": _hits(n, 0.4, 5)}, ind),
      "individual": _row(ind_h, ind),
      "task_arithmetic": _row(ta_h, ind),
      "ties": _row(ties_h, ind),
      "consensus": _row(cons_h, ind),
  }
  res = checks_lib.checks({"standard": {"rows": rows, "xi": []}})
  t = res["standard: ties >= task arithmetic (normalized)"]
  c = res["standard: consensus >= task arithmetic (normalized)"]
  assert not t["holds"] and not c["holds"]
  # By hand: only task b differs, d_i = -1/ind_b on the flipped examples.
  for st, k in ((t["stats"], 2), (c["stats"], 40)):
    d = np.zeros(n)
    d[:k] = -1 / ind["b"]
    assert st["diff"] == pytest.approx(d.mean() / 2)
    assert st["se"] == pytest.approx(d.std(ddof=1) / math.sqrt(n) / 2)
    assert (st["a_only"], st["b_only"]) == (0, k)
    assert st["p"] == pytest.approx(min(1.0, 2 * 0.5**k))
  assert not t["stats"]["significant"] and c["stats"]["significant"]
  gains = res[
      "standard: individual >> pretrained (every task +5 points or more)"
  ]
  assert set(gains["per_task"]) == {"a", "b"}
  assert gains["per_task"]["a"]["diff"] == pytest.approx(0.9 - 0.5)
  passed = res["standard: task arithmetic below individual"]
  assert passed["holds"] and passed["stats"]["se"] > 0  # passes carry it too
  md = report.markdown(
      {
          "suite": "x",
          "tasks": ["a", "b"],
          "modes": {"standard": {"rows": rows, "xi": []}},
          "checks": res,
      }
  )
  se = 100 * t["stats"]["se"]
  want = rf"\| standard: ties >= [^|]*\| NO \| [^|]*\| {100 * t['stats']['diff']:+.1f} ± {se:.1f} points"
  assert re.search(want, md)
  assert "within 2 s.e." not in md


def test_xi_check_has_a_paired_uncertainty():
  # Per-example disagreement (mean over the α grid) of two tasks, both modes.
  u_std = [np.array([0.5, 0.25, 0.75, 0.5]), np.array([1.0, 0.5])]
  u_lin = [np.array([0.25, 0.25, 0.5, 0.5]), np.array([0.5, 0.5])]

  def xi(u):
    return {"mean": float(sum(x.mean() for x in u)), "per_example": u}

  st = checks_lib.xi_difference(xi(u_lin), xi(u_std))
  # d1 = (-.25, 0, -.25, 0): mean -.125, var(ddof 1) 1/48 / 4;
  # d2 = (-.5, 0): mean -.25, var .125 / 2.
  assert st["diff"] == pytest.approx(-0.375)
  assert st["se"] == pytest.approx(math.sqrt(1 / 48 / 4 + 0.125 / 2))
  rows = {
      "pretrained": _row({"t": np.array([1, 0, 0])}),
      "individual": _row({"t": np.array([1, 1, 0])}),
  }
  modes = {
      m: {"rows": rows, "xi": [xi(u)]}
      for m, u in (("standard", u_std), ("linearized", u_lin))
  }
  check = checks_lib.checks(modes)["linearized lowers disentanglement error"]
  assert check["holds"]
  assert check["stats"]["diff"] == pytest.approx(-0.375)
  assert check["stats"]["se"] == pytest.approx(st["se"])
  assert check["stats"]["significant"] == (abs(-0.375 / st["se"]) >= 2)


def test_code_hash_covers_every_source_file(tmp_path, monkeypatch):
  root = pathlib.Path(cache.__file__).resolve().parents[2]
  for pkg in ("mtx", "experiments"):
    shutil.copytree(
        root / pkg,
        tmp_path / pkg,
        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
    )
  monkeypatch.setattr(
      cache, "SOURCE_ROOTS", (tmp_path / "mtx", tmp_path / "experiments")
  )
  before = cache.code_hash()
  fp = cache.fingerprint({"a": 1})
  stage = tmp_path / "stage"
  cache.stage_begin(stage, fp)
  (stage / "results.json").write_text("{}")
  cache.stage_end(stage, fp, seconds=12.5)
  assert cache.stage_done(stage, cache.fingerprint({"a": 1}), ["results.json"])
  # Not a .py file: same hash.
  (tmp_path / "mtx" / "notes.txt").write_text("x")
  assert cache.code_hash(fresh=True) == before
  # A fix in a merging method: a new hash, so the stage reruns.
  ties = next((tmp_path / "mtx" / "merging").glob("*.py"))
  ties.write_text(ties.read_text() + "\n# fixed\n")
  assert cache.code_hash() == before  # one hash per run
  assert cache.code_hash(fresh=True) != before
  assert not cache.stage_done(
      stage, cache.fingerprint({"a": 1}), ["results.json"]
  )
  # stage_begin with the new fingerprint clears the stale outputs.
  cache.stage_begin(stage, cache.fingerprint({"a": 1}))
  assert not (stage / "results.json").exists()


def test_recorded_stage_times_survive_cache_reads(tmp_path):
  lines = []
  d = tmp_path / "unit"
  cache.stage_begin(d, "fp")
  cache.stage_end(d, "fp", seconds=42.0)
  timer = cache.Timer(lines.append)
  with timer.start("finetune", 3, 5) as clock:
    clock.reused(d)
    clock.reused(d)
  assert timer.seconds["finetune"] == 84.0 and timer.cached["finetune"]
  assert timer.wall["finetune"] < 84.0
  with timer.start("evaluate", 4, 5) as clock:
    clock.reused(d)
    clock.computed(1.5)
  assert timer.seconds["evaluate"] == 43.5 and not timer.cached["evaluate"]
  md = report.markdown(
      {
          "suite": "x",
          "tasks": ["a"],
          "modes": {},
          "timing_s": timer.seconds,
          "wall_s": timer.wall,
          "cached": timer.cached,
      }
  )
  assert "- finetune: 84.0 (cached; read in" in md
  assert "- evaluate: 43.5\n" in md


def test_total_time_adds_up_when_stages_are_read_from_the_cache(tmp_path):
  """A rerun that read every stage from the cache used to report the
  stages' recorded times next to a total of this run's few seconds."""
  d = tmp_path / "unit"
  cache.stage_begin(d, "fp")
  cache.stage_end(d, "fp", seconds=42.0)
  timer = cache.Timer(lambda _: None)
  with timer.start("data", 1, 3):
    pass
  with timer.start("finetune", 2, 3) as clock:
    clock.reused(d)
  seconds, wall, cached = timer.with_totals()
  assert seconds["total"] >= 42.0 + seconds["data"]
  assert seconds["total"] == pytest.approx(
      sum(v for k, v in seconds.items() if k != "total")
      + wall["total"]
      - sum(v for k, v in wall.items() if k != "total")
  )
  assert wall["total"] < 42.0 and cached["total"]
  md = report.markdown(
      {
          "suite": "x",
          "tasks": ["a"],
          "modes": {},
          "timing_s": seconds,
          "wall_s": wall,
          "cached": cached,
      }
  )
  line = next(x for x in md.splitlines() if x.startswith("- total:"))
  assert line.startswith(f"- total: {seconds['total']:.1f} (as computed;")
  assert f"this run took {wall['total']:.1f})" in line
  # Nothing cached: the total is this run's time, without a note.
  timer = cache.Timer(lambda _: None)
  with timer.start("data", 1, 1):
    pass
  seconds, wall, cached = timer.with_totals()
  assert (
      seconds["total"] == pytest.approx(wall["total"]) and not cached["total"]
  )


def test_use_compilation_cache_sets_the_workdir_cache_once(tmp_path):
  import jax  # pylint: disable=g-import-not-at-top
  import ml_collections  # pylint: disable=g-import-not-at-top

  from experiments.suite_lib import cache  # pylint: disable=g-import-not-at-top

  before = jax.config.jax_compilation_cache_dir
  before_min = jax.config.jax_persistent_cache_min_compile_time_secs
  try:
    jax.config.update("jax_compilation_cache_dir", None)
    off = ml_collections.ConfigDict({"compilation_cache": False})
    cache.use_compilation_cache(off, tmp_path)
    assert jax.config.jax_compilation_cache_dir is None
    on = ml_collections.ConfigDict({"compilation_cache": True})
    cache.use_compilation_cache(on, tmp_path)
    assert jax.config.jax_compilation_cache_dir == str(tmp_path / "jax_cache")
    cache.use_compilation_cache(on, tmp_path / "other")  # already set: kept
    assert jax.config.jax_compilation_cache_dir == str(tmp_path / "jax_cache")
  finally:
    jax.config.update("jax_compilation_cache_dir", before)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", before_min)
