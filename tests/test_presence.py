"""Presence across real node processes: joins and leaves once per flag across nodes and tabs, the
debounce, a killed node, a broker outage, and presence events for the workers."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from websockets.asyncio.client import ClientConnection

from fanout import ServerUtil
from tests.apps.recording_worker import read_records
from tests.support import scaled
from tests.support.nodes import NodeProcess, client, start_node, unique_namespace
from tests.support.redis_servers import RedisCluster, start_cluster, start_redis
from tests.support.workers import start_worker

DEBOUNCE = 1.0
HB = 0.5


class Watcher:
    """A client in the room that records every presence frame it receives."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.frames: list[tuple[str, str, float]] = []
        self.task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for data in self.ws:
            message = orjson.loads(data)
            if isinstance(message, dict) and message.get("type") == "presence":
                self.frames.append((message["event"], message["flag"], time.monotonic()))

    def of(self, flag: str) -> list[str]:
        return [event for event, f, _ in self.frames if f == flag]

    async def until(self, check: Callable[[], bool], timeout: float, what: str) -> float:
        started = time.monotonic()
        while time.monotonic() - started < scaled(timeout):
            if check():
                return time.monotonic() - started
            await asyncio.sleep(0.05)
        raise AssertionError(f"timed out waiting for {what}; frames: {self.frames}")


@pytest.fixture
async def cluster(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Callable[..., Any]]:
    started: list[NodeProcess] = []
    utils: list[ServerUtil] = []

    async def make(url: str, count: int = 3, **env: str) -> tuple[list[NodeProcess], ServerUtil]:
        base = {
            "FANOUT_URL": url,
            "FANOUT_NAMESPACE": unique_namespace("pr"),
            "FANOUT_PRESENCE": "room-*",
            "FANOUT_PRESENCE_DEBOUNCE": str(DEBOUNCE),
            "FANOUT_HEARTBEAT_INTERVAL": str(HB),
            **env,
        }
        nodes = [
            start_node(tmp_path, {**base, "FANOUT_NODE_ID": f"p{i}"}, app="tests.apps.control:app")
            for i in range(count)
        ]
        started.extend(nodes)
        util = ServerUtil(
            url,
            namespace=base["FANOUT_NAMESPACE"],
            mode=base.get("FANOUT_MODE", "routing"),
            heartbeat_interval=HB,
        )
        await util.connect()
        utils.append(util)
        await asyncio.sleep(2.5)  # every node heard the others (presence trusts its view from then on)
        return nodes, util

    yield make
    for util in utils:
        await util.disconnect()
    for node in started:
        node.kill()


async def _poll(check: Callable[[], bool], timeout: float) -> None:
    started = time.monotonic()
    while not check():
        assert time.monotonic() - started < scaled(timeout), "timed out"
        await asyncio.sleep(0.1)


async def _member(util: ServerUtil, port: int, group: str, flag: str) -> tuple[ClientConnection, str]:
    ws, cid = await client(port)
    assert await util.bind(cid, flag) is True
    assert await util.join_group(cid, group) is True
    return ws, cid


CONFIGS = [
    f"{broker}-{mode}" for broker in ("redis", "rediscluster", "amqp") for mode in ("routing", "fanout")
]


@pytest.fixture(scope="module")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisCluster]:
    """One local 3-master Redis Cluster for the rediscluster configurations."""
    started = start_cluster(tmp_path_factory.mktemp("presence-cluster"))
    yield started
    started.stop()


def _url(request: pytest.FixtureRequest, broker: str) -> str:
    if broker == "rediscluster":
        redis_cluster: RedisCluster = request.getfixturevalue("redis_cluster")
        return redis_cluster.url
    return {"redis": "redis://127.0.0.1:6379/0", "amqp": "amqp://guest:guest@127.0.0.1:5672/"}[broker]


@pytest.mark.parametrize("config", CONFIGS)
async def test_join_and_leave_once_per_flag_across_nodes_and_tabs(
    config: str, cluster: Any, request: pytest.FixtureRequest
) -> None:
    broker, mode = config.split("-")
    url = _url(request, broker)
    nodes, util = await cluster(url, FANOUT_MODE=mode)
    watcher_ws, _ = await _member(util, nodes[2].port, "room-1", "watcher")
    watcher = Watcher(watcher_ws)
    tab1, _ = await _member(util, nodes[0].port, "room-1", "ann")
    await watcher.until(lambda: watcher.of("ann") == ["join"], 5, "ann's join")
    tab2, tab2_id = await _member(util, nodes[1].port, "room-1", "ann")  # her second tab, another node
    assert await util.get_presence("room-1") == {"ann": 2, "watcher": 1}
    await tab1.close()
    await asyncio.sleep(DEBOUNCE + 1)
    assert watcher.of("ann") == ["join"]  # one tab left: she is still here
    left = time.monotonic()
    await util.leave_group(tab2_id, "room-1")
    took = await watcher.until(lambda: watcher.of("ann") == ["join", "leave"], 10, "ann's leave")
    assert took >= DEBOUNCE * 0.9  # not before the debounce
    assert time.monotonic() - left < DEBOUNCE + 3
    # a group with no presence pattern gets no presence frames
    await util.join_group(tab2_id, "other")
    await asyncio.sleep(1)
    assert watcher.of("ann") == ["join", "leave"]
    assert await util.get_presence("other") == {"ann": 1}  # get_presence answers for any group
    await tab2.close()
    await watcher_ws.close()


