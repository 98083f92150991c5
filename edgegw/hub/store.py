"""The hub's durable store: SQLite in WAL mode.

What the exactly-once promise rests on: a frame's body, the (gateway, epoch) applied set
and the counters are written in ONE transaction, committed with ``synchronous=FULL``,
before the frame is acknowledged.  A hub killed after an acknowledgement has the frame;
a hub killed before it has nothing, and the gateway resends; a resend of an applied
frame is found in the applied set and dropped.  ``commit`` itself checks every frame
against the applied set, under a lock that makes check and write one step, so no caller
(two connections of one gateway racing, a takeover) can apply a frame twice.

SQLite calls block, so they run in a worker thread (``trio.to_thread``) behind a
one-slot limiter: one connection, used by one thread at a time.  Frames arriving while a
commit is in flight are committed together (group commit), which is what keeps the
fsync cost per frame low.
"""

from __future__ import annotations

import dataclasses
import json
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import trio

from .. import failpoints
from ..protocol.intervals import IntervalSet

SCHEMA = """
CREATE TABLE IF NOT EXISTS applied (
    gateway TEXT NOT NULL,
    epoch TEXT NOT NULL,
    ranges TEXT NOT NULL,
    updated REAL NOT NULL,
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
    UNIQUE (gateway, epoch, seq)
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

STAT_FIELDS = ("frames_applied", "records_applied", "duplicates_dropped", "frames_rejected",
               "frames_lost", "last_seq")

T = TypeVar("T")


@dataclasses.dataclass
class FrameToApply:
    gateway: str
    epoch: str
    seq: int
    first_rid: int
    n_records: int
    body: bytes


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


class HubStore:
    def __init__(self, path: str | Path, keep_bodies: bool = True) -> None:
        self.path = Path(path)
        self.keep_bodies = keep_bodies
        self._db: sqlite3.Connection | None = None
        self._limiter = trio.CapacityLimiter(1)
        self._commit_lock = trio.Lock()  # check-and-apply of applied sets is one step
        self.stats: dict[str, GatewayStats] = {}
        self.applied: dict[tuple[str, str], IntervalSet] = {}

    # -- blocking internals (worker thread) --
    def _open_sync(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.executescript(SCHEMA)
        self._db = db
        for gw, epoch, ranges in db.execute("SELECT gateway, epoch, ranges FROM applied"):
            self.applied[(gw, epoch)] = IntervalSet(json.loads(ranges))
        cols = ", ".join(("gateway", "epoch", *STAT_FIELDS, "last_seen"))
        for row in db.execute(f"SELECT {cols} FROM gateway_stats"):
            self.stats[row[0]] = GatewayStats(*row)

    def _apply_sync(self, frames: list[FrameToApply], lost: dict[tuple[str, str], tuple[int, int]],
                    rejected: list[tuple[FrameToApply, str]]) -> None:
        db = self._db
        assert db is not None
        now = time.time()
        touched: set[tuple[str, str]] = set()
        db.execute("BEGIN IMMEDIATE")
        try:
            for f in frames:
                db.execute(
                    "INSERT OR IGNORE INTO frames (gateway, epoch, seq, first_rid, n_records,"
                    " applied_at, body) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (f.gateway, f.epoch, f.seq, f.first_rid, f.n_records, now,
                     f.body if self.keep_bodies else b""))
                touched.add((f.gateway, f.epoch))
            for f, reason in rejected:
                db.execute("INSERT INTO rejected (gateway, epoch, seq, reason, at, body)"
                           " VALUES (?, ?, ?, ?, ?, ?)",
                           (f.gateway, f.epoch, f.seq, reason, now, f.body))
                touched.add((f.gateway, f.epoch))
            touched.update(lost)
            for key in touched:
                db.execute("INSERT OR REPLACE INTO applied (gateway, epoch, ranges, updated)"
                           " VALUES (?, ?, ?, ?)",
                           (key[0], key[1], json.dumps(self.applied[key].ranges()), now))
                st = self.stats[key[0]]
                db.execute(
                    "INSERT OR REPLACE INTO gateway_stats (gateway, epoch, frames_applied,"
                    " records_applied, duplicates_dropped, frames_rejected, frames_lost,"
                    " last_seq, last_seen) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (st.gateway, st.epoch, st.frames_applied, st.records_applied,
                     st.duplicates_dropped, st.frames_rejected, st.frames_lost, st.last_seq,
                     st.last_seen))
            failpoints.hit("hub.mid_commit")
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    # -- async API --
    async def open(self) -> None:
        await trio.to_thread.run_sync(self._open_sync, limiter=self._limiter)

    async def close(self) -> None:
        if self._db is not None:
            db, self._db = self._db, None
            await trio.to_thread.run_sync(db.close, limiter=self._limiter)

    def applied_set(self, gateway: str, epoch: str) -> IntervalSet:
        return self.applied.setdefault((gateway, epoch), IntervalSet())

    def gateway_stats(self, gateway: str) -> GatewayStats:
        st = self.stats.get(gateway)
        if st is None:
            st = self.stats[gateway] = GatewayStats(gateway)
        return st

    async def commit(self, frames: list[FrameToApply],
                     lost: dict[tuple[str, str], tuple[int, int]] | None = None,
                     rejected: list[tuple[FrameToApply, str]] | None = None,
                     ) -> set[tuple[str, str, int]]:
        """Make ``frames`` applied, durably, in one transaction.  Returns the
        (gateway, epoch, seq) of the frames (and rejected frames) that were skipped because
        they are applied already: the caller counts them as duplicates, acks them, and does
        not hand their records on again.

        Commits run one at a time (``_commit_lock``), and the in-memory applied sets only
        change inside one, so "is it applied?" is checked against exactly what is on disk:
        two connections of one gateway sending the same frame (a takeover, a race) apply
        it once, whatever the timing.  The in-memory sets and counters are updated before
        the write (they are what gets written); if it fails they are restored, so memory
        never claims more than the disk has.
        """
        lost = lost or {}
        async with self._commit_lock:
            skipped: set[tuple[str, str, int]] = set()
            taken: set[tuple[str, str, int]] = set()

            def fresh(f: FrameToApply) -> bool:
                key = (f.gateway, f.epoch, f.seq)
                if key in taken or f.seq in self.applied_set(f.gateway, f.epoch):
                    skipped.add(key)
                    return False
                taken.add(key)
                return True

            await self._commit_fresh([f for f in frames if fresh(f)], lost,
                                     [(f, why) for f, why in rejected or [] if fresh(f)])
            return skipped

    async def _commit_fresh(self, frames: list[FrameToApply],
                            lost: dict[tuple[str, str], tuple[int, int]],
                            rejected: list[tuple[FrameToApply, str]]) -> None:
        if not frames and not lost and not rejected:
            return
        saved_sets = {}
        saved_stats = {}
        keys = {(f.gateway, f.epoch) for f in frames} | set(lost) | {
            (f.gateway, f.epoch) for f, _ in rejected}
        for key in keys:
            saved_sets[key] = IntervalSet(self.applied_set(*key).ranges())
            saved_stats[key[0]] = dataclasses.replace(self.gateway_stats(key[0]))
        now = time.time()
        for f in frames:
            self.applied_set(f.gateway, f.epoch).add(f.seq)
            st = self.gateway_stats(f.gateway)
            st.epoch = f.epoch
            st.frames_applied += 1
            st.records_applied += f.n_records
            st.last_seq = max(st.last_seq, f.seq)
            st.last_seen = now
        for f, _ in rejected:
            self.applied_set(f.gateway, f.epoch).add(f.seq)
            st = self.gateway_stats(f.gateway)
            st.frames_rejected += 1
            st.last_seq = max(st.last_seq, f.seq)
        for (gw, epoch), (up_to, n) in lost.items():
            self.applied_set(gw, epoch).add_range(1, up_to)
            self.gateway_stats(gw).epoch = epoch
            self.gateway_stats(gw).frames_lost += n
        try:
            await trio.to_thread.run_sync(self._apply_sync, frames, lost, rejected,
                                          limiter=self._limiter)
        except BaseException:
            self.applied.update(saved_sets)
            self.stats.update(saved_stats)
            raise

    async def declare_lost(self, gateway: str, epoch: str, up_to: int, count: int) -> None:
        """Record that the gateway no longer holds frames below ``up_to`` that we lack."""
        await self.commit([], lost={(gateway, epoch): (up_to, count)})

    def count_duplicate(self, gateway: str) -> None:
        # counted in memory; persisted with the next commit (a lost count is harmless)
        self.gateway_stats(gateway).duplicates_dropped += 1

    @property
    def busy(self) -> bool:
        """A database call is running in the store's worker thread."""
        return self._limiter.borrowed_tokens > 0

    async def stored_frames(self, decode: Callable[[str, str, int, int, bytes], T | None],
                            batch: int = 200) -> AsyncIterator[list[T]]:
        """Every stored frame in the order it was applied (for rebuilding live state), as
        ``decode(gateway, epoch, seq, first_rid, body)`` -- run in the store's worker
        thread, so decoding never blocks the Trio thread -- in lists of up to ``batch``
        results (frames it returns None for are left out)."""
        frames = self._iter_frames_sync()

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

    def _iter_frames_sync(self, batch: int = 500) -> Iterator[tuple[str, str, int, int, bytes]]:
        """Every stored frame in the order it was applied (for rebuilding live state)."""
        assert self._db is not None
        last = 0
        while True:
            rows = self._db.execute(
                "SELECT id, gateway, epoch, seq, first_rid, body FROM frames WHERE id > ?"
                " ORDER BY id LIMIT ?", (last, batch)).fetchall()
            if not rows:
                return
            for row in rows:
                yield row[1], row[2], row[3], row[4], row[5]
            last = rows[-1][0]

    async def prune(self, older_than: float, batch: int = 5000) -> int:
        """Delete applied frames applied before ``older_than`` (Unix time), in batches of
        short transactions so ingest is never held up for long; returns how many.  The
        applied sets stay: a resend of a pruned frame is still dropped as a duplicate."""
        def run() -> int:
            assert self._db is not None
            return self._db.execute(
                "DELETE FROM frames WHERE id IN (SELECT id FROM frames WHERE applied_at < ?"
                " ORDER BY id LIMIT ?)", (older_than, batch)).rowcount

        total = 0
        while True:
            n = await trio.to_thread.run_sync(run, limiter=self._limiter)
            total += n
            if n < batch:
                return total

    async def query(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        """A read-only query, for the history API."""
        def run() -> list[tuple[Any, ...]]:
            assert self._db is not None
            return self._db.execute(sql, params).fetchall()

        return await trio.to_thread.run_sync(run, limiter=self._limiter)
