"""The built-in simulated sensor source: handler and prober sensors, no broker needed.

The same seeded sensor model as ``edgegw simulate --sensors`` (``edgegw.sim.sensors``:
handler temperature, humidity and air pressure, prober chuck temperature and vacuum), read
``rate`` times a second per sensor and throttled to one window per sensor every
``window_s`` by the gateway's own throttle, as the MQTT source does for a real feed.  It
gives ``edgegw demo`` and the example configs a sensor feed on a machine without a broker.

Channels are named ``<tester>.<device>.<quantity>`` (``ate-01.handler.temp``), as the
example MQTT config names them.  Readings are sampled live, so there is nothing to replay:
the source keeps no checkpoint (``replays`` is False).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Annotated, ClassVar

import trio

from ..config import Range
from ..records import Record
from ..sources import RecordSink, SourceContext
from ..throttle import Throttle, Window, as_sensor_window
from .sensors import SENSORS, SensorField


@dataclasses.dataclass(frozen=True)
class SimulatedSensorsConfig:
    tester: str = "ate-01"  # first part of every channel name
    rate: Annotated[float, Range(0.1, 10_000)] = 50.0  # readings per second per sensor
    window_s: Annotated[float, Range(0.05, 3600)] = 1.0  # one window per sensor per this
    seed: Annotated[int, Range()] = 1

    def validate(self) -> list[tuple[str, str]]:
        return [("tester", "must not be empty")] if not self.tester else []


class SimulatedSensorSource:
    Config: ClassVar[type] = SimulatedSensorsConfig

    def __init__(self, name: str, config: SimulatedSensorsConfig,
                 context: SourceContext) -> None:
        self.name = name
        self.config = config
        self.context = context
        self.channels = [f"{config.tester}.{s.topic.replace('/', '.')}" for s in SENSORS]
        self.units = {ch: s.unit for ch, s in zip(self.channels, SENSORS, strict=True)}
        self.readings = 0
        self.windows = 0

    def sample(self, field: SensorField, throttle: Throttle, t0: float, k0: int,
               k1: int) -> list[Window]:
        """Readings ``k0 .. k1-1`` of every sensor (reading k is due at ``t0 + k/rate``), and
        the windows they closed: each reading lands in the window its own time falls in."""
        closed: list[Window] = []
        for k in range(k0, k1):
            ts = t0 + k / self.config.rate
            closed += throttle.poll(ts)
            for channel, value in zip(self.channels, field.sample(ts), strict=True):
                throttle.add(channel, value, ts)
        self.readings += (k1 - k0) * len(self.channels)
        return closed

    async def run(self, sink: RecordSink, *,
                  task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        c = self.config
        field = SensorField(c.seed)
        throttle = Throttle(c.window_s)
        task_status.started()
        # Wall time stamps the readings; Trio's clock paces them.  A late wake-up samples
        # every reading it missed, so a busy machine delays windows but thins nothing.
        wall0, start = time.time(), trio.current_time()
        throttle.poll(wall0)  # the window grid starts here
        tick = max(1.0 / c.rate, 0.01)
        done = n = 0
        while True:
            elapsed = trio.current_time() - start
            due = int(elapsed * c.rate) + 1
            windows = self.sample(field, throttle, wall0, done, due)
            done = due
            windows += throttle.poll(wall0 + elapsed)
            if windows:
                records: list[Record] = [as_sensor_window(w, self.name, self.units[w.channel])
                                         for w in windows]
                await sink.put(records)
                self.windows += len(records)
            # the next tick on the grid, counted (not recomputed from a float) so the wait
            # is never zero; ticks missed by a late wake-up are skipped
            n = max(n + 1, int(elapsed / tick) + 1)
            await trio.sleep_until(start + n * tick)
