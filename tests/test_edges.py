"""Where messages used to be lost without a word, with real nodes and real websocket clients.

Each test here failed on the node before issue 7 (frames dropped by a close, sessions leaking, text that
is not UTF-8, an unbounded batch, a ping flood, HEAD with a body, stalls from bus values, passwords in
messages, inexact metrics, refused subscriptions seen as timeouts).
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from pathlib import Path
from typing import Any

import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families
from websockets.exceptions import ConnectionClosed

from fanout import (
    BackendError,
    MessageTooLarge,
    PayloadError,
    ServerUtil,
    Settings,
    naming,
    protocol,
)
from fanout.backends.memory import MemoryBackend
from fanout.commands import Send, SetSession, Target
from node import Connection
from tests.conftest import MakeNode
from tests.support import free_port, scaled
from tests.support.nodes import client, http_get, metrics, recv, run_module, start_node, unique_namespace
from tests.support.redis_servers import start_redis


async def _publish_raw(settings: Settings, address: naming.Address, raw: bytes) -> None:
    rogue = MemoryBackend(settings, inbox="rogue")
    await rogue.connect(lambda _: None)
    await rogue.publish(address, raw)
    await rogue.close()


# --------------------------------------------------------------------------- a close flushes first


@pytest.mark.parametrize("wait", [True, False], ids=["awaited-close", "close-wait-false"])
async def test_a_send_then_a_close_delivers_the_send_first(make_node: MakeNode, wait: bool) -> None:
    node = await make_node()
    ws, cid = await client(node.port)
    async with ServerUtil(settings=node.settings) as util:
        await util.send(cid, "bye")
        await util.send(cid, "really bye")
        await util.close(cid, 4000, "done", wait=wait)
        assert await recv(ws) == "bye"
        assert await recv(ws) == "really bye"
        with pytest.raises(ConnectionClosed) as closed:
            await recv(ws)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 4000
    assert node.metrics.frames_sent == 3  # welcome + the two sends: counted because written


async def test_a_connection_closing_itself_flushes_what_it_sent(make_node: MakeNode) -> None:
    class SaysGoodbye:
        async def on_message(self, conn: Connection, data: str | bytes) -> None:
            await conn.send("goodbye")
            await conn.close(4001, "bye")

    node = await make_node(SaysGoodbye())
    ws, _ = await client(node.port)
    await ws.send("leave")
    assert await recv(ws) == "goodbye"
    with pytest.raises(ConnectionClosed) as closed:
        await recv(ws)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 4001


# --------------------------------------------------------------------------- sessions do not leak


async def test_reading_the_session_in_on_close_does_not_leak(make_node: MakeNode) -> None:
    class ReadsSession:
        last: list[dict[str, Any]] = []

        async def on_open(self, conn: Connection) -> None:
            conn.session["opened"] = True

        async def on_close(self, conn: Connection) -> None:
            self.last.append(dict(conn.session))
            conn.session["closing"] = True  # writing after the close must not leak either

    app = ReadsSession()
    node = await make_node(app)
    for _ in range(30):
        ws, _ = await client(node.port)
        await ws.close()
    for _ in range(100):
        if len(app.last) == 30:
            break
        await asyncio.sleep(0.01)
    assert app.last == [{"opened": True}] * 30  # on_close sees the session the connection had
    assert node.table.sessions == {} and len(node.table) == 0


# --------------------------------------------------------------------------- only valid UTF-8 text


async def test_text_that_is_not_valid_unicode_is_refused_at_the_publisher(make_node: MakeNode) -> None:
    node = await make_node()
    ws, cid = await client(node.port)
    async with ServerUtil(settings=node.settings) as util:
        for send in (util.send(cid, "a\ud800b"), util.send_to_all("\udfff")):
            with pytest.raises(PayloadError, match="Unicode"):
                await send
        await util.send(cid, "fine")
    assert await recv(ws) == "fine"  # the client was never sent a frame it must close on (1007)


async def test_a_bus_text_send_that_is_not_utf8_is_dropped_and_counted(make_node: MakeNode) -> None:
    node = await make_node()
    ws, _ = await client(node.port)
    await _publish_raw(node.settings, naming.ALL, protocol.encode(Send(Target.all(), b"caf\xe9 \xff")))
    await _publish_raw(node.settings, naming.ALL, protocol.encode(Send(Target.all(), "café".encode())))
    assert await recv(ws) == "café"
    assert node.metrics.dropped["utf8"] == 1
    await ws.close()


# --------------------------------------------------------------------------- the send-buffer bound


async def test_frames_held_during_a_batch_do_not_count_against_the_send_buffer(make_node: MakeNode) -> None:
    node = await make_node(send_buffer=10_000)
    ws, cid = await client(node.port)
    async with ServerUtil(settings=node.settings) as util:
        for i in range(50):  # 50 publishes with no await in between: the node takes them as one batch
            await util.send(cid, f"{i:04d}" + "x" * 996)
    # 50,000 bytes held for one batch: written once they fill a write (half the send buffer here), and
    # the client, which reads, takes them: it is not cut off for what the node held
    assert [await recv(ws) for _ in range(50)] == [f"{i:04d}" + "x" * 996 for i in range(50)]
    assert node.metrics.slow_disconnects == 0 and node.table.get(cid) is not None
    await ws.close()


# --------------------------------------------------------------------------- HEAD


def _raw_http(port: int, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=scaled(5)) as sock:
        sock.sendall(request)
        chunks = []
        while True:
            data = sock.recv(65536)
            if not data:
                return b"".join(chunks)
            chunks.append(data)


async def test_head_gets_the_headers_and_no_body(make_node: MakeNode) -> None:
    node = await make_node()
    loop = asyncio.get_running_loop()
    get = await loop.run_in_executor(None, _raw_http, node.port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    head = await loop.run_in_executor(None, _raw_http, node.port, b"HEAD / HTTP/1.1\r\nHost: x\r\n\r\n")
    _, get_body = get.split(b"\r\n\r\n", 1)
    head_headers, head_body = head.split(b"\r\n\r\n", 1)
    assert get_body and head_body == b""
    assert head_headers.split(b"\r\n")[0] == b"HTTP/1.1 200 OK"
    length = next(h for h in head_headers.split(b"\r\n") if h.lower().startswith(b"content-length"))
    assert int(length.split(b":")[1]) == len(get_body)
    post = await loop.run_in_executor(None, _raw_http, node.port, b"DELETE / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert post.startswith(b"HTTP/1.1 405")


# --------------------------------------------------------------------------- values from the bus are bounded


async def test_a_forged_heartbeat_with_a_huge_ttl_is_dropped(make_node: MakeNode) -> None:
    node = await make_node()
    ws, _ = await client(node.port)
    ghost = {"instance": "ghost.x1", "node_id": "ghost", "connections": 0, "ttl": 1e9}
    async with ServerUtil(settings=node.settings) as util:
        await _publish_raw(
            node.settings, naming.HEARTBEAT, b'v2;;{"op":"hb","node":%s}\n' % orjson.dumps(ghost)
        )
        await asyncio.sleep(0.05)
        assert await util.get_connection_count(timeout=1) == 1  # not stalled by a ghost
        assert util.dropped["malformed"] == 1
    await ws.close()


async def test_a_deep_session_from_the_bus_is_refused_on_arrival(make_node: MakeNode) -> None:
    node = await make_node()
    ws, cid = await client(node.port)
    deep = b'{"k":' * 299 + b"{}" + b"}" * 299
    raw = b'v2;;{"op":"session","c":"%s","data":%s}\n' % (cid.encode(), deep)
    await _publish_raw(node.settings, naming.node(node.instance), raw)
    async with ServerUtil(settings=node.settings) as util:
        for _ in range(50):
            if node.metrics.dropped["malformed"]:
                break
            await asyncio.sleep(0.01)
        assert node.metrics.dropped["malformed"] == 1
        assert await util.get_session(cid) == {}  # readable, not a timeout
        with pytest.raises(PayloadError, match="deeper"):
            await util.set_session(cid, _nested(protocol.MAX_DEPTH + 1))
    await ws.close()


def _nested(depth: int) -> dict[str, Any]:
    value: dict[str, Any] = {}
    for _ in range(depth - 1):
        value = {"k": value}
    return value


async def test_an_answer_the_node_cannot_encode_is_an_error_not_a_timeout(make_node: MakeNode) -> None:
    class DeepSession:
        async def on_open(self, conn: Connection) -> None:
            conn.session["deep"] = _nested(protocol.MAX_DEPTH + 5)  # an app may store anything locally

    node = await make_node(DeepSession())
    ws, cid = await client(node.port)
    async with ServerUtil(settings=node.settings) as util:
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(PayloadError, match="deeper"):
            await util.get_session(cid, timeout=5)
        assert loop.time() - started < 1
    await ws.close()


async def test_an_answer_over_the_message_limit_is_an_error_not_a_timeout(make_node: MakeNode) -> None:
    settings = Settings.create(f"memory://{unique_namespace()}", heartbeat_interval=0.2, max_message=2000)
    node = await make_node(settings=settings)
    ws, cid = await client(node.port)
    async with ServerUtil(settings=settings) as util:
        await util.set_session(cid, {"a": "x" * 1500})
        await util.update_session(cid, {"b": "y" * 1500})  # each fits; together the answer does not
        with pytest.raises(MessageTooLarge, match="FANOUT_MAX_MESSAGE"):
            await util.get_session(cid, timeout=5)
    await ws.close()


# --------------------------------------------------------------------------- metrics are exact


async def test_metrics_are_exact_and_labels_escaped(make_node: MakeNode) -> None:
    node = await make_node()
    node.metrics.bytes_sent = 123_456_789_012
    node.metrics.commands['we"ird\\op\nname'] = 7
    status, text = await asyncio.get_running_loop().run_in_executor(None, http_get, node.port, "/metrics")
    assert status == 200
    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }
    assert samples[("fanout_bytes_sent_total", ())] == 123_456_789_012
    assert samples[("fanout_commands_total", (("op", 'we"ird\\op\nname'),))] == 7
    assert ("fanout_bus_lag_seconds_count", ()) in samples


async def test_the_bus_lag_histogram_counts_applied_commands(make_node: MakeNode) -> None:
    node = await make_node()
    ws, cid = await client(node.port)
    async with ServerUtil(settings=node.settings) as util:
        for _ in range(5):
            await util.send(cid, "x")
    for _ in range(5):
        await recv(ws)
    assert node.metrics.lag.count >= 5
    cumulative = dict(node.metrics.lag.cumulative())
    assert cumulative[1.0] == node.metrics.lag.count  # in-process: well under a second
    await ws.close()


# ------------------------------------------------------------------------- passwords, ping flood


def _fake_url(password: str) -> str:
    return f"redis://:{password}@127.0.0.1:{free_port()}/0"  # nobody listens there


def test_the_redis_password_never_appears_in_messages(tmp_path: Path) -> None:
    secret_pw = "hunter2-" + os.urandom(4).hex()
    url = _fake_url(secret_pw)
    settings = Settings.create(url, publish_timeout=1)
    assert secret_pw not in repr(settings) and "***" in repr(settings)
    node = run_module("node", env={"FANOUT_URL": url, "FANOUT_PUBLISH_TIMEOUT": "1"})
    assert node.returncode == 1
    assert "not reachable" in node.stderr and secret_pw not in node.stderr + node.stdout
    cli = run_module("fanout", "count", env={"FANOUT_URL": url, "FANOUT_PUBLISH_TIMEOUT": "1"})
    assert cli.returncode == 1 and "not reachable" in cli.stderr
    assert secret_pw not in cli.stderr + cli.stdout


async def test_a_wrong_redis_password_is_not_echoed(tmp_path: Path) -> None:
    real_pw = "right-" + os.urandom(4).hex()
    wrong_pw = "wrong-" + os.urandom(4).hex()
    redis = start_redis(tmp_path, "--requirepass", real_pw)
    try:
        url = f"redis://:{wrong_pw}@127.0.0.1:{redis.port}/0"
        with pytest.raises(BackendError) as refused:
            async with ServerUtil(url, publish_timeout=2):
                pass
        assert "refused" in str(refused.value) and wrong_pw not in str(refused.value)
        cli = run_module("fanout", "count", env={"FANOUT_URL": url})
        assert cli.returncode == 1 and wrong_pw not in cli.stderr
        node = run_module("node", env={"FANOUT_URL": url})
        assert node.returncode == 1 and wrong_pw not in node.stderr + node.stdout
    finally:
        redis.stop()


def _ping_frame(payload: bytes = b"p" * 125) -> bytes:
    mask = os.urandom(4)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return bytes((0x89, 0x80 | len(payload))) + mask + masked


async def test_a_ping_flood_from_a_client_that_never_reads_is_cut_off(tmp_path: Path) -> None:
    # pings count against FANOUT_CLIENT_RATE too (a flood is closed with 1008 first): with no rate limit,
    # the bound on what a client that never reads makes the node owe it is what stops the flood
    env = {"FANOUT_BACKEND": "memory", "FANOUT_SEND_BUFFER": str(256 * 1024), "FANOUT_CLIENT_RATE": "0"}
    node = start_node(tmp_path, env, app="tests.apps.control:app")
    before = node.rss_kib()
    ok, ok_id = await client(node.port)  # another client, unaffected

    def flood() -> tuple[bool, float]:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # and we never read it
        sock.connect(("127.0.0.1", node.port))
        sock.sendall(
            b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        burst = _ping_frame() * 1000
        started = time.monotonic()
        try:
            while time.monotonic() - started < scaled(20):
                sock.sendall(burst)
        except OSError:  # reset by the node
            return True, time.monotonic() - started
        finally:
            sock.close()
        return False, time.monotonic() - started

    cut, took = await asyncio.get_running_loop().run_in_executor(None, flood)
    assert cut, "the flooding client was never cut off"
    await asyncio.sleep(0.2)
    samples = await metrics(node.port)
    # cut off as a ping flood, or - when the flood starts before the handshake is done, which websockets
    # would buffer whole - as a handshake flood
    cut_off = samples["fanout_ping_flood_disconnects_total"] + samples["fanout_handshake_floods_total"]
    assert cut_off == 1, {k: v for k, v in samples.items() if "flood" in k or "slow" in k}
    grown_mib = (node.rss_kib("VmHWM") - before) / 1024
    assert grown_mib < 20, f"node peak memory grew {grown_mib:.1f} MiB during the flood ({took:.1f}s)"
    await ok.send(orjson.dumps({"call": "send", "args": [ok_id, "still here"]}).decode())
    assert {await recv(ok), await recv(ok)} == {"still here", '{"id":null,"result":null}'}
    await ok.close()
    assert node.terminate() == 0


# --------------------------------------------------------------------------- a refused subscription


async def test_a_subscription_the_broker_refuses_reaches_the_caller_as_an_error(tmp_path: Path) -> None:
    """Redis ACL: the node's user may use every channel of its namespace but group channels."""
    ns = unique_namespace()
    redis = start_redis(tmp_path)
    try:
        redis.cli(
            "ACL", "SETUSER", "node", "on", ">nodepw", "~*", "+@all",
            "resetchannels", f"&{ns}:all", f"&{ns}:hb", f"&{ns}:n:*", f"&{ns}:i:*", f"&{ns}:f:*",
        )  # fmt: skip
        node = start_node(
            tmp_path,
            {"FANOUT_URL": f"redis://node:nodepw@127.0.0.1:{redis.port}/0", "FANOUT_NAMESPACE": ns},
            app="tests.apps.control:app",
        )
        ws, cid = await client(node.port)
        async with ServerUtil(redis.url, namespace=ns, heartbeat_interval=0.5) as util:
            assert await util.bind(cid, "user-1") is True  # flag channels are allowed
            loop = asyncio.get_running_loop()
            started = loop.time()
            with pytest.raises(BackendError, match="refused") as refused:
                await util.join_group(cid, "room", timeout=5)
            assert loop.time() - started < 3  # an answer, not the timeout
            assert "nodepw" not in str(refused.value)
            await util.send(cid, "still served")
            assert await recv(ws) == "still served"
        await ws.close()
        assert node.terminate() == 0
    finally:
        redis.stop()


