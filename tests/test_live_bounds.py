"""The live state never drops silently: a lot of any size stays live, in bounded memory,
and every record it cannot apply is logged, counted and shown.

Today's finding: ``max_wafers_per_lot = 200`` was a hard cap -- the example simulator's lot
of 1,000 wafers froze the dashboard at W200 while 41,052 parts were dropped, nothing logged.
Now wafers leave memory for the history store (closed ones first) and the history API
serves them; a record the state cannot apply is logged (rate-limited), counted by reason
and shown on the dashboard.
"""

from __future__ import annotations

import logging
import tracemalloc
from pathlib import Path
from typing import Any

import pytest
import trio
from hubtools import http_get, start_tester
from test_dashboard_chromium import ARTIFACTS, needs_chromium, open_browser, wait_page
from test_hub_state import Recorder, part, sim_records
from test_live_protocol import Viewer

from edgegw.config import build
from edgegw.hub import Hub, HubConfig, topics
from edgegw.hub.fanout import LiveConfig, LiveHub
from edgegw.hub.live import LiveState
from edgegw.metrics import Metrics
from edgegw.records import LotEnd, LotStart, PartResult, WaferEnd, WaferStart
from edgegw.sim import tester as sim

TOKEN = "s3cret"


def test_a_lot_of_1200_wafers_keeps_the_newest_wafer_live_and_memory_bounded() -> None:
    profile = sim.TesterProfile(lot_id="BIG", wafers=1200, wafer_diameter_dies=6,
                                tests_per_part=1, retest_fraction=0.0, seed=3)
    archived: dict[str, int] = {}  # wafer -> dies in its archive (the snapshots themselves
    # would be the test's memory, not the state's)

    def on_archive(lot_id: str, wafer_id: str, snap: dict[str, Any]) -> None:
        assert lot_id == "BIG" and snap["status"] == "closed"
        archived[wafer_id] = len(snap["dies"])

    metrics = Metrics()
    state = LiveState(lambda topic, delta: None, metrics=metrics, on_wafer_archive=on_archive)
    records = [r for batch in sim_records(profile) for r in batch]
    parts = sum(isinstance(r, PartResult) for r in records)
    wafer_starts = [i for i, r in enumerate(records) if isinstance(r, WaferStart)]
    tracemalloc.start()
    try:
        for first in range(0, len(records), 500):  # frames of 500 records, as gateways send
            if first <= wafer_starts[100] < first + 500:
                at_100 = tracemalloc.get_traced_memory()[0]
            state.on_records("gw1", first + 1, records[first:first + 500], now=2_000.0)
        at_1200 = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()

    lot = state.lots["BIG"]
    newest = f"BIG-W{1200:02d}"
    assert newest in lot.wafers and lot.wafers[newest].tally.dies == archived["BIG-W01"] > 20
    assert len(lot.wafers) == state.max_wafers_per_lot == 25
    assert len(archived) == 1200 - 25 and set(archived.values()) == {archived["BIG-W01"]}
    # The lot's own figures count every wafer, archived or live; nothing was dropped.
    assert lot.tally.parts == parts and lot.tally.dies == 1200 * archived["BIG-W01"]
    assert state.not_applied_total == 0
    assert metrics.counter("hub_state_records_ignored_total").total() == 0
    snap = state.snapshot(topics.lot("BIG"))
    assert snap is not None and snap["wafer_count"] == 1200 and snap["archived_wafers"] == 1175
    # 1,100 more wafers cost (almost) nothing: live, each would take about 8 kB.
    assert at_1200 - at_100 < 1_000_000, (at_100, at_1200)


def lot_with_wafers(lot: str, wafers: int, dies: int = 3, ts: float = 100.0) -> list[Any]:
    out: list[Any] = [LotStart("t", ts, lot, "PT", "node", "T", "job", 0)]
    for w in range(1, wafers + 1):
        wafer = f"{lot}-W{w}"
        out.append(WaferStart("t", ts + w, lot, wafer, 1, 0))
        out += [part(x, 0, 1, wafer=wafer, lot=lot, ts=ts + w) for x in range(dies)]
        out.append(WaferEnd("t", ts + w, lot, wafer, 1, 0, dies, dies))
    return out


