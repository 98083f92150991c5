"""A test program that publishes its results live through an embedded edgegw gateway.

This is the usual shape of a tester's Python hooks: the test program calls
``on_lot_start`` and ``on_wafer_start`` once, then ``on_part_done`` from one thread per
test site as each die finishes, then ``on_wafer_end`` and ``on_lot_end``.  Each hook builds
records of the public record types (``edgegw.records``) and hands them to the gateway,
which batches them, keeps them in its disk spool and sends them to the hub; the hooks
never wait for the network.  Here a simulated lot stands in for the tester.

Against the example hub config (``edgegw hub --config conf/hub.toml``)::

    .venv/bin/python examples/embedded_test_program.py

docs/embedding.md walks through it.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import threading
import time
from collections.abc import Sequence

import edgegw
from edgegw.records import (
    LotEnd,
    LotStart,
    ParametricResult,
    PartResult,
    Record,
    WaferEnd,
    WaferStart,
)

#: the source name the hub shows for these records (a gateway may carry several sources)
SOURCE = "testprog"
HEAD = 1

#: the test program's parametric tests: number, name, units, low and high limit
TESTS = [
    (100, "IDD_STATIC", "uA", 5.0, 45.0),
    (110, "VDD_MIN", "V", 0.60, 0.95),
    (120, "FMAX", "MHz", 800.0, 1400.0),
]
PASS_BIN, FAIL_BIN = 1, 5  # hard bins: 1 good, 5 parametric fail


class LivePublisher:
    """The test program's hooks.  Thread-safe: ``on_part_done`` runs on every site's
    thread at once; ``EmbeddedGateway.put`` may be called from any thread."""

    def __init__(self, gateway: edgegw.EmbeddedGateway, lot_id: str) -> None:
        self.gateway = gateway
        self.lot_id = lot_id
        self.wafer_id = ""
        self.records = 0  # records handed to the gateway
        self._lock = threading.Lock()

    def _put(self, records: Sequence[Record]) -> None:
        self.gateway.put(records)
        with self._lock:
            self.records += len(records)

    def on_lot_start(self, part_type: str, job_name: str, node_name: str) -> None:
        now = time.time()
        self._put([LotStart(SOURCE, now, self.lot_id, part_type=part_type,
                            node_name=node_name, job_name=job_name, start_t=int(now))])

    def on_wafer_start(self, wafer_id: str) -> None:
        self.wafer_id = wafer_id
        now = time.time()
        self._put([WaferStart(SOURCE, now, self.lot_id, wafer_id, HEAD, start_t=int(now))])

    def on_part_done(self, site: int, part_id: str, x: int, y: int,
                     measured: dict[int, float], test_time_ms: int) -> bool:
        """One die: its parametric results, then the part result (STDF's PTRs, then its
        PRR), in one put.  Returns whether it passed."""
        now = time.time()
        records: list[Record] = []
        passed = True
        for test_num, name, units, lo, hi in TESTS:
            value = measured[test_num]
            ok = lo <= value <= hi
            passed = passed and ok
            records.append(ParametricResult(SOURCE, now, self.lot_id, HEAD, site, part_id,
                                            test_num, name, value, lo, hi, units, ok))
        hard_bin = PASS_BIN if passed else FAIL_BIN
        records.append(PartResult(SOURCE, now, self.lot_id, self.wafer_id, HEAD, site,
                                  part_id, x, y, hard_bin, hard_bin, passed,
                                  test_time_ms=test_time_ms, num_tests=len(TESTS)))
        self._put(records)
        return passed

    def on_wafer_end(self, parts: int, good: int) -> None:
        now = time.time()
        self._put([WaferEnd(SOURCE, now, self.lot_id, self.wafer_id, HEAD,
                            finish_t=int(now), part_count=parts, good_count=good)])

    def on_lot_end(self) -> None:
        now = time.time()
        self._put([LotEnd(SOURCE, now, self.lot_id, finish_t=int(now))])


# ---- a simulated lot standing in for the tester -------------------------------------------


def wafer_dies(diameter: int) -> list[tuple[int, int]]:
    """The X/Y of every die on a round wafer ``diameter`` dies across."""
    r = diameter / 2
    return [(x, y) for y in range(diameter) for x in range(diameter)
            if math.hypot(x + 0.5 - r, y + 0.5 - r) <= r]


def measure(rng: random.Random) -> dict[int, float]:
    return {100: rng.gauss(25.0, 6.0), 110: rng.gauss(0.78, 0.05), 120: rng.gauss(1100, 90)}


def test_site(hooks: LivePublisher, site: int, dies: list[tuple[int, int]], seed: int,
              parts_per_second: float, tally: list[int]) -> None:
    """One test site's thread: test its share of the wafer's dies, one after another."""
    rng = random.Random(seed)
    for x, y in dies:
        if parts_per_second:
            time.sleep(1 / parts_per_second)  # the tester's test time
        part_id = f"{hooks.wafer_id}-{x}-{y}"
        if hooks.on_part_done(site, part_id, x, y, measure(rng), rng.randint(80, 120)):
            tally[site] += 1


def run_lot(hooks: LivePublisher, *, wafers: int, sites: int, diameter: int,
            parts_per_second: float) -> int:
    """Test a lot: per wafer, every site's thread tests every ``sites``-th die.  Returns the
    number of parts tested."""
    hooks.on_lot_start("EMBED-DEMO", "embedded_example.py", "example-host")
    parts = 0
    for w in range(1, wafers + 1):
        hooks.on_wafer_start(f"{hooks.lot_id}-W{w:02d}")
        dies = wafer_dies(diameter)
        good = [0] * sites
        threads = [threading.Thread(target=test_site, name=f"site-{s}",
                                    args=(hooks, s, dies[s::sites], 1000 * w + s,
                                          parts_per_second / sites, good))
                   for s in range(sites)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        hooks.on_wafer_end(len(dies), sum(good))
        parts += len(dies)
        print(f"wafer {hooks.wafer_id}: {len(dies)} parts, {sum(good)} good", flush=True)
    hooks.on_lot_end()
    return parts


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hub", default="ws://127.0.0.1:8765/ws/gateway", help="the hub's URL")
    p.add_argument("--gateway", default="ate-01", help="gateway id (a [gateways.<id>] "
                   "table on the hub)")
    p.add_argument("--token", default="change-me-ate-01", help="its token")
    p.add_argument("--state-dir", default="./edgegw-testprog-data",
                   help="the gateway's spool: results the hub has not acknowledged wait "
                        "here, also across runs")
    p.add_argument("--lot", default="EMB0001")
    p.add_argument("--wafers", type=int, default=2)
    p.add_argument("--sites", type=int, default=4)
    p.add_argument("--diameter", type=int, default=16, help="dies across a wafer")
    p.add_argument("--parts-per-second", type=float, default=200.0, help="0: no pause")
    p.add_argument("--drain-timeout", type=float, default=30.0,
                   help="seconds to wait at the end for the hub's acknowledgements")
    args = p.parse_args(argv)

    config = {
        "gateway": {"id": args.gateway, "token": args.token, "hub_url": args.hub,
                    "state_dir": args.state_dir},
        "batch": {"max_records": 1000, "max_delay_ms": 100},
        "spool": {},  # crash-safe, and what a down hub has not taken is sent on the next run
    }
    gateway = edgegw.EmbeddedGateway(config, drain_timeout=args.drain_timeout)
    hooks = LivePublisher(gateway, args.lot)
    try:
        parts = run_lot(hooks, wafers=args.wafers, sites=args.sites, diameter=args.diameter,
                        parts_per_second=args.parts_per_second)
    finally:
        print("closing: waiting for the hub to acknowledge everything", flush=True)
        delivered = gateway.close()
    print(json.dumps({"lot": args.lot, "parts": parts, "records": hooks.records,
                      "delivered": delivered}), flush=True)
    return 0 if delivered else 1


if __name__ == "__main__":
    sys.exit(main())
