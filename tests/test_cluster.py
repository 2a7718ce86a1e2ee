"""Acceptance across nodes: real node processes, real brokers, real websocket clients.

Every backend configuration (Redis, Redis Cluster and RabbitMQ, each in routing and fanout mode) runs
three ``fanout-node`` processes (n0, n1, n2) once per module; each test opens fresh websocket clients on
them and drives the cluster with a :class:`ServerUtil` living in this (separate) test process. It is the
real-broker, multi-process counterpart of ``tests/test_serverutil_memory.py``. Broker-side checks look
at what the broker itself reports (``PUBSUB NUMSUB`` / ``SHARDNUMSUB``, ``CLIENT LIST``,
``rabbitmqctl list_bindings``), not at what the nodes say about themselves.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aio_pika
import orjson
import pytest
import pytest_asyncio
import redis.asyncio as aioredis
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from fanout import ServerUtil, protocol
from fanout.commands import Send, Target
from fanout.naming import safe_segment
from tests.support.nodes import NodeProcess, client, http_get, metrics, nothing_more, recv, scaled, start_node
from tests.support.nodes import unique_namespace as _unique_namespace
from tests.support.redis_servers import RedisCluster, start_cluster

pytestmark = pytest.mark.asyncio(loop_scope="module")

REDIS_URL = "redis://127.0.0.1:6379/0"
AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"
HEARTBEAT = 0.5
NODE_IDS = ["n0", "n1", "n2"]


@dataclass(frozen=True)
class Config:
    broker: str  #: redis, rediscluster or amqp
    mode: str  #: routing or fanout

    @property
    def id(self) -> str:
        return f"{self.broker}-{self.mode}"

    @property
    def routing(self) -> bool:
        return self.mode == "routing"


CONFIGS = [
    Config(broker, mode) for broker in ("redis", "rediscluster", "amqp") for mode in ("routing", "fanout")
]


def unique(prefix: str) -> str:
    """A fresh group / flag name (tests share the nodes of a configuration)."""
    return f"{prefix}-{os.urandom(4).hex()}"


async def eventually(
    probe: Callable[[], Awaitable[Any]], expected: Any, timeout: float = 10.0, interval: float = 0.1
) -> float:
    """Poll ``probe()`` until it returns ``expected``; return the seconds it took."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    deadline = started + scaled(timeout)
    value = None
    while loop.time() < deadline:
        value = await probe()
        if value == expected:
            return loop.time() - started
        await asyncio.sleep(interval)
    raise AssertionError(f"still {value!r} after {timeout}s, expected {expected!r}")


async def closed_with(ws: ClientConnection) -> tuple[int, str]:
    """Wait for the server to close ``ws``; the (code, reason) it sent."""
    with pytest.raises(ConnectionClosed) as closed:
        await recv(ws)
    assert closed.value.rcvd is not None, "closed without a close frame"
    return closed.value.rcvd.code, closed.value.rcvd.reason


def rabbitmqctl(*args: str) -> list[list[str]]:
    done = subprocess.run(
        ["rabbitmqctl", "-q", *args], capture_output=True, text=True, timeout=60, check=True
    )
    return [line.split("\t") for line in done.stdout.splitlines() if line]


# ---------------------------------------------------------------------------- the deployments


