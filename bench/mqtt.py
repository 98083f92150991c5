"""How fast the gateway's MQTT source ingests, beside paho's own threaded client.

Usage: python bench/mqtt.py [--messages 30000] [--runs 5] [--qos 0 1] [--size 200]

For a fair race both clients drain the same thing from the same broker: the bench starts
its own Mosquitto (free port, no queue limit, QoS 0 queued for offline sessions), and for
each measurement creates a persistent session, disconnects it, preloads N messages into
the broker's queue for it, then times the client from connect to the N-th message.  No
publisher competes for the CPU while a client drains.

- paho: ``loop_start()`` (paho's network thread), ``on_message`` counts;
- gateway: ``MqttSource`` (the Trio driver, the topic route, the JSON decoder and the
  throttle to 10 Hz windows, records put to a sink in batches), and with ``raw = true``.

Prints messages/s per client (median of the runs), the ratio gateway / paho, and the CPU
time of the bench process per message (less sensitive to other load on the machine than
the wall-clock rate).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import trio
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from edgegw.config import build
from edgegw.metrics import Metrics
from edgegw.mqtt.client import ConnectOptions, TrioMqttClient
from edgegw.mqtt.source import MqttSource, MqttSourceConfig
from edgegw.records import Record, SensorReading, SensorWindow
from edgegw.sources import SourceContext

TOPIC = "ate/bench/handler/temp"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def broker() -> Iterator[int]:
    exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    if not os.path.exists(exe):
        raise SystemExit("bench/mqtt.py needs a mosquitto binary")
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        conf = Path(tmp) / "mosquitto.conf"
        import getpass

        conf.write_text("\n".join([
            f"user {getpass.getuser()}", f"listener {port} 127.0.0.1",
            "allow_anonymous true", "persistence false",
            "max_queued_messages 0", "queue_qos0_messages true",
            f"log_dest file {tmp}/mosquitto.log", ""]))
        proc = subprocess.Popen([exe, "-c", str(conf)], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 10
            while True:
                with contextlib.suppress(OSError), socket.create_connection(
                        ("127.0.0.1", port), 0.2):
                    break
                if time.monotonic() > deadline:
                    raise SystemExit("mosquitto did not start")
                time.sleep(0.02)
            yield port
        finally:
            proc.terminate()
            proc.wait()


def payload(i: int, size: int) -> bytes:
    doc = {"value": 25.0 + (i % 100) / 100, "ts": time.time(), "pad": ""}
    text = json.dumps(doc)
    doc["pad"] = "x" * max(0, size - len(text))
    return json.dumps(doc).encode()


async def _preload(port: int, n: int, qos: int, size: int) -> None:
    opts = ConnectOptions(port=port, client_id=f"bench-pub-{uuid.uuid4().hex[:8]}")
    pub = TrioMqttClient(opts, name="bench publisher", max_unacked=2000)
    async with trio.open_nursery() as nursery:
        await nursery.start(pub.run)
        await pub.subscribed.wait()
        for i in range(n):
            await pub.publish(TOPIC, payload(i, size), qos=1)  # QoS 1: all reach the broker
        await pub.wait_all_acked()
        nursery.cancel_scope.cancel()


def create_session(port: int, client_id: str, qos: int) -> None:
    """Subscribe with a persistent session, then leave: the broker queues for it."""
    c = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                    protocol=MQTTProtocolVersion.MQTTv311, clean_session=False)
    done = threading.Event()
    c.on_subscribe = lambda *a: done.set()
    c.on_connect = lambda cl, *a: cl.subscribe(TOPIC, qos)
    c.connect("127.0.0.1", port)
    c.loop_start()
    if not done.wait(10):
        raise SystemExit("no SUBACK while creating the session")
    c.disconnect()
    c.loop_stop()


def drain_paho(port: int, client_id: str, n: int) -> float:
    got = 0
    done = threading.Event()

    def on_message(_c: Any, _u: Any, _m: Any) -> None:
        nonlocal got
        got += 1
        if got >= n:
            done.set()

    c = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                    protocol=MQTTProtocolVersion.MQTTv311, clean_session=False)
    c.on_message = on_message
    t0 = time.perf_counter()
    c.connect("127.0.0.1", port)
    c.loop_start()
    if not done.wait(120):
        raise SystemExit(f"paho received only {got} of {n}")
    elapsed = time.perf_counter() - t0
    c.disconnect()
    c.loop_stop()
    return n / elapsed


class CountingSink:
    def __init__(self, n: int) -> None:
        self.n = n
        self.readings = 0
        self.done = trio.Event()

    async def put(self, records: Sequence[Record], checkpoint: Any = None) -> None:
        for r in records:
            if isinstance(r, SensorWindow):
                self.readings += r.count
            elif isinstance(r, SensorReading):
                self.readings += 1


async def drain_gateway(port: int, client_id: str, n: int, qos: int, raw: bool) -> float:
    config = build(MqttSourceConfig, {
        "port": port, "client_id": client_id, "clean_session": False, "qos": qos,
        "subscriptions": [{"topic": "ate/+/handler/temp", "channel": "{1}.handler.temp",
                           "timestamp_field": "ts", "raw": raw, "rate": 10.0}]})
    source = MqttSource("bench", config, SourceContext("bench", Metrics()))
    sink = CountingSink(n)
    async with trio.open_nursery() as nursery:
        t0 = time.perf_counter()
        await nursery.start(source.run, sink)
        # "Ingested" = decoded into the throttle or the batch; waiting for the sink would
        # add up to one window interval (100 ms) to the time.
        while source.received < n:  # a plain counter, polled every 2 ms
            await trio.sleep(0.002)
        elapsed = time.perf_counter() - t0
        nursery.cancel_scope.cancel()
    return n / elapsed


def measure(port: int, kind: str, n: int, qos: int, size: int) -> tuple[float, float]:
    """(messages/s, CPU µs of this process per message) for one drain."""
    client_id = f"bench-{kind}-{uuid.uuid4().hex[:8]}"
    create_session(port, client_id, qos)
    trio.run(_preload, port, n, qos, size)
    cpu0 = time.process_time()
    if kind == "paho":
        rate = drain_paho(port, client_id, n)
    else:
        rate = trio.run(drain_gateway, port, client_id, n, qos, kind == "gateway-raw")
    return rate, (time.process_time() - cpu0) / n * 1e6


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--messages", type=int, default=30000)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--qos", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--size", type=int, default=200, help="payload bytes")
    args = ap.parse_args(argv)
    kinds = ["paho", "gateway", "gateway-raw"]
    with broker() as port:
        print(f"mosquitto on port {port}; {args.messages} messages of {args.size} B "
              f"queued per measurement; median of {args.runs} runs")
        for qos in args.qos:
            results: dict[str, list[float]] = {k: [] for k in kinds}
            cpu: dict[str, list[float]] = {k: [] for k in kinds}
            for run in range(args.runs):
                order = kinds if run % 2 == 0 else kinds[::-1]  # alternate: no order bias
                for kind in order:
                    rate, us = measure(port, kind, args.messages, qos, args.size)
                    results[kind].append(rate)
                    cpu[kind].append(us)
            med = {k: statistics.median(v) for k, v in results.items()}
            mcpu = {k: statistics.median(v) for k, v in cpu.items()}
            print(f"QoS {qos}:                        msg/s   ratio   CPU us/msg  runs (msg/s)")
            for k, label in (("paho", "paho threaded (loop_start)"),
                             ("gateway", "gateway source (10 Hz windows)"),
                             ("gateway-raw", "gateway source (raw readings)")):
                print(f"  {label:31s}{med[k]:7.0f}  {med[k] / med['paho']:5.2f}  "
                      f"{mcpu[k]:9.1f}     {' '.join(f'{x:.0f}' for x in results[k])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
