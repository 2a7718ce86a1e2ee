"""Wire format v2: commands <-> bytes. Pure; see docs/protocol.md for the spec and test vectors.

A message is::

    b"v2;" + SIGNATURE + b";" + HEADER + b"\\n" + PAYLOAD

* ``HEADER`` is one line of JSON (an object whose ``"op"`` names the command) that also carries the
  *envelope*: who sent the message and when (``o`` sender id, ``s`` the sender's running count, ``ts``
  milliseconds since the epoch) and, when signed, the namespace it was signed for (``ns``);
* ``PAYLOAD`` is the raw bytes of a send's data (empty for other commands) - binary payloads travel
  as they are, without base64;
* ``SIGNATURE`` is empty, or, when a secret is configured, the lower-case hex HMAC-SHA256 of
  ``HEADER + b"\\n" + PAYLOAD`` under that secret. A signed header must carry ``ns``, ``ts``, ``o`` and
  ``s``, so the signature also covers the namespace, the time and a per-sender count: a reader rejects a
  command signed for another namespace, and :mod:`fanout.receive` rejects one replayed later or twice.

Every value read from the bus is bounded (:data:`MAX_DEPTH`, :data:`MAX_NAMES`, :data:`MAX_TTL`), and the
encoder refuses what the decoder would refuse, so whatever one endpoint publishes, the others can read.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson

from .commands import (
    Bind,
    Bye,
    Close,
    CloseGuests,
    Command,
    DissolveGroup,
    Heartbeat,
    JoinGroup,
    LeaveGroup,
    NodeInfo,
    PresenceChange,
    PresenceSnapshot,
    Query,
    QueryKind,
    Reply,
    Request,
    Send,
    SendBulk,
    SetSession,
    Target,
    TargetKind,
    Unbind,
)
from .exceptions import BadSignature, MessageTooLarge, PayloadError, ProtocolError, UnsupportedVersion
from .history import POSITIONS_PREFIX, Positions, split_positions

VERSION = 2
_PREFIX = b"v2;"
_SIG_LEN = 64

#: deepest nesting of JSON values (sessions, reply results, heartbeat extras) either way
MAX_DEPTH = 32
#: most names in one target, exclusion or group list
MAX_NAMES = 100_000
#: longest a heartbeat may claim a node stays alive without another one, seconds
MAX_TTL = 60.0
#: longest idempotency key on the bus (``ik``): a caller's key (at most 128 characters) and what a bulk send
#: derives from it for each of its commands
MAX_KEY = 160
#: what a heartbeat's ``mode`` may say: a FANOUT_MODE, or nothing (the empty string)
NODE_MODES = frozenset({"", "fanout", "routing"})


class WrongNamespace(BadSignature):
    """A signed command whose ``ns`` is not the reader's namespace (replayed from another deployment)."""

    reason = "namespace"


@dataclass(frozen=True, slots=True)
class Envelope:
    """What a message says about itself, besides the command: sender, count, time, namespace."""

    origin: str | None = None  #: the sender's endpoint id (``o``)
    seq: int = 0  #: the sender's running count, one more per message (``s``)
    sent_at: float | None = None  #: Unix time of the publish, seconds (``ts`` is milliseconds)
    namespace: str | None = None  #: the namespace a signed message was signed for (``ns``)


NO_ENVELOPE = Envelope()


class Encoder:
    """One endpoint's encoder: stamps every message with its id, a running count and the time.

    The count is what makes each signed message unique (see :mod:`fanout.receive`); the endpoint owns
    exactly one encoder so that every message it sends - commands, replies, heartbeats - takes the next
    number. The caller passes the clock.
    """

    __slots__ = ("_seq", "namespace", "origin", "secret")

    def __init__(self, origin: str, namespace: str, secret: bytes | None = None) -> None:
        self.origin = origin
        self.namespace = namespace
        self.secret = secret
        self._seq = 0

    def encode(self, command: Command, now: float) -> bytes:
        self._seq += 1
        envelope = Envelope(self.origin, self._seq, now, self.namespace if self.secret else None)
        return encode(command, self.secret, envelope)


