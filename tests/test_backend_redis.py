"""RedisBackend against real Redis: the shared server on 6379 (unique namespace per test, nothing
destructive), throw-away servers this file starts and kills, and a local 3-master Redis Cluster."""

from __future__ import annotations

import asyncio
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from redis.crc import key_slot

from fanout.backends.redis import RedisBackend
from fanout.backends.redis_subscriber import RedisPyPubSub
from fanout.config import Settings
from fanout.exceptions import BackendUnavailable
from fanout.naming import ALL, HEARTBEAT, flag, group, node
from tests.support.recorder import Recorder, eventually
from tests.support.redis_servers import (
    RedisCluster,
    RedisServer,
    free_port,
    scaled,
    start_cluster,
    start_redis,
)

SHARED_URL = "redis://127.0.0.1:6379/0"


def unique_ns() -> str:
    return f"t{uuid.uuid4().hex[:12]}"


@pytest.fixture
async def connect() -> AsyncIterator[Callable[..., object]]:
    """``await connect(settings, inbox=...)`` -> (connected backend, its Recorder); closed at teardown."""
    opened: list[RedisBackend] = []

    async def _connect(settings: Settings, inbox: str | None = None) -> tuple[RedisBackend, Recorder]:
        backend = RedisBackend(settings, inbox=inbox or f"ep-{uuid.uuid4().hex[:8]}")
        received = Recorder()
        await backend.connect(received)
        opened.append(backend)
        return backend, received

    yield _connect
    for backend in opened:
        await backend.close()


@pytest.fixture
def shared_settings() -> Settings:
    return Settings.create(SHARED_URL, namespace=unique_ns(), publish_timeout=2.0)


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = start_redis(tmp_path / "redis")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisCluster]:
    local = start_cluster(tmp_path_factory.mktemp("cluster"))
    yield local
    local.stop()


async def _raw(url: str) -> aioredis.Redis:
    return aioredis.Redis.from_url(url, protocol=2)


# -- single server: delivery, counts, confirmation ------------------------------------------------


async def test_publish_and_receive_on_every_kind_of_address(connect, shared_settings: Settings) -> None:
    receiver, got = await connect(shared_settings, inbox="receiver")
    sender, _ = await connect(shared_settings, inbox="sender")
    targets = [
        ALL,
        HEARTBEAT,
        group("lobby"),
        group("room 1"),
        flag("user:42"),
        node("node-1"),
        group("x" * 200),
    ]
    await receiver.subscribe(targets)
    assert receiver.healthy

    for index, address in enumerate([*targets, receiver.inbox_address]):
        assert await sender.publish(address, f"m{index}".encode()) == 1, address
    assert await got.wait_for_count(len(targets) + 1) == [f"m{i}".encode() for i in range(len(targets) + 1)]

    # nobody listens there: Redis says 0 receivers and nothing arrives
    assert await sender.publish(group("nobody"), b"lost") == 0
    # binary payloads travel untouched
    payload = bytes(range(256)) * 4
    assert await sender.publish(group("lobby"), payload) == 1
    assert (await got.wait_for_count(len(targets) + 2))[-1] == payload
    assert await got.quiet() == got.messages[: len(targets) + 2]


async def test_receiver_count_counts_every_subscriber(connect, shared_settings: Settings) -> None:
    first, got1 = await connect(shared_settings)
    second, got2 = await connect(shared_settings)
    sender, _ = await connect(shared_settings)
    await first.subscribe([group("g")])
    await second.subscribe([group("g")])
    assert await sender.publish(group("g"), b"both") == 2
    assert await got1.wait_for_count(1) == [b"both"]
    assert await got2.wait_for_count(1) == [b"both"]


async def test_subscribe_returns_only_once_confirmed(connect, shared_settings: Settings) -> None:
    receiver, got = await connect(shared_settings)
    sender, _ = await connect(shared_settings)
    for index in range(50):
        await receiver.subscribe([group(f"g{index}")])
        # published right after subscribe() returned: must reach the new subscription
        assert await sender.publish(group(f"g{index}"), str(index).encode()) == 1
    assert await got.wait_for_count(50) == [str(i).encode() for i in range(50)]


