"""A hub cluster node paused (SIGSTOP) past its leases while it owns partitions and a gateway
streams to it, then resumed (docs/cluster.md, "A node paused").

Two node processes on a real PostgreSQL and a real Redis behind a real HAProxy, one gateway
process.  Node 0 is paused while it owns partitions and the gateway streams to it: either it
freezes itself at its ``cluster.checkpoint`` failpoint (the ``stop`` action: SIGSTOP to
itself) -- the worst moment for a pause: it has decided, as owner, to write a checkpoint
under its lease token and is about to send it -- or the test SIGSTOPs it at whatever it is
doing once records flow (pending deltas, a read, a commit).  While it sleeps its
leases lapse, node 1 takes every partition over and the gateway moves to node 1 through
HAProxy.  Then node 0 gets SIGCONT and goes on exactly where it stopped, and:

* it writes nothing as owner with its lapsed lease: no checkpoint, partition figures or
  alert is stored after its wake-up under a token older than node 1's (fencing);
* every record the gateway produced is in PostgreSQL exactly once;
* node 0 rejoins (owns partitions again) and the cluster keeps serving to the end.

Or node 0 freezes inside an open PostgreSQL transaction, holding row locks node 1 needs: in
a commit (failpoint ``cluster.mid_commit``: the gateway's row and partition heads, which the
gateway's HELLO on node 1 and node 1's commits lock) or in a checkpoint's write
(``cluster.mid_checkpoint``: the partition's fence row, which node 1's claim of the partition
locks).  PostgreSQL ends the paused node's session after ``pg_idle_in_transaction_timeout_s``
(the lease TTL by default) and its locks go with it; a claim waiting meanwhile gives up after
``pg_lock_timeout_s`` and tries again.  Frozen in the middle of a statement (``mid_stream``
may land in a commit's ``executemany``, half sent) its session is active, not idle, and
no timeout of PostgreSQL ends it: node 1's claim or commit that timed out on its row ends
it (``pg_terminate_backend``: another node's transaction older than the lease TTL).  So in
every case node 1 takes every partition, and the gateway, within a bound derived from the
config.
"""

from __future__ import annotations

import os
import signal
import socket
import time
from pathlib import Path
from typing import Any

import pytest
from cluster_redis import RedisServer, fresh_prefix, redis_server  # noqa: F401
from test_cluster_nodes import (
    SOURCES,
    GatewayProc,
    applied_rid_coverage,
    assert_exactly_once,
    count_tester_records,
)

from tests.cluster_haproxy import HAProxy, NodeSet, haproxy_binary, node_toml
from tests.processes import get_json, wait_for

pytestmark = pytest.mark.skipif(
    haproxy_binary() is None and os.environ.get("CI") != "true",
    reason="haproxy not installed (scripts/test.sh installs it as root)")

PARTITIONS = 4
GATEWAY = "ate-01"
#: a run of ~15 s (1800 parts at 120/s): the pause, the takeover and the wake-up land in it
PACE = 120
#: node_toml's lease TTL and gateway heartbeat; the PostgreSQL timeouts default to the TTL
LEASE_TTL_S = 2.0
HEARTBEAT_S = 1.0
#: a paused node's locks are freed ``pg_idle_in_transaction_timeout_s`` after it stopped
#: (its leases lapse meanwhile); a claim that waited on them tries again within
#: ``pg_lock_timeout_s``; the gateway notices the silence within 2 heartbeats.  Plus a
#: generous margin for a loaded machine (planning rounds, HAProxy's checks, reconnect
#: backoff): on the old code, with no timeouts, the takeover never happened at all.
TAKEOVER_BOUND_S = LEASE_TTL_S + LEASE_TTL_S + LEASE_TTL_S + 2 * HEARTBEAT_S + 30
#: where node 0 freezes: failpoints armed at its start (None: SIGSTOPped by the test)
FREEZE_AT = {
    "at_its_checkpoint": "cluster.checkpoint=stop",
    "mid_stream": None,
    # its 10th commit: the gateway streams to it, the gateway's row is locked
    "in_its_commit": "cluster.mid_commit=10:stop",
    # its first checkpoint's transaction, the partition's fence row share-locked
    "in_its_checkpoint_write": "cluster.mid_checkpoint=stop",
}


def config(tmp: Path, dsn: str, redis_url: str, prefix: str, i: int) -> str:
    # Node 0 checkpoints every second (its first one is where it freezes); node 1 not
    # within the test, so a stale checkpoint of node 0 would not be hidden by a newer one.
    interval = 1 if i == 0 else 600
    return node_toml(tmp / "data", dsn, redis_url, prefix, partitions=PARTITIONS,
                     cluster=f"checkpoint_records = 1000000\n"
                             f"checkpoint_interval_s = {interval}") + \
        f'\n[gateways.{GATEWAY}]\ntoken = "tok-{GATEWAY}"\n'


def process_state(pid: int) -> str:
    """The process's state letter in /proc (``T``: stopped)."""
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


def owned(port: int) -> list[int]:
    result: list[int] = get_json(f"http://127.0.0.1:{port}/api/stats",
                                 timeout=5)["cluster"]["ownership"]["owned"]
    return result


def taken_over(port: int) -> bool:
    """The node owns every partition and has caught each up: it claimed each in PostgreSQL
    (a partition whose claim waits is listed as owned, not caught up) and rebuilt it."""
    ownership = get_json(f"http://127.0.0.1:{port}/api/stats", timeout=5)["cluster"]["ownership"]
    return bool(ownership["owned"] == list(range(PARTITIONS))
                and ownership["caught_up"] == PARTITIONS)


