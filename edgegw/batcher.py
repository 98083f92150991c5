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

The counts are kept by where the records follow (``Span``: the ``origin`` the source gave
with the put, a stream and a position in it), so the gateway applies each only to the replay
that resumes there.  Spans carried over from before a restart (``owed``: stored, not yet met
by the replay) ride along in every batch until the gateway says, with a checkpoint of the
source, which are still owed; those counted since the source's checkpoint are dropped by it.

A batch also says where in it each tracked source's checkpoints fell (``Batch.marks``), so
that a batch the gateway has to store as several frames (too large for one) can give each
frame the checkpoints of the puts that end in it, by the same rule: a tracked source's
spans are only ever counted after the checkpoint of the put before them, whose positions
they follow.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from .records import Record

#: where a run of a source's records starts, as the source tells the gateway with each put
#: (``origin``): ``(stream, start)`` -- a stream of the source (a tailed file) and the
#: position in it the records follow; None when the source does not say
Key = tuple[Any, Any] | None
#: ``(key, n)``: ``n`` records following ``key`` are in batches (docs/spool.md, "Source
#: positions and split puts")
Span = tuple[Key, int]
#: ``(end, source, checkpoint, owed)``: a tracked source's checkpoint given with the put
#: whose last record is the batch's record ``end - 1`` (``end`` 0: before any), and the
#: spans still owed from before its restart once that checkpoint was settled
Mark = tuple[int, str, Any, list[Span]]


def count(spans: Sequence[Span], key: Key, n: int) -> list[Span]:
    """``spans`` with ``n`` more records counted after the source's latest checkpoint, from
    a put starting at ``key``.  One span per stream: a source emits each stream's records
    in order, so what is counted of one stream since a checkpoint is one run from where
    the first counted put began (one span for every record without a key, likewise)."""
    stream = None if key is None else key[0]
    out = list(spans)
    for i, (k, m) in enumerate(out):
        if (k is None and key is None) or (k is not None and key is not None
                                           and k[0] == stream):
            out[i] = (k, m + n)
            return out
    out.append((key, n))
    return out


def merge(owed: Sequence[Span], counted: Sequence[Span]) -> list[Span]:
    """The spans a batch carries: those still owed from before the source's restart, then
    those counted since its latest checkpoint; a counted run that continues an owed span
    (it starts where the span does: the replay met it) adds to it."""
    out = list(owed)
    for key, n in counted:
        for i, (k, m) in enumerate(out):
            if k == key:
                out[i] = (k, m + n)
                break
        else:
            out.append((key, n))
    return out


