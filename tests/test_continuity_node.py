"""The node's side of continuity, in-process on the memory backend (its store is the process): fanout.v1
negotiation and frames, envelopes, positions, joined/left, positioning of gaps, resume, cache targets.

(The same over Redis, Redis Cluster and RabbitMQ with real node processes: tests/test_continuity_*.py.)
"""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from fanout import ServerUtil, Settings, naming, protocol
from fanout.backends.store import MemoryStore, StoredSend
from fanout.commands import Send, Target
from fanout.history import new_send_id
from node import continuity
from node.node import Node
from tests.apps.streams import StreamsApp
from tests.conftest import MakeNode
from tests.support import scaled
from tests.support.nodes import nothing_more, recv, unique_namespace


def settings(**options: Any) -> Settings:
    return Settings.create(
        f"memory://{unique_namespace()}", heartbeat_interval=0.2, history="group:h-*,flag:*", **options
    )


async def v1(node: Node, query: str = "") -> tuple[ClientConnection, dict[str, Any]]:
    ws = await connect(f"ws://127.0.0.1:{node.port}/?{query}", subprotocols=["fanout.v1"])  # type: ignore[list-item]
    assert ws.subprotocol == "fanout.v1"
    welcome = orjson.loads(await recv(ws))
    assert welcome["type"] == "welcome"
    return ws, welcome


async def frame(ws: ClientConnection) -> dict[str, Any]:
    value = orjson.loads(await recv(ws))
    assert isinstance(value, dict)
    return value


class Publisher:
    """Publishes stored sends the way ServerUtil does on the memory backend (store append + publish)."""

    def __init__(self, node: Node) -> None:
        self.settings = node.settings
        self.store = MemoryStore(node.settings)
        self.encoder = protocol.Encoder("pub", node.settings.namespace)

    async def send(self, group: str, data: Any, *, publish: bool = True) -> dict[str, tuple[str, int]]:
        send = Send(Target.groups(group), orjson.dumps(data), json=True, sid=new_send_id())
        message = self.encoder.encode(send, 0.0)
        pairs = [(naming.group(group), message)] if publish else []
        stored = StoredSend(send.sid or "", send.payload, json=True)
        return await self.store.append([f"group:{group}"], stored, pairs)


async def frames_until_quiet(ws: ClientConnection, wait: float = 0.5) -> list[dict[str, Any]]:
    """Every frame that arrives until none has for ``wait`` seconds."""
    frames = []
    while True:
        try:
            frames.append(orjson.loads(await asyncio.wait_for(ws.recv(), wait)))
        except TimeoutError:
            return frames


async def test_subprotocol_is_selected_only_when_asked(make_node: MakeNode) -> None:
    node = await make_node(app=StreamsApp(), settings=settings())
    ws, welcome = await v1(node, "groups=h-1,plain")
    assert set(welcome) == {"type", "client_id", "resume", "streams"}
    assert welcome["streams"] == {
        "group:h-1": {"epoch": welcome["streams"]["group:h-1"]["epoch"], "offset": 0}
    }
    raw = await connect(f"ws://127.0.0.1:{node.port}/?groups=h-1", subprotocols=["chat"])  # type: ignore[list-item]
    assert raw.subprotocol is None  # only unknown subprotocols asked: none selected, raw frames as today
    assert set(orjson.loads(await recv(raw))) == {"type", "client_id"}
    await ws.close()
    await raw.close()


