"""A disk that fails under a running service: every write, fsync, create and delete gets
EIO from the kernel (a real ext4 on a loop device, shut down with ``EXT4_IOC_SHUTDOWN``
mid-stream, as a disk that vanished or a dying SSD -- between two writes: see
``disktools.shut_down`` for why not inside one).  What is already on the disk stays
the truth; the operator repairs (here: unmount, mount again, the journal replayed) and
restarts; every tester record then arrives exactly once (docs/operations.md, "A failing
disk")."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from disktools import ext4_filesystem, remount, repair, shut_down, unreadable
from faultkit import Gateway, Hub, all_arrive_once, source_settings, stop_all
from ports import free_port
from processes import get_json, wait_for
from test_spool import cfg as spool_cfg
from test_spool import fill
from test_stdf_tail import expected, no_ts
from test_tail_append import lot, polls, start
from test_tail_registry import Sink

from edgegw import EmbeddedGateway
from edgegw.records import GatewayEvent, PartResult
from edgegw.spool import DiskSpool, SpoolFailed
from edgegw.spool.format import Kind, scan
from edgegw.spool.format import Record as SpoolRecord
from edgegw.startup import StartupError, leaves

SOURCE = {"parts_per_second": 1500, "max_parts": 9000, "seed": 23, "wafers": 200}


def write(path: Path, data: bytes, mode: str) -> None:
    """As the tester does, through to the disk (what is not there, a failing disk may lose
    whoever reads it)."""
    with open(path, mode, buffering=0) as f:
        f.write(data)
        os.fsync(f.fileno())


def health(hub: Hub) -> dict[str, object]:
    return get_json(f"{hub.url}/healthz")


def test_the_hubs_disk_failing_pauses_acks_and_names_the_disk_never_the_connections(
        tmp_path: Path) -> None:
    """SQLite's I/O errors (SQLITE_IOERR, then SQLITE_CORRUPT from a WAL index it can no
    longer read) are the disk's, not a connection's: the gateway stays connected and spools,
    /healthz says the disk is failing, and once repaired every record arrives once."""
    with ext4_filesystem(tmp_path / "hub") as fs:
        hub = Hub(tmp_path).start()
        gw = Gateway(tmp_path, hub.port, *source_settings(**SOURCE)).start()
        try:
            wait_for(lambda: hub.stats().get("records_applied", 0) > 2000, timeout=30)
            shut_down(fs)
            wait_for(lambda: health(hub)["status"] == "degraded", timeout=30)
            detail = str(health(hub)["detail"])
            assert "the disk is failing" in detail and "Input/output error" in detail, detail
            assert "disk full" not in detail
            assert hub.metric("edgegw_hub_store_damaged") == 1
            assert hub.metric("edgegw_hub_store_full") == 0
            applied = hub.stats()["records_applied"]
            spooled = gw.stats()["store"]["frames"]
            connects = gw.stats()["metrics"]["uplink_connects_total"]
            # paused, not failed: the gateway keeps its frames and stays connected
            wait_for(lambda: gw.stats()["store"]["frames"] > spooled + 5, timeout=30)
            assert hub.stats()["records_applied"] == applied
            assert hub.stats()["connected"] is True
            assert gw.stats()["metrics"]["uplink_connects_total"] == connects
            assert hub.metric("edgegw_internal_errors_total") == 0
            hub.stop()
            assert hub.proc is not None and hub.proc.returncode is not None
            remount(fs)
            hub.start()
            all_arrive_once(hub, gw, **SOURCE)
            assert health(hub)["status"] == "ok"
        finally:
            stop_all(hub, gw)


def test_the_gateways_spool_disk_failing_stops_it_with_one_line_and_nothing_is_lost(
        tmp_path: Path) -> None:
    """Retrying a failed fsync is no answer (the kernel may have dropped the pages): the
    gateway stops at once with one line and exit status 4, for its service manager to start
    it again; while the disk stays broken each start refuses with one line (status 3);
    once repaired, the start recovers the spool and every record arrives once."""
    with ext4_filesystem(tmp_path / "gw") as fs:  # first: where it cannot, nothing started
        hub = Hub(tmp_path).start()
        gw = Gateway(tmp_path, hub.port, *source_settings(**SOURCE)).start()
        try:
            wait_for(lambda: hub.stats().get("records_applied", 0) > 2000, timeout=30)
            shut_down(fs)
            assert gw.proc is not None
            assert gw.proc.wait(30) == 4
            last = (tmp_path / "gw.log").read_text().strip().splitlines()[-1]
            assert last.startswith(f"edgegw: stopped: spool.dir: '{gw.spool}': the disk is "
                                   "failing: Input/output error"), last
            assert "Traceback" not in (tmp_path / "gw.log").read_text()
            gw.start(wait=False)
            assert gw.proc.wait(30) == 3
            last = (tmp_path / "gw.log").read_text().strip().splitlines()[-1]
            assert last == (f"edgegw: cannot start: gateway.state_dir: cannot write in "
                            f"'{gw.state}': input/output error"), last
            remount(fs)
            gw.start()
            all_arrive_once(hub, gw, **SOURCE)
        finally:
            stop_all(hub, gw)


async def test_a_tester_directory_whose_disk_fails_is_read_on_where_it_stood_once_back(
        tmp_path: Path) -> None:
    """The tester writes to a disk (or file server) that fails mid-lot: reads get EIO.  The
    tail reports it once (a ``source_io`` warning, counted), lets go of the file -- so the
    disk can be unmounted and repaired -- and keeps polling; once the disk is back it reads
    the file on from the byte it had reached: the lot arrives whole, each record once."""
    data = lot(7)
    state = tmp_path / "state"
    state.mkdir()
    with ext4_filesystem(tmp_path / "tester", 16) as fs:
        path = fs / "lot.stdf"
        half = len(data) // 2
        write(path, data[:half], "wb")
        source = start(fs, state, None)
        sink = Sink(state)
        await polls(source, sink)
        assert sink.records, "the first half was read"
        shut_down(fs)
        await polls(source, sink)
        events = [r for r in sink.records if isinstance(r, GatewayEvent)]
        assert [(e.level, e.code) for e in events] == [("warning", "source_io")], events
        assert "cannot read: [Errno 5] Input/output error" in events[0].message
        assert source.errors.total() == 1
        remount(fs)  # the tail holds no descriptor of the file: unmounting works
        write(path, data[half:], "ab")
        await polls(source, sink)
        await polls(source, sink)
    tester = [r for r in no_ts(sink.records) if not isinstance(r, GatewayEvent)]
    assert tester == no_ts(expected(data))


def test_an_embedded_gateway_whose_spool_disk_fails_raises_spool_failed_in_the_program(
        tmp_path: Path) -> None:
    """In a test program's own process the failure is the program's to see: ``put`` and
    ``close`` raise ``SpoolFailed`` (its one line, not a closed-gateway error nor Trio's
    exception groups), as after a crash what the spool made durable is kept, and the
    next run's gateway finds it there to send."""
    with ext4_filesystem(tmp_path / "state") as fs:
        config = {"gateway": {"id": "ate-01", "token": "t", "state_dir": str(fs),
                              "hub_url": f"ws://127.0.0.1:{free_port()}/ws/gateway"},
                  "batch": {"max_delay_ms": 5}, "spool": {}}
        gw = EmbeddedGateway(config, drain_timeout=0.1)  # no hub: nothing is acknowledged
        part = PartResult("testprog", time.time(), "L1", "W1", 1, 0, "1", 0, 0, 1, 1, True)
        gw.put([part] * 10)
        wait_for(lambda: gw.stats()["store"]["durable_seq"] >= 1 and
                 gw.stats()["pending_in_batcher"] == 0)
        durable = gw.stats()["store"]["durable_seq"]
        shut_down(fs)
        with pytest.raises(SpoolFailed) as failed:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                gw.put([part])
                time.sleep(0.01)
        assert str(failed.value).startswith(
            f"spool.dir: '{fs / 'spool'}': the disk is failing: Input/output error"), failed
        with pytest.raises(SpoolFailed):
            gw.put([part])
        with pytest.raises(SpoolFailed):
            gw.close()
        remount(fs)
        again = EmbeddedGateway(config, drain_timeout=0.1)
        try:
            assert again.stats()["store"]["frames"] >= durable
        finally:
            again.close()


