"""The hub checks record ids (docs/protocol.md section 3): "(epoch, record id) identifies a
record exactly once", so records a gateway sends again under a NEW sequence number (a
gateway bug: a split part stored twice once put 7 records in the live state twice) are
applied once.  The (gateway, epoch) applied set of record ids is kept beside the applied
set of seqs, durably, in the same transaction (SQLite on a single hub, PostgreSQL in a
cluster).

Over real loopback sockets against a real in-process hub, the gateway a bare client
speaking the documented protocol (tests/wsclient.py), as in tests/test_conformance.py.
"""

from __future__ import annotations

import dataclasses
import json
import sqlite3
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import psycopg
import pytest
import trio
from disktools import HeldCommits
from hubtools import gateway_config
from ports import free_port
from wsclient import WsClient

from edgegw.config import build
from edgegw.gateway import Gateway
from edgegw.hub import Hub, HubConfig
from edgegw.hub.cluster.pgstore import ClusterStore
from edgegw.hub.store import MAX_RID_RANGES, FrameToApply, HubStore, records_not_applied
from edgegw.metrics import internal_errors
from edgegw.protocol import (
    Ack,
    Data,
    Hello,
    IntervalSet,
    Welcome,
    compress_body,
    decode,
    decode_body,
    encode,
    encode_body,
    encode_columns,
)
from edgegw.records import PartResult, Record

TOKEN = "s3cret"
GW = "ate-01"
EPOCH = "epoch-1"


def parts(first: int, last: int, lot: str = "L1") -> list[Record]:
    """Part results ``first..last`` of a final-test lot (no X/Y: every result counts)."""
    return [PartResult("tester", 1.0 + n, lot, "", 1, n % 4, f"p{n}", None, None, 1, 1, True)
            for n in range(first, last + 1)]


def body(first_rid: int, n: int, columnar: bool = False) -> bytes:
    """A frame body of ``n`` records with the record ids ``first_rid..first_rid+n-1``; the
    records are a function of their ids, so the same ids make the same records."""
    records = parts(first_rid, first_rid + n - 1)
    return encode_columns(first_rid, records) if columnar else encode_body(first_rid, records)


@asynccontextmanager
async def running_hub(tmp: Path, **hub: object) -> AsyncIterator[tuple[Hub, int]]:
    app = Hub(build(HubConfig, {"hub": {"port": 0, "data_dir": str(tmp), "gc_freeze_s": 0,
                                        **hub},
                                "gateways": {GW: {"token": TOKEN}}}))
    async with trio.open_nursery() as nursery:
        port = await nursery.start(app.run)
        yield app, port
        nursery.cancel_scope.cancel()


async def welcomed(port: int, version: int = 3, compression: tuple[str, ...] = ()
                   ) -> tuple[WsClient, Welcome]:
    client = await WsClient.connect(port, "/ws/gateway")
    await client.send(encode(Hello(GW, TOKEN, EPOCH, 1, versions=tuple(range(1, version + 1)),
                                   compression=compression)))
    welcome = decode(await client.recv())
    assert isinstance(welcome, Welcome)
    return client, welcome


async def send(client: WsClient, seq: int, frame_body: bytes, encoding: str | None = None
               ) -> None:
    """DATA ``seq``, and its ACK."""
    with trio.fail_after(30):
        await client.send(encode(Data(seq, 1.0, frame_body, encoding)))
        ack = decode(await client.recv())
    assert isinstance(ack, Ack) and ack.watermark >= seq, ack


async def lot_parts(app: Hub, lot: str, expected: int) -> int:
    """The live state's part count of ``lot`` once it reached ``expected`` (or after the
    feeder drained: a larger count shows as itself)."""
    with trio.fail_after(30):
        while True:
            snap = app.state.snapshot(f"lot/{lot}")
            if snap is not None and snap["parts"] >= expected and not app.ingest.lag():
                await trio.sleep(0.05)  # anything else queued would show now
                return app.state.snapshot(f"lot/{lot}")["parts"]
            await trio.sleep(0.01)


def counted(app: Hub, name: str) -> float:
    return app.metrics.counter(name).get(gateway=GW)


def stored_frames(tmp: Path) -> list[tuple[int, int, int]]:
    """(seq, first_rid, n_records) of every frame in the hub's store."""
    with sqlite3.connect(tmp / "hub.sqlite3") as db:
        return db.execute("SELECT seq, first_rid, n_records FROM frames ORDER BY seq").fetchall()


