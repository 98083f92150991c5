"""``edgegw simulate --sensors``: handler and prober sensors publishing to MQTT.

Each sensor is a slow mean-reverting drift around its set point, a periodic swing (the
chamber's or the chiller's control cycle) and measurement noise, seeded so a run can be
repeated.  Readings go to ``ate/<tester>/<device>/<quantity>`` as JSON
``{"value": ..., "ts": ...}`` through the project's own Trio MQTT client (the same driver
the gateway's source uses: no paho thread).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import random
import sys
import time

import trio

from ..backoff import Backoff
from ..mqtt.client import ConnectOptions, TrioMqttClient

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class SensorSpec:
    topic: str  # below ate/<tester>/
    unit: str
    setpoint: float
    drift: float  # random-walk step per sqrt(second)
    reversion: float  # pull back to the set point per second (0..1)
    swing: float  # amplitude of the control cycle
    period: float  # seconds
    noise: float  # measurement noise (sigma)
    decimals: int


SENSORS: tuple[SensorSpec, ...] = (
    SensorSpec("handler/temp", "degC", 85.0, 0.05, 0.01, 0.4, 180.0, 0.03, 3),
    SensorSpec("handler/humidity", "%RH", 38.0, 0.1, 0.005, 1.5, 900.0, 0.2, 2),
    SensorSpec("handler/air_pressure", "kPa", 600.0, 0.5, 0.02, 3.0, 60.0, 0.8, 1),
    SensorSpec("prober/chuck_temp", "degC", 25.0, 0.02, 0.02, 0.15, 120.0, 0.01, 3),
    SensorSpec("prober/vacuum", "kPa", -82.0, 0.05, 0.05, 0.5, 30.0, 0.1, 2),
)


class SensorField:
    """The seeded state of every sensor; ``sample(t)`` advances it to time ``t``."""

    def __init__(self, seed: int, sensors: tuple[SensorSpec, ...] = SENSORS) -> None:
        self.rng = random.Random(seed)
        self.sensors = sensors
        self.offsets = [0.0] * len(sensors)
        self.phases = [self.rng.uniform(0, 2 * math.pi) for _ in sensors]
        self.t: float | None = None

    def sample(self, t: float) -> list[float]:
        dt = 0.0 if self.t is None else max(0.0, t - self.t)
        self.t = t
        out = []
        for i, s in enumerate(self.sensors):
            off = self.offsets[i] * (1 - min(1.0, s.reversion * dt))
            off += self.rng.gauss(0, s.drift * math.sqrt(dt))
            self.offsets[i] = off
            swing = s.swing * math.sin(2 * math.pi * t / s.period + self.phases[i])
            value = s.setpoint + off + swing + self.rng.gauss(0, s.noise)
            out.append(round(value, s.decimals))
        return out


def parse_broker(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep:
        return text, 1883
    try:
        return host or "127.0.0.1", int(port)
    except ValueError:
        raise SystemExit(f"edgegw simulate: --broker {text!r}: expected HOST:PORT") from None


async def publish_sensors(host: str, port: int, *, tester: str, rate: float, qos: int,
                          seed: int, duration: float, count: int = 0,
                          client_id: str = "") -> int:
    """Publish every sensor at ``rate`` messages/s until ``duration`` s or ``count``
    messages per sensor; returns the number of messages published (all acknowledged
    when ``qos`` is 1)."""
    options = ConnectOptions(host=host, port=port,
                             client_id=client_id or f"edgegw-sim-{tester}-{seed}",
                             clean_session=True)
    client = TrioMqttClient(options, backoff=Backoff(0.2, 5.0), name="sensor simulator")
    field = SensorField(seed)
    topics = [f"ate/{tester}/{s.topic}" for s in field.sensors]
    sent = 0
    tick = 0.01 if rate >= 100 else 1.0 / rate
    async with trio.open_nursery() as nursery:
        await nursery.start(client.run)
        await client.subscribed.wait()  # connected
        start = trio.current_time()
        wall0 = time.time()
        limit: float = math.inf
        if duration:
            limit = int(duration * rate)
        if count:
            limit = min(limit, count)
        n = 0  # messages per sensor so far; catches up after a late tick
        while n < limit:
            elapsed = trio.current_time() - start
            target = int(min(limit, elapsed * rate + 1))
            for k in range(n, target):
                ts = wall0 + k / rate
                for topic, value in zip(topics, field.sample(ts), strict=True):
                    await client.publish(topic, json.dumps({"value": value, "ts": round(ts, 6)}),
                                         qos=qos)
                    sent += 1
            n = max(n, target)
            await trio.sleep_until(start + (math.floor(elapsed / tick) + 1) * tick)
        with trio.move_on_after(10):
            await client.wait_all_acked()
        nursery.cancel_scope.cancel()
    return sent


def main(args: argparse.Namespace) -> int:
    host, port = parse_broker(args.broker)
    if args.rate <= 0:
        print("edgegw simulate: --rate must be > 0", file=sys.stderr)
        return 2
    sent = trio.run(lambda: publish_sensors(
        host, port, tester=args.tester, rate=args.rate, qos=args.qos, seed=args.seed,
        duration=args.duration, count=getattr(args, "count", 0) or 0))
    print(f"published {sent} messages to {host}:{port} (ate/{args.tester}/...)")
    return 0
