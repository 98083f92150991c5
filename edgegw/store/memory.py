"""``MemoryFrameStore``: a bounded in-memory ``FrameStore`` (frames are lost if the process
dies); the gateway's default until the disk spool (``edgegw.spool``) is enabled."""

from __future__ import annotations

import collections
import secrets
import time
from typing import Any, Literal

import trio

from ..protocol.intervals import IntervalSet
from ..protocol.messages import MAX_DROPPED_RANGES
from .base import Ranges, StoredFrame


class MemoryFrameStore:
    """A bounded in-memory FrameStore: the gateway's default until the spool is enabled."""

    def __init__(self, max_frames: int = 1000,
                 policy: Literal["block", "drop_oldest"] = "block",
                 stall_timeout_s: float = 60.0) -> None:
        self.epoch = secrets.token_hex(8)
        self.max_frames = max_frames
        self.policy = policy
        self._frames: collections.OrderedDict[int, StoredFrame] = collections.OrderedDict()
        self._next_seq = 1
        self._acked = 0
        self._checkpoints: dict[str, Any] = {}
        self._changed = trio.Event()
        self._room = trio.Event()
        self.dropped_frames = 0
        self.dropped_records = 0
        self._dropped = IntervalSet()  # seqs dropped before they were acknowledged
        #: unhealthy when frames wait and nothing was acknowledged this long (the disk
        #: spool's rule: the stall clock starts when work appears, restarts at each ack)
        self.stall_timeout_s = stall_timeout_s
        # time.monotonic(): a duration, so a step of the wall clock is no missing ack
        self._last_progress = time.monotonic()

    @property
    def next_seq(self) -> int:
        return self._next_seq

    @property
    def durable_seq(self) -> int:
        return self._next_seq - 1  # in memory: there as soon as appended

    @property
    def started_seq(self) -> int:
        return 1  # a new epoch every start

    def skip_to(self, seq: int) -> None:
        self._next_seq = max(self._next_seq, seq)

    @property
    def first_unacked(self) -> int:
        return next(iter(self._frames), self._next_seq)

    @property
    def checkpoints(self) -> dict[str, Any]:
        return self._checkpoints

    async def append(self, body: bytes, n_records: int, checkpoints: dict[str, Any], *,
                     over_cap: bool = False) -> int:
        while not over_cap and len(self._frames) >= self.max_frames:
            if self.policy == "drop_oldest":
                _, old = self._frames.popitem(last=False)
                self.dropped_frames += 1
                self.dropped_records += old.n_records
                self._dropped.add(old.seq)
                self._dropped.cap(MAX_DROPPED_RANGES)
                break
            self._room = trio.Event()
            await self._room.wait()
        seq = self._next_seq
        self._next_seq += 1
        if not self._frames:
            self._last_progress = time.monotonic()  # work appears: the stall clock starts now
        self._frames[seq] = StoredFrame(seq, body, n_records, dict(checkpoints))
        self._checkpoints.update(checkpoints)
        self._changed.set()
        self._changed = trio.Event()
        return seq

    def ack(self, seq: int) -> None:
        while self._frames:
            first = next(iter(self._frames))
            if first > seq:
                break
            del self._frames[first]
        self._acked = max(self._acked, seq)
        self._last_progress = time.monotonic()
        self._room.set()

    def ack_set(self, seqs: list[tuple[int, int]]) -> None:
        for lo, hi in seqs:
            for s in [s for s in self._frames if lo <= s <= hi]:
                del self._frames[s]
        self._last_progress = time.monotonic()
        self._room.set()

    @property
    def lost_ranges(self) -> Ranges:
        return []  # nothing survives a restart, so nothing is found damaged

    @property
    def dropped_ranges(self) -> Ranges:
        return self._dropped.ranges()

    def frames_from(self, seq: int, limit: int) -> list[StoredFrame]:
        out = []
        for s, f in self._frames.items():
            if s >= seq:
                out.append(f)
                if len(out) >= limit:
                    break
        return out

    async def read_frames(self, seq: int, limit: int) -> list[StoredFrame]:
        return self.frames_from(seq, limit)

    def first_seq_since(self, age_s: float) -> int:
        return self._next_seq  # frame times are not kept: every stored frame is backlog

    def max_body_bytes(self, n_records: int, checkpoints: dict[str, Any]) -> int | None:
        return None  # bounded in frames, not bytes

    def max_checkpoint_bytes(self) -> int | None:
        return None  # checkpoints live in memory, once each

    async def wait_for_frame_after(self, seq: int) -> None:
        while self._next_seq - 1 <= seq:
            await self._changed.wait()

    def stats(self) -> dict[str, Any]:
        return {
            "kind": "memory",
            "epoch": self.epoch,
            "frames": len(self._frames),
            "next_seq": self._next_seq,
            "dropped_frames": self.dropped_frames,
            "dropped_records": self.dropped_records,
            "stalled_for_s": round(self.stalled_for(), 3),
        }

    def stalled_for(self, now: float | None = None) -> float:
        """Seconds nothing was acknowledged while frames wait (0 when there is no work)."""
        if not self._frames:
            return 0.0
        now = time.monotonic() if now is None else now
        return max(0.0, now - self._last_progress)

    def problem(self) -> str | None:
        stalled = self.stalled_for()
        if stalled < self.stall_timeout_s:
            return None
        return (f"queue: {len(self._frames)} frame(s) waiting, nothing acknowledged "
                f"for {stalled:.0f} s")

    def damage(self) -> tuple[str, dict[str, Any]] | None:
        return None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        task_status.started()  # no background work

    async def flush(self) -> None:
        pass  # appended is stored (in memory)
