"""Hub cluster end to end (issue 14): three node processes on a real PostgreSQL and a real
Redis, behind a real HAProxy (TCP, round robin, no stickiness); gateway processes and
/ws/live clients connect only through HAProxy.  Each test disrupts one run:

* ``test_sigkill_three_nodes_during_a_run``: each node in turn is SIGKILLed and started
  again; gateways and clients move to other nodes, partitions to other owners;
* ``test_redis_restarted_empty_mid_run``: Redis loses everything (a new live epoch);
* ``test_postgresql_restarted_mid_run``: PostgreSQL stops for 3 s (ingest pauses, gateways
  spool) and comes back.

and at the end of each (``check_run``):

* every record each gateway produced is applied exactly once (its record ids covered once
  by the frames in PostgreSQL);
* the live state every client holds equals, field by field (clock-dependent fields aside),
  what an uninterrupted single hub shows for the same testers (tests/cluster_reference.py),
  and every node's /api answers the same, with the single hub's figures;
* no client ever saw a silent gap: each delta continued exactly where it was, and a topic
  that came back after a move came back as the missed deltas or as a snapshot announced
  with a ``resync`` reason.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import time
import urllib.request
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import trio
from cluster_pg import create_database, private_pg
from cluster_redis import redis_server  # noqa: F401  (the fixture)

from tests.cluster_haproxy import HAProxy, NodeSet, haproxy_binary
from tests.cluster_haproxy import node_toml as cluster_node_toml
from tests.cluster_live import LiveFollower
from tests.cluster_reference import comparable, lot_topics, reference_state, volatile_fields
from tests.ports import free_port
from tests.processes import get_json, spawn, wait_for

pytestmark = pytest.mark.skipif(
    haproxy_binary() is None and os.environ.get("CI") != "true",
    reason="haproxy not installed (scripts/test.sh installs it as root)")

PARTITIONS = 8
# EDGEGW_CLUSTER_SOAK=N: N times the records and N rounds of node kills (a longer soak,
# outside the suite: docs/cluster.md, "Tests"); the suite runs 1
SOAK = int(os.environ.get("EDGEGW_CLUSTER_SOAK", "1"))

# three testers, two lots each (lots of one tester land in different partitions).  Each
# test paces them (``parts_per_second``: it changes when records come, not which, so the
# single hub's reference is the same) for a run just long enough for its disruption to
# land mid-run, which it asserts: 2400 parts at 120 parts/s (20 s) for every test mostly
# waited for the testers.
SOURCES: dict[str, dict[str, Any]] = {
    f"ate-0{i}": {"max_parts": 1800 * SOAK, "seed": 10 + i, "sites": 4,
                  "wafers": 3, "tests_per_part": 6, "lots": 2 * SOAK, "lot_id": f"L{i}00"}
    for i in (1, 2, 3)}

ALERTS_TOML = """\
[alerts]
escalate_after_s = 3

[[alerts.rules]]
name = "wafer-yield"
kind = "wafer_yield"
priority = "P0"
threshold = 0.99
min_parts = 50
"""

#: the same rule, for the single hub's reference
ALERTS = {"escalate_after_s": 3, "rules": [{"name": "wafer-yield", "kind": "wafer_yield",
                                             "priority": "P0", "threshold": 0.99,
                                             "min_parts": 50}]}

GATEWAY_TOML = """\
[gateway]
id = "@ID@"
token = "tok-@ID@"
hub_url = "ws://127.0.0.1:@LB@/ws/gateway"
state_dir = "@STATE@"
status_port = @STATUS@

[batch]
max_records = 300
max_delay_ms = 50

[uplink]
heartbeat_s = 1.0
connect_timeout_s = 3.0
probe_interval_s = 0.3
backoff_initial_s = 0.1
backoff_max_s = 1.0

[spool]
max_bytes = 268435456

