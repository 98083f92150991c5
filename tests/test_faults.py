"""Fault injection with real processes, real sockets and real files.

Each test runs a real hub and a real gateway (``python -m edgegw hub/gateway``) with the
disk spool, a seeded simulated tester as the source (deterministic: its checkpoint is the
number of batches put), injects a fault, lets the tester finish, and compares record by
record what the tester produced with what the hub applied: zero lost, zero duplicated.
"""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import trio
from faultkit import (
    GATEWAY,
    TOKEN,
    Gateway,
    Hub,
    Proxy,
    assert_exactly_once,
    expected_records,
    hub_records,
    source_settings,
    stop_all,
    wait_all_applied,
)
from processes import get_json, wait_for

from edgegw.spool import list_segments as _list_segments
from edgegw.spool.format import Kind, Record, scan

# ~ 9 records per part (8 tests + the part result) plus lot/wafer records: 108k records,
# 8 s of tester.  SHORT (54k records, 4 s) for the tests whose faults all land in the first
# half of the run; each of them asserts that its fault hit while the tester was producing.
SOURCE = {"parts_per_second": 1500, "max_parts": 12_000, "seed": 7, "wafers": 200}
SHORT = {**SOURCE, "max_parts": 6000}


def start_pair(tmp: Path, *extra: str, source: dict | None = None,
               via: Proxy | None = None, hub: Hub | None = None) -> tuple[Hub, Gateway]:
    hub = hub or Hub(tmp).start()
    gw = Gateway(tmp, via.port if via else hub.port,
                 *source_settings(**(source or SOURCE)), *extra)
    return hub, gw.start()


# Kill points are chosen in the data, not in time: a run armed with
# ``gateway.frame_stored=K:kill`` SIGKILLs itself right after its K-th frame is durable
# (edgegw/failpoints.py), however fast or slow the machine is.
GATEWAY_KILLS = (3, 7, 2, 5)


def test_gateway_killed_with_sigkill_several_times_loses_and_duplicates_nothing(
        tmp_path: Path) -> None:
    hub = Hub(tmp_path).start()
    gw = Gateway(tmp_path, hub.port, *source_settings(**SHORT))
    try:
        # each run dies at its K-th frame, so while the tester is producing (a run whose
        # tester had finished would store no K-th frame, and wait_crashed would fail):
        # 17 frames of <= 2000 records, well inside SHORT's 54k records
        for k in GATEWAY_KILLS:
            gw.start(failpoints=f"gateway.frame_stored={k}:kill", wait=False)
            gw.wait_crashed()
        gw.start()
        expected = expected_records(**SHORT)
        wait_all_applied(hub, gw, len(expected))
        st = hub.stats()
        assert st["frames_lost"] == 0
        assert_exactly_once(hub.dir, expected)
    finally:
        stop_all(hub, gw)


@pytest.mark.parametrize("point", ["hub.after_commit", "hub.mid_commit"])
def test_hub_killed_with_sigkill_mid_stream_and_restarted(tmp_path: Path, point: str) -> None:
    """The hub dies right after a commit whose ACK never leaves (``after_commit``: the
    gateway learns from WELCOME's applied set that the frames are in) or inside the
    transaction (``mid_commit``: SQLite rolls it back and the frames come again)."""
    hub = Hub(tmp_path).start(failpoints=f"{point}=4:kill")
    gw = Gateway(tmp_path, hub.port, *source_settings(**SHORT)).start()
    expected = expected_records(**SHORT)
    try:
        for k in (2, 0):  # (kept small: the points must come before the tester ends)
            hub.wait_crashed()
            # mid-stream: the first death while the tester produces; each with frames
            # unacknowledged, which wait in the spool meanwhile
            assert k == 0 or records_in_from_tester(gw) < len(expected), "after the tester"
            assert gw.stats()["store"]["frames"] > 0
            # an armed run may die before /healthz is polled: the gateway reconnects at once
            hub.start(failpoints=f"{point}={k}:kill" if k else "", wait=not k)
        wait_all_applied(hub, gw, len(expected))
        assert hub.stats()["frames_lost"] == 0
        assert_exactly_once(hub.dir, expected)
    finally:
        stop_all(hub, gw)


BACKLOG = {**SOURCE, "max_parts": 3000}  # 27k records