async def test_concurrent_subscribes_are_each_confirmed(connect, shared_settings: Settings) -> None:
    receiver, got = await connect(shared_settings)
    sender, _ = await connect(shared_settings)
    await asyncio.gather(*(receiver.subscribe([group(f"c{i}")]) for i in range(100)))
    counts = await asyncio.gather(*(sender.publish(group(f"c{i}"), b"x") for i in range(100)))
    assert counts == [1] * 100
    await got.wait_for_count(100)


async def test_unsubscribe_stops_delivery_but_never_the_inbox(connect, shared_settings: Settings) -> None:
    receiver, got = await connect(shared_settings)
    sender, _ = await connect(shared_settings)
    await receiver.subscribe([group("a"), group("b")])
    await receiver.unsubscribe([group("a"), receiver.inbox_address])
    assert receiver.subscriptions == {receiver.inbox_address, group("b")}
    assert receiver.healthy
    assert await sender.publish(group("a"), b"gone") == 0
    assert await sender.publish(group("b"), b"kept") == 1
    assert await sender.publish(receiver.inbox_address, b"inbox") == 1
    assert await got.wait_for_count(2) == [b"kept", b"inbox"]
    assert await got.quiet() == [b"kept", b"inbox"]


async def test_channel_names_are_visible_on_the_broker(connect, shared_settings: Settings) -> None:
    ns = shared_settings.namespace
    receiver, _ = await connect(shared_settings, inbox="ep1")
    await receiver.subscribe([ALL, group("lobby"), flag("u 1"), node("n1")])
    raw = await _raw(SHARED_URL)
    try:
        channels = {c.decode() for c in await raw.pubsub_channels(f"{ns}:*")}
        assert channels == {f"{ns}:i:ep1", f"{ns}:all", f"{ns}:g:lobby", f"{ns}:f:u%201", f"{ns}:n:n1"}
        assert dict(await raw.pubsub_numsub(f"{ns}:g:lobby", f"{ns}:g:other")) == {
            f"{ns}:g:lobby".encode(): 1,
            f"{ns}:g:other".encode(): 0,
        }
        await receiver.unsubscribe([group("lobby")])
        assert f"{ns}:g:lobby".encode() not in await raw.pubsub_channels(f"{ns}:*")
        await receiver.close()
        assert await raw.pubsub_channels(f"{ns}:*") == []
    finally:
        await raw.aclose()


async def test_two_hundred_publishes_arrive_in_order(connect, shared_settings: Settings) -> None:
    receiver, got = await connect(shared_settings)
    sender, _ = await connect(shared_settings)
    await receiver.subscribe([group("seq")])
    for index in range(200):
        assert await sender.publish(group("seq"), index.to_bytes(4, "big")) == 1
    assert await got.wait_for_count(200) == [i.to_bytes(4, "big") for i in range(200)]


async def test_concurrent_publishes_are_batched_and_keep_each_callers_order(
    connect, shared_settings: Settings
) -> None:
    receiver, got = await connect(shared_settings)
    sender, _ = await connect(shared_settings)
    await receiver.subscribe([group("fifo")])
    round_trips = 0
    pipeline = sender._pipeline

    async def counting_pipeline(batch):  # type: ignore[no-untyped-def]
        nonlocal round_trips
        round_trips += 1
        return await pipeline(batch)

    sender._pipeline = counting_pipeline  # type: ignore[method-assign]

    async def caller(name: int, count: int) -> list[int | None]:
        # every caller issues its publishes without waiting for the previous one
        return await asyncio.gather(
            *(sender.publish(group("fifo"), f"{name}:{seq}".encode()) for seq in range(count))
        )

    started = time.monotonic()
    results = await asyncio.gather(*(caller(name, 100) for name in range(10)))
    elapsed = time.monotonic() - started
    assert all(result == [1] * 100 for result in results)
    items = await got.wait_for_count(1000)
    assert len(items) == 1000
    per_caller: dict[str, list[int]] = {}
    for item in items:
        name, seq = item.decode().split(":")
        per_caller.setdefault(name, []).append(int(seq))
    assert per_caller == {str(name): list(range(100)) for name in range(10)}
    assert round_trips < 50, f"1000 publishes took {round_trips} round trips: not batched"
    assert elapsed < scaled(5)


