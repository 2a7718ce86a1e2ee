"""Throw-away redis-server processes for tests that must kill, restart or cluster Redis.

Every server runs on a free port, with no persistence, in a temporary directory, and is ended by
its own pid (never by name), so tests never touch the shared Redis on 6379.
"""

from __future__ import annotations

import random
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.support import free_port, scaled

REDIS_SERVER = shutil.which("redis-server") or "redis-server"
REDIS_CLI = shutil.which("redis-cli") or "redis-cli"


def free_cluster_port() -> int:
    """A free port P (at most 55535) whose cluster bus port P + 10000 is free too."""
    rng = random.SystemRandom()
    for _ in range(200):
        port = rng.randrange(20000, 45000)
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("127.0.0.1", port))
                b.bind(("127.0.0.1", port + 10000))
                return port
        except OSError:
            continue
    raise RuntimeError("no free port pair for a cluster node")


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


def _cli(port: int, *args: str, timeout: float = 10.0) -> str:
    done = subprocess.run(
        [REDIS_CLI, "-p", str(port), *args], capture_output=True, text=True, timeout=timeout, check=False
    )
    return done.stdout


@dataclass
class RedisServer:
    """One redis-server subprocess on a fixed port; ``restart()`` brings it back on the same port."""

    port: int
    workdir: Path
    extra_args: tuple[str, ...] = ()
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        """Start the server and wait until it answers PING."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            [
                REDIS_SERVER,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--daemonize",
                "no",
                "--dir",
                str(self.workdir),
                *self.extra_args,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + scaled(10)
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server on port {self.port} exited with {self.process.returncode}")
            # NOAUTH: up, but started with --requirepass
            if _port_open(self.port) and ("PONG" in (out := _cli(self.port, "ping")) or "NOAUTH" in out):
                return self
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"redis-server on port {self.port} did not start")

    def kill(self) -> None:
        """SIGKILL: the broker vanishes without a goodbye, like a crash."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=10)

    def pause(self) -> None:
        """SIGSTOP: the server stays connected but answers nothing (a hung host, a cut network)."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT after :meth:`pause`."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        """SIGTERM and wait (SIGKILL if it does not go); idempotent."""
        if self.process is not None and self.process.poll() is None:
            self.resume()  # a paused server would not act on SIGTERM
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)
        self.process = None

    def restart(self) -> RedisServer:
        """Start again on the same port (after ``kill()`` or ``stop()``)."""
        self.stop()
        return self.start()

    def cli(self, *args: str) -> str:
        """Run ``redis-cli -p PORT args...`` and return its stdout."""
        return _cli(self.port, *args)


def start_redis(workdir: Path, *extra_args: str) -> RedisServer:
    """A fresh redis-server on a free port in ``workdir``."""
    return RedisServer(port=free_port(), workdir=workdir, extra_args=tuple(extra_args)).start()


@dataclass
class RedisCluster:
    """A local Redis Cluster of masters only (no replicas)."""

    servers: list[RedisServer]

    @property
    def ports(self) -> list[int]:
        return [server.port for server in self.servers]

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{port}" for port in self.ports)

    def cli(self, port: int, *args: str) -> str:
        return _cli(port, *args)

    def stop(self) -> None:
        for server in self.servers:
            server.stop()


def start_cluster(workdir: Path, masters: int = 3) -> RedisCluster:
    """Start ``masters`` cluster-enabled servers, join them with ``redis-cli --cluster create``."""
    servers: list[RedisServer] = []
    try:
        for _ in range(masters):
            port = free_cluster_port()
            node_dir = workdir / f"node-{port}"
            servers.append(
                RedisServer(
                    port=port,
                    workdir=node_dir,
                    extra_args=(
                        "--cluster-enabled",
                        "yes",
                        "--cluster-config-file",
                        str(node_dir / f"nodes-{port}.conf"),
                        "--cluster-node-timeout",
                        "2000",
                    ),
                ).start()
            )
        created = subprocess.run(
            [
                REDIS_CLI,
                "--cluster",
                "create",
                *(f"127.0.0.1:{server.port}" for server in servers),
                "--cluster-replicas",
                "0",
                "--cluster-yes",
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if created.returncode != 0:
            raise RuntimeError(f"redis-cli --cluster create failed: {created.stdout}{created.stderr}")
        deadline = time.monotonic() + scaled(30)
        while time.monotonic() < deadline:
            if all("cluster_state:ok" in _cli(server.port, "cluster", "info") for server in servers):
                return RedisCluster(servers)
            time.sleep(0.1)
        raise RuntimeError("the local Redis Cluster did not reach cluster_state:ok")
    except BaseException:
        for server in servers:
            server.stop()
        raise
