"""One Trio TCP port for plain HTTP and WebSocket: h11 and wsproto under a thin Trio layer.

Why not trio-websocket on the server: it only speaks WebSocket, so ``/healthz``,
``/api/...`` and the dashboard page would need a second port; and it offers no way to
write one already-encoded frame to many clients.  h11 and wsproto are the well-kept
sans-IO cores trio-websocket itself is built on; here h11 parses every request, and an
upgrade request is answered with 101 and handed to a wsproto ``Connection``.  Because a
server-to-client frame is not masked, ``prepare_message`` encodes a message once and
``WebSocket.send_prepared`` writes the same bytes to any number of clients.
"""

from __future__ import annotations

import dataclasses
import logging
import urllib.parse
from collections.abc import Awaitable, Callable
from typing import Any

import h11
import trio
from wsproto.connection import Connection, ConnectionState, ConnectionType
from wsproto.events import (
    BytesMessage,
    CloseConnection,
    Message,
    Ping,
    TextMessage,
)
from wsproto.frame_protocol import CloseReason, FrameProtocol
from wsproto.utilities import generate_accept_token

log = logging.getLogger(__name__)

MAX_REQUEST_BODY = 1 << 20
READ_SIZE = 65536


@dataclasses.dataclass
class Request:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes = b""
    remote: str = ""


@dataclasses.dataclass
class Response:
    status: int = 200
    body: bytes = b""
    content_type: str = "application/json"
    headers: list[tuple[str, str]] = dataclasses.field(default_factory=list)


Handler = Callable[[Request], Awaitable[Response]]
WsHandler = Callable[["WebSocket", Request], Awaitable[None]]
# before an upgrade is accepted: None to go ahead, or the response to send instead
# (e.g. 503 with Retry-After from a server shedding load)
WsAdmit = Callable[[Request], "Response | None"]


class ConnectionClosed(Exception):
    def __init__(self, code: int, reason: str = "") -> None:
        super().__init__(f"WebSocket closed: {code} {reason}")
        self.code = code
        self.reason = reason


class MessageTooBig(Exception):
    pass


_PREPARER = FrameProtocol(client=False, extensions=[])


def prepare_message(data: bytes | str) -> bytes:
    """Encode one complete server->client WebSocket message frame, reusable for any client."""
    return bytes(_PREPARER.send_data(data, fin=True))


class SendGate:
    """Mutual exclusion for writes to one WebSocket, without an owner task.

    Every write takes it (``async with``), so nothing -- a pong from the reader -- lands in
    the middle of a frame.  Unlike ``trio.Lock`` it may be released by another task: the
    fan-out's ticker takes it when it writes a shared frame straight to the socket, and if
    the socket accepts only part, the client's own sender task writes the rest and
    releases it."""

    def __init__(self) -> None:
        self._sem = trio.Semaphore(1)

    def locked(self) -> bool:
        return self._sem.value == 0

    def acquire_nowait(self) -> None:
        self._sem.acquire_nowait()

    def release(self) -> None:
        self._sem.release()

    async def __aenter__(self) -> None:
        await self._sem.acquire()

    async def __aexit__(self, *exc: object) -> None:
        self._sem.release()


