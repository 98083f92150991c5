"""A server-side WebSocket over a Trio stream (wsproto), and frames prepared once for many
clients (a server-to-client frame is not masked: ``prepare_message`` encodes it once,
``WebSocket.send_prepared`` writes the same bytes to any number of clients)."""

from __future__ import annotations

import contextlib
import os
from typing import Any

import trio
from wsproto.connection import Connection, ConnectionState
from wsproto.events import (
    BytesMessage,
    CloseConnection,
    Message,
    Ping,
    TextMessage,
)
from wsproto.frame_protocol import FrameProtocol

READ_SIZE = 65536


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
    releases it.  It may also be *reserved* until an event (``reserved``, set by
    ``WebSocket.reserve_nowait``): while another thread writes a frame to the socket,
    writers wait for that event before they take the gate -- one event for a whole batch
    of WebSockets, and no semaphore operation per WebSocket in the common case (the frame
    written whole)."""

    def __init__(self) -> None:
        self._sem = trio.Semaphore(1)
        self.reserved: trio.Event | None = None

    def locked(self) -> bool:
        return self.reserved is not None or self._sem.value == 0

    def acquire_nowait(self) -> None:
        self._sem.acquire_nowait()

    def release(self) -> None:
        self._sem.release()

    def unreserve(self, *, keep: bool = False) -> None:
        """End the reservation; ``keep``: take the gate instead (``acquire_nowait``), so
        that writers waiting for the event then wait for its release."""
        if keep:
            self._sem.acquire_nowait()  # free: nobody takes it while it is reserved
        self.reserved = None

    async def __aenter__(self) -> None:
        while self.reserved is not None:
            await self.reserved.wait()
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
        self._parts: list[bytes | bytearray | str] = []
        self._size = 0
        self.bytes_sent = 0
        self._torn = False  # a write was cut off mid-frame: no more frames can follow
        self._receiving = False  # a task is waiting in stream.receive_some
        self._fd = _socket_fd(stream)  # for writes without waiting (send_prepared_nowait)
        self._rest_owed = False  # send_gate is held for the rest of a partly written frame
        # set when permessage-deflate was agreed (edgegw/web/deflate.py): frames it prepares
        self.deflater: Any = None

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
        if self.deflater is not None:  # wsproto would compress every message, small ones too
            await self._write(self.deflater.prepare(data))
            return
        await self._write(self.conn.send(Message(data=data)))  # type: ignore[type-var]

    async def send_prepared(self, frame: bytes) -> None:
        """Write a frame from ``prepare_message`` unchanged (encode once, write many)."""
        if self.closed:
            raise self.closed
        await self._write(frame)

    def can_send_nowait(self) -> bool:
        """Whether ``send_prepared_nowait`` may write now: the WebSocket runs over a plain
        socket, is open, and no other write is in progress."""
        return self._fd is not None and self.closed is None and not self.send_gate.locked()

    def send_prepared_nowait(self, frame: bytes) -> int:
        """Write a frame from ``prepare_message`` as far as the socket takes it at once,
        without waiting -- for a fan-out writing to many clients from one task, with no
        task switch per client.  Returns the bytes written: all of them; 0 when nothing
        could be written (the socket is full or failed, or ``can_send_nowait`` is false:
        send the frame with ``send_prepared``, which meets the error if there is one); or
        part: then the WebSocket is reserved for the rest, which only ``send_rest`` may
        write (or ``abandon_rest`` give up)."""
        if not self.can_send_nowait():
            return 0
        try:
            n = os.write(self._fd, frame)  # type: ignore[arg-type]
        except OSError:  # BlockingIOError (full) or a failed socket
            return 0
        self.bytes_sent += n
        if 0 < n < len(frame):
            self.send_gate.acquire_nowait()
            self._rest_owed = True
        return n

    def reserve_nowait(self, until: trio.Event) -> int | None:
        """Reserve the WebSocket for one frame that another thread writes straight to its
        socket (``os.write`` on the descriptor returned; the socket is non-blocking, so the
        write never waits): a fan-out hands a tick's writes to a writer thread and the
        Trio thread does not pay the system calls.  None when ``can_send_nowait`` is
        false.  Until ``end_reserved`` (called once the other thread is done with the
        socket) no other write starts and the stream is not closed: writers, ``aclose``
        and ``abort`` wait for ``until``, to be set after ``end_reserved`` -- one event
        for a whole batch of WebSockets."""
        gate = self.send_gate  # can_send_nowait, spelt out: this is per client per tick
        if self._fd is None or self.closed is not None or gate.locked():
            return None
        gate.reserved = until
        return self._fd

    def end_reserved(self, written: int, size: int) -> None:
        """The reserved write is over: ``written`` bytes of a ``size``-byte frame went out.
        0: none (the socket was full or failed; send the frame with ``send_prepared``,
        which meets the error if there is one).  A part: the WebSocket stays reserved for
        the rest, which only ``send_rest`` may write (or ``abandon_rest`` give up), as
        after ``send_prepared_nowait``."""
        self.bytes_sent += written
        if 0 < written < size:
            self.send_gate.unreserve(keep=True)
            self._rest_owed = True
        else:
            self.send_gate.reserved = None

    async def _reserved_over(self) -> None:
        """Wait (shielded) until no other thread writes to the socket: before closing it
        (its descriptor could otherwise be reused by the next connection under the other
        thread's write)."""
        while (until := self.send_gate.reserved) is not None:
            with trio.CancelScope(shield=True):
                await until.wait()

    async def send_rest(self, rest: bytes) -> None:
        """Write the end of a frame that ``send_prepared_nowait`` began, then release the
        WebSocket for other writes.  Cut off (cancelled), the stream is left unusable."""
        done = False
        try:
            await self.stream.send_all(rest)
            done = True
            self.bytes_sent += len(rest)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self.closed = self.closed or ConnectionClosed(1006, "connection lost")
            raise self.closed from exc
        finally:
            self._rest_owed = False
            self._torn = self._torn or not done
            self.send_gate.release()

    def abandon_rest(self) -> None:
        """The rest of a partly written frame will never be written: release the WebSocket;
        nothing more can be sent on it (``abort`` closes it)."""
        if self._rest_owed:
            self._rest_owed = False
            self._torn = True
            self.send_gate.release()

    async def abort(self, code: int = 1006, reason: str = "aborted") -> None:
        """Close without a close frame: after a frame was cut off mid-way, a close frame
        would be garbage to the peer.  ``closed`` says ``code`` and ``reason``."""
        self.closed = self.closed or ConnectionClosed(code, reason)
        await self._reserved_over()
        with trio.move_on_after(1) as cs:
            cs.shield = True
            await self.stream.aclose()

    async def _receive_some(self) -> bytes:
        self._receiving = True
        try:
            # (bytes() of bytes is the object itself: no copy)
            return bytes(await self.stream.receive_some(READ_SIZE))
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
                        await self._close_for_fault(1009, reason, parsable=True)
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
                        # Not the peer's close frame: wsproto could not process its frames
                        # (1002), a text message was not UTF-8 (1007), or a compressed one
                        # inflates past the limit (1009).  Tell the peer; nothing after the
                        # bad frame can be parsed.
                        await self._close_for_fault(event.code, event.reason or "",
                                                    parsable=False)
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
        await self._close(code, reason, "reply" if linger else None)

    async def _close_for_fault(self, code: int, reason: str, *, parsable: bool) -> None:
        """``get_message``'s own close for the peer's fault (1009, 1002, 1007).  Shielded
        (each wait bounded by ``close_timeout``): a task beside the reader that sees
        ``closed`` set and cancels the connection -- the live fan-out's sender -- would
        otherwise cut the close frame off, and the peer would see 1006 instead of the code.
        When the peer's frames cannot be parsed any more, what it still sends is read and
        dropped until it closes: closing over unread data resets the connection, and a
        peer still sending loses our close frame to the reset."""
        with trio.CancelScope(shield=True):
            await self._close(code, reason, "reply" if parsable else "discard")

    async def _close(self, code: int, reason: str, then: str | None) -> None:
        if self.closed is None:
            self.closed = ConnectionClosed(code, reason)
        sent = False
        try:
            if self.conn.state is ConnectionState.OPEN and not self._torn:
                with trio.move_on_after(self.close_timeout):
                    await self._write(self.conn.send(CloseConnection(code=code, reason=reason)))
                    sent = True
            if sent and then is not None and not self._receiving:
                with trio.move_on_after(self.close_timeout):
                    if then == "reply":
                        await self._await_close_reply()
                    else:  # "discard": unparsable, read and dropped until EOF
                        await self._send_eof()  # the peer's cue to close its end
                        while await self._receive_some():
                            pass
        except ConnectionClosed:
            pass
        finally:
            await self._reserved_over()
            with trio.move_on_after(1) as cs:
                cs.shield = True
                await self.stream.aclose()

    async def _send_eof(self) -> None:
        send_eof = getattr(self.stream, "send_eof", None)  # TCP: yes; TLS: no
        if send_eof is not None:
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError,
                                     trio.BusyResourceError):
                async with self.send_gate:
                    await send_eof()

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


def _socket_fd(stream: trio.abc.Stream) -> int | None:
    """The file descriptor of the plain TCP socket under ``stream`` (None over TLS or a
    memory stream)."""
    sock = getattr(stream, "socket", None)
    try:
        return sock.fileno() if sock is not None else None
    except OSError:
        return None
