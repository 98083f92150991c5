"""The crash-safe disk spool: a ``FrameStore`` whose frames survive crashes and restarts.

Design note — the invariants (read before the code)
===================================================

Files.  ``<dir>/epoch`` (written once, atomically) and segment files
``<dir>/seg-<index>.spool``, appended only, each a sequence of records (``format.py``):
FRAME, COMMIT, STATE, ACK.  Every segment starts with a STATE record: a snapshot of the
retained state (epoch, next_seq, acked watermark, selective ack ranges, dropped-through,
and the merged source checkpoints) as of its creation.

I1  The data files are the truth.  There is no index file; recovery scans the segments
    (headers and metadata, never keeping bodies) and rebuilds per-segment seq ranges plus a
    sparse seq->offset index (one entry per ``SPARSE_STRIDE`` frames).  Memory after
    recovery is O(segments + frames/64), never O(backlog bytes).
I2  Durable before told.  ``append`` returns only after a group commit (frames + COMMIT
    record, one write, one fsync) covering the frame has completed; ``frames_from`` and
    ``wait_for_frame_after`` only see committed frames.  Nothing reaches the hub, and no
    source checkpoint is considered safe, before it is on disk.
I3  Checkpoints travel with frames.  A frame's FRAME record carries the source checkpoints
    completed by its records; recovery merges them in seq order, so after a restart
    ``checkpoints`` are exactly those of the last intact frame: a source neither re-reads
    nor skips.  Each new segment's STATE repeats the merged checkpoints, so deleting old
    segments never loses a checkpoint.
I4  Acks are persisted before anything is deleted.  An ACK record (watermark, selective
    ranges, dropped-through) is written and fsynced into the active segment *before* any
    segment is unlinked.  A crash between the two leaves fully-acked segments behind, which
    recovery recognises (all seqs <= the persisted floor) and deletes.  A crash before the
    ACK record is durable only means a few acked frames are sent again; the hub drops them
    by (gateway, epoch, seq).  Acked frames are never returned after a restart once their
    ACK record is durable (acks are persisted at most ``ACK_PERSIST_S`` after they arrive,
    at once when a frame commit happens anyway or a segment can be deleted).
I5  Only whole sealed segments are deleted, oldest first; the active (newest) segment,
    which holds the newest STATE and ACK records, is never deleted.
I6  A torn tail is truncated, damage is counted.  Recovery truncates the *last* segment
    after its last intact record (a crash mid-write).  Damaged records elsewhere are
    skipped by re-synchronising on the next verifiable header and counted
    (``damaged_regions``/``damaged_bytes``); frames whose seq is missing between
    intact ones are counted as ``lost_frames`` and reported, never silently skipped.
I7  Sequence numbers are never reused for a frame that may have been sent.  After
    recovery ``next_seq`` is above every seq seen: intact frames, COMMIT records, headers
    of damaged frames, STATE next_seq, and the acked watermark.  Frames that were torn
    before their group commit completed were never sent (I2), so their seqs may be reused.
I8  The epoch changes only when the spool starts afresh: an empty directory, or one whose
    epoch cannot be read from the epoch file or any STATE record (the unreadable files are
    moved aside into ``unrecoverable-<time>/`` and counted).  Every recovery opens a new
    active segment (the old last one, its tail truncated, becomes sealed).

Blocking file I/O runs in ``trio.to_thread.run_sync``, batched per group commit.  The one
exception is ``frames_from`` (the FrameStore interface is synchronous): it serves recent
frames from an in-memory tail cache and reads older ones directly, bounded by
``READ_MAX_BYTES`` per call; ``read_frames`` is the async variant that reads in a thread.
"""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
import errno
import logging
import os
import secrets
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import cbor2
import trio

from ..metrics import Metrics
from ..store import StoredFrame
from .config import SpoolConfig
from .format import (
    Damage,
    Kind,
    Record,
    Scanner,
    encode_ack,
    encode_commit,
    encode_frame,
    encode_state,
)

log = logging.getLogger(__name__)

SPARSE_STRIDE = 64
READ_CHUNK = 1 << 20
READ_MAX_BYTES = 8 << 20
TAIL_CACHE_BYTES = 16 << 20
ACK_PERSIST_S = 0.2
SEGMENT_PREFIX = "seg-"
SEGMENT_SUFFIX = ".spool"

Ranges = list[tuple[int, int]]


# --- small helpers ------------------------------------------------------------------


