"""Soak: many lots rolling through a real hub; prints the hub's RSS as they go.

A hub runs as its own ``edgegw hub`` process (default live state: 16 lots live, the rest
evicted to the history store).  A gateway in this process streams the simulated tester's
STDF, lot after lot (each lot a new lot id), decoded and mapped as a tail does, as fast as
the hub acknowledges.  Every ``--every`` lots, once the hub has applied everything sent,
the hub's RSS (VmRSS of its process) is printed with the lots evicted so far.  Memory is
bounded when RSS stops growing once the live set has filled (after lot 16).

    python bench/hub_soak_lots.py [--lots 220] [--wafers 2] [--diameter 24] [--every 10]
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import trio

from edgegw.config import build
from edgegw.gateway.config import GatewayConfig
from edgegw.gateway.service import Gateway
from edgegw.sim.stdf_tester import stdf_chunks
from edgegw.sim.tester import TesterProfile
from edgegw.stdf import StdfDecoder
from edgegw.stdf.mapping import RecordMapper


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def hub_stats(port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/stats", timeout=10) as r:
        return json.loads(r.read())


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def feed(port: int, pid: int, args: argparse.Namespace, tmp: Path) -> list[tuple]:
    cfg = build(GatewayConfig, {
        "gateway": {"id": "soak", "token": "soak", "state_dir": str(tmp / "gw"),
                    "hub_url": f"ws://127.0.0.1:{port}/ws/gateway"},
        "batch": {"max_records": 2000, "max_delay_ms": 50},
        "queue": {"max_frames": 256},
    })
    profile = TesterProfile(wafers=args.wafers, wafer_diameter_dies=args.diameter)
    samples = []
    sent = 0
    lots_done = 0
    t0 = time.monotonic()
    async with trio.open_nursery() as nursery:
        gw = Gateway(cfg)
        await nursery.start(gw.run)
        dec, mapper = StdfDecoder(), RecordMapper("tester")
        for chunk in stdf_chunks(profile, lots=args.lots, parts_per_second=1e6):
            dec.feed(chunk.data)
            records = [r for rec in dec.records() for r in mapper.map(rec, time.time())]
            if records:
                await gw.sink.put(records, source="tester")
                sent += len(records)
            if not chunk.end_of_file:
                continue
            dec, mapper = StdfDecoder(), RecordMapper("tester")
            lots_done += 1
            if lots_done % args.every and lots_done != args.lots:
                continue
            await gw.flush()
            while True:
                st = await trio.to_thread.run_sync(hub_stats, port)
                if st["gateways"].get("soak", {}).get("records_applied", 0) >= sent:
                    break
                await trio.sleep(0.05)
            live = st["live_state"]
            row = (lots_done, rss_mb(pid), live["lots_live"], live["lots_evicted"], sent,
                   time.monotonic() - t0)
            samples.append(row)
            print(f"lot {row[0]:4d}  hub RSS {row[1]:7.1f} MB  live {row[2]:3d}  "
                  f"evicted {row[3]:4d}  records {row[4]:9d}  {row[5]:6.1f} s", flush=True)
        nursery.cancel_scope.cancel()
    return samples


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lots", type=int, default=220)
    ap.add_argument("--wafers", type=int, default=2)
    ap.add_argument("--diameter", type=int, default=24)
    ap.add_argument("--every", type=int, default=10)
    args = ap.parse_args()
    port = free_port()
    with tempfile.TemporaryDirectory(dir="/var/tmp") as tmp_name:
        tmp = Path(tmp_name)
        conf = tmp / "hub.toml"
        conf.write_text(f'[hub]\nport = {port}\ndata_dir = "{tmp / "hub"}"\n'
                        '[gateways.soak]\ntoken = "soak"\n')
        hub = subprocess.Popen([sys.executable, "-m", "edgegw", "hub", "--config", str(conf)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            for _ in range(200):
                try:
                    hub_stats(port)
                    break
                except OSError:
                    time.sleep(0.1)
            samples = trio.run(feed, port, hub.pid, args, tmp)
        finally:
            hub.terminate()
            hub.wait()
    def slope(a: tuple, b: tuple) -> str:
        return (f"lot {a[0]} -> lot {b[0]}: {a[1]:.1f} -> {b[1]:.1f} MB "
                f"({(b[1] - a[1]) * 1024 / (b[0] - a[0]):+.1f} KB per lot)")

    after_fill = [s for s in samples if s[0] > 16]
    if len(after_fill) >= 3:
        # the allocator's arenas grow for a while after the live set fills (fan-out
        # histories reach their caps, checkpoint buffers): the second half is the trend
        mid = after_fill[len(after_fill) // 2]
        peak = max(s[1] for s in samples)
        print(f"RSS {slope(after_fill[0], after_fill[-1])}")
        print(f"second half {slope(mid, after_fill[-1])}; peak {peak:.1f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