async def test_a_publish_written_directly_and_those_queued_behind_it_keep_their_order(
    connect, shared_settings: Settings
) -> None:
    """An idle publisher's caller writes its PUBLISH itself; callers that come while it waits queue for
    the flusher: on the wire the direct one comes first, then the queue in order."""
    receiver, got = await connect(shared_settings)
    sender, _ = await connect(shared_settings)
    await receiver.subscribe([group("mixed")])
    assert await sender.publish(group("mixed"), b"first") == 1  # the publishing connection is open now
    results = await asyncio.gather(*(sender.publish(group("mixed"), b"%d" % i) for i in range(300)))
    assert results == [1] * 300
    assert await got.wait_for_count(301) == [b"first", *(b"%d" % i for i in range(300))]


async def test_publish_before_connect_and_close_is_idempotent(shared_settings: Settings) -> None:
    from fanout.exceptions import NotConnected

    backend = RedisBackend(shared_settings, inbox="lonely")
    with pytest.raises(NotConnected):
        await backend.publish(group("g"), b"x")
    await backend.connect(Recorder())
    await backend.close()
    await backend.close()
    assert not backend.healthy
    with pytest.raises(NotConnected):
        await backend.publish(group("g"), b"x")


# -- failure: dead broker, kill and restart -------------------------------------------------------


async def test_connect_to_a_dead_port_fails_fast() -> None:
    settings = Settings.create(
        f"redis://127.0.0.1:{free_port()}/0", namespace=unique_ns(), publish_timeout=2.0
    )
    backend = RedisBackend(settings, inbox="nobody")
    started = time.monotonic()
    with pytest.raises(BackendUnavailable):
        await backend.connect(Recorder())
    assert time.monotonic() - started < scaled(2.5)
    assert not backend.healthy
    await backend.close()


async def test_connect_to_a_dead_cluster_fails_fast() -> None:
    url = f"redis+cluster://127.0.0.1:{free_port()},127.0.0.1:{free_port()}"
    backend = RedisBackend(Settings.create(url, namespace=unique_ns(), publish_timeout=2.0), inbox="nobody")
    started = time.monotonic()
    with pytest.raises(BackendUnavailable):
        await backend.connect(Recorder())
    assert time.monotonic() - started < scaled(2.5)
    await backend.close()


async def test_kill_and_restart_restores_exactly_the_wanted_subscriptions(
    connect, own_redis: RedisServer
) -> None:
    settings = Settings.create(own_redis.url, namespace=unique_ns(), publish_timeout=1.0)
    ns = settings.namespace
    receiver, got = await connect(settings, inbox="rx")
    sender, _ = await connect(settings, inbox="tx")
    events: list[str] = []

    async def on_reconnect() -> None:
        events.append("reconnect")

    receiver.on_disconnect.append(lambda: events.append("disconnect"))
    receiver.on_reconnect.append(on_reconnect)
    await receiver.subscribe([group("g1"), group("g2")])
    assert await sender.publish(group("g1"), b"before") == 1
    await got.wait_for_count(1)

    own_redis.kill()
    await eventually(lambda: not receiver.healthy, 5, "health to go down")
    await eventually(lambda: events == ["disconnect"], 5, "the disconnect hook")
    assert receiver.outages == 1

    # changes made while down return at once and are applied on reconnect
    started = time.monotonic()
    await receiver.subscribe([group("g3")])
    await receiver.unsubscribe([group("g1")])
    assert time.monotonic() - started < 0.5

    # a publish while Redis is down raises, within the (1 s) publish timeout
    started = time.monotonic()
    with pytest.raises(BackendUnavailable):
        await sender.publish(group("g2"), b"while down")
    assert time.monotonic() - started < scaled(1.5)

    own_redis.restart()
    await eventually(lambda: receiver.healthy and sender.healthy, 15, "both backends to reconnect")
    assert events == ["disconnect", "reconnect"]
    assert receiver.reconnects == 1
    assert receiver.outages == 1

    raw = await _raw(own_redis.url)
    try:
        channels = {c.decode() for c in await raw.pubsub_channels(f"{ns}:*")}
    finally:
        await raw.aclose()
    assert channels == {f"{ns}:i:rx", f"{ns}:i:tx", f"{ns}:g:g2", f"{ns}:g:g3"}

    assert await sender.publish(group("g1"), b"unsubscribed") == 0
    assert await sender.publish(group("g3"), b"after") == 1
    assert await got.wait_for_count(2) == [b"before", b"after"]


