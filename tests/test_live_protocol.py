"""The /ws/live subscriber protocol, sans-IO: what each client is sent, tick by tick."""

from __future__ import annotations

import json
from typing import Any

import cbor2
import pytest

from edgegw.hub import topics
from edgegw.hub.fanout import (
    CBOR,
    CLOSE_TOO_SLOW,
    CONCAT_KEYS,
    EVENT_KEYS,
    JSON,
    Client,
    LiveConfig,
    LiveHub,
    coalesce,
    compose_deltas,
    pattern_error,
)
from edgegw.metrics import Metrics
from edgegw.topicfilter import matches as topic_matches


def apply_delta(state: dict[str, Any] | None, delta: dict[str, Any]) -> dict[str, Any]:
    """What a dashboard does with a delta (docs/live-topics.md): keys replace, except the
    list keys that add (dies, append) and events, which accumulate."""
    out = dict(state or {})
    for key, value in delta.items():
        if key in ("dies", "append", "event"):
            out[key] = [*out.get(key, []), *(value if key != "event" else [value])]
        else:
            out[key] = value
    return out


class DictState:
    """A minimal live state: topic -> dict, changed by the deltas it also publishes."""

    def __init__(self) -> None:
        self.state: dict[str, dict[str, Any]] = {}
        self.hub: LiveHub | None = None

    def change(self, topic: str, delta: dict[str, Any], ts: float | None = None) -> None:
        self.state[topic] = apply_delta(self.state.get(topic, {}), delta)
        assert self.hub is not None
        self.hub.publish(topic, delta, ts)

    def snapshot(self, topic: str) -> dict[str, Any] | None:
        return self.state.get(topic)

    def topics(self) -> list[str]:
        return list(self.state)


def make_hub(**config: Any) -> tuple[DictState, LiveHub]:
    state = DictState()
    hub = LiveHub(state, LiveConfig(**config), epoch="E1", metrics=Metrics())
    state.hub = hub
    return state, hub


class Viewer:
    """A client as a dashboard would be: it applies what it is sent and checks offsets."""

    def __init__(self, hub: LiveHub, encoding=CBOR) -> None:
        self.hub = hub
        self.client: Client = hub.connect(encoding, now=0.0, peer="test")
        self.views: dict[str, Any] = {}
        self.offsets: dict[str, int] = {}
        self.messages: list[dict[str, Any]] = []
        self.batches = 0

    def send(self, message: dict[str, Any], now: float = 0.0) -> None:
        data = cbor2.dumps(message) if self.client.encoding is CBOR else json.dumps(message)
        self.hub.receive(self.client, data, now)

    def drain(self, now: float = 0.0) -> list[dict[str, Any]]:
        got = []
        while (frame := self.hub.take_frame(self.client)) is not None:
            self.hub.frame_written(self.client, now)
            message = cbor2.loads(frame) if isinstance(frame, bytes) else json.loads(frame)
            got.append(message)
            if message["type"] == "batch":
                self.batches += 1
                for item in message["items"]:
                    self._apply(item)
        self.messages.extend(got)
        return got

    def _apply(self, item: dict[str, Any]) -> None:
        topic = item["topic"]
        if item["type"] == "snapshot":
            self.views[topic] = item["data"]
        else:
            assert self.offsets[topic] == item["from"], "a gap would be silent here"
            for patch in item["data"]:
                self.views[topic] = apply_delta(self.views[topic], patch)
        self.offsets[topic] = item["offset"]

    def items(self) -> list[dict[str, Any]]:
        return [i for m in self.messages if m["type"] == "batch" for i in m["items"]]


# --------------------------------------------------------------------------- merge rules


def test_hello_gives_the_merge_rules_which_agree_with_how_the_hub_composes_deltas() -> None:
    _, hub = make_hub()
    hello = Viewer(hub).drain()[0]
    assert hello["type"] == "hello"
    assert hello["merge"] == [dict(rule) for rule in topics.MERGE_RULES]
    by_op: dict[str, set[str]] = {}
    for rule in hello["merge"]:
        by_op.setdefault(rule["op"], set()).add(rule["key"])
    # list rows the client adds to are concatenated when the hub composes deltas; a
    # prepended event is an event of its own, never composed
    assert by_op["append"] | {"dies"} == CONCAT_KEYS
    assert by_op["prepend"] == EVENT_KEYS
    assert {r["keep"] for r in hello["merge"] if r["key"] == "event"} == {
        topics.GATEWAY_EVENTS}


# --------------------------------------------------------------------------- topics