def test_hub_killed_three_times_while_a_backlog_of_thousands_of_frames_drains(
        tmp_path: Path) -> None:
    """The hub is down while the tester runs: the spool holds its whole output as ~2,700
    frames of 10 records.  The hub comes back and dies three times while that backlog
    drains -- after a commit whose ACK never leaves, inside a transaction, after a commit
    again -- each restart getting a backlog part-applied and a window of frames in flight,
    then the drain completes: every record once."""
    hub = Hub(tmp_path)  # not started yet: everything goes to the spool
    gw = Gateway(tmp_path, hub.port, *source_settings(**BACKLOG),
                 "--set", "batch.max_records=10").start()
    expected = expected_records(**BACKLOG)
    try:
        wait_for(lambda: records_in_from_tester(gw) == len(expected)
                 and gw.stats()["pending_in_batcher"] == 0, timeout=60, interval=0.1)
        backlog = gw.stats()["store"]["frames"]
        assert backlog >= 2500
        for point in ("hub.after_commit=30:kill", "hub.mid_commit=25:kill",
                      "hub.after_commit=40:kill"):
            hub.start(failpoints=point, wait=False)
            hub.wait_crashed()
            left = gw.stats()["store"]["frames"]
            assert 0 < left < backlog, f"{point}: {left} of {backlog} frames left"
        hub.start()
        wait_all_applied(hub, gw, len(expected))
        assert hub.stats()["frames_lost"] == 0
        assert_exactly_once(hub.dir, expected)
    finally:
        stop_all(hub, gw)


@pytest.mark.parametrize(("point", "duplicates"),
                         [("hub.after_commit", 1), ("hub.mid_commit", 0)])
def test_a_frame_resent_after_the_hub_died_around_its_commit_is_applied_once(
        tmp_path: Path, point: str, duplicates: int) -> None:
    """The hub's duplicate-dropping path, hit on purpose.  A peer built from protocol.md
    alone resends every frame it holds no ACK for, whatever WELCOME says.  The hub dies
    right after committing frame 1 (its ACK never leaves) or inside that commit.  After the
    restart WELCOME tells the truth (frame 1 applied, or not), and the resend is dropped
    and counted as a duplicate -- or applied, once."""
    from trio_websocket import ConnectionClosed, open_websocket_url

    from edgegw.protocol import Ack, GatewayConnection, Welcome, encode_body
    from edgegw.records import SensorReading

    hub = Hub(tmp_path).start(failpoints=f"{point}=1:kill")
    body = encode_body(1, [SensorReading("probe", 1.0, "handler/temp", 25.0 + i)
                           for i in range(3)])
    url = f"ws://127.0.0.1:{hub.port}/ws/gateway"

    async def send_frame_1() -> tuple[list[tuple[int, int]], bool]:
        """Connect, send frame 1; (WELCOME's applied set, whether frame 1 was acked)."""
        async with open_websocket_url(url) as ws:
            conn = GatewayConnection(GATEWAY, TOKEN, "epoch-1", 1, heartbeat=5.0,
                                     max_message_bytes=1 << 20, now=trio.current_time())
            await ws.send_message(conn.hello(trio.current_time()))
            while conn.welcome is None:
                conn.receive(await ws.get_message(), trio.current_time())
            assert isinstance(conn.welcome, Welcome)
            await ws.send_message(conn.data(1, body, trio.current_time()))
            try:
                with trio.fail_after(20):
                    while True:
                        events, _ = conn.receive(await ws.get_message(), trio.current_time())
                        if any(isinstance(e, Ack) and e.watermark >= 1 for e in events):
                            return conn.welcome.applied, True
            except ConnectionClosed:  # the hub died at its failpoint
                return conn.welcome.applied, False

    assert trio.run(send_frame_1) == ([], False)
    hub.wait_crashed()
    hub.start()
    try:
        applied, acked = trio.run(send_frame_1)
        assert acked
        assert applied == ([(1, 1)] if point == "hub.after_commit" else [])
        st = hub.stats()
        assert st["duplicates_dropped"] == duplicates
        assert st["frames_applied"] == 1 and st["records_applied"] == 3
        _, _, rids = hub_records(hub.dir)
        assert rids == [1, 2, 3], "every record applied exactly once"
    finally:
        hub.stop()