[[sources]]
name = "tester"
type = "simulated"
@SOURCE@
"""


def node_toml(tmp: Path, dsn: str, redis_url: str, prefix: str) -> str:
    text = cluster_node_toml(tmp / "data", dsn, redis_url, prefix, partitions=PARTITIONS,
                             cluster="snapshot_interval_s = 0.5\ncheckpoint_records = 3000\n"
                                     "checkpoint_interval_s = 2",
                             rest=ALERTS_TOML)
    for gw in SOURCES:
        text += f'\n[gateways.{gw}]\ntoken = "tok-{gw}"\n'
    return text


class GatewayProc:
    def __init__(self, tmp: Path, gw: str, lb_port: int, parts_per_second: float) -> None:
        self.gw = gw
        self.dir = tmp / gw
        self.dir.mkdir(parents=True)
        self.status = free_port()
        self.pace = parts_per_second
        settings = {**SOURCES[gw], "parts_per_second": parts_per_second}
        source = "\n".join(f"{k} = {v!r}" if isinstance(v, str) else f"{k} = {v}"
                           for k, v in settings.items()).replace("'", '"')
        self.cfg = self.dir / "gateway.toml"
        self.cfg.write_text(
            GATEWAY_TOML.replace("@ID@", gw).replace("@LB@", str(lb_port))
            .replace("@STATE@", str(self.dir / "state")).replace("@STATUS@", str(self.status))
            .replace("@SOURCE@", source))
        self.proc: subprocess.Popen[bytes] | None = None
        self.last_rid = 0
        #: the records it had produced when the disruption landed (the tester still running?)
        self.produced_at_disruption: int | None = None

    def start(self) -> None:
        self.proc = spawn("gateway", "--config", str(self.cfg), log=self.dir / "gateway.log")

    def stats(self) -> dict[str, Any]:
        result: dict[str, Any] = get_json(f"http://127.0.0.1:{self.status}/api/stats")
        return result

    def drained(self, n_records: int) -> bool:
        st = self.stats()
        store = st["store"]
        self.last_rid = st["next_rid"] - 1
        return (st["next_rid"] - 1 >= n_records and store["frames"] == 0
                and store.get("pending_frames", 0) == 0 and st["pending_in_batcher"] == 0)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def count_tester_records(settings: dict[str, Any]) -> int:
    from edgegw.sim import SimulatedConfig, simulated_batches

    return sum(len(b) for b, _ in simulated_batches(SimulatedConfig(**settings), "tester"))


class Reference:
    """What one uninterrupted single hub shows for ``SOURCES`` (tests/cluster_reference.py):
    computed once for the session -- the testers are seeded, so it is the same for every
    test here, and computing it took ~1/3 of each test's time (12 single-hub runs of the
    testers per test, 5-8 s each on a busy machine)."""

    def __init__(self) -> None:
        from edgegw.config import build
        from edgegw.hub.alerts import AlertsConfig

        # one single hub with the nodes' alert rules, as the nodes run (its lot and test
        # topics are those of one without rules)
        self.state = reference_state(SOURCES, alerts=build(AlertsConfig, ALERTS))
        self.volatile = volatile_fields(SOURCES, self.state)
        self.expected = comparable(lot_topics(self.state), self.volatile)
        self.n_records = {gw: count_tester_records(s) for gw, s in SOURCES.items()}
        assert self.state.alerts is not None
        self.alert_keys = sorted(a.key for a in self.state.alerts.alerts.values())
        self._api: dict[str, Any] | None = None

    async def api(self) -> dict[str, Any]:
        """The single hub's answers to ``API_PATHS``."""
        if self._api is None:
            self._api = await single_hub_api(self.state)
        return self._api


@functools.cache
def reference() -> Reference:
    return Reference()


def applied_rid_coverage(dsn: str) -> dict[str, list[tuple[int, int]]]:
    """Per gateway, the record-id ranges its applied frames cover, in order."""
    import psycopg

    with psycopg.connect(dsn) as conn:
        rows = conn.execute("SELECT gateway_id, first_rid, n_records FROM edgegw_frames "
                            "ORDER BY gateway_id, first_rid").fetchall()
    out: dict[str, list[tuple[int, int]]] = {}
    for gw, first, n in rows:
        if n:
            out.setdefault(gw, []).append((first, first + n - 1))
    return out


API_PATHS = ["/api/lots"] + [
    p for i in (1, 2, 3) for lot in (f"L{i}00", f"L{i}01")
    for p in (f"/api/lots/{lot}/wafers", f"/api/lots/{lot}/wafers/{lot}-W01",
              f"/api/tests/{lot}/100")]


def api_answers(nodes: NodeSet) -> list[dict[str, Any]]:
    """Each node's answers to the history API paths, asked of the node directly."""
    out = []
    for port in nodes.ports:
        # (10 s: a node answered one of these in over 2 s beside three busy loops)
        out.append({path: get_json(f"http://127.0.0.1:{port}{path}", timeout=10.0)
                    for path in API_PATHS})
    return out


