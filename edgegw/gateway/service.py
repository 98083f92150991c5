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
import gc
import logging
import time
from collections import deque
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
from .uplink import Uplink, write_dead_letter

log = logging.getLogger("edgegw.gateway")

RID_KEY = "__rid__"  # the next record id, kept among the checkpoints
#: per replaying source, its records after its checkpoint that are already in frames
#: (``Batch.after``), kept among the checkpoints so a restart skips exactly those
AFTER_KEY = "__after__"
#: room a DATA message takes around its body (``[4, seq, sent_at, body, "zlib"]``): a body
#: this much under ``uplink.max_frame_bytes`` makes a message under it
DATA_ENVELOPE_BYTES = 64
_WIDEST_RID = (1 << 64) - 1  # parts are sized with the widest record id CBOR encodes
#: the young-generation threshold of CPython's cyclic collector in an ``edgegw gateway``
#: process (CPython's default is 700): under a flood a gateway allocates records, batches,
#: columns and the event loop's own objects by the million, and a young collection every
#: 700 of them -- each also ageing what the batcher holds -- took a fifth to a quarter of
#: its CPU (bench/gateway_hub.py; docs/performance.md).  Garbage is still freed by
#: reference counting at once; only reference cycles wait for the rarer collections.
GC_YOUNG_THRESHOLD = 10_000


