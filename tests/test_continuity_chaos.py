"""Issue 17's acceptance, on real node processes, real brokers and real websocket clients, every message
counted: a v1 client whose socket is aborted resumes on the other node with its state and every send
once; a node SIGKILLed under hundreds of v1 clients while sends go on (Redis, Redis Cluster, RabbitMQ +
a Redis store; both modes); a node whose broker connection is cut reads the gap back (positioning).

(``recovered: false`` and refused tokens: tests/test_continuity_refusals.py; the worker tier's
``resumed_from`` and the JS client in Chromium: tests/test_continuity_js_workers.py.)
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest
from redis.crc import key_slot
from websockets.asyncio.client import ClientConnection, connect

from fanout import FanoutError, Settings, naming, protocol
from fanout.backends.store import StoredSend
from fanout.backends.store_redis import RedisStore
from fanout.client import Client, Resumed
from fanout.commands import Send, Target
from fanout.history import new_send_id
from tests.support import scaled
from tests.support.continuity import (
    AMQP,
    REDIS,
    STREAMS,
    V1,
    forgetting,
    node_env,
    two_nodes,
    until,
    until_gone,
    util_of,
)
from tests.support.nodes import metrics, start_node
from tests.support.redis_servers import RedisCluster, start_cluster, start_redis
from tests.support.tcp_proxy import ProxyProcess


@pytest.fixture(autouse=True)
def _forget_namespaces() -> Iterator[None]:
    yield from forgetting()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisCluster]:
    redis_cluster = start_cluster(tmp_path_factory.mktemp("chaos-cluster"))
    yield redis_cluster
    redis_cluster.stop()


# ---------------------------------------------------------------------------------------------- 1


async def test_an_aborted_v1_client_resumes_on_the_other_node_with_its_state_and_every_send_once(
    tmp_path: Path,
) -> None:
    env = node_env(REDIS)
    a, b = two_nodes(tmp_path, env)
    async with util_of(env) as util:
        first = await V1.open(a.port, "groups=h-main")  # a guest in h-main
        old = first.client_id
        assert old.startswith("node-a.") and list(first.positions) == ["group:h-main"]
        # ServerUtil gives it a second history group, a flag and a session after it connected
        assert await util.join_group(old, "h-second") is True
        joined = await first.frame()
        assert joined["type"] == "joined" and joined["stream"] == "group:h-second"
        assert await util.bind(old, "ann") is True
        await util.set_session(old, {"plan": "gold", "n": 7})
        for n in range(3):
            await util.send_to_group("h-main", {"before": n})
        assert [(await first.frame())["data"] for _ in range(3)] == [{"before": n} for n in range(3)]
        await util.send_to_group("h-second", "second before")
        assert (await first.frame())["data"] == "second before"
        token, positions = first.token, {s: list(p) for s, p in first.positions.items()}
        assert positions == {
            "group:h-main": [positions["group:h-main"][0], 3],
            "group:h-second": [positions["group:h-second"][0], 1],
        }

        first.abort()
        for n in range(50):  # while it is away
            await util.send_to_group("h-main", {"n": n})
        for n in range(3):
            await util.send_to_group("h-second", {"s": n})
        assert await util.exists(old) is False  # node-a saw it go

        # back on node-b, admitted as the user the flag names (the app's login), in no group
        second = await V1.open(b.port, "user=ann")
        new = second.client_id
        assert new.startswith("node-b.") and second.welcome["streams"] == {}
        await second.resume(token, positions)
        frames = []
        while (frame := await second.frame())["type"] != "resumed":
            frames.append(frame)
        assert all(f["type"] == "message" for f in frames), frames
        main = [f for f in frames if "group:h-main" in f["streams"]]
        other = [f for f in frames if "group:h-second" in f["streams"]]
        assert len(main) + len(other) == len(frames) == 53  # each once
        assert [f["data"] for f in main] == [{"n": n} for n in range(50)]  # all 50, in order
        assert [f["streams"] for f in main] == [{"group:h-main": 4 + n} for n in range(50)]
        assert [f["data"] for f in other] == [{"s": n} for n in range(3)]
        assert [f["streams"] for f in other] == [{"group:h-second": 2 + n} for n in range(3)]
        assert frame == {
            "type": "resumed",
            "recovered": True,
            "streams": {
                "group:h-main": {"recovered": True, "epoch": positions["group:h-main"][0], "offset": 53},
                "group:h-second": {"recovered": True, "epoch": positions["group:h-second"][0], "offset": 4},
            },
        }

        # its groups, flag and session are back, under its new client id
        assert await util.get_flag(new) == "ann"
        assert await util.get_client_ids_by_flag("ann") == [new]
        assert await util.is_in_group(new, "h-main") and await util.is_in_group(new, "h-second")
        assert await util.get_session(new) == {"plan": "gold", "n": 7}
        assert await util.get_group_client_ids("h-main") == [new]

        # then live sends, once each
        for n in range(50, 60):
            await util.send_to_group("h-main", {"n": n})
        await util.send_by_flag("ann", "to ann")
        await util.send_to_group(["h-main", "h-second"], "to both")
        live = [await second.frame() for _ in range(12)]
        assert [f["data"] for f in live] == [{"n": n} for n in range(50, 60)] + ["to ann", "to both"]
        assert [f.get("streams") for f in live[:10]] == [{"group:h-main": 54 + i} for i in range(10)]
        assert live[10] == {"type": "message", "data": "to ann"}  # flag:ann is not a history stream
        assert live[11]["streams"] == {"group:h-main": 64, "group:h-second": 5}  # one copy, both offsets
        await second.nothing_more()
        await second.ws.close()
    assert a.terminate() == 0 and b.terminate() == 0


# ---------------------------------------------------------------------------------------------- 2

#: v1 clients on the node that is killed, and the history groups they are spread over
CLIENTS = 500
GROUPS = 10


def mark_resumed(got: list[Any]) -> Callable[[Resumed], None]:
    """An ``on_resumed`` that notes the resume among the deliveries (it is called in order with them)."""
    return lambda resumed: got.append(("resumed", resumed.recovered))


class TracedClient(Client):
    """A Client that keeps every frame it read (a failure shows what the node sent)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.frames: list[str | bytes] = []

    async def _v1_frame(self, ws: ClientConnection, text: str | bytes) -> None:
        self.frames.append(text)
        await super()._v1_frame(ws, text)

    def trace(self) -> str:
        return "\n".join(f if isinstance(f, str) else repr(f) for f in self.frames[-80:])


