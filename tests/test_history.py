"""History API: the handlers over live state, and the real thing over HTTP with the history
store -- alerts and acknowledgements survive a hub restart, evicted lots stay answerable."""

from __future__ import annotations

import functools
import json
import logging
import shutil
import sqlite3
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import sectools
import trio
from hubtools import http_get, hub_config
from test_webhooks import StoreFault, short_lock_wait, store_fault  # noqa: F401 (fixtures)

from edgegw.config import ConfigError
from edgegw.hub import Hub as HubService
from edgegw.hub import history
from edgegw.hub.alerts import (
    MAX_HELD_ARCHIVES,
    AlertRuleConfig,
    AlertsConfig,
    AlertService,
)
from edgegw.hub.history import HistoryApi
from edgegw.hub.history_store import CACHE_ENTRIES, HistoryStore
from edgegw.hub.live import LiveState
from edgegw.web import HttpServer


def lot_records(lot: str, wafer: str, n: int, good_every: int = 2, ts: float = 100.0,
                ) -> list[Any]:
    """sectools' lot, one part in two good."""
    return sectools.lot_records(lot, wafer, n, good_every, ts)


def test_handlers_answer_from_live_state() -> None:
    state = LiveState(lambda t, d: None)
    state.on_records("gw", 1, lot_records("LA", "LA-1", 10), now=1.0)
    state.on_records("gw", 100, lot_records("LB", "LB-1", 4, ts=500.0), now=2.0)

    status, body = history.lots(state, [], {})
    assert status == 200
    assert [(r["lot_id"], r["die_count"], r["good"], r["live"]) for r in body["lots"]] == [
        ("LB", 4, 2, True), ("LA", 10, 5, True)]
    assert history.lots(state, [], {"limit": "x"})[0] == 400

    status, body = history.wafers(state, "LA", None)
    assert status == 200 and body["wafers"][0]["wafer_id"] == "LA-1"
    assert body["wafers"][0]["yield"] == 0.5 and body["wafers"][0]["status"] == "closed"
    status, body = history.wafer(state, "LA", "LA-1", None)
    assert status == 200 and len(body["dies"]) == 10 and body["hard_bins"] == {"1": 5, "4": 5}
    status, body = history.test(state, "LA", "300", None)
    assert status == 200 and body["count"] == 10 and body["mean"] == 5.5

    assert history.wafers(state, "NOPE", None) == (404, {"error": "unknown lot 'NOPE'"})
    assert history.wafer(state, "LA", "X", None)[0] == 404
    assert history.test(state, "LA", "abc", None)[0] == 400
    assert history.test(state, "LA", "999", None)[0] == 404


def test_the_lot_and_wafer_lists_say_a_lot_tested_again() -> None:
    """A lot (and its wafer) tested a second time under its id: the list rows give the
    passes and when the latest began, as the live topics do (live-topics.md)."""
    from edgegw.records import LotEnd, LotStart, PartResult, WaferEnd, WaferStart

    state = LiveState(lambda t, d: None)
    recs: list[Any] = []
    for start in (1000, 2000):  # two passes, each with its MIR ... MRR, WIR ... WRR
        recs += [LotStart("t", start, "RL", "PT", "n", "T", "j", start),
                 WaferStart("t", start, "RL", "RL-1", 1, start),
                 PartResult("t", start + 1, "RL", "RL-1", 1, 0, "1", 0, 0, 1, 1, True),
                 WaferEnd("t", start + 2, "RL", "RL-1", 1, start + 2),
                 LotEnd("t", start + 3, "RL", start + 3)]
    state.on_records("gw", 1, recs[:5], now=1.0)
    lot_row = history.lots(state, [], {})[1]["lots"][0]
    assert (lot_row["starts"], lot_row["reopened_at"]) == (1, None)
    state.on_records("gw", 6, recs[5:7], now=2.0)  # the second pass, in test
    lot_row = history.lots(state, [], {})[1]["lots"][0]
    assert (lot_row["status"], lot_row["starts"], lot_row["reopened_at"]) == ("open", 2, 2000)
    wafer_row = history.wafers(state, "RL", None)[1]["wafers"][0]
    assert (wafer_row["starts"], wafer_row["reopened_at"]) == (2, 2000)


async def get(port: int, path: str) -> tuple[int, Any]:
    return await request(port, "GET", path)


async def request(port: int, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()

    def run() -> tuple[int, Any]:
        req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data, method=method)
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read())

    return await trio.to_thread.run_sync(run)


