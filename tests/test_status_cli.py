"""``edgegw status`` asks a running gateway how it is (edgegw/status_cli.py): a real hub
and gateway; the exit status says running and connected (0), running but not reaching
the hub (1), a config that does not load (2), nothing answering or no status port (3)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from faultkit import Gateway, Hub, source_settings, stop_all
from processes import REPO, wait_for

from edgegw.status_cli import summarize

CONFIG = str(REPO / "conf" / "gateway.toml")


def status(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "edgegw", "status", *args],
                          capture_output=True, text=True, timeout=60)


def test_status_says_connected_then_not_connected_then_not_running(tmp_path: Path) -> None:
    hub = Hub(tmp_path).start()
    gw = Gateway(tmp_path, hub.port, *source_settings(parts_per_second=50, seed=5)).start()
    port = f"gateway.status_port={gw.status}"
    try:
        wait_for(lambda: gw.stats()["connected"])
        wait_for(lambda: gw.stats()["metrics"].get("gateway_records_in_total"))
        up = status("--config", CONFIG, "--set", port)
        assert up.returncode == 0, up.stdout + up.stderr
        lines = up.stdout.splitlines()
        assert lines[0] == "gateway ate-01: running, healthy"
        assert lines[1] == "hub:      connected"
        assert any(line.startswith("spool:    ") for line in lines)
        assert any(line.startswith("records:  ") and "tester " in line for line in lines)

        hub.stop()  # frames now wait in the spool
        wait_for(lambda: not gw.stats()["connected"])
        wait_for(lambda: gw.stats()["store"]["frames"] > 0)
        down = status("--url", f"http://127.0.0.1:{gw.status}")
        assert down.returncode == 1, down.stdout + down.stderr
        assert "hub:      NOT CONNECTED (" in down.stdout
        assert "frame(s) waiting" in down.stdout and "not yet acknowledged" in down.stdout
        as_json = status("--url", f"http://127.0.0.1:{gw.status}", "--json")
        assert as_json.returncode == 1
        answer = json.loads(as_json.stdout)
        assert answer["stats"]["gateway"] == "ate-01" and answer["stats"]["connected"] is False

        gw.stop()
        gone = status("--config", CONFIG, "--set", port)
        assert gone.returncode == 3
        assert f"no gateway answers at http://127.0.0.1:{gw.status}" in gone.stderr
    finally:
        stop_all(hub, gw)


def test_without_a_status_port_or_a_loadable_config_it_says_so(tmp_path: Path) -> None:
    off = status("--config", CONFIG, "--set", "gateway.status_port=0")
    assert off.returncode == 3
    assert "gateway.status_port is 0 (off)" in off.stderr
    broken = tmp_path / "gateway.toml"
    broken.write_text("[gateway\nid = ")
    bad = status("--config", str(broken))
    assert bad.returncode == 2
    assert "config error" in bad.stderr


def test_a_gateway_without_a_spool_is_said_to_keep_its_frames_in_memory() -> None:
    lines, code = summarize(
        {"status": "unhealthy", "detail": "frames wait and nothing was acknowledged"},
        {"gateway": "ate-07", "connected": True, "store": {"kind": "memory", "frames": 3},
         "metrics": {"gateway_records_in_total": {"source=tester": 40, "source=sensors": 2},
                     "uplink_frames_rejected_total": 1}})
    assert code == 1
    assert lines[0] == ("gateway ate-07: running, UNHEALTHY: frames wait and nothing was "
                        "acknowledged")
    assert lines[2].startswith("queue:    3 frame(s) waiting in memory")
    assert lines[3] == "records:  sensors 2; tester 40 put by sources since the start"
    assert lines[4].startswith("rejected: 1 frame(s) rejected by the hub")
    # healthy and connected, but a frame the hub rejected waits for someone to act
    _, code = summarize({"status": "ok"}, {"gateway": "ate-07", "connected": True, "store": {
        "kind": "memory", "frames": 0}, "metrics": {"uplink_frames_rejected_total": 1}})
    assert code == 1
    _, code = summarize({"status": "ok"}, {"gateway": "ate-07", "connected": True, "store": {
        "kind": "memory", "frames": 0}, "metrics": {"uplink_frames_rejected_total": 0}})
    assert code == 0
    # held by a full dead-letter file (a file from an earlier run: nothing counted yet)
    lines, code = summarize({"status": "ok"}, {"gateway": "ate-07", "connected": True,
                                               "store": {"kind": "memory", "frames": 9},
                                               "metrics": {"uplink_dead_letter_full": 1}})
    assert code == 1 and lines[-1].startswith("HELD:     the dead-letter file is over")
