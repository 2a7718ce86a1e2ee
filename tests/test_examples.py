"""The worker examples run as documented: real node and worker processes on Redis, real clients."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import orjson

from tests.support.nodes import client, demo_client, recv, start_node, unique_namespace
from tests.support.workers import start_worker

REDIS = "redis://127.0.0.1:6379/0"


async def test_the_demo_chat_as_a_worker_app(tmp_path: Path) -> None:
    env = {"FANOUT_URL": REDIS, "FANOUT_NAMESPACE": unique_namespace(), "FANOUT_EVENTS": "open,message,close"}
    nodes = [
        start_node(tmp_path, {**env, "FANOUT_NODE_ID": f"chat{i}"}, app="examples.chat.node_app:app")
        for i in range(2)
    ]
    worker = start_worker(tmp_path, env, app="examples.chat.worker:Chat")
    try:
        ann, _ = await demo_client(nodes[0].port, "ann")
        assert orjson.loads(await recv(ann)) == {"type": "joined", "name": "ann"}
        bob, _ = await demo_client(nodes[1].port, "bob")
        assert orjson.loads(await recv(bob)) == {"type": "joined", "name": "bob"}
        assert orjson.loads(await recv(ann)) == {"type": "joined", "name": "bob"}
        await ann.send(orjson.dumps({"text": "hello across nodes"}).decode())
        for ws in (ann, bob):
            said = orjson.loads(await recv(ws))
            assert (said["type"], said["name"], said["node"], said["text"]) == (
                "chat",
                "ann",
                "chat0",
                "hello across nodes",
            )
        await bob.close()
        assert orjson.loads(await recv(ann)) == {"type": "left", "name": "bob"}
        await ann.close()
    finally:
        worker.terminate()
        for node in nodes:
            node.terminate()


async def test_the_orm_style_worker_with_plain_functions_and_blocking_calls(tmp_path: Path) -> None:
    database = tmp_path / "messages.sqlite3"
    env = {"FANOUT_URL": REDIS, "FANOUT_NAMESPACE": unique_namespace(), "FANOUT_EVENTS": "message"}
    node = start_node(tmp_path, env, app="tests.apps.quiet:app")
    worker = start_worker(
        tmp_path, {**env, "ORM_STYLE_DB": str(database)}, app="examples.orm_style.worker:Messages"
    )
    try:
        clients = [await client(node.port) for _ in range(3)]
        for i in range(5):
            for ws, _ in clients:
                await ws.send(f"note {i}")
        for ws, _ in clients:
            answers = [orjson.loads(await recv(ws)) for _ in range(5)]
            assert answers == [{"saved": f"note {i}", "count": i + 1} for i in range(5)]
        rows = await asyncio.get_running_loop().run_in_executor(
            None, lambda: sqlite3.connect(database).execute("select count(*) from message").fetchone()[0]
        )
        assert rows == 15
        for ws, _ in clients:
            await ws.close()
    finally:
        assert worker.terminate() == 0
        node.terminate()
