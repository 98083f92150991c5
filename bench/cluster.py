"""Hub cluster on this machine: 1 node and 3 nodes (issue 14, docs/cluster.md "Sizing").

Everything runs here: a private PostgreSQL (initdb in a temp dir, so its CPU is ours to
count), a private Redis, N ``edgegw hub`` node processes, and in this process G gateways
(each its own lot, spread over the nodes round robin, no load balancer: the balancer's own
cost is not the hub's) that put synthetic tester records (8 parametric + 1 part result per
part, like the simulated tester), plus one /ws/live client per node following every lot.

Every cluster is up at once and their runs interleave (1, 3, 1, 3, ...), so 1 and 3
nodes see the same machine load.  Printed per run, then as medians side by side:

* each process's **fixed cost per second**: its CPU rate with the cluster up, the gateways
  connected and no records flowing (leases, heartbeats, health checks, polls, ticks),
  measured in the same run -- nodes one by one, PostgreSQL, Redis, this process;
* **CPU per record at a fixed rate** (``--paced-rate`` over ``--paced-seconds``, the same
  for every node count, no /ws/live client): each node's CPU minus its fixed cost, summed
  over nodes, over the records -- the figure that must not grow with the node count;
  PostgreSQL's and Redis's likewise;
* the same during a **flood** (records as fast as the nodes take them; the window ends
  when the owners' live state has taken every record, not at the last commit), gross and
  net of the fixed cost: records/s, how long the live state lagged the last commit;
* PostgreSQL bytes per record, Redis commands per record, stream entries per record;
* fan-out latency: from a record's creation (its ``ts``) to the delta reaching a /ws/live
  client (the lot's ``updated``), p50 and p99, for clients on a node that does NOT own the
  lot (with 1 node there is none: the owner's own client is reported instead) -- measured
  in a last paced phase with one client per node following ``lot/+``.

    python bench/cluster.py [--records 240000] [--runs 3] [--gateways 6] [--nodes 1,3]

The machine has 2 cores shared by everything above: absolute rates are this machine's;
the per-record costs are what docs/cluster.md's sizing table is computed from.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import trio

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

from cluster_pg import PrivatePg  # noqa: E402  (the test helpers: a private server)
from ports import free_port  # noqa: E402

from edgegw.config import build  # noqa: E402
from edgegw.gateway.config import GatewayConfig  # noqa: E402
from edgegw.gateway.service import Gateway  # noqa: E402
from edgegw.hub.cluster.partition import partition_of  # noqa: E402
from edgegw.records import ParametricResult, PartResult  # noqa: E402
from tests.cluster_haproxy import NodeSet  # noqa: E402
from tests.wsclient import WsClient  # noqa: E402

PARTITIONS = 16
TICK = os.sysconf("SC_CLK_TCK")

NODE_TOML = """\
[hub]
listen = "127.0.0.1"
port = {port}
data_dir = "@DATA@/{node}"
max_records_per_frame = 50000

[hub.cluster]
node_id = "{node}"
postgres_dsn = "@DSN@"
redis_url = "@REDIS@"
key_prefix = "bench"
partitions = @P@
lease_ttl_s = 3.0
checkpoint_records = 200000
checkpoint_interval_s = 10
"""


def cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / TICK  # utime, stime


def children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            if ppid == pid:
                out.append(int(entry))
    return out


class PgCpu:
    """CPU of a PostgreSQL server: the postmaster and every backend (backends come and
    go: each one's CPU is remembered at its last sighting)."""

    def __init__(self, postmaster: int) -> None:
        self.postmaster = postmaster
        self.seen: dict[int, float] = {}

    def sample(self) -> float:
        for pid in [self.postmaster, *children(self.postmaster)]:
            self.seen[pid] = max(self.seen.get(pid, 0.0), cpu_seconds(pid))
        return sum(self.seen.values())


def self_cpu() -> float:
    """This process's CPU (the bench's gateways and clients)."""
    return cpu_seconds(os.getpid())


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=60) as r:  # a node catching up answers late
        return json.loads(r.read())


