"""Partition ownership (issue 14, docs/cluster.md "Ownership"): each partition of the live
state has one owner node at a time, which rebuilds it from PostgreSQL and publishes it.

Two layers:

* ``LeasePlanner`` -- sans-IO: given the live nodes, who holds which lease and what this
  node holds, which partitions to acquire, renew and release.  Time is passed in.  The
  rule (docs/cluster.md, "Ownership and rebuild"): each node aims at
  ``ceil(P / live nodes)`` leases; a free
  partition goes first to its *home* node (rendezvous hashing over the live nodes, so the
  assignment is stable and a restarted node gets back the same partitions), and to any
  node under its target once it stayed free for ``grace_s`` (its home is busy, dead or not
  yet seen); a node above its target releases the partitions it is not home for first
  (graceful rebalance when a node joins).  Correctness never rests on the plan: a lease
  is a Redis ``SET NX`` with a fencing token, and every checkpoint write is fenced in
  PostgreSQL by that token; the plan only spreads the load.
* ``PartitionOwner`` -- the Trio service: keeps this node's presence alive, runs the plan
  every ``ttl/3``, and for each partition it holds runs ``_own``: a fresh ``LiveState``
  restored from the partition's latest checkpoint, the partition log tailed in pseq order
  from there, a checkpoint written with the lease's fencing token every N records or T
  seconds.  Losing a lease (not renewed in time, renew refused, Redis stale, a fenced
  checkpoint write) cancels that partition's task at once and drops its state: a node that
  cannot prove it owns a partition publishes nothing for it.

What a partition's state publishes: only the topics the partition owns
(``topic_partition``): ``lot/<lot>...`` and ``test/<lot>/...`` of its lots, and
``sensor/...`` and ``gateway/<id>`` of the records keyed to a gateway (no lot id).  While a
new owner catches up from its checkpoint to the head of the log it publishes nothing (the
previous owner published those deltas already); once at the head its publisher
(``TopicPublisher``) resets every topic it owns to the rebuilt snapshot -- clients see an
announced resync of those topics, never a silent join of two owners' delta sequences --
and deltas follow as records arrive.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import math
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import trio

from edgegw import failpoints
from edgegw.hub import checkpoint as ckpt
from edgegw.hub import topics as topic_names
from edgegw.hub.alerts import AlertEngine, AlertsConfig
from edgegw.hub.live import LiveState
from edgegw.hub.store import StoreUnavailable
from edgegw.metrics import Metrics, report_internal_error

from .gateways import RATE_WINDOW_S, GatewayTopics, event_only
from .partition import PartitionFenced, partition_of

log = logging.getLogger("edgegw.hub.cluster.owner")

T = TypeVar("T")


# --------------------------------------------------------------------------- sans-IO


def home_node(partition: int, nodes: Iterable[str]) -> str | None:
    """The partition's home among ``nodes``: rendezvous (highest random weight) hashing,
    so removing a node moves only that node's partitions, and adding one takes about
    ``1/n`` of each other node's."""
    best: tuple[int, str] | None = None
    for node in nodes:
        weight = int.from_bytes(hashlib.blake2b(f"{node}\x00{partition}".encode(),
                                                digest_size=8).digest(), "big")
        if best is None or (weight, node) > best:
            best = (weight, node)
    return best[1] if best else None


def target_count(n_partitions: int, n_live: int) -> int:
    """How many partitions a node aims at: ``ceil(P / live nodes)``."""
    return math.ceil(n_partitions / max(1, n_live))


@dataclass(frozen=True)
class LeasePlan:
    acquire: list[int] = field(default_factory=list)  # free partitions to try, best first
    renew: list[int] = field(default_factory=list)  # held: extend
    release: list[int] = field(default_factory=list)  # held above target: give back


class LeasePlanner:
    """Which leases to acquire, renew, release (sans-IO; see the module docstring)."""

    def __init__(self, node_id: str, n_partitions: int, grace_s: float) -> None:
        self.node_id = node_id
        self.n_partitions = n_partitions
        self.grace_s = grace_s
        self._free_since: dict[int, float] = {}

    def plan(self, now: float, live_nodes: Iterable[str], holders: dict[int, str | None],
             mine: Iterable[int]) -> LeasePlan:
        """``holders``: partition -> node holding its lease (None or absent: free), as
        read from Redis; ``mine``: partitions this node holds (its own bookkeeping, which
        wins over ``holders`` for its own leases)."""
        nodes = set(live_nodes) | {self.node_id}
        mine = set(mine)
        target = target_count(self.n_partitions, len(nodes))
        homes = {p: home_node(p, nodes) for p in range(self.n_partitions)}
        free = [p for p in range(self.n_partitions)
                if p not in mine and holders.get(p) is None]
        for p in list(self._free_since):
            if p not in free:
                del self._free_since[p]
        for p in free:
            self._free_since.setdefault(p, now)
        release: list[int] = []
        if len(mine) > target:
            # not-home partitions first, then the highest numbers: deterministic
            extras = sorted(mine, key=lambda p: (homes[p] == self.node_id, -p))
            release = extras[:len(mine) - target]
        keep = mine - set(release)
        room = target - len(keep)
        acquire: list[int] = []
        if room > 0:
            home_free = [p for p in free if homes[p] == self.node_id]
            stale_free = [p for p in free if homes[p] != self.node_id
                          and now - self._free_since[p] >= self.grace_s]
            acquire = (home_free + stale_free)[:room]
        return LeasePlan(acquire=acquire, renew=sorted(keep), release=sorted(release))


