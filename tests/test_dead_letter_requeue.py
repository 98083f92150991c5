"""``edgegw dead-letters requeue`` (edgegw/gateway/requeue.py): once the cause is mended,
the records a hub refused reach it -- each once, however often the tool runs or wherever
it is killed -- while what still cannot be sent stays in the dead-letter file with its
reason, and a running gateway is never touched.

A real hub and gateway: the gateway sends a short simulated lot and stops; its dead-letter
file then holds, as a gateway writes them (docs/spool.md, "The dead-letter file"), frames
of records under record ids the hub has applied already (as an over-limit record's are:
its stand-in event went under them), a refused record, and a body that does not decode."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import cbor2
from disktools import dead_letter_entry as entry
from faultkit import Gateway, Hub, hub_records, source_settings, stop_all, wait_all_applied
from processes import wait_for

from edgegw.protocol import encode_body, encode_columns
from edgegw.records import PartResult

SOURCE = {"parts_per_second": 2000, "max_parts": 400, "seed": 3, "wafers": 200}
UNDECODABLE = b"\xff not cbor"
SERVICE_UID = 4242


def part(i: int) -> PartResult:
    return PartResult("archive", 1_796_000_000.0 + i, "REQUEUED-LOT", "W1", 1, i % 4, str(i),
                      i, i, 1, 1, True)


def dead_letters(n_frames: int, undecodable_first: bool = False
                 ) -> tuple[bytes, list[tuple[Any, ...]]]:
    """``n_frames`` frames of 3 records each (ids 1.., applied at the hub already), a
    refused record (id 2, below the spool's next), an undecodable body (last, or first);
    the records."""
    undecodable = entry(seq=40, epoch="e", reason="body is not valid CBOR",
                        at=1_796_000_002.0, body=UNDECODABLE)
    parts, records = [undecodable] if undecodable_first else [], []
    for k in range(n_frames):
        batch = [part(3 * k + j) for j in range(3)]
        records += batch
        encode = encode_columns if k % 2 else encode_body  # both layouts, as sent
        parts.append(entry(seq=10 + k, epoch="e", reason="over the hub's max_frame_bytes",
                           at=1_796_000_000.0, body=encode(1, batch)))
    refused = part(999)
    records.append(refused)
    parts.append(entry(seq=None, epoch="e", reason="too_large", at=1_796_000_001.0,
                       body=encode_body(2, [refused]), source="archive", rid=2))
    if not undecodable_first:
        parts.append(undecodable)
    return b"".join(parts), [tuple(r) for r in records]


def requeue(gw: Gateway, failpoints: str = "", *settings: str
            ) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edgegw", "dead-letters", "requeue", "--config", str(gw.config),
         "--set", f"gateway.state_dir={gw.state}", "--set", f"spool.dir={gw.spool}",
         *(a for kv in settings for a in ("--set", kv))],
        capture_output=True, text=True, timeout=60,
        env={**_env(), "EDGEGW_FAILPOINTS": failpoints})


def _env() -> dict[str, str]:
    return dict(os.environ)


def archived(hub: Hub) -> list[tuple[Any, ...]]:
    _, events, _ = hub_records(hub.dir)
    return [e for e in events if e[0] == "archive"]


def run_lot(tmp_path: Path) -> tuple[Hub, Gateway, str]:
    """A hub, and a gateway stopped after its lot arrived; its epoch."""
    hub = Hub(tmp_path).start()
    gw = Gateway(tmp_path, hub.port, *source_settings(**SOURCE)).start()
    wait_all_applied(hub, gw, 0)
    epoch = gw.stats()["store"]["epoch"]
    gw.stop()
    return hub, gw, epoch


def test_requeued_records_reach_the_hub_once_and_what_cannot_go_stays(tmp_path: Path) -> None:
    hub, gw, epoch = run_lot(tmp_path)
    try:
        data, records = dead_letters(2)
        # a refused record of this epoch past the spool's next id: its source may read it
        # again at the next start (a crash before the checkpoint past it), so it stays
        replayed = entry(seq=None, epoch=epoch, reason="too_large", at=1_796_000_003.0,
                         body=encode_body(10**9, [part(5000)]), source="archive", rid=10**9)
        data += replayed
        (gw.state / "dead-letter.cborseq").write_bytes(data)
        as_root = os.geteuid() == 0
        if as_root:  # the service's own user owns its state (DynamicUser), root runs the tool
            for p in [gw.state, *gw.state.rglob("*")]:
                os.lchown(p, SERVICE_UID, SERVICE_UID)
        run = requeue(gw)
        assert run.returncode == 0, run.stderr
        assert "3 entries (7 records) stored as frames" in run.stdout
        if as_root:  # what it wrote is the service's, or the service could not open it
            assert {p.lstat().st_uid for p in gw.state.rglob("*")} == {SERVICE_UID}
        assert "stays: its body does not decode" in run.stdout
        assert "stays: a refused record its source may read again" in run.stdout
        # what stays is those two entries; the original is kept beside it
        left = (gw.state / "dead-letter.cborseq").read_bytes()
        n = int.from_bytes(left[:4], "big")
        assert cbor2.loads(left[4:4 + n])["body"] == UNDECODABLE
        assert left[4 + n:] == replayed
        (original,) = gw.state.glob("dead-letter.requeued-*.cborseq")
        assert original.read_bytes() == data
        # a second run stores nothing again
        again = requeue(gw)
        assert again.returncode == 0 and "stored as frames" not in again.stdout
        assert "stays: its body does not decode" in again.stdout
        gw.start()
        # what stays is what its gauge shows from the start
        assert gw.stats()["metrics"]["gateway_dead_letter_bytes"] == len(left)
        wait_for(lambda: len(archived(hub)) >= len(records), timeout=30)
        wait_all_applied(hub, gw, 0)
        # under their old ids (applied) the hub would have dropped them: new ids, once each
        assert sorted(archived(hub)) == sorted(records)
        # and a running gateway is never given frames behind its back
        running = requeue(gw)
        assert running.returncode == 3 and "in use by another gateway" in running.stderr
    finally:
        stop_all(hub, gw)


def test_a_requeue_killed_between_entries_goes_on_and_stores_none_twice(
        tmp_path: Path) -> None:
    hub, gw, _ = run_lot(tmp_path)
    try:
        # the entry it keeps comes before where it is killed: kept again, not dropped
        data, records = dead_letters(5, undecodable_first=True)
        (gw.state / "dead-letter.cborseq").write_bytes(data)
        killed = requeue(gw, "requeue.entry_stored=2:kill")
        assert killed.returncode == -9  # SIGKILL after its second frame was durable
        assert (gw.state / "dead-letter.cborseq").read_bytes() == data  # not yet replaced
        run = requeue(gw)
        assert run.returncode == 0, run.stderr
        assert "an interrupted requeue went on from byte" in run.stdout
        assert "4 entries (10 records) stored" in run.stdout  # 3 frames + the refused one
        left = (gw.state / "dead-letter.cborseq").read_bytes()
        assert cbor2.loads(left[4:])["body"] == UNDECODABLE
        gw.start()
        wait_for(lambda: len(archived(hub)) >= len(records), timeout=30)
        wait_all_applied(hub, gw, 0)
        assert sorted(archived(hub)) == sorted(records)
    finally:
        stop_all(hub, gw)


def test_a_requeue_killed_and_run_again_under_other_limits_decides_each_entry_as_before(
        tmp_path: Path) -> None:
    """The limit a run began with holds until it ends: an entry it kept for its size is
    not taken for stored when the limit was raised meanwhile (it would be dropped from the
    file, never sent), and a limit lowered below an entry still to store stops it, nothing
    changed (the entries it stored would otherwise be kept too, and sent twice)."""
    hub, gw, _ = run_lot(tmp_path)
    try:
        big = [part(100 + i) for i in range(60)]  # 2,595 bytes: over 2,048
        mids = [[part(200 + 30 * k + i) for i in range(30)] for k in range(3)]  # 1,275 each
        data = entry(seq=9, epoch="e", reason="over the hub's max_frame_bytes",
                     at=1_796_000_000.0, body=encode_body(1, big))
        for k, batch in enumerate(mids):
            data += entry(seq=10 + k, epoch="e", reason="over the hub's max_frame_bytes",
                          at=1_796_000_000.0, body=encode_body(1, batch))
        dead = gw.state / "dead-letter.cborseq"
        dead.write_bytes(data)
        killed = requeue(gw, "requeue.entry_stored=2:kill", "uplink.max_frame_bytes=2048")
        assert killed.returncode == -9  # the big entry kept, two stored

        lowered = requeue(gw, "", "uplink.max_frame_bytes=1024")
        assert lowered.returncode == 3, lowered.stdout + lowered.stderr
        assert "decided with a frame limit of 2048 bytes; this config allows 1024" \
            in lowered.stderr
        assert dead.read_bytes() == data  # nothing changed

        raised = requeue(gw)  # the default limit, 8 MiB: the big entry would fit now
        assert raised.returncode == 0, raised.stderr
        assert "an interrupted requeue went on from byte" in raised.stdout
        left = dead.read_bytes()
        assert cbor2.loads(left[4:])["body"] == encode_body(1, big)  # kept again

        gw.start()
        mid_records = sorted(tuple(r) for batch in mids for r in batch)
        wait_for(lambda: len(archived(hub)) >= len(mid_records), timeout=30)
        wait_all_applied(hub, gw, 0)
        assert sorted(archived(hub)) == mid_records
        gw.stop()

        again = requeue(gw)  # a new run, under the raised limit: the big entry goes
        assert again.returncode == 0, again.stderr
        gw.start()
        every = sorted([*mid_records, *(tuple(r) for r in big)])
        wait_for(lambda: len(archived(hub)) >= len(every), timeout=30)
        wait_all_applied(hub, gw, 0)
        assert sorted(archived(hub)) == every
    finally:
        stop_all(hub, gw)
