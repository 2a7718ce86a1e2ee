"""AMQP 0-9-1 backend (RabbitMQ, via aio-pika / aiormq, and a consuming connection of its own).

Topology (``ns`` = ``settings.namespace``)
-------------------------------------------

* ``ns`` - the *command exchange*: type ``fanout`` in fanout mode (every node gets every command),
  ``direct`` in routing mode, where the routing key is :meth:`Address.key` (``all``, ``n.<instance>``,
  ``g.<group>``, ``f.<flag>``), so a node receives only the keys it is bound to.
* ``ns.ctl`` - the *control exchange*, always ``direct``: inboxes (``i.<endpoint>``, replies to one
  endpoint) and heartbeats (``hb``). They must work in both modes and must not reach every node in
  fanout mode, so they cannot go through the command exchange. We use a named exchange rather than
  the default exchange (queue name as routing key) because then every subscription, the inbox
  included, is an ordinary binding that ``rabbitmqctl list_bindings`` shows under the namespace,
  and the inbox key does not depend on how the queue happens to be named.
* One queue per endpoint, ``ns.q.<inbox>``: exclusive, auto-delete, non-durable, declared and consumed
  by the link's consuming connection (below). It is bound on
  :meth:`~AmqpBackend.subscribe` and unbound on :meth:`~AmqpBackend.unsubscribe`, so the broker holds
  exactly the keys the endpoint needs. Exclusive means the broker deletes it - with its bindings -
  the moment the connection dies, so a crashed or killed endpoint leaves nothing behind. In fanout
  mode every non-control address maps to the single (keyless) binding to the fanout exchange; it
  is removed when the last such address is unsubscribed.

Both exchanges are **non-durable** and never auto-deleted. Nothing we put on them outlives a broker
restart anyway (queues are exclusive, messages transient), and every endpoint re-declares both
exchanges on every (re)connection, so durability would buy nothing but a leftover definition after
a restart. They are not auto-delete because a ServerUtil that only publishes would otherwise find
the exchange gone when the last node unbinds, and publishing to a missing exchange is a channel
error. Declaring an exchange that exists with another type (a fanout-mode and a routing-mode
deployment sharing a namespace) is refused by the broker; that surfaces as a :class:`BackendError`
naming the namespace and mode.

Delivery
--------

Messages are published non-persistent and ``mandatory=False`` (pub/sub: a command no node wants is
simply dropped). The queue has a single consumer with ``no_ack=True``: at-most-once and the fastest
path - RabbitMQ pushes without waiting for acknowledgements. ``basic.qos`` (prefetch) is
deliberately *not* sent: RabbitMQ applies prefetch only to unacknowledged deliveries, so it has no
effect on a ``no_ack`` consumer and would only cost a round trip; flow control on this path is TCP
back-pressure.

A link is two connections: aio-pika's (the exchanges, publishing) and, on plain ``amqp://``, a
:class:`~fanout.backends.amqp_consumer.ConsumeConnection` that declares the queue, binds it and consumes
it, cutting each delivery's body out of what a read brought and handing it to ``on_message`` in broker
order (through aiormq a delivery cost a node 40-60 us of CPU; this way about 2). Either connection lost
is the link lost. Over TLS (``amqps://``) the queue is declared and consumed on aio-pika's connection
(aiormq starts one task per delivery, in order, and our callback calls the handler before its first
suspension point).

Publishing and publisher confirms
---------------------------------

By default the channel has **no publisher confirms**: :meth:`~AmqpBackend.publish` returns as soon
as the frames are queued on the connection's (bounded) write queue - no round trip and no wait for
the socket per message, so publishes are pipelined (a full queue makes the next publish wait, which
is the back-pressure, bounded by the publish timeout). The cost: a message written just before the
connection dies can be lost without an error (the same at-most-once as the delivery side).
``?confirms=1`` on the URL (stripped before the URL reaches aio-pika) turns confirms on: every
publish then waits for the broker's ``basic.ack`` (one round trip, still pipelined across concurrent
publishers) and raises if the broker nacks it or the link dies before the ack. Either way a publish
never waits longer than ``settings.publish_timeout`` and the order of concurrent publishes is kept:
calls queue in one outbox and a writer task turns everything queued since its last write into one
socket write, the AMQP frames built by :func:`_publish_frames` (aiormq's ``basic_publish`` builds
them with pamqp and writes once per message: most of a publisher's CPU). ``publish`` returns
``None``: AMQP does not tell how many queues got a message.

Reconnection: one retry layer, our own
--------------------------------------

We use plain (non-robust) ``aio_pika.Connection`` objects and our own supervisor task, *not*
``connect_robust``. aio-pika 10's ``RobustConnection`` restores channels, queues, bindings and
consumers from its *own* records, which does not fit this contract:

* ``RobustQueue.unbind`` forgets a binding only after the broker confirmed the unbind; an unbind
  attempted while the link is down raises before that, so the stale binding is re-created on
  reconnect. A bind attempted while down is not recorded at all. We need "exactly the
  subscriptions wanted *now*", so we would have to fight its memory on every reconnect.
* It retries at a fixed ``reconnect_interval`` (default 5 s), not with capped exponential backoff.
* Its records are weak references to channel/queue objects (a queue object that goes out of scope
  is silently not restored), and restore failures are retried inside the connection's own task,
  outside our control - several reported cases (aio-pika issues #231, #563) ended with a
  reconnected connection whose consumer was never restored.
* Two retry layers (its loop plus ours to fix the bindings) would race each other.

So on any loss (either connection closed, or a channel closed - which we also treat as a lost link,
closing the connections so the exclusive queue and its bindings die with them) the supervisor marks
the backend unhealthy, counts the outage, fires ``on_disconnect``, and then retries with
:func:`backoff_delays` (0.1 s doubling to 5 s): connect, open the channel, declare both
exchanges, re-declare the queue under the *same* name (the broker deleted it with the old
connection), start the consumer, and bind exactly ``self.subscriptions`` - re-reading the set until
it stops changing, so subscribe/unsubscribe calls made while down or during the restore are
honoured. Only then ``healthy`` turns True, ``reconnects`` is counted and ``on_reconnect`` fires.
If the broker has not yet noticed the old connection's death (e.g. a silent network partition), the
re-declaration of the exclusive queue is refused (RESOURCE_LOCKED) and simply retried with backoff
until the broker's heartbeat check drops the old connection.

Link-loss detection relies on the socket closing, or on AMQP heartbeats for silent failures. The
heartbeat defaults to 10 s here (the broker default is 60 s) unless the URL sets ``heartbeat=``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import struct
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, cast

import aio_pika
import aiormq
from aio_pika.abc import AbstractChannel
from aiormq.abc import ChannelFrame, DeliveredMessage
from yarl import URL

from ..config import Mode, Settings
from ..exceptions import BackendError, BackendUnavailable, ConfigError, ConfigMismatch, NotConnected
from ..naming import Address, Kind, safe_segment
from .amqp_consumer import FRAME, ConsumeConnection, Refused
from .base import Backend, MessageHandler, backoff_delays, fire_and_forget_guard

log = logging.getLogger("fanout.backend.amqp")

#: control addresses: never on the command exchange (they must not reach every node in fanout mode)
_CONTROL_KINDS = frozenset({Kind.INBOX, Kind.HEARTBEAT, Kind.WORKERS, Kind.PRESENCE})
#: AMQP heartbeat (seconds) when the URL does not set one
DEFAULT_HEARTBEAT = 10
#: delivery_mode 1 = transient: the broker never writes our messages to disk
#: at most this many publish calls go into one socket write
_WRITE_BATCH = 1000
#: how long close() waits for the broker to acknowledge the goodbye
_CLOSE_TIMEOUT = 2.0

_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off", ""})

#: errors that mean "the link is (or just went) down", as opposed to a broker refusal
_LINK_ERRORS: tuple[type[BaseException], ...] = (
    aiormq.exceptions.AMQPConnectionError,  # includes ConnectionClosed
    aiormq.exceptions.ChannelInvalidStateError,  # operation on a channel closed under us
    ConnectionError,
    OSError,
)

Binding = tuple[str, str]  # (exchange, routing key)

#: what a publish may raise that the caller gets as one of ours
_PUBLISH_ERRORS: tuple[type[BaseException], ...] = (
    TimeoutError,
    aio_pika.exceptions.DeliveryError,
    *_LINK_ERRORS,
    aiormq.exceptions.AMQPError,
)


class _VhostRefused(Exception):
    """aiormq's InvalidFrameError "Expected one of ['Connection.OpenOk'], got <Connection.Close ...>"."""


