"""Helpers for tests that run real brokers, node processes and websocket clients."""

from __future__ import annotations

import os
import socket
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager


def scaled(seconds: float) -> float:
    """A test wait multiplied by ``FANOUT_TEST_TIMEOUT_SCALE`` (default 1), for slow machines."""
    return seconds * max(float(os.environ.get("FANOUT_TEST_TIMEOUT_SCALE") or "1"), 0.01)


def free_port() -> int:
    """A TCP port nobody listens on right now (bind to port 0 and let the kernel choose)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def refused_port() -> Iterator[int]:
    """A TCP port that refuses connections while the block runs: bound, never listening. A port from
    ``free_port()`` is free only until the next bind to port 0, which may take it (a server the same test
    starts); this one stays dead."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield int(sock.getsockname()[1])


def kill_process(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL ``proc`` (if it still runs) and reap it."""
    if proc.poll() is None:
        proc.kill()
    proc.wait(scaled(10))


def terminate_process(proc: subprocess.Popen[bytes], timeout: float = 15.0) -> int:
    """SIGTERM ``proc`` and its exit status; one that does not exit in time is killed (and that raises)."""
    if proc.poll() is None:
        proc.terminate()
    try:
        return proc.wait(scaled(timeout))
    except subprocess.TimeoutExpired:
        kill_process(proc)
        raise
