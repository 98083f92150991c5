"""The history API: what a dashboard loads to see what happened before it connected.

Handlers are plain functions ``(...) -> (status, json_dict)`` over the live state (and, for
a lot evicted from memory, its archive from the history store); ``HistoryApi`` adapts them
to the hub's HTTP server and fetches archives off the Trio thread.  Routes::

    GET  /api/lots[?limit=200&before=<updated>&before_lot=<lot>]
                                                 lots, live and archived, newest first
    GET  /api/lots/<lot>/wafers                  a lot's wafers with their counts
    GET  /api/lots/<lot>/wafers/<wafer>          a wafer's map and bins (the live snapshot)
    GET  /api/tests/<lot>/<test_num>             a test's statistics
    GET  /api/alerts[?unacknowledged=1&priority=P0&limit=100&before=<raised_at>]
    POST /api/alerts/<id>/ack                    body {} (signed in) or {"user": "..."}

Behind the access guard (``edgegw.auth``) the request's principal decides two things here:
a lot-scoped token sees only its lots (listings filtered; other lots are 404, as unknown),
and an acknowledgement is recorded in the signed-in user's name -- a ``user`` in the body
is ignored.  Only a hub without sign-in (``auth.mode = "none"``) takes the body's name.

The JSON shapes are the live topics' snapshots (``docs/live-topics.md``), so a dashboard
renders history and live updates with the same code.  A lot's wafers come from memory
while they are live and from the history store once they left it (a lot with more wafers
than the live state keeps, or an evicted lot), so every wafer of a lot of any size is
answerable.  A lot (wafer) whose archive is only held in memory, because the history
store cannot be written (``AlertService.held_archives``), is answered all the same: its
held archives applied over the stored ones as the store will apply them, and its rows in
``/api/lots`` and its ``/api/lots/<lot>/wafers`` answer say ``"archive_pending": true``.
Errors are ``{"error": "..."}``
with 400 (bad parameter) or 404 (unknown lot, wafer, test or alert).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

import trio

from edgegw import jsonutil
from edgegw.hub.alerts import AlertEngine
from edgegw.hub.archive_merge import apply_archive
from edgegw.hub.history_store import WAFER_SUMMARY
from edgegw.hub.topics import PRIORITIES
from edgegw.web import path_segments

if TYPE_CHECKING:
    from edgegw.hub.history_store import HistoryStore
    from edgegw.hub.live import LiveState
    from edgegw.web import HttpServer, Request, Response

Result = tuple[int, dict[str, Any]]

_LOT_FIELDS = ("lot_id", "part_type", "node_name", "tester_type", "job_name", "status",
               "started", "ended", "starts", "reopened_at", "die_count", "good", "yield",
               "parts", "units_per_hour", "updated")
_WAFER_FIELDS = ("wafer_id", "status", "started", "ended", "starts", "reopened_at",
                 "die_count", "good", "yield", "parts", "retests", "hard_bins", "soft_bins",
                 "updated")


class HeldArchives(Protocol):
    """Archives held in memory while the history store cannot be written
    (``AlertService``)."""

    def held_lot_ids(self) -> set[str]: ...
    def held_archives(self, lot_id: str) -> list[tuple[str, str, str, dict[str, Any]]]: ...


class _Pending:
    """``ArchiveRows`` over copies of a lot's stored archives, with the archives held in
    memory applied on top: the lot as the history store will hold it once written."""

    def __init__(self, lot: dict[str, Any] | None, wafers: dict[str, dict[str, Any]],
                 wafer_ids: set[str]) -> None:
        self.archive = lot
        self.wafers = wafers
        self.ids = wafer_ids
        self.changed: list[str] = []  # the wafers' own rows written, in order

    def lot(self, lot_id: str) -> dict[str, Any] | None:
        return self.archive

    def wafer(self, lot_id: str, wafer_id: str) -> dict[str, Any] | None:
        return self.wafers.get(wafer_id)

    def wafer_ids(self, lot_id: str) -> set[str]:
        return self.ids | set(self.wafers)

    def put_lot(self, lot_id: str, archive: dict[str, Any]) -> None:
        self.archive = archive

    def put_wafer(self, lot_id: str, wafer_id: str, snap: dict[str, Any]) -> None:
        self.wafers[wafer_id] = snap
        if wafer_id not in self.changed:
            self.changed.append(wafer_id)


def _apply_held(lot: dict[str, Any] | None, wafers: dict[str, dict[str, Any]],
                wafer_ids: set[Any], held: list[tuple[str, str, str, dict[str, Any]]]
                ) -> _Pending:
    """(A worker thread: copies of a lot's archives, merges.)  The stored ones (shared
    with the store's cache: copied, the merges change what they are given) with ``held``
    applied."""
    rows = _Pending(copy.deepcopy(lot), copy.deepcopy(wafers), wafer_ids)
    for kind, lot_id, wafer_id, data in held:
        apply_archive(rows, kind, lot_id, wafer_id, data)
    return rows


def _error(status: int, message: str) -> Result:
    return status, {"error": message}


def _wafer_row(snap: dict[str, Any]) -> dict[str, Any]:
    return {k: snap.get(k) for k in _WAFER_FIELDS}


class LotPage(NamedTuple):
    """What ``/api/lots`` asks for: ``limit`` rows (1 to 1000, default 200) after the
    cursor: lots in (``updated``, ``lot_id``) order, newest first, below (``before``,
    ``before_lot``) -- ``before`` alone: updated before it."""

    limit: int
    before: float | None
    before_lot: str | None

    def admits(self, updated: float, lot_id: str) -> bool:
        return self.before is None or updated < self.before or (
            self.before_lot is not None and updated == self.before
            and lot_id < self.before_lot)


def lot_query(params: dict[str, str]) -> tuple[LotPage, str | None]:
    """``/api/lots``' page and the problem with its parameters (None: none)."""
    try:
        limit = max(1, min(1000, int(params.get("limit", "200"))))
        before = float(params["before"]) if "before" in params else None
    except ValueError:
        return LotPage(0, None, None), "limit must be an integer and before a number"
    if before is not None and before != before:  # NaN: nothing is before it
        return LotPage(0, None, None), "before must be a number"
    before_lot = params.get("before_lot")
    if before_lot is not None and before is None:
        return LotPage(0, None, None), "before_lot needs before"
    return LotPage(limit, before, before_lot), None


def _lot_key(row: dict[str, Any]) -> tuple[float, str]:
    return row.get("updated") or 0.0, str(row.get("lot_id") or "")


def lots(state: LiveState, archived: list[dict[str, Any]], params: dict[str, str]) -> Result:
    """Every lot: live ones, then archived ones not live, most recently updated first;
    ``archived``: the store's, at least ``limit`` + 1 of those after the cursor (when
    there are), so that a full page says there is another."""
    page, problem = lot_query(params)
    if problem:
        return _error(400, problem)
    limit = page.limit
    rows = []
    for lot in state.lots.values():
        snap = lot.snapshot()
        rows.append({k: snap.get(k) for k in _LOT_FIELDS} | {
            "wafers": snap["wafer_count"], "live": True})
    for summary in archived:
        if summary.get("lot_id") in state.lots:
            continue
        rows.append({k: summary.get(k) for k in _LOT_FIELDS} | {
            "wafers": summary.get("wafer_count", len(summary.get("wafers", ()))),
            "live": False} | ({"archive_pending": True} if summary.get("archive_pending")
                              else {}))
    if page.before is not None:
        rows = [r for r in rows if page.admits(*_lot_key(r))]
    rows.sort(key=_lot_key, reverse=True)
    answer: dict[str, Any] = {"lots": rows[:limit]}
    if len(rows) > limit:  # the next page: after the last row
        answer["next_before"], answer["next_before_lot"] = _lot_key(rows[limit - 1])
    return 200, answer


def wafers(state: LiveState, lot_id: str, archived: dict[str, Any] | None,
           archived_wafers: list[dict[str, Any]] | None = None) -> Result:
    """A lot's wafers with their counts (no die maps: ask per wafer): the archived ones
    (``archived_wafers``: summaries from the store, in the order they left memory), then
    the live ones, or the evicted lot's (``archived``).  A lot back in memory after it
    left (its ``counts_from``) lists its earlier passes' wafers not live again too, from
    its archive (``archived``)."""
    lot = state.lots.get(lot_id)
    if lot is not None:
        live = [_wafer_row({"wafer_id": w.wafer_id, "status": w.status, "started": w.started,
                            "ended": w.ended, "updated": w.updated, **w.passes.as_dict(),
                            **w.tally.as_dict()})
                for w in lot.wafers.values() if w.wafer_id]
        if archived is not None:
            earlier = [_wafer_row(w) for wid, w in archived["wafers"].items()
                       if wid and wid not in lot.wafers]
            shown = {r["wafer_id"] for r in earlier}
            archived_wafers = [w for w in archived_wafers or ()
                               if w.get("wafer_id") not in shown] + earlier
    elif archived is not None:
        live = [_wafer_row(w) for wid, w in archived["wafers"].items() if wid]
    elif archived_wafers:
        live = []
    else:
        return _error(404, f"unknown lot {lot_id!r}")
    have = {r["wafer_id"] for r in live}
    rows = [_wafer_row(w) for w in archived_wafers or () if w.get("wafer_id") not in have]
    return 200, {"lot_id": lot_id, "live": lot is not None, "wafers": rows + live}


def wafer(state: LiveState, lot_id: str, wafer_id: str, archived: dict[str, Any] | None,
          archived_wafer: dict[str, Any] | None = None) -> Result:
    """A wafer's map and counts: the live topic's snapshot (from memory, from the wafer's
    own archive, or from its evicted lot's -- a lot back in memory after it left too, for
    its earlier passes' wafers not live again)."""
    lot = state.lots.get(lot_id)
    snap = None
    if lot is not None:
        live = lot.wafers.get(wafer_id)
        snap = live.snapshot() if live is not None else None
        if snap is None and archived is not None:
            snap = archived["wafers"].get(wafer_id)
    elif archived is not None:
        snap = archived["wafers"].get(wafer_id)
    elif archived_wafer is None:
        return _error(404, f"unknown lot {lot_id!r}")
    snap = snap or archived_wafer
    if snap is None:
        return _error(404, f"lot {lot_id!r} has no wafer {wafer_id!r}")
    return 200, snap


def test(state: LiveState, lot_id: str, test_num: str,
         archived: dict[str, Any] | None) -> Result:
    try:
        num = int(test_num)
    except ValueError:
        return _error(400, f"test number must be an integer, got {test_num!r}")
    lot = state.lots.get(lot_id)
    if lot is not None:
        stats = lot.tests.get(num)
        snap = stats.snapshot() if stats is not None else None
        if snap is None and archived is not None:  # (a lot back in memory: not run again)
            snap = archived["tests"].get(str(num))
    elif archived is not None:
        snap = archived["tests"].get(str(num))
    else:
        return _error(404, f"unknown lot {lot_id!r}")
    if snap is None:
        return _error(404, f"lot {lot_id!r} has no test {num}")
    return 200, snap


def die_values(state: LiveState, lot_id: str, wafer_id: str, test_num: str) -> Result:
    """One test's value on every die of a live wafer (the final result of each die), for a
    wafer map coloured by that test.  Kept only while the wafer is in memory."""
    try:
        num = int(test_num)
    except ValueError:
        return _error(400, f"test number must be an integer, got {test_num!r}")
    lot = state.lots.get(lot_id)
    live = lot.wafers.get(wafer_id) if lot is not None else None
    if lot is None or live is None:
        return _error(404, f"no live wafer {wafer_id!r} in lot {lot_id!r}: die values are "
                      "kept only while a wafer is in memory")
    stats = lot.tests.get(num)
    if stats is None:
        return _error(404, f"lot {lot_id!r} has no test {num}")
    values = live.values.get(num, {})
    return 200, {
        "lot_id": lot_id, "wafer_id": wafer_id, "test_num": num, "test_txt": stats.test_txt,
        "units": stats.units, "lo_limit": stats.lo, "hi_limit": stats.hi,
        "dies": [[x, y, v] for (x, y), v in values.items()],
    }


def alert_rules(engine: AlertEngine) -> Result:
    """The configured rules (name, kind, priority, threshold): the dashboard draws the
    thresholds on its charts."""
    return 200, {"rules": [
        {"name": r.name, "kind": r.kind, "priority": r.priority, "threshold": r.threshold}
        for r in engine.config.rules]}


test.__test__ = False  # type: ignore[attr-defined]  # a handler, not a pytest test


def alert_query(params: dict[str, str]) -> tuple[dict[str, Any], str | None]:
    """Parse the /api/alerts query; returns (kwargs, error)."""
    out: dict[str, Any] = {}
    unack = params.get("unacknowledged", "0").lower()
    if unack not in ("0", "1", "true", "false"):
        return out, "unacknowledged must be 0/1 or true/false"
    out["unacknowledged"] = unack in ("1", "true")
    priority = params.get("priority")
    if priority is not None and priority not in PRIORITIES:
        return out, f"priority must be one of {', '.join(PRIORITIES)}"
    out["priority"] = priority
    try:
        out["limit"] = max(1, min(1000, int(params.get("limit", "100"))))
        out["before"] = float(params["before"]) if "before" in params else None
    except ValueError:
        return out, "limit must be an integer and before a number"
    return out, None


def alerts(engine: AlertEngine, params: dict[str, str],
           stored: list[dict[str, Any]] | None = None) -> Result:
    """Alerts newest first, from memory, completed from the store (``stored``, already
    filtered the same way) when memory holds fewer than asked."""
    query, problem = alert_query(params)
    if problem:
        return _error(400, problem)
    before = query["before"]
    rows = [a.to_dict() for a in engine.list_alerts(
        unacknowledged=query["unacknowledged"], priority=query["priority"], limit=10**9)
        if before is None or a.raised_at < before]
    seen = {r["id"] for r in rows}
    rows.extend(a for a in stored or () if a["id"] not in seen)
    rows.sort(key=lambda a: a["raised_at"], reverse=True)
    return 200, {"alerts": rows[: query["limit"]]}


def ack(engine: AlertEngine, alert_id: str, body: bytes | dict[str, Any], now: float,
        user: str | None = None) -> Result:
    """Acknowledge (as ``user`` when signed in, else as the body's ``user``); the engine
    broadcasts it to every client and the service persists it."""
    if user:
        try:
            alert = engine.ack(alert_id, user, now)
        except KeyError:
            return _error(404, f"unknown alert {alert_id!r}")
        return 200, {"alert": alert.to_dict()}
    if isinstance(body, bytes | bytearray):
        try:
            body = jsonutil.loads(body or b"{}")
        except ValueError as exc:
            return _error(400, f"body must be JSON: {{\"user\": \"name\"}} ({exc})")
    if not isinstance(body, dict):
        return _error(400, "body must be a JSON object: {\"user\": \"name\"}")
    user = body.get("user")
    if not isinstance(user, str) or not user.strip():
        return _error(400, "who acknowledges? body needs {\"user\": \"name\"}")
    try:
        alert = engine.ack(alert_id, user.strip()[:100], now)
    except KeyError:
        return _error(404, f"unknown alert {alert_id!r}")
    return 200, {"alert": alert.to_dict()}


class HistoryApi:
    """Routes the ``/api/...`` history requests of the hub's HTTP server."""

    def __init__(self, state: LiveState, engine: AlertEngine, store: HistoryStore | None = None,
                 clock: Callable[[], float] = time.time, held: HeldArchives | None = None,
                 ) -> None:
        self.state = state
        self.engine = engine
        self.store = store
        self.clock = clock
        self.held = held

    def install(self, http: HttpServer) -> None:
        http.add_route("GET", "/api/lots", self.handle)
        http.add_route("GET", "/api/lots/*", self.handle)
        http.add_route("GET", "/api/tests/*", self.handle)
        http.add_route("GET", "/api/alerts", self.handle)
        http.add_route("GET", "/api/alerts/rules", self.handle)
        http.add_route("POST", "/api/alerts/*", self.handle)

    async def _pending(self, lot_id: str) -> _Pending | None:
        """The lot's archives with those held in memory applied (None: none held)."""
        held = self.held.held_archives(lot_id) if self.held is not None else []
        if not held:
            return None
        ids: set[str] = set()  # the stored wafer archives the held ones apply over
        for kind, _, wafer_id, data in held:
            ids.update([wafer_id] if kind == "wafer" else data["wafers"])
        lot, wafers, known = None, {}, set()
        if self.store is not None:
            lot = await self.store.lot(lot_id)
            for wafer_id in sorted(ids):
                snap = await self.store.wafer(lot_id, wafer_id)
                if snap is not None:
                    wafers[wafer_id] = snap
            known = {w.get("wafer_id") for w in await self.store.wafer_summaries(lot_id)}
        return await trio.to_thread.run_sync(_apply_held, lot, wafers, known, held)

    async def _archived(self, lot_id: str, pending: _Pending | None = None
                        ) -> dict[str, Any] | None:
        """The lot's archive: of a lot not in memory, or of one back in memory after it
        left (``counts_from``: its earlier passes' wafers and tests are there); with the
        archives held in memory (``pending``) applied."""
        lot = self.state.lots.get(lot_id)
        if lot is not None and lot.counts_from is None:
            return None
        if pending is not None:
            return pending.archive
        return await self.store.lot(lot_id) if self.store is not None else None

    async def _archived_wafer(self, lot_id: str, wafer_id: str,
                              pending: _Pending | None = None) -> dict[str, Any] | None:
        lot = self.state.lots.get(lot_id)
        if lot is not None and wafer_id in lot.wafers:
            return None
        if pending is not None and wafer_id in pending.wafers:
            return pending.wafers[wafer_id]
        return await self.store.wafer(lot_id, wafer_id) if self.store is not None else None

    async def _lot_summaries(self, params: dict[str, str]) -> list[dict[str, Any]]:
        """The archived lots' summaries ``/api/lots`` may show (enough for its page: live
        lots are left out of it), those held in memory applied (marked
        ``archive_pending``)."""
        page, problem = lot_query(params)
        if problem or self.store is None:
            return []
        archived = await self.store.lot_summaries(page.limit + 1 + len(self.state.lots),
                                                  page.before, page.before_lot)
        held = self.held.held_lot_ids() if self.held is not None else set()
        if not held:
            return archived
        stored = {a.get("lot_id"): a for a in archived}
        pending = []
        for lot_id in sorted(held):
            archives = self.held.held_archives(lot_id) if self.held is not None else []
            lot_archives = [data["lot"] for kind, _, _, data in archives if kind == "lot"]
            if not lot_archives:
                continue  # (only wafers held: the lot's row is as stored)
            if any((data["lot"] if kind == "lot" else data).get("counts_from") is not None
                   for kind, _, _, data in archives):  # a later pass: merged as stored
                rows = await self._pending(lot_id)
                summary = rows.archive["lot"] if rows and rows.archive else None
            else:  # first passes (most often): the fullest, the store's rule, no merge
                summary = max(lot_archives, key=lambda a: a.get("parts") or 0)
                if (summary.get("parts") or 0) < (stored.get(lot_id, {}).get("parts") or 0):
                    summary = None
            if summary is not None:
                pending.append({**summary, "archive_pending": True})
        shown = {p.get("lot_id") for p in pending}
        return [s for s in archived if s.get("lot_id") not in shown] + pending

    async def _wafer_summaries(self, lot_id: str, pending: _Pending | None
                               ) -> list[dict[str, Any]]:
        """A lot's wafers that left memory, in the order they left: those held in memory
        applied (in their place if stored, else after)."""
        gone = await self.store.wafer_summaries(lot_id) if self.store is not None else []
        if pending is None or not pending.changed:
            return gone
        held = {w: {k: pending.wafers[w].get(k) for k in WAFER_SUMMARY}
                for w in pending.changed}
        out = [held.pop(w["wafer_id"], w) for w in gone]
        return out + list(held.values())

    async def dispatch(self, method: str, path: str, params: dict[str, str],
                       body: bytes = b"", principal: Any = None) -> Result:
        """Answer ``method path`` (``path`` as it came, percent-encoded: each segment is
        decoded on its own, so ``/api/lots/A%2FB/wafers`` is lot ``A/B``'s wafers)."""
        status, payload = await self._dispatch(method, path, params, body, principal)
        if principal is not None and principal.lots is not None and status == 200:
            _scope(payload, principal)
        return status, payload

    async def _dispatch(self, method: str, path: str, params: dict[str, str],
                        body: bytes, principal: Any) -> Result:
        parts = path_segments(path)
        if parts[:1] != ["api"]:
            return _error(404, "not an API path")
        parts = parts[1:]
        # a lot outside a lot-scoped principal's scope does not exist for it, on every route
        if principal is not None and principal.lots is not None and len(parts) >= 2 and (
                parts[0] in ("lots", "tests") and not principal.sees_lot(parts[1])):
            return _error(404, f"unknown lot {parts[1]!r}")
        if method == "GET" and parts == ["lots"]:
            return lots(self.state, await self._lot_summaries(params), params)
        if method == "GET" and len(parts) == 3 and parts[0] == "lots" and parts[2] == "wafers":
            lot_id = parts[1]
            pending = await self._pending(lot_id)
            status, answer = wafers(self.state, lot_id, await self._archived(lot_id, pending),
                                    await self._wafer_summaries(lot_id, pending))
            if status == 200 and pending is not None:
                answer["archive_pending"] = True
            return status, answer
        if method == "GET" and len(parts) == 4 and parts[0] == "lots" and parts[2] == "wafers":
            lot_id, wafer_id = parts[1], parts[3]
            pending = await self._pending(lot_id)
            status, answer = wafer(self.state, lot_id, wafer_id,
                                   await self._archived(lot_id, pending),
                                   await self._archived_wafer(lot_id, wafer_id, pending))
            lot = self.state.lots.get(lot_id)
            if status == 200 and pending is not None and (lot is None
                                                          or wafer_id not in lot.wafers):
                answer = {**answer, "archive_pending": True}  # (a copy: it may be held)
            return status, answer
        if method == "GET" and len(parts) == 6 and parts[0] == "lots" and parts[2] == "wafers" \
                and parts[4] == "tests":
            if principal is not None and principal.lots is not None \
                    and not principal.sees_lot(parts[1]):
                return _error(404, f"unknown lot {parts[1]!r}")
            return die_values(self.state, parts[1], parts[3], parts[5])
        if method == "GET" and parts == ["alerts", "rules"]:
            return alert_rules(self.engine)
        if method == "GET" and len(parts) == 3 and parts[0] == "tests":
            pending = await self._pending(parts[1])
            status, answer = test(self.state, parts[1], parts[2],
                                  await self._archived(parts[1], pending))
            lot = self.state.lots.get(parts[1])
            if status == 200 and pending is not None and (
                    lot is None or lot.tests.get(int(parts[2])) is None):
                answer = {**answer, "archive_pending": True}  # (a copy: it may be held)
            return status, answer
        if method == "GET" and parts == ["alerts"]:
            query, problem = alert_query(params)
            if problem:
                return _error(400, problem)
            stored = None
            if self.store is not None:
                stored = await self.store.alerts(**query)
            return alerts(self.engine, params, stored)
        if method == "POST" and len(parts) == 3 and parts[0] == "alerts" and parts[2] == "ack":
            known = self.engine.alerts.get(parts[1])
            if principal is not None and known is not None and not _sees_alert(
                    principal, known.to_dict()):
                return _error(404, f"unknown alert {parts[1]!r}")
            user = principal.user if principal is not None and principal.via != "none" else None
            return ack(self.engine, parts[1], body, self.clock(), user)
        return _error(404, f"no such API route: {method} {path}")

    async def handle(self, request: Request) -> Response:
        from edgegw.web import json_response

        status, payload = await self.dispatch(request.method, request.raw_path or request.path,
                                              request.query, request.body, request.principal)
        return json_response(payload, status)


def _sees_alert(principal: Any, alert: dict[str, Any]) -> bool:
    lot = (alert.get("context") or {}).get("lot_id")
    return lot is None or principal.sees_lot(str(lot))


def _scope(payload: dict[str, Any], principal: Any) -> None:
    """Drop the rows of lots outside a lot-scoped principal's scope, in place."""
    if isinstance(payload.get("lots"), list):
        payload["lots"] = [r for r in payload["lots"] if principal.sees_lot(str(r.get("lot_id")))]
    if isinstance(payload.get("alerts"), list):
        payload["alerts"] = [a for a in payload["alerts"] if _sees_alert(principal, a)]


__all__ = [
    "HeldArchives", "HistoryApi", "LotPage", "Result", "ack", "alert_query", "alert_rules",
    "alerts", "die_values", "lot_query", "lots", "test", "wafer", "wafers",
]
