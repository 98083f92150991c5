"""The batcher, sans-IO: records in, batches out, flushed at N records or T seconds.

Time is passed in (``now``), never read, so the rules are tested without a clock.  A batch
carries the checkpoints of the sources whose records it completes: a checkpoint given with
``add`` belongs to the batch holding that call's *last* record, so a checkpoint is never
durable before every record it covers.
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

    @property
    def pending(self) -> int:
        return len(self._records)

    @property
    def deadline(self) -> float | None:
        """When the oldest pending record must go out, or None when empty."""
        return None if self._first_at is None else self._first_at + self.max_delay

    def add(
        self,
        records: Sequence[Record],
        now: float,
        source: str | None = None,
        checkpoint: Any = None,
    ) -> list[Batch]:
        """Add records; returns the batches that became full (possibly several)."""
        out: list[Batch] = []
        if not records:
            if source is not None and checkpoint is not None:
                if self._records:
                    self._checkpoints[source] = checkpoint
                else:  # nothing pending: the checkpoint needs a batch of its own
                    out.append(Batch([], {source: checkpoint}))
            return out
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
        batch = Batch(self._records, self._checkpoints)
        self._records = []
        self._checkpoints = {}
        self._first_at = None
        return batch