# --------------------------------------------------------------------------- encoding


def encode(command: Command, secret: bytes | None = None, envelope: Envelope = NO_ENVELOPE) -> bytes:
    """Serialize ``command`` with ``envelope``; sign it when ``secret`` is given.

    Raises:
        PayloadError: a value is nested deeper than :data:`MAX_DEPTH`, a list is longer than
            :data:`MAX_NAMES`, a string has lone surrogates, or the envelope lacks what signing needs.
    """
    header, payload = _to_header(command)
    if envelope.origin is not None:
        header["o"] = envelope.origin
        header["s"] = envelope.seq
    if envelope.sent_at is not None:
        header["ts"] = round(envelope.sent_at * 1000)
    if isinstance(command, Heartbeat) and command.node.signed and not secret:
        raise PayloadError("a heartbeat saying its node signs must be signed itself")
    if secret:
        if envelope.namespace is None or envelope.sent_at is None or envelope.origin is None:
            raise PayloadError("a signed message needs an envelope with origin, time and namespace")
        header["ns"] = envelope.namespace
    try:
        body = orjson.dumps(header) + b"\n" + payload
    except TypeError as exc:  # orjson: lone surrogates, non-string keys, unknown types
        raise PayloadError(f"{header['op']!r} command cannot be encoded: {exc}") from None
    if secret:
        sig = hmac.new(secret, body, hashlib.sha256).hexdigest().encode()
        return b"v2;" + sig + b";" + body
    return b"v2;;" + body


def _request(header: dict[str, Any], request: Request | None) -> None:
    if request is not None:
        header["rid"] = request.id
        header["rto"] = request.reply_to


def _names_out(names: tuple[str, ...], what: str) -> list[str]:
    if len(names) > MAX_NAMES:
        raise PayloadError(f"{what}: {len(names)} names, more than the limit of {MAX_NAMES}")
    return list(names)


def _key_out(key: str) -> str:
    if not 0 < len(key) <= MAX_KEY:
        raise PayloadError(f"idempotency key of {len(key)} characters: 1 to {MAX_KEY} are accepted")
    return key


def _key_in(value: Any) -> str | None:
    if value is None:
        return None
    key = _str(value, "ik")
    if not 0 < len(key) <= MAX_KEY:
        raise ValueError(f"ik of {len(key)} characters: 1 to {MAX_KEY} are accepted")
    return key


def _json_out(value: Any, what: str) -> Any:
    if too_deep(value):
        raise PayloadError(f"{what} is nested deeper than {MAX_DEPTH} levels")
    return value


def _targeted(op: str, cmd: Send | Close) -> dict[str, Any]:
    header: dict[str, Any] = {"op": op, "t": cmd.target.kind.value}
    if cmd.target.kind is not TargetKind.ALL:
        header["n"] = _names_out(cmd.target.names, "targets")
    if cmd.exclude:
        header["x"] = _names_out(cmd.exclude, "exclude")
    if cmd.dedupe_id is not None:
        header["mid"] = cmd.dedupe_id
    return header


