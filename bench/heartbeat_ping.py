"""What one PING costs the heartbeat loop (edgegw/heartbeat.py), CPU per PING.

    python bench/heartbeat_ping.py [--pings 20000] [--runs 5] [--compare [--before main]]

Every connection, at both ends, PINGs once per heartbeat of its own silence: not a hot
path, but paid per connection forever.  One hub-side connection whose reads are held back
(so no silence verdict ends it) runs the real loop in virtual time (trio's MockClock,
autojump) with a send that returns at once, for ``--pings`` PINGs; the process CPU time
over them, divided by their number, is the cost per PING -- the loop's own bookkeeping, the
sans-IO timer and the PING's encoding.  ``--compare`` runs the same in a second process on
the source at ``--before`` (git archive), alternating, and prints medians and the ratio.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def run_one(pings: int) -> float:
    """Seconds of CPU per PING in this process (edgegw as found on sys.path)."""
    import trio
    import trio.testing

    from edgegw.heartbeat import heartbeat
    from edgegw.protocol import HubConnection

    sent = 0

    async def send(_data: bytes) -> None:
        nonlocal sent
        sent += 1
        await trio.lowlevel.checkpoint()

    async def main() -> float:
        conn = HubConnection(heartbeat=1.0, now=trio.current_time())
        conn.reading_paused(trio.current_time())  # no verdict: PINGs only
        with trio.move_on_after(100):  # warm-up
            await heartbeat(conn, send)
        start, counted = time.process_time(), sent
        with trio.move_on_after(pings):  # one PING per virtual second
            await heartbeat(conn, send)
        return (time.process_time() - start) / (sent - counted)

    return trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def one_process(pings: int, tree: Path | None) -> float:
    env = dict(os.environ)
    if tree is not None:  # that tree's edgegw first on the path
        env["PYTHONPATH"] = str(tree)
    out = subprocess.run([sys.executable, __file__, "--role", "one", "--pings", str(pings)],
                         check=True, capture_output=True, text=True, env=env).stdout
    return float(out.split()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--role", choices=["main", "one"], default="main")
    ap.add_argument("--pings", type=int, default=20000)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--compare", action="store_true")
    ap.add_argument("--before", default="main")
    args = ap.parse_args()
    if args.role == "one":
        print(run_one(args.pings))
        return 0
    sys.path.insert(0, str(HERE))
    from fanout import export_tree

    before = export_tree(args.before) if args.compare else None
    variants = ["before", "after"] if before is not None else ["after"]
    results: dict[str, list[float]] = {v: [] for v in variants}
    try:
        for run in range(args.runs):
            for v in variants:
                us = 1e6 * one_process(args.pings, before if v == "before" else None)
                results[v].append(us)
                print(f"run {run + 1}, {v}: {us:.2f} us CPU per PING", flush=True)
    finally:
        if before is not None:
            shutil.rmtree(before, ignore_errors=True)
    medians = {v: statistics.median(r) for v, r in results.items()}
    print(f"\nmedians of {args.runs} run(s), {args.pings} PINGs each: " + "  ".join(
        f"{v} {m:.2f} us" for v, m in medians.items()))
    if before is not None:
        print(f"after / before: {medians['after'] / medians['before']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
