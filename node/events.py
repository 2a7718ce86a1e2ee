"""The node's side of the worker tier: forward client events, in order, without losing any.

What a node forwards (``FANOUT_EVENTS``) goes to the connection's shard through the broker's
:class:`~fanout.backends.eventlog.EventLog`. Events wait in a per-shard outbox until the broker took
them: a shard at its backlog bound (``FANOUT_EVENTS_BACKLOG`` events waiting for workers) refuses, and
the events stay in the outbox and are offered again, in order, until it has room; a broker outage is
the same. Meanwhile the policy (``FANOUT_EVENTS_POLICY``) applies to the clients whose events cannot go:

* ``pause`` (default): a client's messages wait in its lane while its shard is full or its own events
  wait in the outbox, and once 16 wait the node stops reading from it (its frames stay in the kernel's
  buffers; TCP slows the client down);
* ``close``: such a client is closed with 1013 (try again later) when it sends.

Clients of other shards, and clients that do not send, are not affected; nothing grows without bound:
per connection at most ``PER_CLIENT`` messages wait (then the client is paused), plus its open and close.

The node also listens to the workers' announcements, to make a misconfigured tier visible: it logs an error
once per worker whose ``FANOUT_EVENT_SHARDS`` differs from its own, and a warning once when events keep
going to shards that no live worker has owned for ``LEASE_TTL`` plus 3 heartbeat intervals.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter, deque
from typing import TYPE_CHECKING

from fanout import events, naming
from fanout.backends import create_backend
from fanout.backends.eventlog import LEASE_TTL, Appended, EventLog
from fanout.commands import Bye, Heartbeat, NodeInfo
from fanout.directory import NodeDirectory
from fanout.events import Event, EventKind
from fanout.exceptions import FanoutError
from fanout.receive import Receiver

if TYPE_CHECKING:
    from .surfaces import EventsHost, ForwardedClient

log = logging.getLogger("fanout.node.events")

_RETRY = 0.2  #: seconds before a refused shard is offered its events again
_BATCH = 500  #: most events per append
#: message events one client may have waiting in the outbox before it is paused
PER_CLIENT = 64


class EventForwarder:
    """Per-shard outboxes in front of the event log (see the module docstring)."""

    def __init__(
        self, node: EventsHost, kinds: frozenset[EventKind], event_log: EventLog, *, policy: str = "pause"
    ) -> None:
        self.node = node
        self.kinds = kinds
        self.log = event_log
        self.policy = policy
        self.shards = event_log.shards
        self._outbox: dict[int, deque[Appended]] = {}
        self._full: dict[int, float] = {}  #: shard -> loop time until which it counts as full
        self._room: dict[int, asyncio.Event] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        #: events the broker took, by kind; times the backlog policy applied
        self.forwarded: Counter[str] = Counter()
        self.policy_applied = 0  #: times a shard was found full (or the broker away) and the policy applied
        self.paused = 0  #: clients waiting for room right now
        self._waiting_of: Counter[str] = Counter()  #: client id -> its message events in the outbox
        self._presence_seq = 0
        settings = node.settings
        #: the workers' announcements (who runs, which shards they own, their shard count)
        self._workers_bus = create_backend(settings, inbox=f"{node.instance}.ev")
        self._receiver = Receiver(
            secret=settings.secret,
            namespace=settings.namespace,
            max_message=settings.max_message,
            replay_window=settings.replay_window,
        )
        self.workers = NodeDirectory()
        self._mismatched: set[str] = set()  #: workers reported for another FANOUT_EVENT_SHARDS
        self._last_append: dict[int, float] = {}  #: shard -> loop time the broker last took an event of it
        self.orphaned: set[int] = set()  #: shards reported as growing with no owner (until one appears)
        self._watcher: asyncio.Task[None] | None = None

    # -- lifecycle

    async def start(self) -> None:
        table = self.node.table
        self.log.roster_source = lambda: {cid: table.flag_of(cid) for cid in table.connections}
        await self.log.connect()
        await self._workers_bus.connect(self._on_workers_bus)
        await self._workers_bus.subscribe([naming.WORKERS])
        self._task = asyncio.create_task(self._flush_loop(), name="fanout-events")
        self._watcher = asyncio.create_task(self._watch_owners(), name="fanout-events-owners")

    async def stop(self, timeout: float = 5.0) -> None:
        """Offer what is still waiting (close events of the clients just closed) for ``timeout``
        seconds, then say goodbye and leave."""
        deadline = asyncio.get_running_loop().time() + timeout
        while self.waiting() and asyncio.get_running_loop().time() < deadline:
            self._wake.set()
            await asyncio.sleep(0.05)
        for task in (self._task, self._watcher):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        await self._workers_bus.close()
        if self.waiting():
            log.warning("%d client events not handed to the broker before stopping", self.waiting())
        else:
            try:
                await self.log.leave()
            except FanoutError as exc:
                log.warning("could not unregister from the worker tier: %s", exc)
        await self.log.close()

    def waiting(self) -> int:
        return sum(len(box) for box in self._outbox.values())

    # -- the workers, as they announce themselves

    def _on_workers_bus(self, raw: bytes) -> None:
        command = self._receiver.take_one(raw, time.time())
        if isinstance(command, Heartbeat):
            self.workers.heard(command.node, asyncio.get_running_loop().time())
            self._check_shards(command.node)
        elif isinstance(command, Bye):
            self.workers.gone(command.instance)

    def _check_shards(self, worker: NodeInfo) -> None:
        theirs = worker.extra.get("event_shards")
        if not isinstance(theirs, int) or theirs == self.shards or worker.instance in self._mismatched:
            return
        self._mismatched.add(worker.instance)
        log.error(
            "worker %s (host %s) uses FANOUT_EVENT_SHARDS=%d, this node %d: set the same "
            "FANOUT_EVENT_SHARDS on every node and worker (until then the events of some shards are "
            "never handled)",
            worker.instance,
            worker.host or "?",
            theirs,
            self.shards,
        )

    def owners(self) -> dict[int, str]:
        """Shard -> the live worker that says it owns it."""
        owned: dict[int, str] = {}
        for instance, info in self.workers.live(asyncio.get_running_loop().time()).items():
            shards = info.extra.get("shards")
            for shard in shards if isinstance(shards, list) else ():
                if isinstance(shard, int):
                    owned[shard] = instance
        return owned

    async def _watch_owners(self) -> None:
        """Warn once when events go to a shard that no live worker has owned for a while."""
        loop = asyncio.get_running_loop()
        interval = self.node.settings.heartbeat_interval
        # a new worker listens 1.5 intervals before it takes shards; a dead one's lease runs LEASE_TTL
        grace = LEASE_TTL + 3 * interval
        unowned_since = dict.fromkeys(range(self.shards), loop.time())
        while True:
            await asyncio.sleep(interval)
            now = loop.time()
            live = self.workers.live(now)
            self._mismatched &= live.keys()
            owners = self.owners()
            growing = []
            for shard in range(self.shards):
                if shard in owners:
                    unowned_since.pop(shard, None)
                    self.orphaned.discard(shard)
                    continue
                since = unowned_since.setdefault(shard, now)
                took = self._last_append.get(shard, -1.0) > since or bool(self._outbox.get(shard))
                if shard not in self.orphaned and now - since >= grace and took:
                    growing.append(shard)
            if growing:
                self.orphaned.update(growing)
                log.warning(
                    "client events wait in shard%s %s and no live worker owns %s (%d live worker%s, owning "
                    "shards %s of %d): start workers, with FANOUT_EVENT_SHARDS=%d as on this node",
                    "s" if len(growing) > 1 else "",
                    shard_ranges(growing),
                    "them" if len(growing) > 1 else "it",
                    len(live),
                    "" if len(live) == 1 else "s",
                    shard_ranges(sorted(owners)) or "none",
                    self.shards,
                    self.shards,
                )

    # -- events from the node

    def shard(self, conn: ForwardedClient) -> int:
        return events.shard_of(conn.client_id, self.shards)

    def _event(self, conn: ForwardedClient, kind: EventKind, **fields: object) -> Event:
        conn.event_seq += 1
        flag, groups = conn.identity()
        return Event(
            kind=kind,
            event_id=events.event_id(conn.client_id, conn.event_seq),
            client_id=conn.client_id,
            node_id=self.node.instance,
            flag=flag,
            groups=tuple(sorted(groups)),
            session=dict(conn.session),
            sent_at=time.time(),
            seq=conn.event_seq,
            session_version=conn.session_version,
            **fields,  # type: ignore[arg-type]
        )

    def _put(self, conn: ForwardedClient, event: Event | None, roster: str | None) -> None:
        header, data = events.encode(event) if event is not None else (b"", b"")
        item = Appended(self.shard(conn), header, data, conn.client_id, roster, conn.identity()[0])
        self._outbox.setdefault(item.shard, deque()).append(item)
        if roster is None:
            self._waiting_of[conn.client_id] += 1
        self._wake.set()

    def opened(self, conn: ForwardedClient, resumed_from: str | None = None) -> None:
        """The connection is open (admitted, welcomed): it joins the roster, with an open event
        (``resumed_from``: the client id whose state a fanout.v1 connection's resume took over)."""
        event = None
        if EventKind.OPEN in self.kinds:
            event = self._event(
                conn, EventKind.OPEN, request=conn.request.to_json(), resumed_from=resumed_from
            )
        self._put(conn, event, "add")

    def message(self, conn: ForwardedClient, data: str | bytes) -> None:
        if EventKind.MESSAGE in self.kinds:
            self._put(conn, self._event(conn, EventKind.MESSAGE, data=data), None)

    def closed(self, conn: ForwardedClient, code: int | None, reason: str | None) -> None:
        """The connection is gone: it leaves the roster, with a close event (never refused)."""
        event = None
        if EventKind.CLOSE in self.kinds:
            event = self._event(conn, EventKind.CLOSE, code=code, reason=reason)
        self._put(conn, event, "remove")

    def presence(self, group: str, flag: str, change: str) -> None:
        """A presence transition for the workers (``on_presence``): in the group's lane, in order."""
        self._presence_seq += 1
        lane = f"presence:{group}"
        event = Event(
            kind=EventKind.PRESENCE,
            event_id=f"presence:{group}:{flag}:{change}:{self.node.instance}.{self._presence_seq}",
            client_id=lane,
            node_id=self.node.instance,
            flag=flag,
            sent_at=time.time(),
            seq=self._presence_seq,
            group=group,
            change=change,
        )
        header, data = events.encode(event)
        self._outbox.setdefault(events.shard_of(lane, self.shards), deque()).append(
            Appended(events.shard_of(lane, self.shards), header, data, lane, None, None)
        )
        self._waiting_of[lane] += 1
        self._wake.set()

    def flag_changed(self, conn: ForwardedClient) -> None:
        """Keep the roster's flag current: a lost node's close events carry it."""
        self._put(conn, None, "flag")

    # -- back-pressure

    def has_room(self, conn: ForwardedClient) -> bool:
        """Whether another message event of ``conn`` may be made now."""
        if self._waiting_of[conn.client_id] >= PER_CLIENT:
            return False  # its previous messages are not taken yet
        return not self._is_full(self.shard(conn))

    def _is_full(self, shard: int) -> bool:
        until = self._full.get(shard)
        return until is not None and asyncio.get_running_loop().time() < until

    async def wait_room(self, conn: ForwardedClient) -> None:
        """Wait until ``conn`` may send another message (policy ``pause``)."""
        shard = self.shard(conn)
        self.paused += 1
        try:
            while not self.has_room(conn) and conn.open:
                waiter = self._room.setdefault(shard, asyncio.Event())
                waiter.clear()
                try:
                    async with asyncio.timeout(_RETRY):
                        await waiter.wait()
                except TimeoutError:
                    pass
        finally:
            self.paused -= 1

    # -- the flusher

    async def _flush_loop(self) -> None:
        loop = asyncio.get_running_loop()
        delay = _RETRY
        while True:
            await self._wake.wait()
            self._wake.clear()
            while True:
                batch = self._take(loop.time())
                if not batch:
                    break
                try:
                    taken = await self.log.append(batch)
                except Exception as exc:  # the broker is away (or a bug): keep everything, offer it again
                    if isinstance(exc, FanoutError):
                        log.warning("client events not handed to the broker (%s); retrying", exc)
                    else:
                        log.exception("client events not handed to the broker; retrying")
                    self._give_back(batch, [False] * len(batch), loop.time() + delay)
                    delay = min(delay * 2, 5.0)
                    await asyncio.sleep(delay)
                    continue
                delay = _RETRY
                self._give_back(batch, taken, loop.time() + _RETRY)
            if any(self._outbox.values()):
                # shards refused: offer again when they may have room
                loop.call_later(_RETRY, self._wake.set)

    def _take(self, now: float) -> list[Appended]:
        batch: list[Appended] = []
        for shard, box in self._outbox.items():
            if not box or (self._full.get(shard, 0.0) > now):
                continue
            while box and len(batch) < _BATCH:
                batch.append(box.popleft())
        return batch

    def _give_back(self, batch: list[Appended], taken: list[bool], full_until: float) -> None:
        """Put what the broker did not take back at the front of its shard's outbox, in order."""
        refused: dict[int, list[Appended]] = {}
        for item, ok in zip(batch, taken, strict=True):
            if ok:
                if item.header:
                    self.forwarded[_kind_of(item.header)] += 1
                    self._last_append[item.shard] = asyncio.get_running_loop().time()
                if item.roster is None:
                    left = self._waiting_of[item.client_id] - 1
                    if left > 0:
                        self._waiting_of[item.client_id] = left
                    else:
                        del self._waiting_of[item.client_id]
            else:
                refused.setdefault(item.shard, []).append(item)
        for shard in {item.shard for item in batch} - refused.keys():
            self._full.pop(shard, None)
            waiter = self._room.get(shard)
            if waiter is not None:
                waiter.set()
        for shard, items in refused.items():
            if shard not in self._full:
                self.policy_applied += 1  # the shard just became full (or the broker went away)
            self._full[shard] = full_until
            self._outbox.setdefault(shard, deque()).extendleft(reversed(items))

    def full_shards(self) -> int:
        """Shards that refused events (full, or the broker away) and have not taken a batch since."""
        return len(self._full)


def shard_ranges(shards: list[int]) -> str:
    """``[0, 1, 2, 5, 7, 8]`` -> ``"0-2, 5, 7-8"`` (sorted shards)."""
    parts: list[str] = []
    start = previous = None
    for shard in [*shards, None]:
        if shard is not None and previous is not None and shard == previous + 1:
            previous = shard
            continue
        if start is not None:
            parts.append(str(start) if start == previous else f"{start}-{previous}")
        start = previous = shard
    return ", ".join(parts)


def _kind_of(header: bytes) -> str:
    start = header.find(b'"k":"') + 5
    return header[start : header.find(b'"', start)].decode()