@dataclass
class Fleet:
    """``count`` fanout.client.Client instances (``user=u<i>``, in group ``h-<i % GROUPS>``), each with
    a reader task keeping every delivery in ``got[i]``."""

    clients: list[TracedClient]
    got: list[list[Any]]
    readers: list[asyncio.Task[None]]

    @classmethod
    async def connect(
        cls, count: int, ports: Callable[[int], list[int]], groups: Callable[[int], str] | None = None
    ) -> Fleet:
        """``ports(i)``: the nodes of client ``i``, in the order it tries them; ``groups(i)``: its groups
        (``h-<i % GROUPS>``)."""
        got: list[list[Any]] = [[] for _ in range(count)]
        groups = groups or (lambda i: f"h-{i % GROUPS}")
        clients = [
            TracedClient(
                [f"ws://127.0.0.1:{port}/?user=u{i}&groups={groups(i)}" for port in ports(i)],
                backoff=(0.05, 1.0),
                open_timeout=scaled(20),
                on_resumed=mark_resumed(got[i]),
            )
            for i in range(count)
        ]
        for start in range(0, count, 50):  # 50 handshakes at a time
            await asyncio.wait_for(
                asyncio.gather(*(c.connect() for c in clients[start : start + 50])), scaled(30)
            )

        async def read(i: int) -> None:
            async for message in clients[i]:
                got[i].append(message)

        return cls(clients, got, [asyncio.create_task(read(i)) for i in range(count)])

    def messages(self, i: int) -> list[Any]:
        return [m for m in self.got[i] if not isinstance(m, tuple)]

    def have(self, sent: list[int]) -> bool:
        """Whether every client has as many deliveries as were sent to its group."""
        return all(len(self.messages(i)) >= sent[i % GROUPS] for i in range(len(self.clients)))

    async def close(self) -> None:
        await asyncio.gather(*(c.close() for c in self.clients), return_exceptions=True)
        await asyncio.gather(*self.readers, return_exceptions=True)