def make_parts(lot: str) -> list[list[Any]]:
    parts = []
    for i in range(64):
        recs: list[Any] = [ParametricResult("tester", 0.0, lot, 1, i % 8, str(i), 100 + t,
                                            f"TEST_{t}", 1.0 + t * 0.01, 0.0, 2.0, "V", True)
                           for t in range(8)]
        recs.append(PartResult("tester", 0.0, lot, "W1", 1, i % 8, str(i), i % 50, i // 50,
                               1, 1, True, False, 0, 120, 8))
        parts.append(recs)
    return parts


def lots_spread(n: int) -> list[str]:
    """``n`` lot ids in ``n`` different partitions (so owners differ)."""
    out: list[str] = []
    used: set[int] = set()
    i = 0
    while len(out) < n:
        lot = f"BLOT{i:04d}"
        p = partition_of(lot, PARTITIONS)
        if p not in used:
            used.add(p)
            out.append(lot)
        i += 1
    return out


async def push(gw: Gateway, lot: str, n_records: int) -> int:
    parts = make_parts(lot)
    sent = 0
    i = 0
    while sent < n_records:
        now = time.time()
        group = [r._replace(ts=now) for p in parts[i % 8 * 8: i % 8 * 8 + 8] for r in p]
        await gw.sink.put(group, source="tester")
        sent += len(group)
        i += 1
    await gw.flush()
    return sent


async def push_paced(gw: Gateway, lot: str, rate: float, seconds: float) -> int:
    """``rate`` records/s for ``seconds``, in touchdowns of 72 records (8 parts)."""
    parts = make_parts(lot)
    sent = 0
    i = 0
    start = trio.current_time()
    while trio.current_time() - start < seconds:
        now = time.time()
        group = [r._replace(ts=now) for p in parts[i % 8 * 8: i % 8 * 8 + 8] for r in p]
        await gw.sink.put(group, source="tester")
        sent += len(group)
        i += 1
        await trio.sleep_until(start + sent / rate)
    await gw.flush()
    return sent


class LatencyClient:
    """A /ws/live client on one node: for each delta of a lot topic, now - the newest
    record time it carries (the lot's ``updated``)."""

    def __init__(self, port: int, node: str) -> None:
        self.port = port
        self.node = node
        self.samples: dict[str, list[float]] = {}  # lot -> latencies
        self.measuring = False  # only the paced phase is measured

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        ws = await WsClient.connect(self.port, "/ws/live", subprotocols=["edgegw.live.v1.json"])
        await ws.send(json.dumps({"type": "subscribe", "id": 1, "topics": ["lot/+"]}))
        task_status.started()
        while True:
            message = json.loads(await ws.recv())
            if message.get("type") != "batch" or not self.measuring:
                continue
            now = time.time()
            for item in message["items"]:
                if item.get("type") != "delta":
                    continue
                lot = item["topic"].split("/", 1)[1]
                for patch in item["data"]:
                    # a lot's "updated" is the newest record time it holds
                    if isinstance(patch.get("updated"), (int, float)):
                        self.samples.setdefault(lot, []).append(now - patch["updated"])


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


