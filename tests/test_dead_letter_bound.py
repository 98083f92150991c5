"""The dead-letter file's bound (``gateway.dead_letter_max_bytes``): past it the gateway
sends no more frames -- they wait in the spool, under its cap -- until the file is
smaller, then sends them all.  A hub that rejects every frame would otherwise fill the
tester's disk with the file, which has no other bound (docs/spool.md, "The dead-letter
file").  Real hub and gateway processes; the rejected frames are ones the hub can never
accept (bodies that are not CBOR), put in the stopped gateway's spool."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import trio
from faultkit import (
    Gateway,
    Hub,
    all_arrive_once,
    hub_records,
    source_settings,
    stop_all,
)
from hubtools import gateway_welcomed
from peer_hub import DATA, PeerHub, welcome
from processes import wait_for

from edgegw.records import SensorReading
from edgegw.spool import DiskSpool, SpoolConfig

# about 15 s of a slow simulated tester: it is still producing while the gateway holds
SOURCE = {"parts_per_second": 200, "max_parts": 3000, "seed": 9, "wafers": 200}
POISON = b"\xff not cbor " + b"x" * 600_000  # 600 kB: two are over 1 MiB


def test_past_its_bound_the_gateway_holds_its_frames_until_the_file_is_moved_away(
        tmp_path: Path) -> None:
    hub = Hub(tmp_path)  # not started yet: the first frames wait in the spool
    gw = Gateway(tmp_path, hub.port, *source_settings(**SOURCE),
                 "--set", "gateway.dead_letter_max_bytes=1048576")
    dead = gw.state / "dead-letter.cborseq"
    try:
        gw.start()
        wait_for(lambda: gw.stats()["store"]["frames"] >= 3, timeout=30, interval=0.05)
        gw.stop()

        async def poison() -> list[int]:
            async with DiskSpool.open(SpoolConfig(dir=str(gw.spool))) as spool:
                return [await spool.append(POISON, 1, {}) for _ in range(2)]
        trio.run(poison)
        hub.start()
        gw.start()

        def full() -> bool:
            return gw.stats()["metrics"].get("uplink_dead_letter_full") == 1
        wait_for(full, timeout=30, interval=0.05)
        assert dead.stat().st_size > 1 << 20
        # held: the tester goes on, its frames wait in the spool and none reaches the hub
        time.sleep(1.0)  # (frames sent before the hold are applied meanwhile)
        applied = len(hub_records(hub.dir)[0])
        waiting = gw.stats()["store"]["frames"]
        time.sleep(2.0)
        assert len(hub_records(hub.dir)[0]) == applied
        assert gw.stats()["store"]["frames"] > waiting
        assert full()
        status = subprocess.run([sys.executable, "-m", "edgegw", "status", "--url",
                                 f"http://127.0.0.1:{gw.status}"], capture_output=True,
                                text=True, timeout=60)
        assert status.returncode == 1 and "HELD:     the dead-letter file" in status.stdout

        # the operator moves the file away: the frames go, every record once
        dead.rename(gw.state / "dead-letter.moved.cborseq")
        wait_for(lambda: not full(), timeout=30, interval=0.05)
        all_arrive_once(hub, gw, **SOURCE)
        assert hub.stats()["frames_rejected"] == 2
        assert gw.stats()["metrics"]["uplink_frames_rejected_total"] == 2
    finally:
        stop_all(hub, gw)


async def test_a_refused_record_that_takes_the_file_over_its_bound_holds_the_frames_too(
        tmp_path: Path) -> None:
    """The bound counts every entry, the sources' refused records (a record too large for
    any frame) as well as the frames the hub rejected: once a refused record takes the file
    over it, the next frame waits in the queue, not on the hub."""
    async with trio.open_nursery() as nursery:
        gw, session = await gateway_welcomed(
            nursery, tmp_path / "gw", PeerHub(), welcome(heartbeat=30.0),
            gateway={"dead_letter_max_bytes": 1 << 20}, queue={"max_frames": 100},
            uplink={"max_frame_bytes": 65536, "heartbeat_s": 30.0},
            batch={"max_records": 10, "max_delay_ms": 20})
        await gw.sink.put([SensorReading("s", 1.0, "c", 1.0)], source="s")
        with trio.fail_after(20):
            await session.recv_data()  # under the bound: sent
            await gw.sink.put([SensorReading("s", 2.0, "c", 2.0, "x" * 1_100_000)],
                              source="s")  # alone over any frame: refused, dead-lettered
            dead = tmp_path / "gw" / "dead-letter.cborseq"
            while not dead.exists() or dead.stat().st_size <= 1 << 20:
                await trio.sleep(0.01)
        await gw.sink.put([SensorReading("s", 3.0, "c", 3.0)], source="s")
        with trio.fail_after(20):
            await gw.store.wait_for_frame_after(2)  # the refusal's event, then the reading
        with trio.move_on_after(1.5) as waited:
            while True:  # nothing but PINGs while held
                message = await session.recv()
                assert message[0] != DATA, message
        assert waited.cancelled_caught
        assert gw.metrics.as_dict()["uplink_dead_letter_full"] == 1
        await session.end()
        nursery.cancel_scope.cancel()
