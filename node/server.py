"""The websocket node: holds client connections and applies the commands it receives from the bus.

Run it with ``python -m node`` or ``fanout-node`` (configured by the FANOUT_* environment variables, see
the README), or embed it: ``node = Node(settings, NodeOptions(port=0)); await node.start()``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import logging
import os
import re
import signal
import socket
import sys
import time
from collections import OrderedDict
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass, replace
from importlib import resources
from typing import Any

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from fanout import naming, protocol, routing
from fanout.backends import create_backend
from fanout.commands import (
    Bind,
    Bye,
    Close,
    Command,
    DissolveGroup,
    Heartbeat,
    JoinGroup,
    Json,
    LeaveGroup,
    NodeInfo,
    Query,
    QueryKind,
    Reply,
    Send,
    SetSession,
    Unbind,
)
from fanout.commands import (
    Request as BusRequest,
)
from fanout.config import Settings, env_flag, env_number, validate_name
from fanout.exceptions import ConfigError, FanoutError, ProtocolError
from fanout.ids import ClientIds, instance_id, owner_of
from fanout.serverutil import ServerUtil
from fanout.table import Change, ConnectionTable

from .app import DemoChat, load_app
from .connection import Connection
from .frames import encode_frame
from .metrics import Metrics

log = logging.getLogger("fanout.node")

_OWNER_QUERIES = frozenset({QueryKind.EXISTS, QueryKind.SESSION, QueryKind.FLAG_OF})
#: how many recent dedupe ids a node remembers (commands published on several addresses)
_DEDUPE_MEMORY = 4096


def default_node_id() -> str:
    """``<hostname>-<pid>``, made of the characters a node id may have."""
    host = re.sub(r"[^A-Za-z0-9_.\-]", "-", socket.gethostname())[:40] or "node"
    return f"{host}-{os.getpid()}"


@dataclass(frozen=True, slots=True)
class NodeOptions:
    """How one node serves its clients."""

    # -- identity and listening
    node_id: str = ""  #: stable name for logs/metrics; generated (host-pid) when empty
    host: str = "127.0.0.1"
    port: int = 8765
    # -- application
    app: str = ""  #: "module:attr"; the demo chat when empty
    welcome: bool = True  #: send {"type":"welcome","client_id":...} on connect
    # -- limits
    max_frame: int = 1024 * 1024  #: biggest frame a client may send; bigger ones close with 1009
    send_buffer: int = 1024 * 1024  #: bytes a connection may have waiting; over that it is cut off
    max_connections: int = 0  #: 0 = unlimited; over the limit, handshakes get HTTP 503
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
            max_frame=env_number(env, "FANOUT_MAX_FRAME", 1024 * 1024, int),
            send_buffer=env_number(env, "FANOUT_SEND_BUFFER", 1024 * 1024, int),
            max_connections=env_number(env, "FANOUT_MAX_CONNECTIONS", 0, int),
            ping_interval=env_number(env, "FANOUT_PING_INTERVAL", 20.0, float),
            ping_timeout=env_number(env, "FANOUT_PING_TIMEOUT", 20.0, float),
        )


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
        self.util = ServerUtil.attached(settings, self.backend, self.instance)
        self.metrics = Metrics()
        self.started_at = time.time()
        self._client_ids = ClientIds(self.instance)
        self._server: Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._subscription_lock = asyncio.Lock()
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._arrived: list[bytes] = []  #: bus messages received in this loop iteration
        #: while a batch of commands is applied: frames held per connection (see Connection.push)
        self.cork: dict[Connection, list[bytes]] | None = None
        self._heartbeat_task: asyncio.Task[None] | None = None
        self._register_gauges()

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Connect to the bus, subscribe, and start serving. Raises BackendUnavailable."""
        self.backend.on_reconnect.append(self._on_reconnect)
        await self.backend.connect(self._on_bus_message)
        await self.backend.subscribe(self.table.wanted())
        self._server = await serve(
            self._serve_client,
            self.options.host,
            self.options.port,
            process_request=self._process_request,
            max_size=self.options.max_frame,
            ping_interval=self.options.ping_interval or None,
            ping_timeout=self.options.ping_timeout or None,
            compression=None,  # frames are encoded once for all clients (see node.frames)
            server_header="fanout",
        )
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
        if self._heartbeat_task is not None:
            self._heartbeat_task.cancel()
        if self._server is not None:
            self._server.close(close_connections=True)  # 1001 going away
            await self._server.wait_closed()
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
            extra={"healthy": self.backend.healthy, "mode": self.settings.mode.value},
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

    # ------------------------------------------------------------------ HTTP side

    async def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        if request.headers.get("Upgrade", "").lower() == "websocket":
            if self.options.max_connections and len(self.table) >= self.options.max_connections:
                self.metrics.connections_refused += 1
                return connection.respond(503, "too many connections\n")
            return None
        path = request.path.split("?", 1)[0]
        if path == "/healthz":
            healthy = self.backend.healthy
            return connection.respond(200 if healthy else 503, "ok\n" if healthy else "backend down\n")
        if path == "/metrics":
            return _response(connection, 200, self.metrics.render().encode(), "text/plain; version=0.0.4")
        if path in ("/", "/index.html"):
            return _response(connection, 200, _demo_page(), "text/html; charset=utf-8")
        return connection.respond(404, "not found\n")

    # ------------------------------------------------------------------ websocket side

    async def _serve_client(self, websocket: ServerConnection) -> None:
        conn = Connection(self, websocket, self._client_ids.next())
        self.table.add(conn.client_id, conn)
        self.metrics.connections_opened += 1
        try:
            if self.options.welcome:
                conn.push(encode_frame(b'{"type":"welcome","client_id":"%s"}' % conn.client_id.encode()))
            await self._call_app("on_open", conn)
            async for data in websocket:
                self.metrics.client_messages += 1
                await self._call_app("on_message", conn, data)
        except ConnectionClosed:
            pass  # normal end of a connection
        finally:
            self.forget(conn)
            self.metrics.connections_closed += 1
            await self._call_app("on_close", conn)

    def forget(self, conn: Connection) -> None:
        """Take ``conn`` out of the table (idempotent) and drop subscriptions nobody needs now."""
        if self.table.get(conn.client_id) is conn:
            change = self.table.remove(conn.client_id)
            if not change.empty:
                self.spawn(self.apply_change(change), "unsubscribe")

    async def _call_app(self, hook: str, *args: Any) -> None:
        method = getattr(self.app, hook, None)
        if method is None:
            return
        try:
            await method(*args)
        except Exception:  # an app bug must not take the node down; it is logged and counted
            self.metrics.app_errors += 1
            log.exception("application hook %s failed", hook)

    # ------------------------------------------------------------------ bus side

    def _encode(self, command: Command) -> bytes:
        return protocol.encode(command, self.settings.secret)

    def _on_bus_message(self, raw: bytes) -> None:
        # Collect what arrives within one loop iteration and apply it together, each publisher's
        # commands in their order: over several connections (Redis Cluster shards) two commands that
        # arrive together can be read in either order.
        self._arrived.append(raw)
        if len(self._arrived) == 1:
            asyncio.get_running_loop().call_soon(self._apply_arrived)

    def _apply_arrived(self) -> None:
        batch, self._arrived = self._arrived, []
        commands = [c for c in map(self._decode, batch) if c is not None]
        # several commands: hold each connection's frames and write them in one go at the end
        self.cork = {} if len(commands) > 1 else None
        try:
            for command in routing.in_publisher_order(commands):
                dedupe_id = getattr(command, "dedupe_id", None)
                if dedupe_id is not None and self._already_seen(dedupe_id):
                    continue
                try:
                    self._apply(command)
                except Exception:  # a command that breaks the node's logic is a bug: log it, keep serving
                    self.metrics.dropped["error"] += 1
                    log.exception("applying %r failed", command)
        finally:
            corked, self.cork = self.cork, None
            for conn, frames in (corked or {}).items():
                conn.write_now(frames)

    def _decode(self, raw: bytes) -> Command | None:
        try:
            return protocol.decode(raw, self.settings.secret, self.settings.max_message)
        except ProtocolError as exc:
            self.metrics.dropped[exc.reason] += 1
            log.debug("dropped bus message: %s", exc)
            return None

    def _already_seen(self, dedupe_id: str) -> bool:
        if dedupe_id in self._seen:
            return True
        self._seen[dedupe_id] = None
        if len(self._seen) > _DEDUPE_MEMORY:
            self._seen.popitem(last=False)
        return False

    def _apply(self, command: Command) -> None:
        match command:
            case Send():
                self.metrics.commands["send"] += 1
                reached = self._deliver(command)
                self._reply(command.request, reached)
            case Close():
                self.metrics.commands["close"] += 1
                conns = self.table.resolve(command.target, command.exclude)
                for conn in conns:
                    conn.start_close(command.code, command.reason)
                self._reply(command.request, len(conns))
            case Reply() | Heartbeat() | Bye():
                self.util.handle(command)
            case Query():
                self.metrics.commands["query"] += 1
                self._answer(command)
            case DissolveGroup():
                self.metrics.commands["dissolve"] += 1
                members = len(self.table.group_members(command.group))
                self._change_then_reply(self.table.dissolve(command.group), command.request, members)
            case JoinGroup() | LeaveGroup() | Bind() | Unbind() | SetSession():
                self._membership(command)

    def _deliver(self, command: Send) -> int:
        conns = self.table.resolve(command.target, command.exclude)
        if not conns:
            return 0
        frame = encode_frame(command.payload, command.binary)
        return sum(conn.push(frame) for conn in conns)

    def _membership(self, command: JoinGroup | LeaveGroup | Bind | Unbind | SetSession) -> None:
        if owner_of(command.client_id) != self.instance:
            return  # fanout mode: every node hears it, only the owner applies and answers
        table = self.table
        change: Change
        match command:
            case JoinGroup():
                change = table.join(command.client_id, command.groups)
            case LeaveGroup():
                change = table.leave(command.client_id, command.groups)
            case Bind():
                change = table.bind(command.client_id, command.flag)
            case Unbind():
                change = table.unbind(command.client_id)
            case SetSession():
                found = command.client_id in table
                if found:
                    session = table.sessions.setdefault(command.client_id, {})
                    if not command.merge:
                        session.clear()
                    session.update(command.data)
                change = Change(found)
        self.metrics.commands[type(command).__name__.lower()] += 1
        self._change_then_reply(change, command.request, change.found)

    def _change_then_reply(self, change: Change, request: BusRequest | None, result: Json) -> None:
        if change.empty:
            self._reply(request, result)
            return

        async def apply_then_reply() -> None:
            await self.apply_change(change)
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
        if query.kind in _OWNER_QUERIES and owner_of(query.arg) != self.instance:
            return  # only the owning node answers about one connection
        self._reply(query.request, self._query_result(query.kind, query.arg))

    def _query_result(self, kind: QueryKind, arg: str) -> Json:
        table = self.table
        match kind:
            case QueryKind.EXISTS:
                return arg in table
            case QueryKind.SESSION:
                return table.sessions.get(arg)
            case QueryKind.FLAG_OF:
                return table.flag_of(arg)
            case QueryKind.FLAG_EXISTS:
                return bool(table.flag_holders(arg))
            case QueryKind.FLAG_CLIENTS:
                return sorted(table.flag_holders(arg))
            case QueryKind.CONNECTIONS:
                return len(table)
            case QueryKind.GROUP_COUNT:
                return len(table.group_members(arg))
            case QueryKind.GROUP_CLIENTS:
                return sorted(table.group_members(arg))
            case QueryKind.GROUPS:
                return table.group_names()
            case QueryKind.NODE:
                return self.info().record()

    def _reply(self, request: BusRequest | None, result: Json) -> None:
        if request is not None:
            self.spawn(self._send_reply(request, result), "reply")

    async def _send_reply(self, request: BusRequest | None, result: Json) -> None:
        if request is None:
            return
        message = self._encode(Reply(request.id, self.instance, result))
        try:
            await self.backend.publish(naming.inbox(request.reply_to), message)
        except FanoutError as exc:  # the requester will time out and name this node; count it here
            self.metrics.reply_failures += 1
            log.warning("reply to %s not published: %s", request.reply_to, exc)

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


