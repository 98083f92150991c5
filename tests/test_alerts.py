"""Alert rules, de-duplication, acknowledgement and escalation, fed the way the hub feeds them:
records into LiveState, which drives the engine; time passed in."""

from __future__ import annotations

import dataclasses
import random
from typing import Any

import pytest

from edgegw.config import ConfigError, build, read_toml
from edgegw.hub import topics
from edgegw.hub.alerts import AlertEngine, AlertRuleConfig, AlertsConfig
from edgegw.hub.live import LiveState
from edgegw.records import (
    GatewayEvent,
    ParametricResult,
    PartResult,
    SensorReading,
    SensorWindow,
    WaferEnd,
)

LOT = "L7"


class Bus:
    """Collects what LiveState and the engine publish, and what reaches the sink."""

    def __init__(self) -> None:
        self.published: list[tuple[str, dict[str, Any]]] = []
        self.events: list[dict[str, Any]] = []

    def publish(self, topic: str, delta: dict[str, Any]) -> None:
        self.published.append((topic, delta))

    def sink(self, event: dict[str, Any]) -> None:
        self.events.append(event)

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["event"] == kind]


def make(*rules: AlertRuleConfig, **kw: Any) -> tuple[LiveState, AlertEngine, Bus]:
    bus = Bus()
    engine = AlertEngine(AlertsConfig(rules=list(rules), **kw), bus.publish, sink=bus.sink)
    state = LiveState(bus.publish, alerts=engine, clock=lambda: 0.0)
    return state, engine, bus


class Feeder:
    def __init__(self, state: LiveState, gateway: str = "gw1") -> None:
        self.state = state
        self.gateway = gateway
        self.rid = 1

    def __call__(self, records: list[Any], now: float) -> None:
        self.state.on_records(self.gateway, self.rid, records, now=now)
        self.rid += len(records)


def part(i: int, hb: int, *, site: int = 0, wafer: str = "W1", ts: float = 1000.0,
         lot: str = LOT, y: int = 0) -> PartResult:
    return PartResult("t", ts, lot, wafer, 1, site, str(i), i, y, hb, hb, hb == 1)


def test_wafer_yield_alert_waits_for_min_parts_and_is_deduplicated_in_its_window() -> None:
    rule = AlertRuleConfig(name="wafer-yield", kind="wafer_yield", priority="P1",
                           threshold=0.8, min_parts=10)
    state, engine, bus = make(rule)
    feed = Feeder(state)
    feed([part(i, 1 if i % 2 else 7, ts=1000.0 + i) for i in range(9)], now=5000.0)
    assert bus.events == []  # 44% yield, but only 9 dies
    feed([part(9, 7, ts=1009.0)], now=5001.0)
    (raised,) = bus.of("raised")
    alert = raised["alert"]
    assert alert["rule"] == "wafer-yield" and alert["priority"] == "P1"
    assert alert["value"] == pytest.approx(0.4) and alert["threshold"] == 0.8
    assert alert["context"] == {"lot_id": LOT, "wafer_id": "W1", "dies": 10}
    assert alert["raised_at"] == 1009.0 and alert["notified_at"] == 5001.0
    assert "yield 40.0% below 80.0%" in alert["message"]
    assert ("alert/P1/wafer-yield", raised) in bus.published

    # still low four minutes later (record time): the same key, suppressed
    feed([part(10, 7, ts=1009.0 + 240)], now=5250.0)
    assert len(bus.of("raised")) == 1
    assert engine.alerts[alert["id"]].occurrences == 2
    # past the 5-minute window: raised again, as a new alert
    feed([part(11, 7, ts=1009.0 + 301)], now=5400.0)
    assert len(bus.of("raised")) == 2
    snap = state.snapshot(topics.alert("P1", "wafer-yield"))
    assert snap is not None and [a["raised_at"] for a in snap["alerts"]] == [1310.0, 1009.0]
    assert topics.alert("P1", "wafer-yield") in state.topics()


