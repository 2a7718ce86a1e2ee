"""Transactional publishing (SPEC "Continuity", outbox), on real PostgreSQL, Redis, node and relay processes
and fanout.v1 websocket clients (the first test on RabbitMQ with a Redis store too): a rolled-back
transaction publishes nothing, a committed one once; commit order (not insert order) is the order per
target; 5,000 rows from concurrent transactions through two relays, one of them SIGKILLed twice, reach every
client once each, in commit order per target; a broker outage or a lost database session delays rows, never
loses or repeats them; a row published twice (a relay killed between its publish and its delete) reaches
nobody twice; docs/publishing.md runs as printed.

(fanout.Outbox's argument checks and the schema alone: tests/test_outbox_calls.py; the Django example through
everything that can fail: tests/test_outbox_end_to_end.py.)
"""

from __future__ import annotations

import asyncio
import os
import random
import re
import signal
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from fanout import Outbox
from fanout.outbox import SqlNames
from tests.support import free_port, scaled
from tests.support.continuity import AMQP, REDIS, STREAMS, V1, forgetting, node_env, until
from tests.support.nodes import ROOT, http_get, start_node
from tests.support.outbox import DSN, RELAYS, outbox_schema, pending, start_relay, stop_relays
from tests.support.tcp_proxy import ProxyProcess


@pytest.fixture(autouse=True)
def _cleanup() -> Iterator[None]:
    before = len(RELAYS)
    try:
        yield from forgetting()
    finally:
        stop_relays(before)


@pytest.fixture
def table() -> Iterator[str]:
    with outbox_schema() as name:
        yield name


def metric(port: int, name: str) -> float:
    status, text = http_get(port, "/metrics")
    assert status == 200, text
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"no {name} in {text}")


async def messages(client: V1, count: int, timeout: float = 20.0) -> list[Any]:
    """The data of the next ``count`` messages (other frames skipped)."""
    out: list[Any] = []
    while len(out) < count:
        frame = await client.frame(timeout)
        if frame["type"] == "message":
            out.append(frame["data"] if "data" in frame else {"b64": frame["data_b64"]})
    return out


@pytest.mark.parametrize(
    "bus",
    [{"url": REDIS}, {"url": AMQP, "FANOUT_HISTORY_URL": REDIS}],
    ids=["redis", "rabbitmq with a redis store"],
)
async def test_rolled_back_publishes_nothing_committed_once_in_commit_order(
    tmp_path: Path, table: str, bus: dict[str, str]
) -> None:
    url, store = bus["url"], {k: v for k, v in bus.items() if k != "url"}
    env = node_env(url, **store)
    node = start_node(tmp_path, env, app=STREAMS)
    relay = start_relay(tmp_path, env, table)
    relay.wait_healthy()
    client = await V1.open(node.port, "groups=h-room,plain&user=ann")
    with psycopg.connect(DSN) as db:
        outbox = Outbox(db, table=table)
        outbox.send_to_group("h-room", {"n": "rolled back"})
        outbox.send_by_flag("ann", "rolled back too")
        db.rollback()
        outbox.send_to_group("h-room", {"n": 1})
        outbox.send_by_flag("ann", "to ann")
        outbox.send_to_group("plain", b"\x00\x01")  # not a history group: published all the same
        db.commit()
    assert await messages(client, 3) == [{"n": 1}, "to ann", {"b64": "AAE="}]
    # a transaction that inserted first but committed last is published last
    with psycopg.connect(DSN) as first, psycopg.connect(DSN) as second:
        Outbox(first, table=table).send_to_group("h-room", {"n": "inserted first"})
        Outbox(second, table=table).send_to_group("h-room", {"n": "inserted second"})
        second.commit()
        first.commit()
    got = await messages(client, 2)
    assert got == [{"n": "inserted second"}, {"n": "inserted first"}], got
    await client.nothing_more(0.5)
    await until(lambda: pending(table) == 0, 10, "the rows deleted")
    assert metric(relay.port, "fanout_relay_published_total") == 5
    assert relay.terminate() == 0, relay.log()
    await client.ws.close()


# ---------------------------------------------------------------------------------------------- writers


