"""Idempotent sends on real brokers and node processes: the same ``idempotency_key`` twice - from a second
ServerUtil, from another process (the CLI), through the HTTP API's header - reaches each connection once, is
appended to history once, and the repeat returns the first's ``ack`` count. On Redis, Redis Cluster (a
local one) and RabbitMQ with and without FANOUT_HISTORY_URL. The pure parts are in tests/test_idempotency.py.
"""

from __future__ import annotations

import asyncio
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from redis.crc import key_slot
from websockets.asyncio.client import ClientConnection

from fanout import routing
from fanout.backends.store import StoredSend
from fanout.commands import Send, Target
from fanout.history import new_send_id
from tests.support import scaled
from tests.support.continuity import AMQP, REDIS, STREAMS, forgetting, node_env, publisher
from tests.support.nodes import client, nothing_more, run_module, start_node
from tests.support.redis_servers import RedisCluster, start_cluster


@pytest.fixture(autouse=True)
def _clean_shared_redis() -> Iterator[None]:
    yield from forgetting()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisCluster]:
    started = start_cluster(tmp_path_factory.mktemp("idem-cluster"))
    yield started
    started.stop()


async def _frames(ws: ClientConnection) -> list[str | bytes]:
    """Everything the client received until a quiet 0.5 s."""
    frames: list[str | bytes] = []
    while True:
        try:
            frames.append(await asyncio.wait_for(ws.recv(), 0.5))
        except TimeoutError:
            return frames


async def _scenario(tmp_path: Path, env: dict[str, str], *, history: bool, other_group: str = "") -> None:
    """Two clients (ann, bob) in g and h-1 (and ``other_group``) of one node; each keyed send twice."""
    node = start_node(tmp_path, env, app=STREAMS)
    groups = ",".join(filter(None, ["g", "h-1", other_group]))
    (ann, ann_id), (bob, bob_id) = [
        await client(node.port, f"/?user={u}&groups={groups}") for u in ("ann", "bob")
    ]
    async with publisher(env) as util, publisher(env) as other:
        # a plain send: repeated by a second ServerUtil, then by another process (the CLI)
        assert await util.send_to_group("g", "plain", ack=True, idempotency_key="k-plain") == 2
        assert await other.send_to_group("g", "plain", ack=True, idempotency_key="k-plain") == 2
        cli = await asyncio.to_thread(  # (not blocking the loop: the publishers keep hearing the node)
            run_module,
            "fanout",
            "send-to-group",
            "g",
            "plain",
            "--ack",
            "--idempotency-key",
            "k-plain",
            env=env,
        )
        assert (cli.returncode, cli.stdout.strip()) == (0, "2"), cli.stderr
        # the repeat without ack returns None, and a different key is a new send
        assert await other.send_to_group("g", "plain", idempotency_key="k-plain") is None
        assert await util.send(ann_id, "own", idempotency_key="k-own") is None
        assert await other.send(ann_id, "own", ack=True, idempotency_key="k-own") == 1
        # at the same moment, from two publishers (and twice from one): delivered once, the count to each
        senders = (util, other, util)
        calls = (sender.send_to_all("all", ack=True, idempotency_key="k-all") for sender in senders)
        assert await asyncio.gather(*calls) == [2, 2, 2]
        expected = {"ann": ["plain", "own", "all"], "bob": ["plain", "all"]}
        if history:
            assert await util.send_to_group("h-1", "kept", ack=True, idempotency_key="k-kept") == 2
            assert await other.send_to_group("h-1", "kept", ack=True, idempotency_key="k-kept") == 2
            assert await other.send_to_group("h-1", "kept", idempotency_key="k-kept") is None
            page = await util.get_history("group:h-1")
            assert [e["data"] for e in page["entries"]] == ["kept"]  # appended once
            # a history group and a plain one: on a cluster, a message outside the stream's slot
            for sender in (util, other):
                assert await sender.send_to_group(["h-1", "g"], "mixed", idempotency_key="k-mixed") is None
            expected = {name: [*frames, "kept", "mixed"] for name, frames in expected.items()}
            if other_group:  # streams in two cluster slots: the two-phase send
                targets = ["h-1", other_group]
                for sender in (util, other):
                    assert await sender.send_to_group(targets, "both", ack=True, idempotency_key="k-2") == 2
                for group in targets:
                    page = await util.get_history(f"group:{group}")
                    assert [e["data"] for e in page["entries"]][-1:] == ["both"]
                entries = (await util.get_history("group:h-1"))["entries"]
                assert [e["data"] for e in entries] == ["kept", "mixed", "both"]
                expected = {name: [*frames, "both"] for name, frames in expected.items()}
        # bulk: the key covers the whole call
        for sender in (util, other):
            await sender.send_bulk_by_flag(
                [("ann", "a1"), ("bob", "b1"), ("ann", "a2")], idempotency_key="k-b"
            )
            await sender.send_bulk([(bob_id, "b2")], idempotency_key="k-b2")
        expected["ann"] += ["a1", "a2"]
        expected["bob"] += ["b1", "b2"]
        assert await _frames(ann) == expected["ann"]
        assert await _frames(bob) == expected["bob"]
    for ws in (ann, bob):
        await ws.close()


@pytest.mark.parametrize("mode", ["routing", "fanout"])
async def test_redis(tmp_path: Path, mode: str) -> None:
    await _scenario(tmp_path, node_env(REDIS, FANOUT_MODE=mode), history=True)


