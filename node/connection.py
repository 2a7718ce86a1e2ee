"""One client connection once its websocket is open: the node's and the application's view of it.

A :class:`Connection` is its socket's asyncio protocol from the handshake's 101 on: one small object per
client, no task while the client is idle. It owns its output: frames go to its transport or, in the hub's
batch, into its pending list, written in one go at the batch's end (:meth:`Connection.flush`), before any
control frame, or early at ``PENDING_FLUSH`` bytes. Over ``send_buffer`` bytes unwritten (or owed in pongs
to a ping flood) the client is cut off (TCP reset). It feeds what it reads to its :class:`~node.wire.Wire`
and queues messages to its *lane* (:mod:`node.lanes`); over ``INBOX_HIGH`` waiting, reading stops. A
protocol error sends the close frame, half-closes and discards what the client still sends until its EOF
(RFC 6455 7.1.1); messages received before the error are handled first (the wire is FAILING meanwhile).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
import time
from collections import deque
from typing import TYPE_CHECKING, Any

from fanout.admission import Admit, ConnectRequest
from fanout.commands import Send
from fanout.serverutil import encode_payload, names

from .frames import CloseCode, Frame, encode_frame
from .lanes import INBOX_HIGH, INBOX_LOW
from .limits import TokenBucket
from .v1 import Resume, message_frame
from .wire import Signal, State, Wire

if TYPE_CHECKING:
    from .surfaces import AppNode, ConnectionHub, ConnectionLanes, Flushable

log = logging.getLogger("fanout.node")

#: seconds the node waits for a client's reply to its close frame before dropping the socket
CLOSE_TIMEOUT = 10.0
#: bytes of frames held for a batch at which they are written without waiting for its end (or half the
#: send buffer, if less): coalescing gains nothing past this; what the node holds never counts against it
PENDING_FLUSH = 64 * 1024
#: close code and reason when a client does not answer the keepalive ping in time
KEEPALIVE_CLOSE = (CloseCode.INTERNAL_ERROR, "keepalive ping timeout")


class Connection(asyncio.Protocol):
    """A websocket client of this node: what application hooks receive (and its socket's protocol)."""

    __slots__ = (
        "_close_timer",
        "_closed",
        "_flush_at",
        "_gone",
        "_inbox",
        "_lane",
        "_last_flag",
        "_last_groups",
        "_last_session",
        "_pending",
        "_pending_bytes",
        "_reading_paused",
        "_transport",
        "client_id",
        "deflate",
        "event_seq",
        "floor",
        "forwarded",
        "held",
        "holds",
        "hub",
        "lanes",
        "node",
        "open",
        "opened_at",
        "ping_sent",
        "request",
        "resumed",
        "send_limit",
        "session_version",
        "streams",
        "token",
        "v1",
        "wire",
    )

    def __init__(
        self,
        node: AppNode,
        hub: ConnectionHub[Connection],
        lanes: ConnectionLanes[Connection],
        transport: asyncio.Transport,
        client_id: str,
        request: ConnectRequest,
        deflate: int = 0,
        v1: bool = False,
    ) -> None:
        #: the node, as the application sees it (``conn.node.util``: cluster-wide sends and queries)
        self.node = node
        self.hub = hub  #: the table and membership changes
        self.lanes = lanes  #: where its messages and its end go
        self.client_id = client_id
        #: the handshake request (path, query, headers, cookies, remote), as ``on_connect`` saw it
        self.request = request
        #: False from the moment the connection starts closing (or is cut off, or the client leaves)
        self.open = True
        #: time.monotonic() when it was accepted (close_guests closes guests older than some age)
        self.opened_at = time.monotonic()
        self.send_limit = node.options.send_buffer
        self._transport = transport
        self._pending: list[bytes] | None = None
        self._pending_bytes = 0
        self._flush_at = min(PENDING_FLUSH, self.send_limit // 2)
        self._last_session: dict[str, Any] = {}
        self._last_flag: str | None = None
        self._last_groups: frozenset[str] = frozenset()
        # for the worker tier: events forwarded so far (each event's number among its connection's), whether
        # it was told of this connection (it then gets its close event), session changes applied from the bus
        self.event_seq, self.forwarded, self.session_version = 0, False, 0
        rate = node.options.client_rate
        bucket = TokenBucket(rate, 2 * rate, asyncio.get_running_loop().time()) if rate > 0 else None
        #: its websocket protocol: frames, fragments, the closing handshake, its state
        self.wire = Wire(node.options.max_frame, bucket, deflate > 0)
        #: permessage-deflate: the window bits its compressed messages may use (0: not negotiated)
        self.deflate = deflate
        #: loop time the keepalive ping now unanswered was sent (0: none outstanding)
        self.ping_sent = 0.0
        # the lane (see the module docstring): messages waiting, the task, whether reading is paused
        self._inbox: deque[str | bytes | Resume] | None = None
        self._lane: asyncio.Task[None] | None = None
        self._reading_paused = False
        self._closed: asyncio.Future[None] | None = None
        self._close_timer: asyncio.TimerHandle | None = None
        self._gone = False  #: the socket is closed
        # continuity (node/continuity.py): fanout.v1?, history streams, per stream the offset it has up to
        # (after a resume or a join), sends held and by how many (Continuity.hold; here: its admission), token
        self.v1, self.streams = v1, frozenset[str]()
        self.token: str | None = None
        self.floor: dict[str, int] | None = None
        self.held: list[tuple[Send, tuple[str, ...] | None]] | None = [] if v1 else None
        self.holds = 1 if v1 else 0
        self.resumed = False  #: it sent its resume (or a message: a resume is refused from then on)

    @property
    def close_code(self) -> int:
        """The close code the client sent (1006 when it sent none: the link was lost)."""
        return self.wire.close_code

    @property
    def close_reason(self) -> str:
        """The close reason the client sent ("" when none)."""
        return self.wire.close_reason

    # -- state the table owns, seen from here ------------------------------------------------

    @property
    def session(self) -> dict[str, Any]:
        """Per-connection data kept on this node (also reachable through ServerUtil's session calls); once
        the connection left the table (in ``on_close``), the last it had (not brought back by reading)."""
        session = self.hub.table.sessions.get(self.client_id)
        return self._last_session if session is None else session

    @session.setter
    def session(self, value: dict[str, Any]) -> None:
        if self.client_id in self.hub.table:
            self.hub.table.sessions[self.client_id] = value
        else:
            self._last_session = value

    def keep_last_state(self) -> None:
        """Called as the connection leaves the table: remember its session (for ``on_close``) and its
        flag and groups (for its close event)."""
        table = self.hub.table
        self._last_session = table.sessions.get(self.client_id) or {}
        self._last_flag = table.flag_of(self.client_id)
        self._last_groups = table.groups_of(self.client_id)

    def identity(self) -> tuple[str | None, frozenset[str]]:
        """Flag and groups now, or, once the connection left the table, the last it had."""
        table = self.hub.table
        if self.client_id in table:
            return table.flag_of(self.client_id), table.groups_of(self.client_id)
        return self._last_flag, self._last_groups

    @property
    def groups(self) -> frozenset[str]:
        return self.hub.table.groups_of(self.client_id)

    @property
    def flag(self) -> str | None:
        return self.hub.table.flag_of(self.client_id)

    @property
    def buffered(self) -> int:
        """Bytes written to this client (or pending for it) and not yet taken by the network."""
        return self._transport.get_write_buffer_size() + self._pending_bytes

    # -- output ---------------------------------------------------------------------------------

    def push(self, frame: Frame, batch: list[Flushable] | None = None) -> bool:
        """Write one frame (its compressed variant with permessage-deflate), or, in the hub's ``batch``, hold
        it until the hub's ``flush`` (joining ``batch``); False if closing or cut off as too slow."""
        if not self.open:
            return False
        if self.deflate:
            frame = frame.deflated(self.deflate)
        if self._transport.get_write_buffer_size() > self.send_limit:
            self.cut_off(f"send buffer over {self.send_limit} bytes")
            return False
        pending = self._pending
        if pending is not None:  # frames are waiting (a batch, the write delay): this one goes after them
            pending.append(frame)
            self._pending_bytes += len(frame)
            if self._pending_bytes >= self._flush_at:  # enough to fill a write: it need not wait
                self._transport.write(b"".join(pending))
                pending.clear()
                self._pending_bytes = 0
        elif batch is not None:
            self._pending = [frame]
            self._pending_bytes = len(frame)
            batch.append(self)
        else:
            self._transport.write(frame)
        return True

    def _write(self, data: bytes) -> None:
        """Write control frames (pongs, pings, close) after what is pending: none is lost to a close."""
        self.flush()
        self._transport.write(data)

    def flush(self) -> None:
        """Write what is pending (frames held during a batch or the write delay) in one write."""
        pending = self._pending
        if pending is None:
            return
        self._pending = None
        self._pending_bytes = 0
        if pending and not self._transport.is_closing():  # empty when it was written early
            self._transport.write(pending[0] if len(pending) == 1 else b"".join(pending))

    def cut_off(self, why: str, *, ping_flood: bool = False) -> None:
        """Drop a client that does not keep up: TCP reset, no closing handshake (it could not get through)."""
        if not self.open and self._transport.is_closing():
            return
        log.warning("client %s: %s, disconnecting", self.client_id, why)
        metrics = self.hub.metrics
        if ping_flood:
            metrics.ping_flood_disconnects += 1
        else:
            metrics.slow_disconnects += 1
        self.open = False
        self._pending = None
        self._pending_bytes = 0
        self.wire.discard()
        self.hub.forget(self)
        # Linger 0 makes the kernel discard its own send buffer and reset at once, instead of trickling
        # the backlog to a client that does not read (zero-window probing can take minutes).
        sock = self._transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self._transport.abort()

    # -- the application's API ------------------------------------------------------------------

    async def send(self, data: object) -> bool:
        """Send str (text frame), bytes (binary frame) or JSON-encoded data to this client."""
        payload, binary = encode_payload(data)
        frame = message_frame(payload, binary, not isinstance(data, str), None) if self.v1 else None
        sent = self.push(frame or encode_frame(payload, binary))
        if sent:
            self.hub.metrics.count_frames(1, len(frame or payload))
        return sent

    async def close(self, code: int = CloseCode.NORMAL_CLOSURE, reason: str = "") -> None:
        """Close the connection (after the frames already sent); it leaves its groups and flag at once.
        Returns once the socket is closed."""
        self.start_close(code, reason)
        await self.wait_closed()

    def start_close(self, code: int = CloseCode.NORMAL_CLOSURE, reason: str = "") -> None:
        """Begin closing: send the close frame after what is pending; the client's reply (or
        CLOSE_TIMEOUT) ends it."""
        if not self.open:
            return
        wire = self.wire
        if wire.state == State.FAILING:  # the client broke the protocol: its input is not read any more
            self._fail_now(code, reason)
            return
        if wire.send_close(code, reason):
            self._write(wire.data_to_send())
        self._closing()

    def _closing(self) -> None:
        """The node's close frame is sent: leave the table, read the client's reply even if reading was
        paused (what else it sends is ignored), drop the socket if no reply comes in CLOSE_TIMEOUT."""
        self.open = False
        self.hub.forget(self)
        self._resume_reading()
        if self._close_timer is None:
            self._close_timer = asyncio.get_running_loop().call_later(CLOSE_TIMEOUT, self._transport.abort)

    async def wait_closed(self) -> None:
        """Until the socket is closed."""
        if self._gone:
            return
        if self._closed is None:
            self._closed = asyncio.get_running_loop().create_future()
        await asyncio.shield(self._closed)

    async def join_group(self, *groups: str) -> None:
        await self.hub.apply_change(self.hub.table.join(self.client_id, names(groups, "groups")), self)

    async def leave_group(self, *groups: str) -> None:
        await self.hub.apply_change(self.hub.table.leave(self.client_id, names(groups, "groups")), self)

    async def bind(self, flag: str) -> None:
        change = self.hub.table.bind(self.client_id, flag)
        self.hub.flag_changed(self)
        await self.hub.apply_change(change, self)

    async def unbind(self) -> None:
        change = self.hub.table.unbind(self.client_id)
        self.hub.flag_changed(self)
        await self.hub.apply_change(change, self)

    # -- input: the socket's protocol ---------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        wire = self.wire
        wire.receive_data(data, asyncio.get_running_loop().time() if wire.rate is not None else 0.0)
        output = wire.data_to_send()
        if output:
            self._write(output)
            if wire.state == State.OPEN and self._transport.get_write_buffer_size() > self.send_limit:
                # what it owes (pongs to its pings) piles up because it does not read: cut it off
                self.cut_off("owes too many automatic replies (ping flood?)", ping_flood=True)
        for event in wire.events_received():
            if not isinstance(event, Signal):
                if self.open:
                    self.lanes.received(self, event)
            elif event == Signal.PONG:
                self.ping_sent = 0.0
            elif event == Signal.CLOSE:  # the client's close frame (echoed when it was not a reply)
                self.open = False
                self.hub.forget(self)
                self._transport.close()  # the server closes the TCP connection first (RFC 6455 7.1.1)
            elif event == Signal.FAILED:
                self._failed()
            elif self.open:  # RATE_LIMITED: the wire queued its close frame (written above)
                self.hub.metrics.rate_limit_closes += 1
                self._closing()

    def begin(self, admit: Admit | None) -> None:
        """Start the lane with the opening (``admit``: what ``on_connect`` returned)."""
        self._lane = self.lanes.start_lane(self, admit, opening=True)

    def queue(self, message: str | bytes | Resume) -> None:
        """Hand a message to the lane (the node calls this when the application reads messages)."""
        inbox = self._inbox
        if inbox is None:
            inbox = self._inbox = deque()
        inbox.append(message)
        if len(inbox) >= INBOX_HIGH and not self._reading_paused and self.wire.state == State.OPEN:
            self._reading_paused = True
            self._transport.pause_reading()
        if self._lane is None:
            self._lane = self.lanes.start_lane(self, None, opening=False)

    def next_message(self) -> str | bytes | Resume | None:
        """The lane's next message, or None when there is none. A message received while the connection
        was open is handled even if it closed since (its close comes after it)."""
        inbox = self._inbox
        if not inbox:
            return None
        message = inbox.popleft()
        if len(inbox) <= INBOX_LOW and self.wire.state == State.OPEN:
            self._resume_reading()
        return message

    def lane_done(self) -> bool:
        """Called by the lane when it has nothing left: True if the connection is gone (the lane then
        runs the close), else the lane ends and the next message starts another."""
        if self._gone:
            return True
        self._lane = None
        if self.wire.state == State.FAILING:  # the messages received before the error are handled: fail now
            self._fail_now(*self.wire.failure)
        return False

    def _failed(self) -> None:
        """The wire failed (a protocol error, or the keepalive): close with its code - once the lane has
        handled the messages received before (FAILING until then: nothing more is read, but what the
        application sends still goes out), else now."""
        code, reason = self.wire.failure
        log.info("client %s: %s, closing with %d", self.client_id, reason, code)
        if self.wire.state == State.FAILING and self._lane is not None:
            return  # lane_done fails it
        self._fail_now(code, reason)

    def _fail_now(self, code: int, reason: str) -> None:
        """Send what is pending and the close code, then half-close and discard what the client sends
        until its EOF (or CLOSE_TIMEOUT), then close (RFC 6455 7.1.1). Closing at once with its bytes
        unread would make the kernel reset the connection, and a client that is still writing would
        often lose the close frame, and with it the reason."""
        wire, transport = self.wire, self._transport
        self.flush()
        if wire.send_close(code, reason):
            self._write(wire.data_to_send())
        self._closing()
        if transport.can_write_eof():
            transport.write_eof()  # once the close frame is written; the client's EOF then closes it
        else:
            transport.close()

    def _resume_reading(self) -> None:
        if self._reading_paused:
            self._reading_paused = False
            self._transport.resume_reading()

    def keepalive(self, now: float, ping: bytes, expect_pong: bool) -> None:
        """Send the keepalive ping, unless one is still unanswered."""
        if self.wire.state == State.OPEN and not self.ping_sent:
            self._write(ping)
            if expect_pong:
                self.ping_sent = now

    def pong_overdue(self, sent_by: float) -> None:
        """Fail the connection if the ping sent at or before ``sent_by`` is still unanswered."""
        if self.ping_sent and self.ping_sent <= sent_by and self.wire.state == State.OPEN:
            self.wire.fail(*KEEPALIVE_CLOSE)
            self._failed()

    def connection_lost(self, exc: Exception | None) -> None:
        self._gone = True
        self.open = False
        self.wire.discard()
        self._pending = None
        self._pending_bytes = 0
        if self._close_timer is not None:
            self._close_timer.cancel()
            self._close_timer = None
        if self._closed is not None and not self._closed.done():
            self._closed.set_result(None)
        self.lanes.lost(self)
        if self._lane is None:  # no lane running: one runs the close
            self._lane = self.lanes.start_lane(self, None, opening=False)

    def __repr__(self) -> str:
        return f"<Connection {self.client_id}>"
