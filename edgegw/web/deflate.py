"""permessage-deflate (RFC 7692) for server WebSockets whose frames are prepared once for
many clients (docs/live-protocol.md, "Compression").

Why always ``server_no_context_takeover``: with a compression context per connection, the
same message compresses to different bytes for every client, and the fan-out's "encode
once, write many" is gone (and so is the memory: a deflate context is ~300 KiB per
client).  Without context takeover a message compresses to the same bytes for every client
that agreed the same parameters, so one compressed frame is shared like a plain one.  The
response also asks ``client_no_context_takeover``, so the hub holds no inflate context
between a client's (small, rare) messages either.

An offer is accepted only when its parameters are known and allow a 15-bit server window
(``server_max_window_bits`` absent or 15); otherwise it is declined -- RFC 7692 lets a
server decline any offer -- and that client gets plain frames, as one that offers nothing.
"""

from __future__ import annotations

import zlib

from wsproto.extensions import PerMessageDeflate
from wsproto.frame_protocol import CloseReason

from .websocket import prepare_message

NAME = "permessage-deflate"
RESPONSE = f"{NAME}; server_no_context_takeover; client_no_context_takeover"
_KNOWN = {"server_no_context_takeover", "client_no_context_takeover",
          "server_max_window_bits", "client_max_window_bits"}


def accept_offer(header: str) -> bool:
    """Whether a ``Sec-WebSocket-Extensions`` header has a permessage-deflate offer this
    server can accept (then it answers ``RESPONSE``)."""
    for offer in header.split(","):
        name, *params = [p.strip() for p in offer.split(";")]
        if name.lower() != NAME:
            continue
        ok = True
        for param in params:
            key, _, value = (s.strip().strip('"') for s in param.partition("="))
            key = key.lower()
            if key not in _KNOWN:
                ok = False
            elif key.endswith("_max_window_bits") and value and not (
                    value.isdigit() and 8 <= int(value) <= 15):
                ok = False
            elif key == "server_max_window_bits" and value != "15":
                ok = False  # our shared frames use the full window
        if ok:
            return True
    return False


class InboundDeflate(PerMessageDeflate):
    """wsproto's permessage-deflate, agreed as ``RESPONSE``, with the client's compressed
    messages inflated to at most ``max_message_size`` bytes: a small message never
    expands without bound (wsproto inflates whatever arrives)."""

    def __init__(self, max_message_size: int) -> None:
        super().__init__()
        self.max_message_size = max_message_size
        self._inflated = 0
        self.finalize(RESPONSE)

    def frame_inbound_payload_data(self, proto, data):
        if not self._inbound_compressed or not self._inbound_is_compressible:
            return data
        assert self._decompressor is not None
        room = self.max_message_size - self._inflated + 1
        try:
            out = self._decompressor.decompress(bytes(data), room)
        except zlib.error:
            return CloseReason.INVALID_FRAME_PAYLOAD_DATA
        self._inflated += len(out)
        if self._inflated > self.max_message_size or self._decompressor.unconsumed_tail:
            return CloseReason.MESSAGE_TOO_BIG
        return out

    def frame_inbound_complete(self, proto, fin):
        if fin:
            self._inflated = 0
        return super().frame_inbound_complete(proto, fin)


class Deflater:
    """Prepares server->client frames for clients that agreed ``RESPONSE``: a message of
    at least ``min_bytes`` as one compressed frame (RSV1 set), a smaller one -- or one that
    would not shrink -- as a plain frame (RFC 7692 lets each message choose)."""

    def __init__(self, level: int = 1, min_bytes: int = 1024) -> None:
        self.level = level
        self.min_bytes = min_bytes

    def prepare(self, data: bytes | str) -> bytes:
        payload = data.encode() if isinstance(data, str) else data
        if len(payload) < self.min_bytes:
            return prepare_message(data)
        c = zlib.compressobj(self.level, zlib.DEFLATED, -15)
        packed = c.compress(payload) + c.flush(zlib.Z_SYNC_FLUSH)
        packed = packed[:-4]  # the empty stored block's 00 00 ff ff (RFC 7692 7.2.1)
        if len(packed) >= len(payload):
            return prepare_message(data)
        opcode = 0x1 if isinstance(data, str) else 0x2
        n = len(packed)
        head = bytes((0x80 | 0x40 | opcode,))  # FIN, RSV1 (compressed), opcode
        if n < 126:
            head += bytes((n,))
        elif n < 1 << 16:
            head += b"\x7e" + n.to_bytes(2, "big")
        else:
            head += b"\x7f" + n.to_bytes(8, "big")
        return head + packed
