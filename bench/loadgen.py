"""A load-generator process for bench/continuity.py: websocket clients driven over stdin/stdout.

The parent writes one JSON command per line on stdin and reads one JSON answer per line on stdout, one
command at a time. Clients come in named sets:

* ``receivers``: plain ``websockets`` connections (as ``bench.py delivery``'s clients), raw or asking for
  ``fanout.v1``, each in one group; they count the frames they get and the latency from the timestamp the
  payload starts with (CLOCK_MONOTONIC is shared by processes). ``wait`` answers once every connection
  has its expected count.
* ``clients``: :class:`fanout.client.Client` objects (``recover`` true: ``fanout.v1`` with resume; false:
  raw clients that reconnect), each in one group, each recording the ``n`` of every ``{"g", "n"}`` it is
  handed. ``status`` tells how many are connected and how many came back after their first connection
  ended (v1: ``resumed`` handed over; raw: welcomed again); ``tally`` waits for the last send of each
  group and counts what each client lost and got twice.

Run by the parent as ``python bench/loadgen.py``; uvloop when installed.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import orjson  # noqa: E402
from websockets.asyncio.client import ClientConnection, connect  # noqa: E402
from websockets.exceptions import ConnectionClosed  # noqa: E402
from websockets.typing import Subprotocol  # noqa: E402

from fanout.client import Client, Resumed  # noqa: E402

V1 = Subprotocol("fanout.v1")
#: connections opened at once
OPEN_BATCH = 200


@dataclass
class Receivers:
    """Connections that count frames (see the module docstring)."""

    v1: bool
    groups: list[str] = field(default_factory=list)
    sockets: list[ClientConnection] = field(default_factory=list)
    counts: list[int] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    bad: int = 0  #: frames that were not what was sent (an envelope without the payload...)
    total: int = 0
    target: int = 1 << 62
    reached_at: float = 0.0  #: when the total reached the target (CLOCK_MONOTONIC)
    last_at: float = 0.0  #: when the last frame came
    reached: asyncio.Event = field(default_factory=asyncio.Event)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    async def read(self, index: int, ws: ClientConnection) -> None:
        counts, latencies, v1 = self.counts, self.latencies, self.v1
        with contextlib.suppress(ConnectionClosed):
            async for frame in ws:
                now = time.monotonic()
                if v1:
                    envelope = orjson.loads(frame)
                    data = envelope.get("data") if envelope.get("type") == "message" else None
                    if not isinstance(data, str):
                        self.bad += 1
                        continue
                    stamp = data[:20]
                else:
                    stamp = frame[:20]
                try:
                    latencies.append(now - float(stamp))
                except ValueError:
                    self.bad += 1
                    continue
                counts[index] += 1
                self.total += 1
                self.last_at = now
                if self.total >= self.target and not self.reached.is_set():
                    self.reached_at = now
                    self.reached.set()


@dataclass
class Tracked:
    """One :class:`Client` and what it was handed."""

    client: Client
    group: str
    recover: bool
    got: list[int] = field(default_factory=list)
    first_id: str | None = None  #: the client id of its first connection
    back_at: float | None = None  #: when it came back after its first connection ended
    recovered: bool | None = None
    task: asyncio.Task[None] | None = None


class LoadGen:
    def __init__(self) -> None:
        self.receivers: dict[str, Receivers] = {}
        self.clients: dict[str, list[Tracked]] = {}
        self._monitor: asyncio.Task[None] | None = None

    # -- receivers ----------------------------------------------------------------------------

    async def op_receivers(self, name: str, v1: bool, conns: list[list[str]]) -> dict[str, Any]:
        rs = self.receivers[name] = Receivers(v1)

        async def open_one(url: str) -> ClientConnection:
            ws = await connect(url, max_size=None, subprotocols=[V1] if v1 else None)
            assert (ws.subprotocol == V1) == v1, ws.subprotocol
            welcome = orjson.loads(await ws.recv())
            assert welcome["type"] == "welcome", welcome
            return ws

        for start in range(0, len(conns), OPEN_BATCH):
            batch = conns[start : start + OPEN_BATCH]
            rs.sockets += await asyncio.gather(*(open_one(url) for url, _ in batch))
            rs.groups += [group for _, group in batch]
        rs.counts = [0] * len(rs.sockets)
        rs.tasks = [asyncio.create_task(rs.read(i, ws)) for i, ws in enumerate(rs.sockets)]
        return {"opened": len(rs.sockets)}

    async def op_wait(
        self, name: str, expect: dict[str, int], timeout: float, latencies: bool = True
    ) -> dict[str, Any]:
        """Until every connection has ``expect[its group]`` frames (cumulative), or ``timeout``."""
        rs = self.receivers[name]
        rs.target = sum(expect.get(g, 0) for g in rs.groups)
        rs.reached_at = rs.last_at  # when it is there already (asked after another set's wait)
        if rs.total < rs.target:
            rs.reached.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(rs.reached.wait(), timeout)
        await asyncio.sleep(0.05)  # anything beyond the expected count (a duplicate) shows now
        short = sum(max(0, expect.get(g, 0) - c) for g, c in zip(rs.groups, rs.counts, strict=True))
        extra = sum(max(0, c - expect.get(g, 0)) for g, c in zip(rs.groups, rs.counts, strict=True))
        measured = rs.latencies[:] if latencies else []
        rs.latencies.clear()
        return {
            "short": short,
            "extra": extra,
            "bad": rs.bad,
            "latencies": measured,
            "reached_at": rs.reached_at,
        }

    # -- clients --------------------------------------------------------------------------------

    async def op_clients(
        self, name: str, recover: bool, clients: list[list[Any]], backoff: list[float]
    ) -> dict[str, Any]:
        tracked: list[Tracked] = []
        self.clients[name] = tracked
        for urls, group in clients:
            entry = Tracked(Client(urls, recover=recover, backoff=(backoff[0], backoff[1])), group, recover)
            entry.client.on_resumed = self._on_resumed(entry)
            tracked.append(entry)
        for start in range(0, len(tracked), OPEN_BATCH):
            batch = tracked[start : start + OPEN_BATCH]
            await asyncio.gather(*(t.client.connect() for t in batch))
            if not recover:  # raw: connect() returns at the open; the welcome names the client
                while any(t.client.client_id is None for t in batch):  # noqa: ASYNC110
                    await asyncio.sleep(0.01)
            for t in batch:
                t.first_id = t.client.client_id
                t.task = asyncio.create_task(self._consume(t))
        if self._monitor is None:
            self._monitor = asyncio.create_task(self._watch())
        return {"opened": len(tracked), "nodes": sorted({t.client.node_id for t in tracked})}

    @staticmethod
    def _on_resumed(entry: Tracked) -> Any:
        def resumed(info: Resumed) -> None:
            if entry.back_at is None:
                entry.back_at = time.monotonic()
                entry.recovered = info.recovered

        return resumed

    @staticmethod
    async def _consume(entry: Tracked) -> None:
        got = entry.got
        async for message in entry.client:
            if isinstance(message, dict) and "n" in message:
                got.append(message["n"])

    async def _watch(self) -> None:
        """Raw clients have no ``resumed``: one is back once welcomed on its next connection (checked every
        10 ms)."""
        while True:
            await asyncio.sleep(0.01)
            now = time.monotonic()
            pending = [t for ts in self.clients.values() for t in ts if t.back_at is None and not t.recover]
            for t in pending:
                c = t.client
                if c.connections >= 2 and c.client_id is not None and c.client_id != t.first_id:
                    t.back_at = now
            if not pending:
                await asyncio.sleep(0.1)

    async def op_status(self, name: str) -> dict[str, Any]:
        tracked = self.clients[name]
        back = [t.back_at for t in tracked if t.back_at is not None]
        return {
            "clients": len(tracked),
            "open": sum(1 for t in tracked if t.client.state == "open"),
            "back": len(back),
            "back_at": back if len(back) == len(tracked) else [],
            "not_recovered": sum(1 for t in tracked if t.recovered is False),
            "nodes": sorted({t.client.node_id for t in tracked if t.client.node_id}),
        }

    async def op_tally(self, name: str, last: dict[str, int], timeout: float) -> dict[str, Any]:
        """Wait until each client got its group's last ``n`` (or ``timeout``), then count per client what it
        lost (an ``n`` it never got), got twice, and got out of order."""
        tracked = self.clients[name]
        deadline = time.monotonic() + timeout
        while (  # noqa: ASYNC110
            time.monotonic() < deadline
            and any(last[t.group] not in t.got[-3:] for t in tracked if t.group in last)
        ):
            await asyncio.sleep(0.05)
        lost = dup = disorder = missing_clients = 0
        per_client: list[int] = []
        for t in tracked:
            want = last.get(t.group, -1) + 1
            seen = set(t.got)
            missed = sum(1 for n in range(want) if n not in seen)
            lost += missed
            per_client.append(missed)
            missing_clients += missed > 0
            dup += len(t.got) - len(seen)
            disorder += sum(1 for a, b in zip(t.got, t.got[1:], strict=False) if b < a)
        again = [t.client for t in tracked if t.client.connections > 2]
        codes: dict[str, int] = {}
        for c in again:
            key = f"{c.close_code} {c.close_reason}".strip()[:60]
            codes[key] = codes.get(key, 0) + 1
        return {
            "again": len(again),
            "again_codes": codes,
            "lost": lost,
            "duplicated": dup,
            "out_of_order": disorder,
            "clients_missing": missing_clients,
            "client_duplicates": sum(t.client.duplicates for t in tracked),
            "received": sum(len(t.got) for t in tracked),
            "missed_median": statistics.median(per_client) if per_client else 0,
            "missed_max": max(per_client, default=0),
        }

    # -- both -----------------------------------------------------------------------------------

    async def op_close(self, name: str) -> dict[str, Any]:
        if name in self.receivers:
            rs = self.receivers.pop(name)
            for ws in rs.sockets:
                ws.transport.abort()
            for task in rs.tasks:
                task.cancel()
        if name in self.clients:
            tracked = self.clients.pop(name)
            for start in range(0, len(tracked), OPEN_BATCH):
                await asyncio.gather(*(t.client.close() for t in tracked[start : start + OPEN_BATCH]))
        return {}

    async def op_cpu(self) -> dict[str, Any]:
        return {"cpu": time.process_time(), "rss_kib": _rss_kib()}


def _rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


async def serve() -> None:
    gen = LoadGen()
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1 << 26)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    out = os.fdopen(sys.stdout.fileno(), "wb", buffering=0)
    while line := await reader.readline():
        command = orjson.loads(line)
        op = command.pop("op")
        if op == "exit":
            break
        try:
            answer = await getattr(gen, f"op_{op}")(**command)
        except Exception as exc:  # the parent shows it and stops
            answer = {"error": f"{type(exc).__name__}: {exc}"}
        out.write(orjson.dumps(answer) + b"\n")
    for name in [*gen.receivers, *gen.clients]:
        await gen.op_close(name)


def main() -> None:
    try:
        import uvloop
    except ImportError:
        asyncio.run(serve())
    else:
        uvloop.run(serve())


if __name__ == "__main__":
    main()
