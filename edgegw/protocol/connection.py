"""Sans-IO state machines for the two ends of a gateway -> hub connection.

Like h11 and wsproto, these do no I/O and read no clock: the I/O layer hands each whole
WebSocket message to ``receive(data, now)`` and gets events back; it sends the bytes the
methods return; it calls ``on_timer(now)`` at ``next_deadline()``.  Faults by the peer
raise ``ProtocolError`` carrying the close code to use; the connection is then closed.

Heartbeats: each side sends PING once per ``heartbeat`` seconds of its own silence and
answers every PING with PONG; a side that has received nothing for ``2 x heartbeat``
declares the peer dead (close code 4005) -- on a look taken on time: a side woken late
(paused) reads what waits for it first (``_Heartbeat``) -- and counting only the time this
side was reading: while the I/O layer holds its reads back (its own backpressure, e.g. the
hub's apply queue full) it says so (``reading_paused`` ... ``reading_resumed``), and what
the peer sent meanwhile waits unread; that is no silence of the peer's.  The silence is
judged while a PING's send waits too: the I/O layer says when it starts and returns
(``ping_started`` ... ``ping_done``) and calls ``on_timer`` at ``next_deadline()``
meanwhile, which hands out no second PING.
"""

from __future__ import annotations

import dataclasses
import enum
import time
from collections.abc import Iterable
from typing import Any

from .compression import ENCODINGS, ZLIB, compress_body, decompress_body
from .intervals import IntervalSet
from .messages import (
    MAX_DROPPED_RANGES,
    SUPPORTED_VERSIONS,
    Ack,
    CloseCode,
    Data,
    Hello,
    Lost,
    Message,
    Ping,
    Pong,
    Positions,
    ProtocolError,
    Refuse,
    Reject,
    Welcome,
    decode,
    encode,
)


class State(enum.Enum):
    HANDSHAKE = "handshake"
    OPEN = "open"
    CLOSED = "closed"


class _Heartbeat:
    """When to PING and when the peer is silent too long.

    Silence is judged only by a look taken on time.  An end whose timer runs more than
    ``interval / 4`` past the silence deadline was not running (SIGSTOP, a frozen VM, a
    starved process): what the peer sent meanwhile waits unread in its socket, and the
    timer usually runs before the receive side has read it.  So that look only schedules
    another, ``interval / 4`` later, after the receive side has had its turn; the peer is
    declared silent when a look on time still finds nothing received for 2 x interval.

    Silence is counted only while this end reads.  When it holds its reads back (its own
    backpressure: the hub's apply queue full behind a slow commit), the peer's frames and
    PINGs wait unread in the socket: ``pause`` ... ``resume`` stops the silence clock for
    that time (``last_received`` moves on by it), so a busy end never closes a peer that
    is sending.  PINGs still go out meanwhile, so the peer does not judge this end silent.

    Silence is judged while a PING's send waits, too.  A peer that reads nothing (paused)
    fills the socket buffers and the send waits as long as the pause: the I/O layer says
    so (``ping_started`` ... ``ping_done``) and keeps its timer running beside the send;
    the deadline stays what it was, a verdict on time raises as ever, and a PING falling
    due meanwhile is not handed out (one is in flight) but counts as sent, so the looks
    go on once an interval."""

    def __init__(self, interval: float, now: float) -> None:
        self.interval = interval
        self.last_received = now  # moved on by the time reads were held back (``resume``)
        self.last_sent = now
        self.recheck_at: float | None = None  # the look again after a late one
        self.paused_at: float | None = None  # reads held back since then
        self.pinging = False  # a PING's send waits (``ping_started`` ... ``ping_done``)

    def pause(self, now: float) -> None:
        if self.paused_at is None:
            self.paused_at = now

    def resume(self, now: float) -> None:
        if self.paused_at is not None:
            # the peer's silence is what it left unsaid while we listened
            self.last_received += max(0.0, now - max(self.paused_at, self.last_received))
            self.paused_at = None

    @property
    def slack(self) -> float:
        """How late a look may run and still count as on time (the interval may change:
        the hub's, from WELCOME, wins)."""
        return self.interval / 4

    def deadline(self) -> float:
        if self.paused_at is not None:  # no silence is judged: PINGs only
            return self.last_sent + self.interval
        silence = self.recheck_at if self.recheck_at is not None \
            else self.last_received + 2 * self.interval
        return min(self.last_sent + self.interval, silence)

    def check(self, now: float) -> bytes | None:
        if self.paused_at is not None or now - self.last_received < 2 * self.interval:
            self.recheck_at = None  # heard from since
        else:
            due = self.recheck_at if self.recheck_at is not None \
                else self.last_received + 2 * self.interval
            if now - due > self.slack:  # this end was not running: read first, then judge
                self.recheck_at = now + self.slack
            elif self.recheck_at is None or now >= self.recheck_at:
                # The limit, not the measured silence, so that the reason is always the same.
                raise ProtocolError(CloseCode.HEARTBEAT_TIMEOUT,
                                    f"nothing received for {2 * self.interval:g} s "
                                    f"(heartbeat {self.interval:g} s)")
        if now - self.last_sent >= self.interval:
            self.last_sent = now
            # one PING waiting on the socket is enough: the peer reads it first
            return None if self.pinging else encode(Ping(now))
        return None


