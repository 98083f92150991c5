"""Recovery of the disk spool: scan the segment files and rebuild its state (I1, I4, I6-I8).

Blocking (runs in a worker thread); memory O(segments + frames/64), never O(backlog).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import secrets
import time
from pathlib import Path
from typing import Any

from ..dirsync import fsync_dir
from ..protocol.intervals import IntervalSet
from ..protocol.messages import MAX_DROPPED_RANGES, MAX_INT
from .format import Damage, Kind, Scanner
from .segments import (
    READ_CHUNK,
    Segment,
    Undeleted,
    disk_full,
    list_segments,
    write_epoch,
)

log = logging.getLogger("edgegw.spool.spool")

Ranges = list[tuple[int, int]]


@dataclasses.dataclass
class Recovered:
    epoch: str
    fresh: bool
    segments: list[Segment]
    next_seq: int
    acked: int
    ranges: Ranges
    dropped_through: int
    checkpoints: dict[str, Any]
    lost: Ranges
    #: seqs dropped before they were acknowledged (the ACK and STATE records' ``"u"``)
    dropped: Ranges = dataclasses.field(default_factory=list)
    damaged_regions: int = 0
    damaged_bytes: int = 0
    torn_bytes: int = 0
    deleted_segments: int = 0
    unrecoverable_files: int = 0
    scanned_bytes: int = 0
    #: acknowledged segments that could not be deleted (the spool retries them)
    undeleted: Undeleted = dataclasses.field(default_factory=list)


def _write_epoch_if_room(directory: Path, epoch: str) -> None:
    """Write the epoch file; on a full disk go on without it: every segment's STATE record
    carries the epoch (recovery reads it from there and writes the file then), and a spool
    that never got a segment holds no frame whose epoch matters (I8)."""
    try:
        write_epoch(directory, epoch)
    except OSError as exc:
        if not disk_full(exc):
            raise
        with contextlib.suppress(OSError):
            (directory / "epoch.tmp").unlink()
        log.error("spool %s: disk full, the epoch file cannot be written yet (%s)",
                  directory, exc)


def _dropped_ranges(into: IntervalSet, meta: dict[str, Any]) -> None:
    """Add an ACK or STATE record's dropped ranges (``"u"``) to ``into``: each record holds
    them all, so a union of what every record says is what the last one said (a record
    that does not parse adds nothing: it is a count told to the hub, never a frame)."""
    ranges = meta.get("u")
    for r in ranges if isinstance(ranges, list) else ():
        if (isinstance(r, list) and len(r) == 2
                and all(isinstance(v, int) and not isinstance(v, bool) for v in r)
                and 1 <= r[0] <= r[1] <= MAX_INT):  # (a HELLO holding more is malformed)
            into.add_range(r[0], r[1])


def recover(directory: Path) -> Recovered:
    """Scan the spool directory and rebuild its state; truncates a torn tail (I1, I6-I8)."""
    directory.mkdir(parents=True, exist_ok=True)
    files = list_segments(directory)
    epoch_file = directory / "epoch"
    epoch: str | None = None
    with contextlib.suppress(OSError, UnicodeDecodeError):
        epoch = epoch_file.read_text().strip() or None

    segments: list[Segment] = []
    acked = dropped = 0
    undelivered = IntervalSet()
    ranges: Ranges = []
    checkpoints: dict[str, Any] = {}
    max_seq = 0
    present: Ranges = []  # seqs of intact frames, merged
    rec = Recovered("", False, segments, 1, 0, [], 0, {}, [])
    state_epoch: str | None = None

    for n, (index, path) in enumerate(files):
        last_file = n == len(files) - 1
        seg = Segment(index, path)
        scanner = Scanner(0, keep_bodies=False)
        valid_end = 0
        with open(path, "rb") as f:
            while True:
                chunk = f.read(READ_CHUNK)
                if chunk:
                    scanner.feed(chunk)
                    rec.scanned_bytes += len(chunk)
                else:
                    scanner.end()
                for ev in scanner.events():
                    if isinstance(ev, Damage):
                        if ev.truncated and last_file:
                            rec.torn_bytes += ev.size
                            log.warning("spool %s: torn tail of %d bytes at offset %d (%s)",
                                        path.name, ev.size, ev.offset, ev.reason)
                            continue
                        rec.damaged_regions += 1
                        rec.damaged_bytes += ev.size
                        log.error("spool %s: %d damaged bytes at offset %d: %s%s", path.name,
                                  ev.size, ev.offset, ev.reason,
                                  f" (frame {ev.seq})" if ev.seq is not None else "")
                        if ev.seq is not None and ev.kind in (Kind.FRAME, Kind.COMMIT):
                            max_seq = max(max_seq, ev.seq)
                        continue
                    valid_end = ev.offset + ev.size
                    try:
                        meta = ev.meta_value()
                    except Exception:  # verified checksum but undecodable: count, go on
                        rec.damaged_regions += 1
                        rec.damaged_bytes += ev.size
                        continue
                    if ev.kind is Kind.FRAME:
                        if ev.seq <= seg.last_seq or (present and ev.seq <= present[-1][1]):
                            rec.damaged_regions += 1  # out of order: never written by us
                            continue
                        seg.add_frame(ev.seq, ev.offset)
                        if present and present[-1][1] + 1 == ev.seq:
                            present[-1] = (present[-1][0], ev.seq)
                        else:
                            present.append((ev.seq, ev.seq))
                        max_seq = max(max_seq, ev.seq)
                        if isinstance(meta, dict) and meta.get("c"):
                            checkpoints.update(meta["c"])
                    elif ev.kind is Kind.COMMIT:
                        max_seq = max(max_seq, ev.seq)
                    elif ev.kind is Kind.ACK and isinstance(meta, dict):
                        acked = max(acked, ev.seq)
                        ranges = [tuple(r) for r in meta.get("r", ()) if r[1] > acked]
                        dropped = max(dropped, int(meta.get("d", 0)))
                        _dropped_ranges(undelivered, meta)
                    elif ev.kind is Kind.STATE and isinstance(meta, dict):
                        state_epoch = meta.get("epoch") or state_epoch
                        max_seq = max(max_seq, int(meta.get("next_seq", 1)) - 1)
                        acked = max(acked, int(meta.get("acked", 0)))
                        ranges = [tuple(r) for r in meta.get("ranges", ()) if r[1] > acked]
                        dropped = max(dropped, int(meta.get("dropped", 0)))
                        _dropped_ranges(undelivered, meta)
                        checkpoints.update(meta.get("cp") or {})
                if not chunk:
                    break
        size = path.stat().st_size
        if last_file and valid_end < size:
            # I6: a crash mid-write left a torn tail; cut it so appends start clean
            try:
                with open(path, "r+b") as f:
                    f.truncate(valid_end)
                    f.flush()
                    os.fsync(f.fileno())
            except OSError as exc:
                # never appended to then (a new segment is opened after it); read up to
                # its valid end only
                seg.writable = False
                log.error("spool %s: cannot cut its torn tail (%s): it is not written to "
                          "again", path.name, exc)
            size = valid_end
        seg.size = size
        segments.append(seg)

    if epoch is None and state_epoch is not None:
        epoch = state_epoch
        _write_epoch_if_room(directory, epoch)
    if epoch is None:
        fresh_epoch = secrets.token_hex(8)
        if files:
            # I8: frames without a readable epoch cannot be sent under any sequence space
            aside = directory / f"unrecoverable-{int(time.time())}-{fresh_epoch[:4]}"
            aside.mkdir()
            for _, p in files:
                os.replace(p, aside / p.name)
            rec.unrecoverable_files = len(files)
            log.error("spool %s: no readable epoch; %d segment file(s) moved to %s",
                      directory, len(files), aside)
            segments.clear()
            present.clear()
            max_seq = acked = dropped = 0
            undelivered = IntervalSet()
            ranges = []
            checkpoints = {}
        _write_epoch_if_room(directory, fresh_epoch)
        epoch = fresh_epoch
        rec.fresh = True

    floor = max(acked, dropped)
    # I4: segments wholly at or below the persisted floor were acked before a crash
    keep = []
    for seg in segments:
        if seg.last_seq <= floor and seg is not segments[-1]:
            try:
                seg.path.unlink()
            except OSError as exc:
                rec.undeleted.append((seg, exc))  # never read again; its frames are acked
            else:
                rec.deleted_segments += 1
        else:
            keep.append(seg)
    if rec.deleted_segments:
        fsync_dir(directory)
    segments[:] = keep

    # lost: seqs above the floor that are neither intact nor selectively acked
    covered = IntervalSet([*present, *ranges])
    lost: Ranges = []
    expected = floor + 1
    for lo, hi in covered.ranges():
        if hi < expected:
            continue
        if lo > expected:
            lost.append((expected, min(lo - 1, max_seq)))
        expected = hi + 1
    if expected <= max_seq:
        lost.append((expected, max_seq))
    lost = [(a, b) for a, b in lost if a <= b]

    rec.epoch = epoch
    rec.next_seq = max(max_seq, acked, dropped, *(b for _, b in ranges)) + 1
    rec.acked = acked
    rec.ranges = ranges
    rec.dropped_through = dropped
    undelivered.cap(MAX_DROPPED_RANGES)
    rec.dropped = undelivered.ranges()
    rec.checkpoints = checkpoints
    rec.lost = lost
    return rec
