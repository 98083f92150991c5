"""How fast the gateway's MQTT source ingests, beside paho's own threaded client.

Usage: python bench/mqtt.py [--messages 30000] [--runs 5] [--qos 0 1] [--size 200]

For a fair race both clients drain the same thing from the same broker: the bench starts
its own Mosquitto (free port, the "nothing lost" settings of docs/mqtt.md: no queue limit,
no in-flight limit; QoS 0 queued for offline sessions), and for each measurement creates a
persistent session, disconnects it, preloads N messages into the broker's queue for it,
then times the client from connect to the N-th message.  No publisher competes for the
CPU while a client drains.

- paho: ``loop_start()`` (paho's network thread), ``on_message`` counts, paho sends each
  PUBACK as soon as the callback returns;
- gateway: the real gateway service (``Gateway``: batcher, frame encoding, the disk spool
  with its fsyncs, in a temporary directory; the hub is unreachable, so frames stay in the
  spool) with one ``MqttSource`` (the Trio driver, the topic route, the JSON decoder and
  the throttle to 10 Hz windows), and with ``raw = true``.  For QoS 1 it acknowledges each
  message only once its frame is durable.

Prints messages/s per client (median of the runs) from connect to the N-th message
received, the ratio gateway / paho, and the CPU time of the bench process per message
(less sensitive to other load on the machine than the wall-clock rate).  For QoS 1 also
the rate to the N-th PUBACK ("acked"): for the gateway that includes the last window
(100 ms), the batcher's delay (100 ms) and an fsync, so it trails ingest on short runs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
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
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import trio
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from edgegw.config import build
from edgegw.gateway.config import GatewayConfig
from edgegw.gateway.service import Gateway
from edgegw.mqtt.client import ConnectOptions, TrioMqttClient
from edgegw.mqtt.source import MqttSource

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
            "max_queued_messages 0", "max_inflight_messages 0", "queue_qos0_messages true",
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


async def drain_gateway(port: int, client_id: str, n: int, qos: int, raw: bool,
                        state_dir: str) -> tuple[float, float]:
    """(messages/s to the N-th message received, to the N-th PUBACK sent)."""
    config = build(GatewayConfig, {
        "gateway": {"id": "bench", "token": "x", "state_dir": state_dir,
                    "hub_url": f"ws://127.0.0.1:{free_port()}/ws/gateway"},
        "spool": {},
        "sources": [{
            "name": "bench", "type": "mqtt", "port": port, "client_id": client_id,
            "clean_session": False, "qos": qos,
            "subscriptions": [{"topic": "ate/+/handler/temp", "channel": "{1}.handler.temp",
                               "timestamp_field": "ts", "raw": raw, "rate": 10.0}]}]})
    gateway = Gateway(config)
    logging.getLogger("edgegw").setLevel(logging.ERROR)  # "hub link down", over and over
    async with trio.open_nursery() as nursery:
        # Started = the spool recovered, the source types looked up, the source's client
        # about to connect: from here on it is the race paho runs from its connect().
        await nursery.start(gateway.run)
        t0 = time.perf_counter()
        ((_, source),) = gateway.sources
        assert isinstance(source, MqttSource)
        while source.received < n:  # a plain counter, polled every 2 ms
            await trio.sleep(0.002)
        received = time.perf_counter() - t0
        while qos and source.acked < n:
            await trio.sleep(0.002)
        acked = time.perf_counter() - t0
        nursery.cancel_scope.cancel()
    return n / received, n / acked


def measure(port: int, kind: str, n: int, qos: int, size: int) -> tuple[float, float, float]:
    """(messages/s received, messages/s acknowledged, CPU µs of this process per message)
    for one drain."""
    client_id = f"bench-{kind}-{uuid.uuid4().hex[:8]}"
    create_session(port, client_id, qos)
    trio.run(_preload, port, n, qos, size)
    cpu0 = time.process_time()
    if kind == "paho":
        rate = acked = drain_paho(port, client_id, n)
    else:
        with tempfile.TemporaryDirectory() as state_dir:
            rate, acked = trio.run(drain_gateway, port, client_id, n, qos,
                                   kind == "gateway-raw", state_dir)
    return rate, acked, (time.process_time() - cpu0) / n * 1e6


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
        worst = math.inf
        for qos in args.qos:
            results: dict[str, list[float]] = {k: [] for k in kinds}
            acks: dict[str, list[float]] = {k: [] for k in kinds}
            cpu: dict[str, list[float]] = {k: [] for k in kinds}
            for run in range(args.runs):
                order = kinds if run % 2 == 0 else kinds[::-1]  # alternate: no order bias
                for kind in order:
                    rate, acked, us = measure(port, kind, args.messages, qos, args.size)
                    results[kind].append(rate)
                    acks[kind].append(acked)
                    cpu[kind].append(us)
            med = {k: statistics.median(v) for k, v in results.items()}
            mack = {k: statistics.median(v) for k, v in acks.items()}
            mcpu = {k: statistics.median(v) for k, v in cpu.items()}
            print(f"QoS {qos}:                        msg/s   ratio   CPU us/msg"
                  f"{'   acked/s' if qos else ''}  runs (msg/s)")
            for k, label in (("paho", "paho threaded (loop_start)"),
                             ("gateway", "gateway source (10 Hz windows)"),
                             ("gateway-raw", "gateway source (raw readings)")):
                ratio = med[k] / med["paho"]
                if k != "paho":
                    worst = min(worst, ratio)
                print(f"  {label:31s}{med[k]:7.0f}  {ratio:5.2f}  {mcpu[k]:9.1f}"
                      f"{f'  {mack[k]:8.0f}' if qos else ''}"
                      f"     {' '.join(f'{x:.0f}' for x in results[k])}")
        print(f"lowest ingest ratio gateway / paho: {worst:.2f} (target >= 0.80)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
