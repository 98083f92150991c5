"""Gateway and hub as two real processes over a loopback WebSocket."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from ports import free_port
from processes import REPO, get_json, spawn, stop, wait_for


def start_hub(tmp: Path, port: int) -> subprocess.Popen[bytes]:
    proc = spawn("hub", "--config", str(REPO / "conf" / "hub.toml"),
                 "--set", f"hub.port={port}", "--set", f"hub.data_dir={tmp / 'hub'}",
                 "--set", "hub.heartbeat_s=1.0", log=tmp / "hub.log")
    wait_for(lambda: get_json(f"http://127.0.0.1:{port}/healthz")["status"] == "ok")
    return proc


def records_applied(port: int) -> int:
    return get_json(f"http://127.0.0.1:{port}/api/stats")["gateways"]["ate-01"]["records_applied"]


def test_the_example_configs_run_as_two_processes_and_records_arrive(tmp_path: Path) -> None:
    port = free_port()
    hub = start_hub(tmp_path, port)
    gw = spawn("gateway", "--config", str(REPO / "conf" / "gateway.toml"),
               "--set", f"gateway.hub_url=ws://127.0.0.1:{port}/ws/gateway",
               "--set", f"gateway.state_dir={tmp_path / 'gw'}",
               "--set", f"gateway.status_port={free_port()}", log=tmp_path / "gw.log")
    try:
        wait_for(lambda: records_applied(port) > 0)
        first = records_applied(port)
        wait_for(lambda: records_applied(port) > first + 100)
        stats = get_json(f"http://127.0.0.1:{port}/api/stats")["gateways"]["ate-01"]
        assert stats["connected"] is True and stats["duplicates_dropped"] == 0
    finally:
        stop(gw)
        stop(hub)


def test_the_gateway_rides_out_a_hub_restart(tmp_path: Path) -> None:
    port = free_port()
    status = free_port()
    hub = start_hub(tmp_path, port)
    gw = spawn("gateway", "--config", str(REPO / "conf" / "gateway.toml"),
               "--set", f"gateway.hub_url=ws://127.0.0.1:{port}/ws/gateway",
               "--set", f"gateway.state_dir={tmp_path / 'gw'}",
               "--set", "uplink.backoff_initial_s=0.2", "--set", "uplink.backoff_max_s=1.0",
               "--set", "sources.0.parts_per_second=200",
               "--set", f"gateway.status_port={status}", log=tmp_path / "gw.log")
    try:
        wait_for(lambda: records_applied(port) > 500)
        hub.kill()  # no goodbye: the gateway finds out by itself
        hub.wait()
        # the tester keeps testing: frames queue in the gateway, which knows the link is down
        # (waited for, not slept: a fixed 2 s here was pure overhead)
        wait_for(lambda: not get_json(f"http://127.0.0.1:{status}/api/stats")["connected"]
                 and get_json(f"http://127.0.0.1:{status}/api/stats")["store"]["frames"] > 0
                 and "hub link down" in (tmp_path / "gw.log").read_text(), timeout=30)
        hub = start_hub(tmp_path, port)
        before = records_applied(port)
        wait_for(lambda: records_applied(port) > before + 2000, timeout=30)
        stats = get_json(f"http://127.0.0.1:{port}/api/stats")["gateways"]["ate-01"]
        assert stats["connected"] is True
        assert stats["frames_lost"] == 0
        assert "hub link down" in (tmp_path / "gw.log").read_text()
        gw_stats = get_json(f"http://127.0.0.1:{status}/api/stats")
        assert gw_stats["metrics"]["uplink_connects_total"] >= 2
        assert gw_stats["connected"] is True
    finally:
        stop(gw)
        stop(hub)


def test_demo_reports_nothing_lost_and_nothing_duplicated() -> None:
    out = subprocess.run([sys.executable, "-m", "edgegw", "demo", "--duration", "4",
                          "--port", "0"], capture_output=True, text=True, cwd=REPO, timeout=90)
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary["produced"] > 0
    assert summary["received"] == summary["produced"]
    assert summary["lost"] == 0 and summary["duplicates"] == 0
    assert "http://127.0.0.1:" in out.stdout
