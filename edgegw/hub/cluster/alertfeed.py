"""Alerts in a cluster, what is not per partition (docs/cluster.md, "Alerts"):

* ``AlertFeed`` -- the **one publisher of every ``alert/<priority>/<rule>`` topic** and the
  one sender of webhooks, cluster-wide: whichever node holds the ``alerts`` lease.  Alerts
  are raised (and escalated) by partition owners and acknowledged on any node, but all of
  that lands in one PostgreSQL table (``edgegw_alerts``, one row per alert); every change
  marks its row ``pending``.  The feed reads the pending rows, announces each event the row
  has and its ``fed`` column has not (``r`` raised, ``e`` escalated, ``a`` acknowledged) on
  the alert topic and to the webhooks, then records them in ``fed``.  So a topic fed by
  many partitions still has a single publisher (its offsets come from one place), an
  acknowledgement on any node is seen live on every node, and each event is announced
  once: across a feed failover at most the events of one poll are announced again (the new
  holder finds them not yet ``fed``); none is lost.  Webhooks are delivered at least once
  across a failover: each (webhook, event) is written to the outbox table before it is
  sent and marked when finished with; a new holder sends again what is not marked
  (``edgegw.hub.alerts.outbox``).
* ``AlertView`` -- the feed's sans-IO memory of recent alerts per topic: the snapshots
  (newest first, 50 per topic, as ``AlertEngine.snapshot``) and the events.
* ``ClusterWarnings`` -- the cluster-wide ``hub/state`` topic, published by the same feed:
  every partition's owner saves its state's figures of records not applied
  (``LiveState.warnings``) in PostgreSQL when they change (fenced by its lease token); the
  feed merges them (counts added, each reason's last record the latest) into the single
  hub's shape.
* ``GatewayPresence`` -- every node keeps ``{prefix}:presence:<gateway>`` alive (TTL) for
  the gateways connected to it (written at HELLO, removed when the connection ends, each
  guarded by the connection's generation), which the owner of a gateway's ``gw:<id>``
  partition reads for the ``gateway_offline`` rule and the ``gateway/<id>`` topic
  (owner.py, gateways.py).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

import trio

from edgegw.hub import topics as topic_names
from edgegw.hub.alerts import AlertsConfig
from edgegw.hub.alerts.outbox import WebhookOutbox, outbox_rows
from edgegw.hub.alerts.webhooks import WebhookSender, event_key, webhook_contexts
from edgegw.hub.store import StoreUnavailable
from edgegw.metrics import Metrics, report_internal_error

from .partition import PartitionFenced

log = logging.getLogger("edgegw.hub.cluster.alerts")

#: alerts kept per alert topic for its snapshot (as the single hub's engine)
PER_TOPIC = 50
#: the lease of the feed
LEASE = "alerts"


def wanted_events(alert: dict[str, Any]) -> str:
    """The events an alert in this state has had: ``r`` always, ``e`` once escalated,
    ``a`` once acknowledged (in the order the single hub emits them)."""
    return ("r" + ("e" if alert.get("escalated") else "")
            + ("a" if alert.get("acknowledged") else ""))


_EVENT = {"r": "raised", "e": "escalated", "a": "acknowledged"}


class AlertView:
    """Recent alerts by topic (sans-IO): ``snapshot``/``topics`` make it the feed's
    ``StateSource``; ``update`` takes a row's current state and returns the events it has
    not announced yet."""

    def __init__(self, per_topic: int = PER_TOPIC) -> None:
        self.per_topic = per_topic
        self._by_topic: dict[str, deque[str]] = {}
        self._alerts: dict[str, dict[str, Any]] = {}

    def remember(self, alert: dict[str, Any]) -> str:
        """Keep ``alert`` (its latest state); returns its topic."""
        topic = topic_names.alert(alert["priority"], alert["rule"])
        ids = self._by_topic.get(topic)
        if ids is None:
            ids = self._by_topic[topic] = deque()
        if alert["id"] not in self._alerts:
            ids.append(alert["id"])
            while len(ids) > self.per_topic:
                self._alerts.pop(ids.popleft(), None)
        self._alerts[alert["id"]] = alert
        return topic

    def update(self, alert: dict[str, Any], fed: str, now: float
               ) -> tuple[str, list[dict[str, Any]], str]:
        """``(topic, events, fed)``: the events of ``alert`` not in ``fed`` (each the
        single hub's ``{"event", "ts", "alert"}``) and the new ``fed``."""
        topic = self.remember(alert)
        want = wanted_events(alert)
        events = [{"event": _EVENT[e], "ts": now, "alert": alert}
                  for e in want if e not in fed]
        return topic, events, "".join(sorted(set(fed) | set(want), key="rea".index))

    def snapshot(self, topic: str) -> dict[str, Any] | None:
        ids = self._by_topic.get(topic)
        parts = topic_names.split(topic)
        if not ids or len(parts) != 3:
            return None
        return {"priority": parts[1], "rule": parts[2],
                "alerts": [self._alerts[i] for i in reversed(ids)]}

    def topics(self) -> list[str]:
        return [t for t, ids in self._by_topic.items() if ids]


def merge_warnings(parts: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Partitions' ``hub/state`` figures as one (the single hub's shape): totals and
    counts added, each reason's ``last``/``last_at`` from the partition that saw it last."""
    total = 0
    reasons: dict[str, dict[str, Any]] = {}
    for part in parts:
        total += int(part.get("not_applied", 0))
        for reason, entry in (part.get("reasons") or {}).items():
            held = reasons.get(reason)
            if held is None:
                reasons[reason] = dict(entry)
                continue
            newer = (entry.get("last_at") or 0.0) > (held.get("last_at") or 0.0)
            held["count"] = held.get("count", 0) + entry.get("count", 0)
            if newer:
                held["last"], held["last_at"] = entry.get("last"), entry.get("last_at")
    return {"not_applied": total, "reasons": dict(sorted(reasons.items()))}


class ClusterWarnings:
    """The cluster-wide ``hub/state`` (sans-IO): ``update`` takes every partition's saved
    figures and says whether the merged topic changed."""

    def __init__(self) -> None:
        self._snap: dict[str, Any] = merge_warnings(())

    def update(self, per_partition: dict[int, dict[str, Any]]) -> bool:
        merged = merge_warnings(per_partition[p] for p in sorted(per_partition))
        changed = merged != self._snap
        self._snap = merged
        return changed

    def snapshot(self) -> dict[str, Any]:
        return {"not_applied": self._snap["not_applied"],
                "reasons": {r: dict(v) for r, v in self._snap["reasons"].items()}}


class FeedTopics:
    """What the feed publishes, as its publisher's ``StateSource``: the alert topics and
    ``hub/state``."""

    def __init__(self, alerts: AlertView, warnings: ClusterWarnings) -> None:
        self.alerts = alerts
        self.warnings = warnings

    def snapshot(self, topic: str) -> dict[str, Any] | None:
        if topic == topic_names.HUB_STATE:
            return self.warnings.snapshot()
        return self.alerts.snapshot(topic)

    def topics(self) -> list[str]:
        return [*self.alerts.topics(), topic_names.HUB_STATE]


class AlertFeed:
    """Holds the ``alerts`` lease when it can; while it does, publishes the alert topics
    and sends the webhooks from the pending rows (module docstring)."""

    def __init__(self, bus: Any, store: Any, config: AlertsConfig,
                 make_publisher: Callable[[FeedTopics], Any], *, lease_ttl_s: float = 5.0,
                 poll_s: float = 0.25, state_poll_s: float = 1.0,
                 metrics: Metrics | None = None) -> None:
        self.bus = bus
        self.store = store
        self.config = config
        self.make_publisher = make_publisher
        self.lease_ttl_s = lease_ttl_s
        self.poll_s = poll_s
        self.state_poll_s = state_poll_s
        self.metrics = metrics or Metrics()
        self.holding = False
        self._webhooks: WebhookSender | None = None  # while holding the lease
        self.announced = 0
        self.m_events = self.metrics.counter(
            "cluster_alert_events_announced_total",
            "alert events this node announced as the cluster's alert feed, by event")

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        task_status.started()
        while True:
            token = None
            try:
                if not self.bus.clock_known:
                    # Redis's clock before anything is queued: the outbox's ages (below)
                    await self.bus.live_nodes()
                token = await self.bus.acquire(LEASE, self.lease_ttl_s)
            except Exception:  # Redis away: try again later
                log.debug("alert feed: lease not taken", exc_info=True)
            if token is not None:
                try:
                    await self._hold(token)
                except* PartitionFenced:  # Redis refused a publication: not our lease
                    log.warning("alert feed: lease lost (a publication was refused)")
                except* Exception:  # a failure boundary: give the feed up, try again
                    report_internal_error(self.metrics, "cluster_alert_feed", log,
                                          "the cluster's alert feed")
                finally:
                    self.holding = False
                    self._webhooks = None
                    with trio.CancelScope(shield=True), trio.move_on_after(2):
                        try:
                            await self.bus.release(LEASE, token)
                        except Exception:
                            pass  # it expires by itself
            await trio.sleep(self.lease_ttl_s / 3)

    async def _hold(self, token: int) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._keep, token, nursery.cancel_scope)
            view = AlertView()
            # the recent alerts, for the topics' snapshots (oldest first)
            while True:
                try:
                    recent = await self.store.load_alerts(self.config.keep)
                    break
                except StoreUnavailable:  # PostgreSQL away: wait for it, lease kept
                    await trio.sleep(self.poll_s * 4)
            for alert in reversed(recent):
                view.remember(alert)
            warnings = ClusterWarnings()
            try:
                warnings.update(await self.store.partition_states())
            except StoreUnavailable:
                pass  # read again at the next poll
            publisher = self.make_publisher(FeedTopics(view, warnings))
            publisher.fence(LEASE, token)  # a holder paused past its lease publishes nothing
            def lease_valid_until() -> float | None:
                # a holder paused past its lease sends no webhook either, not even a retry
                return self.bus.valid_until(LEASE) if self.bus.holds(LEASE) == token \
                    else None

            # ``queued_at`` and its age (``max_age_s``) by the cluster clock, not by the
            # wall clocks of whichever nodes queued and resend a row
            outbox = WebhookOutbox(self.store, metrics=self.metrics, clock=self.bus.clock)
            webhooks = WebhookSender(self.config.webhooks, metrics=self.metrics,
                                     fence=lease_valid_until, on_outcome=outbox.record)
            self._webhooks = webhooks  # a SIGHUP from now on changes its webhooks
            # what the previous holder did not finish is sent first (at least once)
            while True:
                try:
                    await outbox.resend(webhooks)
                    break
                except StoreUnavailable:
                    await trio.sleep(self.poll_s * 4)
            nursery.start_soon(self._flush_at_end, outbox)
            await nursery.start(webhooks.run)
            await nursery.start(publisher.run)
            publisher.resync_all()  # this holder's topics start from its snapshots
            self.holding = True
            log.info("alert feed: this node announces the cluster's alerts (token %d)", token)
            # events announced whose ``fed`` is not written yet (PostgreSQL failed the
            # write): never announced twice by this holder
            unmarked: dict[str, str] = {}
            states_read = trio.current_time()
            while True:
                try:
                    await self._poll(view, publisher, webhooks, unmarked)
                    if trio.current_time() - states_read >= self.state_poll_s:
                        states_read = trio.current_time()
                        if warnings.update(await self.store.partition_states()):
                            # the whole figure, as a single hub's hub/state delta
                            publisher.publish(topic_names.HUB_STATE, warnings.snapshot())
                except StoreUnavailable:  # PostgreSQL away: the rows stay pending
                    log.debug("alert feed: PostgreSQL unavailable", exc_info=True)
                await trio.sleep(self.poll_s)

    def reconfigure(self, config: AlertsConfig) -> str | None:
        """A SIGHUP's ``[alerts]``: the webhooks this node sends to while it holds the
        lease (at once when it does) -- a line for the log, None when they are unchanged.
        A CA file that cannot be used raises before anything changes."""
        line = None
        if config.webhooks != self.config.webhooks:
            webhooks = self._webhooks
            if webhooks is not None:
                line = webhooks.use(config.webhooks)
            else:
                webhook_contexts(config.webhooks)  # usable when this node takes the lease
                line = "taken (sent from when this node holds the alerts lease)"
        self.config = config
        return line

    async def _flush_at_end(self, outbox: WebhookOutbox) -> None:
        """The outcomes' writer; the ones left when the feed ends are written then (else
        the next holder sends those events again)."""
        try:
            await outbox.run()
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(2):
                try:
                    await outbox.flush()
                except Exception:
                    log.debug("webhook outcomes not written", exc_info=True)

    async def _keep(self, token: int, scope: trio.CancelScope) -> None:
        """Renew the lease; stop at once when it cannot be proved (never announce
        without it: another node may hold it)."""
        last = trio.current_time()
        while True:
            if self.bus.holds(LEASE) != token:
                log.warning("alert feed: lease lost")
                scope.cancel()
                return
            if trio.current_time() - last >= self.lease_ttl_s / 3:
                last = trio.current_time()
                try:
                    ok = await self.bus.renew(LEASE, token, self.lease_ttl_s)
                except Exception:
                    ok = self.bus.holds(LEASE) == token  # checked again next turn
                if not ok:
                    log.warning("alert feed: lease renew refused")
                    scope.cancel()
                    return
            await trio.sleep(0.05)

    async def _poll(self, view: AlertView, publisher: Any, webhooks: WebhookSender,
                    unmarked: dict[str, str]) -> None:
        rows = await self.store.pending_alerts()
        if not rows:
            return
        now = time.time()
        done: list[tuple[str, str, float]] = []
        announce = []
        for alert, fed, updated in rows:
            fed += unmarked.get(alert["id"], "")
            topic, events, new_fed = view.update(alert, fed, now)
            announce.append((alert["id"], topic, events, new_fed))
            done.append((alert["id"], new_fed, updated))
        # the outbox rows first: nothing is announced that a new holder could not resend
        # (StoreUnavailable here: nothing announced, the rows stay pending)
        out = outbox_rows(webhooks, (e for _, _, events, _ in announce for e in events),
                          self.bus.clock())
        queued = await self.store.queue_webhooks(out) if out else set()
        for alert_id, topic, events, new_fed in announce:
            unmarked[alert_id] = new_fed
            for event in events:
                publisher.publish(topic, event)
                key = event_key(event)
                # a row there already: sent (re-announced after a failover) or resent
                webhooks.submit(event, {url for url, k in queued if k == key})
                self.m_events.inc(event=event["event"])
                self.announced += 1
        # kept in ``unmarked`` until written (a row changed meanwhile is read again, its
        # stored ``fed`` still without what this poll announced)
        for alert_id in await self.store.mark_fed(done):
            unmarked.pop(alert_id, None)


