"""The live-state queue (docs/storage.md, "The live-state queue"): the hub acknowledges a
frame after its durable commit and applies it to the live state afterwards, from a bounded
queue in commit order.  What must hold regardless:

* every applied record reaches the live state exactly once, in applied order: with a
  queue so small that ingest keeps waiting for it, the live state the hub shows equals
  what a full replay of its store builds;
* a clean stop applies what is queued before its final checkpoint, so the next start
  replays nothing and shows the same;
* over its bound the queue holds the next commit until the feeder has made room.

Real processes: a hub (``edgegw hub``) and a gateway with a seeded simulated tester; the
bound is checked on an ``Ingest`` in this process, where the feeder can be held back.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import trio
import trio.testing
from faultkit import Gateway, Hub, expected_records, source_settings, wait_all_applied
from processes import get_json, wait_for
from test_restart import shown

from edgegw.config import build
from edgegw.hub import HubConfig, Ingest
from edgegw.records import SensorReading

QUEUE = "hub.live_queue_records=1000"  # the smallest: ingest waits for the live state


def live_queue(hub: Hub) -> dict[str, Any]:
    stats = get_json(f"{hub.url}/api/stats")
    applied = sum(gw["records_applied"] for gw in stats["gateways"].values())
    return {**stats["live_queue"], "applied": applied,
            "state_records": stats["metrics"]["hub_state_records_total"],
            "waits": stats["metrics"]["hub_live_queue_waits_total"]}


def test_the_queued_live_state_equals_a_full_replay_and_a_clean_stop_drains_it(
        tmp_path: Path) -> None:
    source = {"parts_per_second": 4000, "max_parts": 3000, "seed": 7, "wafers": 200}
    n = len(expected_records(**source))
    hub = Hub(tmp_path)
    # The gateway spools the whole history before the hub is up: the backlog then comes
    # as fast as the hub takes it, and ingest has to wait for the live state.
    gw = Gateway(tmp_path, hub.port, *source_settings(**source)).start()
    try:
        wait_for(lambda: (st := gw.stats())["next_rid"] > n and not st["pending_in_batcher"],
                 timeout=60)
        hub.start("", True, QUEUE)
        wait_all_applied(hub, gw, n, timeout=120)
    finally:
        gw.stop()
    try:
        # the queue empties; the live state has every applied record, once
        wait_for(lambda: live_queue(hub)["records"] == 0
                 and live_queue(hub)["records_fed"] == live_queue(hub)["applied"], timeout=30)
        q = live_queue(hub)
        assert q["frames"] == 0
        assert q["state_records"] == q["records_fed"] == q["applied"]
        assert q["fed_frame_id"] > 0
        live = shown(hub)
    finally:
        hub.stop()  # clean: drains the queue, writes the final checkpoint
    assert any(lot["die_count"] for lot in live["lots"])

    hub.start("", True, QUEUE)
    try:
        replay = get_json(f"{hub.url}/api/stats")["replay"]
        assert replay["records"] == 0, replay  # the final checkpoint held everything
        assert shown(hub) == live
    finally:
        hub.kill()
    hub.start("", True, "hub.checkpoint_interval_s=0")  # every frame replayed, in order
    try:
        stats = get_json(f"{hub.url}/api/stats")
        assert stats["replay"]["after_frame"] == 0
        assert stats["replay"]["records"] == q["applied"]
        assert shown(hub) == live
    finally:
        hub.kill()


class Recorder:
    def __init__(self) -> None:
        self.seen: list[tuple[Any, ...]] = []

    def on_records(self, gateway_id: str, first_rid: int, records: list[Any]) -> None:
        self.seen.append((gateway_id, first_rid, len(records)))

    def on_gateway(self, gateway_id: str, connected: bool, now: float) -> None:
        self.seen.append((gateway_id, connected))


async def test_a_full_queue_holds_the_next_commit_until_the_feeder_has_room(
        tmp_path: Path) -> None:
    """The bound: over ``hub.live_queue_records`` an applier waits before committing more;
    the feeder hands everything on in the order it was queued, events in their place."""
    ingest = Ingest(build(HubConfig, {"hub": {"data_dir": str(tmp_path),
                                              "live_queue_records": 1000}}))
    recorder = Recorder()
    ingest.add_consumer(recorder)
    records = [SensorReading("s", 1.0, "temp", 20.0, "C")] * 600
    ingest._gateway_event("gw1", True)
    for n in range(3):  # 1,800 records: over the bound
        ingest._queue_feed("gw1", 1 + 600 * n, records, frame_id=n + 1)
    ingest._gateway_event("gw1", False)
    assert recorder.seen == []  # nothing is applied in the committing step
    waited = trio.Event()

    async def applier() -> None:
        await ingest._room_to_feed()
        waited.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(applier)
        await trio.testing.wait_all_tasks_blocked()
        assert not waited.is_set()  # held: the queue is over its bound
        assert ingest.stats()["live_queue"]["records"] == 1800
        nursery.start_soon(ingest._feeder)
        await waited.wait()
        nursery.cancel_scope.cancel()
    assert recorder.seen == [("gw1", True), ("gw1", 1, 600), ("gw1", 601, 600),
                             ("gw1", 1201, 600), ("gw1", False)]
    assert ingest.fed_id == 3 and ingest.records_fed == 1800
    assert ingest.metrics.as_dict()["hub_live_queue_waits_total"] == 1


class SlowLiveState(Recorder):
    """A consumer that takes more of the thread's CPU over each frame than one feeder step
    may use (a step is bounded in CPU time), as a big frame's apply does."""

    def on_records(self, gateway_id: str, first_rid: int, records: list[Any]) -> None:
        until = time.thread_time() + 0.01
        while time.thread_time() < until:
            pass
        super().on_records(gateway_id, first_rid, records)


