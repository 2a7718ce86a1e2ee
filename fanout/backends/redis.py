"""Redis backend: pub/sub on one server, or on a Redis Cluster (sharded pub/sub in routing mode).

Layout of the connections (``<ns>`` is the namespace, channels are :meth:`Address.channel`):

* ``redis://`` / ``rediss://``: one dedicated pub/sub connection (SUBSCRIBE) and one ordinary client
  for PUBLISH, whose integer reply (the number of receivers) :meth:`RedisBackend.publish` returns.
* ``redis+cluster://h:p,h:p`` in **routing** mode: sharded pub/sub. A channel lives on the primary
  owning its hash slot; we keep one pub/sub connection per primary that owns a wanted channel
  (SSUBSCRIBE) and publish with SPUBLISH through :class:`redis.asyncio.cluster.RedisCluster`, whose
  reply is the exact receiver count (a shard channel has all its subscribers on its shard).
* ``redis+cluster://`` in **fanout** mode: plain pub/sub, which Redis Cluster broadcasts to every
  node. We subscribe and publish on one primary (one node, so one publisher's messages keep their
  order); the PUBLISH reply only counts that node's subscribers, so :meth:`publish` returns ``None``.

Why the pub/sub connections are driven by hand (raw RESP2 frames on a connection of our own,
:mod:`~fanout.backends.redis_subscriber`, or on a redis-py ``Connection`` with TLS) rather than with
redis-py's ``PubSub``/``ClusterPubSub``: those re-connect and re-subscribe on their
own (``on_connect`` callbacks, retry objects) - a second retry layer that would race ours and replay
the subscriptions they remember instead of the set wanted *now*; their cluster variant polls each
shard in turn with timeouts; and neither tells *when* a given SUBSCRIBE was confirmed. Here every
pub/sub connection is built with zero retries, one reader task per connection reads every frame,
matches subscribe/unsubscribe confirmations to the waiting callers (FIFO, as Redis replies in
order), and hands message payloads to ``on_message`` in arrival order. When a connection drops, the
whole session is torn down and rebuilt by :meth:`RedisBackend._supervise` - the only retry layer.
A shard channel whose slot moved (Redis 7 sends an unasked ``sunsubscribe``, or answers MOVED) is
re-routed alone: the slot map is reloaded and the channel subscribed on its new owner.

Publishing: callers queue (channel, message, future); one flusher task sends everything queued since
its last round trip as one pipeline (``transaction=False``) and resolves each future with its reply,
so concurrent publishes cost one round trip per batch and keep their order. Delivery is
at-most-once: a publish that timed out may still have reached Redis if it was already on the wire.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter, deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.connection import AbstractConnection, Connection, parse_url
from redis.asyncio.retry import Retry  # the asyncio one: redis-py 8.2 warns when handed the sync class
from redis.backoff import NoBackoff
from redis.crc import key_slot
from redis.exceptions import (
    AskError,
    AuthenticationError,
    AuthorizationError,
    ClusterDownError,
    MovedError,
    RedisClusterException,
    RedisError,
    ResponseError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from ..config import Mode, Settings
from ..exceptions import BackendError, BackendUnavailable, NotConnected
from ..naming import Address, safe_segment
from .base import Backend, MessageHandler, backoff_delays, fire_and_forget_guard
from .redis_publisher import PublishConnection, pack_publish
from .redis_subscriber import PubSubConnection, RedisPyPubSub, SubscribeConnection

log = logging.getLogger("fanout.backend.redis")


class _LinkLost(Exception):
    """A pub/sub connection ended (dropped, went silent, or Redis asked us to resync)."""


#: errors that mean "the server is not reachable / the link broke" (as opposed to a refusal)
_LINK_ERRORS: tuple[type[BaseException], ...] = (
    RedisConnectionError,
    RedisTimeoutError,
    OSError,
    asyncio.TimeoutError,
)

#: refusals that redis-py files under ConnectionError: Redis is there, it just says no
_REFUSALS: tuple[type[BaseException], ...] = (AuthenticationError, AuthorizationError)

#: what a failed (re)connection attempt may raise
_CONNECT_ERRORS: tuple[type[BaseException], ...] = (
    *_LINK_ERRORS,
    _LinkLost,
    RedisError,
    RedisClusterException,  # "cannot be connected": not a RedisError subclass
    BackendError,
)
#: what a failed SUBSCRIBE on a live session may raise
_SEND_ERRORS: tuple[type[BaseException], ...] = (*_LINK_ERRORS, _LinkLost)

#: publish errors that mean "Redis (Cluster) is not there" -> BackendUnavailable, not BackendError
_UNAVAILABLE: tuple[type[BaseException], ...] = (*_LINK_ERRORS, ClusterDownError, RedisClusterException)

#: How redis-py errors become ours - the one table, first match wins: (their classes, our class, message).
#: Every message goes through :meth:`RedisBackend._error`, which also takes the password out.
_TRANSLATION: tuple[tuple[tuple[type[BaseException], ...], type[BackendError], str], ...] = (
    (_REFUSALS, BackendError, "Redis at {where} refused {what}: {exc}"),  # auth / ACL: it says no
    ((*_UNAVAILABLE, _LinkLost), BackendUnavailable, "Redis at {where} is not reachable ({what}): {exc}"),
    ((RedisError,), BackendError, "Redis at {where} refused {what}: {exc}"),
    ((Exception,), BackendError, "{what} failed: {exc!r}"),  # a bug must still reach the caller
)

#: at most this many publishes (or about this many bytes) go into one pipeline round trip
_BATCH_COUNT = 1000
_BATCH_BYTES = 1 << 20


def _no_retry() -> Retry:
    # redis-py retries connection errors by default (3 times, with backoff). For the pub/sub links
    # that would stack with our own reconnect loop; for PUBLISH it could deliver a message twice.
    return Retry(NoBackoff(), 0)


# -- URLs ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Target:
    """Where to connect, parsed from ``settings.url``."""

    cluster: bool
    tls: bool
    #: ``user:password@`` or ``""``
    userinfo: str
    #: host, port of the server, or of every cluster startup node
    nodes: tuple[tuple[str, int], ...]
    #: ``/db?query`` part, kept for the per-node URLs
    tail: str

    def node_url(self, host: str, port: int) -> str:
        """A plain ``redis://`` / ``rediss://`` URL of one server (credentials and options kept)."""
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"  # bare IPv6 address from the cluster's node table
        scheme = "rediss" if self.tls else "redis"
        return f"{scheme}://{self.userinfo}{host}:{port}{self.tail}"