def test_a_record_the_live_state_cannot_apply_is_logged_counted_and_visible(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="edgegw.hub.state")
    pub = Recorder()
    metrics = Metrics()
    state = LiveState(pub, metrics=metrics, max_lots=1, max_wafers_per_lot=2,
                      log_interval_s=60.0)
    state.on_records("gw1", 1, lot_with_wafers("L1", 3), now=1_000.0)
    assert list(state.lots["L1"].wafers) == ["L1-W2", "L1-W3"]
    assert not caplog.records and state.snapshot(topics.HUB_STATE) == {
        "not_applied": 0, "reasons": {}}

    late = part(0, 0, 4, wafer="L1-W1", lot="L1", ts=500.0)  # W1 left memory
    bad = PartResult("tester", 500.0, "L1", "L1-W3", 1, 0, "p", 0, 0, "bin 4", 4, False,
                     False, 0, None, None)
    state.on_records("gw1", 100, [late, bad], now=1_001.0)
    state.on_records("gw1", 200, lot_with_wafers("L2", 1, ts=9_000.0), now=1_002.0)
    state.on_records("gw1", 300, [part(1, 0, 1, wafer="L1-W3", lot="L1", ts=501.0)],
                     now=1_003.0)  # L1 was evicted for L2

    # Counted, by reason; none of them changed a figure.
    ignored = metrics.counter("hub_state_records_ignored_total")
    assert (ignored.get(reason="archived_wafer"), ignored.get(reason="bad_record"),
            ignored.get(reason="evicted_lot")) == (1, 1, 1)
    assert metrics.counter("hub_state_bad_records_total").get(kind="PartResult") == 1

    # Visible: the hub/state topic (the dashboard's warning) says what and why.
    health = state.snapshot(topics.HUB_STATE)
    assert health is not None and health["not_applied"] == 3
    assert set(health["reasons"]) == {"archived_wafer", "bad_record", "evicted_lot"}
    assert "wafer 'L1-W1' of lot 'L1' already left memory" in \
        health["reasons"]["archived_wafer"]["last"]
    assert "gateway gw1 rid 100 PartResult" in health["reasons"]["archived_wafer"]["last"]
    assert health["reasons"]["archived_wafer"]["last_at"] == 1_001.0
    assert pub.deltas(topics.HUB_STATE)[-1] == health
    assert pub.deltas("lot/L1/wafer/L1-W1")[-1] == {"status": "archived"}

    # Logged: the first of each reason at once, with the reason and the record.
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3
    assert any("(archived_wafer)" in m and "rid 100" in m for m in lines)
    assert any("(bad_record)" in m and "rid 101" in m for m in lines)
    assert any("(evicted_lot)" in m and "rid 300" in m for m in lines)

    # Rate-limited: 1,000 more (L1 is gone now) are one line, when the interval has passed.
    caplog.clear()
    state.on_records("gw1", 400, [late] * 1000, now=1_010.0)
    state.tick(1_030.0)
    assert not caplog.records
    state.tick(1_063.5)
    assert [r.getMessage()[:75] for r in caplog.records] == [
        "live state: 1000 record(s) not applied (evicted_lot), 1001 since the start;"]
    state.tick(1_200.0)
    assert len(caplog.records) == 1  # nothing new, nothing said
    assert state.snapshot(topics.HUB_STATE)["not_applied"] == 1003


def test_a_dashboard_following_every_wafer_holds_only_the_live_ones() -> None:
    """The fan-out forgets a wafer's channel (and its history of deltas) once it left
    memory and every follower has its last delta, "archived": a dashboard subscribed to
    ``lot/+/wafer/+`` for the whole lot does not make the hub keep all of them."""
    hub: LiveHub | None = None

    def publish(topic: str, delta: dict[str, Any]) -> None:
        assert hub is not None
        hub.publish(topic, delta)

    state = LiveState(publish, max_wafers_per_lot=3)
    hub = LiveHub(state, LiveConfig(), epoch="E1", metrics=Metrics())
    viewer = Viewer(hub)
    viewer.send({"type": "subscribe", "id": 1, "topics": ["lot/+/wafer/+"]})
    rid = 1
    for w in range(1, 41):
        batch = lot_with_wafers("LX", w)[-5:] if w > 1 else lot_with_wafers("LX", 1)
        state.on_records("gw1", rid, batch, now=float(w))
        rid += len(batch)
        hub.tick(float(w), float(w))
        viewer.drain()
        if w % 10 == 0:
            hub.sweep()
            wafer_channels = [t for t in hub.channels if "/wafer/" in t]
            assert len(wafer_channels) <= 3 + 1, wafer_channels  # the live ones (+1 closing)
    archived = [t for t, v in viewer.views.items() if v.get("status") == "archived"]
    assert len(archived) == 37 and "lot/LX/wafer/LX-W40" in viewer.views
    assert viewer.views["lot/LX/wafer/LX-W40"]["die_count"] == 3


