"""A cluster node counts its partitions' wake-ups (docs/cluster.md "Ownership and rebuild"):
``edgegw_cluster_partition_wakeups_total{source}``, where ``source`` says what woke an owned
partition -- ``local`` (a commit on this node), ``redis`` (a commit's wake-up through the
partition's Pub/Sub channel) or ``resubscribe``.

One ``ClusterHub`` (so it owns every partition) on a real PostgreSQL and a real Redis, one
gateway through it (the set-up of test_cluster_parity.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import trio
from cluster_redis import RedisServer, fresh_prefix, redis_server  # noqa: F401
from hubtools import gateway_config
from test_cluster_parity import FloorSource, node_config, until

from edgegw.gateway import Gateway
from edgegw.hub.cluster.node import ClusterHub


async def test_commits_wake_their_partitions_owner_and_each_wake_up_is_counted(
        tmp_path: Path, pg_dsn: str, redis_server: RedisServer) -> None:  # noqa: F811
    node = ClusterHub(node_config(tmp_path, "solo", pg_dsn, redis_server.url, fresh_prefix()))
    wakeups = node.metrics.counter("cluster_partition_wakeups_total")
    async with trio.open_nursery() as nursery:
        port = await nursery.start(node.run)
        await until(lambda: len(node.owner.states()) == 4, 20,
                    "every partition owned and rebuilt")
        # exported before anything woke a partition (0, as every metric not counted yet)
        assert "edgegw_cluster_partition_wakeups_total" in node.metrics.render_prometheus()
        before = {source: wakeups.get(source=source) for source in ("local", "redis")}
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
        # each commit woke the partitions it advanced here at once, and again through
        # Redis (the owner follows its partitions' channels, wherever the commit was)
        await until(lambda: wakeups.get(source="local") > before["local"]
                    and wakeups.get(source="redis") > before["redis"], 10,
                    "wake-ups counted by source")
        page = node.metrics.render_prometheus()
        assert 'edgegw_cluster_partition_wakeups_total{source="local"}' in page
        assert 'edgegw_cluster_partition_wakeups_total{source="redis"}' in page
        nursery.cancel_scope.cancel()
