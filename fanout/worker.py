"""Business workers: client events from the nodes, handled by your code on any host, at least once.

::

    class Chat:
        async def on_message(self, event):          # or a plain def: it runs in a thread
            await event.util.send_to_group("lobby", {"from": event.flag, "text": event.data})

    async with Worker(Chat(), "redis://10.0.0.5:6379/0") as worker:
        await worker.wait_stopped()                 # or: fanout worker --app mypkg:Chat

How it works (docs/workers.md has the whole story):

* **Shards.** Events are spread over ``shards`` queues by connection. Workers announce themselves on the
  bus; each shard belongs to one live worker (the sorted list of workers, round robin), which takes a
  lease on it in the broker before it reads it. When workers come and go the shards move: the one that
  gives a shard up stops reading it, finishes the events it has in hand and releases it; the new owner
  first gets what the old one took and did not acknowledge (``redelivered=True``).
* **Order.** Within a shard, each connection's events go through one *lane*: handled one at a time in
  order; lanes run in parallel up to ``concurrency``.
* **At least once.** An event is acknowledged only after its handler returned. A handler that raises is
  retried (``retries`` times, with a short backoff, its lane waiting), then the event is parked in the
  dead letters (``fanout worker dead-letters``, ``--requeue``) and counted.
* **Node lost.** The worker with the smallest id watches the nodes' heartbeats; for a node that stopped
  without a goodbye it appends a close event (code 1006, reason ``node lost``) for every connection in
  that node's roster.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import inspect
import logging
import os
import socket
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from types import TracebackType
from typing import Any, Self

from . import events as events_module
from . import naming, protocol
from .backends import create_backend, create_event_log
from .backends.eventlog import LEASE_TTL, Delivery, EventLog
from .commands import Bye, Heartbeat, Json, NodeInfo
from .config import Settings, env_number
from .directory import NodeDirectory
from .events import Event, EventKind
from .exceptions import FanoutError, ProtocolError
from .ids import new_boot_token
from .probes import serve_probes
from .receive import LAG_BUCKETS, LagHistogram, Receiver
from .serverutil import ServerUtil
from .sync import SyncServerUtil

log = logging.getLogger("fanout.worker")

#: seconds a failing handler waits before its next try (the last one is repeated)
RETRY_DELAYS = (0.1, 0.5, 2.0)


@dataclass(frozen=True, slots=True)
class WorkerOptions:
    concurrency: int = 16  #: connections handled at once (lanes); also the thread pool size
    shards: int = events_module.DEFAULT_SHARDS  #: must match the nodes' FANOUT_EVENT_SHARDS
    retries: int = 3  #: tries after the first before an event is dead-lettered
    port: int = 0  #: /healthz and /metrics on this port (0: not served)
    host: str = "127.0.0.1"
    #: events fetched ahead per shard (in hand, waiting for their lane)
    prefetch: int = 256

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> WorkerOptions:
        env = os.environ if environ is None else environ
        return cls(
            concurrency=env_number(env, "FANOUT_WORKER_CONCURRENCY", 16, int, positive=True),
            shards=env_number(env, "FANOUT_EVENT_SHARDS", events_module.DEFAULT_SHARDS, int, positive=True),
            retries=env_number(env, "FANOUT_WORKER_RETRIES", 3, int),
            port=env_number(env, "FANOUT_WORKER_PORT", 0, int),
            host=env.get("FANOUT_WORKER_HOST") or "127.0.0.1",
        )


@dataclass
class WorkerMetrics:
    handled: Counter[str] = field(default_factory=Counter)  #: by kind
    retried: int = 0
    dead_lettered: int = 0
    redelivered: int = 0
    undecodable: int = 0
    lost_node_closes: int = 0
    handler_time: LagHistogram = field(default_factory=lambda: LagHistogram(LAG_BUCKETS))


@dataclass(slots=True)
class _Item:
    event: Event
    delivery: Delivery


class Worker:
    """Runs an application's ``on_open`` / ``on_message`` / ``on_close`` (and ``on_presence``) handlers."""

    def __init__(
        self,
        app: object,
        url: str | None = None,
        *,
        namespace: str = "fanout",
        settings: Settings | None = None,
        options: WorkerOptions | None = None,
        **settings_options: Any,
    ) -> None:
        self.app = app
        self.settings = settings or Settings.create(url, namespace=namespace, **settings_options)
        self.options = options or WorkerOptions()
        self.worker_id = "w-" + new_boot_token()
        self.metrics = WorkerMetrics()
        self.util: ServerUtil = _WorkerServerUtil(self, settings=self.settings)
        self.tier: EventLog = create_event_log(self.settings, shards=self.options.shards, backlog=1)
        self._peers = NodeDirectory()
        self._coordination = create_backend(self.settings, inbox=self.worker_id)
        self._encoder = protocol.Encoder(self.worker_id, self.settings.namespace, self.settings.secret)
        self._receiver = Receiver(
            secret=self.settings.secret,
            namespace=self.settings.namespace,
            max_message=self.settings.max_message,
            replay_window=self.settings.replay_window,
        )
        self._owned: dict[int, asyncio.Task[None]] = {}  #: shard -> its reader
        self._giving_up: set[int] = set()
        self._lanes: dict[str, deque[_Item]] = {}
        self._running: set[str] = set()  #: lanes with a runner
        self._slots = asyncio.Semaphore(self.options.concurrency)
        self._in_hand: Counter[int] = Counter()  #: shard -> events fetched and not acknowledged
        self._room: dict[int, asyncio.Event] = {}
        self._acks: list[Delivery] = []
        self._ack_scheduled = False
        self._tasks: list[asyncio.Task[Any]] = []
        self._stopping = asyncio.Event()
        self._stopped = asyncio.Event()
        self._pool = ThreadPoolExecutor(self.options.concurrency, thread_name_prefix="fanout-handler")
        self._sync: SyncServerUtil | None = None
        self._missing_since: dict[str, float] = {}
        #: shard -> events waiting in it (stored, not acknowledged), for the shards we own; refreshed
        #: by the balancing loop
        self._backlog: dict[int, int] = {}
        #: client id -> (session version after our handlers' writes, the session they left)
        self._sessions: dict[str, tuple[int, dict[str, Any]]] = {}
        self._http: asyncio.Server | None = None
        #: nodes and workers already reported for a FANOUT_EVENT_SHARDS that differs from ours
        self._mismatched: set[str] = set()
        self.started_at = time.time()
        self.started = False

    @classmethod
    def from_env(cls, app: object, environ: dict[str, str] | None = None, **overrides: Any) -> Self:
        options = WorkerOptions.from_env(environ)
        if overrides:
            options = replace(options, **overrides)
        return cls(app, settings=Settings.from_env(environ), options=options)

    # ------------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    async def start(self) -> None:
        """Connect, announce this worker, and start taking shards. Raises BackendUnavailable."""
        await self.util.connect()
        await self.tier.connect()
        await self._coordination.connect(self._on_coordination)
        await self._coordination.subscribe([naming.WORKERS])
        self._sync = SyncServerUtil.borrowing(self.util, asyncio.get_running_loop())
        self._peers.heard(self._info(), asyncio.get_running_loop().time())
        self._spawn(self._announce(), "announce")
        self._spawn(self._balance(), "balance")
        self._spawn(self._watch_nodes(), "node-lost watcher")
        if self.options.port:
            self._http = await serve_probes(
                self.options.host, self.options.port, self._unhealthy, self.render_metrics
            )
        self.started = True
        log.info(
            "worker %s started (%d shards, concurrency %d)",
            self.worker_id,
            self.options.shards,
            self.options.concurrency,
        )

    async def stop(self, drain: float = 30.0) -> None:
        """Stop taking events, finish (and acknowledge) the ones in hand, give the shards back, leave."""
        if self._stopping.is_set():
            await self._stopped.wait()
            return
        self._stopping.set()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for shard in list(self._owned):
            await self._give_up(shard, drain)
        with contextlib.suppress(FanoutError):
            await self._coordination.publish(naming.WORKERS, self._encode(Bye(self.worker_id)))
        if self._http is not None:
            self._http.close()
        await self._coordination.close()
        await self.tier.close()
        await self.util.disconnect()
        self._pool.shutdown(wait=False)
        self._stopped.set()

    async def wait_stopped(self) -> None:
        await self._stopped.wait()

    def _spawn(self, coroutine: Awaitable[None], name: str) -> None:
        task = asyncio.ensure_future(coroutine)
        task.set_name(f"fanout-worker-{name}")
        task.add_done_callback(self._task_done)
        self._tasks.append(task)

    @staticmethod
    def _task_done(task: asyncio.Task[Any]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("worker task %s died", task.get_name(), exc_info=task.exception())

    # ------------------------------------------------------------------ who owns which shard

    def _info(self) -> NodeInfo:
        """What this worker announces: ``connections`` counts the events in hand; ``shards`` are those it
        owns, ``event_shards`` its FANOUT_EVENT_SHARDS (the nodes compare theirs)."""
        return NodeInfo(
            instance=self.worker_id,
            node_id=self.worker_id,
            connections=sum(self._in_hand.values()),
            ttl=3 * self.settings.heartbeat_interval,
            started_at=self.started_at,
            host=socket.gethostname(),
            port=self.options.port,
            extra={
                "role": "worker",
                "shards": sorted(self._owned),
                "event_shards": self.options.shards,
                "pid": os.getpid(),
            },
        )

    def _encode(self, command: Heartbeat | Bye) -> bytes:
        return self._encoder.encode(command, time.time())

    def _on_coordination(self, raw: bytes) -> None:
        command = self._receiver.take_one(raw, time.time())
        now = asyncio.get_running_loop().time()
        if isinstance(command, Heartbeat):
            self._peers.heard(command.node, now)
            if command.node.instance != self.worker_id:
                self._check_shards(command.node, "worker")
        elif isinstance(command, Bye):
            self._peers.gone(command.instance)

    def _check_shards(self, peer: NodeInfo, role: str) -> None:
        """Log once per node or worker whose FANOUT_EVENT_SHARDS differs from ours: events of the shards
        one side has and the other has not would wait unhandled."""
        theirs = peer.extra.get("event_shards")
        if not isinstance(theirs, int) or theirs == self.options.shards or peer.instance in self._mismatched:
            return
        self._mismatched.add(peer.instance)
        log.error(
            "%s %s uses FANOUT_EVENT_SHARDS=%d, this worker %s uses %d: set the same FANOUT_EVENT_SHARDS "
            "on every node and worker (until then the events of some shards are never handled)",
            role,
            peer.instance,
            theirs,
            self.worker_id,
            self.options.shards,
        )

    def _check_nodes(self) -> None:
        """Compare the shard count of every live node that forwards events with ours."""
        nodes = self.util.live_node_infos()
        if nodes is None:
            return
        for info in nodes.values():
            self._check_shards(info, "node")

    async def _announce(self) -> None:
        while True:
            try:
                await self._coordination.publish(naming.WORKERS, self._encode(Heartbeat(self._info())))
            except FanoutError as exc:
                _reraise_cancel()
                log.debug("worker heartbeat not published: %s", exc)
            _reraise_cancel()
            await asyncio.sleep(self.settings.heartbeat_interval)

    def assigned(self) -> set[int]:
        """The shards this worker should own now: round robin over the sorted live workers."""
        now = asyncio.get_running_loop().time()
        self._peers.heard(self._info(), now)
        workers = sorted(self._peers.live(now))
        mine = workers.index(self.worker_id)
        return {shard for shard in range(self.options.shards) if shard % len(workers) == mine}

    async def _balance(self) -> None:
        """Take the shards assigned to us, give up the others, renew our leases; forever."""
        last_renew = 0.0
        loop = asyncio.get_running_loop()
        # a new worker listens a little before it takes shards, so a restart does not shuffle them twice
        await asyncio.sleep(1.5 * self.settings.heartbeat_interval)
        while True:
            try:
                wanted = self.assigned()
                for shard in sorted(set(self._owned) - wanted - self._giving_up):
                    self._giving_up.add(shard)
                    self._spawn(self._give_up(shard), f"give up {shard}")
                for shard in sorted(wanted - set(self._owned)):
                    if await self.tier.acquire(shard, self.worker_id):
                        self._take(shard)
                if loop.time() - last_renew >= LEASE_TTL / 3:
                    last_renew = loop.time()
                    self._backlog = {shard: await self.tier.waiting(shard) for shard in sorted(self._owned)}
                    held = set(self._owned) - self._giving_up
                    kept = await self.tier.renew(held, self.worker_id)
                    for shard in held - kept:  # our lease ran out (a long stall): someone may have it
                        log.warning("worker %s lost its lease on shard %d", self.worker_id, shard)
                        self._drop(shard)
            except Exception as exc:  # the broker is away (or a bug): this loop must keep going
                _reraise_cancel()
                log.warning("worker %s: shard balancing failed (%r); retrying", self.worker_id, exc)
            _reraise_cancel()  # (a client library may also swallow the cancellation of a call outright)
            await asyncio.sleep(0.25)

    def _take(self, shard: int) -> None:
        log.debug("worker %s takes shard %d", self.worker_id, shard)
        task = asyncio.create_task(self._read(shard), name=f"fanout-worker-shard-{shard}")
        task.add_done_callback(self._task_done)
        self._owned[shard] = task

    def _drop(self, shard: int) -> None:
        """Stop reading ``shard`` at once, without finishing (the lease is gone)."""
        task = self._owned.pop(shard, None)
        if task is not None:
            task.cancel()
        # what is in hand and not started is dropped (the broker gives it to the next owner); a lane
        # running now finishes its current event (its acknowledgement fails: redelivered, at least once)
        for client_id, lane in self._lanes.items():
            started = client_id in self._running
            dropped = [
                i for n, i in enumerate(lane) if i.delivery.shard == shard and not (started and n == 0)
            ]
            for item in dropped:
                lane.remove(item)
                self._done(item.delivery)

    async def _give_up(self, shard: int, drain: float = 30.0) -> None:
        """Stop reading ``shard``, finish what we have of it, acknowledge, release the lease."""
        task = self._owned.get(shard)
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + drain
        while self._in_hand[shard] and loop.time() < deadline:
            waiter = self._room.setdefault(shard, asyncio.Event())
            waiter.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(0.1, deadline - loop.time())):
                    await waiter.wait()
        await self._flush_acks()
        try:
            await self.tier.release(shard, self.worker_id)
        except FanoutError as exc:
            log.warning("releasing shard %d failed (%s): its lease runs out by itself", shard, exc)
        self._owned.pop(shard, None)
        self._giving_up.discard(shard)
        log.debug("worker %s gave up shard %d", self.worker_id, shard)

    # ------------------------------------------------------------------ reading a shard

    async def _read(self, shard: int) -> None:
        prefetch = self.options.prefetch
        delay = 0.1
        while True:
            _reraise_cancel()
            room = prefetch - self._in_hand[shard]
            if room <= 0:
                waiter = self._room.setdefault(shard, asyncio.Event())
                waiter.clear()
                await waiter.wait()
                continue
            try:
                deliveries = await self.tier.fetch(shard, self.worker_id, room, wait=1.0)
            except Exception as exc:  # the broker is away (or a bug): keep reading
                _reraise_cancel()
                log.warning("worker %s: reading shard %d failed (%r); retrying", self.worker_id, shard, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            delay = 0.1
            for delivery in deliveries:
                self._dispatch(delivery)

    def _dispatch(self, delivery: Delivery) -> None:
        try:
            event = events_module.decode(delivery.header, delivery.data, redelivered=delivery.redelivered)
        except ProtocolError as exc:
            self.metrics.undecodable += 1
            self._in_hand[delivery.shard] += 1
            self._spawn(self._park(_Item(_unreadable(delivery), delivery), f"undecodable: {exc}"), "park")
            return
        if delivery.redelivered:
            self.metrics.redelivered += 1
        self._in_hand[delivery.shard] += 1
        lane = self._lanes.get(event.client_id)
        if lane is None:
            lane = self._lanes[event.client_id] = deque()
        lane.append(_Item(event, delivery))
        if event.client_id not in self._running:
            self._running.add(event.client_id)
            task = asyncio.create_task(self._run_lane(event.client_id))
            task.add_done_callback(self._task_done)

    async def _run_lane(self, client_id: str) -> None:
        """Handle one connection's events, one at a time, in order, until its lane is empty."""
        try:
            async with self._slots:
                lane = self._lanes[client_id]
                while lane:
                    item = lane[0]
                    await self._handle(item)
                    lane.popleft()
        finally:
            self._running.discard(client_id)
            if not self._lanes.get(client_id, True):
                del self._lanes[client_id]

    async def _handle(self, item: _Item) -> None:
        event = self._fresh_session(item.event)
        handler = getattr(self.app, f"on_{event.kind.value}", None)
        if handler is not None:
            plain = not inspect.iscoroutinefunction(handler)
            event = replace(event, util=self._sync if plain else self.util)
            # the handler's session writes are noted against this event (_WorkerServerUtil): in this task,
            # in a plain handler's thread, and in the calls that thread makes on the loop (SyncServerUtil)
            handling = _handling.set(event)
            try:
                if not await self._run_handler(item, event, handler, plain):
                    return  # parked
            finally:
                _handling.reset(handling)
        self.metrics.handled[event.kind.value] += 1
        if event.kind is EventKind.CLOSE:
            self._sessions.pop(event.client_id, None)
        self._ack(item.delivery)

    async def _run_handler(self, item: _Item, event: Event, handler: Any, plain: bool) -> bool:
        """Run the handler, retried; False if it kept failing and the event was parked."""
        for attempt in range(self.options.retries + 1):
            started = time.perf_counter()
            try:
                if plain:
                    context = contextvars.copy_context()
                    await asyncio.get_running_loop().run_in_executor(self._pool, context.run, handler, event)
                else:
                    await handler(event)
            except Exception as exc:
                self.metrics.handler_time.observe(time.perf_counter() - started)
                if attempt >= self.options.retries:
                    log.error("event %s failed %d times, parking it: %r", event.event_id, attempt + 1, exc)
                    await self._park(item, f"{type(exc).__name__}: {exc}")
                    return False
                self.metrics.retried += 1
                log.warning("event %s failed (%r); retrying", event.event_id, exc)
                await asyncio.sleep(RETRY_DELAYS[min(attempt, len(RETRY_DELAYS) - 1)])
                continue
            self.metrics.handler_time.observe(time.perf_counter() - started)
            break
        return True

    def _fresh_session(self, event: Event) -> Event:
        """The event, with the session its handlers wrote last if the node made it before those writes.

        A handler's ``util.update_session``/``set_session`` for its own connection is applied on the node
        before the connection's next event is handled; but that next event may have been made before, with
        the older snapshot. The node counts the session changes it applied (``session_version``): an event
        made before our writes has a smaller count, and gets the session as our handlers left it.
        """
        written = self._sessions.get(event.client_id)
        if written is None:
            return event
        version, session = written
        if event.session_version >= version:
            del self._sessions[event.client_id]  # the node's snapshot already has our writes
            return event
        return replace(event, session=dict(session))

    def wrote_session(self, event: Event, data: dict[str, Any], merge: bool) -> None:
        """A handler of ``event`` changed its own connection's session (and the node applied it)."""
        version, session = self._sessions.get(event.client_id, (event.session_version, event.session))
        session = {**session, **data} if merge else dict(data)
        self._sessions[event.client_id] = (version + 1, session)

    async def _park(self, item: _Item, error: str) -> None:
        while True:
            try:
                await self.tier.dead_letter(item.delivery, error)
                break
            except FanoutError as exc:
                log.warning("parking event %s failed (%s); retrying", item.event.event_id, exc)
                await asyncio.sleep(1.0)
        self.metrics.dead_lettered += 1
        self._done(item.delivery)

    def _ack(self, delivery: Delivery) -> None:
        self._acks.append(delivery)
        if not self._ack_scheduled:
            self._ack_scheduled = True
            asyncio.get_running_loop().call_soon(lambda: asyncio.ensure_future(self._flush_acks()))

    async def _flush_acks(self) -> None:
        self._ack_scheduled = False
        while self._acks:
            batch, self._acks = self._acks, []
            try:
                await self.tier.ack(batch)
            except FanoutError as exc:
                # not acknowledged: the events are redelivered later (at least once); count them done here
                log.warning("acknowledging %d events failed (%s)", len(batch), exc)
            for delivery in batch:
                self._done(delivery)

    def _done(self, delivery: Delivery) -> None:
        self._in_hand[delivery.shard] -= 1
        waiter = self._room.get(delivery.shard)
        if waiter is not None:
            waiter.set()

    # ------------------------------------------------------------------ node lost

    def leader(self) -> bool:
        now = asyncio.get_running_loop().time()
        live = self._peers.live(now)
        return bool(live) and min(live) == self.worker_id

    async def _watch_nodes(self) -> None:
        """Every worker checks the nodes' shard count against its own; the leader closes, on the workers'
        side, the connections of nodes that died without a goodbye."""
        loop = asyncio.get_running_loop()
        grace = 3 * self.settings.heartbeat_interval
        while True:
            _reraise_cancel()
            await asyncio.sleep(1.0)
            self._check_nodes()
            live = self.util.live_nodes()
            if live is None or not self.leader():
                continue
            try:
                missing = await self.tier.lost_nodes(live)
                now = loop.time()
                for instance in list(self._missing_since):
                    if instance not in missing:
                        del self._missing_since[instance]
                for instance in missing:
                    since = self._missing_since.setdefault(instance, now)
                    if now - since >= grace:
                        closed = await self.tier.close_lost(instance, _lost_close(instance))
                        self.metrics.lost_node_closes += closed
                        del self._missing_since[instance]
                        log.warning("node %s lost: %d close events sent to the workers", instance, closed)
            except Exception as exc:  # the broker is away (or a bug): check again in a second
                _reraise_cancel()
                log.warning("node-lost check failed: %r", exc)

    # ------------------------------------------------------------------ health and metrics

    @property
    def healthy(self) -> bool:
        return self.started and not self._stopping.is_set() and self._coordination.healthy

    def _unhealthy(self) -> str | None:
        """None while healthy, else why not (``/healthz``)."""
        return None if self.healthy else "not ready"

    def render_metrics(self) -> str:
        from prometheus_client import CollectorRegistry, generate_latest
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
        from prometheus_client.registry import Collector

        worker = self

        class _Collector(Collector):
            def collect(self) -> Any:
                m = worker.metrics
                handled = CounterMetricFamily(
                    "fanout_worker_events_handled", "Events handled, by kind.", labels=["kind"]
                )
                for kind, n in sorted(m.handled.items()):
                    handled.add_metric([kind], n)
                yield handled
                yield CounterMetricFamily("fanout_worker_events_retried", "Handler retries.", value=m.retried)
                yield CounterMetricFamily(
                    "fanout_worker_events_dead_lettered", "Events parked.", value=m.dead_lettered
                )
                yield CounterMetricFamily(
                    "fanout_worker_events_redelivered", "Events redelivered.", value=m.redelivered
                )
                yield CounterMetricFamily(
                    "fanout_worker_lost_node_closes", "Node-lost closes sent.", value=m.lost_node_closes
                )
                yield GaugeMetricFamily(
                    "fanout_worker_shards", "Shards this worker owns.", value=len(worker._owned)
                )
                yield GaugeMetricFamily(
                    "fanout_worker_in_hand",
                    "Events fetched, not yet acknowledged.",
                    value=sum(worker._in_hand.values()),
                )
                backlog = GaugeMetricFamily(
                    "fanout_worker_backlog",
                    "Events waiting in the shards this worker owns.",
                    labels=["shard"],
                )
                for shard, waiting in sorted(worker._backlog.items()):
                    backlog.add_metric([str(shard)], waiting)
                yield backlog
                yield GaugeMetricFamily(
                    "fanout_worker_up", "1 while the worker is running.", value=float(worker.healthy)
                )
                time_hist = m.handler_time
                yield HistogramMetricFamily(
                    "fanout_worker_handler_seconds",
                    "Time in handlers.",
                    buckets=[
                        ("+Inf" if b == float("inf") else repr(b), float(n))
                        for b, n in time_hist.cumulative()
                    ],
                    sum_value=time_hist.total,
                )

        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Collector())
        return generate_latest(registry).decode()


