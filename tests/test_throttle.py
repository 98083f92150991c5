"""The throttle: windows at a UI rate whose statistics account for every reading."""

from __future__ import annotations

import itertools
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edgegw.records import SensorWindow
from edgegw.throttle import Throttle, as_sensor_window


def test_readings_within_one_interval_become_one_window_with_their_statistics() -> None:
    th = Throttle(0.1)
    assert th.poll(10.0) == []
    for i, v in enumerate([3.0, 1.0, 4.0, 1.5]):
        th.add("temp", v, 10.0 + i / 100)
    assert th.deadline == pytest.approx(10.1)
    assert th.poll(10.05) == []  # the window is still open
    (w,) = th.poll(10.1)
    assert (w.channel, w.last, w.min, w.max, w.count) == ("temp", 1.5, 1.0, 4.0, 4)
    assert w.mean == pytest.approx(9.5 / 4)
    assert (w.t0, w.t1) == pytest.approx((10.0, 10.1))
    assert w.last_ts == pytest.approx(10.03)
    assert th.deadline is None  # nothing open, nothing to wake up for


def test_each_channel_gets_its_own_window_and_idle_channels_emit_nothing() -> None:
    th = Throttle(1.0)
    th.poll(0.0)
    th.add("a", 1.0, 0.1)
    th.add("b", 2.0, 0.2)
    th.add("a", 3.0, 0.3)
    windows = {w.channel: w for w in th.poll(1.0)}
    assert set(windows) == {"a", "b"}
    assert windows["a"].count == 2 and windows["b"].count == 1
    th.add("a", 5.0, 1.5)
    assert [w.channel for w in th.poll(2.0)] == ["a"]


def test_readings_added_after_a_poll_belong_to_the_window_containing_that_time() -> None:
    th = Throttle(1.0)
    th.poll(0.0)
    th.add("x", 1.0, 0.5)
    # The driver polls at 1.2 before adding what arrived at 1.2: the first window closes
    # with only the earlier reading and the new one opens the next window.
    (w1,) = th.poll(1.2)
    th.add("x", 2.0, 1.2)
    assert (w1.count, w1.t0, w1.t1) == (1, 0.0, 1.0)
    (w2,) = th.poll(2.0)
    assert (w2.count, w2.last, w2.t0, w2.t1) == (1, 2.0, 1.0, 2.0)


def test_a_late_poll_closes_one_window_spanning_the_missed_intervals() -> None:
    th = Throttle(0.1)
    th.poll(5.0)
    th.add("x", 1.0, 5.0)
    (w,) = th.poll(5.55)
    assert (w.t0, w.t1, w.count) == pytest.approx((5.0, 5.5, 1))
    assert th.poll(5.58) == []


def test_readings_before_the_first_poll_are_emitted_at_it() -> None:
    th = Throttle(0.5)
    th.add("x", 7.0, 1.0)
    assert th.deadline is not None and th.deadline < 0  # due immediately
    (w,) = th.poll(3.2)
    assert w.count == 1 and w.t1 == 3.2


def test_flush_emits_what_is_open_and_the_counts_add_up() -> None:
    th = Throttle(10.0)
    th.poll(0.0)
    for i in range(5):
        th.add("x", float(i), i)
    assert th.poll(1.0) == []
    (w,) = th.flush()
    assert w.count == 5 and th.pending == 0
    assert th.flush() == []


@given(st.lists(st.tuples(st.sampled_from("abc"), st.floats(-1e6, 1e6),
                          st.floats(0, 0.5)), max_size=300),
       st.floats(0.01, 2.0))
def test_counts_add_up_exactly_whatever_the_timing(readings, interval) -> None:
    th = Throttle(interval)
    now = 1000.0
    out = []
    sums: dict[str, float] = {}
    for ch, value, dt in readings:
        now += dt
        out += th.poll(now)
        th.add(ch, value, now)
        sums[ch] = sums.get(ch, 0.0) + value
    out += th.flush(now + 1)
    assert sum(w.count for w in out) == len(readings)
    for ch in "abc":
        mine = [w for w in out if w.channel == ch]
        assert sum(w.count for w in mine) == sum(1 for r in readings if r[0] == ch)
        assert sum(w.mean * w.count for w in mine) == pytest.approx(sums.get(ch, 0.0),
                                                                     rel=1e-6, abs=1e-3)
        for w in mine:
            tol = 1e-9 * max(1.0, abs(w.mean))
            assert w.min - tol <= w.mean <= w.max + tol
            assert w.t0 <= w.t1
    # windows of one channel never overlap
    for ch in "abc":
        spans = sorted((w.t0, w.t1) for w in out if w.channel == ch)
        for (_, a_end), (b_start, _) in itertools.pairwise(spans):
            assert a_end <= b_start + 1e-9


def test_1khz_for_ten_seconds_at_10hz_is_a_hundred_windows_of_a_hundred() -> None:
    th = Throttle(0.1)
    rng = random.Random(3)
    out = []
    for i in range(10_000):
        now = 100.0 + i / 1000 + 1e-7
        out += th.poll(now)
        th.add("handler.temp", 25 + rng.gauss(0, 0.1), now)
    out += th.poll(110.0 + 1e-7)
    assert len(out) == 100
    assert {w.count for w in out} == {100}


def test_the_adapter_makes_a_sensor_window_record() -> None:
    th = Throttle(1.0)
    th.poll(0.0)
    th.add("prober.chuck_temp", 80.5, 0.3)
    (w,) = th.poll(1.0)
    rec = as_sensor_window(w, "mqtt1", "degC")
    assert isinstance(rec, SensorWindow)
    assert rec == SensorWindow("mqtt1", 1.0, "prober.chuck_temp", 80.5, 80.5, 80.5, 80.5, 1,
                               0.0, 1.0, "degC")


def test_a_bad_interval_is_refused() -> None:
    with pytest.raises(ValueError):
        Throttle(0)
