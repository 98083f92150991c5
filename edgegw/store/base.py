"""The seam between batcher and uplink: where sequence-numbered frames wait for their ack.

``FrameStore`` is what the uplink needs.  ``MemoryFrameStore`` is a bounded in-memory
implementation (frames are lost if the process dies); the crash-safe disk spool
(``edgegw.spool``) implements the same interface.

Contract:
- ``append`` assigns the next gap-free sequence number (starting at 1 in a fresh epoch),
  stores the frame body and returns the sequence.  When full it applies the overflow
  policy: ``block`` awaits room; ``drop_oldest`` discards the oldest unacked frame and
  counts it (``dropped_frames``/``dropped_records``), never silently.  ``over_cap=True``
  (the uplink storing the parts of a frame too large for the hub) neither waits for room
  nor drops: the cap may be passed by that one frame's parts, as the sender cannot wait
  for acks that only its own sending brings.
- ``ack(seq)`` is cumulative: every frame <= seq is acknowledged and may be deleted.
  ``ack_set`` also accepts frames the hub applied out of order (selective acks).
- ``frames_from(seq)`` returns the stored, unacknowledged frames with sequence >= seq, in
  order; ``wait_for_frame_after(seq)`` wakes when a frame newer than ``seq`` exists;
  ``durable_seq`` is the newest frame that exists so (appended frames not yet durable are
  not there yet).
- ``checkpoints`` holds the source checkpoints that are durable with the frames so far.
- ``read_frames`` is ``frames_from`` for the backlog: it may read from disk (in a worker
  thread, never blocking the Trio thread).  ``first_seq_since(age_s)`` is the first frame
  made at most ``age_s`` ago, which the uplink sends as live when a link comes up (a store
  that does not keep frame times answers ``next_seq``: everything before is backlog).
  ``lost_ranges`` are frames found damaged at recovery: the uplink sends stand-ins.
  ``dropped_ranges`` are frames dropped (``drop_oldest``) before they were acknowledged:
  the uplink tells them to the hub (a store without it says nothing of them).
- ``max_body_bytes(n_records, checkpoints)`` is the largest body ``append`` takes with
  those checkpoints (None: no limit of its own); ``append`` refuses a larger one with
  ``ValueError``, so the gateway splits a batch before it gets there.
- ``max_checkpoint_bytes()`` is how many bytes the sources' latest checkpoints may take
  *together* (None: no limit): the store keeps every source's latest with each segment
  (the disk spool's STATE records), so the gateway admits a checkpoint only while the sum
  stays within it, and refuses it otherwise (docs/spool.md, "Frame size").
- ``run`` is the store's own background work for as long as the gateway runs (the disk
  spool: recovery, then the group commit; a store already run by its owner returns at
  once); ``flush`` waits until everything appended is durable.  ``problem()`` says what is
  wrong with the store for the health endpoint (None when nothing), ``damage()`` what
  recovery found damaged (a message and details, for a GatewayEvent to the hub).

The gateway and the uplink use nothing else: no store is probed with ``getattr`` or
``isinstance``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol

import trio


@dataclasses.dataclass(frozen=True)
class StoredFrame:
    seq: int
    body: bytes
    n_records: int
    #: the checkpoints stored with the frame (``append``'s), when the store kept them:
    #: the gateway's next record id among them names the frame's record ids even when
    #: its body does not decode
    checkpoints: dict[str, Any] | None = dataclasses.field(default=None, compare=False)


Ranges = list[tuple[int, int]]


class FrameStore(Protocol):
    epoch: str

    @property
    def next_seq(self) -> int: ...
    @property
    def durable_seq(self) -> int: ...
    @property
    def started_seq(self) -> int:
        """``next_seq`` as the store started: no frame of this epoch from ``started_seq`` on
        was sent by an earlier run (a hub that applied one saw a state that is gone)."""
        ...
    @property
    def first_unacked(self) -> int: ...
    @property
    def checkpoints(self) -> dict[str, Any]: ...
    async def append(self, body: bytes, n_records: int, checkpoints: dict[str, Any], *,
                     over_cap: bool = False) -> int: ...
    def ack(self, seq: int) -> None: ...
    def skip_to(self, seq: int) -> None:
        """Number the next frame ``seq`` at least (a state gone back in time: the hub has
        applied the seqs below; ``gateway/rollback.py``)."""
        ...
    def ack_set(self, seqs: list[tuple[int, int]]) -> None: ...
    @property
    def lost_ranges(self) -> Ranges: ...
    @property
    def dropped_ranges(self) -> Ranges:
        """Seqs dropped (``drop_oldest``) before they were acknowledged, at most the last
        ``MAX_DROPPED_RANGES`` runs: told to the hub, which can then tell them from frames
        it acknowledged and lost since (docs/protocol.md section 4)."""
        ...
    def frames_from(self, seq: int, limit: int) -> list[StoredFrame]: ...
    async def read_frames(self, seq: int, limit: int) -> list[StoredFrame]: ...
    def first_seq_since(self, age_s: float) -> int: ...
    def max_body_bytes(self, n_records: int, checkpoints: dict[str, Any]) -> int | None: ...
    def max_checkpoint_bytes(self) -> int | None: ...
    async def wait_for_frame_after(self, seq: int) -> None: ...
    def stats(self) -> dict[str, Any]: ...
    def problem(self) -> str | None: ...
    def damage(self) -> tuple[str, dict[str, Any]] | None: ...
    async def run(self, *,
                  task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None: ...
    async def flush(self) -> None: ...
