"""The gateway service: sources -> batcher -> frame store -> uplink.

Sources put records in batches into ``GatewaySink``; the sink feeds the sans-IO batcher
and appends each full batch, encoded once as a frame body, to the frame store (memory
queue or disk spool).  Appending awaits when the store is full under the ``block``
policy, so backpressure reaches the sources (a tailed file simply waits).  The uplink
sends what the store holds.  Record ids are per gateway and increasing; the next id is
kept with the store's checkpoints so it survives a restart together with the frames.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import gc
import logging
import os
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar

import cbor2
import trio

from .. import failpoints
from ..backoff import Backoff
from ..batcher import Batch, Batcher, Key, Span, count, merge
from ..metrics import Metrics, internal_errors, report_internal_error
from ..protocol import encode_body, encode_columns
from ..records import (
    KIND_OF,
    GatewayEvent,
    Record,
    plain_record,
    unicode_record,
    unicode_text,
)
from ..sources import Source, SourceContext, source_type
from ..spool import DiskSpool, disk_full
from ..startup import check_data_dirs
from ..store import FrameStore, MemoryFrameStore
from ..web import HttpServer, install_status
from ..web.hosts import HostRule
from .config import RESERVED_NAME_PREFIX, GatewayConfig, SourceEntry
from .deadletters import (
    DEAD_LETTER_FILE,
    dead_letter_bytes,
    open_dead_letter_file,
    write_dead_letter,
)
from .positions import AFTER_KEY, PositionLog, taken_back
from .rollback import Rollback
from .uplink import DATA_ENVELOPE_BYTES, RID_KEY, Uplink

log = logging.getLogger("edgegw.gateway")

#: ``AFTER_KEY``: per replaying source, its records after its checkpoint that are already
#: in frames (``Batch.spans``), kept among the checkpoints so a restart skips exactly
#: those: their count, and under ``ORIGINS_KEY`` where they follow (``encode_after``)
#: in ``AFTER_KEY``'s value: per source with origins, ``[[stream, start, n], ...]`` (beside
#: the count, which a gateway that predates origins reads alone)
ORIGINS_KEY = "__origins__"
_WIDEST_RID = (1 << 64) - 1  # parts are sized with the widest record id CBOR encodes
#: the young-generation threshold of CPython's cyclic collector in an ``edgegw gateway``
#: process (CPython's default is 700): under a flood a gateway allocates records, batches,
#: columns and the event loop's own objects by the million, and a young collection every
#: 700 of them -- each also ageing what the batcher holds -- took a fifth to a quarter of
#: its CPU (bench/gateway_hub.py; docs/performance.md).  Garbage is still freed by
#: reference counting at once; only reference cycles wait for the rarer collections.
GC_YOUNG_THRESHOLD = 10_000
#: a put that stores no batch lets the other tasks (uplink, flusher, spool committer) run
#: at every this many puts, not at every put (a put that stores a batch waits for the
#: spool, so they run then too): a source putting as fast as it can holds the thread for
#: this many puts' work at most, tens of microseconds for a part's records (``Gateway._put``)
PUT_YIELD_EVERY = 16
#: frames the hub rejects are told to it as one ``frame_rejected`` event at most this
#: often (the first at once, those rejected meanwhile summed in the next): a hub that
#: rejected every frame would otherwise reject each event's frame too and beget the next
#: event, a frame per round trip for as long as it ran
REJECTED_EVENT_EVERY_S = 60.0
#: the rejected frames' seqs an event names (it counts them all)
REJECTED_EVENT_SEQS = 20
#: a refused record that finds the dead-letter file's disk full is written again this often
DISK_FULL_RETRY_S = 1.0
#: what a stop waits at most for the last events and the batcher to be stored
STOP_TELL_S = 5.0


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
                  source: str | None = None) -> bool:
        """False when ``checkpoint`` was refused (too large): see ``_SourceSink.put``."""
        return await self.gateway._put(records, checkpoint, source)


class _SourceSink:
    """One source's sink.  After a restart, a source that replays from its checkpoint
    (``Source.replays``) emits again records that frames already hold -- the first part
    of a put that was split across frames before the crash.  They are dropped here, so
    each record is stored once (docs/spool.md, "Source positions and split puts").

    What is owed is a list of spans ``(key, n)``: ``n`` records following ``key``, where
    ``key`` is ``(stream, start)`` as the source gave it with the put (``origin``).  A
    span applies only to a replayed put that starts exactly there (the same stream, the
    same position); a put of its stream that starts anywhere else, or that ends the
    stream, discards it (the file was deleted, replaced or truncated: nothing of it comes
    back).  A put of another stream passes untouched.  A span without a key (an older
    spool, or a source that gives no origin) applies to the first records replayed,
    whatever they are, as it always did."""

    #: ``put`` takes ``origin`` (sources/__init__.py)
    takes_origin: ClassVar[bool] = True

    def __init__(self, gateway: Gateway, name: str, owed: Sequence[Span] = ()) -> None:
        self.gateway = gateway
        self.name = name
        self.owed: list[Span] = [span for span in owed if span[1]]

    async def put(self, records: Sequence[Record], checkpoint: Any = None,
                  origin: tuple[Any, Any, Any] | None = None) -> bool:
        """Put records; True, or False when ``checkpoint`` was refused as too large for a
        frame (``Gateway._checkpoint_fits``): the source's previous checkpoint stays the one
        a restart resumes from, so the next puts' origins must follow *its* positions -- a
        source with origins then moves on only the put's own stream (sources/__init__.py)."""
        key: Key = None
        if origin is not None:
            stream, start, end = origin
            if isinstance(stream, list | tuple) or isinstance(start, list | tuple):
                stream, start = _freeze(stream), _freeze(start)  # lists, as from the spool
            key = (stream, start)
            if self.owed:
                records = self._skip(records, key, _freeze(end))
        elif self.owed:
            records = self._skip(records, None, None)
        return await self.gateway._put(records, checkpoint, self.name, key, self.owed)

    def _skip(self, records: Sequence[Record], key: Key, end: Any) -> Sequence[Record]:
        """Drop what the owed spans say of ``records`` (a put from ``key`` to ``end``)."""
        dropped = discarded = 0
        owed: list[Span] = []
        for span_key, n in self.owed:  # spans of unknown origin: the first records, as before
            if span_key is None:
                take = min(n, len(records) - dropped)
                dropped += take
                n -= take
            if n:
                owed.append((span_key, n))
        spans, owed = owed, []
        for span_key, n in spans:
            if span_key is not None and key is not None and span_key[0] == key[0]:
                if span_key == key:  # the replay of its stream starts where it did
                    take = min(n, len(records) - dropped)
                    dropped += take
                    n -= take
                    span_key = (key[0], end)  # what is left follows this put
                    if n and end is None:  # the stream ended short of it
                        discarded += n
                        n = 0
                else:  # its stream resumes elsewhere: what it held never comes back
                    discarded += n
                    n = 0
            if n:
                owed.append((span_key, n))
        self.owed = owed
        if dropped:
            self.gateway.m_replay_skipped.inc(dropped, source=self.name)
        if discarded:
            self.gateway.m_replay_discarded.inc(discarded, source=self.name)
            log.warning("source %s: %d record(s) stored before the restart were not replayed "
                        "from where they followed (the input was deleted, replaced or "
                        "truncated meanwhile): nothing skipped for them", self.name, discarded)
        return records[dropped:]

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
        part of them stored without it.  Holds for up to ``batch.max_records`` records (a
        hub's smaller ``max_records`` does not split them: they are stored as one frame, cut
        as it is sent).
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
        for name, _ in extra_sources:
            # the same rule as the configuration's: the gateway's own checkpoint keys
            if name.startswith(RESERVED_NAME_PREFIX):
                raise ValueError(f"source name {name!r}: a source name must not start with "
                                 f"{RESERVED_NAME_PREFIX!r} (reserved for the gateway's own "
                                 "checkpoint keys)")
        self.config = config
        self.metrics = metrics or Metrics()
        self.state_dir = Path(config.gateway.state_dir)
        #: config key -> the directory this gateway keeps data in
        self.data_dirs = {"gateway.state_dir": str(self.state_dir)}
        if store is None and config.spool is not None:
            # the disk spool recovers (in Gateway.run) before anything reads the store
            spool_cfg = config.spool
            if not spool_cfg.dir:
                spool_cfg = dataclasses.replace(spool_cfg, dir=str(self.state_dir / "spool"))
            self.data_dirs["spool.dir"] = spool_cfg.dir
            store = DiskSpool(spool_cfg, metrics=self.metrics)
        self.store: FrameStore = store or MemoryFrameStore(
            config.queue.max_frames, config.queue.policy, config.queue.stall_timeout_s)
        self.batcher = Batcher(config.batch.max_records, config.batch.max_delay_ms / 1000)
        #: the hub's ``max_records`` the batcher's limit was last set for (``_hub_limit``)
        self._hub_max_records: int | None = None
        self._columnar = config.uplink.max_protocol_version >= 2
        self._typed = config.uplink.max_protocol_version >= 3
        self.sink = GatewaySink(self)
        self.dead_letter_path = trio.Path(self.state_dir / DEAD_LETTER_FILE)
        # [source, origin, n] per run of puts of one source from one origin (puts without
        # one, or with the same), in the order the batcher holds their records: which
        # source each record of a batch came from, and where it follows, should the batch
        # have to be split (each put's own origin: a part stored after a checkpoint of the
        # source counts the next put's records from where that put says they follow)
        self._runs: deque[list[Any]] = deque()
        # tracked source -> (owed, counted) spans of the last batch stored (``Batch``)
        self._after_base: dict[str, tuple[list[Span], list[Span]]] = {}
        self._refused_untold: dict[str, int] = {}  # refused records not yet told to the hub
        # a refused record waits for room on the dead-letter file's disk (unhealthy)
        self._dead_letter_disk_full = False
        # frames the hub rejected not yet told to it: [count, first seqs, last reason]
        self._rejected_untold: tuple[int, list[int], str] = (0, [], "")
        self._rejected_wake = trio.Event()
        #: refused records an earlier run kept in the dead-letter file past the last durable
        #: checkpoint, by (source, body): replayed, they are not written again
        self._refused_kept: Counter[tuple[Any, ...]] = Counter()
        # checkpoints refused as too large, per source, not yet told to the hub: [n, bytes]
        self._checkpoints_untold: dict[str, list[int]] = {}
        #: per source: checkpoints refused as CBOR cannot hold them, the hub not told yet
        #: (count, the first one's reason)
        self._unencodable_untold: dict[str, tuple[int, str]] = {}
        self._checkpoint_budget = _checkpoint_budget(self.store)
        #: what all sources' latest checkpoints may take together (the store repeats each
        #: with every segment), and per source the bytes of its latest one stored or
        #: admitted (None until the first put: the store's recovered ones)
        self._checkpoints_total = self.store.max_checkpoint_bytes()
        self._checkpoint_sizes: dict[str, int] | None = None
        self._checkpoints_sum = 0
        #: per source, the largest checkpoint (bytes) given with the batch pending in the
        #: batcher: together they take at most half a frame (``_add``)
        self._pending_checkpoints: dict[str, int] = {}
        self._lock = trio.Lock()
        #: puts that stored nothing since the last that let the other tasks run (``_put``)
        self._puts_unyielded = 0
        self._wake_flusher = trio.Event()
        #: the batcher deadline the flusher is waiting for (None: none, it waits for a wake)
        self._flusher_deadline: float | None = None
        self._durable_listeners: dict[str, Callable[[Any], None]] = {}
        self.next_rid = 1
        self.sources: list[tuple[str, Source]] = list(extra_sources)
        self._entries: dict[str, SourceEntry] = {}  # config-built sources, to rebuild them
        self.uplink: Uplink | None = None
        #: where the sources were as each frame was stored, for the hub (``_run``)
        self.positions: PositionLog | None = None
        self.status_port: int | None = None
        m = self.metrics
        self.m_records_in = m.counter("gateway_records_in_total", "records put by sources")
        self.m_frames = m.counter("gateway_frames_stored_total", "frames appended to the store")
        self.m_records_stored = m.counter("gateway_records_stored_total", "records in frames")
        self.m_replay_skipped = m.counter(
            "gateway_replayed_records_skipped_total",
            "records a source replayed after a restart that frames already held")
        self.m_replay_discarded = m.counter(
            "gateway_replay_skips_discarded_total",
            "records frames held past a source's checkpoint that its replay after a restart "
            "did not reach from the same position (input deleted, replaced or truncated): "
            "not skipped")
        self._dropped_counted = (0, 0)  # store drops in the metric and the log
        self._dropped_reported = (0, 0)  # store drops told to the hub
        self.m_dropped = m.counter("gateway_records_dropped_total",
                                   "records dropped by the drop_oldest overflow policy")
        self.m_source_restarts = m.counter("gateway_source_restarts_total",
                                           "sources restarted after failing, by source")
        self.m_dead_letter_bytes = dead_letter_bytes(m)
        self.m_refused = m.counter(
            "gateway_records_rejected_total",
            "records refused, by source and reason (too_large: larger than a frame may be, "
            "kept in the dead-letter file; not_a_record: an object put that is not one)")
        self.m_fresh_starts = m.counter(
            "gateway_fresh_starts_total",
            "starts of a store that began afresh (state lost, or the first start) holding "
            "replaying sources, by what those sources started from: taken_back (positions "
            "the hub kept), none_kept, not_offered (a hub that keeps none), no_hub "
            "(unreachable, refusing), no_answer (uplink.resume_wait_s passed), not_stored")
        self.m_status_denied = m.counter(
            "gateway_status_requests_denied_total",
            "status port requests refused, by reason (host: a Host name not allowed)")
        self.m_rewritten = m.counter(
            "gateway_records_rewritten_total",
            "records a frame could not carry as they were, sent rewritten, by source and "
            "reason (not_unicode: text escaped; no_cbor_type: an object sent as its str; "
            "source_not_text: the source field sent as its str)")
        self.m_split = m.counter("gateway_batches_split_total",
                                 "batches stored as several frames (over the frame limit)")
        self.m_checkpoints_refused = m.counter(
            "gateway_checkpoints_rejected_total",
            "source checkpoints too large for a frame, or for all sources' together: not "
            "stored (the previous one stands)")
        internal_errors(m)  # exported (as 0) before anything goes wrong

    def _build_sources(self) -> list[tuple[str, Source, list[Span]]]:
        """The sources (configured and given), each with the spans of its replayed records
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

    def _replay_skip(self, name: str, source: Source) -> list[Span]:
        """For a source that replays from its checkpoint: the spans of the records it will
        replay that frames already hold (the batcher counts on from there); else none."""
        if not getattr(source, "replays", False):
            return []
        owed = decode_after(self.store.checkpoints.get(AFTER_KEY), name)
        self.batcher.track(name, owed)
        self._after_base[name] = (owed, [])
        if owed:
            log.info("source %s: skipping the %d replayed record(s) that frames already hold",
                     name, sum(n for _key, n in owed))
        return owed

    async def _resume_then_start(self, held: list[int], nursery: trio.Nursery) -> None:
        """Start the replaying sources of a store that started afresh once the hub has
        answered the first HELLO (it asked for the positions the hub kept: this gateway's
        state may have been lost), from the positions handed back; from their beginning
        when the hub keeps none, keeps no positions at all, or does not answer within
        ``uplink.resume_wait_s`` (docs/operations.md, "A gateway's state lost")."""
        uplink = self.uplink
        assert uplink is not None
        wait_s = self.config.uplink.resume_wait_s
        names = ", ".join(self.sources[i][0] for i in held)
        log.info("source(s) %s wait up to %g s for the hub: this gateway's store is new, and "
                 "the hub may hold where they were", names, wait_s)
        with trio.move_on_after(wait_s):
            await uplink.resumed.wait()
        if not uplink.resumed.is_set():
            uplink.asks_positions = False  # the sources go: a later answer comes too late
            log.warning("source(s) %s start from their beginning: the hub did not answer "
                        "within uplink.resume_wait_s = %g s (if this gateway's state was "
                        "lost, what the hub has of their files is applied again)", names,
                        wait_s)
        positions = taken_back(uplink.handed_back if uplink.resumed.is_set() else None)
        taken = False
        if not uplink.resumed.is_set():
            outcome = "no_answer"
        elif uplink.gave_up_asking:
            outcome = "no_hub"
        elif uplink.handed_back is None:
            outcome = "not_offered"
        else:
            outcome = "none_kept"
        if positions:
            try:
                taken = await self._take_back(positions, held)
            except Exception:  # the store failing: the sources start from what it holds
                report_internal_error(self.metrics, "positions", log,
                                      "storing the source positions the hub handed back")
                taken = True
                outcome = "not_stored"
            else:
                outcome = "taken_back" if taken else "not_stored"
        self.m_fresh_starts.inc(outcome=outcome)
        for index in held:
            name, source = self.sources[index]
            if taken:  # made again from the positions taken back, as after a restart
                source = self._source_from_store(index)
            await nursery.start(self._run_source, index, self._replay_skip(name, source))

    def _source_from_store(self, index: int) -> Source:
        """Source ``index`` as it starts from its checkpoint in the store: one built from
        its config is built again; one given as an instance gets the checkpoint in its
        ``SourceContext``."""
        name, source = self.sources[index]
        entry = self._entries.get(name)
        if entry is not None:
            source = self._make_source(entry)
            self.sources[index] = (name, source)
        elif isinstance(getattr(source, "context", None), SourceContext):
            source.context.checkpoint = self.store.checkpoints.get(name)  # type: ignore[attr-defined]
        return source

    async def _take_back(self, positions: dict[str, Any], held: list[int]) -> bool:
        """Make the positions a hub handed back this store's own: stored, durably, with a
        frame of no records (sent to the hub like any frame), before a held source starts.
        The held sources' records after their positions that frames hold are counted from
        then on (so a frame stored meanwhile says so too)."""
        if AFTER_KEY in positions and not _after_readable(positions[AFTER_KEY]):
            log.warning("the source positions the hub handed back name records after them "
                        "in a form this gateway does not read: taken without them (those "
                        "records may be sent again)")
            positions = {k: v for k, v in positions.items() if k != AFTER_KEY}
        checkpoints = {**positions, RID_KEY: self.next_rid}
        async with self._lock:
            for index in held:
                name = self.sources[index][0]
                owed = decode_after(positions.get(AFTER_KEY), name)
                self.batcher.track(name, owed)
                self._after_base[name] = (owed, [])
            try:
                await self._append(encode_body(self.next_rid, []), 0, checkpoints)
            except ValueError as exc:  # larger than this store takes: they cannot be kept
                log.error("the source positions the hub handed back cannot be stored (%s): "
                          "the sources start from their beginning", exc)
                for index in held:
                    self.batcher.track(self.sources[index][0], [])
                    self._after_base[self.sources[index][0]] = ([], [])
                return False
            self._checkpoint_sizes = None  # measured again with these at the next put
        await self.store.flush()
        log.warning("took back the source positions the hub kept (this gateway's store is "
                    "new): %s", ", ".join(sorted(k for k in positions if k != AFTER_KEY)))
        return True

    async def _run_source(self, index: int, skip: list[Span], *,
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
            source = self._source_from_store(index)
            skip = self._replay_skip(name, source)

    async def _put(self, records: Sequence[Record], checkpoint: Any, source: str | None,
                   origin: Key = None, owed: Sequence[Span] | None = None) -> bool:
        """Put a source's records; False when its checkpoint was refused (too large)."""
        if records:
            self.m_records_in.inc(len(records), source=source or "?")
        size = self._admit(source, checkpoint)
        if size is None:
            checkpoint = None
        lock = self._lock
        if lock.locked():  # a store in progress (another put's, the flusher's): after it
            async with lock:
                await self._store_all(self._add(records, source, checkpoint, origin=origin,
                                                size=size or 0, owed=owed))
        else:
            # What ``async with lock`` does, less a task switch per put: a cancel point
            # first (nothing added when cancelled), the lock taken at once (free, so
            # nobody waits for it), and a schedule point only every ``PUT_YIELD_EVERY``
            # puts or when a batch is stored (the spool's awaits).  A switch per put was
            # over a third of a put of a part's records (8.3 us of CPU for 72 records).
            # Counted, not timed: the same under a test's virtual clock, which stands
            # still while a task runs.
            await trio.lowlevel.checkpoint_if_cancelled()
            lock.acquire_nowait()
            try:
                batches = self._add(records, source, checkpoint, origin=origin,
                                    size=size or 0, owed=owed)
                if batches:
                    await self._store_all(batches)
            finally:
                lock.release()
            self._puts_unyielded += 1
            if batches or self._puts_unyielded >= PUT_YIELD_EVERY:
                self._puts_unyielded = 0
                await trio.lowlevel.cancel_shielded_checkpoint()
        self._deadline_changed()
        return size is not None

    def _admit(self, source: str | None, checkpoint: Any) -> int | None:
        """A put's checkpoint: the bytes it takes in a frame (0: none given, or no limit),
        or None when it is refused as too large (``_checkpoint_fits``, which counts it)."""
        if checkpoint is None or source is None or self._checkpoint_budget is None:
            return 0
        return self._checkpoint_fits(source, checkpoint)

    def _add(self, records: Sequence[Record], source: str | None, checkpoint: Any = None,
             origin: Key = None, size: int = 0, **kwargs: Any) -> list[Batch]:
        """``batcher.add``, remembering which source (and origin) the records came from.
        ``checkpoint`` was admitted (``_admit``), ``size`` its bytes: when the checkpoints
        of the pending batch and it would take over half a frame (several sources' near
        the limit of one), the pending batch is cut first."""
        out: list[Batch] = []
        up = self.uplink
        if up is not None and up.hub_max_records != self._hub_max_records:
            out += self._hub_limit(up.hub_max_records)
        if size and source is not None:
            pending = self._pending_checkpoints
            total = size + sum(n for s, n in pending.items() if s != source)
            if total > 2 * (self._checkpoint_budget or 0) and pending:
                batch = self.batcher.flush()
                if batch is not None:
                    out.append(batch)
                self._pending_checkpoints = {}
        if records:
            last = self._runs[-1] if self._runs else None
            if last is not None and last[0] == source and last[1] == origin:
                last[2] += len(records)
            else:
                self._runs.append([source, origin, len(records)])
        cut = self.batcher.add(records, trio.current_time(), source, checkpoint,
                               origin=origin, **kwargs)
        if cut:
            self._pending_checkpoints = {}
        if size and source is not None and checkpoint is not None and self.batcher.pending:
            pending = self._pending_checkpoints
            pending[source] = max(pending.get(source, 0), size)
        return out + cut

    def _hub_limit(self, hub_max_records: int | None) -> list[Batch]:
        """Cut new batches to at most the hub's ``max_records`` (WELCOME): frames over it
        would be split as they are sent, every one of them, costing frames at the end of
        the sequence space (docs/protocol.md, "Frames over the hub's limits").  The limit
        is ``batch.max_records`` or the hub's, the smaller, set before the first put
        after each WELCOME that changed it.  What the batcher holds over the new limit
        is cut (``Batcher.set_max_records``) and returned, to be stored first."""
        self._hub_max_records = hub_max_records
        own = self.config.batch.max_records
        limit = own if hub_max_records is None else min(own, hub_max_records)
        if limit == self.batcher.max_records:
            return []
        if limit < own:
            log.info("the hub takes frames of up to %d records: new batches are cut to it "
                     "(batch.max_records is %d)", limit, own)
        held = self.batcher.set_max_records(limit)
        if held is None:
            return []
        self._pending_checkpoints = {}
        return [held]

    def _checkpoint_fits(self, source: str, checkpoint: Any) -> int | None:
        """The bytes a source's checkpoint takes (0: not measured, a number), or None
        when it may not be stored: over a quarter of what a frame of the store may hold
        (``_checkpoint_budget``), or with the latest checkpoints of the other sources over
        what they may take together (``max_checkpoint_bytes``: the spool repeats every one
        in each segment's STATE record).  One that is larger would make
        every frame carrying it too large to store (or leave no room for records), or the
        STATE records outgrow the spool, so it
        is refused: counted per source, logged, told to the hub, and not stored -- the
        source's previous checkpoint stays the durable one, and the records go on being
        counted after it (``Batch.after``), so a restart replays from there and skips what
        frames hold: nothing lost, nothing stored twice, the source not stopped
        (docs/spool.md, "Frame size")."""
        budget = self._checkpoint_budget
        if budget is None:
            return 0
        sizes = self._checkpoint_sizes
        if sizes is None:  # the first put: the store has recovered its checkpoints
            sizes = self._checkpoint_sizes = {
                name: len(cbor2.dumps(cp)) for name, cp in self.store.checkpoints.items()
                if not name.startswith(RESERVED_NAME_PREFIX)}
            self._checkpoints_sum = sum(sizes.values())
        if isinstance(checkpoint, (int, float)):
            self._checkpoints_sum -= sizes.pop(source, 0)
            return 0
        try:
            size = len(cbor2.dumps(checkpoint))
        except _UNENCODABLE as exc:
            # a source's checkpoint that CBOR cannot hold (text that is not Unicode, an
            # object of no CBOR type) raised in the source's put, which restarted it --
            # from the same checkpoint, for ever; refused instead, as one too large is
            first = not self.m_checkpoints_refused.get(source=source)
            self.m_checkpoints_refused.inc(source=source)
            reason = unicode_text(f"{type(exc).__name__}: {exc}")[:200]
            log.log(logging.ERROR if first else logging.DEBUG,
                    "source %s: a checkpoint that cannot be stored refused (%s); its "
                    "previous checkpoint stays the durable one", source, reason)
            n, said = self._unencodable_untold.get(source, (0, reason))
            self._unencodable_untold[source] = (n + 1, said)
            return None
        others = self._checkpoints_sum - sizes.get(source, 0)
        total = self._checkpoints_total
        # within the total, or no larger than the source's own last one (the sum does not
        # grow: a spool recovered over the total, e.g. written with a larger spool, heals)
        if size <= budget and (total is None or others + size <= total
                               or size <= sizes.get(source, 0)):
            sizes[source] = size
            self._checkpoints_sum = others + size
            return size
        untold = self._checkpoints_untold.setdefault(source, [0, 0])
        untold[0] += 1
        untold[1] = max(untold[1], size)
        first = not self.m_checkpoints_refused.get(source=source)
        self.m_checkpoints_refused.inc(source=source)
        # the first refusal of a source is an error in the log, later ones are counted
        log.log(logging.ERROR if first else logging.DEBUG,
                "source %s: a checkpoint of %d bytes refused: a frame may hold one of at "
                "most %d, and all sources' latest checkpoints (the other sources' take %d) "
                "at most %s together; its previous checkpoint stays the durable one",
                source, size, budget, others, total)
        return None

    def _checkpoint_events(self) -> list[GatewayEvent]:
        """The events that tell the hub about refused checkpoints not told yet."""
        untold, self._checkpoints_untold = self._checkpoints_untold, {}
        unencodable, self._unencodable_untold = self._unencodable_untold, {}
        return [GatewayEvent(
            "gateway", time.time(), "error", "checkpoint_rejected",
            f"source {source}: {n} checkpoint(s) refused that cannot be stored ({reason}); "
            "its previous checkpoint stands (a restart replays from it, skipping what "
            "frames hold)", {"source": source, "checkpoints": n, "error": reason})
            for source, (n, reason) in unencodable.items()] + [GatewayEvent(
            "gateway", time.time(), "error", "checkpoint_rejected",
            f"source {source}: {n} checkpoint(s) of up to {size} bytes refused, over the "
            f"{self._checkpoint_budget} a frame may carry or, beside the other sources' "
            f"latest, the {self._checkpoints_total} all may take together; its previous "
            f"checkpoint stands (a restart replays from it, skipping what frames hold)",
            {"source": source, "checkpoints": n, "bytes": size,
             "limit": self._checkpoint_budget, "total_limit": self._checkpoints_total})
            for source, (n, size) in untold.items()]

    def _take_runs(self, n: int) -> list[tuple[str | None, Key, int]]:
        """The sources (and origins) of the next ``n`` records cut from the batcher, as
        runs."""
        out: list[tuple[str | None, Key, int]] = []
        while n > 0 and self._runs:
            run = self._runs[0]
            k = min(n, run[2])
            out.append((run[0], run[1], k))
            n -= k
            run[2] -= k
            if not run[2]:
                self._runs.popleft()
        if n > 0:  # never: every record reaches the batcher through _add
            out.append((None, None, n))
        return out

    async def _store_all(self, batches: list[Batch]) -> None:
        """Store the batches in order, then tell the hub what the store dropped and what
        was refused meanwhile."""
        if not batches:  # nothing stored: nothing dropped or refused (most puts)
            return
        for batch in batches:
            await self._store(batch)
        events = [e for e in (self._drops_event(), self._refused_event(),
                              *self._checkpoint_events()) if e is not None]
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
            # float columns as typed arrays (v3) unless the hub last agreed an older
            # version: those frames would be converted as they are sent (uplink)
            up = self.uplink
            typed = self._typed and (up is None or (up.hub_version or 3) >= 3)
            return encode_columns(first_rid, records, typed=typed)
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
        checkpoints[AFTER_KEY] = encode_after(batch.spans)  # every frame: the latest is the truth
        try:
            body = self._encode(first_rid, batch.records)
        except _UNENCODABLE:  # rare: repaired here, not checked in every put
            self._rewrite(batch, runs)
            body = self._encode(first_rid, batch.records)
        limit = self._body_limit(n, checkpoints)
        after = {s: (batch.owed.get(s, []), batch.counted.get(s, [])) for s in self._after_base}
        if len(body) <= limit:
            # what the frame holds is the truth before its append is awaited, as its ids
            # (``_append``): a cancelled wait leaves the frame stored
            self._after_base = after
            await self._append(body, n, checkpoints)
        else:
            await self._store_split(batch, runs, limit, len(body))  # (its parts' progress)
            self._after_base = after
        self._notify_durable(batch.checkpoints)
        self._count_drops()

    def _rewrite(self, batch: Batch, runs: list[tuple[str | None, Key, int]]) -> None:
        """Make every record of ``batch`` one a frame can carry (each of these stopped the
        gateway: the frame could not be encoded, or the hub refused it and every record
        in it).  A record holding text that is not Unicode (lone surrogates: a plugin's or
        a test program's, a JSON payload's) is sent with it escaped
        (``records.unicode_text``); one holding an object CBOR has no type for, with that
        object's ``str()`` (``plain_record``); one whose ``source`` is not text, with its
        ``str()``.  Counted per source and reason (``gateway_records_rewritten_total``).
        What is not a record at all is refused (``gateway_records_rejected_total``,
        reason ``not_a_record``) and its place taken by a GatewayEvent naming it, so the
        source's count of records in frames is unchanged (the exactly-once accounting of
        a replay).  Logged, a warning or an error the first time per source and reason."""
        owners = [source for source, _key, k in runs for _ in range(k)]
        for i, record in enumerate(batch.records):
            source = (owners[i] if i < len(owners) else None) or "?"
            fixed, reason = unicode_record(record), "not_unicode"
            if not self._encodes(fixed):
                fixed, reason = plain_record(fixed), "no_cbor_type"
                if type(fixed) in KIND_OF and type(fixed[0]) is not str:
                    fixed, reason = fixed._replace(source=unicode_text(str(fixed[0]))), \
                        "source_not_text"
                if not self._encodes(fixed):
                    batch.records[i] = self._stand_in(source, record)
                    continue
            if fixed is record:
                continue
            batch.records[i] = fixed
            first = not self.m_rewritten.get(source=source, reason=reason)
            self.m_rewritten.inc(source=source, reason=reason)
            log.log(logging.WARNING if first else logging.DEBUG,
                    "source %s: a %s record a frame cannot carry (%s) sent rewritten: %.200s",
                    source, type(record).__name__, reason, fixed)

    def _encodes(self, record: Any) -> bool:
        try:
            self._encode(1, [record])
        except _UNENCODABLE:
            return False
        return True

    def _stand_in(self, source: str, value: Any) -> GatewayEvent:
        """The GatewayEvent put in the place of ``value``, which is not a record."""
        shown = unicode_text(repr(value))
        first = not self.m_refused.get(source=source, reason="not_a_record")
        self.m_refused.inc(source=source, reason="not_a_record")
        log.log(logging.ERROR if first else logging.DEBUG,
                "source %s: put a %s, which is not a record (edgegw.records); refused, an "
                "event sent in its place: %.200s", source, type(value).__name__, shown)
        return GatewayEvent(
            "gateway", time.time(), "error", "record_refused",
            f"source {source}: put a {type(value).__name__}, which is not a record; refused",
            {"source": source, "type": unicode_text(type(value).__name__),
             "value": shown[:1000]})

    async def _append(self, body: bytes, n_records: int, checkpoints: dict[str, Any]) -> None:
        # The ids are spent before the append is awaited: a put cancelled while it waits
        # for its frame's commit (SIGTERM cancels the sources) leaves the frame taken and
        # committed, and the shutdown's flush numbered its own records from the same ids
        # again -- the hub dropped them as applied (tests/test_record_ids.py).  An append
        # cancelled before the store took the frame leaves a gap of ids: harmless, and its
        # records are read again with the ids the last durable checkpoint gives.
        self.next_rid = checkpoints[RID_KEY]
        seq = await self.store.append(body, n_records, checkpoints)
        if self.positions is not None:
            self.positions.note(seq, checkpoints)
        failpoints.hit("gateway.frame_stored")
        self.m_frames.inc()
        self.m_records_stored.inc(n_records)

    async def _store_split(self, batch: Batch, runs: list[tuple[str | None, Key, int]],
                           limit: int, size: int) -> None:
        """A batch whose body exceeds the frame limit goes as several frames; a record
        that alone exceeds it is refused (counted, dead-lettered, told to the hub).  The
        last frame carries the batch's checkpoints; each earlier one carries the
        checkpoints of the tracked sources' puts that end in it (``Batch.marks``: the
        batcher's own rule, a checkpoint with the put's last record) and, for every
        tracked source, its records after that checkpoint that this and earlier frames
        hold (``AFTER_KEY``), so a crash between the parts resumes each source where its
        spans follow and replays exactly the rest (docs/spool.md, "Frame size")."""
        records = batch.records
        limit = min(limit, self._marked_limit(batch))
        parts, refused = _split(records, limit, self._encode)
        owners = [(source, key) for source, key, k in runs for _ in range(k)]
        self.m_split.inc()
        log.warning("a batch of %d record(s) takes %d bytes, over the frame limit of %d: "
                    "stored as %d frame(s)%s", len(records), size, limit, len(parts),
                    f", {len(refused)} record(s) refused" if refused else "")
        # dead-lettered before any frame whose checkpoint passes them is durable
        for i in refused:
            await self._refuse(owners[i][0] or "?", records[i], limit)
        if not parts:
            parts = [(len(records), len(records))]  # the checkpoints still travel
        marks = batch.marks
        done = m = 0
        for k, (a, b) in enumerate(parts):
            part = records[a:b]
            if k == len(parts) - 1:
                checkpoints = dict(batch.checkpoints)
                after = batch.spans
            else:
                checkpoints = {}
                while True:
                    # a checkpoint at ``done`` covers the records before it: it settles
                    # its source's counts, which then run on after it
                    while m < len(marks) and marks[m][0] <= done:
                        _end, source, checkpoint, owed = marks[m]
                        checkpoints[source] = checkpoint
                        self._after_base[source] = (owed, [])
                        m += 1
                    if done >= b:
                        break
                    upto = min(b, marks[m][0]) if m < len(marks) else b
                    for owner, key in owners[done:upto]:
                        if owner in self._after_base:
                            owed, counted = self._after_base[owner]
                            self._after_base[owner] = (owed, count(counted, key, 1))
                    done = upto
                after = {s: merge(owed, counted)
                         for s, (owed, counted) in self._after_base.items()}
            checkpoints[RID_KEY] = self.next_rid + len(part)
            checkpoints[AFTER_KEY] = encode_after(after)
            await self._append(self._encode(self.next_rid, part), len(part), checkpoints)

    def _marked_limit(self, batch: Batch) -> int:
        """The frame body limit with room for the largest checkpoint each tracked source
        gave in ``batch`` (an earlier part may carry one larger than the batch's last)."""
        widest = dict(batch.checkpoints)
        sizes: dict[str, int] = {}
        for _end, source, checkpoint, _owed in batch.marks:
            n = len(cbor2.dumps(checkpoint))
            if n > sizes.get(source, -1):
                sizes[source] = n
                widest[source] = checkpoint
        widest[RID_KEY] = _WIDEST_RID
        widest[AFTER_KEY] = encode_after(batch.spans)
        return self._body_limit(len(batch.records), widest)

    async def _refuse(self, source: str, record: Record, limit: int) -> None:
        size = len(self._encode(_WIDEST_RID, [record]))
        reason = (f"record too large: {size} bytes encoded, a frame body may hold {limit} "
                  f"(uplink.max_frame_bytes, spool.max_bytes / 4)")
        log.error("source %s: a %s record refused: %s; kept in %s", source,
                  type(record).__name__, reason, self.dead_letter_path)
        self.m_refused.inc(source=source, reason="too_large")
        self._refused_untold[source] = self._refused_untold.get(source, 0) + 1
        body = encode_body(1, [record])
        if self._refused_kept[(source, body)] > 0:
            # a replay (a crash before the checkpoint past it was durable): kept already
            self._refused_kept[(source, body)] -= 1
            log.info("source %s: the refused record is in the dead-letter file already "
                     "(replayed)", source)
            return
        entry = {"seq": None, "epoch": self.store.epoch, "reason": reason, "at": time.time(),
                 "source": source, "rid": self.next_rid, "body": body}
        full_since: float | None = None
        while True:
            try:
                size = await write_dead_letter(self.dead_letter_path, entry)
                break
            except OSError as exc:
                if not disk_full(exc):
                    report_internal_error(self.metrics, "dead_letter", log,
                                          "writing a refused record to the dead-letter file")
                    return
                # the file is its only copy the gateway keeps: the record waits for room,
                # and the frames behind it with it, as the spool's own appends do
                if full_since is None:
                    full_since = trio.current_time()
                    self._dead_letter_disk_full = True
                    log.error("source %s: the disk of the dead-letter file %s is full: the "
                              "refused record (and what follows it) waits until there is "
                              "room", source, self.dead_letter_path)
                await trio.sleep(DISK_FULL_RETRY_S)
        if full_since is not None:
            self._dead_letter_disk_full = False
            log.warning("source %s: the refused record is kept in the dead-letter file "
                        "after %.1f s of a full disk", source,
                        trio.current_time() - full_since)
        self.m_dead_letter_bytes.set(size)
        if self.uplink is not None:  # its bound counts this entry too
            self.uplink.dead_letter_written(size)

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
        size = self._admit(source, checkpoint)
        if size is None:
            checkpoint = None
        async with self._lock:
            b = self.batcher
            if b.pending and b.pending + len(records) > b.max_records:
                batch = b.flush()
                self._pending_checkpoints = {}
                if batch is not None:
                    await self._store_all([batch])
            # whole: not split for a hub's smaller max_records (one frame, cut as it is
            # sent); over batch.max_records itself it is, as documented (docs/mqtt.md)
            await self._store_all(self._add(
                records, source, checkpoint, size=size or 0,
                whole=len(records) <= self.config.batch.max_records))
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

    def _rolled_back(self, nursery: trio.Nursery, rollback: Rollback) -> None:
        """The uplink found the state gone back in time (gateway/rollback.py): the hub
        hears of it as an error event (not from the uplink's task: a put may wait)."""
        nursery.start_soon(
            self._tell, "error", "state_rollback",
            f"the gateway's state went back in time: the hub had applied frames "
            f"{rollback.first}..{rollback.last} of epoch {rollback.epoch} that its spool "
            f"never held; {rollback.reissued} frame(s) stored again under new seqs",
            rollback._asdict())

    def _frame_rejected(self, seq: int, reason: str) -> None:
        """The hub rejected frame ``seq`` (kept in the dead-letter file): told to the hub
        by ``_tell_rejections``, so that an alert rule can page someone (the hub counts
        it, but a cluster rejects on whichever node got the frame, not where the
        gateway's alerts are raised)."""
        n, seqs, _ = self._rejected_untold
        if len(seqs) < REJECTED_EVENT_SEQS:
            seqs.append(seq)
        self._rejected_untold = (n + 1, seqs, reason)
        self._rejected_wake.set()

    async def _tell_rejections(self) -> None:
        """One ``frame_rejected`` error event per ``REJECTED_EVENT_EVERY_S`` at most."""
        while True:
            await self._rejected_wake.wait()
            self._rejected_wake = trio.Event()
            # shielded (bounded): a stop arriving while the event is stored must not lose
            # the rejections it counts (taken out of ``_rejected_untold`` already)
            with trio.CancelScope(shield=True), trio.move_on_after(STOP_TELL_S):
                await self._tell_rejected()
            await trio.sleep(REJECTED_EVENT_EVERY_S)

    async def _tell_rejected(self) -> None:
        """Tell the hub of the rejections counted since the last telling, if any."""
        (n, seqs, reason), self._rejected_untold = self._rejected_untold, (0, [], "")
        if not n:
            return
        which = f"frame {seqs[0]} as invalid:" if n == 1 else (
            f"{n} frames ({', '.join(map(str, seqs))}{', ...' if n > len(seqs) else ''})"
            f" as invalid, the last for:")
        await self._tell(
            "error", "frame_rejected",
            f"the hub rejected {which} {reason} (kept in the gateway's dead-letter "
            f"file: edgegw dead-letters list)",
            {"frames": n, "seqs": seqs, "reason": reason})

    async def _tell(self, level: str, code: str, message: str,
                    detail: dict[str, Any] | None = None) -> None:
        """``emit_event`` from a task of the gateway's own: a failure boundary (the store
        failing, say), so an event that cannot be stored never ends the gateway."""
        try:
            await self.emit_event(level, code, message, detail)
        except Exception:
            report_internal_error(self.metrics, "gateway_event", log,
                                  "telling the hub of a %s event", code)

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
                    self._pending_checkpoints = {}
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
                self._pending_checkpoints = {}
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
        # One rule, one place: the store judges a stall ("frames wait and nothing was
        # acknowledged for spool.stall_timeout_s / queue.stall_timeout_s"), its clock
        # starting when work appears -- not at the last ack, which after an idle spell
        # would make the first new frame a stall at once.
        problem = self.store.problem()
        if problem is not None:
            return False, problem
        if self._dead_letter_disk_full:
            return False, "dead-letter file: disk full"
        return True, "ok"

    async def _serve_status(self, *, task_status: trio.TaskStatus[int]) -> None:
        # its connection counters (open, refused, shed, timeouts) in the gateway's /metrics
        server = HttpServer(metrics=self.metrics)

        def health() -> tuple[bool, dict[str, Any]]:
            ok, why = self.healthy()
            return ok, {"status": "ok" if ok else "unhealthy", "detail": why}

        install_status(server, health=health, stats=self.stats, metrics=self.metrics)
        g = self.config.gateway
        # No sign-in here: /api/stats and /metrics are served only to a Host that a
        # DNS-rebinding page cannot have (docs/security.md); /healthz stays open as the hub's.
        server.guard = HostRule(g.status_allowed_hosts, key="gateway.status_allowed_hosts",
                                refused=self.m_status_denied).guard(public={"/healthz"})
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
        await check_data_dirs(self.data_dirs, self.metrics)
        damage = self.store.damage()
        self.next_rid = int(self.store.checkpoints.get(RID_KEY, 1))
        try:  # before anything writes to it: a torn last entry cut off
            self._refused_kept = await trio.to_thread.run_sync(
                open_dead_letter_file, os.fspath(self.dead_letter_path), self.store.epoch,
                self.next_rid)
            with contextlib.suppress(FileNotFoundError):
                self.m_dead_letter_bytes.set((await trio.to_thread.run_sync(
                    os.stat, os.fspath(self.dead_letter_path))).st_size)
        except OSError:
            report_internal_error(self.metrics, "dead_letter", log,
                                  "opening the dead-letter file")
        sources = self._build_sources()
        self.uplink = Uplink(self.config.gateway, self.config.uplink, self.store, self.metrics,
                             self.dead_letter_path)
        afresh = False
        if self.config.uplink.positions_every_s:
            self.positions = self.uplink.positions = PositionLog(self.store.checkpoints)
            # a store that holds no frame and no checkpoint: the hub may know where the
            # sources were (this gateway's state lost: docs/operations.md)
            afresh = self.store.next_seq == 1 and not self.store.checkpoints
            self.uplink.asks_positions = afresh
        try:
            async with trio.open_nursery() as nursery:
                self.uplink.on_state_rollback = functools.partial(self._rolled_back, nursery)
                self.uplink.on_frame_rejected = self._frame_rejected
                nursery.start_soon(self._tell_rejections)
                await nursery.start(self.uplink.run)
                nursery.start_soon(self._flusher)
                if self.config.gateway.status_port:
                    self.status_port = await nursery.start(self._serve_status)
                held = []
                for index, (_name, source, skip) in enumerate(sources):
                    if afresh and getattr(source, "replays", False):
                        held.append(index)  # started once the hub has answered
                    else:
                        await nursery.start(self._run_source, index, skip)
                if held:
                    nursery.start_soon(self._resume_then_start, held, nursery)
                log.info("gateway %s running with %d source(s)", self.config.gateway.id,
                         len(self.sources))
                if damage is not None:
                    await self.emit_event("error", "spool_damage", *damage)
                task_status.started(self)
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(STOP_TELL_S):
                # rejections counted within the interval and not told yet: stored now,
                # told by the frame that carries them (this run's or the next one's)
                await self._tell_rejected()
                await self.flush()