class Writers:
    """Concurrent transactions writing ``total`` rows to ``targets`` through the outbox. Each transaction
    first locks each of its targets' counter row (``UPDATE ... SET n = n + 1 RETURNING n``) and puts ``n``
    in the payload: the order of ``n`` per target is the commit order, known without the outbox's help. A
    tenth of the rows go to two groups at once (one row, two shards)."""

    def __init__(self, table: str, targets: list[str], total: int, threads: int = 6) -> None:
        self.table = table
        self.counters = table.replace("fanout_outbox", "counters")
        self.targets = targets
        self.total = total
        self.threads = threads
        self.written = 0
        self.rolled_back = 0
        self._lock = threading.Lock()
        with psycopg.connect(DSN, autocommit=True) as db:
            db.execute(f"CREATE TABLE {self.counters} (target text PRIMARY KEY, n int NOT NULL)")
            for target in targets:
                db.execute(f"INSERT INTO {self.counters} VALUES (%s, 0)", (target,))

    def _take(self, rows: int) -> int:
        with self._lock:
            rows = min(rows, self.total - self.written)
            self.written += rows
            return rows

    def _write(self, seed: int) -> None:
        rng = random.Random(seed)
        with psycopg.connect(DSN) as db:
            outbox = Outbox(db, table=self.table)
            while rows := self._take(rng.randint(1, 4)):
                plan = [sorted(rng.sample(self.targets, 2 if rng.random() < 0.1 else 1)) for _ in range(rows)]
                for target in sorted({t for row in plan for t in row}):  # lock in one order: no deadlock
                    db.execute(f"SELECT n FROM {self.counters} WHERE target = %s FOR UPDATE", (target,))
                for row in plan:
                    n = {}
                    for target in row:
                        got = db.execute(
                            f"UPDATE {self.counters} SET n = n + 1 WHERE target = %s RETURNING n", (target,)
                        ).fetchone()
                        assert got is not None
                        n[target] = got[0]
                    outbox.send_to_group(row, {"n": n})
                if rng.random() < 0.05:  # a rolled-back transaction: its rows and counts never happened
                    db.rollback()
                    with self._lock:
                        self.written -= rows
                        self.rolled_back += 1
                    continue
                db.commit()

    async def run(self) -> None:
        await asyncio.gather(*(asyncio.to_thread(self._write, seed) for seed in range(self.threads)))

    def final_counts(self) -> dict[str, int]:
        with psycopg.connect(DSN, autocommit=True) as db:
            return dict(db.execute(f"SELECT target, n FROM {self.counters}").fetchall())


class Reader:
    """A v1 client in some groups, reading every frame as it comes; per group the ``n`` it got, in order."""

    def __init__(self, client: V1, groups: list[str]) -> None:
        self.client = client
        self.groups = groups
        self.got: dict[str, list[int]] = {g: [] for g in groups}
        self.task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        while True:
            frame = await self.client.frame(600)
            if frame["type"] == "message":
                for group, n in frame["data"]["n"].items():
                    if group in self.got:
                        self.got[group].append(n)

    def complete(self, counts: dict[str, int]) -> bool:
        return all(len(self.got[g]) >= counts[g] for g in self.groups)


def each_once_in_commit_order(readers: list[Reader], counts: dict[str, int]) -> None:
    """Every reader got, per group, every committed row in commit order (``n`` = 1, 2, 3...), each once."""
    wrong, twice = [], 0
    for reader in readers:
        for group in reader.groups:
            got = reader.got[group]
            if list(dict.fromkeys(got)) != list(range(1, counts[group] + 1)):  # lost or out of order
                wrong.append((reader.client.client_id, group, counts[group], got[:20], len(got)))
            twice += len(got) - len(set(got))
    assert not wrong, wrong[:3]
    # a row a killed relay published but had not deleted yet is published again with the same idempotency
    # key, which reaches each connection once
    assert twice == 0, f"{twice} deliveries of a row seen before"


async def close(readers: list[Reader]) -> None:
    for reader in readers:
        reader.task.cancel()
    await asyncio.gather(*(r.client.ws.close() for r in readers), return_exceptions=True)


