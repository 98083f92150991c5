"""A gateway whose state is lost -- its ``state_dir`` deleted, a new disk, a reinstalled
workstation -- while the hub kept everything it sent.  Its tester files are still there.
Read from their start, they were applied by the hub a second time (a 22-part lot showed 44
parts).  Now the gateway tells the hub where its sources are (POSITIONS), and a gateway
whose store starts afresh asks for them back in its first HELLO and goes on from there:
every record once (docs/protocol.md section 4.1; docs/operations.md,
"A gateway's state lost")."""

from __future__ import annotations

import dataclasses
import shutil
import socket
from collections import Counter
from pathlib import Path
from typing import Any

import cbor2
import pytest
import trio
from faultkit import Gateway as GatewayProcess
from faultkit import Hub, expected_records, hub_records, source_settings, stop_all, wait_all_applied
from hubtools import gateway_config, hub_config, start_hub
from peer_hub import PeerHub
from processes import wait_for
from shared_data import METIS, stdf_bytes
from test_state_rollback import config_without_sensors

from edgegw.config import build
from edgegw.gateway import Gateway
from edgegw.hub import HubConfig, Ingest
from edgegw.hub.cluster.pgstore import ClusterStore


def tail_config(tmp: Path, port: int, files: Path, **uplink: Any) -> Any:
    return gateway_config(tmp / "gw", port,
                          sources=[{"name": "tail", "type": "tail", "paths": [str(files)],
                                    "poll_interval": 0.02}],
                          batch={"max_records": 97, "max_delay_ms": 5},
                          spool={"dir": str(tmp / "gw" / "spool")},
                          uplink={"positions_every_s": 0.2, **uplink})


def fresh_starts(gateway: Gateway) -> dict[str, float]:
    return dict(gateway.metrics.as_dict().get("gateway_fresh_starts_total") or {})


def applied(hub: Ingest) -> int:
    stats = hub.store.stats.get("ate-01")
    return stats.records_applied if stats is not None else 0


async def settled(hub: Ingest, done: set[str]) -> dict[str, Any]:
    """Wait until the hub keeps positions in which the tail has read ``done`` to their
    end, and nothing more arrives; the positions kept."""
    with trio.fail_after(60):
        while True:
            kept = await hub.store.load_positions("ate-01")
            files = {}
            if kept is not None:
                files = (cbor2.loads(kept.positions).get("tail") or {}).get("files") or {}
            if done <= {Path(p).name for p, f in files.items() if f["done"]}:
                before = applied(hub)
                await trio.sleep(0.3)
                if applied(hub) == before:
                    assert kept is not None
                    return dict(cbor2.loads(kept.positions))
            await trio.sleep(0.05)


async def run_gateway_until(cfg: Any, hub: Ingest, done: set[str]) -> Gateway:
    gateway = Gateway(cfg)
    async with trio.open_nursery() as nursery:
        await nursery.start(gateway.run)
        await settled(hub, done)
        nursery.cancel_scope.cancel()
    return gateway


async def start_node(nursery: trio.Nursery, tmp: Path, dsn: str) -> tuple[Ingest, int]:
    """A cluster node's ingest on PostgreSQL (docs/cluster.md)."""
    cfg = build(HubConfig, {
        "hub": {"port": 0, "data_dir": str(tmp), "cluster": {
            "node_id": "node-a", "postgres_dsn": "(given to the store)", "partitions": 8}},
        "gateways": {"ate-01": {"token": "s3cret"}}})
    hub = Ingest(cfg, store=ClusterStore(dsn, "node-a", partitions=8, connect_timeout_s=1))
    return hub, await nursery.start(hub.run)


