"""Wall-clock steps (NTP setting a tester PC's clock by an hour, either way): nothing held
for the length of the step, nothing lost, nothing alarmed.  The rule (docs/reliability.md,
"Clocks"): the monotonic clock drives every wait, timeout and duration; the wall clock only
dates things.  The wall clock is stepped here by replacing ``time.time`` for the process,
as a step of the system clock would (Trio and paho time their waits with the monotonic
clock, which a step does not move)."""

from __future__ import annotations

import functools
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio
from hubtools import gateway_config, http_get, hub_config, start_hub
from mqtt_broker import BrokerAddress
from test_hub import body, handshake
from test_mqtt_gateway import _hub_rows
from test_mqtt_source import Sink, make_source, start_publisher, started, unique
from test_stdf_tail import SMALL, CollectingSink, expected, no_ts, tail
from walltools import SteppedWall

from edgegw.gateway import Gateway
from edgegw.hub import Ingest, RetentionClock, topics
from edgegw.hub.alerts import AlertEngine, AlertRuleConfig, AlertsConfig, AlertService
from edgegw.hub.live import LiveState
from edgegw.protocol import Ack, decode, encode_body
from edgegw.records import LotEnd, SensorReading, SensorWindow
from edgegw.sim import stdf_file_bytes
from edgegw.sources import TailSource
from edgegw.throttle import Throttle

HOUR = 3600.0
DAY = 24 * HOUR


# ---- the throttle (sans-IO: the clock is the caller's) ---------------------------------------


def test_a_throttle_whose_clock_steps_back_an_hour_goes_on_closing_a_window_per_interval(
        ) -> None:
    th = Throttle(1.0)
    t = 1_700_000_000.0
    th.poll(t)
    th.add("temp", 1.0, t + 0.1)
    assert [w.count for w in th.poll(t + 1.0)] == [1]
    th.add("temp", 2.0, t + 1.2)
    t -= HOUR  # stepped back while a window is open
    (w,) = th.poll(t + 1.5)  # the open window closes as due, not an hour later
    assert (w.count, w.t0, w.t1) == (1, t + HOUR + 1.0, t + HOUR + 2.0)
    th.add("temp", 3.0, t + 1.6)
    assert th.deadline == pytest.approx(t + 2.0)  # the grid goes on in the new time
    assert th.poll(t + 1.9) == []
    (w,) = th.poll(t + 2.0)
    assert (w.count, w.t0, w.t1) == (1, t + 1.0, t + 2.0)
    th.add("temp", 4.0, t + 2.5)
    t += 2 * HOUR  # and forward: one longer window, no reading lost
    (w,) = th.poll(t + 3.0)
    assert w.count == 1
    assert th.readings == th.emitted == 4


# ---- the MQTT source --------------------------------------------------------------------------


@pytest.mark.broker
async def test_mqtt_windows_go_on_at_their_rate_when_the_wall_clock_steps_an_hour_back_and_forward(
        mqtt_broker: BrokerAddress, wall: SteppedWall) -> None:
    topic = f"{unique('ate')}/handler/temp"
    source = make_source(mqtt_broker, [{"topic": topic, "channel": "temp", "rate": 10.0,
                                        "payload": "number"}])
    sink = Sink()

    def windowed() -> int:
        return sum(w.count for w in sink.of(SensorWindow))

    sent = 0
    async with trio.open_nursery() as nursery:
        await started(nursery, source, sink)
        pub = await start_publisher(nursery, mqtt_broker)
        for step in (0.0, -HOUR, +HOUR):  # as set, an hour back, back to true time
            wall.offset += step
            before = len(sink.of(SensorWindow))
            for _ in range(20):  # 0.4 s at 50 Hz, readings dated by the gateway
                await pub.publish(topic, b"21.5", qos=1)
                sent += 1
                await trio.sleep(0.02)
            with trio.fail_after(20):
                await pub.wait_all_acked()
            # every reading reaches the sink in a window within seconds, not after the step
            with trio.fail_after(15):
                while windowed() < sent:
                    await trio.sleep(0.02)
            # at 10 windows a second at most (a loaded machine closes fewer, longer ones)
            elapsed_windows = len(sink.of(SensorWindow)) - before
            assert elapsed_windows <= 20, step
        nursery.cancel_scope.cancel()
    assert windowed() == sent
    assert source.buffered == 0


# ---- the gateway's health -----------------------------------------------------------------


async def test_gateway_health_is_not_failed_by_the_wall_clock_stepping_an_hour_forward(
        tmp_path: Path, wall: SteppedWall) -> None:
    """Health fails when frames wait and no ack came for 60 s: a duration, so a step of
    the wall clock is no missing ack."""
    async with trio.open_nursery() as nursery:
        hub_scope = trio.CancelScope()

        async def hub_until_cancelled(*, task_status: trio.TaskStatus[int]) -> None:
            with hub_scope:
                async with trio.open_nursery() as inner:
                    _, port = await start_hub(inner, hub_config(tmp_path / "hub"))
                    task_status.started(port)

        port = await nursery.start(hub_until_cancelled)
        gateway = Gateway(gateway_config(tmp_path / "gw", port))
        await nursery.start(gateway.run)
        readings = [SensorReading("s", float(i), "c", float(i)) for i in range(5)]
        await gateway.sink.put(readings, source="s")
        assert await gateway.drain(10)  # acked: the ack clock has started
        hub_scope.cancel()  # the hub goes away for a moment
        await gateway.sink.put(readings, source="s")
        with trio.fail_after(10):
            while not gateway.store.stats().get("frames"):
                await trio.sleep(0.02)
        assert gateway.healthy() == (True, "ok")
        wall.offset += HOUR
        assert gateway.healthy() == (True, "ok")
        nursery.cancel_scope.cancel()


