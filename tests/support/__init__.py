"""Helpers for tests that run real brokers, node processes and websocket clients."""

from __future__ import annotations

import os
import socket


def scaled(seconds: float) -> float:
    """A test wait multiplied by ``FANOUT_TEST_TIMEOUT_SCALE`` (default 1), for slow machines."""
    return seconds * max(float(os.environ.get("FANOUT_TEST_TIMEOUT_SCALE") or "1"), 0.01)


def free_port() -> int:
    """A TCP port nobody listens on right now (bind to port 0 and let the kernel choose)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
