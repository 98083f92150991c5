"""A cluster node counts its partitions' wake-ups (docs/cluster.md "Ownership and rebuild"):
``edgegw_cluster_partition_wakeups_total{source}``, where ``source`` says what woke an owned
partition -- ``local`` (a commit on this node), ``redis`` (a commit's wake-up through the
partition's Pub/Sub channel) or ``resubscribe``.  A wake-up carries the pseq the commit
advanced the partition to: the owner skips one it had already (its own node's commit comes
back through Redis after waking it directly), and a commit on another node still wakes it
at once.

One ``ClusterHub`` (so it owns every partition) on a real PostgreSQL and a real Redis, one
gateway through it (the set-up of test_cluster_parity.py); "another node" is a second
``ClusterStore`` committing a frame and a second ``ClusterBus`` sending its wake-up, as a
node's ingest does (``Notifier``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import trio
from cluster_redis import RedisServer, fresh_prefix, redis_server  # noqa: F401
from hubtools import gateway_config
from test_cluster_parity import FloorSource, node_config, until

from edgegw.gateway import Gateway
from edgegw.hub.cluster.bus import ClusterBus
from edgegw.hub.cluster.node import ClusterHub, Notifier
from edgegw.hub.cluster.partition import partition_of
from edgegw.hub.cluster.pgstore import ClusterStore
from edgegw.hub.store import FrameToApply
from edgegw.protocol import encode_body
from edgegw.records import PartResult, Record


async def other_node_commits(pg_dsn: str, redis_url: str, prefix: str, lot: str,
                             n: int) -> None:
    """Another node's ingest commits one frame of ``n`` parts of ``lot`` (one partition)
    and sends its wake-up through Redis; that node owns no partition."""
    store = ClusterStore(pg_dsn, "other", partitions=4)
    bus = ClusterBus(redis_url, prefix, "other", partitions=4, stale_after_s=2.0)
    await store.open()
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(bus.run)
            notifier = Notifier(bus, lambda p, pseq: None)
            store.on_advance = notifier.advanced
            await nursery.start(notifier.run)
            gen = await store.claim_gateway("gw-other")
            records: list[Record] = [
                PartResult("tester", 1.0 + i, lot, "W1", 1, i % 4, f"o{i}", i, 0, 1, 1, True)
                for i in range(n)]
            await store.commit([FrameToApply("gw-other", "e1", 1, 0, n,
                                             encode_body(0, records), records=records)],
                               {"gw-other": gen})
            await until(lambda: notifier.sent >= 1, 10, "the other node's wake-up sent")
            nursery.cancel_scope.cancel()
    finally:
        await store.close()


async def test_a_commit_on_the_owners_node_wakes_it_once_another_nodes_through_redis(
        tmp_path: Path, pg_dsn: str, redis_server: RedisServer) -> None:  # noqa: F811
    prefix = fresh_prefix()
    # A lease long enough that a starved machine does not take a partition away meanwhile:
    # a partition acquired again is rebuilt from PostgreSQL, which reads the other node's
    # commit without its wake-up (seen with three test workers beside two busy loops).
    node = ClusterHub(node_config(tmp_path, "solo", pg_dsn, redis_server.url, prefix,
                                  lease_ttl_s=15.0))
    node.owner.poll_s = 3600  # the owner reads when woken, never by polling here
    wakeups = node.metrics.counter("cluster_partition_wakeups_total")
    applied = node.metrics.counter("cluster_owner_records_total")
    async with trio.open_nursery() as nursery:
        port = await nursery.start(node.run)
        await until(lambda: len(node.owner.states()) == 4, 20,
                    "every partition owned and rebuilt")
        # exported before anything woke a partition (0, as every metric not counted yet)
        assert "edgegw_cluster_partition_wakeups_total" in node.metrics.render_prometheus()
        before = {source: wakeups.get(source=source) for source in ("local", "redis")}
        acquired = node.metrics.counter("cluster_partitions_acquired_total")
        acquired_before = acquired.total()
        source = FloorSource()

        async def gateway(*, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
            cfg = gateway_config(tmp_path / "gw", port, batch={"max_records": 500,
                                                               "max_delay_ms": 20},
                                 spool={"dir": str(tmp_path / "spool")})
            async with trio.open_nursery() as inner:
                await inner.start(Gateway(cfg, extra_sources=[("tester", source)]).run)
                task_status.started()
        await nursery.start(gateway)
        await source.done.wait()
        # each commit woke the partitions it advanced here at once; its wake-up through
        # Redis (the owner follows its partitions' channels) came back to a partition
        # that had it already: not counted
        await until(lambda: wakeups.get(source="local") > before["local"], 10,
                    "local wake-ups counted")
        await until(lambda: node.notifier.sent > 0, 10, "the commits' wake-ups sent")
        records = applied.total()
        # a commit on another node: only its wake-up through Redis can make the owner read
        await other_node_commits(pg_dsn, redis_server.url, prefix, "LOT-OTHER", 7)
        await until(lambda: applied.total() >= records + 7, 10,
                    "the other node's commit read at once")
        # its one wake-up, and none of this node's own commits'.  (A partition lost and
        # acquired again -- a lease not renewed in time on a starved machine -- has a new
        # state, and an own commit's wake-up still on its way may count there once.)
        regained = acquired.total() - acquired_before
        assert 1 <= wakeups.get(source="redis") - before["redis"] <= 1 + regained
        assert node.owner.owned[partition_of("LOT-OTHER", 4)].woken_to > 0
        page = node.metrics.render_prometheus()
        assert 'edgegw_cluster_partition_wakeups_total{source="local"}' in page
        assert 'edgegw_cluster_partition_wakeups_total{source="redis"}' in page
        nursery.cancel_scope.cancel()
