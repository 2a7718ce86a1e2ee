"""The receive side of an endpoint: bus bytes in, commands to apply out. Pure: the caller passes the clock.

What arrives within one pass of the event loop is taken as one batch (:meth:`Receiver.take`):

1. each message is decoded (:func:`fanout.protocol.open_message`); what cannot be is dropped and counted
   by reason (``malformed``, ``version``, ``oversized``, ``signature``, ``namespace``), and so is a text
   send whose payload is not UTF-8 (``utf8``: every text frame a client gets must be valid UTF-8);
2. with a secret, a message must also be *fresh*: sent within ``replay_window`` seconds of now (else
   ``stale``) and not seen before - each sender's running count ``s`` may be accepted once (else
   ``replay``; see :class:`ReplayGuard`);
3. each sender's messages are put back in the order it sent them (by ``s``, among the places they hold
   in the batch): a node reading several connections (Redis Cluster shards) can read a later message
   before an earlier one;
4. a send or close published on several addresses (same dedupe id) is applied once.

It also measures how long messages took from the publisher to here (:class:`LagHistogram`).
"""

from __future__ import annotations

import bisect
from collections import Counter, OrderedDict
from dataclasses import dataclass, field

from . import protocol
from .commands import Close, CloseGuests, Command, Send, SendBulk
from .exceptions import ProtocolError

#: how many recent dedupe ids an endpoint remembers (commands published on several addresses)
DEDUPE_MEMORY = 4096
#: default replay window, seconds (FANOUT_REPLAY_WINDOW)
REPLAY_WINDOW = 60.0


@dataclass(slots=True)
class _Sender:
    top: int  #: highest count accepted
    seen: int  #: bit i set: count ``top - i`` was accepted
    last: float  #: when we last heard from this sender


class ReplayGuard:
    """Accepts each (sender, count) once, with bounded memory.

    Per sender it keeps the highest count seen and a bitmap of the :attr:`SPAN` counts below it (the
    anti-replay window of IPsec, RFC 4303 section 3.4.3). A count more than :attr:`SPAN` below the highest is
    refused: it is either a replay or so late that the publisher's order could not be kept anyway. A
    sender silent for two replay windows is forgotten; anything it sent before then is stale by time.
    """

    SPAN = 4096

    def __init__(self, window: float) -> None:
        self.window = window
        self._senders: dict[str, _Sender] = {}
        self._next_sweep = 0.0

    def __len__(self) -> int:
        return len(self._senders)

    def accept(self, origin: str, seq: int, now: float) -> bool:
        """True the first time (``origin``, ``seq``) is offered; False for a repeat or a too-old count."""
        if now >= self._next_sweep:
            self._sweep(now)
        sender = self._senders.get(origin)
        if sender is None:
            self._senders[origin] = _Sender(seq, 1, now)
            return True
        sender.last = now
        if seq > sender.top:
            shift = seq - sender.top
            sender.seen = ((sender.seen << shift) | 1) & ((1 << self.SPAN) - 1) if shift < self.SPAN else 1
            sender.top = seq
            return True
        behind = sender.top - seq
        if behind >= self.SPAN or sender.seen >> behind & 1:
            return False
        sender.seen |= 1 << behind
        return True

    def _sweep(self, now: float) -> None:
        horizon = now - 2 * self.window
        for origin in [o for o, s in self._senders.items() if s.last < horizon]:
            del self._senders[origin]
        self._next_sweep = now + self.window


#: upper bounds of the lag histogram's buckets, seconds
LAG_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


@dataclass(slots=True)
class LagHistogram:
    """Cumulative-ready counts of publish -> receive lag (Prometheus histogram semantics)."""

    buckets: tuple[float, ...] = LAG_BUCKETS
    counts: list[int] = field(default_factory=lambda: [0] * (len(LAG_BUCKETS) + 1))  #: last: +Inf
    total: float = 0.0
    count: int = 0

    def observe(self, seconds: float) -> None:
        seconds = max(seconds, 0.0)  # a publisher's clock a little ahead of ours is not negative lag
        self.counts[bisect.bisect_left(self.buckets, seconds)] += 1
        self.total += seconds
        self.count += 1

    def cumulative(self) -> list[tuple[float, int]]:
        """``[(upper bound, count <= bound), ..., (inf, count)]``."""
        out, running = [], 0
        for bound, n in zip((*self.buckets, float("inf")), self.counts, strict=True):
            running += n
            out.append((bound, running))
        return out


