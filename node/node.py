"""The websocket node: builds its parts and wires them, starts and stops them.

Run it with ``python -m node`` or ``fanout-node`` (configured by the FANOUT_* environment variables, see
the README), or embed it: ``node = Node(settings, NodeOptions(port=0)); await node.start()``.

Who owns what: the :class:`~fanout.table.ConnectionTable` owns membership and sessions (and answers
queries); the :class:`~node.hub.Hub` applies what the :class:`~fanout.receive.Receiver` takes from the bus
(delivery, batching and the write delay, replies); the :class:`~node.lanes.Lanes` run each connection's
messages and the application's hooks in order; each :class:`~node.connection.Connection` owns its
output; :mod:`node.http` answers HTTP requests and decides who may open a websocket. The node builds them,
hands each what it uses, and runs what is the node's own: start and stop, the heartbeats, the keepalive.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import replace
from typing import Any

from fanout import history_api, naming, protocol
from fanout.admission import Admit, ConnectRequest
from fanout.backends import create_backend, create_event_log, create_store
from fanout.commands import Bye, Command, Heartbeat, NodeInfo
from fanout.config import Settings
from fanout.exceptions import FanoutError
from fanout.ids import ClientIds, instance_id
from fanout.loading import load_app
from fanout.presence import compile_patterns
from fanout.receive import Receiver
from fanout.serverutil import ServerUtil
from fanout.table import ConnectionTable

from .api import Api
from .app import DemoChat
from .connection import CLOSE_TIMEOUT, Connection
from .continuity import Continuity
from .events import EventForwarder
from .frames import Opcode, encode_control
from .http import HttpConnection
from .hub import Hub
from .lanes import Lanes
from .metrics import Metrics
from .options import NodeOptions, default_node_id
from .presence import Presence
from .routes import HttpSide

log = logging.getLogger("fanout.node")

#: the keepalive ping (any pong answers it)
_PING = encode_control(Opcode.PING, b"fanout")


class Node:
    """One websocket node: its connections, its hub and lanes, its link to the bus."""

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
        #: the continuity store (history, resume records), shared by the node's util and its continuity
        self.store = create_store(settings)
        self.util = ServerUtil.attached(settings, self.backend, self.instance, self.encoder, self.store)
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
        self.started_at = time.time()
        self._history = history_api.announced(settings)
        self.hub: Hub[Connection] = Hub(
            settings=settings,
            instance=self.instance,
            table=self.table,
            backend=self.backend,
            encoder=self.encoder,
            util=self.util,
            receiver=self.receiver,
            metrics=self.metrics,
            write_delay=options.write_delay,
            info=self.info,
            events=self.events,
            presence=self.presence,
        )
        #: history streams, fanout.v1 envelopes, resume and positioning (node/continuity.py)
        self.continuity = Continuity(
            settings,
            self.store,
            self.table,
            self.metrics,
            self.hub.spawn,
            self.hub.deliver,
        )
        self.hub.continuity = self.continuity
        self.lanes: Lanes[Connection] = Lanes(
            app=self.app, hub=self.hub, metrics=self.metrics, events=self.events, welcome=options.welcome
        )
        self.http = HttpSide(self)
        self._client_ids = ClientIds(self.instance)
        self._server: asyncio.Server | None = None
        #: False until the node listens, and again once it stops (handshakes then get 503)
        self.serving = False
        #: sockets still in their HTTP request / handshake
        self.handshaking: set[HttpConnection] = set()
        #: bytes a client may send before its websocket is open: the request, and whatever frames a
        #: client may send right after it (up to one big frame)
        self.early_limit = options.max_frame + 64 * 1024
        self._keepalive_task: asyncio.Task[None] | None = None
        self._heartbeat_task: asyncio.Task[None] | None = None
        self._register_gauges()

    @property
    def live(self) -> set[Connection]:
        """The connections whose socket is open (closing ones included)."""
        return self.lanes.live

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Connect to the bus, subscribe, and start serving. Raises BackendUnavailable."""
        self.backend.on_reconnect.append(self._on_reconnect)
        await self.backend.connect(self.hub.on_bus_message)
        await self.backend.subscribe(self.table.wanted())
        await self.continuity.start()
        if self.events is not None:
            await self.events.start()
        if self.presence is not None:
            await self.presence.start()
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: HttpConnection(self.http),
            self.options.host,
            self.options.port,
            reuse_port=self.options.reuse_port or None,
            backlog=1024,
        )
        self.serving = True
        if self.options.ping_interval > 0:
            self._keepalive_task = asyncio.create_task(self._keepalive(), name="keepalive")
        self._heartbeat_task = asyncio.create_task(self._heartbeats(), name="heartbeats")
        await self.lanes.call_app("on_start", self)
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
        await self.lanes.call_app("on_stop", self)
        if self.presence is not None:
            await self.presence.stop()
        if self._heartbeat_task is not None:
            self._heartbeat_task.cancel()
        self.hub.flush()
        self.serving = False
        if self._keepalive_task is not None:
            self._keepalive_task.cancel()
        if self._server is not None:
            self._server.close()  # no new connections
            for waiting in list(self.handshaking):
                waiting.abort()
            await self.lanes.close_all(CLOSE_TIMEOUT)  # their on_close hooks and close events too
            # (uvloop's waits for every accepted socket: an API request still being answered, say)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), CLOSE_TIMEOUT)
        if self.events is not None:  # the close events of the clients just closed go out first
            await self.events.stop()
        await self.continuity.stop()  # the resume records of the clients just closed are written first
        if self.backend.healthy:  # with the broker gone the goodbye cannot go: the heartbeats' end tells
            with contextlib.suppress(FanoutError):
                await self.backend.publish(naming.HEARTBEAT, self._encode(Bye(self.instance)))
        await self.hub.stop()
        await self.backend.close()

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
                # what a publisher's history settings must match (fanout.history_api)
                "history": self._history,
                # a keyed send is applied once within it; a publisher's must match (serverutil)
                "idempotency_window": self.settings.idempotency_window,
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
        self.hub.spawn(self.continuity.catch_up(), "history catch-up")  # what the outage kept from us
        self.continuity.resumes.keep_all()  # the live connections' records (Redis may have restarted empty)
        await self.lanes.call_app("on_reconnect", self)

    # ------------------------------------------------------------------ websocket side

    def opened(
        self,
        transport: asyncio.Transport,
        request: ConnectRequest,
        admit: Admit | None,
        early: bytes,
        deflate: int = 0,
        v1: bool = False,
    ) -> None:
        """A handshake's 101 is written: the socket is a :class:`Connection` from now on. ``early`` is
        what the client sent after its request (its first frames); ``deflate`` the window bits of its
        permessage-deflate (0: none); ``v1`` whether it speaks fanout.v1."""
        conn = Connection(
            self, self.hub, self.lanes, transport, self._client_ids.next(), request, deflate, v1
        )
        transport.set_protocol(conn)
        self.table.add(conn.client_id, conn)
        self.lanes.live.add(conn)
        self.metrics.connections_opened += 1
        conn.begin(admit)
        if early:
            conn.data_received(early)

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

    def _encode(self, command: Command) -> bytes:
        return self.encoder.encode(command, time.time())

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
        keys = self.hub.keys
        m.gauge(
            "fanout_idempotency_keys", "Idempotency keys remembered (in their window).", lambda: len(keys)
        )
        m.gauge("fanout_idempotent_repeats_total", "Keyed sends not applied again.", lambda: keys.repeats)
        m.gauge("fanout_idempotency_evicted_total", "Keys forgotten early (the bound).", lambda: keys.evicted)
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
