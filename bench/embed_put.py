"""What ``EmbeddedGateway.put`` costs the test program that calls it (docs/embedding.md).

A test program's end-of-part hook puts one part's records: N parametric results and the
part result (``--tests``, 3 as in examples/embedded_test_program.py).  Each put is timed
in the calling thread, from the call to its return: that is the time the tester's hook
is held.  Variants: the gateway with its disk spool (as the example) or its memory queue;
one calling thread, or one per site (``--sites``) putting at once; the hub up (a separate
``edgegw hub`` process) or down (the records wait in the spool).  Prints per variant the
median, 99th percentile and mean µs per put, and the mean µs per record.

    python bench/embed_put.py [--parts 20000] [--tests 3] [--sites 4]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

from edgegw import EmbeddedGateway
from edgegw.records import ParametricResult, PartResult, Record


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def part(i: int, site: int, tests: int) -> list[Record]:
    now = time.time()
    recs: list[Record] = [ParametricResult("testprog", now, "LOT1", 1, site, str(i), 100 + t,
                                           f"TEST_{t}", 1.0 + t * 0.01, 0.0, 2.0, "V", True)
                          for t in range(tests)]
    recs.append(PartResult("testprog", now, "LOT1", "W1", 1, site, str(i), i % 50, i // 50,
                           1, 1, True))
    return recs


def start_hub(tmp: Path, port: int) -> subprocess.Popen[bytes]:
    conf = tmp / "hub.toml"
    conf.write_text(f'[hub]\nport = {port}\ndata_dir = "{tmp / "hub"}"\n'
                    '[gateways.bench]\ntoken = "t"\n')
    hub = subprocess.Popen([sys.executable, "-m", "edgegw", "hub", "--config", str(conf)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1).close()
            return hub
        except OSError:
            time.sleep(0.1)
    raise SystemExit("the hub did not start")


def run(variant: str, tmp: Path, port: int, args: argparse.Namespace, spool: bool,
        threads: int) -> dict[str, Any]:
    config: dict[str, Any] = {
        "gateway": {"id": "bench", "token": "t", "hub_url": f"ws://127.0.0.1:{port}/ws/gateway",
                    "state_dir": str(tmp / f"gw-{variant}")},
        "batch": {"max_records": 1000, "max_delay_ms": 100},
    }
    if spool:
        config["spool"] = {}
    else:  # the memory queue must hold the whole run while the hub is down
        config["queue"] = {"max_frames": 100_000}
    parts = [[part(i, site, args.tests) for i in range(site, args.parts, threads)]
             for site in range(threads)]
    times: list[list[int]] = [[] for _ in range(threads)]
    # with the hub down nothing can be acknowledged: close() gives up after a second
    gw = EmbeddedGateway(config, drain_timeout=1 if variant == "hub down" else 120)

    def site(n: int) -> None:
        clock = time.perf_counter_ns
        out = times[n]
        for recs in parts[n]:
            t0 = clock()
            gw.put(recs)
            out.append(clock() - t0)

    workers = [threading.Thread(target=site, args=(n,)) for n in range(threads)]
    started = time.perf_counter()
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    elapsed = time.perf_counter() - started
    delivered = gw.close()
    flat = sorted(t / 1000 for ts in times for t in ts)
    return {"variant": variant, "puts": len(flat), "p50_us": flat[len(flat) // 2],
            "p99_us": flat[int(len(flat) * 0.99)], "mean_us": statistics.fmean(flat),
            "us_per_record": statistics.fmean(flat) / (args.tests + 1),
            "puts_per_s": len(flat) / elapsed, "delivered": delivered}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--parts", type=int, default=20_000)
    p.add_argument("--tests", type=int, default=3, help="parametric results per part")
    p.add_argument("--sites", type=int, default=4, help="threads putting at once")
    args = p.parse_args()
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; {args.parts} puts "
          f"of {args.tests + 1} records each")
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        port = free_port()
        results = [run("hub down", tmp, port, args, spool=True, threads=1)]
        hub = start_hub(tmp, port)
        try:
            results += [
                run("spool, 1 thread", tmp, port, args, spool=True, threads=1),
                run(f"spool, {args.sites} threads", tmp, port, args, spool=True,
                    threads=args.sites),
                run("memory queue, 1 thread", tmp, port, args, spool=False, threads=1),
            ]
        finally:
            hub.terminate()
            hub.wait(30)
    print(f"{'variant':<24} {'p50 us':>8} {'p99 us':>8} {'mean us':>8} {'us/record':>10} "
          f"{'puts/s':>8}  delivered")
    for r in results:
        print(f"{r['variant']:<24} {r['p50_us']:8.1f} {r['p99_us']:8.1f} {r['mean_us']:8.1f} "
              f"{r['us_per_record']:10.1f} {r['puts_per_s']:8.0f}  {r['delivered']}")


if __name__ == "__main__":
    main()
