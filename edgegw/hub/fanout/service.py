"""The Trio layer of the live fan-out: ``/ws/live`` connections, one sender task per client,
and the UI-rate ticker.  What each client gets is decided by the sans-IO core
(``edgegw.hub.fanout.core.LiveHub``); this module only moves bytes and keeps time.

Wiring (the hub service does this)::

    fanout = LiveFanout(config.live, metrics=metrics)
    alerts = AlertService(config.alerts, fanout.publish, data_dir / "history.sqlite3")
    state = LiveState(fanout.publish, alerts=alerts.engine, on_evict=alerts.archive_lot)
    fanout.attach(state, on_ack=lambda alert_id, user:
                  alerts.engine.ack(alert_id, user, time.time()))
    fanout.install(hub.http)            # GET /api/live/stats and the /ws/live route
    Dashboard().install(hub.http)       # GET / and /static/...
    await nursery.start(fanout.run)     # the ticker, for as long as the hub runs

Why one sender task per client: a write to a client that does not read blocks only that
client's task; the ticker never awaits a client, it appends ready-made frames to bounded
queues (``LiveHub.tick``).  A frame shared by many clients is the same ``bytes`` object,
WebSocket-framed once (``prepare_message``) and written as is -- directly from the ticker
to the socket when the client's sender is idle and the socket has room (the common case,
no task switch), else by the client's sender task.  The ticker's writes can be made by a
worker thread instead (``LiveFanout.write_in_thread``, off by default: ``WRITE_IN_THREAD``).
"""

from __future__ import annotations

import logging
import math
import secrets
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import Any

import trio

from ...metrics import Metrics, report_internal_error
from ...web import (
    ConnectionClosed,
    HttpServer,
    MessageTooBig,
    Request,
    Response,
    WebSocket,
    json_response,
    prepare_message,
)
from ...web.deflate import Deflater
from .channels import Client, ClientScope
from .config import SUBPROTOCOLS, LiveConfig
from .core import AckHandler, LiveHub, StateSource
from .encoding import decode_client_message, encoding_for_subprotocol
from .scope import LiveScope
from .writer import write_each
from .writer_process import WriterProcess

log = logging.getLogger("edgegw.hub.live")

LIVE_PATH = "/ws/live"
STATS_PATH = "/api/live/stats"
# Client messages are small control requests; a subscribe with max_patterns topics and as
# many resume entries fits easily.
MAX_CLIENT_MESSAGE = 256 * 1024
#: how long a tick writes to sockets before other tasks get a turn (LiveFanout.write_slice;
#: longer after a long pause: ``LiveFanout.tick_async``).  Off (infinite) by default:
#: slices of 5 ms made the end-to-end latency worse at 1,000 clients in every side-by-side
#: run (bench/fanout.py --write-slice, docs/performance.md), the gateways' frames reaching
#: the hub's commit later, not sooner.
WRITE_SLICE_S = math.inf
#: whether a tick's writes go to a writer thread (``LiveFanout.write_in_thread``).  Off by
#: default: it halves the Trio thread's CPU per tick (0.51x at 1,000 clients, 0.39x at
#: 5,000; the process's CPU 0.96x and 0.91x: bench/fanout_tick.py), but on this loaded
#: 2-core machine a batch took 3--9x its CPU time in wall time (the writer waits for a
#: core, and for the GIL after every write while the Trio thread runs the ingest), the
#: next tick waited for it, and end to end (bench/fanout.py --compare --writer-thread)
#: p99 was worse in 5 of 9 pairs at 1,000 clients and 1 of 2 at 5,000
#: (docs/performance.md).  Measure again where the hub has its cores.
WRITE_IN_THREAD = False
#: ticks in a row held back while the ingest is behind (``LiveFanout.ingest_lag``): each a
#: UI interval, so a client still gets a frame at least every 1 + this many intervals.
MAX_HELD_TICKS = 3
#: only ticks that cost at least this share of the UI interval in CPU are held back:
#: holding saves a tick's CPU for the ingest, and a cheap tick (a few hundred clients)
#: saves too little to be worth a frame -- the ingest's lag then has other causes
#: (bench/fanout.py at 200 clients on a loaded machine: ticks held, the lag unchanged).
HOLD_MIN_TICK_SHARE = 0.25
#: how long a due tick waits, at most, for the gateways' frames that had reached the hub
#: when it was due to reach the live state (their commit and feeder step: a few ms on a
#: hub that keeps up), as a share of the UI interval (``LiveFanout.catch_up``).  Their
#: records then go out with this tick instead of the next, an interval later: at 1,000
#: clients the frames committing while a tick was due made the end-to-end p99.
CATCH_UP_SHARE = 0.3
#: how often a tick that waits for the ingest looks at its lag again
CATCH_UP_POLL_S = 0.001
#: due ticks that do not wait after a wait that reached its cap: on a hub short of CPU
#: the commits outlast the cap (bench/fanout.py at load average 6.6: 43 of 57 waits), and
#: each such wait only delayed every client's frame
CATCH_UP_BACKOFF_TICKS = 4


