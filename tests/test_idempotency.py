"""Idempotent sends: the node's window of keys (fanout/idempotency.py, pure), the key on the wire, the
arguments, and the whole thing on the memory backend (two in-process nodes, real websocket clients).
The brokers (Redis, Redis Cluster, RabbitMQ, node processes) are in tests/test_idempotency_brokers.py."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from fanout import PayloadError, ServerUtil, Settings, SyncServerUtil, protocol
from fanout.commands import Send, SendBulk, Target, TargetKind
from fanout.config import Mode
from fanout.exceptions import ConfigError, ConfigMismatch, ProtocolError
from fanout.idempotency import (
    APPENDED,
    COUNTED,
    DONE,
    PUBLISHED,
    KeyWindow,
    Outcome,
    derived,
    encode_outcome,
    parse_outcome,
)
from node import Node, NodeOptions
from tests.apps.control import ControlApp
from tests.support.nodes import client, nothing_more, recv, unique_namespace

# --------------------------------------------------------------------------- the node's window (pure)


def test_a_key_is_applied_once_within_the_window_and_again_after_it() -> None:
    window = KeyWindow(10.0)
    assert window.seen("k", 100.0) is None
    window.applied("k", 3, 100.0)
    assert window.seen("k", 105.0) == 3  # the first's count
    assert window.seen("k", 109.999) == 3
    assert window.repeats == 2
    assert window.seen("k", 110.0) is None  # the window is over: it is forgotten
    assert len(window) == 0


def test_the_window_is_bounded_and_forgets_the_oldest_first() -> None:
    window = KeyWindow(60.0, capacity=3)
    for i, key in enumerate("abcd"):
        window.applied(key, i, float(i))
    assert len(window) == 3 and window.evicted == 1
    assert window.seen("a", 4.0) is None  # forgotten early: the bound
    assert [window.seen(key, 4.0) for key in "bcd"] == [1, 2, 3]


def test_expired_keys_go_as_time_passes() -> None:
    window = KeyWindow(1.0)
    for i in range(100):
        window.applied(f"k{i}", 0, i / 100)
    assert window.seen("other", 1.5) is None
    assert 40 <= len(window) <= 50  # those applied in the last second are kept


def test_outcomes_round_trip() -> None:
    for outcome in (
        Outcome(PUBLISHED),
        Outcome(DONE),
        Outcome(COUNTED, 12),
        Outcome(APPENDED, None, "sid1", {"group:a": ("ep0ch", 7), "flag:b": ("e2", 1)}),
        Outcome(COUNTED, 0, "sid2", {"all": ("e", 3)}),
    ):
        assert parse_outcome(encode_outcome(outcome)) == outcome
    # as the Redis script writes it (positions from Lua)
    raw = b'p\nabc\n{"group:a":[4,"9f1c"]}'
    assert parse_outcome(raw) == Outcome(PUBLISHED, None, "abc", {"group:a": ("9f1c", 4)})
    with pytest.raises(ValueError):
        parse_outcome(b"x")


def test_bulk_keys_are_derived() -> None:
    assert derived("order-1", "0") == "order-1#0"
    assert derived("order-1", "h3") == "order-1#h3"


# --------------------------------------------------------------------------- the wire


def test_the_key_travels_with_sends_and_bulks() -> None:
    send = Send(Target.groups("a"), b"x", idempotency_key="order-7")
    assert protocol.decode(protocol.encode(send)) == send
    assert b'"ik":"order-7"' in protocol.encode(send)
    bulk = SendBulk(TargetKind.FLAGS, (("ann", b"1", False),), None, "order-7#0")
    assert protocol.decode(protocol.encode(bulk)) == bulk
    plain = Send(Target.all(), b"x")
    assert b'"ik"' not in protocol.encode(plain)
    with pytest.raises(PayloadError):
        protocol.encode(Send(Target.all(), b"x", idempotency_key="k" * (protocol.MAX_KEY + 1)))
    with pytest.raises(ProtocolError):
        protocol.decode(b'v2;;{"op":"send","t":"all","ik":""}\nx')
    with pytest.raises(ProtocolError):
        protocol.decode(b'v2;;{"op":"send","t":"all","ik":7}\nx')


def test_the_window_setting() -> None:
    assert Settings().idempotency_window == 300.0
    assert Settings.from_env({"FANOUT_IDEMPOTENCY_WINDOW": "2.5"}).idempotency_window == 2.5
    with pytest.raises(ConfigError, match="FANOUT_IDEMPOTENCY_WINDOW"):
        Settings.from_env({"FANOUT_IDEMPOTENCY_WINDOW": "0"})


# --------------------------------------------------------------------------- on the memory backend


@pytest.fixture(params=[Mode.ROUTING, Mode.FANOUT], ids=["routing", "fanout"])
async def nodes(request: pytest.FixtureRequest) -> AsyncIterator[tuple[Settings, list[Node]]]:
    settings = Settings.create(
        f"memory://{unique_namespace()}",
        mode=request.param,
        heartbeat_interval=0.2,
        history="group:h-*,flag:h-*",
        idempotency_window=2.0,
    )
    started = [Node(settings, NodeOptions(port=0, node_id=f"n{i}"), ControlApp()) for i in range(2)]
    for node in started:
        await node.start()
    yield settings, started
    for node in started:
        await node.stop()


async def test_memory_a_repeat_is_delivered_once_and_returns_the_first_count(
    nodes: tuple[Settings, list[Node]],
) -> None:
    settings, started = nodes
    conns = [await client(node.port) for node in started for _ in range(2)]
    async with ServerUtil(settings=settings) as util, ServerUtil(settings=settings) as other:
        for _, cid in conns:
            assert await util.join_group(cid, ["g", "h-1"])
        for group in ("g", "h-1"):
            key = f"k-{group}"
            assert await util.send_to_group(group, group, ack=True, idempotency_key=key) == 4
            assert await other.send_to_group(group, group, ack=True, idempotency_key=key) == 4
            assert await util.send_to_group(group, group, idempotency_key=key) is None
            for ws, _ in conns:
                assert await recv(ws) == group
        assert all([await nothing_more(ws) for ws, _ in conns])
        page = await util.get_history("group:h-1")
        assert [e["data"] for e in page["entries"]] == ["h-1"]  # appended once
        # concurrent: the repeat waits for the first's result
        both = await asyncio.gather(
            *(util.send_to_all("all", ack=True, idempotency_key="together") for _ in range(3))
        )
        assert both == [4, 4, 4]
        for ws, _ in conns:
            assert await recv(ws) == "all"
        # bulk: the key covers the whole call
        pairs = [(cid, f"to {cid}") for _, cid in conns] * 2
        await util.send_bulk(pairs, idempotency_key="bulk")
        await other.send_bulk(pairs, idempotency_key="bulk")
        for ws, cid in conns:
            assert [await recv(ws), await recv(ws)] == [f"to {cid}"] * 2
        assert all([await nothing_more(ws) for ws, _ in conns])
        if settings.mode is Mode.FANOUT:
            return
        # after the window: a new send
        await asyncio.sleep(2.1)
        assert await util.send_to_group("g", "again", ack=True, idempotency_key="k-g") == 4
        for ws, _ in conns:
            assert await recv(ws) == "again"


async def test_memory_bulk_by_flag_with_history_flags(nodes: tuple[Settings, list[Node]]) -> None:
    settings, started = nodes
    (a, a_id), (b, b_id) = [await client(node.port) for node in started]
    async with ServerUtil(settings=settings) as util:
        assert await util.bind(a_id, "h-ann") and await util.bind(b_id, "bob")
        pairs = [("h-ann", "1"), ("bob", "2"), ("h-ann", "3")]
        for _ in range(2):
            await util.send_bulk_by_flag(pairs, idempotency_key="flags")
        assert [await recv(a), await recv(a)] == ["1", "3"]
        assert await recv(b) == "2"
        assert await nothing_more(a) and await nothing_more(b)
        page = await util.get_history("flag:h-ann")
        assert [e["data"] for e in page["entries"]] == ["1", "3"]


async def test_a_publisher_whose_window_differs_is_refused_keyed_sends() -> None:
    settings = Settings.create(
        f"memory://{unique_namespace()}", heartbeat_interval=0.2, idempotency_window=2.0
    )
    node = Node(settings, NodeOptions(port=0), ControlApp())
    await node.start()
    try:
        async with ServerUtil(settings=settings.replace(idempotency_window=300.0)) as util:
            await util.send_to_all("plain")  # a send without a key does not care
            with pytest.raises(ConfigMismatch, match="FANOUT_IDEMPOTENCY_WINDOW"):
                await util.send_to_all("keyed", idempotency_key="k")
    finally:
        await node.stop()


async def test_keys_are_checked_like_every_argument() -> None:
    settings = Settings.create(f"memory://{unique_namespace()}")
    async with ServerUtil(settings=settings, in_process=True) as util:
        for bad in ("", "k" * 129, 42, b"key"):
            with pytest.raises(PayloadError, match="idempotency_key must be a string of 1 to 128"):
                await util.send_to_all("x", idempotency_key=bad)  # type: ignore[arg-type]
            with pytest.raises(PayloadError, match="send_bulk: idempotency_key"):
                await util.send_bulk([], idempotency_key=bad)  # type: ignore[arg-type]


def test_sync_serverutil_takes_the_key() -> None:
    settings = Settings.create(f"memory://{unique_namespace()}", heartbeat_interval=0.2)
    node = Node(settings, NodeOptions(port=0), ControlApp())

    async def run() -> None:
        await node.start()
        try:
            ws, cid = await client(node.port)
            with SyncServerUtil(settings=settings) as util:
                first = await asyncio.to_thread(util.send, cid, "once", ack=True, idempotency_key="s")
                again = await asyncio.to_thread(util.send, cid, "once", ack=True, idempotency_key="s")
                assert first == again == 1
                await asyncio.to_thread(util.send_bulk_by_flag, [], idempotency_key="s2")
            assert await recv(ws) == "once"
            assert await nothing_more(ws)
        finally:
            await node.stop()

    asyncio.run(run())
