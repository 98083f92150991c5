"""No gateway can burn the hub's CPU or crowd out another gateway's live figures.

Lots are shared: any gateway may send records of any lot id (``LotState.gateways``), so
a cap counted over a lot or a test is one gateway's to fill and another's to suffer.  The
caps on what invented site numbers make are per gateway (docs/live-topics.md, "Frames out
of order" and a test's ``sites``): waiting lists per lot, a test's sites, waiting
stretches.  And a frame that follows no previous one of its gateway moves only that
gateway's own waiting values: before, it scanned every waiting list of every lot, so a
gateway alternating its record ids frame by frame cost the Trio thread the whole waiting
set (up to 4,096 lists per lot) per frame (``bench/live_state.py --alternating``).
"""

from __future__ import annotations

import statistics
import time
from typing import Any

from edgegw.hub.checkpoint import capture, restore
from edgegw.hub.live import LiveState
from edgegw.metrics import Metrics
from edgegw.protocol import check_frame, encode_columns
from edgegw.records import LotEnd, MultiPinResult, ParametricResult, PartResult, WaferStart

# the caps docs/live-topics.md gives, per gateway
PENDING_SITES_PER_LOT = 4_096  # (head, site) lists waiting per lot
SITES_PER_TEST = 1_024  # sites of a test
WAITING_RUNS = 16  # stretches waiting
TESTS = (1, 2, 3)
LOTS = 12  # full of another gateway's waiting lists (the CPU test)


def _ptr(lot: str, site: int, test: int, value: float, ts: float = 1.0) -> ParametricResult:
    return ParametricResult("tester", ts, lot, 1, site, "", test, f"T{test}", value, 0.0,
                            10.0, "V", True)


def parts(lot: str, wafer: str, n: int, sites: int = 4) -> list[list[Any]]:
    """``n`` parts of ``lot``, one frame each (their tests, then the part result), the
    first frame starting the wafer; values differ per part."""
    frames: list[list[Any]] = [[WaferStart("tester", 1.0, lot, wafer)]]
    for i in range(n):
        site, ts = i % sites, 2.0 + i
        frames.append([_ptr(lot, site, t, 1.0 + (i * 7 + t) % 13 / 4, ts) for t in TESTS]
                      + [PartResult("tester", ts, lot, wafer, 1, site, f"P{i}", i % 25, i // 25,
                                    1, 1, True)])
    frames[1] = frames[0] + frames[1]
    return frames[1:]


def rids(frames: list[list[Any]], first: int = 1) -> list[tuple[int, list[Any]]]:
    """Each frame with its first record id, in record-id order."""
    out = []
    for records in frames:
        out.append((first, records))
        first += len(records)
    return out


def swapped(frames: list[tuple[int, list[Any]]]) -> list[tuple[int, list[Any]]]:
    """Pairwise swapped (2, 1, 4, 3, ...): every frame follows no previous one."""
    out = []
    for k in range(0, len(frames) - 1, 2):
        out += [frames[k + 1], frames[k]]
    return out + frames[len(out):]


def counter(metrics: Metrics, name: str) -> float:
    return metrics.counter(name, "").total()


def rounded(v: Any) -> Any:
    """Running statistics to 9 significant digits: values added in another order (frames
    out of order) may differ in the last bits (docs/live-topics.md); counts exact."""
    if isinstance(v, dict):
        return {k: rounded(x) for k, x in v.items()}
    if isinstance(v, list):
        return [rounded(x) for x in v]
    return float(f"{v:.9g}") if isinstance(v, float) else v


def own_figures(state: LiveState, lot: str, wafer: str, sites: range) -> dict[str, Any]:
    """What of ``lot`` comes from the well-formed gateway alone: per test its sites'
    rows and its wafer's row, the wafer's map by test value, the lot's counts."""
    figures: dict[str, Any] = {}
    for t in TESTS:
        snap = state.snapshot(f"test/{lot}/{t}")
        assert snap is not None
        figures[f"test {t} sites"] = {s: snap["sites"].get(str(s)) for s in sites}
        figures[f"test {t} wafers"] = snap["wafers"]
    figures["die values"] = state.lots[lot].wafers[wafer].values
    lot_snap = state.snapshot(f"lot/{lot}")
    assert lot_snap is not None
    figures["lot"] = {k: lot_snap[k] for k in ("die_count", "good", "parts", "sites")}
    return rounded(figures)


# ------------------------------------------------------------------ CPU