async def test_5000_rows_two_relays_one_killed_twice_every_client_gets_each_once_in_commit_order(
    tmp_path: Path, table: str
) -> None:
    env = node_env(REDIS, FANOUT_HISTORY="group:*")
    node = start_node(tmp_path, env, app=STREAMS)
    targets = [f"t{i:02}" for i in range(50)]
    readers = []
    for i in range(50):  # each client in two groups; each group has two clients
        groups = [targets[i], targets[(i + 1) % 50]]
        readers.append(Reader(await V1.open(node.port, "groups=" + ",".join(groups)), groups))
    writers = Writers(table, targets, 5000)
    relays = [start_relay(tmp_path, env, table), start_relay(tmp_path, env, table)]
    for relay in relays:
        relay.wait_healthy()

    async def kill_twice() -> None:
        for threshold in (1500, 3000):
            await until(lambda t=threshold: writers.written >= t, 60, f"{threshold} rows written", 0.02)
            relays[0].kill()
            relays[0] = start_relay(tmp_path, env, table)

    try:
        await asyncio.gather(writers.run(), kill_twice())
        counts = writers.final_counts()
        assert sum(counts.values()) > 5000  # (two-group rows count twice)
        await until(lambda: pending(table) == 0, 60, "every row published")
        await until(lambda: all(r.complete(counts) for r in readers), 30, "every row delivered")
        await asyncio.sleep(0.5)  # a duplicate would arrive meanwhile
        each_once_in_commit_order(readers, counts)
        for relay in relays:
            assert relay.terminate() == 0, relay.log()
        assert [r.log().count("not published") for r in relays] == [0, 0], [r.log() for r in relays]
    finally:
        await close(readers)


async def test_a_broker_outage_or_a_lost_database_session_delays_rows_and_loses_none(
    tmp_path: Path, table: str
) -> None:
    env = node_env(REDIS, FANOUT_HISTORY="group:*")
    node = start_node(tmp_path, env, app=STREAMS)
    targets = ["a", "b", "c"]
    reader = Reader(await V1.open(node.port, "groups=a,b,c"), targets)
    writers = Writers(table, targets, 300, threads=2)
    with ProxyProcess(target="127.0.0.1:6379") as proxy:
        relay_env = {**env, "FANOUT_URL": f"redis://127.0.0.1:{proxy.port}/0", "FANOUT_PUBLISH_TIMEOUT": "1"}
        relay = start_relay(tmp_path, relay_env, table)
        relay.wait_healthy()
        writing = asyncio.create_task(writers.run())
        await until(lambda: writers.written >= 50, 20, "50 rows written", 0.02)
        proxy.cut()  # the relay's broker is gone; the database is not
        await until(lambda: http_get(relay.port, "/healthz")[0] == 503, 20, "the relay to say so")
        assert "broker" in http_get(relay.port, "/healthz")[1]
        await writing  # committed while the broker was away
        assert pending(table) > 0
        proxy.restore()
        try:
            counts = writers.final_counts()
            await until(lambda: pending(table) == 0, 30, "every row published")
            await until(lambda: reader.complete(counts), 20, "every row delivered")
            assert metric(relay.port, "fanout_relay_failures_total") > 0
            assert http_get(relay.port, "/healthz")[0] == 200
            # then the database: the relay's session is ended under it while rows keep coming
            with psycopg.connect(DSN, autocommit=True) as db:
                ended = db.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_locks WHERE locktype = 'advisory' "
                    "AND objsubid = 2 AND classid = %s",
                    (SqlNames(table).relays_key,),
                ).fetchall()
            assert ended == [(True,)]
            writers.total += 100
            await writers.run()
            counts = writers.final_counts()
            await until(lambda: pending(table) == 0, 30, "every later row published")
            await until(lambda: reader.complete(counts), 20, "every later row delivered")
            await asyncio.sleep(0.3)
            each_once_in_commit_order([reader], counts)
        finally:
            await close([reader])
        assert "database session lost" in relay.log()
        assert relay.terminate() == 0, relay.log()


