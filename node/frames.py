"""Server-to-client websocket frames, built once per command. Pure: no I/O.

The node writes these bytes straight to every targeted connection's transport, so a broadcast to
10,000 connections encodes its payload once, not 10,000 times. That is only correct because the node
serves without extensions (no permessage-deflate): a server frame is then fully determined by its
opcode and payload (RFC 6455 section 5.2; server frames are never masked).
"""

from __future__ import annotations

import struct

OP_TEXT = 0x1
OP_BINARY = 0x2
_FIN = 0x80


def encode_frame(payload: bytes, binary: bool = False) -> bytes:
    """One unfragmented, unmasked data frame carrying ``payload``."""
    first = _FIN | (OP_BINARY if binary else OP_TEXT)
    length = len(payload)
    if length < 126:
        header = bytes((first, length))
    elif length < 65536:
        header = struct.pack("!BBH", first, 126, length)
    else:
        header = struct.pack("!BBQ", first, 127, length)
    return header + payload
