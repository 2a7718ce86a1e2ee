"""The Redis backend's publishing connection: RESP2 PUBLISH commands in one write, their replies in one read.

Through redis-py's pipeline a PUBLISH costs a pool checkout, tasks and a parser object per reply: most of
a publisher's CPU (about 150 µs of it per awaited publish, 45 µs with many concurrent callers). A
publishing connection only ever needs ``PUBLISH channel message`` and its integer reply, so this one
encodes the commands itself, writes a batch in one ``transport.write`` and parses the integer replies of
a whole read at once. It is used for plain ``redis://`` servers; TLS and Redis Cluster keep redis-py
(their options and slot maps are redis-py's business). The history store also sends its scripts on one
(:mod:`fanout.backends.store_redis`): on a plain server, and on a plain cluster one per master, routed by
redis-py's slot map.

Errors are redis-py's classes, so the backend's one translation table applies unchanged: a refused
``AUTH`` is ``AuthenticationError``, an ACL refusal ``NoPermissionError``, another error reply
``ResponseError``, a lost connection ``ConnectionError``.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Sequence
from urllib.parse import unquote

from redis.exceptions import AuthenticationError, NoPermissionError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError

from .base import nodelay

_PUBLISH = b"*3\r\n$7\r\nPUBLISH\r\n$"


def pack(*parts: bytes) -> bytes:
    """One RESP2 command (an array of bulk strings)."""
    out = [b"*%d\r\n" % len(parts)]
    for part in parts:
        out.append(b"$%d\r\n%s\r\n" % (len(part), part))
    return b"".join(out)


def pack_publish(channel: bytes, message: bytes) -> bytes:
    return b"%s%d\r\n%s\r\n$%d\r\n%s\r\n" % (_PUBLISH, len(channel), channel, len(message), message)


def setup_commands(userinfo: str, client_name: str) -> list[tuple[bytes, ...]]:
    """What a connection sends first: ``AUTH`` with the URL's ``user:password@`` (or ``:password@``, or
    ``password@`` alone), then ``CLIENT SETNAME``."""
    commands: list[tuple[bytes, ...]] = []
    user, _, password = userinfo.rstrip("@").partition(":")
    if password:
        credentials = (unquote(user).encode(),) if user else ()
        commands.append((b"AUTH", *credentials, unquote(password).encode()))
    elif user:  # redis://password@host is how some write a password alone
        commands.append((b"AUTH", unquote(user).encode()))
    commands.append((b"CLIENT", b"SETNAME", client_name.encode()))
    return commands


def error_reply(text: str) -> Exception:
    code = text.split(" ", 1)[0]
    if code in ("WRONGPASS", "NOAUTH") or text.startswith("ERR invalid password"):
        return AuthenticationError(text)
    if code == "NOPERM":
        return NoPermissionError(text)
    return ResponseError(text)


def parse_reply(buffer: bytes, start: int, end: int) -> tuple[object, int] | None:
    """The reply at ``start`` and where the next one starts, or None when it has not fully arrived. An
    error (nested in an array too) is a value. Raises ValueError on what is not RESP2."""
    line_end = buffer.find(b"\r\n", start)
    if line_end < 0:
        return None
    kind = buffer[start]
    if kind == 0x24:  # '$' bulk string
        size = int(buffer[start + 1 : line_end])
        if size < 0:
            return None, line_end + 2
        stop = line_end + 2 + size
        if stop + 2 > end:
            return None
        return buffer[line_end + 2 : stop], stop + 2
    if kind == 0x3A:  # ':' integer
        return int(buffer[start + 1 : line_end]), line_end + 2
    if kind == 0x2B:  # '+' simple string
        return buffer[start + 1 : line_end], line_end + 2
    if kind == 0x2D:  # '-' error
        return error_reply(buffer[start + 1 : line_end].decode(errors="replace")), line_end + 2
    if kind == 0x2A:  # '*' array
        count = int(buffer[start + 1 : line_end])
        if count < 0:
            return None, line_end + 2
        items: list[object] = []
        position = line_end + 2
        for _ in range(count):
            if position >= end:
                return None
            parsed = parse_reply(buffer, position, end)
            if parsed is None:
                return None
            item, position = parsed
            items.append(item)
        return items, position
    raise ValueError(f"unexpected reply from Redis: {buffer[start:line_end]!r}")


class PublishConnection(asyncio.Protocol):
    """One connection to one Redis server that sends commands and hands back their replies, in order.

    Replies are RESP2's: integers, simple strings, errors, bulk strings and (nested) arrays, as lists.
    """

    def __init__(self) -> None:
        self._transport: asyncio.Transport | None = None
        self._waiting: deque[asyncio.Future[object]] = deque()
        self._buffer = b""
        self._lost: Exception | None = None
        #: commands of :meth:`send_soon` not written yet (their futures already wait, in order)
        self._queued: list[bytes] = []

    # -- opening ---------------------------------------------------------------------------

    @classmethod
    async def open(
        cls, host: str, port: int, *, userinfo: str, client_name: str, timeout: float
    ) -> PublishConnection:
        """Connect, authenticate (``user:password@`` of the URL, or ``:password@``) and name the client.

        Raises redis-py's ``ConnectionError`` / ``AuthenticationError`` / ``ResponseError``, or
        ``TimeoutError`` after ``timeout`` seconds.
        """
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(timeout):
            try:
                _, connection = await loop.create_connection(cls, host, port)
            except OSError as exc:
                raise RedisConnectionError(f"Error connecting to {host}:{port}: {exc}") from exc
            setup = [pack(*parts) for parts in setup_commands(userinfo, client_name)]
            try:
                for reply in await asyncio.gather(*connection.send(setup)):
                    if isinstance(reply, Exception):
                        raise reply
            except BaseException:
                connection.close()
                raise
        return connection

    # -- asyncio.Protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = nodelay(transport)

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer + data if self._buffer else data
        waiting = self._waiting
        start, end = 0, len(buffer)
        while start < end:
            line_end = buffer.find(b"\r\n", start)
            if line_end < 0:
                break
            kind = buffer[start]
            if kind == 0x3A:  # ':' integer
                reply: object = int(buffer[start + 1 : line_end])
                start = line_end + 2
            elif kind == 0x2B:  # '+' simple string
                reply = buffer[start + 1 : line_end]
                start = line_end + 2
            elif kind == 0x2D:  # '-' error
                reply = error_reply(buffer[start + 1 : line_end].decode(errors="replace"))
                start = line_end + 2
            elif kind == 0x24:  # '$' bulk string
                size = int(buffer[start + 1 : line_end])
                if size < 0:
                    reply, start = None, line_end + 2
                elif line_end + 2 + size + 2 > end:
                    break  # the rest has not arrived yet
                else:
                    reply = buffer[line_end + 2 : line_end + 2 + size]
                    start = line_end + 2 + size + 2
            elif kind == 0x2A:  # '*' array (a script's table, a read): its elements may come later
                try:
                    parsed = parse_reply(buffer, start, end)
                except ValueError as exc:
                    self._fail(RedisConnectionError(str(exc)))
                    return
                if parsed is None:
                    break
                reply, start = parsed
            else:
                self._fail(RedisConnectionError(f"unexpected reply from Redis: {buffer[start:line_end]!r}"))
                return
            if not waiting:
                self._fail(RedisConnectionError("Redis replied to a command that was not sent"))
                return
            future = waiting.popleft()
            if not future.done():
                future.set_result(reply)
        self._buffer = buffer[start:] if start < end else b""

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(RedisConnectionError(f"connection to Redis lost{f': {exc}' if exc else ''}"))

    # -- use -------------------------------------------------------------------------------

    @property
    def alive(self) -> bool:
        return self._lost is None and self._transport is not None and not self._transport.is_closing()

    def send(self, commands: Sequence[bytes]) -> list[asyncio.Future[object]]:
        """Write ``commands`` (packed) in one go; a future per command gets its reply (an error reply
        as an exception *value*, a lost connection as the future's exception)."""
        loop = asyncio.get_running_loop()
        futures: list[asyncio.Future[object]] = [loop.create_future() for _ in commands]
        if self._lost is not None or self._transport is None:
            error = self._lost or RedisConnectionError("not connected to Redis")
            for future in futures:
                future.set_exception(error)
            return futures
        self._waiting.extend(futures)
        if self._queued:  # what send_soon queued goes first: replies come in the order written
            self._queued.extend(commands)
            self._write_queued()
        else:
            self._transport.write(b"".join(commands) if len(commands) > 1 else commands[0])
        return futures

    def send_soon(self, command: bytes) -> asyncio.Future[object]:
        """Like :meth:`send` for one command; while replies are awaited, written together with every other
        command queued in this turn of the event loop (one write, one system call, for many concurrent
        callers)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[object] = loop.create_future()
        if self._lost is not None or self._transport is None:
            future.set_exception(self._lost or RedisConnectionError("not connected to Redis"))
            return future
        if not self._waiting:  # nothing on the wire: no batch to join, write it now
            self._waiting.append(future)
            self._transport.write(command)
            return future
        self._waiting.append(future)
        if not self._queued:
            loop.call_soon(self._write_queued)
        self._queued.append(command)
        return future

    def _write_queued(self) -> None:
        queued, self._queued = self._queued, []
        if queued and self._lost is None and self._transport is not None:
            self._transport.write(b"".join(queued))

    def close(self) -> None:
        self._fail(RedisConnectionError("the publishing connection was closed"))

    def _fail(self, error: Exception) -> None:
        if self._lost is None:
            self._lost = error
        if self._transport is not None:
            self._transport.close()
        self._queued = []
        waiting, self._waiting = self._waiting, deque()
        for future in waiting:
            if not future.done():
                future.set_exception(self._lost)
