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


def test_containing_names_the_range_that_holds_a_number() -> None:
    s = IntervalSet([(3, 5), (9, 9)])
    assert s.containing(4) == (3, 5) and s.containing(9) == (9, 9)
    assert s.containing(2) is None and s.containing(6) is None and s.containing(10) is None


def test_discard_through_removes_everything_up_to_a_number() -> None:
    s = IntervalSet([(3, 5), (7, 10), (12, 12)])
    s.discard_through(8)
    assert s.ranges() == [(9, 10), (12, 12)]
    s.discard_through(10)
    assert s.ranges() == [(12, 12)]
    s.discard_through(1)
    assert s.ranges() == [(12, 12)]
    s.discard_through(20)
    assert not s


@given(st.lists(st.tuples(st.integers(1, 60), st.integers(0, 8)), max_size=20),
       st.integers(1, 70), st.integers(0, 10))
def test_missing_is_the_part_of_a_range_not_in_the_set(
        ranges: list[tuple[int, int]], lo: int, width: int) -> None:
    s = IntervalSet((a, a + w) for a, w in ranges)
    hi = lo + width
    missing = s.missing(lo, hi)
    assert [n for a, b in missing for n in range(a, b + 1)] == [
        n for n in range(lo, hi + 1) if n not in s]
    assert all(a[1] + 1 < b[0] for a, b in itertools.pairwise(missing))  # one run each
    assert len(s) == len(s.ranges())
