"""Benchmark: how fast LiveState applies records (live, and the replay after a restart).

Feeds a simulated multi-site lot (parts with their parametric results, in frames of
--frame records, the way the hub applies them) through ``LiveState.on_records`` with a
publish callback that only counts, three ways:

* plain live state,
* with an alert engine holding one rule of every kind,
* the real galaxy-a530-lot2 file (decoded and mapped beforehand), if present.

Prints records/s (median of --runs runs), deltas published per frame, and the peak
memory of the state for the simulated lot.

    python bench/live_state.py [--runs 5] [--frame 2000] [--wafers 4]
"""

from __future__ import annotations

import argparse
import gzip
import os
import statistics
import time
import tracemalloc
from pathlib import Path
from typing import Any

from edgegw.hub.alerts import AlertEngine, AlertRuleConfig, AlertsConfig
from edgegw.hub.live import LiveState
from edgegw.records import LotEnd, LotStart, ParametricResult, PartResult, WaferEnd, WaferStart
from edgegw.sim.tester import TesterModel, TesterProfile

RULES = AlertsConfig(rules=[
    AlertRuleConfig(name="wy", kind="wafer_yield", threshold=0.5, min_parts=100),
    AlertRuleConfig(name="ly", kind="lot_yield", threshold=0.5, min_parts=100),
    AlertRuleConfig(name="cf", kind="consecutive_fails", count=20),
    AlertRuleConfig(name="gap", kind="site_yield_gap", threshold=0.3, min_parts=50),
    AlertRuleConfig(name="sbl", kind="bin_share", min_parts=100),
    AlertRuleConfig(name="cpk", kind="test_cpk", threshold=0.1, min_samples=30),
    AlertRuleConfig(name="temp", kind="sensor_range", high=100.0),
    AlertRuleConfig(name="gw", kind="gateway_offline", offline_s=60),
])


def sim_records(wafers: int) -> list[Any]:
    profile = TesterProfile(lot_id="BENCH", sites=8, wafers=wafers, wafer_diameter_dies=40,
                            tests_per_part=8, seed=11)
    out: list[Any] = []
    ts = 1_000.0
    for ev in TesterModel(profile).events():
        ts += 0.01
        if ev.kind == "lot_start":
            out.append(LotStart("sim", ts, "BENCH", profile.part_type))
        elif ev.kind == "wafer_start":
            out.append(WaferStart("sim", ts, "BENCH", ev.data))
        elif ev.kind == "touchdown":
            for p in ev.data:
                out.extend(ParametricResult("sim", ts, "BENCH", 1, p.site, p.part_id,
                                            t.test_num, t.test_txt, t.value, t.lo, t.hi,
                                            t.units, t.passed) for t in p.tests)
                out.append(PartResult("sim", ts, "BENCH", p.wafer_id, 1, p.site, p.part_id,
                                      p.x, p.y, p.hard_bin, p.soft_bin, p.passed, p.retest,
                                      1 if p.retest else 0, p.test_time_ms, len(p.tests)))
        elif ev.kind == "wafer_end":
            d = ev.data
            out.append(WaferEnd("sim", ts, "BENCH", d["wafer_id"], 1, 0, d["parts"],
                                d["good"]))
        elif ev.kind == "lot_end":
            out.append(LotEnd("sim", ts, "BENCH"))
    return out


def galaxy_records() -> list[Any] | None:
    root = os.environ.get("EDGEGW_SHARED_DATA")
    base = Path(root) if root else Path(__file__).resolve().parents[2] / "shared" / "data"
    path = base / "stdf" / "galaxy-a530-lot2.stdf.gz"
    if not path.exists():
        return None
    from edgegw.stdf import StdfDecoder
    from edgegw.stdf.mapping import RecordMapper

    decoder = StdfDecoder()
    decoder.feed(gzip.decompress(path.read_bytes()))
    mapper = RecordMapper("galaxy")
    return mapper.map_all(decoder.records(), 1.0) + mapper.close(1.0)


def run(records: list[Any], frame: int, alerts: bool) -> tuple[float, int, int]:
    published = 0

    def publish(topic: str, delta: dict[str, Any]) -> None:
        nonlocal published
        published += 1

    engine = AlertEngine(RULES, publish) if alerts else None
    state = LiveState(publish, alerts=engine, clock=lambda: 5_000.0)
    frames = [records[i : i + frame] for i in range(0, len(records), frame)]
    t0 = time.perf_counter()
    rid = 1
    for batch in frames:
        state.on_records("gw", rid, batch)
        rid += len(batch)
    return time.perf_counter() - t0, published, len(frames)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--frame", type=int, default=2000)
    ap.add_argument("--wafers", type=int, default=4)
    args = ap.parse_args()

    simulated = sim_records(args.wafers)
    cases = [("simulated lot", simulated, False),
             ("simulated lot + 8 alert rules", simulated, True)]
    galaxy = galaxy_records()
    if galaxy is not None:
        cases.append(("galaxy-a530-lot2 (real file)", galaxy, False))
    print(f"frame = {args.frame} records, median of {args.runs} runs")
    for name, records, alerts in cases:
        times = []
        for _ in range(args.runs):
            elapsed, published, n_frames = run(records, args.frame, alerts)
            times.append(elapsed)
        med = statistics.median(times)
        print(f"{name:32s} {len(records):>8d} records  {len(records) / med:>10,.0f} records/s"
              f"  {published / n_frames:5.1f} deltas/frame")

    tracemalloc.start()
    run(simulated, args.frame, False)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    print(f"peak traced memory applying the simulated lot: {peak / 2**20:.1f} MiB "
          f"({len(simulated)} records)")


if __name__ == "__main__":
    main()
