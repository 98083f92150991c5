"""One node of a hub cluster (``ClusterHub``), assembled: what ``edgegw hub`` runs when the
config has a ``[hub.cluster]`` section (docs/cluster.md, "A node").

A node is the single hub's pieces, re-plugged:

* **Ingest**: the same gateway endpoint and protocol (``Ingest``), its store the cluster's
  PostgreSQL (``ClusterStore``): HELLO claims the gateway's generation (newest connection
  wins across nodes), every commit is fenced by it, and while PostgreSQL is unreachable
  acknowledgements pause and the commit is retried (the gateways keep spooling).  The
  ingest has no live state of its own; after each commit the node tells the owners of the
  partitions it advanced (``Notifier``: a Redis wake-up; owners also poll, so a lost
  wake-up costs latency, never data), and after each HELLO the node that may still hold
  an older connection of that gateway (it closes it at once).
* **Ownership** (``PartitionOwner``, owner.py): this node's share of the partitions, their
  live state rebuilt from PostgreSQL and published to Redis (``TopicPublisher``).
* **Fan-out**: the single hub's ``LiveFanout``, fed by the bus's mirror (``Mirror``) of
  the topics this node's clients follow, instead of a local live state: every node can
  serve every topic with the cluster's epoch and offsets, so a client may resume on any node.
* **HTTP**: the dashboard, ``/ws/live``, ``/api`` (lots, wafers and tests answered from the
  mirror: the same on every node, api.py) and ``/healthz``, which answers 503 while the node cannot
  serve live data (cut off from Redis), so the load balancer sends its clients elsewhere.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import trio

from edgegw.hub.alerts import AlertEngine, AlertsConfig, reload_summary
from edgegw.hub.config import HubConfig
from edgegw.hub.dashboard import Dashboard
from edgegw.hub.fanout import LiveFanout
from edgegw.hub.ingest import Ingest
from edgegw.hub.live import LiveState
from edgegw.metrics import Metrics
from edgegw.web import Request, Response, json_response

from .alertfeed import AlertFeed, GatewayPresence
from .api import ClusterHistoryApi, MirrorLots
from .config import node_id_of, redis_tls
from .dievalues import DieValues
from .owner import Archives, OwnedTopics, PartitionOwner
from .stats import ClusterStats

log = logging.getLogger("edgegw.hub.cluster.node")


#: seconds between an owner's reads of a partition when no wake-up came (a lost one)
OWNER_POLL_S = 5.0


class Notifier:
    """Cross-node wake-ups, sent from one task (sync in, coalesced): "partition p advanced
    to pseq" after each commit (``ClusterStore.on_advance``), so owners on other nodes read
    at once, and "gateway g claimed with generation n" after each HELLO, so the node still
    holding an older connection of g closes it promptly (``Ingest.supersede``; the store's
    fence refuses that connection's next commit anyway).  Best effort: owners also poll,
    and a superseded idle connection also ends at its heartbeat."""

    def __init__(self, bus: Any, local_wake: Callable[[int, int], None]) -> None:
        self.bus = bus
        self.local_wake = local_wake
        self._heads: dict[int, int] = {}
        self._claims: dict[str, int] = {}
        self._wake = trio.Event()
        self.sent = 0

    def advanced(self, heads: dict[int, int]) -> None:
        for p, pseq in heads.items():
            self.local_wake(p, pseq)  # an owner on this node: no round trip
            if pseq > self._heads.get(p, -1):
                self._heads[p] = pseq
        self._wake.set()

    def claimed(self, gateway: str, generation: int) -> None:
        self._claims[gateway] = max(generation, self._claims.get(gateway, 0))
        self._wake.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        task_status.started()
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            heads, self._heads = self._heads, {}
            claims, self._claims = self._claims, {}
            try:
                if heads:  # one pipeline per Redis shard, each to its partition's owner
                    await self.bus.notify_partitions(heads)
                    self.sent += len(heads)
                for gw, generation in claims.items():
                    await self.bus.notify("notice", f"claim {generation} {gw}".encode())
                    self.sent += 1
            except Exception:  # Redis away: owners poll, heartbeats expire
                log.debug("cluster notices not sent", exc_info=True)


class NodeIngest(Ingest):
    """The single hub's ingest on the cluster's store, with no live state behind it (an
    applied frame's records are in their partitions' logs already, written in the same
    transaction) and no start-up replay (owners rebuild per partition)."""

    notifier: Notifier | None = None
    presence: GatewayPresence | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: gateway -> (generation, connected at) of its connection on this node
        self.sessions: dict[str, tuple[int, float]] = {}

    def _gateway_event(self, gw: str, connected: bool) -> None:
        super()._gateway_event(gw, connected)
        session = self.connected.get(gw)
        if connected and session is not None:
            self.sessions[gw] = (session.generation, time.time())
            if self.notifier is not None:
                self.notifier.claimed(gw, session.generation)
            if self.presence is not None:
                self.presence.up(gw, *self.sessions[gw])
        elif not connected:
            ended = self.sessions.pop(gw, None)
            if ended is not None and self.presence is not None:
                self.presence.down(gw, ended[0])


class ClusterHub:
    """One cluster node: ingest, ownership, fan-out, HTTP (see the module docstring)."""

    #: ``LiveState`` caps of every partition's state (``max_lots``, ``max_wafers_per_lot``,
    #: ...): the single hub's defaults; tests set small ones
    state_caps: dict[str, Any] = {}

    def __init__(self, config: HubConfig, metrics: Metrics | None = None) -> None:
        from .bus import ClusterBus
        from .mirror import Mirror
        from .pgstore import ClusterStore
        from .publisher import TopicPublisher

        cc = config.hub.cluster
        assert cc is not None, "ClusterHub needs a [hub.cluster] section"
        self.config = config
        self.cluster = cc
        self.node_id = node_id_of(cc)
        metrics = metrics or Metrics()
        self.store = ClusterStore(cc.postgres_dsn, self.node_id, cc.partitions,
                                  connections=cc.pg_connections,
                                  redis_shards=len(cc.redis_urls) or 1,
                                  idle_in_transaction_timeout_s=cc.idle_in_transaction_timeout,
                                  lock_timeout_s=cc.lock_timeout, metrics=metrics)
        self.ingest = NodeIngest(config, metrics, store=self.store)
        self.ingest.history_pruner = self.store.prune_history  # hub.retain_history_days
        self.ingest.alerts_pruner = self.store.prune_alerts
        self.ingest.reloader.alerts_reloader = self._reload_alerts
        self.ingest.reloader.auth_rechecks.append(
            lambda: self.fanout.recheck(self.ingest.security.still_signed_in))
        self.bus = ClusterBus(list(cc.redis_urls) or cc.redis_url, cc.key_prefix,
                              self.node_id, partitions=cc.partitions,
                              stale_after_s=cc.stale_after_s, metrics=metrics,
                              tls=redis_tls(cc))
        # the store checks, under its start-up lock, that each shard is the cluster's shard
        # at that index (its label in Redis), not only that the count matches
        self.store.shard_labels = self.bus
        self.fanout = LiveFanout(config.live, metrics=metrics)
        # only the topics this node's clients follow (docs/cluster.md, "Mirroring")
        self.mirror = Mirror(self.bus, self.fanout, metrics=metrics,
                             interest=self.fanout.core.subscribed_patterns)

        def make_publisher(source: OwnedTopics) -> TopicPublisher:
            return TopicPublisher(self.bus, source, snapshot_interval_s=cc.snapshot_interval_s)

        self.owner = PartitionOwner(
            self.node_id, cc.partitions, self.bus, self.store, make_publisher,
            lease_ttl_s=cc.lease_ttl_s, checkpoint_records=cc.checkpoint_records,
            checkpoint_interval_s=cc.checkpoint_interval_s, make_state=self._make_state,
            alerts=config.alerts, metrics=metrics,
            # a backstop only: commits wake their partition's owner through Redis, and
            # every owned partition is woken when a subscription reopens (_wake_owners)
            poll_s=OWNER_POLL_S)
        # alert topics and webhooks: one publisher cluster-wide (alertfeed.py)
        self.alert_feed = AlertFeed(self.bus, self.store, config.alerts,
                                    make_publisher,  # type: ignore[arg-type]
                                    lease_ttl_s=cc.lease_ttl_s, metrics=metrics)
        self.presence = GatewayPresence(self.bus, lambda: dict(self.ingest.sessions),
                                        ttl_s=cc.lease_ttl_s)
        self.notifier = Notifier(self.bus,
                                 lambda p, pseq: self.owner.wake(p, "local", pseq))
        self.store.on_advance = self.notifier.advanced
        self.ingest.notifier = self.notifier
        self.ingest.presence = self.presence
        # per-die values: answered by the owner of the lot's partition (dievalues.py)
        self.die_values = DieValues(self.bus, self.owner.state_for, cc.partitions,
                                    timeout_s=max(2.0, cc.stale_after_s))
        # the owner skips a wake-up it had (its own commit's, woken locally already)
        self.bus.on_partition(lambda p, pseq: self.owner.wake(p, "redis", pseq))
        self.bus.on("notice", self._notice)
        self.fanout.install(self.ingest.http)
        Dashboard().install(self.ingest.http)
        # /api from the mirror and PostgreSQL: the same answers on every node (api.py)
        self.alerts = AlertEngine(config.alerts, lambda topic, delta: None, metrics=metrics)
        ClusterHistoryApi(MirrorLots(self.mirror.state), self.alerts,
                          store=self.store, read_views=self.mirror.read_views,
                          die_values=self.die_values.ask).install(self.ingest.http)
        # /api/stats: the single hub's shape, gateways and live_state cluster-wide (stats.py)
        self.stats = ClusterStats(self.ingest, self.store, self.bus)
        self.stats.install(self.ingest.http)
        self._ingest_health = self.ingest.health

        async def healthz(request: Request) -> Response:
            ok, body = self.health()
            return json_response(body, 200 if ok else 503)
        self.ingest.http.add_route("GET", "/healthz", healthz)  # with the cluster's status
        self.ingest.stats_sections["cluster"] = self.status
        self.started_at = time.time()

    def _reload_alerts(self, config: AlertsConfig) -> str:
        """A SIGHUP's ``[alerts]``: this node's partitions judge by its rules from now on,
        its ``/api/alerts/rules`` lists them, and its webhooks are the ones the cluster's
        alert feed sends to while this node holds it.  Each node reads its own file: the
        rules the cluster raises by are those of the node owning a partition
        (docs/operations.md, "Reload": signal every node).  A webhook's CA file that
        cannot be used raises before anything changes."""
        webhooks = self.alert_feed.reconfigure(config)
        self.owner.reconfigure_alerts(config)
        return reload_summary(self.alerts.reconfigure(config), webhooks)

    @property
    def metrics(self) -> Metrics:
        return self.ingest.metrics

    def _notice(self, data: bytes) -> None:
        kind, _, rest = data.decode(errors="replace").partition(" ")
        try:
            if kind == "claim":
                generation, _, gateway = rest.partition(" ")
                self.ingest.supersede(gateway, int(generation))
            elif kind == "presence":
                self.owner.gateway_changed(rest)
            elif kind in ("dv?", "dv="):
                self.die_values.on_notice(kind, rest)
        except (ValueError, TypeError):
            log.warning("cluster notice not understood: %r", data[:100])

    def _make_state(self, partition: int, publish: Callable[[str, dict[str, Any]], None],
                    engine: AlertEngine | None, archives: Archives) -> LiveState:
        # lots and wafers leaving memory go to PostgreSQL (the owner's save_archives)
        live = self.config.live
        caps = {"max_dies_per_wafer": live.max_dies_per_wafer, "max_sensors": live.max_sensors,
                "max_tests_per_lot": live.max_tests_per_lot, **self.state_caps}
        return LiveState(publish, alerts=engine, metrics=self.metrics,
                         on_evict=archives.lot, on_wafer_archive=archives.wafer, **caps)

    async def _wake_owners(self) -> None:
        """Wake-ups sent while a Pub/Sub subscription was down are lost: when one
        reopens (the bus's generation moves) every owned partition reads at once."""
        generation = self.bus.generation
        while True:
            await self.bus.wait_changed()
            if self.bus.generation != generation:
                generation = self.bus.generation
                for p in list(self.owner.owned):
                    self.owner.wake(p, "resubscribe")

    def status(self) -> dict[str, Any]:
        return {"node_id": self.node_id, "redis": self.bus.health(),
                "postgresql": self.store.health_problem() or "ok",
                "ownership": self.owner.status(),
                "alert_feed": {"holding": self.alert_feed.holding,
                               "announced": self.alert_feed.announced}}

    def health(self) -> tuple[bool, dict[str, Any]]:
        ok, body = self._ingest_health()
        redis = self.bus.health()
        body["cluster"] = {"node_id": self.node_id, "redis": redis["redis"],
                           "epoch": redis["epoch"],
                           "partitions_owned": len(self.owner.owned)}
        if not redis["ok"]:
            # 503: a load balancer moves this node's clients to one that serves live data
            body.update(status="unavailable",
                        detail=f"cut off from Redis ({redis['reason']}): live data not "
                               "served here (cluster_unavailable)")
            return False, body
        return ok, body

    async def run(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        # The bus outlives the rest: a graceful stop releases this node's leases and takes
        # it out of the live set (the owner's and the alert feed's clean-up), which needs
        # Redis -- torn down with everything else, the leases would only expire (a TTL
        # later) and the other nodes would count this one live until its heartbeat lapsed.
        bus_scope = trio.CancelScope()

        async def run_bus(*, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                          ) -> None:
            with bus_scope:
                await self.bus.run(task_status=task_status)

        async with trio.open_nursery() as outer:
            await outer.start(run_bus)
            bus_scope.shield = True  # (once up: a stop while waiting for Redis is at once)
            try:
                await self._run_services(task_status)
            finally:
                bus_scope.cancel()

    async def _run_services(self, task_status: trio.TaskStatus[int]) -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(self.fanout.run)
            await nursery.start(self.mirror.run)
            await nursery.start(self.notifier.run)
            # the ingest opens the store (schema, partition count) before it listens
            port = await nursery.start(self.ingest.run)
            await nursery.start(self.owner.run)
            await nursery.start(self.alert_feed.run)
            await nursery.start(self.presence.run)
            await nursery.start(self.die_values.run)
            nursery.start_soon(self._wake_owners)
            log.info("cluster node %s up on port %d", self.node_id, port)
            task_status.started(port)


__all__ = ["ClusterHub", "NodeIngest", "Notifier"]