@pytest.mark.parametrize("columnar", [False, True], ids=["rows", "columns"])
async def test_records_sent_again_under_a_new_seq_are_applied_once(
        tmp_path: Path, columnar: bool) -> None:
    async with running_hub(tmp_path) as (app, port):
        client, _ = await welcomed(port)
        await send(client, 1, body(1, 5, columnar))
        await send(client, 2, body(1, 5, columnar))  # the same records, a new seq: acked
        await send(client, 3, body(6, 2, columnar))  # the records after them: applied
        assert await lot_parts(app, "L1", 7) == 7
        assert counted(app, "hub_frames_duplicate_records_total") == 1
        assert app.metrics.counter("hub_duplicate_frames_total").total() == 0
        assert stored_frames(tmp_path) == [(1, 1, 5), (3, 6, 2)]
        await client.close()
        # the dropped frame's seq is applied: no hole for the gateway to fill
        again, welcome = await welcomed(port)
        assert welcome.applied == [(1, 3)]
        await again.close()
        assert internal_errors(app.metrics).total() == 0


@pytest.mark.parametrize("columnar", [False, True], ids=["rows", "columns"])
async def test_a_frame_applied_in_part_is_cut_to_its_new_records(
        tmp_path: Path, columnar: bool) -> None:
    async with running_hub(tmp_path) as (app, port):
        client, _ = await welcomed(port)
        await send(client, 1, body(1, 5, columnar))
        await send(client, 2, body(4, 5, columnar))  # 4, 5 applied already; 6..8 new
        assert await lot_parts(app, "L1", 8) == 8
        assert counted(app, "hub_duplicate_records_dropped_total") == 2
        assert counted(app, "hub_frames_duplicate_records_total") == 0
        assert stored_frames(tmp_path) == [(1, 1, 5), (2, 6, 3)]  # as applied: cut
        await client.close()
    # a restart replays the stored frames: the cut one as cut
    async with running_hub(tmp_path) as (app, port):
        assert await lot_parts(app, "L1", 8) == 8


async def test_new_records_around_applied_ones_apply_the_frame_whole_and_are_counted(
        tmp_path: Path) -> None:
    """The new records of a frame in two runs (around records applied) would be two
    frames: the frame is applied whole, the records applied again counted."""
    async with running_hub(tmp_path) as (app, port):
        client, _ = await welcomed(port)
        await send(client, 1, body(3, 2))
        await send(client, 2, body(1, 6))
        assert await lot_parts(app, "L1", 8) == 8
        assert counted(app, "hub_records_applied_twice_total") == 2
        assert stored_frames(tmp_path) == [(1, 3, 2), (2, 1, 6)]
        await client.close()


async def test_the_record_ids_applied_survive_a_restart(tmp_path: Path) -> None:
    async with running_hub(tmp_path) as (app, port):
        client, _ = await welcomed(port)
        await send(client, 1, body(1, 5))
        assert await lot_parts(app, "L1", 5) == 5
        await client.close()
    async with running_hub(tmp_path) as (app, port):
        client, welcome = await welcomed(port)
        assert welcome.applied == [(1, 1)]
        await send(client, 2, body(1, 5))
        await send(client, 3, body(4, 4))
        assert await lot_parts(app, "L1", 7) == 7
        assert counted(app, "hub_frames_duplicate_records_total") == 1
        assert counted(app, "hub_duplicate_records_dropped_total") == 2
        await client.close()


async def test_a_store_from_before_record_ids_opens_and_checks_from_then_on(
        tmp_path: Path) -> None:
    """A hub.sqlite3 whose applied table has no rids column gets it (none applied)."""
    store = HubStore(tmp_path / "hub.sqlite3")
    await store.open()
    await store.commit([FrameToApply(GW, EPOCH, 1, 1, 2, body(1, 2))])
    await store.close()
    with sqlite3.connect(tmp_path / "hub.sqlite3") as db:
        db.execute("ALTER TABLE applied DROP COLUMN rids")
    store = HubStore(tmp_path / "hub.sqlite3")
    await store.open()
    assert await store.commit([FrameToApply(GW, EPOCH, 2, 1, 2, body(1, 2))]) == set()
    skipped = await store.commit([FrameToApply(GW, EPOCH, 3, 1, 2, body(1, 2))])
    assert skipped == {(GW, EPOCH, 3)}
    await store.close()
    with sqlite3.connect(tmp_path / "hub.sqlite3") as db:
        assert db.execute("SELECT ranges, rids FROM applied").fetchall() == [
            ("[[1, 3]]", "[[1, 2]]")]


