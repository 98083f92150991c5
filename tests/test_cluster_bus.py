"""The cluster's Redis side with a real private Redis (tests/cluster_redis.py): live deltas
from a partition owner's LiveState to /ws/live clients on other nodes with the same
offsets, resume on another node, Redis restarted empty (epoch change), a node cut off from
Redis (a proxy in between), leases with fencing tokens."""

from __future__ import annotations

import dataclasses
import json
import logging
from typing import Any

import pytest
import trio
from cluster_redis import RedisServer, TcpProxy, fresh_prefix, redis_server  # noqa: F401
from hubtools import http_get
from trio_websocket import ConnectionClosed, open_websocket_url

from edgegw.hub.cluster import ClusterBus, Mirror, MirrorState, TopicPublisher
from edgegw.hub.cluster.partition import PartitionFenced
from edgegw.hub.fanout import SUBPROTOCOL_JSON, LiveConfig, LiveFanout
from edgegw.hub.live import LiveState
from edgegw.metrics import Metrics
from edgegw.sim import SimulatedConfig, simulated_batches
from edgegw.web import HttpServer, install_status

WAIT = 20.0  # generous: the machine is shared


@dataclasses.dataclass
class Node:
    bus: ClusterBus
    fanout: LiveFanout
    mirror: Mirror
    port: int
    metrics: Metrics


async def start_node(nursery: trio.Nursery, url: str, prefix: str, name: str, *,
                     stale_after_s: float = 3.0) -> Node:
    metrics = Metrics()
    bus = ClusterBus(url, prefix, name, stale_after_s=stale_after_s, metrics=metrics)
    await nursery.start(bus.run)
    fanout = LiveFanout(LiveConfig(), metrics=metrics, epoch=bus.epoch)
    mirror = Mirror(bus, fanout, reconcile_interval_s=1.0)
    http = HttpServer(metrics=metrics)
    fanout.install(http)

    def health() -> tuple[bool, dict[str, Any]]:
        body = bus.health()
        return body["ok"], body

    install_status(http, health=health, stats=lambda: {"cluster": bus.health()},
                   metrics=metrics)
    listeners = await nursery.start(http.serve, "127.0.0.1", 0)
    await nursery.start(fanout.run)
    await nursery.start(mirror.run)
    return Node(bus, fanout, mirror, listeners[0].socket.getsockname()[1], metrics)


class Owner:
    """A partition owner's live state publishing through the bus."""

    def __init__(self, bus: ClusterBus, max_lots: int = 16, **sim: Any) -> None:
        self.publisher = TopicPublisher(bus, flush_interval_s=0.02, snapshot_interval_s=0.2)
        self.state = LiveState(self.publisher.publish, clock=lambda: 1000.0,
                               max_lots=max_lots)
        self.publisher.attach(self.state)
        config = SimulatedConfig(**{"wafer_diameter_dies": 8, "tests_per_part": 3,
                                    "wafers": 10, "lots": 1, **sim})
        self.batches = iter(simulated_batches(config, "sim", clock=lambda: 1000.0))
        self.rid = 1

    def feed(self, n: int) -> int:
        fed = 0
        for batch, _ in self.batches:
            self.state.on_records("ate-01", self.rid, batch, now=1000.0)
            self.rid += len(batch)
            fed += 1
            if fed >= n:
                break
        return fed