def _freeze(value: Any) -> Any:
    """An origin value as it compares after a trip through the spool (CBOR gives lists
    back): lists made tuples, all the way down, so it can be a key."""
    if type(value) is list or type(value) is tuple:
        return tuple(_freeze(v) for v in value)
    return value


def encode_after(spans: dict[str, list[Span]]) -> dict[str, Any]:
    """``AFTER_KEY``'s stored value: per source, the count, as every gateway wrote it
    before origins (and reads it); and, when some span of a source has an origin, under
    ``ORIGINS_KEY`` its spans, ``[[stream, start, n], ...]`` (``[None, None, n]`` for a span
    of unknown origin).  A gateway that predates origins reads the count alone (and skips
    as it always did) instead of failing on a list."""
    out: dict[str, Any] = {}
    origins: dict[str, Any] = {}
    for source, entries in spans.items():
        entries = [(key, n) for key, n in entries if n]
        if not entries:
            continue
        out[source] = sum(n for _key, n in entries)
        if any(key is not None for key, _n in entries):
            origins[source] = [[None, None, n] if key is None else [key[0], key[1], n]
                               for key, n in entries]
    if origins:
        out[ORIGINS_KEY] = origins
    return out


def decode_after(value: Any, source: str) -> list[Span]:
    """``source``'s spans from ``AFTER_KEY``'s stored value (``encode_after``); a count
    alone (an older spool, or a source without origins) is one span of unknown origin."""
    if not value:
        return []
    spans = (value.get(ORIGINS_KEY) or {}).get(source)
    if spans is None:
        n = int(value.get(source, 0))
        return [(None, n)] if n > 0 else []
    out: list[Span] = []
    for stream, start, n in spans:
        key = None if stream is None else (_freeze(stream), _freeze(start))
        if int(n) > 0:
            out.append((key, int(n)))
    return out


def _after_readable(value: Any) -> bool:
    """Whether ``decode_after`` reads every source's spans in ``value`` (``AFTER_KEY``'s
    value as a hub handed it back: not trusted to be what this gateway wrote)."""
    if not isinstance(value, dict):
        return False
    try:
        origins = value.get(ORIGINS_KEY) or {}
        for name in [*(k for k in value if k != ORIGINS_KEY), *origins]:
            decode_after(value, name)
    except (AttributeError, KeyError, TypeError, ValueError):
        return False
    return True


#: what encoding a frame body raises for a record it cannot carry (``Gateway._rewrite``)
_UNENCODABLE = (UnicodeEncodeError, cbor2.CBOREncodeError, TypeError, ValueError,
                OverflowError)


def _checkpoint_budget(store: FrameStore) -> int | None:
    """The largest checkpoint a source may store: a quarter of what a frame of ``store``
    may hold, so a frame carrying it keeps room for records (None: no limit)."""
    room = store.max_body_bytes(0, {})
    return None if room is None else max(0, room // 4)


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
