"""The MQTT source inside the real gateway service, its windows applied by a real hub."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
import trio
from hubtools import gateway_config, hub_config, start_hub
from mqtt_broker import BrokerAddress

from edgegw.gateway.service import Gateway
from edgegw.mqtt.source import MqttSource
from edgegw.sim.sensors import publish_sensors

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
            assert gateway.metrics.counter("mqtt_connected").get(source="sensors") == 1
            gw_nursery.cancel_scope.cancel()
        nursery.cancel_scope.cancel()
