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

Why one module of this size: ``LiveHub`` is one state machine (subscriptions, ticks,
resume, slow clients) over the channels and clients it owns; what stands alone is beside
it (``channels``, ``deltas``, ``encoding``, ``config``).
"""

from __future__ import annotations

import itertools
import logging
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from ...metrics import Metrics, report_internal_error
from ...topicfilter import FilterSet
from .. import topics
from .channels import Channel, Client, ClientScope, Item, delta_rows
from .config import (
    CLOSE_TOKEN_EXPIRED,
    CLOSE_TOO_SLOW,
    CLOSE_TOO_SLOW_REASON,
    LiveConfig,
    pattern_error,
)
from .deltas import coalesce
from .encoding import Encoding, decode_client_message

log = logging.getLogger("edgegw.hub.live")


#: a topic's item this tick could not be built (``LiveHub._topic_failed``): not tried again
_FAILED = Item(("failed",), {})

#: offsets of swept channels remembered by topic; beyond, one floor for every new channel
MAX_TOMBSTONES = 1024
#: ``resume`` entries of topics the hub does not have (yet) kept per client (``resume_later``):
#: beyond, the oldest are dropped -- such a topic, when it appears, comes as a snapshot.
#: Unbounded, one client's 256 patterns, each subscribed in a 256 KiB request of resume
#: entries, held hundreds of MB.  An entry is kept only for a topic of at most
#: ``MAX_RESUME_TOPIC`` characters (no topic of a floor is near it); an epoch that is not a
#: string of at most ``MAX_RESUME_EPOCH`` characters (no hub's is) is kept as None: it
#: matches no epoch, as it would not have
MAX_RESUME_LATER = 1024
MAX_RESUME_TOPIC = 1024
MAX_RESUME_EPOCH = 128
#: topics whose ``wanted`` answer is kept; beyond, the cache starts afresh (a floor's
#: tests alone are 10,000s of topics, each answer a few pattern matches to redo)
MAX_WANTED_CACHE = 65_536


class StateSource(Protocol):
    """What the fan-out needs from the live state (``edgegw.hub.live.LiveState``)."""

    def snapshot(self, topic: str) -> dict[str, Any] | None: ...

    def topics(self) -> list[str]: ...


def _shown(value: Any) -> str:
    """A client's value quoted in an error message: its repr -- or what it is, when Python
    has none (an integer past 4,300 digits: a CBOR bignum; the repr raised ValueError and
    the request was answered ``internal_error``, counted as a hub bug)."""
    try:
        return repr(value)
    except ValueError:
        return f"a value too large to show ({type(value).__name__})"


class RequestError(Exception):
    """A client message the hub cannot act on; answered with an ``error`` message."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