def _to_header(cmd: Command) -> tuple[dict[str, Any], bytes]:
    payload = b""
    header: dict[str, Any]
    match cmd:
        case Send():
            header = _targeted("send", cmd)
            if cmd.binary:
                header["bin"] = True
            elif cmd.json:
                header["j"] = True
            if cmd.sid is not None:
                header["sid"] = cmd.sid
            if cmd.idempotency_key is not None:
                header["ik"] = _key_out(cmd.idempotency_key)
            payload = cmd.payload
        case Close():
            header = _targeted("close", cmd)
            header["code"] = cmd.code
            if cmd.reason:
                header["reason"] = cmd.reason
            payload = _last_frame(header, cmd.last, cmd.binary)
        case SendBulk():
            names, lengths, binary = [], [], []
            for name, data, is_binary in cmd.items:
                names.append(name)
                lengths.append(len(data))
                binary.append(is_binary)
            header = {"op": "bulk", "t": cmd.kind.value, "n": _names_out(tuple(names), "bulk"), "l": lengths}
            if any(binary):
                header["bin"] = binary
            if cmd.idempotency_key is not None:
                header["ik"] = _key_out(cmd.idempotency_key)
            payload = b"".join(data for _, data, _ in cmd.items)
        case CloseGuests():
            header = {"op": "close_guests", "age": cmd.older_than, "code": cmd.code}
            if cmd.reason:
                header["reason"] = cmd.reason
            payload = _last_frame(header, cmd.last, cmd.binary)
        case JoinGroup():
            header = {"op": "join", "c": cmd.client_id, "g": _names_out(cmd.groups, "groups")}
        case LeaveGroup():
            header = {"op": "leave", "c": cmd.client_id, "g": _names_out(cmd.groups, "groups")}
        case DissolveGroup():
            header = {"op": "dissolve", "g": cmd.group}
        case Bind():
            header = {"op": "bind", "c": cmd.client_id, "f": cmd.flag}
            if not cmd.replace:
                header["nx"] = True
        case Unbind():
            header = {"op": "unbind", "c": cmd.client_id}
        case SetSession():
            data = _json_out(cmd.data, "session data")
            header = {"op": "session", "c": cmd.client_id, "data": data, "merge": cmd.merge}
        case Query():
            header = {"op": "query", "q": cmd.kind.value, "arg": cmd.arg}
            if cmd.args:
                header["args"] = _names_out(cmd.args, "query arguments")
        case Reply():
            header = {"op": "reply", "rid": cmd.request_id, "node": cmd.node}
            if cmd.parts != 1:
                header["part"] = cmd.part
                header["parts"] = cmd.parts
            if cmd.error is not None:
                header["err"] = list(cmd.error)
            else:
                header["res"] = _json_out(cmd.result, "reply")
            return header, payload
        case Heartbeat():
            header = {"op": "hb", "node": _node_to_json(cmd.node)}
        case PresenceSnapshot():
            groups = {group: _names_out(flags, "presence flags") for group, flags in cmd.groups.items()}
            header = {"op": "pres", "node": cmd.node, "groups": groups}
        case PresenceChange():
            header = {"op": "presc", "node": cmd.node, "g": cmd.group, "f": cmd.flag, "c": cmd.change}
        case Bye():
            header = {"op": "bye", "node": cmd.instance}
    _request(header, getattr(cmd, "request", None))
    return header, payload


def _last_frame(header: dict[str, Any], last: bytes | None, binary: bool) -> bytes:
    """A close's last frame travels as the payload; ``last`` says there is one (it may be empty)."""
    if last is None:
        return b""
    header["last"] = True
    if binary:
        header["bin"] = True
    return last


def _node_to_json(info: NodeInfo) -> dict[str, Any]:
    if not 0 <= info.ttl <= MAX_TTL:
        raise PayloadError(f"heartbeat ttl {info.ttl} is outside 0..{MAX_TTL:g} seconds")
    if info.mode not in NODE_MODES:
        raise PayloadError(f"heartbeat mode {info.mode!r} is neither 'fanout' nor 'routing'")
    return {
        "instance": info.instance,
        "node_id": info.node_id,
        "connections": info.connections,
        "ttl": info.ttl,
        "started_at": info.started_at,
        "host": info.host,
        "port": info.port,
        "mode": info.mode,
        "signed": info.signed,
        "extra": _json_out(info.extra, "heartbeat extra"),
    }


def too_deep(value: Any) -> bool:
    """Whether ``value`` (decoded JSON) nests lists/objects more than :data:`MAX_DEPTH` levels."""
    if not isinstance(value, dict | list):
        return False
    level: list[Any] = [value]
    for _ in range(MAX_DEPTH):
        below: list[Any] = []
        for item in level:
            children = item.values() if isinstance(item, dict) else item
            below.extend(child for child in children if isinstance(child, dict | list))
        if not below:
            return False
        level = below
    return True


