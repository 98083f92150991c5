"""Wire protocol v1 messages: their CBOR encoding and validation.

Every WebSocket message is one binary message holding one CBOR array whose first item is
the message type.  ``docs/protocol.md`` is the normative description; this module is its
reference implementation.  Decoding validates shape and types and raises
``ProtocolError`` with the close code the receiver must use.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import cbor2

from ..records import KIND_OF, Record, RecordError, from_wire, to_wire
from .columnar import ColumnarError, Columns, check_columns, to_rows

#: the newest version this implementation speaks
PROTOCOL_VERSION = 3
#: every version it speaks: v3 (columnar bodies with typed float columns, section 5.2),
#: v2 (columnar bodies) and v1, still spoken to peers that know nothing newer
SUPPORTED_VERSIONS = (1, 2, 3)
#: the largest sequence number, record id or other integer a message may carry: what a
#: signed 64-bit column (SQLite INTEGER, PostgreSQL BIGINT) holds
MAX_INT = (1 << 63) - 1
#: the longest REFUSE or REJECT reason (section 2): the encoder cuts a longer one, which a
#: peer's decoder would refuse as malformed (a REJECT quoting a huge bad field once did)
MAX_REASON = 1024

# message types
HELLO = 1
WELCOME = 2
REFUSE = 3
DATA = 4
ACK = 5
REJECT = 6
PING = 7
PONG = 8
LOST = 9
POSITIONS = 10

#: the largest source positions (section 4.1) a POSITIONS or a WELCOME
#: carries, as CBOR: a gateway tells none larger, a hub keeps and hands back none larger,
#: so a WELCOME holding them stays far below the 1 MiB a gateway takes in a message
MAX_POSITIONS_BYTES = 512 * 1024

#: the most ranges a HELLO's or a LOST's ``dropped`` names (section 4): the gateway keeps
#: its most recent runs of dropped frames, merging the oldest two past it
MAX_DROPPED_RANGES = 64


class CloseCode:
    """WebSocket close codes used by the protocol (4000-4999 are application codes)."""

    NORMAL = 1000
    GOING_AWAY = 1001  # the peer is shutting down; reconnect later
    TOO_BIG = 1009  # a message larger than the configured frame limit
    INTERNAL_ERROR = 1011  # the receiver failed unexpectedly (a bug): retry later
    UNAUTHORIZED = 4001  # unknown gateway id or wrong token
    UNSUPPORTED_VERSION = 4002  # no protocol version in common
    # 4003 (the gateway id is connected already) is no longer sent: the newest wins (4008)
    PROTOCOL_ERROR = 4004  # malformed message, out of state, sequence gap, seq sent twice
    HEARTBEAT_TIMEOUT = 4005  # nothing received for 2 x heartbeat interval
    TOO_MANY_RECORDS = 4006  # a data frame with more records than the limit
    HELLO_TIMEOUT = 4007  # no hello within the handshake timeout
    REPLACED = 4008  # a newer connection with the same gateway id took over


class ProtocolError(Exception):
    """The peer broke the protocol; close the connection with ``code`` and ``reason``."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(f"{reason} (close code {code})")
        self.code = code
        self.reason = reason


# --- events (what a decoded message means) ---------------------------------------


@dataclasses.dataclass(frozen=True)
class Hello:
    gateway_id: str
    token: str = dataclasses.field(repr=False)  # never in a log line (docs/security.md)
    epoch: str
    next_seq: int
    versions: tuple[int, ...] = SUPPORTED_VERSIONS
    heartbeat: float = 5.0
    # body encodings the gateway can send (section 5.1); empty: none, the key is left out
    compression: tuple[str, ...] = ()
    #: the gateway's frame store started afresh: it asks for the source positions the hub
    #: holds for it (section 4.1); False: the key is left out
    resume: bool = False
    #: the seqs below ``next_seq`` the gateway dropped before they were acknowledged
    #: (section 4); None: it does not say (the key is left out: a gateway from before it)
    dropped: tuple[tuple[int, int], ...] | None = None


