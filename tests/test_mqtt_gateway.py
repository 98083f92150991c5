"""The MQTT source inside the real gateway service, its windows applied by a real hub."""

from __future__ import annotations

import json
import logging
import sqlite3
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import trio
from hubtools import gateway_config, hub_config, start_hub
from mqtt_broker import Broker, BrokerAddress, StartBroker

from edgegw import metrics as metrics_module
from edgegw.backoff import Backoff
from edgegw.gateway import Gateway
from edgegw.hub.store import unpack_body
from edgegw.mqtt import ConnectOptions, TrioMqttClient
from edgegw.mqtt import source as source_module
from edgegw.mqtt.source import MqttSource
from edgegw.protocol import decode_body
from edgegw.records import GatewayEvent, SensorReading, SensorWindow, from_wire
from edgegw.sim import publish_sensors

pytestmark = pytest.mark.broker


async def test_sensor_windows_flow_from_the_broker_through_the_gateway_to_the_hub(
        tmp_path: Path, mqtt_broker: BrokerAddress) -> None:
    tester = f"gw-{uuid.uuid4().hex[:8]}"
    sources = [{
        "name": "sensors", "type": "mqtt", "host": mqtt_broker.host, "port": mqtt_broker.port,
        "client_id": f"edgegw-{tester}", "clean_session": True,
        "subscriptions": [{"topic": f"ate/{tester}/+/+", "channel": "{2}.{3}",
                           "timestamp_field": "ts", "rate": 10.0}],
    }]
    async with trio.open_nursery() as nursery:
        hub, port = await start_hub(nursery, hub_config(tmp_path / "hub"))
        async with trio.open_nursery() as gw_nursery:
            gateway = await gw_nursery.start(
                Gateway(gateway_config(tmp_path / "gw", port, sources=sources)).run)
            ((_, source),) = gateway.sources
            assert isinstance(source, MqttSource) and source.client is not None
            with trio.fail_after(10):
                await source.client.subscribed.wait()
            sent = await publish_sensors(mqtt_broker.host, mqtt_broker.port, tester=tester,
                                         rate=500, qos=1, seed=3, duration=0, count=500)
            assert sent == 2500
            records_in = gateway.metrics.counter("gateway_records_in_total")
            with trio.fail_after(20):
                while source.received < sent or source.buffered:
                    await trio.sleep(0.05)
                # every window the source put reaches the hub and is applied there
                while hub.stats()["gateways"].get("ate-01", {}).get("records_applied", 0) \
                        < records_in.get(source="sensors"):
                    await trio.sleep(0.05)
            applied = hub.stats()["gateways"]["ate-01"]["records_applied"]
            assert applied == records_in.get(source="sensors")
            assert 5 <= applied < sent / 5  # windows, not readings
            gateway.metrics.collect()
            assert gateway.metrics.counter("mqtt_messages_total").get(source="sensors") == sent
            assert gateway.metrics.gauge("mqtt_connected").get(source="sensors") == 1
            assert gateway.metrics.gauge("mqtt_subscribed").get(source="sensors") == 1
            gw_nursery.cancel_scope.cancel()
        nursery.cancel_scope.cancel()


async def _publish(broker: Broker, messages: list[tuple[str, bytes]], *,
                   retain: bool = False) -> None:
    """Publish with QoS 1 and wait until the broker has every message."""
    client = TrioMqttClient(ConnectOptions(host=broker.host, port=broker.port,
                                           client_id=f"pub-{uuid.uuid4().hex[:8]}"),
                            backoff=Backoff(0.05, 0.4), name="publisher")
    async with trio.open_nursery() as nursery:
        await nursery.start(client.run)
        with trio.fail_after(10):
            await client.subscribed.wait()
            for topic, payload in messages:
                await client.publish(topic, payload, qos=1, retain=retain)
            await client.wait_all_acked()
        nursery.cancel_scope.cancel()


