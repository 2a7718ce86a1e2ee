"""The worker tier on RabbitMQ: a durable quorum queue per shard, consumed with manual acknowledgement.

Topology (``<ns>`` the namespace, ``<k>`` the shard):

* exchange ``<ns>.ev`` (direct, durable); queue ``<ns>.ev.<k>`` (durable, quorum where the broker has
  them, bound with key ``<k>``). Events are published persistent, with publisher confirms: the node
  counts an event as handed over only once the broker confirmed it.
* **Backlog.** A node reads each shard's depth (``queue.declare`` passive, ready messages) at most every
  0.2 s while it sends, and stops offering events to a shard whose depth reached ``backlog``. The queue
  also has ``x-max-length`` = 2 x backlog with ``reject-publish`` as a hard stop: the broker nacks what
  comes once the queue is over it and the node keeps the event. (A quorum queue applies the limit as it
  applies publishes: a batch in flight can overshoot it - 16 for a limit of 10 in the test.)
* **Ownership.** Shard queues are *single active consumer* queues: however many workers consume one
  (while shards move, or when a partition made each worker think it is alone), the broker delivers to
  one of them at a time. The owner consumes on a connection of its own per shard
  (:class:`~fanout.backends.amqp_consumer.ConsumeConnection`; over TLS a channel of aio-pika's connection)
  with a bounded prefetch. Giving a shard up: stop starting its events, finish and acknowledge those in
  hand, then close the shard's connection (channel): the broker requeues what was prefetched and not
  started and only then makes the next consumer active, handing it the requeued events first. A worker
  that dies drops its connections and the broker requeues everything it had not acknowledged
  (``redelivered``). (Exclusive consumers would not do: quorum queues do not enforce them.)
* **Dead letters**: queue ``<ns>.ev.dead`` (durable); listing gets every message and requeues them.
* **Cleanup** (:meth:`AmqpEventLog.remove`): the queues of shards ``0 .. shards-1`` (the shard count it is
  given: RabbitMQ cannot be asked for queues by name pattern over AMQP), the dead letters, the roster
  stream and the exchange.
* **Rosters**: stream ``<ns>.ev.roster`` (``x-queue-type: stream``, kept 10 minutes). Nodes append what
  changes (connection added / removed / flag changed) and, every 30 s, a snapshot of their whole roster,
  plus ``up`` at start and ``down`` at a clean stop. The leading worker reads the stream from 10 minutes
  back and keeps every node's roster; for a lost node it publishes the close events, then a ``gone``
  record so that later leaders do not do it again. (A node that died more than 10 minutes before any
  worker ran gets no close events: its roster has left the stream.)
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import aio_pika
import aiormq
import orjson
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage

from ..config import Settings
from ..exceptions import BackendError, BackendUnavailable
from .amqp import parse_url, publish_raw
from .amqp_consumer import ConsumeConnection, Refused
from .eventlog import Appended, DeadLetter, Delivery, EventLog

log = logging.getLogger("fanout.backend.amqp.events")

_DEPTH_EVERY = 0.2  #: seconds between depth checks of a shard a node sends to
_PREFETCH = 256  #: deliveries a shard's consumer may hold unacknowledged
ROSTER_RETENTION = 600  #: seconds the roster stream keeps its records
SNAPSHOT_EVERY = 30.0  #: seconds between a node's roster snapshots
_PERSISTENT = aio_pika.DeliveryMode.PERSISTENT
_ERRORS: tuple[type[BaseException], ...] = (
    aiormq.exceptions.AMQPError,
    aio_pika.exceptions.AMQPException,
    ConnectionError,
    OSError,
    TimeoutError,
)


_Method = TypeVar("_Method", bound=Callable[..., Awaitable[Any]])


def _bounded(what: str) -> Callable[[_Method], _Method]:
    """Run the operation within the publish timeout; a failure is raised as one of ours (the next call
    reopens a connection that closed)."""

    def wrap(method: _Method) -> _Method:
        @functools.wraps(method)
        async def bounded(self: AmqpEventLog, *args: Any, **kwargs: Any) -> Any:
            try:
                async with asyncio.timeout(self.settings.publish_timeout):
                    return await method(self, *args, **kwargs)
            except BackendError:
                raise
            except Exception as exc:  # any library error on a broken link (aio-pika raises several kinds)
                raise self._error(exc, what) from exc

        return bounded  # type: ignore[return-value]

    return wrap


@dataclass(frozen=True, slots=True)
class _Tag:
    """A delivery's token when its shard is read through a :class:`ConsumeConnection`."""

    connection: ConsumeConnection
    tag: int

    def __repr__(self) -> str:
        return f"delivery {self.tag} on {self.connection.name!r}"


