"""The live subscriber protocol on ``/ws/live``, sans-IO.

Messages in (a client's subscribe/unsubscribe/ack/ping), frames out; time is passed in.
The Trio layer (``edgegw.hub.fanout``) owns the sockets, the ticker and one sender task per
client; everything that decides *what* a client gets lives here, so it is tested without a
clock or a socket.  The wire format is specified in ``docs/live-protocol.md``.

The ideas, taken from the real-time hubs that work (Centrifugo, Phoenix, Mercure):

* **Channels** are live-state topics (``edgegw.hub.topics``).  Each carries the hub run's
  *epoch* and an *offset* that grows by one per published delta, and keeps a bounded history
  of its recent deltas.  A client that resubscribes with ``(epoch, offset)`` gets exactly the
  deltas it missed, or a fresh snapshot marked ``resync`` with the reason -- never a silent gap.
* **Coalescing**: deltas are not sent as they come but collected and sent once per UI tick
  (default 20/s); consecutive deltas of one channel are composed into one where their
  shape allows it (``compose_deltas``).
* **Encode once, write many**: one tick's item for a channel is encoded once per encoding and
  shared by every subscriber that is in step; a whole frame whose items are all shared is
  built (and WebSocket-framed, through ``prepare``) once for every client that gets the same
  items.  1,000 dashboards on the same wafer cost one encode per tick, not 1,000.
* **Bounded queue per client**: a client whose queue of unsent frames is full is closed with
  ``CLOSE_TOO_SLOW`` (4008) when it follows event channels (alerts: every event matters), or,
  when it only follows state channels, its queued updates are dropped and it gets the latest
  state (snapshots marked ``resync: "lagging"``) once it has drained.  Nothing a slow client
  does delays the tick or any other client.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import math
from collections import deque
from collections.abc import Callable, Iterable
from typing import Annotated, Any, Protocol

import cbor2

from ..config import Range
from ..metrics import Metrics, report_internal_error

SUBPROTOCOL_CBOR = "edgegw.live.v1.cbor"
SUBPROTOCOL_JSON = "edgegw.live.v1.json"
SUBPROTOCOLS = (SUBPROTOCOL_CBOR, SUBPROTOCOL_JSON)

log = logging.getLogger("edgegw.hub.live")

CLOSE_TOO_SLOW = 4008
CLOSE_TOO_SLOW_REASON = "too slow"
# the client's token expired: sign in again (a fresh token) and reconnect
CLOSE_TOKEN_EXPIRED = 4401

# A client's subscribe arguments are bounded so one request cannot make the hub match an
# unbounded number of patterns against every topic.
MAX_PATTERN_LENGTH = 256


class ClientScope(Protocol):
    """What one client may see and do (``edgegw.auth.access.LiveScope``): topics outside
    it are never attached to the client; acknowledgements need ``may_ack`` and are recorded
    in ``user``'s name (None: no signed-in user, the message's ``by`` is taken)."""

    user: str | None
    may_ack: bool

    def allows_topic(self, topic: str) -> bool: ...

    def may_ack_alert(self, alert_id: str) -> bool: ...


class StateSource(Protocol):
    """What the fan-out needs from the live state (``edgegw.hub.state.LiveState``)."""

    def snapshot(self, topic: str) -> dict[str, Any] | None: ...

    def topics(self) -> list[str]: ...


@dataclasses.dataclass(frozen=True)
class LiveConfig:
    """How the hub serves ``/ws/live`` (the hub config's ``[live]`` section)."""

    # frames of updates per second per client, at most
    ui_rate: Annotated[float, Range(0.1, 1000)] = 20.0
    # unsent frames a client may have queued before it is "too slow"
    queue_frames: Annotated[int, Range(2, 1_000_000)] = 64
    # deltas kept per channel for resume ... and at most this many list rows (dies, points)
    history: Annotated[int, Range(0, 1_000_000)] = 1024
    history_rows: Annotated[int, Range(0, 100_000_000)] = 50_000
    # Snapshots built per tick, in list rows (a wafer map: one per die); more wait for the
    # next tick.  At least one is always built.
    snapshot_rows_per_tick: Annotated[int, Range(1, 100_000_000)] = 5_000
    max_patterns: Annotated[int, Range(1, 100_000)] = 256  # subscriptions per client
    # a client whose writes make no progress this long is closed; a closed slow client's
    # write in progress may finish this long
    stall_timeout: Annotated[float, Range(0.1, 3600)] = 30.0
    close_grace: Annotated[float, Range(0, 3600)] = 5.0
    event_prefixes: tuple[str, ...] = ("alert/",)  # channels where every event matters

    def validate(self) -> list[tuple[str, str]]:
        errors: list[tuple[str, str]] = []
        if not (0 < self.ui_rate <= 1000):
            errors.append(("ui_rate", "must be > 0 and <= 1000 frames per second"))
        if self.queue_frames < 2:
            errors.append(("queue_frames", "must be >= 2"))
        if self.history < 0:
            errors.append(("history", "must be >= 0"))
        if self.history_rows < 0:
            errors.append(("history_rows", "must be >= 0"))
        if self.snapshot_rows_per_tick < 1:
            errors.append(("snapshot_rows_per_tick", "must be >= 1"))
        if self.max_patterns < 1:
            errors.append(("max_patterns", "must be >= 1"))
        if self.stall_timeout <= 0:
            errors.append(("stall_timeout", "must be > 0"))
        if self.close_grace < 0:
            errors.append(("close_grace", "must be >= 0"))
        return errors


# --------------------------------------------------------------------------- topics


def pattern_error(pattern: object) -> str | None:
    """Why ``pattern`` is not a valid subscription pattern, or None when it is.

    MQTT rules: ``+`` stands for exactly one level and must be a whole level; ``#`` stands
    for the rest (zero or more levels) and must be the whole last level."""
    if not isinstance(pattern, str):
        return "a topic pattern must be a string"
    if not pattern:
        return "a topic pattern must not be empty"
    if len(pattern) > MAX_PATTERN_LENGTH:
        return f"a topic pattern must be at most {MAX_PATTERN_LENGTH} characters"
    levels = pattern.split("/")
    for i, level in enumerate(levels):
        if "#" in level and (level != "#" or i != len(levels) - 1):
            return f"'#' must be the whole last level: {pattern!r}"
        if "+" in level and level != "+":
            return f"'+' must be a whole level: {pattern!r}"
    return None


def topic_matches(pattern: str, topic: str) -> bool:
    """Whether ``topic`` (no wildcards) matches the subscription ``pattern``."""
    if "+" not in pattern and "#" not in pattern:
        return pattern == topic
    p_levels = pattern.split("/")
    t_levels = topic.split("/")
    for i, p in enumerate(p_levels):
        if p == "#":
            return True  # '#' also matches the parent level itself: 'a/#' matches 'a'
        if i >= len(t_levels):
            return False
        if p != "+" and p != t_levels[i]:
            return False
    return len(p_levels) == len(t_levels)


# --------------------------------------------------------------------------- deltas


# How the live state's deltas combine (``docs/live-topics.md``): a delta's keys replace the
# same keys of the topic's state, except list keys that *add* to it -- wafer ``dies`` (rows
# upserted by X/Y, in order) and sensor ``append`` (history points) -- and ``event`` keys,
# of which each one is an event of its own (a gateway's connect/disconnect).
CONCAT_KEYS = frozenset({"dies", "append"})
EVENT_KEYS = frozenset({"event"})


def compose_deltas(
    first: dict[str, Any],
    second: dict[str, Any],
    concat_keys: frozenset[str] = CONCAT_KEYS,
    event_keys: frozenset[str] = EVENT_KEYS,
) -> dict[str, Any] | None:
    """One delta equal to applying ``first`` then ``second``, or None when there is none
    (both carry an event).  Neither argument is modified."""
    merged = coalesce([first, second], concat_keys, event_keys)
    return merged[0] if len(merged) == 1 else None


def coalesce(
    deltas: Iterable[dict[str, Any]],
    concat_keys: frozenset[str] = CONCAT_KEYS,
    event_keys: frozenset[str] = EVENT_KEYS,
) -> list[dict[str, Any]]:
    """Consecutive deltas of one channel composed into as few as say exactly the same.

    Linear in the rows: a list is copied once, when a second delta first adds to it, and
    extended in place after that (a tick may compose hundreds of wafer deltas during a
    replay).  The input deltas are never modified."""
    out: list[dict[str, Any]] = []
    current: dict[str, Any] | None = None
    owned: set[str] = set()  # concat keys whose list in ``current`` is our own copy
    for delta in deltas:
        if current is not None and not (event_keys & delta.keys() & current.keys()):
            for key, value in delta.items():
                before = current.get(key)
                if key in concat_keys and isinstance(value, list) and isinstance(before, list):
                    if key not in owned:
                        current[key] = before = list(before)
                        owned.add(key)
                    before.extend(value)
                else:
                    current[key] = value
                    owned.discard(key)
            continue
        if current is not None:
            out.append(current)
        current = dict(delta)
        owned = set()
    if current is not None:
        out.append(current)
    return out


# --------------------------------------------------------------------------- encoding


def _cbor_array_head(n: int) -> bytes:
    if n < 24:
        return bytes((0x80 + n,))
    if n < 0x100:
        return bytes((0x98, n))
    if n < 0x10000:
        return b"\x99" + n.to_bytes(2, "big")
    return b"\x9a" + n.to_bytes(4, "big")


def _json_default(value: Any) -> Any:
    if isinstance(value, (bytes, bytearray)):
        return value.hex()
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    return str(value)


def _finite(value: Any) -> Any:
    """NaN and infinities replaced by null: they are not JSON and a browser rejects them."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _json_keys(value: Any) -> Any:
    """Map keys JSON cannot have (a CBOR request may carry any, e.g. in its ``id``) as text."""
    if isinstance(value, dict):
        return {k if k is None or isinstance(k, (str, int, float, bool)) else str(k):
                _json_keys(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_keys(v) for v in value]
    return value


def encode_json(message: Any) -> str:
    try:
        return json.dumps(message, separators=(",", ":"), default=_json_default, allow_nan=False)
    except ValueError:
        return json.dumps(_finite(message), separators=(",", ":"), default=_json_default)
    except TypeError:
        return encode_json(_json_keys(message))


class Encoding:
    """CBOR (binary frames) or JSON (text frames) -- one per client, chosen by subprotocol."""

    def __init__(self, name: str) -> None:
        if name not in ("cbor", "json"):
            raise ValueError(f"unknown encoding {name!r}")
        self.name = name

    def encode(self, message: Any) -> bytes | str:
        return cbor2.dumps(message) if self.name == "cbor" else encode_json(message)

    def batch(self, ts: float, items: list[bytes | str]) -> bytes | str:
        """A ``batch`` message assembled from already-encoded items (no re-encoding)."""
        if self.name == "cbor":
            head = (
                b"\xa3" + cbor2.dumps("type") + cbor2.dumps("batch") + cbor2.dumps("ts")
                + cbor2.dumps(ts) + cbor2.dumps("items") + _cbor_array_head(len(items))
            )
            return head + b"".join(items)  # type: ignore[arg-type]
        return '{"type":"batch","ts":' + json.dumps(ts) + ',"items":[' + ",".join(items) + "]}"  # type: ignore[arg-type]

    def __repr__(self) -> str:
        return f"Encoding({self.name!r})"


CBOR = Encoding("cbor")
JSON = Encoding("json")


def encoding_for_subprotocol(subprotocol: str | None) -> Encoding:
    return JSON if subprotocol == SUBPROTOCOL_JSON else CBOR


def decode_client_message(data: bytes | str) -> Any:
    """Text frames are JSON, binary frames CBOR, whatever the subprotocol."""
    if isinstance(data, str):
        return json.loads(data)
    return cbor2.loads(data)


# --------------------------------------------------------------------------- channels


def _rows(delta: dict[str, Any]) -> int:
    """A delta's weight in the history: 1 plus its list rows (dies, sensor points)."""
    return 1 + sum(len(v) for v in delta.values() if isinstance(v, list))


class Channel:
    """One topic: its offset, a bounded history of deltas, and the deltas of this tick."""

    __slots__ = ("event_like", "history", "history_rows", "max_history", "max_rows", "offset",
                 "pending", "pending_from", "rows", "subscribers", "topic", "ts_max", "ts_min")

    def __init__(self, topic: str, history: int, history_rows: int, event_like: bool) -> None:
        self.topic = topic
        self.offset = 0
        self.history: deque[tuple[dict[str, Any], int]] = deque()  # (delta, rows) up to offset
        self.rows = 0
        self.max_history = history
        self.max_rows = history_rows
        self.pending: list[dict[str, Any]] = []
        self.pending_from = 0
        self.ts_min: float | None = None
        self.ts_max: float | None = None
        self.subscribers: set[Client] = set()
        self.event_like = event_like

    def remember(self, delta: dict[str, Any]) -> None:
        rows = _rows(delta)
        self.history.append((delta, rows))
        self.rows += rows
        while self.history and (len(self.history) > self.max_history
                                or self.rows > self.max_rows):
            self.rows -= self.history.popleft()[1]

    def deltas_after(self, offset: int) -> list[dict[str, Any]] | None:
        """The deltas after ``offset`` up to now, or None when history no longer has them."""
        missing = self.offset - offset
        if missing < 0 or missing > len(self.history):
            return None
        if missing == 0:
            return []
        return [d for d, _ in itertools.islice(self.history, len(self.history) - missing, None)]


class Item:
    """One batch item, encoded lazily once per encoding and shared by every client."""

    __slots__ = ("_encoded", "key", "message")

    def __init__(self, key: tuple[Any, ...], message: dict[str, Any]) -> None:
        self.key = key
        self.message = message
        self._encoded: dict[str, bytes | str] = {}

    def encoded(self, encoding: Encoding) -> bytes | str:
        data = self._encoded.get(encoding.name)
        if data is None:
            data = self._encoded[encoding.name] = encoding.encode(self.message)
        return data


@dataclasses.dataclass(eq=False)
class Client:
    """One ``/ws/live`` connection as the protocol sees it."""

    id: int
    encoding: Encoding
    peer: str = ""
    scope: ClientScope | None = None  # None: everything (a hub without sign-in)
    patterns: set[str] = dataclasses.field(default_factory=set)
    # topic -> offset this client has been sent up to; None: it needs a snapshot next tick
    positions: dict[str, int | None] = dataclasses.field(default_factory=dict)
    resync: dict[str, str] = dataclasses.field(default_factory=dict)  # topic -> reason
    todo: set[str] = dataclasses.field(default_factory=set)  # topics to look at next tick
    # Unsent frames: (prepared frame, is_update).  Control replies are never dropped.
    queue: deque[tuple[Any, bool]] = dataclasses.field(default_factory=deque)
    lagging: bool = False  # its updates were dropped; it waits to drain, then gets snapshots
    in_flight: bool = False  # its sender is writing a frame
    busy_since: float | None = None  # since when it has had something unwritten
    closed: bool = False
    close_code: int | None = None
    close_reason: str = ""
    frames_sent: int = 0
    frames_queued: int = 0
    updates_dropped: int = 0  # update frames dropped while lagging
    items_sent: int = 0

    @property
    def queue_depth(self) -> int:
        return len(self.queue)

    def follows_events(self, channels: dict[str, Channel]) -> bool:
        """Whether it is subscribed to a channel where every event matters (alerts)."""
        return any(channels[t].event_like for t in self.positions if t in channels)


class ProtocolError(Exception):
    """A client message the hub cannot act on; answered with an ``error`` message."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


AckHandler = Callable[[str, str], None]


class LiveHub:
    """The fan-out core: channels, clients, ticks.  No I/O, no clock.

    ``prepare`` turns an encoded message into what the Trio layer writes (a ready-made
    WebSocket frame, so the framing too is done once per shared frame); identity by default.
    ``on_ack(alert_id, user)`` is called for an ``ack`` message and raises ``KeyError`` or
    ``ValueError`` when the alert cannot be acknowledged.
    """

    def __init__(
        self,
        source: StateSource,
        config: LiveConfig | None = None,
        *,
        epoch: str,
        prepare: Callable[[bytes | str], Any] = lambda data: data,
        on_ack: AckHandler | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.source = source
        self.config = config or LiveConfig()
        self.epoch = epoch
        self.prepare = prepare
        self.on_ack = on_ack
        self.metrics = metrics or Metrics()
        self.channels: dict[str, Channel] = {}
        self.clients: dict[int, Client] = {}
        self._patterns: dict[str, set[Client]] = {}  # pattern -> clients subscribed with it
        self._dirty: set[Channel] = set()
        self._attention: set[Client] = set()  # clients with todo topics outside dirty channels
        self._ids = itertools.count(1)
        # Offsets of channels dropped by ``sweep``: a topic that comes back continues past
        # them, so an old offset can never name a different delta in the same epoch.
        self._tombstones: dict[str, int] = {}
        self._ticks = 0
        self._snapshot_budget = self.config.snapshot_rows_per_tick
        self._m_published = self.metrics.counter("live_deltas_published_total",
                                                 "deltas published by the live state")
        self._m_frames = self.metrics.counter("live_frames_total",
                                              "batch frames queued to /ws/live clients")
        self._m_encodes = self.metrics.counter("live_encodes_total",
                                               "items and frames encoded (shared ones once)")
        self._m_bad = self.metrics.counter("live_bad_messages_total",
                                           "client messages rejected, by reason")
        self._m_slow = self.metrics.counter("live_slow_clients_total",
                                            "clients closed or conflated for being too slow")
        self._m_expired = self.metrics.counter("live_token_expired_total",
                                               "clients closed (4401) when their token expired")
        self._m_resync = self.metrics.counter("live_resyncs_total",
                                              "snapshots sent because deltas were not recoverable")
        self.metrics.add_collector(self._collect)
        self._g_clients = self.metrics.gauge("live_clients", "connected /ws/live clients")
        self._g_queue = self.metrics.gauge("live_queue_depth_max",
                                           "deepest /ws/live client queue, in frames")

    # ----------------------------------------------------------------- publishing

    def publish(self, topic: str, delta: dict[str, Any], ts: float | None = None) -> None:
        """Called by the live state for every change; ``ts`` is the record's creation time.
        Cheap on purpose: the work is done once per tick, not once per delta."""
        channel = self.channels.get(topic)
        if channel is None:
            channel = self._create_channel(topic)
        if not channel.pending:
            channel.pending_from = channel.offset
            self._dirty.add(channel)
        channel.offset += 1
        channel.pending.append(delta)
        channel.remember(delta)
        if ts is not None:
            if channel.ts_min is None or ts < channel.ts_min:
                channel.ts_min = ts
            if channel.ts_max is None or ts > channel.ts_max:
                channel.ts_max = ts
        self._m_published.inc()

    def _create_channel(self, topic: str) -> Channel:
        channel = Channel(topic, self.config.history, self.config.history_rows,
                          topic.startswith(self.config.event_prefixes))
        if topic in self._tombstones:
            # One offset is skipped: no history can lead from the old channel's offsets
            # into the new one (its state started afresh), so a resume there resyncs.
            channel.offset = self._tombstones.pop(topic) + 1
        self.channels[topic] = channel
        for pattern, clients in self._patterns.items():
            if topic_matches(pattern, topic):
                for client in clients:
                    self._attach(client, channel, None)
        return channel

    def _channel(self, topic: str) -> Channel:
        channel = self.channels.get(topic)
        return channel if channel is not None else self._create_channel(topic)

    # ----------------------------------------------------------------- clients

    def connect(self, encoding: Encoding, *, now: float, peer: str = "",
                scope: ClientScope | None = None) -> Client:
        client = Client(next(self._ids), encoding, peer, scope)
        self.clients[client.id] = client
        self._control(client, now, {
            "type": "hello", "epoch": self.epoch, "encoding": encoding.name,
            "ui_rate": self.config.ui_rate, "queue_frames": self.config.queue_frames,
            "history": self.config.history,
        })
        return client

    def disconnect(self, client: Client) -> None:
        client.closed = True
        self.clients.pop(client.id, None)
        self._attention.discard(client)
        for pattern in client.patterns:
            subs = self._patterns.get(pattern)
            if subs is not None:
                subs.discard(client)
                if not subs:
                    del self._patterns[pattern]
        for topic in client.positions:
            channel = self.channels.get(topic)
            if channel is not None:
                channel.subscribers.discard(client)
        client.queue.clear()

    def _attach(self, client: Client, channel: Channel, position: int | None) -> None:
        if channel.topic in client.positions:
            return
        if client.scope is not None and not client.scope.allows_topic(channel.topic):
            return  # outside its scope: as if the topic did not exist
        channel.subscribers.add(client)
        client.positions[channel.topic] = position
        client.todo.add(channel.topic)
        self._attention.add(client)

    def _control(self, client: Client, now: float, message: dict[str, Any]) -> None:
        if client.closed:
            return
        if len(client.queue) >= 2 * self.config.queue_frames:
            # Replies are never dropped, so a client that sends requests without reading
            # the answers would grow its queue without bound: it is too slow as well.
            self.close_slow(client, "too many unread replies")
            return
        try:
            encoded = client.encoding.encode(message)
        except (TypeError, ValueError, RecursionError):
            # The request's ``id`` cannot be repeated in this encoding (nested too deep
            # for JSON, say): the reply goes without it.
            encoded = client.encoding.encode({**message, "id": None})
        self._enqueue(client, now, self.prepare(encoded), update=False)

    def _enqueue(self, client: Client, now: float, frame: Any, *, update: bool) -> None:
        if client.busy_since is None:
            client.busy_since = now
        client.queue.append((frame, update))
        client.frames_queued += 1

    # ----------------------------------------------------------------- client messages

    def receive(self, client: Client, data: bytes | str, now: float) -> None:
        """Act on one message from ``client``; replies and errors go to its queue."""
        if client.closed:
            return  # being closed: whatever it asks now is moot
        request_id = None
        try:
            try:
                message = decode_client_message(data)
            except Exception as exc:
                raise ProtocolError("bad_message", f"not valid JSON/CBOR: {exc}") from None
            if not isinstance(message, dict):
                raise ProtocolError("bad_message", "a message must be a map/object")
            request_id = message.get("id")
            kind = message.get("type")
            if kind == "subscribe":
                self._subscribe(client, message, now)
            elif kind == "unsubscribe":
                self._unsubscribe(client, message, now)
            elif kind == "ack":
                self._ack(client, message, now)
            elif kind == "ping":
                self._control(client, now, {"type": "pong", "id": request_id})
            else:
                raise ProtocolError("unknown_type", f"unknown message type {kind!r}")
        except ProtocolError as exc:
            self._m_bad.inc(reason=exc.code)
            self._control(client, now, {"type": "error", "id": request_id, "code": exc.code,
                                   "message": exc.message})
        except Exception:
            # A failure boundary: a bug met while handling one request skips that request
            # (counted, logged, answered), never the connection or the hub.
            report_internal_error(self.metrics, "live_message", log,
                                  "handling a /ws/live request from client %d", client.id)
            self._control(client, now, {"type": "error", "id": None, "code": "internal_error",
                                        "message": "the hub failed to handle this request"})

    @staticmethod
    def _patterns_of(message: dict[str, Any]) -> list[str]:
        topics = message.get("topics")
        if not isinstance(topics, list) or not topics:
            raise ProtocolError("bad_topics", "'topics' must be a non-empty list of patterns")
        for pattern in topics:
            error = pattern_error(pattern)
            if error is not None:
                raise ProtocolError("bad_topics", error)
        return topics

    def _subscribe(self, client: Client, message: dict[str, Any], now: float) -> None:
        patterns = self._patterns_of(message)
        resume = message.get("resume") or {}
        if not isinstance(resume, dict):
            raise ProtocolError("bad_resume", "'resume' must map topic -> [epoch, offset]")
        positions: dict[str, tuple[Any, int]] = {}
        for topic, where in resume.items():
            if (not isinstance(topic, str) or not isinstance(where, list) or len(where) != 2
                    or not isinstance(where[1], int) or isinstance(where[1], bool)
                    or where[1] < 0):
                raise ProtocolError("bad_resume",
                                    f"resume entry for {topic!r} must be [epoch, offset >= 0]")
            positions[topic] = (where[0], where[1])
        new = [p for p in dict.fromkeys(patterns) if p not in client.patterns]
        if len(client.patterns) + len(new) > self.config.max_patterns:
            raise ProtocolError("too_many_topics",
                                f"at most {self.config.max_patterns} subscriptions per client")
        for pattern in new:
            client.patterns.add(pattern)
            self._patterns.setdefault(pattern, set()).add(client)
        # Topics the state knows (after a restart it may not have published them yet) and
        # topics that only have a channel so far.
        known = dict.fromkeys(self.channels)
        known.update(dict.fromkeys(self.source.topics()))
        for topic in known:
            if topic in client.positions or not any(topic_matches(p, topic) for p in new):
                continue
            channel = self._channel(topic)
            position: int | None = None
            resumed = positions.get(topic)
            if resumed is not None:
                epoch, offset = resumed
                if epoch != self.epoch:
                    client.resync[topic] = "epoch_changed"
                elif offset > channel.offset:
                    client.resync[topic] = "offset_ahead"
                else:
                    position = offset  # tick decides: exact deltas, or resync if truncated
            self._attach(client, channel, position)
        self._control(client, now, {"type": "subscribed", "id": message.get("id"),
                                    "topics": patterns, "epoch": self.epoch})

    def _unsubscribe(self, client: Client, message: dict[str, Any], now: float) -> None:
        patterns = self._patterns_of(message)
        for pattern in patterns:
            if pattern in client.patterns:
                client.patterns.discard(pattern)
                subs = self._patterns.get(pattern)
                if subs is not None:
                    subs.discard(client)
                    if not subs:
                        del self._patterns[pattern]
        for topic in list(client.positions):
            if not any(topic_matches(p, topic) for p in client.patterns):
                del client.positions[topic]
                client.todo.discard(topic)
                client.resync.pop(topic, None)
                channel = self.channels.get(topic)
                if channel is not None:
                    channel.subscribers.discard(client)
        self._control(client, now, {"type": "unsubscribed", "id": message.get("id"),
                               "topics": patterns})

    def _ack(self, client: Client, message: dict[str, Any], now: float) -> None:
        alert = message.get("alert")
        scope = client.scope
        # a signed-in client acknowledges in its own name: 'by' is ignored then
        user = (scope.user if scope is not None and scope.user else None) or (
            message.get("by") or client.peer or f"client-{client.id}")
        if not isinstance(alert, (str, int)) or isinstance(alert, bool):
            raise ProtocolError("bad_ack", "'alert' must name the alert to acknowledge")
        if not isinstance(user, str):
            raise ProtocolError("bad_ack", "'by' must be a string")
        if scope is not None and not scope.may_ack:
            raise ProtocolError("forbidden", "acknowledging alerts needs the operator role")
        if scope is not None and not scope.may_ack_alert(str(alert)):
            raise ProtocolError("ack_failed", f"unknown alert {str(alert)!r}")
        if self.on_ack is None:
            raise ProtocolError("ack_unavailable", "this hub does not take acknowledgements")
        try:
            self.on_ack(str(alert), user)
        except (KeyError, ValueError) as exc:
            raise ProtocolError("ack_failed", str(exc.args[0] if exc.args else exc)) from None
        self._control(client, now, {"type": "acked", "id": message.get("id"), "alert": alert,
                               "by": user})

    # ----------------------------------------------------------------- sending

    def take_frame(self, client: Client) -> Any | None:
        """The next frame for the client's sender to write, or None when there is none."""
        if not client.queue:
            return None
        client.in_flight = True
        return client.queue.popleft()[0]

    def frame_written(self, client: Client, now: float) -> None:
        client.in_flight = False
        client.frames_sent += 1
        client.busy_since = now if client.queue else None
        if client.lagging and not client.queue:
            # Drained: from the next tick on it gets the latest state of each channel.
            client.lagging = False
            self._attention.add(client)

    def close_expired(self, client: Client) -> None:
        """Its token expired: nothing more is queued; the Trio layer closes with 4401."""
        client.closed = True
        client.close_code = CLOSE_TOKEN_EXPIRED
        client.close_reason = "token expired"
        client.queue.clear()
        self._m_expired.inc()

    def close_slow(self, client: Client, reason: str = CLOSE_TOO_SLOW_REASON) -> None:
        client.closed = True
        client.close_code = CLOSE_TOO_SLOW
        client.close_reason = reason
        client.queue.clear()
        self._m_slow.inc(action="closed")

    # ----------------------------------------------------------------- the tick

    def tick(self, now: float, wall: float) -> tuple[list[Client], list[Client]]:
        """Flush this tick's deltas to every client that needs them.

        Returns (clients with new frames to write, clients to close as too slow).
        ``now`` is monotonic (stall detection); ``wall`` is the Unix time put in frames."""
        self._ticks += 1
        self._snapshot_budget = self.config.snapshot_rows_per_tick
        if self._ticks % max(1, round(self.config.ui_rate * 10)) == 0:
            self.sweep()  # about every 10 s
        # 1. One shared item per dirty channel: the deltas of this tick, coalesced.
        shared: dict[str, tuple[int, Item]] = {}
        for channel in self._dirty:
            if not channel.subscribers:
                # Nobody to send to (history keeps the deltas for a resume).
                channel.pending = []
                channel.ts_min = channel.ts_max = None
                continue
            # Alert channels are event streams: their deltas are sent as they are, in order.
            deltas = list(channel.pending) if channel.event_like else coalesce(channel.pending)
            message: dict[str, Any] = {
                "type": "delta", "topic": channel.topic, "epoch": self.epoch,
                "from": channel.pending_from, "offset": channel.offset, "data": deltas,
                "n": len(channel.pending),
            }
            if channel.ts_min is not None:
                message["ts"] = [channel.ts_min, channel.ts_max]
            shared[channel.topic] = (channel.pending_from,
                                     Item(("d", channel.topic, channel.pending_from), message))
            channel.pending = []
            channel.ts_min = channel.ts_max = None
            for client in channel.subscribers:
                client.todo.add(channel.topic)
                self._attention.add(client)
        self._dirty.clear()

        items_cache: dict[tuple[Any, ...], Item] = {}
        frames_cache: dict[tuple[Any, ...], Any] = {}
        woken: list[Client] = []
        to_close: list[Client] = []
        keep: set[Client] = set()
        for client in self._attention:
            if client.closed:
                continue
            if (client.busy_since is not None
                    and now - client.busy_since > self.config.stall_timeout):
                self.close_slow(client, "stalled")
                to_close.append(client)
                continue
            if client.lagging:
                keep.add(client)  # waits, todo accumulating, until its queue has drained
                continue
            updates = sum(1 for _, update in client.queue if update)
            if updates >= self.config.queue_frames:
                if client.follows_events(self.channels):
                    self.close_slow(client)
                    to_close.append(client)
                    continue
                self._conflate(client)
                keep.add(client)
                continue
            items, deferred = self._items_for(client, shared, items_cache)
            client.todo = deferred
            if deferred:
                keep.add(client)
            if not items:
                continue
            key = (client.encoding.name, *(item.key for item in items))
            frame = frames_cache.get(key)
            if frame is None:
                encoded = [item.encoded(client.encoding) for item in items]
                frame = frames_cache[key] = self.prepare(client.encoding.batch(wall, encoded))
                self._m_encodes.inc(kind="frame")
            self._enqueue(client, now, frame, update=True)
            client.items_sent += len(items)
            woken.append(client)
        self._attention = keep
        self._m_frames.inc(len(woken))
        encoded = sum(len(i._encoded) for i in items_cache.values())
        encoded += sum(len(i._encoded) for _, i in shared.values())
        self._m_encodes.inc(encoded, kind="item")
        return woken, to_close

    def sweep(self) -> int:
        """Drop the channels (and their history) of topics the live state no longer has
        (an evicted lot's wafers and tests, an archived wafer) once no client needs them:
        nobody follows, or every follower already has the last delta (a dashboard on
        ``lot/+/wafer/+`` would otherwise keep every wafer ever seen); returns how many."""
        alive = set(self.source.topics())
        gone = [c for t, c in self.channels.items()
                if t not in alive and not c.pending
                and all(s.positions.get(t) == c.offset and t not in s.todo
                        for s in c.subscribers)]
        for channel in gone:
            for client in channel.subscribers:
                del client.positions[channel.topic]
                client.resync.pop(channel.topic, None)
            self._tombstones[channel.topic] = channel.offset
            del self.channels[channel.topic]
        return len(gone)

    def _conflate(self, client: Client) -> None:
        """Drop a state-only client's queued updates; it will get the latest state instead."""
        kept = deque(entry for entry in client.queue if not entry[1])
        client.updates_dropped += len(client.queue) - len(kept)
        client.queue = kept
        # Snapshots queued behind a write that is stuck would only pile up again: wait.
        client.lagging = bool(kept) or client.in_flight
        for topic in client.positions:
            client.positions[topic] = None
            client.resync[topic] = "lagging"
            client.todo.add(topic)
        self._m_slow.inc(action="conflated")
        if not client.lagging:
            self._attention.add(client)

    def _items_for(
        self,
        client: Client,
        shared: dict[str, tuple[int, Item]],
        cache: dict[tuple[Any, ...], Item],
    ) -> tuple[list[Item], set[str]]:
        """The items ``client`` gets this tick, and the topics whose snapshots wait for
        the next one (the tick's snapshot budget is spent)."""
        items: list[Item] = []
        deferred: set[str] = set()
        for topic in sorted(client.todo):
            position = client.positions.get(topic, -1)
            if position == -1:
                continue  # unsubscribed meanwhile
            channel = self.channels[topic]
            if position is not None:
                if position == channel.offset:
                    continue
                ready = shared.get(topic)
                if ready is not None and ready[0] == position:
                    items.append(ready[1])
                    client.positions[topic] = channel.offset
                    continue
                key = ("d", topic, position)
                item = cache.get(key)
                if item is None:
                    deltas = channel.deltas_after(position)
                    if deltas is not None:
                        item = cache[key] = Item(key, {
                            "type": "delta", "topic": topic, "epoch": self.epoch,
                            "from": position, "offset": channel.offset,
                            "data": deltas if channel.event_like else coalesce(deltas),
                            "n": len(deltas),
                        })
                if item is not None:
                    items.append(item)
                    client.positions[topic] = channel.offset
                    continue
                client.resync[topic] = "history_truncated"
                client.positions[topic] = position = None
            reason = client.resync.get(topic)
            key = ("s", topic, reason)
            item = cache.get(key)
            if item is None:
                if self._snapshot_budget <= 0:
                    # Snapshots are built in the tick, which every client waits for: a
                    # dashboard that subscribes to 50 wafer maps gets them over a few ticks
                    # rather than delaying everyone's next frame.
                    deferred.add(topic)
                    continue
                data = self.source.snapshot(topic)
                self._snapshot_budget -= _rows(data) if data else 1
                message: dict[str, Any] = {
                    "type": "snapshot", "topic": topic, "epoch": self.epoch,
                    "offset": channel.offset, "data": data if data is not None else {},
                }
                if reason is not None:
                    message["resync"] = reason
                    self._m_resync.inc(reason=reason)
                item = cache[key] = Item(key, message)
            client.resync.pop(topic, None)
            items.append(item)
            client.positions[topic] = channel.offset
        return items, deferred

    # ----------------------------------------------------------------- stats

    def stats(self) -> dict[str, Any]:
        clients = [
            {
                "id": c.id, "peer": c.peer, "encoding": c.encoding.name,
                "queue_depth": c.queue_depth, "frames_sent": c.frames_sent,
                "frames_queued": c.frames_queued, "updates_dropped": c.updates_dropped,
                "lagging": c.lagging, "subscriptions": sorted(c.patterns),
                "channels": len(c.positions),
            }
            for c in self.clients.values()
        ]
        return {
            "epoch": self.epoch,
            "ui_rate": self.config.ui_rate,
            "channels": len(self.channels),
            "clients": clients,
            "queue_depth_max": max((c["queue_depth"] for c in clients), default=0),
        }

    def _collect(self) -> None:
        self._g_clients.set(len(self.clients))
        self._g_queue.set(max((c.queue_depth for c in self.clients.values()), default=0))