class GatewayPresence:
    """Keeps ``{prefix}:presence:<gateway>`` for the gateways connected to this node:
    written at once when a connection is welcomed (``up``) and removed at once when it ends
    (``down``), each followed by a ``presence <gateway>`` notice (the owner of the
    gateway's partition reads it then); refreshed every ``ttl_s / 3`` (a node that died
    lets it lapse within ``ttl_s``).  Writes and removals carry the connection's
    generation: an older connection never overwrites or removes a newer one's presence
    (``ClusterBus.claim_presence``/``drop_presence``).  ``connected()``: gateway ->
    (generation, connected at) of this node's connections."""

    def __init__(self, bus: Any, connected: Callable[[], dict[str, tuple[int, float]]], *,
                 ttl_s: float = 5.0) -> None:
        self.bus = bus
        self.connected = connected
        self.ttl_s = ttl_s
        self._changes: list[tuple[str, int, float | None]] = []
        self._wake = trio.Event()

    def up(self, gateway: str, generation: int, connected_at: float) -> None:
        self._changes.append((gateway, generation, connected_at))
        self._wake.set()

    def down(self, gateway: str, generation: int) -> None:
        self._changes.append((gateway, generation, None))
        self._wake.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        task_status.started()
        refresh_at = trio.current_time()
        while True:
            with trio.move_on_at(refresh_at):
                await self._wake.wait()
            self._wake = trio.Event()
            changes, self._changes = self._changes, []
            try:
                for gateway, generation, at in changes:
                    if at is None:
                        await self.bus.drop_presence(gateway, generation)
                    else:
                        await self.bus.claim_presence(gateway, generation, self.ttl_s,
                                                      connected_at=repr(at))
                    await self.bus.notify("notice", f"presence {gateway}".encode())
                if trio.current_time() >= refresh_at:
                    refresh_at = trio.current_time() + self.ttl_s / 3
                    await self.bus.claim_presences(
                        {gateway: (generation, {"connected_at": repr(at)})
                         for gateway, (generation, at) in self.connected().items()},
                        self.ttl_s)
            except Exception:  # Redis away: presence lapses; owners see it (stale bus)
                log.debug("gateway presence not refreshed", exc_info=True)
                refresh_at = max(refresh_at, trio.current_time() + self.ttl_s / 3)


__all__ = ["AlertFeed", "AlertView", "ClusterWarnings", "FeedTopics", "GatewayPresence",
           "merge_warnings", "wanted_events"]
