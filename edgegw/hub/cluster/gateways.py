"""A gateway's live topic in a cluster (``gateway/<id>``), as a single hub shows it
(docs/cluster.md, "A gateway's topic"; the shape: docs/live-topics.md).

A gateway's records are spread over partitions by lot, and its connection is on whichever
node the load balancer picked, so no partition's ``LiveState`` sees all of it.  The owner of
the gateway's ``gw:<id>`` partition publishes the topic from ``GatewayTopics`` (sans-IO),
fed with what is cluster-wide:

* **counts** (``records``, ``frames``, ``last_rid``): PostgreSQL's per-gateway counters,
  incremented in the transaction that applies each frame (``GatewayTotals``), read by the
  owner once a second for all its gateways (one query) and when it takes the partition
  over.  Totals only grow: an older read arriving late is ignored.
* **connection** (``online``, ``connected_at``, ``disconnected_at``): the gateway's Redis
  presence, written by the node its connection is on at HELLO and removed when that
  connection ends (``ClusterBus.claim_presence``/``drop_presence``: a newer connection on
  another node is never overwritten or removed by an older one).
* **events**: the gateway's ``GatewayEvent`` records carry no lot, so they are all in the
  ``gw:<id>`` partition: that partition's ``LiveState`` keeps them (and checkpoints them);
  its ``{"event": ...}`` deltas pass through, its per-partition counts do not.

``last_seen`` and ``records_per_s`` follow the totals growing while the gateway is online
(the owner's clock); otherwise ``last_seen`` is the last commit's time.  A new owner (the
partition moved, or the gateway is new) first seeds the rate's window with the gateway's
records committed in its last seconds (``seed_rate``, from PostgreSQL's frames), before it
reads the totals it counts growth from: the rate carries over an owner change instead of
starting again from 0.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from edgegw.hub import topics as topic_names
from edgegw.hub.live.models import RATE_WINDOW_S, GatewayState

# RATE_WINDOW_S: the seconds of a gateway's past records a new owner seeds its
# ``records_per_s`` window with

Publish = Callable[[str, dict[str, Any]], None]


class GatewayTopics:
    """The ``gateway/<id>`` topics of one partition owner (module docstring).
    ``events_of(gateway)`` gives the partition state's events of that gateway, oldest
    first."""

    def __init__(self, publish: Publish,
                 events_of: Callable[[str], Iterable[dict[str, Any]]]) -> None:
        self._publish = publish
        self._events_of = events_of
        self._gateways: dict[str, GatewayState] = {}
        #: the gateways whose rate window was seeded (``seed_rate``)
        self._seeded: set[str] = set()

    def _gateway(self, gateway_id: str) -> GatewayState:
        gw = self._gateways.get(gateway_id)
        if gw is None:
            gw = self._gateways[gateway_id] = GatewayState(gateway_id)
        return gw

    def know(self, gateway_id: str) -> None:
        """A gateway of this partition (its topic exists from now on)."""
        self._gateway(gateway_id)

    def names(self) -> list[str]:
        return list(self._gateways)

    def unseeded(self) -> list[str]:
        """The gateways whose rate window is still to be seeded (before their first
        totals)."""
        return [g for g in self._gateways if g not in self._seeded]

    def seed_rate(self, gateway_id: str, per_second: dict[int, int], now: float) -> None:
        """The gateway's records committed in the last ``RATE_WINDOW_S`` seconds (per
        whole second, by this node's clock: ``ClusterStore.recent_records``), counted
        before this owner had the topic: its ``records_per_s`` goes on from there.  Call
        it before the gateway's first ``totals``: the growth counted from then on starts
        after these records (a commit between the two reads is missed by the rate, never
        counted twice)."""
        gw = self._gateway(gateway_id)
        if gateway_id in self._seeded:
            return
        self._seeded.add(gateway_id)
        if gw.records:  # totals read already: their growth is counted from there
            return
        low = now - RATE_WINDOW_S
        for sec, n in per_second.items():
            if sec > low and n > 0:
                gw.per_second[sec] = gw.per_second.get(sec, 0) + n
        if gw.per_second:
            gw.rate_now = now

    def online(self, gateway_id: str) -> bool | None:
        gw = self._gateways.get(gateway_id)
        return gw.online if gw is not None else None

    def totals(self, gateway_id: str, records: int, frames: int, last_rid: int | None,
               last_seen: float | None, now: float) -> bool:
        """The gateway's cluster-wide totals after some commit; False (nothing published)
        when they are not newer than what is known (an older read)."""
        gw = self._gateway(gateway_id)
        if records <= gw.records and frames <= gw.frames and (
                last_rid is None or (gw.last_rid is not None and last_rid <= gw.last_rid)):
            return False
        grown = max(0, records - gw.records)
        gw.records = max(gw.records, records)
        gw.frames = max(gw.frames, frames)
        if last_rid is not None and (gw.last_rid is None or last_rid > gw.last_rid):
            gw.last_rid = last_rid
        if gw.online:
            gw.last_seen = now
            if grown:
                gw.count(grown, now)
        elif last_seen is not None and (gw.last_seen is None or last_seen > gw.last_seen):
            gw.last_seen = last_seen
        self._publish(gw.topic, {
            "online": gw.online, "last_seen": gw.last_seen, "records": gw.records,
            "frames": gw.frames, "last_rid": gw.last_rid,
            "records_per_s": gw.records_per_s(now)})
        return True

    def presence(self, gateway_id: str, online: bool, connected_at: float | None,
                 now: float) -> bool:
        """The gateway's connection as its Redis presence says (``connected_at``: when
        that connection was made); True when that changed the topic (a connect, a
        disconnect, or a reconnect elsewhere), as a single hub's ``on_gateway``."""
        gw = self._gateway(gateway_id)
        if online == gw.online and (not online or connected_at is None
                                    or connected_at == gw.connected_at):
            return False
        gw.online = online
        gw.last_seen = now
        if online:
            gw.connected_at = connected_at if connected_at is not None else now
        else:
            gw.disconnected_at = now
        self._publish(gw.topic, {
            "online": online, "last_seen": now, "connected_at": gw.connected_at,
            "disconnected_at": gw.disconnected_at, "records_per_s": gw.records_per_s(now)})
        return True

    def tick(self, now: float) -> None:
        """About once a second: rates decay as on a single hub (``LiveState.tick``)."""
        for gw in self._gateways.values():
            if gw.per_second and gw.rate_now < now - 1:
                rate = gw.records_per_s(now)
                self._publish(gw.topic, {"records_per_s": rate})
                if rate == 0:
                    gw.per_second.clear()
                gw.rate_now = now

    def snapshot(self, topic: str) -> dict[str, Any] | None:
        parts = topic_names.split(topic)
        gw = self._gateways.get(parts[1]) if parts[0] == "gateway" and len(parts) == 2 \
            else None
        if gw is None:
            return None
        snap = gw.snapshot()
        snap["events"] = list(reversed(list(self._events_of(gw.gateway_id))))
        return snap

    def topics(self) -> list[str]:
        return [gw.topic for gw in self._gateways.values()]


def event_only(delta: dict[str, Any]) -> dict[str, Any] | None:
    """What of a partition state's ``gateway/<id>`` delta the cluster topic takes: its
    event (the counts and connection fields are cluster-wide, from ``GatewayTopics``)."""
    return {"event": delta["event"]} if "event" in delta else None


__all__ = ["GatewayTopics", "event_only"]
