"""The hub's gateway ingest (``Ingest``): accepts gateways, applies their frames durably,
and owns the hub's one HTTP port.

On that port: ``/ws/gateway`` (wire protocol v1 and v2) and the status endpoints (``/healthz``,
``/api/stats``, ``/metrics``: ``edgegw.web.status``).  The whole hub (``edgegw.hub.Hub``,
``app.py``) adds the live fan-out, the dashboard and the history API to it.
Consumers (live state, fan-out) register with ``add_consumer`` and see every applied
frame's records, in the order frames were applied; after a restart the stored frames are
replayed to them first.

The consumers are off the ingest path's critical section: a gateway's applier checks
each frame's body (``check_frame``: every column of a columnar body against the layout),
commits durably and acknowledges; the committed frames go, in commit order, to a bounded
queue that one feeder task hands to the consumers (``_feeder``).  A columnar frame's
records (a tuple each) are built there, after the ACK, and only when there are consumers:
building them was about a third of the ingest path's CPU.  Why, and what it keeps:

* **Order, exactly once.**  Frames are appended to the queue synchronously right after
  their commit returns (commits run one at a time, ``HubStore.commit``), so the queue is
  in frame-id order; the one feeder takes them in that order, each once.  Gateway
  connect/disconnect events go through the same queue, so a consumer sees them in place
  between the records.  ``fed_id`` is the id of the last frame the consumers were fed:
  a checkpoint cut (``Checkpointer``) at ``fed_id`` is still exactly the frames up to it.
  A frame acknowledged but not yet fed when the hub stops is replayed at the next start,
  like any frame after the newest checkpoint.
* **Bounded.**  ``hub.live_queue_records`` caps the records waiting: an applier waits
  before its next commit while the queue is over it (``hub_live_queue_waits_total``), so
  the gateways' windows fill and they keep their frames; ``hub_live_queue_records`` and
  ``hub_live_apply_lag_seconds`` show how far the live state is behind the store.
* **Steps.**  A feeder step hands on what was queued when it began, whole frames for at
  most about ``FEED_STEP_SECONDS``, so the fan-out's ticks and the receivers run between
  steps and a backlog does not hold the thread for long (over the bound, up to
  ``FEED_STEP_RECORDS_BEHIND`` records: the appliers are waiting for it then).
* **Lag.**  ``lag()`` is how long the oldest frame received from a gateway has waited
  for the live state (its commit, then this queue); the fan-out holds its ticks back
  while it is over a UI interval (``LiveFanout.ingest_lag``): records before frames.
* The commit of the next frames (a worker thread) overlaps the live-state apply of the
  previous ones (the Trio thread), which is where ingest gains.

``hub.live_queue_records = 0`` feeds inside the applier's step, right after each commit,
as the hub did before (kept for comparison: ``bench/gateway_hub.py --compare``).
"""

from __future__ import annotations

import functools
import itertools
import logging
import operator
import sqlite3
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, Protocol, TypeVar

import cbor2
import trio

from .. import failpoints
from ..auth.hub import HubSecurity, token_digest, token_matches
from ..heartbeat import heartbeat
from ..metrics import AGE_BUCKETS, Metrics, internal_errors, report_internal_error
from ..protocol import (
    SUPPORTED_VERSIONS,
    CloseCode,
    Columns,
    Data,
    Declared,
    Duplicate,
    FrameError,
    Hello,
    HubConnection,
    IntervalSet,
    Positions,
    ProtocolError,
    Rows,
    check_frame,
    decompress_body,
)
from ..records import Record
from ..sighup import sighup_receiver
from ..taskgroups import reraise_meaningful
from ..web import (
    ConnectionClosed,
    HttpServer,
    MessageTooBig,
    Request,
    Response,
    WebSocket,
    install_status,
    json_response,
)
from .config import HubConfig
from .positions import KEEP_POSITIONS_EVERY_S, LAST_POSITIONS_WRITE_S, PositionsKeeper
from .refusals import RefusalLog, RefusedIds
from .registry import GatewayRegistry, GatewaySession
from .retention import RetentionClock
from .sighup import HubReloader
from .store import (
    FrameToApply,
    GatewayClaim,
    GatewaySuperseded,
    HubStore,
    IngestStore,
    LockTimeout,
    SessionEnded,
    StoreDamaged,
    StoreFull,
    StoreUnavailable,
    records_not_applied,
)

log = logging.getLogger("edgegw.hub")

GATEWAY_PATH = "/ws/gateway"

T = TypeVar("T")

#: how long one feeder step hands frames to the consumers before the other tasks (the
#: fan-out's ticks, the gateways' receivers and appliers) get a turn: at least one frame,
#: then whole frames until the step has used this much of the thread's CPU time.  The live
#: state applies a part result in ~5 us here, so a step is about 1,000 records; the budget
#: it replaced, 20,000 records a step, held the Trio thread ~100 ms under a backlog, and
#: every tick due meanwhile waited behind it.  CPU time, not wall time: on a busy machine
#: a wall-time budget shrank to little CPU while the ticks' steps did not, and the live
#: state fell seconds behind the store (bench/fanout.py, docs/performance.md).
FEED_STEP_SECONDS = 0.005
#: records a feeder step may take instead while the queue is over ``hub.live_queue_records``
#: (the gateways' appliers are waiting for room: ingest throughput is what counts then, and
#: steps of one frame made commits smaller and more frequent)
FEED_STEP_RECORDS_BEHIND = 20_000


class Consumer(Protocol):
    """What the ingest feeds.  A consumer may also have ``on_columns(gateway_id,
    first_rid, columns)``: a columnar frame then goes to it as its ``Columns`` (the same
    records, not built), and to ``on_records`` only a v1 frame's records."""

    def on_records(self, gateway_id: str, first_rid: int, records: list[Record]) -> None: ...
    def on_gateway(self, gateway_id: str, connected: bool, now: float) -> None: ...


#: a frame's records as the applier hands them on: checked, built when first asked for
Decoded = Columns | Rows


