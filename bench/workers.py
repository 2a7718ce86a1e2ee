"""Worker tier benchmarks. Results go to docs/benchmarks.md, with the command, the machine and the date.

    python bench/workers.py throughput --url redis://127.0.0.1:6379/0 --events 50000 --workers 1
    python bench/workers.py echo --url redis://127.0.0.1:6379/0 --rate 1000 --seconds 10

``throughput``: a node forwards ``--events`` message events while no worker runs (they wait in the
broker), then ``--workers`` worker processes with an async no-op handler drain them; events/s is
events / drain time (from the workers' start until the last one is acknowledged, read from their
/metrics), so the node's side does not count. Worker CPU is reported too, and the node's CPU per event
while it took them from the clients and handed them to the broker (the load generator shares the machine).

``echo``: clients send messages at a steady total ``--rate``; one worker sends each back to its client
through ServerUtil; the client measures the round trip (client -> node -> broker -> worker -> broker ->
node -> client).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.bench import cpu_seconds, machine  # noqa: E402
from tests.support.nodes import NodeProcess, client, http_get, start_node, unique_namespace  # noqa: E402
from tests.support.workers import WorkerProcess, start_worker  # noqa: E402


class Noop:
    async def on_message(self, event: object) -> None:
        return None


class Echo:
    async def on_message(self, event: object) -> None:
        await event.util.send(event.client_id, event.data)  # type: ignore[attr-defined]


def _handled(workers: list[WorkerProcess]) -> float:
    total = 0.0
    for worker in workers:
        _, text = http_get(worker.port, "/metrics")
        for line in text.splitlines():
            if line.startswith("fanout_worker_events_handled_total"):
                total += float(line.split()[-1])
    return total


async def _cleanup(url: str, env: dict[str, str]) -> None:
    """Durable RabbitMQ queues outlive the run: delete this run's."""
    if url.startswith("amqp"):
        from tests.test_workers import delete_amqp_event_tier

        await delete_amqp_event_tier(env["FANOUT_NAMESPACE"], int(env.get("FANOUT_EVENT_SHARDS", "16")))


def _env(url: str, **extra: str) -> dict[str, str]:
    env = {
        "FANOUT_URL": url,
        "FANOUT_NAMESPACE": unique_namespace("bw"),
        "FANOUT_EVENTS": "message",
        "FANOUT_CLIENT_RATE": "0",
        "FANOUT_ACCEPT_RATE": "0",
        "FANOUT_LOG_LEVEL": "WARNING",
        **extra,
    }
    if url.startswith("amqp"):
        env.setdefault("FANOUT_EVENT_SHARDS", "4")
    return env


async def throughput(url: str, events: int, workers: int, clients: int) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="fanout-bench-"))
    env = _env(url, FANOUT_EVENTS_BACKLOG=str(events * 2))
    node = start_node(tmp, env, app="tests.apps.quiet:app")
    procs: list[NodeProcess] = [node]
    try:
        conns = [await client(node.port) for _ in range(clients)]
        per = events // clients
        node_cpu0, fill_started = cpu_seconds(node.pid), time.monotonic()
        for i in range(per):
            for ws, _ in conns:
                await ws.send(f"e{i}")
        # wait until the node handed every event to the broker
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            _, text = http_get(node.port, "/metrics")
            lines = text.splitlines()
            forwarded = sum(
                float(x.split()[-1]) for x in lines if x.startswith("fanout_events_forwarded_total")
            )
            if forwarded >= per * clients:
                break
            await asyncio.sleep(0.2)
        filled = time.monotonic() - fill_started
        node_cpu = cpu_seconds(node.pid) - node_cpu0
        print(
            f"node: {per * clients} events taken and handed to the broker in {filled:.2f}s "
            f"(to within the 0.2 s poll), node CPU {node_cpu / (per * clients) * 1e6:.1f} us/event"
        )
        started = time.monotonic()
        tier = [start_worker(tmp, env, app="bench.workers:Noop", wait=False) for _ in range(workers)]
        procs += tier
        for worker in tier:
            worker.wait_ready(30)
        cpu0 = {w.pid: cpu_seconds(w.pid) for w in tier}
        total = per * clients
        first: tuple[float, float] | None = None  # (time, handled) once handling is under way
        while (handled := _handled(tier)) < total:
            if first is None and handled >= total * 0.05:
                first = (time.monotonic(), handled)
            await asyncio.sleep(0.02)
        done = time.monotonic()
        took = done - started
        cpu = sum(cpu_seconds(w.pid) - cpu0[w.pid] for w in tier)
        steady = (total - first[1]) / (done - first[0]) if first else total / took
        print(
            f"throughput {url.split(':')[0]} workers={workers}: {total} events drained in {took:.2f}s "
            f"including start-up; {steady:,.0f} events/s once running; worker CPU {cpu:.2f}s "
            f"= {cpu / total * 1e6:.1f} us/event"
        )
        for ws, _ in conns:
            await ws.close()
    finally:
        for proc in procs:
            proc.kill()
        await _cleanup(url, env)


async def echo(url: str, rate: float, seconds: float, clients: int) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="fanout-bench-"))
    env = _env(url)
    node = start_node(tmp, env, app="tests.apps.quiet:app")
    worker = start_worker(tmp, env, app="bench.workers:Echo")
    try:
        await asyncio.sleep(2)  # the worker owns its shards
        conns = [await client(node.port) for _ in range(clients)]
        rtts: list[float] = []

        async def reader(ws: object) -> None:
            while True:
                data = await ws.recv()  # type: ignore[attr-defined]
                rtts.append(time.perf_counter() - float(data))

        readers = [asyncio.create_task(reader(ws)) for ws, _ in conns]
        # one message every 1/rate seconds, the clients in turn (not bursts: a burst would measure queueing)
        loop = asyncio.get_running_loop()
        start = loop.time()
        sent = 0
        while loop.time() - start < seconds:
            ws, _ = conns[sent % clients]
            await ws.send(repr(time.perf_counter()))
            sent += 1
            await asyncio.sleep(max(0.0, start + sent / rate - loop.time()))
        await asyncio.sleep(2)
        for task in readers:
            task.cancel()
        rtts.sort()
        p50 = rtts[len(rtts) // 2] * 1000
        p99 = rtts[int(len(rtts) * 0.99)] * 1000
        print(
            f"echo {url.split(':')[0]}: {sent} sent at {sent / seconds:,.0f}/s, {len(rtts)} echoed; "
            f"round trip p50 {p50:.2f} ms, p99 {p99:.2f} ms, mean {statistics.mean(rtts) * 1000:.2f} ms"
        )
        for ws, _ in conns:
            await ws.close()
    finally:
        worker.kill()
        node.kill()
        await _cleanup(url, env)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="what", required=True)
    t = sub.add_parser("throughput")
    t.add_argument("--url", default="redis://127.0.0.1:6379/0")
    t.add_argument("--events", type=int, default=50_000)
    t.add_argument("--workers", type=int, default=1)
    t.add_argument("--clients", type=int, default=100)
    e = sub.add_parser("echo")
    e.add_argument("--url", default="redis://127.0.0.1:6379/0")
    e.add_argument("--rate", type=float, default=1000)
    e.add_argument("--seconds", type=float, default=10)
    e.add_argument("--clients", type=int, default=50)
    args = parser.parse_args()
    print(f"machine: {machine()}; {time.strftime('%Y-%m-%d')}")
    if args.what == "throughput":
        asyncio.run(throughput(args.url, args.events, args.workers, args.clients))
    else:
        asyncio.run(echo(args.url, args.rate, args.seconds, args.clients))


if __name__ == "__main__":
    main()
