"""Idempotent sends, the pure part: the node's window of applied keys, and what a store keeps per key.

A send may carry an ``idempotency_key`` (docs/continuity.md, "Idempotent sends"): the same key in the
same namespace within ``FANOUT_IDEMPOTENCY_WINDOW`` seconds reaches each connection at most once, is
appended to history at most once, and a repeat returns what the first returned. Two places make it so:

* the **store** (Redis, or the memory backend's process), where there is one: the publisher claims the
  key there - in the same script as the publish (and the history append) when it can, else it checks
  before and records after publishing - and a repeat finds the first's :class:`Outcome` there and does
  not publish again;
* every **node**, always: the key travels in the command (``ik`` on the wire) and a node applies a key
  once within the window (:class:`KeyWindow`), answering a repeat's ``ack`` with the count the first
  reached on it. That is what holds where the store cannot check atomically (RabbitMQ, Redis Cluster
  sends over several slots, a publisher that died between publishing and recording).

No I/O here; the caller passes the clock.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import orjson

from .exceptions import FanoutError

#: longest key a caller may give (characters); the bus takes a little more for the keys a bulk derives
MAX_KEY_LENGTH = 128
#: most keys a node remembers; beyond it the oldest are forgotten before their window ends (counted)
MAX_KEYS = 100_000


def derived(key: str, part: str) -> str:
    """The key of one part of a call (a bulk's commands, its stored sends): ``<key>#<part>``."""
    return f"{key}#{part}"


class KeyWindow:
    """The keys a node applied within the window, each with the count of connections it reached.

    Bounded: at most ``capacity`` keys (each ~ its length + 100 bytes); when full, the oldest is
    forgotten first (``evicted`` counts them). Keys are kept in the order applied, so expired ones are
    dropped from the front as new ones come.
    """

    __slots__ = ("_keys", "capacity", "evicted", "repeats", "window")

    def __init__(self, window: float, capacity: int = MAX_KEYS) -> None:
        self.window = window
        self.capacity = capacity
        self.evicted = 0
        self.repeats = 0  #: keys found applied (repeats not applied again)
        self._keys: OrderedDict[str, tuple[float, int]] = OrderedDict()  #: key -> (expires, count)

    def __len__(self) -> int:
        return len(self._keys)

    def seen(self, key: str, now: float) -> int | None:
        """The count ``key`` reached when it was applied within the window, or None if it was not."""
        self._expire(now)
        found = self._keys.get(key)
        if found is None or found[0] <= now:
            return None
        self.repeats += 1
        return found[1]

    def applied(self, key: str, count: int, now: float) -> None:
        """``key`` was applied now and reached ``count`` connections."""
        keys = self._keys
        keys[key] = (now + self.window, count)
        keys.move_to_end(key)
        while len(keys) > self.capacity:
            keys.popitem(last=False)
            self.evicted += 1

    def _expire(self, now: float) -> None:
        keys = self._keys
        while keys:
            key, (expires, _) = next(iter(keys.items()))
            if expires > now:
                return
            del keys[key]


# --------------------------------------------------------------------------- what a store keeps per key

#: the states of a key in a store
PUBLISHED = "p"  #: published with the claim (one script); its result not recorded yet
APPENDED = "a"  #: appended to history with the claim, to be published by the publisher (not known yet)
DONE = "n"  #: done, and the first did not ask for a count
COUNTED = "c"  #: done: ``count`` connections reached


@dataclass(frozen=True, slots=True)
class Outcome:
    """What a store holds for a key: how far the first send got, and what a repeat needs to know."""

    state: str
    count: int | None = None
    #: a history send's id and positions (``{stream: (epoch, offset)}``): a repeat publishes the same
    sid: str | None = None
    positions: dict[str, tuple[str, int]] | None = None

    @property
    def done(self) -> bool:
        return self.state in (DONE, COUNTED)


def encode_outcome(outcome: Outcome) -> bytes:
    """``<state>[<count>]`` then, for a history send, ``\\n<sid>\\n<positions JSON>`` (as the scripts
    write it: ``{"<stream>":[<offset>,"<epoch>"],...}``)."""
    head = outcome.state + ("" if outcome.count is None else str(outcome.count))
    if outcome.sid is None or outcome.positions is None:
        return head.encode()
    line = orjson.dumps({s: [offset, epoch] for s, (epoch, offset) in outcome.positions.items()})
    return b"%s\n%s\n%s" % (head.encode(), outcome.sid.encode(), line)


def parse_outcome(raw: bytes) -> Outcome:
    """The :class:`Outcome` a store kept (see :func:`encode_outcome`). Raises ValueError if malformed."""
    head, _, rest = raw.partition(b"\n")
    text = head.decode()
    state = text[:1]
    if state not in (PUBLISHED, APPENDED, DONE, COUNTED):
        raise ValueError(f"unknown idempotency state {raw[:20]!r}")
    count = int(text[1:]) if state == COUNTED else None
    if not rest:
        return Outcome(state, count)
    sid, _, line = rest.partition(b"\n")
    found = orjson.loads(line)
    positions = {str(s): (str(value[1]), int(value[0])) for s, value in found.items()}
    return Outcome(state, count, sid.decode(), positions)


class Repeated(FanoutError):
    """Raised inside a publish when the store says the key was claimed already (not seen by callers:
    ServerUtil answers with what the first returned)."""

    reason = "repeated"

    def __init__(self, outcome: Outcome) -> None:
        super().__init__(f"idempotency key seen before ({outcome.state})")
        self.outcome = outcome


__all__ = [
    "APPENDED",
    "COUNTED",
    "DONE",
    "MAX_KEYS",
    "MAX_KEY_LENGTH",
    "PUBLISHED",
    "KeyWindow",
    "Outcome",
    "Repeated",
    "derived",
    "encode_outcome",
    "parse_outcome",
]
