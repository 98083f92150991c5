"""No gateway can grow the hub's live state without bound or push out another's.

A wafer keeps at most ``max_dies_per_wafer`` dies: a gateway sending part results with
invented X/Y (hostile or broken) made the map -- its memory, its snapshot to every new
dashboard client -- grow without bound.  Over ``max_lots`` and ``max_wafers_per_lot``,
what leaves memory while everything is being tested is of the gateway holding the most,
and a lot is idle by its own gateways' record times: a gateway making lots or wafers by
the thousand, or dating its records a day ahead, pushed out another gateway's lot or
wafer under test (whose later records were then not applied).  Values waiting for their
part results in a lot that leaves memory, or of a part result not applied, are counted
(docs/live-topics.md, "Caps: what one gateway can fill").
"""

from __future__ import annotations

import json
from typing import Any

import cbor2
from livetools import made

from edgegw.hub.checkpoint import capture, decode, encode, restore
from edgegw.hub.live import LiveState
from edgegw.metrics import Metrics
from edgegw.records import LotEnd, LotStart, ParametricResult, PartResult, WaferStart

CAP = 500  # dies per wafer, for the tests (the default, 200,000, is the same code)
IGNORED = "hub_state_records_ignored_total"
DROPPED = "hub_state_part_values_dropped_total"


def ptr(lot: str, site: int, value: float, ts: float) -> ParametricResult:
    return ParametricResult("tester", ts, lot, 1, site, "", 7, "T7", value, 0.0, 10.0, "V",
                            True)


def part(lot: str, wafer: str, x: int, y: int, ts: float, site: int = 0) -> PartResult:
    return PartResult("tester", ts, lot, wafer, 1, site, f"P{x}/{y}", x, y, 1, 1, True)


def die_frames(lot: str, wafer: str, n: int, ts: float, x0: int = 0) -> list[list[Any]]:
    """``n`` parts of ``wafer`` at X x0.., Y 0, 100 a frame, each after its test's value."""
    recs: list[Any] = [WaferStart("tester", ts, lot, wafer)]
    for i in range(n):
        recs += [ptr(lot, 0, 1.0 + i % 7, ts), part(lot, wafer, x0 + i, 0, ts)]
    return [recs[k:k + 200] for k in range(0, len(recs), 200)]


def snapshot_bytes(state: LiveState, topic: str) -> int:
    snap = state.snapshot(topic)
    assert snap is not None
    return len(json.dumps(snap))


def test_invented_dies_beyond_the_cap_are_refused_and_counted() -> None:
    metrics = Metrics()
    state, feed, published = made(metrics, max_dies_per_wafer=CAP)
    feed("B", [LotStart("tester", 1.0, "LB")])
    for frame in die_frames("LB", "WB", 300, 1.0):
        feed("B", frame)
    b_before = state.snapshot("lot/LB/wafer/WB")
    feed("A", [LotStart("tester", 1.0, "LA")])
    for frame in die_frames("LA", "WA", CAP, 1.0):
        feed("A", frame)
    size_at_cap = snapshot_bytes(state, "lot/LA/wafer/WA")
    published.clear()
    # then 5,000 more invented X/Y (with their tests' values, as a tester sends them)
    for frame in die_frames("LA", "WA", 5_000, 2.0, x0=10_000):
        feed("A", frame)
    wafer = state.lots["LA"].wafers["WA"]
    assert len(wafer.dies) == CAP
    snap = state.snapshot("lot/LA/wafer/WA")
    assert snap is not None and len(snap["dies"]) == CAP and snap["die_count"] == CAP
    assert snap["parts"] == CAP  # (a part not applied changes no count)
    assert all(x < 10_000 for x, *_ in snap["dies"])  # the dies it had stay
    assert metrics.counter(IGNORED).get(reason="too_many_dies") == 5_000
    # their values left with them, not joined to a later part of their site
    assert metrics.counter(DROPPED).total() == 5_000
    assert state.warnings()["reasons"]["too_many_dies"]["count"] == 5_000
    # the snapshot a new dashboard client gets stays the size of the capped map, and no
    # delta after the cap carries a die
    assert snapshot_bytes(state, "lot/LA/wafer/WA") <= size_at_cap + 100
    assert all(not d.get("dies") for t, d in published if t == "lot/LA/wafer/WA")
    # a retest of a die the wafer has is still applied, and its delta carries it
    feed("A", [part("LA", "WA", 0, 0, 3.0)])
    assert state.snapshot("lot/LA/wafer/WA")["retests"] == 1  # type: ignore[index]
    assert [d["dies"] for t, d in published if t == "lot/LA/wafer/WA"][-1] \
        == [[0, 0, 1, 1, True, 0]]
    # another gateway's wafer: as it was, and it takes new dies
    assert state.snapshot("lot/LB/wafer/WB") == b_before
    for frame in die_frames("LB", "WB", 10, 4.0, x0=300):
        feed("B", frame)
    assert len(state.lots["LB"].wafers["WB"].dies) == 310