@pytest.mark.parametrize("fault", ["drop", "blackhole"])
def test_network_cut_and_restored_by_a_proxy(tmp_path: Path, fault: str) -> None:
    source = {**SOURCE, "max_parts": 8000}  # 72k records: both cuts land mid-stream
    hub = Hub(tmp_path).start()
    proxy = Proxy(hub.port)
    hub, gw = start_pair(tmp_path, via=proxy, hub=hub, source=source)
    expected = expected_records(**source)
    try:
        for n in (1, 2):
            # cut at a chosen point of the data: once the hub has n x 10,000 records, on
            # the n-th connection, during traffic: the tester still producing, or (the
            # second cut, on a busy machine) the backlog still draining
            wait_for(lambda n=n: hub.stats().get("records_applied", 0) >= n * 10_000
                     and _connected(gw) == n, timeout=60, interval=0.05)
            failed = _uplink_failures(gw)
            proxy.drop() if fault == "drop" else proxy.blackhole()
            assert (records_in_from_tester(gw) < len(expected)
                    or gw.stats()["store"]["frames"] > 0), "cut with nothing left to send"
            # restored once the gateway has noticed (a black hole only by 2 x heartbeat of
            # silence) and, for a dropped link, a probe of it was refused too
            wait_for(lambda f=failed + (2 if fault == "drop" else 1):
                     not gw.stats()["connected"] and _uplink_failures(gw) >= f,
                     timeout=30, interval=0.05)
            proxy.restore()
        wait_all_applied(hub, gw, len(expected))
        assert gw.stats()["metrics"]["uplink_connects_total"] >= 3
        assert_exactly_once(hub.dir, expected)
    finally:
        stop_all(hub, gw)
        proxy.close()


def _connected(gw: Gateway) -> int:
    """The connection the gateway is on (its n-th handshake), 0 while not connected."""
    st = gw.stats()
    return int(st["metrics"]["uplink_connects_total"]) if st["connected"] else 0


def _uplink_failures(gw: Gateway) -> int:
    """Links lost or refused, and probes that did not reach a hub, so far."""
    metrics = gw.stats()["metrics"]

    def count(name: str, *labels: str) -> int:
        value = metrics.get(name, 0)
        if not isinstance(value, dict):
            return int(value)
        return int(sum(v for k, v in value.items() if not labels or k in labels))

    return (count("uplink_failures_total")
            + count("uplink_probes_total", "outcome=unreachable", "outcome=silent"))


def _frames_in(path: Path) -> list[Record]:
    return [e for e in scan(path.read_bytes()) if isinstance(e, Record) and e.kind is Kind.FRAME]


# One seed in the suite (each is the same path at another kill point and cut; ~9 s each):
# EDGEGW_FAULT_SEEDS=1,2,3 runs more, as scripts/fault-soak.sh does (docs/spool.md).
TRUNCATION_SEEDS = [int(s) for s in os.environ.get("EDGEGW_FAULT_SEEDS", "1").split(",")]


