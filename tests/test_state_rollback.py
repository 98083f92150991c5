"""A gateway whose state directory goes back in time -- a VM snapshot of the tester's
workstation restored, a backup copied back, a spool whose newest segment the operator had
to move away -- while the hub kept what the gateway sent since.  Its sequence numbers would
repeat ones the hub has applied, and the hub would take each such frame for a duplicate and
drop the other records in it: before, 38,870 of 81,067 tester records were lost here without
a word.  The gateway finds it at its first WELCOME, numbers past the hub and stores again
what it numbered meanwhile (``edgegw/gateway/rollback.py``); the records the tester's
source reads again keep their record ids, which the hub's record-id check drops
(docs/operations.md, "A gateway's state restored from a copy")."""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from faultkit import (
    Gateway,
    Hub,
    all_arrive_once,
    assert_exactly_once,
    expected_records,
    hub_records,
    source_settings,
    stop_all,
)
from processes import REPO, wait_for

SOURCE = {"parts_per_second": 1500, "max_parts": 9000, "seed": 31, "wafers": 200}


def config_without_sensors(tmp: Path) -> Path:
    """The shipped gateway config without its simulated sensors: a source that reads again
    from its position gives the same records the same record ids only when no other
    source's records interleave differently the second time (the module's note)."""
    text = (REPO / "conf" / "gateway.toml").read_text()
    cut = text.index('[[sources]]\nname = "sensors"')
    path = tmp / "gateway.toml"
    path.write_text(text[:cut])
    return path


@contextlib.contextmanager
def restored_from_a_copy(tmp: Path, before: Path, after: Path
                         ) -> Iterator[tuple[Hub, Gateway]]:
    """A gateway (config ``before``) sends to a hub; it is stopped and its state copied
    (what a snapshot of the stopped machine holds), runs on until the hub has 3,000 more
    records, and is killed; with the hub away the copy is put back and the gateway started
    on it (config ``after``).  Yields the hub (stopped) and that gateway (running, its
    frames numbered from where the copy stood: seqs the hub has applied)."""
    # small frames first, large ones after the restore: a frame of a repeated seq then
    # holds many records the hub has not got (frames are cut where time and config say)
    hub = Hub(tmp).start()
    gw = Gateway(tmp, hub.port, *source_settings(**SOURCE), "--set", "batch.max_records=137")
    gw.config = before
    gw.start()
    snapshot = tmp / "snapshot"
    try:
        wait_for(lambda: hub.stats().get("records_applied", 0) > 1500, timeout=30)
        gw.stop()
        shutil.copytree(gw.state, snapshot)
        gw.start()
        applied = hub.stats()["records_applied"]
        wait_for(lambda: hub.stats().get("records_applied", 0) > applied + 3000, timeout=30)
        gw.kill()
        hub.stop()
        shutil.rmtree(gw.state)
        shutil.copytree(snapshot, gw.state)
        gw = Gateway(tmp, hub.port, *source_settings(**SOURCE))
        gw.config = after
        gw.start()
        first = gw.stats()["store"]["next_seq"]
        wait_for(lambda: gw.stats()["store"]["next_seq"] > first + 3, timeout=30)
        yield hub, gw
    finally:
        stop_all(hub, gw)


def test_a_gateway_state_restored_from_an_older_copy_loses_and_repeats_nothing(
        tmp_path: Path) -> None:
    config = config_without_sensors(tmp_path)
    with restored_from_a_copy(tmp_path, config, config) as (hub, gw):
        hub.start()
        all_arrive_once(hub, gw, **SOURCE)
        # and it was not silent: the gateway counted it and told the hub
        assert gw.stats()["metrics"]["uplink_state_rollbacks_total"] == 1
        _, events, _ = hub_records(hub.dir)
        (rollback,) = [e for e in events if e[3] == "state_rollback"]
        assert rollback[2] == "error" and rollback[5]["reissued"] >= 3, rollback


def config_with_fast_sensors(tmp: Path) -> Path:
    """The shipped gateway config, its simulated sensors sending a window every 50 ms."""
    text = (REPO / "conf" / "gateway.toml").read_text()
    path = tmp / "gateway-sensors.toml"
    path.write_text(text.replace("window_s = 1.0", "window_s = 0.05"))
    return path


@pytest.mark.xfail(strict=True, raises=AssertionError, reason=(
    "known loss, not fixed yet (docs/operations.md, 'A gateway's state restored from a "
    "copy'): the tester's records read again are numbered from the copy's record id "
    "with fewer sensor readings between them than the run the hub has, so records the "
    "hub never had get ids it applied, and its record-id check drops them"))
def test_a_restored_state_keeps_every_tester_record_when_other_sources_interleave_otherwise(
        tmp_path: Path) -> None:
    """As above, with another (live, not replayed) source beside the tester's: the run
    the hub has interleaved sensor windows with the tester's records, the run after the
    restore has none (its sensors gone from the config: the surest way to interleave
    otherwise; the shipped sensors do it too, in some runs, by timing)."""
    with restored_from_a_copy(tmp_path, config_with_fast_sensors(tmp_path),
                              config_without_sensors(tmp_path)) as (hub, gw):
        hub.start()
        # until the tester is done and the spool empty (a record the hub dropped never
        # comes: waiting for them all would wait out the timeout)
        expected = expected_records(**SOURCE)
        last: list[int] = []

        def settled() -> bool:
            st = gw.stats()
            n = hub.stats().get("records_applied", 0)
            last.append(n)
            return (st["store"]["frames"] == 0 and st["pending_in_batcher"] == 0
                    and len(last) > 10 and last[-11] == n)
        wait_for(settled, timeout=90, interval=0.2)
        assert_exactly_once(hub.dir, expected)
