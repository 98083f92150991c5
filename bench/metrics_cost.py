"""What a metric update costs on the hot path: edgegw's accumulators vs prometheus_client.

Prints ns per call (median of 5 runs of 200,000 calls) for a counter without labels, a
counter with one label (how the gateway counts records per source), a histogram
observation, and the per-record histogram path the hub uses for record ages.  edgegw
keeps its own accumulators where they are cheaper and exports them through
prometheus_client (edgegw/metrics.py); this bench is the reason.

    python bench/metrics_cost.py
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram

from edgegw.metrics import Metrics

N = 200_000


def ns_per_call(fn: Callable[[], None], n: int = N) -> float:
    times = []
    for _ in range(5):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) / n * 1e9


def main() -> None:
    ours = Metrics()
    c0 = ours.counter("plain_total")
    c1 = ours.counter("labelled_total")
    h0 = ours.histogram("latency_seconds")
    reg = CollectorRegistry()
    p0 = Counter("plain", "", registry=reg)
    p1 = Counter("labelled", "", ["source"], registry=reg)
    ph = Histogram("latency_seconds", "", registry=reg,
                   buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                            5.0, 10.0))
    ages = [0.003 * (i % 997) for i in range(N)]
    rng = range(N)

    def our_plain() -> None:
        for _ in rng:
            c0.inc()

    def prom_plain() -> None:
        for _ in rng:
            p0.inc()

    def our_labelled() -> None:
        for _ in rng:
            c1.inc(5, source="tester1")

    def prom_labelled() -> None:
        for _ in rng:
            p1.labels(source="tester1").inc(5)

    def our_observe() -> None:
        for v in ages:
            h0.observe(v)

    def prom_observe() -> None:
        for v in ages:
            ph.observe(v)

    def our_observe_many() -> None:
        h0.observe_many(ages)

    rows = [
        ("counter, no labels", our_plain, prom_plain),
        ("counter, one label", our_labelled, prom_labelled),
        ("histogram observe", our_observe, prom_observe),
        ("histogram, per record (observe_many)", our_observe_many, prom_observe),
    ]
    print(f"{'ns per call':38s} {'edgegw':>8s} {'prometheus_client':>18s}")
    for name, ours_fn, prom_fn in rows:
        print(f"{name:38s} {ns_per_call(ours_fn):8.0f} {ns_per_call(prom_fn):18.0f}")
    t = time.perf_counter()
    for _ in range(20):
        ours.render_prometheus()
    print(f"render /metrics ({len(ours.as_dict())} metrics + process, platform, gc): "
          f"{(time.perf_counter() - t) / 20 * 1e3:.2f} ms")


if __name__ == "__main__":
    main()
