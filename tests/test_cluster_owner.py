"""Partition ownership, the sans-IO part (edgegw/hub/cluster/owner.py): which leases a node
acquires, renews and releases, simulated over a few nodes and rounds without sockets."""

from __future__ import annotations

import hashlib

from edgegw.hub.cluster.owner import (
    LeasePlanner,
    home_node,
    owns_topic,
    target_count,
    topic_partition,
)

P = 64


def _simulate(nodes: list[str], rounds: int, holders: dict[int, str | None],
              planners: dict[str, LeasePlanner], start: float = 0.0) -> float:
    """Each round every node plans and carries out its plan against one shared lease
    table (SET NX semantics: the first to acquire a free lease gets it)."""
    now = start
    for _ in range(rounds):
        for node in nodes:
            mine = {p for p, h in holders.items() if h == node}
            plan = planners[node].plan(now, nodes, holders, mine)
            assert set(plan.renew) | set(plan.release) == mine
            assert not set(plan.acquire) & mine
            for p in plan.release:
                holders[p] = None
            for p in plan.acquire:
                if holders.get(p) is None:
                    holders[p] = node
        now += 1.0
    return now


def test_three_nodes_spread_every_partition_fairly() -> None:
    nodes = ["a", "b", "c"]
    planners = {n: LeasePlanner(n, P, grace_s=5.0) for n in nodes}
    holders: dict[int, str | None] = {}
    _simulate(nodes, 10, holders, planners)
    assert all(holders.get(p) is not None for p in range(P))
    counts = {n: sum(h == n for h in holders.values()) for n in nodes}
    assert max(counts.values()) <= target_count(P, 3) == 22
    # home partitions first: only a node's homes beyond its target land elsewhere
    homes = {n: sum(home_node(p, nodes) == n for p in range(P)) for n in nodes}
    overflow = sum(max(0, k - 22) for k in homes.values())
    assert sum(h != home_node(p, nodes) for p, h in holders.items()) == overflow


def test_dead_node_partitions_move_after_grace_and_rebalance_on_return() -> None:
    nodes = ["a", "b", "c"]
    planners = {n: LeasePlanner(n, P, grace_s=5.0) for n in nodes}
    holders: dict[int, str | None] = {}
    now = _simulate(nodes, 3, holders, planners)
    # c dies: its leases expire (the table shows them free); a and b are the live nodes
    lost = [p for p, h in holders.items() if h == "c"]
    for p in lost:
        holders[p] = None
    now = _simulate(["a", "b"], 8, holders, planners, now)
    assert all(holders.get(p) in ("a", "b") for p in range(P))
    counts = {n: sum(h == n for h in holders.values()) for n in ("a", "b")}
    assert counts == {"a": 32, "b": 32} or max(counts.values()) <= 32
    # c comes back: a and b release down to the target, c takes what is freed
    planners["c"] = LeasePlanner("c", P, grace_s=5.0)
    _simulate(nodes, 10, holders, planners, now)
    counts = {n: sum(h == n for h in holders.values()) for n in nodes}
    assert all(holders.get(p) is not None for p in range(P))
    assert max(counts.values()) <= 22 and min(counts.values()) >= 20, counts


def test_rendezvous_moves_only_the_dead_nodes_partitions() -> None:
    before = {p: home_node(p, ["a", "b", "c"]) for p in range(P)}
    after = {p: home_node(p, ["a", "b"]) for p in range(P)}
    for p in range(P):
        if before[p] != "c":
            assert after[p] == before[p]


def test_non_home_free_partition_waits_for_grace() -> None:
    planner = LeasePlanner("a", 4, grace_s=5.0)
    nodes = ["a", "b"]
    away = [p for p in range(4) if home_node(p, nodes) == "b"]
    assert away  # (with these names, b is home for some of the 4)
    plan = planner.plan(0.0, nodes, {}, set())
    assert not set(plan.acquire) & set(away)
    plan = planner.plan(5.0, nodes, {}, set())
    assert set(away) <= set(plan.acquire) or len(plan.acquire) == target_count(4, 2)


def test_topic_partitions() -> None:
    def part(key: str) -> int:
        return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(),
                              "big") % P
    assert topic_partition("lot/L1", P) == part("L1")
    assert topic_partition("lot/L1/wafer/3", P) == part("L1")
    assert topic_partition("test/L1/1000", P) == part("L1")
    assert topic_partition("lot/A%2FB", P) == part("A/B")  # the decoded lot id
    assert topic_partition("gateway/ate-01", P) == part("gw:ate-01")
    assert topic_partition("alert/P1/yield", P) is None
    assert topic_partition("hub/state", P) is None
    assert owns_topic(part("L1"), "lot/L1", P)
    assert not owns_topic((part("L1") + 1) % P, "lot/L1", P)
