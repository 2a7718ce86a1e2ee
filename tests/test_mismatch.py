"""A publisher that does not fit the cluster finds out, and signed commands cannot be replayed.

Real node processes on the shared Redis and RabbitMQ, real publishers (ServerUtil, the CLI), real
websocket clients; captured commands are replayed with plain redis-py / aio-pika.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

import aio_pika
import orjson
import pytest
import redis.asyncio as aioredis

from fanout import (
    ConfigError,
    ConfigMismatch,
    NoLiveNodes,
    QueryTimeout,
    ServerUtil,
    SyncServerUtil,
    protocol,
)
from fanout.commands import Heartbeat, NodeInfo
from fanout.protocol import Envelope
from tests.support.nodes import (
    NodeProcess,
    client,
    metrics,
    nothing_more,
    recv,
    run_module,
    start_node,
    unique_namespace,
)

REDIS = "redis://127.0.0.1:6379/0"
AMQP = "amqp://guest:guest@127.0.0.1:5672/"
HB = 0.5
BROKERS = pytest.mark.parametrize("url", [REDIS, AMQP], ids=["redis", "amqp"])


def _node(tmp: Path, url: str, ns: str, **env: str) -> NodeProcess:
    return start_node(
        tmp,
        {"FANOUT_URL": url, "FANOUT_NAMESPACE": ns, "FANOUT_HEARTBEAT_INTERVAL": str(HB), **env},
        app="tests.apps.control:app",
    )


async def _cli(env: dict[str, str], *args: str) -> tuple[int, str]:
    result = await asyncio.get_running_loop().run_in_executor(
        None, lambda: run_module("fanout", *args, env=env)
    )
    return result.returncode, result.stderr


# --------------------------------------------------------------------------- memory:// outside a node


async def test_memory_is_refused_outside_a_node_unless_asked_for() -> None:
    code, err = await _cli({}, "send-to-group", "lobby", "hi")  # no FANOUT_URL at all
    assert code == 2 and "FANOUT_URL" in err and "no node runs" in err
    with pytest.raises(ConfigError, match="FANOUT_URL"):
        await ServerUtil.from_env({}).connect()
    sync = SyncServerUtil.from_env({})
    with pytest.raises(ConfigError, match="in_process=True"):  # from a thread, as blocking code runs
        await asyncio.get_running_loop().run_in_executor(None, sync.send_to_group, "lobby", "hi")
    async with ServerUtil("memory://", in_process=True) as util:  # asked for explicitly...
        with pytest.raises(NoLiveNodes):  # ...and yet no node runs in this process
            await util.send_to_all("to nobody")


# --------------------------------------------------------------------------- mode


@BROKERS
async def test_a_publisher_in_another_mode_gets_config_mismatch(tmp_path: Path, url: str) -> None:
    ns = unique_namespace("mm")
    node = _node(tmp_path, url, ns, FANOUT_MODE="fanout")
    ws, cid = await client(node.port)
    with pytest.raises(ConfigMismatch, match="FANOUT_MODE") as mismatch:
        # Redis: said by the nodes' heartbeats; AMQP: already at connect (the exchange's type)
        async with ServerUtil(url, namespace=ns, mode="routing", heartbeat_interval=HB) as util:
            await util.check_cluster()
    assert "'fanout'" in str(mismatch.value) and mismatch.value.setting == "FANOUT_MODE"
    if url == REDIS:
        async with ServerUtil(url, namespace=ns, mode="routing", heartbeat_interval=HB) as util:
            await asyncio.sleep(2 * HB)
            with pytest.raises(ConfigMismatch):
                await util.send_to_group("lobby", "would be lost")  # every call, once the nodes are heard
            with pytest.raises(ConfigMismatch):
                await util.join_group(cid, "lobby")
    code, err = await _cli(
        {"FANOUT_URL": url, "FANOUT_NAMESPACE": ns, "FANOUT_HEARTBEAT_INTERVAL": str(HB)},
        "send-to-group",
        "lobby",
        "hi",
    )
    assert code == 2 and "FANOUT_MODE" in err, err
    async with ServerUtil(url, namespace=ns, mode="fanout", heartbeat_interval=HB) as right:
        assert await right.check_cluster() == 1
        assert await right.send(cid, "fits", ack=True) == 1
    assert await recv(ws) == "fits"
    await ws.close()
    assert node.terminate() == 0


# --------------------------------------------------------------------------- secret


@BROKERS
@pytest.mark.parametrize(
    ("node_secret", "publisher_secret"),
    [("s3cret", None), ("s3cret", "other"), (None, "s3cret")],
    ids=["nodes-sign-publisher-not", "different-secrets", "publisher-signs-nodes-not"],
)
async def test_a_publisher_with_another_secret_gets_config_mismatch(
    tmp_path: Path, url: str, node_secret: str | None, publisher_secret: str | None
) -> None:
    ns = unique_namespace("ms")
    node = _node(tmp_path, url, ns, **({"FANOUT_SECRET": node_secret} if node_secret else {}))
    ws, cid = await client(node.port)
    async with ServerUtil(url, namespace=ns, secret=publisher_secret, heartbeat_interval=HB) as util:
        with pytest.raises(ConfigMismatch, match="FANOUT_SECRET"):
            await util.check_cluster()
        with pytest.raises(ConfigMismatch, match="FANOUT_SECRET"):
            await util.send(cid, "lost")
    env = {"FANOUT_URL": url, "FANOUT_NAMESPACE": ns, "FANOUT_HEARTBEAT_INTERVAL": str(HB)}
    if publisher_secret:
        env["FANOUT_SECRET"] = publisher_secret
    code, err = await _cli(env, "send", cid, "lost")
    assert code == 2 and "FANOUT_SECRET" in err, err
    assert await nothing_more(ws)
    await ws.close()
    assert node.terminate() == 0


# --------------------------------------------------------------------------- the first call


@BROKERS
@pytest.mark.parametrize(
    ("node_env", "publisher", "setting"),
    [
        ({"FANOUT_MODE": "fanout"}, {"mode": "routing"}, "FANOUT_MODE"),
        ({"FANOUT_SECRET": "s3cret"}, {}, "FANOUT_SECRET"),
        ({"FANOUT_SECRET": "s3cret"}, {"secret": "other"}, "FANOUT_SECRET"),
        ({}, {"secret": "s3cret"}, "FANOUT_SECRET"),
    ],
    ids=["mode", "nodes-sign-publisher-not", "different-secrets", "publisher-signs-nodes-not"],
)
async def test_the_first_call_of_a_publisher_that_does_not_fit_is_refused(
    tmp_path: Path, url: str, node_env: dict[str, str], publisher: dict[str, str], setting: str
) -> None:
    ns = unique_namespace("m1")
    node = _node(tmp_path, url, ns, **node_env)
    ws, cid = await client(node.port)
    with pytest.raises(ConfigMismatch, match=setting):  # AMQP refuses another mode already at connect
        async with ServerUtil(url, namespace=ns, heartbeat_interval=HB, **publisher) as util:
            await util.send(cid, "would be lost")  # no check_cluster() first: the send itself finds out
    sync = SyncServerUtil(url, namespace=ns, heartbeat_interval=HB, **publisher)  # a one-shot script
    with pytest.raises(ConfigMismatch, match=setting):
        await asyncio.get_running_loop().run_in_executor(None, sync.send, cid, "would be lost")
    sync.disconnect()
    assert await nothing_more(ws)
    await ws.close()
    assert node.terminate() == 0


# --------------------------------------------------------------------------- namespace


@BROKERS
async def test_a_publisher_in_another_namespace_hears_no_live_nodes(tmp_path: Path, url: str) -> None:
    ns = unique_namespace("mn")
    node = _node(tmp_path, url, ns)
    wrong = ns + "-typo"
    async with ServerUtil(url, namespace=wrong, heartbeat_interval=HB) as util:
        with pytest.raises(NoLiveNodes, match=f"no live nodes in namespace '{wrong}'"):
            await util.send_to_group("lobby", "into the void")  # a plain send, and the first call
        with pytest.raises(NoLiveNodes, match=f"no live nodes in namespace '{wrong}'"):
            await util.get_connection_count()
        with pytest.raises(NoLiveNodes):
            await util.send_to_all("x", ack=True)  # not "0 reached"
        with pytest.raises(NoLiveNodes):
            await util.check_cluster()
    code, err = await _cli(
        {"FANOUT_URL": url, "FANOUT_NAMESPACE": wrong, "FANOUT_HEARTBEAT_INTERVAL": str(HB)},
        "send-to-group",
        "lobby",
        "hi",
    )
    assert code == 1 and f"no live nodes in namespace '{wrong}'" in err, err
    assert node.terminate() == 0


# --------------------------------------------------------------------------- a ghost node on AMQP


async def _amqp_heartbeat(ns: str, raw: bytes) -> None:
    connection = await aio_pika.connect(AMQP)
    try:
        channel = await connection.channel()
        exchange = await channel.get_exchange(f"{ns}.ctl", ensure=True)
        await exchange.publish(aio_pika.Message(raw), routing_key="hb")
    finally:
        await connection.close()


async def test_a_forged_heartbeat_cannot_stall_amqp_queries(tmp_path: Path) -> None:
    ns = unique_namespace("mg")
    node = _node(tmp_path, AMQP, ns)
    ws, _ = await client(node.port)
    async with ServerUtil(AMQP, namespace=ns, heartbeat_interval=HB) as util:
        assert await util.check_cluster() == 1
        huge = {"instance": "ghost.x1", "node_id": "ghost", "connections": 0, "ttl": 1e9}
        await _amqp_heartbeat(ns, b'v2;;{"op":"hb","node":%s}\n' % orjson.dumps(huge))
        await asyncio.sleep(0.2)
        assert await util.get_connection_count(timeout=2) == 1  # dropped on arrival: ttl out of bounds
        assert util.dropped["malformed"] == 1
        # within the bounds: it costs one QueryTimeout (naming it), not every query for a minute
        ghost = NodeInfo("ghost.x2", "ghost", 0, protocol.MAX_TTL)
        await _amqp_heartbeat(ns, protocol.encode(Heartbeat(ghost)))
        await asyncio.sleep(0.2)
        with pytest.raises(QueryTimeout, match=r"ghost\.x2"):
            await util.get_connection_count(timeout=1)
        started = time.monotonic()
        assert await util.get_connection_count(timeout=5) == 1
        assert time.monotonic() - started < 1.5
    await ws.close()
    assert node.terminate() == 0


# --------------------------------------------------------------------------- a forged heartbeat on Redis


async def _redis_heartbeat(ns: str, raw: bytes) -> None:
    r = aioredis.Redis.from_url(REDIS)
    try:
        await r.publish(f"{ns}:hb", raw)
    finally:
        await r.aclose()


async def _until(condition: Callable[[], bool]) -> None:
    for _ in range(200):
        if condition():
            return
        await asyncio.sleep(0.05)
    raise AssertionError("never happened")


async def test_a_forged_heartbeat_cannot_block_the_publishers_of_an_unsigned_namespace(
    tmp_path: Path,
) -> None:
    ns = unique_namespace("mh")
    node = _node(tmp_path, REDIS, ns)
    ws, cid = await client(node.port)
    async with ServerUtil(REDIS, namespace=ns, heartbeat_interval=HB) as util:
        assert await util.check_cluster() == 1
        # values docs/protocol.md calls malformed: dropped and counted on arrival
        ghost = {"instance": "ghost.x1", "node_id": "ghost", "connections": 0, "ttl": protocol.MAX_TTL}
        await _redis_heartbeat(ns, b'v2;;{"op":"hb","node":%s}\n' % orjson.dumps({**ghost, "mode": "bogus"}))
        unsigned_signer = {**ghost, "instance": "ghost.x2", "mode": "routing", "signed": True}
        await _redis_heartbeat(ns, b'v2;;{"op":"hb","node":%s}\n' % orjson.dumps(unsigned_signer))
        await _until(lambda: util.dropped["malformed"] == 2)
        await util.send(cid, "still reaches")
        assert await recv(ws) == "still reaches"
        # well-formed lies (the other mode; a signature this publisher cannot check): the node that
        # really runs fits this publisher, so they block nothing
        other_mode = NodeInfo("ghost.x3", "ghost", 0, protocol.MAX_TTL, mode="fanout")
        await _redis_heartbeat(ns, protocol.encode(Heartbeat(other_mode)))
        signer = NodeInfo("ghost.x4", "ghost", 0, protocol.MAX_TTL, mode="routing", signed=True)
        envelope = Envelope("ghost.x4", 1, time.time(), ns)
        await _redis_heartbeat(ns, protocol.encode(Heartbeat(signer), b"not-theirs", envelope))
        await _until(lambda: {"ghost.x3", "ghost.x4"} <= set(util.live_node_infos() or {}))
        await util.send(cid, "and still")
        assert await recv(ws) == "and still"
    await ws.close()
    assert node.terminate() == 0


# --------------------------------------------------------------------------- replay


async def _capture(ns: str, channel: str) -> aioredis.client.PubSub:
    r = aioredis.Redis.from_url(REDIS)
    pubsub = r.pubsub()
    await pubsub.subscribe(f"{ns}:{channel}")
    await pubsub.get_message(timeout=1)  # the subscribe confirmation
    return pubsub


async def _next_message(pubsub: aioredis.client.PubSub) -> bytes:
    for _ in range(100):
        message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.1)
        if message is not None:
            data: bytes = message["data"]
            return data
    raise AssertionError("nothing captured")


async def _metric(port: int, name: str) -> float:
    return (await metrics(port)).get(name, 0)


async def test_a_captured_signed_command_cannot_be_replayed(tmp_path: Path) -> None:
    ns = unique_namespace("mr")
    secret = "s3cret-replay"
    node = _node(tmp_path, REDIS, ns, FANOUT_SECRET=secret, FANOUT_REPLAY_WINDOW="2")
    ws, cid = await client(node.port)
    instance = cid.rpartition(".")[0]
    tap = await _capture(ns, f"n:{instance}")
    async with ServerUtil(REDIS, namespace=ns, secret=secret, heartbeat_interval=HB, replay_window=2) as util:
        await util.send(cid, "pay 10 coins")
        captured = await _next_message(tap)
    assert await recv(ws) == "pay 10 coins"
    r = aioredis.Redis.from_url(REDIS)
    try:
        for _ in range(100):  # the same bytes again, on the same channel: applied once only
            await r.publish(f"{ns}:n:{instance}", captured)
        assert await nothing_more(ws, 0.5)
        replay = 'fanout_commands_dropped_total{reason="replay"}'
        assert await _metric(node.port, replay) == 100
        await asyncio.sleep(2.5)  # past the (shortened) replay window: refused for its age
        await r.publish(f"{ns}:n:{instance}", captured)
        await asyncio.sleep(0.3)
        assert await _metric(node.port, 'fanout_commands_dropped_total{reason="stale"}') == 1
        assert await nothing_more(ws)
    finally:
        await r.aclose()
        await tap.aclose()
    await ws.close()
    assert node.terminate() == 0


async def test_a_command_signed_in_one_namespace_is_refused_in_another(tmp_path: Path) -> None:
    ns_a, ns_b = unique_namespace("ma"), unique_namespace("mb")
    secret = "shared-by-two-apps"
    node_a = _node(tmp_path, REDIS, ns_a, FANOUT_SECRET=secret)
    node_b = _node(tmp_path, REDIS, ns_b, FANOUT_SECRET=secret)
    ws_b, _ = await client(node_b.port)
    tap = await _capture(ns_a, "all")
    async with ServerUtil(REDIS, namespace=ns_a, secret=secret, heartbeat_interval=HB) as util_a:
        await util_a.send_to_all("for namespace a only")
        captured = await _next_message(tap)
    r = aioredis.Redis.from_url(REDIS)
    try:
        assert await r.publish(f"{ns_b}:all", captured) == 1  # node b receives it...
        await asyncio.sleep(0.3)
        assert await _metric(node_b.port, 'fanout_commands_dropped_total{reason="namespace"}') == 1
        assert await nothing_more(ws_b)  # ...and refuses it
    finally:
        await r.aclose()
        await tap.aclose()
    await ws_b.close()
    assert node_b.terminate() == 0
    assert node_a.terminate() == 0