# ---- the hub's frame retention --------------------------------------------------------------


def test_the_retention_date_ignores_a_forward_step_and_follows_a_step_back() -> None:
    """Retention cuts by wall dates, but its "now" is the wall clock as the monotonic clock
    projects it: days forward change nothing, back is taken (frames are kept longer)."""
    t, mono = [1_700_000_000.0], [100.0]
    clock = RetentionClock(wall=lambda: t[0], monotonic=lambda: mono[0])
    assert clock.now() == 1_700_000_000.0
    t[0] += 10
    mono[0] += 10
    assert clock.now() == 1_700_000_010.0
    t[0] += 3 * DAY  # stepped forward
    assert clock.now() == 1_700_000_010.0
    t[0] += 5
    mono[0] += 5
    assert clock.now() == 1_700_000_015.0  # time goes on at the monotonic clock's pace
    t[0] -= 3 * DAY + HOUR  # stepped back past where it was: an hour behind
    assert clock.now() == 1_700_000_015.0 - HOUR

async def send_three_frames(port: int) -> None:
    """A gateway sends frames 1..3 of one record each and leaves once all are acked."""
    ws_cm, ws, conn, _ = await handshake(port)
    for seq in (1, 2, 3):
        await ws.send_message(conn.data(seq, body(seq, 1), trio.current_time()))
    while decode(await ws.get_message()) != Ack(3, []):
        pass
    await ws_cm.__aexit__(None, None, None)



async def test_a_wall_clock_stepped_days_forward_prunes_no_frame_early(
        tmp_path: Path, wall: SteppedWall) -> None:
    """Frames retained an hour, the wall clock stepped three days forward: frames applied
    a moment ago stay (they were all deleted, all but the newest: the replay of a hub
    without checkpoints rebuilds its live state from them).  A frame really older than
    the hour still goes."""
    async with trio.open_nursery() as nursery:
        hub, port = await start_hub(nursery, hub_config(
            tmp_path, retain_frames_hours=1.0, prune_interval_s=0.02, checkpoint_interval_s=0))
        await send_three_frames(port)
        wall.offset += 3 * DAY
        # frame 1 really applied two hours ago: its going shows the pruner ran after the step
        await hub.store.query("UPDATE frames SET applied_at = applied_at - 7200 WHERE seq = 1")
        pruned = hub.metrics.counter("hub_frames_pruned_total")
        with trio.fail_after(10):
            while pruned.total() < 1:
                await trio.sleep(0.02)
        assert await hub.store.query("SELECT seq FROM frames ORDER BY seq") == [(2,), (3,)]
        nursery.cancel_scope.cancel()


def test_the_retention_date_cuts_nothing_until_it_settled() -> None:
    """A clock ahead at the start looks like a right one: no cut by age for ``settle_s``,
    and a step back within it is taken before the first cut."""
    t, mono = [1_700_000_000.0 + 3 * DAY], [100.0]  # booted three days ahead
    clock = RetentionClock(wall=lambda: t[0], monotonic=lambda: mono[0], settle_s=60.0)
    assert clock.cut_off(HOUR) == 0.0
    t[0] -= 3 * DAY  # NTP sets it right
    mono[0] += 59
    assert clock.cut_off(HOUR) == 0.0
    mono[0] += 1
    assert clock.cut_off(HOUR) == 1_700_000_000.0 - HOUR


async def test_a_hub_started_with_its_clock_days_ahead_prunes_no_frame_early(
        tmp_path: Path, wall: SteppedWall) -> None:
    """Frames retained an hour; the hub restarts with its wall clock three days ahead (a
    PC booted with a bad clock) and NTP sets it right a moment later: the frames applied
    before the restart stay (the first cut by age waits one ``prune_interval_s``; it used
    to run at once and delete all but the newest).  A frame really older than the hour
    goes at the cut after."""
    cfg = hub_config(tmp_path, retain_frames_hours=1.0, prune_interval_s=5.0,
                     checkpoint_interval_s=0)
    async with trio.open_nursery() as nursery:
        hub, port = await start_hub(nursery, cfg)
        await send_three_frames(port)
        nursery.cancel_scope.cancel()
    async with trio.open_nursery() as nursery:
        wall.offset = 3 * DAY
        hub = Ingest(cfg)
        real_prune = hub.store.prune

        async def prune(*args: Any) -> int:
            # (the real prune; NTP steps the clock back once the first pass is done)
            try:
                return await real_prune(*args)
            finally:
                wall.offset = 0.0
        hub.store.prune = prune  # type: ignore[method-assign]
        await nursery.start(hub.run)
        # frame 1 really applied two hours ago: its going shows a cut by age ran
        await hub.store.query("UPDATE frames SET applied_at = applied_at - 7200 WHERE seq = 1")
        pruned = hub.metrics.counter("hub_frames_pruned_total")
        with trio.fail_after(30):
            while pruned.total() < 1:
                await trio.sleep(0.05)
        assert await hub.store.query("SELECT seq FROM frames ORDER BY seq") == [(2,), (3,)]
        nursery.cancel_scope.cancel()


