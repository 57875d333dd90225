"""experiments/suite.py and mtx.data.tasks: loaders, splits, the pipeline."""

import json
import pathlib
import re
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from mtx import data as data_lib
from mtx.data import tasks as tasks_lib

import binaries
from experiments import suite_lib
from experiments.suite_lib import cache
from experiments.suite_lib import checks as checks_lib
from experiments.suite_lib import data as data_stage

_ROOT = pathlib.Path(__file__).resolve().parents[1]

_CONFIG = str(_ROOT / "experiments" / "configs" / "suite.py")
_FASHION = tasks_lib.source_missing("fashion_mnist")


# ----------------------------------------------------------------------------
# Tasks and loaders.


@pytest.mark.skipif(_FASHION is not None, reason=f"Fashion-MNIST: {_FASHION}")
def test_offline8_on_the_real_files():
  tasks, skipped = tasks_lib.load_suite(
      "offline8", image_size=16, max_train=300, max_test=100
  )
  assert skipped == {} and list(tasks) == list(tasks_lib.SUITES["offline8"])
  want = {
      "digits": 10,
      "digits_parity": 2,
      "fashion": 10,
      "fashion_tops": 4,
      "fashion_footwear": 3,
  }
  for n, s in tasks.items():
    assert set(s) == {"train", "validation", "test"}
    for split, d in s.items():
      assert d.images.shape[1:] == (16, 16, 1), (n, split)
      assert d.images.dtype == np.float32
      assert 0.0 <= d.images.min() and d.images.max() <= 1.0
      assert d.labels.min() >= 0 and d.labels.max() < d.num_classes
      assert len(d.class_names) == d.num_classes
    if n in want:
      assert s["train"].num_classes == want[n]
    assert 250 <= len(s["train"]) + len(s["validation"]) <= 310
    assert 90 <= len(s["test"]) <= 110
  # Real differences: inversion, different sources, different label sets.
  np.testing.assert_allclose(
      tasks["fashion_inverted"]["test"].images,
      1.0 - tasks["fashion"]["test"].images,
      atol=1e-6,
  )
  assert tasks["fashion_footwear"]["train"].class_names == (
      "sandal",
      "sneaker",
      "ankle boot",
  )
  raw = data_lib.load("fashion_mnist")
  assert raw["train"].images.shape == (60000, 28, 28, 1)
  assert raw["test"].images.shape == (10000, 28, 28, 1)


def test_digits_only_fallback(monkeypatch, tmp_path):
  monkeypatch.setitem(
      data_lib.IDX_LOCATIONS,
      "fashion_mnist",
      (str(tmp_path / "nowhere"), "install dataset-fashion-mnist"),
  )
  lines = []
  tasks, skipped = tasks_lib.load_suite(
      "offline8", image_size=8, max_train=200, max_test=50, log=lines.append
  )
  assert list(tasks) == list(tasks_lib.SUITES["digits4"])
  assert set(skipped) == {
      "fashion",
      "fashion_inverted",
      "fashion_tops",
      "fashion_footwear",
  }
  assert all("dataset-fashion-mnist" in why for why in skipped.values())
  assert len(lines) == 4 and "skipping task fashion" in lines[0]


def test_splits_are_deterministic_and_disjoint():
  a, _ = tasks_lib.load_suite(["digits_mirrored"], image_size=8, seed=3)
  b, _ = tasks_lib.load_suite(["digits_mirrored"], image_size=8, seed=3)
  c, _ = tasks_lib.load_suite(["digits_mirrored"], image_size=8, seed=4)
  for split in ("train", "validation", "test"):
    x, y = a["digits_mirrored"][split], b["digits_mirrored"][split]
    np.testing.assert_array_equal(x.images, y.images)
    np.testing.assert_array_equal(x.labels, y.labels)
  assert not np.array_equal(
      a["digits_mirrored"]["validation"].images,
      c["digits_mirrored"]["validation"].images,
  )
  s = a["digits_mirrored"]
  rows = lambda d: {r.tobytes() for r in d.images.reshape(len(d), -1)}
  assert not rows(s["train"]) & rows(s["validation"])
  # Stratified: every class in validation.
  assert set(s["validation"].labels) == set(range(10))