@dataclass
class Deployment:
    """Three node processes of one configuration and a ServerUtil in this process."""

    config: Config
    url: str
    namespace: str
    tmp: Path
    nodes: list[NodeProcess]
    util: ServerUtil
    redis_cluster: RedisCluster | None = None
    #: node id -> node instance (the inbox / queue / channel name of the node)
    instances: dict[str, str] = field(default_factory=dict)
    opened: list[ClientConnection] = field(default_factory=list)

    def env(self, node_id: str) -> dict[str, str]:
        return {
            "FANOUT_URL": self.url,
            "FANOUT_MODE": self.config.mode,
            "FANOUT_NAMESPACE": self.namespace,
            "FANOUT_NODE_ID": node_id,
            "FANOUT_HEARTBEAT_INTERVAL": str(HEARTBEAT),
        }

    async def client(self, node: int) -> tuple[ClientConnection, str]:
        """A websocket client of node ``n<node>``, closed after the test."""
        ws, client_id = await client(self.nodes[node].port)
        self.opened.append(ws)
        assert client_id.startswith(self.instances[NODE_IDS[node]] + ".")
        return ws, client_id

    # -- broker views ------------------------------------------------------------------------

    def group_channel(self, group: str) -> str:
        return f"{self.namespace}:g:{safe_segment(group)}"

    def redis_clients(self) -> list[aioredis.Redis]:
        if self.redis_cluster is not None:
            return [aioredis.Redis(port=port) for port in self.redis_cluster.ports]
        return [aioredis.Redis.from_url(REDIS_URL)]

    async def owner_of_channel(self, channel: str) -> aioredis.Redis:
        """The cluster primary owning ``channel``'s hash slot."""
        assert self.redis_cluster is not None
        for port in self.redis_cluster.ports:
            r = aioredis.Redis(port=port)
            slot = int(await r.execute_command("CLUSTER", "KEYSLOT", channel))
            for start, end, primary, *_ in await r.execute_command("CLUSTER", "SLOTS"):
                if start <= slot <= end:
                    await r.aclose()
                    return aioredis.Redis(host=primary[0], port=int(primary[1]))
        raise AssertionError(f"no shard owns {channel}")

    async def numsub(self, channel: str) -> int:
        """How many connections the broker says are subscribed to ``channel``.

        Plain pub/sub (one server, or a cluster in fanout mode: counted on every server) or, on a
        cluster in routing mode, sharded pub/sub on the primary owning the channel's slot."""
        if self.redis_cluster is not None and self.config.routing:
            r = await self.owner_of_channel(channel)
            try:
                _, count = await r.execute_command("PUBSUB", "SHARDNUMSUB", channel)
                return int(count)
            finally:
                await r.aclose()
        total = 0
        for r in self.redis_clients():
            try:
                [(_, count)] = await r.pubsub_numsub(channel)
                total += int(count)
            finally:
                await r.aclose()
        return total

    async def redis_subscriptions(self) -> dict[str, int]:
        """Node id -> channels its pub/sub connections hold, as CLIENT LIST on every server says."""
        names = {f"{self.namespace}-sub-{safe_segment(inst)}"[:120]: nid for inst, nid in self._by_instance()}
        counts = dict.fromkeys(NODE_IDS, 0)
        for r in self.redis_clients():
            try:
                for entry in await r.client_list():
                    node_id = names.get(entry.get("name", ""))
                    if node_id is not None:
                        counts[node_id] += int(entry.get("sub", 0)) + int(entry.get("ssub", 0))
            finally:
                await r.aclose()
        return counts

    def _by_instance(self) -> list[tuple[str, str]]:
        return [(inst, nid) for nid, inst in self.instances.items()]

    async def bound_nodes(self, group: str) -> list[str]:
        """Node ids whose queue RabbitMQ has bound to ``g.<group>`` on the command exchange."""
        rows = await asyncio.get_running_loop().run_in_executor(
            None, rabbitmqctl, "list_bindings", "source_name", "destination_name", "routing_key"
        )
        queues = {f"{self.namespace}.q.{safe_segment(inst)}": nid for inst, nid in self._by_instance()}
        key = f"g.{safe_segment(group)}"
        found = [row[1] for row in rows if len(row) == 3 and row[0] == self.namespace and row[2] == key]
        assert all(q in queues for q in found), found
        return sorted(queues[q] for q in found)

    async def subscribed_nodes(self, group: str) -> int:
        """How many nodes the broker routes ``group``'s commands to."""
        if self.config.broker == "amqp":
            return len(await self.bound_nodes(group))
        return await self.numsub(self.group_channel(group))

    # -- raw publishing (not through fanout) ---------------------------------------------------

    async def publish_raw(self, messages: list[tuple[str, bytes]]) -> list[int | None]:
        """Publish each (address, bytes) on the broker, not through fanout; address is ``all`` or
        ``g.<group>`` / ``n.<instance>``. Returns what the broker says about receivers (Redis), else None."""
        if self.config.broker == "amqp":
            connection = await aio_pika.connect(AMQP_URL)
            try:
                channel = await connection.channel()
                exchange = await channel.get_exchange(self.namespace, ensure=True)
                for key, body in messages:
                    await exchange.publish(aio_pika.Message(body), routing_key=key)
            finally:
                await connection.close()
            return [None] * len(messages)
        receivers: list[int | None] = []
        for key, body in messages:
            channel = f"{self.namespace}:all" if key == "all" else f"{self.namespace}:{key[0]}:{key[2:]}"
            if self.redis_cluster is not None and self.config.routing:
                r = await self.owner_of_channel(channel)
                command = "SPUBLISH"
            else:
                r = self.redis_clients()[0]
                command = "PUBLISH"
            try:
                receivers.append(int(await r.execute_command(command, channel, body)))
            finally:
                await r.aclose()
        return receivers

    async def all_subscribers(self) -> int:
        """How many connections the broker says listen to the broadcast channel (Redis only)."""
        return await self.numsub(f"{self.namespace}:all")

    # -- teardown ----------------------------------------------------------------------------------

    async def close_clients(self) -> None:
        opened, self.opened = self.opened, []
        for ws in opened:
            await ws.close()
        await eventually(self.util.get_connection_count, 0)


@pytest.fixture(scope="module")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisCluster]:
    """One local 3-master Redis Cluster, shared by both rediscluster configurations."""
    cluster = start_cluster(tmp_path_factory.mktemp("redis-cluster"))
    yield cluster
    cluster.stop()


async def _amqp_cleanup(namespace: str) -> None:
    """Delete the namespace's exchanges (nodes never delete them) and check no queue is left."""
    connection = await aio_pika.connect(AMQP_URL)
    try:
        channel = await connection.channel()
        for name in (namespace, f"{namespace}.ctl"):
            await channel.exchange_delete(name)
    finally:
        await connection.close()

    def queues() -> list[str]:
        return [row[0] for row in rabbitmqctl("list_queues", "name") if row[0].startswith(namespace + ".")]

    await eventually(lambda: asyncio.get_running_loop().run_in_executor(None, queues), [], interval=0.2)


def _start_nodes(tmp: Path, envs: list[dict[str, str]]) -> list[NodeProcess]:
    nodes = [start_node(tmp, env, wait=False) for env in envs]
    try:
        for node in nodes:
            node.wait_healthy()
    except BaseException:
        for node in nodes:
            node.kill()
        raise
    return nodes