async def test_record_age_counts_a_gateway_clock_offset_as_age(tmp_path: Path) -> None:
    """As documented (docs/operations.md): the age is the hub's wall clock minus the
    record's date, so records dated by a clock an hour behind are an hour old, and by one
    an hour ahead below zero: the lowest bucket."""
    async with trio.open_nursery() as nursery:
        hub, port = await start_hub(nursery, hub_config(tmp_path))
        ws_cm, ws, conn, _ = await handshake(port)
        behind = [SensorReading("s", time.time() - HOUR, "c", 1.0)] * 2
        ahead = [SensorReading("s", time.time() + HOUR, "c", 1.0)] * 3
        await ws.send_message(conn.data(1, encode_body(1, behind), trio.current_time()))
        await ws.send_message(conn.data(2, encode_body(3, ahead), trio.current_time()))
        while decode(await ws.get_message()) != Ack(2, []):
            pass
        await ws_cm.__aexit__(None, None, None)
        age = hub.metrics.histogram("hub_record_age_seconds")
        assert age.count() == 5
        ((counts, _),) = age.series.values()
        assert counts[0] == 3  # the three dated an hour ahead: "younger" than 10 ms
        assert 2 * HOUR <= age.sum() + 3 * HOUR <= 2 * HOUR + 60  # two of about an hour
        nursery.cancel_scope.cancel()


# ---- the tail's finished files ------------------------------------------------------------


@pytest.mark.parametrize("registry", [False, True])
async def test_files_written_after_the_clock_is_set_back_an_hour_are_read(
        tmp_path: Path, wall: SteppedWall, registry: bool) -> None:
    """A tester PC booted an hour ahead: the tail's watermark (scan start less
    ``fold_after``) follows that clock, and the file written then carries its time.  NTP
    sets the clock back: the next files carry times below that watermark, and are new."""
    files = tmp_path / "stdf"
    files.mkdir()
    ahead = files / "ahead.stdf"
    lots = [stdf_file_bytes(SMALL, start_time=1_700_000_000 + i) for i in range(3)]
    ahead.write_bytes(lots[0])
    wall.offset = HOUR
    stamp = time.time()  # as the clock an hour ahead stamps it
    os.utime(ahead, (stamp, stamp))
    sink = CollectingSink()
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            await nursery.start(tail([files], fold_after=0.2,
                                     state_dir=tmp_path / "state" if registry else None).run,
                                sink)
            await sink.wait_until(lambda: len(sink.of(LotEnd)) == 1)
            await trio.sleep(0.5)  # the watermark passes it: an hour ahead of true time
            wall.offset = 0.0  # NTP steps the clock back
            (files / "after.stdf").write_bytes(lots[1])
            await sink.wait_until(lambda: len(sink.of(LotEnd)) == 2)
            nursery.cancel_scope.cancel()
    assert no_ts(sink.records) == expected(lots[0]) + expected(lots[1])


def counting_passes(source: TailSource) -> Callable[[], int]:
    """How many passes (``poll_once``) ``source`` has completed, counted from now."""
    passes = 0
    poll_once = source.poll_once

    async def counted(sink: Any) -> None:
        nonlocal passes
        await poll_once(sink)
        passes += 1

    source.poll_once = counted  # type: ignore[method-assign]
    return lambda: passes


@pytest.mark.parametrize("registry", [
    pytest.param(False, marks=pytest.mark.xfail(
        strict=True, reason="without the registry of finished files (state_dir: the "
        "gateway always gives one) a file finished while the clock ran ahead is read again "
        "after a restart with the clock set back: nothing tells it from a new one")),
    True])
async def test_after_a_restart_with_the_clock_set_back_new_files_are_read_old_ones_not(
        tmp_path: Path, wall: SteppedWall, registry: bool) -> None:
    files = tmp_path / "stdf"
    files.mkdir()
    state = tmp_path / "state" if registry else None
    ahead = files / "ahead.stdf"
    lots = [stdf_file_bytes(SMALL, start_time=1_700_000_000 + i) for i in range(2)]
    ahead.write_bytes(lots[0])
    wall.offset = HOUR
    stamp = time.time()
    os.utime(ahead, (stamp, stamp))
    first = CollectingSink()
    source = tail([files], fold_after=0.2, state_dir=state)
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            await nursery.start(source.run, first)
            await first.wait_until(lambda: len(first.of(LotEnd)) == 1)
            # folded: the checkpoint the next put (any file's) carries no longer lists it
            while str(ahead) in source.checkpoint()["files"]:
                await trio.sleep(0.02)
            checkpoint = source.checkpoint()
            nursery.cancel_scope.cancel()
    wall.offset = 0.0  # set back while the gateway is stopped
    (files / "after.stdf").write_bytes(lots[1])
    second = CollectingSink()
    again = tail([files], fold_after=0.2, state_dir=state, checkpoint=checkpoint)
    passes = counting_passes(again)
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            await nursery.start(again.run, second)
            await second.wait_until(lambda: len(second.of(LotEnd)) >= 1)
            # a file read twice would be by the end of a whole pass that read nothing more
            # (counted, not timed: a busy machine may run few passes in a while)
            while True:
                begun, had = passes() + 1, len(second.records)
                while passes() <= begun:  # the pass after the one under way has ended
                    await trio.sleep(0.01)
                if len(second.records) == had:
                    break
            nursery.cancel_scope.cancel()
    assert no_ts(second.records) == expected(lots[1])