class _NoState:
    def snapshot(self, topic: str) -> dict[str, Any] | None:
        return None

    def topics(self) -> list[str]:
        return []


def _write_frames(writes: list[tuple[int, bytes]]) -> tuple[list[int], float]:
    """The writer thread's part of a tick (``write_each``) and the thread's CPU seconds."""
    cpu0 = time.thread_time()
    written = write_each(writes)
    return written, time.thread_time() - cpu0


def _subscribe_patterns(data: bytes | str) -> list[str]:
    """The patterns of a ``subscribe`` message, else [] (the core validates it again)."""
    try:
        message = decode_client_message(data)
    except Exception:  # the core answers a malformed message
        return []
    if not isinstance(message, dict) or message.get("type") != "subscribe":
        return []
    topics = message.get("topics")
    if not isinstance(topics, list):
        return []
    return [t for t in topics if isinstance(t, str)]


def new_epoch() -> str:
    """A hub run's epoch: different on every start, so offsets never collide across runs."""
    return f"{int(time.time()):x}-{secrets.token_hex(4)}"


class _Session:
    __slots__ = ("aborted", "client", "held", "idle", "in_batch", "remainder", "request",
                 "scope", "send_scope", "wake", "ws")

    def __init__(self, client: Client, ws: WebSocket, request: Request) -> None:
        self.client = client
        self.ws = ws
        self.request = request  # the upgrade: its credential, checked again on a reload
        self.wake = trio.Event()
        self.scope: trio.CancelScope | None = None  # the connection's tasks
        self.send_scope: trio.CancelScope | None = None  # the write in progress, if any
        self.aborted = False  # a write was cut mid-frame: no clean close is possible
        self.idle = False  # its sender is parked, waiting for frames
        # A frame the ticker could not write (the sender writes it whole), or the unwritten
        # end of one it began (``held``: the WebSocket is reserved for it until the sender
        # has written it with ``send_rest``).
        self.remainder: bytes | None = None
        self.held = False
        # Its frame is in the writer thread's batch (``LiveFanout.tick_async``): its sender
        # waits for the batch, then writes what the batch left over, if anything.
        self.in_batch = False


