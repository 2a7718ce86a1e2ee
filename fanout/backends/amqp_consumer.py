"""The AMQP backend's consuming connection: what a node reads the bus through on RabbitMQ.

A node reads every command it applies from its queue, so the cost of a delivery is a cost per command.
Through aiormq a delivery is three frames unmarshalled by pamqp, handed from the connection's reader task
to the channel's through a queue, assembled under a lock and given to the consumer in a task of its own:
40-60 µs of CPU per message on the benchmark machines (``bench/bus_read.py --amqp``), ten times what the
rest of a node's work on a command costs. :class:`ConsumeConnection` is an ``asyncio.Protocol`` that does
only what consuming needs - the handshake (PLAIN), one channel, the endpoint's exclusive queue, its
bindings and its ``no_ack`` consumer, heartbeats - and cuts the body of every delivery out of what one read
brought, handing each to the handler in broker order before the next read. Publishing and the exchanges
stay on the aiormq connection (:mod:`fanout.backends.amqp`), which the link opens first.

A business worker reads its shard queues the same way (:mod:`fanout.backends.amqp_events`), one connection
per shard it owns: consumed with acknowledgements and a prefetch bound (:meth:`ConsumeConnection.open_shard`),
each delivery's tag and redelivered flag read with its body, acknowledgements written as raw frames.

What the broker refuses (a connection or channel closed with a reply code: a bind to a missing exchange,
an exclusive queue still held by a connection the broker has not seen die) raises :class:`Refused` and
ends the connection - as a closed channel ends an aiormq link; a lost link raises ``ConnectionError`` to
whoever waits for an answer and calls ``on_lost`` (unless :meth:`ConsumeConnection.close` was called).
"""

from __future__ import annotations

import asyncio
import logging
import struct
from collections.abc import Callable

from yarl import URL

from .base import nodelay

log = logging.getLogger("fanout.backend.amqp")

_PROTOCOL_HEADER = b"AMQP\x00\x00\x09\x01"
FRAME = struct.Struct(">BHI")  #: an AMQP frame's head: type, channel, payload size (amqp.py's publishes too)
_METHOD_ID = struct.Struct(">I")  #: class id << 16 | method id
_BODY_SIZE = struct.Struct(">Q")  #: a content header's body size, after its class id and weight
_DELIVERY_TAG = struct.Struct(">QB")  #: basic.deliver's tag and redelivered bit (after the consumer tag)
_FRAME_END = 0xCE
_METHOD, _HEADER, _BODY, _HEARTBEAT = 1, 2, 3, 8
_HEARTBEAT_FRAME = b"\x08\x00\x00\x00\x00\x00\x00\xce"
CHANNEL = 1  #: the one channel this connection opens


def _id(class_id: int, method_id: int) -> int:
    return class_id << 16 | method_id


START, START_OK, TUNE, TUNE_OK, OPEN, OPEN_OK = (_id(10, m) for m in (10, 11, 30, 31, 40, 41))
CLOSE, CLOSE_OK, BLOCKED, UNBLOCKED = (_id(10, m) for m in (50, 51, 60, 61))
CHANNEL_OPEN, CHANNEL_OPEN_OK, CHANNEL_CLOSE, CHANNEL_CLOSE_OK = (_id(20, m) for m in (10, 11, 40, 41))
DECLARE, DECLARE_OK, BIND, BIND_OK, UNBIND, UNBIND_OK = (_id(50, m) for m in (10, 11, 20, 21, 50, 51))
QOS, QOS_OK, CONSUME, CONSUME_OK, CANCEL, DELIVER, ACK = (_id(60, m) for m in (10, 11, 20, 21, 30, 60, 80))
#: grace before a silent broker is taken as gone: aiormq's ((heartbeat + 1) * 3 seconds)
HEARTBEAT_GRACE = 3


class Refused(Exception):
    """The broker closed the connection or the channel: its reply code and text."""

    def __init__(self, code: int, text: str, what: str) -> None:
        super().__init__(f"{what} closed by the broker: {code} {text}")
        self.code = code
        self.text = text


def shortstr(value: str | bytes) -> bytes:
    raw = value.encode() if isinstance(value, str) else value
    if len(raw) > 255:
        raise ValueError(f"{raw[:40]!r}... is over 255 bytes (an AMQP short string)")
    return bytes((len(raw),)) + raw


def longstr(value: bytes) -> bytes:
    return struct.pack(">I", len(value)) + value