async def test_envelopes_carry_offsets_and_raw_clients_get_the_payload(make_node: MakeNode) -> None:
    node = await make_node(app=StreamsApp(), settings=settings())
    ws, _ = await v1(node, "groups=h-1,plain")
    raw = await connect(f"ws://127.0.0.1:{node.port}/?groups=h-1")
    await recv(raw)  # its welcome
    pub = Publisher(node)
    for i in range(1, 4):
        await pub.send("h-1", {"n": i})
    for i in range(1, 4):
        assert await frame(ws) == {"type": "message", "data": {"n": i}, "streams": {"group:h-1": i}}
        assert orjson.loads(await recv(raw)) == {"n": i}
    await ws.send(orjson.dumps({"type": "message", "data": "hi"}).decode())
    assert await frame(ws) == {"type": "message", "data": {"echo": "hi"}}
    await ws.send(orjson.dumps({"type": "message", "data": {"a": 1}}).decode())
    assert await frame(ws) == {"type": "message", "data": {"echo": '{"a":1}'}}
    await ws.send(orjson.dumps({"type": "message", "data_b64": "AAE="}).decode())
    assert await frame(ws) == {"type": "message", "data_b64": "AAE="}
    await ws.send("not json")
    with pytest.raises(ConnectionClosed) as closed:
        await recv(ws)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008
    await raw.close()


async def test_a_gap_is_read_back_from_the_store_in_order(make_node: MakeNode) -> None:
    node = await make_node(app=StreamsApp(), settings=settings())
    ws, _ = await v1(node, "groups=h-2")
    raw = await connect(f"ws://127.0.0.1:{node.port}/?groups=h-2")
    await recv(raw)
    pub = Publisher(node)
    await pub.send("h-2", 1)
    await pub.send("h-2", 2, publish=False)  # stored, never on the bus: a lost pub/sub message
    await pub.send("h-2", 3, publish=False)
    await pub.send("h-2", 4)
    for i in range(1, 5):
        assert await frame(ws) == {"type": "message", "data": i, "streams": {"group:h-2": i}}
        assert orjson.loads(await recv(raw)) == i
    assert await nothing_more(ws) and await nothing_more(raw)
    assert node.metrics.history_reads >= 1
    await ws.close()
    await raw.close()


async def test_resume_replays_what_was_missed_then_goes_live(make_node: MakeNode) -> None:
    s = settings()
    node = await make_node(app=StreamsApp(), settings=s)
    ws, welcome = await v1(node, "user=ann&groups=h-3")
    pub = Publisher(node)
    await pub.send("h-3", "a")
    assert (await frame(ws))["streams"] == {"group:h-3": 1}
    ws.transport.abort()  # the network drops: no close frame
    await asyncio.sleep(0.2)
    for text in "bcd":
        await pub.send("h-3", text)
    other = await make_node(app=StreamsApp(), settings=s)
    ws2, _welcome2 = await v1(other, "user=ann")  # admitted without the group: the resume brings it back
    await ws2.send(
        orjson.dumps(
            {
                "type": "resume",
                "token": welcome["resume"],
                "streams": {"group:h-3": {"epoch": welcome["streams"]["group:h-3"]["epoch"], "offset": 1}},
            }
        ).decode()
    )
    got = [await frame(ws2) for _ in range(4)]
    assert [g.get("data") for g in got[:3]] == ["b", "c", "d"]
    assert [g["streams"] for g in got[:3]] == [{"group:h-3": 2}, {"group:h-3": 3}, {"group:h-3": 4}]
    assert got[3]["type"] == "resumed" and got[3]["recovered"] is True
    assert got[3]["streams"]["group:h-3"]["offset"] == 4
    await pub.send("h-3", "e")
    assert await frame(ws2) == {"type": "message", "data": "e", "streams": {"group:h-3": 5}}
    assert await nothing_more(ws2)
    # the token was used: a second resume with it restores nothing
    ws3, _ = await v1(other, "user=ann")
    await ws3.send(orjson.dumps({"type": "resume", "token": welcome["resume"], "streams": {}}).decode())
    assert (await frame(ws3))["recovered"] is False
    await ws2.close()
    await ws3.close()


async def resume(ws: ClientConnection, welcome: dict[str, Any], offsets: dict[str, int]) -> None:
    streams = {
        s: {"epoch": welcome["streams"][s]["epoch"], "offset": offset} for s, offset in offsets.items()
    }
    await ws.send(orjson.dumps({"type": "resume", "token": welcome["resume"], "streams": streams}).decode())


