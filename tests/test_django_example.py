"""The Django + Celery example (examples/django/, docs/django.md) runs for real, as the guide tells a user to.

A node process runs the example's node app (chat_node.py) on Redis; Django runs as ``manage.py runserver``;
a Celery worker (``celery -A pushsite worker --pool=solo``) takes tasks from a queue of its own on Redis.
The websocket clients do what the example page does in a browser: log in, get a token from Django's
``/token``, connect to the node with it, and receive what ``POST /notify/<user>`` and the Celery task push.
"""

from __future__ import annotations

import asyncio
import re
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import orjson
import psycopg
import pytest
import redis
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from fanout import tokens
from tests.support import free_port, scaled
from tests.support.django_site import EXAMPLE, Browser, Process, spawn
from tests.support.nodes import ROOT, NodeProcess, nothing_more, recv, start_node, unique_namespace
from tests.support.outbox import DSN

FANOUT_URL = "redis://127.0.0.1:6379/0"
CELERY_DB = 9  # Celery's broker keys, all under a prefix of this run, deleted at the end


@dataclass
class Stack:
    node: NodeProcess
    django: Process
    worker: Process
    relay: Process
    key: str
    port: int
    env: dict[str, str]

    def logs(self) -> str:
        logs = [self.django.log(), self.worker.log(), self.relay.log()]
        return "\n".join([f"--- node ---\n{self.node.log()}", *logs])


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp_path = tmp_path_factory.mktemp("django")
    namespace = unique_namespace("dj")
    key = secrets.token_urlsafe(32)  # PUSH_TOKEN_KEY: Django signs with it, the node verifies with it
    prefix = f"{namespace}:"
    node = start_node(
        tmp_path,
        {
            "FANOUT_URL": FANOUT_URL,
            "FANOUT_NAMESPACE": namespace,
            "PUSH_TOKEN_KEY": key,
            "PYTHONPATH": str(EXAMPLE),
        },
        app="chat_node:app",
        wait=False,
    )
    env = {
        "FANOUT_URL": FANOUT_URL,
        "FANOUT_NAMESPACE": namespace,
        "PUSH_WEBSOCKET_URL": f"ws://127.0.0.1:{node.port}/",
        "PUSH_TOKEN_KEY": key,
        "CELERY_BROKER_URL": f"redis://127.0.0.1:6379/{CELERY_DB}",
        "CELERY_QUEUE": f"{namespace}-push",
        "CELERY_KEY_PREFIX": prefix,
    }
    schema = f"dj_{namespace}"
    env.update({"PUSH_DB_NAME": "test", "PUSH_DB_SCHEMA": schema})  # PostgreSQL for the outbox
    with psycopg.connect(DSN, autocommit=True) as db:
        db.execute(f"CREATE SCHEMA {schema}")
    port = free_port()
    started: list[Process] = []
    try:
        migrate = spawn("migrate", [sys.executable, "manage.py", "migrate", "--no-input"], env, tmp_path)
        assert migrate.proc.wait(scaled(60)) == 0, migrate.log()
        relay = spawn("relay", [sys.executable, "manage.py", "fanout_relay"], env, tmp_path)
        started.append(relay)
        django = spawn(
            "django",
            [sys.executable, "manage.py", "runserver", f"127.0.0.1:{port}", "--noreload"],
            env,
            tmp_path,
        )
        started.append(django)
        worker = spawn(
            "celery",
            [
                *(sys.executable, "-m", "celery", "-A", "pushsite", "worker"),
                *("--pool=solo", "--concurrency=1", "-Q", env["CELERY_QUEUE"], "--loglevel=INFO"),
                *("--without-gossip", "--without-mingle", "--without-heartbeat"),
            ],
            env,
            tmp_path,
        )
        started.append(worker)
        stack = Stack(node, django, worker, relay, key, port, env)
        node.wait_healthy()
        deadline = time.monotonic() + scaled(20)
        while True:
            assert all(p.proc.poll() is None for p in (django, worker, relay)), stack.logs()
            try:
                if Browser(port).request("GET", "/")[0] == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, stack.logs()
            time.sleep(0.1)
        yield stack
    finally:
        try:
            for process in reversed(started):
                process.stop()
            try:
                node.terminate()
            except subprocess.TimeoutExpired:
                node.kill()
        finally:
            with psycopg.connect(DSN, autocommit=True) as db:
                db.execute(f"DROP SCHEMA {schema} CASCADE")
            broker = redis.Redis(host="127.0.0.1", port=6379, db=CELERY_DB)
            try:
                left = list(broker.scan_iter(match=prefix + "*"))  # the queue, its binding, unacked...
                if left:
                    broker.delete(*left)
            finally:
                broker.close()


async def test_a_django_view_pushes_to_the_users_websocket(stack: Stack) -> None:
    ann, bob = Browser(stack.port), Browser(stack.port)
    await ann.login("ann")
    await bob.login("bob")
    ann_ws, _ = await ann.connect()
    bob_ws, _ = await bob.connect()
    try:
        status, answer = await bob.post("/notify/ann", {"text": "lunch?"})
        assert (status, answer) == (202, {"queued": True}), stack.logs()  # through the outbox
        assert orjson.loads(await recv(ann_ws)) == {"type": "notification", "from": "bob", "text": "lunch?"}
        assert await nothing_more(bob_ws)
        # a second tab of ann's gets her notifications too
        ann_tab, _ = await ann.connect()
        assert await ann.post("/notify/ann", {"text": "two tabs"}) == (202, {"queued": True})
        for ws in (ann_ws, ann_tab):
            assert orjson.loads(await recv(ws)) == {"type": "notification", "from": "ann", "text": "two tabs"}
        await ann_tab.close()
        assert await bob.post("/notify/nobody", {"text": "?"}) == (202, {"queued": True})
    finally:
        await ann_ws.close()
        await bob_ws.close()


