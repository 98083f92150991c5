"""Live-state checkpoints: bytes that restore the same state a full replay builds.

The state is fed the simulated tester's lots (several lots, so some are evicted; many
wafers, so some are archived), sensor readings and gateway events; the alert engine
follows.  A checkpoint taken half way and restored into a fresh state, then fed the rest,
must answer every topic exactly as the state that saw everything.
"""

from __future__ import annotations

import dataclasses
import struct
from typing import Any

import pytest
from test_hub_state import DAY, first_pass, part, sim_records

from edgegw import sim
from edgegw.hub import checkpoint
from edgegw.hub.alerts import AlertEngine, AlertRuleConfig, AlertsConfig
from edgegw.hub.checkpoint import CheckpointError, WaferCache, capture, decode, encode, restore
from edgegw.hub.live import LiveState
from edgegw.records import GatewayEvent, LotEnd, LotStart, SensorReading, WaferEnd, WaferStart

RULES = AlertsConfig(rules=[
    AlertRuleConfig(name="fails", kind="consecutive_fails", priority="P1", count=3),
    AlertRuleConfig(name="share", kind="bin_share", priority="P2", min_parts=10,
                    min_wafers=2, recent_wafers=4),
])


def make_state() -> LiveState:
    engine = AlertEngine(RULES, lambda topic, delta: None)
    return LiveState(lambda topic, delta: None, alerts=engine, clock=lambda: 5_000.0,
                     max_lots=2, max_wafers_per_lot=3)


def history() -> list[tuple[str, list[Any]]]:
    """(gateway, records) frames: 4 lots of 5 wafers from two testers, sensors, events."""
    frames: list[tuple[str, list[Any]]] = []
    for n in range(4):
        profile = dataclasses.replace(sim.TesterProfile(), lot_id=f"LOT{n}", wafers=5,
                                      wafer_diameter_dies=8, seed=n)
        gw = f"gw{n % 2}"
        frames.extend((gw, batch) for batch in sim_records(profile))
        frames.append((gw, [SensorReading("probe", 1000.0 + n, "temp", 20.0 + n, "C"),
                            GatewayEvent("gateway", 1000.0 + n, "warning", "x", f"event {n}")]))
    return frames


def feed(state: LiveState, frames: list[tuple[str, list[Any]]], rids: dict[str, int]) -> None:
    for gw, records in frames:
        state.on_records(gw, rids.get(gw, 1), records, now=5_000.0)
        rids[gw] = rids.get(gw, 1) + len(records)


def everything(state: LiveState) -> dict[str, Any]:
    out = {topic: state.snapshot(topic) for topic in state.topics()}
    out["health"] = {k: v for k, v in state.health().items()
                     if k not in ("wafers_archived", "lots_evicted")}  # process counters
    out["runs"] = dict(state.alerts._runs) if state.alerts else None
    out["shares"] = {k: list(v) for k, v in state.alerts._shares.items()} if state.alerts else None
    out["evicted"] = list(state.evicted)
    return out


@pytest.mark.parametrize("cut_at", [0.3, 0.55, 0.8])
def test_a_restored_checkpoint_then_the_later_frames_equal_replaying_everything(
        cut_at: float) -> None:
    frames = history()
    cut = int(len(frames) * cut_at)
    full, rids_full = make_state(), {}
    feed(full, frames, rids_full)

    first, rids = make_state(), {}
    feed(first, frames[:cut], rids)
    blob = encode({"frame_id": cut}, capture(first))
    position, data = decode(blob)
    assert position == {"frame_id": cut}
    restored = make_state()
    # alerts come back from the history store, before the checkpoint (as in the hub)
    restored.alerts.restore([a.to_dict() for a in first.alerts.alerts.values()])
    cache = WaferCache()
    restore(restored, data, cache)
    assert everything(restored) == everything(first)
    assert capture(restored, cache) == capture(restored)  # primed, not stale
    feed(restored, frames[cut:], rids)
    assert everything(restored) == everything(full)
    assert capture(restored, cache) == capture(restored)
    assert len(full.evicted) >= 2 and any(lot.archived_wafers for lot in full.lots.values())


