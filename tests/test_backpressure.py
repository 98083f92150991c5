"""Backpressure is not silence: a busy hub and a healthy gateway keep their link.

When the hub's durable commit is slow (a slow disk; here the ``hub.mid_commit`` failpoint
sleeps in the store's worker thread while the Trio loop goes on), the connection's apply
queue fills and its receiver stops reading: the gateway's frames and PINGs wait unread in
the socket, and its sends then wait on the full socket buffers.  Neither end is silent --
the gateway is sending, the hub is PINGing -- so neither may close the other with 4005:
that would make every busy moment of the hub a reconnect storm (docs/protocol.md
section 7, docs/reliability.md "Backpressure is not silence").  The real processes, as
``test_pause.py`` runs them, with a 1 s heartbeat: a stall of 4 x heartbeat.
"""

from __future__ import annotations

import urllib.request
from pathlib import Path

from faultkit import (
    Gateway,
    Hub,
    assert_exactly_once,
    expected_records,
    source_settings,
    stop_all,
    wait_all_applied,
)
from processes import wait_for

SOURCE = {"parts_per_second": 1000, "max_parts": 6000, "seed": 11, "wafers": 200}
STALL_S = 4.0  # one commit this long: twice the heartbeat timeout (2 x 1 s) and more


def metric(hub: Hub, name: str, *labels: str) -> float:
    """The sum of ``name``'s samples whose labels include every one of ``labels``."""
    with urllib.request.urlopen(f"{hub.url}/metrics", timeout=2) as r:
        lines = r.read().decode().splitlines()
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines
               if line.startswith((name + "{", name + " "))
               and all(label in line for label in labels))


def test_a_hub_whose_commit_stalls_mid_stream_keeps_its_gateway_connected(
        tmp_path: Path) -> None:
    """One commit takes 4 s while the gateway streams; the hub's apply queue (2 frames)
    fills at once and its receiver stops reading for those 4 s.  The link stays up:
    no heartbeat timeout at the hub, no lost link at the gateway, one connection from
    start to end, and every record once."""
    hub = Hub(tmp_path).start(f"hub.mid_commit=20:sleep={STALL_S}", True,
                              "hub.apply_queue_frames=2")
    gw = Gateway(tmp_path, hub.port, *source_settings(**SOURCE)).start()
    expected = expected_records(**SOURCE)
    try:
        # the stall happened: frames waited longer than the heartbeat timeout to commit
        wait_for(lambda: metric(hub, "edgegw_hub_frame_apply_seconds_count")
                 - metric(hub, "edgegw_hub_frame_apply_seconds_bucket", 'le="2.5"') > 0,
                 timeout=60, interval=0.1)
        wait_all_applied(hub, gw, len(expected))
        assert metric(hub, "edgegw_hub_protocol_errors_total",
                      'reason="heartbeat_timeout"') == 0
        gw_metrics = gw.stats()["metrics"]
        assert gw_metrics.get("uplink_failures_total", 0) in (0, {}), gw_metrics
        assert gw_metrics["uplink_connects_total"] == 1
        assert hub.stats()["frames_lost"] == 0
        assert_exactly_once(hub.dir, expected)
    finally:
        stop_all(hub, gw)
