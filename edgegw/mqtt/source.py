"""The MQTT source: sensor topics -> SensorWindow records (throttled) or SensorReading.

Each configured subscription maps a topic filter to a channel-name template
(``edgegw.mqtt.topics``) and a payload decoder (``edgegw.mqtt.payloads``).  A channel is
throttled to its UI rate (``edgegw.throttle``: one window per interval with last, min,
max, mean and count) or, with ``raw = true``, forwarded reading by reading.

Backpressure: the reader reads a burst of messages, then hands the records it made to
``sink.put`` before it reads again.  While the sink is full, ``put`` awaits, the socket is
not read, and TCP pushes back to the broker, which queues the messages (configure it to
keep them: see docs/mqtt.md).  At most ``max_batch`` records are held here.

Delivery: paho acknowledges a QoS 1 message once it is decoded into the throttle or the
batch, before the sink has it; a gateway *crash* can therefore lose what is in the open
windows (one interval) and the current batch.  A broker or network failure loses nothing
with QoS 1 and a persistent session (the broker redelivers what was not acknowledged).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import ssl
import time
from typing import Annotated, Any, ClassVar, Literal

import paho.mqtt.client as paho
import trio

from ..backoff import Backoff
from ..config import Range
from ..records import GatewayEvent, Record, SensorReading
from ..sources import RecordSink, SourceContext
from ..throttle import Throttle, as_sensor_window
from .client import ConnectOptions, TrioMqttClient, ssl_context, subscriptions_of
from .payloads import Decoder, PayloadError, UnknownPayloadDecoder, make_decoder
from .topics import TemplateError, check_filter, compile_template

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
        why = check_filter(self.topic)
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


@dataclasses.dataclass
class _Route:
    sub: SubscriptionConfig
    channel: Any  # topic -> channel name
    decode: Decoder
    throttle: Throttle | None


class MqttSource:
    Config: ClassVar[type] = MqttSourceConfig

    def __init__(self, name: str, config: MqttSourceConfig, context: SourceContext) -> None:
        self.name = name
        self.config = config
        self.context = context
        c = config
        self._throttles: dict[float, Throttle] = {}
        self._routes: list[tuple[str, _Route]] = []
        for sub in c.subscriptions:
            throttle = None
            if not sub.raw:
                throttle = self._throttles.setdefault(sub.rate, Throttle(1.0 / sub.rate))
            route = _Route(sub, compile_template(sub.channel, sub.topic),
                           make_decoder(sub.payload, value_path=sub.value_path,
                                        timestamp_field=sub.timestamp_field,
                                        options=sub.payload_options), throttle)
            self._routes.append((sub.topic, route))
        self._route_cache: dict[str, tuple[_Route, str] | None] = {}
        self._units: dict[str, str] = {}  # channel -> unit, for windows
        self._pending: list[Record] = []
        self._flush_lock = trio.Lock()
        self._tick = trio.Event()
        self._ticker_deadline = math.inf  # when the ticker wakes by itself
        m = context.metrics
        self._m_messages = m.counter("mqtt_messages_total", "MQTT messages received")
        self._m_bad = m.counter("mqtt_bad_payloads_total",
                                "MQTT messages that did not decode, by topic")
        # the gateway-wide count of bad input, beside the per-topic one
        self._m_source_errors = m.counter("source_errors", "bad input seen by sources")
        self._m_unrouted = m.counter("mqtt_unrouted_total",
                                     "MQTT messages matching no subscription")
        self._m_connected = m.gauge("mqtt_connected", "1 while connected to the broker")
        self._m_failures = m.gauge("mqtt_connect_failures", "failed connection attempts")
        m.add_collector(self._collect)
        self._bad_logged: dict[str, tuple[float, int]] = {}  # topic -> (last log, suppressed)
        self.received = 0
        self.bad = 0
        self.client: TrioMqttClient | None = None

    # ------------------------------------------------------------ message path (sync)

    def _route(self, topic: str) -> tuple[_Route, str] | None:
        """The subscription a topic belongs to and its channel name, cached per topic
        (the template and the filter match cost more than the rest of the message)."""
        try:
            return self._route_cache[topic]
        except KeyError:
            pass
        found = None
        for topic_filter, route in self._routes:
            if paho.topic_matches_sub(topic_filter, topic):
                channel = route.channel(topic)  # TemplateError: not cached, counted
                found = (route, channel)
                if route.sub.unit:
                    self._units[channel] = route.sub.unit
                break
        if len(self._route_cache) > 100_000:  # topics with ids in them: do not grow forever
            self._route_cache.clear()
        self._route_cache[topic] = found
        return found

    def _on_message(self, msg: paho.MQTTMessage) -> None:
        self.received += 1
        topic = msg.topic
        try:
            hit = self._route(topic)
            if hit is None:  # a retained or overlapping message we did not ask for
                self._m_unrouted.inc(source=self.name)
                return
            route, channel = hit
            value, ts = route.decode(msg.payload)
        except (PayloadError, TemplateError) as exc:
            self._bad_payload(topic, str(exc))
            return
        if route.throttle is None:
            self._pending.append(SensorReading(self.name, time.time() if ts is None else ts,
                                               channel, value, route.sub.unit))
        else:
            route.throttle.add(channel, value, time.time() if ts is None else ts)

    def _bad_payload(self, topic: str, reason: str) -> None:
        self.bad += 1
        self._m_bad.inc(source=self.name, topic=topic)
        self._m_source_errors.inc(source=self.name)
        now = time.monotonic()
        last, suppressed = self._bad_logged.get(topic, (-math.inf, 0))
        if now - last < self.config.bad_payload_log_interval:
            self._bad_logged[topic] = (last, suppressed + 1)
            return
        self._bad_logged[topic] = (now, 0)
        more = f" ({suppressed} more since the last report)" if suppressed else ""
        log.warning("%s: bad payload on %r skipped: %s%s", self.name, topic, reason, more)
        self._pending.append(GatewayEvent(
            self.name, time.time(), "warning", "mqtt.bad_payload",
            f"bad payload on {topic!r}: {reason}",
            {"topic": topic, "reason": reason, "suppressed": suppressed}))

    def _poll_throttles(self) -> None:
        now = time.time()
        for throttle in self._throttles.values():
            for w in throttle.poll(now):
                self._pending.append(as_sensor_window(w, self.name, self._units.get(w.channel, "")))

    def _next_deadline(self) -> float:
        deadlines = [d for t in self._throttles.values() if (d := t.deadline) is not None]
        return min(deadlines, default=math.inf)

    def _wake_ticker(self) -> None:
        """After a burst: wake the ticker only if a window now ends before it would wake
        (a channel that was idle got a reading), not once per burst."""
        if self._next_deadline() < self._ticker_deadline:
            self._tick.set()

    def _burst_full(self) -> bool:
        return len(self._pending) >= self.config.max_batch

    def _collect(self) -> None:
        client = self.client
        self._m_messages.set(self.received, source=self.name)
        if client is not None:
            self._m_connected.set(1 if client.connected else 0, source=self.name)
            self._m_failures.set(client.connect_failures, source=self.name)

    @property
    def buffered(self) -> int:
        """Records and readings held by the source that the sink does not have yet."""
        return len(self._pending) + sum(t.pending for t in self._throttles.values())

    # ------------------------------------------------------------ async side

    async def _flush(self, sink: RecordSink) -> None:
        async with self._flush_lock:
            if self._pending:
                batch, self._pending = self._pending, []
                try:
                    await sink.put(batch)
                except BaseException:
                    # Cancelled while the sink was full (the connection died meanwhile,
                    # or shutdown): the batch is not lost, it goes out first next time.
                    # (A put cancelled half-way may repeat records: at least once.)
                    self._pending[:0] = batch
                    raise

    async def _ticker(self, sink: RecordSink) -> None:
        """Emit windows at their deadline when no message arrives to do it."""
        while True:
            self._ticker_deadline = deadline = self._next_deadline()
            self._tick = trio.Event()
            if deadline < math.inf:
                with trio.move_on_after(max(0.0, deadline - time.time())):
                    await self._tick.wait()
            else:
                await self._tick.wait()
            self._ticker_deadline = -math.inf  # busy: no need to wake it
            self._poll_throttles()
            await self._flush(sink)

    async def _options(self) -> ConnectOptions:
        c = self.config
        password = c.password
        if c.password_file:
            try:
                text = await trio.Path(c.password_file).read_text()
            except OSError as exc:
                raise MqttSourceError(f"mqtt source {self.name!r}: cannot read password_file "
                                      f"{c.password_file!r}: {exc.strerror or exc}") from None
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

    async def run(self, sink: RecordSink, *,
                  task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        c = self.config
        options = await self._options()

        async def after_read() -> None:
            self._wake_ticker()
            await self._flush(sink)

        self.client = TrioMqttClient(
            options, name=f"mqtt source {self.name!r}", on_message=self._on_message,
            before_read=self._poll_throttles, after_read=after_read,
            burst_full=self._burst_full,
            backoff=Backoff(c.backoff.initial, c.backoff.maximum, c.backoff.multiplier))
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(self.client.run)
                nursery.start_soon(self._ticker, sink)
                task_status.started()
        finally:
            # Whatever the throttles still hold goes out on a clean stop.
            with trio.CancelScope(shield=True), trio.move_on_after(5):
                now = time.time()
                for throttle in self._throttles.values():
                    for w in throttle.flush(now):
                        self._pending.append(
                            as_sensor_window(w, self.name, self._units.get(w.channel, "")))
                await self._flush(sink)
