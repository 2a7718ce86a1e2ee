"""One connection's websocket protocol (RFC 6455), sans I/O: bytes in, events out, bytes to send.

As websockets' ``protocol.py``: the owner (:class:`~node.connection.Connection`) feeds what the socket
received to :meth:`Wire.receive_data`, then takes :meth:`Wire.data_to_send` (pongs, close frames: to
write after the frames it holds) and :meth:`Wire.events_received`: the client's messages (``str`` for
text, ``bytes`` for binary) and :class:`Signal` members, in the order the frames came. Frames are read
with :func:`~node.frames.read_frames`; a fragmented message is put back together (:class:`Fragments`,
bounded in bytes and frames), a compressed one (permessage-deflate, when negotiated) inflated with a
fresh decompressor and at most ``max_size`` bytes (a deflate bomb fails with 1009), a text message is
checked for UTF-8, pings are answered, a client's close
frame is echoed. Every frame but a close counts against the client's rate (a :class:`TokenBucket`, the
clock passed in): over it, the wire starts the close with 1008.

A protocol error (1002, 1007, 1009) makes the wire FAILING: nothing more is read, and its close frame is
queued only when the owner calls :meth:`Wire.send_close` - once the messages received before the error
are handled. The per-frame path compares plain ints (``_OPEN``, ``_CLOSE``...), not enum members.
Imports no asyncio: tests/test_wire.py drives it with bytes.
"""

from __future__ import annotations

import zlib
from enum import IntEnum

from .deflate import inflate
from .frames import (
    COMPRESSED,
    CloseCode,
    Fragments,
    Opcode,
    WebsocketError,
    encode_close,
    encode_control,
    parse_close,
    read_frames,
)
from .limits import TokenBucket


class State(IntEnum):
    """Where a connection's websocket stands."""

    OPEN = 1  #: messages flow both ways
    CLOSING = 2  #: the node sent its close frame: only the client's close reply counts now
    FAILING = 3  #: the client broke the protocol (or the keepalive): nothing more is read; the close
    #: frame waits for the owner's :meth:`Wire.send_close`
    CLOSED = 4  #: close frames exchanged, or the node's sent after a failure: what arrives is discarded


class Signal(IntEnum):
    """An event of :meth:`Wire.events_received` other than a message."""

    PONG = 1  #: a pong came (the keepalive's ping is answered)
    CLOSE = 2  #: the client's close frame came (``close_code``, ``close_reason``); the echo is queued if due
    FAILED = 3  #: the client broke the protocol: ``failure`` holds the close code and reason
    RATE_LIMITED = 4  #: the client is over its frame rate: the node's close frame (1008) is queued


#: close code and reason for a client over FANOUT_CLIENT_RATE (policy violation)
RATE_LIMIT_CLOSE = (CloseCode.POLICY_VIOLATION, "rate limit exceeded")

Event = str | bytes | Signal

_OPEN, _CLOSING, _FAILING = int(State.OPEN), int(State.CLOSING), int(State.FAILING)
_CONT, _TEXT, _CLOSE = int(Opcode.CONT), int(Opcode.TEXT), int(Opcode.CLOSE)
_PING, _PONG = int(Opcode.PING), int(Opcode.PONG)
_OPCODE, _COMPRESSED_TEXT = 0x0F, _TEXT | COMPRESSED
_NO_FAILURE = (int(CloseCode.ABNORMAL_CLOSURE), "")  # one tuple for every wire, not one each
_NO_EVENTS: list[Event] = []  # never appended to: events_received's answer when there was none


