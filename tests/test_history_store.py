"""The history store (Redis, Redis Cluster) and the publishing side of continuity, on real brokers.

The store on its own: append, read, trim, expiry, epochs, removal, resume records, the positions line a
send carries on the bus (read with a plain redis-py subscriber), offsets in publication order under
concurrent publishers, a cluster's single-slot and multi-slot sends. Then the publisher's side through
ServerUtil, SyncServerUtil, the CLI and the HTTP API of a node process: history sends are stored and
recoverable with no node live, ``get_history`` / ``remove_history``, the nodes' history settings compared
with the publisher's; on the memory backend (MemoryStore) and on RabbitMQ with FANOUT_HISTORY_URL.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aio_pika
import orjson
import pytest
import redis.asyncio as aioredis
from redis.crc import key_slot

from fanout import (
    BackendError,
    BackendUnavailable,
    ConfigError,
    ConfigMismatch,
    NoLiveNodes,
    PayloadError,
    ServerUtil,
    Settings,
    SyncServerUtil,
    protocol,
)
from fanout.backends import create_store
from fanout.backends.redis_publisher import pack
from fanout.backends.store import MemoryStore, StoredSend
from fanout.backends.store_redis import RedisStore
from fanout.commands import Heartbeat, NodeInfo, Send, Target
from fanout.history import split_positions
from fanout.idempotency import Repeated
from fanout.naming import ALL, flag, group
from node import Node, NodeOptions
from tests.apps.control import ControlApp
from tests.support import scaled
from tests.support.nodes import (
    NodeProcess,
    client,
    nothing_more,
    recv,
    run_module,
    start_node,
    unique_namespace,
)
from tests.support.redis_servers import RedisCluster, start_cluster

REDIS = "redis://127.0.0.1:6379/0"
AMQP = "amqp://guest:guest@127.0.0.1:5672/"
HB = 0.5
API_KEY = "history-key-" + os.urandom(4).hex()


# --------------------------------------------------------------------------- fixtures


def forget(namespace: str) -> None:
    """Delete what a test's namespace left in the shared Redis (streams live two days otherwise)."""
    import redis

    client = redis.Redis.from_url(REDIS)
    try:
        keys = list(client.scan_iter(match=f"*{namespace}*", count=1000))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


@pytest.fixture
def ns() -> Iterator[str]:
    namespace = unique_namespace("hs")
    yield namespace
    forget(namespace)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisCluster]:
    started = start_cluster(tmp_path_factory.mktemp("history-cluster"))
    yield started
    started.stop()


@pytest.fixture(params=["redis", "cluster"])
def url(request: pytest.FixtureRequest) -> str:
    if request.param == "redis":
        return REDIS
    cluster: RedisCluster = request.getfixturevalue("cluster")
    return cluster.url


def settings(url: str, namespace: str, **options: Any) -> Settings:
    options.setdefault("history", "group:*,flag:*,all")
    return Settings.create(url, namespace=namespace, heartbeat_interval=HB, **options)


@contextlib.asynccontextmanager
async def store(
    url: str, namespace: str, publishes: bool = True, **options: Any
) -> AsyncIterator[RedisStore]:
    made = RedisStore(settings(url, namespace, **options), url=url, publishes=publishes)
    await made.connect()
    try:
        yield made
    finally:
        await made.close()


def sent(sid: str, payload: bytes = b"x", **flags: Any) -> StoredSend:
    return StoredSend(sid, payload, **flags)


class Listener:
    """A plain redis-py subscriber of one channel (SSUBSCRIBE on a cluster, on the shard that owns it)."""

    def __init__(self, client: aioredis.Redis, sharded: bool) -> None:
        self.client = client
        self.pubsub = client.pubsub()
        self.sharded = sharded

    @classmethod
    async def open(cls, url: str, channel: str) -> Listener:
        if url.startswith("redis+cluster://"):
            from redis.asyncio.cluster import RedisCluster as Cluster

            hosts = url.split("://", 1)[1].split(",")
            probe = Cluster(host=hosts[0].split(":")[0], port=int(hosts[0].split(":")[1]))
            await probe.initialize()
            owner = probe.nodes_manager.get_node_from_slot(key_slot(channel.encode()))
            await probe.aclose()
            listener = cls(aioredis.Redis(host=owner.host, port=int(owner.port)), True)
            await listener.pubsub.ssubscribe(channel)
        else:
            listener = cls(aioredis.Redis.from_url(url), False)
            await listener.pubsub.subscribe(channel)
        return listener

    async def next(self, timeout: float = 5.0) -> bytes:
        deadline = asyncio.get_running_loop().time() + scaled(timeout)
        while asyncio.get_running_loop().time() < deadline:
            if self.sharded:
                message = await self.pubsub.get_sharded_message(ignore_subscribe_messages=True, timeout=0.2)
            else:
                message = await self.pubsub.get_message(ignore_subscribe_messages=True, timeout=0.2)
            if message is not None:
                return bytes(message["data"])
        raise AssertionError("no message on the channel")

    async def close(self) -> None:
        await self.pubsub.aclose()
        await self.client.aclose()


