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
    active segment (the old last one, its tail truncated, becomes sealed); on a full disk
    the old last one stays active until the new one can be opened (retried like a failed
    rollover), and a fresh spool has no segment (nor epoch file) until then.

Blocking file I/O runs in ``trio.to_thread.run_sync``, batched per group commit.  The one
exception is ``frames_from`` (the FrameStore interface is synchronous): it serves recent
frames from an in-memory tail cache and reads older ones directly, bounded by
``READ_MAX_BYTES`` per call; ``read_frames`` is the async variant that reads in a thread.

The modules: ``format.py`` (records, sans-IO), ``segments.py`` (segment files and their
blocking operations), ``recovery.py`` (I1, I4, I6-I8), ``reader.py`` (tail cache, reads),
``commit.py`` (the group commit: I2, I4, I5, the cap), and this one: ``DiskSpool``, the
``FrameStore`` interface and the acknowledgement state, on ``IntervalSet``.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import trio

from ..dirsync import fsync_dir
from ..metrics import Metrics
from ..protocol.intervals import IntervalSet
from ..startup import DirLock, ServiceFailed, StartupError
from ..store import StoredFrame
from .commit import ACK_PERSIST_S, DropEvent, GroupCommit, _Pending
from .config import SpoolConfig
from .format import MAX_RECORD, encode_commit, encode_frame, encode_state
from .reader import TailCache, read_sync
from .recovery import Recovered, recover
from .segments import (
    Segment,
    Undeleted,
    disk_full,
    open_segment_sync,
    segment_path,
)

log = logging.getLogger(__name__)

Ranges = list[tuple[int, int]]

_OVERHEAD_SLACK = 32

__all__ = ["ACK_PERSIST_S", "DiskSpool", "DropEvent", "Recovered", "SpoolFailed", "recover"]


class SpoolFailed(ServiceFailed):
    """The spool's disk failed (an I/O error, a file system turned read-only): the gateway
    stops with this one line (docs/operations.md, "A failing disk")."""