class Wire:
    """The websocket protocol state of one connection (see the module docstring)."""

    __slots__ = (
        "_buffer",
        "_events",
        "_fragments",
        "_need",
        "_output",
        "close_code",
        "close_reason",
        "deflate",
        "failure",
        "max_size",
        "rate",
        "sent_code",
        "state",
    )

    def __init__(self, max_size: int, rate: TokenBucket | None = None, deflate: bool = False) -> None:
        self.state = State.OPEN
        #: whether permessage-deflate was negotiated: a message's first frame may then have RSV1 set
        self.deflate = deflate
        #: biggest message (and frame) the client may send, bytes; bigger ones fail with 1009
        self.max_size = max_size
        #: the client's frame rate, or None for no limit
        self.rate = rate
        #: the close code and reason the client sent (1006 and "" while it sent none)
        self.close_code: int = CloseCode.ABNORMAL_CLOSURE
        self.close_reason = ""
        #: the close code the node sent (0 while it sent none; an echo of the client's is not counted)
        self.sent_code = 0
        #: once FAILING: the close code and reason to fail the connection with
        self.failure: tuple[int, str] = _NO_FAILURE
        # the start of a frame not complete yet and its whole size when known; a fragmented message
        self._buffer: bytearray | None = None
        self._need = 0
        self._fragments: Fragments | None = None
        self._events: list[Event] | None = None
        self._output: list[bytes] | None = None

    # -- what the owner takes ----------------------------------------------------------------

    def events_received(self) -> list[Event]:
        """The messages and signals since the last call, in order."""
        events = self._events
        if events is None:
            return _NO_EVENTS
        self._events = None
        return events

    def data_to_send(self) -> bytes:
        """The frames to write since the last call (pongs, close frames); b"" when none."""
        output = self._output
        if output is None:
            return b""
        self._output = None
        return output[0] if len(output) == 1 else b"".join(output)

    # -- what the owner does -------------------------------------------------------------------

    def send_close(self, code: int, reason: str = "") -> bool:
        """Queue the node's close frame: when OPEN, the closing handshake starts (CLOSING); when FAILING,
        the wire is CLOSED. False (nothing queued) when a close frame was sent already."""
        if self.state == _OPEN:
            self.state = State.CLOSING
        elif self.state == _FAILING:
            self.state = State.CLOSED
        else:
            return False
        self.sent_code = code
        self._send(encode_close(code, reason))
        return True

    def fail(self, code: int, reason: str) -> None:
        """Stop reading and fail with ``code``: FAILING when OPEN (the close frame waits for
        :meth:`send_close`); when the node's close frame was sent already, CLOSED at once."""
        self._buffer = None
        self._fragments = None
        self.failure = (code, reason)
        self.state = State.FAILING if self.state == _OPEN else State.CLOSED

    def discard(self) -> None:
        """Read nothing more (the socket is gone, or the client was cut off)."""
        self._buffer = None
        self._fragments = None
        self.state = State.CLOSED

    # -- bytes in ------------------------------------------------------------------------------

    def receive_data(self, data: bytes, now: float = 0.0) -> None:
        """Read ``data`` (what the socket received); ``now`` is the clock of the rate limit."""
        if self.state >= _FAILING:
            return  # failed or closed: what arrives is discarded
        buffer = self._buffer
        if buffer is not None:  # the rest of a frame: wait until all of it is here
            buffer += data
            if len(buffer) < self._need:
                return
            data = bytes(buffer)
            self._buffer = None
        frames, used, self._need, error = read_frames(data, self.max_size, self.deflate)
        if used < len(data):
            self._buffer = bytearray(data[used:])
        rate = self.rate
        for opcode, fin, payload in frames:
            state = self.state
            if state != _OPEN:
                if state != _CLOSING:
                    return  # failed, or the close is done: nothing after it counts
                if opcode == _CLOSE:  # the node is closing: only the client's close reply matters now
                    self._close_frame(payload)
            elif opcode == _CLOSE:
                self._close_frame(payload)
            elif rate is not None and not rate.take(now):  # every frame counts, but its close
                self.send_close(*RATE_LIMIT_CLOSE)
                self._event(Signal.RATE_LIMITED)
            elif opcode < _CLOSE:
                self._data_frame(opcode, fin, payload)
            elif opcode == _PING:
                self._send(encode_control(_PONG, payload))
            elif opcode == _PONG:
                self._event(Signal.PONG)
            else:  # the first frame of a compressed message: opcode | COMPRESSED
                self._data_frame(opcode, fin, payload)
        if error is not None and self.state < _FAILING:
            self._protocol_error(error.code, error.reason)

    def _data_frame(self, opcode: int, fin: bool, payload: bytes) -> None:
        fragments = self._fragments
        if opcode == _CONT:
            if fragments is None:
                self._protocol_error(CloseCode.PROTOCOL_ERROR, "unexpected continuation frame")
                return
            error = fragments.add(payload, self.max_size)
            if error is not None:
                self._protocol_error(error.code, error.reason)
                return
            if not fin:
                return
            self._fragments = None
            text, compressed = fragments.text, fragments.compressed
            payload = fragments.message()
        elif fragments is not None:
            self._protocol_error(CloseCode.PROTOCOL_ERROR, "a new message before the fragmented one ended")
            return
        elif not fin:
            self._fragments = Fragments(payload, opcode & _OPCODE == _TEXT, opcode > _CLOSE)
            return
        else:
            text = opcode == _TEXT
            compressed = opcode > _CLOSE
            if compressed:
                text = opcode == _COMPRESSED_TEXT
        if compressed:
            try:
                inflated = inflate(payload, self.max_size)
            except zlib.error:
                self._protocol_error(CloseCode.INVALID_DATA, "invalid compressed data")
                return
            if inflated is None:
                too_big = f"message exceeds the limit of {self.max_size} bytes once inflated"
                self._protocol_error(CloseCode.MESSAGE_TOO_BIG, too_big)
                return
            payload = inflated
        if text:
            try:
                self._event(payload.decode())
            except UnicodeDecodeError:
                self._protocol_error(CloseCode.INVALID_DATA, "invalid UTF-8 in a text message")
        else:
            self._event(payload)

    def _close_frame(self, payload: bytes) -> None:
        try:
            self.close_code, self.close_reason = parse_close(payload)
        except WebsocketError as error:
            self._protocol_error(error.code, error.reason)
            return
        if self.state == _OPEN:  # the client closes: echo its close frame
            self._send(encode_control(_CLOSE, payload))
        self.state = State.CLOSED
        self._event(Signal.CLOSE)

    def _protocol_error(self, code: int, reason: str) -> None:
        self.fail(code, reason)
        self._event(Signal.FAILED)

    def _event(self, event: Event) -> None:
        if self._events is None:
            self._events = [event]
        else:
            self._events.append(event)

    def _send(self, frame: bytes) -> None:
        if self._output is None:
            self._output = [frame]
        else:
            self._output.append(frame)
