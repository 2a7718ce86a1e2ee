"""Broker outages, end to end: real node processes, real websocket clients, real brokers; no mocks.

Redis outages are a SIGKILL of a redis-server of our own (``start_redis``), then a restart on the same
port. AMQP outages are a cut of a TCP proxy process between the nodes and the shared RabbitMQ (which is
never stopped): the proxy aborts both sides of every connection, so the broker sees the nodes vanish and
deletes their exclusive queues, and refuses new connections until it is restored.

What the contract ("Backends and modes") promises and these tests check:

* during an outage ``/healthz`` is 503 and ``fanout_backend_up`` is 0; the nodes keep serving their
  clients, and membership can still change locally (``conn.join_group`` etc. return at once);
* after it, health is back, the reconnect/outage counters moved, the ``on_reconnect`` hook fired (once
  the subscriptions were back), and the broker holds exactly the subscriptions/bindings that membership
  needs *now* (a group created during the outage is there, one whose last member left is not);
* every send then reaches every member exactly once, and nobody else;
* nothing in the nodes' own state is lost: clients stay connected, sessions are kept;
* a ServerUtil publish while the broker is unreachable raises a fanout exception within a bounded time,
  and connecting to a dead broker fails fast;
* AMQP: stopped or killed nodes leave no queue behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest
from websockets.asyncio.client import ClientConnection
from websockets.protocol import State

from fanout import BackendUnavailable, FanoutError, ServerUtil, naming
from fanout.ids import owner_of
from fanout.naming import Address, safe_segment
from tests.apps.reconnect_probe import QUESTION
from tests.support.nodes import (
    NodeProcess,
    client,
    free_port,
    http_get,
    nothing_more,
    recv,
    scaled,
    start_node,
    unique_namespace,
)
from tests.support.redis_servers import RedisServer, start_redis
from tests.support.tcp_proxy import ProxyProcess

RABBIT = "127.0.0.1:5672"
RABBIT_URL = f"amqp://guest:guest@{RABBIT}/"
PROBE = "tests.apps.reconnect_probe:app"
#: messages sent to each target after an outage
N = 50


# -- helpers -------------------------------------------------------------------------------------


async def eventually(check: Callable[[], Any], timeout: float, what: str) -> Any:
    """Poll ``check`` (sync or async) until it returns something truthy, at most ``timeout`` (scaled) s."""
    deadline = time.monotonic() + scaled(timeout)
    while True:
        result = check()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {scaled(timeout):g}s waiting for {what}")
        await asyncio.sleep(0.05)


def assert_clean_log(log: str) -> None:
    """No error logged, and no traceback through fanout's own code.

    (aiormq logs the link loss itself as a WARNING with its own traceback; that is the client library
    reporting the outage we caused, not a failure of the node.)
    """
    for line in log.splitlines():
        assert " ERROR " not in line and " CRITICAL " not in line, log
        assert "/fanout/" not in line and "/node/" not in line, log


def metrics(port: int) -> dict[str, float]:
    """The unlabelled samples of a node's /metrics."""
    status, body = http_get(port, "/metrics")
    assert status == 200, body
    samples = {}
    for line in body.splitlines():
        if line and not line.startswith("#") and "{" not in line:
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    return samples


async def node_metrics(node: NodeProcess) -> dict[str, float]:
    return await asyncio.to_thread(metrics, node.port)


async def health(node: NodeProcess) -> int:
    status, _ = await asyncio.to_thread(http_get, node.port, "/healthz")
    return status


