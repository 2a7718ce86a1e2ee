"""The Redis backend's own pub/sub connection (fanout/backends/redis_subscriber.py): what a real server
sends it, frames cut anywhere, a refused AUTH, a lost server, and reading paused while frames pile up."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from redis.exceptions import AuthenticationError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError

from fanout.backends import redis_subscriber
from fanout.backends.redis_publisher import pack
from fanout.backends.redis_subscriber import SubscribeConnection
from tests.support.redis_servers import start_redis
from tests.test_redis_publisher import Sink

PAYLOADS = [
    b"",
    b"plain",
    b"a\r\nb\r\n",
    b"*3\r\n$7\r\nmessage\r\n$1\r\nx\r\n$1\r\ny\r\n",  # a frame inside a payload is a payload
    bytes(range(256)),
    b"x" * (1 << 20),  # over many reads
]


async def subscriber(port: int = 6379, userinfo: str = "") -> SubscribeConnection:
    conn = SubscribeConnection("127.0.0.1", port, userinfo=userinfo, client_name="fanout-test-sub")
    await conn.connect()
    return conn


async def test_every_frame_a_server_sends_comes_out_whole_and_in_order() -> None:
    channel = f"t{uuid.uuid4().hex[:10]}:sub".encode()
    shard_channel = channel + b":shard"
    conn = await subscriber()
    client = aioredis.Redis()
    try:
        await conn.send(b"SUBSCRIBE", channel)
        await conn.send(b"SSUBSCRIBE", shard_channel)
        assert await conn.read() == [b"subscribe", channel, 1]
        assert await conn.read() == [b"ssubscribe", shard_channel, 1]
        pipe = client.pipeline(transaction=False)
        for payload in PAYLOADS:
            pipe.publish(channel, payload)
        for n in range(2000):  # many frames in one read
            pipe.publish(channel, b"%d" % n)
        pipe.execute_command("SPUBLISH", shard_channel, b"sharded\r\n")
        assert await pipe.execute() == [1] * (len(PAYLOADS) + 2001)
        for payload in PAYLOADS:
            assert await conn.read() == [b"message", channel, payload]
        for n in range(2000):
            assert await conn.read() == [b"message", channel, b"%d" % n]
        assert await conn.read() == [b"smessage", shard_channel, b"sharded\r\n"]
        await conn.send(b"PING")
        assert await conn.read() == [b"pong", b""]
        await conn.send(b"SUBSCRIBE")  # no channel: an error reply, raised as redis-py does
        with pytest.raises(ResponseError, match="wrong number of arguments"):
            await conn.read()
        await conn.send(b"UNSUBSCRIBE", channel)
        assert await conn.read() == [b"unsubscribe", channel, 0]  # (shard channels are counted apart)
    finally:
        await conn.disconnect()
        await client.aclose()
    assert not conn.is_connected
    with pytest.raises(RedisConnectionError):
        await conn.send(b"PING")


async def test_frames_cut_at_every_byte_are_parsed_the_same() -> None:
    frames = [
        [b"subscribe", b"ns:c", 1],
        [b"message", b"ns:c", b"a\r\nb"],
        [b"message", b"ns:c", b""],
        [b"smessage", b"ns:s", b"\x00\xff"],
        [b"pong", b""],
    ]
    stream = b"".join(pack(*(str(i).encode() if isinstance(i, int) else i for i in f)) for f in frames)
    # the integer of a confirmation is an integer reply, not a bulk string
    stream = stream.replace(b"$1\r\n1\r\n", b":1\r\n", 1) + b"-ERR wrong\r\n"
    conn = SubscribeConnection("127.0.0.1", 0, userinfo="", client_name="t")
    conn.connection_made(Sink())  # type: ignore[arg-type]
    for i in range(len(stream)):
        conn.data_received(stream[i : i + 1])
    assert [await conn.read() for _ in frames] == frames
    with pytest.raises(ResponseError, match="ERR wrong"):
        await conn.read()


async def test_a_refused_password_raises_authentication_error(tmp_path: Path) -> None:
    redis = start_redis(tmp_path / "auth", "--requirepass", "s3cret")
    try:
        with pytest.raises(AuthenticationError):
            await subscriber(redis.port, ":wrong@")
        conn = await subscriber(redis.port, ":s3cret@")
        await conn.send(b"PING")
        assert await conn.read() == b"PONG"  # (not subscribed yet: a simple string)
        await conn.disconnect()
    finally:
        redis.stop()


async def test_frames_that_arrived_come_out_before_the_loss_of_the_server(tmp_path: Path) -> None:
    redis = start_redis(tmp_path / "lost")
    conn = await subscriber(redis.port)
    client = aioredis.Redis(port=redis.port)
    try:
        await conn.send(b"SUBSCRIBE", b"c")
        assert await conn.read() == [b"subscribe", b"c", 1]
        await client.publish(b"c", b"last words")
        await asyncio.sleep(0.2)  # it arrived and was parsed; nobody read it yet
        redis.kill()
        await asyncio.sleep(0.2)
        assert not conn.is_connected
        assert await conn.read() == [b"message", b"c", b"last words"]
        with pytest.raises(RedisConnectionError, match="lost"):
            await conn.read()
    finally:
        await client.aclose()
        redis.stop()


async def test_reading_pauses_while_frames_pile_up_and_resumes_as_they_are_read(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(redis_subscriber, "PAUSE_AT", 50)
    monkeypatch.setattr(redis_subscriber, "RESUME_AT", 10)
    channel = f"t{uuid.uuid4().hex[:10]}:pile".encode()
    conn = await subscriber()
    client = aioredis.Redis()
    try:
        await conn.send(b"SUBSCRIBE", channel)
        assert await conn.read() == [b"subscribe", channel, 1]
        pipe = client.pipeline(transaction=False)
        for n in range(5000):
            pipe.publish(channel, b"%d" % n)
        await pipe.execute()
        await asyncio.sleep(0.3)
        assert conn._transport is not None and not conn._transport.is_reading()
        assert 50 <= len(conn._frames) < 5000  # the rest waits in the socket and in Redis
        got = [await conn.read() for _ in range(5000)]
        assert got == [[b"message", channel, b"%d" % n] for n in range(5000)]
        assert conn._transport.is_reading()
    finally:
        await conn.disconnect()
        await client.aclose()