async def eventually(probe: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + scaled(timeout)
    while time.monotonic() < deadline:
        if await probe():
            return
        await asyncio.sleep(0.05)
    raise AssertionError("condition not reached in time")


# --------------------------------------------------------------------------- the store itself


async def test_append_read_and_trim(url: str, ns: str) -> None:
    async with store(url, ns, history_size=3) as st:
        epoch, offset = (await st.positions(["group:a"]))["group:a"]
        assert offset == 0  # the epoch exists before the first send: a position handed out stays valid
        for i in range(1, 6):
            positions = await st.append(["group:a"], sent(f"s{i}", b"%d" % i, json=True))
            assert positions == {"group:a": (epoch, i)}
        page = await st.read("group:a")
        assert (page.epoch, page.offset, page.first) == (epoch, 5, 3)  # trimmed to the last 3
        assert [(e.offset, e.sid, e.payload, e.json) for e in page.entries] == [
            (3, "s3", b"3", True),
            (4, "s4", b"4", True),
            (5, "s5", b"5", True),
        ]
        assert not page.complete_after(1) and page.complete_after(2)
        after = await st.read("group:a", since=3, limit=1)
        assert [e.offset for e in after.entries] == [4] and after.first == 3
        assert [e.offset for e in (await st.read("group:a", since=0)).entries] == [3, 4, 5]
        assert (await st.read("group:a", since=5)).entries == ()
        assert [e.offset for e in (await st.read("group:a", limit=2)).entries] == [4, 5]
        assert (await st.read("group:a", limit=0)).entries == ()


async def test_big_pages_and_reads_between_sends(url: str, ns: str) -> None:
    """Pages far larger than one socket read (on one server they come back on the sends' own connection,
    parsed as they arrive), read while sends and resume records go by on the same connection."""
    async with store(url, ns, history_size=400) as st:
        payloads = [os.urandom(1500) + b"\r\n*3\r\n$-1\r\n" for _ in range(300)]
        for i, payload in enumerate(payloads):
            await st.append(["group:big"], sent(f"s{i}", payload, binary=True))
        pages = await asyncio.gather(
            *(st.read("group:big", since=0, limit=300) for _ in range(5)),
            st.append(["group:big"], sent("later", b"later")),
            st.save_resume("t", None, b"record", 30, create=True),
            st.claim_resume("t", None),
            st.read("group:big", since=1000),
            st.claim_resume("never", "ann"),
        )
        for page in pages[:5]:
            assert [e.payload for e in page.entries] == payloads
            assert [e.offset for e in page.entries] == list(range(1, 301))
        assert pages[6] is None and pages[9] is None
        # one server: in call order; on a cluster the calls take several connections, so the claim may run
        # before the save (then the record is still there, for the next claim) and the read before the send
        if url == REDIS:
            assert pages[7] == b"record"
        else:
            assert pages[7] == b"record" or await st.claim_resume("t", None) == b"record"
        assert pages[8].entries == () and pages[8].offset in ((301,) if url == REDIS else (300, 301))


async def test_entries_keep_what_was_sent_and_every_position(url: str, ns: str) -> None:
    async with store(url, ns) as st:
        streams = ["group:a", "group:b", "flag:ann", "all"]
        await st.append(["group:b"], sent("first"))
        positions = await st.append(streams, sent("both", b"\x00\xff", binary=True, exclude=("c1", "c2")))
        assert {s: o for s, (_, o) in positions.items()} == {
            "group:a": 1,
            "group:b": 2,
            "flag:ann": 1,
            "all": 1,
        }
        for stream in streams:
            (entry,) = (await st.read(stream, since=positions[stream][1] - 1)).entries
            assert (entry.sid, entry.payload, entry.binary, entry.json) == ("both", b"\x00\xff", True, False)
            assert entry.exclude == ("c1", "c2")
            others = {s: o for s, (_, o) in positions.items() if s != stream}
            assert dict(entry.positions) == others  # its offsets in the other streams of the send


async def test_entries_expire_after_the_ttl_but_the_epoch_and_offset_stay(url: str, ns: str) -> None:
    async with store(url, ns, history_ttl=0.3) as st:
        positions = await st.append(["group:a"], sent("s1"))
        await st.append(["group:a"], sent("s2"))

        async def expired() -> bool:
            return (await st.read("group:a")).entries == ()

        await eventually(expired)
        page = await st.read("group:a")
        assert (page.epoch, page.offset, page.first) == (positions["group:a"][0], 2, 3)
        assert not page.complete_after(1)  # a client at offset 1 is told: not recoverable
        assert await st.append(["group:a"], sent("s3")) == {"group:a": (page.epoch, 3)}


async def test_remove_forgets_entries_and_epoch(url: str, ns: str) -> None:
    async with store(url, ns) as st:
        old = await st.append(["group:a"], sent("s1"))
        await st.remove("group:a")
        page = await st.read("group:a")
        assert page.entries == () and page.offset == 0 and page.epoch != old["group:a"][0]
        new = await st.append(["group:a"], sent("s2"))
        assert new == {"group:a": (page.epoch, 1)}  # the epoch read after the removal is the new one
        await st.remove("group:a")
        assert (await st.positions(["group:a"]))["group:a"][0] not in (old["group:a"][0], page.epoch)


async def test_epoch_and_offset_live_much_longer_than_entries(url: str, ns: str) -> None:
    async with store(url, ns, history_ttl=5) as st:
        await st.append(["group:a"], sent("s1"))
        hm, hl = st.keys("group:a")
        client = await _client(url)
        try:
            assert await client.pttl(hl) <= 5000
            assert await client.pttl(hm) > 24 * 3600 * 1000  # META_TTL: at least a day
            await client.pexpire(hm, 1000)
            await st.positions(["group:a"])  # a position read refreshes it
            assert await client.pttl(hm) > 24 * 3600 * 1000
        finally:
            await client.aclose()


async def _client(url: str) -> Any:
    if url.startswith("redis+cluster://"):
        from redis.asyncio.cluster import RedisCluster as Cluster

        first = url.split("://", 1)[1].split(",")[0]
        cluster = Cluster(host=first.split(":")[0], port=int(first.split(":")[1]))
        await cluster.initialize()
        return cluster
    return aioredis.Redis.from_url(url)


async def test_the_positions_line_on_the_bus_matches_the_stored_offsets(url: str, ns: str) -> None:
    channel = group("lobby").channel(ns)
    listener = await Listener.open(url, channel)
    try:
        async with store(url, ns) as st:
            encoder = protocol.Encoder("u-test", ns, None)
            for i in range(3):
                command = Send(Target.groups("lobby"), b'{"n":%d}' % i, json=True, sid=f"s{i}")
                message = encoder.encode(command, time.time())
                positions, counts = await st.append_counted(
                    ["group:lobby"], sent(f"s{i}", command.payload, json=True), [(group("lobby"), message)]
                )
                assert counts == [1]  # the listener
                raw = await listener.next()
                assert raw.startswith(b"h1 ")
                line, rest = split_positions(raw)
                assert line == positions and rest == message
                opened = protocol.open_message(raw)
                assert opened.command.positions == positions and opened.command.payload == command.payload  # type: ignore[union-attr]
                assert positions["group:lobby"][1] == i + 1
    finally:
        await listener.close()


async def test_offsets_follow_publication_order_under_concurrent_publishers(url: str, ns: str) -> None:
    channel = group("race").channel(ns)
    listener = await Listener.open(url, channel)
    publishers, each = 4, 50
    try:
        stores = [
            RedisStore(settings(url, ns, history_size=1000), url=url, publishes=True)
            for _ in range(publishers)
        ]
        for st in stores:
            await st.connect()
        try:

            async def publish(st: RedisStore, p: int) -> None:
                for i in range(each):
                    # some sends also go to another stream (a cluster's multi-slot path when in another slot)
                    streams = ["group:race", f"group:other{p}"] if i % 3 == 0 else ["group:race"]
                    await st.append(streams, sent(f"{p}.{i}"), [(group("race"), b"m")])

            await asyncio.gather(*(publish(st, p) for p, st in enumerate(stores)))
        finally:
            for st in stores:
                await st.close()
        received = []
        for _ in range(publishers * each):
            positions, _ = split_positions(await listener.next())
            assert positions is not None
            received.append(positions["group:race"][1])
        if not url.startswith("redis+cluster://"):
            assert received == list(range(1, publishers * each + 1))  # publication order = offset order
        else:  # two-phase sends may publish a reserved offset after a later one: no duplicate, no loss
            assert sorted(received) == list(range(1, publishers * each + 1))
        async with store(url, ns, history_size=1000) as st:
            page = await st.read("group:race", limit=1000)
            assert [e.offset for e in page.entries] == list(range(1, publishers * each + 1))
    finally:
        await listener.close()


async def test_cluster_single_slot_and_multi_slot_sends(cluster: RedisCluster, ns: str) -> None:
    url = cluster.url
    # two groups in one slot (the same hash of their channel is impossible to pick by name, so two sends
    # to one group with its flag is the single-slot case), and groups spread over the three shards
    spread = [f"g{i}" for i in range(12)]
    assert len({key_slot(group(g).channel(ns).encode()) for g in spread}) > 1
    listeners = {g: await Listener.open(url, group(g).channel(ns)) for g in spread[:3]}
    all_listener = await Listener.open(url, ALL.channel(ns))
    try:
        async with store(url, ns) as st:
            single, counts = await st.append_counted(
                ["group:g0"], sent("one"), [(group("g0"), b"m0"), (ALL, b"to-all")]
            )
            assert counts == [1, 1]
            assert split_positions(await listeners["g0"].next())[0] == single
            assert split_positions(await all_listener.next()) == (single, b"to-all")  # another slot
            streams = [f"group:{g}" for g in spread]
            items = [(group(g), f"m-{g}".encode()) for g in spread[:3]]
            multi, counts = await st.append_counted(streams, sent("many", b"payload"), items)
            assert counts == [1, 1, 1] and set(multi) == set(streams)
            for g in spread[:3]:
                positions, rest = split_positions(await listeners[g].next())
                assert positions == multi and rest == f"m-{g}".encode()  # every copy: every position
            for stream in streams:
                (entry,) = (await st.read(stream, since=multi[stream][1] - 1)).entries
                assert entry.sid == "many" and entry.payload == b"payload"
                assert dict(entry.positions) == {s: o for s, (_, o) in multi.items() if s != stream}
    finally:
        for listener in [*listeners.values(), all_listener]:
            await listener.close()


async def test_cluster_phase_two_puts_an_overtaken_entry_in_its_place(cluster: RedisCluster, ns: str) -> None:
    """A multi-slot send reserved its offsets; before it appends, another send appends later offsets of
    the same stream: the entry still lands in offset order."""
    url = cluster.url
    groups = [f"g{i}" for i in range(12)]
    slots: dict[int, list[str]] = {}
    for g in groups:
        slots.setdefault(key_slot(group(g).channel(ns).encode()), []).append(f"group:{g}")
    async with store(url, ns) as st:
        await st.append(["group:g0"], sent("before"))
        positions = await st._reserve(slots)  # phase 1 of a send that then stalls
        assert positions["group:g0"][1] == 2
        await st.append(["group:g0"], sent("overtaker1"))  # offsets 3 and 4
        await st.append(["group:g0"], sent("overtaker2"))
        await st._append_slots(slots, sent("late", b"late"), positions, [], [], [])  # phase 2
        page = await st.read("group:g0")
        assert [(e.offset, e.sid) for e in page.entries] == [
            (1, "before"),
            (2, "late"),
            (3, "overtaker1"),
            (4, "overtaker2"),
        ]
        assert (await st.append(["group:g0"], sent("after")))["group:g0"][1] == 5
        assert [e.offset for e in (await st.read("group:g0")).entries] == [1, 2, 3, 4, 5]


def _move_slot(cluster: RedisCluster, slot: int, source: int, target: int) -> None:
    """Reshard ``slot`` from the master on port ``source`` to the one on ``target``, keys and all, as
    ``redis-cli --cluster reshard`` does (IMPORTING, MIGRATING, MIGRATE, SETSLOT NODE everywhere)."""
    source_id = cluster.cli(source, "cluster", "myid").strip()
    target_id = cluster.cli(target, "cluster", "myid").strip()
    cluster.cli(target, "cluster", "setslot", str(slot), "importing", source_id)
    cluster.cli(source, "cluster", "setslot", str(slot), "migrating", target_id)
    keys = cluster.cli(source, "cluster", "getkeysinslot", str(slot), "1000").split()
    if keys:
        moved = cluster.cli(source, "migrate", "127.0.0.1", str(target), "", "0", "5000", "keys", *keys)
        assert "OK" in moved, moved
    for port in [target, source, *(p for p in cluster.ports if p not in (source, target))]:
        cluster.cli(port, "cluster", "setslot", str(slot), "node", target_id)


def _owner(cluster: RedisCluster, slot: int) -> int:
    """The port of ``slot``'s master."""
    import redis

    probe = redis.Redis(port=cluster.ports[0])
    try:
        for start, end, master, *_ in probe.execute_command("CLUSTER SLOTS"):
            if int(start) <= slot <= int(end):
                return int(master[1])
    finally:
        probe.close()
    raise AssertionError(f"slot {slot} has no master")


async def test_cluster_sends_follow_a_moved_slot_and_a_restarted_master(tmp_path: Path, ns: str) -> None:
    """A plain cluster's history sends go on a connection to their slot's master. When the slot is
    resharded to another master while sends go on (each retried with its idempotency key after an error),
    when it moves back while 20 concurrent sends are written on the link to the old master, and when its
    master restarts empty, every send is in the stream once, in order (awaited ones: the order awaited;
    concurrent ones: the call order), redis-py taking the calls that Redis redirected and the links
    following the new slot map."""
    cluster = start_cluster(tmp_path)
    try:
        url = cluster.url
        stream, address = "group:moving", group("moving")
        slot = key_slot(address.channel(ns).encode())
        async with store(url, ns, history_size=5000) as st:  # the stream holds every send
            done: list[str] = []

            async def send(sid: str, key: str | None = None) -> None:
                await st.append_counted([stream], sent(sid, sid.encode(), key=key), [(address, sid.encode())])
                done.append(sid)

            async def until_sent(sid: str) -> None:
                """A keyed send, retried after an error (it may have run: the key says)."""
                deadline = time.monotonic() + scaled(20)
                while True:
                    try:
                        await send(sid, key=sid)
                        return
                    except Repeated:
                        done.append(sid)
                        return
                    except (BackendUnavailable, BackendError):
                        assert time.monotonic() < deadline, f"{sid} never got through"
                        await asyncio.sleep(0.1)

            for i in range(10):
                await send(f"a{i}", key="first" if i == 0 else None)
            assert st.redirected == 0  # the links' path
            source = _owner(cluster, slot)
            target = next(port for port in cluster.ports if port != source)
            stop = asyncio.Event()

            async def sender() -> None:
                i = 0
                while not stop.is_set() and i < 3000:
                    await until_sent(f"b{i}")
                    i += 1

            task = asyncio.create_task(sender())
            await asyncio.sleep(0.05)
            await asyncio.to_thread(_move_slot, cluster, slot, source, target)
            await asyncio.sleep(0.05)
            stop.set()
            await task
            assert st.redirected > 0
            # back again with no send on its way: 20 sends issued together go on the link to the old
            # master, are all redirected, and keep their call order through redis-py's path
            await asyncio.to_thread(_move_slot, cluster, slot, target, source)
            redirected = st.redirected
            await asyncio.gather(*(send(f"c{i}") for i in range(20)))
            assert st.redirected >= redirected + 20
            redirected = st.redirected
            for i in range(10):
                await send(f"d{i}")
            assert st.redirected == redirected  # the new master's link
            with pytest.raises(Repeated):  # the key moved with its stream's slot
                await send("again", key="first")
            page = await st.read(stream, since=0, limit=5000)
            assert [e.sid for e in page.entries] == done
            assert [e.offset for e in page.entries] == list(range(1, len(done) + 1))

            # the master restarts empty: what was on its link failed; the next sends reach it again
            restarted = next(server for server in cluster.servers if server.port == source)
            restarted.kill()
            await asyncio.to_thread(restarted.restart)
            done.clear()
            for i in range(10):
                await until_sent(f"e{i}")
            page = await st.read(stream, since=0, limit=5000)
            assert [e.sid for e in page.entries] == done  # a new epoch: the restarted master was empty
            assert [e.offset for e in page.entries] == list(range(1, 11))
    finally:
        cluster.stop()


async def test_resume_records_are_single_use_and_bound_to_the_flag(url: str, ns: str) -> None:
    async with store(url, ns) as st:
        await st.save_resume("tok-a", "ann", b"record-a", 30, create=True)
        assert await st.claim_resume("tok-a", "bob") is None  # another user's flag: refused...
        assert await st.claim_resume("tok-a", None) is None  # ...and a guest's...
        assert await st.claim_resume("tok-a", "ann") == b"record-a"  # ...and not consumed
        assert await st.claim_resume("tok-a", "ann") is None  # single use
        await st.save_resume("tok-a", "ann", b"written back", 30)  # its old connection's state changes...
        assert await st.claim_resume("tok-a", "ann") is None  # ...do not bring a claimed record back
        await st.save_resume("tok-g", None, b"guest", 30, create=True)
        assert await st.claim_resume("tok-g", "ann") is None
        assert await st.claim_resume("tok-g", None) == b"guest"
        # a flag that is a prefix of another, or contains the separator, does not open the other
        await st.save_resume("tok-p", "a\nb", b"p", 30, create=True)
        assert await st.claim_resume("tok-p", "a") is None and await st.claim_resume("tok-p", "a\nb") == b"p"
        await st.save_resume("tok-w", "ann", b"v1", 30, create=True)
        await st.save_resume("tok-w", "ann", b"v2", 30)  # overwritten as the connection's state changes
        await st.save_resume("tok-d", "ann", b"gone", 30, create=True)
        await st.drop_resume("tok-d")
        assert await st.claim_resume("tok-d", "ann") is None
        assert await st.claim_resume("tok-w", "ann") == b"v2"
        assert await st.claim_resume("never-saved", None) is None


async def test_resume_records_expire_unless_kept(url: str, ns: str) -> None:
    async with store(url, ns) as st:
        await st.save_resume("short", "ann", b"s", 0.2, create=True)
        await st.save_resume("kept", "ann", b"k", 0.2, create=True)
        await st.keep_resume(["kept", "not-there"], 30)
        await asyncio.sleep(0.5)
        assert await st.claim_resume("short", "ann") is None
        assert await st.claim_resume("kept", "ann") == b"k"


async def test_a_record_the_store_lost_is_written_again_never_a_claimed_or_dropped_one(
    url: str, ns: str
) -> None:
    async with store(url, ns) as st:
        await st.save_resume("tok-l", "ann", b"v1", 30, create=True)
        await st._redis().delete(st._resume_key("tok-l"))  # lost: Redis restarted without its data
        await st.save_resume("tok-l", "ann", b"v2", 30)  # the live connection's next write brings it back
        assert await st.claim_resume("tok-l", "ann") == b"v2"
        await st.save_resume("tok-l", "ann", b"v3", 30)  # claimed: its tombstone keeps it out
        assert await st.claim_resume("tok-l", "ann") is None
        await st.save_resume("tok-x", "ann", b"x", 30, create=True)
        await st.drop_resume("tok-x")
        await st.save_resume("tok-x", "ann", b"a late write", 30)
        assert await st.claim_resume("tok-x", "ann") is None


async def test_the_memory_store_keeps_claimed_and_dropped_tokens_out_too() -> None:
    st = MemoryStore(Settings.create(f"memory://{unique_namespace()}", history="group:*"))
    await st.save_resume("tok-l", "ann", b"v1", 30, create=True)
    st._memory.resume.pop("tok-l")  # lost
    await st.save_resume("tok-l", "ann", b"v2", 30)
    assert await st.claim_resume("tok-l", "ann") == b"v2"
    await st.save_resume("tok-l", "ann", b"v3", 30)
    assert await st.claim_resume("tok-l", "ann") is None
    await st.save_resume("tok-x", None, b"x", 30, create=True)
    await st.drop_resume("tok-x")
    await st.save_resume("tok-x", None, b"a late write", 30)
    assert await st.claim_resume("tok-x", None) is None


async def test_a_burst_of_resume_records_waits_for_connections_instead_of_failing(url: str, ns: str) -> None:
    # a reconnect storm: hundreds of records written and claimed at once, more than redis-py's pool holds
    async with store(url, ns) as st:
        tokens = [f"burst-{i}" for i in range(400)]
        await asyncio.gather(*(st.save_resume(t, None, t.encode(), 30, create=True) for t in tokens))
        claimed = await asyncio.gather(*(st.claim_resume(t, None) for t in tokens))
        assert claimed == [t.encode() for t in tokens]


async def test_an_unreachable_store_is_backend_unavailable(ns: str) -> None:
    from tests.support import free_port

    url = f"redis://127.0.0.1:{free_port()}/0"
    st = RedisStore(settings(url, ns, publish_timeout=1), url=url, publishes=True)
    with pytest.raises(BackendUnavailable, match="not reachable"):
        await st.connect()
    await st.close()


async def test_create_store_picks_the_place(ns: str) -> None:
    assert isinstance(create_store(settings(REDIS, ns)), RedisStore)
    redis_store = create_store(settings(REDIS, ns))
    assert isinstance(redis_store, RedisStore) and redis_store.publishes
    amqp = create_store(Settings.create(AMQP, namespace=ns, history="group:*", history_url=REDIS))
    assert isinstance(amqp, RedisStore) and not amqp.publishes
    assert create_store(Settings.create(AMQP, namespace=ns)) is None
    assert isinstance(create_store(Settings.create("memory://x", namespace=ns)), MemoryStore)


# --------------------------------------------------------------------------- publishing through ServerUtil


def _node(tmp: Path, url: str, ns: str, **env: str) -> NodeProcess:
    return start_node(
        tmp,
        {
            "FANOUT_URL": url,
            "FANOUT_NAMESPACE": ns,
            "FANOUT_HEARTBEAT_INTERVAL": str(HB),
            "FANOUT_HISTORY": "group:*,flag:*,all",
            **env,
        },
        app="tests.apps.control:app",
    )


async def test_a_history_send_with_no_live_node_is_stored_not_refused(url: str, ns: str) -> None:
    async with ServerUtil(url, namespace=ns, heartbeat_interval=HB, history="group:hist-*") as util:
        with pytest.raises(NoLiveNodes):  # an ordinary send still finds out
            await util.send_to_group("plain", "x")
        assert await util.send_to_group("hist-a", {"n": 1}) is None
        assert await util.send_to_group(["hist-a", "hist-b", "plain"], "both") is None
        assert await util.send_to_group("hist-b", b"\x01", ack=True) == 0
        a = await util.get_history("group:hist-a")
        assert [e["data"] for e in a["entries"]] == [{"n": 1}, "both"] and a["offset"] == 2
        b = await util.get_history("group:hist-b")
        assert [(e["offset"], e["data"]) for e in b["entries"]] == [(1, "both"), (2, b"\x01")]
        assert (await util.get_history("group:plain"))["entries"] == []


@pytest.mark.parametrize("mode", ["routing", "fanout"])
async def test_a_node_delivers_history_sends_and_they_are_stored(
    tmp_path: Path, ns: str, url: str, mode: str
) -> None:
    """On Redis and Redis Cluster (SPUBLISH from the script; in fanout mode the backend publishes after
    the append), in both modes: the raw client gets every send as before, and every send is stored."""
    node = _node(tmp_path, url, ns, FANOUT_MODE=mode)
    ws, cid = await client(node.port)
    try:
        async with ServerUtil(
            url, mode=mode, namespace=ns, heartbeat_interval=HB, history="group:*,flag:*,all"
        ) as util:
            assert await util.join_group(cid, "room") is True
            assert await util.bind(cid, "ann") is True
            await util.send_to_group(["room", "elsewhere", "far"], "spread")  # several slots on a cluster
            assert await recv(ws) == "spread"
            await util.remove_history("group:room")
            await util.send_to_group("room", {"text": "hi"})
            assert orjson.loads(await recv(ws)) == {"text": "hi"}  # the raw client sees no change
            assert await util.send_to_group("room", "counted", ack=True) == 1
            assert await recv(ws) == "counted"
            await util.send_by_flag("ann", b"\x00bin")
            assert await recv(ws) == b"\x00bin"
            await util.send_to_all("everyone")
            assert await recv(ws) == "everyone"
            await util.send_bulk_by_flag([("ann", "bulk1"), ("ann", {"bulk": 2}), ("nobody", "b3")])
            assert await recv(ws) == "bulk1" and orjson.loads(await recv(ws)) == {"bulk": 2}
            assert await nothing_more(ws)
            room = await util.get_history("group:room")
            assert room["offset"] == 2
            assert [(e["offset"], e["data"]) for e in room["entries"]] == [
                (1, {"text": "hi"}),
                (2, "counted"),
            ]
            # the ack=True copy went to every node (the "all" address) and still carries its position
            ann = await util.get_history("flag:ann")
            assert [e["data"] for e in ann["entries"]] == [b"\x00bin", "bulk1", {"bulk": 2}]
            assert [e["data"] for e in (await util.get_history("flag:nobody"))["entries"]] == ["b3"]
            assert [e["data"] for e in (await util.get_history("all"))["entries"]] == ["everyone"]
            assert [
                e["offset"] for e in (await util.get_history("flag:ann", since=1, limit=1))["entries"]
            ] == [2]
            await util.remove_history("group:room")
            after = await util.get_history("group:room")
            assert after["entries"] == [] and after["epoch"] != room["epoch"]
            for bad in ("room", "group:", 42, "flags:x"):
                with pytest.raises(PayloadError, match="stream must be a stream name"):
                    await util.get_history(bad)  # type: ignore[arg-type]
            with pytest.raises(PayloadError, match="since must be an offset"):
                await util.get_history("all", since=-1)
            with pytest.raises(PayloadError, match="limit must be an integer"):
                await util.get_history("all", limit=10_001)
    finally:
        await ws.close()
        assert node.terminate() == 0


async def test_history_settings_that_differ_from_the_nodes_are_a_mismatch(tmp_path: Path, ns: str) -> None:
    node = _node(tmp_path, REDIS, ns, FANOUT_HISTORY="group:a,group:b", FANOUT_HISTORY_SIZE="50")
    try:
        same = {"history": " group:b , group:a", "history_size": 50}  # the same list, spelt differently
        async with ServerUtil(REDIS, namespace=ns, heartbeat_interval=HB, **same) as util:
            assert await util.check_cluster() == 1
        for options, variable in (
            ({"history": "group:a", "history_size": 50}, "FANOUT_HISTORY"),
            ({"history": "group:a,group:b"}, "FANOUT_HISTORY_SIZE"),
            ({}, "FANOUT_HISTORY"),  # a publisher that keeps no history would lose what nodes recover
            ({"history": "group:a,group:b", "history_size": 50, "history_ttl": 60}, "FANOUT_HISTORY_TTL"),
        ):
            async with ServerUtil(REDIS, namespace=ns, heartbeat_interval=HB, **options) as util:
                with pytest.raises(ConfigMismatch, match=variable) as raised:
                    await util.send_to_group("a", "x")
                assert "node" in str(raised.value) and "there" in str(raised.value)
        code, _, err = await _cli({"FANOUT_URL": REDIS, "FANOUT_NAMESPACE": ns}, "send-to-group", "a", "x")
        assert code == 2 and "FANOUT_HISTORY" in err
    finally:
        assert node.terminate() == 0


async def test_a_heartbeat_without_history_settings_is_no_mismatch(ns: str) -> None:
    """Nodes from before history announce none: a publisher with history still fits them."""
    async with ServerUtil(REDIS, namespace=ns, heartbeat_interval=HB, history="group:*") as util:
        await util.watch_nodes()
        old = NodeInfo(f"old.{os.urandom(3).hex()}", "old", 0, 3 * HB, mode="routing")
        publisher = aioredis.Redis.from_url(REDIS)
        try:
            for _ in range(3):
                await publisher.publish(f"{ns}:hb", protocol.encode(Heartbeat(old)))
                await asyncio.sleep(0.1)
        finally:
            await publisher.aclose()
        assert await util.check_cluster() == 1


async def _cli(env: dict[str, str], *args: str) -> tuple[int, str, str]:
    result = await asyncio.get_running_loop().run_in_executor(
        None, lambda: run_module("fanout", *args, env=env)
    )
    return result.returncode, result.stdout, result.stderr


async def test_cli_get_and_remove_history_need_no_node(ns: str) -> None:
    env = {"FANOUT_URL": REDIS, "FANOUT_NAMESPACE": ns, "FANOUT_HISTORY": "group:*"}
    async with ServerUtil(REDIS, namespace=ns, heartbeat_interval=HB, history="group:*") as util:
        for data in ("one", {"two": 2}, b"\x03"):
            await util.send_to_group("room", data)
    code, out, err = await _cli(env, "get-history", "group:room")
    assert code == 0, err
    answer = orjson.loads(out)
    assert answer["offset"] == 3 and answer["entries"] == [
        {"offset": 1, "data": "one"},
        {"offset": 2, "data": {"two": 2}},
        {"offset": 3, "data_b64": base64.b64encode(b"\x03").decode()},
    ]
    code, out, err = await _cli(env, "get-history", "group:room", "--since", "1", "--limit", "1")
    assert code == 0 and [e["offset"] for e in orjson.loads(out)["entries"]] == [2], err
    code, out, err = await _cli(env, "remove-history", "group:room")
    assert code == 0 and out == "", err
    code, out, err = await _cli(env, "get-history", "group:room")
    assert code == 0 and orjson.loads(out)["entries"] == []
    code, out, err = await _cli(env, "get-history", "room")
    assert code == 2 and "stream name" in err
    code, out, err = await _cli(env, "get-history", "all", "--limit", "-1")
    assert code == 2 and "limit" in err


async def test_sync_server_util_reads_and_removes_history(ns: str) -> None:
    sync = SyncServerUtil(REDIS, namespace=ns, heartbeat_interval=HB, history="flag:*")
    loop = asyncio.get_running_loop()
    try:
        await loop.run_in_executor(None, lambda: sync.send_by_flag("ann", "hello"))
        answer = await loop.run_in_executor(None, lambda: sync.get_history("flag:ann"))
        assert answer["offset"] == 1 and answer["entries"] == [{"offset": 1, "data": "hello"}]
        assert await loop.run_in_executor(None, lambda: sync.remove_history("flag:ann")) is None
        assert (await loop.run_in_executor(None, lambda: sync.get_history("flag:ann")))["entries"] == []
        with pytest.raises(PayloadError, match="stream"):
            await loop.run_in_executor(None, lambda: sync.get_history("ann"))
    finally:
        await loop.run_in_executor(None, sync.disconnect)


def _post(port: int, name: str, body: Any) -> tuple[int, Any]:
    import urllib.error
    import urllib.request

    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/api/{name}", data=orjson.dumps(body), method="POST"
    )
    request.add_header("Authorization", f"Bearer {API_KEY}")
    try:
        with urllib.request.urlopen(request, timeout=scaled(10)) as answer:
            return answer.status, orjson.loads(answer.read())
    except urllib.error.HTTPError as exc:
        return exc.code, orjson.loads(exc.read())


