"""Hub nodes whose wall clocks disagree by an hour (a tester-floor server NTP has not set,
or set by an hour): the cluster judges liveness by one clock, Redis's (docs/cluster.md,
"Clocks"), so a node's own clock changes nothing -- a node that dies is listed gone by the
others within its TTL, a node that lives stays listed, whichever way its clock is off.

A node's clock is stepped here by replacing ``time.time`` for the process while that node
makes its call (as tests/test_clock_steps.py does; the calls are sequential, so each one
runs under its own node's clock), with a real private Redis (tests/cluster_redis.py)."""

from __future__ import annotations

import time
from typing import TypeVar

import pytest
import trio
from cluster_redis import RedisServer, fresh_prefix, redis_server  # noqa: F401
from walltools import SteppedWall

from edgegw.hub.cluster import ClusterBus

HOUR = 3600.0
SHORT_TTL_S = 1.0  # a node that dies must be gone about this long after its last heartbeat
LONG_TTL_S = 30.0  # a node that lives: far beyond any scheduling delay on a loaded machine
SLACK_S = 10.0  # load: still far below the hour a stepped clock used to add

T = TypeVar("T")


async def two_nodes(nursery: trio.Nursery, url: str) -> tuple[ClusterBus, ClusterBus]:
    prefix = fresh_prefix()
    skewed = ClusterBus(url, prefix, "skewed")
    right = ClusterBus(url, prefix, "right")
    await nursery.start(skewed.run)
    await nursery.start(right.run)
    return skewed, right


async def gone_within(bus: ClusterBus, node: str, seconds: float) -> float:
    """How long until ``bus`` no longer lists ``node`` (fails after ``seconds``)."""
    started = trio.current_time()
    with trio.fail_after(seconds):
        while node in await bus.live_nodes():
            await trio.sleep(0.05)
    return trio.current_time() - started


@pytest.mark.parametrize("offset", [HOUR, -HOUR], ids=["ahead", "behind"])
async def test_a_node_whose_clock_is_an_hour_off_that_dies_is_listed_gone_within_its_ttl(
        redis_server: RedisServer, wall: SteppedWall, offset: float) -> None:  # noqa: F811
    async with trio.open_nursery() as nursery:
        skewed, right = await two_nodes(nursery, redis_server.url)
        # its last heartbeat: listed by the others ...
        await wall.as_of_async(offset, lambda: skewed.heartbeat_node(SHORT_TTL_S))
        assert await right.heartbeat_and_list(LONG_TTL_S) == ["right", "skewed"]
        # ... then it dies: gone a TTL later, not an hour (its partitions get taken over)
        await gone_within(right, "skewed", SHORT_TTL_S + SLACK_S)
        assert await right.live_nodes() == ["right"]
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("offset", [HOUR, -HOUR], ids=["ahead", "behind"])
async def test_a_node_whose_clock_is_an_hour_off_sees_the_others_die_within_their_ttl(
        redis_server: RedisServer, wall: SteppedWall, offset: float) -> None:  # noqa: F811
    async with trio.open_nursery() as nursery:
        skewed, right = await two_nodes(nursery, redis_server.url)
        started = trio.current_time()
        await right.heartbeat_node(SHORT_TTL_S)
        assert await wall.as_of_async(offset, lambda: skewed.heartbeat_and_list(LONG_TTL_S)) \
            == ["right", "skewed"]
        # ``right`` dies: the skewed node lists it gone a TTL later (and keeps itself)
        with trio.fail_after(SHORT_TTL_S + SLACK_S):
            while "right" in await wall.as_of_async(
                    offset, lambda: skewed.heartbeat_and_list(LONG_TTL_S)):
                await trio.sleep(0.05)
        # not before its TTL either (Redis counts whole milliseconds)
        assert trio.current_time() - started >= SHORT_TTL_S - 0.01
        assert await right.live_nodes() == ["skewed"]
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("offset", [HOUR, -HOUR], ids=["ahead", "behind"])
async def test_live_nodes_whose_clocks_disagree_by_an_hour_all_stay_listed(
        redis_server: RedisServer, wall: SteppedWall, offset: float) -> None:  # noqa: F811
    """Every ownership round heartbeats and lists: neither node drops the other (an ahead
    clock used to drop the others, even from the registry; a behind one to drop itself)."""
    async with trio.open_nursery() as nursery:
        skewed, right = await two_nodes(nursery, redis_server.url)
        await right.heartbeat_node(LONG_TTL_S)
        for _ in range(3):
            assert await wall.as_of_async(offset,
                               lambda: skewed.heartbeat_and_list(LONG_TTL_S)) \
                == ["right", "skewed"]
            assert await right.heartbeat_and_list(LONG_TTL_S) == ["right", "skewed"]
            assert await right.live_nodes() == ["right", "skewed"]
            assert await wall.as_of_async(offset, skewed.live_nodes) == ["right", "skewed"]
        nursery.cancel_scope.cancel()


async def test_leases_and_presence_of_a_node_an_hour_ahead_expire_by_their_ttl(
        redis_server: RedisServer, wall: SteppedWall) -> None:  # noqa: F811
    """Leases and gateway presence are key TTLs, which Redis measures itself: the node's
    clock never entered them (checked here so that it stays so)."""
    async with trio.open_nursery() as nursery:
        skewed, right = await two_nodes(nursery, redis_server.url)
        token = await wall.as_of_async(HOUR, lambda: skewed.acquire("partition:0", SHORT_TTL_S))
        assert token is not None
        assert await wall.as_of_async(HOUR, lambda: skewed.claim_presence(
            "ate-01", 1, SHORT_TTL_S, connected_at=str(time.time() + HOUR)))
        assert await right.lease_holder("partition:0") == ("skewed", token)
        assert (await right.presence("ate-01") or {}).get("node") == "skewed"
        with trio.fail_after(SHORT_TTL_S + SLACK_S):
            while await right.acquire("partition:0", LONG_TTL_S) is None:
                await trio.sleep(0.05)
            while await right.presence("ate-01") is not None:
                await trio.sleep(0.05)
        nursery.cancel_scope.cancel()
