"""permessage-deflate (RFC 7692): the offers the node accepts, server frames compressed once and shared,
client messages inflated with a bound - bytes in, then a real node with websockets' client (which
offers the extension by default) and raw sockets."""

from __future__ import annotations

import asyncio
import base64
import os
import struct
import zlib

import orjson
import pytest
from websockets.asyncio.client import connect
from websockets.extensions.permessage_deflate import ClientPerMessageDeflateFactory
from websockets.frames import Frame as WsFrame
from websockets.frames import Opcode as WsOpcode

from node.deflate import MIN_SIZE, compress, inflate, negotiate
from node.frames import COMPRESSED, Opcode, encode_frame, read_frames
from node.v1 import message_frame
from node.wire import Signal, State, Wire
from tests.conftest import MakeNode
from tests.support import scaled

ANSWER = "permessage-deflate; server_no_context_takeover; client_no_context_takeover"
PAYLOAD = orjson.dumps([{"id": i, "user": f"user{i % 7}", "text": "hello, how are you?"} for i in range(20)])


def compressed(payload: bytes) -> bytes:
    """``payload`` as a client compresses a message (RFC 7692 7.2.1)."""
    compressor = zlib.compressobj(6, zlib.DEFLATED, -15)
    return (compressor.compress(payload) + compressor.flush(zlib.Z_SYNC_FLUSH))[:-4]


def client_frame(opcode: int, payload: bytes, *, fin: bool = True, rsv1: bool = False) -> bytes:
    data = WsFrame(WsOpcode(opcode), payload, fin).serialize(mask=True, extensions=[])
    return bytes((data[0] | (0x40 if rsv1 else 0),)) + data[1:]


def unmasked(data: bytes) -> tuple[int, bytes]:
    """The first byte and payload of one server frame."""
    length, head = data[1] & 0x7F, 2
    if length == 126:
        (length,), head = struct.unpack_from("!H", data, 2), 4
    elif length == 127:
        (length,), head = struct.unpack_from("!Q", data, 2), 10
    return data[0], data[head : head + length]


@pytest.mark.parametrize(
    ("offers", "accepted"),
    [
        (["permessage-deflate"], (15, ANSWER)),
        (["permessage-deflate; client_max_window_bits"], (15, ANSWER)),  # what browsers offer
        (["permessage-deflate; client_max_window_bits=10; client_no_context_takeover"], (15, ANSWER)),
        (["permessage-deflate; server_no_context_takeover"], (15, ANSWER)),
        (["permessage-deflate; server_max_window_bits=10"], (10, ANSWER + "; server_max_window_bits=10")),
        # a window of 8 bits the node cannot honour (zlib): the next offer is taken
        (["permessage-deflate; server_max_window_bits=8, permessage-deflate"], (15, ANSWER)),
        (["permessage-deflate; server_max_window_bits=8"], None),
        (["permessage-deflate; server_max_window_bits"], None),  # a value is required
        (["permessage-deflate; server_max_window_bits=16"], None),
        (["permessage-deflate; client_max_window_bits=7"], None),
        (["permessage-deflate; client_no_context_takeover=1"], None),
        (["permessage-deflate; mystery"], None),
        (["permessage-deflate; client_no_context_takeover; client_no_context_takeover"], None),
        (["x-webkit-deflate-frame", "permessage-deflate"], (15, ANSWER)),  # over two header lines
        (["x-webkit-deflate-frame"], None),
        (["permessage-deflate; =="], None),  # not a header at all
    ],
)
def test_offers_accepted_and_declined(offers: list[str], accepted: tuple[int, str] | None) -> None:
    assert negotiate(offers) == accepted


def test_a_server_frame_is_compressed_once_and_shared() -> None:
    frame = encode_frame(PAYLOAD)
    deflated = frame.deflated(15)
    assert deflated is frame.deflated(15)  # built once, for every connection that wants it
    first, data = unmasked(deflated)
    assert first == 0x80 | COMPRESSED | Opcode.TEXT and len(data) < len(PAYLOAD) / 3
    assert zlib.decompressobj(-15).decompress(data + b"\x00\x00\xff\xff") == PAYLOAD
    small = encode_frame(b"x" * (MIN_SIZE - 1), binary=True)  # under the threshold: as it is
    assert small.deflated(15) is small
    noise = encode_frame(os.urandom(1000), binary=True)  # would not shrink: as it is
    assert noise.deflated(15) is noise
    big = encode_frame(PAYLOAD * 1000)  # a 64-bit length, and a smaller window for another client
    first, data = unmasked(big.deflated(9))
    assert first == 0x80 | COMPRESSED | Opcode.TEXT
    assert zlib.decompressobj(-9).decompress(data + b"\x00\x00\xff\xff") == PAYLOAD * 1000