async def test_a_message_whose_handling_raises_is_skipped_counted_acknowledged_for_good(
        tmp_path: Path, start_broker: StartBroker, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    # A decoder with a bug: it raises something that is not a PayloadError, for one topic.
    real_make_decoder = source_module.make_decoder

    def make_decoder(name: str, **options: Any) -> Any:
        if options.get("value_path") != "boom":
            return real_make_decoder(name, **options)

        def explode(payload: bytes) -> tuple[float, float | None]:
            raise RuntimeError("a bug in a decoder")
        return explode

    monkeypatch.setattr(source_module, "make_decoder", make_decoder)
    # internal errors are logged at most once per 10 s per `where`, process-wide: start afresh
    monkeypatch.setattr(metrics_module, "_last_logged", {})
    caplog.set_level(logging.ERROR, logger="edgegw.mqtt.source")
    broker = start_broker()
    prefix = f"p-{uuid.uuid4().hex[:8]}"
    sources = [{
        "name": "sensors", "type": "mqtt", "host": broker.host, "port": broker.port,
        "client_id": f"edgegw-{prefix}", "clean_session": False,
        "subscriptions": [{"topic": f"{prefix}/+/good", "raw": True},
                          {"topic": f"{prefix}/+/bad", "raw": True, "value_path": "boom"}],
    }]

    def good(i: int) -> tuple[str, bytes]:
        return f"{prefix}/h/good", json.dumps({"value": i}).encode()

    poison = (f"{prefix}/h/bad", b'{"boom": 1}')
    async with trio.open_nursery() as nursery:
        hub, port = await start_hub(nursery, hub_config(tmp_path / "hub"))
        cfg = gateway_config(tmp_path / "gw", port, sources=sources, spool={})
        for run, messages in enumerate([[good(0), poison, good(1), poison, good(2)],
                                        [good(3)]]):
            gateway = Gateway(cfg)
            async with trio.open_nursery() as gw_nursery:
                await gw_nursery.start(gateway.run)
                ((_, source),) = gateway.sources
                assert isinstance(source, MqttSource) and source.client is not None
                with trio.fail_after(10):
                    await source.client.subscribed.wait()
                await _publish(broker, messages)
                with trio.fail_after(20):
                    # every message handled and acknowledged, the poison ones included
                    while source.received < len(messages) or source.unacked:
                        await trio.sleep(0.02)
                    while hub.stats()["gateways"].get("ate-01", {}).get(
                            "records_applied", 0) < gateway.next_rid - 1:
                        await trio.sleep(0.02)
                internal = gateway.metrics.counter("internal_errors_total")
                if run == 0:
                    # the gateway is still running: the poison cost two messages, no more
                    assert not gw_nursery.cancel_scope.cancel_called
                    assert internal.get(where="mqtt_message") == 2 and source.failed == 2
                else:
                    # after the restart nothing came again: not the poison, not the good ones
                    assert source.received == 1
                    assert internal.get(where="mqtt_message") == 0
                gw_nursery.cancel_scope.cancel()
        nursery.cancel_scope.cancel()
    readings, events = _hub_records(tmp_path / "hub")
    assert sorted(readings) == [0.0, 1.0, 2.0, 3.0]  # each good reading once
    assert [e[3] for e in events] == ["mqtt.message_failed"]  # reported once (rate limit)
    logged = [r for r in caplog.records if "skipped" in r.getMessage()]
    assert len(logged) == 1  # the second one within 10 s is counted, not logged
    assert "internal error at mqtt_message" in logged[0].getMessage()
    assert f"{prefix}/h/bad" in logged[0].getMessage()
    assert "RuntimeError: a bug in a decoder" in logged[0].getMessage()
    assert logged[0].exc_info is not None  # with the traceback


async def test_a_retained_reading_reaches_the_hub_once_across_gateway_restarts(
        tmp_path: Path, start_broker: StartBroker) -> None:
    """The broker sends each topic's retained message at every subscription, so at every
    start of the gateway: the source's checkpoint in the spool keeps what it took on each
    retained topic, and the restarted gateway drops the repeat (docs/mqtt.md, "Retained
    messages").  A raw topic and a windowed one; readings published with RETAIN, as a
    sensor that wants late subscribers to see its last value does."""
    broker = start_broker()
    prefix = f"r-{uuid.uuid4().hex[:8]}"
    raw, win = f"{prefix}/h/raw", f"{prefix}/h/win"
    sources = [{
        "name": "sensors", "type": "mqtt", "host": broker.host, "port": broker.port,
        "client_id": f"edgegw-{prefix}", "clean_session": False,
        "subscriptions": [{"topic": f"{prefix}/+/raw", "raw": True, "timestamp_field": "ts"},
                          {"topic": f"{prefix}/+/win", "rate": 10.0, "timestamp_field": "ts"}],
    }]

    def reading(topic: str, value: float) -> tuple[str, bytes]:
        return topic, json.dumps({"value": value, "ts": time.time()}).encode()

    await _publish(broker, [reading(raw, 1.0), reading(win, 5.0)], retain=True)
    async with trio.open_nursery() as nursery:
        hub, port = await start_hub(nursery, hub_config(tmp_path / "hub"))
        cfg = gateway_config(tmp_path / "gw", port, sources=sources, spool={})
        # each run: (published while it runs, retained repeats it must drop)
        for run, (messages, repeats) in enumerate([
                ([], 0),  # the retained readings, new: taken
                ([reading(raw, 2.0), reading(win, 6.0)], 2),  # they come again; new ones
                ([], 2)]):  # the new ones are retained now: they come again
            gateway = Gateway(cfg)
            async with trio.open_nursery() as gw_nursery:
                await gw_nursery.start(gateway.run)
                ((_, source),) = gateway.sources
                assert isinstance(source, MqttSource) and source.client is not None
                with trio.fail_after(10):
                    await source.client.subscribed.wait()
                await _publish(broker, messages, retain=True)
                with trio.fail_after(20):
                    while (source.received < 2 + len(messages) or source.unacked
                           or source.buffered):
                        await trio.sleep(0.02)
                    while hub.stats()["gateways"].get("ate-01", {}).get(
                            "records_applied", 0) < gateway.next_rid - 1:
                        await trio.sleep(0.02)
                assert source.retained_repeats == repeats, f"run {run}"
                gw_nursery.cancel_scope.cancel()
        nursery.cancel_scope.cancel()
    readings, windows, _ = _hub_rows(tmp_path / "hub")
    assert readings == [1.0, 2.0]  # each once
    assert [(w.last, w.count) for w in windows] == [(5.0, 1), (6.0, 1)]


def _hub_rows(hub_dir: Path) -> tuple[list[float], list[SensorWindow], list[tuple[Any, ...]]]:
    """(values of the SensorReadings, the SensorWindows, GatewayEvents) the hub applied."""
    db = sqlite3.connect(hub_dir / "hub.sqlite3")
    try:
        rows = db.execute("SELECT codec, body FROM frames ORDER BY first_rid").fetchall()
    finally:
        db.close()
    readings: list[float] = []
    windows: list[SensorWindow] = []
    events: list[tuple[Any, ...]] = []
    for codec, body in rows:
        _, names, wire = decode_body(unpack_body(codec, body), 1 << 30)
        for item in wire:
            rec = from_wire(item, names)
            if isinstance(rec, SensorReading):
                readings.append(rec.value)
            elif isinstance(rec, SensorWindow):
                windows.append(rec)
            elif isinstance(rec, GatewayEvent):
                events.append(tuple(rec))
    return readings, windows, events


def _hub_records(hub_dir: Path) -> tuple[list[float], list[tuple[Any, ...]]]:
    """(values of the SensorReadings, GatewayEvents) the hub has applied."""
    readings, _, events = _hub_rows(hub_dir)
    return readings, events
