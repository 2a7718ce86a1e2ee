"""Redis memory per history stream and per entry (docs/continuity.md, "Sizing").

    python bench/history_memory.py [--streams 200] [--sizes 100,1000] [--payloads 100,1000]

Starts its own redis-server (nothing on disk), fills ``--streams`` streams to each FANOUT_HISTORY_SIZE of
``--sizes`` with payloads of each size of ``--payloads`` through the continuity store (one script per send,
as ServerUtil does), and reports Redis's ``used_memory`` growth per full stream and per entry.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import redis  # noqa: E402

from fanout import Settings  # noqa: E402
from fanout.backends.store import StoredSend  # noqa: E402
from fanout.backends.store_redis import RedisStore  # noqa: E402
from fanout.history import new_send_id  # noqa: E402
from tests.support.redis_servers import start_redis  # noqa: E402


async def fill(url: str, streams: int, size: int, payload: int) -> None:
    settings = Settings.create(url, history="group:*", history_size=size)
    store = RedisStore(settings, url=url, publishes=False)
    await store.connect()
    data = b"x" * payload
    try:
        for i in range(streams):
            for _ in range(size):
                await store.append([f"group:g{i}"], StoredSend(new_send_id(), data))
    finally:
        await store.close()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--streams", type=int, default=200)
    parser.add_argument("--sizes", default="100,1000")
    parser.add_argument("--payloads", default="100,1000")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as workdir:
        server = start_redis(Path(workdir))
        client = redis.Redis(port=server.port)
        try:
            print("| FANOUT_HISTORY_SIZE | payload | per full stream | per entry |")
            print("|---|---|---|---|")
            for size in map(int, args.sizes.split(",")):
                for payload in map(int, args.payloads.split(",")):
                    client.flushall()
                    before = int(client.info("memory")["used_memory"])
                    asyncio.run(fill(server.url, args.streams, size, payload))
                    used = int(client.info("memory")["used_memory"]) - before
                    per_stream = used / args.streams
                    print(
                        f"| {size} | {payload} B | {per_stream / 1024:.0f} KiB | {per_stream / size:.0f} B |"
                    )
        finally:
            client.close()
            server.stop()


if __name__ == "__main__":
    main()
