"""The MQTT source in a real gateway process, killed with SIGKILL while QoS 1 readings
flow: every published reading reaches the hub exactly once.  And poison payloads: the
process stays up and the broker does not send them again after a restart.

Real processes (hub, gateway), a real Mosquitto of the test's own with the "nothing lost"
settings, a persistent session, the disk spool.  Kills happen at chosen points in the data
(after the hub has applied so many more readings), never after a sleep racing the
publisher.  One kill happens while a proxy swallows every byte the gateway sends to the
broker: the readings stored meanwhile are certainly unacknowledged at the broker, so the
broker sends them all again after the restart and the gateway must recognise them.  One is
the gateway killing itself at a failpoint, the instant a frame is durable and before the
source sends its PUBACKs.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from faultkit import Hub, _Process, report, stop_all
from mqtt_broker import AckSwallowingProxy, Broker, StartBroker
from paho.mqtt.enums import CallbackAPIVersion
from ports import free_port
from processes import get_json, spawn, wait_for

from edgegw.hub.store import unpack_body
from edgegw.protocol import decode_body
from edgegw.records import SensorReading, SensorWindow, from_wire

pytestmark = pytest.mark.broker

TOPICS = ("ate/t1/handler/seq", "ate/t1/prober/seq", "ate/t1/chamber/seq")


class MqttGateway(_Process):
    """``edgegw gateway`` with one MQTT source (persistent session, QoS 1) and the spool."""

    stop_timeout = 15.0

    def __init__(self, tmp: Path, hub_port: int, mqtt_port: int, *, raw: bool,
                 max_delay_ms: float = 100, extra_subscriptions: str = "") -> None:
        self.tmp = tmp
        self.status = free_port()
        self.config = tmp / "gateway.toml"
        state = tmp / "gw"
        self.config.write_text(f"""
[gateway]
id = "ate-01"
token = "change-me-ate-01"
hub_url = "ws://127.0.0.1:{hub_port}/ws/gateway"
state_dir = "{state}"
status_port = {self.status}

[batch]
max_records = 2000
max_delay_ms = {max_delay_ms}

[uplink]
heartbeat_s = 1.0
connect_timeout_s = 3.0
backoff_initial_s = 0.1
backoff_max_s = 1.0

[spool]
dir = "{state}/spool"

[[sources]]
name = "sensors"
type = "mqtt"
port = {mqtt_port}
client_id = "edgegw-crash-test"
clean_session = false
qos = 1
backoff = {{ initial = 0.05, maximum = 0.5 }}

