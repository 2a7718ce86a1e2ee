"""The demo chat page in a real (headless) browser: a message said on one node shows on another's page.

Chromium is driven over the DevTools protocol (a websocket), so the test reads the page's text in real
time instead of guessing when to take a snapshot.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import shutil
import urllib.request
from pathlib import Path
from typing import Any

import orjson
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidStatus

from fanout import ServerUtil, tokens
from tests.support import scaled
from tests.support.nodes import client, demo_client, demo_token, start_node, unique_namespace

DEMO = "node.app:DemoChat"

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",  # this machine has no network: keep Chromium from trying
    "--disable-component-update",
    "--disable-sync",
    "--remote-debugging-port=0",
]


class Page:
    """One browser tab, through the DevTools protocol."""

    def __init__(self, devtools: ClientConnection) -> None:
        self.devtools = devtools
        self.ids = itertools.count(1)

    async def evaluate(self, expression: str) -> Any:
        call_id = next(self.ids)
        await self.devtools.send(
            json.dumps(
                {
                    "id": call_id,
                    "method": "Runtime.evaluate",
                    # a promise (an import(), a fetch) is awaited: its value is the answer
                    "params": {"expression": expression, "returnByValue": True, "awaitPromise": True},
                }
            )
        )
        while True:
            answer = json.loads(await self.devtools.recv())
            if answer.get("id") == call_id:
                if "exceptionDetails" in answer["result"]:
                    raise AssertionError(f"{expression}: {answer['result']['exceptionDetails']}")
                return answer["result"]["result"].get("value")

    async def text(self, element_id: str) -> str:
        return str(await self.evaluate(f"document.getElementById({element_id!r})?.innerText") or "")

    async def wait_text(self, element_id: str, wanted: str, timeout: float = 5.0) -> str:
        """The element's text once it contains ``wanted`` (AssertionError with the last text if never)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + scaled(timeout)
        while True:
            text = await self.text(element_id)
            if wanted in text or loop.time() > deadline:
                assert wanted in text, f"#{element_id}: {text!r}, not {wanted!r}"
                return text
            await asyncio.sleep(0.05)


def _targets(port: int) -> list[dict[str, Any]]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=scaled(5)) as response:
        targets: list[dict[str, Any]] = json.load(response)
    return targets


async def open_page(profile: Path, url: str) -> tuple[asyncio.subprocess.Process, Page]:
    chromium = shutil.which("chromium")
    assert chromium, "scripts/test.sh installs chromium"
    browser = await asyncio.create_subprocess_exec(
        chromium,
        *CHROMIUM_FLAGS,
        f"--user-data-dir={profile}",
        url,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    port_file = profile / "DevToolsActivePort"
    for _ in range(200):
        if port_file.exists() and port_file.read_text().strip():
            break
        await asyncio.sleep(0.05)
    port = int(port_file.read_text().split()[0])
    targets = await asyncio.get_running_loop().run_in_executor(None, _targets, port)
    page = next(t for t in targets if t["type"] == "page")
    return browser, Page(await connect(page["webSocketDebuggerUrl"], max_size=None))


async def test_the_demo_admits_only_clients_with_a_valid_token(tmp_path: Path) -> None:
    env = {"FANOUT_URL": "redis://127.0.0.1:6379/0", "FANOUT_NAMESPACE": unique_namespace()}
    node = start_node(tmp_path, {**env, "FANOUT_NODE_ID": "node-a"}, app=DEMO)
    for path in ("/", "/?token=", "/?token=a.b.c", "/?token=" + tokens.issue("another key", "ann")):
        with pytest.raises(InvalidStatus) as refused:
            await client(node.port, path)
        assert refused.value.response.status_code == 401
    expired = tokens.issue("fanout-demo-key", "ann", ttl=-10)
    with pytest.raises(InvalidStatus) as refused:
        await client(node.port, "/?token=" + expired)
    assert refused.value.response.status_code == 401 and b"expired" in refused.value.response.body
    issued = await asyncio.get_running_loop().run_in_executor(None, demo_token, node.port, "ann")
    ws, client_id = await client(node.port, "/?token=" + issued["token"])
    async with ServerUtil(
        env["FANOUT_URL"], namespace=env["FANOUT_NAMESPACE"], heartbeat_interval=0.5
    ) as util:
        # admitted with the token's user as its flag, in the lobby, its name in its session
        assert await util.get_flag(client_id) == issued["flag"]
        assert await util.get_group_client_ids("lobby") == [client_id]
        assert await util.get_session(client_id) == {"name": "ann"}
    await ws.close()
    assert node.terminate() == 0


async def test_the_demo_page_shows_chat_from_another_node(tmp_path: Path) -> None:
    env = {
        "FANOUT_URL": "redis://127.0.0.1:6379/0",
        "FANOUT_NAMESPACE": unique_namespace(),
        "FANOUT_PRESENCE": "lobby",
        "FANOUT_PRESENCE_DEBOUNCE": "0.5",
    }
    node_a = start_node(tmp_path, {**env, "FANOUT_NODE_ID": "node-a"}, app=DEMO)
    node_b = start_node(tmp_path, {**env, "FANOUT_NODE_ID": "node-b"}, app=DEMO)
    browser, page = await open_page(tmp_path / "profile", f"http://127.0.0.1:{node_b.port}/")
    try:
        # the welcome frame, shown by the page
        status = await page.wait_text("status", "connected as ")
        assert status.startswith("connected as node-b."), status
        # the node it is on (from the client id) and the backend (from the demo's "online" frame)
        await page.wait_text("node", "node: node-b, backend: redis")

        ws, _ = await demo_client(node_a.port, "ann")  # admitted into the lobby with a token
        await page.wait_text("online", "ann")  # the page shows who is online: ann came in on the other node
        await ws.send(orjson.dumps({"text": "hello from node-a", "name": "ann"}).decode())
        await page.wait_text("log", "ann @node-a: hello from node-a")

        # and the other way: the page's own form sends to everyone, on every node
        await page.evaluate(
            "document.getElementById('name').value = 'bob';"
            "document.getElementById('text').value = 'hi from the browser';"
            "document.getElementById('form').requestSubmit()"
        )
        while True:
            said = orjson.loads(await asyncio.wait_for(ws.recv(), scaled(5)))
            if said.get("text") == "hi from the browser":
                break
        assert (said["type"], said["name"], said["node"]) == ("chat", "bob", "node-b")
        await ws.close()
    finally:
        await page.devtools.close()
        browser.terminate()
        await browser.wait()
    assert node_a.terminate() == 0 and node_b.terminate() == 0