@dataclasses.dataclass(frozen=True)
class Welcome:
    version: int
    applied: list[tuple[int, int]]
    heartbeat: float
    max_frame_bytes: int
    max_records: int
    compression: str | None = None  # the body encoding the hub accepts, of those offered
    #: the hub takes LOST (section 4): a gateway may declare frames it dropped meanwhile
    lost: bool = False
    #: the hub takes POSITIONS (section 4.1)
    positions: bool = False
    #: the answer to a HELLO's ``resume``: the source positions the hub holds for this
    #: gateway (empty: none); None: not asked, or the hub does not keep positions
    resume: dict[str, Any] | None = None
    #: the hub takes a LOST's ``dropped`` ranges (section 4)
    dropped: bool = False


@dataclasses.dataclass(frozen=True)
class Refuse:
    code: int
    reason: str


@dataclasses.dataclass(frozen=True)
class Data:
    seq: int
    sent_at: float
    body: bytes
    encoding: str | None = None  # the body is compressed so (section 5.1); None: plain


@dataclasses.dataclass(frozen=True)
class Ack:
    watermark: int
    ranges: list[tuple[int, int]]


@dataclasses.dataclass(frozen=True)
class Reject:
    seq: int
    reason: str


@dataclasses.dataclass(frozen=True)
class Lost:
    """The gateway no longer holds any frame below ``next_seq`` (its ``drop_oldest`` queue
    dropped them while connected): frames below it the hub lacks will never come.
    ``dropped``: which of the seqs below it the gateway dropped unacknowledged (sent only
    to a hub whose WELCOME takes it; None: not said)."""

    next_seq: int
    dropped: tuple[tuple[int, int], ...] | None = None


@dataclasses.dataclass(frozen=True)
class Positions:
    """Where the gateway's sources were as of frame ``seq``: every record they produced
    up to these positions is in frames ``seq`` and below (section 4.1)."""

    seq: int
    positions: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Ping:
    t: float


@dataclasses.dataclass(frozen=True)
class Pong:
    t: float


Message = Hello | Welcome | Refuse | Data | Ack | Reject | Ping | Pong | Lost | Positions


# --- encoding ------------------------------------------------------------------------


def encode(msg: Message) -> bytes:
    if isinstance(msg, Data):
        if msg.encoding is not None:
            return cbor2.dumps([DATA, msg.seq, msg.sent_at, msg.body, msg.encoding])
        return cbor2.dumps([DATA, msg.seq, msg.sent_at, msg.body])
    if isinstance(msg, Ack):
        return cbor2.dumps([ACK, msg.watermark, [list(r) for r in msg.ranges]])
    if isinstance(msg, Ping):
        return cbor2.dumps([PING, msg.t])
    if isinstance(msg, Pong):
        return cbor2.dumps([PONG, msg.t])
    if isinstance(msg, Hello):
        hello: dict[str, Any] = {
            "versions": list(msg.versions), "gateway": msg.gateway_id, "token": msg.token,
            "epoch": msg.epoch, "next_seq": msg.next_seq, "heartbeat": msg.heartbeat}
        if msg.compression:  # left out when empty: exactly what a v1 peer always saw
            hello["compression"] = list(msg.compression)
        if msg.resume:
            hello["resume"] = True
        if msg.dropped is not None:
            hello["dropped"] = [list(r) for r in msg.dropped]
        return cbor2.dumps([HELLO, hello])
    if isinstance(msg, Welcome):
        welcome: dict[str, Any] = {
            "version": msg.version, "applied": [list(r) for r in msg.applied],
            "heartbeat": msg.heartbeat, "max_frame_bytes": msg.max_frame_bytes,
            "max_records": msg.max_records}
        if msg.compression is not None:
            welcome["compression"] = msg.compression
        if msg.lost:
            welcome["lost"] = True
        if msg.positions:
            welcome["positions"] = True
        if msg.resume is not None:
            welcome["resume"] = msg.resume
        if msg.dropped:
            welcome["dropped"] = True
        return cbor2.dumps([WELCOME, welcome])
    if isinstance(msg, Lost):
        if msg.dropped is not None:
            return cbor2.dumps([LOST, msg.next_seq, [list(r) for r in msg.dropped]])
        return cbor2.dumps([LOST, msg.next_seq])
    if isinstance(msg, Positions):
        return cbor2.dumps([POSITIONS, msg.seq, msg.positions])
    if isinstance(msg, Refuse):
        return cbor2.dumps([REFUSE, msg.code, msg.reason[:MAX_REASON]])
    if isinstance(msg, Reject):
        return cbor2.dumps([REJECT, msg.seq, msg.reason[:MAX_REASON]])
    raise TypeError(f"not a protocol message: {msg!r}")