async def test_a_quick_reconnect_within_the_debounce_is_no_leave(cluster: Any) -> None:
    nodes, util = await cluster("redis://127.0.0.1:6379/0")
    watcher_ws, _ = await _member(util, nodes[0].port, "room-2", "watcher")
    watcher = Watcher(watcher_ws)
    first, _ = await _member(util, nodes[1].port, "room-2", "bob")
    await watcher.until(lambda: watcher.of("bob") == ["join"], 5, "bob's join")
    await first.close()  # reconnects at once, to another node
    await asyncio.sleep(DEBOUNCE * 0.3)
    again, _ = await _member(util, nodes[2].port, "room-2", "bob")
    await asyncio.sleep(DEBOUNCE * 2)
    assert watcher.of("bob") == ["join"]
    await again.close()
    await watcher.until(lambda: watcher.of("bob") == ["join", "leave"], 10, "bob's leave")
    await watcher_ws.close()


@pytest.mark.parametrize("victim", [0, 1], ids=["the-leader", "another-node"])
async def test_a_killed_node_makes_its_flags_leave(victim: int, cluster: Any) -> None:
    """Node p0 has the smallest instance id of the three: it is the one announcing."""
    nodes, util = await cluster("redis://127.0.0.1:6379/0")
    watcher_ws, _ = await _member(util, nodes[2].port, "room-3", "watcher")
    watcher = Watcher(watcher_ws)
    await _member(util, nodes[victim].port, "room-3", "carol")
    await watcher.until(lambda: watcher.of("carol") == ["join"], 5, "carol's join")
    nodes[victim].kill()
    took = await watcher.until(lambda: watcher.of("carol") == ["join", "leave"], 15, "carol's leave")
    assert took < 15
    await asyncio.sleep(1)
    assert watcher.of("carol") == ["join", "leave"]
    assert watcher.of("watcher") == ["join"]  # once, whoever announced it
    print(f"node {victim} SIGKILLed: carol left {took:.1f}s later")
    await watcher_ws.close()


async def test_nothing_is_stale_after_a_broker_outage(cluster: Any, tmp_path: Path) -> None:
    redis = start_redis(tmp_path / "redis")
    try:
        nodes, util = await cluster(redis.url)
        watcher_ws, _ = await _member(util, nodes[2].port, "room-4", "watcher")
        watcher = Watcher(watcher_ws)
        stays, _ = await _member(util, nodes[0].port, "room-4", "dave")
        goes, _ = await _member(util, nodes[1].port, "room-4", "eve")
        await watcher.until(
            lambda: watcher.of("dave") == ["join"] and watcher.of("eve") == ["join"], 5, "joins"
        )
        redis.kill()
        await asyncio.sleep(0.5)
        await goes.close()  # eve leaves while the broker is down
        await asyncio.sleep(2)
        redis.restart()
        await watcher.until(
            lambda: watcher.of("eve") == ["join", "leave"], 20, "eve's leave after the outage"
        )
        await asyncio.sleep(DEBOUNCE + 2)
        assert watcher.of("dave") == ["join"]  # not a leave (and a join again) because the broker blinked
        assert await util.get_presence("room-4") == {"dave": 1, "watcher": 1}
        await stays.close()
        await watcher_ws.close()
    finally:
        redis.stop()


async def test_workers_get_presence_events(cluster: Any, tmp_path: Path) -> None:
    records = tmp_path / "records"
    records.mkdir()
    url = "redis://127.0.0.1:6379/0"
    nodes, util = await cluster(url, count=2, FANOUT_EVENTS="open")
    worker = start_worker(
        tmp_path,
        {
            "FANOUT_URL": url,
            "FANOUT_NAMESPACE": util.settings.namespace,
            "FANOUT_HEARTBEAT_INTERVAL": str(HB),
            "RECORDING_WORKER_DIR": str(records),
        },
    )
    try:
        ws, _ = await _member(util, nodes[1].port, "room-5", "frank")

        def presence() -> list[tuple[str, str, str]]:
            return [
                (r["group"], r["flag"], r["change"]) for r in read_records(records) if r["kind"] == "presence"
            ]

        await _poll(lambda: presence() == [("room-5", "frank", "join")], 10)
        await ws.close()
        await _poll(lambda: len(presence()) >= 2, 20)
        assert presence() == [("room-5", "frank", "join"), ("room-5", "frank", "leave")]
    finally:
        worker.kill()


async def test_a_contribution_too_big_for_one_message_is_reported(caplog: pytest.LogCaptureFixture) -> None:
    from fanout import Settings
    from node import Node, NodeOptions
    from tests.apps.control import ControlApp

    settings = Settings.create(f"memory://{unique_namespace('pr')}", max_message=4096)
    node = Node(settings, NodeOptions(port=0, presence="room"), ControlApp())
    await node.start()
    try:
        async with ServerUtil(settings=settings) as util:
            members = [await _member(util, node.port, "room", f"user-{i}-" + "x" * 300) for i in range(20)]
            await _poll(lambda: "cannot be shared" in caplog.text, 5)
            assert "20 flags in presence groups" in caplog.text
            assert caplog.text.count("cannot be shared") == 1  # said once, not every tick
            for ws, _ in members:
                await ws.close()
    finally:
        await node.stop()