@dataclasses.dataclass
class Batch:
    records: list[Record]
    checkpoints: dict[str, Any]
    #: per tracked source: spans of its records after its latest checkpoint (the one in
    #: this batch, or an earlier batch's) that are in this batch or earlier ones, as
    #: carried over from before its restart and not yet met by its replay (``owed``)...
    owed: dict[str, list[Span]] = dataclasses.field(default_factory=dict)
    #: ... and as counted since its latest checkpoint (``counted``); a source without any
    #: is omitted
    counted: dict[str, list[Span]] = dataclasses.field(default_factory=dict)
    #: every checkpoint of a tracked source given in this batch, in order (``Mark``); the
    #: last of each source is the one in ``checkpoints``
    marks: list[Mark] = dataclasses.field(default_factory=list)

    @property
    def spans(self) -> dict[str, list[Span]]:
        """Per tracked source, the spans of its records the batches hold past its
        latest checkpoint (``merge`` of owed and counted)."""
        return {s: merge(self.owed.get(s, ()), self.counted.get(s, ()))
                for s in {**self.owed, **self.counted}}

    @property
    def after(self) -> dict[str, int]:
        """Per tracked source, how many of its records after its latest checkpoint are in
        this batch or earlier ones (zeros omitted)."""
        return {s: sum(n for _k, n in spans) for s, spans in self.spans.items()}


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
        # tracked source -> spans of its stored records after its checkpoint: still owed
        # from before its restart, and counted since its checkpoint
        self._owed: dict[str, list[Span]] = {}
        self._counted: dict[str, list[Span]] = {}
        self._marks: list[Mark] = []

    @property
    def pending(self) -> int:
        return len(self._records)

    @property
    def deadline(self) -> float | None:
        """When the oldest pending record must go out, or None when empty."""
        return None if self._first_at is None else self._first_at + self.max_delay

    def track(self, source: str, after: int | Sequence[Span] = 0) -> None:
        """Count ``source``'s records after its checkpoints, starting at ``after``: the
        records already stored after its restored checkpoint (spans, or a count of
        unknown origin)."""
        if isinstance(after, int):
            self._owed[source] = [(None, after)] if after else []
        else:
            self._owed[source] = [span for span in after if span[1]]
        self._counted[source] = []

    def _settle(self, source: str, checkpoint: Any, owed: Sequence[Span] | None,
                stored_after: int) -> None:
        """``source``'s checkpoint covers every record it put: nothing counted; what is
        still owed is what the caller says (``owed``, or ``stored_after`` of unknown
        origin).  Marked where it falls in the batch (``Batch.marks``)."""
        if owed:
            self._owed[source] = [span for span in owed if span[1]]
        elif stored_after and owed is None:
            self._owed[source] = [(None, stored_after)]
        elif self._owed[source]:
            self._owed[source] = []
        if self._counted[source]:
            self._counted[source] = []
        self._marks.append((len(self._records), source, checkpoint, self._owed[source]))

    def add(
        self,
        records: Sequence[Record],
        now: float,
        source: str | None = None,
        checkpoint: Any = None,
        *,
        origin: Key = None,
        owed: Sequence[Span] | None = None,
        stored_after: int = 0,
        whole: bool = False,
    ) -> list[Batch]:
        """Add records; returns the batches that became full (possibly several).

        ``whole``: keep the records in one batch, the one that carries ``checkpoint``,
        over ``max_records`` if there are more (what is pending is cut first when they do
        not fit beside it): ``put_whole`` under a limit lowered since the source sized
        its put (``set_max_records``).

        ``origin``: where the records start (``Key``), for a tracked source's counts.
        ``owed`` (with a checkpoint): the spans of the source's records after
        ``checkpoint`` that are already stored -- a source replaying after a restart has
        not yet met all that the frames hold; ``stored_after`` (only with a checkpoint
        and no records): the same as a count of unknown origin."""
        out: list[Batch] = []
        tracked = source is not None and source in self._owed
        if not records:
            if source is not None and checkpoint is not None:
                if tracked:
                    self._settle(source, checkpoint, owed, stored_after)
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
        if whole and self._records and len(self._records) + len(records) > self.max_records:
            out.append(self._cut())
            self._first_at = now
        start = 0
        while start < len(records):
            if len(self._records) >= self.max_records:
                # held over a limit lowered meanwhile (``max_records`` set directly, not by
                # ``set_max_records``): what is held goes first, room is never negative
                out.append(self._cut())
                self._first_at = now
            room = self.max_records - len(self._records)
            if whole:
                room = max(room, len(records) - start)
            chunk = records[start : start + room]
            self._records.extend(chunk)
            start += len(chunk)
            if start >= len(records) and source is not None and checkpoint is not None:
                self._checkpoints[source] = checkpoint
                if tracked:
                    self._settle(source, checkpoint, owed, 0)
            elif tracked:
                assert source is not None
                self._counted[source] = count(self._counted[source], origin, len(chunk))
            if len(self._records) >= self.max_records:
                out.append(self._cut())
                if start < len(records):
                    self._first_at = now
        return out

    def set_max_records(self, max_records: int) -> Batch | None:
        """Change the limit from the next record on (the gateway lowers it to the hub's
        ``max_records`` once WELCOME tells it, and raises it back to its own for a hub
        that takes more).  When the batcher already holds ``max_records`` records or more,
        what it holds is cut and returned, as one batch: batches are cut at the limit as
        records arrive, so the records held were all within the old one, and splitting
        them now would tear a put's checkpoint from records before it.  That one batch is
        over the new limit (stored whole, split as it is sent to the hub, once); every
        batch after it is within the new limit."""
        if max_records < 1:
            raise ValueError("max_records must be >= 1")
        self.max_records = max_records
        if self._records and len(self._records) >= max_records:
            return self._cut()
        return None

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
        batch = Batch(self._records, self._checkpoints,
                      {s: list(v) for s, v in self._owed.items() if v},
                      {s: list(v) for s, v in self._counted.items() if v}, self._marks)
        self._marks = []
        self._records = []
        self._checkpoints = {}
        self._first_at = None
        return batch


__all__ = ["Batch", "Batcher", "Key", "Mark", "Span", "count", "merge"]
