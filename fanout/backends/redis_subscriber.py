"""The Redis backend's pub/sub connections: what a node reads the bus through.

A node reads every command it applies from one of these, so their cost per frame is a cost per command.
Through redis-py's ``Connection.read_response`` each frame costs a coroutine chain, a ``readline`` per
line and a parser object: 11-21 µs per pub/sub message on the benchmark machines (``bench/bus_read.py``),
about a quarter of a saturated node's CPU. :class:`SubscribeConnection` is an ``asyncio.Protocol`` that
parses every frame of a read in one pass (the common ``message``/``smessage`` array without building
anything but its three items) and hands them out in order: 1.3-3 µs per message. It is used for plain
``redis://`` servers and cluster shards; TLS keeps redis-py's connection (its certificates and options are
redis-py's business), behind the same small interface (:class:`RedisPyPubSub`).

Both raise what redis-py raises, so the backend's translation applies unchanged: an error reply is a
``ResponseError`` (``AuthenticationError`` for a refused ``AUTH``), a lost link a ``ConnectionError``.
"""

from __future__ import annotations

import asyncio
import math
from collections import deque
from typing import Any, Protocol

from redis.asyncio.connection import AbstractConnection
from redis.exceptions import ConnectionError as RedisConnectionError

from .base import nodelay
from .redis_publisher import pack, parse_reply, setup_commands

_MESSAGE = b"*3\r\n$7\r\nmessage\r\n$"
_SMESSAGE = b"*3\r\n$8\r\nsmessage\r\n$"
#: frames parsed and not yet read at which the socket stops being read (Redis then buffers, up to its
#: ``client-output-buffer-limit pubsub``), and at which it is read again
PAUSE_AT, RESUME_AT = 50_000, 10_000


class PubSubConnection(Protocol):
    """A pub/sub connection as a link (:class:`fanout.backends.redis._Link`) uses it."""

    @property
    def is_connected(self) -> bool: ...

    async def connect(self) -> None:
        """Connect and authenticate; raises ``ConnectionError``, ``AuthenticationError``, ``TimeoutError``."""

    async def send(self, *parts: bytes) -> None:
        """Write one command now (before any suspension); raises ``ConnectionError`` if the link is down."""

    async def read(self) -> Any:
        """The next frame; an error reply raised as ``ResponseError``, a lost link as ``ConnectionError``."""

    async def disconnect(self) -> None: ...


class RedisPyPubSub:
    """:class:`PubSubConnection` over a redis-py ``Connection`` (TLS)."""

    def __init__(self, conn: AbstractConnection) -> None:
        self.conn = conn

    @property
    def is_connected(self) -> bool:
        return bool(self.conn.is_connected)

    async def connect(self) -> None:
        await self.conn.connect()  # type: ignore[no-untyped-call]

    async def send(self, *parts: bytes) -> None:
        await self.conn.send_packed_command(self.conn.pack_command(*parts), check_health=False)

    async def read(self) -> Any:
        return await self.conn.read_response(timeout=math.inf)

    async def disconnect(self) -> None:
        await self.conn.disconnect(nowait=True)


