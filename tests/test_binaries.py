"""Every binary starts both as ``python experiments/X.py`` and with ``-m``.

``--help`` imports the binary and its libraries and defines its flags,
without running anything. absl's ``--help`` exits with status 1 by design
(as does a failed import), so the check is on the output: the binary's
module docstring and its flags, and no traceback.
"""

import pytest

import binaries

BINARIES = {
    "finetune": ("--config", "--workdir", "--kill_at_step"),
    "moe_train": ("--config", "--workdir", "--mesh", "--coordinator"),
    "tangent_demo": ("--config", "--workdir"),
}


@pytest.mark.parametrize("as_module", [False, True], ids=["script", "module"])
@pytest.mark.parametrize("name", sorted(BINARIES))
def test_help_as_script_and_module(name, as_module, tmp_path):
  # As a script, from an unrelated directory: the binary finds the
  # `experiments` package by itself.
  proc = binaries.run(name, "--help", as_module=as_module, cwd=tmp_path)
  out = proc.stdout + proc.stderr
  assert "Traceback" not in out, out[-3000:]
  assert proc.returncode == 1, out[-3000:]  # absl's --help status
  doc = (binaries.EXPERIMENTS / f"{name}.py").read_text().split("\n")[0]
  assert doc.lstrip('r"') in proc.stdout, proc.stdout[:500]
  for flag in BINARIES[name]:
    assert f"{flag}:" in proc.stdout, (flag, proc.stdout[-2000:])
  # Experiment settings are config fields, not flags.
  assert "--linearized:" not in proc.stdout
  assert "--steps:" not in proc.stdout


@pytest.mark.parametrize("name", sorted(BINARIES))
def test_config_and_workdir_are_required(name, tmp_path):
  proc = binaries.run(name, as_module=True)
  assert proc.returncode == 1
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  assert "--config must have a value" in proc.stderr, proc.stderr[-2000:]


_CONFIGS = binaries.EXPERIMENTS / "configs"
BAD_INPUT = {
    "finetune": (
        f"--config={_CONFIGS / 'finetune.py'}:smoke",
        "--config.transform=bogus",
        "unknown transform 'bogus'",
    ),
    "moe_train": (
        f"--config={_CONFIGS / 'moe_train.py'}:smoke",
        "--mesh=data=3,expert=5",
        "has 15 devices",
    ),
    "tangent_demo": (
        f"--config={_CONFIGS / 'tangent_demo.py'}:smoke",
        "--config.tasks=('none',)",
        "exactly two different transforms",
    ),
}


@pytest.mark.parametrize("name", sorted(BAD_INPUT))
def test_bad_input_is_one_line_and_nonzero_exit(name, tmp_path):
  config, bad, message = BAD_INPUT[name]
  proc = binaries.run(name, config, bad, f"--workdir={tmp_path / 'w'}")
  assert proc.returncode == 1, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith(f"{name}: error: ") and message in last, last


_EXPERIMENTS = {
    "finetune": f"--config={_CONFIGS / 'finetune.py'}:smoke",
    "moe_train": f"--config={_CONFIGS / 'moe_train.py'}:smoke",
    "tangent_demo": f"--config={_CONFIGS / 'tangent_demo.py'}:smoke",
    "suite": f"--config={_CONFIGS / 'suite.py'}:tiny",
    "interference": f"--config={_CONFIGS / 'suite.py'}:interference_a",
}


@pytest.mark.parametrize("name", sorted(_EXPERIMENTS))
def test_unknown_config_field_is_one_line(name, tmp_path):
  # experiments/cli.py: every experiment binary parses flags the same way.
  proc = binaries.run(
      name,
      _EXPERIMENTS[name],
      "--config.bogus=1",
      f"--workdir={tmp_path / 'w'}",
      as_module=True,
  )
  assert proc.returncode == 1, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr and "USAGE" not in proc.stderr
  last = proc.stderr.strip().splitlines()[-1]
  assert last == (
      f"{name}: error: --config.bogus: the config has no field 'bogus'"
  ), proc.stderr[-2000:]
  assert not (tmp_path / "w").exists()