#: How aio-pika / aiormq errors become ours - the one table, first match wins: (their classes, our
#: class, message). Every message goes through :meth:`AmqpBackend._error` (which names the backend
#: without its password and takes the password out of the library's text).
_TRANSLATION: tuple[tuple[tuple[type[BaseException], ...], type[BackendError], str], ...] = (
    ((TimeoutError,), BackendUnavailable, "{where}: {what}: no answer within {timeout:g}s"),
    (
        (aiormq.exceptions.ChannelPreconditionFailed,),
        BackendError,
        "{where}: the broker refused {what} ({exc!r}); does an exchange named {exchange!r} exist with "
        "a type other than {kind!r} (another mode on the same namespace)?",
    ),
    (
        (aiormq.exceptions.ProbableAuthenticationError,),
        BackendError,
        "{where}: authentication refused: {exc!r}",
    ),
    (
        # the broker answered Connection.Open with Connection.Close (RabbitMQ: 530 NOT_ALLOWED "vhost X not
        # found" or "access to vhost X refused"); aiormq keeps only the frame's repr: see _error
        (_VhostRefused,),
        BackendError,
        "{where}: the broker refused virtual host {vhost!r}: it does not exist, or this user may not use "
        "it (rabbitmqctl add_vhost / set_permissions)",
    ),
    ((aio_pika.exceptions.DeliveryError,), BackendError, "{where}: the broker refused {what}: {exc!r}"),
    (_LINK_ERRORS, BackendUnavailable, "{where}: broker not reachable ({what}): {exc!r}"),
    ((aiormq.exceptions.AMQPError, Refused), BackendError, "{where}: the broker refused {what}: {exc!r}"),
    ((Exception,), BackendError, "{where}: {what} failed: {exc!r}"),
)


