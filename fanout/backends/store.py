"""The continuity store's contract: streams (history), resume records; one implementation per place.

A store is where continuity's state lives (docs/continuity.md): per stream an append-only log of sends
with its epoch and top offset, and the resume records of connections. :func:`create_store` picks it:
the Redis backend's own Redis, ``FANOUT_HISTORY_URL`` (any backend), or, for the memory backend, the
process (:class:`MemoryStore`). The AMQP backend without ``FANOUT_HISTORY_URL`` has none (no resume
token in the welcome; history settings are refused at start).

The store:

* ``append(streams, send, publish)``: gives the send the next offset of each stream, stores it in each
  (trimmed to ``history_size`` entries, kept ``history_ttl`` after the stream's last send; epoch and top
  offset kept :data:`~fanout.history.META_TTL`), and returns its positions (``append_counted``: and
  how many subscribers each publish reached). When :attr:`publishes` is
  true (the store is the bus: the Redis backend's own Redis, the memory hub), it also publishes each
  ``(address, message)`` of ``publish`` with the positions line in front, **atomically with the append**
  (on Redis: in the same script); otherwise the caller publishes them afterwards, with
  :func:`~fanout.history.attach_positions` (appended *before* published: a send that was stored but not
  delivered live is still recoverable).
* ``positions(streams)``: the current (epoch, top offset) of each stream, creating the epoch of a stream
  that has none yet (so a position handed to a client stays valid when the first send comes).
* ``read(stream, since, limit)``: a :class:`~fanout.history.Page`: the entries after ``since`` (oldest
  first, at most ``limit``), or without ``since`` the latest ``limit``.
* ``remove(stream)``: forget its entries and epoch (the next send starts a new epoch).
* resume records (opaque bytes, keyed by an unguessable token): ``save_resume(token, flag, record, ttl,
  create=False)`` writes it unless the token was claimed or dropped (``create=True``: in any case - a new
  connection's first), so that a record claimed by a resume is never written back by its old connection,
  while a record the store lost (restarted empty) is written again by the next save;
  ``keep_resume(tokens, ttl)`` extends those still there; ``claim_resume(token,
  flag)`` takes the record if it exists and was saved with that flag (``None`` = guest), leaving a
  tombstone in the same step (single use), else None; ``drop_resume(token)`` leaves a tombstone too. A
  tombstone lasts ``resume_ttl`` + :data:`TOMBSTONE_SLACK` (longer than its old connection may write).
* idempotency keys (docs/continuity.md, "Idempotent sends"; :mod:`fanout.idempotency`): a
  :class:`StoredSend` with a ``key`` is appended only if the key is new, in the same step (else
  :class:`~fanout.idempotency.Repeated` is raised with the first's outcome and nothing is appended);
  ``publish_once(key, publish)`` publishes only if the key is new, in the same step (only where
  :attr:`atomic_keys`); ``check_key(key)`` answers what is kept for a key; ``record_key(key, outcome)``
  keeps the first's result (for the rest of the window when the key is there, else for a whole window).
  A key lives ``idempotency_window`` seconds from its claim.
"""

from __future__ import annotations

import abc
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from ..config import Settings
from ..history import META_TTL, Entry, Page, Positions, attach_positions, new_epoch
from ..idempotency import APPENDED, PUBLISHED, Outcome, Repeated, encode_outcome, parse_outcome
from ..naming import Address


@dataclass(frozen=True, slots=True)
class StoredSend:
    """What a send puts in each of its streams."""

    sid: str
    payload: bytes
    binary: bool = False
    json: bool = False
    exclude: tuple[str, ...] = ()
    #: the send's idempotency key: appended only if it is new (see the module docstring)
    key: str | None = None


