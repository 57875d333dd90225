"""The suite binary refuses bad config values before any work, in one line
naming the flag: a NaN learning rate or an unknown mode used to run to the
end (exit 0), an unknown method failed only after fine-tuning, negative
steps named no flag, and an unknown field or a workdir that is a file gave
a traceback."""

import os
import re
import subprocess
import sys

import pytest

from experiments.configs import suite as suite_config
from experiments.suite_lib import cache
from experiments.suite_lib import validate

_ROOT = os.path.join(os.path.dirname(__file__), os.pardir)


def _check(c):
  validate.check(
      c,
      cache.as_list(c.modes),
      cache.as_list(c.methods),
      offline=c.suite != "clip8",
  )


def _config(**overrides):
  c = suite_config.get_config("tiny")
  for dotted, v in overrides.items():
    *path, last = dotted.split("__")
    node = c
    for p in path:
      node = node[p]
    node[last] = v
  return c


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"modes": ("bogus",)}, r"--config.modes: unknown mode"),
        ({"modes": ()}, r"--config.modes is empty"),
        ({"methods": ("ties", "nope")}, r"--config.methods: unknown .*nope"),
        ({"finetune__steps": -5}, r"--config.finetune.steps must be > 0"),
        ({"pretrain__steps": 0}, r"--config.pretrain.steps must be > 0"),
        (
            {"finetune__learning_rate": float("nan")},
            r"--config.finetune.learning_rate must be finite",
        ),
        (
            {"pretrain__learning_rate": float("inf")},
            r"--config.pretrain.learning_rate must be finite",
        ),
        (
            {"finetune__warmup_fraction": 1.0},
            r"--config.finetune.warmup_fraction must be < 1",
        ),
        ({"max_test": -1}, r"--config.max_test must be >= 0"),
        ({"finetune__batch_size": 0}, r"--config.finetune.batch_size"),
        ({"validation_fraction": 1.5}, r"--config.validation_fraction"),
        ({"logit_scale": float("nan")}, r"--config.logit_scale"),
        ({"head": "knn"}, r"--config.head must be one of"),
        ({"xi_alphas": (0.0, float("nan"))}, r"--config.xi_alphas: nan"),
        ({"grids__scales": ()}, r"--config.grids.scales is empty"),
    ],
)
def test_bad_values_name_their_flag(overrides, message):
  with pytest.raises(ValueError, match=message):
    _check(_config(**overrides))


def test_every_variant_passes():
  for variant in suite_config.VARIANTS:
    _check(suite_config.get_config(variant))
  c = _config(suite="clip8", pretrain__steps=0)  # clip8 does not pretrain
  _check(c)


def _suite(tmp_path, *flags):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run(
      [
          sys.executable,
          "-m",
          "experiments.suite",
          "--config=experiments/configs/suite.py:tiny",
          *flags,
      ],
      cwd=_ROOT,
      env=env,
      capture_output=True,
      text=True,
      timeout=240,
      check=False,
  )


@pytest.mark.parametrize(
    "flags, message",
    [
        (
            ["--config.finetune.learning_rate=nan"],
            "--config.finetune.learning_rate must be finite",
        ),
        (["--config.modes=bogus"], "--config.modes: unknown mode"),
        (["--config.bogus=1"], "--config.bogus: the config has no field"),
        (["--config.finetune.steps=abc"], "--config.finetune.steps=abc"),
        (["--workdir="], "--workdir is required"),
        (["--workdir={file}"], "exists and is not a folder"),
    ],
)
def test_binary_errors_are_one_line_before_any_work(tmp_path, flags, message):
  a_file = tmp_path / "a_file"
  a_file.write_text("keep")
  work = tmp_path / "work"
  args = [f"--workdir={work}"] + [f.format(file=a_file) for f in flags]
  r = _suite(tmp_path, *args)
  assert r.returncode == 1, r.stderr[-2000:]
  lines = [
      x for x in r.stderr.splitlines() if x and not re.match(r"[IW]\d{4} ", x)
  ]
  assert lines == [lines[-1]] and lines[-1].startswith(
      "suite: error: "
  ), r.stderr[-2000:]
  assert message in lines[-1]
  assert "Traceback" not in r.stderr and "USAGE" not in r.stderr
  assert not work.exists() and a_file.read_text() == "keep"