def parse_url(url: str, connection_name: str | None = None) -> tuple[URL, bool]:
    """Split our own options off an AMQP URL.

    Returns the URL to hand to aio-pika (without ``confirms``; with a default ``heartbeat`` and,
    if given, a default ``name`` - the connection name operators see in ``rabbitmqctl`` and the
    management UI) and whether publisher confirms are wanted. Raises :class:`ConfigError` for a
    bad ``confirms`` or ``heartbeat`` value.
    """
    parsed = URL(url)
    raw = parsed.query.get("confirms", "0").strip().lower()
    if raw in _TRUE:
        confirms = True
    elif raw in _FALSE:
        confirms = False
    else:
        raise ConfigError("FANOUT_URL", f"confirms={raw!r} is not a boolean; accepted: 1/0, true/false")
    query = {key: value for key, value in parsed.query.items() if key != "confirms"}
    query.setdefault("heartbeat", str(DEFAULT_HEARTBEAT))
    heartbeat = query["heartbeat"].strip()
    if not heartbeat.isdigit() or int(heartbeat) > 65535:  # (aiormq would take it as 0: no heartbeats)
        raise ConfigError("FANOUT_URL", f"heartbeat={heartbeat!r} is not a number of seconds 0..65535")
    if connection_name:
        query.setdefault("name", connection_name)
    return parsed.with_query(query), confirms


class _Bindings(Protocol):
    """Where a link's queue is bound and unbound: its consuming connection (:class:`ConsumeConnection`),
    or over TLS its aio-pika queue; each returns once the broker confirmed."""

    async def bind(self, exchange: str, routing_key: str) -> Any: ...

    async def unbind(self, exchange: str, routing_key: str) -> Any: ...


@dataclass(eq=False)
class _Link:
    """One link's worth of state (its connection, and its consuming connection); replaced wholesale on
    reconnect."""

    connection: aio_pika.abc.AbstractConnection
    lost: asyncio.Event = field(default_factory=asyncio.Event)
    #: serialises binding changes on this link (subscribe/unsubscribe/restore)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    channel: AbstractChannel | None = None
    raw: aiormq.Channel | None = None  # the aiormq channel, for the fast paths
    #: the connection the queue is consumed through (plain ``amqp://``; over TLS, ``connection``'s)
    consumer: ConsumeConnection | None = None
    bindings: _Bindings | None = None
    consumer_tag: str | None = None
    #: bindings the broker confirmed on this link's queue
    bound: set[Binding] = field(default_factory=set)
    #: set by us before closing, so our own close is not mistaken for a loss
    closing: bool = False


@dataclass(slots=True)
class _Queued:
    """One publish_many call waiting for the writer: its messages as (exchange, key, body)."""

    frames: list[tuple[bytes, bytes, bytes]]
    done: asyncio.Future[None]
    confirmations: list[asyncio.Future[Any]] = field(default_factory=list)