def _parse_target(url: str) -> _Target:
    """Split ``url`` (already validated by :class:`Settings`) into its parts."""
    scheme, rest = url.split("://", 1)
    scheme = scheme.lower()
    tls = scheme.startswith("rediss")
    cut = min((i for i in (rest.find("/"), rest.find("?")) if i >= 0), default=len(rest))
    netloc, tail = rest[:cut], rest[cut:]
    creds, at, hosts = netloc.rpartition("@")
    userinfo = f"{creds}{at}"
    if scheme.endswith("+cluster"):
        nodes: list[tuple[str, int]] = []
        for hostport in hosts.split(","):
            node_host, _, node_port = hostport.rpartition(":")
            nodes.append((node_host.strip("[]"), int(node_port)))
        # a cluster has only database 0: keep the query options, drop any path
        query = tail[tail.find("?") :] if "?" in tail else ""
        return _Target(True, tls, userinfo, tuple(nodes), "/" + query if query else "")
    kwargs: dict[str, Any] = dict(parse_url(f"{'rediss' if tls else 'redis'}://{rest}"))
    host = str(kwargs.get("host") or "127.0.0.1")
    port = int(kwargs.get("port") or 6379)
    return _Target(False, tls, userinfo, ((host, port),), tail)


# -- one pub/sub connection -----------------------------------------------------------------------


@dataclass(slots=True)
class _Pending:
    """A SUBSCRIBE-like command sent and not yet fully confirmed."""

    kind: bytes  #: the confirmation type we wait for: b"subscribe", b"sunsubscribe", ...
    remaining: Counter[bytes]
    future: asyncio.Future[None] = field(repr=False)


