"""The README's main job, in smoke mode, in-process (flagsaver + main)."""

import json

from absl.testing import flagsaver

import binaries


def test_merge_demo_smoke(tmp_path):
  demo = binaries.load("merge_demo")
  with flagsaver.flagsaver(
      workdir=str(tmp_path),
      pretrain_steps=30,
      finetune_steps=30,
      hidden=32,
      methods=["task_arithmetic", "ties", "dare"],
  ):
    demo.main(["merge_demo"])
  with open(tmp_path / "results.json") as f:
    res = json.load(f)["results"]
  assert set(res) == {
      "pretrained",
      "individual",
      "task_arithmetic",
      "ties",
      "dare",
  }
  for name, r in res.items():
    assert set(r["per_task"]) == set(demo.TASKS)
    assert abs(r["absolute"] - sum(r["per_task"].values()) / 4) < 1e-9
    if name not in ("pretrained", "individual"):
      assert r["scale"] in [round(float(s), 2) for s in demo.SCALES]
  assert res["individual"]["normalized"] == 1.0
  md = (tmp_path / "results.md").read_text()
  for name, r in res.items():  # the table shows what the JSON holds
    assert f"| {name} |" in md
    assert f"{100 * r['absolute']:.1f}" in md