class DiskSpool(GroupCommit):
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
        self.m_io_failures = m.counter(
            "spool_io_failures_total", "writes the disk failed (EIO, EROFS...): each stops "
            "the gateway, and its service manager starts it again")
        self.m_delete_errors = m.counter(
            "spool_segment_delete_errors_total",
            "segment files that could not be deleted when nothing in them was needed any more")
        self.m_undeleted = m.gauge("spool_undeleted_segments",
                                   "such segment files still waiting to be deleted")
        self.m_fsyncs = m.counter("spool_fsyncs_total", "group commits (one fsync each)")
        self.h_fsync = m.histogram("spool_fsync_seconds",
                                   "seconds each group commit's fsync took")
        self.m_bytes = m.gauge("spool_bytes", "bytes in segment files")
        self.m_unacked = m.gauge("spool_unacked_frames", "frames not yet acknowledged")
        m.add_collector(self._collect)

        self.epoch = ""
        self._segments: list[Segment] = []
        self._undeleted: dict[Path, Segment] = {}
        self._half_made: Undeleted = []  # found by a worker thread, taken in by the loop
        self._delete_retry_at = 0.0
        self._next_seq = 1
        self._durable_seq = 0
        self._acked = 0
        self._ranges = IntervalSet()  # selective acks above the watermark
        self._dropped_through = 0
        self._dropped = IntervalSet()  # seqs dropped before they were acknowledged
        self._persisted_floor = 0
        self._lost = IntervalSet()  # seqs found damaged or missing at recovery
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
        self._failure: SpoolFailed | None = None
        self._room = trio.Event()
        self._tail = TailCache()
        self._recent: deque[tuple[float, int]] = deque(maxlen=4096)  # (commit time, seq)
        self._last_progress = time.monotonic()
        self._disk_full = False
        self._futile_drop = False
        self._rollover_due = False
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
        # one process per spool, checked before anything is read (docs/spool.md)
        lock = DirLock(self.directory, "spool.dir", "gateway")
        await trio.to_thread.run_sync(self._lock_sync, lock)
        try:
            try:
                rec = await trio.to_thread.run_sync(recover, self.directory)
            except OSError as exc:
                if disk_full(exc):
                    raise
                raise self._unreadable(exc) from exc
            self._adopt(rec)
            full = await self._try_rollover()
            if full is not None:
                # a full disk at start: start anyway (never a crash loop), in the old last
                # segment if there is one; the new segment is opened once there is room,
                # retried like a failed rollover (docs/spool.md, "Operations": "Starting
                # (or restarting) on a full disk")
                await trio.to_thread.run_sync(self._keep_last_active_sync)
                self._take_half_made()
                self._note_disk_full(full)
            self._started = True
            task_status.started()
            try:
                await self._committer()
            except OSError as exc:
                if disk_full(exc):  # (handled where it happens: never here)
                    raise
                raise self._failed(exc) from exc
        finally:
            lock.release()

    def _failed(self, exc: OSError) -> SpoolFailed:
        """The spool's disk failed a write, an fsync, a create or a delete (EIO, EROFS...):
        the spool stops.  Retrying is no answer: after a failed fsync the kernel may have
        dropped the pages, and a second fsync succeeds without them.  What the spool holds
        is what recovery finds at the next start (so the gateway stops, and its service
        manager starts it again); what it had not committed is not lost either: the
        sources' positions are committed with the frames, so they read it again."""
        where = f" ({Path(exc.filename).name})" if exc.filename else ""
        self._failure = SpoolFailed(
            f"spool.dir: {str(self.directory)!r}: the disk is failing: "
            f"{exc.strerror or exc}{where}; the gateway stops, and sends what the spool "
            "holds once the disk is repaired and it starts again (docs/operations.md, "
            "\"A failing disk\")")
        log.error("%s", self._failure)
        self.m_io_failures.inc()
        # whoever waits for a commit or for room learns it now, not at a timeout
        self._durable_changed.set()
        self._signal_room()
        return self._failure

    def _unreadable(self, exc: OSError) -> StartupError:
        """Recovery could not read the spool (an I/O error, a damaged file system): one line
        for the operator.  Not skipped on our own: a file that fails today may read after
        a repair, and it holds frames the hub may not have."""
        what = Path(exc.filename).name if exc.filename else "it"
        return StartupError(
            f"spool.dir: {str(self.directory)!r}: cannot read {what}: "
            f"{(exc.strerror or str(exc)).lower()}: the disk or its file system is damaged; "
            "repair it (fsck) and start again: frames the repair could not save are counted "
            "as lost, and the hub is told (docs/operations.md, \"A failing disk\")")

    def _check_failed(self) -> None:
        if self._failure is not None:
            raise self._failure

    async def _durable_change(self) -> None:
        """Until a commit (or the spool's failure, raised) changes what is durable."""
        await self._durable_changed.wait()
        self._check_failed()

    def _lock_sync(self, lock: DirLock) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        lock.acquire()

    def _adopt(self, rec: Recovered) -> None:
        self.recovered = rec
        self.epoch = rec.epoch
        self._segments = list(rec.segments)
        self._next_seq = rec.next_seq
        self._durable_seq = rec.next_seq - 1
        self._acked = rec.acked
        self._ranges = IntervalSet(rec.ranges)
        self._dropped_through = rec.dropped_through
        self._dropped = IntervalSet(rec.dropped)
        self._persisted_floor = max(rec.acked, rec.dropped_through)
        self._lost = IntervalSet(rec.lost)
        self._checkpoints = dict(rec.checkpoints)
        lost_frames = sum(b - a + 1 for a, b in rec.lost)
        for key in ("damaged_regions", "damaged_bytes", "torn_bytes", "unrecoverable_files"):
            self.counts[key] += getattr(rec, key)
        self.counts["lost_frames"] += lost_frames
        self.counts["segments_deleted"] += rec.deleted_segments
        self._unlinked([], rec.undeleted)
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
                "ranges": [list(r) for r in self._ranges.ranges()],
                "dropped": self._dropped_through,
                "u": [list(r) for r in self._dropped.ranges()],
                "cp": dict(self._checkpoints)}

    def _keep_last_active_sync(self) -> None:
        """After a start on a full disk: the last recovered segment stays active.  An empty
        one (a crash while it was being made: no STATE record) is removed, as it would be
        no segment to append to (I3)."""
        removed = False
        while self._segments and self._segments[-1].size == 0:
            try:
                self._segments[-1].path.unlink(missing_ok=True)
            except OSError as exc:
                # never appended to (no STATE record); deleted once it can be
                self._half_made.append((self._segments.pop(), exc))
                continue
            self._segments.pop()
            removed = True
        if removed:
            with contextlib.suppress(OSError):
                fsync_dir(self.directory)

    def _open_active_sync(self, state: dict[str, Any]) -> None:
        """Start a new active segment (I3, I8); the old one is sealed.  A half-made one
        that could not be removed after a failed create is never used: it waits in
        ``_half_made`` to be deleted, and its name is not made again."""
        index = 1 + max((s.index for s in (*self._segments, *self._undeleted.values(),
                                           *(seg for seg, _ in self._half_made))), default=0)
        try:
            self._segments.append(open_segment_sync(self.directory, index, state))
        except OSError as exc:
            path = segment_path(self.directory, index)
            if path.exists():
                self._half_made.append((Segment(index, path, writable=False), exc))
            raise

    # --- FrameStore interface ------------------------------------------------------------

    @property
    def next_seq(self) -> int:
        return self._next_seq

    @property
    def started_seq(self) -> int:
        return self.recovered.next_seq if self.recovered is not None else 1

    def skip_to(self, seq: int) -> None:
        # in memory until a frame numbered past it is durable: a crash before that finds
        # the same state again, and the same rollback (gateway/rollback.py)
        self._next_seq = max(self._next_seq, seq)

    @property
    def durable_seq(self) -> int:
        return self._durable_seq

    @property
    def first_unacked(self) -> int:
        seq = self.floor + 1
        while seq < self._next_seq:
            r = self._ranges.containing(seq) or self._lost.containing(seq)
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
        return self._lost.ranges()

    @property
    def dropped_ranges(self) -> Ranges:
        """Seqs dropped (``drop_oldest``) before they were acknowledged: the most recent
        ``MAX_DROPPED_RANGES`` runs, kept with the acks across restarts."""
        return self._dropped.ranges()

    @property
    def total_bytes(self) -> int:
        return sum(s.size for s in self._segments)

    async def append(self, body: bytes, n_records: int, checkpoints: dict[str, Any], *,
                     over_cap: bool = False) -> int:
        """Store a frame; returns its seq once it is durable (I2).  ``over_cap``: never
        wait for room under ``max_bytes`` nor drop for it (the store contract)."""
        if not self._started:
            raise RuntimeError("the spool is not running (start DiskSpool.run first)")
        room = self.max_body_bytes(n_records, checkpoints)
        if len(body) > room:  # the gateway splits batches before this (docs/spool.md)
            raise ValueError(f"frame body of {len(body)} bytes exceeds the {room} a frame "
                             f"may hold (a quarter of spool.max_bytes)")
        size = self.config.max_bytes // 4 - room + len(body)
        while True:
            # the frame's commit also writes a COMMIT record, maybe an ACK record, and (when
            # it fills the segment) the next segment's STATE: the cap counts them all
            reserve = self._commit_overhead(checkpoints)
            full = not over_cap and self._over_cap(size + reserve)
            if full and self._deletable():
                # acknowledged segments not yet deleted (e.g. found at recovery): an ACK
                # commit deletes them
                self._ack_dirty = True
                self._work.set()
            elif full and not self._pending and self.unacked_frames() == 0:
                # nothing to wait for: no ack can free room (STATE records over the budget,
                # recovered from a spool with larger segments); the cap is passed by this
                # commit, and the spool shrinks back as the checkpoints do
                full = False
            if not (full or (self._disk_full and self.config.policy == "block")):
                break
            if self.config.policy == "drop_oldest":
                self._drop_requested = True
                self._work.set()
            await self._room.wait()
            self._check_failed()
        seq = self._next_seq
        self._next_seq += 1
        record = encode_frame(seq, body, n_records, checkpoints)
        if not self._pending:
            self._pending_since = time.monotonic()
        self._pending.append(_Pending(seq, record, body, n_records, dict(checkpoints),
                                      reserve))
        self._pending_bytes += len(record) + reserve
        if self.unacked_frames() == 0 and len(self._pending) == 1:
            self._last_progress = time.monotonic()  # work appears: the stall clock starts now
        self._work.set()
        while self._durable_seq < seq:
            await self._durable_change()
        return seq

    def max_body_bytes(self, n_records: int, checkpoints: dict[str, Any]) -> int:
        """The largest body ``append`` takes: a frame record (header, metadata, body) may
        fill at most a quarter of ``max_bytes``, so that the cap always holds several, and
        never more than the largest record recovery reads (``MAX_RECORD``: a longer one
        would read as damage, its frame lost)."""
        meta = len(encode_frame(self._next_seq, b"", n_records, checkpoints))
        return min(self.config.max_bytes // 4, MAX_RECORD) - meta

    def max_checkpoint_bytes(self) -> int:
        """How many bytes the sources' checkpoints may take together: every segment's STATE
        record repeats each one's latest (I3), so their sum is bounded, not each alone.
        Half a segment (at most an eighth of ``max_bytes``; a quarter of the largest record
        recovery reads): a STATE record never outgrows its segment, and with everything
        acknowledged the cap always has room for the active segment and the next frame."""
        return min(self.config.segment_bytes // 2, self.config.max_bytes // 8,
                   MAX_RECORD // 4)

    def _commit_overhead(self, checkpoints: dict[str, Any]) -> int:
        """The bytes a commit writes besides the frame records: its COMMIT record, the ACK
        record, and the STATE record of the segment a rollover opens (every checkpoint,
        this frame's and the pending frames' merged in).  ``_OVERHEAD_SLACK`` covers the
        few bytes the seqs in them may grow by until the commit."""
        merged = dict(self._checkpoints)
        for p in self._pending:
            merged.update(p.checkpoints)
        merged.update(checkpoints)
        state = self._state_snapshot()
        state["cp"] = merged
        return (len(encode_state(state)) + len(encode_commit(self._next_seq))
                + len(self._ack_record())
                + _OVERHEAD_SLACK)

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
                self._ranges.add_range(lo, hi)
                changed = True
        if changed:
            self._normalise_acks()

    def _normalise_acks(self) -> None:
        floor = self.floor
        # a range touching the watermark (or lost seqs just above it) extends it
        while True:
            nxt = floor + 1
            # lost seqs (damaged at recovery) can never be acked by the hub: pass over them
            r = self._ranges.containing(nxt) or self._lost.containing(nxt)
            if r is None:
                break
            self._acked = max(self._acked, r[1])
            floor = self.floor
        self._ranges.discard_through(floor)
        self._lost.discard_through(floor)
        self._tail.discard_through(floor)
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
        cached = self._tail.run_from(start, limit, self._durable_seq, self._skipped)
        if cached is not None:
            return cached
        return read_sync(self._segments, start, limit, self._durable_seq, self._wanted)

    async def read_frames(self, seq: int, limit: int) -> list[StoredFrame]:
        """Like ``frames_from``, but reads from disk in a worker thread."""
        start = self._first_wanted(seq)
        if start is None or limit <= 0:
            return []
        cached = self._tail.run_from(start, limit, self._durable_seq, self._skipped)
        if cached is not None:
            return cached
        return await trio.to_thread.run_sync(read_sync, self._segments, start, limit,
                                             self._durable_seq, self._wanted)

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
            await self._durable_change()

    async def flush(self) -> None:
        """Wait until every appended frame is durable and the latest acks are persisted."""
        self._flush_acks = True
        self._work.set()
        try:
            while (self._pending or self._ack_dirty) and self._failure is None:
                await self._durable_changed.wait()
        finally:
            self._flush_acks = False

    async def wait_durable(self, seq: int) -> None:
        while self._durable_seq < seq:
            await self._durable_change()

    def unacked_frames(self) -> int:
        n = self._durable_seq - self.floor
        for ranges in (self._ranges.ranges(), self._lost.ranges()):
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
        detail["lost_ranges"] = [list(r) for r in self._lost.ranges()[:16]]
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
            "lost_ranges": self._lost.ranges()[:16],
            "disk_full": self._disk_full,
            "undeleted_segments": len(self._undeleted),
            "undeleted_bytes": sum(seg.size for seg in self._undeleted.values()),
            "stalled_for_s": round(self.stalled_for(), 3),
            **self.counts,
        }

    def _collect(self) -> None:
        self.m_bytes.set(self.total_bytes)
        self.m_undeleted.set(len(self._undeleted))
        self.m_unacked.set(self.unacked_frames())

    # --- reading ---------------------------------------------------------------------------

    def _first_wanted(self, seq: int) -> int | None:
        s = max(seq, self.floor + 1)
        while s <= self._durable_seq:
            r = self._ranges.containing(s) or self._lost.containing(s)
            if r is None:
                return s
            s = r[1] + 1
        return None

    def _wanted(self, s: int) -> bool:
        return s > self.floor and s not in self._ranges

    def _skipped(self, s: int) -> bool:
        return s in self._ranges or s in self._lost
