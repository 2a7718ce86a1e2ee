"""A Python client of fanout nodes that recovers what it missed (SPEC "Continuity", ``fanout.v1``): for bots,
IoT gateways, tests and other services that subscribe like a browser page does.

::

    import asyncio

    from fanout.client import Client


    async def main() -> None:
        urls = ["ws://127.0.0.1:8765/", "ws://127.0.0.1:8766/"]  # tried in turn on reconnection
        async with Client(urls, token="<a token your on_connect accepts>") as client:
            print("connected as", client.client_id)
            await client.send({"text": "hello"})
            async for message in client:  # every delivery, missed ones included after a reconnection
                print(message)


    asyncio.run(main())

It is the JS client (``/fanout.js`` with ``recover: true``) in Python, with the same behaviour:

* It asks for the ``fanout.v1`` subprotocol. When the node selects it, the client keeps the welcome's resume
  token and the position (epoch, offset) of every history stream it is in, and after **every** reconnection
  (to any URL of its list) sends ``resume`` with them as its first frame: the node replays what it missed, in
  order, once, then answers ``resumed`` (see :class:`Resumed`, ``on_resumed``). A node that does not select
  ``fanout.v1`` (a node from before it) gets a raw client: no resume, frames as they come.
* Reconnection: capped exponential backoff with full jitter (a random delay in ``[0, min(cap, base *
  2**failures)]``, ``backoff=(base, cap)`` in seconds), trying the next URL of the list each time; a
  connection that stayed open ``stable_after`` seconds starts the backoff over. The node's close code decides:
  1000, 1008 and 4000-4999 stop the client for good (the iteration ends, :meth:`Client.recv` raises
  :class:`ClientClosed`); 3010 ("insufficient state": the node lost track of a stream) reconnects at once,
  with no backoff, and resumes; anything else (1001 the node is going away, 1006 the connection was lost,
  1011, 1012...) reconnects with backoff.
* What a delivery is (the same values the JS client hands a page): in ``fanout.v1``, the ``data`` the
  publisher sent: a ``str`` as a ``str`` (even one holding JSON text), any other JSON value decoded (dict,
  list, int, float, bool, None), ``bytes`` as ``bytes``. In raw mode, a text frame JSON-decoded when it is
  JSON, else the ``str``; a binary frame as ``bytes``. The welcome frame is not a delivery
  (:attr:`Client.client_id`).
* A delivery whose offsets are all at or below the offsets already received is a duplicate: it is dropped
  and counted in :attr:`Client.duplicates` (the node does not send any; this is a safety net).

The protocol's state (positions, token, the resume under way) is :class:`fanout.v1.Tracker`, without I/O;
this module is the websocket connection and the reconnection around it.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import random
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import orjson
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed
from websockets.typing import Subprotocol

from .exceptions import FanoutError
from .protocol import dump_json
from .v1 import (
    SUBPROTOCOL,
    Deliver,
    Position,
    Ready,
    Resumed,
    SendFrame,
    Tracker,
    Welcome,
    message_frame,
    read_frame,
)

__all__ = [
    "INSUFFICIENT_STATE",
    "STOP_CODES",
    "V1",
    "Client",
    "ClientClosed",
    "Position",
    "Resumed",
    "backoff_delay",
    "should_reconnect",
]

#: the subprotocol of SPEC's client protocol
V1 = Subprotocol(SUBPROTOCOL)
#: the node lost track of a stream this connection is in: reconnect at once and resume
INSUFFICIENT_STATE = 3010
#: close codes after which the client does not reconnect (besides 4000-4999), as in fanout.js
STOP_CODES = frozenset({1000, 1008})
#: the code of a connection that ended without a close frame (or never opened)
ABNORMAL = 1006

Token = str | Callable[[str], str | Awaitable[str]] | None


def should_reconnect(code: int) -> bool:
    """False for 1000, 1008 and 4000-4999 (the application's codes), true for every other close code."""
    return not (code in STOP_CODES or 4000 <= code <= 4999)


def backoff_delay(
    failures: int, base: float, cap: float, jitter: bool = True, rand: Callable[[], float] = random.random
) -> float:
    """The wait in seconds before attempt ``failures`` (0 for the first): full jitter, capped."""
    ceiling = min(cap, base * 2 ** min(failures, 62))
    return float(rand() * ceiling) if jitter else ceiling


class ClientClosed(FanoutError):
    """The client stopped for good: :meth:`Client.close`, or the node closed it with a code after which it
    does not come back (1000, 1008, 4000-4999). ``code`` and ``reason`` are that close's."""

    def __init__(self, code: int, reason: str = "") -> None:
        super().__init__(f"the client is closed ({code}{' ' + reason if reason else ''})")
        self.code = code
        self.reason = reason


def ws_url(url: str, token: str | None = None, param: str = "token") -> str:
    """``url`` with ``http(s):`` as ``ws(s):``, carrying ``token`` in the query parameter ``param``."""
    parts = urlsplit(url)
    scheme = {"http": "ws", "https": "wss"}.get(parts.scheme, parts.scheme)
    if scheme not in ("ws", "wss"):
        raise ValueError(f"{url!r} is not a websocket URL (ws:, wss:, http:, https:)")
    query = parts.query
    if token is not None:
        pairs = [(k, v) for k, v in parse_qsl(query, keep_blank_values=True) if k != param]
        query = urlencode([*pairs, (param, token)])
    return urlunsplit((scheme, parts.netloc, parts.path or "/", query, parts.fragment))


_DATA, _RESUMED, _END = range(3)


class Client:
    """A connection to fanout nodes that reconnects over ``urls`` and resumes (see the module docstring).

    Args:
        urls: a websocket URL or a list of them (``ws:``, ``wss:``, ``http:``, ``https:``); the next one is
            tried on each reconnection.
        recover: ask for ``fanout.v1`` and resume after reconnections (false: a raw client).
        headers: HTTP headers for every handshake (``Authorization``, ``Cookie``...).
        token: put in the URL's ``token_param`` query parameter: a string, or a callable (plain or async)
            called with the URL before every attempt, for a fresh one (if it raises, the attempt failed).
        backoff: ``(base, cap)`` in seconds, see :func:`backoff_delay`; ``jitter=False`` waits the ceiling.
        stable_after: seconds a connection must stay open before the backoff starts over.
        open_timeout: seconds a handshake may take before the attempt counts as failed.
        on_resumed: called (plain or async) with :class:`Resumed` after each resume, in order with the
            deliveries (from :meth:`recv` / the iteration: after the replayed messages, before later ones).
        max_size: the largest message accepted from the node, in bytes (None: no limit); the default
            holds the largest send (FANOUT_MAX_MESSAGE, 8 MiB) as base64 in an envelope.
        max_queue: deliveries kept until read; past it the client stops reading the socket (the node then
            sees a slow client), so read them.
    """

    def __init__(
        self,
        urls: str | Sequence[str],
        *,
        recover: bool = True,
        headers: dict[str, str] | None = None,
        token: Token = None,
        token_param: str = "token",
        backoff: tuple[float, float] = (0.1, 5.0),
        jitter: bool = True,
        stable_after: float = 5.0,
        open_timeout: float = 10.0,
        on_resumed: Callable[[Resumed], object] | None = None,
        max_size: int | None = 16 << 20,
        max_queue: int = 1024,
    ) -> None:
        self.urls = [urls] if isinstance(urls, str) else list(urls)
        if not self.urls:
            raise ValueError("fanout.client: no URL to connect to")
        for url in self.urls:
            ws_url(url)  # ValueError now rather than a retry loop on a URL that can never work
        self.recover = recover
        self.headers = dict(headers or {})
        self.token = token
        self.token_param = token_param
        self.backoff = backoff
        self.jitter = jitter
        self.stable_after = stable_after
        self.open_timeout = open_timeout
        self.on_resumed = on_resumed
        self.max_size = max_size
        #: the index in ``urls`` of the current (or next) connection
        self.index = 0
        #: consecutive attempts that failed or did not last ``stable_after``
        self.failures = 0
        #: the current connection's client id (None between connections)
        self.client_id: str | None = None
        #: whether the current connection speaks ``fanout.v1``
        self.v1 = False
        #: "connecting", "open", "waiting" (to reconnect) or "closed"
        self.state = "connecting"
        #: the code and reason of the last close
        self.close_code: int | None = None
        self.close_reason = ""
        #: the last :class:`Resumed` read from :meth:`recv` (None before the first)
        self.resumed: Resumed | None = None
        #: how many connections were opened
        self.connections = 0
        self._tracker = Tracker()  # positions, token, the resume under way (fanout/v1.py)
        self._queue: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()  # bounded by _deliver
        self._max_queue = max_queue
        self._room = asyncio.Event()  # set by recv(): the reader may queue again
        self._ws: ClientConnection | None = None  # the connection send() may use (welcomed, resume sent)
        self._changed = asyncio.Condition()
        self._task: asyncio.Task[None] | None = None
        self._stopped = False
        self._finished = False
        self._quick = False  # a 3010 was answered with an immediate reconnection since the last stable one
        self._wake = asyncio.Event()

    # -- the application's API ------------------------------------------------------------------

    @property
    def url(self) -> str:
        """The URL of the current (or next) connection."""
        return self.urls[self.index]

    @property
    def positions(self) -> dict[str, Position]:
        """The last position received in each history stream the client is in (a copy)."""
        return dict(self._tracker.positions)

    @property
    def duplicates(self) -> int:
        """Deliveries dropped because every offset they carry was already received."""
        return self._tracker.duplicates

    @property
    def node_id(self) -> str:
        """The node id in the current client id (``<node id>.<boot>.<seq>``), "" between connections."""
        parts = (self.client_id or "").split(".")
        return ".".join(parts[:-2]) if len(parts) >= 3 else ""

    async def connect(self) -> Client:
        """Start (once), and return once the first connection is ready: welcomed, resume sent (it keeps
        trying the URLs until then: bound it with ``asyncio.timeout`` if you must). Raises
        :class:`ClientClosed` if the node closed it for good first. ``async with client`` calls it."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="fanout-client")
        async with self._changed:
            await self._changed.wait_for(lambda: self._ws is not None or self._finished)
        if self._ws is None and self._finished:
            await self.close()
            raise ClientClosed(self.close_code or ABNORMAL, self.close_reason)
        return self

    async def __aenter__(self) -> Client:
        return await self.connect()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close for good (code 1000): no reconnection; :meth:`recv` raises once what was received is read."""
        self._stopped = True
        self._wake.set()
        self._room.set()
        ws = self._ws
        if ws is not None:
            await ws.close()
        if self._task is not None:
            await self._task

    async def send(self, data: object) -> None:
        """Send ``data`` to the node: ``str`` as a string, ``bytes`` as binary, anything else as JSON (in
        ``fanout.v1``, a ``message`` frame; raw, a text or binary frame, as the JS client does). Waits for a
        connection (not sent before the resume); raises :class:`ClientClosed` if the client is closed."""
        frame = self._encode(data)
        while True:
            async with self._changed:
                await self._changed.wait_for(lambda: self._ws is not None or self._finished or self._stopped)
                ws = self._ws
            if ws is None:
                raise ClientClosed(self.close_code or 1000, self.close_reason)
            try:
                await ws.send(frame[0] if ws.subprotocol == V1 else frame[1])
                return
            except ConnectionClosed:
                # not written: wait until the reader has seen this connection end, then try the next one
                failed = ws
                async with self._changed:
                    await self._changed.wait_for(lambda: self._ws is not failed)  # noqa: B023

    async def recv(self) -> Any:
        """The next delivery (see the module docstring for its type). Raises :class:`ClientClosed` once the
        client stopped for good and everything received before was read."""
        while True:
            kind, value = await self._queue.get()
            self._room.set()
            if kind == _DATA:
                return value
            if kind == _RESUMED:
                self.resumed = value
                if self.on_resumed is not None:
                    result = self.on_resumed(value)
                    if inspect.isawaitable(result):
                        await result
                continue
            self._queue.put_nowait((kind, value))  # the end stays the end for every later call
            raise ClientClosed(*value)

    def __aiter__(self) -> AsyncIterator[Any]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Any]:
        while True:
            try:
                yield await self.recv()
            except ClientClosed:
                return

    # -- the connection loop --------------------------------------------------------------------

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while not self._stopped:
                opened = loop.time()
                code, reason, was_open = await self._connection(self.url)
                if self._stopped:
                    break
                self.close_code, self.close_reason = code, reason
                if was_open and loop.time() - opened >= self.stable_after:
                    self.failures, self._quick = 0, False
                if not should_reconnect(code):
                    break
                if code == INSUFFICIENT_STATE and not self._quick:
                    self._quick, delay = True, 0.0
                else:
                    delay = backoff_delay(self.failures, *self.backoff, jitter=self.jitter)
                    self.failures += 1
                self.index = (self.index + 1) % len(self.urls)
                self.state = "waiting"
                if delay:
                    self._wake.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), delay)
        finally:
            self.state = "closed"
            self._finished = True
            if self.close_code is None or self._stopped:
                self.close_code, self.close_reason = 1000, ""
            async with self._changed:
                self._changed.notify_all()
            self._queue.put_nowait((_END, (self.close_code, self.close_reason)))

    async def _connection(self, url: str) -> tuple[int, str, bool]:
        """One attempt and, if it opens, its whole life: (close code, reason, whether it opened)."""
        self.state = "connecting"
        self.client_id = None
        try:
            token = self.token(url) if callable(self.token) else self.token
            if inspect.isawaitable(token):
                token = await token
            ws = await connect(
                ws_url(url, token, self.token_param),
                subprotocols=[V1] if self.recover else None,
                additional_headers=self.headers,
                open_timeout=self.open_timeout,
                max_size=self.max_size,
            )
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # refused, timed out, the handshake rejected (401...), getToken failed
            return ABNORMAL, f"{type(exc).__name__}: {exc}", False
        self.connections += 1
        self.state = "open"
        self.v1 = ws.subprotocol == V1
        if not self.v1:
            await self._ready(ws)  # raw: no resume to send first
        else:
            self._tracker.opened()
        try:
            if self._stopped:
                await ws.close()
            async for frame in ws:
                if self.v1:
                    await self._v1_frame(ws, frame)
                else:
                    await self._raw_frame(frame)
        except ConnectionClosed:
            pass
        finally:
            async with self._changed:
                if self._ws is ws:
                    self._ws = None
                self._changed.notify_all()
            self.client_id = None
            self._tracker.closed()
        await ws.wait_closed()
        return ws.close_code or ABNORMAL, ws.close_reason or "", True

    async def _ready(self, ws: ClientConnection) -> None:
        async with self._changed:
            self._ws = ws
            self._changed.notify_all()

    async def _deliver(self, kind: int, value: Any) -> None:
        while kind == _DATA and self._queue.qsize() >= self._max_queue and not self._stopped:
            self._room.clear()
            await self._room.wait()
        self._queue.put_nowait((kind, value))

    async def _raw_frame(self, frame: str | bytes) -> None:
        if isinstance(frame, bytes):
            await self._deliver(_DATA, frame)
            return
        try:
            data = orjson.loads(frame)
        except orjson.JSONDecodeError:
            data = frame
        if (
            self.client_id is None
            and isinstance(data, dict)
            and data.get("type") == "welcome"
            and isinstance(data.get("client_id"), str)
        ):
            self.client_id = data["client_id"]
            return
        await self._deliver(_DATA, data)

    async def _v1_frame(self, ws: ClientConnection, text: str | bytes) -> None:
        frame = read_frame(text)
        if isinstance(frame, Welcome) and self.client_id is None:
            self.client_id = frame.client_id
        for action in self._tracker.receive(frame):
            if isinstance(action, Deliver):
                await self._deliver(_DATA, action.data)
            elif isinstance(action, SendFrame):
                await ws.send(action.text)  # the resume: before the connection is ready for send()
            elif isinstance(action, Ready):
                await self._ready(ws)
            else:
                await self._deliver(_RESUMED, action)

    @staticmethod
    def _encode(data: object) -> tuple[str, str | bytes]:
        """``data`` as (a v1 ``message`` frame, a raw frame), the connection picking one."""
        if isinstance(data, str):
            return message_frame(data), data
        if isinstance(data, bytes | bytearray | memoryview):
            return message_frame(data), bytes(data)
        return message_frame(data), dump_json(data).decode()
