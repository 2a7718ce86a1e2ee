"""The Python client (``fanout.client.Client``) against a real websocket server the test scripts frame by
frame (tests/support/v1_server.py speaks SPEC's ``fanout.v1``): it keeps the token and positions, resumes
as its first frame after every reconnection (to any URL), reconnects at once on 3010, and is a raw client
when the server does not select ``fanout.v1``. Against real nodes: tests/test_client_nodes.py."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from typing import Any

import orjson
import pytest

from fanout.client import Client, ClientClosed, Position, Resumed, backoff_delay, should_reconnect, ws_url
from tests.support import refused_port, scaled
from tests.support.nodes import ROOT
from tests.support.v1_server import Scripted, ScriptedServer

LOBBY = "group:lobby"


async def recv(client: Client, timeout: float = 5.0) -> Any:
    return await asyncio.wait_for(client.recv(), scaled(timeout))


async def open_client(server: ScriptedServer, **options: Any) -> tuple[Client, Scripted]:
    """A client of ``server`` whose first connection the test welcomes (token ``t1``, lobby at e1/10)."""
    client = Client(server.url, **options)
    entering = asyncio.create_task(client.connect())
    conn = await server.accept()
    await conn.welcome("n.1.1", "t1", {LOBBY: ("e1", 10)})
    await asyncio.wait_for(entering, scaled(5))
    return client, conn


def test_the_policy_the_backoff_and_urls_are_the_js_clients() -> None:
    codes = [1000, 1001, 1006, 1008, 1011, 1012, 1013, 3000, 3010, 4000, 4001, 4999]
    assert [should_reconnect(c) for c in codes] == [
        *(False, True, True, False, True, True, True, True, True),
        *(False, False, False),
    ]
    ceilings = [backoff_delay(n, 0.5, 10.0, rand=lambda: 1.0) for n in (0, 1, 2, 5, 30, 10_000)]
    assert ceilings == [0.5, 1.0, 2.0, 10.0, 10.0, 10.0]
    assert backoff_delay(3, 0.5, 10.0, rand=lambda: 0.5) == 2.0  # full jitter: [0, capped 2^n * base]
    assert backoff_delay(3, 0.5, 10.0, jitter=False, rand=lambda: 0.0) == 4.0
    assert ws_url("http://h:1/x?a=1", "t k") == "ws://h:1/x?a=1&token=t+k"
    assert ws_url("https://h/?token=old", "new") == "wss://h/?token=new"
    assert ws_url("ws://h:1") == "ws://h:1/"
    with pytest.raises(ValueError, match="not a websocket URL"):
        Client("ftp://h/")
    with pytest.raises(ValueError, match="no URL"):
        Client([])


async def test_v1_deliveries_positions_and_sends() -> None:
    async with ScriptedServer() as server:
        client, conn = await open_client(server)
        async with client:
            assert conn.v1 and conn.offered == "fanout.v1"
            assert (client.client_id, client.node_id, client.v1) == ("n.1.1", "n", True)
            assert client.positions == {LOBBY: Position("e1", 10)}
            # data as sent: a str (even one holding JSON text), any JSON value, bytes
            await conn.message("hi", {LOBBY: 11})
            await conn.message('{"not": "decoded"}', {LOBBY: 12})
            await conn.message({"text": "hello", "n": [1, 2.5, None, True]})  # in no history stream
            await conn.message(raw=b"\x00\xffbin", streams={LOBBY: 13})
            await conn.message(7)
            assert [await recv(client) for _ in range(5)] == [
                "hi",
                '{"not": "decoded"}',
                {"text": "hello", "n": [1, 2.5, None, True]},
                b"\x00\xffbin",
                7,
            ]
            assert client.positions == {LOBBY: Position("e1", 13)}
            # joined / left, and one send to two of its streams: one delivery with both offsets
            await conn.send({"type": "joined", "stream": "group:room", "epoch": "e2", "offset": 4})
            await conn.send({"type": "joined", "stream": "flag:ann", "epoch": "e3", "offset": 0})
            await conn.send({"type": "left", "stream": "flag:ann"})
            await conn.message("both", {LOBBY: 14, "group:room": 5})
            assert await recv(client) == "both"
            assert client.positions == {LOBBY: Position("e1", 14), "group:room": Position("e2", 5)}
            # a delivery whose offsets were all received already: dropped, counted
            await conn.message("again", {LOBBY: 14, "group:room": 5})
            await conn.message("newer in one", {LOBBY: 14, "group:room": 6})
            assert await recv(client) == "newer in one"
            assert client.duplicates == 1

            # the client's sends, as v1 message frames
            await client.send("text")
            await client.send({"a": [1]})
            await client.send(b"\x01\x02")
            assert [await conn.recv_json() for _ in range(3)] == [
                {"type": "message", "data": "text"},
                {"type": "message", "data": {"a": [1]}},
                {"type": "message", "data_b64": "AQI="},
            ]
        assert client.state == "closed" and client.close_code == 1000
        await asyncio.wait_for(conn.closed.wait(), scaled(5))
        assert conn.ws.close_code == 1000  # the client closed with 1000
        with pytest.raises(ClientClosed):
            await client.recv()
        with pytest.raises(ClientClosed):
            await client.send("too late")


async def test_a_dropped_client_resumes_with_its_last_token_and_positions() -> None:
    resumed: list[Resumed] = []
    async with ScriptedServer() as server:
        client, conn = await open_client(server, backoff=(0.01, 0.05), on_resumed=resumed.append)
        async with client:
            await conn.message("m11", {LOBBY: 11})
            await conn.send({"type": "joined", "stream": "group:room", "epoch": "e2", "offset": 4})
            assert await recv(client) == "m11"

            conn.drop()  # no close frame: 1006 for the client
            conn = await server.accept()
            # this connection's own welcome: a new token, the lobby at the top offset (ahead of the client)
            await conn.welcome("n.1.2", "t2", {LOBBY: ("e1", 14)})
            assert await conn.recv_json() == {
                "type": "resume",
                "token": "t1",
                "streams": {LOBBY: {"epoch": "e1", "offset": 11}, "group:room": {"epoch": "e2", "offset": 4}},
            }
            # the replay (not de-duplicated against the welcome's positions), then resumed, then live
            await conn.message("m12", {LOBBY: 12})
            await conn.message("m13 and r5", {LOBBY: 13, "group:room": 5})
            await conn.message("m14", {LOBBY: 14})
            await conn.resumed({LOBBY: (True, "e1", 14), "group:room": (True, "e2", 5)})
            await conn.message("m15", {LOBBY: 15})
            assert [await recv(client) for _ in range(4)] == ["m12", "m13 and r5", "m14", "m15"]
            # on_resumed ran in order: after the replayed messages, before the live one
            assert resumed == [
                Resumed(
                    True,
                    {
                        LOBBY: {"recovered": True, "epoch": "e1", "offset": 14},
                        "group:room": {"recovered": True, "epoch": "e2", "offset": 5},
                    },
                )
            ]
            assert client.resumed == resumed[0]
            assert client.client_id == "n.1.2" and client.duplicates == 0
            assert client.positions == {LOBBY: Position("e1", 15), "group:room": Position("e2", 5)}

            # a send waits for the resume: it is never the first frame after a welcome
            conn.drop()
            conn = await server.accept()
            sending = asyncio.create_task(client.send("after the resume"))  # before the welcome
            await asyncio.sleep(scaled(0.1))
            await conn.welcome("n.1.3", "t3", {LOBBY: ("e1", 15)})
            first = await conn.recv_json()
            assert (first["type"], first["token"]) == ("resume", "t2")  # always the last welcome's token
            assert await conn.recv_json() == {"type": "message", "data": "after the resume"}
            await asyncio.wait_for(sending, scaled(5))

            # not recovered (the token was used, say): the node answers for what it could; a requested
            # stream it does not answer for is dropped, the welcome's streams kept at the welcome's position
            await conn.resumed({LOBBY: (False, "e9", 30)})
            await conn.message("live", {LOBBY: 31})
            assert await recv(client) == "live"
            assert client.resumed is not None and client.resumed.recovered is False
            assert resumed[-1].recovered is False and len(resumed) == 2
            assert client.positions == {LOBBY: Position("e9", 31)}
            assert client.connections == 3 and client.failures >= 1


async def test_live_copies_that_overtake_the_replay_are_delivered_in_the_replays_place() -> None:
    """A node may deliver live sends of a stream to the new connection before it reads the resume (even
    before its welcome): they are ahead of the replay, which brings them again. The client holds the
    messages of the streams it asks for until ``resumed`` and delivers each once, in offset order."""
    async with ScriptedServer() as server:
        client, conn = await open_client(server, backoff=(0.01, 0.05))
        async with client:
            await conn.message("m11", {LOBBY: 11})
            assert await recv(client) == "m11"
            conn.drop()
            conn = await server.accept()
            await conn.message("m14", {LOBBY: 14})  # live, before the welcome
            await conn.message("not in a history stream")  # not held
            await conn.welcome("n.1.2", "t2", {LOBBY: ("e1", 14), "group:new": ("e5", 2)})
            assert (await conn.recv_json())["streams"] == {LOBBY: {"epoch": "e1", "offset": 11}}
            await conn.message("m15", {LOBBY: 15})  # live, before the node read the resume
            await conn.message("n3", {"group:new": 3})  # a stream it did not ask for: not held
            for n in (12, 13, 14, 15):  # the replay
                await conn.message(f"m{n}", {LOBBY: n})
            await conn.resumed({LOBBY: (True, "e1", 15)})
            await conn.message("m16", {LOBBY: 16})
            got = [await recv(client) for _ in range(7)]
            assert got == ["not in a history stream", "n3", "m12", "m13", "m14", "m15", "m16"]
            assert client.duplicates == 2
            assert client.positions == {LOBBY: Position("e1", 16), "group:new": Position("e5", 3)}

            # dropped before resumed: what was held is not delivered, and the next resume asks again
            conn.drop()
            conn = await server.accept()
            await conn.welcome("n.1.3", "t3", {LOBBY: ("e1", 20)})
            await conn.recv_json()
            await conn.message("m17", {LOBBY: 17})
            conn.drop()
            conn = await server.accept()
            await conn.welcome("n.1.4", "t4", {LOBBY: ("e1", 20)})
            resume = await conn.recv_json()
            assert (resume["token"], resume["streams"][LOBBY]["offset"]) == ("t3", 16)
            await conn.message("m17", {LOBBY: 17})
            await conn.resumed({LOBBY: (True, "e1", 17)})
            assert await recv(client) == "m17"
            assert client.positions[LOBBY] == Position("e1", 17)


async def test_a_resume_goes_to_whichever_url_comes_next() -> None:
    with refused_port() as port:
        dead = f"ws://127.0.0.1:{port}/"
        async with ScriptedServer() as a, ScriptedServer() as b:
            client = Client([dead, a.url, b.url], backoff=(0.01, 0.05))
            entering = asyncio.create_task(client.connect())
            conn = await a.accept()  # the dead URL was tried first, then the next one
            await conn.welcome("a.1.1", "ta", {LOBBY: ("e1", 3)})
            async with await asyncio.wait_for(entering, scaled(5)):
                assert client.url == a.url and client.failures == 1
                await conn.message("m4", {LOBBY: 4})
                assert await recv(client) == "m4"
                await conn.close(1001, "going away")  # a node shutting down
                conn = await b.accept()
                await conn.welcome("b.1.1", "tb", {})
                assert await conn.recv_json() == {
                    "type": "resume",
                    "token": "ta",
                    "streams": {LOBBY: {"epoch": "e1", "offset": 4}},
                }
                await conn.message("m5", {LOBBY: 5})
                await conn.resumed({LOBBY: (True, "e1", 5)})
                assert await recv(client) == "m5"
                assert client.client_id == "b.1.1" and client.positions == {LOBBY: Position("e1", 5)}


async def test_3010_reconnects_at_once_and_resumes() -> None:
    async with ScriptedServer() as server:
        # a backoff of a minute, no jitter: only an immediate reconnection can come back within the test
        client, conn = await open_client(server, backoff=(60.0, 60.0), jitter=False)
        async with client:
            await conn.message("m11", {LOBBY: 11})
            assert await recv(client) == "m11"
            await conn.close(3010, "insufficient state")
            conn = await server.accept()
            await conn.welcome("n.1.2", "t2", {LOBBY: ("e1", 20)})
            assert await conn.recv_json() == {
                "type": "resume",
                "token": "t1",
                "streams": {LOBBY: {"epoch": "e1", "offset": 11}},
            }
            await conn.resumed({LOBBY: (False, "e1", 20)})
            await conn.message("m21", {LOBBY: 21})
            assert await recv(client) == "m21"
            assert client.resumed == Resumed(
                False, {LOBBY: {"recovered": False, "epoch": "e1", "offset": 20}}
            )
            assert client.close_code == 3010 and client.failures == 0


async def test_a_second_3010_in_a_row_waits_for_the_backoff() -> None:
    async with ScriptedServer() as server:
        client, conn = await open_client(server, backoff=(60.0, 60.0), jitter=False)
        async with client:
            await conn.close(3010)
            conn = await server.accept()
            await conn.welcome("n.1.2", "t2", {})
            await conn.recv_json()  # the resume
            await conn.close(3010)  # again before the connection was stable: no storm of reconnections
            await asyncio.sleep(scaled(0.5))
            assert client.state == "waiting" and client.failures == 1
            assert server.accepted.empty()


@pytest.mark.parametrize("code", [1000, 1008, 4001])
async def test_codes_after_which_it_does_not_come_back(code: int) -> None:
    async with ScriptedServer() as server:
        client, conn = await open_client(server, backoff=(0.01, 0.05))
        async with client:
            await conn.message("last", {LOBBY: 11})
            await conn.close(code, "bye")
            assert [m async for m in client] == ["last"]  # what came before, then the iteration ends
            with pytest.raises(ClientClosed) as closed:
                await client.recv()
            assert (closed.value.code, closed.value.reason) == (code, "bye")
            assert client.state == "closed" and server.accepted.empty()


async def test_a_server_that_does_not_select_v1_gets_a_raw_client() -> None:
    async with ScriptedServer(v1=False) as server:
        client = Client(server.url, backoff=(0.01, 0.05))
        entering = asyncio.create_task(client.connect())
        conn = await server.accept()
        async with await asyncio.wait_for(entering, scaled(5)):
            assert conn.offered == "fanout.v1" and not conn.v1 and not client.v1
            await conn.welcome("old.1.1")  # a raw node's welcome: {"type": "welcome", "client_id": ...}
            await conn.send(orjson.dumps({"text": "json text is decoded"}).decode())
            await conn.send("plain text")
            await conn.send(b"\x00bin")
            assert [await recv(client) for _ in range(3)] == [
                {"text": "json text is decoded"},
                "plain text",
                b"\x00bin",
            ]
            assert client.client_id == "old.1.1"
            await client.send({"a": 1})
            await client.send("hi")
            await client.send(b"\x01")
            assert [await conn.recv() for _ in range(3)] == ['{"a":1}', "hi", b"\x01"]
            # reconnected: no resume, the app's frames come first
            conn.drop()
            conn = await server.accept()
            await conn.welcome("old.1.2")
            await client.send("first")
            assert await conn.recv() == "first"
            assert client.positions == {}


async def test_recover_false_asks_for_no_subprotocol_and_sends_a_fresh_token_each_time() -> None:
    tokens = iter(["one", "two"])
    asked: list[str] = []

    async def get_token(url: str) -> str:
        asked.append(url)
        return next(tokens)

    async with ScriptedServer() as server:
        client = Client(
            server.url + "?x=1",
            recover=False,
            token=get_token,
            backoff=(0.01, 0.05),
            headers={"Authorization": "Bearer abc"},
        )
        entering = asyncio.create_task(client.connect())
        conn = await server.accept()
        async with await asyncio.wait_for(entering, scaled(5)):
            assert conn.offered is None and not conn.v1
            assert conn.path == "/?x=1&token=one"
            assert conn.ws.request is not None and conn.ws.request.headers["Authorization"] == "Bearer abc"
            conn.drop()
            conn = await server.accept()
            assert conn.path == "/?x=1&token=two"
            assert asked == [server.url + "?x=1"] * 2


def test_import_fanout_does_not_import_the_websocket_client() -> None:
    probe = (
        "import sys, fanout\n"
        "print('websockets' in sys.modules, 'fanout.client' in sys.modules)\n"
        "from fanout.client import Client\n"
        "print(fanout.Client is Client, 'websockets' in sys.modules)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False", "False", "True", "True"]
