"""The node's limits, each with its default, with a real node (memory backend) and real clients."""

from __future__ import annotations

import asyncio
import socket
import time

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from node import NodeOptions
from node.limits import TokenBucket
from tests.conftest import MakeNode
from tests.support import scaled
from tests.support.nodes import client, recv


def test_the_defaults_are_sane() -> None:
    options = NodeOptions.from_env({})
    assert options.client_rate == 100 and options.accept_rate == 500
    assert options.handshake_timeout == 10 and options.send_buffer == 1024 * 1024
    assert options.allowed_origins is None  # '*': documented
    assert NodeOptions.from_env(
        {"FANOUT_ALLOWED_ORIGINS": "https://a.example, https://b.example/"}
    ).allowed_origins == {
        "https://a.example",
        "https://b.example",
    }


async def test_a_client_over_its_message_rate_is_closed_with_1008(make_node: MakeNode) -> None:
    node = await make_node(client_rate=10)  # bursts of 20
    ws, _ = await client(node.port)
    polite, _ = await client(node.port)
    with pytest.raises(ConnectionClosed) as closed:
        for _ in range(200):
            await ws.send(b"x")
            await asyncio.sleep(0)
        for _ in range(200):
            await recv(ws)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008
    assert node.metrics.rate_limit_closes == 1
    for _ in range(5):  # well under the rate: never closed
        await polite.send(b"y")
        assert await recv(polite) == b"echo:y"
        await asyncio.sleep(0.15)
    await polite.close()


async def test_new_connections_over_the_accept_rate_get_503(make_node: MakeNode) -> None:
    node = await make_node(accept_rate=5)
    statuses = []
    clients = []
    for _ in range(12):
        try:
            ws, _ = await client(node.port)
            clients.append(ws)
            statuses.append(101)
        except InvalidStatus as refused:
            statuses.append(refused.response.status_code)
            assert refused.response.headers["Retry-After"] == "1"
    assert statuses.count(101) >= 5 and 503 in statuses
    assert node.metrics.accept_rate_refusals == statuses.count(503)
    await asyncio.sleep(0.5)  # the bucket refills
    ws, _ = await client(node.port)
    clients.append(ws)
    for ws in clients:
        await ws.close()


async def test_a_handshake_that_never_completes_is_cut_at_the_timeout(make_node: MakeNode) -> None:
    node = await make_node(handshake_timeout=0.5)

    def slowloris() -> float:
        with socket.create_connection(("127.0.0.1", node.port), timeout=scaled(5)) as sock:
            sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n")  # and never the end
            started = time.monotonic()
            assert sock.recv(100) == b""  # the node hangs up
            return time.monotonic() - started

    took = await asyncio.get_running_loop().run_in_executor(None, slowloris)
    assert 0.3 < took < scaled(3)
    for _ in range(50):
        if node.metrics.handshake_timeouts:
            break
        await asyncio.sleep(0.02)
    assert node.metrics.handshake_timeouts == 1
    ok = await connect(f"ws://127.0.0.1:{node.port}/")  # others are served
    await ok.close()


def test_token_bucket() -> None:
    bucket = TokenBucket(rate=2, burst=4, now=0.0)
    assert [bucket.take(0.0) for _ in range(5)] == [True] * 4 + [False]
    assert bucket.take(0.4) is False  # 0.8 of a token
    assert bucket.take(0.5) is True  # 1.0
    assert [bucket.take(100.0) for _ in range(5)] == [True] * 4 + [False]  # capped at the burst
