"""Side by side: fanout against socket.io (Node), python-socketio and a plain-websockets baseline.

    .venv/bin/python bench/compare.py                                   # everything, median of 3
    .venv/bin/python bench/compare.py --repeat 1 --systems fanout-redis-routing,socketio-node \\
        --workloads group,paced --markdown /tmp/compare.md

Every system runs the same shape: **2 server processes** (the baseline: 1, it has no broker), its broker
(Redis at ``--redis-url``, RabbitMQ at ``--amqp-url``), an **external publisher process**, and the same
clients: ``--clients`` (2,000) in ``--groups`` (20) groups, client ``c`` in group ``c % groups`` on server
``(c // groups) % 2``, so every group has members on both servers. The clients live in ``--load-procs``
(2) Node.js load-generator processes (``bench/compare/loadgen.js``: the ``ws`` package for fanout and the
baseline, ``socket.io-client`` over the websocket transport for both socket.io servers; no compression
anywhere).

Systems (``--systems``):

- ``fanout-redis-routing``, ``fanout-redis-fanout``, ``fanout-amqp-routing``, ``fanout-amqp-fanout``:
  ``python -m node --app fanout_app:app`` (``bench/compare/fanout_app.py``: admits ``/?group=g7`` into
  ``g7``) with ``FANOUT_URL`` / ``FANOUT_MODE``, a unique ``FANOUT_NAMESPACE``, no client or accept rate
  limits; the publisher is ``fanout.ServerUtil`` (``send_to_group`` / ``send_to_all``).
- ``socketio-node``: ``socket.io`` + ``@socket.io/redis-adapter`` (node-redis), clients join the room of
  their handshake query; the publisher is ``@socket.io/redis-emitter``.
- ``socketio-python``: python-socketio on aiohttp + uvloop with ``socketio.AsyncRedisManager``; the publisher
  is a write-only ``AsyncRedisManager``.
- ``websockets-baseline``: one ``websockets`` process, no broker: the publisher sends over a websocket and the
  server calls ``websockets.broadcast`` itself.

Workloads (``--workloads``): ``group`` — ``--group-messages`` group sends round-robin over the groups, flat
out (``--concurrency`` concurrent callers); ``broadcast`` — ``--broadcast-messages`` sends to everyone, flat
out; ``paced`` — one group send every 1/``--paced-rate`` s (200/s), each awaited alone, for
``--paced-seconds`` (10), with publish-to-receipt latency (the payload carries the publisher's wall clock,
the load generator reads ``performance.timeOrigin + performance.now()`` on arrival).

Method. Before measuring, a warm-up (a group send to each group, then a broadcast) must reach everyone.
Each workload is a phase: the load generators are told how many messages each group expects, CPU counters
are read, the publisher is started, and the phase ends when every client has exactly what it should have
(or once nothing has moved for ``--stall-timeout`` seconds: that is loss, and the run fails). **Server
CPU-s per 100k deliveries** = user + system CPU of the server processes (``/proc/<pid>/stat``) over the
phase, divided by the deliveries received, times 100,000. Also reported: the share of that CPU spent in
the kernel (system time: mostly the socket writes, which on loopback also carry the receiving side's TCP
work), deliveries/s (over the phase), the publisher's, the load generators' and the broker's CPU (the
broker's includes anyone else using it), and
for ``paced`` p50 / p99 latency. Every client must get every message meant for it, nothing twice, nothing of
another group; any loss, extra, misrouted or late frame, or a dropped connection fails the run and is
printed. Each (system, workload) cell is the median of ``--repeat`` (3) runs; repeats go round the systems,
so slow moments of a shared machine spread over all of them. The table's ratios are each system's figure over
``socketio-node``'s.

The Node packages (``bench/compare/package.json``, exact versions in ``package-lock.json``) are installed
into ``bench/compare/node_modules`` with ``npm ci`` and the Python peers (``requirements-peers.txt``) into
``bench/compare/.venv-peers`` when missing or out of date. RabbitMQ exchanges of the run's namespaces (fanout
leaves them by design) are deleted afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import queue
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

ROOT = Path(__file__).resolve().parents[1]
HERE = ROOT / "bench" / "compare"
PEERS = HERE / ".venv-peers"
PEERS_PYTHON = PEERS / "bin" / "python"
REQUIREMENTS = HERE / "requirements-peers.txt"
WORKLOADS = ("group", "broadcast", "paced")
REFERENCE = "socketio-node"

sys.path.insert(0, str(ROOT))
from bench.bench import cpu_seconds, cpu_split, machine  # noqa: E402
from tests.support import free_port  # noqa: E402

# ---------------------------------------------------------------------------------------------- processes


def child_pids(pid: int) -> list[int]:
    """The live children of ``pid`` (from /proc)."""
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def listener_pid(port: int) -> int | None:
    """The pid of the process listening on a local TCP port (the broker), if ``ss`` can tell."""
    try:
        out = subprocess.run(
            ["ss", "-Hltnp", f"sport = :{port}"], capture_output=True, text=True, timeout=5
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    found = re.search(r"pid=(\d+)", out)
    return int(found.group(1)) if found else None


def machine_busy() -> tuple[float, float]:
    """(busy, total) CPU time of the whole machine so far, in clock ticks (from /proc/stat)."""
    ticks = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    idle = ticks[3] + ticks[4]  # idle + iowait
    return sum(ticks) - idle, sum(ticks)


class RunFailed(Exception):
    """A system could not be run or measured (start-up failure, loss, timeout)."""


class Child:
    """A process this benchmark started: stdout read line by line (JSON lines parsed), stderr to a log."""

    def __init__(self, name: str, args: list[str], log_dir: Path, env: dict[str, str] | None = None) -> None:
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        self._log: IO[str] = self.log_path.open("w")
        self.proc = subprocess.Popen(
            args,
            cwd=ROOT,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
            bufsize=1,
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def cpu(self) -> float:
        """This process's CPU, and its children's (``fanout-node --processes N`` runs N of them)."""
        return cpu_seconds(self.pid) + sum(cpu_seconds(pid) for pid in child_pids(self.pid))

    def kernel_cpu(self) -> float:
        """The system (kernel) part of :meth:`cpu`."""
        return sum(cpu_split(pid)[1] for pid in (self.pid, *child_pids(self.pid)))

    def log_tail(self, lines: int = 15) -> str:
        self._log.flush()
        text = self.log_path.read_text(errors="replace").strip().splitlines()
        return "\n".join(f"    {line}" for line in text[-lines:])

    def send(self, message: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(json.dumps(message) + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            raise RunFailed(f"{self.name} exited ({self.proc.poll()}):\n{self.log_tail()}") from None

    def poll_line(self, timeout: float) -> str | None:
        """The next stdout line within ``timeout`` s; None if there is none yet. Raises if it exited."""
        try:
            line = self.lines.get(timeout=max(0.0, timeout))
        except queue.Empty:
            return None
        if line is None:
            self.lines.put(None)
            raise RunFailed(f"{self.name} exited ({self.proc.wait()}):\n{self.log_tail()}")
        return line

    def expect(self, key: str, timeout: float, value: object = None) -> dict[str, Any]:
        """Wait for a JSON line with ``key`` (equal to ``value`` if given); other lines go to the log."""
        deadline = time.monotonic() + timeout
        while True:
            line = self.poll_line(deadline - time.monotonic())
            if line is None:
                if time.monotonic() >= deadline:
                    raise RunFailed(f"{self.name}: no {key!r} within {timeout:g} s:\n{self.log_tail()}")
                continue
            message = parse_line(line)
            if message is not None and key in message and (value is None or message[key] == value):
                return message
            self._log.write(line)

    def expect_text(self, text: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            line = self.poll_line(deadline - time.monotonic())
            if line is not None and line.strip() == text:
                return
            if line is not None:
                self._log.write(line)
            elif time.monotonic() >= deadline:
                raise RunFailed(f"{self.name}: no {text!r} within {timeout:g} s:\n{self.log_tail()}")

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        with contextlib.suppress(OSError):
            if self.proc.stdin:
                self.proc.stdin.close()
        self._log.close()


def parse_line(line: str) -> dict[str, Any] | None:
    if not line.startswith("{"):
        return None
    try:
        message = json.loads(line)
    except ValueError:
        return None
    return message if isinstance(message, dict) else None


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FANOUT_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH", "")]))
    env.update(extra)
    return env


# ------------------------------------------------------------------------------------------------ systems


@dataclass
class Stack:
    """One system's running processes and what the load generators need to reach its servers."""

    servers: list[Child]
    publisher: Child
    urls: list[str]
    client: str  #: "ws" or "sio": which client the load generators use
    broker_pid: int | None


