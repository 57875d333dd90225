"""README.md's Python example runs as printed, and its shell commands name
files that exist."""

import pathlib
import re

import jax

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def _blocks(lang: str) -> list[str]:
  return re.findall(rf"```{lang}\n(.*?)```", README.read_text(), re.S)


def test_python_example_runs():
  (code,) = _blocks("python")
  scope: dict = {}
  exec(compile(code, str(README), "exec"), scope)  # pylint: disable=exec-used
  shapes = jax.tree.map(lambda x: x.shape, scope["merged_tvs"])
  assert shapes == {"dense": {"bias": (10, 2), "kernel": (10, 2, 2)}}
  assert jax.tree.map(lambda x: x.shape, scope["merged"]) == {
      "dense": {"bias": (2,), "kernel": (2, 2)}
  }


def test_commands_name_existing_files():
  root = README.parent
  commands = "\n".join(_blocks("sh"))
  paths = re.findall(
      r"(?:sh|python) ((?:experiments|benchmarks)/[\w./]+)", commands
  )
  assert paths, commands
  for p in paths:
    assert (root / p).is_file(), p
