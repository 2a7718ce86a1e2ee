"""Business workers, for real: node and worker processes on Redis, Redis Cluster and RabbitMQ, real
websocket clients, workers and nodes killed, a broker cut off, no worker at all."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aio_pika
import orjson
import pytest
from websockets.asyncio.client import ClientConnection

import fanout
from fanout import ServerUtil, SyncServerUtil
from tests.apps.recording_worker import read_records
from tests.support import scaled
from tests.support.nodes import (
    NodeProcess,
    client,
    metrics,
    recv,
    run_module,
    start_node,
    unique_namespace,
)
from tests.support.redis_servers import RedisCluster, start_cluster, start_redis
from tests.support.tcp_proxy import ProxyProcess
from tests.support.workers import WorkerProcess, start_worker

REDIS = "redis://127.0.0.1:6379/0"
AMQP = "amqp://guest:guest@127.0.0.1:5672/"
BROKERS = ["redis", "rediscluster", "amqp"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisCluster]:
    redis_cluster = start_cluster(tmp_path_factory.mktemp("worker-cluster"))
    yield redis_cluster
    redis_cluster.stop()


def _url(broker: str, request: pytest.FixtureRequest) -> str:
    if broker == "redis":
        return REDIS
    if broker == "amqp":
        return AMQP
    redis_cluster: RedisCluster = request.getfixturevalue("cluster")
    return redis_cluster.url


@dataclass
class Tier:
    """Nodes and workers of one test, in one namespace, recording into ``records``."""

    tmp: Path
    url: str
    env: dict[str, str]
    records: Path
    nodes: list[NodeProcess] = field(default_factory=list)
    workers: list[WorkerProcess] = field(default_factory=list)

    def node(self, **env: str) -> NodeProcess:
        node = start_node(self.tmp, {**self.env, **env}, app="tests.apps.quiet:app")
        self.nodes.append(node)
        return node

    def worker(self, wait: bool = True, **env: str) -> WorkerProcess:
        worker = start_worker(
            self.tmp, {**self.env, "RECORDING_WORKER_DIR": str(self.records), **env}, wait=wait
        )
        self.workers.append(worker)
        return worker

    def handled(self) -> list[dict[str, Any]]:
        return read_records(self.records)

    async def stop(self) -> None:
        for process in [*self.workers, *self.nodes]:
            if process.proc.poll() is None:
                process.kill()
        if self.url.startswith("amqp"):
            await delete_amqp_event_tier(
                self.env["FANOUT_NAMESPACE"], int(self.env.get("FANOUT_EVENT_SHARDS", "16"))
            )


async def delete_amqp_event_tier(namespace: str, shards: int) -> None:
    """Durable queues outlive their test: delete the namespace's event queues, stream and exchange."""
    connection = await aio_pika.connect(AMQP)
    try:
        channel = await connection.channel()
        names = [f"{namespace}.ev.{k}" for k in range(shards)] + [
            f"{namespace}.ev.dead",
            f"{namespace}.ev.roster",
        ]
        for name in names:
            await channel.queue_delete(name)
        await channel.exchange_delete(f"{namespace}.ev")
    finally:
        await connection.close()


def _tier(tmp_path: Path, url: str, **env: str) -> Tier:
    records = tmp_path / "records"
    records.mkdir(exist_ok=True)
    base = {
        "FANOUT_URL": url,
        "FANOUT_NAMESPACE": unique_namespace("wk"),
        "FANOUT_EVENTS": "open,message,close",
        "FANOUT_ACCEPT_RATE": "0",
        "FANOUT_CLIENT_RATE": "0",
        # RabbitMQ keeps file handles per quorum queue: fewer shards keep the shared broker well within
        # its descriptor limit (and each test deletes its queues)
        **({"FANOUT_EVENT_SHARDS": "4"} if url.startswith("amqp") else {}),
        **env,
    }
    return Tier(tmp_path, url, base, records)


