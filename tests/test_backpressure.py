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

from pathlib import Path

import cbor2
import trio
from faultkit import (
    GATEWAY,
    TOKEN,
    Gateway,
    Hub,
    assert_exactly_once,
    expected_records,
    source_settings,
    stop_all,
    wait_all_applied,
)
from peer_gateway import PING, WELCOME, data, hello, rows, sensor
from processes import wait_for
from wsclient import WsClient

SOURCE = {"parts_per_second": 1000, "max_parts": 6000, "seed": 11, "wafers": 200}
STALL_S = 4.0  # one commit this long: twice the heartbeat timeout (2 x 1 s) and more


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
        wait_for(lambda: hub.metric("edgegw_hub_frame_apply_seconds_count")
                 - hub.metric("edgegw_hub_frame_apply_seconds_bucket", 'le="2.5"') > 0,
                 timeout=60, interval=0.1)
        wait_all_applied(hub, gw, len(expected))
        assert hub.metric("edgegw_hub_protocol_errors_total",
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
        assert hub.metric("edgegw_hub_frame_apply_seconds_count") == 0  # still hung
        assert hub.metric("edgegw_hub_protocol_errors_total",
                      'reason="heartbeat_timeout"') == 0  # found by TCP, not by silence
    finally:
        hub.kill()  # its commit hangs: no clean stop to wait for
        gw.kill()


def masked_frame(payload: bytes) -> bytes:
    """One client WebSocket frame (binary, FIN, masked as a client's must be; < 126 B)."""
    key = b"\x0f\x1e\x2d\x3c"
    return (bytes((0x82, 0x80 | len(payload))) + key
            + bytes(b ^ key[i % 4] for i, b in enumerate(payload)))


#: PINGs sent back to back by a gateway that reads nothing: their PONGs (~12 B each) are
#: far more than the socket buffers between the hub and it hold (a 4 KiB receive buffer
#: at the peer, the hub's send buffer: at most tcp_wmem's 4 MiB)
FLOOD_PINGS = 600_000


async def test_a_gateway_that_pings_but_does_not_read_does_not_stop_the_hubs_reading(
        tmp_path: Path) -> None:
    """docs/protocol.md section 7: an end never stops reading to write a PONG.  A gateway
    busy elsewhere reads nothing (a small receive buffer) and sends PINGs -- a flood of
    them -- then a DATA frame.  The hub answers PINGs from their own task, at most one
    PONG waiting (the newest PING's), so its receiver reads on, through every PING, to the
    DATA frame, and applies it while the gateway still reads nothing.  Before, the receiver
    wrote each PONG itself: a PONG per PING (7 MB) filled the buffers, it waited on that
    write and read nothing more -- the DATA frame was never applied (nor the flood's end
    read).  Now the PONGs are a trickle (seen with ``ss``: under 600 bytes waiting at the
    gateway after 17 s), so the hub's writes never meet a zero window and its
    ``TCP_USER_TIMEOUT`` (2 heartbeats) never starts; the zero window is the gateway's,
    whose flood the hub reads as fast as it decodes it."""
    hub = Hub(tmp_path).start("", True)
    try:
        peer = await WsClient.connect(hub.port, "/ws/gateway", rcvbuf=4096)
        await peer.send(hello(GATEWAY, TOKEN, "epoch-1", 1, heartbeat=1.0))
        assert cbor2.loads(await peer.recv())[0] == WELCOME
        ping = masked_frame(cbor2.dumps([PING, 1.5]))
        frame = data(1, rows(1, [sensor("t", 25.0), sensor("t", 25.5)]))

        async def flood_then_data() -> None:
            chunk = ping * 5000
            for _ in range(FLOOD_PINGS // 5000):
                await peer.send_raw(chunk)
            await peer.send(frame)

        def applied() -> bool:
            return int(hub.stats().get("frames_applied", 0)) >= 1

        async with trio.open_nursery() as nursery:
            nursery.start_soon(flood_then_data)
            # generous: the hub decodes the whole flood first (a few seconds)
            await trio.to_thread.run_sync(
                lambda: wait_for(applied, timeout=90, interval=0.2))
            assert hub.stats()["records_applied"] == 2
            nursery.cancel_scope.cancel()
        await peer.aclose()
    finally:
        hub.stop()
