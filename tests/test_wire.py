"""The node's own websocket wire: client frames read bytes-in (checked against the frames websockets'
client writes), and a real node spoken to over raw sockets: fragments, control frames, protocol errors
and their close codes, the closing handshake, keepalive, and no task per idle connection."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import os
import random
import struct
from collections.abc import AsyncIterator

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from websockets.asyncio.client import connect
from websockets.frames import Frame
from websockets.frames import Opcode as WsOpcode

from node.connection import Connection
from node.frames import (
    MAX_FRAGMENTS,
    CloseCode,
    Fragments,
    Opcode,
    encode_close,
    parse_close,
    read_frames,
)
from node.limits import TokenBucket
from node.wire import Event, Signal, State, Wire
from tests.conftest import MakeNode
from tests.support import scaled
from tests.support.nodes import client, recv

WS_CONT, WS_TEXT, WS_BINARY = WsOpcode.CONT, WsOpcode.TEXT, WsOpcode.BINARY
WS_CLOSE, WS_PING = WsOpcode.CLOSE, WsOpcode.PING

# -- bytes in -------------------------------------------------------------------------------------


def client_frame(opcode: WsOpcode, payload: bytes, fin: bool = True) -> bytes:
    """A frame as websockets' client writes it (masked)."""
    return Frame(opcode, payload, fin).serialize(mask=True, extensions=[])


@pytest.mark.parametrize("size", [0, 1, 125, 126, 65535, 65536, 200_000])
def test_frames_websockets_writes_are_read_back_whole_and_in_pieces(size: int) -> None:
    payload = os.urandom(size)
    data = client_frame(WS_BINARY, payload) + client_frame(WS_TEXT, b"next")
    frames, used, need, error = read_frames(data, 1 << 20)
    assert error is None and used == len(data) and need == 0
    assert frames == [(Opcode.BINARY, True, payload), (Opcode.TEXT, True, b"next")]
    # fed in pieces the way a socket delivers them: every prefix gives only the complete frames, and
    # once its header is in, how many bytes the first frame needs in all
    first = len(data) - len(client_frame(WS_TEXT, b"next"))
    for cut in sorted({1, 2, 3, 9, 10, 13, 14, first - 1, first, first + 1}):
        if cut >= len(data):
            continue
        frames, used, need, error = read_frames(data[:cut], 1 << 20)
        assert error is None
        if cut < first:
            assert frames == [] and used == 0
            header = 2 + (2 if 126 <= size < 65536 else 8 if size >= 65536 else 0)
            assert need == (first if cut >= header else 0)
        else:
            assert frames == [(Opcode.BINARY, True, payload)] and used == first


def test_control_and_continuation_frames() -> None:
    data = (
        client_frame(WS_TEXT, b"hel", fin=False)
        + client_frame(WS_PING, b"are you there")
        + client_frame(WS_CONT, b"lo", fin=True)
        + client_frame(WS_CLOSE, struct.pack("!H", 1000) + b"done")
    )
    frames, used, _, error = read_frames(data, 100)
    assert error is None and used == len(data)
    assert frames == [
        (Opcode.TEXT, False, b"hel"),
        (Opcode.PING, True, b"are you there"),
        (Opcode.CONT, True, b"lo"),
        (Opcode.CLOSE, True, struct.pack("!H", 1000) + b"done"),
    ]
    assert parse_close(frames[3][2]) == (1000, "done")
    assert parse_close(b"") == (1005, "")
    assert parse_close(encode_close(4001, "é" * 70)[2:]) == (4001, "é" * 61)  # cut at a character


def _payload(size: int) -> bytes:
    return random.Random(size).randbytes(size)


frames_strategy = st.lists(
    st.tuples(
        st.sampled_from([WsOpcode.TEXT, WsOpcode.BINARY, WsOpcode.PING, WsOpcode.PONG]),
        st.integers(0, 300) | st.integers(65530, 65540),  # both sides of the 16-bit length
    ).map(lambda f: (f[0], _payload(min(f[1], 125) if f[0] in (WsOpcode.PING, WsOpcode.PONG) else f[1]))),
    min_size=1,
    max_size=6,
)


