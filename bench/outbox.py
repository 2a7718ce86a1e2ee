"""Outbox benchmarks (issue 18, docs/benchmarks.md "Outbox (issue 18)").

    python bench/outbox.py write   --transactions 2000 --repeat 5
    python bench/outbox.py relay   --rows 20000 --relays 1 --repeat 3   (and --relays 2)
    python bench/outbox.py latency --rate 100 --seconds 10              (and --rate 1000)

Every run uses a schema of its own on the PostgreSQL of ``FANOUT_TEST_DSN`` (default
``postgresql://postgres@127.0.0.1:5432/test``, dropped at the end), its own throw-away ``redis-server`` (no
persistence, a free port; ended by its pid), a real node process (``tests.apps.streams``) and real relay
processes (``python -m fanout relay``).

``write``: what an outbox row adds to the application's transaction. Per round, ``--transactions``
transactions of one INSERT into an ``orders`` table and a COMMIT, without and with one
``outbox.send_by_flag`` (the order alternates from round to round); one writer, then ``--writers``
concurrent writers (threads, a connection each: the outbox's commits take one lock in turn). Reported:
median per-transaction time of each (µs), the difference, and transactions/s; medians of ``--repeat`` rounds.

``relay``: ``--rows`` committed rows (``send_to_group`` over 64 groups, each group with a member: a raw
client in every group) are in the table when ``--relays`` relays start; the time until the table is empty
gives rows/s (medians of ``--repeat`` rounds).

``latency``: a writer commits one row per transaction at ``--rate`` transactions/s for ``--seconds``, each
row to one of 64 groups; a raw client in every group; commit → delivered is the time from the COMMIT's return
in the writer to the frame's arrival at the client (one process, one clock). p50, p99 and max, with one relay,
the first second's rows left out (a warm-up).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import orjson  # noqa: E402
import psycopg  # noqa: E402
from websockets.asyncio.client import connect  # noqa: E402

from fanout import Outbox  # noqa: E402
from tests.support.nodes import start_node, unique_namespace  # noqa: E402
from tests.support.outbox import DSN, RELAYS, outbox_schema, pending, start_relay, stop_relays  # noqa: E402
from tests.support.redis_servers import start_redis  # noqa: E402

GROUPS = [f"g{i}" for i in range(64)]


async def until(check: Any) -> None:
    while not await asyncio.to_thread(check):  # noqa: ASYNC110 (a check that may block: in a thread)
        await asyncio.sleep(0.05)


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


# ---------------------------------------------------------------------------------------------- write


def write_round(table: str, transactions: int, outboxed: bool) -> list[float]:
    orders = table.replace("fanout_outbox", "orders")
    times = []
    with psycopg.connect(DSN) as db:
        outbox = Outbox(db, table=table)
        for n in range(transactions):
            started = time.perf_counter()
            db.execute(f"INSERT INTO {orders} (customer, amount) VALUES (%s, %s)", ("ann", n))
            if outboxed:
                outbox.send_by_flag("ann", {"type": "order", "amount": n})
            db.commit()
            times.append(time.perf_counter() - started)
    return times


def concurrent_round(table: str, transactions: int, writers: int, outboxed: bool) -> float:
    """Transactions per second of ``writers`` threads, ``transactions`` each."""
    threads = [
        threading.Thread(target=write_round, args=(table, transactions, outboxed)) for _ in range(writers)
    ]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return writers * transactions / (time.perf_counter() - started)


def bench_write(args: argparse.Namespace) -> None:
    with outbox_schema("bench") as table:
        orders = table.replace("fanout_outbox", "orders")
        with psycopg.connect(DSN, autocommit=True) as db:
            db.execute(f"CREATE TABLE {orders} (id serial PRIMARY KEY, customer text, amount int)")
        plain, outboxed, plain_rate, outbox_rate = [], [], [], []
        for r in range(args.repeat):
            for with_outbox in (r % 2 == 1, r % 2 == 0):
                times = write_round(table, args.transactions, with_outbox)
                (outboxed if with_outbox else plain).append(statistics.median(times))
                rate = concurrent_round(table, args.transactions // args.writers, args.writers, with_outbox)
                (outbox_rate if with_outbox else plain_rate).append(rate)
            with psycopg.connect(DSN, autocommit=True) as db:
                db.execute(f"DELETE FROM {table}")
        p, o = statistics.median(plain) * 1e6, statistics.median(outboxed) * 1e6
        print(f"one writer: plain {p:.0f} µs, with an outbox row {o:.0f} µs per transaction: +{o - p:.0f} µs")
        pr, orate = statistics.median(plain_rate), statistics.median(outbox_rate)
        print(f"{args.writers} writers: plain {pr:.0f} tx/s, with an outbox row {orate:.0f} tx/s", end=" ")
        print(f"({orate / pr:.2f}x)")


# ---------------------------------------------------------------------------------------------- relay


class Stack:
    """A throw-away redis-server, a node and a raw client in every group."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.redis = start_redis(workdir / "redis")
        self.env = {
            "FANOUT_URL": self.redis.url,
            "FANOUT_NAMESPACE": unique_namespace("bo"),
            "FANOUT_ACCEPT_RATE": "0",
            "FANOUT_CLIENT_RATE": "0",
            "FANOUT_LOG_LEVEL": "WARNING",
        }
        self.node = start_node(workdir, self.env, app="tests.apps.streams:app")
        self.received: dict[int, float] = {}
        self.count = 0
        self._readers: list[asyncio.Task[None]] = []

    async def connect(self) -> None:
        for group in GROUPS:
            ws = await connect(f"ws://127.0.0.1:{self.node.port}/?groups={group}", max_size=None)
            await ws.recv()  # the welcome
            self._readers.append(asyncio.create_task(self._read(ws)))

    async def _read(self, ws: Any) -> None:
        async for frame in ws:
            self.count += 1
            self.received[orjson.loads(frame)["i"]] = time.time()

    def close(self) -> None:
        for task in self._readers:
            task.cancel()
        self.node.kill()
        self.redis.stop()


