"""Run business worker processes (``python -m fanout worker``) for tests."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from tests.support import free_port, scaled
from tests.support.nodes import ROOT, STARTED, NodeProcess, http_get


@dataclass
class WorkerProcess(NodeProcess):
    """A worker subprocess; ``port`` serves its /healthz and /metrics."""

    def wait_ready(self, timeout: float = 15.0) -> None:
        self.wait_healthy(timeout)

    def metric(self, name: str) -> float:
        _, text = http_get(self.port, "/metrics")
        for line in text.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        return 0.0


def start_worker(
    tmp_path: Path, env: Mapping[str, str], app: str = "tests.apps.recording_worker:app", wait: bool = True
) -> WorkerProcess:
    port = free_port()
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("FANOUT_")}
    full_env.update({"FANOUT_WORKER_PORT": str(port), "FANOUT_HEARTBEAT_INTERVAL": "0.5", **env})
    full_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), full_env.get("PYTHONPATH", "")]))
    args = [sys.executable, "-m", "fanout", "worker", "--app", app]
    log_path = tmp_path / f"worker-{port}.log"
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen(args, env=full_env, cwd=ROOT, stdout=log_file, stderr=subprocess.STDOUT)
    worker = WorkerProcess(port, full_env, proc, log_path, args)
    STARTED.append(worker)
    if wait:
        worker.wait_ready()
    return worker


def wait_until(check: Callable[[], object], timeout: float = 30.0, what: str = "condition") -> float:
    """Poll ``check()`` (a callable) until true; the seconds it took."""
    started = time.monotonic()
    deadline = started + scaled(timeout)
    while time.monotonic() < deadline:
        if check():
            return time.monotonic() - started
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")