@settings(max_examples=60, deadline=None)
@given(frames=frames_strategy, cuts=st.lists(st.integers(min_value=1, max_value=70_000), max_size=8))
def test_any_frames_cut_anywhere_are_read_back_exactly(
    frames: list[tuple[WsOpcode, bytes]], cuts: list[int]
) -> None:
    data = b"".join(client_frame(opcode, payload) for opcode, payload in frames)
    bounds = sorted({0, len(data), *(c for c in cuts if c < len(data))})
    got: list[tuple[int, bool, bytes]] = []
    pending = b""
    for start, end in itertools.pairwise(bounds):  # as Connection.data_received buffers
        pending += data[start:end]
        read, used, need, error = read_frames(pending, 1 << 20)
        assert error is None
        assert need == 0 or need > len(pending) - used
        got += read
        pending = pending[used:]
    assert pending == b""
    assert got == [(int(opcode), True, payload) for opcode, payload in frames]


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (Frame(WS_TEXT, b"x").serialize(mask=False, extensions=[]), 1002),  # unmasked
        (bytes((0xC1, 0x80)) + b"\0\0\0\0", 1002),  # RSV1 set (no extension was agreed)
        (bytes((0x83, 0x80)) + b"\0\0\0\0", 1002),  # opcode 3 is reserved
        (bytes((0x09, 0x80)) + b"\0\0\0\0", 1002),  # a ping without FIN
        (bytes((0x89, 0xFE, 0x00, 0x7E)) + b"\0\0\0\0", 1002),  # a 126-byte ping
        (bytes((0x82, 0xFF)) + struct.pack("!Q", 1 << 40), 1009),  # refused from its header alone
    ],
)
def test_invalid_frames_are_refused_with_their_close_code(data: bytes, code: int) -> None:
    good = client_frame(WS_TEXT, b"before")
    frames, used, _, error = read_frames(good + data, 1 << 20)
    assert frames == [(Opcode.TEXT, True, b"before")] and used == len(good)  # what came before counts
    assert error is not None and error.code is CloseCode(code)


def test_opcodes_and_close_codes_have_one_name_each() -> None:
    assert len(Opcode.__members__) == len(Opcode) == 6
    assert len(CloseCode.__members__) == len(CloseCode)  # no aliases (1013 had two names)
    assert [int(code) for code in CloseCode] == [*range(1000, 1004), *range(1005, 1015), 3010]
    assert parse_close(b"")[0] is CloseCode.NO_STATUS_RCVD
    assert {opcode for opcode, _, _ in read_frames(client_frame(WS_PING, b"") * 2, 10)[0]} == {Opcode.PING}


def test_a_fragmented_message_is_bounded_in_bytes_and_in_frames() -> None:
    # 40,000 empty continuation frames after a first fragment: read as frames, each one is constant
    # work for the message (its size is kept as it grows), and the 4097th frame fails it with 1009
    data = client_frame(WS_TEXT, b"start", fin=False) + client_frame(WS_CONT, b"", fin=False) * 40_000
    frames, used, _, error = read_frames(data, 1 << 20)
    assert error is None and used == len(data) and len(frames) == 40_001
    assert frames[1] == (Opcode.CONT, False, b"")
    message = Fragments(frames[0][2], text=True)
    errors = [message.add(payload, 1 << 20) for _, _, payload in frames[1:]]
    failed_at = next(i for i, e in enumerate(errors) if e is not None)
    assert failed_at == MAX_FRAGMENTS - 1  # the first fragment and 4095 more are a message's most
    refused = errors[failed_at]
    assert refused is not None and refused.code == 1009 and "4096 frames" in refused.reason
    assert len(message.parts) == MAX_FRAGMENTS and message.size == 5
    # bytes: the running size counts every fragment; a message may be exactly max_size
    message = Fragments(b"ab", text=False)
    assert message.add(b"cde", 10) is None and message.add(b"", 10) is None
    assert message.add(b"fghij", 10) is None and message.size == 10
    assert message.message() == b"abcdefghij" and not message.text
    over = message.add(b"k", 10)
    assert over is not None and over.code == 1009 and "limit of 10 bytes" in over.reason


@pytest.mark.parametrize(("payload", "code"), [(b"\x03", 1002), (b"\x03\xe4", 1002), (b"\x03\xe8\xff", 1007)])
def test_invalid_close_frames(payload: bytes, code: int) -> None:
    with pytest.raises(Exception) as refused:
        parse_close(payload)
    assert getattr(refused.value, "code", None) == code


# -- the wire (node.wire.Wire), bytes in: a counterpart of every Autobahn category 1-10 ----------------


def feed(data: bytes, *, max_size: int = 1 << 20, chunk: int = 0, wire: Wire | None = None) -> Fed:
    """Feed ``data`` to a wire (in ``chunk``-byte pieces when given): its events and the frames it sends."""
    wire = wire or Wire(max_size)
    events: list[Event] = []
    sent = b""
    for start in range(0, len(data), chunk or len(data) or 1):
        wire.receive_data(data[start : start + chunk] if chunk else data)
        events += wire.events_received()
        sent += wire.data_to_send()
    return Fed(wire, events, _server_frames(sent))


class Fed:
    def __init__(self, wire: Wire, events: list[Event], sent: list[tuple[int, bytes]]) -> None:
        self.wire, self.events, self.sent = wire, events, sent

    def failed_with(self) -> int:
        """The close code the wire failed with (it sent nothing: the close waits for send_close)."""
        assert self.events[-1] is Signal.FAILED and self.wire.state is State.FAILING, self.events
        assert not [opcode for opcode, _ in self.sent if opcode == Opcode.CLOSE]
        return self.wire.failure[0]


def raw_frame(first: int, payload: bytes) -> bytes:
    """A frame of under 126 bytes with any first byte (flags and opcode), masked with a zero key."""
    return bytes((first, 0x80 | len(payload))) + b"\0\0\0\0" + payload


