"""The import graph: no cycles among deltaserve's modules, and imports only point down the layers."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# folder -> import name (pyproject.toml's package-dir)
PACKAGES = {
    "server": "deltaserve.server",
    "adapters": "deltaserve.adapters",
    "client": "deltaserve.client",
    "testing": "deltaserve.testing",
}
# server's layers, bottom first: a module may import its own layer and the ones below it, never above.
SERVER_LAYERS = ["errors", "config", "kernels", "model", "residency", "metrics", "engine", "frontends", "app"]
SERVER_LAYERS += ["cluster", "cli"]


def modules() -> dict[str, Path]:
    """{dotted module name: file} for every module of the code folders."""
    found = {}
    for folder, package in PACKAGES.items():
        for path in (ROOT / folder).rglob("*.py"):
            parts = [part for part in path.relative_to(ROOT / folder).with_suffix("").parts if part != "__init__"]
            found[".".join([package, *parts])] = path
    return found


def import_graph() -> dict[str, set[str]]:
    """{module: the project modules it imports}, counting every import statement: top-level, inside functions
    and under TYPE_CHECKING alike (a cycle hidden from the interpreter is still a cycle for a reader)."""
    known = modules()
    graph = {}
    for name, path in known.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("deltaserve"):
                for alias in node.names:
                    submodule = f"{node.module}.{alias.name}"
                    targets.add(submodule if submodule in known else node.module)
            elif isinstance(node, ast.Import):
                targets |= {alias.name for alias in node.names if alias.name.startswith("deltaserve")}
        graph[name] = {target for target in targets if target in known and target != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan's algorithm)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
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


def server_layer(module: str) -> int | None:
    parts = module.split(".")
    if parts[:2] != ["deltaserve", "server"] or len(parts) < 3:
        return None
    return SERVER_LAYERS.index(parts[2])


def test_no_import_cycles():
    assert cycles(import_graph()) == []


def test_the_cycle_finder_finds_one():
    """Not vacuous: a two-module loop and a three-module loop are both reported."""
    graph = {"a": {"b"}, "b": {"a"}, "c": {"d"}, "d": {"e"}, "e": {"c"}, "f": {"a"}}
    assert cycles(graph) == [["a", "b"], ["c", "d", "e"]]


def test_every_server_module_has_a_layer():
    unplaced = [name for name in modules() if name.count(".") >= 2 and name.startswith("deltaserve.server.")]
    unplaced = [name for name in unplaced if name.split(".")[2] not in SERVER_LAYERS]
    assert unplaced == []


def test_imports_point_down_the_layers():
    upward = []
    for module, targets in import_graph().items():
        for target in targets:
            if module.startswith("deltaserve.adapters") and target.startswith("deltaserve.server"):
                upward.append((module, target))
            if module.startswith("deltaserve.client") and not target.startswith("deltaserve.client"):
                upward.append((module, target))
            # The test fixtures sit on top: they may use the server, the shipped code never uses them.
            if target.startswith("deltaserve.testing") and not module.startswith("deltaserve.testing"):
                upward.append((module, target))
            mine, theirs = server_layer(module), server_layer(target)
            if mine is not None and theirs is not None and theirs > mine:
                upward.append((module, target))
    assert sorted(upward) == []
