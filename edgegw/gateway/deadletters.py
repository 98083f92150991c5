"""The gateway's dead-letter file (docs/spool.md, "The dead-letter file"): a sequence of
entries, each a 4-byte big-endian length then a CBOR map.  ``scan_dead_letters`` is the
sans-IO reader (bytes in, entries and damage out); the functions below it do the file I/O
(blocking ones run in worker threads).

The format has no markers or checksums (it is meant to be read by anyone with a CBOR
library), so damage is found by an entry that does not decode, and a reader re-synchronises
past it on the next offset where a whole entry decodes -- a map with every key the gateway
writes -- so that the entries after damage are seen: the gateway checks them for repeats,
and one it did not see would be written a second time."""

from __future__ import annotations

import dataclasses
import io
import logging
import mmap
import os
import sys
from collections import Counter
from collections.abc import Sequence
from contextlib import suppress
from typing import Any

import cbor2
import trio

from ..metrics import Metric, Metrics
from ..protocol import FrameError, ProtocolError, decode_body, is_columnar, to_rows
from ..records import Record, RecordError, from_wire

log = logging.getLogger("edgegw.gateway")

#: the file's name in ``gateway.state_dir``
DEAD_LETTER_FILE = "dead-letter.cborseq"

#: the keys of every entry the gateway writes; a re-synchronising reader takes an offset
#: for an entry only where a map with all of them decodes
ENTRY_KEYS = frozenset({"seq", "epoch", "reason", "at", "body"})
_CBOR_MAP = 5  # CBOR major type of a map (an entry's first byte, bits 7-5)


@dataclasses.dataclass
class DeadLetterScan:
    """What ``scan_dead_letters`` found."""
    #: (offset, entry) of every entry that decodes, in file order
    entries: list[tuple[int, dict[str, Any]]]
    #: (offset, size) of each damaged region skipped (entries found after it)
    damaged: list[tuple[int, int]]
    #: where a torn last entry begins (a crash in its write: its bytes stop short of the
    #: length it gives, or are zeros), else None; nothing decodes after it
    torn_at: int | None = None
    #: (offset, size) of bytes at the end that are neither an entry nor torn, else None
    junk_tail: tuple[int, int] | None = None


def scan_dead_letters(data: Sequence[int] | bytes | mmap.mmap) -> DeadLetterScan:
    """Read a dead-letter file's bytes (``bytes`` or an ``mmap``): every entry, the damaged
    regions between them, and a torn or damaged tail."""
    size = len(data)
    scan = DeadLetterScan([], [])
    offset = 0
    after_entry = False  # whether the entry before ``offset`` ends right at it
    while offset < size:
        entry = _entry_at(data, offset, size, strict=False)
        if entry is not None:
            scan.entries.append((offset, entry[0]))
            offset += 4 + entry[1]
            after_entry = True
            continue
        # An entry cut short swallows the head of the next one and may still decode (its
        # length field is whole): so the search starts inside the entry before, and an
        # entry found there means that one was damaged.
        start = scan.entries[-1][0] + 1 if after_entry else offset + 1
        resume = _resync(data, start, size)
        after_entry = False
        if resume is not None:
            if resume < offset:
                offset = scan.entries.pop()[0]
            scan.damaged.append((offset, resume - offset))
            offset = resume
            continue
        n = int.from_bytes(bytes(data[offset:offset + 4]), "big")
        if offset + 4 + n >= size or not bytes(data[offset:]).strip(b"\0"):
            scan.torn_at = offset
        else:
            scan.junk_tail = (offset, size - offset)
        break
    return scan