def test_a_frame_that_switches_stretch_costs_no_more_when_other_values_wait() -> None:
    """Another gateway keeps the lots' waiting lists full (4,096 sites of values with no
    part result, in each of 12 lots).  One gateway sends its frames in record-id order,
    another the same kind of frames pairwise swapped: each of its frames starts or joins
    a stretch.  Before, each such frame scanned all 49,152 waiting lists (2.0 ms, 11x an
    in-order frame here, 3 runs); now it moves only its own gateway's lists (1.06-1.08x):
    within 5x.  The two gateways' own figures are the same."""
    state = LiveState(lambda topic, delta: None, clock=lambda: 5_000.0, max_lots=LOTS + 2)
    state.on_records("other", 1, [_ptr(f"FULL{k}", 10_000 + s, 1, 0.5)
                                  for k in range(LOTS) for s in range(PENDING_SITES_PER_LOT)])
    assert sum(len(lot.pending) for lot in state.lots.values()) == LOTS * PENDING_SITES_PER_LOT
    ordered = rids(parts("LIN", "W1", 200))
    alternating = swapped(rids(parts("LALT", "W1", 200)))
    clock = time.process_time
    cpu: dict[str, list[float]] = {"in order": [], "alternating": []}
    for k in range(0, len(ordered), 2):  # taking turns, pair by pair: load hits both
        for gateway, frames in (("in order", ordered), ("alternating", alternating)):
            t0 = clock()
            for first, records in frames[k:k + 2]:
                state.on_records(gateway, first, records)
            cpu[gateway].append(clock() - t0)
    in_order, alt = (statistics.median(cpu[g]) for g in ("in order", "alternating"))
    assert alt <= 5 * in_order, f"alternating {alt * 1e6:.0f} µs, in order {in_order * 1e6:.0f}"
    assert own_figures(state, "LALT", "W1", range(4)) == own_figures(state, "LIN", "W1",
                                                                     range(4))
    # the other gateway's lists never moved
    assert sum(len(lot.pending) for lot in state.lots.values()) == LOTS * PENDING_SITES_PER_LOT


# ------------------------------------------------------------------ fairness


def test_a_gateway_at_every_cap_leaves_another_gateways_values_all_counted() -> None:
    """Gateway A scatters its record ids over more stretches than may wait, then invents
    site numbers in lot L -- more than a lot keeps waiting lists and a test keeps sites.
    Gateway B then tests parts of the same lot (sites 0..3), its frames out of order, a
    frame of A's with one more invented site between any two of them.  B's values are
    all in L's figures -- its sites' rows, its wafer's rows, its dies' values -- as when
    B is alone, and what is given up is A's only: one value a frame of A's, none of B's.
    (Before, A's lists and sites were L's and its tests' only ones: none of B's values
    reached its wafer or had a site row.)  A checkpoint on the way keeps each gateway's
    count of sites and where its values wait."""
    metrics = Metrics()
    state = LiveState(lambda topic, delta: None, clock=lambda: 5_000.0, metrics=metrics)
    a_rid = 10**6
    for i in range(WAITING_RUNS + 4):  # every frame a stretch of its own
        a_rid += 1_000
        state.on_records("A", a_rid, [_ptr("L", 20_000 + i, 1, 0.25)])
    invented = [_ptr("L", 10_000 + s, t, 0.5)
                for s in range(PENDING_SITES_PER_LOT + 100) for t in TESTS]
    state.on_records("A", a_rid + 1, invented)  # (its current stretch's)
    a_rid += len(invented)
    assert len(state.gateways["A"].waiting) == WAITING_RUNS
    assert len(state.lots["L"].pending) == PENDING_SITES_PER_LOT
    assert all(len(state.lots["L"].tests[t].by_site) == SITES_PER_TEST for t in TESTS)
    dropped = counter(metrics, "hub_state_part_values_dropped_total")
    not_kept = counter(metrics, "hub_state_site_values_dropped_total")
    assert dropped == 3 + 3 * 101  # 3 stretches given up; the sites over 4,095 more lists
    assert not_kept == 3 * (PENDING_SITES_PER_LOT + 100 - SITES_PER_TEST) + WAITING_RUNS + 4

    restored = LiveState(lambda topic, delta: None, clock=lambda: 5_000.0, metrics=metrics)
    restore(restored, capture(state))
    b_frames = swapped(rids(parts("L", "W1", 60)))
    for i, (first, records) in enumerate(b_frames):
        restored.on_records("B", first, records)
        a_rid += 1
        restored.on_records("A", a_rid, [_ptr("L", 30_000 + i, 1, 0.75)])
        if i == len(b_frames) // 2:
            half = restored
            restored = LiveState(lambda topic, delta: None, clock=lambda: 5_000.0,
                                 metrics=metrics)
            restore(restored, capture(half))

    alone = LiveState(lambda topic, delta: None, clock=lambda: 5_000.0)
    for first, records in rids(parts("L", "W1", 60)):
        alone.on_records("B", first, records)
    assert own_figures(restored, "L", "W1", range(4)) == own_figures(alone, "L", "W1",
                                                                     range(4))
    assert len(restored.gateways["A"].waiting) == WAITING_RUNS
    assert len(restored.lots["L"].tests[1].by_site) == SITES_PER_TEST + 4  # (B's 4)
    assert counter(metrics, "hub_state_part_values_dropped_total") == dropped + len(b_frames)
    assert counter(metrics, "hub_state_site_values_dropped_total") == not_kept + len(b_frames)


