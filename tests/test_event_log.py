"""The worker tier's event log on real brokers.

Acknowledged in the order a worker's lanes finish events: on Redis, and on RabbitMQ through both ways a worker
reads a shard (a connection of its own; over TLS a channel of aio-pika's).

An acknowledgement too wide would lose an event that was not handled; on RabbitMQ a double one, or one with
a tag misread from the delivery, would close the channel (``PRECONDITION_FAILED - unknown delivery tag``):
each shows as events missing or coming back when the shard changes hands. And on RabbitMQ, what the broker
nacks past a shard's hard limit is not taken.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator

import pytest

from fanout.backends import create_event_log
from fanout.backends.amqp_events import AmqpEventLog
from fanout.backends.eventlog import Appended, Delivery, EventLog
from fanout.config import Settings
from tests.support.nodes import unique_namespace
from tests.support.recorder import eventually

REDIS, AMQP = "redis://127.0.0.1:6379/0", "amqp://guest:guest@127.0.0.1:5672/"
#: on RabbitMQ a worker reads a shard on a connection of its own, or (amqps://) on a channel of aio-pika's
BROKERS = {"redis": REDIS, "amqp": AMQP, "amqp-channels": AMQP}


def _worker_log(settings: Settings, broker: str) -> EventLog:
    log = create_event_log(settings, shards=1, backlog=1000)
    if broker == "amqp-channels":
        assert isinstance(log, AmqpEventLog)
        log.own_connections = False
    return log


@pytest.fixture(params=sorted(BROKERS))
async def tier(request: pytest.FixtureRequest) -> AsyncIterator[tuple[EventLog, Settings, str]]:
    broker = request.param
    settings = Settings.create(BROKERS[broker], namespace=unique_namespace("acks"), publish_timeout=5.0)
    node = create_event_log(settings, shards=1, backlog=1000, node="n1")
    await node.connect()
    try:
        yield node, settings, broker
    finally:
        await node.close()
        cleaner = create_event_log(settings, shards=1, backlog=1000)
        await cleaner.connect()
        await cleaner.remove()
        await cleaner.close()


async def _take_all(log: EventLog, count: int) -> list[Delivery]:
    assert await log.acquire(0, "w")
    got: list[Delivery] = []
    while len(got) < count:
        batch = await log.fetch(0, "w", count - len(got), wait=5.0)
        assert batch, f"only {len(got)} of {count} events came"
        got.extend(batch)
    return got


async def test_out_of_order_acks_keep_exactly_the_unhandled_for_the_next_owner(
    tier: tuple[EventLog, Settings, str],
) -> None:
    node, settings, broker = tier
    await node.append([Appended(0, b"h", str(n).encode(), f"c{n}") for n in range(60)])
    first = _worker_log(settings, broker)
    await first.connect()
    try:
        got = await _take_all(first, 60)
        assert [d.data for d in got] == [str(n).encode() for n in range(60)]
        assert not any(d.redelivered for d in got)
        held = {got[7].data, got[23].data, got[59].data}  # "still in a handler" when the shard moves
        handled = [d for d in got if d.data not in held]
        random.Random(3).shuffle(handled)
        for at in range(0, len(handled), 5):  # batches as a worker's lanes finish them
            await first.ack(handled[at : at + 5])
        await asyncio.sleep(0.3)  # (on RabbitMQ a double or unknown ack would have closed the channel by now)
        assert await first.renew([0], "w") == {0}
        await first.release(0, "w")
    finally:
        await first.close()

    second = _worker_log(settings, broker)
    await second.connect()
    try:
        back = await _take_all(second, 3)
        assert {d.data for d in back} == held and all(d.redelivered for d in back)
        await second.ack(back)
        assert await second.fetch(0, "w", 10, wait=0.5) == []
        await asyncio.sleep(0.3)
        assert await second.renew([0], "w") == {0}
        await second.release(0, "w")
        assert await node.waiting(0) == 0  # nothing left unacknowledged in the queue
    finally:
        await second.close()


@pytest.mark.parametrize("own_connections", [True, False])
async def test_a_shard_no_node_declared_is_not_taken(own_connections: bool) -> None:
    worker = AmqpEventLog(Settings.create(AMQP, namespace=unique_namespace("acks")), shards=1, backlog=10)
    worker.own_connections = own_connections
    await worker.connect()
    try:
        assert await worker.acquire(0, "w") is False
        assert await worker.renew([0], "w") == set()
    finally:
        await worker.close()
        await worker.remove()


async def test_rabbitmq_nacks_past_the_hard_limit_and_those_events_are_not_taken() -> None:
    # the node declares the shard with x-max-length 2 x backlog (10) and reject-publish; with its own
    # backlog check out of the way (as when several nodes read the depth at once), it sends batches of 8 until
    # the broker nacks: what was nacked is not taken (the node keeps it), and the queue holds what was taken
    settings = Settings.create(AMQP, namespace=unique_namespace("acks"), publish_timeout=5.0)
    node = AmqpEventLog(settings, shards=1, backlog=5, node="n1")
    await node.connect()
    try:
        node.backlog = 1000
        taken: list[bool] = []
        for batch in range(10):
            events = [Appended(0, b"h", f"{batch}.{i}".encode(), f"c{i}") for i in range(8)]
            taken += await node.append(events)
            if not all(taken):
                break
        assert False in taken and taken.count(True) >= 10
        kept = taken.count(True)

        async def holds_the_taken() -> bool:
            return await node.waiting(0) == kept

        await eventually(holds_the_taken, 5, f"the queue to hold the {kept} events taken")
    finally:
        await node.close()
        await node.remove()