@pytest_asyncio.fixture(scope="module", loop_scope="module", params=CONFIGS, ids=[c.id for c in CONFIGS])
async def deployment(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Deployment]:
    config: Config = request.param
    cluster: RedisCluster | None = None
    if config.broker == "redis":
        url = REDIS_URL
    elif config.broker == "rediscluster":
        cluster = request.getfixturevalue("redis_cluster")
        url = cluster.url
        assert url == "redis+cluster://" + ",".join(f"127.0.0.1:{p}" for p in cluster.ports)
    else:
        url = AMQP_URL
    namespace = _unique_namespace(f"tc{config.broker[:2]}{config.mode[0]}")
    tmp = tmp_path_factory.mktemp(config.id)
    nodes: list[NodeProcess] = []
    env = {"FANOUT_URL": url, "FANOUT_MODE": config.mode, "FANOUT_NAMESPACE": namespace}
    try:
        nodes = _start_nodes(
            tmp,
            [{**env, "FANOUT_NODE_ID": nid, "FANOUT_HEARTBEAT_INTERVAL": str(HEARTBEAT)} for nid in NODE_IDS],
        )
        async with ServerUtil(
            url, mode=config.mode, namespace=namespace, heartbeat_interval=HEARTBEAT
        ) as util:
            deployment = Deployment(config, url, namespace, tmp, nodes, util, cluster)

            async def node_ids() -> list[str]:
                return [n["node_id"] for n in await util.get_nodes()]

            await eventually(node_ids, NODE_IDS)
            deployment.instances = {str(n["node_id"]): str(n["instance"]) for n in await util.get_nodes()}
            yield deployment
            await deployment.close_clients()
        codes = [node.terminate() for node in nodes]
        assert codes == [0, 0, 0], "\n".join(node.log() for node in nodes)
        for node in nodes:
            assert "Traceback" not in node.log(), node.log()
    finally:
        for node in nodes:
            node.kill()
        if config.broker == "amqp":
            await _amqp_cleanup(namespace)


@pytest_asyncio.fixture(loop_scope="module")
async def d(deployment: Deployment) -> AsyncIterator[Deployment]:
    """The configuration's deployment, with no client open before and after the test."""
    assert await deployment.util.get_connection_count() == 0
    yield deployment
    await deployment.close_clients()


# ---------------------------------------------------------------------------- sends


async def test_send_to_client_ids_on_different_nodes(d: Deployment) -> None:
    (a, a_id), (b, b_id), (c, c_id) = [await d.client(i) for i in range(3)]
    u = d.util
    await u.send([a_id, c_id], "to a and c")
    assert await recv(a) == "to a and c" and await recv(c) == "to a and c"
    await u.send(b_id, "only b")
    assert await recv(b) == "only b"
    assert await u.send([a_id, b_id, c_id], "ack", ack=True) == 3
    assert [await recv(ws) for ws in (a, b, c)] == ["ack"] * 3
    assert await u.send([a_id, b_id, c_id], "not b", exclude=b_id, ack=True) == 2
    assert await recv(a) == "not b" and await recv(c) == "not b"
    # unknown ids (well-formed on a live node, on a dead instance) and malformed ones reach nobody
    unknown = [a_id + "0", "n9.zzzzzzzz.1", "garbage", ""]
    assert await u.send(unknown, "nobody", ack=True) == 0
    await u.send(unknown, "nobody")
    assert all([await nothing_more(ws) for ws in (a, b, c)])


async def test_data_kinds_arrive_exactly_as_sent(d: Deployment) -> None:
    (a, a_id), (b, b_id) = await d.client(1), await d.client(2)
    text = 'plain "text" ünïcødé 🚀 {not json'
    blob = bytes(range(256)) * 3
    obj = {"type": "x", "n": [1, 2.5, None, True], "nested": {"é": "ü"}}
    for data in (text, blob, obj, [1, "two"], 42, ""):
        await d.util.send([a_id, b_id], data)
        for ws in (a, b):
            frame = await recv(ws)
            if isinstance(data, str):
                assert isinstance(frame, str) and frame == data  # text frame, no envelope
            elif isinstance(data, bytes):
                assert isinstance(frame, bytes) and frame == data  # binary frame
            else:
                assert isinstance(frame, str) and frame == orjson.dumps(data).decode()
                assert orjson.loads(frame) == data
    await d.util.send_to_all(blob, exclude=a_id)
    assert await recv(b) == blob
    assert await nothing_more(a)


async def test_send_by_flag_across_nodes(d: Deployment) -> None:
    (x, x_id), (y, y_id), (z, z_id), (w, w_id) = [await d.client(i) for i in (0, 1, 2, 0)]
    user, other = unique("user"), unique("user")
    u = d.util
    assert await u.bind(x_id, user) is True and await u.bind(y_id, user) is True
    assert await u.bind(z_id, other) is True and await u.bind(w_id, other) is True
    assert await u.send_by_flag(user, "for user", ack=True) == 2
    assert await recv(x) == "for user" and await recv(y) == "for user"
    assert all([await nothing_more(ws) for ws in (z, w)])
    await u.send_by_flag(user, {"fire": "and forget"})
    assert orjson.loads(await recv(x)) == {"fire": "and forget"}
    assert orjson.loads(await recv(y)) == {"fire": "and forget"}
    assert await u.send_by_flag([user, other, user], "both flags", ack=True) == 4
    assert [await recv(ws) for ws in (x, y, z, w)] == ["both flags"] * 4
    # without ack (routing mode: one publish per flag; n0 holds both flags and must apply it once)
    await u.send_by_flag([user, other], "both again")
    assert [await recv(ws) for ws in (x, y, z, w)] == ["both again"] * 4
    assert all([await nothing_more(ws) for ws in (x, y, z, w)])
    assert await u.send_by_flag([user, other], "not y", exclude=[y_id], ack=True) == 3
    assert await recv(x) == "not y" and await recv(z) == "not y" and await recv(w) == "not y"
    assert await u.send_by_flag(unique("nobody"), "x", ack=True) == 0
    assert all([await nothing_more(ws) for ws in (x, y, z, w)])