def _merge(ranges: Ranges, lo: int, hi: int) -> Ranges:
    """Insert [lo, hi] into sorted disjoint ranges, merging neighbours."""
    out: Ranges = []
    placed = False
    for a, b in ranges:
        if b + 1 < lo:
            out.append((a, b))
        elif hi + 1 < a:
            if not placed:
                out.append((lo, hi))
                placed = True
            out.append((a, b))
        else:
            lo, hi = min(lo, a), max(hi, b)
    if not placed:
        out.append((lo, hi))
    out.sort()
    return out


def _contains(ranges: Ranges, seq: int) -> tuple[int, int] | None:
    i = bisect.bisect_right(ranges, (seq, float("inf"))) - 1
    if i >= 0 and ranges[i][0] <= seq <= ranges[i][1]:
        return ranges[i]
    return None


def _segment_path(directory: Path, index: int) -> Path:
    return directory / f"{SEGMENT_PREFIX}{index:010d}{SEGMENT_SUFFIX}"


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclasses.dataclass
class Segment:
    index: int
    path: Path
    size: int = 0
    first_seq: int = 0  # 0: no frames
    last_seq: int = 0
    n_frames: int = 0
    sparse_seqs: list[int] = dataclasses.field(default_factory=list)
    sparse_offsets: list[int] = dataclasses.field(default_factory=list)

    def add_frame(self, seq: int, offset: int) -> None:
        if self.n_frames % SPARSE_STRIDE == 0:
            self.sparse_seqs.append(seq)
            self.sparse_offsets.append(offset)
        if not self.first_seq:
            self.first_seq = seq
        self.last_seq = seq
        self.n_frames += 1

    def offset_before(self, seq: int) -> int:
        """An offset at or before the frame ``seq`` (a record boundary)."""
        i = bisect.bisect_right(self.sparse_seqs, seq) - 1
        return self.sparse_offsets[i] if i >= 0 else 0


@dataclasses.dataclass
class DropEvent:
    """Frames discarded by the ``drop_oldest`` policy (the gateway raises an event)."""

    frames: int
    records: int
    first_seq: int
    last_seq: int
    reason: str


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
    damaged_regions: int = 0
    damaged_bytes: int = 0
    torn_bytes: int = 0
    deleted_segments: int = 0
    unrecoverable_files: int = 0
    scanned_bytes: int = 0


# --- recovery (blocking; runs in a worker thread) ------------------------------------------


def _list_segments(directory: Path) -> list[tuple[int, Path]]:
    out = []
    for p in directory.glob(f"{SEGMENT_PREFIX}*{SEGMENT_SUFFIX}"):
        try:
            out.append((int(p.name[len(SEGMENT_PREFIX):-len(SEGMENT_SUFFIX)]), p))
        except ValueError:
            continue
    return sorted(out)


