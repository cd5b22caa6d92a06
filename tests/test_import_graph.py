"""The product's import graph: no cycles, and the sidecar's stages depend one way.

Every import counts, including those under ``TYPE_CHECKING`` and inside functions: a name a
module needs from another is a dependency whether Python resolves it at import time or later.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("sidecar", "control_plane", "pilotfish")
GENERATED = ROOT / "pilotfish" / "gen"

# The sidecar's request path, top to bottom. A stage may import the stages below it, never one
# above: upward calls go through a Protocol the lower stage defines.
STAGES = ("sidecar.listen", "sidecar.route", "sidecar.upstream", "sidecar.http", "sidecar.codec")
# What the stages may never import: the process that wires them together, and the xDS client.
WIRING = ("sidecar.server", "sidecar.main", "sidecar.admin", "sidecar.xds")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def product_modules() -> dict[str, Path]:
    modules: dict[str, Path] = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            if GENERATED in path.parents:
                continue
            modules[module_name(path)] = path
    return modules


def imported_names(path: Path, name: str) -> Iterator[str]:
    """Every dotted name ``path`` imports, resolved against its own package."""
    is_package = path.name == "__init__.py"
    package = name if is_package else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                origin = ".".join([*base, node.module] if node.module else base)
            else:
                origin = node.module or ""
            for alias in node.names:
                # A submodule when one has that name (the caller checks), else a name in origin.
                yield f"{origin}.{alias.name}"


def import_graph() -> dict[str, set[str]]:
    modules = product_modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets: set[str] = set()
        for imported in imported_names(path, name):
            # ``from a.b import c`` names module a.b.c when it exists, else a name in a.b;
            # ``import a.b`` names a.b.
            while imported and imported not in modules:
                imported = imported.rpartition(".")[0]
            if imported and imported != name:
                targets.add(imported)
        graph[name] = targets
    return graph


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm, iterative: the components with more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    found: list[list[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work: list[tuple[str, Iterator[str]]] = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, successors = work[-1]
            for succ in successors:
                if succ not in index:
                    index[succ] = low[succ] = counter
                    counter += 1
                    stack.append(succ)
                    on_stack.add(succ)
                    work.append((succ, iter(sorted(graph[succ]))))
                    break
                if succ in on_stack:
                    low[node] = min(low[node], index[succ])
            else:
                work.pop()
                if work:
                    parent = work[-1][0]
                    low[parent] = min(low[parent], low[node])
                if low[node] == index[node]:
                    component: list[str] = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        found.append(sorted(component))
    return found


def within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def test_no_import_cycles() -> None:
    graph = import_graph()
    cycles = strongly_connected(graph)
    described = [
        " -> ".join(f"{m} (imports {sorted(graph[m] & set(c))})" for m in c) for c in cycles
    ]
    assert not cycles, "import cycles:\n" + "\n".join(described)


@pytest.mark.parametrize("stage", STAGES)
def test_stage_imports_point_down(stage: str) -> None:
    graph = import_graph()
    above = STAGES[: STAGES.index(stage)]
    wrong = sorted(
        f"{module} imports {target}"
        for module, targets in graph.items()
        if within(module, stage)
        for target in targets
        if any(within(target, p) for p in (*above, *WIRING))
    )
    assert not wrong, f"{stage} reaches up the request path:\n" + "\n".join(wrong)


def test_finds_a_cycle() -> None:
    """The checker itself: a planted cycle is found, and a chain is not one."""
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert strongly_connected(graph) == [["a", "b", "c"]]
    assert strongly_connected({"a": {"b"}, "b": set()}) == []