class SubscribeConnection(asyncio.Protocol):
    """:class:`PubSubConnection` of its own: see the module docstring."""

    def __init__(self, host: str, port: int, *, userinfo: str, client_name: str) -> None:
        self.host, self.port = host, port
        self._userinfo = userinfo
        self._client_name = client_name
        self._transport: asyncio.Transport | None = None
        #: bytes received and not parsed yet (a frame's start), their length, and how many must have come
        #: before parsing again (a long message arrives over many reads: joined once, when it is whole)
        self._parts: list[bytes] = []
        self._have = 0
        self._wanted = 0
        #: frames parsed, not read yet (an error reply as an exception value)
        self._frames: deque[Any] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._lost: Exception | None = None
        self._paused = False

    # -- PubSubConnection ------------------------------------------------------------------

    @property
    def is_connected(self) -> bool:
        return self._lost is None and self._transport is not None and not self._transport.is_closing()

    async def connect(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            await loop.create_connection(lambda: self, self.host, self.port)
        except OSError as exc:
            raise RedisConnectionError(f"Error connecting to {self.host}:{self.port}: {exc}") from exc
        setup = setup_commands(self._userinfo, self._client_name)
        for parts in setup:
            await self.send(*parts)
        for _ in setup:
            await self.read()  # an error reply (a refused AUTH) raises

    async def send(self, *parts: bytes) -> None:
        if not self.is_connected:
            raise self._lost or RedisConnectionError(
                f"pub/sub connection to {self.host}:{self.port} is closed"
            )
        assert self._transport is not None
        self._transport.write(pack(*parts))

    async def read(self) -> Any:
        frames = self._frames
        while not frames:
            if self._lost is not None:
                raise self._lost
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        frame = frames.popleft()
        if self._paused and len(frames) <= RESUME_AT and self._transport is not None:
            self._paused = False
            self._transport.resume_reading()
        if isinstance(frame, Exception):
            raise frame
        return frame

    async def disconnect(self) -> None:
        self._fail(RedisConnectionError(f"pub/sub connection to {self.host}:{self.port} closed"))

    # -- asyncio.Protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = nodelay(transport)

    def data_received(self, data: bytes) -> None:
        parts = self._parts
        parts.append(data)
        self._have += len(data)
        if self._have < self._wanted:
            return
        buffer = parts[0] if len(parts) == 1 else b"".join(parts)
        try:
            start, wanted = self._parse(buffer)
        except ValueError as exc:
            self._fail(RedisConnectionError(f"unexpected frame from Redis: {exc}"))
            return
        rest = buffer[start:] if start < len(buffer) else b""
        self._parts = [rest] if rest else []
        self._have, self._wanted = len(rest), wanted
        frames = self._frames
        if frames:
            self._wake()
            if not self._paused and len(frames) >= PAUSE_AT and self._transport is not None:
                self._paused = True
                self._transport.pause_reading()

    def _parse(self, buffer: bytes) -> tuple[int, int]:
        """Every whole frame of ``buffer`` into ``_frames``; where the rest starts, and how long the
        frame it starts with is when that is known (else 0). Raises ValueError on what is not RESP2."""
        frames = self._frames
        start, end = 0, len(buffer)
        while start < end:
            if buffer.startswith(_MESSAGE, start) or buffer.startswith(_SMESSAGE, start):
                # [kind, channel, payload]: the frame nearly every read holds, cut out without a parser
                sharded = buffer[start + 8] == 0x73  # "smessage"
                head = start + (len(_SMESSAGE) if sharded else len(_MESSAGE))  # the channel's length
                line_end = buffer.find(b"\r\n", head)
                if line_end < 0:
                    break
                channel_end = line_end + 2 + int(buffer[head:line_end])
                size_end = buffer.find(b"\r\n", channel_end + 3)  # after the channel's "\r\n$"
                if size_end < 0:
                    break
                payload_end = size_end + 2 + int(buffer[channel_end + 3 : size_end])
                if payload_end + 2 > end:
                    return start, payload_end + 2 - start
                kind = b"smessage" if sharded else b"message"
                frames.append([kind, buffer[line_end + 2 : channel_end], buffer[size_end + 2 : payload_end]])
                start = payload_end + 2
                continue
            parsed = parse_reply(buffer, start, end)
            if parsed is None:
                break
            frame, start = parsed
            frames.append(frame)
        return start, 0

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(RedisConnectionError(f"connection to Redis lost{f': {exc}' if exc else ''}"))

    def _fail(self, error: Exception) -> None:
        if self._lost is None:
            self._lost = error
        if self._transport is not None:
            self._transport.close()
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


__all__ = ["PubSubConnection", "RedisPyPubSub", "SubscribeConnection"]