async def test_send_to_group_once_per_connection_and_exclude(d: Deployment) -> None:
    (a, a_id), (b, b_id), (c, c_id), (e, _e_id) = [await d.client(i) for i in (0, 1, 2, 2)]
    g1, g2, g3 = unique("g1"), unique("g2"), unique("g3")
    u = d.util
    assert await u.join_group(a_id, [g1, g2, g3]) is True
    assert await u.join_group(b_id, [g1, g2]) is True
    assert await u.join_group(c_id, g3) is True
    assert await u.send_to_group([g1, g2, g3], "once", ack=True) == 3
    assert [await recv(ws) for ws in (a, b, c)] == ["once"] * 3
    await u.send_to_group([g1, g2, g3], "once again")  # no ack: still one copy each
    assert [await recv(ws) for ws in (a, b, c)] == ["once again"] * 3
    assert all([await nothing_more(ws) for ws in (a, b, c, e)])
    assert await u.send_to_group([g1, g3], "not a", exclude=a_id, ack=True) == 2
    assert await recv(b) == "not a" and await recv(c) == "not a"
    assert await u.send_to_group(unique("empty"), "x", ack=True) == 0
    assert all([await nothing_more(ws) for ws in (a, b, c, e)])


async def test_send_to_all_with_exclude(d: Deployment) -> None:
    clients = [await d.client(i) for i in (0, 0, 1, 2, 2)]
    u = d.util
    assert await u.send_to_all("everyone", ack=True) == 5
    assert [await recv(ws) for ws, _ in clients] == ["everyone"] * 5
    excluded = [clients[1][1], clients[3][1]]
    assert await u.send_to_all(b"\x00most", exclude=excluded, ack=True) == 3
    for ws, cid in clients:
        if cid not in excluded:
            assert await recv(ws) == b"\x00most"
    assert all([await nothing_more(ws) for ws, _ in clients])


#: Redis Cluster in routing mode keeps a publisher's order per shard channel only (docs/backends.md)
ORDER_PER_CHANNEL_ONLY = "rediscluster-routing"


async def test_order_from_one_publisher(d: Deployment) -> None:
    (a, a_id), (b, b_id) = await d.client(1), await d.client(2)
    room = unique("room")
    await d.util.join_group(a_id, room)
    await d.util.join_group(b_id, room)
    for i in range(200):
        if i % 2 or d.config.id == ORDER_PER_CHANNEL_ONLY:
            await d.util.send_to_group(room, str(i))
        else:
            await d.util.send([a_id, b_id], str(i))
    expected = [str(i) for i in range(200)]
    assert [await recv(a) for _ in range(200)] == expected
    assert [await recv(b) for _ in range(200)] == expected


async def test_order_of_concurrent_sends_from_one_publisher(d: Deployment) -> None:
    """Sends started together (one task each) arrive in the order they were called.

    Multi-address sends (several owners, several groups) must not let a later call overtake an
    earlier one. On Redis Cluster in routing mode a node reads each shard over its own connection,
    and the order is guaranteed per shard channel only (docs/backends.md), so there the sends all go
    through one group channel.
    """
    (a, a_id), (b, b_id) = await d.client(0), await d.client(2)
    rooms = [unique("room") for _ in range(4)]
    for room in rooms:
        await d.util.join_group(a_id, room)
        await d.util.join_group(b_id, room)
    if d.config.id == ORDER_PER_CHANNEL_ONLY:
        calls = [d.util.send_to_group(rooms[0], str(i)) for i in range(300)]
    else:
        calls = [
            d.util.send([a_id, b_id], str(i))
            if i % 5 == 0
            else d.util.send_to_group(rooms, str(i))
            if i % 5 == 1
            else d.util.send_to_group(rooms[i % 4], str(i))
            for i in range(300)
        ]
    await asyncio.gather(*calls)
    expected = [str(i) for i in range(300)]
    assert [await recv(a) for _ in range(300)] == expected
    assert [await recv(b) for _ in range(300)] == expected


# ---------------------------------------------------------------------------- membership


