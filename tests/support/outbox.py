"""Helpers of the outbox tests: a schema of its own per test on the shared PostgreSQL, relay processes."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psycopg

from fanout.outbox import schema_sql
from tests.support import free_port, kill_process, scaled, terminate_process
from tests.support.nodes import ROOT, http_get

DSN = os.environ.get("FANOUT_TEST_DSN", "postgresql://postgres@127.0.0.1:5432/test")


@contextmanager
def outbox_schema(prefix: str = "ob") -> Iterator[str]:
    """A fresh schema with an outbox table in it; yields the table's name (``schema.fanout_outbox``).
    The schema is dropped afterwards."""
    schema = f"{prefix}_{uuid.uuid4().hex[:10]}"
    table = f"{schema}.fanout_outbox"
    with psycopg.connect(DSN, autocommit=True) as db:
        db.execute(f"CREATE SCHEMA {schema}")
    try:
        with psycopg.connect(DSN) as db:
            db.execute(schema_sql(table))
            db.commit()
        yield table
    finally:
        with psycopg.connect(DSN, autocommit=True) as db:
            db.execute(f"DROP SCHEMA {schema} CASCADE")


def pending(table: str) -> int:
    with psycopg.connect(DSN, autocommit=True) as db:
        row = db.execute(f"SELECT count(*) FROM {table}").fetchone()
        return int(row[0]) if row else 0


@dataclass
class RelayProcess:
    """A ``python -m fanout relay`` subprocess."""

    proc: subprocess.Popen[bytes]
    log_path: Path
    port: int

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def terminate(self, timeout: float = 15.0) -> int:
        """SIGTERM, and its exit status; one that does not exit in time is killed (and that raises)."""
        return terminate_process(self.proc, timeout)

    def kill(self) -> None:
        kill_process(self.proc)

    def wait_healthy(self, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + scaled(timeout)
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"relay exited with {self.proc.returncode}:\n{self.log()}"
            try:
                if http_get(self.port, "/healthz")[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.05)
        raise AssertionError(f"relay not healthy in time:\n{self.log()}")


#: every relay a test started; killed at the end of the test by the fixture in the test modules
RELAYS: list[RelayProcess] = []


def start_relay(tmp_path: Path, env: Mapping[str, str], table: str, *args: str) -> RelayProcess:
    """``python -m fanout relay --dsn DSN --table TABLE --http 127.0.0.1:<free port>`` with FANOUT_* from
    ``env`` only."""
    port = free_port()
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("FANOUT_")}
    full_env.update({"FANOUT_LOG_LEVEL": "INFO", "PYTHONUNBUFFERED": "1", **env})
    full_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), full_env.get("PYTHONPATH", "")]))
    command = [sys.executable, "-m", "fanout", "relay", "--dsn", DSN, "--table", table]
    log_path = tmp_path / f"relay-{port}.log"
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen(
            [*command, "--http", f"127.0.0.1:{port}", *args],
            env=full_env,
            cwd=ROOT,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    relay = RelayProcess(proc, log_path, port)
    RELAYS.append(relay)
    return relay


def stop_relays(before: int) -> None:
    """Kill the relays started since ``before`` (for a fixture: a failed test leaves none behind)."""
    while len(RELAYS) > before:
        relay = RELAYS.pop()
        if relay.proc.poll() is None:
            relay.kill()
