"""Continuity benchmarks (issue 17, docs/benchmarks.md "Continuity (issue 17)").

    python bench/continuity.py history  --nodes 2 --clients 400 --groups 20 --messages 10000 --repeat 7
    python bench/continuity.py envelope --nodes 2 --clients 400 --groups 20 --messages 10000 --repeat 7
    python bench/continuity.py storm    --clients 10000 --processes 4 --groups 100 --rate 100
    python bench/continuity.py receive  --messages 20000 --groups 20 --streams 10000

Every run starts its own throw-away ``redis-server`` processes (no persistence, free ports; ended by their
pids), so that their CPU time is this bench's alone, and real node processes (``python -m node``, the
``tests.apps.streams`` application: a client is admitted into the groups its URL names). The websocket
clients live in load-generator processes (``bench/loadgen.py``), not in the publisher's. CPU time is read
from ``/proc/<pid>/task/*/schedstat`` (nanoseconds, user + system, every thread of the process).

``history``: group sends to history groups vs the same without history. Two clusters side by side, each
with its own Redis and ``--nodes`` nodes: one with ``FANOUT_HISTORY=group:*``, one with it empty; each has
``--clients`` raw clients in ``--groups`` groups (every group has members on every node). Per round and per
phase, the same sends go to one cluster, then the other (the order alternates from round to round):
``flat`` (``--messages`` sends awaited one by one, as fast as the publisher can), ``matched`` (the same
sends paced, every cluster at one rate: ``--matched-share`` (0.95) of what the slower reached flat out
in that round - node CPU per delivery falls steeply with the send rate, so flat out the clusters' nodes
are compared at different rates, and here at about the rate the slower publisher reaches flat out; the
table shows the rate each reached), ``concurrent`` (the same
from ``--concurrency`` concurrent callers) and ``paced`` (``--rate`` sends per second for ``--seconds``);
``--phases`` runs some of them.
Reported per cluster, medians of ``--repeat`` rounds: publisher sends/s, node CPU per delivery (and in
brackets the load generators': the clients' side), Redis CPU per publish (the cluster's redis-server)
and, paced, latency; then history / plain. ``--pin``: every thread of the nodes and load generators on one
CPU, of this process (the publisher) and the redis-servers on the other, so that the publisher and the
nodes do not take each other's CPU, as on separate hosts (flat out, the nodes are then saturated).
``--side-by-side``: one cluster of 2 nodes (``FANOUT_HISTORY=group:h-*``), the plain groups' clients on one
node and the history groups' on the other, and each phase's sends alternate between a plain group and a
history group: both nodes get the same send rate at the same moments, flat out too (plain on node 0 in
groups ``a``, on node 1 in groups ``b``; the ratio is the geometric mean of the two sides').

``envelope``: fanout.v1 clients vs raw clients receiving the same group sends. One cluster
(``FANOUT_HISTORY=group:h-*``) with four sets of ``--clients`` clients, each in its own ``--groups``
groups: raw and v1 clients in plain groups, raw and v1 clients in history groups (``h-...``: their v1
envelopes carry ``streams``). The phases as above, raw then v1 (alternating); node CPU per delivery, v1 / raw.
``--side-by-side`` (2 nodes): the raw and the v1 clients in the same groups, all raw ones on one node and
all v1 ones on the other, so that both nodes deliver the same sends at the same moments and only the
protocol differs (the machine's ups and downs hit both alike); in groups ``a`` the raw clients are on node
0, in groups ``b`` on node 1, and the ratio is the geometric mean of the two sides' (what one node costs
more than the other cancels out). ``--control``: raw clients in the place of the v1 ones too, so that the
ratio shows what the method itself adds (1.00x but for noise).

``receive``: the node's receive side alone, in the bench's process: a bus message decoded (and, stored,
positioned), plain vs stored; and tracking ``--streams`` streams (begun, positioned, ended).

``storm``: ``--clients`` clients (:class:`fanout.client.Client`, spread over ``--processes``
load-generator processes), each in one of ``--groups`` groups, on node A of three (A, B, C; each client's
URL list is A then B or C, half each); a publisher sends ``{"g", "n"}`` to the groups in turn at
``--rate`` sends/s; A is SIGKILLed. Measured from the kill: the time until every client is back (v1:
``resumed`` handed over; raw: welcomed again), the CPU of B, C, Redis and the load generators until then;
then what each client lost or got twice. Once with recovery (``FANOUT_HISTORY=group:*``, ``fanout.v1``
clients that resume), once without (history off, raw clients reconnecting: what they missed is what each
would have to reload from the application), ``--rounds`` times each, alternating.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import contextlib
import os
import re
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import orjson  # noqa: E402

from bench.bench import cpu_seconds, machine  # noqa: E402
from fanout import ServerUtil  # noqa: E402
from tests.support.nodes import STARTED, NodeProcess, start_node, unique_namespace  # noqa: E402
from tests.support.redis_servers import RedisServer, start_redis  # noqa: E402

STREAMS_APP = "tests.apps.streams:app"


#: every process this run started (nodes are also in tests.support.nodes.STARTED): ended at exit, by pid
REDIS_SERVERS: list[RedisServer] = []
LOAD_GENERATORS: list[asyncio.subprocess.Process] = []


def _end_everything() -> None:
    """At exit (also after SIGTERM): end what this run started and is still running, each by its pid."""
    for node in STARTED:
        if node.proc.poll() is None:
            node.proc.kill()
            node.proc.wait(10)
    for proc in LOAD_GENERATORS:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
    for server in REDIS_SERVERS:
        server.stop()


def cpu_ns(pid: int) -> int:
    """CPU time of every thread of a process so far, nanoseconds (``/proc/<pid>/task/*/schedstat``)."""
    total = 0
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError):
                total += int((task / "schedstat").read_text().split()[0])
    except OSError:
        return int(cpu_seconds(pid) * 1e9)
    return total


def cpu_of(pids: list[int]) -> int:
    return sum(cpu_ns(pid) for pid in pids)


def raise_fd_limit() -> int:
    """The soft limit of open files up to the hard one (inherited by the nodes and load generators)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, int(len(ordered) * q) - 1))]


# ---------------------------------------------------------------------------------- processes


class LoadGen:
    """One ``bench/loadgen.py`` process: ``await call(op, **arguments)`` -> its JSON answer."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self._lock = asyncio.Lock()

    @classmethod
    async def start(cls) -> LoadGen:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            str(ROOT / "bench" / "loadgen.py"),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            limit=1 << 26,
        )
        LOAD_GENERATORS.append(proc)
        return cls(proc)

    @property
    def pid(self) -> int:
        return self.proc.pid

    async def call(self, op: str, **arguments: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        async with self._lock:
            self.proc.stdin.write(orjson.dumps({"op": op, **arguments}) + b"\n")
            await self.proc.stdin.drain()
            line = await self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"load generator {self.pid} exited ({await self.proc.wait()})")
        answer: dict[str, Any] = orjson.loads(line)
        if "error" in answer:
            raise RuntimeError(f"load generator {self.pid}: {answer['error']}")
        return answer

    async def stop(self) -> None:
        if self.proc.returncode is None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.call("exit"), 1)
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()  # our own child, by its pid
            await self.proc.wait()


@dataclass
class Cluster:
    """A throw-away redis-server and the nodes using it."""

    name: str
    redis: RedisServer
    nodes: list[NodeProcess]
    env: dict[str, str]
    util: ServerUtil | None = None
    redis_idle: float = 0.0  #: the redis-server's CPU ns per second with nodes but no sends

    async def measure_idle(self, seconds: float = 3.0) -> None:
        assert self.redis.process is not None
        before, start = cpu_ns(self.redis.process.pid), time.perf_counter()
        await asyncio.sleep(seconds)
        self.redis_idle = (cpu_ns(self.redis.process.pid) - before) / (time.perf_counter() - start)

    @property
    def pids(self) -> list[int]:
        return [n.pid for n in self.nodes if n.proc.poll() is None]

    def url(self, index: int, query: str) -> str:
        return f"ws://127.0.0.1:{self.nodes[index].port}/?{query}"

    async def open_util(self) -> ServerUtil:
        history = self.env.get("FANOUT_HISTORY", "")
        options = {"history": history} if history else {}
        self.util = ServerUtil(self.redis.url, namespace=self.env["FANOUT_NAMESPACE"], **options)
        await self.util.connect()
        await self.util.check_cluster()
        return self.util

    async def close(self) -> None:
        if self.util is not None:
            await self.util.disconnect()
        for node in self.nodes:
            if node.proc.poll() is None:
                with contextlib.suppress(Exception):
                    node.terminate()
        self.redis.stop()


def start_cluster(
    tmp: Path, name: str, nodes: int, history: str, accept_rates: list[str] | None = None, **extra: str
) -> Cluster:
    redis = start_redis(tmp / f"redis-{name}")
    REDIS_SERVERS.append(redis)
    env = {
        "FANOUT_URL": redis.url,
        "FANOUT_NAMESPACE": unique_namespace("bench"),
        "FANOUT_HISTORY": history,
        "FANOUT_LOG_LEVEL": "WARNING",
        "FANOUT_HEARTBEAT_INTERVAL": "1",
        "FANOUT_ACCEPT_RATE": "0",
        **extra,
    }
    started = []
    try:
        for i in range(nodes):
            rate = {"FANOUT_ACCEPT_RATE": accept_rates[i]} if accept_rates else {}
            started.append(start_node(tmp, {**env, "FANOUT_NODE_ID": f"{name}{i}", **rate}, app=STREAMS_APP))
    except BaseException:
        for node in started:
            node.kill()
        redis.stop()
        raise
    return Cluster(name, redis, started, env)


def pin(args: argparse.Namespace, clusters: list[Cluster], gens: list[LoadGen]) -> str:
    """``--pin``: every thread of the nodes and load generators on the last CPU, of this process (the
    publisher) and the redis-servers on the first, so that the publisher and the nodes do not take each
    other's CPU (as on separate hosts). Returns what was done, for the header."""
    if not args.pin:
        return "no CPU pinning"
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        raise SystemExit("--pin needs two CPUs")
    first, last = cpus[0], cpus[-1]
    placed = [(os.getpid(), first)]
    for cluster in clusters:
        placed += [(pid, last) for pid in cluster.pids]
        placed.append((cluster.redis.process.pid, first))  # type: ignore[union-attr]
    placed += [(gen.pid, last) for gen in gens]
    for pid, cpu in placed:
        for task in Path(f"/proc/{pid}/task").iterdir():
            os.sched_setaffinity(int(task.name), {cpu})
    return f"pinned: nodes and load generators on CPU {last}, the publisher and Redis on CPU {first}"


# ---------------------------------------------------------------------------------- phases


@dataclass
class ClientSet:
    """Receivers of one kind spread over the load generators: who is in which group."""

    name: str
    cluster: Cluster
    groups: list[str]
    #: every client on this node (index), else spread over the cluster's nodes
    node: int | None = None
    members: dict[str, int] = field(default_factory=dict)  #: group -> connections in it
    expected: dict[str, int] = field(default_factory=dict)  #: group -> frames each member must have

    @property
    def node_pids(self) -> list[int]:
        """The processes whose CPU its deliveries cost: its node, else every live node of the cluster."""
        return self.cluster.pids if self.node is None else [self.cluster.nodes[self.node].pid]

    async def open(self, gens: list[LoadGen], clients: int, v1: bool) -> None:
        nodes = len(self.cluster.nodes)
        conns: list[list[list[str]]] = [[] for _ in gens]
        for j in range(clients):
            if self.node is None:
                group, node = self.groups[(j // nodes) % len(self.groups)], j % nodes
            else:
                group, node = self.groups[j % len(self.groups)], self.node
            url = self.cluster.url(node, f"groups={group}")
            conns[j % len(gens)].append([url, group])
            self.members[group] = self.members.get(group, 0) + 1
        self.expected = dict.fromkeys(self.groups, 0)
        await asyncio.gather(
            *(g.call("receivers", name=self.name, v1=v1, conns=c) for g, c in zip(gens, conns, strict=True))
        )


@dataclass
class Phase:
    kind: str  #: flat, matched, concurrent, paced
    messages: int
    concurrency: int = 1
    rate: float = 0.0
    #: paced at the rate the slowest set reached flat out in the same round (set by :func:`rounds`)
    matched: bool = False


async def run_phase(
    phase: Phase, receivers: list[ClientSet], gens: list[LoadGen], size: int
) -> list[dict[str, float]]:
    """``phase``'s sends to the groups of ``receivers`` (sets of one cluster, each on its own node when
    several: in the same groups, or each in its own, whose sends then alternate) and what they cost, per
    set: publisher sends/s, node CPU per delivery (of the set's node(s)), Redis CPU per publish, latency
    (all from one publisher, the bench's process)."""
    cluster = receivers[0].cluster
    groups = list(
        dict.fromkeys(g for same in zip(*(cs.groups for cs in receivers), strict=True) for g in same)
    )
    util = cluster.util
    assert util is not None and all(cs.cluster is cluster for cs in receivers)
    pad = "x" * max(0, size - 21)
    redis_pid = cluster.redis.process.pid  # type: ignore[union-attr]
    counts = dict.fromkeys(groups, 0)

    async def one(i: int) -> None:
        group = groups[i % len(groups)]
        await util.send_to_group(group, f"{time.monotonic():<20.6f} {pad}")

    counters_before = [await node_counters(cs) for cs in receivers]
    gen_pids = [g.pid for g in gens]
    node_before = [cpu_of(cs.node_pids) for cs in receivers]
    redis_before, gen_before = cpu_ns(redis_pid), cpu_of(gen_pids)
    start, started, publisher_cpu = time.perf_counter(), time.monotonic(), time.process_time()
    if phase.concurrency > 1:
        per = phase.messages // phase.concurrency

        async def worker(w: int) -> None:
            for k in range(per):
                await one(w * per + k)

        await asyncio.gather(*(worker(w) for w in range(phase.concurrency)))
        sent = per * phase.concurrency
    else:
        for i in range(phase.messages):
            await one(i)
            if phase.rate:
                await asyncio.sleep(max(0.0, start + (i + 1) / phase.rate - time.perf_counter()))
        sent = phase.messages
    published = time.perf_counter() - start
    publisher_cpu = time.process_time() - publisher_cpu
    for i in range(sent):
        counts[groups[i % len(groups)]] += 1
    answers = []
    for cs in receivers:
        for group in cs.groups:
            cs.expected[group] += counts[group]
        answers.append(
            await asyncio.gather(
                *(g.call("wait", name=cs.name, expect=cs.expected, timeout=120) for g in gens)
            )
        )
    node_cpu = [cpu_of(cs.node_pids) - before for cs, before in zip(receivers, node_before, strict=True)]
    redis_cpu, gen_cpu = cpu_ns(redis_pid) - redis_before, cpu_of(gen_pids) - gen_before
    window = time.perf_counter() - start
    redis_cpu -= cluster.redis_idle * window  # what it spends idle (heartbeats, its cron)
    results = []
    for k, cs in enumerate(receivers):
        counters = await node_counters(cs)
        counted = {key: counters[key] - counters_before[k][key] for key in counters}
        short = sum(a["short"] for a in answers[k])
        extra = sum(a["extra"] for a in answers[k]) + sum(a["bad"] for a in answers[k])
        if short or extra:
            raise RuntimeError(
                f"{cs.name} {phase.kind}: {short} deliveries missing, {extra} extra or malformed"
            )
        elapsed = max(a["reached_at"] for a in answers[k]) - started  # until the last delivery
        latencies = [x for a in answers[k] for x in a["latencies"]]
        deliveries = sum(counts[g] * cs.members[g] for g in cs.groups)
        results.append(
            {
                "rate": phase.rate,
                "sends_per_s": sent / published,
                "publisher_us": publisher_cpu * 1e6 / sent,
                "deliveries_per_s": deliveries / elapsed,
                "node_us": node_cpu[k] / 1e3 / deliveries,
                # the load generators hold every set's clients: their CPU per delivery of all sets
                "gen_us": gen_cpu / 1e3 / sum(counts[g] * c.members[g] for c in receivers for g in c.groups),
                "redis_us": redis_cpu / 1e3 / sent,
                "p50_ms": pct(latencies, 0.5) * 1e3,
                "p99_ms": pct(latencies, 0.99) * 1e3,
                "frames_per_write": counted["fanout_frames_sent_total"]
                / max(1, counted["fanout_delivery_writes_total"]),
                "commands_per_batch": counted["fanout_bus_batch_commands_total"]
                / max(1, counted["fanout_bus_batches_total"]),
                "history_reads": counted.get("fanout_history_reads_total", 0),
            }
        )
    return results


COUNTERS = (
    "fanout_frames_sent_total",
    "fanout_delivery_writes_total",
    "fanout_bus_batches_total",
    "fanout_bus_batch_commands_total",
    "fanout_history_reads_total",
)


async def node_counters(cs: ClientSet) -> dict[str, float]:
    """The sum over the live nodes of ``cs`` (its node, else its cluster's) of the /metrics counters of
    :data:`COUNTERS`."""
    from tests.support.nodes import metrics

    total = dict.fromkeys(COUNTERS, 0.0)
    nodes = cs.cluster.nodes if cs.node is None else [cs.cluster.nodes[cs.node]]
    for node in nodes:
        if node.proc.poll() is None:
            samples = await metrics(node.port)
            for key in COUNTERS:
                total[key] += samples.get(key, 0.0)
    return total


def phases_text(args: argparse.Namespace) -> str:
    return (
        f"{args.processes} load generators, {args.size}-byte sends, compression "
        f"{'on' if args.compression else 'off'}; phases ({','.join(args.phases)}): flat {args.messages} "
        f"awaited one by one, concurrent {args.messages} from {args.concurrency} callers, paced "
        f"{args.rate:g}/s for {args.seconds:g}s; median of {args.repeat} rounds"
    )


#: the matched phase's rate, as a share of the slowest set's flat-out rate in the same round (a little
#: under it: paced sends that cannot keep up would be flat out again); ``--matched-share``
MATCHED = 0.95


PHASES = ("flat", "matched", "concurrent", "paced")


def phases_of(args: argparse.Namespace) -> list[Phase]:
    """The phases of ``--phases``, in their order (``matched`` needs ``flat``: its rate comes from there)."""
    every = [
        Phase("flat", args.messages),
        Phase("matched", args.messages, matched=True),
        Phase("concurrent", args.messages, concurrency=args.concurrency),
        Phase("paced", int(args.rate * args.seconds), rate=args.rate),
    ]
    return [phase for phase in every if phase.kind in args.phases]


def phase_list(text: str) -> list[str]:
    """``--phases``: a comma-separated list of PHASES."""
    kinds = [kind.strip() for kind in text.split(",") if kind.strip()]
    if not kinds or any(kind not in PHASES for kind in kinds):
        raise argparse.ArgumentTypeError(f"a comma-separated list of {', '.join(PHASES)}")
    if "matched" in kinds and "flat" not in kinds:
        raise argparse.ArgumentTypeError("matched needs flat (its rate is a share of the flat phase's)")
    return kinds


async def rounds(
    args: argparse.Namespace, targets: list[list[ClientSet]], gens: list[LoadGen]
) -> dict[tuple[str, str], list[dict[str, float]]]:
    """``--repeat`` rounds: each phase to every target (sets receiving the same sends) in turn, the order
    of the targets reversed every other round. Returns every measurement, by (phase, set)."""
    results: dict[tuple[str, str], list[dict[str, float]]] = {}
    warm = Phase("warm-up", 200)
    for target in targets:
        await run_phase(warm, target, gens, args.size)
    names = [cs.name for target in targets for cs in target]
    for r in range(args.repeat):
        order = targets if r % 2 == 0 else targets[::-1]
        for phase in phases_of(args):
            if phase.matched:  # every set at the same rate: what the slowest reached flat out, a bit less
                phase.rate = args.matched_share * min(results[("flat", n)][-1]["sends_per_s"] for n in names)
            for target in order:
                measured = await run_phase(phase, target, gens, args.size)
                for cs, measure in zip(target, measured, strict=True):
                    results.setdefault((phase.kind, cs.name), []).append(measure)
        print(f"  round {r + 1}/{args.repeat} done", flush=True)
    return results


def median_of(measures: list[dict[str, float]], key: str) -> float:
    return statistics.median(m[key] for m in measures)


#: what a ratio line compares: (key, label)
RATIOS = (
    ("node_us", "node CPU/delivery"),
    ("gen_us", "clients' CPU/delivery"),
    ("sends_per_s", "publisher"),
    ("publisher_us", "publisher CPU/send"),
    ("redis_us", "Redis CPU/publish"),
)


def print_table(
    args: argparse.Namespace,
    results: dict[tuple[str, str], list[dict[str, float]]],
    pairs: list[tuple[str, tuple[str, ...], tuple[str, ...]]],
    ratios: tuple[tuple[str, str], ...] = RATIOS,
) -> None:
    """Medians per (phase, set), and the ratios of ``pairs`` (label, numerator sets, denominator sets: of
    several, the geometric mean of the ratios of the sets in the same places); the per-round ratios in
    brackets."""
    for phase in phases_of(args):
        for name in dict.fromkeys(n for _, nums, dens in pairs for n in (*dens, *nums)):
            m = results[(phase.kind, name)]
            line = (
                f"{phase.kind:>10} {name:>9}: publisher {median_of(m, 'sends_per_s'):>7,.0f} sends/s "
                f"({median_of(m, 'publisher_us'):.0f} us CPU/send), "
                f"{median_of(m, 'deliveries_per_s'):>8,.0f} deliveries/s, node CPU "
                f"{median_of(m, 'node_us'):.2f} us/delivery (clients' {median_of(m, 'gen_us'):.2f}), "
                f"Redis CPU {median_of(m, 'redis_us'):.1f} us/publish"
            )
            if phase.matched:
                line += f" at {statistics.median(x['rate'] for x in m):,.0f}/s"
            if phase.rate or phase.matched:
                line += f", latency p50 {median_of(m, 'p50_ms'):.1f} / p99 {median_of(m, 'p99_ms'):.1f} ms"
            line += (
                f"; {median_of(m, 'frames_per_write'):.2f} frames per write, "
                f"{median_of(m, 'commands_per_batch'):.2f} commands per batch"
            )
            if any(x["history_reads"] for x in m):
                line += f", history reads {sum(x['history_reads'] for x in m):.0f}"
            print(line)
        for label, nums, dens in pairs:
            parts = []
            for key, what in ratios:
                per_set = [
                    (results[(phase.kind, a)], results[(phase.kind, b)])
                    for a, b in zip(nums, dens, strict=True)
                ]
                per_round = [
                    statistics.geometric_mean(ma[r][key] / mb[r][key] for ma, mb in per_set)
                    for r in range(len(per_set[0][0]))
                ]
                whole = statistics.geometric_mean(
                    median_of(ma, key) / median_of(mb, key) for ma, mb in per_set
                )
                parts.append(f"{what} {whole:.2f}x ({', '.join(f'{x:.2f}' for x in per_round)})")
            print(f"{phase.kind:>10} {label}: " + "; ".join(parts))


# ---------------------------------------------------------------------------------- history


async def bench_history(args: argparse.Namespace) -> None:
    if args.side_by_side:
        await history_side_by_side(args)
        return
    groups = [f"room{i}" for i in range(args.groups)]
    with tempfile.TemporaryDirectory() as tmp:
        clusters: list[Cluster] = []
        gens: list[LoadGen] = []
        try:
            compression = {"FANOUT_COMPRESSION": str(args.compression)}
            plain = start_cluster(Path(tmp), "plain", args.nodes, "", **compression)
            clusters.append(plain)
            hist = start_cluster(Path(tmp), "hist", args.nodes, "group:*", **compression)
            clusters.append(hist)
            gens = [await LoadGen.start() for _ in range(args.processes)]
            sets = [ClientSet("plain", plain, groups), ClientSet("history", hist, groups)]
            for cs in sets:
                await cs.cluster.open_util()
                await cs.open(gens, args.clients, v1=False)
            pinned = pin(args, clusters, gens)
            print(
                f"history: {args.nodes} nodes per cluster, {args.clients} raw clients in {args.groups} "
                f"groups per cluster; {phases_text(args)}; {pinned}",
                flush=True,
            )
            await asyncio.gather(*(c.measure_idle() for c in clusters))
            print(
                "Redis idle CPU (subtracted from its CPU per publish): "
                + ", ".join(f"{c.name} {c.redis_idle / 1e6:.2f} ms/s" for c in clusters),
                flush=True,
            )
            profiler = start_profile(args, {"plain": plain.pids[0], "history": hist.pids[0]})
            results = await rounds(args, [[cs] for cs in sets], gens)
            stop_profile(profiler)
            print_table(args, results, [("history / plain", ("history",), ("plain",))])
        finally:
            for gen in gens:
                await gen.stop()
            for cluster in clusters:
                await cluster.close()


async def history_side_by_side(args: argparse.Namespace) -> None:
    """``history --side-by-side``: one cluster of 2 nodes (``FANOUT_HISTORY=group:h-*``); ``--clients``
    raw clients in plain groups on one node, as many in history groups on the other, and the sends
    alternate between the two kinds of group: both nodes get the same send rate, flat out too, at the same
    moments. Plain on node 0 in groups ``a``, on node 1 in groups ``b``; ratio: the geometric mean of the
    two sides' (node 0's clients connect first, see :func:`open_side_by_side`)."""
    async with one_cluster(args, "mixed", 2) as (cluster, gens):
        targets = []
        for side, plain_node in (("a", 0), ("b", 1)):
            plain = ClientSet(
                f"plain-{side}", cluster, [f"p-{side}{i}" for i in range(args.groups)], plain_node
            )
            hist = ClientSet(
                f"history-{side}", cluster, [f"h-{side}{i}" for i in range(args.groups)], 1 - plain_node
            )
            targets.append(await open_side_by_side(gens, args.clients, [(plain, False), (hist, False)]))
        pinned = pin(args, [cluster], gens)
        print(
            f"history side by side: 2 nodes (FANOUT_HISTORY=group:h-*), {args.clients} raw clients in "
            f"{args.groups} plain groups on one node and {args.clients} in {args.groups} history groups "
            f"on the other, sends alternating between them; {phases_text(args)}; {pinned}",
            flush=True,
        )
        await cluster.measure_idle()
        profiler = start_profile(args, {f"node{i}": pid for i, pid in enumerate(cluster.pids)})
        results = await rounds(args, targets, gens)
        stop_profile(profiler)
        pair = ("history / plain", ("history-a", "history-b"), ("plain-a", "plain-b"))
        print_table(args, results, [pair], ratios=RATIOS[:1])


# ---------------------------------------------------------------------------------- envelope


@contextlib.asynccontextmanager
async def one_cluster(
    args: argparse.Namespace, name: str, nodes: int
) -> AsyncIterator[tuple[Cluster, list[LoadGen]]]:
    """A cluster of ``nodes`` nodes whose groups ``h-*`` keep history, its ServerUtil open, and the load
    generators; all ended afterwards."""
    with tempfile.TemporaryDirectory() as tmp:
        cluster: Cluster | None = None
        gens: list[LoadGen] = []
        try:
            compression = {"FANOUT_COMPRESSION": str(args.compression)}
            cluster = start_cluster(Path(tmp), name, nodes, "group:h-*", **compression)
            await cluster.open_util()
            gens = [await LoadGen.start() for _ in range(args.processes)]
            yield cluster, gens
        finally:
            for gen in gens:
                await gen.stop()
            if cluster is not None:
                await cluster.close()


async def open_side_by_side(
    gens: list[LoadGen], clients: int, pair: list[tuple[ClientSet, bool]]
) -> list[ClientSet]:
    """Open a side-by-side pair of sets (each on its own node; with it, whether its clients are v1), node
    0's first: the node whose clients joined a group first subscribed first to its channel and gets each
    publish first, and which node gets it first moved the ratio by some 4 % (``envelope --control``, raw
    clients on both nodes, read 1.04x when one side's clients connected first on both sides); with node
    0's first on both sides of a run, that cancels out as the nodes' own difference does."""
    for cs, v1 in sorted(pair, key=lambda entry: entry[0].node or 0):
        await cs.open(gens, clients, v1=v1)
    return [cs for cs, _ in pair]


async def bench_envelope(args: argparse.Namespace) -> None:
    nodes = 2 if args.side_by_side else args.nodes
    async with one_cluster(args, "env", nodes) as (cluster, gens):
        targets = await (envelope_side_by_side if args.side_by_side else envelope_sets)(args, cluster, gens)
        pinned = pin(args, [cluster], gens)
        if args.side_by_side:
            layout = (
                f"2 nodes (FANOUT_HISTORY=group:h-*), side by side: {args.clients} raw clients on one "
                f"node and {args.clients} v1 clients on the other in the same {args.groups} groups, "
                "raw on node 0 in groups a, on node 1 in groups b; plain groups and history groups"
            )
        else:
            layout = (
                f"{nodes} nodes (FANOUT_HISTORY=group:h-*), 4 sets of {args.clients} clients in "
                f"{args.groups} groups each (raw, v1 in plain groups; raw+h, v1+h in history groups)"
            )
        print(f"envelope: {layout}; {phases_text(args)}; {pinned}", flush=True)
        await cluster.measure_idle()
        print(f"Redis idle CPU (subtracted from its CPU per publish): {cluster.redis_idle / 1e6:.2f} ms/s")
        profiler = start_profile(args, {f"node{i}": pid for i, pid in enumerate(cluster.pids)})
        results = await rounds(args, targets, gens)
        stop_profile(profiler)
        if args.side_by_side:
            print_table(
                args,
                results,
                [
                    ("v1 / raw, no history", ("v1-a", "v1-b"), ("raw-a", "raw-b")),
                    ("v1 / raw, history", ("v1+h-a", "v1+h-b"), ("raw+h-a", "raw+h-b")),
                ],
                ratios=RATIOS[:1],
            )
        else:
            print_table(
                args,
                results,
                [
                    ("v1 / raw, no history", ("v1",), ("raw",)),
                    ("v1 / raw, history", ("v1+h",), ("raw+h",)),
                ],
            )


async def envelope_sets(
    args: argparse.Namespace, cluster: Cluster, gens: list[LoadGen]
) -> list[list[ClientSet]]:
    """Four sets, each in its own groups and spread over the nodes: each is a phase's target alone."""
    targets = []
    for name, prefix, v1 in (
        ("raw", "p-raw", False),
        ("v1", "p-v1", True),
        ("raw+h", "h-raw", False),
        ("v1+h", "h-v1", True),
    ):
        cs = ClientSet(name, cluster, [f"{prefix}{i}" for i in range(args.groups)])
        await cs.open(gens, args.clients, v1=v1)
        targets.append([cs])
    return targets


async def envelope_side_by_side(
    args: argparse.Namespace, cluster: Cluster, gens: list[LoadGen]
) -> list[list[ClientSet]]:
    """``--side-by-side``: raw clients on one node and v1 clients on the other, in the same groups, so
    that the two nodes deliver the same sends at the same moments and only the protocol differs; in
    groups ``a`` raw clients are on node 0, in groups ``b`` on node 1 (the ratio is the geometric mean of
    the two: what one node costs more than the other cancels out; node 0's clients connect first, see
    :func:`open_side_by_side`)."""
    targets = []
    for history in ("", "+h"):
        for side, raw_node in (("a", 0), ("b", 1)):
            groups = [f"{'h' if history else 'p'}-{side}{i}" for i in range(args.groups)]
            raw = ClientSet(f"raw{history}-{side}", cluster, groups, node=raw_node)
            v1 = ClientSet(f"v1{history}-{side}", cluster, groups, node=1 - raw_node)
            targets.append(
                await open_side_by_side(gens, args.clients, [(raw, False), (v1, not args.control)])
            )
    return targets


# ---------------------------------------------------------------------------------- profiles


def start_profile(args: argparse.Namespace, nodes: dict[str, int]) -> list[subprocess.Popen[bytes]]:
    """``py-spy record`` of each of ``nodes`` (label -> pid) for the whole run, into ``--profile``
    ``.<label>.txt`` (collapsed stacks, one line per stack with its sample count; idle time not sampled)."""
    if not args.profile:
        return []
    spy = Path(sys.executable).parent / "py-spy"
    spies = []
    for label, pid in nodes.items():
        out = f"{args.profile}.{label}.txt"
        print(f"profiling node pid {pid} ({label}) into {out}", flush=True)
        command = [str(spy), "record", "--pid", str(pid), "--format", "raw", "--rate", "100"]
        command += ["--nonblocking", "-o", out]
        spies.append(subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    return spies


def stop_profile(spies: list[subprocess.Popen[bytes]]) -> None:
    for spy in spies:
        spy.send_signal(signal.SIGINT)  # py-spy writes what it recorded
    for spy in spies:
        spy.wait(60)


def read_profile(path: str, lines: bool = False) -> tuple[int, dict[str, int], dict[str, int]]:
    """A py-spy collapsed-stacks file: (samples, samples by innermost frame, samples by frame anywhere);
    a frame is a function (``lines``: a line of one)."""
    own: dict[str, int] = {}
    anywhere: dict[str, int] = {}
    total = 0
    for line in Path(path).read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        n = int(count)
        total += n
        frames = stack.split(";") if lines else [re.sub(r":\d+\)$", ")", f) for f in stack.split(";")]
        own[frames[-1]] = own.get(frames[-1], 0) + n
        for frame in set(frames):
            anywhere[frame] = anywhere.get(frame, 0) + n
    return total, own, anywhere


def print_profiles(paths: list[str], top: int, lines: bool = False) -> None:
    """The top frames of a profile; of two (the same work, another configuration), the frames whose
    samples grew most from the first to the second."""
    profiles = [read_profile(p, lines) for p in paths]
    for path, (total, own, anywhere) in zip(paths, profiles, strict=True):
        print(f"{path}: {total} samples")
        for title, table in (("self", own), ("inclusive", anywhere)):
            print(f"  {title}:")
            for frame, n in sorted(table.items(), key=lambda kv: -kv[1])[:top]:
                print(f"    {100 * n / total:5.1f}%  {frame}")
    if len(profiles) == 2:
        (t1, _, a1), (t2, _, a2) = profiles
        print(f"grew most from {paths[0]} ({t1} samples) to {paths[1]} ({t2}), in samples (inclusive):")
        grown = sorted(((a2.get(f, 0) - a1.get(f, 0), f) for f in set(a1) | set(a2)), reverse=True)
        for diff, frame in grown[:top]:
            print(f"    {diff:+6d}  {frame}")


# ---------------------------------------------------------------------------------- storm


async def storm(args: argparse.Namespace, tmp: Path, recover: bool, gens: list[LoadGen]) -> dict[str, Any]:
    """One storm (see the module docstring); returns what it measured."""
    history = "group:*" if recover else ""
    rate = str(args.accept_rate)
    cluster = start_cluster(tmp, "storm", 3, history, accept_rates=["0", rate, rate])
    set_name = f"storm-{'v1' if recover else 'raw'}-{time.monotonic_ns()}"
    sending: asyncio.Task[None] | None = None
    try:
        util = await cluster.open_util()
        groups = [f"g{i}" for i in range(args.groups)]
        per_gen: list[list[list[Any]]] = [[] for _ in gens]
        for i in range(args.clients):
            b, c = cluster.url(1, ""), cluster.url(2, "")
            query = f"groups={groups[i % len(groups)]}"
            urls = [cluster.url(0, query), *(u + query for u in ((b, c) if i % 2 == 0 else (c, b)))]
            per_gen[i % len(gens)].append([urls, groups[i % len(groups)]])
        start = time.perf_counter()
        opened = await asyncio.gather(
            *(
                g.call("clients", name=set_name, recover=recover, clients=c, backoff=list(args.backoff))
                for g, c in zip(gens, per_gen, strict=True)
            )
        )
        nodes_seen = sorted({n for o in opened for n in o["nodes"]})
        connect_time = time.perf_counter() - start
        a_rss = cluster.nodes[0].rss_kib()

        last: dict[str, int] = {}
        stop = asyncio.Event()

        async def publish() -> None:
            n, t0 = 0, time.perf_counter()
            while not stop.is_set():
                group = groups[n % len(groups)]
                seq = n // len(groups)
                await util.send_to_group(group, {"g": group, "n": seq})
                last[group] = seq
                n += 1
                await asyncio.sleep(max(0.0, t0 + n / args.rate - time.perf_counter()))

        sending = asyncio.create_task(publish())
        await asyncio.sleep(args.warmup)
        survivors = cluster.pids[1:]
        pids = [*survivors, cluster.redis.process.pid, *(g.pid for g in gens)]  # type: ignore[union-attr]
        stats_before = command_stats(cluster.redis)
        before = {pid: cpu_ns(pid) for pid in pids}
        sent_before = sum(v + 1 for v in last.values())
        spies = start_profile(args, {f"storm-{'v1' if recover else 'raw'}-B": survivors[0]})
        killed_at = time.monotonic()
        cluster.nodes[0].kill()  # SIGKILL
        back_at: list[float] = []
        statuses: list[dict[str, Any]] = []
        while time.monotonic() - killed_at < args.timeout:
            statuses = [await g.call("status", name=set_name) for g in gens]
            if all(s["back"] == s["clients"] for s in statuses):
                back_at = [t for s in statuses for t in s["back_at"]]
                break
            await asyncio.sleep(0.05)
        after = {pid: cpu_ns(pid) for pid in pids}
        stats_after = command_stats(cluster.redis)
        stop_profile(spies)
        sent_during = sum(v + 1 for v in last.values()) - sent_before
        if not back_at:
            back = sum(s["back"] for s in statuses)
            raise RuntimeError(f"only {back} of {args.clients} clients back after {args.timeout}s")
        await asyncio.sleep(args.after)
        stop.set()
        await sending
        sending = None
        tallies = await asyncio.gather(*(g.call("tally", name=set_name, last=last, timeout=60) for g in gens))
        metrics_text = [m for m in (await asyncio.gather(*(_metrics(n.port) for n in cluster.nodes[1:])))]
        result: dict[str, Any] = {
            "recover": recover,
            "connect_s": connect_time,
            "nodes_before": nodes_seen,
            "a_rss_mib": a_rss / 1024,
            "all_back_s": max(back_at) - killed_at,
            "p50_back_s": pct(back_at, 0.5) - killed_at,
            "p90_back_s": pct(back_at, 0.9) - killed_at,
            "node_cpu_s": sum(after[p] - before[p] for p in survivors) / 1e9,
            "redis_cpu_s": (after[pids[len(survivors)]] - before[pids[len(survivors)]]) / 1e9,
            "gen_cpu_s": sum(after[g.pid] - before[g.pid] for g in gens) / 1e9,
            "sent_during": sent_during,
            "sent": sum(v + 1 for v in last.values()),
            "not_recovered": sum(s["not_recovered"] for s in statuses),
            "nodes_after": sorted({n for s in statuses for n in s["nodes"]}),
            "refusals": sum(m.get("fanout_accept_rate_refusals_total", 0) for m in metrics_text),
            "resumes": sum(m.get("fanout_resumes_total", 0) for m in metrics_text),
            "resumes_refused": sum(m.get("fanout_resumes_refused_total", 0) for m in metrics_text),
        }
        result["commands"] = {
            name: (calls - stats_before.get(name, (0, 0))[0], usec - stats_before.get(name, (0, 0))[1])
            for name, (calls, usec) in stats_after.items()
        }
        for key in ("lost", "duplicated", "out_of_order", "clients_missing", "client_duplicates", "received"):
            result[key] = sum(t[key] for t in tallies)
        result["missed_max"] = max(t["missed_max"] for t in tallies)
        result["again"] = sum(t["again"] for t in tallies)
        codes: dict[str, int] = {}
        for t in tallies:
            for code, count in t["again_codes"].items():
                codes[code] = codes.get(code, 0) + count
        result["again_codes"] = codes
        await asyncio.gather(*(g.call("close", name=set_name) for g in gens))
        return result
    finally:
        if sending is not None:
            sending.cancel()
            await asyncio.gather(sending, return_exceptions=True)
        await cluster.close()


def command_stats(redis: RedisServer) -> dict[str, tuple[int, int]]:
    """Redis's ``INFO commandstats``: {command: (calls, microseconds)} so far."""
    stats = {}
    for line in redis.cli("INFO", "commandstats").splitlines():
        if line.startswith("cmdstat_"):
            name, _, fields = line[len("cmdstat_") :].partition(":")
            values = dict(field.split("=", 1) for field in fields.split(","))
            stats[name] = (int(values["calls"]), int(values["usec"]))
    return stats


async def _metrics(port: int) -> dict[str, float]:
    from tests.support.nodes import metrics

    return await metrics(port)


def print_storm(args: argparse.Namespace, r: dict[str, Any]) -> None:
    kind = (
        "with recovery (v1, FANOUT_HISTORY=group:*)" if r["recover"] else "without recovery (raw, no history)"
    )
    n = args.clients
    print(
        f"storm {kind}: {n:,} clients on node A ({r['connect_s']:.1f}s to connect, A's RSS "
        f"{r['a_rss_mib']:.0f} MiB), SIGKILL: all back on {'/'.join(r['nodes_after'])} in "
        f"{r['all_back_s']:.2f}s (p50 {r['p50_back_s']:.2f}s, p90 {r['p90_back_s']:.2f}s); "
        f"{r['sent_during']} sends meanwhile ({r['sent']} in all); "
        f"lost {r['lost']:,} ({r['clients_missing']:,} clients missed something, at most {r['missed_max']} "
        f"each), duplicated {r['duplicated']} (client-side drops {r['client_duplicates']}), out of order "
        f"{r['out_of_order']}, not recovered {r['not_recovered']}; CPU until all back: nodes B+C "
        f"{r['node_cpu_s']:.2f}s ({r['node_cpu_s'] / n * 1e6:.0f} us per client), Redis "
        f"{r['redis_cpu_s']:.2f}s ({r['redis_cpu_s'] / n * 1e6:.0f} us per client), load generators "
        f"{r['gen_cpu_s']:.2f}s; handshakes refused over FANOUT_ACCEPT_RATE {r['refusals']:.0f}, resumes "
        f"{r['resumes']:.0f} (refused {r['resumes_refused']:.0f}); {r['received']:,} deliveries in all",
        flush=True,
    )
    if r["again"]:
        print(f"  {r['again']} clients came back more than once; their last close: {r['again_codes']}")
    busy = sorted(r["commands"].items(), key=lambda kv: -kv[1][1])
    print(
        "  Redis commands until all back, per client (calls, us inside Redis): "
        + ", ".join(
            f"{name} {calls / n:.2f} ({usec / n:.0f} us)" for name, (calls, usec) in busy if calls >= n / 10
        )
    )


async def bench_storm(args: argparse.Namespace) -> None:
    limit = raise_fd_limit()
    print(
        f"storm: {args.clients:,} clients (fanout.client.Client, backoff "
        f"{args.backoff[0]:g}-{args.backoff[1]:g}s full jitter) over {args.processes} load generators, "
        f"{args.groups} groups, publisher {args.rate:g} sends/s to them in turn, B and C with "
        f"FANOUT_ACCEPT_RATE={args.accept_rate:g}; open files limit {limit}",
        flush=True,
    )
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        gens = [await LoadGen.start() for _ in range(args.processes)]
        try:
            for r in range(args.rounds):
                for recover in (True, False) if r % 2 == 0 else (False, True):
                    result = await storm(args, Path(tmp) / f"{r}-{recover}", recover, gens)
                    print_storm(args, result)
                    results.append(result)
        finally:
            for gen in gens:
                await gen.stop()
    if args.rounds > 1:
        for recover in (True, False):
            mine = [r for r in results if r["recover"] is recover]
            keys = ("all_back_s", "node_cpu_s", "redis_cpu_s", "lost", "clients_missing")
            print(
                f"median of {len(mine)} ({'recovery' if recover else 'no recovery'}): "
                + ", ".join(f"{k} {statistics.median(r[k] for r in mine):.2f}" for k in keys)
            )


# ---------------------------------------------------------------------------------- receive side


def bench_receive(args: argparse.Namespace) -> None:
    """The node's receive side alone, in this process (no I/O): what a bus message costs to decode and
    position, plain vs stored (``--messages`` pre-encoded sends to ``--groups`` groups in turn, taken in
    batches of ``--batch``), and what tracking ``--streams`` streams costs (each begun and positioned,
    then ended)."""
    from fanout import protocol
    from fanout.commands import Send, Target, TargetKind
    from fanout.history import attach_positions, new_send_id
    from fanout.positioning import Positioning
    from fanout.receive import Receiver

    now, n, groups = time.time(), args.messages, args.groups
    encoder = protocol.Encoder("u-bench", "bench", None)
    payload = orjson.dumps("x" * max(0, args.size - 2))
    plain, stored = [], []
    for i in range(n):
        target = Target(TargetKind.GROUPS, (f"g{i % groups}",))
        plain.append(encoder.encode(Send(target, payload, json=True), now))
        send = Send(target, payload, json=True, sid=new_send_id())
        positions = {f"group:g{i % groups}": ("e", i // groups + 1)}
        stored.append(attach_positions(encoder.encode(send, now), positions))

    def run(messages: list[bytes], position: bool) -> float:
        receiver = Receiver(secret=None, namespace="bench", max_message=1 << 20)
        positioning = Positioning()
        for g in range(groups):
            positioning.begin(f"group:g{g}")
            positioning.ready(f"group:g{g}", "e", 0)
        start = time.perf_counter()
        for k in range(0, n, args.batch):
            for command in receiver.take(messages[k : k + args.batch], now):
                if position:
                    assert isinstance(command, Send)
                    positioning.offer(command)
        return (time.perf_counter() - start) / n * 1e6

    for r in range(args.repeat):
        print(
            f"round {r + 1}: per message, plain decoded {run(plain, False):.2f} us; stored decoded "
            f"{run(stored, False):.2f} us, decoded and positioned {run(stored, True):.2f} us"
        )
    positioning = Positioning()
    start = time.perf_counter()
    for i in range(args.streams):
        positioning.begin(f"flag:u{i}")
        positioning.ready(f"flag:u{i}", "e", 0)
    began = time.perf_counter() - start
    start = time.perf_counter()
    for i in range(args.streams):
        positioning.end(f"flag:u{i}")
    ended = time.perf_counter() - start
    print(f"{args.streams:,} streams begun and positioned in {began:.3f} s, ended in {ended:.3f} s")


# ---------------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="what", required=True)
    for name in ("history", "envelope"):
        p = sub.add_parser(name)
        p.add_argument("--nodes", type=int, default=2)
        p.add_argument("--clients", type=int, default=400, help="clients per set")
        p.add_argument("--groups", type=int, default=20)
        p.add_argument("--messages", type=int, default=10_000, help="sends of a flat / concurrent phase")
        p.add_argument("--concurrency", type=int, default=50)
        p.add_argument(
            "--matched-share",
            type=float,
            default=MATCHED,
            help="the matched phase's rate: this share of what the slower set reached flat out in the round",
        )
        p.add_argument("--rate", type=float, default=200, help="sends per second of the paced phase")
        p.add_argument("--seconds", type=float, default=5, help="length of the paced phase")
        p.add_argument("--size", type=int, default=100)
        p.add_argument("--repeat", type=int, default=7)
        p.add_argument("--processes", type=int, default=2, help="load-generator processes")
        p.add_argument(
            "--profile",
            help="py-spy record the first node of each cluster into PROFILE.<cluster>.txt"
            if name == "history"
            else "py-spy record every node into PROFILE.node<i>.txt",
        )
        p.add_argument(
            "--phases",
            type=phase_list,
            default=list(PHASES),
            help=f"which phases to run (default: {','.join(PHASES)})",
        )
        p.add_argument(
            "--compression", type=int, choices=[0, 1], default=1, help="the nodes' FANOUT_COMPRESSION"
        )
        p.add_argument(
            "--pin",
            action="store_true",
            help="nodes and load generators on one CPU, the publisher and Redis on the other",
        )
        p.add_argument(
            "--side-by-side",
            action="store_true",
            help="2 nodes: raw clients on one, v1 clients on the other, in the same groups"
            if name == "envelope"
            else "1 cluster of 2 nodes: plain groups on one, history groups on the other, sends alternating",
        )
        if name == "envelope":
            p.add_argument(
                "--control",
                action="store_true",
                help="with --side-by-side: raw clients on both nodes (the ratio shows the method's own bias)",
            )
    s = sub.add_parser("storm")
    s.add_argument("--clients", type=int, default=10_000)
    s.add_argument("--processes", type=int, default=4, help="load-generator processes")
    s.add_argument("--groups", type=int, default=100)
    s.add_argument("--rate", type=float, default=20, help="sends per second during the storm")
    s.add_argument("--accept-rate", type=float, default=500, help="FANOUT_ACCEPT_RATE of B and C")
    s.add_argument("--backoff", type=float, nargs=2, default=(0.1, 5.0), help="the clients' (base, cap)")
    s.add_argument("--warmup", type=float, default=2.0, help="seconds of sends before the kill")
    s.add_argument("--after", type=float, default=2.0, help="seconds of sends after all are back")
    s.add_argument("--timeout", type=float, default=180.0)
    s.add_argument("--rounds", type=int, default=1, help="storms with and without recovery, alternating")
    s.add_argument("--profile", help="py-spy record node B during the storm into PROFILE.storm-<kind>-B.txt")
    r = sub.add_parser("receive", help="the node's receive side alone: decoding and positioning")
    r.add_argument("--messages", type=int, default=20_000)
    r.add_argument("--groups", type=int, default=20)
    r.add_argument("--size", type=int, default=100)
    r.add_argument("--batch", type=int, default=200)
    r.add_argument("--streams", type=int, default=10_000)
    r.add_argument("--repeat", type=int, default=3)
    t = sub.add_parser("top", help="the top frames of --profile files (of two: what grew)")
    t.add_argument("files", nargs="+")
    t.add_argument("--top", type=int, default=25)
    t.add_argument("--lines", action="store_true", help="by line, not by function")
    args = parser.parse_args()
    if args.what == "top":
        print_profiles(args.files, args.top, args.lines)
        return
    if args.what == "receive":
        bench_receive(args)
        return
    atexit.register(_end_everything)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    print(f"# {time.strftime('%Y-%m-%d')} on {machine()}, commit {commit.stdout.strip()}", flush=True)
    run: Callable[[argparse.Namespace], Awaitable[None]] = {
        "history": bench_history,
        "envelope": bench_envelope,
        "storm": bench_storm,
    }[args.what]
    try:
        import uvloop
    except ImportError:
        asyncio.run(run(args))
    else:
        uvloop.run(run(args))


if __name__ == "__main__":
    main()
