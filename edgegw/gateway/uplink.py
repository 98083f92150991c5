"""The uplink: keeps one WebSocket to the hub and moves frames from the store to it.

Connect, say HELLO (epoch, first unacknowledged sequence), learn from WELCOME what the
hub already has, then send every stored frame the hub lacks, oldest first, with at most
``window_frames`` unacknowledged.  Acks release frames in the store.  Any failure closes
the connection and the loop reconnects: it probes the hub (``probe.py``) every
``uniform(0, probe_interval_s)`` while the hub cannot be reached, so a returned link is
noticed within about a second, and backs off exponentially with full jitter only when the
hub was reached and the attempt failed there, or waits out the hub's own ``Retry-After``
(``edgegw.backoff.Reconnect``; docs/protocol.md section 7).  The store keeps every frame
meanwhile, so nothing is lost and the hub's dedup makes a resend harmless.

A stored frame over the limits the hub states in WELCOME (``max_records``; the bytes of
its body as sent, v1 rows for a v1 hub) is sent as several frames (``_fit``): its first
part under its own seq, the rest first stored as new frames, with the split's progress
kept among the store's checkpoints (``SPLIT_KEY``) so that a restart neither sends a
record twice nor loses one (docs/protocol.md section 5, "Frames over the hub's limits").
The parts go right after the frame they were cut from, before the frames stored after it,
on every connection: the hub gets the records in record-id order (edgegw's live state
ties a part's results together by record id in any order, but in order is its cheap path,
and another hub may apply by arrival).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import ssl
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
from typing import Any

import cbor2
import trio
from trio_websocket import (
    ConnectionClosed,
    ConnectionRejected,
    ConnectionTimeout,
    HandshakeError,
    WebSocketConnection,
    connect_websocket_url,
)

from ..backoff import Backoff, Reconnect
from ..heartbeat import heartbeat
from ..metrics import Metrics
from ..protocol import (
    Ack,
    CloseCode,
    GatewayConnection,
    IntervalSet,
    ProtocolError,
    Refuse,
    Reject,
    Welcome,
    encode_body,
    is_columnar,
    plain_floats,
    to_rows,
)
from ..records import GatewayEvent
from ..store import FrameStore, StoredFrame
from ..taskgroups import reraise_meaningful
from ..tls import client_context
from .config import GatewaySection, UplinkSection
from .deadletters import (
    dead_letter_bytes,
    dead_letter_key,
    read_dead_letter_keys,
    write_dead_letter,
)
from .positions import PositionLog, Teller
from .probe import ProbeResult, ProbeTarget, probe_until_reached, retry_after_seconds
from .rollback import Rollback, reissue, resume
from .scheduler import SendScheduler

log = logging.getLogger("edgegw.uplink")

LIVE_S = 2.0  # after an outage, frames younger than this are sent before the backlog
#: at shutdown: how long the GOING_AWAY close may wait for the hub's answering close.  The
#: connection's reader outlives the stop for it (``_hub_link``), so a hub that is up ends
#: the wait as soon as it answers; only a hub that does not answer costs the whole bound
CLOSE_TIMEOUT_S = 0.5
#: room a DATA message takes around its body (``[4, seq, sent_at, body, "zlib"]``): a body
#: this much under the hub's ``max_frame_bytes`` makes a message under it
DATA_ENVELOPE_BYTES = 64
#: among the store's checkpoints: for each stored frame split for the hub and not yet
#: acknowledged (it or its parts), ``str(seq) -> [cut, stored_to, end, parts]``: the frame
#: now holds its records ``[0, cut)``; its records ``[cut, stored_to)`` are in frames stored
#: after it, ``parts`` ``[[seq, first_rid], ...]`` (at most ``MAX_PARTS``; a gateway before
#: this wrote none); the split is complete when ``stored_to == end``
SPLIT_KEY = "__split__"
RID_KEY = "__rid__"  # the next record id, kept among the checkpoints (gateway service)
_UNKNOWN_PART = (1 << 63) - 1  # a part being stored, its seq not known yet
#: parts of one split whose seqs are kept (sent right after the frame); more are sent in
#: sequence order, as any frame: order is then as good as before, nothing is lost
MAX_PARTS = 64
_WIDEST_RID = (1 << 64) - 1  # parts are sized with the widest record id CBOR encodes
#: how long writing a dead-letter entry (and reading the file's entries, before the first
#: one a run writes) may hold off a cancellation: the link going, or the gateway stopping
DEAD_LETTER_TIMEOUT_S = 30.0
#: how often a sender held by a full dead-letter file looks at its size again
DEAD_LETTER_RECHECK_S = 2.0


class Refused(Exception):
    def __init__(self, code: int, reason: str) -> None:
        super().__init__(f"hub refused the connection: {reason} (code {code})")
        self.code = code
        self.reason = reason


class Uplink:
    def __init__(self, gateway: GatewaySection, config: UplinkSection, store: FrameStore,
                 metrics: Metrics, dead_letter_path: trio.Path | None = None) -> None:
        self.gateway = gateway
        self.config = config
        self.store = store
        self.metrics = metrics
        self.dead_letter_path = dead_letter_path
        self.connected = False
        #: the protocol version the hub last agreed (None before the first WELCOME): the
        #: gateway encodes new frames for it (``Gateway._encode``)
        self.hub_version: int | None = None
        #: the ``max_records`` the hub last stated in WELCOME (None before the first): the
        #: gateway cuts new batches to at most it (``Gateway._add``)
        self.hub_max_records: int | None = None
        self.last_error: str | None = None
        #: ``time.monotonic()`` at the last ack: how long since, not a date (a step of the
        #: wall clock is no missing ack)
        self.last_ack_at: float | None = None
        self.acked_watermark = 0
        self.scheduler: SendScheduler | None = None
        self._ack_changed = trio.Event()
        self.backoff = Backoff(config.backoff_initial_s, config.backoff_max_s)
        self.reconnect = Reconnect(self.backoff, config.probe_interval_s)
        self._probe_target = ProbeTarget.from_url(gateway.hub_url, self._ssl_context())
        self.handshake_s: float | None = None  # TCP + WebSocket + HELLO/WELCOME, last time
        #: where the sources were as each frame was stored (the gateway notes them): told
        #: to a hub that keeps them (``gateway/positions.py``); None: none are told
        self.positions: PositionLog | None = None
        #: the store started afresh: HELLO asks for the positions the hub kept, until the
        #: first WELCOME (``resumed``) hands them back (``handed_back``; None: the hub keeps
        #: none) or the gateway stops waiting for them
        self.asks_positions = False
        self.resumed = trio.Event()
        #: ``resumed`` set without an answer: the hub unreachable, refusing, broken
        self.gave_up_asking = False
        self.handed_back: dict[str, Any] | None = None
        self._teller: Teller | None = None  # this connection's, when the hub keeps them
        self._tell_seq = 0  # the newest frame sent on it with positions noted
        #: parts stored for split frames this run: frame seq -> its parts' seqs
        self._parts_stored: dict[int, list[int]] = {}
        self._split_warned = False  # a frame split for the hub logged on this connection
        #: this connection: parts held back until the frame they were cut from is sent
        #: (part seq -> that frame's seq)
        self._held: dict[int, int] = {}
        #: parts go in sequence order, as any frame, and live frames wait for the backlog:
        #: set once a hub closed the link for a sequence gap (a hub with ``max_holes = 0``
        #: takes nothing sent ahead; parts stored just before a reconnect are live frames,
        #: and the live lane going first sent them ahead again, closed again: a livelock)
        self.parts_in_seq_order = False
        #: the lowest seq a part being stored may get, while its ``append`` has not
        #: returned: cancelled there (the link went), the part and the split's progress
        #: still become durable together, later; the next session waits for them
        #: (``_settle_parts``) rather than read an older progress and store the part's
        #: records again under another seq (each record twice at the hub)
        self._part_unsettled: int | None = None
        #: what the dead-letter file holds of frames not yet acknowledged
        #: (``dead_letter_key``), read from it before the first entry this run writes: a
        #: part whose entry was written and whose storing a crash (or a cancellation the
        #: shield did not cover) stopped is planned again, and kept once
        self._dead_letters: set[tuple[Any, ...]] | None = None
        #: called if the first WELCOME shows the hub applied frames this store never held
        #: (``gateway/rollback.py``)
        self.on_state_rollback: Callable[[Rollback], None] | None = None
        #: called with (seq, reason) when the hub rejected a frame and its entry was
        #: written (not when the file held it already: a frame rejected again after a
        #: restart is told once)
        self.on_frame_rejected: Callable[[int, str], None] | None = None
        self._first_welcome = True
        self.m_connects = metrics.counter("uplink_connects_total", "successful hub handshakes")
        self.m_rollbacks = metrics.counter(
            "uplink_state_rollbacks_total", "starts whose first WELCOME showed frames applied "
            "that the spool never held: its state went back in time (docs/operations.md)")
        self.m_failures = metrics.counter(
            "uplink_failures_total", "hub connection attempts and sessions that failed, by "
            "reason (docs/operations.md, Monitoring)")
        self.m_probes = metrics.counter("uplink_probes_total",
                                        "hub readiness probes, by outcome")
        self.m_handshake = metrics.gauge("uplink_handshake_seconds",
                                         "the last handshake: TCP, WebSocket, HELLO/WELCOME")
        self.m_frames = metrics.counter("uplink_frames_sent_total", "data frames sent")
        self.m_bytes = metrics.counter("uplink_bytes_sent_total", "data frame bytes sent")
        self.m_body_bytes = metrics.counter(
            "uplink_body_bytes_total", "data frame bodies' bytes before compression")
        self.m_dead_letter_bytes = dead_letter_bytes(metrics)
        self.m_dead_letter_full = metrics.gauge(
            "uplink_dead_letter_full",
            "1 while no frame is sent because the dead-letter file is over "
            "gateway.dead_letter_max_bytes (frames wait in the spool)")
        #: the dead-letter file's size as last written or looked at (None: not yet)
        self._dead_letter_size: int | None = None
        self.m_rejected = metrics.counter("uplink_frames_rejected_total",
                                          "frames the hub refused as invalid (dead-lettered)")
        self.m_split = metrics.counter(
            "uplink_frames_split_total",
            "stored frames over the hub's limits sent as several frames")
        self.m_connected = metrics.gauge("uplink_connected", "1 while connected to the hub")
        metrics.add_collector(lambda: self.m_connected.set(1 if self.connected else 0))

    def _ssl_context(self) -> ssl.SSLContext | None:
        if not self.gateway.hub_url.startswith("wss://"):
            return None
        c = self.config
        return client_context(c.ca_file, c.cert_file, c.key_file, c.pin_sha256)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        if self.dead_letter_path is not None:
            # looked at once, before any link: the sender's check of the bound never waits
            # (a checkpoint in its loop changes what it plans)
            self._dead_letter_size = await self._dead_letter_file_size()
        delay = 0.0
        while True:
            if delay > 0:
                log.info("reconnecting in %.2f s", delay)
                await trio.sleep(delay)
            delay = await self._attempt()

    def _on_probe(self, result: ProbeResult) -> None:
        self.m_probes.inc(outcome=result.outcome)
        if not result.reached:
            self.last_error = f"hub unreachable: {result.detail}"
            self._stop_asking(self.last_error)

    def _stop_asking(self, why: str) -> None:
        """A store started afresh does not wait for a hub that is not there, or will not
        answer (it refuses this gateway, breaks the protocol): its sources start from their
        beginning now -- never a record left unread for want of a hub; at worst what the
        hub has is sent again."""
        if self.asks_positions:
            self.asks_positions = False
            self.gave_up_asking = True
            self.resumed.set()
            log.warning("%s: the sources of this new store start from their beginning, "
                        "without asking the hub where they were (docs/operations.md, "
                        "\"A gateway's state lost\")", why)

    async def _attempt(self) -> float:
        """Probe until the hub is reached, then (unless it is busy or silent) one session.
        Returns the delay before the next attempt (docs/protocol.md section 7)."""
        policy = self.reconnect
        probe = await probe_until_reached(self._probe_target, self.config.probe_timeout_s,
                                          policy.probe_delay, self._on_probe)
        if probe.outcome == "tls_refused":
            # No WebSocket session with a hub whose certificate is not trusted (or pinned),
            # or that refuses ours: a configuration problem, retried at the slowest pace.
            self.m_failures.inc(reason="tls")
            self.last_error = f"hub TLS handshake refused: {probe.detail}"
            log.error("%s", self.last_error)
            return policy.config_problem()
        if probe.outcome in ("busy", "silent"):
            self.m_failures.inc(reason=probe.outcome)
            self.last_error = f"hub {probe.outcome}: {probe.detail}"
            log.warning("%s", self.last_error)
            if probe.retry_after is not None:
                return policy.busy(probe.retry_after)
            return policy.failed()
        try:
            await self._session()
        except Refused as exc:
            self.last_error = str(exc)
            log.error("%s", exc)
            self.m_failures.inc(reason=_failure_reason(exc))
            self._stop_asking("the hub refused this gateway")
            if exc.code in (CloseCode.UNAUTHORIZED, CloseCode.UNSUPPORTED_VERSION):
                return policy.config_problem()  # keep trying, at the slowest pace
            return policy.failed()
        except ConnectionRejected as exc:
            self.last_error = f"hub rejected the WebSocket upgrade with HTTP {exc.status_code}"
            log.warning("%s", self.last_error)
            self.m_failures.inc(reason="upgrade_rejected")
            hint = retry_after_seconds(dict(exc.headers).get(b"retry-after"))
            if exc.status_code in (429, 503) and hint is not None:
                return policy.busy(hint)
            return policy.failed()
        except (OSError, HandshakeError, ConnectionClosed, ProtocolError, trio.TooSlowError,
                trio.BrokenResourceError) as exc:
            self.last_error = f"{type(exc).__name__}: {exc}"
            if _sequence_gap(exc) and not self.parts_in_seq_order:
                # the parts of split frames, sent right after their frame, made a gap
                # this hub does not take (max_holes = 0): from now on they go in order
                self.parts_in_seq_order = True
                log.warning("the hub closed the link for a sequence gap: the parts of "
                            "frames split for it are sent in sequence order from now on")
            if (isinstance(exc, ConnectionClosed) and exc.reason is not None
                    and exc.reason.code == CloseCode.REPLACED):
                log.error("the hub closed this connection: a newer connection with gateway id "
                          "%r replaced it (is the id configured on two gateways?)",
                          self.gateway.id)
            else:
                log.warning("hub link down: %s", self.last_error)
            reason = _failure_reason(exc)
            self.m_failures.inc(reason=reason)
            if reason == "hub_protocol":
                self._stop_asking("the hub broke the protocol")
            return policy.disconnected(trio.current_time(), link_lost=_link_lost(exc))
        finally:
            self.connected = False
        return policy.disconnected(trio.current_time())  # not reached: sessions end by raising

    async def _session(self) -> None:
        cfg = self.config
        started = trio.current_time()
        async with _hub_link(
            self.gateway.hub_url, self._ssl_context(), message_queue_size=16,
            max_message_size=1 << 20, connect_timeout=cfg.connect_timeout_s,
            disconnect_timeout=2, receive_buffer_size=None,
        ) as ws, _closing_on_protocol_error(ws):
            now = trio.current_time()
            hello_next = self.store.first_unacked
            conn = GatewayConnection(self.gateway.id, self.gateway.token, self.store.epoch,
                                     hello_next, heartbeat=cfg.heartbeat_s,
                                     max_message_bytes=1 << 20, now=now,
                                     compression=() if cfg.compression == "off"
                                     else (cfg.compression,),
                                     compression_level=cfg.compression_level,
                                     compression_min_bytes=cfg.compression_min_bytes,
                                     versions=tuple(range(1, cfg.max_protocol_version + 1)),
                                     resume=self.asks_positions,
                                     dropped=self._dropped_ranges())
            asked = self.asks_positions
            await ws.send_message(conn.hello(now))
            with trio.fail_after(cfg.connect_timeout_s):
                while conn.welcome is None:
                    events, _ = conn.receive(await ws.get_message(), trio.current_time())
                    for ev in events:
                        if isinstance(ev, Refuse):
                            raise Refused(ev.code, ev.reason)
            welcome = conn.welcome
            assert isinstance(welcome, Welcome)
            self._split_warned = False
            self.hub_version = welcome.version
            self.hub_max_records = welcome.max_records
            # before any acknowledgement: a state gone back in time (gateway/rollback.py)
            if self._first_welcome:
                rollback = await reissue(self.store, welcome.applied, hello_next)
                self._first_welcome = False
                if rollback is not None:
                    self.m_rollbacks.inc()
                    if self.on_state_rollback is not None:
                        self.on_state_rollback(rollback)
            await resume(self.store)
            self._take_positions(welcome, asked, hello_next)
            self._apply_ack(welcome.applied)
            self.connected = True
            self.m_connects.inc()
            self.reconnect.connected(trio.current_time())
            self.handshake_s = trio.current_time() - started
            self.m_handshake.set(self.handshake_s)
            self.last_error = None
            log.info("connected to %s (hub has %s)", self.gateway.hub_url,
                     welcome.applied[:3] or "nothing")
            if welcome.max_frame_bytes < cfg.max_frame_bytes:
                # frames are cut to uplink.max_frame_bytes when stored: larger than what
                # this hub takes, they are split as they are sent (_fit), which costs
                # frames and, for a single record over the hub's limit, the record
                log.warning("the hub takes frames of up to %d bytes, uplink.max_frame_bytes "
                            "is %d: set it to at most the hub's limit (frames between the "
                            "two are split as they are sent, a record alone over it is "
                            "dead-lettered)", welcome.max_frame_bytes, cfg.max_frame_bytes)
            try:
                pongs, to_answer = trio.open_memory_channel[bytes](1)
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._receiver, ws, conn, pongs)
                    nursery.start_soon(_answerer, ws, to_answer)
                    nursery.start_soon(heartbeat, conn, ws.send_message)
                    nursery.start_soon(self._sender, ws, conn, welcome)
                    if self._teller is not None:
                        nursery.start_soon(self._teller_task, ws, conn)
            except BaseExceptionGroup as group:
                reraise_meaningful(group, ProtocolError, ConnectionClosed, trio.TooSlowError,
                                   OSError, trio.BrokenResourceError)
            finally:
                await _going_away(ws)

    def _take_positions(self, welcome: Welcome, asked: bool, hello_next: int) -> None:
        """What WELCOME says of source positions: those handed back to a store started
        afresh, and whether this connection tells them (docs/protocol.md section 4.1)."""
        if asked and self.asks_positions:
            self.asks_positions = False
            self.handed_back = welcome.resume
            self.resumed.set()
        elif asked and welcome.resume:
            log.warning("the hub handed back source positions after the sources had started "
                        "from their beginning (uplink.resume_wait_s passed): not taken")
        self._teller, self._tell_seq = None, 0
        if welcome.positions and self.positions is not None and self.config.positions_every_s:
            had = IntervalSet(welcome.applied)
            if hello_next > 1:
                had.add_range(1, hello_next - 1)
            self._teller = Teller(had)

    async def _teller_task(self, ws: Any, conn: GatewayConnection) -> None:
        """Every ``uplink.positions_every_s``: POSITIONS as of the newest frame sent, when
        they moved and are true -- for a flood, when the sender is never done (it tells
        them itself each time it has sent all there is): one message per interval, not
        per frame."""
        while True:
            await trio.sleep(self.config.positions_every_s)
            if self._tell_seq:
                await self._tell_positions(ws, conn, self._tell_seq)

    async def _tell_positions(self, ws: Any, conn: GatewayConnection, seq: int) -> None:
        teller, noted = self._teller, self.positions
        positions = None if noted is None else noted.at(seq)
        if teller is None or positions is None:
            return
        first = self.store.first_unacked
        self._parts_stored = {k: v for k, v in self._parts_stored.items()
                              if max(v, default=0) >= first}
        parts = [(_int(k), [p for p, _ in _parts(v)])
                 for k, v in (self.store.checkpoints.get(SPLIT_KEY) or {}).items()]
        parts += self._parts_stored.items()
        if teller.may_tell(seq, positions, first_unacked=first, parts=parts):
            message = conn.positions(seq, positions, trio.current_time())
            if message is not None:
                await ws.send_message(message)

    def _apply_ack(self, ranges: list[tuple[int, int]]) -> None:
        watermark = 0
        if ranges and ranges[0][0] == 1:
            watermark = ranges[0][1]
        if watermark:
            self.store.ack(watermark)
        above = [r for r in ranges if r[0] > 1]
        if above:
            self.store.ack_set(above)
        self.acked_watermark = max(self.acked_watermark, watermark)
        if self.scheduler is not None:  # frees window room for the live-first sender
            self.scheduler.acked(watermark, above)
        self.last_ack_at = time.monotonic()
        self._ack_changed.set()
        self._ack_changed = trio.Event()

    async def _receiver(self, ws: Any, conn: GatewayConnection,
                        pongs: trio.MemorySendChannel[bytes]) -> None:
        """Read the hub's messages, never waiting on a send: a PONG goes to ``_answerer``.
        Waiting here for it to be written -- behind a DATA frame that waits on the socket
        buffers a busy hub is not emptying (its apply queue full behind a slow commit) --
        stopped the reading, and the hub's PINGs, unread, made the gateway judge it
        silent (4005: a reconnect each time the hub was busy; tests/test_backpressure.py)."""
        while True:
            events, reply = conn.receive(await ws.get_message(), trio.current_time())
            if reply is not None:
                with suppress(trio.WouldBlock):
                    # one waits to be written already: the hub hears from us when it is
                    pongs.send_nowait(reply)
            for ev in events:
                if isinstance(ev, Ack):
                    self._apply_ack([(1, ev.watermark), *ev.ranges] if ev.watermark else ev.ranges)
                elif isinstance(ev, Reject):
                    if (await self._dead_letter(ev.seq, ev.reason)
                            and self.on_frame_rejected is not None):
                        self.on_frame_rejected(ev.seq, ev.reason)

    async def _dead_letter(self, seq: int, reason: str, ack: bool = True,
                           body: bytes | None = None) -> bool:
        """Keep ``body`` (frame ``seq``'s, or records cut from it) in the dead-letter file,
        once: not again when the file holds it already (the same records of the same
        frame), and never cut off by a cancellation (shielded, bounded), so that what
        follows the entry -- the stand-in part stored with the split's progress, the ack
        -- is done in the same step; the caller's next checkpoint takes the cancellation.
        Whether the entry was written now (False: the file held it already)."""
        if body is None:
            frames = self.store.frames_from(seq, 1)
            body = self._as_sent(frames[0]) if frames and frames[0].seq == seq else None
        written = True
        if self.dead_letter_path is not None:
            with trio.CancelScope(shield=True) as scope:
                scope.deadline = trio.current_time() + DEAD_LETTER_TIMEOUT_S
                written = await self._write_dead_letter_once(seq, reason, body)
            if scope.cancelled_caught:  # a disk that hangs: the session ends, tried again
                raise OSError(f"writing frame {seq} to the dead-letter file took over "
                              f"{DEAD_LETTER_TIMEOUT_S} s")
        if written:
            self.m_rejected.inc()
            log.error("hub rejected frame %d as invalid: %s (kept in the dead-letter file)",
                      seq, reason)
        else:
            log.info("frame %d: the dead-letter file holds it already (%s)", seq, reason)
        if ack:
            self.store.ack_set([(seq, seq)])
            if self.scheduler is not None:
                self.scheduler.acked(0, [(seq, seq)])
        return written

    async def _write_dead_letter_once(self, seq: int, reason: str,
                                      body: bytes | None) -> bool:
        """Append the entry unless the dead-letter file holds it; whether it did."""
        assert self.dead_letter_path is not None
        epoch, first_unacked = self.store.epoch, self.store.first_unacked
        if self._dead_letters is None:
            self._dead_letters = await trio.to_thread.run_sync(
                read_dead_letter_keys, os.fspath(self.dead_letter_path), epoch, first_unacked)
        else:  # entries of acknowledged frames are never written again
            self._dead_letters = {k for k in self._dead_letters
                                  if k[0] == epoch and k[1] >= first_unacked}
        key = dead_letter_key(epoch, seq, body)
        if key in self._dead_letters:
            return False
        self._dead_letter_size = await write_dead_letter(self.dead_letter_path, {
            "seq": seq, "epoch": epoch, "reason": reason, "at": time.time(), "body": body})
        self.m_dead_letter_bytes.set(self._dead_letter_size)
        self._dead_letters.add(key)
        return True

    def dead_letter_written(self, size: int) -> None:
        """Someone else (the refused-record path) wrote the dead-letter file: it holds
        ``size`` bytes now, and the bound counts them before the next frame is sent."""
        if self._dead_letter_size is not None:
            self._dead_letter_size = max(self._dead_letter_size, size)

    async def _dead_letter_room(self) -> None:
        """While the dead-letter file is over ``gateway.dead_letter_max_bytes``: send no
        more frames.  A REJECT must be kept at once (the hub counts the frame done), so the
        bound is kept here, before sending: the frames wait in the spool, under its cap and
        its policy, and the gateway turns unhealthy (nothing acknowledged) -- rather than a
        hub that rejects every frame filling the tester's disk.  Sending goes on once the
        file is smaller (moved away, or ``edgegw dead-letters requeue`` run)."""
        limit = self.gateway.dead_letter_max_bytes
        if not limit or self._dead_letter_size is None or self._dead_letter_size < limit:
            return
        self.m_dead_letter_full.set(1)
        log.error("the dead-letter file %s holds %d bytes, over gateway.dead_letter_max_bytes "
                  "(%d): no more frames are sent until it is smaller; they wait in the spool "
                  "(edgegw dead-letters list says what the hub refused, and why)",
                  self.dead_letter_path, self._dead_letter_size, limit)
        try:
            while self._dead_letter_size >= limit:
                await trio.sleep(DEAD_LETTER_RECHECK_S)
                self._dead_letter_size = await self._dead_letter_file_size()
        finally:
            self.m_dead_letter_full.set(0)
        self._dead_letters = None  # the file's entries are read again: it is another one
        self.m_dead_letter_bytes.set(self._dead_letter_size)
        log.warning("the dead-letter file holds %d bytes now, under "
                    "gateway.dead_letter_max_bytes: frames are sent again",
                    self._dead_letter_size)

    async def _dead_letter_file_size(self) -> int:
        """The file's size; 0 when there is none, or when it cannot be looked at (logged:
        writing an entry fails then too, and ends the session, as before the bound)."""
        assert self.dead_letter_path is not None
        try:
            st = await trio.to_thread.run_sync(os.stat, os.fspath(self.dead_letter_path))
        except FileNotFoundError:
            return 0
        except OSError as exc:
            log.warning("cannot look at the dead-letter file's size (%s): taken as empty",
                        exc)
            return 0
        return st.st_size

    def _first_rid(self, f: StoredFrame) -> int | None:
        """The first record id of stored frame ``f``: its body's; for a body that does not
        decode, the next record id stored with it (``RID_KEY``) less its records, or a
        split's part's as the split's progress names it.  None: not known."""
        rid = _body_first_rid(f.body)
        if rid is not None:
            return rid
        nxt = (f.checkpoints or {}).get(RID_KEY)
        if isinstance(nxt, int) and nxt - f.n_records > 0:
            return nxt - f.n_records
        for marker in (self.store.checkpoints.get(SPLIT_KEY) or {}).values():
            with suppress(Exception):
                for part, first in _parts(marker):
                    if part == f.seq and isinstance(first, int) and first > 0:
                        return first
        return None

    def _as_sent(self, f: StoredFrame) -> bytes:
        """The body of stored frame ``f`` as the hub got it: a frame split for the hub
        holds its first part only (its other records are in their own frames, which the
        hub judges on their own), so a REJECT of it dead-letters that part, not the
        records sent (and applied) in the others."""
        marker = (self.store.checkpoints.get(SPLIT_KEY) or {}).get(str(f.seq))
        if marker is None:
            return f.body
        try:
            item = cbor2.loads(f.body)
            first_rid, sources, rows = to_rows(item) if is_columnar(f.body) else item
            cut = _progress(marker, len(rows), f.seq)[0]
            return cbor2.dumps([first_rid, sources, rows[:cut]]) if cut < len(rows) else f.body
        except Exception:  # it did not decode when it was sent either: sent as it is
            return f.body

    async def _sender(self, ws: Any, conn: GatewayConnection, welcome: Welcome) -> None:
        # Live first, backlog in large windows (spool helper): the sans-IO SendScheduler
        # decides what to fetch; see edgegw/gateway/scheduler.py and docs/spool.md.
        await self._settle_parts()
        # a hub that took no gap (max_holes = 0) gets every frame in sequence order: the
        # live lane waits for the backlog too (it would leave the gap the parts did)
        sched = self.scheduler = SendScheduler(self.config.window_frames,
                                               in_order=self.parts_in_seq_order)
        # frames made in the last LIVE_S seconds before the link came up count as live too
        sched.start(self.store.first_unacked, self.store.first_seq_since(LIVE_S),
                    welcome.applied)
        # the parts of split frames go right after their frame (or first, when the hub has
        # that frame already), never before it, whatever lane they are in
        first, self._held = self._parts_on_connect(welcome.applied)
        await self._send_ahead(ws, conn, welcome, first)
        while True:
            if welcome.lost:  # before any frame read below: none of them is under it
                await self._declare_dropped(ws, conn)
            if self._held:
                await self._release_held(ws, conn, welcome, sched)
            await self._dead_letter_room()
            progressed = False
            for want in sched.wants():
                if want.lane == "live":
                    durable = self.store.durable_seq  # read with the frames: no checkpoint
                    frames = self.store.frames_from(want.start, want.limit)
                    if not frames and durable >= want.start:
                        # the hub has every durable frame from the cursor on (WELCOME's
                        # applied set): the lane moves past them -- left behind them, it
                        # would wait for "a frame after the cursor", there already, and
                        # spin on a core until the next frame is made
                        sched.passed("live", [durable])
                        continue
                else:
                    frames = await self.store.read_frames(want.start, want.limit)
                    frames = [f for f in frames if f.seq < (want.below or f.seq + 1)]
                    frames = self._with_stand_ins(frames, want.start,
                                                  (want.below or want.start) - 1, want.limit)
                    if not frames:
                        sched.backlog_exhausted()
                        continue
                for f in frames:
                    if f.seq in sched.ahead or f.seq in self._held:
                        sched.passed(want.lane, [f.seq])  # sent, or goes, after its frame
                        continue
                    await self._send_frame(ws, conn, welcome, f)
                    sched.sent(want.lane, [f.seq])
                if frames:
                    progressed = True
                    break  # plan again: live frames that appeared meanwhile go first
            if not progressed and self._tell_seq:
                # all there is has been sent: positions as of the newest frame now, not at
                # the teller's next tick -- a state lost meanwhile would have the frames
                # sent since the last positions read again (docs/operations.md); under a
                # flood the sender is never idle and the tick tells them
                await self._tell_positions(ws, conn, self._tell_seq)
            if not progressed and not conn.lost_pending(self._first_held(conn)):
                # (a drop made during an await above -- held parts sent, a backlog read --
                # moved durable_seq past the frame that pushed it out: the wait below would
                # not wake for it, and its LOST would wait for the next ACK)
                await self._wait_for_work(sched)

    async def _declare_dropped(self, ws: Any, conn: GatewayConnection) -> None:
        """Frames the store dropped (``drop_oldest``) while connected that the hub lacks:
        a LOST says they will never come (docs/protocol.md section 4), so the hub counts
        them now and leaves no hole waiting for them until the next HELLO.  It names the
        lowest seq still held or still to be sent: a damaged frame's stand-in the hub has
        not acknowledged goes out as ever."""
        message = conn.lost(self._first_held(conn), trio.current_time(),
                            self._dropped_ranges())
        if message is not None:
            await ws.send_message(message)

    def _dropped_ranges(self) -> list[tuple[int, int]] | None:
        """The seqs the store dropped unacknowledged (None: a store that does not say,
        an embedder's own): with them the hub tells frames this gateway dropped from
        frames it acknowledged and has lost since (docs/protocol.md section 4)."""
        ranges = getattr(self.store, "dropped_ranges", None)
        return None if ranges is None else list(ranges)

    def _first_held(self, conn: GatewayConnection) -> int:
        """The lowest seq this gateway still holds or will still send (a LOST's next_seq)."""
        first_held = self.store.first_unacked
        for lo, hi in self.store.lost_ranges:
            if lo < first_held:
                gaps = conn.hub_has.missing(lo, min(hi, first_held - 1))
                if gaps:
                    first_held = gaps[0][0]
        return first_held

    async def _settle_parts(self) -> None:
        """Wait until a part whose ``append`` an earlier session left (cancelled when the
        link went) is durable, with the split's progress that names it: the split goes on
        from there, the part is not stored again."""
        seq, self._part_unsettled = self._part_unsettled, None
        if seq is not None and self.store.next_seq > seq:  # it was queued (or one after)
            await self.store.wait_for_frame_after(seq - 1)
        # a part whose storing was cut off is durable now, named by the split's progress
        # among the store's checkpoints, or was never stored: no longer a part of unknown seq
        for stored in self._parts_stored.values():
            stored[:] = [p for p in stored if p != _UNKNOWN_PART]

    def _with_stand_ins(self, frames: list[StoredFrame], lo: int, below_hi: int,
                        limit: int) -> list[StoredFrame]:
        """Frames the spool found damaged at recovery (``lost_ranges``) go out, in order, as
        empty stand-ins, so the hub's sequence stays gap-free (the gateway has already
        reported the damage as a GatewayEvent and in its metrics)."""
        lost = self.store.lost_ranges
        if not lost:
            return frames
        # never past the last frame read (a short read may stop at a byte budget): the
        # backlog cursor moves to the highest seq sent
        hi = frames[-1].seq if frames else below_hi
        stand_ins = [StoredFrame(s, encode_body(1, []), 0)
                     for a, b in lost for s in range(max(a, lo), min(b, hi) + 1)]
        if not stand_ins:
            return frames
        return sorted(frames + stand_ins[:limit], key=lambda f: f.seq)

    async def _wait_for_work(self, sched: SendScheduler) -> None:
        """Until a new frame is durable or an ack frees window room.  With room, a frame
        the live lane can send (from ``live_next``); with the window full, a frame newer
        than every one there -- it may have pushed the oldest out (a LOST to send), and
        frames already waiting cannot go before an ack: waiting for one of them returned
        at once, and the sender spun on a whole core for as long as the hub was slow to
        acknowledge."""
        after = sched.live_next - 1
        if sched.room <= 0:
            after = max(after, self.store.durable_seq)
        # taken now, with the scheduler's state read above (no checkpoint between): an ACK
        # that comes before the task below starts sets this one, not a newer -- missed, a
        # full window would wait for a frame that may never come, its frames unsent
        acked = self._ack_changed
        async with trio.open_nursery() as nursery:
            async def frame() -> None:
                await self.store.wait_for_frame_after(after)
                nursery.cancel_scope.cancel()

            async def ack() -> None:
                await acked.wait()
                nursery.cancel_scope.cancel()

            nursery.start_soon(frame)
            nursery.start_soon(ack)

    def _parts_on_connect(self, applied: list[tuple[int, int]]
                          ) -> tuple[list[int], dict[int, int]]:
        """The parts of split frames still to send on a new connection: those whose frame
        the hub has (they go first), and the rest (held until their frame is sent)."""
        if self.parts_in_seq_order:
            return [], {}
        first_unacked = self.store.first_unacked
        lost = self.store.lost_ranges

        def acked(seq: int) -> bool:
            return seq < first_unacked or any(lo <= seq <= hi for lo, hi in applied)

        first: list[tuple[int, int]] = []
        held: dict[int, int] = {}
        for key, marker in sorted((self.store.checkpoints.get(SPLIT_KEY) or {}).items(),
                                  key=lambda kv: _int(kv[0])):
            seq = _int(key)
            for part, rid in _parts(marker):
                if acked(part) or any(lo <= part <= hi for lo, hi in lost):
                    continue
                if acked(seq):
                    first.append((rid, part))
                else:
                    held[part] = seq
        return [p for _, p in sorted(first)], held

    async def _release_held(self, ws: Any, conn: GatewayConnection, welcome: Welcome,
                            sched: SendScheduler) -> None:
        """Parts held for a frame that its lane passed without sending it (it was gone:
        acknowledged meanwhile) go now, rather than wait for it for ever."""
        def passed(seq: int) -> bool:
            if seq < sched.live_from:
                return seq < sched.backlog_next
            return seq < sched.live_next

        ready = sorted((seq, p) for p, seq in self._held.items() if passed(seq))
        for _, p in ready:
            del self._held[p]
        await self._send_ahead(ws, conn, welcome, [p for _, p in ready])

    async def _send_ahead(self, ws: Any, conn: GatewayConnection, welcome: Welcome,
                          seqs: list[int]) -> None:
        """Send the stored frames ``seqs`` now, out of their lane's order (each once on the
        connection: one already sent, or acknowledged, is not sent again)."""
        sched = self.scheduler
        for seq in seqs:
            if sched is not None and seq in sched.in_flight:
                continue
            frames = await self.store.read_frames(seq, 1)
            if frames and frames[0].seq == seq:
                await self._send_frame(ws, conn, welcome, frames[0], ahead=True)

    async def _send_frame(self, ws: Any, conn: GatewayConnection, welcome: Welcome,
                          f: StoredFrame, ahead: bool = False) -> None:
        """Send a stored frame (cut for the hub when it is over its limits), then the parts
        cut from it, in record order, before anything else."""
        f = await self._fit(welcome, f)
        data = conn.data(f.seq, f.body, trio.current_time(), time.time())
        problem = None
        if f.n_records > welcome.max_records:
            problem = (f"{f.n_records} records exceed the hub's limit of "
                       f"{welcome.max_records} per frame")
        elif max(len(data), len(f.body)) > welcome.max_frame_bytes:
            # a compressed body counts at its full size: the hub's limit bounds both
            problem = (f"frame of {max(len(data), len(f.body))} bytes exceeds the hub's "
                       f"limit of {welcome.max_frame_bytes}")
        if problem is not None:
            # the hub would close the link for this frame, again and again: keep it
            # in the dead-letter file and send a stand-in that says so, so the
            # hub's sequence stays gap-free and the loss is visible there too
            await self._dead_letter(f.seq, problem, ack=False, body=f.body)
            data = conn.data(f.seq, _stand_in(f.body, f.seq, problem, self._first_rid(f)),
                             trio.current_time(), time.time())
        await ws.send_message(data)
        self.m_frames.inc()
        self.m_bytes.inc(len(data))
        self.m_body_bytes.inc(len(f.body))
        if self._teller is not None:
            self._teller.sent(f.seq)
            if self.positions is not None and self.positions.at(f.seq) is not None:
                self._tell_seq = max(self._tell_seq, f.seq)
        if ahead and self.scheduler is not None:
            self.scheduler.sent_ahead([f.seq])
        marker = (self.store.checkpoints.get(SPLIT_KEY) or {}).get(str(f.seq))
        if marker is not None and not self.parts_in_seq_order:
            parts = [p for _, p in sorted((rid, p) for p, rid in _parts(marker))]
            for p in parts:
                self._held.pop(p, None)
            await self._send_ahead(ws, conn, welcome, parts)

    async def _fit(self, welcome: Welcome, f: StoredFrame) -> StoredFrame:
        """The frame as this hub takes it.  For a v1 hub, spooled columns become v1 rows
        (docs/protocol.md section 9).  A frame over the hub's ``max_records``, or whose
        body as sent is over its ``max_frame_bytes``, is cut: its first part goes under its
        own seq, the rest is first stored as new frames (sent like any other), the split's
        progress durable with them (``SPLIT_KEY``), so a crash anywhere neither loses a
        record nor sends one twice -- record ids stay those of the stored frame.  A frame
        split before (this run or an earlier one) is sent cut the same way.  What still
        does not fit (one record alone over the limit) is left to ``_send_frame``'s
        dead-letter path; a body that does not decode goes as it is (the hub rejects it,
        as it would any invalid frame, and the rest flow on)."""
        marker = (self.store.checkpoints.get(SPLIT_KEY) or {}).get(str(f.seq))
        if welcome.version == 2 and self.config.max_protocol_version >= 3:
            # typed float columns (v3, spooled before the hub was known) go as arrays
            f = dataclasses.replace(f, body=plain_floats(f.body))
        v1_columns = welcome.version < 2 and is_columnar(f.body)
        if (marker is None and not v1_columns and f.n_records <= welcome.max_records
                and len(f.body) + DATA_ENVELOPE_BYTES <= welcome.max_frame_bytes):
            return f  # the common case: as stored
        try:
            item = cbor2.loads(f.body)
            first_rid, sources, rows = to_rows(item) if is_columnar(f.body) else item
            if not (isinstance(first_rid, int) and isinstance(rows, list)):
                raise TypeError("not a frame body")
        except Exception:
            log.exception("frame %d: its body does not decode to v1 rows", f.seq)
            return f
        if marker is None and len(rows) <= welcome.max_records:
            body = cbor2.dumps([first_rid, sources, rows]) if v1_columns else f.body
            if len(body) + DATA_ENVELOPE_BYTES <= welcome.max_frame_bytes:
                return StoredFrame(f.seq, body, len(rows))
        n = len(rows)
        cut, stored_to, end = _progress(marker, n, f.seq)
        parts = _parts(marker)
        sizes = [len(cbor2.dumps(r)) for r in rows[:end]]
        base = len(cbor2.dumps([_WIDEST_RID, sources, []])) + 8  # the records' array head
        limit = self._part_limit(welcome, f.seq)
        if stored_to < end:  # a split the gateway stopped in: store the rest first
            parts = await self._store_parts(f.seq, first_rid, sources, rows, cut, stored_to,
                                            end, sizes, base, limit, welcome.max_records,
                                            parts)
        plan = _plan(sizes[:cut], base, limit, welcome.max_records)
        if len(plan) > 1:
            new_cut = plan[0][1]
            # a warning once per connection (frames stored before this hub's limits
            # were known, or over its max_frame_bytes): the counter carries the rest
            self.m_split.inc()
            log.log(logging.DEBUG if self._split_warned else logging.WARNING,
                    "frame %d (%d records, %d bytes as sent) is over the hub's limits "
                    "(%d records, %d bytes): sent as %d frames, the first under its own "
                    "seq (uplink_frames_split_total counts them)", f.seq, cut,
                    base + sum(sizes[:cut]), welcome.max_records, welcome.max_frame_bytes,
                    len(plan))
            self._split_warned = True
            await self._store_parts(f.seq, first_rid, sources, rows, new_cut, new_cut, cut,
                                    sizes, base, limit, welcome.max_records, parts)
            cut = new_cut
        return StoredFrame(f.seq, cbor2.dumps([first_rid, sources, rows[:cut]]), cut)

    def _part_limit(self, welcome: Welcome, seq: int) -> int:
        """The largest body of a part: what the hub takes, and what the store takes with
        the split's progress among the checkpoints."""
        limit = welcome.max_frame_bytes - DATA_ENVELOPE_BYTES
        widest = {**self._splits(), "": _WIDEST_RID,
                  str(seq): [_WIDEST_RID] * 3 + [[[_WIDEST_RID] * 2] * MAX_PARTS]}
        room = self.store.max_body_bytes(_WIDEST_RID, {SPLIT_KEY: widest})
        return limit if room is None else min(limit, room)

    def _splits(self) -> dict[str, Any]:
        """The splits still needed: of frames not yet acknowledged, or whose parts are not
        (they are sent right after their frame, or first when it is acknowledged)."""
        first = self.store.first_unacked
        return {k: v for k, v in (self.store.checkpoints.get(SPLIT_KEY) or {}).items()
                if max([_int(k), *(p for p, _ in _parts(v))]) >= first}

    async def _store_parts(self, seq: int, first_rid: int, sources: list[Any],
                           rows: list[Any], cut: int, start: int, end: int, sizes: list[int],
                           base: int, limit: int, max_records: int,
                           parts: list[tuple[int, int]]) -> list[tuple[int, int]]:
        """Store frame ``seq``'s records ``[start, end)`` as new frames that fit, each
        durable with the split's progress ``[cut, its end, end, parts]`` (``parts``: those
        stored before, ``(seq, first_rid)``, and this one's, under the seq the store gives
        it next -- a guess only when the store waits in ``append``, which
        ``_send_frame`` survives: it sends that frame early, the part in order).  A record
        alone over ``limit`` is kept in the dead-letter file and stored as a stand-in that
        says so (as ``_send_frame`` does with a frame that cannot be cut).  Returns the
        parts with the new ones."""
        parts = sorted(parts, key=lambda p: p[1])
        for a, b in _plan(sizes[start:end], base, limit, max_records):
            a, b = a + start, b + start
            body = cbor2.dumps([first_rid + a, sources, rows[a:b]])
            if len(body) > limit:  # one record
                problem = (f"record {first_rid + a} of frame {seq}: {len(body)} bytes alone, "
                           f"over the {limit} a frame may hold for this hub")
                # shielded: a cancellation (the link goes) lands only in ``append``, once
                # the stand-in is queued with the progress that names it (no checkpoint
                # between), and ``_part_unsettled`` makes the next session wait for it
                await self._dead_letter(seq, problem, ack=False, body=body)
                body = _stand_in(body, seq, problem)
            rid = first_rid + a
            known = sorted([*parts, (self.store.next_seq, rid)], key=lambda p: p[1])
            progress = {**self._splits(),
                        str(seq): [cut, b, end, [list(p) for p in known[:MAX_PARTS]]]}
            self._part_unsettled = self.store.next_seq
            # until its seq is known, a part of ``seq`` counts as above every frame: no
            # positions as of ``seq`` or later are told meanwhile (``_tell_positions``)
            stored = self._parts_stored.setdefault(seq, [])
            stored.append(_UNKNOWN_PART)
            try:
                part = await self.store.append(body, b - a, {SPLIT_KEY: progress},
                                               over_cap=True)
            except ValueError as exc:  # never: parts are sized for the store too
                # a stand-in, not a session ended on this frame again and again
                problem = f"records {rid}..{first_rid + b - 1} of frame {seq}: {exc}"
                await self._dead_letter(seq, problem, ack=False, body=body)
                self._part_unsettled = self.store.next_seq
                part = await self.store.append(_stand_in(body, seq, problem), 1,
                                               {SPLIT_KEY: progress}, over_cap=True)
            self._part_unsettled = None
            stored[stored.index(_UNKNOWN_PART)] = part
            parts = sorted([*parts, (part, rid)], key=lambda p: p[1])
        return parts


