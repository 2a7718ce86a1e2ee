"""The JS client's recovery (``recover: true``, ``fanout.v1``) in headless Chromium, against a real websocket
server the test scripts frame by frame (tests/support/v1_server.py, which also serves ``/fanout.js``): the
token and positions kept, ``resume`` as the first frame after every reconnection (to any URL of the list),
3010 at once, ``onResumed`` in order with the messages, and a raw client for a server without ``fanout.v1``.
Against real nodes (and the demo page): tests/test_js_client.py."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import orjson

from tests.support import refused_port, scaled
from tests.support.v1_server import V1, Scripted, ScriptedServer
from tests.test_demo_page import Page
from tests.test_js_client import browser_page, wait_for

LOBBY = "group:lobby"

#: what the page's client hands the page, in order: ["m", data] (bytes as {"bytes": [...]}), ["resumed", ...];
#: and in ``events`` every socket that opened or closed (what a failed assertion on reconnections shows)
CLIENT = """import('/fanout.js').then((m) => {
  window.log = [];
  window.events = [];
  window.client = m.connect(%s, Object.assign({
    recover: true, minDelay: 20, maxDelay: 100,
    onMessage: (d) => log.push(["m", d instanceof Uint8Array ? { bytes: Array.from(d) } : d]),
    onResumed: (r) => log.push(["resumed", r]),
    onOpen: ({ url }) => events.push(["open", url, performance.now()]),
    onClose: ({ code, url, delay }) => events.push(["close", url, code, delay, performance.now()]),
  }, %s));
  return true;
})"""


@asynccontextmanager
async def page_of(tmp_path: Path, server: ScriptedServer) -> AsyncIterator[Page]:
    async with browser_page(tmp_path / "profile", server.http) as page:
        await wait_for(page, "location.protocol === 'http:' && document.readyState === 'complete'")
        yield page


async def start(page: Page, urls: list[str], **options: Any) -> None:
    await page.evaluate(CLIENT % (orjson.dumps(urls).decode(), orjson.dumps(options).decode()))


async def log_of(page: Page, length: int) -> list[Any]:
    """The page's log once it has ``length`` entries."""
    await wait_for(page, f"log.length >= {length}")
    log: list[Any] = await page.evaluate("log")
    assert len(log) == length, log
    return log


async def test_v1_deliveries_positions_sends_and_duplicates(tmp_path: Path) -> None:
    async with ScriptedServer() as server, page_of(tmp_path, server) as page:
        await start(page, [server.url])
        conn = await server.accept()
        assert conn.v1 and conn.offered == "fanout.v1"
        assert await page.evaluate("client.send('too early')") is False  # nothing before the welcome
        await conn.welcome("n.1.1", "t1", {LOBBY: ("e1", 10)})
        await wait_for(page, "client.clientId")
        assert await page.evaluate("[client.clientId, client.nodeId, client.v1, client.resumeToken]") == [
            "n.1.1",
            "n",
            True,
            "t1",
        ]
        await conn.message("hi", {LOBBY: 11})
        await conn.message('{"not": "decoded"}', {LOBBY: 12})
        await conn.message({"text": "hello", "n": [1, 2.5, None, True]})
        await conn.message(raw=b"\x00\xffb", streams={LOBBY: 13})
        await conn.send({"type": "joined", "stream": "group:room", "epoch": "e2", "offset": 4})
        await conn.send({"type": "joined", "stream": "flag:ann", "epoch": "e3", "offset": 0})
        await conn.send({"type": "left", "stream": "flag:ann"})
        await conn.message("both", {LOBBY: 14, "group:room": 5})
        await conn.message("again", {LOBBY: 14, "group:room": 5})  # every offset received: dropped
        await conn.message("newer in one", {LOBBY: 14, "group:room": 6})
        assert await log_of(page, 6) == [
            ["m", "hi"],
            ["m", '{"not": "decoded"}'],
            ["m", {"text": "hello", "n": [1, 2.5, None, True]}],
            ["m", {"bytes": [0, 255, 98]}],
            ["m", "both"],
            ["m", "newer in one"],
        ]
        assert await page.evaluate("[client.positions, client.duplicates]") == [
            {LOBBY: {"epoch": "e1", "offset": 14}, "group:room": {"epoch": "e2", "offset": 6}},
            1,
        ]
        assert await page.evaluate(
            "[client.send('text'), client.send({a: [1]}), client.send(new Uint8Array([1, 2]))]"
        ) == [True, True, True]
        assert [await conn.recv_json() for _ in range(3)] == [
            {"type": "message", "data": "text"},
            {"type": "message", "data": {"a": [1]}},
            {"type": "message", "data_b64": "AQI="},
        ]