def cluster_frame(seq: int, first_rid: int, n: int) -> FrameToApply:
    records = parts(first_rid, first_rid + n - 1)
    return FrameToApply(GW, EPOCH, seq, first_rid, n, encode_body(first_rid, records),
                        records=records)


def pg_rows(dsn: str, sql: str) -> list[tuple]:  # type: ignore[type-arg]
    with psycopg.connect(dsn) as conn:
        return conn.execute(sql).fetchall()


async def test_the_cluster_store_checks_record_ids_across_nodes(pg_dsn: str) -> None:
    """Two nodes on one PostgreSQL: records applied on one are not applied again under
    another seq on the other, a frame applied in part is cut (its partition-log rows
    too), and the applied rids are in the applied set's row."""
    a = ClusterStore(pg_dsn, "node-a", partitions=8)
    b = ClusterStore(pg_dsn, "node-b", partitions=8)
    await a.open()
    await b.open()
    try:
        gen = (await a.claim(GW, EPOCH)).generation
        assert await a.commit([cluster_frame(1, 1, 5)], {GW: gen}) == set()
        dup = cluster_frame(2, 1, 5)
        assert await b.commit([dup], {GW: gen}) == {(GW, EPOCH, 2)}
        assert dup.records_seen == 5
        part = cluster_frame(3, 4, 5)
        assert await b.commit([part], {GW: gen}) == set()
        assert (part.cut, part.records_seen, part.first_rid, part.n_records) == (True, 2, 6, 3)
        assert pg_rows(pg_dsn, "SELECT seq, first_rid, n_records FROM edgegw_frames ORDER BY"
                               " seq") == [(1, 1, 5), (3, 6, 3)]
        assert pg_rows(pg_dsn, "SELECT seq, first_rid, n_records FROM edgegw_partition_log"
                               " ORDER BY seq") == [(1, 1, 5), (3, 6, 3)]
        ((ranges, rids),) = pg_rows(pg_dsn, "SELECT ranges, rids FROM edgegw_applied")
        assert (json.loads(ranges), json.loads(rids)) == ([[1, 3]], [[1, 8]])
        claim = await a.claim(GW, EPOCH)
        assert claim.applied.ranges() == [(1, 3)]
        stats = (await a.all_gateway_stats())[GW]
        assert (stats.frames_applied, stats.records_applied, stats.duplicates_dropped) == (
            2, 8, 1)
    finally:
        await a.close()
        await b.close()


async def test_a_cluster_database_from_before_record_ids_gets_the_column(pg_dsn: str) -> None:
    store = ClusterStore(pg_dsn, "node-a", partitions=8)
    await store.open()
    await store.close()
    with psycopg.connect(pg_dsn) as conn:
        conn.execute("ALTER TABLE edgegw_applied DROP COLUMN rids")
    store = ClusterStore(pg_dsn, "node-a", partitions=8)
    await store.open()
    try:
        gen = (await store.claim(GW, EPOCH)).generation
        assert await store.commit([cluster_frame(1, 1, 2)], {GW: gen}) == set()
        assert await store.commit([cluster_frame(2, 1, 2)], {GW: gen}) == {(GW, EPOCH, 2)}
    finally:
        await store.close()


async def test_the_record_ids_kept_are_bounded_forgetting_the_lowest(tmp_path: Path) -> None:
    """Holes (frames a gateway dropped) would grow the set without end: past
    MAX_RID_RANGES ranges the lowest are forgotten -- their duplicates then go unnoticed,
    and nothing is ever dropped for a forgotten range."""
    store = HubStore(tmp_path / "hub.sqlite3")
    await store.open()
    try:
        frames = [FrameToApply(GW, EPOCH, seq, 10 * seq, 1, body(10 * seq, 1))
                  for seq in range(1, MAX_RID_RANGES + 3)]  # each record alone: a hole each
        assert await store.commit(frames) == set()
        kept = store.rid_set(GW, EPOCH).ranges()
        assert len(kept) == MAX_RID_RANGES and kept[0] == (30, 30)
        again = [FrameToApply(GW, EPOCH, MAX_RID_RANGES + 2 + i, rid, 1, body(rid, 1))
                 for i, rid in enumerate((10, 30), start=1)]
        assert await store.commit(again) == {(GW, EPOCH, MAX_RID_RANGES + 4)}
    finally:
        await store.close()