async def _answerer(ws: Any, pongs: trio.MemoryReceiveChannel[bytes]) -> None:
    """Write the receiver's PONGs, in order, one at a time."""
    async for pong in pongs:
        await ws.send_message(pong)


@asynccontextmanager
async def _hub_link(url: str, ssl_context: ssl.SSLContext | None, *, connect_timeout: float,
                    disconnect_timeout: float, **options: Any
                    ) -> AsyncIterator[WebSocketConnection]:
    """``trio_websocket.open_websocket_url``, except that the connection's reader task
    outlives a cancellation of the session until the connection is closed: a gateway
    stopping (SIGTERM, ``Gateway`` stopped: its nursery cancelled) sends its close and then
    reads the hub's answering close, so the close handshake completes as soon as the hub
    answers.  Under ``open_websocket_url`` the reader was cancelled with the session, the
    answer was never read and every stop waited out ``CLOSE_TIMEOUT_S``.

    Through trio-websocket's public API: ``connect_websocket_url`` runs the reader in a
    nursery given to it, here one shielded from the stop; the session (the body) runs in a
    scope of its own, which a task outside the shield cancels when the stop reaches it."""
    session = trio.CancelScope()

    async def pass_the_stop_on() -> None:
        try:
            await trio.sleep_forever()
        finally:  # cancelled: the gateway stops (or the session ended, and it is moot)
            session.cancel()

    try:
        async with trio.open_nursery() as stop:
            stop.start_soon(pass_the_stop_on)
            with trio.CancelScope(shield=True):
                async with trio.open_nursery() as io:
                    connected = False
                    try:
                        with session:
                            try:
                                with trio.fail_after(connect_timeout):
                                    ws = await connect_websocket_url(io, url, ssl_context,
                                                                     **options)
                            except trio.TooSlowError:  # as open_websocket_url says them
                                raise ConnectionTimeout from None
                            except OSError as exc:
                                raise HandshakeError from exc
                            connected = True
                            try:
                                yield ws
                            finally:
                                # closed with 1000 as open_websocket_url closes, unless
                                # the session closed it already (``_going_away``, ...)
                                with trio.CancelScope(shield=True) as closing:
                                    closing.deadline = trio.current_time() + disconnect_timeout
                                    await ws.aclose()
                    finally:
                        if connected:  # the reader ends with the connection; bounded
                            io.cancel_scope.deadline = trio.current_time() + disconnect_timeout
                        else:
                            io.cancel_scope.cancel()
            # stopped: the cancellation the session's scope caught goes on from here
            await trio.lowlevel.checkpoint()
            stop.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        # the one exception that ended the session, as it was raised (a cancellation of
        # ``pass_the_stop_on`` is no news): callers look for its type
        rest = group.split(trio.Cancelled)[1] or group
        while isinstance(rest, BaseExceptionGroup) and len(rest.exceptions) == 1:
            rest = rest.exceptions[0]
        raise rest from None


