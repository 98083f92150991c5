"""A set of sequence numbers kept as sorted, disjoint, inclusive ranges.

The hub's record of what it has applied for one (gateway, epoch): usually one range
``[1, N]``; after an outage with live-first delivery, two or three.  Memory is bounded by
the number of holes, which the protocol limits.  The disk spool keeps its selective acks
and lost frames in the same structure.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable


class IntervalSet:
    __slots__ = ("_hi", "_lo")

    def __init__(self, ranges: Iterable[tuple[int, int]] | Iterable[list[int]] = ()) -> None:
        self._lo: list[int] = []
        self._hi: list[int] = []
        for lo, hi in ranges:
            self.add_range(lo, hi)

    def __contains__(self, n: int) -> bool:
        i = bisect.bisect_right(self._lo, n) - 1
        return i >= 0 and n <= self._hi[i]

    def __bool__(self) -> bool:
        return bool(self._lo)

    def __len__(self) -> int:
        """How many ranges (not numbers: ``count``)."""
        return len(self._lo)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, IntervalSet) and self.ranges() == other.ranges()

    def __repr__(self) -> str:
        return f"IntervalSet({self.ranges()!r})"

    def add(self, n: int) -> None:
        self.add_range(n, n)

    def assign(self, other: IntervalSet) -> None:
        """Make this set equal to ``other``, in place: whoever holds this set sees it."""
        self._lo[:] = other._lo
        self._hi[:] = other._hi

    def add_range(self, lo: int, hi: int) -> None:
        if hi < lo:
            return
        # every range that overlaps or touches [lo, hi] merges with it
        i = bisect.bisect_left(self._hi, lo - 1)
        j = bisect.bisect_right(self._lo, hi + 1)
        if i < j:
            lo = min(lo, self._lo[i])
            hi = max(hi, self._hi[j - 1])
        self._lo[i:j] = [lo]
        self._hi[i:j] = [hi]

    def containing(self, n: int) -> tuple[int, int] | None:
        """The range that holds ``n``, or None."""
        i = bisect.bisect_right(self._lo, n) - 1
        if i >= 0 and n <= self._hi[i]:
            return self._lo[i], self._hi[i]
        return None

    def missing(self, lo: int, hi: int) -> list[tuple[int, int]]:
        """The parts of ``[lo, hi]`` not in the set, as sorted ranges."""
        out: list[tuple[int, int]] = []
        i = bisect.bisect_left(self._hi, lo)  # the first range that ends at or after lo
        while lo <= hi:
            if i >= len(self._lo) or self._lo[i] > hi:
                out.append((lo, hi))
                break
            if self._lo[i] > lo:
                out.append((lo, self._lo[i] - 1))
            lo = self._hi[i] + 1
            i += 1
        return out

    def discard_through(self, n: int) -> None:
        """Remove every number up to and including ``n``."""
        i = bisect.bisect_right(self._hi, n)  # ranges wholly at or below n
        del self._lo[:i], self._hi[:i]
        if self._lo and self._lo[0] <= n:
            self._lo[0] = n + 1

    def discard_from(self, n: int) -> None:
        """Remove every number from ``n`` on."""
        i = bisect.bisect_left(self._lo, n)  # ranges wholly at or above n
        del self._lo[i:], self._hi[i:]
        if self._hi and self._hi[-1] >= n:
            self._hi[-1] = n - 1

    def cap(self, max_ranges: int) -> None:
        """At most ``max_ranges`` ranges: the lowest two merged (with the gap between
        them) until it holds no more -- a bounded record that blurs only its oldest part."""
        extra = len(self._lo) - max(1, max_ranges)
        if extra > 0:
            del self._lo[1:extra + 1], self._hi[:extra]

    def ranges(self) -> list[tuple[int, int]]:
        return list(zip(self._lo, self._hi, strict=True))

    @property
    def holes(self) -> int:
        """Gaps between ranges (a set starting above 1 counts the gap below it too)."""
        if not self._lo:
            return 0
        return len(self._lo) - 1 + (1 if self._lo[0] > 1 else 0)

    def watermark(self) -> int:
        """The highest n such that every number in 1..n is in the set (0 if none)."""
        if self._lo and self._lo[0] == 1:
            return self._hi[0]
        return 0

    def above_watermark(self) -> list[tuple[int, int]]:
        ranges = self.ranges()
        return ranges[1:] if ranges and ranges[0][0] == 1 else ranges

    def count(self) -> int:
        return sum(h - l + 1 for l, h in zip(self._lo, self._hi, strict=True))  # noqa: E741
