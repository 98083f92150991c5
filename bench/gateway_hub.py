"""Gateway -> hub throughput over loopback: records/s end to end, gateway and hub each in
their own process, and what each side spends in CPU per record.

A gateway puts pre-built tester records (8 parametric results + 1 part result per part,
like the simulated tester) as fast as its sink takes them, through its crash-safe disk
spool (``--no-spool``: the memory queue); the hub has its durable SQLite store
(``synchronous=FULL``) and acknowledges only what it committed.  Throughput is counted
from the first put to the moment the gateway holds the hub's acknowledgement of every
record (the hub's durable commit), and to the moment the hub's live state has every record
too (the live state is applied after the durable commit and the ACK, from a bounded queue:
docs/storage.md).

CPU per side: the gateway process's ``time.process_time`` and the hub process's user +
system time (``/proc/<pid>/stat``) over the same interval (first put to the last ACK),
per million records: counted, so a loaded machine's waits do not count (its cache and
scheduler contention still do).  Each side's figure times 500,000 is the CPU it would
need per second at the target; the summary prints that beside the cores the machine has.

Hubs (``--hub``, each its own process): ``full`` is `edgegw hub` as configured by default;
``inline`` is `edgegw hub` with ``hub.live_queue_records = 0`` (the live state applied inside
each commit's step, as before the queue); ``ingest`` is the hub's ingest alone, without the
live state, fan-out and alerts (the ceiling of the protocol path).  Each run is made with
protocol v3 (columnar bodies, float columns as typed arrays) and v1
(``uplink.max_protocol_version = 1``: per-record arrays), alternately, so medians printed
side by side saw the same machine load (``--protocol 2``: columnar bodies with arrays of
floats).  A version is the newest the gateway offers, capped at the newest its checkout
speaks (a baseline without v3 offers v2 under ``--protocol 3``): each run's line says the
version the hub agreed.

    python bench/gateway_hub.py [--records 300000] [--runs 3] [--batch N] [--no-spool]
                                [--protocol 3 1] [--hub full inline ingest] [--compare]
                                [--baseline DIR] [--profile DIR]

``--compare`` is ``--hub inline full``: the live state inline beside the queue.
``--baseline DIR`` also runs every hub kind, and its gateway, from another checkout's
``edgegw`` (``PYTHONPATH=DIR``, e.g. ``git archive main | tar -x -C DIR``), as
``<kind>@base``, alternately with this checkout's: before and after in one run.
``--profile DIR`` runs py-spy (if installed) on the hub and on the gateway of every run,
writing ``DIR/<kind>-<run>-v<v>-{hub,gateway}.txt`` (``--format raw``, 250 Hz).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import signal
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
from edgegw.protocol import SUPPORTED_VERSIONS
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


_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def cpu_seconds(pid: int) -> float:
    """CPU seconds (user + system, every thread) a process has used so far: counted, so a
    busy machine's waits do not inflate it (``/proc/<pid>/stat``, Linux)."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


def make_part(i: int) -> list:
    now = time.time()
    recs: list = [ParametricResult("tester", now, "LOT1", 1, i % 8, str(i), 100 + t,
                                   f"TEST_{t}", 1.0 + t * 0.01, 0.0, 2.0, "V", True)
                  for t in range(8)]
    recs.append(PartResult("tester", now, "LOT1", "W1", 1, i % 8, str(i), i % 50, i // 50,
                           1, 1, True, False, 0, 120, 8))
    return recs


class Run:
    """One run's figures: seconds until durable (every ACK held by the gateway) and until in
    the live state, records sent, and CPU seconds the gateway and the hub used until
    durable (the hub's also until its live state had every record)."""

    def __init__(self, sent: int, durable: float, live: float, gateway_cpu: float,
                 hub_cpu: float, hub_cpu_live: float, version: int | None = None) -> None:
        self.sent = sent
        self.version = version  # the protocol version the hub agreed (None: not known)
        self.durable = durable
        self.live = live
        self.gateway_cpu = gateway_cpu
        self.hub_cpu = hub_cpu
        self.hub_cpu_live = hub_cpu_live

    @property
    def rate(self) -> float:
        return self.sent / self.durable

    @property
    def live_rate(self) -> float:
        return self.sent / self.live

    @property
    def gateway_us(self) -> float:
        """Gateway CPU microseconds per record (= CPU seconds per million records)."""
        return self.gateway_cpu / self.sent * 1e6

    @property
    def hub_us(self) -> float:
        """Hub CPU microseconds per record until durable."""
        return self.hub_cpu / self.sent * 1e6

    @property
    def hub_live_us(self) -> float:
        """Hub CPU microseconds per record until its live state had every record (a full
        hub: the live state's apply included; the bench's polling of /api/stats too)."""
        return self.hub_cpu_live / self.sent * 1e6