AckHandler = Callable[[str, str], object]  # its result is not used


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
        prepare_deflated: Callable[[bytes | str], Any] | None = None,
        on_ack: AckHandler | None = None,
        metrics: Metrics | None = None,
        merge_rules: Sequence[dict[str, Any]] = topics.MERGE_RULES,
    ) -> None:
        self.source = source
        self.merge_rules = [dict(rule) for rule in merge_rules]  # sent in every hello
        self.config = config or LiveConfig()
        self.epoch = epoch
        # Cluster mode with several Redis shards: each topic's epoch is its shard's
        # (``set_epoch(..., topics=...)``); None: every topic has ``epoch``.
        self.epoch_of: Callable[[str], str] | None = None
        self.prepare = prepare
        self.prepare_deflated = prepare_deflated or prepare
        self.on_ack = on_ack
        self.metrics = metrics or Metrics()
        self.channels: dict[str, Channel] = {}
        self.clients: dict[int, Client] = {}
        self._patterns: dict[str, set[Client]] = {}  # pattern -> clients subscribed with it
        # topic -> whether some client's pattern matches it (``wanted``); cleared whenever
        # the set of patterns changes
        self._wanted: dict[str, bool] = {}
        # ``_patterns`` as one FilterSet: a new topic is matched against every client's
        # patterns in a walk of its levels, not one pattern at a time; rebuilt when needed
        # after the set of patterns changes (``_patterns_changed``)
        self._pattern_index: FilterSet | None = None
        self._dirty: set[Channel] = set()
        self._attention: set[Client] = set()  # clients with todo topics outside dirty channels
        self._ids = itertools.count(1)
        # Offsets of channels dropped by ``sweep``: a topic that comes back continues past
        # them, so an old offset can never name a different delta in the same epoch.
        # Bounded (a hub sees lots, wafers and tests come and go for months): a forgotten
        # tombstone raises ``_offset_floor`` instead, where every new channel starts.
        self._tombstones: dict[str, int] = {}
        self._offset_floor = 0
        self._ticks = 0
        self._last_tick: float | None = None  # ``now`` of the previous tick
        self._snapshot_budget = self.config.snapshot_rows_per_tick
        #: clients in step are grouped in a tick (False: each worked out alone, as before;
        #: for bench/fanout.py --compare -- both give every client the same frames)
        self.group_in_step = True
        #: called when a channel gets its first delta since the last tick (the Trio layer
        #: ticks as soon as a tick is due after that, not at a fixed phase)
        self.on_work: Callable[[], None] | None = None
        self.unavailable: str | None = None  # cluster mode: why no live data (set_unavailable)
        self.unavailable_message = ""
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
        self._m_signed_out = self.metrics.counter(
            "live_signed_out_total", "clients closed (4401) when a reload of [auth] no longer "
            "admitted their token as it was")
        self._m_resync = self.metrics.counter("live_resyncs_total",
                                              "snapshots sent because deltas were not recoverable")
        self._m_resume_dropped = self.metrics.counter(
            "live_resumes_dropped_total",
            "resume entries of topics the hub lacked, not kept (per-client bound)")
        self._m_topic_errors = self.metrics.counter(
            "live_topic_errors_total",
            "topic snapshots or deltas the tick failed to build or encode, by stage")
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
            if self.on_work is not None:
                self.on_work()
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
            channel.offset = max(self._tombstones.pop(topic) + 1, self._offset_floor)
        else:
            channel.offset = self._offset_floor
        self.channels[topic] = channel
        for pattern in self._index().matching(topic):
            for client in self._patterns[pattern]:
                self._attach(client, channel, None)
        return channel

    def _index(self) -> FilterSet:
        if self._pattern_index is None:
            self._pattern_index = FilterSet(self._patterns)
        return self._pattern_index

    def _patterns_changed(self) -> None:
        self._wanted.clear()
        self._pattern_index = None

    def _channel(self, topic: str) -> Channel:
        channel = self.channels.get(topic)
        return channel if channel is not None else self._create_channel(topic)

    def wanted(self, topic: str) -> bool:
        """Whether some client follows ``topic`` now (a pattern of its matches it).

        The live state asks before building an update and builds none when the answer is
        False, so False also means "its state will change with no delta": the topic's
        channel, if any, is dropped here (tombstoned as ``sweep`` does), and a client that
        later resumes it from an old offset gets a snapshot marked ``resync`` -- the deltas
        it would compose across the gap were never published.  Cached per topic; the
        cache is cleared when a subscription comes or goes."""
        answer = self._wanted.get(topic)
        if answer is None:
            answer = self._index().matches_any(topic)
            if not answer:
                self._drop_unwanted(topic)
            if len(self._wanted) >= MAX_WANTED_CACHE:
                self._wanted.clear()
            self._wanted[topic] = answer
        return answer

    def _drop_unwanted(self, topic: str) -> None:
        channel = self.channels.get(topic)
        if channel is None or channel.subscribers:
            return  # (a subscriber outside every pattern cannot be: unsubscribe detaches)
        self._tombstones[topic] = channel.offset
        del self.channels[topic]
        self._dirty.discard(channel)
        while len(self._tombstones) > MAX_TOMBSTONES:
            oldest = next(iter(self._tombstones))
            self._offset_floor = max(self._offset_floor, self._tombstones.pop(oldest) + 1)

    def subscribed_patterns(self) -> list[str]:
        """The topic patterns some client follows now (a cluster node mirrors only the
        topics they match)."""
        return list(self._patterns)

    # ----------------------------------------------------------------- clients

    def connect(self, encoding: Encoding, *, now: float, peer: str = "",
                scope: ClientScope | None = None, deflate: bool = False) -> Client:
        client = Client(next(self._ids), encoding, peer, scope, deflate=deflate)
        self.clients[client.id] = client
        self._control(client, now, {
            "type": "hello", "epoch": self.epoch, "encoding": encoding.name,
            "ui_rate": self.config.ui_rate, "queue_frames": self.config.queue_frames,
            "history": self.config.history, "merge": self.merge_rules,
        })
        if self.unavailable is not None:
            self._control(client, now, {"type": "status", "code": self.unavailable,
                                        "message": self.unavailable_message})
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
                    self._patterns_changed()
        for topic in client.positions:
            channel = self.channels.get(topic)
            if channel is not None:
                channel.subscribers.discard(client)
        client.queue.clear()

    def _resumed_at(self, client: Client, channel: Channel,
                    resumed: tuple[Any, int] | None) -> int | None:
        """The position a client resuming ``channel`` at ``resumed`` (epoch, offset) starts
        from; None: a snapshot, marked resync with the reason when it resumed."""
        if resumed is None:
            return None
        topic = channel.topic
        epoch, offset = resumed
        if epoch != (self.epoch if self.epoch_of is None else self.epoch_of(topic)):
            client.resync[topic] = "epoch_changed"
        elif offset > channel.offset:
            client.resync[topic] = "offset_ahead"
        else:
            return offset  # tick decides: exact deltas, or resync if truncated
        return None

    def _attach(self, client: Client, channel: Channel, position: int | None) -> None:
        if channel.topic in client.positions:
            return
        if client.scope is not None and not client.scope.allows_topic(channel.topic):
            return  # outside its scope: as if the topic did not exist
        if position is None and client.resume_later:
            position = self._resumed_at(client, channel,
                                        client.resume_later.pop(channel.topic, None))
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
        prepare = self.prepare_deflated if client.deflate else self.prepare
        self._enqueue(client, now, prepare(encoded), items=0)

    def _enqueue(self, client: Client, now: float, frame: Any, *, items: int) -> None:
        """Queue ``frame``; ``items``: the update items it carries (0: a control reply)."""
        if client.busy_since is None:
            client.busy_since = now
        client.queue.append((frame, items))
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
                raise RequestError("bad_message", f"not valid JSON/CBOR: {exc}") from None
            if not isinstance(message, dict):
                raise RequestError("bad_message", "a message must be a map/object")
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
                raise RequestError("unknown_type", f"unknown message type {_shown(kind)}")
        except RequestError as exc:
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
            raise RequestError("bad_topics", "'topics' must be a non-empty list of patterns")
        for pattern in topics:
            error = pattern_error(pattern)
            if error is not None:
                raise RequestError("bad_topics", error)
        return topics

    def _subscribe(self, client: Client, message: dict[str, Any], now: float) -> None:
        if self.unavailable is not None:
            raise RequestError(self.unavailable, self.unavailable_message)
        patterns = self._patterns_of(message)
        resume = message.get("resume") or {}
        if not isinstance(resume, dict):
            raise RequestError("bad_resume", "'resume' must map topic -> [epoch, offset]")
        positions: dict[str, tuple[Any, int]] = {}
        for topic, where in resume.items():
            if (not isinstance(topic, str) or not isinstance(where, list) or len(where) != 2
                    or not isinstance(where[1], int) or isinstance(where[1], bool)
                    or where[1] < 0):
                raise RequestError(
                    "bad_resume", f"resume entry for {_shown(topic)} must be [epoch, offset >= 0]")
            positions[topic] = (where[0], where[1])
        new = [p for p in dict.fromkeys(patterns) if p not in client.patterns]
        if len(client.patterns) + len(new) > self.config.max_patterns:
            raise RequestError("too_many_topics",
                                f"at most {self.config.max_patterns} subscriptions per client")
        for pattern in new:
            client.patterns.add(pattern)
            self._patterns.setdefault(pattern, set()).add(client)
        if new:  # none: the request changes nothing, and costs no walk over every topic
            self._patterns_changed()
            self._attach_new(client, new, positions)
        self._control(client, now, {"type": "subscribed", "id": message.get("id"),
                                    "topics": patterns, "epoch": self.epoch})

    def _attach_new(self, client: Client, new: list[str],
                    positions: dict[str, tuple[Any, int]]) -> None:
        """Attach ``client`` to every topic its ``new`` patterns match, resumed from
        ``positions`` where it says so."""
        # Topics the state knows (after a restart it may not have published them yet) and
        # topics that only have a channel so far.
        known = dict.fromkeys(self.channels)
        known.update(dict.fromkeys(self.source.topics()))
        matches_new = FilterSet(new).matches_any  # per topic: its levels, not 256 patterns
        for topic in known:
            if topic in client.positions or not matches_new(topic):
                continue
            channel = self.channels.get(topic)
            if channel is None:
                # A topic of the state with no channel (nobody wanted it: ``wanted``): the
                # new channel attaches this client itself -- with its resume, or the client
                # would get a bare snapshot over the view it resumed.
                if topic in positions:
                    client.resume_later[topic] = positions[topic]
                channel = self._create_channel(topic)
                client.resume_later.pop(topic, None)  # (outside its scope: not attached)
                if topic in client.positions:
                    continue
            self._attach(client, channel, self._resumed_at(client, channel,
                                                           positions.get(topic)))
        # Resumed topics this hub does not have (yet): a cluster node whose mirror loads
        # them a moment later, an owner republishing after an epoch change.  Kept, so the
        # topic comes back as what was missed or marked resync -- never a bare snapshot
        # over the view the client holds (a silent gap).
        for topic, where in positions.items():
            if topic not in known and matches_new(topic):
                self._keep_resume(client, topic, where)

    def _keep_resume(self, client: Client, topic: str, where: tuple[Any, int]) -> None:
        """Keep ``client``'s resume of ``topic`` until the topic appears: bounded
        (``MAX_RESUME_LATER`` entries, the oldest dropped; ``MAX_RESUME_TOPIC``,
        ``MAX_RESUME_EPOCH``)."""
        later = client.resume_later
        if len(topic) > MAX_RESUME_TOPIC:
            self._m_resume_dropped.inc()
            return
        epoch, offset = where
        if type(epoch) is not str or len(epoch) > MAX_RESUME_EPOCH:
            epoch = None  # no hub's epoch: it resyncs (epoch_changed) as it would have
        later.pop(topic, None)  # the newest last
        # (an offset past 2^63 is as far ahead as any: a bignum's bytes are not kept)
        later[topic] = (epoch, min(offset, 1 << 63))
        while len(later) > MAX_RESUME_LATER:
            del later[next(iter(later))]
            self._m_resume_dropped.inc()

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
                        self._patterns_changed()
        still_followed = FilterSet(client.patterns).matches_any
        for topic in [t for t in client.resume_later if not still_followed(t)]:
            del client.resume_later[topic]
        for topic in list(client.positions):
            if not still_followed(topic):
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
        if (not isinstance(alert, (str, int)) or isinstance(alert, bool)
                or (type(alert) is int and alert.bit_length() > 64)):  # str() of it raises
            raise RequestError("bad_ack", "'alert' must name the alert to acknowledge")
        if not isinstance(user, str):
            raise RequestError("bad_ack", "'by' must be a string")
        if scope is not None and not scope.may_ack:
            raise RequestError("forbidden", "acknowledging alerts needs the operator role")
        if scope is not None and not scope.may_ack_alert(str(alert)):
            raise RequestError("ack_failed", f"unknown alert {str(alert)!r}")
        if self.on_ack is None:
            raise RequestError("ack_unavailable", "this hub does not take acknowledgements")
        try:
            self.on_ack(str(alert), user)
        except (KeyError, ValueError) as exc:
            raise RequestError("ack_failed", str(exc.args[0] if exc.args else exc)) from None
        self._control(client, now, {"type": "acked", "id": message.get("id"), "alert": alert,
                               "by": user})

    # ----------------------------------------------------------------- sending

    def take_frame(self, client: Client) -> Any | None:
        """The next frame for the client's sender to write, or None when there is none."""
        if not client.queue:
            return None
        client.in_flight = True
        frame, client.writing_items = client.queue.popleft()
        return frame

    def frame_written(self, client: Client, now: float) -> None:
        client.in_flight = False
        client.frames_sent += 1
        client.items_sent += client.writing_items
        client.writing_items = 0
        client.busy_since = now if client.queue else None
        if client.lagging and not client.queue:
            # Drained: from the next tick on it gets the latest state of each channel.
            client.lagging = False
            self._attention.add(client)

    def close_expired(self, client: Client) -> None:
        """Its token expired: nothing more is queued; the Trio layer closes with 4401."""
        self._close_signed_in(client, "token expired")
        self._m_expired.inc()

    def close_signed_out(self, client: Client, reason: str) -> None:
        """Its credential is no longer admitted as it was (the hub reloaded ``[auth]``):
        nothing more is queued; the Trio layer closes with 4401 and ``reason``."""
        self._close_signed_in(client, reason)
        self._m_signed_out.inc()

    @staticmethod
    def _close_signed_in(client: Client, reason: str) -> None:
        client.closed = True
        client.close_code = CLOSE_TOKEN_EXPIRED
        client.close_reason = reason
        client.queue.clear()

    def close_slow(self, client: Client, reason: str = CLOSE_TOO_SLOW_REASON) -> None:
        client.closed = True
        client.close_code = CLOSE_TOO_SLOW
        client.close_reason = reason
        client.queue.clear()
        self._m_slow.inc(action="closed")

    # ----------------------------------------------------------------- the tick

    def has_work(self) -> bool:
        """Whether a tick now would do anything: deltas to send, or clients to look at
        (new subscriptions, resumes, deferred snapshots, lagging clients)."""
        return bool(self._dirty or self._attention)

    def tick(self, now: float, wall: float) -> tuple[list[Client], list[Client]]:
        """Flush this tick's deltas to every client that needs them.

        Returns (clients with new frames to write, clients to close as too slow).
        ``now`` is monotonic (stall detection); ``wall`` is the Unix time put in frames."""
        self._discount_pause(now)
        if self.unavailable is not None:
            return [], []  # cluster mode, cut off: what the mirror holds may be stale
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
            try:
                # Alert channels are event streams: their deltas go as they are, in order.
                deltas = (list(channel.pending) if channel.event_like
                          else coalesce(channel.pending))
            except Exception:
                # One topic's failure, not the tick's: its followers get a snapshot.
                self._topic_failed(channel.topic, "delta")
                for client in channel.subscribers:
                    self._topic_broken(client, channel.topic, self._attention)
                channel.pending = []
                channel.ts_min = channel.ts_max = None
                continue
            message: dict[str, Any] = {
                "type": "delta", "topic": channel.topic,
                "epoch": self.epoch if self.epoch_of is None else self.epoch_of(channel.topic),
                "from": channel.pending_from, "offset": channel.offset, "data": deltas,
                "n": len(channel.pending),
            }
            if channel.ts_min is not None:
                message["ts"] = [channel.ts_min, channel.ts_max]
            shared[channel.topic] = (channel.pending_from,
                                     Item(("d", channel.topic, channel.pending_from), message))
            channel.pending = []
            channel.ts_min = channel.ts_max = None
            # Its subscribers look at it below (the topics they follow among ``shared``):
            # one C-level union here, not a Python loop over every (channel, subscriber).
            self._attention |= channel.subscribers
        self._dirty.clear()

        items_cache: dict[tuple[Any, ...], Item] = {}
        frames_cache: dict[tuple[Any, ...], Any] = {}
        woken: list[Client] = []
        to_close: list[Client] = []
        keep: set[Client] = set()
        queue_frames = self.config.queue_frames
        stall_timeout = self.config.stall_timeout
        # The common case, a client in step: every topic it has to look at is a channel
        # with this tick's deltas, and it holds exactly the offset they start from.  Such
        # clients with the same topics get the same items and the same frame, so that is
        # worked out once per set of topics (``in_step``), and each client costs a few
        # C-level set and dict operations -- with 1,000s of dashboards per hub, the
        # per-client Python loop over topics was most of the tick.
        shared_topics = shared.keys()
        # per set of topics: (offsets from, offsets to, items, item keys, its frame per
        # (encoding, deflate))
        in_step: dict[frozenset[str],
                      tuple[dict[str, int], dict[str, int], list[Item], tuple[Any, ...],
                            dict[tuple[str, bool], Any]]] = {}
        for client in self._attention:
            if client.closed:
                continue
            if (client.busy_since is not None
                    and now - client.busy_since > stall_timeout):
                self.close_slow(client, "stalled")
                to_close.append(client)
                continue
            if client.lagging:
                keep.add(client)  # waits, todo accumulating, until its queue has drained
                continue
            if len(client.queue) >= queue_frames and sum(
                    1 for _, update in client.queue if update) >= queue_frames:
                if client.follows_events(self.channels):
                    self.close_slow(client)
                    to_close.append(client)
                    continue
                self._conflate(client)
                keep.add(client)
                continue
            todo = client.todo
            if shared:  # the dirty channels it follows are topics to look at too
                todo |= client.positions.keys() & shared_topics
            if self.group_in_step and todo <= shared_topics:
                group_key = frozenset(todo)
                group = in_step.get(group_key)
                if group is None:
                    topics_ = sorted(group_key)
                    items = [shared[t][1] for t in topics_]
                    group = in_step[group_key] = (
                        {t: shared[t][0] for t in topics_},
                        {t: self.channels[t].offset for t in topics_},
                        items, tuple(item.key for item in items), {})
                if group[0].items() <= client.positions.items():
                    client.positions.update(group[1])
                    client.todo = set()
                    items = group[2]
                    if items:  # _send_items, its lookups done once per group
                        style = (client.encoding.name, client.deflate)
                        built = group[4].get(style)
                        if built is None:
                            built = group[4][style] = self._frame(
                                client, items, wall, frames_cache, group[3])
                        frame, failed = built
                        if failed:
                            for topic in failed:
                                self._topic_broken(client, topic, keep)
                            if frame is None:
                                continue
                        if client.busy_since is None:
                            client.busy_since = now
                        # (the items that could not be encoded are not in it)
                        client.queue.append((frame, len(items) - len(failed)))
                        client.frames_queued += 1
                        woken.append(client)
                    continue
            items, deferred = self._items_for(client, shared, items_cache)
            client.todo = deferred
            if deferred:
                keep.add(client)
            if items:
                self._send_items(client, items, now, wall, frames_cache, woken, keep)
        self._attention = keep
        self._m_frames.inc(len(woken))
        encoded = sum(len(i._encoded) for i in items_cache.values())
        encoded += sum(len(i._encoded) for _, i in shared.values())
        self._m_encodes.inc(encoded, kind="item")
        return woken, to_close

    def _send_items(self, client: Client, items: list[Item], now: float, wall: float,
                    frames_cache: dict[tuple[Any, ...], Any], woken: list[Client],
                    keep: set[Client]) -> None:
        """Queue one batch frame of ``items`` for ``client``; a frame with the same items
        and encoding is built (encoded, WebSocket-framed) once per tick."""
        frame, failed = self._frame(client, items, wall, frames_cache)
        for topic in failed:
            self._topic_broken(client, topic, keep)
        if frame is None:
            return
        # (the items that could not be encoded are not in it)
        self._enqueue(client, now, frame, items=len(items) - len(failed))
        woken.append(client)

    def _frame(self, client: Client, items: list[Item], wall: float,
               frames_cache: dict[tuple[Any, ...], Any],
               item_keys: tuple[Any, ...] | None = None) -> tuple[Any, tuple[str, ...]]:
        """The batch frame of ``items`` in the client's encoding, built (encoded,
        WebSocket-framed) once per tick, and the topics of the items that could not be
        encoded (left out of it; None for the frame when no item could be)."""
        if item_keys is None:
            item_keys = tuple(item.key for item in items)
        key = (client.encoding.name, client.deflate, *item_keys)
        built = frames_cache.get(key)
        if built is None:
            encoding = client.encoding
            failed: tuple[str, ...] = ()
            try:
                encoded = [item.encoded(encoding) for item in items]
            except Exception:
                # A failure boundary per topic: the items that encode go out.
                encoded = []
                for item in items:
                    try:
                        encoded.append(item.encoded(encoding))
                    except Exception:
                        topic = item.message["topic"]
                        self._topic_failed(topic, "encode")
                        failed += (topic,)
            frame = None
            if encoded:
                prepare = self.prepare_deflated if client.deflate else self.prepare
                frame = prepare(encoding.batch(wall, encoded))
                self._m_encodes.inc(kind="frame")
            built = frames_cache[key] = (frame, failed)
        return built

    def _topic_failed(self, topic: str, stage: str) -> None:
        """Building (``stage``: ``delta``, ``snapshot``) or encoding (``encode``) one
        topic's item raised: a hub bug, or a value in the live state no check caught (a
        CBOR bignum as a site once broke every later tick, for every client).  Counted,
        logged (rate-limited); the caller resyncs the topic's clients -- nothing else."""
        self._m_topic_errors.inc(stage=stage)
        report_internal_error(self.metrics, "live_topic", log,
                              "the %s of live topic %.200s", stage, topic)

    def _topic_broken(self, client: Client, topic: str, keep: set[Client]) -> None:
        """``client`` did not get ``topic``'s item this tick: a snapshot of it next tick,
        marked ``resync: hub_error`` (tried again once the topic changes, if it failed)."""
        if topic not in client.positions:
            return
        client.positions[topic] = None
        client.resync[topic] = "hub_error"
        client.todo.add(topic)
        keep.add(client)

    def _discount_pause(self, now: float) -> None:
        """A stall is time a client's write made no progress while the hub could write.
        Ticks run at least once a UI interval; one that runs more than ``stall_timeout / 4``
        after the previous one finds that the hub itself was not running (SIGSTOP, a frozen
        VM, a long GC pause or a blocked loop), and no write could progress meanwhile: that
        time is no client's stall, so every busy client's stall clock moves on by it (as a
        heartbeat's late look is no verdict, docs/reliability.md "Paused processes").
        Before, the first tick after such a pause closed every client that had a frame in
        flight when it began with 4008 ``stalled``.  Only the part of the pause a client
        was busy for is discounted: one that became busy during it starts its clock now,
        never later (moved by the whole pause, its clock ran ahead of ``now``, and a
        client that stopped reading was closed that much after ``stall_timeout``)."""
        last, self._last_tick = self._last_tick, now
        if last is None or now - last <= self.config.stall_timeout / 4:
            return
        for client in self.clients.values():
            if client.busy_since is not None:
                client.busy_since = min(client.busy_since + (now - last), now)

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
        while len(self._tombstones) > MAX_TOMBSTONES:  # the oldest first (insertion order)
            oldest = next(iter(self._tombstones))
            self._offset_floor = max(self._offset_floor, self._tombstones.pop(oldest) + 1)
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
                key: tuple[str, str, Any] = ("d", topic, position)
                item = cache.get(key)
                if item is None:
                    deltas = channel.deltas_after(position)
                    if deltas is not None:
                        try:
                            data: Any = deltas if channel.event_like else coalesce(deltas)
                        except Exception:
                            self._topic_failed(topic, "delta")
                            item = cache[key] = _FAILED
                        else:
                            item = cache[key] = Item(key, {
                                "type": "delta", "topic": topic, "epoch": self.epoch
                                if self.epoch_of is None else self.epoch_of(topic),
                                "from": position, "offset": channel.offset,
                                "data": data, "n": len(deltas),
                            })
                if item is not None and item is not _FAILED:
                    items.append(item)
                    client.positions[topic] = channel.offset
                    continue
                client.resync[topic] = "history_truncated" if item is None else "hub_error"
                client.positions[topic] = position = None
            reason = client.resync.get(topic)
            key = ("s", topic, reason)
            item = cache.get(key)
            if item is _FAILED:
                continue  # tried this tick: again once the topic changes
            if item is None:
                if self._snapshot_budget <= 0:
                    # Snapshots are built in the tick, which every client waits for: a
                    # dashboard that subscribes to 50 wafer maps gets them over a few ticks
                    # rather than delaying everyone's next frame.
                    deferred.add(topic)
                    continue
                try:
                    data = self.source.snapshot(topic)
                except Exception:
                    # The topic's failure: its position stays None, and the snapshot is
                    # tried again when its channel next has deltas (or the client resumes).
                    self._topic_failed(topic, "snapshot")
                    self._snapshot_budget -= 1
                    client.resync[topic] = reason or "hub_error"
                    cache[key] = _FAILED
                    continue
                self._snapshot_budget -= delta_rows(data) if data else 1
                message: dict[str, Any] = {
                    "type": "snapshot", "topic": topic, "epoch": self.epoch
                    if self.epoch_of is None else self.epoch_of(topic),
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

    # ----------------------------------------------------------------- cluster mode

    # On a hub node of a cluster (edgegw.hub.cluster) the epoch and each channel's offsets
    # are the cluster's, not this process's: the node's mirror of the Redis topic streams
    # publishes deltas here (``publish``, one offset each, so offsets match the stream's)
    # and uses these three calls where the cluster, not a delta, moves a channel.

    def set_epoch(self, epoch: str, topics: Callable[[str], bool] | None = None) -> None:
        """The cluster's live epoch changed (Redis lost its data): every channel is dropped
        and every subscriber gets each topic again, when it reappears, as a snapshot marked
        ``resync: epoch_changed``.  ``topics``: only the channels it accepts (the topics
        of one Redis shard, whose epoch is ``epoch``: ``epoch_of`` says which is whose);
        ``self.epoch`` (what ``hello`` says) is then left alone."""
        if topics is None:
            self.epoch = epoch
        for client in self.clients.values():
            hit = [t for t in client.positions if topics is None or topics(t)]
            for topic in hit:
                client.resync[topic] = "epoch_changed"
                del client.positions[topic]
                client.todo.discard(topic)
        if topics is None:
            self.channels.clear()
            self._dirty.clear()
            self._tombstones.clear()
            self._offset_floor = 0
            return
        for topic in [t for t in self.channels if topics(t)]:
            self._dirty.discard(self.channels.pop(topic))
        for topic in [t for t in self._tombstones if topics(t)]:
            del self._tombstones[topic]

    def reset_channel(self, topic: str, offset: int, history: Sequence[dict[str, Any]] = (),
                      reason: str = "history_truncated") -> None:
        """Put ``topic``'s channel at ``offset`` with ``history`` (the deltas just before
        it, oldest first).  A subscriber whose position that history cannot bring to
        ``offset`` gets a snapshot marked ``resync: reason`` at the next tick."""
        channel = self._channel(topic)
        channel.offset = offset
        channel.history.clear()
        channel.rows = 0
        for delta in history:
            channel.remember(delta)
        channel.pending = []
        channel.ts_min = channel.ts_max = None
        self._dirty.discard(channel)
        for client in channel.subscribers:
            position = client.positions.get(topic)
            if position is not None and (position > offset
                                         or channel.deltas_after(position) is None):
                client.positions[topic] = None
                client.resync[topic] = reason
            client.todo.add(topic)
            self._attention.add(client)

    def set_unavailable(self, code: str | None, message: str = "", *, now: float) -> None:
        """``code`` (e.g. ``cluster_unavailable``): this node cannot serve live data now --
        every client is told so in a ``status`` message, subscriptions are refused and no
        batch is sent until it is called with None (``status`` ``ok``).  Clients keep their
        positions: once the node has caught up they get exactly what they missed."""
        if code == self.unavailable:
            return
        self.unavailable = code
        self.unavailable_message = message
        status = {"type": "status", "code": code or "ok", "message": message}
        for client in list(self.clients.values()):
            self._control(client, now, status)

    # ----------------------------------------------------------------- stats

    def stats(self) -> dict[str, Any]:
        clients = [
            {
                "id": c.id, "peer": c.peer, "encoding": c.encoding.name,
                "queue_depth": c.queue_depth, "frames_sent": c.frames_sent,
                "frames_queued": c.frames_queued, "updates_dropped": c.updates_dropped,
                "items_sent": c.items_sent, "lagging": c.lagging,
                "subscriptions": sorted(c.patterns),
                "channels": len(c.positions),
            }
            for c in self.clients.values()
        ]
        return {
            "epoch": self.epoch,
            "ui_rate": self.config.ui_rate,
            "channels": len(self.channels),
            "clients": clients,
            "queue_depth_max": max((c.queue_depth for c in self.clients.values()), default=0),
        }

    def _collect(self) -> None:
        self._g_clients.set(len(self.clients))
        self._g_queue.set(max((c.queue_depth for c in self.clients.values()), default=0))