async def test_http_api_get_and_remove_history(tmp_path: Path, ns: str) -> None:
    node = _node(tmp_path, REDIS, ns, FANOUT_API_KEY=API_KEY)
    loop = asyncio.get_running_loop()
    try:

        async def post(name: str, **body: Any) -> tuple[int, Any]:
            return await loop.run_in_executor(None, _post, node.port, name, body)

        assert await post("send_to_group", groups="room", data={"a": 1}) == (200, {"result": None})
        assert await post("send_to_group", groups="room", data_b64="AAE=") == (200, {"result": None})
        status, answer = await post("get_history", stream="group:room")
        assert status == 200
        assert answer["result"]["offset"] == 2 and answer["result"]["entries"] == [
            {"offset": 1, "data": {"a": 1}},
            {"offset": 2, "data_b64": "AAE="},
        ]
        status, answer = await post("get_history", stream="group:room", since=1, limit=5)
        assert [e["offset"] for e in answer["result"]["entries"]] == [2]
        assert await post("remove_history", stream="group:room") == (200, {"result": None})
        status, answer = await post("get_history", stream="group:room")
        assert status == 200 and answer["result"]["entries"] == []
        status, answer = await post("get_history", stream="nope")
        assert status == 400 and answer["error"]["type"] == "PayloadError"
        status, answer = await post("get_history", stream="all", since="x")
        assert status == 400 and "since" in answer["error"]["message"]
    finally:
        assert node.terminate() == 0


