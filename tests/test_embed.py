"""A test program embeds the gateway in its own process and its results reach the hub."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest
from ports import free_port
from processes import REPO, get_json, spawn, stop, wait_for

from edgegw import EmbeddedGateway
from edgegw.records import PartResult


def test_an_embedded_gateway_leaves_the_programs_collector_alone_the_command_sets_its_own(
        tmp_path: Path) -> None:
    """The cyclic collector's thresholds are process-wide: `edgegw gateway` raises the young
    one for its own process (``tune_gc``); an embedded gateway runs with the program's."""
    import gc

    from edgegw.gateway import GC_YOUNG_THRESHOLD, tune_gc

    before = gc.get_threshold()
    gw = EmbeddedGateway({"gateway": {"id": "ate-01", "token": "t", "state_dir": str(tmp_path),
                                      "hub_url": f"ws://127.0.0.1:{free_port()}/ws/gateway"}},
                         drain_timeout=0.1)  # no hub: nothing will be acknowledged
    try:
        gw.put([PartResult("testprog", time.time(), "L1", "W1", 1, 0, "1", 0, 0, 1, 1, True)])
        assert gc.get_threshold() == before
    finally:
        gw.close()
    try:
        tune_gc()
        assert gc.get_threshold() == (GC_YOUNG_THRESHOLD, *before[1:])
    finally:
        gc.set_threshold(*before)


