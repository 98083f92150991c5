"""IntervalSet behaves like a set of integers, kept as ranges."""

import itertools

from hypothesis import given
from hypothesis import strategies as st

from edgegw.protocol import IntervalSet


@given(st.lists(st.integers(1, 200), max_size=100))
def test_interval_set_matches_a_plain_set(numbers: list[int]) -> None:
    s = IntervalSet()
    for n in numbers:
        s.add(n)
    plain = set(numbers)
    assert all((n in s) == (n in plain) for n in range(0, 202))
    assert s.count() == len(plain)
    ranges = s.ranges()
    assert all(lo <= hi for lo, hi in ranges)
    assert all(a[1] + 1 < b[0] for a, b in itertools.pairwise(ranges))  # disjoint, not touching
    w = s.watermark()
    assert all(n in plain for n in range(1, w + 1)) and (w + 1) not in plain


def test_holes_and_watermark() -> None:
    s = IntervalSet([(1, 10), (20, 30)])
    assert s.watermark() == 10 and s.holes == 1 and s.above_watermark() == [(20, 30)]
    s.add_range(11, 19)
    assert s.ranges() == [(1, 30)] and s.holes == 0
    assert IntervalSet([(5, 6)]).holes == 1  # the gap below it counts