# ---------------------------------------------------------------------- the tier from outside (the CLI)


async def hear_announcements(settings: Settings) -> tuple[dict[str, NodeInfo], dict[str, NodeInfo]]:
    """The live nodes and the live workers of the namespace, ``(nodes, workers)`` by instance, as heard
    from their heartbeats for 1.5 heartbeat intervals (every live one announces itself meanwhile)."""
    loop = asyncio.get_running_loop()
    receiver = Receiver(
        secret=settings.secret,
        namespace=settings.namespace,
        max_message=settings.max_message,
        replay_window=settings.replay_window,
    )
    nodes, workers = NodeDirectory(), NodeDirectory()

    def heard(raw: bytes) -> None:
        command = receiver.take_one(raw, time.time())
        if isinstance(command, Heartbeat):
            worker = command.node.extra.get("role") == "worker"
            (workers if worker else nodes).heard(command.node, loop.time())
        elif isinstance(command, Bye):
            nodes.gone(command.instance)
            workers.gone(command.instance)

    bus = create_backend(settings, inbox="listener-" + new_boot_token())
    await bus.connect(heard)
    try:
        await bus.subscribe([naming.HEARTBEAT, naming.WORKERS])
        await asyncio.sleep(1.5 * settings.heartbeat_interval)
    finally:
        await bus.close()
    return nodes.live(loop.time()), workers.live(loop.time())


