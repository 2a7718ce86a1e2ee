"""The protocol of every accepted socket until its websocket opens.

:class:`HttpConnection` reads the HTTP request (websockets' parser, with its limits on line length and
header count), hands it to the node's :class:`~node.routes.HttpSide` (the endpoints and the handshake
gate), answers the HTTP API's ``POST`` requests (read here: the websocket library refuses bodies), writes
the 101 (with the permessage-deflate answer, :mod:`node.deflate`) and hands the socket to a
:class:`~node.connection.Connection`. It cuts off a client that does not finish its handshake within
``FANOUT_HANDSHAKE_TIMEOUT``, and one that sends more than ``early_limit`` bytes before its websocket is
open (the request, plus what a client may send right after it).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Generator
from typing import TYPE_CHECKING, Any, cast

import orjson
from websockets.exceptions import HeaderLineTooLong, RequestLineTooLong, TooManyHeaders
from websockets.http11 import Request, Response
from websockets.server import ServerProtocol
from websockets.streams import StreamReader

from fanout.admission import ConnectRequest

from . import deflate
from .v1 import SUBPROTOCOL, wants_v1

if TYPE_CHECKING:
    from .routes import HttpSide

log = logging.getLogger("fanout.node")

#: builds plain responses (``reject`` keeps no state)
_RESPONSES = ServerProtocol()
#: a POST being answered: whatever else arrives on that connection is ignored
_ANSWERING = bytearray()
#: the most of a refused (too large) body that is read and dropped so that the client gets its 413
_MAX_DISCARD = 64 << 20
_API_ERROR = b'{"error":{"type":"InternalError","message":"see the node log"}}'


class HttpConnection(asyncio.Protocol):
    """A socket before its websocket opens (see the module docstring)."""

    def __init__(self, side: HttpSide) -> None:
        self.side = side
        self.node = side.node
        self.transport: asyncio.Transport | None = None
        self.remote_address: Any = None
        self._reader = StreamReader()
        self._parser: Generator[None, None, Request] | None = Request.parse(self._reader.read_line)
        next(self._parser)
        self._received = 0  #: bytes received so far
        self._early: list[bytes] | None = None  #: bytes after the request, while the gate decides
        self._timer: asyncio.TimerHandle | None = None
        self._task: asyncio.Task[None] | None = None
        self._post: bytearray | None = None  #: a POST request being read
        self._discarding = 0  #: bytes of a refused body still to read and drop
        #: what admission decided, for the node: (request, Admit or None)
        self.admission: tuple[ConnectRequest, Any] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # (uvloop's are not subclasses)
        self.remote_address = transport.get_extra_info("peername")
        timeout = self.node.options.handshake_timeout
        self._timer = asyncio.get_running_loop().call_later(timeout, self._timed_out)
        self.node.handshaking.add(self)

    def respond(self, status: int, text: str) -> Response:
        """A plain text response (``Connection: close``), as websockets builds it."""
        return _RESPONSES.reject(status, text)

    # -- reading the request

    def data_received(self, data: bytes) -> None:
        if self._post is not None or (self._received == 0 and data.startswith(b"POST ")):
            self._read_post(data)
            return
        self._received += len(data)
        if self._received > self.node.early_limit:
            self.node.metrics.handshake_floods += 1
            self._drop()
            return
        if self._early is not None:
            self._early.append(data)
            return
        if self._parser is None:
            return
        self._reader.feed_data(data)
        self._parse()

    def eof_received(self) -> bool | None:
        if self._parser is not None:
            self._reader.feed_eof()
            self._parse()
        return None

    def _parse(self) -> None:
        assert self._parser is not None
        try:
            self._parser.send(None)
        except StopIteration as done:
            request: Request = done.value
        except EOFError:
            self._parser = None
            self._drop()
            return
        except RequestLineTooLong:
            self._parser = None
            self._write(self.respond(414, "request line too long\n"))
            return
        except (HeaderLineTooLong, TooManyHeaders):
            self._parser = None
            self._write(self.respond(431, "request header fields too large\n"))
            return
        except Exception as exc:
            self._parser = None
            self._write(self.respond(400, f"invalid HTTP request: {exc}\n"))
            return
        else:
            return  # more to come
        self._parser = None
        self._early = [bytes(self._reader.buffer)] if self._reader.buffer else []
        self._task = asyncio.ensure_future(self._handshake(request))

    async def _handshake(self, request: Request) -> None:
        try:
            await self._answer(request)
        except Exception:  # a bug: log it, drop this client, keep serving
            log.exception("opening a websocket failed")
            self._drop()

    async def _answer(self, request: Request) -> None:
        try:
            response = await self.side.process_request(self, request)
        except Exception:
            log.exception("answering an HTTP request failed")
            response = self.respond(500, "internal error\n")
        if self.transport is None or self.transport.is_closing():
            return  # the client left (or timed out) meanwhile
        if response is None:
            if not self.node.serving:
                response = self.respond(503, "the node is shutting down\n")
            else:
                # the 101 for a valid websocket request, else its 400 or 426 (websockets' checks)
                response = ServerProtocol(max_size=None).accept(request)
        response.headers["Server"] = "fanout"
        if response.status_code != 101:
            self._write(response)
            return
        v1 = wants_v1(request.headers.get_all("Sec-WebSocket-Protocol"))
        if v1:  # only fanout.v1 is selected; a client asking for other subprotocols only gets none
            response.headers["Sec-WebSocket-Protocol"] = SUBPROTOCOL
        offers = request.headers.get_all("Sec-WebSocket-Extensions")
        bits, answer = (offers and self.node.options.compression and deflate.negotiate(offers)) or (0, "")
        if bits:
            response.headers["Sec-WebSocket-Extensions"] = answer
        self._finish()
        self.transport.write(response.serialize())
        connect_request, admit = self.admission or (ConnectRequest("/"), None)
        self.admission = None
        early = b"".join(self._early or ())
        self._early = None
        self.node.opened(self.transport, connect_request, admit, early, bits, v1)

    # -- HTTP API requests (POST)

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
        limit = self.node.options.api_max_body
        if length > limit:
            message = f"the body is over the limit of {limit} bytes (FANOUT_API_MAX_BODY)"
            # read and drop the rest of the body before closing (up to a bound), so the client gets the
            # answer instead of a reset
            self._discarding = length - (len(self._post) - head_end - 4)
            self._answer_post(413, orjson.dumps({"error": {"type": "PayloadTooLarge", "message": message}}))
            return
        body = bytes(self._post[head_end + 4 : head_end + 4 + length])
        if len(body) < length:
            return  # more to come
        self._post = _ANSWERING
        self._finish()  # the answer may take a query's time: no handshake timeout for it
        key = headers.get("idempotency-key")
        self._task = asyncio.ensure_future(self._answer_api(path, headers.get("authorization"), body, key))

    async def _answer_api(self, path: str, authorization: str | None, body: bytes, key: str | None) -> None:
        try:
            status, answer = await self.node.api.handle(path, authorization, body, key)
            answer_body = orjson.dumps(answer)
        except Exception:
            log.exception("HTTP API request failed")
            status, answer_body = 500, _API_ERROR
        self._answer_post(status, answer_body)

    def _discard_body(self, size: int) -> None:
        self._discarding -= size
        if self._discarding <= 0 and self.transport is not None and not self.transport.is_closing():
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
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(head.encode() + b"\r\n" + body)
            if not 0 < self._discarding <= _MAX_DISCARD:
                self.transport.close()  # after the answer is written

    # -- the end

    def _write(self, response: Response) -> None:
        """Answer with ``response`` and close (no keep-alive)."""
        if "Server" not in response.headers:
            response.headers["Server"] = "fanout"
        self._finish()
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(response.serialize())
            self.transport.close()

    def _finish(self) -> None:
        """The handshake timeout no longer applies; the node no longer counts this as handshaking."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.node.handshaking.discard(self)

    def _timed_out(self) -> None:
        self._timer = None
        if self._post is None:  # (an API request that is slow to arrive is not a handshake)
            self.node.metrics.handshake_timeouts += 1
        self._drop()

    def abort(self) -> None:
        """Drop the client (no answer)."""
        self._drop()

    def _drop(self) -> None:
        self._finish()
        if self._task is not None and not self._task.done():
            self._task.cancel()
        if self.transport is not None:
            self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self._finish()
        self._early = None


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