def test_consecutive_fails_on_one_site_while_other_sites_pass() -> None:
    rule = AlertRuleConfig(name="site-run", kind="consecutive_fails", priority="P0", count=5)
    state, _, bus = make(rule)
    feed = Feeder(state)
    touchdowns = []
    for i in range(7):  # site 2 fails from the 2nd touchdown on; site 1 always passes
        touchdowns.append([part(10 * i, 1, site=1, ts=100.0 + i),
                           part(10 * i + 1, 1 if i == 0 else 5, site=2, ts=100.0 + i)])
    for td in touchdowns[:5]:
        feed(td, now=1.0)
    assert bus.events == []  # 4 fails in a row so far
    feed(touchdowns[5], now=2.0)
    (raised,) = bus.of("raised")
    assert raised["alert"]["context"]["site"] == 2 and raised["alert"]["value"] == 5
    feed(touchdowns[6], now=3.0)
    assert len(bus.of("raised")) == 1  # the 6th is the same problem (de-duplicated)
    # a pass resets the run: four more fails are not five
    feed([part(99, 1, site=2, ts=200.0)] + [part(100 + i, 5, site=2, ts=201.0 + i)
                                            for i in range(4)], now=4.0)
    assert len(bus.of("raised")) == 1


def test_site_to_site_yield_gap() -> None:
    rule = AlertRuleConfig(name="site-gap", kind="site_yield_gap", threshold=0.2, min_parts=20)
    state, _, bus = make(rule)
    feed = Feeder(state)
    rng = random.Random(3)
    recs = []
    for i in range(20):
        recs.append(part(2 * i, 1, site=0, ts=100.0 + i))  # site 0: 100%
        recs.append(part(2 * i + 1, 1 if rng.random() < 0.6 else 4, site=1, ts=100.0 + i))
    feed(recs[:38], now=1.0)
    assert bus.events == []  # site 1 has only 19 dies
    feed(recs[38:], now=2.0)
    (raised,) = bus.of("raised")
    ctx = raised["alert"]["context"]
    assert (ctx["worst_site"], ctx["best_site"]) == (1, 0)
    assert raised["alert"]["value"] == pytest.approx(1 - ctx["site_yields"]["1"])


def test_site_yield_gap_between_the_same_site_of_two_heads() -> None:
    # a dual-head prober's wafer: head 2's site 0 fails every die, head 1's none (before:
    # one site "0" at 50 %, no gap to see)
    rule = AlertRuleConfig(name="site-gap", kind="site_yield_gap", threshold=0.2, min_parts=5)
    state, _, bus = make(rule)
    head = [PartResult("t", 100.0 + i, LOT, "W1", 1 + i % 2, 0, str(i), i, 0, 1 + i % 2 * 3,
                       1, i % 2 == 0) for i in range(10)]
    Feeder(state)(head, now=1.0)
    (raised,) = bus.of("raised")
    ctx = raised["alert"]["context"]
    assert (ctx["worst_site"], ctx["best_site"]) == ("2/0", "1/0")
    assert ctx["site_yields"] == {"1/0": 1.0, "2/0": 0.0}
    assert "site 2/0 yield 0.0% is 100.0% below site 1/0" in raised["alert"]["message"]


def test_bin_share_against_recent_wafers_statistical_limit() -> None:
    rule = AlertRuleConfig(name="bin-sbl", kind="bin_share", priority="P1", k=3.0,
                           min_parts=100, min_wafers=3, recent_wafers=5)
    state, _, bus = make(rule)
    feed = Feeder(state)
    ts = 1000.0
    # five normal wafers: bin 4 at 3-5 %
    for w, fails in enumerate([3, 4, 5, 4, 3]):
        wafer = f"W{w}"
        feed([part(i, 4 if i < fails else 1, wafer=wafer, ts=ts) for i in range(100)], now=1.0)
        feed([WaferEnd("t", ts, LOT, wafer, 1, 0, 100, 100 - fails)], now=1.0)
        ts += 100
    assert bus.events == []
    # mean 3.8 %, sigma 0.84 %: the limit is about 6.3 %; 9 % trips it
    feed([part(i, 4 if i < 9 else 1, wafer="W9", ts=ts) for i in range(100)], now=2.0)
    (raised,) = bus.of("raised")
    assert raised["alert"]["context"]["bin"] == 4
    assert raised["alert"]["threshold"] == pytest.approx(0.038 + 3 * 0.008367, abs=1e-4)
    assert raised["alert"]["value"] == pytest.approx(0.09)


