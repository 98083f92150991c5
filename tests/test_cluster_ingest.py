"""A cluster node's ingest on PostgreSQL (docs/cluster.md): a real gateway (spool on) sends
to ``Ingest`` running on a ``ClusterStore``; every record the tester made is in the
partition logs exactly once -- also when PostgreSQL restarts mid-run, while ingest pauses
(no acknowledgements, the gateway spools), says why on /healthz, and resumes."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, ClassVar

import pytest
import trio
from cluster_pg import create_database, drop_database, private_pg
from hubtools import gateway_config, http_get

from edgegw.config import build
from edgegw.gateway import Gateway
from edgegw.hub import HubConfig, Ingest
from edgegw.hub.cluster.pgstore import ClusterStore
from edgegw.records import PartResult, Record

GW = "ate-01"
LOTS = ("LOT-A", "LOT-B", "LOT-C", "LOT-D")


class LotSource:
    """A tester making ``puts`` batches of ``size`` parts, round robin over four lots (four
    partitions' worth), ``interval`` s apart; ``made`` is every record in put order."""

    replays: ClassVar[bool] = True

    def __init__(self, puts: int, size: int, interval: float) -> None:
        self.puts, self.size, self.interval = puts, size, interval
        self.made: list[Record] = []
        self.done = trio.Event()

    async def run(self, sink: Any, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        for i in range(self.puts):
            lot = LOTS[i % len(LOTS)]
            batch = [PartResult("tester", 1000.0 + i, lot, "W1", 1, j % 4, f"p{i}.{j}", i, j,
                                1 + j % 3, 1, j % 7 != 0) for j in range(self.size)]
            await sink.put(batch, checkpoint=i + 1)
            self.made.extend(batch)
            await trio.sleep(self.interval)
        self.done.set()
        await trio.sleep_forever()


def node_config(tmp: Path) -> HubConfig:
    return build(HubConfig, {
        "hub": {"port": 0, "data_dir": str(tmp / "hub"), "heartbeat_s": 1.0,
                "cluster": {"node_id": "node-a", "postgres_dsn": "(given to the store)",
                            "partitions": 8}},
        "gateways": {GW: {"token": "s3cret"}},
    })


async def stored_tester_records(store: ClusterStore, partitions: int = 8
                                ) -> list[tuple[int, Record]]:
    """(rid, record) of every tester record in the partition logs, by rid."""
    out = []
    for p in range(partitions):
        after = 0
        while chunk := await store.read_partition(p, after, 200):
            for c in chunk:
                assert c.gateway_id == GW
                out.extend((c.first_rid + i, r) for i, r in enumerate(c.records)
                           if r.source == "tester")
            after = chunk[-1].pseq
    return sorted(out, key=lambda t: t[0])


async def applied_records(store: ClusterStore) -> int:
    stats = await store.all_gateway_stats()
    return stats[GW].records_applied if GW in stats else 0


def check_exactly_once(made: list[Record], stored: list[tuple[int, Record]]) -> None:
    rids = [rid for rid, _ in stored]
    assert len(rids) == len(set(rids)), "a record id is in the logs twice"
    got = [r for _, r in stored]
    assert len(got) == len(made)
    assert got == made, "the logs differ from what the tester made"


async def run_node_and_gateway(tmp: Path, dsn: str, source: LotSource,
                               during: Any = None) -> ClusterStore:
    cfg = node_config(tmp)
    assert cfg.hub.cluster is not None and cfg.hub.cluster.partitions == 8
    store = ClusterStore(dsn, "node-a", partitions=8, connect_timeout_s=1)
    ingest = Ingest(cfg, store=store)
    async with trio.open_nursery() as nursery:
        port = await nursery.start(ingest.run)
        gw_cfg = gateway_config(tmp / "gw", port, batch={"max_records": 200, "max_delay_ms": 20},
                                spool={"dir": str(tmp / "spool")})
        gateway = Gateway(gw_cfg, extra_sources=[("tester", source)])
        await nursery.start(gateway.run)
        if during is not None:
            await during(ingest, gateway, port)
        await source.done.wait()
        with trio.fail_after(60):  # everything applied (the gateway's own events too)
            while True:
                assert gateway.uplink is not None
                applied = await applied_records(store)
                if applied >= len(source.made) and gateway.uplink.acked_watermark >= \
                        gateway.m_frames.get():
                    break
                await trio.sleep(0.1)
        status, health = await http_get(port, "/healthz")
        assert status == 200 and health["status"] == "ok"
        nursery.cancel_scope.cancel()
    await store.open()  # (closed by the ingest at its end) to read the logs back
    return store


async def test_a_gateway_through_a_cluster_node_lands_each_record_once(
        tmp_path: Path, pg_dsn: str) -> None:
    source = LotSource(puts=60, size=50, interval=0.01)

    async def superseded_midway(ingest: Ingest, gateway: Gateway, port: int) -> None:
        # another node claimed the gateway (as its bus would say): this node's older
        # connection closes at once (4008) and the gateway reconnects, losing nothing
        assert gateway.uplink is not None
        with trio.fail_after(30):
            while gateway.uplink.acked_watermark < 3:
                await trio.sleep(0.02)
        session = ingest.connected.get(GW)
        assert session is not None and session.generation >= 1
        assert not ingest.supersede(GW, session.generation)  # not newer: kept
        assert ingest.supersede(GW, session.generation + 1)
        with trio.fail_after(30):
            while gateway.uplink.m_connects.get() < 2:
                await trio.sleep(0.02)
        assert ingest.m_replaced.get() == 1

    store = await run_node_and_gateway(tmp_path, pg_dsn, source, superseded_midway)
    try:
        check_exactly_once(source.made, await stored_tester_records(store))
        # four lots, hashed: more than one partition holds records
        heads = [await store.partition_head(p) for p in range(8)]
        assert sum(1 for h in heads if h) >= 2
    finally:
        await store.close()


@pytest.mark.parametrize("mode", ["fast", "immediate"])
async def test_postgres_restarted_mid_run_pauses_ingest_and_loses_nothing(
        tmp_path: Path, mode: str) -> None:
    """``fast``: a clean shutdown (sessions ended); ``immediate``: as a crash (no
    shutdown checkpoint, crash recovery at start; a commit in flight may or may not have
    happened, and its retry must tell)."""
    outage: dict[str, Any] = {}

    async def restart_mid_run(ingest: Ingest, gateway: Gateway, port: int) -> None:
        assert gateway.uplink is not None
        with trio.fail_after(30):
            while gateway.uplink.acked_watermark < 5:  # running: some frames acknowledged
                await trio.sleep(0.05)
        await trio.to_thread.run_sync(server.stop, mode)
        t_stop = time.monotonic()
        # the outage: the gateway keeps storing, nothing more is acknowledged, and the
        # node says why on /healthz
        with trio.fail_after(20):
            while True:
                status, health = await http_get(port, "/healthz")
                if health["status"] == "degraded":
                    break
                await trio.sleep(0.1)
        assert status == 200 and "PostgreSQL unavailable" in health["detail"]
        acked = gateway.uplink.acked_watermark
        stored = gateway.m_frames.get()
        await trio.sleep(max(0.0, 4.0 - (time.monotonic() - t_stop)))
        outage.update(acked_before=acked, acked_after=gateway.uplink.acked_watermark,
                      stored_before=stored, stored_after=gateway.m_frames.get())
        await trio.to_thread.run_sync(server.start)
        outage["unavailable"] = ingest.m_unavailable.get()

    with private_pg() as server:
        name, dsn = create_database(server.dsn)
        source = LotSource(puts=150, size=40, interval=0.05)  # ~8 s of production
        store = await run_node_and_gateway(tmp_path, dsn, source, restart_mid_run)
        try:
            check_exactly_once(source.made, await stored_tester_records(store))
        finally:
            await store.close()
            drop_database(server.dsn, name)
    # nothing was acknowledged while PostgreSQL was down; the gateway kept spooling
    assert outage["acked_after"] == outage["acked_before"]
    assert outage["stored_after"] > outage["stored_before"]
    assert outage["unavailable"]