async def test_a_backlog_is_fed_in_short_steps_with_the_other_tasks_between(
        tmp_path: Path) -> None:
    """Once a feeder step has used its time, the other tasks (the fan-out's ticks, the
    gateways' receivers) run before the next frame is applied, however long the backlog:
    a step is bounded in time, not in records."""
    ingest = Ingest(build(HubConfig, {"hub": {"data_dir": str(tmp_path)}}))
    slow = SlowLiveState()
    ingest.add_consumer(slow)
    records = [SensorReading("s", 1.0, "temp", 20.0, "C")] * 10
    for n in range(3):  # 30 records: one step of the old 20,000-record budget
        ingest._queue_feed("gw1", 1 + 10 * n, records, frame_id=n + 1)
    seen_between: list[int] = []  # frames applied when another task got a turn
    async with trio.open_nursery() as nursery:
        nursery.start_soon(ingest._feeder)
        while len(slow.seen) < 3:
            await trio.lowlevel.checkpoint()
            seen_between.append(len(slow.seen))
        nursery.cancel_scope.cancel()
    assert any(0 < n < 3 for n in seen_between), seen_between
    assert slow.seen == [("gw1", 1, 10), ("gw1", 11, 10), ("gw1", 21, 10)]
    assert ingest.fed_id == 3


async def test_the_ingest_lag_is_the_age_of_the_oldest_frame_not_yet_in_the_live_state(
        autojump_clock: trio.testing.MockClock, tmp_path: Path) -> None:
    ingest = Ingest(build(HubConfig, {"hub": {"data_dir": str(tmp_path)}}))
    ingest.add_consumer(Recorder())
    assert ingest.lag() == 0
    records = [SensorReading("s", 1.0, "temp", 20.0, "C")] * 10
    ingest._gateway_event("gw1", True)  # an event is no frame: no lag of its own
    ingest._queue_feed("gw1", 1, records, frame_id=1)
    await trio.sleep(0.3)
    ingest._queue_feed("gw1", 11, records, frame_id=2)
    await trio.sleep(0.1)
    assert abs(ingest.lag() - 0.4) < 1e-6  # the older frame's
    async with trio.open_nursery() as nursery:
        nursery.start_soon(ingest._feeder)
        await trio.testing.wait_all_tasks_blocked()
        assert ingest.lag() == 0 and ingest.fed_id == 2
        nursery.cancel_scope.cancel()