async def test_a_dropped_page_resumes_on_the_next_url_with_its_last_token(tmp_path: Path) -> None:
    async with ScriptedServer() as a, ScriptedServer() as b, page_of(tmp_path, a) as page:
        await start(page, [a.url, b.url])
        conn = await a.accept()
        await conn.welcome("a.1.1", "ta", {LOBBY: ("e1", 10)})
        await conn.message("m11", {LOBBY: 11})
        await conn.send({"type": "joined", "stream": "group:room", "epoch": "e2", "offset": 4})
        await log_of(page, 1)

        conn.drop()  # no close frame: 1006
        conn = await b.accept()
        await conn.welcome("b.1.1", "tb", {LOBBY: ("e1", 14)})  # ahead of the page: the replay follows
        assert await conn.recv_json() == {
            "type": "resume",
            "token": "ta",
            "streams": {LOBBY: {"epoch": "e1", "offset": 11}, "group:room": {"epoch": "e2", "offset": 4}},
        }
        await conn.message("m12", {LOBBY: 12})
        await conn.message("m13 and r5", {LOBBY: 13, "group:room": 5})
        await conn.message("m14", {LOBBY: 14})
        await conn.resumed({LOBBY: (True, "e1", 14), "group:room": (True, "e2", 5)})
        await conn.message("m15", {LOBBY: 15})
        streams = {
            LOBBY: {"recovered": True, "epoch": "e1", "offset": 14},
            "group:room": {"recovered": True, "epoch": "e2", "offset": 5},
        }
        assert (await log_of(page, 6))[1:] == [
            ["m", "m12"],
            ["m", "m13 and r5"],
            ["m", "m14"],
            ["resumed", {"recovered": True, "streams": streams}],
            ["m", "m15"],
        ]
        assert await page.evaluate("[client.clientId, client.url, client.positions, client.duplicates]") == [
            "b.1.1",
            b.url,
            {LOBBY: {"epoch": "e1", "offset": 15}, "group:room": {"epoch": "e2", "offset": 5}},
            0,
        ]

        # back to the first URL: the resume carries b's token; not recovered, a requested stream the node
        # does not answer for is dropped, the welcome's kept
        conn.drop()
        conn = await a.accept()
        await conn.welcome("a.1.2", "ta2", {LOBBY: ("e9", 30)})
        resume = await conn.recv_json()
        assert (resume["type"], resume["token"]) == ("resume", "tb")
        await conn.resumed({}, recovered=False)
        await conn.message("live", {LOBBY: 31})
        assert (await log_of(page, 8))[6:] == [
            ["resumed", {"recovered": False, "streams": {}}],
            ["m", "live"],
        ]
        assert await page.evaluate("client.positions") == {LOBBY: {"epoch": "e9", "offset": 31}}


async def test_live_copies_that_overtake_the_replay_come_in_the_replays_place(tmp_path: Path) -> None:
    async with ScriptedServer() as server, page_of(tmp_path, server) as page:
        await start(page, [server.url])
        conn = await server.accept()
        await conn.welcome("n.1.1", "t1", {LOBBY: ("e1", 10)})
        await conn.message("m11", {LOBBY: 11})
        await log_of(page, 1)
        conn.drop()
        conn = await server.accept()
        await conn.message("m14", {LOBBY: 14})  # live, before the welcome
        await conn.welcome("n.1.2", "t2", {LOBBY: ("e1", 14), "group:new": ("e5", 2)})
        assert (await conn.recv_json())["streams"] == {LOBBY: {"epoch": "e1", "offset": 11}}
        await conn.message("m15", {LOBBY: 15})  # live, before the node read the resume
        await conn.message("n3", {"group:new": 3})  # a stream it did not ask for: not held
        for n in (12, 13, 14, 15):  # the replay
            await conn.message(f"m{n}", {LOBBY: n})
        await conn.resumed({LOBBY: (True, "e1", 15)})
        await conn.message("m16", {LOBBY: 16})
        log = await log_of(page, 8)
        assert [entry[1] for entry in log if entry[0] == "m"] == [
            "m11",
            "n3",
            "m12",
            "m13",
            "m14",
            "m15",
            "m16",
        ]
        assert log[-2][0] == "resumed"
        assert await page.evaluate("[client.duplicates, client.positions]") == [
            2,
            {LOBBY: {"epoch": "e1", "offset": 16}, "group:new": {"epoch": "e5", "offset": 3}},
        ]


