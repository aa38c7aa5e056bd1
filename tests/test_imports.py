"""The import graph of mor/, read from the source: acyclic, and layered.

Built from the AST of every module (imports inside functions and under
`if TYPE_CHECKING` count too: a deferred import is still a dependency), so a
cycle cannot hide inside a function. `import a.b` and `from a import b` (b a
submodule) are edges to a.b; `from a import name` is an edge to a. The
implicit import of a package's `__init__` by its submodules is not an edge.

Catches: a cycle such as train -> uptrain -> interop -> train, a layer module
importing a model (mor/layers/lora.py once built models inside merge_lora), a
model importing the trainer, library code importing experiments/ or a driver
(bench, sweep, depth, evals.run; mor/offload.py once imported mor.bench).
"""
from __future__ import annotations

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def module_name(path: pathlib.Path) -> str:
  parts = list(path.relative_to(ROOT).with_suffix("").parts)
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(package: str = "mor") -> dict[str, set[str]]:
  """{module: modules of the project (mor.*, experiments.*) it imports}."""
  files = {module_name(p): p for p in (ROOT / package).rglob("*.py")}
  known = set(files) | {module_name(p) for p in (ROOT / "experiments").rglob("*.py")}
  graph = {}
  for mod, path in files.items():
    is_pkg = path.name == "__init__.py"
    edges = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
      if isinstance(node, ast.Import):
        targets = [a.name for a in node.names]
      elif isinstance(node, ast.ImportFrom):
        if node.level:   # relative: resolve against this module's package
          base = mod.split(".")[: len(mod.split(".")) - node.level + is_pkg]
          src = ".".join(base + ([node.module] if node.module else []))
        else:
          src = node.module
        targets = [f"{src}.{a.name}" if f"{src}.{a.name}" in known else src for a in node.names]
      else:
        continue
      for t in targets:
        while t and t not in known:   # `import mor.x.y` of a name: its deepest module
          t = t.rpartition(".")[0]
        if t and t != mod:
          edges.add(t)
    graph[mod] = edges
  return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
  """One cycle as a path [a, b, ..., a], or None (iterative depth-first search)."""
  done: set[str] = set()
  for start in sorted(graph):
    if start in done:
      continue
    path, on_path = [start], {start}
    stack = [iter(sorted(graph[start]))]
    while stack:
      child = next(stack[-1], None)
      if child is None:
        done.add(path[-1])
        on_path.discard(path.pop())
        stack.pop()
      elif child in on_path:
        return path[path.index(child):] + [child]
      elif child in graph and child not in done:
        path.append(child)
        on_path.add(child)
        stack.append(iter(sorted(graph[child])))
  return None


def _in(mod: str, pkg: str) -> bool:
  return mod == pkg or mod.startswith(pkg + ".")


def test_find_cycle_finds_cycles():
  assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
  assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
  assert find_cycle({"a": {"b"}, "b": {"b2"}, "b2": {"b"}}) == ["b", "b2", "b"]


def test_graph_sees_imports_inside_functions():
  graph = import_graph()
  assert "mor.models" in graph["mor.train"]
  assert "mor.data" in graph["mor.sweep"]       # `from mor.data import make_data` in a function
  assert "mor.models.mor" in graph["mor.models"]  # likewise, in build_model


def test_mor_has_no_import_cycles():
  cycle = find_cycle(import_graph())
  assert cycle is None, "import cycle: " + " -> ".join(cycle)


# Drivers run experiments and benchmarks from the library below them; no library module
# imports one (mor/offload.py once imported mor.bench for its timing loop). Modules in
# neither list (new reports and drivers) may import both.
DRIVERS = ("mor.bench", "mor.sweep", "mor.depth", "mor.evals.run")
LIBRARY = ("mor.config", "mor.presets", "mor.layers", "mor.models", "mor.routers",
           "mor.kv_cache", "mor.decode", "mor.serving", "mor.offload", "mor.exits", "mor.interop",
           "mor.uptrain", "mor.flops", "mor.data", "mor.evals.nll", "mor.evals.tasks",
           "mor.evals.harness", "mor.sharding", "mor.checkpoint", "mor.metrics", "mor.profiling",
           "mor.distributed", "mor.train", "mor.analysis", "mor.report", "mor.plots")


def layering_violations(graph: dict[str, set[str]]) -> list[str]:
  """Every edge that runs from a lower module up to a higher one, as a sentence."""
  bad = []
  for mod, deps in graph.items():
    for dep in deps:
      if _in(dep, "experiments"):
        bad.append(f"{mod} imports {dep} (library code never imports experiments)")
      if _in(mod, "mor.layers") and (_in(dep, "mor.models") or _in(dep, "mor.train")):
        bad.append(f"{mod} imports {dep} (layers sit below models and the trainer)")
      if _in(mod, "mor.models") and _in(dep, "mor.train"):
        bad.append(f"{mod} imports {dep} (models sit below the trainer)")
      if any(_in(dep, d) for d in DRIVERS) and any(_in(mod, m) for m in LIBRARY):
        bad.append(f"{mod} imports {dep} (drivers sit above the library)")
  return bad


def test_layering_finds_back_imports():
  assert layering_violations({"mor.sweep": {"mor.train", "mor.bench"},
                             "mor.bench": {"mor.offload"}, "mor.depth_report": {"mor.depth"}}) == []
  assert layering_violations({"mor.offload": {"mor.bench", "mor.decode"}}) == [
      "mor.offload imports mor.bench (drivers sit above the library)"]
  assert len(layering_violations({"mor.layers.lora": {"mor.models"}, "mor.report": {"mor.sweep"},
                                  "mor.models.mor": {"mor.train"}})) == 3


def test_layering():
  bad = layering_violations(import_graph())
  assert not bad, "\n".join(bad)