async def test_after_a_failed_commit_the_claim_holds_the_sets_the_store_checks(
        tmp_path: Path) -> None:
    """A connection checks its DATA at receipt against the sets its claim holds (the
    store's own, on a single hub).  A commit that fails puts those sets back as they were
    -- in place: before, it put copies in the store's place, and the connection went on
    checking against the old objects, which held the failed frame's record ids and
    nothing committed since."""
    class RefusingOnce(HubStore):
        """The real store, whose next write SQLite refuses (as when another process
        holds the database past the busy timeout: 5 s, too long to wait here)."""
        refuse = False

        def _apply_sync(self, *args: object) -> list[int]:
            if self.refuse:
                self.refuse = False
                raise sqlite3.OperationalError("database is locked")
            return super()._apply_sync(*args)  # type: ignore[arg-type]

    store = RefusingOnce(tmp_path / "hub.sqlite3")
    await store.open()
    try:
        claim = await store.claim(GW, EPOCH)
        assert claim.rids is not None
        assert await store.commit([FrameToApply(GW, EPOCH, 1, 1, 5, body(1, 5))]) == set()
        store.refuse = True
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            await store.commit([FrameToApply(GW, EPOCH, 2, 6, 5, body(6, 5))])
        assert await store.commit([FrameToApply(GW, EPOCH, 3, 11, 5, body(11, 5))]) == set()
        assert claim.applied.ranges() == store.applied_set(GW, EPOCH).ranges() == [
            (1, 1), (3, 3)]
        assert claim.rids.ranges() == store.rid_set(GW, EPOCH).ranges() == [
            (1, 5), (11, 15)]
    finally:
        await store.close()


@pytest.mark.parametrize("encoding", [None, "zlib"], ids=["plain", "zlib"])
async def test_a_seq_applied_already_sent_again_with_other_records_is_counted_not_silent(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, encoding: str | None) -> None:
    """A duplicate seq is dropped (section 3), but one carrying records that were never
    applied means the gateway reused the seq: those records are lost, so the hub says so
    (an error naming them, hub_seq_reused_records_dropped_total) -- a true duplicate, the
    same records again, is counted as a duplicate only."""
    def wire(b: bytes) -> bytes:
        return compress_body(b, 6) if encoding else b

    async with running_hub(tmp_path, compression=encoding or "off") as (app, port):
        client, _ = await welcomed(port)
        await send(client, 1, body(1, 5))
        await send(client, 2, body(6, 2))
        await client.close()
        client, welcome = await welcomed(port, compression=(encoding,) if encoding else ())
        assert welcome.applied == [(1, 2)] and welcome.compression == encoding
        await send(client, 2, wire(body(6, 2)), encoding)  # the same records: a duplicate
        assert app.metrics.counter("hub_duplicate_frames_total").total() == 1
        assert counted(app, "hub_seq_reused_records_dropped_total") == 0
        await send(client, 1, wire(body(8, 3)), encoding)  # seq 1 again, new records
        await send(client, 2, wire(body(6, 4)), encoding)  # 6, 7 applied; 8, 9 are not
        assert app.metrics.counter("hub_duplicate_frames_total").total() == 3
        assert counted(app, "hub_seq_reused_records_dropped_total") == 5
        assert [r.getMessage() for r in caplog.records if "reuses a seq" in r.getMessage()] == [
            f"gateway {GW} epoch {EPOCH}: frame 1 (records 8..10) reuses a seq applied already "
            "with other records: its 3 record(s) not applied are dropped (a gateway bug, or "
            "its state restored from an older copy)",
            f"gateway {GW} epoch {EPOCH}: frame 2 (records 6..9) reuses a seq applied already "
            "with other records: its 2 record(s) not applied are dropped (a gateway bug, or "
            "its state restored from an older copy)"]
        # a body that does not decode has no record ids to check: a duplicate, no more
        await send(client, 1, wire(b"\xff not cbor"), encoding)
        assert app.metrics.counter("hub_duplicate_frames_total").total() == 4
        assert counted(app, "hub_seq_reused_records_dropped_total") == 5
        assert stored_frames(tmp_path) == [(1, 1, 5), (2, 6, 2)]
        await client.close()
        assert internal_errors(app.metrics).total() == 0


