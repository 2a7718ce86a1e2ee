"""The python-socketio peer of ``bench/compare.py``: one aiohttp server with ``socketio.AsyncRedisManager``.

::

    bench/compare/.venv-peers/bin/python bench/compare/pysio_server.py PORT REDIS_URL CHANNEL

A client joins the room named by its handshake query (``?group=g7``) and is then told ``ready``
(``always_connect`` so that the connection is accepted before the handler emits). Messages come only from
the write-only publisher through Redis (``CHANNEL``, unique per run). Runs on uvloop, as fanout's nodes do.
Prints ``listening`` once the manager's Redis subscription is in place.
"""

from __future__ import annotations

import asyncio
import signal
import sys
from typing import Any
from urllib.parse import parse_qs

import socketio  # type: ignore[import-not-found,unused-ignore]
import uvloop
from aiohttp import web  # type: ignore[import-not-found,unused-ignore]


async def main(port: int, url: str, channel: str) -> None:
    manager: Any = socketio.AsyncRedisManager(url, channel=channel)
    sio: Any = socketio.AsyncServer(
        async_mode="aiohttp",
        client_manager=manager,
        transports=["websocket"],
        always_connect=True,
        http_compression=False,
        compression_threshold=1 << 30,
    )

    @sio.event  # type: ignore[untyped-decorator,unused-ignore]
    async def connect(sid: str, environ: dict[str, Any], auth: object = None) -> None:
        group = parse_qs(environ.get("QUERY_STRING", "")).get("group", ["none"])[0]
        await sio.enter_room(sid, group)
        await sio.emit("ready", to=sid)

    app = web.Application()
    sio.attach(app)
    # start the manager's listener now instead of at the first connection, and wait for its subscription
    sio.manager_initialized = True
    manager.initialize()
    for _ in range(500):
        if manager.pubsub is not None and manager.pubsub.channels and manager.pubsub.connection is not None:
            break
        await asyncio.sleep(0.02)
    else:
        raise SystemExit("pysio_server: the Redis subscription did not happen within 10 s")
    await asyncio.sleep(0.2)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    print("listening", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await runner.cleanup()


if __name__ == "__main__":
    uvloop.run(main(int(sys.argv[1]), sys.argv[2], sys.argv[3]))
