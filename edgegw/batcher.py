"""The batcher, sans-IO: records in, batches out, flushed at N records or T seconds.

Time is passed in (``now``), never read, so the rules are tested without a clock.

Checkpoints.  A checkpoint given with ``add`` belongs to the batch holding that call's
*last* record, so a checkpoint is never durable before every record it covers.  The converse
needs care too: a call larger than the room left in a batch is split, and the first part
becomes durable *before* the checkpoint that covers it.  Should the gateway crash between
the two, a source that resumes from its last durable checkpoint emits that first part again.
So for every source it is told to ``track`` (the sources that replay from a checkpoint),
the batcher counts the records that lie *after* the source's last checkpoint and are in a
batch already, and every batch carries those counts (``Batch.after``).  After a restart the
gateway skips exactly that many of the source's replayed records (docs/spool.md, "Source
positions and split puts").
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from .records import Record


@dataclasses.dataclass
class Batch:
    records: list[Record]
    checkpoints: dict[str, Any]
    #: per tracked source: how many of its records after its latest checkpoint (the one in
    #: this batch, or an earlier batch's) are in this batch or earlier ones; zeros omitted
    after: dict[str, int] = dataclasses.field(default_factory=dict)


class Batcher:
    def __init__(self, max_records: int, max_delay: float) -> None:
        if max_records < 1:
            raise ValueError("max_records must be >= 1")
        if max_delay < 0:
            raise ValueError("max_delay must be >= 0")
        self.max_records = max_records
        self.max_delay = max_delay
        self._records: list[Record] = []
        self._checkpoints: dict[str, Any] = {}
        self._first_at: float | None = None
        self._after: dict[str, int] = {}  # tracked source -> records after its checkpoint

    @property
    def pending(self) -> int:
        return len(self._records)

    @property
    def deadline(self) -> float | None:
        """When the oldest pending record must go out, or None when empty."""
        return None if self._first_at is None else self._first_at + self.max_delay

    def track(self, source: str, after: int = 0) -> None:
        """Count ``source``'s records after its checkpoints, starting at ``after`` (records
        already stored after its restored checkpoint)."""
        self._after[source] = after

    def add(
        self,
        records: Sequence[Record],
        now: float,
        source: str | None = None,
        checkpoint: Any = None,
        *,
        stored_after: int = 0,
    ) -> list[Batch]:
        """Add records; returns the batches that became full (possibly several).

        ``stored_after`` (only with a checkpoint and no records): that many of the source's
        records after ``checkpoint`` are already stored -- a source replaying after a
        restart has not yet caught up with what the frames hold."""
        out: list[Batch] = []
        tracked = source is not None and source in self._after
        if not records:
            if source is not None and checkpoint is not None:
                if tracked:
                    self._after[source] = stored_after
                if self._records:
                    self._checkpoints[source] = checkpoint
                else:  # nothing pending: the checkpoint needs a batch of its own
                    self._checkpoints[source] = checkpoint
                    out.append(self._cut())
            return out
        if stored_after:
            raise ValueError("stored_after is only meaningful for a checkpoint without records")
        if self._first_at is None:
            self._first_at = now
        start = 0
        while start < len(records):
            room = self.max_records - len(self._records)
            chunk = records[start : start + room]
            self._records.extend(chunk)
            start += len(chunk)
            if start >= len(records) and source is not None and checkpoint is not None:
                self._checkpoints[source] = checkpoint
                if tracked:
                    self._after[source] = 0
            elif tracked:
                assert source is not None
                self._after[source] += len(chunk)
            if len(self._records) >= self.max_records:
                out.append(self._cut())
                if start < len(records):
                    self._first_at = now
        return out

    def poll(self, now: float) -> Batch | None:
        """The pending batch if its deadline has passed."""
        deadline = self.deadline
        if deadline is not None and now >= deadline:
            return self._cut()
        return None

    def flush(self) -> Batch | None:
        """Whatever is pending, regardless of time (shutdown)."""
        if not self._records and not self._checkpoints:
            return None
        return self._cut()

    def _cut(self) -> Batch:
        after = {s: n for s, n in self._after.items() if n}
        batch = Batch(self._records, self._checkpoints, after)
        self._records = []
        self._checkpoints = {}
        self._first_at = None
        return batch


__all__ = ["Batch", "Batcher"]