class _Link:
    """One RESP2 pub/sub connection to one Redis server.

    Commands are written from the caller's task (ordering is the call order: the write happens
    before the first suspension point); every reply is read by the single task running
    :meth:`run`, which confirms pending commands and passes message payloads to ``deliver``.
    """

    def __init__(
        self,
        name: str,
        conn: PubSubConnection,
        *,
        sharded: bool,
        deliver: MessageHandler,
        keepalive: float,
        on_moved: Callable[[list[bytes], asyncio.Future[None] | None], None] | None = None,
        refused: Callable[[str, BaseException], BackendError] = lambda what, exc: BackendError(
            f"{what}: {exc}"
        ),
    ) -> None:
        self.name = name
        #: builds the error a refused (un)subscription raises (the backend's translation)
        self._refused = refused
        #: called with channels this shard no longer serves (slot moved), and the waiter to resolve
        self._on_moved = on_moved
        self.conn = conn
        self.sharded = sharded
        self._deliver = deliver
        self._keepalive = keepalive
        self._sub = b"SSUBSCRIBE" if sharded else b"SUBSCRIBE"
        self._unsub = b"SUNSUBSCRIBE" if sharded else b"UNSUBSCRIBE"
        self._pending: deque[_Pending] = deque()
        #: channels Redis confirmed on this connection
        self.confirmed: set[bytes] = set()
        self.alive = False
        self._last_frame = 0.0

    async def open(self, timeout: float) -> None:
        """Connect (no retries) within ``timeout`` seconds, handshake included.

        Raises redis ``ConnectionError`` or ``TimeoutError`` on failure.
        """
        # socket_connect_timeout only bounds the TCP connect; the handshake (CLIENT SETNAME...)
        # reads without a timeout on this connection, and a hung server accepts but never answers
        async with asyncio.timeout(timeout):
            await self.conn.connect()
        self.alive = True
        self._last_frame = asyncio.get_running_loop().time()

    async def close(self) -> None:
        """Drop the connection and release every waiter (their change is re-applied on reconnect)."""
        self.alive = False
        self._release_waiters()
        with contextlib.suppress(Exception):
            await self.conn.disconnect()

    def _release_waiters(self) -> None:
        # a subscribe()/unsubscribe() waiting on a dead link returns: the wanted set already holds
        # the change and the next session applies it (the contract: while down, return at once)
        while self._pending:
            pending = self._pending.popleft()
            if not pending.future.done():
                pending.future.set_result(None)

    async def change(self, subscribe: bool, channels: Iterable[bytes]) -> asyncio.Future[None]:
        """Send one (S)SUBSCRIBE / (S)UNSUBSCRIBE; return a future done when Redis confirmed it.

        Raises :class:`_LinkLost` if the link is down (nothing was sent).
        """
        wanted = sorted(set(channels))
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if not wanted:
            future.set_result(None)
            return future
        if not self.alive or not self.conn.is_connected:
            # checked right before the write with no await in between: redis-py would otherwise
            # silently reconnect a closed Connection inside its send
            raise _LinkLost(f"pub/sub link to {self.name} is down")
        command = self._sub if subscribe else self._unsub
        kind = command.lower()
        self._pending.append(_Pending(kind, Counter(wanted), future))
        try:
            await self.conn.send(command, *wanted)
        except _LINK_ERRORS as exc:
            self.alive = False
            raise _LinkLost(f"pub/sub link to {self.name} broke: {exc}") from exc
        return future

    async def run(self) -> None:
        """Read frames until the link breaks; always ends by raising (:class:`_LinkLost` normally)."""
        pinger = asyncio.create_task(self._ping_loop(), name=f"fanout-redis-ping-{self.name}")
        try:
            while True:
                try:
                    frame = await self.conn.read()
                except ResponseError as exc:
                    self._last_frame = asyncio.get_running_loop().time()
                    self._on_error_reply(exc)
                    continue
                except _LINK_ERRORS as exc:
                    raise _LinkLost(f"pub/sub link to {self.name} lost: {exc}") from exc
                self._last_frame = asyncio.get_running_loop().time()
                self._on_frame(frame)
        finally:
            self.alive = False
            pinger.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await pinger

    async def _ping_loop(self) -> None:
        # A crashed server closes the socket and the reader sees it at once; a vanished host or a
        # cut network does not. PING while idle; no frame at all for 3 intervals means dead.
        loop = asyncio.get_running_loop()
        while self.alive:
            await asyncio.sleep(self._keepalive)
            idle = loop.time() - self._last_frame
            if idle >= 3 * self._keepalive:
                log.warning("pub/sub link to %s silent for %.1fs: dropping it", self.name, idle)
                await self.conn.disconnect()  # the reader then fails and ends the session
                return
            if idle >= self._keepalive and self.conn.is_connected:
                try:
                    await self.conn.send(b"PING")
                except _LINK_ERRORS:
                    return  # the reader sees the same broken socket

    def _on_error_reply(self, exc: ResponseError) -> None:
        # Redis replies in command order: an error answers the oldest pending command as a whole
        if not self._pending:
            log.warning("unexpected error reply on pub/sub link %s: %s", self.name, exc)
            return
        pending = self._pending.popleft()
        redirected = isinstance(exc, MovedError | AskError | TryAgainError | ClusterDownError) or str(
            exc
        ).startswith(("MOVED", "ASK", "TRYAGAIN", "CLUSTERDOWN"))
        if redirected and self.sharded and self._on_moved is not None and pending.kind == b"ssubscribe":
            # our slot map is stale: the backend refreshes it and subscribes on the right shard,
            # and only then releases the caller waiting for this confirmation
            self._on_moved(list(pending.remaining), pending.future)
            return
        if not pending.future.done():
            pending.future.set_exception(self._refused(pending.kind.decode(), exc))

    def _on_frame(self, frame: Any) -> None:
        if not isinstance(frame, list) or not frame:
            return  # +PONG to a keepalive PING sent while nothing was subscribed
        kind = frame[0]
        if kind in (b"message", b"smessage"):
            try:
                self._deliver(frame[2])
            except Exception:  # a bug in the consumer must not take the subscription down
                log.exception("on_message failed on a message from %s", self.name)
            return
        if kind in (b"subscribe", b"ssubscribe"):
            self.confirmed.add(frame[1])
        elif kind in (b"unsubscribe", b"sunsubscribe"):
            self.confirmed.discard(frame[1])
        else:
            return  # pong to a keepalive PING
        self._confirm(kind, frame[1])

    def _confirm(self, kind: bytes, channel: bytes) -> None:
        head = self._pending[0] if self._pending else None
        if head is None or head.kind != kind or head.remaining[channel] <= 0:
            if kind == b"sunsubscribe" and self._on_moved is not None:
                # unasked: the channel's slot moved to another shard (Redis 7 tells subscribers so)
                self._on_moved([channel], None)
                return
            log.warning("unexpected %s %r on %s", kind.decode(), channel, self.name)
            return
        head.remaining[channel] -= 1
        if head.remaining[channel] == 0:
            del head.remaining[channel]
        if not head.remaining:
            self._pending.popleft()
            if not head.future.done():
                head.future.set_result(None)