async def _going_away(ws: Any) -> None:
    """On shutdown (the session cancelled from outside: SIGTERM, ``Gateway`` stopped) say
    so with 1001 going away: the hub then logs a clean close, not 1006 "connection lost".
    trio-websocket would close with 1000 only if not cancelled; bounded, as the hub may
    not answer.  The hub's answering close is read (``_hub_link``): it ends the wait."""
    if trio.current_effective_deadline() != -math.inf:  # not a cancellation: closing as is
        return
    with trio.CancelScope(shield=True):
        with trio.move_on_after(CLOSE_TIMEOUT_S) as waited:
            await ws.aclose(CloseCode.GOING_AWAY, "gateway shutting down")
        # (trio-websocket's aclose swallows the timeout's Cancelled while an exception --
        # the stop -- is being handled: the clock says whether the bound ran out)
        if trio.current_time() >= waited.deadline:
            log.warning("hub link closed without the hub's answer: it did not answer the "
                        "going-away close within %g s", CLOSE_TIMEOUT_S)
        else:  # trio-websocket's record of the close: the hub's answering close frame
            log.info("hub link closed, the hub's close: %s", ws.closed)


@asynccontextmanager
async def _closing_on_protocol_error(ws: Any) -> AsyncIterator[None]:
    """Close with the code of the rule the hub broke (protocol.md section 8: 4002 for a
    WELCOME version not offered, 4004 for an encoding not offered or a malformed message,
    4005 for a heartbeat timeout) rather than the 1000 trio-websocket closes with when
    the session ends; bounded like ``_going_away``, as the hub may not answer."""
    try:
        yield
    except ProtocolError as exc:
        reason = exc.reason.encode()[:123].decode(errors="ignore")  # the WebSocket limit
        with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_TIMEOUT_S):
            await ws.aclose(exc.code, reason)
        raise