def _entry_at(data: Any, offset: int, size: int, strict: bool
              ) -> tuple[dict[str, Any], int] | None:
    """The entry at ``offset`` and its length, or None.  ``strict`` (re-synchronising):
    only a map holding every key of ``ENTRY_KEYS``; else any map with a body."""
    if offset + 5 > size:
        return None
    n = int.from_bytes(bytes(data[offset:offset + 4]), "big")
    if n == 0 or offset + 4 + n > size or data[offset + 4] >> 5 != _CBOR_MAP:
        return None
    raw = io.BytesIO(bytes(data[offset + 4:offset + 4 + n]))
    try:
        entry = cbor2.CBORDecoder(raw).decode()
    except Exception:  # not CBOR
        return None
    if raw.tell() != n:  # CBOR that does not end where the length says
        return None
    if not isinstance(entry, dict) or "body" not in entry:
        return None
    if strict and not ENTRY_KEYS <= entry.keys():
        return None
    return entry, n


def _resync(data: Any, start: int, size: int) -> int | None:
    """The first offset at or after ``start`` where a whole entry decodes."""
    for offset in range(start, size - 4):
        if data[offset + 4] >> 5 == _CBOR_MAP and _entry_at(data, offset, size, True):
            return offset
    return None


def scan_dead_letter_file(f: Any) -> DeadLetterScan:
    """``scan_dead_letters`` over an open dead-letter file (blocking: run in a worker
    thread where a Trio loop runs)."""
    size = os.fstat(f.fileno()).st_size
    if size == 0:
        return DeadLetterScan([], [])
    # mapped, not read: a file of many rejected frames is not held in memory at once
    with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        return scan_dead_letters(data)


def _log_damage(path: str, scan: DeadLetterScan) -> None:
    for offset, size in scan.damaged:
        log.error("%s: %d bytes at byte %d do not decode as entries (damage); the entries "
                  "after them are read", path, size, offset)
    if scan.junk_tail is not None:
        log.error("%s: its last %d bytes, at byte %d, do not decode as an entry (damage, "
                  "not a torn write): kept as they are", path, scan.junk_tail[1],
                  scan.junk_tail[0])


def dead_letter_bytes(metrics: Metrics) -> Metric:
    """The gauge of the dead-letter file's size (set at the gateway's start and after each
    entry written): it only grows while the hub refuses, and nothing else shows that."""
    return metrics.gauge("gateway_dead_letter_bytes",
                         "size of the dead-letter file (<state_dir>/dead-letter.cborseq): "
                         "what the hub refused, kept (edgegw dead-letters list)")


async def write_dead_letter(path: trio.Path, entry: dict[str, Any]) -> int:
    """Append one entry to the dead-letter file: a 4-byte big-endian length, then the
    entry as CBOR (``seq``: the frame's, or None for a record refused before any frame
    held it -- with ``source`` and ``rid``, the gateway's next record id then; ``epoch``,
    ``reason``, ``at``, ``body``).  Durable when it returns (fsync): the frame that says
    the records are there (a stand-in, a checkpoint past them) is made durable after it
    (docs/spool.md, "The dead-letter file").  Returns the file's size after it.  A write
    that fails (a full disk) is cut off again, so the next entry starts on an entry
    boundary, not after a torn one."""
    data = cbor2.dumps(entry)
    framed = memoryview(len(data).to_bytes(4, "big") + data)
    # unbuffered: nothing of a failed write is left in a buffer to be written at close
    async with await path.open("ab", buffering=0) as f:
        start = int(await f.tell())
        try:
            while framed:  # a write may take part of it (a disk filling up)
                framed = framed[await f.write(framed):]
            await trio.to_thread.run_sync(os.fsync, f.fileno())
        except BaseException:
            with trio.CancelScope(shield=True), suppress(OSError):
                await f.truncate(start)
            raise
        return int(await f.tell())