@pytest.mark.parametrize(
    ("pattern", "topic", "expected"),
    [
        ("lot/+/wafer/+", "lot/L1/wafer/3", True),
        ("lot/+/wafer/+", "lot/L1", False),
        ("lot/+/wafer/+", "lot/L1/wafer/3/x", False),
        ("lot/+", "lot/L1", True),
        ("lot/+", "lot/L1/wafer/3", False),
        ("gateway/ate-07/#", "gateway/ate-07", True),  # '#' includes the parent level
        ("gateway/ate-07/#", "gateway/ate-07/uplink", True),
        ("gateway/ate-07/#", "gateway/ate-08", False),
        ("alert/#", "alert/P0/yield_low", True),
        ("#", "sensor/temp", True),
        ("+/+", "sensor/temp", True),
        ("sensor/temp", "sensor/temp", True),
        ("sensor/temp", "sensor/temp2", False),
    ],
)
def test_wildcards_match_like_mqtt(pattern: str, topic: str, expected: bool) -> None:
    assert topic_matches(pattern, topic) is expected


@pytest.mark.parametrize("pattern", ["", "lot/#/x", "lot/a#", "lot/+x", 7, "x" * 300])
def test_invalid_patterns_are_named(pattern: object) -> None:
    assert pattern_error(pattern) is not None


def test_composed_deltas_equal_applying_them_in_turn() -> None:
    target = {"good": 1, "dies": [[0, 0, 1, 1, True, 0]], "history": []}
    deltas = [{"good": 2, "dies": [[1, 0, 1, 1, True, 1]]}, {"status": "open"},
              {"good": 3, "dies": [[2, 0, 5, 20, False, 2]], "append": [[1.0, 2.0]]},
              {"event": {"kind": "connected"}}, {"event": {"kind": "disconnected"}},
              {"append": [[2.0, 3.0]]}]
    sequential = target
    for d in deltas:
        sequential = apply_delta(sequential, d)
    merged = coalesce(deltas)
    assert len(merged) == 2  # two events never merge into one
    composed = target
    for d in merged:
        composed = apply_delta(composed, d)
    assert composed == sequential
    assert merged[0]["dies"] == [[1, 0, 1, 1, True, 1], [2, 0, 5, 20, False, 2]]
    assert compose_deltas({"event": 1}, {"event": 2}) is None
    assert deltas[0] == {"good": 2, "dies": [[1, 0, 1, 1, True, 1]]}  # inputs untouched


# --------------------------------------------------------------------------- flow


def test_subscription_starts_with_a_snapshot_then_coalesced_deltas() -> None:
    state, hub = make_hub()
    state.change("lot/L1/wafer/1", {"dies": [[0, 0, 1, 1, True, 0]], "good": 1})
    state.change("lot/L1", {"parts": 1})
    viewer = Viewer(hub)
    viewer.send({"type": "subscribe", "id": 1, "topics": ["lot/+/wafer/+"]})
    hello, subscribed = viewer.drain()
    assert hello["type"] == "hello" and hello["epoch"] == "E1"
    assert subscribed == {"type": "subscribed", "id": 1, "topics": ["lot/+/wafer/+"],
                          "epoch": "E1"}

    hub.tick(0.05, 1000.0)
    [batch] = viewer.drain()
    [snap] = batch["items"]
    assert snap["type"] == "snapshot" and snap["topic"] == "lot/L1/wafer/1"
    assert snap["offset"] == 1 and snap["epoch"] == "E1" and "resync" not in snap

    for i in range(1, 50):
        state.change("lot/L1/wafer/1", {"dies": [[i, 0, 1, 1, True, i % 4]],
                                        "good": i + 1}, ts=999.0 + i / 100)
        state.change("lot/L1", {"parts": i + 1})  # not subscribed: never sent
    hub.tick(0.10, 1000.05)
    [batch] = viewer.drain()
    [delta] = batch["items"]
    assert delta["type"] == "delta" and delta["from"] == 1 and delta["offset"] == 50
    assert delta["n"] == 49 and len(delta["data"]) == 1  # 49 deltas, composed into one
    assert delta["ts"] == [999.01, 999.49]
    assert viewer.views["lot/L1/wafer/1"] == state.state["lot/L1/wafer/1"]
    assert "lot/L1" not in viewer.views

    hub.tick(0.15, 1000.10)  # nothing changed: nothing sent
    assert viewer.drain() == []


def test_a_channel_created_later_reaches_pattern_subscribers_with_a_snapshot() -> None:
    state, hub = make_hub()
    viewer = Viewer(hub)
    viewer.send({"type": "subscribe", "id": 1, "topics": ["gateway/ate-07/#", "alert/#"]})
    state.change("gateway/ate-07", {"online": True})
    state.change("gateway/ate-08", {"online": True})
    state.change("alert/P0/yield_low", {"event": {"state": "raised"}})
    hub.tick(0.05, 1.0)
    viewer.drain()
    assert set(viewer.views) == {"gateway/ate-07", "alert/P0/yield_low"}
    assert {i["type"] for i in viewer.items()} == {"snapshot"}
    assert viewer.views["gateway/ate-07"] == {"online": True}


