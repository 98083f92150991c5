"""Hostile MQTT payloads through a real broker into a real gateway process: after every
case the gateway is the same process, ``/healthz`` answers, and the message is accounted
for (a reading, a bad payload, or a message skipped at the failure boundary) and
acknowledged.

One gateway process (the MQTT source: JSON and number payloads, raw and windowed, QoS 1,
a persistent session) and one hub take every case of this module in sequence, so a case
also meets whatever the cases before it left behind.  Hypothesis generates the payloads
from a fixed seed (``derandomize=True``): the same bounded set of cases on every run.

Once the JSON decoder turns every hostile number and nesting depth into a ``PayloadError``
(``edgegw/mqtt/payloads.py``), no case may end at the failure boundary at all:
``internal_errors_total{where="mqtt_message"}`` must then stay 0.  Before that, such
cases are counted there and skipped, and the gateway carries on.

The longer run: ``EDGEGW_FUZZ_EXAMPLES=2000 .venv/bin/python -m pytest -q -p
no:cacheprovider tests/test_mqtt_fuzz.py`` (examples per test; add ``EDGEGW_FUZZ_RANDOM=1``
for fresh random cases instead of the fixed ones).
"""

from __future__ import annotations

import json
import math
import os
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass

import paho.mqtt.client as paho
import pytest
from faultkit import Hub
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mqtt_broker import broker_factory
from paho.mqtt.enums import CallbackAPIVersion
from processes import wait_for
from test_mqtt_crash import MqttGateway

from edgegw.mqtt import PayloadError, json_decoder

pytestmark = pytest.mark.broker

EXAMPLES = int(os.environ.get("EDGEGW_FUZZ_EXAMPLES", "60"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None,
                derandomize=not os.environ.get("EDGEGW_FUZZ_RANDOM"),
                suppress_health_check=[HealthCheck.too_slow,
                                       HealthCheck.function_scoped_fixture])


def decoder_is_hardened() -> bool:
    """Does the JSON decoder report a too-large number and deep nesting as bad payloads?"""
    decode = json_decoder("value", "ts")
    for payload in (b'{"value": 1' + b"0" * 400 + b"}", b"[" * 100_000 + b"]" * 100_000):
        try:
            decode(payload)
        except PayloadError:
            continue
        except Exception:
            return False
    return True


@dataclass
class Target:
    gateway: MqttGateway
    publisher: paho.Client
    pid: int
    sent: int = 0

    def publish(self, topic: str, payload: bytes) -> None:
        info = self.publisher.publish(topic, payload, qos=1)
        info.wait_for_publish(10)
        assert info.is_published()
        self.sent += 1

    def metric(self, name: str, labels: str = "source=sensors") -> float:
        return self.gateway.metric(name, labels)

    def accounted(self) -> float:
        """Messages handled and acknowledged by the gateway, however they ended."""
        if self.metric("mqtt_unacked"):
            return -1
        return self.metric("mqtt_messages_total")


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    tmp = tmp_path_factory.mktemp("mqtt-fuzz")
    with broker_factory(tmp) as start:
        broker = start()
        hub = Hub(tmp).start()
        gateway = MqttGateway(tmp, hub.port, broker.port, raw=True, extra_subscriptions="""
[[sources.subscriptions]]
topic = "fuzz/+/win"
timestamp_field = "ts"
rate = 20.0

[[sources.subscriptions]]
topic = "fuzz/+/num"
payload = "number"
raw = true
""").start()
        publisher = paho.Client(CallbackAPIVersion.VERSION2, client_id="fuzz-pub")
        publisher.connect(broker.host, broker.port)
        publisher.loop_start()
        try:
            assert gateway.proc is not None
            yield Target(gateway, publisher, gateway.proc.pid)
        finally:
            publisher.loop_stop()
            publisher.disconnect()
            gateway.stop()
            hub.stop()


def check_alive(target: Target) -> None:
    """The same process, answering, every message accounted for and acknowledged."""
    gw = target.gateway
    wait_for(lambda: target.accounted() == target.sent, timeout=20, interval=0.02)
    assert gw.proc is not None and gw.proc.poll() is None and gw.proc.pid == target.pid
    with urllib.request.urlopen(f"http://127.0.0.1:{gw.status}/healthz", timeout=5) as r:
        assert r.status == 200
    if decoder_is_hardened():
        assert target.metric("internal_errors_total", "where=mqtt_message") == 0


json_scalars = (st.none() | st.booleans() | st.floats(allow_nan=False)
                | st.integers(min_value=-(10**500), max_value=10**500) | st.text(max_size=20))
json_values = st.recursive(json_scalars, lambda children: st.lists(children, max_size=4)
                           | st.dictionaries(st.sampled_from(["value", "ts", "v", ""]),
                                             children, max_size=4), max_leaves=12)


@st.composite
def hostile_json(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["document", "value", "deep", "number_text", "bytes"]))
    if kind == "document":
        return json.dumps(draw(json_values)).encode()
    if kind == "value":  # the right shape, a hostile value or time
        doc = {"value": draw(json_values), "ts": draw(json_scalars | st.just(time.time()))}
        return json.dumps(doc).encode()
    if kind == "deep":
        depth = draw(st.integers(min_value=1, max_value=200_000))
        opener = draw(st.sampled_from([b"[", b'{"value":']))
        closer = b"]" if opener == b"[" else b"}"
        return opener * depth + b"1" + closer * depth
    if kind == "number_text":
        digits = draw(st.integers(min_value=1, max_value=5000))
        return (b'{"value": ' + draw(st.sampled_from([b"", b"-"])) + b"9" * digits
                + draw(st.sampled_from([b"", b".5", b"e999", b"e-999"])) + b"}")
    return draw(st.binary(max_size=300))


@FUZZ
@given(payload=hostile_json(), windowed=st.booleans())
def test_hostile_json_payloads_never_stop_the_gateway(target: Target, payload: bytes,
                                                      windowed: bool) -> None:
    target.publish("fuzz/a/win" if windowed else "ate/t1/x/seq", payload)
    check_alive(target)


@FUZZ
@given(payload=st.binary(max_size=64) | st.text(max_size=40).map(str.encode)
       | st.floats().map(lambda f: repr(f).encode())
       | st.integers(min_value=-(10**400), max_value=10**400).map(lambda i: str(i).encode()))
def test_hostile_number_payloads_never_stop_the_gateway(target: Target,
                                                        payload: bytes) -> None:
    target.publish("fuzz/a/num", payload)
    check_alive(target)


def test_after_the_fuzzing_good_readings_still_flow(target: Target) -> None:
    before = target.metric("gateway_records_in_total")
    for i in range(5):
        target.publish("ate/t1/x/seq", json.dumps({"value": i, "ts": time.time()}).encode())
        target.publish("fuzz/a/num", str(math.pi * i).encode())
    check_alive(target)
    assert target.metric("gateway_records_in_total") >= before + 10
    # the fuzzing did reach the bad-input paths (not just well-formed readings)
    bad = target.gateway.stats()["metrics"].get("mqtt_bad_payloads_total", {})
    skipped = target.metric("internal_errors_total", "where=mqtt_message")
    print(f"MQTT fuzz: {target.sent} messages, {sum(bad.values()):.0f} bad payloads, "
          f"{skipped:.0f} skipped at the failure boundary")
    assert sum(bad.values()) >= EXAMPLES / 2
