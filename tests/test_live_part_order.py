"""A part's parametric results join its part result by record id, whatever order frames
arrive in.

A part's results are the records of its (gateway, head, site) between its previous part
result and its own, by record id (STDF: the PTRs of a part come before its PRR).  The
gateway's batcher cuts frames anywhere -- often between a part's PTRs and its PRR -- and
after an outage it sends its newest frames first (the live lane) and the backlog after
(``edgegw/gateway/scheduler.py``).  So a PRR may arrive before the PTRs of its own part,
and the PTRs at the end of a backlog frame are followed, in arrival, by a part result of a
*later* part.  The live state must still give each die its own values (the wafer map by
test value) and each wafer its own per-test figures: the state of the in-order apply
(docs/live-topics.md, "Frames out of order").
"""

from __future__ import annotations

import itertools
import random
from typing import Any

import pytest
from test_split_order import FRAME_RECORDS, a_wafers_records, assert_same_state, in_order

from edgegw.hub import checkpoint as ckpt
from edgegw.hub.live import LiveState
from edgegw.metrics import Metrics
from edgegw.protocol import check_frame, encode_columns
from edgegw.records import ParametricResult, PartResult
from edgegw.sim import SimulatedConfig, simulated_batches
from tests.test_live_arrival_order import send_order


def stored_frames(records: list[Any], size: int = FRAME_RECORDS) -> list[tuple[int, list[Any]]]:
    """The gateway's frames (seq = index + 1): ``(first_rid, records)``."""
    return [(i + 1, records[i:i + size]) for i in range(0, len(records), size)]


def applied(frames: list[tuple[int, list[Any]]], order: list[int], columns: bool = False,
            state: LiveState | None = None) -> LiveState:
    state = state or LiveState(lambda topic, delta: None)
    for seq in order:
        first_rid, records = frames[seq - 1]
        if columns:
            body = encode_columns(first_rid, records)
            state.on_columns("ate-01", first_rid, check_frame(body, 100_000)[1], now=1.7e9)
        else:
            state.on_records("ate-01", first_rid, records, now=1.7e9)
    return state


def test_the_frames_are_cut_between_a_parts_results_and_its_part_result() -> None:
    """(What makes the order matter: a frame ending in PTRs whose PRR is in the next.)"""
    frames = stored_frames(a_wafers_records())
    assert len(frames) > 3
    for _, records in frames[:-1]:
        assert type(records[-1]) is ParametricResult


@pytest.mark.parametrize("columns", [False, True], ids=["records", "columns"])
def test_live_frames_first_then_the_backlog_equals_the_in_order_state(columns: bool) -> None:
    """Every place the outage can end: frames from ``live_from`` on are sent first."""
    records = a_wafers_records()
    frames = stored_frames(records)
    want = in_order(records)
    for live_from in range(2, len(frames) + 1):
        order = send_order(len(frames), live_from)
        assert order != sorted(order)
        assert_same_state(applied(frames, order, columns), want)


@pytest.mark.parametrize("size", [7, 23, 50])
def test_frames_in_any_order_equal_the_in_order_state(size: int) -> None:
    """Not only the scheduler's order: any permutation of frames cut anywhere."""
    records = a_wafers_records()
    frames = stored_frames(records, size)
    want = in_order(records)
    rng = random.Random(size)
    for _ in range(5):
        order = list(range(1, len(frames) + 1))
        rng.shuffle(order)
        assert_same_state(applied(frames, order), want)


def test_a_part_result_arriving_before_its_values_gets_them_when_they_arrive() -> None:
    """A frame holding only a part's PRR, applied before the frame of its PTRs: the die
    shows its values once they are in, not the next part's."""
    records = a_wafers_records()
    prr = next(i for i, r in enumerate(records) if type(r) is PartResult and i > 20)
    frames = [(1, records[:prr]), (prr + 1, records[prr:prr + 1]),
              (prr + 2, records[prr + 1:])]
    got = applied(frames, [2, 3, 1])
    assert_same_state(got, in_order(records))


def test_the_order_survives_a_checkpoint_cut_while_frames_are_out_of_order() -> None:
    """A partition's new owner restores a checkpoint cut between the live frames and the
    backlog, then applies the rest: the values still find their parts."""
    records = a_wafers_records()
    frames = stored_frames(records)
    want = in_order(records)
    for live_from in range(2, len(frames) + 1):
        order = send_order(len(frames), live_from)
        for cut in range(1, len(order)):
            before = applied(frames, order[:cut])
            restored = LiveState(lambda topic, delta: None)
            ckpt.restore(restored, ckpt.decode(ckpt.encode({}, ckpt.capture(before)))[1])
            assert_same_state(applied(frames, order[cut:], state=restored), want)