def _write_epoch(directory: Path, epoch: str) -> None:
    tmp = directory / "epoch.tmp"
    with open(tmp, "wb") as f:
        f.write(epoch.encode() + b"\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, directory / "epoch")
    _fsync_dir(directory)


def recover(directory: Path) -> Recovered:
    """Scan the spool directory and rebuild its state; truncates a torn tail (I1, I6-I8)."""
    directory.mkdir(parents=True, exist_ok=True)
    files = _list_segments(directory)
    epoch_file = directory / "epoch"
    epoch: str | None = None
    with contextlib.suppress(OSError, UnicodeDecodeError):
        epoch = epoch_file.read_text().strip() or None

    segments: list[Segment] = []
    acked = dropped = 0
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
                    elif ev.kind is Kind.STATE and isinstance(meta, dict):
                        state_epoch = meta.get("epoch") or state_epoch
                        max_seq = max(max_seq, int(meta.get("next_seq", 1)) - 1)
                        acked = max(acked, int(meta.get("acked", 0)))
                        ranges = [tuple(r) for r in meta.get("ranges", ()) if r[1] > acked]
                        dropped = max(dropped, int(meta.get("dropped", 0)))
                        checkpoints.update(meta.get("cp") or {})
                if not chunk:
                    break
        size = path.stat().st_size
        if last_file and valid_end < size:
            # I6: a crash mid-write left a torn tail; cut it so appends start clean
            with open(path, "r+b") as f:
                f.truncate(valid_end)
                f.flush()
                os.fsync(f.fileno())
            size = valid_end
        seg.size = size
        segments.append(seg)

    if epoch is None and state_epoch is not None:
        epoch = state_epoch
        _write_epoch(directory, epoch)
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
            ranges = []
            checkpoints = {}
        _write_epoch(directory, fresh_epoch)
        epoch = fresh_epoch
        rec.fresh = True

    floor = max(acked, dropped)
    # I4: segments wholly at or below the persisted floor were acked before a crash
    keep = []
    for seg in segments:
        if seg.last_seq <= floor and seg is not segments[-1]:
            seg.path.unlink()
            rec.deleted_segments += 1
        else:
            keep.append(seg)
    if rec.deleted_segments:
        _fsync_dir(directory)
    segments[:] = keep

    # lost: seqs above the floor that are neither intact nor selectively acked
    covered: Ranges = []
    for lo, hi in [*present, *ranges]:
        covered = _merge(covered, lo, hi)
    lost: Ranges = []
    expected = floor + 1
    for lo, hi in covered:
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
    rec.checkpoints = checkpoints
    rec.lost = lost
    return rec


# --- the spool -------------------------------------------------------------------------


@dataclasses.dataclass
class _Pending:
    seq: int
    record: bytes
    body: bytes
    n_records: int
    checkpoints: dict[str, Any]


class DiskSpool:
    """A crash-safe ``FrameStore``.  Use ``async with DiskSpool.open(config) as spool`` or
    ``spool = DiskSpool(config); await nursery.start(spool.run)``."""

    def __init__(self, config: SpoolConfig, metrics: Metrics | None = None,
                 on_drop: Callable[[DropEvent], None] | None = None) -> None:
        problems = config.validate()
        if problems:
            raise ValueError("; ".join(f"spool.{k}: {m}" for k, m in problems))
        self.config = config
        self.directory = Path(config.dir)
        self.on_drop = on_drop
        self.metrics = metrics or Metrics()
        m = self.metrics
        self.m_dropped_frames = m.counter("spool_dropped_frames_total",
                                          "frames discarded by the drop_oldest policy")
        self.m_dropped_records = m.counter("spool_dropped_records_total",
                                           "records discarded by the drop_oldest policy")
        self.m_lost = m.counter("spool_lost_frames_total",
                                "frames found damaged or missing at recovery")
        self.m_damaged = m.counter("spool_damaged_bytes_total",
                                   "unreadable bytes found at recovery")
        self.m_disk_full = m.counter("spool_disk_full_total", "writes that failed with ENOSPC")
        self.m_fsyncs = m.counter("spool_fsyncs_total", "group commits (one fsync each)")
        self.m_bytes = m.gauge("spool_bytes", "bytes in segment files")
        self.m_unacked = m.gauge("spool_unacked_frames", "frames not yet acknowledged")
        m.add_collector(self._collect)

        self.epoch = ""
        self._segments: list[Segment] = []
        self._next_seq = 1
        self._durable_seq = 0
        self._acked = 0
        self._ranges: Ranges = []
        self._dropped_through = 0
        self._persisted_floor = 0
        self._lost: Ranges = []
        self._checkpoints: dict[str, Any] = {}
        self._pending: list[_Pending] = []
        self._pending_bytes = 0
        self._pending_since = 0.0
        self._ack_dirty = False
        self._ack_gen = 0
        self._last_ack_persist = 0.0
        self._drop_requested = False
        self._flush_acks = False
        self._work = trio.Event()
        self._durable_changed = trio.Event()
        self._room = trio.Event()
        self._cache: OrderedDict[int, StoredFrame] = OrderedDict()
        self._recent: deque[tuple[float, int]] = deque(maxlen=4096)  # (commit time, seq)
        self._cache_bytes = 0
        self._last_progress = time.monotonic()
        self._disk_full = False
        self._started = False
        self.recovered: Recovered | None = None
        self.counts: dict[str, int] = dict.fromkeys(
            ("dropped_frames", "dropped_records", "lost_frames", "damaged_regions",
             "damaged_bytes", "torn_bytes", "disk_full_events", "commits",
             "segments_deleted", "unrecoverable_files"), 0)

    # --- lifecycle ----------------------------------------------------------------------

    @classmethod
    @contextlib.asynccontextmanager
    async def open(cls, config: SpoolConfig, **kwargs: Any) -> AsyncIterator[DiskSpool]:
        spool = cls(config, **kwargs)
        async with trio.open_nursery() as nursery:
            await nursery.start(spool.run)
            try:
                yield spool
                # a clean close persists the last acks (an exception exits like a crash)
                with trio.move_on_after(10):
                    await spool.flush()
            finally:
                nursery.cancel_scope.cancel()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Recover, then run the group-commit loop until cancelled.  A spool that runs
        already (``open``) returns at once: its owner runs it."""
        if self.recovered is not None:
            task_status.started()
            return
        rec = await trio.to_thread.run_sync(recover, self.directory)
        self._adopt(rec)
        await trio.to_thread.run_sync(self._open_active_sync, self._state_snapshot())
        self._started = True
        task_status.started()
        await self._committer()

    def _adopt(self, rec: Recovered) -> None:
        self.recovered = rec
        self.epoch = rec.epoch
        self._segments = list(rec.segments)
        self._next_seq = rec.next_seq
        self._durable_seq = rec.next_seq - 1
        self._acked = rec.acked
        self._ranges = list(rec.ranges)
        self._dropped_through = rec.dropped_through
        self._persisted_floor = max(rec.acked, rec.dropped_through)
        self._lost = list(rec.lost)
        self._checkpoints = dict(rec.checkpoints)
        lost_frames = sum(b - a + 1 for a, b in rec.lost)
        for key in ("damaged_regions", "damaged_bytes", "torn_bytes", "unrecoverable_files"):
            self.counts[key] += getattr(rec, key)
        self.counts["lost_frames"] += lost_frames
        self.counts["segments_deleted"] += rec.deleted_segments
        self.m_lost.inc(lost_frames)
        self.m_damaged.inc(rec.damaged_bytes)
        if lost_frames or rec.damaged_regions:
            log.error("spool recovered with damage: %d frame(s) lost %s, %d damaged region(s)",
                      lost_frames, rec.lost[:8], rec.damaged_regions)
        log.info("spool %s: epoch %s%s, %d segment(s), next seq %d, acked %d",
                 self.directory, self.epoch, " (fresh)" if rec.fresh else "",
                 len(self._segments), self._next_seq, self._acked)

    def _state_snapshot(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "next_seq": self._durable_seq + 1, "acked": self._acked,
                "ranges": [list(r) for r in self._ranges], "dropped": self._dropped_through,
                "cp": dict(self._checkpoints)}

    def _open_active_sync(self, state: dict[str, Any]) -> None:
        """Start a new active segment whose first record is a STATE snapshot (I3, I8)."""
        index = self._segments[-1].index + 1 if self._segments else 1
        path = _segment_path(self.directory, index)
        data = encode_state(state)
        try:
            with open(path, "xb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            _fsync_dir(self.directory)
        except OSError:
            # (disk full) leave no half-made segment behind: the rollover is retried later
            with contextlib.suppress(OSError):
                path.unlink()
            raise
        self._segments.append(Segment(index, path, size=len(data)))

    # --- FrameStore interface ------------------------------------------------------------

    @property
    def next_seq(self) -> int:
        return self._next_seq

    @property
    def durable_seq(self) -> int:
        return self._durable_seq

    @property
    def floor(self) -> int:
        """Every seq at or below this is acknowledged or dropped."""
        return max(self._acked, self._dropped_through)

    @property
    def first_unacked(self) -> int:
        seq = self.floor + 1
        while seq < self._next_seq:
            r = _contains(self._ranges, seq) or _contains(self._lost, seq)
            if r is None:
                return seq
            seq = r[1] + 1
        return self._next_seq

    @property
    def checkpoints(self) -> dict[str, Any]:
        """Source checkpoints of the last durable frame."""
        return self._checkpoints

    @property
    def lost_ranges(self) -> Ranges:
        """Seqs found damaged or missing at recovery (never returned by ``frames_from``)."""
        return list(self._lost)

    @property
    def total_bytes(self) -> int:
        return sum(s.size for s in self._segments)

    async def append(self, body: bytes, n_records: int, checkpoints: dict[str, Any]) -> int:
        """Store a frame; returns its seq once it is durable (I2)."""
        if not self._started:
            raise RuntimeError("the spool is not running (start DiskSpool.run first)")
        seq_probe = self._next_seq
        size = len(encode_frame(seq_probe, b"", n_records, checkpoints)) + len(body)
        if size > self.config.max_bytes // 4:
            raise ValueError(f"frame of {size} bytes exceeds a quarter of spool.max_bytes")
        while self._over_cap(size) or (self._disk_full and self.config.policy == "block"):
            if self.config.policy == "drop_oldest":
                self._drop_requested = True
                self._work.set()
            await self._room.wait()
        seq = self._next_seq
        self._next_seq += 1
        record = encode_frame(seq, body, n_records, checkpoints)
        if not self._pending:
            self._pending_since = time.monotonic()
        self._pending.append(_Pending(seq, record, body, n_records, dict(checkpoints)))
        self._pending_bytes += len(record)
        if self.unacked_frames() == 0 and len(self._pending) == 1:
            self._last_progress = time.monotonic()  # work appears: the stall clock starts now
        self._work.set()
        while self._durable_seq < seq:
            await self._durable_changed.wait()
        return seq

    def _over_cap(self, size: int) -> bool:
        return self.total_bytes + self._pending_bytes + size > self.config.max_bytes

    def ack(self, seq: int) -> None:
        seq = min(seq, self._next_seq - 1)
        if seq <= self._acked:
            return
        self._acked = seq
        self._normalise_acks()

    def ack_set(self, seqs: list[tuple[int, int]]) -> None:
        changed = False
        for lo, hi in seqs:
            hi = min(hi, self._next_seq - 1)
            if hi > self._acked and lo <= hi:
                self._ranges = _merge(self._ranges, lo, hi)
                changed = True
        if changed:
            self._normalise_acks()

    def _normalise_acks(self) -> None:
        floor = self.floor
        # a range touching the watermark (or lost seqs just above it) extends it
        while True:
            nxt = floor + 1
            # lost seqs (damaged at recovery) can never be acked by the hub: pass over them
            r = _contains(self._ranges, nxt) or _contains(self._lost, nxt)
            if r is None:
                break
            self._acked = max(self._acked, r[1])
            floor = self.floor
        self._ranges = [r for r in self._ranges if r[1] > floor]
        self._lost = [r for r in self._lost if r[1] > floor]
        while self._cache and next(iter(self._cache)) <= floor:
            _, f = self._cache.popitem(last=False)
            self._cache_bytes -= len(f.body)
        self._ack_dirty = True
        self._ack_gen += 1
        self._last_progress = time.monotonic()
        self._work.set()

    def frames_from(self, seq: int, limit: int) -> list[StoredFrame]:
        """Durable, unacknowledged frames with seq >= ``seq``, in order (at most ``limit``).

        Recent frames come from memory; older ones are read from the segment files here
        (bounded by READ_MAX_BYTES); prefer ``read_frames`` from async code."""
        start = self._first_wanted(seq)
        if start is None or limit <= 0:
            return []
        cached = self._from_cache(start, limit)
        if cached is not None:
            return cached
        return self._read_sync(start, limit)

    async def read_frames(self, seq: int, limit: int) -> list[StoredFrame]:
        """Like ``frames_from``, but reads from disk in a worker thread."""
        start = self._first_wanted(seq)
        if start is None or limit <= 0:
            return []
        cached = self._from_cache(start, limit)
        if cached is not None:
            return cached
        return await trio.to_thread.run_sync(self._read_sync, start, limit)

    def first_seq_since(self, age_s: float) -> int:
        """The first seq committed at most ``age_s`` ago, or appended and not yet durable:
        the uplink sends these as live data when a connection comes up.  (Never above the
        first frame still being committed: below ``live_from`` the uplink only reads what
        is durable, so such a frame would be skipped until the next connection.)"""
        since = time.monotonic() - age_s
        seq = self._durable_seq + 1
        for t, first in reversed(self._recent):
            if t < since:
                break
            seq = first
        return seq

    async def wait_for_frame_after(self, seq: int) -> None:
        while self._durable_seq <= seq:
            await self._durable_changed.wait()

    async def flush(self) -> None:
        """Wait until every appended frame is durable and the latest acks are persisted."""
        self._flush_acks = True
        self._work.set()
        try:
            while self._pending or self._ack_dirty:
                await self._durable_changed.wait()
        finally:
            self._flush_acks = False

    async def wait_durable(self, seq: int) -> None:
        while self._durable_seq < seq:
            await self._durable_changed.wait()

    def unacked_frames(self) -> int:
        n = self._durable_seq - self.floor
        for ranges in (self._ranges, self._lost):
            n -= sum(min(b, self._durable_seq) - a + 1 for a, b in ranges
                     if a <= self._durable_seq)
        return max(0, n)

    def stalled_for(self, now: float | None = None) -> float:
        """Seconds nothing was acknowledged while frames wait (0 when there is no work)."""
        if self.unacked_frames() == 0 and not self._pending:
            return 0.0
        now = time.monotonic() if now is None else now
        return max(0.0, now - self._last_progress)

    def healthy(self, now: float | None = None) -> bool:
        return self.stalled_for(now) < self.config.stall_timeout_s and not self._disk_full

    def problem(self) -> str | None:
        """What is wrong, for the gateway's health endpoint; None when healthy."""
        if self.healthy():
            return None
        if self._disk_full:
            return "spool: disk full"
        return (f"spool: {self.unacked_frames()} frame(s) waiting, nothing acknowledged "
                f"for {self.stalled_for():.0f} s")

    def damage(self) -> tuple[str, dict[str, Any]] | None:
        """What recovery found damaged (a message and details), or None."""
        c = self.counts
        if not (c["lost_frames"] or c["damaged_regions"] or c["unrecoverable_files"]):
            return None
        detail: dict[str, Any] = {k: c[k] for k in ("lost_frames", "damaged_regions",
                                                    "damaged_bytes", "unrecoverable_files")}
        detail["lost_ranges"] = [list(r) for r in self._lost[:16]]
        return (f"disk spool damaged: {c['lost_frames']} frame(s) lost, "
                f"{c['damaged_regions']} damaged region(s)", detail)

    def stats(self) -> dict[str, Any]:
        return {
            "kind": "disk",
            "dir": str(self.directory),
            "epoch": self.epoch,
            "policy": self.config.policy,
            "frames": self.unacked_frames(),
            "pending_frames": len(self._pending),
            "bytes": self.total_bytes,
            "max_bytes": self.config.max_bytes,
            "segments": len(self._segments),
            "next_seq": self._next_seq,
            "durable_seq": self._durable_seq,
            "acked": self._acked,
            "first_unacked": self.first_unacked,
            "lost_ranges": self._lost[:16],
            "disk_full": self._disk_full,
            "stalled_for_s": round(self.stalled_for(), 3),
            **self.counts,
        }

    def _collect(self) -> None:
        self.m_bytes.set(self.total_bytes)
        self.m_unacked.set(self.unacked_frames())

    # --- reading ---------------------------------------------------------------------------

    def _first_wanted(self, seq: int) -> int | None:
        s = max(seq, self.floor + 1)
        while s <= self._durable_seq:
            r = _contains(self._ranges, s) or _contains(self._lost, s)
            if r is None:
                return s
            s = r[1] + 1
        return None

    def _wanted(self, s: int) -> bool:
        return s > self.floor and not _contains(self._ranges, s)

    def _from_cache(self, start: int, limit: int) -> list[StoredFrame] | None:
        if start not in self._cache:
            return None
        out = []
        s = start
        while len(out) < limit and s <= self._durable_seq:
            if _contains(self._ranges, s) or _contains(self._lost, s):
                s += 1
                continue
            f = self._cache.get(s)
            if f is None:
                break
            out.append(f)
            s += 1
        return out

    def _read_sync(self, start: int, limit: int) -> list[StoredFrame]:
        out: list[StoredFrame] = []
        budget = READ_MAX_BYTES
        for seg in list(self._segments):  # few segments (1 GB / 16 MiB = 64): linear is fine
            if not seg.n_frames or seg.last_seq < start:
                continue
            offset = seg.offset_before(start)
            scanner = Scanner(offset)
            try:
                f = open(seg.path, "rb")
            except FileNotFoundError:
                continue  # deleted meanwhile (acked)
            with f:
                f.seek(offset)
                done = False
                while not done:
                    chunk = f.read(min(READ_CHUNK, max(budget, 64 << 10)))
                    if chunk:
                        scanner.feed(chunk)
                    else:
                        scanner.end()
                    for ev in scanner.events():
                        if not isinstance(ev, Record) or ev.kind is not Kind.FRAME:
                            continue
                        if ev.seq < start or ev.seq > self._durable_seq:
                            if ev.seq > self._durable_seq:
                                done = True
                                break
                            continue
                        if self._wanted(ev.seq):
                            meta = ev.meta_value()
                            out.append(StoredFrame(ev.seq, ev.body, int(meta.get("n", 0))))
                            budget -= len(ev.body)
                        if len(out) >= limit or budget <= 0:
                            done = True
                            break
                    if not chunk or ev_past_segment(scanner, seg):
                        break
            if len(out) >= limit or budget <= 0:
                break
        return out

    # --- group commit -------------------------------------------------------------------------

    async def _committer(self) -> None:
        while True:
            if not (self._pending or self._ack_dirty or self._drop_requested):
                await self._work.wait()
            self._work = trio.Event()
            delay = self.config.commit_max_delay_ms / 1000
            if (self._pending and delay > 0
                    and len(self._pending) < self.config.commit_max_frames):
                await trio.sleep_until(trio.current_time()
                                       + max(0.0, self._pending_since + delay - time.monotonic()))
            if self._drop_requested:
                await self._drop_oldest("cap")
            if self._pending:
                await self._commit()
            elif self._ack_dirty:
                wait = self._last_ack_persist + ACK_PERSIST_S - time.monotonic()
                if wait > 0 and not self._deletable() and not self._flush_acks:
                    with trio.move_on_after(wait):
                        await self._work.wait()
                    continue
                await self._commit()

    def _deletable(self) -> list[Segment]:
        floor = self.floor
        return [s for s in self._segments[:-1] if s.last_seq <= floor]

    async def _commit(self) -> None:
        # on a full disk, first persist the acks alone (a few bytes) so segments can go
        ack_first = self._disk_full and self._ack_dirty and bool(self._deletable())
        batch = [] if ack_first else self._pending[: self.config.commit_max_frames]
        parts = [p.record for p in batch]
        if batch:
            parts.append(encode_commit(batch[-1].seq))
        floor = self.floor
        write_ack = self._ack_dirty
        ack_gen = self._ack_gen
        if write_ack:
            parts.append(encode_ack(self._acked, self._ranges, self._dropped_through))
        data = b"".join(parts)
        active = self._segments[-1]
        offsets = []
        off = active.size
        for p in batch:
            offsets.append(off)
            off += len(p.record)
        deletable = [s for s in self._segments[:-1] if s.last_seq <= floor] if write_ack else []
        try:
            await trio.to_thread.run_sync(self._write_sync, active, data, deletable)
        except OSError as exc:
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            if ack_first:
                # not even the ACK record fits: unlink the acked segments first.  Should we
                # crash before the ACK is written, recovery counts their seqs as lost (they
                # were acked, so nothing is missing at the hub) and never resends them.
                await trio.to_thread.run_sync(self._unlink_sync, deletable)
                self._segments = [s for s in self._segments if s not in deletable]
                self.counts["segments_deleted"] += len(deletable)
                self._signal_room()
            await self._on_disk_full(exc)
            return
        if self._disk_full:
            self._disk_full = False
            log.warning("spool %s: writes succeed again", self.directory)
            self._signal_room()  # appenders held back by the full disk may go on
        self.counts["commits"] += 1
        self.m_fsyncs.inc()
        active.size += len(data)
        del self._pending[: len(batch)]
        for p, o in zip(batch, offsets, strict=True):
            active.add_frame(p.seq, o)
            self._pending_bytes -= len(p.record)
            self._checkpoints.update(p.checkpoints)
            self._cache[p.seq] = StoredFrame(p.seq, p.body, p.n_records)
            self._cache_bytes += len(p.body)
        while self._cache_bytes > TAIL_CACHE_BYTES and self._cache:
            _, f = self._cache.popitem(last=False)
            self._cache_bytes -= len(f.body)
        if self._pending:
            self._pending_since = time.monotonic()
        if batch:
            self._durable_seq = batch[-1].seq
            self._recent.append((time.monotonic(), batch[0].seq))
        if write_ack:
            self._persisted_floor = floor
            self._ack_dirty = self._ack_gen != ack_gen  # acks that arrived meanwhile
            self._last_ack_persist = time.monotonic()
            self.counts["segments_deleted"] += len(deletable)
            self._segments = [s for s in self._segments if s not in deletable]
        if active.size >= self.config.segment_bytes:
            try:
                await trio.to_thread.run_sync(self._open_active_sync, self._state_snapshot())
            except OSError as exc:
                if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                    raise
                # stay in the old segment; rollover is retried after the next commit
                await self._on_disk_full(exc)
        self._durable_changed.set()
        self._durable_changed = trio.Event()
        if deletable or write_ack:
            self._signal_room()
        if self._pending:
            self._work.set()

    def _write_sync(self, active: Segment, data: bytes, deletable: list[Segment]) -> None:
        """One group commit: append, fsync, then (I4) delete what the ACK just made safe."""
        with open(active.path, "r+b") as f:
            f.seek(active.size)
            try:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            except OSError:
                # ENOSPC mid-write: cut the partial write so the file stays clean
                with contextlib.suppress(OSError):
                    f.truncate(active.size)
                raise
        for seg in deletable:
            with contextlib.suppress(FileNotFoundError):
                seg.path.unlink()
        if deletable:
            _fsync_dir(self.directory)

    def _unlink_sync(self, segments: list[Segment]) -> None:
        for seg in segments:
            with contextlib.suppress(FileNotFoundError):
                seg.path.unlink()
        _fsync_dir(self.directory)

    async def _on_disk_full(self, exc: OSError) -> None:
        """Disk full is handled like the cap, never a crash loop."""
        self.counts["disk_full_events"] += 1
        self.m_disk_full.inc()
        if not self._disk_full:
            log.error("spool %s: disk full (%s); policy %s", self.directory, exc,
                      self.config.policy)
        self._disk_full = True
        if self.config.policy == "drop_oldest" and len(self._segments) > 1:
            await self._drop_oldest("disk full")
        else:
            # block: wait for acks to free whole segments (or an operator to free space)
            with trio.move_on_after(1.0):
                await self._work.wait()
        self._work.set()

    async def _drop_oldest(self, reason: str) -> None:
        """Drop the oldest segment holding unacknowledged frames (policy drop_oldest)."""
        self._drop_requested = False
        if len(self._segments) < 2:
            if self._segments and self._segments[-1].n_frames:
                # everything is in the active segment: seal it so it can be dropped
                try:
                    await trio.to_thread.run_sync(self._open_active_sync,
                                                  self._state_snapshot())
                except OSError as exc:
                    if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                        raise
                    # not even room for a new segment: nothing can be dropped safely now;
                    # appends wait (as under "block") and the drop is retried
                    log.error("spool %s: disk full and a single segment: cannot drop yet",
                              self.directory)
                    return
            else:
                return
        victim = self._segments[0]
        floor = self.floor
        frames, records = await trio.to_thread.run_sync(self._count_unacked, victim, floor)
        self._dropped_through = max(self._dropped_through, victim.last_seq)
        new_floor = self.floor
        data = encode_ack(self._acked, self._ranges, self._dropped_through)
        active = self._segments[-1]
        try:
            await trio.to_thread.run_sync(self._write_sync, active, data, [victim])
            active.size += len(data)
        except OSError as exc:
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            # no room even for the ACK record: free the victim first, then record the drop.
            # Should the record still fail, recovery counts these seqs as lost: never resent.
            await trio.to_thread.run_sync(victim.path.unlink)
            with contextlib.suppress(OSError):
                await trio.to_thread.run_sync(self._write_sync, active, data, [])
                active.size += len(data)
        self._segments.remove(victim)
        self._persisted_floor = new_floor
        self.counts["segments_deleted"] += 1
        self._normalise_acks()
        if frames:
            self.counts["dropped_frames"] += frames
            self.counts["dropped_records"] += records
            self.m_dropped_frames.inc(frames)
            self.m_dropped_records.inc(records)
            event = DropEvent(frames, records, max(victim.first_seq, floor + 1),
                              victim.last_seq, reason)
            log.warning("spool %s: dropped %d unacknowledged frame(s) (%d records), seq %d..%d"
                        " (%s, policy drop_oldest)", self.directory, frames, records,
                        event.first_seq, event.last_seq, reason)
            if self.on_drop is not None:
                self.on_drop(event)
        self._signal_room()

    def _signal_room(self) -> None:
        self._room.set()
        self._room = trio.Event()

    def _count_unacked(self, seg: Segment, floor: int) -> tuple[int, int]:
        frames = records = 0
        scanner = Scanner(0, keep_bodies=False)
        with open(seg.path, "rb") as f:
            while True:
                chunk = f.read(READ_CHUNK)
                if chunk:
                    scanner.feed(chunk)
                else:
                    scanner.end()
                for ev in scanner.events():
                    if (isinstance(ev, Record) and ev.kind is Kind.FRAME and ev.seq > floor
                            and not _contains(self._ranges, ev.seq)):
                        frames += 1
                        records += int((cbor2.loads(ev.meta) or {}).get("n", 0))
                if not chunk:
                    break
        return frames, records


def ev_past_segment(scanner: Scanner, seg: Segment) -> bool:
    """True once the scanner has consumed the committed part of the segment."""
    return scanner.offset >= seg.size
