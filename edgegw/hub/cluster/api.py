"""The history API on a cluster node: the same answers on every node (docs/cluster.md,
"A node").

A lot's live state is computed by one node, the owner of its partition; every node
mirrors from Redis the live topics its own clients follow (``Mirror``) and reads the others
for each answer (``Mirror.read_views``: snapshot + the stream after it, so current to the
head), and the history API's answers for live lots, wafers and tests *are* those topics'
snapshots (``edgegw.hub.history``: "The JSON
shapes are the live topics' snapshots").  So a node answers ``/api/lots``,
``/api/lots/<lot>/wafers[/<wafer>]`` and ``/api/tests/<lot>/<n>`` from its mirror, through
the single hub's own handlers: ``MirrorLots`` gives them the small part of ``LiveState``
they read (``lots``, each lot's ``wafers`` and ``tests``, their snapshots), built from the
views read.  Every node reads the same offsets of the same streams, so every node
gives the same answer (a node that is behind by a few milliseconds answers what it has, as
the single hub's API does between two frames).

Lots and wafers that left their owner's memory (an evicted lot, a wafer over
``max_wafers_per_lot``) are no topic any more: their owner wrote them to PostgreSQL
(``save_archives``, owner.py), and every node answers them from there (``ClusterArchives``:
the single hub's history store's reads, on PostgreSQL), through the same handlers.

Not from the mirror: per-die test values (``/api/lots/<lot>/wafers/<w>/tests/<n>``) are
kept only in the owner's memory and are not a topic: the owner of the lot's partition
answers them, asked over Redis (``die_values``, dievalues.py) -- the single hub's answer on
every node, or 503 (``"retry": true``) while the partition has no owner able to answer.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

from edgegw import jsonutil
from edgegw.hub import topics as topic_names
from edgegw.hub.alerts import AlertEngine
from edgegw.hub.fanout.core import StateSource
from edgegw.hub.history import HistoryApi, Result, _sees_alert, alert_query
from edgegw.web import path_segments


class _Tally:
    def __init__(self, snap: dict[str, Any]) -> None:
        self._snap = snap

    def as_dict(self) -> dict[str, Any]:
        return dict(self._snap)


class _Passes:
    def __init__(self, snap: dict[str, Any]) -> None:
        self._snap = snap

    def as_dict(self) -> dict[str, Any]:
        return {"starts": self._snap.get("starts"), "reopened_at": self._snap.get("reopened_at")}


class _Wafer:
    def __init__(self, wafer_id: str, snap: dict[str, Any]) -> None:
        self.wafer_id = wafer_id
        self._snap = snap
        self.status = snap.get("status")
        self.started = snap.get("started")
        self.ended = snap.get("ended")
        self.updated = snap.get("updated")
        self.passes = _Passes(snap)
        self.tally = _Tally(snap)
        self.values: dict[int, dict[Any, Any]] = {}

    def snapshot(self) -> dict[str, Any]:
        return self._snap


class _Snap:
    def __init__(self, snap: dict[str, Any]) -> None:
        self._snap = snap
        self.test_txt = snap.get("test_txt")
        self.units = snap.get("units")

    def snapshot(self) -> dict[str, Any]:
        return self._snap


class _Lot:
    def __init__(self, lot_id: str, snap: dict[str, Any]) -> None:
        self.lot_id = lot_id
        self._snap = snap
        self.wafers: dict[str, _Wafer] = {}
        self.tests: dict[int, _Snap] = {}
        #: a lot back in memory after it left: its earlier passes are in its archive
        self.counts_from = snap.get("counts_from")

    def snapshot(self) -> dict[str, Any]:
        return self._snap


class MirrorLots:
    """The lots of a node's mirror, shaped as the part of ``LiveState`` the history API
    reads."""

    def __init__(self, source: StateSource) -> None:
        self.source = source

    @property
    def lots(self) -> dict[str, Any]:
        lots: dict[str, Any] = {}
        pending: list[tuple[list[str], str]] = []
        for topic in self.source.topics():
            parts = topic_names.split(topic)
            if parts[0] == "lot" and len(parts) == 2:
                snap = self.source.snapshot(topic)
                if snap is not None:
                    lots[parts[1]] = _Lot(parts[1], snap)
            elif parts[0] in ("lot", "test"):
                pending.append((parts, topic))
        for parts, topic in pending:
            lot = lots.get(parts[1])
            if lot is None:
                continue
            snap = self.source.snapshot(topic)
            if snap is None:
                continue
            if parts[0] == "lot" and len(parts) == 4 and parts[2] == "wafer":
                lot.wafers[parts[3]] = _Wafer(parts[3], snap)
            elif parts[0] == "test" and len(parts) == 3:
                try:
                    lot.tests[int(parts[2])] = _Snap(snap)
                except ValueError:
                    continue
        # a lot's wafers in the order they started, as a single hub keeps them (a mirror's
        # own order is the order it learned the topics in, which differs between nodes)
        for lot in lots.values():
            lot.wafers = dict(sorted(lot.wafers.items(), key=lambda kv: (
                kv[1].started if isinstance(kv[1].started, (int, float)) else 0.0, kv[0])))
            lot.tests = dict(sorted(lot.tests.items()))
        return lots


class ClusterArchives:
    """The archived lots and wafers in PostgreSQL, shaped as the part of the single hub's
    ``HistoryStore`` the history API reads.  Not cached: another node's owner may replace
    an archive at any time (a cache per node would answer differently from node to node)."""

    def __init__(self, store: Any) -> None:
        self.store = store

    async def lot_summaries(self, limit: int = 500, before: float | None = None,
                            before_lot: str | None = None) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = await self.store.lot_summaries(limit, before, before_lot)
        return out

    async def wafer_summaries(self, lot_id: str) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = await self.store.wafer_summaries(lot_id)
        return out

    async def lot(self, lot_id: str) -> dict[str, Any] | None:
        out: dict[str, Any] | None = await self.store.lot_archive(lot_id)
        return out

    async def wafer(self, lot_id: str, wafer_id: str) -> dict[str, Any] | None:
        out: dict[str, Any] | None = await self.store.wafer_archive(lot_id, wafer_id)
        return out


class ClusterHistoryApi(HistoryApi):
    """The single hub's ``HistoryApi`` over a node's mirror (``MirrorLots``), alerts from
    PostgreSQL (``ClusterStore``: one row per alert cluster-wide)."""

    def __init__(self, state: Any, engine: AlertEngine, store: Any,
                 read_views: Callable[[Callable[[str], bool]], Awaitable[StateSource]]
                 | None = None,
                 die_values: Callable[[str, str, str], Awaitable[Result]] | None = None,
                 ) -> None:
        super().__init__(state, engine)
        self.cluster_store = store
        self.die_values = die_values
        # A node mirrors only the topics its clients follow: lots, wafers and tests are
        # read for each answer (``Mirror.read_views``: its own views, the rest from Redis).
        self.read_views = read_views
        self.archives = ClusterArchives(store)

    async def dispatch(self, method: str, path: str, params: dict[str, str],
                       body: bytes = b"", principal: Any = None) -> Result:
        parts = path_segments(path)
        if method == "GET" and parts == ["api", "alerts"]:
            return await self._alerts(params, principal)
        if method == "POST" and len(parts) == 4 and parts[1] == "alerts" and parts[3] == "ack":
            return await self._ack(parts[2], body, principal)
        if method == "GET" and len(parts) == 7 and parts[1:2] == ["lots"] \
                and parts[3] == "wafers" and parts[5] == "tests":
            # per-die values live only in the owner's memory: it answers (dievalues.py)
            if principal is not None and principal.lots is not None \
                    and not principal.sees_lot(parts[2]):
                return 404, {"error": f"unknown lot {parts[2]!r}"}
            if self.die_values is None:
                return 404, {"error": "per-die test values are not served here"}
            return await self.die_values(parts[2], parts[4], parts[6])
        if method == "GET" and self.read_views is not None and len(parts) >= 2 \
                and parts[1] in ("lots", "tests"):
            lot = {parts[2]} if len(parts) > 2 else None

            def wanted(topic: str) -> bool:
                names = topic_names.split(topic)
                if lot is None:  # the list of lots: their own topics only
                    return names[0] == "lot" and len(names) == 2
                return names[0] in ("lot", "test") and len(names) > 1 and names[1] in lot

            source = await self.read_views(wanted)
            return await HistoryApi(MirrorLots(source), self.engine,  # type: ignore[arg-type]
                                    self.archives).dispatch(  # type: ignore[arg-type]
                method, path, params, body, principal)
        return await super().dispatch(method, path, params, body, principal)


    async def _stored_alerts(self) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = await self.cluster_store.load_alerts(
            self.engine.config.keep)
        return rows

    async def _alerts(self, params: dict[str, str], principal: Any) -> Result:
        query, problem = alert_query(params)
        if problem:
            return 400, {"error": problem}
        before = query["before"]
        rows = [a for a in await self._stored_alerts()
                if (not query["unacknowledged"] or not a.get("acknowledged"))
                and (query["priority"] is None or a.get("priority") == query["priority"])
                and (before is None or a["raised_at"] < before)]
        if principal is not None and principal.lots is not None:
            rows = [a for a in rows if _sees_alert(principal, a)]
        rows.sort(key=lambda a: a["raised_at"], reverse=True)
        return 200, {"alerts": rows[: query["limit"]]}

    async def _ack(self, alert_id: str, body: bytes, principal: Any) -> Result:
        """Acknowledged on any node: one UPDATE in PostgreSQL (the first acknowledgement
        stands); the owner of the alert's partition reads it within a second and stops
        its escalation."""
        user = principal.user if principal is not None and principal.via != "none" else None
        if not user:
            try:
                data = jsonutil.loads(body or b"{}")
            except ValueError as exc:
                return 400, {"error": f"body must be JSON: {{\"user\": \"name\"}} ({exc})"}
            user = data.get("user") if isinstance(data, dict) else None
            if not isinstance(user, str) or not user.strip():
                return 400, {"error": "who acknowledges? body needs {\"user\": \"name\"}"}
            user = user.strip()[:100]
        known = {a["id"]: a for a in await self._stored_alerts()}
        alert = known.get(alert_id)
        if alert is None or (principal is not None and principal.lots is not None
                             and not _sees_alert(principal, alert)):
            return 404, {"error": f"unknown alert {alert_id!r}"}
        await self.cluster_store.ack_alert(alert_id, user, time.time())
        alert = {a["id"]: a for a in await self._stored_alerts()}.get(alert_id, alert)
        return 200, {"alert": alert}


__all__ = ["ClusterArchives", "ClusterHistoryApi", "MirrorLots"]
