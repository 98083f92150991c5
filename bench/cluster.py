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
* the **work units** behind those costs, counted, not timed (a count does not depend on how
  the processes were scheduled on a shared machine), per record in the flood and at the
  fixed rate (the fixed rate per second subtracted) and per second while idle: Redis calls
  by command (``INFO commandstats``), bytes in and out and the bytes pushed to the nodes'
  Pub/Sub connections (delivery), stream entries and deltas by topic kind; PostgreSQL
  statements by kind, rows inserted and updated, commits, write transactions (xids) and
  WAL bytes (``pg_stat_statements``, preloaded in the bench's own server); per node
  process its voluntary and involuntary context switches (all threads) and its own
  counters (``/metrics``: frames and records applied, entries published and mirrored);
* fan-out latency: from a record's creation (its ``ts``) to the delta reaching a /ws/live
  client (the lot's ``updated``), p50 and p99, for clients on a node that does NOT own the
  lot (with 1 node there is none: the owner's own client is reported instead) -- measured
  in a last paced phase with one client per node following ``lot/+``.

    python bench/cluster.py [--records 240000] [--runs 5] [--gateways 6] [--nodes 1,3]

The ratio 3 nodes / 1 node of node CPU per record is printed as the ratio of the medians
and as the median, quartiles and range of the interleaved pairs' ratios; the work units as
medians side by side with their ratio.

The machine has 2 cores shared by everything above: absolute rates are this machine's;
the per-record costs are what docs/cluster.md's sizing table is computed from.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
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

from ports import free_port  # noqa: E402

from edgegw.config import build  # noqa: E402
from edgegw.gateway.config import GatewayConfig  # noqa: E402
from edgegw.gateway.service import Gateway  # noqa: E402
from edgegw.hub.cluster.partition import partition_of  # noqa: E402
from edgegw.records import ParametricResult, PartResult  # noqa: E402
from tests.cluster_haproxy import NodeSet  # noqa: E402
from tests.cluster_pg import PrivatePg  # noqa: E402  (the test helpers: a private server)
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


class ThreadCtx:
    """Context switches of one process, all its threads: ``/proc/<pid>/status`` counts the
    main thread's only (a node's PostgreSQL calls run in worker threads), so each thread's
    counts are kept at its last sighting; sampled in the polling loops, so a worker thread
    that ends loses at most what it did since the last poll."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.seen: dict[int, tuple[int, int]] = {}

    def sample(self) -> tuple[int, int]:
        try:
            tids = os.listdir(f"/proc/{self.pid}/task")
        except OSError:
            tids = []
        for tid in tids:
            try:
                text = Path(f"/proc/{self.pid}/task/{tid}/status").read_text()
            except OSError:
                continue
            vol = invol = 0
            for line in text.splitlines():
                if line.startswith("voluntary_ctxt_switches:"):
                    vol = int(line.split()[1])
                elif line.startswith("nonvoluntary_ctxt_switches:"):
                    invol = int(line.split()[1])
            old = self.seen.get(int(tid), (0, 0))
            self.seen[int(tid)] = (max(old[0], vol), max(old[1], invol))
        return (sum(v for v, _ in self.seen.values()), sum(n for _, n in self.seen.values()))


#: the nodes' own work counters (``/metrics``), summed over the nodes
NODE_COUNTERS = ("hub_frames_applied_total", "hub_records_applied_total",
                 "cluster_owner_records_total", "cluster_published_entries_total",
                 "cluster_mirror_entries_total", "live_deltas_published_total",
                 "live_frames_total", "live_encodes_total")

#: the bench's own commands and queries, left out of the counts
BENCH_REDIS_CMDS = {"info", "client|list", "hscan", "xinfo|stream"}
BENCH_SQL_TAG = "/* bench */"


def prometheus_counters(text: str) -> dict[str, float]:
    """``name -> value`` summed over labels, for the ``NODE_COUNTERS``."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line[0] == "#":
            continue
        name = line.split("{", 1)[0].split(" ", 1)[0]
        short = name.removeprefix("edgegw_")
        if short in NODE_COUNTERS:
            out[short] = out.get(short, 0.0) + float(line.rsplit(" ", 1)[1])
    return out


class Resp:
    """A minimal blocking RESP2 client on one connection that counts its own bytes, so the
    bench's reads are taken out of Redis's byte counters exactly."""

    def __init__(self, port: int, prefix: str = "bench") -> None:
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.file = self.sock.makefile("rb")
        self.prefix = prefix
        self.sent = 0
        self.received = 0

    def close(self) -> None:
        self.file.close()
        self.sock.close()

    def send(self, *args: str) -> None:
        parts = [a.encode() for a in args]
        data = b"*%d\r\n" % len(parts) + b"".join(b"$%d\r\n%s\r\n" % (len(x), x)
                                                  for x in parts)
        self.sock.sendall(data)
        self.sent += len(data)

    def read(self) -> Any:
        line = self.file.readline()
        self.received += len(line)
        kind, rest = line[:1], line[1:-2]
        if kind == b"+":
            return rest.decode()
        if kind == b"-":
            raise RuntimeError(rest.decode())
        if kind == b":":
            return int(rest)
        if kind == b"$":
            n = int(rest)
            if n < 0:
                return None
            data = self.file.read(n + 2)
            self.received += n + 2
            return data[:-2]
        n = int(rest)
        return [self.read() for _ in range(n)] if n >= 0 else None

    def work(self) -> dict[str, float]:
        """This Redis (shard): calls by command (``INFO commandstats``: a script's own
        commands are counted too, under their names), bytes in and out (the bench's own
        taken out), the bytes written to the Pub/Sub connections (delivery: ``CLIENT LIST``
        names them, ``ss`` counts what each node's socket acked), and per topic kind the
        stream entries and offsets (deltas) published so far."""
        self.send("INFO", "stats", "commandstats")
        # INFO counts every byte read before it, this command's too, and every byte
        # written before its own reply
        own_in, own_out = self.sent, self.received
        info = self.read().decode()
        out: dict[str, float] = {}
        for line in info.splitlines():
            if line.startswith("cmdstat_"):
                name, rest = line.split(":", 1)
                cmd = name.removeprefix("cmdstat_")
                if cmd not in BENCH_REDIS_CMDS:
                    out[f"redis cmd {cmd}"] = int(rest.split(",", 1)[0].split("=", 1)[1])
            elif line.startswith("total_net_input_bytes:"):
                out["redis input bytes"] = int(line.split(":", 1)[1]) - own_in
            elif line.startswith("total_net_output_bytes:"):
                out["redis output bytes"] = int(line.split(":", 1)[1]) - own_out
        out["redis commands"] = sum(v for k, v in out.items() if k.startswith("redis cmd "))
        self.send("CLIENT", "LIST")
        subscribers: set[str] = set()
        for line in self.read().decode().splitlines():
            fields = dict(kv.split("=", 1) for kv in line.split(" ") if "=" in kv)
            if "P" in fields.get("flags", ""):
                subscribers.add(fields["addr"].rsplit(":", 1)[1])
        port = self.sock.getpeername()[1]
        sockets = subprocess.run(["ss", "-tinH", "state", "established", "(", "sport", "=",
                                  f":{port}", ")"], capture_output=True, text=True).stdout
        pushed = 0
        peer = None
        for line in sockets.splitlines():
            if not line.startswith((" ", "\t")):
                peer = line.split()[-1].rsplit(":", 1)[1]
            elif peer in subscribers:
                for token in line.split():
                    if token.startswith("bytes_acked:"):
                        pushed += int(token.split(":", 1)[1])
        out["redis bytes to subscribers"] = pushed
        self.send("HSCAN", f"{self.prefix}:heads", "0", "COUNT", "100000")
        flat = self.read()[1]
        heads = {flat[i].decode(): int(flat[i + 1]) for i in range(0, len(flat), 2)}
        for topic in heads:
            self.send("XINFO", "STREAM", f"{self.prefix}:s:{topic}")
        for topic, head in heads.items():
            kind = topic.split("/", 1)[0]
            out[f"redis topic deltas {kind}"] = out.get(f"redis topic deltas {kind}", 0) + head
            try:
                reply = self.read()
            except RuntimeError:  # a topic gone: its stream expired
                continue
            added = dict(zip(reply[::2], reply[1::2], strict=True)).get(b"entries-added", 0)
            out[f"redis topic entries {kind}"] = (out.get(f"redis topic entries {kind}", 0)
                                                  + int(added))
        return out


class Probe:
    """Work counters of one cluster, read at a window's bounds: Redis per command and bytes,
    PostgreSQL statements, rows, transactions and WAL, and per node process its context
    switches and own work counters.  Counts, not times: they do not depend on how the
    processes were scheduled."""

    def __init__(self, nodes: NodeSet, dsn: str, redis_ports: list[int]) -> None:
        import psycopg

        self.nodes = nodes
        self.redis = [Resp(port) for port in redis_ports]
        self.ctx = [ThreadCtx(p.pid) for p in nodes.procs if p is not None]
        self.conn = psycopg.connect(dsn, autocommit=True)  # one, not one per poll

    def close(self) -> None:
        self.conn.close()
        for r in self.redis:
            r.close()

    def applied(self) -> int:
        row = self.conn.execute(f"{BENCH_SQL_TAG} SELECT COALESCE(SUM(records_applied), 0) "
                                "FROM edgegw_gateways").fetchone()
        return int(row[0]) if row else 0

    def counters(self) -> dict[str, float]:
        total: dict[str, float] = {}
        for port in self.nodes.ports:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=60) as r:
                for k, v in prometheus_counters(r.read().decode()).items():
                    total[k] = total.get(k, 0.0) + v
        return total

    def owned(self) -> float:
        return self.counters().get("cluster_owner_records_total", 0.0)

    def sample_ctx(self) -> None:
        for c in self.ctx:
            c.sample()

    def pg_work(self) -> dict[str, float]:
        out: dict[str, float] = {}
        rows = self.conn.execute(
            f"{BENCH_SQL_TAG} SELECT query, calls, rows FROM pg_stat_statements s "
            "JOIN pg_database d ON d.oid = s.dbid WHERE d.datname = current_database()"
        ).fetchall()
        for query, calls, n in rows:
            if query.startswith(BENCH_SQL_TAG):
                continue
            kind = query.split(None, 1)[0].upper() if query.strip() else "?"
            if kind not in ("SELECT", "INSERT", "UPDATE", "DELETE", "BEGIN", "COMMIT",
                            "ROLLBACK", "WITH"):
                kind = "other"
            out[f"pg {kind} calls"] = out.get(f"pg {kind} calls", 0) + calls
            if kind in ("INSERT", "UPDATE", "DELETE", "WITH"):
                out[f"pg {kind} rows"] = out.get(f"pg {kind} rows", 0) + n
        out["pg statements"] = sum(v for k, v in out.items() if k.endswith(" calls")
                                   and k not in ("pg BEGIN calls", "pg COMMIT calls",
                                                 "pg ROLLBACK calls"))
        xid, wal = self.conn.execute(
            f"{BENCH_SQL_TAG} SELECT pg_snapshot_xmax(pg_current_snapshot())::text::bigint, "
            "pg_current_wal_lsn() - '0/0'::pg_lsn").fetchone()  # type: ignore[misc]
        out["pg transactions with writes (xids)"] = int(xid)
        out["pg WAL bytes"] = float(wal)
        return out

    def snapshot(self) -> dict[str, float]:
        """Blocking: call it in a thread."""
        out: dict[str, float] = {}
        for shard in self.redis:  # summed over the shards
            for k, v in shard.work().items():
                out[k] = out.get(k, 0.0) + v
        out.update(self.pg_work())
        for i, c in enumerate(self.ctx):
            vol, invol = c.sample()
            out[f"node{i} ctx switches voluntary"] = vol
            out[f"node{i} ctx switches involuntary"] = invol
        out["nodes ctx switches voluntary"] = sum(
            v for k, v in out.items() if k.endswith("ctx switches voluntary"))
        out["nodes ctx switches involuntary"] = sum(
            v for k, v in out.items() if k.endswith("ctx switches involuntary")
            and k.startswith("node") and not k.startswith("nodes"))
        for k, v in self.counters().items():
            out[f"nodes {k}"] = v
        return out


def self_cpu() -> float:
    """This process's CPU (the bench's gateways and clients)."""
    return cpu_seconds(os.getpid())


def delta(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
    return {k: b.get(k, 0.0) - a.get(k, 0.0) for k in set(a) | set(b)}


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


async def push_paced(gw: Gateway, lot: str, rate: float, seconds: float,
                     touchdowns: int = 1) -> int:
    """``rate`` records/s for ``seconds``, in touchdowns of 72 records (8 parts), sent
    ``touchdowns`` at a time (the gateway's frame holds what arrives within 50 ms)."""
    parts = make_parts(lot)
    sent = 0
    i = 0
    start = trio.current_time()
    while trio.current_time() - start < seconds:
        now = time.time()
        for _ in range(touchdowns):
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


def per_record(d: dict[str, float], idle: dict[str, float], seconds: float,
               records: int) -> dict[str, float]:
    """Work per record of a window: its counts minus the fixed rate times its length."""
    return {k: (v - idle.get(k, 0.0) * seconds) / max(1, records) for k, v in d.items()}


async def one_run(nodes: NodeSet, pg: PrivatePg, pg_cpu: PgCpu, redis_pid: int,
                  probe: Probe, n_records: int, n_gateways: int, tmp: Path,
                  paced_rate: float, paced_seconds: float, flood_follow: bool = False,
                  idle_seconds: float = 6.0, paced_touchdowns: int = 1) -> dict[str, Any]:
    import psycopg

    n_nodes = len(nodes.ports)
    lots = lots_spread(n_gateways)
    dsn = pg.dsn.replace("dbname=postgres", "dbname=edgegw")
    per_gw = -(-(n_records // n_gateways) // 72) * 72  # whole touchdowns: push sends it

    def db_bytes() -> int:
        with psycopg.connect(dsn) as conn:
            row = conn.execute("SELECT pg_database_size('edgegw')").fetchone()
            assert row is not None
            return int(row[0])

    async def applied() -> int:
        return await trio.to_thread.run_sync(probe.applied)

    async def owned() -> float:
        probe.sample_ctx()
        return await trio.to_thread.run_sync(probe.owned)

    async def snapshot() -> dict[str, float]:
        return await trio.to_thread.run_sync(probe.snapshot)

    owners: dict[str, str] = {}
    for i in range(n_nodes):
        st = get_json(f"http://127.0.0.1:{nodes.ports[i]}/api/stats")
        for p in st["cluster"]["ownership"]["owned"]:
            owners[str(p)] = nodes.names[i]
    base_applied = await applied()
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
        # so a short flood does not charge it to its records.  The bench polls here as it
        # does in the windows below (PostgreSQL, every node's /metrics): its polling is
        # part of the fixed rate then, not of the records.
        w_idle0 = await snapshot()
        i_cpu0 = [cpu_seconds(p.pid) for p in procs]
        i_pg0, i_redis0, i_self0 = pg_cpu.sample(), cpu_seconds(redis_pid), self_cpu()
        t_idle = time.perf_counter()
        polls = 0
        while time.perf_counter() - t_idle < idle_seconds:
            await applied()
            if polls % 4 == 0:
                await owned()
            polls += 1
            await trio.sleep(0.05)
        span = time.perf_counter() - t_idle
        idle_rate = [(cpu_seconds(p.pid) - a) / span for a, p in zip(i_cpu0, procs, strict=True)]
        idle_pg = (pg_cpu.sample() - i_pg0) / span
        idle_redis = (cpu_seconds(redis_pid) - i_redis0) / span
        idle_self = (self_cpu() - i_self0) / span
        work_idle = {k: v / span for k, v in delta(w_idle0, await snapshot()).items()}
        owned0 = await owned()
        w_flood0 = await snapshot()
        cpu0 = [cpu_seconds(p.pid) for p in procs]
        pg0 = pg_cpu.sample()
        redis0 = cpu_seconds(redis_pid)
        self0 = self_cpu()
        t0 = time.perf_counter()
        async with trio.open_nursery() as pushers:
            for g, (gw, _) in enumerate(gws):
                pushers.start_soon(push, gw, lots[g], per_gw)
        while await applied() - base_applied < per_gw * n_gateways:
            probe.sample_ctx()
            await trio.sleep(0.05)
        ingest_s = time.perf_counter() - t0
        # The window ends when the owners' live state has taken every record too (and a
        # flush later): a node whose owners lag would otherwise leave their work outside
        # the window and look cheaper per record (one loaded node lags the most).
        with trio.move_on_after(120):
            while await owned() - owned0 < per_gw * n_gateways:
                await trio.sleep(0.2)  # every node's /metrics: not too often (its CPU)
        await trio.sleep(0.2)
        elapsed = time.perf_counter() - t0
        cpu1 = [cpu_seconds(p.pid) for p in nodes.procs if p is not None]
        pg1 = pg_cpu.sample()
        redis1 = cpu_seconds(redis_pid)
        self1 = self_cpu()
        w_flood = delta(w_flood0, await snapshot())
        bytes1 = await trio.to_thread.run_sync(db_bytes)
        await trio.sleep(2.0)  # the backlog of deltas is published
        # CPU per record at one fixed rate, the same for every node count: a flood runs
        # each configuration at its own speed, and the work paid per second of activity
        # (publisher flushes and snapshots of the active topics, checkpoints) then
        # divides by different rates.  No /ws/live client yet (unless --flood-follow).
        sent: list[int] = []

        async def paced(gw: Gateway, lot: str) -> None:
            sent.append(await push_paced(gw, lot, paced_rate / n_gateways, paced_seconds,
                                         paced_touchdowns))

        owned_p0 = await owned()
        w_paced0 = await snapshot()
        p_cpu0 = [cpu_seconds(p.pid) for p in procs]
        p_pg0, p_redis0 = pg_cpu.sample(), cpu_seconds(redis_pid)
        t_p = time.perf_counter()
        async with trio.open_nursery() as pushers:
            for g, (gw, _) in enumerate(gws):
                pushers.start_soon(paced, gw, lots[g])
        with trio.move_on_after(60):
            while await owned() - owned_p0 < sum(sent):
                await trio.sleep(0.2)
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
            "work_paced": per_record(delta(w_paced0, await snapshot()), work_idle,
                                     p_elapsed, sum(sent)),
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
        "live_lag_s": elapsed - ingest_s, "flood_window_s": elapsed,
        "rate_per_node": [r / ingest_s for r in by_node],
        "cluster_node_cpu_us_per_record": 1e6 * sum(node_cpu) / total,
        "idle_cpu_per_node": statistics.mean(idle_rate),
        "idle_cpu_by_node": idle_rate,
        "idle_pg": idle_pg, "idle_redis": idle_redis, "idle_bench": idle_self,
        "idle_redis_cmds_per_s": work_idle.get("redis commands", 0.0),
        # gross: everything the node spent during the flood; net: minus its fixed rate
        "cluster_node_gross_us_per_record": 1e6 * sum(gross) / total,
        "node_net_us_by_node": [1e6 * c / total for c in node_cpu],
        "pg_cpu_us_per_record": 1e6 * max(0.0, pg1 - pg0 - idle_pg * elapsed) / total,
        "redis_cpu_us_per_record": 1e6 * max(0.0, redis1 - redis0 - idle_redis * elapsed)
        / total,
        "bench_cpu_us_per_record": 1e6 * (self1 - self0) / total,
        "pg_bytes_per_record": (bytes1 - base_bytes) / total,
        "redis_cmds_per_record": per_record(w_flood, work_idle, elapsed, total)[
            "redis commands"],
        # topic stream entries published by owners, and applied by all mirrors together
        "entries_per_record": w_flood.get("nodes cluster_published_entries_total", 0) / total,
        "mirrored_per_record": w_flood.get("nodes cluster_mirror_entries_total", 0) / total,
        "work_idle": work_idle,
        "work_flood": per_record(w_flood, work_idle, elapsed, total),
        "work_flood_gross": per_record(w_flood, {}, elapsed, total),
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
        # statements and rows per record: pg_stat_statements counts at each statement's
        # end (pg_stat_database's counters reach the view only when a backend flushes
        # them -- up to 10 s later for an idle one, PostgreSQL 15 -- too late for a window)
        with open(pg.data / "postgresql.conf", "a") as conf:
            conf.write("\nshared_preload_libraries = 'pg_stat_statements'\n")
        pg.start()
        redis_port = free_port()
        redis = subprocess.Popen(["redis-server", "--port", str(redis_port), "--save", "",
                                  "--appendonly", "no", "--bind", "127.0.0.1"],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            import psycopg

            with psycopg.connect(pg.dsn, autocommit=True) as conn:
                conn.execute("CREATE DATABASE edgegw")
            dsn = pg.dsn.replace("dbname=postgres", "dbname=edgegw")
            with psycopg.connect(dsn, autocommit=True) as conn:
                conn.execute("CREATE EXTENSION pg_stat_statements")
            postmaster = int((pg.data / "postmaster.pid").read_text().split()[0])
            dsn = pg.dsn.replace("dbname=postgres", "dbname=edgegw")
            text = (NODE_TOML.replace("@DATA@", str(tmp / "data")).replace("@DSN@", dsn)
                    .replace("@REDIS@", f"redis://127.0.0.1:{redis_port}/0")
                    .replace("@P@", str(PARTITIONS)))
            text += "".join(f'\n[gateways.bench-{g}]\ntoken = "bench"\n'
                            for g in range(args.gateways))
            with NodeSet(tmp / "nodes", n_nodes, lambda i: text) as nodes:
                nodes.start_all(timeout=120)
                probe = Probe(nodes, dsn, [redis_port])
                try:
                    yield {"nodes": nodes, "pg": pg, "postmaster": postmaster,
                           "redis": redis, "redis_port": redis_port, "tmp": tmp,
                           "n": n_nodes, "probe": probe}
                finally:
                    probe.close()
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
    for label, w in (("flood", r["work_flood"]), ("fixed rate", r["work_paced"])):
        print(f"    work per record, {label} (fixed rate subtracted): Redis "
              f"{w.get('redis commands', 0):.4f} cmds, {w.get('redis input bytes', 0):.2f} B "
              f"in, {w.get('redis output bytes', 0):.2f} B out (to subscribers "
              f"{w.get('redis bytes to subscribers', 0):.2f} B); PG "
              f"{w.get('pg statements', 0):.4f} statements, "
              f"{w.get('pg COMMIT calls', 0):.5f} commits, "
              f"{w.get('pg INSERT rows', 0):.4f} rows inserted, "
              f"{w.get('pg UPDATE rows', 0):.4f} updated, {w.get('pg WAL bytes', 0):.1f} B WAL; "
              f"node ctx switches {w.get('nodes ctx switches voluntary', 0):.4f} voluntary ("
              + ", ".join(f"{w.get(f'node{i} ctx switches voluntary', 0):.4f}"
                          for i in range(r["nodes"]))
              + f"), {w.get('nodes ctx switches involuntary', 0):.4f} involuntary ("
              + ", ".join(f"{w.get(f'node{i} ctx switches involuntary', 0):.4f}"
                          for i in range(r["nodes"])) + ")", flush=True)


#: work counters shown in the summary, in this order (then every other Redis command)
WORK_ROWS = (
    "redis commands", "redis input bytes", "redis output bytes", "redis bytes to subscribers",
    "pg statements", "pg BEGIN calls", "pg COMMIT calls", "pg ROLLBACK calls",
    "pg transactions with writes (xids)", "pg SELECT calls", "pg INSERT calls",
    "pg INSERT rows", "pg UPDATE calls", "pg UPDATE rows", "pg DELETE calls", "pg DELETE rows",
    "pg WITH calls", "pg WITH rows", "pg other calls", "pg WAL bytes",
    "nodes ctx switches voluntary", "nodes ctx switches involuntary",
    *(f"nodes {c}" for c in NODE_COUNTERS),
)


def _ratio(a: float, b: float) -> str:
    if abs(a) < 1e-9:
        return "--" if abs(b) < 1e-9 else "new"
    return f"x{b / a:.2f}"


def work_table(results: dict[int, list[dict[str, Any]]], one: int, many: int) -> None:
    """Work units per record (flood, fixed rate) and per second (idle), medians, side by
    side with the ratio: counts, which scheduling does not change."""
    def med(n: int, field: str, key: str) -> float:
        return statistics.median(r[field].get(key, 0.0) for r in results[n])

    keys = set()
    for rs in results.values():
        for r in rs:
            keys |= set(r["work_flood"]) | set(r["work_idle"])
    def by_size(prefix: str) -> list[str]:
        return sorted((k for k in keys if k.startswith(prefix)),
                      key=lambda k: -abs(med(many, "work_paced", k))
                      - abs(med(many, "work_idle", k)) / 1000)

    print(f"\nwork units, medians over the runs: per 1,000 records (bytes: per record) during "
          f"the flood and at the fixed rate, the fixed rate per second subtracted; per second "
          f"while idle; {one} vs {many} node(s):")
    print(f"| | flood: {one} | {many} | {many}/{one} | fixed rate: {one} | {many} | {many}/{one} "
          f"| idle, per second: {one} | {many} | {many}/{one} |")
    print("|---|" + "---|" * 9)
    for key in (*WORK_ROWS[:4], *by_size("redis cmd "), *by_size("redis topic "),
                *WORK_ROWS[4:]):
        cells = []
        for field in ("work_flood", "work_paced", "work_idle"):
            scale = 1.0 if field == "work_idle" or "bytes" in key else 1000.0
            a, b = med(one, field, key) * scale, med(many, field, key) * scale
            # (below 0.005 is noise of the fixed rate's subtraction: shown as 0)
            a, b = (0.0 if abs(x) < 0.005 else x for x in (a, b))
            cells += [f"{a:.2f}", f"{b:.2f}", _ratio(a, b)]
        if all(c in ("0.00", "-0.00", "--") for c in cells):
            continue
        print(f"| {key} | " + " | ".join(cells) + " |")
    cells = []
    for field in ("work_flood", "work_paced"):
        a, b = (1 / (med(n, field, "nodes hub_frames_applied_total") or float("nan"))
                for n in (one, many))
        cells += [f"{a:.4g}", f"{b:.4g}", _ratio(a, b)]
    print("| records per frame (gateways batch what arrives in 50 ms) | " + " | ".join(cells)
          + " | | | |")


def _ms(lat: tuple[float, float, int]) -> str:
    p50, p99, n = lat
    if n == 0:
        return "n/a"
    return f"{p50 * 1000:.0f}/{p99 * 1000:.0f} ms (n={n})"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--records", type=int, default=240_000)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--gateways", type=int, default=6)
    ap.add_argument("--nodes", default="1,3")
    ap.add_argument("--idle-seconds", type=float, default=6.0,
                    help="window in which each process's fixed cost per second is measured")
    ap.add_argument("--paced-rate", type=float, default=6000.0,
                    help="records/s (all gateways) while fan-out latency is measured")
    ap.add_argument("--paced-seconds", type=float, default=6.0)
    ap.add_argument("--paced-touchdowns", type=int, default=1,
                    help="touchdowns of 72 records sent at once in the fixed-rate phase: "
                         "its frames' size (the fan-out latency phase sends 1 at a time)")
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
                             c["redis"].pid, c["probe"], args.records, args.gateways,
                             c["tmp"] / f"run{run}", args.paced_rate, args.paced_seconds,
                             args.flood_follow, args.idle_seconds, args.paced_touchdowns)
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
            q = statistics.quantiles(per_run, n=4) if len(per_run) > 1 else per_run * 3
            print(f"node CPU per record ({label}), 3 nodes / 1 node: x{ratio:.2f} (ratio of "
                  f"the medians); interleaved pairs: median x{statistics.median(per_run):.2f}, "
                  f"quartiles x{q[0]:.2f}-x{q[2]:.2f}, range x{min(per_run):.2f}-"
                  f"x{max(per_run):.2f} ({', '.join(f'x{x:.2f}' for x in per_run)})")
        # the same pairs for the main work counts: their spread is the batching's (a node
        # that falls behind commits several frames at once), not the scheduler's noise
        for key in ("redis commands", "redis bytes to subscribers", "pg statements",
                    "pg COMMIT calls", "pg WAL bytes"):
            per_run = [b["work_paced"].get(key, 0.0) / (a["work_paced"].get(key) or float("nan"))
                       for a, b in zip(results[1], results[3], strict=True)]
            print(f"{key} per record at the fixed rate, 3 nodes / 1 node, interleaved pairs: "
                  f"median x{statistics.median(per_run):.2f}, range x{min(per_run):.2f}-"
                  f"x{max(per_run):.2f} ({', '.join(f'x{x:.2f}' for x in per_run)})")
        work_table(results, 1, 3)


if __name__ == "__main__":
    main()
