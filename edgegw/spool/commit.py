"""The disk spool's group commit: many frames, one write, one fsync (I2); acks persisted
before any segment is deleted (I4); whole sealed segments deleted oldest first (I5); the
cap and a full disk handled by policy (``block`` waits, ``drop_oldest`` drops and counts).

``GroupCommit`` is the half of ``DiskSpool`` that runs in its ``run`` task; the other half
(``spool.py``) is the ``FrameStore`` interface the gateway and the uplink call.  Both work
on the same state, declared here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cbor2
import trio

from ..metrics import Metrics
from ..protocol.intervals import IntervalSet
from ..protocol.messages import MAX_DROPPED_RANGES
from ..store import StoredFrame
from .config import SpoolConfig
from .format import Kind, Record, Scanner, encode_ack, encode_commit
from .reader import TailCache
from .segments import READ_CHUNK, Segment, Undeleted, disk_full, unlink_sync, write_sync

log = logging.getLogger("edgegw.spool.spool")

ACK_PERSIST_S = 0.2
ROLLOVER_RETRY_S = 1.0
#: seconds between attempts to delete acknowledged segments that could not be deleted
DELETE_RETRY_S = 5.0


@dataclasses.dataclass
class DropEvent:
    """Frames discarded by the ``drop_oldest`` policy (the gateway raises an event)."""

    frames: int
    records: int
    first_seq: int
    last_seq: int
    reason: str




@dataclasses.dataclass
class _Pending:
    seq: int
    record: bytes
    body: bytes
    n_records: int
    checkpoints: dict[str, Any]
    reserve: int = 0  # the commit's other records, counted against the cap until it lands


class GroupCommit:
    # the state shared with DiskSpool (spool.py), which sets it up
    config: SpoolConfig
    directory: Path
    metrics: Metrics
    on_drop: Callable[[DropEvent], None] | None
    counts: dict[str, int]
    m_fsyncs: Any
    h_fsync: Any
    m_disk_full: Any
    m_delete_errors: Any
    m_dropped_frames: Any
    m_dropped_records: Any
    _segments: list[Segment]
    # acknowledged (or dropped) segments whose file could not be deleted, and half-made
    # ones: no longer part of the spool, retried every DELETE_RETRY_S
    _undeleted: dict[Path, Segment]
    _delete_retry_at: float
    _half_made: Undeleted
    _pending: list[_Pending]
    _pending_bytes: int
    _pending_since: float
    _durable_seq: int
    _acked: int
    _ranges: IntervalSet
    _dropped_through: int
    #: the seqs dropped before they were acknowledged (``dropped_ranges``)
    _dropped: IntervalSet
    _persisted_floor: int
    _checkpoints: dict[str, Any]
    _ack_dirty: bool
    _ack_gen: int
    _last_ack_persist: float
    _drop_requested: bool
    _flush_acks: bool
    _disk_full: bool
    # the last drop_oldest drop freed nothing (its file could not be deleted): on a full
    # disk another drop would likely free nothing either, so wait as under block until a
    # write or a delete succeeds
    _futile_drop: bool
    _rollover_due: bool  # a new active segment is wanted but could not be opened (ENOSPC)
    _work: trio.Event
    _durable_changed: trio.Event
    _room: trio.Event
    _tail: TailCache
    _recent: Any

    @property
    def floor(self) -> int:
        """Every seq at or below this is acknowledged or dropped."""
        return max(self._acked, self._dropped_through)

    def _state_snapshot(self) -> dict[str, Any]:
        raise NotImplementedError

    def _open_active_sync(self, state: dict[str, Any]) -> None:
        raise NotImplementedError

    def _normalise_acks(self) -> None:
        raise NotImplementedError

    async def _committer(self) -> None:
        while True:
            if self._undeleted and time.monotonic() >= self._delete_retry_at:
                await self._retry_undeleted()
            if not (self._pending or self._ack_dirty or self._drop_requested):
                if not (self._rollover_due or self._undeleted):
                    await self._work.wait()
                else:
                    # a new segment could not be opened (disk full), or a segment could
                    # not be deleted: retry now and then even when nothing is written, so
                    # that freed space (or a released file) is noticed
                    with trio.move_on_after(ROLLOVER_RETRY_S if self._rollover_due
                                            else DELETE_RETRY_S) as idle:
                        await self._work.wait()
                    if idle.cancelled_caught:
                        if self._rollover_due:
                            await self._retry_rollover_idle()
                        continue
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

    def _unlinked(self, tried: list[Segment], failed: Undeleted) -> None:
        """Account for an attempt to delete ``tried``: ``failed`` ones are kept for a
        retry, each logged and counted once (never a failed commit: their frames are
        acknowledged or dropped, nothing in them is needed any more)."""
        failed_paths = {seg.path for seg, _ in failed}
        for seg in tried:
            if seg.path in failed_paths:
                continue
            self.counts["segments_deleted"] += 1
            self._futile_drop = False  # room was made
            if self._undeleted.pop(seg.path, None) is not None:
                log.warning("spool %s: %s deleted at last", self.directory, seg.path.name)
        for seg, exc in failed:
            if seg.path not in self._undeleted:
                self._undeleted[seg.path] = seg
                self.m_delete_errors.inc()
                log.error("spool %s: cannot delete %s (%s): nothing in it is needed any "
                          "more, the spool goes on and retries every %.0f s", self.directory,
                          seg.path.name, exc, DELETE_RETRY_S)
        if failed:
            self._delete_retry_at = time.monotonic() + DELETE_RETRY_S

    async def _retry_undeleted(self) -> None:
        tried = list(self._undeleted.values())
        self._unlinked(tried, await trio.to_thread.run_sync(unlink_sync, self.directory, tried))

    async def _try_rollover(self) -> OSError | None:
        """Open a new active segment; on a full disk return the error (the rollover is
        then due, retried after the next commit or every ``ROLLOVER_RETRY_S``)."""
        try:
            await trio.to_thread.run_sync(self._open_active_sync, self._state_snapshot())
        except OSError as exc:
            self._take_half_made()
            if not disk_full(exc):
                raise
            self._rollover_due = True
            return exc
        self._take_half_made()
        self._rollover_due = False
        return None

    def _take_half_made(self) -> None:
        """Segments a failed create left behind (or a crash did, found empty at start)
        that could not be removed: never appended to, deleted once they can be."""
        if self._half_made:
            half_made, self._half_made = self._half_made, []
            self._unlinked([], half_made)

    async def _retry_rollover_idle(self) -> None:
        if await self._try_rollover() is None and self._disk_full:
            self._disk_full = False
            log.warning("spool %s: a new segment could be opened: writes succeed again",
                        self.directory)
            self._signal_room()

    async def _commit(self) -> None:
        if not self._segments or not self._segments[-1].writable:
            # no segment to append to (a fresh spool started on a full disk, or a last
            # segment whose torn tail could not be cut): open one first
            exc = await self._try_rollover()
            if exc is not None:
                await self._on_disk_full(exc)
                return
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
            parts.append(self._ack_record())
        data = b"".join(parts)
        active = self._segments[-1]
        offsets = []
        off = active.size
        for p in batch:
            offsets.append(off)
            off += len(p.record)
        deletable = [s for s in self._segments[:-1] if s.last_seq <= floor] if write_ack else []
        try:
            fsync_s, undeleted = await trio.to_thread.run_sync(write_sync, self.directory,
                                                               active, data, deletable)
        except OSError as exc:
            if not disk_full(exc):
                raise
            if ack_first:
                # not even the ACK record fits: unlink the acked segments first.  Should we
                # crash before the ACK is written, recovery counts their seqs as lost (they
                # were acked, so nothing is missing at the hub) and never resends them.
                self._unlinked(deletable, await trio.to_thread.run_sync(
                    unlink_sync, self.directory, deletable))
                self._segments = [s for s in self._segments if s not in deletable]
                self._signal_room()
            await self._on_disk_full(exc)
            return
        self._futile_drop = False
        if self._disk_full:
            self._disk_full = False
            log.warning("spool %s: writes succeed again", self.directory)
            self._signal_room()  # appenders held back by the full disk may go on
        self.counts["commits"] += 1
        self.m_fsyncs.inc()
        self.h_fsync.observe(fsync_s)
        active.size += len(data)
        del self._pending[: len(batch)]
        for p, o in zip(batch, offsets, strict=True):
            active.add_frame(p.seq, o)
            self._pending_bytes -= len(p.record) + p.reserve
            self._checkpoints.update(p.checkpoints)
            self._tail.add(StoredFrame(p.seq, p.body, p.n_records, p.checkpoints))
        if self._pending:
            self._pending_since = time.monotonic()
        if batch:
            self._durable_seq = batch[-1].seq
            self._recent.append((time.monotonic(), batch[0].seq))
        if write_ack:
            self._persisted_floor = floor
            self._ack_dirty = self._ack_gen != ack_gen  # acks that arrived meanwhile
            self._last_ack_persist = time.monotonic()
            self._unlinked(deletable, undeleted)
            self._segments = [s for s in self._segments if s not in deletable]
        # a segment rolls over once full, but never while most of it is its own STATE record
        # (STATE over the budget, from a spool with larger segments): each commit would
        # then open a new segment and delete the last, a loop that gains nothing
        if self._rollover_due or active.size >= max(self.config.segment_bytes,
                                                    2 * active.state_bytes):
            full = await self._try_rollover()
            if full is not None:
                # stay in the old segment; rollover is retried after the next commit
                await self._on_disk_full(full)
        self._durable_changed.set()
        self._durable_changed = trio.Event()
        if deletable or write_ack:
            self._signal_room()
        if self._pending:
            self._work.set()

    def _note_disk_full(self, exc: OSError) -> None:
        """Count and log a write that failed on a full disk; enter the disk-full state."""
        self.counts["disk_full_events"] += 1
        self.m_disk_full.inc()
        if not self._disk_full:
            log.error("spool %s: disk full (%s); policy %s", self.directory, exc,
                      self.config.policy)
        self._disk_full = True

    async def _on_disk_full(self, exc: OSError) -> None:
        """Disk full is handled like the cap, never a crash loop."""
        self._note_disk_full(exc)
        if (self.config.policy == "drop_oldest" and len(self._segments) > 1
                and not self._futile_drop):
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
                if await self._try_rollover() is not None:
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
        # told to the hub (HELLO, LOST): what it lacks of these the gateway dropped; what
        # it lacks besides, it acknowledged and has lost since (docs/protocol.md section 4)
        for lo, hi in self._ranges.missing(floor + 1, victim.last_seq):
            self._dropped.add_range(lo, hi)
        self._dropped.cap(MAX_DROPPED_RANGES)
        new_floor = self.floor
        data = self._ack_record()
        active = self._segments[-1]
        try:
            _, undeleted = await trio.to_thread.run_sync(write_sync, self.directory, active,
                                                         data, [victim])
            active.size += len(data)
        except OSError as exc:
            if not disk_full(exc):
                raise
            # no room even for the ACK record: free the victim first, then record the drop.
            # Should the record still fail, recovery counts these seqs as lost: never resent.
            undeleted = await trio.to_thread.run_sync(unlink_sync, self.directory, [victim])
            with contextlib.suppress(OSError):
                await trio.to_thread.run_sync(write_sync, self.directory, active, data, [])
                active.size += len(data)
        self._unlinked([victim], undeleted)
        if undeleted and self._disk_full:
            self._futile_drop = True
            log.error("spool %s: the dropped segment %s could not be deleted, so the drop "
                      "made no room: appends wait for room (no more segments dropped) until "
                      "it can be deleted or space is freed", self.directory, victim.path.name)
        self._segments.remove(victim)
        self._persisted_floor = new_floor
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

    def _ack_record(self) -> bytes:
        return encode_ack(self._acked, self._ranges.ranges(), self._dropped_through,
                          self._dropped.ranges())

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
                            and ev.seq not in self._ranges):
                        frames += 1
                        records += int((cbor2.loads(ev.meta) or {}).get("n", 0))
                if not chunk:
                    break
        return frames, records
