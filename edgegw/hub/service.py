"""The hub service: accepts gateways, applies their frames durably, serves HTTP.

One port: ``/ws/gateway`` (wire protocol v1), ``/healthz``, ``/api/stats``, ``/metrics``.
Consumers (live state, fan-out) register with ``add_consumer`` and see every applied
frame's records, in the order frames were applied; after a restart the stored frames are
replayed to them first.
"""

from __future__ import annotations

import hmac
import json
import logging
import time
from pathlib import Path
from typing import Any, Protocol

import trio

from ..metrics import Metrics
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
from .config import HubConfig
from .http import (
    ConnectionClosed,
    HttpServer,
    MessageTooBig,
    Request,
    Response,
    WebSocket,
    json_response,
)
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


class Hub:
    def __init__(self, config: HubConfig, metrics: Metrics | None = None) -> None:
        self.config = config
        self.metrics = metrics or Metrics()
        self.store = HubStore(Path(config.hub.data_dir) / "hub.sqlite3",
                              keep_bodies=config.hub.keep_frame_bodies)
        self.http = HttpServer(config.http, metrics=self.metrics, raise_fd_limit=True)
        self.consumers: list[Consumer] = []
        self.connected: dict[str, dict[str, Any]] = {}
        self.refused: dict[str, int] = {}
        self.port: int | None = None
        self.started_at = time.time()
        m = self.metrics
        self.m_frames = m.counter("hub_frames_applied_total", "data frames applied")
        self.m_records = m.counter("hub_records_applied_total", "records applied")
        self.m_dups = m.counter("hub_duplicate_frames_total", "duplicate frames dropped")
        self.m_refused = m.counter("hub_refused_total", "gateway connections refused")
        self.m_proto = m.counter("hub_protocol_errors_total", "connections closed for a fault")
        self.m_rejected = m.counter("hub_frames_rejected_total", "invalid frames dead-lettered")
        self.m_bad_http = m.counter("hub_bad_http_requests_total", "malformed HTTP requests")
        self.m_pruned = m.counter("hub_frames_pruned_total",
                                  "applied frames deleted after the retention period")
        self.m_connected = m.gauge("hub_gateways_connected", "gateways connected now")
        m.add_collector(lambda: self.m_connected.set(len(self.connected)))
        self.http.on_bad_request = lambda reason: self.m_bad_http.inc()
        h = config.hub
        self.http.add_ws_route(GATEWAY_PATH, self.handle_gateway,
                               max_message_size=h.max_frame_bytes + 1024)
        self.http.add_route("GET", "/healthz", self._healthz)
        self.http.add_route("GET", "/api/stats", self._stats)
        self.http.add_route("GET", "/metrics", self._metrics)

    def add_consumer(self, consumer: Consumer) -> None:
        self.consumers.append(consumer)

    # -- lifecycle --
    async def run(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        await self.store.open()
        try:
            if self.consumers:
                await self._replay()
            async with trio.open_nursery() as nursery:
                listeners = await nursery.start(self.http.serve, self.config.hub.listen,
                                                self.config.hub.port)
                self.port = listeners[0].socket.getsockname()[1]
                log.info("hub listening on %s:%s", self.config.hub.listen, self.port)
                if self.config.hub.retain_frames_hours > 0:
                    nursery.start_soon(self._pruner)
                task_status.started(self.port)
        finally:
            with trio.CancelScope(shield=True):
                await self.store.close()

    async def _replay(self) -> None:
        """Feed every stored frame to the consumers, oldest first (state rebuild)."""
        max_records = self.config.hub.max_records_per_frame

        def load(batch: list[tuple[str, int, list[Record]]]) -> bool:
            batch.clear()
            for gw, _epoch, _seq, _rid, body in it:
                try:
                    first_rid, records = decode_records(body, max_records)
                except (FrameError, ProtocolError):
                    continue
                batch.append((gw, first_rid, records))
                if len(batch) >= 200:
                    return True
            return False

        it = self.store.iter_frames_sync()
        batch: list[tuple[str, int, list[Record]]] = []
        more = True
        while more:
            more = await trio.to_thread.run_sync(load, batch, limiter=self.store._limiter)
            for gw, first_rid, records in batch:
                for c in self.consumers:
                    c.on_records(gw, first_rid, records)

    async def _pruner(self) -> None:
        """Keep the frame table to ``retain_frames_hours``: a hub runs for months."""
        h = self.config.hub
        while True:
            n = await self.store.prune(time.time() - h.retain_frames_hours * 3600)
            if n:
                self.m_pruned.inc(n)
                log.info("pruned %d frame(s) older than %g h", n, h.retain_frames_hours)
            await trio.sleep(h.prune_interval_s)

    # -- HTTP --
    async def _healthz(self, request: Request) -> Response:
        return json_response({"status": "ok", "uptime_s": round(time.time() - self.started_at, 1),
                              "gateways_connected": len(self.connected)})

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
                "rtt_ms": self.connected.get(gw, {}).get("rtt_ms"),
            }
        return {"gateways": gateways, "metrics": self.metrics.as_dict()}

    async def _stats(self, request: Request) -> Response:
        return json_response(self.stats())

    async def _metrics(self, request: Request) -> Response:
        return Response(200, self.metrics.render_prometheus().encode(),
                        "text/plain; version=0.0.4")

    # -- gateways --
    def _check_hello(self, hello: Hello) -> tuple[int, str] | None:
        if not set(hello.versions) & set(SUPPORTED_VERSIONS):
            return (CloseCode.UNSUPPORTED_VERSION,
                    f"unsupported protocol version(s) {list(hello.versions)}; "
                    f"this hub speaks {list(SUPPORTED_VERSIONS)}")
        auth = self.config.gateways.get(hello.gateway_id)
        if auth is None:
            return CloseCode.UNAUTHORIZED, f"unknown gateway id {hello.gateway_id!r}"
        if not hmac.compare_digest(auth.token.encode(), hello.token.encode()):
            return CloseCode.UNAUTHORIZED, f"wrong token for gateway {hello.gateway_id!r}"
        if hello.gateway_id in self.connected:
            return (CloseCode.ALREADY_CONNECTED,
                    f"gateway {hello.gateway_id!r} is already connected")
        return None

    async def handle_gateway(self, ws: WebSocket, request: Request) -> None:
        h = self.config.hub
        conn = HubConnection(heartbeat=h.heartbeat_s, max_message_bytes=h.max_frame_bytes,
                             max_records=h.max_records_per_frame, max_holes=h.max_holes,
                             now=trio.current_time())
        gw = "?"
        try:
            with trio.fail_after(h.hello_timeout_s):
                data = await ws.get_message()
            events, _ = conn.receive(data, trio.current_time())
            hello = events[0]
            gw = hello.gateway_id
            problem = self._check_hello(hello)
            if problem is not None:
                code, reason = problem
                log.warning("refused gateway %r from %s: %s", gw, request.remote, reason)
                self.refused[gw] = self.refused.get(gw, 0) + 1
                self.m_refused.inc(reason=_reason_key(code))
                await ws.send_message(conn.refuse(code, reason, trio.current_time()))
                await ws.aclose(code, reason)
                return
            self.connected[gw] = {"since": time.time(), "remote": request.remote,
                                  "epoch": hello.epoch}
        except trio.TooSlowError:
            self.m_proto.inc(reason="hello_timeout")
            await ws.aclose(CloseCode.HELLO_TIMEOUT, "no HELLO within the handshake timeout")
            return
        except ProtocolError as exc:
            self.m_proto.inc(reason=_reason_key(exc.code))
            log.warning("gateway connection from %s: %s", request.remote, exc.reason)
            await ws.aclose(exc.code, exc.reason)
            return
        except (ConnectionClosed, MessageTooBig):
            return
        try:
            applied = self.store.applied_set(gw, hello.epoch)
            welcome = conn.accept(applied, trio.current_time())
            if conn.declared_lost:
                log.warning("gateway %s: %d frame(s) below seq %d were dropped by the gateway "
                            "before reaching the hub", gw, conn.declared_lost, hello.next_seq)
                await self.store.declare_lost(gw, hello.epoch, hello.next_seq - 1,
                                              conn.declared_lost)
            await ws.send_message(welcome)
            log.info("gateway %s connected from %s (epoch %s, next seq %d)", gw, request.remote,
                     hello.epoch, hello.next_seq)
            for c in self.consumers:
                c.on_gateway(gw, True, time.time())
            await self._serve_gateway(ws, conn, gw, hello.epoch)
        except ProtocolError as exc:
            self.m_proto.inc(reason=_reason_key(exc.code))
            log.warning("gateway %s: closing: %s", gw, exc.reason)
            await ws.aclose(exc.code, exc.reason)
        except (ConnectionClosed, MessageTooBig) as exc:
            log.info("gateway %s disconnected: %s", gw, exc)
        finally:
            self.connected.pop(gw, None)
            for c in self.consumers:
                c.on_gateway(gw, False, time.time())

    async def _serve_gateway(self, ws: WebSocket, conn: HubConnection, gw: str,
                             epoch: str) -> None:
        send, receive = trio.open_memory_channel[Data](self.config.hub.apply_queue_frames)

        async def receiver() -> None:
            async with send:
                while True:
                    data = await ws.get_message()
                    events, reply = conn.receive(data, trio.current_time())
                    for ev in events:
                        if isinstance(ev, Data):
                            await send.send(ev)
                        elif isinstance(ev, Duplicate):
                            self.store.count_duplicate(gw)
                            self.m_dups.inc()
                    if reply is not None:
                        await ws.send_message(reply)

        async def heartbeat() -> None:
            while True:
                await trio.sleep_until(conn.next_deadline())
                ping = conn.on_timer(trio.current_time())
                if ping is not None:
                    await ws.send_message(ping)
                c = self.connected.get(gw)
                if c is not None and conn.rtt is not None:
                    c["rtt_ms"] = round(conn.rtt * 1000, 2)

        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(receiver)
                nursery.start_soon(heartbeat)
                await self._applier(ws, conn, gw, epoch, receive)
                nursery.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            reraise_meaningful(group, ProtocolError, MessageTooBig, ConnectionClosed)

    async def _applier(self, ws: WebSocket, conn: HubConnection, gw: str, epoch: str,
                       receive: trio.MemoryReceiveChannel[Data]) -> None:
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
            for d in frames:
                try:
                    first_rid, records = decode_records(d.body, max_records)
                except FrameError as exc:
                    bad.append((FrameToApply(gw, epoch, d.seq, 0, 0, d.body), str(exc)))
                    continue
                good.append((FrameToApply(gw, epoch, d.seq, first_rid, len(records), d.body),
                             first_rid, records))
            await self.store.commit([g[0] for g in good], rejected=bad)
            now = trio.current_time()
            for f, first_rid, records in good:
                self.m_frames.inc()
                self.m_records.inc(len(records))
                for c in self.consumers:
                    c.on_records(gw, first_rid, records)
                ack = conn.applied(f.seq, now)
            for f, reason in bad:
                self.m_rejected.inc()
                log.warning("gateway %s: frame %d rejected: %s", gw, f.seq, reason)
                await ws.send_message(conn.rejected(f.seq, reason, now))
                ack = conn.ack(now)
            await ws.send_message(ack)


def _reason_key(code: int) -> str:
    return {
        CloseCode.UNAUTHORIZED: "unauthorized",
        CloseCode.UNSUPPORTED_VERSION: "unsupported_version",
        CloseCode.ALREADY_CONNECTED: "already_connected",
        CloseCode.PROTOCOL_ERROR: "protocol_error",
        CloseCode.HEARTBEAT_TIMEOUT: "heartbeat_timeout",
        CloseCode.TOO_BIG: "too_big",
        CloseCode.TOO_MANY_RECORDS: "too_many_records",
    }.get(code, str(code))


def dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"))