def test_updates_are_batched_at_no_more_than_the_ui_rate() -> None:
    state, hub = make_hub(ui_rate=20.0)
    viewer = Viewer(hub)
    viewer.send({"type": "subscribe", "id": 1, "topics": ["#"]})
    # One simulated second: 10,000 deltas over 20 topics, the ticker firing at 20/s.
    ticks = 0
    for i in range(10_000):
        state.change(f"test/L1/{i % 20}", {"count": i, "mean": i / 2})
        if i % 500 == 499:
            ticks += 1
            hub.tick(ticks / 20, 1000 + ticks / 20)
            viewer.drain(ticks / 20)
    assert ticks == 20
    assert viewer.batches == 20  # one frame per tick, whatever the delta rate
    assert viewer.views == state.state
    deltas = [i for i in viewer.items() if i["type"] == "delta"]
    assert all(d["n"] == 25 and len(d["data"]) == 1 for d in deltas)


def test_a_shared_batch_is_encoded_once_for_all_clients_of_an_encoding() -> None:
    state, hub = make_hub()
    viewers = [Viewer(hub) for _ in range(50)] + [Viewer(hub, JSON) for _ in range(50)]
    for v in viewers:
        v.send({"type": "subscribe", "id": 1, "topics": ["sensor/+"]})
        v.drain()
    state.change("sensor/t1", {"v": 1.5})
    hub.tick(0.05, 1.0)
    state.change("sensor/t1", {"v": 2.5})
    frames_before = hub.metrics.counter("live_encodes_total").get(kind="frame")
    hub.tick(0.10, 1.05)
    frames = [v.client.queue[0][0] for v in viewers]
    assert len({id(f) for f in frames[:50]}) == 1  # the very same CBOR frame object
    assert len({id(f) for f in frames[50:]}) == 1  # and one JSON frame
    assert isinstance(frames[0], bytes) and isinstance(frames[50], str)
    assert hub.metrics.counter("live_encodes_total").get(kind="frame") - frames_before == 2
    assert hub.metrics.counter("live_encodes_total").get(kind="item") == 4  # 2 ticks x 2
    for v in viewers:
        v.drain()
        assert v.views == {"sensor/t1": {"v": 2.5}}


def test_json_clients_get_text_json_even_for_values_json_lacks() -> None:
    state, hub = make_hub()
    viewer = Viewer(hub, JSON)
    viewer.send({"type": "subscribe", "id": "a", "topics": ["test/#"]})
    state.change("test/L1/100", {"cpk": float("inf"), "mean": float("nan"), "n": 3})
    hub.tick(0.05, 1.0)
    viewer.drain()
    assert viewer.views["test/L1/100"] == {"cpk": None, "mean": None, "n": 3}


# --------------------------------------------------------------------------- resume


def _follow(hub: LiveHub, state: DictState, topics: list[str]) -> Viewer:
    viewer = Viewer(hub)
    viewer.send({"type": "subscribe", "id": 1, "topics": topics})
    hub.tick(0.0, 0.0)
    viewer.drain()
    return viewer


def test_resume_with_epoch_and_offset_gets_exactly_what_was_missed() -> None:
    state, hub = make_hub(history=100)
    for i in range(10):
        state.change("lot/L1", {"parts": i})
    first = _follow(hub, state, ["lot/+"])
    where = [hub.epoch, first.offsets["lot/L1"]]
    hub.disconnect(first.client)
    for i in range(10, 40):
        state.change("lot/L1", {"parts": i, f"k{i}": i})

    second = Viewer(hub)
    second.views = dict(first.views)
    second.offsets = dict(first.offsets)
    second.send({"type": "subscribe", "id": 2, "topics": ["lot/+"],
                 "resume": {"lot/L1": where}})
    hub.tick(1.0, 1.0)
    second.drain()
    [item] = second.items()
    assert item["type"] == "delta" and item["from"] == 10 and item["offset"] == 40
    assert item["n"] == 30
    assert second.views["lot/L1"] == state.state["lot/L1"]


def test_resume_beyond_history_or_from_another_epoch_is_told_to_resync() -> None:
    state, hub = make_hub(history=5)
    for i in range(3):
        state.change("lot/L1", {"parts": i})
        state.change("lot/L2", {"parts": i})
    for i in range(3, 20):
        state.change("lot/L1", {"parts": i})
    viewer = Viewer(hub)
    viewer.send({"type": "subscribe", "id": 1, "topics": ["lot/+"],
                 "resume": {"lot/L1": ["E1", 3], "lot/L2": ["E0", 3]}})
    hub.tick(0.05, 1.0)
    viewer.drain()
    items = {i["topic"]: i for i in viewer.items()}
    assert items["lot/L1"]["type"] == "snapshot"
    assert items["lot/L1"]["resync"] == "history_truncated"
    assert items["lot/L2"]["type"] == "snapshot" and items["lot/L2"]["resync"] == "epoch_changed"
    assert viewer.views == state.state
    assert hub.metrics.counter("live_resyncs_total").total() == 2


