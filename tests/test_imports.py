"""The package's import graph: no cycle among module-level imports, and the two circles issue 14 named
(config <-> evaluate, data.benchmarks <-> data.rows) cut at every level, lazy imports included."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "lesft"


def _imports(module_level: bool) -> dict[str, set[str]]:
    out = {}
    for p in PKG.rglob("*.py"):
        name = ".".join(p.relative_to(PKG.parent).with_suffix("").parts).removesuffix(".__init__")
        tree = ast.parse(p.read_text())
        nodes = tree.body if module_level else list(ast.walk(tree))
        deps = set()
        for node in nodes:
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lesft"):
                deps.add(node.module)
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name.startswith("lesft")}
        out[name] = deps
    return out


def test_no_cycle_among_module_level_imports() -> None:
    graph = _imports(module_level=True)
    state: dict[str, int] = {}

    def visit(n: str, path: list[str]) -> None:
        state[n] = 1
        for d in graph.get(n, ()):
            assert state.get(d) != 1, " -> ".join(path[path.index(d):] + [d]) if d in path else d
            if d not in state:
                visit(d, path + [d])
        state[n] = 2

    for m in graph:
        if m not in state:
            visit(m, [m])


def test_the_named_circles_are_cut_at_every_level() -> None:
    graph = _imports(module_level=False)
    for a, b in (("lesft.config", "lesft.evaluate"), ("lesft.data.benchmarks", "lesft.data.rows")):
        assert not (b in graph[a] and a in graph[b]), f"{a} and {b} import each other"
