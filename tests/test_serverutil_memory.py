"""Every ServerUtil call, across two in-process nodes on the memory backend, with real websocket clients."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass

import orjson
import pytest
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from fanout import (
    MessageTooLarge,
    NotConnected,
    PayloadError,
    QueryTimeout,
    ServerUtil,
    Settings,
    SyncServerUtil,
    naming,
    protocol,
)
from fanout.backends.memory import MemoryBackend
from fanout.commands import Heartbeat, NodeInfo
from fanout.config import Mode
from fanout.naming import HEARTBEAT
from node import Node, NodeOptions
from tests.apps.control import ControlApp
from tests.support.nodes import client, nothing_more, recv, scaled, unique_namespace


@dataclass
class Cluster:
    settings: Settings
    nodes: list[Node]
    util: ServerUtil

    async def clients(self, per_node: int = 1) -> list[tuple[ClientConnection, str]]:
        return [await client(node.port) for node in self.nodes for _ in range(per_node)]


@pytest.fixture(params=[Mode.ROUTING, Mode.FANOUT], ids=["routing", "fanout"])
async def cluster(request: pytest.FixtureRequest) -> AsyncIterator[Cluster]:
    settings = Settings.create(f"memory://{unique_namespace()}", mode=request.param, heartbeat_interval=0.2)
    nodes = [Node(settings, NodeOptions(port=0, node_id=f"n{i}"), ControlApp()) for i in range(2)]
    for node in nodes:
        await node.start()
    async with ServerUtil(settings=settings) as util:
        yield Cluster(settings, nodes, util)
    for node in nodes:
        await node.stop()


async def test_send_reaches_exactly_the_targets(cluster: Cluster) -> None:
    (a, a_id), (b, b_id) = await cluster.clients()
    await cluster.util.send([a_id, b_id], "to both")
    assert await recv(a) == "to both"
    assert await recv(b) == "to both"
    await cluster.util.send(b_id, b"\x00bin\xff")
    assert await recv(b) == b"\x00bin\xff"
    await cluster.util.send(a_id, {"json": [1, 2]})
    assert orjson.loads(await recv(a)) == {"json": [1, 2]}
    await cluster.util.send(["not-a-client-id", "x.y.999"], "nobody")
    assert await nothing_more(a) and await nothing_more(b)


async def test_group_send_once_per_connection_with_exclude_and_ack(cluster: Cluster) -> None:
    (a, a_id), (b, b_id), (c, c_id), (d, d_id) = await cluster.clients(per_node=2)
    u = cluster.util
    for cid in (a_id, b_id, c_id):
        assert await u.join_group(cid, ["g1", "g2"]) is True
    await u.join_group(d_id, "g2")
    assert await u.send_to_group(["g1", "g2"], "once", ack=True) == 4
    for ws in (a, b, c, d):
        assert await recv(ws) == "once"
    assert await u.send_to_group(["g1", "g2"], "not c", exclude=[c_id], ack=True) == 3
    for ws in (a, b, d):
        assert await recv(ws) == "not c"
    await u.send_to_group("nobody-here", "x")
    assert all([await nothing_more(ws) for ws in (a, b, c, d)])


async def test_flags_bind_rebind_unbind(cluster: Cluster) -> None:
    (a, a_id), (b, b_id) = await cluster.clients()
    u = cluster.util
    assert await u.bind(a_id, "user-1") and await u.bind(b_id, "user-1")
    assert sorted(await u.get_client_ids_by_flag("user-1")) == sorted([a_id, b_id])
    assert await u.send_by_flag(["user-1", "user-2"], "hi user 1", ack=True) == 2
    assert await recv(a) == "hi user 1" and await recv(b) == "hi user 1"
    assert await u.bind(a_id, "user-2")  # one flag per connection: re-binding replaces
    assert await u.get_flag(a_id) == "user-2"
    assert await u.get_client_ids_by_flag("user-1") == [b_id]
    await u.send_by_flag("user-1", "only b")
    assert await recv(b) == "only b"
    assert await nothing_more(a)
    assert await u.unbind(b_id)
    assert await u.get_flag(b_id) is None
    assert await u.flag_exists("user-1") is False
    assert await u.flag_exists("user-2") is True
    assert await u.send_by_flag("user-1", "gone", ack=True) == 0


async def test_send_to_all_with_exclude(cluster: Cluster) -> None:
    (a, a_id), (b, _), (c, _) = await cluster.clients() + [await client(cluster.nodes[1].port)]
    assert await cluster.util.send_to_all("everyone but a", exclude=a_id, ack=True) == 2
    assert await recv(b) == "everyone but a" and await recv(c) == "everyone but a"
    assert await nothing_more(a)


async def test_order_from_one_publisher(cluster: Cluster) -> None:
    (a, a_id), (_b, _b_id) = await cluster.clients()
    await cluster.util.join_group(a_id, "room")
    for i in range(200):
        if i % 2:
            await cluster.util.send_to_group("room", str(i))
        else:
            await cluster.util.send(a_id, str(i))
    assert [await recv(a) for _ in range(200)] == [str(i) for i in range(200)]


async def test_close_and_close_by_flag(cluster: Cluster) -> None:
    (a, a_id), (b, b_id) = await cluster.clients()
    (c, c_id), _ = await cluster.clients()
    u = cluster.util
    await u.join_group(a_id, "room")
    await u.bind(b_id, "user-9")
    await u.bind(c_id, "user-9")
    assert await u.close(a_id, 4001, "kicked") == 1
    with pytest.raises(ConnectionClosed) as closed:
        await recv(a)
    assert closed.value.rcvd is not None and (closed.value.rcvd.code, closed.value.rcvd.reason) == (
        4001,
        "kicked",
    )
    assert await u.exists(a_id) is False
    assert await u.get_group_count("room") == 0  # left its groups at once
    assert await u.close_by_flag("user-9", 4002) == 2
    for ws in (b, c):
        with pytest.raises(ConnectionClosed) as closed:
            await recv(ws)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 4002
    assert await u.flag_exists("user-9") is False
    assert await u.close("x.y.1") == 0
    with pytest.raises(PayloadError):
        await u.close(b_id, 999)


async def test_membership_queries_and_dissolve(cluster: Cluster) -> None:
    (a, a_id), (_b, b_id) = await cluster.clients()
    u = cluster.util
    assert await u.get_connection_count() == 2
    assert await u.join_group(a_id, ["red", "blue"]) and await u.join_group(b_id, "red")
    assert await u.get_group_count("red") == 2
    assert sorted(await u.get_group_client_ids("red")) == sorted([a_id, b_id])
    assert await u.get_groups() == ["blue", "red"]
    assert await u.leave_group(a_id, "red")
    assert await u.get_group_client_ids("red") == [b_id]
    assert await u.dissolve_group("blue") == 1
    assert await u.get_groups() == ["red"]
    await u.send_to_group("blue", "dissolved")
    assert await nothing_more(a)
    assert await u.join_group("n0.unknown.1", "red") is False
    assert await u.join_group("garbage", "red") is False  # a malformed id has no owner: nothing to join
    nodes = await u.get_nodes()
    assert [n["node_id"] for n in nodes] == ["n0", "n1"]
    assert [n["connections"] for n in nodes] == [1, 1]


async def test_sessions(cluster: Cluster) -> None:
    (_, a_id), _ = await cluster.clients()
    u = cluster.util
    assert await u.get_session(a_id) == {}
    assert await u.set_session(a_id, {"user": 1, "role": "x"})
    assert await u.update_session(a_id, {"role": "admin", "lang": "fr"})
    assert await u.get_session(a_id) == {"user": 1, "role": "admin", "lang": "fr"}
    assert await u.set_session(a_id, {"only": True})
    assert await u.get_session(a_id) == {"only": True}
    assert await u.get_session("n0.nobody.1") == {}
    with pytest.raises(PayloadError):
        await u.set_session(a_id, {"bad": object()})


async def test_exists_is_false_for_unknown_or_malformed_ids(cluster: Cluster) -> None:
    (_, a_id), _ = await cluster.clients()
    u = cluster.util
    assert await u.exists(a_id) is True
    assert await u.exists(a_id + "0") is False
    assert await u.exists("") is False
    assert await u.exists("no-dots") is False


async def test_join_then_send_without_waiting_needs_wait(cluster: Cluster) -> None:
    """With the default wait=True a send issued right after join reaches the new member."""
    (a, a_id), _ = await cluster.clients()
    for i in range(20):
        await cluster.util.join_group(a_id, f"fresh-{i}")
        await cluster.util.send_to_group(f"fresh-{i}", f"m{i}")
        assert await recv(a) == f"m{i}"


async def test_a_server_util_can_reconnect(cluster: Cluster) -> None:
    (a, a_id), _ = await cluster.clients()
    util = ServerUtil(settings=cluster.settings)
    for _ in range(2):
        async with util:
            assert naming.HEARTBEAT in util.backend.subscriptions  # heard again on the new link
            assert await util.get_connection_count() == 2
            assert await util.send(a_id, "again", ack=True) == 1
            assert await recv(a) == "again"
    with pytest.raises(NotConnected):
        await util.send_to_all("closed")


async def test_bad_payloads_raise(cluster: Cluster) -> None:
    with pytest.raises(PayloadError):
        await cluster.util.send_to_all(object())
    with pytest.raises(PayloadError):
        await cluster.util.send_to_group([1, 2], "x")  # type: ignore[list-item]


async def test_query_names_silent_nodes_and_partial(cluster: Cluster) -> None:
    """A node that heartbeats but never answers is named in QueryTimeout; partial=True still answers."""
    silent = MemoryBackend(cluster.settings, inbox="silent")
    await silent.connect(lambda _: None)
    info = NodeInfo(instance="ghost.x1", node_id="ghost", connections=0, ttl=30.0)
    await silent.publish(HEARTBEAT, protocol.encode(Heartbeat(info)))
    await asyncio.sleep(0.05)
    # the memory broker counts receivers, so make the ghost a receiver of ALL too
    await silent.subscribe([naming.ALL])
    await client(cluster.nodes[0].port)
    with pytest.raises(QueryTimeout) as timeout:
        await cluster.util.get_connection_count(timeout=0.5)
    assert "ghost.x1" in str(timeout.value) and timeout.value.missing == ["ghost.x1"]
    assert await cluster.util.get_connection_count(timeout=0.5, partial=True) == 1
    await silent.close()


async def test_a_node_that_dies_before_answering_is_dropped_from_the_wait(cluster: Cluster) -> None:
    """It received the query (the broker counted it) but its heartbeats stop: the others' answer stands."""
    doomed = MemoryBackend(cluster.settings, inbox="doomed")
    await doomed.connect(lambda _: None)
    await doomed.subscribe([naming.ALL])
    info = NodeInfo(instance="doomed.x1", node_id="doomed", connections=0, ttl=0.6)
    await doomed.publish(HEARTBEAT, protocol.encode(Heartbeat(info)))  # heard once, then silence
    await client(cluster.nodes[0].port)
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert await cluster.util.get_connection_count(timeout=5) == 1
    assert loop.time() - started < 3  # dropped once its ttl ran out, not at the 5 s timeout
    await doomed.close()


