"""The shape of a node application and how the node meets it: where ``--app`` is imported from and what
a failure says, misspelt hooks and a missing ``on_connect`` at start, plain ``def`` hooks, the page at ``/``,
and what ``fanout-node`` tells at start and in ``--help``."""

from __future__ import annotations

import asyncio
from pathlib import Path

from fanout import Admit
from fanout.admission import ConnectRequest
from node import Connection
from tests.conftest import MakeNode
from tests.support.nodes import client, http_get, recv, run_module, start_node, unique_namespace
from tests.support.workers import wait_until

MEMORY = {"FANOUT_BACKEND": "memory"}


def test_an_app_that_cannot_be_imported_is_named_with_its_folder_and_a_hint(tmp_path: Path) -> None:
    (tmp_path / "broken.py").write_text("import no_such_dependency\n\nclass App: ...\n")
    for module, args in (("node", ()), ("fanout", ("worker",))):
        missing = run_module(module, *args, "--app", "mychat.events:Events", "--app-dir", str(tmp_path))
        assert missing.returncode == 2, missing.stderr
        (line,) = missing.stderr.strip().splitlines()
        assert "cannot import 'mychat.events'" in line and "no module 'mychat'" in line, line
        assert str(tmp_path) in line and "--app-dir" in line and "mychat/" in line, line
        # the app is found, an import inside it fails: that one is named, not the folder
        inner = run_module(module, *args, "--app", "broken:App", "--app-dir", str(tmp_path))
        assert inner.returncode == 2, inner.stderr
        (line,) = inner.stderr.strip().splitlines()
        assert "importing 'broken' failed: No module named 'no_such_dependency'" in line, line


def test_misspelt_hooks_and_a_missing_on_connect_are_reported_at_start(tmp_path: Path) -> None:
    (tmp_path / "typo.py").write_text(
        "class Events:\n"
        "    async def on_conect(self, request):\n"
        "        return None\n\n"
        "    async def on_mesage(self, conn, data):\n"
        "        pass\n\n"
        "    async def on_open(self, conn):\n"
        "        pass\n"
    )
    node = start_node(tmp_path, MEMORY, app="typo:Events", extra_args=["--app-dir", str(tmp_path)])
    log = node.log()
    assert "on_conect is not a node hook and is never called — did you mean on_connect?" in log, log
    assert "on_mesage is not a node hook and is never called — did you mean on_message?" in log, log
    assert "no on_connect: every client is admitted as a guest" in log, log
    assert "on_open" not in log
    assert node.terminate() == 0


class PlainHooks:
    """Every hook a plain ``def``, as a worker's handlers may be."""

    def __init__(self) -> None:
        self.messages: list[str | bytes] = []
        self.closed: list[str] = []

    def on_connect(self, request: ConnectRequest) -> Admit:
        return Admit(flag="user-1", groups=["room"], session={"name": request.query.get("name", "")})

    def on_open(self, conn: Connection) -> object:
        return conn.send({"type": "hello", "name": conn.session["name"]})  # awaited by the node

    def on_message(self, conn: Connection, data: str | bytes) -> None:
        self.messages.append(data)

    def on_close(self, conn: Connection) -> None:
        self.closed.append(conn.client_id)


async def test_plain_def_hooks_run_on_the_node(make_node: MakeNode) -> None:
    app = PlainHooks()
    node = await make_node(app=app)
    ws, client_id = await client(node.port, "/?name=ann")
    assert await recv(ws) == '{"type":"hello","name":"ann"}'
    assert await node.util.send_to_group("room", "to the room", ack=True) == 1  # Admit applied
    assert await recv(ws) == "to the room"
    await ws.send("said")
    await ws.close()
    for _ in range(100):
        if app.closed:
            break
        await asyncio.sleep(0.05)
    assert app.messages == ["said"] and app.closed == [client_id]
    assert node.metrics.app_errors == 0


def test_a_node_with_its_own_app_serves_a_status_page_not_the_demo(tmp_path: Path) -> None:
    env = {**MEMORY, "FANOUT_NODE_ID": "status-1"}
    node = start_node(tmp_path, env, app="tests.apps.control:app")
    status, page = http_get(node.port, "/")
    assert status == 200 and "<h1>fanout node</h1>" in page and "status-1" in page, page
    assert "demo chat" not in page
    demo = start_node(tmp_path, MEMORY, app="node.app:DemoChat")
    status, page = http_get(demo.port, "/")
    assert status == 200 and "<title>fanout demo chat</title>" in page
    # the start-up line gives the page's address
    assert f"on http://127.0.0.1:{node.port}/ " in node.log(), node.log()
    assert node.terminate() == 0 and demo.terminate() == 0


def test_help_lists_the_variables_and_url_names_the_broker(tmp_path: Path) -> None:
    helped = run_module("node", "--help")
    assert helped.returncode == 0
    for text in ("--url", "--app-dir", "FANOUT_URL", "FANOUT_NAMESPACE", "FANOUT_SECRET", "FANOUT_APP"):
        assert text in helped.stdout, text
    for text in ("FANOUT_PRESENCE", "FANOUT_EVENTS", "FANOUT_API_KEY", "FANOUT_LOG_LEVEL"):
        assert text in helped.stdout, text
    env = {"FANOUT_NAMESPACE": unique_namespace()}
    node = start_node(tmp_path, env, extra_args=["--url", "redis://127.0.0.1:6379/0"])
    wait_until(lambda: "(websocket" in node.log(), 10, "the start-up line")
    assert "redis, routing mode)" in node.log(), node.log()
    assert node.terminate() == 0
