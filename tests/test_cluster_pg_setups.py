"""Cluster nodes on the PostgreSQL setups a floor's DBA may give them (docs/cluster.md,
"Behind PgBouncer" and "A database's default isolation level"):

- behind a connection pooler in transaction mode: the distribution's real PgBouncer
  between the nodes' stores and PostgreSQL, with fewer server connections than the nodes
  have, so each transaction may run on any of them.  Before, every commit failed there
  from psycopg's sixth run of a query on ('prepared statement "_pg3_0" already exists'):
  it prepares a query server-side after five runs;
- on a database whose default isolation level is SERIALIZABLE or REPEATABLE READ (set
  for other applications).  Before, concurrent commits and claims failed with
  serialization errors, reported as "PostgreSQL unavailable" and retried;
- on a database with a statement_timeout shorter than a store's statement (here a commit
  waiting for its gateway's row).  Before, the statement it cancelled (57014) was reported
  as "PostgreSQL unavailable" and tried again, to be cancelled again.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg.conninfo
import pytest
import trio
from cluster_pg import private_pg, with_db
from ports import free_port

from edgegw.hub.cluster.pgstore import ClusterStore
from edgegw.hub.store import FrameToApply
from edgegw.protocol import encode_body
from edgegw.records import PartResult, Record

EPOCH = "epoch-1"


def pgbouncer_binary() -> str | None:
    return shutil.which("pgbouncer") or (
        "/usr/sbin/pgbouncer" if os.path.exists("/usr/sbin/pgbouncer") else None)


@contextlib.contextmanager
def pgbouncer(pg_dsn: str) -> Iterator[str]:
    """``pg_dsn`` through a PgBouncer of the test's own in transaction mode, two server
    connections for every client."""
    binary = pgbouncer_binary()
    if binary is None:
        why = "no pgbouncer (apt-get install pgbouncer; scripts/test.sh installs it as root)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"needed under CI=true: {why}")
        pytest.skip(why)
    server = psycopg.conninfo.conninfo_to_dict(pg_dsn)
    port = free_port()
    # not under pytest's tmp_path: root's 0700 directory, closed to the postgres user
    directory = Path(tempfile.mkdtemp(prefix="edgegw-pgbouncer-", dir="/var/tmp"))
    (directory / "users.txt").write_text(f'"{server.get("user", "postgres")}" ""\n')
    (directory / "pgbouncer.ini").write_text(f"""\
[databases]
* = host={server.get("host", "127.0.0.1")} port={server.get("port", 5432)}
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {port}
unix_socket_dir =
auth_type = trust
auth_file = {directory / "users.txt"}
pool_mode = transaction
default_pool_size = 2
max_client_conn = 100
logfile = {directory / "pgbouncer.log"}
""")
    cmd = [binary, str(directory / "pgbouncer.ini")]
    if os.geteuid() == 0:  # PgBouncer will not run as root
        entry = pwd.getpwnam("postgres")
        for path in (directory, *directory.iterdir()):
            os.chown(path, entry.pw_uid, entry.pw_gid)
        cmd = ["runuser", "-u", "postgres", "--", *cmd]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    log = directory / "pgbouncer.log"
                    raise RuntimeError("pgbouncer did not start: " + (
                        log.read_text()[-2000:] if log.exists() else "no log")) from None
                time.sleep(0.05)
        yield psycopg.conninfo.make_conninfo(**{**server, "host": "127.0.0.1",  # type: ignore[arg-type]
                                                "port": str(port)})
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        shutil.rmtree(directory, ignore_errors=True)


def frame(gateway: str, seq: int, n: int = 5) -> FrameToApply:
    first_rid = (seq - 1) * n + 1
    records: list[Record] = [
        PartResult("tester", 1.0 + r, "L1", "", 1, r % 4, f"p{r}", None, None, 1, 1, True)
        for r in range(first_rid, first_rid + n)]
    return FrameToApply(gateway, EPOCH, seq, first_rid, n, encode_body(first_rid, records),
                        records=records)


@pytest.fixture(params=["pgbouncer", "serializable", "repeatable read"])
def setup_dsn(request: pytest.FixtureRequest, pg_dsn: str) -> Iterator[str]:
    """``pg_dsn`` through PgBouncer, or with its database's default isolation changed."""
    if request.param == "pgbouncer":
        with pgbouncer(pg_dsn) as dsn:
            yield dsn
        return
    dbname = psycopg.conninfo.conninfo_to_dict(pg_dsn)["dbname"]
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(f"ALTER DATABASE {dbname} SET default_transaction_isolation = "
                     f"'{request.param}'")
    yield pg_dsn


