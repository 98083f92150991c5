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


HUNG_S = 30.0  # a commit that hangs (a stuck disk): far longer than the test waits


def test_a_gateway_that_dies_while_a_commit_hangs_is_reported_gone_before_it_returns(
        tmp_path: Path) -> None:
    """The hub's first commit hangs; its apply queue (2 frames) fills and its receiver
    stops reading, so the gateway's silence is not judged -- but its PINGs go on.  The
    gateway is killed: its kernel resets the connection at the hub's next PING, the PING
    after fails, and the hub reports the gateway gone then, while the commit still hangs.
    Before, the connection -- its applier waiting on the commit's worker thread, which
    cannot be cancelled -- showed the gateway connected until the commit returned."""
    hub = Hub(tmp_path).start(f"hub.mid_commit=1:sleep={HUNG_S}", True,
                              "hub.apply_queue_frames=2")
    gw = Gateway(tmp_path, hub.port, *source_settings(**SOURCE)).start()
    try:
        # frames are sent, none is acknowledged: the first commit hangs, reading stopped
        wait_for(lambda: gw.stats()["metrics"].get("uplink_frames_sent_total", 0) >= 4
                 and hub.stats().get("connected"), timeout=60, interval=0.05)
        gw.kill()
        # a few heartbeats (1 s), well before the hung commit returns
        wait_for(lambda: not hub.stats().get("connected"), timeout=HUNG_S / 3,
                 interval=0.1)
        assert metric(hub, "edgegw_hub_frame_apply_seconds_count") == 0  # still hung
        assert metric(hub, "edgegw_hub_protocol_errors_total",
                      'reason="heartbeat_timeout"') == 0  # found by TCP, not by silence
    finally:
        hub.kill()  # its commit hangs: no clean stop to wait for
        gw.kill()
