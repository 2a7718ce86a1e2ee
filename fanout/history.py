"""Continuity's pure core: streams, which targets have one, positions, stored entries. No I/O.

A *stream* is the history of one target: ``group:<name>``, ``flag:<name>`` or ``all``. It has an
**epoch** (a string that changes whenever its stored entries were lost) and an **offset** (+1 per send).
:class:`Policy` says which targets have a stream (``FANOUT_HISTORY``) and which are cache targets
(``FANOUT_CACHE``). A send to history targets is appended to each of their streams by the store, which
hands back (or, on Redis, puts on the bus itself) the send's *positions*: ``{stream: (epoch, offset)}``.

On the bus the positions travel in front of the signed message, as one line (the *positions line*)::

    b"h1 " + JSON {"<stream>": [<offset>, "<epoch>"], ...} + b"\\n" + <the v2 message>

They are outside the signature because the store assigns them after the publisher signed (on Redis, in
the script that publishes); see docs/continuity.md for what that means with ``FANOUT_SECRET``.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace

import orjson

from .commands import Target, TargetKind
from .exceptions import ConfigError, ProtocolError

ALL_STREAM = "all"
GROUP_PREFIX = "group:"
FLAG_PREFIX = "flag:"

#: most entries a stream may keep (FANOUT_HISTORY_SIZE)
MAX_HISTORY_SIZE = 10_000
#: how long a stream's epoch and top offset outlive its last send (at least a day, SPEC)
META_TTL = 2 * 24 * 3600

POSITIONS_PREFIX = b"h1 "
#: most streams one send's positions may name on the bus
MAX_POSITIONS = 1000
#: most stream names a Policy remembers its answer for (then it starts over)
KNOWN_STREAMS = 10_000

Positions = dict[str, tuple[str, int]]  #: stream -> (epoch, offset)


def group_stream(name: str) -> str:
    return GROUP_PREFIX + name


def flag_stream(name: str) -> str:
    return FLAG_PREFIX + name


def parse_stream(stream: str) -> tuple[TargetKind, str]:
    """``group:lobby`` -> (GROUPS, "lobby"); ``all`` -> (ALL, ""). ValueError for anything else."""
    if stream == ALL_STREAM:
        return TargetKind.ALL, ""
    if stream.startswith(GROUP_PREFIX) and len(stream) > len(GROUP_PREFIX):
        return TargetKind.GROUPS, stream[len(GROUP_PREFIX) :]
    if stream.startswith(FLAG_PREFIX) and len(stream) > len(FLAG_PREFIX):
        return TargetKind.FLAGS, stream[len(FLAG_PREFIX) :]
    raise ValueError(f"{stream!r} is not a stream name: group:<name>, flag:<name> or all")


# Epochs and send ids need to be unique, not secret (commands are signed; what a client must not guess is
# its resume token, which is secrets'): they come from the random module's generator - seeded from
# os.urandom, and again in a forked child - without os.urandom's system call (a history send made two: both
# ids took 1.0 us, now 0.5 us, timeit on a 2-core VM).


def new_epoch() -> str:
    return f"{random.getrandbits(32):08x}"


def new_send_id() -> str:
    return f"{random.getrandbits(64):016x}"


def _compile(raw: str, setting: str) -> tuple[re.Pattern[str] | None, re.Pattern[str] | None, bool]:
    """``"group:room-*,flag:*,all"`` -> (group regex, flag regex, all?)."""
    groups: list[str] = []
    flags: list[str] = []
    everyone = False
    for part in (p.strip() for p in raw.split(",")):
        if not part:
            continue
        if part == ALL_STREAM:
            everyone = True
        elif part.startswith(GROUP_PREFIX) and len(part) > len(GROUP_PREFIX):
            groups.append(part[len(GROUP_PREFIX) :])
        elif part.startswith(FLAG_PREFIX) and len(part) > len(FLAG_PREFIX):
            flags.append(part[len(FLAG_PREFIX) :])
        else:
            raise ConfigError(setting, f"{part!r} is not group:<pattern>, flag:<pattern> or all")

    def regex(patterns: list[str]) -> re.Pattern[str] | None:
        if not patterns:
            return None
        alternatives = ("(?:" + ".*".join(map(re.escape, p.split("*"))) + ")" for p in patterns)
        # the whole name, whichever pattern matches it; ``*`` matches any run, newlines too
        return re.compile("(?:" + "|".join(alternatives) + r")\Z", re.DOTALL)

    return regex(groups), regex(flags), everyone


@dataclass(frozen=True, slots=True)
class Policy:
    """Which targets keep a history (``FANOUT_HISTORY``) and which are cache targets (``FANOUT_CACHE``,
    which implies a history of at least one entry)."""

    history: str = ""
    cache: str = ""
    _history: tuple[re.Pattern[str] | None, re.Pattern[str] | None, bool] = field(
        init=False, repr=False, compare=False
    )
    _cache: tuple[re.Pattern[str] | None, re.Pattern[str] | None, bool] = field(
        init=False, repr=False, compare=False
    )
    #: stream -> whether it keeps its sends, for the streams asked about lately (every send asks)
    _known: dict[str, bool] = field(init=False, repr=False, compare=False, default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_history", _compile(self.history, "FANOUT_HISTORY"))
        object.__setattr__(self, "_cache", _compile(self.cache, "FANOUT_CACHE"))

    @property
    def enabled(self) -> bool:
        """Whether any target keeps a history."""
        return any(self._history) or any(self._cache)

    @staticmethod
    def _match(compiled: tuple[re.Pattern[str] | None, re.Pattern[str] | None, bool], stream: str) -> bool:
        groups, flags, everyone = compiled
        if stream == ALL_STREAM:
            return everyone
        if stream.startswith(GROUP_PREFIX):
            return groups is not None and groups.match(stream[len(GROUP_PREFIX) :]) is not None
        if stream.startswith(FLAG_PREFIX):
            return flags is not None and flags.match(stream[len(FLAG_PREFIX) :]) is not None
        return False

    def is_history(self, stream: str) -> bool:
        """Whether ``stream`` keeps its sends (history or cache target)."""
        known = self._known.get(stream)
        if known is None:
            known = self._match(self._history, stream) or self._match(self._cache, stream)
            if len(self._known) >= KNOWN_STREAMS:
                self._known.clear()
            self._known[stream] = known
        return known

    def is_cache(self, stream: str) -> bool:
        return self._match(self._cache, stream)

    def streams_of(self, target: Target) -> tuple[str, ...]:
        """The streams a send to ``target`` is appended to (client-id targets have none)."""
        if target.kind is TargetKind.ALL:
            return (ALL_STREAM,) if self.is_history(ALL_STREAM) else ()
        if target.kind is TargetKind.GROUPS:
            prefix = GROUP_PREFIX
        elif target.kind is TargetKind.FLAGS:
            prefix = FLAG_PREFIX
        else:
            return ()
        names = target.names
        if len(names) == 1:  # (most sends)
            stream = prefix + names[0]
            return (stream,) if self.is_history(stream) else ()
        return tuple(s for s in dict.fromkeys(prefix + n for n in names) if self.is_history(s))

    def streams_of_member(self, groups: Iterable[str], flag: str | None) -> set[str]:
        """The history streams a connection with these groups and this flag is in (``all`` included)."""
        streams = {s for s in map(group_stream, groups) if self.is_history(s)}
        if flag is not None and self.is_history(flag_stream(flag)):
            streams.add(flag_stream(flag))
        if self.is_history(ALL_STREAM):
            streams.add(ALL_STREAM)
        return streams

    def describe(self) -> str:
        """What nodes announce and ServerUtils compare (see ``ConfigMismatch``)."""
        return f"history={self.history};cache={self.cache}"


@dataclass(frozen=True, slots=True)
class Entry:
    """One stored send, as the store hands it back: its offset in the stream read, the send's id (the
    same in every stream it went to), its payload and kind, its exclusions, and its offsets in the
    other streams it was appended to in the same send (``positions``; stream -> offset)."""

    offset: int
    sid: str
    payload: bytes
    binary: bool = False
    json: bool = False
    exclude: tuple[str, ...] = ()
    positions: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Page:
    """What :meth:`HistoryStore.read` answers: the stream's epoch and top offset, the entries asked for
    (oldest first), and ``first``, the oldest offset the stream still keeps (``offset + 1`` when it keeps
    none) - entries after ``since`` are complete iff ``first <= since + 1``."""

    epoch: str
    offset: int
    entries: tuple[Entry, ...]
    first: int

    def complete_after(self, since: int) -> bool:
        """Whether every entry after ``since`` is still kept (none trimmed or expired)."""
        return self.first <= since + 1


@dataclass(frozen=True, slots=True)
class Replayed:
    """One send of a resume's replay: its payload, and its offsets in the replayed streams it is in."""

    payload: bytes
    binary: bool
    json: bool
    offsets: dict[str, int]
    exclude: tuple[str, ...]