def test_bin_share_fixed_limit_needs_no_history() -> None:
    rule = AlertRuleConfig(name="bin-fixed", kind="bin_share", threshold=0.05, bins=[6],
                           min_parts=50)
    state, _, bus = make(rule)
    Feeder(state)([part(i, 6 if i % 10 == 0 else 4 if i % 3 == 0 else 1) for i in range(60)],
                  now=1.0)
    (raised,) = bus.of("raised")  # bin 6 at 10 %; bin 4 not watched
    assert raised["alert"]["context"]["bin"] == 6


def test_test_cpk_below_limit_after_min_samples() -> None:
    rule = AlertRuleConfig(name="cpk", kind="test_cpk", priority="P2", threshold=1.33,
                           test_num=100, min_samples=30)
    state, _, bus = make(rule)
    feed = Feeder(state)
    rng = random.Random(5)

    def ptr(i: int, test_num: int, mean: float) -> ParametricResult:
        v = rng.gauss(mean, 1.0)
        return ParametricResult("t", 100.0 + i, LOT, 1, 0, str(i), test_num, "IDD", v, 0.0,
                                20.0, "mA", 0.0 <= v <= 20.0)

    feed([ptr(i, 100, 10.0) for i in range(40)], now=1.0)  # Cpk about 3.3
    feed([ptr(i, 200, 18.0) for i in range(40)], now=1.0)  # low Cpk, but another test
    assert bus.events == []
    feed([ptr(100 + i, 100, 17.5) for i in range(200)], now=2.0)  # drifts towards the limit
    (raised,) = bus.of("raised")
    assert raised["alert"]["context"]["test_num"] == 100
    assert raised["alert"]["value"] < 1.33


def test_sensor_outside_its_range() -> None:
    rule = AlertRuleConfig(name="temp", kind="sensor_range", priority="P1",
                           channel="handler/*/temp", low=15.0, high=35.0)
    state, _, bus = make(rule)
    feed = Feeder(state)
    feed([SensorWindow("mqtt", 10.0, "handler/1/temp", 30.0, 28.0, 31.0, 29.0, 5, 9.0, 10.0,
                       "degC"),
          SensorReading("mqtt", 11.0, "handler/1/humidity", 99.0, "%")], now=1.0)
    assert bus.events == []
    feed([SensorWindow("mqtt", 20.0, "handler/1/temp", 30.0, 28.0, 36.5, 32.0, 5, 19.0, 20.0,
                       "degC")], now=2.0)
    (raised,) = bus.of("raised")
    assert raised["alert"]["value"] == 36.5 and "above 35" in raised["alert"]["message"]


def test_gateway_offline_longer_than_its_limit() -> None:
    rule = AlertRuleConfig(name="gw-down", kind="gateway_offline", priority="P1", offline_s=60)
    state, _, bus = make(rule)
    state.on_gateway("ate-1", True, 0.0)
    state.on_gateway("ate-1", False, 100.0)
    state.tick(150.0)
    state.on_gateway("ate-1", True, 155.0)  # back in time: no alert
    state.tick(300.0)
    assert bus.events == []
    state.on_gateway("ate-1", False, 400.0)
    state.tick(459.0)
    assert bus.events == []
    state.tick(460.0)
    state.tick(461.0)
    (raised,) = bus.of("raised")
    assert raised["alert"]["context"] == {"gateway_id": "ate-1", "offline_since": 400.0}


def test_gateway_known_only_from_replayed_records_counts_as_offline() -> None:
    rule = AlertRuleConfig(name="gw-down", kind="gateway_offline", offline_s=30)
    state, _, bus = make(rule)
    Feeder(state, "ate-9")([part(0, 1)], now=10.0)  # replay after a restart
    state.tick(11.0)
    state.tick(42.0)
    assert [e["alert"]["context"]["gateway_id"] for e in bus.of("raised")] == ["ate-9"]


