"""Gateway -> hub throughput over loopback: records/s end to end, hub in its own process.

A gateway in this process puts pre-built tester records (8 parametric results + 1 part
result per part, like the simulated tester) as fast as its sink takes them; the hub runs
as a separate `edgegw hub` process with its durable SQLite store.  Throughput is counted
from the first put to the moment the hub reports every record applied.

    python bench/gateway_hub.py [--records 300000] [--runs 3] [--batch 2000]
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
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
from edgegw.records import ParametricResult, PartResult


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def applied(port: int) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/stats", timeout=5) as r:
        return json.loads(r.read())["gateways"].get("bench", {}).get("records_applied", 0)


def make_part(i: int) -> list:
    now = time.time()
    recs: list = [ParametricResult("tester", now, "LOT1", 1, i % 8, str(i), 100 + t,
                                   f"TEST_{t}", 1.0 + t * 0.01, 0.0, 2.0, "V", True)
                  for t in range(8)]
    recs.append(PartResult("tester", now, "LOT1", "W1", 1, i % 8, str(i), i % 50, i // 50,
                           1, 1, True, False, 0, 120, 8))
    return recs


async def one_run(port: int, n_records: int, batch: int, tmp: Path) -> tuple[float, int]:
    cfg = build(GatewayConfig, {
        "gateway": {"id": "bench", "token": "bench", "state_dir": str(tmp),
                    "hub_url": f"ws://127.0.0.1:{port}/ws/gateway"},
        "batch": {"max_records": batch, "max_delay_ms": 50},
        "queue": {"max_frames": 256},
    })
    parts = [make_part(i) for i in range(64)]
    base = await trio.to_thread.run_sync(applied, port)
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
        while await trio.to_thread.run_sync(applied, port) - base < sent:
            await trio.sleep(0.01)
        elapsed = time.perf_counter() - t0
        nursery.cancel_scope.cancel()
    return elapsed, sent


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--records", type=int, default=300_000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--batch", type=int, default=2000)
    args = ap.parse_args()
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        hubdir = Path(tmp) / "hub"
        cfg = Path(tmp) / "hub.toml"
        cfg.write_text(f'[hub]\nport = {port}\ndata_dir = "{hubdir}"\n'
                       '[gateways.bench]\ntoken = "bench"\n')
        hub = subprocess.Popen([sys.executable, "-m", "edgegw", "hub", "--config", str(cfg)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            for _ in range(100):
                try:
                    applied(port)
                    break
                except OSError:
                    time.sleep(0.1)
            rates = []
            for run in range(args.runs):
                elapsed, sent = trio.run(one_run, port, args.records, args.batch,
                                         Path(tmp) / f"gw{run}")
                rates.append(sent / elapsed)
                print(f"run {run + 1}: {sent} records in {elapsed:.2f} s = "
                      f"{sent / elapsed:,.0f} records/s")
        finally:
            hub.terminate()
            hub.wait()
    print(f"gateway -> hub over loopback (batch {args.batch} records/frame, durable hub "
          f"commit): median {statistics.median(rates):,.0f} records/s over {args.runs} runs")


if __name__ == "__main__":
    main()
