"""No gateway's input can crowd out another's in the hub's live state (livecaps2).

Every cap of the live state a gateway can fill with invented names or numbers is its own,
or what leaves memory for it is of the gateway holding the most: sensor channels
(``max_sensors``, hub-wide: the oldest channel of the gateway holding the most makes
room), a lot's tests (``max_tests_per_lot``, per gateway), a wafer's dies
(``max_dies_per_wafer``), die values and count keys (per gateway), and the closed lots and
wafers a new one pushes out (only of a gateway holding as many).  In each test gateway A
floods and gateway B's new channel, test, die, value, key or closed lot still lands or
stays (docs/configuration.md, docs/live-topics.md "Caps: what one gateway can fill").
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import cbor2
from livetools import Feed
from livetools import made as made_in_frames

from edgegw.hub.checkpoint import capture, restore
from edgegw.hub.live import LiveState
from edgegw.metrics import Metrics
from edgegw.records import (
    LotEnd,
    LotStart,
    ParametricResult,
    PartResult,
    SensorReading,
    WaferEnd,
    WaferStart,
)

IGNORED = "hub_state_records_ignored_total"


def ptr(lot: str, test: int, value: float, site: int = 0, ts: float = 1.0
        ) -> ParametricResult:
    return ParametricResult("tester", ts, lot, 1, site, "", test, f"T{test}", value, 0.0,
                            10.0, "V", True)


def part(lot: str, wafer: str, x: int, y: int = 0, ts: float = 1.0, site: int = 0,
         hard: int = 1) -> PartResult:
    return PartResult("tester", ts, lot, wafer, 1, site, f"P{x}/{y}", x, y, hard, hard, True)


def made(metrics: Metrics, **caps: Any) -> tuple[LiveState, Feed, list[tuple[str, Any]]]:
    """(frames of 500 records, as a gateway sends them)"""
    return made_in_frames(metrics, frame=500, **caps)


def reading(channel: str, value: float = 1.0) -> SensorReading:
    return SensorReading("mqtt", 1.0, channel, value, "C")


def test_a_gateway_inventing_channels_leaves_another_its_new_channels() -> None:
    metrics = Metrics()
    state, feed, published = made(metrics, max_sensors=100)
    feed("B", [reading(f"b{i}") for i in range(10)])
    feed("A", [reading(f"a{i}") for i in range(5_000)])  # invented names
    assert len(state.sensors) == 100
    assert all(f"b{i}" in state.sensors for i in range(10))  # B's stay
    # A's channels beyond its share were not kept, and counted
    assert metrics.counter(IGNORED).get(reason="too_many_sensors") == 5_000 - 90
    published.clear()
    # B's new channels land: each pushes out one of A's, the oldest
    feed("B", [reading(f"b-new{i}", 2.0) for i in range(20)])
    snap = state.snapshot("sensor/b-new19")
    assert snap is not None and snap["latest"]["last"] == 2.0
    assert len(state.sensors) == 100
    assert [f"a{i}" in state.sensors for i in range(20)] == [False] * 20
    assert ("sensor/a0", {"status": "evicted"}) in published
    assert metrics.counter("hub_state_sensors_evicted_total").total() == 20
    # until the two hold as many: then neither pushes out the other's
    feed("B", [reading(f"b-more{i}") for i in range(100)])
    held = [ch[0] for ch in state.sensors]
    assert abs(held.count("a") - held.count("b")) <= 1
    feed("A", [reading(f"a-late{i}") for i in range(10)])
    assert not any(f"a-late{i}" in state.sensors for i in range(10))
    # an existing channel of either goes on taking points
    feed("A", [reading("a89", 3.0)])
    assert state.snapshot("sensor/a89")["latest"]["last"] == 3.0  # type: ignore[index]


def test_the_channels_makers_survive_a_checkpoint() -> None:
    state, feed, _ = made(Metrics(), max_sensors=50)
    feed("A", [reading(f"a{i}") for i in range(60)])
    restored, feed2, _ = made(Metrics(), max_sensors=50)
    restore(restored, cbor2.loads(cbor2.dumps(capture(state))))
    feed2("A", [reading("a-new")])
    assert "a-new" not in restored.sensors  # A is still at the cap
    feed2("B", [reading("b0")])
    assert "b0" in restored.sensors and "a0" not in restored.sensors


def test_a_gateway_inventing_tests_leaves_another_its_new_tests_in_a_shared_lot() -> None:
    metrics = Metrics()
    state, feed, _ = made(metrics, max_tests_per_lot=50)
    feed("B", [LotStart("tester", 1.0, "L"), ptr("L", 1, 1.0)])
    feed("A", [ptr("L", 1_000 + i, 1.0) for i in range(500)])  # invented test numbers
    assert metrics.counter(IGNORED).get(reason="too_many_tests") == 450
    feed("B", [ptr("L", 2, 5.0), ptr("L", 3, 6.0)])  # B's new tests
    snap = state.snapshot("test/L/2")
    assert snap is not None and snap["count"] == 1 and snap["mean"] == 5.0
    assert state.snapshot("test/L/3") is not None
    assert metrics.counter(IGNORED).get(reason="too_many_tests") == 450
    # a test A made goes on taking A's and B's values; A makes no more
    feed("B", [ptr("L", 1_000, 3.0)])
    assert state.snapshot("test/L/1000")["count"] == 2  # type: ignore[index]
    feed("A", [ptr("L", 9_999, 1.0)])
    assert state.snapshot("test/L/9999") is None
    # after a restart too
    restored, feed2, _ = made(Metrics(), max_tests_per_lot=50)
    restore(restored, cbor2.loads(cbor2.dumps(capture(state))))
    feed2.rid = dict(feed.rid)
    feed2("A", [ptr("L", 9_998, 1.0)])
    feed2("B", [ptr("L", 4, 1.0)])
    assert restored.snapshot("test/L/9998") is None
    assert restored.snapshot("test/L/4") is not None


def test_a_gateway_inventing_dies_leaves_another_its_new_dies_in_a_shared_wafer() -> None:
    metrics = Metrics()
    state, feed, _ = made(metrics, max_dies_per_wafer=200)
    feed("B", [LotStart("tester", 1.0, "L"), WaferStart("tester", 1.0, "L", "W")]
         + [part("L", "W", i, 1) for i in range(10)])
    feed("A", [part("L", "W", 1_000 + i) for i in range(1_000)])  # invented X/Y
    assert metrics.counter(IGNORED).get(reason="too_many_dies") == 800
    wafer = state.snapshot("lot/L/wafer/W")
    assert wafer is not None and wafer["die_count"] == 210
    feed("B", [ptr("L", 7, 4.0), part("L", "W", 50, 1)])  # B's new die, with its value
    wafer = state.snapshot("lot/L/wafer/W")
    assert wafer is not None and wafer["die_count"] == 211
    assert [50, 1, 1, 1, True, 0] in wafer["dies"]
    assert state.lots["L"].wafers["W"].values[7] == {(50, 1): 4.0}
    assert metrics.counter(IGNORED).get(reason="too_many_dies") == 800
    feed("A", [part("L", "W", 5_000)])
    assert metrics.counter(IGNORED).get(reason="too_many_dies") == 801
    # a single gateway's wafer: the cap as it was
    for i in range(300):
        feed("C", [part("LC", "WC", i)])
    assert state.snapshot("lot/LC/wafer/WC")["die_count"] == 200  # type: ignore[index]


def test_a_gateway_filling_a_wafers_die_values_leaves_another_its_values() -> None:
    """A wafer keeps 20,000 die values (test, die) for its map by test value: one
    gateway's invented tests on its dies took them all from another's in the wafer."""
    state, feed, _ = made(Metrics())
    records: list[Any] = [LotStart("tester", 1.0, "L"), WaferStart("tester", 1.0, "L", "W")]
    for x in range(100):  # 100 dies x 210 tests: more than the 20,000 values a wafer keeps
        records += [ptr("L", t, float(t)) for t in range(210)]
        records.append(part("L", "W", x))
    feed("A", records)
    wafer = state.lots["L"].wafers["W"]
    assert sum(len(v) for v in wafer.values.values()) == 20_000
    feed("B", [ptr("L", 5, 42.0, site=1), part("L", "W", 500, 5, site=1)])
    assert wafer.values[5][(500, 5)] == 42.0
    assert sum(len(v) for v in wafer.values.values()) == 20_001
    # A makes no more
    feed("A", [ptr("L", 5, 1.0), part("L", "W", 600)])
    assert (600, 0) not in wafer.values[5]


def test_a_gateway_inventing_site_and_bin_numbers_leaves_another_its_keys() -> None:
    metrics = Metrics()
    state, feed, published = made(metrics)
    feed("A", [part("L", "W", i, site=i, hard=i) for i in range(3_000)])
    dropped = metrics.counter("hub_state_tally_keys_dropped_total").total()
    assert dropped == 2 * 5 * (3_000 - 1_024)
    published.clear()
    # B's part on a new site and bin, in the same wafer
    feed("B", [part("L", "W", 0, 1, site=7_000, hard=7_000)])
    snap = state.snapshot("lot/L/wafer/W")
    assert snap is not None
    assert snap["sites"]["7000"]["dies"] == 1 and snap["hard_bins"]["7000"] == 1
    assert snap["soft_bins_tested"]["7000"] == 1
    assert state.snapshot("lot/L")["hard_bins"]["7000"] == 1  # type: ignore[index]
    assert metrics.counter("hub_state_tally_keys_dropped_total").total() == dropped
    # A's new numbers stay out, after a restart too
    restored, feed2, _ = made(Metrics())
    restore(restored, cbor2.loads(cbor2.dumps(capture(state))))
    feed2.rid = dict(feed.rid)
    feed2("A", [part("L", "W", 9_000, site=9_000, hard=9_000)])
    feed2("B", [part("L", "W", 9_001, site=9_001, hard=9_001)])
    snap = restored.snapshot("lot/L/wafer/W")
    assert snap is not None and "9000" not in snap["sites"] and "9001" in snap["sites"]


def test_a_gateway_making_lots_does_not_push_out_another_gateways_closed_lot() -> None:
    state, feed, _ = made(Metrics(), max_lots=2)
    feed("B", [LotStart("tester", 1.0, "LB"), part("LB", "W", 0), LotEnd("tester", 2.0, "LB")])
    for i in range(6):  # A's lots, each closed at once
        feed("A", [LotStart("tester", 3.0 + i, f"LA{i}"), part(f"LA{i}", "W", 0, ts=3.0 + i),
                   LotEnd("tester", 3.0 + i, f"LA{i}")])
    assert "LB" in state.lots  # A's own closed lots made the room
    assert len(state.lots) == 2
    for i in range(20):  # and open ones: the cap bends, then A's own go
        feed("A", [LotStart("tester", 10.0 + i, f"LO{i}"), part(f"LO{i}", "W", 0)])
    assert "LB" in state.lots
    assert len(state.lots) <= 4 * 2 + 1
    # B's own next lot pushes out B's closed one, as before
    feed("B", [LotStart("tester", 50.0, "LB2")])
    assert "LB" not in state.lots


def test_a_gateway_making_wafers_does_not_archive_another_gateways_closed_wafer() -> None:
    state, feed, _ = made(Metrics(), max_wafers_per_lot=3)
    feed("B", [LotStart("tester", 1.0, "L"), WaferStart("tester", 1.0, "L", "WB"),
               part("L", "WB", 0), WaferEnd("tester", 2.0, "L", "WB")])
    for i in range(10):  # A's wafers, each closed
        feed("A", [WaferStart("tester", 3.0 + i, "L", f"WA{i}"),
                   part("L", f"WA{i}", 0, ts=3.0 + i), WaferEnd("tester", 3.0 + i, "L", f"WA{i}")])
    assert "WB" in state.lots["L"].wafers
    assert state.snapshot("lot/L/wafer/WB")["status"] == "closed"  # type: ignore[index]


def test_a_checkpoint_of_an_older_hub_restores() -> None:
    """Without the channels' makers, the gateways' tests and keys (an older hub's): it
    restores, every gateway may make its full count more, and the caps hold from there."""
    state, feed, _ = made(Metrics(), max_sensors=5, max_tests_per_lot=5)
    feed("A", [reading(f"a{i}") for i in range(5)] + [ptr("L", t, 1.0) for t in range(5)]
         + [part("L", "W", 0)])
    data = cbor2.loads(cbor2.dumps(capture(state)))
    del data["sensor_gateways"]
    for lot in data["lots"]:
        del lot["tests_of"]
        for row in [lot["tally"]] + [w["tally"] for w in lot["wafers"]]:
            del row[12:]
    restored, feed2, _ = made(Metrics(), max_sensors=5, max_tests_per_lot=5)
    restore(restored, data)
    feed2.rid = dict(feed.rid)
    feed2("A", [reading("a-new"), ptr("L", 99, 1.0)])
    assert "a-new" in restored.sensors and len(restored.sensors) == 5
    assert restored.snapshot("test/L/99") is not None
    assert restored.snapshot("lot/L/wafer/W")["die_count"] == 1  # type: ignore[index]


def test_the_hub_takes_its_sensor_and_test_caps_from_its_config(tmp_path: Path) -> None:
    """``live.max_sensors`` and ``live.max_tests_per_lot`` reach the hub's live state."""
    from edgegw.config import build
    from edgegw.hub import Hub, HubConfig

    config = build(HubConfig, {"hub": {"port": 0, "data_dir": str(tmp_path)},
                               "live": {"max_sensors": 7, "max_tests_per_lot": 11}})
    hub = Hub(config)
    assert (hub.state.max_sensors, hub.state.max_tests_per_lot) == (7, 11)
