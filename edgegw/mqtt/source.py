"""The MQTT source: sensor topics -> SensorWindow records (throttled) or SensorReading.

Each configured subscription maps a topic filter to a channel-name template
(``edgegw.mqtt.topics``) and a payload decoder (``edgegw.mqtt.payloads``).  A channel is
throttled to its UI rate (``edgegw.throttle``: one window per interval with last, min,
max, mean and count) or, with ``raw = true``, forwarded reading by reading.

Tasks: the client's reader decodes a burst of messages into the throttles and the pending
batch, then asks the *pump* to put them and reads on; it waits only while a full batch is
still not taken (backpressure: the socket is not read, TCP pushes back to the broker, which
queues; configure it to keep them, see docs/mqtt.md).  The pump puts pending records and
closes windows at their deadline.  It is not part of any connection, so a lost connection
never cancels a put half-way; at a stop it finishes the put in hand and flushes the open
windows (bounded in time).

Delivery (docs/mqtt.md, "Acknowledgements"): QoS 1 messages are acknowledged manually,
in the order they arrived, once the frame holding what they became is durable in the
frame store (``edgegw.mqtt.acks`` keeps the books; the gateway reports durability through
``sink.on_durable``).  Each put's checkpoint lists the messages stored and not yet known
to be acknowledged, so a message the broker sends again after a crash or reconnect is
recognised and dropped: every QoS 1 reading is counted exactly once.  A retained message the
broker sends again at a subscription is recognised by what its topic last gave
(``_taken_already``); the checkpoint keeps that for the topics seen retained, as far as
the put it goes with stores it (``_seal_taken``), so a restart does not take it again.

Failure boundary: whatever goes wrong while handling one message (a payload that does not
decode, a decoder that raises anything else, a bug) is caught here, counted, logged with
the topic at most once per interval, and the message is acknowledged in its turn: a poison
message is never redelivered forever and never stops the gateway.

Why one module of this size: the message path (route, decode, throttle, put, acknowledge
after durability) is one synchronous pipeline over shared per-source state; the pieces
that stand alone are beside it (``acks``, ``payloads``, ``topics``, ``edgegw.throttle``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import ssl
import struct
import time
import zlib
from collections.abc import Awaitable, Callable, Sequence
from typing import Annotated, Any, ClassVar, Literal

import paho.mqtt.client as paho
import trio

from ..backoff import Backoff
from ..config import Range
from ..metrics import AGE_BUCKETS, report_internal_error
from ..records import GatewayEvent, Record, SensorReading
from ..sources import RecordSink, SourceContext, source_errors
from ..throttle import Throttle, as_sensor_window
from ..topicfilter import filter_problem, matches
from .acks import AckLedger, CheckpointError, Group, keys_from_checkpoint
from .client import ConnectOptions, TrioMqttClient, ssl_context, subscriptions_of
from .payloads import Decoder, PayloadError, UnknownPayloadDecoder, make_decoder
from .sizeguard import OVERSIZE_MARK, oversize_length
from .topics import TemplateError, compile_template

log = logging.getLogger(__name__)


class MqttSourceError(Exception):
    """A setting that cannot work (unreadable password or TLS file): one clear line."""


@dataclasses.dataclass(frozen=True)
class TlsConfig:
    ca_file: str = ""  # "" = the system's CA certificates
    cert_file: str = ""  # client certificate (PEM), for brokers that require one
    key_file: str = ""  # its private key, when not in cert_file
    insecure: bool = False  # do not check the broker's certificate or host name


@dataclasses.dataclass(frozen=True)
class BackoffConfig:
    initial: Annotated[float, Range(0, 3600, lo_open=True)] = 0.5
    maximum: Annotated[float, Range(0, 3600, lo_open=True)] = 30.0
    multiplier: Annotated[float, Range(1, 100)] = 2.0

    def validate(self) -> list[tuple[str, str]]:
        problems = []
        if self.initial <= 0:
            problems.append(("initial", "must be > 0"))
        if self.maximum < self.initial:
            problems.append(("maximum", "must be >= initial"))
        if self.multiplier < 1:
            problems.append(("multiplier", "must be >= 1"))
        return problems


@dataclasses.dataclass(frozen=True)
class SubscriptionConfig:
    topic: str  # MQTT topic filter, '+' and '#' allowed
    channel: str = "{topic}"  # channel template: {0}, {1}, {-1}, {#}, {topic}
    payload: str = "json"  # "json", "number" or a plugin from edgegw.payloads
    value_path: str = "value"  # json: dotted path of the value ("" = the whole document)
    timestamp_field: str = ""  # json: dotted path of the time; "" = arrival time
    payload_options: dict[str, Any] = dataclasses.field(default_factory=dict)  # plugins
    unit: str = ""
    rate: Annotated[float, Range(0, 1000)] = 10.0  # windows per second per channel
    raw: bool = False  # forward every reading instead of windows
    qos: int | None = None  # default: the source's qos

    def validate(self) -> list[tuple[str, str]]:
        problems = []
        why = filter_problem(self.topic)
        if why:
            problems.append(("topic", why))
        else:
            try:
                compile_template(self.channel, self.topic)
            except TemplateError as exc:
                problems.append(("channel", str(exc)))
        if not self.raw and not (self.rate > 0 and math.isfinite(self.rate)):
            problems.append(("rate", "must be > 0 (or set raw = true)"))
        if self.qos not in (None, 0, 1):
            problems.append(("qos", "must be 0 or 1"))
        try:
            make_decoder(self.payload, value_path=self.value_path,
                         timestamp_field=self.timestamp_field, options=self.payload_options)
        except UnknownPayloadDecoder as exc:
            problems.append(("payload", str(exc)))
        except Exception as exc:  # a plugin factory rejecting its options
            problems.append(("payload_options", f"{self.payload}: {exc}"))
        return problems


@dataclasses.dataclass(frozen=True)
class MqttSourceConfig:
    host: str = "127.0.0.1"
    port: Annotated[int, Range(1, 65535)] = 1883
    client_id: str = ""  # "" = "edgegw-<gateway id>-<source name>" (stable, so sessions persist)
    username: str = ""
    password: str = ""
    password_file: str = ""  # read at start; keeps the secret out of the config file
    tls: TlsConfig | None = None  # a [sources.tls] table turns TLS on
    protocol: Literal["3.1.1", "5"] = "3.1.1"
    clean_session: bool = False  # false = persistent session: the broker queues while away
    session_expiry: Annotated[int, Range(0, 4_294_967_295)] = 7 * 24 * 3600  # MQTT 5: seconds
    qos: int = 1
    keepalive: Annotated[int, Range(1, 65535)] = 30
    connect_timeout: Annotated[float, Range(0.1, 600)] = 10.0
    backoff: BackoffConfig = BackoffConfig()
    subscriptions: list[SubscriptionConfig] = dataclasses.field(default_factory=list)
    max_batch: Annotated[int, Range(1, 1_000_000)] = 1000  # records held before the sink
    bad_payload_log_interval: Annotated[float, Range(0, 86_400)] = 60.0  # one line/topic/interval
    # a longer payload is a bad payload, never decoded: a sensor reading is a few bytes, and
    # decoding megabytes of JSON would hold the gateway's thread (the tester's files) up
    max_payload_bytes: Annotated[int, Range(1, 268_435_455)] = 65_536

    def validate(self) -> list[tuple[str, str]]:
        problems = []
        if not self.subscriptions:
            problems.append(("subscriptions", "at least one subscription is needed"))
        if self.qos not in (0, 1):
            problems.append(("qos", "must be 0 or 1"))
        if not 0 < self.port < 65536:
            problems.append(("port", "must be 1..65535"))
        if self.max_batch < 1:
            problems.append(("max_batch", "must be >= 1"))
        if self.password and self.password_file:
            problems.append(("password_file", "give password or password_file, not both"))
        if self.keepalive < 1:
            problems.append(("keepalive", "must be >= 1 second"))
        return problems


@dataclasses.dataclass(eq=False)
class _Throttled:
    """One throttle (one rate) and the ledger group of the readings in its open windows."""

    throttle: Throttle
    group: Group


@dataclasses.dataclass
class _Route:
    sub: SubscriptionConfig
    channel: Any  # topic -> channel name
    decode: Decoder
    throttled: _Throttled | None


#: per topic: its route (None: unrouted), channel name and the CRC of the topic (for keys)
_Hit = tuple[_Route | None, str, int]

#: seconds a stop waits for the put in hand and the final flush of the open windows
STOP_FLUSH_S = 5.0
#: retained topics whose last reading taken is kept in the checkpoint (docs/mqtt.md,
#: "Retained messages"): 20 bytes each, written with every put
MAX_RETAINED_TOPICS = 1000
#: topics counted on their own in ``mqtt_bad_payloads_total`` per source: anyone who may
#: publish to the broker can make up topics under a subscription's wildcard, and a series
#: per topic would grow the gateway's memory (and Prometheus's) without bound.  Bad
#: payloads on further topics are counted under ``topic="#other"`` ('#' is never in a
#: published topic's name, so no real topic is counted as it).
MAX_BAD_TOPIC_SERIES = 100
OTHER_TOPICS = "#other"
#: topics reported for the first time (a log line, a GatewayEvent for the hub) per
#: ``bad_payload_log_interval`` at most: a publisher making up a topic per message would
#: otherwise turn each message into a log line and a record spooled for the hub.  The
#: others are summed up in one line when the interval ends (a timer: a burst followed by
#: silence is summed up all the same).
MAX_NEW_REPORTS = 20
#: a retained topic in the checkpoint: 64-bit hash of the topic, CRC-32 of the payload
#: taken last, its payload time (NaN: none)
_RETAINED = struct.Struct("<QId")

#: (CRC-32 of a payload, its payload time) of a message taken on a topic
_Taken = tuple[int, float | None]


def _topic_hash(topic: str) -> int:
    return int.from_bytes(hashlib.blake2b(topic.encode(), digest_size=8).digest(), "little")


def _retained_from_checkpoint(checkpoint: Any) -> dict[int, _Taken]:
    """The retained topics' last readings taken, by topic hash, of a checkpoint written
    by ``MqttSource`` (none in one written before they were kept)."""
    blob = checkpoint.get("retained", b"") if isinstance(checkpoint, dict) else b""
    if not isinstance(blob, bytes) or len(blob) % _RETAINED.size:
        raise CheckpointError("MQTT source checkpoint: bad 'retained' entries")
    return {h: (crc, None if math.isnan(ts) else ts)
            for h, crc, ts in _RETAINED.iter_unpack(blob)}


class MqttSource:
    Config: ClassVar[type] = MqttSourceConfig

    def __init__(self, name: str, config: MqttSourceConfig, context: SourceContext) -> None:
        self.name = name
        self.config = config
        self.context = context
        c = config
        self._ledger = AckLedger(self._restore(context.checkpoint))
        # topic hash -> the last reading taken on a retained topic before the restart
        self._retained_restored = self._restore_retained(context.checkpoint)
        self._throttles: dict[float, _Throttled] = {}
        self._routes: list[tuple[str, _Route]] = []
        for sub in c.subscriptions:
            throttled = None
            if not sub.raw:
                throttled = self._throttles.get(sub.rate)
                if throttled is None:
                    throttled = self._throttles[sub.rate] = _Throttled(
                        Throttle(1.0 / sub.rate), Group())
            route = _Route(sub, compile_template(sub.channel, sub.topic),
                           make_decoder(sub.payload, value_path=sub.value_path,
                                        timestamp_field=sub.timestamp_field,
                                        options=sub.payload_options), throttled)
            self._routes.append((sub.topic, route))
        self._route_cache: dict[str, _Hit] = {}
        self._units: dict[str, str] = {}  # channel -> unit, for windows
        self._pending: list[Record] = []
        self._wake_pump = trio.Event()
        self._pump_deadline = math.inf  # when the pump wakes by itself (wall clock)
        self._flush_wanted = False
        self._stopping = False
        self._taken = trio.Event()  # set whenever the pump takes the pending records
        m = context.metrics
        self._m_messages = m.counter("mqtt_messages_total", "MQTT messages received")
        self._m_bad = m.counter("mqtt_bad_payloads_total",
                                "MQTT messages that did not decode, by topic")
        # the gateway-wide count of bad input, beside the per-topic one
        self._m_source_errors = source_errors(m)
        self._m_unrouted = m.counter("mqtt_unrouted_total",
                                     "MQTT messages matching no subscription")
        self._m_connected = m.gauge("mqtt_connected", "1 while connected to the broker")
        self._m_subscribed = m.gauge(
            "mqtt_subscribed", "1 while connected with every subscription granted by the "
            "broker (SUBACK)")
        self._m_refused = m.counter(
            "mqtt_subscriptions_refused_total", "topic filters the broker refused to "
            "subscribe (SUBACK failure: an ACL, say), at each connection")
        self._refused_seen: tuple[Any, int] = (None, 0)  # (client, its count collected)
        # counters of events, fed by the increase since the last collection (a source
        # rebuilt after a failure starts a new client, whose own counts start at 0)
        self._m_failures = m.counter("mqtt_connect_failures_total",
                                     "failed connection attempts")
        self._failures_seen: tuple[Any, int] = (None, 0)  # (client, its count collected)
        self._m_retained = m.counter(
            "mqtt_retained_repeats_total", "retained messages the broker sent again (at a "
            "resubscription) that were already taken: dropped, not counted twice")
        self._m_unacked = m.gauge("mqtt_unacked",
                                  "QoS 1 messages received, not yet acknowledged")
        self._m_duplicates = m.counter(
            "mqtt_redelivered_dropped_total", "QoS 1 messages the broker sent again that "
            "were already stored or in hand, dropped (acknowledged, not counted twice)")
        self._duplicates_counted = 0  # of the ledger's count, what the counter has
        self._h_window_lag = m.histogram(
            "mqtt_window_lag_seconds", "seconds from a throttle window's end to its hand-over "
            "to the gateway, per window (how late sensor data leaves the source)", AGE_BUCKETS)
        m.add_collector(self._collect)
        # (kind, topic) -> (last log, suppressed)
        self._reported: dict[tuple[str, str], tuple[float, int]] = {}
        self._bad_topics: set[str] = set()  # those with a series of their own
        # this interval's first reports of a topic: (interval start, count, not reported),
        # on the Trio clock; the summary task waits on the event for a first "not reported"
        self._new_reports: tuple[float, int, int] = (-math.inf, 0, 0)
        self._unreported = trio.Event()
        # topic -> (crc32 of the payload, its payload time) of the last message taken:
        # what a retained message sent again at a resubscription is recognised by
        self._last_taken: dict[str, _Taken] = {}
        # The same, of the messages whose records are in a put (sealed): what the
        # checkpoint keeps of the topics seen retained (``_retained``: topic -> its hash).
        # Taken messages wait per group until their group goes into a put.
        self._stored_taken: dict[str, _Taken] = {}
        self._taken_open: dict[Group, dict[str, _Taken]] = {}
        self._taken_next: dict[str, _Taken] = {}  # of the groups in the next put
        self._retained: dict[str, int] = {}
        self._retained_blob = b""
        self._retained_changed = bool(self._retained_restored)
        self.retained_repeats = 0
        self.received = 0
        self._received_counted = 0  # of ``received``, what mqtt_messages_total has
        self.bad = 0
        self.failed = 0  # messages whose handling raised something unexpected
        self.client: TrioMqttClient | None = None

    def _restore_retained(self, checkpoint: Any) -> dict[int, _Taken]:
        if checkpoint is None:
            return {}
        try:
            return _retained_from_checkpoint(checkpoint)
        except CheckpointError as exc:
            log.warning("%s: ignoring the checkpoint's retained topics: %s (a retained "
                        "reading may be taken again)", self.name, exc)
            return {}

    def _restore(self, checkpoint: Any) -> Any:
        """The keys of messages stored before a restart (None: a fresh start)."""
        if checkpoint is None:
            return None
        try:
            return keys_from_checkpoint(checkpoint)
        except CheckpointError as exc:
            log.warning("%s: ignoring the checkpoint: %s (redelivered messages may be "
                        "counted twice)", self.name, exc)
            return None

    # ------------------------------------------------------------ message path (sync)

    def _route(self, topic: str) -> _Hit:
        """The subscription a topic belongs to and its channel name, cached per topic
        (the template and the filter match cost more than the rest of the message)."""
        found: _Hit = (None, "", zlib.crc32(topic.encode()))
        for topic_filter, route in self._routes:
            if matches(topic_filter, topic):
                channel = route.channel(topic)  # TemplateError: not cached, counted
                found = (route, channel, found[2])
                if route.sub.unit:
                    self._units[channel] = route.sub.unit
                break
        if len(self._route_cache) > 100_000:  # topics with ids in them: do not grow forever
            self._route_cache.clear()
        self._route_cache[topic] = found
        return found

    def _on_message(self, msg: paho.MQTTMessage) -> None:
        """One message, a failure boundary: nothing raised here leaves it."""
        self.received += 1
        qos = msg.qos
        key = 0
        group: Group | None = None
        try:
            topic = msg.topic
            route, channel, topic_crc = self._route_cache.get(topic) or self._route(topic)
            if qos:
                key = (msg.mid << 32) | zlib.crc32(msg.payload, topic_crc)
                if msg.dup and self._ledger.redelivered(msg.mid, key):
                    return  # already stored or in hand: acknowledged with the original
            if route is None:  # a retained or overlapping message we did not ask for
                self._m_unrouted.inc(source=self.name)
            else:
                size = len(msg.payload)
                cut = None
                if msg.payload[:1] == OVERSIZE_MARK[:1]:  # cut by the client, unread
                    cut = oversize_length(msg.payload)
                if cut is not None or size > self.config.max_payload_bytes:
                    limit = self.config.max_payload_bytes
                    if cut is not None and cut <= limit:  # MQTT 5 properties over 64 KiB
                        raise PayloadError(f"payload and properties of {cut} bytes, "
                                           "properties over 64 KiB")
                    raise PayloadError(f"payload of {size if cut is None else cut} bytes, "
                                       f"over max_payload_bytes ({limit})")
                value, ts = route.decode(msg.payload)
                if self._taken_already(topic, msg, ts):
                    self.retained_repeats += 1
                    self._m_retained.inc(source=self.name)
                else:
                    if ts is None:
                        ts = time.time()
                    throttled = route.throttled
                    if throttled is None:
                        self._pending.append(
                            SensorReading(self.name, ts, channel, value, route.sub.unit))
                        group = self._ledger.pending
                    else:
                        throttled.throttle.add(channel, value, ts)
                        group = throttled.group
                    taken = self._taken_open.get(group)
                    if taken is None:
                        taken = self._taken_open[group] = {}
                    taken[topic] = self._last_taken[topic]
        except (PayloadError, TemplateError) as exc:
            self._bad_payload(msg, str(exc))
        except Exception as exc:
            self._message_failed(msg, exc)
        if qos:
            self._ledger.add(msg.mid, key, group, not msg.dup)

    def _taken_already(self, topic: str, msg: paho.MQTTMessage, ts: float | None) -> bool:
        """A retained message (the broker sends one at every subscription, so at every
        reconnect) that repeats what this topic last gave: the same payload, or a payload
        time not after the last one taken.  Every message taken is remembered per topic."""
        crc = zlib.crc32(msg.payload)
        last = self._last_taken.get(topic)
        if msg.retain:
            if topic not in self._retained:
                self._retain(topic)
                last = self._last_taken.get(topic)
            if last is not None and (last[0] == crc or (
                    ts is not None and last[1] is not None and ts <= last[1])):
                return True
        if len(self._last_taken) > 100_000 and last is None:  # do not grow forever
            self._last_taken.clear()
            self._stored_taken = {t: v for t, v in self._stored_taken.items()
                                  if t in self._retained}
        self._last_taken[topic] = (crc, ts)
        return False

    def _retain(self, topic: str) -> None:
        """A topic seen retained for the first time: kept in the checkpoint (up to
        MAX_RETAINED_TOPICS), with what was taken on it before a restart, if anything."""
        h = _topic_hash(topic)
        restored = self._retained_restored.pop(h, None)
        if restored is None and (len(self._retained) + len(self._retained_restored)
                                 >= MAX_RETAINED_TOPICS):
            return
        self._retained[topic] = h
        if restored is not None:  # (what this run took on it already is newer)
            self._last_taken.setdefault(topic, restored)
            self._stored_taken.setdefault(topic, restored)
        self._retained_changed = True

    @staticmethod
    def _topic_of(msg: paho.MQTTMessage) -> str:
        try:
            return msg.topic
        except UnicodeDecodeError:
            return repr(msg._topic)  # paho keeps the raw bytes only there

    def _end_interval(self, now: float, stopping: bool = False) -> None:
        """Once ``bad_payload_log_interval`` has passed (or at the stop): the summary line
        of the bad messages on new topics not reported one by one, if any; the next
        interval begins."""
        start, _, quiet = self._new_reports
        if now - start < self.config.bad_payload_log_interval and not stopping:
            return
        if quiet:
            log.warning("%s: %d bad or failed message(s) in the last %.0f s on new topics "
                        "beyond the %d reported one by one: not reported (counted in "
                        "edgegw_mqtt_bad_payloads_total, edgegw_internal_errors_total)",
                        self.name, quiet, now - start, MAX_NEW_REPORTS)
        self._new_reports = (now, 0, 0)

    async def _summarize(self) -> None:
        """Writes an interval's summary line when the interval ends: written at the next
        bad message instead, a burst followed by silence was never summed up."""
        while True:
            start, _, quiet = self._new_reports
            if not quiet:
                self._unreported = trio.Event()
                await self._unreported.wait()
                continue
            await trio.sleep_until(start + self.config.bad_payload_log_interval)
            self._end_interval(trio.current_time())  # (a no-op if a message ended it)

    def _report(self, kind: str, topic: str) -> int | None:
        """Rate limit per kind and topic: None = stay quiet, else how many were quiet.
        Topics not reported before are reported at most ``MAX_NEW_REPORTS`` an interval;
        the rest are summed up when it ends (``_summarize``).  Trio's clock."""
        now = trio.current_time()
        interval = self.config.bad_payload_log_interval
        self._end_interval(now)
        start, count, quiet = self._new_reports
        last, suppressed = self._reported.get((kind, topic), (-math.inf, 0))
        if now - last < interval:
            self._reported[(kind, topic)] = (last, suppressed + 1)
            return None
        if last == -math.inf:  # a topic not reported before
            if count >= MAX_NEW_REPORTS:
                self._new_reports = (start, count, quiet + 1)
                self._unreported.set()
                return None
            count += 1
        self._new_reports = (start, count, quiet)
        if len(self._reported) > 10_000:  # many distinct bad topics: do not grow forever
            self._reported.clear()
        self._reported[(kind, topic)] = (now, 0)
        return suppressed

    def _bad_payload(self, msg: paho.MQTTMessage, reason: str) -> None:
        topic = self._topic_of(msg)
        self.bad += 1
        if topic not in self._bad_topics and len(self._bad_topics) < MAX_BAD_TOPIC_SERIES:
            self._bad_topics.add(topic)
        self._m_bad.inc(source=self.name,
                        topic=topic if topic in self._bad_topics else OTHER_TOPICS)
        self._m_source_errors.inc(source=self.name)
        suppressed = self._report("bad", topic)
        if suppressed is None:
            return
        more = f" ({suppressed} more since the last report)" if suppressed else ""
        log.warning("%s: bad payload on %r skipped: %s%s", self.name, topic, reason, more)
        self._pending.append(GatewayEvent(
            self.name, time.time(), "warning", "mqtt.bad_payload",
            f"bad payload on {topic!r}: {reason}",
            {"topic": topic, "reason": reason, "suppressed": suppressed}))

    def _message_failed(self, msg: paho.MQTTMessage, exc: Exception) -> None:
        """Handling one message raised something unexpected: skip it, count it, say so
        (call it in the except block: the traceback is logged)."""
        topic = self._topic_of(msg)
        self.failed += 1
        reason = f"{type(exc).__name__}: {str(exc)[:200]}"
        report_internal_error(self.context.metrics, "mqtt_message", log,
                              "source %s: message on %r (%d bytes, qos %d) skipped: %s",
                              self.name, topic, len(msg.payload), msg.qos, reason)
        suppressed = self._report("failed", topic)
        if suppressed is None:
            return
        self._pending.append(GatewayEvent(
            self.name, time.time(), "error", "mqtt.message_failed",
            f"message on {topic!r} skipped: {reason}",
            {"topic": topic, "reason": reason, "suppressed": suppressed}))

    def _poll_throttles(self) -> None:
        now = time.time()
        for t in self._throttles.values():
            windows = t.throttle.poll(now)
            if windows:
                self._emit(t, windows)

    def _emit(self, t: _Throttled, windows: Sequence[Any]) -> None:
        """Closed windows join the pending records; their readings' group goes with them."""
        now = time.time()
        self._h_window_lag.observe_many([max(0.0, now - w.t1) for w in windows], source=self.name)
        for w in windows:
            self._pending.append(as_sensor_window(w, self.name, self._units.get(w.channel, "")))
        self._ledger.ready(t.group)
        taken = self._taken_open.pop(t.group, None)
        if taken:
            self._taken_next.update(taken)
        t.group = Group()

    def _next_deadline(self) -> float:
        deadlines = [d for t in self._throttles.values()
                     if (d := t.throttle.deadline) is not None]
        return min(deadlines, default=math.inf)

    def _burst_full(self) -> bool:
        return len(self._pending) >= self.config.max_batch

    def _collect(self) -> None:
        client = self.client
        # increases, not the value: a source rebuilt after a failure counts from 0 again
        self._m_messages.inc(self.received - self._received_counted, source=self.name)
        self._received_counted = self.received
        self._m_unacked.set(self._ledger.unacked, source=self.name)
        self._m_duplicates.inc(self._ledger.duplicates - self._duplicates_counted,
                               source=self.name)
        self._duplicates_counted = self._ledger.duplicates
        if client is not None:
            self._m_connected.set(1 if client.connected else 0, source=self.name)
            self._m_subscribed.set(1 if client.subscriptions_acked else 0, source=self.name)
            seen_client, seen = self._failures_seen
            if seen_client is not client:
                seen = 0
            self._m_failures.inc(client.connect_failures - seen, source=self.name)
            self._failures_seen = (client, client.connect_failures)
            seen_client, seen = self._refused_seen
            if seen_client is not client:
                seen = 0
            self._m_refused.inc(client.subscriptions_refused - seen, source=self.name)
            self._refused_seen = (client, client.subscriptions_refused)

    @property
    def buffered(self) -> int:
        """Records and readings held by the source that the sink does not have yet."""
        return len(self._pending) + sum(t.throttle.pending for t in self._throttles.values())

    @property
    def unacked(self) -> int:
        """QoS 1 messages of this connection not acknowledged yet."""
        return self._ledger.unacked

    @property
    def acked(self) -> int:
        """QoS 1 messages acknowledged (PUBACK sent), ever."""
        return self._ledger.acked

    @property
    def duplicates(self) -> int:
        """Redelivered QoS 1 messages recognised and dropped."""
        return self._ledger.duplicates

    # ------------------------------------------------------------ acknowledging

    def _durable(self, checkpoint: Any) -> None:
        """The gateway says the frame with this checkpoint is in the frame store."""
        self._ledger.durable(checkpoint["put"])
        self._send_acks()

    def _send_acks(self) -> None:
        client = self.client
        ledger = self._ledger
        if client is None or not client.can_send:
            return  # kept: a new connection turns them into orphans (acks.py, I5)
        if ledger.ack_ready:
            client.ack(ledger.acks())
        if ledger.fence_wanted:
            mid = client.fence()
            if mid is not None:
                ledger.fence_sent(mid)

    def _fence_done(self, mid: int) -> None:
        self._ledger.fence_done(mid)
        self._send_acks()  # a fence that closed orphans may want the next one

    # ------------------------------------------------------------ async side

    def _want_flush(self) -> None:
        self._flush_wanted = True
        self._wake_pump.set()

    async def _after_read(self) -> None:
        """After a burst: acknowledge what is due, hand the records to the pump, and wait
        while a full batch is still not taken (the gateway is full)."""
        self._send_acks()
        if self._pending:
            self._want_flush()
        elif self._next_deadline() < self._pump_deadline:
            self._wake_pump.set()  # an idle channel got a reading: its window ends earlier
        while self._burst_full():
            self._taken = trio.Event()
            await self._taken.wait()

    def _seal_taken(self) -> bytes:
        """The messages taken into the put being sealed count as stored: the checkpoint's
        ``retained`` entries (the last reading taken on each topic seen retained, as far
        as the frame store will hold it with this put), re-packed only when they changed."""
        taken = self._taken_open.pop(self._ledger.pending, None)
        if taken:
            self._taken_next.update(taken)
        if self._taken_next:
            retained = self._retained
            self._retained_changed |= any(t in retained for t in self._taken_next)
            self._stored_taken.update(self._taken_next)
            self._taken_next = {}
        if self._retained_changed:
            self._retained_changed = False
            stored = self._stored_taken
            entries = [(h, last) for t, h in self._retained.items()
                       if (last := stored.get(t)) is not None]
            entries += self._retained_restored.items()  # not seen again yet: kept
            self._retained_blob = b"".join(
                _RETAINED.pack(h, crc, math.nan if ts is None else ts)
                for h, (crc, ts) in entries)
        return self._retained_blob

    async def _put(self, put: Callable[..., Awaitable[object]], reports: bool) -> None:
        batch, self._pending = self._pending, []
        self._taken.set()
        retained = self._seal_taken()
        n = self._ledger.seal()
        checkpoint = self._ledger.checkpoint(n)
        if retained:
            checkpoint["retained"] = retained
        await put(batch, checkpoint)
        if not reports:  # a sink that does not report durability: put returning is it
            self._durable(checkpoint)

    async def _pump(self, sink: RecordSink, scope: trio.CancelScope) -> None:
        """Put pending records when the reader asks, close windows at their deadline; at
        a stop, flush the open windows.  Shielded (``scope``): a stop lets the put in hand
        finish rather than cancel it half-way, within STOP_FLUSH_S."""
        on_durable = getattr(sink, "on_durable", None)
        if on_durable is not None:
            on_durable(self._durable)
        put = getattr(sink, "put_whole", None) or sink.put
        reports = on_durable is not None
        with scope:
            while not self._stopping:
                if not self._flush_wanted:
                    self._pump_deadline = deadline = self._next_deadline()
                    self._wake_pump = trio.Event()
                    with trio.move_on_after(max(0.0, deadline - time.time())
                                            if deadline < math.inf else math.inf):
                        await self._wake_pump.wait()
                self._pump_deadline = -math.inf  # busy: no need to wake it
                self._flush_wanted = False
                if self._stopping:
                    break
                self._poll_throttles()
                if self._pending:
                    await self._put(put, reports)
            # The stop: whatever the throttles still hold goes out too.
            now = time.time()
            for t in self._throttles.values():
                windows = t.throttle.flush(now)
                if windows:
                    self._emit(t, windows)
            if self._pending:
                await self._put(put, reports)

    async def _options(self) -> ConnectOptions:
        c = self.config
        password = c.password
        if c.password_file:
            try:
                text = await trio.Path(c.password_file).read_text(encoding="utf-8")
            except OSError as exc:
                raise MqttSourceError(f"mqtt source {self.name!r}: cannot read password_file "
                                      f"{c.password_file!r}: {exc.strerror or exc}") from None
            except UnicodeDecodeError:  # (MQTT passwords are bytes; this file is UTF-8 text)
                raise MqttSourceError(f"mqtt source {self.name!r}: password_file "
                                      f"{c.password_file!r} is not UTF-8 text") from None
            password = text.splitlines()[0].strip() if text.strip() else ""
        ctx = None
        if c.tls is not None:
            t = c.tls
            try:
                ctx = await trio.to_thread.run_sync(
                    lambda: ssl_context(t.ca_file, t.cert_file, t.key_file, t.insecure))
            except (OSError, ssl.SSLError) as exc:
                raise MqttSourceError(f"mqtt source {self.name!r}: bad TLS files "
                                      f"(ca_file / cert_file / key_file): {exc}") from None
        subs = subscriptions_of(
            [(s.topic, c.qos if s.qos is None else s.qos) for s in c.subscriptions])
        return ConnectOptions(
            host=c.host, port=c.port,
            client_id=c.client_id or f"edgegw-{self.context.gateway_id}-{self.name}",
            protocol=c.protocol, clean_session=c.clean_session,
            session_expiry=c.session_expiry, keepalive=c.keepalive,
            connect_timeout=c.connect_timeout, username=c.username, password=password,
            ssl_context=ctx, subscriptions=subs)

    @staticmethod
    async def _run_in(scope: trio.CancelScope, task: Callable[[], Awaitable[None]]) -> None:
        with scope:
            await task()

    async def run(self, sink: RecordSink, *,
                  task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        c = self.config
        options = await self._options()
        self.client = TrioMqttClient(
            options, name=f"mqtt source {self.name!r}", on_message=self._on_message,
            before_read=self._poll_throttles, after_read=self._after_read,
            burst_full=self._burst_full, manual_ack=True, metrics=self.context.metrics,
            max_payload_bytes=c.max_payload_bytes,
            on_session=self._ledger.connected, on_fence=self._fence_done,
            backoff=Backoff(c.backoff.initial, c.backoff.maximum, c.backoff.multiplier))
        pump_scope = trio.CancelScope(shield=True)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._pump, sink, pump_scope)
            summary_scope = trio.CancelScope()
            nursery.start_soon(self._run_in, summary_scope, self._summarize)
            try:
                await self.client.run(task_status=task_status)
            finally:
                summary_scope.cancel()
                self._end_interval(trio.current_time(), stopping=True)
                # Reading has stopped.  The pump finishes the put in hand and flushes the
                # open windows; their messages are not acknowledged (the connection is
                # gone), so the broker sends them again and the checkpoint drops them.
                self._stopping = True
                self._wake_pump.set()
                pump_scope.deadline = trio.current_time() + STOP_FLUSH_S


__all__ = [
    "MAX_BAD_TOPIC_SERIES",
    "MAX_NEW_REPORTS",
    "MAX_RETAINED_TOPICS",
    "OTHER_TOPICS",
    "STOP_FLUSH_S",
    "BackoffConfig",
    "MqttSource",
    "MqttSourceConfig",
    "MqttSourceError",
    "SubscriptionConfig",
    "TlsConfig",
]
