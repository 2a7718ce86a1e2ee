"""The probes of a process that is not a node (a worker, a relay): ``/healthz`` and ``/metrics`` over
plain HTTP/1.1, one request per connection.

``health()`` answers None when the process is healthy (``200 ok``), else the reason (``503`` with it);
``metrics()`` is the Prometheus text exposition.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable


async def serve_probes(
    host: str, port: int, health: Callable[[], str | None], metrics: Callable[[], str]
) -> asyncio.Server:
    """Listen on ``host:port`` and answer ``/healthz`` and ``/metrics`` (404 for anything else)."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), 5)
            while (await asyncio.wait_for(reader.readline(), 5)) not in (b"\r\n", b"\n", b""):
                pass
            path = line.split(b" ")[1].decode() if line.count(b" ") >= 2 else "/"
            if path.startswith("/healthz"):
                reason = health()
                status, kind = (200 if reason is None else 503), "text/plain"
                body = b"ok\n" if reason is None else f"{reason}\n".encode()
            elif path.startswith("/metrics"):
                status, body, kind = 200, metrics().encode(), "text/plain; version=0.0.4"
            else:
                status, body, kind = 404, b"not found\n", "text/plain"
            writer.write(
                b"HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %d\r\nConnection: close\r\n\r\n"
                % (status, b"OK" if status == 200 else b"Error", kind.encode(), len(body))
                + body
            )
            await writer.drain()
        except (TimeoutError, ConnectionError, IndexError, UnicodeDecodeError):
            pass
        finally:
            writer.close()

    return await asyncio.start_server(answer, host, port)


__all__ = ["serve_probes"]
