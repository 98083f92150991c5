"""Paused processes: a VM freeze, a swap storm, a long GC pause (SIGSTOP ... SIGCONT).

A paused process is not dead: its sockets stay open, the kernel keeps accepting its
connections and buffering its input, and when it wakes its clocks have jumped.  A real hub
and a real gateway (``python -m edgegw hub/gateway``, as ``test_faults.py`` runs them) are
paused in turn mid-stream, past the heartbeat timeout (2 x ``heartbeat_s`` = 2 s here), and
the hub's durable store must then hold every tester record exactly once
(docs/reliability.md, "Paused processes").  The cluster version is in
``test_cluster_pause.py``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

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
from processes import wait_for
from trio_websocket import ConnectionClosed, open_websocket_url

from edgegw.protocol import GatewayConnection, Ping, Pong, decode, encode

# 6,000 parts at 1,000/s: ~54k records over 6 s of tester, so a 4 s pause that starts
# after the first 10k records lands while the tester is still producing.
SOURCE = {"parts_per_second": 1000, "max_parts": 6000, "seed": 11, "wafers": 200}
# at least twice the 2 s heartbeat timeout of both ends; EDGEGW_PAUSE_S=60 for the longer
# run (docs/reliability.md, "Paused processes")
PAUSE_S = float(os.environ.get("EDGEGW_PAUSE_S", "4"))


@contextlib.contextmanager
def paused(proc: subprocess.Popen[bytes] | None, at_least: float = PAUSE_S) -> Iterator[None]:
    """The process SIGSTOPped for the block, and at least ``at_least`` seconds; SIGCONT at
    the end, also when the block fails (a stopped process would not even die by SIGTERM)."""
    assert proc is not None and proc.poll() is None
    os.kill(proc.pid, signal.SIGSTOP)
    started = time.monotonic()
    try:
        yield
        time.sleep(max(0.0, at_least - (time.monotonic() - started)))
    finally:
        os.kill(proc.pid, signal.SIGCONT)


def records_in_from_tester(gw: Gateway) -> int:
    counts = gw.stats()["metrics"].get("gateway_records_in_total", {})
    return int(counts.get("source=tester", 0)) if isinstance(counts, dict) else 0


def uplink_failures(gw: Gateway) -> int:
    """Links the gateway lost or could not open, so far (every reason)."""
    value = gw.stats()["metrics"].get("uplink_failures_total", 0)
    return int(sum(value.values()) if isinstance(value, dict) else value)


def heartbeat_timeouts(hub: Hub) -> float:
    """The hub's ``edgegw_hub_protocol_errors_total{reason="heartbeat_timeout"}``."""
    with urllib.request.urlopen(f"{hub.url}/metrics", timeout=2) as r:
        for line in r.read().decode().splitlines():
            if line.startswith("edgegw_hub_protocol_errors_total{") \
                    and 'reason="heartbeat_timeout"' in line:
                return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_a_hub_paused_mid_stream_loses_and_duplicates_nothing(tmp_path: Path) -> None:
    """The hub freezes for 4 s while the gateway streams: the gateway's heartbeat expires,
    it spools and probes (a paused hub's kernel still completes the TCP handshake, nothing
    answers), and when the hub wakes -- with frames, PINGs and a close in its sockets'
    buffers, and every heartbeat deadline passed -- the gateway reconnects and resends what
    was not acknowledged; WELCOME's applied set makes the resend of any frame committed
    just before the freeze a duplicate, dropped."""
    hub = Hub(tmp_path).start()
    gw = Gateway(tmp_path, hub.port, *source_settings(**SOURCE)).start()
    expected = expected_records(**SOURCE)
    try:
        wait_for(lambda: hub.stats().get("records_applied", 0) >= 10_000,
                 timeout=60, interval=0.05)
        failures = uplink_failures(gw)
        with paused(hub.proc):
            # the gateway gives the silent hub up (4005) while it sleeps -- also when its
            # sends wait on socket buffers the sleeping hub no longer empties
            wait_for(lambda: not gw.stats()["connected"] and uplink_failures(gw) > failures,
                     timeout=30, interval=0.1)
            # the freeze was mid-stream: the tester went on producing into the spool
            assert records_in_from_tester(gw) < len(expected)
        wait_all_applied(hub, gw, len(expected))
        assert gw.stats()["metrics"]["uplink_connects_total"] >= 2
        assert hub.stats()["frames_lost"] == 0
        assert_exactly_once(hub.dir, expected)
    finally:
        stop_all(hub, gw)


