"""Shared fixtures.  Each section below belongs to one area; keep them separate."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def port() -> int:
    return free_port()


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() == "true"


# ---- mqtt: real Mosquitto brokers (fixtures live in tests/mqtt_broker.py) ---------------
from mqtt_broker import mqtt_broker, start_broker  # noqa: E402, F401

# ---- end mqtt ---------------------------------------------------------------------------