@pytest.mark.parametrize("mode", ["routing", "fanout"])
async def test_redis_cluster(tmp_path: Path, cluster: RedisCluster, mode: str) -> None:
    """Routing mode: sharded channels, a history send in one slot claims its key in the send script, in
    two slots before and after its two phases. Fanout mode: the store appends, the backend publishes."""
    env = node_env(cluster.url, FANOUT_MODE=mode)
    await _scenario(tmp_path, env, history=True, other_group=_other_slot_group_of(env))


def _other_slot_group_of(env: dict[str, str]) -> str:
    namespace = env["FANOUT_NAMESPACE"]
    slot = key_slot(f"{namespace}:g:h-1".encode())
    return next(g for i in range(2, 100) if key_slot(f"{namespace}:g:{(g := f'h-{i}')}".encode()) != slot)


async def test_rabbitmq_with_a_history_store(tmp_path: Path) -> None:
    await _scenario(tmp_path, node_env(AMQP, FANOUT_HISTORY_URL=REDIS), history=True)


async def test_rabbitmq_alone_the_nodes_drop_repeats(tmp_path: Path) -> None:
    """No store (no FANOUT_HISTORY_URL): the key travels with the command and the node applies it once (its
    window's end is tests/test_idempotency.py's)."""
    await _scenario(tmp_path, node_env(AMQP, FANOUT_HISTORY=""), history=False)


def _post(port: int, path: str, body: dict[str, Any], key: str | None) -> tuple[int, Any]:
    headers = {"Authorization": "Bearer k3y", "Content-Type": "application/json"}
    if key is not None:
        headers["Idempotency-Key"] = key
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}", orjson.dumps(body), headers, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=scaled(10)) as answer:
            return answer.status, orjson.loads(answer.read())
    except urllib.error.HTTPError as error:
        return error.code, orjson.loads(error.read())


async def test_redis_window_ends_and_the_http_header(tmp_path: Path) -> None:
    env = node_env(REDIS, FANOUT_IDEMPOTENCY_WINDOW="2", FANOUT_API_KEY="k3y")
    node = start_node(tmp_path, env, app=STREAMS)
    ws, _ = await client(node.port, "/?groups=g,h-1")
    post = asyncio.to_thread
    body = {"groups": "h-1", "data": "by http", "ack": True}
    assert await post(_post, node.port, "/api/send_to_group", body, "http-1") == (200, {"result": 1})
    assert await post(_post, node.port, "/api/send_to_group", body, "http-1") == (200, {"result": 1})
    keyed = {**body, "idempotency_key": "http-1"}
    assert await post(_post, node.port, "/api/send_to_group", keyed, None) == (200, {"result": 1})
    status, answer = await post(_post, node.port, "/api/send_to_group", keyed, "http-2")
    assert status == 400 and "differ" in answer["error"]["message"]
    status, answer = await post(_post, node.port, "/api/send_to_group", {**body, "idempotency_key": ""}, None)
    assert status == 400 and "idempotency_key must be a string of 1 to 128" in answer["error"]["message"]
    status, answer = await post(_post, node.port, "/api/get_groups", {}, "http-3")
    assert status == 400 and "unknown field 'idempotency_key'" in answer["error"]["message"]
    async with publisher(env) as util:
        assert await util.send_to_group("g", "first", idempotency_key="window") is None
        assert await util.send_to_group("g", "first", idempotency_key="window") is None
        await asyncio.sleep(2.1)  # the window is over: the key is a new send
        assert await util.send_to_group("g", "second", ack=True, idempotency_key="window") == 1
        assert [e["data"] for e in (await util.get_history("group:h-1"))["entries"]] == ["by http"]
    assert await _frames(ws) == ["by http", "first", "second"]
    assert await nothing_more(ws)
    await ws.close()


@pytest.mark.parametrize("backend", ["redis", "rabbitmq"])
async def test_a_first_that_died_midway_is_completed_once(tmp_path: Path, backend: str) -> None:
    """The publisher that made the first send died before keeping its outcome (a plain send published with
    its key claimed), or before publishing it (a history send appended with its key): the retry, from
    another publisher, delivers each once and appends nothing more."""
    env = node_env(REDIS) if backend == "redis" else node_env(AMQP, FANOUT_HISTORY_URL=REDIS)
    node = start_node(tmp_path, env, app=STREAMS)
    conns = [await client(node.port, "/?groups=g,h-1") for _ in range(2)]
    async with publisher(env) as dead, publisher(env) as retry:
        command = Send(Target.groups("g"), b"plain", idempotency_key="k-plain")
        await dead._publish(routing.route(command, dead.settings.mode), key="k-plain")  # then it died
        assert await retry.send_to_group("g", "plain", ack=True, idempotency_key="k-plain") == 2
        store = await dead._history_store()
        await store.append(("group:h-1",), StoredSend(new_send_id(), b"kept", key="k-kept"))  # then it died
        assert await retry.send_to_group("h-1", "kept", ack=True, idempotency_key="k-kept") == 2
        assert await retry.send_to_group("h-1", "kept", ack=True, idempotency_key="k-kept") == 2
        assert [e["data"] for e in (await retry.get_history("group:h-1"))["entries"]] == ["kept"]
    for ws, _ in conns:
        assert await _frames(ws) == ["plain", "kept"]
        await ws.close()
