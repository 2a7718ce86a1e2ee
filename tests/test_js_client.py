"""The JS client (``node/static/fanout.js``, served at ``GET /fanout.js``), in a real headless Chromium
against real node processes: the demo page on it, a node killed under the page, close codes, tokens."""

from __future__ import annotations

import asyncio
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import orjson

from fanout import ServerUtil
from node.node import Node
from tests.support import refused_port, scaled
from tests.support.nodes import ROOT, demo_client, recv, start_node, unique_namespace
from tests.test_demo_page import DEMO, Page, open_page

JS = ROOT / "node" / "static" / "fanout.js"
REDIS = "redis://127.0.0.1:6379/0"


@asynccontextmanager
async def browser_page(profile: Path, url: str) -> AsyncIterator[Page]:
    browser, page = await open_page(profile, url)
    try:
        yield page
    finally:
        await page.devtools.close()
        browser.terminate()
        await browser.wait()


async def wait_for(page: Page, expression: str, timeout: float = 5.0) -> Any:
    """The value of ``expression`` in the page once it is truthy."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + scaled(timeout)
    while not (value := await page.evaluate(expression)):
        assert loop.time() < deadline, f"{expression} still {value!r}"
        await asyncio.sleep(0.05)
    return value


def _get(url: str, headers: dict[str, str] | None = None, method: str = "GET") -> tuple[int, Any, bytes]:
    request = urllib.request.Request(url, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(request, timeout=scaled(5)) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers, exc.read()


async def get(url: str, headers: dict[str, str] | None = None, method: str = "GET") -> tuple[int, Any, bytes]:
    return await asyncio.get_running_loop().run_in_executor(None, _get, url, headers, method)


async def test_every_node_serves_the_js_client_as_the_repo_file(make_node: Any) -> None:
    node: Node = await make_node()
    url = f"http://127.0.0.1:{node.port}/fanout.js"
    status, headers, body = await get(url)
    assert status == 200 and body == JS.read_bytes()
    assert headers["Content-Type"] == "text/javascript; charset=utf-8"
    assert headers["Cache-Control"] == "public, max-age=300"
    etag = headers["ETag"]
    assert etag.startswith('"') and etag.endswith('"')
    # revalidation: the same ETag is a 304 with no body; HEAD has the headers and no body
    status, headers, body = await get(url, {"If-None-Match": etag})
    assert (status, body, headers["ETag"]) == (304, b"", etag)
    status, headers, body = await get(url, {"If-None-Match": '"something else"'})
    assert status == 200 and body == JS.read_bytes()
    status, headers, body = await get(url, method="HEAD")
    assert (status, body, headers["Content-Length"]) == (200, b"", str(JS.stat().st_size))


async def test_the_demo_page_moves_to_another_node_when_its_node_is_killed(tmp_path: Path) -> None:
    env = {"FANOUT_URL": REDIS, "FANOUT_NAMESPACE": unique_namespace(), "FANOUT_PRESENCE": "lobby"}
    node_a = start_node(tmp_path, {**env, "FANOUT_NODE_ID": "node-a"}, app=DEMO)
    node_b = start_node(tmp_path, {**env, "FANOUT_NODE_ID": "node-b"}, app=DEMO)
    # served by node-b, the page is told of both nodes and connects to the first, node-a
    nodes = f"ws://127.0.0.1:{node_a.port}/,ws://127.0.0.1:{node_b.port}/"
    async with browser_page(tmp_path / "profile", f"http://127.0.0.1:{node_b.port}/?nodes={nodes}") as page:
        status = await page.wait_text("status", "connected as node-a.")
        assert await page.evaluate("fanoutClient.clientId") == status.removeprefix("connected as ")
        await page.wait_text("node", "node: node-a, backend: redis")

        # a chat line crosses nodes, both ways
        ann, _ = await demo_client(node_b.port, "ann")
        await page.wait_text("online", "ann")
        await ann.send(orjson.dumps({"text": "before", "name": "ann"}).decode())
        await page.wait_text("log", "ann @node-b: before")
        await page.evaluate(
            "document.getElementById('text').value = 'from the page';"
            "document.getElementById('form').requestSubmit()"
        )
        while (said := orjson.loads(await recv(ann))).get("text") != "from the page":
            pass  # ann's own line, presence
        assert (said["type"], said["node"]) == ("chat", "node-a")

        # SIGKILL the page's node: no close frame, the TCP connection just ends (1006)
        node_a.kill()
        loop = asyncio.get_running_loop()
        killed = loop.time()
        await page.wait_text("status", "connected as node-b.", timeout=5)
        assert loop.time() - killed < scaled(5)
        await page.wait_text("node", "node: node-b, backend: redis")
        await ann.send(orjson.dumps({"text": "after", "name": "ann"}).decode())
        await page.wait_text("log", "ann @node-b: after")
        await ann.close()
    assert node_b.terminate() == 0


async def test_close_codes_decide_whether_the_client_comes_back(tmp_path: Path) -> None:
    env = {"FANOUT_URL": REDIS, "FANOUT_NAMESPACE": unique_namespace(), "FANOUT_NODE_ID": "solo"}
    node = start_node(tmp_path, env, app=DEMO)
    async with (
        browser_page(tmp_path / "profile", f"http://127.0.0.1:{node.port}/") as page,
        ServerUtil(REDIS, namespace=env["FANOUT_NAMESPACE"], heartbeat_interval=0.5) as util,
    ):
        await page.wait_text("status", "connected as solo.")
        # the policy and the backoff, as the module exports them
        policy = await page.evaluate(
            "import('/fanout.js').then(m => [1000, 1001, 1006, 1008, 1011, 1012, 1013, 3000, 4000, 4001,"
            " 4999].map(m.shouldReconnect))"
        )
        assert policy == [False, True, True, False, True, True, True, True, False, False, False]
        delays = await page.evaluate(
            "import('/fanout.js').then(m => [0, 1, 2, 5, 30].map(n => m.backoff(n, 500, 10000, () => 1))"
            ".concat([m.backoff(3, 500, 10000, () => 0), m.backoff(3, 500, 10000, () => 0.5)]))"
        )
        assert delays == [500, 1000, 2000, 10000, 10000, 0, 2000]  # full jitter: [0, capped 2^n * base]

        # 1012 (service restart): the page comes back, with a new client id
        first = await page.evaluate("fanoutClient.clientId")
        assert await util.close(first, code=1012, reason="restart") == 1
        second = await wait_for(page, f"fanoutClient.clientId !== {first!r} && fanoutClient.clientId")
        assert await page.evaluate("fanoutClient.closeCode") == 1012
        await page.wait_text("status", "connected as " + second)

        # 4001 (an application code): it does not
        assert await util.close(second, code=4001, reason="banned") == 1
        await page.wait_text("status", "closed (4001 banned), not reconnecting")
        await asyncio.sleep(scaled(1))
        assert await page.evaluate("fanoutClient.state") == "closed"
        assert await util.get_group_client_ids("lobby") == []

        # a client of its own: a refused URL first (the next one is tried), a fresh token per attempt,
        # and close() for good
        with refused_port() as dead:
            await page.evaluate(
                f"""import('/fanout.js').then(m => new Promise((resolve) => {{
                  window.tokenCalls = 0;
                  window.own = m.connect(['ws://127.0.0.1:{dead}/', '/'], {{
                    minDelay: 50,
                    getToken: async () => {{
                      window.tokenCalls += 1;
                      return (await (await fetch('/demo/token?name=zed')).json()).token;
                    }},
                    onWelcome: () => resolve(true),
                  }});
                }}))"""
            )
        own: dict[str, Any] = await page.evaluate(
            "({id: own.clientId, node: own.nodeId, url: own.url, tokens: tokenCalls, failures: own.failures})"
        )
        assert own["node"] == "solo" and own["url"] == "/" and own["tokens"] == 2 and own["failures"] == 1
        assert await util.get_group_client_ids("lobby") == [own["id"]]
        await page.evaluate("own.close()")
        await asyncio.sleep(scaled(0.5))
        assert await page.evaluate("own.state") == "closed"
        assert await util.get_group_client_ids("lobby") == []
    assert node.terminate() == 0