#: what the ``json_default`` of a ServerUtil is: orjson's ``default=``, called with each value orjson
#: cannot encode itself (Decimal, a custom class) and returning one it can, or raising TypeError
JsonDefault = Callable[[Any], Any]


def dump_json(value: Any, default: JsonDefault | None = None, what: str = "data") -> bytes:
    """``value`` as JSON text; ``default`` converts what orjson cannot encode by itself.

    Raises:
        PayloadError: something in ``value`` cannot be encoded, or it holds NaN or an infinity (JSON has
            no such number: orjson would write ``null`` and the client would read another value).
    """
    found: list[Any] = []  # what ``default`` returned holding NaN or an infinity
    try:
        encoded = orjson.dumps(value, default=None if default is None else _watching(default, found))
    except TypeError as exc:
        raise PayloadError(f"{what} is not JSON-serialisable: {exc}") from None
    # NaN and the infinities come out as null: look for them only when a null is there
    if found or (b"null" in encoded and _non_finite(value) is not None):
        culprit = found[0] if found else _non_finite(value)
        raise PayloadError(f"{what} holds {culprit!r:.60}, which JSON cannot represent (NaN or an infinity)")
    return encoded


def _watching(default: JsonDefault, found: list[Any]) -> JsonDefault:
    """``default``, also noting in ``found`` what it returns that holds NaN or an infinity."""

    def watched(obj: Any) -> Any:
        converted = default(obj)
        if _non_finite(converted) is not None:
            found.append(converted)
        return converted

    return watched