def test_a_resumed_topic_the_hub_has_only_later_is_never_sent_bare() -> None:
    """A cluster node may not have a topic a client resumes yet (its mirror loads it a
    moment later; after Redis lost its data the owner republishes it): the resume is kept
    until the topic appears.  Before, it was forgotten and the topic came as a snapshot
    with no ``resync`` over the view the client held -- a silent gap (seen in
    ``test_sigkill_three_nodes_during_a_run`` on a gateway's topic)."""
    state, hub = make_hub(history=100)
    viewer = Viewer(hub)
    viewer.views = {"lot/L1": {"parts": 3}, "lot/L2": {"parts": 2}}
    viewer.offsets = {"lot/L1": 3, "lot/L2": 2}
    viewer.send({"type": "subscribe", "id": 1, "topics": ["lot/+"],
                 "resume": {"lot/L1": ["E0", 3], "lot/L2": ["E1", 2]}})
    hub.tick(0.05, 1.0)
    assert [m["type"] for m in viewer.drain()] == ["hello", "subscribed"]
    for i in range(5):  # the topics appear
        state.change("lot/L1", {"parts": i})
        state.change("lot/L2", {"parts": i})
    hub.tick(0.10, 1.05)
    viewer.drain()
    items = {i["topic"]: i for i in viewer.items()}
    # another epoch: a snapshot, marked
    assert items["lot/L1"]["type"] == "snapshot"
    assert items["lot/L1"]["resync"] == "epoch_changed"
    # this epoch: the deltas after the offset it held, or a snapshot marked resync (here
    # the channel was new, its offsets below the one resumed: "offset_ahead")
    l2 = items["lot/L2"]
    assert (l2["type"] == "delta" and l2["from"] == 2) or l2.get("resync"), l2
    assert viewer.views == state.state


def test_resume_at_the_current_offset_sends_nothing() -> None:
    state, hub = make_hub()
    state.change("sensor/t1", {"v": 1})
    viewer = Viewer(hub)
    viewer.send({"type": "subscribe", "id": 1, "topics": ["sensor/t1"],
                 "resume": {"sensor/t1": ["E1", 1]}})
    hub.tick(0.05, 1.0)
    assert [m["type"] for m in viewer.drain()] == ["hello", "subscribed"]
    state.change("sensor/t1", {"v": 2})
    viewer.views["sensor/t1"] = {"v": 1}
    viewer.offsets["sensor/t1"] = 1
    hub.tick(0.10, 1.05)
    viewer.drain()
    assert viewer.views["sensor/t1"] == {"v": 2}


# --------------------------------------------------------------------------- slow clients


def test_a_slow_alert_subscriber_is_closed_too_slow_and_others_keep_their_rate() -> None:
    state, hub = make_hub(queue_frames=8)
    slow = Viewer(hub)
    fast = Viewer(hub)
    for v in (slow, fast):
        v.send({"type": "subscribe", "id": 1, "topics": ["alert/#", "sensor/+"]})
    slow.drain()
    closed: list[Client] = []
    for t in range(1, 21):
        state.change("alert/P1/sensor_range", {"event": {"n": t, "state": "raised"}})
        woken, to_close = hub.tick(t / 20, t / 20)
        closed += to_close
        fast.drain(t / 20)
        assert fast.client in woken or fast.client.closed is False
    assert closed == [slow.client]
    assert slow.client.close_code == CLOSE_TOO_SLOW
    assert fast.batches == 20 and fast.client.queue_depth == 0
    assert fast.views == state.state


def test_a_slow_state_only_subscriber_gets_the_latest_state_instead() -> None:
    state, hub = make_hub(queue_frames=4)
    slow = Viewer(hub)
    slow.send({"type": "subscribe", "id": 1, "topics": ["sensor/+"]})
    slow.drain()
    closed = []
    for t in range(1, 11):
        state.change("sensor/t1", {"v": t})
        closed += hub.tick(t / 20, t / 20)[1]
    assert closed == []
    assert slow.client.updates_dropped >= 4
    assert hub.stats()["clients"][0]["queue_depth"] <= 4
    slow.drain(0.6)
    state.change("sensor/t1", {"v": 11})
    hub.tick(0.65, 0.65)
    slow.drain(0.65)
    resyncs = [i for i in slow.items() if i.get("resync") == "lagging"]
    assert resyncs and resyncs[0]["type"] == "snapshot"
    assert slow.views == state.state


