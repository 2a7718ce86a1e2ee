"""How the code hangs together, read from its source with ``ast``: no import circle in ``node/`` or
``fanout/backends/`` (imports under ``TYPE_CHECKING`` and inside functions count: a circle of types is
still a circle of knowledge), and the contracts between the parts carry no method that nothing calls
(every backend would have to implement it for nothing)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from fanout.backends.base import Backend
from fanout.backends.eventlog import EventLog
from tests.support.nodes import ROOT


def _trees(*folders: str) -> dict[str, tuple[Path, ast.Module]]:
    """Every module under ``folders`` by its dotted name, with its parsed source."""
    trees = {}
    for folder in folders:
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            trees[name] = (path, ast.parse(path.read_text()))
    return trees


def import_graph(trees: dict[str, tuple[Path, ast.Module]]) -> dict[str, set[str]]:
    """Module -> the modules of ``trees`` it imports, wherever the import is (``from .x import y`` is an
    import of ``x.y`` when that is a module, else of ``x``)."""
    graph: dict[str, set[str]] = {}
    for name, (path, tree) in trees.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        imported: set[str] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    target = ".".join([*base, *([node.module] if node.module else [])])
                else:
                    target = node.module or ""
                imported |= {
                    f"{target}.{a.name}" if f"{target}.{a.name}" in trees else target for a in node.names
                }
            elif isinstance(node, ast.Import):
                imported |= {alias.name for alias in node.names}
        graph[name] = {module for module in imported if module in trees and module != name}
    return graph


def circles(graph: dict[str, set[str]]) -> list[frozenset[str]]:
    """The import circles: the strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[frozenset[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        for imported in sorted(graph[module]):
            if imported not in index:
                visit(imported)
                low[module] = min(low[module], low[imported])
            elif imported in stack:
                low[module] = min(low[module], index[imported])
        if low[module] == index[module]:
            component = {stack.pop()}
            while module not in component:
                component.add(stack.pop())
            if len(component) > 1:
                found.append(frozenset(component))

    for module in sorted(graph):
        if module not in index:
            visit(module)
    return found


def test_the_circle_finder_finds_circles_through_type_checking_imports() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert circles(graph) == [frozenset("abc")]
    trees = {
        "p": (Path("p/__init__.py"), ast.parse("from . import q")),
        "p.q": (
            Path("p/q.py"),
            ast.parse("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .r import R"),
        ),
        "p.r": (Path("p/r.py"), ast.parse("def f():\n    from p.q import x")),
    }
    assert import_graph(trees) == {"p": {"p.q"}, "p.q": {"p.r"}, "p.r": {"p.q"}}
    assert circles(import_graph(trees)) == [frozenset({"p.q", "p.r"})]


def test_no_import_circle_in_fanout_and_its_backends() -> None:
    assert circles(import_graph(_trees("fanout"))) == []


def test_no_import_circle_in_the_node() -> None:
    # the whole of fanout/ and node/: a circle could pass through fanout's modules too
    assert circles(import_graph(_trees("fanout", "node"))) == []


@pytest.mark.parametrize("contract", [EventLog, Backend], ids=lambda c: c.__name__)
def test_every_method_of_a_contract_is_used(contract: type) -> None:
    used = {
        node.attr
        for _, tree in _trees("fanout", "node").values()
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute)
    }
    public = {name for name in vars(contract) if not name.startswith("_")}
    assert public - used == set()


#: the node's parts stay small enough to read whole: a file past this is doing two jobs
NODE_FILE_LINES = 450


def test_no_file_of_the_node_is_over_its_size() -> None:
    sizes = {path.name: len(path.read_text().splitlines()) for path in (ROOT / "node").glob("*.py")}
    assert len(sizes) > 10
    assert {name: n for name, n in sizes.items() if n > NODE_FILE_LINES} == {}
