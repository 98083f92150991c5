"""Frame-body compression on ``/ws/gateway`` (docs/protocol.md section 5.1), sans-IO.

Why inside the frame body and not permessage-deflate: the gateway's client library
(trio-websocket) has no WebSocket extensions, and a body-level encoding is what a second
implementation can add with nothing but zlib.  Negotiated in HELLO/WELCOME, so a peer
that does not know it never sees a compressed body.

Only "zlib" (RFC 1950: deflate with an Adler-32 check) is defined: it is in every
language's standard library.  Each body is compressed on its own (no shared context), so
any frame can be resent, in any order, on any connection.
"""

from __future__ import annotations

import zlib

from .messages import CloseCode, ProtocolError

ZLIB = "zlib"
#: what this implementation can send and receive, in order of preference
ENCODINGS = (ZLIB,)


def compress_body(body: bytes, level: int) -> bytes:
    return zlib.compress(body, level)


def decompress_body(data: bytes, limit: int) -> bytes:
    """The body a zlib stream holds, at most ``limit`` bytes.  Raises ProtocolError:
    TOO_BIG (1009) when it holds more -- a small message must not expand without bound --
    and PROTOCOL_ERROR (4004) when it is not a complete zlib stream."""
    d = zlib.decompressobj()
    try:
        body = d.decompress(data, limit + 1)  # one byte more tells "over the limit"
    except zlib.error as exc:
        raise ProtocolError(CloseCode.PROTOCOL_ERROR,
                            f"DATA body is not valid zlib data: {exc}") from None
    if len(body) > limit:
        raise ProtocolError(CloseCode.TOO_BIG, f"DATA body decompresses to more than the "
                            f"limit of {limit} bytes")
    if not d.eof or d.unused_data:
        raise ProtocolError(CloseCode.PROTOCOL_ERROR,
                            "DATA body is not one complete zlib stream")
    return body
