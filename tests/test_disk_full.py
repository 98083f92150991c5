"""The hub's disk fills up: acknowledgements pause, the gateway spools, and once space
returns everything arrives exactly once -- with no restart and no operator action.

The hub's data directory is a real small file system: a tmpfs mounted for the test
(``mount -t tmpfs -o size=...``, which needs root; the test is skipped otherwise), filled
to the last byte with a filler file while a real gateway process streams a seeded
simulated tester into a real hub process.  Then the filler is deleted.  The comparison
is record by record, as in tests/test_faults.py.
"""

from __future__ import annotations

from pathlib import Path

from disktools import fill_to_the_last_byte, small_filesystem
from faultkit import (
    Gateway,
    Hub,
    assert_exactly_once,
    expected_records,
    source_settings,
    stop_all,
)
from faultkit import wait_all_applied as wait_applied
from processes import get_json, wait_for

SOURCE = {"parts_per_second": 1500, "max_parts": 9000, "seed": 11, "wafers": 200}


def metric(hub: Hub, name: str) -> float:
    return get_json(f"{hub.url}/api/stats")["metrics"].get(name, 0)


def test_a_full_disk_pauses_acks_the_gateway_spools_and_all_arrives_once_space_returns(
        tmp_path: Path) -> None:
    with small_filesystem(tmp_path / "hub", "24m"):
        hub = Hub(tmp_path).start()
        gw = Gateway(tmp_path, hub.port, *source_settings(**SOURCE)).start()
        try:
            wait_for(lambda: hub.stats().get("records_applied", 0) > 2000, timeout=30)
            filler = fill_to_the_last_byte(hub.dir)
            # the hub finds out at its next commit that needs a new page
            wait_for(lambda: get_json(f"{hub.url}/healthz")["status"] == "degraded",
                     timeout=60)
            assert metric(hub, "hub_store_full") == 1
            applied = hub.stats()["records_applied"]
            spooled = gw.stats()["store"]["frames"]
            # paused, not failed: nothing more is applied, the gateway keeps its frames
            # (its spool grows while the tester goes on), and it stays connected
            wait_for(lambda: gw.stats()["store"]["frames"] > spooled + 5, timeout=30)
            assert hub.stats()["records_applied"] == applied
            assert hub.stats()["connected"] is True
            assert hub.proc is not None and hub.proc.poll() is None
            filler.unlink()
            expected = expected_records(**SOURCE)
            wait_applied(hub, gw, len(expected), timeout=120)
            assert get_json(f"{hub.url}/healthz")["status"] == "ok"
            assert metric(hub, "hub_store_full") == 0
            assert metric(hub, "hub_store_full_total") >= 1
            assert hub.stats()["frames_lost"] == 0
            assert_exactly_once(hub.dir, expected)
        finally:
            stop_all(hub, gw)
