"""The architecture holds in the source: data flows one way, and the planner stays pure.

Reads every module of src/splitllm with `ast` (never importing it) and collects every import,
lazy ones inside functions included: a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
import graphlib
from collections.abc import Collection, Mapping
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
FORBIDDEN_IN_PLANNER = ("splitllm.runtime", "splitllm.sim", "torch", "transformers")


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported(tree: ast.AST, modules: Collection[str]) -> set[str]:
    """Every module a tree imports: `from a import b` is a.b when that is a module, else a."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0 and node.module, "relative import"
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                names.add(sub if sub in modules else node.module)
    return names


def import_graph(src: Path = SRC) -> dict[str, set[str]]:
    """module -> the modules it imports (its own package's, and third-party ones)."""
    trees = {_module_name(p): ast.parse(p.read_text(), str(p))
             for p in sorted(src.rglob("*.py"))}
    return {name: _imported(tree, trees) for name, tree in trees.items()}


def find_cycle(graph: Mapping[str, set[str]]) -> list[str] | None:
    """One import cycle among the graph's own modules, or None."""
    own = {m: {d for d in deps if d in graph and d != m} for m, deps in graph.items()}
    try:
        tuple(graphlib.TopologicalSorter(own).static_order())
    except graphlib.CycleError as exc:
        return list(exc.args[1])
    return None


def reachable(graph: Mapping[str, set[str]], start: str) -> set[str]:
    """Every module `start` imports, directly or through other modules of the graph."""
    seen: set[str] = set()
    todo = [start]
    while todo:
        for dep in graph.get(todo.pop(), set()):
            if dep not in seen:
                seen.add(dep)
                todo.append(dep)
    return seen


GRAPH = import_graph()
PLANNER = sorted(m for m in GRAPH if m == "splitllm.planner" or m.startswith("splitllm.planner."))


def test_the_graph_covers_the_tree() -> None:
    assert "splitllm.planner.solvers" in GRAPH and "splitllm.runtime.server" in GRAPH
    assert "splitllm.sim.engine" in GRAPH and len(PLANNER) >= 10
    assert "splitllm.planner.instance" in GRAPH["splitllm.planner.solvers"]


def test_the_imports_of_src_have_no_cycle() -> None:
    assert find_cycle(GRAPH) is None


@pytest.mark.parametrize("module", PLANNER)
def test_the_planner_imports_neither_runtime_nor_simulator_nor_torch(module: str) -> None:
    bad = sorted(m for m in reachable(GRAPH, module) if m.startswith(FORBIDDEN_IN_PLANNER))
    assert bad == [], f"{module} reaches {bad}"


def test_the_checks_can_fail() -> None:
    graph = {"a": {"b"}, "b": {"c", "torch"}, "c": {"a"}}
    assert sorted(set(find_cycle(graph) or [])) == ["a", "b", "c"]
    assert "torch" in reachable(graph, "a")
    tree = ast.parse("def f():\n    from splitllm.runtime import units, UnitStack\n")
    assert _imported(tree, {"splitllm.runtime.units"}) == {"splitllm.runtime.units",
                                                           "splitllm.runtime"}


def readme_layout(readme: Path = SRC.parent / "README.md") -> set[str]:
    """The module paths the README's Layout section lists under src/splitllm/."""
    text = readme.read_text()
    block = text[text.index("## Layout"):]
    block = block[block.index("```\n") + 4:]
    block = block[:block.index("```")]
    listed, package = set(), ""
    for line in block.splitlines():
        if line.startswith(("src/", "tests/", "benchmarks/", "docs/")) or not line.strip():
            package = ""
            continue
        entry = line.split()[0]
        if entry.endswith("/"):
            package = entry
        elif entry.endswith(".py"):
            listed.add(package + entry if line.startswith("    ") else entry)
    return listed


def test_the_readme_layout_lists_every_module() -> None:
    modules = {str(p.relative_to(SRC / "splitllm")) for p in (SRC / "splitllm").rglob("*.py")}
    assert readme_layout() == modules
