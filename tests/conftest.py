"""Shared fixtures.  Each section below belongs to one area; keep them separate."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from ports import free_port

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def port() -> int:
    return free_port()


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() == "true"


# ---- mqtt: real Mosquitto brokers (fixtures live in tests/mqtt_broker.py) ---------------
from mqtt_broker import mqtt_broker, start_broker  # noqa: E402, F401

# ---- end mqtt ---------------------------------------------------------------------------

# ---- cluster: PostgreSQL (fixtures live in tests/cluster_pg.py) ----------------------------
# isort: split
from cluster_pg import pg_dsn, pg_server  # noqa: E402, F401

# ---- stdf: the compiled and the pure-Python record loop (tests/decoders.py) -----------------
from decoders import each_decoder, python_decoder  # noqa: E402, F401

# a real 2 MiB filesystem for disk-full tests; an ext4 of a test's own for inode reuse
from disktools import inode_fs, tiny_fs  # noqa: E402, F401

# ---- end cluster: PostgreSQL ---------------------------------------------------------------
from walltools import wall  # noqa: E402, F401


# ---- processes: none outlives the run -------------------------------------------------------
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Stop every edgegw process a test spawned and left running (each xdist worker its own):
    the machine after a run holds nothing of it."""
    from processes import stop_leftovers

    for command in stop_leftovers():
        print(f"conftest: stopped a process a test left running: {command}", file=sys.stderr)


# ---- skips keep their reason (skipreasons.py) -----------------------------------------------
from skipreasons import pytest_pyfunc_call  # noqa: E402, F401
