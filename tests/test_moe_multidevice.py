"""Runs the 8-device expert-parallel MoE checks in their own process."""

import os
import subprocess
import sys

_HERE = os.path.dirname(__file__)


def test_expert_parallel_moe_on_8_faked_cpu_devices():
  env = dict(os.environ)
  env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
  env["JAX_PLATFORMS"] = "cpu"
  proc = subprocess.run(
      [sys.executable, os.path.join(_HERE, "moe_multidevice.py")],
      env=env,
      capture_output=True,
      text=True,
      timeout=600,
  )
  assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
  assert proc.stdout.strip().endswith("passed"), proc.stdout[-2000:]
