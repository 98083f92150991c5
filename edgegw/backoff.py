"""Exponential backoff with full jitter, for every reconnect loop in the gateway.

Fixed retry intervals make every gateway on a floor hammer a restarted broker or hub in
lock-step; "full jitter" (a delay drawn uniformly from ``[0, ceiling]``, the ceiling
doubling per failure up to a cap) spreads them out and is the variant AWS measured to
finish soonest with the least load.  Pure: no clock, no sleeping; the caller sleeps.
"""

from __future__ import annotations

import random


class Backoff:
    """``next_delay()`` after each failure, ``reset()`` after a success.

    The n-th consecutive delay is uniform in ``[0, min(maximum, initial * multiplier**n)]``.
    """

    def __init__(
        self,
        initial: float,
        maximum: float,
        multiplier: float = 2.0,
        rng: random.Random | None = None,
    ) -> None:
        if initial <= 0 or maximum < initial or multiplier < 1:
            raise ValueError(
                f"backoff needs 0 < initial <= maximum and multiplier >= 1 "
                f"(got initial={initial}, maximum={maximum}, multiplier={multiplier})"
            )
        self.initial = initial
        self.maximum = maximum
        self.multiplier = multiplier
        self._rng = rng or random.Random()
        self._ceiling = initial
        self.failures = 0  # consecutive failures since the last reset

    @property
    def ceiling(self) -> float:
        """The upper bound of the next delay."""
        return self._ceiling

    @property
    def at_cap(self) -> bool:
        return self._ceiling >= self.maximum

    def next_delay(self) -> float:
        delay = self._rng.uniform(0.0, self._ceiling)
        self.failures += 1
        self._ceiling = min(self.maximum, self._ceiling * self.multiplier)
        return delay

    def reset(self) -> None:
        self._ceiling = self.initial
        self.failures = 0