async def list_workers(settings: Settings, shards: int) -> list[dict[str, Json]]:
    """``fanout workers``: each live worker with the shards it owns and the events waiting in them.

    Logs a warning for a worker or node whose FANOUT_EVENT_SHARDS is not ``shards``, and for the shards
    that hold events and that no live worker owns."""
    nodes, workers = await hear_announcements(settings)
    records: list[dict[str, Json]] = []
    counts = {shards}
    for info in [*nodes.values(), *workers.values()]:
        theirs = info.extra.get("event_shards")
        if isinstance(theirs, int) and theirs != shards:
            role = "worker" if info.instance in workers else "node"
            log.warning("%s %s uses FANOUT_EVENT_SHARDS=%d, not %d", role, info.instance, theirs, shards)
            counts.add(theirs)
    tier = create_event_log(settings, shards=max(counts), backlog=1)
    await tier.connect()
    try:
        owned: set[int] = set()
        for instance, info in sorted(workers.items()):
            mine = [k for k in _int_list(info.extra.get("shards")) if k < tier.shards]
            owned.update(mine)
            backlog: dict[str, Json] = {str(k): await tier.waiting(k) for k in mine}
            records.append(
                {
                    "worker_id": instance,
                    "host": info.host,
                    "pid": info.extra.get("pid"),
                    "port": info.port,
                    "started_at": info.started_at,
                    "event_shards": info.extra.get("event_shards"),
                    "shards": list(mine),
                    "in_hand": info.connections,
                    "backlog": backlog,
                }
            )
        waiting = {k: await tier.waiting(k) for k in range(shards) if k not in owned}
    finally:
        await tier.close()
    unowned = [k for k, n in waiting.items() if n]
    if unowned:
        log.warning(
            "%d events wait in shards no live worker owns: %s",
            sum(waiting.values()),
            ", ".join(f"{k} ({waiting[k]})" for k in unowned),
        )
    return records


