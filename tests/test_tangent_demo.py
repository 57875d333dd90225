"""experiments/tangent_demo.py end to end in a tiny configuration."""

import json
import pathlib

import binaries

_CONFIG = pathlib.Path(binaries.EXPERIMENTS, "configs", "tangent_demo.py")


def test_tangent_demo_tiny(tmp_path):
  demo = binaries.load("tangent_demo")
  argv = [
      "tangent_demo",
      f"--config={_CONFIG}:smoke",
      f"--workdir={tmp_path}",
      "--config.xi_alphas=(0.0, 1.0)",
  ]
  binaries.run_main(demo, argv)
  res = json.loads((tmp_path / "results.json").read_text())
  assert res["config"]["steps"] == 10 and res["config"]["pretrain_steps"] == 20
  assert res["config"]["xi_alphas"] == [0.0, 1.0]
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
