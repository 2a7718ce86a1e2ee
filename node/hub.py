"""The hub: applies what arrives from the bus to this node's connections, and answers the publishers.

It owns delivery (as centrifuge's hub does): the per-node :class:`~fanout.table.ConnectionTable`, the
commands the :class:`~fanout.receive.Receiver` hands it (sends, closes, membership, queries), the batch
and the write delay, the replies, and the membership changes' subscriptions. It writes to a connection
through a small surface (:class:`~node.surfaces.Outlet`): ``push(frame, batch)``.

A send: bus messages arriving within one loop pass are taken together (``_apply_arrived``); each
command's frame is encoded once and pushed to each connection ``resolve`` gives (a stored send goes
through continuity's positioning first). In a batch (several commands, or a burst) a connection holds
the frame and joins the hub's list; the batch's end calls ``flush`` once per connection on the list.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from fanout import naming
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
from fanout.commands import Request as BusRequest
from fanout.exceptions import FanoutError
from fanout.idempotency import KeyWindow
from fanout.table import Change, ConnectionTable

from . import replies
from .frames import encode_frame, frame_length
from .surfaces import Flushable, Outlet
from .v1 import message_frame

if TYPE_CHECKING:
    from fanout.backends.base import Backend
    from fanout.config import Settings
    from fanout.protocol import Encoder
    from fanout.receive import Receiver
    from fanout.serverutil import ServerUtil

    from .continuity import Continuity
    from .events import EventForwarder
    from .metrics import Metrics
    from .presence import Presence

log = logging.getLogger("fanout.node")

C = TypeVar("C", bound=Outlet)


def _acknowledged(command: Command) -> bool:
    """Whether the publisher waits for this command's count of connections reached (``ack=True``)."""
    return isinstance(command, Send | Close | SendBulk | CloseGuests) and command.request is not None


#: most bus messages applied as one batch
MAX_BATCH = 5000


