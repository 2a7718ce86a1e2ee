"""The lanes: each connection's messages and the application's hooks, in order, one at a time.

A connection's *lane* is a task that exists only while there is something to do: the opening (the
identity ``on_connect`` gave, the welcome frame, the worker tier's open event, ``on_open``), then the
messages the client sent, in order (the worker tier's message event, ``on_message``), then, once the
socket is gone, the close (the close event, ``on_close``). An idle connection has no task: the lane ends
when it has nothing left, and the next message starts another.

The connection keeps the messages waiting for its lane (its inbox): over ``INBOX_HIGH`` of them it stops
reading its socket (TCP then slows the client down), and reads again once its lane is down to
``INBOX_LOW``. The lanes see a connection through :class:`~node.surfaces.LaneConnection` and reach the
table through the hub (:class:`~node.surfaces.ConnectionHub`).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from fanout.events import EventKind
from fanout.exceptions import FanoutError

from .frames import CloseCode, WebsocketError, encode_frame
from .surfaces import LaneConnection
from .v1 import Resume, read_client_frame

if TYPE_CHECKING:
    from fanout.admission import Admit

    from .events import EventForwarder
    from .metrics import Metrics
    from .surfaces import ConnectionHub

log = logging.getLogger("fanout.node")

#: messages waiting in a connection's lane at which it stops reading, and at which it reads again
INBOX_HIGH = 16
INBOX_LOW = 4
#: seconds the worker tier's open event of a fanout.v1 connection (with a resume token) waits for its
#: first frame: if that is a resume, the event carries ``resumed_from`` (the old client id)
OPEN_WAIT = 1.0

C = TypeVar("C", bound=LaneConnection)


async def call_hook(hook: Callable[..., Any], *args: Any) -> Any:
    """Call an application hook, ``async def`` or plain ``def``, and return its result."""
    result = hook(*args)
    if inspect.isawaitable(result):
        result = await result
    return result


class Lanes(Generic[C]):
    """Runs the lanes of a node's connections (``C``: the connection type)."""

    def __init__(
        self,
        *,
        app: Any,
        hub: ConnectionHub[C],
        metrics: Metrics,
        events: EventForwarder | None,
        welcome: bool,
    ) -> None:
        self.app = app
        self.hub = hub
        self.metrics = metrics
        self.events = events
        self.welcome = welcome
        #: connections whose socket is open (closing ones included)
        self.live: set[C] = set()
        self._running: set[asyncio.Task[None]] = set()  #: the lanes running now
        #: fanout.v1 connections whose open event waits for their first frame (a resume?), and its timer
        self._unopened: dict[C, asyncio.TimerHandle] = {}
        self._on_message = getattr(app, "on_message", None)
        #: the worker tier when it takes message events, else None
        self._forwarder = events if events is not None and EventKind.MESSAGE in events.kinds else None

    def received(self, conn: C, message: str | bytes) -> None:
        """A message from an open connection (in its order; its frames were rate-limited as they were
        read): to its lane if the application or the worker tier reads messages. A fanout.v1 client's
        frame is unwrapped first; its ``resume`` goes to the lane (only as its first frame), whatever else
        it sends that is not a v1 ``message`` closes it (1008)."""
        self.metrics.client_messages += 1
        if conn.v1:
            try:
                unwrapped = read_client_frame(message)
                if isinstance(unwrapped, Resume) and (conn.resumed or self.hub.continuity is None):
                    raise WebsocketError(CloseCode.POLICY_VIOLATION, "resume only as the first frame")
            except WebsocketError as error:
                conn.start_close(error.code, error.reason)
                return
            conn.resumed = True
            if isinstance(unwrapped, Resume):
                conn.queue(unwrapped)
                return
            message = unwrapped
        if self._on_message is not None or self._forwarder is not None:
            conn.queue(message)

    def lost(self, conn: C) -> None:
        """``conn``'s socket is closed (its lane then runs the close)."""
        self.live.discard(conn)
        self.hub.forget(conn)

    def start_lane(self, conn: C, admit: Admit | None, *, opening: bool) -> asyncio.Task[None]:
        """Run ``conn``'s lane: its opening (when ``opening``), then its messages in order, then its close
        once the socket is gone."""
        task = asyncio.create_task(self._lane(conn, admit, opening), name=f"lane {conn.client_id}")
        self._running.add(task)
        task.add_done_callback(self._running.discard)
        return task

    async def close_all(self, timeout: float) -> None:
        """Close every connection with 1001 (going away), and wait for their sockets to close (up to
        ``timeout`` and a second: the close handshake's own timeout ends them), then for their lanes to
        run their on_close hooks and close events (up to ``timeout``)."""
        for conn in list(self.live):
            conn.start_close(CloseCode.GOING_AWAY, "")
        if self.live:
            await asyncio.wait(
                [asyncio.ensure_future(conn.wait_closed()) for conn in list(self.live)], timeout=timeout + 1
            )
        if self._running:
            await asyncio.wait(list(self._running), timeout=timeout)

    async def _lane(self, conn: C, admit: Admit | None, opening: bool) -> None:
        try:
            if opening:
                await self._opened(conn, admit)
            while True:
                message = conn.next_message()
                if message is not None:
                    await self._message(conn, message)
                elif not conn.lane_done():
                    return  # idle: the next message starts another lane
                else:
                    break  # the socket is gone
        except Exception:  # a bug in the node: log it, close the client, keep serving
            log.exception("client %s: lane failed", conn.client_id)
            conn.start_close(CloseCode.INTERNAL_ERROR, "internal error")
            if not conn.lane_done():
                return
        await self._closed(conn)

    async def _opened(self, conn: C, admit: Admit | None) -> None:
        """Admission's identity, the welcome frame, the worker tier's open event, ``on_open``; a
        connection that cannot go on is closed (1013 identity not applied, 1011 ``on_open`` raised)."""
        if admit is not None and not await self._admit(conn, admit):
            return
        continuity = self.hub.continuity
        welcome = None
        if conn.v1 and continuity is not None:
            welcome = await continuity.welcome(conn)  # the positions of its streams, its resume token
        elif continuity is not None:
            await continuity.refresh(conn, cache=False)
        if welcome is None and self.welcome:
            welcome = encode_frame(b'{"type":"welcome","client_id":"%s"}' % conn.client_id.encode())
        if welcome is not None and conn.push(welcome):
            self.metrics.count_frames(1, len(welcome))
        if conn.v1 and continuity is not None:
            continuity.release(conn)  # what came during its admission: after the welcome
        if continuity is not None:
            await continuity.send_cached(conn, conn.streams)  # cache targets' latest, after the welcome
        if self.events is not None:
            conn.forwarded = True
            if conn.token is not None:  # it may resume: the open event waits for its first frame (OPEN_WAIT)
                self._unopened[conn] = asyncio.get_running_loop().call_later(
                    OPEN_WAIT, self._open, conn, None
                )
            else:
                self.events.opened(conn)
        if not await self.call_app("on_open", conn):
            conn.start_close(CloseCode.INTERNAL_ERROR, "application error")

    async def _admit(self, conn: C, admit: Admit) -> bool:
        """Apply the identity ``on_connect`` gave: session, flag, groups (subscriptions confirmed)."""
        hub, table = self.hub, self.hub.table
        if admit.session is not None:
            table.sessions[conn.client_id] = dict(admit.session)
        try:
            if admit.flag is not None:
                await hub.apply_change(table.bind(conn.client_id, admit.flag))
            if admit.groups:
                await hub.apply_change(table.join(conn.client_id, tuple(admit.groups)))
        except FanoutError as exc:
            log.warning("client %s: admission identity not applied: %s", conn.client_id, exc)
            conn.start_close(CloseCode.TRY_AGAIN_LATER, "try again later")
            return False
        return True

    def _open(self, conn: C, resumed_from: str | None) -> None:
        """The worker tier's open event of a connection whose open event waited (see OPEN_WAIT)."""
        waiting = self._unopened.pop(conn, None)
        if waiting is not None and self.events is not None:
            waiting.cancel()
            self.events.opened(conn, resumed_from)

    async def _message(self, conn: C, data: str | bytes | Resume) -> None:
        if isinstance(data, Resume):
            waiting = self._unopened.get(conn)
            if waiting is not None:
                waiting.cancel()
            if self.hub.continuity is not None:
                resumed_from = await self.hub.continuity.resume(conn, data, self._restore)
                self._open(conn, resumed_from)
            return
        self._open(conn, None)
        forwarder = self._forwarder
        if forwarder is not None:
            if not forwarder.has_room(conn):
                if forwarder.policy == "close":
                    self.metrics.events_policy_closes += 1
                    conn.start_close(CloseCode.TRY_AGAIN_LATER, "try again later")
                    return
                await forwarder.wait_room(conn)  # pause: meanwhile its lane fills and reading stops
            forwarder.message(conn, data)
        if self._on_message is not None:
            await self.call_app("on_message", conn, data)

    async def _restore(self, conn: C, state: dict[str, Any]) -> None:
        """A resume's record: the old connection's groups, flag and session (admission's keys win)."""
        hub, table = self.hub, self.hub.table
        session = table.sessions.get(conn.client_id)
        if session is not None and isinstance(state.get("s"), dict):
            table.sessions[conn.client_id] = {**state["s"], **session}
        groups = [g for g in state.get("g") or () if isinstance(g, str)]  # its flag is the same (claimed so)
        if groups:
            await hub.apply_change(table.join(conn.client_id, groups))
        old = state.get("c")
        if isinstance(old, str) and old != conn.client_id:  # if it is still open somewhere, it goes
            hub.spawn(hub.util.close(old, 1000, "resumed elsewhere", wait=False), "close resumed")

    async def _closed(self, conn: C) -> None:
        self._open(conn, None)
        self.hub.forget(conn)
        self.metrics.connections_closed += 1
        if conn.forwarded and self.events is not None:
            self.events.closed(conn, conn.close_code, conn.close_reason)
        await self.call_app("on_close", conn)

    async def call_app(self, hook: str, *args: Any) -> bool:
        """Run an application hook; False if it raised (logged and counted: an app bug must not take
        the node down)."""
        method = getattr(self.app, hook, None)
        if method is None:
            return True
        try:
            await call_hook(method, *args)
        except Exception:
            self.metrics.app_errors += 1
            log.exception("application hook %s failed", hook)
            return False
        return True
