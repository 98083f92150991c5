"""The owner's side of the topic streams: ``TopicPublisher`` takes a partition owner's
``LiveState`` deltas (its synchronous ``publish`` callback) and publishes them to the
cluster bus in batches.

Why batches: the live state publishes one delta per changed topic per applied frame -- far
more than Redis should take one command at a time.  Every ``flush_interval_s`` (default
50 ms, the fan-out's own UI tick) each dirty topic's pending deltas are composed as the
fan-out composes them (``coalesce``; alert topics, where every event matters, never) and
published as one stream entry, all topics in one pipeline.  Offsets count published
(composed) deltas, which is all a client needs: consecutive within the epoch.

Exactness rules:

* The first publication of a topic by this publisher is a *reset* (kind ``s``): the topic's
  full snapshot, not the deltas.  A new topic thus starts from a snapshot, and a new owner
  (after a node died, mid-lot) replaces whatever the previous owner left -- the mirrors do
  not have to trust that two owners' delta sequences join up.  ``resync_all`` does it for
  every topic of the state (after a takeover's rebuild, after an epoch change).
* A publication whose outcome is unknown (Redis did not answer: it may have applied it) is
  not retried as deltas -- applied twice, an ``append`` or an ``event`` would be doubled --
  but as a reset of the topic.
* A partition owner's publisher is fenced by the partition's lease (``fence``): Redis
  refuses its publications once the lease is not this node's (``PartitionFenced``, out of
  ``run``), so an owner that wakes from a pause after its lease lapsed publishes nothing
  before it notices; on another shard than the lease's (``sensor/...``) from a newer
  owner's takeover on (``ClusterBus.raise_pubfences``, ``publish_entries``).
* Every ``snapshot_interval_s`` the snapshots of topics changed since the last one are
  written with their offset (what a node that starts mirroring a topic loads), and a topic
  whose snapshot is gone (an evicted lot) is closed with an entry of kind ``x``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import cbor2
import trio

from ..fanout import coalesce
from ..fanout.core import StateSource
from .bus import BusUnavailable, ClusterBus, EpochChanged

log = logging.getLogger("edgegw.hub.cluster.publisher")


#: the default of ``TopicPublisher(intervals=...)``: seconds between publications of a
#: topic, by topic prefix (others: every flush).  A gateway's topic changes with every
#: commit of its frames (its counts): twice a second is plenty for a status panel.
DEFAULT_INTERVALS: dict[str, float] = {"test/": 0.5, "gateway/": 0.5}


class TopicPublisher:
    """Buffers a live state's deltas; ``run`` publishes them.  ``publish`` is the state's
    callback (synchronous, cheap)."""

    def __init__(
        self,
        bus: ClusterBus,
        source: StateSource | None = None,
        *,
        flush_interval_s: float = 0.05,
        snapshot_interval_s: float = 0.5,
        event_prefixes: tuple[str, ...] = ("alert/",),
        intervals: dict[str, float] | None = None,
        clock: Callable[[], float] = trio.current_time,
    ) -> None:
        self.bus = bus
        self.source = source
        self.flush_interval_s = flush_interval_s
        self.snapshot_interval_s = snapshot_interval_s
        self.event_prefixes = event_prefixes
        # Topics published less often than every flush, by prefix: a lot's test statistics
        # are most of its topics (one per test) and each changes with every part, yet no
        # one reads a histogram 20 times a second.  Their deltas wait (composed) until due.
        self.intervals = dict(DEFAULT_INTERVALS if intervals is None else intervals)
        self._interval_prefixes = tuple(self.intervals)
        self._due: dict[str, float] = {}  # topic -> earliest next publication
        self._clock = clock
        self._pending: dict[str, list[dict[str, Any]]] = {}
        self._ts: dict[str, tuple[float, float]] = {}
        self._known: set[str] = set()  # topics published (reset) by us in this epoch
        self._reset: set[str] = set()  # topics to publish as a reset next flush
        self._snap_dirty: set[str] = set()
        self._epochs: tuple[str | None, ...] | None = None  # the bus's, by shard
        self._last_snapshot = 0.0
        self._wake = trio.Event()  # set by a publication while ``run`` sleeps idle
        self._lease: tuple[str, int] | None = None  # (name, token): see ``fence``
        self.published = 0  # entries
        self.heads: dict[str, int] = {}

    def attach(self, source: StateSource) -> None:
        self.source = source

    def fence(self, lease: str, token: int) -> None:
        """Publish only while this node holds ``lease`` with ``token``: checked by Redis in
        each publication (on another shard than the lease's: no newer token published
        there)."""
        self._lease = (lease, token)

    def publish(self, topic: str, delta: dict[str, Any], ts: float | None = None) -> None:
        """The live state's publish callback."""
        pending = self._pending.get(topic)
        if pending is None:
            pending = self._pending[topic] = []
            self._wake.set()
        pending.append(delta)
        if ts is not None:
            low, high = self._ts.get(topic, (ts, ts))
            self._ts[topic] = (min(low, ts), max(high, ts))

    def resync_all(self) -> None:
        """Publish every topic of the state as a reset at the next flush."""
        if self.source is not None:
            self._reset.update(self.source.topics())
            self._wake.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
                  ) -> None:
        task_status.started()
        while True:
            await trio.sleep(self.flush_interval_s)
            await self.flush()
            if not (self._pending or self._reset or self._snap_dirty):
                # Nothing held back and no snapshot owed: sleep until the state publishes
                # or the bus changes (an epoch: every topic is reset), rather than wake 20
                # times a second per owned partition for nothing.
                await self._until_work()

    async def _until_work(self) -> None:
        self._wake = trio.Event()
        if self._pending or self._reset:
            return
        async with trio.open_nursery() as nursery:
            async def first(wait: Callable[[], Any]) -> None:
                await wait()
                nursery.cancel_scope.cancel()
            nursery.start_soon(first, self._wake.wait)
            nursery.start_soon(first, self.bus.wait_changed)

    async def flush(self) -> int:
        """Publish what is pending; returns the number of entries published."""
        epochs = self.bus.epochs
        if epochs != self._epochs:
            # A new epoch (Redis lost its data, or our first flush): nothing of ours is
            # there: every topic starts again with a reset -- only the topics of the
            # shard that changed, when the bus has several (docs/cluster.md, "Shards").
            changed = {i for i, e in enumerate(epochs)
                       if self._epochs is None or self._epochs[i] != e}
            self._epochs = epochs
            if len(epochs) == 1:
                self._known.clear()
                self.resync_all()
            else:
                shard_of = self.bus.shard_of_topic
                self._known = {t for t in self._known if shard_of(t) not in changed}
                if self.source is not None:
                    self._reset.update(t for t in self.source.topics()
                                       if shard_of(t) in changed)
        now = self._clock()
        snapshots_due = now - self._last_snapshot >= self.snapshot_interval_s
        if not self._pending and not self._reset and not snapshots_due:
            return 0
        if self._due and len(self._due) > 4 * len(self._known) + 1024:
            self._due = {t: d for t, d in self._due.items() if t in self._known}
        if self.bus.stale or None in epochs:
            return 0  # kept (composed at the next try); the owner drops us if it lasts
        entries: list[tuple[str, int, str, bytes, bytes | None]] = []
        pending, ts = self._pending, self._ts
        self._pending, self._ts = {}, {}
        if self._interval_prefixes:
            due = self._due
            for topic in [t for t in pending if t.startswith(self._interval_prefixes)]:
                if now < due.get(topic, 0.0) and topic not in self._reset:
                    held = pending.pop(topic)  # not yet: kept, composed
                    self._pending[topic] = (held if topic.startswith(self.event_prefixes)
                                            else coalesce(held))
                    if topic in ts:
                        self._ts[topic] = ts.pop(topic)
                    continue
                prefix = next(p for p in self._interval_prefixes if topic.startswith(p))
                due[topic] = now + self.intervals[prefix]
        topics = list(dict.fromkeys([*pending, *self._reset]))
        resets, self._reset = self._reset, set()
        source = self.source
        for topic in topics:
            if topic in resets or topic not in self._known:
                data = source.snapshot(topic) if source is not None else None
                if data is None:
                    if topic in self._known:
                        entries.append((topic, 1, "x", b"", None))
                        self._known.discard(topic)
                    continue
                encoded = cbor2.dumps(data)
                entries.append((topic, 1, "s", encoded, encoded))
                self._known.add(topic)
                continue
            deltas = pending[topic]
            if not topic.startswith(self.event_prefixes):
                deltas = coalesce(deltas)
            low, high = ts.get(topic, (None, None))
            entries.append((topic, len(deltas), "d", cbor2.dumps([deltas, low, high]), None))
            self._snap_dirty.add(topic)
        if snapshots_due:
            self._last_snapshot = now
            if source is not None:
                # Topics that left the state without a last delta (an evicted lot's tests)
                alive = set(source.topics())
                for topic in self._known - alive - self._snap_dirty:
                    entries.append((topic, 1, "x", b"", None))
                    self._known.discard(topic)
            owed = [t for t in self._snap_dirty if t in self._pending]
            for topic in self._snap_dirty:
                if topic in self._pending:
                    continue  # it has deltas not published yet: its snapshot would be ahead
                data = source.snapshot(topic) if source is not None else None
                if data is None:
                    entries.append((topic, 1, "x", b"", None))
                    self._known.discard(topic)
                else:
                    # In the pipeline after this batch's deltas of the topic, so the script
                    # writes it at exactly their head (the state has nothing newer).
                    entries.append((topic, 0, "d", b"", cbor2.dumps(data)))
            self._snap_dirty = set(owed)
        if not entries:
            return 0
        if len(epochs) == 1:
            groups = {0: entries}
        else:  # one pipeline per shard, each in its own epoch
            groups = {}
            for entry in entries:
                groups.setdefault(self.bus.shard_of_topic(entry[0]), []).append(entry)
        published = 0
        for shard, group in groups.items():
            if await self._publish(shard, epochs[shard], group):
                published += len(group)
        self.published += published
        return published

    async def _publish(self, shard: int, epoch: str | None,
                       entries: list[tuple[str, int, str, bytes, bytes | None]]) -> bool:
        assert epoch is not None
        try:
            heads = await self.bus.publish_entries(epoch, entries, shard, self._lease)
        except EpochChanged:
            await self.bus.check(shard)  # the next flush starts the new epoch
            return False
        except BusUnavailable as exc:
            # Unknown outcome: whatever was in the batch is published again as resets.
            log.warning("cluster: publishing %d entries failed (%s): those topics will be "
                        "reset", len(entries), exc)
            for topic, _n, kind, _p, _s in entries:
                if kind == "x":  # closed again next time
                    self._known.add(topic)
                    self._snap_dirty.add(topic)
                else:
                    self._reset.add(topic)
            return False
        for (topic, _n, _kind, _p, _s), head in zip(entries, heads, strict=True):
            self.heads[topic] = head
        return True
