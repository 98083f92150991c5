"""The hub's own small SQLite file for what records alone cannot rebuild cheaply.

* **Alerts** with their acknowledgement and escalation state.  Acknowledgements come from
  users, not from records, so replaying the frame store cannot restore them; and alert
  de-duplication after a restart relies on the alerts raised before it
  (``AlertEngine.restore``).  One row per alert, upserted on every event.
* **Archived lots**: the full figures (summary, wafer maps, test statistics) of a lot
  evicted from the live state's memory, so the history API still answers for it.  The
  archive is derived data -- the frame store stays the truth -- so it is written with
  ``synchronous=NORMAL`` and rewritten whenever the lot is evicted again (after a restart,
  replay evicts the same lots and refreshes their rows).
* **Archived wafers**: a wafer's map and counts when it left memory while its lot stayed
  live (a lot has more wafers than ``max_wafers_per_lot``), one row per wafer, so a lot of
  any size is answerable wafer by wafer.  Derived data too, rewritten the same way.  A lot
  archive holds the wafers that were still live when the lot left.

Separate from the frame store (``hub.sqlite3``) so the frame store's transactions, which
gate acknowledgements to gateways, never wait on it.  Blocking calls run in a worker
thread behind a one-slot limiter (one connection, one thread at a time).
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import trio

from ..jsonutil import dumps

SCHEMA = """
CREATE TABLE IF NOT EXISTS alerts (
    id TEXT PRIMARY KEY,
    priority TEXT NOT NULL,
    rule TEXT NOT NULL,
    raised_at REAL NOT NULL,
    acknowledged INTEGER NOT NULL,
    data TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS alerts_raised ON alerts (raised_at);
CREATE TABLE IF NOT EXISTS lots (
    lot_id TEXT PRIMARY KEY,
    updated REAL NOT NULL,
    summary TEXT NOT NULL,
    archive TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS wafers (
    lot_id TEXT NOT NULL,
    wafer_id TEXT NOT NULL,
    updated REAL NOT NULL,
    summary TEXT NOT NULL,
    snapshot TEXT NOT NULL,
    PRIMARY KEY (lot_id, wafer_id)
);
"""

#: the keys of a wafer snapshot its summary row keeps (the history API's wafer list)
WAFER_SUMMARY = ("wafer_id", "status", "started", "ended", "die_count", "good", "yield",
                 "parts", "retests", "hard_bins", "soft_bins", "updated")


class HistoryStore:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._db: sqlite3.Connection | None = None
        self._limiter = trio.CapacityLimiter(1)

    async def _run(self, fn: Any, *args: Any) -> Any:
        return await trio.to_thread.run_sync(fn, *args, limiter=self._limiter)

    # -- blocking internals (worker thread) --
    def _open_sync(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.executescript(SCHEMA)
        self._db = db

    def _save_sync(self, alerts: list[dict[str, Any]], lots: list[tuple[str, dict[str, Any]]],
                   wafers: list[tuple[str, str, dict[str, Any]]]) -> None:
        db = self._db
        assert db is not None
        db.execute("BEGIN IMMEDIATE")
        try:
            db.executemany(
                "INSERT OR REPLACE INTO alerts (id, priority, rule, raised_at, acknowledged, data)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                [(a["id"], a["priority"], a["rule"], a["raised_at"], int(a["acknowledged"]),
                  dumps(a)) for a in alerts])
            db.executemany(
                "INSERT OR REPLACE INTO lots (lot_id, updated, summary, archive)"
                " VALUES (?, ?, ?, ?)",
                [(lot_id, archive["lot"].get("updated") or 0.0, dumps(archive["lot"]),
                  dumps(archive)) for lot_id, archive in lots])
            db.executemany(
                "INSERT OR REPLACE INTO wafers (lot_id, wafer_id, updated, summary, snapshot)"
                " VALUES (?, ?, ?, ?, ?)",
                [(lot_id, wafer_id, snap.get("updated") or 0.0,
                  dumps({k: snap.get(k) for k in WAFER_SUMMARY}), dumps(snap))
                 for lot_id, wafer_id, snap in wafers])
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def _select(self, sql: str, params: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        assert self._db is not None
        return self._db.execute(sql, params).fetchall()

    # -- async API --
    async def open(self) -> None:
        await self._run(self._open_sync)

    async def close(self) -> None:
        if self._db is not None:
            db, self._db = self._db, None
            await self._run(db.close)

    async def save(self, alerts: list[dict[str, Any]],
                   lots: list[tuple[str, dict[str, Any]]] | None = None,
                   wafers: list[tuple[str, str, dict[str, Any]]] | None = None) -> None:
        """Upsert alerts (their latest state), archived lots and archived wafers
        ``(lot_id, wafer_id, snapshot)`` in one transaction."""
        await self._run(self._save_sync, alerts, lots or [], wafers or [])

    async def load_alerts(self, limit: int) -> list[dict[str, Any]]:
        """The newest ``limit`` alerts, oldest first (the order ``restore`` wants)."""
        rows = await self._run(self._select,
                               "SELECT data FROM alerts ORDER BY raised_at DESC LIMIT ?",
                               (limit,))
        return [json.loads(r[0]) for r in reversed(rows)]

    async def alerts(self, *, unacknowledged: bool = False, priority: str | None = None,
                     before: float | None = None, limit: int = 100) -> list[dict[str, Any]]:
        """Alerts newest first, for the history API (older than memory holds)."""
        where, params = ["1=1"], []
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

    async def lot(self, lot_id: str) -> dict[str, Any] | None:
        """An archived lot (``state.lot_archive`` shape), or None."""
        rows = await self._run(self._select, "SELECT archive FROM lots WHERE lot_id = ?",
                               (lot_id,))
        return json.loads(rows[0][0]) if rows else None

    async def lot_summaries(self, limit: int = 500) -> list[dict[str, Any]]:
        """Archived lots' summaries, most recently updated first."""
        rows = await self._run(self._select,
                               "SELECT summary FROM lots ORDER BY updated DESC LIMIT ?",
                               (limit,))
        return [json.loads(r[0]) for r in rows]

    async def wafer(self, lot_id: str, wafer_id: str) -> dict[str, Any] | None:
        """An archived wafer's snapshot (the ``lot/<lot>/wafer/<wafer>`` shape), or None."""
        rows = await self._run(self._select,
                               "SELECT snapshot FROM wafers WHERE lot_id = ? AND wafer_id = ?",
                               (lot_id, wafer_id))
        return json.loads(rows[0][0]) if rows else None

    async def wafer_summaries(self, lot_id: str) -> list[dict[str, Any]]:
        """The archived wafers of a lot (``WAFER_SUMMARY`` keys), in the order they left."""
        rows = await self._run(self._select,
                               "SELECT summary FROM wafers WHERE lot_id = ? ORDER BY rowid",
                               (lot_id,))
        return [json.loads(r[0]) for r in rows]