def _shell(command: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", "-ec", command], env=env, cwd=cwd, capture_output=True, text=True)


def _spawn(command: str, env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    with log_path.open("wb") as log:
        return subprocess.Popen(["bash", "-ec", command], env=env, stdout=log, stderr=subprocess.STDOUT)


async def test_the_publishing_guide_runs_as_printed(tmp_path: Path) -> None:
    """docs/publishing.md: ``fanout outbox init``, its place_order.py, ``fanout relay``, as printed (the
    database URL given a schema of the test's own, the relay's port a free one)."""
    guide = (ROOT / "docs" / "publishing.md").read_text()
    init, relay_block = re.findall(r"```sh\n(.*?)```", guide, flags=re.S)
    (script,) = re.findall(r"```python\n(# place_order.py.*?)```", guide, flags=re.S)
    for path, code in re.findall(r"```python\n# (examples/\S+)\n(.*?)```", guide, flags=re.S):
        assert code in (ROOT / path).read_text(), path
    printed = "postgresql://postgres@127.0.0.1:5432/test"
    assert f"export FANOUT_OUTBOX_DSN={printed}\n" in init
    env = node_env(REDIS, FANOUT_HISTORY="flag:*")
    node = start_node(tmp_path, env, app=STREAMS)
    ann = await V1.open(node.port, "user=ann")
    bob = await V1.open(node.port, "user=bob")
    schema = f"guide_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(DSN, autocommit=True) as db:
        db.execute(f"CREATE SCHEMA {schema}")
    dsn = f"{printed}?options=-c%20search_path%3D{schema}"
    shell_env = {k: v for k, v in os.environ.items() if not k.startswith("FANOUT_")}
    shell_env |= {k: v for k, v in env.items() if k != "FANOUT_URL"}
    shell_env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{shell_env['PATH']}"
    port = free_port()
    relay = None
    try:
        done = await asyncio.to_thread(_shell, init.replace(printed, dsn), shell_env, tmp_path)
        assert done.returncode == 0, done.stderr
        (tmp_path / "place_order.py").write_text(script)
        run = await asyncio.to_thread(
            _shell, "python place_order.py", {**shell_env, "FANOUT_OUTBOX_DSN": dsn}, tmp_path
        )
        assert (run.returncode, run.stdout) == (0, "order 1 placed\n"), run.stderr
        command = relay_block.replace("fanout relay", "exec fanout relay").replace("9108", str(port))
        relay = _spawn(command, {**shell_env, "FANOUT_OUTBOX_DSN": dsn}, tmp_path / "relay.log")
        assert await messages(ann, 1) == [{"type": "order", "id": 1}]
        await bob.nothing_more(0.5)
        relay.send_signal(signal.SIGTERM)
        assert relay.wait(scaled(10)) == 0, (tmp_path / "relay.log").read_text()
    finally:
        if relay is not None and relay.poll() is None:
            relay.kill()
            relay.wait()
        with psycopg.connect(DSN, autocommit=True) as db:
            db.execute(f"DROP SCHEMA {schema} CASCADE")
    await ann.ws.close()
    await bob.ws.close()


async def test_a_row_published_again_reaches_no_client_twice_nor_a_key_given_twice(
    tmp_path: Path, table: str
) -> None:
    """What a relay killed between its publish and its delete leaves: the row, published again by the next
    relay with the same idempotency key (database, table, row id). Here the row is put back by hand."""
    env = node_env(REDIS)
    node = start_node(tmp_path, env, app=STREAMS)
    client = await V1.open(node.port, "groups=h-room,plain")
    try:
        with psycopg.connect(DSN) as db:
            Outbox(db, table=table).send_to_group(["h-room", "plain"], {"n": 1})
            db.commit()
            kept = db.execute(f"SELECT id, call, args::text, shards FROM {table}").fetchall()
            db.commit()
        relay = start_relay(tmp_path, env, table)
        assert await messages(client, 1) == [{"n": 1}]
        await until(lambda: pending(table) == 0, 10, "the row deleted")
        with psycopg.connect(DSN) as db:  # the same row again, as if its delete had never happened
            db.execute(f"INSERT INTO {table} (id, call, args, shards) VALUES (%s, %s, %s::json, %s)", kept[0])
            Outbox(db, table=table).send_to_group("h-room", {"n": 2})
            db.commit()
        assert await messages(client, 1) == [{"n": 2}]  # not {"n": 1} a second time
        # a key of the caller's own: two transactions (a request retried after its commit), one send
        for _ in range(2):
            with psycopg.connect(DSN) as db:
                Outbox(db, table=table).send_to_group("h-room", {"n": 3}, idempotency_key="order-7")
                db.commit()
        assert await messages(client, 1) == [{"n": 3}]
        await client.nothing_more(0.3)
        assert pending(table) == 0
        assert relay.terminate() == 0, relay.log()
    finally:
        await client.ws.close()