async def test_reconnects_after_repeated_outages(connect, own_redis: RedisServer) -> None:
    settings = Settings.create(own_redis.url, namespace=unique_ns(), publish_timeout=1.0)
    receiver, got = await connect(settings)
    sender, _ = await connect(settings)
    await receiver.subscribe([flag("f")])
    for round_ in range(1, 3):
        own_redis.kill()
        await eventually(lambda: not receiver.healthy, 5, "health to go down")
        own_redis.restart()
        await eventually(lambda: receiver.healthy and sender.healthy, 15, "reconnection")
        # (the link is healthy the moment its subscriptions are confirmed, a step before the
        # reconnect loop counts the reconnect)
        await eventually(lambda n=round_: (receiver.outages, receiver.reconnects) == (n, n), 2, "the counts")
        assert await sender.publish(flag("f"), str(round_).encode()) == 1
        # received before the next kill: Redis may answer the publisher before it has written the
        # message to the subscriber's socket, and a SIGKILL in between loses it (pub/sub is at most once)
        await got.wait_for_count(round_)
    assert got.messages == [b"1", b"2"]


# -- Redis Cluster ----------------------------------------------------------------------------


def _names_on_distinct_shards(cluster: RedisCluster, ns: str, count: int = 3) -> list[str]:
    """Group names whose channels hash to slots owned by ``count`` different masters."""
    # CLUSTER NODES: "<id> <ip:port@bus> <flags> <master> <ping> <pong> <epoch> <state> <slot ranges...>"
    ranges: list[tuple[int, int, int]] = []
    raw = cluster.cli(cluster.ports[0], "cluster", "nodes")
    for line in raw.splitlines():
        parts = line.split()
        port = int(parts[1].split("@")[0].rsplit(":", 1)[1])
        for spec in parts[8:]:
            low, _, high = spec.partition("-")
            ranges.append((int(low), int(high or low), port))

    def owner(slot: int) -> int:
        return next(port for low, high, port in ranges if low <= slot <= high)

    chosen: dict[int, str] = {}
    index = 0
    while len(chosen) < count:
        name = f"room{index}"
        chosen.setdefault(owner(key_slot(group(name).channel(ns).encode())), name)
        index += 1
    return list(chosen.values())


async def test_cluster_routing_mode_uses_sharded_pubsub_across_shards(connect, cluster: RedisCluster) -> None:
    settings = Settings.create(cluster.url, namespace=unique_ns(), mode="routing", publish_timeout=2.0)
    ns = settings.namespace
    names = _names_on_distinct_shards(cluster, ns)
    receiver, got = await connect(settings, inbox="rx")
    sender, _ = await connect(settings, inbox="tx")
    await receiver.subscribe([group(name) for name in names])
    assert receiver.healthy
    assert len(receiver._links) == 3  # one shard link per master holding a wanted channel (inbox too)

    # every channel is a shard channel on the master owning its slot, and only there
    found: dict[int, set[str]] = {}
    for port in cluster.ports:
        out = cluster.cli(port, "pubsub", "shardchannels", f"{ns}:*")
        found[port] = {line for line in out.split() if line}
        assert cluster.cli(port, "pubsub", "channels", f"{ns}:*").strip() == ""
    every = set().union(*found.values())
    assert every == {f"{ns}:g:{name}" for name in names} | {f"{ns}:i:rx", f"{ns}:i:tx"}
    assert sum(1 for channels in found.values() if any(":g:" in c for c in channels)) == 3
    for port, channels in found.items():
        for channel in channels:
            numsub = cluster.cli(port, "pubsub", "shardnumsub", channel).split()
            assert numsub == [channel, "1"]

    # SPUBLISH reports the exact receiver count of the shard
    for index, name in enumerate(names):
        assert await sender.publish(group(name), f"to {index}".encode()) == 1
    assert await sender.publish(group("nobody-here"), b"x") == 0
    assert await sender.publish(receiver.inbox_address, b"inbox") == 1
    assert sorted(await got.wait_for_count(4)) == sorted([b"to 0", b"to 1", b"to 2", b"inbox"])

    # ordering on one shard channel, with concurrent publishes batched
    results = await asyncio.gather(*(sender.publish(group(names[0]), f"{i}".encode()) for i in range(300)))
    assert results == [1] * 300
    items = await got.wait_for_count(304)
    assert items[4:] == [f"{i}".encode() for i in range(300)]

    await receiver.unsubscribe([group(names[1])])
    assert await sender.publish(group(names[1]), b"gone") == 0
    channel = f"{ns}:g:{names[1]}"
    assert all(
        channel not in cluster.cli(port, "pubsub", "shardchannels", f"{ns}:*") for port in cluster.ports
    )


