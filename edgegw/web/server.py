"""One Trio TCP port for plain HTTP and WebSocket: h11 and wsproto under a thin Trio layer.

Why not trio-websocket on the server: it only speaks WebSocket, so ``/healthz``,
``/api/...`` and the dashboard page would need a second port; and it offers no way to
write one already-encoded frame to many clients.  h11 and wsproto are the well-kept
sans-IO cores trio-websocket itself is built on; here h11 parses every request, and an
upgrade request is answered with 101 and handed to a wsproto ``Connection``.  Because a
server-to-client frame is not masked, ``prepare_message`` encodes a message once and
``WebSocket.send_prepared`` writes the same bytes to any number of clients.

Why not hypercorn's Trio worker (which brings timeouts and TLS): its ASGI path frames every
message per client and costs 10-15x more per client send than writing one prepared frame,
more than two cores at 1,000 dashboards x 20 frames/s (``bench/ws_send_cost.py``,
docs/http.md).  So this layer carries the bounds itself (``HttpLimits``): a restartable
deadline per connection phase, connection caps that shed idle connections first, a paused
accept loop when descriptors run out, strict upgrade validation, no ambiguous framing.

Why one module of this size: admission (caps, shedding, the accept loop) and the request
loop share the per-connection phase and caps; request parsing and the handshake checks are
in ``handshake.py``, the WebSocket in ``websocket.py``.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import math
import os
import ssl
from collections.abc import Awaitable, Callable
from typing import Annotated, Any

import h11
import trio
from wsproto.connection import Connection, ConnectionType
from wsproto.utilities import generate_accept_token

from ..config import Range
from ..deadpeer import give_up_after, socket_of
from ..metrics import Metrics
from ..peeraddr import address_bucket
from .deflate import RESPONSE as DEFLATE_RESPONSE
from .deflate import Deflater, InboundDeflate, accept_offer
from .handshake import (
    framing_problem,
    head_bytes,
    is_upgrade,
    raw_response,
    status_phrase,
    to_request,
    upgrade_problem,
)
from .http import Request, Response
from .websocket import READ_SIZE, ConnectionClosed, MessageTooBig, WebSocket

log = logging.getLogger(__name__)

MAX_REQUEST_BODY = 1 << 20
MAX_HEAD_BYTES = 64 * 1024  # request line and headers
# Out of descriptors (or kernel memory) on accept: free one, pause, retry.  Logged at
# most once per LOG_INTERVAL_S, with the count.
CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
ACCEPT_PAUSE_S = 0.1
LOG_INTERVAL_S = 10.0
# Descriptors kept out of max_connections for the rest of the process (at most a quarter
# of the open-file limit).
FD_RESERVE = 128


Handler = Callable[[Request], Awaitable[Response]]
WsHandler = Callable[["WebSocket", Request], Awaitable[None]]
# before an upgrade is accepted: None to go ahead, or the response to send instead
# (e.g. 503 with Retry-After from a server shedding load)
WsAdmit = Callable[[Request], "Response | None"]
# before any handler (plain or upgrade, the flag says): None to go ahead, or the response
# to send instead (401, 403: edgegw/auth/access.py); it may set ``request.principal``
Guard = Callable[[Request, bool], "Response | None"]
# the TLS context for a new connection (None: plain TCP); asked per connection, so a
# reloaded certificate applies to new handshakes while live connections keep theirs
TlsContext = Callable[[], "ssl.SSLContext | None"]


@dataclasses.dataclass(frozen=True)
class HttpLimits:
    """Bounds on the HTTP side of the server (the hub config's ``[http]`` section).

    The timeouts cover only plain HTTP: once a connection is upgraded, the WebSocket
    handler's own timeouts apply (HELLO timeout and heartbeats on ``/ws/gateway``, the
    stall timeout on ``/ws/live``)."""

    # a new connection, or a request once its first byte arrived, must complete its head
    # (request line and headers) within this (slowloris)
    header_timeout_s: Annotated[float, Range(1, 3600)] = 10.0
    # the whole body must arrive within this after the head (408 otherwise)
    body_timeout_s: Annotated[float, Range(1, 3600)] = 30.0
    # a keep-alive connection with no request in progress is closed after this
    idle_timeout_s: Annotated[float, Range(1, 3600)] = 60.0
    # a response the client does not read within this ends the connection
    write_timeout_s: Annotated[float, Range(1, 3600)] = 30.0
    # open connections (WebSockets included); never more than the open-file limit allows
    max_connections: Annotated[int, Range(2, 1_000_000)] = 10_000
    # open connections from one remote address (0: no such cap -- behind a reverse proxy)
    max_connections_per_address: Annotated[int, Range(2, 1_000_000, also=0)] = 256


class _Conn:
    """One admitted connection, as the accept loop sees it."""

    __slots__ = ("address", "bucket", "scope", "shed", "waiting")

    def __init__(self, address: str) -> None:
        self.address = address
        self.bucket = address_bucket(address)  # what the per-address cap counts it under
        self.scope = trio.CancelScope()  # cancelled to shed the connection
        self.waiting = True  # no request in progress: it may be shed to make room
        self.shed = False


class _Phase:
    """The connection's one restartable timeout (as hypercorn's idle task): every phase of
    a request moves the deadline of the same cancel scope."""

    __slots__ = ("limits", "name", "scope", "started")

    def __init__(self, limits: HttpLimits) -> None:
        self.limits = limits
        self.scope = trio.CancelScope()
        self.name = ""
        self.started = False  # bytes of the current request have arrived
        self.enter("header")  # a new connection's first request: the header timeout

    def enter(self, name: str) -> None:
        self.name = name
        timeout = {"header": self.limits.header_timeout_s, "body": self.limits.body_timeout_s,
                   "idle": self.limits.idle_timeout_s,
                   "write": self.limits.write_timeout_s}.get(name, math.inf)
        self.scope.deadline = trio.current_time() + timeout


class _Every:
    """A repeated condition logged at most once per interval, with how often it happened."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self.next_at = -math.inf
        self.count = 0

    def due(self) -> int:
        """Count one occurrence; the number to report now, or 0 to stay quiet."""
        self.count += 1
        now = trio.current_time()
        if now < self.next_at:
            return 0
        n, self.count, self.next_at = self.count, 0, now + self.interval
        return n