def lease_tokens(redis_port: int, prefix: str) -> dict[int, tuple[str, int]]:
    """Each partition's lease in Redis: ``(holder, token)``."""
    out = {}
    with socket.create_connection(("127.0.0.1", redis_port), timeout=2) as s:
        f = s.makefile("rb")
        for p in range(PARTITIONS):
            key = f"{prefix}:lease:partition:{p}".encode()
            s.sendall(b"*2\r\n$3\r\nGET\r\n$%d\r\n%s\r\n" % (len(key), key))
            head = f.readline()
            if head.startswith(b"$-1"):
                continue
            value = f.read(int(head[1:]) + 2)[:-2].decode()
            node, token = value.rsplit(":", 1)
            out[p] = (node, int(token))
    return out


def owner_rows_since(dsn: str, since: float) -> list[tuple[str, int, int]]:
    """``(table, partition, token)`` of every owner write stored at or after ``since``."""
    import psycopg

    with psycopg.connect(dsn) as conn:
        rows: list[Any] = conn.execute(
            "SELECT 'checkpoint', partition, token FROM edgegw_partition_checkpoints"
            " WHERE at >= %s UNION ALL"
            " SELECT 'state', partition, token FROM edgegw_partition_state WHERE updated >= %s"
            " UNION ALL SELECT 'alert', partition, token FROM edgegw_alerts WHERE updated >= %s",
            (since, since, since)).fetchall()
    return [(t, int(p), int(k)) for t, p, k in rows]


@pytest.mark.parametrize("when", list(FREEZE_AT))
def test_a_node_paused_past_its_leases_is_fenced_off_and_rejoins(
        tmp_path: Path, pg_dsn: str, redis_server: RedisServer,  # noqa: F811
        when: str) -> None:
    prefix = fresh_prefix()
    n_records = count_tester_records(SOURCES[GATEWAY])
    with NodeSet(tmp_path / "nodes", 2,
                 lambda i: config(tmp_path, pg_dsn, redis_server.url, prefix, i)) as nodes:
        failpoint = FREEZE_AT[when]
        nodes.start(0, env={"EDGEGW_FAILPOINTS": failpoint} if failpoint else None)
        nodes.start(1)
        pid = nodes.procs[0].pid  # type: ignore[union-attr]
        gw: GatewayProc | None = None
        try:
            nodes.wait_healthy(0, 90)
            nodes.wait_healthy(1, 90)
            with HAProxy(tmp_path / "lb", nodes.backends) as lb:
                # the gateway's connection lands on node 0: node 1 is out of the
                # balancer until it has
                lb.command("disable server nodes/n1")
                gw = GatewayProc(tmp_path, GATEWAY, lb.port, PACE)
                gw.start()
                wait_for(lambda: gw.stats()["connected"], timeout=60)
                lb.command("enable server nodes/n1")

                # node 0 freezes at its first checkpoint, owning partitions, mid-run (it is
                # the home of partitions 0-2 and keeps two of them: one holds L100 or L101)
                # -- or is frozen by us once records flow
                if when == "mid_stream":
                    wait_for(lambda: owned(nodes.ports[0]) and gw.stats()["next_rid"] > 2000,
                             timeout=60, interval=0.05)
                    os.kill(pid, signal.SIGSTOP)
                wait_for(lambda: process_state(pid) == "T", timeout=60, interval=0.05)
                deadline = time.monotonic() + TAKEOVER_BOUND_S
                assert gw.stats()["next_rid"] - 1 < n_records, "paused after the tester ended"
                # its leases lapse; node 1 takes every partition over and the gateway
                # moves to node 1 (HAProxy sees node 0's /healthz fail) -- also when node 0
                # froze holding row locks that node 1's claims wait for
                wait_for(lambda: taken_over(nodes.ports[1]), timeout=TAKEOVER_BOUND_S)
                taken = lease_tokens(redis_server.port, prefix)
                assert {node for node, _ in taken.values()} == {"node-1"}
                wait_for(lambda: gw.stats()["connected"],
                         timeout=max(0.1, deadline - time.monotonic()))

                woke = time.time()
                os.kill(pid, signal.SIGCONT)
                # node 0 carries on where it stopped -- with a checkpoint to write under a
                # lapsed lease -- and then rejoins: it owns partitions again
                wait_for(lambda: owned(nodes.ports[0]), timeout=60)
                assert process_state(pid) != "T"

                wait_for(lambda: gw.drained(n_records), timeout=120)
                # fencing: nothing stored after the wake-up under a token older than the
                # one node 1 took each partition with (tokens only grow: a write with an
                # older one is the paused node acting on a lease it had lost)
                stale = [(table, p, token) for table, p, token in owner_rows_since(pg_dsn, woke)
                         if token < taken[p][1]]
                assert stale == [], f"written as owner after its lease lapsed: {stale}"
                coverage = applied_rid_coverage(pg_dsn)[GATEWAY]
                assert_exactly_once(coverage, gw.last_rid)
                # the cluster still serves: both nodes healthy, every partition owned
                assert nodes.healthz(0)["status"] == "ok" and nodes.healthz(1)["status"] == "ok"
                wait_for(lambda: sorted(owned(nodes.ports[0]) + owned(nodes.ports[1]))
                         == list(range(PARTITIONS)), timeout=30)
        finally:
            if nodes.procs[0] is not None and nodes.procs[0].poll() is None:
                os.kill(pid, signal.SIGCONT)  # a stopped process would not even die
            if gw is not None:
                gw.stop()