def test_values_waiting_for_their_part_are_bounded_and_counted_when_dropped() -> None:
    """Every frame out of order: each leaves values waiting at both of its ends.  Over the
    cap of waiting stretches per gateway the oldest stretch's values are dropped -- they
    never reach a wafer's figures, counted in ``hub_state_part_values_dropped_total`` --
    and every other figure still stands (the lot's own test statistics take every value
    on arrival)."""
    records = a_wafers_records()
    frames = stored_frames(records, 3)
    cap = 4
    # every other frame first, then the rest: each of the first half waits alone
    order = list(range(1, len(frames) + 1, 2)) + list(range(2, len(frames) + 1, 2))
    metrics = Metrics()
    got = applied(frames, order, state=LiveState(lambda t, d: None, metrics=metrics,
                                                   max_waiting_runs=cap))
    gw = got.gateways["ate-01"]
    assert len(frames) > 4 * cap and len(gw.waiting) <= cap
    dropped = metrics.counter("hub_state_part_values_dropped_total").total()
    assert dropped > 0
    want = in_order(records)
    for test_num, stats in want.lots["L3"].tests.items():
        mine = got.lots["L3"].tests[test_num]
        assert (mine.count, mine.min, mine.max) == (stats.count, stats.min, stats.max)
        assert mine.histogram.counts == stats.histogram.counts
    wafer_values = sum(r.n for t in got.lots["L3"].tests.values() for r in t.by_wafer.values())
    in_order_values = sum(r.n for t in want.lots["L3"].tests.values()
                          for r in t.by_wafer.values())
    waiting = sum(len(v) for v in got.lots["L3"].pending.values()) + sum(
        len(v) for run in gw.waiting for v in run.tails.values())
    assert wafer_values + waiting + dropped == in_order_values


@pytest.mark.parametrize("seed", range(6))
def test_lots_of_several_wafers_and_sites_in_any_order_equal_the_in_order_state(
        seed: int) -> None:
    """Two lots of up to three wafers, 1 to 8 sites, frames of any size in any order (the
    stretches waiting are not capped here: every value can find its part)."""
    rng = random.Random(seed)
    ticks = itertools.count()
    config = SimulatedConfig(seed=seed, sites=rng.choice([1, 2, 4, 8]), tests_per_part=3,
                             wafers=rng.choice([1, 2, 3]), lots=2, wafer_diameter_dies=5,
                             lot_id="LX")
    records = [r for batch, _ in simulated_batches(
        config, "tester", clock=lambda: 1.7e9 + next(ticks) * 0.01) for r in batch]
    frames = stored_frames(records, rng.choice([3, 5, 11, 17, 40]))
    order = list(range(1, len(frames) + 1))
    rng.shuffle(order)
    unbounded = LiveState(lambda topic, delta: None, max_waiting_runs=len(frames))
    assert_same_state(applied(frames, order, state=unbounded),
                      applied(frames, sorted(order)))


def test_units_per_hour_is_over_the_newest_parts_by_time_not_by_arrival() -> None:
    """``units_per_hour`` is over a lot's newest 500 parts: newest by record time, so a
    backlog applied after the live frames does not take the window's place."""
    ticks = itertools.count()
    config = SimulatedConfig(seed=5, sites=4, tests_per_part=1, wafers=6, lots=1,
                             wafer_diameter_dies=12, lot_id="LU")
    records = [r for batch, _ in simulated_batches(
        config, "tester", clock=lambda: 1.7e9 + next(ticks) * 0.01) for r in batch]
    assert sum(type(r) is PartResult for r in records) > 600
    frames = stored_frames(records, 40)
    n = len(frames)
    want = applied(frames, list(range(1, n + 1))).snapshot("lot/LU")
    for order in (send_order(n, n // 2), list(range(1, n + 1, 2)) + list(range(2, n + 1, 2))):
        got = applied(frames, order, state=LiveState(lambda t, d: None, max_waiting_runs=n))
        assert got.snapshot("lot/LU")["units_per_hour"] == want["units_per_hour"]
