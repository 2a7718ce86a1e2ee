"""AmqpBackend against the real RabbitMQ on 127.0.0.1:5672 (guest/guest); no mocks.

Every test uses its own namespace, so exchanges, queues and bindings are checked on the broker with
``rabbitmqctl`` without seeing anyone else's. Network failures go through :class:`TcpProxy`.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aio_pika
import pytest

from fanout.backends.amqp import AmqpBackend, parse_url
from fanout.config import Mode, Settings
from fanout.exceptions import BackendUnavailable, ConfigError, ConfigMismatch, NotConnected
from fanout.naming import ALL, HEARTBEAT, Address, flag, group, inbox, node
from tests.support import free_port, scaled
from tests.support.recorder import Recorder, eventually
from tests.support.tcp_proxy import ProxyProcess, TcpProxy

BROKER = "127.0.0.1:5672"
URL = f"amqp://guest:guest@{BROKER}/"
ROOT = Path(__file__).resolve().parents[1]


# -- helpers -------------------------------------------------------------------------------------


async def rabbitmqctl(*args: str) -> list[list[str]]:
    """Run ``rabbitmqctl -q <args>``; the output as rows of tab-separated fields (header dropped)."""
    proc = await asyncio.create_subprocess_exec(
        "rabbitmqctl",
        "-q",
        *args,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    lines = out.decode().splitlines()[1:]  # first line: column names
    return [line.split("\t") for line in lines if line]


async def broker_bindings(ns: str, queue: str | None = None) -> set[tuple[str, str, str]]:
    """(exchange, queue, routing key) of the bindings from the exchanges of namespace ``ns``
    (only those to ``queue`` if given)."""
    rows = await rabbitmqctl("list_bindings", "source_name", "destination_name", "routing_key")
    exchanges = (ns, f"{ns}.ctl")
    return {
        (row[0], row[1], row[2] if len(row) > 2 else "")
        for row in rows
        if row[0] in exchanges and queue in (None, row[1])
    }


async def broker_queues(ns: str) -> set[str]:
    rows = await rabbitmqctl("list_queues", "name")
    return {row[0] for row in rows if row[0].startswith(f"{ns}.")}


Factory = Callable[..., Awaitable[tuple[AmqpBackend, Recorder]]]


@pytest.fixture
async def ns() -> AsyncIterator[str]:
    """A fresh namespace; its (non-durable, leftover) exchanges are deleted afterwards."""
    name = "t" + uuid.uuid4().hex[:10]
    yield name
    connection = await aio_pika.connect(URL)
    async with connection:
        channel = await connection.channel()
        for exchange in (name, f"{name}.ctl"):
            await channel.exchange_delete(exchange)


@pytest.fixture
async def make(ns: str) -> AsyncIterator[Factory]:
    """``await make(mode=..., url=..., **settings)`` -> a connected (backend, Recorder); closed at the end."""
    backends: list[AmqpBackend] = []

    async def factory(
        mode: Mode = Mode.ROUTING, url: str = URL, name: str | None = None, **options: float
    ) -> tuple[AmqpBackend, Recorder]:
        settings = Settings.create(url, namespace=ns, mode=mode, **options)
        backend = AmqpBackend(settings, inbox=name or f"ep-{uuid.uuid4().hex[:8]}")
        received = Recorder()
        await backend.connect(received)
        backends.append(backend)
        return backend, received

    yield factory
    for backend in backends:
        await backend.close()


# -- publish / receive -----------------------------------------------------------------------------


async def test_routing_mode_delivers_only_what_is_bound(make: Factory, ns: str) -> None:
    a, a_in = await make()
    b, b_in = await make()
    pub, pub_in = await make()
    await a.subscribe([ALL, group("lobby"), flag("u1"), node("a1")])
    await b.subscribe([ALL, group("other")])

    for address, body in [
        (group("lobby"), b"to-lobby"),
        (flag("u1"), b"to-u1"),
        (node("a1"), b"to-a1"),
        (group("other"), b"to-other"),
        (ALL, b"to-all"),
        (a.inbox_address, b"to-a-inbox"),
        (pub.inbox_address, b"to-pub-inbox"),
    ]:
        assert await pub.publish(address, body) is None
    await a_in.wait_for_message(b"to-a-inbox")
    await b_in.wait_for_message(b"to-all")
    await pub_in.wait_for_message(b"to-pub-inbox")
    await asyncio.sleep(0.1)
    assert a_in.messages == [b"to-lobby", b"to-u1", b"to-a1", b"to-all", b"to-a-inbox"]
    assert b_in.messages == [b"to-other", b"to-all"]
    assert pub_in.messages == [b"to-pub-inbox"]


async def test_fanout_mode_commands_everywhere_control_only_where_bound(make: Factory, ns: str) -> None:
    a, a_in = await make(Mode.FANOUT)
    b, b_in = await make(Mode.FANOUT)
    util, util_in = await make(Mode.FANOUT)  # a ServerUtil: hears heartbeats, not commands
    await a.subscribe([ALL])
    await b.subscribe([ALL])
    await util.subscribe([HEARTBEAT])

    await util.publish(group("lobby"), b"cmd-lobby")  # any command address goes to every node
    await util.publish(node("somebody"), b"cmd-node")
    await a.publish(HEARTBEAT, b"hb-a")
    await a.publish(util.inbox_address, b"reply-a")
    await util.publish(b.inbox_address, b"req-b")
    await util_in.wait_for_message(b"reply-a")
    await b_in.wait_for_message(b"req-b")
    await a_in.wait_for_message(b"cmd-node")
    await asyncio.sleep(0.1)
    assert a_in.messages == [b"cmd-lobby", b"cmd-node"]  # no heartbeat, no inbox traffic of others
    assert b_in.messages == [b"cmd-lobby", b"cmd-node", b"req-b"]
    assert util_in.messages == [b"hb-a", b"reply-a"]  # no commands


async def test_fanout_mode_binding_is_one_keyless_binding(make: Factory, ns: str) -> None:
    a, _ = await make(Mode.FANOUT, name="fa")
    queue = f"{ns}.q.fa"
    assert await broker_bindings(ns) == {(f"{ns}.ctl", queue, "i.fa")}
    await a.subscribe([ALL, group("x")])
    assert (ns, queue, "") in await broker_bindings(ns)
    await a.unsubscribe([group("x")])  # ALL still wants the fanout binding
    assert (ns, queue, "") in await broker_bindings(ns)
    await a.unsubscribe([ALL])
    assert await broker_bindings(ns) == {(f"{ns}.ctl", queue, "i.fa")}


# -- subscriptions on the broker ---------------------------------------------------------------------


async def test_bindings_follow_subscriptions_exactly(make: Factory, ns: str) -> None:
    a, _ = await make(name="node-a")
    queue = f"{ns}.q.node-a"
    assert await broker_queues(ns) == {queue}
    inbox_binding = (f"{ns}.ctl", queue, "i.node-a")
    assert await broker_bindings(ns) == {inbox_binding}

    await a.subscribe([group("lobby"), flag("u 1"), HEARTBEAT])
    assert await broker_bindings(ns) == {
        inbox_binding,
        (ns, queue, "g.lobby"),
        (ns, queue, "f.u%201"),
        (f"{ns}.ctl", queue, "hb"),
    }
    await a.unsubscribe([group("lobby"), HEARTBEAT, a.inbox_address])  # the inbox cannot be dropped
    assert await broker_bindings(ns) == {inbox_binding, (ns, queue, "f.u%201")}
    assert a.subscriptions == {a.inbox_address, flag("u 1")}


async def test_subscribe_is_confirmed_before_it_returns(make: Factory) -> None:
    a, a_in = await make()
    pub, _ = await make()
    for i in range(20):
        await a.subscribe([group(f"g{i}")])
        await pub.publish(group(f"g{i}"), f"m{i}".encode())  # published right after the return
    await a_in.wait_for_count(20)
    assert a_in.messages == [f"m{i}".encode() for i in range(20)]


async def test_unsubscribe_stops_delivery(make: Factory) -> None:
    a, a_in = await make()
    pub, _ = await make()
    await a.subscribe([group("g")])
    await pub.publish(group("g"), b"before")
    await a_in.wait_for_message(b"before")
    await a.unsubscribe([group("g")])
    await pub.publish(group("g"), b"after")
    await pub.publish(a.inbox_address, b"marker")  # same publisher, so it arrives after "after" would
    await a_in.wait_for_message(b"marker")
    assert a_in.messages == [b"before", b"marker"]


async def test_close_leaves_nothing_and_is_idempotent(make: Factory, ns: str) -> None:
    a, _ = await make(name="closing")
    await a.subscribe([group("g"), ALL])
    assert await broker_queues(ns) == {f"{ns}.q.closing"}
    await a.close()
    await a.close()
    assert not a.healthy
    assert await broker_queues(ns) == set()
    assert await broker_bindings(ns) == set()
    with pytest.raises(NotConnected):
        await a.publish(ALL, b"x")


# -- ordering and confirms ---------------------------------------------------------------------------


@pytest.mark.parametrize("confirms", ["0", "1"])
async def test_order_of_200_concurrent_publishes(make: Factory, confirms: str) -> None:
    a, a_in = await make()
    pub, _ = await make(url=f"{URL}?confirms={confirms}")
    assert pub.confirms is (confirms == "1")
    await a.subscribe([group("g")])
    bodies = [f"{i:03d}".encode() for i in range(200)]
    tasks = [asyncio.create_task(pub.publish(group("g"), body)) for body in bodies]
    assert await asyncio.gather(*tasks) == [None] * 200
    for body in bodies[:50]:  # and sequential ones after them
        await pub.publish(group("g"), b"s" + body)
    await a_in.wait_for_count(250)
    assert a_in.messages == bodies + [b"s" + body for body in bodies[:50]]


@pytest.mark.parametrize("confirms", ["0", "1"])
async def test_bodies_of_every_size_and_batches_arrive_whole_and_in_order(
    make: Factory, confirms: str
) -> None:
    """Our own frames: empty bodies, bodies over the broker's frame size (several body frames), binary
    bytes including the frame-end octet, and publish_many batches from concurrent callers."""
    a, a_in = await make()
    pub, _ = await make(url=f"{URL}?confirms={confirms}")
    await a.subscribe([group("g"), group("h")])
    bodies = [b"", b"\xce\x00\xce", bytes(range(256)) * 2000, b"y" * 131_072, b"z" * 131_065]
    await pub.publish_many([(group("g"), body) for body in bodies])
    batches = [[(group("h"), b"%d.%d" % (n, i)) for i in range(5)] for n in range(40)]
    await asyncio.gather(*(pub.publish_many(batch) for batch in batches))
    await a_in.wait_for_count(len(bodies) + 200)
    assert a_in.messages[: len(bodies)] == bodies
    assert a_in.messages[len(bodies) :] == [body for batch in batches for _, body in batch]


async def test_publishes_right_before_close_are_not_lost(make: Factory, ns: str) -> None:
    a, a_in = await make()
    await a.subscribe([group("g")])
    pub = AmqpBackend(Settings.create(URL, namespace=ns), inbox="one-shot")
    await pub.connect(Recorder())
    for i in range(50):
        await pub.publish(group("g"), b"%d" % i)
    await pub.close()  # like a CLI call: publish, then leave at once
    await a_in.wait_for_count(50)
    assert a_in.messages == [b"%d" % i for i in range(50)]


def test_url_options() -> None:
    url, confirms = parse_url("amqp://u:p@h:5672/vh?confirms=yes&name=x")
    assert confirms is True
    assert "confirms" not in url.query
    assert url.query["name"] == "x"
    assert url.query["heartbeat"] == "10"
    url, confirms = parse_url("amqp://h/?heartbeat=30")
    assert confirms is False
    assert url.query["heartbeat"] == "30"
    with pytest.raises(ConfigError, match="FANOUT_URL"):
        parse_url("amqp://h/?confirms=maybe")
    for heartbeat in ("ten", "-1", "2.5", "70000"):  # reported, not taken as "no heartbeats"
        with pytest.raises(ConfigError, match="heartbeat"):
            parse_url(f"amqp://h/?heartbeat={heartbeat}")


async def test_mode_mismatch_on_a_namespace_is_a_clear_error(make: Factory, ns: str) -> None:
    await make(Mode.FANOUT)
    settings = Settings.create(URL, namespace=ns, mode=Mode.ROUTING)
    backend = AmqpBackend(settings, inbox="mismatch")
    with pytest.raises(ConfigMismatch, match="FANOUT_MODE") as info:
        await backend.connect(Recorder())
    assert "runs in 'fanout' mode" in str(info.value)
    await backend.close()


# -- failures ----------------------------------------------------------------------------------------


async def test_connect_to_a_dead_port_fails_fast(ns: str) -> None:
    settings = Settings.create(
        f"amqp://guest:guest@127.0.0.1:{free_port()}/", namespace=ns, publish_timeout=3
    )
    backend = AmqpBackend(settings, inbox="nobody")
    started = time.monotonic()
    with pytest.raises(BackendUnavailable):
        await backend.connect(Recorder())
    assert time.monotonic() - started < scaled(3.5)
    assert not backend.healthy
    await backend.close()


async def test_connect_through_a_cut_proxy_fails_within_publish_timeout(ns: str) -> None:
    async with TcpProxy(target_port=5672) as proxy:
        proxy.cut()
        settings = Settings.create(
            f"amqp://guest:guest@127.0.0.1:{proxy.port}/", namespace=ns, publish_timeout=1.5
        )
        backend = AmqpBackend(settings, inbox="cut")
        started = time.monotonic()
        with pytest.raises(BackendUnavailable):
            await backend.connect(Recorder())
        assert time.monotonic() - started < scaled(2.5)
        await backend.close()


async def test_outage_and_recovery_restore_exactly_the_wanted_bindings(make: Factory, ns: str) -> None:
    events: list[str] = []
    async with TcpProxy(target_port=5672) as proxy:
        a, a_in = await make(
            url=f"amqp://guest:guest@127.0.0.1:{proxy.port}/", name="flaky", publish_timeout=1.0
        )
        pub, _ = await make()
        a.on_disconnect.append(lambda: events.append("down"))

        async def on_reconnect() -> None:
            events.append("up")

        a.on_reconnect.append(on_reconnect)
        await a.subscribe([group("old"), group("kept"), ALL])
        queue = f"{ns}.q.flaky"
        assert a.healthy

        proxy.cut()
        await eventually(lambda: not a.healthy, 3, "healthy turns False")
        await eventually(lambda: events == ["down"], 3, "on_disconnect fired")
        assert (a.outages, a.reconnects) == (1, 0)
        # the broker dropped the exclusive queue with the connection
        await eventually(lambda: _no_queue(ns, queue), 3, "queue gone while cut")

        # publishing while cut: BackendUnavailable within the publish timeout
        started = time.monotonic()
        with pytest.raises(BackendUnavailable):
            await a.publish(group("kept"), b"lost")
        assert 0.8 < time.monotonic() - started < scaled(2.0)

        # changes while down return at once and are applied on reconnect
        started = time.monotonic()
        await a.unsubscribe([group("old")])
        await a.subscribe([group("new")])
        assert time.monotonic() - started < 0.1

        proxy.restore()
        await eventually(lambda: a.healthy, 8, "healthy again")
        assert events == ["down", "up"]
        assert (a.outages, a.reconnects) == (1, 1)
        assert await broker_bindings(ns, queue) == {
            (f"{ns}.ctl", queue, "i.flaky"),
            (ns, queue, "g.kept"),
            (ns, queue, "g.new"),
            (ns, queue, "all"),
        }
        await pub.publish(group("old"), b"old")
        await pub.publish(group("new"), b"new")
        await pub.publish(group("kept"), b"kept")
        await a_in.wait_for_message(b"kept")
        assert a_in.messages == [b"new", b"kept"]
        await a.publish(pub.inbox_address, b"a-publishes-again")


async def _no_queue(ns: str, name: str | None = None) -> bool:
    """No queue of namespace ``ns`` (or: not the queue ``name``) exists on the broker."""
    queues = await broker_queues(ns)
    return not queues if name is None else name not in queues


async def test_publishes_during_an_outage_wait_and_keep_their_order(make: Factory) -> None:
    receiver, received = await make()
    await receiver.subscribe([group("g")])
    async with TcpProxy(target_port=5672) as proxy:
        pub, _ = await make(url=f"amqp://guest:guest@127.0.0.1:{proxy.port}/", publish_timeout=8.0)
        proxy.cut()
        await eventually(lambda: not pub.healthy, 3, "publisher sees the outage")
        bodies = [f"{i:02d}".encode() for i in range(30)]
        tasks = [asyncio.create_task(pub.publish(group("g"), body)) for body in bodies]
        await asyncio.sleep(0.3)
        assert not any(task.done() for task in tasks)
        proxy.restore()
        await asyncio.gather(*tasks)
        await received.wait_for_count(30)
        assert received.messages == bodies


async def test_repeated_outages_keep_counting(make: Factory) -> None:
    async with TcpProxy(target_port=5672) as proxy:
        a, a_in = await make(url=f"amqp://guest:guest@127.0.0.1:{proxy.port}/")
        pub, _ = await make()
        await a.subscribe([group("g")])
        for round_ in range(1, 4):
            proxy.cut()
            await eventually(lambda: not a.healthy, 3, "down")
            proxy.restore()
            await eventually(lambda: a.healthy, 8, "up")
            assert (a.outages, a.reconnects) == (round_, round_)
        await pub.publish(group("g"), b"still-there")
        await a_in.wait_for_message(b"still-there")


_KILLED_CHILD = textwrap.dedent(
    """
    import asyncio, sys
    from fanout.backends.amqp import AmqpBackend
    from fanout.config import Settings
    from fanout.naming import group

    async def main():
        backend = AmqpBackend(Settings.create(sys.argv[1], namespace=sys.argv[2]), inbox="victim")
        await backend.connect(lambda message: None)
        await backend.subscribe([group("g1"), group("g2")])
        print("ready", flush=True)
        await asyncio.sleep(3600)

    asyncio.run(main())
    """
)


async def test_a_sigkilled_endpoint_leaves_no_queue_or_binding(ns: str) -> None:
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    )
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _KILLED_CHILD, URL, ns, cwd=ROOT, env=env, stdout=subprocess.PIPE
    )
    try:
        assert child.stdout is not None
        line = await asyncio.wait_for(child.stdout.readline(), scaled(10))
        assert line.strip() == b"ready"
        assert await broker_queues(ns) == {f"{ns}.q.victim"}
        assert len(await broker_bindings(ns)) == 3
    finally:
        child.kill()
        await child.wait()
    await eventually(lambda: _no_queue(ns), 5, "no queue left after SIGKILL")
    assert await broker_bindings(ns) == set()


async def test_handler_errors_do_not_stop_delivery(make: Factory, ns: str) -> None:
    got: list[bytes] = []

    def handler(message: bytes) -> None:
        got.append(message)
        if message == b"boom":
            raise RuntimeError("handler bug")

    settings = Settings.create(URL, namespace=ns)
    backend = AmqpBackend(settings, inbox="buggy")
    await backend.connect(handler)
    try:
        pub, _ = await make()
        await pub.publish(backend.inbox_address, b"boom")
        await pub.publish(backend.inbox_address, b"fine")
        await eventually(lambda: got == [b"boom", b"fine"], 5, "both delivered")
    finally:
        await backend.close()


def test_addresses_map_to_readable_keys() -> None:
    settings = Settings.create(URL, namespace="app")
    backend = AmqpBackend(settings, inbox="srv 1")
    assert backend.queue_name == "app.q.srv%201"
    assert backend.binding_for(inbox("srv 1")) == ("app.ctl", "i.srv%201")
    assert backend.binding_for(HEARTBEAT) == ("app.ctl", "hb")
    assert backend.binding_for(group("lobby")) == ("app", "g.lobby")
    assert backend.route_for(Address(ALL.kind)) == ("app", "all")
    fanout = AmqpBackend(Settings.create(URL, namespace="app", mode=Mode.FANOUT), inbox="x")
    assert fanout.binding_for(group("lobby")) == ("app", "")
    assert fanout.route_for(group("lobby")) == ("app", "g.lobby")
    assert fanout.binding_for(HEARTBEAT) == ("app.ctl", "hb")


@pytest.mark.parametrize("which", ["", " consumer"], ids=["publishing", "consuming"])
async def test_connection_closed_by_the_broker_is_recovered(make: Factory, ns: str, which: str) -> None:
    """A link is two connections (aiormq's, publishing; its own, consuming the queue): either closed by
    the broker is an outage, and the whole link comes back."""
    a, a_in = await make(name="closed-by-broker")
    pub, _ = await make()
    await a.subscribe([group("g")])
    wanted = f'{{"connection_name","fanout {ns} closed-by-broker{which}"}}'
    rows = await rabbitmqctl("list_connections", "pid", "client_properties")
    pids = [row[0] for row in rows if wanted in row[1]]
    assert len(pids) == 1, (pids, rows)
    await rabbitmqctl("close_connection", pids[0], "test: broker closes the connection")
    await eventually(lambda: a.outages == 1, 5, "outage noticed")
    await eventually(lambda: a.healthy, 8, "healthy again")
    assert a.reconnects == 1
    await pub.publish(group("g"), b"after-close")
    await a_in.wait_for_message(b"after-close")


async def test_proxy_as_a_separate_process(make: Factory) -> None:
    with ProxyProcess("127.0.0.1:5672") as proxy:
        a, a_in = await make(url=f"amqp://guest:guest@127.0.0.1:{proxy.port}/")
        pub, _ = await make()
        proxy.cut()
        await eventually(lambda: not a.healthy, 3, "down after SIGUSR1")
        proxy.restore()
        await eventually(lambda: a.healthy, 8, "up after SIGUSR2")
        await pub.publish(a.inbox_address, b"via-process-proxy")
        await a_in.wait_for_message(b"via-process-proxy")
