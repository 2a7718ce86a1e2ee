"""The plain-websockets baseline of ``bench/compare.py``: one process, no broker, it broadcasts itself.

::

    python bench/compare/baseline_server.py PORT

Clients connect to ``/?group=g7`` and get a ``ready`` frame once registered. The publisher holds one
websocket on ``/publish`` and sends ``"<group> <payload>"`` (``*`` for everyone); the server hands the
payload to ``websockets.broadcast`` for that group's connections (one frame encoding, written to each).
What it shows is the cost of delivery alone, with no broker hop and no second process. Runs on uvloop.
"""

from __future__ import annotations

import asyncio
import signal
import sys
from collections import defaultdict
from urllib.parse import parse_qs, urlsplit

import uvloop
from websockets.asyncio.server import ServerConnection, broadcast, serve

groups: defaultdict[str, set[ServerConnection]] = defaultdict(set)
everyone: set[ServerConnection] = set()


async def handler(ws: ServerConnection) -> None:
    assert ws.request is not None
    target = urlsplit(ws.request.path)
    if target.path == "/publish":
        async for message in ws:
            name, _, data = str(message).partition(" ")
            broadcast(everyone if name == "*" else groups.get(name, ()), data)
        return
    group = parse_qs(target.query).get("group", ["none"])[0]
    groups[group].add(ws)
    everyone.add(ws)
    try:
        await ws.send("ready")
        await ws.wait_closed()
    finally:
        groups[group].discard(ws)
        everyone.discard(ws)


async def main(port: int) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with serve(handler, "127.0.0.1", port, compression=None, max_size=None):
        print("listening", flush=True)
        await stop.wait()


if __name__ == "__main__":
    uvloop.run(main(int(sys.argv[1])))