def table(entries: dict[str, str | bool | dict[str, bool]]) -> bytes:
    """An AMQP field table of strings, booleans and tables of booleans."""
    out = []
    for name, value in entries.items():
        if isinstance(value, bool):
            field = b"t" + bytes((value,))
        elif isinstance(value, str):
            field = b"S" + longstr(value.encode())
        else:
            field = b"F" + table(dict(value))
        out.append(shortstr(name) + field)
    return longstr(b"".join(out))


def method_frame(channel: int, method: int, arguments: bytes) -> bytes:
    payload = _METHOD_ID.pack(method) + arguments
    return FRAME.pack(_METHOD, channel, len(payload)) + payload + b"\xce"


def _read_shortstr(data: bytes, at: int) -> str:
    return data[at + 1 : at + 1 + data[at]].decode("utf-8", "replace")


class ConsumeConnection(asyncio.Protocol):
    """One AMQP connection consuming one queue (see the module docstring): a node's own exclusive queue
    without acknowledgements (:meth:`open`), or a worker's shard queue with them (:meth:`open_shard`)."""

    def __init__(
        self, url: URL, handler: Callable[[bytes], None], on_lost: Callable[[], None], *, name: str
    ) -> None:
        self.url = url
        self.handler = handler
        self.on_lost = on_lost
        self.name = name  #: its connection name (what ``rabbitmqctl list_connections`` shows)
        self.queue = ""
        self._transport: asyncio.Transport | None = None
        self._rest = b""  #: the start of a frame whose end has not come yet
        self._body: list[bytes] | None = None  #: a delivery's body frames so far, while more must come
        self._have = 0
        self._want = -1  #: the body size of the delivery being read; -1: none (0: its header is next)
        self._expect: tuple[int, asyncio.Future[bytes]] | None = None  #: the method awaited, its answer
        self._rpc = asyncio.Lock()
        self._heard = True  #: whether anything came since the last heartbeat tick
        self._silent_ticks = 0
        self._ticker: asyncio.TimerHandle | None = None
        self._closing = False
        self._error: BaseException | None = None  #: why the connection ended, for later callers
        self._acknowledged = False  #: consuming with acknowledgements (a shard queue)
        #: while the handler runs (acknowledged consumers): the delivery's tag and whether it came before
        self.delivery_tag = 0
        self.redelivered = False

    # -- lifecycle ------------------------------------------------------------------------------------

    async def open(self, queue: str, consumer_tag: str) -> None:
        """Connect, declare ``queue`` (exclusive, auto-delete) and consume it without acknowledgements.
        Raises ``OSError``/``ConnectionError`` (unreachable, lost), :class:`Refused` (e.g. credentials)."""
        await self._connect()
        # queue.declare: reserved, queue, passive/durable/exclusive/auto-delete/no-wait (exclusive and
        # auto-delete), no arguments
        await self._call(CHANNEL, DECLARE, b"\x00\x00" + shortstr(queue) + b"\x0c" + table({}), DECLARE_OK)
        self.queue = queue
        # basic.consume: reserved, queue, tag, no-local/no-ack/exclusive/no-wait (no-ack), no arguments
        consume = b"\x00\x00" + shortstr(queue) + shortstr(consumer_tag) + b"\x02" + table({})
        await self._call(CHANNEL, CONSUME, consume, CONSUME_OK)

    async def open_shard(self, queue: str, consumer_tag: str, prefetch: int) -> None:
        """Connect and consume ``queue``, which must exist, with acknowledgements: at most ``prefetch``
        deliveries unacknowledged; the handler reads :attr:`delivery_tag` and :attr:`redelivered`, and
        :meth:`ack` acknowledges. Closing the connection gives the broker back what was not acknowledged.
        Raises as :meth:`open` does; a missing queue is :class:`Refused` with code 404."""
        await self._connect()
        self._acknowledged = True
        # queue.declare, passive: only whether it exists
        await self._call(CHANNEL, DECLARE, b"\x00\x00" + shortstr(queue) + b"\x01" + table({}), DECLARE_OK)
        self.queue = queue
        # basic.qos: prefetch-size (none), prefetch-count, global (no)
        await self._call(CHANNEL, QOS, struct.pack(">IHB", 0, prefetch, 0), QOS_OK)
        consume = b"\x00\x00" + shortstr(queue) + shortstr(consumer_tag) + b"\x00" + table({})
        await self._call(CHANNEL, CONSUME, consume, CONSUME_OK)

    def ack(self, tags: list[int]) -> None:
        """Acknowledge these deliveries (one write). Raises ``ConnectionError`` if the connection is gone."""
        self._write(b"".join(method_frame(CHANNEL, ACK, _DELIVERY_TAG.pack(tag, 0)) for tag in tags))

    async def _connect(self) -> None:
        """Connect, authenticate, tune and open the channel."""
        url, loop = self.url, asyncio.get_running_loop()
        await loop.create_connection(lambda: self, url.host or "localhost", url.port or 5672)
        assert self._transport is not None
        self._transport.write(_PROTOCOL_HEADER)
        start = await self._answer(START)
        if b"PLAIN" not in start:
            raise Refused(0, "the broker does not offer the PLAIN mechanism", "the handshake")
        properties = table(
            {
                "product": "fanout",
                "connection_name": self.name,
                "capabilities": {"authentication_failure_close": True, "consumer_cancel_notify": True},
            }
        )
        response = b"\x00" + (url.user or "guest").encode() + b"\x00" + (url.password or "guest").encode()
        arguments = properties + shortstr("PLAIN") + longstr(response) + shortstr("en_US")
        tune = await self._call(0, START_OK, arguments, TUNE)
        channel_max, frame_max, _ = struct.unpack_from(">HIH", tune)
        heartbeat = int(url.query.get("heartbeat", "60"))  # (checked by the backend's parse_url)
        tuned = struct.pack(">HIH", min(channel_max or 1, 1), frame_max or 131072, heartbeat)
        self._write(method_frame(0, TUNE_OK, tuned))
        vhost = "/" if url.path in ("", "/") else url.path[1:].replace("%2F", "/")
        await self._call(0, OPEN, shortstr(vhost) + b"\x00\x00", OPEN_OK)
        if heartbeat > 0:
            self._ticker = loop.call_later(heartbeat / 2, self._tick, heartbeat / 2, heartbeat)
        await self._call(CHANNEL, CHANNEL_OPEN, b"\x00", CHANNEL_OPEN_OK)

    async def bind(self, exchange: str, key: str) -> None:
        """Bind the queue to ``exchange`` with ``key``; returns on bind-ok."""
        arguments = b"\x00\x00" + shortstr(self.queue) + shortstr(exchange) + shortstr(key) + b"\x00"
        await self._call(CHANNEL, BIND, arguments + table({}), BIND_OK)

    async def unbind(self, exchange: str, key: str) -> None:
        """Remove that binding; returns on unbind-ok."""
        arguments = b"\x00\x00" + shortstr(self.queue) + shortstr(exchange) + shortstr(key)
        await self._call(CHANNEL, UNBIND, arguments + table({}), UNBIND_OK)

    async def close(self) -> None:
        """Say goodbye and close (the broker deletes a node's queue, and requeues what a shard consumer did
        not acknowledge); a broker that does not answer within the caller's timeout is cut off. ``on_lost``
        is not called."""
        self._closing = True
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        try:
            reply = struct.pack(">H", 200) + shortstr("bye") + b"\x00\x00\x00\x00"
            await self._call(0, CLOSE, reply, CLOSE_OK)
        except (Refused, ConnectionError):
            pass
        finally:
            transport.abort()

    def abort(self) -> None:
        """Close at once, without a goodbye (idempotent); ``on_lost`` is not called."""
        self._closing = True
        if self._transport is not None:
            self._transport.abort()

    @property
    def is_open(self) -> bool:
        return self._transport is not None and not self._transport.is_closing() and self._error is None

    # -- requests -------------------------------------------------------------------------------------

    async def _call(self, channel: int, method: int, arguments: bytes, answer: int) -> bytes:
        async with self._rpc:
            self._write(method_frame(channel, method, arguments))
            return await self._answer(answer)

    async def _answer(self, method: int) -> bytes:
        """The arguments of the next method frame, which must be ``method``."""
        if self._error is not None:
            raise self._error
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._expect = (method, future)
        try:
            return await future
        finally:
            self._expect = None

    def _write(self, data: bytes) -> None:
        if self._transport is None or self._transport.is_closing():
            raise self._error or ConnectionError("AMQP consumer connection is closed")
        self._transport.write(data)

    # -- reading --------------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = nodelay(transport)

    def data_received(self, data: bytes) -> None:
        self._heard = True
        if self._rest:
            data = self._rest + data
            self._rest = b""
        unpack, last, pos, n = FRAME.unpack_from, len(data) - 1, 0, len(data)
        while n - pos >= 8:
            kind, _, size = unpack(data, pos)
            start, end = pos + 7, pos + 7 + size
            if end > last:  # (its end marker not here yet)
                break
            if data[end] != _FRAME_END:
                self._fail(ConnectionError("AMQP frame without its end marker"))
                return
            pos = end + 1
            if kind == _BODY:
                if self._body is None and end - start == self._want:  # the whole body in one frame
                    self._want = -1
                    self._deliver(data[start:end])
                else:
                    self._add_body(data[start:end])
            elif kind == _HEADER:
                self._want = _BODY_SIZE.unpack_from(data, start + 4)[0]
                if self._want == 0:
                    self._want = -1
                    self._deliver(b"")
            elif kind == _METHOD:
                method = _METHOD_ID.unpack_from(data, start)[0]
                if method == DELIVER:
                    self._want = 0
                    if self._acknowledged:  # after the consumer tag: the delivery tag, redelivered
                        tag, bits = _DELIVERY_TAG.unpack_from(data, start + 5 + data[start + 4])
                        self.delivery_tag, self.redelivered = tag, bool(bits & 1)
                else:
                    self._method(method, data[start + 4 : end])
                    if self._transport is None or self._transport.is_closing():
                        return
            elif kind != _HEARTBEAT:
                self._fail(ConnectionError(f"unexpected AMQP frame type {kind}"))
                return
        if pos < n:
            self._rest = data[pos:]

    def _add_body(self, part: bytes) -> None:
        if self._body is None:
            self._body, self._have = [], 0
        self._body.append(part)
        self._have += len(part)
        if self._have >= self._want:
            body, self._body, self._want = b"".join(self._body), None, -1
            self._deliver(body)

    def _deliver(self, body: bytes) -> None:
        try:
            self.handler(body)
        except Exception:  # a broken handler must not end the consumer
            log.exception("AMQP consumer %s: on_message handler failed", self.name)

    def _method(self, method: int, arguments: bytes) -> None:
        if method in (CLOSE, CHANNEL_CLOSE):
            code = struct.unpack_from(">H", arguments)[0]
            text = _read_shortstr(arguments, 2)
            what = "the connection" if method == CLOSE else "the channel"
            if method == CLOSE and self._transport is not None:
                self._transport.write(method_frame(0, CLOSE_OK, b""))
            self._fail(Refused(code, text, what), abort=False)
        elif method == CANCEL:
            self._fail(ConnectionError("the broker cancelled the consumer (its queue was deleted)"))
        elif method in (BLOCKED, UNBLOCKED):
            pass  # about publishing, which this connection does not do
        elif self._expect is not None and self._expect[0] == method:
            future = self._expect[1]
            if not future.done():
                future.set_result(arguments)
        elif not (self._closing and method == CHANNEL_CLOSE_OK):
            self._fail(ConnectionError(f"unexpected AMQP method {method >> 16}.{method & 0xFFFF}"))

    def _tick(self, interval: float, heartbeat: int) -> None:
        """Send a heartbeat; a broker silent for (heartbeat + 1) * 3 seconds is gone."""
        if self._transport is None or self._transport.is_closing():
            return
        self._silent_ticks = 0 if self._heard else self._silent_ticks + 1
        self._heard = False
        if self._silent_ticks * interval > (heartbeat + 1) * HEARTBEAT_GRACE:
            silent = self._silent_ticks * interval
            self._fail(ConnectionError(f"nothing from the broker for {silent:g}s, heartbeats included"))
            return
        self._transport.write(_HEARTBEAT_FRAME)
        self._ticker = asyncio.get_running_loop().call_later(interval, self._tick, interval, heartbeat)

    def _fail(self, error: BaseException, *, abort: bool = True) -> None:
        """End the connection with ``error`` (given to whoever waits for an answer): at once, or (the
        broker said why) after what is written."""
        if self._error is None:
            self._error = error
        if self._transport is None:
            return
        if abort:  # connection_lost follows: it wakes the waiter and tells the link
            self._transport.abort()
        else:
            self._transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
        error = self._error
        if error is None:
            error = self._error = ConnectionError(f"AMQP consumer connection lost: {exc!r}")
        if self._expect is not None and not self._expect[1].done():
            self._expect[1].set_exception(error)
        if not self._closing:
            self.on_lost()
