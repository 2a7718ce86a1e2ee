"""Calls mypy --strict must reject (tests/test_sync_types.py): each ``# expect: CODE`` line, nothing else."""

from __future__ import annotations

from fanout import SyncServerUtil


def blocking(sync: SyncServerUtil, cid: str) -> None:
    sync.sned(cid, "x")  # expect: attr-defined
    sync.exists(42)  # expect: arg-type
    sync.join_group(cid, 42)  # expect: call-overload
    sync.get_connection_count(timout=1)  # expect: call-arg
    count: int = sync.send(cid, "x")  # expect: assignment
    total = sync.send_to_group("red", "x") + 1  # expect: operator
    closed: int = sync.close(cid, wait=False)  # expect: assignment
    name = sync.get_nodes()[0]["nodeid"]  # expect: typeddict-item
    SyncServerUtil(namespace=1)  # expect: arg-type
    print(count, total, closed, name)