def test_relabel_subsample_resize():
  ds = data_lib.Dataset(
      np.random.default_rng(0).random((40, 4, 4, 1), np.float32),
      np.repeat(np.arange(4), 10).astype(np.int32),
      4,
  )
  r = tasks_lib.relabel(ds, (-1, 0, -1, 1), ("b", "d"))
  assert len(r) == 20 and r.num_classes == 2 and r.class_names == ("b", "d")
  sub = tasks_lib.subsample(ds, 20, seed=1)
  assert np.bincount(sub.labels).tolist() == [5, 5, 5, 5]
  big = data_lib.resize(ds, 8)
  assert big.images.shape == (40, 8, 8, 1)
  np.testing.assert_allclose(big.images.mean(), ds.images.mean(), atol=0.02)
  with pytest.raises(ValueError, match="class names"):
    tasks_lib.relabel(ds, (0, 1, 2, 2), ("a",))
  with pytest.raises(ValueError, match="unknown suite"):
    tasks_lib.load_suite("nope")


# ----------------------------------------------------------------------------
# The pipeline, in-process, in its tiny configuration.

_TINY_METHODS = "task_arithmetic,ties,consensus,fisher,regmean,slerp,lines"


def _run(workdir, *extra):
  suite = binaries.load("suite")
  argv = [
      "suite",
      f"--config={_CONFIG}:tiny",
      f"--workdir={workdir}",
      "--config.tasks=digits,digits_inverted",
      f"--config.methods={_TINY_METHODS}",
      *extra,
  ]
  t = time.time()
  binaries.run_main(suite, argv)
  return json.loads((workdir / "results.json").read_text()), time.time() - t


def _table_rows(md: str, mode: str) -> dict[str, list[str]]:
  section = md.split(f"## {mode} fine-tuning")[1].split("\n## ")[0]
  table = section.split("| method |")[1].split("\n\n")[0]  # the first table
  rows = {}
  for line in table.splitlines()[2:]:
    cells = [c.strip() for c in line.strip("|").split("|")]
    rows[cells[0]] = cells[1:]
  return rows