def cut_replay(pages: Mapping[str, Page], tops: Mapping[str, int]) -> tuple[dict[str, Page], dict[str, int]]:
    """The pages of a resume's replay, each cut before its first send that was appended after another
    stream of the resume was read; and each stream's offset up to which the replay goes.

    The pages are read one after the other, so a later one may hold a send to two of the connection's
    streams that an earlier one (``tops``: each stream's offset when it was read, replayed or not) does not
    have. Replayed, it would carry only the later stream's offset, and its live copy (held while the
    connection resumes) would then bring it a second time with the other's. Cut, it and what follows it in
    its stream reach the connection live, after the replay, once, with all their offsets (they were
    appended after the connection was in those streams)."""
    kept = {stream: list(page.entries) for stream, page in pages.items()}
    tops = dict(tops)
    cut = True
    while cut:
        cut = False
        for stream, entries in kept.items():
            for i, entry in enumerate(entries):
                if any(other in tops and offset > tops[other] for other, offset in entry.positions.items()):
                    del entries[i:]
                    tops[stream] = entry.offset - 1
                    cut = True
                    break
    return {s: replace(page, entries=tuple(kept[s])) for s, page in pages.items()}, tops


def merge_replay(pages: Mapping[str, Page]) -> list[Replayed]:
    """The entries of several streams' pages as one replay: each send once, with its offsets in every
    stream it is in, each stream's entries in offset order (a send is taken when it is at the head of
    every page it is in; sends whose orders cross - possible only across Redis Cluster slots - are taken
    in the first stream's order)."""
    queues = {stream: list(page.entries) for stream, page in pages.items()}
    heads = dict.fromkeys(queues, 0)
    where: dict[str, dict[str, int]] = {}
    for stream, entries in queues.items():
        for entry in entries:
            where.setdefault(entry.sid, {})[stream] = entry.offset
    done: set[str] = set()
    out: list[Replayed] = []

    def head(stream: str) -> Entry | None:
        entries, i = queues[stream], heads[stream]
        while i < len(entries) and entries[i].sid in done:
            i += 1
        heads[stream] = i
        return entries[i] if i < len(entries) else None

    while True:
        candidates = [first for stream in queues if (first := head(stream)) is not None]
        if not candidates:
            return out
        chosen = next(
            (
                entry
                for entry in candidates
                if all((h := head(other)) is not None and h.sid == entry.sid for other in where[entry.sid])
            ),
            candidates[0],
        )
        done.add(chosen.sid)
        out.append(Replayed(chosen.payload, chosen.binary, chosen.json, where[chosen.sid], chosen.exclude))