@dataclass
class _Consumer:
    """A shard's consumer: its own connection (plain ``amqp://``) or a channel of aio-pika's (TLS)."""

    connection: ConsumeConnection | None = None
    channel: AbstractChannel | None = None
    inbox: asyncio.Queue[Delivery] = field(default_factory=asyncio.Queue)

    @property
    def alive(self) -> bool:
        if self.connection is not None:
            return self.connection.is_open
        return self.channel is not None and not self.channel.is_closed

    async def close(self) -> None:
        """Give the shard back: the broker requeues what was not acknowledged."""
        if self.connection is not None:
            await self.connection.close()
        elif self.channel is not None:
            await self.channel.close()


class AmqpEventLog(EventLog):
    def __init__(self, settings: Settings, *, shards: int, backlog: int, node: str = "") -> None:
        super().__init__(settings, shards=shards, backlog=backlog, node=node)
        self._url, _ = parse_url(settings.url, f"fanout {settings.namespace} events {node or 'worker'}")
        ns = settings.namespace
        self.exchange_name = f"{ns}.ev"
        self.dead_name = f"{ns}.ev.dead"
        self.roster_name = f"{ns}.ev.roster"
        self._connection: aio_pika.abc.AbstractConnection | None = None
        self._channel: AbstractChannel | None = None  #: publishing (confirms)
        self._exchange: aio_pika.abc.AbstractExchange | None = None
        self._depth: dict[int, tuple[float, int]] = {}  #: shard -> (checked at, ready messages)
        self._consumers: dict[int, _Consumer] = {}
        self._snapshots: asyncio.Task[None] | None = None
        # the leader's view of every node's roster, from the stream
        self._rosters: dict[str, dict[str, str | None]] = {}
        self._roster_reader: tuple[AbstractChannel, str] | None = None
        self._lock = asyncio.Lock()
        #: shard consumers on connections of their own (plain ``amqp://``); else channels of aio-pika's
        #: connection (``amqps://``: TLS stays aio-pika's business)
        self.own_connections = self._url.scheme == "amqp"

    def queue_name(self, shard: int) -> str:
        return f"{self.settings.namespace}.ev.{shard}"

    def _shard_arguments(self) -> dict[str, Any]:
        return {
            "x-queue-type": "quorum",
            "x-single-active-consumer": True,
            "x-max-length": 2 * self.backlog,
            "x-overflow": "reject-publish",
        }

    # -- lifecycle

    async def connect(self) -> None:
        await self._open()
        if self.node:
            await self._roster([{"o": "up"}])
            self._snapshots = asyncio.create_task(self._snapshot_loop(), name="fanout-roster-snapshots")

    async def _open(self) -> None:
        try:
            async with asyncio.timeout(self.settings.publish_timeout):
                connection = await aio_pika.connect(self._url)
                channel = await connection.channel(publisher_confirms=True)
                exchange = await channel.declare_exchange(
                    self.exchange_name, aio_pika.ExchangeType.DIRECT, durable=True
                )
                await channel.declare_queue(
                    self.roster_name,
                    durable=True,
                    arguments={"x-queue-type": "stream", "x-max-age": f"{ROSTER_RETENTION}s"},
                )
                if self.node:  # nodes declare the shards (the backlog is theirs to set)
                    for shard in range(self.shards):
                        queue = await channel.declare_queue(
                            self.queue_name(shard), durable=True, arguments=self._shard_arguments()
                        )
                        await queue.bind(exchange, routing_key=str(shard))
                await channel.declare_queue(
                    self.dead_name, durable=True, arguments={"x-queue-type": "quorum"}
                )
        except _ERRORS as exc:
            raise self._error(exc, "connect") from exc
        self._connection, self._channel, self._exchange = connection, channel, exchange

    async def _ensure(self) -> tuple[AbstractChannel, aio_pika.abc.AbstractExchange]:
        async with self._lock:
            if (
                self._connection is None
                or self._connection.is_closed
                or self._channel is None
                or self._channel.is_closed
            ):
                await self._drop_link()
                await self._open()
            assert self._channel is not None and self._exchange is not None
            return self._channel, self._exchange

    async def _drop_link(self) -> None:
        connection, self._connection = self._connection, None
        self._channel = self._exchange = None
        for consumer in self._consumers.values():  # (a channel goes with aio-pika's connection)
            if consumer.connection is not None:
                consumer.connection.abort()
        self._consumers.clear()
        self._roster_reader = None
        if connection is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(connection.close(), 2)

    async def close(self) -> None:
        if self._snapshots is not None:
            self._snapshots.cancel()
            await asyncio.gather(self._snapshots, return_exceptions=True)
        await self._drop_link()

    def _error(self, exc: BaseException, what: str) -> BackendError:
        if isinstance(exc, BackendError):
            return exc
        unreachable = not isinstance(exc, aiormq.exceptions.ChannelClosed | aio_pika.exceptions.DeliveryError)
        cls = BackendUnavailable if unreachable else BackendError
        error = cls(self.settings.redact(f"RabbitMQ at {self.settings.where}: {what} failed: {exc!r}"))
        error.__cause__ = exc
        return error

    # -- node side

    async def _depth_of(self, shard: int) -> int:
        checked, depth = self._depth.get(shard, (0.0, 0))
        now = time.monotonic()
        if now - checked < _DEPTH_EVERY:
            return depth
        channel, _ = await self._ensure()
        queue = await channel.declare_queue(self.queue_name(shard), passive=True)
        depth = int(queue.declaration_result.message_count or 0)
        self._depth[shard] = (now, depth)
        return depth

    @_bounded("append events")
    async def append(self, items: Sequence[Appended]) -> list[bool]:
        """Publish the events persistent, in one write (frames built by :func:`publish_raw`), and wait for
        the broker's confirmations; an event the broker nacks (its shard over the hard limit) is not taken."""
        channel, _ = await self._ensure()
        taken: list[bool] = []
        refused: set[int] = set()
        indexes: list[int] = []
        messages: list[tuple[bytes, bytes, bytes]] = []
        records = []
        exchange = self.exchange_name.encode()
        for item in items:
            if item.shard in refused:
                taken.append(False)
                continue
            if item.header:
                if item.roster != "remove" and await self._depth_of(item.shard) >= self.backlog:
                    refused.add(item.shard)  # keep order: nothing more for this shard in this batch
                    taken.append(False)
                    continue
                indexes.append(len(taken))
                messages.append((exchange, str(item.shard).encode(), _frame(item.header, item.data)))
                checked, depth = self._depth.get(item.shard, (0.0, 0))
                self._depth[item.shard] = (checked, depth + 1)
            if item.roster is not None:
                records.append({"o": item.roster, "c": item.client_id, "f": item.flag})
            taken.append(True)
        confirmations = await publish_raw(await channel.get_underlay_channel(), messages, persistent=True)
        results = await asyncio.gather(*confirmations, return_exceptions=True)
        for index, result in zip(indexes, results, strict=True):
            if isinstance(result, aio_pika.exceptions.DeliveryError):
                taken[index] = False  # over the hard limit: the broker said no; the node keeps it
            elif isinstance(result, BaseException):
                raise result
        if records:
            await self._roster(records)
        return taken

    async def _roster(self, records: list[dict[str, Any]]) -> None:
        channel, _ = await self._ensure()
        body = orjson.dumps({"n": self.node, "r": records, "ts": time.time()})
        await channel.default_exchange.publish(
            aio_pika.Message(body, delivery_mode=_PERSISTENT), routing_key=self.roster_name
        )

    async def _snapshot_loop(self) -> None:
        while True:
            source = self.roster_source
            try:
                await self._roster([{"o": "snap", "c": source() if source else {}}])
            except Exception as exc:  # the next one will do; the stream keeps the deltas meanwhile
                log.warning("roster snapshot not published: %r", exc)
            await asyncio.sleep(SNAPSHOT_EVERY)

    @_bounded("leave")
    async def leave(self) -> None:
        await self._roster([{"o": "down"}])

    # -- worker side

    @_bounded("take a shard")
    async def acquire(self, shard: int, owner: str) -> bool:
        await self._ensure()
        assert self._connection is not None
        old = self._consumers.pop(shard, None)
        if old is not None:  # (one left open would stay the active consumer, and nobody would read it)
            with contextlib.suppress(Exception):
                await old.close()
        consumer = _Consumer()
        queue_name, tag = self.queue_name(shard), f"{owner}.{shard}"
        if self.own_connections:
            name = f"{self._url.query.get('name', 'fanout')} shard {shard}"
            inbox = consumer.inbox
            connection = ConsumeConnection(
                self._url, lambda body: _on_body(shard, connection, inbox, body), lambda: None, name=name
            )
            consumer.connection = connection
            try:
                await connection.open_shard(queue_name, tag, _PREFETCH)
            except Refused as exc:
                connection.abort()
                if exc.code == 404:
                    return False  # no node declared the shards yet
                raise
            except BaseException:
                connection.abort()
                raise
        else:
            channel = consumer.channel = await self._connection.channel()
            await channel.set_qos(prefetch_count=_PREFETCH)
            try:
                queue = await channel.declare_queue(queue_name, passive=True)
            except aiormq.exceptions.ChannelNotFoundEntity:
                return False  # no node declared the shards yet

            async def on_message(message: AbstractIncomingMessage) -> None:
                consumer.inbox.put_nowait(_delivery(shard, message))

            await queue.consume(on_message, consumer_tag=tag)
        self._consumers[shard] = consumer
        return True

    async def renew(self, shards: Iterable[int], owner: str) -> set[int]:
        return {shard for shard in shards if shard in self._consumers and self._consumers[shard].alive}

    async def release(self, shard: int, owner: str) -> None:
        """Close the shard's connection (channel): the broker requeues what we took and did not
        acknowledge (in order, ahead of the rest) and only then makes the next consumer active.
        (Cancelling first and requeueing after would let the next consumer start on later events
        meanwhile.)"""
        consumer = self._consumers.pop(shard, None)
        if consumer is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(consumer.close(), self.settings.publish_timeout)

    async def fetch(self, shard: int, owner: str, count: int, wait: float) -> list[Delivery]:
        consumer = self._consumers.get(shard)
        if consumer is None or not consumer.alive:
            self._consumers.pop(shard, None)
            raise BackendUnavailable(
                f"RabbitMQ at {self.settings.where}: the consumer of shard {shard} is gone"
            )
        out: list[Delivery] = []
        try:
            async with asyncio.timeout(wait):
                out.append(await consumer.inbox.get())
        except TimeoutError:
            return out
        while len(out) < count and not consumer.inbox.empty():
            out.append(consumer.inbox.get_nowait())
        return out

    @_bounded("acknowledge events")
    async def ack(self, deliveries: Sequence[Delivery]) -> None:
        tags: dict[ConsumeConnection, list[int]] = {}
        for delivery in deliveries:
            token = delivery.token
            if isinstance(token, _Tag):
                tags.setdefault(token.connection, []).append(token.tag)
            else:
                await token.ack()
        for connection, some in tags.items():
            connection.ack(some)

    @_bounded("park an event")
    async def dead_letter(self, delivery: Delivery, error: str) -> None:
        channel, _ = await self._ensure()
        message = aio_pika.Message(
            _frame(delivery.header, delivery.data),
            delivery_mode=_PERSISTENT,
            headers={"shard": delivery.shard, "error": error[:2000], "parked_at": time.time()},
        )
        await channel.default_exchange.publish(message, routing_key=self.dead_name)
        await self.ack([delivery])

    @_bounded("list parked events")
    async def dead_letters(self, limit: int = 1000) -> list[DeadLetter]:
        await self._ensure()
        assert self._connection is not None
        channel = await self._connection.channel()
        queue = await channel.declare_queue(self.dead_name, passive=True)
        messages: list[AbstractIncomingMessage] = []
        while len(messages) < limit:
            message = await queue.get(fail=False)
            if message is None:
                break
            messages.append(message)
        out = []
        for message in messages:
            header, data = _unframe(message.body)
            headers = message.headers or {}
            out.append(
                DeadLetter(
                    (channel, message),
                    int(str(headers.get("shard", 0))),
                    header,
                    data,
                    str(headers.get("error", "")),
                    float(str(headers.get("parked_at", 0.0))),
                )
            )
        self._dead_channel = channel
        return out

    @_bounded("requeue an event")
    async def requeue(self, dead: DeadLetter) -> None:
        _, exchange = await self._ensure()
        _channel, message = dead.token
        await exchange.publish(
            aio_pika.Message(_frame(dead.header, dead.data), delivery_mode=_PERSISTENT),
            routing_key=str(dead.shard),
        )
        await message.ack()

    @_bounded("count waiting events")
    async def waiting(self, shard: int) -> int:
        self._depth.pop(shard, None)
        return await self._depth_of(shard)

    # -- node lost (the leader)

    async def _read_rosters(self) -> None:
        """Start following the roster stream (from ROSTER_RETENTION seconds back)."""
        if self._roster_reader is not None and not self._roster_reader[0].is_closed:
            return
        await self._ensure()
        assert self._connection is not None
        self._rosters.clear()
        channel = await self._connection.channel()
        await channel.set_qos(prefetch_count=1000)
        queue = await channel.declare_queue(
            self.roster_name,
            durable=True,
            arguments={"x-queue-type": "stream", "x-max-age": f"{ROSTER_RETENTION}s"},
        )
        start = datetime.datetime.fromtimestamp(time.time() - ROSTER_RETENTION, tz=datetime.UTC)
        tag = await queue.consume(self._on_roster, arguments={"x-stream-offset": start})
        self._roster_reader = (channel, tag)
        await asyncio.sleep(0.5)  # let the backlog of the stream arrive before anyone asks

    async def _on_roster(self, message: AbstractIncomingMessage) -> None:
        try:
            record = orjson.loads(message.body)
            node = str(record["n"])
            for change in record["r"]:
                op = change["o"]
                roster = self._rosters.setdefault(node, {})
                if op == "add" or (op == "flag" and change["c"] in roster):
                    roster[change["c"]] = change.get("f")
                elif op == "remove":
                    roster.pop(change["c"], None)
                elif op == "snap":
                    self._rosters[node] = {str(k): v for k, v in dict(change["c"]).items()}
                elif op in ("down", "gone"):
                    self._rosters.pop(node, None)
        except (KeyError, TypeError, ValueError, orjson.JSONDecodeError) as exc:
            log.warning("unreadable roster record: %r", exc)
        finally:
            await message.ack()

    @_bounded("read the rosters")
    async def lost_nodes(self, live: set[str]) -> list[str]:
        await self._read_rosters()
        return sorted(node for node in self._rosters if node and node not in live)

    @_bounded("close a lost node's connections")
    async def close_lost(self, instance: str, make_close: Any) -> int:
        from ..events import shard_of

        roster = dict(self._rosters.get(instance, {}))
        _, exchange = await self._ensure()
        confirms = []
        for client_id, flag in sorted(roster.items()):
            header, data = make_close(client_id, flag)
            message = aio_pika.Message(_frame(header, data), delivery_mode=_PERSISTENT)
            confirms.append(exchange.publish(message, routing_key=str(shard_of(client_id, self.shards))))
        await asyncio.gather(*confirms)
        channel, _ = await self._ensure()
        body = orjson.dumps({"n": instance, "r": [{"o": "gone"}], "ts": time.time()})
        await channel.default_exchange.publish(
            aio_pika.Message(body, delivery_mode=_PERSISTENT), routing_key=self.roster_name
        )
        self._rosters.pop(instance, None)
        return len(roster)

    # -- cleanup

    @_bounded("remove the worker tier")
    async def remove(self) -> list[str]:
        """On a link of its own (connecting declares the dead letters, the rosters and the exchange)."""
        connection = await aio_pika.connect(self._url)
        removed = []
        try:
            names = [*(self.queue_name(k) for k in range(self.shards)), self.dead_name, self.roster_name]
            for name in [*names, self.exchange_name]:
                channel = await connection.channel()  # one each: a missing name closes its channel
                try:
                    if name == self.exchange_name:
                        await channel.declare_exchange(name, passive=True)
                        await channel.exchange_delete(name)
                    else:
                        await channel.declare_queue(name, passive=True)
                        await channel.queue_delete(name)
                except aiormq.exceptions.ChannelNotFoundEntity:
                    continue
                await channel.close()
                removed.append(name)
        finally:
            await connection.close()
        return removed


def _frame(header: bytes, data: bytes) -> bytes:
    """One message body: the header line, a newline, the raw data (as on the command bus)."""
    return header + b"\n" + data


def _unframe(body: bytes) -> tuple[bytes, bytes]:
    header, _, data = body.partition(b"\n")
    return header, data


def _on_body(shard: int, connection: ConsumeConnection, inbox: asyncio.Queue[Delivery], body: bytes) -> None:
    """A shard connection's handler: the delivery, with its tag, into the shard's inbox."""
    header, data = _unframe(body)
    token = _Tag(connection, connection.delivery_tag)
    inbox.put_nowait(Delivery(shard, token, header, data, connection.redelivered))


def _delivery(shard: int, message: AbstractIncomingMessage) -> Delivery:
    header, data = _unframe(message.body)
    return Delivery(shard, message, header, data, bool(message.redelivered))