@pytest.mark.parametrize("seed", TRUNCATION_SEEDS)
def test_spool_tail_truncated_at_a_random_offset_then_restart(tmp_path: Path,
                                                              seed: int) -> None:
    """The hub is unreachable, so the spool holds everything; the gateway is killed and the
    newest segment cut at a random offset.  What was intact arrives; the cut frames were
    the tail, whose source checkpoint goes back with them: the tester's records behind the
    cut are produced again, so nothing is missing and nothing is doubled."""
    rng = random.Random(seed)
    hub = Hub(tmp_path)  # not started yet
    gw = Gateway(tmp_path, hub.port, *source_settings(**SHORT)).start()
    expected = expected_records(**SHORT)
    try:
        # killed at a random point of the data, while the tester is producing
        at = rng.randrange(10_000, 30_000)
        wait_for(lambda: records_in_from_tester(gw) >= at, timeout=30, interval=0.05)
        assert records_in_from_tester(gw) < len(expected), "killed after the tester ended"
        gw.kill()
        segs = [p for _, p in _list_segments(gw.spool)]
        last = max((p for p in segs if _frames_in(p)), key=lambda p: p.name)
        assert last == segs[-1] or not _frames_in(segs[-1])
        size = last.stat().st_size
        os.truncate(last, rng.randrange(size // 2, size))
        hub.start()
        gw.start()
        st = gw.stats()["store"]
        assert st["torn_bytes"] + st["damaged_bytes"] > 0  # reported
        wait_all_applied(hub, gw, len(expected))
        assert_exactly_once(hub.dir, expected)
    finally:
        stop_all(hub, gw)


def test_spool_byte_flipped_inside_a_frame_loses_only_that_frame_and_counts_it(
        tmp_path: Path) -> None:
    from faultkit import normalise

    from edgegw.protocol import decode_body
    from edgegw.records import from_wire

    hub = Hub(tmp_path)
    gw = Gateway(tmp_path, hub.port, *source_settings(**SHORT)).start()
    expected = expected_records(**SHORT)
    try:
        # killed mid-stream, once the spool holds enough frames for a victim
        wait_for(lambda: gw.stats()["store"]["frames"] >= 8, timeout=30, interval=0.05)
        assert records_in_from_tester(gw) < len(expected), "killed after the tester ended"
        gw.kill()
        segs = [p for _, p in _list_segments(gw.spool)]
        victim = next(p for p in segs if len(_frames_in(p)) > 3)
        frame = _frames_in(victim)[2]
        _, sources, wire = decode_body(frame.body, 1 << 30)
        damaged = [normalise(from_wire(w, sources)) for w in wire]
        data = bytearray(victim.read_bytes())
        data[frame.offset + frame.size - 7] ^= 0x20
        victim.write_bytes(bytes(data))
        hub.start()
        gw.start()
        st = gw.stats()["store"]
        assert st["lost_frames"] == 1 and st["damaged_regions"] == 1
        # the damaged frame may hold the gateway's own events too: only its tester records
        # are missing from what the hub ends up with
        lost_tester = sum((Counter(damaged) & Counter(expected)).values())
        wait_all_applied(hub, gw, len(expected) - lost_tester)
        assert_exactly_once(hub.dir, expected, missing_ok=damaged)
        # the hub is told, too: a GatewayEvent naming the lost frame
        _, events, _ = hub_records(hub.dir)
        (event,) = [e for e in events if e[3] == "spool_damage"]
        assert event[2] == "error" and event[5]["lost_ranges"] == [[frame.seq, frame.seq]]
    finally:
        stop_all(hub, gw)


CAP = ("--set", "batch.max_records=200", "--set", "spool.segment_bytes=65536",
       "--set", "spool.max_bytes=262144", "--set", "spool.stall_timeout_s=1.0")


def test_cap_reached_with_block_policy_stops_intake_and_loses_nothing(tmp_path: Path) -> None:
    hub = Hub(tmp_path)  # down: the spool fills up
    gw = Gateway(tmp_path, hub.port, *source_settings(**SHORT), *CAP,
                 "--set", "spool.policy='block'").start()
    expected = expected_records(**SHORT)
    try:
        wait_for(lambda: gw.stats()["store"]["bytes"] > 200_000, interval=0.05)
        # blocked for spool.stall_timeout_s: the spool reports itself unhealthy
        wait_for(lambda: "spool" in get_status(gw, "/healthz")["detail"], interval=0.05)
        # intake stops: unchanged over a whole second (a batch put just before the block
        # may still be counted in the first one) ...
        intake = gw.stats()["metrics"]["gateway_records_in_total"]
        for _ in range(10):
            time.sleep(1.0)
            st = gw.stats()
            if st["metrics"]["gateway_records_in_total"] == intake:
                break
            intake = st["metrics"]["gateway_records_in_total"]
        # ... while the tester has more to give: the block, not the end
        assert records_in_from_tester(gw) < len(expected)
        assert st["store"]["bytes"] <= 262_144
        assert st["store"]["dropped_frames"] == 0
        # the source waits (the tester's own file would be the buffer): intake has stopped
        assert st["metrics"]["gateway_records_in_total"] == intake
        health = get_status(gw, "/healthz")
        assert health["status"] == "unhealthy" and "spool" in health["detail"]
        hub.start()
        wait_all_applied(hub, gw, len(expected), timeout=90)
        assert hub.stats()["frames_lost"] == 0
        assert_exactly_once(hub.dir, expected)
        assert get_status(gw, "/healthz")["status"] == "ok"
    finally:
        stop_all(hub, gw)


def trouble_alerts(hub: Hub, code: str) -> list[dict[str, object]]:
    """The alerts of conf/hub.toml's gateway-trouble rule (kind gateway_event,
    docs/alerts.md) for this gateway's events of ``code``."""
    return [a for a in get_json(f"{hub.url}/api/alerts")["alerts"]
            if a["rule"] == "gateway-trouble"
            and a["context"] == {"gateway_id": GATEWAY, "code": code, "level": "error",
                                 "source": "gateway"}]


def test_cap_reached_with_drop_oldest_drops_counts_and_reports(tmp_path: Path) -> None:
    source = {**SOURCE, "max_parts": 6000}
    hub = Hub(tmp_path)
    gw = Gateway(tmp_path, hub.port, *source_settings(**source), *CAP,
                 "--set", "spool.policy='drop_oldest'").start()
    try:
        wait_for(lambda: gw.stats()["store"]["dropped_frames"] > 5, timeout=30)
        hub.start()
        expected = expected_records(**source)
        wait_for(lambda: gw.stats()["store"]["frames"] == 0
                 and hub.stats().get("records_applied", 0) > 0
                 and records_in_from_tester(gw) >= len(expected), timeout=60, interval=0.25)
        time.sleep(1.0)
        wait_for(lambda: gw.stats()["store"]["frames"] == 0, timeout=30)
        st = gw.stats()["store"]
        got, events, rids = hub_records(hub.dir)
        assert len(rids) == len(set(rids))  # nothing twice
        # what arrived is the tester's sequence with whole runs of the oldest cut out ...
        it = iter(expected)
        assert all(any(r == e for e in it) for r in got), "hub records out of order"
        missing = len(expected) - len(got)
        assert 0 < missing <= st["dropped_records"]
        # ... and the drop is counted by the gateway, the hub, and raised as an event; the
        # hub's count is exact (drops while connected told by LOST, docs/protocol.md
        # section 4): every frame the gateway numbered is applied or lost, once
        # (read again until the two agree: the gateway may add a frame of its own events)
        assert hub.stats()["frames_lost"] >= 1
        wait_for(lambda: (hub.stats()["frames_applied"] + hub.stats()["frames_lost"]
                          == gw.stats()["store"]["next_seq"] - 1), timeout=30)
        # ... every lost frame named by the gateway as one it dropped (its HELLO, its
        # LOSTs): none taken for a frame the hub acknowledged and lost
        told = re.findall(r"gateway ate-01: (\d+) frame\(s\) below seq \d+(?: \(told by a "
                          r"LOST while connected\))? were dropped by the gateway",
                          (tmp_path / "hub.log").read_text())
        assert sum(map(int, told)) == hub.stats()["frames_lost"], told
        assert hub.metric("edgegw_hub_acknowledged_frames_lost_total") == 0
        assert any(e[3] == "store_overflow" for e in events)
        # and the floor hears of it: conf/hub.toml's gateway-trouble rule (kind
        # gateway_event, docs/alerts.md) makes the event an alert
        wait_for(lambda: trouble_alerts(hub, "store_overflow"), timeout=30)
        assert trouble_alerts(hub, "store_overflow")[0]["priority"] == "P1"
    finally:
        stop_all(hub, gw)


@pytest.mark.slow
def test_long_outage_then_live_data_within_2_s_and_backlog_drained_5x_faster(
        tmp_path: Path) -> None:
    """A 60 s outage at 1000 parts/s (~ 9k records/s: 540k records, what a tester at the
    example config's 100 parts/s makes in 10 minutes), then the link returns."""
    rate = 1000
    source = {**SOURCE, "parts_per_second": rate, "max_parts": rate * 75}
    outage = 60.0
    hub = Hub(tmp_path).start()
    proxy = Proxy(hub.port)
    gw = Gateway(tmp_path, proxy.port, *source_settings(**source)).start()
    try:
        wait_for(lambda: gw.stats()["connected"])
        time.sleep(2.0)
        proxy.drop()
        time.sleep(outage)
        backlog = gw.stats()["store"]["frames"]
        proxy.restore()
        restored = time.time()
        wait_for(lambda: gw.stats()["connected"], interval=0.05)
        reconnect_s = time.time() - restored
        expected = expected_records(**source)
        wait_all_applied(hub, gw, len(expected), timeout=180)
        frames = _frame_times(hub.dir)
        # backlog: frames whose records were all made before the link came back
        backlog_frames = [f for f in frames if f[2] < restored and f[0] >= restored]
        drain_s = max(f[0] for f in backlog_frames) - restored
        backlog_rps = sum(n for *_, n in backlog_frames) / drain_s
        # live: frames made after the link came back, while the backlog was draining;
        # latency from the *oldest* record of the frame (the longest any record waited)
        live = [a - oldest for a, oldest, _, _ in frames if oldest >= restored]
        live_rps = 9 * rate
        print(f"\nbacklog of {backlog} frames ({sum(n for *_, n in backlog_frames):,} records) "
              f"drained in {drain_s:.1f} s = {backlog_rps:,.0f} records/s = "
              f"{backlog_rps / live_rps:.1f}x the live {live_rps:,} records/s; frames made "
              f"after the link came back: {len(live)}, latency max {max(live, default=-1):.2f} s "
              f"(the gateway reconnected {reconnect_s:.2f} s after the link came back)")
        for f in sorted(frames):
            if f[1] >= restored and f[0] - f[1] > 1.0:
                print(f"slow live frame: made {f[1] - restored:.2f}..{f[2] - restored:.2f} s, "
                      f"applied {f[0] - restored:.2f} s after the link came back, {f[3]} records")
        assert live, "no live frame reached the hub while the backlog drained"
        assert max(live) < 2.0
        assert backlog_rps >= 5 * live_rps
        assert_exactly_once(hub.dir, expected)
    finally:
        stop_all(hub, gw)
        proxy.close()


def records_in_from_tester(gw: Gateway) -> int:
    counts = gw.stats()["metrics"].get("gateway_records_in_total", {})
    return int(counts.get("source=tester", 0)) if isinstance(counts, dict) else 0


def get_status(gw: Gateway, path: str) -> dict:
    import json
    import urllib.error
    import urllib.request
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{gw.status}{path}", timeout=2) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as err:
        return json.loads(err.read())


def _frame_times(hub_dir: Path) -> list[tuple[float, float, float, int]]:
    """(applied_at, oldest record ts, newest record ts, records) of every tester frame."""
    import sqlite3

    from edgegw.hub.store import unpack_body
    from edgegw.protocol import decode_body
    db = sqlite3.connect(hub_dir / "hub.sqlite3")
    try:
        rows = db.execute("SELECT applied_at, codec, body FROM frames WHERE n_records > 0"
                          ).fetchall()
    finally:
        db.close()
    out = []
    for applied_at, codec, body in rows:
        _, _, wire = decode_body(unpack_body(codec, body), 1 << 30)
        ts = [w[2] for w in wire]
        out.append((applied_at, min(ts), max(ts), len(wire)))
    return out


def test_a_frame_the_hub_rejects_goes_to_the_dead_letter_file_and_blocks_nothing(
        tmp_path: Path) -> None:
    """A poison frame (a body the hub can never accept) sits in the spool between good
    frames: the hub rejects it, the gateway keeps it in its dead-letter file with the
    reason, counts it, and every frame behind it is delivered."""
    import cbor2
    import trio

    from edgegw.spool import DiskSpool, SpoolConfig

    source = SHORT
    hub = Hub(tmp_path)
    gw = Gateway(tmp_path, hub.port, *source_settings(**source)).start()
    try:
        # good frames before the poison, and the tester still producing those behind it
        wait_for(lambda: gw.stats()["store"]["frames"] >= 3, timeout=30, interval=0.05)
        assert records_in_from_tester(gw) < len(expected_records(**source))
        gw.kill()

        async def poison() -> int:
            async with DiskSpool.open(SpoolConfig(dir=str(gw.spool))) as spool:
                return await spool.append(b"\xff not cbor", 1, {})
        bad_seq = trio.run(poison)
        hub.start()
        gw.start()
        expected = expected_records(**source)
        wait_all_applied(hub, gw, len(expected))
        assert_exactly_once(hub.dir, expected)
        assert hub.stats()["frames_rejected"] == 1
        assert gw.stats()["metrics"]["uplink_frames_rejected_total"] == 1
        raw = (gw.state / "dead-letter.cborseq").read_bytes()
        n = int.from_bytes(raw[:4], "big")
        entry = cbor2.loads(raw[4:4 + n])
        assert len(raw) == 4 + n  # exactly one entry
        assert gw.stats()["metrics"]["gateway_dead_letter_bytes"] == len(raw)
        assert entry["seq"] == bad_seq and entry["body"] == b"\xff not cbor"
        assert "CBOR" in entry["reason"]
        # and the operator's reader says so (tests/test_dead_letter_cli.py)
        listed = subprocess.run([sys.executable, "-m", "edgegw", "dead-letters", "list",
                                 str(gw.state), "--json"], capture_output=True, text=True,
                                timeout=60)
        (shown,) = [json.loads(line) for line in listed.stdout.splitlines()]
        assert listed.returncode == 0 and shown["seq"] == bad_seq
        assert "CBOR" in shown["reason"] and shown["body_bytes"] == len(entry["body"])
        # and the floor hears of it: the gateway tells the hub in a frame_rejected event,
        # which conf/hub.toml's gateway-trouble rule makes a P1 alert (docs/alerts.md)
        wait_for(lambda: trouble_alerts(hub, "frame_rejected"), timeout=30)
        alert = trouble_alerts(hub, "frame_rejected")[0]
        assert f"rejected frame {bad_seq} as invalid" in str(alert["message"])
        assert alert["priority"] == "P1"
        (told,) = [e for e in hub_records(hub.dir)[1] if e[3] == "frame_rejected"]
        assert told[2] == "error" and told[5]["seqs"] == [bad_seq] and told[5]["frames"] == 1
    finally:
        stop_all(hub, gw)


def test_gateway_killed_while_the_stdf_tester_writes_loses_and_duplicates_nothing(
        tmp_path: Path) -> None:
    """The real chain: ``edgegw simulate`` writes an STDF file as a tester does, the gateway
    tails it (source type ``stdf``), and is killed with SIGKILL four times, each time right
    after its K-th durable frame.  Reads of up to 64 KiB make puts of hundreds of records,
    larger than the room left in a 500-record frame: the kills land between the parts of
    split puts, where the source's durable position is behind the frames (the bug of
    issue 9).  The hub must end with exactly the records an uninterrupted read gives."""
    from faultkit import hub_records, normalise
    from processes import spawn

    from edgegw.records import GatewayEvent
    from edgegw.stdf import RecordMapper, StdfDecoder

    out = tmp_path / "tester"
    out.mkdir()
    hub = Hub(tmp_path).start()
    conf = tmp_path / "gateway.toml"
    conf.write_text(f"""
[gateway]
id = "ate-01"
token = "change-me-ate-01"
hub_url = "ws://127.0.0.1:{hub.port}/ws/gateway"
state_dir = "{tmp_path / 'gw'}"
[batch]
max_records = 500
max_delay_ms = 100
[spool]
dir = "{tmp_path / 'gw' / 'spool'}"
[[sources]]
name = "tester"
type = "stdf"
paths = ["{out}"]
poll_interval = 0.05
""")
    tester = spawn("simulate", "--out", str(out), "--parts-per-second", "1000",
                   "--wafers", "8", "--wafer-diameter", "30", "--seed", "7",
                   "--start-time", "1700000000", log=tmp_path / "tester.log")
    gw = Gateway(tmp_path, hub.port)
    try:
        for k in (4, 9, 3, 6):
            _start_with(gw, conf, f"gateway.frame_stored={k}:kill")
            gw.wait_crashed()
        assert gw.starts == 4  # every kill landed at its chosen point
        _start_with(gw, conf)
        wait_for(lambda: gw.stats())
        assert tester.wait(60) == 0
        (stdf,) = sorted(out.glob("*.stdf"))
        dec = StdfDecoder()
        dec.feed(stdf.read_bytes())
        mapper = RecordMapper("tester")
        want = []
        for rec in dec.records():
            want.extend(mapper.map(rec, 0.0))
        want.extend(mapper.close(0.0))
        want = [normalise(r) for r in want if not isinstance(r, GatewayEvent)]
        wait_all_applied(hub, gw, len(want))
        assert_exactly_once(hub.dir, want)
        _, events, _ = hub_records(hub.dir)
        assert not [e for e in events if e[2] == "error"]
    finally:
        tester.kill()
        stop_all(hub, gw)


def _start_with(gw: Gateway, conf: Path, failpoints: str = "") -> Gateway:
    from processes import spawn
    gw.starts += 1
    gw.proc = spawn("gateway", "--config", str(conf),
                    "--set", f"gateway.status_port={gw.status}",
                    "--set", "uplink.backoff_initial_s=0.1", "--set", "uplink.backoff_max_s=1.0",
                    log=gw.tmp / "gw.log", env={"EDGEGW_FAILPOINTS": failpoints})
    return gw


@pytest.mark.slow
def test_a_60_s_link_cut_with_the_shipped_config_is_live_again_within_2_s(
        tmp_path: Path) -> None:
    """conf/hub.toml and conf/gateway.toml as shipped (heartbeat 5 s, backoff cap 30 s,
    probe interval 1 s), the simulated tester at its 100 parts/s (bounded and seeded here,
    to compare record by record); a proxy cuts the link for 60 s.  bench/reconnect.py (a)
    prints the same figures."""
    from ports import free_port
    from processes import REPO, get_json, spawn

    hub_port, status = free_port(), free_port()
    source = {"max_parts": 8000, "seed": 11}
    hub = spawn("hub", "--config", str(REPO / "conf" / "hub.toml"),
                "--set", f"hub.port={hub_port}", "--set", f"hub.data_dir={tmp_path / 'hub'}",
                log=tmp_path / "hub.log")
    proxy = Proxy(hub_port)
    gw = spawn("gateway", "--config", str(REPO / "conf" / "gateway.toml"),
               "--set", f"gateway.hub_url=ws://127.0.0.1:{proxy.port}/ws/gateway",
               "--set", f"gateway.state_dir={tmp_path / 'gw'}",
               "--set", f"gateway.status_port={status}",
               *source_settings(**source), log=tmp_path / "gw.log")

    def gw_stats() -> dict:
        return get_json(f"http://127.0.0.1:{status}/api/stats")

    try:
        wait_for(lambda: gw_stats()["connected"])
        time.sleep(2.0)
        proxy.drop()
        cut = time.time()
        time.sleep(60.0)
        proxy.restore()
        restored = time.time()
        wait_for(lambda: gw_stats()["connected"], interval=0.05)
        reconnect_s = time.time() - restored
        wait_for(lambda: gw_stats()["store"]["frames"] == 0, timeout=120)
        frames = _frame_times(tmp_path / "hub")
        backlog = [f for f in frames if f[2] < restored and f[0] >= restored]
        drain_s = max(f[0] for f in backlog) - restored
        backlog_rps = sum(f[3] for f in backlog) / drain_s
        live_rps = sum(f[3] for f in frames if f[1] >= cut and f[2] < restored) / (restored - cut)
        first_new = min(f[0] for f in frames if f[2] >= restored) - restored
        print(f"\nreconnected {reconnect_s:.2f} s after the link returned; first new record at "
              f"the hub {first_new:.2f} s after; backlog {sum(f[3] for f in backlog):,} records "
              f"drained in {drain_s:.2f} s = {backlog_rps:,.0f} records/s = "
              f"{backlog_rps / live_rps:.0f}x the live {live_rps:,.0f} records/s")
        assert first_new <= 2.0
        assert backlog_rps >= 5 * live_rps
        # the tester of conf/gateway.toml, bounded: everything it made arrives exactly once
        expected = expected_records(parts_per_second=100, sites=4, **source)

        def all_applied() -> bool:
            # the tester's own records: conf/gateway.toml's simulated sensors count in the
            # hub's records_applied too, which made this true before the tester's last parts
            st = gw_stats()["store"]
            if st["frames"] or st["pending_frames"]:
                return False
            return len(hub_records(tmp_path / "hub")[0]) >= len(expected)

        wait_for(all_applied, timeout=120, interval=0.25)
        assert_exactly_once(tmp_path / "hub", expected)
    finally:
        for proc in (gw, hub):
            proc.terminate()
            proc.wait(15)
        proxy.close()
