"""A node that stops gracefully hands its partitions on at once (docs/cluster.md "Ownership
and rebuild"): it releases its leases *and* leaves the live set, so the other nodes count
without it from their next round -- they do not aim at the old share, leaving its
partitions free, until its heartbeat lapses (a lease TTL later).

One ``ClusterHub`` on a real PostgreSQL and a real Redis with a long lease TTL (so nothing
expires during the test), stopped by cancelling it; a second ``ClusterBus`` on the same key
prefix reads what Redis says right after the stop."""

from __future__ import annotations

from pathlib import Path

import trio
from cluster_redis import RedisServer, fresh_prefix, redis_server  # noqa: F401
from test_cluster_parity import until

from edgegw.config import build
from edgegw.hub import HubConfig
from edgegw.hub.cluster.bus import ClusterBus
from edgegw.hub.cluster.node import ClusterHub

PARTITIONS = 4
#: longer than the test: a lease or heartbeat gone from Redis was given back, not expired
LONG_TTL_S = 120.0


async def test_a_graceful_stop_releases_the_leases_and_leaves_the_live_set(
        tmp_path: Path, pg_dsn: str, redis_server: RedisServer) -> None:  # noqa: F811
    prefix = fresh_prefix()
    hub = ClusterHub(build(HubConfig, {
        "hub": {"port": 0, "data_dir": str(tmp_path / "na"),
                "cluster": {"node_id": "na", "postgres_dsn": pg_dsn,
                            "redis_url": redis_server.url, "key_prefix": prefix,
                            "partitions": PARTITIONS, "lease_ttl_s": LONG_TTL_S,
                            "stale_after_s": 2.0}}}))
    names = [f"partition:{p}" for p in range(PARTITIONS)]
    async with trio.open_nursery() as nursery:
        observer = ClusterBus(redis_server.url, prefix, "observer", partitions=PARTITIONS,
                              stale_after_s=2.0)
        await nursery.start(observer.run)
        scope = trio.CancelScope()
        done = trio.Event()

        async def node() -> None:
            try:
                with scope:
                    await hub.run()
            finally:
                done.set()
        nursery.start_soon(node)
        await until(lambda: len(hub.owner.states()) == PARTITIONS, 20,
                    "every partition owned and rebuilt")
        assert await observer.live_nodes() == ["na"]
        holders = await observer.lease_holders(names)
        assert {h[0] for h in holders.values() if h is not None} == {"na"}

        scope.cancel()  # a graceful stop
        with trio.fail_after(20):
            await done.wait()
        # given back, not expiring a TTL later
        assert await observer.lease_holders(names) == dict.fromkeys(names)
        assert await observer.live_nodes() == []
        nursery.cancel_scope.cancel()