class WebSocket:
    """A server-side WebSocket over a Trio stream.

    Someone must keep calling ``get_message`` (pings and the closing handshake are handled
    there).  Sends are serialised by a lock, so tasks may share one WebSocket.

    Closing (``aclose``) follows RFC 6455 section 7: the close frame is written whole, then
    the peer's data is read and discarded until its close frame (or EOF, or
    ``close_timeout``), and only then is the TCP connection closed.  Closing a socket
    whose receive buffer still holds unread data makes the kernel send RST, and a peer
    that is still sending (a gateway with frames in flight) then fails in ``send`` and
    reports "connection lost" instead of the close code it was sent.  A write cut off
    mid-frame (cancelled) leaves the stream unusable for a close frame: the connection is
    then closed without one.
    """

    #: seconds to wait for the peer's close frame after ours (and to write ours)
    close_timeout = 2.0

    def __init__(self, stream: trio.abc.Stream, conn: Connection, subprotocol: str | None,
                 max_message_size: int) -> None:
        self.stream = stream
        self.conn = conn
        self.subprotocol = subprotocol
        self.max_message_size = max_message_size
        self.closed: ConnectionClosed | None = None
        self.send_gate = SendGate()
        self._parts: list[bytes | str] = []
        self._size = 0
        self.bytes_sent = 0
        self._torn = False  # a write was cut off mid-frame: no more frames can follow
        self._receiving = False  # a task is waiting in stream.receive_some

    async def _write(self, data: bytes) -> None:
        async with self.send_gate:
            if self._torn:
                raise self.closed or ConnectionClosed(1006, "connection lost")
            # Cancelled before the first byte leaves: the frame is simply not sent.  Once
            # send_all has begun, a cancellation may leave part of the frame written.
            await trio.lowlevel.checkpoint_if_cancelled()
            done = False
            try:
                await self.stream.send_all(data)
                done = True
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                self.closed = self.closed or ConnectionClosed(1006, "connection lost")
                raise self.closed from exc
            finally:
                if not done:
                    self._torn = True
            self.bytes_sent += len(data)

    async def send_message(self, data: bytes | str) -> None:
        if self.closed:
            raise self.closed
        if self.conn.state is not ConnectionState.OPEN:
            raise ConnectionClosed(1006, "not open")
        await self._write(self.conn.send(Message(data=data)))  # type: ignore[abstract]

    async def send_prepared(self, frame: bytes) -> None:
        """Write a frame from ``prepare_message`` unchanged (encode once, write many)."""
        if self.closed:
            raise self.closed
        await self._write(frame)

    async def _receive_some(self) -> bytes:
        self._receiving = True
        try:
            return await self.stream.receive_some(READ_SIZE)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return b""
        finally:
            self._receiving = False

    async def get_message(self) -> bytes | str:
        while True:
            for event in self.conn.events():
                if isinstance(event, (BytesMessage, TextMessage)):
                    self._parts.append(event.data)
                    self._size += len(event.data)
                    if self._size > self.max_message_size:
                        reason = f"message exceeds the limit of {self.max_message_size} bytes"
                        await self.aclose(1009, reason)
                        raise MessageTooBig(reason)
                    if event.message_finished:
                        parts, self._parts, self._size = self._parts, [], 0
                        if isinstance(event, TextMessage):
                            return "".join(parts)  # type: ignore[arg-type]
                        return b"".join(parts)  # type: ignore[arg-type]
                elif isinstance(event, Ping):
                    await self._write(self.conn.send(event.response()))
                elif isinstance(event, CloseConnection):
                    if self.conn.state is ConnectionState.OPEN:
                        # Not the peer's close frame: wsproto could not parse its frames
                        # (1002) or a text message was not UTF-8 (1007).  Tell the peer;
                        # nothing after the bad frame can be read, so no lingering.
                        await self.aclose(event.code, event.reason or "", linger=False)
                        raise self.closed  # type: ignore[misc]
                    self.closed = ConnectionClosed(event.code, event.reason or "")
                    try:
                        if self.conn.state is ConnectionState.REMOTE_CLOSING:
                            await self._write(self.conn.send(event.response()))
                    except ConnectionClosed:
                        pass
                    raise self.closed
            if self.closed:
                raise self.closed
            data = await self._receive_some()
            if not data:
                self.closed = ConnectionClosed(1006, "connection lost")
                raise self.closed
            self.conn.receive_data(data)

    async def aclose(self, code: int = 1000, reason: str = "", *, linger: bool = True) -> None:
        """Close with ``code``: the close frame, then (``linger``) the peer's reply awaited
        as the class docstring says, then the stream.  Never raises for a peer that is
        gone already."""
        if self.closed is None:
            self.closed = ConnectionClosed(code, reason)
        sent = False
        try:
            if self.conn.state is ConnectionState.OPEN and not self._torn:
                with trio.move_on_after(self.close_timeout):
                    await self._write(self.conn.send(CloseConnection(code=code, reason=reason)))
                    sent = True
            if sent and linger and not self._receiving:
                with trio.move_on_after(self.close_timeout):
                    await self._await_close_reply()
        except ConnectionClosed:
            pass
        finally:
            with trio.move_on_after(1) as cs:
                cs.shield = True
                await self.stream.aclose()

    async def _await_close_reply(self) -> None:
        """Drop what the peer still sends, until its close frame or EOF.  What was read
        already (its close may have arrived with the message that made us close) first."""
        while True:
            for event in self.conn.events():
                if isinstance(event, CloseConnection):
                    return  # the peer's reply (or a frame wsproto could not parse)
            data = await self._receive_some()
            if not data:
                return
            self.conn.receive_data(data)


