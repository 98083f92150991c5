"""``hub.sqlite3`` found damaged while the hub runs: acknowledgements pause, the gateway
stays connected and spools, health and a gauge say why -- no connection ends with 1011
over and over.  Once an operator has stopped the hub and recovered the file
(docs/operations.md, "A damaged database"), everything arrives exactly once.

The damage is real as SQLite sees it: another connection points the ``frames`` table's
root page at an index's page (``writable_schema``) and bumps the schema cookie, so the
hub's next commit gets SQLITE_CORRUPT ("database disk image is malformed").  Undoing that
is the recovery.
"""

from __future__ import annotations

import re
import shutil
import sqlite3
import urllib.request
from pathlib import Path

from faultkit import (
    Gateway,
    Hub,
    assert_exactly_once,
    expected_records,
    hub_records,
    source_settings,
    stop_all,
)
from faultkit import wait_all_applied as wait_applied
from processes import get_json, wait_for

SOURCE = {"parts_per_second": 1500, "max_parts": 6000, "seed": 12, "wafers": 200}


def set_frames_root(db_path: Path, rootpage: int | None = None) -> int:
    """Point the frames table at ``rootpage`` (None: at the first index's page); returns
    the root page it had."""
    db = sqlite3.connect(db_path, isolation_level=None, timeout=30)
    try:
        (old,) = db.execute("SELECT rootpage FROM sqlite_schema WHERE name = 'frames'"
                            ).fetchone()
        if rootpage is None:
            (rootpage,) = db.execute("SELECT rootpage FROM sqlite_schema WHERE type = 'index'"
                                     " ORDER BY rootpage LIMIT 1").fetchone()
        db.execute("PRAGMA writable_schema=ON")
        (version,) = db.execute("PRAGMA schema_version").fetchone()
        db.execute("UPDATE sqlite_schema SET rootpage = ? WHERE name = 'frames'", (rootpage,))
        db.execute(f"PRAGMA schema_version={version + 1}")
        return int(old)
    finally:
        db.close()


def gateway_connects(gw: Gateway) -> float:
    """The gateway's successful handshakes (a 1011 close would make it connect again)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{gw.status}/metrics", timeout=5) as r:
        lines = r.read().decode().splitlines()
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines
               if line.startswith("edgegw_uplink_connects_total"))


def test_a_store_damaged_at_runtime_pauses_acks_and_nothing_is_lost_after_recovery(
        tmp_path: Path) -> None:
    hub = Hub(tmp_path).start()
    gw = Gateway(tmp_path, hub.port, *source_settings(**SOURCE)).start()
    try:
        wait_for(lambda: hub.stats().get("records_applied", 0) > 2000, timeout=30)
        frames_root = set_frames_root(hub.dir / "hub.sqlite3")
        wait_for(lambda: get_json(f"{hub.url}/healthz")["status"] == "degraded", timeout=30)
        health = get_json(f"{hub.url}/healthz")
        assert "is damaged" in health["detail"] and "hub.sqlite3" in health["detail"], health
        assert hub.metric("edgegw_hub_store_damaged") == 1
        applied = hub.stats()["records_applied"]
        spooled = gw.stats()["store"]["frames"]
        connects = gateway_connects(gw)
        # paused, not failed: the gateway keeps its frames and its one connection
        wait_for(lambda: gw.stats()["store"]["frames"] > spooled + 5, timeout=30)
        assert hub.stats()["records_applied"] == applied
        assert hub.stats()["connected"] is True
        assert gateway_connects(gw) == connects
        assert hub.metric("edgegw_internal_errors_total", 'where="gateway_connection"') == 0
        assert hub.proc is not None and hub.proc.poll() is None

        # the operator: stop the hub, recover the file, start it again
        hub.stop()
        set_frames_root(hub.dir / "hub.sqlite3", frames_root)
        hub.start()
        expected = expected_records(**SOURCE)
        wait_applied(hub, gw, len(expected), timeout=120)
        assert get_json(f"{hub.url}/healthz")["status"] == "ok"
        assert hub.metric("edgegw_hub_store_damaged") == 0
        assert hub.stats()["frames_lost"] == 0
        assert_exactly_once(hub.dir, expected)
    finally:
        stop_all(hub, gw)


def test_a_hub_store_put_back_from_an_older_copy_names_what_it_lost_not_only_the_gateway(
        tmp_path: Path) -> None:
    """The operator puts back a copy of ``hub.sqlite3`` older than the frames the hub has
    acknowledged since (docs/operations.md, "A damaged database"): those frames are gone
    from the store and from the gateway's spool.  The hub records them as lost at the
    HELLO and says that they are its own loss -- the gateway names the frames it dropped,
    none here -- while every frame the gateway still held arrives, each record at most
    once."""
    hub = Hub(tmp_path).start()
    gw = Gateway(tmp_path, hub.port, *source_settings(**SOURCE)).start()
    backup = tmp_path / "backup"
    try:
        wait_for(lambda: hub.stats().get("records_applied", 0) > 1500, timeout=30)
        hub.stop()
        backup.mkdir()
        for f in hub.dir.glob("hub.sqlite3*"):
            shutil.copy2(f, backup / f.name)
        acked = gw.stats()["store"]["acked"]  # the copy's (no hub to acknowledge more)
        hub.start()
        wait_for(lambda: gw.stats()["store"]["acked"] > acked + 3, timeout=30)
        hub.stop()
        for f in hub.dir.glob("hub.sqlite3*"):
            f.unlink()
        for f in backup.iterdir():
            shutil.copy2(f, hub.dir / f.name)
        hub.start()
        expected = expected_records(**SOURCE)
        # the tester's last record applied (they come in order) and the spool empty
        wait_for(lambda: gw.stats()["store"]["frames"] == 0
                 and hub_records(hub.dir)[0][-1:] == expected[-1:], timeout=90, interval=0.5)
        lost = hub.stats()["frames_lost"]
        assert lost > 3, lost
        # told by the HELLO (below the gateway's lowest unacknowledged frame) and, for
        # frames acknowledged out of order above it (its backlog and live lanes), a LOST
        log = (tmp_path / "hub.log").read_text()
        told = re.findall(r"gateway ate-01: (\d+) frame\(s\) below seq \d+(?: \(told by a "
                          r"LOST while connected\))? that this hub acknowledged are no longer "
                          r"in its store \(its data directory restored from an older copy",
                          log)
        assert told and sum(map(int, told)) == lost, log[-2000:]
        assert "dropped by the gateway" not in log
        assert hub.metric("edgegw_hub_acknowledged_frames_lost_total",
                          'gateway="ate-01"') == lost
        # what is missing is the lost frames' records; the rest are there once, in order
        got, _, rids = hub_records(hub.dir)
        assert len(rids) == len(set(rids)) and 0 < len(got) < len(expected)
        left = iter(expected)
        assert all(record in left for record in got), "not the tester's records in order"
    finally:
        stop_all(hub, gw)
