"""A small real websocket server (the ``websockets`` library) that the test scripts frame by frame, to test
the clients (``fanout.client``, ``fanout.js``) against SPEC's ``fanout.v1`` before and besides the node.

It selects the ``fanout.v1`` subprotocol when a client asks for it (``v1=False``: never, like a node from
before Continuity: no ``Sec-WebSocket-Protocol`` answer) and hands each accepted connection to the test,
which sends the welcome, messages, ``resumed``... and reads what the client sends. It also serves
``/fanout.js`` (the repo file) and an empty page at ``/``, so Chromium can run the JS client from it.
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Sequence
from typing import Any

import orjson
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.http11 import Request, Response
from websockets.typing import Subprotocol

from tests.support import scaled
from tests.support.nodes import ROOT

V1 = Subprotocol("fanout.v1")
JS = ROOT / "node" / "static" / "fanout.js"
PAGE = b"<!doctype html><html><head><meta charset='utf-8'><title>v1 test</title></head><body></body></html>"


class Scripted:
    """One client's connection on the scripted server."""

    def __init__(self, ws: ServerConnection) -> None:
        self.ws = ws
        self.closed = asyncio.Event()

    @property
    def v1(self) -> bool:
        return self.ws.subprotocol == V1

    @property
    def offered(self) -> str | None:
        """The client's ``Sec-WebSocket-Protocol`` header (None if it asked for none)."""
        return self.ws.request.headers.get("Sec-WebSocket-Protocol") if self.ws.request else None

    @property
    def path(self) -> str:
        return self.ws.request.path if self.ws.request else ""

    async def send(self, frame: dict[str, Any] | str | bytes) -> None:
        await self.ws.send(frame if isinstance(frame, str | bytes) else orjson.dumps(frame).decode())

    async def recv(self, timeout: float = 5.0) -> str | bytes:
        return await asyncio.wait_for(self.ws.recv(), scaled(timeout))

    async def recv_json(self, timeout: float = 5.0) -> Any:
        frame = await self.recv(timeout)
        assert isinstance(frame, str), frame
        return orjson.loads(frame)

    async def welcome(
        self,
        client_id: str,
        token: str | None = None,
        streams: dict[str, tuple[str, int]] | None = None,
    ) -> None:
        """The first frame: v1's welcome (with the token and positions) or a raw node's."""
        frame: dict[str, Any] = {"type": "welcome", "client_id": client_id}
        if self.v1:
            if token is not None:
                frame["resume"] = token
            frame["streams"] = {s: {"epoch": e, "offset": o} for s, (e, o) in (streams or {}).items()}
        await self.send(frame)

    async def message(
        self, data: Any = None, streams: dict[str, int] | None = None, *, raw: bytes | None = None
    ) -> None:
        """A v1 ``message`` envelope (``raw`` bytes go as ``data_b64``)."""
        frame: dict[str, Any] = {"type": "message"}
        if raw is not None:
            frame["data_b64"] = base64.b64encode(raw).decode()
        else:
            frame["data"] = data
        if streams:
            frame["streams"] = streams
        await self.send(frame)

    async def resumed(self, streams: dict[str, tuple[bool, str, int]], recovered: bool | None = None) -> None:
        """``resumed``: per stream (recovered, epoch, offset); recovered overall if every one is (or
        ``recovered``: an unknown token answers false with no stream)."""
        await self.send(
            {
                "type": "resumed",
                "recovered": all(r for r, _, _ in streams.values()) if recovered is None else recovered,
                "streams": {s: {"recovered": r, "epoch": e, "offset": o} for s, (r, e, o) in streams.items()},
            }
        )

    def drop(self) -> None:
        """End the TCP connection, no close frame (a lost network, a killed node: the client sees 1006)."""
        self.ws.transport.abort()

    async def close(self, code: int, reason: str = "") -> None:
        await self.ws.close(code, reason)


class ScriptedServer:
    """``async with ScriptedServer() as server: conn = await server.accept()``."""

    def __init__(self, *, v1: bool = True) -> None:
        self.v1 = v1
        self.accepted: asyncio.Queue[Scripted] = asyncio.Queue()
        self.server: Server | None = None
        self.port = 0
        #: handshakes still to refuse with a 503 (a node that is starting, a balancer's hiccup)
        self.refuse = 0

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/"

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    async def __aenter__(self) -> ScriptedServer:
        self.server = await serve(
            self._handler,
            "127.0.0.1",
            0,
            select_subprotocol=self._select,
            process_request=self._http,
            max_size=None,
        )
        self.port = next(iter(self.server.sockets)).getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()

    async def accept(self, timeout: float = 5.0) -> Scripted:
        return await asyncio.wait_for(self.accepted.get(), scaled(timeout))

    def _select(self, connection: ServerConnection, offered: Sequence[Subprotocol]) -> Subprotocol | None:
        return V1 if self.v1 and V1 in offered else None

    def _http(self, connection: ServerConnection, request: Request) -> Response | None:
        if request.headers.get("Upgrade", "").lower() == "websocket":
            if self.refuse > 0:
                self.refuse -= 1
                return connection.respond(503, "try again\n")
            return None
        if request.path == "/fanout.js":
            body, kind = JS.read_bytes(), "text/javascript; charset=utf-8"
        elif request.path.split("?")[0] == "/":
            body, kind = PAGE, "text/html; charset=utf-8"
        else:
            return connection.respond(404, "not found\n")
        headers = Headers(
            [("Content-Type", kind), ("Content-Length", str(len(body))), ("Cache-Control", "no-store")]
        )
        return Response(200, "OK", headers, body)

    async def _handler(self, ws: ServerConnection) -> None:
        scripted = Scripted(ws)
        await self.accepted.put(scripted)
        await ws.wait_closed()
        scripted.closed.set()
