"""The gateway's ``/healthz``: one stall rule, the store's, with its configured timeout."""

from __future__ import annotations

from pathlib import Path

import trio
from disktools import fill_to_the_last_byte
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


async def test_a_gateway_restarted_on_a_full_disk_starts_reports_it_and_goes_on(
        tiny_fs: Path) -> None:
    """Its spool cannot open the segment a restart opens: the gateway starts all the same
    (it used to die with ENOSPC), says "spool: disk full", keeps the spooled frames, and
    takes records again once there is room."""
    cfg = gateway_config(tiny_fs / "gw", free_port(), spool={"segment_bytes": 64 << 10})
    gateway = Gateway(cfg)
    async with trio.open_nursery() as nursery:
        await nursery.start(gateway.run)
        for i in range(20):
            await gateway.sink.put([SensorReading("s", float(i), "c", 1.0)], source="s")
        await gateway.flush()
        nursery.cancel_scope.cancel()
    frames = gateway.store.unacked_frames()
    assert frames > 0
    filler = fill_to_the_last_byte(tiny_fs)

    gateway = Gateway(cfg)
    async with trio.open_nursery() as nursery:
        with trio.fail_after(30):
            await nursery.start(gateway.run)
        assert gateway.healthy() == (False, "spool: disk full")
        assert gateway.store.unacked_frames() == frames
        filler.unlink()
        with trio.fail_after(30):
            while not gateway.healthy()[0]:
                await trio.sleep(0.05)
            durable = gateway.store.durable_seq
            await gateway.sink.put([SensorReading("s", 99.0, "c", 1.0)], source="s")
            await gateway.flush()
        assert gateway.store.durable_seq > durable
        nursery.cancel_scope.cancel()
