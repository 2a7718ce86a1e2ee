"""One client connection, as the node and the application see it.

A :class:`Connection` owns its output: frames are written straight to its transport, or, while the node
applies a batch of bus commands, held in the connection's own pending list and written in one go when the
batch ends (:meth:`Connection.flush`) - also before a close, so a frame sent before a close is never lost.
The transport's write buffer plus what is pending is the connection's send buffer; over the node's
``send_buffer`` bytes the client is not keeping up and is cut off (TCP reset), so memory stays bounded and
other clients are unaffected.

:class:`ClientSocket` is the websockets connection the node serves with: it tells its :class:`Connection`
when the websocket leaves the OPEN state (so the per-frame path reads one plain attribute), and cuts off a
client that makes the node owe it more than ``send_buffer`` bytes of automatic replies without reading
them (a ping flood), cuts off one that sends more than ``early_limit`` bytes before its handshake is done
(websockets would buffer them all), and counts handshakes cut short by the handshake timeout.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
import time
from typing import TYPE_CHECKING, Any

import orjson
from websockets.asyncio.server import ServerConnection
from websockets.protocol import State

from fanout.admission import ConnectRequest
from fanout.serverutil import encode_payload, names

from .frames import encode_frame
from .limits import TokenBucket

if TYPE_CHECKING:
    from .node import Node

log = logging.getLogger("fanout.node")


#: a POST being answered: whatever else arrives on that connection is ignored
_ANSWERING = bytearray()
_API_TASKS: set[asyncio.Task[None]] = set()
#: the most of a refused (too large) body that is read and dropped so that the client gets its 413
_MAX_DISCARD = 64 << 20
_REASONS = {
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    404: "Not Found",
    411: "Length Required",
    413: "Payload Too Large",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
}


class ClientSocket(ServerConnection):
    """The websockets server connection, with the hooks the node needs (see the module docstring)."""

    #: set by the node once the client is admitted
    fanout: Connection | None = None
    #: what admission decided, for the handler: (request, Admit or None)
    admission: tuple[ConnectRequest, Any] | None = None
    #: called when the opening handshake is cut short (timeout)
    on_handshake_timeout: Any = None
    #: bytes a client may send before its handshake is done (websockets buffers them, unbounded)
    early_limit: int = 1 << 20
    #: called when a client is cut off for sending more than that before its handshake is done
    on_handshake_flood: Any = None
    #: answers ``POST`` requests (the HTTP API): ``async (path, authorization, body) -> (status, bytes)``
    api: Any = None
    #: biggest request body the API takes (bigger: 413)
    api_max_body: int = 1 << 20
    _early = 0
    _post: bytearray | None = None  #: a POST request being read (the websocket library refuses bodies)
    _discarding = 0  #: bytes of a refused body still to read and drop

    def data_received(self, data: bytes) -> None:
        conn = self.fanout
        if self._post is not None or (conn is None and self._early == 0 and data.startswith(b"POST ")):
            self._read_post(data)
            return
        if conn is None:
            self._early += len(data)
            if self._early > self.early_limit:
                if self.on_handshake_flood is not None:
                    self.on_handshake_flood()
                self.transport.abort()
                return
            super().data_received(data)
            return
        super().data_received(data)
        if self.protocol.state is not State.OPEN:
            conn.open = False
        elif self.transport.get_write_buffer_size() > conn.send_limit:
            # what we owe (pongs to its pings) piles up because it does not read: cut it off
            conn.cut_off("owes too many automatic replies (ping flood?)", ping_flood=True)

    def _read_post(self, data: bytes) -> None:
        """Collect a POST request (head, then Content-Length bytes of body) and answer it, then close."""
        if self._post is None:
            self._post = bytearray()
        if self._post is _ANSWERING:
            self._discard_body(len(data))
            return
        self._post += data
        head_end = self._post.find(b"\r\n\r\n")
        if head_end < 0:
            if len(self._post) > 64 * 1024:
                self._answer_post(431, b'{"error":{"type":"BadRequest","message":"headers too large"}}')
            return
        lines = bytes(self._post[:head_end]).decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        path = parts[1] if len(parts) >= 2 else "/"
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        try:
            length = int(headers.get("content-length", "0"))
        except ValueError:
            length = -1
        if length < 0 or "chunked" in headers.get("transfer-encoding", ""):
            self._answer_post(
                411, b'{"error":{"type":"BadRequest","message":"a Content-Length is required"}}'
            )
            return
        if length > self.api_max_body:
            message = f"the body is over the limit of {self.api_max_body} bytes (FANOUT_API_MAX_BODY)"
            # read and drop the rest of the body before closing (up to a bound), so the client gets the
            # answer instead of a reset
            self._discarding = length - (len(self._post) - head_end - 4)
            self._answer_post(413, orjson.dumps({"error": {"type": "PayloadTooLarge", "message": message}}))
            return
        body = bytes(self._post[head_end + 4 : head_end + 4 + length])
        if len(body) < length:
            return  # more to come
        self._post = _ANSWERING
        if self.api is None:
            self._answer_post(404, b'{"error":{"type":"NotFound","message":"no such endpoint"}}')
            return

        async def answer() -> None:
            try:
                status, answer_body = await self.api(path, headers.get("authorization"), body)
            except Exception:
                log.exception("HTTP API request failed")
                status, answer_body = 500, b'{"error":{"type":"InternalError","message":"see the node log"}}'
            self._answer_post(status, answer_body)

        task = asyncio.ensure_future(answer())
        _API_TASKS.add(task)
        task.add_done_callback(_API_TASKS.discard)

    def _discard_body(self, size: int) -> None:
        self._discarding -= size
        if self._discarding <= 0 and not self.transport.is_closing():
            self.transport.close()

    def _answer_post(self, status: int, body: bytes) -> None:
        self._post = _ANSWERING
        reason = _REASONS.get(status, "Error")
        head = (
            f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\nServer: fanout\r\n"
        )
        if status == 401:
            head += 'WWW-Authenticate: Bearer realm="fanout"\r\n'
        if not self.transport.is_closing():
            self.transport.write(head.encode() + b"\r\n" + body)
            if not 0 < self._discarding <= _MAX_DISCARD:
                self.transport.close()  # after the answer is written

    def connection_lost(self, exc: Exception | None) -> None:
        conn = self.fanout
        if conn is not None:
            conn.open = False
        super().connection_lost(exc)

    async def handshake(self, *args: Any, **kwargs: Any) -> None:
        try:
            await super().handshake(*args, **kwargs)
        except asyncio.CancelledError:
            if self.on_handshake_timeout is not None and self._post is None:  # (not an API request)
                self.on_handshake_timeout()
            raise


class Connection:
    """A websocket client of this node: what application hooks receive."""

    __slots__ = (
        "_last_flag",
        "_last_groups",
        "_last_session",
        "_pending",
        "_pending_bytes",
        "_transport",
        "client_id",
        "event_seq",
        "node",
        "open",
        "opened_at",
        "rate",
        "request",
        "send_limit",
        "session_version",
        "websocket",
    )

    def __init__(self, node: Node, websocket: ClientSocket, client_id: str, request: ConnectRequest) -> None:
        self.node = node
        self.websocket = websocket
        self.client_id = client_id
        #: the handshake request (path, query, headers, cookies, remote), as ``on_connect`` saw it
        self.request = request
        #: False from the moment the connection starts closing (or is cut off, or the client leaves)
        self.open = True
        #: time.monotonic() when it was accepted (close_guests closes guests older than some age)
        self.opened_at = time.monotonic()
        self.send_limit = node.options.send_buffer
        self._transport: asyncio.Transport = websocket.transport
        self._pending: list[bytes] | None = None
        self._pending_bytes = 0
        self._last_session: dict[str, Any] = {}
        self._last_flag: str | None = None
        self._last_groups: frozenset[str] = frozenset()
        #: events forwarded to the worker tier so far (each event's number among its connection's)
        self.event_seq = 0
        #: session changes applied from the bus (ServerUtil's set/update_session), for the worker tier
        self.session_version = 0
        rate = node.options.client_rate
        self.rate = TokenBucket(rate, 2 * rate, asyncio.get_running_loop().time()) if rate > 0 else None

    # -- state the table owns, seen from here ------------------------------------------------

    @property
    def session(self) -> dict[str, Any]:
        """Per-connection data kept on this node (also reachable through ServerUtil's session calls).

        After the connection left the table (in ``on_close``), the last session it had; reading it
        then does not bring it back into the table.
        """
        session = self.node.table.sessions.get(self.client_id)
        return self._last_session if session is None else session

    @session.setter
    def session(self, value: dict[str, Any]) -> None:
        if self.client_id in self.node.table:
            self.node.table.sessions[self.client_id] = value
        else:
            self._last_session = value

    def keep_last_state(self) -> None:
        """Called as the connection leaves the table: remember its session (for ``on_close``) and its
        flag and groups (for its close event)."""
        table = self.node.table
        self._last_session = table.sessions.get(self.client_id) or {}
        self._last_flag = table.flag_of(self.client_id)
        self._last_groups = table.groups_of(self.client_id)

    def identity(self) -> tuple[str | None, frozenset[str]]:
        """Flag and groups now, or, once the connection left the table, the last it had."""
        table = self.node.table
        if self.client_id in table:
            return table.flag_of(self.client_id), table.groups_of(self.client_id)
        return self._last_flag, self._last_groups

    @property
    def groups(self) -> frozenset[str]:
        return self.node.table.groups_of(self.client_id)

    @property
    def flag(self) -> str | None:
        return self.node.table.flag_of(self.client_id)

    @property
    def buffered(self) -> int:
        """Bytes written to this client (or pending for it) and not yet taken by the network."""
        return self._transport.get_write_buffer_size() + self._pending_bytes

    # -- output ---------------------------------------------------------------------------------

    def push(self, frame: bytes) -> bool:
        """Queue one encoded frame; False if the connection is closing or was cut off as too slow."""
        if not self.open:
            return False
        pending = self._pending
        if self._transport.get_write_buffer_size() + self._pending_bytes > self.send_limit:
            self.cut_off(f"send buffer over {self.send_limit} bytes")
            return False
        if pending is not None:  # frames are waiting (a batch, the write delay): this one goes after them
            pending.append(frame)
            self._pending_bytes += len(frame)
        elif self.node.batching:
            self._pending = [frame]
            self._pending_bytes = len(frame)
            self.node.dirty.append(self)
        else:
            self._transport.write(frame)
        return True

    def flush(self) -> None:
        """Write what is pending (frames held during a batch or the write delay) in one write."""
        pending = self._pending
        if pending is None:
            return
        self._pending = None
        self._pending_bytes = 0
        if not self._transport.is_closing():
            self._transport.write(pending[0] if len(pending) == 1 else b"".join(pending))

    def cut_off(self, why: str, *, ping_flood: bool = False) -> None:
        """Drop a client that does not keep up: TCP reset, no closing handshake (it could not get through)."""
        if not self.open and self._transport.is_closing():
            return
        log.warning("client %s: %s, disconnecting", self.client_id, why)
        metrics = self.node.metrics
        if ping_flood:
            metrics.ping_flood_disconnects += 1
        else:
            metrics.slow_disconnects += 1
        self.open = False
        self._pending = None
        self._pending_bytes = 0
        self.node.forget(self)
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
        frame = encode_frame(payload, binary)
        sent = self.push(frame)
        if sent:
            self.node.metrics.count_frames(1, len(frame))
        return sent

    async def close(self, code: int = 1000, reason: str = "") -> None:
        """Close the connection (after the frames already sent); it leaves its groups and flag at once."""
        self.start_close(code, reason)
        await self.websocket.wait_closed()

    def start_close(self, code: int = 1000, reason: str = "") -> None:
        """Begin closing: flush what is pending, then the closing handshake runs in the background."""
        if not self.open:
            return
        self.flush()
        self.open = False
        self.node.forget(self)
        self.node.spawn(self.websocket.close(code, reason), f"close {self.client_id}")

    async def join_group(self, *groups: str) -> None:
        await self.node.apply_change(self.node.table.join(self.client_id, names(groups, "groups")))

    async def leave_group(self, *groups: str) -> None:
        await self.node.apply_change(self.node.table.leave(self.client_id, names(groups, "groups")))

    async def bind(self, flag: str) -> None:
        change = self.node.table.bind(self.client_id, flag)
        self.node.flag_changed(self)
        await self.node.apply_change(change)

    async def unbind(self) -> None:
        change = self.node.table.unbind(self.client_id)
        self.node.flag_changed(self)
        await self.node.apply_change(change)

    def __repr__(self) -> str:
        return f"<Connection {self.client_id}>"
