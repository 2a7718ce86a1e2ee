"""The ``fanout.v1`` client protocol as a client speaks it, without I/O (docs/continuity.md, "Clients").

:func:`read_frame` turns a node's frame into a typed value; :func:`message_frame` and :func:`resume_frame`
write the client's. :class:`Tracker` is one client's state across its connections — the positions of its
streams, the last resume token, what it holds while a resume is under way — fed frame by frame, answering
with what to do (:class:`Deliver`, :class:`SendFrame`, :class:`Ready`, :class:`Resumed`).
``fanout.client.Client`` is the I/O around it, on the ``websockets`` library; a client on another library
(or a test) can use it as it is.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from typing import Any, NamedTuple, TypeAlias

import orjson

from .protocol import dump_json

__all__ = [
    "SUBPROTOCOL",
    "Deliver",
    "Joined",
    "Left",
    "Message",
    "Position",
    "Ready",
    "Resumed",
    "SendFrame",
    "Tracker",
    "Welcome",
    "message_frame",
    "read_frame",
    "resume_frame",
]

SUBPROTOCOL = "fanout.v1"


class Position(NamedTuple):
    """Where a client is in a history stream: the last offset it received in that epoch."""

    epoch: str
    offset: int


# -- the node's frames ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Welcome:
    """The first frame: the client id, the resume token (None without a store), the positions."""

    client_id: str
    token: str | None
    streams: dict[str, Position]


@dataclass(frozen=True, slots=True)
class Message:
    """A delivery: the data (``bytes`` for ``data_b64``) and its offset in each of the client's streams."""

    data: Any
    streams: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Joined:
    stream: str
    position: Position


@dataclass(frozen=True, slots=True)
class Left:
    stream: str


@dataclass(frozen=True, slots=True)
class Resumed:
    """The node's answer to a resume, after it replayed what was missed.

    ``recovered`` is true only if every requested stream was: when it is false, something may be missing
    (the entries were trimmed or expired, the epoch changed, the token was unknown or used) and the
    application should reload its state from its own source. ``streams``: per stream, as the node sent it,
    ``{"recovered": bool, "epoch": str, "offset": int}``."""

    recovered: bool
    streams: dict[str, dict[str, Any]] = field(default_factory=dict)


NodeFrame: TypeAlias = Welcome | Message | Joined | Left | Resumed


def _position(value: Any) -> Position | None:
    if isinstance(value, dict) and type(value.get("offset")) is int and isinstance(value.get("epoch"), str):
        return Position(value["epoch"], value["offset"])
    return None


def _positions(value: Any) -> dict[str, Position]:
    found = {str(s): _position(p) for s, p in value.items()} if isinstance(value, dict) else {}
    return {s: p for s, p in found.items() if p is not None}


def _message(frame: dict[str, Any]) -> Message | None:
    offsets = frame.get("streams")
    streams = {str(s): o for s, o in offsets.items() if type(o) is int} if isinstance(offsets, dict) else {}
    if "data_b64" in frame:
        try:
            return Message(base64.b64decode(str(frame["data_b64"]), validate=True), streams)
        except ValueError:
            return None
    return Message(frame.get("data"), streams)


def _resumed(frame: dict[str, Any]) -> Resumed:
    streams = frame.get("streams")
    answers = (
        {str(s): v for s, v in streams.items() if isinstance(v, dict)} if isinstance(streams, dict) else {}
    )
    return Resumed(frame.get("recovered") is True, answers)


def read_frame(text: str | bytes) -> NodeFrame | None:
    """A node's ``fanout.v1`` frame as a typed value; None for what is not one (the node sends none)."""
    try:
        frame = orjson.loads(text)
    except orjson.JSONDecodeError:
        return None
    kind = frame.get("type") if isinstance(frame, dict) else None
    if kind == "message":
        return _message(frame)
    if kind == "welcome" and isinstance(frame.get("client_id"), str):
        token = frame.get("resume")
        return Welcome(
            frame["client_id"], token if isinstance(token, str) else None, _positions(frame.get("streams"))
        )
    if kind in ("joined", "left") and isinstance(frame.get("stream"), str):
        position = _position(frame)
        if kind == "left":
            return Left(frame["stream"])
        return Joined(frame["stream"], position) if position is not None else None
    if kind == "resumed":
        return _resumed(frame)
    return None


# -- the client's frames --------------------------------------------------------------------------


def message_frame(data: object) -> str:
    """``data`` as a ``message`` frame: a ``str`` as a JSON string, bytes as ``data_b64``, anything else as
    its JSON value. Raises PayloadError for what JSON cannot hold."""
    if isinstance(data, bytes | bytearray | memoryview):
        return orjson.dumps({"type": "message", "data_b64": base64.b64encode(bytes(data)).decode()}).decode()
    return (b'{"type":"message","data":' + dump_json(data) + b"}").decode()


def resume_frame(token: str, positions: dict[str, Position]) -> str:
    streams = {s: {"epoch": p.epoch, "offset": p.offset} for s, p in positions.items()}
    return orjson.dumps({"type": "resume", "token": token, "streams": streams}).decode()


