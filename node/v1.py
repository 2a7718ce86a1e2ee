"""The ``fanout.v1`` client protocol's frames (docs/continuity.md): what the node writes and reads. No I/O.

Node -> client: ``welcome`` (client id, resume token, positions), ``message`` (a delivery: ``data`` or
``data_b64``, and ``streams``: this send's offset in each of the connection's history streams it went to),
``joined``/``left``, ``resumed``. Client -> node: ``message`` (unwrapped for ``on_message`` as a raw
client's message would be) and ``resume`` (only as the first frame after the welcome).
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from fanout.history import parse_stream

from .frames import CloseCode, Frame, WebsocketError, encode_frame

SUBPROTOCOL = "fanout.v1"
#: most streams a resume may name
MAX_RESUME_STREAMS = 1000


def wants_v1(headers: list[str]) -> bool:
    """Whether the handshake's ``Sec-WebSocket-Protocol`` headers ask for ``fanout.v1``."""
    return any(p.strip() == SUBPROTOCOL for header in headers for p in header.split(","))


def _data(payload: bytes, binary: bool, is_json: bool) -> bytes:
    """The ``"data":…`` (or ``"data_b64":…``) member of a message envelope, as JSON text."""
    if binary:
        return b'"data_b64":"' + base64.b64encode(payload) + b'"'
    if is_json:
        return b'"data":' + payload
    return b'"data":' + orjson.dumps(payload.decode("utf-8", "surrogatepass"))


def message_frame(payload: bytes, binary: bool, is_json: bool, streams: dict[str, int] | None) -> Frame:
    """A ``message`` envelope; ``streams`` (this send's offsets in the connection's streams) when any.
    Compressed (with permessage-deflate) when ``payload`` would be as a raw client's frame."""
    data = _data(payload, binary, is_json)
    if streams:
        body = b'{"type":"message",%s,"streams":%s}' % (data, orjson.dumps(streams))
    else:
        body = b'{"type":"message",%s}' % data
    return encode_frame(body, data_size=len(payload))


def control_frame(value: dict[str, Any]) -> Frame:
    """``welcome``, ``joined``, ``left``, ``resumed``: one JSON object."""
    return encode_frame(orjson.dumps(value))


def joined_frame(stream: str, epoch: str, offset: int) -> Frame:
    return control_frame({"type": "joined", "stream": stream, "epoch": epoch, "offset": offset})


def positions_json(positions: Mapping[str, tuple[str, int]]) -> dict[str, dict[str, Any]]:
    return {s: {"epoch": epoch, "offset": offset} for s, (epoch, offset) in positions.items()}


@dataclass(frozen=True, slots=True)
class Resume:
    """A client's ``resume`` frame: its last token and, per stream, its last (epoch, offset)."""

    token: str
    streams: dict[str, tuple[str, int]]


def _refuse(reason: str) -> WebsocketError:
    return WebsocketError(CloseCode.POLICY_VIOLATION, reason)


def read_client_frame(message: str | bytes) -> str | bytes | Resume:
    """What a v1 client's frame means: the app's message (``str``: a JSON string's value, or another JSON
    value's text; ``bytes``: ``data_b64``), or a :class:`Resume`. Raises WebsocketError (1008) otherwise."""
    if isinstance(message, bytes):
        raise _refuse("fanout.v1 frames are JSON text")
    try:
        frame = orjson.loads(message)
    except orjson.JSONDecodeError:
        raise _refuse("fanout.v1 frame is not JSON") from None
    kind = frame.get("type") if isinstance(frame, dict) else None
    if kind == "message":
        if "data_b64" in frame:
            try:
                return base64.b64decode(frame["data_b64"], validate=True)
            except (ValueError, TypeError):
                raise _refuse("data_b64 is not base64") from None
        if "data" not in frame:
            raise _refuse("message frame without data")
        data = frame["data"]
        return data if isinstance(data, str) else orjson.dumps(data).decode()
    if kind == "resume":
        return _read_resume(frame)
    raise _refuse(f"unknown fanout.v1 frame type {kind!r}")


def _read_resume(frame: dict[str, Any]) -> Resume:
    token, streams = frame.get("token"), frame.get("streams", {})
    if not isinstance(token, str) or not isinstance(streams, dict) or len(streams) > MAX_RESUME_STREAMS:
        raise _refuse("resume needs a token and at most 1000 streams")
    positions: dict[str, tuple[str, int]] = {}
    for stream, position in streams.items():
        try:
            parse_stream(stream)
        except ValueError:
            raise _refuse(f"resume names {stream!r}, not a stream") from None
        if not isinstance(position, dict):
            raise _refuse(f"resume position of {stream!r} is not an object")
        epoch, offset = position.get("epoch"), position.get("offset")
        if not isinstance(epoch, str) or type(offset) is not int or offset < 0:
            raise _refuse(f"resume position of {stream!r} needs an epoch and an offset")
        positions[stream] = (epoch, offset)
    return Resume(token, positions)