CASES = [
    pytest.param("redis", "routing", id="redis-routing"),
    pytest.param("cluster", "routing", id="cluster-routing"),
    pytest.param("amqp", "routing", id="amqp-routing"),
    pytest.param("redis", "fanout", id="redis-fanout"),
]


@pytest.mark.parametrize(("broker", "mode"), CASES)
async def test_a_node_sigkilled_under_its_v1_clients_while_sends_go_on_loses_and_repeats_nothing(
    tmp_path: Path, request: pytest.FixtureRequest, broker: str, mode: str
) -> None:
    """500 fanout.client.Client instances on node-a, 50 in each of 10 history groups; a publisher sends
    to every group in turn (numbered per group) and goes on while node-a is SIGKILLed and its clients come
    back on node-b and node-c; at the end each client has had every send to its group once, in order,
    with one ``resumed`` (recovered) in between."""
    # (a history big enough for any reconnection storm this machine may take: the point is 0 lost)
    history = {"FANOUT_MODE": mode, "FANOUT_HISTORY_SIZE": "1000"}
    if broker == "cluster":
        cluster_url: str = request.getfixturevalue("cluster").url
        env = node_env(cluster_url, **history)
    elif broker == "amqp":
        env = node_env(AMQP, FANOUT_HISTORY_URL=REDIS, **history)
    else:
        env = node_env(REDIS, **history)
    a, b = two_nodes(tmp_path, env)
    c = start_node(tmp_path, {**env, "FANOUT_NODE_ID": "node-c"}, app=STREAMS)
    # every client starts on node-a; half of them know node-b next, the other half node-c
    fleet = await Fleet.connect(CLIENTS, lambda i: [a.port, (b, c)[i % 2].port])
    sent = [0] * GROUPS
    stop = asyncio.Event()
    try:
        assert {client.node_id for client in fleet.clients} == {"node-a"}
        assert all(client.v1 for client in fleet.clients)

        async with util_of(env) as util:

            async def publish() -> None:
                """Sends numbered per group, a round over every group at a time, until told to stop."""
                while not stop.is_set():
                    for g in range(GROUPS):
                        await util.send_to_group(f"h-{g}", {"g": g, "n": sent[g]})
                        sent[g] += 1
                    await asyncio.sleep(0.02)

            publishing = asyncio.create_task(publish())
            await until(lambda: sent[0] >= 10 and fleet.have([10] * GROUPS), 30, "the first sends")
            at_kill = sent[0]
            a.kill()  # SIGKILL, with the sends going on
            await until(
                lambda: all(client.resumed is not None for client in fleet.clients) or publishing.done(),
                60,
                "every client resumed",
                every=0.2,
            )
            at_resume = sent[0]
            assert at_resume > at_kill  # sends went on while the clients were away
            await until(lambda: sent[0] >= at_resume + 10 or publishing.done(), 30, "later sends")
            stop.set()
            await publishing  # (raises what the publisher raised)
        await until(lambda: fleet.have(sent), 60, "every send delivered", every=0.2)
        await asyncio.sleep(scaled(0.5))  # anything more (a duplicate) would arrive meanwhile

        wrong = []
        for i, client in enumerate(fleet.clients):
            g = i % GROUPS
            if fleet.messages(i) != [{"g": g, "n": n} for n in range(sent[g])]:
                ns = [m.get("n") if isinstance(m, dict) else m for m in fleet.got[i]]
                wrong.append((i, f"{client.duplicates} dropped as duplicates, got {ns}"))
            if (
                fleet.got[i].count(("resumed", True)) != 1
                or client.resumed is None
                or client.resumed.recovered is not True
                or client.node_id != ("node-b", "node-c")[i % 2]
                or client.connections != 2
            ):
                wrong.append(
                    (
                        i,
                        f"resumed {client.resumed}, on {client.node_id}, {client.connections} connections, "
                        f"last close {client.close_code} {client.close_reason}",
                    )
                )
        assert not wrong, (
            f"{len(wrong)} clients wrong, e.g. {wrong[:5]} (sent {sent})\n"
            f"{fleet.clients[wrong[0][0]].trace()}\n{b.log()[-2000:]}"
        )
    finally:
        stop.set()
        await fleet.close()
    assert b.terminate() == 0 and c.terminate() == 0