def test_a_gateway_paused_mid_stream_is_dropped_by_the_hub_and_recovers(
        tmp_path: Path) -> None:
    """The gateway freezes for 4 s mid-stream: the hub, hearing nothing for 2 x heartbeat,
    closes the connection with 4005 (counted as a heartbeat timeout); the gateway wakes with
    that close in its socket, its frames in flight unacknowledged and its tester's clock
    4 s on, reconnects and resends: every record once."""
    hub = Hub(tmp_path).start()
    gw = Gateway(tmp_path, hub.port, *source_settings(**SOURCE)).start()
    expected = expected_records(**SOURCE)
    try:
        wait_for(lambda: hub.stats().get("records_applied", 0) >= 10_000,
                 timeout=60, interval=0.05)
        before = heartbeat_timeouts(hub)
        assert records_in_from_tester(gw) < len(expected), "paused after the tester ended"
        with paused(gw.proc):
            # the hub drops the silent connection while the gateway sleeps
            wait_for(lambda: heartbeat_timeouts(hub) >= before + 1, timeout=30, interval=0.1)
        wait_all_applied(hub, gw, len(expected))
        assert gw.stats()["metrics"]["uplink_connects_total"] >= 2
        assert hub.stats()["frames_lost"] == 0
        assert_exactly_once(hub.dir, expected)
    finally:
        stop_all(hub, gw)


def test_a_hub_woken_from_a_pause_reads_the_pings_waiting_for_it_before_judging_silence(
        tmp_path: Path) -> None:
    """A gateway that stays alive through the hub's pause (it goes on PINGing, and does not
    judge the hub itself) finds the link still up after the hub wakes: the hub's heartbeat
    deadline passed while it slept, but the PINGs waiting in its socket are read before
    its silence is judged.  Before, the hub's timer ran first on waking and closed the live
    link with 4005 ("nothing received for 2 s")."""
    hub = Hub(tmp_path).start()  # heartbeat 1 s: silent after 2 s
    before = heartbeat_timeouts(hub)

    async def through_the_pause() -> tuple[int, int | None]:
        """(PONGs the woken hub sent, the close code if it closed the link)."""
        async with open_websocket_url(f"ws://127.0.0.1:{hub.port}/ws/gateway") as ws:
            conn = GatewayConnection(GATEWAY, TOKEN, "epoch-1", 1, heartbeat=1.0,
                                     max_message_bytes=1 << 20, now=trio.current_time())
            await ws.send_message(conn.hello(trio.current_time()))
            while conn.welcome is None:
                conn.receive(await ws.get_message(), trio.current_time())

            async def keep_pinging() -> None:
                while True:
                    await ws.send_message(encode(Ping(trio.current_time())))
                    await trio.sleep(0.25)

            pongs = 0
            async with trio.open_nursery() as nursery:
                nursery.start_soon(keep_pinging)
                await trio.sleep(0.5)
                assert hub.proc is not None
                os.kill(hub.proc.pid, signal.SIGSTOP)
                try:
                    await trio.sleep(3.0)  # its 2 s silence deadline passes while it sleeps
                finally:
                    os.kill(hub.proc.pid, signal.SIGCONT)
                try:
                    # the woken hub answers the PINGs that waited, and keeps the link
                    with trio.move_on_after(3.0):
                        while True:
                            pongs += isinstance(decode(await ws.get_message()), Pong)
                except ConnectionClosed as closed:
                    return pongs, closed.reason.code
                finally:
                    nursery.cancel_scope.cancel()
            return pongs, None

    try:
        pongs, closed = trio.run(through_the_pause)
        assert closed is None, f"the woken hub closed a live link with {closed}"
        assert pongs >= 4
        assert heartbeat_timeouts(hub) == before
    finally:
        hub.stop()