def test_a_v1_envelope_is_compressed_as_its_data_would_be() -> None:
    """The threshold applies to the application's data, not to the envelope around it: a 100-byte
    message in a 150-byte envelope goes out as it is, as it would to a raw client."""
    data = b"x" * (MIN_SIZE - 28)
    small = message_frame(data, False, False, {"group:lobby": 123456, "flag:42": 7})
    assert len(small) - 2 >= MIN_SIZE  # the envelope alone is over the threshold
    assert small.deflated(15) is small
    raw = encode_frame(data)
    assert raw.deflated(15) is raw  # as a raw client's frame
    at = message_frame(b"x" * MIN_SIZE, False, False, None)
    first, body = unmasked(at.deflated(15))
    assert first == 0x80 | COMPRESSED | Opcode.TEXT
    assert (
        orjson.loads(zlib.decompressobj(-15).decompress(body + b"\x00\x00\xff\xff"))["data"] == "x" * MIN_SIZE
    )
    binary = message_frame(os.urandom(MIN_SIZE - 1), True, False, None)  # base64 is longer: still small
    assert binary.deflated(15) is binary


@pytest.mark.parametrize("size", [MIN_SIZE, 511, 512, 513, 40_000, 300_000])
@pytest.mark.parametrize("bits", [9, 12, 15])
def test_a_compressed_message_uses_a_window_no_larger_than_negotiated_and_as_deflate_would(
    size: int, bits: int
) -> None:
    """compress sizes its window to the payload (at most ``bits``): a client with a ``bits``-bit window
    inflates it, and it is as small as with the whole window."""
    payload = (PAYLOAD * (size // len(PAYLOAD) + 1))[:size]
    data = compress(payload, bits)
    assert zlib.decompressobj(-bits).decompress(data + b"\x00\x00\xff\xff") == payload
    compressor = zlib.compressobj(6, zlib.DEFLATED, -bits)
    assert len(data) <= len((compressor.compress(payload) + compressor.flush(zlib.Z_SYNC_FLUSH))[:-4])


def test_the_wire_inflates_compressed_messages_whole_and_fragmented() -> None:
    wire = Wire(1 << 20, deflate=True)
    data = compressed(PAYLOAD)
    wire.receive_data(
        client_frame(WsOpcode.TEXT, data, rsv1=True)
        + client_frame(WsOpcode.BINARY, data[:10], fin=False, rsv1=True)
        + client_frame(WsOpcode.PING, b"p")
        + client_frame(WsOpcode.CONT, data[10:])
        + client_frame(WsOpcode.TEXT, b"plain")  # RSV1 clear: not compressed
    )
    assert wire.events_received() == [PAYLOAD.decode(), PAYLOAD, "plain"]
    assert wire.data_to_send() == bytes((0x8A, 1)) + b"p"


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (client_frame(WsOpcode.TEXT, compressed(b"\xff\xfe"), rsv1=True), 1007),  # not UTF-8 once inflated
        (client_frame(WsOpcode.BINARY, b"\xff\xff\xff", rsv1=True), 1007),  # not deflate
        # RSV1 on a continuation or a control frame, or RSV2
        (client_frame(WsOpcode.TEXT, b"a", fin=False) + client_frame(WsOpcode.CONT, b"b", rsv1=True), 1002),
        (bytes((0x80 | 0x40 | 0x9, 0x80)) + b"\0" * 4, 1002),
        (bytes((0x80 | 0x20 | 0x1, 0x80)) + b"\0" * 4, 1002),
    ],
)
def test_the_wire_fails_bad_compressed_messages(data: bytes, code: int) -> None:
    wire = Wire(1 << 20, deflate=True)
    wire.receive_data(data)
    assert wire.events_received()[-1] is Signal.FAILED and wire.failure[0] == code


def test_a_deflate_bomb_is_stopped_at_the_limit() -> None:
    bomb = compressed(bytes(64 << 20))  # 64 MiB of zeros: about 64 KiB compressed
    assert len(bomb) < 100_000
    assert inflate(bomb, 1 << 20) is None
    assert inflate(compressed(bytes(1 << 20)), 1 << 20) == bytes(1 << 20)  # exactly the limit is fine
    wire = Wire(1 << 20, deflate=True)
    wire.receive_data(client_frame(WsOpcode.BINARY, bomb, rsv1=True))
    assert wire.events_received() == [Signal.FAILED] and wire.failure[0] == 1009
    assert wire.state is State.FAILING
    # without the extension, RSV1 is a protocol error (read_frames refuses it from the header)
    frames, used, _, error = read_frames(client_frame(WsOpcode.BINARY, bomb, rsv1=True), 1 << 20)
    assert frames == [] and used == 0 and error is not None and error.code == 1002