# --- decoding ------------------------------------------------------------------------


def _bad(reason: str) -> ProtocolError:
    return ProtocolError(CloseCode.PROTOCOL_ERROR, reason)


def _shown(v: Any, width: int = 40) -> str:
    """A peer's bad value, quoted in a reason: its repr, cut.  An integer past 4,300 digits
    (a CBOR bignum) has no repr in Python (ValueError), nor has what holds one."""
    try:
        return f"{v!r:.{width}}"
    except ValueError:
        return f"a value too large to show ({type(v).__name__})"


def _int(v: Any, what: str, minimum: int = 0) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or not minimum <= v <= MAX_INT:
        raise _bad(f"{what} must be an integer from {minimum} to 2^63 - 1, got {_shown(v)}")
    return v


def _num(v: Any, what: str) -> float:
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
        raise _bad(f"{what} must be a finite number, got {_shown(v)}")
    return float(v)


#: the heartbeats a WELCOME may name (section 7): one near 0 had the gateway PING in a
#: tight loop (3,500 a second, a whole core); one of hours, never find a silent hub
HEARTBEAT_RANGE = (0.1, 3600.0)


def _heartbeat(v: Any, what: str) -> float:
    seconds = _num(v, what)
    lo, hi = HEARTBEAT_RANGE
    if not lo <= seconds <= hi:
        raise _bad(f"{what} must be between {lo:g} and {hi:g} seconds, got {seconds:g}")
    return seconds


def _str(v: Any, what: str, max_len: int = 256) -> str:
    if not isinstance(v, str) or len(v) > max_len:
        raise _bad(f"{what} must be a string of at most {max_len} characters")
    return v


def _names(v: Any, what: str, max_names: int = 16) -> tuple[str, ...]:
    if not isinstance(v, list) or len(v) > max_names:
        raise _bad(f"{what} must be a list of at most {max_names} names")
    return tuple(_str(name, what, 32) for name in v)


def _ranges(v: Any, what: str, max_ranges: int = 1024) -> list[tuple[int, int]]:
    if not isinstance(v, list) or len(v) > max_ranges:
        raise _bad(f"{what} must be a list of at most {max_ranges} [lo, hi] pairs")
    out = []
    for r in v:
        if not isinstance(r, list) or len(r) != 2:
            raise _bad(f"{what}: each range must be [lo, hi]")
        lo, hi = _int(r[0], what, 1), _int(r[1], what, 1)
        if hi < lo:
            raise _bad(f"{what}: range [{lo}, {hi}] is reversed")
        out.append((lo, hi))
    return out


def _dropped(v: Any, what: str) -> tuple[tuple[int, int], ...]:
    """A HELLO's or a LOST's ``dropped`` (section 4): at most ``MAX_DROPPED_RANGES``
    ranges of seqs, in any order (the hub only counts which seqs they hold)."""
    return tuple(_ranges(v, what, MAX_DROPPED_RANGES))


def _positions(v: Any, what: str) -> dict[str, Any]:
    """Source positions (section 4): a map with text keys, at most ``MAX_POSITIONS_BYTES``
    as CBOR; the values are the gateway's own (opaque to the hub)."""
    if not isinstance(v, dict) or not all(isinstance(k, str) for k in v):
        raise _bad(f"{what} must be a map with text keys")
    try:
        size = len(cbor2.dumps(v))
    except Exception:  # a value cbor2 decoded but cannot write back (never seen)
        raise _bad(f"{what} holds a value that does not encode") from None
    if size > MAX_POSITIONS_BYTES:
        raise _bad(f"{what} takes {size} bytes, over the {MAX_POSITIONS_BYTES} allowed")
    return v


