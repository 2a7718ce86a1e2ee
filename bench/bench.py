"""fanout benchmarks. Results go to docs/benchmarks.md, with the command, the machine and the date.

    python bench/bench.py publish  --url redis://127.0.0.1:6379/0 --count 20000
    python bench/bench.py bulk     --url redis://127.0.0.1:6379/0 --nodes 3 --clients 30 --pairs 10000
    python bench/bench.py memory   --url redis://127.0.0.1:6379/0 --connections 10000
    python bench/bench.py delivery --url redis://127.0.0.1:6379/0 --nodes 2 --clients 400 --messages 200

``publish``: ServerUtil publish rate, awaited one by one and with many concurrent callers (what the
backend's pipelining buys). One idle node runs in the namespace (a send into a namespace with no live node
raises NoLiveNodes); the group sent to has no member. ``--history``: the same again to a group in
``FANOUT_HISTORY`` (each send appended to its stream and published by one script), in the same run.

``bulk``: ``send_bulk`` of ``--pairs`` (client id, payload) pairs to ``--clients`` connections spread over
``--nodes`` node processes; reports the call's time (encoding and publishing) and the time until every
connection has all its payloads, checked in order, median of ``--repeat`` rounds.

``memory``: one node process, ``--connections`` idle websocket connections (all in the lobby group,
as a chat would have them); node RSS growth per connection, measured after a warm-up of 200
connections so that one-time allocations do not count.

``delivery``: real node processes, real websocket clients (in this process), ServerUtil broadcasting to a
group that every client joined. Reports frames delivered per second across all clients, the latency from
publish to receipt (the payload carries the send time; CLOCK_MONOTONIC is shared by processes), and node
memory per connection.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import orjson  # noqa: E402

from fanout import ServerUtil  # noqa: E402
from node.frames import encode_frame  # noqa: E402
from tests.support.nodes import client, metrics, start_node, unique_namespace  # noqa: E402
from tests.support.redis_servers import start_cluster  # noqa: E402


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (from /proc)."""
    user, system = cpu_split(pid)
    return user + system


def cpu_split(pid: int) -> tuple[float, float]:
    """User and system (kernel) CPU time of a process so far, seconds (from /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def machine() -> str:
    cpu = "unknown cpu"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    return f"{os.cpu_count()} cores ({cpu}), Python {platform.python_version()}, {platform.system()}"


def _node_env(url: str, mode: str, **extra: str) -> dict[str, str]:
    """A benchmark node's settings: a fresh namespace, the control app, quiet logs, then ``extra``."""
    return {
        "FANOUT_URL": url,
        "FANOUT_MODE": mode,
        "FANOUT_NAMESPACE": unique_namespace("bench"),
        "FANOUT_APP": "tests.apps.control:app",
        "FANOUT_LOG_LEVEL": "WARNING",
        **extra,
    }


#: the group the ``--history`` runs send to: the one target of FANOUT_HISTORY
HISTORY_GROUP = "bench-history"


async def bench_publish(
    url: str, count: int, concurrency: int, size: int, history: bool = False, repeat: int = 1
) -> None:
    payload = "x" * size
    extra = {"FANOUT_HISTORY": f"group:{HISTORY_GROUP}"} if history else {}
    env = _node_env(url, "routing", **extra)
    with tempfile.TemporaryDirectory() as tmp:
        node = start_node(Path(tmp), env)
        try:
            options = {"history": extra["FANOUT_HISTORY"]} if history else {}
            async with ServerUtil(url, namespace=env["FANOUT_NAMESPACE"], **options) as util:
                await util.check_cluster()
                if not history:
                    plain = await _publish_rates(util, "bench", count, concurrency, payload)
                    _report(url, "plain sends", len(payload), concurrency, plain)
                    return
                # alternate plain and history rounds, so that both see the same machine; medians
                plains, storeds = [], []
                for _ in range(repeat):
                    plains.append(await _publish_rates(util, "bench", count, concurrency, payload))
                    storeds.append(await _publish_rates(util, HISTORY_GROUP, count, concurrency, payload))
                plain = _medians(plains)
                stored = _medians(storeds)
                _report(url, f"plain sends (median of {repeat})", len(payload), concurrency, plain)
                what = f"history sends (FANOUT_HISTORY_SIZE {util.settings.history_size}, median of {repeat})"
                _report(url, what, len(payload), concurrency, stored)
                print(
                    f"history / plain: sequential {stored[0] / plain[0]:.2f}x, "
                    f"concurrent {stored[1] / plain[1]:.2f}x"
                )
                await util.remove_history(f"group:{HISTORY_GROUP}")
        finally:
            node.terminate()