def topic_partition(topic: str, n_partitions: int) -> int | None:
    """The partition whose owner publishes ``topic`` (None: no partition's: the node
    publishes it itself, e.g. ``alert/...`` and ``hub/state``).  A lot's topics belong to
    the lot's partition; a gateway's topic to the partition of its lot-less records
    (``gw:<id>``, the partition key of docs/cluster.md)."""
    parts = topic_names.split(topic)
    head = parts[0]
    if head in ("lot", "test") and len(parts) >= 2:
        return partition_of(parts[1], n_partitions)
    if head == "gateway" and len(parts) == 2:
        return partition_of("gw:" + parts[1], n_partitions)
    if head == "sensor":
        return -1  # whichever partition holds the channel's (lot-less) records
    return None


def owns_topic(partition: int, topic: str, n_partitions: int) -> bool:
    p = topic_partition(topic, n_partitions)
    return p == partition or p == -1


# --------------------------------------------------------------------------- Trio


class LeaseLost(Exception):
    """This node can no longer prove it owns a partition."""


class LeaseBus(Protocol):
    """What ownership needs from Redis (``edgegw.hub.cluster.bus.ClusterBus``)."""

    async def acquire(self, name: str, ttl_s: float) -> int | None: ...
    async def renew(self, name: str, token: int, ttl_s: float) -> bool: ...
    async def release(self, name: str, token: int) -> bool: ...
    def holds(self, name: str) -> int | None: ...
    async def lease_holder(self, name: str) -> tuple[str, int] | None: ...
    async def heartbeat_node(self, ttl_s: float) -> None: ...
    async def live_nodes(self) -> list[str]: ...
    async def leave(self) -> None: ...
    async def seed_fence(self, name: str, at_least: int) -> None: ...
    # batched forms (one round trip per Redis shard) and the wake-up subscription
    async def heartbeat_and_list(self, ttl_s: float) -> list[str]: ...
    async def renew_many(self, tokens: dict[str, int], ttl_s: float) -> dict[str, bool]: ...
    async def lease_holders(self, names: list[str]
                            ) -> dict[str, tuple[str, int] | None]: ...
    async def seed_fences(self, floors: dict[str, int]) -> None: ...
    async def raise_pubfences(self, name: str, token: int) -> None: ...
    async def follow_partitions(self, partitions: list[int]) -> None: ...
    def valid_until(self, name: str) -> float | None: ...
    async def wait_changed(self) -> None: ...
    async def presence(self, gateway_id: str) -> dict[str, str] | None: ...
    async def gateway_presence(self, gateway_id: str
                               ) -> tuple[dict[str, str] | None, float | None]: ...
    def clock(self) -> float: ...
    up_since: float | None
    @property
    def epoch(self) -> str | None: ...


class Publisher(Protocol):
    """Where an owned partition's topics go (``edgegw.hub.cluster.publisher.TopicPublisher``:
    batches to the topic streams; its first publication of a topic is a reset)."""

    def publish(self, topic: str, delta: dict[str, Any], ts: float | None = None) -> None: ...
    def resync_all(self) -> None: ...
    def fence(self, lease: str, token: int) -> None: ...
    async def run(self, *, task_status: trio.TaskStatus[None] = ...) -> None: ...


class PartitionLog(Protocol):
    """What ownership needs from PostgreSQL (``edgegw.hub.cluster.pgstore.ClusterStore``)."""

    async def read_partition(self, partition: int, after_pseq: int,
                             limit: int = ...) -> list[Any]: ...
    async def partition_head(self, partition: int) -> int: ...
    async def claim_partition(self, partition: int, token: int) -> bool: ...
    async def save_checkpoint(self, partition: int, pseq: int, token: int,
                              blob: bytes) -> bool: ...
    async def load_checkpoint(self, partition: int) -> tuple[int, bytes] | None: ...
    async def max_tokens(self) -> dict[int, int]: ...
    async def load_alerts(self, limit: int = ...,
                          partition: int | None = ...) -> list[dict[str, Any]]: ...
    async def save_alerts(self, partition: int, token: int,
                          alerts: list[dict[str, Any]]) -> dict[str, bool]: ...
    async def known_gateways(self) -> list[str]: ...
    async def gateway_totals(
        self, gateways: list[str]
    ) -> Mapping[str, tuple[int, int, int | None, float | None]]: ...
    async def recent_records(self, gateways: list[str],
                             since: float) -> dict[str, dict[int, int]]: ...
    async def save_partition_state(self, partition: int, token: int,
                                   data: dict[str, Any]) -> bool: ...
    async def save_archives(self, token: int, lots: list[tuple[str, dict[str, Any], int]],
                            wafers: list[tuple[str, str, dict[str, Any], int]],
                            partition: int | None = ...) -> int: ...


