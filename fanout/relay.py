"""``fanout relay``: publishes the committed rows of an outbox (:mod:`fanout.outbox`), then deletes them.

Any number of relays run at once, on any host, against one table. They share the work by **shards**: each
row names the shards of its targets (``crc32(target) % 64``); a relay owns shards through session-level
advisory locks (``pg_try_advisory_lock(key, shard)``) and takes its fair share (64 / the number of live
relays, counted from the advisory locks each relay holds while it runs, in ``pg_locks``), releasing what
is above it. A relay whose session ends (SIGKILL, a lost connection) loses its locks and the others take
its shards over within a second.

Order. Rows are read in ``seq`` order (commit order, numbered at COMMIT). A row is published by the owner
of its lowest shard, and only when no pending row with a smaller ``seq`` touches any of its shards: so
rows of one target are published one after the other in commit order, by one relay at a time, and a row
spanning shards owned by two relays waits (the globally oldest pending row is always publishable, so
nothing waits forever). Each row is published, then deleted; a relay that dies in between leaves it to
the next owner, which publishes it again with the same ``idempotency_key`` (database, table, row id), so
no client sees it twice.

A broker that is down (or a ServerUtil error of any kind) makes the relay wait and retry the same row with
backoff: it never drops or skips a row. It wakes on ``NOTIFY`` (sent by the commit trigger) and polls every
``poll`` seconds as a fallback. SIGTERM (:meth:`Relay.stop`) finishes the batch in hand and returns.
``/healthz`` and ``/metrics`` are served on ``--http HOST:PORT``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import inspect
import logging
import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import orjson

from .arguments import COMMAND_CALLS
from .config import Settings
from .exceptions import FanoutError, MessageTooLarge, NoLiveNodes, NotConnected, PayloadError
from .outbox import DEFAULT_TABLE, SHARDS, SqlNames, decode_args
from .probes import serve_probes
from .serverutil import ServerUtil

if TYPE_CHECKING:
    import psycopg

log = logging.getLogger("fanout.relay")


def _calls_taking(parameter: str) -> frozenset[str]:
    """ServerUtil's command calls that have ``parameter`` (read from their signatures: one source)."""
    return frozenset(
        call for call in COMMAND_CALLS if parameter in inspect.signature(getattr(ServerUtil, call)).parameters
    )


#: the calls that take ``wait``: the relay makes them with wait=True (a later row sees their effect)
_WAITING = _calls_taking("wait")
#: the sends: published with an idempotency key (the caller's, else the row's)
_SENDS = _calls_taking("idempotency_key")
#: how often the share of shards is checked (and shards taken over or given back)
_BALANCE_EVERY = 0.5
_BACKOFF = (0.1, 5.0)


@dataclass
class RelayOptions:
    """What ``fanout relay`` takes besides the FANOUT_* settings."""

    dsn: str  #: libpq connection string or URI of the database holding the outbox
    table: str = DEFAULT_TABLE
    batch: int = 500  #: rows published before they are deleted together
    scan: int = 5000  #: pending rows read (by seq) to pick a batch from
    poll: float = 1.0  #: seconds between looks at the table when no NOTIFY came
    http: tuple[str, int] | None = None  #: serve /healthz and /metrics here


@dataclass
class RelayMetrics:
    published: int = 0  #: rows published and deleted
    failures: int = 0  #: publish attempts that failed (each retried) and database sessions lost
    lag: float = 0.0  #: age (seconds) of the oldest committed row at the last look
    pending: int = 0  #: committed rows seen at the last look (at most ``scan``)
    owned: set[int] = field(default_factory=set)
    relays: int = 0  #: live relays at the last balance


@dataclass(slots=True)
class _Pending:
    id: int
    seq: int
    shards: list[int]


