"""A node's CPU per bus message read from Redis pub/sub (docs/benchmarks.md, "Reading the bus").

    python bench/bus_read.py --messages 50000 --size 180 --repeat 3 [--loop uvloop] [--url redis://127.0.0.1:6379/0]

Subscribes to a channel of its own, then has a separate process publish ``--messages`` messages of
``--size`` bytes while this process's event loop is blocked, so that they all wait in the socket and in
Redis's output buffer (keep them under its ``client-output-buffer-limit pubsub``: 32 MB by default); then
reads them all and reports this process's CPU per message: through redis-py's ``Connection.read_response``
(what a node read the bus through before) and through fanout's own ``SubscribeConnection``.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

from redis.asyncio.connection import Connection

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.bench import machine  # noqa: E402
from fanout.backends.redis_subscriber import SubscribeConnection  # noqa: E402

PUBLISH = """
import sys, redis
host, port, channel, count, size = sys.argv[1:]
pipe = redis.Redis(host=host, port=int(port)).pipeline(transaction=False)
for n in range(int(count)):
    pipe.publish(channel, b"x" * int(size))
    if len(pipe) >= 1000:
        pipe.execute()
pipe.execute()
"""


def publish_while_blocked(host: str, port: int, channel: bytes, count: int, size: int) -> None:
    args = [host, str(port), channel.decode(), str(count), str(size)]
    subprocess.run([sys.executable, "-c", PUBLISH, *args], check=True)


async def through_redis_py(host: str, port: int, count: int, size: int) -> float:
    channel = b"fanout-bench-read-%d" % os.getpid()
    conn = Connection(host=host, port=port, protocol=2)
    await conn.connect()  # type: ignore[no-untyped-call]
    await conn.send_packed_command(conn.pack_command(b"SUBSCRIBE", channel), check_health=False)
    await conn.read_response()
    publish_while_blocked(host, port, channel, count, size)
    started = time.process_time()
    for _ in range(count):
        frame = await conn.read_response(timeout=math.inf)
    cpu = time.process_time() - started
    assert frame[0] == b"message" and len(frame[2]) == size
    await conn.disconnect()
    return cpu / count


async def through_our_own(host: str, port: int, count: int, size: int) -> float:
    channel = b"fanout-bench-read-%d" % os.getpid()
    conn = SubscribeConnection(host, port, userinfo="", client_name="fanout-bench-read")
    await conn.connect()
    await conn.send(b"SUBSCRIBE", channel)
    await conn.read()
    publish_while_blocked(host, port, channel, count, size)
    started = time.process_time()
    for _ in range(count):
        frame = await conn.read()
    cpu = time.process_time() - started
    assert frame[0] == b"message" and len(frame[2]) == size
    await conn.disconnect()
    return cpu / count


async def main(args: argparse.Namespace) -> None:
    url = urlsplit(args.url)
    host, port = url.hostname or "127.0.0.1", url.port or 6379
    print(f"# {time.strftime('%Y-%m-%d')} on {machine()}; {args.messages} messages of {args.size} bytes")
    print(f"# event loop: {args.loop}")
    for round_ in range(1, args.repeat + 1):
        theirs = await through_redis_py(host, port, args.messages, args.size)
        ours = await through_our_own(host, port, args.messages, args.size)
        print(
            f"round {round_}: redis-py read_response {theirs * 1e6:.2f} us/message, "
            f"SubscribeConnection {ours * 1e6:.2f} us/message ({theirs / ours:.1f}x less)"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--messages", type=int, default=50_000)
    parser.add_argument("--size", type=int, default=180)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio")
    arguments = parser.parse_args()
    if arguments.loop == "uvloop":
        import uvloop

        uvloop.install()
    asyncio.run(main(arguments))