async def test_joined_and_left_follow_membership_calls(make_node: MakeNode) -> None:
    node = await make_node(app=StreamsApp(), settings=settings())
    ws, welcome = await v1(node)
    assert welcome["streams"] == {}
    pub = Publisher(node)
    await pub.send("h-4", "before")  # before it joins: not for it, and its position starts after it
    async with ServerUtil(settings=node.settings) as util:
        assert await util.join_group(welcome["client_id"], ["h-4", "plain"]) is True
        joined = await frame(ws)  # sent before join_group returned
        assert joined == {"type": "joined", "stream": "group:h-4", "epoch": joined["epoch"], "offset": 1}
        await pub.send("h-4", "after")
        assert await frame(ws) == {"type": "message", "data": "after", "streams": {"group:h-4": 2}}
        await util.send_to_group("plain", "not a history group")
        assert await frame(ws) == {"type": "message", "data": "not a history group"}
        assert await util.bind(welcome["client_id"], "u9") is True
        assert (await frame(ws))["stream"] == "flag:u9"
        assert await util.leave_group(welcome["client_id"], "h-4") is True
        assert await frame(ws) == {"type": "left", "stream": "group:h-4"}
    await ws.close()


async def test_joined_comes_before_every_send_of_its_stream_when_its_position_is_slow(
    make_node: MakeNode, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A connection enters two streams at once, one this node tracks and one whose position it must read
    from the store first, then a third while that read is still on its way. Sends to any of them meanwhile
    come after their ``joined``, never before it (a client that set its position from a ``joined`` behind
    a message it already has would take that message again from a resume's replay)."""
    node = await make_node(app=StreamsApp(), settings=settings())
    pub = Publisher(node)
    for group in ("h-b", "h-c"):
        await pub.send(group, "first")  # positions are not 0
    other, _ = await v1(node, "groups=h-a")  # h-a is tracked on this node from now on
    await pub.send("h-a", "first")
    assert (await frame(other))["data"] == "first"
    gates = {"group:h-b": asyncio.Event(), "group:h-c": asyncio.Event()}
    reading = {stream: asyncio.Event() for stream in gates}
    read_positions = node.store.positions

    async def slow_positions(streams: Any) -> Any:
        streams = list(streams)
        answer = await read_positions(streams)  # the store's answer, still on its way back
        for stream in set(streams) & set(gates):
            reading[stream].set()
            await gates[stream].wait()
        return answer

    monkeypatch.setattr(node.store, "positions", slow_positions)
    ws, welcome = await v1(node)
    async with ServerUtil(settings=node.settings) as util:
        first = asyncio.create_task(util.join_group(welcome["client_id"], ["h-a", "h-b"]))
        await asyncio.wait_for(reading["group:h-b"].wait(), scaled(5))
        second = asyncio.create_task(util.join_group(welcome["client_id"], "h-c"))
        await asyncio.wait_for(reading["group:h-c"].wait(), scaled(5))
        for group in ("h-a", "h-b", "h-c"):
            await pub.send(group, group)
        assert (await frame(other))["data"] == "h-a"  # it went through the node
        gates["group:h-b"].set()
        assert await asyncio.wait_for(first, scaled(5)) is True
        early = await frames_until_quiet(ws)  # h-c's position is still being read: nothing of h-c yet
        assert not [f for f in early if "group:h-c" in (f.get("stream"), *f.get("streams", ()))], early
        gates["group:h-c"].set()
        assert await asyncio.wait_for(second, scaled(5)) is True
        frames = early + await frames_until_quiet(ws)
    for stream, data in (("group:h-a", "h-a"), ("group:h-b", "h-b"), ("group:h-c", "h-c")):
        # announced at 1 (the send to it follows) or at 2 (the send counts as before it joined), once
        joined = [(n, f["offset"]) for n, f in enumerate(frames) if f.get("stream") == stream]
        assert len(joined) == 1 and joined[0][1] in (1, 2), frames
        at, offset = joined[0]
        messages = [
            (n, f["data"], f["streams"]) for n, f in enumerate(frames) if stream in f.get("streams", ())
        ]
        assert [(d, offsets) for _, d, offsets in messages] == [(data, {stream: 2})] * (2 - offset), frames
        assert all(n > at for n, _, _ in messages), frames
    await ws.close()
    await other.close()


async def test_a_connection_waiting_for_the_store_holds_a_bounded_number_of_sends(
    make_node: MakeNode, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While a connection's sends wait for the store (here: the position of a stream it entered), at most
    HELD_MAX are kept; past that it is closed with 3010 (it reconnects and resumes), and nobody else loses
    anything."""
    monkeypatch.setattr(continuity, "HELD_MAX", 20)
    node = await make_node(app=StreamsApp(), settings=settings())
    gate, reading = asyncio.Event(), asyncio.Event()
    read_positions = node.store.positions

    async def stuck_positions(streams: Any) -> Any:
        answer = await read_positions(streams)
        reading.set()
        await gate.wait()  # a store that does not answer
        return answer

    monkeypatch.setattr(node.store, "positions", stuck_positions)
    ws, welcome = await v1(node, "groups=plain")
    raw = await connect(f"ws://127.0.0.1:{node.port}/?groups=plain")
    await recv(raw)  # its welcome
    async with ServerUtil(settings=node.settings) as util:
        await util.join_group(welcome["client_id"], "h-b", wait=False)
        await asyncio.wait_for(reading.wait(), scaled(5))
        for n in range(21):
            await util.send_to_group("plain", n)
        assert [orjson.loads(await recv(raw)) for _ in range(21)] == list(range(21))
        with pytest.raises(ConnectionClosed) as closed:
            await recv(ws)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 3010
        assert node.metrics.insufficient_state_closes == 1
        gate.set()
    await raw.close()


async def test_cache_targets_give_a_newcomer_the_latest_message(make_node: MakeNode) -> None:
    node = await make_node(app=StreamsApp(), settings=settings(cache="group:price-*"))
    pub = Publisher(node)
    await pub.send("price-eur", {"bid": 1})
    await pub.send("price-eur", {"bid": 2})
    raw = await connect(f"ws://127.0.0.1:{node.port}/?groups=price-eur")
    assert set(orjson.loads(await recv(raw))) == {"type", "client_id"}  # the welcome first
    assert orjson.loads(await recv(raw)) == {"bid": 2}
    ws, welcome = await v1(node, "groups=price-eur")
    assert welcome["streams"]["group:price-eur"]["offset"] == 2
    assert await frame(ws) == {"type": "message", "data": {"bid": 2}}
    assert await nothing_more(raw) and await nothing_more(ws)
    await raw.close()
    await ws.close()


async def test_not_recovered_when_more_than_the_history_was_missed(make_node: MakeNode) -> None:
    s = settings(history_size=3)
    node = await make_node(app=StreamsApp(), settings=s)
    ws, welcome = await v1(node, "user=bob&groups=h-5,h-6")
    ws.transport.abort()
    pub = Publisher(node)
    for i in range(5):
        await pub.send("h-5", i)  # 5 sends, 3 kept: h-5 cannot be recovered
    await pub.send("h-6", "kept")
    ws2, _ = await v1(node, "user=bob")
    await resume(ws2, welcome, {"group:h-5": 0, "group:h-6": 0})
    replayed = await frame(ws2)
    assert replayed == {"type": "message", "data": "kept", "streams": {"group:h-6": 1}}
    resumed = await frame(ws2)
    assert resumed["type"] == "resumed" and resumed["recovered"] is False
    assert resumed["streams"]["group:h-5"] == {
        "recovered": False,
        "epoch": welcome["streams"]["group:h-5"]["epoch"],
        "offset": 5,
    }
    assert resumed["streams"]["group:h-6"]["recovered"] is True
    await pub.send("h-5", "live")
    assert await frame(ws2) == {"type": "message", "data": "live", "streams": {"group:h-5": 6}}
    await ws2.close()


async def test_a_token_restores_nothing_for_another_user_a_forgery_or_twice(make_node: MakeNode) -> None:
    node = await make_node(app=StreamsApp(), settings=settings())
    ws, welcome = await v1(node, "user=carol&groups=h-7")
    ws.transport.abort()
    await asyncio.sleep(0.1)
    for who, token in (("mallory", welcome["resume"]), ("carol", "forged-" + welcome["resume"][7:])):
        other, _ = await v1(node, f"user={who}")
        await other.send(orjson.dumps({"type": "resume", "token": token, "streams": {}}).decode())
        assert await frame(other) == {"type": "resumed", "recovered": False, "streams": {}}
        async with ServerUtil(settings=node.settings) as util:
            assert await util.get_groups() == []  # nothing restored
        await other.close()
    # the other user's attempt did not use the token up: carol still resumes
    ws2, _ = await v1(node, "user=carol")
    await resume(ws2, welcome, {"group:h-7": 0})
    assert (await frame(ws2))["recovered"] is True
    assert node.metrics.resumes == 1 and node.metrics.resumes_refused == 2
    await ws2.close()


async def test_the_periodic_check_reads_only_streams_that_went_quiet(make_node: MakeNode) -> None:
    # a stream still delivering is not read back (its sends may be on their way: read as missing, or as
    # lost past the history size); one whose position stayed put since the previous check is
    node = await make_node(app=StreamsApp(), settings=settings())
    ws, _ = await v1(node, "groups=h-9,h-10")
    pub = Publisher(node)
    for group in ("h-9", "h-10"):
        await pub.send(group, 1)
        assert await frame(ws) == {"type": "message", "data": 1, "streams": {f"group:{group}": 1}}
    continuity = node.continuity
    assert continuity is not None
    await continuity.catch_up(quiet_only=True)  # the first check: positions noted, nothing read
    await pub.send("h-9", 2, publish=False)  # h-9 went quiet with a lost send
    await pub.send("h-10", 2)  # h-10 still delivers...
    assert await frame(ws) == {"type": "message", "data": 2, "streams": {"group:h-10": 2}}
    await pub.send("h-10", 3, publish=False)  # ...then loses one
    reads = node.metrics.history_reads
    await continuity.catch_up(quiet_only=True)
    assert await frame(ws) == {"type": "message", "data": 2, "streams": {"group:h-9": 2}}
    assert await nothing_more(ws)  # h-10 moved since the previous check: not read yet
    assert node.metrics.history_reads == reads + 1
    await continuity.catch_up(quiet_only=True)  # it has not moved since: read now
    assert await frame(ws) == {"type": "message", "data": 3, "streams": {"group:h-10": 3}}
    await pub.send("h-9", 3, publish=False)
    await pub.send("h-10", 4, publish=False)
    await continuity.catch_up()  # after a re-subscription: every stream
    got = [await frame(ws) for _ in range(2)]
    assert sorted(orjson.dumps(f) for f in got) == sorted(
        orjson.dumps({"type": "message", "data": n, "streams": {f"group:{g}": n}})
        for g, n in (("h-9", 3), ("h-10", 4))
    )
    await ws.close()


async def test_entries_gone_before_the_node_delivered_them_close_v1_members_with_3010(
    make_node: MakeNode,
) -> None:
    node = await make_node(app=StreamsApp(), settings=settings(history_size=2))
    ws, _ = await v1(node, "groups=h-8")
    raw = await connect(f"ws://127.0.0.1:{node.port}/?groups=h-8")
    await recv(raw)
    pub = Publisher(node)
    for i in range(4):
        await pub.send("h-8", i, publish=False)  # 4 lost on the bus, only 2 kept
    await pub.send("h-8", "live")
    with pytest.raises(ConnectionClosed) as closed:
        while True:
            await recv(ws)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 3010
    assert [orjson.loads(await recv(raw)) for _ in range(2)] == [3, "live"]  # what is left, in order
    assert node.metrics.missed_by_raw == 1 and node.metrics.insufficient_state_closes == 1
    await raw.close()