async def test_v1_clients_admitted_into_a_busy_history_group_get_the_welcome_first_then_offsets_only(
    tmp_path: Path,
) -> None:
    """Clients that come back (resume) while sends flood the group their admission puts them in: the
    welcome comes first, and every delivery of a history send carries its offset - or the client could not
    tell a replayed copy from it. Taken as docs/continuity.md says a client must (the messages of a resumed
    stream held until ``resumed``, then handed in offset order, each once; later ones only if newer), every
    send arrives once, in order, across the two connections."""
    env = node_env(REDIS, FANOUT_HISTORY_SIZE="10000")  # nothing trimmed: every resume recovers
    a, b = two_nodes(tmp_path, env)
    stop = asyncio.Event()
    sent = 0
    async with util_of(env) as util:

        async def flood() -> None:
            nonlocal sent
            while not stop.is_set():
                await asyncio.gather(*(util.send_to_group("h-busy", {"n": sent + k}) for k in range(2)))
                sent += 2
                await asyncio.sleep(0.005)

        flooding = asyncio.create_task(flood())
        try:
            for _ in range(20):
                first = await V1.open(a.port, "user=ann&groups=h-busy")
                seen = [(await first.frame())["data"]["n"] for _ in range(10)]
                token, positions = first.token, {s: list(p) for s, p in first.positions.items()}
                first.abort()
                # back on the other node, admitted into the group again while the sends go on
                ws = await connect(
                    f"ws://127.0.0.1:{b.port}/?user=ann&groups=h-busy",
                    subprotocols=["fanout.v1"],  # type: ignore[list-item]
                )
                welcome = orjson.loads(await asyncio.wait_for(ws.recv(), scaled(10)))
                assert welcome["type"] == "welcome", f"{welcome} before the welcome"
                second = V1(ws, welcome)
                await second.resume(token, positions)
                held = []
                while (frame := await second.frame())["type"] != "resumed":
                    held.append(frame)
                assert frame["recovered"] is True, frame
                later = [await second.frame() for _ in range(10)]
                untracked = [f for f in held + later if "group:h-busy" not in f.get("streams", {})]
                assert not untracked, untracked
                # what the application is handed
                by_offset = {f["streams"]["group:h-busy"]: f["data"]["n"] for f in held}
                handed = [by_offset[offset] for offset in sorted(by_offset)]
                top = max(by_offset, default=positions["group:h-busy"][1])
                handed += [f["data"]["n"] for f in later if f["streams"]["group:h-busy"] > top]
                assert seen + handed == list(range(seen[0], seen[0] + len(seen) + len(handed))), (
                    seen,
                    positions,
                    welcome,
                    held,
                    later,
                )
                await ws.close()
        finally:
            stop.set()
            await flooding


# ---------------------------------------------------------------------------------------------- 3


