"""The gateway service: sources -> batcher -> frame store -> uplink.

Sources put records in batches into ``GatewaySink``; the sink feeds the sans-IO batcher
and appends each full batch, encoded once as a frame body, to the frame store (memory
queue or disk spool).  Appending awaits when the store is full under the ``block``
policy, so backpressure reaches the sources (a tailed file simply waits).  The uplink
sends what the store holds.  Record ids are per gateway and increasing; the next id is
kept with the store's checkpoints so it survives a restart together with the frames.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import trio

from .. import failpoints
from ..backoff import Backoff
from ..batcher import Batch, Batcher
from ..metrics import Metrics, internal_errors, report_internal_error
from ..protocol import encode_body, encode_columns
from ..records import GatewayEvent, Record
from ..sources import Source, SourceContext, source_type
from ..spool import DiskSpool
from ..store import FrameStore, MemoryFrameStore
from ..web import HttpServer, install_status
from .config import GatewayConfig, SourceEntry
from .uplink import Uplink

log = logging.getLogger("edgegw.gateway")

RID_KEY = "__rid__"  # the next record id, kept among the checkpoints
#: per replaying source, its records after its checkpoint that are already in frames
#: (``Batch.after``), kept among the checkpoints so a restart skips exactly those
AFTER_KEY = "__after__"


class GatewaySink:
    """What sources put records into."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway

    async def put(self, records: Sequence[Record], checkpoint: Any = None,
                  source: str | None = None) -> None:
        await self.gateway._put(records, checkpoint, source)


class _SourceSink:
    """One source's sink.  After a restart, a source that replays from its checkpoint
    (``Source.replays``) first emits records that frames already hold -- the first part
    of a put that was split across frames before the crash.  ``skip`` of them are dropped
    here, so each record is stored once (docs/spool.md, "Source positions and split puts")."""

    def __init__(self, gateway: Gateway, name: str, skip: int = 0) -> None:
        self.gateway = gateway
        self.name = name
        self.skip = skip

    async def put(self, records: Sequence[Record], checkpoint: Any = None) -> None:
        if self.skip:
            dropped = min(self.skip, len(records))
            self.skip -= dropped
            self.gateway.m_replay_skipped.inc(dropped, source=self.name)
            records = records[dropped:]
            if not records:
                if checkpoint is not None:  # caught up to here, but not yet past the frames
                    await self.gateway._put_checkpoint(self.name, checkpoint, self.skip)
                return
        await self.gateway._put(records, checkpoint, self.name)

    # For sources that acknowledge their input only once it is durable (MQTT QoS 1):

    def on_durable(self, listener: Callable[[Any], None]) -> None:
        """Call ``listener(checkpoint)`` (synchronously, in the Trio thread) whenever a
        frame carrying a checkpoint of this source is in the frame store: written and
        fsynced with the disk spool; queued with the memory queue, which does not survive
        a crash.  Checkpoints superseded within one frame are not reported: each report
        covers every earlier put of the source."""
        self.gateway._durable_listeners[self.name] = listener

    async def put_whole(self, records: Sequence[Record], checkpoint: Any = None) -> None:
        """``put``, keeping the records in the frame that carries the checkpoint (a
        pending batch they do not fit beside is stored first), so a crash never leaves
        part of them stored without it.  Holds for up to ``batch.max_records`` records.
        Not for sources that replay from their checkpoint (``skip`` does not apply)."""
        await self.gateway._put_whole(records, checkpoint, self.name)


