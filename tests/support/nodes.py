"""Run fanout nodes for tests: in-process (memory backend) or as real subprocesses."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from base64 import b64encode
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from os import urandom
from pathlib import Path
from typing import Any

import orjson
from websockets.asyncio.client import ClientConnection, connect

from tests.support import free_port, kill_process, scaled, terminate_process

ROOT = Path(__file__).resolve().parents[2]


def unique_namespace(prefix: str = "t") -> str:
    return f"{prefix}{uuid.uuid4().hex[:12]}"


async def client(port: int, path: str = "/") -> tuple[ClientConnection, str]:
    """A real websocket client of the node at ``port`` and its client id (from the welcome frame)."""
    ws = await connect(f"ws://127.0.0.1:{port}{path}", max_size=None)
    welcome = orjson.loads(await asyncio.wait_for(ws.recv(), scaled(5)))
    assert welcome["type"] == "welcome", welcome
    return ws, welcome["client_id"]


def demo_token(port: int, name: str = "ann") -> dict[str, str]:
    """What the demo page does first: ask the demo's stand-in for a web app's login for a token."""
    with urllib.request.urlopen(
        f"http://127.0.0.1:{port}/demo/token?name={name}", timeout=scaled(5)
    ) as answer:
        token: dict[str, str] = orjson.loads(answer.read())
    return token


async def demo_client(port: int, name: str = "ann") -> tuple[ClientConnection, str]:
    """A client of the demo chat (``node.app.DemoChat``), admitted with a token as the page would be."""
    issued = await asyncio.get_running_loop().run_in_executor(None, demo_token, port, name)
    return await client(port, "/?token=" + issued["token"])


async def recv(ws: ClientConnection, timeout: float = 5.0) -> str | bytes:
    return await asyncio.wait_for(ws.recv(), scaled(timeout))


async def nothing_more(ws: ClientConnection, wait: float = 0.3) -> bool:
    """True if no frame arrives within ``wait`` seconds."""
    try:
        frame = await asyncio.wait_for(ws.recv(), wait)
    except TimeoutError:
        return True
    raise AssertionError(f"unexpected frame {frame!r}")


def http_get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=scaled(5)) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


async def metrics(port: int) -> dict[str, float]:
    """A node's /metrics as ``{'name{labels}': value}``."""
    status, text = await asyncio.get_running_loop().run_in_executor(None, http_get, port, "/metrics")
    assert status == 200
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    return samples


#: every node process started by a test; tests/conftest.py kills the ones a test left running
STARTED: list[NodeProcess] = []


@dataclass
class NodeProcess:
    """A ``python -m node`` subprocess."""

    port: int
    env: dict[str, str]
    proc: subprocess.Popen[bytes]
    log_path: Path
    args: list[str] = field(default_factory=list)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_healthy(self, timeout: float = 15.0, healthy: bool = True) -> None:
        deadline = time.monotonic() + scaled(timeout)
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"node exited with {self.proc.returncode}:\n{self.log()}")
            try:
                status, _ = http_get(self.port, "/healthz")
                if (status == 200) == healthy:
                    return
            except OSError:
                pass
            time.sleep(0.05)
        raise AssertionError(f"node not {'healthy' if healthy else 'unhealthy'} in time:\n{self.log()}")

    def rss_kib(self, field: str = "VmRSS") -> int:
        """Resident memory now (``VmRSS``) or at its peak so far (``VmHWM``), KiB."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
        raise AssertionError(f"no {field}")

    def terminate(self, timeout: float = 15.0) -> int:
        """SIGTERM, and its exit status; one that does not exit in time is killed (and that raises)."""
        return terminate_process(self.proc, timeout)

    def kill(self) -> None:
        kill_process(self.proc)


def start_node(
    tmp_path: Path,
    env: Mapping[str, str],
    *,
    app: str | None = None,
    port: int | None = None,
    wait: bool = True,
    extra_args: Sequence[str] = (),
) -> NodeProcess:
    """Start a node subprocess with FANOUT_* settings from ``env`` on a free port.

    Without ``app`` (or FANOUT_APP in ``env``) the node runs :mod:`tests.apps.lobby` (guests in
    ``lobby``); pass ``app="node.app:DemoChat"`` for the real demo with its token admission.
    """
    port = port or free_port()
    if app is None and "FANOUT_APP" not in env:
        app = "tests.apps.lobby:app"
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("FANOUT_")}
    full_env.update({"FANOUT_PORT": str(port), "FANOUT_HEARTBEAT_INTERVAL": "0.5", **env})
    full_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), full_env.get("PYTHONPATH", "")]))
    args = [sys.executable, "-m", "node", *(["--app", app] if app else []), *extra_args]
    log_path = tmp_path / f"node-{port}.log"
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen(args, env=full_env, cwd=ROOT, stdout=log_file, stderr=subprocess.STDOUT)
    node = NodeProcess(port, full_env, proc, log_path, args)
    STARTED.append(node)
    if wait:
        node.wait_healthy()
    return node


def run_module(
    module: str,
    *args: str,
    env: Mapping[str, str] | None = None,
    timeout: float = 30.0,
    input_text: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m module args`` with FANOUT_* taken only from ``env``."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("FANOUT_")}
    full_env.update(env or {})
    full_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), full_env.get("PYTHONPATH", "")]))
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        env=full_env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=scaled(timeout),
        input=input_text,
    )


def stalled_websocket(port: int) -> socket.socket:
    """A client that completes the handshake and then never reads: the slowest client there is."""
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    key = b64encode(urandom(16)).decode()
    sock.sendall(
        f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
    )
    response = b""
    while b"\r\n\r\n" not in response:
        response += sock.recv(1)
    assert response.startswith(b"HTTP/1.1 101"), response
    return sock


def json_frame(frame: str | bytes) -> Any:
    return orjson.loads(frame)