async def test_remote_membership_and_sessions(d: Deployment) -> None:
    (a, a_id), (b, b_id) = await d.client(1), await d.client(2)
    u = d.util
    for i in range(20):  # a send right after an awaited join reaches the new member
        group = unique(f"fresh{i}")
        assert await u.join_group(a_id, group) is True
        await u.send_to_group(group, f"m{i}")
        assert await recv(a) == f"m{i}"
    red, blue = unique("red"), unique("blue")
    assert await u.join_group(a_id, [red, blue]) is True and await u.join_group(b_id, red) is True
    assert sorted(await u.get_group_client_ids(red)) == sorted([a_id, b_id])
    assert await u.leave_group(a_id, red) is True
    assert await u.get_group_client_ids(red) == [b_id]
    assert await u.send_to_group(red, "after leave", ack=True) == 1
    assert await recv(b) == "after leave"
    assert await u.dissolve_group(blue) == 1
    assert await u.dissolve_group(red) == 1
    assert await u.get_group_count(red) == 0 and await u.get_group_count(blue) == 0
    await u.send_to_group([red, blue], "dissolved")
    assert await u.join_group(a_id + "0", red) is False  # well-formed, unknown on its live node
    assert await u.join_group("garbage", red) is False
    assert await u.leave_group(b_id + "0", red) is False

    flag = unique("user")
    assert await u.bind(b_id, flag) is True
    assert await u.get_flag(b_id) == flag and await u.flag_exists(flag) is True
    assert await u.get_flag(a_id) is None
    assert await u.bind(b_id, flag + "-new") is True  # re-binding replaces
    assert await u.flag_exists(flag) is False and await u.get_client_ids_by_flag(flag + "-new") == [b_id]
    assert await u.unbind(b_id) is True
    assert await u.get_flag(b_id) is None and await u.flag_exists(flag + "-new") is False

    assert await u.get_session(a_id) == {}
    assert await u.set_session(a_id, {"user": 1, "role": "x"}) is True
    assert await u.update_session(a_id, {"role": "admin", "lang": "fr"}) is True
    assert await u.get_session(a_id) == {"user": 1, "role": "admin", "lang": "fr"}
    assert await u.set_session(a_id, {"only": [True, None]}) is True
    assert await u.get_session(a_id) == {"only": [True, None]}
    assert await u.get_session(b_id) == {}
    assert await u.set_session(a_id + "0", {"x": 1}) is False
    assert await u.get_session("n9.zzzzzzzz.1") == {}
    assert all([await nothing_more(ws) for ws in (a, b)])


async def test_close_and_close_by_flag_with_codes_and_reasons(d: Deployment) -> None:
    (a, a_id), (b, b_id), (c, c_id), (e, e_id) = [await d.client(i) for i in (1, 0, 2, 2)]
    u = d.util
    group, flag = unique("room"), unique("user")
    assert await u.join_group(a_id, group) is True
    assert await u.bind(b_id, flag) is True and await u.bind(c_id, flag) is True
    assert await u.close(a_id, 4001, "kicked out") == 1
    assert await closed_with(a) == (4001, "kicked out")
    assert await u.exists(a_id) is False
    assert await u.get_group_count(group) == 0  # it left its groups at once
    assert await u.close_by_flag(flag, 4002, "flag closed") == 2
    assert await closed_with(b) == (4002, "flag closed")
    assert await closed_with(c) == (4002, "flag closed")
    assert await u.exists(b_id) is False and await u.exists(c_id) is False
    assert await u.flag_exists(flag) is False
    assert await u.close([a_id, "n9.zzzzzzzz.1", "garbage"]) == 0  # already closed / unknown
    assert await u.close(e_id, wait=False) is None
    assert await closed_with(e) == (1000, "")
    await eventually(lambda: u.exists(e_id), False)
    assert await u.get_connection_count() == 0


# ---------------------------------------------------------------------------- queries


async def test_queries_with_exact_counts(d: Deployment) -> None:
    per_node = [2, 1, 3]
    clients = [await d.client(i) for i, n in enumerate(per_node) for _ in range(n)]
    ids = [cid for _, cid in clients]
    u = d.util
    g1, g2, flag = unique("qa"), unique("qb"), unique("quser")
    for cid in ids[:4]:  # n0, n0, n1, n2
        assert await u.join_group(cid, g1) is True
    assert await u.join_group(ids[5], [g1, g2]) is True
    assert await u.bind(ids[0], flag) is True and await u.bind(ids[4], flag) is True

    assert await u.get_connection_count() == 6
    assert await u.get_group_count(g1) == 5
    assert await u.get_group_count(g2) == 1
    assert await u.get_group_count(unique("none")) == 0
    assert sorted(await u.get_group_client_ids(g1)) == sorted([*ids[:4], ids[5]])
    assert await u.get_group_client_ids(g2) == [ids[5]]
    assert await u.get_groups() == sorted(["lobby", g1, g2])  # the demo app puts everyone in lobby
    assert await u.flag_exists(flag) is True and await u.flag_exists(unique("none")) is False
    assert await u.get_flag(ids[0]) == flag and await u.get_flag(ids[4]) == flag
    assert await u.get_flag(ids[1]) is None
    assert sorted(await u.get_client_ids_by_flag(flag)) == sorted([ids[0], ids[4]])
    assert await u.get_client_ids_by_flag(unique("none")) == []
    for cid in ids:
        assert await u.exists(cid) is True
    for bad in (ids[0] + "0", ids[2][:-1] + "zz", "n9.zzzzzzzz.1", "", "garbage", "a.b", "..", "n0..1"):
        assert await u.exists(bad) is False, bad
    nodes = await u.get_nodes()
    assert [n["node_id"] for n in nodes] == NODE_IDS
    assert [n["connections"] for n in nodes] == per_node
    assert [n["instance"] for n in nodes] == [d.instances[nid] for nid in NODE_IDS]
    assert await u.send_to_group(g1, "g1", ack=True) == 5
    assert await u.send_by_flag(flag, "flag", ack=True) == 2
    assert await u.send_to_all("all", ack=True) == 6
    # the first two clients got all three, in order
    assert [await recv(clients[0][0]) for _ in range(3)] == ["g1", "flag", "all"]


