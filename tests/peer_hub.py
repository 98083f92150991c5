"""An independent hub peer for /ws/gateway, written from docs/protocol.md alone.

The other direction of tests/peer_gateway.py: a WebSocket server (wsproto on Trio, cbor2)
that answers the readiness probe (section 7) and hands each upgraded connection to the
test as a ``Session``, which reads the gateway's messages and sends whatever the test
scripts -- a WELCOME naming a version the gateway did not offer included.  Nothing of
edgegw is imported.
"""

from __future__ import annotations

import json
import math
from typing import Any

import cbor2
import trio
from wsclient import Closed
from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Message,
    Ping,
    Request,
    TextMessage,
)

HELLO, WELCOME, REFUSE, DATA, ACK, REJECT, PING, PONG, LOST = range(1, 10)


def records_in(body: bytes) -> tuple[int, int, str]:
    """(first_rid, records, layout) of a DATA body: 3 items are rows, 4 columns (the sum
    of the runs' counts), section 5 and 5.2."""
    item = cbor2.loads(body)
    if len(item) == 3:
        return item[0], len(item[2]), "rows"
    assert len(item) == 4, item
    return item[0], sum(item[2][1::2]), "columns"


def tags_in(item: Any) -> set[int]:
    """The CBOR tags anywhere in a decoded item."""
    if isinstance(item, cbor2.CBORTag):
        return {item.tag} | tags_in(item.value)
    if isinstance(item, list):
        return set().union(*(tags_in(v) for v in item)) if item else set()
    return set()


def welcome(applied: list[list[int]] | None = None, version: int = 3,
            heartbeat: float = 5.0, max_frame_bytes: int = 8 << 20,
            max_records: int = 50_000, **extra: Any) -> list[Any]:
    return [WELCOME, {"version": version, "applied": applied or [], "heartbeat": heartbeat,
                      "max_frame_bytes": max_frame_bytes, "max_records": max_records,
                      **extra}]


def runs_of(seqs: set[int]) -> list[list[int]]:
    """``seqs`` as sorted [lo, hi] runs (WELCOME's ``applied``, ACK's ranges)."""
    runs: list[list[int]] = []
    for seq in sorted(seqs):
        if runs and runs[-1][1] == seq - 1:
            runs[-1][1] = seq
        else:
            runs.append([seq, seq])
    return runs


def ack_of(received: set[int]) -> list[Any]:
    """Section 6's ACK for exactly the frames ``received``: the watermark below the first
    one missing, the rest as ranges (acking a frame's own seq would say every frame below
    it is applied, and a gateway that sent out of order drops what the peer never got)."""
    runs = runs_of(received)
    watermark = runs[0][1] if runs and runs[0][0] == 1 else 0
    return [ACK, watermark, [r for r in runs if r[0] > 1]]


class Session:
    """One upgraded connection from the gateway."""

    def __init__(self, stream: trio.SocketStream, ws: WSConnection) -> None:
        self.stream = stream
        self.ws = ws
        self.done = trio.Event()
        self._buffer: list[bytes] = []

    async def send(self, message: list[Any]) -> None:
        await self.stream.send_all(self.ws.send(Message(data=cbor2.dumps(message))))

    async def send_raw(self, data: bytes | str) -> None:
        """One WebSocket message as given: text, or bytes that need not be CBOR."""
        await self.stream.send_all(self.ws.send(Message(data=data)))

    async def recv(self) -> list[Any]:
        """The gateway's next message (decoded); Closed when it closes."""
        while True:
            for event in self.ws.events():
                if isinstance(event, BytesMessage):
                    self._buffer.append(bytes(event.data))
                    if event.message_finished:
                        data, self._buffer = b"".join(self._buffer), []
                        return cbor2.loads(data)
                elif isinstance(event, TextMessage):
                    raise AssertionError(f"a text message from the gateway: {event.data!r}")
                elif isinstance(event, Ping):
                    await self.stream.send_all(self.ws.send(event.response()))
                elif isinstance(event, CloseConnection):
                    if self.ws.state is ConnectionState.REMOTE_CLOSING:
                        try:
                            await self.stream.send_all(self.ws.send(event.response()))
                        except trio.BrokenResourceError:
                            pass
                    raise Closed(event.code, event.reason or "")
            try:
                data = await self.stream.receive_some(1 << 16)
            except trio.BrokenResourceError:
                data = b""
            self.ws.receive_data(data or None)

    async def recv_data(self) -> list[Any]:
        """The next DATA, PINGs answered on the way (section 7)."""
        while True:
            message = await self.recv()
            if message[0] == PING:
                await self.send([PONG, message[1]])
            elif message[0] == DATA:
                return message
            else:
                assert message[0] == PONG, message

    async def end(self) -> None:
        """Close from this side and read until the gateway's answering close (at most 2 s):
        a test then stops a gateway that is between sessions, which it does at once (a
        gateway stopped in a session waits out its close timeout, 0.5 s)."""
        if self.done.is_set():
            return
        with trio.move_on_after(2):
            try:
                await self.stream.send_all(self.ws.send(CloseConnection(code=1000)))
                while True:
                    await self.recv()
            except Exception:  # the answering close, or the gateway had closed already
                pass
        self.done.set()

    async def close(self, code: int = 1000, reason: str = "") -> None:
        try:
            await self.stream.send_all(self.ws.send(CloseConnection(code=code, reason=reason)))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        self.done.set()


class PeerHub:
    def __init__(self) -> None:
        self.port = 0
        self.probes = 0
        self.open: list[Session] = []  # every upgraded connection, in order
        self.probe_times: list[float] = []  # trio.current_time() of each probe
        self.probe_lines: list[str] = []  # each probe's request line
        self.busy_probes = 0  # this many next probes get 503 + Retry-After: busy_retry_after
        self.busy_retry_after = 1
        self._send, self.sessions = trio.open_memory_channel[Session](math.inf)

    async def run(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started(self.port)
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, stream: trio.SocketStream) -> None:
        async with stream:
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = await stream.receive_some(1 << 16)
                if not chunk:
                    return
                head += chunk
            if b"upgrade: websocket" not in head.lower():  # the readiness probe
                self.probes += 1
                self.probe_times.append(trio.current_time())
                self.probe_lines.append(head.split(b"\r\n", 1)[0].decode("latin-1"))
                if self.busy_probes:  # section 7: load shedding
                    self.busy_probes -= 1
                    await stream.send_all(b"HTTP/1.1 503 Service Unavailable\r\n"
                                          b"Retry-After: %d\r\nContent-Length: 0\r\n"
                                          b"Connection: close\r\n\r\n"
                                          % self.busy_retry_after)
                    return
                body = json.dumps({"status": "ready"}).encode()
                await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                                      b"Content-Length: %d\r\nConnection: close\r\n\r\n%s"
                                      % (len(body), body))
                return
            ws = WSConnection(ConnectionType.SERVER)
            ws.receive_data(head)
            request = next(e for e in ws.events() if isinstance(e, Request))
            assert request.target == "/ws/gateway" and not request.subprotocols
            await stream.send_all(ws.send(AcceptConnection()))
            session = Session(stream, ws)
            self.open.append(session)
            await self._send.send(session)
            await session.done.wait()
