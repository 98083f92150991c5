"""Run edgegw commands as real processes for end-to-end and fault tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def spawn(*args: str, log: Path | None = None, env: dict[str, str] | None = None,
          prefix: tuple[str, ...] = ()) -> subprocess.Popen[bytes]:
    """``edgegw *args`` in a process of its own (``prefix``: a command that runs it, e.g.
    ``nsenter`` into another network namespace)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    out = open(log, "ab") if log else subprocess.DEVNULL
    return subprocess.Popen([*prefix, sys.executable, "-m", "edgegw", *args], cwd=REPO,
                            env=env, stdout=out, stderr=subprocess.STDOUT)


def get_json(url: str, timeout: float = 2.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


def wait_for(predicate: Any, timeout: float = 20.0, interval: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    last_exc: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except Exception as exc:  # not up yet
            last_exc = exc
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout} s (last error: {last_exc})")


def stop(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