def _failure_reason(exc: BaseException) -> str:
    """``edgegw_uplink_failures_total``'s ``reason`` for a session that ended with ``exc``
    (docs/operations.md lists them): what an operator must tell apart -- a hub that
    refuses this gateway, one that breaks the protocol, a link that dies."""
    if isinstance(exc, Refused):
        return {CloseCode.UNAUTHORIZED: "unauthorized",
                CloseCode.UNSUPPORTED_VERSION: "version"}.get(exc.code, "refused")
    if isinstance(exc, ProtocolError):
        if exc.code == CloseCode.HEARTBEAT_TIMEOUT:
            return "heartbeat_timeout"
        # the hub sent what the protocol forbids (a bad WELCOME or ACK): retried as any
        # failure, and every retry will fail alike until the hub is mended
        return "hub_protocol"
    if isinstance(exc, ConnectionClosed):
        if exc.reason is None or _link_lost(exc):
            return "link_lost"
        return "replaced" if exc.reason.code == CloseCode.REPLACED else "hub_closed"
    if isinstance(exc, trio.TooSlowError):
        return "timeout"
    if isinstance(exc, HandshakeError):
        return "handshake"
    return "link_lost"


def _link_lost(exc: BaseException) -> bool:
    """The connection died under us (no close from the hub): the link, not the hub."""
    if isinstance(exc, ConnectionClosed):
        return exc.reason is None or exc.reason.code == 1006  # no close frame
    if isinstance(exc, ProtocolError):
        return exc.code == CloseCode.HEARTBEAT_TIMEOUT
    return isinstance(exc, (OSError, trio.BrokenResourceError))