class Hub:
    """The parts of a hub these tests need: live state + alert service + history API on a
    real HTTP port.  ``stop()`` and a new Hub on the same directory is a restart."""

    RULES = AlertsConfig(rules=[
        AlertRuleConfig(name="wafer-yield", kind="wafer_yield", priority="P0", threshold=0.8,
                        min_parts=4),
    ])

    def __init__(self, data_dir: Path, max_lots: int = 8, max_wafers_per_lot: int = 25
                 ) -> None:
        self.published: list[tuple[str, dict[str, Any]]] = []
        self.alerts = AlertService(self.RULES, self.publish, data_dir / "history.sqlite3")
        self.state = LiveState(self.publish, alerts=self.alerts.engine,
                               on_evict=self.alerts.archive_lot,
                               on_wafer_archive=self.alerts.archive_wafer, max_lots=max_lots,
                               max_wafers_per_lot=max_wafers_per_lot)
        self.http = HttpServer()
        HistoryApi(self.state, self.alerts.engine, self.alerts.store,
                   held=self.alerts).install(self.http)
        self.port = 0
        self.cancel = trio.CancelScope()

    def publish(self, topic: str, delta: dict[str, Any]) -> None:
        self.published.append((topic, delta))

    async def start(self, nursery: trio.Nursery) -> int:
        restored = await self.alerts.open()

        async def serve(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
            with self.cancel:
                async with trio.open_nursery() as inner:
                    await inner.start(self.alerts.run, self.state)
                    listeners = await inner.start(
                        functools.partial(self.http.serve, "127.0.0.1", 0))
                    self.port = listeners[0].socket.getsockname()[1]
                    task_status.started()

        await nursery.start(serve)
        return restored

    async def settle(self) -> None:
        """Wait until the alert service has written what is queued."""
        with trio.fail_after(5):
            await self.alerts.wait_persisted()
        assert self.alerts.backlog == 0

    def stop(self) -> None:
        self.cancel.cancel()


async def test_alerts_and_acks_survive_a_restart_over_http(tmp_path: Path) -> None:
    frames = [("ate-1", 1, lot_records("L1", "L1-W1", 8, good_every=4))]
    async with trio.open_nursery() as nursery:
        hub = Hub(tmp_path)
        assert await hub.start(nursery) == 0
        for gw, rid, recs in frames:
            hub.state.on_records(gw, rid, recs, now=1000.0)
        await hub.settle()

        status, body = await get(hub.port, "/api/alerts?unacknowledged=1")
        assert status == 200
        (alert,) = body["alerts"]
        assert alert["rule"] == "wafer-yield" and alert["value"] == 0.25

        status, body = await request(hub.port, "POST", f"/api/alerts/{alert['id']}/ack",
                                     {"user": "dana"})
        assert status == 200 and body["alert"]["acked_by"] == "dana"
        await hub.settle()
        # broadcast to every client through the live topic
        assert any(t == "alert/P0/wafer-yield" and d["event"] == "acknowledged"
                   for t, d in hub.published)
        assert (await request(hub.port, "POST", "/api/alerts/nope/ack", {"user": "x"}))[0] == 404
        assert (await request(hub.port, "POST", f"/api/alerts/{alert['id']}/ack", {}))[0] == 400
        assert (await get(hub.port, "/api/alerts?priority=P9"))[0] == 400
        hub.stop()

    # restart: restore alerts, then replay the same frames (as the hub does)
    async with trio.open_nursery() as nursery:
        hub2 = Hub(tmp_path)
        assert await hub2.start(nursery) == 1
        for gw, rid, recs in frames:
            hub2.state.on_records(gw, rid, recs, now=5000.0)
        assert not [d for t, d in hub2.published if t.startswith("alert/")]
        status, body = await get(hub2.port, "/api/alerts")
        assert [(a["id"], a["acknowledged"], a["acked_by"]) for a in body["alerts"]] == [
            (alert["id"], True, "dana")]
        assert (await get(hub2.port, "/api/alerts?unacknowledged=1"))[1] == {"alerts": []}
        status, body = await get(hub2.port, "/api/lots/L1/wafers/L1-W1")
        assert status == 200 and body["die_count"] == 8 and body["good"] == 2
        hub2.stop()


async def _raise_one(hub: Hub) -> str:
    """Raises the wafer-yield alert, stored; returns its id."""
    hub.state.on_records("ate-1", 1, lot_records("L1", "L1-W1", 8, good_every=4), now=1000.0)
    await hub.settle()
    (alert_id,) = hub.alerts.engine.alerts
    return alert_id


async def _restarted(data_dir: Path) -> list[tuple[str, bool, str | None]]:
    """The alerts a hub restarted on ``data_dir`` answers: (id, acknowledged, by)."""
    async with trio.open_nursery() as nursery:
        hub = Hub(data_dir)
        await hub.start(nursery)
        _, body = await get(hub.port, "/api/alerts")
        hub.stop()
    return [(a["id"], a["acknowledged"], a["acked_by"]) for a in body["alerts"]]


async def test_an_ack_made_while_the_history_store_cannot_be_written_survives_a_restart(
        store_fault: StoreFault) -> None:  # noqa: F811 (the fixture imported)
    """An acknowledgement over the API while ``history.sqlite3`` takes no writes (another
    process holds its write lock; as root, a full file system) is answered as usual, its
    alert's state held in memory (``edgegw_hub_alerts_unwritten_pending``) and written at
    the first try the store takes again (docs/alerts.md, "Persistence and restarts"), so it
    is there after a restart.  Before, the failed write was logged and the acknowledgement
    lived in memory only: the restarted hub showed the alert unacknowledged."""
    data_dir = store_fault.path.parent
    async with trio.open_nursery() as nursery:
        hub = Hub(data_dir)
        await hub.start(nursery)
        alert_id = await _raise_one(hub)
        store_fault.block()
        status, body = await request(hub.port, "POST", f"/api/alerts/{alert_id}/ack",
                                     {"user": "dana"})
        assert status == 200 and body["alert"]["acked_by"] == "dana"
        with trio.fail_after(15):  # (a locked store: the write fails after LOCK_WAIT_S)
            await hub.alerts.wait_persisted()
        errors = hub.alerts.metrics.counter("hub_history_store_errors_total")
        assert errors.total() == 1
        pending = hub.alerts.metrics.gauge("hub_alerts_unwritten_pending")
        assert pending.get() == 1
        # the hub's /healthz says why (test_a_hub_names_its_history_store_on_healthz)
        problem = hub.alerts.health_problem()
        assert problem is not None
        assert problem.startswith(f"hub.data_dir: '{store_fault.path}' cannot be written ("), \
            problem
        assert "1 alert state(s), 0 lot/wafer archive(s) and 0 webhook outbox row(s)" in problem
        store_fault.unblock()
        with trio.fail_after(30):  # tried again after 1 s, then 2, 4 ... (each up to LOCK_WAIT_S)
            while pending.get():
                await trio.sleep(0.05)
        assert hub.alerts.health_problem() is None
        hub.stop()
    assert await _restarted(data_dir) == [(alert_id, True, "dana")]


@pytest.mark.usefixtures("short_lock_wait")
async def test_a_hub_names_its_history_store_on_healthz_while_writes_to_it_wait(
        tmp_path: Path) -> None:
    """The whole hub: while an alert state waits in memory because ``history.sqlite3``
    takes no writes (another process holds its write lock), /healthz is "degraded" and
    names the file and what waits -- lost if the hub stopped now; "ok" once written."""
    async with sectools.running(sectools.hub_config(tmp_path)) as app:
        fault = StoreFault("locked", tmp_path / "hub")
        fault.block()
        try:
            sectools.feed_lot(app, "L1")
            with trio.fail_after(15):  # (a locked store: the write fails after LOCK_WAIT_S)
                while not app.alerts.health_problem():
                    await trio.sleep(0.05)
            health = (await sectools.http(app.ingest.port, "GET", "/healthz")).json()
            assert health["status"] == "degraded"
            assert health["detail"].startswith(
                f"hub.data_dir: '{fault.path}' cannot be written (database is locked): 1 alert "
                "state(s)"), health
        finally:
            fault.unblock()
        with trio.fail_after(30):  # tried again after 1 s, then 2, 4 ... (each up to LOCK_WAIT_S)
            while (await sectools.http(app.ingest.port, "GET", "/healthz")).json()[
                    "status"] != "ok":
                await trio.sleep(0.1)


async def test_each_failed_retry_of_a_held_alert_state_counts_as_a_history_store_error(
        store_fault: StoreFault) -> None:  # noqa: F811 (the fixture imported)
    """``edgegw_hub_history_store_errors_total`` counts every write the store refused: the
    tries again of an alert state held in memory too, so an operator sees the store is
    still failing (docs/alerts.md).  Before, only the first failed write counted: a store
    that stayed unwritable looked like one failure."""
    data_dir = store_fault.path.parent
    async with trio.open_nursery() as nursery:
        hub = Hub(data_dir)
        await hub.start(nursery)
        alert_id = await _raise_one(hub)
        store_fault.block()
        status, _ = await request(hub.port, "POST", f"/api/alerts/{alert_id}/ack",
                                  {"user": "dana"})
        assert status == 200
        with trio.fail_after(15):
            await hub.alerts.wait_persisted()
        errors = hub.alerts.metrics.counter("hub_history_store_errors_total")
        assert errors.total() == 1
        with trio.fail_after(30):  # tried again after 1 s (the try up to LOCK_WAIT_S), and fails
            while errors.total() < 2:
                await trio.sleep(0.05)
        assert hub.alerts.metrics.gauge("hub_alerts_unwritten_pending").get() == 1
        store_fault.unblock()
        hub.stop()


async def test_a_hub_stops_promptly_with_its_history_store_locked_and_names_what_it_lost(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Another process holds ``history.sqlite3``'s write lock while an acknowledgement is
    being written and the hub is told to stop.  The stop takes about as long as with the
    store free (here: under 2.5 s more; the write gives up its lock wait
    ``STOP_LOCK_WAIT_S`` after the stop began), and the one thing it could not write is
    logged as an error with the alert's id and who acknowledged it.  Before, the stop
    waited out SQLite's 5 s lock wait in the worker thread no cancel reaches."""

    async def timed_stop(hub: Hub, done: trio.Event) -> float:
        t0 = time.monotonic()
        hub.stop()
        await done.wait()
        return time.monotonic() - t0

    async def run(hub: Hub, done: trio.Event, task_status: trio.TaskStatus[None]) -> None:
        async with trio.open_nursery() as nursery:
            await hub.start(nursery)
            task_status.started()
        done.set()

    async with trio.open_nursery() as nursery:
        hub, done = Hub(tmp_path), trio.Event()
        await nursery.start(run, hub, done)
        alert_id = await _raise_one(hub)
        free_stop = await timed_stop(hub, done)

        fault = StoreFault("locked", tmp_path)
        hub, done = Hub(tmp_path), trio.Event()
        await nursery.start(run, hub, done)
        fault.block()
        try:
            status, _ = await request(hub.port, "POST", f"/api/alerts/{alert_id}/ack",
                                      {"user": "dana"})
            assert status == 200
            await trio.sleep(0.2)  # its write waits on the lock
            assert hub.alerts.backlog == 1
            with caplog.at_level(logging.ERROR, logger="edgegw.hub.alerts"):
                locked_stop = await timed_stop(hub, done)
        finally:
            fault.unblock()
    assert locked_stop < free_stop + 2.5, (locked_stop, free_stop)
    lost = [r.getMessage() for r in caplog.records if "not written" in r.getMessage()]
    assert any(alert_id in m and "acknowledged by dana" in m for m in lost), lost
    assert await _restarted(tmp_path) == [(alert_id, False, None)]  # as it was stored


async def _evict_old_lot(hub: Hub) -> None:
    """Lot OLD (6 parts, one wafer) is evicted by lot NEW (the hub keeps one lot) and its
    archive handed to the alert service, which has tried to write it."""
    hub.state.on_records("gw", 1, lot_records("OLD", "OLD-1", 6, ts=100.0), now=1.0)
    hub.state.on_records("gw", 100, lot_records("NEW", "NEW-1", 4, ts=900.0), now=2.0)
    assert list(hub.state.lots) == ["NEW"]
    with trio.fail_after(15):  # (a locked store: the write fails after LOCK_WAIT_S)
        await hub.alerts.wait_persisted()


async def _old_lot_is_served(port: int) -> None:
    status, body = await get(port, "/api/lots/OLD/wafers/OLD-1")
    assert status == 200 and len(body["dies"]) == 6 and body["hard_bins"] == {"1": 3, "4": 3}
    status, body = await get(port, "/api/lots")
    assert ("OLD", False, 6) in [(r["lot_id"], r["live"], r["die_count"])
                                 for r in body["lots"]]


async def _old_lots_archive_held(hub: Hub, fault: StoreFault) -> Any:
    """The store made to refuse writes, lot OLD evicted: its archive held (the gauge)."""
    fault.block()
    await _evict_old_lot(hub)
    pending = hub.alerts.metrics.gauge("hub_archives_unwritten_pending")
    assert pending.get() == 1
    return pending


async def test_an_archive_evicted_while_the_history_store_cannot_be_written_is_written_later(
        store_fault: StoreFault) -> None:  # noqa: F811 (the fixture imported)
    """A lot evicted from memory while ``history.sqlite3`` takes no writes (another process
    holds its write lock; as root, a full file system): its archive is held in memory
    (``edgegw_hub_archives_unwritten_pending``) and written at the first try the store
    takes again, so the history API answers for the lot, after a restart too
    (docs/alerts.md, "Persistence and restarts").  Every failed write counts in
    ``edgegw_hub_history_store_errors_total``, the retries too.  Before, the failed write
    was logged and the archive lost: the history API had no figures for the lot."""
    data_dir = store_fault.path.parent
    async with trio.open_nursery() as nursery:
        hub = Hub(data_dir, max_lots=1)
        await hub.start(nursery)
        pending = await _old_lots_archive_held(hub, store_fault)
        errors = hub.alerts.metrics.counter("hub_history_store_errors_total")
        assert errors.total() >= 1
        store_fault.unblock()
        with trio.fail_after(30):  # tried again after 1 s, then 2, 4 ... (each up to LOCK_WAIT_S)
            while pending.get():
                await trio.sleep(0.05)
        await _old_lot_is_served(hub.port)
        assert hub.alerts.metrics.counter("hub_archives_dropped_total").total() == 0
        hub.stop()
    async with trio.open_nursery() as nursery:
        hub = Hub(data_dir, max_lots=1)
        await hub.start(nursery)
        await _old_lot_is_served(hub.port)
        hub.stop()


@pytest.mark.usefixtures("short_lock_wait")
async def test_an_archive_held_in_memory_is_written_at_a_clean_stop(tmp_path: Path) -> None:
    """The store takes writes again just as the hub is told to stop: the archive held is
    written then at the latest (the stop's last try), and a restarted hub serves it."""
    fault = StoreFault("locked", tmp_path)
    try:
        async with trio.open_nursery() as nursery:
            hub = Hub(tmp_path, max_lots=1)
            await hub.start(nursery)
            await _old_lots_archive_held(hub, fault)
            fault.unblock()
            hub.stop()
    finally:
        fault.unblock()
    async with trio.open_nursery() as nursery:
        hub = Hub(tmp_path, max_lots=1)
        await hub.start(nursery)
        await _old_lot_is_served(hub.port)
        hub.stop()


async def test_the_history_api_answers_for_a_lot_whose_archive_is_only_held_in_memory(
        store_fault: StoreFault) -> None:  # noqa: F811 (the fixture imported)
    """A lot evicted while ``history.sqlite3`` takes no writes: its archive held in memory
    is what the history API answers from -- the lot listed, its wafers, a wafer's map, a
    test -- the lot's row and its wafer list marked ``"archive_pending": true`` until the
    store has it; then the same figures, unmarked.  Before, the lot was neither live nor
    archived: 404 and absent from the list until the store took the archive."""
    data_dir = store_fault.path.parent
    async with trio.open_nursery() as nursery:
        hub = Hub(data_dir, max_lots=1)
        await hub.start(nursery)
        pending = await _old_lots_archive_held(hub, store_fault)
        await _old_lot_is_served(hub.port)
        status, body = await get(hub.port, "/api/lots")
        (row,) = [r for r in body["lots"] if r["lot_id"] == "OLD"]
        assert row["archive_pending"] is True and row["good"] == 3, row
        assert "archive_pending" not in next(r for r in body["lots"] if r["lot_id"] == "NEW")
        status, listed = await get(hub.port, "/api/lots/OLD/wafers")
        assert status == 200 and listed["archive_pending"] is True and listed["live"] is False
        assert [w["wafer_id"] for w in listed["wafers"]] == ["OLD-1"]
        status, stats = await get(hub.port, "/api/tests/OLD/300")
        assert status == 200 and stats["count"] == 6 and stats["archive_pending"] is True
        status, wafer_map = await get(hub.port, "/api/lots/OLD/wafers/OLD-1")
        assert status == 200 and wafer_map["archive_pending"] is True and wafer_map["dies"]
        store_fault.unblock()
        with trio.fail_after(30):
            while pending.get():
                await trio.sleep(0.05)
        await _old_lot_is_served(hub.port)
        status, body = await get(hub.port, "/api/lots")
        (stored,) = [r for r in body["lots"] if r["lot_id"] == "OLD"]
        assert stored == {k: v for k, v in row.items() if k != "archive_pending"}
        status, after = await get(hub.port, "/api/lots/OLD/wafers")
        assert "archive_pending" not in after
        assert after == {k: v for k, v in listed.items() if k != "archive_pending"}
        assert (await get(hub.port, "/api/tests/OLD/300"))[1] == {
            k: v for k, v in stats.items() if k != "archive_pending"}
        assert (await get(hub.port, "/api/lots/OLD/wafers/OLD-1"))[1] == {
            k: v for k, v in wafer_map.items() if k != "archive_pending"}
        hub.stop()


def _lot_archive(lot_id: str, parts: int) -> dict[str, Any]:
    """The smallest lot archive the store takes (``state.lot_archive`` shape)."""
    lot = {"lot_id": lot_id, "parts": parts, "die_count": parts, "updated": float(parts)}
    return {"lot": lot, "wafers": {}, "tests": {}}


@pytest.mark.usefixtures("short_lock_wait")
async def test_archives_held_in_memory_are_bounded_the_fullest_of_a_lot_kept(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """While the store takes no writes, a lot archived twice is held once, the fuller
    figures of the two (as the store keeps them: ``hub_archives_kept_total``), and beyond
    ``MAX_HELD_ARCHIVES`` the oldest held is dropped: counted in
    ``edgegw_hub_archives_dropped_total``, logged as an error with its lot."""
    fault = StoreFault("locked", tmp_path)
    service = AlertService(AlertsConfig(), lambda t, d: None, fault.path)
    await service.open()
    caplog.set_level(logging.ERROR, logger="edgegw.hub.alerts")
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(service.run)
            fault.block()
            service.archive_lot("A", _lot_archive("A", 7))
            service.archive_lot("B", _lot_archive("B", 5))
            service.archive_lot("B", _lot_archive("B", 3))  # a partial rebuild: less full
            service.archive_lot("A", _lot_archive("A", 9))  # fuller: replaces A's
            for i in range(MAX_HELD_ARCHIVES - 1):  # one more than fit: A, the oldest, goes
                service.archive_lot(f"X{i}", _lot_archive(f"X{i}", 1))
            with trio.fail_after(15):
                await service.wait_persisted()
            metrics = service.metrics
            assert metrics.gauge("hub_archives_unwritten_pending").get() == MAX_HELD_ARCHIVES
            assert metrics.counter("hub_archives_dropped_total").total() == 1
            assert metrics.counter("hub_archives_kept_total").total() == 1
            fault.unblock()
            with trio.fail_after(30):
                while metrics.gauge("hub_archives_unwritten_pending").get():
                    await trio.sleep(0.05)
            nursery.cancel_scope.cancel()
    finally:
        fault.unblock()
    store = HistoryStore(fault.path)
    await store.open()
    try:
        assert await store.lot("A") is None
        b = await store.lot("B")
        assert b is not None and b["lot"]["parts"] == 5
        assert len(await store.lot_summaries(limit=2 * MAX_HELD_ARCHIVES)) == MAX_HELD_ARCHIVES
    finally:
        await store.close()
    dropped = [r.getMessage() for r in caplog.records if "dropped from memory" in r.getMessage()]
    assert len(dropped) == 1 and "lot A:" in dropped[0], dropped


async def archived_and_live(nursery: trio.Nursery, tmp: Path, old: tuple[str, str, int],
                            new: tuple[str, str, int]) -> Hub:
    """A hub (``max_lots`` 1) with lot ``new`` (lot, wafer, dies) live and ``old`` archived:
    evicted from memory by ``new``."""
    hub = Hub(tmp, max_lots=1)
    await hub.start(nursery)
    hub.state.on_records("gw", 1, lot_records(*old, ts=100.0), now=1.0)
    hub.state.on_records("gw", 100, lot_records(*new, ts=900.0), now=2.0)
    await hub.settle()
    assert list(hub.state.lots) == [new[0]]
    return hub


async def test_evicted_lots_are_served_from_the_archive(tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        hub = await archived_and_live(nursery, tmp_path, ("OLD", "OLD-1", 6), ("NEW", "NEW-1", 4))

        status, body = await get(hub.port, "/api/lots")
        assert status == 200
        assert [(r["lot_id"], r["live"], r["die_count"]) for r in body["lots"]] == [
            ("NEW", True, 4), ("OLD", False, 6)]
        status, body = await get(hub.port, "/api/lots/OLD/wafers")
        assert status == 200 and body["live"] is False
        assert [w["wafer_id"] for w in body["wafers"]] == ["OLD-1"]
        status, body = await get(hub.port, "/api/lots/OLD/wafers/OLD-1")
        assert status == 200 and len(body["dies"]) == 6 and body["hard_bins"] == {"1": 3, "4": 3}
        status, body = await get(hub.port, "/api/tests/OLD/300")
        assert status == 200 and body["count"] == 6
        assert (await get(hub.port, "/api/lots/NONE/wafers"))[0] == 404
        assert (await get(hub.port, "/api/lots/OLD/bogus/route/x"))[0] == 404
        hub.stop()


async def test_ids_holding_a_slash_or_a_percent_are_addressed_percent_encoded(
        tmp_path: Path) -> None:
    """docs/api.md: ids in a path are URL-encoded, each segment decoded on its own -- so a
    lot or wafer id holding "/" (``%2F``) is one id, not two segments.  Before, the path
    was decoded whole and such a lot, live or archived, was a 404 "no such API route"
    (the dashboard's wafer list and die values of it too)."""
    async with trio.open_nursery() as nursery:
        hub = await archived_and_live(nursery, tmp_path, ("OLD/1", "OLD/1-W/1", 6),
                                      ("A/B 50%", "W/1", 4))
        for lot, wafer, dies in (("A%2FB%2050%25", "W%2F1", 4), ("OLD%2F1", "OLD%2F1-W%2F1", 6)):
            status, body = await get(hub.port, f"/api/lots/{lot}/wafers")
            assert status == 200, body
            assert [w["wafer_id"] for w in body["wafers"]] == [urllib.parse.unquote(wafer)]
            status, body = await get(hub.port, f"/api/lots/{lot}/wafers/{wafer}")
            assert status == 200 and len(body["dies"]) == dies, body
            status, body = await get(hub.port, f"/api/tests/{lot}/300")
            assert status == 200 and body["count"] == dies, body
        # "/" itself still separates: an id is never found across segments
        assert (await get(hub.port, "/api/lots/A/B%2050%25/wafers"))[0] == 404
        hub.stop()


def archive_of(lot: str, parts: int = 5, updated: float = 1.0) -> dict[str, Any]:
    return {"lot": {"lot_id": lot, "parts": parts, "updated": updated}, "wafers": {},
            "tests": {}}


async def test_archives_are_pruned_by_when_they_were_written_not_by_their_record_times(
        tmp_path: Path) -> None:
    """``hub.retain_history_days``: an archive goes once it was last written before the cut;
    one written again (a fuller archive) is dated afresh; the tester's clock in it
    (``updated``, 1970 here) does not count; one read back before is not served after."""
    store = HistoryStore(tmp_path / "history.sqlite3")
    await store.open()
    try:
        await store.save([], [("OLD", archive_of("OLD")), ("REDONE", archive_of("REDONE")),
                              ("FRESH", archive_of("FRESH"))],
                         [("OLD", "OLD-W1", {"wafer_id": "OLD-W1", "parts": 5})])
        assert await store.lot("OLD") is not None  # (now in the read cache)
        with sqlite3.connect(tmp_path / "history.sqlite3") as db:
            for table in ("lots", "wafers"):
                db.execute(f"UPDATE {table} SET archived_at = archived_at - 3 * 86400"
                           " WHERE lot_id <> 'FRESH'")
        await store.save([], [("REDONE", archive_of("REDONE", parts=9))])
        assert await store.prune(time.time() - 2 * 86400, batch=1) == 2  # OLD and its wafer
        assert await store.lot("OLD") is None and await store.wafer("OLD", "OLD-W1") is None
        assert (await store.lot("REDONE") or {})["lot"]["parts"] == 9
        assert await store.lot("FRESH") is not None
        assert await store.prune(time.time() - 2 * 86400) == 0
    finally:
        await store.close()


def alert_of(alert_id: str, acknowledged: bool = False) -> dict[str, Any]:
    return {"id": alert_id, "priority": "P1", "rule": "y", "raised_at": 1.0,
            "acknowledged": acknowledged}


async def test_alerts_are_pruned_by_their_last_write_not_by_their_record_times(
        tmp_path: Path) -> None:
    """``hub.retain_history_days`` deletes alerts last written before the cut; one written
    again (acknowledged) is dated afresh; the record time it was raised at (1970 here) does
    not count."""
    store = HistoryStore(tmp_path / "history.sqlite3")
    await store.open()
    try:
        await store.save([alert_of("old"), alert_of("acked"), alert_of("fresh")], [])
        with sqlite3.connect(tmp_path / "history.sqlite3") as db:
            db.execute("UPDATE alerts SET written_at = written_at - 3 * 86400"
                       " WHERE id <> 'fresh'")
        await store.save([alert_of("acked", acknowledged=True)], [])
        assert await store.prune_alerts(time.time() - 2 * 86400, batch=1) == 1
        assert sorted(a["id"] for a in await store.alerts()) == ["acked", "fresh"]
        assert await store.prune_alerts(time.time() - 2 * 86400) == 0
        assert await store.prune(time.time() - 2 * 86400) == 0  # archives: none
    finally:
        await store.close()


@pytest.mark.parametrize("table", ["lots", "alerts"])
async def test_a_history_store_from_before_dates_its_rows_by_its_first_start(
        tmp_path: Path, table: str) -> None:
    """Rows written before their date column existed (``archived_at``, ``written_at``) are
    kept a whole retention period from the start that adds it, not deleted at the first
    prune."""
    path = tmp_path / "history.sqlite3"
    with sqlite3.connect(path) as db:  # the table as an older hub made it
        if table == "lots":
            db.execute("CREATE TABLE lots (lot_id TEXT PRIMARY KEY, updated REAL NOT NULL,"
                       " summary TEXT NOT NULL, archive TEXT NOT NULL,"
                       " parts INTEGER NOT NULL DEFAULT 0)")
            db.execute("INSERT INTO lots VALUES ('L0', 1.0, ?, ?, 5)",
                       (json.dumps(archive_of("L0")["lot"]), json.dumps(archive_of("L0"))))
        else:
            db.execute("CREATE TABLE alerts (id TEXT PRIMARY KEY, priority TEXT NOT NULL,"
                       " rule TEXT NOT NULL, raised_at REAL NOT NULL,"
                       " acknowledged INTEGER NOT NULL, data TEXT NOT NULL)")
            db.execute("INSERT INTO alerts VALUES ('a0', 'P1', 'y', 1.0, 0, ?)",
                       (json.dumps(alert_of("a0")),))

    async def served(store: HistoryStore) -> None:
        if table == "lots":
            assert await store.lot("L0") is not None
        else:
            assert [a["id"] for a in await store.alerts()] == ["a0"]
    await assert_dated_by_this_start(path, table, served)


async def assert_dated_by_this_start(path: Path, table: str,
                                     kept: Callable[[HistoryStore], Awaitable[None]]) -> None:
    """The store at ``path`` opened now: its one row of ``table`` outlives a prune of what
    was written before this start (``kept`` checks it then), and goes with a prune past
    now."""
    opened = time.time()
    store = HistoryStore(path)
    await store.open()
    prune = store.prune_alerts if table == "alerts" else store.prune
    try:
        assert await prune(opened - 1) == 0
        await kept(store)
        assert await prune(time.time() + 1) == 1
    finally:
        await store.close()


#: rows as a hub from before the date columns writes them -- its own statements, naming
#: only its columns -- into a file this hub made (the hub downgraded, then upgraded again)
OLDER_HUB_WRITES = {
    "alerts": ("INSERT OR REPLACE INTO alerts (id, priority, rule, raised_at, acknowledged,"
               " data) VALUES ('a0', 'P1', 'y', 1.0, 0, ?)", json.dumps(alert_of("a0"))),
    "lots": ("INSERT INTO lots (lot_id, updated, summary, archive, parts)"
             " VALUES ('L0', 1.0, '{}', ?, 5)", json.dumps(archive_of("L0"))),
    "wafers": ("INSERT INTO wafers (lot_id, wafer_id, updated, summary, snapshot, parts)"
               " VALUES ('L0', 'W1', 1.0, '{}', ?, 5)", json.dumps({"wafer_id": "W1"})),
}


@pytest.mark.parametrize("table", list(OLDER_HUB_WRITES))
async def test_rows_an_older_hub_wrote_after_a_downgrade_are_kept_a_whole_period(
        tmp_path: Path, table: str) -> None:
    """An older hub names its columns and leaves the date at its default (0); when this
    hub runs again its first prune dates such rows by its clock, as rows from before the
    column are dated by the start adding it -- not deleted as written in 1970.  (At the
    prune, not the open: a store another process holds locked must still open,
    tests/test_webhooks.py.)"""
    path = tmp_path / "history.sqlite3"
    store = HistoryStore(path)
    await store.open()  # the tables as this hub makes them
    await store.close()
    sql, value = OLDER_HUB_WRITES[table]
    with sqlite3.connect(path) as db:
        db.execute(sql, (value,))
    opened = time.time()

    async def dated_by_the_start(store: HistoryStore) -> None:
        with sqlite3.connect(path) as db:
            column = "written_at" if table == "alerts" else "archived_at"
            (dated,), = db.execute(f"SELECT {column} FROM {table}").fetchall()
        assert opened <= dated <= time.time()
    await assert_dated_by_this_start(path, table, dated_by_the_start)


async def test_a_hub_with_retain_history_days_deletes_old_archives_on_its_own(
        tmp_path: Path) -> None:
    """The real hub's pruner deletes archives and alerts past ``hub.retain_history_days``
    (here under a second, frames under that): the history API no longer has the lot, the
    store not the alert, the counts say so."""
    app = HubService(hub_config(tmp_path, retain_history_days=1e-5, retain_frames_hours=2e-4,
                             prune_interval_s=0.1))
    async with trio.open_nursery() as nursery:
        port = await nursery.start(app.run)
        assert await app.alerts.store.save([alert_of("a0")],
                                           [("OLD", archive_of("OLD"))]) == 0  # written
        with trio.fail_after(20):
            while (await http_get(port, "/api/lots/OLD/wafers"))[0] != 404 \
                    or await app.alerts.store.alerts():
                await trio.sleep(0.1)
        _, stats = await http_get(port, "/api/stats")
        assert stats["metrics"]["hub_archives_pruned_total"] >= 1
        assert stats["metrics"]["hub_alerts_pruned_total"] >= 1
        nursery.cancel_scope.cancel()


def test_retain_history_days_must_cover_the_frames_it_was_made_from(tmp_path: Path) -> None:
    assert hub_config(tmp_path, retain_history_days=7).hub.retain_history_days == 7
    for frames in (0, 24 * 8):  # frames kept for good, or longer than the archives
        with pytest.raises(ConfigError, match="retain_history_days: 7 days must cover"):
            hub_config(tmp_path, retain_history_days=7, retain_frames_hours=frames)


async def test_every_lot_of_a_long_run_is_listed_page_by_page(tmp_path: Path) -> None:
    """A hub that ran for months holds more archived lots than a page: ``limit`` (up to
    1000) is honoured past the store's old 500 cap, and the ``next_before`` /
    ``next_before_lot`` cursor pages back through every lot, live and archived, each once,
    newest first -- lots updated at the same time (three at a time here) included, however
    a page boundary falls among them."""
    async with trio.open_nursery() as nursery:
        hub = Hub(tmp_path, max_lots=2)
        await hub.start(nursery)
        archived = [(f"L{i:04d}", {"lot": {"lot_id": f"L{i:04d}", "parts": 1,
                                           "updated": 1000.0 + i // 3}, "wafers": {},
                                   "tests": {}})
                    for i in range(1200)]
        await hub.alerts.store.save([], archived)
        hub.state.on_records("gw", 1, lot_records("LIVE", "LIVE-1", 3, ts=5000.0), now=1.0)
        hub.state.on_records("gw", 10, lot_records("LIVE2", "LIVE2-1", 3, ts=1200.5), now=2.0)

        status, body = await get(hub.port, "/api/lots?limit=1000")
        assert status == 200 and len(body["lots"]) == 1000
        assert body["lots"][0]["lot_id"] == "LIVE" and body["lots"][0]["live"] is True

        seen: list[tuple[str, float]] = []
        query = "/api/lots?limit=170"
        while True:
            status, body = await get(hub.port, query)
            assert status == 200 and len(body["lots"]) <= 170
            seen += [(r["updated"], r["lot_id"]) for r in body["lots"]]
            if "next_before" not in body:
                break
            assert len(body["lots"]) == 170
            assert (body["next_before"], body["next_before_lot"]) == seen[-1]
            query = (f"/api/lots?limit=170&before={body['next_before']!r}"
                     f"&before_lot={body['next_before_lot']}")
        assert sorted(lot for _, lot in seen) == sorted(
            [*(a[0] for a in archived), "LIVE", "LIVE2"])  # every lot, each once
        assert seen == sorted(seen, reverse=True)
        live2 = [lot for _, lot in seen].index("LIVE2")
        assert 500 < live2 < 700 and seen[live2 - 1][1].startswith("L0")  # among the archived
        # a boundary inside a tie: the page after it starts with the rest of the tie
        status, body = await get(hub.port, "/api/lots?limit=1&before=1001.0&before_lot=L0004")
        assert [r["lot_id"] for r in body["lots"]] == ["L0003"]
        status, body = await get(hub.port, "/api/lots?limit=5&before=1001.0")
        assert [r["lot_id"] for r in body["lots"]] == ["L0002", "L0001", "L0000"]
        assert "next_before" not in body

        for bad in ("limit=x", "before=soon", "before=nan", "before_lot=L0001"):
            status, body = await get(hub.port, f"/api/lots?{bad}")
            assert status == 400 and "before" in body["error"], (bad, body)
        hub.stop()


async def test_a_partial_rebuild_after_a_restart_never_overwrites_a_fuller_archive(
        tmp_path: Path) -> None:
    """After a restart the frames of an old lot may be partly pruned: replaying what is
    left rebuilds the lot with fewer parts and evicts it again.  The archive keeps the
    fuller figures (and says so in a counter)."""
    async with trio.open_nursery() as nursery:
        hub = Hub(tmp_path, max_lots=1)
        await hub.start(nursery)
        hub.state.on_records("gw", 1, lot_records("OLD", "OLD-1", 6, ts=100.0), now=1.0)
        hub.state.on_records("gw", 100, lot_records("NEW", "NEW-1", 4, ts=900.0), now=2.0)
        await hub.settle()
        hub.stop()
    async with trio.open_nursery() as nursery:
        hub2 = Hub(tmp_path, max_lots=1)
        await hub2.start(nursery)
        # only the newest frames were left: one part of OLD, then NEW
        hub2.state.on_records("gw", 50, lot_records("OLD", "OLD-1", 1, ts=150.0), now=3.0)
        hub2.state.on_records("gw", 100, lot_records("NEW", "NEW-1", 4, ts=900.0), now=4.0)
        await hub2.settle()
        assert hub2.alerts.metrics.counter("hub_archives_kept_total").total() == 1
        status, body = await get(hub2.port, "/api/lots/OLD/wafers/OLD-1")
        assert status == 200 and len(body["dies"]) == 6
        status, body = await get(hub2.port, "/api/lots")
        assert [(r["lot_id"], r["die_count"]) for r in body["lots"]] == [("NEW", 4), ("OLD", 6)]
        status, body = await get(hub2.port, "/api/tests/OLD/300")
        assert status == 200 and body["count"] == 6
        hub2.stop()


async def test_archives_read_back_are_cached_boundedly_and_a_newer_archive_is_seen(
        tmp_path: Path) -> None:
    store = HistoryStore(tmp_path / "history.sqlite3")
    await store.open()
    try:
        def archive(lot_id: str, parts: int) -> dict[str, Any]:
            return {"lot": {"lot_id": lot_id, "parts": parts, "updated": 1.0},
                    "wafers": {}, "tests": {}}

        await store.save([], [(f"L{i}", archive(f"L{i}", 1)) for i in range(200)])
        for i in range(200):
            assert (await store.lot(f"L{i}"))["lot"]["lot_id"] == f"L{i}"
        assert len(store._cache) == CACHE_ENTRIES
        assert (await store.lot("L199"))["lot"]["parts"] == 1
        assert await store.save([], [("L199", archive("L199", 5))]) == 0
        assert (await store.lot("L199"))["lot"]["parts"] == 5
        assert await store.save([], [("L199", archive("L199", 2))]) == 1  # kept: fuller
        assert (await store.lot("L199"))["lot"]["parts"] == 5
    finally:
        await store.close()


def two_passes(again: bool = False) -> list[list[Any]]:
    """Lot OLD (wafers W1: six dies, three failing; W2: two good dies), pushed out of
    memory by NEW; days later W1's three failing dies are tested again under OLD's lot id
    and pass; NEW2 pushes OLD out again.  Frames, one per list.  ``again``: W1 is tested
    again (one die, failing again) at the end of the first pass too, after W2."""
    from edgegw.records import LotEnd, LotStart, PartResult, WaferEnd, WaferStart

    def die(x: int, hb: int, ts: float, wafer: str = "W1", lot: str = "OLD") -> PartResult:
        return PartResult("t", ts, lot, wafer, 1, x % 2, str(x), x, 0, hb, hb, hb == 1)

    later = 1_000.0 + 3 * 86_400
    first = [LotStart("t", 1_000.0, "OLD", "PT", "n", "T", "j", 1_000),
             WaferStart("t", 1_000.0, "OLD", "W1", 1, 1_000),
             *(die(x, 1 if x % 2 == 0 else 4, 1_000.0) for x in range(6)),
             WaferEnd("t", 1_000.0, "OLD", "W1", 1, 1_050, 6, 3),
             WaferStart("t", 1_000.0, "OLD", "W2", 1, 1_060),
             die(0, 1, 1_000.0, "W2"), die(1, 1, 1_000.0, "W2"),
             WaferEnd("t", 1_000.0, "OLD", "W2", 1, 1_070, 2, 2),
             *([WaferStart("t", 1_000.0, "OLD", "W1", 1, 1_080), die(1, 4, 1_000.0),
                WaferEnd("t", 1_000.0, "OLD", "W1", 1, 1_090, 1, 0)] if again else []),
             LotEnd("t", 1_000.0, "OLD", 1_100)]
    retest = [LotStart("t", later, "OLD", "PT", "n", "T", "j", int(later)),
              WaferStart("t", later, "OLD", "W1", 1, int(later)),
              *(die(x, 1, later) for x in (1, 3, 5)),
              WaferEnd("t", later, "OLD", "W1", 1, int(later) + 50, 3, 3),
              WaferStart("t", later, "OLD", "W3", 1, int(later) + 60),
              die(0, 1, later, "W3"), WaferEnd("t", later, "OLD", "W3", 1, int(later) + 70, 1, 1),
              LotEnd("t", later, "OLD", int(later) + 100)]
    return [first, [die(0, 1, 2_000.0, "N1", "NEW")], retest,
            [die(0, 1, later + 200, "N2", "NEW2")]]


@pytest.mark.parametrize(("max_wafers_per_lot", "again"), [(25, False), (1, False), (1, True)])
async def test_a_lot_retested_after_it_left_memory_is_archived_as_both_passes_die_by_die(
        tmp_path: Path, max_wafers_per_lot: int, again: bool) -> None:
    """The archive of the retest (fewer parts) neither loses to nor replaces the first
    pass's: the history shows the lot as a hub that kept it in memory throughout does --
    every die once, its final result the retest's -- whether its wafers left memory before
    it (``max_wafers_per_lot`` 1) or with it, or left and came back within the first pass
    (``again``: its archive of the first pass is then its lot's, not its own older row)."""
    frames = two_passes(again)
    reference = LiveState(lambda t, d: None)
    for i, frame in enumerate(frames):
        reference.on_records("gw", 1_000 * i + 1, frame, now=1.0)
    ref = reference.snapshot("lot/OLD")
    assert ref is not None and (ref["die_count"], ref["good"], ref["retests"]) == (
        9, 9, 3 + again)
    async with trio.open_nursery() as nursery:
        hub = Hub(tmp_path, max_lots=1, max_wafers_per_lot=max_wafers_per_lot)
        await hub.start(nursery)
        for i, frame in enumerate(frames[:3]):
            hub.state.on_records("gw", 1_000 * i + 1, frame, now=1.0)
        await hub.settle()
        # back in memory for its retest: its first pass's wafer not tested again is still
        # answerable, from the archive
        assert "OLD" in hub.state.lots
        _, body = await get(hub.port, "/api/lots/OLD/wafers")
        assert body["live"] is True
        assert sorted(w["wafer_id"] for w in body["wafers"]) == ["W1", "W2", "W3"]
        status, wafer = await get(hub.port, "/api/lots/OLD/wafers/W2")
        assert status == 200 and wafer["die_count"] == 2 and wafer["starts"] == 1
        hub.state.on_records("gw", 3_001, frames[3], now=1.0)
        await hub.settle()
        assert "OLD" not in hub.state.lots and not hub.state.not_applied
        _, body = await get(hub.port, "/api/lots")
        row = next(r for r in body["lots"] if r["lot_id"] == "OLD")
        assert row["live"] is False
        for key in ("die_count", "good", "yield", "parts", "starts", "started",
                    "reopened_at", "ended", "status"):
            assert row[key] == ref[key], key
        assert row["wafers"] == 3
        archive = await hub.alerts.store.lot("OLD")
        assert archive is not None
        for key in ("retests", "hard_bins", "soft_bins", "hard_bins_tested",
                    "soft_bins_tested", "sites", "wafer_count", "tests"):
            assert archive["lot"][key] == ref[key], key
        _, body = await get(hub.port, "/api/lots/OLD/wafers")
        assert sorted(w["wafer_id"] for w in body["wafers"]) == ["W1", "W2", "W3"]
        for wafer_id in ("W1", "W2", "W3"):
            _, wafer = await get(hub.port, f"/api/lots/OLD/wafers/{wafer_id}")
            live = reference.snapshot(f"lot/OLD/wafer/{wafer_id}")
            assert live is not None
            assert sorted(wafer["dies"]) == sorted(live["dies"]), wafer_id
            for key in ("die_count", "good", "parts", "retests", "hard_bins", "sites",
                        "starts", "started", "reopened_at", "status"):
                assert wafer[key] == live[key], (wafer_id, key)
        hub.stop()


@pytest.mark.usefixtures("short_lock_wait")
@pytest.mark.parametrize(("max_wafers_per_lot", "again"), [(25, False), (1, False), (1, True)])
async def test_a_retested_lot_s_held_archives_are_answered_as_the_store_will_merge_them(
        tmp_path: Path, max_wafers_per_lot: int, again: bool) -> None:
    """The retest's archives (the lot's, and with ``max_wafers_per_lot`` 1 its wafers'),
    held in memory while ``history.sqlite3`` takes no writes, merge with the stored first
    pass in the history API's answers exactly as in the store once it takes them: the
    answers while held equal those after, but for ``"archive_pending"``."""
    frames = two_passes(again)

    async def answers(port: int) -> dict[str, Any]:
        out: dict[str, Any] = {}
        _, body = await get(port, "/api/lots")
        out["row"] = next(r for r in body["lots"] if r["lot_id"] == "OLD")
        _, out["wafers"] = await get(port, "/api/lots/OLD/wafers")
        for w in out["wafers"]["wafers"]:
            _, out[w["wafer_id"]] = await get(port, f"/api/lots/OLD/wafers/{w['wafer_id']}")
        return out

    fault = StoreFault("locked", tmp_path)
    try:
        async with trio.open_nursery() as nursery:
            hub = Hub(tmp_path, max_lots=1, max_wafers_per_lot=max_wafers_per_lot)
            await hub.start(nursery)
            for i, frame in enumerate(frames[:2]):
                hub.state.on_records("gw", 1_000 * i + 1, frame, now=1.0)
            await hub.settle()
            fault.block()
            for i, frame in enumerate(frames[2:], start=2):  # the retest, then its eviction
                hub.state.on_records("gw", 1_000 * i + 1, frame, now=1.0)
            assert "OLD" not in hub.state.lots
            with trio.fail_after(15):
                await hub.alerts.wait_persisted()
            pending = hub.alerts.metrics.gauge("hub_archives_unwritten_pending")
            assert pending.get() >= 1
            held = await answers(hub.port)
            for answer in held.values():  # the row, the wafer list, each wafer's map
                assert answer.pop("archive_pending") is True
            fault.unblock()
            with trio.fail_after(30):
                while pending.get():
                    await trio.sleep(0.05)
            written = await answers(hub.port)
            assert held == written
            assert sorted(w["wafer_id"] for w in written["wafers"]["wafers"]) == [
                "W1", "W2", "W3"]
            hub.stop()
    finally:
        fault.unblock()


@pytest.mark.usefixtures("short_lock_wait")
@pytest.mark.parametrize("end", ["crash", "stop"])
async def test_an_archive_held_when_the_hub_crashes_is_written_after_the_restart(
        tmp_path: Path, end: str) -> None:
    """A lot evicted while ``history.sqlite3`` takes no writes, its archive held in memory,
    then the hub dies (``crash``: a crash image, its directory copied as it runs, no clean
    stop) or stops cleanly with the store still refusing its last try (``stop``).  The
    checkpoints the hub tries meanwhile, the last one at the stop too, are not written
    (they would stand for the lot's eviction), so the restarted hub, the store healthy,
    replays the frames after the older one, evicts the lot again and writes its archive:
    in the store once, and the history API answers for it.  Before, the checkpoint was
    written and the archive lost."""
    from faultkit import expected_records
    from hubtools import hub_config, start_tester

    from edgegw.hub import Hub as HubApp

    source = {"lot_id": "LOTA", "lots": 2, "parts_per_second": 3000, "wafers": 2,
              "wafer_diameter_dies": 6, "seed": 7}
    n = len(expected_records(**source))
    data_dir, image = tmp_path / "hub", tmp_path / "image"
    cfg = hub_config(data_dir, checkpoint_interval_s=600, checkpoint_records=10**6)
    data_dir.mkdir()
    fault = StoreFault("locked", data_dir)
    try:
        async with trio.open_nursery() as nursery:
            app = HubApp(cfg)
            app.state.max_lots = 1  # LOTA is evicted when LOTB comes
            port = await nursery.start(app.run)
            fault.block()
            await start_tester(nursery, tmp_path, port, **source)
            held = app.metrics.gauge("hub_archives_unwritten_pending")
            try:
                with trio.fail_after(60):
                    while (app.ingest.store.gateway_stats("ate-01").records_applied < n
                           or not held.get()):
                        await trio.sleep(0.05)
            except trio.TooSlowError:
                raise AssertionError((app.ingest.store.gateway_stats("ate-01").records_applied,
                                      n, held.get(), list(app.state.lots))) from None
            assert "LOTA" not in app.state.lots
            app.ingest.drain_feed()
            # a checkpoint now would stand for LOTA's eviction: not written
            assert await app.checkpointer.checkpoint() is False
            assert held.get()
            if end == "crash":
                await trio.to_thread.run_sync(shutil.copytree, data_dir, image)
            nursery.cancel_scope.cancel()  # (a crash: the image is what is left)
    finally:
        fault.unblock()
    if end == "stop":
        image = data_dir
    async with trio.open_nursery() as nursery:
        app = HubApp(hub_config(image, checkpoint_interval_s=600, checkpoint_records=10**6))
        app.state.max_lots = 1
        port = await nursery.start(app.run)
        await app.alerts.wait_persisted()
        status, body = await get(port, "/api/lots/LOTA/wafers")
        assert status == 200 and body["live"] is False, body
        nursery.cancel_scope.cancel()
    with sqlite3.connect(image / "history.sqlite3") as db:
        rows = db.execute("SELECT parts FROM lots WHERE lot_id = 'LOTA'").fetchall()
    assert len(rows) == 1 and rows[0][0] > 0, rows