async def test_cluster_fanout_mode_uses_plain_pubsub(connect, cluster: RedisCluster) -> None:
    settings = Settings.create(cluster.url, namespace=unique_ns(), mode="fanout", publish_timeout=2.0)
    ns = settings.namespace
    receiver, got = await connect(settings, inbox="rx")
    sender, _ = await connect(settings, inbox="tx")
    await receiver.subscribe([ALL])
    assert receiver.healthy
    # PUBLISH on a cluster only counts the publishing node's subscribers: no exact count
    for index in range(100):
        assert await sender.publish(ALL, str(index).encode()) is None
    assert await got.wait_for_count(100) == [str(i).encode() for i in range(100)]
    await sender.publish(receiver.inbox_address, b"inbox")
    assert (await got.wait_for_count(101))[-1] == b"inbox"
    subscribed = set()
    for port in cluster.ports:
        subscribed |= set(cluster.cli(port, "pubsub", "channels", f"{ns}:*").split())
        assert cluster.cli(port, "pubsub", "shardchannels", f"{ns}:*").strip() == ""
    assert subscribed == {f"{ns}:all", f"{ns}:i:rx", f"{ns}:i:tx"}


def _node_ids(cluster: RedisCluster) -> dict[int, str]:
    """port -> cluster node id."""
    ids = {}
    for line in cluster.cli(cluster.ports[0], "cluster", "nodes").splitlines():
        parts = line.split()
        ids[int(parts[1].split("@")[0].rsplit(":", 1)[1])] = parts[0]
    return ids


def _slot_owner(cluster: RedisCluster, slot: int) -> int:
    for line in cluster.cli(cluster.ports[0], "cluster", "nodes").splitlines():
        parts = line.split()
        for spec in parts[8:]:
            low, _, high = spec.partition("-")
            if spec[0].isdigit() and int(low) <= slot <= int(high or low):
                return int(parts[1].split("@")[0].rsplit(":", 1)[1])
    raise AssertionError(f"slot {slot} has no owner")


def _move_slot(cluster: RedisCluster, slot: int, source: int, target: int) -> None:
    """Move a key-less slot by hand: what ``redis-cli --cluster reshard`` does for an empty slot."""
    ids = _node_ids(cluster)
    assert cluster.cli(target, "cluster", "setslot", str(slot), "importing", ids[source]).strip() == "OK"
    assert cluster.cli(source, "cluster", "setslot", str(slot), "migrating", ids[target]).strip() == "OK"
    for port in (target, source, *(p for p in cluster.ports if p not in (source, target))):
        assert cluster.cli(port, "cluster", "setslot", str(slot), "node", ids[target]).strip() == "OK"