# -- one client's state ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Deliver:
    """Hand ``data`` to the application."""

    data: Any


@dataclass(frozen=True, slots=True)
class SendFrame:
    """Send ``text`` to the node now (the resume: before anything else)."""

    text: str


@dataclass(frozen=True, slots=True)
class Ready:
    """The connection may carry the application's messages (welcomed, resume sent)."""


Action: TypeAlias = Deliver | SendFrame | Ready | Resumed


@dataclass(slots=True)
class _Resume:
    """A resume under way on the current connection."""

    asked: set[str]  #: the streams it asks for
    welcomed: dict[str, Position] = field(default_factory=dict)  #: this connection's welcome's positions
    held: list[Message] = field(default_factory=list)  #: their messages, until ``resumed``


class Tracker:
    """One client's ``fanout.v1`` state across its connections.

    Call :meth:`opened` when a ``fanout.v1`` connection opens, :meth:`receive` with each of its frames
    (:func:`read_frame`), :meth:`closed` when it ends; act on what :meth:`receive` returns, in order.

    * The first connection sends no resume; every later one sends, once welcomed, the last welcome's token
      and the positions received so far (not the new welcome's, which are ahead of what the replay brings).
    * Until ``resumed``, the messages of the streams the resume asks for are held: a node may deliver live
      sends to the new connection before it reads the resume, ahead of the replay that brings them again.
      At ``resumed`` a held message that came again later is dropped (counted in ``duplicates``) and the
      rest are delivered in arrival order; if the connection ends first they are dropped and the next
      resume asks for them again (positions only move with what was delivered).
    * A message whose offsets are all at or below the positions is a duplicate: dropped and counted.
    """

    def __init__(self) -> None:
        #: the last position delivered in each history stream the client is in
        self.positions: dict[str, Position] = {}
        #: the last welcome's resume token
        self.token: str | None = None
        #: messages dropped because every offset they carry was delivered already
        self.duplicates = 0
        self._resume: _Resume | None = None
        self._welcomed = False

    def opened(self) -> None:
        """A ``fanout.v1`` connection opened: it will resume if there is a token."""
        self._welcomed = False
        self._resume = _Resume(set(self.positions)) if self.token is not None else None

    def closed(self) -> None:
        self._resume = None

    def receive(self, frame: NodeFrame | None) -> list[Action]:
        if isinstance(frame, Message):
            return self._message(frame)
        if isinstance(frame, Welcome):
            return self._welcome(frame) if not self._welcomed else []
        if isinstance(frame, Joined):
            self.positions[frame.stream] = frame.position
        elif isinstance(frame, Left):
            self.positions.pop(frame.stream, None)
        elif isinstance(frame, Resumed):
            return self._resumed(frame)
        return []

    def _welcome(self, welcome: Welcome) -> list[Action]:
        self._welcomed = True
        previous, self.token = self.token, welcome.token
        resume = self._resume
        if previous is None or resume is None:
            self._resume = None
            self.positions = dict(welcome.streams)
            return [Ready()]
        resume.welcomed = dict(welcome.streams)
        frame = resume_frame(previous, self.positions)
        self.positions = {**welcome.streams, **self.positions}
        return [SendFrame(frame), Ready()]

    def _message(self, message: Message) -> list[Action]:
        resume = self._resume
        if resume is not None and not resume.asked.isdisjoint(message.streams):
            resume.held.append(message)
            return []
        offsets, known = message.streams, self.positions
        if offsets and all(s in known and o <= known[s].offset for s, o in offsets.items()):
            self.duplicates += 1
            return []
        for stream, offset in offsets.items():
            kept = known.get(stream)
            if kept is None:
                known[stream] = Position("", offset)  # never announced: resumes as not recovered
            elif offset > kept.offset:
                known[stream] = Position(kept.epoch, offset)
        return [Deliver(message.data)]

    def _resumed(self, resumed: Resumed) -> list[Action]:
        resume, self._resume = self._resume, None
        actions: list[Action] = []
        if resume is not None:
            for message in _first_copies_dropped(resume.held, self):
                actions += self._message(message)
            # a stream it asked for that the node did not answer for: the connection is not in it (any
            # more), unless this connection's welcome has it
            for stream in resume.asked - set(resumed.streams):
                if stream in resume.welcomed:
                    self.positions[stream] = resume.welcomed[stream]
                else:
                    self.positions.pop(stream, None)
        for stream, answer in resumed.streams.items():
            position = _position(answer)
            if position is not None:
                self.positions[stream] = position
        return [*actions, resumed]


def _first_copies_dropped(held: list[Message], tracker: Tracker) -> list[Message]:
    """``held`` without the messages that came again later (the same offset in one of their streams): the
    live copies that overtook the replay; the later copy is in the replay's order."""
    later: set[tuple[str, int]] = set()
    kept: list[Message] = []
    for message in reversed(held):
        pairs = set(message.streams.items())
        if pairs & later:
            tracker.duplicates += 1
            continue
        later |= pairs
        kept.append(message)
    return kept[::-1]
