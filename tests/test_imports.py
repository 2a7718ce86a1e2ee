"""How the code hangs together, read from its source with ``ast``: the contracts between the parts
carry no method that nothing calls (every backend would have to implement it for nothing)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from fanout.backends.base import Backend
from fanout.backends.eventlog import EventLog
from tests.support.nodes import ROOT


def _trees(*folders: str) -> dict[Path, ast.Module]:
    return {
        path: ast.parse(path.read_text())
        for folder in folders
        for path in sorted((ROOT / folder).rglob("*.py"))
    }


@pytest.mark.parametrize("contract", [EventLog, Backend], ids=lambda c: c.__name__)
def test_every_method_of_a_contract_is_used(contract: type) -> None:
    used = {
        node.attr
        for tree in _trees("fanout", "node").values()
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute)
    }
    public = {name for name in vars(contract) if not name.startswith("_")}
    assert public - used == set()
