"""The hub's own small SQLite file for what records alone cannot rebuild cheaply.

* **Alerts** with their acknowledgement and escalation state.  Acknowledgements come from
  users, not from records, so replaying the frame store cannot restore them; and alert
  de-duplication after a restart relies on the alerts raised before it
  (``AlertEngine.restore``).  One row per alert, upserted on every event; deleted
  ``hub.retain_history_days`` after its last write (``written_at``, the hub's clock).
* **Archived lots**: the full figures (summary, wafer maps, test statistics) of a lot
  evicted from the live state's memory, so the history API still answers for it.  The
  archive is derived data, written with ``synchronous=NORMAL``.  **It never regresses**:
  a lot evicted again (replay after a restart; a late record for a lot long gone) replaces
  its row only with figures at least as full (as many part results or more).  Once its
  frames are pruned, the archive is the only place a lot's figures live, and a replay of
  the frames that remain (a partial rebuild) must not overwrite it.
* **Archived wafers**: a wafer's map and counts when it left memory while its lot stayed
  live (a lot has more wafers than ``max_wafers_per_lot``), one row per wafer, so a lot of
  any size is answerable wafer by wafer.  Derived data too, never regressing the same way.  A lot
  archive holds the wafers that were still live when the lot left.

Separate from the frame store (``hub.sqlite3``) so the frame store's transactions, which
gate acknowledgements to gateways, never wait on it.  Blocking calls run in a worker
thread behind a one-slot limiter (one connection, one thread at a time).

A write lock held by another process (an operator's ``sqlite3`` shell, a backup) is waited
for up to ``LOCK_WAIT_S``, as SQLite's own default -- but in steps of ``LOCK_POLL_S``, so
that a hub told it is stopping (``stopping``) gives up within ``STOP_LOCK_WAIT_S``: a
worker thread cannot be cancelled, and one in SQLite's 5 s lock wait held every stop
of a hub with a locked history store up by that long.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

import trio

from ..jsonutil import dumps
from ..startup import damaged_database
from .archive_merge import archive_order, merge_lot_archive, merge_wafer_archive

SCHEMA = """
CREATE TABLE IF NOT EXISTS alerts (
    id TEXT PRIMARY KEY,
    priority TEXT NOT NULL,
    rule TEXT NOT NULL,
    raised_at REAL NOT NULL,
    acknowledged INTEGER NOT NULL,
    data TEXT NOT NULL,
    written_at REAL NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS alerts_raised ON alerts (raised_at);
-- the webhook outbox: one row per (webhook, alert event), written with the alert;
-- ``outcome`` set once the event is finished with.  A restart sends again what has none.
CREATE TABLE IF NOT EXISTS webhook_outbox (
    url TEXT NOT NULL,
    event_key TEXT NOT NULL,
    payload TEXT NOT NULL,
    queued_at REAL NOT NULL,
    outcome TEXT,
    PRIMARY KEY (url, event_key)
);
CREATE TABLE IF NOT EXISTS lots (
    lot_id TEXT PRIMARY KEY,
    updated REAL NOT NULL,
    summary TEXT NOT NULL,
    archive TEXT NOT NULL,
    parts INTEGER NOT NULL DEFAULT 0,
    archived_at REAL NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS lots_updated ON lots (updated, lot_id);
CREATE TABLE IF NOT EXISTS wafers (
    lot_id TEXT NOT NULL,
    wafer_id TEXT NOT NULL,
    updated REAL NOT NULL,
    summary TEXT NOT NULL,
    snapshot TEXT NOT NULL,
    parts INTEGER NOT NULL DEFAULT 0,
    archived_at REAL NOT NULL DEFAULT 0,
    PRIMARY KEY (lot_id, wafer_id)
);
"""

#: how long a statement waits for a lock another connection holds (SQLite's default) ...
LOCK_WAIT_S = 5.0
#: ... in steps this long (SQLite's own wait cannot be cut short from another thread)
LOCK_POLL_S = 0.05
#: once the hub is stopping, a lock is waited for at most this long from then on: the
#: last writes get a moment, the stop is not held up
STOP_LOCK_WAIT_S = 0.5

#: archived lots and wafers read back, kept in memory (most recently used)
CACHE_ENTRIES = 64

#: the keys of a wafer snapshot its summary row keeps (the history API's wafer list)
WAFER_SUMMARY = ("wafer_id", "status", "started", "ended", "starts", "reopened_at",
                 "die_count", "good", "yield", "parts", "retests", "hard_bins", "soft_bins",
                 "updated")


def lot_row(lot_id: str, archive: dict[str, Any]) -> tuple[Any, ...]:
    """A lot archive's row: (lot_id, updated, summary, archive, parts).  Shared with the
    cluster's PostgreSQL store, whose upsert has the same columns and rule."""
    lot = archive["lot"]
    return (lot_id, lot.get("updated") or 0.0, dumps(lot), dumps(archive), lot.get("parts") or 0)


def wafer_row(lot_id: str, wafer_id: str, snap: dict[str, Any]) -> tuple[Any, ...]:
    """A wafer archive's row: (lot_id, wafer_id, updated, summary, snapshot, parts)."""
    return (lot_id, wafer_id, snap.get("updated") or 0.0,
            dumps({k: snap.get(k) for k in WAFER_SUMMARY}), dumps(snap),
            snap.get("parts") or 0)


class _SqliteRows:
    """``ArchiveRows`` over the history file's connection, inside its transaction."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def lot(self, lot_id: str) -> dict[str, Any] | None:
        row = self.db.execute("SELECT archive FROM lots WHERE lot_id = ?", (lot_id,)).fetchone()
        return json.loads(row[0]) if row else None

    def wafer(self, lot_id: str, wafer_id: str) -> dict[str, Any] | None:
        row = self.db.execute("SELECT snapshot FROM wafers WHERE lot_id = ? AND wafer_id = ?",
                              (lot_id, wafer_id)).fetchone()
        return json.loads(row[0]) if row else None

    def wafer_ids(self, lot_id: str) -> set[str]:
        return {r[0] for r in self.db.execute("SELECT wafer_id FROM wafers WHERE lot_id = ?",
                                              (lot_id,))}

    def put_lot(self, lot_id: str, archive: dict[str, Any]) -> None:
        self.db.execute("INSERT OR REPLACE INTO lots (lot_id, updated, summary, archive, parts,"
                        " archived_at) VALUES (?, ?, ?, ?, ?, ?)",
                        (*lot_row(lot_id, archive), time.time()))

    def put_wafer(self, lot_id: str, wafer_id: str, snap: dict[str, Any]) -> None:
        # (an upsert, not a replace: the row keeps its place in the order wafers left)
        self.db.execute(
            "INSERT INTO wafers (lot_id, wafer_id, updated, summary, snapshot, parts,"
            " archived_at) VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (lot_id, wafer_id) DO"
            " UPDATE SET updated = excluded.updated, summary = excluded.summary,"
            " snapshot = excluded.snapshot, parts = excluded.parts,"
            " archived_at = excluded.archived_at",
            (*wafer_row(lot_id, wafer_id, snap), time.time()))



def _queue_outbox(db: sqlite3.Connection,
                  rows: list[tuple[str, str, str, float]]) -> set[tuple[str, str]]:
    """Inserts webhook outbox rows (an existing row is never overwritten: its
    ``queued_at`` and outcome stand) and returns the ``(url, event_key)`` of those written."""
    return {(url, key) for url, key, payload, at in rows if db.execute(
        "INSERT OR IGNORE INTO webhook_outbox (url, event_key, payload, queued_at)"
        " VALUES (?, ?, ?, ?)", (url, key, payload, at)).rowcount == 1}

def _is_busy(exc: sqlite3.OperationalError) -> bool:
    """A lock held by another connection ("database is locked" / "... is busy")."""
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None:
        return code & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)
    return "locked" in str(exc) or "busy" in str(exc)


class HistoryStore:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._db: sqlite3.Connection | None = None
        # rows an older hub may have written with no date (0) are still to be dated
        self._undated = True
        self._limiter = trio.CapacityLimiter(1)
        self._cache: OrderedDict[tuple[str, ...], dict[str, Any]] = OrderedDict()
        # set by ``stopping`` (Trio thread), read by the worker thread's lock waits
        self._stop = threading.Event()
        self._stop_at = 0.0

    def stopping(self) -> None:
        """The hub is stopping: from now on a lock held elsewhere is waited for at most
        ``STOP_LOCK_WAIT_S`` (a write under way included), not ``LOCK_WAIT_S``."""
        if not self._stop.is_set():
            self._stop_at = time.monotonic()
            self._stop.set()

    def _execute(self, db: sqlite3.Connection, sql: str,
                 params: tuple[Any, ...] = ()) -> sqlite3.Cursor:
        """``db.execute``, waiting for a lock held elsewhere up to ``LOCK_WAIT_S`` in steps
        of ``LOCK_POLL_S`` (the connection's own busy timeout), less once stopping."""
        deadline = time.monotonic() + LOCK_WAIT_S
        while True:
            try:
                return db.execute(sql, params)
            except sqlite3.OperationalError as exc:
                if not _is_busy(exc):
                    raise
                limit = deadline
                if self._stop.is_set():
                    limit = min(limit, self._stop_at + STOP_LOCK_WAIT_S)
                if time.monotonic() >= limit:
                    raise

    async def _run(self, fn: Any, *args: Any) -> Any:
        return await trio.to_thread.run_sync(fn, *args, limiter=self._limiter)

    # -- blocking internals (worker thread) --
    def _open_sync(self) -> None:
        try:
            self._open_db_sync()
        except sqlite3.DatabaseError as exc:
            raise damaged_database("hub.data_dir", self.path, exc) or exc from exc

    def _open_db_sync(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None,
                             timeout=LOCK_WAIT_S)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.executescript(SCHEMA)
        for table in ("lots", "wafers"):
            columns = {row[1] for row in db.execute(f"PRAGMA table_info({table})")}
            if "parts" not in columns:  # a store from before the "never regress" rule
                db.execute(f"ALTER TABLE {table} ADD COLUMN parts INTEGER NOT NULL DEFAULT 0")
                db.execute(f"UPDATE {table} SET parts ="
                           " COALESCE(json_extract(summary, '$.parts'), 0)")
            # (``hub.retain_history_days`` dates a row by when it was written: the rows of a
            # store from before are dated by this start, kept a whole period from now)
            if "archived_at" not in columns:
                db.execute(f"ALTER TABLE {table} ADD COLUMN archived_at REAL NOT NULL DEFAULT 0")
                db.execute(f"UPDATE {table} SET archived_at = ?", (time.time(),))
        if "written_at" not in {row[1] for row in db.execute("PRAGMA table_info(alerts)")}:
            db.execute("ALTER TABLE alerts ADD COLUMN written_at REAL NOT NULL DEFAULT 0")
            db.execute("UPDATE alerts SET written_at = ?", (time.time(),))
        db.execute("CREATE INDEX IF NOT EXISTS alerts_written ON alerts (written_at)")
        self._undated = True  # (rows an older hub may have written since: _prune_sync)
        # from here on the lock waits are ``_execute``'s, in short steps
        db.execute(f"PRAGMA busy_timeout = {round(LOCK_POLL_S * 1000)}")
        self._db = db

    def _save_sync(self, alerts: list[dict[str, Any]], lots: list[tuple[str, dict[str, Any]]],
                   wafers: list[tuple[str, str, dict[str, Any]]],
                   outbox: list[tuple[str, str, str, float]]
                   ) -> tuple[int, set[tuple[str, str]]]:
        """Returns how many lot and wafer archives were not written (a fuller one is
        kept), and the outbox rows written."""
        db = self._db
        assert db is not None
        self._execute(db, "BEGIN IMMEDIATE")
        try:
            queued = _queue_outbox(db, outbox)
            now = time.time()
            db.executemany(
                "INSERT OR REPLACE INTO alerts (id, priority, rule, raised_at, acknowledged, data,"
                " written_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                [(a["id"], a["priority"], a["rule"], a["raised_at"], int(a["acknowledged"]),
                  dumps(a), now) for a in alerts])
            written = 0
            rows = _SqliteRows(db)
            for kind, lot_id, wafer_id, data in archive_order(lots, wafers):
                if kind == "wafer":
                    if data.get("counts_from") is not None:
                        written += merge_wafer_archive(rows, lot_id, wafer_id, data)
                        continue
                    written += db.execute(
                        "INSERT INTO wafers (lot_id, wafer_id, updated, summary, snapshot,"
                        " parts, archived_at) VALUES (?, ?, ?, ?, ?, ?, ?)"
                        " ON CONFLICT (lot_id, wafer_id) DO UPDATE SET"
                        " updated = excluded.updated, summary = excluded.summary,"
                        " snapshot = excluded.snapshot, parts = excluded.parts,"
                        " archived_at = excluded.archived_at"
                        " WHERE excluded.parts >= wafers.parts",
                        (*wafer_row(lot_id, wafer_id, data), time.time())).rowcount
                elif data["lot"].get("counts_from") is not None:
                    written += merge_lot_archive(rows, lot_id, data)
                else:
                    written += db.execute(
                        "INSERT INTO lots (lot_id, updated, summary, archive, parts,"
                        " archived_at) VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (lot_id) DO"
                        " UPDATE SET updated = excluded.updated, summary = excluded.summary,"
                        " archive = excluded.archive, parts = excluded.parts,"
                        " archived_at = excluded.archived_at"
                        " WHERE excluded.parts >= lots.parts",
                        (*lot_row(lot_id, data), time.time())).rowcount
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        return len(lots) + len(wafers) - written, queued

    def _queue_sync(self, rows: list[tuple[str, str, str, float]]) -> set[tuple[str, str]]:
        db = self._db
        assert db is not None
        self._execute(db, "BEGIN IMMEDIATE")
        try:
            queued = _queue_outbox(db, rows)
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        return queued

    def _mark_sync(self, marks: list[tuple[str, str, str]], prune_before: float | None) -> None:
        db = self._db
        assert db is not None
        self._execute(db, "BEGIN IMMEDIATE")
        try:
            db.executemany("UPDATE webhook_outbox SET outcome = ? WHERE url = ? AND event_key = ?",
                           [(outcome, url, key) for url, key, outcome in marks])
            if prune_before is not None:
                db.execute("DELETE FROM webhook_outbox WHERE outcome IS NOT NULL"
                           " AND queued_at < ?", (prune_before,))
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise

    def _prune_sync(self, older_than: float, batch: int,
                    tables: tuple[tuple[str, str], ...]) -> int:
        db = self._db
        assert db is not None
        self._execute(db, "BEGIN IMMEDIATE")
        try:
            if self._undated:
                # An older hub run on this file (a downgrade, then this one again) names its
                # columns and leaves the dates at their default, 0: such rows would go now,
                # as if written in 1970.  The first prune of this run dates them by its
                # clock, as rows from before the columns are dated by the start adding
                # them (here, not at the open: that must not wait for the write lock).
                # This hub never writes 0: it dates every write by the clock.
                now = time.time()
                for table, dated in (("alerts", "written_at"), ("lots", "archived_at"),
                                     ("wafers", "archived_at")):
                    db.execute(f"UPDATE {table} SET {dated} = ? WHERE {dated} = 0", (now,))
            n = sum(db.execute(
                f"DELETE FROM {table} WHERE rowid IN (SELECT rowid FROM {table}"
                f" WHERE {dated} < ? LIMIT ?)", (older_than, batch)).rowcount
                for table, dated in tables)
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        self._undated = False
        return n

    def _select(self, sql: str, params: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        assert self._db is not None
        return self._execute(self._db, sql, params).fetchall()

    # -- async API --
    async def open(self) -> None:
        await self._run(self._open_sync)

    async def close(self) -> None:
        if self._db is not None:
            db, self._db = self._db, None
            await self._run(db.close)

    async def save(self, alerts: list[dict[str, Any]],
                   lots: list[tuple[str, dict[str, Any]]] | None = None,
                   wafers: list[tuple[str, str, dict[str, Any]]] | None = None) -> int:
        """Upsert alerts (their latest state), archived lots and archived wafers
        ``(lot_id, wafer_id, snapshot)`` in one transaction.  Returns how many archives
        were kept as they were because the stored one is fuller (never regress)."""
        return (await self.save_with_outbox(alerts, lots, wafers))[0]

    async def save_with_outbox(self, alerts: list[dict[str, Any]],
                               lots: list[tuple[str, dict[str, Any]]] | None = None,
                               wafers: list[tuple[str, str, dict[str, Any]]] | None = None,
                               outbox: list[tuple[str, str, str, float]] | None = None,
                               ) -> tuple[int, set[tuple[str, str]]]:
        """``save`` plus webhook outbox rows ``(url, event key, payload JSON, queued at)``
        in the same transaction (an alert stored is never without its deliveries);
        returns ``(kept, the (url, key) rows written now)``: a row there already is kept."""
        try:
            return await self._run(self._save_sync, alerts, lots or [], wafers or [],
                                   outbox or [])
        finally:  # after the write: a read finishing before it cached the old row
            for lot_id, _ in lots or ():
                self._cache.pop(("lot", lot_id), None)
            for lot_id, _, _ in wafers or ():  # (a wafer merged into its lot's archive)
                self._cache.pop(("lot", lot_id), None)
            for lot_id, wafer_id, _ in wafers or ():
                self._cache.pop(("wafer", lot_id, wafer_id), None)

    async def undelivered_webhooks(self) -> list[tuple[str, str, str, float]]:
        """The outbox rows without an outcome ``(url, key, payload, queued at)``, oldest
        first."""
        return await self._run(self._select,
                               "SELECT url, event_key, payload, queued_at FROM webhook_outbox"
                               " WHERE outcome IS NULL ORDER BY queued_at, rowid", ())

    async def queue_webhooks(self, rows: list[tuple[str, str, str, float]]
                             ) -> set[tuple[str, str]]:
        """Outbox rows ``(url, event key, payload JSON, queued at)`` on their own (the
        alert service's rows held in memory while this file could not be written, written
        late).  Returns the ``(url, key)`` written now; a row there already is kept."""
        return await self._run(self._queue_sync, rows)

    async def mark_webhooks(self, marks: list[tuple[str, str, str]],
                            prune_before: float | None = None) -> None:
        """``(url, event key, outcome)``: finished with.  Rows finished and queued before
        ``prune_before`` are deleted."""
        await self._run(self._mark_sync, marks, prune_before)

    async def load_alerts(self, limit: int) -> list[dict[str, Any]]:
        """The newest ``limit`` alerts, oldest first (the order ``restore`` wants)."""
        rows = await self._run(self._select,
                               "SELECT data FROM alerts ORDER BY raised_at DESC LIMIT ?",
                               (limit,))
        return [json.loads(r[0]) for r in reversed(rows)]

    async def alerts(self, *, unacknowledged: bool = False, priority: str | None = None,
                     before: float | None = None, limit: int = 100) -> list[dict[str, Any]]:
        """Alerts newest first, for the history API (older than memory holds)."""
        where: list[str] = ["1=1"]
        params: list[Any] = []
        if unacknowledged:
            where.append("acknowledged = 0")
        if priority is not None:
            where.append("priority = ?")
            params.append(priority)
        if before is not None:
            where.append("raised_at < ?")
            params.append(before)
        rows = await self._run(
            self._select,
            f"SELECT data FROM alerts WHERE {' AND '.join(where)} "
            "ORDER BY raised_at DESC LIMIT ?", (*params, limit))
        return [json.loads(r[0]) for r in rows]

    async def prune(self, older_than: float, batch: int = 1000) -> int:
        """Delete the lot and wafer archives last written before ``older_than`` (Unix time,
        ``hub.retain_history_days``); how many rows went.  A wafer archive goes by its own
        date, its lot live or not.  In short transactions of ``batch`` rows a table: alert
        writes wait one batch at most."""
        total = 0
        while n := await self._run(self._prune_sync, older_than, batch,
                                   (("wafers", "archived_at"), ("lots", "archived_at"))):
            total += n
            self._cache.clear()  # no archive read back before is served after its delete
        return total

    async def prune_alerts(self, older_than: float, batch: int = 1000) -> int:
        """Delete the alerts last written (raised, counted again, escalated, acknowledged)
        before ``older_than`` (Unix time, the hub's clock: ``hub.retain_history_days``);
        how many went.  An alert still in the engine's memory is written again whole by its
        next change."""
        total = 0
        while n := await self._run(self._prune_sync, older_than, batch,
                                   (("alerts", "written_at"),)):
            total += n
        return total

    async def _cached(self, key: tuple[str, ...], sql: str,
                      params: tuple[Any, ...]) -> dict[str, Any] | None:
        """One archive, through a small LRU cache: a dashboard opening an old lot asks for
        it, its wafers and its tests in a burst; memory stays ``CACHE_ENTRIES`` archives."""
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        rows = await self._run(self._select, sql, params)
        value = json.loads(rows[0][0]) if rows else None
        if value is not None:
            self._cache[key] = value
            while len(self._cache) > CACHE_ENTRIES:
                self._cache.popitem(last=False)
        return value

    async def lot(self, lot_id: str) -> dict[str, Any] | None:
        """An archived lot (``state.lot_archive`` shape), or None.  Shared with the cache:
        callers must not change it."""
        return await self._cached(("lot", lot_id), "SELECT archive FROM lots WHERE lot_id = ?",
                                  (lot_id,))

    async def lot_summaries(self, limit: int = 500, before: float | None = None,
                            before_lot: str | None = None) -> list[dict[str, Any]]:
        """Archived lots' summaries, most recently updated first (then by lot id, down);
        ``before`` (``before_lot``): only those below it in that order."""
        bound = float("inf") if before is None else before
        rows = await self._run(self._select,
                               "SELECT summary FROM lots WHERE updated < ?"
                               " OR (updated = ? AND lot_id < ?)"
                               " ORDER BY updated DESC, lot_id DESC LIMIT ?",
                               (bound, bound, before_lot or "", limit))
        return [json.loads(r[0]) for r in rows]

    async def wafer(self, lot_id: str, wafer_id: str) -> dict[str, Any] | None:
        """An archived wafer's snapshot (the ``lot/<lot>/wafer/<wafer>`` shape), or None."""
        return await self._cached(
            ("wafer", lot_id, wafer_id),
            "SELECT snapshot FROM wafers WHERE lot_id = ? AND wafer_id = ?", (lot_id, wafer_id))

    async def wafer_summaries(self, lot_id: str) -> list[dict[str, Any]]:
        """The archived wafers of a lot (``WAFER_SUMMARY`` keys), in the order they left."""
        rows = await self._run(self._select,
                               "SELECT summary FROM wafers WHERE lot_id = ? ORDER BY rowid",
                               (lot_id,))
        return [json.loads(r[0]) for r in rows]


__all__ = ["CACHE_ENTRIES", "LOCK_WAIT_S", "STOP_LOCK_WAIT_S", "WAFER_SUMMARY", "HistoryStore"]
