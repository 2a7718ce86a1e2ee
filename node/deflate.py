"""permessage-deflate (RFC 7692), as the node does it: no compression state kept per connection. Pure.

The node accepts an offer only with ``server_no_context_takeover`` and ``client_no_context_takeover`` in
its answer, so every compressed message stands alone: a server message is compressed once per command,
and the same bytes go to every connection that negotiated the extension
(:meth:`~node.frames.Frame.deflated`); a
client's message is inflated on its own, with a fresh decompressor. A client may always be told not to
keep its context (RFC 7692 7.1.1.2), so an offer is declined only for what the node cannot honour: a
``server_max_window_bits`` of 8 (zlib's raw deflate does not do a 256-byte window), an unknown or
repeated parameter, a value out of range. The node then takes the client's next offer, or none (no
extension: plain frames, as without ``FANOUT_COMPRESSION``).

Payloads under ``MIN_SIZE`` bytes go out uncompressed (RSV1 clear, which RFC 7692 allows for any
message): at that size deflate saves a few bytes at best and costs a compressor's set-up on both sides. A
``fanout.v1`` message envelope is judged by the size of the application data it carries, not by its own
(:func:`node.frames.encode_frame`'s ``data_size``): the same message is compressed or not whichever
protocol its client speaks. A payload that deflate would not make smaller also goes out as it is.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

from websockets.exceptions import InvalidHeader
from websockets.headers import parse_extension

#: payloads of fewer bytes are sent uncompressed
MIN_SIZE = 128
#: compression level of server messages (zlib's default: most of level 9's gain at half its cost)
LEVEL = 6
#: what RFC 7692 has the sender strip from the end of a compressed message, and the receiver put back
_TAIL = b"\x00\x00\xff\xff"


def negotiate(offers: Sequence[str]) -> tuple[int, str] | None:
    """The first permessage-deflate offer of the request's ``Sec-WebSocket-Extensions`` headers that the
    node accepts: (the window bits its messages may use, the response's header); None for none."""
    for header in offers:
        try:
            extensions = parse_extension(header)
        except InvalidHeader:
            return None
        for name, params in extensions:
            if name == "permessage-deflate" and (bits := _window_bits(params)):
                answer = "permessage-deflate; server_no_context_takeover; client_no_context_takeover"
                if any(param == "server_max_window_bits" for param, _ in params):
                    answer += f"; server_max_window_bits={bits}"
                return bits, answer
    return None


def _window_bits(params: Sequence[tuple[str, str | None]]) -> int:
    """The window bits the client lets the node use (15 unless it asks for fewer); 0: declined."""
    bits, seen = 15, set()
    for name, value in params:
        if name in seen:
            return 0
        seen.add(name)
        if name in ("server_no_context_takeover", "client_no_context_takeover"):
            if value is not None:
                return 0
        elif name == "server_max_window_bits":
            if value is None or not value.isdigit() or not 9 <= int(value) <= 15:
                return 0
            bits = int(value)
        elif name == "client_max_window_bits":
            if value is not None and (not value.isdigit() or not 8 <= int(value) <= 15):
                return 0
        else:
            return 0
    return bits


def compress(payload: bytes, bits: int) -> bytes:
    """``payload`` as one compressed message (RFC 7692 7.2.1: a sync flush, its empty block stripped).

    The LZ77 window is the smallest through which zlib sees the whole payload (it keeps 262 bytes of
    look-ahead out of the window; at most the ``bits`` negotiated, which only bound the sender's window;
    at least 9, the least zlib takes for raw deflate), and the memory level (hash tables) is sized to the
    payload too: zlib allocates and clears both for every compressor, about 256 KB at 15 bits and the
    default level, which can cost more than compressing a small message (a 160-byte one measured 4 to
    60 us, depending on how the allocator hands that memory back, against 3.5 us sized to it), for the
    same output."""
    needed = (len(payload) + 261).bit_length()
    window = max(9, min(bits, needed))
    compressor = zlib.compressobj(LEVEL, zlib.DEFLATED, -window, max(1, min(8, needed - 6)))
    return (compressor.compress(payload) + compressor.flush(zlib.Z_SYNC_FLUSH))[:-4]


def inflate(data: bytes, max_size: int) -> bytes | None:
    """A client's compressed message, inflated; None when it is over ``max_size`` bytes inflated (a
    deflate bomb is stopped there, not inflated whole). Raises ``zlib.error`` for data that is not deflate."""
    inflater = zlib.decompressobj(-15)  # a client's window is at most 15 bits: any fits in this one
    message = inflater.decompress(data + _TAIL, max_size + 1)
    return None if len(message) > max_size else message