# -- the backend ----------------------------------------------------------------------------------


@dataclass(slots=True)
class _Outgoing:
    channel: bytes
    message: bytes
    future: asyncio.Future[int | None] = field(repr=False)


class RedisBackend(Backend):
    """The Redis pub/sub backend (single server or Redis Cluster); see the module docstring."""

    #: seconds between keepalive PINGs on an idle pub/sub link (silence for 3 of them = dead)
    keepalive_interval = 5.0

    def __init__(self, settings: Settings, *, inbox: str) -> None:
        super().__init__(settings, inbox=inbox)
        self._target = _parse_target(settings.url)
        self._sharded = self._target.cluster and settings.mode is Mode.ROUTING
        #: connect timeout of every connection: fail fast, and never beyond the publish timeout
        self._connect_timeout = min(5.0, settings.publish_timeout)
        self._handler: MessageHandler | None = None
        self._closing = False
        # -- subscriber side
        self._links: dict[str, _Link] = {}
        self._link_tasks: dict[str, asyncio.Task[None]] = {}
        #: the link each channel was last (un)subscribed on (sharded: the shard owning its slot)
        self._route: dict[bytes, str] = {}
        self._session = 0  #: generation: a dying link of an old session must not end the new one
        self._up = False  #: links usable (connected and initial subscriptions sent)
        self._lost = asyncio.Event()
        self._sub_lock = asyncio.Lock()
        self._supervisor: asyncio.Task[None] | None = None
        self._reroutes: set[asyncio.Task[None]] = set()
        # -- publisher side
        self._client: aioredis.Redis | None = None  #: TLS single server, or the fanout-mode cluster node
        #: plain single server: our own publishing connection (see redis_publisher), opened on demand
        self._fast_path = not self._target.cluster and not self._target.tls
        self._publisher: PublishConnection | None = None
        self._cluster: RedisCluster | None = None  #: cluster map (and SPUBLISH client in routing mode)
        self._outbox: deque[_Outgoing] = deque()
        self._inflight: list[_Outgoing] = []  #: the batch whose pipeline is on the wire
        self._direct = 0  #: publishes written by their caller, not the flusher, still waiting for replies
        self._wake = asyncio.Event()
        self._flusher: asyncio.Task[None] | None = None

    # -- small helpers ---------------------------------------------------------------------

    def _error(self, exc: BaseException, what: str) -> BackendError:
        """Our exception for a redis-py one (see ``_TRANSLATION``), password taken out of the message.

        ``what`` names the operation: "the connection", "the publish", "subscribe", ...
        """
        if isinstance(exc, BackendError):
            return exc  # already ours (and already redacted)
        for classes, ours, template in _TRANSLATION:
            if isinstance(exc, classes):
                text = template.format(where=self.settings.where, what=what, exc=exc)
                error = ours(self.settings.redact(text))
                error.__cause__ = exc
                return error
        raise AssertionError("unreachable: the last row matches every Exception")

    def _channel(self, address: Address) -> bytes:
        return address.channel(self.settings.namespace).encode()

    def _wanted(self) -> set[bytes]:
        return {self._channel(address) for address in self.subscriptions}

    def _new_conn(self, host: str, port: int) -> PubSubConnection:
        """An unconnected pub/sub connection to one server: RESP2 frames, no retries, no timeouts (our own
        on plain TCP, redis-py's with TLS; see redis_subscriber)."""
        client_name = f"{self.settings.namespace}-sub-{safe_segment(self.inbox)}"[:120]
        if not self._target.tls:
            return SubscribeConnection(host, port, userinfo=self._target.userinfo, client_name=client_name)
        kwargs: dict[str, Any] = dict(parse_url(self._target.node_url(host, port)))
        connection_class = kwargs.pop("connection_class", Connection)
        kwargs.update(
            protocol=2,  # plain arrays for pub/sub frames (redis-py 8 defaults to RESP3 push frames)
            retry=_no_retry(),
            socket_timeout=None,  # reads block until a frame comes; liveness is the PING loop's job
            socket_connect_timeout=self._connect_timeout,
            health_check_interval=0,
            client_name=client_name,
        )
        return RedisPyPubSub(cast(AbstractConnection, connection_class(**kwargs)))

    def _client_kwargs(self) -> dict[str, Any]:
        return {
            "retry": _no_retry(),
            "socket_connect_timeout": self._connect_timeout,
            # a hung server must not hold the flusher forever; publish() itself gives up earlier
            "socket_timeout": self.settings.publish_timeout,
            "health_check_interval": 0,
        }

    # -- connect / close --------------------------------------------------------------------

    async def connect(self, on_message: MessageHandler) -> None:
        """Connect, subscribe to :attr:`subscriptions` (inbox included) and start delivering.

        Raises :class:`BackendUnavailable` if Redis cannot be reached within the connect timeout
        (at most ``settings.publish_timeout``), :class:`BackendError` if it refuses us (e.g. auth).
        """
        if self._handler is not None:
            return
        self._closing = False
        self._handler = on_message
        try:
            async with asyncio.timeout(self.settings.publish_timeout):
                if self._target.cluster:
                    await self._open_cluster()
                await self._open_session()
        except BaseException as exc:
            await self._teardown()
            await self._close_clients()
            self._handler = None
            if isinstance(exc, Exception):
                raise self._error(exc, "the connection") from exc
            raise
        self._flusher = asyncio.create_task(self._flush_loop(), name="fanout-redis-flusher")
        self._flusher.add_done_callback(self._guard)
        self._supervisor = asyncio.create_task(self._supervise(), name="fanout-redis-supervisor")
        self._supervisor.add_done_callback(self._guard)

    async def _open_cluster(self) -> None:
        """Create the cluster client and load the slot map (raises if no startup node answers)."""
        options: dict[str, Any] = dict(parse_url(self._target.node_url(*self._target.nodes[0])))
        for key in ("host", "port", "db", "connection_class"):
            options.pop(key, None)
        options.update(self._client_kwargs(), ssl=self._target.tls)
        self._cluster = RedisCluster(
            startup_nodes=[ClusterNode(host, port) for host, port in self._target.nodes], **options
        )
        try:
            await self._cluster.initialize()
        except (RedisError, RedisClusterException) as exc:  # "cannot be connected" is not a RedisError
            if isinstance(exc, _REFUSALS):
                raise self._error(exc, "the connection") from exc
            raise self._error(ConnectionError(str(exc)), "the cluster's slot map") from exc

    async def close(self) -> None:
        """Stop every task, drop every connection (which ends their subscriptions); idempotent.

        Publishes still queued fail with :class:`NotConnected`.
        """
        self._closing = True
        self._handler = None
        tasks = [t for t in (self._supervisor, self._flusher) if t is not None]
        self._supervisor = self._flusher = None
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        # callers of publishes that were queued or on the wire learn it now, not at their timeout
        self._fail([*self._inflight, *self._outbox], NotConnected("the redis backend was closed"))
        self._inflight = []
        self._outbox.clear()
        await self._teardown()
        await self._close_clients()

    async def _close_clients(self) -> None:
        if self._publisher is not None:
            publisher, self._publisher = self._publisher, None
            publisher.close()
        if self._client is not None:
            client, self._client = self._client, None
            await client.aclose()
        if self._cluster is not None:
            cluster, self._cluster = self._cluster, None
            await cluster.aclose()

    def _guard(self, task: asyncio.Task[None]) -> None:
        # a background task that ends on its own (not cancelled by close) is a failure: say so
        # loudly and stop claiming health
        if task.cancelled() or self._closing:
            return
        self._up = False
        fire_and_forget_guard(cast("asyncio.Task[object]", task))
        if task.exception() is None:
            log.error("background task %s of %s ended unexpectedly", task.get_name(), self.describe())

    # -- sessions -------------------------------------------------------------------------

    async def _open_session(self) -> None:
        """Open the pub/sub link(s) and subscribe to everything wanted now; wait for confirmation.

        Raises the underlying connection error (or :class:`_LinkLost`) if it cannot.
        """
        self._session += 1
        session = self._session
        self._lost.clear()
        async with self._sub_lock:
            if not self._sharded:
                await self._open_publisher()
                host, port = self._pubsub_node()
                await self._add_link(session, "main", host, port)
            self._up = True
            waiters = await self._send(True, self._wanted())
        await self._wait(waiters, "subscribe")
        if self._lost.is_set():
            raise _LinkLost("the link dropped while subscribing")

    def _pubsub_node(self) -> tuple[str, int]:
        """The server the (non-sharded) pub/sub link and publisher use.

        On a cluster in fanout mode: one primary, a different one after each failed session, so a
        dead node is not retried forever while the others are up.
        """
        if self._cluster is None:
            return self._target.nodes[0]
        primaries = sorted(self._cluster.get_primaries(), key=lambda node: node.name)
        node = primaries[self._session % len(primaries)]
        return node.host, int(node.port)

    async def _open_publisher(self) -> None:
        """(Re)create the PUBLISH client on the current pub/sub node (not used when sharded)."""
        if self._fast_path:
            if self._publisher is not None:  # the first publish of the new session uses a fresh one
                publisher, self._publisher = self._publisher, None
                publisher.close()
            return
        host, port = self._pubsub_node()
        url = self._target.node_url(host, port)
        if self._client is not None:
            if self._target.cluster:
                # fanout mode on a cluster: follow the node we subscribe on (it may have changed)
                old, self._client = self._client, None
                await old.aclose()
            else:
                # drop pooled sockets to the old server so the first publish uses a fresh one
                await self._client.connection_pool.disconnect()
                return
        self._client = aioredis.Redis.from_url(url, **self._client_kwargs())

    async def _add_link(self, session: int, key: str, host: str, port: int) -> _Link:
        """Open a pub/sub link to ``host:port`` and start its reader; ``key``: "main" or the shard.

        Raises redis connection errors (or TimeoutError) if it cannot connect.
        """
        link = _Link(
            f"{host}:{port}",
            self._new_conn(host, port),
            sharded=self._sharded,
            deliver=self._deliver,
            keepalive=self.keepalive_interval,
            on_moved=lambda channels, waiter: self._start_reroute(session, channels, waiter),
            refused=lambda what, exc: self._error(exc, what),
        )
        try:
            await link.open(self._connect_timeout)
        except BaseException:
            await link.close()
            raise
        self._links[key] = link
        task = asyncio.create_task(self._run_link(session, link), name=f"fanout-redis-reader-{link.name}")
        self._link_tasks[key] = task
        return link

    async def _run_link(self, session: int, link: _Link) -> None:
        try:
            await link.run()
        except _LinkLost as exc:
            self._link_failed(session, exc)
        except Exception as exc:  # a bug here must not go silent: log it, and rebuild the session
            log.exception("pub/sub reader %s crashed", link.name)
            self._link_failed(session, exc)

    def _link_failed(self, session: int, exc: BaseException) -> None:
        if session != self._session or self._closing:
            return
        if self._up:
            log.warning("%s: pub/sub link down: %s", self.describe(), exc)
        self._up = False
        for link in self._links.values():
            link.alive = False
            link._release_waiters()
        self._lost.set()

    def _start_reroute(
        self, session: int, channels: list[bytes], waiter: asyncio.Future[None] | None
    ) -> None:
        task = asyncio.create_task(self._reroute(session, channels, waiter), name="fanout-redis-reroute")
        self._reroutes.add(task)
        task.add_done_callback(self._reroutes.discard)

    async def _reroute(
        self, session: int, channels: list[bytes], waiter: asyncio.Future[None] | None
    ) -> None:
        """Shard channels whose slot moved: reload the slot map, subscribe on the new owner.

        Only those channels are unconfirmed meanwhile (``healthy`` is False); the rest of the
        session is untouched. If that fails, fall back to rebuilding the whole session.
        """
        try:
            log.info("%s: %d shard channel(s) moved; re-routing", self.describe(), len(channels))
            assert self._cluster is not None
            await self._cluster.nodes_manager.initialize()
            async with self._sub_lock:
                if session != self._session or not self._up:
                    return  # the next session subscribes to everything anyway
                wanted = self._wanted()
                moved = [channel for channel in channels if channel in wanted]
                waiters = await self._send(True, moved)
            await self._wait(waiters, "subscribe")
        except Exception as exc:
            self._link_failed(session, exc)
        finally:
            if waiter is not None and not waiter.done():
                waiter.set_result(None)

    def _deliver(self, payload: bytes) -> None:
        handler = self._handler
        if handler is not None:
            handler(payload)

    async def _teardown(self) -> None:
        """Close every link and stop its reader."""
        self._up = False
        tasks = [*self._link_tasks.values(), *self._reroutes]
        links = list(self._links.values())
        self._link_tasks.clear()
        self._links.clear()
        self._route.clear()
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for link in links:
            await link.close()

    async def _supervise(self) -> None:
        """The one reconnect loop: wait for a lost session, then rebuild it with capped backoff."""
        while not self._closing:
            await self._lost.wait()
            await self._teardown()
            self.outages += 1
            await self._fire(self.on_disconnect, "disconnect")
            for attempt, delay in enumerate(backoff_delays(), start=1):
                await asyncio.sleep(delay)
                if self._closing:
                    return
                try:
                    # bounded: a server that accepts connections but never answers must not
                    # stall the loop
                    async with asyncio.timeout(self.settings.publish_timeout + self._connect_timeout):
                        if self._cluster is not None:
                            # the topology may have changed (failover, resharding): reload the map
                            await self._cluster.nodes_manager.initialize()
                        await self._open_session()
                except _CONNECT_ERRORS as exc:
                    log.info("%s: reconnect attempt %d failed: %r", self.describe(), attempt, exc)
                    await self._teardown()
                    continue
                break
            self.reconnects += 1
            log.warning("%s: reconnected after %d attempt(s)", self.describe(), attempt)
            await self._fire(self.on_reconnect, "reconnect")

    # -- subscriptions ----------------------------------------------------------------------

    async def _link_for(self, channel: bytes, subscribe: bool) -> _Link | None:
        """The link a channel's (un)subscription goes to; opens a shard link when needed."""
        if not self._sharded:
            return self._links.get("main")
        if not subscribe:
            name = self._route.get(channel)
            return self._links.get(name) if name is not None else None
        assert self._cluster is not None
        node = self._cluster.nodes_manager.get_node_from_slot(key_slot(channel))
        link = self._links.get(node.name)
        if link is None:
            link = await self._add_link(self._session, node.name, node.host, int(node.port))
        return link

    async def _send(self, subscribe: bool, channels: Iterable[bytes]) -> list[asyncio.Future[None]]:
        """Send the (un)subscriptions of ``channels``; return the confirmation futures.

        Call with ``_sub_lock`` held (so the order of changes on the wire is the order of calls).
        Raises :class:`_LinkLost` / connection errors when the link is down.
        """
        channels = list(channels)
        groups: dict[tuple[str, int], list[bytes]] = {}
        links: dict[str, _Link] = {}
        for channel in channels:
            link = await self._link_for(channel, subscribe)
            if link is None:
                continue  # unsubscribing a channel never subscribed in this session
            links[link.name] = link
            # SSUBSCRIBE takes channels of one slot only; plain SUBSCRIBE takes any list
            slot = key_slot(channel) if self._sharded else 0
            groups.setdefault((link.name, slot), []).append(channel)
            if subscribe:
                self._route[channel] = link.name
        waiters = []
        for (name, _slot), group in groups.items():
            waiters.append(await links[name].change(subscribe, group))
        if not subscribe:
            for channel in channels:
                self._route.pop(channel, None)
        return waiters

    async def _wait(self, waiters: list[asyncio.Future[None]], what: str) -> None:
        if not waiters:
            return
        try:
            async with asyncio.timeout(self.settings.publish_timeout):
                await asyncio.gather(*waiters)
        except TimeoutError as exc:
            raise BackendUnavailable(
                f"Redis did not confirm the {what} within {self.settings.publish_timeout:g}s"
            ) from exc

    async def subscribe(self, addresses: Iterable[Address]) -> None:
        """Add ``addresses`` to the wanted set; return once Redis confirmed them (at once if down).

        Raises :class:`BackendUnavailable` if a live link does not confirm within the publish
        timeout, :class:`BackendError` if Redis refuses (e.g. ACL); the addresses stay wanted.
        """
        await self._change(True, set(addresses))

    async def unsubscribe(self, addresses: Iterable[Address]) -> None:
        """Remove ``addresses`` (never the inbox) from the wanted set; confirmed like subscribe."""
        await self._change(False, set(addresses) - {self.inbox_address})

    async def _change(self, subscribe: bool, addresses: set[Address]) -> None:
        if not addresses:
            return
        async with self._sub_lock:
            if subscribe:
                self.subscriptions |= addresses
            else:
                self.subscriptions -= addresses
            if not self._up:
                return  # applied by the next session, which subscribes to the wanted set as it is then
            channels = {self._channel(address) for address in addresses}
            try:
                waiters = await self._send(subscribe, channels)
            except _SEND_ERRORS as exc:
                self._link_failed(self._session, exc)
                return
        await self._wait(waiters, "subscribe" if subscribe else "unsubscribe")

    @property
    def healthy(self) -> bool:
        """True while the pub/sub link(s) are up and every wanted channel is confirmed."""
        if not self._up or self._handler is None:
            return False
        confirmed: set[bytes] = set()
        for link in self._links.values():
            if not link.alive:
                return False
            confirmed |= link.confirmed
        return self._wanted() <= confirmed

    # -- publishing -----------------------------------------------------------------------

    async def publish_many(self, items: Sequence[tuple[Address, bytes]]) -> list[int | None]:
        """Publish each message on its address's channel, in order.

        All of them are queued at once (nothing suspends in between), and one flusher task sends the
        queue in pipelines, so concurrent calls keep their call order and cost a round trip per batch.

        Returns the number of receivers per message (single server; sharded cluster: exact for the
        shard), ``None`` in fanout mode on a cluster (a node only counts its own subscribers).
        Raises :class:`BackendUnavailable` if Redis did not take them within
        ``settings.publish_timeout``, :class:`BackendError` if Redis refused one,
        :class:`NotConnected` before ``connect()`` / after ``close()``.
        """
        if self._handler is None or self._flusher is None:
            raise NotConnected("the redis backend is not connected")
        publisher = self._publisher
        if (
            items
            and publisher is not None
            and publisher.alive
            and not self._direct
            and not self._outbox
            and not self._inflight
        ):
            return await self._publish_direct(publisher, items)
        loop = asyncio.get_running_loop()
        futures: list[asyncio.Future[int | None]] = []
        for address, message in items:
            future: asyncio.Future[int | None] = loop.create_future()
            self._outbox.append(_Outgoing(self._channel(address), message, future))
            futures.append(future)
        self._wake.set()
        try:
            async with asyncio.timeout(self.settings.publish_timeout):
                # if the timeout cancels a future before the flusher took it, it is never sent
                if len(futures) == 1:
                    return [await futures[0]]
                return list(await asyncio.gather(*futures))
        except TimeoutError as exc:
            for future in futures:
                future.cancel()
            raise BackendUnavailable(
                f"Redis did not take the publish within {self.settings.publish_timeout:g}s"
            ) from exc

    async def _publish_direct(
        self, publisher: PublishConnection, items: Sequence[tuple[Address, bytes]]
    ) -> list[int | None]:
        """Nothing is queued or on the wire: the caller writes its messages itself, which saves the two
        task switches through the flusher (about a fifth of an awaited publish's time). Callers that come
        meanwhile queue for the flusher, whose writes follow this one on the same connection, so the
        order holds."""
        self._direct += 1
        try:
            replies = await self._round_trip(
                publisher, [pack_publish(self._channel(address), message) for address, message in items]
            )
        except TimeoutError as exc:
            raise BackendUnavailable(
                f"Redis did not take the publish within {self.settings.publish_timeout:g}s"
            ) from exc
        finally:
            self._direct -= 1
        for reply in replies:
            if isinstance(reply, Exception):
                raise self._error(reply, "the publish")
        return [int(reply) for reply in replies]

    async def _flush_loop(self) -> None:
        """Send everything queued since the last round trip in one pipeline, forever."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._outbox:
                batch = self._take_batch()
                if batch:
                    self._inflight = batch
                    await self._flush(batch)
                    self._inflight = []

    def _take_batch(self) -> list[_Outgoing]:
        batch: list[_Outgoing] = []
        size = 0
        while self._outbox and len(batch) < _BATCH_COUNT and size < _BATCH_BYTES:
            item = self._outbox.popleft()
            if item.future.done():  # its caller timed out (or was cancelled): do not send it
                continue
            batch.append(item)
            size += len(item.message)
        return batch

    async def _flush(self, batch: list[_Outgoing]) -> None:
        try:
            results = await self._pipeline(batch)
        except Exception as exc:  # never leave a caller hanging, whatever it is
            if not isinstance(exc, RedisError | RedisClusterException | OSError | TimeoutError):
                log.exception("publish pipeline failed")
            self._fail(batch, self._error(exc, "the publish"))
            return
        for item, result in zip(batch, results, strict=True):
            if item.future.done():
                continue
            if isinstance(result, Exception):
                item.future.set_exception(self._error(result, "the publish"))
            elif self._target.cluster and not self._sharded:
                item.future.set_result(None)  # a cluster node only counts its own subscribers
            else:
                item.future.set_result(int(result))

    async def _pipeline(self, batch: list[_Outgoing]) -> list[Any]:
        if self._sharded:
            return await self._sharded_pipeline(batch)
        if self._fast_path:
            return await self._fast_pipeline(batch)
        client = self._client
        if client is None:
            raise RedisConnectionError("no publisher connection yet")
        pipe = client.pipeline(transaction=False)
        for item in batch:
            pipe.publish(item.channel, item.message)
        return await pipe.execute(raise_on_error=False)

    async def _fast_pipeline(self, batch: list[_Outgoing]) -> list[Any]:
        """PUBLISH ``batch`` over our own connection: one write, replies in order (see redis_publisher)."""
        publisher = self._publisher
        if publisher is None or not publisher.alive:
            host, port = self._target.nodes[0]
            self._publisher = None
            publisher = await PublishConnection.open(
                host,
                port,
                userinfo=self._target.userinfo,
                client_name=f"{self.settings.namespace}-pub-{safe_segment(self.inbox)}"[:120],
                timeout=self._connect_timeout,
            )
            self._publisher = publisher
        return await self._round_trip(publisher, [pack_publish(item.channel, item.message) for item in batch])

    async def _round_trip(self, publisher: PublishConnection, commands: list[bytes]) -> list[Any]:
        """Write ``commands``, wait for their replies (an error reply, or a lost link's error, as a
        value); TimeoutError after ``publish_timeout``, and the connection is dropped."""
        futures = publisher.send(commands)
        try:
            # replies come in order: once the last is in, every one is (a lost link fails them all)
            async with asyncio.timeout(self.settings.publish_timeout):
                with contextlib.suppress(RedisConnectionError):  # read from every future below
                    await futures[-1]
        except TimeoutError:
            publisher.close()  # a hung server: fail these, and start afresh with the next publish
            raise
        return [future.exception() or future.result() for future in futures]

    async def _sharded_pipeline(self, batch: list[_Outgoing]) -> list[Any]:
        """SPUBLISH ``batch`` keeping its order across shards.

        A cluster pipeline sends to all shards at once, so a message for shard B could overtake an
        earlier one for shard A. Consecutive messages for the same shard go in one pipeline; the next
        run starts only when the previous one was answered.
        """
        assert self._cluster is not None
        slots = self._cluster.nodes_manager
        results: list[Any] = []
        run: list[_Outgoing] = []
        run_owner: str | None = None
        for item in [*batch, None]:
            owner = None if item is None else slots.get_node_from_slot(key_slot(item.channel)).name
            if run and (item is None or owner != run_owner):
                pipe = self._cluster.pipeline(transaction=False)
                for queued in run:
                    pipe.execute_command("SPUBLISH", queued.channel, queued.message)
                results.extend(await pipe.execute(raise_on_error=False))
                run = []
            if item is not None:
                run.append(item)
                run_owner = owner
        return results

    @staticmethod
    def _fail(batch: list[_Outgoing], error: Exception) -> None:
        for item in batch:
            if not item.future.done():
                item.future.set_exception(error)


__all__ = ["RedisBackend"]