async def test_a_seq_applied_while_the_frame_waited_is_checked_by_the_commit(
        tmp_path: Path) -> None:
    """A seq applied after the WELCOME (another connection's commit, a takeover race)
    is found by the commit itself: checked there the same way."""
    async with running_hub(tmp_path) as (app, port):
        client, welcome = await welcomed(port)
        assert welcome.applied == []
        assert await app.ingest.store.commit(
            [FrameToApply(GW, EPOCH, 1, 1, 5, body(1, 5))]) == set()
        await send(client, 1, body(20, 4))
        assert app.metrics.counter("hub_duplicate_frames_total").total() == 1
        assert counted(app, "hub_seq_reused_records_dropped_total") == 4
        assert stored_frames(tmp_path) == [(1, 1, 5)]
        await client.close()


def test_records_not_applied_counts_what_a_reused_seq_would_lose() -> None:
    rids = IntervalSet([(10, 19), (30, 39)])
    assert records_not_applied(10, 10, rids) == 0  # a true duplicate
    assert records_not_applied(15, 10, rids) == 5  # 20..24 never applied
    assert records_not_applied(18, 15, rids) == 10  # 20..29: around applied ones
    assert records_not_applied(40, 3, rids) == 3  # above them all
    assert records_not_applied(1, 5, rids) == 5  # below them
    # nothing by a store from before record ids (none kept) ...
    assert records_not_applied(1, 5, IntervalSet()) == 0
    # ... nor below the lowest range of a set that may have been trimmed (MAX_RID_RANGES)
    full = IntervalSet([(10 * i, 10 * i) for i in range(1, MAX_RID_RANGES // 2 + 1)])
    assert records_not_applied(1, 5, full) == 0
    assert records_not_applied(5, 10, full) == 4  # 5..9 may be forgotten, 10 applied
    assert records_not_applied(10, 0, rids) == 0


@pytest.mark.parametrize("store_kind", ["single", "cluster"])
async def test_both_stores_check_a_duplicate_seq_by_its_record_ids(
        tmp_path: Path, store_kind: str, request: pytest.FixtureRequest) -> None:
    store: HubStore | ClusterStore
    if store_kind == "single":
        store = HubStore(tmp_path / "hub.sqlite3")
    else:
        store = ClusterStore(request.getfixturevalue("pg_dsn"), "node-a", partitions=8)
    await store.open()
    try:
        claim = await store.claim(GW, EPOCH)
        assert claim.rids is not None and claim.rids.ranges() == []
        assert await store.commit([cluster_frame(1, 1, 5)], {GW: claim.generation}) == set()
        same, other = cluster_frame(1, 1, 5), cluster_frame(1, 4, 5)
        assert await store.commit([same], {GW: claim.generation}) == {(GW, EPOCH, 1)}
        assert await store.commit([other], {GW: claim.generation}) == {(GW, EPOCH, 1)}
        assert (same.seq_reused, other.seq_reused) == (0, 3)
        claim = await store.claim(GW, EPOCH)  # what a WELCOME's duplicates are checked by
        assert claim.rids is not None and claim.rids.ranges() == [(1, 5)]
    finally:
        await store.close()


async def test_a_put_cancelled_while_its_frame_commits_leaves_no_record_id_to_reuse(
        tmp_path: Path) -> None:
    """SIGTERM cancels the sources; a put waiting for its frame's commit is cancelled with
    the frame taken (numbered, committed soon after); then the shutdown's flush stores
    what the batcher still holds.  Before, the gateway's next record id moved on only
    when the append returned, so that last frame reused the cancelled one's ids and the
    hub dropped its records as applied: 137 tester records lost in a plain stop and start
    (about one run in four with 137-record frames), and as many more after the restart."""
    cfg = gateway_config(tmp_path, free_port(), batch={"max_records": 10,
                                                       "max_delay_ms": 60000}, spool={})
    assert cfg.spool is not None
    released = False
    store = HeldCommits(dataclasses.replace(cfg.spool, dir=str(tmp_path / "spool")), 1,
                        lambda: released, hold_to=1, grace=0.0)
    records = parts(1, 15)
    async with trio.open_nursery() as nursery:
        gateway = Gateway(cfg, store=store)
        await nursery.start(gateway.run)
        put = trio.CancelScope()

        async def put_ten() -> None:
            with put:
                await gateway.sink.put(records[:10])  # a whole frame: its append waits

        nursery.start_soon(put_ten)
        await store.holding.wait()
        put.cancel()  # as SIGTERM cancels the sources
        await gateway.sink.put(records[10:])  # five wait in the batcher
        released = True
        await gateway.flush()
        await store.flush()
        stored = store.frames_from(1, 10)
        nursery.cancel_scope.cancel()
    ids = [(decode_body(f.body, 1 << 20)[0], f.n_records) for f in stored]
    assert ids == [(1, 10), (11, 5)]
