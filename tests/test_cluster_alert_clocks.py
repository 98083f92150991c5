"""A hub cluster's time-driven alerts across owners whose wall clocks disagree by an hour
(docs/cluster.md, "Clocks"): ``gateway_offline`` and P0 escalation are measured by the one
clock every node reads alike, Redis's (``ClusterBus.clock``), so a partition moving to a
node an hour ahead or behind neither raises (escalates) at once nor an hour late.

Two owners of one partition in this process, each with its own ``ClusterBus`` on a private
Redis (tests/cluster_redis.py) and the alerts handed over through PostgreSQL as a takeover
does (``save_alerts`` by the old owner, ``load_alerts`` + ``restore_alert_engine`` by the
new one).  A node's wall clock is stepped by replacing ``time.time`` for the process while
that node acts (as tests/test_cluster_node_clocks.py does; the calls are sequential).

Then an outage that begins while its partition has no owner (a ``ClusterHub`` taking it
over later times it from the gateway's last-seen time), and the webhook outbox handed from
one alert-feed holder to the next, an hour apart by their wall clocks."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
import trio
from cluster_redis import RedisServer, fresh_prefix, redis_server  # noqa: F401
from test_cluster_alerts import WebhookReceiver, two_feed_holders
from walltools import SteppedWall

from edgegw.config import build
from edgegw.hub import HubConfig
from edgegw.hub.alerts import (
    AlertEngine,
    AlertRuleConfig,
    AlertsConfig,
    WebhookConfig,
    shown_url,
)
from edgegw.hub.cluster import ClusterBus, ClusterHub, ClusterStore
from edgegw.hub.cluster.owner import restore_alert_engine
from edgegw.metrics import Metrics
from edgegw.records import SensorReading

HOUR = 3600.0
LIMIT_S = 3.0  # offline_s and escalate_after_s
EARLY_S = 1.0  # slack below the limit: the two nodes' estimates of Redis's clock
LATE_S = 10.0  # slack above it: scheduling under load, still far below the hour

T = TypeVar("T")


CONFIG = AlertsConfig(escalate_after_s=LIMIT_S, rules=[
    AlertRuleConfig(name="gw-down", kind="gateway_offline", priority="P1", offline_s=LIMIT_S),
    AlertRuleConfig(name="too-hot", kind="sensor_range", priority="P0", channel="temp",
                    high=90.0),
])


async def two_owners(nursery: trio.Nursery, url: str, wall: SteppedWall, offset: float
                     ) -> tuple[ClusterBus, ClusterBus]:
    """The old owner's bus (right clock) and the new owner's (``offset`` off), each past
    its first heartbeat, as an owner is before it acquires anything."""
    prefix = fresh_prefix()
    old = ClusterBus(url, prefix, "old")
    new = wall.as_of(offset, lambda: ClusterBus(url, prefix, "new"))
    for bus in (old, new):
        await nursery.start(bus.run)
        await bus.heartbeat_node(30.0)
    # one clock, whatever their wall clocks say (within the round trips' halves)
    assert abs(wall.as_of(offset, new.clock) - old.clock()) < EARLY_S
    return old, new


async def until_event(events: list[dict[str, Any]], event: str, tick: Callable[[], None]
                      ) -> None:
    """Tick once every 50 ms (an owner ticks once a second) until ``event`` is emitted."""
    with trio.fail_after(LIMIT_S + LATE_S):
        while not any(e["event"] == event for e in events):
            tick()
            await trio.sleep(0.05)


@pytest.mark.parametrize("offset", [HOUR, -HOUR], ids=["ahead", "behind"])
async def test_a_p0_raised_under_one_owner_escalates_on_time_under_a_new_owner_an_hour_off(
        redis_server: RedisServer, pg_dsn: str, wall: SteppedWall,  # noqa: F811
        offset: float) -> None:
    store = ClusterStore(pg_dsn, "n", partitions=1)
    await store.open()
    try:
        async with trio.open_nursery() as nursery:
            old_bus, new_bus = await two_owners(nursery, redis_server.url, wall, offset)
            # the old owner raises a P0 and writes it, then the partition moves
            raised: list[dict[str, Any]] = []
            old = restore_alert_engine(CONFIG, lambda t, d: None, [], clock=old_bus.clock,
                                       sink=raised.append)
            old.on_sensor(SensorReading("s", time.time(), "temp", 99.0), time.time())
            raised_at = trio.current_time()
            assert [e["event"] for e in raised] == ["raised"]
            assert await store.claim_partition(0, 1)
            await store.save_alerts(0, 1, [raised[0]["alert"]])
            assert await store.claim_partition(0, 2)
            saved = await store.load_alerts(100, 0)
            events: list[dict[str, Any]] = []
            new = wall.as_of(offset, lambda: restore_alert_engine(
                CONFIG, lambda t, d: None, saved, clock=new_bus.clock, sink=events.append))
            assert new.escalation_pending == 1
            # escalated escalate_after_s after it was raised: not at once, not an hour late
            await until_event(events, "escalated",
                              lambda: wall.as_of(offset, lambda: new.tick(time.time())))
            assert trio.current_time() - raised_at >= LIMIT_S - EARLY_S
            [escalated] = events
            assert escalated["alert"]["id"] == raised[0]["alert"]["id"]
            # the dates shown stay the escalating node's wall clock
            assert abs(escalated["alert"]["escalated_at"] - (time.time() + offset)) < LATE_S
            nursery.cancel_scope.cancel()
    finally:
        await store.close()


@pytest.mark.parametrize("offset", [HOUR, -HOUR], ids=["ahead", "behind"])
async def test_gateway_offline_is_raised_on_time_by_a_new_owner_whose_clock_is_set_right(
        redis_server: RedisServer, wall: SteppedWall, offset: float) -> None:  # noqa: F811
    """The gateway's partition moves to a node ``offset`` off, which NTP sets right while
    the gateway is away: its outage is still ``offline_s`` long, not 0 s or an hour."""
    async with trio.open_nursery() as nursery:
        _, new_bus = await two_owners(nursery, redis_server.url, wall, offset)
        events: list[dict[str, Any]] = []
        new = wall.as_of(offset, lambda: restore_alert_engine(
            CONFIG, lambda t, d: None, [], clock=new_bus.clock, sink=events.append))
        wall.as_of(offset, lambda: new.on_gateway("ate-1", False, time.time()))
        missed_at = trio.current_time()
        wall.as_of(offset, lambda: new.tick(time.time()))
        # NTP steps the new owner's clock right (one of its heartbeats in between)
        await new_bus.heartbeat_node(30.0)
        await until_event(events, "raised", lambda: new.tick(time.time()))
        assert trio.current_time() - missed_at >= LIMIT_S - EARLY_S
        [alert] = [e["alert"] for e in events]
        assert alert["rule"] == "gw-down" and alert["value"] < LIMIT_S + LATE_S
        nursery.cancel_scope.cancel()


# ------------------------------------------------ an outage begun while its partition moved

GW = "ate-1"
PARTITIONS = 1  # (the owner takes it, "front" being live or not)
MOVE_S = 3.0  # the partition without an owner: longer than the slack below
SLACK_S = 1.0  # two nodes' readings of Redis's clock, scheduling


def owner_node(tmp: Path, dsn: str, url: str, prefix: str) -> ClusterHub:
    """A node owning every partition, watching ``GW`` with a 1 s ``gateway_offline``."""
    return ClusterHub(build(HubConfig, {
        "hub": {"port": 0, "data_dir": str(tmp / "owner"), "heartbeat_s": 1.0,
                "cluster": {"node_id": "owner", "postgres_dsn": dsn, "redis_url": url,
                            "key_prefix": prefix, "partitions": PARTITIONS,
                            "lease_ttl_s": 1.5, "stale_after_s": 2.0}},
        "gateways": {GW: {"token": "t"}},
        "alerts": {"rules": [{"name": "gw-down", "kind": "gateway_offline",
                              "priority": "P1", "offline_s": 1}]},
    }))


async def offline_alert(store: ClusterStore) -> dict[str, Any]:
    """The ``gateway_offline`` alert of ``GW`` once its owner has written it."""
    with trio.fail_after(60):
        while True:
            for alert in await store.load_alerts(100):
                if alert["rule"] == "gw-down":
                    return alert
            await trio.sleep(0.1)


async def left_while_unowned(tmp_path: Path, pg_dsn: str, url: str, *, cluster_up: bool
                             ) -> tuple[dict[str, Any], float, float, ClusterHub]:
    """``GW`` connects through node "front", then leaves; ``MOVE_S`` later (no owner
    meanwhile) node "owner" starts and takes its partition.  "front" stays up, or
    (``cluster_up`` False) leaves the cluster with the gateway: no node up meanwhile.
    -> (the owner's alert, when it left by the cluster clock and by the wall, the node)."""
    prefix = fresh_prefix()
    store = ClusterStore(pg_dsn, "front", partitions=PARTITIONS)
    await store.open()
    try:
        async with trio.open_nursery() as nursery:
            front = ClusterBus(url, prefix, "front", partitions=PARTITIONS)
            await nursery.start(front.run)
            await front.heartbeat_node(120.0)  # (not an owner: it takes no partition)
            generation = await store.claim_gateway(GW)
            assert await front.claim_presence(GW, generation, 5.0, connected_at="1.0")
            assert await front.drop_presence(GW, generation)  # the gateway leaves
            left_clock, left_wall = front.clock(), time.time()
            if not cluster_up:
                await front.leave()
            await trio.sleep(MOVE_S)  # its partition has no owner yet
            node = owner_node(tmp_path, pg_dsn, url, prefix)
            await nursery.start(node.run)
            alert = await offline_alert(store)
            nursery.cancel_scope.cancel()
    finally:
        await store.close()
    return alert, left_clock, left_wall, node


async def test_an_outage_begun_while_its_partition_moved_is_timed_from_when_the_gateway_left(
        tmp_path: Path, pg_dsn: str, redis_server: RedisServer) -> None:  # noqa: F811
    """The new owner learns when the gateway left from its last-seen time on the cluster
    clock (``ClusterBus.last_seen``): the outage is not ``MOVE_S`` late."""
    alert, left_clock, left_wall, _ = await left_while_unowned(
        tmp_path, pg_dsn, redis_server.url, cluster_up=True)
    assert abs(alert["context"]["offline_clock"] - left_clock) < SLACK_S
    assert abs(alert["context"]["offline_since"] - left_wall) < SLACK_S
    assert alert["value"] >= MOVE_S - SLACK_S  # "offline for 3 s", not 1 s


async def test_a_gateway_gone_while_no_node_was_up_gets_offline_s_from_the_restart(
        tmp_path: Path, pg_dsn: str, redis_server: RedisServer) -> None:  # noqa: F811
    """A whole cluster down (its last node left): the gateway could not connect to
    anything, so its outage counts from when the cluster came up (``ClusterBus.up_since``),
    as a single hub's does from its start -- not from before, which would raise every
    gateway not back within a second of a full restart."""
    alert, left_clock, _, node = await left_while_unowned(
        tmp_path, pg_dsn, redis_server.url, cluster_up=False)
    up = node.bus.up_since
    assert up is not None and up >= left_clock + MOVE_S - SLACK_S
    assert alert["context"]["offline_clock"] >= up - SLACK_S


def test_a_gateway_seen_back_since_a_restored_outage_starts_a_new_one() -> None:
    """An owner restored an outage from an earlier owner's alert; the gateway's last-seen
    time says it was connected since (a second outage, unseen while its partition moved):
    a new outage, raised anew -- not taken for the first."""
    shared = [100.0]  # the shared clock's reading
    events: list[dict[str, Any]] = []
    engine = AlertEngine(CONFIG, lambda t, d: None, sink=events.append,
                         elapsed=lambda: shared[0], shared=True)
    engine.resume_outage(GW, 1_000.0, at=50.0)  # began at 50 (its alert is elsewhere)
    engine.on_gateway(GW, False, 1_050.0, began=50.0)  # last seen at 50: the same outage
    engine.tick(1_050.0)
    shared[0] = 130.0
    engine.on_gateway(GW, False, 1_080.0, began=120.0)  # seen at 120: back since
    engine.tick(1_080.0)
    first, second = (e["alert"]["context"] for e in events)
    assert (first["offline_since"], first["offline_clock"]) == (1_000.0, 50.0)
    # the date goes back by what the shared clock says: 10 s before "now"
    assert (second["offline_since"], second["offline_clock"]) == (1_070.0, 120.0)


# ------------------------------------------------ the webhook outbox across feed holders


async def hand_over_an_unsent_event(dsn: str, url: str, wall: SteppedWall, offset: float,
                                    max_age_s: float, held_s: float
                                    ) -> tuple[WebhookReceiver, Metrics]:
    """The feed holder, its clock ``offset`` off, queues an event while the webhook is
    down and stops; ``held_s`` later the next holder (clock right) takes the feed, the
    webhook up.  -> (the receiver, the next holder's metrics)."""
    hook = WebhookReceiver()
    hook.status = 503  # down: every attempt is retried
    config = AlertsConfig(webhooks=[WebhookConfig(
        url=f"http://127.0.0.1:{hook.port}/hook", max_attempts=1000, max_age_s=max_age_s,
        backoff_initial_s=0.05, backoff_max_s=0.1)])
    metrics = [Metrics(), Metrics()]
    async with two_feed_holders(dsn, url, hook, config, partitions=1,
                                metrics=metrics) as held:
        nursery, stores, feeds, first = held.nursery, held.stores, held.feeds, held.first
        wall.offset = offset  # the first holder's clock (the process's, while it runs)
        held.start_first()
        await until_true(lambda: feeds[0].holding, "the first node holds the feed")
        await stores[0].save_alerts(0, 1, [{
            "id": "w1", "priority": "P0", "rule": "y", "raised_at": 100.0,
            "acknowledged": False}])
        await until_true(lambda: len(hook.headers) >= 1, "queued, and refused")
        first.cancel()  # stopped before delivering: gives the lease back
        await until_true(lambda: not feeds[0].holding, "the first node stopped")
        wall.offset = 0.0  # the next holder's clock
        hook.status = 200
        await trio.sleep(held_s)  # (time passing: the event's age)
        nursery.start_soon(feeds[1].run)
        # (holding once its resend is done: sent, or given up)
        await until_true(lambda: feeds[1].holding, "the next node holds the feed")
        await until_true(lambda: len(hook.events) == 1 or failed(metrics[1]) == 1,
                         "the next holder sends it or gives it up")
    return hook, metrics[1]


def failed(metrics: Metrics) -> float:
    return metrics.counter("hub_webhook_failed_total").total()


async def test_an_event_queued_by_a_holder_an_hour_behind_is_not_an_hour_old(
        pg_dsn: str, redis_server: RedisServer, wall: SteppedWall) -> None:  # noqa: F811
    """``queued_at`` and the resend's "now" are both the cluster clock's (Redis's), so the
    event is seconds old and sent; by the two holders' wall clocks it was an hour old,
    past ``max_age_s`` (600 s), and given up as expired."""
    hook, metrics = await hand_over_an_unsent_event(pg_dsn, redis_server.url, wall, -HOUR,
                                                    max_age_s=600, held_s=0)
    assert [e["alert"]["id"] for e in hook.events] == ["w1"]
    assert failed(metrics) == 0


async def test_an_event_queued_by_a_holder_an_hour_ahead_expires_on_time(
        pg_dsn: str, redis_server: RedisServer, wall: SteppedWall) -> None:  # noqa: F811
    """The reverse: an event older than ``max_age_s`` (2 s) when the next holder takes
    the feed is given up as expired, not taken for an hour younger and sent late."""
    hook, metrics = await hand_over_an_unsent_event(pg_dsn, redis_server.url, wall, HOUR,
                                                    max_age_s=2, held_s=3)
    assert hook.events == []
    assert metrics.counter("hub_webhook_failed_total").get(
        url=shown_url(f"http://127.0.0.1:{hook.port}/hook"), reason="expired") == 1


async def until_true(predicate: Callable[[], bool], what: str) -> None:
    with trio.move_on_after(30):
        while not predicate():
            await trio.sleep(0.05)
        return
    raise AssertionError(f"not within 30 s: {what}")