def _innermost(exc: BaseException) -> BaseException:
    """The exception itself, out of the single-member groups nurseries wrap it in."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


class Gateway:
    #: restart delays of a failed source: exponential backoff with full jitter (seconds)
    source_backoff_s: tuple[float, float] = (1.0, 60.0)

    def __init__(self, config: GatewayConfig, *, metrics: Metrics | None = None,
                 store: FrameStore | None = None,
                 extra_sources: Sequence[tuple[str, Source]] = ()) -> None:
        self.config = config
        self.metrics = metrics or Metrics()
        self.state_dir = Path(config.gateway.state_dir)
        if store is None and config.spool is not None:
            # the disk spool recovers (in Gateway.run) before anything reads the store
            spool_cfg = config.spool
            if not spool_cfg.dir:
                spool_cfg = dataclasses.replace(spool_cfg, dir=str(self.state_dir / "spool"))
            store = DiskSpool(spool_cfg, metrics=self.metrics)
        self.store: FrameStore = store or MemoryFrameStore(config.queue.max_frames,
                                                           config.queue.policy)
        self.batcher = Batcher(config.batch.max_records, config.batch.max_delay_ms / 1000)
        self._columnar = config.uplink.max_protocol_version >= 2
        self.sink = GatewaySink(self)
        self._lock = trio.Lock()
        self._wake_flusher = trio.Event()
        self._durable_listeners: dict[str, Callable[[Any], None]] = {}
        self.next_rid = 1
        self.sources: list[tuple[str, Source]] = list(extra_sources)
        self._entries: dict[str, SourceEntry] = {}  # config-built sources, to rebuild them
        self.uplink: Uplink | None = None
        self.status_port: int | None = None
        m = self.metrics
        self.m_records_in = m.counter("gateway_records_in_total", "records put by sources")
        self.m_frames = m.counter("gateway_frames_stored_total", "frames appended to the store")
        self.m_records_stored = m.counter("gateway_records_stored_total", "records in frames")
        self.m_replay_skipped = m.counter(
            "gateway_replayed_records_skipped_total",
            "records a source replayed after a restart that frames already held")
        self._last_progress = time.time()
        self._dropped_counted = (0, 0)  # store drops in the metric and the log
        self._dropped_reported = (0, 0)  # store drops told to the hub
        self.m_dropped = m.counter("gateway_records_dropped_total",
                                   "records dropped by the drop_oldest overflow policy")
        self.m_source_restarts = m.counter("gateway_source_restarts_total",
                                           "sources restarted after failing, by source")
        internal_errors(m)  # exported (as 0) before anything goes wrong

    def _build_sources(self) -> list[tuple[str, Source, int]]:
        """The sources (configured and given), each with how many of its replayed records
        to skip: those after its checkpoint that frames already hold."""
        for entry in self.config.source_entries():
            self._entries[entry.name] = entry
            self.sources.append((entry.name, self._make_source(entry)))
        return [(name, source, self._replay_skip(name, source))
                for name, source in self.sources]

    def _make_source(self, entry: SourceEntry) -> Source:
        """A source from its config, resuming at its latest stored checkpoint."""
        cls = source_type(entry.type)
        context = SourceContext(
            gateway_id=self.config.gateway.id, metrics=self.metrics,
            checkpoint=self.store.checkpoints.get(entry.name),
            state_dir=str(self.state_dir / "sources" / entry.name))
        return cls(entry.name, entry.config, context)

    def _replay_skip(self, name: str, source: Source) -> int:
        """For a source that replays from its checkpoint: how many of the records it will
        replay frames already hold (the batcher counts on from there); else 0."""
        if not getattr(source, "replays", False):
            return 0
        skip = int((self.store.checkpoints.get(AFTER_KEY) or {}).get(name, 0))
        self.batcher.track(name, skip)
        if skip:
            log.info("source %s: skipping the %d replayed record(s) that frames already hold",
                     name, skip)
        return skip

    async def _run_source(self, index: int, skip: int, *,
                          task_status: trio.TaskStatus[None]) -> None:
        """Run one source, restarting it when it fails.

        A failure boundary: an exception out of a source (a bug, an environment failure
        it does not handle) is logged, counted (``internal_errors_total{where="source"}``,
        ``gateway_source_restarts_total``), reported to the hub as a GatewayEvent
        ``source_failed``, and the source is started again after an exponential backoff
        with full jitter.  The batcher is flushed first; the source is then rebuilt from
        its config at its latest stored checkpoint, replayed records that frames already
        hold skipped -- exactly what a restart of the gateway does, so nothing is re-sent
        and nothing skipped.  A source given as an instance (``extra_sources``) is run
        again as it is, its context's checkpoint set to the stored one when it has a
        ``SourceContext``.  Never the gateway: the other sources, the uplink and the spool
        carry on."""
        name, source = self.sources[index]
        backoff = Backoff(*self.source_backoff_s)
        started = False
        while True:
            began = trio.current_time()
            try:
                async with trio.open_nursery() as nursery:
                    await nursery.start(source.run, _SourceSink(self, name, skip))
                    if not started:
                        started = True
                        task_status.started()
                return  # a finite source finished
            except Exception as exc:
                error = _innermost(exc)
                report_internal_error(self.metrics, "source", log, "source %s", name)
            if not started:  # failed while starting: the gateway starts without it
                started = True
                task_status.started()
            if trio.current_time() - began > backoff.maximum:
                backoff.reset()  # it ran well for a while: this is a fresh failure
            delay = backoff.next_delay()
            self.m_source_restarts.inc(source=name)
            try:
                await self.emit_event(
                    "error", "source_failed",
                    f"source {name} failed ({error!r:.200}); restarting in {delay:.1f} s",
                    {"source": name, "error": repr(error)[:1000], "restart_in_s": round(delay, 3),
                     "restarts": int(self.m_source_restarts.get(source=name))})
            except Exception:  # the store itself failing: logged, the source still restarts
                report_internal_error(self.metrics, "source", log,
                                      "reporting the failure of source %s", name)
            await trio.sleep(delay)
            await self.flush()  # its batched records stored, with their checkpoint
            entry = self._entries.get(name)
            if entry is not None:
                source = self._make_source(entry)
                self.sources[index] = (name, source)
            elif isinstance(getattr(source, "context", None), SourceContext):
                source.context.checkpoint = self.store.checkpoints.get(name)  # type: ignore[attr-defined]
            skip = self._replay_skip(name, source)

    async def _put(self, records: Sequence[Record], checkpoint: Any, source: str | None) -> None:
        if records:
            self.m_records_in.inc(len(records), source=source or "?")
        async with self._lock:
            batches = self.batcher.add(records, trio.current_time(), source, checkpoint)
            for batch in batches:
                await self._store(batch)
        self._wake_flusher.set()

    async def _put_checkpoint(self, source: str, checkpoint: Any, stored_after: int) -> None:
        async with self._lock:
            for batch in self.batcher.add([], trio.current_time(), source, checkpoint,
                                          stored_after=stored_after):
                await self._store(batch)
        self._wake_flusher.set()

    async def _store(self, batch: Batch, *, report_drops: bool = True) -> None:
        first_rid = self.next_rid
        self.next_rid += len(batch.records)
        checkpoints = dict(batch.checkpoints)
        checkpoints[RID_KEY] = self.next_rid
        checkpoints[AFTER_KEY] = batch.after  # every frame: the latest one is the truth
        if batch.records:
            # columns (v2) when the gateway may speak v2: sent as they are to a v2 hub,
            # converted to rows for a v1 one (uplink); most hubs are v2, so the common
            # case pays nothing and the spool holds the smaller body
            body = (encode_columns(first_rid, batch.records) if self._columnar
                    else encode_body(first_rid, batch.records))
        else:  # a checkpoint alone still travels in an (empty) frame to stay in order
            body = encode_body(first_rid, [])
        await self.store.append(body, len(batch.records), checkpoints)
        failpoints.hit("gateway.frame_stored")
        self._notify_durable(batch.checkpoints)
        self.m_frames.inc()
        self.m_records_stored.inc(len(batch.records))
        self._last_progress = time.time()
        if not report_drops:
            self._count_drops()
            return
        event = self._drops_event()
        if event is not None:
            # The event travels like any record: it may fill a batch at once (then that
            # batch is stored now; what it pushes out is counted at once and told to the
            # hub by the next event, so this never loops) or wait in the batcher.
            for full in self.batcher.add([event], trio.current_time(), "gateway"):
                await self._store(full, report_drops=False)

    async def _put_whole(self, records: Sequence[Record], checkpoint: Any,
                         source: str) -> None:
        """See ``_SourceSink.put_whole``."""
        if records:
            self.m_records_in.inc(len(records), source=source)
        async with self._lock:
            b = self.batcher
            if b.pending and b.pending + len(records) > b.max_records:
                batch = b.flush()
                if batch is not None:
                    await self._store(batch)
            for batch in b.add(records, trio.current_time(), source, checkpoint):
                await self._store(batch)
        self._wake_flusher.set()

    def _notify_durable(self, checkpoints: dict[str, Any]) -> None:
        for source, checkpoint in checkpoints.items():
            listener = self._durable_listeners.get(source)
            if listener is not None:
                try:
                    listener(checkpoint)
                except Exception:  # a source's fault must not break the store path
                    report_internal_error(self.metrics, "durable_listener", log,
                                          "durable listener of source %s", source)

    def _count_drops(self) -> tuple[int, int]:
        """Overflow under ``drop_oldest`` is counted by the store: count (and log) what it
        dropped since last asked; the totals so far (frames, records)."""
        st = self.store.stats()
        frames, records = st.get("dropped_frames", 0), st.get("dropped_records", 0)
        if frames > self._dropped_counted[0]:
            new_f = frames - self._dropped_counted[0]
            new_r = records - self._dropped_counted[1]
            self._dropped_counted = (frames, records)
            self.m_dropped.inc(new_r)
            log.error("frame store full: dropped the %d oldest frame(s), %d record(s)",
                      new_f, new_r)
        return frames, records

    def _drops_event(self) -> GatewayEvent | None:
        """The event that tells the hub about drops not told yet (None when none)."""
        frames, records = self._count_drops()
        if frames <= self._dropped_reported[0]:
            return None
        new_f = frames - self._dropped_reported[0]
        new_r = records - self._dropped_reported[1]
        self._dropped_reported = (frames, records)
        return GatewayEvent(
            "gateway", time.time(), "error", "store_overflow",
            f"frame store full ({self.store.stats().get('kind')}, drop_oldest): dropped "
            f"{new_f} frame(s) with {new_r} record(s)",
            {"dropped_frames": frames, "dropped_records": records})

    async def emit_event(self, level: str, code: str, message: str,
                         detail: dict[str, Any] | None = None) -> None:
        """Report something about the gateway itself to the hub, as a record."""
        await self._put([GatewayEvent("gateway", time.time(), level, code, message, detail)],
                        None, "gateway")

    async def _flusher(self) -> None:
        while True:
            deadline = self.batcher.deadline
            if deadline is None:
                await self._wake_flusher.wait()
                self._wake_flusher = trio.Event()
                continue
            with trio.move_on_at(deadline):
                await self._wake_flusher.wait()
                self._wake_flusher = trio.Event()
                continue
            async with self._lock:
                batch = self.batcher.poll(trio.current_time())
                if batch is not None:
                    await self._store(batch)

    async def flush(self) -> None:
        """Store whatever the batcher holds now (used at shutdown and by embedders)."""
        async with self._lock:
            batch = self.batcher.flush()
            if batch is not None:
                await self._store(batch)

    async def drain(self, seconds: float) -> bool:
        """Flush the batcher and wait up to ``seconds`` for the hub to acknowledge every
        stored frame.  True when everything was acknowledged."""
        await self.flush()
        with trio.move_on_after(seconds):
            # polled: the store signals new frames, not acks
            while self.store.first_unacked < self.store.next_seq:  # noqa: ASYNC110
                await trio.sleep(0.02)
        return self.store.first_unacked >= self.store.next_seq

    def stats(self) -> dict[str, Any]:
        up = self.uplink
        return {
            "gateway": self.config.gateway.id,
            "connected": bool(up and up.connected),
            "last_error": up.last_error if up else None,
            "next_rid": self.next_rid,
            "pending_in_batcher": self.batcher.pending,
            "store": self.store.stats(),
            "metrics": self.metrics.as_dict(),
        }

    def healthy(self) -> tuple[bool, str]:
        problem = self.store.problem()
        if problem is not None:
            return False, problem
        st = self.store.stats()
        frames = st.get("frames", 0)
        up = self.uplink
        if frames and up is not None and up.last_ack_at is not None:
            idle = time.time() - up.last_ack_at
            if idle > 60:
                return False, f"{frames} frame(s) waiting and no ack for {idle:.0f} s"
        return True, "ok"

    async def _serve_status(self, *, task_status: trio.TaskStatus[int]) -> None:
        server = HttpServer()

        def health() -> tuple[bool, dict[str, Any]]:
            ok, why = self.healthy()
            return ok, {"status": "ok" if ok else "unhealthy", "detail": why}

        install_status(server, health=health, stats=self.stats, metrics=self.metrics)
        g = self.config.gateway
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(server.serve, g.status_listen, g.status_port)
            task_status.started(listeners[0].socket.getsockname()[1])

    async def run(self, *, task_status: trio.TaskStatus[Gateway] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        store = self.store
        # The store's own work (the disk spool: recovery, then its group commit) outlives
        # everything that appends to it: it is shielded from the shutdown cancellation so
        # the final flush (in _run) and the last acks still reach the disk, and stopped
        # explicitly afterwards.
        store_scope = trio.CancelScope(shield=True)

        async def run_store(*, task_status: trio.TaskStatus[None]) -> None:
            with store_scope:
                await store.run(task_status=task_status)

        async with trio.open_nursery() as store_nursery:
            await store_nursery.start(run_store)
            try:
                await self._run(task_status=task_status)
            finally:
                with trio.CancelScope(shield=True), trio.move_on_after(5):
                    await store.flush()
                store_scope.cancel()

    async def _run(self, *, task_status: trio.TaskStatus[Gateway]) -> None:
        await trio.Path(self.state_dir).mkdir(parents=True, exist_ok=True)
        damage = self.store.damage()
        self.next_rid = int(self.store.checkpoints.get(RID_KEY, 1))
        sources = self._build_sources()
        self.uplink = Uplink(self.config.gateway, self.config.uplink, self.store, self.metrics,
                             trio.Path(self.state_dir / "dead-letter.cborseq"))
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(self.uplink.run)
                nursery.start_soon(self._flusher)
                if self.config.gateway.status_port:
                    self.status_port = await nursery.start(self._serve_status)
                for index, (_name, _source, skip) in enumerate(sources):
                    await nursery.start(self._run_source, index, skip)
                log.info("gateway %s running with %d source(s)", self.config.gateway.id,
                         len(self.sources))
                if damage is not None:
                    await self.emit_event("error", "spool_damage", *damage)
                task_status.started(self)
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(5):
                await self.flush()
