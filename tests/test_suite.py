"""experiments/suite.py and mtx.data.tasks: loaders, splits, the pipeline."""

import json
import pathlib
import re
import sys
import time

import jax
import numpy as np
import pytest

from mtx import data as data_lib
from mtx.data import tasks as tasks_lib

_ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(_ROOT / "experiments"))

import binaries  # noqa: E402
import suite_lib  # noqa: E402

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
  for check, v in res["checks"].items():
    verdict = "yes" if v["holds"] else "NO(, within 2 s.e.)?"
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

  # A changed fine-tuning config reruns fine-tuning and evaluation only.
  res3, _ = _run(
      tmp_path, "--config.finetune.steps=6", "--config.modes=standard"
  )
  assert res3["cached"]["pretrain"]
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
  with pytest.raises(Exception, match="--full replaces the config"):
    binaries.run_main(
        suite,
        [
            "suite",
            f"--workdir={tmp_path}",
            "--full",
            f"--config={_CONFIG}",
            "--config.max_test=5",
        ],
    )
  with pytest.raises(ValueError, match="needs --data_dir"):
    binaries.run_main(
        suite, ["suite", f"--workdir={tmp_path}", "--suite=clip8"]
    )


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
          "--suite=clip8",
          f"--data_dir={tmp_path / 'data'}",
          f"--clip={tmp_path / 'clip'}",
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
  enc = suite_lib.clip_image_encoder(
      hf.config_from_hf(hf_config),
      params["logit_scale"],
      suite_lib.CLIP_MEAN,
      suite_lib.CLIP_STD,
  )
  head = checkpoint.restore(work / "clip/heads/EuroSAT/head")["head"]
  images = tasks_lib.load_image_folder(tmp_path / "data/EuroSAT")["test"].images
  ours = np.asarray(enc.apply(params["vision"], images) @ head["kernel"])
  (template,) = tasks_lib.TEMPLATES["EuroSAT"]
  prompts = [template.format(c) for c in ("forest", "river")]
  ids = torch.tensor([e.ids for e in tok.encode_batch(prompts)])
  pixels = (images - np.asarray(suite_lib.CLIP_MEAN)) / np.asarray(
      suite_lib.CLIP_STD
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


def test_checks_mark_differences_within_noise():
  def row(accs, ind=(0.9, 0.8)):
    a, ind = np.asarray(accs), np.asarray(ind)
    return {
        "per_task": dict(zip("ab", accs)),
        "absolute": float(a.mean()),
        "normalized": float(np.mean(a / ind)),
        "normalized_se": float(np.sqrt(np.sum(a * (1 - a) / 500 / ind**2))) / 2,
        "hparams": {},
    }

  rows = {
      "pretrained": row([0.5, 0.4]),
      "individual": row([0.9, 0.8]),
      "task_arithmetic": row([0.70, 0.60]),
      "ties": row([0.70, 0.595]),  # below by 0.3 points: noise
      "consensus": row([0.60, 0.50]),  # below by 10 points: real
  }
  res = suite_lib.checks({"standard": {"rows": rows, "xi": []}})
  t = res["standard: ties >= task arithmetic (normalized)"]
  c = res["standard: consensus >= task arithmetic (normalized)"]
  assert not t["holds"] and not c["holds"]
  want = np.hypot(
      rows["ties"]["normalized_se"], rows["task_arithmetic"]["normalized_se"]
  )
  assert t["se"] == pytest.approx(want)
  md = suite_lib.markdown(
      {
          "suite": "x",
          "tasks": ["a", "b"],
          "modes": {"standard": {"rows": rows, "xi": []}},
          "checks": res,
      }
  )
  assert re.search(r"\| standard: ties >= [^|]*\| NO, within 2 s\.e\. \|", md)
  assert re.search(r"\| standard: consensus >= [^|]*\| NO \|", md)
