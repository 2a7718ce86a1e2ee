"""What a user sees on a fresh install: each fanout program prints only fanout's own lines.

A library that warns in every process (redis-py 8.2 did, when handed its synchronous ``Retry`` by an asyncio
client) teaches users to ignore output. The installed console scripts run here as a user runs them, with
Python's default warning filters, against a real node on Redis, and every line they write to stderr must be
one of fanout's: its log format, or its own ``fanout: …`` message.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.support import free_port, scaled
from tests.support.nodes import ROOT, http_get, unique_namespace

BIN = Path(sys.executable).parent
REDIS = "redis://127.0.0.1:6379/0"
#: fanout's log lines (``2026-12-06 04:02:02,692 INFO fanout.node: …``) and its one-line messages
OWN_LINE = re.compile(
    r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [A-Z]+ fanout[\w.]*: |fanout[\w-]*: |fanout node )"
)

WORKER_APP = """
class Quiet:
    async def on_message(self, event):
        pass

app = Quiet()
"""


def _env(tmp_path: Path, namespace: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FANOUT_", "PYTHONWARNINGS"))}
    env.update(FANOUT_URL=REDIS, FANOUT_NAMESPACE=namespace, FANOUT_HEARTBEAT_INTERVAL="0.5", **extra)
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), str(ROOT)])
    return env


def _foreign_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.strip() and not OWN_LINE.match(line)]


def _run(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, env=env, cwd=cwd, capture_output=True, text=True, timeout=scaled(60))


def _stop(proc: subprocess.Popen[str]) -> str:
    proc.send_signal(signal.SIGTERM)
    try:
        _, err = proc.communicate(timeout=scaled(20))
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
    return err


def _wait_healthy(proc: subprocess.Popen[str], port: int) -> None:
    deadline = time.monotonic() + scaled(20)
    while True:
        assert proc.poll() is None, proc.communicate()[1]
        try:
            if http_get(port, "/healthz")[0] == 200:
                return
        except OSError:
            pass
        assert time.monotonic() < deadline, f"{proc.args} not healthy in time"
        time.sleep(0.05)


def test_every_program_prints_only_fanouts_own_lines(tmp_path: Path) -> None:
    namespace = unique_namespace("fresh")
    port, worker_port = free_port(), free_port()
    (tmp_path / "quiet_worker.py").write_text(WORKER_APP)
    env = _env(tmp_path, namespace, FANOUT_EVENTS="message")

    done = _run([str(BIN / "fanout"), "--help"], env, tmp_path)
    assert done.returncode == 0 and done.stderr == "", done.stderr

    node = subprocess.Popen(
        [str(BIN / "fanout-node"), "--app", "tests.apps.lobby:app"],
        env={**env, "FANOUT_PORT": str(port)},
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    worker = subprocess.Popen(
        [str(BIN / "fanout"), "worker", "--app", "quiet_worker:app"],
        env={**env, "FANOUT_WORKER_PORT": str(worker_port)},
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _wait_healthy(node, port)
        _wait_healthy(worker, worker_port)

        done = _run([str(BIN / "fanout"), "stats"], env, tmp_path)
        assert done.returncode == 0, done.stderr
        assert _foreign_lines(done.stderr) == []

        send = (
            "from fanout import SyncServerUtil\n"
            "with SyncServerUtil.from_env() as util:\n"
            "    util.send_to_group('lobby', {'text': 'hi'})\n"
        )
        done = _run([sys.executable, "-c", send], env, tmp_path)
        assert done.returncode == 0, done.stderr
        assert done.stderr == ""
    finally:
        worker_err = _stop(worker)
        node_err = _stop(node)
    assert _foreign_lines(worker_err) == [], worker_err
    assert _foreign_lines(node_err) == [], node_err
    assert "fanout.node" in node_err  # the node did log (its own lines) to the stream checked here
