"""The node in-process on the memory backend: hooks, connection API, HTTP endpoints, limits, bad input."""

from __future__ import annotations

import asyncio
import os
import time

import orjson
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from fanout import ServerUtil, Settings, naming, protocol
from fanout.backends.memory import MemoryBackend
from fanout.commands import Send, Target
from node.frames import encode_frame, frame_length
from tests.apps.control import ControlApp
from tests.conftest import MakeNode
from tests.support.nodes import client, http_get, nothing_more, recv, unique_namespace


async def test_welcome_frame_and_turning_it_off(make_node: MakeNode) -> None:
    node = await make_node()
    ws, client_id = await client(node.port)
    assert client_id.startswith(node.instance + ".")
    quiet = await make_node(welcome=False)
    async with connect(f"ws://127.0.0.1:{quiet.port}/") as ws2:
        assert await nothing_more(ws2)  # type: ignore[arg-type]
    await ws.close()


async def test_hooks_and_connection_api(make_node: MakeNode) -> None:
    app = ControlApp()
    node = await make_node(app=app)
    ws, cid = await client(node.port)
    await ws.send(orjson.dumps({"local": "join", "groups": ["a", "b"]}).decode())
    assert orjson.loads(await recv(ws)) == {
        "local": "join",
        "groups": ["a", "b"],
        "flag": None,
        "session": {},
    }
    await ws.send(orjson.dumps({"local": "bind", "flag": "u1"}).decode())
    assert orjson.loads(await recv(ws))["flag"] == "u1"
    await ws.send(orjson.dumps({"local": "session", "data": {"k": 1}}).decode())
    assert orjson.loads(await recv(ws))["session"] == {"k": 1}
    await ws.send(orjson.dumps({"local": "leave", "groups": ["a"]}).decode())
    assert orjson.loads(await recv(ws))["groups"] == ["b"]
    await ws.send(b"\x01\x02")  # binary frames reach on_message as bytes
    assert await recv(ws) == b"echo:\x01\x02"
    async with ServerUtil(settings=node.settings) as util:
        assert await util.get_session(cid) == {"k": 1}
        assert await util.get_flag(cid) == "u1"
        assert await util.get_groups() == ["b"]
        await ws.send(orjson.dumps({"local": "close", "code": 4100, "reason": "bye"}).decode())
        with pytest.raises(ConnectionClosed) as closed:
            await recv(ws)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 4100
        assert await util.get_groups() == [] and await util.flag_exists("u1") is False
    assert ("open", cid) in app.events and ("close", cid) in app.events


async def test_routing_mode_subscribes_on_first_member_and_unsubscribes_on_last(make_node: MakeNode) -> None:
    node = await make_node()
    (a, a_id), (b, b_id) = await client(node.port), await client(node.port)
    room = naming.group("room")
    async with ServerUtil(settings=node.settings) as util:
        assert room not in node.backend.subscriptions
        await util.join_group(a_id, "room")
        assert room in node.backend.subscriptions
        await util.join_group(b_id, "room")
        await util.leave_group(a_id, "room")
        assert room in node.backend.subscriptions
        await b.close()
        for _ in range(50):
            if room not in node.backend.subscriptions:
                break
            await asyncio.sleep(0.02)
        assert room not in node.backend.subscriptions
        await util.bind(a_id, "f1")
        assert naming.flag("f1") in node.backend.subscriptions
        await util.bind(a_id, "f2")
        assert naming.flag("f1") not in node.backend.subscriptions
        assert naming.flag("f2") in node.backend.subscriptions
    await a.close()


async def test_http_endpoints(make_node: MakeNode) -> None:
    node = await make_node()
    loop = asyncio.get_running_loop()
    status, body = await loop.run_in_executor(None, http_get, node.port, "/healthz")
    assert (status, body) == (200, "ok\n")
    ws, _ = await client(node.port)
    await ws.send('{"call": "send_to_all", "args": ["x"]}')
    await recv(ws)
    await recv(ws)
    status, metrics = await loop.run_in_executor(None, http_get, node.port, "/metrics")
    assert status == 200
    assert "fanout_connections 1" in metrics
    assert "fanout_backend_up 1" in metrics
    assert 'fanout_commands_total{op="send"} 1' in metrics
    status, page = await loop.run_in_executor(None, http_get, node.port, "/")  # not the demo: its status
    assert status == 200 and "<title>fanout node</title>" in page and "fanout demo chat" not in page
    assert (await loop.run_in_executor(None, http_get, node.port, "/nope"))[0] == 404
    await node.backend.close()  # the subscription is gone: health must say so
    status, _ = await loop.run_in_executor(None, http_get, node.port, "/healthz")
    assert status == 503
    await ws.close()


