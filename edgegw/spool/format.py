"""The spool's on-disk record format, sans-IO: bytes in, records and damage reports out.

A segment file is a sequence of records.  Every record has a fixed 32-byte header::

    offset size field
    0      4    magic        b"EGS1"
    4      1    kind         FRAME / COMMIT / STATE / ACK (see ``Kind``)
    5      1    flags        0 (reserved)
    6      2    reserved     0
    8      8    seq          frame sequence number (FRAME, COMMIT: last frame; ACK: watermark)
    16     4    meta_len     length of the CBOR metadata that follows the header
    20     4    body_len     length of the opaque body that follows the metadata
    24     4    payload_crc  CRC-32 of metadata + body
    28     4    header_crc   CRC-32 of bytes 0..28

(little endian).  The header has its own checksum so that a damaged body still tells us
*which* frame was lost (its seq and length can be trusted), and a damaged header is found
by re-synchronising on the next magic whose header checksum verifies.  CRC-32 (zlib's, in C)
is used rather than CRC-32C because the standard library has it; both catch every burst
error up to 32 bits, which is what a torn write or a flipped byte is.

Nothing here touches a file: ``encode_*`` build bytes, ``Scanner`` is fed bytes and yields
``Record`` / ``Damage`` events, holding at most one record plus one input chunk in memory.
"""

from __future__ import annotations

import dataclasses
import enum
import struct
import zlib
from collections.abc import Iterator
from typing import Any

import cbor2

MAGIC = b"EGS1"
HEADER = struct.Struct("<4sBBHQIIII")
HEADER_SIZE = HEADER.size  # 32
#: a record larger than this is treated as damage (a corrupt length must not make the
#: scanner buffer gigabytes); frames are far smaller (WebSocket messages are capped too)
MAX_RECORD = 64 * 1024 * 1024


class Kind(enum.IntEnum):
    FRAME = 1  # seq = frame seq; meta = {"n": n_records, "c": checkpoint delta}; body = frame
    COMMIT = 2  # seq = last frame seq of the group commit; marks everything before as durable
    STATE = 3  # first record of every segment: a snapshot of the retained state (see spool.py)
    ACK = 4  # seq = acked watermark; meta = {"r": selective ranges, "d": dropped through}


@dataclasses.dataclass(frozen=True)
class Record:
    offset: int
    size: int
    kind: Kind
    seq: int
    meta: bytes
    body: bytes

    def meta_value(self) -> Any:
        return cbor2.loads(self.meta) if self.meta else None


@dataclasses.dataclass(frozen=True)
class Damage:
    """Bytes that are not a valid record.

    ``seq``/``kind`` are known when the header verified but the payload did not (the frame
    that was lost is then known); ``truncated`` means the input ended inside a record (a torn
    tail, or a header whose length runs past the end).
    """

    offset: int
    size: int
    reason: str
    seq: int | None = None
    kind: Kind | None = None
    truncated: bool = False


def encode(kind: Kind, seq: int, meta: bytes = b"", body: bytes = b"") -> bytes:
    payload_crc = zlib.crc32(body, zlib.crc32(meta))
    head = HEADER.pack(MAGIC, int(kind), 0, 0, seq, len(meta), len(body), payload_crc, 0)
    header_crc = zlib.crc32(head[:28])
    return b"".join((head[:28], struct.pack("<I", header_crc), meta, body))


def encode_frame(seq: int, body: bytes, n_records: int, checkpoints: dict[str, Any]) -> bytes:
    meta: dict[str, Any] = {"n": n_records}
    if checkpoints:
        meta["c"] = checkpoints
    return encode(Kind.FRAME, seq, cbor2.dumps(meta), body)


def encode_commit(last_seq: int) -> bytes:
    return encode(Kind.COMMIT, last_seq)


def encode_state(state: dict[str, Any]) -> bytes:
    return encode(Kind.STATE, 0, cbor2.dumps(state))


def encode_ack(watermark: int, ranges: list[tuple[int, int]], dropped_through: int,
               dropped: list[tuple[int, int]] | None = None) -> bytes:
    """``dropped``: the seqs dropped before they were acknowledged (``"u"``, left out when
    none: the record an older spool wrote)."""
    meta: dict[str, Any] = {"r": [list(r) for r in ranges], "d": dropped_through}
    if dropped:
        meta["u"] = [list(r) for r in dropped]
    return encode(Kind.ACK, watermark, cbor2.dumps(meta))


def frame_size(body_len: int, meta_len: int) -> int:
    return HEADER_SIZE + meta_len + body_len


@dataclasses.dataclass(frozen=True)
class Header:
    kind: int
    seq: int
    meta_len: int
    body_len: int
    payload_crc: int

    @property
    def size(self) -> int:
        return HEADER_SIZE + self.meta_len + self.body_len


