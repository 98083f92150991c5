"""The gateway's real files on a disk that misbehaves on cue, inside a test's Trio run.

``HeldCommits``: the real spool, whose commits of chosen frames stall until the gateway has
reconnected (a loaded machine's fsync taking longer than a reconnect).
"""

from __future__ import annotations

from collections.abc import Callable

import trio

from edgegw.spool import DiskSpool, SpoolConfig


class HeldCommits(DiskSpool):
    """The real spool on a disk that stalls: frames ``hold_from`` to ``hold_to`` (None: every
    later one) become durable only ``grace`` seconds after ``reconnected()``, or as soon as
    another frame is appended behind them; ``holding`` is set once one waits.
    ``backlog_only``: no frame counts as made in the last 2 s, so the uplink sends them all
    in its backlog lane."""

    def __init__(self, config: SpoolConfig, hold_from: int, reconnected: Callable[[], bool],
                 *, hold_to: int | None = None, grace: float = 0.5,
                 backlog_only: bool = False) -> None:
        super().__init__(config)
        self.hold_from, self.hold_to = hold_from, hold_to
        self.reconnected, self.grace, self.backlog_only = reconnected, grace, backlog_only
        self.holding = trio.Event()
        self.held_since: float | None = None

    def first_seq_since(self, age_s: float) -> int:
        return self.next_seq if self.backlog_only else super().first_seq_since(age_s)

    def held(self, seq: int) -> bool:
        return seq >= self.hold_from and (self.hold_to is None or seq <= self.hold_to)

    def released(self) -> bool:
        if self.held_since is None and self.reconnected():
            self.held_since = trio.current_time()
        return len(self._pending) > 1 or (
            self.held_since is not None and trio.current_time() - self.held_since >= self.grace)

    async def _commit(self) -> None:
        while any(self.held(p.seq) for p in self._pending) and not self.released():
            self.holding.set()
            await trio.sleep(0.01)
        await super()._commit()


__all__ = ["HeldCommits"]
