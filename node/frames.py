"""Websocket frames (RFC 6455): server frames built once per command, client frames read. Pure: no I/O.

The node writes these bytes straight to every targeted connection's transport, so a broadcast to
10,000 connections encodes its payload once, not 10,000 times. That is only correct because a server
frame is fully determined by its opcode and payload (RFC 6455 section 5.2; server frames are never
masked) - and, with permessage-deflate, by the window it may use: the node negotiates it without
context takeover (:mod:`node.deflate`), so a compressed frame depends on no connection either, and a
:class:`Frame` keeps its compressed variants next to it, built once, for every connection that wants one.

Opcodes and close codes are :class:`Opcode` and :class:`CloseCode` (IntEnums: their members are ints
on the wire and in comparisons). The per-frame paths compare opcodes with module-level plain ints taken
from the enum (``_TEXT = int(Opcode.TEXT)``): ``Opcode.TEXT`` is an attribute lookup on the enum class
each time, and a member is not the cached small int a frame's opcode is (``in`` then compares by value).
"""

from __future__ import annotations

import struct
from enum import IntEnum

from . import deflate

try:
    from websockets.speedups import apply_mask
except ImportError:  # websockets built without its C extension: its pure-Python version
    from websockets.utils import apply_mask


class Opcode(IntEnum):
    """A frame's opcode (RFC 6455 section 5.2)."""

    CONT = 0x0
    TEXT = 0x1
    BINARY = 0x2
    CLOSE = 0x8
    PING = 0x9
    PONG = 0xA


class CloseCode(IntEnum):
    """Close codes (RFC 6455 section 7.4.1 and the IANA registry's 1012-1014), named as websockets does."""

    NORMAL_CLOSURE = 1000
    GOING_AWAY = 1001
    PROTOCOL_ERROR = 1002
    UNSUPPORTED_DATA = 1003
    NO_STATUS_RCVD = 1005  #: never sent: what a close frame without a code means
    ABNORMAL_CLOSURE = 1006  #: never sent: the connection was lost without a close frame
    INVALID_DATA = 1007
    POLICY_VIOLATION = 1008
    MESSAGE_TOO_BIG = 1009
    MANDATORY_EXTENSION = 1010
    INTERNAL_ERROR = 1011
    SERVICE_RESTART = 1012
    TRY_AGAIN_LATER = 1013
    BAD_GATEWAY = 1014
    #: fanout.v1: a history stream lost entries the node could not read back; the client resumes
    INSUFFICIENT_STATE = 3010


_CONT, _TEXT, _BINARY = int(Opcode.CONT), int(Opcode.TEXT), int(Opcode.BINARY)
_CLOSE, _PING, _PONG = int(Opcode.CLOSE), int(Opcode.PING), int(Opcode.PONG)
_FIN, _RSV1 = 0x80, 0x40


class Frame(bytes):
    """A server data frame (unfragmented, unmasked), built once per command and written as it is to every
    connection it goes to - or, to a connection that negotiated permessage-deflate, its compressed
    variant (:meth:`deflated`), built the first time one needs it and shared as well."""

    def deflated(self, bits: int) -> Frame:
        """This frame for a connection whose compressed messages may use a ``bits``-bit window: its
        payload compressed and RSV1 set, or the frame itself when its payload is under
        ``deflate.MIN_SIZE`` bytes or would not shrink. For a frame that wraps application data (a
        ``fanout.v1`` envelope, :func:`encode_frame`'s ``data_size``), the data's size is compared with
        ``MIN_SIZE``, not the whole payload's: a message is compressed or not whichever protocol carries
        it."""
        variants: dict[int, Frame] | None = self.__dict__.get("variants")
        if variants is None:
            variants = self.__dict__["variants"] = {}
        elif bits in variants:
            return variants[bits]
        length = self[1]
        head = 2 if length < 126 else 4 if length == 126 else 10
        frame = self
        if self.__dict__.get("data_size", len(self) - head) >= deflate.MIN_SIZE:
            data = deflate.compress(self[head:], bits)
            if len(data) < len(self) - head:
                frame = Frame(_header(self[0] | _RSV1, len(data)) + data)
        variants[bits] = frame
        return frame


