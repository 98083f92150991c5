"""The hub's gateway ingest (``Ingest``): accepts gateways, applies their frames durably,
and owns the hub's one HTTP port.

On that port: ``/ws/gateway`` (wire protocol v1) and the status endpoints (``/healthz``,
``/api/stats``, ``/metrics``: ``edgegw.web.status``).  The whole hub (``edgegw.hub.Hub``,
``app.py``) adds the live fan-out, the dashboard and the history API to it.
Consumers (live state, fan-out) register with ``add_consumer`` and see every applied
frame's records, in the order frames were applied; after a restart the stored frames are
replayed to them first.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import trio

from .. import failpoints
from ..auth.hub import HubSecurity, token_matches
from ..heartbeat import heartbeat
from ..metrics import AGE_BUCKETS, Metrics, internal_errors, report_internal_error
from ..protocol import (
    SUPPORTED_VERSIONS,
    CloseCode,
    Data,
    Duplicate,
    FrameError,
    Hello,
    HubConnection,
    ProtocolError,
    decode_body,
)
from ..records import Record, RecordError, from_wire
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
from .registry import GatewayRegistry, GatewaySession
from .store import FrameToApply, HubStore

log = logging.getLogger("edgegw.hub")

GATEWAY_PATH = "/ws/gateway"


class Consumer(Protocol):
    def on_records(self, gateway_id: str, first_rid: int, records: list[Record]) -> None: ...
    def on_gateway(self, gateway_id: str, connected: bool, now: float) -> None: ...


def decode_records(body: bytes, max_records: int) -> tuple[int, list[Record]]:
    """A frame body to (first_rid, records); FrameError if any record is malformed."""
    first_rid, sources, wire = decode_body(body, max_records)
    try:
        return first_rid, [from_wire(item, sources) for item in wire]
    except (RecordError, TypeError) as exc:
        raise FrameError(f"bad record: {exc}") from None


class Ingest:
    def __init__(self, config: HubConfig, metrics: Metrics | None = None) -> None:
        self.config = config
        self.metrics = metrics or Metrics()
        self.store = HubStore(Path(config.hub.data_dir) / "hub.sqlite3",
                              keep_bodies=config.hub.keep_frame_bodies)
        self.http = HttpServer(config.http, metrics=self.metrics, raise_fd_limit=True)
        # the access guard, the sign-in page, TLS (edgegw/auth, docs/security.md)
        self.security = HubSecurity(config, self.http, self.metrics)
        self.consumers: list[Consumer] = []
        self.connected = GatewayRegistry()
        self.handshaking: set[WebSocket] = set()  # upgraded, no WELCOME sent yet
        self.refused: dict[str, int] = {}
        self.port: int | None = None
        self.started_at = time.time()
        m = self.metrics
        self.m_frames = m.counter("hub_frames_applied_total", "data frames applied")
        self.m_records = m.counter("hub_records_applied_total", "records applied")
        self.m_dups = m.counter("hub_duplicate_frames_total", "duplicate frames dropped")
        self.m_refused = m.counter("hub_refused_total", "gateway connections refused")
        self.m_replaced = m.counter("hub_connections_replaced_total",
                                    "gateway connections closed for a newer one (4008)")
        self.m_busy = m.counter("hub_busy_total", "probes and upgrades answered 503 (busy)")
        self.m_proto = m.counter("hub_protocol_errors_total", "connections closed for a fault")
        self.m_rejected = m.counter("hub_frames_rejected_total", "invalid frames dead-lettered")
        self.m_bad_http = m.counter("hub_bad_http_requests_total", "malformed HTTP requests")
        self.m_pruned = m.counter("hub_frames_pruned_total",
                                  "applied frames deleted after the retention period")
        self.m_connected = m.gauge("hub_gateways_connected", "gateways connected now")
        self.h_apply = m.histogram(
            "hub_frame_apply_seconds", "seconds from a data frame's arrival until it is applied "
            "and its ACK is due (queue, decode, durable commit, live state): one per data "
            "frame")
        self.h_age = m.histogram(
            "hub_record_age_seconds", "seconds from a record's creation (its ts) to its "
            "durable apply at the hub: one observation per record applied", AGE_BUCKETS)
        internal_errors(m)  # exported (as 0) before anything goes wrong
        m.add_collector(lambda: self.m_connected.set(len(self.connected)))
        self.http.on_bad_request = lambda reason: self.m_bad_http.inc()
        h = config.hub
        self.http.add_ws_route(GATEWAY_PATH, self._gateway_endpoint,
                               max_message_size=h.max_frame_bytes,
                               admit=self._admit_gateway)
        self.http.add_route("GET", GATEWAY_PATH, self._gateway_probe)
        #: more sections of ``/api/stats``, by name (the whole hub adds its live state's)
        self.stats_sections: dict[str, Callable[[], Any]] = {}
        install_status(self.http, health=self.health, stats=self.stats, metrics=self.metrics)

    def add_consumer(self, consumer: Consumer) -> None:
        self.consumers.append(consumer)

    # -- lifecycle --
    async def run(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        await self.store.open()
        try:
            if self.consumers:
                await self._replay()
            async with trio.open_nursery() as nursery:
                self.security.log_warnings()
                await nursery.start(self.security.watch_reload)
                listeners = await nursery.start(self.http.serve, self.config.hub.listen,
                                                self.config.hub.port)
                self.port = listeners[0].socket.getsockname()[1]
                log.info("hub listening on %s:%s (%s)", self.config.hub.listen, self.port,
                         "https" if self.security.tls else "http")
                if self.config.hub.retain_frames_hours > 0:
                    nursery.start_soon(self._pruner)
                task_status.started(self.port)
        finally:
            with trio.CancelScope(shield=True):
                await self.store.close()

    async def _replay(self) -> None:
        """Feed every stored frame to the consumers, oldest first (state rebuild)."""
        max_records = self.config.hub.max_records_per_frame

        def decode(gw: str, _epoch: str, _seq: int, _rid: int, body: bytes
                   ) -> tuple[str, int, list[Record]] | None:
            try:
                first_rid, records = decode_records(body, max_records)
            except (FrameError, ProtocolError):
                return None
            except Exception:  # one undecodable stored frame must not stop the start
                report_internal_error(self.metrics, "hub_replay", log,
                                      "decoding a stored frame of gateway %s", gw)
                return None
            return gw, first_rid, records

        async for batch in self.store.stored_frames(decode):
            for gw, first_rid, records in batch:
                self._feed(gw, first_rid, records)

    async def _pruner(self) -> None:
        """Keep the frame table to ``retain_frames_hours``: a hub runs for months."""
        h = self.config.hub
        while True:
            try:
                n = await self.store.prune(time.time() - h.retain_frames_hours * 3600)
            except Exception:  # (a locked or failing database) a boundary: try next time
                report_internal_error(self.metrics, "hub_prune", log, "pruning old frames")
            else:
                if n:
                    self.m_pruned.inc(n)
                    log.info("pruned %d frame(s) older than %g h", n, h.retain_frames_hours)
            await trio.sleep(h.prune_interval_s)

    # -- HTTP --
    def health(self) -> tuple[bool, dict[str, Any]]:
        return True, {"status": "ok", "uptime_s": round(time.time() - self.started_at, 1),
                      "gateways_connected": len(self.connected), **self.security.health()}

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
        out: dict[str, Any] = {"gateways": gateways, "metrics": self.metrics.as_dict()}
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

    def _check_hello(self, hello: Hello, request: Request) -> tuple[int, str] | None:
        if not set(hello.versions) & set(SUPPORTED_VERSIONS):
            return (CloseCode.UNSUPPORTED_VERSION,
                    f"unsupported protocol version(s) {list(hello.versions)}; "
                    f"this hub speaks {list(SUPPORTED_VERSIONS)}")
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
                             compression=() if h.compression == "off" else (h.compression,))
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
                log.warning("refused gateway %r from %s: %s", gw, request.remote, reason)
                self.refused[gw] = self.refused.get(gw, 0) + 1
                self.m_refused.inc(reason=_reason_key(code))
                await ws.send_message(conn.refuse(code, reason, trio.current_time()))
                await ws.aclose(code, reason)
                return
            session = GatewaySession(gw, request.remote, hello.epoch)
            old = self.connected.claim(session)  # newest wins: the old one is cancelled
            if old is not None:
                self.m_replaced.inc()
                log.warning("gateway %s: connection from %s replaced by a newer one from %s",
                            gw, old.remote, request.remote)
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
                    await self._welcome(ws, conn, session, hello)
                    await self._serve_gateway(ws, conn, gw, hello.epoch)
            if session.replaced:
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
                       hello: Hello) -> None:
        gw = hello.gateway_id
        applied = self.store.applied_set(gw, hello.epoch)
        welcome = conn.accept(applied, trio.current_time())
        if conn.declared_lost:
            log.warning("gateway %s: %d frame(s) below seq %d were dropped by the gateway "
                        "before reaching the hub", gw, conn.declared_lost, hello.next_seq)
            await self.store.declare_lost(gw, hello.epoch, hello.next_seq - 1,
                                          conn.declared_lost)
        await ws.send_message(welcome)
        self.handshaking.discard(ws)
        log.info("gateway %s connected from %s (epoch %s, next seq %d)", gw, session.remote,
                 hello.epoch, hello.next_seq)
        self._gateway_event(gw, True)

    async def _gateway_endpoint(self, ws: WebSocket, request: Request) -> None:
        self.handshaking.add(ws)  # counted for load shedding until WELCOME is sent
        try:
            await self.handle_gateway(ws, request)
        finally:
            self.handshaking.discard(ws)

    def _gateway_event(self, gw: str, connected: bool) -> None:
        for c in self.consumers:
            try:
                c.on_gateway(gw, connected, time.time())
            except Exception:  # a consumer's bug must not end the connection
                report_internal_error(self.metrics, "hub_consumer", log,
                                      "%s.on_gateway(%r, %s)", type(c).__name__, gw, connected)

    def _feed(self, gw: str, first_rid: int, records: list[Record]) -> None:
        """Hand one applied frame's records to every consumer.  The frame is durably
        applied already; a consumer that fails on it misses it (counted), nothing else."""
        for c in self.consumers:
            try:
                c.on_records(gw, first_rid, records)
            except Exception:
                report_internal_error(self.metrics, "hub_consumer", log,
                                      "%s.on_records(gateway %s, rids %d..%d)",
                                      type(c).__name__, gw, first_rid,
                                      first_rid + len(records) - 1)

    async def _serve_gateway(self, ws: WebSocket, conn: HubConnection, gw: str,
                             epoch: str) -> None:
        """Receive, apply and acknowledge until the connection ends, which it only does by
        an exception: the peer's fault (ProtocolError, MessageTooBig), the peer going away
        (ConnectionClosed), or a bug."""
        # each frame with its arrival time (hub_frame_apply_seconds)
        send, receive = trio.open_memory_channel[tuple[Data, float]](
            self.config.hub.apply_queue_frames)

        async def receiver() -> None:
            try:
                while True:
                    data = await ws.get_message()
                    events, reply = conn.receive(data, trio.current_time())
                    for ev in events:
                        if isinstance(ev, Data):
                            await send.send((ev, trio.current_time()))
                        elif isinstance(ev, Duplicate):
                            self.store.count_duplicate(gw)
                            self.m_dups.inc()
                    if reply is not None:
                        await ws.send_message(reply)
            finally:
                # Closed synchronously, not with ``async with send``: its exit is a
                # checkpoint, and the applier -- woken by the close, its loop ended --
                # cancelled this task there, so a Cancelled replaced the fault being raised
                # and the connection ended as if normally: closed with 1000, no reason, no
                # log line, in about half the tries (issue 10).  See docs/reliability.md.
                send.close()

        def note_rtt() -> None:
            session = self.connected.get(gw)
            if session is not None and conn.rtt is not None:
                session.rtt_ms = round(conn.rtt * 1000, 2)

        expected = (ProtocolError, MessageTooBig, ConnectionClosed)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(receiver)
                nursery.start_soon(heartbeat, conn, ws.send_message, note_rtt)
                await self._applier(ws, conn, gw, epoch, receive)
                nursery.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            # A bug anywhere in the connection outranks the peer's fault: it must be seen.
            bugs = group.subgroup(lambda e: isinstance(e, Exception) and not isinstance(
                e, (BaseExceptionGroup, *expected)))
            if bugs is not None:
                raise bugs from None
            reraise_meaningful(group, *expected)

    async def _applier(self, ws: WebSocket, conn: HubConnection, gw: str, epoch: str,
                       receive: trio.MemoryReceiveChannel[tuple[Data, float]]) -> None:
        max_records = self.config.hub.max_records_per_frame
        async for first in receive:
            frames = [first]
            while len(frames) < 256:  # group commit: whatever else is already waiting
                try:
                    frames.append(receive.receive_nowait())
                except (trio.WouldBlock, trio.EndOfChannel):
                    break
            good: list[tuple[FrameToApply, int, list[Record]]] = []
            bad: list[tuple[FrameToApply, str]] = []
            for d, _ in frames:
                try:
                    first_rid, records = decode_records(d.body, max_records)
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
                good.append((FrameToApply(gw, epoch, d.seq, first_rid, len(records), d.body),
                             first_rid, records))
            # frames already applied (by an earlier connection of this gateway) are skipped
            # by the commit itself: counted as duplicates and acked, not handed on again
            skipped = await self.store.commit([g[0] for g in good], rejected=bad)
            failpoints.hit("hub.after_commit")
            now = trio.current_time()
            wall = time.time()
            for _ in skipped:
                self.store.count_duplicate(gw)
                self.m_dups.inc()
            for f, first_rid, records in good:
                if (f.gateway, f.epoch, f.seq) not in skipped:
                    self.m_frames.inc()
                    self.m_records.inc(len(records))
                    self._feed(gw, first_rid, records)
                    self.h_age.observe_many([wall - r.ts for r in records])
                ack = conn.applied(f.seq, now)
            # observed before any await: a scrape sees it together with the counts above
            done = trio.current_time()
            for _, received in frames:
                self.h_apply.observe(done - received)
            for f, reason in bad:
                if (f.gateway, f.epoch, f.seq) in skipped:
                    ack = conn.applied(f.seq, now)
                    continue
                self.m_rejected.inc()
                log.warning("gateway %s: frame %d rejected: %s", gw, f.seq, reason)
                await ws.send_message(conn.rejected(f.seq, reason, now))
                ack = conn.ack(now)
            await ws.send_message(ack)


def _reason_key(code: int) -> str:
    return {
        CloseCode.UNAUTHORIZED: "unauthorized",
        CloseCode.UNSUPPORTED_VERSION: "unsupported_version",
        CloseCode.PROTOCOL_ERROR: "protocol_error",
        CloseCode.HEARTBEAT_TIMEOUT: "heartbeat_timeout",
        CloseCode.TOO_BIG: "too_big",
        CloseCode.TOO_MANY_RECORDS: "too_many_records",
    }.get(code, str(code))
