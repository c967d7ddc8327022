"""The package's import graph, read from the source: no cycle, and the library never imports the CLI."""

from __future__ import annotations

import ast
from pathlib import Path

import headscore

PACKAGE = Path(headscore.__file__).resolve().parent


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def _resolve(current: str, is_package: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = current.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """headscore modules ``name`` imports anywhere (top level or inside functions), with their parent packages
    (importing ``a.b.c`` runs ``a.b``'s ``__init__``) unless ``name`` lies inside that package itself (then
    its ``__init__`` has run already). The root package is left out: it imports lazily."""
    own = {name.rsplit(".", k)[0] for k in range(1, name.count(".") + 1)}
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        targets = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(name, path.name == "__init__.py", node)
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        for target in targets:
            first = True
            while target and target != "headscore":
                if target in known and (first or target not in own):
                    found.add(target)
                first = False
                target = target.rpartition(".")[0]
    found.discard(name)
    return found


def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {name: imports_of(name, path, known) for name, path in mods.items() if name != "headscore"}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_the_walker_sees_imports_and_cycles():
    edges = graph()
    assert "headscore.api" in edges["headscore.cli.scoring"]
    assert "headscore.patch" in edges["headscore.api"]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycle():
    assert cycles(graph()) == []


def test_the_library_never_imports_the_cli():
    offenders = {name: sorted(t for t in targets if t == "headscore.cli" or t.startswith("headscore.cli."))
                 for name, targets in graph().items() if not name.startswith("headscore.cli")}
    assert {k: v for k, v in offenders.items() if v} == {}
