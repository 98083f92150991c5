"""The gateway's ``/healthz``: one stall rule, the store's, with its configured timeout."""

from __future__ import annotations

from pathlib import Path

import trio
from hubtools import gateway_config
from ports import free_port

from edgegw.gateway import Gateway
from edgegw.records import SensorReading


async def test_frames_never_acknowledged_turn_the_gateway_unhealthy_after_the_stall_timeout(
        tmp_path: Path) -> None:
    """A hub that never acknowledges (here: never there) is a stall once frames wait for
    ``queue.stall_timeout_s``, even though no ack ever came (the gateway used to judge
    only "60 s since the last ack", so a gateway never acknowledged stayed healthy)."""
    cfg = gateway_config(tmp_path / "gw", free_port(), queue={"stall_timeout_s": 0.2})
    gateway = Gateway(cfg)
    async with trio.open_nursery() as nursery:
        await nursery.start(gateway.run)
        assert gateway.healthy() == (True, "ok")
        await gateway.sink.put([SensorReading("s", 1.0, "c", 1.0)], source="s")
        with trio.fail_after(10):
            while gateway.healthy()[0]:
                await trio.sleep(0.02)
        ok, why = gateway.healthy()
        assert not ok and "frame(s) waiting, nothing acknowledged" in why
        nursery.cancel_scope.cancel()


async def test_the_disk_spool_stall_timeout_is_the_gateway_health_rule(
        tmp_path: Path) -> None:
    """With the spool, ``spool.stall_timeout_s`` alone decides, and says so."""
    cfg = gateway_config(tmp_path / "gw", free_port(), spool={"stall_timeout_s": 0.2})
    gateway = Gateway(cfg)
    async with trio.open_nursery() as nursery:
        await nursery.start(gateway.run)
        await gateway.sink.put([SensorReading("s", 1.0, "c", 1.0)], source="s")
        with trio.fail_after(10):
            while gateway.healthy()[0]:
                await trio.sleep(0.02)
        assert gateway.healthy()[1].startswith("spool: ")
        nursery.cancel_scope.cancel()