def _when_confirmed(queued: _Queued) -> None:
    """Resolve ``queued.done`` once the broker acked all its messages (or with the first refusal)."""
    remaining = len(queued.confirmations)

    def one(confirmation: asyncio.Future[Any]) -> None:
        nonlocal remaining
        remaining -= 1
        if queued.done.done():
            return
        if confirmation.cancelled():
            queued.done.set_exception(aiormq.exceptions.ChannelInvalidStateError("channel closed"))
        elif confirmation.exception() is not None:
            queued.done.set_exception(cast(BaseException, confirmation.exception()))
        elif remaining == 0:
            queued.done.set_result(None)

    for confirmation in queued.confirmations:
        confirmation.add_done_callback(one)


def _publish_frames(
    channel: int, exchange: bytes, key: bytes, body: bytes, max_body: int, delivery_mode: int
) -> bytes:
    """One message as AMQP 0-9-1 frames: basic.publish (not mandatory, not immediate), a content header
    with only the delivery mode (1 transient, 2 persistent), and the body in frames of at most
    ``max_body`` bytes."""
    method = b"%s%c%s%c%s\x00" % (_PUBLISH_METHOD, len(exchange), exchange, len(key), key)
    header = _CONTENT_HEADER.pack(60, 0, len(body), 0x1000, delivery_mode)
    out = [
        FRAME.pack(1, channel, len(method)),
        method,
        b"\xce",
        FRAME.pack(2, channel, len(header)),
        header,
    ]
    out.append(b"\xce")
    for start in range(0, len(body), max_body):
        chunk = body[start : start + max_body]
        out += (FRAME.pack(3, channel, len(chunk)), chunk, b"\xce")
    return b"".join(out)


_PUBLISH_METHOD = struct.pack(">HHH", 60, 40, 0)  #: basic.publish, reserved-1
_CONTENT_HEADER = struct.Struct(">HHQHB")  #: class, weight, body size, property flags, delivery-mode


async def publish_raw(
    raw: aiormq.abc.AbstractChannel,
    messages: Sequence[tuple[bytes, bytes, bytes]],
    *,
    persistent: bool = False,
) -> list[asyncio.Future[Any]]:
    """Write ``messages`` (exchange, routing key, body) on aiormq channel ``raw`` in one write, as frames
    built here (not one ``basic_publish`` and one write each). On a channel with publisher confirms, one
    future per message, resolved by the broker's ack (``DeliveryError`` on a nack, the channel's error if it
    closes first); else none. Raises what the channel raises when it is closed."""
    if not isinstance(raw, aiormq.Channel):  # (the fields used here are the concrete channel's)
        raise BackendError(f"unexpected aiormq channel type {type(raw).__name__}")
    if not messages:
        return []
    confirms = raw.publisher_confirms
    confirmations: list[asyncio.Future[Any]] = []
    async with raw.lock:
        number, max_body, mode = raw.number, raw.max_content_size, 2 if persistent else 1
        payload = []
        for exchange, key, body in messages:
            payload.append(_publish_frames(number, exchange, key, body, max_body, mode))
            if confirms:
                raw.delivery_tag += 1
                confirmation = raw.create_future()
                raw.confirmations[raw.delivery_tag] = confirmation
                confirmations.append(confirmation)
        await raw.write_queue.put(ChannelFrame(payload=b"".join(payload), should_close=False))
    return confirmations