async def gateway_run(port: int, n_records: int, batch: int | None, tmp: Path, *,
                      protocol: int = 2, spool: bool = True) -> None:
    """The gateway side of one run (in its own process, ``--serve-gateway``): prints
    ``start`` as it begins putting, then ``done <json>`` once the hub has acknowledged
    every record: the monotonic times (system-wide on Linux) and this process's CPU."""
    raw: dict[str, Any] = {
        "gateway": {"id": "bench", "token": "bench", "state_dir": str(tmp),
                    "hub_url": f"ws://127.0.0.1:{port}/ws/gateway"},
        "batch": {"max_delay_ms": 50} if batch is None else {"max_records": batch,
                                                             "max_delay_ms": 50},
        "queue": {"max_frames": 256},
        "uplink": {"max_protocol_version": min(protocol, max(SUPPORTED_VERSIONS))},
    }
    if spool:
        raw["spool"] = {}  # defaults: <state_dir>/spool, group commit, fsync per group
    cfg = build(GatewayConfig, raw)
    parts = [make_part(i) for i in range(64)]
    async with trio.open_nursery() as nursery:
        gw = Gateway(cfg)
        await nursery.start(gw.run)
        while gw.uplink is None or not gw.uplink.connected:
            await trio.sleep(0.01)
        print("start", flush=True)
        t0, cpu0 = time.monotonic(), time.process_time()
        sent = 0
        i = 0
        while sent < n_records:
            group = [r for p in parts[i % 8 * 8: i % 8 * 8 + 8] for r in p]  # 72 records
            await gw.sink.put(group, source="tester")
            sent += len(group)
            i += 1
        await gw.flush()
        store = gw.store
        while store.first_unacked < store.next_seq:
            await trio.sleep(0.002)
        t1, cpu1 = time.monotonic(), time.process_time()
        # the version agreed (a checkout without hub_version: the one offered, which its
        # own hub agrees)
        agreed = getattr(gw.uplink, "hub_version", None) or min(protocol, max(SUPPORTED_VERSIONS))
        print("done " + json.dumps({"sent": sent, "t0": t0, "t1": t1, "cpu": cpu1 - cpu0,
                                    "version": agreed}), flush=True)
        nursery.cancel_scope.cancel()


def one_run(port: int, hub_pid: int, n_records: int, batch: int | None, tmp: Path, *,
            protocol: int = 2, spool: bool = True, code: str | None = None,
            profile: Path | None = None) -> Run:
    """One run: a gateway process (from ``code``, None: this checkout) sends ``n_records``
    to the hub on ``port`` (process ``hub_pid``)."""
    _, base_fed = progress(port)
    cmd = [sys.executable, __file__, "--serve-gateway", json.dumps(
        {"port": port, "records": n_records, "batch": batch, "tmp": str(tmp),
         "protocol": protocol, "spool": spool})]
    gw = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=_env(code))
    spies = []
    assert gw.stdout is not None
    try:
        line = gw.stdout.readline()
        if line.strip() != "start":
            raise RuntimeError(f"the bench gateway did not start: {line!r}")
        hub_cpu0 = cpu_seconds(hub_pid)
        if profile is not None:
            spies = [_spy(pid, profile.with_name(f"{profile.name}-{side}.txt"))
                     for pid, side in ((hub_pid, "hub"), (gw.pid, "gateway"))]
        line = gw.stdout.readline()
        hub_cpu = cpu_seconds(hub_pid) - hub_cpu0
        if not line.startswith("done "):
            raise RuntimeError(f"the bench gateway failed: {line!r}")
        out = json.loads(line[5:])
        while True:  # the live state (a full hub) may still be applying
            _, fed = progress(port)
            if fed - base_fed >= out["sent"]:
                break
            time.sleep(0.01)
        live = time.monotonic() - out["t0"]
        hub_cpu_live = cpu_seconds(hub_pid) - hub_cpu0
    finally:
        for spy in spies:
            spy.send_signal(signal.SIGINT)
            spy.wait()
        gw.wait()
    return Run(out["sent"], out["t1"] - out["t0"], live, out["cpu"], hub_cpu, hub_cpu_live,
               out.get("version"))


