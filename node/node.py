"""The websocket node: holds client connections and applies the commands it receives from the bus.

Run it with ``python -m node`` or ``fanout-node`` (configured by the FANOUT_* environment variables, see
the README), or embed it: ``node = Node(settings, NodeOptions(port=0)); await node.start()``.

Who owns what: the :class:`~fanout.table.ConnectionTable` owns membership and sessions (and answers
queries), each :class:`~node.connection.Connection` owns its output, the
:class:`~fanout.receive.Receiver` turns bus bytes into commands to apply, and :mod:`node.http` answers
HTTP requests and decides who may open a websocket. The node ties them together.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import socket
import time
from collections.abc import Coroutine, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from fanout import events as events_module
from fanout import naming, protocol
from fanout.admission import Admit, ConnectRequest
from fanout.backends import create_backend, create_event_log
from fanout.commands import (
    Bind,
    Bye,
    Close,
    CloseGuests,
    Command,
    DissolveGroup,
    Heartbeat,
    JoinGroup,
    Json,
    LeaveGroup,
    NodeInfo,
    PresenceChange,
    PresenceSnapshot,
    Query,
    QueryKind,
    Reply,
    Send,
    SendBulk,
    SetSession,
    TargetKind,
    Unbind,
)
from fanout.commands import (
    Request as BusRequest,
)
from fanout.config import Settings, env_flag, env_number, validate_name
from fanout.events import EventKind
from fanout.exceptions import ConfigError, FanoutError, MessageTooLarge
from fanout.ids import ClientIds, instance_id
from fanout.loading import load_app
from fanout.presence import compile_patterns
from fanout.receive import Receiver
from fanout.serverutil import ServerUtil
from fanout.table import Change, ConnectionTable

from .api import Api
from .app import DemoChat, call_hook
from .connection import CLOSE_TIMEOUT, Connection
from .events import POLICIES, EventForwarder
from .frames import CloseCode, Opcode, encode_control, encode_frame
from .http import HttpConnection, HttpSide
from .metrics import Metrics
from .presence import Presence

log = logging.getLogger("fanout.node")

#: most items (list entries, object keys) in one reply: a bigger answer goes in several (see _pages)
REPLY_PAGE = 5000


def _pages(result: Json) -> list[Json]:
    """A large list or object answer cut into pages of REPLY_PAGE items, so that no reply approaches the
    broker's or FANOUT_MAX_MESSAGE's limit (the publisher puts them back together)."""
    if isinstance(result, list) and len(result) > REPLY_PAGE:
        return [result[i : i + REPLY_PAGE] for i in range(0, len(result), REPLY_PAGE)]
    if isinstance(result, dict) and len(result) > REPLY_PAGE:
        items = list(result.items())
        return [dict(items[i : i + REPLY_PAGE]) for i in range(0, len(items), REPLY_PAGE)]
    return [result]


def default_node_id() -> str:
    """``<hostname>-<pid>``, made of the characters a node id may have."""
    host = re.sub(r"[^A-Za-z0-9_.\-]", "-", socket.gethostname())[:40] or "node"
    return f"{host}-{os.getpid()}"


def _origins(raw: str) -> frozenset[str] | None:
    items = frozenset(o.strip().rstrip("/") for o in raw.split(",") if o.strip())
    if not items or "*" in items:
        return None
    for origin in items:
        if "://" not in origin:
            raise ConfigError(
                "FANOUT_ALLOWED_ORIGINS", f"{origin!r} is not an origin (scheme://host[:port]) or '*'"
            )
    return items


def _write_delay(env: Mapping[str, str]) -> float:
    """FANOUT_WRITE_DELAY in seconds; at most 0.1 (beyond that it is a latency bug, not coalescing)."""
    delay = env_number(env, "FANOUT_WRITE_DELAY", 0.001, float)
    if delay > 0.1:
        raise ConfigError("FANOUT_WRITE_DELAY", f"{delay:g} s is more than 0.1 s")
    return delay


def _policy(raw: str) -> str:
    value = raw.strip().lower()
    if value not in POLICIES:
        raise ConfigError("FANOUT_EVENTS_POLICY", f"{raw!r} is not one of {', '.join(map(repr, POLICIES))}")
    return value


@dataclass(frozen=True, slots=True)
class NodeOptions:
    """How one node serves its clients."""

    # -- identity and listening
    node_id: str = ""  #: stable name for logs/metrics; generated (host-pid) when empty
    host: str = "127.0.0.1"
    port: int = 8765
    reuse_port: bool = False  #: SO_REUSEPORT: several node processes share the port (``--processes``)
    # -- application
    app: str = ""  #: "module:attr"; the demo chat when empty
    welcome: bool = True  #: send {"type":"welcome","client_id":...} on connect
    compression: bool = True  #: accept permessage-deflate offers (node/deflate.py)
    # -- admission
    allowed_origins: frozenset[str] | None = None  #: browser origins accepted; None = any
    accept_rate: float = 500.0  #: new connections per second (bursts of as many); 0 = no limit
    handshake_timeout: float = 10.0  #: seconds a client has to complete the opening handshake
    # -- limits
    max_frame: int = 1024 * 1024  #: biggest frame a client may send; bigger ones close with 1009
    send_buffer: int = 1024 * 1024  #: bytes a connection may have waiting; over that it is cut off
    max_connections: int = 0  #: 0 = unlimited; over the limit, handshakes get HTTP 503
    client_rate: float = 100.0  #: frames per second from one client (bursts of twice); 0 = no limit
    #: seconds frames from the bus may wait so that later ones share their socket write; 0 = write at once
    write_delay: float = 0.001
    # -- the HTTP API
    api_key: str | None = field(default=None, repr=False)  #: turns the API on; its bearer key
    api_max_body: int = 1 << 20  #: biggest API request body, bytes (bigger: 413)
    # -- presence
    presence: str = ""  #: group-name patterns with presence (comma list, * = any run)
    presence_debounce: float = 3.0  #: seconds a flag must stay away from a group before its leave
    # -- the worker tier
    events: frozenset[EventKind] = frozenset()  #: client events forwarded to business workers
    event_shards: int = events_module.DEFAULT_SHARDS  #: shards the events are spread over
    events_backlog: int = 10_000  #: events one shard may hold waiting for workers
    events_policy: str = "pause"  #: what a client whose shard is full meets: "pause" or "close"
    # -- keepalive
    ping_interval: float = 20.0
    ping_timeout: float = 20.0

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> NodeOptions:
        env = os.environ if environ is None else environ
        port = env_number(env, "FANOUT_PORT", 8765, int)
        if port > 65535:
            raise ConfigError("FANOUT_PORT", f"{port} is not a TCP port (0-65535)")
        return cls(
            node_id=validate_name(env["FANOUT_NODE_ID"], "FANOUT_NODE_ID")
            if env.get("FANOUT_NODE_ID")
            else "",
            host=env.get("FANOUT_HOST") or "127.0.0.1",
            port=port,
            app=env.get("FANOUT_APP", ""),
            welcome=env_flag(env, "FANOUT_WELCOME", True),
            compression=env_flag(env, "FANOUT_COMPRESSION", True),
            allowed_origins=_origins(env.get("FANOUT_ALLOWED_ORIGINS") or "*"),
            accept_rate=env_number(env, "FANOUT_ACCEPT_RATE", 500.0, float),
            handshake_timeout=env_number(env, "FANOUT_HANDSHAKE_TIMEOUT", 10.0, float, positive=True),
            max_frame=env_number(env, "FANOUT_MAX_FRAME", 1024 * 1024, int),
            send_buffer=env_number(env, "FANOUT_SEND_BUFFER", 1024 * 1024, int),
            max_connections=env_number(env, "FANOUT_MAX_CONNECTIONS", 0, int),
            client_rate=env_number(env, "FANOUT_CLIENT_RATE", 100.0, float),
            write_delay=_write_delay(env),
            api_key=env.get("FANOUT_API_KEY") or None,
            api_max_body=env_number(env, "FANOUT_API_MAX_BODY", 1 << 20, int, positive=True),
            presence=env.get("FANOUT_PRESENCE", ""),
            presence_debounce=env_number(env, "FANOUT_PRESENCE_DEBOUNCE", 3.0, float),
            events=events_module.parse_kinds(env.get("FANOUT_EVENTS", "")),
            event_shards=env_number(
                env, "FANOUT_EVENT_SHARDS", events_module.DEFAULT_SHARDS, int, positive=True
            ),
            events_backlog=env_number(env, "FANOUT_EVENTS_BACKLOG", 10_000, int, positive=True),
            events_policy=_policy(env.get("FANOUT_EVENTS_POLICY") or "pause"),
            ping_interval=env_number(env, "FANOUT_PING_INTERVAL", 20.0, float),
            ping_timeout=env_number(env, "FANOUT_PING_TIMEOUT", 20.0, float),
        )


def _acknowledged(command: Command) -> bool:
    """Whether the publisher waits for this command's count of connections reached (``ack=True``)."""
    return isinstance(command, Send | Close | SendBulk | CloseGuests) and command.request is not None


