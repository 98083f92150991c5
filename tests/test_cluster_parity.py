"""A cluster node shows what a single hub shows (issue 14, docs/cluster.md "A node"): the
``gateway/<id>`` topic counts every record of the gateway whatever partition its lots are
in and says ``online`` wherever in the cluster the gateway is connected; per-die test values
are answered on every node; ``hub/state`` is one cluster-wide topic; the partition owners
use the alert engine's public API only.

The sans-IO parts first; then two node processes' worth of ``ClusterHub`` in one Trio run on
a real PostgreSQL and a real Redis, one gateway (its records spread over the partitions),
compared field by field with a single hub's ``LiveState`` fed the same applied frames."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any, ClassVar

import trio
from cluster_redis import RedisServer, fresh_prefix, redis_server  # noqa: F401
from hubtools import gateway_config, http_get

from edgegw.config import build
from edgegw.gateway import Gateway
from edgegw.hub import HubConfig, topics
from edgegw.hub.alerts import AlertEngine, AlertsConfig
from edgegw.hub.cluster.alertfeed import ClusterWarnings, merge_warnings
from edgegw.hub.cluster.gateways import GatewayTopics, event_only
from edgegw.hub.history import die_values
from edgegw.hub.live import LiveState
from edgegw.records import (
    GatewayEvent,
    ParametricResult,
    PartResult,
    Record,
    SensorReading,
    WaferEnd,
)
from tests.cluster_live import LiveFollower

GW = "ate-01"
TOKEN = "s3cret"

# ---------------------------------------------------------------- sans-IO


def test_gateway_topic_takes_cluster_totals_presence_and_the_partitions_events() -> None:
    published: list[tuple[str, dict[str, Any]]] = []
    events = [{"ts": 1.0, "level": "info", "code": "a", "message": "first"},
              {"ts": 2.0, "level": "info", "code": "b", "message": "second"}]
    gws = GatewayTopics(lambda t, d: published.append((t, d)), lambda gw: events)
    gws.know(GW)
    assert gws.topics() == ["gateway/ate-01"]
    single = LiveState(lambda t, d: None).snapshot  # the single hub's shape
    assert single("gateway/ate-01") is None
    assert gws.presence(GW, True, 100.0, 101.0)
    assert not gws.presence(GW, True, 100.0, 102.0)  # (the same connection: no change)
    assert gws.totals(GW, 500, 5, 500, 90.0, 103.0)
    # a late notice with older totals changes nothing
    assert not gws.totals(GW, 300, 3, 300, 80.0, 104.0)
    snap = gws.snapshot("gateway/ate-01")
    assert snap is not None
    assert (snap["records"], snap["frames"], snap["last_rid"], snap["online"]) == (
        500, 5, 500, True)
    assert snap["connected_at"] == 100.0 and snap["last_seen"] == 103.0
    assert snap["records_per_s"] > 0
    assert [e["code"] for e in snap["events"]] == ["b", "a"]  # newest first, as LiveState
    reference = LiveState(lambda t, d: None)
    reference.on_gateway(GW, True, 1.0)
    assert set(snap) == set(reference.snapshot("gateway/ate-01") or {})
    # reconnected on another node: a new connection time; then gone
    assert gws.presence(GW, True, 200.0, 201.0)
    assert gws.presence(GW, False, None, 202.0)
    snap = gws.snapshot("gateway/ate-01")
    assert snap is not None and snap["online"] is False and snap["disconnected_at"] == 202.0
    assert [d.get("online") for t, d in published if "online" in d] == [True, True, True, False]
    # a partition state's gateway delta: only its event passes
    assert event_only({"records": 3, "online": False}) is None
    assert event_only({"event": events[0], "records": 3}) == {"event": events[0]}


def test_a_new_owner_seeds_the_gateway_rate_with_its_last_seconds() -> None:
    """The ``gateway/<id>`` topic moves to a new owner (the partition's lease moved): its
    ``records_per_s`` goes on from the records committed in the last seconds instead of
    starting again from 0; the totals read after the seed count only what comes later."""
    published: list[tuple[str, dict[str, Any]]] = []
    gws = GatewayTopics(lambda t, d: published.append((t, d)), lambda gw: [])
    gws.know(GW)
    assert gws.unseeded() == [GW]
    # 300 records in the last 10 s; 5000 a minute ago (outside the window)
    gws.seed_rate(GW, {940: 5000, 995: 100, 999: 200}, 1000.0)
    assert gws.unseeded() == []
    gws.seed_rate(GW, {999: 1000}, 1000.0)  # (once only)
    assert gws.totals(GW, 10_000, 50, 10_000, 999.5, 1000.0)  # the baseline: not counted
    assert gws.presence(GW, True, 900.0, 1000.0)
    snap = gws.snapshot("gateway/ate-01")
    assert snap is not None and snap["records_per_s"] == 30.0
    # later commits add to it; the seeded seconds leave the window as time goes on
    assert gws.totals(GW, 10_100, 51, 10_100, 1001.0, 1001.0)
    assert published[-1][1]["records_per_s"] == 40.0
    gws.tick(1006.0)
    assert published[-1][1]["records_per_s"] == 30.0  # (second 995 left the window)
    gws.tick(1012.0)
    assert published[-1][1]["records_per_s"] == 0.0


def _bad_parts(lot: str, rids: range) -> list[Any]:
    # a site that is not an integer: the live state cannot apply the part (bad_record)
    return [PartResult("tester", 10.0 + i, lot, "W1", 1, "x", f"p{i}", i, 0, 1, 1, True)
            for i in rids]


def test_hub_state_of_the_partitions_merged_is_the_single_hubs() -> None:
    single = LiveState(lambda t, d: None)
    parts = [LiveState(lambda t, d: None) for _ in range(3)]
    for i, lot in enumerate(["A", "B", "C"]):
        batch = _bad_parts(lot, range(10 * i, 10 * i + 3 + i))
        single.on_records(GW, 1 + 10 * i, batch, now=100.0 + i)
        parts[i].on_records(GW, 1 + 10 * i, batch, now=100.0 + i)
    merged = merge_warnings(p.warnings() for p in parts)
    assert merged == single.warnings()
    assert merged["not_applied"] == 12 and merged["reasons"]["bad_record"]["count"] == 12
    view = ClusterWarnings()
    assert view.snapshot() == {"not_applied": 0, "reasons": {}}  # (as a fresh single hub)
    assert view.update({i: p.warnings() for i, p in enumerate(parts)})
    assert not view.update({i: p.warnings() for i, p in enumerate(parts)})
    assert view.snapshot() == single.warnings()


def test_alert_engine_api_for_a_cluster_owner() -> None:
    config = build(AlertsConfig, {"escalate_after_s": 5, "rules": [
        {"name": "y", "kind": "wafer_yield", "priority": "P0", "threshold": 0.99,
         "min_parts": 1},
        {"name": "off", "kind": "gateway_offline", "priority": "P1", "offline_s": 10}]})
    out: list[dict[str, Any]] = []
    engine = AlertEngine(config, lambda t, d: out.append(d))
    state = LiveState(lambda t, d: None, alerts=engine)
    state.on_records(GW, 1, [PartResult("t", 1.0, "L", "W", 1, 0, "p", 0, 0, 5, 5, False)],
                     now=10.0)
    assert engine.watches("gateway_offline") and not engine.watches("test_cpk")
    assert engine.escalation_pending == 1
    alert_id = next(iter(engine.alerts))
    # acknowledged on another node: no event here, and never escalated
    assert engine.note_ack(alert_id, "maria", 11.0)
    assert not engine.note_ack(alert_id, "joe", 12.0)
    assert engine.escalation_pending == 0
    engine.tick(100.0)
    assert [e["event"] for e in out] == ["raised"]
    assert engine.alerts[alert_id].acked_by == "maria"
    # an outage an earlier owner alerted: resumed, not raised again
    engine.resume_outage(GW, 50.0)
    engine.restore([{**engine.alerts[alert_id].to_dict(), "id": "off1", "rule": "off",
                     "kind": "gateway_offline", "priority": "P1", "key": f"off|{GW}|50.000",
                     "raised_at": 60.0, "last_seen": 60.0}])
    engine.on_gateway(GW, False, 70.0)  # (setdefault: the outage keeps its start)
    engine.tick(200.0)
    assert [e["event"] for e in out] == ["raised"]


# ---------------------------------------------------------------- Redis


async def test_an_older_connection_never_overwrites_or_removes_a_newer_ones_presence(
        redis_server: RedisServer) -> None:  # noqa: F811
    from edgegw.hub.cluster import ClusterBus

    prefix = fresh_prefix()
    async with trio.open_nursery() as nursery:
        a, b = ClusterBus(redis_server.url, prefix, "na"), ClusterBus(redis_server.url,
                                                                       prefix, "nb")
        for bus in (a, b):
            await nursery.start(bus.run)
        assert await a.claim_presence(GW, 3, 5.0, connected_at="10.0")
        # the gateway reconnected through node b (generation 4): b's presence wins
        assert await b.claim_presence(GW, 4, 5.0, connected_at="20.0")
        # node a's lingering connection refreshes, then ends: neither touches b's
        assert not await a.claim_presence(GW, 3, 5.0, connected_at="10.0")
        assert not await a.drop_presence(GW, 3)
        assert await a.presence(GW) == {"node": "nb", "generation": "4",
                                        "connected_at": "20.0"}
        # b's connection ends: gone at once, not after its TTL
        assert await b.drop_presence(GW, 4)
        assert await a.presence(GW) is None
        # a reply left for whoever asked, taken once
        await b.put_reply("r1", b"answer", 5.0)
        assert await a.take_reply("r1") == b"answer"
        assert await a.take_reply("r1") is None
        nursery.cancel_scope.cancel()


# ---------------------------------------------------------------- two nodes


LOTS = ("PA", "PB", "PC")


class FloorSource:
    """Parts with a parametric test on three lots (so over several partitions), gateway
    events and sensor readings (the gateway's own partition), and parts for a wafer that
    already left memory (records the live state cannot apply: ``hub/state``)."""

    replays: ClassVar[bool] = True

    def __init__(self) -> None:
        self.done = trio.Event()

    async def run(self, sink: Any, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        n = 0
        for i in range(12):
            lot = LOTS[i % 3]
            batch: list[Record] = []
            for j in range(20):
                n += 1
                batch.append(ParametricResult("tester", 1000.0 + n, lot, 1, j % 4, f"q{n}",
                                              100, "vdd", 1.0 + (n % 17) / 10, 0.5, 2.5, "V",
                                              True))
                batch.append(PartResult("tester", 1000.0 + n, lot, "W1", 1, j % 4, f"q{n}",
                                        i, j, 1 + (n % 5 == 0), 1, n % 5 != 0))
            batch.append(GatewayEvent("gateway", 1000.0 + n, "info", f"ev{i}", f"event {i}"))
            batch.append(SensorReading("handler", 1000.0 + n, "temp", 25.0 + i, "degC"))
            await sink.put(batch, checkpoint=i + 1)
            await trio.sleep(0.02)
        # lot PX: 26 closed wafers (one over max_wafers_per_lot), then a part of the first
        wafers: list[Record] = []
        for w in range(26):
            wafers.append(PartResult("tester", 2000.0 + w, "PX", f"X{w:02}", 1, 0, f"x{w}",
                                     0, 0, 1, 1, True))
            wafers.append(WaferEnd("tester", 2000.0 + w, "PX", f"X{w:02}"))
        wafers.append(PartResult("tester", 2100.0, "PX", "X00", 1, 0, "late", 1, 1, 1, 1, True))
        await sink.put(wafers, checkpoint=13)
        self.done.set()
        await trio.sleep_forever()


class Idle:
    replays: ClassVar[bool] = True

    async def run(self, sink: Any, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        await trio.sleep_forever()


def node_config(tmp: Path, name: str, dsn: str, redis_url: str, prefix: str,
                lease_ttl_s: float = 1.5) -> HubConfig:
    return build(HubConfig, {
        "hub": {"port": 0, "data_dir": str(tmp / name), "heartbeat_s": 1.0,
                "cluster": {"node_id": name, "postgres_dsn": dsn, "redis_url": redis_url,
                            "key_prefix": prefix, "partitions": 4, "lease_ttl_s": lease_ttl_s,
                            "stale_after_s": 2.0, "snapshot_interval_s": 0.2,
                            "checkpoint_interval_s": 2}},
        "gateways": {GW: {"token": TOKEN}},
    })


async def until(predicate: Any, within_s: float, what: str,
                state: Any = None) -> None:
    """Wait for ``predicate``; on a timeout, say what was waited for (and ``state()``)."""
    with trio.move_on_after(within_s):
        while not predicate():
            await trio.sleep(0.1)
        return
    raise AssertionError(f"not within {within_s} s: {what}"
                         + (f" ({state()})" if state is not None else ""))


async def applied_frames(store: Any, partitions: int) -> list[tuple[int, int, list[Any]]]:
    """Every frame the cluster applied, put together again from its partitions' runs:
    ``(seq, first_rid, records)`` in sequence order (one gateway, one epoch here)."""
    runs: dict[int, list[tuple[int, list[Any]]]] = defaultdict(list)
    for p in range(partitions):
        after = 0
        while chunk := await store.read_partition(p, after, 500):
            for c in chunk:
                runs[c.seq].append((c.first_rid, c.records))
            after = chunk[-1].pseq
    frames = []
    for seq in sorted(runs):
        parts = sorted(runs[seq], key=lambda r: r[0])
        frames.append((seq, parts[0][0], [r for _, recs in parts for r in recs]))
    return frames


async def test_a_node_shows_the_single_hubs_gateway_die_values_and_hub_state(
        tmp_path: Path, pg_dsn: str, redis_server: RedisServer) -> None:  # noqa: F811
    from edgegw.hub.cluster.node import ClusterHub
    from edgegw.hub.cluster.partition import partition_of

    prefix = fresh_prefix()
    nodes = [ClusterHub(node_config(tmp_path, n, pg_dsn, redis_server.url, prefix))
             for n in ("na", "nb")]
    async with trio.open_nursery() as nursery:
        ports = [await nursery.start(node.run) for node in nodes]
        await until(lambda: sum(len(n.owner.states()) for n in nodes) == 4, 20,
                    "every partition owned and rebuilt")
        # the gateway's topic is published by the owner of gw:<id>; watch it on the other
        gw_owner = next(i for i, n in enumerate(nodes) if partition_of(
            "gw:" + GW, 4) in n.owner.owned)
        watcher = 1 - gw_owner
        follower = LiveFollower(ports[watcher], ["gateway/#", "hub/state"])
        nursery.start_soon(follower.run)
        await follower.connected.wait()

        # 1. the gateway connected to the gateway owner's node
        source = FloorSource()
        first = trio.CancelScope()

        async def gateway(port: int, src: Any, scope: trio.CancelScope) -> None:
            with scope:
                cfg = gateway_config(tmp_path / "gw", port, batch={"max_records": 500,
                                                                   "max_delay_ms": 20},
                                     spool={"dir": str(tmp_path / "spool")})
                gw = Gateway(cfg, extra_sources=[("tester", src)])
                async with trio.open_nursery() as inner:
                    await inner.start(gw.run)
        nursery.start_soon(gateway, ports[gw_owner], source, first)
        topic = topics.gateway(GW)
        await until(lambda: (follower.views.get(topic) or {}).get("online") is True, 15,
                    "online on the other node")
        await source.done.wait()
        store = nodes[0].store

        async def settled() -> bool:
            stats = await store.all_gateway_stats()
            view = follower.views.get(topic) or {}
            return GW in stats and view.get("records") == stats[GW].records_applied
        with trio.fail_after(20):
            while not await settled():
                await trio.sleep(0.1)
        # 2. the connection ends: offline at once (its presence removed), on the other node
        first.cancel()
        await until(lambda: follower.views[topic]["online"] is False, 10,
                    "offline after the disconnect")
        connected_before = follower.views[topic]["connected_at"]
        # 3. the same gateway comes back through the other node: online again
        nursery.start_soon(gateway, ports[watcher], Idle(), trio.CancelScope())
        await until(lambda: follower.views[topic]["online"] is True, 15,
                    "online after reconnecting to the other node")
        assert follower.views[topic]["connected_at"] != connected_before
        await trio.sleep(1.0)  # (the reconnection's own events, if any, land)

        # the single hub's live state, fed the frames the cluster applied
        frames = await applied_frames(store, 4)
        reference = LiveState(lambda t, d: None)
        for _, first_rid, records in frames:
            reference.on_records(GW, first_rid, records, now=5000.0)
        want = reference.snapshot(topic)
        assert want is not None

        def same_gateway() -> bool:
            got = follower.views.get(topic) or {}
            return all(got.get(k) == want[k] for k in ("records", "frames", "last_rid",
                                                       "events"))
        await until(same_gateway, 10, "the gateway topic equal to the single hub's")
        got = follower.views[topic]
        assert got["records"] == sum(len(r) for _, _, r in frames)
        assert got["frames"] == len(frames) and got["online"] is True
        codes = [e["code"] for e in got["events"] if e["code"].startswith("ev")]
        assert codes[:3] == ["ev11", "ev10", "ev9"]  # newest first

        # hub/state: one topic for the cluster, as a single hub's (clock fields aside)
        def no_clock(snap: dict[str, Any]) -> dict[str, Any]:
            return {"not_applied": snap["not_applied"],
                    "reasons": {r: (v["count"], v["last"])
                                for r, v in snap["reasons"].items()}}
        assert reference.warnings()["not_applied"] == 1
        await until(lambda: follower.views.get(topics.HUB_STATE) is not None and no_clock(
            follower.views[topics.HUB_STATE]) == no_clock(reference.warnings()), 15,
            "hub/state as the single hub's")

        # per-die values: the same answer on the lot's owner and on the other node
        lot = "PA"
        path = f"/api/lots/{lot}/wafers/W1/tests/100"
        want_values = die_values(reference, lot, "W1", "100")
        assert want_values[0] == 200 and len(want_values[1]["dies"]) == 80
        owner = next(i for i, n in enumerate(nodes)
                     if n.owner.state_for(partition_of(lot, 4)) is not None)
        for i in (owner, 1 - owner):
            status, body = await http_get(ports[i], path)
            assert status == 200, body
            assert sorted(map(tuple, body.pop("dies"))) == sorted(
                map(tuple, want_values[1]["dies"]))
            assert body == {k: v for k, v in want_values[1].items() if k != "dies"}
        assert nodes[1 - owner].die_values.asked == 1  # (asked the owner over Redis)
        assert nodes[owner].die_values.answered == 1
        status, body = await http_get(ports[1 - owner], f"/api/lots/{lot}/wafers/W9/tests/100")
        assert (status, body) == die_values(reference, lot, "W9", "100")
        assert json.dumps(body)  # (JSON all the way)
        assert follower.silent_gaps == []
        nursery.cancel_scope.cancel()


class SteadySource:
    """Batches of parts until ``stop`` is set, then nothing (the gateway stays connected)."""

    replays: ClassVar[bool] = True

    def __init__(self) -> None:
        self.stop = trio.Event()
        self.stopped = trio.Event()  # its last put returned: ``sent`` is final
        self.sent = 0

    async def run(self, sink: Any, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        i = 0
        while not self.stop.is_set():
            i += 1
            await sink.put([PartResult("tester", 1000.0 + i, "PR", "W1", 1, 0, f"r{i}.{j}",
                                       i, j, 1, 1, True) for j in range(20)], checkpoint=i)
            self.sent += 20
            await trio.sleep(0.05)
        self.stopped.set()
        await trio.sleep_forever()


async def test_the_gateway_rate_carries_over_when_its_partition_moves(
        tmp_path: Path, pg_dsn: str, redis_server: RedisServer) -> None:  # noqa: F811
    """The node publishing ``gateway/<id>`` stops; the other node takes the partition over
    while the gateway, connected to it, is idle: the topic's first snapshot from the new
    owner still shows the records of the last seconds per second (a single hub's rate
    over its window), not 0."""
    from edgegw.hub.cluster.node import ClusterHub
    from edgegw.hub.cluster.partition import partition_of

    prefix = fresh_prefix()
    nodes = [ClusterHub(node_config(tmp_path, n, pg_dsn, redis_server.url, prefix))
             for n in ("na", "nb")]
    p = partition_of("gw:" + GW, 4)
    scopes = [trio.CancelScope(), trio.CancelScope()]

    async def run_node(i: int, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        with scopes[i]:
            await nodes[i].run(task_status=task_status)

    async with trio.open_nursery() as nursery:
        ports = [await nursery.start(run_node, i) for i in range(2)]
        await until(lambda: [len(n.owner.states()) for n in nodes] == [2, 2], 20,
                    "the partitions shared and rebuilt")
        old = next(i for i, n in enumerate(nodes) if p in n.owner.owned)
        new = 1 - old
        source = SteadySource()
        cfg = gateway_config(tmp_path / "gw", ports[new],
                             batch={"max_records": 500, "max_delay_ms": 20},
                             spool={"dir": str(tmp_path / "spool")})
        nursery.start_soon(Gateway(cfg, extra_sources=[("tester", source)]).run)

        def topic_of(i: int) -> dict[str, Any]:
            owned = nodes[i].owner.owned.get(p)
            if owned is None or owned.gateways is None or not owned.caught_up:
                return {}
            return owned.gateways.snapshot(topics.gateway(GW)) or {}
        await until(lambda: topic_of(old).get("records_per_s", 0) > 0, 20,
                    "the gateway's rate on its first owner")
        source.stop.set()
        # (a put in flight when stop is set still lands: wait for it, or ``sent`` below
        # misses its records -- seen once: 1,580 sent, 1,600 counted)
        with trio.fail_after(20):
            await source.stopped.wait()
        await until(lambda: topic_of(old).get("records") == source.sent, 20,
                    "every record counted")
        sent = source.sent
        scopes[old].cancel()  # the owner of gw:<id> stops; the gateway stays idle
        await until(lambda: topic_of(new).get("records") == sent, 30,
                    "the partition taken over by the other node",
                    lambda: f"sent {sent}; owned by the new node: "
                            f"{nodes[new].owner.owned.get(p)!r}; topic {topic_of(new)}")
        rate = topic_of(new)["records_per_s"]
        assert 0 < rate <= sent / 10
        nursery.cancel_scope.cancel()
