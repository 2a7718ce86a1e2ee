"""Issue 18's end to end: from a database commit to every browser tab, through everything that can fail.

The Django example (examples/django/) commits notifications through its view (``POST /notify/<user>``,
``fanout.django.outbox`` in ``transaction.atomic()``) while, at the same time, a node is SIGKILLed, Redis
(with persistence) is killed and started again, a relay is SIGKILLed (and another started) and clients'
sockets are aborted. Two relays (``manage.py fanout_relay``), two nodes (the example's ``chat_node``), and
fanout.client.Client tabs (``fanout.v1``, resuming on the other node) that get their tokens from Django. At
the end every tab has exactly the notifications of every committed request for its user, once, in order.
"""

from __future__ import annotations

import asyncio
import secrets
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from fanout.client import Client
from tests.support import free_port, scaled
from tests.support.continuity import until
from tests.support.django_site import EXAMPLE, Browser, Process, spawn
from tests.support.nodes import http_get, start_node, unique_namespace
from tests.support.outbox import DSN
from tests.support.redis_servers import start_redis

USERS = [f"u{i}" for i in range(8)]
TABS = 2  # per user
NOTIFICATIONS = 40  # per user


@pytest.fixture
def schema() -> Iterator[str]:
    name = f"e2e_{secrets.token_hex(5)}"
    with psycopg.connect(DSN, autocommit=True) as db:
        db.execute(f"CREATE SCHEMA {name}")
    try:
        yield name
    finally:
        with psycopg.connect(DSN, autocommit=True) as db:
            db.execute(f"DROP SCHEMA {name} CASCADE")


def pending(schema: str) -> int:
    with psycopg.connect(DSN, autocommit=True) as db:
        row = db.execute(f"SELECT count(*) FROM {schema}.fanout_outbox").fetchone()
        return int(row[0]) if row else -1


def relay(tmp_path: Path, env: dict[str, str], name: str) -> tuple[Process, int]:
    port = free_port()
    command = [sys.executable, "manage.py", "fanout_relay", "--http", f"127.0.0.1:{port}"]
    return spawn(name, command, env, tmp_path), port


async def healthy(process: Process, port: int) -> None:
    def up() -> bool:
        assert process.proc.poll() is None, process.log()
        try:
            return http_get(port, "/healthz")[0] == 200
        except OSError:
            return False

    for _ in range(int(scaled(300))):
        if await asyncio.to_thread(up):
            return
        await asyncio.sleep(0.05)
    raise AssertionError(process.log())