def encode_frame(payload: bytes, binary: bool = False, data_size: int | None = None) -> Frame:
    """One unfragmented, unmasked data frame carrying ``payload``; ``data_size``: the size of the
    application data in it, when ``payload`` wraps it (what decides whether it is compressed)."""
    frame = Frame(_header(_FIN | (_BINARY if binary else _TEXT), len(payload)) + payload)
    if data_size is not None:
        frame.__dict__["data_size"] = data_size
    return frame


def frame_length(size: int) -> int:
    """The length of an unfragmented, unmasked data frame carrying ``size`` bytes."""
    return size + (2 if size < 126 else 4 if size < 65536 else 10)


def _header(first: int, length: int) -> bytes:
    if length < 126:
        return bytes((first, length))
    if length < 65536:
        return struct.pack("!BBH", first, 126, length)
    return struct.pack("!BBQ", first, 127, length)


_DATA_OPCODES = (_CONT, _TEXT, _BINARY)
_CONTROL_OPCODES = (_CLOSE, _PING, _PONG)

#: close codes a peer may send (besides 3000-4999): all but those that mean no code was sent
_VALID_CLOSE_CODES = frozenset(CloseCode) - {CloseCode.NO_STATUS_RCVD, CloseCode.ABNORMAL_CLOSURE}


