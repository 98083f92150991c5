"""The node-side mirror and the fan-out's cluster seam, sans-IO (no Redis, no sockets):
``MirrorState`` rebuilds every live topic from a snapshot and the deltas after it exactly as
the live state holds it, and ``LiveHub`` serves channels whose epoch and offsets come from
outside (``reset_channel``, ``set_epoch``, ``set_unavailable``)."""

from __future__ import annotations

import copy
import json
from typing import Any

from edgegw.hub.cluster import MirrorState
from edgegw.hub.fanout import JSON, LiveHub
from edgegw.hub.live import LiveState
from edgegw.records import GatewayEvent, SensorReading
from edgegw.sim import SimulatedConfig, simulated_batches


class Recorder:
    def __init__(self) -> None:
        self.deltas: list[tuple[str, dict[str, Any]]] = []

    def __call__(self, topic: str, delta: dict[str, Any], ts: float | None = None) -> None:
        # deltas are handed over, never changed afterwards: a deep copy proves it
        self.deltas.append((topic, copy.deepcopy(delta)))


def test_the_mirror_rebuilds_every_topic_as_the_live_state_holds_it() -> None:
    recorder = Recorder()
    state = LiveState(recorder, clock=lambda: 1000.0, sensor_history=120)
    batches = simulated_batches(SimulatedConfig(wafer_diameter_dies=10, tests_per_part=4,
                                                wafers=3, lots=2), "sim", clock=lambda: 5.0)
    mirror = MirrorState()
    rid = 1
    for i, (batch, _) in enumerate(batches):
        records: list[Any] = list(batch)
        # sensor history beyond its bound (append, keep 120) and gateway events beyond
        # theirs (prepend, keep 20)
        records += [SensorReading("sim", 5.0 + i, "handler/temp", 20.0 + i % 7, "degC")
                    for _ in range(3)]
        if i % 4 == 0:
            records.append(GatewayEvent("sim", 5.0 + i, "warning", "spool_full", f"n{i}"))
        mark = len(recorder.deltas)
        state.on_records("ate-01", rid, records, now=1000.0 + i)
        rid += len(records)
        if i == 40:  # a node that starts mirroring mid-run loads snapshots
            for topic in state.topics():
                mirror.load(topic, copy.deepcopy(state.snapshot(topic)))
        elif i > 40:
            # as the publisher does: a topic's first publication is its snapshot (taken
            # after the frame), every later one its deltas
            fresh = {t for t, _ in recorder.deltas[mark:] if t not in mirror.views}
            for topic in fresh:
                mirror.load(topic, copy.deepcopy(state.snapshot(topic)))
            for topic, delta in recorder.deltas[mark:]:
                if topic not in fresh:
                    mirror.apply(topic, delta)
    mark = len(recorder.deltas)
    state.on_gateway("ate-01", False, 2000.0)
    for topic, delta in recorder.deltas[mark:]:
        mirror.apply(topic, delta)
    topics = [t for t in state.topics() if not t.startswith("alert/")]
    assert any(t.startswith("sensor/") for t in topics)
    assert any(t.startswith("lot/") and "/wafer/" in t for t in topics)
    for topic in topics:
        assert mirror.snapshot(topic) == state.snapshot(topic), topic
    assert len(mirror.snapshot("sensor/handler%2Ftemp")["history"]) == 120
    assert len(mirror.snapshot("gateway/ate-01")["events"]) == 20


class Dicts:
    def __init__(self) -> None:
        self.views: dict[str, dict[str, Any]] = {}

    def snapshot(self, topic: str) -> dict[str, Any] | None:
        return self.views.get(topic)

    def topics(self) -> list[str]:
        return list(self.views)


def sent(hub: LiveHub, client: Any) -> list[dict[str, Any]]:
    out = []
    while (frame := hub.take_frame(client)) is not None:
        hub.frame_written(client, 0.0)
        out.append(json.loads(frame))
    return out


