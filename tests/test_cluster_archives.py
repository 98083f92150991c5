"""``/api`` on a cluster node answers like a single hub for lots and wafers that left memory,
and ``/api/stats`` has the single hub's shape with cluster-wide figures (issue 14 item 5,
docs/cluster.md "A node", docs/api.md).

Two nodes' ``ClusterHub`` in one Trio run on a real PostgreSQL and a real Redis (the set-up
of test_cluster_parity.py), small live-state caps (one lot, two wafers per lot), one
gateway: lot A's first wafers leave memory, then A ends and lot B evicts it; B's first wafer
leaves memory too.  Compared with a single hub -- ``LiveState`` with the same caps fed the
frames the cluster applied, its archives in a ``HistoryStore``, answering through
``HistoryApi`` -- on the lot's owner and on the other node; then the owner stops, the other
node takes the partition over and replays its log (no checkpoint yet): the archives it makes
again are not written a second time, and the answers stay the same."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar

import psycopg
import trio
from cluster_redis import RedisServer, fresh_prefix, redis_server  # noqa: F401
from hubtools import gateway_config, http_get
from test_cluster_parity import GW, TOKEN, applied_frames, until

from edgegw.config import build
from edgegw.gateway import Gateway
from edgegw.hub import HubConfig
from edgegw.hub.alerts import AlertEngine, AlertsConfig
from edgegw.hub.cluster.partition import partition_of
from edgegw.hub.history import HistoryApi
from edgegw.hub.history_store import HistoryStore
from edgegw.hub.live import LiveState
from edgegw.records import LotEnd, LotStart, ParametricResult, PartResult, Record, WaferEnd

PARTITIONS = 4
CAPS = {"max_lots": 1, "max_wafers_per_lot": 2}


def two_lots_in_one_partition() -> tuple[str, str]:
    """Lot ids of one partition: a partition's state applies the caps (docs/cluster.md,
    "What is not done"), so lot B evicts lot A as on a single hub."""
    first = "ARA"
    names = (f"AR{i}" for i in range(1000))
    second = next(n for n in names if partition_of(n, PARTITIONS) == partition_of(
        first, PARTITIONS))
    return first, second


A, B = two_lots_in_one_partition()


def test_live_state_of_a_cluster_adds_up_the_partitions_figures() -> None:
    """``/api/stats``'s ``live_state`` on a node: the single hub's fields, from every
    partition's saved figures (a partition of an older node without ``lots_live`` counts
    0) and the cluster's archive rows."""
    from edgegw.hub.cluster.stats import cluster_live_state

    single = LiveState(lambda t, d: None)
    saved = {0: {"not_applied": 2, "reasons": {"bad_record": {
                 "count": 2, "last": "x", "last_at": 5.0}}, "lots_live": 3, "wafers_live": 7},
             3: {"not_applied": 1, "reasons": {"bad_record": {
                 "count": 1, "last": "y", "last_at": 9.0}}, "lots_live": 1, "wafers_live": 2},
             5: {"not_applied": 0, "reasons": {}}}
    got = cluster_live_state(saved, lots_archived=4, wafers_archived=11)
    assert list(got) == list(single.health())  # (the single hub's fields, in its order)
    assert got == {"lots_live": 4, "wafers_live": 9, "wafers_archived": 11, "lots_evicted": 4,
                   "not_applied": 3, "reasons": {"bad_record": {
                       "count": 3, "last": "y", "last_at": 9.0}}}


