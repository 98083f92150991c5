"""Oversize PUBLISH packets cut out of the byte stream before paho reads them (sans-IO).

paho reads a whole packet into memory before handing it on, so ``max_payload_bytes``
alone would still let one hostile 256 MB message cost the gateway 256 MB (and more while
paho's buffer grows).  ``PublishSizeGuard`` sits between the socket and paho: bytes in,
bytes out.  It follows the MQTT framing (fixed header, remaining length) and passes every
packet through unchanged, except a PUBLISH whose payload is longer than the limit: that
one is rewritten as the same PUBLISH (flags, topic, packet identifier) with the payload
replaced by ``OVERSIZE_MARK`` + its length in ASCII digits, and the payload's bytes are
dropped as they arrive.  paho then handles (and acknowledges) a small, valid message, and the
receiver recognises the mark (``oversize_length``) and refuses the message as a bad payload.

Only what decides the cut is ever held: the fixed header, and for a PUBLISH longer than the
limit its variable header (topic up to 64 KiB; in MQTT 5 the properties, which an oversize
message loses -- edgegw asks for no topic aliases, so a message carries nothing there it
needs; properties over 64 KiB are cut with the payload).  Anything malformed passes through
unchanged from there on, for paho to refuse as it does now.
"""

from __future__ import annotations

OVERSIZE_MARK = b"\xffedgegw-oversize:"  # 0xff: never the start of text or JSON
_PUBLISH = 3
_MAX_HELD_PROPERTIES = 65536


def oversize_length(payload: bytes | bytearray) -> int | None:
    """The payload length of a message the guard cut (in MQTT 5 with properties over
    64 KiB, payload and properties), or None for any other payload."""
    if payload[:len(OVERSIZE_MARK)] != OVERSIZE_MARK:
        return None
    digits = payload[len(OVERSIZE_MARK):]
    return int(digits) if digits.isdigit() else None


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _read_varint(data: bytes, pos: int, end: int) -> tuple[int, int] | None:
    """(value, position after it); None if it continues past ``end``; (-1, pos) if longer
    than four bytes (malformed)."""
    value = 0
    for i in range(4):
        if pos + i >= end:
            return None
        byte = data[pos + i]
        value |= (byte & 0x7F) << (7 * i)
        if not byte & 0x80:
            return value, pos + i + 1
    return -1, pos


class PublishSizeGuard:
    """One connection's incoming bytes: ``feed(data)`` returns what paho may read.  A new
    connection needs a new guard (the framing state belongs to one byte stream)."""

    def __init__(self, max_payload: int, *, v5: bool) -> None:
        if max_payload < 0:
            raise ValueError("max_payload must not be negative")
        self.max_payload = max_payload
        self.v5 = v5
        self.cut = 0  # messages cut
        self.dropped_bytes = 0  # payload (and property) bytes dropped
        self._held = b""  # the start of a packet that needs more bytes to decide
        self._pass = 0  # bytes of the current packet still to pass on unchanged
        self._skip = 0  # bytes of a cut packet still to drop
        self._broken = False  # malformed framing: everything passes from here on

    def feed(self, data: bytes) -> bytes:
        if self._broken:
            return data
        if self._held:
            data = self._held + data
            self._held = b""
        n = len(data)
        pos = 0
        run = 0  # start of the run of bytes being passed on unchanged
        pieces: list[bytes] = []
        while pos < n:
            if self._pass:
                k = min(self._pass, n - pos)
                self._pass -= k
                pos += k
                continue
            if self._skip:
                if pos > run:
                    pieces.append(data[run:pos])
                k = min(self._skip, n - pos)
                self._skip -= k
                self.dropped_bytes += k
                pos += k
                run = pos
                continue
            # a packet starts at pos
            header = _read_varint(data, pos + 1, n)
            if header is None:
                break  # hold the rest
            remaining, body = header
            if remaining < 0:
                self._broken = True
                pos = n
                break
            if data[pos] >> 4 != _PUBLISH or remaining <= self.max_payload:
                self._pass = remaining  # the payload cannot be over the limit
                pos = body
                continue
            decided = self._publish(data, pos, body, remaining, n)
            if decided is None:
                break  # the variable header is not all here yet: hold from pos
            if isinstance(decided, int):  # passes unchanged
                self._pass = remaining
                pos = body
                continue
            rewritten, resume, skip = decided
            if pos > run:
                pieces.append(data[run:pos])
            pieces.append(rewritten)
            self.cut += 1
            self._skip = skip
            pos = run = resume
        if pos < n:
            self._held = data[pos:]
        tail = data[run:pos] if (run or pos < n) else data
        if not pieces:
            return tail
        pieces.append(tail)
        return b"".join(pieces)

    def _publish(self, data: bytes, start: int, body: int, remaining: int, n: int
                 ) -> int | tuple[bytes, int, int] | None:
        """A PUBLISH longer than the limit: None (need more bytes), 0 (its payload is
        within the limit, or it is malformed: pass it), or (the rewritten packet, where
        the original resumes, the bytes to drop from there: properties and payload)."""
        if body + 2 > n:
            return None
        topic_end = body + 2 + ((data[body] << 8) | data[body + 1])
        qos = (data[start] >> 1) & 3
        vh_end = topic_end + (2 if qos else 0)
        if vh_end - body > remaining:
            return 0  # malformed: paho refuses it
        if vh_end > n:
            return None
        kept = data[body:vh_end]
        if self.v5:
            props = _read_varint(data, vh_end, n)
            if props is None:
                return None
            props_len, props_start = props
            if props_len < 0 or props_start - body + props_len > remaining:
                return 0
            payload = remaining - (props_start - body) - props_len
            if props_len <= _MAX_HELD_PROPERTIES:
                if payload <= self.max_payload:
                    if props_start + props_len > n:
                        return None
                    return 0
                reported = payload
            else:
                reported = props_len + payload
            resume, skip = props_start, props_len + payload
            kept += b"\x00"  # no properties
        else:
            payload = remaining - (vh_end - body)
            if payload <= self.max_payload:
                return 0
            resume, skip, reported = vh_end, payload, payload
        mark = OVERSIZE_MARK + str(reported).encode()
        new_body = kept + mark
        return bytes([data[start]]) + _varint(len(new_body)) + new_body, resume, skip
