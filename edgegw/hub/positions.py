"""When a hub writes the source positions a gateway tells it, sans-IO.

A gateway tells its positions often (``uplink.positions_every_s``: the less often, the more
of its last records a gateway whose state is lost sends again).  The hub writes them in a
transaction of their own, so it does not write each: it holds the newest told and writes
it at most every ``every_s`` seconds, and at once when the connection ends -- a gateway
whose connection died is the one that may need them next (docs/protocol.md section 4.1).
"""

from __future__ import annotations

import math

from ..protocol import Positions

#: at most one write of a gateway's positions per this many seconds while it is connected
KEEP_POSITIONS_EVERY_S = 1.0
#: how long the write of the last positions of a connection that ended may take
LAST_POSITIONS_WRITE_S = 5.0


class PositionsKeeper:
    """The positions of one connection waiting to be written: ``told`` (checked true)
    replaces what waits; ``due(now)`` says to write, ``due_at`` when; ``take(now)`` gives
    them for the write."""

    def __init__(self, every_s: float) -> None:
        self.every_s = every_s
        self.pending: Positions | None = None
        self._written_at = -math.inf

    def told(self, positions: Positions) -> None:
        self.pending = positions

    @property
    def due_at(self) -> float:
        """When what waits is due (infinity: nothing waits)."""
        if self.pending is None:
            return math.inf
        return self._written_at + self.every_s

    def due(self, now: float) -> bool:
        return now >= self.due_at

    def take(self, now: float) -> Positions | None:
        told, self.pending = self.pending, None
        if told is not None:
            self._written_at = now
        return told