def tune_gc() -> None:
    """Set the collector's young threshold for a process that is a gateway (``edgegw
    gateway`` calls it).  Not done by ``Gateway`` itself: an embedding program's collector
    is the program's to set."""
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, older, oldest)


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
        self.dead_letter_path = trio.Path(self.state_dir / "dead-letter.cborseq")
        # [source, n] per put, in the order the batcher holds their records: which source
        # each record of a batch came from, should the batch have to be split
        self._runs: deque[list[Any]] = deque()
        self._after_base: dict[str, int] = {}  # tracked source -> ``after`` of the last batch
        self._refused_untold: dict[str, int] = {}  # refused records not yet told to the hub
        self._lock = trio.Lock()
        self._wake_flusher = trio.Event()
        #: the batcher deadline the flusher is waiting for (None: none, it waits for a wake)
        self._flusher_deadline: float | None = None
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
        self.m_refused = m.counter(
            "gateway_records_rejected_total",
            "records larger than a frame may be: refused, kept in the dead-letter file")
        self.m_split = m.counter("gateway_batches_split_total",
                                 "batches stored as several frames (over the frame limit)")
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
        self._after_base[name] = skip
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
            await self._store_all(self._add(records, source, checkpoint))
        self._deadline_changed()

    async def _put_checkpoint(self, source: str, checkpoint: Any, stored_after: int) -> None:
        async with self._lock:
            await self._store_all(self._add([], source, checkpoint, stored_after=stored_after))
        self._deadline_changed()

    def _add(self, records: Sequence[Record], source: str | None, checkpoint: Any = None,
             **kwargs: Any) -> list[Batch]:
        """``batcher.add``, remembering which source the records came from."""
        if records:
            if self._runs and self._runs[-1][0] == source:
                self._runs[-1][1] += len(records)
            else:
                self._runs.append([source, len(records)])
        return self.batcher.add(records, trio.current_time(), source, checkpoint, **kwargs)

    def _take_runs(self, n: int) -> list[tuple[str | None, int]]:
        """The sources of the next ``n`` records cut from the batcher, as runs."""
        out: list[tuple[str | None, int]] = []
        while n > 0 and self._runs:
            run = self._runs[0]
            k = min(n, run[1])
            out.append((run[0], k))
            n -= k
            run[1] -= k
            if not run[1]:
                self._runs.popleft()
        if n > 0:  # never: every record reaches the batcher through _add
            out.append((None, n))
        return out

    async def _store_all(self, batches: list[Batch]) -> None:
        """Store the batches in order, then tell the hub what the store dropped and what
        was refused meanwhile."""
        if not batches:  # nothing stored: nothing dropped or refused (most puts)
            return
        for batch in batches:
            await self._store(batch)
        events = [e for e in (self._drops_event(), self._refused_event()) if e is not None]
        if events:
            # The events travel like any record: they may fill a batch at once (then that
            # batch is stored now; what it pushes out is counted at once and told to the
            # hub by the next events, so this never loops) or wait in the batcher.
            for full in self._add(events, "gateway"):
                await self._store(full)

    def _encode(self, first_rid: int, records: Sequence[Record]) -> bytes:
        # columns (v2) when the gateway may speak v2: sent as they are to a v2 hub,
        # converted to rows for a v1 one (uplink); most hubs are v2, so the common
        # case pays nothing and the spool holds the smaller body
        if records and self._columnar:
            return encode_columns(first_rid, records)
        return encode_body(first_rid, records)  # no records: a checkpoint travels alone

    def _body_limit(self, n_records: int, checkpoints: dict[str, Any]) -> int:
        """The largest frame body: what the hub takes (``uplink.max_frame_bytes``, at most
        the hub's own limit) and what the store takes (a quarter of the spool)."""
        limit = self.config.uplink.max_frame_bytes - DATA_ENVELOPE_BYTES
        room = self.store.max_body_bytes(n_records, checkpoints)
        return limit if room is None else min(limit, room)

    async def _store(self, batch: Batch) -> None:
        runs = self._take_runs(len(batch.records))
        first_rid = self.next_rid
        n = len(batch.records)
        checkpoints = dict(batch.checkpoints)
        checkpoints[RID_KEY] = first_rid + n
        checkpoints[AFTER_KEY] = batch.after  # every frame: the latest one is the truth
        body = self._encode(first_rid, batch.records)
        limit = self._body_limit(n, checkpoints)
        if len(body) <= limit:
            await self._append(body, n, checkpoints)
        else:
            await self._store_split(batch, runs, limit, len(body))
        self._after_base = {s: batch.after.get(s, 0) for s in self._after_base}
        self._notify_durable(batch.checkpoints)
        self._last_progress = time.time()
        self._count_drops()

    async def _append(self, body: bytes, n_records: int, checkpoints: dict[str, Any]) -> None:
        await self.store.append(body, n_records, checkpoints)
        self.next_rid = checkpoints[RID_KEY]
        failpoints.hit("gateway.frame_stored")
        self.m_frames.inc()
        self.m_records_stored.inc(n_records)

    async def _store_split(self, batch: Batch, runs: list[tuple[str | None, int]], limit: int,
                           size: int) -> None:
        """A batch whose body exceeds the frame limit goes as several frames; a record
        that alone exceeds it is refused (counted, dead-lettered, told to the hub).  Only
        the last frame carries the batch's checkpoints; each earlier one carries, for every
        tracked source, its records after its durable checkpoint that this and earlier
        frames hold (``AFTER_KEY``), so a crash between the parts replays exactly the rest
        (docs/spool.md, "Frame size")."""
        records = batch.records
        parts, refused = _split(records, limit, self._encode)
        owners = [source for source, k in runs for _ in range(k)]
        self.m_split.inc()
        log.warning("a batch of %d record(s) takes %d bytes, over the frame limit of %d: "
                    "stored as %d frame(s)%s", len(records), size, limit, len(parts),
                    f", {len(refused)} record(s) refused" if refused else "")
        # dead-lettered before any frame whose checkpoint passes them is durable
        for i in refused:
            await self._refuse(owners[i] or "?", records[i], limit)
        if not parts:
            parts = [(len(records), len(records))]  # the checkpoints still travel
        done = 0
        for k, (a, b) in enumerate(parts):
            part = records[a:b]
            if k == len(parts) - 1:
                checkpoints = dict(batch.checkpoints)
                after = batch.after
            else:
                checkpoints = {}
                for source in owners[done:b]:
                    if source in self._after_base:
                        self._after_base[source] += 1
                done = b
                after = {s: v for s, v in self._after_base.items() if v}
            checkpoints[RID_KEY] = self.next_rid + len(part)
            checkpoints[AFTER_KEY] = after
            await self._append(self._encode(self.next_rid, part), len(part), checkpoints)

    async def _refuse(self, source: str, record: Record, limit: int) -> None:
        size = len(self._encode(_WIDEST_RID, [record]))
        reason = (f"record too large: {size} bytes encoded, a frame body may hold {limit} "
                  f"(uplink.max_frame_bytes, spool.max_bytes / 4)")
        log.error("source %s: a %s record refused: %s; kept in %s", source,
                  type(record).__name__, reason, self.dead_letter_path)
        self.m_refused.inc(source=source, reason="too_large")
        self._refused_untold[source] = self._refused_untold.get(source, 0) + 1
        try:
            await write_dead_letter(self.dead_letter_path, {
                "seq": None, "epoch": self.store.epoch, "reason": reason, "at": time.time(),
                "body": encode_body(1, [record])})
        except OSError:
            report_internal_error(self.metrics, "dead_letter", log,
                                  "writing a refused record to the dead-letter file")

    def _refused_event(self) -> GatewayEvent | None:
        """The event that tells the hub about refused records not told yet."""
        if not self._refused_untold:
            return None
        by_source, self._refused_untold = self._refused_untold, {}
        n = sum(by_source.values())
        return GatewayEvent(
            "gateway", time.time(), "error", "records_rejected",
            f"{n} record(s) too large for a frame refused; kept in the gateway's "
            f"dead-letter file", {"records": n, "by_source": by_source})

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
                    await self._store_all([batch])
            await self._store_all(self._add(records, source, checkpoint))
        self._deadline_changed()

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

    def _deadline_changed(self) -> None:
        """After records went into the batcher: wake the flusher if the batch now pending
        must go out before what it waits for.  A put that adds to a batch already pending
        changes nothing it waits for, so it wakes nothing (a wake per put cost a third of
        the put path's CPU: a task switch and a cancel scope each)."""
        deadline = self.batcher.deadline
        waiting = self._flusher_deadline
        if deadline is not None and (waiting is None or deadline < waiting):
            self._wake_flusher.set()

    async def _flusher(self) -> None:
        while True:
            # a later deadline than this one wakes nothing: polled at this one, the batch
            # is not due, and the loop waits again for the then pending batch's deadline
            deadline = self._flusher_deadline = self.batcher.deadline
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
                    await self._store_all([batch])

    async def flush(self) -> None:
        """Store whatever the batcher holds now (used at shutdown and by embedders)."""
        async with self._lock:
            # twice at most: the events that storing the batch raised (drops, refusals)
            # wait in the batcher, and go too
            for _ in range(2):
                batch = self.batcher.flush()
                if batch is None:
                    break
                await self._store_all([batch])

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
                             self.dead_letter_path)
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


def _split(records: Sequence[Record], limit: int,
           encode: Callable[[int, Sequence[Record]], bytes]) -> tuple[list[tuple[int, int]],
                                                                    list[int]]:
    """Cut ``records`` into runs ``[a, b)`` whose bodies fit ``limit``, halving until they
    do; a single record that does not fit is refused.  Returns (runs in order, refused
    indexes).  Only for a batch over the limit: rare, so re-encoding is fine."""
    parts: list[tuple[int, int]] = []
    refused: list[int] = []
    todo = [(0, len(records))]
    while todo:
        a, b = todo.pop()
        if len(encode(_WIDEST_RID, records[a:b])) <= limit:
            if parts and parts[-1][1] == a and len(
                    encode(_WIDEST_RID, records[parts[-1][0]:b])) <= limit:
                parts[-1] = (parts[-1][0], b)  # halves that fit together go together
            else:
                parts.append((a, b))
        elif b - a == 1:
            refused.append(a)
        else:
            m = (a + b) // 2
            todo += [(m, b), (a, m)]
    return parts, refused
