"""The sensor simulator's model: seeded, near its set points, drifting slowly."""

from __future__ import annotations

import itertools
import statistics

from edgegw.sim import SENSORS, SensorField, parse_broker


def test_the_same_seed_gives_the_same_readings() -> None:
    a, b = SensorField(5), SensorField(5)
    times = [1000 + i * 0.01 for i in range(200)]
    assert [a.sample(t) for t in times] == [b.sample(t) for t in times]
    assert SensorField(6).sample(1000.0) != SensorField(5).sample(1000.0)


def test_readings_stay_near_their_set_points_and_drift_slowly() -> None:
    field = SensorField(1)
    series = [field.sample(i * 0.1) for i in range(6000)]  # ten minutes at 10 Hz
    for k, spec in enumerate(SENSORS):
        values = [row[k] for row in series]
        spread = 10 * (spec.swing + spec.noise + spec.drift * 10) + 1e-9
        assert abs(statistics.mean(values) - spec.setpoint) < spread, spec.topic
        # consecutive readings differ by noise, not jumps
        steps = [abs(b - a) for a, b in itertools.pairwise(values)]
        assert max(steps) < 10 * spec.noise + spec.swing, spec.topic


def test_broker_addresses() -> None:
    assert parse_broker("10.0.0.5:1884") == ("10.0.0.5", 1884)
    assert parse_broker("broker.local") == ("broker.local", 1883)