class LiveFanout:
    def __init__(
        self,
        config: LiveConfig | None = None,
        *,
        source: StateSource | None = None,
        metrics: Metrics | None = None,
        on_ack: AckHandler | None = None,
        epoch: str | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        cfg = config or LiveConfig()
        self.deflater = (Deflater(cfg.compression_level, cfg.compression_min_bytes)
                         if cfg.compression == "permessage-deflate" else None)
        self.core = LiveHub(source or _NoState(), cfg, epoch=epoch or new_epoch(),
                            prepare=prepare_message, on_ack=on_ack, metrics=metrics,
                            prepare_deflated=self.deflater.prepare if self.deflater else None)
        self._clock = clock
        self._h_send = self.core.metrics.histogram(
            "live_send_seconds", "seconds to write one frame to a /ws/live client, its "
            "socket's backpressure included (frames the ticker began are not counted)")
        self._m_lost = self.core.metrics.counter(
            "live_connections_lost_total", "/ws/live connections that ended without a close "
            "from either side (1006): a reset, or the hub's kernel giving up on a vanished "
            "client (TCP_USER_TIMEOUT, keepalive)")
        self._sessions: dict[int, _Session] = {}
        # The lot an alert belongs to (None: no lot), so that a lot-scoped operator can
        # acknowledge its own lots' alerts; without it such an operator acknowledges none.
        self.alert_lot: Callable[[str], str | None] | None = None
        # Cluster mode: awaited with a ``subscribe``'s patterns before the core sees it, so
        # the node's mirror can start following those topics first (edgegw.hub.cluster).
        self.prepare_subscribe: Callable[[list[str]], Awaitable[None]] | None = None
        self.ticks = 0
        self.ticks_spaced = 0  # ticks after which the next one waited (a long tick)
        self.space_long_ticks = True  # False: back to back (bench/fanout.py --compare)
        self.tick_seconds = 0.0  # time spent in ticks, for the stats page and the bench
        self._decided_at = 0.0  # the Trio clock of the last tick's decision (the rate cap)
        self.tick_seconds_max = 0.0  # the longest tick (its own time, not the pauses)
        self.core_seconds = 0.0  # of which deciding and encoding (the rest: writing)
        #: a tick writes for this long before it lets other tasks run (a checkpoint):
        #: at 5,000 clients the writes alone take 100-150 ms (off by default: WRITE_SLICE_S)
        self.write_slice = WRITE_SLICE_S
        self.yields = 0  # checkpoints between write slices, over all ticks
        self._tick_cpu = 0.0
        self._tick_sent = False
        self._work = trio.Event()  # set when the core has work for a tick (on_work)
        self.core.on_work = self._work_arrived
        #: seconds the oldest record received by the hub has waited for the live state
        #: (``Ingest.lag``; the hub sets it).  While it is over a UI interval the ticks are
        #: held back, up to MAX_HELD_TICKS in a row, if a tick costs at least
        #: ``hold_min_tick_share`` of the interval in CPU: on a CPU-starved hub the ticks (a
        #: write per client) took the thread first and the gateways' frames aged seconds
        #: in the ingest; a later frame of fresh records beats a punctual one of old ones.
        self.ingest_lag: Callable[[], float] | None = None
        self.hold_min_tick_share = HOLD_MIN_TICK_SHARE
        self.ticks_held = 0
        #: a due tick waits up to this share of the UI interval for the frames received by
        #: then to reach the live state (``ingest_lag``); 0: it does not wait
        self.catch_up = CATCH_UP_SHARE
        self.ticks_caught_up = 0  # ticks that waited for the ingest
        self.catch_up_timeouts = 0  # of which the wait reached its cap (went without them)
        self._catch_up_skip = 0  # due ticks left that do not wait (after a timeout)
        self.catch_up_seconds = 0.0  # the time they waited, in all
        #: a tick's writes to the sockets of parked clients go to a worker thread as one
        #: batch (``_write_batch``) when True; else the Trio thread writes them itself.
        #: Off by default: WRITE_IN_THREAD; the hub config's ``live.write_thread``
        self.write_in_thread = cfg.write_thread or WRITE_IN_THREAD
        #: the same batches handed to a writer process (``writer.py``) instead, while it
        #: runs (``live.write_process``, off by default)
        self.write_in_process = cfg.write_process
        self.writer = WriterProcess(self.core.metrics)
        self._batch_done = trio.Event()  # set when the batch in the writer thread is over
        self._batch_done.set()
        self.tick_cpu_seconds = 0.0  # the Trio thread's CPU in ticks (writes in thread not)
        self.batches = 0  # batches handed to the writer thread
        self.batch_writes = 0  # frames in them
        self.batch_seconds = 0.0  # their wall time, from hand-over to results
        self.batch_cpu_seconds = 0.0  # the writer thread's CPU for them
        self.batch_partial = 0  # frames of them a socket took in part (the sender wrote on)

    def batch_in_writer(self) -> bool:
        """Whether a tick's batch is with the writer thread or process now."""
        return not self._batch_done.is_set()

    @property
    def config(self) -> LiveConfig:
        return self.core.config

    def attach(self, source: StateSource, on_ack: AckHandler | None = None) -> None:
        """Set the live state (created after the fan-out, since it publishes into it)."""
        self.core.source = source
        if on_ack is not None:
            self.core.on_ack = on_ack

    def publish(self, topic: str, delta: dict[str, Any], ts: float | None = None) -> None:
        """The live state's publish callback: synchronous and cheap (work is per tick)."""
        self.core.publish(topic, delta, ts)

    def wanted(self, topic: str) -> bool:
        """The live state's ``wanted`` (``LiveHub.wanted``): whether a client follows
        ``topic`` now."""
        return self.core.wanted(topic)

    def set_unavailable(self, code: str | None, message: str = "") -> None:
        """Cluster mode: tell every client this node has no live data now (``code``) or
        has again (None); ``LiveHub.set_unavailable``."""
        self.core.set_unavailable(code, message, now=trio.current_time())
        for session in self._sessions.values():
            session.wake.set()  # the status message is queued: its sender writes it

    def install(self, http: HttpServer, path: str = LIVE_PATH) -> None:
        # A dashboard whose host vanished: what the hub wrote unacknowledged for
        # stall_timeout + close_grace ends the connection in the kernel, and keepalive
        # probes find it when nothing is written (a quiet floor).  Not stall_timeout
        # alone: the kernel counts a zero window too, and a client that stops reading
        # must meet the hub's own verdict first (4008 "stalled", counted; its write in
        # flight given close_grace) -- at the same bound the kernel won that race now
        # and then and ended it with a bare 1006 (seen in test_live_4008_stalled).
        stall = self.core.config.stall_timeout
        http.add_ws_route(path, self.handle, subprotocols=list(SUBPROTOCOLS),
                          max_message_size=MAX_CLIENT_MESSAGE, deflate=self.deflater,
                          give_up_after_s=stall + self.core.config.close_grace,
                          keepalive_s=stall / 3)
        http.add_route("GET", STATS_PATH, self._stats)

    # ------------------------------------------------------------------ ticker

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Tick at most at the UI rate for as long as the hub runs.

        A tick is due one interval after the previous one that sent batches began; it
        runs then if there is anything to send, else as soon as something is published
        (or a client asks for something) -- not at the next multiple of the interval,
        which made a delta wait up to a whole interval more after a quiet spell.  Ticks
        that send stay at least an interval apart, so no client gets more than
        ``ui_rate`` batches a second.  With nothing to do for an interval a tick runs
        anyway (stall checks, sweeps)."""
        async with trio.open_nursery() as nursery:
            if self.write_in_process:
                await nursery.start(self.writer.run)
            await self._tick_loop(task_status)

    async def _tick_loop(self, task_status: trio.TaskStatus[None]) -> None:
        interval = 1.0 / self.config.ui_rate
        task_status.started()
        due = trio.current_time()
        quiet = False  # the last tick sent nothing: wait for something new
        held = 0  # ticks held back in a row for the ingest
        last_cpu = 0.0  # the last tick's CPU seconds
        while True:
            await trio.sleep_until(due)
            if quiet or not self.core.has_work():
                with trio.move_on_after(interval):
                    await self._work.wait()
            if (held < MAX_HELD_TICKS and self.ingest_lag is not None
                    and last_cpu >= self.hold_min_tick_share * interval
                    and self.ingest_lag() > interval):
                held += 1
                self.ticks_held += 1
                due = trio.current_time() + interval
                continue
            held = 0
            await self._catch_up(interval)
            began = trio.current_time()
            self._work = trio.Event()  # set by what is published from now on
            try:
                took, sent = await self.tick_async()
            except Exception:  # a failure boundary: one bad tick, not the hub
                report_internal_error(self.core.metrics, "live_tick", log, "live fan-out tick")
                took, sent = 0.0, True
            if sent:
                last_cpu = took
            # The UI-rate cap: after a tick that sent batches the next is an interval
            # later; after one that sent none, as soon as something new comes (a tick
            # with only lagging clients to look at sends nothing: it must not spin).
            quiet = not sent
            # counted from the core's own reading of the clock (``_decide``), the one the
            # batches' ``ts`` is read beside: from ``began`` a tick whose decision was
            # delayed (descheduled, a batch to hand over) and a next one that was not
            # stamped batches closer than an interval (seen: 122 ms at ui_rate 8, two busy
            # loops beside the hub)
            due = max(began, self._decided_at) + interval if sent else trio.current_time()
            # A tick holds the Trio thread (deciding, then a write per client): with
            # thousands of clients it can need most of the UI interval or more.  The next
            # one then waits as long as this one took, so ingest (and everything else)
            # keeps about half the thread and the frames get rarer instead: without
            # this, a hub with 5,000 dashboards fell seconds behind its gateways
            # (bench/fanout.py).  CPU time, not wall time: a tick that took long because
            # the process was descheduled on a busy machine left the thread to nobody.
            if took > 0.8 * interval and self.space_long_ticks:
                due = max(due, trio.current_time() + took - interval)
                self.ticks_spaced += 1

    async def _catch_up(self, interval: float) -> None:
        """Wait, at most ``catch_up`` intervals, until every frame the hub had received
        from a gateway when the tick was due is in the live state (``ingest_lag`` shorter
        than the wait so far), so that their records go out with this tick: without the
        wait, records committed a few ms after a tick began waited a whole interval for
        the next.  While a commit is in flight the Trio thread is free, so the wait costs
        the other tasks nothing; the rate cap still counts from when the tick begins.  An
        ingest behind by more than an interval is not waited for (it would not catch up
        in time; the holding above is for that case), and after a wait that reached its
        cap the next ``CATCH_UP_BACKOFF_TICKS`` due ticks do not wait: on a hub short of
        CPU the commits outlast the cap, and the wait only delays every frame."""
        lag = self.ingest_lag
        if lag is None or self.catch_up <= 0:
            return
        if self._catch_up_skip:
            self._catch_up_skip -= 1
            return
        start = trio.current_time()
        behind = lag()
        if behind <= 0 or behind > interval:
            return  # nothing in flight; or behind by more than a commit (the holding's case)
        deadline = start + self.catch_up * interval
        now = start
        while now < deadline and lag() > now - start:
            await trio.sleep(CATCH_UP_POLL_S)
            now = trio.current_time()
        self.ticks_caught_up += 1
        if now >= deadline:
            self.catch_up_timeouts += 1
            self._catch_up_skip = CATCH_UP_BACKOFF_TICKS
        self.catch_up_seconds += now - start

    def _work_arrived(self) -> None:
        self._work.set()

    def tick(self) -> tuple[float, bool]:
        """One whole tick without yielding, its writes made by the Trio thread itself;
        returns its CPU seconds and whether it sent any batch."""
        woken, now, started = self._decide()
        cpu0 = time.thread_time()
        for _ in self._write(woken, now, started):
            pass
        cpu = self._tick_cpu + time.thread_time() - cpu0
        self.tick_cpu_seconds += cpu
        return cpu, self._tick_sent

    async def tick_async(self) -> tuple[float, bool]:
        """One tick: decide (the core), then write the frames straight to the sockets of
        idle clients.  With ``write_in_thread`` (off by default: ``WRITE_IN_THREAD``)
        those writes go to a worker thread as one batch, and the Trio thread runs other
        tasks meanwhile (``_write_batch``).  Else the Trio thread writes them, in slices
        of ``write_slice`` seconds with a checkpoint between them when slicing is on (off
        by default: ``WRITE_SLICE_S``).
        A slice is at least as long as what ran in the pause before it, so the tick keeps
        at least half the thread until its writes are done.
        Returns the tick's own CPU seconds on the Trio thread (not what ran while it
        waited) and whether it sent any batch."""
        woken, now, started = self._decide()
        cpu = self._tick_cpu
        to_process = self.write_in_process and self.writer.ready
        if self.write_in_thread or to_process:
            cpu += await self._write_batch(woken, now, started, to_process)
            self.tick_cpu_seconds += cpu
            return cpu, self._tick_sent
        t0 = time.thread_time()
        for _ in self._write(woken, now, started):
            cpu += time.thread_time() - t0
            await trio.lowlevel.checkpoint()
            self.yields += 1
            t0 = time.thread_time()
        cpu += time.thread_time() - t0
        self.tick_cpu_seconds += cpu
        return cpu, self._tick_sent

    def _decide(self) -> tuple[list[Client], float, float]:
        """The core's tick: the clients with frames to write, ``now`` and when it began."""
        started = time.perf_counter()
        cpu0 = time.thread_time()
        now = trio.current_time()
        woken, slow = self.core.tick(now, self._clock())
        self._decided_at = now
        self.core_seconds += time.perf_counter() - started
        grace = now + self.config.close_grace
        sessions = self._sessions
        for client in slow:
            session = sessions.get(client.id)
            if session is None:
                continue
            # The write in progress may finish (then the close frame follows, and a slow
            # reader sees 4008); one that is stuck past the grace period is cut off.
            if session.send_scope is not None:
                session.send_scope.deadline = min(session.send_scope.deadline, grace)
            session.wake.set()
        self._tick_cpu = time.thread_time() - cpu0
        self._tick_sent = bool(woken)
        return woken, now, started

    async def _write_batch(self, woken: list[Client], now: float, started: float,
                           to_process: bool = False) -> float:
        """Write the tick's frames to the sockets of parked clients from a worker thread:
        one ``os.write`` per client there (the system call releases the GIL, so the
        kernel's work runs beside the Trio thread's, on another core), one hand-over and
        one pass over the results here.  Returns the Trio thread's CPU seconds.

        The rules are those of ``_write_now``: only a client whose sender is parked with
        nothing left over gets its next frame written so; each such WebSocket is reserved
        (``WebSocket.reserve_nowait``) until the results are back, and its sender waits
        for the batch (``_Session.in_batch``) before it takes another frame.  A frame the
        socket took in part leaves the rest to the sender (``remainder``, ``held``), one
        it took none of is written whole by the sender; one written whole may be followed
        by the client's next frames, written here as ``_write_now`` does."""
        cpu0 = time.thread_time()
        sessions = self._sessions
        core = self.core
        batch: list[tuple[_Session, bytes]] = []
        writes: list[tuple[int, bytes]] = []
        done = trio.Event()  # set when the results are in (WebSocket.reserve_nowait)
        for client in woken:
            session = sessions.get(client.id)
            if session is None:
                continue  # gone meanwhile
            if session.idle and session.remainder is None and client.queue:
                fd = session.ws.reserve_nowait(done)
                if fd is not None:
                    session.in_batch = True
                    frame = core.take_frame(client)
                    assert frame is not None  # (the queue has one)
                    batch.append((session, frame))
                    writes.append((fd, frame))
                    continue
            session.wake.set()
        cpu = time.thread_time() - cpu0
        spent = time.perf_counter() - started  # the tick's own wall time, writes apart
        if writes:
            self._batch_done = done
            written: Sequence[int | None] | None = None
            handed = time.perf_counter()
            try:
                if to_process:  # the writer process, else the writer thread
                    written, writer_cpu = await self.writer.write(writes)
                else:
                    written, writer_cpu = await trio.to_thread.run_sync(_write_frames, writes)
                self.batch_cpu_seconds += writer_cpu
            finally:
                back = time.perf_counter()
                cpu0 = time.thread_time()
                self.batches += 1
                self.batch_writes += len(writes)
                self.batch_seconds += back - handed
                self._batch_results(batch, written)
                done.set()
                cpu += time.thread_time() - cpu0
                spent += time.perf_counter() - back
        self.ticks += 1
        self.tick_seconds += spent
        self.tick_seconds_max = max(self.tick_seconds_max, spent)
        return cpu

    def _batch_results(self, batch: list[tuple[_Session, bytes]],
                       written: Sequence[int | None] | None) -> None:
        """What the writer thread (or process) wrote: frames written, the rest to each
        client's sender.  None, for the batch or a frame: unknown (the batch failed, the
        writer process ended in it)."""
        core = self.core
        now = trio.current_time()
        for k, (session, frame) in enumerate(batch):
            ws = session.ws
            session.in_batch = False
            n = None if written is None else written[k]
            if n is None:
                # The batch failed (a thread's cannot, short of memory; a process can be
                # killed): what went out is unknown, so nothing more can follow on this
                # connection.  The client reconnects and resumes (a snapshot).
                ws.end_reserved(0, len(frame))
                session.aborted = True
                if session.scope is not None:
                    session.scope.cancel()
                continue
            ws.end_reserved(n, len(frame))
            if n == len(frame):
                core.frame_written(session.client, now)
                if not session.client.queue or self._write_now(session, now):
                    continue
            elif n:
                self.batch_partial += 1
                session.remainder = frame[n:]
                session.held = True  # reserved until the sender wrote the rest
            else:
                session.remainder = frame  # the sender writes it (and meets the error)
            session.wake.set()

    def _write(self, woken: list[Client], now: float, started: float) -> Iterator[None]:
        sessions = self._sessions
        clock = time.perf_counter
        spent = 0.0  # this tick's own time: deciding, then its slices of writes
        slice_start = started
        slice_end = clock() + self.write_slice
        for client in woken:
            session = sessions.get(client.id)
            if session is None:
                continue  # gone meanwhile
            # Written here: a client whose sender is parked with nothing left over.  A
            # sender woken for a frame left over by a tick stays "idle" until it runs; a
            # tick that wrote past it meanwhile (the next one, when a tick took longer
            # than the interval) would send a later frame before it, or lose it.
            if not (session.idle and session.remainder is None
                    and self._write_now(session, now)):
                session.wake.set()
            if (t := clock()) > slice_end:
                spent += t - slice_start
                yield
                now = trio.current_time()
                slice_start = clock()
                # The next slice is at least as long as the others just ran: the tick
                # keeps at least half the thread while it writes.  (With a backlog the
                # feeder's steps are long: slices of 5 ms each followed by one of those
                # stretched a 5,000-client tick to seconds.)
                slice_end = slice_start + max(self.write_slice, slice_start - t)
        spent += clock() - slice_start
        self.ticks += 1
        self.tick_seconds += spent
        self.tick_seconds_max = max(self.tick_seconds_max, spent)

    def _write_now(self, session: _Session, now: float) -> bool:
        """Write a parked client's frames straight to its socket, without waking its task.

        This is the common case -- a client that keeps up has room in its socket buffer --
        and it saves a task switch per client per tick (1,000 clients x 20 ticks/s).  Only
        when the socket takes less than a whole frame does the sender task take over with
        the rest.  True when nothing is left for the sender."""
        ws = session.ws
        if not ws.can_send_nowait():
            return False  # someone is writing to it (a pong): let the sender queue behind
        core = self.core
        client = session.client
        while (frame := core.take_frame(client)) is not None:
            n = ws.send_prepared_nowait(frame)
            if n == 0:
                # Nothing written: the sender writes the whole frame the ordinary way (and
                # meets the error, if there was one).
                session.remainder = frame
                return False
            if n < len(frame):
                session.remainder = frame[n:]
                session.held = True  # reserved until the sender wrote the rest
                return False
            core.frame_written(client, now)
        return True

    # ------------------------------------------------------------------ clients

    async def handle(self, ws: WebSocket, request: Request) -> None:
        """One /ws/live connection, and a failure boundary: an unexpected exception in it
        is logged, counted (``internal_errors_total{where="live_connection"}``) and closes
        this connection with 1011, nothing else."""
        try:
            await self._handle(ws, request)
        except Exception:
            report_internal_error(self.core.metrics, "live_connection", log,
                                  "/ws/live connection from %s", request.remote)
            if ws.closed is None:
                await ws.aclose(1011, "internal error")

    async def _handle(self, ws: WebSocket, request: Request) -> None:
        core = self.core
        principal = request.principal  # set by the access guard (edgegw/auth)
        client = core.connect(encoding_for_subprotocol(ws.subprotocol), now=trio.current_time(),
                              peer=request.remote, scope=self._scope(principal),
                              deflate=ws.deflater is not None)
        session = _Session(client, ws, request)
        self._sessions[client.id] = session
        try:
            async with trio.open_nursery() as nursery:
                session.scope = nursery.cancel_scope
                nursery.start_soon(self._sender, session)
                expires_at = getattr(principal, "expires_at", None)
                if expires_at is not None:
                    nursery.start_soon(self._expire, session, expires_at)
                try:
                    while True:  # a closed client's sender ends the connection
                        data = await ws.get_message()
                        if self.prepare_subscribe is not None:
                            patterns = _subscribe_patterns(data)
                            if patterns:
                                await self.prepare_subscribe(patterns)
                        core.receive(client, data, trio.current_time())
                        if core.has_work():  # a subscription: its snapshots at the next tick
                            self._work.set()
                        if client.closed and session.send_scope is not None:
                            # Closed by its own request (too many unread replies): the
                            # write in progress gets the same grace as in a tick.
                            session.send_scope.deadline = min(
                                session.send_scope.deadline,
                                trio.current_time() + self.config.close_grace)
                        session.wake.set()
                except (ConnectionClosed, MessageTooBig):
                    pass
                nursery.cancel_scope.cancel()
        finally:
            self._sessions.pop(client.id, None)
            core.disconnect(client)
            if (client.close_code is None and ws.closed is not None
                    and ws.closed.code == 1006):
                self._m_lost.inc()  # not the hub's verdict, nor the client's close
            if session.in_batch:  # the writer thread may be writing to its socket
                with trio.CancelScope(shield=True):
                    await self._batch_done.wait()
            if session.held:  # the rest of a frame will never be written
                session.held = False
                ws.abandon_rest()
                session.aborted = True
            with trio.CancelScope(shield=True):
                if session.aborted:
                    # Half a frame went out: any close frame now would be garbage.
                    await ws.abort(client.close_code or 1006, client.close_reason or "aborted")
                elif client.close_code is not None:
                    await ws.aclose(client.close_code, client.close_reason)

    def _scope(self, principal: Any) -> ClientScope | None:
        if principal is None:  # no access guard on this server: nothing to restrict
            return None
        return LiveScope(principal, anonymous=principal.via == "none",
                         alert_lot=self.alert_lot)

    def recheck(self, still_signed_in: Callable[[Request], str | None]) -> int:
        """Close (4401) every connection whose upgrade ``still_signed_in`` no longer admits
        as it did (the hub reloaded ``[auth]``: a key withdrawn, a role mapped anew) ->
        how many.  A connection outlives no credential the hub has stopped accepting."""
        closed = 0
        for session in list(self._sessions.values()):
            if session.client.closed:
                continue
            reason = still_signed_in(session.request)
            if reason is None:
                continue
            self.core.close_signed_out(session.client, reason)
            if session.scope is not None:
                session.scope.cancel()
            closed += 1
        return closed

    async def _expire(self, session: _Session, expires_at: float) -> None:
        """Close the connection (4401) when its token expires: a connection never outlives
        the credential it was opened with."""
        await trio.sleep(max(0.0, expires_at - self._clock()))
        self.core.close_expired(session.client)
        if session.scope is not None:
            session.scope.cancel()

    async def _sender(self, session: _Session) -> None:
        core = self.core
        client = session.client
        ws = session.ws
        try:
            # A closed (too slow) client still gets the rest of a frame begun, so that it
            # can see the close frame after whole messages.
            while not client.closed or session.remainder is not None:
                frame = session.remainder
                continued = False
                if frame is not None:
                    session.remainder = None
                    # The rest of a frame the ticker began (the WebSocket is reserved for it),
                    # or a whole one it could not start.
                    continued, session.held = session.held, False
                else:
                    if session.in_batch:  # its frame is in the writer thread's batch
                        await self._batch_done.wait()
                        continue
                    frame = core.take_frame(client)
                    if frame is None:
                        session.wake = trio.Event()
                        session.idle = True
                        try:
                            await session.wake.wait()
                        finally:
                            session.idle = False
                        continue
                started = trio.current_time()
                with trio.CancelScope() as scope:
                    session.send_scope = scope
                    if client.closed:
                        scope.deadline = started + self.config.close_grace
                    if continued:
                        await ws.send_rest(frame)
                    else:
                        await ws.send_prepared(frame)
                session.send_scope = None
                if scope.cancelled_caught:
                    session.aborted = True
                    break
                written = trio.current_time()
                self._h_send.observe(written - started)
                core.frame_written(client, written)
        except ConnectionClosed:
            pass
        if session.scope is not None:
            session.scope.cancel()  # the handler closes the connection

    # ------------------------------------------------------------------ stats

    def stats(self) -> dict[str, Any]:
        out = self.core.stats()
        out["ticks"] = self.ticks
        out["ticks_spaced"] = self.ticks_spaced
        out["ticks_held"] = self.ticks_held
        out["ticks_caught_up"] = self.ticks_caught_up
        out["catch_up_timeouts"] = self.catch_up_timeouts
        out["catch_up_ms_mean"] = (1000 * self.catch_up_seconds / self.ticks_caught_up
                                   if self.ticks_caught_up else None)
        out["tick_ms_mean"] = (1000 * self.tick_seconds / self.ticks) if self.ticks else None
        out["tick_core_ms_mean"] = (1000 * self.core_seconds / self.ticks) if self.ticks else None
        out["tick_ms_max"] = 1000 * self.tick_seconds_max
        out["tick_write_yields"] = self.yields
        # Counted costs (CPU time, which a loaded machine does not inflate as it does wall
        # time): the Trio thread's per tick, and the writer thread's per batch.
        out["tick_cpu_ms_mean"] = (1000 * self.tick_cpu_seconds / self.ticks
                                   if self.ticks else None)
        out["write_batches"] = self.batches
        out["write_batch_frames_mean"] = (self.batch_writes / self.batches
                                          if self.batches else None)
        out["write_batch_ms_mean"] = (1000 * self.batch_seconds / self.batches
                                      if self.batches else None)
        out["write_batch_cpu_ms_mean"] = (1000 * self.batch_cpu_seconds / self.batches
                                          if self.batches else None)
        out["write_batch_partial"] = self.batch_partial
        out["writer_process"] = self.writer.stats() if self.write_in_process else None
        for entry in out["clients"]:
            session = self._sessions.get(entry["id"])
            if session is not None:
                entry["bytes_sent"] = session.ws.bytes_sent
        return out

    async def _stats(self, request: Request) -> Response:
        stats = self.stats()
        if request.query.get("clients") == "0":
            stats["clients"] = len(stats["clients"])
        return json_response(stats)

