"""The node's side of continuity (docs/continuity.md): history streams, fanout.v1, resume, positioning.

It owns, for this node: which history streams each connection is in (``conn.streams``) and the
``joined``/``left`` frames when that changes; the position of every stream with local members
(:class:`~fanout.positioning.Positioning`, fed by the hub with every stored send, reading what it missed
from the store); the v1 ``message`` envelopes (built once per command per distinct set of streams); cache
targets' latest message for newcomers; the resume records of its v1 connections and the resume itself.

The hub delivers through :meth:`Continuity.push` (a v1 connection's frame) and hands it every send with
positions (:meth:`offer`); the lanes ask it for the welcome (:meth:`welcome`) and hand it ``resume``
frames (:meth:`resume`); the connection and the hub call :meth:`refresh` after membership changes and
:meth:`ended` when a connection leaves the table.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine, Iterable, Sequence
from typing import TYPE_CHECKING, Any

from fanout.backends.store import HistoryStore
from fanout.commands import Send
from fanout.config import Settings
from fanout.exceptions import FanoutError
from fanout.history import ALL_STREAM, FLAG_PREFIX, GROUP_PREFIX
from fanout.positioning import RETRY_AFTER, Delivery, Out, Positioning
from fanout.table import ConnectionTable

from .frames import CloseCode, Frame, encode_frame
from .metrics import Metrics
from .resume import Resumes
from .v1 import Resume, control_frame, joined_frame, message_frame, positions_json

if TYPE_CHECKING:
    from .surfaces import StreamMember

log = logging.getLogger("fanout.node")

#: seconds between checks of quiet streams against the store (SPEC: at least every 30 s); the live
#: connections' resume records are rewritten as often
QUIET_CHECK = 15.0
#: sends held for one connection while it waits for the store (its admission, a resume, a membership
#: change reading positions) beyond which it is closed with 3010 (it reconnects and resumes)
HELD_MAX = 10_000
NO_STREAMS: frozenset[str] = frozenset()


class Continuity:
    """See the module docstring."""

    def __init__(
        self,
        settings: Settings,
        store: HistoryStore | None,
        table: ConnectionTable[Any],
        metrics: Metrics,
        spawn: Callable[[Coroutine[Any, Any, Any], str], None],
        deliver: Callable[[Send, list[Any] | None, tuple[str, ...] | None], int],
    ) -> None:
        self.settings = settings
        self.policy = settings.policy
        self.store = store
        self.table = table
        self.metrics = metrics
        self.spawn = spawn
        self._deliver = deliver
        self.positioning = Positioning()
        #: resume tokens, records and the resume itself
        self.resumes = Resumes(settings, store, table, metrics, self.refresh, self.hold, self.release)
        self._ready: dict[str, asyncio.Future[None]] = {}
        self._loop_task: asyncio.Task[None] | None = None
        self._heads: frozenset[tuple[str, int]] = (
            frozenset()
        )  #: positioning's waiting heads at the last check
        #: each tracked stream's position at the last check: one that did not move since went quiet
        self._checked: dict[str, tuple[str, int]] = {}

    @property
    def history(self) -> bool:
        return self.policy.enabled

    async def resume(
        self, conn: StreamMember, request: Resume, restore: Callable[[StreamMember, dict[str, Any]], Any]
    ) -> str | None:
        """A v1 client's ``resume`` (node/resume.py)."""
        return await self.resumes.resume(conn, request, restore)

    async def start(self) -> None:
        if self.store is not None:
            await self.store.connect()
            self._loop_task = asyncio.create_task(self._every_while(), name="continuity")

    async def stop(self) -> None:
        """Write the resume records still being written (the clients the node just closed), disconnect."""
        if self._loop_task is not None:
            self._loop_task.cancel()
            await asyncio.gather(self._loop_task, return_exceptions=True)
        await self.resumes.flush()
        if self.store is not None:
            await self.store.close()

    def member_ids(self, stream: str) -> Iterable[str]:
        """The client ids of ``stream``'s local members."""
        table = self.table
        if stream == ALL_STREAM:
            return table.connections.keys()
        if stream.startswith(GROUP_PREFIX):
            return table.group_members(stream[len(GROUP_PREFIX) :])
        return table.flag_holders(stream[len(FLAG_PREFIX) :])

    def members(self, stream: str) -> list[StreamMember]:
        table = self.table
        return [c for cid in self.member_ids(stream) if (c := table.get(cid)) is not None]

    def streams_now(self, client_id: str) -> frozenset[str]:
        if client_id not in self.table:
            return NO_STREAMS
        streams = self.policy.streams_of_member(
            self.table.groups_of(client_id), self.table.flag_of(client_id)
        )
        return frozenset(streams) if streams else NO_STREAMS

    async def refresh(
        self, conn: StreamMember, *, announce: bool = True, cache: bool = True
    ) -> dict[str, tuple[str, int]]:
        """``conn``'s history streams after a membership change: tracking starts for streams it brought
        to this node; a v1 connection gets ``joined``/``left`` (when ``announce``); a cache stream it
        entered sends it its latest message. Returns the positions of the streams it entered."""
        before, now = conn.streams, self.streams_now(conn.client_id)
        if before == now or not self.history:
            self.resumes.changed(conn)
            return {}
        conn.streams = now
        if conn.v1:  # its sends wait while positions are read: those of a stream it entered follow `joined`
            self.hold(conn)
        try:
            entered = {}
            for stream in now - before:
                position = await self._position(stream)
                if position is not None:
                    entered[stream] = position
            for stream in before - now:
                if conn.v1 and announce and conn.open:
                    conn.push(control_frame({"type": "left", "stream": stream}))
                self._maybe_end(stream)
            if conn.v1 and announce and conn.open:
                for stream, (epoch, offset) in entered.items():
                    conn.push(joined_frame(stream, epoch, offset))
            if conn.v1:
                floor = conn.floor if conn.floor is not None else {}
                floor.update({s: off for s, (_, off) in entered.items()})
                conn.floor = floor or None
            if cache:
                await self.send_cached(conn, entered)
        finally:
            if conn.v1:
                self.release(conn)
        self.resumes.changed(conn)
        return entered

    async def send_cached(self, conn: StreamMember, streams: Iterable[str]) -> None:
        """The latest message of each cache stream of ``streams`` (within its TTL), as an ordinary frame."""
        for stream in streams:
            if self.policy.is_cache(stream):
                await self._send_latest(conn, stream)

    def left_table(self, conn: StreamMember, sent_code: int, received_code: int) -> None:
        """``conn`` left the table, having sent and received these close codes: its resume record stays
        if it may come back; streams without local members stop being tracked."""
        streams, conn.streams = conn.streams, NO_STREAMS
        self.resumes.ended(conn, self.resumes.resumable(sent_code, received_code))
        for stream in streams:
            self._maybe_end(stream)

    def _maybe_end(self, stream: str) -> None:
        if stream in self.positioning and not self.members(stream):
            self._ready.pop(stream, None)
            self._act(self.positioning.end(stream))

    async def _position(self, stream: str) -> tuple[str, int] | None:
        """This node's position of ``stream``, tracking it from now on if it did not."""
        if self.store is None:
            return None
        if self.positioning.begin(stream):
            self._ready[stream] = asyncio.get_running_loop().create_future()
            self.spawn(self._begin(stream), "stream position")
        ready = self._ready.get(stream)
        if ready is not None and not ready.done():
            await asyncio.shield(ready)
        return self.positioning.position(stream)

    async def _begin(self, stream: str) -> None:
        assert self.store is not None
        delay = 0.1
        while stream in self.positioning:
            try:
                epoch, offset = (await self.store.positions([stream]))[stream]
                break
            except FanoutError as exc:
                log.warning("position of %s not read: %s; again in %gs", stream, exc, delay)
                await asyncio.sleep(delay)
                delay = min(5.0, delay * 2)
        else:
            return
        out = self.positioning.ready(stream, epoch, offset)
        ready = self._ready.pop(stream, None)
        if ready is not None and not ready.done():
            ready.set_result(None)
        self._act(out)  # to connections that wait for this position: held until they announced it

    async def _send_latest(self, conn: StreamMember, stream: str) -> None:
        assert self.store is not None
        try:
            page = await self.store.read(stream, None, 1)
        except FanoutError as exc:
            log.warning("latest message of cache stream %s not read: %s", stream, exc)
            return
        for entry in page.entries:
            if conn.v1:
                frame = message_frame(entry.payload, entry.binary, entry.json, None)
            else:
                frame = encode_frame(entry.payload, entry.binary)
            if conn.push(frame):
                self.metrics.count_frames(1, len(frame))

    # ------------------------------------------------------------------ delivery

    def offer(self, send: Send) -> int:
        """A send with positions from the bus: delivered now, or held until what it follows is in."""
        if self.positioning.in_order(send):  # the common case
            return self._deliver(send, None, None)
        return self._act(self.positioning.offer(send))

    def _act(self, out: Out) -> int:
        reached = 0
        for stream in out.lost:
            self._lost(stream)
        for delivery in out.released:
            reached += self._deliver_one(delivery)
        for stream, since, limit in out.fetch:
            self.spawn(self._fetch(stream, since, limit, 0.0), "history read")
        for stream, since, limit in out.retry:
            self.spawn(self._fetch(stream, since, limit, RETRY_AFTER), "history read")
        return reached

    def _deliver_one(self, delivery: Delivery) -> int:
        """A send positioning released: to its target, or (read back from the store) to the local members
        of the streams it was read from."""
        send, via = delivery.send, delivery.via
        if via is None:
            return self._deliver(send, None, None)
        exclude, seen, conns = set(send.exclude), set(), []
        for stream in via:
            for cid in self.member_ids(stream):
                if cid not in exclude and cid not in seen and (conn := self.table.get(cid)) is not None:
                    seen.add(cid)
                    conns.append(conn)
        return self._deliver(send, conns, via)

    async def _fetch(self, stream: str, since: int, limit: int, wait: float) -> None:
        assert self.store is not None
        delay = 0.1
        if wait:
            await asyncio.sleep(wait)
        while stream in self.positioning:
            try:
                page = await self.store.read(stream, since, limit)
            except FanoutError as exc:
                log.warning("history of %s not read: %s; again in %gs", stream, exc, delay)
                await asyncio.sleep(delay)
                delay = min(5.0, delay * 2)
                continue
            self.metrics.history_reads += 1
            self._act(self.positioning.fetched(stream, since, page))
            return

    def _lost(self, stream: str) -> None:
        """Entries of ``stream`` are gone before this node delivered them: v1 members resume (3010),
        raw members are counted as having missed them."""
        log.warning("history stream %s lost entries this node had not delivered", stream)
        for conn in self.members(stream):
            if conn.v1:
                self.metrics.insufficient_state_closes += 1
                conn.start_close(CloseCode.INSUFFICIENT_STATE, "insufficient state")
            else:
                self.metrics.missed_by_raw += 1

    def push_all(
        self, conns: Sequence[StreamMember], send: Send, batch: list[Any] | None, via: tuple[str, ...] | None
    ) -> int:
        """:meth:`push` ``send`` to each of ``conns``; how many took it."""
        frames: dict[Any, Frame] = {}
        reached = 0
        for conn in conns:
            if conn.held is None and conn.floor is None:  # (most: :meth:`push`'s first case, inlined)
                frame = frames.get(conn.streams)
                if frame is None:
                    frame = frames[conn.streams] = self._envelope(send, frames, self._mine(conn, send, via))
                if conn.push(frame, batch):
                    reached += 1
            elif self.push(conn, send, frames, batch, via):
                reached += 1
        return reached

    def push(
        self,
        conn: StreamMember,
        send: Send,
        frames: dict[Any, Frame],
        batch: list[Any] | None,
        via: tuple[str, ...] | None = None,
    ) -> bool:
        """Write ``send`` to a v1 connection: its envelope with the offsets of the connection's streams,
        built once per distinct set of streams (``frames``: the send's envelopes, by the connections'
        stream sets and by the offsets they carry); held while the connection waits for the store
        (:meth:`hold`), at most ``HELD_MAX``: past that it is closed with 3010."""
        held = conn.held
        if held is not None:
            if len(held) < HELD_MAX and conn.open:
                held.append((send, via))
                return True
            if conn.open:
                log.warning("%s: over %d sends held for it; closed with 3010", conn.client_id, HELD_MAX)
                self.metrics.insufficient_state_closes += 1
                conn.start_close(CloseCode.INSUFFICIENT_STATE, "too many sends held")
            held.clear()
            return False
        if conn.floor is None:
            frame = frames.get(conn.streams)
            if frame is None:
                frame = frames[conn.streams] = self._envelope(send, frames, self._mine(conn, send, via))
            return conn.push(frame, batch)
        mine, floor, positions = self._mine(conn, send, via), conn.floor, send.positions or {}
        passed = {s for s in mine if s in floor and positions[s][1] <= floor[s]}
        for s in mine - passed:
            floor.pop(s, None)
        if not floor:
            conn.floor = None
        if passed:
            if passed == mine:
                return False  # it has this one already (replayed, or before its position)
            mine = mine - passed
        return conn.push(self._envelope(send, frames, mine), batch)

    @staticmethod
    def _mine(conn: StreamMember, send: Send, via: tuple[str, ...] | None) -> frozenset[str]:
        """The connection's streams this send carries an offset for (``via``: only those)."""
        if not send.positions or not conn.streams:
            return NO_STREAMS
        return conn.streams.intersection(send.positions if via is None else via)

    @staticmethod
    def _envelope(send: Send, frames: dict[Any, Frame], mine: frozenset[str]) -> Frame:
        key = ("offsets", mine)
        frame = frames.get(key)
        if frame is None:
            positions = send.positions
            offsets = {s: positions[s][1] for s in mine} if positions and mine else None
            frame = frames[key] = message_frame(send.payload, send.binary, send.json, offsets)
        return frame

    # ------------------------------------------------------------------ welcome, records, resume

    async def welcome(self, conn: StreamMember) -> Frame:
        """A v1 connection's welcome: positions of the streams it is in, and a resume token (with a store)."""
        positions = await self.refresh(conn, announce=False, cache=False)
        welcome: dict[str, Any] = {"type": "welcome", "client_id": conn.client_id}
        if self.store is not None:
            welcome["resume"] = self.resumes.issue(conn)
        welcome["streams"] = positions_json(positions)
        return control_frame(welcome)

    @staticmethod
    def hold(conn: StreamMember) -> None:
        """``conn``'s sends wait in ``conn.held`` until every holder has let go (:meth:`release`): its
        admission until its welcome is written, a resume until ``resumed``, a membership change until its
        ``joined`` frames (the positions they give are read from the store meanwhile)."""
        if conn.held is None:
            conn.held = []
        conn.holds += 1

    def release(self, conn: StreamMember) -> None:
        """One holder lets go; after the last one, the held sends go, those at or below the connection's
        positions left out. Without this, a send delivered meanwhile would come before the frame giving
        its stream's position, and a resume's replay would bring it a second time."""
        conn.holds -= 1
        if conn.holds:
            return
        held, conn.held = conn.held, None
        for send, via in held or ():
            self.push(conn, send, {}, None, via)

    async def _every_while(self) -> None:
        """Quiet streams checked against the store; live records refreshed."""
        while True:
            await asyncio.sleep(QUIET_CHECK)
            try:
                await self.catch_up(quiet_only=True)
            except FanoutError as exc:
                log.warning("history positions not checked: %s", exc)
            self.resumes.keep_all()

    async def catch_up(self, quiet_only: bool = False) -> None:
        """Read what tracked streams missed: every one after a re-subscription; every QUIET_CHECK
        (``quiet_only``), those that went quiet - nothing delivered since the previous check. A busy stream
        shows a gap with its next send; checked while its sends are on their way, their offsets would be
        read as missing (a read for nothing), or as lost when more than FANOUT_HISTORY_SIZE are in flight
        (3010 for its v1 members, though nothing was). Sends still waiting on the same heads as at the
        previous check wait only for each other (crossing orders across Redis Cluster slots): they go
        (``Positioning.force``)."""
        heads = self.positioning.heads()
        if heads and heads == self._heads:
            self._act(self.positioning.force())
        self._heads = self.positioning.heads()
        positions = {
            s: p for s in self.positioning.streams if (p := self.positioning.position(s)) is not None
        }
        streams = [s for s, p in positions.items() if not quiet_only or self._checked.get(s) == p]
        self._checked = positions
        if self.store is None or not streams:
            return
        for stream, (epoch, top) in (await self.store.positions(streams)).items():
            self._act(self.positioning.check(stream, epoch, top))
