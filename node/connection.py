"""One client connection, as the node and the application see it."""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
from typing import TYPE_CHECKING, Any

from websockets.asyncio.server import ServerConnection
from websockets.protocol import State

from fanout.serverutil import encode_payload, names

from .frames import encode_frame

if TYPE_CHECKING:
    from .server import Node

log = logging.getLogger("fanout.node")


class Connection:
    """A websocket client of this node: what application hooks receive.

    ``send`` writes pre-built frames straight to the transport (see :mod:`node.frames`). The
    transport's write buffer is the connection's send buffer: when it holds more than the node's
    ``send_buffer`` bytes, the client is not keeping up and is disconnected at once (TCP abort), so
    memory stays bounded and other clients are unaffected.
    """

    __slots__ = ("_closing", "_transport", "client_id", "node", "websocket")

    def __init__(self, node: Node, websocket: ServerConnection, client_id: str) -> None:
        self.node = node
        self.websocket = websocket
        self.client_id = client_id
        self._transport: asyncio.Transport = websocket.transport
        self._closing = False

    @property
    def session(self) -> dict[str, Any]:
        """Per-connection data kept on this node (also reachable through ServerUtil's session calls)."""
        return self.node.table.sessions.setdefault(self.client_id, {})

    @session.setter
    def session(self, value: dict[str, Any]) -> None:
        self.node.table.sessions[self.client_id] = value

    @property
    def buffered(self) -> int:
        """Bytes written to this client and not yet taken by the network."""
        return self._transport.get_write_buffer_size()

    @property
    def open(self) -> bool:
        return not self._closing and self.websocket.protocol.state is State.OPEN

    def push(self, frame: bytes) -> bool:
        """Queue one encoded frame; False if the connection is closing or was cut off as too slow.

        While the node applies a batch of bus commands, frames are held per connection and written
        together when the batch ends (:meth:`Node.corked`): one system call per connection per batch
        instead of one per frame, which is where a node spends most of its time.
        """
        if not self.open:
            return False
        if self._transport.get_write_buffer_size() > self.node.options.send_buffer:
            self._cut_off_slow_client()
            return False
        corked = self.node.cork
        if corked is None:
            self._transport.write(frame)
        else:
            corked.setdefault(self, []).append(frame)
        metrics = self.node.metrics
        metrics.frames_sent += 1
        metrics.bytes_sent += len(frame)
        return True

    def write_now(self, frames: list[bytes]) -> None:
        """Write frames held back during a batch (see :meth:`push`)."""
        if self.open:
            self._transport.write(frames[0] if len(frames) == 1 else b"".join(frames))

    def _cut_off_slow_client(self) -> None:
        log.warning(
            "client %s: send buffer over %d bytes, disconnecting",
            self.client_id,
            self.node.options.send_buffer,
        )
        self.node.metrics.slow_disconnects += 1
        self._closing = True
        self.node.forget(self)
        # The buffer is full, so a close frame could not get through: drop the TCP connection. Linger 0
        # makes the kernel discard its own send buffer and reset at once, instead of trickling the
        # backlog to a client that does not read (zero-window probing can take minutes).
        sock = self._transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self._transport.abort()

    # -- the application's API ------------------------------------------------------------------

    async def send(self, data: object) -> bool:
        """Send str (text frame), bytes (binary frame) or JSON-encoded data to this client."""
        payload, binary = encode_payload(data)
        return self.push(encode_frame(payload, binary))

    async def close(self, code: int = 1000, reason: str = "") -> None:
        """Close the connection; it leaves its groups and flag at once."""
        self.start_close(code, reason)
        await self.websocket.wait_closed()

    def start_close(self, code: int = 1000, reason: str = "") -> None:
        """Begin closing (used when a close command arrives); the handshake finishes in the background."""
        if self._closing:
            return
        self._closing = True
        self.node.forget(self)
        self.node.spawn(self.websocket.close(code, reason), f"close {self.client_id}")

    async def join_group(self, *groups: str) -> None:
        await self.node.apply_change(self.node.table.join(self.client_id, names(groups, "groups")))

    async def leave_group(self, *groups: str) -> None:
        await self.node.apply_change(self.node.table.leave(self.client_id, names(groups, "groups")))

    async def bind(self, flag: str) -> None:
        await self.node.apply_change(self.node.table.bind(self.client_id, flag))

    async def unbind(self) -> None:
        await self.node.apply_change(self.node.table.unbind(self.client_id))

    @property
    def groups(self) -> frozenset[str]:
        return self.node.table.groups_of(self.client_id)

    @property
    def flag(self) -> str | None:
        return self.node.table.flag_of(self.client_id)

    def __repr__(self) -> str:
        return f"<Connection {self.client_id}>"