def test_items_sent_counts_the_items_of_frames_written_not_of_frames_conflated() -> None:
    """``items_sent`` (per client, ``/api/stats`` ``live.clients``) is what reached the
    socket: the items of update frames its sender wrote.  Frames dropped from a slow
    client's queue (conflated) and items that could not be encoded (left out of their
    batch) are not counted.  Before, every item put in a batch counted when queued."""
    state, hub = make_hub(queue_frames=4)
    slow = Viewer(hub, JSON)
    slow.send({"type": "subscribe", "id": 1, "topics": ["sensor/+"]})
    slow.drain()
    for t in range(1, 11):  # 10 ticks of 2 topics; it reads none of them
        state.change("sensor/t1", {"v": t})
        state.change("sensor/t2", {"v": t})
        hub.tick(t / 20, t / 20)
    assert slow.client.updates_dropped >= 4 and slow.client.items_sent == 0
    slow.drain(0.6)
    for t in range(11, 13):  # caught up: snapshots, then deltas; one JSON cannot write
        state.change("sensor/t1", {"v": t})
        state.change("sensor/t2", {"v": 2**20000 if t == 12 else t})
        hub.tick(t / 20, t / 20)
        slow.drain(t / 20)
    written = len(slow.items())
    assert written == slow.client.items_sent == hub.stats()["clients"][0]["items_sent"]
    assert written == 3  # t1's and t2's snapshots, t1's delta (t2's could not be encoded)


def test_a_stalled_client_is_closed_after_the_stall_timeout() -> None:
    state, hub = make_hub(stall_timeout=2.0, queue_frames=1000)
    viewer = Viewer(hub)
    viewer.send({"type": "subscribe", "id": 1, "topics": ["sensor/+"]})
    hub.take_frame(viewer.client)  # its sender starts writing 'hello' and never finishes
    closed = []
    for t in range(1, 60):
        state.change("sensor/t1", {"v": t})
        closed += hub.tick(t / 20, t / 20)[1]
    assert closed == [viewer.client]
    assert viewer.client.close_code == CLOSE_TOO_SLOW


# --------------------------------------------------------------------------- messages


def test_bad_messages_get_a_specific_error_and_the_connection_goes_on() -> None:
    _state, hub = make_hub()
    viewer = Viewer(hub)
    viewer.drain()
    hub.receive(viewer.client, b"\xff\x00garbage", 0.0)
    viewer.send({"type": "subscribe", "id": 2, "topics": ["lot/#/wafer"]})
    viewer.send({"type": "subscribe", "id": 3})
    viewer.send({"type": "subscribe", "id": 4, "topics": ["x"], "resume": {"x": ["E1", -1]}})
    viewer.send({"type": "dance", "id": 5})
    viewer.send({"type": "ack", "id": 6, "alert": "a1"})
    viewer.send({"type": "ping", "id": 7})
    replies = viewer.drain()
    assert [(r["type"], r.get("code")) for r in replies] == [
        ("error", "bad_message"), ("error", "bad_topics"), ("error", "bad_topics"),
        ("error", "bad_resume"), ("error", "unknown_type"), ("error", "ack_unavailable"),
        ("pong", None),
    ]
    assert [r["id"] for r in replies[1:]] == [2, 3, 4, 5, 6, 7]
    assert hub.metrics.counter("live_bad_messages_total").total() == 6


def test_json_escapes_that_make_no_unicode_text_are_a_bad_message_not_an_internal_error(
) -> None:
    """``\\udce9`` in JSON is valid JSON and no Unicode: the hub could neither echo the
    topic nor log or encode it, and counted an internal error per message.  A pair of
    escapes that makes one character is text like any other."""
    from edgegw.metrics import internal_errors

    _state, hub = make_hub()
    viewer = Viewer(hub)
    viewer.drain()
    for bad in ['{"type": "subscribe", "id": 1, "topics": ["lot/\\udce9/#"]}',
                '{"type": "subscribe", "id": "\\ud800", "topics": ["gateways"]}',
                '{"type": "\\udce9"}']:
        hub.receive(viewer.client, bad, 0.0)
    hub.receive(viewer.client, '{"type": "ping", "id": "\\ud83d\\ude00"}', 0.0)
    replies = viewer.drain()
    assert [(r["type"], r.get("code")) for r in replies] == [("error", "bad_message")] * 3 + [
        ("pong", None)]
    assert "lone surrogate" in replies[0]["message"] and replies[3]["id"] == "\U0001f600"
    assert hub.metrics.counter("live_bad_messages_total").total() == 3
    assert internal_errors(hub.metrics).total() == 0


def test_acknowledgements_go_to_the_alert_owner() -> None:
    acked: list[tuple[str, str]] = []

    def on_ack(alert: str, user: str) -> None:
        if alert != "A-17":
            raise KeyError(f"no alert {alert}")
        acked.append((alert, user))

    hub = LiveHub(DictState(), epoch="E1", on_ack=on_ack)
    viewer = Viewer(hub, JSON)
    viewer.send({"type": "ack", "id": 1, "alert": "A-17", "by": "maria"})
    viewer.send({"type": "ack", "id": 2, "alert": "A-99", "by": "maria"})
    _, ok, err = viewer.drain()
    assert acked == [("A-17", "maria")]
    assert ok == {"type": "acked", "id": 1, "alert": "A-17", "by": "maria"}
    assert err["type"] == "error" and err["code"] == "ack_failed" and "A-99" in err["message"]


