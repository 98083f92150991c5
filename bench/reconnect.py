"""Reconnection, measured (docs/spool.md, "Reconnection"; docs/protocol.md section 7).

(a) outage: a real hub and a real gateway process, both with the shipped configs
    (conf/hub.toml, conf/gateway.toml: the simulated tester at 100 parts/s, backoff cap
    30 s); a TCP proxy between them (tests/faultkit.py) cuts the link for --outage seconds.
    Prints when the gateway reconnected, when the first record made after the link
    returned was visible at the hub, the live latency meanwhile, and how fast the backlog
    drained against the live rate.

(b) herd: a hub process with --gateways gateway ids, and that many real uplinks
    (edgegw.gateway.uplink.Uplink, shipped [uplink] settings, in-memory stores) in this
    process.  All connected, the hub is SIGKILLed and restarted on the same port.  Prints
    the hub's accept rate, its CPU, the handshake latency (p50/p99), and how many were
    refused for load (503) or failed.

    python bench/reconnect.py [--outage 60] [--gateways 300] [--only a|b]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import trio

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from faultkit import Proxy  # noqa: E402  (the fault tests' TCP proxy)

from edgegw.config import build  # noqa: E402
from edgegw.gateway.config import GatewayConfig  # noqa: E402
from edgegw.gateway.uplink import Uplink  # noqa: E402
from edgegw.metrics import Metrics  # noqa: E402
from edgegw.protocol import decode_body  # noqa: E402
from edgegw.store import MemoryFrameStore  # noqa: E402


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url: str, timeout: float = 2.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


def wait_for(predicate: Any, timeout: float = 60.0, interval: float = 0.05) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate():
                return time.time()
        except Exception:
            pass
        time.sleep(interval)
    raise SystemExit(f"condition not met within {timeout} s")


def spawn(log: Path, *args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "edgegw", *args], cwd=REPO,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"),
                            stdout=open(log, "ab"), stderr=subprocess.STDOUT)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pct(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(p / 100 * len(values)))]


# --- (a) a long link cut with the shipped configs ------------------------------------------


def frame_times(db_path: Path) -> list[tuple[float, float, float, int]]:
    """(applied_at, oldest record ts, newest record ts, records) of every tester frame."""
    db = sqlite3.connect(db_path)
    try:
        rows = db.execute("SELECT applied_at, body FROM frames WHERE n_records > 0").fetchall()
    finally:
        db.close()
    out = []
    for applied_at, body in rows:
        _, sources, wire = decode_body(body, 1 << 30)
        ts = [w[2] for w in wire if sources[w[1]] == "tester"]
        if ts:
            out.append((applied_at, min(ts), max(ts), len(ts)))
    return out


def outage(tmp: Path, seconds: float) -> None:
    hub_port, status = free_port(), free_port()
    hub = spawn(tmp / "hub.log", "hub", "--config", str(REPO / "conf/hub.toml"),
                "--set", f"hub.port={hub_port}", "--set", f"hub.data_dir={tmp / 'hub'}")
    proxy = Proxy(hub_port)
    gw = None
    try:
        wait_for(lambda: get_json(f"http://127.0.0.1:{hub_port}/healthz")["status"] == "ok")
        gw = spawn(tmp / "gw.log", "gateway", "--config", str(REPO / "conf/gateway.toml"),
                   "--set", f"gateway.hub_url=ws://127.0.0.1:{proxy.port}/ws/gateway",
                   "--set", f"gateway.state_dir={tmp / 'gw'}",
                   "--set", f"gateway.status_port={status}")

        def gw_stats() -> dict[str, Any]:
            return get_json(f"http://127.0.0.1:{status}/api/stats")

        wait_for(lambda: gw_stats()["connected"])
        time.sleep(3.0)
        proxy.drop()
        cut = time.time()
        print(f"(a) link cut for {seconds:g} s (hub {hub_port}, proxy {proxy.port}), shipped "
              f"conf/gateway.toml and conf/hub.toml ...", flush=True)
        time.sleep(seconds)
        backlog_frames = gw_stats()["store"]["frames"]
        proxy.restore()
        restored = time.time()
        reconnected = wait_for(lambda: gw_stats()["connected"], interval=0.02)
        wait_for(lambda: gw_stats()["store"]["frames"] <= 2, timeout=120, interval=0.1)
        time.sleep(5.0)  # live data after the drain
        frames = frame_times(tmp / "hub" / "hub.sqlite3")
    finally:
        if gw is not None:
            gw.terminate()
            gw.wait()
        hub.terminate()
        hub.wait()
        proxy.close()
    # records made while the link was down and applied after it returned: the backlog
    backlog = [f for f in frames if f[2] < restored and f[0] >= restored]
    drain_s = max(f[0] for f in backlog) - restored
    backlog_records = sum(f[3] for f in backlog)
    made_down = sum(f[3] for f in frames if cut <= f[1] and f[2] < restored)
    live_rate = made_down / (restored - cut)
    new = [f for f in frames if f[2] >= restored]  # frames holding a record made after
    first_visible = min(f[0] for f in new) - restored
    made_after = sorted((f[1], f[0]) for f in new if f[1] >= restored)
    during_drain = [a - t for t, a in made_after if t <= restored + drain_s + 1]
    later = [a - t for t, a in made_after]
    print(f"(a) gateway reconnected {reconnected - restored:.2f} s after the link returned; "
          f"first record made after it visible at the hub {first_visible:.2f} s after")
    print(f"(a) live latency (oldest record of each frame made after the return): max "
          f"{max(during_drain, default=float('nan')):.2f} s while the backlog drained, max "
          f"{max(later):.2f} s / p50 {statistics.median(later):.2f} s over the next "
          f"{made_after[-1][0] - restored:.0f} s")
    print(f"(a) backlog: {backlog_frames} frames, {backlog_records:,} records drained "
          f"{drain_s:.2f} s after the link returned = {backlog_records / drain_s:,.0f} "
          f"records/s = {backlog_records / drain_s / live_rate:.0f}x the live "
          f"{live_rate:,.0f} records/s")


# --- (b) a floor of gateways returning to a restarted hub ----------------------------------


def hub_toml(tmp: Path, port: int, n: int) -> Path:
    path = tmp / "hub-herd.toml"
    lines = ["[hub]", f"port = {port}", f'data_dir = "{tmp / "herd"}"', ""]
    for i in range(n):
        lines += [f"[gateways.gw-{i:04d}]", f'token = "t-{i:04d}"', ""]
    path.write_text("\n".join(lines))
    return path


async def herd(tmp: Path, n: int) -> None:
    port = free_port()
    cfg_path = hub_toml(tmp, port, n)
    hub_args = ("hub", "--config", str(cfg_path))
    hub = spawn(tmp / "herd-hub.log", *hub_args)
    uplinks: list[Uplink] = []
    try:
        await trio.to_thread.run_sync(
            wait_for, lambda: get_json(f"http://127.0.0.1:{port}/healthz")["status"] == "ok")
        async with trio.open_nursery() as nursery:
            for i in range(n):
                cfg = build(GatewayConfig, {"gateway": {
                    "id": f"gw-{i:04d}", "token": f"t-{i:04d}", "state_dir": str(tmp / "x"),
                    "hub_url": f"ws://127.0.0.1:{port}/ws/gateway"}})
                up = Uplink(cfg.gateway, cfg.uplink, MemoryFrameStore(), Metrics())
                uplinks.append(up)
                nursery.start_soon(up.run)
            t0 = time.time()
            while not all(u.connected for u in uplinks):
                await trio.sleep(0.02)
            print(f"(b) {n} uplinks (shipped [uplink] settings) connected in "
                  f"{time.time() - t0:.2f} s from a cold start", flush=True)
            cpu0 = cpu_seconds(hub.pid)
            await trio.sleep(5.0)
            idle_cpu = (cpu_seconds(hub.pid) - cpu0) / 5.0
            hub.send_signal(signal.SIGKILL)
            await trio.to_thread.run_sync(hub.wait)
            while any(u.connected for u in uplinks):
                await trio.sleep(0.02)
            probes0 = sum(u.m_probes.total() for u in uplinks)
            down_s = 5.0
            await trio.sleep(down_s)
            probes_down = sum(u.m_probes.total() for u in uplinks) - probes0
            connects0 = [u.m_connects.total() for u in uplinks]
            failures0 = sum(u.m_failures.total() for u in uplinks)
            hub = spawn(tmp / "herd-hub.log", *hub_args)
            started = time.time()
            # when the restarted hub listens: its first answer to our own probe
            while True:
                try:
                    await trio.to_thread.run_sync(
                        lambda: get_json(f"http://127.0.0.1:{port}/ws/gateway", timeout=1))
                    break
                except Exception:
                    await trio.sleep(0.005)
            listening = time.time()
            cpu_start = cpu_seconds(hub.pid)
            self_start = cpu_seconds(os.getpid())
            welcomed: dict[int, float] = {}
            while len(welcomed) < n and time.time() - listening < 120:
                now = time.time()
                for i, u in enumerate(uplinks):
                    if i not in welcomed and u.m_connects.total() > connects0[i]:
                        welcomed[i] = now
                await trio.sleep(0.005)
            all_in = time.time()
            cpu_used = cpu_seconds(hub.pid) - cpu_start
            self_used = cpu_seconds(os.getpid()) - self_start
            stats = await trio.to_thread.run_sync(
                get_json, f"http://127.0.0.1:{port}/api/stats")
            nursery.cancel_scope.cancel()
    finally:
        hub.terminate()
        hub.wait()
    times = sorted(t - listening for t in welcomed.values())
    shakes = [u.handshake_s for i, u in enumerate(uplinks) if i in welcomed and u.handshake_s]
    busy = sum(u.m_probes.get(outcome="busy") for u in uplinks)
    failures = sum(u.m_failures.total() for u in uplinks) - failures0
    window = max(times[-1], 1e-3)
    bins: dict[int, int] = {}
    for t in times:
        bins[int(t * 10)] = bins.get(int(t * 10), 0) + 1
    hub_busy = stats["metrics"].get("hub_busy_total") or 0
    hub_busy = sum(hub_busy.values()) if isinstance(hub_busy, dict) else hub_busy
    print(f"(b) while the hub was down: {probes_down / down_s / n:.2f} probes/s per gateway "
          f"({probes_down / down_s:,.0f}/s in all, each a refused TCP connect)")
    print(f"(b) hub restarted: listening {listening - started:.2f} s after exec; "
          f"{len(welcomed)}/{n} gateways welcomed again, the last {times[-1]:.2f} s after it "
          f"listened (first {times[0]:.2f} s, median {statistics.median(times):.2f} s)")
    print(f"(b) accept rate: {len(times) / window:,.0f} handshakes/s over the window, peak "
          f"{max(bins.values()) * 10:,} /s (100 ms bins)")
    print(f"(b) handshake latency (TCP + WebSocket + HELLO/WELCOME, after the probe): p50 "
          f"{statistics.median(shakes) * 1000:.1f} ms, p99 {pct(shakes, 99) * 1000:.1f} ms, "
          f"max {max(shakes) * 1000:.1f} ms")
    print(f"(b) hub CPU: {cpu_used:.2f} CPU-s from listening to all welcomed "
          f"({cpu_used / max(len(welcomed), 1) * 1000:.1f} ms per probe + handshake, "
          f"{cpu_used / (all_in - listening) * 100:.0f} % of one core over "
          f"{all_in - listening:.2f} s); idle with {n} connected: {idle_cpu * 100:.1f} %; "
          f"the {n} uplinks' process meanwhile: "
          f"{self_used / (all_in - listening) * 100:.0f} % (load average "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)")
    print(f"(b) refused for load: {busy} probes answered 503 (hub_busy_total {hub_busy}); "
          f"failed attempts {failures}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--outage", type=float, default=60.0)
    ap.add_argument("--gateways", type=int, default=300)
    ap.add_argument("--only", choices=["a", "b"])
    args = ap.parse_args()
    logging.basicConfig(level=logging.ERROR)  # 300 uplinks' "link down" lines are expected
    with tempfile.TemporaryDirectory() as tmp:
        if args.only in (None, "a"):
            outage(Path(tmp), args.outage)
        if args.only in (None, "b"):
            trio.run(herd, Path(tmp), args.gateways)


if __name__ == "__main__":
    main()
