"""An independent gateway peer for /ws/gateway, written from docs/protocol.md alone.

Nothing of edgegw is imported: messages and bodies are built with cbor2 exactly as the
document describes them (section 2's table, section 5's row layout, section 5.2's columnar
layout and typed float columns, section 5.1's compressed bodies), so a test that passes
with this peer says the document is enough to interoperate.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Sequence
from typing import Any

import cbor2
import trio
from wsclient import WsClient

# section 2: message types
HELLO, WELCOME, REFUSE, DATA, ACK, REJECT, PING, PONG, LOST, POSITIONS = range(1, 11)
# section 5: record kinds used here
LOT_START, PART_RESULT, PARAMETRIC, SENSOR_READING = 1, 5, 6, 11
INT64_MAX = 2**63 - 1


# ---------------------------------------------------------------- bodies (sections 5, 5.2)


def sensor(channel: str, value: Any, ts: float = 1764130000.0, unit: str = "C",
           source: int = 0) -> list[Any]:
    """A SensorReading as a row: [kind, source_index, ts, channel, value, unit]."""
    return [SENSOR_READING, source, ts, channel, value, unit]


def rows(first_rid: int, records: Sequence[Sequence[Any]],
         sources: Sequence[str] = ("sensors",)) -> bytes:
    """Section 5's row layout: [first_rid, sources, records]."""
    return cbor2.dumps([first_rid, list(sources), [list(r) for r in records]])


def columns(first_rid: int, runs: Sequence[int], tables: Sequence[Sequence[Any]],
            sources: Sequence[str] = ("sensors",)) -> bytes:
    """Section 5.2's columnar layout: [first_rid, sources, runs, tables]."""
    return cbor2.dumps([first_rid, list(sources), list(runs), [list(t) for t in tables]])


def typed(*values: float) -> cbor2.CBORTag:
    """Section 5.2, "Typed float columns": tag 86 around little-endian binary64s."""
    return cbor2.CBORTag(86, struct.pack(f"<{len(values)}d", *values))


def sensor_table(channels: Sequence[str], values: Sequence[Any], ts: Any = None,
                 unit: Any = None) -> list[Any]:
    """A kind-11 table: source_index, ts, channel, value[, unit] columns (one value or n)."""
    cols: list[Any] = [[0], ts if ts is not None else [1764130000.0], list(channels),
                       values if isinstance(values, cbor2.CBORTag) else list(values)]
    if unit is not None:
        cols.append(unit)
    return [SENSOR_READING, cols]


# ---------------------------------------------------------------- messages (section 2)


def hello(gateway: str, token: str, epoch: str, next_seq: int,
          versions: Sequence[int] = (1, 2, 3), heartbeat: float = 5.0,
          **extra: Any) -> bytes:
    return cbor2.dumps([HELLO, {"versions": list(versions), "gateway": gateway,
                                "token": token, "epoch": epoch, "next_seq": next_seq,
                                "heartbeat": heartbeat, **extra}])


def data(seq: int, body: bytes, encoding: str | None = None, sent_at: float = 1.0) -> bytes:
    message: list[Any] = [DATA, seq, sent_at, body]
    if encoding is not None:
        message.append(encoding)
    return cbor2.dumps(message)


def positions(seq: int, where: dict[str, Any]) -> bytes:
    """Section 4.1: where the sources were as of frame ``seq``."""
    return cbor2.dumps([POSITIONS, seq, where])


def zlib_data(seq: int, body: bytes) -> bytes:
    """Section 5.1: the body as one zlib stream, named in a fifth element."""
    return data(seq, zlib.compress(body, 1), "zlib")


def covered(ack: list[Any], seq: int) -> bool:
    """Section 6: is ``seq`` acknowledged by ACK [5, watermark, ranges]?"""
    _, watermark, ranges = ack
    return seq <= watermark or any(lo <= seq <= hi for lo, hi in ranges)


class PeerGateway:
    """One /ws/gateway connection: HELLO sent, WELCOME (or REFUSE) read."""

    def __init__(self, client: WsClient, first: list[Any]) -> None:
        self.client = client
        self.first = first  # WELCOME or REFUSE, as received
        self.acks: list[list[Any]] = []
        self.rejects: list[list[Any]] = []
        self.pongs: list[list[Any]] = []
        self.pings: list[list[Any]] = []

    @property
    def welcome(self) -> dict[str, Any]:
        assert self.first[0] == WELCOME, self.first
        return self.first[1]

    @classmethod
    async def connect(cls, port: int, gateway: str, token: str, epoch: str = "epoch-1",
                      next_seq: int = 1, **kw: Any) -> PeerGateway:
        client = await WsClient.connect(port, "/ws/gateway")
        await client.send(hello(gateway, token, epoch, next_seq, **kw))
        return cls(client, cbor2.loads(await client.recv()))

    async def send(self, message: bytes) -> None:
        await self.client.send(message)

    async def next(self, pings: bool = False) -> list[Any]:
        """The next ACK, REJECT or PONG (recorded); the hub's PINGs are answered (section 7)
        and recorded on the way (returned too if ``pings``).  Raises wsclient.Closed when
        the hub closes."""
        while True:
            message = cbor2.loads(await self.client.recv())
            kind = message[0]
            if kind == PING:
                self.pings.append(message)
                await self.client.send(cbor2.dumps([PONG, message[1]]))
                if pings:
                    return message
                continue
            {ACK: self.acks, REJECT: self.rejects, PONG: self.pongs}[kind].append(message)
            return message

    async def until_acked(self, *seqs: int) -> list[Any]:
        """Read until an ACK covers every one of ``seqs``; that ACK."""
        while True:
            message = await self.next()
            if message[0] == ACK and all(covered(message, s) for s in seqs):
                return message

    async def until_rejected(self, seq: int) -> list[Any]:
        while True:
            message = await self.next()
            if message[0] == REJECT and message[1] == seq:
                return message


async def http_request(port: int, head: str) -> tuple[int, dict[str, str], bytes]:
    """One raw HTTP/1.1 exchange (``head``: request line and headers, without the blank
    line): status, headers (lower-case names), body.  For the probe and for an upgrade the
    hub answers with an HTTP status instead of 101 (section 7)."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(f"{head}\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        raw = b""
        with trio.move_on_after(5):
            while chunk := await stream.receive_some(65536):
                raw += chunk
                if b"\r\n\r\n" in raw and raw.split(b" ", 2)[1] == b"101":
                    break  # upgraded: no body follows, and the hub waits for HELLO
    top, _, body = raw.partition(b"\r\n\r\n")
    lines = top.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:] if ": " in line)
    return int(lines[0].split()[1]), {k.lower(): v for k, v in headers.items()}, body


UPGRADE = ("GET /ws/gateway HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
           "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13")