def close_payload(code: int, reason: bytes = b"") -> bytes:
    return struct.pack("!H", code) + reason


@pytest.mark.parametrize("size", [0, 1, 125, 126, 127, 65535, 65536, 300_000])
@pytest.mark.parametrize("chunk", [0, 1, 1000])
def test_wire_1_framing_text_and_binary_messages_of_every_length_class(size: int, chunk: int) -> None:
    if chunk == 1 and size > 1000:
        chunk = 997  # byte by byte for the small ones; a prime stride for the big ones
    text = ("*" * size).encode()
    data = client_frame(WS_TEXT, text) + client_frame(WS_BINARY, _payload(size))
    fed = feed(data, chunk=chunk)
    assert fed.events == ["*" * size, _payload(size)] and fed.sent == []
    assert fed.wire.state is State.OPEN


def test_wire_2_pings_and_pongs() -> None:
    ping = client_frame(WS_PING, b"\x00\xff" * 62 + b"!")  # 125 bytes of binary payload: the most
    fed = feed(ping + client_frame(WsOpcode.PONG, b"unsolicited") + client_frame(WS_PING, b""))
    assert fed.sent == [(Opcode.PONG, b"\x00\xff" * 62 + b"!"), (Opcode.PONG, b"")]
    assert fed.events == [Signal.PONG]  # an unsolicited pong is no error: the keepalive hears it
    # 10 pings in one read: 10 pongs, in order
    fed = feed(b"".join(client_frame(WS_PING, b"%d" % i) for i in range(10)))
    assert fed.sent == [(Opcode.PONG, b"%d" % i) for i in range(10)]
    # a ping of 126 bytes fails the connection, before any pong (2.5)
    assert feed(bytes((0x89, 0xFE, 0x00, 0x7E)) + b"\0" * 130).failed_with() == 1002
    # a ping after the client's close frame is not answered (2.10-2.11 close first)
    fed = feed(client_frame(WS_CLOSE, close_payload(1000)) + client_frame(WS_PING, b"late"))
    assert fed.sent == [(Opcode.CLOSE, close_payload(1000))] and fed.events == [Signal.CLOSE]


@pytest.mark.parametrize("rsv", [1, 2, 3, 4, 5, 6, 7])
@pytest.mark.parametrize("opcode", [WS_TEXT, WS_BINARY, WS_PING])
def test_wire_3_reserved_bits_fail_after_what_came_before(rsv: int, opcode: WsOpcode) -> None:
    bad = bytearray(client_frame(opcode, b"x"))
    bad[0] |= rsv << 4
    fed = feed(client_frame(WS_TEXT, b"before") + bytes(bad) + client_frame(WS_TEXT, b"after"))
    assert fed.events[0] == "before" and fed.failed_with() == 1002
    assert "after" not in fed.events


@pytest.mark.parametrize("opcode", [3, 4, 5, 6, 7, 11, 12, 13, 14, 15])
def test_wire_4_reserved_opcodes_fail(opcode: int) -> None:
    bad = bytes((0x80 | opcode, 0x80)) + b"\0\0\0\0"
    fed = feed(client_frame(WS_TEXT, b"before") + bad + client_frame(WS_PING, b"after"))
    assert fed.events[0] == "before" and fed.failed_with() == 1002 and fed.sent == []


def test_wire_5_fragmentation() -> None:
    # fragments, with pings between them: the pongs at once, the message when its last fragment is in
    data = (
        client_frame(WS_TEXT, b"frag", fin=False)
        + client_frame(WS_PING, b"1")
        + client_frame(WS_CONT, b"men", fin=False)
        + client_frame(WsOpcode.PONG, b"")
        + client_frame(WS_CONT, b"ted", fin=True)
    )
    for chunk in (0, 1, 5):
        fed = feed(data, chunk=chunk)
        assert fed.events == [Signal.PONG, "fragmented"] and fed.sent == [(Opcode.PONG, b"1")]
    binary = client_frame(WS_BINARY, b"\x00", fin=False) + client_frame(WS_CONT, b"\x01", fin=True)
    assert feed(binary).events == [b"\x00\x01"]
    # a continuation with nothing to continue, from the first frame or after a whole message (5.9-5.13)
    assert feed(client_frame(WS_CONT, b"x", fin=True)).failed_with() == 1002
    assert feed(client_frame(WS_TEXT, b"a") + client_frame(WS_CONT, b"x", fin=False)).failed_with() == 1002
    # a new message before the fragmented one ended (5.18)
    fed = feed(client_frame(WS_TEXT, b"a", fin=False) + client_frame(WS_TEXT, b"b", fin=True))
    assert fed.failed_with() == 1002 and fed.events == [Signal.FAILED]
    # a fragmented ping (5.3-5.5) or close
    assert feed(raw_frame(WS_PING, b"p")).failed_with() == 1002  # FIN not set
    assert feed(raw_frame(WS_CLOSE, close_payload(1000))).failed_with() == 1002


