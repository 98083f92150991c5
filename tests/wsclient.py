"""A bare WebSocket client for conformance and fuzz tests: wsproto on a Trio TCP stream.

No client library sits between the test and the wire, so what a test sees is exactly what
the hub sent: a close frame's code and reason, or no close frame at all (``code`` 1006:
the TCP connection ended without one).  The client behaves as RFC 6455 asks: it answers
the hub's close frame with its own and then waits for the hub to close the TCP connection.
"""

from __future__ import annotations

import socket
from typing import Any

import trio
from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Message,
    Ping,
    RejectConnection,
    Request,
    TextMessage,
)

NO_CLOSE_FRAME = 1006


class Closed(Exception):
    """The hub closed the WebSocket: ``code`` and ``reason`` of its close frame."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(f"closed {code} {reason!r}")
        self.code = code
        self.reason = reason


class WsClient:
    def __init__(self, stream: trio.SocketStream, ws: WSConnection) -> None:
        self.stream = stream
        self.ws = ws
        self.subprotocol: str | None = None
        self._pending: list[Any] = []
        self._text: list[str] = []
        self._bytes: list[bytes] = []
        self.closed: Closed | None = None
        self.bytes_received = 0  # on the wire, WebSocket framing included
        self.extensions: list[Any] = []  # the extensions the hub agreed to

    @classmethod
    async def connect(cls, port: int, path: str, *, subprotocols: list[str] | None = None,
                      rcvbuf: int | None = None, extensions: list[Any] | None = None,
                      extra_headers: list[tuple[bytes, bytes]] | None = None) -> WsClient:
        """Connect and upgrade.  ``rcvbuf``: a small receive buffer, so that a client that
        stops reading makes the hub's writes to it block within a few frames."""
        sock = trio.socket.socket()
        if rcvbuf is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        await sock.connect(("127.0.0.1", port))
        self = cls(trio.SocketStream(sock), WSConnection(ConnectionType.CLIENT))
        await self.stream.send_all(self.ws.send(Request(
            host="127.0.0.1", target=path, subprotocols=subprotocols or [],
            extensions=extensions or [], extra_headers=extra_headers or [])))
        while True:
            event = await self._next_event()
            if isinstance(event, AcceptConnection):
                self.subprotocol = event.subprotocol
                self.extensions = list(event.extensions)
                return self
            if isinstance(event, RejectConnection):
                raise ConnectionError(f"upgrade refused: {event.status_code}")

    async def _next_event(self) -> Any:
        while not self._pending:
            self._pending.extend(self.ws.events())
            if self._pending:
                break
            try:
                data = await self.stream.receive_some(1 << 20)
            except trio.BrokenResourceError:
                data = b""
            self.bytes_received += len(data)
            self.ws.receive_data(data or None)  # None: the TCP connection ended
        return self._pending.pop(0)

    async def send(self, data: bytes | str) -> None:
        await self.stream.send_all(self.ws.send(Message(data=data)))  # type: ignore[abstract]

    async def send_raw(self, data: bytes) -> None:
        """Bytes as they are: not framed (garbage to the hub's frame parser)."""
        await self.stream.send_all(data)

    async def send_frame(self, opcode: int, payload: bytes, *, masked: bool = True) -> None:
        """One hand-made frame (FIN set), e.g. text that is not UTF-8, or an unmasked one."""
        n = len(payload)
        head = bytes((0x80 | opcode,))
        bit = 0x80 if masked else 0
        if n < 126:
            head += bytes((bit | n,))
        elif n < 1 << 16:
            head += bytes((bit | 126,)) + n.to_bytes(2, "big")
        else:
            head += bytes((bit | 127,)) + n.to_bytes(8, "big")
        if masked:
            key = b"\x0f\x1e\x2d\x3c"
            payload = key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))
        await self.stream.send_all(head + payload)

    async def finish(self) -> tuple[int, str]:
        """End without a closing handshake (after garbage the hub may not parse ours):
        send EOF and read until the hub closes; (code, reason) of its close frame, or
        (1006, "") if it closed the TCP connection without one."""
        try:
            await self.stream.send_eof()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        try:
            return await self.close_reason()
        except trio.BrokenResourceError:
            return NO_CLOSE_FRAME, ""

    async def recv(self) -> bytes | str:
        """The next whole message; raises Closed when the hub closes."""
        if self.closed is not None:
            raise self.closed
        while True:
            event = await self._next_event()
            if isinstance(event, TextMessage):
                self._text.append(event.data)
                if event.message_finished:
                    text, self._text = "".join(self._text), []
                    return text
            elif isinstance(event, BytesMessage):
                self._bytes.append(bytes(event.data))
                if event.message_finished:
                    data, self._bytes = b"".join(self._bytes), []
                    return data
            elif isinstance(event, Ping):
                await self._send_quietly(self.ws.send(event.response()))
            elif isinstance(event, CloseConnection):
                self.closed = Closed(event.code, event.reason or "")
                if self.ws.state is ConnectionState.REMOTE_CLOSING:
                    await self._send_quietly(self.ws.send(event.response()))
                await self._until_eof()
                raise self.closed

    async def close_reason(self) -> tuple[int, str]:
        """Read (and drop) messages until the hub closes (within 10 s); its close code and
        reason."""
        with trio.fail_after(10):
            try:
                while True:
                    await self.recv()
            except Closed as closed:
                return closed.code, closed.reason

    async def close(self, code: int = 1000, reason: str = "") -> tuple[int, str]:
        """Start the closing handshake; the hub's reply (code, reason)."""
        await self.stream.send_all(self.ws.send(CloseConnection(code=code, reason=reason)))
        return await self.close_reason()

    async def _send_quietly(self, data: bytes) -> None:
        try:
            await self.stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    async def _until_eof(self) -> None:
        """The hub closes the TCP connection once the closing handshake is done."""
        with trio.move_on_after(5):
            try:
                while await self.stream.receive_some(1 << 16):
                    pass
            except trio.BrokenResourceError:
                pass
        await self.stream.aclose()

    async def aclose(self) -> None:
        with trio.CancelScope(shield=True):
            await self.stream.aclose()