async def rabbitmqctl(*args: str) -> list[list[str]]:
    """``rabbitmqctl -q <args>`` as rows of tab-separated fields (header line included)."""
    proc = await asyncio.create_subprocess_exec(
        "rabbitmqctl", "-q", *args, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    return [line.split("\t") for line in out.decode().splitlines() if line]


async def amqp_bindings(ns: str) -> set[tuple[str, str, str]]:
    """(exchange, queue, routing key) of every binding from the namespace's two exchanges."""
    rows = await rabbitmqctl("list_bindings", "source_name", "destination_name", "routing_key")
    return {(r[0], r[1], r[2] if len(r) > 2 else "") for r in rows if r[0] in (ns, f"{ns}.ctl")}


async def amqp_queues(ns: str) -> set[str]:
    return {row[0] for row in await rabbitmqctl("list_queues", "name") if row[0].startswith(f"{ns}.")}


def queue_of(ns: str, endpoint: str) -> str:
    return f"{ns}.q.{safe_segment(endpoint)}"


async def redis_subscribers(server: RedisServer, ns: str) -> dict[str, int]:
    """Every channel of the namespace that has a subscriber, with its number of subscribers."""
    channels = (await asyncio.to_thread(server.cli, "pubsub", "channels", f"{ns}:*")).split()
    if not channels:
        return {}
    out = (await asyncio.to_thread(server.cli, "pubsub", "numsub", *channels)).split()
    return {out[i]: int(out[i + 1]) for i in range(0, len(out), 2)}


async def local(ws: ClientConnection, action: str, **fields: Any) -> dict[str, Any]:
    """Drive the connection API of the control app; returns its answer (groups, flag, session)."""
    await ws.send(orjson.dumps({"local": action, **fields}).decode())
    reply: dict[str, Any] = orjson.loads(await recv(ws))
    assert reply["local"] == action, reply
    return reply


async def probe(ws: ClientConnection) -> dict[str, Any]:
    """What the reconnect probe app of ``ws``'s node has seen of ``on_reconnect``."""
    await ws.send(QUESTION)
    answer: dict[str, Any] = orjson.loads(await recv(ws))
    return answer


class Lab:
    """Everything a test starts, stopped at teardown in reverse order (by pid, never by name)."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self._stops: list[Callable[[], object]] = []
        self._clients: list[ClientConnection] = []

    def redis(self) -> RedisServer:
        server = start_redis(self.tmp_path / f"redis-{len(self._stops)}")
        self._stops.append(server.stop)
        return server

    def proxy(self) -> ProxyProcess:
        proxy = ProxyProcess(target=RABBIT)
        self._stops.append(proxy.stop)
        return proxy

    async def nodes(self, env: dict[str, str], count: int, app: str = PROBE) -> list[NodeProcess]:
        """Start ``count`` nodes at once and wait until each is healthy."""
        started = []
        for _ in range(count):
            node = start_node(self.tmp_path, env, app=app, wait=False)
            self._stops.append(node.kill)
            started.append(node)
        await asyncio.gather(*(asyncio.to_thread(node.wait_healthy, 20) for node in started))
        return started

    async def client(self, port: int) -> tuple[ClientConnection, str]:
        ws, client_id = await client(port)
        self._clients.append(ws)
        return ws, client_id

    async def aclose(self) -> None:
        for ws in self._clients:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(ws.close(), 2)
        for stop in reversed(self._stops):
            with contextlib.suppress(Exception):
                await asyncio.to_thread(stop)


@pytest.fixture
async def lab(tmp_path: Path) -> AsyncIterator[Lab]:
    lab = Lab(tmp_path)
    try:
        yield lab
    finally:
        await lab.aclose()


@dataclass
class Broker:
    """One broker as the nodes see it (through ``node_url``) and the means to take it away."""

    kind: str
    node_url: str
    util_url: str
    cut: Callable[[], None]
    restore: Callable[[], object]
    redis: RedisServer | None = None


def make_broker(lab: Lab, kind: str) -> Broker:
    if kind == "redis":
        server = lab.redis()
        return Broker(kind, server.url, server.url, server.kill, server.restart, redis=server)
    proxy = lab.proxy()
    url = f"amqp://guest:guest@127.0.0.1:{proxy.port}/"
    # the test's own ServerUtil talks to RabbitMQ directly: the outage is the nodes'
    return Broker(kind, url, RABBIT_URL, proxy.cut, proxy.restore)


@dataclass
class Member:
    """A websocket client and what the test expects its node to know about it."""

    name: str
    ws: ClientConnection
    client_id: str
    node: int
    groups: set[str] = field(default_factory=set)
    flag: str | None = None

    async def join(self, *groups: str) -> None:
        reply = await local(self.ws, "join", groups=list(groups))
        self.groups.update(groups)
        assert set(reply["groups"]) == self.groups, reply

    async def leave(self, *groups: str) -> None:
        reply = await local(self.ws, "leave", groups=list(groups))
        self.groups.difference_update(groups)
        assert set(reply["groups"]) == self.groups, reply

    async def bind(self, flag: str) -> None:
        reply = await local(self.ws, "bind", flag=flag)
        self.flag = flag
        assert reply["flag"] == flag, reply


def instance_of(member: Member) -> str:
    instance = owner_of(member.client_id)
    assert instance is not None
    return instance


def wanted_addresses(mode: str, instance: str, members: list[Member]) -> set[Address]:
    """What one node must be subscribed to, inbox included, for its ``members``."""
    wanted = {naming.ALL, naming.inbox(instance)}
    if mode == "routing":
        wanted.add(naming.node(instance))
        wanted |= {naming.group(g) for m in members for g in m.groups}
        wanted |= {naming.flag(m.flag) for m in members if m.flag is not None}
    return wanted


async def assert_broker_matches(
    broker: Broker, ns: str, mode: str, instances: list[str], members: list[Member], util_endpoint: str
) -> None:
    """The broker holds exactly the subscriptions the nodes' membership (and the ServerUtil) need."""
    per_node = {
        instance: wanted_addresses(mode, instance, [m for m in members if instance_of(m) == instance])
        for instance in instances
    }
    util_addresses = {naming.HEARTBEAT, naming.inbox(util_endpoint)}
    actual: object
    expected: object
    if broker.redis is not None:
        counts: dict[str, int] = {}
        for addresses in [*per_node.values(), util_addresses]:
            for address in addresses:
                channel = address.channel(ns)
                counts[channel] = counts.get(channel, 0) + 1
        expected = counts
    else:
        bindings = set()
        for endpoint, addresses in [*per_node.items(), (util_endpoint, util_addresses)]:
            queue = queue_of(ns, endpoint)
            for address in addresses:
                if address.kind in (naming.Kind.INBOX, naming.Kind.HEARTBEAT):
                    bindings.add((f"{ns}.ctl", queue, address.key()))
                else:
                    bindings.add((ns, queue, address.key() if mode == "routing" else ""))
        expected = bindings
    deadline = time.monotonic() + scaled(5)
    while True:  # the nodes are healthy, so this should hold at once; allow the broker a moment
        if broker.redis is not None:
            actual = await redis_subscribers(broker.redis, ns)
        else:
            actual = await amqp_bindings(ns)
        if actual == expected or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.1)
    assert actual == expected