# ---- the hub's live state ---------------------------------------------------------------------


def test_a_gateways_live_rate_is_not_doubled_for_an_hour_when_the_hubs_clock_is_set_back(
        ) -> None:
    state = LiveState(lambda topic, delta: None)
    gw, t = "ate-01", 1_700_000_000.0
    state.on_gateway(gw, True, t)

    def second(at: float) -> None:  # 100 records a second
        state.on_records(gw, 1, [SensorReading("s", at, "c", 1.0)] * 100, now=at)

    def rate() -> float:
        snap = state.snapshot(topics.gateway(gw))
        assert snap is not None
        return float(snap["records_per_s"])

    for i in range(20):
        second(t + i)
    assert rate() == 100.0
    t -= HOUR  # the hub's clock set back
    for i in range(20, 40):
        second(t + i)
    assert rate() == 100.0
    t += 2 * HOUR  # and an hour forward: the old seconds leave the window
    for i in range(40, 60):
        second(t + i)
    assert rate() == 100.0


async def test_the_hubs_uptime_is_not_an_hour_longer_for_a_step_of_its_clock(
        tmp_path: Path, wall: SteppedWall) -> None:
    async with trio.open_nursery() as nursery:
        _, port = await start_hub(nursery, hub_config(tmp_path / "hub"))
        wall.offset = HOUR
        status, health = await http_get(port, "/healthz")
        assert status == 200 and 0 <= health["uptime_s"] < 60
        nursery.cancel_scope.cancel()


# ---- the hub's alerts -------------------------------------------------------------------------


def test_gateway_offline_and_escalation_count_monotonic_seconds_not_wall_clock_steps() -> None:
    """The sans-IO engine with its monotonic clock injected: the wall clock (``now``, the
    dates) steps an hour either way between ticks."""
    rule = AlertRuleConfig(name="gw-down", kind="gateway_offline", priority="P0", offline_s=60)
    events: list[dict[str, Any]] = []
    mono = 0.0
    engine = AlertEngine(AlertsConfig(rules=[rule], escalate_after_s=120),
                         lambda topic, delta: None, sink=events.append, elapsed=lambda: mono)
    state = LiveState(lambda topic, delta: None, alerts=engine)
    t = 1_700_000_000.0
    state.on_gateway("ate-1", True, t)
    state.on_gateway("ate-1", False, t)
    mono = 5.0
    state.tick(t + 5 + HOUR)  # set an hour forward: offline 5 s, not an hour
    assert events == []
    mono = 59.0
    state.tick(t + 59 - HOUR)  # and back
    assert events == []
    mono = 60.0
    state.tick(t + 60 - HOUR)  # offline for 60 s: raised now, not an hour late
    (raised,) = events
    assert raised["event"] == "raised" and raised["alert"]["value"] == 60.0
    mono = 179.0
    state.tick(t + 179 + HOUR)
    assert len(events) == 1  # 119 s since it was raised: not escalated
    mono = 180.0
    state.tick(t + 180 - HOUR)
    assert [e["event"] for e in events] == ["raised", "escalated"]