def retests() -> list[tuple[str, list[Any]]]:
    """Lot A tested and closed, then pushed out of memory by B and C; B's first wafer
    leaves memory for its fourth; then B's first wafer and A are tested again under their
    ids, days later: their failing die passes."""
    later = 10 + 3 * DAY
    frames: list[tuple[str, list[Any]]] = [("gw1", first_pass("A", "A-W01", 1.0))]
    for n in range(1, 5):
        wafer = f"B-W0{n}"
        frames.append(("gw1", [WaferStart("t", 2.0, "B", wafer, 1, 10 * n),
                               part(0, 0, 2, lot="B", wafer=wafer, ts=2.0),
                               part(1, 0, 1, lot="B", wafer=wafer, ts=2.0),
                               WaferEnd("t", 2.0, "B", wafer, 1, 10 * n + 5, 2, 1)]))
    frames.append(("gw1", [part(0, 0, 1, lot="C", wafer="C-W01", ts=3.0)]))
    frames.append(("gw1", [WaferStart("t", later, "B", "B-W01", 1, later),
                           part(0, 0, 1, lot="B", wafer="B-W01", ts=later),
                           WaferEnd("t", later, "B", "B-W01", 1, later + 5, 1, 1)]))
    frames.append(("gw1", [LotStart("t", later, "A", start_t=later)]))
    frames.append(("gw1", [WaferStart("t", later, "A", "A-W01", 1, later),
                           part(0, 0, 1, lot="A", wafer="A-W01", ts=later),
                           WaferEnd("t", later, "A", "A-W01", 1, later + 5, 1, 1),
                           LotEnd("t", later, "A", later + 5)]))
    return frames


@pytest.mark.parametrize("cut", range(1, 10))
def test_retests_of_a_lot_and_a_wafer_that_left_memory_count_the_same_across_a_checkpoint(
        cut: int) -> None:
    frames = retests()
    full, rids_full = make_state(), {}
    feed(full, frames, rids_full)
    # the reference: both back in memory as their next pass, nothing left out
    assert not full.not_applied
    lot_a = full.snapshot("lot/A")
    assert lot_a is not None and (lot_a["starts"], lot_a["counts_from"]) == (2, 10 + 3 * DAY)
    wafer_b = full.snapshot("lot/B/wafer/B-W01")
    assert wafer_b is not None and (wafer_b["starts"], wafer_b["die_count"]) == (2, 2)
    lot_b = full.snapshot("lot/B")
    assert lot_b is not None and (lot_b["die_count"], lot_b["good"], lot_b["retests"]) == (
        8, 5, 1)

    first, rids = make_state(), {}
    feed(first, frames[:cut], rids)
    _, data = decode(encode({"frame_id": cut}, capture(first)))
    restored = make_state()
    restored.alerts.restore([a.to_dict() for a in first.alerts.alerts.values()])
    restore(restored, data)
    feed(restored, frames[cut:], rids)
    assert everything(restored) == everything(full)


def test_unchanged_wafers_are_copied_once_and_a_changed_one_again() -> None:
    frames = history()
    state, rids = make_state(), {}
    feed(state, frames[: len(frames) // 2], rids)
    cache = WaferCache()
    one = capture(state, cache)
    two = capture(state, cache)
    dies_one = [w["dies"] for lot in one["lots"] for w in lot["wafers"]]
    dies_two = [w["dies"] for lot in two["lots"] for w in lot["wafers"]]
    assert all(a is b for a, b in zip(dies_one, dies_two, strict=True))
    feed(state, frames[len(frames) // 2:][:3], rids)
    three = capture(state, cache)
    fresh = capture(state)
    assert three == fresh  # reuse never serves a stale copy


def test_a_checkpoint_that_is_torn_foreign_or_of_another_version_is_refused_clearly() -> None:
    state, rids = make_state(), {}
    feed(state, history()[:20], rids)
    blob = encode({"frame_id": 20}, capture(state))
    with pytest.raises(CheckpointError, match="checksum"):
        decode(blob[:-10])
    with pytest.raises(CheckpointError, match="bad magic"):
        decode(b"SQLite format 3\0" + blob[16:])
    newer = struct.pack(">8sH", checkpoint.MAGIC, checkpoint.FORMAT_VERSION + 1) + blob[10:]
    with pytest.raises(CheckpointError, match=f"format {checkpoint.FORMAT_VERSION + 1}"):
        decode(newer)
    with pytest.raises(CheckpointError, match="too short"):
        decode(b"EG")