class Relay:
    """One relay: ``await relay.run()`` until :meth:`stop`."""

    def __init__(self, options: RelayOptions, settings: Settings) -> None:
        self.options = options
        self.settings = settings
        self.names = SqlNames(options.table)
        self.metrics = RelayMetrics()
        self._stopping = asyncio.Event()
        self._wake = asyncio.Event()
        self._util: ServerUtil | None = None
        self._key_prefix = ""
        self._db_up = False
        self._broker_error: str | None = None
        self._last_balance = 0.0
        self._order = list(range(SHARDS))
        random.shuffle(self._order)
        self._http: asyncio.Server | None = None
        self._connecting = asyncio.Lock()

    # ------------------------------------------------------------------ lifecycle

    def stop(self) -> None:
        """Finish the batch in hand (unless the broker is down), then :meth:`run` returns."""
        self._stopping.set()
        self._wake.set()

    @property
    def healthy(self) -> bool:
        return self._db_up and self._broker_error is None and not self._stopping.is_set()

    async def run(self) -> None:
        import psycopg
        import psycopg.errors

        if self.options.http is not None:
            host, port = self.options.http
            self._http = await serve_probes(host, port, self._unhealthy, self.render_metrics)
        delay = _BACKOFF[0]
        try:
            while not self._stopping.is_set():
                try:
                    await self._session()
                    delay = _BACKOFF[0]
                except (psycopg.Error, OSError) as exc:
                    self._db_up = False
                    self.metrics.failures += 1
                    self.metrics.owned.clear()
                    why = " ".join(str(exc).split())
                    if isinstance(exc, psycopg.errors.UndefinedTable):
                        why += f" (create it: fanout outbox init --table {self.names.table})"
                    log.warning("database session lost (%s): again in %.1fs", why, delay)
                    await self._pause(delay)
                    delay = min(delay * 2, _BACKOFF[1])
        finally:
            self._db_up = False
            if self._util is not None:
                with contextlib.suppress(Exception):
                    await self._util.disconnect()
            if self._http is not None:
                self._http.close()
                await self._http.wait_closed()

    async def _pause(self, seconds: float) -> None:
        """Sleep ``seconds``, or less if stopped."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._stopping.wait()

    async def _doze(self, seconds: float) -> None:
        """Sleep until a NOTIFY, a stop or ``seconds``."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._wake.wait()

    # ------------------------------------------------------------------ one database session

    async def _session(self) -> None:
        import psycopg

        n = self.names
        async with (
            await psycopg.AsyncConnection.connect(
                self.options.dsn, autocommit=True, application_name="fanout-relay"
            ) as db,
            await psycopg.AsyncConnection.connect(
                self.options.dsn, autocommit=True, application_name="fanout-relay-listen"
            ) as listen,
        ):
            await listen.execute(f'LISTEN "{n.channel}"')
            await db.execute("SELECT pg_advisory_lock(%s, pg_backend_pid())", (n.relays_key,))
            cur = await db.execute("SELECT current_database()")
            row = await cur.fetchone()
            self._key_prefix = key_prefix(str(row[0]) if row else "", n.table)
            self._db_up = True
            self._last_balance = 0.0
            try:  # the broker and the nodes' heartbeats now, not with the first row
                await self._connected()
            except (FanoutError, OSError) as exc:
                log.warning("broker not reachable yet (%s): the first row will try again", exc)
            info = db.info
            log.info("relay on %s:%s/%s (table %s) running", info.host, info.port, info.dbname, n.table)
            listener = asyncio.create_task(self._listen(listen))
            look_at = 0.0  # when to look at the table next without a NOTIFY
            try:
                while not self._stopping.is_set():
                    now = time.monotonic()
                    took = False
                    if now - self._last_balance >= _BALANCE_EVERY:
                        took = await self._balance(db)
                    if self._wake.is_set() or took or now >= look_at:
                        self._wake.clear()
                        if await self._round(db):
                            look_at = 0.0  # a batch went: there may be more at once
                            continue
                        look_at = time.monotonic() + self.options.poll
                    if listener.done():
                        listener.result()  # its connection failed: raise it here
                    until = min(look_at, self._last_balance + _BALANCE_EVERY) - time.monotonic()
                    await self._doze(max(until, 0.01))
            finally:
                listener.cancel()
                with contextlib.suppress(BaseException):
                    await listener
                self.metrics.owned.clear()

    async def _listen(self, listen: psycopg.AsyncConnection[Any]) -> None:
        async for _ in listen.notifies():
            self._wake.set()

    async def _balance(self, db: psycopg.AsyncConnection[Any]) -> bool:
        """Take this relay's fair share of the shards, or give back what is above it. True if it took
        shards (their rows are to be looked at)."""
        n = self.names
        self._last_balance = time.monotonic()
        cur = await db.execute(
            "SELECT classid::bigint, objid::bigint, pid FROM pg_locks WHERE locktype = 'advisory' "
            "AND objsubid = 2 AND granted AND classid IN (%s, %s) "
            "AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
            (n.key, n.relays_key),
        )
        held = await cur.fetchall()
        relays = {pid for classid, _, pid in held if classid == n.relays_key}
        taken = {objid for classid, objid, _ in held if classid == n.key and objid < SHARDS}
        owned = self.metrics.owned
        self.metrics.relays = live = max(1, len(relays))
        share = math.ceil(SHARDS / live)
        if len(owned) > share:
            extra = sorted(owned)[share:]
            await db.execute("SELECT pg_advisory_unlock(%s, s) FROM unnest(%s::int[]) s", (n.key, extra))
            owned.difference_update(extra)
            log.info("gave back %d shards (%d relays)", len(extra), live)
        elif len(owned) < share:
            free = [s for s in self._order if s not in taken and s not in owned]
            if free:
                cur = await db.execute(
                    "SELECT s FROM unnest(%s::int[]) s WHERE pg_try_advisory_lock(%s, s) LIMIT %s",
                    (free, n.key, share - len(owned)),
                )
                got = [s for (s,) in await cur.fetchall()]
                owned.update(got)
                if got:
                    log.info("took %d shards (%d relays, %d owned)", len(got), live, len(owned))
                    return True
        return False

    async def _round(self, db: psycopg.AsyncConnection[Any]) -> bool:
        """Publish and delete one batch of this relay's publishable rows. False if there was none."""
        n = self.names
        cur = await db.execute(
            f"SELECT id, seq, shards, extract(epoch FROM clock_timestamp() - created_at)::float8 "
            f"FROM {n.table} WHERE seq IS NOT NULL ORDER BY seq LIMIT %s",
            (self.options.scan,),
        )
        head = await cur.fetchall()
        self.metrics.pending = len(head)
        self.metrics.lag = float(head[0][3]) if head else 0.0
        mine = self._publishable([_Pending(i, s, list(sh)) for i, s, sh, _ in head])
        if not mine:
            return False
        cur = await db.execute(
            f"SELECT id, call, args FROM {n.table} WHERE id = ANY(%s::bigint[]) ORDER BY seq",
            ([p.id for p in mine],),
        )
        shards = {p.id: p.shards for p in mine}
        rows = [(i, call, args, shards[i]) for i, call, args in await cur.fetchall()]
        done = await self._publish(rows)
        if done:
            await db.execute(f"DELETE FROM {n.table} WHERE id = ANY(%s::bigint[])", (done,))
            self.metrics.published += len(done)
            if any(len(shards) > 1 for _, _, shards, _ in head):  # a row of another relay may wait for these
                await db.execute("SELECT pg_notify(%s, 'd')", (n.channel,))
        return len(done) == len(rows)

    def _publishable(self, head: Sequence[_Pending]) -> list[_Pending]:
        """The rows of ``head`` (in seq order) this relay publishes now: its lowest shard is owned here
        and no earlier pending row that is not published here first touches any of its shards."""
        owned = self.metrics.owned
        blocked: set[int] = set()
        out: list[_Pending] = []
        for row in head:
            if len(out) >= self.options.batch:
                break
            if min(row.shards) in owned and blocked.isdisjoint(row.shards):
                out.append(row)
            else:
                blocked.update(row.shards)
        return out

    # ------------------------------------------------------------------ publishing

    async def _connected(self) -> ServerUtil:
        async with self._connecting:
            if self._util is None:
                util = ServerUtil(settings=self.settings)
                await util.connect()
                self._util = util
            return self._util

    async def _publish(self, rows: Sequence[tuple[int, str, Any, list[int]]]) -> list[int]:
        """Publish ``rows`` (in seq order): rows that share a shard one after the other, in order, and
        such chains side by side. The ids published: all of them, or fewer when stopped while the broker
        was down."""
        done = await asyncio.gather(*(self._publish_chain(chain) for chain in chains(rows)))
        return [row_id for published in done for row_id in published]

    async def _publish_chain(self, rows: Sequence[tuple[int, str, Any, list[int]]]) -> list[int]:
        """Publish ``rows`` in order, each retried until the broker took it; the ids published."""
        done: list[int] = []
        for row_id, call, args, _ in rows:
            delay = _BACKOFF[0]
            while True:
                try:
                    await self._publish_one(row_id, call, args)
                    self._broker_error = None
                    done.append(row_id)
                    break
                except (FanoutError, OSError) as exc:
                    self.metrics.failures += 1
                    self._broker_error = f"{type(exc).__name__}: {exc}"
                    permanent = isinstance(exc, PayloadError | MessageTooLarge)
                    log.log(
                        logging.ERROR if permanent else logging.WARNING,
                        "row %d (%s) not published (%s): again in %.1fs",
                        row_id,
                        call,
                        self._broker_error,
                        delay,
                    )
                    if isinstance(exc, NotConnected) and self._util is not None:
                        util, self._util = self._util, None
                        with contextlib.suppress(Exception):
                            await util.disconnect()
                    if self._stopping.is_set():
                        return done
                    await self._pause(delay)
                    delay = min(delay * 2, _BACKOFF[1])
        return done

    async def _publish_one(self, row_id: int, call: str, args: Any) -> None:
        util = await self._connected()
        kwargs = decode_args(call, args if isinstance(args, dict) else orjson.loads(args))
        if call in _WAITING:
            kwargs["wait"] = True
        if call in _SENDS:  # the caller's key if it gave one, else the row's
            kwargs.setdefault("idempotency_key", f"{self._key_prefix}{row_id}")
        # NoLiveNodes: the broker took it and no node listens in the namespace (history sends are kept)
        with contextlib.suppress(NoLiveNodes):
            await getattr(util, call)(**kwargs)

    # ------------------------------------------------------------------ health and metrics

    def render_metrics(self) -> str:
        m = self.metrics
        lines = []
        for name, kind, help_text, value in (
            ("fanout_relay_published_total", "counter", "Outbox rows published and deleted.", m.published),
            (
                "fanout_relay_failures_total",
                "counter",
                "Failed publish attempts and lost DB sessions.",
                m.failures,
            ),
            ("fanout_relay_lag_seconds", "gauge", "Age of the oldest committed outbox row.", m.lag),
            (
                "fanout_relay_pending_rows",
                "gauge",
                "Committed rows waiting (at most the scan size).",
                m.pending,
            ),
            ("fanout_relay_shards_owned", "gauge", "Shards this relay owns.", len(m.owned)),
            ("fanout_relay_relays", "gauge", "Live relays on this table.", m.relays),
            ("fanout_relay_up", "gauge", "1 while connected and publishing.", int(self.healthy)),
        ):
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", f"{name} {value}"]
        return "\n".join(lines) + "\n"

    def _unhealthy(self) -> str | None:
        """None while healthy, else why not (``/healthz``)."""
        if self.healthy:
            return None
        if self._stopping.is_set():
            return "stopping"
        return "database unreachable" if not self._db_up else f"broker: {self._broker_error}"