async def test_cluster_shard_channel_follows_its_slot_when_it_moves(connect, cluster: RedisCluster) -> None:
    settings = Settings.create(cluster.url, namespace=unique_ns(), mode="routing", publish_timeout=2.0)
    ns = settings.namespace
    receiver, got = await connect(settings, inbox="rx")
    sender, _ = await connect(settings, inbox="tx")
    await receiver.subscribe([group("mover")])
    channel = group("mover").channel(ns)
    slot = key_slot(channel.encode())
    source = _slot_owner(cluster, slot)
    target = next(port for port in cluster.ports if port != source)
    _move_slot(cluster, slot, source, target)

    def subscribed_on_target() -> bool:
        return channel in cluster.cli(target, "pubsub", "shardchannels", f"{ns}:*").split()

    await eventually(
        lambda: subscribed_on_target() and receiver.healthy, 10, "re-subscription on the new owner"
    )
    assert channel not in cluster.cli(source, "pubsub", "shardchannels", f"{ns}:*").split()
    assert receiver.outages == 0  # only the moved channel was re-routed; the session stayed up
    await eventually(lambda: _slot_owner(cluster, slot) == target, 10, "the cluster to agree")
    assert await sender.publish(group("mover"), b"after the move") == 1
    assert await got.wait_for_count(1) == [b"after the move"]


async def test_cluster_subscribe_with_a_stale_slot_map_follows_moved(connect, cluster: RedisCluster) -> None:
    settings = Settings.create(cluster.url, namespace=unique_ns(), mode="routing", publish_timeout=2.0)
    receiver, got = await connect(settings, inbox="rx")
    sender, _ = await connect(settings, inbox="tx")
    channel = group("late").channel(settings.namespace)
    slot = key_slot(channel.encode())
    source = _slot_owner(cluster, slot)
    target = next(port for port in cluster.ports if port != source)
    _move_slot(cluster, slot, source, target)  # the receiver's slot map does not know yet
    await eventually(lambda: _slot_owner(cluster, slot) == target, 10, "the cluster to agree")
    # SSUBSCRIBE goes to the old owner, gets MOVED, and is re-sent to the new owner before returning
    await receiver.subscribe([group("late")])
    assert receiver.healthy
    assert channel in cluster.cli(target, "pubsub", "shardchannels", f"{settings.namespace}:*").split()
    assert await sender.publish(group("late"), b"found") == 1
    assert await got.wait_for_count(1) == [b"found"]
    assert receiver.outages == 0


async def test_cluster_routing_mode_survives_a_master_restart(
    connect, tmp_path_factory: pytest.TempPathFactory
) -> None:
    own = start_cluster(tmp_path_factory.mktemp("own-cluster"))
    try:
        settings = Settings.create(own.url, namespace=unique_ns(), mode="routing", publish_timeout=1.0)
        names = _names_on_distinct_shards(own, settings.namespace)
        receiver, got = await connect(settings, inbox="rx")
        sender, _ = await connect(settings, inbox="tx")
        reconnected = asyncio.Event()
        receiver.on_reconnect.append(reconnected.set)
        await receiver.subscribe([group(name) for name in names[:2]])
        victim_port = _slot_owner(own, key_slot(group(names[0]).channel(settings.namespace).encode()))
        victim = next(server for server in own.servers if server.port == victim_port)

        victim.kill()
        await eventually(lambda: not receiver.healthy, 5, "health to go down")
        await receiver.subscribe([group(names[2])])  # while down: applied on reconnect
        with pytest.raises(BackendUnavailable):
            await sender.publish(group(names[0]), b"shard down")
        await asyncio.sleep(scaled(0.5))  # let a few reconnection attempts fail

        victim.restart()
        await eventually(
            lambda: all("cluster_state:ok" in own.cli(p, "cluster", "info") for p in own.ports),
            20,
            "cluster ok",
        )
        async with asyncio.timeout(scaled(20)):
            await reconnected.wait()
        await eventually(lambda: receiver.healthy, 10, "health to come back")
        assert receiver.outages >= 1 and receiver.reconnects >= 1
        wanted = {group(name).channel(settings.namespace) for name in names} | {f"{settings.namespace}:i:rx"}
        found: set[str] = set()
        for port in own.ports:
            found |= set(own.cli(port, "pubsub", "shardchannels", f"{settings.namespace}:*").split())
        assert wanted <= found
        for index, name in enumerate(names):
            await eventually(lambda: sender.healthy, 10, "the sender to reconnect")
            assert await sender.publish(group(name), str(index).encode()) == 1
        assert sorted(await got.wait_for_count(3)) == [b"0", b"1", b"2"]
    finally:
        own.stop()


