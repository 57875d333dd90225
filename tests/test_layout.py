"""The house rules of DESIGN.md: no import cycles, no oversized source files.

The import graph is drawn from the sources with ``ast`` (every ``import``
statement, module level or inside a function, so a cycle hidden behind a
function-local import counts too). A file under ``mtx/``, ``experiments/`` or
``benchmarks/`` may grow past :data:`MAX_LINES` only with a reason stated in
its first lines (``Over 600 lines because: ...``).
"""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("mtx", "experiments")
MAX_LINES = 600
_REASON = "Over 600 lines because:"


def _module_name(path: pathlib.Path) -> str:
  parts = list(path.relative_to(ROOT).with_suffix("").parts)
  if parts[-1] == "__init__":
    parts.pop()
  return ".".join(parts)


def _modules() -> dict[str, pathlib.Path]:
  mods = {}
  for pkg in PACKAGES:
    for path in sorted((ROOT / pkg).rglob("*.py")):
      mods[_module_name(path)] = path
  return mods


def _resolve(
    name: str, level: int, current: str, is_package: bool
) -> str | None:
  if level == 0:
    return name
  base = current.split(".")
  if not is_package:
    base = base[:-1]
  if level > 1:
    base = base[: len(base) - (level - 1)]
  return ".".join(base + ([name] if name else []))


def import_graph(mods: dict[str, pathlib.Path]) -> dict[str, set[str]]:
  """Module -> the project modules it imports (anywhere in its source)."""
  graph: dict[str, set[str]] = {m: set() for m in mods}
  for mod, path in mods.items():
    is_package = path.name == "__init__.py"
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
      targets: list[str] = []
      if isinstance(node, ast.Import):
        targets = [a.name for a in node.names]
      elif isinstance(node, ast.ImportFrom):
        base = _resolve(node.module or "", node.level, mod, is_package)
        for alias in node.names:
          sub = f"{base}.{alias.name}"
          targets.append(sub if sub in mods else base)
      for target in targets:
        # `import a.b.c` names a.b.c; keep the longest prefix we know.
        parts = target.split(".")
        while parts and ".".join(parts) not in mods:
          parts.pop()
        if parts and ".".join(parts) != mod:
          graph[mod].add(".".join(parts))
  return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
  """A cycle as a list of modules (first == last), or None."""
  color: dict[str, int] = {}
  stack: list[str] = []

  def visit(m: str) -> list[str] | None:
    color[m] = 1
    stack.append(m)
    for n in sorted(graph[m]):
      if color.get(n) == 1:
        return stack[stack.index(n) :] + [n]
      if n not in color:
        found = visit(n)
        if found:
          return found
    stack.pop()
    color[m] = 2
    return None

  for m in sorted(graph):
    if m not in color:
      found = visit(m)
      if found:
        return found
  return None


def test_find_cycle_sees_a_function_local_cycle(tmp_path):
  # The checker itself: a cycle through a function-local import is found.
  a = tmp_path / "a.py"
  b = tmp_path / "b.py"
  a.write_text("import b\n")
  b.write_text("def f():\n  import a\n")
  graph = {"a": set(), "b": set()}
  for name, path in (("a", a), ("b", b)):
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.Import):
        graph[name].update(x.name for x in node.names)
  assert find_cycle(graph) in (["a", "b", "a"], ["b", "a", "b"])
  assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_resolve_relative_imports():
  assert _resolve("x", 1, "mtx.io.hf", False) == "mtx.io.x"
  assert _resolve("x", 1, "mtx.io", True) == "mtx.io.x"
  assert _resolve("", 2, "mtx.io.hf", False) == "mtx"


def test_no_import_cycle():
  graph = import_graph(_modules())
  assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


@pytest.mark.parametrize("package", ["mtx", "experiments", "benchmarks"])
def test_no_oversized_source_file(package):
  over = []
  for path in sorted((ROOT / package).rglob("*.py")):
    lines = path.read_text().splitlines()
    if len(lines) > MAX_LINES and not any(
        _REASON in line for line in lines[:20]
    ):
      over.append(f"{path.relative_to(ROOT)} ({len(lines)} lines)")
  assert (
      not over
  ), "split along its seams or state why at its top: " + ", ".join(over)


def test_core_imports_no_framework():
  # DESIGN.md: flax only in models/, orbax only in checkpoint.py, absl only in
  # experiments/ (and mtx may log through absl nowhere in its math).
  allowed = {
      "flax": ("mtx.models",),
      "orbax": ("mtx.checkpoint",),
      "torch": (),
  }
  bad = []
  for mod, path in _modules().items():
    if not mod.startswith("mtx"):
      continue
    for node in ast.walk(ast.parse(path.read_text())):
      names = []
      if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
      elif isinstance(node, ast.ImportFrom) and node.level == 0:
        names = [node.module or ""]
      for name in names:
        top = name.split(".")[0]
        if top in allowed and not any(
            mod == p or mod.startswith(p + ".") for p in allowed[top]
        ):
          bad.append(f"{mod} imports {name}")
  assert not bad, bad
