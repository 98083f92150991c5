"""Updates nobody follows are not built (docs/live-topics.md, "Unwatched topics"): the live
state asks the fan-out ``wanted(topic)`` and skips a topic no client's pattern matches; a
client that subscribes later starts from a snapshot built from the state, and a client
that resumes across such a gap gets a snapshot marked ``resync``, never composed deltas."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import cbor2
import trio
from hubtools import start_tester
from trio_websocket import open_websocket_url

from edgegw.config import build
from edgegw.hub import Hub, HubConfig
from edgegw.hub.fanout import CBOR, SUBPROTOCOL_CBOR, LiveConfig, LiveHub
from edgegw.hub.live import LiveState
from edgegw.metrics import Metrics
from edgegw.sim import SimulatedConfig, simulated_batches

TOKEN = "s3cret"
SIM = SimulatedConfig(lots=1, wafers=2, wafer_diameter_dies=8, tests_per_part=3)


def batches(n: int) -> list[list[Any]]:
    """The first ``n`` record batches of a simulated lot."""
    clock = iter(range(1_000, 10**9))
    return [b for b, _ in itertools.islice(
        simulated_batches(SIM, "tester", clock=lambda: float(next(clock))), n)]


def skipped(metrics: Metrics, kind: str) -> float:
    return metrics.counter("hub_live_updates_skipped_total").get(kind=kind)


def as_sent(data: Any) -> Any:
    """``data`` as a CBOR client decodes it."""
    return cbor2.loads(cbor2.dumps(data))


def live_pair() -> tuple[LiveHub, LiveState, Metrics, list[str]]:
    """A fan-out core and the live state feeding it, wired as the hub wires them; the
    topics published are recorded."""
    metrics = Metrics()
    published: list[str] = []
    hub = LiveHub(None, LiveConfig(), epoch="E1", metrics=metrics)  # type: ignore[arg-type]

    def publish(topic: str, delta: dict[str, Any]) -> None:
        published.append(topic)
        hub.publish(topic, delta)

    state = LiveState(publish, metrics=metrics, clock=lambda: 5_000.0, wanted=hub.wanted)
    hub.source = state
    return hub, state, metrics, published


def feed(state: LiveState, frames: list[list[Any]], rid: int = 1) -> int:
    for records in frames:
        state.on_records("ate-01", rid, records, now=records[0].ts)
        rid += len(records)
    return rid


def subscribe(hub: LiveHub, topics: list[str]) -> Any:
    client = hub.connect(CBOR, now=0.0)
    hub.receive(client, cbor2.dumps({"type": "subscribe", "id": 1, "topics": topics}), 0.0)
    return client


def items(hub: LiveHub, client: Any, now: float) -> list[dict[str, Any]]:
    hub.tick(now, now)
    out = []
    while (frame := hub.take_frame(client)) is not None:
        hub.frame_written(client, now)
        msg = cbor2.loads(frame)
        out += msg.get("items", [])
    return out


def test_with_nobody_subscribed_no_wafer_lot_or_test_update_is_built() -> None:
    hub, state, metrics, published = live_pair()
    feed(state, batches(40))
    assert state.topics() and any("/wafer/" in t for t in state.topics())
    assert published == []  # nothing built, nothing handed to the fan-out
    assert hub.channels == {}
    for kind in ("wafer", "lot", "test", "gateway"):
        assert skipped(metrics, kind) > 0, kind


def test_wildcards_keep_their_topics_wanted_and_unsubscribing_drops_them() -> None:
    hub, state, _metrics, published = live_pair()
    feed(state, batches(5))
    wafer = next(t for t in state.topics() if "/wafer/" in t)
    lot = wafer.rsplit("/wafer/", 1)[0]
    test = next(t for t in state.topics() if t.startswith("test/"))
    client = subscribe(hub, ["lot/+/wafer/+"])
    assert hub.wanted(wafer) and not hub.wanted(lot) and not hub.wanted(test)
    other = subscribe(hub, ["test/#"])
    assert hub.wanted(test) and hub.wanted(wafer) and not hub.wanted(lot)
    feed(state, batches(12)[5:], rid=10_000)
    assert wafer in published and test in published and lot not in published
    hub.receive(client, cbor2.dumps({"type": "unsubscribe", "topics": ["lot/+/wafer/+"]}), 0.0)
    assert not hub.wanted(wafer) and hub.wanted(test)
    hub.disconnect(other)
    assert not hub.wanted(test)
    published.clear()
    feed(state, batches(20)[12:], rid=20_000)
    assert published == []


def test_a_resume_across_skipped_updates_gets_a_resync_snapshot_not_a_gap() -> None:
    hub, state, _metrics, _published = live_pair()
    frames = batches(30)
    feed(state, frames[:5])
    wafer = next(t for t in state.topics() if "/wafer/" in t)
    client = subscribe(hub, [wafer])
    first = items(hub, client, 1.0)
    feed(state, frames[5:10], rid=1_000)
    seen = items(hub, client, 2.0)
    assert [i["type"] for i in first] == ["snapshot"] and [i["type"] for i in seen] == ["delta"]
    offset = seen[-1]["offset"]
    hub.disconnect(client)
    feed(state, frames[10:30], rid=2_000)  # nobody follows: these changes publish nothing
    again = hub.connect(CBOR, now=3.0)
    hub.receive(again, cbor2.dumps({"type": "subscribe", "topics": [wafer],
                                    "resume": {wafer: ["E1", offset]}}), 3.0)
    (item,) = items(hub, again, 3.0)
    assert item["type"] == "snapshot" and item["resync"] == "history_truncated"
    assert item["data"] == json.loads(json.dumps(state.snapshot(wafer)))


async def test_a_late_subscriber_gets_the_state_a_subscriber_from_the_start_has(
        tmp_path: Path) -> None:
    """The real hub: one client follows the wafer maps from the start, so the lots' and
    tests' updates are skipped (counted); a client that subscribes after the lot has its
    wafers equal to the first client's view and every topic equal to the state."""
    config = build(HubConfig, {"hub": {"port": 0, "data_dir": str(tmp_path / "hub")},
                               "gateways": {"ate-01": {"token": TOKEN}}})
    app = Hub(config)
    early: dict[str, dict[str, Any]] = {}
    late: dict[str, dict[str, Any]] = {}

    async def follow(patterns: list[str], views: dict[str, dict[str, Any]], *,
                     task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with open_websocket_url(f"ws://127.0.0.1:{port}/ws/live",
                                      subprotocols=[SUBPROTOCOL_CBOR]) as ws:
            await ws.send_message(cbor2.dumps({"type": "subscribe", "topics": patterns}))
            task_status.started()
            while True:
                msg = cbor2.loads(await ws.get_message())
                for item in msg.get("items", []):
                    data = item["data"]
                    if item["type"] == "snapshot":
                        views[item["topic"]] = {**data, "dies": {
                            tuple(d[:2]): d for d in data.get("dies", [])}}
                        if "/wafer/" not in item["topic"]:
                            views[item["topic"]] = {**data, "dies": {}}
                        continue
                    view = views[item["topic"]]
                    for delta in data:
                        for key, value in delta.items():
                            if key == "dies":
                                view["dies"].update({tuple(d[:2]): d for d in value})
                            else:
                                view[key] = value

    async def wait_for(predicate: Any, seconds: float = 20.0) -> None:
        with trio.fail_after(seconds):
            while not predicate():
                await trio.sleep(0.02)

    async with trio.open_nursery() as nursery:
        port = await nursery.start(app.run)
        await nursery.start(follow, ["lot/+/wafer/+"], early)
        gateway = await start_tester(nursery, tmp_path, port, TOKEN, parts_per_second=2_000,
                                     wafer_diameter_dies=8, wafers=2, tests_per_part=3,
                                     max_parts=120)
        source = gateway.sources[0][1]
        applied = app.metrics.counter("hub_state_records_total")
        # the source's end is not the hub's: on a busy machine the hub may not have applied
        # a record yet -- wait until the live state has every record the tester made
        await wait_for(lambda: source.finished.is_set() and applied.total() >= source.produced)
        state = app.state
        wafers = [t for t in state.topics() if "/wafer/" in t]
        tested = [t for t in state.topics() if t.startswith(("lot/", "test/"))]
        assert wafers and tested
        assert skipped(app.metrics, "lot") > 0 and skipped(app.metrics, "test") > 0
        assert skipped(app.metrics, "wafer") == 0
        await nursery.start(follow, ["lot/#", "test/+/+"], late)

        def dies(view: dict[str, Any] | None) -> dict[Any, Any]:
            return {k: list(v) for k, v in (view or {}).get("dies", {}).items()}

        def settled() -> bool:
            return all(dies(early.get(t)) == dies(late.get(t)) == {
                tuple(d[:2]): list(d) for d in state.snapshot(t)["dies"]} for t in wafers) \
                and all(late.get(t) == {**as_sent(state.snapshot(t)), "dies": {}}
                        for t in tested if "/wafer/" not in t)

        await wait_for(settled)
        for topic in wafers:
            assert early[topic]["good"] == late[topic]["good"]
            assert early[topic]["hard_bins"] == late[topic]["hard_bins"]
        nursery.cancel_scope.cancel()
