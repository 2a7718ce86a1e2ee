"""The worker tier's contract with a broker: sharded, acknowledged event queues, and node rosters.

Unlike commands (pub/sub, at-most-once), client events are kept by the broker until a worker has handled
them: a Redis stream per shard read through a consumer group, or an AMQP durable queue per shard with
manual acknowledgement. One implementation per broker (``redis_events.py``, ``amqp_events.py``), chosen
by :func:`create_event_log`.

Node side:

* :meth:`EventLog.append` adds events to their shards, in order, and keeps the node's *roster* (which
  connections it holds, and their flag) in the same step, so that the tier can close the connections of
  a node that dies without saying goodbye. It returns, per event, whether the shard took it: a shard at
  its backlog bound refuses (the node keeps the event and slows down the client, see ``node/events.py``).
* :meth:`EventLog.leave` is a node's clean goodbye (its connections were closed one by one).

Worker side (a shard is handled by one worker at a time):

* :meth:`acquire` / :meth:`renew` / :meth:`release` take, keep and give back a shard;
* :meth:`fetch` returns the shard's next deliveries - first what a previous owner took and did not
  acknowledge (``redelivered``), then new ones; :meth:`ack` acknowledges them;
* :meth:`dead_letter` parks an event whose handler kept failing; :meth:`dead_letters` lists them and
  :meth:`requeue` puts one back on its shard;
* :meth:`lost_nodes` names the nodes with a roster that are not alive, and :meth:`close_lost` appends a
  close event (``node lost``) for each connection in such a roster, then forgets it.

:meth:`remove` deletes a namespace's tier once its workers and nodes are stopped.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from ..config import Settings

#: how long a worker's claim on a shard lasts without renewal, seconds
LEASE_TTL = 6.0


@dataclass(frozen=True, slots=True)
class Appended:
    """One event for :meth:`EventLog.append`, with the roster change it implies."""

    shard: int
    header: bytes
    data: bytes
    client_id: str
    #: ``"add"`` (an open: the connection joins the node's roster), ``"remove"`` (a close), or None
    roster: str | None = None
    #: the connection's flag, kept in the roster for the close event of a lost node
    flag: str | None = None


@dataclass(frozen=True, slots=True)
class Delivery:
    """An event handed to a worker; ``token`` is what :meth:`EventLog.ack` needs."""

    shard: int
    token: Any
    header: bytes
    data: bytes
    redelivered: bool


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A parked event: where it came from, why, and what :meth:`EventLog.requeue` needs."""

    token: Any
    shard: int
    header: bytes
    data: bytes
    error: str
    parked_at: float


class EventLog(abc.ABC):
    def __init__(self, settings: Settings, *, shards: int, backlog: int, node: str = "") -> None:
        self.settings = settings
        self.shards = shards
        #: most events one shard may hold waiting for workers
        self.backlog = backlog
        #: the node instance appending (empty for a worker)
        self.node = node
        #: a node's connections -> flags, for brokers that keep rosters as snapshots (AMQP)
        self.roster_source: Callable[[], dict[str, str | None]] | None = None

    @abc.abstractmethod
    async def connect(self) -> None: ...

    @abc.abstractmethod
    async def close(self) -> None: ...

    # -- node side
    @abc.abstractmethod
    async def append(self, items: Sequence[Appended]) -> list[bool]: ...

    @abc.abstractmethod
    async def leave(self) -> None: ...

    # -- worker side
    @abc.abstractmethod
    async def acquire(self, shard: int, owner: str) -> bool: ...

    @abc.abstractmethod
    async def renew(self, shards: Iterable[int], owner: str) -> set[int]: ...

    @abc.abstractmethod
    async def release(self, shard: int, owner: str) -> None: ...

    @abc.abstractmethod
    async def fetch(self, shard: int, owner: str, count: int, wait: float) -> list[Delivery]: ...

    @abc.abstractmethod
    async def ack(self, deliveries: Sequence[Delivery]) -> None: ...

    @abc.abstractmethod
    async def dead_letter(self, delivery: Delivery, error: str) -> None: ...

    @abc.abstractmethod
    async def dead_letters(self, limit: int = 1000) -> list[DeadLetter]: ...

    @abc.abstractmethod
    async def requeue(self, dead: DeadLetter) -> None: ...

    @abc.abstractmethod
    async def waiting(self, shard: int) -> int: ...

    @abc.abstractmethod
    async def lost_nodes(self, live: set[str]) -> list[str]: ...

    # -- cleanup (``fanout worker cleanup``)
    @abc.abstractmethod
    async def remove(self) -> list[str]:
        """Delete the namespace's whole tier (events, leases, rosters, dead letters); the names removed.
        Called on a log that is not connected (then closed)."""

    @abc.abstractmethod
    async def close_lost(self, instance: str, make_close: Any) -> int: ...