class WebsocketError(Exception):
    """The client broke the websocket protocol: the connection fails with ``code`` (1002, 1007, 1009).

    (Not :class:`fanout.exceptions.WebsocketError`, which is a bus command that cannot be decoded.)
    """

    def __init__(self, code: CloseCode, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


#: most frames one fragmented message may have (as websockets' client and server), plus one for every
#: ``FRAGMENT_BYTES`` bytes it holds: small fragments of a big message are fine (Autobahn 9.3.1 sends
#: 4 MiB in 64-byte frames), a flood of empty ones is not; more fails the connection with 1009, like a
#: message over the size limit
MAX_FRAGMENTS = 4096
FRAGMENT_BYTES = 64


class Fragments:
    """A fragmented message being put back together: its size kept as it grows (no pass over the parts),
    bounded in bytes and in frames, so the work per frame is constant whatever the client sends."""

    __slots__ = ("compressed", "parts", "size", "text")

    def __init__(self, first: bytes, text: bool, compressed: bool = False) -> None:
        self.parts = [first]
        self.size = len(first)
        self.text = text  #: whether the message is text (its first frame's opcode)
        self.compressed = compressed  #: whether it is compressed (its first frame's RSV1)

    def add(self, payload: bytes, max_size: int) -> WebsocketError | None:
        """Add a continuation frame's payload; the error to fail the connection with when the message
        is over ``max_size`` bytes or ``MAX_FRAGMENTS`` frames (plus one per ``FRAGMENT_BYTES`` bytes)
        (1009), else None."""
        self.size += len(payload)
        if self.size > max_size:
            return WebsocketError(CloseCode.MESSAGE_TOO_BIG, f"message exceeds the limit of {max_size} bytes")
        most = MAX_FRAGMENTS + self.size // FRAGMENT_BYTES
        if len(self.parts) >= most:
            return WebsocketError(CloseCode.MESSAGE_TOO_BIG, f"message in more than {most} frames")
        self.parts.append(payload)
        return None

    def message(self) -> bytes:
        """The whole message's payload."""
        return b"".join(self.parts)


def encode_control(opcode: int, payload: bytes = b"") -> bytes:
    """A close, ping or pong frame (at most 125 bytes of payload)."""
    return bytes((_FIN | opcode, len(payload))) + payload


def encode_close(code: int, reason: str = "") -> bytes:
    """A close frame with its code and (UTF-8, at most 123 bytes) reason."""
    raw = reason.encode()[:123].decode(errors="ignore").encode()  # cut at a character boundary
    return encode_control(_CLOSE, struct.pack("!H", code) + raw)


def parse_close(payload: bytes) -> tuple[int, str]:
    """The code and reason of a client's close frame; 1005 when it has none."""
    if not payload:
        return CloseCode.NO_STATUS_RCVD, ""
    if len(payload) == 1:
        raise WebsocketError(CloseCode.PROTOCOL_ERROR, "close frame too short")
    (code,) = struct.unpack_from("!H", payload)
    if code not in _VALID_CLOSE_CODES and not 3000 <= code <= 4999:
        raise WebsocketError(CloseCode.PROTOCOL_ERROR, f"invalid close code {code}")
    try:
        reason = payload[2:].decode()
    except UnicodeDecodeError:
        raise WebsocketError(CloseCode.INVALID_DATA, "invalid UTF-8 in close reason") from None
    return code, reason


#: added to a frame's opcode by :func:`read_frames` when its RSV1 bit is set: the first frame of a
#: message compressed with permessage-deflate
COMPRESSED = _RSV1


def read_frames(
    data: bytes, max_size: int, compression: bool = False
) -> tuple[list[tuple[int, bool, bytes]], int, int, WebsocketError | None]:
    """The complete client frames at the start of ``data``: ``(frames, consumed, need, error)``.

    Each frame is ``(opcode, fin, unmasked payload)``. ``consumed`` is how many bytes they took; when the
    rest is the start of a frame whose header is complete, ``need`` is that frame's whole size (so the
    caller waits for that many bytes before parsing again), else 0. A frame is refused as soon as its
    header shows it is invalid: unmasked, reserved bits set, an unknown opcode, a fragmented or oversized
    control frame (1002), or a payload over ``max_size`` (1009) - before its payload is read: ``error``
    is then set, and ``frames`` holds the valid frames before it. With ``compression`` (permessage-deflate
    was negotiated), RSV1 may be set on a message's first frame: its opcode is then ``| COMPRESSED``.
    """
    frames: list[tuple[int, bool, bytes]] = []
    pos, end = 0, len(data)
    while end - pos >= 2:
        first, second = data[pos], data[pos + 1]
        length = second & 0x7F
        head = pos + 2
        if length == 126:
            if end - pos < 4:
                break
            (length,) = struct.unpack_from("!H", data, head)
            head += 2
        elif length == 127:
            if end - pos < 10:
                break
            (length,) = struct.unpack_from("!Q", data, head)
            head += 8
        opcode = first & 0x0F
        fin = bool(first & _FIN)
        reserved = first & 0x70
        if reserved and (reserved != _RSV1 or not compression or not _CONT < opcode < _CLOSE):
            return frames, pos, 0, WebsocketError(CloseCode.PROTOCOL_ERROR, "reserved bits must be 0")
        if not second & 0x80:
            return frames, pos, 0, WebsocketError(CloseCode.PROTOCOL_ERROR, "a client frame must be masked")
        if opcode in _CONTROL_OPCODES:
            if not fin:
                return frames, pos, 0, WebsocketError(CloseCode.PROTOCOL_ERROR, "fragmented control frame")
            if length > 125:
                return frames, pos, 0, WebsocketError(CloseCode.PROTOCOL_ERROR, "control frame too long")
        elif opcode not in _DATA_OPCODES:
            return frames, pos, 0, WebsocketError(CloseCode.PROTOCOL_ERROR, f"invalid opcode {opcode}")
        elif length > max_size:
            too_big = f"frame of {length} bytes exceeds the limit of {max_size} bytes"
            return frames, pos, 0, WebsocketError(CloseCode.MESSAGE_TOO_BIG, too_big)
        frame_end = head + 4 + length
        if frame_end > end:
            return frames, pos, frame_end - pos, None
        payload = data[head + 4 : frame_end]
        frames.append(
            (opcode | reserved, fin, apply_mask(payload, data[head : head + 4]) if length else payload)
        )
        pos = frame_end
    return frames, pos, 0, None