def alerts_check(nodes: NodeSet) -> tuple[list[dict[str, Any]], list[bool]]:
    """Each node's alert list (once the owners saved them all), then one alert
    acknowledged through node 1 and read back from every node."""
    def lists() -> list[dict[str, Any]]:
        return [get_json(f"http://127.0.0.1:{port}/api/alerts?limit=1000")
                for port in nodes.ports]
    seen = wait_for(lambda: (ls := lists()) and ls[0]["alerts"] and ls, timeout=20)
    alert_id = seen[0]["alerts"][0]["id"]
    req = urllib.request.Request(
        f"http://127.0.0.1:{nodes.ports[1]}/api/alerts/{alert_id}/ack",
        data=json.dumps({"user": "maria"}).encode(), method="POST",
        headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=5) as r:
        assert json.loads(r.read())["alert"]["acknowledged"] is True
    acked = []
    for port in nodes.ports:
        listed = get_json(f"http://127.0.0.1:{port}/api/alerts?limit=1000")["alerts"]
        acked.append(any(a["id"] == alert_id and a["acknowledged"] for a in listed))
    return seen, acked


def live_alerts(f: LiveFollower) -> dict[str, dict[str, Any]]:
    """The alerts a client holds from its ``alert/...`` topics, by id."""
    return {a["id"]: a for topic, snap in f.views.items() if topic.startswith("alert/")
            for a in (snap or {}).get("alerts", [])}


async def single_hub_api(state: Any) -> dict[str, Any]:
    """What a single hub's history API answers over ``state``."""
    from edgegw.hub.alerts import AlertEngine, AlertsConfig
    from edgegw.hub.history import HistoryApi

    api = HistoryApi(state, AlertEngine(AlertsConfig(), lambda t, d: None))
    out = {}
    for path in API_PATHS:
        status, payload = await api.dispatch("GET", path, {})
        assert status == 200, (path, payload)
        out[path] = payload
    return out


def figures(answer: Any) -> Any:
    """The counts of an API answer (times and rates aside): what must equal the single
    hub's."""
    keep = ("lot_id", "wafer_id", "status", "die_count", "good", "yield", "parts", "retests",
            "hard_bins", "soft_bins", "count", "mean", "min", "max", "test_num", "wafers",
            "live")
    if isinstance(answer, dict):
        return {k: figures(v) for k, v in answer.items() if k in keep or k in ("lots",)}
    if isinstance(answer, list):
        return sorted((figures(v) for v in answer), key=repr)
    if isinstance(answer, float):
        return float(f"{answer:.9g}")  # (running statistics: see cluster_reference.comparable)
    return answer


def _diff(got: Any, want: Any) -> dict[str, Any]:
    return {k: (str(got.get(k))[:200], str(want.get(k))[:200]) for k in set(got) | set(want)
            if got.get(k) != want.get(k)}


def gateway_totals(dsn: str) -> dict[str, tuple[int, int, int | None]]:
    """Per gateway, its records, frames and last record id as PostgreSQL counted them."""
    import psycopg

    with psycopg.connect(dsn) as conn:
        rows = conn.execute("SELECT gateway_id, records_applied, frames_applied, last_rid"
                            " FROM edgegw_gateways").fetchall()
    return {gw: (records, frames, last_rid) for gw, records, frames, last_rid in rows}


def gateway_views(f: LiveFollower) -> dict[str, tuple[Any, ...]]:
    """Per gateway, what its live topic says: records, frames, last record id, online."""
    return {topic.split("/", 1)[1]: (v.get("records"), v.get("frames"), v.get("last_rid"),
                                      v.get("online"))
            for topic, v in f.views.items() if topic.startswith("gateway/")}


def assert_exactly_once(coverage: list[tuple[int, int]], last_rid: int) -> None:
    """The ranges cover 1..last_rid with no overlap (no record lost, none applied twice).
    (A gateway's own events share its record ids: they are records too.)"""
    expect = 1
    for first, last in coverage:
        assert first == expect, f"rid {expect}..{first - 1} missing or overlapping ({first})"
        expect = last + 1
    assert expect - 1 == last_rid, (expect - 1, last_rid)