class HttpServer:
    """Routes plain HTTP requests to handlers and upgrade requests to WebSocket handlers."""

    def __init__(self, max_ws_message_size: int = 1 << 20) -> None:
        self.routes: dict[tuple[str, str], Handler] = {}
        self.prefix_routes: list[tuple[str, str, Handler]] = []
        self.ws_routes: dict[str, tuple[WsHandler, list[str]]] = {}
        self.max_ws_message_size = max_ws_message_size
        self.ws_max_sizes: dict[str, int] = {}
        self.ws_admit: dict[str, WsAdmit] = {}
        self.on_bad_request: Callable[[str], None] = lambda reason: None

    def add_route(self, method: str, path: str, handler: Handler) -> None:
        """``path`` ending in ``/*`` matches every path under that prefix."""
        if path.endswith("/*"):
            self.prefix_routes.append((method, path[:-1], handler))
        else:
            self.routes[(method, path)] = handler

    def add_ws_route(self, path: str, handler: WsHandler, subprotocols: list[str] | None = None,
                     max_message_size: int | None = None, admit: WsAdmit | None = None) -> None:
        self.ws_routes[path] = (handler, subprotocols or [])
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

    async def serve(self, host: str, port: int, *,
                    task_status: trio.TaskStatus[list[Any]] = trio.TASK_STATUS_IGNORED) -> None:
        await trio.serve_tcp(self.handle_stream, port, host=host, task_status=task_status)

    async def handle_stream(self, stream: trio.abc.Stream) -> None:
        try:
            host, port = stream.socket.getpeername()[:2]  # type: ignore[attr-defined]
            remote = f"{host}:{port}"
        except (OSError, AttributeError):  # AttributeError: not a socket (in-memory tests)
            remote = "?"
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=64 * 1024)
        try:
            while True:
                event = await self._next_event(conn, stream)
                if not isinstance(event, h11.Request):
                    return
                request = _request(event, remote)
                if _is_upgrade(event):
                    await self._upgrade(conn, stream, request)
                    return
                body = bytearray()
                while True:
                    ev = await self._next_event(conn, stream)
                    if isinstance(ev, h11.Data):
                        body += ev.data
                        if len(body) > MAX_REQUEST_BODY:
                            await self._send_simple(conn, stream, 413, b"request body too large")
                            return
                    elif isinstance(ev, h11.EndOfMessage):
                        break
                    else:
                        return
                request.body = bytes(body)
                handler = self._find(request.method, request.path)
                if handler is None:
                    known = any(p == request.path for _, p in self.routes)
                    status = 405 if known else 404
                    response = Response(status, b'{"error": "%s"}' % (
                        b"method not allowed" if known else b"not found"))
                else:
                    try:
                        response = await handler(request)
                    except Exception:
                        log.exception("handler for %s %s failed", request.method, request.path)
                        response = Response(500, b'{"error": "internal error"}')
                await self._send_response(conn, stream, response)
                if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
                    return
                try:
                    conn.start_next_cycle()
                except h11.LocalProtocolError:
                    return
        except h11.RemoteProtocolError as exc:
            self.on_bad_request(str(exc))
            try:
                await self._send_simple(conn, stream, exc.error_status_hint, b"bad request")
            except Exception:  # the peer may be gone already
                pass
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            with trio.move_on_after(1) as cs:
                cs.shield = True
                await stream.aclose()

    async def _next_event(self, conn: h11.Connection, stream: trio.abc.Stream) -> Any:
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = await stream.receive_some(READ_SIZE)
                conn.receive_data(data)
                continue
            return event

    async def _send_response(self, conn: h11.Connection, stream: trio.abc.Stream,
                             r: Response) -> None:
        headers = [("content-type", r.content_type), ("content-length", str(len(r.body))),
                   ("cache-control", "no-store"), *r.headers]
        data = conn.send(h11.Response(status_code=r.status, headers=headers))
        data += conn.send(h11.Data(data=r.body)) if r.body else b""
        data += conn.send(h11.EndOfMessage())
        await stream.send_all(data)

    async def _send_simple(self, conn: h11.Connection, stream: trio.abc.Stream, status: int,
                           text: bytes) -> None:
        if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
            await self._send_response(
                conn, stream, Response(status, text, "text/plain", [("connection", "close")]))

    async def _upgrade(self, conn: h11.Connection, stream: trio.abc.Stream,
                       request: Request) -> None:
        route = self.ws_routes.get(request.path)
        if route is None:
            await self._send_simple(conn, stream, 404, b"no WebSocket endpoint here")
            return
        handler, offered = route
        admit = self.ws_admit.get(request.path)
        refusal = admit(request) if admit is not None else None
        if refusal is not None:
            await self._send_response(conn, stream, dataclasses.replace(
                refusal, headers=[*refusal.headers, ("connection", "close")]))
            return
        asked = [p.strip() for p in request.headers.get("sec-websocket-protocol", "").split(",")
                 if p.strip()]
        chosen = next((p for p in asked if p in offered), None)
        key = request.headers.get("sec-websocket-key", "").encode()
        headers = [(b"upgrade", b"websocket"), (b"connection", b"Upgrade"),
                   (b"sec-websocket-accept", generate_accept_token(key))]
        if chosen:
            headers.append((b"sec-websocket-protocol", chosen.encode()))
        data = conn.send(h11.InformationalResponse(status_code=101, headers=headers))
        await stream.send_all(data)
        trailing, _ = conn.trailing_data
        ws = WebSocket(stream, Connection(ConnectionType.SERVER, trailing_data=bytes(trailing)),
                       chosen, self.ws_max_sizes.get(request.path, self.max_ws_message_size))
        try:
            await handler(ws, request)
        except (ConnectionClosed, MessageTooBig):
            pass
        except Exception:
            # Handlers are failure boundaries themselves (and count what they catch); this
            # is the last resort that keeps one connection's bug inside that connection.
            log.exception("WebSocket handler for %s from %s failed", request.path,
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


def _request(event: h11.Request, remote: str) -> Request:
    target = event.target.decode("latin-1")
    path, _, qs = target.partition("?")
    query = {k: v[-1] for k, v in urllib.parse.parse_qs(qs).items()}
    headers: dict[str, str] = {}
    for name, value in event.headers:
        key = name.decode("latin-1").lower()
        val = value.decode("latin-1")
        headers[key] = f"{headers[key]}, {val}" if key in headers else val
    return Request(event.method.decode(), urllib.parse.unquote(path), query, headers,
                   remote=remote)


def _is_upgrade(event: h11.Request) -> bool:
    for name, value in event.headers:
        if name.lower() == b"upgrade" and value.lower() == b"websocket":
            return True
    return False


def json_response(obj: Any, status: int = 200) -> Response:
    import json

    return Response(status, json.dumps(obj, separators=(",", ":"), default=str).encode())


__all__ = [
    "CloseReason", "ConnectionClosed", "HttpServer", "MessageTooBig", "Request", "Response",
    "WebSocket", "json_response", "prepare_message",
]