# --------------------------------------------------------------------------- memory and AMQP


async def test_memory_store_through_server_util(ns: str) -> None:
    options = {"history": "group:*", "heartbeat_interval": 0.2}
    node = Node(
        Settings.create(f"memory://{ns}", namespace=ns, **options),
        NodeOptions(port=0, node_id="m0"),
        ControlApp(),
    )
    await node.start()
    try:
        ws, cid = await client(node.port)
        async with ServerUtil(f"memory://{ns}", namespace=ns, in_process=True, **options) as util:
            assert await util.join_group(cid, "room") is True
            await util.send_to_group("room", {"m": 1})
            assert orjson.loads(await recv(ws)) == {"m": 1}
            assert await util.send_to_group("room", "two", ack=True) == 1
            assert await recv(ws) == "two"
            answer = await util.get_history("group:room")
            assert [(e["offset"], e["data"]) for e in answer["entries"]] == [(1, {"m": 1}), (2, "two")]
            await util.remove_history("group:room")
            assert (await util.get_history("group:room"))["entries"] == []
        await ws.close()
    finally:
        await node.stop()


async def test_amqp_with_a_history_url(tmp_path: Path, ns: str) -> None:
    node = _node(tmp_path, AMQP, ns, FANOUT_HISTORY_URL=REDIS)
    ws, cid = await client(node.port)
    connection = await aio_pika.connect(AMQP)
    try:
        options = {"history": "group:*,flag:*,all", "history_url": REDIS, "heartbeat_interval": HB}
        async with ServerUtil(AMQP, namespace=ns, **options) as util:
            assert await util.join_group(cid, "room") is True
            channel = await connection.channel()
            queue = await channel.declare_queue(exclusive=True)
            await queue.bind(ns, routing_key="g.room")  # the command exchange, as a node binds it
            await util.send_to_group("room", "over amqp")
            assert await recv(ws) == "over amqp"
            message = await queue.get(no_ack=True, timeout=scaled(5))
            positions, _ = split_positions(message.body)  # appended first, published with its positions
            answer = await util.get_history("group:room")
            assert positions == {"group:room": (answer["epoch"], 1)}
            assert answer["entries"] == [{"offset": 1, "data": "over amqp"}]
            assert await util.send_to_group("room", "acked", ack=True) == 1
            assert await recv(ws) == "acked"
        node.terminate()
        async with ServerUtil(AMQP, namespace=ns, **options) as util:
            await util.send_to_group("room", "nobody is live")  # stored, recoverable: no NoLiveNodes
            entries = (await util.get_history("group:room"))["entries"]
            assert [e["data"] for e in entries] == ["over amqp", "acked", "nobody is live"]
        with pytest.raises(ConfigError, match="FANOUT_HISTORY_URL"):
            async with ServerUtil(AMQP, namespace=ns, heartbeat_interval=HB) as util:
                await util.get_history("group:room")
    finally:
        await connection.close()
        await ws.close()
        if node.proc.poll() is None:
            node.terminate()