def decode_header(buf: bytes | memoryview) -> Header | None:
    """The header at the start of ``buf`` (>= 32 bytes), or None if it does not verify."""
    magic, kind, _flags, _res, seq, meta_len, body_len, payload_crc, header_crc = (
        HEADER.unpack_from(buf, 0))
    if magic != MAGIC or zlib.crc32(bytes(buf[:28])) != header_crc:
        return None
    if kind not in Kind.__members__.values() or HEADER_SIZE + meta_len + body_len > MAX_RECORD:
        return None
    return Header(kind, seq, meta_len, body_len, payload_crc)


def decode(buf: bytes, offset: int = 0) -> Record:
    """Decode exactly one whole record (tests and the reader); raises ValueError if damaged."""
    if len(buf) < HEADER_SIZE:
        raise ValueError("short record")
    h = decode_header(buf)
    if h is None:
        raise ValueError("bad header")
    if len(buf) < h.size:
        raise ValueError("truncated record")
    meta = bytes(buf[HEADER_SIZE:HEADER_SIZE + h.meta_len])
    body = bytes(buf[HEADER_SIZE + h.meta_len:h.size])
    if zlib.crc32(body, zlib.crc32(meta)) != h.payload_crc:
        raise ValueError("payload checksum mismatch")
    return Record(offset, h.size, Kind(h.kind), h.seq, meta, body)


class Scanner:
    """Incremental scanner: ``feed`` chunks, iterate ``events()``, call ``end()`` at EOF.

    ``keep_bodies=False`` (recovery) drops frame bodies once their checksum verified, so the
    events of a 1 GB backlog never hold more than one record plus one chunk in memory.
    """

    def __init__(self, offset: int = 0, keep_bodies: bool = True) -> None:
        self._buf = bytearray()
        self._start = 0  # index in _buf of the first unconsumed byte
        self._pos = offset  # file offset of _buf[_start]
        self._eof = False
        self.keep_bodies = keep_bodies

    def feed(self, data: bytes) -> None:
        if self._start:
            # compact once per chunk, not once per record (del of a prefix is a memmove)
            del self._buf[:self._start]
            self._start = 0
        self._buf += data

    def end(self) -> None:
        self._eof = True

    @property
    def offset(self) -> int:
        """File offset of the first byte not yet turned into an event."""
        return self._pos

    def _consume(self, n: int) -> None:
        self._start += n
        self._pos += n

    def events(self) -> Iterator[Record | Damage]:
        buf = self._buf
        while True:
            st = self._start
            avail = len(buf) - st
            if avail < HEADER_SIZE:
                if self._eof and avail:
                    yield Damage(self._pos, avail, "torn header at end", truncated=True)
                    self._consume(avail)
                return
            h = decode_header(bytes(buf[st:st + HEADER_SIZE]))
            if h is None:
                skip, found = self._resync()
                if not found and self._eof:
                    skip = avail
                    yield Damage(self._pos, skip, "unreadable bytes at end", truncated=True)
                elif skip:
                    yield Damage(self._pos, skip, "bad header")
                self._consume(skip)
                if not found and not self._eof:
                    return  # need more data to find the next header
                continue
            if avail < h.size:
                if not self._eof:
                    return
                yield Damage(self._pos, avail, "record runs past end of file",
                             seq=h.seq, kind=Kind(h.kind), truncated=True)
                self._consume(avail)
                return
            with memoryview(buf) as mv:
                meta = bytes(mv[st + HEADER_SIZE:st + HEADER_SIZE + h.meta_len])
                with mv[st + HEADER_SIZE + h.meta_len:st + h.size] as body_mv:
                    ok = zlib.crc32(body_mv, zlib.crc32(meta)) == h.payload_crc
                    body = bytes(body_mv) if ok and self.keep_bodies else b""
            if ok:
                yield Record(self._pos, h.size, Kind(h.kind), h.seq, meta, body)
            else:
                yield Damage(self._pos, h.size, "payload checksum mismatch",
                             seq=h.seq, kind=Kind(h.kind))
            self._consume(h.size)

    def _resync(self) -> tuple[int, bool]:
        """(bytes to skip, whether a verifiable header starts there).

        When no header is found yet, the skip keeps the last bytes that could still begin
        one, so garbage never accumulates in the buffer.
        """
        buf = self._buf
        st = self._start
        i = st + 1
        while True:
            i = buf.find(MAGIC, i)
            if i < 0:
                return max(1, len(buf) - st - (len(MAGIC) - 1)), False
            if len(buf) - i < HEADER_SIZE:
                return i - st, False
            if decode_header(bytes(buf[i:i + HEADER_SIZE])) is not None:
                return i - st, True
            i += 1


def scan(data: bytes, offset: int = 0, keep_bodies: bool = True) -> list[Record | Damage]:
    """Scan a whole buffer (convenience for tests and small files)."""
    s = Scanner(offset, keep_bodies)
    s.feed(data)
    s.end()
    return list(s.events())


__all__ = [
    "HEADER",
    "HEADER_SIZE",
    "MAGIC",
    "MAX_RECORD",
    "Damage",
    "Header",
    "Kind",
    "Record",
    "Scanner",
    "decode",
    "decode_header",
    "encode",
    "encode_ack",
    "encode_commit",
    "encode_frame",
    "encode_state",
    "frame_size",
    "scan",
]