class ArchivingSource:
    """Lot A: four wafers of six parts with a parametric test (the first two leave
    memory), a late part for its first wafer (not applied: ``hub/state``), its end; lot B:
    three wafers (its first leaves memory), and its start evicts A."""

    replays: ClassVar[bool] = True

    def __init__(self) -> None:
        self.done = trio.Event()
        self.records = 0

    async def run(self, sink: Any, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        n = 0
        frames = 0

        def wafer(lot: str, w: int) -> list[Record]:
            nonlocal n
            out: list[Record] = []
            wid = f"{lot}-W{w}"
            for j in range(6):
                n += 1
                out.append(ParametricResult("tester", 1000.0 + n, lot, 1, j % 2, f"p{n}", 100,
                                            "vdd", 1.0 + (n % 7) / 10, 0.5, 2.5, "V", True))
                out.append(PartResult("tester", 1000.0 + n, lot, wid, 1, j % 2, f"p{n}",
                                      j, w, 1 + (n % 4 == 0), 1, n % 4 != 0))
            out.append(WaferEnd("tester", 1000.0 + n, lot, wid))
            return out

        async def put(batch: list[Record]) -> None:
            nonlocal frames
            frames += 1
            self.records += len(batch)
            await sink.put(batch, checkpoint=frames)
            await trio.sleep(0.05)  # (one frame each: several log rows)

        await put([LotStart("tester", 999.0, A, "PT", "node", "SIM", "job"), *wafer(A, 1)])
        for w in (2, 3, 4):
            await put(wafer(A, w))
        await put([PartResult("tester", 1500.0, A, f"{A}-W1", 1, 0, "late", 9, 9, 1, 1, True),
                   LotEnd("tester", 1501.0, A)])
        await put([LotStart("tester", 1502.0, B, "PT", "node", "SIM", "job"), *wafer(B, 1)])
        for w in (2, 3):
            await put(wafer(B, w))
        self.done.set()
        await trio.sleep_forever()


def small_hub(config: HubConfig) -> Any:
    """A ``ClusterHub`` whose partition states have the small caps."""
    from edgegw.hub.cluster.node import ClusterHub

    hub = ClusterHub(config)
    hub.state_caps = CAPS
    return hub


def config(tmp: Path, name: str, dsn: str, redis_url: str, prefix: str) -> HubConfig:
    return build(HubConfig, {
        "hub": {"port": 0, "data_dir": str(tmp / name), "heartbeat_s": 1.0,
                "cluster": {"node_id": name, "postgres_dsn": dsn, "redis_url": redis_url,
                            "key_prefix": prefix, "partitions": PARTITIONS,
                            "lease_ttl_s": 1.5, "stale_after_s": 2.0,
                            "snapshot_interval_s": 0.2,
                            # no checkpoint in the test: a new owner replays the whole log
                            "checkpoint_interval_s": 3600}},
        "gateways": {GW: {"token": TOKEN}},
    })


PATHS = ["/api/lots", f"/api/lots/{A}/wafers", f"/api/lots/{B}/wafers",
         f"/api/lots/{A}/wafers/{A}-W1", f"/api/lots/{A}/wafers/{A}-W3",
         f"/api/lots/{B}/wafers/{B}-W1", f"/api/lots/{B}/wafers/{B}-W3",
         f"/api/lots/{A}/wafers/{A}-W9", f"/api/tests/{A}/100", f"/api/tests/{B}/100",
         "/api/lots/NOLOT/wafers"]


async def single_hub_answers(tmp: Path, frames: list[tuple[int, int, list[Any]]]
                             ) -> tuple[dict[str, Any], LiveState]:
    """What a single hub with the same caps answers, fed the frames the cluster applied."""
    lots: list[tuple[str, dict[str, Any]]] = []
    wafers: list[tuple[str, str, dict[str, Any]]] = []
    state = LiveState(lambda t, d: None, on_evict=lambda *a: lots.append(a),
                      on_wafer_archive=lambda *a: wafers.append(a), **CAPS)
    for _, first_rid, records in frames:
        state.on_records(GW, first_rid, records, now=5000.0)
    store = HistoryStore(tmp / "single" / "history.sqlite3")
    await store.open()
    await store.save([], lots, wafers)
    api = HistoryApi(state, AlertEngine(build(AlertsConfig, {}), lambda t, d: None), store)
    answers = {path: json.loads(json.dumps(await api.dispatch("GET", path, {})))
               for path in PATHS}
    await store.close()
    return answers, state


async def node_answers(port: int) -> dict[str, Any]:
    return {path: list(await http_get(port, path)) for path in PATHS}


def archive_rows(dsn: str) -> list[tuple[Any, ...]]:
    """Each archive row with its transaction id: unchanged unless written again."""
    with psycopg.connect(dsn) as conn:
        return conn.execute("SELECT lot_id, '', xmin::text FROM edgegw_lots UNION ALL"
                            " SELECT lot_id, wafer_id, xmin::text FROM edgegw_wafers"
                            " ORDER BY 1, 2").fetchall()


def no_clock(live_state: dict[str, Any]) -> dict[str, Any]:
    return {**live_state, "reasons": {r: (v["count"], v["last"])
                                      for r, v in live_state["reasons"].items()}}


async def test_archived_lots_and_wafers_and_stats_on_every_node_and_across_a_move(
        tmp_path: Path, pg_dsn: str, redis_server: RedisServer) -> None:  # noqa: F811
    prefix = fresh_prefix()
    nodes = [small_hub(config(tmp_path, n, pg_dsn, redis_server.url, prefix))
             for n in ("na", "nb")]
    scopes = [trio.CancelScope() for _ in nodes]
    part = partition_of(A, PARTITIONS)

    async def serve(i: int, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        with scopes[i]:
            await nodes[i].run(task_status=task_status)

    async with trio.open_nursery() as nursery:
        ports = [await nursery.start(serve, i) for i in range(2)]
        await until(lambda: sum(len(n.owner.states()) for n in nodes) == PARTITIONS, 20,
                    "every partition owned and rebuilt")
        owner = next(i for i, n in enumerate(nodes) if n.owner.state_for(part) is not None)
        other = 1 - owner
        source = ArchivingSource()

        async def gateway() -> None:
            cfg = gateway_config(tmp_path / "gw", ports[other],
                                 batch={"max_records": 500, "max_delay_ms": 20},
                                 spool={"dir": str(tmp_path / "spool")})
            async with trio.open_nursery() as inner:
                await inner.start(Gateway(cfg, extra_sources=[("tester", source)]).run)
        nursery.start_soon(gateway)
        await source.done.wait()
        store = nodes[0].store

        async def applied() -> int:
            stats = await store.all_gateway_stats()
            return stats[GW].records_applied if GW in stats else 0
        with trio.fail_after(20):
            while await applied() < source.records:  # every record of the source
                await trio.sleep(0.1)
        frames = await applied_frames(store, PARTITIONS)
        want, reference = await single_hub_answers(tmp_path, frames)
        assert want[f"/api/lots/{A}/wafers/{A}-W1"][0] == 200  # (archived on a single hub)
        assert [r["lot_id"] for r in want["/api/lots"][1]["lots"]] == [B, A]
        assert reference.health()["wafers_archived"] == 3

        # 1. the owner and the other node answer as the single hub does
        got: dict[int, dict[str, Any]] = {}

        async def answers_equal(i: int) -> bool:
            got[i] = await node_answers(ports[i])
            return got[i] == want
        for i in (owner, other):
            with trio.move_on_after(20):
                while not await answers_equal(i):
                    await trio.sleep(0.2)
            diff = {p: (got[i][p], want[p]) for p in PATHS if got[i][p] != want[p]}
            assert diff == {}, f"node {i} differs from the single hub: {diff}"
            # page by page (the archived lot from PostgreSQL, below ``before``)
            status, first = await http_get(ports[i], "/api/lots?limit=1")
            assert status == 200 and [r["lot_id"] for r in first["lots"]] == [B]
            status, rest = await http_get(
                ports[i], f"/api/lots?limit=1&before={first['next_before']!r}"
                f"&before_lot={first['next_before_lot']}")
            assert status == 200 and [r["lot_id"] for r in rest["lots"]] == [A]
            assert "next_before" not in rest
        written = archive_rows(pg_dsn)
        assert [(lot, w) for lot, w, _ in written] == sorted([
            (A, ""), (A, f"{A}-W1"), (A, f"{A}-W2"), (B, f"{B}-W1")])

        # 2. /api/stats: the single hub's live_state figures, cluster-wide, on both nodes;
        # every gateway with PostgreSQL's counts, connected (to the other node)
        health = json.loads(json.dumps(reference.health()))
        for i in (owner, other):
            async def stats_equal(i: int = i) -> bool:
                status, stats = await http_get(ports[i], "/api/stats")
                got[i] = stats
                return status == 200 and stats["live_state"] is not None and no_clock(
                    stats["live_state"]) == no_clock(health)
            with trio.move_on_after(10):
                while not await stats_equal():
                    await trio.sleep(0.2)
            stats = got[i]
            assert no_clock(stats["live_state"]) == no_clock(health), stats["live_state"]
            assert stats["live_state"]["not_applied"] == 1  # (the late part)
            assert stats["cluster"]["figures"] == "cluster"
            gw = stats["gateways"][GW]
            pg = (await store.all_gateway_stats())[GW]
            assert gw["connected"] is True and gw["records_applied"] == pg.records_applied
            # (the frames the log holds: the source's puts, two of them in one frame when
            # the gateway's batcher was late on a busy machine -- seen: 7 frames of 9 puts)
            assert gw["frames_applied"] == pg.frames_applied == len(frames) > 1
            if i == owner:  # (a round trip is measured by the node holding the connection)
                assert gw["rtt_ms"] is None and gw["refused"] == 0
        assert got[owner]["cluster"]["node_id"] != got[other]["cluster"]["node_id"]

        # 3. the owner stops: the other node takes the partition over and replays its
        # log from the start -- every archive made again, none written a second time
        scopes[owner].cancel()
        await until(lambda: nodes[other].owner.state_for(part) is not None, 20,
                    "the partition taken over and rebuilt")
        outcomes = nodes[other].owner.m_archives
        assert (outcomes.get(outcome="kept"), outcomes.get(outcome="written")) == (4, 0)
        assert archive_rows(pg_dsn) == written
        got[other] = await node_answers(ports[other])
        assert got[other] == want
        nursery.cancel_scope.cancel()