def test_a_streams_keys_carry_its_channel_as_their_hash_tag(ns: str) -> None:
    """The keys of a stream carry its routing-mode channel as their hash tag (same slot on a cluster)."""
    st = RedisStore(settings(REDIS, ns), url=REDIS, publishes=True)
    assert st.keys("group:lobby") == (f"{{{ns}:g:lobby}}:hm", f"{{{ns}:g:lobby}}:hl")
    assert st.keys("all") == (f"{{{ns}:all}}:hm", f"{{{ns}:all}}:hl")
    assert st.channel("flag:a b") == flag("a b").channel(ns)


async def test_a_packed_send_is_the_evalsha_redis_py_would_send(
    ns: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The sends' connection writes the send script's EVALSHA packed by hand, from parts kept per shape
    (streams, messages, key): byte for byte the command redis-py's path sends for the same send, for
    every shape, whether its parts were packed just now or kept from an earlier send."""
    import fanout.backends.store_redis as store_redis

    monkeypatch.setattr(store_redis, "new_epoch", lambda: "e0e0e0e0")
    st = RedisStore(settings(REDIS, ns), url=REDIS, publishes=True)
    sha = aioredis.Redis().register_script(store_redis._SEND).sha  # what redis-py's path calls it
    assert sha == store_redis.SEND_SHA
    called: list[tuple[list[bytes], list[bytes]]] = []

    async def redis_py(name: str, keys: list[bytes], args: list[bytes]) -> None:
        assert name == "send"
        called.append((keys, args))

    monkeypatch.setattr(st, "_eval", redis_py)
    shapes = 0
    for streams in (["group:a"], ["group:a", "flag:b c"], ["group:a", "flag:b c", "all"]):
        for messages in (0, 1, 2):
            for key in (None, "k1"):
                for binary, json, exclude in (
                    (False, False, ()),
                    (True, False, ("x",)),
                    (False, True, ("x", "y")),
                ):
                    for complete in (True, False):
                        send = StoredSend("s1", b"pay\r\nload", binary, json, exclude, key)
                        items = [(b"channel%d" % i, b"message %d" % i) for i in range(messages)]
                        for _ in range(2):  # packed, then from the kept parts
                            await st._eval_send(streams, send, items, complete)
                            keys, args = called.pop()
                            expected = pack(b"EVALSHA", sha.encode(), b"%d" % len(keys), *keys, *args)
                            assert st._pack_send(streams, send, items, complete) == expected
                        shapes += 1
    assert shapes == 108


async def test_a_store_restarted_empty_starts_new_epochs(tmp_path: Path, ns: str) -> None:
    """Redis restarted without its data: the scripts are loaded again (NOSCRIPT), and every stream has a
    new epoch, so a client holding the old one is told it cannot recover."""
    from tests.support.redis_servers import start_redis

    server = start_redis(tmp_path / "redis")
    try:
        async with store(server.url, ns) as st:
            before = await st.append(["group:a"], sent("s1"))
            await st.save_resume("tok", None, b"r", 30, create=True)
            server.restart()
            # the sends' connection went with the server: the first send may fail (never silently)
            stored = ["s2"]
            try:
                await st.append(["group:a"], sent("maybe"))
                stored.insert(0, "maybe")
            except BackendUnavailable:
                pass
            after = await st.append(["group:a"], sent("s2"))  # a new connection, the script loaded again
            assert after["group:a"][0] != before["group:a"][0] and after["group:a"][1] == len(stored)
            page = await st.read("group:a")  # redis-py's connection: reconnects, loads its script
            assert [e.sid for e in page.entries] == stored and page.epoch == after["group:a"][0]
            assert await st.claim_resume("tok", None) is None
    finally:
        server.stop()