async def one_run(nodes: NodeSet, pg: PrivatePg, pg_cpu: PgCpu, redis_pid: int,
                  redis_port: int, n_records: int, n_gateways: int, tmp: Path,
                  paced_rate: float, paced_seconds: float, flood_follow: bool = False,
                  idle_seconds: float = 6.0) -> dict[str, Any]:
    import psycopg

    n_nodes = len(nodes.ports)
    lots = lots_spread(n_gateways)
    dsn = pg.dsn.replace("dbname=postgres", "dbname=edgegw")
    per_gw = n_records // n_gateways

    def db_bytes() -> int:
        with psycopg.connect(dsn) as conn:
            return int(conn.execute("SELECT pg_database_size('edgegw')").fetchone()[0])

    def applied() -> int:
        with psycopg.connect(dsn) as conn:
            row = conn.execute("SELECT COALESCE(SUM(records_applied), 0) FROM edgegw_gateways"
                               ).fetchone()
        return int(row[0])

    def redis_commands() -> int:
        out = subprocess.run(["redis-cli", "-p", str(redis_port), "info", "stats"],
                             capture_output=True, text=True).stdout
        for line in out.splitlines():
            if line.startswith("total_commands_processed:"):
                return int(line.split(":")[1])
        return 0

    def counters(name: str) -> float:
        total = 0.0
        for port in nodes.ports:
            value = get_json(f"http://127.0.0.1:{port}/api/stats")["metrics"].get(name, 0)
            total += sum(value.values()) if isinstance(value, dict) else value
        return total

    owners: dict[str, str] = {}
    for i in range(n_nodes):
        st = get_json(f"http://127.0.0.1:{nodes.ports[i]}/api/stats")
        for p in st["cluster"]["ownership"]["owned"]:
            owners[str(p)] = nodes.names[i]
    base_applied = await trio.to_thread.run_sync(applied)
    base_bytes = await trio.to_thread.run_sync(db_bytes)
    procs = [p for p in nodes.procs if p is not None]
    # Let the previous run's backlog drain (a node still catching up is not idle; a run
    # whose idle window still was not is printed as it is: its net figures then mean
    # nothing -- look at the fixed cost it prints).
    for _ in range(30):
        idle0 = [cpu_seconds(p.pid) for p in procs]
        await trio.sleep(1.0)
        if max(cpu_seconds(p.pid) - a for a, p in zip(idle0, procs, strict=True)) < 0.08:
            break
    clients = [LatencyClient(port, nodes.names[i]) for i, port in enumerate(nodes.ports)]
    async with trio.open_nursery() as nursery:
        if flood_follow:
            # a dashboard on every node following every lot during the flood too: each
            # node then mirrors the lot topics (a node mirrors only what its clients follow)
            for c in clients:
                await nursery.start(c.run)
        gws = []
        for g in range(n_gateways):
            node = g % n_nodes
            cfg = build(GatewayConfig, {
                "gateway": {"id": f"bench-{g}", "token": "bench",
                            "state_dir": str(tmp / f"gw{g}"),
                            "hub_url": f"ws://127.0.0.1:{nodes.ports[node]}/ws/gateway"},
                "batch": {"max_records": 2000, "max_delay_ms": 50},
                "queue": {"max_frames": 256},
            })
            gw = Gateway(cfg)
            await nursery.start(gw.run)
            gws.append((gw, node))
        await trio.sleep(1.0)  # connected (HELLO, presence) before the idle window
        # The fixed cost per second of each process, measured in this run with the cluster
        # up, the gateways connected and no records flowing (leases, heartbeats, health
        # checks, polls, ticks): reported on its own and subtracted from the flood's CPU,
        # so a short flood does not charge it to its records.
        i_cpu0 = [cpu_seconds(p.pid) for p in procs]
        i_pg0, i_redis0, i_self0 = pg_cpu.sample(), cpu_seconds(redis_pid), self_cpu()
        i_cmds0 = await trio.to_thread.run_sync(redis_commands)
        t_idle = time.perf_counter()
        await trio.sleep(idle_seconds)
        span = time.perf_counter() - t_idle
        idle_rate = [(cpu_seconds(p.pid) - a) / span for a, p in zip(i_cpu0, procs, strict=True)]
        idle_pg = (pg_cpu.sample() - i_pg0) / span
        idle_redis = (cpu_seconds(redis_pid) - i_redis0) / span
        idle_self = (self_cpu() - i_self0) / span
        idle_cmds = (await trio.to_thread.run_sync(redis_commands) - i_cmds0) / span
        base_cmds = await trio.to_thread.run_sync(redis_commands)
        published0 = await trio.to_thread.run_sync(counters, "cluster_published_entries_total")
        mirrored0 = await trio.to_thread.run_sync(counters, "cluster_mirror_entries_total")
        owned0 = await trio.to_thread.run_sync(counters, "cluster_owner_records_total")
        cpu0 = [cpu_seconds(p.pid) for p in procs]
        pg0 = pg_cpu.sample()
        redis0 = cpu_seconds(redis_pid)
        self0 = self_cpu()
        t0 = time.perf_counter()
        async with trio.open_nursery() as pushers:
            for g, (gw, _) in enumerate(gws):
                pushers.start_soon(push, gw, lots[g], per_gw)
        while await trio.to_thread.run_sync(applied) - base_applied < per_gw * n_gateways:
            await trio.sleep(0.05)
        ingest_s = time.perf_counter() - t0
        # The window ends when the owners' live state has taken every record too (and a
        # flush later): a node whose owners lag would otherwise leave their work outside
        # the window and look cheaper per record (one loaded node lags the most).
        with trio.move_on_after(120):
            while (await trio.to_thread.run_sync(counters, "cluster_owner_records_total")
                   - owned0 < per_gw * n_gateways):
                await trio.sleep(0.05)
        await trio.sleep(0.2)
        elapsed = time.perf_counter() - t0
        cpu1 = [cpu_seconds(p.pid) for p in nodes.procs if p is not None]
        pg1 = pg_cpu.sample()
        redis1 = cpu_seconds(redis_pid)
        self1 = self_cpu()
        bytes1 = await trio.to_thread.run_sync(db_bytes)
        cmds1 = await trio.to_thread.run_sync(redis_commands)
        published1 = await trio.to_thread.run_sync(counters, "cluster_published_entries_total")
        mirrored1 = await trio.to_thread.run_sync(counters, "cluster_mirror_entries_total")
        await trio.sleep(2.0)  # the backlog of deltas is published
        # CPU per record at one fixed rate, the same for every node count: a flood runs
        # each configuration at its own speed, and the work paid per second of activity
        # (publisher flushes and snapshots of the active topics, checkpoints) then
        # divides by different rates.  No /ws/live client yet (unless --flood-follow).
        sent: list[int] = []

        async def paced(gw: Gateway, lot: str) -> None:
            sent.append(await push_paced(gw, lot, paced_rate / n_gateways, paced_seconds))

        owned_p0 = await trio.to_thread.run_sync(counters, "cluster_owner_records_total")
        p_cpu0 = [cpu_seconds(p.pid) for p in procs]
        p_pg0, p_redis0 = pg_cpu.sample(), cpu_seconds(redis_pid)
        t_p = time.perf_counter()
        async with trio.open_nursery() as pushers:
            for g, (gw, _) in enumerate(gws):
                pushers.start_soon(paced, gw, lots[g])
        with trio.move_on_after(60):
            while (await trio.to_thread.run_sync(counters, "cluster_owner_records_total")
                   - owned_p0 < sum(sent)):
                await trio.sleep(0.05)
        await trio.sleep(0.2)
        p_elapsed = time.perf_counter() - t_p
        p_net = [max(0.0, cpu_seconds(p.pid) - a - idle * p_elapsed)
                 for a, p, idle in zip(p_cpu0, procs, idle_rate, strict=True)]
        paced_stats = {
            "paced_records": sum(sent), "paced_rate_real": sum(sent) / p_elapsed,
            "paced_node_us_per_record": 1e6 * sum(p_net) / max(1, sum(sent)),
            "paced_node_us_by_node": [1e6 * c / max(1, sum(sent)) for c in p_net],
            "paced_pg_us_per_record": 1e6 * max(0.0, pg_cpu.sample() - p_pg0
                                                - idle_pg * p_elapsed) / max(1, sum(sent)),
            "paced_redis_us_per_record": 1e6 * max(0.0, cpu_seconds(redis_pid) - p_redis0
                                                   - idle_redis * p_elapsed)
            / max(1, sum(sent)),
        }
        # fan-out latency at a sustainable rate (not during the flood above, where it
        # measures the backlog, and where this process -- gateways and clients -- would be
        # a slow reader the nodes drop): paced_rate records/s over all gateways
        if not flood_follow:
            for c in clients:
                await nursery.start(c.run)
        await trio.sleep(1.0)  # their snapshots
        for c in clients:
            c.measuring = True
        async with trio.open_nursery() as pushers:
            for g, (gw, _) in enumerate(gws):
                pushers.start_soon(push_paced, gw, lots[g], paced_rate / n_gateways,
                                   paced_seconds)
        await trio.sleep(1.0)
        nursery.cancel_scope.cancel()
    total = per_gw * n_gateways
    by_node = [0] * n_nodes
    for g in range(n_gateways):
        by_node[g % n_nodes] += per_gw
    gross = [b - a for a, b in zip(cpu0, cpu1, strict=True)]
    node_cpu = [max(0.0, g - idle * elapsed) for g, idle in zip(gross, idle_rate, strict=True)]
    lat_non_owner: list[float] = []
    lat_owner: list[float] = []
    for c in clients:
        for lot, samples in c.samples.items():
            owner = owners.get(str(partition_of(lot, PARTITIONS)))
            (lat_owner if owner == c.node else lat_non_owner).extend(samples)
    return {
        "nodes": n_nodes, "records": total, "seconds": ingest_s, "rate": total / ingest_s,
        "live_lag_s": elapsed - ingest_s,
        "rate_per_node": [r / ingest_s for r in by_node],
        "cluster_node_cpu_us_per_record": 1e6 * sum(node_cpu) / total,
        "idle_cpu_per_node": statistics.mean(idle_rate),
        "idle_cpu_by_node": idle_rate,
        "idle_pg": idle_pg, "idle_redis": idle_redis, "idle_bench": idle_self,
        "idle_redis_cmds_per_s": idle_cmds,
        # gross: everything the node spent during the flood; net: minus its fixed rate
        "cluster_node_gross_us_per_record": 1e6 * sum(gross) / total,
        "node_net_us_by_node": [1e6 * c / total for c in node_cpu],
        "pg_cpu_us_per_record": 1e6 * max(0.0, pg1 - pg0 - idle_pg * elapsed) / total,
        "redis_cpu_us_per_record": 1e6 * max(0.0, redis1 - redis0 - idle_redis * elapsed)
        / total,
        "bench_cpu_us_per_record": 1e6 * (self1 - self0) / total,
        "pg_bytes_per_record": (bytes1 - base_bytes) / total,
        "redis_cmds_per_record": max(0.0, cmds1 - base_cmds - idle_cmds * elapsed) / total,
        # topic stream entries published by owners, and applied by all mirrors together
        "entries_per_record": (published1 - published0) / total,
        "mirrored_per_record": (mirrored1 - mirrored0) / total,
        "latency_non_owner": (pct(lat_non_owner, 0.5), pct(lat_non_owner, 0.99),
                              len(lat_non_owner)),
        "latency_owner": (pct(lat_owner, 0.5), pct(lat_owner, 0.99), len(lat_owner)),
        **paced_stats,
    }


