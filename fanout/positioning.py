"""Positioning: the node's receive-side order for history streams. Pure: no I/O, no clock.

A node tracks every history stream it has local members of: its epoch and ``last``, the highest offset
it delivered with nothing missing before it. A stored send arrives with its positions (``Send.positions``);
for each tracked stream it is either already delivered (offset <= last), the next one (last + 1), or later
(a gap: something was lost, or another publisher's earlier send is still on its way). A send is
*released* (delivered) when, in every tracked stream it belongs to, it is the next one - so each stream's
sends reach its members in offset order. A gap makes the node read the missing entries from the store
(``Out.fetch``); what the store answers (:meth:`Positioning.fetched`) is queued like live sends, and the
live copies that come later are recognised (by offset, and by the send's id) and dropped. When the
missing entries are gone (trimmed, expired, a new epoch), the stream is *lost* (``Out.lost``): the node
closes its ``fanout.v1`` members with 3010 and counts its raw members as having missed them, then goes on.

A stream starts tracking when its first local member comes (:meth:`begin`), and its position is known
once the store answered (:meth:`ready`): sends for it are held until then, and those at or before the
position it got are dropped (they precede the members' start).

Known limit (Redis Cluster only, documented): a send to streams in several slots whose offsets were
taken by two publishers in crossing orders waits for the other until :meth:`force` releases it.
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field, replace

from .commands import Send, Target
from .history import Entry, Page

#: how many sends' ids the node remembers as delivered (a late live copy of a fetched entry is dropped)
RECENT_SENDS = 20_000
#: most entries read from the store for one gap at a time
FETCH_LIMIT = 1000
#: reads of a gap that still comes back with offsets missing before they are taken as never written
HOLE_READS = 3
#: seconds between those reads
RETRY_AFTER = 0.2


@dataclass(eq=False, slots=True)
class Pending:
    """A send waiting for its turn: ``offsets`` in each tracked stream it is in; ``via`` None to deliver it
    to its target (a live send), else to the local members of those streams (an entry read back)."""

    send: Send
    offsets: dict[str, int]
    via: tuple[str, ...] | None = None
    skip: bool = False  #: already delivered (through another stream): only advances the positions


@dataclass(slots=True)
class Delivery:
    send: Send
    via: tuple[str, ...] | None  #: None: the send's target; else the members of these streams


@dataclass(slots=True)
class Out:
    """What the node must do after a step: deliver ``released`` in this order, read ``fetch``
    ((stream, since, limit)) from the store, treat ``lost`` streams as having lost entries."""

    released: list[Delivery] = field(default_factory=list)
    fetch: list[tuple[str, int, int]] = field(default_factory=list)
    lost: list[str] = field(default_factory=list)
    #: like ``fetch``, after a short wait (:data:`RETRY_AFTER`): offsets the store did not have yet
    retry: list[tuple[str, int, int]] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.released or self.fetch or self.lost or self.retry)


@dataclass(slots=True)
class _Stream:
    epoch: str | None = None  #: None until the store told the position (sends are held until then)
    last: int = 0
    queue: dict[int, Pending] = field(default_factory=dict)  #: offset -> the send waiting with it
    fetching: bool = False
    hole_reads: int = 0
    order: int = 0  #: when it began to be tracked, against the others (steps look at streams in this order)


class Positioning:
    """Every tracked stream's position and waiting sends (see the module docstring)."""

    def __init__(self) -> None:
        self._streams: dict[str, _Stream] = {}
        self._recent: set[str] = set()
        self._recent_order: deque[str] = deque()
        #: streams whose head may be releasable now (in a heap by ``order``, and as a set), and streams whose
        #: gap may need a read: each step looks at the streams it changed, not at every tracked one
        self._dirty: set[str] = set()
        self._dirty_heap: list[tuple[int, str]] = []
        self._gappy: set[str] = set()
        self._began = 0
        self.missed_holes = 0  #: offsets taken as never written (their publisher died between steps)

    # ------------------------------------------------------------------ tracking

    def __contains__(self, stream: object) -> bool:
        return stream in self._streams

    @property
    def streams(self) -> list[str]:
        return list(self._streams)

    def begin(self, stream: str) -> bool:
        """Start tracking ``stream`` (its position unknown: sends are held). False if already tracked."""
        if stream in self._streams:
            return False
        self._began += 1
        self._streams[stream] = _Stream(order=self._began)
        return True

    def ready(self, stream: str, epoch: str, offset: int) -> Out:
        """The store's position for a stream that began: held sends after it go on, the others drop."""
        out = Out()
        st = self._streams.get(stream)
        if st is None or st.epoch is not None:
            return out
        st.epoch, st.last = epoch, offset
        self._mark((stream,))
        for off, pending in list(st.queue.items()):
            positions = pending.send.positions or {}
            if pending.via is not None and stream not in positions and off > offset:
                # read back from another stream while this one's epoch was unknown: it is this epoch's
                pending.send = replace(pending.send, positions={**positions, stream: (epoch, off)})
                continue
            position = positions.get(stream)
            if off <= offset or position is None or position[0] != epoch:
                del st.queue[off]
                pending.offsets.pop(stream, None)  # else it waits in its other streams for this one forever
                if pending.via is not None:  # (and this stream's members are not its recipients)
                    pending.via = tuple(s for s in pending.via if s != stream)
                self._mark(pending.offsets)
        self._drain(out)
        return out

    def position(self, stream: str) -> tuple[str, int] | None:
        """(epoch, last delivered) of a tracked stream whose position is known."""
        st = self._streams.get(stream)
        if st is None or st.epoch is None:
            return None
        return st.epoch, st.last

    def end(self, stream: str) -> Out:
        """Stop tracking ``stream`` (its last local member left); sends it held go on without it."""
        out = Out()
        st = self._streams.pop(stream, None)
        if st is not None:
            for offset in sorted(st.queue):
                pending = st.queue[offset]
                pending.offsets.pop(stream, None)
                self._mark(pending.offsets)
                if pending.via is not None:  # read back: for the members of its other streams only
                    pending.via = tuple(s for s in pending.via if s != stream)
                if not pending.offsets and pending.via is None:  # a live send waiting in no other stream
                    self._drain(out)  # (what came before it in this stream first)
                    self._release(pending, out)
            self._drain(out)
        return out

    # ------------------------------------------------------------------ sends

    def in_order(self, send: Send) -> bool:
        """The common case of :meth:`offer`, answered yes or no: whether ``send`` is, in every tracked
        stream it is in, the next send with nothing waiting (so nothing else can be released by it
        either). If so it is taken as released (the caller delivers it to its target); if not, nothing
        changed and :meth:`offer` takes it."""
        sid = send.sid
        if sid is not None and sid in self._recent:
            return False  # delivered already (read back from the store before this live copy came)
        streams, nexts = self._streams, []
        for stream, (epoch, offset) in (send.positions or {}).items():
            st = streams.get(stream)
            if st is None:
                continue
            if st.queue or offset != st.last + 1 or epoch != st.epoch:
                return False
            nexts.append(st)
        for st in nexts:
            st.last += 1
            st.hole_reads = 0
        self._remember(sid)
        return True

    def offer(self, send: Send) -> Out:
        """A send from the bus. Without positions in a tracked stream it is released at once."""
        if self.in_order(send):
            return Out([Delivery(send, None)])
        positions = send.positions or {}
        if send.sid is not None and send.sid in self._recent:
            return Out()  # delivered already (read back from the store before this live copy came)
        out = Out()
        offsets: dict[str, int] = {}
        for stream, (epoch, offset) in positions.items():
            st = self._streams.get(stream)
            if st is None:
                continue
            if st.epoch is not None and epoch != st.epoch:
                self._reset(stream, st, epoch, out)
            if st.epoch is not None and offset <= st.last:
                continue
            if offset in st.queue:
                return self._drained(out)  # a copy of a send already waiting (read back, or twice)
            offsets[stream] = offset
        if not offsets:
            if not any(stream in self._streams for stream in positions):
                out.released.append(Delivery(send, None))
                self._remember(send.sid)
            return self._drained(out)
        pending = Pending(send, offsets)
        for stream, offset in offsets.items():
            self._streams[stream].queue[offset] = pending
        self._mark(offsets)
        return self._drained(out)

    def fetched(self, stream: str, since: int, page: Page) -> Out:
        """The store's answer to a ``fetch`` of ``stream`` after ``since``."""
        out = Out()
        st = self._streams.get(stream)
        if st is None or st.epoch is None:  # not tracked, or tracked anew since the read (position unknown)
            return out
        st.fetching = False
        self._mark((stream,))
        if st.epoch != page.epoch:
            self._reset(stream, st, page.epoch, out)
        if not page.complete_after(st.last):
            out.lost.append(stream)
            st.last = max(st.last, min(page.first, min(st.queue, default=page.first)) - 1)
        for entry in page.entries:
            if entry.offset > st.last and entry.offset not in st.queue:
                self._queue_entry(stream, entry)
        self._drain(out, fetch=False)
        head = min(st.queue, default=None)
        if head is not None and head > st.last + 1 and len(page.entries) < FETCH_LIMIT:
            if page.offset >= head - 1:
                # offsets before the head that the store does not have although its top is past them: a
                # publisher between its two steps (Redis Cluster), or one that died there. Read again a
                # few times (``retry``: after a short wait), then take them as never written.
                st.hole_reads += 1
                if st.hole_reads >= HOLE_READS:
                    self.missed_holes += head - st.last - 1
                    st.last, st.hole_reads = head - 1, 0
                else:
                    st.fetching = True
                    out.retry.append((stream, st.last, min(FETCH_LIMIT, head - st.last - 1)))
            else:
                # the store's top is not even there: a read made before those sends were stored, or a
                # store behind the bus (writes lost in a failover, a forged positions line). Read again
                # after a short wait - not at once, which would read it as fast as it answers, forever
                st.fetching = True
                out.retry.append((stream, st.last, min(FETCH_LIMIT, head - st.last - 1)))
        self._mark((stream,))
        self._drain(out)
        return out

    def _queue_entry(self, stream: str, entry: Entry) -> None:
        """An entry read back from ``stream``: it waits in every tracked stream it is in (with the live
        copy, if that is waiting already)."""
        offsets = {stream: entry.offset}
        for other, offset in entry.positions.items():
            ost = self._streams.get(other)
            if ost is not None and (ost.epoch is None or offset > ost.last):  # (position unknown: it waits)
                offsets[other] = offset
        self._mark(offsets)
        for other, offset in offsets.items():
            waiting = self._streams[other].queue.get(offset)
            if waiting is not None and waiting.send.sid == entry.sid:
                for s, o in offsets.items():
                    waiting.offsets[s] = o
                    self._streams[s].queue[o] = waiting
                if waiting.via is not None:  # read back too: it goes to the members of these streams as well
                    waiting.via = tuple(dict.fromkeys((*waiting.via, *offsets)))
                    positions = {**(waiting.send.positions or {}), **self._entry_positions(offsets)}
                    waiting.send = replace(waiting.send, positions=positions)
                return
        positions = self._entry_positions(offsets)
        send = Send(
            Target.all(),
            entry.payload,
            entry.binary,
            entry.exclude,
            json=entry.json,
            sid=entry.sid,
            positions=positions,
        )
        pending = Pending(send, offsets, via=tuple(offsets), skip=entry.sid in self._recent)
        for s, o in offsets.items():
            self._streams[s].queue.setdefault(o, pending)

    def _entry_positions(self, offsets: dict[str, int]) -> dict[str, tuple[str, int]]:
        """An entry's positions in the tracked streams whose epoch is known (the others get theirs in
        :meth:`ready`)."""
        return {s: (e, o) for s, o in offsets.items() if (e := self._streams[s].epoch) is not None}

    def check(self, stream: str, epoch: str, top: int) -> Out:
        """The store's current position of a tracked stream (after a re-subscription, or when it went
        quiet): what the node missed is read."""
        out = Out()
        st = self._streams.get(stream)
        if st is None or st.epoch is None:
            return out
        if epoch != st.epoch:
            self._reset(stream, st, epoch, out)
        if top > st.last and not st.queue and not st.fetching:
            st.fetching = True
            out.fetch.append((stream, st.last, min(FETCH_LIMIT, top - st.last)))
        return out

    def force(self) -> Out:
        """Release the sends that wait only for each other (crossing orders across Cluster slots)."""
        out = Out()
        for st in self._streams.values():
            head = min(st.queue, default=None)
            if head is not None and head == st.last + 1:
                self._release(st.queue[head], out)
        self._drain(out)
        return out

    def waiting(self) -> int:
        return sum(len(st.queue) for st in self._streams.values())

    def heads(self) -> frozenset[tuple[str, int]]:
        """Each stream's first waiting send, while nothing is being read for it: the same heads at two
        checks some seconds apart mean sends that wait only for each other (see :meth:`force`)."""
        return frozenset(
            (stream, min(st.queue)) for stream, st in self._streams.items() if st.queue and not st.fetching
        )

    # ------------------------------------------------------------------ inside

    def _reset(self, stream: str, st: _Stream, epoch: str, out: Out) -> None:
        """The stream's entries were lost (a new epoch): what waited with the old epoch goes."""
        out.lost.append(stream)
        self._mark((stream,))
        for pending in st.queue.values():
            pending.offsets.pop(stream, None)
            self._mark(pending.offsets)
        st.queue.clear()
        st.epoch, st.last, st.fetching, st.hole_reads = epoch, 0, False, 0

    def _remember(self, sid: str | None) -> None:
        if sid is None or sid in self._recent:
            return
        self._recent.add(sid)
        self._recent_order.append(sid)
        if len(self._recent_order) > RECENT_SENDS:
            self._recent.discard(self._recent_order.popleft())

    def _drained(self, out: Out) -> Out:
        self._drain(out)
        return out

    def _is_next(self, pending: Pending) -> bool:
        for stream, offset in pending.offsets.items():
            st = self._streams.get(stream)
            if st is None:
                continue
            if st.epoch is None or offset != st.last + 1 or min(st.queue) != offset:
                return False
        return True

    def _mark(self, streams: Iterable[str]) -> None:
        for stream in streams:
            if stream not in self._dirty and (st := self._streams.get(stream)) is not None:
                self._dirty.add(stream)
                heapq.heappush(self._dirty_heap, (st.order, stream))
            self._gappy.add(stream)

    def _release(self, pending: Pending, out: Out) -> None:
        self._mark(pending.offsets)
        for stream, offset in pending.offsets.items():
            st = self._streams.get(stream)
            if st is None or st.queue.get(offset) is not pending:
                continue
            if st.epoch is not None and offset == st.last + 1:
                del st.queue[offset]
                st.last = offset
                st.hole_reads = 0
            else:  # released ahead of its turn here (force): it keeps its place, as delivered already
                st.queue[offset] = Pending(pending.send, {stream: offset}, pending.via, skip=True)
        if not pending.skip and pending.send.sid not in self._recent:
            out.released.append(Delivery(pending.send, pending.via))
        self._remember(pending.send.sid)

    def _drain(self, out: Out, fetch: bool = True) -> None:
        """Release what is next in the changed streams (a release changes the streams it was in: they are
        looked at too); then, unless ``fetch`` is False, read the gaps in front of the changed streams'
        heads."""
        dirty, heap, streams = self._dirty, self._dirty_heap, self._streams
        while heap:
            _, stream = heapq.heappop(heap)
            dirty.discard(stream)
            st = streams.get(stream)
            if st is None or st.epoch is None or not st.queue:
                continue
            head = min(st.queue)
            if head == st.last + 1 and self._is_next(st.queue[head]):
                self._release(st.queue[head], out)
        if not fetch:
            return
        gappy, self._gappy = self._gappy, set()
        for _, stream, st in sorted((st.order, s, st) for s in gappy if (st := streams.get(s)) is not None):
            if st.epoch is None or st.fetching or not st.queue:
                continue
            head = min(st.queue)
            if head > st.last + 1:
                st.fetching = True
                out.fetch.append((stream, st.last, min(FETCH_LIMIT, head - st.last - 1)))
