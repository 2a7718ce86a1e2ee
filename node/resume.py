"""Resume (docs/continuity.md): a fanout.v1 connection's token and record, and the resume itself.

Every v1 connection (with a store) gets an unguessable, single-use token in its welcome
(:meth:`Resumes.issue`). Its *record* - client id, flag, groups, session - is written with the token as key
when the connection opens and whenever its state changes, rewritten every ``QUIET_CHECK`` while it lives
(``keep_all``), and kept for FANOUT_RESUME_TTL once it ended in a way that allows coming back
(:meth:`Resumes.resumable`) - or deleted. A killed node's records outlive it by FANOUT_RESUME_TTL at least.
A resume (:meth:`Resumes.resume`) claims the record in one step (single use, bound to the admitted flag),
restores the state, replays what each requested stream missed, answers ``resumed``, then lets through
what arrived meanwhile, de-duplicated by offset.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

import orjson

from fanout.backends.store import HistoryStore
from fanout.config import Settings
from fanout.exceptions import FanoutError
from fanout.history import Page, cut_replay, merge_replay
from fanout.positioning import HOLE_READS, RETRY_AFTER
from fanout.table import ConnectionTable

from .frames import CloseCode
from .metrics import Metrics
from .v1 import Resume, control_frame, joined_frame, message_frame

if TYPE_CHECKING:
    from .surfaces import StreamMember

log = logging.getLogger("fanout.node")

#: seconds between rewrites of the live connections' resume records
KEEP_EVERY = 15.0
#: a record outlives its last rewrite by FANOUT_RESUME_TTL plus this (a killed node's clients can resume
#: for at least FANOUT_RESUME_TTL after its death)
RECORD_SLACK = 2 * KEEP_EVERY

Refresh = Callable[..., Coroutine[Any, Any, dict[str, tuple[str, int]]]]
Hold = Callable[["StreamMember"], None]


class Resumes:
    """See the module docstring."""

    def __init__(
        self,
        settings: Settings,
        store: HistoryStore | None,
        table: ConnectionTable[Any],
        metrics: Metrics,
        refresh: Refresh,
        hold: Hold,
        release: Hold,
    ) -> None:
        self.settings = settings
        self.store = store
        self.table = table
        self.metrics = metrics
        self._refresh = refresh  #: continuity's: a connection's streams after its state changed
        #: continuity's: a connection's sends wait / one holder lets go (the last one sends them)
        self._hold, self._release = hold, release
        self._writes: set[asyncio.Task[None]] = set()  #: records being written

    def issue(self, conn: StreamMember) -> str:
        """A new token for ``conn`` (its welcome's ``resume``); its record is written."""
        conn.token = secrets.token_urlsafe(24)
        self._write(self._save(conn, self.settings.resume_ttl + RECORD_SLACK, create=True))
        return conn.token

    def keep_all(self) -> None:
        """Rewrite the records of the live connections (their sessions may have changed meanwhile)."""
        for conn in list(self.table.connections.values()):
            if getattr(conn, "token", None) is not None:
                self.changed(conn)

    async def flush(self) -> None:
        """Wait for the records being written (the clients a stopping node just closed)."""
        if self._writes:
            await asyncio.wait(list(self._writes), timeout=self.settings.publish_timeout)

    def _write(self, coroutine: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coroutine, name="resume record")
        self._writes.add(task)
        task.add_done_callback(self._written)

    def _written(self, task: asyncio.Task[None]) -> None:
        self._writes.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("resume record not written: %s", task.exception())

    def changed(self, conn: StreamMember) -> None:
        """Write ``conn``'s resume record as it is now."""
        if conn.token is not None and self.store is not None and conn.open:
            self._write(self._save(conn, self.settings.resume_ttl + RECORD_SLACK))

    def _record(self, conn: StreamMember) -> tuple[str | None, bytes]:
        table, cid = self.table, conn.client_id
        flag = table.flag_of(cid)
        groups = sorted(table.groups_of(cid))
        if cid not in table:  # it left the table: what it had last
            flag, groups_set = conn.identity()
            groups = sorted(groups_set)
        record = {"c": cid, "f": flag, "g": groups, "s": conn.session, "t": time.time()}
        return flag, orjson.dumps(record, default=repr)

    async def _save(self, conn: StreamMember, ttl: float, create: bool = False) -> None:
        assert self.store is not None and conn.token is not None
        flag, record = self._record(conn)
        try:
            await self.store.save_resume(conn.token, flag, record, ttl, create=create)
        except FanoutError as exc:
            log.warning("resume record of %s not saved: %s", conn.client_id, exc)

    def ended(self, conn: StreamMember, resumable: bool) -> None:
        """``conn`` left the table: its record stays for FANOUT_RESUME_TTL if it may come back."""
        if conn.token is None or self.store is None:
            return
        token, conn.token = conn.token, None
        if resumable:
            flag, record = self._record(conn)
            self._write(self.store.save_resume(token, flag, record, self.settings.resume_ttl))
        else:
            self._write(self.store.drop_resume(token))

    @staticmethod
    def resumable(sent_code: int, received_code: int) -> bool:
        """Whether a connection that ended so may resume (SPEC: not when the client closed it, nor when the
        application or ServerUtil did): the link dropped (no close frame either way; a too slow client cut
        off), the node went away (1001), the keepalive failed (1011, no answer), its state was lost (3010)."""
        if sent_code == 0:
            return received_code == CloseCode.ABNORMAL_CLOSURE
        return sent_code in (CloseCode.GOING_AWAY, CloseCode.INSUFFICIENT_STATE) or (
            sent_code == CloseCode.INTERNAL_ERROR and received_code == CloseCode.ABNORMAL_CLOSURE
        )

    async def _read(self, stream: str, epoch: str, since: int, known: bool) -> tuple[Page, bool, int]:
        """What ``stream`` has after ``since`` for a resume (``known``: its token was): the page, whether it
        can be replayed whole, and its last offset. An offset given but not written yet (Redis Cluster: a
        send to streams in several slots takes its offsets, then appends) is read again a few times: the
        node's position may be past it already, so its live copy would not reach this connection."""
        assert self.store is not None
        for attempt in range(HOLE_READS + 1):
            page = await self.store.read(stream, since, self.settings.recovery_max + 1)
            ok = (
                known
                and page.epoch == epoch
                and page.complete_after(since)
                and len(page.entries) <= self.settings.recovery_max
            )
            last = page.entries[-1].offset if ok and page.entries else since
            if not ok or last >= page.offset or attempt == HOLE_READS:
                return page, ok, last
            await asyncio.sleep(RETRY_AFTER)  # (a publisher that died in between left a hole: given up)
        raise AssertionError("unreachable")

    async def resume(
        self, conn: StreamMember, request: Resume, restore: Callable[[StreamMember, dict[str, Any]], Any]
    ) -> str | None:
        """A v1 client's ``resume``: its old state back (``restore``: groups, flag, session), then what
        it missed in each stream it asked for, then ``resumed``, then what arrived meanwhile."""
        self._hold(conn)  # what arrives meanwhile goes after the replay, past its positions
        try:
            record = None
            if self.store is not None:
                try:
                    record = await self.store.claim_resume(request.token, self.table.flag_of(conn.client_id))
                except FanoutError as exc:
                    log.warning("resume of %s: record not read: %s", conn.client_id, exc)
            state = orjson.loads(record) if record is not None else None
            if state is None:
                self.metrics.resumes_refused += 1
            else:
                self.metrics.resumes += 1
                await restore(conn, state)
            conn.resumed = True
            for stream, (epoch, offset) in (await self._refresh(conn, announce=False)).items():
                if stream not in request.streams:  # streams it is in now that it did not ask for
                    conn.push(joined_frame(stream, epoch, offset))
            report: dict[str, Any] = {}
            streams = {s: p for s, p in request.streams.items() if s in conn.streams}
            pages, tops = {}, {}
            for stream, (epoch, since) in streams.items():
                page, ok, last = await self._read(stream, epoch, since, state is not None)
                tops[stream] = last if ok else page.offset
                report[stream] = {"recovered": ok, "epoch": page.epoch, "offset": tops[stream]}
                if ok:
                    pages[stream] = page
            pages, tops = cut_replay(pages, tops)  # sends appended between two reads: they come live
            for stream in pages:
                report[stream]["offset"] = tops[stream]
            old = state["c"] if state is not None else None
            for sent in merge_replay(pages):
                if old is not None and old in sent.exclude:
                    continue
                frame = message_frame(sent.payload, sent.binary, sent.json, sent.offsets)
                if conn.push(frame):
                    self.metrics.count_frames(1, len(frame))
            recovered = state is not None and all(r["recovered"] for r in report.values())
            conn.push(control_frame({"type": "resumed", "recovered": recovered, "streams": report}))
            floor = conn.floor if conn.floor is not None else {}
            floor.update({s: r["offset"] for s, r in report.items()})
            conn.floor = floor or None
        finally:
            self._release(conn)
        return old if isinstance(old, str) else None