async def test_the_seeds_queries_across_nodes(d: Deployment) -> None:
    """GatewayClient's getUidListByGroup / getClientSessionsByGroup / batchGetClientIdByUid, imi's
    isInGroup, with members on several nodes and one flag on two nodes."""
    clients = [await d.client(i) for i in (0, 0, 1, 2, 2)]
    ids = [cid for _, cid in clients]
    u = d.util
    room, ann, bob, nobody = unique("room"), unique("ann"), unique("bob"), unique("nobody")
    for cid in ids[:4]:
        assert await u.join_group(cid, room) is True
    assert await u.bind(ids[0], ann) is True and await u.bind(ids[2], ann) is True  # ann on n0 and n1
    assert await u.bind(ids[3], bob) is True
    assert await u.set_session(ids[1], {"guest": True}) is True
    assert await u.get_group_flags(room) == sorted([ann, bob])
    assert await u.get_group_flag_count(room) == 2
    assert set(await u.get_flags()) >= {ann, bob} and nobody not in await u.get_flags()
    flags = await u.get_flags()
    assert await u.get_flag_count() == len(flags)
    sessions = await u.get_group_sessions(room)
    assert sessions == {ids[0]: {}, ids[1]: {"guest": True}, ids[2]: {}, ids[3]: {}}
    assert await u.get_client_ids_by_flags([ann, bob, nobody]) == {
        ann: sorted([ids[0], ids[2]]),
        bob: [ids[3]],
        nobody: [],
    }
    assert await u.is_in_group(ids[2], room) is True
    assert await u.is_in_group(ids[4], room) is False
    assert await u.is_in_group(ids[0] + "9", room) is False  # unknown connection
    assert await u.get_presence(room) == {ann: 2, bob: 1}


async def test_send_bulk_each_connection_gets_exactly_its_payloads_in_order(d: Deployment) -> None:
    clients = [await d.client(i % 3) for i in range(30)]
    pairs = [(clients[i % 30][1], f"{i % 30}:{i // 30}") for i in range(10_000)]
    started = time.perf_counter()
    await d.util.send_bulk(pairs)
    for index, (ws, _) in enumerate(clients):
        expected = [f"{index}:{n}" for n in range(len(range(index, 10_000, 30)))]
        assert [await recv(ws) for _ in expected] == expected
    took = time.perf_counter() - started
    print(f"{d.config.id}: send_bulk of 10,000 pairs to 30 connections on 3 nodes delivered in {took:.3f}s")
    for ws, _ in clients:
        assert await nothing_more(ws, 0.1)


async def test_send_bulk_by_flag_and_binary_payloads(d: Deployment) -> None:
    (a, a_id), (b, b_id), (c, c_id) = [await d.client(i) for i in range(3)]
    u = d.util
    ann, bob = unique("ann"), unique("bob")
    assert await u.bind(a_id, ann) and await u.bind(b_id, ann) and await u.bind(c_id, bob)
    await u.send_bulk_by_flag([(ann, "hi ann"), (bob, b"\x00bob"), (ann, {"n": 2}), (unique("none"), "x")])
    for ws in (a, b):
        assert [await recv(ws), await recv(ws)] == ["hi ann", '{"n":2}']
    assert await recv(c) == b"\x00bob"
    await u.send_bulk([(a_id, b"\x01"), (c_id, "only c"), (a_id, "second for a")])
    assert [await recv(a), await recv(a)] == [b"\x01", "second for a"]
    assert await recv(c) == "only c"
    assert await nothing_more(b)


async def test_close_with_a_last_frame_and_close_guests(d: Deployment) -> None:
    (a, a_id), (b, _b_id), (c, c_id) = [await d.client(i) for i in range(3)]
    u = d.util
    flag = unique("kept")
    assert await u.bind(c_id, flag) is True
    assert await u.close(a_id, 4000, "bye", data={"type": "kicked"}) == 1
    assert await recv(a) == '{"type":"kicked"}'  # the last frame, then the close
    assert await closed_with(a) == (4000, "bye")
    assert await u.close_by_flag(flag, 4001, "flag", data=b"last") == 1
    assert await recv(c) == b"last"
    assert await closed_with(c) == (4001, "flag")
    await asyncio.sleep(1.0)
    (young, _), (bound, bound_id) = await d.client(1), await d.client(2)
    assert await u.bind(bound_id, unique("user")) is True
    await asyncio.sleep(0.3)
    # b (a guest, open > 1 s) goes; young (a guest, just opened) and bound (has a flag) stay
    assert await u.close_guests(older_than=0.9, data="guests out", code=4002, reason="guest") == 1
    assert await recv(b) == "guests out"
    assert await closed_with(b) == (4002, "guest")
    assert await nothing_more(young) and await nothing_more(bound)


async def test_bind_without_replacing(d: Deployment) -> None:
    (_, a_id), (_, b_id) = await d.client(0), await d.client(2)
    u = d.util
    first, second = unique("first"), unique("second")
    assert await u.bind(a_id, first, replace=False) is True  # no flag yet: binds
    assert await u.bind(a_id, second, replace=False) is False  # has one: left alone
    assert await u.get_flag(a_id) == first
    assert await u.bind(a_id, second) is True  # replacing is the default
    assert await u.get_flag(a_id) == second
    assert await u.bind(b_id + "9", first, replace=False) is False  # unknown connection


# ---------------------------------------------------------------------------- routing on the broker


