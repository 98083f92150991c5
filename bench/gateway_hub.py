"""Gateway -> hub throughput over loopback: records/s end to end, hub in its own process.

A gateway in this process puts pre-built tester records (8 parametric results + 1 part
result per part, like the simulated tester) as fast as its sink takes them, through its
crash-safe disk spool (``--no-spool``: the memory queue); the hub runs as a separate
process with its durable SQLite store.  Throughput is counted from the first put to the
moment the hub reports every record applied durably, and to the moment its live state has
every record too (the live state is applied after the durable commit and the ACK, from a
bounded queue: docs/storage.md).

Hubs (``--hub``, each its own process): ``full`` is `edgegw hub` as configured by default;
``inline`` is `edgegw hub` with ``hub.live_queue_records = 0`` (the live state applied inside
each commit's step, as before the queue); ``ingest`` is the hub's ingest alone, without the
live state, fan-out and alerts (the ceiling of the protocol path).  Each run is made with
protocol v2 (columnar bodies) and v1 (``uplink.max_protocol_version = 1``: per-record
arrays), alternately, so medians printed side by side saw the same machine load.

    python bench/gateway_hub.py [--records 300000] [--runs 3] [--batch 2000] [--no-spool]
                                [--protocol 2 1] [--hub full inline ingest] [--compare]
                                [--baseline DIR]

``--compare`` is ``--hub inline full``: the live state inline beside the queue.
``--baseline DIR`` also runs each hub kind but ``ingest`` (which has no live state) from
another checkout's ``edgegw`` (``PYTHONPATH=DIR``, e.g. a worktree of ``main``), as
``<kind>@base``, alternately with this checkout's: before and after in one run.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import trio

from edgegw.config import build
from edgegw.gateway.config import GatewayConfig
from edgegw.gateway.service import Gateway
from edgegw.records import ParametricResult, PartResult


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def progress(port: int) -> tuple[int, int]:
    """(records applied durably from the bench gateway, records the live state was fed)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/stats", timeout=5) as r:
        stats = json.loads(r.read())
    durable = stats["gateways"].get("bench", {}).get("records_applied", 0)
    return durable, stats.get("live_queue", {}).get("records_fed", durable)


def applied(port: int) -> int:
    return progress(port)[0]


def make_part(i: int) -> list:
    now = time.time()
    recs: list = [ParametricResult("tester", now, "LOT1", 1, i % 8, str(i), 100 + t,
                                   f"TEST_{t}", 1.0 + t * 0.01, 0.0, 2.0, "V", True)
                  for t in range(8)]
    recs.append(PartResult("tester", now, "LOT1", "W1", 1, i % 8, str(i), i % 50, i // 50,
                           1, 1, True, False, 0, 120, 8))
    return recs


async def one_run(port: int, n_records: int, batch: int, tmp: Path, *, protocol: int = 2,
                  spool: bool = True) -> tuple[float, float, int]:
    raw: dict[str, Any] = {
        "gateway": {"id": "bench", "token": "bench", "state_dir": str(tmp),
                    "hub_url": f"ws://127.0.0.1:{port}/ws/gateway"},
        "batch": {"max_records": batch, "max_delay_ms": 50},
        "queue": {"max_frames": 256},
        "uplink": {"max_protocol_version": protocol},
    }
    if spool:
        raw["spool"] = {}  # defaults: <state_dir>/spool, group commit, fsync per group
    cfg = build(GatewayConfig, raw)
    parts = [make_part(i) for i in range(64)]
    base, base_fed = await trio.to_thread.run_sync(progress, port)
    async with trio.open_nursery() as nursery:
        gw = Gateway(cfg)
        await nursery.start(gw.run)
        t0 = time.perf_counter()
        sent = 0
        i = 0
        while sent < n_records:
            group = [r for p in parts[i % 8 * 8: i % 8 * 8 + 8] for r in p]  # 72 records
            await gw.sink.put(group, source="tester")
            sent += len(group)
            i += 1
        await gw.flush()
        durable = None
        while True:
            done, fed = await trio.to_thread.run_sync(progress, port)
            if durable is None and done - base >= sent:
                durable = time.perf_counter() - t0
            if durable is not None and fed - base_fed >= sent:
                break
            await trio.sleep(0.01)
        live = time.perf_counter() - t0
        nursery.cancel_scope.cancel()
    return durable, live, sent


#: hub kinds and the [hub] lines that make them
HUBS = {"full": "", "inline": "live_queue_records = 0\n", "ingest": ""}


def serve_ingest(config: str) -> None:
    """The hub's ingest alone -- WebSocket, decode, durable SQLite commit, acks -- without
    the live state, fan-out and alerts ``edgegw hub`` adds as its consumers: the ceiling
    of the protocol path itself (``--hub ingest``)."""
    from edgegw.config import load
    from edgegw.hub import HubConfig, Ingest

    trio.run(Ingest(load(HubConfig, config, [])).run)