@pytest.mark.parametrize("where", ["hub", "cluster"])
async def test_a_gateway_whose_state_is_lost_takes_its_positions_back(
        tmp_path: Path, where: str, request: pytest.FixtureRequest) -> None:
    """A lot read, the gateway stopped, its state_dir deleted, a second lot written
    meanwhile: started again, the gateway reads only the second lot -- the hub (a single
    hub, or a cluster node keeping them in PostgreSQL) has each record once."""
    files = tmp_path / "stdf"
    files.mkdir()
    (files / "lot1.std").write_bytes(stdf_bytes(METIS))
    async with trio.open_nursery() as nursery:
        if where == "hub":
            hub, port = await start_hub(nursery, hub_config(tmp_path / "hub"))
        else:
            hub, port = await start_node(nursery, tmp_path / "hub",
                                         request.getfixturevalue("pg_dsn"))
        cfg = tail_config(tmp_path, port, files)
        first = await run_gateway_until(cfg, hub, {"lot1.std"})
        one_lot = applied(hub)
        assert one_lot > 600  # the lot's 22 parts with their results, and its summaries

        shutil.rmtree(tmp_path / "gw")  # the gateway's state is gone; the files are not
        (files / "lot2.std").write_bytes(stdf_bytes(METIS))
        gateway = await run_gateway_until(cfg, hub, {"lot1.std", "lot2.std"})

        assert applied(hub) == 2 * one_lot  # not 3: lot1 was not sent again
        assert gateway.uplink is not None and gateway.uplink.handed_back
        assert hub.metrics.as_dict()["hub_gateway_positions_handed_back_total"] == 1
        # what each fresh start went on from, for the operator
        assert fresh_starts(first) == {"outcome=none_kept": 1}
        assert fresh_starts(gateway) == {"outcome=taken_back": 1}
        nursery.cancel_scope.cancel()


async def test_positions_outlive_a_hub_restart_and_a_gateway_without_a_spool(
        tmp_path: Path) -> None:
    """The hub keeps positions durably (a restart in between hands them back all the
    same); and a gateway without a disk spool -- each of its starts a fresh store --
    goes on from them at every restart instead of reading its files again."""
    files = tmp_path / "stdf"
    files.mkdir()
    (files / "lot1.std").write_bytes(stdf_bytes(METIS))

    def memory_gateway(port: int) -> Any:
        cfg = tail_config(tmp_path, port, files)
        return dataclasses.replace(cfg, spool=None)

    async with trio.open_nursery() as outer:
        async with trio.open_nursery() as nursery:
            hub, port = await start_hub(nursery, hub_config(tmp_path / "hub"))
            await run_gateway_until(memory_gateway(port), hub, {"lot1.std"})
            one_lot = applied(hub)
            nursery.cancel_scope.cancel()
        hub, port = await start_hub(outer, hub_config(tmp_path / "hub"))  # restarted
        assert applied(hub) == one_lot
        (files / "lot2.std").write_bytes(stdf_bytes(METIS))
        await run_gateway_until(memory_gateway(port), hub, {"lot1.std", "lot2.std"})
        await run_gateway_until(memory_gateway(port), hub, {"lot1.std", "lot2.std"})
        assert applied(hub) == 2 * one_lot
        outer.cancel_scope.cancel()


async def test_a_hub_that_does_not_answer_is_waited_for_only_so_long(
        tmp_path: Path) -> None:
    """A hub that takes the connection and never answers HELLO: the tail of a store that
    started afresh waits ``uplink.resume_wait_s``, then reads from the beginning -- the
    records wait in the spool for the hub, none is left unread."""
    files = tmp_path / "stdf"
    files.mkdir()
    (files / "lot1.std").write_bytes(stdf_bytes(METIS))
    hub = PeerHub()
    async with trio.open_nursery() as nursery:
        port = await nursery.start(hub.run)
        gateway = Gateway(tail_config(tmp_path, port, files, resume_wait_s=0.5))
        await nursery.start(gateway.run)
        session = await hub.sessions.receive()
        assert (await session.recv())[1]["resume"] is True  # ... and no answer
        with trio.fail_after(30):
            while gateway.store.next_seq < 3:
                await trio.sleep(0.05)
        assert gateway.uplink is not None and not gateway.uplink.asks_positions
        assert fresh_starts(gateway) == {"outcome=no_answer": 1}
        nursery.cancel_scope.cancel()