class LiveClient:
    """A /ws/live client that applies what it gets as a dashboard does, and checks that
    every delta starts where it is."""

    def __init__(self) -> None:
        self.views = MirrorState()
        self.offsets: dict[str, int] = {}
        self.epoch: str | None = None
        self.items: list[dict[str, Any]] = []
        self.messages: list[dict[str, Any]] = []
        self.closed: ConnectionClosed | None = None

    def apply(self, msg: dict[str, Any]) -> None:
        self.messages.append(msg)
        if msg["type"] == "hello":
            self.epoch = msg["epoch"]
        if msg["type"] != "batch":
            return
        for item in msg["items"]:
            self.items.append(item)
            topic = item["topic"]
            if item["type"] == "snapshot":
                self.views.load(topic, item["data"])
            else:
                assert self.offsets[topic] == item["from"], f"gap on {topic}: {item}"
                for delta in item["data"]:
                    self.views.apply(topic, delta)
            self.offsets[topic] = item["offset"]
            self.epoch = item["epoch"]

    def statuses(self) -> list[str]:
        return [m["code"] for m in self.messages if m["type"] == "status"]

    async def follow(self, port: int, topics: list[str],
                     resume: dict[str, list[Any]] | None = None, *,
                     task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with open_websocket_url(f"ws://127.0.0.1:{port}/ws/live",
                                      subprotocols=[SUBPROTOCOL_JSON]) as ws:
            await ws.send_message(json.dumps({"type": "subscribe", "id": 1, "topics": topics,
                                              "resume": resume or {}}))
            task_status.started()
            try:
                while True:
                    self.apply(json.loads(await ws.get_message()))
            except ConnectionClosed as exc:
                self.closed = exc


async def wait_for(predicate: Any, seconds: float = WAIT) -> None:
    with trio.fail_after(seconds):
        while not predicate():
            await trio.sleep(0.02)


def settled(client: LiveClient, owner: Owner, pattern_prefix: str = "lot/") -> bool:
    topics = [t for t in owner.state.topics() if t.startswith(pattern_prefix)]
    return bool(topics) and all(
        client.views.snapshot(t) == owner.state.snapshot(t) for t in topics)


async def drive(owner: Owner, batches: int, pause: float = 0.01) -> None:
    for _ in range(batches):
        if not owner.feed(1):
            return
        await trio.sleep(pause)


# ---------------------------------------------------------------------- the tests


async def test_deltas_reach_clients_on_every_node_with_the_same_offsets(
        redis_server: RedisServer) -> None:  # noqa: F811
    prefix = fresh_prefix()
    async with trio.open_nursery() as nursery:
        a = await start_node(nursery, redis_server.url, prefix, "a")
        b = await start_node(nursery, redis_server.url, prefix, "b")
        owner = Owner(a.bus)
        await nursery.start(owner.publisher.run)
        on_a, on_b = LiveClient(), LiveClient()
        topics = ["lot/+", "lot/+/wafer/+", "test/+/+"]
        await nursery.start(on_a.follow, a.port, topics)
        await nursery.start(on_b.follow, b.port, topics)
        await drive(owner, 60)
        await wait_for(lambda: settled(on_a, owner) and settled(on_b, owner))
        followed = {t: h for t, h in owner.publisher.heads.items()
                    if t.startswith(("lot/", "test/"))}
        try:
            await wait_for(lambda: on_a.offsets == on_b.offsets == followed)
        except trio.TooSlowError:
            print(on_a.offsets, on_b.offsets, followed, sep="\n")
            raise
        assert on_a.epoch == on_b.epoch == a.bus.epoch == b.bus.epoch
        # every topic began with a snapshot and went on with deltas only (how many deltas
        # depends on how the feed's batches fell into publish intervals: 2 under load)
        wafer = next(t for t in owner.state.topics() if "/wafer/" in t)
        kinds = [i["type"] for i in on_b.items if i["topic"] == wafer]
        assert kinds[0] == "snapshot" and set(kinds[1:]) == {"delta"}

        # A node started now loads snapshots and the streams after them: its mirror is the
        # owner's state, topic by topic (lot, wafer, test and gateway views alike) ...
        # (test topics are published at most every 0.5 s: the last ones may still come)
        c = await start_node(nursery, redis_server.url, prefix, "c")
        assert c.mirror.reloads >= len(owner.state.topics()) - 1  # loaded, not replayed
        await wait_for(lambda: set(c.mirror.state.topics()) == set(owner.state.topics())
                       and all(c.mirror.state.snapshot(t) == owner.state.snapshot(t)
                               for t in owner.state.topics()))
        # ... and a client subscribing there gets a snapshot, then the deltas that follow.
        late = LiveClient()
        await nursery.start(late.follow, c.port, topics)
        await wait_for(lambda: settled(late, owner))
        await drive(owner, 30)
        await wait_for(lambda: settled(late, owner) and settled(on_a, owner))
        # (a test topic's last entry may reach one client a moment before the other)
        await wait_for(lambda: late.offsets == {t: o for t, o in on_a.offsets.items()
                                                if t in late.offsets})
        for topic in late.offsets:  # each topic: one snapshot first, deltas after it
            kinds = [i["type"] for i in late.items if i["topic"] == topic]
            assert kinds[0] == "snapshot" and set(kinds[1:]) <= {"delta"}
        assert any(i["type"] == "delta" for i in late.items)
        nursery.cancel_scope.cancel()


async def test_a_client_resumes_on_another_node_with_exactly_the_missed_deltas(
        redis_server: RedisServer) -> None:  # noqa: F811
    prefix = fresh_prefix()
    async with trio.open_nursery() as nursery:
        a = await start_node(nursery, redis_server.url, prefix, "a")
        b = await start_node(nursery, redis_server.url, prefix, "b")
        owner = Owner(a.bus)
        await nursery.start(owner.publisher.run)
        first = LiveClient()
        with trio.CancelScope() as scope:
            nursery.start_soon(first.follow, a.port, ["lot/+/wafer/+"])
            await drive(owner, 40)
            await wait_for(lambda: settled(first, owner, "lot/LOT0001/wafer"))
            scope.cancel()
        # It went away; the wafer goes on.  (``follow`` runs in the nursery: stop it.)
        await trio.sleep(0.05)
        held = dict(first.offsets)
        await drive(owner, 30)
        await wait_for(lambda: all(owner.publisher.heads.get(t, 0) > o for t, o in
                                   held.items() if owner.state.snapshot(t) is not None
                                   and owner.state.snapshot(t)["status"] == "open"))
        again = LiveClient()
        again.views = first.views
        again.offsets = dict(held)
        resume = {t: [first.epoch, o] for t, o in held.items()}
        await nursery.start(again.follow, b.port, ["lot/+/wafer/+"], resume)
        await wait_for(lambda: settled(again, owner, "lot/LOT0001/wafer"))
        for topic, offset in held.items():
            got = [i for i in again.items if i["topic"] == topic]
            if again.offsets[topic] == offset:
                assert got == []  # nothing missed there
                continue
            # one delta item from exactly where it was: no snapshot, no gap, nothing twice
            assert got[0]["type"] == "delta" and got[0]["from"] == offset, got[0]
            assert all(i["type"] == "delta" for i in got)
        nursery.cancel_scope.cancel()


async def test_redis_restarted_empty_changes_the_epoch_and_streaming_goes_on(
        redis_server: RedisServer) -> None:  # noqa: F811
    prefix = fresh_prefix()
    async with trio.open_nursery() as nursery:
        a = await start_node(nursery, redis_server.url, prefix, "a", stale_after_s=1.5)
        b = await start_node(nursery, redis_server.url, prefix, "b", stale_after_s=1.5)
        owner = Owner(a.bus)
        await nursery.start(owner.publisher.run)
        client = LiveClient()
        await nursery.start(client.follow, b.port, ["lot/+", "lot/+/wafer/+"])
        await drive(owner, 30)
        await wait_for(lambda: settled(client, owner))
        # leases before: PostgreSQL would keep the highest token it saw per partition
        seen = 0
        for _ in range(3):
            token = await a.bus.acquire("partition-7", 5.0)
            assert token is not None
            seen = max(seen, token)
            assert await a.bus.release("partition-7", token)
        held = await a.bus.acquire("partition-7", 5.0)
        assert held is not None
        seen = max(seen, held)
        old_epoch = b.bus.epoch

        redis_server.restart_empty()
        await wait_for(lambda: a.bus.epoch != old_epoch and b.bus.epoch != old_epoch)
        assert a.bus.epoch == b.bus.epoch
        assert a.bus.holds("partition-7") is None  # the lease went with the data
        await drive(owner, 30)
        await wait_for(lambda: settled(client, owner))
        assert client.epoch == b.bus.epoch
        resyncs = [i for i in client.items if i.get("resync") == "epoch_changed"]
        assert resyncs and {i["topic"] for i in resyncs} <= set(owner.state.topics())
        # streaming went on in the new epoch: deltas after the resync snapshots
        after = client.items[client.items.index(resyncs[0]):]
        assert any(i["type"] == "delta" for i in after)
        # the counter restarted with Redis; seeded from PostgreSQL's floor, tokens go on
        await a.bus.seed_fence("partition-7", seen)
        token = await a.bus.acquire("partition-7", 5.0)
        assert token is not None and token > seen
        nursery.cancel_scope.cancel()


async def test_a_node_cut_off_from_redis_stops_serving_and_says_so_then_resyncs(
        redis_server: RedisServer, caplog: Any) -> None:  # noqa: F811
    caplog.set_level(logging.WARNING, logger="edgegw.hub.cluster")
    prefix = fresh_prefix()
    stale_after = 1.0
    async with trio.open_nursery() as nursery:
        proxy = TcpProxy(redis_server.port)
        proxy_port = await nursery.start(proxy.run)
        a = await start_node(nursery, redis_server.url, prefix, "a")
        b = await start_node(nursery, f"redis://127.0.0.1:{proxy_port}/0", prefix, "b",
                             stale_after_s=stale_after)
        owner = Owner(a.bus)
        await nursery.start(owner.publisher.run)
        client = LiveClient()
        await nursery.start(client.follow, b.port, ["lot/+", "lot/+/wafer/+"])
        await drive(owner, 20)
        await wait_for(lambda: settled(client, owner))
        status, body = await http_get(b.port, "/healthz")
        assert status == 200 and body["redis"] == "ok"

        # A starved node may have gone stale and back before the cut (its checks answered
        # late): only a status after the cut counts.
        before_cut = len(client.statuses())
        proxy.cut()
        cut_at = trio.current_time()
        await wait_for(lambda: "cluster_unavailable" in client.statuses()[before_cut:])
        await wait_for(lambda: b.bus.stale)
        # the bus is stale exactly stale_after_s after its last answer; slack for a busy box
        assert trio.current_time() - cut_at < stale_after + 4.0
        status, body = await http_get(b.port, "/healthz")
        assert status == 503 and body["redis"] == "stale"
        assert "edgegw_cluster_redis_stale 1.0" in b.metrics.render_prometheus()
        assert any("lost Redis" in r.getMessage() for r in caplog.records)
        # while cut off: nothing is served, a new subscription is refused
        frozen = dict(client.offsets)
        await drive(owner, 20)
        refused = LiveClient()
        with trio.move_on_after(WAIT):
            await nursery.start(refused.follow, b.port, ["lot/+"])
            await wait_for(lambda: any(m["type"] == "error" for m in refused.messages))
        assert [m["code"] for m in refused.messages if m["type"] == "error"] == [
            "cluster_unavailable"]
        assert refused.statuses() == ["cluster_unavailable"]
        assert client.offsets == frozen

        proxy.restore()
        await wait_for(lambda: client.statuses()[-1:] == ["ok"])
        status, _ = await http_get(b.port, "/healthz")
        assert status == 200
        await wait_for(lambda: settled(client, owner))
        # the same epoch: what was missed came as deltas from where the client was
        after = [i for i in client.items if i["topic"] in frozen
                 and i["offset"] > frozen[i["topic"]]]
        assert after and all(i["type"] == "delta" for i in after)
        assert any("Redis reachable again" in r.getMessage() for r in caplog.records)
        nursery.cancel_scope.cancel()


async def test_leases_one_holder_expiry_moves_them_tokens_increase_release_compares(
        redis_server: RedisServer) -> None:  # noqa: F811
    prefix = fresh_prefix()
    async with trio.open_nursery() as nursery:
        a = ClusterBus(redis_server.url, prefix, "a")
        b = ClusterBus(redis_server.url, prefix, "b")
        await nursery.start(a.run)
        await nursery.start(b.run)
        t1 = await a.acquire("p3", 0.5)
        assert t1 is not None
        assert await b.acquire("p3", 0.5) is None  # one holder at a time
        assert await a.renew("p3", t1, 0.5)
        assert a.holds("p3") == t1 and b.holds("p3") is None
        # a stops renewing: the lease expires and moves
        await trio.sleep(1.0)
        assert a.holds("p3") is None  # a counts it lost by its own clock
        t2 = await b.acquire("p3", 5.0)
        assert t2 is not None and t2 > t1
        assert not await a.renew("p3", t1, 5.0)  # no longer a's
        assert not await a.release("p3", t1)  # compare-and-delete: b's lease stays
        assert await a.lease_holder("p3") == ("b", t2)
        assert await b.release("p3", t2)
        assert await a.lease_holder("p3") is None
        t3 = await a.acquire("p3", 5.0)
        assert t3 is not None and t3 > t2
        # presence and live nodes
        await a.set_presence("ate-01", 5.0, since="1")
        assert (await b.presence("ate-01")) == {"node": "a", "since": "1"}
        await a.heartbeat_node(5.0)
        await b.heartbeat_node(5.0)
        assert await a.live_nodes() == ["a", "b"]
        await b.leave()
        assert await a.live_nodes() == ["a"]
        nursery.cancel_scope.cancel()


async def test_an_owner_whose_lease_lapsed_publishes_nothing_before_it_notices(
        redis_server: RedisServer) -> None:  # noqa: F811
    """A node paused past its lease (SIGSTOP, a frozen VM) wakes with deltas to flush and
    may flush them before anything else of it runs.  Redis refuses them: the publication
    checks the lease (docs/cluster.md, "A node paused")."""
    prefix = fresh_prefix()
    async with trio.open_nursery() as nursery:
        a = ClusterBus(redis_server.url, prefix, "a")
        b = ClusterBus(redis_server.url, prefix, "b")
        await nursery.start(a.run)
        await nursery.start(b.run)
        token = await a.acquire("partition:0", 0.5)
        assert token is not None
        owner = Owner(a)
        owner.publisher.fence("partition:0", token)
        owner.feed(2)
        assert await owner.publisher.flush() > 0  # held: published
        lot = "lot/LOT0001"
        head = owner.publisher.heads[lot]
        # the lease lapses while the owner sleeps, and another node takes it
        await trio.sleep(0.7)
        assert await b.acquire("partition:0", 5.0) is not None
        owner.feed(2)
        with pytest.raises(PartitionFenced):
            await owner.publisher.flush()
        assert [e for e in await b.read_topic(lot) if e.last > head] == []
        nursery.cancel_scope.cancel()


async def test_a_node_that_missed_entries_fills_the_gap_from_the_stream(
        redis_server: RedisServer) -> None:  # noqa: F811
    prefix = fresh_prefix()
    async with trio.open_nursery() as nursery:
        a = await start_node(nursery, redis_server.url, prefix, "a")
        b = await start_node(nursery, redis_server.url, prefix, "b")
        owner = Owner(a.bus)
        await nursery.start(owner.publisher.run)
        client = LiveClient()
        await nursery.start(client.follow, b.port, ["lot/+", "lot/+/wafer/+"])
        await drive(owner, 10)
        await wait_for(lambda: settled(client, owner))
        # B's Pub/Sub loses what is published now (as a dropped subscription would) ...
        b.bus.off("live", b.mirror._on_message)
        lot = "lot/LOT0001"
        before = owner.publisher.heads[lot]
        await drive(owner, 10)
        await wait_for(lambda: owner.publisher.heads[lot] > before + 3)
        b.bus.on("live", b.mirror._on_message)
        # ... and the next entry of each topic shows the gap: filled from its stream
        await drive(owner, 10)
        await wait_for(lambda: settled(client, owner))
        assert b.mirror.gaps_filled > 0
        # the client saw consecutive deltas all along (LiveClient checks every 'from')
        assert not [i for i in client.items if i.get("resync")]
        nursery.cancel_scope.cancel()


async def test_topics_that_leave_the_owners_state_leave_every_node(
        redis_server: RedisServer) -> None:  # noqa: F811
    prefix = fresh_prefix()
    async with trio.open_nursery() as nursery:
        a = await start_node(nursery, redis_server.url, prefix, "a")
        b = await start_node(nursery, redis_server.url, prefix, "b")
        # one live lot at most: the second lot's start evicts the first (closed) one
        owner = Owner(a.bus, max_lots=1, wafers=1, lots=2)
        await nursery.start(owner.publisher.run)
        client = LiveClient()
        await nursery.start(client.follow, b.port, ["lot/+"])
        await drive(owner, 200)
        assert "lot/LOT0002" in owner.state.topics()
        assert "lot/LOT0001" not in owner.state.topics()
        # its lot, wafer and test topics alike (tests get no last delta: they just go)
        await wait_for(lambda: set(b.mirror.state.topics()) == set(owner.state.topics()))
        assert not [t for t in b.mirror.state.topics() if "LOT0001" in t]
        # the client saw the first lot's last delta before it went
        await wait_for(lambda: client.views.snapshot("lot/LOT0001") is not None and
                       client.views.snapshot("lot/LOT0001")["status"] == "evicted")
        nursery.cancel_scope.cancel()