def open_dead_letter_file(path: str, epoch: str, from_rid: int) -> Counter[tuple[Any, ...]]:
    """Make the dead-letter file at ``path`` appendable and read what a replay may repeat
    (blocking: run in a worker thread, once, before the gateway writes to it).

    A torn last entry (a crash in its write) is cut off, durably, so the entries written
    next start on an entry boundary: its records are still in the spool or still to be
    replayed by their source (the frame or checkpoint past them is made durable only after
    the entry), so they are written again.  Damage elsewhere is no crash's: it is logged
    and left alone, and the entries after it are read.  Returns, counted, the keys
    ``(source, body)`` of the entries of records refused before any frame held them
    (``seq`` None) in ``epoch`` at record id ``from_rid`` or later: those a crash may have
    left before the checkpoint past them was durable, which the gateway's sources replay
    now (each matches one such record once, and is not written again)."""
    found: Counter[tuple[Any, ...]] = Counter()
    try:
        f = open(path, "r+b")
    except FileNotFoundError:
        return found
    with f:
        scan = scan_dead_letter_file(f)
        _log_damage(path, scan)
        if scan.torn_at is not None:
            size = os.fstat(f.fileno()).st_size
            log.warning("%s: its last entry is torn (%d of its bytes, at byte %d): cut off; "
                        "its records are written again", path, size - scan.torn_at,
                        scan.torn_at)
            f.truncate(scan.torn_at)
            f.flush()
            os.fsync(f.fileno())
    for _, entry in scan.entries:
        rid = entry.get("rid")
        if (entry.get("seq") is None and entry.get("epoch") == epoch
                and isinstance(rid, int) and rid >= from_rid):
            found[(entry.get("source"), entry["body"])] += 1
    return found


def read_dead_letter_keys(path: str, epoch: str, from_seq: int) -> set[tuple[Any, ...]]:
    """The keys (``dead_letter_key``) of the dead-letter file's entries of ``epoch``'s
    frames ``from_seq`` on (blocking: run in a worker thread).  A file that is missing
    holds none; damage is skipped (the entries after it count), a torn end ignored."""
    try:
        with open(path, "rb") as f:
            scan = scan_dead_letter_file(f)
    except FileNotFoundError:
        return set()
    _log_damage(path, scan)
    return {dead_letter_key(epoch, seq, entry["body"]) for _, entry in scan.entries
            if entry.get("epoch") == epoch and isinstance(seq := entry.get("seq"), int)
            and seq >= from_seq}


#: what ``entry_records`` raises for a body that does not decode as records
BODY_ERRORS = (FrameError, ProtocolError, RecordError, TypeError, ValueError)


def entry_records(entry: dict[str, Any]) -> tuple[int, list[Record]]:
    """An entry's body as (first record id, records), either layout; raises one of
    ``BODY_ERRORS`` when it does not decode (a frame the hub rejected for that)."""
    body = entry.get("body")
    if not isinstance(body, bytes):
        raise FrameError(f"body is {type(body).__name__}, not bytes")
    first_rid, sources, wire = decode_body(body, max_records=sys.maxsize)
    return first_rid, [from_wire(w, sources) for w in wire]


def dead_letter_key(epoch: str, seq: int, body: bytes | None) -> tuple[Any, ...]:
    """What a dead-letter entry of the uplink stands for: frame ``seq`` of ``epoch`` and
    the records of ``body`` by record id (first, count), as the same records may be
    encoded differently on another connection (v1 rows, plain floats); a body that does
    not decode, by its bytes."""
    with suppress(Exception):  # keyed by its bytes, below
        item: Any = cbor2.loads(body) if body is not None else None
        first_rid, _, rows = to_rows(item) if is_columnar(body or b"") else item
        if isinstance(first_rid, int) and isinstance(rows, list):
            return (epoch, seq, first_rid, len(rows))
    return (epoch, seq, body)


__all__ = ["BODY_ERRORS", "DEAD_LETTER_FILE", "ENTRY_KEYS", "DeadLetterScan",
           "dead_letter_bytes", "dead_letter_key", "entry_records", "open_dead_letter_file",
           "read_dead_letter_keys", "scan_dead_letter_file", "scan_dead_letters",
           "write_dead_letter"]
