"""The Python publishers of ``bench/compare.py``: one protocol, three ways to publish.

::

    python bench/compare/publisher.py fanout URL MODE NAMESPACE NODES  # fanout.ServerUtil (project venv)
    python bench/compare/publisher.py socketio REDIS_URL CHANNEL     # socketio.AsyncRedisManager, write-only
    python bench/compare/publisher.py websocket WS_URL               # the plain-websockets baseline

Prints ``{"ready": true, ...}`` once connected, then runs the commands it reads on stdin (JSON lines)::

    {"cmd": "run", "phase": k, "kind": "group" | "all", "count": N, "groups": G, "size": S,
     "interval": seconds between sends (0 = flat out), "concurrency": C}
    -> {"done": k, "sent": N, "seconds": ...}

Send number ``seq`` goes to group ``g<seq % G>`` (or to everyone) with the payload
``"<phase> <seq> <wall-clock ms, 3 decimals> xxx..."`` padded to S bytes. Flat out, C tasks share the
sends, each awaiting its own one by one (what the backend's pipelining buys); paced, one send at a time,
awaited, on a fixed schedule (a late send does not make the next one earlier than its slot).
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol


class Sender(Protocol):
    async def to_group(self, group: str, data: str) -> None: ...

    async def to_all(self, data: str) -> None: ...

    async def close(self) -> None: ...


def payload(phase: int, seq: int, size: int) -> str:
    head = f"{phase} {seq} {time.time() * 1000:.3f} "
    return head + "x" * max(0, size - len(head))


async def run(sender: Sender, cmd: dict[str, Any]) -> float:
    phase, count, groups, size = cmd["phase"], cmd["count"], cmd["groups"], cmd["size"]
    group = cmd["kind"] == "group"

    async def send(seq: int) -> None:
        data = payload(phase, seq, size)
        if group:
            await sender.to_group(f"g{seq % groups}", data)
        else:
            await sender.to_all(data)

    start = time.perf_counter()
    interval = float(cmd["interval"])
    if interval > 0:
        for seq in range(count):
            await send(seq)
            await asyncio.sleep(max(0.0, start + (seq + 1) * interval - time.perf_counter()))
    else:
        concurrency = max(1, min(int(cmd["concurrency"]), count))

        async def worker(first: int) -> None:
            for seq in range(first, count, concurrency):
                await send(seq)

        await asyncio.gather(*(worker(first) for first in range(concurrency)))
    return time.perf_counter() - start


async def serve(sender: Sender, ready: dict[str, Any]) -> None:
    out = sys.stdout
    out.write(json.dumps({"ready": True, **ready}) + "\n")
    out.flush()
    loop = asyncio.get_running_loop()
    try:
        while line := await loop.run_in_executor(None, sys.stdin.readline):
            cmd = json.loads(line)
            if cmd["cmd"] == "quit":
                break
            seconds = await run(sender, cmd)
            out.write(json.dumps({"done": cmd["phase"], "sent": cmd["count"], "seconds": seconds}))
            out.write("\n")
            out.flush()
    finally:
        await sender.close()


async def fanout_sender(url: str, mode: str, namespace: str, want: str) -> tuple[Sender, dict[str, Any]]:
    from fanout import ServerUtil

    util = ServerUtil(url, mode=mode, namespace=namespace)
    await util.connect()
    nodes = await util.check_cluster()  # returns once the first node is heard: wait for the others
    for _ in range(100):
        if nodes >= int(want):
            break
        await asyncio.sleep(0.1)
        nodes = len(await util.get_nodes())

    class FanoutSender:
        async def to_group(self, group: str, data: str) -> None:
            await util.send_to_group(group, data)

        async def to_all(self, data: str) -> None:
            await util.send_to_all(data)

        async def close(self) -> None:
            await util.disconnect()

    return FanoutSender(), {"nodes": nodes}


async def socketio_sender(url: str, channel: str) -> tuple[Sender, dict[str, Any]]:
    import socketio  # type: ignore[import-not-found,unused-ignore]

    manager: Any = socketio.AsyncRedisManager(url, channel=channel, write_only=True)

    class SocketioSender:
        async def to_group(self, group: str, data: str) -> None:
            await manager.emit("m", data, room=group, namespace="/")

        async def to_all(self, data: str) -> None:
            await manager.emit("m", data, namespace="/")

        async def close(self) -> None:
            if manager.connected:
                await manager.redis.aclose()

    return SocketioSender(), {}


async def websocket_sender(url: str) -> tuple[Sender, dict[str, Any]]:
    from websockets.asyncio.client import connect

    ws = await connect(url, compression=None, max_size=None)

    class WebsocketSender:
        async def to_group(self, group: str, data: str) -> None:
            await ws.send(f"{group} {data}")

        async def to_all(self, data: str) -> None:
            await ws.send(f"* {data}")

        async def close(self) -> None:
            await ws.close()

    return WebsocketSender(), {}


def main() -> None:
    kind, *args = sys.argv[1:]
    makers: dict[str, Callable[..., Awaitable[tuple[Sender, dict[str, Any]]]]] = {
        "fanout": fanout_sender,
        "socketio": socketio_sender,
        "websocket": websocket_sender,
    }

    async def start() -> None:
        sender, ready = await makers[kind](*args)
        await serve(sender, ready)

    try:
        import uvloop
    except ImportError:
        asyncio.run(start())
    else:
        uvloop.run(start())


if __name__ == "__main__":
    main()