def fill(table: str, rows: int) -> None:
    with psycopg.connect(DSN) as db:
        outbox = Outbox(db, table=table)
        for i in range(rows):
            outbox.send_to_group(GROUPS[i % len(GROUPS)], {"i": i})
            if i % 1000 == 999:
                db.commit()
        db.commit()


async def bench_relay(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        stack = Stack(Path(tmp))
        try:
            await stack.connect()
            rates = []
            for _ in range(args.repeat):
                with outbox_schema("bench") as table:
                    await asyncio.to_thread(fill, table, args.rows)
                    stack.count = 0
                    started = time.perf_counter()
                    before = len(RELAYS)
                    for _ in range(args.relays):
                        start_relay(Path(tmp), stack.env, table)
                    await until(lambda t=table: pending(t) == 0)
                    rates.append(args.rows / (time.perf_counter() - started))
                    await until(lambda: stack.count >= args.rows)
                    stop_relays(before)
            print(
                f"{args.relays} relay(s), {args.rows} rows: {statistics.median(rates):.0f} rows/s "
                f"(rounds: {', '.join(f'{r:.0f}' for r in rates)}; relay start-up included)"
            )
        finally:
            stack.close()


# ---------------------------------------------------------------------------------------------- latency


def paced_writer(table: str, rate: float, seconds: float, committed: dict[int, float]) -> None:
    with psycopg.connect(DSN) as db:
        outbox = Outbox(db, table=table)
        started = time.perf_counter()
        i = 0
        while (elapsed := time.perf_counter() - started) < seconds:
            if i > elapsed * rate:
                time.sleep(max(0.0, i / rate - elapsed))
            outbox.send_to_group(GROUPS[i % len(GROUPS)], {"i": i})
            db.commit()
            committed[i] = time.time()
            i += 1


async def bench_latency(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        stack = Stack(Path(tmp))
        try:
            await stack.connect()
            with outbox_schema("bench") as table:
                relay = start_relay(Path(tmp), stack.env, table)
                relay.wait_healthy()
                committed: dict[int, float] = {}
                await asyncio.to_thread(paced_writer, table, args.rate, args.seconds, committed)
                await until(lambda: stack.count >= len(committed))
                relay.terminate()
            warm = int(args.rate)  # the first second's rows are a warm-up (the relay's first publishes)
            latencies = [stack.received[i] - committed[i] for i in committed if i >= warm]
            achieved = len(committed) / args.seconds
            p50, p99 = percentile(latencies, 50) * 1e3, percentile(latencies, 99) * 1e3
            print(
                f"{args.rate:.0f} rows/s asked ({achieved:.0f} written): commit -> delivered "
                f"p50 {p50:.1f} ms, p99 {p99:.1f} ms, max {max(latencies) * 1e3:.1f} ms"
            )
        finally:
            stack.close()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("what", choices=["write", "relay", "latency"])
    parser.add_argument("--transactions", type=int, default=2000)
    parser.add_argument("--writers", type=int, default=4)
    parser.add_argument("--rows", type=int, default=20000)
    parser.add_argument("--relays", type=int, default=1)
    parser.add_argument("--rate", type=float, default=100)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    os.environ.setdefault("FANOUT_LOG_LEVEL", "WARNING")
    try:
        if args.what == "write":
            bench_write(args)
        elif args.what == "relay":
            asyncio.run(bench_relay(args))
        else:
            asyncio.run(bench_latency(args))
    finally:
        stop_relays(0)


if __name__ == "__main__":
    main()
