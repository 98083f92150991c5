"""The seam between batcher and uplink: where sequence-numbered frames wait for their ack.

``FrameStore`` is what the uplink needs.  ``MemoryFrameStore`` is a bounded in-memory
implementation (frames are lost if the process dies); the crash-safe disk spool
(``edgegw.spool``) implements the same interface.

Contract:
- ``append`` assigns the next gap-free sequence number (starting at 1 in a fresh epoch),
  stores the frame body and returns the sequence.  When full it applies the overflow
  policy: ``block`` awaits room; ``drop_oldest`` discards the oldest unacked frame and
  counts it (``dropped_frames``/``dropped_records``), never silently.
- ``ack(seq)`` is cumulative: every frame <= seq is acknowledged and may be deleted.
  ``ack_set`` also accepts frames the hub applied out of order (selective acks).
- ``frames_from(seq)`` returns the stored, unacknowledged frames with sequence >= seq, in
  order; ``wait_for_frame_after(seq)`` wakes when a frame newer than ``seq`` exists.
- ``checkpoints`` holds the source checkpoints that are durable with the frames so far.
"""

from __future__ import annotations

import collections
import dataclasses
import secrets
from typing import Any, Literal, Protocol

import trio


@dataclasses.dataclass(frozen=True)
class StoredFrame:
    seq: int
    body: bytes
    n_records: int


class FrameStore(Protocol):
    epoch: str

    @property
    def next_seq(self) -> int: ...
    @property
    def first_unacked(self) -> int: ...
    @property
    def checkpoints(self) -> dict[str, Any]: ...
    async def append(self, body: bytes, n_records: int, checkpoints: dict[str, Any]) -> int: ...
    def ack(self, seq: int) -> None: ...
    def ack_set(self, seqs: list[tuple[int, int]]) -> None: ...
    def frames_from(self, seq: int, limit: int) -> list[StoredFrame]: ...
    async def wait_for_frame_after(self, seq: int) -> None: ...
    def stats(self) -> dict[str, Any]: ...


class MemoryFrameStore:
    """A bounded in-memory FrameStore: the gateway's default until the spool is enabled."""

    def __init__(self, max_frames: int = 1000,
                 policy: Literal["block", "drop_oldest"] = "block") -> None:
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

    @property
    def next_seq(self) -> int:
        return self._next_seq

    @property
    def first_unacked(self) -> int:
        return next(iter(self._frames), self._next_seq)

    @property
    def checkpoints(self) -> dict[str, Any]:
        return self._checkpoints

    async def append(self, body: bytes, n_records: int, checkpoints: dict[str, Any]) -> int:
        while len(self._frames) >= self.max_frames:
            if self.policy == "drop_oldest":
                _, old = self._frames.popitem(last=False)
                self.dropped_frames += 1
                self.dropped_records += old.n_records
                break
            self._room = trio.Event()
            await self._room.wait()
        seq = self._next_seq
        self._next_seq += 1
        self._frames[seq] = StoredFrame(seq, body, n_records)
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
        self._room.set()

    def ack_set(self, seqs: list[tuple[int, int]]) -> None:
        for lo, hi in seqs:
            for s in [s for s in self._frames if lo <= s <= hi]:
                del self._frames[s]
        self._room.set()

    def frames_from(self, seq: int, limit: int) -> list[StoredFrame]:
        out = []
        for s, f in self._frames.items():
            if s >= seq:
                out.append(f)
                if len(out) >= limit:
                    break
        return out

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
        }