def restore_alert_engine(config: AlertsConfig, publish: Callable[[str, dict[str, Any]], None],
                         saved: list[dict[str, Any]], *, clock: Callable[[], float],
                         sink: Callable[[dict[str, Any]], None] | None = None,
                         metrics: Metrics | None = None) -> AlertEngine:
    """A partition owner's alert engine, holding the partition's alerts raised by any
    earlier owner (``saved``: newest first, as ``load_alerts`` gives them).  Durations --
    how long a gateway is offline, how long a P0 waits -- are measured by ``clock``, one
    every node reads alike (Redis's, ``ClusterBus.clock``): an alert or outage begun under
    an owner whose wall clock is an hour off from this one's is neither escalated (or
    raised) at once nor an hour late (docs/cluster.md, "Clocks")."""
    engine = AlertEngine(config, publish, sink=sink, metrics=metrics, elapsed=clock,
                         shared=True)
    engine.restore(reversed(saved))
    for alert in reversed(saved):
        # A gateway_offline alert raised by an earlier owner: the same outage keeps its
        # start (the alert's key), so this owner does not raise it again.  The first
        # presence check forgets it if the gateway is back.
        ctx = alert.get("context") or {}
        if alert.get("kind") == "gateway_offline" and "gateway_id" in ctx:
            engine.resume_outage(ctx["gateway_id"], ctx["offline_since"],
                                 ctx.get("offline_clock"))
    return engine


def lease_name(partition: int) -> str:
    return f"partition:{partition}"


def _epochs(bus: LeaseBus) -> Any:
    """Every Redis shard's epoch (a sharded bus), else the one epoch."""
    return getattr(bus, "epochs", None) or bus.epoch


class OwnedTopics:
    """A partition's live state as a ``StateSource`` of only the topics it owns (what its
    publisher resyncs and snapshots); its ``gateway/<id>`` topics from ``gateways``
    (cluster-wide counts and connection, gateways.py) when given."""

    def __init__(self, state: LiveState, partition: int, n_partitions: int,
                 gateways: GatewayTopics | None = None) -> None:
        self.state = state
        self.partition = partition
        self.n_partitions = n_partitions
        self.gateways = gateways

    def snapshot(self, topic: str) -> dict[str, Any] | None:
        if not owns_topic(self.partition, topic, self.n_partitions):
            return None
        if self.gateways is not None and topic.startswith("gateway/"):
            return self.gateways.snapshot(topic)
        return self.state.snapshot(topic)

    def topics(self) -> list[str]:
        out = [t for t in self.state.topics()
               if owns_topic(self.partition, t, self.n_partitions)
               and (self.gateways is None or not t.startswith("gateway/"))]
        if self.gateways is not None:
            out.extend(self.gateways.topics())
        return out


class Archives:
    """A partition state's lots and wafers that left memory (``LiveState(on_evict=...,
    on_wafer_archive=...)``), each with the log position being applied when it left
    (``at``: set before each chunk), until the owner writes them to PostgreSQL."""

    def __init__(self) -> None:
        self.at = 0
        self.lots: list[tuple[str, dict[str, Any], int]] = []
        self.wafers: list[tuple[str, str, dict[str, Any], int]] = []

    def lot(self, lot_id: str, archive: dict[str, Any]) -> None:
        self.lots.append((lot_id, archive, self.at))

    def wafer(self, lot_id: str, wafer_id: str, snapshot: dict[str, Any]) -> None:
        self.wafers.append((lot_id, wafer_id, snapshot, self.at))

    def __len__(self) -> int:
        return len(self.lots) + len(self.wafers)


@dataclass
class Owned:
    """One partition this node holds, and its running task's cancel scope."""

    partition: int
    token: int
    scope: trio.CancelScope
    state: LiveState | None = None
    pseq: int = 0
    caught_up: bool = False
    wake: trio.Event = field(default_factory=trio.Event)
    #: the highest pseq a wake-up announced (``PartitionOwner.wake``): a wake-up up to it
    #: (or up to ``pseq``, read already) is one this partition had
    woken_to: int = 0
    acquired_at: float = field(default_factory=time.monotonic)
    engine: AlertEngine | None = None
    alert_events: list[dict[str, Any]] = field(default_factory=list)
    gateways: GatewayTopics | None = None
    gateway_wake: trio.Event = field(default_factory=trio.Event)
    saved_state: dict[str, Any] | None = None  # the partition_state figures saved
    archives: Archives = field(default_factory=Archives)