class AmqpBackend(Backend):
    """One endpoint's link to RabbitMQ (see the module docstring for topology and guarantees)."""

    def __init__(self, settings: Settings, *, inbox: str) -> None:
        super().__init__(settings, inbox=inbox)
        ns = settings.namespace
        self._url, self.confirms = parse_url(settings.url, f"fanout {ns} {inbox}")
        self.exchange_name = ns
        self.control_exchange_name = f"{ns}.ctl"
        self.queue_name = f"{ns}.q.{safe_segment(inbox)}"
        self._fanout = settings.mode is Mode.FANOUT
        self._exchange_type = aio_pika.ExchangeType.FANOUT if self._fanout else aio_pika.ExchangeType.DIRECT
        self._handler: MessageHandler | None = None
        self._link: _Link | None = None
        #: set while connected with every wanted binding in place
        self._up = asyncio.Event()
        self._supervisor: asyncio.Task[None] | None = None
        self._closed = False
        #: publishes waiting for the writer task, in call order (see publish_many)
        self._outbox: deque[_Queued] = deque()
        self._wake = asyncio.Event()
        self._writer: asyncio.Task[None] | None = None

    # -- addresses -> exchanges / keys -------------------------------------------------------

    def binding_for(self, address: Address) -> Binding:
        """The (exchange, routing key) a subscription to ``address`` needs."""
        if address.kind in _CONTROL_KINDS:
            return self.control_exchange_name, address.key()
        if self._fanout:
            return self.exchange_name, ""  # a fanout exchange ignores keys: one binding for all
        return self.exchange_name, address.key()

    def route_for(self, address: Address) -> Binding:
        """The (exchange, routing key) a message to ``address`` is published with."""
        if address.kind in _CONTROL_KINDS:
            return self.control_exchange_name, address.key()
        # in fanout mode the key is ignored by the exchange but kept for tracing / firehose
        return self.exchange_name, address.key()

    def wanted_bindings(self) -> set[Binding]:
        return {self.binding_for(address) for address in self.subscriptions}

    # -- lifecycle ------------------------------------------------------------------------------

    async def connect(self, on_message: MessageHandler) -> None:
        """Connect, declare, bind ``self.subscriptions`` and start consuming.

        Raises :class:`BackendUnavailable` if the broker cannot be reached within
        ``settings.publish_timeout``, :class:`BackendError` if it refuses (bad credentials, an
        exchange of the namespace exists with another type, ...). On success the link is kept up
        by a background supervisor until :meth:`close`.
        """
        if self._closed:
            raise NotConnected("AMQP backend is closed")
        if self._link is not None:
            raise BackendError("AMQP backend is already connected")
        self._handler = on_message
        try:
            await self._open(self.settings.publish_timeout)
        except BaseException:
            self._handler = None
            raise
        self._supervisor = asyncio.create_task(self._supervise(), name=f"fanout-amqp-{self.inbox}")
        self._supervisor.add_done_callback(fire_and_forget_guard)

    async def close(self) -> None:
        """Cancel the consumer and close the channel and connection; idempotent.

        The broker deletes the exclusive queue, and with it every binding, when the connection
        closes. Errors while saying goodbye to a broker that is already gone are ignored.
        """
        if self._closed:
            return
        self._closed = True
        self._up.clear()
        supervisor, self._supervisor = self._supervisor, None
        writer, self._writer = self._writer, None
        for task in (supervisor, writer):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        self._fail_outbox(NotConnected("AMQP backend was closed"))
        link, self._link = self._link, None
        if link is not None:
            await self._discard(link, graceful=True)
        self._handler = None
        # wake publishers still waiting for a reconnect: they find no link and raise NotConnected
        # at once instead of waiting out their timeout (healthy stays False: it checks _closed)
        self._up.set()

    @property
    def healthy(self) -> bool:
        return self._up.is_set() and not self._closed

    def _error(self, exc: BaseException, what: str, timeout: float = 0.0) -> BackendError:
        """Our exception for a library one (see ``_TRANSLATION``), password taken out of the message."""
        if isinstance(exc, BackendError):
            return exc  # already ours (and already redacted)
        text = str(exc)
        refused = isinstance(exc, aiormq.exceptions.InvalidFrameError) and (
            "Connection.OpenOk" in text and "Connection.Close" in text
        )
        for classes, ours, template in _TRANSLATION:
            if isinstance(_VhostRefused() if refused else exc, classes):
                text = template.format(
                    where=self.describe(),
                    what=what,
                    exc=exc,
                    timeout=timeout,
                    exchange=self.exchange_name,
                    kind=self._exchange_type.value,
                    vhost=(self._url.path[1:] or "/").replace("%2F", "/"),
                )
                error = ours(self.settings.redact(text))
                error.__cause__ = exc
                return error
        raise AssertionError("unreachable: the last row matches every Exception")

    def describe(self) -> str:
        confirms = ", confirms" if self.confirms else ""
        where = self._url.with_password(None).with_query(None)  # never log the password
        return f"AmqpBackend({where!s}, mode={self.settings.mode}, inbox={self.inbox!r}{confirms})"

    # -- subscriptions ----------------------------------------------------------------------------

    async def subscribe(self, addresses: Iterable[Address]) -> None:
        """Add ``addresses`` to the wanted set; returns once the broker confirmed the bindings.

        While the link is down it returns at once (the bindings are made on reconnect). Raises
        :class:`BackendUnavailable` if the broker does not answer within ``publish_timeout``,
        :class:`BackendError` if it refuses.
        """
        self.subscriptions |= set(addresses)
        await self._apply()

    async def unsubscribe(self, addresses: Iterable[Address]) -> None:
        """Remove ``addresses`` (never the inbox); returns once the broker confirmed the unbinds.

        Same timing and errors as :meth:`subscribe`.
        """
        self.subscriptions -= set(addresses) - {self.inbox_address}
        await self._apply()

    async def _apply(self) -> None:
        link = self._link
        if link is None or not self._up.is_set():
            return  # down (or connecting): the restore binds exactly self.subscriptions
        try:
            async with asyncio.timeout(self.settings.publish_timeout):
                async with link.lock:
                    await self._reconcile(link)
        except TimeoutError as exc:
            # a bind cut short leaves the channel's state unknown: rebuild the link from scratch
            self._mark_lost(link)
            raise self._error(exc, "the binding change", self.settings.publish_timeout) from exc
        except _LINK_ERRORS as exc:
            # the link died under us: we are down now, and the reconnect applies the wanted set
            log.debug("binding change interrupted by link loss: %r", exc)
            self._mark_lost(link)
        except (aiormq.exceptions.AMQPError, Refused) as exc:
            self._mark_lost(link)  # a refused bind closes the channel: rebuild the link
            raise self._error(exc, "a binding change") from exc

    async def _reconcile(self, link: _Link) -> None:
        """Make the broker's bindings of the link's queue equal to the wanted set (caller holds the lock).

        Loops until the wanted set stops changing while we await the broker.
        """
        queue = link.bindings
        assert queue is not None
        while True:
            wanted = self.wanted_bindings()
            extra = link.bound - wanted
            missing = wanted - link.bound
            if not extra and not missing:
                return
            for exchange, key in sorted(missing):
                await queue.bind(exchange, key)  # returns on bind-ok
                link.bound.add((exchange, key))
            for exchange, key in sorted(extra):
                await queue.unbind(exchange, key)  # returns on unbind-ok
                link.bound.discard((exchange, key))

    # -- publishing --------------------------------------------------------------------------------

    async def publish_many(self, items: Sequence[tuple[Address, bytes]]) -> list[int | None]:
        """Hand the messages to the broker in order; returns ``None`` for each (no receiver count).

        Without confirms this returns once the frames are queued for the socket; with
        ``?confirms=1`` once the broker acked. While the link is down it waits for the reconnect,
        up to ``settings.publish_timeout`` in all. Calls go to one outbox, in call order; one
        writer task turns everything queued since its last write into one socket write (AMQP
        frames built here, not one aiormq ``basic_publish`` and one write per message), so
        concurrent publishers share writes and never interleave.

        Raises :class:`NotConnected` before :meth:`connect` / after :meth:`close`,
        :class:`BackendUnavailable` if a message could not be handed over in time or the link
        died during the hand-over, :class:`BackendError` if the broker refused it (nack).
        """
        if self._closed or self._handler is None:
            raise NotConnected("AMQP backend is not connected")
        frames = []
        for address, message in items:
            exchange, key = self.route_for(address)
            frames.append((exchange.encode(), key.encode(), message))
            if len(frames[-1][1]) > 255:
                raise BackendError(f"{self.describe()}: routing key {key[:40]!r}... is over 255 bytes")
        queued = _Queued(frames, asyncio.get_running_loop().create_future())
        self._outbox.append(queued)
        self._wake.set()
        if self._writer is None:
            self._writer = asyncio.create_task(self._write_loop(), name=f"fanout-amqp-writer-{self.inbox}")
            self._writer.add_done_callback(fire_and_forget_guard)
        timeout = self.settings.publish_timeout
        try:
            async with asyncio.timeout(timeout):
                await queued.done
        except _PUBLISH_ERRORS as exc:
            queued.done.cancel()  # not written yet: it never will be
            raise self._error(exc, "the publish", timeout) from exc
        return [None] * len(frames)

    async def _write_loop(self) -> None:
        """Write what the outbox holds, a batch per write, for as long as the backend lives."""
        while not self._closed:
            await self._wake.wait()
            self._wake.clear()
            while self._outbox:
                try:
                    raw = await self._usable_channel()
                except NotConnected as exc:
                    self._fail_outbox(exc)
                    return
                batch: list[_Queued] = []
                while self._outbox and len(batch) < _WRITE_BATCH:
                    queued = self._outbox.popleft()
                    if not queued.done.done():  # its caller gave up: never written
                        batch.append(queued)
                if batch:
                    await self._write(raw, batch)

    async def _write(self, raw: aiormq.Channel, batch: list[_Queued]) -> None:
        confirms = self.confirms
        try:
            confirmations = await publish_raw(raw, [frames for queued in batch for frames in queued.frames])
            if confirms:
                at = 0
                for queued in batch:
                    queued.confirmations = confirmations[at : at + len(queued.frames)]
                    at += len(queued.frames)
        except Exception as exc:  # the channel closed under us, ...: these callers learn it now
            for queued in batch:
                if not queued.done.done():
                    queued.done.set_exception(exc)
            return
        for queued in batch:
            if not confirms or not queued.confirmations:
                if not queued.done.done():
                    queued.done.set_result(None)
            else:
                _when_confirmed(queued)

    def _fail_outbox(self, error: Exception) -> None:
        outbox, self._outbox = self._outbox, deque()
        for queued in outbox:
            if not queued.done.done():
                queued.done.set_exception(error)

    async def _usable_channel(self) -> aiormq.Channel:
        """The current link's raw channel, waiting for a reconnect while the link is down."""
        while True:
            if not self._up.is_set():
                await self._up.wait()
            link = self._link
            raw = link.raw if link is not None else None
            if link is not None and raw is not None and not raw.is_closed:
                return raw
            if self._closed:
                raise NotConnected("AMQP backend was closed")
            # the link died and its close callback has not run yet: mark it down ourselves (so the
            # loop waits for the reconnect instead of spinning)
            if link is not None:
                self._mark_lost(link)
            self._up.clear()

    # -- connection management ------------------------------------------------------------------

    async def _open(self, timeout: float) -> None:
        """Build a complete link within ``timeout`` seconds and make it current.

        Raises :class:`BackendUnavailable` (unreachable / timed out / dropped meanwhile) or
        :class:`BackendError` (refused); nothing is left open on failure.
        """
        connection = aio_pika.Connection(self._url)
        link = _Link(connection)
        try:
            async with asyncio.timeout(timeout):
                await connection.connect(timeout=timeout)
                connection.close_callbacks.add(lambda *_: self._mark_lost(link))
                channel = connection.channel(publisher_confirms=self.confirms)
                await channel.initialize(timeout=timeout)
                channel.close_callbacks.add(lambda *_: self._mark_lost(link))
                link.channel = channel
                raw = await channel.get_underlay_channel()
                # publish(wait=False) exists on the concrete aiormq channel, not on its ABC
                if not isinstance(raw, aiormq.Channel):
                    raise BackendError(f"unexpected aiormq channel type {type(raw).__name__}")
                link.raw = raw
                # aiormq hands frames from the socket to the channel through a queue of 10 (about 3
                # messages), so a backlog reached the node a few messages per loop pass and could not be
                # applied as one batch: unbounded, everything read from the socket goes through at once
                # (the socket read itself stays bounded by the stream reader's limit)
                raw.frames._maxsize = 0  # type: ignore[attr-defined]  # (asyncio.Queue keeps its bound there)
                for name, kind in (
                    (self.exchange_name, self._exchange_type),
                    (self.control_exchange_name, aio_pika.ExchangeType.DIRECT),
                ):
                    await channel.declare_exchange(name, kind, durable=False, auto_delete=False)
                link.consumer_tag = f"{self.queue_name}.consumer"
                if self._url.scheme == "amqp":
                    await self._consume_apart(link)
                else:  # TLS: consumed through aiormq (its certificate options are the URL's)
                    link.bindings = await channel.declare_queue(
                        self.queue_name, exclusive=True, auto_delete=True, durable=False
                    )
                    await raw.basic_consume(
                        self.queue_name, self._on_delivery, no_ack=True, consumer_tag=link.consumer_tag
                    )
                async with link.lock:
                    await self._reconcile(link)
                    if link.lost.is_set():
                        raise BackendUnavailable(f"{self.describe()}: link lost while connecting")
                    # no await between the last check of the wanted set and going live
                    self._link = link
                    self._up.set()
        except BaseException as exc:
            await self._discard(link, graceful=False)
            mismatch = self._mode_mismatch(exc)
            if mismatch is not None:
                raise mismatch from exc
            if isinstance(exc, (TimeoutError, aiormq.exceptions.AMQPError, Refused, *_LINK_ERRORS)):
                raise self._error(exc, "the connection", timeout) from exc
            raise

    async def _consume_apart(self, link: _Link) -> None:
        """Declare and consume the queue through a connection of its own (:class:`ConsumeConnection`):
        its loss is the link's."""
        handler = self._handler
        assert handler is not None and link.consumer_tag is not None
        name = f"{self._url.query.get('name', 'fanout')} consumer"
        consumer = ConsumeConnection(self._url, handler, lambda: self._mark_lost(link), name=name)
        link.consumer = link.bindings = consumer
        await consumer.open(self.queue_name, link.consumer_tag)

    def _mode_mismatch(self, exc: BaseException) -> ConfigMismatch | None:
        """The command exchange exists with the other type: the namespace's nodes use the other mode."""
        if not isinstance(exc, aiormq.exceptions.ChannelPreconditionFailed):
            return None
        found = re.search(r"inequivalent arg 'type' for exchange '([^']*)'.*current is '(\w+)'", str(exc))
        if found is None or found.group(1) != self.exchange_name:
            return None
        theirs = Mode.FANOUT if found.group(2) == "fanout" else Mode.ROUTING
        return ConfigMismatch(
            "FANOUT_MODE",
            f"this endpoint uses {self.settings.mode.value!r} mode but namespace {self.exchange_name!r} "
            f"on {self.settings.where} runs in {theirs.value!r} mode (its exchange is a {found.group(2)!r} "
            "exchange)",
        )

    def _mark_lost(self, link: _Link) -> None:
        """Close callback / error path: ``link`` is gone (unless we are closing it ourselves)."""
        if link.closing:
            return
        link.lost.set()
        if self._link is link:
            self._up.clear()

    async def _discard(self, link: _Link, *, graceful: bool) -> None:
        """Close ``link``'s connection, ignoring errors; on a graceful close cancel the consumer first."""
        link.closing = True
        connection = link.connection
        try:
            async with asyncio.timeout(_CLOSE_TIMEOUT):
                if link.consumer is not None and graceful:
                    await link.consumer.close()  # (the broker deletes the queue)
                if graceful and link.raw is not None and not link.raw.is_closed:
                    if link.consumer is None and link.consumer_tag is not None:
                        await link.raw.basic_cancel(link.consumer_tag)
                    if link.channel is not None:
                        await link.channel.close()
                await connection.close()
        except (TimeoutError, Exception) as exc:
            log.debug("closing %s: %r", self.describe(), exc)
            # the polite close failed or hung: make sure the socket is gone anyway
            with contextlib.suppress(Exception):
                await asyncio.wait_for(connection.close(), _CLOSE_TIMEOUT)
        finally:
            if link.consumer is not None:
                link.consumer.abort()

    async def _supervise(self) -> None:
        """Background task: wait for the current link to die, then reconnect; until close()."""
        while not self._closed:
            link = self._link
            assert link is not None
            await link.lost.wait()
            self._up.clear()
            self.outages += 1
            log.warning("%s: link to the broker lost; reconnecting", self.describe())
            await self._fire(self.on_disconnect, "on_disconnect")
            await self._discard(link, graceful=False)
            await self._reconnect()

    async def _reconnect(self) -> None:
        attempt = 0
        for delay in backoff_delays():
            await asyncio.sleep(delay)
            attempt += 1
            try:
                await self._open(max(self.settings.publish_timeout, 1.0))
            except Exception as exc:  # whatever went wrong, keep trying: that is this task's job
                log.warning("reconnect attempt %d failed: %s", attempt, exc)
                continue
            self.reconnects += 1
            log.warning("%s: reconnected after %d attempt(s)", self.describe(), attempt)
            await self._fire(self.on_reconnect, "on_reconnect")
            return

    # -- delivery ----------------------------------------------------------------------------------

    async def _on_delivery(self, message: DeliveredMessage) -> None:
        # aiormq runs this as one task per delivery, created in delivery order; calling the
        # handler before any await keeps that order.
        handler = self._handler
        if handler is None:
            return
        try:
            handler(message.body)
        except Exception:  # a broken handler must not kill the consumer
            log.exception("%s: on_message handler failed", self.describe())


__all__ = ["DEFAULT_HEARTBEAT", "AmqpBackend", "parse_url"]