async def test_the_hub_alert_service_is_not_misled_by_wall_clock_steps(
        tmp_path: Path, wall: SteppedWall) -> None:
    """The alert service as the hub runs it, its wall clock stepped while a gateway is
    briefly offline: no false alert at the step forward, the real one on time after the
    step back."""
    rule = AlertRuleConfig(name="gw-down", kind="gateway_offline", priority="P1", offline_s=1)
    raised: list[dict[str, Any]] = []
    service = AlertService(AlertsConfig(rules=[rule]),
                           lambda topic, delta: raised.append(delta),
                           tmp_path / "history.sqlite3", clock=time.time)
    async with trio.open_nursery() as nursery:
        await nursery.start(functools.partial(service.run, tick_s=0.02))
        service.engine.on_gateway("ate-1", False, time.time())
        begun = trio.current_time()
        wall.offset = HOUR
        await trio.sleep(0.3)
        assert raised == []  # offline 0.3 s, not an hour
        wall.offset = -HOUR
        with trio.fail_after(10):
            while not raised:
                await trio.sleep(0.02)
        assert 1.0 <= raised[0]["alert"]["value"] <= trio.current_time() - begun
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("watched", ["directory", "glob"])
@pytest.mark.parametrize("offset", [HOUR, -HOUR], ids=["gateway_ahead", "gateway_behind"])
async def test_files_are_read_when_the_gateways_clock_runs_an_hour_off_the_file_systems(
        tmp_path: Path, wall: SteppedWall, offset: float, watched: str) -> None:
    """A network file system whose server's clock runs an hour behind the gateway's (or the
    gateway's stepped an hour forward): every file the tester writes carries a change
    time an hour behind the gateway's scans -- and yet is new.  Before, the watermark
    followed the gateway's clock and took every such file as finished: not read.  A
    server an hour ahead: its files' times lie in the future, and are read as before."""
    files = tmp_path / "stdf"
    files.mkdir()
    lots = [stdf_file_bytes(SMALL, start_time=1_700_000_000 + i) for i in range(2)]
    (files / "first.stdf").write_bytes(lots[0])
    sink = CollectingSink()
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            path = files if watched == "directory" else files / "*.stdf"
            await nursery.start(tail([path], fold_after=0.2).run, sink)
            await sink.wait_until(lambda: len(sink.of(LotEnd)) == 1)
            wall.offset = offset  # the gateway's clock stepped
            await trio.sleep(0.5)  # scans by it
            (files / "second.stdf").write_bytes(lots[1])
            await sink.wait_until(lambda: len(sink.of(LotEnd)) == 2, within=5)
            nursery.cancel_scope.cancel()
    assert no_ts(sink.records) == expected(lots[0]) + expected(lots[1])


async def test_the_first_file_in_an_empty_directory_on_a_file_system_an_hour_behind_is_read(
        tmp_path: Path, wall: SteppedWall) -> None:
    """The gateway's clock an hour ahead of the file system's from the start, no file
    there yet: the tester creating one changes the directory, whose change time is the
    file system's clock at work, seen behind the watermark: lowered, and the file read."""
    files = tmp_path / "stdf"
    files.mkdir()
    wall.offset = HOUR  # the gateway's clock an hour ahead of the file system's
    lot = stdf_file_bytes(SMALL, start_time=1_700_000_000)
    sink = CollectingSink()
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            await nursery.start(tail([files], fold_after=0.2).run, sink)
            await trio.sleep(0.5)  # scans of the empty directory
            (files / "first.stdf").write_bytes(lot)
            await sink.wait_until(lambda: len(sink.of(LotEnd)) == 1, within=5)
            nursery.cancel_scope.cancel()
    assert no_ts(sink.records) == expected(lot)


# ---- the whole gateway --------------------------------------------------------------------


@pytest.mark.broker
async def test_a_gateway_streams_sensors_and_stdf_once_through_wall_clock_steps(
        tmp_path: Path, mqtt_broker: BrokerAddress, wall: SteppedWall) -> None:
    """A real gateway (MQTT sensors throttled to 10 Hz, a tail of STDF files) and a real
    hub, the process's wall clock set back an hour and forward again mid-stream: every
    reading in exactly one window the hub applied, every record applied once."""
    topic = f"{unique('ate')}/handler/temp"
    files = tmp_path / "stdf"
    files.mkdir()
    sources = [
        {"name": "sensors", "type": "mqtt", "host": mqtt_broker.host,
         "port": mqtt_broker.port, "client_id": unique("gw"), "clean_session": True,
         "subscriptions": [{"topic": topic, "channel": "temp", "rate": 10.0,
                            "payload": "number"}]},
        {"name": "tester", "type": "tail", "paths": [str(files)], "poll_interval": 0.05,
         "fold_after": 0.2}]
    lots = [stdf_file_bytes(SMALL, start_time=1_700_000_000 + i) for i in range(3)]
    sent = 0
    async with trio.open_nursery() as nursery:
        hub, port = await start_hub(nursery, hub_config(tmp_path / "hub"))
        gateway = await nursery.start(
            Gateway(gateway_config(tmp_path / "gw", port, sources=sources)).run)
        sensors = dict(gateway.sources)["sensors"]
        with trio.fail_after(10):
            await sensors.client.subscribed.wait()
        pub = await start_publisher(nursery, mqtt_broker)
        records_in = gateway.metrics.counter("gateway_records_in_total")
        for i, step in enumerate((0.0, -HOUR, +HOUR)):
            wall.offset += step
            (files / f"lot{i}.stdf").write_bytes(lots[i])
            for _ in range(20):
                await pub.publish(topic, b"21.5", qos=1)
                sent += 1
                await trio.sleep(0.02)
            with trio.fail_after(20):
                await pub.wait_all_acked()
                while sensors.received < sent or sensors.buffered:
                    await trio.sleep(0.02)
                while records_in.get(source="tester") < len(expected(lots[0])) * (i + 1):
                    await trio.sleep(0.02)
        assert await gateway.drain(20)
        applied = hub.stats()["gateways"]["ate-01"]["records_applied"]
        assert applied == records_in.get(source="sensors") + records_in.get(source="tester")
        assert records_in.get(source="tester") == sum(len(expected(lot)) for lot in lots)
        nursery.cancel_scope.cancel()
    _, windows, _ = _hub_rows(tmp_path / "hub")
    assert sum(w.count for w in windows) == sent