@pytest.mark.parametrize("mode", ["routing", "fanout"])
async def test_a_node_cut_from_its_broker_while_sends_go_on_gives_every_member_every_send_once(
    tmp_path: Path, mode: str
) -> None:
    """The node reaches Redis through a TCP proxy that is cut (both ends aborted, new connections refused)
    and restored; Redis keeps running and the publisher, connected directly, keeps sending. Once the node is
    healthy again its raw and fanout.v1 members of history groups have had every send, in order, once: it
    read the gap back from the store (positioning), pub/sub having dropped it."""
    # (a history that holds any outage this machine may take: the point is the gap read back, not its size)
    env = node_env(REDIS, FANOUT_MODE=mode, FANOUT_HISTORY_SIZE="10000")
    with ProxyProcess(target="127.0.0.1:6379") as proxy:
        node = start_node(
            tmp_path,
            {**env, "FANOUT_URL": f"redis://127.0.0.1:{proxy.port}/0", "FANOUT_NODE_ID": "cut"},
            app=STREAMS,
        )
        queries = ["groups=h-one", "groups=h-one", "groups=h-one,h-two", "groups=h-two"]
        raws = []
        for query in queries:
            ws = await connect(f"ws://127.0.0.1:{node.port}/?{query}")
            assert orjson.loads(await asyncio.wait_for(ws.recv(), scaled(10)))["type"] == "welcome"
            raws.append(ws)
        v1s = [await V1.open(node.port, query) for query in queries]
        wanted = [{"h-one"}, {"h-one"}, {"h-one", "h-two"}, {"h-two"}]
        sent = {"h-one": 0, "h-two": 0}
        stop = asyncio.Event()
        async with util_of(env) as util:

            async def publish() -> None:
                while not stop.is_set():
                    for group in ("h-one", "h-two"):
                        await util.send_to_group(group, {"g": group, "n": sent[group]})
                        sent[group] += 1
                    await asyncio.sleep(0.01)

            publishing = asyncio.create_task(publish())
            try:
                await until(lambda: sent["h-two"] >= 20, 30, "the first sends")
                proxy.cut()
                await asyncio.to_thread(node.wait_healthy, 20, False)
                at_cut = sent["h-two"]
                await until(lambda: sent["h-two"] >= at_cut + 50, 30, "sends while the node is cut off")
                proxy.restore()
                await asyncio.to_thread(node.wait_healthy, 30)
                at_restore = sent["h-two"]
                await until(lambda: sent["h-two"] >= at_restore + 20, 30, "sends after the outage")
            finally:
                stop.set()
                await publishing
        # (routing mode: the node heard nothing while cut off; the store is where the gap was read)
        assert at_restore > at_cut

        async def everything(i: int, v1: bool) -> list[Any]:
            """What the client has, once it has as many as were sent to it or nothing came for a while."""
            total = sum(sent[g] for g in wanted[i])
            got: list[Any] = []
            with contextlib.suppress(TimeoutError):
                while len(got) < total:
                    if v1:
                        got.append(await v1s[i].frame(20))
                    else:
                        got.append(orjson.loads(await asyncio.wait_for(raws[i].recv(), scaled(20))))
            return got

        def told(got: list[Any], group: str) -> str:
            ns = [m["n"] for m in got if m["g"] == group]
            missing = sorted(set(range(sent[group])) - set(ns))
            return f"{group}: {len(ns)} of {sent[group]}, missing {missing}, cut at {at_cut}-{at_restore}"

        for i in range(len(queries)):
            raw, enveloped = await everything(i, False), await everything(i, True)
            for group in wanted[i]:
                expected = [{"g": group, "n": n} for n in range(sent[group])]
                assert [m for m in raw if m["g"] == group] == expected, (
                    i,
                    told(raw, group),
                    node.log()[-2000:],
                )
                data = [f["data"] for f in enveloped]
                assert [m for m in data if m["g"] == group] == expected, (i, told(data, group))
                offsets = [f["streams"][f"group:{group}"] for f in enveloped if f["data"]["g"] == group]
                assert offsets == list(range(1, sent[group] + 1))
            await v1s[i].nothing_more(0.2)
            with contextlib.suppress(TimeoutError):
                extra = await asyncio.wait_for(raws[i].recv(), 0.2)
                raise AssertionError(f"raw client {i} got {extra!r} more")
        samples = await metrics(node.port)
        assert samples["fanout_history_reads_total"] >= 1, samples
        for ws in raws:
            await ws.close()
        for client in v1s:
            await client.ws.close()
        assert node.terminate() == 0