#: starts a system's servers and publisher: (args, log dir, children started, cleanup actions) -> Stack
Starter = Callable[[argparse.Namespace, Path, list["Child"], list[Callable[[], None]]], Stack]


@dataclass(frozen=True)
class System:
    name: str
    label: str
    start: Starter
    python_peers: bool = False


def wait_healthy(child: Child, port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if child.proc.poll() is not None:
            raise RunFailed(f"{child.name} exited ({child.proc.returncode}):\n{child.log_tail()}")
        with (
            contextlib.suppress(OSError),
            urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as answer,
        ):
            if answer.status == 200:
                return
        time.sleep(0.05)
    raise RunFailed(f"{child.name} not healthy in {timeout:g} s:\n{child.log_tail()}")


def delete_amqp_exchanges(url: str, prefix: str) -> None:
    """Delete the RabbitMQ exchanges of one namespace (fanout declares them non-durable, not auto-delete)."""
    out = subprocess.run(
        ["rabbitmqctl", "-q", "list_exchanges", "name"], capture_output=True, text=True, timeout=60
    )
    names = [n for n in out.stdout.split() if n == prefix or n.startswith(prefix + ".")]
    if not names:
        return

    async def delete() -> None:
        import aio_pika

        connection = await aio_pika.connect(url)
        async with connection:
            channel = await connection.channel()
            for name in names:
                await channel.exchange_delete(name)

    asyncio.run(delete())


def start_fanout(backend: str, mode: str, commands: int = 2, processes: int = 1) -> Starter:
    """fanout nodes: ``commands`` node commands, each ``fanout-node --processes <processes>``."""

    def start(
        args: argparse.Namespace, logs: Path, children: list[Child], cleanup: list[Callable[[], None]]
    ) -> Stack:
        url = args.redis_url if backend == "redis" else args.amqp_url
        namespace = f"cmp{uuid.uuid4().hex[:12]}"
        broker = listener_pid(6379 if backend == "redis" else 5672)
        if backend == "amqp":
            cleanup.append(lambda: delete_amqp_exchanges(url, namespace))
        env = {
            "FANOUT_URL": url,
            "FANOUT_MODE": mode,
            "FANOUT_NAMESPACE": namespace,
            "FANOUT_HOST": "127.0.0.1",
            "FANOUT_CLIENT_RATE": "0",
            "FANOUT_ACCEPT_RATE": "0",
            "FANOUT_LOG_LEVEL": "WARNING",
        }
        servers, ports = [], []
        for i in range(commands):
            port = free_port()
            node_env = clean_env(**env, FANOUT_PORT=str(port), FANOUT_NODE_ID=f"cmp{i}")
            node_env["PYTHONPATH"] += os.pathsep + str(HERE)  # for fanout_app
            command = [sys.executable, "-m", "node", "--app", "fanout_app:app", "--processes", str(processes)]
            child = Child(f"node{i}", command, logs, node_env)
            children.append(child)
            servers.append(child)
            ports.append(port)
        for child, port in zip(servers, ports, strict=True):
            wait_healthy(child, port)
        command = [
            sys.executable,
            str(HERE / "publisher.py"),
            "fanout",
            url,
            mode,
            namespace,
            str(commands * processes),
        ]
        publisher = Child("publisher", command, logs, clean_env())
        children.append(publisher)
        ready = publisher.expect("ready", 30)
        if ready.get("nodes") != commands * processes:
            raise RunFailed(f"the publisher sees {ready.get('nodes')} nodes, not {commands * processes}")
        return Stack(servers, publisher, [f"ws://127.0.0.1:{p}" for p in ports], "ws", broker)

    return start


def start_socketio_node(
    args: argparse.Namespace, logs: Path, children: list[Child], cleanup: list[Callable[[], None]]
) -> Stack:
    key = f"cmp{uuid.uuid4().hex[:12]}"
    servers, ports = [], []
    for i in range(2):
        port = free_port()
        child = Child(f"sio{i}", ["node", str(HERE / "sio_server.js"), str(port), args.redis_url, key], logs)
        children.append(child)
        servers.append(child)
        ports.append(port)
    for child in servers:
        child.expect_text("listening", 30)
    publisher = Child("publisher", ["node", str(HERE / "sio_publisher.js"), args.redis_url, key], logs)
    children.append(publisher)
    publisher.expect("ready", 30)
    return Stack(servers, publisher, [f"http://127.0.0.1:{p}" for p in ports], "sio", listener_pid(6379))


def start_socketio_python(
    args: argparse.Namespace, logs: Path, children: list[Child], cleanup: list[Callable[[], None]]
) -> Stack:
    channel = f"cmp{uuid.uuid4().hex[:12]}"
    servers, ports = [], []
    for i in range(2):
        port = free_port()
        command = [str(PEERS_PYTHON), str(HERE / "pysio_server.py"), str(port), args.redis_url, channel]
        child = Child(f"pysio{i}", command, logs)
        children.append(child)
        servers.append(child)
        ports.append(port)
    for child in servers:
        child.expect_text("listening", 30)
    command = [str(PEERS_PYTHON), str(HERE / "publisher.py"), "socketio", args.redis_url, channel]
    publisher = Child("publisher", command, logs)
    children.append(publisher)
    publisher.expect("ready", 30)
    return Stack(servers, publisher, [f"http://127.0.0.1:{p}" for p in ports], "sio", listener_pid(6379))


def start_baseline(
    args: argparse.Namespace, logs: Path, children: list[Child], cleanup: list[Callable[[], None]]
) -> Stack:
    port = free_port()
    server = Child("ws0", [sys.executable, str(HERE / "baseline_server.py"), str(port)], logs)
    children.append(server)
    server.expect_text("listening", 30)
    url = f"ws://127.0.0.1:{port}/publish"
    publisher = Child("publisher", [sys.executable, str(HERE / "publisher.py"), "websocket", url], logs)
    children.append(publisher)
    publisher.expect("ready", 30)
    return Stack([server], publisher, [f"ws://127.0.0.1:{port}"], "ws", None)


SYSTEMS = {
    s.name: s
    for s in (
        System("fanout-redis-routing", "fanout Redis routing", start_fanout("redis", "routing")),
        System("fanout-redis-fanout", "fanout Redis fanout", start_fanout("redis", "fanout")),
        System("fanout-amqp-routing", "fanout AMQP routing", start_fanout("amqp", "routing")),
        System("fanout-amqp-fanout", "fanout AMQP fanout", start_fanout("amqp", "fanout")),
        # one node command with one process, and with --processes 2 (SO_REUSEPORT), for the speed-up
        System("fanout-redis-1proc", "fanout Redis, 1 process", start_fanout("redis", "routing", 1, 1)),
        System("fanout-redis-2procs", "fanout Redis, --processes 2", start_fanout("redis", "routing", 1, 2)),
        System(REFERENCE, "socket.io (Node)", start_socketio_node),
        System("socketio-python", "python-socketio", start_socketio_python, python_peers=True),
        System("websockets-baseline", "websockets, 1 process, no broker", start_baseline),
    )
}


# -------------------------------------------------------------------------------------------- measurement


@dataclass
class PhaseResult:
    deliveries: int
    expected: int
    seconds: float  #: from the publisher's start to the last delivery
    publish_seconds: float  #: the publisher's own time for its sends
    server_cpu: float
    server_kernel: float  #: the part of server_cpu spent in the kernel (system time: mostly send())
    publisher_cpu: float
    load_cpu: float
    load_busiest: float  #: the busiest load generator's CPU share of one core over the phase
    broker_cpu: float | None
    machine_busy: float  #: share of the whole machine's CPU in use over the phase (everyone's)
    p50: float
    p99: float
    errors: list[str]

    @property
    def per_100k(self) -> float:
        return self.server_cpu / self.deliveries * 100_000 if self.deliveries else float("nan")

    @property
    def kernel_share(self) -> float:
        return self.server_kernel / self.server_cpu if self.server_cpu else float("nan")

    @property
    def rate(self) -> float:
        return self.deliveries / self.seconds if self.seconds else 0.0


def bin_ms(index: int) -> float:
    """The middle of a load generator's latency bin: 10 us wide up to 10 s, then 1 ms wide."""
    return (index + 0.5) / 100 if index < 1_000_000 else 10_000 + index - 1_000_000 + 0.5


def percentile(bins: dict[int, int], fraction: float) -> float:
    """From the merged latency histogram, the latency (ms) below which ``fraction`` of the deliveries lie."""
    total = sum(bins.values())
    if not total:
        return float("nan")
    rank = fraction * total
    seen = 0
    for index in sorted(bins):
        seen += bins[index]
        if seen >= rank:
            return bin_ms(index)
    return bin_ms(max(bins))


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.phase_id = 0

    def load_command(self, stack: Stack, first: int, count: int) -> list[str]:
        config = {
            "kind": stack.client,
            "urls": stack.urls,
            "first": first,
            "count": count,
            "groups": self.args.groups,
            "concurrency": 50,
        }
        return ["node", str(HERE / "loadgen.js"), json.dumps(config)]

    def run_system(self, system: System, logs: Path) -> dict[str, PhaseResult]:
        args = self.args
        children: list[Child] = []
        cleanup: list[Callable[[], None]] = []
        try:
            stack = system.start(args, logs, children, cleanup)
            loads = []
            per = args.clients // args.load_procs
            for i in range(args.load_procs):
                count = per if i < args.load_procs - 1 else args.clients - per * i
                load = Child(f"load{i}", self.load_command(stack, per * i, count), logs, clean_env())
                children.append(load)
                loads.append(load)
            started = time.monotonic()
            for load in loads:
                load.expect("ready", 120)
            connect_time = time.monotonic() - started
            print(f"  {args.clients} clients connected in {connect_time:.1f} s", flush=True)
            # warm-up: every group's subscription and the broadcast path must be live before measuring
            for kind, count in (("group", args.groups), ("all", 1)):
                result = self.phase(stack, loads, kind, count, 0.0)
                if result.errors:
                    raise RunFailed("warm-up failed: " + "; ".join(result.errors))
            results = {}
            for workload in args.workloads:
                if workload == "group":
                    result = self.phase(stack, loads, "group", args.group_messages, 0.0)
                elif workload == "broadcast":
                    result = self.phase(stack, loads, "all", args.broadcast_messages, 0.0)
                else:
                    count = round(args.paced_seconds * args.paced_rate)
                    result = self.phase(stack, loads, "group", count, 1 / args.paced_rate)
                results[workload] = result
                self.print_phase(workload, result)
            for load in loads:
                load.send({"cmd": "quit"})
            stack.publisher.send({"cmd": "quit"})
            return results
        finally:
            for child in reversed(children):
                child.stop()
            for action in cleanup:
                try:
                    action()
                except Exception as exc:
                    print(f"  !!! cleanup failed: {exc!r}", flush=True)

    def phase(self, stack: Stack, loads: list[Child], kind: str, count: int, interval: float) -> PhaseResult:
        args = self.args
        self.phase_id += 1
        pid = self.phase_id
        groups = args.groups
        if kind == "group":
            expect = [len(range(g, count, groups)) for g in range(groups)]
        else:
            expect = [count] * groups
        for load in loads:
            load.send({"cmd": "phase", "id": pid, "kind": kind, "expect": expect})
        for load in loads:
            load.expect("phase", 10, pid)
        servers0 = sum(c.cpu() for c in stack.servers)
        kernel0 = sum(c.kernel_cpu() for c in stack.servers)
        loads0 = [c.cpu() for c in loads]
        publisher0 = stack.publisher.cpu()
        broker0 = cpu_seconds(stack.broker_pid) if stack.broker_pid else None
        busy0, total0 = machine_busy()
        start = time.monotonic()
        stack.publisher.send(
            {
                "cmd": "run",
                "phase": pid,
                "kind": kind,
                "count": count,
                "groups": groups,
                "size": args.size,
                "interval": interval,
                "concurrency": args.concurrency,
            }
        )
        errors: list[str] = []
        pending = set(range(len(loads)))
        published: dict[str, Any] | None = None
        # loss is declared when nothing moves for --stall-timeout s: the publisher has not finished and no
        # load generator reported progress (they do every second while frames arrive)
        moved = start
        while pending or published is None:
            now = time.monotonic()
            if now - moved >= args.stall_timeout or now - start >= args.timeout + count * interval:
                break
            if published is None:
                line = stack.publisher.poll_line(0.0 if pending else 0.05)
                message = parse_line(line) if line else None
                if message is not None and message.get("done") == pid:
                    published = message
                    moved = time.monotonic()
            for i in sorted(pending):
                line = loads[i].poll_line(0.002)
                message = parse_line(line) if line else None
                if message is not None and message.get("complete") == pid:
                    pending.discard(i)
                progressed = message is not None and message.get("progress") == pid
                if progressed or (interval and published is None):  # a paced publisher is not stalled
                    moved = time.monotonic()
        seconds = time.monotonic() - start
        server_cpu = sum(c.cpu() for c in stack.servers) - servers0
        server_kernel = sum(c.kernel_cpu() for c in stack.servers) - kernel0
        load_cpus = [c.cpu() - c0 for c, c0 in zip(loads, loads0, strict=True)]
        publisher_cpu = stack.publisher.cpu() - publisher0
        busy1, total1 = machine_busy()
        broker_cpu = (
            cpu_seconds(stack.broker_pid) - broker0 if stack.broker_pid and broker0 is not None else None
        )
        if published is None:
            errors.append(f"the publisher did not finish (stalled {args.stall_timeout:g} s or out of time)")
        elif pending:
            errors.append(f"deliveries stopped: nothing more arrived for {args.stall_timeout:g} s")
        deliveries = expected = 0
        bins: dict[int, int] = {}
        for load in loads:
            load.send({"cmd": "report", "id": pid})
            report = load.expect("report", 30, pid)
            deliveries += report["received"]
            expected += report["expected"]
            for index, n in report["bins"]:
                bins[index] = bins.get(index, 0) + n
            problems = {
                "clients short of messages": report["short"],
                "frames beyond what a client expected": report["extra"],
                "frames of another group": report["wrong"],
                "frames of another phase (late or repeated)": report["stale"],
                "connections lost so far": report["closed"],
            }
            errors += [f"{load.name}: {n} {what}" for what, n in problems.items() if n]
        if deliveries != expected:
            errors.insert(0, f"LOSS: {expected - deliveries:,} of {expected:,} deliveries missing")
        return PhaseResult(
            deliveries=deliveries,
            expected=expected,
            seconds=seconds,
            publish_seconds=float(published["seconds"]) if published else float("nan"),
            server_cpu=server_cpu,
            server_kernel=server_kernel,
            publisher_cpu=publisher_cpu,
            load_cpu=sum(load_cpus),
            load_busiest=max(load_cpus) / seconds if seconds else 0.0,
            broker_cpu=broker_cpu,
            machine_busy=(busy1 - busy0) / (total1 - total0) if total1 > total0 else float("nan"),
            p50=percentile(bins, 0.5),
            p99=percentile(bins, 0.99),
            errors=errors,
        )

    def print_phase(self, workload: str, r: PhaseResult) -> None:
        broker = f", broker {r.broker_cpu:.2f}" if r.broker_cpu is not None else ""
        print(
            f"  {workload:9} {r.deliveries:>9,} deliveries in {r.seconds:5.2f} s = {r.rate:>8,.0f}/s | "
            f"server CPU {r.server_cpu:5.2f} s = {r.per_100k:.3f} CPU-s/100k ({r.kernel_share:.0%} kernel)"
            " | CPU s: publisher "
            f"{r.publisher_cpu:.2f}, load {r.load_cpu:.2f} (busiest {r.load_busiest:.0%} of a core){broker}"
            f" | machine {r.machine_busy:.0%} busy | latency p50 {r.p50:.1f} / p99 {r.p99:.1f} ms",
            flush=True,
        )
        for error in r.errors:
            print(f"  !!! {workload}: {error}", flush=True)


# ----------------------------------------------------------------------------------------------- tables


@dataclass
class Cell:
    runs: list[PhaseResult] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    def median(self, value: Callable[[PhaseResult], float]) -> float:
        return statistics.median(value(r) for r in self.runs) if self.runs else float("nan")

    @property
    def ok(self) -> bool:
        return bool(self.runs) and not self.failures


def ratio(value: float, reference: float) -> str:
    if not (value == value and reference == reference and reference):  # NaN-safe
        return ""
    return f" ({value / reference:.2f}x)"


def tables(
    cells: dict[tuple[str, str], Cell], systems: list[str], workloads: list[str]
) -> Iterator[tuple[str, list[str], list[list[str]]]]:
    """(title, header, rows) of the summary and the detail tables."""
    header = ["workload"] + [SYSTEMS[s].label for s in systems]
    rows = []
    for workload in workloads:
        row = [workload]
        ref = cells.get((REFERENCE, workload))
        ref_value = ref.median(lambda r: r.per_100k) if ref and ref.ok else float("nan")
        for system in systems:
            cell = cells[(system, workload)]
            if not cell.ok:
                row.append("FAILED")
                continue
            value = cell.median(lambda r: r.per_100k)
            text = f"{value:.3f}{ratio(value, ref_value) if system != REFERENCE else ''}"
            if workload == "paced":
                text += (
                    f"; p50 {cell.median(lambda r: r.p50):.1f} / p99 {cell.median(lambda r: r.p99):.1f} ms"
                )
            row.append(text)
        rows.append(row)
    yield (
        f"Server CPU-seconds per 100,000 deliveries (median; ratio to {SYSTEMS[REFERENCE].label})",
        header,
        rows,
    )
    detail_header = [
        "system",
        "workload",
        "runs",
        "deliveries/s",
        "CPU-s/100k (runs)",
        "server kernel share",
        "publisher CPU-s",
        "load CPU-s (busiest proc)",
        "broker CPU-s",
        "machine busy",
        "p50 / p99 ms",
    ]
    detail = []
    for system in systems:
        for workload in workloads:
            cell = cells[(system, workload)]
            if not cell.runs:
                detail.append([system, workload, "0", "FAILED", "", "", "", "", "", "", ""])
                continue
            brokers = [r.broker_cpu for r in cell.runs if r.broker_cpu is not None]
            detail.append(
                [
                    system,
                    workload,
                    f"{len(cell.runs)}" + (f" +{len(cell.failures)} failed" if cell.failures else ""),
                    f"{cell.median(lambda r: r.rate):,.0f}",
                    f"{cell.median(lambda r: r.per_100k):.3f} ("
                    + ", ".join(f"{r.per_100k:.3f}" for r in cell.runs)
                    + ")",
                    f"{cell.median(lambda r: r.kernel_share):.0%}",
                    f"{cell.median(lambda r: r.publisher_cpu):.2f}",
                    f"{cell.median(lambda r: r.load_cpu):.2f} ({cell.median(lambda r: r.load_busiest):.0%})",
                    f"{statistics.median(brokers):.2f}" if brokers else "-",
                    f"{cell.median(lambda r: r.machine_busy):.0%}",
                    f"{cell.median(lambda r: r.p50):.1f} / {cell.median(lambda r: r.p99):.1f}",
                ]
            )
    yield "Details (medians)", detail_header, detail


def text_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(header, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    return "\n".join(lines)


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ install


def stamp_ok(stamp: Path, source: Path) -> bool:
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    return stamp.exists() and stamp.read_text().strip() == digest


def write_stamp(stamp: Path, source: Path) -> None:
    stamp.write_text(hashlib.sha256(source.read_bytes()).hexdigest() + "\n")


def ensure_node_packages() -> None:
    if shutil.which("node") is None or shutil.which("npm") is None:
        sys.exit("compare: node and npm are needed (Node.js 18 or later)")
    stamp = HERE / "node_modules" / ".compare-stamp"
    lock = HERE / "package-lock.json"
    if stamp_ok(stamp, lock):
        return
    print("installing the Node packages (npm ci) into bench/compare/node_modules ...", flush=True)
    subprocess.run(["npm", "ci", "--no-audit", "--no-fund", "--loglevel=error"], cwd=HERE, check=True)
    write_stamp(stamp, lock)


def ensure_python_peers() -> None:
    stamp = PEERS / ".compare-stamp"
    if PEERS_PYTHON.exists() and stamp_ok(stamp, REQUIREMENTS):
        return
    print("installing the Python peers into bench/compare/.venv-peers ...", flush=True)
    if not PEERS_PYTHON.exists():
        subprocess.run([sys.executable, "-m", "venv", str(PEERS)], check=True)
    pip = [str(PEERS_PYTHON), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    subprocess.run([*pip, "-r", str(REQUIREMENTS)], check=True)
    write_stamp(stamp, REQUIREMENTS)


# ---------------------------------------------------------------------------------------------------- main


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--systems", default=",".join(SYSTEMS), help="comma list (default: all)")
    parser.add_argument("--workloads", default=",".join(WORKLOADS), help="comma list (default: all)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per cell; the median is reported")
    parser.add_argument("--clients", type=int, default=2000)
    parser.add_argument("--groups", type=int, default=20)
    parser.add_argument("--load-procs", type=int, default=2, help="load-generator processes")
    parser.add_argument("--size", type=int, default=100, help="message size, bytes")
    parser.add_argument("--group-messages", type=int, default=4000, help="flat-out group sends")
    parser.add_argument("--broadcast-messages", type=int, default=800, help="flat-out broadcasts")
    parser.add_argument("--paced-rate", type=float, default=200.0, help="paced group sends per second")
    parser.add_argument("--paced-seconds", type=float, default=10.0)
    parser.add_argument("--concurrency", type=int, default=100, help="flat-out concurrent publisher calls")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds a flat-out phase may take")
    parser.add_argument(
        "--stall-timeout", type=float, default=10.0, help="seconds without progress until loss is declared"
    )
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--amqp-url", default="amqp://guest:guest@127.0.0.1:5672/")
    parser.add_argument("--markdown", type=Path, help="also write the tables to this Markdown file")
    parser.add_argument("--keep-logs", action="store_true", help="keep the processes' logs (printed path)")
    args = parser.parse_args()
    args.systems = [s for s in args.systems.split(",") if s]
    args.workloads = [w for w in args.workloads.split(",") if w]
    for name in args.systems:
        if name not in SYSTEMS:
            parser.error(f"unknown system {name!r}; known: {', '.join(SYSTEMS)}")
    for name in args.workloads:
        if name not in WORKLOADS:
            parser.error(f"unknown workload {name!r}; known: {', '.join(WORKLOADS)}")
    if args.clients < args.groups or args.load_procs < 1 or args.repeat < 1:
        parser.error("need --clients >= --groups, --load-procs >= 1 and --repeat >= 1")
    return args


def main() -> int:
    args = parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    ensure_node_packages()
    if any(SYSTEMS[s].python_peers for s in args.systems):
        ensure_python_peers()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--", "fanout", "node"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    dirty_note = " + uncommitted changes in fanout/ or node/" if dirty else ""
    header = (
        f"{time.strftime('%Y-%m-%d')} on {machine()}, Node {subprocess.getoutput('node --version')}, "
        f"commit {commit.stdout.strip()}{dirty_note}; {args.clients} clients in {args.groups} groups, "
        f"{args.load_procs} load processes, {args.size}-byte messages; group {args.group_messages} "
        f"flat out, broadcast {args.broadcast_messages} flat out, paced {args.paced_rate:g}/s for "
        f"{args.paced_seconds:g} s; median of {args.repeat}"
    )
    print("#", header, flush=True)
    logs = Path(tempfile.mkdtemp(prefix="fanout-compare-"))
    cells = {(s, w): Cell() for s in args.systems for w in args.workloads}
    bench = Bench(args)
    for round_ in range(1, args.repeat + 1):
        for name in args.systems:
            print(f"[{name} run {round_}/{args.repeat}]", flush=True)
            run_logs = logs / f"{name}-{round_}"
            run_logs.mkdir()
            try:
                results = bench.run_system(SYSTEMS[name], run_logs)
            except RunFailed as exc:
                print(f"  !!! FAILED: {exc}", flush=True)
                for workload in args.workloads:
                    cells[(name, workload)].failures.append(str(exc))
                continue
            for workload, result in results.items():
                cell = cells[(name, workload)]
                cell.runs.append(result)
                if result.errors:
                    cell.failures.append("; ".join(result.errors))
    failed = [(key, cell) for key, cell in cells.items() if cell.failures]
    out = [f"# fanout vs socket.io: {header}", ""]
    print()
    for title, table_header, rows in tables(cells, args.systems, args.workloads):
        print(title)
        print(text_table(table_header, rows))
        print()
        out += [f"## {title}", "", markdown_table(table_header, rows), ""]
    for (system, workload), cell in failed:
        message = f"FAILED {system} {workload}: " + " | ".join(cell.failures)
        print("!!!", message)
        out.append(f"- **{message}**")
    if args.markdown:
        args.markdown.write_text("\n".join(out) + "\n")
        print(f"Markdown written to {args.markdown}")
    if args.keep_logs or failed:
        print(f"logs: {logs}")
    else:
        shutil.rmtree(logs, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
