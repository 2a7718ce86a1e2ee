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

from fanout import Settings, naming, protocol
from fanout.backends.store import MemoryStore, StoredSend
from fanout.commands import Send, Target
from fanout.history import new_send_id
from node.node import Node
from tests.apps.streams import StreamsApp
from tests.conftest import MakeNode
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
