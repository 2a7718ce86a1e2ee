"""Client events for business workers: what a node forwards, as a value and as bytes. Pure.

A node forwards the events named by ``FANOUT_EVENTS`` (``open``, ``message``, ``close``) to the worker
tier. Each event belongs to one connection and goes to that connection's *shard* (:func:`shard_of`): a
shard is handled by one worker at a time, in order, so a connection's events are handled in the order
they happened and never two at once, while connections of different shards - and different connections
of one shard - are handled in parallel.

An event travels as two byte strings: a JSON header (:func:`encode`) and the raw message data (the
payload of a ``message`` event, empty otherwise), so binary data is never base64-encoded.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import orjson

from .exceptions import ProtocolError
from .protocol import too_deep

#: how many shards the events of a namespace are spread over (FANOUT_EVENT_SHARDS)
DEFAULT_SHARDS = 16
#: close code and reason of the close events the tier makes for the connections of a node that died
NODE_LOST_CODE = 1006
NODE_LOST_REASON = "node lost"


class EventKind(StrEnum):
    OPEN = "open"
    MESSAGE = "message"
    CLOSE = "close"
    PRESENCE = "presence"


FORWARDABLE = frozenset({EventKind.OPEN, EventKind.MESSAGE, EventKind.CLOSE})


def parse_kinds(raw: str, setting: str = "FANOUT_EVENTS") -> frozenset[EventKind]:
    """``"open,message,close"`` -> the kinds; raises ConfigError for an unknown one."""
    from .exceptions import ConfigError

    kinds = set()
    for item in raw.split(","):
        name = item.strip().lower()
        if not name:
            continue
        try:
            kind = EventKind(name)
        except ValueError:
            kind = None
        if kind is None or kind not in FORWARDABLE:
            accepted = ", ".join(sorted(k.value for k in FORWARDABLE))
            raise ConfigError(setting, f"unknown event {item.strip()!r}; accepted: {accepted}")
        kinds.add(kind)
    return frozenset(kinds)


def shard_of(client_id: str, shards: int) -> int:
    """The shard of a connection: stable for its whole life, spread evenly over ``shards``."""
    return zlib.crc32(client_id.encode()) % shards


@dataclass(frozen=True, slots=True)
class Event:
    """One client event, as a worker's handler receives it (``event.util`` is set by the worker)."""

    kind: EventKind
    event_id: str  #: ``<client id>:<n>``: unique, and the same when the event is redelivered
    client_id: str
    node_id: str  #: the owning node instance (what ``get_nodes()`` calls ``instance``)
    flag: str | None = None
    groups: tuple[str, ...] = ()
    session: dict[str, Any] = field(default_factory=dict)  #: snapshot at the time of the event
    data: str | bytes | None = None  #: message events: ``str`` for text frames, ``bytes`` for binary
    request: dict[str, Any] | None = None  #: open events: path, query, headers, cookies, remote
    #: open events of a fanout.v1 connection that resumed: the client id of the connection it took over
    resumed_from: str | None = None
    code: int | None = None  #: close events
    reason: str | None = None  #: close events
    sent_at: float = 0.0  #: Unix time the node made the event
    seq: int = 0  #: the event's number among its connection's events (open is 1)
    session_version: int = 0  #: how many session changes the node had applied when it made the event
    redelivered: bool = False  #: a worker had it before and did not finish it
    #: presence events (kind ``presence``): the group, the flag and ``join``/``leave``
    group: str | None = None
    change: str | None = None
    util: Any = None


def event_id(client_id: str, seq: int) -> str:
    return f"{client_id}:{seq}"


def encode(event: Event) -> tuple[bytes, bytes]:
    """``(header, data)``: a JSON header and the raw data (message payload, else empty)."""
    header: dict[str, Any] = {
        "k": event.kind.value,
        "id": event.event_id,
        "c": event.client_id,
        "n": event.node_id,
        "q": event.seq,
        "ts": round(event.sent_at * 1000),
    }
    if event.flag is not None:
        header["f"] = event.flag
    if event.groups:
        header["g"] = list(event.groups)
    if event.session:
        header["s"] = event.session
    if event.session_version:
        header["sv"] = event.session_version
    data = b""
    if event.data is not None:
        if isinstance(event.data, bytes):
            header["b"] = True
            data = event.data
        else:
            data = event.data.encode()
    if event.request is not None:
        header["r"] = event.request
    if event.resumed_from is not None:
        header["rf"] = event.resumed_from
    if event.code is not None:
        header["code"] = event.code
    if event.reason is not None:
        header["reason"] = event.reason
    if event.group is not None:
        header["gr"] = event.group
    if event.change is not None:
        header["ch"] = event.change
    return orjson.dumps(header), data


def decode(header_bytes: bytes, data: bytes, *, redelivered: bool = False) -> Event:
    """The event of a stored ``(header, data)``; raises ProtocolError if it is not one."""
    try:
        h = orjson.loads(header_bytes)
        if not isinstance(h, dict):
            raise TypeError("not an object")
        kind = EventKind(h["k"])
        session = h.get("s", {})
        if not isinstance(session, dict) or too_deep(session):
            raise TypeError("bad session")
        payload: str | bytes | None = None
        if kind is EventKind.MESSAGE:
            payload = bytes(data) if h.get("b") else bytes(data).decode()
        groups = h.get("g", [])
        if not isinstance(groups, list) or not all(isinstance(g, str) for g in groups):
            raise TypeError("bad groups")
        return Event(
            kind=kind,
            event_id=_str(h["id"]),
            client_id=_str(h["c"]),
            node_id=_str(h["n"]),
            flag=_opt_str(h.get("f")),
            groups=tuple(groups),
            session=session,
            data=payload,
            request=h.get("r"),
            resumed_from=_opt_str(h.get("rf")),
            code=h.get("code"),
            reason=_opt_str(h.get("reason")),
            sent_at=float(h.get("ts", 0)) / 1000,
            seq=int(h.get("q", 0)),
            session_version=int(h.get("sv", 0)),
            redelivered=redelivered,
            group=_opt_str(h.get("gr")),
            change=_opt_str(h.get("ch")),
        )
    except (KeyError, TypeError, ValueError, UnicodeDecodeError, orjson.JSONDecodeError) as exc:
        raise ProtocolError(f"not a fanout event: {exc!r}") from None


def _str(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError("expected a string")
    return value


def _opt_str(value: Any) -> str | None:
    return None if value is None else _str(value)
