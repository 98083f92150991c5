"""Which frames the uplink sends next: live first, backlog in large windows (sans-IO).

After an outage the store may hold hours of frames.  Sending them oldest-first starves the
live view (BRIEF §4: a 12-day backlog sent before any live data); sending one per interval
takes forever.  The scheduler splits the sequence space at connect time:

- **live lane**: frames with ``seq >= live_from``: those made in the last 2 s before the
  connection came up (the spool remembers commit times) and everything appended after.
  They are always offered first and may use the whole window, so a new frame is sent as
  soon as it is durable and window room exists.
- **backlog lane**: frames in ``[backlog_next, live_from)``, drained oldest first in
  windows of up to ``window - live_reserve`` frames in flight.  ``live_reserve`` slots are
  kept free for live frames, so live data never waits behind a full backlog window.

Ordering guarantee (documented in docs/spool.md): within each lane frames are sent in
increasing seq; across lanes a live frame is never delayed by backlog frames beyond one
window already on the wire.  The hub applies out of order (its applied set tolerates a
few holes), and the two lanes create at most one hole (between the backlog cursor and
``live_from``) plus what selective acks leave.  Consumers order by record id.  A hub
that takes no hole at all (``in_order``) gets the backlog first and then the live lane.

The uplink may also send a frame **ahead** of its lane (``sent_ahead``): the parts of a
frame split for the hub go right after that frame (docs/protocol.md, "Frames over the
hub's limits").  A lane that reaches a frame already sent ahead, or one the uplink holds
back until the frame it was cut from is sent, passes it (``passed``): its cursor moves on,
nothing is put in flight.  A frame sent ahead is remembered until its lane's cursor is past
it, acknowledged or not: the lane may have read it in a batch before the ack came.

Time is never read here; the uplink passes events in.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Literal

Lane = Literal["live", "backlog"]


@dataclasses.dataclass(frozen=True)
class Want:
    """Ask the store for up to ``limit`` frames with ``seq >= start`` (and ``< below``)."""

    lane: Lane
    start: int
    limit: int
    below: int | None = None


class SendScheduler:
    def __init__(self, window: int, live_reserve: int | None = None,
                 max_holes: int = 6, in_order: bool = False) -> None:
        if window < 2:
            raise ValueError("window must be >= 2 (one slot is reserved for live frames)")
        self.window = window
        self.live_reserve = live_reserve if live_reserve is not None else max(1, window // 4)
        if not 1 <= self.live_reserve < window:
            raise ValueError("live_reserve must be between 1 and window - 1")
        self.live_from = 1
        self.live_next = 1
        self.backlog_next = 1
        self.in_flight: set[int] = set()
        # sent ahead of their lane, until the lane's cursor is past them: an ack does not
        # take one out (the lane may hold the frame in a batch read before the ack came,
        # and would send it a second time on the connection: 4004)
        self.ahead: set[int] = set()
        # the hub refuses frames that leave more than its max_holes (default 8) gaps in its
        # applied set; repeated outages during a drain leave one live range each, so when
        # the hub's set is already fragmented the backlog (which only fills gaps) goes first
        self.max_holes = max_holes
        # a hub that takes no gap at all (``max_holes = 0``: it closed the link for one)
        # gets every frame in sequence order: the live lane is held on each connection
        # until the backlog is sent, as for a fragmented set
        self.in_order = in_order
        self.live_held = False
        self.sent_live = 0
        self.sent_backlog = 0

    def start(self, first_unacked: int, live_from: int,
              applied: Iterable[tuple[int, int]] = ()) -> None:
        """A new connection: everything below ``live_from`` is backlog, the rest live
        (the uplink passes the first frame made in the last 2 s, or the next seq).
        ``applied`` is the hub's applied set from WELCOME."""
        self.live_from = self.live_next = max(live_from, first_unacked)
        self.backlog_next = first_unacked
        self.in_flight.clear()
        self.ahead.clear()
        above = [r for r in applied if r[1] >= first_unacked]
        self.live_held = self.in_order or len(above) + 1 >= self.max_holes

    @property
    def backlog_pending(self) -> bool:
        return self.backlog_next < self.live_from

    @property
    def room(self) -> int:
        return self.window - len(self.in_flight)

    def wants(self) -> list[Want]:
        """What to fetch next, in priority order (live before backlog)."""
        out = []
        room = self.room
        if self.live_held and not self.backlog_pending:
            self.live_held = False
        if room > 0 and not self.live_held:
            out.append(Want("live", self.live_next, room))
        backlog_room = room if self.live_held else room - self.live_reserve
        if self.backlog_pending and backlog_room > 0:
            out.append(Want("backlog", self.backlog_next, backlog_room, self.live_from))
        return out

    def sent(self, lane: Lane, seqs: Iterable[int]) -> None:
        seqs = list(seqs)
        if not seqs:
            return
        self.in_flight.update(seqs)
        if lane == "live":
            self.live_next = max(self.live_next, max(seqs) + 1)
            self.sent_live += len(seqs)
        else:
            self.backlog_next = max(self.backlog_next, max(seqs) + 1)
            self.sent_backlog += len(seqs)
        self._prune_ahead()

    def sent_ahead(self, seqs: Iterable[int]) -> None:
        """Frames sent out of their lane's order: in flight now; their lane passes them."""
        seqs = list(seqs)
        self.in_flight.update(seqs)
        self.ahead.update(seqs)

    def passed(self, lane: Lane, seqs: Iterable[int]) -> None:
        """The lane moves past ``seqs`` without sending them (sent ahead, held back, or
        the hub has them already)."""
        seqs = list(seqs)
        if not seqs:
            return
        if lane == "live":
            self.live_next = max(self.live_next, max(seqs) + 1)
        else:
            self.backlog_next = max(self.backlog_next, max(seqs) + 1)
        self._prune_ahead()

    def _prune_ahead(self) -> None:
        """Forget the frames sent ahead that their lane's cursor has passed."""
        if self.ahead:
            self.ahead = {s for s in self.ahead if s >= (
                self.live_next if s >= self.live_from else self.backlog_next)}

    def backlog_exhausted(self) -> None:
        """The store holds nothing more below ``live_from`` (acked meanwhile, or lost)."""
        self.backlog_next = self.live_from
        self._prune_ahead()

    def acked(self, watermark: int, ranges: Iterable[tuple[int, int]] = ()) -> None:
        ranges = list(ranges)
        self.in_flight = {s for s in self.in_flight
                          if s > watermark and not any(lo <= s <= hi for lo, hi in ranges)}
        if watermark >= self.backlog_next:
            self.backlog_next = min(watermark + 1, self.live_from)
        self._prune_ahead()