def test_a_flood_over_the_cap_survives_a_checkpoint() -> None:
    """A restart restores the capped wafer and the refusals' count: the flood goes on
    being refused, the wafer does not grow past the cap."""
    metrics = Metrics()
    state, feed, _ = made(metrics, max_dies_per_wafer=CAP)
    for frame in die_frames("LA", "WA", CAP + 50, 1.0):
        feed("A", frame)
    _, data = decode(encode({"frame_id": 1}, capture(state)))
    metrics2 = Metrics()
    restored, feed2, _ = made(metrics2, max_dies_per_wafer=CAP)
    restore(restored, data)
    feed2.rid = dict(feed.rid)
    assert restored.warnings()["reasons"]["too_many_dies"]["count"] == 50
    for frame in die_frames("LA", "WA", 1_000, 2.0, x0=50_000):
        feed2("A", frame)
    assert len(restored.lots["LA"].wafers["WA"].dies) == CAP
    assert restored.warnings()["reasons"]["too_many_dies"]["count"] == 1_050
    assert metrics2.counter(IGNORED).get(reason="too_many_dies") == 1_000


def test_a_gateway_making_lots_pushes_out_its_own_not_another_lot_under_test() -> None:
    metrics = Metrics()
    state, feed, _ = made(metrics, max_lots=2)
    feed("B", [LotStart("tester", 100.0, "LB")])
    for frame in die_frames("LB", "WB", 20, 100.0):
        feed("B", frame)
    b_before = state.snapshot("lot/LB/wafer/WB")
    # A: 40 lots, each being tested (open, recent); its records dated a day ahead, which
    # made every other lot "idle" on A's clock
    for i in range(40):
        feed("A", [LotStart("tester", 100.0 + 86_400 + i, f"LA{i}"),
                   part(f"LA{i}", "W", 0, 0, 100.0 + 86_400 + i)])
    assert "LB" in state.lots
    assert len(state.lots) <= 4 * state.max_lots + 1
    # B's lot goes on: every die and value of it, and its next parts
    for frame in die_frames("LB", "WB", 5, 101.0, x0=20):
        feed("B", frame[1:] if frame[0].__class__ is WaferStart else frame)
    snap = state.snapshot("lot/LB/wafer/WB")
    assert snap is not None and snap["die_count"] == 25
    assert snap["dies"][:20] == b_before["dies"]  # type: ignore[index]
    test = state.snapshot("test/LB/7")
    assert test is not None and test["count"] == 25
    assert test["wafers"][0][:2] == ["WB", 25]
    assert len(state.lots["LB"].wafers["WB"].values[7]) == 25
    assert not state.not_applied.get("evicted_lot")


def test_a_gateway_making_wafers_in_a_shared_lot_archives_its_own() -> None:
    metrics = Metrics()
    state, feed, _ = made(metrics, max_wafers_per_lot=3)
    feed("B", [LotStart("tester", 1.0, "L")])
    for frame in die_frames("L", "WB", 10, 1.0):
        feed("B", frame)
    for i in range(30):  # open wafers, each newer than B's
        feed("A", [WaferStart("tester", 2.0 + i, "L", f"WA{i}"), part("L", f"WA{i}", 0, 0,
                                                                      2.0 + i)])
    assert "WB" in state.lots["L"].wafers
    for frame in die_frames("L", "WB", 5, 50.0, x0=10):
        feed("B", frame[1:] if frame[0].__class__ is WaferStart else frame)
    assert not state.not_applied.get("archived_wafer")
    wafer = state.lots["L"].wafers["WB"]
    assert len(wafer.dies) == 15 and len(wafer.values[7]) == 15
    # and after a restart: the wafers' makers are kept
    restored, feed2, _ = made(Metrics(), max_wafers_per_lot=3)
    restore(restored, cbor2.loads(cbor2.dumps(capture(state))))
    feed2.rid = dict(feed.rid)
    feed2("A", [WaferStart("tester", 99.0, "L", "WA99"), part("L", "WA99", 0, 0, 99.0)])
    assert "WB" in restored.lots["L"].wafers