def event(ts: float, code: str, level: str = "error", message: str = "m") -> GatewayEvent:
    return GatewayEvent("gateway", ts, level, code, message, None)


def test_what_a_gateway_reports_at_the_rules_level_or_above_is_an_alert() -> None:
    """A source that failed, frames dropped at a full store, a state restored from a
    copy: the gateway says so in a GatewayEvent, and a ``gateway_event`` rule turns those
    of its level (and codes) into alerts -- one per gateway and code within the window."""
    rule = AlertRuleConfig(name="gw-trouble", kind="gateway_event", priority="P1",
                           gateway="ate-*", dedup_window_s=300)
    state, _, bus = make(rule)
    feed = Feeder(state, "ate-1")
    feed([event(10.0, "source_started", "info"),
          event(11.0, "queue_filling", "warning")], now=1.0)
    assert bus.events == []  # below "error", the rule's level
    feed([event(20.0, "source_failed", message="source tester: OSError: gone")], now=2.0)
    (raised,) = bus.of("raised")
    alert = raised["alert"]
    assert alert["message"] == "gateway ate-1: error source_failed: source tester: OSError: gone"
    assert alert["context"] == {"gateway_id": "ate-1", "code": "source_failed",
                                "level": "error", "source": "gateway"}
    assert (alert["raised_at"], alert["priority"]) == (20.0, "P1")  # the event's time
    feed([event(80.0, "source_failed")], now=3.0)  # the same code within the window
    assert len(bus.of("raised")) == 1
    feed([event(90.0, "store_overflow")], now=4.0)  # another code: its own alert
    assert [e["alert"]["context"]["code"] for e in bus.of("raised")] == [
        "source_failed", "store_overflow"]
    Feeder(state, "hub-side")([event(95.0, "source_failed")], now=5.0)  # not ate-*
    assert len(bus.of("raised")) == 2


def test_a_gateway_event_rule_with_codes_and_a_lower_level_alerts_those_codes_only() -> None:
    rule = AlertRuleConfig(name="drops", kind="gateway_event", level="warning",
                           codes=["store_*", "state_rollback"])
    state, _, bus = make(rule)
    feed = Feeder(state)
    feed([event(1.0, "source_failed"), event(2.0, "store_overflow", "warning"),
          event(3.0, "state_rollback"), event(4.0, "store_filling", "info")], now=1.0)
    assert [e["alert"]["context"]["code"] for e in bus.of("raised")] == [
        "store_overflow", "state_rollback"]


def test_a_malformed_gateway_event_alerts_nothing_and_breaks_nothing() -> None:
    """A gateway's event is its own input: a time that is no number (or not finite), a
    code or level that is no text, raise no alert -- and the records beside it apply.
    A level this hub does not know (a newer gateway's) counts as an error."""
    rule = AlertRuleConfig(name="any", kind="gateway_event", level="error")
    state, _, bus = make(rule)
    feed = Feeder(state)
    bad: list[Any] = [GatewayEvent("g", "soon", "error", "x", "m", None),  # type: ignore[arg-type]
                      GatewayEvent("g", float("nan"), "error", "x", "m", None),
                      GatewayEvent("g", 1.0, "error", 7, "m", None),  # type: ignore[arg-type]
                      GatewayEvent("g", 1.0, None, "x", "m", None)]  # type: ignore[arg-type]
    feed([*bad, part(0, 1)], now=1.0)
    assert bus.events == []
    assert state.snapshot(topics.wafer(LOT, "W1"))["parts"] == 1
    feed([event(5.0, "disk_dying", "critical")], now=2.0)
    assert [e["alert"]["context"]["code"] for e in bus.of("raised")] == ["disk_dying"]