#: ``disrupt(nodes, t0, landed)``: ``landed()`` once its last disruption is in place
Disrupt = Callable[[NodeSet, float, Callable[[], Awaitable[None]]], Awaitable[list[str]]]


class Run:
    """What a cluster run left: its gateways, clients, the nodes' API answers, events."""

    def __init__(self) -> None:
        self.gateways: list[GatewayProc] = []
        self.followers: list[LiveFollower] = []
        self.answers: list[dict[str, Any]] = []
        self.events: list[str] = []
        self.alerts: list[dict[str, Any]] = []  # each node's /api/alerts at the end
        self.acked: list[bool] = []  # an alert acked on node 1: acked as seen on each node
        self.alert_followers: list[LiveFollower] = []  # alert/# through the load balancer
        self.acked_id = ""
        # gateway/# through the load balancer, and what PostgreSQL counted per gateway
        self.gateway_follower: LiveFollower | None = None
        self.totals: dict[str, tuple[int, int, int | None]] = {}


async def cluster_run(tmp: Path, dsn: str, redis_url: str, disrupt: Disrupt,
                      parts_per_second: float | Callable[[float], float]) -> Run:
    """Three nodes behind HAProxy, the testers' gateways (at ``parts_per_second``, or
    ``parts_per_second(s)`` for nodes that took ``s`` seconds to start) and
    three /ws/live clients through it; ``disrupt(nodes, t0, landed)`` runs meanwhile
    (``t0``: when records first reached every client; ``landed()``: it says when its last
    disruption is in place, to check that the testers were still running then); returns
    once every gateway drained
    and the clients converged (or 60 s passed: the caller's asserts then say what
    differs)."""
    text = node_toml(tmp, dsn, redis_url, f"t{os.getpid()}x{time.monotonic_ns()}")
    run = Run()
    with NodeSet(tmp / "nodes", 3, lambda i: text) as nodes:
        # the reference (once per session) is computed while the nodes start
        async with trio.open_nursery() as setup:
            async def start_nodes() -> None:
                nonlocal started_s
                t = trio.current_time()
                await trio.to_thread.run_sync(nodes.start_all, 90)
                started_s = trio.current_time() - t
            started_s = 0.0
            setup.start_soon(start_nodes)
            ref = await trio.to_thread.run_sync(reference)
        if callable(parts_per_second):
            parts_per_second = parts_per_second(started_s)
        expected, volatile, n_records = ref.expected, ref.volatile, ref.n_records
        with HAProxy(tmp / "lb", nodes.backends) as lb:
            lb.wait_states({"n0": "UP", "n1": "UP", "n2": "UP"})
            run.gateways = [GatewayProc(tmp, gw, lb.port, parts_per_second)
                            for gw in SOURCES]
            run.followers = [LiveFollower(lb.port, ["lot/#", "test/#"], f"c{i}")
                             for i in range(3)]
            run.alert_followers = [LiveFollower(lb.port, ["alert/#"], f"a{i}")
                                   for i in range(3)]
            run.gateway_follower = LiveFollower(lb.port, ["gateway/#"], "g")
            try:
                async with trio.open_nursery() as nursery:
                    for f in [*run.followers, *run.alert_followers, run.gateway_follower]:
                        nursery.start_soon(f.run)
                    for gw in run.gateways:
                        gw.start()
                    # The disruption's clock starts once records flow end to end (every
                    # client holds a lot topic): on a busy machine the processes may take
                    # seconds to start, and a Redis restart that no client sees live data
                    # across has nothing to resync (seen: only ``state_reset``s, later).
                    with trio.fail_after(90):
                        while not all(any(t.startswith("lot/") for t in f.offsets)
                                      for f in run.followers):
                            await trio.sleep(0.1)
                    async def landed() -> None:
                        for gw in run.gateways:
                            gw.produced_at_disruption = (
                                await trio.to_thread.run_sync(gw.stats))["next_rid"] - 1

                    run.events = await disrupt(nodes, trio.current_time(), landed)

                    def all_drained() -> bool:
                        return all(g.drained(n_records[g.gw]) for g in run.gateways)
                    await trio.to_thread.run_sync(
                        lambda: wait_for(all_drained, timeout=120, interval=0.5))

                    def converged() -> bool:
                        return all(comparable(f.views, volatile) == expected
                                   for f in run.followers)
                    with trio.move_on_after(60):
                        while not converged():
                            await trio.sleep(0.25)
                    # every node's mirror at the same offsets: the same answers (a node
                    # that is a few deltas behind answers what it has, as a single hub does
                    # between two frames; wait for them to agree, or the assert says how not)
                    with trio.move_on_after(20):
                        while True:
                            run.answers = await trio.to_thread.run_sync(api_answers, nodes)
                            if run.answers[0] == run.answers[1] == run.answers[2]:
                                break
                            await trio.sleep(0.5)
                    run.alerts, run.acked = await trio.to_thread.run_sync(alerts_check, nodes)
                    # the live alert topics: every alert, and the acknowledgement made on
                    # node 1, reach every dashboard client (or the asserts say what not)
                    run.acked_id = run.alerts[0]["alerts"][0]["id"]
                    want_ids = {a["id"] for a in run.alerts[0]["alerts"]}
                    with trio.move_on_after(20):
                        while not all(
                                set(ids := live_alerts(f)) == want_ids
                                and ids[run.acked_id]["acknowledged"]
                                for f in run.alert_followers):
                            await trio.sleep(0.25)
                    # each gateway's topic: every record the cluster applied, online
                    with trio.move_on_after(20):
                        while True:
                            run.totals = await trio.to_thread.run_sync(gateway_totals, dsn)
                            if gateway_views(run.gateway_follower) == {
                                    gw: (*t, True) for gw, t in run.totals.items()}:
                                break
                            await trio.sleep(0.5)
                    nursery.cancel_scope.cancel()
            finally:
                for gw in run.gateways:
                    gw.stop()
    return run