async def test_a_spool_segment_that_cannot_be_read_stops_the_start_with_one_line(
        tmp_path: Path) -> None:
    """A segment the file system can no longer read (here a damaged extent tree: EUCLEAN
    from the kernel) is not skipped on the spool's own -- a repair may bring it back, and
    it holds frames the hub may lack: the start fails with one line naming it and what to
    do.  Once the operator has repaired the file system (fsck), the spool starts without
    the frames the repair could not save, counts them as lost (the hub is told at the next
    HELLO) and sends the rest."""
    with ext4_filesystem(tmp_path / "gw", 32) as fs:
        spool_dir = fs / "spool"
        async with DiskSpool.open(spool_cfg(spool_dir)) as spool:
            await fill(spool, 300)  # 200-byte frames: several 16 KiB segments
        segments = sorted(spool_dir.glob("seg-*.spool"))
        assert len(segments) >= 3
        held = [e.seq for e in scan(segments[1].read_bytes())
                if isinstance(e, SpoolRecord) and e.kind is Kind.FRAME]
        unreadable(fs, segments[1])
        with pytest.raises(BaseExceptionGroup) as failed:  # (from the spool's nursery)
            async with DiskSpool.open(spool_cfg(spool_dir)):
                pass
        (refused,) = [e for e in leaves(failed.value) if isinstance(e, StartupError)]
        assert str(refused).startswith(
            f"spool.dir: '{spool_dir}': cannot read {segments[1].name}: structure needs "
            "cleaning: the disk or its file system is damaged; repair it (fsck)"), refused
        repair(fs)  # fsck clears the broken extent: what it held reads as zeros
        async with DiskSpool.open(spool_cfg(spool_dir)) as spool:
            # the frames of the cleared blocks (a later block of the file may survive)
            lost = {s for a, b in spool.lost_ranges for s in range(a, b + 1)}
            assert lost and min(lost) == held[0] and lost <= set(held), spool.lost_ranges
            sent = [f.seq for f in spool.frames_from(1, 1000)]
            assert sent == [s for s in range(1, 301) if s not in lost]
