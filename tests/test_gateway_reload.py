"""SIGHUP on a gateway (``systemctl reload``): the config file read again and the gateway
restarted from it inside the process -- nothing lost, nothing twice -- while a file that
does not load, or a gateway that does not start from it, leaves one running
(docs/operations.md, "Reload")."""

from __future__ import annotations

import os
import signal
import socket
import time
from pathlib import Path

import trio
from faultkit import Gateway, Hub, all_arrive_once, source_settings, stop_all
from processes import REPO, wait_for

from edgegw.gateway import GatewayConfig, GatewayReloader, build_gateway_config

# about 12 s of a simulated tester at 500 parts/s: the reloads land mid-run
SOURCE = {"parts_per_second": 500, "max_parts": 6000, "seed": 11, "wafers": 100}


def reloads(gw: Gateway) -> dict[str, float]:
    """The gateway's reload outcomes, as its /api/stats shows its metrics."""
    counts = gw.stats()["metrics"].get("gateway_config_reloads_total", {})
    return {key.split("=", 1)[1]: value for key, value in counts.items()}


def records_in(gw: Gateway) -> dict[str, float]:
    counts = gw.stats()["metrics"].get("gateway_records_in_total", {})
    return {key.split("=", 1)[1]: value for key, value in counts.items()}


def test_a_reload_restarts_the_gateway_from_the_edited_file_and_a_broken_file_changes_nothing(
        tmp_path: Path) -> None:
    conf = tmp_path / "gateway.toml"
    original = (REPO / "conf" / "gateway.toml").read_text()
    conf.write_text(original)

    class FileGateway(Gateway):
        config = conf

    hub = Hub(tmp_path).start()
    gw = FileGateway(tmp_path, hub.port, *source_settings(**SOURCE))
    try:
        gw.start()
        assert gw.proc is not None
        pid = gw.proc.pid
        wait_for(lambda: records_in(gw).get("sensors", 0) > 0 and records_in(gw).get(
            "tester", 0) > 0)
        assert reloads(gw) == {"ok": 0, "failed": 0}

        # the sensors source taken out of the file: the gateway runs again without it
        sensors_at = original.index('name = "sensors"')
        conf.write_text(original[:original.rindex("[[sources]]", 0, sensors_at)])
        before = records_in(gw)
        gw.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: reloads(gw).get("ok") == 1, timeout=30)
        # the counts go on across the reload (a restart inside the process)
        after = records_in(gw)
        assert after["tester"] >= before["tester"] and after["sensors"] >= before["sensors"]
        wait_for(lambda: records_in(gw)["tester"] > after["tester"])
        sensors = records_in(gw)["sensors"]
        time.sleep(1.5)  # a sensor window is sent every second: none comes now
        assert records_in(gw)["sensors"] == sensors

        # a file broken mid-edit: logged and counted, the gateway goes on as it was
        conf.write_text("[gateway\nid = ")
        gw.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: reloads(gw) == {"ok": 1, "failed": 1}, timeout=30)
        tester_before = records_in(gw)["tester"]
        wait_for(lambda: records_in(gw)["tester"] > tester_before)
        assert gw.proc.poll() is None and gw.proc.pid == pid  # never left the process

        # every tester record across both reloads, exactly once
        all_arrive_once(hub, gw, **SOURCE)
        log = (tmp_path / "gw.log").read_text()
        assert "SIGHUP: the config file was not reloaded, the gateway goes on as it was" in log
        assert "gateway.toml" in log.split("was not reloaded", 1)[1].split("\n", 1)[0]
    finally:
        stop_all(hub, gw)


async def test_a_gateway_that_does_not_start_from_the_file_read_again_runs_on_the_one_before(
        tmp_path: Path) -> None:
    # The new file asks for a status port another program holds: the gateway stopped for
    # the reload cannot start from it, so it starts again from the config it ran with.
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        held = taken.getsockname()[1]

        def config(status_port: int) -> GatewayConfig:
            return build_gateway_config({
                "gateway": {"id": "ate-01", "token": "t", "state_dir": str(tmp_path / "gw"),
                            "hub_url": "ws://127.0.0.1:9/ws/gateway",
                            "status_port": status_port},
                "uplink": {"probe_interval_s": 0.2},
                "sources": [{"name": "tester", "type": "simulated", "parts_per_second": 20}],
            }, "test")

        before = config(0)
        reader = GatewayReloader(before, lambda: config(held))
        async with trio.open_nursery() as nursery:
            first = await nursery.start(reader.run)
            os.kill(os.getpid(), signal.SIGHUP)
            with trio.fail_after(30):
                while reader.gateway is first:
                    await trio.sleep(0.05)
            now = reader.gateway
            assert now.config is before and now.status_port is None
            assert now.metrics.as_dict()["gateway_config_reloads_total"] == {
                "outcome=ok": 0, "outcome=failed": 1}
            # the gateway started again is running: its source makes records
            with trio.fail_after(30):
                while now.metrics.as_dict().get("gateway_records_in_total", {}).get(
                        "source=tester", 0) == 0:
                    await trio.sleep(0.05)
            nursery.cancel_scope.cancel()