def test_acknowledgement_is_broadcast_once_and_stops_escalation() -> None:
    rules = [AlertRuleConfig(name="y0", kind="lot_yield", priority="P0", threshold=0.9,
                             min_parts=5),
             AlertRuleConfig(name="y0b", kind="wafer_yield", priority="P0", threshold=0.9,
                             min_parts=5)]
    state, engine, bus = make(*rules)
    Feeder(state)([part(i, 3) for i in range(5)], now=1000.0)
    by_rule = {e["alert"]["rule"]: e["alert"] for e in bus.of("raised")}
    assert sorted(by_rule) == ["y0", "y0b"]
    lot_alert, wafer_alert = by_rule["y0"], by_rule["y0b"]

    acked = engine.ack(lot_alert["id"], "alice", 1030.0)
    assert acked.acknowledged and acked.acked_by == "alice"
    (ack_event,) = bus.of("acknowledged")
    assert ("alert/P0/y0", ack_event) in bus.published
    assert ack_event["alert"]["acked_at"] == 1030.0
    engine.ack(lot_alert["id"], "bob", 1040.0)
    assert len(bus.of("acknowledged")) == 1 and engine.alerts[lot_alert["id"]].acked_by == "alice"
    with pytest.raises(KeyError):
        engine.ack("no-such-alert", "alice", 1040.0)

    state.tick(1119.0)
    assert bus.of("escalated") == []
    state.tick(1120.0)  # 2 minutes after it was raised, the unacknowledged P0 escalates
    (esc,) = bus.of("escalated")
    assert esc["alert"]["id"] == wafer_alert["id"] and esc["alert"]["escalated_at"] == 1120.0
    state.tick(1200.0)
    assert len(bus.of("escalated")) == 1
    assert ("alert/P0/y0b", esc) in bus.published


def test_only_p0_escalates() -> None:
    state, _, bus = make(AlertRuleConfig(name="y", kind="lot_yield", priority="P1",
                                         threshold=0.9, min_parts=1))
    Feeder(state)([part(0, 3)], now=0.0)
    state.tick(10_000.0)
    assert len(bus.of("raised")) == 1 and bus.of("escalated") == []


def test_restored_alerts_and_replayed_records_raise_nothing_twice() -> None:
    rule = AlertRuleConfig(name="y", kind="wafer_yield", priority="P0", threshold=0.9,
                           min_parts=5)
    batches = [[part(i, 3, ts=100.0 + i)] for i in range(8)]
    state, engine, bus = make(rule)
    feed = Feeder(state)
    for b in batches:
        feed(b, now=500.0)
    (raised,) = bus.of("raised")
    engine.ack(raised["alert"]["id"], "carol", 510.0)
    persisted = [a.to_dict() for a in engine.alerts.values()]

    # a restarted hub: restore the alert store, then replay the same frames
    state2, engine2, bus2 = make(rule)
    assert engine2.restore(persisted) == 1
    feed2 = Feeder(state2)
    for b in batches:
        feed2(b, now=9000.0)
    state2.tick(9500.0)
    assert bus2.events == []
    assert engine2.alerts[raised["alert"]["id"]].acked_by == "carol"
    # new data after the restart still raises once the window has passed
    feed2([part(50, 3, ts=100.0 + 400)], now=9600.0)
    assert len(bus2.of("raised")) == 1


def test_rules_load_from_toml_and_bad_rules_are_named(tmp_path: Any) -> None:
    path = tmp_path / "hub.toml"
    path.write_text("""
dedup_window_s = 120.0

[[rules]]
name = "wafer-yield"
kind = "wafer_yield"
priority = "P1"
threshold = 0.85
min_parts = 200

[[rules]]
name = "handler-temp"
kind = "sensor_range"
channel = "handler/*/temp"
high = 40.0

[[rules]]
name = "gateway-trouble"
kind = "gateway_event"
level = "warning"
codes = ["source_*", "store_overflow"]

[[webhooks]]
url = "http://alerts.example:8080/hook"
priorities = ["P0", "P1"]
""")
    config = build(AlertsConfig, read_toml(path), str(path))
    assert config.dedup_window_s == 120.0
    assert [r.name for r in config.rules] == ["wafer-yield", "handler-temp", "gateway-trouble"]
    assert config.rules[0].threshold == 0.85 and config.rules[1].high == 40.0
    assert (config.rules[2].level, config.rules[2].codes) == (
        "warning", ["source_*", "store_overflow"])
    assert config.webhooks[0].priorities == ["P0", "P1"]

    with pytest.raises(ConfigError) as err:
        build(AlertsConfig, {"rules": [
            {"name": "a", "kind": "wafer_yield"},
            {"name": "c", "kind": "nonsense"},
            {"name": "d", "kind": "sensor_range", "priority": "P7"},
            {"name": "e", "kind": "gateway_event", "level": "fatal"},
        ]}, "hub.toml")
    text = str(err.value)
    assert "hub.toml: rules[0].threshold: required for kind 'wafer_yield'" in text
    assert "rules[1].kind" in text and "rules[2].priority" in text
    assert "rules[3].level" in text and "'fatal'" in text
    with pytest.raises(ConfigError, match=r"rules\[0\]\.threshold: a yield, gap or share is "
                       "between 0 and 1"):
        build(AlertsConfig, {"rules": [{"name": "b", "kind": "lot_yield", "threshold": 85}]})
    with pytest.raises(ConfigError, match="duplicate rule name"):
        build(AlertsConfig, {"rules": [{"name": "x", "kind": "sensor_range", "low": 1.0}] * 2})