async def test_wafers_that_left_memory_are_served_by_the_history_api(tmp_path: Path) -> None:
    """The issue's set-up, scaled down: a simulated lot with more wafers than the hub keeps
    live, through a real gateway into a real hub."""
    app = Hub(build(HubConfig, {"hub": {"port": 0, "data_dir": str(tmp_path / "hub")},
                                   "gateways": {"ate-01": {"token": TOKEN}}}))
    cap = app.state.max_wafers_per_lot
    async with trio.open_nursery() as nursery:
        port = await nursery.start(app.run)
        gateway = await start_tester(nursery, tmp_path, port, TOKEN, parts_per_second=20_000,
                                     wafers=cap + 5, wafer_diameter_dies=5, tests_per_part=1)
        with trio.fail_after(60):
            await gateway.sources[0][1].finished.wait()
            await gateway.flush()
            while gateway.store.first_unacked < gateway.store.next_seq:
                await trio.sleep(0.05)
            await app.alerts.wait_persisted()

        lot = app.state.lots["LOT0001"]
        assert len(lot.wafers) == cap and "LOT0001-W30" in lot.wafers
        status, body = await http_get(port, "/api/lots/LOT0001/wafers")
        assert status == 200
        assert [w["wafer_id"] for w in body["wafers"]] == [
            f"LOT0001-W{w:02d}" for w in range(1, cap + 6)]
        status, first = await http_get(port, "/api/lots/LOT0001/wafers/LOT0001-W01")
        assert status == 200 and first["status"] == "closed" and first["die_count"] > 10
        assert len(first["dies"]) == first["die_count"] == sum(first["hard_bins"].values())
        status, lots = await http_get(port, "/api/lots")
        assert lots["lots"][0]["wafers"] == cap + 5
        status, stats = await http_get(port, "/api/stats")
        assert status == 200
        live = stats["live_state"]
        assert live["wafers_archived"] == 5 and live["wafers_live"] == cap
        assert live["not_applied"] == 0 and live["reasons"] == {}
        nursery.cancel_scope.cancel()


@needs_chromium
async def test_the_dashboard_warns_of_records_not_applied(tmp_path: Path) -> None:
    app = Hub(build(HubConfig, {"hub": {"port": 0, "data_dir": str(tmp_path / "hub")},
                                   "gateways": {"ate-01": {"token": TOKEN}}}))
    cap = app.state.max_wafers_per_lot
    async with trio.open_nursery() as nursery:
        port = await nursery.start(app.run)
        async with open_browser(tmp_path / "profile") as browser:
            await browser.call("Page.navigate", url=f"http://127.0.0.1:{port}/")
            await wait_page(browser, lambda p: p["conn"] == "live", 15, "the page to connect")
            banner = "(() => { const w = document.getElementById('live-warning');" \
                     " return {hidden: w.hidden, text: w.textContent," \
                     " n: document.body.dataset.notApplied," \
                     " wafers: document.getElementById('wafer-select').length - 1}; })()"
            assert (await browser.eval(banner))["hidden"] is True

            app.state.on_records("ate-01", 1, lot_with_wafers("LW", cap + 3, dies=4))
            app.state.on_records("ate-01", 10_000, [
                part(0, 0, 4, wafer="LW-W1", lot="LW"),  # its wafer left memory
                LotEnd("t", 1.0, 42, 0),  # a lot id that is not text
            ])
            await wait_page(browser, lambda p: p["dies"] == 4, 15, "the newest wafer")
            with trio.fail_after(15):
                while (shown := await browser.eval(banner))["n"] != "2":
                    await trio.sleep(0.1)
            assert shown["hidden"] is False
            assert "2 records not shown" in shown["text"]
            assert "archived wafer 1" in shown["text"] and "bad record 1" in shown["text"]
            # Wafers that left memory leave the page too (the history API has them).
            assert shown["wafers"] == cap
            await browser.screenshot(ARTIFACTS / "dashboard-live-warning.png")
        nursery.cancel_scope.cancel()