async def test_a_silent_server_is_detected_by_keepalive(connect, own_redis: RedisServer) -> None:
    settings = Settings.create(own_redis.url, namespace=unique_ns(), publish_timeout=1.0)
    receiver = RedisBackend(settings, inbox="rx")
    receiver.keepalive_interval = 0.2  # silence for 3 intervals = dead
    got = Recorder()
    await receiver.connect(got)
    try:
        sender, _ = await connect(settings, inbox="tx")
        await receiver.subscribe([group("g")])
        own_redis.pause()
        try:
            # the socket stays open: only the missing PING replies tell
            await eventually(lambda: not receiver.healthy, 3, "the keepalive to notice")
            started = time.monotonic()
            with pytest.raises(BackendUnavailable):
                await sender.publish(group("g"), b"into the void")
            assert time.monotonic() - started < scaled(1.5)
            await asyncio.sleep(scaled(2.5))  # reconnection attempts meet a server that never answers
            assert not receiver.healthy
        finally:
            own_redis.resume()
        await eventually(lambda: receiver.healthy, 10, "reconnection after the server woke up")
        assert receiver.outages == 1 and receiver.reconnects == 1
        await eventually(lambda: sender.healthy, 20, "the sender to be healthy")
        assert await sender.publish(group("g"), b"back") == 1
        assert (await got.wait_for_count(1))[-1] == b"back"
    finally:
        await receiver.close()


async def test_credentials_in_the_url_and_a_refusal(connect, tmp_path: Path) -> None:
    from fanout.exceptions import BackendError

    server = start_redis(tmp_path / "auth", "--requirepass", "s3cret")
    try:
        ns = unique_ns()
        wrong = RedisBackend(Settings.create(server.url, namespace=ns, publish_timeout=2.0), inbox="x")
        with pytest.raises(BackendError) as refused:
            await wrong.connect(Recorder())
        assert not isinstance(refused.value, BackendUnavailable)  # it is there; it said no
        await wrong.close()

        url = f"redis://:s3cret@127.0.0.1:{server.port}/0"
        receiver, got = await connect(Settings.create(url, namespace=ns), inbox="rx")
        sender, _ = await connect(Settings.create(url, namespace=ns), inbox="tx")
        await receiver.subscribe([group("g")])
        assert await sender.publish(group("g"), b"authenticated") == 1
        assert await got.wait_for_count(1) == [b"authenticated"]
        await receiver.close()
        await sender.close()
    finally:
        server.stop()


async def test_tls_pub_sub_goes_through_redis_py(connect, tmp_path: Path) -> None:
    """``rediss://``: the pub/sub link is redis-py's ``Connection`` (behind the same interface as the plain
    one), against a redis-server with TLS on and a self-signed certificate."""
    workdir = tmp_path / "tls"
    workdir.mkdir()
    cert, key = workdir / "cert.pem", workdir / "key.pem"
    openssl = ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=x"]
    openssl += ["-addext", "subjectAltName=IP:127.0.0.1"]  # the certificate verified, for the address used
    await asyncio.to_thread(
        subprocess.run, [*openssl, "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True
    )
    tls_port = free_port()
    tls = ("--tls-port", str(tls_port), "--tls-cert-file", str(cert), "--tls-key-file", str(key))
    server = start_redis(workdir, *tls, "--tls-ca-cert-file", str(cert), "--tls-auth-clients", "no")
    try:
        settings = Settings.create(
            f"rediss://127.0.0.1:{tls_port}/0?ssl_ca_certs={cert}", namespace=unique_ns(), publish_timeout=2.0
        )
        receiver, got = await connect(settings, inbox="rx")
        sender, _ = await connect(settings, inbox="tx")
        await receiver.subscribe([group("g")])
        assert await sender.publish(group("g"), b"over tls") == 1
        assert await got.wait_for_count(1) == [b"over tls"]
        assert isinstance(receiver._links["main"].conn, RedisPyPubSub)
    finally:
        server.stop()