def decode(data: bytes | str) -> Message:
    """Decode one WebSocket message; raises ProtocolError for anything malformed."""
    if isinstance(data, str):
        raise _bad("text messages are not part of the protocol; send binary CBOR")
    try:
        item = cbor2.loads(data)
    except Exception as exc:  # cbor2 raises several types for junk input
        raise _bad(f"message is not valid CBOR: {exc}") from None
    if not isinstance(item, list) or not item:
        raise _bad("message must be a non-empty CBOR array")
    kind = item[0]
    n = len(item)
    if kind == DATA and n in (4, 5):
        if not isinstance(item[3], bytes):
            raise _bad("DATA body must be a byte string")
        encoding = _str(item[4], "DATA encoding", 32) if n == 5 else None
        return Data(_int(item[1], "DATA seq", 1), _num(item[2], "DATA sent_at"), item[3],
                    encoding)
    if kind == ACK and n == 3:
        return Ack(_int(item[1], "ACK watermark"), _ranges(item[2], "ACK ranges"))
    if kind == PING and n == 2:
        return Ping(_num(item[1], "PING t"))
    if kind == PONG and n == 2:
        return Pong(_num(item[1], "PONG t"))
    if kind == LOST and n in (2, 3):
        return Lost(_int(item[1], "LOST next_seq", 1),
                    _dropped(item[2], "LOST dropped") if n == 3 else None)
    if kind == POSITIONS and n == 3:
        return Positions(_int(item[1], "POSITIONS seq", 1),
                         _positions(item[2], "POSITIONS positions"))
    if kind == HELLO and n == 2 and isinstance(item[1], dict):
        m = item[1]
        versions = m.get("versions")
        # a CBOR true is no version 1 (bool is an int to Python): WELCOME would echo it
        if not isinstance(versions, list) or not all(
                isinstance(v, int) and not isinstance(v, bool) for v in versions):
            raise _bad("HELLO versions must be a list of integers")
        if versions and not (0 <= min(versions) and max(versions) <= MAX_INT):
            raise _bad("HELLO versions must be integers from 0 to 2^63 - 1")
        return Hello(
            gateway_id=_str(m.get("gateway"), "HELLO gateway", 128),
            token=_str(m.get("token"), "HELLO token", 1024),
            epoch=_str(m.get("epoch"), "HELLO epoch", 128),
            next_seq=_int(m.get("next_seq"), "HELLO next_seq", 1),
            versions=tuple(versions),
            heartbeat=_num(m.get("heartbeat", 5.0), "HELLO heartbeat"),
            compression=_names(m.get("compression", []), "HELLO compression"),
            resume=m.get("resume") is True,  # any other value: it does not ask
            dropped=(None if "dropped" not in m
                     else _dropped(m["dropped"], "HELLO dropped")),
        )
    if kind == WELCOME and n == 2 and isinstance(item[1], dict):
        m = item[1]
        return Welcome(
            version=_int(m.get("version"), "WELCOME version", 1),
            applied=_ranges(m.get("applied"), "WELCOME applied"),
            heartbeat=_heartbeat(m.get("heartbeat"), "WELCOME heartbeat"),
            max_frame_bytes=_int(m.get("max_frame_bytes"), "WELCOME max_frame_bytes", 1),
            max_records=_int(m.get("max_records"), "WELCOME max_records", 1),
            compression=(None if m.get("compression") is None
                         else _str(m["compression"], "WELCOME compression", 32)),
            lost=m.get("lost") is True,  # any other value: the hub does not take LOST
            positions=m.get("positions") is True,
            resume=(None if m.get("resume") is None
                    else _positions(m["resume"], "WELCOME resume")),
            dropped=m.get("dropped") is True,
        )
    if kind == REFUSE and n == 3:
        return Refuse(_int(item[1], "REFUSE code"), _str(item[2], "REFUSE reason", MAX_REASON))
    if kind == REJECT and n == 3:
        return Reject(_int(item[1], "REJECT seq", 1), _str(item[2], "REJECT reason", MAX_REASON))
    raise _bad(f"unknown message type {_shown(kind)} with {n} items")


# --- frame bodies ----------------------------------------------------------------------


class FrameError(Exception):
    """A data frame whose body is invalid: the hub rejects it (dead letter), the
    connection stays up."""


def encode_body(first_rid: int, records: Sequence[Record]) -> bytes:
    """CBOR ``[first_rid, [source...], [record...]]``; each record positional."""
    index: dict[str, int] = {}
    wire = []
    for r in records:
        if type(r) not in KIND_OF:
            raise TypeError(f"not a record: a {type(r).__name__}")
        src = r[0]
        i = index.get(src)
        if i is None:
            if type(src) is not str:
                raise TypeError("a record's source must be text")
            i = index[src] = len(index)
        wire.append(to_wire(r, i))
    return cbor2.dumps([first_rid, list(index), wire])


