"""A node's CPU per bus message read from Redis pub/sub or RabbitMQ (docs/benchmarks.md, "Reading the bus").

    python bench/bus_read.py --messages 50000 --size 180 --repeat 3 [--loop uvloop] [--url redis://127.0.0.1:6379/0]
        [--amqp amqp://guest:guest@127.0.0.1:5672/]

Subscribes to a channel of its own, then has a separate process publish ``--messages`` messages of
``--size`` bytes while this process's event loop is blocked, so that they all wait in the socket and in
Redis's output buffer (keep them under its ``client-output-buffer-limit pubsub``: 32 MB by default); then
reads them all and reports this process's CPU per message: through redis-py's ``Connection.read_response``
(what a node read the bus through before) and through fanout's own ``SubscribeConnection``.

With ``--amqp``, the same from RabbitMQ (a fanout exchange and queue of a namespace of its own, consumed
with ``no_ack``; the messages published by a separate process while this one's loop is blocked wait in the
socket and in the queue), up to the handler a node passes (here: one that counts): through aiormq's
consumer (what a node read the bus through before, and still does over TLS) and through the backend's
own ``ConsumeConnection``. Keep the publishing shorter than two heartbeats (20 s at the default 10 s): the
blocked loop sends none, and RabbitMQ closes a connection that missed two.
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

from aiormq.abc import DeliveredMessage
from redis.asyncio.connection import Connection

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.bench import machine  # noqa: E402
from fanout.backends.amqp import AmqpBackend  # noqa: E402
from fanout.backends.redis_subscriber import SubscribeConnection  # noqa: E402
from fanout.config import Mode, Settings  # noqa: E402
from fanout.naming import ALL  # noqa: E402

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


PUBLISH_AMQP = """
import asyncio, sys
from fanout.backends.amqp import AmqpBackend
from fanout.config import Mode, Settings
from fanout.naming import ALL
url, namespace, count, size = sys.argv[1:]

async def main():
    backend = AmqpBackend(Settings.create(url, namespace=namespace, mode=Mode.FANOUT), inbox="publisher")
    await backend.connect(lambda _: None)
    body, left = b"x" * int(size), int(count)
    while left:
        n = min(left, 1000)
        await backend.publish_many([(ALL, body)] * n)
        left -= n
    await backend.close()

asyncio.run(main())
"""


def publish_amqp_while_blocked(url: str, namespace: str, count: int, size: int) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    args = [url, namespace, str(count), str(size)]
    subprocess.run([sys.executable, "-c", PUBLISH_AMQP, *args], check=True, env=env)


async def through_amqp(url: str, count: int, size: int, aiormq_only: bool) -> float:
    """CPU per message through AmqpBackend (its own consuming connection), or (``aiormq_only``) through
    aiormq's consumer as the backend used it before (and still does over TLS)."""
    namespace = f"bench-read-{os.getpid()}-{time.monotonic_ns()}"
    settings = Settings.create(url, namespace=namespace, mode=Mode.FANOUT)
    got, done = 0, asyncio.Event()

    def counted(message: bytes) -> None:
        nonlocal got
        got += 1
        if got == count:
            done.set()

    backend = AmqpBackend(settings, inbox="reader")
    await backend.connect(counted)
    queue = f"{namespace}.aiormq"
    if aiormq_only:  # a queue of its own on the backend's aiormq channel, consumed there
        channel = await backend._usable_channel()
        channel.frames._maxsize = 0  # type: ignore[attr-defined]  # (as the backend does)
        await channel.queue_declare(queue, exclusive=True, auto_delete=True)
        await channel.queue_bind(queue, namespace, "")

        async def delivered(message: DeliveredMessage) -> None:
            counted(message.body)

        await channel.basic_consume(queue, delivered, no_ack=True)
    else:
        await backend.subscribe([ALL])
    try:
        publish_amqp_while_blocked(url, namespace, count, size)
        started = time.process_time()
        await done.wait()
        cpu = time.process_time() - started
    finally:
        await backend.close()
        await delete_exchanges(url, namespace)
    return cpu / count


async def delete_exchanges(url: str, namespace: str) -> None:
    """The namespace's (non-durable) exchanges, which outlive the queue."""
    import aio_pika

    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        for exchange in (namespace, f"{namespace}.ctl"):
            await channel.exchange_delete(exchange)


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
        if args.amqp:
            theirs = await through_amqp(args.amqp, args.messages, args.size, aiormq_only=True)
            ours = await through_amqp(args.amqp, args.messages, args.size, aiormq_only=False)
            print(
                f"round {round_}: RabbitMQ through aiormq's consumer {theirs * 1e6:.2f} us/message, "
                f"ConsumeConnection {ours * 1e6:.2f} us/message ({theirs / ours:.1f}x less)"
            )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--amqp", default=None, help="also read through AmqpBackend from this broker")
    parser.add_argument("--messages", type=int, default=50_000)
    parser.add_argument("--size", type=int, default=180)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio")
    arguments = parser.parse_args()
    if arguments.loop == "uvloop":
        import uvloop

        uvloop.install()
    asyncio.run(main(arguments))
