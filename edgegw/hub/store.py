"""The hub's durable store: SQLite in WAL mode.

What the exactly-once promise rests on: a frame's body, the (gateway, epoch) applied set
and the counters are written in ONE transaction, committed with ``synchronous=FULL``,
before the frame is acknowledged.  A hub killed after an acknowledgement has the frame;
a hub killed before it has nothing, and the gateway resends; a resend of an applied
frame is found in the applied set and dropped.  ``commit`` itself checks every frame
against the applied set, under a lock that makes check and write one step, so no caller
(two connections of one gateway racing, a takeover) can apply a frame twice.
Beside each applied set of seqs the (gateway, epoch) applied set of record ids is kept
and written the same way (``screen_rids``): records a gateway sends again under a new seq
(a gateway bug) are not applied twice either.

SQLite calls block, so they run in a worker thread (``trio.to_thread``) behind a
one-slot limiter: one connection, used by one thread at a time.  Frames arriving while a
commit is in flight are committed together (group commit), which is what keeps the
fsync cost per frame low.

Frame bodies are stored compressed (``codec`` 1: zlib of the CBOR body, about 10 bytes per
record against the tester's 17-80 bytes of STDF; ``bench/hub_bytes.py``).  The compression
runs in the commit's worker thread (zlib releases the GIL).  ``frame_bytes`` -- the stored
bodies' total, kept in ``meta`` in the same transactions that add and delete frames -- is
what ``hub.retain_frames_mb`` bounds (docs/storage.md).

A full disk (``SQLITE_FULL``, ``ENOSPC``) raises ``StoreFull`` from ``commit``: the
transaction was rolled back and the in-memory sets restored, so the caller may simply try
the same frames again later (the hub pauses acknowledgements and retries).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import os
import secrets
import shutil
import sqlite3
import time
import zlib
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol, TypeVar

import trio

from .. import failpoints
from ..protocol import Rows, encode_body
from ..protocol.intervals import IntervalSet
from ..startup import damaged_database

if TYPE_CHECKING:
    from ..protocol import Columns
    from ..records import Record

SCHEMA = """
CREATE TABLE IF NOT EXISTS applied (
    gateway TEXT NOT NULL,
    epoch TEXT NOT NULL,
    ranges TEXT NOT NULL,
    updated REAL NOT NULL,
    rids TEXT NOT NULL DEFAULT '[]',
    PRIMARY KEY (gateway, epoch)
);
CREATE TABLE IF NOT EXISTS gateway_stats (
    gateway TEXT PRIMARY KEY,
    epoch TEXT,
    frames_applied INTEGER NOT NULL DEFAULT 0,
    records_applied INTEGER NOT NULL DEFAULT 0,
    duplicates_dropped INTEGER NOT NULL DEFAULT 0,
    frames_rejected INTEGER NOT NULL DEFAULT 0,
    frames_lost INTEGER NOT NULL DEFAULT 0,
    last_seq INTEGER NOT NULL DEFAULT 0,
    last_seen REAL
);
CREATE TABLE IF NOT EXISTS frames (
    id INTEGER PRIMARY KEY,
    gateway TEXT NOT NULL,
    epoch TEXT NOT NULL,
    seq INTEGER NOT NULL,
    first_rid INTEGER NOT NULL,
    n_records INTEGER NOT NULL,
    applied_at REAL NOT NULL,
    body BLOB NOT NULL,
    codec INTEGER NOT NULL DEFAULT 0,
    UNIQUE (gateway, epoch, seq)
);
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS positions (
    gateway TEXT PRIMARY KEY,
    epoch TEXT NOT NULL,
    seq INTEGER NOT NULL,
    positions BLOB NOT NULL,
    updated REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS rejected (
    id INTEGER PRIMARY KEY,
    gateway TEXT NOT NULL,
    epoch TEXT NOT NULL,
    seq INTEGER NOT NULL,
    reason TEXT NOT NULL,
    at REAL NOT NULL,
    body BLOB
);
"""

#: how a stored body is encoded: 0 the CBOR body as received, 1 zlib of it
CODEC_RAW = 0
CODEC_ZLIB = 1
_ZLIB_LEVEL = 6  # 10 B/record at ~600k records/s; level 9 saves 2% at a fifth of the speed


def pack_body(body: bytes) -> tuple[int, bytes]:
    """A frame body as stored: (codec, bytes)."""
    return (CODEC_ZLIB, zlib.compress(body, _ZLIB_LEVEL)) if body else (CODEC_RAW, body)


def unpack_body(codec: int, stored: bytes) -> bytes:
    """The CBOR frame body of a stored row (``SELECT codec, body FROM frames``)."""
    if codec == CODEC_ZLIB:
        return zlib.decompress(stored)
    if codec == CODEC_RAW:
        return bytes(stored)
    raise ValueError(f"unknown frame body codec {codec}")


class StoreFull(OSError):
    """The disk (or the file system's quota) is full: nothing was written."""


class StoreUnavailable(OSError):
    """The store's server (a cluster's PostgreSQL) cannot be reached: nothing was written,
    or -- a commit whose answer was lost -- it was, and trying the same again finds its
    frames applied.  Like ``StoreFull``, a condition that passes: the hub pauses
    acknowledgements and tries again."""


class StoreDamaged(StoreUnavailable):
    """SQLite found the store's file damaged while the hub runs (SQLITE_CORRUPT,
    SQLITE_NOTADB: a failing disk, another program writing into it): nothing was written.
    Handled as an unavailable store -- acknowledgements pause, the gateways keep their
    frames in their spools, health says why -- never as one connection's internal error
    (each gateway closed with 1011 and reconnecting, again and again): what is needed
    is an operator, with the hub stopped (docs/operations.md, "A damaged database")."""


class LockTimeout(StoreUnavailable):
    """A cluster claim waited its lock timeout for a row another session's transaction
    holds (a paused node's, until PostgreSQL ends that session): nothing written, but the
    server answers -- the store is not unavailable.  A ``StoreUnavailable`` so that the
    retry loops try it again; the store has counted and logged it."""


class SessionEnded(StoreUnavailable):
    """PostgreSQL ended the session a call ran on (SQLSTATE 57P01: another node ended it
    as a paused node's, or an operator did; 25P03/57P05: its idle timeouts): the server
    answered, so the store is not unavailable, and the call is tried again on a new
    session (as after any ``StoreUnavailable``, safe: a commit that did go through finds
    its frames applied).  Should the server be going down (a shutdown ends sessions with
    57P01 too), the new session's connect fails and that marks the store unavailable."""

    def __init__(self, message: str, sqlstate: str) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate


class GatewaySuperseded(Exception):
    """A newer connection of the gateway claimed it (on this node or another): this
    connection's commit was refused (nothing written) and it must close (4008)."""

    def __init__(self, gateway: str, generation: int, current: int | None) -> None:
        super().__init__(f"gateway {gateway}: connection generation {generation} superseded "
                         f"by {current}")
        self.gateway = gateway
        self.generation = generation
        self.current = current


#: an I/O error with less room than this on the store's file system is taken for a full
#: disk (SQLite reports some ENOSPC as SQLITE_IOERR, e.g. growing the WAL index); with more,
#: for a failing disk.  Either way acknowledgements pause and the commit is retried: only
#: the reason the hub gives differs.
NEARLY_FULL_BYTES = 16 << 20


def _is_full(exc: BaseException, path: Path) -> bool:
    """SQLITE_FULL, or an I/O error on a (nearly) full file system, or the OS's own
    ENOSPC/EDQUOT: a condition that passes when space returns."""
    if isinstance(exc, sqlite3.Error):
        code = getattr(exc, "sqlite_errorcode", 0) & 0xFF
        return code == sqlite3.SQLITE_FULL or (
            code == sqlite3.SQLITE_IOERR and _free_bytes(path) < NEARLY_FULL_BYTES)
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


def _free_bytes(path: Path) -> int:
    """Bytes free for this process beside ``path`` (``shutil.disk_usage``: statvfs's
    f_bavail on POSIX, GetDiskFreeSpaceEx on Windows, which has no ``os.statvfs``)."""
    try:
        return shutil.disk_usage(path.parent).free
    except OSError:
        return 0


def _store_error(exc: BaseException, path: Path) -> OSError | None:
    """What a failed write of the store at ``path`` means for the hub: ``StoreFull``,
    ``StoreDamaged`` (the file damaged, or its disk failing), or None (anything else: a
    bug, raised as it is)."""
    if _is_full(exc, path):
        return StoreFull(errno.ENOSPC, f"hub store {path}: {exc}")
    code = getattr(exc, "sqlite_errorcode", 0) & 0xFF if isinstance(exc, sqlite3.Error) else 0
    if code in (sqlite3.SQLITE_IOERR, sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB):
        # a failing disk shows as SQLITE_IOERR first, then as SQLITE_CORRUPT (a WAL index
        # SQLite can no longer read): a write beside the file tells the two apart
        fault = _disk_fault(path)
        if fault is not None:
            name = getattr(exc, "sqlite_errorname", "")
            return StoreDamaged(f"hub.data_dir: {str(path.parent)!r}: the disk is failing "
                                f"({fault}; SQLite: {exc}, {name}): stop the hub and check "
                                "the disk (docs/operations.md, \"A failing disk\")")
    damaged = damaged_database("hub.data_dir", path, exc)
    if damaged is not None:
        return StoreDamaged(str(damaged))
    if code == sqlite3.SQLITE_IOERR:  # the disk took the probe: a passing fault
        return StoreDamaged(f"hub store {path}: {exc} ({getattr(exc, 'sqlite_errorname', '')})")
    return None


def _disk_fault(path: Path) -> str | None:
    """Why a small file cannot be written, synced and removed beside ``path`` (an I/O error,
    a file system turned read-only), or None when it can."""
    probe = path.with_name(f".edgegw-disk-probe-{os.getpid()}")
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, b"probe")
            os.fsync(fd)
        finally:
            os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return None
        return f"{exc.strerror or exc} writing beside it"
    return None


STAT_FIELDS = ("frames_applied", "records_applied", "duplicates_dropped", "frames_rejected",
               "frames_lost", "last_seq")

T = TypeVar("T")

#: the most a per-gateway counter holds (SQLite INTEGER, PostgreSQL bigint): frames_lost
#: saturates there -- a HELLO or LOST may name any seq below 2^63, so two epochs of one
#: gateway could declare more than a 64-bit column takes, and the write would fail
COUNTER_MAX = (1 << 63) - 1


@dataclasses.dataclass
class FrameToApply:
    gateway: str
    epoch: str
    seq: int
    first_rid: int
    n_records: int
    body: bytes
    #: frames.id once committed: the frame's position in the store's applied order
    id: int = 0
    #: the body's records, decoded (the cluster store splits them by partition)
    records: list[Record] | None = None
    #: or the body, checked, its records built when first asked for (``record_list``)
    decoded: Columns | Rows | None = None

    #: how many of its records (as received) had record ids applied already (a gateway
    #: bug, ``screen_rids``): all of them (``all_seen``), the frame was dropped; else it
    #: was ``cut`` to its new records, or (not cut) applied whole, those records twice
    records_seen: int = 0
    all_seen: bool = False
    cut: bool = False
    #: a frame whose seq was applied already (a duplicate): how many of its records were
    #: not (``records_not_applied``): the gateway reused the seq for new records, which
    #: are dropped with it (counted and logged, never silent)
    seq_reused: int = 0

    def record_list(self) -> list[Record] | None:
        """The body's records (``records``, else built from ``decoded``), or None."""
        if self.records is None and self.decoded is not None:
            self.records = self.decoded.records()
        return self.records


#: at most this many ranges in a (gateway, epoch) applied set of record ids: past it the
#: lowest are forgotten (a duplicate of them goes unnoticed; nothing is ever dropped for
#: it).  Holes come from frames dropped or lost at the gateway, one per run of them.
MAX_RID_RANGES = 1024


def screen_rids(f: FrameToApply, rids: IntervalSet) -> bool:
    """Check a frame's record ids against its (gateway, epoch) applied set of record ids
    (docs/protocol.md section 3: a record id is never reused within an epoch) and add
    them to it.  False: every record is applied already -- the frame must be dropped like
    a duplicate.  A frame whose records are applied in part is cut to its new ones when
    they are one run (``cut``; its body re-encoded in the row layout, as the gateway cuts
    frames), else kept whole; either way ``records_seen`` says how many were applied.
    In the usual case (ids above every applied one) this is one insert into the set."""
    n = f.n_records
    if n <= 0:
        return True
    lo, hi = f.first_rid, f.first_rid + n - 1
    new = rids.missing(lo, hi)
    if new != [(lo, hi)]:
        if not new:
            f.records_seen, f.all_seen = n, True
            return False
        f.records_seen += n - sum(b - a + 1 for a, b in new)
        records = f.record_list() if len(new) == 1 else None
        if records is not None:  # one run: cut to it (several runs would be several frames)
            a, b = new[0][0] - lo, new[0][1] - lo + 1
            part = records[a:b]
            f.first_rid, f.n_records, f.records = lo + a, b - a, part
            f.body, f.decoded, f.cut = encode_body(lo + a, part), Rows(part), True
    rids.add_range(lo, hi)
    while len(rids) > MAX_RID_RANGES:
        rids.discard_through(rids.ranges()[0][1])
    return True


def records_not_applied(first_rid: int, n: int, rids: IntervalSet) -> int:
    """How many of the record ids ``first_rid..first_rid+n-1`` of a *duplicate* frame (its
    seq applied already) are not in the applied set of record ids: 0 for a true duplicate;
    more when the gateway reused the seq for other records (docs/protocol.md section 3).
    An empty set is a store from before record ids: nothing is taken for reuse.  A set
    that may have been trimmed (``MAX_RID_RANGES``: at least half as many ranges) may have
    forgotten ids below its lowest range: they are not taken for reuse either.  (A set
    trimmed and then halved by late frames filling its holes would count them: rare, and
    it is a count, never a record dropped.)"""
    ranges = rids.ranges()
    if n <= 0 or not ranges:
        return 0
    lo, hi = first_rid, first_rid + n - 1
    if len(ranges) >= MAX_RID_RANGES // 2:
        lo = max(lo, ranges[0][0])
        if lo > hi:
            return 0
    return sum(b - a + 1 for a, b in rids.missing(lo, hi))


@dataclasses.dataclass
class GatewayStats:
    gateway: str
    epoch: str | None = None
    frames_applied: int = 0
    records_applied: int = 0
    duplicates_dropped: int = 0
    frames_rejected: int = 0
    frames_lost: int = 0
    last_seq: int = 0
    last_seen: float | None = None


class GatewayClaim(NamedTuple):
    """What a store answers a gateway's HELLO with: the connection's generation (what its
    commits are fenced with; 0 in a single hub, where the registry does it) and the
    (gateway, epoch) applied set for WELCOME."""

    generation: int
    applied: IntervalSet
    #: the (gateway, epoch) applied set of record ids, as of the claim: what a duplicate
    #: of a frame applied before the connection is checked against (``records_not_applied``;
    #: None: not known, not checked)
    rids: IntervalSet | None = None


class StoredPositions(NamedTuple):
    """The source positions a hub keeps for a gateway (docs/protocol.md section 4.1): the
    last ones it was told as of a frame when every frame of its epoch up to that one was
    applied."""

    epoch: str
    seq: int
    positions: bytes  # CBOR, as the gateway sent them
    updated: float  # the hub's clock when they were written


#: keeps a gateway's newest positions: those of a later frame of its epoch, or of another
#: epoch (a gateway whose store started afresh tells its new epoch's from its first frame)
SAVE_POSITIONS_SQLITE = (
    "INSERT INTO positions (gateway, epoch, seq, positions, updated) VALUES (?, ?, ?, ?, ?)"
    " ON CONFLICT (gateway) DO UPDATE SET epoch = excluded.epoch, seq = excluded.seq,"
    " positions = excluded.positions, updated = excluded.updated"
    " WHERE positions.epoch != excluded.epoch OR positions.seq < excluded.seq")


class IngestStore(Protocol):
    """What ``Ingest`` needs of a store: the single hub's ``HubStore`` (SQLite) and a
    cluster node's ``ClusterStore`` (PostgreSQL, edgegw/hub/cluster/pgstore.py)."""

    stats: dict[str, GatewayStats]
    frame_bytes: int
    full: bool

    async def open(self) -> None: ...
    async def close(self) -> None: ...
    async def claim(self, gateway_id: str, epoch: str) -> GatewayClaim: ...
    async def commit(self, frames: list[FrameToApply],
                     generations: Mapping[str, int] | None = None,
                     lost: dict[tuple[str, str], tuple[int, int]] | None = None,
                     rejected: list[tuple[FrameToApply, str]] | None = None,
                     ) -> set[tuple[str, str, int]]: ...
    async def declare_lost(self, gateway: str, epoch: str, up_to: int, count: int,
                           generation: int = 0) -> None: ...
    def count_duplicate(self, gateway: str) -> None: ...
    async def save_positions(self, gateway: str, epoch: str, seq: int,
                             positions: bytes, generation: int = 0) -> bool: ...
    async def load_positions(self, gateway: str) -> StoredPositions | None: ...
    def health_problem(self) -> str | None: ...
    async def prune(self, older_than: float, max_bytes: int | None = None,
                    up_to_id: int | None = None, batch: int = 2000) -> int: ...
    def stored_frames(self, decode: Callable[[int, str, str, int, int, bytes], T | None],
                      after: int = 0, batch: int = 200) -> AsyncIterator[list[T]]: ...


class HubStore:
    def __init__(self, path: str | Path, keep_bodies: bool = True) -> None:
        self.path = Path(path)
        self.keep_bodies = keep_bodies
        self._db: sqlite3.Connection | None = None
        self._limiter = trio.CapacityLimiter(1)
        self._commit_lock = trio.Lock()  # check-and-apply of applied sets is one step
        self.stats: dict[str, GatewayStats] = {}
        #: the applied sets of seqs read from the file, by (gateway, epoch): those of the
        #: epochs claimed or committed since the start, only the claimed epoch of each
        #: gateway kept (``_load``).  Not every row: a gateway that starts a new epoch at
        #: each start (frames in memory, an embedded test program) leaves one per run, and
        #: holding them all made memory and start-up grow for good (870 bytes and 7 us
        #: each: 347 MB and 2.9 s at 400,000; bench/hub_epochs.py)
        self.applied: dict[tuple[str, str], IntervalSet] = {}
        #: beside each applied set of seqs, the record ids applied (``screen_rids``)
        self.rids: dict[tuple[str, str], IntervalSet] = {}
        #: bytes of stored frame bodies (what ``retain_frames_mb`` bounds)
        self.frame_bytes = 0
        #: frames.id of the newest frame committed (ids grow in commit order)
        self.last_frame_id = 0
        #: the last commit failed for want of space and nothing has succeeded since
        self.full = False
        #: why the last commit found the file damaged (None: it did not)
        self.damaged: str | None = None
        #: a random id made when the store was created (frame ids mean nothing elsewhere)
        self.store_id = 0

    # -- blocking internals (worker thread) --
    def _open_sync(self) -> None:
        try:
            self._open_db_sync()
        except sqlite3.DatabaseError as exc:
            raise damaged_database("hub.data_dir", self.path, exc) or exc from exc

    def _open_db_sync(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.executescript(SCHEMA)
        frame_cols = {row[1] for row in db.execute("PRAGMA table_info(frames)")}
        if "codec" not in frame_cols:  # a store from before compact bodies: its rows are raw
            db.execute("ALTER TABLE frames ADD COLUMN codec INTEGER NOT NULL DEFAULT 0")
        if "rids" not in {row[1] for row in db.execute("PRAGMA table_info(applied)")}:
            # a store from before the record-id check: it starts with none applied (what
            # came before is not checked against, nothing is dropped for it)
            db.execute("ALTER TABLE applied ADD COLUMN rids TEXT NOT NULL DEFAULT '[]'")
        row = db.execute("SELECT value FROM meta WHERE key = 'frame_bytes'").fetchone()
        if row is None:  # once per store: afterwards every commit and prune keeps it
            total = db.execute("SELECT COALESCE(SUM(length(body)), 0) FROM frames").fetchone()
            db.execute("INSERT INTO meta (key, value) VALUES ('frame_bytes', ?)", total)
            row = total
        self.frame_bytes = row[0]
        row = db.execute("SELECT value FROM meta WHERE key = 'store_id'").fetchone()
        if row is None:  # who this store is: a checkpoint names the store it covers
            row = (secrets.randbits(62),)
            db.execute("INSERT INTO meta (key, value) VALUES ('store_id', ?)", row)
        self.store_id = row[0]
        self.last_frame_id = db.execute("SELECT COALESCE(MAX(id), 0) FROM frames").fetchone()[0]
        self._db = db
        self.applied.clear()  # read again as claimed (``_load``)
        self.rids.clear()
        cols = ", ".join(("gateway", "epoch", *STAT_FIELDS, "last_seen"))
        for row in db.execute(f"SELECT {cols} FROM gateway_stats"):
            self.stats[row[0]] = GatewayStats(*row)

    def _apply_sync(self, frames: list[FrameToApply], lost: dict[tuple[str, str], tuple[int, int]],
                    rejected: list[tuple[FrameToApply, str]],
                    dropped: list[FrameToApply],
                    stats: Mapping[str, GatewayStats]) -> list[int]:
        """Returns the frames' ids (frames.id), in order.  ``stats``: the gateways'
        counters as the commit makes them."""
        db = self._db
        assert db is not None
        now = time.time()
        touched: set[tuple[str, str]] = set()
        packed = [pack_body(f.body if self.keep_bodies else b"") for f in frames]
        added = sum(len(body) for _, body in packed)
        ids: list[int] = []
        try:
            # inside: on a failing disk BEGIN itself fails (SQLITE_IOERR, then SQLITE_CORRUPT
            # from a WAL index it cannot read), and that is no bug of the connection
            db.execute("BEGIN IMMEDIATE")
            for f, (codec, body) in zip(frames, packed, strict=True):
                cur = db.execute(
                    "INSERT INTO frames (gateway, epoch, seq, first_rid, n_records,"
                    " applied_at, body, codec) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (f.gateway, f.epoch, f.seq, f.first_rid, f.n_records, now, body, codec))
                ids.append(cur.lastrowid or 0)
                touched.add((f.gateway, f.epoch))
            if added:
                db.execute("UPDATE meta SET value = value + ? WHERE key = 'frame_bytes'",
                           (added,))
            for f, reason in rejected:
                db.execute("INSERT INTO rejected (gateway, epoch, seq, reason, at, body)"
                           " VALUES (?, ?, ?, ?, ?, ?)",
                           (f.gateway, f.epoch, f.seq, reason, now, f.body))
                touched.add((f.gateway, f.epoch))
            touched.update(lost)
            touched.update((f.gateway, f.epoch) for f in dropped)
            for key in touched:
                rids = self.rids.get(key)
                db.execute("INSERT OR REPLACE INTO applied (gateway, epoch, ranges, updated,"
                           " rids) VALUES (?, ?, ?, ?, ?)",
                           (key[0], key[1], json.dumps(self.applied[key].ranges()), now,
                            json.dumps(rids.ranges() if rids is not None else [])))
                st = stats[key[0]]
                db.execute(
                    "INSERT OR REPLACE INTO gateway_stats (gateway, epoch, frames_applied,"
                    " records_applied, duplicates_dropped, frames_rejected, frames_lost,"
                    " last_seq, last_seen) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (st.gateway, st.epoch, st.frames_applied, st.records_applied,
                     st.duplicates_dropped, st.frames_rejected, st.frames_lost, st.last_seq,
                     st.last_seen))
            failpoints.hit("hub.mid_commit")
            db.execute("COMMIT")
        except BaseException as exc:
            if db.in_transaction:  # (SQLite may have rolled back by itself: SQLITE_FULL)
                with contextlib.suppress(sqlite3.Error):  # the disk may refuse that too
                    db.execute("ROLLBACK")
            known = _store_error(exc, self.path)
            if known is not None:
                raise known from exc
            raise
        self.frame_bytes += added
        if ids:
            self.last_frame_id = ids[-1]
        return ids

    # -- async API --
    async def open(self) -> None:
        await trio.to_thread.run_sync(self._open_sync, limiter=self._limiter)

    async def close(self) -> None:
        if self._db is not None:
            db, self._db = self._db, None
            await trio.to_thread.run_sync(db.close, limiter=self._limiter)

    def applied_set(self, gateway: str, epoch: str) -> IntervalSet:
        """The applied set of a (gateway, epoch) read in by a claim or a commit (``_load``);
        an empty one for a key not read in (nothing applied)."""
        return self.applied.setdefault((gateway, epoch), IntervalSet())

    def rid_set(self, gateway: str, epoch: str) -> IntervalSet:
        return self.rids.setdefault((gateway, epoch), IntervalSet())

    def gateway_stats(self, gateway: str) -> GatewayStats:
        st = self.stats.get(gateway)
        if st is None:
            st = self.stats[gateway] = GatewayStats(gateway)
        return st

    async def claim(self, gateway_id: str, epoch: str) -> GatewayClaim:
        """A gateway's HELLO: one process, so no generation fence (the registry replaces
        an older connection); the applied set is the one in memory, read from the file if
        it is not there, and the gateway's other epochs leave memory (a connection of one
        still open commits them read again: ``commit`` reads in what it checks against)."""
        key = (gateway_id, epoch)
        async with self._commit_lock:  # never between a commit's check and its write
            await self._load([key])
            for other in [k for k in self.applied if k[0] == gateway_id and k != key]:
                del self.applied[other]
                self.rids.pop(other, None)
            return GatewayClaim(0, self.applied[key], self.rids[key])

    async def _load(self, keys: Iterable[tuple[str, str]]) -> None:
        """Read into memory the applied sets of ``keys`` not there (under the commit lock:
        the file holds every commit's sets, written in its transaction)."""
        missing = sorted({k for k in keys if k not in self.applied})
        if missing:
            found = await trio.to_thread.run_sync(self._load_sync, missing,
                                                  limiter=self._limiter)
            for key in missing:
                ranges, rids = found.get(key, ("[]", "[]"))
                self.applied[key] = IntervalSet(json.loads(ranges))
                self.rids[key] = IntervalSet(json.loads(rids))

    def _load_sync(self, keys: list[tuple[str, str]]
                   ) -> dict[tuple[str, str], tuple[str, str]]:
        db = self._db
        if db is None:
            raise StoreUnavailable(f"{self.path}: the store is closed")
        try:
            return {(gw, epoch): (ranges, rids) for key in keys
                    for gw, epoch, ranges, rids in db.execute(
                        "SELECT gateway, epoch, ranges, rids FROM applied"
                        " WHERE gateway = ? AND epoch = ?", key)}
        except BaseException as exc:
            known = _store_error(exc, self.path)
            if known is not None:
                raise known from exc
            raise

    def health_problem(self) -> str | None:
        """Why the store cannot write now (None: it can)."""
        if self.damaged is not None:
            return f"{self.damaged}; acknowledgements paused, gateways spool"
        return "disk full: acknowledgements paused, gateways spool" if self.full else None

    async def commit(self, frames: list[FrameToApply],
                     generations: Mapping[str, int] | None = None,
                     lost: dict[tuple[str, str], tuple[int, int]] | None = None,
                     rejected: list[tuple[FrameToApply, str]] | None = None,
                     ) -> set[tuple[str, str, int]]:
        """Make ``frames`` applied, durably, in one transaction (``generations``: the
        cluster store's fence, unused in one process).  Returns the
        (gateway, epoch, seq) of the frames (and rejected frames) that were skipped because
        they are applied already: the caller counts them as duplicates, acks them, and does
        not hand their records on again.

        Commits run one at a time (``_commit_lock``), and the in-memory applied sets only
        change inside one, so "is it applied?" is checked against exactly what is on disk:
        two connections of one gateway sending the same frame (a takeover, a race) apply
        it once, whatever the timing.  The in-memory sets are updated before the write
        (they are what gets written) and restored if it fails; the counters move once it
        has stood: memory never claims more than the disk has.

        A new seq is then checked by its record ids (``screen_rids``): one whose records
        are all applied is skipped too (``records_seen == n_records``), its seq made
        applied with no frame stored; one applied in part may be cut.
        """
        lost = lost or {}
        async with self._commit_lock:
            await self._load([*((f.gateway, f.epoch) for f in frames), *lost,
                              *((f.gateway, f.epoch) for f, _ in rejected or [])])
            skipped: set[tuple[str, str, int]] = set()
            taken: set[tuple[str, str, int]] = set()
            dropped: list[FrameToApply] = []
            saved_rids: dict[tuple[str, str], IntervalSet] = {}

            def fresh(f: FrameToApply, data: bool = True) -> bool:
                key = (f.gateway, f.epoch, f.seq)
                if key in taken or f.seq in self.applied_set(f.gateway, f.epoch):
                    if data and key not in taken:
                        f.seq_reused = records_not_applied(
                            f.first_rid, f.n_records, self.rid_set(f.gateway, f.epoch))
                    skipped.add(key)
                    return False
                taken.add(key)
                if data:
                    rids = self.rid_set(f.gateway, f.epoch)
                    if (f.gateway, f.epoch) not in saved_rids:
                        saved_rids[(f.gateway, f.epoch)] = IntervalSet(rids.ranges())
                    if not screen_rids(f, rids):
                        skipped.add(key)
                        dropped.append(f)
                        return False
                return True

            try:
                await self._commit_fresh(
                    [f for f in frames if fresh(f)], lost,
                    [(f, why) for f, why in rejected or [] if fresh(f, data=False)], dropped)
            except BaseException:
                # in place: a connection checks its DATA against the set its claim holds
                for key, saved in saved_rids.items():
                    self.rid_set(*key).assign(saved)
                raise
            return skipped

    async def _commit_fresh(self, frames: list[FrameToApply],
                            lost: dict[tuple[str, str], tuple[int, int]],
                            rejected: list[tuple[FrameToApply, str]],
                            dropped: list[FrameToApply]) -> None:
        if not frames and not lost and not rejected and not dropped:
            return
        keys = {(f.gateway, f.epoch) for f in frames} | set(lost) | {
            (f.gateway, f.epoch) for f, _ in rejected} | {(f.gateway, f.epoch) for f in dropped}
        saved_sets = {key: IntervalSet(self.applied_set(*key).ranges()) for key in keys}
        for f in [*frames, *(f for f, _ in rejected), *dropped]:
            self.applied_set(f.gateway, f.epoch).add(f.seq)
        for (gw, epoch), (up_to, _) in lost.items():
            self.applied_set(gw, epoch).add_range(1, up_to)
        # The counters written are copies: the live ones (``/api/stats``) move once the
        # write stands -- moved before it, a read while a failing disk's commits were
        # retried saw records counted that the disk never had, and then saw them go.
        counted = {gw: dataclasses.replace(self.gateway_stats(gw)) for gw, _ in keys}
        now = time.time()
        _count(counted.__getitem__, frames, lost, rejected, dropped, now)
        try:
            ids = await trio.to_thread.run_sync(self._apply_sync, frames, lost, rejected,
                                                dropped, counted, limiter=self._limiter)
        except BaseException as exc:
            for key, saved in saved_sets.items():  # in place, as the record ids (commit)
                self.applied_set(*key).assign(saved)
            self._note_failure(exc)
            raise
        # on the live counters (a duplicate counted meanwhile stays counted)
        _count(self.gateway_stats, frames, lost, rejected, dropped, now)
        self.full = False
        self.damaged = None
        for f, frame_id in zip(frames, ids, strict=True):
            f.id = frame_id

    async def declare_lost(self, gateway: str, epoch: str, up_to: int, count: int,
                           generation: int = 0) -> None:
        """Record that the gateway no longer holds frames below ``up_to`` that we lack."""
        await self.commit([], lost={(gateway, epoch): (up_to, count)})

    def count_duplicate(self, gateway: str) -> None:
        # counted in memory; persisted with the next commit (a lost count is harmless)
        self.gateway_stats(gateway).duplicates_dropped += 1

    async def save_positions(self, gateway: str, epoch: str, seq: int,
                             positions: bytes, generation: int = 0) -> bool:
        """Keep a gateway's source positions as of frame ``seq`` (the caller has checked
        that every frame of the epoch up to it is applied).  False when newer ones are
        kept already (a later frame of the same epoch).  ``generation`` is unused: one
        process, whose registry ends a replaced connection before its successor's
        WELCOME."""
        def run() -> bool:
            db = self._db
            assert db is not None
            try:
                cur = db.execute(SAVE_POSITIONS_SQLITE,
                                 (gateway, epoch, seq, positions, time.time()))
            except BaseException as exc:
                known = _store_error(exc, self.path)
                if known is not None:
                    raise known from exc
                raise
            return cur.rowcount == 1

        try:
            return await trio.to_thread.run_sync(run, limiter=self._limiter)
        except BaseException as exc:
            self._note_failure(exc)  # as a commit says it (/healthz); the next commit tells
            raise

    def _note_failure(self, exc: BaseException) -> None:
        """What a failed write tells ``health_problem``: a full disk, a damaged file."""
        if isinstance(exc, StoreFull):
            self.full = True
        elif isinstance(exc, StoreDamaged):
            self.damaged = str(exc)

    async def load_positions(self, gateway: str) -> StoredPositions | None:
        """The source positions kept for ``gateway`` (None: none)."""
        def run() -> StoredPositions | None:
            assert self._db is not None
            row = self._db.execute("SELECT epoch, seq, positions, updated FROM positions"
                                   " WHERE gateway = ?", (gateway,)).fetchone()
            return None if row is None else StoredPositions(row[0], row[1], bytes(row[2]),
                                                            row[3])

        return await trio.to_thread.run_sync(run, limiter=self._limiter)

    @property
    def busy(self) -> bool:
        """A database call is running in the store's worker thread."""
        return self._limiter.borrowed_tokens > 0

    async def stored_frames(
            self, decode: Callable[[int, str, str, int, int, bytes], T | None],
            after: int = 0, batch: int = 200) -> AsyncIterator[list[T]]:
        """Every stored frame with an id above ``after`` in the order it was applied (for
        rebuilding live state), as ``decode(id, gateway, epoch, seq, first_rid, body)`` --
        run in the store's worker thread, so decoding never blocks the Trio thread -- in
        lists of up to ``batch`` results (frames it returns None for are left out)."""
        frames = self.iter_frames_sync(after)

        def load() -> list[T]:
            out: list[T] = []
            for row in frames:
                value = decode(*row)
                if value is not None:
                    out.append(value)
                    if len(out) >= batch:
                        break
            return out

        while loaded := await trio.to_thread.run_sync(load, limiter=self._limiter):
            yield loaded

    def iter_frames_sync(self, after: int = 0, batch: int = 500,
                         ) -> Iterator[tuple[int, str, str, int, int, bytes]]:
        """``(id, gateway, epoch, seq, first_rid, body)`` of every stored frame with an id
        above ``after``, in the order they were applied (for rebuilding live state).  A
        body that does not unpack is yielded as ``b""`` (the caller counts it)."""
        assert self._db is not None
        last = after
        while True:
            rows = self._db.execute(
                "SELECT id, gateway, epoch, seq, first_rid, codec, body FROM frames"
                " WHERE id > ? ORDER BY id LIMIT ?", (last, batch)).fetchall()
            if not rows:
                return
            for row in rows:
                try:
                    body = unpack_body(row[5], row[6])
                except (ValueError, zlib.error):
                    body = b""
                yield row[0], row[1], row[2], row[3], row[4], body
            last = rows[-1][0]

    async def prune(self, older_than: float, max_bytes: int | None = None,
                    up_to_id: int | None = None, batch: int = 2000) -> int:
        """Delete the oldest applied frames while they were applied before ``older_than``
        (Unix time) or the stored bodies exceed ``max_bytes``; never a frame above
        ``up_to_id`` (the newest one a checkpoint covers: newer ones rebuild the live
        state), never the newest frame.  In batches of short transactions so ingest is
        never held up for long; returns how many.  The applied sets stay: a resend of a
        pruned frame is still dropped as a duplicate."""
        # The newest frame always stays: ids are rowids, and SQLite gives a new row the
        # largest id + 1, so an emptied table would hand out ids a checkpoint covers.
        limit_id = self.last_frame_id - 1 if up_to_id is None else min(
            up_to_id, self.last_frame_id - 1)

        def over() -> bool:
            return max_bytes is not None and self.frame_bytes > max_bytes

        def run() -> int:
            db = self._db
            assert db is not None
            try:
                db.execute("BEGIN IMMEDIATE")
                # oldest first: by age, then (still over the byte limit) by size
                gone = db.execute(
                    "DELETE FROM frames WHERE id IN (SELECT id FROM frames WHERE id <= ?"
                    " AND applied_at < ? ORDER BY id LIMIT ?) RETURNING length(body)",
                    (limit_id, older_than, batch)).fetchall()
                freed = sum(size for (size,) in gone)
                if not gone and over():
                    need = self.frame_bytes - (max_bytes or 0)
                    top = 0
                    for frame_id, size in db.execute(
                            "SELECT id, length(body) FROM frames WHERE id <= ? ORDER BY id"
                            " LIMIT ?", (limit_id, batch)):
                        top = frame_id
                        need -= size
                        if need <= 0:
                            break
                    gone = db.execute("DELETE FROM frames WHERE id <= ? RETURNING length(body)",
                                      (top,)).fetchall()
                    freed = sum(size for (size,) in gone)
                if freed:
                    db.execute("UPDATE meta SET value = value - ? WHERE key = 'frame_bytes'",
                               (freed,))
                db.execute("COMMIT")
            except BaseException as exc:
                if db.in_transaction:
                    with contextlib.suppress(sqlite3.Error):
                        db.execute("ROLLBACK")
                known = _store_error(exc, self.path)
                if known is not None:
                    raise known from exc
                raise
            self.frame_bytes -= freed
            return len(gone)

        total = 0
        while True:
            n = await trio.to_thread.run_sync(run, limiter=self._limiter)
            total += n
            if n == 0:
                return total

    async def query(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        """A read-only query, for the history API."""
        def run() -> list[tuple[Any, ...]]:
            assert self._db is not None
            return self._db.execute(sql, params).fetchall()

        return await trio.to_thread.run_sync(run, limiter=self._limiter)


def _count(stats: Callable[[str], GatewayStats], frames: list[FrameToApply],
           lost: dict[tuple[str, str], tuple[int, int]],
           rejected: list[tuple[FrameToApply, str]], dropped: list[FrameToApply],
           now: float) -> None:
    """Move the gateways' counters (``stats(gateway)``) as one commit does."""
    for f in frames:
        st = stats(f.gateway)
        st.epoch = f.epoch
        st.frames_applied += 1
        st.records_applied += f.n_records
        st.last_seq = max(st.last_seq, f.seq)
        st.last_seen = now
    for f, _ in rejected:
        st = stats(f.gateway)
        st.frames_rejected += 1
        st.last_seq = max(st.last_seq, f.seq)
    for f in dropped:  # its records are applied: its seq is done with, nothing stored
        st = stats(f.gateway)
        st.duplicates_dropped += 1
        st.last_seq = max(st.last_seq, f.seq)
    for (gw, epoch), (_, n) in lost.items():
        st = stats(gw)
        st.epoch = epoch
        st.frames_lost = min(COUNTER_MAX, st.frames_lost + n)


__all__ = [
    "CODEC_RAW", "CODEC_ZLIB", "MAX_RID_RANGES", "FrameToApply", "GatewayClaim",
    "GatewayStats", "GatewaySuperseded", "HubStore", "IngestStore", "LockTimeout",
    "SessionEnded", "StoreDamaged", "StoreFull", "StoreUnavailable", "StoredPositions",
    "pack_body", "records_not_applied", "screen_rids", "unpack_body",
]
