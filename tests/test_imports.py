"""The package's import graph, read from the source: no cycle, the library never imports the CLI, and every import
points down the rooms of docs/architecture.md (each module in one of them)."""

from __future__ import annotations

import ast
import re
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


ARCHITECTURE = PACKAGE.parent / "docs" / "architecture.md"


def rooms() -> list[list[str]]:
    """The rooms of docs/architecture.md's table "From the user inward", top to bottom: each a list of module
    or package names (``headscore.cli``, ``headscore.track``, ...; ``headscore`` for ``__init__.py``).
    A row names its first path from the repository root (``headscore/track.py``) and the others beside it
    (``learn_gates.py``); rows outside the package (``benchmarks/``, ``tests/``) are left out."""
    text = ARCHITECTURE.read_text(encoding="utf-8")
    section = text.split("## From the user inward", 1)[1].split("\n## ", 1)[0]
    found = []
    for line in section.splitlines():
        if not line.startswith("| `"):
            continue
        paths = re.findall(r"`([^`]+)`", line.split("|")[1])
        if not paths[0].startswith("headscore/"):
            continue
        names = []
        for path in paths:
            path = path.removeprefix("headscore/").removesuffix("/").removesuffix(".py")
            names.append("headscore" if path == "__init__" else "headscore." + path.replace("/", "."))
        found.append(names)
    return found


def room_of(module: str, order: list[list[str]]) -> int | None:
    """The index of the room holding ``module`` (a package's room holds its submodules), or None."""
    for i, names in enumerate(order):
        if any(module == n or (n != "headscore" and module.startswith(n + ".")) for n in names):
            return i
    return None


def test_the_rooms_are_read_from_the_architecture_page():
    order = rooms()
    assert order[0] == ["headscore.cli"] and order[1] == ["headscore"]
    assert ["headscore.track", "headscore.learn_gates"] in order
    assert room_of("headscore.cogqa.probe", order) == order.index(["headscore.cogqa"])
    assert room_of("headscore.nope", order) is None


def test_every_module_has_a_room():
    order = rooms()
    homeless = sorted(m for m in modules() if m != "headscore" and room_of(m, order) is None)
    assert homeless == [], f"modules that no row of {ARCHITECTURE.name}'s table names: {homeless}"


def upward_imports(edges: dict[str, set[str]], order: list[list[str]]) -> list[str]:
    """Every import of ``edges`` whose target's room lies above its importer's room in ``order``."""
    found = []
    for name, targets in sorted(edges.items()):
        for target in sorted(targets):
            here, there = room_of(name, order), room_of(target, order)
            if here is not None and there is not None and there < here:
                found.append(f"{name} -> {target} ({', '.join(order[there])} is above {', '.join(order[here])})")
    return found


def test_imports_point_down_the_documented_order():
    """A module imports only its own room and the rooms below it in docs/architecture.md's table."""
    upward = upward_imports(graph(), rooms())
    assert upward == [], f"imports pointing up {ARCHITECTURE.name}'s list:\n" + "\n".join(upward)


def test_the_order_check_catches_an_upward_import():
    order = [["headscore.api"], ["headscore.methods", "headscore.loss"]]
    edges = {"headscore.api": {"headscore.methods.gradient"}, "headscore.methods.gradient": {"headscore.loss"},
             "headscore.methods.probe": {"headscore.api"}}
    assert upward_imports(edges, order) == [
        "headscore.methods.probe -> headscore.api (headscore.api is above headscore.methods, headscore.loss)"]
