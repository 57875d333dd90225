"""pytest configuration for tests/.

Only ``test_*.py`` files are collected. The other modules here are helpers:
scripts run in their own process (some set ``XLA_FLAGS`` to fake 8 devices
when imported, which must never happen inside a pytest worker) and shared
utilities; ``--doctest-modules`` would otherwise import them.
"""

import pathlib
import sys

_HERE = pathlib.Path(__file__).parent
# `experiments` is a package at the repository root (`from experiments import
# suite_lib`), importable in every pytest worker.
if str(_HERE.parent) not in sys.path:
  sys.path.insert(0, str(_HERE.parent))

collect_ignore = [
    p.name
    for p in _HERE.glob("*.py")
    if not p.name.startswith("test_") and p.name != "conftest.py"
]