def _non_finite(value: Any) -> Any:
    """The first float NaN or infinity in ``value`` (dicts, lists, tuples, dataclasses), else None."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, float):
            if not math.isfinite(item):
                return item
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list | tuple):
            stack.extend(item)
        elif dataclasses.is_dataclass(item) and not isinstance(item, type):
            stack.extend(getattr(item, f.name) for f in dataclasses.fields(item))
    return None


# --------------------------------------------------------------------------- decoding


@dataclass(frozen=True, slots=True)
class Message:
    command: Command
    envelope: Envelope


def decode(
    data: bytes, secret: bytes | None = None, max_size: int | None = None, namespace: str | None = None
) -> Command:
    """Parse one message; see :func:`open_message`."""
    return open_message(data, secret, max_size, namespace).command


def open_message(
    data: bytes, secret: bytes | None = None, max_size: int | None = None, namespace: str | None = None
) -> Message:
    """Parse one message into its command and envelope.

    With ``secret``, the signature must verify and the header must carry the envelope signing needs;
    with ``namespace`` too, a signed message must have been signed for that namespace. (Whether it is
    recent, and new, is :class:`fanout.receive.Receiver`'s business: that needs a clock and memory.)

    Raises:
        MessageTooLarge: ``data`` is longer than ``max_size``.
        UnsupportedVersion: the message is not version 2.
        BadSignature: ``secret`` is set and the signature is missing or wrong, or the envelope incomplete.
        WrongNamespace: signed for another namespace.
        ProtocolError: anything else malformed.
    """
    if max_size is not None and len(data) > max_size:
        raise MessageTooLarge(f"message of {len(data)} bytes exceeds the maximum of {max_size}")
    positions, data = split_positions(data)
    if positions is not None and data.startswith(POSITIONS_PREFIX):
        raise ProtocolError("more than one positions line")
    if not data.startswith(_PREFIX):
        if data[:1] == b"v" and b";" in data[:12]:
            raise UnsupportedVersion(f"unsupported wire version {data[: data.index(b';')]!r}")
        raise ProtocolError("not a fanout message (no 'v2;' prefix)")
    sig_end = data.find(b";", 3, 3 + _SIG_LEN + 1)
    if sig_end < 0:
        raise ProtocolError("malformed signature field")
    body_start = sig_end + 1
    if secret:
        _verify(secret, data[3:sig_end], data, body_start)
    newline = data.find(b"\n", body_start)
    if newline < 0:
        raise ProtocolError("no end of header")
    try:
        header = orjson.loads(data[body_start:newline])
    except orjson.JSONDecodeError as exc:
        raise ProtocolError(f"header is not JSON: {exc}") from None
    if not isinstance(header, dict):
        raise ProtocolError("header is not a JSON object")
    op = header.get("op")
    parser = _PARSERS.get(op) if isinstance(op, str) else None
    if parser is None:
        raise ProtocolError(f"unknown op {op!r}")
    if positions is not None and (op != "send" or header.get("sid") is None):
        raise ProtocolError("a positions line in front of something other than a stored send")
    try:
        envelope = _envelope(header)
        if positions is None:
            command = parser(header, data[newline + 1 :])
        else:  # a stored send: built with them
            command = _parse_send(header, data[newline + 1 :], positions)
    except (KeyError, TypeError, ValueError) as exc:
        raise ProtocolError(f"bad {op!r} command: {exc!r}") from None
    if isinstance(command, Heartbeat) and command.node.signed and sig_end == len(_PREFIX):
        # a node that signs signs everything it sends: this one cannot be what it says
        raise ProtocolError("an unsigned heartbeat saying its node signs")
    if secret:
        if envelope.namespace is None or envelope.sent_at is None or envelope.origin is None:
            raise BadSignature("signed message without its envelope (ns, ts, o, s)")
        if namespace is not None and envelope.namespace != namespace:
            raise WrongNamespace(f"signed for namespace {envelope.namespace!r}, not {namespace!r}")
    return Message(command, envelope)


def peek_heartbeat(data: bytes) -> NodeInfo | None:
    """The node record of a heartbeat *without* checking its signature (for diagnostics only)."""
    try:
        command = decode(data)
    except ProtocolError:
        return None
    return command.node if isinstance(command, Heartbeat) else None


def _verify(secret: bytes, signature: bytes, data: bytes, body_start: int) -> None:
    if not signature:
        raise BadSignature("unsigned command")
    body = memoryview(data)[body_start:]
    expected = hmac.new(secret, body, hashlib.sha256).hexdigest().encode()
    if not hmac.compare_digest(expected, signature):
        raise BadSignature("bad signature")


def _envelope(h: dict[str, Any]) -> Envelope:
    origin, seq, ts, ns = h.get("o"), h.get("s", 0), h.get("ts"), h.get("ns")
    if origin is None and ts is None and ns is None and "s" not in h:
        return NO_ENVELOPE
    if type(origin) is str and type(seq) is int and type(ts) is int and ns is None:  # (every publisher's)
        return Envelope(origin, seq, ts / 1000)
    sent_at = None if ts is None else _int(ts, "ts") / 1000
    return Envelope(_opt_str(origin, "o"), _int(seq, "s"), sent_at, _opt_str(ns, "ns"))


def _str(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{what} must be a string")
    return value


def _strs(value: Any, what: str) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise TypeError(f"{what} must be a list of strings")
    for v in value:  # (a loop: most lists hold one name, for which a generator costs more)
        if not isinstance(v, str):
            raise TypeError(f"{what} must be a list of strings")
    if len(value) > MAX_NAMES:
        raise ValueError(f"{what} has {len(value)} names, more than {MAX_NAMES}")
    return tuple(value)


def _opt_str(value: Any, what: str) -> str | None:
    return None if value is None else _str(value, what)


def _req(h: dict[str, Any]) -> Request | None:
    rid = h.get("rid")
    if rid is None:
        return None
    return Request(_str(rid, "rid"), _str(h["rto"], "rto"))


#: target kinds by their wire value (a dict: an enum call costs several times a lookup)
_TARGET_KINDS = {kind.value: kind for kind in TargetKind}
_ALL = Target.all()
#: targets decoded lately (frozen, so shared): most sends go to the same groups and flags again
_TARGETS: dict[tuple[str, tuple[str, ...]], Target] = {}
_TARGETS_KEPT = 4096


def _target(h: dict[str, Any]) -> Target:
    kind = h["t"]
    if kind == "all":
        return _ALL
    names = _strs(h["n"], "n")
    target = _TARGETS.get((kind, names))
    if target is None:
        target = Target(_TARGET_KINDS[kind], names)  # (an unknown kind: KeyError, a ProtocolError)
        if len(_TARGETS) >= _TARGETS_KEPT:
            _TARGETS.clear()
        _TARGETS[kind, names] = target
    return target


def _int(value: Any, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{what} must be an integer")
    return value


def _number(value: Any, what: str) -> float:
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise TypeError(f"{what} must be a number")
    return float(value)


def _bool(value: Any, what: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{what} must be a boolean")
    return value


def _dict(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise TypeError(f"{what} must be an object")
    return value


def _json_in(value: Any, what: str) -> Any:
    if too_deep(value):
        raise ValueError(f"{what} is nested deeper than {MAX_DEPTH} levels")
    return value


def _parse_send(h: dict[str, Any], payload: bytes, positions: Positions | None = None) -> Send:
    get = h.get  # (the commonest command: what is absent costs no check)
    exclude = get("x")
    rid, mid, sid, key = get("rid"), get("mid"), get("sid"), get("ik")
    return Send(
        _target(h),
        payload,
        _bool(get("bin", False), "bin"),
        () if exclude is None else _strs(exclude, "x"),
        None if rid is None else _req(h),
        None if mid is None else _str(mid, "mid"),
        _bool(get("j", False), "j"),
        None if sid is None else _str(sid, "sid"),
        positions,
        None if key is None else _key_in(key),
    )


#: RFC 6455 section 7.4.1 codes an endpoint may put in a close frame (1004-1006 and 1015 are reserved)
_SENDABLE_CLOSE_CODES = frozenset({1000, 1001, 1002, 1003, *range(1007, 1015)})


def is_sendable_close_code(code: int) -> bool:
    """Whether a server may put ``code`` in a close frame."""
    return code in _SENDABLE_CLOSE_CODES or 3000 <= code <= 4999


def _close_code(h: dict[str, Any]) -> int:
    code = _int(h.get("code", 1000), "code")
    if not is_sendable_close_code(code):
        raise ValueError(f"close code {code} is not one a server may send")
    return code


def _parse_close(h: dict[str, Any], payload: bytes) -> Close:
    last = payload if _bool(h.get("last", False), "last") else None
    return Close(
        target=_target(h),
        code=_close_code(h),
        reason=_str(h.get("reason", ""), "reason"),
        exclude=_strs(h.get("x", []), "x"),
        request=_req(h),
        dedupe_id=_opt_str(h.get("mid"), "mid"),
        last=last,
        binary=_bool(h.get("bin", False), "bin") if last is not None else False,
    )


def _parse_close_guests(h: dict[str, Any], payload: bytes) -> CloseGuests:
    last = payload if _bool(h.get("last", False), "last") else None
    age = _number(h["age"], "age")
    if age < 0:
        raise ValueError("age must be at least 0")
    return CloseGuests(
        older_than=age,
        code=_close_code(h),
        reason=_str(h.get("reason", ""), "reason"),
        last=last,
        binary=_bool(h.get("bin", False), "bin") if last is not None else False,
        request=_req(h),
    )


def _parse_bulk(h: dict[str, Any], payload: bytes) -> SendBulk:
    kind = TargetKind(h["t"])
    if kind not in (TargetKind.CLIENTS, TargetKind.FLAGS):
        raise ValueError(f"a bulk send is for client ids or flags, not {kind.value!r}")
    names = _strs(h["n"], "n")
    lengths = h["l"]
    if not isinstance(lengths, list) or len(lengths) != len(names):
        raise TypeError("l must be a list of one length per name")
    binary = h.get("bin", [False] * len(names))
    if not isinstance(binary, list) or len(binary) != len(names):
        raise TypeError("bin must be a list of one boolean per name")
    items, offset = [], 0
    for name, length, is_binary in zip(names, lengths, binary, strict=True):
        size = _int(length, "l")
        if size < 0 or offset + size > len(payload):
            raise ValueError("the lengths do not add up to the payload")
        items.append((name, payload[offset : offset + size], _bool(is_binary, "bin")))
        offset += size
    if offset != len(payload):
        raise ValueError("the lengths do not add up to the payload")
    return SendBulk(kind, tuple(items), _req(h), _key_in(h.get("ik")))


def _parse_node(value: Any) -> NodeInfo:
    n = _dict(value, "node")
    ttl = _number(n["ttl"], "ttl")
    if not 0 <= ttl <= MAX_TTL:
        raise ValueError(f"ttl {ttl} is outside 0..{MAX_TTL:g} seconds")
    mode = _str(n.get("mode", ""), "mode")
    if mode not in NODE_MODES:
        raise ValueError(f"mode {mode!r} is neither 'fanout' nor 'routing'")
    return NodeInfo(
        instance=_str(n["instance"], "instance"),
        node_id=_str(n["node_id"], "node_id"),
        connections=_int(n["connections"], "connections"),
        ttl=ttl,
        started_at=_number(n.get("started_at", 0.0), "started_at"),
        host=_str(n.get("host", ""), "host"),
        port=_int(n.get("port", 0), "port"),
        mode=mode,
        signed=_bool(n.get("signed", False), "signed"),
        extra=_json_in(_dict(n.get("extra", {}), "extra"), "extra"),
    )


def _parse_reply(h: dict[str, Any], _: bytes) -> Reply:
    err = h.get("err")
    error: tuple[str, str] | None = None
    if err is not None:
        kind, message = _strs(err, "err")
        error = (kind, message)
    part, parts = _int(h.get("part", 0), "part"), _int(h.get("parts", 1), "parts")
    if not 0 <= part < parts:
        raise ValueError(f"part {part} of {parts}")
    result = _json_in(h.get("res"), "res")
    return Reply(_str(h["rid"], "rid"), _str(h["node"], "node"), result, error, part, parts)


_PARSERS: dict[str, Callable[[dict[str, Any], bytes], Command]] = {
    "send": _parse_send,
    "close": _parse_close,
    "bulk": _parse_bulk,
    "close_guests": _parse_close_guests,
    "join": lambda h, _: JoinGroup(_str(h["c"], "c"), _strs(h["g"], "g"), _req(h)),
    "leave": lambda h, _: LeaveGroup(_str(h["c"], "c"), _strs(h["g"], "g"), _req(h)),
    "dissolve": lambda h, _: DissolveGroup(_str(h["g"], "g"), _req(h)),
    "bind": lambda h, _: Bind(
        _str(h["c"], "c"), _str(h["f"], "f"), _req(h), not _bool(h.get("nx", False), "nx")
    ),
    "unbind": lambda h, _: Unbind(_str(h["c"], "c"), _req(h)),
    "session": lambda h, _: SetSession(
        _str(h["c"], "c"),
        _json_in(_dict(h["data"], "data"), "data"),
        _bool(h.get("merge", False), "merge"),
        _req(h),
    ),
    "query": lambda h, _: Query(
        QueryKind(h["q"]), _need_req(h), _str(h.get("arg", ""), "arg"), _strs(h.get("args", []), "args")
    ),
    "reply": _parse_reply,
    "hb": lambda h, _: Heartbeat(_parse_node(h["node"])),
    "bye": lambda h, _: Bye(_str(h["node"], "node")),
    "presc": lambda h, _: PresenceChange(
        _str(h["node"], "node"), _str(h["g"], "g"), _str(h["f"], "f"), _change(h["c"])
    ),
    "pres": lambda h, _: PresenceSnapshot(
        _str(h["node"], "node"),
        {_str(g, "group"): _strs(flags, "flags") for g, flags in _dict(h["groups"], "groups").items()},
    ),
}


def _change(value: Any) -> str:
    if value not in ("join", "leave"):
        raise ValueError(f"presence change {value!r} is not 'join' or 'leave'")
    return str(value)


def _need_req(h: dict[str, Any]) -> Request:
    req = _req(h)
    if req is None:
        raise KeyError("rid")
    return req
