"""Helpers of the continuity acceptance tests (tests/test_continuity_*.py): node settings with history, a
plain fanout.v1 websocket client that shows every frame, two node processes, a publisher."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from websockets.asyncio.client import ClientConnection, connect

from fanout import ServerUtil, Settings
from tests.support import scaled
from tests.support.nodes import NodeProcess, start_node, unique_namespace

REDIS = "redis://127.0.0.1:6379/0"
AMQP = "amqp://guest:guest@127.0.0.1:5672/"
STREAMS = "tests.apps.streams:app"


def node_env(url: str, **env: str) -> dict[str, str]:
    """A fresh namespace on ``url`` with history for ``group:h-*``; no accept/client rate limits (hundreds
    of clients connect at once)."""
    namespace = unique_namespace("ch")
    if REDIS in (url, env.get("FANOUT_HISTORY_URL")):
        ON_SHARED_REDIS.append(namespace)
    return {
        "FANOUT_URL": url,
        "FANOUT_NAMESPACE": namespace,
        "FANOUT_HISTORY": "group:h-*",
        "FANOUT_ACCEPT_RATE": "0",
        "FANOUT_CLIENT_RATE": "0",
        **env,
    }


def publisher(env: dict[str, str]) -> ServerUtil:
    """A ServerUtil with the nodes' settings (history included: they must agree)."""
    return ServerUtil(settings=Settings.from_env(env))


@dataclass
class V1:
    """A plain ``websockets`` client speaking fanout.v1, frame by frame (no library bookkeeping in between:
    what the node sends is what the test sees)."""

    ws: ClientConnection
    welcome: dict[str, Any]
    #: stream -> [epoch, last offset received] (from the welcome, ``joined`` and every message)
    positions: dict[str, list[Any]] = field(default_factory=dict)

    @classmethod
    async def open(cls, port: int, query: str = "") -> V1:
        ws = await connect(f"ws://127.0.0.1:{port}/?{query}", subprotocols=["fanout.v1"])  # type: ignore[list-item]
        assert ws.subprotocol == "fanout.v1"
        welcome = orjson.loads(await asyncio.wait_for(ws.recv(), scaled(10)))
        assert welcome["type"] == "welcome" and welcome["resume"], welcome
        client = cls(ws, welcome)
        for stream, at in welcome["streams"].items():
            client.positions[stream] = [at["epoch"], at["offset"]]
        return client

    @property
    def client_id(self) -> str:
        return str(self.welcome["client_id"])

    @property
    def token(self) -> str:
        return str(self.welcome["resume"])

    async def frame(self, timeout: float = 10.0) -> dict[str, Any]:
        value = orjson.loads(await asyncio.wait_for(self.ws.recv(), scaled(timeout)))
        assert isinstance(value, dict), value
        if value["type"] == "joined":
            self.positions[value["stream"]] = [value["epoch"], value["offset"]]
        for stream, offset in (value.get("streams") or {}).items() if value["type"] == "message" else ():
            self.positions[stream][1] = offset
        return value

    async def nothing_more(self, wait: float = 0.5) -> None:
        with contextlib.suppress(TimeoutError):
            frame = await asyncio.wait_for(self.ws.recv(), wait)
            raise AssertionError(f"unexpected frame {frame!r}")

    async def resume(self, token: str, positions: dict[str, list[Any]]) -> None:
        streams = {s: {"epoch": epoch, "offset": offset} for s, (epoch, offset) in positions.items()}
        self.positions.update({s: list(p) for s, p in positions.items()})
        await self.ws.send(orjson.dumps({"type": "resume", "token": token, "streams": streams}).decode())

    def snapshot(self) -> tuple[str, dict[str, list[Any]]]:
        """What a client keeps for its resume: the token and the positions received so far."""
        return self.token, {s: list(p) for s, p in self.positions.items()}

    async def until_resumed(self) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """The frames before ``resumed`` (the replay), and ``resumed``."""
        frames = []
        while (frame := await self.frame())["type"] != "resumed":
            frames.append(frame)
        return frames, frame

    def abort(self) -> None:
        """The network drops: no close frame either way."""
        self.ws.transport.abort()


def two_nodes(tmp_path: Path, env: dict[str, str], app: str = STREAMS) -> tuple[NodeProcess, NodeProcess]:
    """``node-a`` and ``node-b`` (the admission-by-query app unless ``app``)."""
    a = start_node(tmp_path, {**env, "FANOUT_NODE_ID": "node-a"}, app=app)
    b = start_node(tmp_path, {**env, "FANOUT_NODE_ID": "node-b"}, app=app)
    return a, b


@contextlib.asynccontextmanager
async def util_of(env: dict[str, str]) -> AsyncIterator[ServerUtil]:
    async with publisher(env) as util:
        yield util


#: the namespaces node_env gave on the shared Redis (``forgetting`` deletes their keys after the test)
ON_SHARED_REDIS: list[str] = []


def forgetting() -> Iterator[None]:
    """For an autouse fixture: after the test, what its namespaces left in the shared Redis goes (epochs
    and offsets would stay two days)."""
    before = len(ON_SHARED_REDIS)
    yield
    import redis

    client = redis.Redis.from_url(REDIS)
    try:
        while len(ON_SHARED_REDIS) > before:
            keys = list(client.scan_iter(match=f"*{ON_SHARED_REDIS.pop()}*", count=1000))
            if keys:
                client.delete(*keys)
    finally:
        client.close()


async def until(check: Any, timeout: float, what: str, every: float = 0.1) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + scaled(timeout)
    while not check():
        assert loop.time() < deadline, f"timed out after {timeout}s waiting for {what}"
        await asyncio.sleep(every)


async def until_gone(util: ServerUtil, client_id: str) -> None:
    """Until the old connection's node has seen it go (its record then has the resume TTL)."""
    for _ in range(100):
        if not await util.exists(client_id):
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{client_id} still exists")
