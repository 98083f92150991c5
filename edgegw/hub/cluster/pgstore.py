"""The cluster's durable store on PostgreSQL (``ClusterStore``): docs/cluster.md,
"PostgreSQL: the durable truth".

What the exactly-once promise rests on, as with the single hub's SQLite store: a frame's
records, the (gateway, epoch) applied set and the counters are written in ONE transaction,
committed durably, before the frame is acknowledged.  Across nodes two more things hold,
both enforced by the database, never by timing:

- **the generation fence**: HELLO on any node bumps the gateway's ``generation``; every
  apply transaction locks the gateway's row (``FOR UPDATE``) and aborts with
  ``GatewaySuperseded`` unless the generation is still its connection's.  A node whose
  gateway reconnected elsewhere cannot commit one more frame of it.
- **the applied check under that lock, and the primary key**: a frame already in the
  applied set (read in the transaction, under the gateway's row lock) or in
  ``edgegw_frames`` (``ON CONFLICT DO NOTHING``) is skipped, so two transactions racing on
  one frame apply it once.

Applied records go to **per-partition logs** in the same transaction: the frame's records
split into runs of one partition (``partition.split_runs``), each run a row of
``edgegw_partition_log`` numbered by ``edgegw_partition_heads`` (``UPDATE ... SET last_pseq
= last_pseq + n RETURNING``).  The head row stays locked until the transaction ends, so
per partition pseq order is commit order: a reader tailing ``pseq > x`` never misses a row
committed later with a smaller number (a sequence or bigserial would allow that).  Heads
are locked in partition order, after the gateway rows (in gateway order): no deadlocks.

psycopg calls block: each runs in a worker thread (``trio.to_thread``) behind a
``CapacityLimiter`` of ``pg_connections``, on a connection of this store's own small pool;
the Trio thread never waits on PostgreSQL.  A connection that fails is thrown away and the
call raises ``StoreUnavailable`` (nothing was committed, or -- a commit whose answer was
lost -- it was and the retry finds its frames applied); the next call connects again.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import math
import threading
import time
import zlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple, Protocol, TypeVar

import psycopg
import trio

from ... import failpoints
from ...jsonutil import dumps
from ...metrics import Metrics
from ...protocol import FrameError, ProtocolError, decode_body, encode_body
from ...protocol.intervals import IntervalSet
from ...records import Record, RecordError, from_wire
from ...startup import StartupError
from ..archive_merge import archive_key, merge_lot_archive, merge_wafer_archive
from ..history_store import lot_row, wafer_row
from ..store import (
    FrameToApply,
    GatewayClaim,
    GatewayStats,
    GatewaySuperseded,
    LockTimeout,
    SessionEnded,
    StoredPositions,
    StoreUnavailable,
    records_not_applied,
    screen_rids,
)
from .config import without_password
from .partition import PartitionFenced, split_runs

log = logging.getLogger("edgegw.hub.cluster")

T = TypeVar("T")

#: every table starts with this (one database may hold other applications' tables)
PREFIX = "edgegw_"
#: bumped when the schema changes incompatibly (stored in edgegw_meta)
SCHEMA_VERSION = 1
#: the advisory lock key under which the first node creates the schema ("edgegw" in hex)
_SCHEMA_LOCK = 0x6564676577
#: the database's clock (the transaction's start) as Unix seconds: ``applied_at`` is dated,
#: and retention cuts, by it -- one clock for every node (docs/cluster.md "Clocks")
_DB_NOW = "extract(epoch FROM now())::double precision"

def _schema_complete(conn: psycopg.Connection[Any]) -> bool:
    """Every table, index and added column ``SCHEMA`` names exists already."""
    import re

    relations = re.findall(r"CREATE (?:TABLE|INDEX) IF NOT EXISTS (\w+)", SCHEMA)
    columns = re.findall(r"ALTER TABLE (\w+) ADD COLUMN IF NOT EXISTS (\w+)", SCHEMA)
    # and the columns added in a DO block (only when missing: see there)
    columns += re.findall(r"table_name = '(\w+)'\s+AND column_name = '(\w+)'", SCHEMA)
    for name in relations:
        row = conn.execute("SELECT to_regclass(%s)", (name,)).fetchone()
        if row is None or row[0] is None:
            return False
    for table, column in columns:
        if conn.execute("SELECT 1 FROM information_schema.columns WHERE table_schema = "
                        "current_schema() AND table_name = %s AND column_name = %s",
                        (table, column)).fetchone() is None:
            return False
    return True


SCHEMA = """
CREATE TABLE IF NOT EXISTS edgegw_meta (
    key text PRIMARY KEY,
    value text NOT NULL
);
CREATE TABLE IF NOT EXISTS edgegw_gateways (
    gateway_id text PRIMARY KEY,
    generation bigint NOT NULL DEFAULT 0,
    node_id text,
    claimed_at double precision,
    epoch text,
    frames_applied bigint NOT NULL DEFAULT 0,
    records_applied bigint NOT NULL DEFAULT 0,
    duplicates_dropped bigint NOT NULL DEFAULT 0,
    frames_rejected bigint NOT NULL DEFAULT 0,
    frames_lost bigint NOT NULL DEFAULT 0,
    last_seq bigint NOT NULL DEFAULT 0,
    last_seen double precision,
    last_rid bigint
);
DO $$ BEGIN
  -- a cluster made before last_rid: only then ALTER (an exclusive lock on this hot table
  -- at every start would deadlock with the running nodes' commits), and before anything
  -- below locks another table a commit writes (it waits for the commits, no deadlock)
  IF NOT EXISTS (SELECT 1 FROM information_schema.columns WHERE table_schema =
                 current_schema() AND table_name = 'edgegw_gateways'
                 AND column_name = 'last_rid') THEN
    ALTER TABLE edgegw_gateways ADD COLUMN last_rid bigint;
  END IF;
END $$;
CREATE TABLE IF NOT EXISTS edgegw_applied (
    gateway_id text NOT NULL,
    epoch text NOT NULL,
    ranges text NOT NULL,
    updated double precision NOT NULL,
    rids text NOT NULL DEFAULT '[]',
    PRIMARY KEY (gateway_id, epoch)
);
DO $$ BEGIN
  -- a cluster made before the record-id check (as for last_rid: a hot table, only then)
  IF NOT EXISTS (SELECT 1 FROM information_schema.columns WHERE table_schema =
                 current_schema() AND table_name = 'edgegw_applied'
                 AND column_name = 'rids') THEN
    ALTER TABLE edgegw_applied ADD COLUMN rids text NOT NULL DEFAULT '[]';
  END IF;
END $$;
CREATE TABLE IF NOT EXISTS edgegw_frames (
    gateway_id text NOT NULL,
    epoch text NOT NULL,
    seq bigint NOT NULL,
    first_rid bigint NOT NULL,
    n_records integer NOT NULL,
    node_id text NOT NULL,
    applied_at double precision NOT NULL,
    PRIMARY KEY (gateway_id, epoch, seq)
);
CREATE INDEX IF NOT EXISTS edgegw_frames_applied_at ON edgegw_frames (applied_at);
CREATE TABLE IF NOT EXISTS edgegw_rejected (
    id bigserial PRIMARY KEY,
    gateway_id text NOT NULL,
    epoch text NOT NULL,
    seq bigint NOT NULL,
    reason text NOT NULL,
    node_id text NOT NULL,
    at double precision NOT NULL,
    body bytea
);
CREATE TABLE IF NOT EXISTS edgegw_partition_heads (
    partition integer PRIMARY KEY,
    last_pseq bigint NOT NULL DEFAULT 0,
    log_bytes bigint NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS edgegw_partition_log (
    partition integer NOT NULL,
    pseq bigint NOT NULL,
    gateway_id text NOT NULL,
    epoch text NOT NULL,
    seq bigint NOT NULL,
    first_rid bigint NOT NULL,
    n_records integer NOT NULL,
    applied_at double precision NOT NULL,
    body bytea NOT NULL,
    PRIMARY KEY (partition, pseq)
);
CREATE TABLE IF NOT EXISTS edgegw_partition_checkpoints (
    partition integer PRIMARY KEY,
    pseq bigint NOT NULL,
    token bigint NOT NULL,
    blob bytea NOT NULL,
    at double precision NOT NULL
);
CREATE TABLE IF NOT EXISTS edgegw_alerts (
    id text PRIMARY KEY,
    partition integer NOT NULL,
    token bigint NOT NULL,
    priority text NOT NULL,
    rule text NOT NULL,
    raised_at double precision NOT NULL,
    acknowledged boolean NOT NULL DEFAULT false,
    acked_by text,
    acked_at double precision,
    data text NOT NULL,
    updated double precision NOT NULL
);
CREATE INDEX IF NOT EXISTS edgegw_alerts_raised ON edgegw_alerts (raised_at);
ALTER TABLE edgegw_alerts ADD COLUMN IF NOT EXISTS pending boolean NOT NULL DEFAULT true;
ALTER TABLE edgegw_alerts ADD COLUMN IF NOT EXISTS fed text NOT NULL DEFAULT '';
CREATE INDEX IF NOT EXISTS edgegw_alerts_pending ON edgegw_alerts (id) WHERE pending;
-- when an alert was last written, by the database's clock (hub.retain_history_days)
ALTER TABLE edgegw_alerts ADD COLUMN IF NOT EXISTS written_at double precision NOT NULL
    DEFAULT extract(epoch FROM now());
CREATE INDEX IF NOT EXISTS edgegw_alerts_written ON edgegw_alerts (written_at);
-- the alert feed's webhook outbox: one row per (webhook, event), written before the event
-- is sent; ``outcome`` set once it is finished with (delivered, refused, ...).  A new holder
-- of the feed sends again what has none (docs/cluster.md, "Webhooks across a takeover").
CREATE TABLE IF NOT EXISTS edgegw_webhook_outbox (
    url text NOT NULL,
    event_key text NOT NULL,
    payload text NOT NULL,
    queued_at double precision NOT NULL,
    outcome text,
    PRIMARY KEY (url, event_key)
);
CREATE INDEX IF NOT EXISTS edgegw_webhook_outbox_open ON edgegw_webhook_outbox (queued_at)
    WHERE outcome IS NULL;
CREATE TABLE IF NOT EXISTS edgegw_partition_state (
    partition integer PRIMARY KEY,
    token bigint NOT NULL,
    data text NOT NULL,
    updated double precision NOT NULL
);
CREATE TABLE IF NOT EXISTS edgegw_lots (
    lot_id text PRIMARY KEY,
    updated double precision NOT NULL,
    summary text NOT NULL,
    archive text NOT NULL,
    parts bigint NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS edgegw_wafers (
    lot_id text NOT NULL,
    wafer_id text NOT NULL,
    updated double precision NOT NULL,
    summary text NOT NULL,
    snapshot text NOT NULL,
    parts bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (lot_id, wafer_id)
);
-- archives written by partition owners (save_archives): the log position that made each
-- (written once: a replay after an ownership move makes it at the same pseq again), the
-- owner's lease token (a stale owner is fenced off), and for wafers the order they left
-- memory (kept when a row is replaced, as the single hub's rowid).  Added to tables that
-- were never written before this: the ALTERs lock nothing a commit waits on.
ALTER TABLE edgegw_lots ADD COLUMN IF NOT EXISTS pseq bigint NOT NULL DEFAULT 0;
ALTER TABLE edgegw_lots ADD COLUMN IF NOT EXISTS token bigint NOT NULL DEFAULT 0;
ALTER TABLE edgegw_wafers ADD COLUMN IF NOT EXISTS pseq bigint NOT NULL DEFAULT 0;
ALTER TABLE edgegw_wafers ADD COLUMN IF NOT EXISTS token bigint NOT NULL DEFAULT 0;
ALTER TABLE edgegw_wafers ADD COLUMN IF NOT EXISTS ord bigint GENERATED BY DEFAULT AS IDENTITY;
-- when a row was last written, by the database's clock (hub.retain_history_days): rows from
-- before the column are dated by when it was added (now() is taken once for them)
ALTER TABLE edgegw_lots ADD COLUMN IF NOT EXISTS archived_at double precision NOT NULL
    DEFAULT extract(epoch FROM now());
ALTER TABLE edgegw_wafers ADD COLUMN IF NOT EXISTS archived_at double precision NOT NULL
    DEFAULT extract(epoch FROM now());
CREATE INDEX IF NOT EXISTS edgegw_lots_updated ON edgegw_lots (updated);
-- each partition's newest owner: the lease token it claimed the partition with before
-- reading or writing anything of it (claim_partition).  Every owner write is refused under
-- an older token, whether or not the new owner has written that row yet: a node that
-- wakes from a pause (SIGSTOP, a frozen VM) with a lapsed lease is fenced off at once.
CREATE TABLE IF NOT EXISTS edgegw_partition_fences (
    partition integer PRIMARY KEY,
    token bigint NOT NULL
);
CREATE TABLE IF NOT EXISTS edgegw_positions (
    gateway_id text PRIMARY KEY,
    epoch text NOT NULL,
    seq bigint NOT NULL,
    positions bytea NOT NULL,
    updated double precision NOT NULL
);
"""

#: the tables, for sizing (``table_bytes``) and for tests that drop a cluster's database
TABLES = ("meta", "gateways", "applied", "frames", "rejected", "partition_heads",
          "partition_log", "partition_checkpoints", "partition_state", "alerts", "lots",
          "wafers", "partition_fences", "webhook_outbox", "positions")

_ZLIB_LEVEL = 6  # as the SQLite store: ~10 B/record at ~600k records/s

_STAT_COLS = ("epoch", "frames_applied", "records_applied", "duplicates_dropped",
              "frames_rejected", "frames_lost", "last_seq", "last_seen")


class GatewayTotals(NamedTuple):
    """A gateway's records and frames applied cluster-wide, its highest record id
    applied and the time of its last commit (PostgreSQL's counters: the same on every
    node) -- what a single hub's ``gateway/<id>`` topic counts."""

    records: int
    frames: int
    last_rid: int | None
    last_seen: float | None


class PartitionMismatch(StartupError):
    """The node's ``hub.cluster.partitions`` differs from the cluster's (stored in
    PostgreSQL by its first node): lots would change partitions.  The node must not start
    (a StartupError: ``edgegw hub`` exits 3 with this one line)."""


class ShardMismatch(StartupError):
    """The node's Redis shards (``hub.cluster.redis_urls``) are not the cluster's: another
    number of them than the cluster's first node stored in PostgreSQL, or a shard whose
    identity (``{prefix}:shard`` in it) names another index or another cluster.  A
    partition's lease, fence and topics would be on another Redis than the other nodes look
    at, so a partition could have two owners, or none.  The node must not start (exit 3,
    this one line)."""


class ShardLabels(Protocol):
    """Each Redis shard's identity, read and written in the shard itself (the cluster
    bus: ``ClusterBus``): ``<shards id>/<index>`` under the cluster's key prefix."""

    redis_urls: list[str]

    async def read_shard_labels(self) -> list[str | None]: ...

    async def claim_shard_labels(self, shards_id: str, shards: Sequence[int]
                                 ) -> list[str | None]: ...

    def shard_labels_checked(self, shards_id: str) -> None: ...


#: seconds a node starting next to running ones waits for them to label a shard that lost
#: its data (they do at their next epoch check, about a second) before it refuses
LABEL_GRACE_S = 3.0


@dataclasses.dataclass(frozen=True)
class LogChunk:
    """One row of a partition's log: a run of one frame's records, all of this partition,
    with consecutive record ids from ``first_rid``."""

    pseq: int
    gateway_id: str
    first_rid: int
    records: list[Record]
    epoch: str = ""
    seq: int = 0


@dataclasses.dataclass
class _Chunk:
    partition: int
    gateway: str
    epoch: str
    seq: int
    first_rid: int
    n_records: int
    body: bytes  # zlib of the CBOR body [first_rid, sources, records] (the frame format)


#: SQLSTATEs of PostgreSQL ending a session: admin shutdown (pg_terminate_backend, or a
#: server shutting down), idle-in-transaction timeout, idle session timeout
SESSION_ENDED = ("57P01", "25P03", "57P05")


def _is_connection_error(exc: BaseException) -> bool:
    """A failure of the server or the link, which passes (the call may be tried again),
    as against a bug in a statement."""
    if isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError):
        return True
    # "the database system is shutting down / starting up", admin shutdown; 25P03: the
    # server ended the session of a transaction left idle too long (this node was paused);
    # 25006: a server that takes no writes (a standby not promoted yet, read-only mode) --
    # it passes like an outage, and is no bug of the statement
    sqlstate = getattr(exc, "sqlstate", None) or ""
    return sqlstate.startswith(("08", "57P", "25P03", "25006"))


def _chunks_of(frame: FrameToApply, n_partitions: int) -> list[_Chunk]:
    """A frame's records as partition-log chunks.  A frame whose records are all of one
    partition (the usual case: one lot) is stored as it came, body unchanged; a mixed one
    is cut at the run boundaries (each run's records encoded again)."""
    records = frame.record_list()
    if records is None:
        raise ValueError(f"frame {frame.gateway}/{frame.seq}: the cluster store needs its "
                         "decoded records (FrameToApply.records)")
    runs = split_runs(frame.gateway, records, n_partitions)
    if not runs:
        return []
    if len(runs) == 1:
        p = runs[0][0]
        return [_Chunk(p, frame.gateway, frame.epoch, frame.seq, frame.first_rid,
                       len(records), zlib.compress(frame.body, _ZLIB_LEVEL))]
    out = []
    for p, start, stop in runs:
        # from the records (CBOR encoding is about twice as fast as decoding the body)
        body = encode_body(frame.first_rid + start, records[start:stop])
        out.append(_Chunk(p, frame.gateway, frame.epoch, frame.seq, frame.first_rid + start,
                          stop - start, zlib.compress(body, _ZLIB_LEVEL)))
    return out


def decode_chunk(body: bytes, max_records: int = 1 << 30) -> tuple[int, list[Record]]:
    """A partition-log body to (first_rid, records)."""
    first_rid, sources, wire = decode_body(zlib.decompress(body), max_records)
    try:
        return first_rid, [from_wire(item, sources) for item in wire]
    except (RecordError, TypeError) as exc:
        raise FrameError(f"bad record in a partition log chunk: {exc}") from None


class ClusterStore:
    """The cluster's durable store: one per node.  All methods are async; PostgreSQL
    work runs in worker threads on this store's own connections.

    A bench or a test drives it alone: ``ClusterStore(dsn, node_id="bench")``, ``open``,
    ``claim_gateway``, ``commit`` frames with their records (``FrameToApply.records``)."""

    def __init__(self, dsn: str, node_id: str, partitions: int = 64,
                 connections: int = 4, connect_timeout_s: float = 3.0,
                 redis_shards: int | None = None,
                 idle_in_transaction_timeout_s: float = 0.0, lock_timeout_s: float = 0.0,
                 metrics: Metrics | None = None) -> None:
        self.dsn = dsn
        #: PostgreSQL ends a session of this store whose transaction sits idle this long
        #: (the process is paused) and so frees its row locks (0: the server's setting)
        self.idle_in_transaction_timeout_s = idle_in_transaction_timeout_s
        #: a claim or commit waits at most this long for a row lock, then raises
        #: ``LockTimeout`` (0: the server's setting, by default forever)
        self.lock_timeout_s = lock_timeout_s
        #: a claim or commit that gave up waiting (``lock_timeout_s``) ends the session
        #: holding its row if it is another node's whose transaction is older than this,
        #: by the database's clock (0: never): the idle timeout, else the lock timeout
        self.stuck_after_s = idle_in_transaction_timeout_s or lock_timeout_s
        self.m_lock_timeouts = (metrics or Metrics()).counter(
            "cluster_pg_lock_timeouts_total",
            "claims and commits that gave up waiting for a PostgreSQL row lock after "
            "pg_lock_timeout_s (and were tried again), by call: claim_gateway, "
            "claim_partition or commit")
        self.m_sessions_ended = (metrics or Metrics()).counter(
            "cluster_pg_sessions_ended_total",
            "another node's PostgreSQL sessions this node ended (pg_terminate_backend): each "
            "held a row a claim or commit waited for, in a transaction open longer than the "
            "lease TTL (a paused or cut-off node), by call: claim_gateway, claim_partition "
            "or commit")
        self.m_session_ended = (metrics or Metrics()).counter(
            "cluster_pg_session_ended_total",
            "calls whose PostgreSQL session the server ended (tried again on a new one), "
            "by SQLSTATE: 57P01 ended by another node or an operator (or a shutdown), "
            "25P03 idle in transaction too long (this node was paused), 57P05 idle")
        self.node_id = node_id
        self.partitions = partitions
        #: the node's number of Redis shards, stored by the cluster's first node and
        #: checked by every later one (None: a store driven alone, no bus: not checked)
        self.redis_shards = redis_shards
        #: the node's Redis shards, whose identities are checked against the cluster's
        #: (``_check_shard_labels_sync``; None: not checked)
        self.shard_labels: ShardLabels | None = None
        #: how long a node starting next to running ones waits for them to label a shard
        self.label_grace_s = LABEL_GRACE_S
        self.connect_timeout_s = connect_timeout_s
        self._limiter = trio.CapacityLimiter(connections)
        self._idle: collections.deque[psycopg.Connection[Any]] = collections.deque()
        self._all: set[psycopg.Connection[Any]] = set()
        self._pool_lock = threading.Lock()
        self._closed = False
        #: per gateway, counters as last committed (for /api/stats); PostgreSQL has the truth
        self.stats: dict[str, GatewayStats] = {}
        #: duplicates dropped since the gateway's last commit (added by the next one)
        self._dups: collections.Counter[str] = collections.Counter()
        #: bytes of the partition logs' bodies as last measured (``measure``)
        self.frame_bytes = 0
        #: the SQLite store's disk-full flag: PostgreSQL reports a full disk as unavailable
        self.full = False
        #: why the last call failed to reach PostgreSQL (None: the last call worked)
        self.unavailable: str | None = None
        #: the database's synchronous_commit is off: each commit sets it on (open)
        self.force_synchronous_commit = False
        #: the random id of this cluster (edgegw_meta), made by its first node
        self.store_id = 0
        #: called after each commit that appended to partition logs, with the new last
        #: pseq of each such partition: the node publishes it (the bus's
        #: ``notify_partition``) so owners wake at once.  Best effort: owners also poll.
        self.on_advance: Callable[[dict[int, int]], None] | None = None

    # -- connections (worker threads) --
    def _connect(self) -> psycopg.Connection[Any]:
        # No server-side prepared statements (psycopg prepares a query after its fifth
        # run): a pooler in transaction mode (PgBouncer before 1.21, or without
        # max_prepared_statements) hands each transaction any server connection, where a
        # name is missing, taken ("prepared statement "_pg3_0" already exists": every
        # commit failed), or names another node's statement.  They saved nothing
        # measurable here: frames are committed a few statements per frame, not per record
        # (bench/cluster_pg.py store, 4 gateways: 463k records/s without, 401k-545k with).
        conn = psycopg.connect(self.dsn, autocommit=True,
                               connect_timeout=max(1, round(self.connect_timeout_s)),
                               application_name=f"edgegw {self.node_id}"[:63],
                               prepare_threshold=None)
        # The commits, claims and fences are written for READ COMMITTED (a row lock, then
        # a read of the row as committed): a database whose default is REPEATABLE READ or
        # SERIALIZABLE (set by a DBA for other applications) failed them with serialization
        # errors, reported as PostgreSQL unavailable.  Every transaction says its level.
        conn.isolation_level = psycopg.IsolationLevel.READ_COMMITTED
        # A DBA's statement_timeout (set on the database or role for other applications)
        # cancelled a commit or checkpoint that ran past it (57014, an OperationalError):
        # reported as PostgreSQL unavailable and tried again, the same statement cancelled
        # again -- acknowledgements stopped for good.  The store bounds its own waits
        # (lock_timeout, the idle-in-transaction timeout) and its statements (a commit is
        # at most a batch of frames); claims and commits also say it per transaction
        # (_set_local_timeouts), which a pooler in transaction mode carries.
        conn.execute("SELECT set_config('statement_timeout', '0', false)")
        if self.idle_in_transaction_timeout_s > 0:
            # a paused node (SIGSTOP, a frozen VM) must not hold its row locks -- a
            # gateway's row, partition heads, a fence -- until it wakes: the server ends
            # its session instead.  Safe: every owner write is fenced by its lease token and
            # every commit by the gateway's generation; the woken node's commit fails
            # (StoreUnavailable) and is tried again against the fences.
            conn.execute("SELECT set_config('idle_in_transaction_session_timeout', %s,"
                         " false)", (_ms(self.idle_in_transaction_timeout_s),))
        with self._pool_lock:
            self._all.add(conn)
        return conn

    def _run_sync(self, fn: Callable[[psycopg.Connection[Any]], T]) -> T:
        with self._pool_lock:
            if self._closed:
                raise StoreUnavailable("the cluster store is closed")
            conn = self._idle.pop() if self._idle else None
        try:
            if conn is None or conn.closed:
                conn = self._connect()
            result = fn(conn)
        except psycopg.errors.LockNotAvailable as exc:
            # lock_timeout: the transaction was rolled back, the connection is fine
            assert conn is not None
            if conn.closed or conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
                self._discard(conn)
            else:
                self._put_back(conn)
            raise LockTimeout(f"PostgreSQL: {str(exc).strip()}") from exc
        except BaseException as exc:
            if conn is not None and (_is_connection_error(exc) or conn.closed
                                     or conn.info.transaction_status
                                     != psycopg.pq.TransactionStatus.IDLE):
                self._discard(conn)
            elif conn is not None:
                self._put_back(conn)
            if _is_connection_error(exc):
                # the server went away: the idle connections are most likely dead too, and
                # each would cost one more failed try before the store writes again
                self._drop_idle()
                sqlstate = getattr(exc, "sqlstate", None)
                if sqlstate in SESSION_ENDED:
                    raise SessionEnded(f"PostgreSQL ended the session: {str(exc).strip()} "
                                       f"(SQLSTATE {sqlstate})", sqlstate) from exc
                raise StoreUnavailable(f"PostgreSQL: {str(exc).strip() or type(exc).__name__}"
                                       ) from exc
            raise
        self._put_back(conn)
        return result

    def _put_back(self, conn: psycopg.Connection[Any]) -> None:
        with self._pool_lock:
            if self._closed:
                self._all.discard(conn)
                conn.close()
            else:
                self._idle.append(conn)

    def _drop_idle(self) -> None:
        with self._pool_lock:
            idle = list(self._idle)
            self._idle.clear()
        for conn in idle:
            self._discard(conn)

    def _discard(self, conn: psycopg.Connection[Any]) -> None:
        with self._pool_lock:
            self._all.discard(conn)
        try:
            conn.close()
        except Exception:  # closing a broken connection: nothing to save
            pass

    async def _call(self, fn: Callable[[psycopg.Connection[Any]], T]) -> T:
        try:
            result = await trio.to_thread.run_sync(self._run_sync, fn, limiter=self._limiter)
        except LockTimeout:
            raise  # PostgreSQL answers: the store is not unavailable, the caller retries
        except SessionEnded as exc:
            # PostgreSQL answered by ending the session: not unavailable -- a store marked
            # so stayed degraded (/healthz) on an idle node until its next call, while a
            # new session connects at once.  Only a failed connect marks it.
            self.m_session_ended.inc(sqlstate=exc.sqlstate)
            log.warning("cluster store: %s; tried again on a new session", exc)
            raise
        except StoreUnavailable as exc:
            if self.unavailable is None:
                log.error("cluster store: %s; acknowledgements pause until it answers", exc)
            self.unavailable = str(exc)
            raise
        if self.unavailable is not None:
            log.warning("cluster store: PostgreSQL answers again")
            self.unavailable = None
        return result

    # -- lifecycle --
    async def open(self) -> None:
        """Connect, create the schema if this is the cluster's first node, check the
        partition count and the Redis shard count.  Raises PartitionMismatch,
        ShardMismatch, StoreUnavailable."""
        self._closed = False
        await self._call(self._open_sync)

    def _check_durability(self, conn: psycopg.Connection[Any]) -> None:
        """A commit is acknowledged as durable: with ``synchronous_commit = off`` (a
        database or role default some DBAs set for speed) PostgreSQL returns before its
        WAL is on disk, and a crash of the server would lose acknowledged frames -- so each
        commit sets it back on for its transaction.  ``fsync = off`` cannot be set back
        from here: said at every start."""
        sync = conn.execute("SHOW synchronous_commit").fetchone()
        fsync = conn.execute("SHOW fsync").fetchone()
        self.force_synchronous_commit = sync is not None and sync[0] == "off"
        if self.force_synchronous_commit:
            log.warning("cluster store: PostgreSQL's synchronous_commit is off for this "
                        "database or role: every commit of frames turns it on for itself "
                        "(an acknowledged frame must survive a crash of the server)")
        if fsync is not None and fsync[0] == "off":
            log.error("cluster store: PostgreSQL runs with fsync = off: a crash of its "
                      "machine can lose frames already acknowledged to gateways, and "
                      "corrupt the database; turn it on (docs/cluster.md, PostgreSQL)")

    def _open_sync(self, conn: psycopg.Connection[Any]) -> None:
        import secrets

        with conn.transaction():
            # this transaction waits on Redis (the shard labels) between its statements:
            # not a paused node
            conn.execute("SET LOCAL idle_in_transaction_session_timeout = 0")
            # two first nodes starting together: one creates, the other waits and sees it
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))
            if not _schema_complete(conn):
                # Only when something is missing: the DDL takes strong locks even when it
                # changes nothing (ALTER TABLE: ACCESS EXCLUSIVE), and a node restarting
                # while the others commit deadlocked with them (seen in the node-kill test).
                conn.execute(SCHEMA)
            conn.execute("INSERT INTO edgegw_meta (key, value) VALUES ('partitions', %s),"
                         " ('schema_version', %s), ('store_id', %s) ON CONFLICT DO NOTHING",
                         (str(self.partitions), str(SCHEMA_VERSION),
                          str(secrets.randbits(62))))
            meta = dict(conn.execute("SELECT key, value FROM edgegw_meta").fetchall())
            if int(meta["partitions"]) != self.partitions:
                raise PartitionMismatch(
                    f"hub.cluster.partitions is {self.partitions} but the cluster in "
                    f"PostgreSQL was created with {meta['partitions']}: it cannot change "
                    "for the life of a cluster (docs/cluster.md, Partitions)")
            if int(meta["schema_version"]) != SCHEMA_VERSION:
                raise PartitionMismatch(
                    f"the cluster's PostgreSQL schema is version {meta['schema_version']}, "
                    f"this node knows {SCHEMA_VERSION}")
            if self.redis_shards is not None:
                fresh = self._check_shards_sync(conn)
                if self.shard_labels is not None:
                    self._check_shard_labels_sync(conn, self.shard_labels, fresh)
            self.store_id = int(meta["store_id"])
            conn.execute("INSERT INTO edgegw_partition_heads (partition)"
                         " SELECT generate_series(0, %s - 1) ON CONFLICT DO NOTHING",
                         (self.partitions,))
        self._check_durability(conn)

    def _check_shards_sync(self, conn: psycopg.Connection[Any]) -> bool:
        """Check the shard count; True when this node stored it (the shard list starts
        with this node: a new cluster, or the row deleted to change the count)."""
        # A separate row, added by the first node of this version: a cluster made before
        # the count was stored takes the first starting node's (the docs' rule was already
        # "every node lists the same shards").  Deleting the row (every node stopped) is
        # how the count changes: the next node to start stores its own.
        inserted = conn.execute(
            "INSERT INTO edgegw_meta (key, value) VALUES ('redis_shards', %s)"
            " ON CONFLICT DO NOTHING RETURNING key", (str(self.redis_shards),)).fetchone()
        row = conn.execute("SELECT value FROM edgegw_meta WHERE key = 'redis_shards'"
                           ).fetchone()
        stored = int(row[0]) if row else self.redis_shards
        if stored != self.redis_shards:
            raise ShardMismatch(
                f"hub.cluster.redis_urls lists {self.redis_shards} Redis shard"
                f"{'s' if self.redis_shards != 1 else ''} but the cluster in PostgreSQL "
                f"runs on {stored}: every node must list the same shards, or a partition "
                "would have two owners or none (to change the count, stop every node and "
                "DELETE FROM edgegw_meta WHERE key = 'redis_shards'; docs/cluster.md, Shards)")
        return inserted is not None

    def _check_shard_labels_sync(self, conn: psycopg.Connection[Any], labels: ShardLabels,
                                 fresh: bool) -> None:
        """Each shard must hold ``<shards id>/<its index>`` (docs/cluster.md, Shards): the
        count alone lets two nodes list the same shards in another order, or another
        Redis at one index, and route a partition to two Redis instances.  Runs in the
        open transaction, under its advisory lock: nodes starting together label in turn.

        A new shard list (this node stored the count, or a cluster made before shard ids
        existed) gets a new id, and this node labels every shard (SET NX: a Redis that
        holds another id refuses).  Otherwise a shard holding no label lost its data (no
        persistence is configured), was replaced, or is not the cluster's at all: the
        running nodes label a shard again when they see its epoch change, so a label still
        missing while another node is connected to this database means the other nodes do
        not use this Redis at this index (refused); with no node running, this one labels
        it (the first node to start defines the list, as at bootstrap)."""
        import uuid

        if fresh:
            conn.execute("INSERT INTO edgegw_meta (key, value) VALUES ('redis_shards_id', %s)"
                         " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                         (str(uuid.uuid4()),))
        else:
            fresh = conn.execute(
                "INSERT INTO edgegw_meta (key, value) VALUES ('redis_shards_id', %s)"
                " ON CONFLICT DO NOTHING RETURNING key", (str(uuid.uuid4()),)
            ).fetchone() is not None
        row = conn.execute("SELECT value FROM edgegw_meta WHERE key = 'redis_shards_id'"
                           ).fetchone()
        assert row is not None
        shards_id = str(row[0])
        urls = list(labels.redis_urls)
        found = trio.from_thread.run(labels.read_shard_labels)
        self._refuse_foreign(shards_id, urls, found)
        missing = [i for i, label in enumerate(found) if label is None]
        if missing and not fresh:
            others = self._other_nodes_sync(conn)
            deadline = time.monotonic() + self.label_grace_s
            while others and missing and time.monotonic() < deadline:
                time.sleep(0.2)  # a worker thread: the running nodes label it meanwhile
                found = trio.from_thread.run(labels.read_shard_labels)
                self._refuse_foreign(shards_id, urls, found)
                missing = [i for i, label in enumerate(found) if label is None]
                # asked again: a node starting with this one may have been connected but
                # not yet waiting for the lock (after a restart of everything)
                others = self._other_nodes_sync(conn)
            if others and missing:
                i = missing[0]
                raise ShardMismatch(
                    f"hub.cluster.redis_urls lists {without_password(urls[i])} as Redis "
                    f"shard {i} but it holds no shard identity while "
                    f"node{'s' if len(others) > 1 else ''} "
                    f"{', '.join(others)} run{'' if len(others) > 1 else 's'} on this "
                    f"cluster: they do not use this Redis as shard {i}; list the cluster's "
                    "shards in the cluster's order (to replace a Redis, stop every node "
                    "first; docs/cluster.md, Shards)")
        if missing:
            log.warning("cluster store: labelling Redis shard%s %s as shard%s of this "
                        "cluster (%s)", "s" if len(missing) > 1 else "",
                        ", ".join(without_password(urls[i]) for i in missing),
                        "s" if len(missing) > 1 else "",
                        "a new shard list" if fresh else "no node running, they held none")
            claimed = trio.from_thread.run(labels.claim_shard_labels, shards_id, missing)
            for i in missing:
                found[i] = claimed[i]
            self._refuse_foreign(shards_id, urls, found)
        labels.shard_labels_checked(shards_id)

    @staticmethod
    def _refuse_foreign(shards_id: str, urls: list[str], found: Sequence[str | None]
                        ) -> None:
        """ShardMismatch for the first shard labelled with another index or cluster."""
        for i, label in enumerate(found):
            if label is None or label == f"{shards_id}/{i}":
                continue
            held_id, _, held_index = label.rpartition("/")
            what = (f"shard {held_index} of this cluster" if held_id == shards_id
                    else f"shard {held_index} of another cluster ({held_id}; this one is "
                         f"{shards_id})")
            fix = ("list the shards in the cluster's order" if held_id == shards_id else
                   "list this cluster's Redis, or if this Redis was meant to join it "
                   "(replaced, or left from an earlier shard list) stop every node and "
                   "delete the key")
            raise ShardMismatch(
                f"hub.cluster.redis_urls lists {without_password(urls[i])} as Redis "
                f"shard {i} but it is "
                f"{what}: every node must list the same shards in the same order, or a "
                f"partition would have two owners or none ({fix}; docs/cluster.md, Shards)")

    def _other_nodes_sync(self, conn: psycopg.Connection[Any]) -> list[str]:
        """The other nodes connected to this cluster's database now (their stores name
        their connections ``edgegw <node>``), not counting nodes that are starting too
        (waiting for the open transaction's lock)."""
        rows = conn.execute(
            "SELECT DISTINCT substr(application_name, 8) FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid()"
            " AND application_name LIKE 'edgegw %%' AND application_name <> %s"
            " AND wait_event IS DISTINCT FROM 'advisory' ORDER BY 1",
            (f"edgegw {self.node_id}"[:63],)).fetchall()
        return [str(r[0]) for r in rows]

    async def close(self) -> None:
        with self._pool_lock:
            self._closed = True
            idle = list(self._idle)
            self._idle.clear()
            for conn in idle:
                self._all.discard(conn)

        def close_all() -> None:
            for conn in idle:
                try:
                    conn.close()
                except Exception:  # a broken connection: nothing to save
                    pass

        await trio.to_thread.run_sync(close_all)

    @property
    def busy(self) -> bool:
        return self._limiter.borrowed_tokens > 0

    def health_problem(self) -> str | None:
        if self.unavailable is not None:
            return ("PostgreSQL unavailable: acknowledgements paused, gateways spool "
                    f"({self.unavailable})")
        return None

    # -- gateways --
    async def claim_gateway(self, gateway_id: str, node_id: str | None = None) -> int:
        """A new connection of ``gateway_id`` (HELLO): its new generation.  Every earlier
        connection's commits are refused from now on (newest connection wins)."""
        claim = await self.claim(gateway_id, "", node_id)
        return claim.generation

    async def claim(self, gateway_id: str, epoch: str, node_id: str | None = None
                    ) -> GatewayClaim:
        """``claim_gateway`` and the (gateway, epoch) applied set, read in the same
        transaction after the claim: it holds every frame an earlier connection
        committed, on any node (a later commit of theirs is refused by the fence)."""
        node = node_id or self.node_id

        def claim_tx(conn: psycopg.Connection[Any]) -> GatewayClaim:
            with conn.transaction():
                self._set_local_timeouts(conn)
                gen = conn.execute(
                    "INSERT INTO edgegw_gateways (gateway_id, generation, node_id, claimed_at)"
                    " VALUES (%s, 1, %s, %s) ON CONFLICT (gateway_id) DO UPDATE SET"
                    " generation = edgegw_gateways.generation + 1, node_id = EXCLUDED.node_id,"
                    " claimed_at = EXCLUDED.claimed_at RETURNING generation",
                    (gateway_id, node, time.time())).fetchone()[0]  # type: ignore[index]
                row = conn.execute("SELECT ranges, rids FROM edgegw_applied WHERE"
                                   " gateway_id = %s AND epoch = %s",
                                   (gateway_id, epoch)).fetchone()
                stats = conn.execute(
                    f"SELECT {', '.join(_STAT_COLS)} FROM edgegw_gateways WHERE gateway_id = %s",
                    (gateway_id,)).fetchone()
            applied = IntervalSet(json.loads(row[0])) if row else IntervalSet()
            rids = IntervalSet(json.loads(row[1])) if row else IntervalSet()
            self.stats[gateway_id] = GatewayStats(gateway_id, *stats)  # type: ignore[misc]
            return GatewayClaim(gen, applied, rids)

        def run(conn: psycopg.Connection[Any]) -> GatewayClaim:
            return self._claiming(conn, claim_tx, "claim_gateway", f"gateway {gateway_id}",
                                  [("edgegw_gateways", "gateway_id", [gateway_id])])

        try:
            return await self._call(run)
        except LockTimeout:
            self.m_lock_timeouts.inc(call="claim_gateway")
            log.warning("gateway %s: its claim waited %.1f s for its row, held by another "
                        "node's transaction (a paused node?); trying again", gateway_id,
                        self.lock_timeout_s)
            raise

    def _set_local_timeouts(self, conn: psycopg.Connection[Any]) -> None:
        """In a claim's or a commit's transaction: wait at most ``lock_timeout_s`` for a
        row lock, so a claim or commit whose row a stuck transaction holds is tried again,
        not hung (a worker thread, and a connection of the pool, held without end); and no
        statement_timeout (``_connect``; said again here, where a pooler may have handed
        the transaction a server connection this store never set up)."""
        if self.lock_timeout_s > 0:  # one round trip for both
            conn.execute("SELECT set_config('lock_timeout', %s, true),"
                         " set_config('statement_timeout', '0', true)",
                         (_ms(self.lock_timeout_s),))
        else:
            conn.execute("SELECT set_config('statement_timeout', '0', true)")

    def _claiming(self, conn: psycopg.Connection[Any],
                  claim_tx: Callable[[psycopg.Connection[Any]], T], call: str, what: str,
                  rows: list[tuple[str, str, list[Any]]]) -> T:
        """``claim_tx`` (a claim's or a commit's transaction, under
        ``_set_local_timeouts``), which locks ``rows`` (``(table, key column, keys)``); when
        it gave up waiting for a row, the rows' holders are ended if they are stuck
        sessions of another node (``_end_stuck_holders``) and it is tried once more at
        once.

        Why: a node paused (SIGSTOP, a frozen VM) or cut off in the middle of a statement
        -- an ``executemany`` pipeline half sent, results PostgreSQL cannot deliver --
        leaves its session *active*, not idle in transaction, so
        ``idle_in_transaction_session_timeout`` never ends it, and no statement timeout
        interrupts a backend waiting on its client.  Only ending the session does."""
        try:
            return claim_tx(conn)
        except psycopg.errors.LockNotAvailable:
            # (the transaction is rolled back: the connection is idle, usable here)
            if conn.closed or not self._end_stuck_holders(conn, call, what, rows):
                raise
        return claim_tx(conn)

    def _end_stuck_holders(self, conn: psycopg.Connection[Any], call: str, what: str,
                           rows: list[tuple[str, str, list[Any]]]) -> bool:
        """End (``pg_terminate_backend``) each session holding one of ``rows`` (``(table,
        key column, keys)``) if it is another node's (``application_name``: ``edgegw
        <node>``), not itself waiting for a lock, and its transaction has been open longer
        than ``stuck_after_s`` by the database's clock: a node's transactions last
        milliseconds, one that old holding a row another node needs belongs to a node that
        has lost its leases meanwhile.  True if one ended.  (A holder waiting for a lock is
        not stuck itself: its own lock timeout deals with what it waits for.)

        Safe by the fences, not by timing: the ended transaction is rolled back whole (a
        commit that had committed already did so before this claim, which then sees it),
        and the node, when it wakes, can only write again on a new session, through the
        gateway's generation or the partition's token (which a claim raises)."""
        if self.stuck_after_s <= 0:
            return False
        # The row's holder: the transaction in its xmax (it locked or updated the version
        # we see).  A row share-locked by several transactions at once (a multixact) names
        # none of them; the claim then waits for the idle timeout as before.
        holders: dict[int, tuple[str, float]] = {}
        for table, key_column, keys in rows:
            for pid, node, age in conn.execute(
                    f"SELECT a.pid, substr(a.application_name, 8),"
                    f" extract(epoch FROM clock_timestamp() - a.xact_start)::double precision"
                    f" FROM {table} r JOIN pg_stat_activity a ON a.backend_xid = r.xmax"
                    f" WHERE r.{key_column} = ANY(%s) AND a.datname = current_database()"
                    " AND a.pid <> pg_backend_pid() AND a.application_name LIKE 'edgegw %%'"
                    " AND a.application_name <> %s"
                    " AND a.wait_event_type IS DISTINCT FROM 'Lock'"
                    " AND a.xact_start < clock_timestamp() - make_interval(secs => %s)",
                    (keys, f"edgegw {self.node_id}"[:63], self.stuck_after_s)).fetchall():
                holders[pid] = (node, age)
        ended = False
        for pid, (node, age) in holders.items():
            try:
                # waits (up to 5 s) for the backend to exit: its locks are free after
                gone = conn.execute("SELECT pg_terminate_backend(%s, 5000)", (pid,)
                                    ).fetchone()
            except psycopg.errors.InsufficientPrivilege as exc:
                log.warning("%s: cannot end node %s's PostgreSQL session %d, stuck %.1f s "
                            "holding a row it needs: %s (every node must connect as the "
                            "same role)",
                            what, node, pid, age, str(exc).strip())
                continue
            self.m_sessions_ended.inc(call=call)
            log.warning("%s: ended node %s's PostgreSQL session %d, %.1f s in a transaction "
                        "holding a row this waited for (a paused node?)%s",
                        what, node, pid, age, "" if gone and gone[0] else
                        "; it has not exited yet")
            ended = True
        return ended

    def count_duplicate(self, gateway: str) -> None:
        # counted in memory; added by the gateway's next commit (a lost count is harmless)
        self._dups[gateway] += 1
        self.gateway_stats(gateway).duplicates_dropped += 1

    def gateway_stats(self, gateway: str) -> GatewayStats:
        st = self.stats.get(gateway)
        if st is None:
            st = self.stats[gateway] = GatewayStats(gateway)
        return st

    async def all_gateway_stats(self) -> dict[str, GatewayStats]:
        """Every gateway's counters as PostgreSQL has them (the same on every node)."""
        def run(conn: psycopg.Connection[Any]) -> dict[str, GatewayStats]:
            rows = conn.execute(f"SELECT gateway_id, {', '.join(_STAT_COLS)}"
                                " FROM edgegw_gateways ORDER BY gateway_id").fetchall()
            return {r[0]: GatewayStats(*r) for r in rows}

        return await self._call(run)

    # -- commit --
    async def commit(self, frames: list[FrameToApply],
                     generations: Mapping[str, int] | None = None,
                     lost: dict[tuple[str, str], tuple[int, int]] | None = None,
                     rejected: list[tuple[FrameToApply, str]] | None = None,
                     ) -> set[tuple[str, str, int]]:
        """Make ``frames`` applied, durably, in one transaction, if every gateway they
        (and ``lost``, ``rejected``) name still has the generation ``generations`` gives
        it; else nothing is written and ``GatewaySuperseded`` is raised.  Returns the
        (gateway, epoch, seq) skipped as applied already (the caller acks them as
        duplicates and does not hand their records on).  ``StoreUnavailable``: PostgreSQL
        did not answer; try the same again later (a commit whose answer was lost is found
        applied by the retry, its frames then skipped); ``LockTimeout``, one of those: a
        row it needs stayed locked ``lock_timeout_s`` (another node's session stuck on it
        was ended meanwhile: ``_claiming``)."""
        lost = lost or {}
        rejected = rejected or []
        generations = generations or {}
        gateways = sorted({f.gateway for f in frames} | {gw for gw, _ in lost}
                          | {f.gateway for f, _ in rejected})
        if not gateways:
            return set()
        missing = [gw for gw in gateways if gw not in generations]
        if missing:
            raise ValueError(f"commit without a generation for gateway(s) {missing}")
        dups = {gw: self._dups.pop(gw, 0) for gw in gateways}

        def run(conn: psycopg.Connection[Any]) -> tuple[
                set[tuple[str, str, int]], dict[str, GatewayStats], dict[int, int]]:
            # split and compress in the worker thread (zlib releases the GIL), before the
            # transaction: no row is locked meanwhile
            chunks_by_frame = {(f.gateway, f.epoch, f.seq): _chunks_of(f, self.partitions)
                               for f in frames}
            partitions = sorted({c.partition for chunks in chunks_by_frame.values()
                                 for c in chunks})

            def commit_tx(conn: psycopg.Connection[Any]) -> tuple[
                    set[tuple[str, str, int]], dict[str, GatewayStats], dict[int, int]]:
                return self._commit_sync(conn, frames, generations, lost, rejected,
                                         chunks_by_frame, dups, gateways)

            # its rows: a paused node's commit stuck holding them is ended as for a claim
            return self._claiming(conn, commit_tx, "commit", f"commit of {', '.join(gateways)}",
                                  [("edgegw_gateways", "gateway_id", gateways),
                                   ("edgegw_partition_heads", "partition", partitions)])

        try:
            skipped, stats, heads = await self._call(run)
        except LockTimeout:
            for gw, n in dups.items():  # not written: the next commit adds them
                self._dups[gw] += n
            self.m_lock_timeouts.inc(call="commit")
            log.warning("commit of %s waited %.1f s for a row lock, held by another "
                        "node's transaction (a paused node?); trying again",
                        ", ".join(gateways), self.lock_timeout_s)
            raise
        except BaseException:
            for gw, n in dups.items():  # not written: the next commit adds them
                self._dups[gw] += n
            raise
        self.stats.update(stats)
        if heads and self.on_advance is not None:
            try:
                self.on_advance(heads)
            except Exception:  # a notification is best effort: the commit stands
                log.exception("cluster store: on_advance(%s)", heads)
        for gw in gateways:  # counted meanwhile: not in what PostgreSQL returned
            self.stats[gw].duplicates_dropped += self._dups.get(gw, 0)
        return skipped

    def _commit_sync(self, conn: psycopg.Connection[Any], frames: list[FrameToApply],
                     generations: Mapping[str, int],
                     lost: dict[tuple[str, str], tuple[int, int]],
                     rejected: list[tuple[FrameToApply, str]],
                     chunks_by_frame: dict[tuple[str, str, int], list[_Chunk]],
                     dups: dict[str, int], gateways: list[str],
                     ) -> tuple[set[tuple[str, str, int]], dict[str, GatewayStats],
                                dict[int, int]]:
        now = time.time()
        heads: dict[int, int] = {}
        skipped: set[tuple[str, str, int]] = set()
        with conn.transaction():
            # (a paused node's commit holding these rows is ended, not waited for: _claiming)
            self._set_local_timeouts(conn)
            if self.force_synchronous_commit:  # the ACK after it must survive a crash
                conn.execute("SET LOCAL synchronous_commit = on")
            # the fence: the gateways' rows locked (in order) until the transaction ends
            rows = dict(conn.execute(
                "SELECT gateway_id, generation FROM edgegw_gateways WHERE gateway_id = ANY(%s)"
                " ORDER BY gateway_id FOR UPDATE", (gateways,)).fetchall())
            for gw in gateways:
                if rows.get(gw) != generations[gw]:
                    raise GatewaySuperseded(gw, generations[gw], rows.get(gw))
            keys = sorted({(f.gateway, f.epoch) for f in frames} | set(lost)
                          | {(f.gateway, f.epoch) for f, _ in rejected})
            applied: dict[tuple[str, str], IntervalSet] = {k: IntervalSet() for k in keys}
            rid_sets: dict[tuple[str, str], IntervalSet] = {k: IntervalSet() for k in keys}
            for gw, epoch, ranges, rids in conn.execute(
                    "SELECT gateway_id, epoch, ranges, rids FROM edgegw_applied WHERE"
                    " (gateway_id, epoch) IN (SELECT * FROM unnest(%s::text[], %s::text[]))",
                    ([k[0] for k in keys], [k[1] for k in keys])).fetchall():
                applied[(gw, epoch)] = IntervalSet(json.loads(ranges))
                rid_sets[(gw, epoch)] = IntervalSet(json.loads(rids))
            # what is new: not applied (the set covers pruned frames), not twice in the call
            # -- and its records not applied under another seq (``screen_rids``: a frame
            # whose records all are is skipped, its seq applied; one applied in part cut)
            fresh: list[FrameToApply] = []
            by_rid: list[FrameToApply] = []
            for f in frames:
                key = (f.gateway, f.epoch, f.seq)
                if f.seq in applied[(f.gateway, f.epoch)] or key in skipped:
                    if key not in skipped:
                        f.seq_reused = records_not_applied(
                            f.first_rid, f.n_records, rid_sets[(f.gateway, f.epoch)])
                    skipped.add(key)
                    continue
                applied[(f.gateway, f.epoch)].add(f.seq)
                n_before = f.n_records
                if not screen_rids(f, rid_sets[(f.gateway, f.epoch)]):
                    skipped.add(key)
                    by_rid.append(f)
                    continue
                if f.n_records != n_before:  # cut: its partition chunks again (rare)
                    chunks_by_frame[key] = _chunks_of(f, self.partitions)
                fresh.append(f)
            # the constraint: a frame some other transaction applied is not inserted
            inserted: set[tuple[str, str, int]] = set()
            by_key: dict[tuple[str, str], list[FrameToApply]] = collections.defaultdict(list)
            for f in fresh:
                by_key[(f.gateway, f.epoch)].append(f)
            for (gw, epoch), group in by_key.items():
                for (seq,) in conn.execute(
                        "INSERT INTO edgegw_frames (gateway_id, epoch, seq, first_rid,"
                        f" n_records, node_id, applied_at) SELECT %s, %s, s, r, n, %s, {_DB_NOW}"
                        " FROM unnest(%s::bigint[], %s::bigint[], %s::integer[]) AS t(s, r, n)"
                        " ON CONFLICT DO NOTHING RETURNING seq",
                        (gw, epoch, self.node_id, [f.seq for f in group],
                         [f.first_rid for f in group], [f.n_records for f in group])
                        ).fetchall():
                    inserted.add((gw, epoch, seq))
            applied_frames = [f for f in fresh if (f.gateway, f.epoch, f.seq) in inserted]
            skipped.update((f.gateway, f.epoch, f.seq) for f in fresh
                           if (f.gateway, f.epoch, f.seq) not in inserted)
            # the partition logs: heads locked in partition order, numbers in commit order
            chunks = [c for f in applied_frames
                      for c in chunks_by_frame[(f.gateway, f.epoch, f.seq)]]
            per_partition: dict[int, list[_Chunk]] = collections.defaultdict(list)
            for c in chunks:
                per_partition[c.partition].append(c)
            log_rows = []
            for p in sorted(per_partition):
                group_c = per_partition[p]
                # (the row is locked anyway: its byte count costs no contention)
                last = conn.execute(
                    "UPDATE edgegw_partition_heads SET last_pseq = last_pseq + %s,"
                    " log_bytes = log_bytes + %s WHERE partition = %s RETURNING last_pseq",
                    (len(group_c), sum(len(c.body) for c in group_c), p)
                ).fetchone()[0]  # type: ignore[index]
                heads[p] = last
                for i, c in enumerate(group_c):
                    log_rows.append((p, last - len(group_c) + 1 + i, c.gateway, c.epoch, c.seq,
                                     c.first_rid, c.n_records, c.body))
            if log_rows:
                with conn.cursor() as cur:
                    cur.executemany(
                        "INSERT INTO edgegw_partition_log (partition, pseq, gateway_id, epoch,"
                        " seq, first_rid, n_records, applied_at, body)"
                        f" VALUES (%s, %s, %s, %s, %s, %s, %s, {_DB_NOW}, %s)", log_rows)
            # rejected frames (dead letters) count as applied: never sent again
            fresh_rejected = []
            for f, reason in rejected:
                key = (f.gateway, f.epoch, f.seq)
                if f.seq in applied[(f.gateway, f.epoch)] or key in skipped:
                    if key not in skipped:
                        f.seq_reused = records_not_applied(
                            f.first_rid, f.n_records, rid_sets[(f.gateway, f.epoch)])
                    skipped.add(key)
                    continue
                applied[(f.gateway, f.epoch)].add(f.seq)
                fresh_rejected.append((f, reason))
            if fresh_rejected:
                with conn.cursor() as cur:
                    cur.executemany(
                        "INSERT INTO edgegw_rejected (gateway_id, epoch, seq, reason, node_id,"
                        " at, body) VALUES (%s, %s, %s, %s, %s, %s, %s)",
                        [(f.gateway, f.epoch, f.seq, reason, self.node_id, now, f.body)
                         for f, reason in fresh_rejected])
            for (gw, epoch), (up_to, _) in lost.items():
                applied[(gw, epoch)].add_range(1, up_to)
            with conn.cursor() as cur:
                cur.executemany(
                    "INSERT INTO edgegw_applied (gateway_id, epoch, ranges, updated, rids)"
                    " VALUES (%s, %s, %s, %s, %s) ON CONFLICT (gateway_id, epoch) DO UPDATE"
                    " SET ranges = EXCLUDED.ranges, updated = EXCLUDED.updated,"
                    " rids = EXCLUDED.rids",
                    [(gw, epoch, json.dumps(applied[(gw, epoch)].ranges()), now,
                      json.dumps(rid_sets[(gw, epoch)].ranges())) for gw, epoch in keys])
            # counters: increments (the row is locked: no lost update)
            stats: dict[str, GatewayStats] = {}
            for gw in gateways:
                mine = [f for f in applied_frames if f.gateway == gw]
                rej = [f for f, _ in fresh_rejected if f.gateway == gw]
                lost_n = sum(n for (g, _), (_, n) in lost.items() if g == gw)
                epochs = [f.epoch for f in mine] or [e for g, e in lost if g == gw] or [
                    f.epoch for f in rej]
                seqs = [f.seq for f in mine] + [f.seq for f in rej] + [
                    f.seq for f in by_rid if f.gateway == gw]
                row = conn.execute(
                    "UPDATE edgegw_gateways SET frames_applied = frames_applied + %s,"
                    " records_applied = records_applied + %s,"
                    " duplicates_dropped = duplicates_dropped + %s,"
                    " frames_rejected = frames_rejected + %s,"
                    # saturating, as the single hub's (store.py, COUNTER_MAX)
                    " frames_lost = LEAST(frames_lost::numeric + %s, 9223372036854775807)"
                    "::bigint,"
                    " last_seq = GREATEST(last_seq, %s), epoch = COALESCE(%s, epoch),"
                    " last_seen = CASE WHEN %s THEN %s ELSE last_seen END,"
                    " last_rid = GREATEST(last_rid, %s)"
                    f" WHERE gateway_id = %s RETURNING {', '.join(_STAT_COLS)}",
                    (len(mine), sum(f.n_records for f in mine),
                     dups.get(gw, 0) + sum(f.gateway == gw for f in by_rid), len(rej),
                     lost_n, max(seqs, default=0), epochs[-1] if epochs else None,
                     bool(mine), now,
                     max((f.first_rid + f.n_records - 1 for f in mine if f.n_records),
                         default=None), gw)).fetchone()
                stats[gw] = GatewayStats(gw, *row)  # type: ignore[misc]
            failpoints.hit("cluster.mid_commit")
        return skipped, stats, heads

    async def declare_lost(self, gateway: str, epoch: str, up_to: int, count: int,
                           generation: int = 0) -> None:
        """Record that the gateway no longer holds frames below ``up_to`` that we lack."""
        await self.commit([], {gateway: generation}, lost={(gateway, epoch): (up_to, count)})

    async def save_positions(self, gateway: str, epoch: str, seq: int,
                             positions: bytes, generation: int = 0) -> bool:
        """As ``HubStore.save_positions``, whichever node writes.  A later frame of the
        same epoch always replaces (true facts whoever tells); another epoch's only while
        ``generation`` is still the gateway's (the connection fence, as a commit's): a
        superseded connection of an older epoch, still writing on another node, never
        puts its positions back over a newer epoch's."""
        def run(conn: psycopg.Connection[Any]) -> bool:
            cur = conn.execute(
                "INSERT INTO edgegw_positions (gateway_id, epoch, seq, positions, updated)"
                " VALUES (%s, %s, %s, %s, extract(epoch from clock_timestamp()))"
                " ON CONFLICT (gateway_id) DO UPDATE SET epoch = EXCLUDED.epoch,"
                " seq = EXCLUDED.seq, positions = EXCLUDED.positions,"
                " updated = EXCLUDED.updated WHERE (edgegw_positions.epoch = EXCLUDED.epoch"
                " AND edgegw_positions.seq < EXCLUDED.seq)"
                " OR (edgegw_positions.epoch <> EXCLUDED.epoch AND EXISTS (SELECT 1 FROM"
                " edgegw_gateways g WHERE g.gateway_id = EXCLUDED.gateway_id"
                " AND g.generation = %s))",
                (gateway, epoch, seq, positions, generation))
            return cur.rowcount == 1

        return await self._call(run)

    async def load_positions(self, gateway: str) -> StoredPositions | None:
        def run(conn: psycopg.Connection[Any]) -> StoredPositions | None:
            row = conn.execute("SELECT epoch, seq, positions, updated FROM edgegw_positions"
                               " WHERE gateway_id = %s", (gateway,)).fetchone()
            return None if row is None else StoredPositions(row[0], int(row[1]),
                                                            bytes(row[2]), float(row[3]))

        return await self._call(run)

    # -- partitions --
    async def partition_head(self, partition: int) -> int:
        """The partition's last pseq (0: nothing yet)."""
        def run(conn: psycopg.Connection[Any]) -> int:
            row = conn.execute("SELECT last_pseq FROM edgegw_partition_heads WHERE"
                               " partition = %s", (partition,)).fetchone()
            return int(row[0]) if row else 0

        return await self._call(run)

    async def read_partition(self, partition: int, after_pseq: int, limit: int = 500,
                             ) -> list[LogChunk]:
        """The partition's log rows after ``after_pseq``, in pseq order, decoded (in the
        worker thread).  Rows numbered below the oldest kept one were pruned; a reader
        starts from a checkpoint (``load_checkpoint``), which pruning never passes."""
        def run(conn: psycopg.Connection[Any]) -> list[LogChunk]:
            rows = conn.execute(
                "SELECT pseq, gateway_id, epoch, seq, body FROM edgegw_partition_log"
                " WHERE partition = %s AND pseq > %s ORDER BY pseq LIMIT %s",
                (partition, after_pseq, limit)).fetchall()
            out = []
            for pseq, gw, epoch, seq, body in rows:
                try:
                    first_rid, records = decode_chunk(body)
                except (FrameError, ProtocolError, zlib.error) as exc:
                    # stored by this code from a frame that decoded: corruption, not input
                    log.error("partition %d pseq %d: undecodable chunk skipped: %s",
                              partition, pseq, exc)
                    first_rid, records = 0, []
                out.append(LogChunk(pseq, gw, first_rid, records, epoch, seq))
            return out

        return await self._call(run)

    async def save_checkpoint(self, partition: int, pseq: int, token: int, blob: bytes
                              ) -> bool:
        """Store the partition's state checkpoint at ``pseq``, written under lease
        ``token``: False (nothing written) if a newer owner claimed the partition
        (``claim_partition``) or a checkpoint with a newer token is there -- a stale owner
        whose lease expired cannot overwrite its successor's."""
        def run(conn: psycopg.Connection[Any]) -> bool:
            with conn.transaction():
                if not _fence_holds(conn, partition, token):
                    return False
                failpoints.hit("cluster.mid_checkpoint")
                cur = conn.execute(
                    "INSERT INTO edgegw_partition_checkpoints (partition, pseq, token, blob,"
                    " at) VALUES (%s, %s, %s, %s, %s) ON CONFLICT (partition) DO UPDATE SET"
                    " pseq = EXCLUDED.pseq, token = EXCLUDED.token, blob = EXCLUDED.blob,"
                    " at = EXCLUDED.at WHERE edgegw_partition_checkpoints.token <="
                    " EXCLUDED.token", (partition, pseq, token, blob, time.time()))
                return cur.rowcount == 1

        return await self._call(run)

    async def claim_partition(self, partition: int, token: int) -> bool:
        """A new owner's first step, before it reads anything of the partition: record
        its lease ``token`` as the partition's fence, so that from this commit on every
        write under an older token is refused (``save_checkpoint``, ``save_partition_state``,
        ``save_alerts``, ``save_archives``), even of a row the new owner has not written
        yet.  False: a newer token claimed it already (this lease is stale)."""
        def claim_tx(conn: psycopg.Connection[Any]) -> bool:
            with conn.transaction():
                self._set_local_timeouts(conn)
                cur = conn.execute(
                    "INSERT INTO edgegw_partition_fences (partition, token) VALUES (%s, %s)"
                    " ON CONFLICT (partition) DO UPDATE SET token = EXCLUDED.token"
                    " WHERE edgegw_partition_fences.token <= EXCLUDED.token",
                    (partition, token))
                return cur.rowcount == 1

        def run(conn: psycopg.Connection[Any]) -> bool:
            return self._claiming(conn, claim_tx, "claim_partition", f"partition {partition}",
                                  [("edgegw_partition_fences", "partition", [partition])])

        try:
            return await self._call(run)
        except LockTimeout:
            self.m_lock_timeouts.inc(call="claim_partition")
            log.warning("partition %d: its claim waited %.1f s for the fence row, held by "
                        "another node's transaction (a paused node?); trying again",
                        partition, self.lock_timeout_s)
            raise

    async def load_checkpoint(self, partition: int) -> tuple[int, bytes] | None:
        """(pseq, blob) of the partition's checkpoint, or None."""
        def run(conn: psycopg.Connection[Any]) -> tuple[int, bytes] | None:
            row = conn.execute("SELECT pseq, blob FROM edgegw_partition_checkpoints"
                               " WHERE partition = %s", (partition,)).fetchone()
            return (int(row[0]), bytes(row[1])) if row else None

        return await self._call(run)

    async def max_tokens(self) -> dict[int, int]:
        """Per partition, the newest lease token a checkpoint was written with: after
        Redis lost its data the lease counters must restart above these (``seed_fence``)."""
        def run(conn: psycopg.Connection[Any]) -> dict[int, int]:
            # (every write fenced by a token: checkpoints and hub/state figures, and the
            # claims, the newest of all)
            return dict(conn.execute(
                "SELECT partition, max(token) FROM (SELECT partition, token FROM"
                " edgegw_partition_checkpoints UNION ALL SELECT partition, token FROM"
                " edgegw_partition_state UNION ALL SELECT partition, token FROM"
                " edgegw_partition_fences) AS t GROUP BY partition").fetchall())

        return await self._call(run)

    async def gateway_totals(self, gateways: list[str]) -> dict[str, GatewayTotals]:
        """The cluster-wide totals of ``gateways`` (those with a row)."""
        def run(conn: psycopg.Connection[Any]) -> dict[str, GatewayTotals]:
            return {r[0]: GatewayTotals(*r[1:]) for r in conn.execute(
                "SELECT gateway_id, records_applied, frames_applied, last_rid, last_seen"
                " FROM edgegw_gateways WHERE gateway_id = ANY(%s)", (gateways,)).fetchall()}

        return await self._call(run)

    async def recent_records(self, gateways: list[str], since: float
                             ) -> dict[str, dict[int, int]]:
        """The records of ``gateways`` applied after ``since`` (a date by this node's
        clock), per gateway per whole second of ``applied_at`` moved onto this node's
        clock (``applied_at`` is the database's: shifted by this node's offset to it, as
        read with the query): what a new owner of their topics seeds the
        ``records_per_s`` window with (gateways.py).  One range of the ``applied_at``
        index: the last seconds' frames only."""
        def run(conn: psycopg.Connection[Any]) -> dict[str, dict[int, int]]:
            out: dict[str, dict[int, int]] = {}
            here = time.time()
            for gw, sec, n in conn.execute(
                    f"SELECT gateway_id, floor(applied_at + %s - {_DB_NOW})::bigint,"
                    " sum(n_records)::bigint FROM edgegw_frames"
                    f" WHERE applied_at > %s - %s + {_DB_NOW} AND gateway_id = ANY(%s)"
                    " GROUP BY 1, 2", (here, since, here, gateways)).fetchall():
                out.setdefault(gw, {})[int(sec)] = int(n)
            return out

        return await self._call(run)

    async def save_partition_state(self, partition: int, token: int,
                                   data: dict[str, Any]) -> bool:
        """The owner's ``hub/state`` figures of its partition (``LiveState.warnings``),
        fenced by its lease token as checkpoints are: False when a newer owner claimed
        the partition or wrote."""
        def run(conn: psycopg.Connection[Any]) -> bool:
            with conn.transaction():
                if not _fence_holds(conn, partition, token):
                    return False
                cur = conn.execute(
                    "INSERT INTO edgegw_partition_state (partition, token, data, updated)"
                    " VALUES (%s, %s, %s, %s) ON CONFLICT (partition) DO UPDATE SET"
                    " token = EXCLUDED.token, data = EXCLUDED.data,"
                    " updated = EXCLUDED.updated"
                    " WHERE edgegw_partition_state.token <= EXCLUDED.token",
                    (partition, token, json.dumps(data), time.time()))
                return cur.rowcount == 1

        return await self._call(run)

    async def partition_states(self) -> dict[int, dict[str, Any]]:
        """Every partition's last saved ``hub/state`` figures."""
        def run(conn: psycopg.Connection[Any]) -> dict[int, dict[str, Any]]:
            return {int(p): json.loads(d) for p, d in conn.execute(
                "SELECT partition, data FROM edgegw_partition_state").fetchall()}

        return await self._call(run)

    # -- alerts and archives (what records alone cannot rebuild cheaply) --
    async def save_alerts(self, partition: int, token: int, alerts: list[dict[str, Any]],
                          ) -> dict[str, bool]:
        """Upsert alerts raised by the owner of ``partition`` under lease ``token`` (each
        a dict with ``id``, ``priority``, ``rule``, ``raised_at``, ``acknowledged``: the
        single hub's alert form).  An alert is one row cluster-wide (its id): a new owner
        raising it again after a rebuild finds it there.  A row written under a newer
        token is not overwritten (a stale owner is fenced off), and an acknowledgement
        made on any node is never undone by the owner's copy.  Returns, per id written,
        whether it was new (False: updated; ids fenced off are left out).  Raises
        ``PartitionFenced`` (nothing written) when a newer owner claimed the partition."""
        def run(conn: psycopg.Connection[Any]) -> dict[str, bool]:
            out: dict[str, bool] = {}
            now = time.time()
            with conn.transaction():
                if not _fence_holds(conn, partition, token):
                    raise PartitionFenced(f"partition {partition}: alerts under token {token}")
                for a in alerts:
                    row = conn.execute(
                        "INSERT INTO edgegw_alerts (id, partition, token, priority, rule,"
                        " raised_at, acknowledged, data, updated, written_at) VALUES"
                        f" (%s, %s, %s, %s, %s, %s, %s, %s, %s, {_DB_NOW})"
                        " ON CONFLICT (id) DO UPDATE SET"
                        " token = EXCLUDED.token, priority = EXCLUDED.priority,"
                        " data = EXCLUDED.data, updated = EXCLUDED.updated,"
                        " written_at = EXCLUDED.written_at,"
                        " acknowledged = edgegw_alerts.acknowledged OR EXCLUDED.acknowledged,"
                        " pending = true"  # the alert feed (alertfeed.py) looks again
                        " WHERE edgegw_alerts.token <= EXCLUDED.token"
                        " RETURNING (xmax = 0)",
                        (a["id"], partition, token, a["priority"], a["rule"], a["raised_at"],
                         bool(a.get("acknowledged")), dumps(a), now)).fetchone()
                    if row is not None:
                        out[a["id"]] = bool(row[0])
            return out

        return await self._call(run)

    async def ack_alert(self, alert_id: str, user: str | None, at: float) -> bool:
        """Acknowledge an alert, from any node: True if this call acknowledged it (False:
        unknown, or acknowledged already -- by whoever was first)."""
        def run(conn: psycopg.Connection[Any]) -> bool:
            with conn.transaction():  # at READ COMMITTED, whatever the database's default
                cur = conn.execute(
                    "UPDATE edgegw_alerts SET acknowledged = true, acked_by = %s,"
                    f" acked_at = %s, updated = %s, pending = true, written_at = {_DB_NOW}"
                    " WHERE id = %s"
                    " AND NOT acknowledged", (user, at, at, alert_id))
            return cur.rowcount == 1

        return await self._call(run)

    async def load_alerts(self, limit: int = 1000, partition: int | None = None
                          ) -> list[dict[str, Any]]:
        """The newest alerts (of one partition, or all), newest first, as saved, with the
        acknowledgement as the table has it (``acked_by``, ``acked_at`` added)."""
        def run(conn: psycopg.Connection[Any]) -> list[dict[str, Any]]:
            rows = conn.execute(
                "SELECT data, acknowledged, acked_by, acked_at FROM edgegw_alerts"
                " WHERE %s::integer IS NULL OR partition = %s"
                " ORDER BY raised_at DESC LIMIT %s", (partition, partition, limit)).fetchall()
            out = []
            for data, acked, by, at in rows:
                alert = json.loads(data)
                alert.update(acknowledged=acked, acked_by=by, acked_at=at)
                out.append(alert)
            return out

        return await self._call(run)

    async def pending_alerts(self, limit: int = 500) -> list[tuple[dict[str, Any], str, float]]:
        """Alerts changed since the alert feed last looked (``pending``: set by every
        ``save_alerts`` and ``ack_alert``): ``(alert, fed, updated)``, oldest raised first;
        ``fed`` holds the events the feed already announced (``r`` raised, ``e``
        escalated, ``a`` acknowledged)."""
        def run(conn: psycopg.Connection[Any]) -> list[tuple[dict[str, Any], str, float]]:
            rows = conn.execute(
                "SELECT data, acknowledged, acked_by, acked_at, fed, updated FROM edgegw_alerts"
                " WHERE pending ORDER BY raised_at LIMIT %s", (limit,)).fetchall()
            out = []
            for data, acked, by, at, fed, updated in rows:
                alert = json.loads(data)
                alert.update(acknowledged=acked, acked_by=by, acked_at=at)
                out.append((alert, fed, updated))
            return out

        return await self._call(run)

    async def mark_fed(self, items: list[tuple[str, str, float]]) -> set[str]:
        """``(id, fed, updated)``: the feed announced these events of these alerts.  A row
        changed since it was read (``updated`` differs) stays pending, its ``fed`` as it
        was: looked at again.  Returns the ids written."""
        def run(conn: psycopg.Connection[Any]) -> set[str]:
            done = set()
            with conn.transaction():
                for alert_id, fed, updated in items:
                    cur = conn.execute("UPDATE edgegw_alerts SET pending = false, fed = %s"
                                       " WHERE id = %s AND updated = %s",
                                       (fed, alert_id, updated))
                    if cur.rowcount == 1:
                        done.add(alert_id)
            return done

        return await self._call(run)

    # -- the alert feed's webhook outbox (alertfeed.py, edgegw.hub.alerts.outbox) --
    async def queue_webhooks(self, rows: list[tuple[str, str, str, float]]
                             ) -> set[tuple[str, str]]:
        """``(url, event key, payload JSON, queued at)``: the events the feed is about to
        send.  Returns the ``(url, key)`` written now; a row there already (sent, or left
        for this holder's resend) is kept as it is."""
        def run(conn: psycopg.Connection[Any]) -> set[tuple[str, str]]:
            new = set()
            with conn.transaction():
                for url, key, payload, at in rows:
                    if conn.execute("INSERT INTO edgegw_webhook_outbox (url, event_key,"
                                    " payload, queued_at) VALUES (%s, %s, %s, %s)"
                                    " ON CONFLICT DO NOTHING", (url, key, payload, at)
                                    ).rowcount == 1:
                        new.add((url, key))
            return new

        return await self._call(run)

    async def undelivered_webhooks(self) -> list[tuple[str, str, str, float]]:
        """The outbox rows without an outcome, oldest first."""
        def run(conn: psycopg.Connection[Any]) -> list[tuple[str, str, str, float]]:
            return [tuple(r) for r in conn.execute(
                "SELECT url, event_key, payload, queued_at FROM edgegw_webhook_outbox"
                " WHERE outcome IS NULL ORDER BY queued_at").fetchall()]

        return await self._call(run)

    async def mark_webhooks(self, marks: list[tuple[str, str, str]],
                            prune_before: float | None = None) -> None:
        """``(url, event key, outcome)``: finished with.  Rows finished and queued before
        ``prune_before`` are deleted."""
        def run(conn: psycopg.Connection[Any]) -> None:
            with conn.transaction():
                for url, key, outcome in marks:
                    conn.execute("UPDATE edgegw_webhook_outbox SET outcome = %s"
                                 " WHERE url = %s AND event_key = %s", (outcome, url, key))
                if prune_before is not None:
                    conn.execute("DELETE FROM edgegw_webhook_outbox WHERE outcome IS NOT NULL"
                                 " AND queued_at < %s", (prune_before,))

        return await self._call(run)

    async def known_gateways(self) -> list[str]:
        """Every gateway that ever claimed a connection (for ``gateway_offline``)."""
        def run(conn: psycopg.Connection[Any]) -> list[str]:
            return [r[0] for r in conn.execute(
                "SELECT gateway_id FROM edgegw_gateways WHERE generation > 0").fetchall()]

        return await self._call(run)

    async def save_archives(self, token: int, lots: list[tuple[str, dict[str, Any], int]],
                            wafers: list[tuple[str, str, dict[str, Any], int]],
                            partition: int | None = None) -> int:
        """A partition owner's archived lots (``(lot_id, {"lot": summary, ...}, pseq)``)
        and wafers (``(lot_id, wafer_id, snapshot, pseq)``), as the single hub's history
        store keeps them, under the owner's lease ``token``; ``pseq``: the partition log
        row whose records made the archive.  A stored archive is replaced only by one

        * made at a later log position (``pseq`` greater): a new owner replaying the log
          after an ownership move archives the same lot or wafer at the same position
          again, and that is not written a second time;
        * under a token at least as new (a stale owner is fenced off);
        * with as many parts or more (never regress: a rebuild from a pruned log).

        Constraints, not timing.  Returns how many were not written.  With ``partition``
        (the owner's): ``PartitionFenced``, nothing written, when a newer owner claimed it."""
        def run(conn: psycopg.Connection[Any]) -> int:
            written = 0
            with conn.transaction():
                if partition is not None and not _fence_holds(conn, partition, token):
                    raise PartitionFenced(f"partition {partition}: archives under token {token}")
                rows = _PgRows(conn, token)
                batch = [("lot", lot_id, "", a, pseq) for lot_id, a, pseq in lots]
                batch.extend(("wafer", lot_id, wafer_id, snap, pseq)
                             for lot_id, wafer_id, snap, pseq in wafers)
                # (in the order merging needs: a later pass after the archives before it)
                batch.sort(key=lambda item: archive_key(item[0], item[3]))
                for kind, lot_id, wafer_id, data, pseq in batch:
                    rows.pseq = pseq
                    if kind == "wafer" and data.get("counts_from") is not None:
                        written += merge_wafer_archive(rows, lot_id, wafer_id, data)
                    elif kind == "wafer":
                        written += conn.execute(
                            "INSERT INTO edgegw_wafers (lot_id, wafer_id, updated, summary,"
                            " snapshot, parts, pseq, token)"
                            " VALUES (%s, %s, %s, %s, %s, %s, %s, %s)"
                            " ON CONFLICT (lot_id, wafer_id) DO UPDATE SET"
                            " updated = EXCLUDED.updated, summary = EXCLUDED.summary,"
                            " snapshot = EXCLUDED.snapshot, parts = EXCLUDED.parts,"
                            " pseq = EXCLUDED.pseq, token = EXCLUDED.token,"
                            f" archived_at = {_DB_NOW}"
                            " WHERE EXCLUDED.parts >= edgegw_wafers.parts"
                            " AND EXCLUDED.pseq > edgegw_wafers.pseq"
                            " AND EXCLUDED.token >= edgegw_wafers.token",
                            (*wafer_row(lot_id, wafer_id, data), pseq, token)).rowcount
                    elif data["lot"].get("counts_from") is not None:
                        written += merge_lot_archive(rows, lot_id, data)
                    else:
                        written += conn.execute(
                            "INSERT INTO edgegw_lots (lot_id, updated, summary, archive, parts,"
                            " pseq, token) VALUES (%s, %s, %s, %s, %s, %s, %s)"
                            " ON CONFLICT (lot_id) DO UPDATE SET"
                            " updated = EXCLUDED.updated, summary = EXCLUDED.summary,"
                            " archive = EXCLUDED.archive, parts = EXCLUDED.parts,"
                            " pseq = EXCLUDED.pseq, token = EXCLUDED.token,"
                            f" archived_at = {_DB_NOW}"
                            " WHERE EXCLUDED.parts >= edgegw_lots.parts"
                            " AND EXCLUDED.pseq > edgegw_lots.pseq"
                            " AND EXCLUDED.token >= edgegw_lots.token",
                            (*lot_row(lot_id, data), pseq, token)).rowcount
            return len(lots) + len(wafers) - written

        return await self._call(run)

    async def lot_archive(self, lot_id: str) -> dict[str, Any] | None:
        """An archived lot (``lot_archive`` shape), or None."""
        rows = await self.query("SELECT archive FROM edgegw_lots WHERE lot_id = %s", (lot_id,))
        return json.loads(rows[0][0]) if rows else None

    async def wafer_archive(self, lot_id: str, wafer_id: str) -> dict[str, Any] | None:
        """An archived wafer's snapshot, or None."""
        rows = await self.query("SELECT snapshot FROM edgegw_wafers WHERE lot_id = %s"
                                " AND wafer_id = %s", (lot_id, wafer_id))
        return json.loads(rows[0][0]) if rows else None

    async def lot_summaries(self, limit: int = 500, before: float | None = None,
                            before_lot: str | None = None) -> list[dict[str, Any]]:
        """Archived lots' summaries, most recently updated first (then by lot id, down);
        ``before`` (``before_lot``): only those below it in that order (as the single
        hub's ``HistoryStore.lot_summaries``)."""
        bound = float("inf") if before is None else before
        rows = await self.query("SELECT summary FROM edgegw_lots WHERE updated < %s"
                                # byte order, as Python orders the ids (not the locale's)
                                ' OR (updated = %s AND lot_id COLLATE "C" < %s)'
                                ' ORDER BY updated DESC, lot_id COLLATE "C" DESC LIMIT %s',
                                (bound, bound, before_lot or "", limit))
        return [json.loads(r[0]) for r in rows]

    async def wafer_summaries(self, lot_id: str) -> list[dict[str, Any]]:
        """A lot's archived wafers (``WAFER_SUMMARY`` keys), in the order they left memory."""
        rows = await self.query("SELECT summary FROM edgegw_wafers WHERE lot_id = %s"
                                " ORDER BY ord", (lot_id,))
        return [json.loads(r[0]) for r in rows]

    async def prune_history(self, older_than: float, batch: int = 1000) -> int:
        """Delete the lot and wafer archives last written before ``older_than`` (a date by
        this node's clock, taken as an age against the database's, which dates
        ``archived_at``, as ``prune`` does for frames); how many rows went.  Short
        transactions, in batches."""
        age = time.time() - older_than

        def run(conn: psycopg.Connection[Any]) -> int:
            with conn.transaction():
                return sum(conn.execute(
                    f"DELETE FROM {table} WHERE ctid IN (SELECT ctid FROM {table}"
                    f" WHERE archived_at < {_DB_NOW} - %s LIMIT %s)", (age, batch)).rowcount
                    for table in ("edgegw_wafers", "edgegw_lots"))

        total = 0
        while n := await self._call(run):
            total += n
        return total

    async def prune_alerts(self, older_than: float, batch: int = 1000) -> int:
        """Delete the alerts last written before ``older_than`` (as ``prune_history``: an
        age against the database's clock, which dates ``written_at``) -- but none the alert
        feed has still to announce (``pending``); how many went."""
        age = time.time() - older_than

        def run(conn: psycopg.Connection[Any]) -> int:
            with conn.transaction():
                return conn.execute(
                    "DELETE FROM edgegw_alerts WHERE ctid IN (SELECT ctid FROM edgegw_alerts"
                    f" WHERE written_at < {_DB_NOW} - %s AND NOT pending LIMIT %s)",
                    (age, batch)).rowcount

        total = 0
        while n := await self._call(run):
            total += n
        return total

    async def archive_counts(self) -> tuple[int, int]:
        """``(lots, wafers)`` archived in the cluster's life (its rows)."""
        rows = await self.query("SELECT (SELECT count(*) FROM edgegw_lots),"
                                " (SELECT count(*) FROM edgegw_wafers)")
        return int(rows[0][0]), int(rows[0][1])

    # -- retention --
    async def prune(self, older_than: float, max_bytes: int | None = None,
                    up_to_id: int | None = None, batch: int = 5000) -> int:
        """Delete partition-log rows applied before ``older_than`` (Unix time by this
        node's clock, cut as the age ``time.time() - older_than`` by the database's clock,
        which dates ``applied_at``; 0: no cut by age) -- and, while
        the logs exceed ``max_bytes``, the oldest -- but never a row above its partition's
        checkpoint (a new owner rebuilds from the checkpoint and the rows after it), and
        frame rows (the duplicate check's second line) by age.  ``up_to_id`` is the single
        hub's frame-id limit and means nothing here.  Short transactions, in batches;
        returns how many log rows went.  The applied sets stay: a resend of a pruned frame
        is still dropped as a duplicate."""
        del up_to_id

        def delete_log(conn: psycopg.Connection[Any], where: str, params: tuple[Any, ...]
                       ) -> int:
            """Delete the chosen log rows and take their bytes off their heads' counts,
            in one transaction."""
            with conn.transaction():
                gone = conn.execute(
                    "DELETE FROM edgegw_partition_log l USING ("
                    " SELECT l2.partition, l2.pseq FROM edgegw_partition_log l2"
                    " JOIN edgegw_partition_checkpoints c ON c.partition = l2.partition"
                    f" WHERE l2.pseq <= c.pseq {where}) d"
                    " WHERE l.partition = d.partition AND l.pseq = d.pseq"
                    " RETURNING l.partition, length(l.body)", params).fetchall()
                freed: collections.Counter[int] = collections.Counter()
                for p, size in gone:
                    freed[p] += size
                for p in sorted(freed):  # heads in partition order, as commits lock them
                    conn.execute("UPDATE edgegw_partition_heads SET log_bytes = log_bytes - %s"
                                 " WHERE partition = %s", (freed[p], p))
            return len(gone)

        # By the database's clock, as ``applied_at`` is written: ``older_than`` (a date by
        # this node's clock, held back from its forward steps: retention.py) is taken as
        # an age, so a node whose wall clock is ahead of the others' -- or started ahead
        # -- deletes nothing they still count as recent.
        age = time.time() - older_than if older_than > 0 else math.inf

        def run_age(conn: psycopg.Connection[Any]) -> tuple[int, int]:
            n = delete_log(conn, f"AND l2.applied_at < {_DB_NOW} - %s LIMIT %s", (age, batch))
            frames = conn.execute(
                "DELETE FROM edgegw_frames WHERE ctid IN (SELECT ctid FROM edgegw_frames"
                f" WHERE applied_at < {_DB_NOW} - %s LIMIT %s)", (age, batch)).rowcount
            return n, frames

        def run_bytes(conn: psycopg.Connection[Any]) -> int:
            return delete_log(conn, "ORDER BY l2.applied_at LIMIT %s", (batch,))

        total = 0
        while True:
            n, frames = await self._call(run_age)
            total += n
            if n == 0 and frames == 0:
                break
        if max_bytes is not None:
            while await self.measure() > max_bytes and (n := await self._call(run_bytes)):
                total += n
        await self.measure()
        return total

    async def measure(self) -> int:
        """Bytes of the partition logs' (compressed) bodies now, as the commits and
        prunes keep them in the heads (what ``retain_frames_mb`` bounds; a sum over the
        log itself would read terabytes on a floor); sets ``frame_bytes``."""
        def run(conn: psycopg.Connection[Any]) -> int:
            row = conn.execute("SELECT COALESCE(SUM(log_bytes), 0) FROM"
                               " edgegw_partition_heads").fetchone()
            return int(row[0]) if row else 0

        self.frame_bytes = await self._call(run)
        return self.frame_bytes

    async def table_bytes(self) -> dict[str, int]:
        """``pg_total_relation_size`` of each table (indexes and TOAST included)."""
        def run(conn: psycopg.Connection[Any]) -> dict[str, int]:
            return {t: int(conn.execute("SELECT pg_total_relation_size(%s)",
                                        (PREFIX + t,)).fetchone()[0])  # type: ignore[index]
                    for t in TABLES}

        return await self._call(run)

    async def stored_frames(self, decode: Any, after: int = 0, batch: int = 200) -> Any:
        """The single hub's start-up replay: not in a cluster, where each partition's owner
        rebuilds its state from its checkpoint and ``read_partition``."""
        raise NotImplementedError("a cluster node rebuilds live state per partition "
                                  "(read_partition), not by replaying every frame")
        yield  # pragma: no cover  (an async generator, as HubStore's)

    async def query(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        """A read-only query (psycopg placeholders: ``%s``)."""
        def run(conn: psycopg.Connection[Any]) -> list[tuple[Any, ...]]:
            return conn.execute(sql, params).fetchall()

        return await self._call(run)


def _ms(seconds: float) -> str:
    """A PostgreSQL timeout setting: whole milliseconds, at least 1 (0 would mean never)."""
    return str(max(1, round(seconds * 1000)))


class _PgRows:
    """``ArchiveRows`` over an owner's transaction (``save_archives``): the merged rows
    are written with the log position (``pseq``) and lease token of the archive being
    merged; a replay of it finds its pass in the stored row and writes nothing."""

    def __init__(self, conn: psycopg.Connection[Any], token: int) -> None:
        self.conn = conn
        self.token = token
        self.pseq = 0

    def lot(self, lot_id: str) -> dict[str, Any] | None:
        row = self.conn.execute("SELECT archive FROM edgegw_lots WHERE lot_id = %s",
                                (lot_id,)).fetchone()
        return json.loads(row[0]) if row else None

    def wafer(self, lot_id: str, wafer_id: str) -> dict[str, Any] | None:
        row = self.conn.execute("SELECT snapshot FROM edgegw_wafers WHERE lot_id = %s"
                                " AND wafer_id = %s", (lot_id, wafer_id)).fetchone()
        return json.loads(row[0]) if row else None

    def wafer_ids(self, lot_id: str) -> set[str]:
        return {r[0] for r in self.conn.execute(
            "SELECT wafer_id FROM edgegw_wafers WHERE lot_id = %s", (lot_id,)).fetchall()}

    def put_lot(self, lot_id: str, archive: dict[str, Any]) -> None:
        self.conn.execute(
            "INSERT INTO edgegw_lots (lot_id, updated, summary, archive, parts, pseq, token)"
            " VALUES (%s, %s, %s, %s, %s, %s, %s) ON CONFLICT (lot_id) DO UPDATE SET"
            " updated = EXCLUDED.updated, summary = EXCLUDED.summary,"
            " archive = EXCLUDED.archive, parts = EXCLUDED.parts,"
            " pseq = GREATEST(edgegw_lots.pseq, EXCLUDED.pseq), token = EXCLUDED.token,"
            f" archived_at = {_DB_NOW} WHERE EXCLUDED.token >= edgegw_lots.token",
            (*lot_row(lot_id, archive), self.pseq, self.token))

    def put_wafer(self, lot_id: str, wafer_id: str, snap: dict[str, Any]) -> None:
        self.conn.execute(
            "INSERT INTO edgegw_wafers (lot_id, wafer_id, updated, summary, snapshot, parts,"
            " pseq, token) VALUES (%s, %s, %s, %s, %s, %s, %s, %s)"
            " ON CONFLICT (lot_id, wafer_id) DO UPDATE SET"
            " updated = EXCLUDED.updated, summary = EXCLUDED.summary,"
            " snapshot = EXCLUDED.snapshot, parts = EXCLUDED.parts,"
            " pseq = GREATEST(edgegw_wafers.pseq, EXCLUDED.pseq), token = EXCLUDED.token,"
            f" archived_at = {_DB_NOW} WHERE EXCLUDED.token >= edgegw_wafers.token",
            (*wafer_row(lot_id, wafer_id, snap), self.pseq, self.token))


def _fence_holds(conn: psycopg.Connection[Any], partition: int, token: int) -> bool:
    """In an owner's write transaction: no newer owner has claimed ``partition``.  The
    fence row stays share-locked to the commit, so a claim waits for the write, and the new
    owner, reading after its claim, sees it (no claim yet: the row-level tokens decide)."""
    row = conn.execute("SELECT token FROM edgegw_partition_fences WHERE partition = %s"
                       " FOR SHARE", (partition,)).fetchone()
    return row is None or int(row[0]) <= token


__all__ = ["ClusterStore", "GatewaySuperseded", "GatewayTotals", "LockTimeout", "LogChunk",
           "PartitionMismatch",
           "SessionEnded", "ShardLabels", "ShardMismatch", "StoreUnavailable", "decode_chunk"]