async def polled_until_folded(source: TailSource, sink: Any, path: Path) -> None:
    """Poll until ``path`` is read to its end and the checkpoint no longer lists it (the
    watermark covers it)."""
    deadline = time.monotonic() + 30
    await source.poll_once(sink)
    while str(path) in source.checkpoint()["files"] or not source.files[str(path)].done:
        assert time.monotonic() < deadline, source.checkpoint()
        await source.poll_once(sink)
        await trio.sleep(0.15)  # (past the watermark's 0.1 s of slack, fold_after 0)
        await source.poll_once(sink)


@pytest.mark.parametrize("touched", ["after the step", "only while stopped"])
@pytest.mark.parametrize("lots", [1, 3], ids=["one lot", "two lots appended"])
async def test_a_file_finished_while_the_clock_ran_ahead_then_touched_is_read_once(
        tmp_path: Path, wall: SteppedWall, lots: int, touched: str) -> None:
    """A lot finished while the clock ran an hour ahead, perhaps with lots appended and
    read then (its registry entry's older versions forgotten once a durable checkpoint
    relied on the latest, ``FinishedFiles.settle``): registered as finished since a time
    an hour ahead.  NTP sets the clock back, and the file is touched (its change time the
    true one, an hour below that); the watermark passes it.  The gateway stops, the file
    is touched again, and it restarts from a checkpoint taken then.  Before: that
    checkpoint no longer listed the file, and its watermark, below the entry's ``since``,
    relies on no version of it: the file looked new, every lot read again.  Now it stays
    listed until the watermark reaches its entry's ``since`` (an hour later), so a
    restart knows it from the checkpoint: each record once.  Not touched after the step,
    it was listed for that hour already (its change time is the one an hour ahead)."""
    from test_tail_append import lot
    from test_tail_registry import Sink, crash, lot_ids
    from test_tail_registry import start as start_tail

    directory, state = tmp_path / "watched", tmp_path / "state"
    directory.mkdir()
    path = directory / "ahead.stdf"
    path.write_bytes(lot(1))
    true_start = time.time_ns()
    wall.offset = HOUR
    sink = Sink(state)
    source = start_tail(directory, state, None)
    for n in range(1, lots + 1):
        if n > 1:
            with path.open("ab") as f:
                f.write(lot(n))
        stamp = time.time()  # as the clock an hour ahead stamps it
        os.utime(path, (stamp, stamp))
        await polled_until_folded(source, sink, path)
        source._durable(source.checkpoint())  # (durable: older versions forgotten)
    assert source.finished is not None
    entry = source.finished.get(path.stat().st_ino)
    assert entry is not None and entry.older == ()
    assert entry.since > true_start + HOUR / 2 * 1e9  # (registered an hour ahead)
    wall.offset = 0.0  # NTP steps the clock back
    await source.poll_once(sink)
    if touched == "after the step":
        os.utime(path)  # its change time the true one, an hour below the entry's since
        changed = path.stat().st_ctime_ns
        while source.watermark <= changed:
            await trio.sleep(0.05)
            await source.poll_once(sink)
        await source.poll_once(sink)
        assert str(path) in source.checkpoint()["files"]  # (before: no longer listed)
    else:
        assert str(path) in source.checkpoint()["files"]  # (listed again, for an hour)
    checkpoint = json.loads(json.dumps(source.checkpoint()))
    await crash(source)
    os.utime(path)  # touched again while the gateway is stopped
    source = start_tail(directory, state, checkpoint)
    for _ in range(3):
        await source.poll_once(sink)
    await crash(source)
    assert lot_ids(sink.records) == {f"L{n:03}": 1 for n in range(1, lots + 1)}


def first_lot_written_an_hour_ahead(directory: Path, wall: SteppedWall, fold: float) -> Path:
    """L001 written in ``directory`` and stamped while the clock runs an hour ahead."""
    from test_tail_append import lot

    directory.mkdir()
    old = directory / "old.stdf"
    old.write_bytes(lot(1))
    wall.offset = HOUR
    stamp = time.time() - 2 * fold  # as the clock an hour ahead stamps it
    os.utime(old, (stamp, stamp))
    return old


async def read_ahead_then_crashed(tmp_path: Path, wall: SteppedWall, fold: float
                                  ) -> tuple[Path, Path, Any, Any]:
    """L001 read and folded while the clock runs an hour ahead, then a crash.  Returns
    the watched and state directories, the sink (what frames made durable hold) and the
    last durable checkpoint (from while the clock ran ahead)."""
    from test_tail_append import start as start_tail
    from test_tail_registry import Sink, crash

    directory, state = tmp_path / "watched", tmp_path / "state"
    old = first_lot_written_an_hour_ahead(directory, wall, fold)
    sink = Sink(state)
    source = start_tail(directory, state, None, fold_after=fold)
    await polled_until_folded(source, sink, old)
    durable = json.loads(json.dumps(source.checkpoint()))
    await crash(source)
    return directory, state, sink, durable


async def restarted_from(directory: Path, state: Path, checkpoint: Any, fold: float
                         ) -> list[Any]:
    """What a restart from ``checkpoint`` reads in three polls, crashed after them."""
    from test_tail_append import start as start_tail
    from test_tail_registry import Sink, crash

    restarted = Sink(state)
    source = start_tail(directory, state, checkpoint, fold_after=fold)
    for _ in range(3):
        await source.poll_once(restarted)
    await crash(source)
    return list(restarted.records)


