"""``/api/stats`` on a cluster node: the single hub's shape (docs/api.md), with the figures
a user reads as the hub's taken cluster-wide (docs/cluster.md, "A node"):

* ``gateways``: every gateway the cluster knows, its counters from PostgreSQL (incremented
  in the transaction that applies each frame: the same on every node) and ``connected``
  from its Redis presence (connected to any node); ``refused`` and ``rtt_ms`` are this
  node's (refusals are counted where they happen, a round trip is measured by the node
  holding the connection);
* ``live_state``: the partitions' figures added up -- ``lots_live``, ``wafers_live`` and the
  records not applied as each owner saved them (``partition_state``, fenced by its lease
  token), ``lots_evicted`` and ``wafers_archived`` the archives in PostgreSQL;
* the rest (``replay``, ``store``, ``live_queue``, ``metrics``, ``cluster``) is this node's.

Read for each request (a few indexed queries and one presence read per gateway): the
ingest's synchronous stats cannot wait for PostgreSQL.  While PostgreSQL or Redis cannot
answer within ``timeout_s`` the node answers its own figures and says so
(``cluster.figures``), rather than hang a monitor.
"""

from __future__ import annotations

import logging
from typing import Any

import trio

from edgegw.hub.store import StoreUnavailable
from edgegw.web import Request, Response, json_response

from .alertfeed import merge_warnings
from .bus import BusUnavailable

log = logging.getLogger("edgegw.hub.cluster.stats")


def cluster_live_state(per_partition: dict[int, dict[str, Any]], lots_archived: int,
                       wafers_archived: int) -> dict[str, Any]:
    """The single hub's ``live_state`` section from every partition's saved figures and
    the cluster's archive counts (sans-IO)."""
    parts = [per_partition[p] for p in sorted(per_partition)]
    return {"lots_live": sum(int(d.get("lots_live", 0)) for d in parts),
            "wafers_live": sum(int(d.get("wafers_live", 0)) for d in parts),
            "wafers_archived": wafers_archived, "lots_evicted": lots_archived,
            **merge_warnings(parts)}


class ClusterStats:
    """Serves ``/api/stats`` on a node (see the module docstring)."""

    def __init__(self, ingest: Any, store: Any, bus: Any, timeout_s: float = 2.0) -> None:
        self.ingest = ingest
        self.store = store
        self.bus = bus
        self.timeout_s = timeout_s

    def install(self, http: Any) -> None:
        http.add_route("GET", "/api/stats", self.handle)  # (replaces the ingest's own)

    async def handle(self, request: Request) -> Response:
        return json_response(await self.stats())

    async def stats(self) -> dict[str, Any]:
        body: dict[str, Any] = self.ingest.stats()
        try:
            with trio.fail_after(self.timeout_s):
                gateways, live_state = await self._cluster_figures(body["gateways"])
        except (StoreUnavailable, BusUnavailable, trio.TooSlowError) as exc:
            log.debug("cluster figures of /api/stats not read", exc_info=True)
            body["live_state"] = None
            figures = f"node only: cluster figures unavailable ({type(exc).__name__})"
        else:
            body["gateways"], body["live_state"] = gateways, live_state
            figures = "cluster"
        if isinstance(body.get("cluster"), dict):
            body["cluster"]["figures"] = figures
        return body

    async def _cluster_figures(self, local: dict[str, dict[str, Any]]
                               ) -> tuple[dict[str, Any], dict[str, Any]]:
        stats = await self.store.all_gateway_stats()
        gateways: dict[str, Any] = {}
        for gw in sorted(set(stats) | set(local)):
            st = stats.get(gw)
            here = local.get(gw) or {}
            present = bool(here.get("connected")) or await self.bus.presence(gw) is not None
            gateways[gw] = {
                "connected": present,
                "epoch": st.epoch if st else here.get("epoch"),
                "frames_applied": st.frames_applied if st else 0,
                "records_applied": st.records_applied if st else 0,
                "last_seq": st.last_seq if st else 0,
                "duplicates_dropped": st.duplicates_dropped if st else 0,
                "frames_rejected": st.frames_rejected if st else 0,
                "frames_lost": st.frames_lost if st else 0,
                "refused": here.get("refused", 0),
                "last_seen": st.last_seen if st else None,
                "rtt_ms": here.get("rtt_ms"),
            }
        lots, wafers = await self.store.archive_counts()
        return gateways, cluster_live_state(await self.store.partition_states(), lots, wafers)


__all__ = ["ClusterStats", "cluster_live_state"]