def _sequence_gap(exc: BaseException) -> bool:
    """The hub closed the connection for a sequence gap (section 5: ``max_holes``)."""
    return (isinstance(exc, ConnectionClosed) and exc.reason is not None
            and exc.reason.code == CloseCode.PROTOCOL_ERROR
            and "sequence gap" in (exc.reason.reason or ""))


def _progress(marker: Any, n: int, seq: int) -> tuple[int, int, int]:
    """A split's stored progress ``(cut, stored_to, end)`` for a frame of ``n`` records
    (``(n, n, n)``: never split).  The gateway writes it itself, into a checksummed spool:
    one that does not make sense is logged and the frame sent as far as it can tell
    (whole), rather than stopping the sender on it."""
    if marker is None:
        return n, n, n
    try:
        cut, stored_to, end = (int(x) for x in marker[:3])
        if not 0 < cut <= stored_to <= end <= n:
            raise ValueError(marker)
    except (TypeError, ValueError):
        log.error("frame %d: its split progress %r does not fit its %d records; sent whole",
                  seq, marker, n)
        return n, n, n
    return cut, stored_to, end


def _parts(marker: Any) -> list[tuple[int, int]]:
    """The parts ``(seq, first_rid)`` a split's progress names (none in one a gateway
    before them wrote, or one that does not make sense: those parts go in seq order)."""
    try:
        return [(int(seq), int(rid)) for seq, rid in marker[3]]
    except (TypeError, ValueError, IndexError, KeyError):
        return []