def key_prefix(database: str, table: str) -> str:
    """What a row's idempotency key starts with (then its id): ``outbox:<database>.<table>:``, or a digest
    of the two when that would not leave room for an id within a key's 128 characters."""
    prefix = f"outbox:{database}.{table}:"
    if len(prefix) > 100:
        prefix = f"outbox:{hashlib.blake2b(prefix.encode(), digest_size=12).hexdigest()}:"
    return prefix


def chains(rows: Sequence[tuple[int, str, Any, list[int]]]) -> list[list[tuple[int, str, Any, list[int]]]]:
    """``rows`` (in seq order) split into chains that share no shard, each in seq order: two rows that
    touch a common shard (directly, or through rows between them) are in the same chain."""
    parent: dict[int, int] = {}

    def root(shard: int) -> int:
        while parent.setdefault(shard, shard) != shard:
            parent[shard] = parent[parent[shard]]
            shard = parent[shard]
        return shard

    for row in rows:
        first = root(row[3][0])
        for shard in row[3][1:]:
            parent[root(shard)] = first
    out: dict[int, list[tuple[int, str, Any, list[int]]]] = {}
    for row in rows:
        out.setdefault(root(row[3][0]), []).append(row)
    return list(out.values())


async def serve(options: RelayOptions, settings: Settings) -> None:
    """Run one relay until SIGTERM or SIGINT (``fanout relay``, ``manage.py fanout_relay``)."""
    import signal

    relay = Relay(options, settings)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, relay.stop)
    print(f"fanout relay on table {options.table} publishing to {settings.where}", flush=True)
    await relay.run()
    log.info("stopped")


async def init_outbox(dsn: str, table: str = DEFAULT_TABLE) -> None:
    """Create the outbox table, its sequence, trigger and indexes (idempotent): ``fanout outbox init``."""
    import psycopg

    from .outbox import schema_sql

    async with await psycopg.AsyncConnection.connect(dsn) as db:
        await db.execute(schema_sql(table).encode())
        await db.commit()