class _Base:
    def __init__(self, heartbeat: float, max_message_bytes: int, now: float) -> None:
        self.state = State.HANDSHAKE
        self.heartbeat = _Heartbeat(heartbeat, now)
        self.max_message_bytes = max_message_bytes
        self.rtt: float | None = None
        # why this end closed (the heartbeat, a broken rule): a message that still arrives
        # is answered with that reason, not a new one that hides it in the logs
        self.closed_for: ProtocolError | None = None

    def next_deadline(self) -> float:
        return self.heartbeat.deadline()

    def on_timer(self, now: float) -> bytes | None:
        """A PING to send when due; raises ProtocolError when the peer is silent too long."""
        if self.state is State.CLOSED:
            return None
        try:
            return self.heartbeat.check(now)
        except ProtocolError as exc:
            self.state = State.CLOSED
            self.closed_for = exc
            raise

    def reading_paused(self, now: float) -> None:
        """The I/O layer stops reading for a while, for its own reasons (backpressure: its
        queue is full).  Until ``reading_resumed`` the peer's silence is not counted."""
        self.heartbeat.pause(now)

    def reading_resumed(self, now: float) -> None:
        """Reading again: the silence counts on from where it stood at ``reading_paused``."""
        self.heartbeat.resume(now)

    def ping_started(self) -> None:
        """The I/O layer starts sending the PING ``on_timer`` returned.  Until ``ping_done``
        ``on_timer`` hands out no other PING, and still raises when the peer is silent too
        long: the I/O layer keeps calling it at ``next_deadline`` while the send waits
        (a peer that reads nothing leaves it waiting as long as it is paused)."""
        self.heartbeat.pinging = True

    def ping_done(self) -> None:
        """The PING's send has returned (or failed)."""
        self.heartbeat.pinging = False

    def _sent(self, data: bytes, now: float) -> bytes:
        self.heartbeat.last_sent = now
        return data

    def _decode(self, data: bytes | str, now: float) -> tuple[Message, bytes | None]:
        """Decode, enforce size, handle PING/PONG.  Returns (message, reply or None)."""
        if self.state is State.CLOSED:
            if self.closed_for is not None:
                raise ProtocolError(self.closed_for.code, self.closed_for.reason)
            raise ProtocolError(CloseCode.PROTOCOL_ERROR, "message after close")
        if len(data) > self.max_message_bytes:
            self.state = State.CLOSED
            raise ProtocolError(CloseCode.TOO_BIG,
                                f"message of {len(data)} bytes exceeds the limit of "
                                f"{self.max_message_bytes} bytes")
        self.heartbeat.last_received = now
        try:
            msg = decode(data)
        except ProtocolError:
            self.state = State.CLOSED
            raise
        if isinstance(msg, Ping):
            return msg, self._sent(encode(Pong(msg.t)), now)
        if isinstance(msg, Pong):
            self.rtt = max(0.0, now - msg.t)
        return msg, None

    def fail(self, reason: str, code: int = CloseCode.PROTOCOL_ERROR) -> ProtocolError:
        self.state = State.CLOSED
        self.closed_for = ProtocolError(code, reason)
        return self.closed_for