def _int(key: str) -> int:
    try:
        return int(key)
    except ValueError:
        return 0


def _plan(sizes: list[int], base: int, limit: int, max_records: int) -> list[tuple[int, int]]:
    """Cut records of encoded ``sizes`` into runs ``[a, b)`` in order, each of at most
    ``max_records`` whose body (``base`` plus their sizes) fits ``limit``; a record alone
    over it gets a run of its own."""
    parts: list[tuple[int, int]] = []
    a, size = 0, base
    for i, s in enumerate(sizes):
        if i > a and (size + s > limit or i - a >= max_records):
            parts.append((a, i))
            a, size = i, base
        size += s
    parts.append((a, len(sizes)))
    return parts


def _body_first_rid(body: bytes) -> int | None:
    """The first record id a frame body holds (rows or columns); None when it does not
    decode to one."""
    with suppress(Exception):
        item = cbor2.loads(body)
        first_rid = to_rows(item)[0] if is_columnar(body) else item[0]
        if isinstance(first_rid, int) and first_rid > 0:
            return first_rid
    return None


def _stand_in(body: bytes, seq: int, reason: str, first_rid: int | None = None) -> bytes:
    """A one-record frame body standing in for a dead-lettered frame, under the first
    record id of the records it stands for (``first_rid`` if known, else ``body``'s): an
    id the hub applied already would make it drop the stand-in as a duplicate
    (docs/protocol.md section 3)."""
    rid = first_rid or _body_first_rid(body)
    if rid is None:
        rid = 1
        log.warning("frame %d: its first record id is not known; its stand-in goes under "
                    "record id 1 (the hub drops it if it applied that one)", seq)
    event = GatewayEvent("gateway", time.time(), "error", "frame_dead_lettered",
                         f"frame {seq} kept in the gateway's dead-letter file: {reason}",
                         {"seq": seq})
    return encode_body(rid, [event])