def test_pipeline_tiny_end_to_end_cached_rerun(tmp_path):
  res, _ = _run(tmp_path)
  tasks = res["tasks"]
  assert tasks == ["digits", "digits_inverted"]
  assert set(res["modes"]) == {"standard", "linearized"}
  for m in res["modes"].values():
    rows = m["rows"]
    # Two tasks: SLERP runs too; every requested method has a row.
    assert set(rows) == {
        "pretrained",
        "individual",
        "tall_mask_retrieval",
        *_TINY_METHODS.split(","),
    }
    assert rows["individual"]["normalized"] == pytest.approx(1.0)
    for name, r in rows.items():
      accs = [r["per_task"][t] for t in tasks]
      assert all(0.0 <= a <= 1.0 for a in accs)
      assert r["absolute"] == pytest.approx(np.mean(accs))
      # 100 test examples per task: binomial standard error of the mean.
      a = np.asarray(accs)
      se = np.sqrt(np.sum(a * (1 - a) / 100)) / len(a)
      assert r["absolute_se"] == pytest.approx(se, rel=1e-6)
      if name not in ("pretrained", "individual", "tall_mask_retrieval"):
        assert "scale" in r["hparams"] and "val_normalized" in r
    assert rows["ties"]["hparams"]["scale"] in (0.5, 1.0)
    assert rows["fisher"]["hparams"]["scale"] == 1.0  # published: no scale
    assert np.asarray(m["cosine"]).shape == (2, 2)
    np.testing.assert_allclose(np.diagonal(m["cosine"]), 1.0, atol=1e-5)
    (xi,) = m["xi"]
    assert xi["pair"] == tasks and xi["grid"][0][0] == 0.0  # nothing added
  assert set(res["timing_s"]) >= {
      "data",
      "pretrain",
      "finetune",
      "evaluate",
      "report",
      "total",
  }
  assert res["code_hash"] == cache.code_hash()
  for m in res["modes"].values():
    ind = m["rows"]["individual"]
    for r in m["rows"].values():
      # Per-example hits are recorded and agree with the accuracies.
      hits = checks_lib.row_hits(r)
      assert set(hits) == set(tasks)
      for t in tasks:
        assert len(hits[t]) == r["test_examples"][t] == 100
        assert hits[t].mean() == pytest.approx(r["per_task"][t])
    # Paired statistics: the difference is the difference of the rows.
    if "ties" in m["rows"]:
      st = checks_lib.compare(
          m["rows"]["ties"], m["rows"]["task_arithmetic"], "normalized", ind
      )
      assert st["diff"] == pytest.approx(
          m["rows"]["ties"]["normalized"]
          - m["rows"]["task_arithmetic"]["normalized"]
      )
    (xi,) = m["xi"]
    assert xi["mean"] == pytest.approx(
        np.mean(xi["per_example"][0]) + np.mean(xi["per_example"][1])
    )
  for k, v in res["checks"].items():
    if "per_task" in v:
      assert set(v["per_task"]) == set(tasks), k
    else:
      assert v["stats"] is not None and v["stats"]["se"] >= 0, k
  for png in ("methods", "per_task", "cosine", "disentanglement"):
    assert (tmp_path / f"{png}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

  # The markdown table shows exactly what the JSON holds.
  md = (tmp_path / "results.md").read_text()
  for mode, m in res["modes"].items():
    table = _table_rows(md, mode)
    assert set(table) == set(m["rows"]) | set(m["skipped_methods"])
    for name, r in m["rows"].items():
      cells = table[name]
      want = [f"{100 * r['per_task'][t]:.1f}" for t in tasks]
      want += [f"{100 * r['absolute']:.1f}", f"{100 * r['normalized']:.1f}"]
      assert cells[: len(want)] == want, (mode, name)
      if "scale" in r["hparams"]:
        assert f"scale={r['hparams']['scale']:g}" in cells[-1]
  assert "Tasks run: `digits`, `digits_inverted`." in md
  for check, v in res["checks"].items():
    verdict = "yes" if v["holds"] else "NO"
    assert re.search(rf"\| {re.escape(check)} \| {verdict} \|", md)

  # A rerun skips every stage whose outputs are there.
  stamps = sorted(tmp_path.glob("finetune/*/*/finetuned"))
  before = {p: p.stat().st_mtime for p in stamps}
  res2, seconds = _run(tmp_path)
  assert res2["cached"]["pretrain"] and res2["cached"]["finetune"]
  assert res2["cached"]["evaluate/standard"]
  assert res2["cached"]["evaluate/linearized"]
  assert {p: p.stat().st_mtime for p in stamps} == before
  assert res2["modes"] == res["modes"]
  assert seconds < res["timing_s"]["total"]
  # ... and keeps the times recorded by the run that computed each stage.
  for stage in ("pretrain", "finetune", "evaluate"):
    assert res2["cached"][stage], stage
    assert res2["timing_s"][stage] == pytest.approx(res["timing_s"][stage])
    assert res2["wall_s"][stage] < res["timing_s"][stage]
  md2 = (tmp_path / "results.md").read_text()
  want = f"- pretrain: {res['timing_s']['pretrain']:.1f} (cached; read in"
  assert want in md2

  # The interference study on the cached suite: own / others from the
  # transfer matrix, τ restricted to parts of the network.
  from experiments.configs import suite as suite_config  # pylint: disable=g-import-not-at-top
  from experiments.suite_lib import interference  # pylint: disable=g-import-not-at-top

  c = suite_config.get_config("tiny")
  c.tasks = ("digits", "digits_inverted")
  c.methods = tuple(_TINY_METHODS.split(","))
  lines = []
  study = interference.run(
      c,
      tmp_path,
      parts={"all": "^dense_0/", "bias": "/bias$", "none": "^nothing$"},
      log=lines.append,
  )
  assert any("[evaluate standard] cached" in m for m in lines)
  ts = res["modes"]["standard"]
  tr = np.asarray(ts["transfer"])
  pre = np.asarray([ts["rows"]["pretrained"]["per_task"][t] for t in tasks])
  assert study["own"] == pytest.approx(100 * np.mean(np.diagonal(tr) - pre))
  assert study["others"] == pytest.approx(
      100 * np.mean([tr[0, 1] - pre[1], tr[1, 0] - pre[0]])
  )
  assert study["by_part"]["all"]["own"] == pytest.approx(study["own"])
  assert study["by_part"]["none"]["others"] == 0.0
  assert study["normalized"]["ties"] == pytest.approx(
      100 * ts["rows"]["ties"]["normalized"]
  )
  assert "| all | `^dense_0/` |" in (tmp_path / "interference.md").read_text()

  # A changed fine-tuning config reruns fine-tuning and evaluation only.
  res3, _ = _run(
      tmp_path, "--config.finetune.steps=6", "--config.modes=standard"
  )
  assert res3["cached"]["pretrain"]
  assert res3["timing_s"]["pretrain"] == pytest.approx(
      res["timing_s"]["pretrain"]
  )
  assert not res3["cached"]["finetune"]
  assert not res3["cached"]["evaluate/standard"]
  assert list(res3["modes"]) == ["standard"]
  m = json.loads(
      (tmp_path / "finetune/standard/digits/metrics.json").read_text()
  )
  assert m["config"]["steps"] == 6


def test_binary_flags(tmp_path):
  suite = binaries.load("suite")
  with pytest.raises(Exception, match="unexpected arguments"):
    binaries.run_main(suite, ["suite", f"--workdir={tmp_path}", "stray"])
  with pytest.raises(Exception, match="--workdir is required"):
    binaries.run_main(suite, ["suite"])
  # (--config is given: flagsaver drops the override flags that parsing the
  # default config registered.)
  with pytest.raises(Exception, match="needs --config.data_dir"):
    binaries.run_main(
        suite,
        [
            "suite",
            f"--workdir={tmp_path}",
            f"--config={_CONFIG}",
            "--config.suite=clip8",
        ],
    )
  # Experiment settings are config fields, not flags; the config is locked.
  for gone in ("--full", "--suite=clip8", "--clip=x", "--data_dir=x"):
    with pytest.raises(Exception, match="Unknown command line flag"):
      binaries.run_main(suite, ["suite", f"--workdir={tmp_path}", gone])
  with pytest.raises(Exception, match="not_a_field"):
    binaries.run_main(
        suite,
        [
            "suite",
            f"--workdir={tmp_path}",
            f"--config={_CONFIG}",
            "--config.not_a_field=1",
        ],
    )


def test_config_variants_and_grids():
  from experiments.configs import suite as suite_config  # pylint: disable=g-import-not-at-top
  from experiments.suite_lib import evaluate  # pylint: disable=g-import-not-at-top

  smoke, full = suite_config.get_config(), suite_config.get_config("full")
  assert evaluate.method_grid("ties", smoke) == ([{"density": 0.2}], {})
  assert len(evaluate.method_grid("ties", full)[0]) == 4
  assert evaluate.method_grid("lines", full) == (
      [{}],
      {"beta": [0.0, 0.25, 0.5, 0.75, 1.0]},
  )
  assert evaluate.method_grid("task_arithmetic", smoke) == ([{}], {})
  for v in suite_config.VARIANTS:
    suite_config.get_config(v)
  with pytest.raises(ValueError, match="unknown suite variant 'nope'"):
    suite_config.get_config("nope")


def test_grids_are_overridable_from_the_command_line(tmp_path, monkeypatch):
  # The --config.grids override reaches the config the binary runs with.
  seen = {}
  suite = binaries.load("suite")
  monkeypatch.setattr(
      suite_lib, "run", lambda config, workdir, log: seen.update(c=config)
  )
  binaries.run_main(
      suite,
      [
          "suite",
          f"--workdir={tmp_path}",
          f"--config={_CONFIG}:full",
          "--config.grids.structural.ties=({'density': 0.3},)",
          "--config.grids.scales=(0.25, 0.5)",
          "--config.compilation_cache=False",
      ],
  )
  c = seen["c"]
  assert c.variant == "full" and c.grids.scales == (0.25, 0.5)
  assert tuple(c.grids.structural.ties) == ({"density": 0.3},)
  assert not c.compilation_cache


def test_runs_as_a_module_and_as_a_script(tmp_path):
  for argv in (["-m", "experiments.suite"], ["experiments/suite.py"]):
    out = subprocess.run(
        [sys.executable, *argv, "--helpshort"],
        cwd=_ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    # absl's help flags exit with status 1 after printing the flags.
    assert "--workdir: Output directory" in out.stdout, out.stderr[-2000:]
    assert "No module named" not in out.stderr
  # Bad input: one line naming the problem, exit status 1, no traceback.
  out = subprocess.run(
      [
          sys.executable,
          "-m",
          "experiments.suite",
          f"--workdir={tmp_path}",
          "--config.suite=clip8",
      ],
      cwd=_ROOT,
      capture_output=True,
      text=True,
      check=False,
  )
  assert out.returncode == 1
  assert (
      out.stderr.strip()
      .splitlines()[-1]
      .startswith("suite: error: --config.suite=clip8 needs --config.data_dir")
  )
  assert "Traceback" not in out.stderr


# ----------------------------------------------------------------------------
# clip8 on tiny local data and a tiny random CLIP.


def _tiny_clip(path: pathlib.Path, words: list[str]):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  tokenizers = pytest.importorskip("tokenizers")
  from tokenizers import models as tok_models  # pylint: disable=g-import-not-at-top
  from tokenizers import normalizers, pre_tokenizers, processors  # pylint: disable=g-import-not-at-top

  vocab = {"[PAD]": 0, "[UNK]": 1}
  for w in words:
    vocab.setdefault(w, len(vocab))
  bos, eos = "<|startoftext|>", "<|endoftext|>"
  vocab[bos] = len(vocab)
  vocab[eos] = len(vocab)  # the largest id, as in CLIP's vocabulary
  tok = tokenizers.Tokenizer(tok_models.WordLevel(vocab, unk_token="[UNK]"))
  tok.normalizer = normalizers.Lowercase()
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  tok.post_processor = processors.TemplateProcessing(
      single=f"{bos} $A {eos}",
      special_tokens=[(bos, vocab[bos]), (eos, vocab[eos])],
  )
  torch.manual_seed(0)
  cfg = transformers.CLIPConfig(
      text_config=dict(
          vocab_size=len(vocab),
          hidden_size=32,
          intermediate_size=64,
          num_hidden_layers=2,
          num_attention_heads=4,
          max_position_embeddings=24,
          bos_token_id=vocab[bos],
          eos_token_id=vocab[eos],
          pad_token_id=0,
      ),
      vision_config=dict(
          image_size=16,
          patch_size=8,
          hidden_size=32,
          intermediate_size=64,
          num_hidden_layers=2,
          num_attention_heads=4,
      ),
      projection_dim=24,
  )
  model = transformers.CLIPModel(cfg).eval()
  model.save_pretrained(path, safe_serialization=True)
  tok.save(str(path / "tokenizer.json"))
  return model, tok


def _folders(root: pathlib.Path, task: str, classes: list[str], seed: int):
  from PIL import Image  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(seed)
  for split, n in (("train", 12), ("test", 6)):
    for c, name in enumerate(classes):
      d = root / task / split / name
      d.mkdir(parents=True)
      for i in range(n):
        x = rng.integers(0, 80, (16, 16, 3))
        x[c * 8 : (c + 1) * 8] += 150  # class c: a bright band
        Image.fromarray(x.astype(np.uint8)).save(d / f"{i}.png")


def test_clip8_on_tiny_data_and_a_tiny_random_clip(tmp_path):
  classes = {"MNIST": ["zero", "one"], "EuroSAT": ["forest", "river"]}
  words = "a photo of the number centered satellite".split()
  words += [c for cs in classes.values() for c in cs]
  model, tok = _tiny_clip(tmp_path / "clip", words)
  for i, (task, cs) in enumerate(classes.items()):
    _folders(tmp_path / "data", task, cs, i)
  work = tmp_path / "work"
  suite = binaries.load("suite")
  binaries.run_main(
      suite,
      [
          "suite",
          f"--config={_CONFIG}:tiny",
          f"--workdir={work}",
          "--config.suite=clip8",
          f"--config.data_dir={tmp_path / 'data'}",
          f"--config.clip={tmp_path / 'clip'}",
          "--config.tasks=MNIST,EuroSAT",
          "--config.modes=standard",
          "--config.methods=task_arithmetic,ties",
          "--config.finetune.steps=4",
          "--config.finetune.batch_size=8",
          "--config.validation_fraction=0.25",
      ],
  )
  res = json.loads((work / "results.json").read_text())
  assert res["suite"] == "clip8" and res["tasks"] == ["MNIST", "EuroSAT"]
  assert res["task_info"]["MNIST"]["class_names"] == ["one", "zero"]
  assert res["task_info"]["EuroSAT"]["image_shape"] == [16, 16, 3]
  assert res["task_info"]["EuroSAT"]["train"] == 18
  rows = res["modes"]["standard"]["rows"]
  assert {"pretrained", "individual", "task_arithmetic", "ties"} <= set(rows)
  assert "pretrain" not in res["timing_s"]  # CLIP is the pretrained model

  # The zero-shot classifier is CLIP's: logits equal transformers' CLIPModel
  # logits_per_image against the prompts (EuroSAT has one template).
  import torch  # pylint: disable=g-import-not-at-top

  from mtx import checkpoint  # pylint: disable=g-import-not-at-top
  from mtx.io import hf  # pylint: disable=g-import-not-at-top

  _, params, hf_config = hf.load(tmp_path / "clip")
  enc = data_stage.clip_image_encoder(
      hf.config_from_hf(hf_config),
      params["logit_scale"],
      data_stage.CLIP_MEAN,
      data_stage.CLIP_STD,
  )
  head = checkpoint.restore(work / "clip/heads/EuroSAT/head")["head"]
  images = tasks_lib.load_image_folder(tmp_path / "data/EuroSAT")["test"].images
  ours = np.asarray(enc.apply(params["vision"], images) @ head["kernel"])
  (template,) = tasks_lib.TEMPLATES["EuroSAT"]
  prompts = [template.format(c) for c in ("forest", "river")]
  ids = torch.tensor([e.ids for e in tok.encode_batch(prompts)])
  pixels = (images - np.asarray(data_stage.CLIP_MEAN)) / np.asarray(
      data_stage.CLIP_STD
  )
  with torch.no_grad():
    ref = model(
        input_ids=ids,
        pixel_values=torch.tensor(
            pixels.transpose(0, 3, 1, 2), dtype=torch.float32
        ),
    ).logits_per_image.numpy()
  np.testing.assert_allclose(ours, ref, rtol=2e-4, atol=2e-4)
  assert jax.tree.leaves(params["vision"])  # the weights came through mtx.io


def test_clip8_missing_data_says_how(tmp_path):
  with pytest.raises(FileNotFoundError, match="image folders"):
    tasks_lib.load_folder_suite(tmp_path, ["DTD"])