async def test_sync_server_util_from_a_plain_thread(cluster: Cluster) -> None:
    (a, a_id), (b, b_id) = await cluster.clients()
    results: dict[str, object] = {}

    def work() -> None:
        with SyncServerUtil(settings=cluster.settings) as sync:
            results["join"] = sync.join_group(a_id, "sync-room")
            results["ack"] = sync.send_to_group("sync-room", {"from": "thread"}, ack=True)
            results["count"] = sync.get_connection_count()
            results["exists"] = sync.exists(b_id)
            results["groups"] = sync.get_groups()

    thread = threading.Thread(target=work)
    thread.start()
    await asyncio.get_running_loop().run_in_executor(None, thread.join, scaled(20))
    assert results == {"join": True, "ack": 1, "count": 2, "exists": True, "groups": ["sync-room"]}
    assert orjson.loads(await recv(a)) == {"from": "thread"}
    assert await nothing_more(b)


def test_sync_server_util_has_every_async_operation() -> None:
    from fanout.sync import OPERATIONS

    expected = {
        "send",
        "send_by_flag",
        "send_to_group",
        "send_to_all",
        "close",
        "close_by_flag",
        "join_group",
        "leave_group",
        "dissolve_group",
        "bind",
        "unbind",
        "set_session",
        "update_session",
        "get_session",
        "exists",
        "flag_exists",
        "get_flag",
        "get_client_ids_by_flag",
        "get_connection_count",
        "get_group_count",
        "get_group_client_ids",
        "get_groups",
        "get_nodes",
        "check_cluster",
        "is_in_group",
        "get_group_flags",
        "get_group_flag_count",
        "get_flags",
        "get_flag_count",
        "get_group_sessions",
        "get_client_ids_by_flags",
        "get_presence",
        "send_bulk",
        "send_bulk_by_flag",
        "close_guests",
        "get_history",
        "remove_history",
    }
    assert expected == OPERATIONS
    sync = SyncServerUtil("memory://unused")
    assert all(callable(getattr(sync, name)) for name in expected)
    with pytest.raises(AttributeError):
        sync.no_such_call  # noqa: B018