async def test_two_nodes_apply_every_frame_once_on_any_postgresql_setup(
        setup_dsn: str) -> None:
    nodes = [ClusterStore(setup_dsn, f"node-{i}", partitions=8) for i in range(2)]
    for node in nodes:
        await node.open()
    gateways = [f"ate-{i:02d}" for i in range(3)]
    frames_each = 30
    try:
        async def stream(gateway: str) -> None:
            gen = (await nodes[0].claim(gateway, EPOCH)).generation
            for seq in range(1, frames_each + 1):
                node = nodes[seq % 2]  # alternate nodes: each has its own connections
                if seq % 10 == 0:  # the gateway moves: a new claim, a new fence
                    gen = (await node.claim(gateway, EPOCH)).generation
                with trio.fail_after(60):  # (a failed commit raises: no retry here)
                    assert await node.commit([frame(gateway, seq)], {gateway: gen}) == set()
            # and again: every one a duplicate, none applied twice
            again = [frame(gateway, seq) for seq in range(1, frames_each + 1)]
            skipped = await nodes[1].commit(again, {gateway: gen})
            assert skipped == {(gateway, EPOCH, seq) for seq in range(1, frames_each + 1)}
            assert all(f.seq_reused == 0 for f in again)

        async with trio.open_nursery() as nursery:
            for gateway in gateways:
                nursery.start_soon(stream, gateway)
        for gateway in gateways:
            claim = await nodes[1].claim(gateway, EPOCH)
            assert claim.applied.ranges() == [(1, frames_each)]
            assert claim.rids is not None and claim.rids.ranges() == [(1, 5 * frames_each)]
        logged = 0
        for partition in range(8):
            logged += sum(len(chunk.records) for chunk in await nodes[0].read_partition(
                partition, 0, limit=10_000))
        assert logged == len(gateways) * frames_each * 5
        stats = await nodes[0].all_gateway_stats()
        assert {gw: stats[gw].records_applied for gw in gateways} == {
            gw: 5 * frames_each for gw in gateways}
    finally:
        for node in nodes:
            await node.close()


async def test_a_dbas_statement_timeout_does_not_cancel_a_commit_that_runs_longer(
        pg_dsn: str) -> None:
    """A DBA set ``statement_timeout`` = 1 s on the database, for other applications.  A
    commit waiting 2.5 s for its gateway's row (held here by another session; in a
    cluster, a paused node's or a slow commit's) waits, then commits."""
    dbname = psycopg.conninfo.conninfo_to_dict(pg_dsn)["dbname"]
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(f"ALTER DATABASE {dbname} SET statement_timeout = '1s'")
    store = ClusterStore(pg_dsn, "node-a", partitions=8)
    await store.open()
    holder = await trio.to_thread.run_sync(
        lambda: psycopg.connect(pg_dsn, options="-c statement_timeout=0"))
    try:
        gen = (await store.claim("ate-01", EPOCH)).generation
        assert await store.commit([frame("ate-01", 1)], {"ate-01": gen}) == set()
        await trio.to_thread.run_sync(lambda: holder.execute(
            "SELECT 1 FROM edgegw_gateways WHERE gateway_id = 'ate-01' FOR UPDATE"))
        done = trio.Event()
        waited = 0.0

        async def commit() -> None:
            nonlocal waited
            start = trio.current_time()
            with trio.fail_after(60):
                assert await store.commit([frame("ate-01", 2)], {"ate-01": gen}) == set()
            waited = trio.current_time() - start
            done.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(commit)
            await trio.sleep(2.5)
            assert not done.is_set()  # it waits for the row: the holder has it
            await trio.to_thread.run_sync(holder.rollback)
        assert waited >= 2.5  # past the DBA's 1 s, and committed
        claim = await store.claim("ate-01", EPOCH)
        assert claim.applied.ranges() == [(1, 2)]
        assert store.unavailable is None
    finally:
        await trio.to_thread.run_sync(holder.close)
        await store.close()


def wal_writer_delay(dsn: str, setting: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"ALTER SYSTEM SET wal_writer_delay = '{setting}'")
        conn.execute("SELECT pg_reload_conf()")


async def test_acknowledged_frames_survive_a_postgresql_crash_with_synchronous_commit_off(
        caplog: pytest.LogCaptureFixture) -> None:
    """A database set to ``synchronous_commit = off`` returns from COMMIT before its WAL is
    on disk; a frame acknowledged then is lost in a crash of the server (here: an
    immediate stop, the WAL writer held back 10 s).  Each commit of frames sets it on."""
    with private_pg() as server:
        with psycopg.connect(server.dsn, autocommit=True) as conn:
            conn.execute("CREATE DATABASE durable")
            conn.execute("ALTER DATABASE durable SET synchronous_commit = off")
        wal_writer_delay(server.dsn, "10s")  # the longest: every commit is at risk
        dsn = with_db(server.dsn, "durable")
        store = ClusterStore(dsn, "node-a", partitions=8)
        await store.open()
        assert store.force_synchronous_commit
        assert any("synchronous_commit is off" in r.getMessage() for r in caplog.records)
        try:
            gen = (await store.claim("ate-01", EPOCH)).generation
            for seq in range(1, 11):  # each acknowledged: returned from commit
                assert await store.commit([frame("ate-01", seq)], {"ate-01": gen}) == set()
        finally:
            await store.close()
        await trio.to_thread.run_sync(server.stop, "immediate")  # a crash: no shutdown
        await trio.to_thread.run_sync(server.start)
        store = ClusterStore(dsn, "node-a", partitions=8)
        await store.open()
        try:
            claim = await store.claim("ate-01", EPOCH)
            assert claim.applied.ranges() == [(1, 10)]
        finally:
            await store.close()
