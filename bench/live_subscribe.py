"""Benchmark: what one ``/ws/live`` subscribe costs the hub's event loop, by patterns.

A subscribe is answered on the hub's one Trio thread: every topic the hub knows is
matched against the request's new patterns (docs/live-protocol.md, "subscribe").  This
times ``LiveHub.receive`` of one subscribe on a live state of --topics test topics (16
lots), with --patterns patterns that match nothing but one lot.  ``--baseline DIR`` runs
the same, alternately, with another checkout's ``edgegw`` (``PYTHONPATH=DIR``, e.g.
``git archive main | tar -x -C DIR``), each run in a process of its own: medians of
--runs and the ratio, with the load average.

    .venv/bin/python bench/live_subscribe.py --baseline /var/tmp/main --runs 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from typing import Any


class Topics:
    """A live state with ``n`` test topics, 16 lots."""

    def __init__(self, n: int) -> None:
        self.state = {f"test/LOT{i % 16}/{i}": {"test_num": i} for i in range(n)}

    def snapshot(self, topic: str) -> dict[str, Any] | None:
        return self.state.get(topic)

    def topics(self) -> list[str]:
        return list(self.state)


def one_run(topics: int, patterns: int) -> float:
    """Seconds of one subscribe (wall clock: the event loop is held that long)."""
    import cbor2

    from edgegw.hub.fanout import CBOR, LiveConfig, LiveHub
    from edgegw.metrics import Metrics

    hub = LiveHub(Topics(topics), LiveConfig(), epoch="E1", metrics=Metrics())
    client = hub.connect(CBOR, now=0.0, peer="bench")
    wanted = [f"nothing{i}/+" for i in range(patterns - 1)] + ["test/LOT3/+"]
    request = cbor2.dumps({"type": "subscribe", "id": 1, "topics": wanted})
    t = time.perf_counter()
    hub.receive(client, request, 0.0)
    return time.perf_counter() - t


def in_process(tree: str | None, args: argparse.Namespace) -> float:
    env = dict(os.environ)
    if tree is not None:
        env["PYTHONPATH"] = tree
    out = subprocess.run(
        [sys.executable, __file__, "--one", "--topics", str(args.topics),
         "--patterns", str(args.patterns)],
        env=env, check=True, capture_output=True, text=True).stdout
    return float(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--topics", type=int, default=20000)
    parser.add_argument("--patterns", type=int, default=256)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--baseline", help="another checkout's tree (its edgegw)")
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(one_run(args.topics, args.patterns))
        return
    print(f"load average before: {os.getloadavg()}")
    this, base = [], []
    for _ in range(args.runs):
        if args.baseline:
            base.append(in_process(args.baseline, args))
        this.append(in_process(None, args))
    print(f"{args.topics} topics, {args.patterns} patterns: this tree "
          f"{statistics.median(this) * 1e3:.1f} ms (runs {[round(x * 1e3, 1) for x in this]})")
    if base:
        print(f"baseline {statistics.median(base) * 1e3:.1f} ms "
              f"(runs {[round(x * 1e3, 1) for x in base]}); "
              f"ratio baseline/this {statistics.median(base) / statistics.median(this):.1f}x")
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
