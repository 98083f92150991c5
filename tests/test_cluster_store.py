"""The cluster's PostgreSQL store (edgegw/hub/cluster/pgstore.py) against a real server:
each frame applied once however nodes race (constraints, not timing), the generation
fence, per-partition pseq order = commit order, fenced checkpoints, counters, pruning."""

from __future__ import annotations

import contextlib
import random
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import trio
from test_history import two_passes
from walltools import SteppedWall

from edgegw.hub.cluster import LockTimeout, SessionEnded
from edgegw.hub.cluster.partition import PartitionFenced, partition_key, partition_of
from edgegw.hub.cluster.pgstore import ClusterStore, PartitionMismatch, ShardMismatch
from edgegw.hub.history_store import WAFER_SUMMARY, HistoryStore
from edgegw.hub.live import LiveState
from edgegw.hub.store import FrameToApply, GatewaySuperseded, StoreUnavailable
from edgegw.metrics import Metrics
from edgegw.protocol import encode_body
from edgegw.records import GatewayEvent, PartResult, Record


def part(lot: str, n: int) -> PartResult:
    return PartResult("tester", 1.0 + n, lot, "W1", 1, n % 4, f"p{n}", n % 30, n // 30, 1, 1,
                      True)


def frame(gw: str, seq: int, lots: list[str], epoch: str = "e1", per_lot: int = 3,
          ) -> FrameToApply:
    """Frame ``seq`` of ``gw``: ``per_lot`` parts of each lot (rids numbered by seq)."""
    records: list[Record] = [part(lot, seq * 100 + i) for lot in lots for i in range(per_lot)]
    first_rid = seq * 1000
    return FrameToApply(gw, epoch, seq, first_rid, len(records),
                        encode_body(first_rid, records), records=records)


@pytest.fixture
async def stores(pg_dsn: str):  # type: ignore[no-untyped-def]
    """Two stores on one database: two nodes."""
    a = ClusterStore(pg_dsn, "node-a", partitions=8)
    b = ClusterStore(pg_dsn, "node-b", partitions=8)
    await a.open()
    await b.open()
    try:
        yield a, b
    finally:
        await a.close()
        await b.close()


def rows(dsn: str, sql: str, params: tuple[object, ...] = ()) -> list[tuple]:  # type: ignore[type-arg]
    with psycopg.connect(dsn) as conn:
        return conn.execute(sql, params).fetchall()  # type: ignore[arg-type]


