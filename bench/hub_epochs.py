"""What a single hub pays at its start for every (gateway, epoch) it ever saw.

A gateway with frames in memory (an embedded test program without ``[spool]``) starts a
new epoch at each start; each leaves a row of applied sets in ``hub.sqlite3``.  Reading
them all into memory at the hub's start made memory and start-up grow for good.  This
bench fills a store with ``--epochs`` such rows (100 gateways) and prints, in a fresh
process per tree: the store's open time, the process's RSS growth, and the claim of one
old epoch (its set read from the file: the median of 200).  ``--before DIR``: the same,
measured in another checkout (a git worktree of an older commit) beside this one.

    python bench/hub_epochs.py --epochs 400000 [--before /var/tmp/edgegw-before]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]


def fill(path: Path, n: int) -> None:
    from edgegw.hub.store import SCHEMA

    db = sqlite3.connect(path)
    db.executescript(SCHEMA)
    db.executemany(
        "INSERT INTO applied (gateway, epoch, ranges, updated, rids) VALUES (?, ?, ?, ?, ?)",
        ((f"ate-{i % 100:02d}", f"{i:032x}", json.dumps([[1, 40]]), 0.0,
          json.dumps([[1, 4000]])) for i in range(n)))
    db.commit()
    db.close()


def measure(path: Path, n: int) -> dict[str, float]:
    import trio

    from edgegw.hub.store import HubStore

    async def run() -> dict[str, float]:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        store = HubStore(path)
        t = time.perf_counter()
        await store.open()
        opened = time.perf_counter() - t
        rss = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
        claims = []
        for i in range(200):
            t = time.perf_counter()
            e = i * 997 % n  # spread over the file
            claim = await store.claim(f"ate-{e % 100:02d}", f"{e:032x}")
            claims.append(time.perf_counter() - t)
            assert claim.applied.ranges() == [(1, 40)]
        await store.close()
        return {"open_s": opened, "rss_mb": rss, "claim_ms": statistics.median(claims) * 1e3}

    return trio.run(run)


def in_tree(tree: Path, path: Path, n: int) -> dict[str, float]:
    """``measure`` in a fresh interpreter importing edgegw from ``tree``."""
    out = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--measure", str(path),
         "--epochs", str(n)],
        env={**os.environ, "PYTHONPATH": str(tree)}, cwd=tree, check=True,
        capture_output=True, text=True).stdout
    return dict(json.loads(out.splitlines()[-1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--epochs", type=int, default=400_000)
    ap.add_argument("--before", type=Path, help="another checkout, measured beside this one")
    ap.add_argument("--measure", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, args.epochs)))
        return
    with tempfile.TemporaryDirectory(dir="/var/tmp") as tmp:
        base = Path(tmp) / "hub.sqlite3"
        fill(base, args.epochs)
        trees = [("this tree", HERE)] + ([("before", args.before)] if args.before else [])
        print(f"{args.epochs:,} (gateway, epoch) rows, 100 gateways")
        print(f"{'':10} {'open s':>8} {'RSS MB':>8} {'claim ms':>9}")
        for name, tree in trees:
            copy = Path(tmp) / f"{name.replace(' ', '-')}.sqlite3"
            shutil.copy(base, copy)
            got = in_tree(tree, copy, args.epochs)
            print(f"{name:10} {got['open_s']:8.2f} {got['rss_mb']:8.0f} {got['claim_ms']:9.3f}")


if __name__ == "__main__":
    main()