async def test_3010_reconnects_at_once_and_resumes(tmp_path: Path) -> None:
    async with ScriptedServer() as server, page_of(tmp_path, server) as page:
        # a backoff of ten minutes with the jitter at its top: only an immediate reconnection comes back
        await page.evaluate("Math.random = () => 1")
        await start(page, [server.url], minDelay=600_000, maxDelay=600_000)
        conn = await server.accept()
        await conn.welcome("n.1.1", "t1", {LOBBY: ("e1", 10)})
        await conn.message("m11", {LOBBY: 11})
        await log_of(page, 1)
        await conn.close(3010, "insufficient state")
        conn = await server.accept()
        await conn.welcome("n.1.2", "t2", {LOBBY: ("e1", 20)})
        assert await conn.recv_json() == {
            "type": "resume",
            "token": "t1",
            "streams": {LOBBY: {"epoch": "e1", "offset": 11}},
        }
        await conn.resumed({LOBBY: (False, "e1", 20)})
        streams = {LOBBY: {"recovered": False, "epoch": "e1", "offset": 20}}
        assert (await log_of(page, 2))[1] == ["resumed", {"recovered": False, "streams": streams}]
        assert await page.evaluate("[client.closeCode, client.failures]") == [3010, 0]

        # a second 3010 before the connection was stable: the backoff (ten minutes here)
        await conn.close(3010)
        await wait_for(page, "client.state === 'waiting'")
        assert await page.evaluate("client.failures") == 1
        assert server.accepted.empty()


async def test_a_server_without_fanout_v1_gets_a_raw_client(tmp_path: Path) -> None:
    with refused_port() as port:
        dead = f"ws://127.0.0.1:{port}/"
        async with ScriptedServer(v1=False) as server, page_of(tmp_path, server) as page:
            await start(page, [server.url, dead])

            async def raw_after_two_refusals() -> Scripted:
                # the browser fails a handshake whose answer selects no subprotocol: the same URL is probed at
                # once without it; the probe opens, so it is closed and fanout.v1 asked for once more (the
                # failure could have been the network's); refused again, the client connects raw
                refused = await server.accept()
                probe = await server.accept()
                await asyncio.wait_for(probe.closed.wait(), scaled(5))
                again = await server.accept()
                conn = await server.accept()
                assert [refused.offered, probe.offered, again.offered, conn.offered] == [V1, None, V1, None]
                assert probe.ws.close_code == 1000
                return conn

            conn = await raw_after_two_refusals()
            await conn.welcome("old.1.1")
            await conn.send(orjson.dumps({"text": "json text is decoded"}).decode())
            await conn.send("plain text")
            assert await log_of(page, 2) == [["m", {"text": "json text is decoded"}], ["m", "plain text"]]
            state = await page.evaluate("[client.clientId, client.v1, client.failures]")
            assert state == ["old.1.1", False, 0]
            assert await page.evaluate("client.send({a: 1})") is True
            assert await conn.recv() == '{"a":1}'
            # the drop and the dead next URL (its two attempts count as one) are two failures; back here: v1
            # asked, then raw, no resume
            conn.drop()
            conn = await raw_after_two_refusals()
            await conn.welcome("old.1.2")
            await wait_for(page, "client.clientId === 'old.1.2'")
            failures = await page.evaluate("client.failures")
            assert failures == 2, await page.evaluate("events")
            assert await page.evaluate("client.send('first')") is True
            assert await conn.recv() == "first"


async def test_a_v1_handshake_that_fails_once_does_not_make_the_client_raw(tmp_path: Path) -> None:
    async with ScriptedServer() as server, page_of(tmp_path, server) as page:
        await start(page, [server.url])
        conn = await server.accept()
        await conn.welcome("n.1.1", "t1", {LOBBY: ("e1", 10)})
        await wait_for(page, "client.clientId")
        server.refuse = 1  # the next handshake fails (a 503 from a balancer, say)
        conn.drop()
        probe = await server.accept()  # the probe without fanout.v1 opens: closed, v1 asked again
        assert probe.offered is None
        conn = await server.accept()
        assert conn.v1
        await conn.welcome("n.1.2", "t2", {LOBBY: ("e1", 10)})
        assert (await conn.recv_json())["token"] == "t1"  # resumed, not raw


async def test_without_recover_the_client_asks_for_no_subprotocol(tmp_path: Path) -> None:
    async with ScriptedServer() as server, page_of(tmp_path, server) as page:
        await start(page, [server.url], recover=False)
        conn = await server.accept()
        assert conn.offered is None and not conn.v1
        await conn.welcome("n.1.1")
        await conn.send('{"type": "message", "data": "not unwrapped"}')
        assert await log_of(page, 1) == [["m", {"type": "message", "data": "not unwrapped"}]]
        conn.drop()
        conn = await server.accept()
        await conn.welcome("n.1.2")
        await wait_for(page, "client.clientId === 'n.1.2'")
        assert await page.evaluate("client.send('first')") is True
        assert await conn.recv() == "first"  # no resume