async def test_a_hub_that_cannot_be_reached_is_not_waited_for(tmp_path: Path) -> None:
    """Nothing listens where the hub should be: a store that started afresh does not wait
    ``uplink.resume_wait_s`` (60 s) for it -- its tail reads at once, into the spool."""
    files = tmp_path / "stdf"
    files.mkdir()
    (files / "lot1.std").write_bytes(stdf_bytes(METIS))
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]  # bound, never listening: connections refused
        gateway = Gateway(tail_config(tmp_path, port, files, probe_interval_s=0.1))
        async with trio.open_nursery() as nursery:
            await nursery.start(gateway.run)
            with trio.fail_after(30):
                while gateway.store.next_seq < 3:
                    await trio.sleep(0.05)
            assert fresh_starts(gateway) == {"outcome=no_hub": 1}
            nursery.cancel_scope.cancel()


async def test_with_positions_off_the_lost_state_sends_the_files_again(
        tmp_path: Path) -> None:
    """``uplink.positions_every_s = 0``: nothing told, nothing asked -- what every gateway
    did before: the files still there are read from their start and applied again."""
    files = tmp_path / "stdf"
    files.mkdir()
    (files / "lot1.std").write_bytes(stdf_bytes(METIS))
    async with trio.open_nursery() as nursery:
        hub, port = await start_hub(nursery, hub_config(tmp_path / "hub"))
        cfg = tail_config(tmp_path, port, files, positions_every_s=0)
        gateway = Gateway(cfg)
        async with trio.open_nursery() as inner:
            await inner.start(gateway.run)
            with trio.fail_after(60):
                while (gateway.store.checkpoints.get("tail") or {}).get("files") is None \
                        or gateway.store.first_unacked < gateway.store.next_seq \
                        or not all(f["done"] for f in gateway.store.checkpoints["tail"]
                                   ["files"].values()):
                    await trio.sleep(0.05)
            inner.cancel_scope.cancel()
        one_lot = applied(hub)
        assert await hub.store.load_positions("ate-01") is None
        shutil.rmtree(tmp_path / "gw")
        gateway = Gateway(cfg)
        async with trio.open_nursery() as inner:
            await inner.start(gateway.run)
            with trio.fail_after(60):
                while applied(hub) < 2 * one_lot:
                    await trio.sleep(0.05)
            inner.cancel_scope.cancel()
        assert applied(hub) == 2 * one_lot
        nursery.cancel_scope.cancel()


def test_a_state_lost_mid_lot_sends_again_at_most_the_frames_in_flight(
        tmp_path: Path) -> None:
    """The gateway killed and its state_dir deleted while the tester writes (the simulated
    tester at ~13,500 records a second): started again, it goes on from the positions the
    hub kept.  Told each time the sender has sent all there is, they lag the frames by
    the frames in flight at most -- told every ``uplink.positions_every_s`` only, they
    lagged by a quarter of a second: 1,514 to 5,294 of 81,067 tester records applied twice
    in three runs (docs/operations.md, "A gateway's state lost").  Nothing lost."""
    source = {"parts_per_second": 1500, "max_parts": 9000, "seed": 31, "wafers": 200}
    frame = 137  # batch.max_records: a frame in flight is at most this many records
    config = config_without_sensors(tmp_path)
    settings = [*source_settings(**source), "--set", f"batch.max_records={frame}"]
    hub = Hub(tmp_path).start()
    gw = GatewayProcess(tmp_path, hub.port, *settings)
    gw.config = config
    gw.start()
    try:
        wait_for(lambda: hub.stats().get("records_applied", 0) > 20000, timeout=30)
        gw.kill()
        shutil.rmtree(gw.state)
        gw = GatewayProcess(tmp_path, hub.port, *settings)
        gw.config = config
        gw.start()
        expected = expected_records(**source)
        wait_all_applied(hub, gw, len(expected), timeout=90)
        got = Counter(hub_records(hub.dir)[0])
        assert not Counter(expected) - got  # nothing lost
        twice = sum(n - 1 for n in got.values() if n > 1)
        assert twice <= 2 * frame, twice
        assert gw.stats()["metrics"]["gateway_fresh_starts_total"] == {"outcome=taken_back": 1}
    finally:
        stop_all(hub, gw)
