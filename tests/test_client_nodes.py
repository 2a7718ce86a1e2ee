"""Both clients (``fanout.client.Client`` and ``fanout.js`` with ``recover: true``) against real nodes: the
socket cut under a client while sends go to its history group, it resumes on the other node with every send
once, in order, then live ones; a node that lost entries closes it with 3010 and it comes back at once,
told ``recovered: false``; raw mode against the same nodes.

In-process nodes on the memory backend (its history store is shared by the nodes of the process) with a
TCP proxy in front of the first node to cut the client's connection (both sides see it end, no close
frame). The same over Redis with node processes: tests/test_client_redis.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest

from fanout import Settings
from fanout.client import Client, Position
from node import Node, NodeOptions
from tests.apps.streams import StreamsApp
from tests.support import scaled
from tests.support.nodes import unique_namespace
from tests.support.tcp_proxy import TcpProxy
from tests.test_continuity_node import Publisher
from tests.test_js_client import browser_page, wait_for

Nodes = Callable[..., Awaitable[list[Node]]]
ROOM = "group:h-room"


@pytest.fixture
async def nodes() -> AsyncIterator[Nodes]:
    """``await nodes(n, **settings)``: n in-process nodes ("a", "b", ...) on one memory namespace, history
    for ``group:h-*``."""
    started: list[Node] = []

    async def start(count: int = 2, **options: Any) -> list[Node]:
        url = f"memory://{unique_namespace()}"
        for name in "abcdefgh"[:count]:
            settings = Settings.create(url, heartbeat_interval=0.2, history="group:h-*", **options)
            node = Node(settings, NodeOptions(port=0, node_id=name), StreamsApp())
            await node.start()
            started.append(node)
        return started[-count:]

    yield start
    for node in started:
        await node.stop()


async def recv(client: Client, timeout: float = 5.0) -> Any:
    return await asyncio.wait_for(client.recv(), scaled(timeout))


async def test_a_cut_python_client_resumes_on_the_other_node_with_every_send_once(nodes: Nodes) -> None:
    a, b = await nodes(2)
    pub = Publisher(a)
    query = "?user=ann&groups=h-room"
    async with TcpProxy(target_port=a.port) as proxy:
        urls = [f"ws://127.0.0.1:{proxy.port}/{query}", f"ws://127.0.0.1:{b.port}/{query}"]
        async with Client(urls, backoff=(0.05, 0.2)) as client:
            assert client.v1 and client.node_id == "a"
            epoch = client.positions[ROOM].epoch
            assert client.positions == {ROOM: Position(epoch, 0)}
            for i in range(5):
                await pub.send("h-room", i)
            got = [await recv(client) for _ in range(5)]

            proxy.cut()  # the network drops under it: it comes back on b, while these go
            for i in range(5, 55):
                await pub.send("h-room", i)
            got += [await recv(client) for _ in range(50)]
            for i in range(55, 60):
                await pub.send("h-room", i)
            got += [await recv(client) for _ in range(5)]

            assert got == list(range(60))  # every send once, in order
            assert client.resumed is not None and client.resumed.recovered is True
            # (client.duplicates may count live copies the node sent before it read the resume: dropped)
            assert client.node_id == "b" and client.connections == 2
            assert client.positions == {ROOM: Position(epoch, 60)}
            # its messages reach the app unwrapped, as a raw client's would (StreamsApp echoes them)
            await client.send("hello")
            await client.send({"x": 1})
            assert [await recv(client), await recv(client)] == [{"echo": "hello"}, {"echo": '{"x":1}'}]


async def test_3010_brings_the_python_client_back_at_once_not_recovered(nodes: Nodes) -> None:
    (node,) = await nodes(1, history_size=2)
    pub = Publisher(node)
    resumed = asyncio.Event()
    # a backoff of a minute without jitter: only the immediate reconnection of a 3010 comes back in time
    client = Client(
        f"ws://127.0.0.1:{node.port}/?groups=h-8",
        backoff=(60.0, 60.0),
        jitter=False,
        on_resumed=lambda _: resumed.set(),
    )
    async with client:
        await pub.send("h-8", "first")
        assert await recv(client) == "first"
        for i in range(4):
            await pub.send("h-8", i, publish=False)  # lost on the bus, and only 2 kept
        await pub.send("h-8", "live")  # the node sees the gap, cannot fill it: 3010
        reading = asyncio.create_task(recv(client, 10))
        await asyncio.wait_for(resumed.wait(), scaled(10))
        assert client.close_code == 3010 and client.connections == 2
        assert client.resumed is not None
        assert client.resumed.recovered is False and client.resumed.streams["group:h-8"]["recovered"] is False
        await pub.send("h-8", "after")
        assert await reading == "after"
        assert client.positions["group:h-8"].offset == 7


async def test_the_python_client_is_raw_without_recover(nodes: Nodes) -> None:
    (node,) = await nodes(1)
    pub = Publisher(node)
    async with Client(f"ws://127.0.0.1:{node.port}/?groups=h-1", recover=False) as client:
        await pub.send("h-1", {"a": 1})
        assert await recv(client) == {"a": 1}
        assert not client.v1 and client.client_id is not None and client.client_id.startswith("a.")
        assert client.positions == {}
        await client.send("hi")
        assert await recv(client) == {"echo": "hi"}


PAGE_CLIENT = """import('/fanout.js').then((m) => new Promise((resolve) => {
  window.log = [];
  window.client = m.connect(%s, Object.assign({
    recover: true, minDelay: 50, maxDelay: 200,
    onMessage: (d) => log.push(d),
    onResumed: (r) => log.push({resumed: r}),
    onWelcome: () => resolve(true),
  }, %s));
}))"""


async def page_log(page: Any, length: int) -> list[Any]:
    await wait_for(page, f"log.length >= {length}", timeout=10)
    log: list[Any] = await page.evaluate("log")
    return log


async def test_a_cut_page_resumes_on_the_other_node_with_every_send_once(
    nodes: Nodes, tmp_path: Path
) -> None:
    a, b = await nodes(2)
    pub = Publisher(a)
    query = "?user=ann&groups=h-room"
    async with (
        TcpProxy(target_port=a.port) as proxy,
        browser_page(tmp_path / "profile", f"http://127.0.0.1:{b.port}/") as page,
    ):
        await wait_for(page, "location.protocol === 'http:' && document.readyState === 'complete'")
        urls = [f"ws://127.0.0.1:{proxy.port}/{query}", f"ws://127.0.0.1:{b.port}/{query}"]
        await page.evaluate(PAGE_CLIENT % (orjson.dumps(urls).decode(), "{}"))
        assert await page.evaluate("[client.v1, client.nodeId]") == [True, "a"]
        epoch = await page.evaluate(f"client.positions[{ROOM!r}].epoch")
        for i in range(5):
            await pub.send("h-room", i)
        await page_log(page, 5)
        proxy.cut()
        for i in range(5, 55):
            await pub.send("h-room", i)
        await wait_for(page, "client.resumed")
        for i in range(55, 60):
            await pub.send("h-room", i)
        log = await page_log(page, 61)
        resumed = [entry for entry in log if isinstance(entry, dict)]
        assert [entry for entry in log if not isinstance(entry, dict)] == list(range(60))
        assert len(resumed) == 1 and resumed[0]["resumed"]["recovered"] is True
        assert log.index(resumed[0]) >= 55  # after everything it missed, before the live ones
        assert await page.evaluate("[client.nodeId, client.positions]") == [
            "b",
            {ROOM: {"epoch": epoch, "offset": 60}},
        ]
        assert await page.evaluate("client.send('from the page')") is True
        assert (await page_log(page, 62))[-1] == {"echo": "from the page"}


async def test_3010_brings_the_page_back_at_once_not_recovered(nodes: Nodes, tmp_path: Path) -> None:
    (node,) = await nodes(1, history_size=2)
    pub = Publisher(node)
    async with browser_page(tmp_path / "profile", f"http://127.0.0.1:{node.port}/") as page:
        await wait_for(page, "location.protocol === 'http:' && document.readyState === 'complete'")
        await page.evaluate("Math.random = () => 1")  # the backoff at its top: ten minutes
        urls = [f"ws://127.0.0.1:{node.port}/?groups=h-8"]
        await page.evaluate(
            PAGE_CLIENT % (orjson.dumps(urls).decode(), '{"minDelay": 600000, "maxDelay": 600000}')
        )
        await pub.send("h-8", "first")
        await page_log(page, 1)
        for i in range(4):
            await pub.send("h-8", i, publish=False)
        await pub.send("h-8", "live")
        await wait_for(page, "client.resumed", timeout=10)
        assert await page.evaluate("[client.closeCode, client.resumed.recovered]") == [3010, False]
        await pub.send("h-8", "after")
        log = await page_log(page, 3)
        assert log[0] == "first" and log[1]["resumed"]["recovered"] is False and log[2] == "after"
