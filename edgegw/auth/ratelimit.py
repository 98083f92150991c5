"""Failed gateway handshakes per remote address: a token bucket each, sans-IO.

Every refused HELLO (unknown id, wrong token, certificate not matching) takes a token from
its address's bucket; an address with an empty bucket is answered 429 before any handshake
until the bucket refills.  A guesser thus gets ``burst`` tries and then ``per_minute`` a
minute; a gateway with the right token never spends any.  Buckets that are full again are
forgotten, so the table stays as small as the set of recent offenders (and is capped).
"""

from __future__ import annotations

import math

MAX_ADDRESSES = 100_000


class FailureLimiter:
    def __init__(self, burst: int, per_minute: float) -> None:
        self.burst = float(burst)
        self.rate = per_minute / 60.0
        self._buckets: dict[str, tuple[float, float]] = {}  # address -> (tokens, at)

    def _tokens(self, address: str, now: float) -> float:
        tokens, at = self._buckets.get(address, (self.burst, now))
        return min(self.burst, tokens + (now - at) * self.rate)

    def blocked(self, address: str, now: float) -> float | None:
        """Seconds until ``address`` may try again, or None when it may try now."""
        if address not in self._buckets:
            return None
        tokens = self._tokens(address, now)
        if tokens >= self.burst:
            del self._buckets[address]
            return None
        return None if tokens >= 1 else math.ceil((1 - tokens) / self.rate * 10) / 10

    def failed(self, address: str, now: float) -> None:
        """One failed handshake from ``address``."""
        if len(self._buckets) >= MAX_ADDRESSES and address not in self._buckets:
            self._forget_full(now)
            if len(self._buckets) >= MAX_ADDRESSES:  # under a spread-out flood: the oldest
                self._buckets.pop(next(iter(self._buckets)))
        self._buckets[address] = (max(0.0, self._tokens(address, now) - 1), now)

    def _forget_full(self, now: float) -> None:
        for address in [a for a in self._buckets if self._tokens(a, now) >= self.burst]:
            del self._buckets[address]

    def __len__(self) -> int:
        return len(self._buckets)
