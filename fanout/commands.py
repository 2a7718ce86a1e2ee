"""The command model: every operation on the bus as a typed, immutable value.

Commands are built by ServerUtil (and the node's own connection objects), published by a backend,
and applied by nodes. Turning them into bytes and back is :mod:`fanout.protocol`'s job; this module
only says what each command means. No I/O here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, TypeAlias, TypedDict

Json: TypeAlias = Any  # an orjson-serialisable value


class TargetKind(StrEnum):
    ALL = "all"
    CLIENTS = "c"
    FLAGS = "f"
    GROUPS = "g"


@dataclass(frozen=True, slots=True)
class Target:
    """Whom a send or close is for: every connection, or those with these client ids/flags/groups."""

    kind: TargetKind
    names: tuple[str, ...] = ()

    @classmethod
    def all(cls) -> Target:
        return cls(TargetKind.ALL)

    @classmethod
    def clients(cls, *ids: str) -> Target:
        return cls(TargetKind.CLIENTS, ids)

    @classmethod
    def flags(cls, *names: str) -> Target:
        return cls(TargetKind.FLAGS, names)

    @classmethod
    def groups(cls, *names: str) -> Target:
        return cls(TargetKind.GROUPS, names)


@dataclass(frozen=True, slots=True)
class Request:
    """Attached when the publisher waits for answers: nodes reply to ``reply_to`` quoting ``id``."""

    id: str
    reply_to: str


@dataclass(frozen=True, slots=True)
class Send:
    """Deliver ``payload`` as one text (or binary) frame to every targeted connection, once."""

    target: Target
    payload: bytes
    binary: bool = False
    exclude: tuple[str, ...] = ()
    request: Request | None = None
    #: set when one send is published on several addresses, so a node that gets it twice applies it once
    dedupe_id: str | None = None
    #: the payload is JSON (the publisher's data was not a ``str``): a ``fanout.v1`` envelope carries it
    #: as a JSON value rather than as a JSON string
    json: bool = False
    #: a send to history streams: its id, the same in every stream it is stored in (fanout/history.py)
    sid: str | None = None
    #: its positions, ``{stream: (epoch, offset)}``: given by the store, read from the bus's positions
    #: line (never part of the signed message)
    positions: dict[str, tuple[str, int]] | None = field(default=None, compare=False)
    #: the publisher's ``idempotency_key``: a node applies a key once within FANOUT_IDEMPOTENCY_WINDOW and
    #: answers a repeat with the first's count (fanout/idempotency.py)
    idempotency_key: str | None = None


@dataclass(frozen=True, slots=True)
class Close:
    """Close every targeted connection with ``code`` and ``reason``; ``last`` (when set) is sent to each
    first, as its last frame (binary when ``binary``)."""

    target: Target
    code: int = 1000
    reason: str = ""
    exclude: tuple[str, ...] = ()
    request: Request | None = None
    dedupe_id: str | None = None
    last: bytes | None = None
    binary: bool = False


@dataclass(frozen=True, slots=True)
class SendBulk:
    """A different payload per recipient: ``items`` are (client id or flag, payload, binary), in order.

    ``kind`` is ``TargetKind.CLIENTS`` or ``TargetKind.FLAGS``. Each connection gets only the payloads of
    the items that name it (or its flag), in the order of the items.
    """

    kind: TargetKind
    items: tuple[tuple[str, bytes, bool], ...]
    request: Request | None = None
    #: derived from the call's ``idempotency_key``, one per command of the call (see :class:`Send`)
    idempotency_key: str | None = None


@dataclass(frozen=True, slots=True)
class CloseGuests:
    """Close every connection with no flag that has been open longer than ``older_than`` seconds."""

    older_than: float
    code: int = 1000
    reason: str = ""
    last: bytes | None = None
    binary: bool = False
    request: Request | None = None


@dataclass(frozen=True, slots=True)
class JoinGroup:
    client_id: str
    groups: tuple[str, ...]
    request: Request | None = None


@dataclass(frozen=True, slots=True)
class LeaveGroup:
    client_id: str
    groups: tuple[str, ...]
    request: Request | None = None


@dataclass(frozen=True, slots=True)
class DissolveGroup:
    """Every member of ``group``, on every node, leaves it."""

    group: str
    request: Request | None = None


@dataclass(frozen=True, slots=True)
class Bind:
    """Bind ``client_id`` to ``flag``, replacing the flag it had (``replace=False``: only if it has none)."""

    client_id: str
    flag: str
    request: Request | None = None
    replace: bool = True


@dataclass(frozen=True, slots=True)
class Unbind:
    client_id: str
    request: Request | None = None


@dataclass(frozen=True, slots=True)
class SetSession:
    """Replace (``merge=False``) or update (``merge=True``) the session dict of ``client_id``."""

    client_id: str
    data: dict[str, Json]
    merge: bool = False
    request: Request | None = None


class QueryKind(StrEnum):
    EXISTS = "exists"  #: arg: client id -> bool
    SESSION = "session"  #: arg: client id -> dict | None
    FLAG_OF = "flag_of"  #: arg: client id -> str | None
    FLAG_EXISTS = "flag_exists"  #: arg: flag -> bool
    FLAG_CLIENTS = "flag_clients"  #: arg: flag -> [client id]
    CONNECTIONS = "connections"  #: -> int
    GROUP_COUNT = "group_count"  #: arg: group -> int
    GROUP_CLIENTS = "group_clients"  #: arg: group -> [client id]
    GROUPS = "groups"  #: -> [group]
    NODE = "node"  #: -> the node's record (as in its heartbeat)
    IN_GROUP = "in_group"  #: arg: client id, args: [group] -> bool
    GROUP_FLAGS = "group_flags"  #: arg: group -> [distinct flags of its local members]
    FLAGS = "flags"  #: -> [flags bound locally]
    GROUP_SESSIONS = "group_sessions"  #: arg: group -> {client id: session}
    FLAGS_CLIENTS = "flags_clients"  #: args: flags -> {flag: [client id]}
    PRESENCE = "presence"  #: arg: group -> {flag: local connections of that flag in the group}


@dataclass(frozen=True, slots=True)
class Query:
    kind: QueryKind
    request: Request
    arg: str = ""
    args: tuple[str, ...] = ()  #: further arguments (the group of IN_GROUP, the flags of FLAGS_CLIENTS)


@dataclass(frozen=True, slots=True)
class Reply:
    """A node's answer to a request: ``result`` is the node's part of the answer.

    ``error`` is set instead when the node could not do what was asked or could not encode its
    answer: ``(exception class name, message)``, raised again on the caller's side.
    """

    request_id: str
    node: str
    result: Json = None
    error: tuple[str, str] | None = None
    #: a large answer comes in ``parts`` replies (lists concatenated, objects merged); this is one of them
    part: int = 0
    parts: int = 1


class _NodeRecordKeys(TypedDict):
    node_id: str
    instance: str
    connections: int
    host: str
    port: int
    started_at: float
    mode: str
    signed: bool


class NodeRecord(_NodeRecordKeys, total=False):
    """One live node (or worker) as ``get_nodes()`` returns it: :meth:`NodeInfo.record`, ``extra`` merged in.

    (Two classes, not ``NotRequired``, so that ``__required_keys__`` is right at runtime too.)
    """

    healthy: bool  #: a node's: whether its backend link is up
    #: a node's history settings (FANOUT_HISTORY, FANOUT_CACHE, FANOUT_HISTORY_SIZE and _TTL), which a
    #: publisher's must match (``fanout.history_api``)
    history: dict[str, Json]
    #: a node's FANOUT_IDEMPOTENCY_WINDOW, which a publisher's keyed sends must match
    idempotency_window: float
    #: a node's that forwards client events (FANOUT_EVENTS), and a worker's: its FANOUT_EVENT_SHARDS
    event_shards: int
    role: str  #: a worker's: ``"worker"``
    shards: list[int]  #: a worker's: the shards it owns


@dataclass(frozen=True, slots=True)
class NodeInfo:
    """What a node says about itself in every heartbeat and in ``get_nodes()``."""

    instance: str  #: routing identity, ``<node_id>.<boot>``
    node_id: str  #: the stable name (FANOUT_NODE_ID)
    connections: int
    ttl: float  #: seconds after which a silent node counts as dead
    started_at: float = 0.0
    host: str = ""
    port: int = 0
    mode: str = ""  #: the node's FANOUT_MODE, so publishers can tell when theirs differs
    signed: bool = False  #: whether the node signs (and so requires signed commands)
    extra: dict[str, Json] = field(default_factory=dict)

    def record(self) -> dict[str, Json]:
        return {
            "node_id": self.node_id,
            "instance": self.instance,
            "connections": self.connections,
            "host": self.host,
            "port": self.port,
            "started_at": self.started_at,
            "mode": self.mode,
            "signed": self.signed,
            **self.extra,
        }


@dataclass(frozen=True, slots=True)
class Heartbeat:
    node: NodeInfo


@dataclass(frozen=True, slots=True)
class PresenceSnapshot:
    """A node's whole presence contribution: for each presence group, the flags of its local members."""

    node: str  #: the node instance
    groups: dict[str, tuple[str, ...]] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class PresenceChange:
    """The presence leader announced a join or leave: the other nodes take it as announced."""

    node: str  #: the announcing node instance
    group: str
    flag: str
    change: str  #: "join" or "leave"


@dataclass(frozen=True, slots=True)
class Bye:
    """A node leaving cleanly: drop it from the live set now rather than after its ttl."""

    instance: str


Command: TypeAlias = (
    Send
    | Close
    | SendBulk
    | CloseGuests
    | JoinGroup
    | LeaveGroup
    | DissolveGroup
    | Bind
    | Unbind
    | SetSession
    | Query
    | Reply
    | Heartbeat
    | PresenceSnapshot
    | PresenceChange
    | Bye
)