# --------------------------------------------------------------------------- the positions line


def attach_positions(message: bytes, positions: Positions) -> bytes:
    """The bus message with its positions line in front (see the module docstring)."""
    if not positions:
        return message
    line = orjson.dumps({stream: [offset, epoch] for stream, (epoch, offset) in positions.items()})
    return POSITIONS_PREFIX + line + b"\n" + message


def split_positions(data: bytes) -> tuple[Positions | None, bytes]:
    """``(positions, message)`` of a bus message; ``(None, data)`` when it has no positions line.

    Raises ProtocolError for a malformed line.
    """
    if not data.startswith(POSITIONS_PREFIX):
        return None, data
    end = data.find(b"\n", len(POSITIONS_PREFIX))
    if end < 0:
        raise ProtocolError("positions line without its end")
    try:
        raw = orjson.loads(data[len(POSITIONS_PREFIX) : end])
    except orjson.JSONDecodeError as exc:
        raise ProtocolError(f"positions line is not JSON: {exc}") from None
    if not isinstance(raw, dict) or len(raw) > MAX_POSITIONS:
        raise ProtocolError("positions line is not an object of at most 1000 streams")
    positions: Positions = {}
    for stream, value in raw.items():
        if (
            not isinstance(value, list)
            or len(value) != 2
            or type(value[0]) is not int
            or value[0] < 1
            or not isinstance(value[1], str)
        ):
            raise ProtocolError(f"bad position for {stream!r}: {value!r}")
        positions[stream] = (value[1], value[0])
    return positions, data[end + 1 :]


__all__ = [
    "ALL_STREAM",
    "MAX_HISTORY_SIZE",
    "META_TTL",
    "Entry",
    "Page",
    "Policy",
    "Positions",
    "Replayed",
    "attach_positions",
    "flag_stream",
    "group_stream",
    "merge_replay",
    "new_epoch",
    "new_send_id",
    "parse_stream",
    "split_positions",
]
