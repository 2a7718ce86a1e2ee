"""The AMQP backend's consuming connection (fanout/backends/amqp_consumer.py) against the real RabbitMQ.

Messages are published with aio-pika (another client, on its own connection) to an exchange of the
test's own namespace; the connection under test declares, binds and consumes its exclusive queue.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

import aio_pika
import aiormq
import pytest
from yarl import URL

from fanout.backends.amqp_consumer import ConsumeConnection, Refused
from tests.support import scaled
from tests.support.recorder import eventually
from tests.support.tcp_proxy import TcpProxy

BROKER = URL("amqp://guest:guest@127.0.0.1:5672/?heartbeat=10")


class Consumer:
    """A ConsumeConnection with what it got and whether it was lost."""

    def __init__(self, url: URL = BROKER, handler: Callable[[bytes], None] | None = None) -> None:
        self.got: list[bytes] = []
        self.lost = 0
        self.conn = ConsumeConnection(
            url, handler or self.got.append, self._lost, name="fanout test consumer"
        )

    def _lost(self) -> None:
        self.lost += 1


@pytest.fixture
async def exchange() -> AsyncIterator[tuple[str, Callable[[str, bytes], Awaitable[None]]]]:
    """A direct exchange of the test's own, and ``publish(key, body)`` to it (aio-pika)."""
    name = "t" + uuid.uuid4().hex[:10]
    connection = await aio_pika.connect(str(BROKER))
    channel = await connection.channel()
    exchange = await channel.declare_exchange(name, aio_pika.ExchangeType.DIRECT, auto_delete=False)

    async def publish(key: str, body: bytes) -> None:
        await exchange.publish(aio_pika.Message(body), routing_key=key)

    yield name, publish
    await channel.exchange_delete(name)
    await connection.close()


async def opened(consumer: Consumer, queue: str | None = None) -> Consumer:
    await consumer.conn.open(queue or "q" + uuid.uuid4().hex[:10], "tag")
    return consumer


async def test_every_delivery_reaches_the_handler_whole_and_in_order(exchange: tuple) -> None:
    """Bodies of every size (empty; across the 128 KiB frame limit, so in several body frames; 1 MiB),
    and 2,000 small ones in a burst, so that a read holds many frames and frames are cut between reads."""
    name, publish = exchange
    consumer = await opened(Consumer())
    await consumer.conn.bind(name, "k")
    sizes = [0, 1, 180, 131_064, 131_065, 131_072, 300_000, 1 << 20]
    bodies = [bytes([65 + i]) * size for i, size in enumerate(sizes)]
    bodies += [b"burst %d " % n + b"x" * (n % 300) for n in range(2000)]
    for body in bodies:
        await publish("k", body)
    await eventually(lambda: len(consumer.got) == len(bodies), scaled(10), "every delivery")
    assert consumer.got == bodies
    assert consumer.lost == 0
    await consumer.conn.close()


async def test_bindings_decide_what_arrives(exchange: tuple) -> None:
    name, publish = exchange
    consumer = await opened(Consumer())
    await consumer.conn.bind(name, "a")
    await consumer.conn.bind(name, "b")
    await publish("a", b"a1")
    await publish("b", b"b1")
    await publish("c", b"c1")
    await consumer.conn.unbind(name, "a")
    await publish("a", b"a2")
    await publish("b", b"b2")
    await eventually(lambda: b"b2" in consumer.got, scaled(5), "b2")
    assert consumer.got == [b"a1", b"b1", b"b2"]
    await consumer.conn.close()


async def test_a_handler_that_raises_does_not_stop_the_consumer(exchange: tuple) -> None:
    name, publish = exchange
    got: list[bytes] = []

    def handler(body: bytes) -> None:
        got.append(body)
        if body == b"bad":
            raise RuntimeError("the handler broke")

    consumer = await opened(Consumer(handler=handler))
    await consumer.conn.bind(name, "k")
    for body in (b"one", b"bad", b"two"):
        await publish("k", body)
    await eventually(lambda: len(got) == 3, scaled(5), "three deliveries")
    assert got == [b"one", b"bad", b"two"]
    assert consumer.conn.is_open
    await consumer.conn.close()


async def test_a_refused_bind_raises_and_ends_the_connection() -> None:
    consumer = await opened(Consumer())
    with pytest.raises(Refused) as refused:
        await consumer.conn.bind("no-such-exchange-" + uuid.uuid4().hex, "k")
    assert refused.value.code == 404
    await eventually(lambda: consumer.lost == 1, scaled(5), "the link lost")
    assert not consumer.conn.is_open
    with pytest.raises((Refused, ConnectionError)):
        await consumer.conn.bind("whatever", "k")


async def test_wrong_credentials_are_refused() -> None:
    consumer = Consumer(BROKER.with_password("wrong"))
    with pytest.raises(Refused) as refused:
        await consumer.conn.open("q" + uuid.uuid4().hex[:10], "tag")
    assert refused.value.code == 403


async def test_an_unknown_vhost_is_refused() -> None:
    consumer = Consumer(BROKER.with_path("/no-such-vhost-" + uuid.uuid4().hex[:6]))
    with pytest.raises(Refused) as refused:
        await consumer.conn.open("q" + uuid.uuid4().hex[:10], "tag")
    assert refused.value.code == 530


async def test_a_queue_held_by_another_connection_is_refused() -> None:
    queue = "q" + uuid.uuid4().hex[:10]
    first = await opened(Consumer(), queue)
    second = Consumer()
    with pytest.raises(Refused) as refused:
        await second.conn.open(queue, "tag")
    assert refused.value.code == 405  # RESOURCE_LOCKED: exclusive to the first
    assert first.conn.is_open
    await first.conn.close()


async def test_close_deletes_the_queue_and_is_not_a_loss() -> None:
    queue = "q" + uuid.uuid4().hex[:10]
    consumer = await opened(Consumer(), queue)
    await consumer.conn.close()
    await asyncio.sleep(0.1)
    assert consumer.lost == 0
    connection = await aio_pika.connect(str(BROKER))
    async with connection:
        channel = await connection.channel()
        with pytest.raises(aiormq.exceptions.ChannelNotFoundEntity):
            await channel.declare_queue(queue, passive=True)


async def test_a_connection_closed_by_the_broker_is_a_loss(exchange: tuple) -> None:
    async with TcpProxy() as proxy:
        consumer = await opened(Consumer(BROKER.with_port(proxy.port)))
        proxy.cut()
        await eventually(lambda: consumer.lost == 1, scaled(5), "the link lost")
        assert not consumer.conn.is_open


async def test_a_silent_broker_is_found_out_by_heartbeats(exchange: tuple) -> None:
    """The network goes silent (nothing either way, the sockets open): with a heartbeat of 1 s the
    connection ends within (1 + 1) * 3 s and some ticks, instead of waiting for TCP."""
    name, publish = exchange
    async with TcpProxy() as proxy:
        consumer = await opened(Consumer(BROKER.with_port(proxy.port).update_query(heartbeat="1")))
        await consumer.conn.bind(name, "k")
        await asyncio.sleep(2.5)  # heartbeats keep a quiet link up
        assert consumer.lost == 0 and consumer.conn.is_open
        await publish("k", b"before")
        await eventually(lambda: consumer.got == [b"before"], scaled(5), "a delivery")
        proxy.freeze()
        started = asyncio.get_running_loop().time()
        await eventually(lambda: consumer.lost == 1, scaled(15), "the silence noticed")
        assert asyncio.get_running_loop().time() - started >= 5.5