async def test_subscriptions_follow_members_on_the_broker(d: Deployment) -> None:
    if d.config.broker != "amqp":
        assert await d.all_subscribers() == 3  # every node, and only the nodes, hear broadcasts
    if not d.config.routing:
        # fanout mode: one channel / one binding, nothing per group
        (a, a_id), _ = await d.client(0), await d.client(1)
        group = unique("fan")
        assert await d.util.join_group(a_id, group) is True
        if d.config.broker == "amqp":
            assert await d.bound_nodes(group) == []
        else:
            assert await d.numsub(d.group_channel(group)) == 0
        assert await d.util.send_to_group(group, "fan", ack=True) == 1
        assert await recv(a) == "fan"
        return
    group = unique("precise")
    (a, a_id), (a2, a2_id), (b, _b_id), (c, c_id) = [await d.client(i) for i in (0, 0, 1, 2)]
    u = d.util
    # the demo app joins every client to "lobby": wait until the broker has every node on it
    await eventually(lambda: d.subscribed_nodes("lobby"), 3)
    before = await d.redis_subscriptions() if d.config.broker != "amqp" else None
    assert await d.subscribed_nodes(group) == 0
    assert await u.join_group(a_id, group) is True
    assert await d.subscribed_nodes(group) == 1  # only n0 has a member
    if d.config.broker == "amqp":
        assert await d.bound_nodes(group) == ["n0"]
    assert await u.join_group(a2_id, group) is True
    assert await d.subscribed_nodes(group) == 1  # one subscription per node, not per member
    assert await u.join_group(c_id, group) is True
    assert await d.subscribed_nodes(group) == 2
    if d.config.broker == "amqp":
        assert await d.bound_nodes(group) == ["n0", "n2"]
    else:
        # the broker's own view of each node's connections: n1 (no member) holds nothing for it
        assert before is not None
        after = await d.redis_subscriptions()
        assert min(before.values()) >= 4  # inbox, node, all and lobby at least
        assert after == {"n0": before["n0"] + 1, "n1": before["n1"], "n2": before["n2"] + 1}
    assert await u.send_to_group(group, "members", ack=True) == 3
    assert [await recv(ws) for ws in (a, a2, c)] == ["members"] * 3
    assert await nothing_more(b)
    assert await u.leave_group(c_id, group) is True  # n2's last member: unsubscribed when it returns
    assert await d.subscribed_nodes(group) == 1
    assert await u.leave_group(a_id, group) is True
    assert await d.subscribed_nodes(group) == 1  # a2 is still there
    await a2.close()  # the last member goes away by closing: unsubscribed soon after
    await eventually(lambda: d.subscribed_nodes(group), 0)
    assert await u.send_to_group(group, "nobody", ack=True) == 0

    if d.config.broker == "rediscluster":
        shards_used = 0
        for r in d.redis_clients():
            try:
                assert await r.pubsub_channels(f"{d.namespace}:*") == []  # all sharded
                shards_used += bool(await r.execute_command("PUBSUB", "SHARDCHANNELS", f"{d.namespace}:*"))
            finally:
                await r.aclose()
        assert shards_used >= 2, "every channel on one shard"


async def test_send_to_client_ids_reaches_only_the_owning_node(d: Deployment) -> None:
    _, (b, b_id), _ = [await d.client(i) for i in range(3)]
    before = [(await metrics(node.port)).get('fanout_commands_total{op="send"}', 0) for node in d.nodes]
    for i in range(3):
        await d.util.send(b_id, f"direct {i}")
    assert [await recv(b) for _ in range(3)] == [f"direct {i}" for i in range(3)]
    await asyncio.sleep(scaled(0.3))
    assert await d.util.send_to_all("fence", ack=True) == 3  # every node has applied what came before

    async def deltas() -> list[float]:
        after = [(await metrics(node.port)).get('fanout_commands_total{op="send"}', 0) for node in d.nodes]
        return [x - y for x, y in zip(after, before, strict=True)]

    if d.config.routing:
        assert await deltas() == [1, 4, 1]
    else:
        await eventually(deltas, [4, 4, 4])  # fanout mode: every node gets every command


# ---------------------------------------------------------------------------- garbage on the bus


async def test_garbage_on_the_bus_is_dropped_and_counted(d: Deployment) -> None:
    (a, _a_id), (b, b_id), (c, _c_id) = [await d.client(i) for i in range(3)]
    group = unique("junk")
    assert await d.util.join_group(b_id, group) is True
    dropped = 'fanout_commands_dropped_total{reason="%s"}'
    reasons = ("malformed", "version", "oversized")

    async def counts() -> list[list[float]]:
        return [[(await metrics(node.port)).get(dropped % r, 0) for r in reasons] for node in d.nodes]

    before = await counts()
    rand = b"\x00" + os.urandom(300)  # never starts with "v"
    junk = [rand, b"v2;;{bad\n", b"v9;;{}\n", b"v2;;" + os.urandom(10 * 1000 * 1000)]
    messages = [("all", raw) for raw in junk]
    if d.config.routing:  # a group channel too (in fanout mode nobody listens to one)
        messages += [(f"g.{group}", rand), (f"g.{group}", b"v2;;{bad\n")]
    receivers = await d.publish_raw(messages)
    if d.config.broker == "redis" or (d.config.broker == "rediscluster" and d.config.routing):
        # the broker counts the receivers: every node for "all", the one with a member for the group
        assert receivers == [3, 3, 3, 3] + ([1, 1] if d.config.routing else [])
    assert await d.util.send_to_all("still alive", ack=True) == 3
    assert [await recv(ws) for ws in (a, b, c)] == ["still alive"] * 3

    async def deltas() -> list[list[float]]:
        return [
            [x - y for x, y in zip(n1, n0, strict=True)]
            for n1, n0 in zip(await counts(), before, strict=True)
        ]

    extra = 2 if d.config.routing else 0  # only n1 has a member of the group
    await eventually(deltas, [[2, 1, 1], [2 + extra, 1, 1], [2, 1, 1]])
    for node in d.nodes:
        status, _ = await asyncio.get_running_loop().run_in_executor(None, http_get, node.port, "/healthz")
        assert status == 200
    await d.util.send_to_group(group, "group still works")
    assert await recv(b) == "group still works"