# ------------------------------------------------------------------ the metric


def test_values_of_sites_over_a_tests_cap_are_counted() -> None:
    """A test keeps the first 1,024 sites of a gateway; a value of a later one counts in
    the test's own figures only.  Those values were counted by no metric; now
    ``hub_state_site_values_dropped_total`` counts each, whichever way the frame is
    applied (columnar, records batched, one record at a time) and for multi-pin values."""
    n = SITES_PER_TEST + 10
    records: list[Any] = [_ptr("L", s, 1, 0.5) for s in range(n)]
    records += [MultiPinResult("tester", 1.0, "L", 1, s, "", 2, "M", [0.5, 0.25], 0.0, 1.0,
                               "V", None) for s in range(n)]
    for how in ("columns", "records", "one at a time"):
        metrics = Metrics()
        state = LiveState(lambda topic, delta: None, clock=lambda: 5_000.0, metrics=metrics,
                          batch_apply=how != "one at a time")
        if how == "columns":
            state.on_columns("gw", 1, check_frame(encode_columns(1, records), 100_000)[1])
        else:
            state.on_records("gw", 1, records)
        tests = state.lots["L"].tests
        assert tests[1].count == n and len(tests[1].by_site) == SITES_PER_TEST, how
        assert tests[2].count == 2 * n and len(tests[2].by_site) == SITES_PER_TEST, how
        assert counter(metrics, "hub_state_site_values_dropped_total") == 10 + 2 * 10, how
        # another gateway's sites are its own to make
        state.on_records("other", 1, [_ptr("L", n + 1, 1, 0.5)])
        assert len(tests[1].by_site) == SITES_PER_TEST + 1, how
        assert counter(metrics, "hub_state_site_values_dropped_total") == 30, how


def test_where_a_gateways_values_wait_is_only_lots_in_memory() -> None:
    """A gateway in record-id order for months never switches stretch: the lots it has
    values waiting in (what a switch would move) must not grow with every lot it ever
    tested -- a lot leaving memory leaves the set."""
    state = LiveState(lambda topic, delta: None, clock=lambda: 5_000.0, max_lots=2)
    rid = 1
    for k in range(20):
        frame = [_ptr(f"L{k}", 0, 1, 0.5), LotEnd("tester", 1.0, f"L{k}")]
        state.on_records("gw", rid, frame)
        rid += len(frame)
    assert len(state.lots) == 2
    assert state.gateways["gw"].pending_lots == set(state.lots)


def test_a_checkpoint_without_the_sites_counts_restores() -> None:
    """A checkpoint from before the per-gateway count of a test's sites (its test rows
    one field shorter) restores, and its sites count against no gateway."""
    state = LiveState(lambda topic, delta: None, clock=lambda: 5_000.0)
    state.on_records("gw", 1, [_ptr("L", s, 1, 0.5) for s in range(SITES_PER_TEST)])
    data = capture(state)
    for lot in data["lots"]:
        lot["tests"] = [row[:16] for row in lot["tests"]]
    restored = LiveState(lambda topic, delta: None, clock=lambda: 5_000.0)
    restore(restored, data)
    restored.on_records("gw", SITES_PER_TEST + 1, [_ptr("L", SITES_PER_TEST, 1, 0.5)])
    assert len(restored.lots["L"].tests[1].by_site) == SITES_PER_TEST + 1
    assert restored.snapshot("test/L/1") is not None