@pytest.mark.parametrize("renamed", [False, True], ids=["touched", "touched and renamed"])
async def test_a_finished_file_touched_after_the_clock_was_set_back_is_not_lost_on_a_restart(
        tmp_path: Path, wall: SteppedWall, renamed: bool) -> None:
    """A lot read and finished while the clock ran an hour ahead: registered as finished
    since a time an hour ahead (its change time then).  The checkpoint that covers its
    records is not durable yet (the last durable one is from before the lot).  NTP sets
    the clock back; the file is touched (its change time the true one, an hour below),
    perhaps renamed too (the running tail registers it again under its new name), and
    the watermark passes that change.  The gateway stops and restarts from the durable
    checkpoint: the watermark covers the file's change time, but its entry says it was
    finished only after that checkpoint's watermark, which does not cover its records:
    it is read.  Before: it was taken as finished by the watermark, its lot lost -- and
    renamed, ``FinishedFiles.add`` had lowered its entry's ``since`` to the true change
    time, so that the entry too said the checkpoint covered it."""
    from test_tail_append import lot
    from test_tail_append import start as start_tail
    from test_tail_registry import crash, lot_ids

    fold = 5.0
    directory, state, sink, durable = await read_ahead_then_crashed(tmp_path, wall, fold)
    stored = list(sink.records)  # (what frames made durable with it hold)
    path = directory / "ahead.stdf"  # written while the gateway was stopped
    path.write_bytes(lot(2))
    stamp = time.time()  # the clock an hour ahead
    os.utime(path, (stamp, stamp))
    source = start_tail(directory, state, durable, fold_after=fold)
    wall.offset = HOUR + 2 * fold  # (time passes: the watermark passes the file)
    await polled_until_folded(source, sink, path)
    assert source.finished is not None
    entry = source.finished.get(path.stat().st_ino)
    assert entry is not None and entry.since >= stamp * 1e9 - 1e6  # (an hour ahead)
    wall.offset = 0.0  # NTP steps the clock back
    await source.poll_once(sink)
    os.utime(path)  # touched: its change time the true one, an hour below the entry's since
    if renamed:
        path = path.rename(path.with_name("renamed.stdf"))
    changed = path.stat().st_ctime_ns
    wall.offset = 2 * fold  # (the watermark passes the touch, not the entry's since)
    deadline = time.monotonic() + 30
    while source.watermark <= changed or (
            (e := source.finished.get(path.stat().st_ino)) is None or e.path != str(path)):
        assert time.monotonic() < deadline
        await source.poll_once(sink)
        await trio.sleep(0.05)
    await source.poll_once(sink)
    await crash(source)  # the checkpoints after ``durable`` never became durable
    wall.offset = 4 * fold  # (restarted a while later: the watermark covers the touch)
    restarted = await restarted_from(directory, state, durable, fold)
    assert lot_ids(stored + restarted) == {"L001": 1, "L002": 1}


async def test_a_file_written_while_stopped_after_the_clock_was_set_back_is_read(
        tmp_path: Path, wall: SteppedWall) -> None:
    """The durable checkpoint is from while the clock ran an hour ahead (its watermark
    an hour ahead).  The gateway stops, NTP sets the clock back, a lot is written, and the
    gateway restarts more than ``fold_after`` later: the lot must be read.  Before: the
    restart lowered the watermark to its clock less ``fold_after``, which covers the lot,
    and took it as finished (no registry entry said otherwise): never read.  Now a file
    the watermark covers that is neither known nor registered, at a restart whose clock
    is behind the durable checkpoint's watermark, is read."""
    from test_tail_append import lot
    from test_tail_registry import lot_ids

    fold = 5.0
    directory, state, sink, checkpoint = await read_ahead_then_crashed(tmp_path, wall, fold)
    wall.offset = 0.0  # NTP steps the clock back while the gateway is stopped
    (directory / "new.stdf").write_bytes(lot(2))
    wall.offset = 4 * fold  # (restarted a while later)
    restarted = await restarted_from(directory, state, checkpoint, fold)
    assert lot_ids(sink.records + restarted) == {"L001": 1, "L002": 1}


