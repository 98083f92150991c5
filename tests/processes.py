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


#: every process ``spawn`` started that may still run (see ``stop_leftovers``)
_spawned: list[subprocess.Popen[bytes]] = []


def spawn(*args: str, log: Path | None = None, env: dict[str, str] | None = None,
          prefix: tuple[str, ...] = ()) -> subprocess.Popen[bytes]:
    """``edgegw *args`` in a process of its own (``prefix``: a command that runs it, e.g.
    ``nsenter`` into another network namespace)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    out = open(log, "ab") if log else subprocess.DEVNULL
    proc = subprocess.Popen([*prefix, sys.executable, "-m", "edgegw", *args], cwd=REPO,
                            env=env, stdout=out, stderr=subprocess.STDOUT)
    _spawned[:] = [p for p in _spawned if p.poll() is None]
    _spawned.append(proc)
    return proc


def stop_leftovers(timeout: float = 5.0) -> list[str]:
    """At the end of a test session: SIGTERM (then SIGKILL) every spawned process still
    running, and their command lines.  A test that skipped or failed between starting a
    hub and the ``try`` of its teardown left it running after the run ended (a skip on a
    machine without loop devices, found as four orphan hubs)."""
    left = [p for p in _spawned if p.poll() is None]
    for p in left:
        p.terminate()
    deadline = time.monotonic() + timeout
    for p in left:
        try:
            p.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    _spawned.clear()
    return [" ".join(map(str, p.args)) for p in left]  # type: ignore[arg-type]


def get_json(url: str, timeout: float = 2.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


def wait_for(predicate: Any, timeout: float = 20.0, interval: float = 0.1,
             proc: subprocess.Popen[bytes] | None = None, log: Path | None = None) -> Any:
    """Poll ``predicate`` until it is true.  With ``proc``: fail at once if that process
    has exited (a hub that could not bind its port, say), with the tail of its ``log``,
    rather than wait out the timeout and leave the cause unknown."""
    deadline = time.monotonic() + timeout
    last_exc: Exception | None = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            tail = log.read_text(errors="replace")[-2000:] if log and log.exists() else ""
            raise AssertionError(f"process exited with code {proc.returncode} before the "
                                 f"condition was met:\n{tail}")
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