def execute(dsn: str, *statements: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        for sql in statements:
            conn.execute(sql)  # type: ignore[arg-type]


async def all_chunks(store: ClusterStore, partitions: int = 8) -> list:  # type: ignore[type-arg]
    out = []
    for p in range(partitions):
        after = 0
        while chunk := await store.read_partition(p, after, 100):
            out.extend((p, c) for c in chunk)
            after = chunk[-1].pseq
    return out


async def test_two_nodes_racing_on_one_gateways_frames_apply_each_once(
        stores: tuple[ClusterStore, ClusterStore], pg_dsn: str) -> None:
    # Both "nodes" hold the same generation (as two connections would if the fence were
    # not there): only the applied check and the primary key stand between them.
    a, b = stores
    gen = await a.claim_gateway("gw1")
    n = 120
    frames = {s: frame("gw1", s, [f"L{s % 5}", f"L{(s + 1) % 5}"]) for s in range(1, n + 1)}
    applied_by: dict[str, set[int]] = {"a": set(), "b": set()}

    async def node(name: str, store: ClusterStore, seed: int) -> None:
        rnd = random.Random(seed)
        order = list(frames)
        rnd.shuffle(order)
        for i in range(0, n, 7):
            batch = sorted(order[i:i + 7])
            mine = [frames[s] for s in batch]
            # a fresh copy each time: the store fills in nothing the other must not see
            skipped = await store.commit(mine, {"gw1": gen})
            applied_by[name] |= {s for s in batch if ("gw1", "e1", s) not in skipped}

    async with trio.open_nursery() as nursery:
        nursery.start_soon(node, "a", a, 1)
        nursery.start_soon(node, "b", b, 2)
    assert applied_by["a"] | applied_by["b"] == set(frames)
    assert applied_by["a"] & applied_by["b"] == set()
    assert applied_by["a"] and applied_by["b"]  # both did apply some: a real race
    # each frame's records are in the partition logs exactly once
    seen = [(c.seq, c.first_rid + i, r) for _, c in await all_chunks(a)
            for i, r in enumerate(c.records)]
    expected = [(s, f.first_rid + i, r) for s, f in frames.items()
                for i, r in enumerate(f.records or [])]
    assert sorted(seen, key=lambda t: t[1]) == sorted(expected, key=lambda t: t[1])
    assert rows(pg_dsn, "SELECT count(*) FROM edgegw_frames") == [(n,)]
    # a chunk's records all belong to its partition
    for p, c in await all_chunks(a):
        assert {partition_of(partition_key("gw1", r), 8) for r in c.records} == {p}
    # counters: once per frame, whoever applied it
    st = (await a.all_gateway_stats())["gw1"]
    assert (st.frames_applied, st.records_applied, st.last_seq) == (n, n * 6, n)


async def test_generation_fence_refuses_an_older_connections_commit(
        stores: tuple[ClusterStore, ClusterStore], pg_dsn: str) -> None:
    a, b = stores
    gen_a = await a.claim_gateway("gw1")
    committed: list[int] = []
    claimed = trio.Event()
    seen_by_b: list[int] = []
    refused_after_claim = 0

    async def old_connection() -> None:
        nonlocal refused_after_claim
        seq = 0
        while True:
            seq += 1
            try:
                await a.commit([frame("gw1", seq, ["LA"])], {"gw1": gen_a})
            except GatewaySuperseded:
                refused_after_claim += 1
                if refused_after_claim >= 5:
                    return
                continue
            committed.append(seq)
            await trio.sleep(0.002)

    async def new_connection() -> None:
        await trio.sleep(0.3)
        claim = await b.claim("gw1", "e1")
        seen_by_b.extend(s for s in range(1, 10_000) if s in claim.applied)
        claimed.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(old_connection)
        nursery.start_soon(new_connection)
    # exactly what the old connection committed before the claim is what WELCOME saw:
    # nothing it sent after the claim was written, whatever the timing
    assert committed, "the old connection committed nothing before the claim"
    assert committed == seen_by_b
    assert rows(pg_dsn, "SELECT seq FROM edgegw_frames ORDER BY seq") == [
        (s,) for s in committed]
    # the newer connection's commit goes in; a refused commit wrote nothing at all
    assert claimed.is_set()
    gen_b = int(rows(pg_dsn, "SELECT generation FROM edgegw_gateways")[0][0])
    assert gen_b == gen_a + 1
    nxt = len(committed) + 1
    assert await b.commit([frame("gw1", nxt, ["LA"])], {"gw1": gen_b}) == set()
    with pytest.raises(GatewaySuperseded):
        await a.declare_lost("gw1", "e1", 1, 1, gen_a)
    st = (await b.all_gateway_stats())["gw1"]
    assert (st.frames_applied, st.frames_lost) == (len(committed) + 1, 0)


async def test_a_superseded_connection_never_puts_an_older_epochs_positions_back(
        stores: tuple[ClusterStore, ClusterStore]) -> None:
    # Node a serves the gateway's old epoch; its state is lost, it comes back on node b
    # with a new epoch.  A's connection, superseded but still ending, writes its last
    # positions: they must not replace the new epoch's (a later fresh start would take
    # the old ones back and send the new epoch's files again).  A later frame of the
    # same epoch is a true fact whichever connection tells it.
    a, b = stores
    gen_a = (await a.claim("gw1", "old")).generation
    assert await a.save_positions("gw1", "old", 40, b"A40", gen_a)
    gen_b = (await b.claim("gw1", "new")).generation
    assert await b.save_positions("gw1", "new", 3, b"B3", gen_b)
    assert not await a.save_positions("gw1", "old", 41, b"A41", gen_a)
    kept = await b.load_positions("gw1")
    assert kept is not None and (kept.epoch, kept.seq, kept.positions) == ("new", 3, b"B3")
    # the same epoch reconnects on a (gen_b superseded): b's last write still lands
    gen_c = (await a.claim("gw1", "new")).generation
    assert gen_c > gen_b
    assert await b.save_positions("gw1", "new", 5, b"B5", gen_b)
    assert not await b.save_positions("gw1", "new", 4, b"B4", gen_c)  # older: kept
    kept = await a.load_positions("gw1")
    assert kept is not None and (kept.epoch, kept.seq, kept.positions) == ("new", 5, b"B5")


async def test_partition_sequence_is_commit_order_for_a_tailer(pg_dsn: str) -> None:
    # One partition, four nodes committing at once, a reader tailing pseq > last: it must
    # see every row exactly once and in order (a sequence number handed out before commit
    # would let a later commit's smaller number slip behind the reader).
    stores = [ClusterStore(pg_dsn, f"n{i}", partitions=1) for i in range(4)]
    advanced: list[int] = []  # what the nodes would publish ("partition 0 advanced to")
    for s in stores:
        await s.open()
        s.on_advance = lambda heads: advanced.append(heads[0])
    per_gateway = 40
    tailed: list[tuple[int, str, int]] = []
    done = trio.Event()

    async def committer(i: int, store: ClusterStore) -> None:
        gw = f"gw{i}"
        gen = await store.claim_gateway(gw)
        for seq in range(1, per_gateway + 1):
            await store.commit([frame(gw, seq, [f"L{i}"], per_lot=2)], {gw: gen})

    async def tailer(store: ClusterStore) -> None:
        after = 0
        while True:
            finished = done.is_set()
            chunk = await store.read_partition(0, after, 50)
            for c in chunk:
                tailed.append((c.pseq, c.gateway_id, c.seq))
                after = c.pseq
            if finished and not chunk:
                return
            if not chunk:
                await trio.sleep(0.001)

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(tailer, stores[0])
            async with trio.open_nursery() as inner:
                for i, s in enumerate(stores):
                    inner.start_soon(committer, i, s)
            done.set()
        total = 4 * per_gateway
        assert [p for p, _, _ in tailed] == list(range(1, total + 1))
        assert await stores[0].partition_head(0) == total
        assert len(advanced) == total and max(advanced) == total
        for i in range(4):  # each gateway's frames in its own order
            assert [s for _, gw, s in tailed if gw == f"gw{i}"] == list(
                range(1, per_gateway + 1))
    finally:
        for s in stores:
            await s.close()


async def test_checkpoints_are_fenced_by_the_lease_token(
        stores: tuple[ClusterStore, ClusterStore]) -> None:
    a, b = stores
    assert await a.load_checkpoint(3) is None
    assert await a.save_checkpoint(3, 10, token=5, blob=b"state@10")
    assert await a.load_checkpoint(3) == (10, b"state@10")
    assert await b.save_checkpoint(3, 20, token=6, blob=b"state@20")  # the new owner
    # the old owner, lease expired, still running: refused, the newer one stays
    assert not await a.save_checkpoint(3, 15, token=5, blob=b"stale")
    assert await b.load_checkpoint(3) == (20, b"state@20")
    assert await b.save_checkpoint(3, 25, token=6, blob=b"state@25")  # same owner again
    assert await a.max_tokens() == {3: 6}


async def test_a_claimed_partition_refuses_an_older_owners_writes_of_rows_not_yet_rewritten(
        stores: tuple[ClusterStore, ClusterStore]) -> None:
    """A node paused past its lease (SIGSTOP, a frozen VM) wakes in the middle of a write.
    The row-level tokens refuse it only where the new owner wrote the row already; the new
    owner's claim, its first step, refuses every write of an older token at once
    (docs/cluster.md, "A node paused"; tests/test_cluster_pause.py end to end)."""
    a, b = stores
    alert = {"id": "wafer_yield:L1:W1", "priority": "high", "rule": "wafer_yield",
             "raised_at": 100.0, "acknowledged": False}
    lot = {"lot": {"lot_id": "L1", "parts": 100, "updated": 5.0}, "wafers": {}}
    assert await a.claim_partition(3, 5)
    assert await a.save_checkpoint(3, 10, token=5, blob=b"state@10")
    assert await a.save_partition_state(3, 5, {"lots_live": 1})
    # the new owner claims the partition (token 6) and has written nothing yet
    assert await b.claim_partition(3, 6)
    assert not await a.claim_partition(3, 5)  # the old one cannot take it back
    assert not await a.save_checkpoint(3, 15, token=5, blob=b"stale")
    assert not await a.save_partition_state(3, 5, {"lots_live": 2})
    with pytest.raises(PartitionFenced):
        await a.save_alerts(3, 5, [alert])
    with pytest.raises(PartitionFenced):
        await a.save_archives(5, [("L1", lot, 90)], [], partition=3)
    assert await b.load_checkpoint(3) == (10, b"state@10")
    assert await b.partition_states() == {3: {"lots_live": 1}}
    assert await b.load_alerts() == [] and await b.lot_archive("L1") is None
    # the new owner writes; other partitions are not fenced by this claim
    assert await b.save_checkpoint(3, 20, token=6, blob=b"state@20")
    assert await b.claim_partition(3, 6)  # the same owner again
    assert await a.save_checkpoint(4, 1, token=5, blob=b"other")
    assert await a.max_tokens() == {3: 6, 4: 5}


async def test_counters_lost_ranges_rejected_and_duplicates(
        stores: tuple[ClusterStore, ClusterStore], pg_dsn: str) -> None:
    a, b = stores
    gen = await a.claim_gateway("gw1")
    records: list[Record] = [GatewayEvent("gw", 1.0, "info", "x", "hello"), part("L1", 1)]
    f1 = FrameToApply("gw1", "e1", 5, 1, 2, encode_body(1, records), records=records)
    bad = FrameToApply("gw1", "e1", 6, 0, 0, b"\xff")
    await a.declare_lost("gw1", "e1", 4, 4, gen)
    assert await a.commit([f1], {"gw1": gen}, rejected=[(bad, "not CBOR")]) == set()
    # resends (after the row was pruned too) are skipped, on any node
    a.count_duplicate("gw1")
    assert await a.commit([f1], {"gw1": gen}, rejected=[(bad, "not CBOR")]) == {
        ("gw1", "e1", 5), ("gw1", "e1", 6)}
    gen2 = await b.claim_gateway("gw1")
    claim = await b.claim("gw1", "e1")
    assert claim.generation == gen2 + 1
    assert claim.applied.ranges() == [(1, 6)]
    st = (await b.all_gateway_stats())["gw1"]
    assert (st.epoch, st.frames_applied, st.records_applied, st.frames_rejected,
            st.frames_lost, st.last_seq, st.duplicates_dropped) == ("e1", 1, 2, 1, 4, 6, 1)
    assert st.last_seen is not None and abs(st.last_seen - time.time()) < 60
    assert rows(pg_dsn, "SELECT seq, reason, body FROM edgegw_rejected") == [
        (6, "not CBOR", b"\xff")]
    # the mixed frame went to two partitions, one chunk each, rids kept
    chunks = {c.first_rid: (p, c.records) for p, c in await all_chunks(b)}
    assert chunks == {1: (partition_of("gw:gw1", 8), records[:1]),
                      2: (partition_of("L1", 8), records[1:])}


HOUR = 3600.0


async def test_frames_are_dated_and_pruned_by_the_databases_clock(
        stores: tuple[ClusterStore, ClusterStore], pg_dsn: str, wall: SteppedWall) -> None:
    """docs/cluster.md "Clocks": ``applied_at`` is PostgreSQL's ``now()`` and retention
    cuts by it, so the nodes' wall clocks do not decide what goes.  Node a, its clock two
    hours behind, applies frames; node b, two hours ahead, prunes with an hour's
    retention: nothing goes (by their dates the frames were four hours old)."""
    a, b = stores
    gen = await a.claim_gateway("gw1")
    lot = "LOT-C"
    p = partition_of(lot, 8)
    for seq in range(1, 5):
        await wall.as_of_async(-2 * HOUR, lambda seq=seq: a.commit(  # type: ignore[misc]
            [frame("gw1", seq, [lot])], {"gw1": gen}))
    assert await a.save_checkpoint(p, 4, 1, b"cp")  # (every row may go by age)

    def counts() -> tuple[int, int]:
        return (rows(pg_dsn, "SELECT count(*) FROM edgegw_frames")[0][0],
                rows(pg_dsn, "SELECT count(*) FROM edgegw_partition_log")[0][0])

    assert await wall.as_of_async(2 * HOUR, lambda: b.prune(time.time() - HOUR)) == 0
    assert counts() == (4, 4)
    # older than the retention by the database's clock: gone, whatever b's clock says
    rows(pg_dsn, "UPDATE edgegw_frames SET applied_at = applied_at - 7200 RETURNING 1")
    rows(pg_dsn, "UPDATE edgegw_partition_log SET applied_at = applied_at - 7200 RETURNING 1")
    assert await wall.as_of_async(-2 * HOUR, lambda: b.prune(time.time() - HOUR)) == 4
    assert counts() == (0, 0)


async def test_prune_never_passes_a_partitions_checkpoint(
        stores: tuple[ClusterStore, ClusterStore], pg_dsn: str) -> None:
    a, _ = stores
    gen = await a.claim_gateway("gw1")
    lot = "LOT-P"
    p = partition_of(lot, 8)
    other = next(f"LOT-{i}" for i in range(100) if partition_of(f"LOT-{i}", 8) != p)
    q = partition_of(other, 8)
    for seq in range(1, 11):
        await a.commit([frame("gw1", seq, [lot if seq % 2 else other])], {"gw1": gen})
    assert await a.partition_head(p) == 5 and await a.partition_head(q) == 5
    assert await a.save_checkpoint(p, 3, 1, b"cp")
    # everything is old enough: only p's rows up to its checkpoint may go; q has none
    assert await a.prune(time.time() + 10) == 3
    assert [c.pseq for c in await a.read_partition(p, 0, 100)] == [4, 5]
    assert [c.pseq for c in await a.read_partition(q, 0, 100)] == [1, 2, 3, 4, 5]
    # and by bytes: still never above the checkpoint
    assert await a.prune(0.0, max_bytes=0) == 0
    # the applied set still drops a resend of a pruned frame
    assert await a.commit([frame("gw1", 1, [lot])], {"gw1": gen}) == {("gw1", "e1", 1)}
    # the byte count kept with the heads is the bodies' sum, after commits and prunes
    assert a.frame_bytes == rows(pg_dsn, "SELECT sum(length(body)) FROM edgegw_partition_log"
                                 )[0][0] > 0
    # a byte limit deletes the oldest rows below their checkpoints, only as many as needed
    assert await a.save_checkpoint(q, 5, 1, b"cp")
    before = a.frame_bytes
    assert await a.prune(0.0, max_bytes=before - 1, batch=1) == 1
    assert [c.pseq for c in await a.read_partition(q, 0, 100)] == [2, 3, 4, 5]
    assert a.frame_bytes < before
    assert a.frame_bytes == rows(pg_dsn, "SELECT sum(length(body)) FROM edgegw_partition_log"
                                 )[0][0]
    sizes = await a.table_bytes()
    assert sizes["partition_log"] > 0 and set(sizes) >= {"frames", "applied"}


async def test_a_node_with_another_partition_count_refuses_to_start(pg_dsn: str) -> None:
    first = ClusterStore(pg_dsn, "a", partitions=16)
    await first.open()
    await first.close()
    other = ClusterStore(pg_dsn, "b", partitions=32)
    with pytest.raises(PartitionMismatch, match=r"partitions is 32 .* created with 16"):
        await other.open()
    await other.close()


async def test_a_node_with_another_redis_shard_count_refuses_to_start(pg_dsn: str) -> None:
    """The cluster's first node stores its number of Redis shards; a node listing another
    number would look for a partition's lease on another Redis (two owners, or none): it
    refuses to start, naming both numbers.  Deleting the row (every node stopped) is how
    the count changes."""
    first = ClusterStore(pg_dsn, "a", partitions=16, redis_shards=2)
    await first.open()
    await first.close()
    assert rows(pg_dsn, "SELECT value FROM edgegw_meta WHERE key = 'redis_shards'") == [("2",)]
    same = ClusterStore(pg_dsn, "b", partitions=16, redis_shards=2)
    await same.open()
    await same.close()
    for count in (1, 3):
        other = ClusterStore(pg_dsn, "c", partitions=16, redis_shards=count)
        with pytest.raises(ShardMismatch,
                           match=rf"lists {count} Redis shards? but the cluster .* runs on 2"):
            await other.open()
        await other.close()
    # a store driven alone (a bench, no bus) does not check
    alone = ClusterStore(pg_dsn, "bench", partitions=16)
    await alone.open()
    await alone.close()
    # the documented way to change it: with every node stopped, delete the row
    rows(pg_dsn, "DELETE FROM edgegw_meta WHERE key = 'redis_shards' RETURNING key")
    three = ClusterStore(pg_dsn, "d", partitions=16, redis_shards=3)
    await three.open()
    await three.close()
    assert rows(pg_dsn, "SELECT value FROM edgegw_meta WHERE key = 'redis_shards'") == [("3",)]


async def test_recent_records_per_second_for_a_new_owners_rate(
        stores: tuple[ClusterStore, ClusterStore], wall: SteppedWall) -> None:
    """What a new owner of a gateway's topic seeds ``records_per_s`` with: the records
    committed in the last seconds, on any node, per whole second of their commit."""
    a, b = stores
    gens = {gw: await a.claim_gateway(gw) for gw in ("gw1", "gw2")}
    t0 = time.time()
    await a.commit([frame("gw1", 1, ["LA", "LB"])], {"gw1": gens["gw1"]})  # 6 records
    await a.commit([frame("gw1", 2, ["LA"])], {"gw1": gens["gw1"]})  # 3
    await a.commit([frame("gw2", 1, ["LC"])], {"gw2": gens["gw2"]})  # 3, another gateway
    # an old frame (its applied_at as if committed a minute ago) is outside the window
    await a.commit([frame("gw1", 3, ["LA"])], {"gw1": gens["gw1"]})
    rows(a.dsn, "UPDATE edgegw_frames SET applied_at = applied_at - 60"
                " WHERE gateway_id = 'gw1' AND seq = 3 RETURNING seq")
    recent = await b.recent_records(["gw1", "gw9"], t0 - 1)
    assert set(recent) == {"gw1"}
    assert sum(recent["gw1"].values()) == 9
    assert all(int(t0) <= sec <= time.time() for sec in recent["gw1"])
    # a new owner whose clock is an hour ahead gets them by its clock (applied_at is the
    # database's): the same records, their seconds an hour later
    ahead = await wall.as_of_async(HOUR, lambda: b.recent_records(["gw1"], time.time() - 10))
    assert sum(ahead["gw1"].values()) == 9
    assert all(int(t0 + HOUR) - 1 <= sec <= time.time() + HOUR for sec in ahead["gw1"])


async def test_unreachable_postgres_is_unavailable_not_a_crash() -> None:
    from ports import free_port

    store = ClusterStore(f"host=127.0.0.1 port={free_port()} user=postgres dbname=x",
                         "n", connect_timeout_s=1)
    with pytest.raises(StoreUnavailable):
        await store.open()
    assert store.health_problem() is not None
    assert "PostgreSQL unavailable" in (store.health_problem() or "")
    await store.close()


@pytest.mark.parametrize("how", ["ended_by_another_node", "idle_session_timeout",
                                 "idle_in_transaction_timeout"])
async def test_a_session_postgresql_ended_is_tried_again_not_postgresql_unavailable(
        pg_dsn: str, how: str) -> None:
    """A session the server ended is not an unavailable store: the store answers at once on
    a new session.  (Marked unavailable, an idle node's /healthz stayed degraded until its
    next call -- forever, for a node with no gateway.)"""
    metrics = Metrics()
    store = ClusterStore(pg_dsn, "node-a", partitions=8, metrics=metrics,
                         idle_in_transaction_timeout_s=0.3)
    await store.open()
    try:
        gen = await store.claim_gateway("gw1")
        await store.commit([frame("gw1", 1, ["L1"])], {"gw1": gen})
        if how == "ended_by_another_node":
            rows(pg_dsn, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE"
                 " application_name = 'edgegw node-a' AND datname = current_database()")
            sqlstate = "57P01"
        elif how == "idle_session_timeout":
            await store.query("SELECT set_config('idle_session_timeout', '100', false)")
            await trio.sleep(1)  # the pooled session sits idle past it
            sqlstate = "57P05"
        else:
            def paused_in_a_transaction(conn: psycopg.Connection[Any]) -> None:
                with conn.transaction():
                    conn.execute("SELECT 1")
                    time.sleep(1)  # this node paused past idle_in_transaction_timeout_s
                    conn.execute("SELECT 1")

            with pytest.raises(SessionEnded):
                await store._call(paused_in_a_transaction)
            sqlstate = "25P03"
        if sqlstate != "25P03":
            with pytest.raises(SessionEnded) as ended:
                await store.commit([frame("gw1", 2, ["L1"])], {"gw1": gen})
            assert ended.value.sqlstate == sqlstate
            # still a StoreUnavailable: every retry loop tries it again
            assert isinstance(ended.value, StoreUnavailable)
        assert store.health_problem() is None
        assert metrics.counter("cluster_pg_session_ended_total").get(sqlstate=sqlstate) == 1
        # tried again, on a new session: applied once
        assert await store.commit([frame("gw1", 2, ["L1"])], {"gw1": gen}) == set()
        assert rows(pg_dsn, "SELECT seq FROM edgegw_frames ORDER BY seq") == [(1,), (2,)]
        assert store.health_problem() is None
    finally:
        await store.close()


async def test_a_server_that_takes_no_writes_is_unavailable_not_a_crash(pg_dsn: str) -> None:
    """A standby not promoted yet, or a server put in read-only mode (SQLSTATE 25006): a
    condition that passes, like an outage -- the commit raises StoreUnavailable (the ingest
    pauses acknowledgements and tries again), /healthz says so, and once the server takes
    writes the same commit applies.  Before, the raw error reached the connection's failure
    boundary (1011, an internal error) at every try."""
    store = ClusterStore(pg_dsn, "node-a", partitions=8)
    await store.open()
    dbname = rows(pg_dsn, "SELECT current_database()")[0][0]
    try:
        gen = await store.claim_gateway("gw1")
        execute(pg_dsn, f'ALTER DATABASE "{dbname}" SET default_transaction_read_only = on')
        rows(pg_dsn, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE"
             " application_name = 'edgegw node-a' AND datname = current_database()")
        with pytest.raises(StoreUnavailable):
            await store.commit([frame("gw1", 1, ["L1"])], {"gw1": gen})  # a session ended
        with pytest.raises(StoreUnavailable) as refused:
            await store.commit([frame("gw1", 1, ["L1"])], {"gw1": gen})
        assert "read-only" in str(refused.value)
        assert "PostgreSQL unavailable" in (store.health_problem() or "")
        execute(pg_dsn, "SET default_transaction_read_only = off",
                f'ALTER DATABASE "{dbname}" RESET default_transaction_read_only')
        rows(pg_dsn, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE"
             " application_name = 'edgegw node-a' AND datname = current_database()")
        with contextlib.suppress(SessionEnded):
            await store.commit([frame("gw1", 1, ["L1"])], {"gw1": gen})
        await store.commit([frame("gw1", 1, ["L1"])], {"gw1": gen})
        assert rows(pg_dsn, "SELECT seq FROM edgegw_frames") == [(1,)]
        assert store.health_problem() is None
    finally:
        execute(pg_dsn, "SET default_transaction_read_only = off",
                f'ALTER DATABASE "{dbname}" RESET default_transaction_read_only')
        await store.close()


async def test_alerts_raised_once_acked_on_any_node_and_fenced(
        stores: tuple[ClusterStore, ClusterStore]) -> None:
    a, b = stores
    alert = {"id": "wafer_yield:L1:W1", "priority": "high", "rule": "wafer_yield",
             "raised_at": 100.0, "acknowledged": False, "context": {"lot_id": "L1"}}
    assert await a.save_alerts(2, 7, [alert]) == {alert["id"]: True}
    # a new owner (token 8) rebuilt the state and raises it again: one row, not new
    assert await b.save_alerts(2, 8, [alert]) == {alert["id"]: False}
    # acknowledged on node a; only the first acknowledgement counts
    assert await a.ack_alert(alert["id"], "ann", 120.0)
    assert not await b.ack_alert(alert["id"], "bob", 121.0)
    assert not await b.ack_alert("no-such-alert", "bob", 121.0)
    # the owner's next upsert of its (unacknowledged) copy does not undo it
    assert await b.save_alerts(2, 8, [{**alert, "priority": "critical"}]) == {
        alert["id"]: False}
    # the stale owner (token 7) is fenced off
    assert await a.save_alerts(2, 7, [{**alert, "priority": "low"}]) == {}
    (got,) = await a.load_alerts()
    assert (got["priority"], got["acknowledged"], got["acked_by"], got["acked_at"]) == (
        "critical", True, "ann", 120.0)
    assert await a.load_alerts(partition=3) == []


async def test_alert_changes_are_pending_for_the_feed_until_marked(
        stores: tuple[ClusterStore, ClusterStore]) -> None:
    """What the cluster's alert feed reads (alertfeed.py): every change of a row, on any
    node, makes it pending; marking it fed clears that unless the row changed since."""
    a, b = stores
    alert = {"id": "x1", "priority": "P0", "rule": "y", "raised_at": 100.0,
             "acknowledged": False}
    await a.save_alerts(1, 5, [alert])
    ((got, fed, updated),) = await b.pending_alerts()
    assert (got["id"], got["acknowledged"], fed) == ("x1", False, "")
    assert await b.mark_fed([("x1", "r", updated)]) == {"x1"}
    assert await a.pending_alerts() == []
    # acknowledged on another node: pending again, with what was announced so far
    assert await b.ack_alert("x1", "ann", 130.0)
    ((got, fed, updated),) = await a.pending_alerts()
    assert (got["acknowledged"], got["acked_by"], fed) == (True, "ann", "r")
    # the owner updates the row (an occurrence) between the feed's read and its mark:
    # the mark is refused and the row stays pending, its fed as it was
    await a.save_alerts(1, 5, [{**alert, "occurrences": 2}])
    assert await a.mark_fed([("x1", "ra", updated)]) == set()
    ((got, fed, updated),) = await a.pending_alerts()
    assert (got["occurrences"], got["acknowledged"], fed) == (2, True, "r")
    assert await a.mark_fed([("x1", "ra", updated)]) == {"x1"}
    assert await a.pending_alerts() == []


async def test_archives_are_written_once_fenced_and_never_regress(
        stores: tuple[ClusterStore, ClusterStore], pg_dsn: str) -> None:
    """A partition owner's archives (owner.py ``_save_archives``): one made again at the
    same log position -- a new owner replaying the log after an ownership move -- is not
    written a second time; a stale owner's (older token) is refused; a partial one (fewer
    parts: a rebuild from a pruned log) never replaces a fuller one.  Any node reads them
    back in the single hub's history store's shapes and order."""
    a, b = stores
    full = {"lot": {"lot_id": "L1", "parts": 100, "updated": 5.0}, "wafers": {}}
    wafer = {"wafer_id": "W1", "parts": 50, "updated": 5.0, "map": [[1, 2, 1]]}
    w0 = {"wafer_id": "W0", "parts": 7, "updated": 4.0}
    # owner with token 3 archives W1, then W0 (at later log positions), then the lot
    assert await a.save_archives(3, [], [("L1", "W1", wafer, 40)]) == 0
    assert await a.save_archives(3, [("L1", full, 90)], [("L1", "W0", w0, 41)]) == 0
    written = rows(pg_dsn, "SELECT lot_id, xmin::text FROM edgegw_lots UNION ALL"
                          " SELECT wafer_id, xmin::text FROM edgegw_wafers ORDER BY 1")
    # the next owner (token 4) replays the same log: the same archives at the same positions
    assert await b.save_archives(4, [("L1", full, 90)],
                                 [("L1", "W1", wafer, 40), ("L1", "W0", w0, 41)]) == 3
    assert rows(pg_dsn, "SELECT lot_id, xmin::text FROM edgegw_lots UNION ALL"
                        " SELECT wafer_id, xmin::text FROM edgegw_wafers ORDER BY 1") == written
    # later figures of the lot (evicted again further on) by the owner: replaced
    fuller = {"lot": {"lot_id": "L1", "parts": 120, "updated": 7.0}, "wafers": {}}
    assert await b.save_archives(4, [("L1", fuller, 200)], []) == 0
    # the stale owner (token 3), still applying further on: fenced off
    stale = {"lot": {"lot_id": "L1", "parts": 130, "updated": 8.0}, "wafers": {}}
    assert await a.save_archives(3, [("L1", stale, 210)], []) == 1
    # a partial rebuild (fewer parts), even later in the log and newer: kept as it was
    partial = {"lot": {"lot_id": "L1", "parts": 40, "updated": 9.0}, "wafers": {}}
    assert await b.save_archives(5, [("L1", partial, 300)],
                                 [("L1", "W1", {**wafer, "parts": 10}, 301)]) == 2
    assert await a.lot_archive("L1") == fuller
    assert await a.wafer_archive("L1", "W1") == wafer
    assert await b.lot_archive("L2") is None and await b.wafer_archive("L1", "W9") is None
    # the history API's reads: summaries newest first; a lot's wafers in the order they left
    assert await b.lot_summaries() == [fuller["lot"]]
    assert [w["wafer_id"] for w in await b.wafer_summaries("L1")] == ["W1", "W0"]
    assert (await b.wafer_summaries("L1"))[0] == {k: wafer.get(k) for k in WAFER_SUMMARY}
    assert await a.archive_counts() == (1, 2)


async def test_archives_are_pruned_by_when_they_were_written_by_the_databases_clock(
        stores: tuple[ClusterStore, ClusterStore], pg_dsn: str) -> None:
    """``hub.retain_history_days`` in a cluster: a lot or wafer archive goes once it was last
    written longer ago than the cut, by PostgreSQL's clock; one written again (a fuller
    archive of the lot) is dated afresh; the record times in it (``updated``: the tester's
    clock, 1970 here) do not count."""
    a, _ = stores
    old = {"lot": {"lot_id": "OLD", "parts": 5, "updated": 1.0}, "wafers": {}}
    redone = {"lot": {"lot_id": "REDONE", "parts": 5, "updated": 2.0}, "wafers": {}}
    fresh = {"lot": {"lot_id": "FRESH", "parts": 5, "updated": 3.0}, "wafers": {}}
    await a.save_archives(3, [("OLD", old, 1), ("REDONE", redone, 2), ("FRESH", fresh, 3)],
                          [("OLD", "OLD-W1", {"wafer_id": "OLD-W1", "parts": 5}, 4)])
    execute(pg_dsn, "UPDATE edgegw_lots SET archived_at = archived_at - 3 * 86400"
                    " WHERE lot_id <> 'FRESH'",
            "UPDATE edgegw_wafers SET archived_at = archived_at - 3 * 86400")
    fuller = {"lot": {"lot_id": "REDONE", "parts": 9, "updated": 2.5}, "wafers": {}}
    assert await a.save_archives(3, [("REDONE", fuller, 5)], []) == 0
    assert await a.prune_history(time.time() - 2 * 86400, batch=1) == 2  # OLD and its wafer
    assert await a.lot_archive("OLD") is None and await a.wafer_archive("OLD", "OLD-W1") is None
    assert await a.lot_archive("REDONE") == fuller and await a.lot_archive("FRESH") == fresh
    assert await a.prune_history(time.time() - 2 * 86400) == 0


async def test_alerts_are_pruned_by_their_last_write_once_the_feed_has_announced_them(
        stores: tuple[ClusterStore, ClusterStore], pg_dsn: str) -> None:
    """``hub.retain_history_days`` prunes alerts too, by PostgreSQL's clock at their last
    write (an acknowledgement dates one afresh), never by their record times -- and never
    one the alert feed has still to announce (its webhooks would miss it)."""
    a, b = stores
    def alert(i: str) -> dict[str, object]:
        return {"id": i, "priority": "P1", "rule": "y", "raised_at": 1.0,
                "acknowledged": False}
    await a.save_alerts(1, 5, [alert("old"), alert("acked"), alert("unfed"), alert("fresh")])
    fed = [(got["id"], "r", updated) for got, _, updated in await b.pending_alerts()
           if got["id"] != "unfed"]
    assert await b.mark_fed(fed) == {"old", "acked", "fresh"}
    execute(pg_dsn, "UPDATE edgegw_alerts SET written_at = written_at - 3 * 86400"
                    " WHERE id <> 'fresh'")
    assert await b.ack_alert("acked", "ann", 120.0)  # written again now
    assert await b.prune_alerts(time.time() - 2 * 86400, batch=1) == 1
    assert sorted(x["id"] for x in await a.load_alerts()) == ["acked", "fresh", "unfed"]
    assert await b.prune_alerts(time.time() - 2 * 86400) == 0


async def test_the_webhook_outbox_keeps_one_row_per_webhook_and_event(
        stores: tuple[ClusterStore, ClusterStore]) -> None:
    """The alert feed's outbox (docs/cluster.md, "Webhooks across a takeover"): a row per
    (webhook, event), written once -- an event announced again finds its row and is not
    queued twice --; rows without an outcome are what a new holder sends again; finished
    rows are pruned by age."""
    a, b = stores
    one = ("http://h/1", "x1:raised", '{"event": "raised"}', 100.0)
    two = ("http://h/2", "x1:raised", '{"event": "raised"}', 100.0)
    assert await a.queue_webhooks([one, two]) == {one[:2], two[:2]}
    assert await b.queue_webhooks([one]) == set()  # announced again: there already
    await a.mark_webhooks([(*one[:2], "delivered")])
    assert await b.undelivered_webhooks() == [two]
    await b.mark_webhooks([(*two[:2], "attempts")], prune_before=100.5)
    assert await a.undelivered_webhooks() == []
    assert await a.queue_webhooks([one]) == {one[:2]}  # pruned: a new row


async def test_a_claim_waiting_on_a_paused_nodes_lock_gives_up_counted_and_tries_again(
        pg_dsn: str) -> None:
    # A paused node's transaction holds the rows the claims need: the partition's fence row
    # (share-locked by a checkpoint's write) and the gateway's row (locked by a commit).
    # Without a lock timeout a claim waits for as long as the node sleeps -- a worker thread
    # and a pooled connection held, the gateway never WELCOMEd, the partition never owned.
    metrics = Metrics()
    store = ClusterStore(pg_dsn, "node-b", partitions=8, lock_timeout_s=0.3,
                         idle_in_transaction_timeout_s=5.0, metrics=metrics)
    await store.open()
    assert await store.claim_partition(0, 1)
    await store.claim_gateway("gw-locked")
    paused = psycopg.connect(pg_dsn)  # the paused node's open transaction
    paused.execute("SELECT token FROM edgegw_partition_fences WHERE partition = 0 FOR SHARE")
    paused.execute("SELECT generation FROM edgegw_gateways WHERE gateway_id = 'gw-locked'"
                   " FOR UPDATE")
    released = trio.Event()

    async def release_after(seconds: float) -> None:
        # bounds the old code's endless wait: the test fails, it does not hang
        await trio.sleep(seconds)
        await trio.to_thread.run_sync(paused.rollback)
        released.set()

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(release_after, 30)
            with pytest.raises(LockTimeout):
                await store.claim_partition(0, 2)
            with pytest.raises(LockTimeout):
                await store.claim_gateway("gw-locked")
            assert not released.is_set(), "the claims waited for the lock to be released"
            # PostgreSQL answers: a lock timeout is not an unavailable store (healthz)
            assert store.health_problem() is None
            assert metrics.counter("cluster_pg_lock_timeouts_total").get(
                call="claim_partition") == 1
            assert metrics.counter("cluster_pg_lock_timeouts_total").get(
                call="claim_gateway") == 1
            nursery.cancel_scope.cancel()
        # the paused node's session ends (PostgreSQL's idle timeout, here: rolled back);
        # the same claims, tried again, go through, and the store's connection was kept
        await trio.to_thread.run_sync(paused.rollback)
        assert await store.claim_partition(0, 2)
        assert await store.claim_gateway("gw-locked") == 2
        assert await store.query("SHOW idle_in_transaction_session_timeout") == [("5s",)]
    finally:
        paused.close()
        await store.close()


def freeze_holding(conn: psycopg.Connection[Any], lock_sql: str, params: tuple[Any, ...],
                   how: str, thawed: Any) -> None:
    """A node's worker thread freezing inside a transaction that holds a row lock, with its
    session *active* (not idle in transaction, which PostgreSQL's idle timeout ends):
    ``statement`` -- inside a statement that does not end; ``pipeline`` -- a pipeline
    half sent (an ``executemany``): PostgreSQL waits for the rest, as it did for the
    node SIGSTOPped in test_cluster_pause.py.  Returns when thawed (``thawed.wait``)."""
    with conn.transaction():
        if how == "statement":
            conn.execute(lock_sql, params)
            conn.execute("SELECT pg_sleep(600)")
        else:
            with conn.pipeline():
                conn.execute(lock_sql, params)  # sent and run; no Sync yet
                thawed.wait(60)


def end_node_a_sessions(dsn: str) -> None:
    rows(dsn, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
         " WHERE application_name = 'edgegw node-a' AND backend_xid IS NOT NULL"
         " AND datname = current_database()")


@contextlib.asynccontextmanager
async def paused_and_other(pg_dsn: str
                           ) -> AsyncIterator[tuple[ClusterStore, ClusterStore, Metrics,
                                                    threading.Event]]:
    """node-a, to be frozen mid-transaction, and node-b, counted; their lease TTL 1 s.
    The event thaws node-a's frozen session (set at the end whatever happened)."""
    metrics = Metrics()
    paused = ClusterStore(pg_dsn, "node-a", partitions=8, lock_timeout_s=0.5,
                          idle_in_transaction_timeout_s=1.0)
    store = ClusterStore(pg_dsn, "node-b", partitions=8, lock_timeout_s=0.5,
                         idle_in_transaction_timeout_s=1.0, metrics=metrics)
    await paused.open()
    await store.open()
    thawed = threading.Event()
    try:
        yield paused, store, metrics, thawed
    finally:
        thawed.set()
        await paused.close()
        await store.close()


def session_state(dsn: str, node: str) -> list[str]:
    return [r[0] for r in rows(dsn, "SELECT state FROM pg_stat_activity WHERE"
                               " application_name = %s AND backend_xid IS NOT NULL"
                               " AND datname = current_database()",
                               (f"edgegw {node}",))]


@pytest.mark.parametrize("how", ["statement", "pipeline"])
async def test_a_claim_ends_a_paused_nodes_session_stuck_active_on_its_row(
        pg_dsn: str, how: str) -> None:
    # Seen in test_cluster_pause.py: node 0 SIGSTOPped mid-commit, its session "active"
    # holding the gateway's row (the idle-in-transaction timeout never applies); node 1's
    # claim timed out on it again and again, the gateway never WELCOMEd.  The claim ends
    # the stuck session of the other node -- its transaction open longer than the
    # lease TTL (here 1 s) -- and goes through; the paused node is fenced off as before.
    async with paused_and_other(pg_dsn) as (paused, store, metrics, thawed):
        assert await paused.claim_gateway("gw-stuck") == 1
        assert await paused.claim_partition(3, 1)
        await paused.commit([frame("gw-stuck", 1, ["L1"])], {"gw-stuck": 1})
        failures: list[BaseException] = []

        async def freeze(sql: str, params: tuple[Any, ...]) -> None:
            try:
                await paused._call(lambda conn: freeze_holding(conn, sql, params, how, thawed))
            except BaseException as exc:  # its session ended under it
                failures.append(exc)

        async with trio.open_nursery() as nursery:
            # a commit's lock on the gateway row, a checkpoint's share lock on the fence
            nursery.start_soon(freeze, "SELECT generation FROM edgegw_gateways WHERE"
                               " gateway_id = %s FOR UPDATE", ("gw-stuck",))
            nursery.start_soon(freeze, "SELECT token FROM edgegw_partition_fences WHERE"
                               " partition = %s FOR SHARE", (3,))
            with trio.fail_after(30):
                while session_state(pg_dsn, "node-a") != ["active", "active"]:
                    await trio.sleep(0.05)

            async def claimed(claim: Any, *args: Any) -> Any:
                while True:  # as the ingest and the owner do: again after a lock timeout
                    try:
                        return await claim(*args)
                    except LockTimeout:
                        await trio.sleep(0.2)

            try:
                # bound: the session's age past 1 s, one lock timeout, the termination;
                # the old code waited as long as the node slept
                with trio.fail_after(20):
                    assert await claimed(store.claim_gateway, "gw-stuck") == 2
                    assert await claimed(store.claim_partition, 3, 2) is True
            finally:
                thawed.set()  # (on the old code: the test fails, it does not hang)
                end_node_a_sessions(pg_dsn)
        assert len(failures) == 2 and all(isinstance(e, StoreUnavailable) for e in failures)
        assert metrics.counter("cluster_pg_sessions_ended_total").get(
            call="claim_gateway") == 1
        assert metrics.counter("cluster_pg_sessions_ended_total").get(
            call="claim_partition") == 1
        # the paused node wakes: fenced off by the generation and the partition's token
        with pytest.raises(GatewaySuperseded):
            await paused.commit([frame("gw-stuck", 2, ["L1"])], {"gw-stuck": 1})
        assert await paused.save_checkpoint(3, 10, 1, b"stale") is False
        assert rows(pg_dsn, "SELECT frames_applied FROM edgegw_gateways") == [(1,)]


@pytest.mark.parametrize("how", ["statement", "pipeline"])
async def test_a_commit_ends_a_paused_nodes_session_stuck_on_a_partition_head(
        pg_dsn: str, how: str) -> None:
    # A commit locks its partitions' heads: a node paused mid-commit (session active)
    # stopped every other node's commits to those partitions -- no lock timeout at all --
    # until its own gateway's claim ended it, never if that gateway did not come back.  A
    # commit waits at most the lock timeout too, ends the stuck session, goes through.
    async with paused_and_other(pg_dsn) as (paused, store, metrics, thawed):
        assert await paused.claim_gateway("gw-a") == 1
        assert await store.claim_gateway("gw-b") == 1
        await paused.commit([frame("gw-a", 1, ["L1"])], {"gw-a": 1})
        [(p,)] = rows(pg_dsn, "SELECT partition FROM edgegw_partition_heads"
                              " WHERE last_pseq > 0")
        failures: list[BaseException] = []

        async def freeze() -> None:
            try:
                await paused._call(lambda conn: freeze_holding(
                    conn, "UPDATE edgegw_partition_heads SET last_pseq = last_pseq + 1"
                    " WHERE partition = %s", (p,), how, thawed))
            except BaseException as exc:  # its session ended under it
                failures.append(exc)

        async def release_after(seconds: float) -> None:
            # bounds the old code's endless wait (a worker thread is not cancelled)
            await trio.sleep(seconds)
            thawed.set()
            end_node_a_sessions(pg_dsn)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(freeze)
            with trio.fail_after(30):
                while session_state(pg_dsn, "node-a") != ["active"]:
                    await trio.sleep(0.05)
            nursery.start_soon(release_after, 40)
            started = trio.current_time()
            while True:  # as the ingest does: again after a lock timeout
                try:
                    await store.commit([frame("gw-b", 1, ["L1"])], {"gw-b": 1})
                    break
                except LockTimeout:
                    await trio.sleep(0.2)
            # bound: the session's age past 1 s, one lock timeout, the termination
            assert trio.current_time() - started < 20, "the commit waited for the thaw"
            thawed.set()  # (the frozen worker thread, its session gone, may return)
            nursery.cancel_scope.cancel()
        assert len(failures) == 1 and isinstance(failures[0], StoreUnavailable)
        assert metrics.counter("cluster_pg_sessions_ended_total").get(call="commit") == 1
        # the paused node's write is gone with its session; both commits numbered in order
        assert rows(pg_dsn, "SELECT last_pseq FROM edgegw_partition_heads"
                            " WHERE partition = %s", (p,)) == [(2,)]
        assert rows(pg_dsn, "SELECT gateway_id, pseq FROM edgegw_partition_log"
                            " ORDER BY pseq") == [("gw-a", 1), ("gw-b", 2)]


async def test_a_claim_never_ends_a_young_transaction_nor_a_foreign_session(
        pg_dsn: str) -> None:
    # Only another node's session whose transaction is older than the lease TTL is ended:
    # not a fresh one (a node's commit a moment in), nor a session that is not a node's.
    store = ClusterStore(pg_dsn, "node-b", partitions=8, lock_timeout_s=0.3,
                         idle_in_transaction_timeout_s=30.0)
    await store.open()
    await store.claim_gateway("gw-young")
    young = psycopg.connect(pg_dsn, application_name="edgegw node-a")
    foreign = psycopg.connect(pg_dsn, application_name="psql")
    try:
        young.execute("SELECT 1 FROM edgegw_gateways WHERE gateway_id = 'gw-young'"
                      " FOR UPDATE")
        with pytest.raises(LockTimeout):
            await store.claim_gateway("gw-young")
        young.rollback()
        foreign.execute("SELECT 1 FROM edgegw_gateways WHERE gateway_id = 'gw-young'"
                        " FOR UPDATE")
        store.stuck_after_s = 0.01
        with pytest.raises(LockTimeout):
            await store.claim_gateway("gw-young")
        foreign.rollback()
        assert not young.closed and not foreign.closed
        young.execute("SELECT 1")
        foreign.execute("SELECT 1")
    finally:
        young.close()
        foreign.close()
        await store.close()


@pytest.mark.parametrize("again", [False, True])
async def test_the_passes_of_a_lot_retested_after_it_left_memory_merge_as_on_a_single_hub(
        stores: tuple[ClusterStore, ClusterStore], tmp_path: Path, again: bool) -> None:
    """Lot OLD, its wafers leaving memory one by one (``again``: its first wafer back in
    memory and out again within the first pass), evicted, tested again days later under
    its lot id and evicted again (``test_history.two_passes``): the owner's archives,
    written at their log positions, merge pass by pass as the single hub's history store
    merges them; a new owner replaying the log writes nothing again."""
    a, b = stores
    made: list[tuple[str, tuple[Any, ...]]] = []
    state = LiveState(lambda t, d: None, max_lots=1, max_wafers_per_lot=1,
                      on_evict=lambda lot_id, arc: made.append(("lot", (lot_id, arc))),
                      on_wafer_archive=lambda lot_id, wafer_id, snap: made.append(
                          ("wafer", (lot_id, wafer_id, snap))))
    for i, frame in enumerate(two_passes(again)):
        state.on_records("gw", 1_000 * i + 1, frame, now=1.0)
    single = HistoryStore(tmp_path / "history.sqlite3")
    await single.open()
    try:
        for pseq, (kind, item) in enumerate(made, 1):
            lots = [item] if kind == "lot" else []
            wafers = [item] if kind == "wafer" else []
            await single.save([], lots, wafers)  # type: ignore[arg-type]
            assert await a.save_archives(3, [(*x, pseq) for x in lots],
                                         [(*x, pseq) for x in wafers]) == 0
        merged = await single.lot("OLD")
        assert merged is not None and merged["lot"]["starts"] == 2
        assert await a.lot_archive("OLD") == merged
        for wafer_id in ("W1", "W2", "W3"):
            assert await a.wafer_archive("OLD", wafer_id) == await single.wafer("OLD", wafer_id)
        assert await a.wafer_summaries("OLD") == await single.wafer_summaries("OLD")
        # the next owner replays the log: every archive at the same position again
        replay = [(kind, item, pseq) for pseq, (kind, item) in enumerate(made, 1)]
        assert await b.save_archives(
            4, [(*item, pseq) for kind, item, pseq in replay if kind == "lot"],
            [(*item, pseq) for kind, item, pseq in replay if kind == "wafer"]) == len(made)
        assert await b.lot_archive("OLD") == merged
    finally:
        await single.close()