# ---------------------------------------------------------------------------- heartbeats


async def test_killed_node_drops_out_of_the_cluster(d: Deployment) -> None:
    """A SIGKILLed node (a throwaway 4th one) leaves get_nodes() within 15 s; queries keep answering."""
    extra = _start_nodes(d.tmp, [d.env("n3")])[0]
    try:
        (a, _a_id) = await d.client(0)
        doomed = [await client(extra.port) for _ in range(2)]
        d.opened.extend(ws for ws, _ in doomed)
        u = d.util

        async def nodes() -> list[tuple[Any, Any]]:
            return [(n["node_id"], n["connections"]) for n in await u.get_nodes()]

        await eventually(nodes, [("n0", 1), ("n1", 0), ("n2", 0), ("n3", 2)])
        assert await u.get_connection_count() == 3
        assert await u.send_to_all("four nodes", ack=True) == 3
        extra.kill()
        started = time.monotonic()
        await eventually(nodes, [("n0", 1), ("n1", 0), ("n2", 0)], timeout=15)
        await eventually(u.get_connection_count, 1, timeout=15)
        assert time.monotonic() - started < scaled(15)
        for _ in range(5):  # and they keep answering, exactly, without waiting for the dead node
            t0 = time.monotonic()
            assert await u.get_connection_count() == 1
            assert await u.get_groups() == ["lobby"]
            assert time.monotonic() - t0 < scaled(2)
        assert await u.send_to_all("three nodes", ack=True) == 1
        assert await recv(a) == "four nodes" and await recv(a) == "three nodes"
        assert await u.exists(doomed[0][1]) is False
        for ws, _ in doomed:
            assert await recv(ws) == "four nodes"
            with pytest.raises(ConnectionClosed):
                await recv(ws, 10)
    finally:
        extra.kill()


# ---------------------------------------------------------------------------- signed commands


@pytest.mark.parametrize("broker", ["redis", "amqp"], ids=["redis-routing", "amqp-routing"])
async def test_with_a_secret_unsigned_and_forged_commands_are_dropped(broker: str, tmp_path: Path) -> None:
    url = REDIS_URL if broker == "redis" else AMQP_URL
    namespace = _unique_namespace("tcsig")
    secret = "s3cret-" + os.urandom(4).hex()
    node = _start_nodes(
        tmp_path,
        [
            {
                "FANOUT_URL": url,
                "FANOUT_MODE": "routing",
                "FANOUT_NAMESPACE": namespace,
                "FANOUT_NODE_ID": "n0",
                "FANOUT_SECRET": secret,
            }
        ],
    )[0]
    try:
        ws, cid = await client(node.port)
        config = Config(broker, "routing")
        deployment = Deployment(config, url, namespace, tmp_path, [node], None)  # type: ignore[arg-type]
        now = time.time()
        unsigned = protocol.encode(Send(Target.all(), b"unsigned"))
        forged = protocol.Encoder("rogue", namespace, b"another key").encode(
            Send(Target.all(), b"forged"), now
        )
        signed = protocol.Encoder("rogue", namespace, secret.encode()).encode(
            Send(Target.all(), b"signed"), now
        )
        receivers = await deployment.publish_raw([("all", unsigned), ("all", forged), ("all", signed)])
        assert receivers == ([1, 1, 1] if broker == "redis" else [None] * 3)
        assert await recv(ws) == "signed"
        samples = await metrics(node.port)
        assert samples.get('fanout_commands_dropped_total{reason="signature"}') == 2
        async with ServerUtil(
            url, mode="routing", namespace=namespace, heartbeat_interval=HEARTBEAT, secret=secret
        ) as util:
            assert await util.send_to_all("via util", ack=True) == 1
            assert await recv(ws) == "via util"
            assert await util.join_group(cid, "signed-room") is True
            assert await util.get_group_client_ids("signed-room") == [cid]
        # commands signed with another key, as a publisher with the wrong FANOUT_SECRET would send them
        # (a ServerUtil itself refuses to, with ConfigMismatch, once it has heard the nodes)
        wrong = protocol.Encoder("u-wrong", namespace, b"wrong")
        await deployment.publish_raw(
            [
                (
                    f"n.{cid.rpartition('.')[0]}",
                    wrong.encode(Send(Target.clients(cid), b"forged via util"), now),
                ),
                ("all", wrong.encode(Send(Target.all(), b"forged via util"), now)),
            ]
        )
        await eventually(lambda: _metric(node.port, 'fanout_commands_dropped_total{reason="signature"}'), 4)
        assert await nothing_more(ws)
        await ws.close()
        assert node.terminate() == 0
    finally:
        node.kill()
        if broker == "amqp":
            await _amqp_cleanup(namespace)


async def _metric(port: int, name: str) -> float:
    return (await metrics(port)).get(name, 0)