@contextlib.contextmanager
def cluster(n_nodes: int, args: argparse.Namespace) -> Iterator[dict[str, Any]]:
    """A private PostgreSQL, a private Redis and ``n_nodes`` node processes, up."""
    with tempfile.TemporaryDirectory(dir="/var/tmp") as tmp_s:
        tmp = Path(tmp_s)
        pg = PrivatePg()
        pg.start()
        redis_port = free_port()
        redis = subprocess.Popen(["redis-server", "--port", str(redis_port), "--save", "",
                                  "--appendonly", "no", "--bind", "127.0.0.1"],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            import psycopg

            with psycopg.connect(pg.dsn, autocommit=True) as conn:
                conn.execute("CREATE DATABASE edgegw")
            postmaster = int((pg.data / "postmaster.pid").read_text().split()[0])
            dsn = pg.dsn.replace("dbname=postgres", "dbname=edgegw")
            text = (NODE_TOML.replace("@DATA@", str(tmp / "data")).replace("@DSN@", dsn)
                    .replace("@REDIS@", f"redis://127.0.0.1:{redis_port}/0")
                    .replace("@P@", str(PARTITIONS)))
            text += "".join(f'\n[gateways.bench-{g}]\ntoken = "bench"\n'
                            for g in range(args.gateways))
            with NodeSet(tmp / "nodes", n_nodes, lambda i: text) as nodes:
                nodes.start_all(timeout=120)
                yield {"nodes": nodes, "pg": pg, "postmaster": postmaster, "redis": redis,
                       "redis_port": redis_port, "tmp": tmp, "n": n_nodes}
        finally:
            redis.terminate()
            redis.wait()
            pg.cleanup()


def report_run(r: dict[str, Any], run: int) -> None:
    n = r["nodes"]
    print(f"  {n} node(s) run {run + 1}: {r['records']} records in {r['seconds']:.2f} s = "
          f"{r['rate']:,.0f} records/s, live state done {r['live_lag_s']:.2f} s later (per node "
          f"{', '.join(f'{x:,.0f}' for x in r['rate_per_node'])})", flush=True)
    print(f"    fixed cost per second (idle, gateways connected): nodes "
          f"{', '.join(f'{x * 100:.2f}%' for x in r['idle_cpu_by_node'])} of a core; "
          f"PG {r['idle_pg'] * 100:.2f}%, Redis {r['idle_redis'] * 100:.2f}%, bench "
          f"{r['idle_bench'] * 100:.2f}%; Redis {r['idle_redis_cmds_per_s']:.1f} cmds/s",
          flush=True)
    print(f"    per record (fixed rate subtracted): nodes "
          f"{', '.join(f'{x:.2f}' for x in r['node_net_us_by_node'])} us = "
          f"{r['cluster_node_cpu_us_per_record']:.2f} us all nodes (gross "
          f"{r['cluster_node_gross_us_per_record']:.2f}); PG "
          f"{r['pg_cpu_us_per_record']:.2f}, Redis {r['redis_cpu_us_per_record']:.2f}, "
          f"bench {r['bench_cpu_us_per_record']:.2f} us; PG {r['pg_bytes_per_record']:.1f} "
          f"B/record; Redis {r['redis_cmds_per_record']:.4f} cmds/record; stream entries "
          f"{r['entries_per_record']:.4f}/record published, {r['mirrored_per_record']:.4f}"
          f"/record mirrored; fan-out non-owner p50/p99 {_ms(r['latency_non_owner'])}, "
          f"owner {_ms(r['latency_owner'])}", flush=True)
    print(f"    at a fixed {r['paced_rate_real']:,.0f} records/s ({r['paced_records']} records, "
          f"fixed rate subtracted): nodes "
          f"{', '.join(f'{x:.2f}' for x in r['paced_node_us_by_node'])} us = "
          f"{r['paced_node_us_per_record']:.2f} us all nodes; PG "
          f"{r['paced_pg_us_per_record']:.2f}, Redis {r['paced_redis_us_per_record']:.2f} us",
          flush=True)


def _ms(lat: tuple[float, float, int]) -> str:
    p50, p99, n = lat
    if n == 0:
        return "n/a"
    return f"{p50 * 1000:.0f}/{p99 * 1000:.0f} ms (n={n})"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--records", type=int, default=240_000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--gateways", type=int, default=6)
    ap.add_argument("--nodes", default="1,3")
    ap.add_argument("--idle-seconds", type=float, default=6.0,
                    help="window in which each process's fixed cost per second is measured")
    ap.add_argument("--paced-rate", type=float, default=6000.0,
                    help="records/s (all gateways) while fan-out latency is measured")
    ap.add_argument("--paced-seconds", type=float, default=6.0)
    ap.add_argument("--flood-follow", action="store_true",
                    help="connect the /ws/live clients (one per node, lot/+) before the "
                         "flood, so CPU per record includes mirroring what they follow")
    args = ap.parse_args()
    counts = [int(x) for x in args.nodes.split(",")]
    results: dict[int, list[dict[str, Any]]] = {n: [] for n in counts}
    # Every cluster up at once, their runs interleaved (1, 3, 1, 3, ...): both see the
    # same machine load, hour and background (the idle clusters' fixed costs included).
    with contextlib.ExitStack() as stack:
        clusters = {n: stack.enter_context(cluster(n, args)) for n in counts}
        time.sleep(4.0)  # leases spread over the nodes (lease_ttl_s + a round)
        for run in range(args.runs):
            for n in counts:
                c = clusters[n]
                r = trio.run(one_run, c["nodes"], c["pg"], PgCpu(c["postmaster"]),
                             c["redis"].pid, c["redis_port"], args.records, args.gateways,
                             c["tmp"] / f"run{run}", args.paced_rate, args.paced_seconds,
                             args.flood_follow, args.idle_seconds)
                results[n].append(r)
                report_run(r, run)
    summary = {}
    for n, rs in results.items():
        med = {k: statistics.median(r[k] for r in rs) for k in (
            "rate", "cluster_node_cpu_us_per_record", "cluster_node_gross_us_per_record",
            "pg_cpu_us_per_record", "redis_cpu_us_per_record", "bench_cpu_us_per_record",
            "pg_bytes_per_record", "redis_cmds_per_record", "entries_per_record",
            "mirrored_per_record", "idle_cpu_per_node", "idle_pg", "idle_redis",
            "idle_redis_cmds_per_s", "live_lag_s", "paced_node_us_per_record",
            "paced_pg_us_per_record", "paced_redis_us_per_record", "paced_rate_real")}
        med["rate_per_node"] = statistics.median(statistics.mean(r["rate_per_node"])
                                                 for r in rs)
        med["p99_non_owner_ms"] = statistics.median(
            r["latency_non_owner"][1] * 1000 for r in rs if r["latency_non_owner"][2])  \
            if any(r["latency_non_owner"][2] for r in rs) else float("nan")
        med["p99_owner_ms"] = statistics.median(r["latency_owner"][1] * 1000 for r in rs
                                                if r["latency_owner"][2]) \
            if any(r["latency_owner"][2] for r in rs) else float("nan")
        summary[n] = med
    print(f"\nmedians over {args.runs} runs, side by side:")
    rows = [
        ("records/s, whole cluster", "rate", "{:,.0f}"),
        ("records/s per node", "rate_per_node", "{:,.0f}"),
        ("fixed cost per node, idle (% of a core)", "idle_cpu_per_node", "pct"),
        ("PostgreSQL fixed cost, idle (% of a core)", "idle_pg", "pct"),
        ("Redis fixed cost, idle (% of a core)", "idle_redis", "pct"),
        ("Redis commands/s, idle", "idle_redis_cmds_per_s", "{:.1f}"),
        ("fixed rate: records/s", "paced_rate_real", "{:,.0f}"),
        ("fixed rate: node CPU per record, all nodes, fixed cost subtracted (us)",
         "paced_node_us_per_record", "{:.2f}"),
        ("fixed rate: PostgreSQL CPU per record (us)", "paced_pg_us_per_record", "{:.2f}"),
        ("fixed rate: Redis CPU per record (us)", "paced_redis_us_per_record", "{:.3f}"),
        ("flood: node CPU per record, all nodes, fixed cost subtracted (us)",
         "cluster_node_cpu_us_per_record", "{:.2f}"),
        ("flood: node CPU per record, all nodes, gross (us)",
         "cluster_node_gross_us_per_record",
         "{:.2f}"),
        ("live state done after the last commit (s)", "live_lag_s", "{:.2f}"),
        ("flood: PostgreSQL CPU per record (us)", "pg_cpu_us_per_record", "{:.2f}"),
        ("flood: Redis CPU per record (us)", "redis_cpu_us_per_record", "{:.3f}"),
        ("flood: bench process (gateways, clients) per record (us)", "bench_cpu_us_per_record",
         "{:.2f}"),
        ("PostgreSQL bytes per record", "pg_bytes_per_record", "{:.1f}"),
        ("Redis commands per record", "redis_cmds_per_record", "{:.4f}"),
        ("stream entries per record, published", "entries_per_record", "{:.4f}"),
        ("stream entries per record, mirrored", "mirrored_per_record", "{:.4f}"),
        ("fan-out p99, client on a non-owner node (ms)", "p99_non_owner_ms", "{:.0f}"),
        ("fan-out p99, client on the owner (ms)", "p99_owner_ms", "{:.0f}"),
    ]
    print("| | " + " | ".join(f"{n} node(s)" for n in summary) + " |")
    print("|---|" + "---|" * len(summary))
    for label, key, fmt in rows:
        cells = [(f"{m[key] * 100:.2f}%" if fmt == "pct" else fmt.format(m[key]))
                 for m in summary.values()]
        print(f"| {label} | " + " | ".join(cells) + " |")
    if 1 in summary and 3 in summary:
        for label, key in (("at a fixed rate", "paced_node_us_per_record"),
                           ("flood, fixed cost subtracted", "cluster_node_cpu_us_per_record"),
                           ("flood, gross", "cluster_node_gross_us_per_record")):
            ratio = summary[3][key] / (summary[1][key] or float("nan"))
            per_run = [b[key] / (a[key] or float("nan"))  # (0: an idle window not idle)
                       for a, b in zip(results[1], results[3], strict=True)]
            print(f"node CPU per record ({label}), 3 nodes / 1 node: x{ratio:.2f} "
                  f"(interleaved pairs of runs: {', '.join(f'x{x:.2f}' for x in per_run)})")


if __name__ == "__main__":
    main()
