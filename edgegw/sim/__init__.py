"""Simulated tester: a seeded, reproducible model of a multi-site wafer-sort tester, the
simulated source built on it, and the ``edgegw simulate`` tools (STDF files, MQTT sensors).

Public face: the names in ``__all__`` (``tester``, the model, as a module too); the
modules themselves are internal.
"""

from . import tester
from .sensor_source import SimulatedSensorsConfig, SimulatedSensorSource
from .sensors import SENSORS, SensorField, parse_broker, publish_sensors
from .source import SimulatedConfig, SimulatedTesterSource, simulated_batches
from .stdf_tester import stdf_chunks, stdf_file_bytes, write_files
from .tester import TesterModel, TesterProfile

__all__ = [
    "SENSORS", "SensorField", "SimulatedConfig", "SimulatedSensorSource",
    "SimulatedSensorsConfig", "SimulatedTesterSource", "TesterModel", "TesterProfile",
    "parse_broker", "publish_sensors", "simulated_batches", "stdf_chunks", "stdf_file_bytes",
    "tester", "write_files",
]