class GatewayConnection(_Base):
    """The gateway's end.  ``hello()`` first; ``receive`` yields Welcome, Ack, Reject,
    Refuse; ``data(seq, body)`` frames a data frame; ``lost(first_held)`` a LOST when frames
    the hub has not acknowledged were dropped (section 4).

    ``compression`` lists the body encodings to offer (docs/protocol.md section 5.1); when
    the hub accepts one, bodies of at least ``compression_min_bytes`` are sent compressed
    at ``compression_level`` -- each only if that makes it smaller."""

    def __init__(self, gateway_id: str, token: str, epoch: str, next_seq: int, *,
                 heartbeat: float = 5.0, max_message_bytes: int = 16 << 20,
                 now: float = 0.0, compression: tuple[str, ...] = (),
                 compression_level: int = 1, compression_min_bytes: int = 1024,
                 versions: tuple[int, ...] = SUPPORTED_VERSIONS, resume: bool = False,
                 dropped: Iterable[tuple[int, int]] | None = None) -> None:
        super().__init__(heartbeat, max_message_bytes, now)
        unknown = [c for c in compression if c not in ENCODINGS]
        if unknown:
            raise ValueError(f"unknown body encoding(s) {unknown}; known: {list(ENCODINGS)}")
        if not versions or not set(versions) <= set(SUPPORTED_VERSIONS):
            raise ValueError(f"versions {list(versions)}: this implementation speaks "
                             f"{list(SUPPORTED_VERSIONS)}")
        self._hello = Hello(gateway_id, token, epoch, next_seq, tuple(versions), heartbeat,
                            compression, resume,
                            None if dropped is None else _below(dropped, next_seq))
        self.welcome: Welcome | None = None
        #: what the hub has (WELCOME's applied set, what is below HELLO's next_seq, the
        #: ACKs since, what a LOST declared): kept only where the hub takes LOST
        self.hub_has = IntervalSet()
        self._lost_below = 0  # the last LOST's next_seq: no DATA below it may follow
        # the highest seq the hub may know of: below HELLO's next_seq, in WELCOME's applied
        # set, sent as DATA, declared by a LOST.  An ACK or a REJECT past it names a frame
        # the hub never had: applied, it would drop frames this gateway has not sent yet
        self._told = next_seq - 1
        self.compression_level = compression_level
        self.compression_min_bytes = compression_min_bytes
        self.body_encoding: str | None = None  # agreed in WELCOME

    @property
    def version(self) -> int | None:
        """The protocol version the hub chose (WELCOME), None before it."""
        return self.welcome.version if self.welcome is not None else None

    def hello(self, now: float) -> bytes:
        return self._sent(encode(self._hello), now)

    def data(self, seq: int, body: bytes, now: float, sent_at: float | None = None) -> bytes:
        """DATA ``seq`` with ``body``: ``now`` the clock the heartbeat runs on, ``sent_at``
        the date the frame carries (section 5: seconds since the Unix epoch, the wall clock
        when not given -- not ``now``, which is a monotonic clock, not a date)."""
        if sent_at is None:
            sent_at = time.time()
        if self.state is not State.OPEN:
            raise RuntimeError(f"cannot send data in state {self.state.value}")
        if seq < self._lost_below:
            raise RuntimeError(f"frame {seq} is below the LOST sent ({self._lost_below})")
        self._told = max(self._told, seq)
        if self.body_encoding == ZLIB and len(body) >= self.compression_min_bytes:
            packed = compress_body(body, self.compression_level)
            if len(packed) < len(body):
                return self._sent(encode(Data(seq, sent_at, packed, ZLIB)), now)
        return self._sent(encode(Data(seq, sent_at, body)), now)

    def lost(self, first_held: int, now: float,
             dropped: Iterable[tuple[int, int]] | None = None) -> bytes | None:
        """A LOST to send (section 4) when frames below ``first_held`` -- the lowest
        sequence number this gateway still holds or will still send -- include some the hub
        has not acknowledged: its queue dropped them while connected.  None when there is
        nothing new to declare, or the hub does not take LOST (a hub that lacks them then
        learns it from the next HELLO).  After it, no DATA below ``first_held`` is sent.
        ``dropped``: the seqs this gateway dropped unacknowledged, told to a hub that
        takes them (the rest of what the hub lacks below ``first_held`` it acknowledged)."""
        if not self.lost_pending(first_held):
            return None
        self.hub_has.add_range(1, first_held - 1)
        self._lost_below = first_held
        self._told = max(self._told, first_held - 1)
        assert self.welcome is not None
        told = (_below(dropped, first_held) if dropped is not None and self.welcome.dropped
                else None)
        return self._sent(encode(Lost(first_held, told)), now)

    def lost_pending(self, first_held: int) -> bool:
        """Whether ``lost(first_held)`` would send a LOST now: a sender about to wait checks
        it, so a drop made while it was busy is told at once, not at the next ACK."""
        if self.state is not State.OPEN or self.welcome is None or not self.welcome.lost:
            return False
        return first_held > 1 and bool(self.hub_has.missing(1, first_held - 1))

    def positions(self, seq: int, positions: dict[str, Any], now: float) -> bytes | None:
        """A POSITIONS (section 4.1): where the sources were as of frame
        ``seq``, sent after DATA ``seq``; None when the hub does not take them."""
        if self.state is not State.OPEN or self.welcome is None or not self.welcome.positions:
            return None
        if seq > self._told:
            raise RuntimeError(f"positions of frame {seq}, which was not sent")
        return self._sent(encode(Positions(seq, positions)), now)

    def receive(self, data: bytes | str, now: float) -> tuple[list[Any], bytes | None]:
        """Returns (events, reply-to-send or None)."""
        msg, reply = self._decode(data, now)
        if isinstance(msg, (Ping, Pong)):
            return [], reply
        if self.state is State.HANDSHAKE:
            if isinstance(msg, Welcome):
                if msg.version not in self._hello.versions:
                    raise self.fail(f"hub chose version {msg.version}, which was not offered",
                                    CloseCode.UNSUPPORTED_VERSION)
                if msg.compression is not None and msg.compression not in self._hello.compression:
                    raise self.fail(f"hub chose body encoding {msg.compression!r}, which was "
                                    f"not offered")
                self.state = State.OPEN
                self.welcome = msg
                self._told = max([self._told, *(hi for _, hi in msg.applied)])
                if msg.lost:
                    self.hub_has = IntervalSet(msg.applied)
                    if self._hello.next_seq > 1:  # the hub holds these as applied or lost
                        self.hub_has.add_range(1, self._hello.next_seq - 1)
                self.body_encoding = msg.compression
                # the hub's heartbeat wins so both ends agree on the timeout
                self.heartbeat.interval = msg.heartbeat
                return [msg], None
            if isinstance(msg, Refuse):
                self.state = State.CLOSED
                return [msg], None
            raise self.fail(f"expected WELCOME or REFUSE, got {type(msg).__name__.upper()}")
        if isinstance(msg, Ack):
            top = max([msg.watermark, *(hi for _, hi in msg.ranges)])
            if top > self._told:
                raise self.fail(f"ACK of frame {top}, which this gateway has not sent (the "
                                f"highest the hub may know of is {self._told})")
            if self.welcome is not None and self.welcome.lost:
                if msg.watermark:
                    self.hub_has.add_range(1, msg.watermark)
                for lo, hi in msg.ranges:
                    self.hub_has.add_range(lo, hi)
            return [msg], None
        if isinstance(msg, Reject):
            if msg.seq > self._told:
                raise self.fail(f"REJECT of frame {msg.seq}, which this gateway has not sent "
                                f"(the highest the hub may know of is {self._told})")
            return [msg], None
        raise self.fail(f"unexpected {type(msg).__name__.upper()} from hub")


