"""The test command's own PostgreSQL (scripts/postgres.sh): what scripts/test.sh starts on a machine where
nothing listens on the outbox tests' port. Run here for real on a free port and a data folder of the test's
own (the machine's PostgreSQL is left alone): a cluster is made, started, has the ``test`` database the
default FANOUT_TEST_DSN names, takes the outbox's schema, and a second call finds it running."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import psycopg

from fanout.outbox import schema_sql
from tests.support import free_port, scaled
from tests.support.nodes import ROOT


def start_postgres(port: int, data: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", "-c", f'as_root() {{ "$@"; }}; . scripts/postgres.sh; start_postgres {port}'],
        cwd=ROOT,
        env={**os.environ, "FANOUT_TEST_PGDATA": str(data)},
        capture_output=True,
        text=True,
        timeout=scaled(120),
    )


def test_the_test_command_starts_a_postgresql_with_the_test_database() -> None:
    # in /var/tmp, as the script's default: initdb runs as the postgres user when we are root, and pytest's
    # own temporary folders are root's alone
    home = Path(tempfile.mkdtemp(prefix="fanout-test-pg-", dir="/var/tmp"))
    home.chmod(0o755)
    port, data = free_port(), home / "pg"
    first = start_postgres(port, data)
    try:
        assert first.returncode == 0, first.stderr
        with psycopg.connect(f"postgresql://postgres@127.0.0.1:{port}/test", autocommit=True) as db:
            db.execute(schema_sql("fanout_outbox"))
            assert db.execute("SELECT count(*) FROM fanout_outbox").fetchone() == (0,)
        again = start_postgres(port, data)  # already running: nothing to do
        assert again.returncode == 0, again.stderr
    finally:
        pid_file = data / "postmaster.pid"
        if pid_file.exists():
            pid = int(pid_file.read_text().split()[0])
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + scaled(30)
            while pid_file.exists() and time.monotonic() < deadline:
                time.sleep(0.1)
        shutil.rmtree(home, ignore_errors=True)