def _body_item(body: bytes) -> list[Any]:
    try:
        item = cbor2.loads(body)
    except Exception as exc:
        raise FrameError(f"body is not valid CBOR: {exc}") from None
    if not isinstance(item, list) or len(item) not in (3, 4):
        raise FrameError("body must be [first_rid, sources, records] (v1) or "
                         "[first_rid, sources, runs, tables] (v2 columnar)")
    return item


def _too_many(n: int, max_records: int) -> ProtocolError:
    return ProtocolError(CloseCode.TOO_MANY_RECORDS,
                         f"frame has {n} records, limit is {max_records}")


def _rows(item: list[Any], max_records: int) -> tuple[int, list[str], list[Any]]:
    first_rid, sources, records = item
    if not (isinstance(sources, list) and isinstance(records, list)):
        raise FrameError("body must be [first_rid, sources, records]")
    if type(first_rid) is not int or first_rid < 1:  # a CBOR true is no uint (as in columns)
        raise FrameError(f"first_rid must be an integer >= 1, got {_shown(first_rid)}")
    if not all(isinstance(s, str) for s in sources):
        raise FrameError("sources must be strings")
    if len(records) > max_records:
        raise _too_many(len(records), max_records)
    return first_rid, sources, records


def decode_body(body: bytes, max_records: int) -> tuple[int, list[str], list[Any]]:
    """(first_rid, sources, positional wire records) of a body of either layout (a
    columnar one is converted: for tools and tests; the hub uses ``decode_frame``).
    Raises FrameError, or ProtocolError (4006) over ``max_records``."""
    item = _body_item(body)
    if len(item) == 4:
        try:
            item = to_rows(item)
        except ColumnarError as exc:
            raise FrameError(f"bad columnar body: {exc}") from None
    return _rows(item, max_records)


class Rows:
    """A v1 body's records: built as they are checked, one by one (``Columns`` is the v2
    counterpart, built on first use); the same interface."""

    __slots__ = ("_records", "n")

    def __init__(self, records: list[Record]) -> None:
        self._records = records
        self.n = len(records)

    def records(self) -> list[Record]:
        return self._records

    def timestamps(self) -> list[Any]:
        """Every record's ``ts`` as sent."""
        return [r[1] for r in self._records]


def check_frame(body: bytes, max_records: int, *, columnar: bool = True, typed: bool = True
                ) -> tuple[int, Columns | Rows]:
    """A frame body to (first_rid, its checked records: ``.n``, ``.records()``,
    ``.timestamps()``): the hub's decode, which builds a columnar body's records only
    when they are first asked for (``Columns``).  ``columnar``: whether the v2 layout is
    allowed (a v1 connection sends rows only), ``typed`` whether its typed float columns are
    (v3; a v2 connection sends arrays of floats only).  Raises FrameError for an invalid body (the
    frame is rejected, the connection stays up) and ProtocolError (4006) for more than
    ``max_records`` records."""
    item = _body_item(body)
    decoded: Columns | Rows
    if len(item) == 4:
        if not columnar:
            raise FrameError("a columnar body (4 items) needs protocol v2; this "
                             "connection speaks v1")
        try:
            first_rid, decoded = check_columns(item, max_records, typed=typed)
        except OverflowError as exc:
            raise _too_many(exc.args[0], max_records) from None
        except (ColumnarError, TypeError, ValueError) as exc:
            raise FrameError(f"bad columnar body: {exc}") from None
    else:
        first_rid, sources, wire = _rows(item, max_records)
        try:
            decoded = Rows([from_wire(w, sources) for w in wire])
        except (RecordError, TypeError, ValueError) as exc:  # ValueError: a bignum's repr
            raise FrameError(f"bad record: {exc}") from None
    if first_rid + max(decoded.n, 1) - 1 > MAX_INT:  # ids a 64-bit column holds
        raise FrameError(f"record ids from first_rid {_shown(first_rid)} pass 2^63 - 1")
    return first_rid, decoded


def decode_frame(body: bytes, max_records: int, *, columnar: bool = True, typed: bool = True
                 ) -> tuple[int, list[Record]]:
    """A frame body to (first_rid, records): ``check_frame`` with the records built.
    Raises FrameError for an invalid body and ProtocolError (4006) for more than
    ``max_records`` records."""
    first_rid, decoded = check_frame(body, max_records, columnar=columnar, typed=typed)
    return first_rid, decoded.records()
