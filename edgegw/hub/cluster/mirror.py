"""The node side of the topic streams: every hub node mirrors from Redis the live topics
its own ``/ws/live`` clients follow (docs/cluster.md, "Mirroring") and serves them with the
cluster's epoch and offsets -- the same offsets on every node, so a client may resume
anywhere.  It knows every other topic by name and head only (the catalogue), enough to
match subscription patterns; ``read_views`` reads any topic for ``/api``.

* ``MirrorState`` (sans-IO) is the fan-out's ``StateSource``: each topic's view, rebuilt
  from a snapshot and the deltas after it with the merge rules the live protocol sends
  every client (``edgegw.hub.topics.MERGE_RULES``, docs/live-topics.md): what a dashboard
  holds, held by the node.
* ``Mirror`` (Trio) follows the bus: stream entries arrive by Pub/Sub with their offsets;
  an entry that does not follow the topic's offset is a gap, filled from the topic's
  stream (``XRANGE`` after the offset) or, when the stream no longer has it, by loading
  the snapshot again.  After every (re)connection it reconciles all topics against the
  heads in Redis.  It feeds the node's ``LiveFanout`` through three calls: ``publish``
  (one delta, one offset: the local channel's offset stays the stream's),
  ``reset_channel`` (a topic loaded or reset) and ``set_epoch`` (Redis lost its data).
* While the bus is stale (cut off from Redis) the mirror stops and the fan-out is marked
  unavailable: clients are told ``cluster_unavailable`` rather than shown a frozen view as
  if it were live; on reconnection the mirror catches up first, so clients that stayed get
  exactly the deltas they missed (or a resync when the epoch changed).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Sequence
from typing import Any

import cbor2
import trio

from ...metrics import Metrics, report_internal_error
from ...topicfilter import matches as topic_matches
from .. import topics as topic_names
from ..fanout import LiveFanout
from .bus import BusUnavailable, ClusterBus, StreamEntry, parse_live_message

log = logging.getLogger("edgegw.hub.cluster.mirror")

#: resync reasons this module adds to the live protocol's (docs/live-protocol.md)
RESYNC_STATE_RESET = "state_reset"  # the topic's owner published its state afresh
UNAVAILABLE = "cluster_unavailable"

_LOAD_BATCH = 100  # topics per pipeline when loading


class MirrorState:
    """Topic views rebuilt from snapshots and deltas (the fan-out's ``StateSource``)."""

    def __init__(self, merge_rules: Sequence[dict[str, Any]] = topic_names.MERGE_RULES) -> None:
        self.merge_rules = [dict(rule) for rule in merge_rules]
        self.views: dict[str, dict[str, Any]] = {}
        self._rules: dict[str, dict[str, dict[str, Any]]] = {}  # topic -> key -> rule

    # StateSource
    def snapshot(self, topic: str) -> dict[str, Any] | None:
        view = self.views.get(topic)
        if view is None:
            return None
        rules = self._rules_for(topic)
        out = dict(view)
        for rule in rules.values():
            if rule["op"] == "upsert":
                rows = view.get(rule["into"])
                if isinstance(rows, dict):
                    values = list(rows.values())
                    if rule.get("order") == "newest_first":
                        values.reverse()
                    out[rule["into"]] = values
        return out

    def topics(self) -> list[str]:
        return list(self.views)

    # changes
    def load(self, topic: str, data: dict[str, Any]) -> None:
        view = dict(data)
        for rule in self._rules_for(topic).values():
            if rule["op"] == "upsert":
                rows = view.get(rule["into"]) or []
                if rule.get("order") == "newest_first":
                    rows = list(reversed(rows))
                view[rule["into"]] = {self._identity(row, rule["by"]): row for row in rows}
        self.views[topic] = view

    def apply(self, topic: str, delta: dict[str, Any]) -> None:
        view = self.views.get(topic)
        if view is None:
            view = {}
            self.load(topic, view)
            view = self.views[topic]
        rules = self._rules_for(topic)
        for key, value in delta.items():
            rule = rules.get(key)
            if rule is None:
                view[key] = value
                continue
            into = rule["into"]
            op = rule["op"]
            if op == "upsert":
                rows = view.get(into)
                if not isinstance(rows, dict):
                    rows = view[into] = {}
                by = rule["by"]
                for row in value if isinstance(value, list) else [value]:
                    rows[self._identity(row, by)] = row
            elif op == "append":
                longer = [*(view.get(into) or []), *value]
                keep = rule.get("keep")
                view[into] = longer[-keep:] if keep and len(longer) > keep else longer
            elif op == "prepend":
                shorter = [value, *(view.get(into) or [])]
                keep = rule.get("keep")
                view[into] = shorter[:keep] if keep else shorter
            else:
                view[key] = value

    def drop(self, topic: str) -> None:
        self.views.pop(topic, None)
        self._rules.pop(topic, None)

    def clear(self) -> None:
        self.views.clear()
        self._rules.clear()

    def _rules_for(self, topic: str) -> dict[str, dict[str, Any]]:
        rules = self._rules.get(topic)
        if rules is None:
            rules = self._rules[topic] = {
                rule["key"]: rule for rule in self.merge_rules
                if topic_matches(rule["topics"], topic)}
        return rules

    @staticmethod
    def _identity(row: Any, by: Any) -> Any:
        if isinstance(by, list):
            return tuple(row[i] for i in by)
        return row.get(by) if isinstance(row, dict) else row


def decode_deltas(entry: StreamEntry) -> tuple[list[dict[str, Any]], float | None, float | None]:
    deltas, low, high = cbor2.loads(entry.payload)
    return deltas, low, high


class _Want:
    """A request to the mirror's task: start mirroring the topics ``patterns`` match."""

    def __init__(self, patterns: Sequence[str]) -> None:
        self.patterns = list(patterns)
        self.done = trio.Event()


class Mirror:
    """Follows the cluster's topics into ``fanout`` (whose ``source`` it becomes).

    ``interest``: the topic patterns this node's clients follow now (``LiveFanout``'s);
    only the topics they match are mirrored (subscribed in Redis, loaded, kept), the others
    only known by name and head (the catalogue).  None: every topic (a test's mirror)."""

    def __init__(self, bus: ClusterBus, fanout: LiveFanout, *, queue_size: int = 100_000,
                 reconcile_interval_s: float = 10.0, metrics: Metrics | None = None,
                 interest: Callable[[], Collection[str]] | None = None) -> None:
        self.bus = bus
        self.interest = interest
        self.catalogue: dict[str, int] = {}  # every topic of the cluster -> head (as last read)
        if interest is not None:
            fanout.prepare_subscribe = self.want
        # A gap shows when a topic's next entry arrives; a topic whose last entries were
        # lost and that then stays quiet (a closed wafer) is caught by this periodic check
        # of every head (one SMEMBERS + HMGET).  Redis drops Pub/Sub messages only with
        # the connection, which triggers a reconcile at once: this is the backstop.
        self.reconcile_interval_s = reconcile_interval_s
        self.fanout = fanout
        self.core = fanout.core
        self.state = MirrorState(self.core.merge_rules)
        fanout.attach(self.state)
        self.epochs: dict[int, str] = {}  # Redis shard -> the epoch its topics are at here
        if len(bus.shards) > 1:
            # each topic carries its shard's epoch: a restart of one shard resyncs only
            # that shard's topics (docs/cluster.md, "Shards")
            self.core.epoch_of = self._epoch_of
        self.offsets: dict[str, int] = {}  # topic -> offset mirrored (gone topics too)
        self._send, self._receive = trio.open_memory_channel[Any](queue_size)
        self._overflow = False
        self.synced = trio.Event()  # set once the first reconcile is done
        self.entries_applied = 0
        self.gaps_filled = 0
        self.reloads = 0
        metrics = metrics or self.core.metrics
        self._m_entries = metrics.counter("cluster_mirror_entries_total",
                                          "topic stream entries applied by this node's mirror")
        self._m_gaps = metrics.counter("cluster_mirror_gaps_total",
                                       "gaps the mirror filled, by how (stream, snapshot)")
        self._g_topics = metrics.gauge("cluster_mirror_topics", "topics this node mirrors")
        metrics.add_collector(lambda: self._g_topics.set(len(self.state.views)))

    # ------------------------------------------------------------------ bus side

    def _on_message(self, data: bytes) -> None:
        try:
            self._send.send_nowait(data)
        except trio.WouldBlock:
            # Far behind: drop, and reconcile everything once the queue is drained.
            self._overflow = True

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
                  ) -> None:
        bus = self.bus
        bus.on("live", self._on_message)
        bus.on("catalogue", self._on_catalogue)
        started = False
        try:
            while True:
                if bus.stale:
                    self.fanout.set_unavailable(
                        UNAVAILABLE, f"this hub node lost Redis ({bus.stale_reason}): "
                        "live data paused; reconnect elsewhere or wait")
                    while bus.stale:
                        await bus.wait_changed()
                generation = bus.generation
                try:
                    await self.reconcile()
                except BusUnavailable as exc:
                    log.warning("cluster mirror: reconcile failed (%s); retrying", exc)
                    await trio.sleep(bus.check_interval_s)
                    continue
                self.fanout.set_unavailable(None)
                self.synced.set()
                if not started:
                    task_status.started()
                    started = True
                with trio.CancelScope() as scope:
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(self._watch, generation, scope)
                        await self._follow()
        finally:
            bus.off("live", self._on_message)
            bus.off("catalogue", self._on_catalogue)

    async def _watch(self, generation: int, scope: trio.CancelScope) -> None:
        while not self.bus.stale and self.bus.generation == generation:
            await self.bus.wait_changed()
        scope.cancel()

    async def _follow(self) -> None:
        next_check = trio.current_time() + self.reconcile_interval_s
        while True:
            data = None
            with trio.move_on_at(next_check):
                data = await self._receive.receive()
            if data is None:
                next_check = trio.current_time() + self.reconcile_interval_s
                try:
                    await self.reconcile()
                except BusUnavailable as exc:
                    log.warning("cluster mirror: reconcile failed: %s", exc)
                except Exception:
                    report_internal_error(self.core.metrics, "cluster_mirror", log,
                                          "cluster mirror: reconcile")
                continue
            if self._overflow:
                self._overflow = False
                await self.reconcile()
                continue
            if isinstance(data, _Want):
                try:
                    await self._load_wanted(data.patterns)
                except BusUnavailable as exc:
                    log.warning("cluster mirror: loading topics failed: %s", exc)
                finally:
                    data.done.set()
                continue
            if isinstance(data, tuple):
                try:
                    await self._catalogue_change(data[1])
                except BusUnavailable as exc:
                    log.warning("cluster mirror: loading a new topic failed: %s", exc)
                except Exception:
                    report_internal_error(self.core.metrics, "cluster_mirror", log,
                                          "cluster mirror: a catalogue notice")
                continue
            try:
                epoch, topic, entry = parse_live_message(data)
                shard = self.bus.shard_of_topic(topic)
                if epoch != self.epochs.get(shard):
                    if epoch != self.bus.shards[shard].epoch:
                        continue  # from an epoch we left (or one we do not know yet)
                    await self.reconcile()  # the bus knows it: catch up by the heads
                    continue
                await self._entry(topic, entry)
            except BusUnavailable as exc:
                log.warning("cluster mirror: catching up failed: %s", exc)
            except Exception:
                # A failure boundary: one entry the mirror cannot read costs that topic a
                # reload at the next reconcile, never the node.
                report_internal_error(self.core.metrics, "cluster_mirror", log,
                                      "cluster mirror: applying a stream entry")
                next_check = trio.current_time()

    @property
    def epoch(self) -> str | None:
        """Shard 0's epoch as mirrored here (the only one with a single Redis)."""
        return self.epochs.get(0)

    def _epoch_of(self, topic: str) -> str:
        return self.epochs.get(self.bus.shard_of_topic(topic)) or self.core.epoch

    # ------------------------------------------------------------------ reconcile

    async def reconcile(self) -> None:
        """Bring every mirrored topic to its head in Redis (after a (re)connection, an
        epoch change, an overflow, and every ``reconcile_interval_s``).  Topics that no
        longer exist, or that no client here follows any more, are dropped."""
        bus = self.bus
        # the epochs as they are now, before the heads are read: heads read from a Redis
        # that lost its data, taken for the old epoch's, would drop every topic as gone
        # (and clients would see "state_reset" instead of "epoch_changed")
        await bus.check()
        if len(bus.shards) == 1:
            if bus.epoch != self.epoch or bus.epoch != self.core.epoch:
                if self.epoch is not None:
                    log.warning("cluster mirror: epoch %s -> %s: every live topic resyncs",
                                self.epoch, bus.epoch)
                assert bus.epoch is not None
                self.epochs[0] = bus.epoch
                self.state.clear()
                self.offsets.clear()
                self.core.set_epoch(bus.epoch)
        else:
            for shard, epoch in enumerate(bus.epochs):
                if epoch is None or self.epochs.get(shard) == epoch:
                    continue
                if shard in self.epochs:
                    log.warning("cluster mirror: epoch of shard %d %s -> %s: its topics "
                                "resync", shard, self.epochs[shard], epoch)
                self.epochs[shard] = epoch

                def on_shard(topic: str, shard: int = shard) -> bool:
                    return bus.shard_of_topic(topic) == shard

                for topic in [t for t in self.state.views if on_shard(t)]:
                    self.state.drop(topic)
                for topic in [t for t in self.offsets if on_shard(t)]:
                    del self.offsets[topic]
                self.core.set_epoch(epoch, on_shard)
                if shard == 0:
                    self.core.epoch = epoch  # what ``hello`` says
        heads = await bus.live_topics()
        self.catalogue = dict(heads)
        if self.interest is None:
            await bus.follow_all()
        else:
            # Only the topics this node's clients follow: subscribed *before* their streams
            # are read below, so no entry falls between the read and the subscription.
            heads = {t: h for t, h in heads.items() if self._wanted(t)}
            unwanted = [t for t in self.state.views if t not in heads]
            # unsubscribed too: topics that went away (an 'x' entry dropped their view)
            await bus.follow_topics(add=list(heads), remove=[
                t for t in bus.followed_topics() if t not in heads])
            for topic in unwanted:
                self.offsets.pop(topic, None)  # loaded afresh if wanted again
        for topic in [t for t in self.state.views if t not in heads]:
            self.state.drop(topic)  # gone, or nobody here follows it (the fan-out sweeps)
        load = [t for t in heads if t not in self.state.views]
        behind = [t for t, head in heads.items()
                  if t in self.state.views and self.offsets.get(t, 0) < head]
        for topic in behind:
            await self._fill(topic)
        for i in range(0, len(load), _LOAD_BATCH):
            batch = load[i:i + _LOAD_BATCH]
            for topic, loaded in zip(batch, await bus.load_topics(batch), strict=True):
                self._install(topic, *loaded, reason="history_truncated")

    def _install(self, topic: str, snap_offset: int | None, snap_data: bytes | None,
                 entries: list[StreamEntry], head: int, *, reason: str) -> None:
        """A topic loaded whole: its snapshot, then the stream entries after it; the
        entries before it become the channel's history (resumable from there)."""
        if snap_offset is None or snap_data is None:
            return  # closed meanwhile (or not written yet: its reset entry will come)
        history: list[dict[str, Any]] = []
        end = None  # offset ``history`` ends at
        for entry in entries:
            if entry.last > snap_offset:
                break
            if entry.kind == "d" and entry.n and (end is None or entry.first == end + 1):
                history.extend(decode_deltas(entry)[0])
            else:
                history = []
            end = entry.last
        if end != snap_offset:
            history = []
        self.state.load(topic, cbor2.loads(snap_data))
        offset = snap_offset
        for entry in entries:
            if entry.last <= offset:
                continue
            if entry.first > offset + 1:
                log.warning("cluster mirror: %s: stream has a hole after %d", topic, offset)
                break
            offset = self._apply(topic, entry, offset, history)
        self.offsets[topic] = offset
        if topic in self.state.views:
            self.core.reset_channel(topic, offset, history, reason)
        self.reloads += 1

    def _apply(self, topic: str, entry: StreamEntry, offset: int,
               history: list[dict[str, Any]] | None = None) -> int:
        """Apply the part of ``entry`` after ``offset`` to the state (and to ``history``
        when loading, else to the fan-out); returns the new offset."""
        if entry.kind == "s":
            self.state.load(topic, cbor2.loads(entry.payload))
            if history is not None:
                history.clear()
            else:
                self.core.reset_channel(topic, entry.last, (), RESYNC_STATE_RESET)
        elif entry.kind == "x":
            self.state.drop(topic)
            if history is not None:
                history.clear()
        else:
            deltas, low, high = decode_deltas(entry)
            skip = offset + 1 - entry.first
            if skip > 0:
                deltas = deltas[skip:]
            if history is not None:
                for delta in deltas:
                    self.state.apply(topic, delta)
                history.extend(deltas)
            else:
                if topic not in self.core.channels:
                    self.core.reset_channel(topic, offset)
                last = len(deltas) - 1
                for i, delta in enumerate(deltas):
                    self.state.apply(topic, delta)
                    self.core.publish(topic, delta, low if i == 0 else high if i == last
                                      else None)
        self.entries_applied += 1
        self._m_entries.inc()
        return entry.last

    # ------------------------------------------------------------------ live entries

    async def _entry(self, topic: str, entry: StreamEntry) -> None:
        if self.interest is not None and topic not in self.state.views \
                and not self._wanted(topic):
            return  # unsubscribed meanwhile (in flight)
        offset = self.offsets.get(topic)
        if offset is None:
            if entry.kind == "s":
                self.state.load(topic, cbor2.loads(entry.payload))
                self.offsets[topic] = entry.last
                self.core.reset_channel(topic, entry.last, (), RESYNC_STATE_RESET)
                self.entries_applied += 1
                return
            await self._reload(topic)
            return
        if entry.last <= offset:
            return  # already have it (the reconcile read past it)
        if entry.first > offset + 1:
            await self._fill(topic)
            return
        self.offsets[topic] = self._apply(topic, entry, offset)

    # ------------------------------------------------------------------ interest

    def _wanted(self, topic: str, patterns: Collection[str] | None = None) -> bool:
        if self.interest is None:
            return True
        return any(topic_matches(p, topic)
                   for p in (self.interest() if patterns is None else patterns))

    def _on_catalogue(self, data: bytes) -> None:
        try:
            self._send.send_nowait(("c", data))
        except trio.WouldBlock:
            self._overflow = True

    async def _catalogue_change(self, data: bytes) -> None:
        """A topic started ('s') or ended ('x') somewhere in the cluster: the catalogue
        follows, and a new topic that a client here follows is mirrored from now on."""
        epoch, topic, entry = parse_live_message(data)
        if epoch != self.epochs.get(self.bus.shard_of_topic(topic)):
            return  # the reconcile of the new epoch reads the catalogue afresh
        if entry.kind == "x":
            self.catalogue.pop(topic, None)
            return
        self.catalogue[topic] = entry.last
        if self.interest is None or topic in self.state.views or not self._wanted(topic):
            return
        await self.bus.follow_topics(add=[topic])
        await self._reload(topic)

    async def want(self, patterns: Sequence[str]) -> None:
        """The fan-out's hook before a client's ``subscribe``: mirror the topics
        ``patterns`` match (subscribe, load snapshot and history), so the subscription sees
        them at their cluster offsets and a resume gets exact deltas.  Bounded: a client
        never waits long for a slow Redis (it gets the topics as they load)."""
        if self.bus.stale or not self.epochs:
            return
        if not any(topic_matches(p, t) and t not in self.state.views
                   for t in self.catalogue for p in patterns):
            return
        request = _Want(patterns)
        try:
            self._send.send_nowait(request)
        except trio.WouldBlock:
            return
        with trio.move_on_after(max(1.0, self.bus.stale_after_s)):
            await request.done.wait()

    async def _load_wanted(self, patterns: Sequence[str]) -> None:
        topics = [t for t in self.catalogue
                  if t not in self.state.views and self._wanted(t, patterns)]
        if not topics:
            return
        await self.bus.follow_topics(add=topics)
        for i in range(0, len(topics), _LOAD_BATCH):
            batch = topics[i:i + _LOAD_BATCH]
            for topic, loaded in zip(batch, await self.bus.load_topics(batch), strict=True):
                self._install(topic, *loaded, reason="history_truncated")

    async def read_views(self, want: Callable[[str], bool]) -> MirrorState:
        """The views of the topics ``want`` accepts, current to their heads: the mirrored
        ones as they are, the others rebuilt from Redis (snapshot and the stream after it)
        for this one answer (``/api``: the same answer on every node, whatever its own
        clients follow)."""
        if self.interest is None:
            return self.state
        heads = await self.bus.live_topics()
        out = MirrorState(self.state.merge_rules)
        missing = []
        for topic in heads:
            if not want(topic):
                continue
            view = self.state.snapshot(topic)
            if view is not None:
                out.load(topic, view)
            else:
                missing.append(topic)
        for i in range(0, len(missing), _LOAD_BATCH):
            batch = missing[i:i + _LOAD_BATCH]
            for topic, (snap_offset, snap_data, entries, _head) in zip(
                    batch, await self.bus.load_topics(batch), strict=True):
                if snap_offset is None or snap_data is None:
                    continue
                out.load(topic, cbor2.loads(snap_data))
                offset = snap_offset
                for entry in entries:
                    if entry.last <= offset:
                        continue
                    if entry.first > offset + 1:
                        break  # a hole (trimmed meanwhile): the snapshot's state stands
                    if entry.kind == "s":
                        out.load(topic, cbor2.loads(entry.payload))
                    elif entry.kind == "x":
                        out.drop(topic)
                        break
                    else:
                        deltas = decode_deltas(entry)[0][offset + 1 - entry.first:]
                        for delta in deltas:
                            out.apply(topic, delta)
                    offset = entry.last
        return out

    async def _fill(self, topic: str) -> None:
        """Catch ``topic`` up from its stream, or reload it when the stream cannot."""
        offset = self.offsets.get(topic, 0)
        entries = await self.bus.read_topic(topic, offset)
        if entries and entries[0].first > offset + 1:
            self._m_gaps.inc(how="snapshot")
            await self._reload(topic)
            return
        self._m_gaps.inc(how="stream")
        self.gaps_filled += 1
        for entry in entries:
            if entry.last > offset:
                offset = self._apply(topic, entry, offset)
        self.offsets[topic] = offset

    async def _reload(self, topic: str) -> None:
        (loaded,) = await self.bus.load_topics([topic])
        self._install(topic, *loaded, reason="history_truncated")