def test_a_restored_unacknowledged_p0_still_escalates_after_a_restart() -> None:
    rule = AlertRuleConfig(name="y", kind="lot_yield", priority="P0", threshold=0.9,
                           min_parts=1)
    state, engine, _ = make(rule)
    Feeder(state)([part(0, 3, ts=100.0)], now=1000.0)
    persisted = [a.to_dict() for a in engine.alerts.values()]

    state2, engine2, bus2 = make(rule)
    engine2.restore(persisted)
    state2.tick(1100.0)  # the hub was down; 100 s since it was raised
    assert bus2.of("escalated") == []
    state2.tick(1121.0)
    (esc,) = bus2.of("escalated")
    assert esc["alert"]["id"] == persisted[0]["id"]


def test_reconfigured_rules_start_afresh_and_the_alerts_raised_stay() -> None:
    """A SIGHUP's new rules (docs/alerts.md, "Changing rules on a running hub"): a changed
    rule forgets the run it was counting (its new count is not met by fails counted under
    the old one), an untouched rule keeps its run, a removed rule raises nothing more, and
    every alert already raised stays listed and escalates."""
    run = AlertRuleConfig(name="site-run", kind="consecutive_fails", priority="P0", count=5)
    other = AlertRuleConfig(name="other-run", kind="consecutive_fails", priority="P1",
                            count=4)
    stuck = AlertRuleConfig(name="stuck", kind="consecutive_fails", priority="P0", count=2)
    state, engine, bus = make(run, other, stuck, escalate_after_s=60.0)
    feed = Feeder(state)
    feed([part(i, 5, site=1, ts=100.0 + i) for i in range(3)], now=1.0)
    (raised,) = bus.of("raised")  # "stuck" at the 2nd fail; the others count on
    assert raised["alert"]["rule"] == "stuck"

    changes = engine.reconfigure(AlertsConfig(
        rules=[dataclasses.replace(run, count=4), other], escalate_after_s=60.0))
    assert (changes.added, changes.removed, changes.changed) == ([], ["stuck"], ["site-run"])
    feed([part(10, 5, site=1, ts=110.0)], now=2.0)
    # other-run: 4 in a row, counted across the reload; site-run (now 4) starts at 1
    assert [e["alert"]["rule"] for e in bus.of("raised")] == ["stuck", "other-run"]
    feed([part(11 + i, 5, site=1, ts=111.0 + i) for i in range(3)], now=3.0)
    assert [e["alert"]["rule"] for e in bus.of("raised")] == ["stuck", "other-run", "site-run"]
    # two fails on another site: "stuck" would have raised for it; it is gone
    feed([part(20 + i, 5, site=2, ts=120.0 + i) for i in range(2)], now=4.0)
    assert len(bus.of("raised")) == 3
    # the removed rule's alert: still listed, and still escalated when unacknowledged
    assert raised["alert"]["id"] in engine.alerts
    engine.tick(1.0 + 61.0)
    assert raised["alert"]["id"] in [e["alert"]["id"] for e in bus.of("escalated")]