# -- a real node ------------------------------------------------------------------------------------


async def test_websockets_client_negotiates_and_both_directions_are_compressed(make_node: MakeNode) -> None:
    node = await make_node()
    async with connect(f"ws://127.0.0.1:{node.port}/", max_size=None) as ws:
        assert ws.response is not None
        assert ws.response.headers["Sec-WebSocket-Extensions"] == ANSWER
        assert [type(e).__name__ for e in ws.protocol.extensions] == ["PerMessageDeflate"]
        await ws.recv()  # welcome
        await ws.send(PAYLOAD)  # compressed by the client, inflated by the node's wire
        await ws.send(PAYLOAD * 200)
        assert await ws.recv() == b"echo:" + PAYLOAD  # the test application echoes: compressed by the node
        assert await ws.recv() == b"echo:" + PAYLOAD * 200


async def raw_open(port: int, offer: bytes) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: " + base64.b64encode(os.urandom(16)) + b"\r\n"
        b"Sec-WebSocket-Version: 13\r\n" + offer + b"\r\n"
    )
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), scaled(5))
    return reader, writer, head


async def read_frame(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    first, second = await asyncio.wait_for(reader.readexactly(2), scaled(5))
    length = second & 0x7F
    if length == 126:
        (length,) = struct.unpack("!H", await reader.readexactly(2))
    elif length == 127:
        (length,) = struct.unpack("!Q", await reader.readexactly(8))
    return first, await reader.readexactly(length)


async def test_a_broadcast_reaches_deflate_and_plain_clients_each_in_its_form(make_node: MakeNode) -> None:
    node = await make_node()
    deflating, writer, head = await raw_open(node.port, b"Sec-WebSocket-Extensions: permessage-deflate\r\n")
    assert b"Sec-WebSocket-Extensions: " + ANSWER.encode() in head
    plain, plain_writer, plain_head = await raw_open(node.port, b"")
    assert b"Sec-WebSocket-Extensions" not in plain_head
    for reader in (deflating, plain):
        first, _ = await read_frame(reader)  # welcome: under MIN_SIZE, so never compressed
        assert first == 0x81
    await node.util.send_to_all(PAYLOAD.decode())
    first, data = await read_frame(deflating)
    assert first == 0x81 | COMPRESSED and len(data) < len(PAYLOAD) / 3
    assert zlib.decompressobj(-15).decompress(data + b"\x00\x00\xff\xff") == PAYLOAD
    assert await read_frame(plain) == (0x81, PAYLOAD)
    for w in (writer, plain_writer):
        w.close()


async def test_a_v1_client_gets_small_messages_plain_and_large_ones_compressed(make_node: MakeNode) -> None:
    node = await make_node()
    offer = b"Sec-WebSocket-Extensions: permessage-deflate\r\nSec-WebSocket-Protocol: fanout.v1\r\n"
    reader, writer, head = await raw_open(node.port, offer)
    assert b"Sec-WebSocket-Protocol: fanout.v1" in head and ANSWER.encode() in head
    first, welcome = await read_frame(reader)
    assert orjson.loads(welcome)["type"] == "welcome"
    small = "y" * 100
    await node.util.send_to_all(small)
    first, data = await read_frame(reader)
    assert first == 0x81 and orjson.loads(data) == {"type": "message", "data": small}
    await node.util.send_to_all(PAYLOAD.decode())
    first, data = await read_frame(reader)
    assert first == 0x81 | COMPRESSED
    envelope = orjson.loads(zlib.decompressobj(-15).decompress(data + b"\x00\x00\xff\xff"))
    assert envelope == {"type": "message", "data": PAYLOAD.decode()}
    writer.close()


async def test_fanout_compression_off_declines_every_offer(make_node: MakeNode) -> None:
    node = await make_node(compression=False)
    async with connect(f"ws://127.0.0.1:{node.port}/", extensions=[ClientPerMessageDeflateFactory()]) as ws:
        assert ws.response is not None and "Sec-WebSocket-Extensions" not in ws.response.headers
        assert ws.protocol.extensions == []
        await ws.recv()
        await ws.send(PAYLOAD)
        assert await ws.recv() == b"echo:" + PAYLOAD