async def test_a_connection_that_lived_through_a_store_restart_can_still_resume(tmp_path: Path) -> None:
    """Redis (backend and store) restarts without its data while a v1 connection stays open: its resume
    record is gone with the rest, and must be written again (as its state changes, and while it lives),
    or the connection, dropped later, could never resume."""
    server = start_redis(tmp_path / "redis")
    try:
        env = node_env(server.url)
        a, b = two_nodes(tmp_path, env)
        async with util_of(env) as util:
            erin = await V1.open(a.port, "user=erin")  # in no history stream: nothing closes it (3010)
            server.kill()
            server.restart()  # the same port, no data
            await asyncio.to_thread(a.wait_healthy, 30)
            await asyncio.to_thread(b.wait_healthy, 30)
            for _ in range(50):  # the publisher's link comes back too
                with contextlib.suppress(FanoutError):
                    assert await util.join_group(erin.client_id, "room") is True
                    break
                await asyncio.sleep(0.1)
            await util.set_session(erin.client_id, {"cart": 3})
            await asyncio.sleep(0.3)  # (the record is written after the change is applied)
            token, positions = erin.snapshot()
            erin.abort()
            back = await V1.open(b.port, "user=erin")
            await back.resume(token, positions)
            assert await back.frame() == {"type": "resumed", "recovered": True, "streams": {}}
            assert await util.is_in_group(back.client_id, "room")
            assert await util.get_session(back.client_id) == {"cart": 3}
            await back.ws.close()
    finally:
        server.stop()


