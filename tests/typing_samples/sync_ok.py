"""Calls mypy --strict must accept (tests/test_sync_types.py): SyncServerUtil used as documented."""

from __future__ import annotations

from fanout import NodeRecord, ServerUtil, SyncServerUtil
from fanout.commands import Json


def blocking(sync: SyncServerUtil, cid: str) -> None:
    n: int = sync.send(cid, "x", ack=True)
    nothing: None = sync.send([cid], {"text": "hi"}, exclude=["other"])
    maybe: int | None = sync.send_to_all(b"\x00", ack=n > 0)
    to_group: int = sync.send_to_group(("a", "b"), "x", ack=True, timeout=1.5, partial=True)
    by_flag: None = sync.send_by_flag("user-1", "x", ack=False)
    joined: bool = sync.join_group(cid, ["red", "blue"])
    left: None = sync.leave_group(cid, "red", wait=False)
    bound: bool = sync.bind(cid, "user-1", False, timeout=2)
    unbound: bool | None = sync.unbind(cid, wait=maybe is None)
    dissolved: int = sync.dissolve_group("red")
    closed: int = sync.close(cid, 4000, "bye", data="last words")
    closed_later: None = sync.close_by_flag("user-1", wait=False)
    guests: int = sync.close_guests(30.0, "bye")
    stored: bool = sync.set_session(cid, {"name": "ann"})
    session: dict[str, Json] = sync.get_session(cid)
    flag: str | None = sync.get_flag(cid)
    clients: dict[str, list[str]] = sync.get_client_ids_by_flags(["user-1", "user-2"])
    presence: dict[str, int] = sync.get_presence("red", partial=True)
    nodes: list[NodeRecord] = sync.get_nodes(timeout=1.0)
    port: int = nodes[0]["port"]
    healthy: bool = nodes[0].get("healthy", True)
    live: int = sync.check_cluster()
    sync.send_bulk([(cid, "one"), (cid, b"two")])
    print(nothing, to_group, by_flag, joined, left, bound, unbound, dissolved, closed, closed_later)
    print(guests, stored, session, flag, clients, presence, port, healthy, live)


def lifecycle() -> int:
    with SyncServerUtil("redis://127.0.0.1:6379/0", namespace="app", heartbeat_interval=0.5) as sync:
        return sync.get_connection_count() + SyncServerUtil.from_env({}).get_flag_count()


async def asynchronous(util: ServerUtil) -> list[str]:
    return [record["node_id"] for record in await util.get_nodes()]