#: most bus messages applied as one batch
MAX_BATCH = 5000

#: the keepalive ping (any pong answers it)
_PING = encode_control(Opcode.PING, b"fanout")


class Node:
    """One websocket node: its connections, its table, its link to the bus."""

    def __init__(
        self, settings: Settings, options: NodeOptions | None = None, app: object | None = None
    ) -> None:
        options = options or NodeOptions()
        if not options.node_id:
            options = replace(options, node_id=default_node_id())
        self.settings = settings
        self.options = options
        self.app: Any = app if app is not None else (load_app(options.app) if options.app else DemoChat())
        self.instance = instance_id(options.node_id)
        self.table: ConnectionTable[Connection] = ConnectionTable(self.instance, settings.mode)
        self.backend = create_backend(settings, inbox=self.instance)
        self.encoder = protocol.Encoder(self.instance, settings.namespace, settings.secret)
        self.util = ServerUtil.attached(settings, self.backend, self.instance, self.encoder)
        self.metrics = Metrics()
        self.receiver = Receiver(
            secret=settings.secret,
            namespace=settings.namespace,
            max_message=settings.max_message,
            replay_window=settings.replay_window,
        )
        # the receiver counts into the node's metrics directly
        self.receiver.dropped = self.metrics.dropped
        self.receiver.lag = self.metrics.lag
        #: the worker tier: forwards client events (FANOUT_EVENTS), or None
        self.events: EventForwarder | None = None
        if options.events:
            event_log = create_event_log(
                settings, shards=options.event_shards, backlog=options.events_backlog, node=self.instance
            )
            self.events = EventForwarder(self, options.events, event_log, policy=options.events_policy)
        self.api = Api(self.util, options.api_key)
        patterns = compile_patterns(options.presence)
        #: presence for the groups FANOUT_PRESENCE names, or None
        self.presence = Presence(self, patterns, options.presence_debounce) if patterns else None
        self.http = HttpSide(self)
        self.started_at = time.time()
        self._client_ids = ClientIds(self.instance)
        self._server: asyncio.Server | None = None
        #: False until the node listens, and again once it stops (handshakes then get 503)
        self.serving = False
        #: sockets still in their HTTP request / handshake, and connections whose socket is open
        self.handshaking: set[HttpConnection] = set()
        self.live: set[Connection] = set()
        #: bytes a client may send before its websocket is open: the request, and whatever frames a
        #: client may send right after it (up to one big frame)
        self.early_limit = options.max_frame + 64 * 1024
        self._lanes: set[asyncio.Task[None]] = set()  #: the connections' lanes running now
        self._on_message = getattr(self.app, "on_message", None)
        #: the worker tier when it takes message events, else None
        self._forwarder = self.events if self.events and EventKind.MESSAGE in self.events.kinds else None
        self._keepalive_task: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._subscription_lock = asyncio.Lock()
        self._arrived: list[bytes] = []  #: bus messages received and not applied yet
        self._collecting_since = 0.0  #: loop time the first of them arrived
        #: True while a batch of commands is applied: connections hold their frames (Connection.push)
        self.batching = False
        #: connections holding frames of the current batch, flushed when it ends
        self.dirty: list[Connection] = []
        self._flush_timer: asyncio.TimerHandle | None = None  #: the end of the write delay, when waiting
        self._last_batch_at = -1e9  #: loop time the last batch of bus commands was applied
        self._heartbeat_task: asyncio.Task[None] | None = None
        self._register_gauges()

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Connect to the bus, subscribe, and start serving. Raises BackendUnavailable."""
        self.backend.on_reconnect.append(self._on_reconnect)
        await self.backend.connect(self._on_bus_message)
        await self.backend.subscribe(self.table.wanted())
        if self.events is not None:
            await self.events.start()
        if self.presence is not None:
            await self.presence.start()
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: HttpConnection(self),
            self.options.host,
            self.options.port,
            reuse_port=self.options.reuse_port or None,
            backlog=1024,
        )
        self.serving = True
        if self.options.ping_interval > 0:
            self._keepalive_task = asyncio.create_task(self._keepalive(), name="keepalive")
        self._heartbeat_task = asyncio.create_task(self._heartbeats(), name="heartbeats")
        await self._call_app("on_start", self)
        log.info(
            "node %s (%s) listening on %s:%d, backend %s",
            self.options.node_id,
            self.instance,
            self.options.host,
            self.port,
            self.backend.describe(),
        )

    @property
    def port(self) -> int:
        """The port actually bound (useful with port 0)."""
        if self._server is None:
            return self.options.port
        return int(next(iter(self._server.sockets)).getsockname()[1])

    async def stop(self) -> None:
        """Stop accepting, close clients with 1001, say goodbye on the bus, leave it."""
        await self._call_app("on_stop", self)
        if self.presence is not None:
            await self.presence.stop()
        if self._heartbeat_task is not None:
            self._heartbeat_task.cancel()
        self.flush_dirty()
        self.serving = False
        if self._keepalive_task is not None:
            self._keepalive_task.cancel()
        if self._server is not None:
            self._server.close()  # no new connections
            for waiting in list(self.handshaking):
                waiting.abort()
            for conn in list(self.live):
                conn.start_close(CloseCode.GOING_AWAY, "")
            if self.live:
                await asyncio.wait(
                    [asyncio.ensure_future(conn.wait_closed()) for conn in list(self.live)],
                    timeout=CLOSE_TIMEOUT + 1,
                )
            if self._lanes:  # their on_close hooks and close events
                await asyncio.wait(list(self._lanes), timeout=CLOSE_TIMEOUT)
            # (uvloop's waits for every accepted socket: an API request still being answered, say)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), CLOSE_TIMEOUT)
        if self.events is not None:  # the close events of the clients just closed go out first
            await self.events.stop()
        if self.backend.healthy:  # with the broker gone the goodbye cannot go: the heartbeats' end tells
            with contextlib.suppress(FanoutError):
                await self.backend.publish(naming.HEARTBEAT, self._encode(Bye(self.instance)))
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.backend.close()

    def spawn(self, coroutine: Coroutine[Any, Any, Any], name: str) -> None:
        """Run ``coroutine`` in the background, supervised: failures are logged, never silent."""
        task = asyncio.create_task(coroutine, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("task %s failed", task.get_name(), exc_info=task.exception())

    def info(self) -> NodeInfo:
        return NodeInfo(
            instance=self.instance,
            node_id=self.options.node_id,
            connections=len(self.table),
            ttl=3 * self.settings.heartbeat_interval,
            started_at=self.started_at,
            host=self.options.host,
            port=self.port,
            mode=self.settings.mode.value,
            signed=self.settings.secret is not None,
            extra={
                "healthy": self.backend.healthy,
                # the workers compare their FANOUT_EVENT_SHARDS with it
                **({"event_shards": self.events.shards} if self.events is not None else {}),
            },
        )

    async def _heartbeats(self) -> None:
        while True:
            try:
                await self.backend.publish(naming.HEARTBEAT, self._encode(Heartbeat(self.info())))
            except FanoutError as exc:  # the backend is down: /healthz shows it; keep trying
                log.debug("heartbeat not published: %s", exc)
            await asyncio.sleep(self.settings.heartbeat_interval)

    async def _on_reconnect(self) -> None:
        await self._call_app("on_reconnect", self)

    # ------------------------------------------------------------------ websocket side

    def opened(
        self,
        transport: asyncio.Transport,
        request: ConnectRequest,
        admit: Admit | None,
        early: bytes,
        deflate: int = 0,
    ) -> None:
        """A handshake's 101 is written: the socket is a :class:`Connection` from now on. ``early`` is
        what the client sent after its request (its first frames); ``deflate`` the window bits of its
        permessage-deflate (0: none)."""
        conn = Connection(self, transport, self._client_ids.next(), request, deflate)
        transport.set_protocol(conn)
        self.table.add(conn.client_id, conn)
        self.live.add(conn)
        self.metrics.connections_opened += 1
        conn.begin(admit)
        if early:
            conn.data_received(early)

    def received(self, conn: Connection, message: str | bytes) -> None:
        """A message from an open connection (in its order; its frames were rate-limited as they were
        read): to its lane if the application or the worker tier reads messages."""
        self.metrics.client_messages += 1
        if self._on_message is not None or self._forwarder is not None:
            conn.queue(message)

    def lost(self, conn: Connection) -> None:
        """``conn``'s socket is closed (its lane then runs the close)."""
        self.live.discard(conn)
        self.forget(conn)

    def start_lane(self, conn: Connection, admit: Admit | None, *, opening: bool) -> asyncio.Task[None]:
        """Run ``conn``'s lane: its opening (when ``opening``), then its messages in order, then its close
        once the socket is gone."""
        task = asyncio.create_task(self._lane(conn, admit, opening), name=f"lane {conn.client_id}")
        self._lanes.add(task)
        task.add_done_callback(self._lanes.discard)
        return task

    async def _lane(self, conn: Connection, admit: Admit | None, opening: bool) -> None:
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

    async def _opened(self, conn: Connection, admit: Admit | None) -> None:
        """Admission's identity, the welcome frame, the worker tier's open event, ``on_open``; a
        connection that cannot go on is closed (1013 identity not applied, 1011 ``on_open`` raised)."""
        if admit is not None and not await self._admit(conn, admit):
            return
        if self.options.welcome:
            welcome = encode_frame(b'{"type":"welcome","client_id":"%s"}' % conn.client_id.encode())
            if conn.push(welcome):
                self.metrics.count_frames(1, len(welcome))
        if self.events is not None:
            self.events.opened(conn)
            conn.forwarded = True
        if not await self._call_app("on_open", conn):
            conn.start_close(CloseCode.INTERNAL_ERROR, "application error")

    async def _admit(self, conn: Connection, admit: Admit) -> bool:
        """Apply the identity ``on_connect`` gave: session, flag, groups (subscriptions confirmed)."""
        table = self.table
        if admit.session is not None:
            table.sessions[conn.client_id] = dict(admit.session)
        try:
            if admit.flag is not None:
                await self.apply_change(table.bind(conn.client_id, admit.flag))
            if admit.groups:
                await self.apply_change(table.join(conn.client_id, tuple(admit.groups)))
        except FanoutError as exc:
            log.warning("client %s: admission identity not applied: %s", conn.client_id, exc)
            conn.start_close(CloseCode.TRY_AGAIN_LATER, "try again later")
            return False
        return True

    async def _message(self, conn: Connection, data: str | bytes) -> None:
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
            await self._call_app("on_message", conn, data)

    async def _closed(self, conn: Connection) -> None:
        self.forget(conn)
        self.metrics.connections_closed += 1
        if conn.forwarded and self.events is not None:
            self.events.closed(conn, conn.close_code, conn.close_reason)
        await self._call_app("on_close", conn)

    async def _keepalive(self) -> None:
        """Every FANOUT_PING_INTERVAL, a ping to each open connection; one not answered within
        FANOUT_PING_TIMEOUT fails with 1011 (one task for the node, not one per connection)."""
        interval, timeout = self.options.ping_interval, self.options.ping_timeout
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(interval)
            now = loop.time()
            for conn in list(self.live):
                conn.keepalive(now, _PING, timeout > 0)
            if timeout > 0:
                loop.call_later(timeout, self._pongs_overdue, now)

    def _pongs_overdue(self, sent_by: float) -> None:
        for conn in list(self.live):
            conn.pong_overdue(sent_by)

    def forget(self, conn: Connection) -> None:
        """Take ``conn`` out of the table (idempotent) and drop subscriptions nobody needs now."""
        if self.table.get(conn.client_id) is conn:
            conn.keep_last_state()
            change = self.table.remove(conn.client_id)
            if not change.empty:
                self.spawn(self.apply_change(change), "unsubscribe")

    async def _call_app(self, hook: str, *args: Any) -> bool:
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

    # ------------------------------------------------------------------ bus side

    def _encode(self, command: Command) -> bytes:
        return self.encoder.encode(command, time.time())

    def _on_bus_message(self, raw: bytes) -> None:
        # Collect what arrives within one loop iteration and apply it together, each publisher's
        # commands in their order: over several connections (Redis Cluster shards) two commands that
        # arrive together can be read in either order.
        self._arrived.append(raw)
        if len(self._arrived) == 1:
            loop = asyncio.get_running_loop()
            self._collecting_since = loop.time()
            loop.call_soon(self._collect, 1)

    def _collect(self, seen: int) -> None:
        """Apply what arrived, or, while it keeps arriving (a backlog handed over a few messages per loop
        pass, as aiormq does with one task per delivery), wait another pass: within the write delay and
        up to MAX_BATCH messages. A lone command costs one more pass; a backlog becomes one batch."""
        arrived = len(self._arrived)
        if (
            arrived > seen
            and arrived < MAX_BATCH
            and asyncio.get_running_loop().time() - self._collecting_since < self.options.write_delay
        ):
            asyncio.get_running_loop().call_soon(self._collect, arrived)
            return
        self._apply_arrived()

    def _apply_arrived(self) -> None:
        batch, self._arrived = self._arrived, []
        commands = self.receiver.take(batch, time.time())
        metrics = self.metrics
        metrics.bus_batches += 1
        metrics.bus_batch_commands += len(commands)
        # several commands: connections hold their frames and write them in one go at the end; in a burst
        # (the previous batch less than the write delay ago) they hold them for the write delay, so that
        # the next batches' frames share the write. A command after a quiet spell is written at once.
        delay = self.options.write_delay
        now = asyncio.get_running_loop().time()
        burst = now - self._last_batch_at < delay
        self._last_batch_at = now
        self.batching = burst or len(commands) > 1
        frames_before = metrics.frames_sent
        try:
            for command in commands:
                try:
                    self._apply(command)
                except Exception:  # a command that breaks the node's logic is a bug: log it, keep serving
                    metrics.dropped["error"] += 1
                    log.exception("applying %r failed", command)
        finally:
            if not self.batching:
                metrics.delivery_writes += metrics.frames_sent - frames_before
            else:
                self.batching = False
                # a reply that says "reached N" must not go out before the frames: an acknowledged
                # command is written now, with whatever was held before it
                if not burst or any(_acknowledged(command) for command in commands):
                    self.flush_dirty()
                elif self.dirty and self._flush_timer is None:
                    self._flush_timer = asyncio.get_running_loop().call_later(delay, self.flush_dirty)

    def flush_dirty(self) -> None:
        """Write what the connections hold from the bus (the end of a batch, or of the write delay)."""
        if self._flush_timer is not None:
            self._flush_timer.cancel()
            self._flush_timer = None
        dirty, self.dirty = self.dirty, []
        self.metrics.delivery_writes += len(dirty)
        for conn in dirty:
            conn.flush()

    def _apply(self, command: Command) -> None:
        match command:
            case Send():
                self.metrics.commands["send"] += 1
                reached = self._deliver(command)
                self._reply(command.request, reached)
            case Close():
                self.metrics.commands["close"] += 1
                conns = self.table.resolve(command.target, command.exclude)
                self._close_all(conns, command.code, command.reason, command.last, command.binary)
                self._reply(command.request, len(conns))
            case SendBulk():
                self.metrics.commands["bulk"] += 1
                self._reply(command.request, self._deliver_bulk(command))
            case CloseGuests():
                self.metrics.commands["close_guests"] += 1
                now = time.monotonic()
                guests = [
                    conn
                    for cid, conn in self.table.connections.items()
                    if self.table.flag_of(cid) is None and now - conn.opened_at > command.older_than
                ]
                self._close_all(guests, command.code, command.reason, command.last, command.binary)
                self._reply(command.request, len(guests))
            case Reply() | Heartbeat() | Bye():
                self.util.handle(command)
            case PresenceSnapshot() | PresenceChange():
                if self.presence is not None:
                    self.presence.heard(command)
            case Query():
                self.metrics.commands["query"] += 1
                self._answer(command)
            case DissolveGroup():
                self.metrics.commands["dissolve"] += 1
                members = len(self.table.group_members(command.group))
                self._change_then_reply(self.table.dissolve(command.group), command.request, members)
            case JoinGroup() | LeaveGroup() | Bind() | Unbind() | SetSession():
                self._membership(command)

    def _close_all(
        self, conns: list[Connection], code: int, reason: str, last: bytes | None, binary: bool
    ) -> None:
        """Close ``conns``, each after ``last`` (its last frame) when there is one."""
        frame = None if last is None else encode_frame(last, binary)
        for conn in conns:
            if frame is not None and conn.push(frame):
                self.metrics.count_frames(1, len(frame))
            conn.start_close(code, reason)

    def _deliver_bulk(self, command: SendBulk) -> int:
        """Each item's payload to the connections it names (a client id, or every holder of a flag)."""
        table, reached = self.table, 0
        clients = command.kind is TargetKind.CLIENTS
        for name, payload, binary in command.items:
            conns = (
                [c for c in (table.get(name),) if c is not None]
                if clients
                else [c for cid in table.flag_holders(name) if (c := table.get(cid)) is not None]
            )
            if not conns:
                continue
            frame = encode_frame(payload, binary)
            for conn in conns:
                if conn.push(frame):
                    reached += 1
                    self.metrics.count_frames(1, len(frame))
        return reached

    def _deliver(self, command: Send) -> int:
        conns = self.table.resolve(command.target, command.exclude)
        if not conns:
            return 0
        frame = encode_frame(command.payload, command.binary)
        reached = 0
        for conn in conns:
            if conn.push(frame):
                reached += 1
        self.metrics.count_frames(reached, reached * len(frame))
        return reached

    def _membership(self, command: JoinGroup | LeaveGroup | Bind | Unbind | SetSession) -> None:
        table = self.table
        if not table.owns(command.client_id):
            return  # fanout mode: every node hears it, only the owner applies and answers
        change: Change
        match command:
            case JoinGroup():
                change = table.join(command.client_id, command.groups)
            case LeaveGroup():
                change = table.leave(command.client_id, command.groups)
            case Bind():
                if not command.replace and table.flag_of(command.client_id) is not None:
                    self.metrics.commands["bind"] += 1
                    self._reply(command.request, False)  # bind only if it has no flag: it has one
                    return
                change = table.bind(command.client_id, command.flag)
                self._flag_changed(command.client_id, change)
            case Unbind():
                change = table.unbind(command.client_id)
                self._flag_changed(command.client_id, change)
            case SetSession():
                session = table.sessions.get(command.client_id)
                if session is not None:
                    if not command.merge:
                        session.clear()
                    session.update(command.data)
                    conn = table.get(command.client_id)
                    if conn is not None:
                        conn.session_version += 1
                change = Change(session is not None)
        self.metrics.commands[type(command).__name__.lower()] += 1
        self._change_then_reply(change, command.request, change.found)

    def _flag_changed(self, client_id: str, change: Change) -> None:
        conn = self.table.get(client_id)
        if change.found and conn is not None:
            self.flag_changed(conn)

    def flag_changed(self, conn: Connection) -> None:
        """A connection's flag changed: the worker tier's roster follows (a lost node's closes carry it)."""
        if self.events is not None:
            self.events.flag_changed(conn)

    def _change_then_reply(self, change: Change, request: BusRequest | None, result: Json) -> None:
        if change.empty:
            self._reply(request, result)
            return

        async def apply_then_reply() -> None:
            try:
                await self.apply_change(change)
            except FanoutError as exc:  # the broker refused the subscription: the caller must know
                log.warning("membership change not applied on the broker: %s", exc)
                await self._send_reply(request, error=exc)
                return
            await self._send_reply(request, result)

        self.spawn(apply_then_reply(), "membership")

    async def apply_change(self, change: Change) -> None:
        """(Un)subscribe as a membership change requires; changes are applied in the order made."""
        if change.empty:
            return
        async with self._subscription_lock:
            if change.subscribe:
                await self.backend.subscribe(change.subscribe)
            if change.unsubscribe:
                await self.backend.unsubscribe(change.unsubscribe)

    def _answer(self, query: Query) -> None:
        if not self.table.answers(query.kind, query.arg):
            return  # only the owning node answers about one connection
        if query.kind is QueryKind.NODE:
            self._reply(query.request, self.info().record())
        else:
            self._reply(query.request, self.table.answer(query.kind, query.arg, query.args))

    def _reply(self, request: BusRequest | None, result: Json) -> None:
        if request is not None:
            self.spawn(self._send_reply(request, result), "reply")

    async def _send_reply(
        self, request: BusRequest | None, result: Json = None, error: FanoutError | None = None
    ) -> None:
        if request is None:
            return
        parts = _pages(result) if error is None else [result]
        messages = [
            self._encode_reply(request, part, error, index, len(parts)) for index, part in enumerate(parts)
        ]
        try:
            await self.backend.publish_many([(naming.inbox(request.reply_to), m) for m in messages])
        except FanoutError as exc:  # the requester will time out and name this node; count it here
            self.metrics.reply_failures += 1
            log.warning("reply to %s not published: %s", request.reply_to, exc)

    def _encode_reply(
        self, request: BusRequest, result: Json, error: FanoutError | None, part: int = 0, parts: int = 1
    ) -> bytes:
        """The reply, or, if the answer cannot travel (too deep, too big), an error saying why."""
        if error is None:
            try:
                message = self._encode(Reply(request.id, self.instance, result, None, part, parts))
            except FanoutError as exc:
                error = exc
            else:
                if len(message) <= self.settings.max_message:
                    return message
                error = MessageTooLarge(
                    f"the answer is {len(message)} bytes, more than FANOUT_MAX_MESSAGE "
                    f"({self.settings.max_message})"
                )
        detail = (type(error).__name__, str(error))
        return self._encode(Reply(request.id, self.instance, None, detail))

    def _register_gauges(self) -> None:
        m, b = self.metrics, self.backend
        m.gauge("fanout_connections", "Open websocket connections.", lambda: len(self.table))
        m.gauge("fanout_groups", "Groups with a local member.", lambda: len(self.table.group_names()))
        m.gauge("fanout_backend_up", "1 while the backend subscription is live.", lambda: float(b.healthy))
        m.gauge(
            "fanout_backend_subscriptions",
            "Addresses subscribed on the backend.",
            lambda: len(b.subscriptions),
        )
        m.gauge("fanout_backend_reconnects_total", "Successful backend reconnections.", lambda: b.reconnects)
        m.gauge("fanout_backend_outages_total", "Backend link losses.", lambda: b.outages)
        if self.events is not None:
            ev = self.events
            m.gauge(
                "fanout_events_waiting", "Client events not yet taken by the broker.", lambda: ev.waiting()
            )
            m.gauge("fanout_events_full_shards", "Event shards at their backlog bound now.", ev.full_shards)
            m.gauge(
                "fanout_events_paused_clients",
                "Clients paused because their events cannot go.",
                lambda: ev.paused,
            )
            m.gauge(
                "fanout_events_backlog_full_total",
                "Times an event shard was found full (or the broker away) and the policy applied.",
                lambda: ev.policy_applied,
            )
            m.labelled(
                "fanout_events_forwarded",
                "Client events handed to the worker tier, by kind.",
                "kind",
                ev.forwarded,
            )
        if self.presence is not None:
            m.labelled(
                "fanout_presence_announced",
                "Presence transitions this node announced (as the leader), by change.",
                "change",
                self.presence.announced,
            )
        m.gauge(
            "fanout_replay_senders",
            "Signing senders whose recent message counts the node remembers (replay guard).",
            lambda: len(self.receiver.guard),
        )