[[sources.subscriptions]]
topic = "ate/+/+/seq"
channel = "{{1}}.{{2}}"
timestamp_field = "ts"
raw = {"true" if raw else "false"}
rate = 10.0
{extra_subscriptions}""")
        self.proc = None

    def start(self, failpoints: str = "", wait: bool = True) -> MqttGateway:
        """Start (``failpoints``: armed for this run, edgegw/failpoints.py; ``wait``: until
        connected to the broker -- not for a run that kills itself at a failpoint)."""
        self.proc = spawn("gateway", "--config", str(self.config), log=self.tmp / "gw.log",
                          env={"EDGEGW_FAILPOINTS": failpoints})
        if wait:
            # subscribed, not only connected: until the broker has the subscription, what
            # is published is routed to no one (seen: the first readings lost on a busy
            # machine, published between the CONNACK and the broker reading the SUBSCRIBE)
            wait_for(lambda: self.metric("mqtt_subscribed") == 1, timeout=30)
        return self

    def stats(self) -> dict[str, Any]:
        return get_json(f"http://127.0.0.1:{self.status}/api/stats")

    def metric(self, name: str, labels: str = "source=sensors") -> float:
        value = self.stats()["metrics"].get(name, 0)
        return value.get(labels, 0) if isinstance(value, dict) else value


class Publisher(threading.Thread):
    """Publishes ``{"value": i, "ts": ...}`` with QoS 1 round-robin on TOPICS (i counts per
    topic) at about ``rate`` messages/s until stopped; ``sent`` is exact once joined."""

    def __init__(self, port: int, rate: float) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.rate = rate
        self.stopping = threading.Event()
        self.sent = 0
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id="crash-test-pub")
        self.client.max_inflight_messages_set(1000)
        self.client.max_queued_messages_set(0)
        self.infos: list[paho.MQTTMessageInfo] = []

    def run(self) -> None:
        self.client.connect("127.0.0.1", self.port)
        self.client.loop_start()
        t0 = time.monotonic()
        while not self.stopping.is_set():
            topic = TOPICS[self.sent % len(TOPICS)]
            payload = json.dumps({"value": self.sent // len(TOPICS), "ts": time.time()})
            self.infos.append(self.client.publish(topic, payload, qos=1))
            self.sent += 1
            ahead = self.sent / self.rate - (time.monotonic() - t0)
            if ahead > 0:
                time.sleep(ahead)
        # the broker has every message before the count is final
        for info in self.infos:
            info.wait_for_publish(30)
            assert info.is_published()
        self.client.loop_stop()
        self.client.disconnect()

    def finish(self) -> int:
        self.stopping.set()
        self.join(60)
        assert not self.is_alive()
        return self.sent


def hub_sensor_records(hub: Hub) -> list[Any]:
    db = sqlite3.connect(hub.dir / "hub.sqlite3")
    try:
        rows = db.execute("SELECT codec, body FROM frames WHERE gateway = 'ate-01' "
                          "ORDER BY first_rid").fetchall()
    finally:
        db.close()
    out = []
    for codec, body in rows:
        _, names, wire = decode_body(unpack_body(codec, body), 1 << 30)
        out += [r for r in (from_wire(item, names) for item in wire)
                if isinstance(r, (SensorReading, SensorWindow))]
    return out


def readings_at_hub(hub: Hub, index: int = 0, t: float = 0.0) -> int:
    """Readings the hub has; with ``index`` and ``t``, only those published after the
    publisher had sent ``index`` messages at time ``t`` (a raw reading by its value, a
    window that opened after ``t``)."""
    def after(r: Any) -> int:
        if isinstance(r, SensorReading):
            return 1 if r.value * len(TOPICS) >= index else 0
        return r.count if r.t0 >= t else 0

    return sum(after(r) for r in hub_sensor_records(hub))


def wait_readings(hub: Hub, at_least: int, timeout: float = 60) -> int:
    return wait_for(lambda: (n := readings_at_hub(hub)) >= at_least and n, timeout=timeout,
                    interval=0.1)


def hub_record_ids(hub: Hub) -> list[int]:
    db = sqlite3.connect(hub.dir / "hub.sqlite3")
    try:
        rows = db.execute("SELECT codec, body FROM frames WHERE gateway = 'ate-01'"
                          ).fetchall()
    finally:
        db.close()
    rids = []
    for codec, body in rows:
        first_rid, _, wire = decode_body(unpack_body(codec, body), 1 << 30)
        rids += range(first_rid, first_rid + len(wire))
    return rids


def assert_exactly_once(hub: Hub, per_topic: dict[str, int]) -> None:
    """Every published reading applied once: raw, each value once per channel; windows,
    the counts add up to the readings published, and so do the values (a lost and a
    doubled reading would not cancel out in both).  Reported to $EDGEGW_FAULT_REPORT."""
    records = hub_sensor_records(hub)
    rids = Counter(hub_record_ids(hub))
    lost = twice = 0
    problems = []
    for topic, n in per_topic.items():
        channel = ".".join(topic.split("/")[1:3])
        mine = [r for r in records if r.channel == channel]
        if mine and isinstance(mine[0], SensorReading):
            counts = Counter(int(r.value) for r in mine)
            dup = sorted(v for v, c in counts.items() if c > 1)
            gone = sorted(set(range(n)) - set(counts))
            lost += len(gone)
            twice += sum(counts[v] - 1 for v in dup)
            if dup or gone or len(mine) != n:
                problems.append(f"{channel}: {len(dup)} readings twice (e.g. {dup[:5]}), "
                                f"{len(gone)} lost (e.g. {gone[:5]})")
        else:
            got = sum(w.count for w in mine)
            lost += max(0, n - got)
            twice += max(0, got - n)
            if got != n or sum(w.mean * w.count for w in mine) != pytest.approx(
                    n * (n - 1) / 2):
                problems.append(f"{channel}: windows count {got} readings of {n} published")
    dup_rids = sum(1 for c in rids.values() if c > 1)
    report(records=sum(per_topic.values()), lost=lost, duplicated=twice,
           duplicate_rids=dup_rids)
    assert not dup_rids, f"{dup_rids} record ids applied twice"
    assert not problems, "; ".join(problems)


def per_topic(sent: int) -> dict[str, int]:
    return {t: sent // len(TOPICS) + (1 if i < sent % len(TOPICS) else 0)
            for i, t in enumerate(TOPICS)}


@pytest.mark.parametrize("raw", [True, False], ids=["raw", "windows"])
def test_gateway_killed_while_readings_flow_counts_every_reading_exactly_once(
        tmp_path: Path, start_broker: StartBroker, raw: bool) -> None:
    broker = start_broker()
    proxy = AckSwallowingProxy(broker.port)
    hub = Hub(tmp_path).start()
    gw = MqttGateway(tmp_path, hub.port, proxy.port, raw=raw).start()
    publisher = Publisher(broker.port, rate=900)
    try:
        publisher.start()
        # 1. killed mid-stream: the open windows and the batch in hand were not yet
        #    acknowledged, so the broker sends them again
        n = wait_readings(hub, 600)
        gw.kill()
        gw.start()
        # 2. killed after storing readings whose PUBACKs never reached the broker: every
        #    reading published after the swallowing began and applied at the hub
        n = wait_readings(hub, n + 600)
        proxy.swallow()
        since = (publisher.sent, time.time())
        wait_for(lambda: readings_at_hub(hub, *since) >= 900, timeout=60, interval=0.1)
        gw.kill()
        stored_unacknowledged = readings_at_hub(hub, *since)
        n = readings_at_hub(hub)
        proxy.restore()
        gw.start()
        n = wait_readings(hub, n + 600)
        # the broker did send them again (first, on reconnect), and they were recognised
        assert gw.metric("mqtt_redelivered_dropped_total") >= stored_unacknowledged
        # 3. killed by itself right after a frame became durable, before its PUBACKs left
        #    (the failpoint gateway.frame_stored fires before the source hears of it)
        gw.kill()
        gw.start(failpoints="gateway.frame_stored=5:kill", wait=False)
        assert gw.proc is not None and gw.proc.wait(60) == -9
        gw.start()
        n = wait_readings(hub, n + 600)
        assert gw.metric("mqtt_redelivered_dropped_total") >= 1
        sent = publisher.finish()
        with contextlib.suppress(AssertionError):  # if not, the comparison says what is lost
            wait_readings(hub, sent)
        # everything acknowledged and delivered: nothing can come again
        wait_for(lambda: gw.metric("mqtt_unacked") == 0
                 and gw.stats()["store"]["frames"] == 0, timeout=30)
        assert "dropped" not in broker.log_text()
        assert_exactly_once(hub, per_topic(sent))
        assert readings_at_hub(hub) == sent
    finally:
        publisher.stopping.set()
        stop_all(hub, gw)
        proxy.close()


def test_poison_payloads_neither_stop_the_gateway_nor_come_back_after_a_restart(
        tmp_path: Path, start_broker: StartBroker) -> None:
    broker = start_broker()
    hub = Hub(tmp_path).start()
    gw = MqttGateway(tmp_path, hub.port, broker.port, raw=True).start()
    poison = [
        b'{"value": ' + b"9" * 401 + b"}",  # too large for a float
        b'{"value": 1.5, "ts": ' + b"9" * 401 + b"}",
        b"[" * 100_000 + b"]" * 100_000,  # nested deeper than any parser recursion
    ]

    def good(i: int) -> tuple[str, bytes]:
        return TOPICS[0], json.dumps({"value": i, "ts": time.time()}).encode()

    try:
        _publish(broker, [good(0)] + [(TOPICS[1], p) for p in poison] + [good(1)])
        wait_for(lambda: readings_at_hub(hub) >= 2, timeout=30)
        assert gw.proc is not None and gw.proc.poll() is None  # still the same process

        def rejected() -> float:
            bad = gw.stats()["metrics"].get("mqtt_bad_payloads_total", {})
            return (gw.metric("internal_errors_total", "where=mqtt_message")
                    + sum(v for k, v in bad.items() if TOPICS[1] in k))

        # each counted once: as a bad payload, or (before the decoder handles such input)
        # as an internal error at the message boundary
        assert rejected() == 3
        wait_for(lambda: gw.metric("mqtt_unacked") == 0, timeout=10)
        gw.stop()  # a clean stop and a restart: the broker sends nothing again
        gw.start()
        _publish(broker, [good(2)])
        wait_for(lambda: readings_at_hub(hub) >= 3, timeout=30)
        assert gw.metric("mqtt_messages_total") == 1
        assert rejected() == 0
        assert sorted(r.value for r in hub_sensor_records(hub)) == [0, 1, 2]
    finally:
        stop_all(hub, gw)


def _publish(broker: Broker, messages: list[tuple[str, bytes]]) -> None:
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id="poison-pub")
    client.connect(broker.host, broker.port)
    client.loop_start()
    try:
        for topic, payload in messages:
            info = client.publish(topic, payload, qos=1)
            info.wait_for_publish(10)
            assert info.is_published()
    finally:
        client.loop_stop()
        client.disconnect()