class Ingest:
    def __init__(self, config: HubConfig, metrics: Metrics | None = None,
                 store: IngestStore | None = None) -> None:
        """``store``: where frames are applied; default the single hub's SQLite store in
        ``hub.data_dir`` (a cluster node passes its ``ClusterStore``, docs/cluster.md)."""
        self.config = config
        self.metrics = metrics or Metrics()
        self.store: IngestStore = store if store is not None else HubStore(
            Path(config.hub.data_dir) / "hub.sqlite3", keep_bodies=config.hub.keep_frame_bodies)
        self.http = HttpServer(config.http, metrics=self.metrics, raise_fd_limit=True)
        # the access guard, the sign-in page, TLS (edgegw/auth, docs/security.md)
        self.security = HubSecurity(config, self.http, self.metrics)
        self.consumers: list[Consumer] = []
        self.connected = GatewayRegistry()
        self.handshaking: set[WebSocket] = set()  # upgraded, no WELCOME sent yet
        #: refused HELLOs per gateway id, in bounded memory (refusals.py)
        self.refused = RefusedIds(configured=lambda gw: gw in self.config.gateways)
        #: which refused HELLOs are logged (the first per address, id and reason, then
        #: a summary at most once a minute: refusals.py)
        self.refusal_log = RefusalLog()
        self.port: int | None = None
        self.started_at = time.monotonic()  # for uptime_s: a duration, not a date
        #: the date retention cuts by: the wall clock held back from forward steps; the
        #: first cut by age one prune interval after the start (a clock booted ahead is
        #: set back by then, usually)
        self.retention_clock = RetentionClock(settle_s=config.hub.prune_interval_s)
        #: what the start-up replay did (``/api/stats`` "replay")
        self.replayed: dict[str, Any] = {}
        self._prune_now = trio.Event()  # set when a commit takes the store over its bytes
        #: frames.id of the last frame handed to the consumers, and records handed so far
        self.fed_id = 0
        self.records_fed = 0
        #: set by a checkpointer: restores the consumers' state before the replay and
        #: returns the frame id it covers (only later frames are replayed)
        self.before_replay: Callable[[], Awaitable[int]] | None = None
        #: called with ``records_fed`` after each applied frame was handed on
        self.on_fed: Callable[[int], None] | None = None
        #: the newest frame id the pruner may delete (what checkpoints cover); None: any
        self.prune_limit: int | None = None
        #: deletes the lot and wafer archives written before a date (the history store's
        #: ``prune``), run by the pruner for ``hub.retain_history_days``; None: nothing to
        #: prune (a hub without an archive)
        self.history_pruner: Callable[[float], Awaitable[int]] | None = None
        #: deletes the alerts last written before a date, with the archives
        self.alerts_pruner: Callable[[float], Awaitable[int]] | None = None
        # Committed frames (and gateway events) for the consumers, in commit order:
        # (gateway, first_rid, records, frame id, committed at) or (gateway, connected, now)
        self._to_feed: deque[tuple[Any, ...]] = deque()
        self._to_feed_records = 0
        self._feed_wake = trio.Event()
        self._feed_room = trio.Event()  # set when the queue went below its limit
        # Each gateway connection's frames received and not yet committed: their arrival
        # times, oldest first (``lag``).
        self._arrivals: dict[int, deque[float]] = {}  # by id(): one per connection
        m = self.metrics
        self.m_frames = m.counter("hub_frames_applied_total", "data frames applied")
        self.m_records = m.counter("hub_records_applied_total", "records applied")
        self.m_dups = m.counter("hub_duplicate_frames_total", "duplicate frames dropped")
        self.m_dup_records = m.counter(
            "hub_frames_duplicate_records_total", "frames of a new seq whose records (by "
            "record id) were all applied already, dropped (a gateway bug)")
        self.m_records_cut = m.counter(
            "hub_duplicate_records_dropped_total", "records of a new seq whose record ids "
            "were applied already, cut from a frame applied in part (a gateway bug)")
        self.m_twice = m.counter(
            "hub_records_applied_twice_total", "records whose record ids were applied "
            "already, applied again in a frame that could not be cut (a gateway bug)")
        self.m_seq_reused = m.counter(
            "hub_seq_reused_records_dropped_total", "records of a frame whose seq was "
            "applied already with other records, dropped with it (a gateway reused the seq)")
        self.m_acked_lost = m.counter(
            "hub_acknowledged_frames_lost_total", "frames this hub acknowledged that its "
            "store no longer holds, by gateway: told by a gateway that names the frames it "
            "dropped (its HELLO or LOST), the others it lacks below its next_seq")
        self.m_refused = m.counter("hub_refused_total", "gateway connections refused")
        self.m_replaced = m.counter("hub_connections_replaced_total",
                                    "gateway connections closed for a newer one (4008)")
        self.m_other_epoch = m.counter(
            "hub_connections_replaced_other_epoch_total",
            "gateway connections closed for a newer one of another spool epoch (two "
            "gateways sharing an id, or a spool started afresh)")
        self.m_busy = m.counter("hub_busy_total", "probes and upgrades answered 503 (busy)")
        self.m_proto = m.counter("hub_protocol_errors_total", "connections closed for a fault")
        self.m_positions = m.counter(
            "hub_gateway_positions_total", "source positions from gateways, by outcome: "
            "written (kept, older: newer ones kept; not_written: the store could not write, "
            "tried again later), or not_applied (a frame up to theirs not applied: ignored)")
        self.m_resumed = m.counter(
            "hub_gateway_positions_handed_back_total", "gateways whose store started afresh "
            "given back the source positions the hub kept for them")
        self.m_rejected = m.counter("hub_frames_rejected_total", "invalid frames dead-lettered")
        self.m_bad_http = m.counter("hub_bad_http_requests_total", "malformed HTTP requests")
        self.m_pruned = m.counter("hub_frames_pruned_total",
                                  "applied frames deleted after the retention period")
        self.m_history_pruned = m.counter(
            "hub_archives_pruned_total", "lot and wafer archives deleted after "
            "hub.retain_history_days")
        self.m_alerts_pruned = m.counter(
            "hub_alerts_pruned_total", "alerts deleted after hub.retain_history_days")
        self.m_connected = m.gauge("hub_gateways_connected", "gateways connected now")
        self.m_full = m.counter("hub_store_full_total",
                                "commits that failed for a full disk (acknowledgements paused)")
        self.m_full_now = m.gauge("hub_store_full", "1 while the store cannot write (disk full)")
        self.m_damaged_now = m.gauge(
            "hub_store_damaged", "1 while SQLite reports hub.sqlite3 damaged, or its disk fails "
            "(acknowledgements paused until an operator repairs it)")
        self.m_unavailable = m.counter(
            "hub_store_unavailable_total", "commits that failed for want of the store's server "
            "(a cluster's PostgreSQL; acknowledgements paused)")
        self.m_frame_bytes = m.gauge("hub_frame_bytes", "bytes of stored (compressed) frame bodies")
        self.h_apply = m.histogram(
            "hub_frame_apply_seconds", "seconds from a data frame's arrival until it is applied "
            "and its ACK is due (queue, decode, durable commit): one per data frame")
        self.h_feed_lag = m.histogram(
            "hub_live_apply_lag_seconds", "seconds from a frame's durable commit until the "
            "live state has it (the live-state queue): one per data frame")
        self.m_feed_waits = m.counter(
            "hub_live_queue_waits_total", "commits that waited for room in the live-state "
            "queue (hub.live_queue_records): the live state was the bottleneck")
        self.m_feed_queue = m.gauge(
            "hub_live_queue_records", "records durably applied, not yet in the live state")
        self.h_age = m.histogram(
            "hub_record_age_seconds", "seconds from a record's creation (its ts) to its "
            "durable apply at the hub: one observation per record applied", AGE_BUCKETS)
        internal_errors(m)  # exported (as 0) before anything goes wrong
        m.add_collector(self._collect)
        self.http.on_bad_request = lambda reason: self.m_bad_http.inc()
        h = config.hub
        # A gateway must keep reading (docs/protocol.md section 7), so what the hub writes
        # to it -- PINGs go on while a commit holds the hub's reads back -- unacknowledged
        # for 2 x heartbeat means its host is gone: the kernel ends the connection then,
        # not after ~15 minutes of retransmits (docs/protocol.md, "Dead peers")
        self.http.add_ws_route(GATEWAY_PATH, self._gateway_endpoint,
                               max_message_size=h.max_frame_bytes,
                               admit=self._admit_gateway, give_up_after_s=2 * h.heartbeat_s)
        self.http.add_route("GET", GATEWAY_PATH, self._gateway_probe)
        #: more sections of ``/api/stats``, by name (the whole hub adds its live state's)
        self.stats_sections: dict[str, Callable[[], Any]] = {}
        #: more reasons for a "degraded" /healthz than the store's (the history store's)
        self.health_problems: list[Callable[[], str | None]] = []
        #: SIGHUP: the TLS files and the config file read again (edgegw/hub/sighup.py)
        self.reloader = HubReloader(self)
        install_status(self.http, health=self.health, stats=self.stats, metrics=self.metrics)

    def _collect(self) -> None:
        self.m_connected.set(len(self.connected))
        self.m_full_now.set(int(self.store.full))
        self.m_damaged_now.set(int(getattr(self.store, "damaged", None) is not None))
        self.m_frame_bytes.set(self.store.frame_bytes)
        self.m_feed_queue.set(self._to_feed_records)

    def add_consumer(self, consumer: Consumer) -> None:
        self.consumers.append(consumer)

    # -- lifecycle --
    async def run(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        # SIGHUP taken from here on: one during the store's opening and the replay is a
        # reload once the hub serves, never the end of the process
        with sighup_receiver() as signals:
            await self._run(signals, task_status)

    async def _run(self, signals: AsyncIterator[int] | None,
                   task_status: trio.TaskStatus[int]) -> None:
        await self.store.open()
        try:
            if self.consumers:
                after = await self.before_replay() if self.before_replay is not None else 0
                await self._replay(after)
            async with trio.open_nursery() as nursery:
                self.security.log_warnings()
                await nursery.start(self.reloader.watch, signals)
                listeners = await nursery.start(self.http.serve, self.config.hub.listen,
                                                self.config.hub.port)
                self.port = listeners[0].socket.getsockname()[1]
                log.info("hub listening on %s:%s (%s)", self.config.hub.listen, self.port,
                         "https" if self.security.tls else "http")
                h = self.config.hub
                if h.retain_frames_hours > 0 or h.retain_frames_mb > 0:
                    nursery.start_soon(self._pruner)
                nursery.start_soon(self._feeder)
                nursery.start_soon(self._refusal_summaries)
                task_status.started(self.port)
        finally:
            with trio.CancelScope(shield=True):
                await self.store.close()

    async def _refusal_summaries(self) -> None:
        """Log the refused-HELLO summaries that no later refusal carried (a gateway that
        stopped retrying still gets its last line); about once a second, nothing to do
        mostly."""
        while True:
            await trio.sleep(min(1.0, self.refusal_log.interval_s))
            self.refusal_log.log_due(log, trio.current_time())

    async def _replay(self, after: int = 0) -> None:
        """Feed the stored frames after frame id ``after`` to the consumers, oldest first
        (state rebuild)."""
        max_records = self.config.hub.max_records_per_frame
        self.fed_id = max(self.fed_id, after)

        def decode(frame_id: int, gw: str, _epoch: str, _seq: int, _rid: int, body: bytes
                   ) -> tuple[int, str, int, Decoded] | None:
            # A stored frame may hold either layout (it is stored as received).  Its
            # records are built here, in the store's worker thread, not in the feed.
            try:
                first_rid, decoded = check_frame(body, max_records)
                decoded.records()
            except (FrameError, ProtocolError):
                return None
            except Exception:  # one undecodable stored frame must not stop the start
                report_internal_error(self.metrics, "hub_replay", log,
                                      "decoding a stored frame of gateway %s", gw)
                return None
            return frame_id, gw, first_rid, decoded

        t0 = time.perf_counter()
        n_frames = n_records = 0
        async for batch in self.store.stored_frames(decode, after):
            for frame_id, gw, first_rid, decoded in batch:
                self._feed(gw, first_rid, decoded, frame_id)
                n_records += decoded.n
            n_frames += len(batch)
        self.replayed = {"after_frame": after, "frames": n_frames, "records": n_records,
                         "seconds": round(time.perf_counter() - t0, 3)}
        log.info("replayed %d frame(s), %d record(s) after frame %d in %.2f s", n_frames,
                 n_records, after, time.perf_counter() - t0)

    def _over_bytes(self) -> bool:
        limit = self.config.hub.retain_frames_mb
        return limit > 0 and self.store.frame_bytes > limit * 1e6

    async def _pruner(self) -> None:
        """Keep the frame table to ``retain_frames_hours`` and ``retain_frames_mb``: a hub
        runs for months.  Runs every ``prune_interval_s``, and at once when a commit takes
        the stored bodies over the byte limit."""
        h = self.config.hub
        while True:
            # by applied_at dates, but "now" never jumps with a forward step of the wall
            # clock (retention.py): that would delete frames of the last days early
            older = (self.retention_clock.cut_off(h.retain_frames_hours * 3600)
                     if h.retain_frames_hours else 0.0)
            max_bytes = int(h.retain_frames_mb * 1e6) if h.retain_frames_mb else None
            try:
                n = await self.store.prune(older, max_bytes, self.prune_limit)
            except (StoreFull, StoreUnavailable) as exc:  # deleting needs WAL space too,
                # and a damaged file or failing disk refuses it as it refuses commits (whose
                # pause the health and gauges report): next time
                log.warning("pruning old frames: %s", exc)
            except Exception:  # (a locked or failing database) a boundary: try next time
                report_internal_error(self.metrics, "hub_prune", log, "pruning old frames")
            else:
                if n:
                    self.m_pruned.inc(n)
                    log.info("pruned %d frame(s) (older than %g h or over %g MB)", n,
                             h.retain_frames_hours, h.retain_frames_mb)
            await self._prune_history()
            self._prune_now = trio.Event()
            with trio.move_on_after(h.prune_interval_s):
                await self._prune_now.wait()

    async def _prune_history(self) -> None:
        """Delete the archives and alerts older than ``retain_history_days`` (by the date
        they were written, the same held-back clock as the frames': retention.py)."""
        days = self.config.hub.retain_history_days
        cut = self.retention_clock.cut_off(days * 86400) if days else 0.0
        if not cut:
            return
        for pruner, what, counter in (
                (self.history_pruner, "lot and wafer archive(s)", self.m_history_pruned),
                (self.alerts_pruner, "alert(s)", self.m_alerts_pruned)):
            if pruner is None:
                continue
            try:
                n = await pruner(cut)
            except (OSError, sqlite3.Error, StoreUnavailable) as exc:  # locked, full: next time
                log.warning("pruning old %s: %s", what, exc)
            except Exception:  # a boundary: the next round tries again
                report_internal_error(self.metrics, "hub_prune", log, f"pruning old {what}")
            else:
                if n:
                    counter.inc(n)
                    log.info("pruned %d %s written over %g days ago", n, what, days)

    # -- HTTP --
    def health(self) -> tuple[bool, dict[str, Any]]:
        body: dict[str, Any] = {"status": "ok",
                                "uptime_s": round(time.monotonic() - self.started_at, 1),
                                "gateways_connected": len(self.connected),
                                **self.security.health()}
        problems = [p for p in (self.store.health_problem(),
                                *(check() for check in self.health_problems)) if p]
        if problems:
            # Still 200: the hub is alive and the gateways keep their data; a monitor
            # alerts on the status (a restart would not free the disk, nor start PostgreSQL).
            body.update(status="degraded", detail="; ".join(problems))
        return True, body

    def stats(self) -> dict[str, Any]:
        gateways: dict[str, Any] = {}
        names = set(self.store.stats) | set(self.connected) | set(self.refused)
        for gw in sorted(names):
            st = self.store.stats.get(gw)
            gateways[gw] = {
                "connected": gw in self.connected,
                "epoch": st.epoch if st else None,
                "frames_applied": st.frames_applied if st else 0,
                "records_applied": st.records_applied if st else 0,
                "last_seq": st.last_seq if st else 0,
                "duplicates_dropped": st.duplicates_dropped if st else 0,
                "frames_rejected": st.frames_rejected if st else 0,
                "frames_lost": st.frames_lost if st else 0,
                "refused": self.refused.get(gw, 0),
                "last_seen": st.last_seen if st else None,
                "rtt_ms": session.rtt_ms if (session := self.connected.get(gw)) else None,
            }
        out: dict[str, Any] = {
            "gateways": gateways, "refused": self.refused.summary(), "replay": self.replayed,
            "store": {"frame_bytes": self.store.frame_bytes, "full": self.store.full},
            "live_queue": {"records": self._to_feed_records,
                           "frames": sum(1 for e in self._to_feed if len(e) != 3),
                           "fed_frame_id": self.fed_id, "records_fed": self.records_fed},
            "metrics": self.metrics.as_dict()}
        for name, section in self.stats_sections.items():
            out[name] = section()
        return out

    # -- gateways --
    def _admit_gateway(self, request: Request) -> Response | None:
        """An upgrade on the gateway path: refused (429) from an address with too many
        failed handshakes, or (503) while the hub sheds load."""
        return self.security.gateway_limited(request) or self._busy_response(request)

    def _busy_response(self, request: Request) -> Response | None:
        """Load shedding: 503 + Retry-After while too many handshakes are under way."""
        h = self.config.hub
        if len(self.handshaking) < h.max_pending_handshakes:
            return None
        self.m_busy.inc()
        return Response(503, b'{"status":"busy"}',
                        headers=[("retry-after", f"{h.busy_retry_after_s:g}")])

    async def _gateway_probe(self, request: Request) -> Response:
        """A gateway's readiness probe: a plain GET of the gateway path (protocol.md 7)."""
        return self._busy_response(request) or json_response({"status": "ready"})

    @property
    def versions(self) -> tuple[int, ...]:
        """The protocol versions this hub speaks (``hub.max_protocol_version``)."""
        top = self.config.hub.max_protocol_version
        return tuple(v for v in SUPPORTED_VERSIONS if v <= top)

    def _check_hello(self, hello: Hello, request: Request) -> tuple[int, str] | None:
        if not set(hello.versions) & set(self.versions):
            return (CloseCode.UNSUPPORTED_VERSION,
                    f"unsupported protocol version(s) {_offered(hello.versions)}; "
                    f"this hub speaks {list(self.versions)}")
        auth = self.config.gateways.get(hello.gateway_id)
        if auth is None:
            return CloseCode.UNAUTHORIZED, f"unknown gateway id {hello.gateway_id!r}"
        if not token_matches(auth, hello.token):
            return CloseCode.UNAUTHORIZED, f"wrong token for gateway {hello.gateway_id!r}"
        problem = self.security.gateway_cert_problem(request, hello.gateway_id)
        if problem is not None:
            return CloseCode.UNAUTHORIZED, problem
        return None

    async def handle_gateway(self, ws: WebSocket, request: Request) -> None:
        """One gateway connection, and a failure boundary: whatever happens in it ends it
        with a documented close code and never reaches the rest of the hub.  A fault of
        the peer closes with its protocol code; anything unexpected (a bug, a store
        failure) is logged once, counted in ``internal_errors_total{where="gateway_connection"}``
        and closes with 1011, and the gateway retries later."""
        try:
            await self._gateway_connection(ws, request)
        except Exception:
            report_internal_error(self.metrics, "gateway_connection", log,
                                  "gateway connection from %s", request.remote)
            await ws.aclose(CloseCode.INTERNAL_ERROR, "internal error")
            return
        if ws.closed is None:  # every path above closes: reaching here is a bug
            report_internal_error(self.metrics, "gateway_connection", log,
                                  "gateway connection from %s ended without a close",
                                  request.remote)
            await ws.aclose(CloseCode.INTERNAL_ERROR, "internal error")

    async def _gateway_connection(self, ws: WebSocket, request: Request) -> None:
        h = self.config.hub
        conn = HubConnection(heartbeat=h.heartbeat_s, max_message_bytes=h.max_frame_bytes,
                             max_records=h.max_records_per_frame, max_holes=h.max_holes,
                             now=trio.current_time(),
                             compression=() if h.compression == "off" else (h.compression,),
                             versions=self.versions)
        gw = "?"
        try:
            with trio.fail_after(h.hello_timeout_s):
                data = await ws.get_message()
            conn.receive(data, trio.current_time())  # anything but a HELLO raises (4004)
            hello = conn.hello_msg
            assert hello is not None
            gw = hello.gateway_id
            problem = self._check_hello(hello, request)
            if problem is not None:
                code, reason = problem
                if code == CloseCode.UNAUTHORIZED:
                    self.security.gateway_failed(request)
                self.refusal_log.log(log, gw, request.remote, _reason_key(code), reason,
                                     trio.current_time())
                self.refused.add(gw)
                self.m_refused.inc(reason=_reason_key(code))
                await ws.send_message(conn.refuse(code, reason, trio.current_time()))
                await ws.aclose(code, reason)
                return
            session = GatewaySession(gw, request.remote, hello.epoch, token_digest(hello.token))
            old = self.connected.claim(session)  # newest wins: the old one is cancelled
            if old is not None:
                self.m_replaced.inc()
                if old.epoch != hello.epoch:
                    # the sequence spaces stay apart (one applied set per epoch), but two
                    # gateway processes sharing an id would mix two testers' records under
                    # one name: an operator must hear of it, not only of a reconnect
                    self.m_other_epoch.inc()
                    log.error("gateway %s: connection from %s (spool epoch %s) replaced by one "
                              "from %s of another spool epoch, %s: two gateways configured "
                              "with this id, or its spool started afresh", gw, old.remote,
                              old.epoch, request.remote, hello.epoch)
                else:
                    log.warning("gateway %s: connection from %s replaced by a newer one "
                                "from %s", gw, old.remote, request.remote)
        except trio.TooSlowError:
            self.m_proto.inc(reason="hello_timeout")
            log.warning("gateway connection from %s: no HELLO within %g s", request.remote,
                        h.hello_timeout_s)
            await ws.aclose(CloseCode.HELLO_TIMEOUT, "no HELLO within the handshake timeout")
            return
        except ProtocolError as exc:
            self.m_proto.inc(reason=_reason_key(exc.code))
            log.warning("gateway connection from %s: closing (%d): %s", request.remote,
                        exc.code, exc.reason)
            await ws.aclose(exc.code, exc.reason)
            return
        except MessageTooBig as exc:  # the WebSocket layer has closed it with 1009
            self.m_proto.inc(reason="too_big")
            log.warning("gateway connection from %s: closed (1009): %s", request.remote, exc)
            return
        except ConnectionClosed:
            return
        try:
            with session.cancel_scope:
                # wait until a replaced session's applier has stopped: WELCOME then holds
                # everything it committed (edgegw/hub/registry.py)
                async with self.connected.owner(gw):
                    claim = await self._welcome(ws, conn, session, hello)
                    await self._serve_gateway(ws, conn, gw, hello.epoch, claim.generation,
                                              session, claim.rids)
            if session.replaced:
                await ws.aclose(CloseCode.REPLACED, "replaced by a newer connection")
            elif session.revoked is not None:
                await ws.aclose(CloseCode.UNAUTHORIZED, session.revoked)
        except GatewaySuperseded:
            # a newer connection of the gateway was claimed on another node of a cluster
            # (the store's generation fence refused this one's commit): as a takeover here
            self.m_replaced.inc()
            log.warning("gateway %s: connection from %s superseded by a newer one on another "
                        "node", gw, request.remote)
            await ws.aclose(CloseCode.REPLACED, "replaced by a newer connection")
        except ProtocolError as exc:
            self.m_proto.inc(reason=_reason_key(exc.code))
            log.warning("gateway %s: closing (%d): %s", gw, exc.code, exc.reason)
            await ws.aclose(exc.code, exc.reason)
        except MessageTooBig as exc:  # the WebSocket layer has closed it with 1009
            self.m_proto.inc(reason="too_big")
            log.warning("gateway %s: closed (1009): %s", gw, exc)
        except ConnectionClosed as exc:
            log.info("gateway %s disconnected: %s", gw, exc)
        finally:
            if self.connected.release(session):  # not if a newer session took over
                self._gateway_event(gw, False)

    async def _welcome(self, ws: WebSocket, conn: HubConnection, session: GatewaySession,
                       hello: Hello) -> GatewayClaim:
        """Claim the gateway in the store and send WELCOME; the claim (its generation:
        what the connection's commits are fenced with in a cluster, 0 in a single hub)."""
        gw = hello.gateway_id
        claim = await self._until_written(gw, lambda: self.store.claim(gw, hello.epoch))
        generation, applied = claim.generation, claim.applied
        session.generation = generation
        resume = await self._positions_for(gw, hello) if hello.resume else None
        welcome = conn.accept(applied, trio.current_time(), resume)
        await self._declare_lost(gw, hello.epoch, hello.next_seq, conn.declared_lost,
                                 conn.declared_dropped, generation, at_hello=True)
        await ws.send_message(welcome)
        self.handshaking.discard(ws)
        log.info("gateway %s connected from %s (protocol v%s, epoch %s, next seq %d)", gw,
                 session.remote, conn.version, hello.epoch, hello.next_seq)
        self._gateway_event(gw, True)
        return claim

    async def _positions_for(self, gw: str, hello: Hello) -> dict[str, Any]:
        """The source positions kept for a gateway whose store started afresh (its HELLO
        asks: docs/protocol.md section 4.1); empty when none are kept."""
        kept = await self._until_written(gw, lambda: self.store.load_positions(gw))
        if kept is None:
            log.info("gateway %s: its store started afresh (epoch %s); no source positions "
                     "kept for it", gw, hello.epoch)
            return {}
        try:
            positions = cbor2.loads(kept.positions)
            if not isinstance(positions, dict):
                raise TypeError("not a map")
        except Exception:  # written by this hub after checking them: a damaged row
            report_internal_error(self.metrics, "gateway_positions", log,
                                  "reading the source positions kept for gateway %s", gw)
            return {}
        self.m_resumed.inc()
        log.warning("gateway %s: its store started afresh (epoch %s): handing back its source "
                    "positions as of frame %d of epoch %s, so its sources go on from there "
                    "instead of sending again what this hub has", gw, hello.epoch, kept.seq,
                    kept.epoch)
        return positions

    def _told_positions(self, conn: HubConnection, gw: str, told: Positions,
                        keeper: PositionsKeeper) -> None:
        """A POSITIONS, once every frame received before it is committed: to be kept when
        every frame of the epoch up to its seq is applied (what makes them true: each
        record the sources made up to there is in those frames), ignored otherwise."""
        if conn.applied_set.watermark() < told.seq:
            self.m_positions.inc(outcome="not_applied")
            log.debug("gateway %s: positions of frame %d ignored: frames below it are not "
                      "applied", gw, told.seq)
            return
        keeper.told(told)

    async def _write_positions(self, gw: str, epoch: str, keeper: PositionsKeeper,
                               generation: int) -> None:
        """Write the positions ``keeper`` holds (the newest told): one write for all told
        since the last, so a gateway telling them often costs the store little.  Tried
        once: a store that cannot write now (a full disk, PostgreSQL away) keeps them
        waiting for the next try, and the frames behind them are not held up -- their own
        commit pauses on it as ever."""
        told = keeper.take(trio.current_time())
        if told is None:
            return
        try:
            kept = await self.store.save_positions(gw, epoch, told.seq,
                                                   cbor2.dumps(told.positions), generation)
        except (StoreFull, StoreUnavailable, LockTimeout, SessionEnded):
            if keeper.pending is None:
                keeper.told(told)
            self.m_positions.inc(outcome="not_written")
            return
        self.m_positions.inc(outcome="kept" if kept else "older")

    async def _last_positions(self, gw: str, epoch: str, keeper: PositionsKeeper,
                              generation: int) -> None:
        """The connection ended (or was replaced): the positions still held are written
        now -- a gateway that died is the one that may need them next (bounded: a store
        that does not answer keeps the older ones)."""
        if keeper.pending is None:
            return
        with trio.CancelScope(shield=True), trio.move_on_after(LAST_POSITIONS_WRITE_S):
            try:
                await self._write_positions(gw, epoch, keeper, generation)
            except Exception:  # the store failing as the connection ends: older ones stay
                report_internal_error(self.metrics, "gateway_positions", log,
                                      "writing the last source positions of gateway %s", gw)

    def supersede(self, gateway: str, generation: int) -> bool:
        """A cluster node heard that ``gateway`` was claimed elsewhere with ``generation``:
        close this node's connection of it (4008) if it is older.  Only promptness rests
        on this (an idle connection would otherwise wait for its heartbeat to expire):
        the store's fence refuses the old connection's next commit anyway.  True if a
        connection was closed."""
        session = self.connected.get(gateway)
        if session is None or session.generation == 0 or session.generation >= generation:
            return False
        self.m_replaced.inc()
        log.warning("gateway %s: connection from %s superseded by a newer one on another node "
                    "(generation %d < %d)", gateway, session.remote, session.generation,
                    generation)
        session.replaced = True
        session.cancel_scope.cancel()
        return True

    async def _gateway_endpoint(self, ws: WebSocket, request: Request) -> None:
        self.handshaking.add(ws)  # counted for load shedding until WELCOME is sent
        try:
            await self.handle_gateway(ws, request)
        finally:
            self.handshaking.discard(ws)

    def _gateway_event(self, gw: str, connected: bool) -> None:
        if self.config.hub.live_queue_records:  # in its place among the queued frames
            self._to_feed.append((gw, connected, time.time()))
            self._feed_wake.set()
        else:
            self._on_gateway(gw, connected, time.time())

    def _on_gateway(self, gw: str, connected: bool, now: float) -> None:
        for c in self.consumers:
            try:
                c.on_gateway(gw, connected, now)
            except Exception:  # a consumer's bug must not end the connection
                report_internal_error(self.metrics, "hub_consumer", log,
                                      "%s.on_gateway(%r, %s)", type(c).__name__, gw, connected)

    def _feed(self, gw: str, first_rid: int, decoded: Decoded, frame_id: int) -> None:
        """Hand one applied frame's records to every consumer.  The frame is durably
        applied already; a consumer that fails on it misses it (counted), nothing else.
        Frames are fed in frame id order (queued right after their commit, commits one at
        a time, one feeder), which is what makes ``fed_id`` a consistent checkpoint
        position.  A columnar frame's records are built here, after its ACK, and only
        when some consumer will read them: a consumer with ``on_columns(gateway_id,
        first_rid, columns)`` (the live state) is given the ``Columns`` instead."""
        self.fed_id = frame_id
        self.records_fed += decoded.n
        records: list[Record] | None = None
        columnar = type(decoded) is Columns
        for c in self.consumers:
            # A consumer that reads columns (the live state: ``on_columns``) gets the
            # columnar frame itself, and its records are built only for the others.
            on_columns = getattr(c, "on_columns", None) if columnar else None
            if on_columns is None and records is None:
                try:
                    records = decoded.records()  # checked at its arrival: cannot fail
                except Exception:  # a bug: the consumers miss this frame, nothing else does
                    report_internal_error(self.metrics, "hub_consumer", log,
                                          "building the records of gateway %s, rids from %d",
                                          gw, first_rid)
                    records = []
            if on_columns is None and decoded.n and not records:
                continue
            try:
                if on_columns is not None:
                    on_columns(gw, first_rid, decoded)
                else:
                    c.on_records(gw, first_rid, records or [])
            except Exception:
                report_internal_error(self.metrics, "hub_consumer", log,
                                      "%s.%s(gateway %s, rids %d..%d)", type(c).__name__,
                                      "on_records" if on_columns is None else "on_columns",
                                      gw, first_rid, first_rid + decoded.n - 1)
        if self.on_fed is not None:
            self.on_fed(self.records_fed)

    def _queue_feed(self, gw: str, first_rid: int, records: Decoded | list[Record],
                    frame_id: int) -> None:
        """A frame just committed, for the feeder (synchronously after its commit: the
        queue stays in commit order).  With no consumers (the ingest alone) there is
        nothing to queue for: it counts as fed at once."""
        decoded = Rows(records) if isinstance(records, list) else records
        if not self.config.hub.live_queue_records or not (self.consumers or self.on_fed):
            self._feed(gw, first_rid, decoded, frame_id)
            return
        self._to_feed.append((gw, first_rid, decoded, frame_id, trio.current_time()))
        self._to_feed_records += decoded.n
        self._feed_wake.set()

    async def _room_to_feed(self) -> None:
        """Wait while the live-state queue is over its limit (before a commit)."""
        limit = self.config.hub.live_queue_records
        if self._to_feed_records <= limit:
            return
        self.m_feed_waits.inc()
        while self._to_feed_records > limit:
            if self._feed_room.is_set():
                self._feed_room = trio.Event()
            await self._feed_room.wait()

    def drain_feed(self) -> None:
        """Hand everything queued to the consumers now (a clean stop's final checkpoint
        must hold every acknowledged frame: with ``keep_frame_bodies = false`` nothing
        could replay them)."""
        queue = self._to_feed
        while queue:
            self._feed_entry(queue.popleft())
        self._feed_room.set()

    def lag(self) -> float:
        """Seconds the oldest frame received from a gateway has waited and is not yet in
        the live state (its commit, then the live-state queue); 0 when none waits.  The
        fan-out holds its ticks back while this is long (``LiveFanout.ingest_lag``)."""
        now = trio.current_time()
        oldest = min((a[0] for a in self._arrivals.values() if a), default=now)
        for entry in self._to_feed:  # the oldest frame queued for the live state
            if len(entry) != 3:
                oldest = min(oldest, entry[4])  # committed at (it arrived before)
                break
        return now - oldest

    def _feed_entry(self, entry: tuple[Any, ...]) -> int:
        """One queued entry to the consumers: a gateway event (3 fields) or a committed
        frame; the number of records it held."""
        if len(entry) == 3:
            self._on_gateway(*entry)
            return 0
        gw, first_rid, decoded, frame_id, _ = entry
        self._feed(gw, first_rid, decoded, frame_id)
        self._to_feed_records -= decoded.n
        return decoded.n

    async def _feeder(self) -> None:
        """Hand the committed frames to the consumers, in commit order, a step at a time."""
        queue = self._to_feed
        limit = self.config.hub.live_queue_records
        while True:
            if not queue:
                self._feed_wake = trio.Event()
                await self._feed_wake.wait()
            now = trio.current_time()
            clock = time.thread_time
            until = clock() + FEED_STEP_SECONDS
            behind = self._to_feed_records > limit
            budget = FEED_STEP_RECORDS_BEHIND
            # What was queued when this step began, at most (what comes meanwhile waits for
            # the next step), and whole frames only until the step's time (or, behind, its
            # records) is used up.
            for _ in range(len(queue)):
                entry = queue.popleft()
                n = self._feed_entry(entry)
                if len(entry) != 3:
                    self.h_feed_lag.observe(now - entry[4])  # since its commit
                    budget -= n or 1
                    if budget <= 0 if behind else clock() >= until:
                        break
            if self._to_feed_records <= limit:
                self._feed_room.set()
            await trio.lowlevel.checkpoint()  # the ticks and the receivers run between steps

    async def _serve_gateway(self, ws: WebSocket, conn: HubConnection, gw: str,
                             epoch: str, generation: int = 0,
                             session: GatewaySession | None = None,
                             rids: IntervalSet | None = None) -> None:
        """Receive, apply and acknowledge until the connection ends, which it only does by
        an exception: the peer's fault (ProtocolError, MessageTooBig), the peer going away
        (ConnectionClosed), or a bug.

        While its reads are held back (the apply queue full behind a commit) the gateway's
        silence is not judged: what it sent waits unread, and a gateway that is only
        frozen (SIGSTOP) or whose host vanished looks the same as a busy one.  TCP still
        tells a gateway whose process is gone: the hub's PINGs go on, the gateway's
        kernel resets the connection and the next PING's write fails.  The gateway is then
        reported gone at once (``link_lost``), though the connection's tasks end only when
        a commit in the store's worker thread returns (it cannot be cancelled): before, a
        gateway that died while a commit hung was shown connected until the commit
        returned (docs/reliability.md, "Backpressure is not silence")."""
        # each frame with its arrival time (hub_frame_apply_seconds)
        # (a LOST's ``Declared`` goes the same way: recorded after the frames before it)
        send, receive = trio.open_memory_channel[tuple[Data | Declared | Positions, float]](
            self.config.hub.apply_queue_frames)
        arrivals: deque[float] = deque()  # of the frames not yet committed (``lag``)

        async def queue_frame(item: tuple[Data | Declared | Positions, float]) -> None:
            """Into the apply queue; while it is full (a slow commit, a full live-state
            queue) nothing is read, and what the gateway sends meanwhile -- frames, PINGs
            -- waits unread: that wait is not its silence (4005 would close a healthy
            gateway exactly when the hub is busiest; docs/protocol.md section 7)."""
            try:
                send.send_nowait(item)
            except trio.WouldBlock:
                pass
            else:
                await trio.lowlevel.checkpoint()  # as send() would: the others run too
                return
            conn.reading_paused(trio.current_time())
            try:
                await send.send(item)
            finally:
                conn.reading_resumed(trio.current_time())

        # The receiver's PONG, written by ``answerer``: at most one waits, a newer PING's
        # supersedes it (docs/protocol.md section 7).  Written inline, a PONG behind full
        # socket buffers (a gateway busy, not reading) stopped the reading of its frames.
        pong: list[bytes] = []
        pong_ready = trio.Event()

        async def answerer() -> None:
            nonlocal pong_ready
            while True:
                await pong_ready.wait()
                pong_ready = trio.Event()
                reply = pong.pop()
                await ws.send_message(reply)

        async def receiver() -> None:
            try:
                while True:
                    data = await ws.get_message()
                    events, reply = conn.receive(data, trio.current_time())
                    if reply is not None:
                        pong[:] = [reply]  # the newest PING's: its t gives the round trip
                        pong_ready.set()
                    for ev in events:
                        if isinstance(ev, Data):
                            arrival = trio.current_time()
                            arrivals.append(arrival)
                            await queue_frame((ev, arrival))
                        elif isinstance(ev, Declared | Positions):
                            await queue_frame((ev, trio.current_time()))
                        elif isinstance(ev, Duplicate):
                            self.store.count_duplicate(gw)
                            self.m_dups.inc()
                            if rids is not None:
                                self._check_duplicate(gw, epoch, conn, ev.data, rids)
            finally:
                # Closed synchronously, not with ``async with send``: its exit is a
                # checkpoint, and the applier -- woken by the close, its loop ended --
                # cancelled this task there, so a Cancelled replaced the fault being raised
                # and the connection ended as if normally: closed with 1000, no reason, no
                # log line, in about half the tries (issue 10).  See docs/reliability.md.
                send.close()

        def link_lost() -> None:
            # the gateway no longer counts as connected; its owner lock stays held until
            # the applier has stopped, so a reconnect's WELCOME still waits for that
            if session is not None and self.connected.release(session):
                self._gateway_event(gw, False)

        async def beat() -> None:
            try:
                await heartbeat(conn, ws.send_message, note_rtt)
            except ConnectionClosed:  # a PING's write found the link gone
                link_lost()
                raise

        def note_rtt() -> None:
            session = self.connected.get(gw)
            if session is not None and conn.rtt is not None:
                session.rtt_ms = round(conn.rtt * 1000, 2)

        expected = (ProtocolError, MessageTooBig, ConnectionClosed, GatewaySuperseded)
        self._arrivals[id(arrivals)] = arrivals
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(receiver)
                nursery.start_soon(answerer)
                nursery.start_soon(beat)
                await self._applier(ws, conn, gw, epoch, receive, generation, arrivals)
                nursery.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            # A bug anywhere in the connection outranks the peer's fault: it must be seen.
            bugs = group.subgroup(lambda e: isinstance(e, Exception) and not isinstance(
                e, (BaseExceptionGroup, *expected)))
            if bugs is not None:
                raise bugs from None
            reraise_meaningful(group, *expected)
        finally:
            del self._arrivals[id(arrivals)]

    async def _applier(self, ws: WebSocket, conn: HubConnection, gw: str, epoch: str,
                       receive: trio.MemoryReceiveChannel[
                           tuple[Data | Declared | Positions, float]],
                       generation: int = 0, arrivals: deque[float] | None = None) -> None:
        """Apply the connection's frames, LOSTs and POSITIONS in the order they came."""
        keeper = PositionsKeeper(KEEP_POSITIONS_EVERY_S)
        try:
            await self._apply_frames(ws, conn, gw, epoch, receive, generation, arrivals,
                                     keeper)
        finally:
            await self._last_positions(gw, epoch, keeper, generation)

    async def _apply_frames(self, ws: WebSocket, conn: HubConnection, gw: str, epoch: str,
                            receive: trio.MemoryReceiveChannel[
                                tuple[Data | Declared | Positions, float]],
                            generation: int, arrivals: deque[float] | None,
                            keeper: PositionsKeeper) -> None:
        max_records = self.config.hub.max_records_per_frame
        columnar = (conn.version or 1) >= 2  # v1 connections send rows only
        typed = (conn.version or 1) >= 3  # typed float columns: v3 only
        # a LOST or a POSITIONS that came behind the frames being committed
        after: Declared | Positions | None = None
        while True:
            if isinstance(after, Declared):
                await self._record_lost(ws, conn, gw, epoch, after, generation)
            elif isinstance(after, Positions):
                self._told_positions(conn, gw, after, keeper)
            after = None
            if keeper.due(trio.current_time()):
                await self._write_positions(gw, epoch, keeper, generation)
            first = None
            try:
                # positions held are written when due even if nothing more comes
                with trio.move_on_at(keeper.due_at):
                    first = await receive.receive()
            except trio.EndOfChannel:
                return
            if first is None:
                continue
            head, received = first
            if not isinstance(head, Data):
                after = head
                continue
            frames = [(head, received)]
            while len(frames) < 256:  # group commit: whatever else is already waiting
                try:
                    item = receive.receive_nowait()
                except (trio.WouldBlock, trio.EndOfChannel):
                    break
                head, received = item
                if not isinstance(head, Data):
                    after = head  # once the frames before it are committed
                    break
                frames.append((head, received))
            good: list[tuple[FrameToApply, int, Decoded]] = []
            bad: list[tuple[FrameToApply, str]] = []
            for d, _ in frames:
                try:
                    # checked, not built: a columnar frame's records are built after the
                    # ACK, by the feeder, and only for consumers (``_feed``)
                    first_rid, decoded = check_frame(d.body, max_records, columnar=columnar,
                                                      typed=typed)
                except FrameError as exc:
                    bad.append((FrameToApply(gw, epoch, d.seq, 0, 0, d.body), str(exc)))
                    continue
                except ProtocolError:
                    raise
                except Exception:  # a decoding bug: this frame is skipped, not the link
                    report_internal_error(self.metrics, "gateway_frame", log,
                                          "decoding frame %d of gateway %s", d.seq, gw)
                    bad.append((FrameToApply(gw, epoch, d.seq, 0, 0, d.body),
                                "internal error while decoding the frame"))
                    continue
                good.append((FrameToApply(gw, epoch, d.seq, first_rid, decoded.n, d.body,
                                          decoded=decoded), first_rid, decoded))
            # frames already applied (by an earlier connection of this gateway) are skipped
            # by the commit itself: counted as duplicates and acked, not handed on again
            to_apply = [g[0] for g in good]
            await self._room_to_feed()
            skipped = await self._until_written(
                gw, functools.partial(self.store.commit, to_apply, {gw: generation},
                                      rejected=bad))
            failpoints.hit("hub.after_commit")
            now = trio.current_time()
            wall = time.time()
            by_rid = 0
            for f, _, _ in good:
                if f.all_seen or (f.records_seen and (f.gateway, f.epoch, f.seq) not in skipped):
                    by_rid += self._records_seen(f)
            for _ in range(len(skipped) - by_rid):
                self.store.count_duplicate(gw)
                self.m_dups.inc()
            for f, _, _ in good:
                if f.seq_reused:
                    self._seq_reused(gw, epoch, f.seq, f.first_rid, f.n_records, f.seq_reused)
            for f, _, _ in good:
                if (f.gateway, f.epoch, f.seq) not in skipped:
                    # (as committed: a frame applied in part may have been cut)
                    first_rid, decoded = f.first_rid, f.decoded or Rows(f.record_list() or [])
                    self.m_frames.inc()
                    self.m_records.inc(decoded.n)
                    self._queue_feed(gw, first_rid, decoded, f.id)
                    ts = decoded.timestamps()  # a column: no record built for it
                    try:
                        # from the last: a table's stamps rise, so its ages rise and the
                        # histogram's sort meets a run or two (falling ages, equal in a
                        # part, are no run for it: a third of the histogram's time)
                        ages = list(map(operator.sub, itertools.repeat(wall), reversed(ts)))
                    except (TypeError, OverflowError):  # a ts that is no (float) number:
                        ages = _ages(wall, ts)  # applied as sent, it has no age
                    self.h_age.observe_many(ages)
                ack = conn.applied(f.seq, now)
            # observed before any await: a scrape sees it together with the counts above
            done = trio.current_time()
            for _, received in frames:
                self.h_apply.observe(done - received)
                if arrivals:
                    arrivals.popleft()  # committed (or skipped): in the live queue now
            for f, reason in bad:
                if (f.gateway, f.epoch, f.seq) in skipped:
                    ack = conn.applied(f.seq, now)
                    continue
                self.m_rejected.inc()
                log.warning("gateway %s: frame %d rejected: %s", gw, f.seq, reason)
                await ws.send_message(conn.rejected(f.seq, reason, now))
                ack = conn.ack(now)
            await ws.send_message(ack)

    async def _record_lost(self, ws: WebSocket, conn: HubConnection, gw: str, epoch: str,
                           declared: Declared, generation: int) -> None:
        """A LOST (docs/protocol.md section 4): every frame received before it is
        committed, so the frames it declares lost are exactly the ones never received;
        recorded (as a HELLO's are), then acknowledged."""
        await self._declare_lost(gw, epoch, declared.next_seq, declared.count,
                                 declared.dropped, generation)
        await ws.send_message(conn.lost_recorded(declared, trio.current_time()))

    async def _declare_lost(self, gw: str, epoch: str, next_seq: int, count: int,
                            dropped: int | None, generation: int, *,
                            at_hello: bool = False) -> None:
        """Log and record the ``count`` frames below ``next_seq`` that the gateway no longer
        holds and the store lacks (a HELLO's or a LOST's: the same record,
        docs/protocol.md section 4); ``dropped`` of them the gateway says it dropped
        unacknowledged -- the rest this hub acknowledged and has lost since -- or None
        when it does not say (a gateway from before ``dropped``)."""
        if not count:
            return
        how = "" if at_hello else " (told by a LOST while connected)"
        if dropped is None:
            # a LOST too may name acknowledged ones: a HELLO's next_seq is the gateway's
            # lowest unacknowledged frame, and frames acknowledged above it (out of order:
            # its backlog and live lanes) come after, in a LOST
            log.warning("gateway %s: %d frame(s) below seq %d%s are neither in the hub's "
                        "store nor held by the gateway: dropped by the gateway before "
                        "reaching the hub, or acknowledged and since lost by the hub (its "
                        "data directory restored from an older copy, or its disk lost what "
                        "it had written): counted in frames_lost", gw, count, next_seq, how)
        else:
            if dropped:
                log.warning("gateway %s: %d frame(s) below seq %d%s were dropped by the "
                            "gateway before the hub had them (its queue full under "
                            "drop_oldest): counted in frames_lost", gw, dropped, next_seq, how)
            if count > dropped:
                self.m_acked_lost.inc(count - dropped, gateway=gw)
                log.error("gateway %s: %d frame(s) below seq %d%s that this hub acknowledged "
                          "are no longer in its store (its data directory restored from an "
                          "older copy, or its disk lost what it had written): their records "
                          "are lost; counted in frames_lost", gw, count - dropped, next_seq,
                          how)
        await self._until_written(gw, lambda: self.store.declare_lost(
            gw, epoch, next_seq - 1, count, generation))

    def _records_seen(self, f: FrameToApply) -> int:
        """Count and log a frame some of whose record ids were applied already: the
        gateway stored records again under a new seq (docs/protocol.md section 3).
        Returns 1 if the whole frame was dropped for it (counted here, not as a duplicate
        seq)."""
        gw = f.gateway
        lo, hi = f.first_rid, f.first_rid + f.n_records - 1
        if f.all_seen:
            self.m_dup_records.inc(gateway=gw)
            log.error("gateway %s epoch %s: frame %d holds records %d..%d, every one applied "
                      "already under other seqs: dropped (a gateway bug, or its state restored "
                      "from an older copy)", gw, f.epoch, f.seq, lo, hi)
            return 1
        if f.cut:
            self.m_records_cut.inc(f.records_seen, gateway=gw)
            log.error("gateway %s epoch %s: frame %d held %d records applied already under "
                      "other seqs: cut to its new records %d..%d (a gateway bug, or its state "
                      "restored from an older copy)", gw, f.epoch, f.seq, f.records_seen, lo, hi)
        else:
            self.m_twice.inc(f.records_seen, gateway=gw)
            log.error("gateway %s epoch %s: frame %d (records %d..%d) holds %d records "
                      "applied already under other seqs, not in one run: applied whole, "
                      "those records twice (a gateway bug)", gw, f.epoch, f.seq, lo, hi,
                      f.records_seen)
        return 0

    def _check_duplicate(self, gw: str, epoch: str, conn: HubConnection, d: Data,
                         rids: IntervalSet) -> None:
        """A duplicate of a frame applied before this connection (the WELCOME's ``rids``
        were applied then): its record ids should be applied too.  A body that does not
        decode has none to check (a rejected frame sent again)."""
        try:
            body = d.body if d.encoding is None else decompress_body(
                d.body, conn.max_message_bytes)
            first_rid, decoded = check_frame(
                body, self.config.hub.max_records_per_frame,
                columnar=(conn.version or 1) >= 2, typed=(conn.version or 1) >= 3)
        except (FrameError, ProtocolError):
            return
        except Exception:  # a decoding bug: this check is skipped, not the link
            report_internal_error(self.metrics, "gateway_frame", log,
                                  "decoding duplicate frame %d of gateway %s", d.seq, gw)
            return
        reused = records_not_applied(first_rid, decoded.n, rids)
        if reused:
            self._seq_reused(gw, epoch, d.seq, first_rid, decoded.n, reused)

    def _seq_reused(self, gw: str, epoch: str, seq: int, first_rid: int, n: int,
                    reused: int) -> None:
        """Count and log a duplicate seq whose records were not applied: the gateway
        reused an applied seq for other records (docs/protocol.md section 3).  They are
        dropped with the frame, as a duplicate must be; loudly, not silently."""
        self.m_seq_reused.inc(reused, gateway=gw)
        log.error("gateway %s epoch %s: frame %d (records %d..%d) reuses a seq applied "
                  "already with other records: its %d record(s) not applied are dropped "
                  "(a gateway bug, or its state restored from an older copy)", gw, epoch,
                  seq, first_rid, first_rid + n - 1, reused)

    async def _until_written(self, gw: str, commit: Callable[[], Awaitable[T]]) -> T:
        """``commit()``; while the disk is full (or a cluster's PostgreSQL does not
        answer), wait and try the same again.  Nothing is acknowledged meanwhile, so the
        gateway's window fills and it keeps its frames in its spool; the connection stays
        up (the receiver still answers pings).  Space (the server) coming back is found by
        the next try: no operator action."""
        delay = 0.2
        while True:
            try:
                result = await commit()
            except (LockTimeout, SessionEnded):
                # the server answers (the store counted and logged it): not a pause of
                # the acknowledgements, simply again (a new session)
                await trio.sleep(0.2)
                continue
            except (StoreFull, StoreUnavailable) as exc:
                full = isinstance(exc, StoreFull)
                (self.m_full if full else self.m_unavailable).inc()
                if delay == 0.2:
                    log.error("gateway %s: cannot store its frames, %s (%s); acknowledgements "
                              "paused until it can", gw,
                              "the disk is full" if full else
                              "the store's file or disk is damaged" if isinstance(exc, StoreDamaged)
                              else "the store is unavailable", exc)
                await trio.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            if delay > 0.2:
                log.warning("gateway %s: the store can write again; acknowledgements resume",
                            gw)
            if self._over_bytes():
                self._prune_now.set()
            return result


def _ages(wall: float, timestamps: list[Any]) -> list[float]:
    """The ages of the records whose ts is a number a float can hold (records decode with
    any field values; the live state judges them)."""
    out = []
    for ts in timestamps:
        try:
            out.append(wall - ts)
        except (TypeError, OverflowError):
            pass
    return out


def _offered(versions: tuple[int, ...]) -> str:
    """The versions a refused HELLO offered, for its 4002 reason: at most 8.  A HELLO may
    list a million (nothing bounds the list but max_frame_bytes); quoted whole, the log
    line grew to megabytes and the REFUSE, cut at 1024 characters, lost the versions this
    hub speaks, which the reason is for (docs/protocol.md section 4)."""
    shown = ", ".join(map(str, versions[:8]))
    return f"[{shown}, ... {len(versions)} in all]" if len(versions) > 8 else f"[{shown}]"


def _reason_key(code: int) -> str:
    return {
        CloseCode.UNAUTHORIZED: "unauthorized",
        CloseCode.UNSUPPORTED_VERSION: "unsupported_version",
        CloseCode.PROTOCOL_ERROR: "protocol_error",
        CloseCode.HEARTBEAT_TIMEOUT: "heartbeat_timeout",
        CloseCode.TOO_BIG: "too_big",
        CloseCode.TOO_MANY_RECORDS: "too_many_records",
    }.get(code, str(code))