def test_unsubscribe_stops_updates() -> None:
    state, hub = make_hub()
    viewer = _follow(hub, state, ["sensor/+", "lot/+"])
    state.change("sensor/t1", {"v": 1})
    state.change("lot/L1", {"parts": 1})
    hub.tick(0.05, 1.0)
    viewer.drain()
    viewer.send({"type": "unsubscribe", "id": 9, "topics": ["sensor/+"]})
    state.change("sensor/t1", {"v": 2})
    state.change("lot/L1", {"parts": 2})
    hub.tick(0.10, 1.05)
    replies = viewer.drain()
    assert replies[0]["type"] == "unsubscribed"
    assert [i["topic"] for i in replies[1]["items"]] == ["lot/L1"]
    assert hub.channels["sensor/t1"].subscribers == set()


def test_history_is_bounded_by_rows_as_well_as_by_deltas() -> None:
    state, hub = make_hub(history=1000, history_rows=300)
    state.change("lot/L1/wafer/1", {"good": 0})
    viewer = _follow(hub, state, ["lot/+/wafer/+"])
    where = ["E1", viewer.offsets["lot/L1/wafer/1"]]
    for i in range(10):  # 10 deltas of 50 dies: 510 rows, more than the history keeps
        state.change("lot/L1/wafer/1", {"dies": [[i, j, 1, 1, True, 0] for j in range(50)]})
    hub.tick(0.5, 0.5)  # the first viewer gets them; the tick's own batch is gone
    channel = hub.channels["lot/L1/wafer/1"]
    assert channel.rows <= 300 and len(channel.history) == 5
    late = Viewer(hub)
    late.send({"type": "subscribe", "id": 1, "topics": ["lot/+/wafer/+"],
               "resume": {"lot/L1/wafer/1": where}})
    hub.tick(1.0, 1.0)
    late.drain()
    [item] = late.items()
    assert item["type"] == "snapshot" and item["resync"] == "history_truncated"
    assert len(late.views["lot/L1/wafer/1"]["dies"]) == 500


def test_coalescing_many_deltas_keeps_every_row_and_leaves_the_inputs_alone() -> None:
    deltas = [{"dies": [[i, 0, 1, 1, True, 0]], "good": i} for i in range(2000)]
    [merged] = coalesce(deltas)
    assert len(merged["dies"]) == 2000 and merged["good"] == 1999
    assert all(len(d["dies"]) == 1 for d in deltas)


def test_channels_of_topics_the_state_dropped_are_swept_and_offsets_never_reused() -> None:
    state, hub = make_hub()
    for i in range(5):
        state.change("lot/OLD/wafer/1", {"good": i})
    viewer = _follow(hub, state, ["lot/+/wafer/+"])
    where = ["E1", viewer.offsets["lot/OLD/wafer/1"]]
    hub.disconnect(viewer.client)
    del state.state["lot/OLD/wafer/1"]  # evicted by the live state
    assert hub.sweep() == 1 and "lot/OLD/wafer/1" not in hub.channels
    # The topic comes back, its state afresh: its offsets continue past the old ones with
    # a gap, so no delta can be applied on top of the old state.
    state.change("lot/OLD/wafer/1", {"good": 100})
    assert hub.channels["lot/OLD/wafer/1"].offset == 7
    late = Viewer(hub)
    late.send({"type": "subscribe", "id": 1, "topics": ["lot/+/wafer/+"],
               "resume": {"lot/OLD/wafer/1": where}})
    hub.tick(1.0, 1.0)
    late.drain()
    [item] = late.items()
    assert item["type"] == "snapshot" and item["resync"] == "history_truncated"
    assert late.views["lot/OLD/wafer/1"] == {"good": 100}


def test_swept_topics_are_remembered_boundedly_and_a_forgotten_one_never_reuses_offsets(
        monkeypatch: Any) -> None:
    """Months of lots come and go: the offsets of swept channels are not kept forever,
    and a topic whose tombstone was forgotten still starts past every offset it had."""
    monkeypatch.setattr("edgegw.hub.fanout.core.MAX_TOMBSTONES", 3)
    state, hub = make_hub()
    reached = {}
    for n in range(6):
        for i in range(n + 5):
            state.change(f"lot/L{n}", {"parts": i})
        reached[n] = hub.channels[f"lot/L{n}"].offset
        del state.state[f"lot/L{n}"]
        hub.tick(float(n), float(n))
        assert hub.sweep() == 1
    assert len(hub._tombstones) == 3
    state.change("lot/L0", {"parts": 100})  # forgotten
    state.change("lot/L5", {"parts": 100})  # remembered: one offset skipped, as before
    assert hub.channels["lot/L0"].offset > reached[0] + 1
    assert hub.channels["lot/L5"].offset == reached[5] + 2


def test_a_client_that_never_reads_its_replies_is_closed_too_slow() -> None:
    _state, hub = make_hub(queue_frames=4)
    viewer = Viewer(hub)
    for i in range(20):
        viewer.send({"type": "ping", "id": i})
    assert viewer.client.closed and viewer.client.close_code == CLOSE_TOO_SLOW
    assert viewer.client.close_reason == "too many unread replies"
    assert viewer.client.queue_depth == 0  # dropped with the client


