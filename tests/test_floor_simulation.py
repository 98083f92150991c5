"""The simulated floor behaves like a floor: lot after lot, yield in a band with occasional
excursions (what the example alert rules are set for), and a sensor feed without a broker."""

from __future__ import annotations

import dataclasses
import statistics
from pathlib import Path
from typing import Any

import trio
import trio.testing

from edgegw.config import load
from edgegw.hub import HubConfig
from edgegw.hub.alerts import AlertEngine
from edgegw.hub.live import LiveState
from edgegw.metrics import Metrics
from edgegw.records import LotStart, Record, SensorWindow, WaferEnd
from edgegw.sim import (
    SimulatedConfig,
    SimulatedSensorsConfig,
    SimulatedSensorSource,
    simulated_batches,
)
from edgegw.sim.tester import TesterModel, TesterProfile, lot_profiles
from edgegw.sources import SourceContext, source_type

REPO = Path(__file__).resolve().parent.parent


def excursion_wafers(config: SimulatedConfig, lots: int) -> set[str]:
    """The wafers the tester model makes excursions of (the model is seeded)."""
    profile = TesterProfile(lot_id=config.lot_id, sites=config.sites, wafers=config.wafers,
                            wafer_diameter_dies=config.wafer_diameter_dies,
                            tests_per_part=config.tests_per_part, seed=config.seed)
    found = set()
    for lot in lot_profiles(profile, lots):
        model = TesterModel(lot)
        for ev in model.events():
            if ev.kind == "wafer_start" and model.excursion:
                found.add(ev.data)
    return found


def test_the_simulated_tester_tests_lot_after_lot_without_end() -> None:
    config = SimulatedConfig(wafers=2, wafer_diameter_dies=6, tests_per_part=2)
    lots = []
    for batch, _ in simulated_batches(config, "tester", clock=lambda: 0.0):
        lots += [r.lot_id for r in batch if isinstance(r, LotStart)]
        if len(lots) == 5:
            break
    assert lots == ["LOT0001", "LOT0002", "LOT0003", "LOT0004", "LOT0005"]
    ended = [r for b, _ in simulated_batches(dataclasses.replace(config, lots=3), "t")
             for r in b if isinstance(r, WaferEnd)]
    assert len(ended) == 3 * 2  # lots = 3: three lots of two wafers, then it ends


def test_wafer_yield_stays_in_a_band_and_the_example_rule_fires_on_excursions() -> None:
    """With conf/hub.toml's alert rules, 300 wafers (12 lots of 25) of the default simulated
    tester: yields stay in a band (no drift to 0 %), and the wafer-yield alert is raised
    for excursion wafers, not for every wafer."""
    hub = load(HubConfig, REPO / "conf" / "hub.toml")
    raised: list[dict[str, Any]] = []
    engine = AlertEngine(hub.alerts, lambda topic, delta: None,
                         sink=lambda e: raised.append(e) if e["event"] == "raised" else None)
    # nobody reads its updates: none is built (docs/live-topics.md, "Unwatched topics")
    state = LiveState(lambda topic, delta: None, alerts=engine, clock=lambda: 0.0,
                      wanted=lambda topic: False)
    config = SimulatedConfig(lots=12)
    clock = iter(range(1_000, 10**9))  # record times: one second per batch
    rid = 1
    yields: dict[str, float] = {}
    for batch, _ in simulated_batches(config, "tester", clock=lambda: float(next(clock))):
        state.on_records("ate-01", rid, batch, now=batch[0].ts)
        rid += len(batch)
        for r in batch:
            if isinstance(r, WaferEnd):
                yields[r.wafer_id] = r.good_count / r.part_count
    excursions = excursion_wafers(config, 12)
    normal = [y for w, y in yields.items() if w not in excursions]
    assert len(yields) == 300
    assert 0.86 < statistics.mean(normal) < 0.93, statistics.mean(normal)
    assert min(normal) > 0.75 and statistics.pstdev(normal) < 0.035  # a band, not a ramp
    assert 3 <= len(excursions) <= 30  # now and then, about one wafer in 25

    by_rule: dict[str, set[str]] = {}
    for event in raised:
        alert = event["alert"]
        by_rule.setdefault(alert["rule"], set()).add(alert["context"].get("wafer_id", ""))
    yield_alerts = by_rule.get("wafer-yield", set())
    # every excursion is caught ...
    assert excursions <= yield_alerts, excursions - yield_alerts
    # ... and the list is not always red: at most a handful of ordinary wafers dip below
    assert len(yield_alerts - excursions) <= 6, sorted(yield_alerts - excursions)
    assert len(yield_alerts) < len(yields) / 8


async def test_the_simulated_sensor_feed_sends_one_window_per_sensor_per_interval(
        autojump_clock: trio.testing.MockClock) -> None:
    """Fifty readings a second per sensor, throttled to one window a second: every reading
    is in exactly one window, named and with its unit (20 s on virtual time)."""
    assert source_type("simulated-sensors") is SimulatedSensorSource
    config = SimulatedSensorsConfig(tester="ate-07", rate=50.0, window_s=1.0)
    source = SimulatedSensorSource("sensors", config, SourceContext("gw", Metrics()))
    windows: list[SensorWindow] = []

    class Sink:
        async def put(self, records: list[Record], checkpoint: Any = None) -> None:
            windows.extend(r for r in records if isinstance(r, SensorWindow))

    with trio.move_on_after(20.5):
        await source.run(Sink())
    channels = {w.channel for w in windows}
    assert channels == {"ate-07.handler.temp", "ate-07.handler.humidity",
                        "ate-07.handler.air_pressure", "ate-07.prober.chuck_temp",
                        "ate-07.prober.vacuum"}
    per_channel = [sum(1 for w in windows if w.channel == ch) for ch in channels]
    assert all(20 <= n <= 22 for n in per_channel), per_channel  # + the partial ends
    # windows lie on a one-second grid; after the first (the source started inside it)
    # each holds 50 readings; one due exactly on a boundary may fall either side of it
    first = min(w.t0 for w in windows)
    whole = [w for w in windows if w.t0 > first and abs(w.t1 - w.t0 - 1.0) < 1e-6]
    assert len(whole) >= 5 * 19 and all(49 <= w.count <= 51 for w in whole)
    # the throttle's promise: the windows' counts add up to the readings taken (the
    # window still open when the source stopped aside)
    assert 0 <= source.readings - sum(w.count for w in windows) <= 5 * 50
    temp = [w for w in windows if w.channel == "ate-07.handler.temp"]
    assert all(w.unit == "degC" and 83 < w.mean < 87 and w.min <= w.mean <= w.max
               for w in temp)