#: ``(partition, publish, alert engine, archives)`` -> the partition's fresh state; it hands
#: its evicted lots and archived wafers to ``archives`` (``Archives.lot``, ``.wafer``)
MakeState = Callable[[int, Callable[[str, dict[str, Any]], None], AlertEngine | None,
                      Archives], LiveState]
MakePublisher = Callable[[OwnedTopics], Publisher]


class PartitionOwner:
    """Holds leases for a fair share of the partitions and runs their live state."""

    def __init__(self, node_id: str, n_partitions: int, bus: LeaseBus, log_store: PartitionLog,
                 make_publisher: MakePublisher, *, lease_ttl_s: float = 5.0,
                 checkpoint_records: int = 50_000, checkpoint_interval_s: float = 10.0,
                 poll_s: float = 1.0, read_limit: int = 200,
                 make_state: MakeState | None = None,
                 alerts: AlertsConfig | None = None,
                 metrics: Metrics | None = None) -> None:
        self.node_id = node_id
        self.n_partitions = n_partitions
        self.bus = bus
        self.store = log_store
        self.make_publisher = make_publisher
        self.lease_ttl_s = lease_ttl_s
        self.checkpoint_records = checkpoint_records
        self.checkpoint_interval_s = checkpoint_interval_s
        self.poll_s = poll_s
        self.read_limit = read_limit
        self.make_state = make_state or (lambda p, publish, engine, archives: LiveState(
            publish, alerts=engine, on_evict=archives.lot,
            on_wafer_archive=archives.wafer))
        self.alerts_config = alerts
        self.planner = LeasePlanner(node_id, n_partitions, grace_s=lease_ttl_s)
        self.owned: dict[int, Owned] = {}
        self.checkpoints = 0
        self._seeded: Any = None  # the bus epochs the fences were seeded in
        self.metrics = metrics or Metrics()
        m = self.metrics
        self.m_acquired = m.counter("cluster_partitions_acquired_total",
                                    "partition leases this node acquired")
        self.m_lost = m.counter("cluster_partitions_lost_total",
                                "partition leases this node lost (not released), by reason")
        self.m_owned = m.gauge("cluster_partitions_owned", "partitions this node owns now")
        self.m_wakeups = m.counter(
            "cluster_partition_wakeups_total",
            "wake-ups of partitions this node owns (read the log now, not at the next poll), "
            "by source: local (a commit on this node), redis (a commit on another node, "
            "through the partition's Pub/Sub channel; a wake-up for a pseq this node had "
            "already is not counted), resubscribe (the subscription reopened: every owned "
            "partition)")
        self.m_records = m.counter("cluster_owner_records_total",
                                   "records applied to owned partitions' live state")
        self.m_archives = m.counter(
            "cluster_archives_total", "lot and wafer archives of owned partitions, by outcome "
            "(written; kept: the stored one is from this log position or later -- a replay "
            "after an ownership move --, fuller, or from a newer owner)")
        self.m_rebuild = m.histogram("cluster_partition_rebuild_seconds",
                                     "seconds from acquiring a partition to its state at "
                                     "the head of its log")
        m.add_collector(lambda: self.m_owned.set(len(self.owned)))
        self._nursery: trio.Nursery | None = None
        self._gateways: tuple[float, list[str]] = (-1e9, [])  # (read at, known gateways)

    # -- what others read --
    def status(self) -> dict[str, Any]:
        return {"partitions": self.n_partitions, "owned": sorted(self.owned),
                "caught_up": sum(o.caught_up for o in self.owned.values()),
                "checkpoints": self.checkpoints}

    def wake(self, partition: int, source: str, pseq: int | None = None) -> None:
        """The log of ``partition`` advanced (to ``pseq`` when known; a notification from
        ``source``: ``local``, ``redis`` or ``resubscribe``): read it now rather than at
        the next poll.  A wake-up up to a pseq this partition was woken for already, or
        has read, is skipped: a commit on this node wakes its owner directly and again
        through Redis, and one wake-up reads it (pseq order is commit order, so a read
        after the first wake-up sees every row up to its pseq)."""
        owned = self.owned.get(partition)
        if owned is None:
            return
        if pseq is not None:
            if pseq <= max(owned.woken_to, owned.pseq):
                return
            owned.woken_to = pseq
        owned.wake.set()
        self.m_wakeups.inc(source=source)

    def state_for(self, partition: int) -> LiveState | None:
        """The live state of ``partition`` if this node owns it and has rebuilt it."""
        owned = self.owned.get(partition)
        return owned.state if owned is not None and owned.caught_up else None

    def gateway_changed(self, gateway: str) -> None:
        """The gateway connected or disconnected somewhere: read its presence now."""
        owned = self.owned.get(partition_of("gw:" + gateway, self.n_partitions))
        if owned is not None:
            owned.gateway_wake.set()

    def states(self) -> list[tuple[int, LiveState]]:
        """The live states of the partitions this node owns and has rebuilt."""
        return [(p, o.state) for p, o in sorted(self.owned.items())
                if o.state is not None and o.caught_up]

    # -- the service --
    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                task_status.started()
                while True:
                    try:
                        await self._round()
                    except Exception:  # Redis or PostgreSQL gone mid-round: next round
                        log.warning("ownership round failed", exc_info=True)
                    await trio.sleep(self.lease_ttl_s / 3)
        finally:
            owned = list(self.owned.values())
            self.owned.clear()
            with trio.CancelScope(shield=True), trio.move_on_after(2):
                # A graceful stop hands the partitions on at once: their leases released,
                # and this node out of the live set -- else the others count it live until
                # its heartbeat lapses (a TTL), aim at the old share and leave its
                # partitions free meanwhile.
                try:
                    for o in owned:
                        await self.bus.release(lease_name(o.partition), o.token)
                    await self.bus.leave()
                except Exception:  # Redis gone: the leases and the heartbeat expire
                    pass

    def _lose(self, owned: Owned, reason: str) -> None:
        if self.owned.get(owned.partition) is owned:
            del self.owned[owned.partition]
            self.m_lost.inc(reason=reason)
            log.warning("partition %d: ownership lost (%s); its state is dropped",
                        owned.partition, reason)
        owned.scope.cancel()
        owned.state = None

    async def _seed_fences(self) -> None:
        """Fencing tokens above every token PostgreSQL has seen: Redis may have lost its
        counters (a restart), and a token that went back would be refused by every
        checkpoint write."""
        epochs = _epochs(self.bus)
        await self.bus.seed_fences({lease_name(p): token
                                    for p, token in (await self.store.max_tokens()).items()})
        self._seeded = epochs

    async def _round(self) -> None:
        for owned in list(self.owned.values()):
            if self.bus.holds(lease_name(owned.partition)) is None:
                self._lose(owned, "expired")  # (Redis stale: every lease counts as lost)
        # One round trip each for the heartbeat and node list, the renewals, the holders
        # (per Redis shard): a round's cost does not grow with the partitions or nodes.
        nodes = await self.bus.heartbeat_and_list(self.lease_ttl_s)
        if self._seeded is None or self._seeded != _epochs(self.bus):
            await self._seed_fences()  # first round, or Redis lost its data (a new epoch)
        renewed = await self.bus.renew_many(
            {lease_name(o.partition): o.token for o in self.owned.values()}, self.lease_ttl_s)
        for owned in list(self.owned.values()):
            if not renewed.get(lease_name(owned.partition), False):
                self._lose(owned, "renew_refused")
        others = [p for p in range(self.n_partitions) if p not in self.owned]
        held = await self.bus.lease_holders([lease_name(p) for p in others])
        holders: dict[int, str | None] = {}
        for p in others:
            holder = held.get(lease_name(p))
            holders[p] = holder[0] if holder else None
        plan = self.planner.plan(trio.current_time(), nodes, holders, self.owned)
        for p in plan.release:
            released = self.owned.pop(p, None)
            if released is not None:
                released.scope.cancel()
                await self.bus.release(lease_name(p), released.token)
                log.info("partition %d released (rebalance)", p)
        acquired: list[Owned] = []
        try:
            for p in plan.acquire:
                token = await self.bus.acquire(lease_name(p), self.lease_ttl_s)
                if token is None:
                    continue  # another node was quicker: fine
                self.m_acquired.inc()
                owned = Owned(p, token, trio.CancelScope())
                self.owned[p] = owned
                acquired.append(owned)
                log.info("partition %d acquired (token %d)", p, token)
            # Wake-ups go to the owner only (each partition has its channel): subscribed
            # before the new partitions' first read, so no commit after it goes unheard.
            try:
                await self.bus.follow_partitions(sorted(self.owned))
            except Exception:  # the next round subscribes again; owners also poll
                log.debug("wake-up subscription not updated", exc_info=True)
        finally:
            # (even when the round failed half-way: a lease held is a partition run)
            assert self._nursery is not None
            for owned in acquired:
                if self.owned.get(owned.partition) is owned:
                    self._nursery.start_soon(self._own_guarded, owned)

    async def _own_guarded(self, owned: Owned) -> None:
        with owned.scope:
            try:
                await self._own(owned)
            except* LeaseLost as group:
                self._lose(owned, str(group.exceptions[0]))
            except* PartitionFenced:
                # a newer owner claimed it in PostgreSQL (this node was paused past its
                # lease, or Redis lost its counters): the fences are read again
                self._seeded = None
                self._lose(owned, "fenced")
            except* Exception:
                # a failure boundary: this partition is given up (a later round takes it
                # again, here or elsewhere); the node and its other partitions go on
                report_internal_error(self.metrics, "cluster_partition", log,
                                      "owning partition %d", owned.partition)
                self._lose(owned, "error")
                with trio.CancelScope(shield=True), trio.move_on_after(2):
                    try:
                        await self.bus.release(lease_name(owned.partition), owned.token)
                    except Exception:
                        pass  # it expires by itself

    async def _watch(self, owned: Owned) -> None:
        """Stop at once when the lease may have expired (not renewed in time, Redis
        stale): a holder must never act on a lease it cannot prove.  It sleeps until the
        lease's local deadline or any change of the bus (stale, epoch), not in a poll."""
        name = lease_name(owned.partition)
        while True:
            if self.bus.holds(name) != owned.token:
                raise LeaseLost("expired")
            until = self.bus.valid_until(name)
            with trio.move_on_at(until if until is not None else trio.current_time()):
                await self.bus.wait_changed()

    async def _until_answered(self, call: Callable[[], Awaitable[T]]) -> T:
        """``call()`` again until PostgreSQL answers: while it is down the partition keeps
        its lease and its state, and simply waits (the ingest has stopped acknowledging,
        so there is nothing new to read anyway)."""
        delay = 0.2
        while True:
            try:
                return await call()
            except StoreUnavailable:
                await trio.sleep(delay)
                delay = min(delay * 2, 2.0)

    def reconfigure_alerts(self, config: AlertsConfig) -> None:
        """The rules of ``config`` (a SIGHUP) for the partitions held now and those taken
        from now on (each partition's engine: ``AlertEngine.reconfigure``)."""
        if self.alerts_config is None:
            return  # this owner raises no alerts
        self.alerts_config = config
        for owned in self.owned.values():
            if owned.engine is not None:
                owned.engine.reconfigure(config)

    async def _alert_engine(self, p: int, publish: Callable[[str, dict[str, Any]], None]
                            ) -> tuple[AlertEngine | None, list[dict[str, Any]]]:
        """The partition's alert engine, holding the alerts already raised for it (by any
        earlier owner, from PostgreSQL): replayed records re-trip the same keys at the same
        record times, which those alerts cover, so nothing is raised twice (the single
        hub's restart rule, across owners)."""
        events: list[dict[str, Any]] = []
        if self.alerts_config is None:
            return None, events
        saved = await self._until_answered(functools.partial(
            self.store.load_alerts, self.alerts_config.keep, p))
        engine = restore_alert_engine(self.alerts_config, publish, saved,
                                      clock=self.bus.clock, sink=events.append,
                                      metrics=self.metrics)
        return engine, events

    async def _partition_gateways(self, p: int) -> list[str]:
        """The known gateways whose lot-less records (and ``gateway_offline`` rule) are
        partition ``p``'s (key ``gw:<id>``); the list is read at most every 5 s."""
        at, known = self._gateways
        if time.monotonic() - at >= 5.0:
            known = await self.store.known_gateways()
            self._gateways = (time.monotonic(), known)
        return [g for g in known if partition_of("gw:" + g, self.n_partitions) == p]

    async def _refresh_gateways(self, owned: Owned, gateways: GatewayTopics,
                                engine: AlertEngine | None) -> None:
        """The partition's gateways: their cluster-wide counts (PostgreSQL's totals: one
        query for all of them) and their presence (for ``online`` and for
        ``gateway_offline``, once cluster-wide: alertfeed.GatewayPresence keeps it)."""
        for gw in await self._partition_gateways(owned.partition):
            gateways.know(gw)
        names = gateways.names()
        fresh = gateways.unseeded()
        if fresh:
            # before their first totals: the rate goes on from the last owner's (gateways.py)
            now = time.time()
            recent = await self.store.recent_records(fresh, now - RATE_WINDOW_S)
            for gw in fresh:
                gateways.seed_rate(gw, recent.get(gw, {}), now)
        if names:
            now = time.time()
            for gw, t in (await self.store.gateway_totals(names)).items():
                gateways.totals(gw, *t, now)
        offline_rule = engine is not None and engine.watches("gateway_offline")
        for gw in names:
            present, seen = await self.bus.gateway_presence(gw)
            now = time.time()
            at = present.get("connected_at") if present else None
            gateways.presence(gw, present is not None, float(at) if at else None, now)
            if offline_rule:
                assert engine is not None
                engine.on_gateway(gw, present is not None, now,
                                  began=self._outage_began(seen))

    def _outage_began(self, seen: float | None) -> float | None:
        """When an absent gateway's outage began by the cluster clock: when it was last
        seen connected (``ClusterBus.last_seen``: an outage that began while its partition
        moved here counts from then, docs/cluster.md "Alerts"), but not before the
        cluster last came up -- with no node up it could not connect (after a full
        restart each gateway gets ``offline_s`` to come back, as on a single hub)."""
        up = self.bus.up_since
        if seen is None or up is None:
            return None
        return max(seen, up)

    async def _gateway_loop(self, owned: Owned, gateways: GatewayTopics,
                            engine: AlertEngine | None, *,
                            task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                            ) -> None:
        """Once a second (at once after a connection change anywhere): the partition's
        gateway topics and its ``hub/state`` figures.  (Polled rather than pushed by the
        committing nodes: a notice per commit would reach every node, the node count
        times the commits; this is one query per owned partition per second.)"""
        started = False
        while True:
            owned.gateway_wake = trio.Event()
            try:
                await self._refresh_gateways(owned, gateways, engine)
                await self._save_state_figures(owned)
            except LeaseLost:
                raise
            except Exception:  # PostgreSQL or Redis away: read again next second
                log.debug("partition %d: gateways not refreshed", owned.partition,
                          exc_info=True)
            gateways.tick(time.time())
            if not started:
                started = True
                task_status.started()
            with trio.move_on_after(1.0):
                await owned.gateway_wake.wait()

    async def _save_state_figures(self, owned: Owned) -> None:
        """The partition's ``hub/state`` figures (records its state could not apply) and
        its lots and wafers in memory to PostgreSQL when they changed, for the
        cluster-wide topic (alertfeed.py) and ``/api/stats`` (node.py)."""
        state = owned.state
        if state is None or not owned.caught_up:
            return
        figures = {**state.warnings(), "lots_live": len(state.lots),
                   "wafers_live": sum(len(lot.wafers) for lot in state.lots.values())}
        if figures == owned.saved_state:
            return
        if not await self.store.save_partition_state(owned.partition, owned.token, figures):
            self._seeded = None  # a newer token exists: Redis lost its counters?
            raise LeaseLost("state_fenced")
        owned.saved_state = figures

    async def _save_archives(self, owned: Owned) -> None:
        """Write the lots and wafers that left the partition's memory since the last call
        (before any checkpoint that stands for them: a checkpoint never follows an archive
        that was not written).  Written once cluster-wide: ``save_archives`` keeps an
        archive made at the same log position or later, so a new owner replaying the log
        after an ownership move writes nothing twice."""
        pending = owned.archives
        if not pending:
            return
        lots, wafers = list(pending.lots), list(pending.wafers)
        kept = await self._until_answered(functools.partial(
            self.store.save_archives, owned.token, lots, wafers, owned.partition))
        del pending.lots[:len(lots)], pending.wafers[:len(wafers)]
        self.m_archives.inc(len(lots) + len(wafers) - kept, outcome="written")
        if kept:
            self.m_archives.inc(kept, outcome="kept")

    async def _save_alerts(self, owned: Owned) -> None:
        """Write the alert events since the last call (one row per alert, fenced by this
        owner's token: a stale owner's write is refused)."""
        if not owned.alert_events:
            return
        latest = {e["alert"]["id"]: e["alert"] for e in owned.alert_events}
        owned.alert_events.clear()
        await self._until_answered(functools.partial(
            self.store.save_alerts, owned.partition, owned.token, list(latest.values())))

    async def _alert_ticks(self, owned: Owned, engine: AlertEngine) -> None:
        """Once a second: acknowledgements made on any node (PostgreSQL) reach this
        engine, then time-driven rules run -- P0 escalation, by this owner only, so an
        alert is escalated once cluster-wide."""
        while True:
            await trio.sleep(1.0)
            if not owned.caught_up:
                continue
            if engine.escalation_pending:
                rows = await self._until_answered(functools.partial(
                    self.store.load_alerts, self.alerts_config.keep if self.alerts_config
                    else 1000, owned.partition))
                for row in rows:
                    if row.get("acknowledged"):
                        engine.note_ack(row["id"], row.get("acked_by"), row.get("acked_at"))
            engine.tick(time.time())
            await self._save_alerts(owned)

    async def _own(self, owned: Owned) -> None:
        p = owned.partition
        t0 = time.monotonic()
        publisher: Publisher | None = None
        # Fence first: from this commit on PostgreSQL refuses every write of an older
        # owner -- one paused past its lease (SIGSTOP, a frozen VM, a long GC pause) may
        # wake in the middle of a write, before it can see that its lease lapsed -- and
        # what such an owner wrote before it is read below.
        if not await self._until_answered(functools.partial(
                self.store.claim_partition, p, owned.token)):
            self._seeded = None  # a newer token exists: Redis lost its counters?
            raise LeaseLost("claim_fenced")
        # ... and Redis refuses an older owner's publications on the other shards
        # (sensor/...; on the lease's shard the lease key does)
        try:
            await self.bus.raise_pubfences(lease_name(p), owned.token)
        except Exception:  # best effort: this owner's first publication there raises it
            log.debug("partition %d: publication fences not raised", p, exc_info=True)

        def publish(topic: str, delta: dict[str, Any]) -> None:
            # silent while catching up: the previous owner published those deltas; once at
            # the head, the publisher resets every topic and deltas follow
            if not owns_topic(p, topic, self.n_partitions):
                return
            if topic.startswith("gateway/"):
                # only the events: counts and connection are cluster-wide (gateways.py)
                kept = event_only(delta)
                if kept is None:
                    return
                gateways.know(topic_names.split(topic)[1])
                delta = kept
            if owned.caught_up and publisher is not None:
                publisher.publish(topic, delta)

        def publish_gateway(topic: str, delta: dict[str, Any]) -> None:
            if owned.caught_up and publisher is not None:
                publisher.publish(topic, delta)

        def events_of(gateway: str) -> Iterable[dict[str, Any]]:
            gw = owned.state.gateways.get(gateway) if owned.state is not None else None
            return gw.events if gw is not None else ()

        gateways = GatewayTopics(publish_gateway, events_of)
        owned.gateways = gateways

        engine, events = await self._alert_engine(p, publish)
        state = self.make_state(p, publish, engine, owned.archives)
        loaded = await self._until_answered(lambda: self.store.load_checkpoint(p))
        if loaded is not None:
            pseq, blob = loaded
            try:
                _, data = await trio.to_thread.run_sync(ckpt.decode, blob)
                ckpt.restore(state, data)
                owned.pseq = pseq
            except ckpt.CheckpointError as exc:
                # another format: rebuild from the whole retained log instead
                log.warning("partition %d: checkpoint unusable (%s); full rebuild", p, exc)
                engine, events = await self._alert_engine(p, publish)
                state = self.make_state(p, publish, engine, owned.archives)
        owned.state = state
        if engine is not None and self.alerts_config is not None \
                and engine.config is not self.alerts_config:
            engine.reconfigure(self.alerts_config)  # a SIGHUP came while it was made
        owned.engine, owned.alert_events = engine, events
        publisher = self.make_publisher(OwnedTopics(state, p, self.n_partitions, gateways))
        publisher.fence(lease_name(p), owned.token)
        head = await self._until_answered(lambda: self.store.partition_head(p))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._watch, owned)
            await nursery.start(publisher.run)
            await nursery.start(self._gateway_loop, owned, gateways, engine)
            if engine is not None:
                nursery.start_soon(self._alert_ticks, owned, engine)
            await self._tail(owned, state, publisher, head, t0)

    async def _tail(self, owned: Owned, state: LiveState, publisher: Publisher, head: int,
                    t0: float) -> None:
        p = owned.partition
        since_ckpt = 0
        last_ckpt = trio.current_time()
        cache = ckpt.WaferCache()
        while True:
            # a fresh event before the read: a wake-up during the read is not lost
            owned.wake = trio.Event()
            chunks = await self._until_answered(functools.partial(
                self.store.read_partition, p, owned.pseq, self.read_limit))
            for chunk in chunks:
                owned.archives.at = chunk.pseq  # (what leaves memory now, leaves here)
                state.on_records(chunk.gateway_id, chunk.first_rid, chunk.records)
                owned.pseq = chunk.pseq
                since_ckpt += len(chunk.records)
                self.m_records.inc(len(chunk.records))
            await self._save_alerts(owned)
            await self._save_archives(owned)
            if not owned.caught_up and owned.pseq >= head and len(chunks) < self.read_limit:
                owned.caught_up = True
                publisher.resync_all()
                self.m_rebuild.observe(time.monotonic() - t0)
                log.info("partition %d: rebuilt to pseq %d in %.2f s", p, owned.pseq,
                         time.monotonic() - t0)
            now = trio.current_time()
            if since_ckpt and (since_ckpt >= self.checkpoint_records
                               or now - last_ckpt >= self.checkpoint_interval_s):
                data = ckpt.capture(state, cache)
                blob = await trio.to_thread.run_sync(ckpt.encode, {"pseq": owned.pseq}, data)
                failpoints.hit("cluster.checkpoint")
                if not await self._until_answered(functools.partial(
                        self.store.save_checkpoint, p, owned.pseq, owned.token, blob)):
                    self._seeded = None  # a newer token exists: Redis lost its counters?
                    raise LeaseLost("checkpoint_fenced")
                self.checkpoints += 1
                since_ckpt = 0
                last_ckpt = now
            if len(chunks) < self.read_limit:
                with trio.move_on_after(self.poll_s):
                    await owned.wake.wait()
            else:
                # a long catch-up must not starve the other tasks
                await trio.lowlevel.checkpoint()


__all__ = ["Archives", "LeaseBus", "LeaseLost", "LeasePlan", "LeasePlanner", "OwnedTopics",
           "PartitionLog", "PartitionOwner", "Publisher", "home_node", "lease_name",
           "owns_topic", "restore_alert_engine", "target_count", "topic_partition"]