def test_big_snapshots_are_spread_over_ticks_and_deltas_keep_flowing() -> None:
    state, hub = make_hub(snapshot_rows_per_tick=2500)
    for w in range(10):
        state.change(f"lot/L1/wafer/{w}", {"dies": [[x, 0, 1, 1, True, 0] for x in range(1000)]})
    viewer = Viewer(hub)
    viewer.send({"type": "subscribe", "id": 1, "topics": ["lot/+/wafer/+"]})
    per_tick = []
    for t in range(1, 8):
        state.change("lot/L1/wafer/0", {"good": t})  # a live change on the first wafer
        hub.tick(t / 20, t / 20)
        before = len(viewer.items())
        viewer.drain()
        per_tick.append(len(viewer.items()) - before)
    # 3 wafer maps (3,000 rows) per tick at most, the rest on the following ticks; from
    # the second tick on, the first wafer's delta comes along ...
    assert per_tick == [3, 4, 4, 2, 1, 1, 1]
    # ... and the first wafer's deltas went on meanwhile: nothing is missing or stale.
    assert viewer.views == state.state


def test_a_stuck_client_costs_no_snapshot_work_until_its_write_completes() -> None:
    # Issue 6: a client that subscribes to every wafer map and never reads must not make
    # the hub build (and encode) its snapshots again and again while it is stuck.
    state, hub = make_hub(queue_frames=4)
    built: list[str] = []
    real_snapshot = state.snapshot

    def counting_snapshot(topic: str) -> dict[str, Any] | None:
        built.append(topic)
        return real_snapshot(topic)

    state.snapshot = counting_snapshot  # type: ignore[method-assign]
    for w in range(5):
        state.change(f"lot/L1/wafer/{w}", {"dies": [[x, 0, 1, 1, True, 0] for x in range(100)]})
    stuck = Viewer(hub)
    stuck.send({"type": "subscribe", "id": 1, "topics": ["lot/+/wafer/+"]})
    hub.tick(0.05, 0.05)
    assert len(built) == 5  # its first snapshots, once
    hub.take_frame(stuck.client)  # its sender starts writing 'hello' and never finishes
    built.clear()
    for t in range(2, 200):
        state.change(f"lot/L1/wafer/{t % 5}", {"good": t})
        hub.tick(t / 20, t / 20)
        assert stuck.client.queue_depth <= 4 + 1  # bounded: at most queue_frames updates
    assert stuck.client.lagging and stuck.client.updates_dropped > 0
    assert built == []  # conflated once, then nothing is built for it while it is stuck
    # Its write completes: it drains, then gets the latest state of each map, once.
    hub.frame_written(stuck.client, 10.0)
    stuck.drain(10.0)
    hub.tick(10.05, 10.05)
    stuck.drain(10.05)
    assert sorted(built) == [f"lot/L1/wafer/{w}" for w in range(5)]
    assert {i["topic"] for i in stuck.items() if i.get("resync") == "lagging"} == set(state.state)
    assert stuck.views == state.state


# --------------------------------------------------------------------------- grouped ticks


@pytest.mark.parametrize("seed", range(6))
def test_grouping_clients_in_step_sends_exactly_what_working_each_out_alone_sends(
        seed: int) -> None:
    """The tick's shortcut for clients in step (``LiveHub.group_in_step``) changes the
    cost, never the frames: two hubs fed the same changes and the same client behaviour --
    subscribing late, resuming, unsubscribing, reading slowly or not at all -- queue the
    same bytes for every client, tick after tick."""
    import random

    rng = random.Random(seed)
    hubs = []
    for grouped in (True, False):
        state, hub = make_hub(queue_frames=4, history=8, stall_timeout=1e9)
        hub.group_in_step = grouped
        hubs.append((state, hub, []))
    topics_ = [f"lot/L{n}" for n in range(3)] + [f"lot/L{n}/wafer/W{w}" for n in range(3)
                                                   for w in range(2)] + ["alert/x"]
    patterns = [["lot/+"], ["lot/+", "lot/+/wafer/+"], ["lot/L1/#"], ["#"]]
    now = 0.0
    for step in range(120):
        now += 0.05
        action = rng.random()
        changes = [(rng.choice(topics_), {"n": step, "dies": [[step, rng.randrange(9)]]})
                   for _ in range(rng.randrange(5))]
        new_client = action < 0.1 or step == 0
        who = rng.randrange(64)
        pats = rng.choice(patterns)
        for state, hub, viewers in hubs:
            for topic, delta in changes:
                state.change(topic, dict(delta))
            if new_client:
                viewers.append(Viewer(hub))
                viewers[-1].send({"type": "subscribe", "id": 1, "topics": pats}, now)
            elif action < 0.15 and viewers:
                viewer = viewers[who % len(viewers)]
                resume = {t: ["E1", off] for t, off in viewer.offsets.items()}
                viewer.send({"type": "subscribe", "id": 2, "topics": pats,
                             "resume": resume}, now)
            elif action < 0.18 and viewers:
                viewers[who % len(viewers)].send({"type": "unsubscribe", "id": 3,
                                                  "topics": pats}, now)
            hub.tick(now, 1000.0 + now)
        grouped_hub, alone_hub = hubs[0][2], hubs[1][2]
        assert len(grouped_hub) == len(alone_hub)
        for i, (a, b) in enumerate(zip(grouped_hub, alone_hub, strict=True)):
            assert [f for f, _ in a.client.queue] == [f for f, _ in b.client.queue], (step, i)
            assert a.client.positions == b.client.positions
            assert (a.client.closed, a.client.lagging) == (b.client.closed, b.client.lagging)
            if i % 3 != 2 or step % 7 == 0:  # every third client reads only now and then
                a.drain(now)
                b.drain(now)
    # the slow readers were conflated or closed along the way, the same in both
    assert hubs[0][1]._m_slow.values == hubs[1][1]._m_slow.values