def test_values_waiting_in_a_lot_that_leaves_memory_are_counted() -> None:
    metrics = Metrics()
    state, feed, _ = made(metrics, max_lots=1)
    feed("B", [LotStart("tester", 1.0, "L1")] + [ptr("L1", s, 1.0, 1.0) for s in range(6)])
    feed("B", [LotEnd("tester", 2.0, "L1")])
    assert metrics.counter(DROPPED).total() == 0
    feed("B", [LotStart("tester", 3.0, "L2")])  # L1, closed, leaves memory
    assert "L1" not in state.lots
    assert metrics.counter(DROPPED).total() == 6


KEYS = 1_024  # distinct site numbers, and of each kind of bin, a wafer's or lot's counts keep


def invented(lot: str, wafer: str, n: int, first: int = 0) -> list[list[Any]]:
    """``n`` parts, each with a site and bin number of its own, 500 a frame."""
    recs = [PartResult("tester", 1.0, lot, wafer, 1, first + i, "", first + i, 0,
                       first + i, first + i, i % 2 == 0) for i in range(n)]
    return [recs[k:k + 500] for k in range(0, n, 500)]


def test_invented_site_and_bin_numbers_keep_every_delta_small() -> None:
    """Every wafer and lot delta carries its per-site and per-bin counts whole: a key per
    site or bin number a gateway invents made each one grow with the wafer (at 200,000
    dies: 14.5 MB of JSON a delta, 1.8 s a one-part frame)."""
    metrics = Metrics()
    state, feed, published = made(metrics)
    for frame in die_frames("LB", "WB", 40, 1.0):
        feed("B", frame)
    b_before = state.snapshot("lot/LB/wafer/WB")
    for frame in invented("LA", "WA", 3_000):
        feed("A", frame)
    snap = state.snapshot("lot/LA/wafer/WA")
    assert snap is not None and snap["die_count"] == snap["parts"] == 3_000
    assert snap["good"] == 1_500  # the totals count every part
    for key in ("sites", "hard_bins", "soft_bins", "hard_bins_tested", "soft_bins_tested"):
        assert len(snap[key]) == KEYS, key
    lot = state.snapshot("lot/LA")
    assert lot is not None and len(lot["sites"]) == len(lot["hard_bins"]) == KEYS
    # each part over the cap: its site, hard and soft bin (final and tested) not kept
    assert metrics.counter("hub_state_tally_keys_dropped_total").total() \
        == 2 * 5 * (3_000 - KEYS)
    # a retest moves a die between counts it has keys in, and between none
    published.clear()
    feed("A", [PartResult("tester", 2.0, "LA", "WA", 1, 5, "", 0, 0, 7, 7, True),
               PartResult("tester", 2.0, "LA", "WA", 1, 2_000, "", 2_000, 0, 9, 9, True)])
    snap = state.snapshot("lot/LA/wafer/WA")
    assert snap is not None and "0" not in snap["hard_bins"]  # its one die is in bin 7 now
    assert snap["hard_bins"]["7"] == snap["hard_bins"]["9"] == 2
    assert sum(snap["hard_bins"].values()) == KEYS + 1  # bin 9's new die was in bin 2,000
    assert snap["sites"]["5"]["dies"] == 2 and "0" not in snap["sites"]
    delta = dict(published)["lot/LA/wafer/WA"]
    assert [row[:2] for row in delta["dies"]] == [[0, 0], [2_000, 0]]
    assert len(json.dumps(delta)) < 200_000
    assert state.snapshot("lot/LB/wafer/WB") == b_before


def test_the_counts_keys_stay_capped_after_a_checkpoint() -> None:
    metrics = Metrics()
    state, feed, _ = made(metrics)
    for frame in invented("LA", "WA", KEYS):
        feed("A", frame)
    # the dies of sites and bins 1..9 retested as site and bin 0: those keys count 0 now,
    # and stay taken (a key that came back would take a count it never had)
    feed("A", [PartResult("tester", 2.0, "LA", "WA", 1, 0, "", i, 0, 0, 0, True)
               for i in range(10)])
    restored, feed2, _ = made(Metrics())
    restore(restored, cbor2.loads(cbor2.dumps(capture(state))))
    feed2.rid = dict(feed.rid)
    tally = restored.lots["LA"].wafers["WA"].tally
    assert len(tally.site_dies) == len(tally.hard) == len(tally.soft_tested) == KEYS
    for frame in invented("LA", "WA", 500, first=KEYS):
        feed2("A", frame)
    snap = restored.snapshot("lot/LA/wafer/WA")
    assert snap is not None and snap["die_count"] == KEYS + 500
    wafer = restored.lots["LA"].wafers["WA"]
    assert len(wafer.tally.site_dies) == len(wafer.tally.hard) == KEYS