def items(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [i for m in messages if m["type"] == "batch" for i in m["items"]]


def test_channels_take_their_offsets_and_epoch_from_outside() -> None:
    source = Dicts()
    hub = LiveHub(source, epoch="e1")
    source.views["sensor/a"] = {"v": 1}
    hub.reset_channel("sensor/a", 100, [{"v": -1}, {"v": 0}, {"v": 1}])
    old = hub.connect(JSON, now=0.0)
    hub.receive(old, json.dumps({"type": "subscribe", "topics": ["sensor/+"],
                                 "resume": {"sensor/a": ["e1", 98]}}), 0.0)
    fresh = hub.connect(JSON, now=0.0)
    hub.receive(fresh, json.dumps({"type": "subscribe", "topics": ["sensor/+"]}), 0.0)
    hub.tick(0.0, 0.0)
    # from offset 98 the history it was given leads to 100: exactly the two deltas
    (delta,) = items(sent(hub, old))
    assert (delta["type"], delta["from"], delta["offset"], delta["n"]) == ("delta", 98, 100, 2)
    (snap,) = items(sent(hub, fresh))
    assert (snap["type"], snap["offset"]) == ("snapshot", 100)
    # deltas published after it continue the outside numbering
    source.views["sensor/a"] = {"v": 2}
    hub.publish("sensor/a", {"v": 2})
    hub.tick(0.1, 0.1)
    assert [(i["from"], i["offset"]) for i in items(sent(hub, fresh))] == [(100, 101)]
    sent(hub, old)
    # a reset that history cannot bridge: a snapshot with the reason
    hub.reset_channel("sensor/a", 150, (), reason="state_reset")
    hub.tick(0.2, 0.2)
    (snap,) = items(sent(hub, fresh))
    assert (snap["type"], snap["offset"], snap["resync"]) == ("snapshot", 150, "state_reset")
    # a new epoch: when the topic is back, every subscriber resyncs with epoch_changed
    hub.set_epoch("e2")
    hub.tick(0.3, 0.3)
    assert items(sent(hub, fresh)) == []  # nothing until the topic reappears
    hub.reset_channel("sensor/a", 1)
    hub.tick(0.4, 0.4)
    (snap,) = items(sent(hub, fresh))
    assert (snap["epoch"], snap["offset"], snap["resync"]) == ("e2", 1, "epoch_changed")


def test_topics_on_another_shard_keep_their_epoch_when_one_shard_changes() -> None:
    """A node on two Redis shards: each topic carries its shard's epoch (``epoch_of``);
    a new epoch of one shard resyncs only that shard's topics."""
    source = Dicts()
    hub = LiveHub(source, epoch="a1")
    epochs = {"lot": "a1", "sensor": "b1"}  # shard of each topic's first level
    hub.epoch_of = lambda topic: epochs[topic.split("/", 1)[0]]
    for topic in ("lot/x", "sensor/y"):
        source.views[topic] = {"v": 1}
        hub.reset_channel(topic, 10)
    client = hub.connect(JSON, now=0.0)
    hub.receive(client, json.dumps({"type": "subscribe", "topics": ["lot/+", "sensor/+"]}),
                0.0)
    hub.tick(0.0, 0.0)
    assert {i["topic"]: i["epoch"] for i in items(sent(hub, client))} == {
        "lot/x": "a1", "sensor/y": "b1"}
    # shard b loses its data
    epochs["sensor"] = "b2"
    hub.set_epoch("b2", lambda topic: topic.startswith("sensor/"))
    assert hub.epoch == "a1"  # hello's: shard a's
    hub.publish("lot/x", {"v": 2})
    hub.reset_channel("sensor/y", 1)
    hub.tick(0.1, 0.1)
    got = {i["topic"]: i for i in items(sent(hub, client))}
    assert (got["lot/x"]["type"], got["lot/x"]["epoch"], got["lot/x"]["from"]) == (
        "delta", "a1", 10)
    assert (got["sensor/y"]["type"], got["sensor/y"]["epoch"],
            got["sensor/y"]["resync"]) == ("snapshot", "b2", "epoch_changed")
    # resuming checks each topic against its own shard's epoch
    again = hub.connect(JSON, now=0.2)
    hub.receive(again, json.dumps({"type": "subscribe", "topics": ["lot/+", "sensor/+"],
                                   "resume": {"lot/x": ["a1", 10], "sensor/y": ["b1", 1]}}),
                0.2)
    hub.tick(0.3, 0.3)
    got = {i["topic"]: i for i in items(sent(hub, again))}
    assert got["lot/x"]["type"] == "delta" and "resync" not in got["lot/x"]
    assert got["sensor/y"]["resync"] == "epoch_changed"


def test_an_unavailable_node_says_so_refuses_subscriptions_and_sends_nothing() -> None:
    source = Dicts()
    hub = LiveHub(source, epoch="e1")
    source.views["sensor/a"] = {"v": 1}
    hub.reset_channel("sensor/a", 5)
    client = hub.connect(JSON, now=0.0)
    hub.receive(client, json.dumps({"type": "subscribe", "topics": ["sensor/+"]}), 0.0)
    hub.tick(0.0, 0.0)
    sent(hub, client)
    hub.set_unavailable("cluster_unavailable", "lost Redis", now=0.1)
    (status,) = sent(hub, client)
    assert status == {"type": "status", "code": "cluster_unavailable", "message": "lost Redis"}
    hub.receive(client, json.dumps({"type": "subscribe", "id": 7, "topics": ["lot/+"]}), 0.1)
    (error,) = sent(hub, client)
    assert (error["type"], error["code"], error["id"]) == ("error", "cluster_unavailable", 7)
    later = hub.connect(JSON, now=0.2)  # a newcomer is told at once, after hello
    assert [m["type"] for m in sent(hub, later)] == ["hello", "status"]
    hub.publish("sensor/a", {"v": 2})
    assert hub.tick(0.2, 0.2) == ([], [])
    hub.set_unavailable(None, now=0.3)
    assert sent(hub, client)[0]["code"] == "ok"
    hub.tick(0.3, 0.3)
    (delta,) = items(sent(hub, client))
    assert (delta["from"], delta["offset"]) == (5, 6)  # nothing lost meanwhile