@functools.cache
def _demo_page() -> bytes:
    return resources.files("node").joinpath("static/index.html").read_bytes()


def _response(connection: ServerConnection, status: int, body: bytes, content_type: str) -> Response:
    response = connection.respond(status, "")
    headers = Headers(response.headers)
    del headers["Content-Type"]
    del headers["Content-Length"]
    headers["Content-Type"] = content_type
    headers["Content-Length"] = str(len(body))
    response.headers = headers
    response.body = body
    return response


# ---------------------------------------------------------------------- process entry point


def _configure_logging(level: str) -> None:
    level = level.strip().upper() or "INFO"
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        raise ConfigError(
            "FANOUT_LOG_LEVEL", f"{level!r} is not one of DEBUG, INFO, WARNING, ERROR, CRITICAL"
        )
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if level != "DEBUG":
        # websockets logs every connection and handshake at INFO: too much at scale; aiormq logs each
        # lost link with a traceback at WARNING, while the backend already reports the outage in one line
        logging.getLogger("websockets").setLevel(logging.WARNING)
        logging.getLogger("aiormq").setLevel(logging.ERROR)


def _event_loop_runner(choice: str) -> Callable[[Coroutine[Any, Any, None]], None]:
    """``asyncio.run`` or ``uvloop.run`` as FANOUT_EVENT_LOOP says (auto: uvloop when installed)."""
    choice = choice.strip().lower() or "auto"
    if choice not in ("auto", "uvloop", "asyncio"):
        raise ConfigError("FANOUT_EVENT_LOOP", f"{choice!r} is not one of 'auto', 'uvloop', 'asyncio'")
    if choice != "asyncio":
        try:
            import uvloop
        except ImportError:
            if choice == "uvloop":
                raise ConfigError("FANOUT_EVENT_LOOP", "uvloop is not installed") from None
        else:
            return uvloop.run
    return asyncio.run