async def check_run(run: Run, dsn: str) -> None:
    """Exactly once record by record; every client's state, and every node's /api, equal to
    one uninterrupted hub's; no silent gap on any client."""
    print("disruption:", run.events, "paced at", run.gateways[0].pace,
          "records produced when it landed:",
          {g.gw: g.produced_at_disruption for g in run.gateways})
    ref = reference()
    expected, volatile, n_records = ref.expected, ref.volatile, ref.n_records
    # the disruption landed mid-run: every tester was still producing then
    for g in run.gateways:
        assert g.produced_at_disruption is not None, "the disruption never said it landed"
        assert g.produced_at_disruption < n_records[g.gw], (
            g.gw, g.produced_at_disruption, n_records[g.gw], run.events)
    # exactly once, record by record (by record id, per gateway)
    coverage = applied_rid_coverage(dsn)
    for g in run.gateways:
        assert g.last_rid >= n_records[g.gw]
        assert_exactly_once(coverage[g.gw], g.last_rid)
    # the same live state as one uninterrupted hub, on every client
    for f in run.followers:
        got = comparable(f.views, volatile)
        assert set(got) == set(expected), (f.name, set(expected) ^ set(got))
        for topic in expected:
            assert got[topic] == expected[topic], (f.name, topic, _diff(got[topic],
                                                                        expected[topic]))
    # /api: the same answers on every node, and the single hub's figures
    for i in (1, 2):
        for path, answer in run.answers[0].items():
            assert run.answers[i][path] == answer, (path, i, _diff(run.answers[i][path],
                                                                    answer))
    want = await ref.api()
    assert {k: figures(v) for k, v in run.answers[0].items()} == {
        k: figures(v) for k, v in want.items()}
    # alerts: raised once cluster-wide (one per condition, as the single hub raises them,
    # however often partitions changed owners), the same list on every node
    want_keys = ref.alert_keys
    assert want_keys, "the rule raises in the reference run"
    got_keys = sorted(a["key"] for a in run.alerts[0]["alerts"])
    assert got_keys == want_keys
    for other in run.alerts[1:]:
        assert [a["id"] for a in other["alerts"]] == [a["id"] for a in run.alerts[0]["alerts"]]
    # ... acknowledged on one node, acknowledged on all
    assert run.acked and all(run.acked)
    # ... and live on every dashboard client, through any node: each alert once, the
    # acknowledgement made on node 1 seen by all
    for f in run.alert_followers:
        live = live_alerts(f)
        assert sorted(a["key"] for a in live.values()) == want_keys, f.name
        assert live[run.acked_id]["acknowledged"] is True, f.name
    # each gateway's live topic: what the cluster applied for it (all its partitions),
    # online (connected to some node) -- as a single hub's would say
    assert run.gateway_follower is not None
    assert set(run.totals) == set(SOURCES)
    assert gateway_views(run.gateway_follower) == {
        gw: (*t, True) for gw, t in run.totals.items()}
    # no client ever saw a silent gap
    for f in [*run.followers, *run.alert_followers, run.gateway_follower]:
        assert f.silent_gaps == [], (f.name, f.silent_gaps[:5])


