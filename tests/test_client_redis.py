"""Both clients with real node processes on Redis (``FANOUT_HISTORY=group:*``): a client whose socket is cut,
or whose node is SIGKILLed, while sends go to its group resumes on the other node with every send once, in
order, then live ones; the demo page shows what was said while it was away; docs/continuity.md's Python
example runs as printed."""

from __future__ import annotations

import asyncio
import contextlib
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest

from fanout import ServerUtil
from fanout.client import Client
from tests.support import scaled
from tests.support.nodes import ROOT, NodeProcess, demo_client, start_node, unique_namespace
from tests.support.tcp_proxy import TcpProxy
from tests.test_demo_page import DEMO
from tests.test_js_client import browser_page

REDIS = "redis://127.0.0.1:6379/0"
STREAMS = "tests.apps.streams:app"


def two_nodes(tmp_path: Path, history: str, app: str) -> tuple[dict[str, str], NodeProcess, NodeProcess]:
    env = {"FANOUT_URL": REDIS, "FANOUT_NAMESPACE": unique_namespace(), "FANOUT_HISTORY": history}
    a = start_node(tmp_path, {**env, "FANOUT_NODE_ID": "node-a"}, app=app)
    b = start_node(tmp_path, {**env, "FANOUT_NODE_ID": "node-b"}, app=app)
    return env, a, b


async def recv(client: Client, timeout: float = 10.0) -> Any:
    return await asyncio.wait_for(client.recv(), scaled(timeout))


async def take(client: Client, count: int, timeout: float = 10.0) -> list[Any]:
    """The next ``count`` deliveries, or fewer: what came before nothing more did for ``timeout``."""
    got = []
    with contextlib.suppress(TimeoutError):
        while len(got) < count:
            got.append(await recv(client, timeout))
    return got


@pytest.mark.parametrize("how", ["socket cut", "node killed"])
async def test_the_python_client_resumes_on_the_other_node_with_every_send_once(
    tmp_path: Path, how: str
) -> None:
    env, a, b = two_nodes(tmp_path, "group:*", STREAMS)
    query = "?user=ann&groups=room"
    async with (
        TcpProxy(target_port=a.port) as proxy,
        ServerUtil(
            REDIS, namespace=env["FANOUT_NAMESPACE"], history="group:*", heartbeat_interval=0.5
        ) as util,
    ):
        first = proxy.port if how == "socket cut" else a.port
        urls = [f"ws://127.0.0.1:{first}/{query}", f"ws://127.0.0.1:{b.port}/{query}"]
        async with Client(urls, backoff=(0.05, 0.5)) as client:
            assert client.v1 and client.node_id == "node-a"
            for n in range(5):
                await util.send_to_group("room", {"n": n})
            got = await take(client, 5)
            if how == "socket cut":
                proxy.cut()  # both ends see the connection end, no close frame
            else:
                a.kill()  # SIGKILL
            for n in range(5, 55):  # while it comes back on node-b
                await util.send_to_group("room", {"n": n})
            got += await take(client, 50)
            for n in range(55, 60):
                await util.send_to_group("room", {"n": n})
            got += await take(client, 5)
            assert [g["n"] for g in got] == list(range(60)), (
                client.resumed,
                client.positions,
            )  # once, in order
            assert client.resumed is not None and client.resumed.recovered is True
            assert client.node_id == "node-b" and client.connections == 2
            assert client.positions["group:room"].offset == 60
            # its flag came back with the resume: a send to the flag reaches it
            await util.send_by_flag("ann", "to ann")
            assert await recv(client) == "to ann"
    assert b.terminate() == 0


async def test_the_demo_page_shows_what_was_said_while_its_node_was_down(tmp_path: Path) -> None:
    _env, a, b = two_nodes(tmp_path, "group:lobby", DEMO)
    async with TcpProxy(target_port=b.port) as to_b:
        # the page's second node is behind a proxy, so the test decides when it can come back
        nodes = f"ws://127.0.0.1:{a.port}/,ws://127.0.0.1:{to_b.port}/"
        async with browser_page(tmp_path / "profile", f"http://127.0.0.1:{a.port}/?nodes={nodes}") as page:
            await page.wait_text("status", "connected as node-a.")
            assert await page.evaluate("fanoutClient.v1") is True
            ann, _ = await demo_client(b.port, "ann")
            await ann.send(orjson.dumps({"text": "before", "name": "ann"}).decode())
            await page.wait_text("log", "ann @node-b: before")

            to_b.cut()  # node-b unreachable for the page
            a.kill()  # and its node dies
            await page.wait_text("status", "disconnected (1006)")
            for text in ("while you were away", "and this too"):
                await ann.send(orjson.dumps({"text": text, "name": "ann"}).decode())
            await asyncio.sleep(scaled(0.5))
            assert "while you were away" not in await page.text("log")

            to_b.restore()
            log = await page.wait_text("log", "back: nothing was missed", timeout=30)
            await page.wait_text("status", "connected as node-b.")
            await ann.send(orjson.dumps({"text": "after", "name": "ann"}).decode())
            log = await page.wait_text("log", "ann @node-b: after")
            said = re.findall(r"ann @node-b: (.+)", log)
            assert said == ["before", "while you were away", "and this too", "after"], log
            assert log.index("and this too") < log.index("back: nothing was missed") < log.index(": after")
            await ann.close()
    assert b.terminate() == 0


def _example(name: str) -> str:
    page = (ROOT / "docs" / "continuity.md").read_text()
    for block in re.findall(r"```python\n(.*?)```", page, flags=re.S):
        if block.startswith(f"# {name}"):
            return str(block)
    raise AssertionError(f"docs/continuity.md has no python block starting with # {name}")


async def test_the_docs_python_example_follows_the_lobby_across_a_killed_node(tmp_path: Path) -> None:
    _env, a, b = two_nodes(tmp_path, "group:lobby", DEMO)
    (tmp_path / "follow.py").write_text(_example("follow.py"))
    follower = await asyncio.create_subprocess_exec(
        sys.executable,
        "follow.py",
        f"ws://127.0.0.1:{a.port}/",
        f"ws://127.0.0.1:{b.port}/",
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    assert follower.stdout is not None

    async def line() -> str:
        assert follower.stdout is not None
        return (await asyncio.wait_for(follower.stdout.readline(), scaled(15))).decode().strip()

    try:
        assert (await line()).startswith("connected as node-a.")
        ann, _ = await demo_client(b.port, "ann")
        await ann.send(orjson.dumps({"text": "one", "name": "ann"}).decode())
        assert await line() == "ann: one"
        a.kill()
        for text in ("two", "three"):
            await ann.send(orjson.dumps({"text": text, "name": "ann"}).decode())
        lines = [await line() for _ in range(3)]
        # back on node-b with the lines it missed, before or after "three" was said
        assert [x for x in lines if x.startswith("ann:")] == ["ann: two", "ann: three"]
        assert lines.count("back: nothing was missed") == 1
        await ann.send(orjson.dumps({"text": "four", "name": "ann"}).decode())
        assert await line() == "ann: four"
        await ann.close()
    finally:
        follower.kill()
        await follower.wait()
    assert b.terminate() == 0