def _medians(rates: list[tuple[float, float]]) -> tuple[float, float]:
    return statistics.median(r[0] for r in rates), statistics.median(r[1] for r in rates)


def _report(url: str, what: str, size: int, concurrency: int, rates: tuple[float, float]) -> None:
    print(
        f"publish {url.split('://')[0]}: {what}, {size}-byte, sequential {rates[0]:,.0f}/s, "
        f"{concurrency} concurrent callers {rates[1]:,.0f}/s"
    )


async def _publish_rates(
    util: ServerUtil, group: str, count: int, concurrency: int, payload: str
) -> tuple[float, float]:
    """Sends per second to ``group``, awaited one by one, then from ``concurrency`` concurrent callers."""
    start = time.perf_counter()
    for _ in range(count):
        await util.send_to_group(group, payload)
    sequential = count / (time.perf_counter() - start)

    async def worker(n: int) -> None:
        for _ in range(n):
            await util.send_to_group(group, payload)

    start = time.perf_counter()
    await asyncio.gather(*(worker(count // concurrency) for _ in range(concurrency)))
    concurrent = (count // concurrency * concurrency) / (time.perf_counter() - start)
    return sequential, concurrent


async def bench_delivery(
    url: str,
    mode: str,
    nodes: int,
    clients: int,
    messages: int,
    size: int,
    rate: float,
    loop: str,
    write_delay: float,
    compression: bool,
    json: bool,
) -> None:
    env = _node_env(
        url,
        mode,
        FANOUT_EVENT_LOOP=loop,
        FANOUT_WRITE_DELAY=str(write_delay),
        FANOUT_COMPRESSION="1" if compression else "0",
    )
    namespace = env["FANOUT_NAMESPACE"]
    with tempfile.TemporaryDirectory() as tmp:
        procs = [start_node(Path(tmp), {**env, "FANOUT_NODE_ID": f"bench{i}"}) for i in range(nodes)]
        try:
            rss_empty = sum(p.rss_kib() for p in procs)
            conns = [await client(procs[i % nodes].port) for i in range(clients)]
            await asyncio.sleep(0.5)
            rss_full = sum(p.rss_kib() for p in procs)
            async with ServerUtil(url, mode=mode, namespace=namespace) as util:
                for _, cid in conns:
                    await util.join_group(cid, "room")
                latencies: list[float] = []

                async def reader(ws: object) -> None:
                    for _ in range(messages):
                        frame = await ws.recv()  # type: ignore[attr-defined]
                        latencies.append(time.monotonic() - float(frame[:20]))

                readers = [asyncio.create_task(reader(ws)) for ws, _ in conns]
                pad = json_document(size - 21) if json else "x" * max(0, size - 21)
                cpu_before = sum(cpu_seconds(p.pid) for p in procs)
                start = time.perf_counter()
                for i in range(messages):
                    await util.send_to_group("room", f"{time.monotonic():<20.6f} {pad}")
                    if rate:
                        await asyncio.sleep(max(0.0, start + (i + 1) / rate - time.perf_counter()))
                await asyncio.wait_for(asyncio.gather(*readers), 120)
                elapsed = time.perf_counter() - start
                node_cpu = sum(cpu_seconds(p.pid) for p in procs) - cpu_before
            counts = [await metrics(p.port) for p in procs]
            writes = sum(c["fanout_delivery_writes_total"] for c in counts)
            frames = sum(c["fanout_frames_sent_total"] for c in counts)
            batches = sum(c["fanout_bus_batches_total"] for c in counts)
            commands = sum(c["fanout_bus_batch_commands_total"] for c in counts)
            for ws, _ in conns:
                await ws.close()
        finally:
            for p in procs:
                p.terminate()
    delivered = clients * messages
    latencies.sort()
    p50 = statistics.median(latencies) * 1000
    p99 = latencies[int(len(latencies) * 0.99) - 1] * 1000
    print(
        f"delivery {url.split('://')[0]} {mode} ({loop} loop, write delay {write_delay * 1000:g} ms): "
        f"{nodes} nodes, {clients} clients, "
        f"{messages} x {size} B "
        f"{'JSON ' if json else ''}group sends{f' at {rate:g}/s' if rate else ''}, "
        f"compression {'on' if compression else 'off'} ({_frame_sizes(size, json, compression)}): "
        f"{delivered:,} frames in {elapsed:.2f}s = "
        f"{delivered / elapsed:,.0f} frames/s; latency p50 {p50:.1f} ms, p99 {p99:.1f} ms; "
        f"node CPU {node_cpu / delivered * 1e6:.2f} us per frame; "
        f"node memory {(rss_full - rss_empty) / clients:.1f} KiB per connection; "
        f"coalescing: {frames / max(writes, 1):.1f} frames per write, "
        f"{commands / max(batches, 1):.1f} bus commands per batch"
    )


def json_document(size: int) -> str:
    """A JSON document of ``size`` characters: chat messages, as a push carries them."""
    items: list[dict[str, object]] = []
    while len(orjson.dumps(items)) < size - 80:
        n = len(items)
        items.append({"id": 1000 + n, "user": f"user{n * 7 % 13}", "text": f"message {n} in the room"})
    text = orjson.dumps(items).decode()
    return text[:-2] + ',"pad":"' + "y" * max(0, size - len(text) - 9) + '"}]'


def _frame_sizes(size: int, json: bool, compression: bool) -> str:
    """Bytes of one frame on the wire, as the node sends it (plain, or its permessage-deflate variant)."""
    payload = (
        f"{time.monotonic():<20.6f} " + (json_document(size - 21) if json else "x" * (size - 21))
    ).encode()
    frame = encode_frame(payload)
    return f"{len(frame)} B frames" + (f", {len(frame.deflated(15))} B deflated" if compression else "")


async def bench_bulk(
    url: str, mode: str, nodes: int, clients: int, pairs: int, size: int, repeat: int
) -> None:
    env = _node_env(url, mode)
    namespace = env["FANOUT_NAMESPACE"]
    calls: list[float] = []
    totals: list[float] = []
    cpus: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        procs = [start_node(Path(tmp), {**env, "FANOUT_NODE_ID": f"bulk{i}"}) for i in range(nodes)]
        try:
            conns = [await client(procs[i % nodes].port) for i in range(clients)]
            async with ServerUtil(url, mode=mode, namespace=namespace) as util:
                await util.check_cluster()
                pad = "x" * max(0, size - 12)
                for _ in range(repeat):
                    batch = [(conns[i % clients][1], f"{i // clients:>10} {pad}") for i in range(pairs)]
                    expected = {cid: [data for c, data in batch if c == cid] for _, cid in conns}

                    async def reader(ws: object, want: list[str]) -> None:
                        got = [await ws.recv() for _ in want]  # type: ignore[attr-defined]
                        assert got == want, "payloads out of order or not this connection's"

                    readers = [asyncio.create_task(reader(ws, expected[cid])) for ws, cid in conns]
                    cpu_before = sum(cpu_seconds(p.pid) for p in procs)
                    start = time.perf_counter()
                    await util.send_bulk(batch)
                    calls.append(time.perf_counter() - start)
                    await asyncio.wait_for(asyncio.gather(*readers), 120)
                    totals.append(time.perf_counter() - start)
                    cpus.append(sum(cpu_seconds(p.pid) for p in procs) - cpu_before)
            for ws, _ in conns:
                await ws.close()
        finally:
            for p in procs:
                p.terminate()
    print(
        f"bulk {url.split('://')[0]} {mode}: {pairs:,} pairs x {size} B to {clients} connections on {nodes} "
        f"nodes, median of {repeat}: send_bulk call {statistics.median(calls) * 1000:.1f} ms, "
        f"all received in order {statistics.median(totals) * 1000:.1f} ms "
        f"(rounds: {', '.join(f'{t * 1000:.0f}' for t in totals)} ms); "
        f"node CPU {statistics.median(cpus) / pairs * 1e6:.2f} us per payload"
    )


async def bench_memory(url: str, connections: int, loop: str) -> None:
    from websockets.asyncio.client import connect

    # the lobby app (every guest joins "lobby"), as a chat would have its idle connections
    env = _node_env(
        url, "routing", FANOUT_APP="tests.apps.lobby:app", FANOUT_ACCEPT_RATE="0", FANOUT_EVENT_LOOP=loop
    )
    with tempfile.TemporaryDirectory() as tmp:
        node = start_node(Path(tmp), env)  # tests.apps.lobby: every guest joins "lobby"
        try:
            sockets = []

            async def open_some(count: int) -> None:
                for start in range(0, count, 200):
                    batch = [
                        connect(f"ws://127.0.0.1:{node.port}/", ping_interval=None)
                        for _ in range(min(200, count - start))
                    ]
                    sockets.extend(await asyncio.gather(*batch))
                    await asyncio.gather(*(ws.recv() for ws in sockets[-len(batch) :]))  # the welcome

            await open_some(200)
            await asyncio.sleep(1)
            before = node.rss_kib()
            await open_some(connections)
            await asyncio.sleep(2)
            after = node.rss_kib()
            for ws in sockets:
                await ws.close()
        finally:
            node.terminate()
    print(
        f"memory {url.split('://')[0]} ({loop} loop): {connections:,} idle connections: "
        f"node RSS {before / 1024:.1f} -> {after / 1024:.1f} MiB = "
        f"{(after - before) / connections:.2f} KiB per connection"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser("publish")
    p.add_argument("--url", default="redis://127.0.0.1:6379/0")
    p.add_argument("--count", type=int, default=20000)
    p.add_argument("--concurrency", type=int, default=100)
    p.add_argument("--size", type=int, default=100)
    p.add_argument(
        "--history",
        action="store_true",
        help="also send to a group with history (FANOUT_HISTORY) and report both rates and their ratio",
    )
    p.add_argument("--repeat", type=int, default=3, help="with --history: alternating rounds of each")
    d = sub.add_parser("delivery")
    d.add_argument("--url", default="redis://127.0.0.1:6379/0")
    d.add_argument("--mode", default="routing")
    d.add_argument("--nodes", type=int, default=2)
    d.add_argument("--clients", type=int, default=400)
    d.add_argument("--messages", type=int, default=200)
    d.add_argument("--size", type=int, default=100)
    d.add_argument("--rate", type=float, default=0, help="sends per second (0: as fast as possible)")
    d.add_argument(
        "--loop", default="auto", choices=["auto", "uvloop", "asyncio"], help="the nodes' event loop"
    )
    b = sub.add_parser("bulk")
    b.add_argument("--url", default="redis://127.0.0.1:6379/0")
    b.add_argument("--mode", default="routing")
    b.add_argument("--nodes", type=int, default=3)
    b.add_argument("--clients", type=int, default=30)
    b.add_argument("--pairs", type=int, default=10_000)
    b.add_argument("--size", type=int, default=32)
    b.add_argument("--repeat", type=int, default=3)
    d.add_argument("--write-delay", type=float, default=0.0, help="the nodes' FANOUT_WRITE_DELAY, seconds")
    d.add_argument("--compression", type=int, choices=[0, 1], default=1, help="the nodes' FANOUT_COMPRESSION")
    d.add_argument("--json", action="store_true", help="payloads: JSON chat messages instead of x's")
    m = sub.add_parser("memory")
    m.add_argument("--url", default="redis://127.0.0.1:6379/0")
    m.add_argument("--connections", type=int, default=10_000)
    m.add_argument(
        "--loop", default="auto", choices=["auto", "uvloop", "asyncio"], help="the node's event loop"
    )
    for sub_parser in (p, d, b, m):
        sub_parser.add_argument(
            "--local-cluster",
            action="store_true",
            help="start a local 3-master Redis Cluster and use it (ignores --url)",
        )
    args = parser.parse_args()
    if (
        args.what in ("publish", "delivery", "bulk", "memory")
        and args.url.startswith("memory:")
        and not args.local_cluster
    ):
        parser.error(
            f"{args.what} needs a broker: the nodes run in other processes, which memory:// cannot reach"
        )
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    print(f"# {time.strftime('%Y-%m-%d')} on {machine()}, commit {commit.stdout.strip()}")
    with contextlib.ExitStack() as stack:
        if args.local_cluster:
            cluster = start_cluster(Path(stack.enter_context(tempfile.TemporaryDirectory())))
            stack.callback(cluster.stop)
            args.url = "redis+cluster://" + ",".join(f"127.0.0.1:{port}" for port in cluster.ports)
        run(args)


def run(args: argparse.Namespace) -> None:
    if args.what == "publish":
        asyncio.run(
            bench_publish(args.url, args.count, args.concurrency, args.size, args.history, args.repeat)
        )
    elif args.what == "memory":
        asyncio.run(bench_memory(args.url, args.connections, args.loop))
    elif args.what == "bulk":
        asyncio.run(
            bench_bulk(args.url, args.mode, args.nodes, args.clients, args.pairs, args.size, args.repeat)
        )
    else:
        asyncio.run(
            bench_delivery(
                args.url,
                args.mode,
                args.nodes,
                args.clients,
                args.messages,
                args.size,
                args.rate,
                args.loop,
                args.write_delay,
                bool(args.compression),
                args.json,
            )
        )


if __name__ == "__main__":
    main()
