"""The cluster bus sharded over two Redis servers (``[hub.cluster] redis_urls``,
docs/cluster.md "Shards"), with real private servers (tests/cluster_redis.py): a
partition's topics, wake-ups, leases and gateway presence live on shard ``partition % 2``,
the cluster-wide keys on shard 0; each shard has its own epoch, so a restart of one shard
resyncs only the topics on it, and clients recover with no silent gap."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import trio
from cluster_redis import RedisServer, fresh_prefix, redis_server, redis_shards  # noqa: F401
from test_cluster_bus import LiveClient, Owner, drive, settled, wait_for
from test_cluster_nodes import (
    GATEWAY_TOML,
    applied_rid_coverage,
    assert_exactly_once,
    count_tester_records,
)

from edgegw.hub.cluster import ClusterBus, ClusterStore, Mirror, ShardMismatch, TopicPublisher
from edgegw.hub.cluster.owner import topic_partition
from edgegw.hub.cluster.partition import PartitionFenced, partition_of
from edgegw.hub.fanout import LiveConfig, LiveFanout
from edgegw.metrics import Metrics
from edgegw.web import HttpServer
from tests.cluster_haproxy import NodeSet, node_toml
from tests.cluster_live import LiveFollower
from tests.cluster_reference import comparable, lot_topics, reference_state, volatile_fields
from tests.ports import free_port
from tests.processes import get_json, spawn

PARTITIONS = 11  # LOT0001 on shard 1, LOT0002 on shard 0


async def start_node(nursery: trio.Nursery, urls: list[str], prefix: str, name: str,
                     ) -> tuple[ClusterBus, int]:
    metrics = Metrics()
    bus = ClusterBus(urls, prefix, name, partitions=PARTITIONS, stale_after_s=1.5,
                     metrics=metrics)
    await nursery.start(bus.run)
    fanout = LiveFanout(LiveConfig(), metrics=metrics, epoch=bus.epoch)
    mirror = Mirror(bus, fanout, reconcile_interval_s=1.0,
                    interest=fanout.core.subscribed_patterns)
    http = HttpServer(metrics=metrics)
    fanout.install(http)
    listeners = await nursery.start(http.serve, "127.0.0.1", 0)
    await nursery.start(fanout.run)
    await nursery.start(mirror.run)
    return bus, listeners[0].socket.getsockname()[1]


async def stored_topics(bus: ClusterBus, shard: int) -> set[str]:
    client: Any = bus.shards[shard].client
    return {m.decode() for m in await client.smembers(bus.key("topics"))}


def epochs_seen(client: LiveClient) -> dict[str, set[str]]:
    seen: dict[str, set[str]] = {}
    for item in client.items:
        seen.setdefault(item["topic"], set()).add(item["epoch"])
    return seen


def test_keys_map_to_shards_by_partition() -> None:
    bus = ClusterBus(["redis://127.0.0.1:1/0", "redis://127.0.0.1:2/0"], "x", "n",
                     partitions=PARTITIONS)
    lot = "L42"
    p = partition_of(lot, PARTITIONS)
    for topic in (f"lot/{lot}", f"lot/{lot}/wafer/3", f"test/{lot}/100"):
        assert topic_partition(topic, PARTITIONS) == p
        assert bus.shard_of_topic(topic) == p % 2
    assert bus.shard_of_lease(f"partition:{p}") == p % 2
    assert bus.shard_of_gateway("ate-01") == partition_of("gw:ate-01", PARTITIONS) % 2
    # the cluster-wide ones: shard 0
    for topic in ("alert/P0/yield_drop", "sensor/handler%2Ftemp", "hub/state"):
        assert bus.shard_of_topic(topic) == 0
    assert bus.shard_of_lease("alerts") == 0
    single = ClusterBus("redis://127.0.0.1:1/0", "x", "n", partitions=PARTITIONS)
    assert single.shard_of_topic(f"lot/{lot}") == 0 and single.redis_urls == [
        "redis://127.0.0.1:1/0"]


async def test_wake_ups_leases_and_presence_live_on_their_partitions_shard(
        redis_shards: list[RedisServer]) -> None:  # noqa: F811
    urls = [s.url for s in redis_shards]
    prefix = fresh_prefix()
    async with trio.open_nursery() as nursery:
        a, b, c = (ClusterBus(urls, prefix, n, partitions=PARTITIONS) for n in "abc")
        for bus in (a, b, c):
            await nursery.start(bus.run)
        got: dict[str, list[tuple[int, int]]] = {"a": [], "b": []}
        a.on_partition(lambda p, pseq: got["a"].append((p, pseq)))
        b.on_partition(lambda p, pseq: got["b"].append((p, pseq)))
        # a owns partitions 1 (shard 1) and 2 (shard 0), b owns 3: a commit's wake-up
        # reaches its partition's owner only, through the partition's shard
        await a.follow_partitions([1, 2])
        await b.follow_partitions([3])
        await c.notify_partitions({1: 10, 2: 20, 3: 30, 4: 40})
        await wait_for(lambda: len(got["a"]) == 2 and len(got["b"]) == 1)
        await trio.sleep(0.2)
        assert sorted(got["a"]) == [(1, 10), (2, 20)] and got["b"] == [(3, 30)]
        # leases with their fence, and a gateway's presence, on the partition's shard
        token = await a.acquire("partition:1", 5.0)
        assert token is not None and await b.lease_holders(["partition:1", "partition:2"]) \
            == {"partition:1": ("a", token), "partition:2": None}
        await a.set_presences(["ate-01", "ate-02"], 5.0)
        assert await a.heartbeat_and_list(5.0) == ["a"]
        for name, shard in ((a.key("lease", "partition:1"), 1),
                            (a.key("presence", "ate-01"), a.shard_of_gateway("ate-01")),
                            (a.key("presence", "ate-02"), a.shard_of_gateway("ate-02")),
                            (a.key("nodes"), 0)):
            assert await a.shards[shard].client.exists([name]) == 1, name  # type: ignore
            assert await a.shards[1 - shard].client.exists([name]) == 0, name  # type: ignore
        assert await c.presence("ate-02") == {"node": "a"}
        nursery.cancel_scope.cancel()


async def test_topics_spread_and_one_shards_restart_resyncs_only_its_topics(
        redis_shards: list[RedisServer]) -> None:  # noqa: F811
    urls = [s.url for s in redis_shards]
    prefix = fresh_prefix()
    async with trio.open_nursery() as nursery:
        owner_bus = ClusterBus(urls, prefix, "owner", partitions=PARTITIONS,
                               stale_after_s=1.5)
        await nursery.start(owner_bus.run)
        owner = Owner(owner_bus, lots=3, wafers=2)
        await nursery.start(owner.publisher.run)
        bus_b, port_b = await start_node(nursery, urls, prefix, "b")
        client = LiveClient()
        await nursery.start(client.follow, port_b, ["lot/+", "lot/+/wafer/+"])
        await drive(owner, 80)
        await wait_for(lambda: settled(client, owner))

        # Every topic is on its partition's shard, and both shards hold some.
        lot_topics = [t for t in owner.state.topics() if t.startswith("lot/")]
        by_shard = {s: {t for t in lot_topics if owner_bus.shard_of_topic(t) == s}
                    for s in (0, 1)}
        assert by_shard[0] and by_shard[1], by_shard
        for s in (0, 1):
            assert by_shard[s] <= await stored_topics(owner_bus, s)
            assert not by_shard[1 - s] & await stored_topics(owner_bus, s)
        epochs = owner_bus.epochs
        assert epochs[0] != epochs[1] and bus_b.epochs == epochs
        assert all(epochs_seen(client)[t] == {epochs[owner_bus.shard_of_topic(t)]}
                   for t in lot_topics)

        # Shard 1 loses its data: only its topics change epoch and resync.
        mark = len(client.items)
        before = {i["topic"] for i in client.items}
        redis_shards[1].restart_empty()
        await wait_for(lambda: bus_b.epochs[1] not in (None, epochs[1])
                       and owner_bus.epochs[1] == bus_b.epochs[1])
        assert bus_b.epochs[0] == owner_bus.epochs[0] == epochs[0]
        await drive(owner, 40)
        await wait_for(lambda: settled(client, owner))
        after = client.items[mark:]
        resynced = {i["topic"] for i in after if i.get("resync")}
        # (topics that had no delta since the restart need not have resynced yet)
        assert resynced and resynced <= by_shard[1], (resynced, by_shard)
        assert {i["resync"] for i in after if i.get("resync")} == {"epoch_changed"}
        for item in after:
            shard = owner_bus.shard_of_topic(item["topic"])
            assert item["epoch"] == owner_bus.epochs[shard]
            if shard == 0:  # untouched: deltas from where the client was (or new topics)
                assert "resync" not in item, item
                assert item["type"] == "delta" or item["topic"] not in before, item
        # the client's views are the owner's state (``LiveClient`` checked every delta
        # starts where it was: no silent gap), and each shard-1 topic is in the new epoch
        assert all(epochs_seen(client)[t] >= {owner_bus.epochs[1]} for t in resynced)
        nursery.cancel_scope.cancel()


# ---------------------------------------------------------------------- a node, end to end


# with 8 partitions L400 is on shard 0, L401 on shard 1
SOURCE = {"parts_per_second": 150, "max_parts": 1200, "seed": 11, "sites": 4, "wafers": 2,
          "tests_per_part": 6, "lots": 2, "lot_id": "L400"}


async def test_a_node_on_two_shards_loses_nothing_when_one_restarts(
        tmp_path: Path, pg_dsn: str, redis_shards: list[RedisServer]) -> None:  # noqa: F811
    """A node process on two Redis shards, a gateway process streaming two lots (one per
    shard), a dashboard client: shard 1 restarts empty mid-run.  Only shard 1's topics
    resync (``epoch_changed``), the client ends with the single hub's state and no silent
    gap, and every record is applied exactly once."""
    sources = {"ate-01": SOURCE}
    assert {partition_of(lot, 8) % 2 for lot in ("L400", "L401")} == {0, 1}
    text = node_toml(tmp_path / "data", pg_dsn, [s.url for s in redis_shards],
                     fresh_prefix(),
                     cluster="checkpoint_records = 2000\ncheckpoint_interval_s = 2",
                     rest='[gateways.ate-01]\ntoken = "tok-ate-01"\n')
    n_records = count_tester_records(SOURCE)
    with NodeSet(tmp_path / "nodes", 1, lambda i: text) as nodes:
        # the single hub's state is computed while the node starts
        async with trio.open_nursery() as setup:
            setup.start_soon(trio.to_thread.run_sync, lambda: nodes.start_all(timeout=90))
            state = await trio.to_thread.run_sync(reference_state, sources)
            volatile = await trio.to_thread.run_sync(volatile_fields, sources, state)
        expected = comparable(lot_topics(state), volatile)
        port = nodes.ports[0]
        gw_dir = tmp_path / "ate-01"
        gw_dir.mkdir()
        status = free_port()
        source = "\n".join(f'{k} = "{v}"' if isinstance(v, str) else f"{k} = {v}"
                           for k, v in SOURCE.items())
        (gw_dir / "gateway.toml").write_text(
            GATEWAY_TOML.replace("@ID@", "ate-01").replace("@LB@", str(port))
            .replace("@STATE@", str(gw_dir / "state")).replace("@STATUS@", str(status))
            .replace("@SOURCE@", source))
        follower = LiveFollower(port, ["lot/#", "test/#"])
        gateway = spawn("gateway", "--config", str(gw_dir / "gateway.toml"),
                        log=gw_dir / "gateway.log")
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(follower.run)
                with trio.fail_after(60):  # both lots live (one per shard), mid-run
                    while {_shard(t) for t in follower.offsets} != {0, 1}:
                        await trio.sleep(0.1)
                before = dict(follower.offsets)
                await trio.to_thread.run_sync(redis_shards[1].restart_empty)

                def drained() -> bool:
                    st = get_json(f"http://127.0.0.1:{status}/api/stats")
                    return (st["next_rid"] - 1 >= n_records and st["store"]["frames"] == 0
                            and st["pending_in_batcher"] == 0)
                with trio.fail_after(90):
                    while not await trio.to_thread.run_sync(drained):
                        await trio.sleep(0.5)
                last_rid = get_json(f"http://127.0.0.1:{status}/api/stats")["next_rid"] - 1
                with trio.move_on_after(60):
                    while comparable(follower.views, volatile) != expected:
                        await trio.sleep(0.25)
                nursery.cancel_scope.cancel()
        finally:
            gateway.terminate()
            gateway.wait(15)
    # exactly once, record by record
    assert_exactly_once(applied_rid_coverage(pg_dsn)["ate-01"], last_rid)
    # the single hub's state, and no silent gap
    got = comparable(follower.views, volatile)
    assert set(got) == set(expected)
    for topic in expected:
        assert got[topic] == expected[topic], topic
    assert follower.silent_gaps == [], follower.silent_gaps[:5]
    # only shard 1's topics changed epoch; shard 0's went on (no resync of any kind)
    resynced = {t for t, _ in follower.resyncs}
    assert {r for _, r in follower.resyncs} <= {"epoch_changed", "state_reset"}
    assert any(r == "epoch_changed" for _, r in follower.resyncs)
    assert resynced and all(_shard(t) == 1 for t in resynced), follower.resyncs
    epochs = {_shard(t): e for t, (e, _) in follower.offsets.items()}
    assert all(before_epoch != epochs[1] for t, (before_epoch, _) in before.items()
               if _shard(t) == 1)
    assert all(follower.offsets[t][0] == e for t, (e, _) in before.items() if _shard(t) == 0)


def _shard(topic: str) -> int:
    return (topic_partition(topic, 8) or 0) % 2


def test_a_node_listing_another_number_of_shards_refuses_to_start(
        tmp_path: Path, pg_dsn: str, redis_shards: list[RedisServer]) -> None:  # noqa: F811
    """Every node must list the same Redis shards: ``partition % shards`` says where a
    partition's lease is, so a node on one shard next to a node on two would hold leases
    the other cannot see (two owners of a partition's live state).  The first node stores
    its count in PostgreSQL; ``edgegw hub`` on another count exits 3 with one line naming
    both numbers, before it takes any lease."""
    urls, prefix = [s.url for s in redis_shards], fresh_prefix()
    with NodeSet(tmp_path / "nodes", 2, lambda i: node_toml(
            tmp_path / "data", pg_dsn, urls if i == 0 else urls[:1], prefix)) as nodes:
        nodes.start(0)
        nodes.wait_healthy(0)
        nodes.start(1)
        proc = nodes.procs[1]
        assert proc is not None
        assert proc.wait(60) == 3
        log = nodes.log(1).read_text()
        assert ("edgegw: cannot start: hub.cluster.redis_urls lists 1 Redis shard but the "
                "cluster in PostgreSQL runs on 2") in log
        assert nodes.healthz(0)["status"] == "ok"
        assert nodes.healthz(0)["cluster"]["partitions_owned"] == 8  # type: ignore[index]


async def test_one_unreachable_shard_makes_the_node_stale_but_loses_only_its_leases(
        redis_shards: list[RedisServer]) -> None:  # noqa: F811
    """As docs/cluster.md "Shards" (Health) intends: a dashboard's topics span shards, so
    a node cut off from any one shard serves no live data at all (``/healthz`` 503,
    ``cluster_unavailable``; the reason names the shard) -- but only the leases on that
    shard count as lost: the partitions of the shards it still reaches stay owned."""
    urls = [s.url for s in redis_shards]
    async with trio.open_nursery() as nursery:
        bus = ClusterBus(urls, fresh_prefix(), "a", partitions=PARTITIONS, stale_after_s=1.0)
        await nursery.start(bus.run)
        assert (bus.shard_of_partition(1), bus.shard_of_partition(2)) == (1, 0)
        on_1 = await bus.acquire("partition:1", 60.0)
        on_0 = await bus.acquire("partition:2", 60.0)
        assert on_1 is not None and on_0 is not None
        redis_shards[1].stop()
        try:
            await wait_for(lambda: bus.stale, 20)
            health = bus.health()
            assert health["ok"] is False and health["redis"] == "stale"
            assert health["reason"].startswith("shard 1: ")
            assert [(s["shard"], s["redis"]) for s in health["shards"]] == [
                (0, "ok"), (1, "stale")]
            assert bus.holds("partition:1") is None
            assert bus.holds("partition:2") == on_0
        finally:
            redis_shards[1].start()  # (empty: the module's other tests use fresh prefixes)
        await wait_for(lambda: not bus.stale, 20)
        assert bus.holds("partition:2") == on_0
        nursery.cancel_scope.cancel()


# ---------------------------------------------------------------------- shard identities


@contextlib.asynccontextmanager
async def node_store(pg_dsn: str, urls: list[str], prefix: str, name: str,
                     ) -> AsyncIterator[tuple[ClusterStore, ClusterBus]]:
    """What a node does at start-up: its bus up on its shards, then its store opened,
    checking the shards (the count, and each shard's identity); closed on the way out."""
    refusal: ShardMismatch | None = None
    async with trio.open_nursery() as nursery:
        bus = ClusterBus(urls, prefix, name, partitions=PARTITIONS, stale_after_s=1.5)
        await nursery.start(bus.run)
        store = ClusterStore(pg_dsn, name, partitions=PARTITIONS, redis_shards=len(urls))
        store.shard_labels = bus
        store.label_grace_s = 1.0  # the running nodes' epoch checks: every 0.375 s here
        try:
            await store.open()
        except ShardMismatch as exc:  # raised as itself, not in the nursery's group
            refusal = exc
        try:
            if refusal is None:
                yield store, bus
        finally:
            await store.close()
            nursery.cancel_scope.cancel()
    if refusal is not None:
        raise refusal


async def refused(pg_dsn: str, urls: list[str], prefix: str, name: str) -> str:
    with pytest.raises(ShardMismatch) as caught:
        async with node_store(pg_dsn, urls, prefix, name):
            pass
    return str(caught.value)


def meta(pg_dsn: str, key: str) -> str | None:
    with psycopg.connect(pg_dsn) as conn:
        row = conn.execute("SELECT value FROM edgegw_meta WHERE key = %s", (key,)).fetchone()
    return None if row is None else str(row[0])


async def labels(urls: list[str], prefix: str) -> list[str | None]:
    async with trio.open_nursery() as nursery:
        bus = ClusterBus(urls, prefix, "reader", partitions=PARTITIONS)
        await nursery.start(bus.run)
        found = await bus.read_shard_labels()
        nursery.cancel_scope.cancel()
    return found


async def wait_disconnected(pg_dsn: str, name: str) -> None:
    """PostgreSQL ends a closed connection's backend a moment after the close."""
    def connected() -> bool:
        with psycopg.connect(pg_dsn) as conn:
            return conn.execute("SELECT count(*) FROM pg_stat_activity WHERE"
                                " application_name = %s", (f"edgegw {name}",)
                                ).fetchone() != (0,)
    await wait_for(lambda: not connected())


async def test_shards_listed_in_another_order_refuse_to_start(
        pg_dsn: str, redis_shards: list[RedisServer]) -> None:  # noqa: F811
    """The first node labels each shard ``<shards id>/<index>`` (the id in PostgreSQL);
    a node listing the same two shards swapped would route each partition to the other
    Redis: it refuses, naming the URL, the index it lists it at and the one it holds --
    with the first node running, and with none."""
    urls, prefix = [s.url for s in redis_shards], fresh_prefix()
    async with node_store(pg_dsn, urls, prefix, "a"):
        shards_id = meta(pg_dsn, "redis_shards_id")
        assert shards_id and await labels(urls, prefix) == [f"{shards_id}/0", f"{shards_id}/1"]
        message = await refused(pg_dsn, urls[::-1], prefix, "b")
        assert message == (
            f"hub.cluster.redis_urls lists {urls[1]} as Redis shard 0 but it is shard 1 of "
            "this cluster: every node must list the same shards in the same order, or a "
            "partition would have two owners or none (list the shards in the cluster's "
            "order; docs/cluster.md, Shards)")
    await wait_disconnected(pg_dsn, "a")
    assert "it is shard 1 of this cluster" in await refused(pg_dsn, urls[::-1], prefix, "b")
    async with node_store(pg_dsn, urls, prefix, "b"):  # the cluster's order: it starts
        pass


async def test_another_redis_at_one_index_refuses_to_start(
        pg_dsn: str, redis_shards: list[RedisServer],  # noqa: F811
        redis_server: RedisServer) -> None:  # noqa: F811
    """Same count, another Redis at index 1: an empty one while a node runs on the
    cluster's (that node would have labelled it had it been its shard 1), or one labelled
    by another cluster (say, one sharing the key prefix) even with no node running."""
    urls, prefix = [s.url for s in redis_shards], fresh_prefix()
    other = [urls[0], redis_server.url]
    async with node_store(pg_dsn, urls, prefix, "a"):
        message = await refused(pg_dsn, other, prefix, "c")
        assert message.startswith(
            f"hub.cluster.redis_urls lists {redis_server.url} as Redis shard 1 but it holds "
            "no shard identity while node a runs on this cluster: they do not use this "
            "Redis as shard 1"), message
    assert await labels(other, prefix) == [f"{meta(pg_dsn, 'redis_shards_id')}/0", None]
    async with trio.open_nursery() as nursery:  # another cluster's shard 1
        bus = ClusterBus(other, prefix, "x", partitions=PARTITIONS)
        await nursery.start(bus.run)
        await bus.claim_shard_labels("another-cluster", [1])
        nursery.cancel_scope.cancel()
    await wait_disconnected(pg_dsn, "a")
    message = await refused(pg_dsn, other, prefix, "c")
    assert (f"lists {redis_server.url} as Redis shard 1 but it is shard 1 of another "
            "cluster (another-cluster; this one is ") in message, message
    assert "stop every node and delete the key" in message


async def test_the_same_shards_spelled_differently_start(
        pg_dsn: str, redis_shards: list[RedisServer]) -> None:  # noqa: F811
    """The URLs may differ between nodes (one host's name for a Redis is not another's):
    what is checked is the shard, not its spelling."""
    urls, prefix = [s.url for s in redis_shards], fresh_prefix()
    spelled = [f"redis://localhost:{s.port}" for s in redis_shards]
    async with node_store(pg_dsn, urls, prefix, "a") as (_, bus_a), \
            node_store(pg_dsn, spelled, prefix, "b") as (_, bus_b):
        shards_id = meta(pg_dsn, "redis_shards_id")
        assert await labels(spelled, prefix) == [f"{shards_id}/0", f"{shards_id}/1"]
        assert bus_b.epochs == bus_a.epochs


async def test_a_shard_that_lost_its_data_is_labelled_again(
        pg_dsn: str, redis_shards: list[RedisServer]) -> None:  # noqa: F811
    """Redis keeps nothing durable (no persistence is configured), so losing a shard's
    data is routine: a running node labels it again when it sees its epoch change, and a
    node starting with no node running labels it itself."""
    urls, prefix = [s.url for s in redis_shards], fresh_prefix()
    async with node_store(pg_dsn, urls, prefix, "a") as (_, bus_a):
        before = await labels(urls, prefix)
        assert None not in before
        epoch = bus_a.epochs[1]
        await trio.to_thread.run_sync(redis_shards[1].restart_empty)
        await wait_for(lambda: bus_a.epochs[1] not in (None, epoch), 20)
        assert await labels(urls, prefix) == before
        async with node_store(pg_dsn, urls, prefix, "b"):
            pass
    await wait_disconnected(pg_dsn, "a")
    await trio.to_thread.run_sync(redis_shards[1].restart_empty)
    assert (await labels(urls, prefix))[1] is None
    async with node_store(pg_dsn, urls, prefix, "c"):
        assert await labels(urls, prefix) == before
    # everything restarted at once (a power cycle): nodes starting together take turns
    # under the start-up lock, and a node waiting for it is not one that runs
    await wait_disconnected(pg_dsn, "c")
    await trio.to_thread.run_sync(redis_shards[1].restart_empty)
    started: list[str] = []

    async def start(name: str) -> None:
        async with node_store(pg_dsn, urls, prefix, name):
            started.append(name)
            await wait_for(lambda: len(started) == 2)

    async with trio.open_nursery() as nursery:
        for name in ("d", "e"):
            nursery.start_soon(start, name)
    assert sorted(started) == ["d", "e"] and await labels(urls, prefix) == before


def test_a_node_listing_the_shards_in_another_order_refuses_to_start(
        tmp_path: Path, pg_dsn: str, redis_shards: list[RedisServer]) -> None:  # noqa: F811
    """``edgegw hub`` on the cluster's two shards swapped exits 3 with the one line, before
    it takes any lease; the running node keeps every partition."""
    urls, prefix = [s.url for s in redis_shards], fresh_prefix()
    with NodeSet(tmp_path / "nodes", 2, lambda i: node_toml(
            tmp_path / "data", pg_dsn, urls if i == 0 else urls[::-1], prefix)) as nodes:
        nodes.start(0)
        nodes.wait_healthy(0)
        nodes.start(1)
        proc = nodes.procs[1]
        assert proc is not None
        assert proc.wait(60) == 3
        log = nodes.log(1).read_text()
        assert (f"edgegw: cannot start: hub.cluster.redis_urls lists {urls[1]} as Redis shard "
                "0 but it is shard 1 of this cluster") in log
        assert nodes.healthz(0)["cluster"]["partitions_owned"] == 8  # type: ignore[index]


class OneTopic:
    """A state of one topic holding one value (a publisher's ``StateSource``)."""

    def __init__(self, topic: str) -> None:
        self.topic = topic
        self.value = 0

    def snapshot(self, topic: str) -> dict[str, Any] | None:
        return {"value": self.value} if topic == self.topic else None

    def topics(self) -> list[str]:
        return [self.topic]


async def test_a_stale_owner_publishes_nothing_on_another_shard_once_its_successor_has(
        redis_shards: list[RedisServer]) -> None:  # noqa: F811
    """A partition's ``sensor/...`` topics live on the cluster shard (0), its lease on its
    own (here 1), where Redis checks each publication against the lease key.  On shard 0
    the token fences it: an owner paused past its lease wakes with a sensor delta to flush;
    its successor has published there (its resets, once caught up), so shard 0 refuses the
    older token.  Before, only the epoch was checked there and the stale delta landed
    after the new owner's reset (docs/cluster.md, "A node paused")."""
    urls = [s.url for s in redis_shards]
    prefix = fresh_prefix()
    lease, sensor = "partition:1", "sensor/handler%2Ftemp"
    async with trio.open_nursery() as nursery:
        a, b = (ClusterBus(urls, prefix, n, partitions=PARTITIONS) for n in "ab")
        for bus in (a, b):
            await nursery.start(bus.run)
        assert a.shard_of_lease(lease) == 1 and a.shard_of_topic(sensor) == 0
        token_a = await a.acquire(lease, 0.5)
        assert token_a is not None
        stale = TopicPublisher(a, OneTopic(sensor))
        stale.fence(lease, token_a)
        stale.publish(sensor, {"value": 1})
        assert await stale.flush() == 1
        # a sleeps past its lease; b takes the partition and publishes its topics
        await trio.sleep(0.7)
        token_b = await b.acquire(lease, 5.0)
        assert token_b is not None and token_b > token_a
        successor = TopicPublisher(b, OneTopic(sensor))
        successor.fence(lease, token_b)
        successor.resync_all()
        assert await successor.flush() == 1
        head = successor.heads[sensor]
        # a wakes with a delta to flush
        stale.publish(sensor, {"value": 2})
        with pytest.raises(PartitionFenced):
            await stale.flush()
        assert [e for e in await b.read_topic(sensor) if e.last > head] == []
        successor.publish(sensor, {"value": 3})  # the owner goes on
        assert await successor.flush() == 1
        assert [e.last for e in await b.read_topic(sensor, after=head)] == [head + 1]
        nursery.cancel_scope.cancel()


async def test_a_takeover_fences_the_other_shards_before_the_new_owner_publishes(
        redis_shards: list[RedisServer]) -> None:  # noqa: F811
    """A new owner raises its token's fence on the other shards at its takeover: the stale
    owner's sensor delta is refused there even while its successor is still rebuilding
    (it publishes nothing until caught up)."""
    urls = [s.url for s in redis_shards]
    prefix = fresh_prefix()
    lease, sensor = "partition:1", "sensor/handler%2Ftemp"
    async with trio.open_nursery() as nursery:
        a, b = (ClusterBus(urls, prefix, n, partitions=PARTITIONS) for n in "ab")
        for bus in (a, b):
            await nursery.start(bus.run)
        token_a = await a.acquire(lease, 0.5)
        assert token_a is not None
        stale = TopicPublisher(a, OneTopic(sensor))
        stale.fence(lease, token_a)
        stale.publish(sensor, {"value": 1})
        assert await stale.flush() == 1
        head = stale.heads[sensor]
        await trio.sleep(0.7)
        token_b = await b.acquire(lease, 5.0)
        assert token_b is not None
        await b.raise_pubfences(lease, token_b)
        stale.publish(sensor, {"value": 2})
        with pytest.raises(PartitionFenced):
            await stale.flush()
        assert await b.read_topic(sensor, after=head) == []
        nursery.cancel_scope.cancel()