async def test_nothing_more_after_close(make_node: MakeNode) -> None:
    """A send after the close command is not delivered (the connection is closing)."""
    node = await make_node()
    ws, cid = await client(node.port)
    async with ServerUtil(settings=node.settings) as util:
        await util.close(cid, wait=False)
        await util.send(cid, "too late")
    with pytest.raises(ConnectionClosed):
        await recv(ws)
    assert node.metrics.frames_sent == 1  # the welcome only


async def test_set_session_from_the_bus_is_applied_in_place(make_node: MakeNode) -> None:
    node = await make_node()
    ws, cid = await client(node.port)
    await _publish_raw(node.settings, naming.node(node.instance), protocol.encode(SetSession(cid, {"a": 1})))
    for _ in range(50):
        if node.table.sessions.get(cid):
            break
        await asyncio.sleep(0.01)
    assert node.table.sessions[cid] == {"a": 1}
    await ws.close()


async def test_frames_held_by_the_write_delay_are_written_before_an_acknowledged_reply(
    make_node: MakeNode,
) -> None:
    """``ack=True`` counts connections reached: the frames must be on the wire (not held in the node
    for the write delay) when that answer goes out, or a node dying just then loses acknowledged sends."""
    node = await make_node(write_delay=0.05)  # a long delay, so that holding would be seen
    ws, cid = await client(node.port)
    conn = node.table.get(cid)
    assert conn is not None
    async with ServerUtil(settings=node.settings) as util:
        await util.join_group(cid, "g")
        await util.send_to_group("g", "first")  # a burst: the next batch comes within the delay
        reached = await util.send_to_group("g", "second", ack=True)
        assert reached == 1
        assert conn._pending is None  # written, not waiting in the node
        assert [await recv(ws), await recv(ws)] == ["first", "second"]
    await ws.close()
