"""Loads experiments/*.py binaries for in-process tests.

absl flags are process-global, and different binaries define flags with the
same names (``--workdir``, ``--config``). :func:`load` executes a binary's
module afresh after removing the flags of every binary loaded before, so
tests of several binaries can share one pytest worker. Call it inside each
test (not at import time).
"""

import importlib.util
import pathlib
import sys

from absl import flags

EXPERIMENTS = pathlib.Path(__file__).resolve().parents[1] / "experiments"
_DEFINED: set[str] = set()  # flag names defined by binaries loaded so far


def load(name: str):
  """Imports ``experiments/<name>.py`` freshly and returns the module."""
  fv = flags.FLAGS
  for flag in _DEFINED:
    if flag in fv:
      delattr(fv, flag)
  _DEFINED.clear()
  if str(EXPERIMENTS) not in sys.path:
    sys.path.insert(0, str(EXPERIMENTS))
  spec = importlib.util.spec_from_file_location(
      f"_bin_{name}", EXPERIMENTS / f"{name}.py"
  )
  mod = importlib.util.module_from_spec(spec)
  before = set(fv)
  spec.loader.exec_module(mod)
  _DEFINED.update(set(fv) - before)
  if not fv.is_parsed():
    fv.mark_as_parsed()
  return mod


def run_main(mod, argv: list[str]) -> None:
  """Parses ``argv`` into the global flags (restored afterwards), runs main."""
  from absl.testing import flagsaver  # pylint: disable=g-import-not-at-top

  with flagsaver.flagsaver():
    # ml_collections' config flag reads its `--config.x` overrides from
    # sys.argv, as under app.run.
    saved, sys.argv = sys.argv, list(argv)
    try:
      rest = flags.FLAGS(argv)
    finally:
      sys.argv = saved
    mod.main(rest)