async def test_sigkill_three_nodes_during_a_run(tmp_path: Path, pg_dsn: str,
                                                redis_server: Any) -> None:  # noqa: F811
    async def kill_each(nodes: NodeSet, t0: float, landed: Callable[[], Awaitable[None]]
                        ) -> list[str]:
        # each kill once the previous victim is back (so one node down at a time), not at
        # fixed offsets: a restart takes 3-5 s on a busy machine, 8-14 s beside two busy
        # loops and a load of 11
        events = []
        await trio.sleep_until(t0 + 1.0)
        victims = [v for _ in range(SOAK) for v in range(3)]
        for n, victim in enumerate(victims):
            await trio.to_thread.run_sync(nodes.kill, victim)
            events.append(f"{nodes.names[victim]} killed at {trio.current_time() - t0:.1f} s")
            if n == len(victims) - 1:
                await landed()
            await trio.sleep(1.5)
            await trio.to_thread.run_sync(nodes.restart, victim, 90.0)
            events.append(f"{nodes.names[victim]} back at {trio.current_time() - t0:.1f} s")
            await trio.sleep(0.2)
        return events

    # The run must outlast three kills and two restarts: 9-12 s on a busy machine, 23 s
    # beside two busy loops (a restart then took 12 s).  A restart takes about as long as
    # the three nodes took to start together: pace the testers by that (16 s at least).
    def pace(started_s: float) -> float:
        run_s = max(16.0, 1.0 + 2 * (started_s + 2.0) + 6.0)
        return SOURCES["ate-01"]["max_parts"] / run_s
    run = await cluster_run(tmp_path, pg_dsn, redis_server.url, kill_each, pace)
    await check_run(run, pg_dsn)
    # clients moved (their node killed, HAProxy cutting the session) and resumed
    assert sum(f.connects for f in run.followers) > len(run.followers), run.events


async def test_redis_restarted_empty_mid_run(tmp_path: Path, pg_dsn: str,
                                             redis_server: Any) -> None:  # noqa: F811
    """Redis loses everything mid-run: the live epoch changes, every client resyncs
    (``epoch_changed``), leases and fences are rebuilt (fences from PostgreSQL's tokens),
    and nothing durable is lost or doubled."""
    async def restart_redis(nodes: NodeSet, t0: float, landed: Callable[[], Awaitable[None]]
                            ) -> list[str]:
        await trio.sleep_until(t0 + 2.0)
        await trio.to_thread.run_sync(redis_server.restart_empty)
        await landed()
        return [f"redis restarted empty at {trio.current_time() - t0:.1f} s"]

    run = await cluster_run(tmp_path, pg_dsn, redis_server.url, restart_redis, 160)
    await check_run(run, pg_dsn)
    for f in run.followers:
        assert any(reason == "epoch_changed" for _, reason in f.resyncs), (
            f.name, f.resyncs[:5])


async def test_postgresql_restarted_mid_run(tmp_path: Path, redis_server: Any  # noqa: F811
                                            ) -> None:
    """PostgreSQL (a private server) stops for three seconds mid-run: commits fail, the
    nodes stop acknowledging (gateways keep spooling), and resume when it is back; nothing
    is lost or applied twice, and the live state is the single hub's."""
    with private_pg() as pg:
        _, dsn = create_database(pg.dsn)

        async def restart_pg(nodes: NodeSet, t0: float, landed: Callable[[], Awaitable[None]]
                             ) -> list[str]:
            await trio.sleep_until(t0 + 1.5)
            await trio.to_thread.run_sync(pg.stop)
            stopped = trio.current_time() - t0
            await trio.sleep(3.0)
            await trio.to_thread.run_sync(pg.start)
            await landed()  # back while the testers still run: the spooled backlog and
            # the live records meet
            return [f"postgresql stopped at {stopped:.1f} s for 3 s"]

        run = await cluster_run(tmp_path, dsn, redis_server.url, restart_pg, 160)
        await check_run(run, dsn)
