"""A hub restart loads its live-state checkpoint and replays only the frames after it,
however long the history: the replay is bounded by ``hub.checkpoint_records``, and what
the restarted hub shows equals what a full replay of every frame shows.

Real processes: a hub (``edgegw hub``) and a gateway with a seeded simulated tester
stream a short and a four times longer history; the hub is killed with SIGKILL (no
final checkpoint: the worst case), restarted with checkpoints, then restarted again with
checkpoints off (a full replay of the same store) for comparison.  Times are measured by
bench/hub_restart.py; this test checks what they rest on: how much is replayed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from faultkit import Gateway, Hub, expected_records, source_settings, wait_all_applied
from processes import get_json

EVERY = 5000  # hub.checkpoint_records for the test: many checkpoints in a short history


def shown(hub: Hub) -> dict[str, Any]:
    """What a dashboard sees: every lot with its wafers, and a test's statistics."""
    lots = get_json(f"{hub.url}/api/lots?limit=1000")["lots"]
    out: dict[str, Any] = {"lots": lots}
    for lot in lots:
        out[lot["lot_id"]] = get_json(f"{hub.url}/api/lots/{lot['lot_id']}/wafers")
        out[f"{lot['lot_id']}/test"] = get_json(f"{hub.url}/api/tests/{lot['lot_id']}/100")
    return out


def run_history(tmp: Path, parts: int) -> tuple[dict[str, Any], dict[str, Any], int]:
    """(replay with checkpoints, replay without, records) after a SIGKILL."""
    source = {"parts_per_second": 4000, "max_parts": parts, "seed": 5, "wafers": 200}
    hub = Hub(tmp).start("", True, f"hub.checkpoint_records={EVERY}")
    gw = Gateway(tmp, hub.port, *source_settings(**source)).start()
    n = len(expected_records(**source))
    try:
        wait_all_applied(hub, gw, n, timeout=120)
    finally:
        hub.kill()
        # stopped after the hub's death: it does not wait for an answer to its close
        gw.stop()
    replays = []
    for setting in (f"hub.checkpoint_records={EVERY}", "hub.checkpoint_interval_s=0"):
        hub.start("", True, setting)
        try:
            stats = get_json(f"{hub.url}/api/stats")
            replays.append({**stats["replay"], "checkpoint": stats.get("checkpoint"),
                            "shown": shown(hub)})
        finally:
            hub.kill()
    return replays[0], replays[1], n


def test_restart_replays_only_the_frames_after_the_checkpoint_however_long_the_history(
        tmp_path: Path) -> None:
    results = {}
    for parts in (1500, 6000):
        (tmp_path / str(parts)).mkdir()
        results[parts] = run_history(tmp_path / str(parts), parts)
    for parts, (ckpt, full, n) in results.items():
        # the full replay reads every record; the checkpointed one at most one
        # checkpoint's worth (plus the frame that crossed the threshold)
        assert full["records"] >= n and full["after_frame"] == 0
        assert ckpt["checkpoint"]["loaded_from"] == "checkpoint"
        assert ckpt["after_frame"] > 0
        assert ckpt["records"] <= EVERY + 2000, (parts, ckpt["records"])
        assert ckpt["shown"] == full["shown"]
        assert any(lot["die_count"] for lot in ckpt["shown"]["lots"])
    short, long = results[1500], results[6000]
    assert long[2] >= 3.5 * short[2]  # four times the history ...
    assert long[1]["records"] >= 3.5 * short[1]["records"]  # ... four times the full replay
    assert long[0]["records"] <= EVERY + 2000  # ... the same bounded replay