def start_hub(kind: str, cfg: Path, port: int, code: str | None = None
              ) -> subprocess.Popen[bytes]:
    """A hub of ``kind`` in its own process; ``code``: the directory its ``edgegw`` is
    imported from (None: this checkout's)."""
    cmd = ([sys.executable, "-m", "edgegw", "hub", "--config", str(cfg)] if kind != "ingest"
           else [sys.executable, __file__, "--serve-ingest", str(cfg)])
    env = None if code is None else {**os.environ, "PYTHONPATH": code}
    hub = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    for _ in range(100):
        try:
            applied(port)
            break
        except OSError:
            time.sleep(0.1)
    return hub


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--records", type=int, default=300_000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--batch", type=int, default=2000)
    ap.add_argument("--no-spool", action="store_true",
                    help="the gateway's memory queue instead of its disk spool")
    ap.add_argument("--protocol", type=int, nargs="+", default=[2, 1], choices=[1, 2],
                    help="protocol versions to run, alternately (default: 2 1)")
    ap.add_argument("--hub", nargs="+", default=["full"], choices=list(HUBS),
                    help="full: `edgegw hub`; inline: `edgegw hub` with the live state in "
                    "the commit step (before the queue); ingest: the hub's ingest alone "
                    "(default: full)")
    ap.add_argument("--compare", action="store_true", help="same as --hub inline full")
    ap.add_argument("--baseline", metavar="DIR",
                    help="also run the hubs (but ingest) from the edgegw in DIR, e.g. a "
                    "worktree of main: before and after side by side")
    ap.add_argument("--serve-ingest", metavar="CONFIG", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve_ingest:
        serve_ingest(args.serve_ingest)
        return
    base_kinds = ["inline", "full"] if args.compare else args.hub
    # label -> (kind, where its edgegw comes from): the baseline's first, "before"
    specs: dict[str, tuple[str, str | None]] = {}
    for kind in base_kinds:
        if args.baseline and kind != "ingest":
            specs[f"{kind}@base"] = (kind, str(Path(args.baseline).resolve()))
        specs[kind] = (kind, None)
    kinds = list(specs)
    rates: dict[tuple[str, int], list[tuple[float, float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        hubs: dict[str, tuple[subprocess.Popen[bytes], int]] = {}
        try:
            for label, (kind, code) in specs.items():
                port = free_port()
                cfg = Path(tmp) / f"hub-{label}.toml"
                cfg.write_text(f'[hub]\nport = {port}\ndata_dir = "{Path(tmp) / label}"\n'
                               f'{HUBS[kind]}[gateways.bench]\ntoken = "bench"\n')
                hubs[label] = (start_hub(kind, cfg, port, code), port)
            for run in range(args.runs):
                for kind, (_, port) in hubs.items():  # alternating: load drifts hit all
                    for v in args.protocol:
                        durable, live, sent = trio.run(functools.partial(
                            one_run, port, args.records, args.batch,
                            Path(tmp) / f"gw-{kind}-{run}-v{v}", protocol=v,
                            spool=not args.no_spool))
                        rates.setdefault((kind, v), []).append((sent / durable, sent / live))
                        print(f"hub {kind}, run {run + 1}, v{v}: {sent} records, durable in "
                              f"{durable:.2f} s = {sent / durable:,.0f} records/s, in the live "
                              f"state in {live:.2f} s = {sent / live:,.0f} records/s",
                              flush=True)
        finally:
            for hub, _ in hubs.values():
                hub.terminate()
                hub.wait()
    store = "memory queue" if args.no_spool else "disk spool"
    print(f"gateway -> hub over loopback (batch {args.batch} records/frame, gateway {store}, "
          f"durable hub commit), medians of {args.runs} runs, load average "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores "
          "(durable / live state complete):")
    for kind in kinds:
        med = {v: (statistics.median(r[0] for r in rates[(kind, v)]),
                   statistics.median(r[1] for r in rates[(kind, v)])) for v in args.protocol}
        line = "  ".join(f"v{v} {d:>9,.0f} / {lv:>9,.0f} records/s"
                         for v, (d, lv) in med.items())
        ratio = (f"  v2/v1 {med[2][1] / med[1][1]:.2f}x" if 1 in med and 2 in med else "")
        print(f"  hub {kind:11s}: {line}{ratio}")
    for kind in base_kinds:
        if f"{kind}@base" in kinds:
            for v in args.protocol:
                before = [statistics.median(r[i] for r in rates[(f"{kind}@base", v)])
                          for i in (0, 1)]
                after = [statistics.median(r[i] for r in rates[(kind, v)]) for i in (0, 1)]
                print(f"  hub {kind} v{v}, this checkout / baseline: durable "
                      f"{after[0] / before[0]:.2f}x, live state complete "
                      f"{after[1] / before[1]:.2f}x")
    if "inline" in kinds and "full" in kinds:
        for v in args.protocol:
            before = statistics.median(r[1] for r in rates[("inline", v)])
            after = statistics.median(r[1] for r in rates[("full", v)])
            print(f"  v{v}: live state complete, queued / inline: {after / before:.2f}x")


if __name__ == "__main__":
    main()
