"""The real tester files in ``shared/data/stdf`` (see its README), for fidelity tests.

The repository, and CI's clone, sit beside ``shared/``: ``<dir>/<repo>/tests/this_file``.
``EDGEGW_SHARED_DATA`` names the STDF directory explicitly.  A missing file skips the test
with one line, except under CI (``CI=true``), where it fails.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import pytest

GALAXY = "galaxy-a530-lot2.stdf.gz"
METIS = "metis-d10-2site.std"


def stdf_dir() -> Path:
    env = os.environ.get("EDGEGW_SHARED_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data" / "stdf"


def stdf_path(name: str) -> Path:
    """The path of a shared STDF file; skips (fails under CI) when it is not there."""
    path = stdf_dir() / name
    if not path.exists():
        if os.environ.get("CI") == "true":
            pytest.fail(f"{path} is missing (under CI the shared STDF data must be present)")
        pytest.skip(f"shared STDF data not found at {path}")
    return path


def stdf_bytes(name: str) -> bytes:
    """The file's STDF bytes, decompressed when it is gzipped."""
    data = stdf_path(name).read_bytes()
    return gzip.decompress(data) if name.endswith(".gz") else data