VALID_UTF8 = "κόσμε-\U0001f600-\u00e9".encode()


@pytest.mark.parametrize(
    "invalid",
    [
        b"\xce\xba\xe1\xbd\xb9\xcf\x83\xce\xbc\xce\xb5\xed\xa0\x80edited",
        b"\xff",
        b"\xc0\xaf",
        b"\xf4\x90\x80\x80",
    ],
)
def test_wire_6_utf8_is_checked_per_message_whatever_the_fragments(invalid: bytes) -> None:
    for cut in range(len(VALID_UTF8) + 1):  # a character split between two fragments is no error
        data = client_frame(WS_TEXT, VALID_UTF8[:cut], fin=False) + client_frame(WS_CONT, VALID_UTF8[cut:])
        assert feed(data).events == [VALID_UTF8.decode()]
    assert feed(client_frame(WS_TEXT, invalid)).failed_with() == 1007
    fed = feed(client_frame(WS_TEXT, invalid[:1], fin=False) + client_frame(WS_CONT, invalid[1:]))
    assert fed.failed_with() == 1007
    assert feed(client_frame(WS_BINARY, invalid)).events == [invalid]  # binary is not text
    assert feed(client_frame(WS_CLOSE, close_payload(1000, invalid))).failed_with() == 1007


@pytest.mark.parametrize(
    "code", [1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014, 3000, 4999]
)
def test_wire_7_a_client_close_is_echoed_and_nothing_after_it_counts(code: int) -> None:
    close = client_frame(WS_CLOSE, close_payload(code, b"bye"))
    fed = feed(client_frame(WS_TEXT, b"last") + close + client_frame(WS_TEXT, b"after") + close)
    assert fed.events == ["last", Signal.CLOSE] and fed.sent == [(Opcode.CLOSE, close_payload(code, b"bye"))]
    assert fed.wire.state is State.CLOSED and (fed.wire.close_code, fed.wire.close_reason) == (code, "bye")
    fed = feed(client_frame(WS_TEXT, b"more"), wire=fed.wire)
    assert fed.events == [] and fed.sent == []


@pytest.mark.parametrize("code", [0, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000, 65535])
def test_wire_7_invalid_close_codes_fail_with_1002(code: int) -> None:
    assert feed(client_frame(WS_CLOSE, close_payload(code))).failed_with() == 1002


def test_wire_7_close_without_code_and_the_nodes_own_close() -> None:
    fed = feed(client_frame(WS_CLOSE, b""))
    assert fed.sent == [(Opcode.CLOSE, b"")] and fed.wire.close_code == 1005  # echoed as it came
    assert feed(client_frame(WS_CLOSE, b"\x03")).failed_with() == 1002  # one byte: no code
    # the node closes: CLOSING; what the client sends meanwhile is ignored, its close reply ends it
    wire = Wire(1 << 20)
    assert wire.send_close(4000, "bye") and wire.state is State.CLOSING and not wire.send_close(1000)
    assert _server_frames(wire.data_to_send()) == [(Opcode.CLOSE, close_payload(4000, b"bye"))]
    fed = feed(client_frame(WS_TEXT, b"x") + client_frame(WS_PING, b"p"), wire=wire)
    assert fed.events == [] and fed.sent == [] and wire.state is State.CLOSING
    fed = feed(client_frame(WS_CLOSE, close_payload(4000)), wire=wire)
    assert fed.events == [Signal.CLOSE] and fed.sent == [] and wire.state is State.CLOSED  # no echo


def test_wire_failing_waits_for_the_owner_then_discards_everything() -> None:
    # the messages before the error come out first; the close frame waits for send_close (the owner
    # lets its application handle those messages first), and nothing more is read
    fed = feed(
        client_frame(WS_TEXT, b"one") + client_frame(WS_BINARY, b"two") + bytes((0x83, 0x80)) + b"\0" * 4
    )
    assert fed.events[:2] == ["one", b"two"] and fed.failed_with() == 1002
    assert feed(client_frame(WS_PING, b"p") + client_frame(WS_TEXT, b"x"), wire=fed.wire).events == []
    assert fed.wire.send_close(*fed.wire.failure) and fed.wire.state is State.CLOSED
    assert _server_frames(fed.wire.data_to_send())[0] == (
        Opcode.CLOSE,
        close_payload(1002, b"invalid opcode 3"),
    )
    # a protocol error while the node's own close is under way: CLOSED at once, no second close frame
    wire = Wire(1 << 20)
    wire.send_close(1001)
    wire.data_to_send()
    fed = feed(bytes((0x83, 0x80)) + b"\0" * 4, wire=wire)
    assert fed.events == [Signal.FAILED] and wire.state is State.CLOSED and not wire.send_close(1002)


