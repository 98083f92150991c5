"""A node mirrors only the topics its own clients follow (docs/cluster.md, "Mirroring"),
with a real private Redis: nothing is mirrored (nor delivered by Redis) until a client
subscribes; a subscription loads its topics at the cluster's offsets, so a client resuming
on another node gets exact deltas; new topics that match a client's pattern are mirrored
as they appear; topics nobody follows any more are dropped; ``read_views`` (what ``/api``
answers from) still sees every topic, current to its head."""

from __future__ import annotations

import dataclasses
from typing import Any

import trio
from cluster_redis import RedisServer, fresh_prefix, redis_server  # noqa: F401
from test_cluster_bus import LiveClient, Owner, drive, wait_for

from edgegw.hub.cluster import ClusterBus, Mirror
from edgegw.hub.fanout import LiveConfig, LiveFanout
from edgegw.metrics import Metrics
from edgegw.topicfilter import matches
from edgegw.web import HttpServer


@dataclasses.dataclass
class Node:
    bus: ClusterBus
    fanout: LiveFanout
    mirror: Mirror
    port: int


async def start_node(nursery: trio.Nursery, url: str, prefix: str, name: str,
                     reconcile_interval_s: float = 30.0) -> Node:
    metrics = Metrics()
    bus = ClusterBus(url, prefix, name, metrics=metrics)
    await nursery.start(bus.run)
    fanout = LiveFanout(LiveConfig(), metrics=metrics, epoch=bus.epoch)
    # 30 s by default: new topics must come by the catalogue, not by this backstop
    mirror = Mirror(bus, fanout, reconcile_interval_s=reconcile_interval_s,
                    interest=fanout.core.subscribed_patterns)
    http = HttpServer(metrics=metrics)
    fanout.install(http)
    listeners = await nursery.start(http.serve, "127.0.0.1", 0)
    await nursery.start(fanout.run)
    await nursery.start(mirror.run)
    return Node(bus, fanout, mirror, listeners[0].socket.getsockname()[1])


def followed(owner: Owner, pattern: str) -> list[str]:
    return [t for t in owner.state.topics() if matches(pattern, t)]


def current(client: LiveClient, owner: Owner, pattern: str) -> bool:
    topics = followed(owner, pattern)
    return bool(topics) and all(client.views.snapshot(t) == owner.state.snapshot(t)
                                for t in topics)


async def subscribers(bus: ClusterBus, topic: str) -> int:
    assert bus._client is not None
    counts: Any = await bus._client.pubsub_numsub(bus.key("live", topic))
    return int(next(iter(counts.values())))


async def test_a_node_mirrors_only_what_its_clients_follow(
        redis_server: RedisServer) -> None:  # noqa: F811
    prefix = fresh_prefix()
    async with trio.open_nursery() as nursery:
        owner_bus = ClusterBus(redis_server.url, prefix, "owner")
        await nursery.start(owner_bus.run)
        owner = Owner(owner_bus, lots=2)
        await nursery.start(owner.publisher.run)
        b = await start_node(nursery, redis_server.url, prefix, "b")
        await drive(owner, 40)
        # No client: the node knows every topic by name, mirrors none, receives none.
        await wait_for(lambda: set(owner.publisher.heads) <= set(b.mirror.catalogue))
        assert b.mirror.state.topics() == [] and b.mirror.entries_applied == 0
        wafer = followed(owner, "lot/+/wafer/+")[0]
        lot = followed(owner, "lot/+")[0]
        assert await subscribers(owner_bus, lot) == 0

        # A client on lot summaries: exactly those are mirrored (and subscribed in Redis).
        on_b = LiveClient()
        await nursery.start(on_b.follow, b.port, ["lot/+"])
        await wait_for(lambda: current(on_b, owner, "lot/+"))
        assert sorted(b.mirror.state.topics()) == sorted(followed(owner, "lot/+"))
        assert await subscribers(owner_bus, lot) == 1
        assert await subscribers(owner_bus, wafer) == 0
        await drive(owner, 20)
        await wait_for(lambda: current(on_b, owner, "lot/+"))
        assert {i["type"] for i in on_b.items[len(followed(owner, "lot/+")):]} == {"delta"}

        # Another node, another client resuming there by (epoch, offset): exact deltas
        # from where it was, not a snapshot -- the topic is loaded with its history.
        mark = dict(on_b.offsets)
        await drive(owner, 20)
        await wait_for(lambda: current(on_b, owner, "lot/+"))
        c = await start_node(nursery, redis_server.url, prefix, "c")
        resumed = LiveClient()
        resumed.views = on_b.views.__class__()
        for topic in mark:  # the state it had at ``mark``: rebuilt from on_b's items
            resumed.views.load(topic, {})
        resumed.offsets = dict(mark)
        await nursery.start(resumed.follow, c.port, ["lot/+"],
                            {t: [on_b.epoch, o] for t, o in mark.items()})
        await wait_for(lambda: all(resumed.offsets.get(t) == on_b.offsets[t] for t in mark))
        for topic in mark:
            first = next(i for i in resumed.items if i["topic"] == topic)
            assert first["type"] == "delta" and first["from"] == mark[topic], first

        # Wafer maps followed on c: loaded, and a wafer that starts later is mirrored too.
        maps = LiveClient()
        await nursery.start(maps.follow, c.port, ["lot/+/wafer/+"])
        await wait_for(lambda: current(maps, owner, "lot/+/wafer/+"))
        before = set(followed(owner, "lot/+/wafer/+"))
        for _ in range(40):
            await drive(owner, 10)
            if set(followed(owner, "lot/+/wafer/+")) - before:
                break
        assert set(followed(owner, "lot/+/wafer/+")) - before, "no new wafer started"
        await wait_for(lambda: current(maps, owner, "lot/+/wafer/+"))
        assert not [t for t in c.mirror.state.topics() if t.startswith("test/")]

        # /api's reads: every topic, current to its head, whatever the node mirrors.
        async def views_current() -> bool:
            views = await b.mirror.read_views(lambda t: True)
            return all(views.snapshot(t) == owner.state.snapshot(t)
                       for t in owner.state.topics())

        with trio.fail_after(20):
            while not await views_current():
                await trio.sleep(0.1)

        # A client that leaves: its topics are dropped and unsubscribed (next reconcile).
        d = await start_node(nursery, redis_server.url, prefix, "d", reconcile_interval_s=0.5)
        stats = LiveClient()
        async with trio.open_nursery() as inner:
            await inner.start(stats.follow, d.port, ["test/+/+"])
            await wait_for(lambda: current(stats, owner, "test/+/+"))
            assert d.mirror.state.topics()
            inner.cancel_scope.cancel()
        test_topic = followed(owner, "test/+/+")[0]
        await wait_for(lambda: not d.mirror.state.topics() and not d.bus.followed_topics())
        assert await subscribers(owner_bus, test_topic) == 0
        nursery.cancel_scope.cancel()