def test_a_threaded_program_puts_results_and_the_hub_applies_every_one(tmp_path: Path) -> None:
    port = free_port()
    hub: subprocess.Popen[bytes] = spawn(
        "hub", "--config", str(REPO / "conf" / "hub.toml"), "--set", f"hub.port={port}",
        "--set", f"hub.data_dir={tmp_path / 'hub'}", log=tmp_path / "hub.log")
    try:
        wait_for(lambda: get_json(f"http://127.0.0.1:{port}/healthz"), timeout=60, proc=hub,
                 log=tmp_path / "hub.log")
        gw = EmbeddedGateway({
            "gateway": {"id": "ate-01", "token": "change-me-ate-01",
                        "hub_url": f"ws://127.0.0.1:{port}/ws/gateway",
                        "state_dir": str(tmp_path / "gw")},
            "batch": {"max_records": 50, "max_delay_ms": 20},
        })
        for i in range(300):  # like a test program's end-of-part hook
            gw.put([PartResult("testprog", time.time(), "L1", "W1", 1, i % 4, str(i),
                               i % 20, i // 20, 1, 1, True)])
        gw.close()  # flushes and waits for the acks
        stats = get_json(f"http://127.0.0.1:{port}/api/stats")["gateways"]["ate-01"]
        assert stats["records_applied"] == 300
    finally:
        stop(hub)


def test_a_forked_child_is_told_the_gateway_is_its_parents_instead_of_waiting_for_ever(
        tmp_path: Path) -> None:
    """A test program that forks (``multiprocessing``'s default on Linux) hands its
    children the gateway object but not its thread: a ``put`` there raised nothing and
    waited for ever, holding the tester.  It now raises at once; ``close`` in the child is
    a no-op; the parent's gateway is untouched."""
    import os
    import signal
    import warnings

    gw = EmbeddedGateway({"gateway": {"id": "ate-01", "token": "t", "state_dir": str(tmp_path),
                                      "hub_url": f"ws://127.0.0.1:{free_port()}/ws/gateway"}},
                         drain_timeout=0.1)  # no hub: nothing will be acknowledged
    part = PartResult("testprog", time.time(), "L1", "W1", 1, 0, "1", 0, 0, 1, 1, True)
    try:
        read, write = os.pipe()
        with warnings.catch_warnings():  # 3.12+: fork() with threads running
            warnings.simplefilter("ignore", DeprecationWarning)
            pid = os.fork()
        if pid == 0:  # the child: report, and leave without running the parent's cleanup
            signal.alarm(10)  # a put that waits for ever ends the child here
            try:
                gw.put([part])
                said = "put returned"
            except RuntimeError as exc:
                said = f"{exc} | close: {gw.close()}"
            os.write(write, said.encode())
            os._exit(0)
        os.close(write)
        _, status = os.waitpid(pid, 0)
        with os.fdopen(read, "rb") as pipe:
            said = pipe.read().decode()
        assert os.WIFEXITED(status), "the child's put waited until the alarm killed it"
        assert said == (f"this embedded gateway runs in process {os.getpid()}, not in this "
                        "forked child: start one in the child, with a state_dir of its own"
                        " | close: False")
        gw.put([part])  # the parent's gateway goes on
        assert gw.stats()["metrics"]["gateway_records_in_total"] == {"source=embedded": 1}
    finally:
        gw.close()


def test_after_close_put_and_stats_say_the_gateway_is_closed(tmp_path: Path) -> None:
    gw = EmbeddedGateway({"gateway": {"id": "ate-01", "token": "t", "state_dir": str(tmp_path),
                                      "hub_url": f"ws://127.0.0.1:{free_port()}/ws/gateway"}},
                         drain_timeout=0.1)
    assert gw.close() is True  # nothing put: nothing waits for the hub
    for call in (lambda: gw.put([]), gw.stats):
        with pytest.raises(RuntimeError, match=r"^the embedded gateway is closed$"):
            call()


def test_a_program_that_ends_without_close_still_delivers_what_it_put(tmp_path: Path) -> None:
    """A test program that ends on an exception or ``sys.exit`` in a hook never calls
    ``close()``; the interpreter would stop the gateway's daemon thread with the records of
    the batch being gathered inside (here a whole minute's: ``max_delay_ms``).  At exit the
    gateway closes itself: everything put reaches the hub, and the program's own exit
    status and traceback are what they were."""
    import sys
    import textwrap

    port = free_port()
    hub: subprocess.Popen[bytes] = spawn(
        "hub", "--config", str(REPO / "conf" / "hub.toml"), "--set", f"hub.port={port}",
        "--set", f"hub.data_dir={tmp_path / 'hub'}", log=tmp_path / "hub.log")
    program = textwrap.dedent(f"""
        import time
        import edgegw
        from edgegw.records import PartResult
        gw = edgegw.EmbeddedGateway({{
            "gateway": {{"id": "ate-01", "token": "change-me-ate-01",
                        "hub_url": "ws://127.0.0.1:{port}/ws/gateway",
                        "state_dir": {str(tmp_path / "gw")!r}}},
            "batch": {{"max_records": 10000, "max_delay_ms": 60000}},
        }})
        for i in range(40):
            gw.put([PartResult("testprog", time.time(), "L1", "W1", 1, 0, str(i), i, 0, 1, 1,
                               True)])
        raise RuntimeError("the handler lost contact")  # and no close()
    """)
    try:
        wait_for(lambda: get_json(f"http://127.0.0.1:{port}/healthz"), timeout=60, proc=hub,
                 log=tmp_path / "hub.log")
        ended = subprocess.run([sys.executable, "-c", program], capture_output=True,
                               text=True, timeout=60)
        assert ended.returncode == 1
        assert "RuntimeError: the handler lost contact" in ended.stderr
        stats = get_json(f"http://127.0.0.1:{port}/api/stats")["gateways"]["ate-01"]
        assert stats["records_applied"] == 40
        assert "exits without closing its embedded gateway" in ended.stderr
    finally:
        stop(hub)


def test_a_put_of_something_that_is_not_a_record_is_a_type_error_in_the_callers_thread(
        tmp_path: Path) -> None:
    """The test program's mistake is told to the test program, at the line that made it;
    nothing of that put is taken, and the gateway runs on."""
    gw = EmbeddedGateway({"gateway": {"id": "ate-01", "token": "t", "state_dir": str(tmp_path),
                                      "hub_url": f"ws://127.0.0.1:{free_port()}/ws/gateway"}},
                         drain_timeout=0.1)
    part = PartResult("testprog", time.time(), "L1", "W1", 1, 0, "1", 0, 0, 1, 1, True)
    try:
        with pytest.raises(TypeError, match=r"^put takes records of edgegw.records .*; got a "
                                            r"dict: \{'part_id': '2'\}$"):
            gw.put([part, {"part_id": "2"}])
        with pytest.raises(TypeError, match=r"got a PartResult: PartResult\(source=None, "):
            gw.put([part._replace(source=None)])
        gw.put(r for r in [part])  # any iterable of records
        assert gw.stats()["metrics"]["gateway_records_in_total"] == {"source=embedded": 1}
    finally:
        gw.close()