class Hub(Generic[C]):
    """Applies bus commands to the node's connections (``C``: the connection type) and replies."""

    def __init__(
        self,
        *,
        settings: Settings,
        instance: str,
        table: ConnectionTable[C],
        backend: Backend,
        encoder: Encoder,
        util: ServerUtil,
        receiver: Receiver,
        metrics: Metrics,
        write_delay: float,
        info: Callable[[], NodeInfo],
        events: EventForwarder | None,
        presence: Presence | None,
    ) -> None:
        self.settings = settings
        self.instance = instance
        self.table = table
        self.backend = backend
        self.encoder = encoder
        self.util = util
        self.receiver = receiver
        self.metrics = metrics
        self.write_delay = write_delay
        self.info = info  #: this node's record (the answer to a node query)
        self.events = events
        self.presence = presence
        self._tasks: set[asyncio.Task[Any]] = set()
        self._subscription_lock = asyncio.Lock()
        self._arrived: list[bytes] = []  #: bus messages received and not applied yet
        self._collecting_since = 0.0  #: loop time the first of them arrived
        #: connections holding frames (of the current batch, or of the write delay), flushed at its end
        self._held: list[Flushable] = []
        #: ``_held`` while a batch of commands is applied (connections then hold their frames), else None
        self._batch: list[Flushable] | None = None
        self._flush_timer: asyncio.TimerHandle | None = None  #: the end of the write delay, when waiting
        self._last_batch_at = -1e9  #: loop time the last batch of bus commands was applied
        #: history streams, fanout.v1 and resume (node/continuity.py), set by the node
        self.continuity: Continuity | None = None
        #: the idempotency keys applied within FANOUT_IDEMPOTENCY_WINDOW (fanout/idempotency.py)
        self.keys = KeyWindow(settings.idempotency_window)

    def spawn(self, coroutine: Coroutine[Any, Any, Any], name: str) -> None:
        """Run ``coroutine`` in the background, supervised: failures are logged, never silent."""
        task = asyncio.create_task(coroutine, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("task %s failed", task.get_name(), exc_info=task.exception())

    async def stop(self) -> None:
        """Cancel what still runs in the background (replies, subscription changes)."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def _encode(self, command: Command) -> bytes:
        return self.encoder.encode(command, time.time())

    def on_bus_message(self, raw: bytes) -> None:
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
            and asyncio.get_running_loop().time() - self._collecting_since < self.write_delay
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
        delay = self.write_delay
        now = asyncio.get_running_loop().time()
        burst = now - self._last_batch_at < delay
        self._last_batch_at = now
        batching = burst or len(commands) > 1
        self._batch = self._held if batching else None
        frames_before = metrics.frames_sent
        try:
            for command in commands:
                try:
                    self._apply(command)
                except Exception:  # a command that breaks the node's logic is a bug: log it, keep serving
                    metrics.dropped["error"] += 1
                    log.exception("applying %r failed", command)
        finally:
            if not batching:
                metrics.delivery_writes += metrics.frames_sent - frames_before
            else:
                self._batch = None
                # a reply that says "reached N" must not go out before the frames: an acknowledged
                # command is written now, with whatever was held before it
                if not burst or any(_acknowledged(command) for command in commands):
                    self.flush()
                elif self._held and self._flush_timer is None:
                    self._flush_timer = asyncio.get_running_loop().call_later(delay, self.flush)

    def flush(self) -> None:
        """Write what the connections hold from the bus (the end of a batch, or of the write delay): one
        call, hence one write, per connection."""
        if self._flush_timer is not None:
            self._flush_timer.cancel()
            self._flush_timer = None
        held, self._held = self._held, []
        self.metrics.delivery_writes += len(held)
        for conn in held:
            conn.flush()

    def _apply(self, command: Command) -> None:
        match command:
            case Send() | SendBulk() if command.idempotency_key is not None:  # once a key, in the window
                key, now = command.idempotency_key, time.monotonic()
                if (reached := self.keys.seen(key, now)) is None:  # (a repeat: counted in keys.repeats)
                    self.keys.applied(key, reached := self._send(command), now)
                self._reply(command.request, reached)
            case Send():
                self._reply(command.request, self._send(command))
            case Close():
                self.metrics.commands["close"] += 1
                conns = self.table.resolve(command.target, command.exclude)
                self._close_all(conns, command.code, command.reason, command.last, command.binary)
                self._reply(command.request, len(conns))
            case SendBulk():
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
                members = [c for cid in self.table.group_members(command.group) if (c := self.table.get(cid))]
                change = self.table.dissolve(command.group)
                self._change_then_reply(change, command.request, len(members), members)
            case JoinGroup() | LeaveGroup() | Bind() | Unbind() | SetSession():
                self._membership(command)

    def _close_all(self, conns: list[C], code: int, reason: str, last: bytes | None, binary: bool) -> None:
        """Close ``conns``, each after ``last`` (its last frame) when there is one."""
        frame, batch = None if last is None else encode_frame(last, binary), self._batch
        enveloped = None if last is None else message_frame(last, binary, False, None)
        for conn in conns:
            if (
                frame is not None
                and enveloped is not None
                and conn.push(enveloped if conn.v1 else frame, batch)
            ):
                self.metrics.count_frames(1, len(frame))
            conn.start_close(code, reason)

    def _send(self, command: Send | SendBulk) -> int:
        if isinstance(command, SendBulk):
            return self._deliver_bulk(command)
        self.metrics.commands["send"] += 1
        if command.positions is not None and self.continuity is not None:
            return self.continuity.offer(command)  # in each stream's order (fanout/positioning.py)
        return self.deliver(command)

    def _deliver_bulk(self, command: SendBulk) -> int:
        """Each item's payload to the connections it names (a client id, or every holder of a flag)."""
        self.metrics.commands["bulk"] += 1
        table, batch, reached = self.table, self._batch, 0
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
            enveloped = None
            for conn in conns:
                if conn.v1:
                    enveloped = enveloped or message_frame(payload, binary, False, None)
                if conn.push(enveloped if conn.v1 and enveloped else frame, batch):
                    reached += 1
                    self.metrics.count_frames(1, len(frame))
        return reached

    def deliver(self, command: Send, conns: list[C] | None = None, via: tuple[str, ...] | None = None) -> int:
        """``command`` to each of ``conns`` (default: whom its target resolves to) once: one frame for raw
        clients, and for fanout.v1 ones one envelope per distinct set of their streams (``via``: only
        these of them: a send read back from those streams' history)."""
        if conns is None:
            conns = self.table.resolve(command.target, command.exclude)
        if not conns:
            return 0
        frame, batch = None, self._batch
        reached, v1 = 0, []
        for conn in conns:
            if not conn.v1:
                frame = frame or encode_frame(command.payload, command.binary)  # at its first raw client
                if conn.push(frame, batch):
                    reached += 1
            else:
                v1.append(conn)
        if v1 and self.continuity is not None:
            reached += self.continuity.push_all(v1, command, batch, via)
        self.metrics.count_frames(reached, reached * frame_length(len(command.payload)))
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
                        if self.continuity is not None:
                            self.continuity.resumes.changed(conn)
                change = Change(session is not None)
        self.metrics.commands[type(command).__name__.lower()] += 1
        member = table.get(command.client_id) if not isinstance(command, SetSession) else None
        self._change_then_reply(change, command.request, change.found, () if member is None else (member,))

    def _flag_changed(self, client_id: str, change: Change) -> None:
        conn = self.table.get(client_id)
        if change.found and conn is not None:
            self.flag_changed(conn)

    def flag_changed(self, conn: C) -> None:
        """A connection's flag changed: the worker tier's roster follows (a lost node's closes carry it)."""
        if self.events is not None:
            self.events.flag_changed(conn)

    def _change_then_reply(
        self, change: Change, request: BusRequest | None, result: Json, conns: tuple[C, ...] | list[C] = ()
    ) -> None:
        """Reply once the change is applied: its subscriptions confirmed, and the history streams of the
        connections it changed (``conns``) positioned (their ``joined``/``left`` sent)."""
        refresh = self.continuity is not None and conns
        if change.empty and not refresh:
            self._reply(request, result)
            return

        async def apply_then_reply() -> None:
            try:
                await self.apply_change(change)
                for conn in conns:
                    await self.refresh(conn)
            except FanoutError as exc:  # the broker refused the subscription: the caller must know
                log.warning("membership change not applied on the broker: %s", exc)
                await self._send_reply(request, error=exc)
                return
            await self._send_reply(request, result)

        self.spawn(apply_then_reply(), "membership")

    async def apply_change(self, change: Change, conn: C | None = None) -> None:
        """(Un)subscribe as a membership change requires; changes are applied in the order made. With
        ``conn`` (whose membership changed), its history streams follow (:meth:`refresh`)."""
        if not change.empty:
            async with self._subscription_lock:
                if change.subscribe:
                    await self.backend.subscribe(change.subscribe)
                if change.unsubscribe:
                    await self.backend.unsubscribe(change.unsubscribe)
        if conn is not None:
            await self.refresh(conn)

    async def refresh(self, conn: C) -> None:
        """``conn``'s history streams after a membership change (node/continuity.py)."""
        if self.continuity is not None:
            await self.continuity.refresh(conn)

    def forget(self, conn: C) -> None:
        """Take ``conn`` out of the table (idempotent) and drop subscriptions nobody needs now; its
        resume record stays if it may come back (:func:`resumable`)."""
        if self.table.get(conn.client_id) is conn:
            conn.keep_last_state()
            change = self.table.remove(conn.client_id)
            if not change.empty:
                self.spawn(self.apply_change(change), "unsubscribe")
            if self.continuity is not None:
                self.continuity.left_table(conn, conn.wire.sent_code, conn.close_code)

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
        parts = replies.pages(result) if error is None else [result]
        encode, instance, limit = self._encode, self.instance, self.settings.max_message
        messages = [
            replies.encode_reply(encode, instance, limit, request, part, error, index, len(parts))
            for index, part in enumerate(parts)
        ]
        try:
            await self.backend.publish_many([(naming.inbox(request.reply_to), m) for m in messages])
        except FanoutError as exc:  # the requester will time out and name this node; count it here
            self.metrics.reply_failures += 1
            log.warning("reply to %s not published: %s", request.reply_to, exc)