@pytest.mark.parametrize("where", ["a new name", "the inode of a finished lot deleted"])
async def test_after_the_clock_was_set_back_only_the_lot_written_while_stopped_is_read(
        tmp_path: Path, inode_fs: Path, wall: SteppedWall, where: str) -> None:
    """L001 written before the clock ran an hour ahead, L002 while it did; both read and
    finished then, registered.  The gateway stops, NTP sets the clock back, L003 is written
    -- under a new name, or at the inode of L002, deleted (a new file the registry's entry
    there does not describe) -- and the gateway restarts more than ``fold_after`` later:
    its watermark, lowered to its clock, covers L001 and L003.  L003 is read (before: taken
    as finished, lost), L001 and L002 are not read again."""
    from test_tail_append import lot
    from test_tail_append import start as start_tail
    from test_tail_inode import replace_at_inode
    from test_tail_registry import Sink, crash, lot_ids

    fold = 5.0
    # (the lots on a file system of the test's own: on the shared disk another process's
    # file took L002's freed inode, on a busy machine, for longer than the test waits)
    directory, state = inode_fs / "watched", tmp_path / "state"
    directory.mkdir()
    before = directory / "before.stdf"
    before.write_bytes(lot(1))  # the true time
    wall.offset = HOUR
    ahead = directory / "ahead.stdf"
    ahead.write_bytes(lot(2))
    stamp = time.time() - 2 * fold  # as the clock an hour ahead stamps it
    os.utime(ahead, (stamp, stamp))
    sink = Sink(state)
    source = start_tail(directory, state, None, fold_after=fold)
    for path in (before, ahead):
        await polled_until_folded(source, sink, path)
    assert source.finished is not None and len(source.finished) == 2
    checkpoint = json.loads(json.dumps(source.checkpoint()))
    await crash(source)
    wall.offset = 0.0  # NTP steps the clock back while the gateway is stopped
    if where == "a new name":
        (directory / "new.stdf").write_bytes(lot(3))
    else:
        replace_at_inode(ahead, directory / "new.stdf", lot(3))
    wall.offset = 4 * fold  # (restarted a while later)
    source = start_tail(directory, state, checkpoint, fold_after=fold)
    for _ in range(3):
        await source.poll_once(sink)
    await crash(source)
    assert lot_ids(sink.records) == {"L001": 1, "L002": 1, "L003": 1}


async def test_after_the_clock_was_set_back_lots_the_registry_forgot_are_not_read_again(
        tmp_path: Path, wall: SteppedWall) -> None:
    """The registry of finished files holds at most ``finished_kept`` (here 2) and forgets
    the oldest: L001 is finished and not in it.  The same restart with the clock set back
    reads the lot written while stopped (L004, changed after every entry's ``since``) but
    not L001 again: a file changed before the earliest entry of a registry that may have
    forgotten some is taken as finished, as before."""
    from test_tail_append import lot
    from test_tail_append import start as start_tail
    from test_tail_inode import wait_past_change_time
    from test_tail_registry import Sink, crash, lot_ids

    fold = 5.0
    directory, state = tmp_path / "watched", tmp_path / "state"
    directory.mkdir()
    paths = [directory / f"lot{n}.stdf" for n in (1, 2, 3)]
    for n, path in enumerate(paths, 1):
        path.write_bytes(lot(n))
        wait_past_change_time(path)  # (registered, and forgotten, in this order)
    wall.offset = HOUR
    sink = Sink(state)
    source = start_tail(directory, state, None, fold_after=fold, finished_kept=2)
    for path in paths:
        await polled_until_folded(source, sink, path)
    assert source.finished is not None
    assert source.finished.get(paths[0].stat().st_ino) is None  # (forgotten)
    checkpoint = json.loads(json.dumps(source.checkpoint()))
    await crash(source)
    wall.offset = 0.0  # NTP steps the clock back while the gateway is stopped
    (directory / "new.stdf").write_bytes(lot(4))
    wall.offset = 4 * fold  # (restarted a while later)
    source = start_tail(directory, state, checkpoint, fold_after=fold, finished_kept=2)
    for _ in range(3):
        await source.poll_once(sink)
    await crash(source)
    assert lot_ids(sink.records) == {"L001": 1, "L002": 1, "L003": 1, "L004": 1}


async def test_a_lot_read_after_a_restart_with_the_clock_set_back_is_not_lost_by_a_crash(
        tmp_path: Path, wall: SteppedWall) -> None:
    """The restart with the clock set back reads L002, written while it was stopped,
    finishes and registers it -- with a change time below the durable checkpoint's
    watermark, an hour ahead -- and crashes before any checkpoint of its becomes durable:
    nothing of L002 is stored.  The next restart resumes from that same checkpoint and
    must read L002 again: its registry entry is no proof that checkpoint covers its
    records, whatever its change time says (before: relied on, L002 taken as finished,
    lost).  L001, finished while the clock ran ahead, is not read again."""
    from test_tail_append import lot
    from test_tail_append import start as start_tail
    from test_tail_registry import Sink, crash, lot_ids

    fold = 5.0
    directory, state, sink, durable = await read_ahead_then_crashed(tmp_path, wall, fold)
    stored = list(sink.records)  # (what frames made durable with it hold)
    wall.offset = 0.0  # NTP steps the clock back while the gateway is stopped
    new = directory / "new.stdf"
    new.write_bytes(lot(2))
    wall.offset = 4 * fold  # (restarted a while later)
    lost = Sink(state)
    source = start_tail(directory, state, durable, fold_after=fold)
    deadline = time.monotonic() + 30
    while source.finished is None or source.finished.get(new.stat().st_ino) is None:
        assert time.monotonic() < deadline  # (read, finished, registered)
        await source.poll_once(lost)
    assert lot_ids(lost.records) == {"L002": 1}
    await crash(source)  # before any of its checkpoints became durable
    wall.offset = 6 * fold
    restarted = await restarted_from(directory, state, durable, fold)
    assert lot_ids(stored + restarted) == {"L001": 1, "L002": 1}