async def remove_event_tier(settings: Settings, shards: int, *, force: bool = False) -> list[str]:
    """``fanout worker cleanup``: delete the namespace's event streams or queues, leases, rosters and
    dead letters; the names removed. Refuses (FanoutError) while a worker, or a node forwarding events,
    is live, unless ``force``: their events would be lost."""
    nodes, workers = await hear_announcements(settings)
    users = sorted(workers) + sorted(i for i, info in nodes.items() if "event_shards" in info.extra)
    if users and not force:
        raise FanoutError(
            f"the worker tier of namespace {settings.namespace!r} is in use by {len(users)} live "
            f"worker(s) or node(s) forwarding events ({', '.join(users[:5])}): stop them first, or pass "
            "--force (the events waiting, and those sent meanwhile, are lost)"
        )
    tier = create_event_log(settings, shards=shards, backlog=1)
    try:
        return await tier.remove()
    finally:
        await tier.close()


def _int_list(value: object) -> list[int]:
    return [v for v in value if isinstance(v, int)] if isinstance(value, list) else []


#: the event whose handler is running (in its task, its thread, and the calls it makes through the util)
_handling: contextvars.ContextVar[Event | None] = contextvars.ContextVar("fanout_worker_event", default=None)


class _WorkerServerUtil(ServerUtil):
    """The worker's ServerUtil: ``event.util`` itself for async handlers, and behind the SyncServerUtil of
    plain ones. A session write a handler makes to its own connection is noted (see
    :meth:`Worker._fresh_session`), so that the connection's next event carries it."""

    def __init__(self, worker: Worker, *, settings: Settings) -> None:
        super().__init__(settings=settings)
        self._worker = worker

    async def _session(
        self,
        what: str,
        client_id: str,
        data: dict[str, Json],
        merge: bool,
        wait: bool,
        timeout: float | None,
    ) -> bool | None:
        found = await super()._session(what, client_id, data, merge, wait, timeout)
        event = _handling.get()
        if found and event is not None and client_id == event.client_id:
            self._worker.wrote_session(event, data, merge)
        return found


def _unreadable(delivery: Delivery) -> Event:
    return Event(EventKind.MESSAGE, f"undecodable:{delivery.token!r}", "", "")


def _lost_close(instance: str) -> Callable[[str, str | None], tuple[bytes, bytes]]:
    def make(client_id: str, flag: str | None) -> tuple[bytes, bytes]:
        event = Event(
            kind=EventKind.CLOSE,
            event_id=f"{client_id}:lost",
            client_id=client_id,
            node_id=instance,
            flag=flag,
            code=events_module.NODE_LOST_CODE,
            reason=events_module.NODE_LOST_REASON,
            sent_at=time.time(),
        )
        return events_module.encode(event)

    return make


def _reraise_cancel() -> None:
    """In a loop that outlives broker errors: if this task is being cancelled (stop()), end it. A client
    library may turn the cancellation of a call it was making into an error of its own; swallowing that
    kept a cancelled loop running and ``stop()`` waiting for it forever."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError
