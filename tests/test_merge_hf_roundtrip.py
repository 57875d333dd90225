"""experiments/merge.py on Hugging Face folders: transformers loads the output."""

import subprocess
import sys

import numpy as np
import pytest

import binaries
import mtx
from mtx.io import hf

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def _tiny_bert(tmp_path):
  cfg = transformers.BertConfig(
      vocab_size=50,
      hidden_size=16,
      num_hidden_layers=2,
      num_attention_heads=2,
      intermediate_size=32,
      max_position_embeddings=32,
  )
  dirs = []
  for i in range(3):
    torch.manual_seed(0 if i == 0 else 100 + i)
    m = transformers.BertModel(cfg)
    if i:  # fine-tuned: the base plus a small perturbation
      base = transformers.BertModel.from_pretrained(dirs[0])
      with torch.no_grad():
        for p, q in zip(m.parameters(), base.parameters()):
          p.copy_(q + 0.01 * torch.randn_like(q))
    d = tmp_path / f"m{i}"
    m.save_pretrained(d)
    dirs.append(d)
  return dirs


@pytest.mark.parametrize("method", ["task_arithmetic", "ties"])
def test_merged_hf_folder_loads_in_transformers(tmp_path, method):
  base, ft1, ft2 = _tiny_bert(tmp_path)
  out = tmp_path / "merged"
  merge = binaries.load("merge")
  binaries.run_main(
      merge,
      [
          "merge",
          f"--pretrained={base}",
          f"--finetuned={ft1},{ft2}",
          f"--method={method}",
          "--scales=0.7",
          f"--out={out}",
      ],
  )
  # transformers loads the output unchanged ...
  loaded = transformers.BertModel.from_pretrained(out)
  got = {k: v.detach().numpy() for k, v in loaded.state_dict().items()}
  # ... and its weights are mtx's in-memory merge of the same models.
  _, p0, _ = hf.load(base)
  ps = [hf.load(d)[1] for d in (ft1, ft2)]
  want = hf.to_hf_tensors("bert", mtx.merging.merge(p0, ps, method, scale=0.7))
  want = {k.removeprefix("bert."): v for k, v in want.items()}
  common = set(want) & set(got)
  assert len(common) >= len(want) - 1, sorted(set(want) - set(got))
  for k in common:
    np.testing.assert_allclose(got[k], np.asarray(want[k]), atol=1e-6)
  # The provenance (sources and their hashes) is recorded in the output.
  meta = mtx.io.safetensors.open_checkpoint(out).metadata
  text = str(meta)
  assert (
      mtx.checkpoint.content_hash(
          [base / "config.json", base / "model.safetensors"]
      )
      in text
  )
  # It also runs: same outputs as mtx's BERT on the merged params.
  ids = torch.tensor([[1, 5, 7, 2, 0]])
  mask = torch.tensor([[1, 1, 1, 1, 0]])
  with torch.no_grad():
    ref = loaded(input_ids=ids, attention_mask=mask).last_hidden_state.numpy()
  model, p, _ = hf.load(out)
  mine = model.apply(p, ids.numpy(), mask.numpy())
  np.testing.assert_allclose(np.asarray(mine)[0, :4], ref[0, :4], atol=1e-5)


def test_merge_binary_subprocess_refuses_existing_output(tmp_path):
  base, ft1, _ = _tiny_bert(tmp_path)
  (tmp_path / "out").mkdir()
  (tmp_path / "out" / "keep.txt").write_text("earlier results")
  r = subprocess.run(
      [
          sys.executable,
          str(binaries.EXPERIMENTS / "merge.py"),
          f"--pretrained={base}",
          f"--finetuned={ft1}",
          "--method=task_arithmetic",
          f"--out={tmp_path / 'out'}",
      ],
      capture_output=True,
      text=True,
      timeout=300,
  )
  assert r.returncode != 0
  assert "exists" in r.stderr and "--overwrite" in r.stderr
  # Nothing touched, nothing left behind.
  assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"]
  assert sorted(p.name for p in tmp_path.iterdir()) == ["m0", "m1", "m2", "out"]