async def test_oversized_frame_closes_with_1009(make_node: MakeNode) -> None:
    node = await make_node(max_frame=1000)
    ws, _ = await client(node.port)
    await ws.send(b"x" * 1001)
    with pytest.raises(ConnectionClosed) as closed:
        await recv(ws)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009
    ok, _ = await client(node.port)  # the node keeps serving
    await ok.send(b"y" * 1000)
    assert await recv(ok) == b"echo:" + b"y" * 1000
    await ok.close()


async def test_max_connections_refuses_with_503(make_node: MakeNode) -> None:
    node = await make_node(max_connections=2)
    first, second = await client(node.port), await client(node.port)
    with pytest.raises(InvalidStatus) as refused:
        await client(node.port)
    assert refused.value.response.status_code == 503
    assert node.metrics.connections_refused == 1
    await first[0].close()
    await asyncio.sleep(0.1)
    third, _ = await client(node.port)
    await third.close()
    await second[0].close()


async def _publish_raw(settings: Settings, address: naming.Address, raw: bytes) -> None:
    rogue = MemoryBackend(settings, inbox="rogue")
    await rogue.connect(lambda _: None)
    await rogue.publish(address, raw)
    await rogue.close()


async def test_garbage_on_the_bus_is_dropped_and_counted(make_node: MakeNode) -> None:
    node = await make_node()
    ws, _cid = await client(node.port)
    valid = protocol.encode(Send(Target.all(), b"still alive"))
    junk = [
        os.urandom(200),
        b"v2;;not json\n",
        b"v9;;{}\n",
        b'v2;;{"op":"send","t":"g","n":"not-a-list"}\n',
        b'v2;;{"op":"explode"}\n',
        b"v2;;" + b"x" * (node.settings.max_message + 10),
    ]
    for raw in junk:
        await _publish_raw(node.settings, naming.ALL, raw)
    await _publish_raw(node.settings, naming.ALL, valid)
    assert await recv(ws) == "still alive"
    dropped = node.metrics.dropped
    assert dropped["version"] == 1 and dropped["oversized"] == 1 and dropped["malformed"] == 4
    await ws.close()


async def test_with_a_secret_unsigned_and_forged_commands_are_dropped(make_node: MakeNode) -> None:
    settings = Settings.create(f"memory://{unique_namespace()}", secret="s3cret", heartbeat_interval=0.2)
    node = await make_node(settings=settings)
    ws, _ = await client(node.port)
    ns = settings.namespace
    forger = protocol.Encoder("rogue", ns, b"wrong key")
    signer = protocol.Encoder("rogue", ns, b"s3cret")
    now = time.time()
    await _publish_raw(settings, naming.ALL, protocol.encode(Send(Target.all(), b"unsigned")))
    await _publish_raw(settings, naming.ALL, forger.encode(Send(Target.all(), b"forged"), now))
    await _publish_raw(settings, naming.ALL, signer.encode(Send(Target.all(), b"signed"), now))
    assert await recv(ws) == "signed"
    assert node.metrics.dropped["signature"] == 2
    async with ServerUtil(settings=settings) as util:  # a ServerUtil with the secret signs its commands
        assert await util.send_to_all("via util", ack=True) == 1
    assert await recv(ws) == "via util"
    await ws.close()


def test_frames_match_websockets_own_encoding() -> None:
    from websockets.frames import Frame, Opcode

    for size in (0, 1, 125, 126, 65535, 65536, 70000):
        payload = os.urandom(size)
        for binary, opcode in ((False, Opcode.TEXT), (True, Opcode.BINARY)):
            ours = encode_frame(payload, binary)
            theirs = Frame(opcode, payload).serialize(mask=False)
            assert ours == theirs
            assert frame_length(size) == len(theirs)  # what the bytes-sent metric counts
