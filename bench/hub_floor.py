"""Where the gateway -> hub floor is: CPU time per record of each stage, v1 beside v2.

``bench/gateway_hub.py`` measures the whole path, two processes on a shared machine, so
its figure moves with the machine's load.  This measures each stage alone in one process
in *CPU time* (``time.process_time``: what a stage costs, not what it waited), on the
same tester mix (8 parametric results + 1 part result per part) in frames of 2,000
records, and prints what each stage alone would allow (1 / its cost) and the hub's
ceiling with and without its live state.  Stages:

- gateway: body encode (v1 rows, v2 columns);
- hub: body decode to records (v1, v2), the store's body compression (``pack_body``, in
  the commit's worker thread), the live state's apply (``LiveState.on_records``, the hub's
  consumer: live figures, fan-out deltas, alert checks).

    python bench/hub_floor.py [--parts 20000]
"""

from __future__ import annotations

import argparse
import gc
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edgegw.config import build
from edgegw.hub.app import Hub
from edgegw.hub.config import HubConfig
from edgegw.hub.store import pack_body
from edgegw.protocol import decode_frame, encode_body, encode_columns
from edgegw.records import ParametricResult, PartResult, Record

FRAME = 2000


def tester_mix(parts: int) -> list[Record]:
    out: list[Record] = []
    t0 = 1.7e9
    for i in range(parts):
        ts = t0 + i * 0.01
        out += [ParametricResult("tester", ts, "LOT1", 1, i % 8, str(i), 100 + t, f"TEST_{t}",
                                 1.0 + t * 0.01 + (i % 97) * 1e-4, 0.0, 2.0, "V", True)
                for t in range(8)]
        out.append(PartResult("tester", ts, "LOT1", "W1", 1, i % 8, str(i), i % 50,
                              (i // 50) % 50, 1, 1, True, False, 0, 120, 8))
    return out


def cpu_per_record(fn: Callable[[], Any], n: int, repeat: int = 5) -> float:
    """Median CPU seconds per record of ``fn`` (which handles ``n`` records).  What is
    alive is frozen first, as the hub's GcPacer does every second, so the collector walks
    only what the stage itself allocates."""
    times = []
    for _ in range(repeat):
        gc.collect()
        gc.freeze()
        t = time.process_time()
        fn()
        times.append(time.process_time() - t)
    return statistics.median(times) / n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--parts", type=int, default=20_000)
    args = ap.parse_args()
    records = tester_mix(args.parts)
    n = len(records)
    frames = [records[i:i + FRAME] for i in range(0, n, FRAME)]
    bodies = {1: [encode_body(1 + i * FRAME, f) for i, f in enumerate(frames)],
              2: [encode_columns(1 + i * FRAME, f) for i, f in enumerate(frames)]}
    decoded = [decode_frame(b, FRAME)[1] for b in bodies[2]]
    cost: dict[str, float] = {}
    cost["gateway encode v1"] = cpu_per_record(
        lambda: [encode_body(1, f) for f in frames], n)
    cost["gateway encode v2"] = cpu_per_record(
        lambda: [encode_columns(1, f) for f in frames], n)
    cost["hub decode v1"] = cpu_per_record(
        lambda: [decode_frame(b, FRAME) for b in bodies[1]], n)
    cost["hub decode v2"] = cpu_per_record(
        lambda: [decode_frame(b, FRAME) for b in bodies[2]], n)
    cost["hub store: pack_body v1"] = cpu_per_record(
        lambda: [pack_body(b) for b in bodies[1]], n)
    cost["hub store: pack_body v2"] = cpu_per_record(
        lambda: [pack_body(b) for b in bodies[2]], n)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = build(HubConfig, {"hub": {"port": 0, "data_dir": str(Path(tmp))}})
        hub = Hub(cfg)

        def live() -> None:
            for i, recs in enumerate(decoded):
                hub.state.on_records("bench", 1 + i * FRAME, recs)

        live()  # warm: the lot, wafer and tests exist, as in a running hub
        cost["hub live state (on_records)"] = cpu_per_record(live, n)
    print(f"{n:,} records (tester mix), frames of {FRAME}; CPU time per record, median of 5")
    print(f"{'stage':34s} {'µs/record':>10s} {'alone allows':>16s}")
    for name, c in cost.items():
        print(f"{name:34s} {c * 1e6:10.2f} {1 / c:>12,.0f} r/s")
    for v in (1, 2):
        path = cost[f"hub decode v{v}"]
        live_c = cost["hub live state (on_records)"]
        print(f"hub v{v}: decode alone {1 / path:>10,.0f} r/s; decode + live state "
              f"{1 / (path + live_c):>10,.0f} r/s (Trio thread; compression and SQLite run "
              f"in a worker thread)")


if __name__ == "__main__":
    main()