class HubConnection(_Base):
    """The hub's end of one gateway connection.

    ``receive`` yields ``Hello`` (the hub then calls ``accept`` or ``refuse``), ``Data``
    for frames not yet applied, ``Duplicate`` for frames already applied (the hub
    counts them; ``receive`` has already produced the ACK reply), and ``Declared`` for a
    LOST (the hub records the frames lost, then calls ``lost_recorded`` for the ACK), and
    ``Positions`` for a POSITIONS (the hub keeps them once every frame up to its seq is
    applied: docs/protocol.md section 4.1).
    After applying a frame the hub calls ``applied(seq)`` for the ACK, or
    ``rejected(seq, reason)``.
    """

    def __init__(self, *, heartbeat: float = 5.0, max_message_bytes: int = 16 << 20,
                 max_records: int = 100_000, max_holes: int = 8, now: float = 0.0,
                 compression: tuple[str, ...] = (),
                 versions: tuple[int, ...] = SUPPORTED_VERSIONS) -> None:
        super().__init__(heartbeat, max_message_bytes, now)
        self.versions = versions  # what this hub speaks; WELCOME picks the highest in common
        self.version: int | None = None  # chosen in accept()
        self.compression = compression  # body encodings accepted, if a gateway offers them
        self.body_encoding: str | None = None  # agreed in WELCOME
        self.max_records = max_records
        self.max_holes = max_holes
        self.hello_msg: Hello | None = None
        self.applied_set = IntervalSet()
        self._seen = IntervalSet()  # applied, or received and being applied
        # applied before this connection (WELCOME): the rest of _seen came on this one.
        # Both are bounded by holes, never by frames: nothing is kept per frame received
        self._welcomed = IntervalSet()
        self.declared_lost = 0
        #: of ``declared_lost``, the frames the HELLO's ``dropped`` names (the gateway
        #: dropped them unacknowledged; the rest this hub acknowledged and has lost since);
        #: None: the HELLO does not say
        self.declared_dropped: int | None = None
        #: WELCOME says the hub takes LOST (section 4); a hub without it would close 4004
        self.takes_lost = True
        #: ... and a LOST's ``dropped`` ranges
        self.takes_dropped = True
        #: WELCOME says the hub takes POSITIONS (section 4.1)
        self.takes_positions = True
        self._lost_below = 0  # the highest LOST's next_seq: no DATA below it may follow

    def receive(self, data: bytes | str, now: float) -> tuple[list[Any], bytes | None]:
        msg, reply = self._decode(data, now)
        if self.state is State.HANDSHAKE:
            # HELLO must come first: anything else, a PING included, is out of state (4004).
            if not isinstance(msg, Hello) or self.hello_msg is not None:
                raise self.fail(f"expected HELLO, got {type(msg).__name__.upper()}")
            self.hello_msg = msg
            return [msg], None
        if isinstance(msg, (Ping, Pong)):
            return [], reply
        if isinstance(msg, Data):
            if msg.encoding is not None and msg.encoding != self.body_encoding:
                raise self.fail(f"DATA body encoding {msg.encoding!r} was not agreed in WELCOME")
            # Checked before the applied set: a frame received *on this connection* (applied
            # or not yet) and sent again is a gateway fault, not a duplicate left over from
            # an earlier connection.
            if msg.seq < self._lost_below and msg.seq not in self._welcomed:
                raise self.fail(f"frame {msg.seq} sent after a LOST said that frames below "
                                f"{self._lost_below} are no longer held")
            if msg.seq in self._seen and msg.seq not in self._welcomed:
                raise self.fail(f"frame {msg.seq} sent twice on one connection")
            if msg.seq in self.applied_set:
                return [Duplicate(msg)], self.ack(now)
            trial = IntervalSet(self._seen.ranges())
            trial.add(msg.seq)
            if trial.holes > self.max_holes:
                raise self.fail(
                    f"sequence gap: frame {msg.seq} leaves {trial.holes} holes in "
                    f"{trial.ranges()[:4]}, limit is {self.max_holes}")
            self._seen = trial
            if msg.encoding is not None:
                try:
                    # bounded like an uncompressed message: a frame fits in max_message_bytes
                    body = decompress_body(msg.body, self.max_message_bytes)
                except ProtocolError:
                    self.state = State.CLOSED
                    raise
                msg = Data(msg.seq, msg.sent_at, body)
            return [msg], None
        if isinstance(msg, Lost) and self.takes_lost:
            return [self._declared(msg.next_seq, msg.dropped)], None
        if isinstance(msg, Positions) and self.takes_positions:
            if msg.seq not in self._seen:
                raise self.fail(f"POSITIONS of frame {msg.seq}, which this hub has neither "
                                f"applied nor received on this connection")
            return [msg], None
        raise self.fail(f"unexpected {type(msg).__name__.upper()} from gateway")

    def _declared(self, next_seq: int,
                  dropped: tuple[tuple[int, int], ...] | None = None) -> Declared:
        """LOST ``next_seq``: the frames below it neither applied nor received on this
        connection will never come.  They count as seen at once (no hole waits for them);
        the hub records them as lost, in order after the frames received before, and
        then calls ``lost_recorded`` for the ACK."""
        gone = self._seen.missing(1, next_seq - 1) if next_seq > 1 else []
        if next_seq > 1:
            self._seen.add_range(1, next_seq - 1)
        self._lost_below = max(self._lost_below, next_seq)
        return Declared(next_seq, sum(hi - lo + 1 for lo, hi in gone),
                        None if dropped is None else _overlap(gone, dropped))

    def accept(self, applied: IntervalSet, now: float,
               resume: dict[str, Any] | None = None) -> bytes:
        """Welcome the gateway; ``applied`` is what the hub already has for its epoch.
        Frames below the gateway's ``next_seq`` that the hub lacks are ones the gateway
        no longer holds: they are recorded as lost (``declared_lost``), not waited for.
        ``resume``: the source positions the hub holds for the gateway, sent when its
        HELLO asked for them (an empty map when it holds none)."""
        assert self.hello_msg is not None
        below = self.hello_msg.next_seq - 1
        gone = applied.missing(1, below) if below >= 1 else []
        missing = IntervalSet(applied.ranges())
        missing.add_range(1, below)
        self.declared_lost = sum(hi - lo + 1 for lo, hi in gone)
        dropped = self.hello_msg.dropped
        self.declared_dropped = None if dropped is None else _overlap(gone, dropped)
        self.applied_set = missing
        self._seen = IntervalSet(missing.ranges())
        self._welcomed = IntervalSet(missing.ranges())
        self.state = State.OPEN
        # the gateway's order of preference, among what this hub accepts
        self.body_encoding = next(
            (c for c in self.hello_msg.compression if c in self.compression), None)
        common = set(self.hello_msg.versions) & set(self.versions)
        assert common, "the hub refuses (4002) a HELLO without a version in common"
        self.version = max(common)
        asked = self.hello_msg.resume and self.takes_positions
        welcome = Welcome(self.version, self.applied_set.ranges(), self.heartbeat.interval,
                          self.max_message_bytes, self.max_records, self.body_encoding,
                          self.takes_lost, self.takes_positions,
                          (resume or {}) if asked else None,
                          self.takes_lost and self.takes_dropped)
        return self._sent(encode(welcome), now)

    def refuse(self, code: int, reason: str, now: float) -> bytes:
        self.state = State.CLOSED
        return self._sent(encode(Refuse(code, reason)), now)

    def applied(self, seq: int, now: float) -> bytes:
        self.applied_set.add(seq)
        return self.ack(now)

    def rejected(self, seq: int, reason: str, now: float) -> bytes:
        """A frame the hub will never accept: counted as done so it does not block."""
        self.applied_set.add(seq)
        return self._sent(encode(Reject(seq, reason)), now)

    def lost_recorded(self, declared: Declared, now: float) -> bytes:
        """The frames a LOST declared are recorded (every frame received before it is
        committed): they count as applied, and the ACK says so."""
        if declared.next_seq > 1:
            self.applied_set.add_range(1, declared.next_seq - 1)
        return self.ack(now)

    def ack(self, now: float) -> bytes:
        s = self.applied_set
        return self._sent(encode(Ack(s.watermark(), s.above_watermark())), now)