class Receiver:
    """Decodes, vets, orders and deduplicates what one endpoint receives (see the module docstring)."""

    def __init__(
        self,
        *,
        secret: bytes | None,
        namespace: str,
        max_message: int,
        replay_window: float = REPLAY_WINDOW,
        dedupe_memory: int = DEDUPE_MEMORY,
    ) -> None:
        self.secret = secret
        self.namespace = namespace
        self.max_message = max_message
        self.replay_window = replay_window
        self.guard = ReplayGuard(replay_window)
        self._dedupe_memory = dedupe_memory
        self._seen_ids: OrderedDict[str, None] = OrderedDict()
        #: messages dropped, by reason
        self.dropped: Counter[str] = Counter()
        #: publish -> receive lag of every message that said when it was sent
        self.lag = LagHistogram()
        #: node instance -> when a heartbeat that failed verification last claimed to come from it
        self.unverified_heartbeats: dict[str, float] = {}

    def take(self, batch: list[bytes], now: float) -> list[Command]:
        """The commands of ``batch`` to apply, in order; ``now`` is Unix time in seconds."""
        accepted: list[protocol.Message] = []
        for raw in batch:
            message = self._vet(raw, now)
            if message is not None:
                accepted.append(message)
        if len(accepted) > 1:
            accepted = _in_sender_order(accepted)
        out: list[Command] = []
        for message in accepted:
            command = message.command
            dedupe_id = command.dedupe_id if isinstance(command, Send | Close) else None
            if dedupe_id is not None and self._repeated(dedupe_id):
                continue
            out.append(command)
        return out

    def take_one(self, raw: bytes, now: float) -> Command | None:
        """The command of one message, or None if it was dropped (same checks as :meth:`take`)."""
        commands = self.take([raw], now)
        return commands[0] if commands else None

    def _vet(self, raw: bytes, now: float) -> protocol.Message | None:
        try:
            message = protocol.open_message(raw, self.secret, self.max_message, self.namespace)
        except ProtocolError as exc:
            self.dropped[exc.reason] += 1
            if exc.reason == "signature":
                claimed = protocol.peek_heartbeat(raw)
                if claimed is not None:
                    self.unverified_heartbeats[claimed.instance] = now
            return None
        if not _text_is_utf8(message.command):
            self.dropped["utf8"] += 1  # a client would have to close on it (1007): never deliver it
            return None
        envelope = message.envelope
        if envelope.sent_at is not None:
            self.lag.observe(now - envelope.sent_at)
        if self.secret:
            # open_message guarantees a signed message has its whole envelope
            assert envelope.sent_at is not None and envelope.origin is not None
            if abs(now - envelope.sent_at) > self.replay_window:
                self.dropped["stale"] += 1
                return None
            if not self.guard.accept(envelope.origin, envelope.seq, now):
                self.dropped["replay"] += 1
                return None
        return message

    def _repeated(self, dedupe_id: str) -> bool:
        seen = self._seen_ids
        if dedupe_id in seen:
            return True
        seen[dedupe_id] = None
        if len(seen) > self._dedupe_memory:
            seen.popitem(last=False)
        return False


def _text_is_utf8(command: Command) -> bool:
    """Whether every text frame ``command`` would make is valid UTF-8."""
    match command:
        case Send():
            return command.binary or _is_utf8(command.payload)
        case Close() | CloseGuests():
            return command.last is None or command.binary or _is_utf8(command.last)
        case SendBulk():
            return all(binary or _is_utf8(data) for _, data, binary in command.items)
    return True


def _is_utf8(payload: bytes) -> bool:
    if payload.isascii():
        return True
    try:
        payload.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _in_sender_order(messages: list[protocol.Message]) -> list[protocol.Message]:
    """Each sender's messages sorted by count among the places they hold; the rest keep theirs."""
    places: dict[str, list[int]] = {}
    for index, message in enumerate(messages):
        origin = message.envelope.origin
        if origin is not None:
            places.setdefault(origin, []).append(index)
    ordered = list(messages)
    for indexes in places.values():
        if len(indexes) > 1:
            mine = sorted((messages[i] for i in indexes), key=lambda m: m.envelope.seq)
            for index, message in zip(indexes, mine, strict=True):
                ordered[index] = message
    return ordered