async def test_a_large_answer_comes_in_pages_and_is_put_back_together(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    import node.replies

    monkeypatch.setattr(node.replies, "REPLY_PAGE", 7)  # (5,000 in production) so 30 members take pages
    clients = await cluster.clients(per_node=15)
    for _, cid in clients:
        assert await cluster.util.join_group(cid, "big") is True
        assert await cluster.util.set_session(cid, {"cid": cid}) is True
    ids = sorted(cid for _, cid in clients)
    assert sorted(await cluster.util.get_group_client_ids("big")) == ids
    sessions = await cluster.util.get_group_sessions("big")
    assert sessions == {cid: {"cid": cid} for cid in ids}
    for ws, _ in clients:
        await ws.close()


@pytest.mark.parametrize("mode", [Mode.ROUTING, Mode.FANOUT], ids=["routing", "fanout"])
async def test_a_bulk_bigger_than_one_message_goes_out_in_several_in_order(mode: Mode) -> None:
    settings = Settings.create(f"memory://{unique_namespace()}", mode=mode, max_message=65_536)
    nodes = [Node(settings, NodeOptions(port=0, node_id=f"n{i}"), ControlApp()) for i in range(2)]
    for node in nodes:
        await node.start()
    try:
        async with ServerUtil(settings=settings) as util:
            clients = [await client(node.port) for node in nodes for _ in range(2)]
            for i, (_, cid) in enumerate(clients):
                assert await util.bind(cid, f"user-{i}") is True
            # 3,000 payloads of ~100 bytes: ~300 kB, nearly five times the message limit
            pairs = [(clients[i % 4][1], f"{i % 4}:{i // 4}:" + "x" * 90) for i in range(3_000)]
            await util.send_bulk(pairs)
            await util.send_bulk_by_flag([(f"user-{i % 4}", f"f{i}" + "y" * 90) for i in range(3_000)])
            for index, (ws, _) in enumerate(clients):
                got = [await recv(ws) for _ in range(750)]
                assert got == [f"{index}:{n}:" + "x" * 90 for n in range(750)]
                got = [await recv(ws) for _ in range(750)]
                assert got == [f"f{i}" + "y" * 90 for i in range(index, 3_000, 4)]
                assert await nothing_more(ws)
            with pytest.raises(MessageTooLarge):  # one payload bigger than a message is refused
                await util.send_bulk([(clients[0][1], "z" * 70_000)])
            for ws, _ in clients:
                await ws.close()
    finally:
        for node in nodes:
            await node.stop()