async def test_a_celery_task_broadcasts_to_everyone(stack: Stack) -> None:
    ann, bob = Browser(stack.port), Browser(stack.port)
    await ann.login("ann")
    await bob.login("bob")
    clients = [(await ann.connect())[0], (await bob.connect())[0]]
    try:
        # the view calls broadcast.delay(); the worker process runs it and pushes with SyncServerUtil
        assert await ann.post("/announce", {"text": "deploy at 5"}) == (202, {"queued": True})
        for ws in clients:
            try:
                frame = await recv(ws, timeout=20)
            except TimeoutError:
                raise AssertionError(stack.logs()) from None
            assert orjson.loads(frame) == {"type": "announcement", "text": "deploy at 5"}
        assert "push.tasks.broadcast" in stack.worker.log_path.read_text(errors="replace")
    finally:
        for ws in clients:
            await ws.close()


async def django_shell(stack: Stack, tmp_path: Path, code: str) -> str:
    """``python manage.py shell -c CODE`` in examples/django/; what it printed."""
    shell = spawn(
        f"shell-{time.monotonic_ns()}",
        [sys.executable, "manage.py", "shell", "-c", code],
        stack.env,
        tmp_path,
    )
    try:
        assert await asyncio.to_thread(shell.proc.wait, scaled(20)) == 0, shell.log()
    finally:
        shell.stop()
    return shell.log_path.read_text(errors="replace").strip()


async def test_the_publisher_and_the_task_from_a_django_shell(stack: Stack, tmp_path: Path) -> None:
    """docs/django.md's one-liners: the project's SyncServerUtil and the task, from ``manage.py shell``."""
    ann = Browser(stack.port)
    await ann.login("ann")
    ws, _ = await ann.connect()
    try:
        said = await django_shell(
            stack,
            tmp_path,
            "from push.realtime import util; print(util.send_by_flag('ann', 'hi ann', ack=True))",
        )
        assert said.splitlines()[-1] == "1", said  # ack=True: connections reached
        await django_shell(stack, tmp_path, "from push.tasks import broadcast; broadcast.delay('hi all')")
        assert await recv(ws) == "hi ann"
        assert orjson.loads(await recv(ws, timeout=20)) == {"type": "announcement", "text": "hi all"}
    finally:
        await ws.close()


async def refused(url: str) -> tuple[int, str]:
    with pytest.raises(InvalidStatus) as refusal:
        await connect(url)
    response = refusal.value.response
    return response.status_code, response.body.decode(errors="replace")


async def test_the_node_refuses_tokens_django_did_not_issue(stack: Stack) -> None:
    ws_url = f"ws://127.0.0.1:{stack.node.port}/"
    status, body = await refused(ws_url)  # no token
    assert status == 401, body
    forged = tokens.issue("another key", "ann")  # signed, but not with PUSH_TOKEN_KEY
    status, body = await refused(ws_url + "?token=" + forged)
    assert (status, "signature" in body) == (401, True), body
    expired = tokens.issue(stack.key, "ann", ttl=60, now=time.time() - 3600)
    status, body = await refused(ws_url + "?token=" + expired)
    assert (status, "expired" in body) == (401, True), body

    stranger = Browser(stack.port)
    assert (await stranger.get("/token"))[0] == 403  # not logged in: no token
    await stranger.get("/")
    assert (await stranger.post("/notify/ann", {"text": "spam"}))[0] == 403
    no_csrf = Browser(stack.port)
    assert (await no_csrf.post("/login", {"user": "ann"}))[0] == 403  # Django's CSRF protection stays on


def test_the_snippets_in_docs_django_md_are_the_example_s_code() -> None:
    guide = (ROOT / "docs" / "django.md").read_text()
    snippets = re.findall(r"```python\n# (examples/django/\S+)\n(.*?)```", guide, flags=re.S)
    assert len(snippets) >= 5
    for path, code in snippets:
        assert code in (ROOT / path).read_text(), f"docs/django.md's snippet of {path} is not in the file"
    for command in ("python -m fanout_node --app chat_node:app", "celery -A pushsite worker --pool=solo"):
        assert command in guide


async def test_the_example_page_in_a_browser(stack: Stack, tmp_path: Path) -> None:
    """docs/django.md's last step, in headless Chromium: log in on Django's page, which connects to the
    node with Django's token; its notify form pushes to the tab through the view, its announce form
    through the Celery task."""
    from tests.test_demo_page import open_page

    browser, page = await open_page(tmp_path / "profile", f"http://127.0.0.1:{stack.port}/")
    try:
        await page.wait_text("login", "log in")
        await page.evaluate(
            "document.querySelector('#login input[name=user]').value = 'carol';"
            "document.getElementById('login').requestSubmit()"
        )
        await page.wait_text("state", "connected to ws://", timeout=10)
        await page.evaluate(
            "document.querySelector('#notify input[name=text]').value = 'from the browser';"
            "document.getElementById('notify').requestSubmit()"
        )
        await page.wait_text("log", '{"type":"notification","from":"carol","text":"from the browser"}')
        log = await page.wait_text("log", "POST /notify → ")
        assert re.search(r'POST /notify → \{"queued": ?true\}', log), log  # the view's answer
        await page.evaluate(
            "document.querySelector('#announce input[name=text]').value = 'via celery';"
            "document.getElementById('announce').requestSubmit()"
        )
        await page.wait_text("log", '{"type":"announcement","text":"via celery"}', timeout=10)
    finally:
        await page.devtools.close()
        browser.terminate()
        await browser.wait()
