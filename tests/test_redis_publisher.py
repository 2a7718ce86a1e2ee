"""The Redis backend's own publishing connection: its reply parser, and what a real server says to it."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import pytest
from redis.exceptions import AuthenticationError, NoPermissionError, ResponseError

from fanout import Settings
from fanout.backends.redis import RedisBackend
from fanout.backends.redis_publisher import PublishConnection, pack, pack_publish
from fanout.exceptions import BackendError, BackendUnavailable
from fanout.naming import Address, Kind
from tests.support.redis_servers import start_redis


class Sink:
    """What a parser needs of a transport (here and in test_redis_subscriber: tests read what it parsed)."""

    def __init__(self) -> None:
        self.written: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def is_closing(self) -> bool:
        return False

    def close(self) -> None:
        pass

    def get_extra_info(self, name: str) -> None:
        return None


def test_packing_is_resp2() -> None:
    assert pack(b"CLIENT", b"SETNAME", b"x") == b"*3\r\n$6\r\nCLIENT\r\n$7\r\nSETNAME\r\n$1\r\nx\r\n"
    assert pack_publish(b"ns:all", b"a\r\nb") == pack(b"PUBLISH", b"ns:all", b"a\r\nb")


async def test_replies_split_anywhere_are_matched_to_their_commands_in_order() -> None:
    connection = PublishConnection()
    connection.connection_made(Sink())  # type: ignore[arg-type]
    futures = connection.send([pack_publish(b"c", b"m")] * 5)
    replies = b":3\r\n-NOPERM no permissions to access the 'c' channel\r\n$5\r\nhe\r\nl\r\n$-1\r\n+OK\r\n"
    for i in range(len(replies)):  # one byte at a time: every cut point
        connection.data_received(replies[i : i + 1])
    results = [f.result() for f in futures]
    assert results[0] == 3
    assert isinstance(results[1], NoPermissionError)
    assert results[2:] == [b"he\r\nl", None, b"OK"]


def test_error_replies_keep_redis_py_classes() -> None:
    from fanout.backends.redis_publisher import error_reply

    assert isinstance(error_reply("WRONGPASS invalid username-password pair"), AuthenticationError)
    assert isinstance(error_reply("NOAUTH Authentication required."), AuthenticationError)
    assert type(error_reply("ERR unknown command")) is ResponseError


async def test_a_lost_connection_fails_what_is_in_flight_and_the_next_publish_reconnects(
    tmp_path: Path,
) -> None:
    redis = start_redis(tmp_path / "redis")
    settings = Settings.create(redis.url, namespace=f"t{uuid.uuid4().hex[:10]}", publish_timeout=2.0)
    backend = RedisBackend(settings, inbox="pub")
    await backend.connect(lambda raw: None)
    try:
        address = Address(Kind.GROUP, "g")
        assert await backend.publish(address, b"first") == 0
        redis.kill()
        with pytest.raises(BackendUnavailable):
            await asyncio.gather(*(backend.publish(address, b"lost") for _ in range(50)))
        redis.restart()
        for _ in range(100):  # the subscriber side reconnects on its own; the publisher on demand
            try:
                assert await backend.publish(address, b"again") == 0
                break
            except BackendUnavailable:
                await asyncio.sleep(0.1)
        else:
            raise AssertionError("no publish went through after the restart")
    finally:
        await backend.close()
        redis.stop()


async def test_acl_users_and_refused_channels(tmp_path: Path) -> None:
    redis = start_redis(tmp_path / "acl")
    ns = f"t{uuid.uuid4().hex[:10]}"
    try:
        redis.cli("ACL", "SETUSER", "pub", "on", ">p%w", "~*", "+@all", "resetchannels", f"&{ns}:*")
        # the password is URL-encoded in the URL, as in any redis:// URL
        url = f"redis://pub:p%25w@127.0.0.1:{redis.port}/0"
        backend = RedisBackend(Settings.create(url, namespace=ns, publish_timeout=2.0), inbox="pub")
        await backend.connect(lambda raw: None)
        try:
            assert await backend.publish(Address(Kind.GROUP, "g"), b"allowed") == 0
        finally:
            await backend.close()
        # a user whose channels are all refused: the subscription is refused at connect
        redis.cli("ACL", "SETUSER", "mute", "on", ">m", "~*", "+@all", "resetchannels")
        mute = RedisBackend(
            Settings.create(f"redis://mute:m@127.0.0.1:{redis.port}/0", namespace=ns, publish_timeout=2.0),
            inbox="mute",
        )
        with pytest.raises(BackendError, match="refused"):
            await mute.connect(lambda raw: None)
        await mute.close()
        # PUBLISH itself refused, through our own connection
        connection = await PublishConnection.open(
            "127.0.0.1", redis.port, userinfo="mute:m@", client_name="t", timeout=2.0
        )
        (future,) = connection.send([pack_publish(f"{ns}:g:x".encode(), b"no")])
        assert isinstance(await future, NoPermissionError)
        connection.close()
        with pytest.raises(AuthenticationError):
            await PublishConnection.open(
                "127.0.0.1", redis.port, userinfo="pub:bad@", client_name="t", timeout=2.0
            )
    finally:
        redis.stop()
