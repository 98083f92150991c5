"""The date the hub's frame retention cuts by: the wall clock, held back from forward steps.

Frames are dated by the wall clock when applied (``applied_at``: kept across restarts, so
a date), and ``hub.retain_frames_hours`` cuts by those dates.  A wall clock stepped days
forward would make frames of the last days look a week old and delete them early.  So the
cut-off is taken from the wall clock *as the monotonic clock projects it* since the hub
started: the lowest ``wall - monotonic`` offset seen.  A step forward raises the offset
and is ignored; a step back lowers it and is taken (keeping frames longer is the safe
side).  Sans-IO: both clocks are the caller's (default: the process's).

A clock already ahead when the hub starts cannot be told from a right one -- typically a
PC booted with a bad RTC that NTP sets right a little later.  So nothing is cut by age
for ``settle_s`` after the start (the hub: one ``prune_interval_s``): a step back within it
is taken before the first cut.  A clock that stays ahead is a known limit of the single
hub (docs/reliability.md, "Clocks"); a cluster cuts by PostgreSQL's clock.
"""

from __future__ import annotations

import time
from collections.abc import Callable


class RetentionClock:
    """``now()``: the current date for retention, never ahead of the monotonic clock's
    projection from the earliest-running wall clock seen since construction."""

    def __init__(self, wall: Callable[[], float] | None = None,
                 monotonic: Callable[[], float] | None = None, *,
                 settle_s: float = 0.0) -> None:
        self._wall = wall
        self._monotonic = monotonic
        mono = self._mono()
        self._offset = self._wall_now() - mono
        self._settled_at = mono + settle_s

    def _wall_now(self) -> float:
        # looked up at each call, not bound at construction: time.time may be replaced
        return self._wall() if self._wall is not None else time.time()

    def _mono(self) -> float:
        return self._monotonic() if self._monotonic is not None else time.monotonic()

    def now(self) -> float:
        mono = self._mono()
        self._offset = min(self._offset, self._wall_now() - mono)
        return mono + self._offset

    def cut_off(self, retain_s: float) -> float:
        """The date before which frames are older than ``retain_s``; 0.0 (none is) until
        ``settle_s`` passed since construction."""
        now = self.now()
        return 0.0 if self._mono() < self._settled_at else now - retain_s