async def send_and_check(util: ServerUtil, members: list[Member]) -> None:
    """N messages to every group, flag and to all; each member gets exactly its own, once, in order."""
    groups = sorted({g for m in members for g in m.groups} | {"gone"})
    flags = sorted({m.flag for m in members if m.flag is not None} | {"bob"})
    targets: list[tuple[str, str, Callable[[Member], bool]]] = [
        *(("group", g, lambda m, g=g: g in m.groups) for g in groups),
        *(("flag", f, lambda m, f=f: m.flag == f) for f in flags),
        ("all", "", lambda m: True),
    ]
    for kind, name, _ in targets:
        for i in range(N):
            payload = f"{kind}:{name}:{i}"
            if kind == "group":
                await util.send_to_group(name, payload)
            elif kind == "flag":
                await util.send_by_flag(name, payload)
            else:
                await util.send_to_all(payload)

    async def check(member: Member) -> None:
        expected = [
            f"{kind}:{name}:{i}" for kind, name, member_of in targets if member_of(member) for i in range(N)
        ]
        got = [await recv(member.ws, 10) for _ in expected]
        assert got == expected, f"{member.name} ({member.groups}, {member.flag}) got {got}"
        assert await nothing_more(member.ws, 0.3)

    await asyncio.gather(*(check(m) for m in members))


# -- 1, 2, 5: an outage with membership changes during it ------------------------------------------