async def run(settings: Settings, options: NodeOptions, app: object | None = None) -> None:
    """Run a node until SIGTERM or SIGINT, then shut it down cleanly."""
    node = Node(settings, options, app)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await node.start()
    print(
        f"fanout node {node.options.node_id} on ws://{options.host}:{node.port}/ "
        f"({settings.backend.value}, {settings.mode.value} mode)",
        flush=True,
    )
    await stop.wait()
    log.info("shutting down")
    await node.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="fanout-node", description="Run a fanout websocket node.")
    parser.add_argument("--app", help="application object, module:attr (default: FANOUT_APP or demo chat)")
    parser.add_argument("--host", help="listen address (default: FANOUT_HOST or 127.0.0.1)")
    parser.add_argument("--port", type=int, help="listen port (default: FANOUT_PORT or 8765)")
    args = parser.parse_args(argv)
    try:
        _configure_logging(os.environ.get("FANOUT_LOG_LEVEL", "INFO"))
        settings = Settings.from_env()
        options = NodeOptions.from_env()
        overrides = {
            k: v for k, v in (("app", args.app), ("host", args.host), ("port", args.port)) if v is not None
        }
        options = replace(options, **overrides)
        app = load_app(options.app) if options.app else None  # fail at start, not at first use
        runner = _event_loop_runner(os.environ.get("FANOUT_EVENT_LOOP", "auto"))
    except ConfigError as exc:
        print(f"fanout-node: configuration error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    try:
        runner(run(settings, options, app))
    except FanoutError as exc:
        print(f"fanout-node: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