async def test_every_committed_notification_reaches_every_tab_once_in_order_through_failures(
    tmp_path: Path, schema: str
) -> None:
    server = start_redis(tmp_path / "redis", "--appendonly", "yes", "--appendfsync", "always")
    namespace = unique_namespace("e2e")
    key = secrets.token_urlsafe(32)
    fanout = {
        "FANOUT_URL": server.url,
        "FANOUT_NAMESPACE": namespace,
        "FANOUT_HISTORY": "flag:*",
        "FANOUT_HISTORY_SIZE": "1000",
        "FANOUT_HEARTBEAT_INTERVAL": "0.5",
        "FANOUT_PUBLISH_TIMEOUT": "2",
    }
    node_env = {**fanout, "PUSH_TOKEN_KEY": key, "PYTHONPATH": str(EXAMPLE), "FANOUT_ACCEPT_RATE": "0"}
    a = start_node(tmp_path, {**node_env, "FANOUT_NODE_ID": "node-a"}, app="chat_node:app")
    b = start_node(tmp_path, {**node_env, "FANOUT_NODE_ID": "node-b"}, app="chat_node:app")
    env = {**fanout, "PUSH_TOKEN_KEY": key, "PUSH_DB_NAME": "test", "PUSH_DB_SCHEMA": schema}
    processes: list[Process] = []
    tabs: list[Client] = []
    got: dict[int, list[Any]] = {}
    readers: list[asyncio.Task[None]] = []
    try:
        migrate = spawn("migrate", [sys.executable, "manage.py", "migrate", "--no-input"], env, tmp_path)
        assert await asyncio.to_thread(migrate.proc.wait, scaled(60)) == 0, migrate.log()
        relays = [relay(tmp_path, env, "relay-1"), relay(tmp_path, env, "relay-2")]
        processes += [r for r, _ in relays]
        port = free_port()
        django = spawn(
            "django",
            [sys.executable, "manage.py", "runserver", f"127.0.0.1:{port}", "--noreload"],
            env,
            tmp_path,
        )
        processes.append(django)
        for process, http in relays:
            await healthy(process, http)
        for _ in range(int(scaled(400))):
            assert django.proc.poll() is None, django.log()
            try:
                if (await Browser(port).get("/"))[0] == 200:
                    break
            except OSError:
                await asyncio.sleep(0.05)
        users = {user: Browser(port) for user in USERS}
        for user, browser in users.items():
            await browser.login(user)

        def token_of(browser: Browser) -> Any:
            async def token(url: str) -> str:
                status, issued = await browser.get("/token")
                assert status == 200, issued
                return str(issued["token"])

            return token

        for i, user in enumerate(USERS):
            for tab in range(TABS):
                order = [a.port, b.port] if (i + tab) % 2 == 0 else [b.port, a.port]
                tabs.append(
                    Client(
                        [f"ws://127.0.0.1:{p}/" for p in order],
                        token=token_of(users[user]),
                        backoff=(0.05, 0.5),
                        open_timeout=scaled(20),
                    )
                )
        await asyncio.wait_for(asyncio.gather(*(t.connect() for t in tabs)), scaled(30))

        async def read(n: int) -> None:
            async for message in tabs[n]:
                got[n].append(message)

        for n in range(len(tabs)):
            got[n] = []
            readers.append(asyncio.create_task(read(n)))

        done = [0]

        async def notify(user: str) -> None:
            sender = Browser(port)
            await sender.login("sender")
            for n in range(1, NOTIFICATIONS + 1):  # one after the other: commit order is n's order
                status, answer = await sender.post(f"/notify/{user}", {"text": str(n)})
                assert (status, answer) == (202, {"queued": True}), answer
                done[0] += 1
                await asyncio.sleep(0.01)

        async def chaos() -> None:
            total = len(USERS) * NOTIFICATIONS
            await until(lambda: done[0] >= total * 0.15, 60, "the first notifications", 0.02)
            a.kill()  # SIGKILL: its tabs resume on node-b
            await until(lambda: done[0] >= total * 0.35, 60, "more notifications", 0.02)
            server.kill()  # Redis dies; it comes back with its append-only file
            await asyncio.sleep(0.3)
            await asyncio.to_thread(server.start)
            await until(lambda: done[0] >= total * 0.55, 60, "more notifications", 0.02)
            relays[0][0].proc.kill()  # SIGKILL a relay, start another
            relays.append(relay(tmp_path, env, "relay-3"))
            processes.append(relays[-1][0])
            await until(lambda: done[0] >= total * 0.75, 60, "more notifications", 0.02)
            for tab in tabs[::3]:  # the network drops under some tabs
                ws = tab._ws
                if ws is not None:
                    ws.transport.abort()

        await asyncio.gather(*(notify(user) for user in USERS), chaos())
        await until(lambda: pending(schema) == 0, 60, "every row published", 0.2)
        expected = [
            {"type": "notification", "from": "sender", "text": str(n)} for n in range(1, NOTIFICATIONS + 1)
        ]
        await until(
            lambda: all(len(messages) >= NOTIFICATIONS for messages in got.values()),
            60,
            "every delivery",
            0.2,
        )
        await asyncio.sleep(0.5)  # a duplicate would arrive meanwhile
        texts = {n: [m.get("text") if isinstance(m, dict) else m for m in got[n]] for n in got}
        wrong = [(n, tabs[n].connections, tabs[n].duplicates, texts[n]) for n in got if got[n] != expected]
        assert not wrong, f"{len(wrong)} tabs wrong: {wrong[:3]}"
        assert all(tab.node_id == "node-b" for tab in tabs)
        assert sum(tab.connections for tab in tabs) > len(tabs)  # tabs came back
    finally:
        for task in readers:
            task.cancel()
        await asyncio.gather(*(t.close() for t in tabs), return_exceptions=True)
        for process in reversed(processes):
            process.stop()
        b.kill()
        a.kill()
        server.stop()