@pytest.mark.parametrize("mode", ["routing", "fanout"])
@pytest.mark.parametrize("kind", ["redis", "amqp"])
async def test_outage_with_membership_changes_then_every_send_arrives(lab: Lab, kind: str, mode: str) -> None:
    broker = make_broker(lab, kind)
    ns = unique_namespace("out")
    env = {"FANOUT_URL": broker.node_url, "FANOUT_MODE": mode, "FANOUT_NAMESPACE": ns}
    nodes = await lab.nodes(env, 2)

    async def member(name: str, node: int) -> Member:
        ws, client_id = await lab.client(nodes[node].port)
        return Member(name, ws, client_id, node)

    a1, a2, a3 = [await member(f"a{i}", 0) for i in (1, 2, 3)]
    b1, b2, b3 = [await member(f"b{i}", 1) for i in (1, 2, 3)]
    members = [a1, a2, a3, b1, b2, b3]
    instances = [instance_of(a1), instance_of(b1)]
    # membership before the outage
    await a1.join("room", "gone")
    await a2.join("room")
    await a3.bind("alice")
    await b1.join("room")
    await b1.bind("bob")
    await b2.join("gone")
    await b3.bind("alice")
    assert [(await probe(m.ws))["reconnects"] for m in (a1, b1)] == [0, 0]
    async with ServerUtil(broker.util_url, mode=mode, namespace=ns, publish_timeout=5) as util:
        assert await util.set_session(a1.client_id, {"user": "ann"})
        assert await util.update_session(b2.client_id, {"k": [1, 2]})
        await assert_broker_matches(broker, ns, mode, instances, members, util.endpoint_id)

    # -- the outage
    await asyncio.to_thread(broker.cut)
    for node in nodes:
        await asyncio.to_thread(node.wait_healthy, 15, False)
        assert (await node_metrics(node))["fanout_backend_up"] == 0
    # local membership changes while the broker is away
    await a1.leave("gone")
    await b2.leave("gone")  # "gone" loses its last member on both nodes
    await a2.join("fresh")  # a group nobody had before the outage
    await b3.join("fresh")
    await a2.bind("carol")  # a new flag
    await b1.bind("dave")  # replaces "bob": nobody holds "bob" any more
    assert (await local(a2.ws, "session", data={"during": True}))["session"] == {"during": True}
    a4 = await member("a4", 0)  # a client that arrives during the outage
    await a4.join("room")
    members.append(a4)
    await asyncio.sleep(scaled(1))  # long enough for reconnection attempts to fail against the dead broker
    for node in nodes:  # the changes above were made while the link was really down
        assert await health(node) == 503
        assert (await node_metrics(node))["fanout_backend_reconnects_total"] == 0

    # -- the broker comes back
    await asyncio.to_thread(broker.restore)
    for node in nodes:
        await asyncio.to_thread(node.wait_healthy, 20)
    for node in nodes:
        samples = await eventually(
            functools.partial(_recovered, node), 10, f"reconnect counted on node {node.port}"
        )
        assert samples["fanout_backend_up"] == 1 and samples["fanout_backend_outages_total"] >= 1
    for ws in (a1.ws, b1.ws):  # the on_reconnect hook fired, once the subscriptions were back
        seen = await eventually(functools.partial(_hook_fired, ws), 10, "on_reconnect hook")
        assert seen["healthy_at_hook"] and all(seen["healthy_at_hook"]), seen

    async with ServerUtil(broker.util_url, mode=mode, namespace=ns, publish_timeout=5) as util:
        # the nodes' own state survived: sessions set before and during the outage
        assert await util.get_session(a1.client_id) == {"user": "ann"}
        assert await util.get_session(b2.client_id) == {"k": [1, 2]}
        assert await util.get_session(a2.client_id) == {"during": True}
        assert await util.get_session(a4.client_id) == {}
        # exactly the subscriptions needed now: "fresh" and "carol"/"dave" in, "gone" and "bob" out
        await assert_broker_matches(broker, ns, mode, instances, members, util.endpoint_id)
        await send_and_check(util, members)

    # clients connected before the outage were never dropped
    for m in members:
        assert m.ws.state is State.OPEN and m.ws.close_code is None, m.name
    for node, count in zip(nodes, (4, 3), strict=True):
        samples = await node_metrics(node)
        assert samples["fanout_connections"] == count
        assert samples["fanout_connections_closed_total"] == 0
    for m in members:
        await m.ws.close()
    for node in nodes:
        assert await asyncio.to_thread(node.terminate) == 0, node.log()
        assert_clean_log(node.log())
    if broker.redis is not None:
        await eventually(lambda: _no_redis_channels(broker, ns), 5, f"no Redis channel of {ns} left")
    else:
        await eventually(lambda: _no_queues(ns), 10, f"no queue of {ns} left")


async def _recovered(node: NodeProcess) -> dict[str, float] | None:
    samples = await node_metrics(node)
    return samples if samples["fanout_backend_reconnects_total"] >= 1 else None


async def _hook_fired(ws: ClientConnection) -> dict[str, Any] | None:
    seen = await probe(ws)
    return seen if seen["reconnects"] >= 1 else None


async def _no_redis_channels(broker: Broker, ns: str) -> bool:
    assert broker.redis is not None
    return await redis_subscribers(broker.redis, ns) == {}


async def _no_queues(ns: str) -> bool:
    return await amqp_queues(ns) == set()


# -- 3: publishing while the broker is unreachable -------------------------------------------------


async def _raises_in_bounded_time(call: Callable[[], Awaitable[object]], limit: float) -> FanoutError:
    started = time.monotonic()
    with pytest.raises(FanoutError) as raised:
        await asyncio.wait_for(call(), scaled(limit) + 5)  # the +5 only keeps a hang from stalling us
    elapsed = time.monotonic() - started
    assert elapsed < scaled(limit), f"{raised.value!r} took {elapsed:.1f}s"
    return raised.value


