"""experiments/tangent_demo.py end to end in a tiny configuration."""

import json

import binaries


def test_tangent_demo_tiny(tmp_path):
  demo = binaries.load("tangent_demo")
  argv = [
      "tangent_demo",
      f"--workdir={tmp_path}",
      "--pretrain_steps=20",
      "--steps=10",
      "--alphas=0,1",
  ]
  binaries.run_main(demo, argv)
  res = json.loads((tmp_path / "results.json").read_text())
  for mode in ("standard", "linearized"):
    r = res["modes"][mode]
    assert set(r["individual"]) == {"none", "invert"}
    assert len(r["xi"]) == 2 and r["xi"][0][0] == 0.0  # nothing added
    assert 0.0 <= r["addition_normalized_mean"] <= 2.0
  md = (tmp_path / "results.md").read_text()
  assert "| linearized |" in md and "| standard |" in md
  # Cached: a rerun reuses every stage and gives the same table.
  binaries.run_main(demo, argv)
  assert (tmp_path / "results.md").read_text() == md