class HttpServer:
    """Routes plain HTTP requests to handlers and upgrade requests to WebSocket handlers.

    Bounded (``HttpLimits``): a connection is admitted only within the total and
    per-address caps -- when a cap is full, the oldest connection that has no request in
    progress (idle keep-alive, or still sending its head) is closed to make room, and only
    when there is none is the newcomer answered 503 and closed.  So a flood of idle
    connections cannot lock out ``/healthz``, and the caps keep the process below its
    open-file limit."""

    def __init__(self, limits: HttpLimits | None = None, *, metrics: Metrics | None = None,
                 max_ws_message_size: int = 1 << 20, raise_fd_limit: bool = False) -> None:
        self.routes: dict[tuple[str, str], Handler] = {}
        self.prefix_routes: list[tuple[str, str, Handler]] = []
        self.ws_routes: dict[str, tuple[WsHandler, list[str]]] = {}
        self.max_ws_message_size = max_ws_message_size
        self.ws_max_sizes: dict[str, int] = {}
        self.ws_admit: dict[str, WsAdmit] = {}
        self.ws_deflate: dict[str, Deflater] = {}
        #: per WebSocket route: (TCP_USER_TIMEOUT seconds, keepalive seconds or None)
        self.ws_dead_peer: dict[str, tuple[float, float | None]] = {}
        self.on_bad_request: Callable[[str], None] = lambda reason: None
        self.guard: Guard | None = None
        self.tls: TlsContext = lambda: None
        self.limits = limits or HttpLimits()
        # The hub raises its soft open-file limit to fit max_connections (as Go's runtime
        # does): systemd's default soft limit of 1,024 is too low for a floor.
        self.raise_fd_limit = raise_fd_limit
        self.max_connections = self.limits.max_connections  # lowered by the fd limit
        self.accept_pause_s = ACCEPT_PAUSE_S
        self._open: dict[_Conn, None] = {}  # in accept order: the oldest first
        # by address bucket: an IPv6 host's /64 is one (edgegw.peeraddr)
        self._by_address: dict[str, dict[_Conn, None]] = {}
        self._accept_errors = _Every(LOG_INTERVAL_S)
        self._refusals = _Every(LOG_INTERVAL_S)
        m = metrics or Metrics()
        self.m_open = m.gauge("http_connections_open", "HTTP and WebSocket connections open")
        m.add_collector(lambda: self.m_open.set(len(self._open)))
        self.m_refused = m.counter("http_connections_refused_total",
                                   "connections answered 503 and closed: a cap was full")
        self.m_shed = m.counter("http_connections_shed_total",
                                "idle connections closed to make room for a new one")
        self.m_timeouts = m.counter("http_timeouts_total",
                                    "connections closed by an HTTP timeout, by phase")
        self.m_accept_errors = m.counter("http_accept_errors_total",
                                         "accept() failures (out of file descriptors)")
        self.m_internal = m.counter("internal_errors_total",
                                    "unexpected exceptions caught at a failure boundary")
        self.m_tls_failures = m.counter("http_tls_handshake_failures_total",
                                        "TLS handshakes that failed or timed out, by reason")
        self._tls_errors = _Every(LOG_INTERVAL_S)

    def add_route(self, method: str, path: str, handler: Handler) -> None:
        """``path`` ending in ``/*`` matches every path under that prefix."""
        if path.endswith("/*"):
            self.prefix_routes.append((method, path[:-1], handler))
        else:
            self.routes[(method, path)] = handler

    def add_ws_route(self, path: str, handler: WsHandler, subprotocols: list[str] | None = None,
                     max_message_size: int | None = None, admit: WsAdmit | None = None,
                     deflate: Deflater | None = None, give_up_after_s: float | None = None,
                     keepalive_s: float | None = None) -> None:
        """``deflate``: accept permessage-deflate offers on this route (deflate.py); the
        handler then finds ``ws.deflater`` set, and prepares shared frames with it.
        ``give_up_after_s``: the kernel ends an upgraded connection whose peer leaves what
        the server wrote unacknowledged that long (``TCP_USER_TIMEOUT``), with keepalive
        probes every ``keepalive_s`` while idle (``edgegw.deadpeer``): only for a route
        whose clients must keep reading."""
        if give_up_after_s is not None:
            self.ws_dead_peer[path] = (give_up_after_s, keepalive_s)
        self.ws_routes[path] = (handler, subprotocols or [])
        if deflate is not None:
            self.ws_deflate[path] = deflate
        if admit is not None:
            self.ws_admit[path] = admit
        if max_message_size is not None:
            self.ws_max_sizes[path] = max_message_size

    def _find(self, method: str, path: str) -> Handler | None:
        handler = self.routes.get((method, path))
        if handler is None:
            for m, prefix, h in self.prefix_routes:
                if m == method and path.startswith(prefix):
                    return h
        return handler

    # ------------------------------------------------------------------ accepting

    async def serve(self, host: str, port: int, *,
                    task_status: trio.TaskStatus[list[Any]] = trio.TASK_STATUS_IGNORED) -> None:
        self.max_connections = self._fit_fd_limit()
        listeners = await trio.open_tcp_listeners(port, host=host)
        async with trio.open_nursery() as nursery:
            for listener in listeners:
                nursery.start_soon(self._accept_loop, listener, nursery)
            task_status.started(listeners)

    def _fit_fd_limit(self) -> int:
        """max_connections, lowered to what the open-file limit leaves after a reserve for
        the rest of the process (stores, logs, the event loop)."""
        wanted = self.limits.max_connections
        try:
            import resource
        except ImportError:  # Windows: no such limit to fit
            return wanted
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        infinite = resource.RLIM_INFINITY
        need = wanted + FD_RESERVE
        if self.raise_fd_limit and soft != infinite and soft < need:
            raised = need if hard == infinite else min(need, hard)
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, (raised, hard))
                soft = raised
            except (ValueError, OSError):
                pass
        if soft == infinite:
            return wanted
        allowed = max(1, min(wanted, soft - min(FD_RESERVE, soft // 4)))
        if allowed < wanted and self.raise_fd_limit:  # the hub's port (a gateway's status
            # port never needs many connections: its cap is lowered silently)
            log.warning("HTTP: at most %d connections (http.max_connections is %d): the "
                        "open-file limit is %d; raise it (systemd: LimitNOFILE=) for more",
                        allowed, wanted, soft)
        return allowed

    async def _accept_loop(self, listener: trio.SocketListener, nursery: trio.Nursery) -> None:
        while True:
            try:
                stream = await listener.accept()
            except OSError as exc:
                if exc.errno not in CAPACITY_ERRNOS:
                    raise
                # Out of descriptors: free one (an idle connection) and pause, rather than
                # spin on accept -- the pending connections wait in the listen backlog.
                name = errno.errorcode.get(exc.errno or 0, str(exc.errno))
                self.m_accept_errors.inc(errno=name)
                self._shed_one(self._open, "fd_limit")
                n = self._accept_errors.due()
                if n:
                    log.warning("HTTP accept failed %d time(s) in %g s: %s (%s); pausing "
                                "accepts %g s each time", n, LOG_INTERVAL_S, name,
                                os.strerror(exc.errno or 0), self.accept_pause_s)
                await trio.sleep(self.accept_pause_s)
                continue
            try:
                address = stream.socket.getpeername()[0]
            except OSError:  # gone already
                nursery.start_soon(_close, stream)
                continue
            admitted = self._admit(address)
            if isinstance(admitted, str):
                nursery.start_soon(self._refuse, stream, admitted)
            else:
                nursery.start_soon(self._connection, stream, admitted)

    def _admit(self, address: str) -> _Conn | str:
        """Register a new connection within the caps, or the name of the full cap."""
        per_address = self.limits.max_connections_per_address
        conn = _Conn(address)
        mine = self._by_address.get(conn.bucket)
        if per_address and mine is not None and len(mine) >= per_address:
            if not self._shed_one(mine, "address_limit"):
                return "address_limit"
        if len(self._open) >= self.max_connections:
            if not self._shed_one(self._open, "total_limit"):
                return "total_limit"
        self._open[conn] = None
        self._by_address.setdefault(conn.bucket, {})[conn] = None
        return conn

    def _shed_one(self, among: dict[_Conn, None], reason: str) -> bool:
        """Close the oldest of ``among`` with no request in progress; False if none."""
        victim = next((c for c in among if c.waiting), None)
        if victim is None:
            return False
        victim.shed = True
        victim.scope.cancel()
        self._release(victim)  # its descriptor is closed as soon as its task runs
        self.m_shed.inc(reason=reason)
        return True

    def _release(self, conn: _Conn) -> None:
        if conn in self._open:  # not shed already
            del self._open[conn]
            mine = self._by_address[conn.bucket]
            del mine[conn]
            if not mine:
                del self._by_address[conn.bucket]

    async def _refuse(self, stream: trio.SocketStream, reason: str) -> None:
        self.m_refused.inc(reason=reason)
        n = self._refusals.due()
        if n:
            log.warning("HTTP: refused %d connection(s) in %g s (%s full: %d open, at most "
                        "%d; %d per address)", n, LOG_INTERVAL_S, reason, len(self._open),
                        self.max_connections, self.limits.max_connections_per_address)
        with trio.move_on_after(1):
            try:
                await stream.send_all(raw_response(503, b"too many connections",
                                                    [(b"retry-after", b"1")]))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
        await _close(stream)

    async def _connection(self, stream: trio.SocketStream, conn: _Conn) -> None:
        """One connection's task: a failure boundary, whatever happens inside."""
        try:
            with conn.scope:
                context = self.tls()
                if context is None:
                    await self.handle_stream(stream, conn)
                else:
                    secured = await self._tls_handshake(stream, context, conn.address)
                    if secured is not None:
                        await self.handle_stream(secured, conn)
        except Exception:
            self.m_internal.inc(where="http_connection")
            log.exception("HTTP connection from %s failed; closed", conn.address)
        finally:
            self._release(conn)
            await _close(stream)

    async def _tls_handshake(self, stream: trio.SocketStream, context: ssl.SSLContext,
                             address: str) -> trio.SSLStream[trio.SocketStream] | None:
        """The server side of a TLS handshake, within the header timeout (a client that
        opens a socket and says nothing is a slowloris too); None if it failed."""
        secured = trio.SSLStream(stream, context, server_side=True, https_compatible=True)
        reason = ""
        with trio.move_on_after(self.limits.header_timeout_s):
            try:
                await secured.do_handshake()
                return secured
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                cause = exc.__cause__
                reason = getattr(cause, "reason", None) or type(cause or exc).__name__
        self.m_tls_failures.inc(reason=str(reason or "timeout").lower())
        n = self._tls_errors.due()
        if n:
            log.warning("TLS: %d handshake(s) failed in %g s, the last from %s: %s", n,
                        LOG_INTERVAL_S, address, reason or "timeout")
        return None

    # ------------------------------------------------------------------ one connection

    async def handle_stream(self, stream: trio.abc.Stream, admitted: _Conn | None = None) -> None:
        try:
            raw: Any = getattr(stream, "transport_stream", stream)  # under TLS too
            sock = raw.socket
            host, port = sock.getpeername()[:2]
            remote = f"{host}:{port}"
        except (OSError, AttributeError):  # AttributeError: not a socket (in-memory tests)
            remote = "?"
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD_BYTES)
        phase = _Phase(self.limits)
        try:
            with phase.scope:
                await self._requests(stream, conn, phase, remote, admitted)
            if phase.scope.cancelled_caught:
                await self._timed_out(stream, conn, phase)
        except h11.RemoteProtocolError as exc:
            self.on_bad_request(str(exc))
            with trio.move_on_after(1):
                try:
                    await self._send_simple(conn, stream, exc.error_status_hint, b"bad request")
                except Exception:  # the peer may be gone already
                    pass
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            await _close(stream)

    async def _requests(self, stream: trio.abc.Stream, conn: h11.Connection, phase: _Phase,
                        remote: str, admitted: _Conn | None) -> None:
        """Serve requests until the connection closes or is upgraded."""
        while True:
            event = await self._next_event(conn, stream, phase)
            if not isinstance(event, h11.Request):
                return
            if admitted is not None:
                admitted.waiting = False
            request = to_request(event, remote)
            if isinstance(stream, trio.SSLStream):
                request.secure = True
                request.peer_cert = stream.getpeercert() or None
            head = event.method == b"HEAD"  # answered like GET, without the body
            # Content-Length with Transfer-Encoding is how requests are smuggled past a
            # proxy: never guess which one frames the body -- refuse, and close.
            problem, status = framing_problem(event), 400
            if not problem and head_bytes(event) > MAX_HEAD_BYTES:
                problem, status = f"request head over {MAX_HEAD_BYTES} bytes", 431
            if problem:
                self.on_bad_request(problem)
                await self._send_simple(conn, stream, status, problem.encode(), head=head)
                return
            if is_upgrade(event):
                phase.enter("websocket")  # the WebSocket handler's own timeouts apply
                await self._upgrade(conn, stream, request, event)
                return
            phase.enter("body")
            body = bytearray()
            while True:
                ev = await self._next_event(conn, stream, phase)
                if isinstance(ev, h11.Data):
                    body += ev.data
                    if len(body) > MAX_REQUEST_BODY:
                        await self._send_simple(conn, stream, 413, b"request body too large",
                                                head=head)
                        return
                elif isinstance(ev, h11.EndOfMessage):
                    break
                else:
                    return
            request.body = bytes(body)
            phase.enter("handler")
            handler = self._find("GET" if head else request.method, request.path)
            refusal = self._guarded(request, upgrade=False)
            if refusal is not None:
                response = refusal
            elif handler is None:
                known = any(p == request.path for _, p in self.routes)
                status = 405 if known else 404
                response = Response(status, b'{"error": "%s"}' % (
                    b"method not allowed" if known else b"not found"))
            else:
                try:
                    response = await handler(request)
                except Exception:
                    log.exception("handler for %s %r failed", request.method,
                                  request.path[:200])
                    response = Response(500, b'{"error": "internal error"}')
            phase.enter("write")
            await self._send_response(conn, stream, response, head=head)
            if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
                return
            try:
                conn.start_next_cycle()
            except h11.LocalProtocolError:
                return
            phase.enter("idle")
            phase.started = False
            if admitted is not None:
                admitted.waiting = True

    def _guarded(self, request: Request, upgrade: bool) -> Response | None:
        """The guard's answer; a bug in it refuses the request (fails closed), counted."""
        if self.guard is None:
            return None
        try:
            return self.guard(request, upgrade)
        except Exception:
            self.m_internal.inc(where="http_guard")
            log.exception("access guard failed on %s %r from %s", request.method,
                          request.path[:200], request.remote)
            return Response(500, b'{"error": "internal error"}')

    async def _timed_out(self, stream: trio.abc.Stream, conn: h11.Connection,
                         phase: _Phase) -> None:
        """A phase's deadline passed: 408 when a request was under way, else just close."""
        self.m_timeouts.inc(phase=phase.name)
        if phase.name == "body" or (phase.name == "header" and phase.started):
            with trio.move_on_after(1):
                try:
                    await self._send_simple(conn, stream, 408, b"request timeout")
                except (trio.BrokenResourceError, trio.ClosedResourceError,
                        h11.LocalProtocolError):
                    pass

    async def _next_event(self, conn: h11.Connection, stream: trio.abc.Stream,
                          phase: _Phase) -> Any:
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = bytes(await stream.receive_some(READ_SIZE))  # (bytes: no copy)
                if data and not phase.started:
                    phase.started = True
                    if phase.name == "idle":  # a new request began: it has header_timeout
                        phase.enter("header")
                conn.receive_data(data)
                continue
            return event

    async def _send_response(self, conn: h11.Connection, stream: trio.abc.Stream,
                             r: Response, head: bool = False) -> None:
        headers = [("content-type", r.content_type), ("content-length", str(len(r.body))),
                   ("cache-control", "no-store"), *r.headers]
        data = conn.send(h11.Response(status_code=r.status, headers=headers,
                                      reason=status_phrase(r.status)))
        data += conn.send(h11.Data(data=r.body)) if r.body and not head else b""
        data += conn.send(h11.EndOfMessage())
        await stream.send_all(data)

    async def _send_simple(self, conn: h11.Connection, stream: trio.abc.Stream, status: int,
                           text: bytes, headers: list[tuple[str, str]] | None = None,
                           head: bool = False) -> None:
        if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
            await self._send_response(conn, stream, Response(
                status, text, "text/plain", [("connection", "close"), *(headers or [])]),
                head=head)

    async def _upgrade(self, conn: h11.Connection, stream: trio.abc.Stream,
                       request: Request, event: h11.Request) -> None:
        head = event.method == b"HEAD"
        route = self.ws_routes.get(request.path)
        if route is None:
            await self._send_simple(conn, stream, 404, b"no WebSocket endpoint here", head=head)
            return
        problem = upgrade_problem(event, request)
        if problem:
            self.on_bad_request(problem)
            await self._send_simple(conn, stream, 400, problem.encode(),
                                    [("sec-websocket-version", "13")], head=head)
            return
        handler, offered = route
        refusal = self._guarded(request, upgrade=True)
        admit = self.ws_admit.get(request.path)
        if refusal is None and admit is not None:
            refusal = admit(request)
        if refusal is not None:
            await self._send_response(conn, stream, dataclasses.replace(
                refusal, headers=[*refusal.headers, ("connection", "close")]))
            return
        asked = [p.strip() for p in request.headers.get("sec-websocket-protocol", "").split(",")
                 if p.strip()]
        chosen = next((p for p in asked if p in offered), None)
        key = request.headers["sec-websocket-key"].strip().encode()
        headers = [(b"upgrade", b"websocket"), (b"connection", b"Upgrade"),
                   (b"sec-websocket-accept", generate_accept_token(key))]
        if chosen:
            headers.append((b"sec-websocket-protocol", chosen.encode()))
        max_size = self.ws_max_sizes.get(request.path, self.max_ws_message_size)
        deflater = self.ws_deflate.get(request.path)
        extensions: list[Any] = []
        if deflater is not None and accept_offer(
                request.headers.get("sec-websocket-extensions", "")):
            headers.append((b"sec-websocket-extensions", DEFLATE_RESPONSE.encode()))
            extensions.append(InboundDeflate(max_size))
        else:
            deflater = None
        dead_peer = self.ws_dead_peer.get(request.path)
        if dead_peer is not None:  # before the 101: the handshake's writes are covered too
            give_up_after(socket_of(stream), dead_peer[0], keepalive_s=dead_peer[1])
        data = conn.send(h11.InformationalResponse(status_code=101, headers=headers))
        await stream.send_all(data)
        trailing, _ = conn.trailing_data
        ws = WebSocket(stream, Connection(ConnectionType.SERVER, extensions,
                                          trailing_data=bytes(trailing)), chosen, max_size)
        ws.deflater = deflater
        try:
            await handler(ws, request)
        except (ConnectionClosed, MessageTooBig):
            pass
        except Exception:
            # Handlers are failure boundaries themselves (and count what they catch); this
            # is the last resort that keeps one connection's bug inside that connection.
            log.exception("WebSocket handler for %r from %s failed", request.path[:200],
                          request.remote)
            if ws.closed is None:
                await ws.aclose(1011, "internal error")
        except BaseException:
            # Cancelled: the server is shutting down.  Tell the peer (1001) rather than
            # dropping the connection; no lingering for its reply at shutdown.
            if ws.closed is None:
                with trio.CancelScope(shield=True):
                    await ws.aclose(1001, "hub shutting down", linger=False)
            raise
        finally:
            if ws.closed is None:
                await ws.aclose(1000, "")


async def _close(stream: trio.abc.Stream) -> None:
    with trio.move_on_after(1) as cs:
        cs.shield = True
        await stream.aclose()