@dataclasses.dataclass(frozen=True)
class Declared:
    """A LOST from the gateway: ``count`` frames below ``next_seq`` (neither applied nor
    received on this connection) will never come; the hub records them as lost."""

    next_seq: int
    count: int
    #: of ``count``, the frames the LOST's ``dropped`` names (the rest this hub
    #: acknowledged and has lost since); None: the LOST does not say
    dropped: int | None = None


def _below(ranges: Iterable[tuple[int, int]], next_seq: int) -> tuple[tuple[int, int], ...]:
    """``ranges`` cut to the seqs below ``next_seq``, at most ``MAX_DROPPED_RANGES`` of
    them (the lowest merged, as the stores keep them): what a HELLO or a LOST tells."""
    named = IntervalSet(ranges)
    named.discard_from(next_seq)
    named.cap(MAX_DROPPED_RANGES)
    return tuple(named.ranges())


def _overlap(gone: list[tuple[int, int]], dropped: Iterable[tuple[int, int]]) -> int:
    """How many of the seqs in ``gone`` (sorted disjoint ranges) ``dropped`` names."""
    named = IntervalSet(dropped)
    return sum(hi - lo + 1 - sum(b - a + 1 for a, b in named.missing(lo, hi))
               for lo, hi in gone)


class Duplicate:
    """A frame applied already.  ``data`` is the DATA as received (its body still
    compressed if it was): the hub checks its record ids, which should be the ones
    applied under that seq (docs/protocol.md section 3)."""

    __slots__ = ("data",)

    def __init__(self, data: Data) -> None:
        self.data = data

    @property
    def seq(self) -> int:
        return self.data.seq

    def __repr__(self) -> str:
        return f"Duplicate(seq={self.seq})"