class HistoryStore(abc.ABC):
    """See the module docstring."""

    #: whether ``append`` publishes the messages it is given itself, atomically with the append
    publishes: bool = False
    #: whether ``publish_once`` checks a key and publishes in one step
    atomic_keys: bool = False

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    @abc.abstractmethod
    async def connect(self) -> None:
        """Connect (fail fast: BackendUnavailable when the store is not there)."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Disconnect; idempotent."""

    async def append(
        self, streams: Sequence[str], send: StoredSend, publish: Sequence[tuple[Address, bytes]] = ()
    ) -> Positions:
        return (await self.append_counted(streams, send, publish))[0]

    @abc.abstractmethod
    async def append_counted(
        self, streams: Sequence[str], send: StoredSend, publish: Sequence[tuple[Address, bytes]] = ()
    ) -> tuple[Positions, list[int | None]]:
        """:meth:`append`, also answering how many subscribers each message of ``publish`` reached (as
        ``Backend.publish_many`` does; ``[]`` when the store does not publish)."""

    @abc.abstractmethod
    async def positions(self, streams: Iterable[str]) -> Positions: ...

    @abc.abstractmethod
    async def read(self, stream: str, since: int | None = None, limit: int = 100) -> Page: ...

    @abc.abstractmethod
    async def remove(self, stream: str) -> None: ...

    @abc.abstractmethod
    async def save_resume(
        self, token: str, flag: str | None, record: bytes, ttl: float, *, create: bool = False
    ) -> None: ...

    @abc.abstractmethod
    async def keep_resume(self, tokens: Iterable[str], ttl: float) -> None: ...

    @abc.abstractmethod
    async def claim_resume(self, token: str, flag: str | None) -> bytes | None: ...

    @abc.abstractmethod
    async def drop_resume(self, token: str) -> None: ...

    async def publish_once(self, key: str, publish: Sequence[tuple[Address, bytes]]) -> list[int | None]:
        """Publish ``publish`` if ``key`` is new, claiming it in the same step (state ``p``); else raise
        :class:`~fanout.idempotency.Repeated`. Only where :attr:`atomic_keys`."""
        raise NotImplementedError

    @abc.abstractmethod
    async def check_key(self, key: str, streams: Sequence[str] = ()) -> Outcome | None:
        """What is kept for ``key`` (a history send's: in the slot of its first stream), or None."""

    @abc.abstractmethod
    async def record_key(self, key: str, outcome: Outcome, streams: Sequence[str] = ()) -> None:
        """Keep ``outcome`` for ``key``: for the rest of its window if it is there, else a whole window."""


# --------------------------------------------------------------------------- in the process


@dataclass
class _Stream:
    epoch: str
    offset: int = 0
    entries: list[Entry] = field(default_factory=list)
    last_send: float = 0.0  #: monotonic time of the last append
    touched: float = 0.0  #: monotonic time of the last append or position read (the epoch's life)


#: seconds a claimed or dropped token's tombstone outlives FANOUT_RESUME_TTL: its old connection's last
#: writes (a record outlives its connection by at most the resume TTL and the node's slack) cannot bring
#: the record back
TOMBSTONE_SLACK = 120.0


class _Memory:
    """The state every MemoryStore of one memory URL in one process shares (as MemoryHub does)."""

    _shared: dict[str, _Memory] = {}
    _shared_lock = threading.Lock()

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.streams: dict[str, _Stream] = {}
        self.resume: dict[str, tuple[str | None, bytes, float]] = {}  #: token -> (flag, record, expires)
        self.tombstones: dict[str, float] = {}  #: claimed or dropped token -> expires
        self.keys: dict[str, tuple[bytes, float]] = {}  #: idempotency key -> (outcome, expires)

    @classmethod
    def named(cls, key: str) -> _Memory:
        with cls._shared_lock:
            memory = cls._shared.get(key)
            if memory is None:
                memory = cls._shared[key] = _Memory()
            return memory


