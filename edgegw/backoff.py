"""Exponential backoff with full jitter, sans-IO.

Each delay is drawn uniformly from [0, min(maximum, initial * multiplier**attempt)]
("full jitter"): a floor of gateways that lost the hub (or the broker) at the same moment
does not come back at the same moment, and nobody retries at a fixed interval.  Pure: no
clock, no sleeping; the caller sleeps.  Used by the uplink and the MQTT client.
"""

from __future__ import annotations

import random


class Backoff:
    """``next_delay()`` after each failure, ``reset()`` after a success."""

    def __init__(self, initial: float, maximum: float, multiplier: float = 2.0,
                 rng: random.Random | None = None) -> None:
        if initial <= 0 or maximum < initial or multiplier < 1:
            raise ValueError(
                f"backoff needs 0 < initial <= maximum and multiplier >= 1 "
                f"(got initial={initial}, maximum={maximum}, multiplier={multiplier})")
        self.initial = initial
        self.maximum = maximum
        self.multiplier = multiplier
        self.rng = rng or random.Random()
        self.attempt = 0  # consecutive failures since the last reset

    def cap(self) -> float:
        """The upper bound of the next delay."""
        return min(self.maximum, self.initial * self.multiplier ** min(self.attempt, 64))

    @property
    def ceiling(self) -> float:
        return self.cap()

    @property
    def at_cap(self) -> bool:
        """Retrying at the longest interval (a broker refusing our credentials, say)."""
        return self.cap() >= self.maximum

    def next_delay(self) -> float:
        delay = self.rng.uniform(0, self.cap())
        self.attempt += 1
        return delay

    def reset(self) -> None:
        self.attempt = 0
