"""docs/embedding.md's worked example runs: a threaded test program with an embedded
gateway publishes a lot to a real hub, whether the hub is up at the start, comes up while
the program runs, or stays down until the program's next run; and the code the doc shows
is the example's code."""

from __future__ import annotations

import json
import re
import selectors
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from ports import free_port
from processes import REPO, get_json, spawn, stop, wait_for

EXAMPLE = REPO / "examples" / "embedded_test_program.py"
DOC = REPO / "docs" / "embedding.md"
GATEWAY = "ate-01"  # conf/hub.toml's gateway, the example's default


def start_example(port: int, state: Path, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(EXAMPLE), "--hub", f"ws://127.0.0.1:{port}/ws/gateway",
         "--state-dir", str(state), "--parts-per-second", "0", *args],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def read_line(proc: subprocess.Popen[str], timeout: float = 60.0) -> str:
    """The program's next line of output (its stdout is a pipe: a deadline, not a hang)."""
    assert proc.stdout is not None
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        assert sel.select(timeout), f"no output within {timeout} s"
    return proc.stdout.readline()


def finish(proc: subprocess.Popen[str], timeout: float = 180.0) -> tuple[int, dict[str, Any]]:
    """The exit status and the summary (last line) of a run of the example."""
    out, err = proc.communicate(timeout=timeout)
    lines = out.strip().splitlines()
    assert lines, err
    return proc.returncode, json.loads(lines[-1])


@pytest.fixture
def hub_port(tmp_path: Path) -> Iterator[tuple[int, list[subprocess.Popen[bytes]]]]:
    """A port for a hub, and a list to put the hub process in (stopped at the end)."""
    procs: list[subprocess.Popen[bytes]] = []
    yield free_port(), procs
    for proc in procs:
        stop(proc)


def start_hub(port: int, tmp: Path) -> subprocess.Popen[bytes]:
    hub = spawn("hub", "--config", str(REPO / "conf" / "hub.toml"), "--set", f"hub.port={port}",
                "--set", f'hub.data_dir="{tmp / "hub"}"', log=tmp / "hub.log")
    wait_for(lambda: get_json(f"http://127.0.0.1:{port}/healthz"), timeout=60)
    return hub


def applied(port: int) -> int:
    return get_json(f"http://127.0.0.1:{port}/api/stats")["gateways"][GATEWAY]["records_applied"]


def assert_lot_on_the_hub(port: int, lot: str, parts: int) -> None:
    """The lot as the hub shows it: every die on its wafer maps, every test value counted."""
    base = f"http://127.0.0.1:{port}/api"
    wafers = get_json(f"{base}/lots/{lot}/wafers")["wafers"]
    assert sum(w["die_count"] for w in wafers) == parts
    assert all(w["status"] == "closed" and w["parts"] == w["die_count"] for w in wafers)
    for test_num in (100, 110, 120):
        assert get_json(f"{base}/tests/{lot}/{test_num}")["executions"] == parts
    lots = {entry["lot_id"]: entry for entry in get_json(f"{base}/lots")["lots"]}
    assert lots[lot]["status"] == "closed" and lots[lot]["job_name"] == "embedded_example.py"


def test_the_example_publishes_a_lot_to_a_running_hub(
        tmp_path: Path, hub_port: tuple[int, list[subprocess.Popen[bytes]]]) -> None:
    port, procs = hub_port
    procs.append(start_hub(port, tmp_path))
    status, summary = finish(start_example(port, tmp_path / "prog"))
    assert (status, summary["delivered"]) == (0, True)
    assert summary["parts"] == 2 * 208  # two 16-die-wide wafers
    assert applied(port) == summary["records"] == 2 + 2 * (2 + 208 * 4)
    assert_lot_on_the_hub(port, "EMB0001", summary["parts"])


def test_a_hub_that_is_down_at_the_start_gets_everything_once_it_is_up(
        tmp_path: Path, hub_port: tuple[int, list[subprocess.Popen[bytes]]]) -> None:
    port, procs = hub_port
    prog = start_example(port, tmp_path / "prog", "--wafers", "3", "--drain-timeout", "120")
    # the program tests its first wafer with nowhere to send it: its hooks do not wait
    assert read_line(prog).startswith("wafer EMB0001-W01: 208 parts")
    procs.append(start_hub(port, tmp_path))
    status, summary = finish(prog)
    assert (status, summary["delivered"]) == (0, True)
    assert applied(port) == summary["records"]
    assert_lot_on_the_hub(port, "EMB0001", summary["parts"])


def test_what_a_down_hub_did_not_take_goes_on_the_programs_next_run(
        tmp_path: Path, hub_port: tuple[int, list[subprocess.Popen[bytes]]]) -> None:
    port, procs = hub_port
    state = tmp_path / "prog"
    started = time.monotonic()
    status, first = finish(start_example(port, state, "--drain-timeout", "1"))
    assert (status, first["delivered"]) == (1, False)  # said so, and exit status 1
    assert time.monotonic() - started < 60  # bounded by --drain-timeout, not the hub
    procs.append(start_hub(port, tmp_path))
    status, second = finish(start_example(port, state, "--lot", "EMB0002", "--wafers", "1"))
    assert (status, second["delivered"]) == (0, True)
    assert applied(port) == first["records"] + second["records"]  # each once
    assert_lot_on_the_hub(port, "EMB0001", first["parts"])
    assert_lot_on_the_hub(port, "EMB0002", second["parts"])


def test_the_code_in_the_doc_is_the_examples_code() -> None:
    """Each ```python block of docs/embedding.md that says it is from the example is a
    verbatim part of it."""
    source = EXAMPLE.read_text()
    blocks = re.findall(r"```python\n# from examples/embedded_test_program.py\n(.*?)```",
                        DOC.read_text(), flags=re.S)
    assert len(blocks) >= 2
    for block in blocks:
        assert block in source, block[:200]