async def _dead_connect(url: str, ns: str) -> None:
    async with ServerUtil(url, namespace=ns, publish_timeout=2):
        pass


async def _publishes_again(util: ServerUtil) -> bool:
    try:
        await util.send_to_all("after")
    except FanoutError:
        return False
    return True


async def test_redis_publish_while_down_raises_within_the_timeout(lab: Lab) -> None:
    server = lab.redis()
    ns = unique_namespace("pub")
    await lab.nodes({"FANOUT_URL": server.url, "FANOUT_NAMESPACE": ns}, 1)  # a send needs a live node
    async with ServerUtil(server.url, namespace=ns, publish_timeout=2, heartbeat_interval=0.5) as util:
        await util.send_to_all("before")
        await asyncio.to_thread(server.kill)
        for send in (
            lambda: util.send_to_all("during"),
            lambda: util.send_to_group("room", "during"),
            lambda: util.send(["n.x.1"], "during"),
        ):
            error = await _raises_in_bounded_time(send, 5)
            assert isinstance(error, BackendUnavailable), repr(error)
        # a new ServerUtil cannot connect to the dead server, and says so fast
        error = await _raises_in_bounded_time(lambda: _dead_connect(server.url, ns), 5)
        assert isinstance(error, BackendUnavailable), repr(error)
        # the same ServerUtil publishes again once Redis is back
        await asyncio.to_thread(server.restart)
        await eventually(lambda: _publishes_again(util), 15, "a publish after the restart")


async def test_amqp_publish_while_cut_raises_within_the_timeout(lab: Lab) -> None:
    proxy = lab.proxy()
    url = f"amqp://guest:guest@127.0.0.1:{proxy.port}/"
    ns = unique_namespace("pub")
    (node,) = await lab.nodes({"FANOUT_URL": RABBIT_URL, "FANOUT_NAMESPACE": ns}, 1)  # not behind the proxy
    async with ServerUtil(url, namespace=ns, publish_timeout=2, heartbeat_interval=0.5) as util:
        await util.send_to_all("before")
        await asyncio.to_thread(proxy.cut)
        for send in (lambda: util.send_to_all("during"), lambda: util.send_to_group("room", "during")):
            error = await _raises_in_bounded_time(send, 5)
            assert isinstance(error, BackendUnavailable), repr(error)
        # connecting through the cut link, or to a port where nothing listens, fails fast
        for dead in (url, f"amqp://guest:guest@127.0.0.1:{free_port()}/"):
            error = await _raises_in_bounded_time(functools.partial(_dead_connect, dead, ns), 5)
            assert isinstance(error, BackendUnavailable), repr(error)
        await asyncio.to_thread(proxy.restore)
        await eventually(lambda: _publishes_again(util), 15, "a publish after the link came back")
    assert await asyncio.to_thread(node.terminate) == 0
    await eventually(lambda: _no_queues(ns), 10, f"no queue of {ns} left")


# -- 4: AMQP nodes leave no queue behind ---------------------------------------------------------


async def test_amqp_stopped_or_killed_nodes_leave_no_queue(lab: Lab) -> None:
    ns = unique_namespace("q")
    env = {"FANOUT_URL": RABBIT_URL, "FANOUT_MODE": "routing", "FANOUT_NAMESPACE": ns}
    stopped, killed = await lab.nodes(env, 2)
    queues = {}
    for node in (stopped, killed):
        ws, client_id = await lab.client(node.port)
        await local(ws, "join", groups=["room", f"only-{node.port}"])
        await local(ws, "bind", flag="alice")
        instance = owner_of(client_id)
        assert instance is not None
        queues[node.port] = queue_of(ns, instance)
    assert await amqp_queues(ns) == set(queues.values())
    assert {(ns, queues[stopped.port], f"g.only-{stopped.port}")} <= await amqp_bindings(ns)

    assert await asyncio.to_thread(stopped.terminate) == 0, stopped.log()
    await eventually(lambda: _queues_are(ns, {queues[killed.port]}), 10, "the stopped node's queue to go")
    await asyncio.to_thread(killed.kill)
    assert killed.proc.returncode == -9
    await eventually(lambda: _no_queues(ns), 10, "the killed node's queue to go")
    assert await amqp_bindings(ns) == set()


async def _queues_are(ns: str, expected: set[str]) -> bool:
    return await amqp_queues(ns) == expected