@pytest.fixture
async def make_tier(tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[Callable[..., Tier]]:
    """``make_tier(broker or URL, **env)``: a Tier whose processes (and RabbitMQ queues) go at the end."""
    made: list[Tier] = []

    def make(broker: str, **env: str) -> Tier:
        url = broker if "://" in broker else _url(broker, request)
        made.append(_tier(tmp_path, url, **env))
        return made[-1]

    yield make
    for tier in made:
        await tier.stop()


async def _until(check: Any, timeout: float, what: str) -> float:
    loop = asyncio.get_running_loop()
    started = loop.time()
    while loop.time() - started < scaled(timeout):
        if check():
            return loop.time() - started
        await asyncio.sleep(0.1)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def _first_handlings(records: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Per connection, the first handling of each of its events, in handling order."""
    seen: set[str] = set()
    out: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        if record.get("phase") == "start" or record["id"] in seen:
            continue
        seen.add(record["id"])
        out.setdefault(record["cid"], []).append(record)
    return out


def _check_order(per_connection: dict[str, list[dict[str, Any]]]) -> None:
    for cid, handled in per_connection.items():
        seqs = [r["seq"] for r in handled if r["reason"] != "node lost"]
        assert seqs == sorted(seqs), f"{cid}: events handled out of order: {seqs}"
        kinds = [r["kind"] for r in handled]
        assert kinds[0] == "open" and kinds[-1] == "close", f"{cid}: {kinds}"


# --------------------------------------------------------------------------- every event, once, in order


@pytest.mark.parametrize("broker", BROKERS)
async def test_every_event_handled_once_per_id_in_order(broker: str, make_tier: Callable[..., Tier]) -> None:
    """3 workers, 2 nodes, 1,000 connections sending 10 messages each."""
    tier = make_tier(broker)
    nodes = [tier.node(FANOUT_NODE_ID=f"n{i}") for i in range(2)]
    for _ in range(3):
        tier.worker()
    clients: list[tuple[ClientConnection, str]] = []
    for i in range(1000):
        clients.append(await client(nodes[i % 2].port))
    for round_ in range(10):
        for ws, _ in clients:
            await ws.send(f"m{round_}")
    for ws, _ in clients:
        await ws.close()
    expected = 1000 * 12
    took = await _until(lambda: len({r["id"] for r in tier.handled()}) >= expected, 120, "every event")
    records = tier.handled()
    per_connection = _first_handlings(records)
    assert len(per_connection) == 1000
    assert all(len(handled) == 12 for handled in per_connection.values())
    _check_order(per_connection)
    for handled in per_connection.values():
        assert [r.get("data") for r in handled[1:-1]] == [f"m{i}" for i in range(10)]
    duplicates = len(records) - expected
    workers = len({r["pid"] for r in records})
    print(f"{broker}: {expected} events in {took:.1f}s by {workers} workers; {duplicates} handled twice")


# --------------------------------------------------------------------------- a worker dies mid-handler


@pytest.mark.parametrize("broker", BROKERS)
async def test_a_worker_killed_mid_handler_gives_its_event_to_another(
    broker: str, make_tier: Callable[..., Tier]
) -> None:
    tier = make_tier(broker)
    node = tier.node()
    tier.worker()
    tier.worker()
    await asyncio.sleep(1.5)  # both own shards
    ws, _cid = await client(node.port)
    await ws.send("slow:8")
    await ws.send("after")
    started = await _until(
        lambda: [r for r in tier.handled() if r.get("phase") == "start"], 15, "the slow handler"
    )
    victim = next(r["pid"] for r in tier.handled() if r.get("phase") == "start")
    os.kill(victim, signal.SIGKILL)
    killed_at = time.monotonic()

    def redelivered() -> list[dict[str, Any]]:
        return [
            r for r in tier.handled() if r["pid"] != victim and r.get("phase") == "start" and r["redelivered"]
        ]

    await _until(redelivered, 20, "the slow event redelivered to the other worker")
    took = time.monotonic() - killed_at
    assert took < scaled(15), f"redelivered after {took:.1f}s"
    print(f"{broker}: redelivered {took:.1f}s after the kill ({started:.1f}s to start)")
    await ws.close()


# --------------------------------------------------------------------------- a node dies


@pytest.mark.parametrize("broker", BROKERS)
async def test_a_killed_node_gets_node_lost_closes_for_all_its_connections(
    broker: str, make_tier: Callable[..., Tier]
) -> None:
    tier = make_tier(broker)
    doomed = tier.node(FANOUT_NODE_ID="doomed")
    other = tier.node(FANOUT_NODE_ID="other")
    tier.worker()
    tier.worker()
    clients = [await client(doomed.port) for _ in range(20)]
    survivor, survivor_id = await client(other.port)
    doomed_ids = {cid for _, cid in clients}
    await _until(
        lambda: {r["cid"] for r in tier.handled() if r["kind"] == "open"} >= doomed_ids, 20, "the opens"
    )
    doomed.kill()
    killed_at = time.monotonic()

    def lost() -> set[str]:
        return {r["cid"] for r in tier.handled() if r["kind"] == "close" and r["reason"] == "node lost"}

    await _until(lambda: lost() >= doomed_ids, 20, "node-lost close events")
    took = time.monotonic() - killed_at
    assert took < 15, f"node-lost closes after {took:.1f}s"
    closes = [r for r in tier.handled() if r["kind"] == "close" and r["cid"] in doomed_ids]
    assert all(r["code"] == 1006 for r in closes)
    assert survivor_id not in lost()
    print(f"{broker}: node-lost closes for 20 connections {took:.1f}s after SIGKILL")
    await survivor.close()


# --------------------------------------------------------------------------- no worker


@pytest.mark.parametrize("broker", ["redis", "amqp"])
async def test_without_workers_the_backlog_stops_at_its_bound_and_drains_later(
    broker: str, make_tier: Callable[..., Tier]
) -> None:
    tier = make_tier(broker, FANOUT_EVENT_SHARDS="1", FANOUT_EVENTS_BACKLOG="100")
    node = tier.node()
    sender, sender_id = await client(node.port)
    quiet, quiet_id = await client(node.port)
    rss_before = node.rss_kib()
    for i in range(2000):
        await sender.send(f"m{i}")
    await asyncio.sleep(2)

    async def samples() -> dict[str, float]:
        return await metrics(node.port)

    seen = await samples()
    assert seen["fanout_events_full_shards"] == 1 and seen["fanout_events_paused_clients"] == 1
    assert seen["fanout_events_backlog_full_total"] >= 1
    forwarded = sum(v for k, v in seen.items() if k.startswith("fanout_events_forwarded_total"))
    assert forwarded <= 100 + 2 * 5, forwarded  # the bound (AMQP: checked every 0.2 s, a little over)
    # the node's other clients are unaffected: what is sent to them still reaches them
    async with ServerUtil(tier.url, namespace=tier.env["FANOUT_NAMESPACE"], heartbeat_interval=0.5) as util:
        assert await util.send(quiet_id, "still here", ack=True) == 1
    assert await recv(quiet) == "still here"
    assert (node.rss_kib() - rss_before) < 30 * 1024
    # a worker started later drains it all, in order, nothing lost
    tier.worker()
    await _until(
        lambda: len([r for r in tier.handled() if r["cid"] == sender_id and r["kind"] == "message"]) >= 2000,
        120,
        "the backlog drained",
    )
    mine = _first_handlings(tier.handled())[sender_id]
    assert [r["data"] for r in mine if r["kind"] == "message"] == [f"m{i}" for i in range(2000)]
    await sender.close()
    await quiet.close()


# --------------------------------------------------------------------------- dead letters


@pytest.mark.parametrize("broker", ["redis", "amqp"])
async def test_a_handler_that_always_raises_is_dead_lettered_and_can_be_requeued(
    broker: str, make_tier: Callable[..., Tier]
) -> None:
    tier = make_tier(broker)
    node = tier.node()
    worker = tier.worker()
    ws, cid = await client(node.port)
    await ws.send("fail")
    await ws.send("next")
    await _until(lambda: any(r.get("data") == "next" for r in tier.handled()), 20, "the next event")
    assert worker.metric("fanout_worker_events_retried_total") == 3
    assert worker.metric("fanout_worker_events_dead_lettered_total") == 1
    env = {k: v for k, v in tier.env.items() if k.startswith("FANOUT_")}
    listed = run_module("fanout", "worker", "dead-letters", env=env)
    assert listed.returncode == 0, listed.stderr
    (dead,) = orjson.loads(listed.stdout)
    assert dead["client_id"] == cid and dead["kind"] == "message" and "told to fail" in dead["error"]
    (tier.records / "heal").touch()
    requeued = run_module("fanout", "worker", "dead-letters", "--requeue", env=env)
    assert requeued.returncode == 0, requeued.stderr
    await _until(lambda: any(r.get("data") == "fail" for r in tier.handled()), 20, "the requeued event")
    assert orjson.loads(run_module("fanout", "worker", "dead-letters", env=env).stdout) == []
    await ws.close()


# --------------------------------------------------------------------------- SIGTERM and sessions


@pytest.mark.parametrize("broker", ["redis", "amqp"])
async def test_sigterm_finishes_the_events_in_hand_and_exits_0(
    broker: str, make_tier: Callable[..., Tier]
) -> None:
    tier = make_tier(broker)
    node = tier.node()
    worker = tier.worker()
    ws, _cid = await client(node.port)
    await ws.send("slow:1.5")
    await _until(lambda: any(r.get("phase") == "start" for r in tier.handled()), 15, "the slow handler")
    worker.proc.send_signal(signal.SIGTERM)
    assert worker.proc.wait(scaled(20)) == 0

    def finished() -> list[dict[str, Any]]:
        return [r for r in tier.handled() if r.get("data") == "slow:1.5" and r.get("phase") != "start"]

    assert len(finished()) == 1  # finished before exiting
    second = tier.worker()
    await ws.send("later")
    await _until(lambda: any(r.get("data") == "later" for r in tier.handled()), 20, "the next event")
    assert len(finished()) == 1  # acknowledged: not again
    assert second.metric("fanout_worker_events_redelivered_total") == 0
    await ws.close()


@pytest.mark.parametrize("broker", ["redis", "amqp"])
async def test_a_session_a_handler_writes_is_seen_by_the_next_event(
    broker: str, make_tier: Callable[..., Tier]
) -> None:
    tier = make_tier(broker)
    node = tier.node()
    tier.worker()
    ws, _cid = await client(node.port)
    for i in range(1, 6):  # sent at once: each next event was made before the write before it
        await ws.send(f"session:{i}")
    await _until(lambda: len([r for r in tier.handled() if r["kind"] == "message"]) == 5, 20, "5 events")
    sessions = [r["session"] for r in tier.handled() if r["kind"] == "message"]
    assert sessions == [{}, {"n": 1}, {"n": 2}, {"n": 3}, {"n": 4}]
    await ws.close()
    await _until(lambda: any(r["kind"] == "close" for r in tier.handled()), 20, "the close")
    close = next(r for r in tier.handled() if r["kind"] == "close")
    assert close["session"] == {"n": 5}


# --------------------------------------------------------------------------- broker outages


async def test_redis_killed_and_restarted_during_traffic_loses_no_event(
    tmp_path: Path, make_tier: Callable[..., Tier]
) -> None:
    redis = start_redis(tmp_path / "redis", "--appendonly", "yes", "--appendfsync", "always")
    try:
        await _outage(make_tier, redis.url, cut=redis.kill, restore=redis.restart)
    finally:
        redis.stop()


async def test_an_amqp_link_cut_during_traffic_loses_no_event(make_tier: Callable[..., Tier]) -> None:
    proxy = ProxyProcess("127.0.0.1:5672")
    try:
        await _outage(
            make_tier, f"amqp://guest:guest@127.0.0.1:{proxy.port}/", cut=proxy.cut, restore=proxy.restore
        )
    finally:
        proxy.stop()


async def _outage(make_tier: Callable[..., Tier], url: str, cut: Any, restore: Any) -> None:
    tier = make_tier(url)
    node = tier.node()
    tier.worker()
    tier.worker()
    clients = [await client(node.port) for _ in range(20)]
    sent = 0
    for round_ in range(60):
        if round_ == 20:
            cut()
        if round_ == 40:
            restore()
        for ws, _ in clients:
            await ws.send(f"m{round_}")
            sent += 1
        await asyncio.sleep(0.1)
    for ws, _ in clients:
        await ws.close()
    ids = {cid for _, cid in clients}

    def all_handled() -> bool:
        per = _first_handlings(tier.handled())
        return all(len([r for r in per.get(cid, []) if r["kind"] == "message"]) == 60 for cid in ids)

    await _until(all_handled, 90, "every message handled after the outage")
    per = _first_handlings(tier.handled())
    for cid in ids:
        assert [r["data"] for r in per[cid] if r["kind"] == "message"] == [f"m{i}" for i in range(60)]
    print(f"{url.split(':')[0]}: {sent} messages sent across the outage, all handled in order")


# --------------------------------------------------------------------------- a misconfigured tier is visible


def _lines(process: NodeProcess, text: str) -> int:
    return sum(text in line for line in process.log().splitlines())


@pytest.mark.parametrize("broker", ["redis", "amqp"])
async def test_a_shard_count_mismatch_is_logged_once_on_both_sides_and_listed(
    broker: str, make_tier: Callable[..., Tier]
) -> None:
    """Nodes with N shards, a worker with N/2: both say so, once; the node names the shards nobody
    reads, once; ``fanout workers`` and ``fanout nodes`` show the counts."""
    tier = make_tier(broker)
    shards = int(tier.env.get("FANOUT_EVENT_SHARDS", "16"))
    node = tier.node()
    worker = tier.worker(FANOUT_EVENT_SHARDS=str(shards // 2))
    clients = [await client(node.port) for _ in range(40)]
    for ws, _ in clients:
        await ws.send("hello")
    mismatch = f"uses FANOUT_EVENT_SHARDS={shards // 2}, this node {shards}"
    await _until(lambda: _lines(node, mismatch) >= 1, 20, "the node's mismatch error")
    await _until(
        lambda: _lines(worker, f"uses FANOUT_EVENT_SHARDS={shards}, this worker") >= 1, 20, "the worker's"
    )
    await _until(lambda: _lines(node, "no live worker owns") >= 1, 30, "the node's unowned shards warning")
    unowned = next(line for line in node.log().splitlines() if "no live worker owns" in line)
    assert f"{shards // 2}-{shards - 1}" in unowned or f"shard {shards - 1}" in unowned, unowned

    env = {k: v for k, v in tier.env.items() if k.startswith("FANOUT_")}
    listed = run_module("fanout", "workers", env=env)
    assert listed.returncode == 0, listed.stderr
    (record,) = orjson.loads(listed.stdout)
    assert record["event_shards"] == shards // 2 and record["shards"] == list(range(shards // 2))
    assert record["pid"] == worker.pid and set(record["backlog"]) == {str(k) for k in range(shards // 2)}
    assert f"uses FANOUT_EVENT_SHARDS={shards // 2}, not {shards}" in listed.stderr
    assert "events wait in shards no live worker owns" in listed.stderr
    nodes = run_module("fanout", "nodes", env=env)
    assert [n["event_shards"] for n in orjson.loads(nodes.stdout)] == [shards], nodes.stderr

    for ws, _ in clients:  # more events, more heartbeats: no more lines
        await ws.send("again")
    await asyncio.sleep(scaled(3))
    assert _lines(node, mismatch) == 1
    assert _lines(worker, f"uses FANOUT_EVENT_SHARDS={shards}, this worker") == 1
    assert _lines(node, "no live worker owns") == 1
    for ws, _ in clients:
        await ws.close()


@pytest.mark.parametrize("broker", ["redis", "amqp"])
async def test_fanout_workers_lists_the_workers_and_cleanup_removes_the_tier_once_stopped(
    broker: str, make_tier: Callable[..., Tier]
) -> None:
    tier = make_tier(broker)
    shards = int(tier.env.get("FANOUT_EVENT_SHARDS", "16"))
    node = tier.node()
    workers = [tier.worker(), tier.worker()]
    ws, _cid = await client(node.port)
    await ws.send("fail")  # parked after its retries: a dead letter
    env = {k: v for k, v in tier.env.items() if k.startswith("FANOUT_")}
    await _until(
        lambda: orjson.loads(run_module("fanout", "worker", "dead-letters", env=env).stdout),
        30,
        "a dead letter",
    )

    def listed() -> list[dict[str, Any]]:
        result = run_module("fanout", "workers", env=env)
        assert result.returncode == 0, result.stderr
        records: list[dict[str, Any]] = orjson.loads(result.stdout)
        return records

    await _until(lambda: sum(len(r["shards"]) for r in listed()) == shards, 30, "every shard owned")
    records = listed()
    assert sorted(r["pid"] for r in records) == sorted(w.pid for w in workers)
    assert sorted(k for r in records for k in r["shards"]) == list(range(shards))
    assert all(
        r["event_shards"] == shards and set(r["backlog"]) == {str(k) for k in r["shards"]} for r in records
    )

    refused = run_module("fanout", "worker", "cleanup", env=env)
    assert refused.returncode == 1 and "--force" in refused.stderr, refused.stderr
    await ws.close()
    for process in [*workers, node]:
        assert process.terminate() == 0
    cleaned = run_module("fanout", "worker", "cleanup", env=env)
    assert cleaned.returncode == 0, cleaned.stderr
    namespace = env["FANOUT_NAMESPACE"]
    removed = orjson.loads(cleaned.stdout)["removed"]
    if broker == "redis":
        assert f"{namespace}:ev:dead" in removed and f"{{{namespace}:ev:0}}" in removed
        import redis.asyncio as aioredis

        async with aioredis.Redis.from_url(REDIS) as redis:
            assert [k async for k in redis.scan_iter(match=f"*{namespace}*")] == []
    else:
        assert f"{namespace}.ev.dead" in removed and f"{namespace}.ev.0" in removed
        connection = await aio_pika.connect(AMQP)
        try:
            for name in removed:
                channel = await connection.channel()
                with pytest.raises(aio_pika.exceptions.ChannelNotFoundEntity):
                    if name.endswith(".ev"):
                        await channel.declare_exchange(name, passive=True)
                    else:
                        await channel.declare_queue(name, passive=True)
        finally:
            await connection.close()
    assert orjson.loads(run_module("fanout", "worker", "cleanup", env=env).stdout) == {"removed": []}


# --------------------------------------------------------------------------- fanout.Worker, in process


class _UtilProbe:
    """Records what its handlers get as ``event.util``; the plain ``on_message`` writes the session."""

    def __init__(self) -> None:
        self.seen: list[dict[str, Any]] = []

    async def on_open(self, event: Any) -> None:
        self.seen.append(
            {"kind": "open", "util": type(event.util), "server_util": isinstance(event.util, ServerUtil)}
        )

    def on_message(self, event: Any) -> None:
        assert isinstance(event.data, str)
        written = event.util.update_session(event.client_id, {"n": int(event.data)})
        self.seen.append(
            {
                "kind": "message",
                "util": type(event.util),
                "sync_server_util": isinstance(event.util, SyncServerUtil),
                "session": event.session,
                "written": written,
            }
        )

    async def on_close(self, event: Any) -> None:
        self.seen.append({"kind": "close", "session": event.session})


async def test_fanout_worker_in_process_hands_its_handlers_the_real_util_types(tmp_path: Path) -> None:
    namespace = unique_namespace("wk")
    node = start_node(
        tmp_path,
        {"FANOUT_URL": REDIS, "FANOUT_NAMESPACE": namespace, "FANOUT_EVENTS": "open,message,close"},
        app="tests.apps.quiet:app",
    )
    probe = _UtilProbe()
    async with fanout.Worker(probe, REDIS, namespace=namespace, heartbeat_interval=0.5) as worker:
        assert isinstance(worker.options, fanout.WorkerOptions)
        ws, _cid = await client(node.port)
        for n in range(1, 6):  # sent at once: each next event was made before the write before it
            await ws.send(str(n))
        await _until(lambda: len(probe.seen) == 6, 30, "the open and message events")
        await ws.close()
        await _until(lambda: any(s["kind"] == "close" for s in probe.seen), 30, "the close event")
    assert node.terminate() == 0
    opened, *messages, closed = probe.seen
    assert opened == {"kind": "open", "util": type(worker.util), "server_util": True}
    assert all(m["sync_server_util"] and m["util"] is SyncServerUtil and m["written"] for m in messages)
    assert [m["session"] for m in messages] == [{}, {"n": 1}, {"n": 2}, {"n": 3}, {"n": 4}]
    assert closed == {"kind": "close", "session": {"n": 5}}