class MemoryStore(HistoryStore):
    """The memory backend's store: in this process, shared by every endpoint on the same memory URL."""

    publishes = True
    atomic_keys = True

    def __init__(self, settings: Settings, hub: object | None = None) -> None:
        super().__init__(settings)
        self._memory = _Memory.named(f"{settings.url}|{settings.namespace}")
        from .memory import MemoryHub

        self._hub = MemoryHub.named(settings.url) if hub is None else hub

    async def connect(self) -> None:
        return None

    async def close(self) -> None:
        return None

    def _stream(self, name: str, now: float) -> _Stream:
        """The live stream ``name``: a new epoch if it never existed or its epoch expired."""
        stream = self._memory.streams.get(name)
        if stream is not None and now - stream.touched > max(META_TTL, self.settings.history_ttl):
            stream = None
        if stream is None:
            stream = self._memory.streams[name] = _Stream(new_epoch(), touched=now)
        if stream.entries and now - stream.last_send > self.settings.history_ttl:
            stream.entries.clear()  # expired: offsets go on, the entries are gone
        return stream

    async def append_counted(
        self, streams: Sequence[str], send: StoredSend, publish: Sequence[tuple[Address, bytes]] = ()
    ) -> tuple[Positions, list[int | None]]:
        now = time.monotonic()
        size = self.settings.history_size
        with self._memory.lock:
            if send.key is not None:
                self._claim(send.key, now)
            found = [(name, self._stream(name, now)) for name in streams]
            offsets = {}
            for name, stream in found:
                stream.offset += 1
                stream.last_send = stream.touched = now
                offsets[name] = stream.offset
            for name, stream in found:
                others = {s: o for s, o in offsets.items() if s != name}
                stream.entries.append(
                    Entry(stream.offset, send.sid, send.payload, send.binary, send.json, send.exclude, others)
                )
                del stream.entries[:-size]
            positions = {name: (stream.epoch, stream.offset) for name, stream in found}
            counts: list[int | None] = [
                self._hub.publish(address, attach_positions(message, positions))  # type: ignore[attr-defined]
                for address, message in publish
            ]
            if send.key is not None:
                state = PUBLISHED if publish else APPENDED
                self._keep(send.key, Outcome(state, None, send.sid, positions), now)
        return positions, counts

    def _claim(self, key: str, now: float) -> None:
        """Raise Repeated if ``key`` is kept (and not expired). Under the lock."""
        found = self._memory.keys.get(key)
        if found is not None and found[1] > now:
            raise Repeated(parse_outcome(found[0]))

    def _keep(self, key: str, outcome: Outcome, now: float, whole: bool = True) -> None:
        keys = self._memory.keys
        found = keys.get(key)
        expires = now + self.settings.idempotency_window
        if not whole and found is not None and found[1] > now:
            expires = found[1]
        keys[key] = (encode_outcome(outcome), expires)
        if len(keys) % 1024 == 0:  # expired keys go now and then
            for name, (_, until) in list(keys.items()):
                if until <= now:
                    del keys[name]

    async def publish_once(self, key: str, publish: Sequence[tuple[Address, bytes]]) -> list[int | None]:
        now = time.monotonic()
        with self._memory.lock:
            self._claim(key, now)
            self._keep(key, Outcome(PUBLISHED), now)
            return [self._hub.publish(address, message) for address, message in publish]  # type: ignore[attr-defined]

    async def check_key(self, key: str, streams: Sequence[str] = ()) -> Outcome | None:
        with self._memory.lock:
            found = self._memory.keys.get(key)
            if found is None or found[1] <= time.monotonic():
                return None
            return parse_outcome(found[0])

    async def record_key(self, key: str, outcome: Outcome, streams: Sequence[str] = ()) -> None:
        with self._memory.lock:
            self._keep(key, outcome, time.monotonic(), whole=False)

    async def positions(self, streams: Iterable[str]) -> Positions:
        now = time.monotonic()
        with self._memory.lock:
            found = {name: self._stream(name, now) for name in streams}
            for stream in found.values():
                stream.touched = now
            return {name: (stream.epoch, stream.offset) for name, stream in found.items()}

    async def read(self, stream: str, since: int | None = None, limit: int = 100) -> Page:
        now = time.monotonic()
        with self._memory.lock:
            found = self._stream(stream, now)
            entries = found.entries
            first = entries[0].offset if entries else found.offset + 1
            if since is None:
                chosen = entries[-limit:] if limit > 0 else []
            else:
                chosen = [e for e in entries if e.offset > since][:limit]
            return Page(found.epoch, found.offset, tuple(chosen), first)

    async def remove(self, stream: str) -> None:
        with self._memory.lock:
            self._memory.streams.pop(stream, None)

    async def save_resume(
        self, token: str, flag: str | None, record: bytes, ttl: float, *, create: bool = False
    ) -> None:
        now = time.monotonic()
        with self._memory.lock:
            if create or self._memory.tombstones.get(token, 0.0) < now:
                self._memory.tombstones.pop(token, None)
                self._memory.resume[token] = (flag, record, now + ttl)

    async def keep_resume(self, tokens: Iterable[str], ttl: float) -> None:
        until = time.monotonic() + ttl
        with self._memory.lock:
            for token in tokens:
                found = self._memory.resume.get(token)
                if found is not None:
                    self._memory.resume[token] = (found[0], found[1], until)

    async def claim_resume(self, token: str, flag: str | None) -> bytes | None:
        with self._memory.lock:
            found = self._memory.resume.get(token)
            if found is None or found[2] < time.monotonic():
                self._memory.resume.pop(token, None)
                return None
            if found[0] != flag:
                return None
            self._bury(token)
            return found[1]

    async def drop_resume(self, token: str) -> None:
        with self._memory.lock:
            self._bury(token)

    def _bury(self, token: str) -> None:
        """The record goes, a tombstone stays (see TOMBSTONE_SLACK); expired tombstones go now and then."""
        memory, now = self._memory, time.monotonic()
        memory.resume.pop(token, None)
        memory.tombstones[token] = now + self.settings.resume_ttl + TOMBSTONE_SLACK
        if len(memory.tombstones) % 1024 == 0:
            for name, until in list(memory.tombstones.items()):
                if until < now:
                    del memory.tombstones[name]


__all__ = ["TOMBSTONE_SLACK", "HistoryStore", "MemoryStore", "StoredSend"]