@pytest.mark.parametrize("broker", ["redis", "cluster"])
async def test_sends_to_several_groups_reach_each_client_once_across_a_sigkilled_node(
    tmp_path: Path, request: pytest.FixtureRequest, broker: str
) -> None:
    """The same storm, with sends that go to two groups at once and clients in two groups (on Redis
    Cluster the groups' streams are in different slots: offsets reserved slot by slot, then appended):
    one copy per connection holds live and in the replay; per group, in order."""
    url = request.getfixturevalue("cluster").url if broker == "cluster" else REDIS
    env = node_env(url, FANOUT_HISTORY_SIZE="1000")
    a, b = two_nodes(tmp_path, env)
    count = 200
    # client i: in h-<i % 10> and h-<(i // 10) % 10>, the same group twice for some
    pairs = [{i % GROUPS, (i // GROUPS) % GROUPS} for i in range(count)]
    fleet = await Fleet.connect(
        count, lambda i: [a.port, b.port], lambda i: ",".join(f"h-{g}" for g in sorted(pairs[i]))
    )
    sends: list[set[int]] = []  # the groups of send k
    stop = asyncio.Event()
    try:
        async with util_of(env) as util:

            async def publish() -> None:
                while not stop.is_set():
                    for g in range(GROUPS):
                        to = {g, (g + 3) % GROUPS}
                        await util.send_to_group([f"h-{x}" for x in sorted(to)], {"k": len(sends)})
                        sends.append(to)
                    await asyncio.sleep(0.02)

            def wanted(i: int) -> list[int]:
                return [k for k, to in enumerate(sends) if to & pairs[i]]

            def have() -> bool:
                return all(len(fleet.messages(i)) >= len(wanted(i)) for i in range(count))

            publishing = asyncio.create_task(publish())
            await until(lambda: len(sends) >= 50 and have(), 30, "the first sends")
            a.kill()
            await until(lambda: all(c.resumed for c in fleet.clients) or publishing.done(), 60, "resumes")
            at_resume = len(sends)
            await until(lambda: len(sends) >= at_resume + 50 or publishing.done(), 30, "later sends")
            stop.set()
            await publishing
        with contextlib.suppress(AssertionError):  # (what is missing is told below)
            await until(have, 60, "every send delivered", every=0.2)
        await asyncio.sleep(scaled(0.5))

        wrong = []
        for i, client in enumerate(fleet.clients):
            ks = [m["k"] for m in fleet.messages(i)]
            if sorted(ks) != wanted(i):  # each once
                missing = sorted(set(wanted(i)) - set(ks))
                twice = len(ks) - len(set(ks))
                wrong.append((i, f"{len(ks)} got, {twice} twice, {len(wanted(i))} sent, missing {missing}"))
            for g in pairs[i]:  # in order in each of its streams
                mine = [k for k in ks if g in sends[k]]
                if mine != sorted(mine):
                    wrong.append((i, f"h-{g} out of order: {mine}"))
            if fleet.got[i].count(("resumed", True)) != 1 or client.node_id != "node-b":
                wrong.append((i, f"resumed {client.resumed} on {client.node_id}"))
        assert not wrong, (
            f"{len(wrong)} clients wrong, e.g. {wrong[:5]}\n{fleet.clients[wrong[0][0]].trace()}"
        )
    finally:
        stop.set()
        await fleet.close()
    assert b.terminate() == 0


async def test_a_resume_waits_for_an_offset_taken_but_not_written_yet(
    tmp_path: Path, cluster: RedisCluster
) -> None:
    """Redis Cluster, a send to two groups whose streams are in different slots: its offsets are taken
    (phase 1) when a client resumes; the node starts tracking the streams at those offsets, so the send's
    live copy will not reach the client: the replay must have it. The resume reads the stream again
    until the entry is written (phase 2, a moment later), not replay without it."""
    env = node_env(cluster.url)
    node = start_node(tmp_path, {**env, "FANOUT_NODE_ID": "solo"}, app=STREAMS)
    settings = Settings.from_env(env)
    store = RedisStore(settings, url=cluster.url, publishes=True)
    await store.connect()
    groups = next(
        (x, y)
        for x, y in itertools.combinations([f"h-{n}" for n in range(20)], 2)
        if store._slot_of(f"group:{x}") != store._slot_of(f"group:{y}")
    )
    try:
        async with util_of(env) as util:
            ann = await V1.open(node.port, f"user=ann&groups={','.join(groups)}")
            await util.send_to_group(list(groups), "one")
            assert (await ann.frame())["streams"] == {f"group:{g}": 1 for g in groups}
            token, positions = ann.snapshot()
            ann.abort()
            await until_gone(util, ann.client_id)

            streams = [f"group:{g}" for g in groups]
            slots = {store._slot_of(stream): [stream] for stream in streams}
            taken = await store._reserve(slots)  # phase 1: offsets 2 taken, nothing written
            back = await V1.open(node.port, "user=ann")
            await back.resume(token, positions)
            await asyncio.sleep(0.1)
            send = Send(Target.groups(*groups), orjson.dumps("two"), json=True, sid=new_send_id())
            message = protocol.Encoder("pub", settings.namespace).encode(send, time.time())
            items = [(naming.group(g), message) for g in groups]
            channels = [address.channel(settings.namespace).encode() for address, _ in items]
            stored = StoredSend(send.sid or "", send.payload, json=True)
            await store._append_slots(slots, stored, taken, channels, items, [key_slot(c) for c in channels])

            replay, resumed = await back.until_resumed()
            later = []
            with contextlib.suppress(TimeoutError):
                while True:
                    later.append(await back.frame(1.0))
            assert [f["data"] for f in replay + later] == ["two"], (replay, resumed, later)
            assert (replay + later)[0]["streams"] == {stream: 2 for stream in streams}
            assert resumed["recovered"] is True
            await back.ws.close()
    finally:
        await store.close()
    assert node.terminate() == 0
