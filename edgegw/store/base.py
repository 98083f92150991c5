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

import dataclasses
from typing import Any, Protocol


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