def _env(code: str | None) -> dict[str, str] | None:
    return None if code is None else {**os.environ, "PYTHONPATH": code}


def _spy(pid: int, path: Path) -> subprocess.Popen[bytes]:
    """py-spy on ``pid`` until SIGINT, its raw (collapsed) stacks to ``path``."""
    exe = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    return subprocess.Popen([exe, "record", "--pid", str(pid), "--rate", "250", "--format",
                             "raw", "--threads", "--output", str(path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


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
    # -P: ``-m`` would put the working directory first on sys.path, and run from a
    # checkout that is this checkout's ``edgegw`` whatever PYTHONPATH says (a baseline
    # hub that was this code)
    cmd = ([sys.executable, "-P", "-m", "edgegw", "hub", "--config", str(cfg)]
           if kind != "ingest" else [sys.executable, __file__, "--serve-ingest", str(cfg)])
    hub = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           env=_env(code))
    for _ in range(100):
        try:
            applied(port)
            break
        except OSError:
            time.sleep(0.1)
    return hub


#: issue 17's target for the whole path: gateway -> hub, durable at the hub, spool on
TARGET = 500_000


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--records", type=int, default=300_000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--batch", type=int, default=None,
                    help="records per frame (batch.max_records; default: the gateway's)")
    ap.add_argument("--no-spool", action="store_true",
                    help="the gateway's memory queue instead of its disk spool")
    ap.add_argument("--protocol", type=int, nargs="+", default=[3, 1], choices=[1, 2, 3],
                    help="protocol versions to run, alternately (default: 3 1; each capped at "
                    "the newest its checkout speaks)")
    ap.add_argument("--hub", nargs="+", default=["full"], choices=list(HUBS),
                    help="full: `edgegw hub`; inline: `edgegw hub` with the live state in "
                    "the commit step (before the queue); ingest: the hub's ingest alone "
                    "(default: full)")
    ap.add_argument("--compare", action="store_true", help="same as --hub inline full")
    ap.add_argument("--baseline", metavar="DIR",
                    help="also run every hub and its gateway from the edgegw in DIR, e.g. "
                    "an export of main: before and after side by side")
    ap.add_argument("--profile", metavar="DIR", type=Path,
                    help="py-spy raw stacks of the hub and the gateway of every run into DIR")
    ap.add_argument("--serve-ingest", metavar="CONFIG", help=argparse.SUPPRESS)
    ap.add_argument("--serve-gateway", metavar="JSON", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve_ingest:
        serve_ingest(args.serve_ingest)
        return
    if args.serve_gateway:
        try:  # the process set up as `edgegw gateway` sets it up (a checkout that has it)
            from edgegw.gateway import tune_gc
        except ImportError:
            pass
        else:
            tune_gc()
        o = json.loads(args.serve_gateway)
        trio.run(functools.partial(gateway_run, o["port"], o["records"], o["batch"],
                                   Path(o["tmp"]), protocol=o["protocol"], spool=o["spool"]))
        return
    base_kinds = ["inline", "full"] if args.compare else args.hub
    # label -> (kind, where its edgegw comes from): the baseline's first, "before"
    specs: dict[str, tuple[str, str | None]] = {}
    for kind in base_kinds:
        if args.baseline:
            specs[f"{kind}@base"] = (kind, str(Path(args.baseline).resolve()))
        specs[kind] = (kind, None)
    kinds = list(specs)
    if args.profile:
        args.profile.mkdir(parents=True, exist_ok=True)
    runs: dict[tuple[str, int], list[Run]] = {}
    loads = [os.getloadavg()[0]]
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
                # alternating, each side first in turn: a load drifting through the runs
                # favours no side
                order = list(hubs.items())
                for label, (hub, port) in order if run % 2 == 0 else order[::-1]:
                    for v in args.protocol:
                        r = one_run(port, hub.pid, args.records, args.batch,
                                    Path(tmp) / f"gw-{label}-{run}-v{v}", protocol=v,
                                    spool=not args.no_spool, code=specs[label][1],
                                    profile=args.profile and args.profile / (
                                        f"{label.replace('@', '-')}-{run + 1}-v{v}"))
                        runs.setdefault((label, v), []).append(r)
                        loads.append(os.getloadavg()[0])
                        agreed = "" if r.version in (None, v) else f" (agreed v{r.version})"
                        print(f"hub {label}, run {run + 1}, v{v}{agreed}: {r.sent} records, "
                              f"durable in "
                              f"{r.durable:.2f} s = {r.rate:,.0f} records/s, in the live "
                              f"state in {r.live:.2f} s = {r.live_rate:,.0f} records/s; CPU s "
                              f"per million records: gateway {r.gateway_us:.2f}, hub "
                              f"{r.hub_us:.2f} ({r.hub_live_us:.2f} until in the live state)",
                              flush=True)
        finally:
            for hub, _ in hubs.values():
                hub.terminate()
                hub.wait()
    report(args, kinds, base_kinds, runs, loads)


def report(args: argparse.Namespace, kinds: list[str], base_kinds: list[str],
           runs: dict[tuple[str, int], list[Run]], loads: list[float]) -> None:
    def med(label: str, v: int, what: str) -> float:
        return statistics.median(getattr(r, what) for r in runs[(label, v)])

    store = "memory queue" if args.no_spool else "disk spool"
    batch = "the default" if args.batch is None else args.batch
    print(f"gateway -> hub over loopback (batch {batch} records/frame, gateway {store}, "
          f"durable hub commit), medians of {args.runs} runs, load average "
          f"{min(loads):.1f}-{max(loads):.1f} on {os.cpu_count()} cores:")
    print(f"  {'hub':12s} {'v':>2s} {'durable/s':>10s} {'live/s':>10s}   CPU s per million "
          f"records: {'gateway':>7s} {'hub':>6s} {'sum':>6s}  hub until live")
    for label in kinds:
        for v in args.protocol:
            g, h = med(label, v, "gateway_us"), med(label, v, "hub_us")
            print(f"  {label:12s} v{v} {med(label, v, 'rate'):>10,.0f} "
                  f"{med(label, v, 'live_rate'):>10,.0f}   {'':24s}{g:>7.2f} {h:>6.2f} "
                  f"{g + h:>6.2f}  {med(label, v, 'hub_live_us'):>14.2f}")
    for label in kinds:
        for new in (2, 3):
            if 1 in args.protocol and new in args.protocol:
                print(f"  {label}: v{new}/v1 durable "
                      f"{med(label, new, 'rate') / med(label, 1, 'rate'):.2f}x")
    for kind in base_kinds:
        if f"{kind}@base" in kinds:
            for v in args.protocol:
                b = f"{kind}@base"
                print(f"  {kind} v{v}, this checkout / baseline: durable "
                      f"{med(kind, v, 'rate') / med(b, v, 'rate'):.2f}x, live state complete "
                      f"{med(kind, v, 'live_rate') / med(b, v, 'live_rate'):.2f}x; CPU per "
                      f"record: gateway {med(kind, v, 'gateway_us') / med(b, v, 'gateway_us'):.2f}"
                      f"x, hub {med(kind, v, 'hub_us') / med(b, v, 'hub_us'):.2f}x (until "
                      f"live {med(kind, v, 'hub_live_us') / med(b, v, 'hub_live_us'):.2f}x)")
    v = max(args.protocol)
    for label in kinds:
        g, h = med(label, v, "gateway_us"), med(label, v, "hub_us")
        rate = med(label, v, "rate")
        print(f"  target {TARGET:,} records/s, hub {label} v{v}: {rate:,.0f} = "
              f"{rate / TARGET:.2f}x; at the target the gateway needs {g * TARGET / 1e6:.2f} "
              f"cores, the hub {h * TARGET / 1e6:.2f} (CPU bounds it at "
              f"{1e6 / max(g, h):,.0f}/s on a core each, {2e6 / (g + h):,.0f}/s on 2 "
              f"cores shared)")


if __name__ == "__main__":
    main()