def test_wire_9_limits_big_messages_and_many_messages() -> None:
    size = 4 << 20
    big = _payload(size)
    fed = feed(client_frame(WS_BINARY, big), max_size=size, chunk=65536)  # read as a socket gives it
    assert fed.events == [big]
    # one byte over: refused from the frame's header, before its payload arrives
    header = client_frame(WS_BINARY, big + b"!")[:14]
    assert feed(header, max_size=size).failed_with() == 1009
    # over the limit only in all: the fragments add up
    parts = client_frame(WS_BINARY, big[: size // 2], fin=False) + client_frame(WS_CONT, big[: size // 2 + 1])
    assert feed(parts, max_size=size).failed_with() == 1009
    many = b"".join(client_frame(WS_TEXT, b"m%d" % i) for i in range(1000))
    assert feed(many, chunk=4096).events == [f"m{i}" for i in range(1000)]


def test_wire_10_a_message_in_fragments_of_every_size() -> None:
    message = _payload(65536)
    for step in (1, 64, 1000, 65535):  # as 10.1.1's client fragments 64 KiB (1 byte fragments: a cap)
        pieces = [message[i : i + step] for i in range(0, len(message), step)][: MAX_FRAGMENTS - 1]
        whole = b"".join(pieces)
        data = b"".join(
            client_frame(WS_BINARY if i == 0 else WS_CONT, piece, fin=i == len(pieces) - 1)
            for i, piece in enumerate(pieces)
        )
        assert feed(data, chunk=8192).events == [whole]


@pytest.mark.parametrize("step", [64, 256])
def test_wire_9_a_big_message_in_small_fragments_is_read(step: int) -> None:
    # as Autobahn 9.3.1-9.4.2 (4 MiB in 64-byte frames: 65,536 of them); here 1 MiB, 16,384 frames: more
    # than MAX_FRAGMENTS, but each holds 64 bytes or more
    message = _payload(1 << 20)
    data = b"".join(
        client_frame(WS_BINARY if i == 0 else WS_CONT, message[i : i + step], fin=i + step >= len(message))
        for i in range(0, len(message), step)
    )
    assert feed(data, max_size=1 << 20, chunk=65536).events == [message]


def test_wire_the_fragment_flood_and_the_rate_limit() -> None:
    assert feed(EMPTY_CONTINUATIONS).failed_with() == 1009
    assert "4096 frames" in feed(EMPTY_CONTINUATIONS).wire.failure[1]
    # with a rate limit (100 frames/s, bursts of 200): 200 frames, then the node's close (1008);
    # the client's close reply still counts
    wire = Wire(1 << 20, TokenBucket(100, 200, 0.0))
    fed = feed(client_frame(WS_PING, b"p") * 1000, wire=wire)
    assert fed.sent == [(Opcode.PONG, b"p")] * 200 + [
        (Opcode.CLOSE, close_payload(1008, b"rate limit exceeded"))
    ]
    assert fed.events == [Signal.RATE_LIMITED] and wire.state is State.CLOSING
    assert feed(client_frame(WS_CLOSE, close_payload(1008)), wire=wire).events == [Signal.CLOSE]


# -- a real node over raw sockets -------------------------------------------------------------------

uses_raw_sockets = pytest.mark.usefixtures("raw_sockets")


_opened: list[asyncio.StreamWriter] = []


@pytest.fixture
async def raw_sockets() -> AsyncIterator[None]:
    """Closes the raw sockets a test opened, in its loop."""
    yield
    while _opened:
        _opened.pop().close()


class RawClient:
    """A websocket client written by hand, so that it can break the rules (or not answer pings)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        _opened.append(writer)

    @classmethod
    async def open(cls, port: int, first: bytes = b"", key: bool = True) -> tuple[RawClient, bytes]:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        head = (
            b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            + (b"Sec-WebSocket-Key: " + base64.b64encode(os.urandom(16)) + b"\r\n" if key else b"")
            + b"Sec-WebSocket-Version: 13\r\n\r\n"
        )
        writer.write(head + first)  # frames in the same packet as the request
        response = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), scaled(5))
        return cls(reader, writer), response

    def send(self, data: bytes) -> None:
        self.writer.write(data)

    async def frame(self) -> tuple[int, bytes]:
        """The next server frame: (opcode, payload)."""
        first, second = await asyncio.wait_for(self.reader.readexactly(2), scaled(5))
        assert not second & 0x80, "server frames are not masked"
        length = second & 0x7F
        if length == 126:
            (length,) = struct.unpack("!H", await self.reader.readexactly(2))
        elif length == 127:
            (length,) = struct.unpack("!Q", await self.reader.readexactly(8))
        return first & 0x0F, await self.reader.readexactly(length)

    async def closed_by_server(self) -> bool:
        """True once the server closed the TCP connection (or half-closed it: the client then closes)."""
        closed = await asyncio.wait_for(self.reader.read(), scaled(5)) == b""
        self.writer.close()
        return closed


@uses_raw_sockets
async def test_frames_right_after_the_request_fragments_and_pings_are_handled(make_node: MakeNode) -> None:
    node = await make_node()
    raw, response = await RawClient.open(node.port, first=client_frame(WS_BINARY, b"early"))
    assert response.startswith(b"HTTP/1.1 101 ") and b"\r\nServer: fanout\r\n" in response
    assert (await raw.frame())[0] == Opcode.TEXT  # the welcome
    assert await raw.frame() == (Opcode.BINARY, b"echo:early")
    raw.send(client_frame(WS_BINARY, b"frag", fin=False) + client_frame(WS_PING, b"p1"))
    assert await raw.frame() == (Opcode.PONG, b"p1")  # a ping between fragments is answered at once
    raw.send(client_frame(WS_CONT, b"ment", fin=False))
    raw.send(client_frame(WS_CONT, b"ed", fin=True))
    assert await raw.frame() == (Opcode.BINARY, b"echo:fragmented")
    # a frame in tiny pieces
    for byte in client_frame(WS_BINARY, b"x" * 300):
        raw.send(bytes((byte,)))
    assert await raw.frame() == (Opcode.BINARY, b"echo:" + b"x" * 300)
    # the client closes: its close frame is echoed and the server closes the socket
    raw.send(client_frame(WS_CLOSE, struct.pack("!H", 4321) + b"bye"))
    assert await raw.frame() == (Opcode.CLOSE, struct.pack("!H", 4321) + b"bye")
    assert await raw.closed_by_server()
    assert len(node.table) == 0


@uses_raw_sockets
@pytest.mark.parametrize(
    ("bad", "code"),
    [
        (client_frame(WS_TEXT, b"\xff\xfe"), 1007),  # not UTF-8
        (Frame(WS_TEXT, b"x").serialize(mask=False, extensions=[]), 1002),  # unmasked
        (client_frame(WS_CONT, b"x"), 1002),  # a continuation with nothing to continue
        (client_frame(WS_BINARY, b"a", fin=False) + client_frame(WS_BINARY, b"b"), 1002),
        (client_frame(WS_BINARY, b"x" * 2000), 1009),
        (client_frame(WS_BINARY, b"x" * 600, fin=False) + client_frame(WS_CONT, b"x" * 600), 1009),
        (client_frame(WS_CLOSE, b"\x03\xe8\xff"), 1007),  # a close reason that is not UTF-8
    ],
)
async def test_a_protocol_error_fails_the_connection_with_its_code(
    make_node: MakeNode, bad: bytes, code: int
) -> None:
    node = await make_node(max_frame=1000)
    raw, _ = await RawClient.open(node.port)
    await raw.frame()  # welcome
    raw.send(bad)
    opcode, payload = await raw.frame()
    assert opcode == Opcode.CLOSE and struct.unpack_from("!H", payload)[0] == code
    assert await raw.closed_by_server()
    ws, _ = await client(node.port)  # the node keeps serving
    await ws.close()


@uses_raw_sockets
@pytest.mark.parametrize(
    ("error", "code"),
    [
        (bytes((0xC2, 0x80)) + b"\0\0\0\0", 1002),  # RSV1 set: refused from its header
        (client_frame(WS_CONT, b"x"), 1002),  # a continuation with nothing to continue
        (client_frame(WS_TEXT, b"\xff\xfe"), 1007),  # not UTF-8
        (client_frame(WS_CLOSE, b"\x03"), 1002),  # a close frame too short
    ],
    ids=["reserved-bit", "continuation", "utf-8", "close-frame"],
)
async def test_messages_received_before_a_protocol_error_are_handled_before_the_close(
    make_node: MakeNode, error: bytes, code: int
) -> None:
    # Autobahn 3.2-4.2.5 and 5.15: valid messages, then the error, in one write. The messages reach the
    # application and its replies go out, then the close frame; what follows the error is not read.
    node = await make_node()
    raw, _ = await RawClient.open(node.port)
    await raw.frame()  # welcome
    fragmented = client_frame(WS_BINARY, b"frag", fin=False) + client_frame(WS_CONT, b"mented")
    raw.send(client_frame(WS_BINARY, b"one") + fragmented + error + client_frame(WS_BINARY, b"after"))
    assert await raw.frame() == (Opcode.BINARY, b"echo:one")
    assert await raw.frame() == (Opcode.BINARY, b"echo:fragmented")
    opcode, payload = await raw.frame()
    assert opcode == Opcode.CLOSE and struct.unpack_from("!H", payload)[0] == code
    assert await raw.closed_by_server()
    assert node.metrics.client_messages == 2


@uses_raw_sockets
async def test_handshakes_that_are_not_websocket_handshakes_get_an_http_error(make_node: MakeNode) -> None:
    node = await make_node()
    _, response = await RawClient.open(node.port, key=False)
    assert response.startswith(b"HTTP/1.1 400 ")
    reader, writer = await asyncio.open_connection("127.0.0.1", node.port)
    _opened.append(writer)
    writer.write(b"NONSENSE\r\n\r\n")
    assert (await asyncio.wait_for(reader.read(), scaled(5))).startswith(b"HTTP/1.1 400 ")
    writer.close()
    reader, writer = await asyncio.open_connection("127.0.0.1", node.port)
    _opened.append(writer)
    writer.write(b"GET / HTTP/1.1\r\n" + b"".join(b"X-%d: y\r\n" % i for i in range(200)) + b"\r\n")
    assert (await asyncio.wait_for(reader.read(), scaled(5))).startswith(b"HTTP/1.1 431 ")
    writer.close()


@uses_raw_sockets
async def test_a_client_that_does_not_answer_pings_is_closed_with_1011(make_node: MakeNode) -> None:
    node = await make_node(ping_interval=0.2, ping_timeout=0.3)
    raw, _ = await RawClient.open(node.port)  # never answers a ping
    well_behaved, _ = await client(node.port)  # websockets answers pings
    await raw.frame()  # welcome
    assert (await raw.frame())[0] == Opcode.PING
    opcode, payload = await raw.frame()
    assert opcode == Opcode.CLOSE and payload == struct.pack("!H", 1011) + b"keepalive ping timeout"
    assert await raw.closed_by_server()
    await asyncio.sleep(1.0)  # several rounds of pings: the answering client stays
    await well_behaved.send(b"still here")
    assert await recv(well_behaved) == b"echo:still here"
    await well_behaved.close()


@uses_raw_sockets
async def test_a_client_that_does_not_answer_the_close_is_dropped_after_the_close_timeout(
    make_node: MakeNode, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("node.connection.CLOSE_TIMEOUT", 0.5)
    node = await make_node()
    raw, _ = await RawClient.open(node.port)
    (_, welcome) = await raw.frame()
    client_id = orjson.loads(welcome)["client_id"]
    assert await node.util.close(client_id, 4000, "go") == 1
    assert await raw.frame() == (Opcode.CLOSE, struct.pack("!H", 4000) + b"go")
    started = asyncio.get_running_loop().time()
    # it never sends its close frame: the socket is dropped (reset) once the timeout is over
    with contextlib.suppress(ConnectionResetError):
        await asyncio.wait_for(raw.reader.read(), scaled(5))
    assert 0.4 < asyncio.get_running_loop().time() - started < scaled(3)


@uses_raw_sockets
async def test_a_close_reply_behind_other_frames_ends_the_close_at_once(make_node: MakeNode) -> None:
    node = await make_node()
    raw, _ = await RawClient.open(node.port)
    (_, welcome) = await raw.frame()
    client_id = orjson.loads(welcome)["client_id"]
    assert await node.util.close(client_id, 4000, "go") == 1
    assert (await raw.frame())[0] == Opcode.CLOSE
    started = asyncio.get_running_loop().time()
    # frames it had in flight, then its close reply, in one packet: the reply still ends the close
    raw.send(
        client_frame(WS_TEXT, b"late")
        + client_frame(WS_PING, b"p")
        + client_frame(WS_CLOSE, struct.pack("!H", 4000))
    )
    assert await raw.closed_by_server()
    assert asyncio.get_running_loop().time() - started < scaled(2)  # not the 10 s close timeout


@uses_raw_sockets
async def test_idle_connections_hold_no_task(make_node: MakeNode) -> None:
    node = await make_node()
    await asyncio.sleep(0.2)
    before = len(asyncio.all_tasks())
    clients = [(await RawClient.open(node.port))[0] for _ in range(200)]  # streams: no task of their own
    for raw in clients:
        await raw.frame()  # welcome
    await asyncio.sleep(0.2)
    assert len(node.table) == 200
    assert len(asyncio.all_tasks()) == before  # not one task per connection
    clients[0].send(client_frame(WS_BINARY, b"hi"))
    assert await clients[0].frame() == (Opcode.BINARY, b"echo:hi")
    await asyncio.sleep(0.05)
    assert len(asyncio.all_tasks()) == before  # the lane ended with its last message
    for raw in clients:
        raw.send(client_frame(WS_CLOSE, struct.pack("!H", 1000)))
    for raw in clients:
        assert (await raw.frame())[0] == Opcode.CLOSE
        assert await raw.closed_by_server()
    await asyncio.sleep(0.1)
    assert len(node.table) == 0 and not node.live


class SlowRecorder:
    """An application whose on_message takes a while, recording what it is given."""

    def __init__(self) -> None:
        self.log: list[str] = []

    async def on_message(self, conn: object, data: str | bytes) -> None:
        await asyncio.sleep(0.02)
        self.log.append(str(data))

    async def on_close(self, conn: object) -> None:
        self.log.append("close")


@uses_raw_sockets
async def test_messages_sent_before_the_close_are_all_handled_then_the_close(make_node: MakeNode) -> None:
    app = SlowRecorder()
    node = await make_node(app=app)
    raw, _ = await RawClient.open(node.port)
    await raw.frame()  # welcome
    messages = b"".join(client_frame(WS_TEXT, b"m%d" % i) for i in range(20))  # more than INBOX_HIGH
    raw.send(messages + client_frame(WS_CLOSE, struct.pack("!H", 1000)))
    assert (await raw.frame())[0] == Opcode.CLOSE
    for _ in range(100):
        if "close" in app.log:
            break
        await asyncio.sleep(0.05)
    assert app.log == [f"m{i}" for i in range(20)] + ["close"]


class Slow:
    """Takes its time with each message, so that a client's messages pile up in the lane."""

    async def on_message(self, conn: Connection, data: str | bytes) -> None:
        await asyncio.sleep(0.1)


async def test_a_close_while_reading_is_paused_still_reads_the_clients_reply(make_node: MakeNode) -> None:
    node = await make_node(app=Slow())
    async with connect(f"ws://127.0.0.1:{node.port}/") as ws:
        client_id = orjson.loads(await ws.recv())["client_id"]
        for i in range(40):  # the lane's inbox fills: the node stops reading from this client
            await ws.send(f"m{i}")
        await asyncio.sleep(0.3)
        started = asyncio.get_running_loop().time()
        assert await node.util.close(client_id, 4000, "bye") == 1
        await asyncio.wait_for(ws.wait_closed(), scaled(15))
        assert ws.close_code == 4000
        # well before the node's 10 s close timeout: it read the client's close reply
        assert asyncio.get_running_loop().time() - started < scaled(2)


async def _oversized_frame_then_read(port: int) -> bytes:
    """A client that writes a 16 MiB frame (over the node's limit) and reads only once it has written it
    all, as an asyncio client whose write fails gives up without reading: when the node fails the
    connection, the rest of the frame is still arriving. What it reads after the handshake."""
    raw, _ = await RawClient.open(port)
    raw.writer.transport.pause_reading()
    size = 16 << 20
    raw.send(bytes((0x82, 0xFF)) + struct.pack("!Q", size) + os.urandom(4) + bytes(size))
    with contextlib.suppress(ConnectionError):  # the connection was reset under it
        await asyncio.wait_for(raw.writer.drain(), scaled(10))
    if raw.writer.transport.is_closing():
        return b""  # a write that failed: what the kernel still held is lost with the transport
    raw.writer.transport.resume_reading()
    return await asyncio.wait_for(raw.reader.read(), scaled(10))


def _server_frames(data: bytes) -> list[tuple[int, bytes]]:
    frames = []
    while len(data) >= 2:
        length, head = data[1] & 0x7F, 2
        if length == 126:
            (length,), head = struct.unpack_from("!H", data, 2), 4
        frames.append((data[0] & 0x0F, data[head : head + length]))
        data = data[head + length :]
    return frames


@uses_raw_sockets
async def test_a_client_still_writing_when_the_node_fails_it_gets_the_close_frame(
    make_node: MakeNode,
) -> None:
    node = await make_node(max_frame=1000)
    for _ in range(20):  # the node half-closes and reads until the client's EOF: never a reset
        got = await _oversized_frame_then_read(node.port)
        closes = [payload for opcode, payload in _server_frames(got) if opcode == Opcode.CLOSE]
        assert closes and struct.unpack_from("!H", closes[0])[0] == 1009, got[-200:]
        _opened.pop().close()
    await asyncio.sleep(0.1)
    assert len(node.table) == 0 and not node.live


EMPTY_CONTINUATIONS = client_frame(WS_TEXT, b"x", fin=False) + client_frame(WS_CONT, b"", fin=False) * 40_000


@uses_raw_sockets
@pytest.mark.parametrize(
    ("flood", "client_rate", "code", "reason"),
    [
        (EMPTY_CONTINUATIONS, 0, 1009, b"message in more than 4096 frames"),
        (EMPTY_CONTINUATIONS, 100, 1008, b"rate limit exceeded"),
        (client_frame(WS_PING, b"p") * 40_000, 100, 1008, b"rate limit exceeded"),
    ],
    ids=["continuations-no-rate-limit", "continuations", "pings"],
)
async def test_a_flood_of_small_frames_is_closed_and_others_are_served(
    make_node: MakeNode, flood: bytes, client_rate: float, code: int, reason: bytes
) -> None:
    node = await make_node(client_rate=client_rate)
    flooder, _ = await RawClient.open(node.port)
    other, _ = await client(node.port)
    await flooder.frame()  # welcome
    # 40,000 empty continuation frames (240 KB): without a fragment cap, the rate limit counting frames
    # and a running size, this held the node's loop for seconds; or as many pings
    flooder.send(flood)
    await other.send(b"still served")
    pongs = 0
    while (frame := await flooder.frame())[0] == Opcode.PONG:
        pongs += 1
    assert frame == (Opcode.CLOSE, struct.pack("!H", code) + reason)
    assert pongs <= 2 * client_rate  # what the burst allows, then nothing more
    flooder.send(client_frame(WS_CLOSE, struct.pack("!H", code)))  # its close reply
    assert await flooder.closed_by_server()
    assert await recv(other) == b"echo:still served"
    assert node.metrics.rate_limit_closes == (1 if client_rate else 0)
    await other.close()
