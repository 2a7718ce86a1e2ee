"""Wire format v1: commands <-> bytes. Pure; see docs/protocol.md for the spec and test vectors.

A message is::

    b"v1;" + SIGNATURE + b";" + HEADER + b"\\n" + PAYLOAD

* ``HEADER`` is one line of JSON (an object whose ``"op"`` names the command);
* ``PAYLOAD`` is the raw bytes of a send's data (empty for other commands) - binary payloads travel
  as they are, without base64;
* ``SIGNATURE`` is empty, or, when a secret is configured, the lower-case hex HMAC-SHA256 of
  ``HEADER + b"\\n" + PAYLOAD`` under that secret.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable
from typing import Any

import orjson

from .commands import (
    Bind,
    Bye,
    Close,
    Command,
    DissolveGroup,
    Heartbeat,
    JoinGroup,
    LeaveGroup,
    NodeInfo,
    Query,
    QueryKind,
    Reply,
    Request,
    Send,
    SetSession,
    Target,
    TargetKind,
    Unbind,
)
from .exceptions import BadSignature, MessageTooLarge, ProtocolError, UnsupportedVersion

VERSION = 1
_PREFIX = b"v1;"
_SIG_LEN = 64

# --------------------------------------------------------------------------- encoding


def encode(command: Command, secret: bytes | None = None) -> bytes:
    """Serialize ``command``; sign it when ``secret`` is given."""
    header, payload = _to_header(command)
    body = orjson.dumps(header) + b"\n" + payload
    if secret:
        sig = hmac.new(secret, body, hashlib.sha256).hexdigest().encode()
        return b"v1;" + sig + b";" + body
    return b"v1;;" + body


def _request(header: dict[str, Any], request: Request | None) -> None:
    if request is not None:
        header["rid"] = request.id
        header["rto"] = request.reply_to


def _targeted(op: str, cmd: Send | Close) -> dict[str, Any]:
    header: dict[str, Any] = {"op": op, "t": cmd.target.kind.value}
    if cmd.target.kind is not TargetKind.ALL:
        header["n"] = list(cmd.target.names)
    if cmd.exclude:
        header["x"] = list(cmd.exclude)
    if cmd.dedupe_id is not None:
        header["mid"] = cmd.dedupe_id
    if cmd.origin is not None:
        header["o"] = cmd.origin
        header["s"] = cmd.seq
    return header


def _to_header(cmd: Command) -> tuple[dict[str, Any], bytes]:
    payload = b""
    header: dict[str, Any]
    match cmd:
        case Send():
            header = _targeted("send", cmd)
            if cmd.binary:
                header["bin"] = True
            payload = cmd.payload
        case Close():
            header = _targeted("close", cmd)
            header["code"] = cmd.code
            if cmd.reason:
                header["reason"] = cmd.reason
        case JoinGroup():
            header = {"op": "join", "c": cmd.client_id, "g": list(cmd.groups)}
        case LeaveGroup():
            header = {"op": "leave", "c": cmd.client_id, "g": list(cmd.groups)}
        case DissolveGroup():
            header = {"op": "dissolve", "g": cmd.group}
        case Bind():
            header = {"op": "bind", "c": cmd.client_id, "f": cmd.flag}
        case Unbind():
            header = {"op": "unbind", "c": cmd.client_id}
        case SetSession():
            header = {"op": "session", "c": cmd.client_id, "data": cmd.data, "merge": cmd.merge}
        case Query():
            header = {"op": "query", "q": cmd.kind.value, "arg": cmd.arg}
        case Reply():
            return {"op": "reply", "rid": cmd.request_id, "node": cmd.node, "res": cmd.result}, payload
        case Heartbeat():
            header = {"op": "hb", "node": _node_to_json(cmd.node)}
        case Bye():
            header = {"op": "bye", "node": cmd.instance}
    _request(header, getattr(cmd, "request", None))
    return header, payload


def _node_to_json(info: NodeInfo) -> dict[str, Any]:
    return {
        "instance": info.instance,
        "node_id": info.node_id,
        "connections": info.connections,
        "ttl": info.ttl,
        "started_at": info.started_at,
        "host": info.host,
        "port": info.port,
        "extra": info.extra,
    }


# --------------------------------------------------------------------------- decoding


def decode(data: bytes, secret: bytes | None = None, max_size: int | None = None) -> Command:
    """Parse one message.

    Raises:
        MessageTooLarge: ``data`` is longer than ``max_size``.
        UnsupportedVersion: the message is not version 1.
        BadSignature: ``secret`` is set and the signature is missing or wrong.
        ProtocolError: anything else malformed.
    """
    if max_size is not None and len(data) > max_size:
        raise MessageTooLarge(f"message of {len(data)} bytes exceeds the maximum of {max_size}")
    if not data.startswith(_PREFIX):
        if data[:1] == b"v" and b";" in data[:12]:
            raise UnsupportedVersion(f"unsupported wire version {data[: data.index(b';')]!r}")
        raise ProtocolError("not a fanout message (no 'v1;' prefix)")
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
    try:
        return parser(header, data[newline + 1 :])
    except (KeyError, TypeError, ValueError) as exc:
        raise ProtocolError(f"bad {op!r} command: {exc!r}") from None


def _verify(secret: bytes, signature: bytes, data: bytes, body_start: int) -> None:
    if not signature:
        raise BadSignature("unsigned command")
    body = memoryview(data)[body_start:]
    expected = hmac.new(secret, body, hashlib.sha256).hexdigest().encode()
    if not hmac.compare_digest(expected, signature):
        raise BadSignature("bad signature")


def _str(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{what} must be a string")
    return value


def _strs(value: Any, what: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise TypeError(f"{what} must be a list of strings")
    return tuple(value)


def _opt_str(value: Any, what: str) -> str | None:
    return None if value is None else _str(value, what)


def _req(h: dict[str, Any]) -> Request | None:
    rid = h.get("rid")
    if rid is None:
        return None
    return Request(_str(rid, "rid"), _str(h["rto"], "rto"))


def _target(h: dict[str, Any]) -> Target:
    kind = TargetKind(h["t"])
    if kind is TargetKind.ALL:
        return Target.all()
    return Target(kind, _strs(h["n"], "n"))


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


def _parse_send(h: dict[str, Any], payload: bytes) -> Send:
    return Send(
        target=_target(h),
        payload=payload,
        binary=_bool(h.get("bin", False), "bin"),
        exclude=_strs(h.get("x", []), "x"),
        request=_req(h),
        dedupe_id=_opt_str(h.get("mid"), "mid"),
        origin=_opt_str(h.get("o"), "o"),
        seq=_int(h.get("s", 0), "s"),
    )


#: RFC 6455 section 7.4.1 codes an endpoint may put in a close frame (1004-1006 and 1015 are reserved)
_SENDABLE_CLOSE_CODES = frozenset({1000, 1001, 1002, 1003, *range(1007, 1015)})


def is_sendable_close_code(code: int) -> bool:
    """Whether a server may put ``code`` in a close frame."""
    return code in _SENDABLE_CLOSE_CODES or 3000 <= code <= 4999


def _parse_close(h: dict[str, Any], payload: bytes) -> Close:
    code = _int(h.get("code", 1000), "code")
    if not is_sendable_close_code(code):
        raise ValueError(f"close code {code} is not one a server may send")
    return Close(
        target=_target(h),
        code=code,
        reason=_str(h.get("reason", ""), "reason"),
        exclude=_strs(h.get("x", []), "x"),
        request=_req(h),
        dedupe_id=_opt_str(h.get("mid"), "mid"),
        origin=_opt_str(h.get("o"), "o"),
        seq=_int(h.get("s", 0), "s"),
    )


def _parse_node(value: Any) -> NodeInfo:
    n = _dict(value, "node")
    return NodeInfo(
        instance=_str(n["instance"], "instance"),
        node_id=_str(n["node_id"], "node_id"),
        connections=_int(n["connections"], "connections"),
        ttl=_number(n["ttl"], "ttl"),
        started_at=_number(n.get("started_at", 0.0), "started_at"),
        host=_str(n.get("host", ""), "host"),
        port=_int(n.get("port", 0), "port"),
        extra=_dict(n.get("extra", {}), "extra"),
    )


_PARSERS: dict[str, Callable[[dict[str, Any], bytes], Command]] = {
    "send": _parse_send,
    "close": _parse_close,
    "join": lambda h, _: JoinGroup(_str(h["c"], "c"), _strs(h["g"], "g"), _req(h)),
    "leave": lambda h, _: LeaveGroup(_str(h["c"], "c"), _strs(h["g"], "g"), _req(h)),
    "dissolve": lambda h, _: DissolveGroup(_str(h["g"], "g"), _req(h)),
    "bind": lambda h, _: Bind(_str(h["c"], "c"), _str(h["f"], "f"), _req(h)),
    "unbind": lambda h, _: Unbind(_str(h["c"], "c"), _req(h)),
    "session": lambda h, _: SetSession(
        _str(h["c"], "c"), _dict(h["data"], "data"), _bool(h.get("merge", False), "merge"), _req(h)
    ),
    "query": lambda h, _: Query(QueryKind(h["q"]), _need_req(h), _str(h.get("arg", ""), "arg")),
    "reply": lambda h, _: Reply(_str(h["rid"], "rid"), _str(h["node"], "node"), h.get("res")),
    "hb": lambda h, _: Heartbeat(_parse_node(h["node"])),
    "bye": lambda h, _: Bye(_str(h["node"], "node")),
}


def _need_req(h: dict[str, Any]) -> Request:
    req = _req(h)
    if req is None:
        raise KeyError("rid")
    return req
