"""The package's import graph: no circle, counting every import -- module-level, inside functions (lazy) and
under ``TYPE_CHECKING`` -- as an edge, ``from lesft import methods`` as an edge to ``lesft.methods`` and
``from lesft.x import name`` as one to ``lesft.x`` (or to ``lesft.x.name`` when that is a module).

One circle remains (issue 32); it is listed here, so the test fails on any new one and on its being cut
without this list being updated."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "lesft"

STILL_OPEN: set[frozenset[str]] = set()  # every circle is cut


def _modules() -> dict[str, Path]:
    out = {}
    for p in PKG.rglob("*.py"):
        out[".".join(p.relative_to(PKG.parent).with_suffix("").parts).removesuffix(".__init__")] = p
    return out


def _graph() -> dict[str, set[str]]:
    mods = _modules()

    def known(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {m: set() for m in mods}
    for m, p in mods.items():
        package = m if p.name == "__init__.py" else m.rpartition(".")[0]
        for node in ast.walk(ast.parse(p.read_text())):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(parts + ([base] if base else []))
                names = [f"{base}.{a.name}" for a in node.names] + [base]
            for n in names:
                t = known(n)
                if t and t != m and t != "lesft":  # 'lesft' itself is an empty __init__
                    graph[m].add(t)
    return graph


def _circles(graph: dict[str, set[str]]) -> list[frozenset[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[frozenset[str]] = []
    counter = 0
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on.add(root)
        while work:
            v, it = work[-1]
            for w in it:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                    break
                if w in on:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    comp = set()
                    while True:
                        w = stack.pop()
                        on.discard(w)
                        comp.add(w)
                        if w == v:
                            break
                    if len(comp) > 1:
                        out.append(frozenset(comp))
    return out


def test_the_circle_finder_finds_a_circle() -> None:
    """On a made-up graph: a -> b -> c -> a is one circle, d -> a is not part of it."""
    assert _circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [frozenset({"a", "b", "c"})]


def test_no_import_circle_but_the_one_listed() -> None:
    graph = _graph()
    assert "lesft.methods" in graph["lesft.train"]  # 'from lesft import methods' counts
    assert set(_circles(graph)) == STILL_OPEN, sorted(map(sorted, _circles(graph)))