# A stall is measured while the hub can write.  A hub that is itself stopped (SIGSTOP, a
# frozen VM, a long GC pause) writes nothing: its clients' frames in flight make no
# progress, through no fault of theirs (docs/live-protocol.md, "Slow clients").


def test_a_pause_of_the_hub_itself_is_no_stall_of_a_client_with_a_frame_in_flight() -> None:
    """Before, the first tick after the hub woke from a pause longer than the stall
    timeout closed every client whose frame was in flight when it stopped (4008)."""
    state, hub = make_hub(stall_timeout=2.0, queue_frames=1000)
    viewer = Viewer(hub)
    viewer.send({"type": "subscribe", "id": 1, "topics": ["sensor/+"]})
    hub.take_frame(viewer.client)  # its sender is writing 'hello' when the hub stops
    state.change("sensor/t1", {"v": 1})
    assert hub.tick(0.05, 0.05)[1] == []
    state.change("sensor/t1", {"v": 2})
    assert hub.tick(10.0, 10.0)[1] == []  # the next tick: the hub woke 10 s later
    hub.frame_written(viewer.client, 10.01)  # ... and its sender finished the write
    viewer.drain(10.01)
    for t in range(1, 60):  # then on, on time
        state.change("sensor/t1", {"v": 2 + t})
        assert hub.tick(10.0 + t / 20, 10.0 + t / 20)[1] == []
        viewer.drain(10.0 + t / 20)
    assert not viewer.client.closed
    assert viewer.views == state.state


def test_a_client_stalled_on_both_sides_of_a_pause_of_the_hub_is_closed_on_its_stall_time(
        ) -> None:
    """1.5 s without progress before the hub stopped, 0.5 s after it woke: the 2 s of
    stall timeout, counted while the hub could write, closes it."""
    state, hub = make_hub(stall_timeout=2.0, queue_frames=1000)
    viewer = Viewer(hub)
    viewer.send({"type": "subscribe", "id": 1, "topics": ["sensor/+"]})
    hub.take_frame(viewer.client)  # its sender starts writing 'hello' and never finishes
    ticks = [t / 20 for t in range(1, 31)] + [11.5 + t / 20 for t in range(1, 40)]
    closed_at = []
    for t in ticks:  # on time to 1.5 s; the hub stopped from 1.5 s to 11.5 s; on time again
        state.change("sensor/t1", {"v": t})
        if hub.tick(t, t)[1]:
            closed_at.append(t)
    # 1.5 s before, and after the wake (the tick at 11.55) 0.55 s: over the 2 s at 12.1
    assert closed_at == [pytest.approx(12.1)]
    assert viewer.client.close_code == CLOSE_TOO_SLOW


def test_a_client_that_became_busy_during_a_pause_is_closed_on_its_stall_time() -> None:
    """Its frame went in flight 1 s before the tick that found the 10 s gap: the
    discount takes that second (the hub may have been stopped), not the whole gap --
    which put its stall clock 9 s ahead of the hub's and closed it at 21 s, not 12."""
    state, hub = make_hub(stall_timeout=2.0, queue_frames=1000)
    viewer = Viewer(hub)
    viewer.send({"type": "subscribe", "id": 1, "topics": ["sensor/+"]})
    viewer.drain(0.0)
    state.change("sensor/t1", {"v": 0})
    assert hub.tick(0.05, 0.05)[1] == []
    viewer.drain(0.05)
    viewer.send({"type": "ping", "id": 2}, 9.0)  # the reply, written at 9 s, never finishes
    assert hub.take_frame(viewer.client) is not None
    closed_at = []
    for t in [10.0 + i / 20 for i in range(0, 80)]:  # the first tick after the gap, on time on
        state.change("sensor/t1", {"v": t})
        if hub.tick(t, t)[1]:
            closed_at.append(t)
    assert closed_at == [pytest.approx(12.05)]
    assert viewer.client.close_reason == "stalled"
