"""Fault injection with real processes, real sockets and real files.

Each test runs a real hub and a real gateway (``python -m edgegw hub/gateway``) with the
disk spool, a seeded simulated tester as the source (deterministic: its checkpoint is the
number of batches put), injects a fault, lets the tester finish, and compares record by
record what the tester produced with what the hub applied: zero lost, zero duplicated.
"""

from __future__ import annotations

import os
import random
import time
from pathlib import Path

import pytest
from faultkit import (
    Gateway,
    Hub,
    Proxy,
    assert_exactly_once,
    expected_records,
    hub_records,
    source_settings,
    wait_all_applied,
)
from processes import wait_for

from edgegw.spool.format import Kind, Record, scan
from edgegw.spool.spool import _list_segments

# ~ 9 records per part (8 tests + the part result) plus lot/wafer records
SOURCE = {"parts_per_second": 1500, "max_parts": 12_000, "seed": 7, "wafers": 200}


def start_pair(tmp: Path, *extra: str, source: dict | None = None,
               via: Proxy | None = None, hub: Hub | None = None) -> tuple[Hub, Gateway]:
    hub = hub or Hub(tmp).start()
    gw = Gateway(tmp, via.port if via else hub.port,
                 *source_settings(**(source or SOURCE)), *extra)
    return hub, gw.start()


def test_gateway_killed_with_sigkill_several_times_loses_and_duplicates_nothing(
        tmp_path: Path) -> None:
    rng = random.Random(1)
    hub, gw = start_pair(tmp_path)
    try:
        for _ in range(4):
            time.sleep(rng.uniform(0.7, 1.8))  # the tester keeps testing
            gw.kill()
            gw.start()
        expected = expected_records(**SOURCE)
        wait_all_applied(hub, gw, len(expected))
        st = hub.stats()
        assert st["frames_lost"] == 0
        assert_exactly_once(hub.dir, expected)
    finally:
        gw.stop()
        hub.stop()


def test_hub_killed_with_sigkill_mid_stream_and_restarted(tmp_path: Path) -> None:
    hub, gw = start_pair(tmp_path)
    try:
        for _ in range(2):
            time.sleep(1.5)
            hub.kill()
            time.sleep(1.0)  # frames wait in the spool
            hub.start()
        expected = expected_records(**SOURCE)
        wait_all_applied(hub, gw, len(expected))
        assert hub.stats()["frames_lost"] == 0
        assert_exactly_once(hub.dir, expected)
    finally:
        gw.stop()
        hub.stop()


@pytest.mark.parametrize("fault", ["drop", "blackhole"])
def test_network_cut_and_restored_by_a_proxy(tmp_path: Path, fault: str) -> None:
    hub = Hub(tmp_path).start()
    proxy = Proxy(hub.port)
    hub, gw = start_pair(tmp_path, via=proxy, hub=hub)
    try:
        for _ in range(2):
            time.sleep(1.0)
            wait_for(lambda: gw.stats()["connected"])
            proxy.drop() if fault == "drop" else proxy.blackhole()
            time.sleep(3.5)  # > 2 x heartbeat: a black hole is detected by silence
            proxy.restore()
        expected = expected_records(**SOURCE)
        wait_all_applied(hub, gw, len(expected))
        assert gw.stats()["metrics"]["uplink_connects_total"] >= 3
        assert_exactly_once(hub.dir, expected)
    finally:
        gw.stop()
        hub.stop()
        proxy.close()


def _frames_in(path: Path) -> list[Record]:
    return [e for e in scan(path.read_bytes()) if isinstance(e, Record) and e.kind is Kind.FRAME]


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_spool_tail_truncated_at_a_random_offset_then_restart(tmp_path: Path,
                                                              seed: int) -> None:
    """The hub is unreachable, so the spool holds everything; the gateway is killed and the
    newest segment cut at a random offset.  What was intact arrives; the cut frames were
    the tail, whose source checkpoint goes back with them: the tester's records behind the
    cut are produced again, so nothing is missing and nothing is doubled."""
    rng = random.Random(seed)
    hub = Hub(tmp_path)  # not started yet
    gw = Gateway(tmp_path, hub.port, *source_settings(**SOURCE)).start()
    try:
        time.sleep(rng.uniform(1.5, 3.0))
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
        expected = expected_records(**SOURCE)
        wait_all_applied(hub, gw, len(expected))
        assert_exactly_once(hub.dir, expected)
    finally:
        gw.stop()
        hub.stop()


def test_spool_byte_flipped_inside_a_frame_loses_only_that_frame_and_counts_it(
        tmp_path: Path) -> None:
    from faultkit import normalise

    from edgegw.protocol import decode_body
    from edgegw.records import from_wire

    hub = Hub(tmp_path)
    gw = Gateway(tmp_path, hub.port, *source_settings(**SOURCE)).start()
    try:
        time.sleep(2.0)
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
        expected = expected_records(**SOURCE)
        wait_all_applied(hub, gw, len(expected) - len(damaged))
        assert_exactly_once(hub.dir, expected, missing_ok=damaged)
        # the hub is told, too: a GatewayEvent naming the lost frame
        _, events, _ = hub_records(hub.dir)
        (event,) = [e for e in events if e[3] == "spool_damage"]
        assert event[2] == "error" and event[5]["lost_ranges"] == [[frame.seq, frame.seq]]
    finally:
        gw.stop()
        hub.stop()
