"""The import graph of ``src/pie`` has no circles (docs/architecture.md, "Dependency direction").

Every ``import`` and ``from ... import`` statement counts: at module level, inside functions
(a deferred import is still a dependency; deferring it only hides the circle) and inside
``if TYPE_CHECKING:`` blocks (a type-only import still says one module needs the other; the
layering holds for annotations too). ``from pkg import name`` counts as an import of
``pkg.name`` when that is a module, else of ``pkg``. Importing a package's own parent
(``pie``) is not an edge: Python runs ``pie/__init__.py`` for every ``pie.*`` module anyway.

Two checks: no module imports itself through other modules (a module cycle), and the units
directly under ``src/pie/`` — the capability packages and the top-level modules — depend one
way: collapsing each to one node leaves no cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "pie"


def modules(root: Path = SRC) -> dict[str, Path]:
    found = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def import_graph(root: Path = SRC) -> dict[str, set[str]]:
    """module -> the modules of the package it imports (anywhere in its source)."""
    mods = modules(root)
    graph: dict[str, set[str]] = {name: set() for name in mods}
    for name, path in mods.items():
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package[: len(package) - (node.level - 1)]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                targets = [source] + [f"{source}.{alias.name}" for alias in node.names]
            else:
                continue
            for target in targets:
                while target and target not in mods:
                    target = target.rpartition(".")[0]
                if target and target != name and target != root.name:
                    graph[name].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one node (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def one_circle(graph: dict[str, set[str]], members: list[str]) -> str:
    """One concrete circle inside a cycle's members, as ``a -> b -> ... -> a``."""
    inside = set(members)
    start = members[0]
    paths = {start: [start]}
    pending = [start]
    while pending:
        node = pending.pop(0)
        for nxt in sorted(graph[node] & inside):
            if nxt == start:
                return " -> ".join([*paths[node], start])
            if nxt not in paths:
                paths[nxt] = [*paths[node], nxt]
                pending.append(nxt)
    return " <-> ".join(members)


def unit(module: str) -> str:
    """The unit directly under ``pie`` a module belongs to (``pie.jobs.logic`` -> ``jobs``)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def unit_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    units: dict[str, set[str]] = {}
    for module, targets in graph.items():
        units.setdefault(unit(module), set()).update(unit(t) for t in targets if unit(t) != unit(module))
    return units


def test_no_module_imports_itself_through_others() -> None:
    graph = import_graph()
    found = cycles(graph)
    assert not found, "import circles (imports inside functions count):\n" + "\n".join(
        one_circle(graph, members) for members in found
    )


def test_packages_depend_one_way() -> None:
    graph = unit_graph(import_graph())
    found = cycles(graph)
    assert not found, "package-level import cycles among the units of src/pie:\n" + "\n".join(
        one_circle(graph, members) for members in found
    )


def test_the_check_sees_deferred_and_type_only_imports(tmp_path: Path) -> None:
    """The graph counts an import inside a function and one under TYPE_CHECKING."""
    root = tmp_path / "pkg"
    (root / "a").mkdir(parents=True)
    (root / "__init__.py").write_text("")
    (root / "a" / "__init__.py").write_text("")
    (root / "a" / "x.py").write_text("def f():\n    from pkg.b import y\n")
    (root / "b.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .a import x\nimport pkg\n"
    )
    graph = import_graph(root)
    assert graph["pkg.a.x"] == {"pkg.b"}
    assert graph["pkg.b"] == {"pkg.a", "pkg.a.x"}
    assert cycles(graph) == [["pkg.a.x", "pkg.b"]]
    assert one_circle(graph, ["pkg.a.x", "pkg.b"]) == "pkg.a.x -> pkg.b -> pkg.a.x"
    assert cycles(unit_graph(graph)) == [["a", "b"]]
