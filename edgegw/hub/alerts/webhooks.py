"""Alert delivery to webhooks: HTTP POST of JSON, retried with exponential backoff.

One task per configured webhook delivers that webhook's events in order; a webhook that
is down delays only its own queue.  A delivery is retried on a connection failure, a
timeout, 408, 429 or any 5xx, with exponential backoff and full jitter
(``edgegw.backoff``), up to ``max_attempts``; any other 4xx is final (the receiver
refused this event; retrying it would not help).  An event given up on is counted and
logged with its alert id -- never retried forever.  Each queue is bounded: when a webhook
has been down long enough to fill it, the oldest undelivered event is dropped and
counted (alerts stay in the alert store and the history API regardless).

The HTTP client is h11 over ``trio.open_tcp_stream``: one request per connection
(``Connection: close``); ``https://`` URLs are verified against the system's CAs or the
webhook's ``ca_file``.  With a ``secret`` every POST is signed: ``X-Edgegw-Signature:
sha256=<hex HMAC-SHA256 of the exact body bytes>``, so a receiver can tell the hub's
events from anybody else's (docs/alerts.md shows how to check it).

In a cluster only the node holding the ``alerts`` lease sends, and only while it holds it:
the sender's ``fence`` says until when (Trio clock) it may, and every attempt -- a retry
too -- checks it last thing before its request leaves (``post_json(send_by=...)``).  A node
waking from a pause past its lease finds it lapsed and sends nothing more (docs/cluster.md,
"Alerts").

Delivery is at least once across a restart and a takeover of the feed: with
``on_outcome`` every event this sender finishes -- delivered, refused, given up, dropped
-- is reported, and its owner marks it in the durable outbox (the hub's history store,
PostgreSQL in a cluster); what is not marked is sent again by the next hub / holder
(``outbox``).  Each POST carries ``X-Edgegw-Event-Id: <alert id>:<event>``, the same on
every resend, so a receiver drops the duplicates at-least-once implies.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import math
import ssl
import urllib.parse
from collections import deque
from collections.abc import Callable, Collection
from typing import Any

import h11
import trio

from edgegw.backoff import Backoff
from edgegw.jsonutil import dumps
from edgegw.metrics import Metrics, report_internal_error
from edgegw.tls import client_context

from .config import WebhookConfig

SIGNATURE_HEADER = "X-Edgegw-Signature"
#: the idempotency key of each POST: ``<alert id>:<event>``, the same on every resend
EVENT_ID_HEADER = "X-Edgegw-Event-Id"

log = logging.getLogger("edgegw.hub.webhooks")

#: statuses worth retrying: the receiver may accept the same request later
RETRY_STATUSES = frozenset({408, 425, 429})


def shown_url(url: str) -> str:
    """A webhook's URL as metric labels and log lines show it: scheme, host and port, and
    for the rest a digest telling the webhooks of one receiver apart -- never the path, the
    query or a user:password, where receivers keep the secret that lets anyone who knows
    the URL post to them (Slack's, Teams' and most chat webhooks are such URLs)."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    try:
        port = f":{parts.port}" if parts.port is not None else ""
    except ValueError:
        port = ""
    shown = f"{parts.scheme}://{host}{port}"
    if url.rstrip("/") != shown:
        shown += "/…#" + hashlib.sha256(url.encode()).hexdigest()[:8]
    return shown


def event_key(event: dict[str, Any]) -> str:
    """An event's identity, per webhook: ``<alert id>:<event>`` (an alert is raised,
    escalated and acknowledged at most once each)."""
    return f"{event.get('alert', {}).get('id')}:{event.get('event')}"


#: what ``on_outcome`` is told: the event is finished with (never sent again)
OUTCOMES = ("delivered", "refused", "attempts", "internal_error", "dropped", "unconfigured")

Outcome = Callable[[str, dict[str, Any], str], None]


class WebhookError(Exception):
    """A delivery attempt failed in a way worth retrying."""


class Fenced(Exception):
    """Not sent: the sender's right to send (the cluster's ``alerts`` lease) had lapsed
    before the request could leave.  Nothing of the request was sent."""


def sign(secret: str, body: bytes) -> str:
    """The signature header's value for ``body``."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


async def post_json(url: str, payload: Any, *, headers: dict[str, str] | None = None,
                    timeout_s: float = 5.0, ssl_context: ssl.SSLContext | None = None,
                    secret: str = "", send_by: float = math.inf) -> int:
    """POST ``payload`` as JSON to ``url``; returns the response status.  Raises
    WebhookError on a connection failure (a certificate not trusted included), a timeout
    or a malformed response; ``Fenced`` when the request could not be written before
    ``send_by`` (Trio clock: a lease's end), checked right before it is (the connection,
    the TLS handshake and the write are cut off at ``send_by`` too; waiting for the answer
    is not)."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"webhook URL must be http(s)://host[:port]/path, got "
                         f"{shown_url(url)!r}")
    secure = parts.scheme == "https"
    target = parts.path or "/"
    if parts.query:
        target += "?" + parts.query
    body = dumps(payload).encode()
    extra = dict(headers or {})
    if secret:
        extra[SIGNATURE_HEADER] = sign(secret, body)
    request = h11.Request(method="POST", target=target, headers=[
        ("Host", parts.netloc),
        ("User-Agent", "edgegw-hub"),
        ("Content-Type", "application/json"),
        ("Content-Length", str(len(body))),
        ("Connection", "close"),
        *extra.items(),
    ])
    conn = h11.Connection(h11.CLIENT)
    try:
        with trio.fail_after(timeout_s):
            stream: trio.abc.Stream | None = None
            sent = False
            # a pause (SIGSTOP, a frozen VM) anywhere up to the write ends here on waking:
            # the deadline is expired before any task resumes
            with trio.CancelScope(deadline=send_by):
                stream = await trio.open_tcp_stream(
                    parts.hostname, parts.port or (443 if secure else 80))
                if secure:
                    stream = trio.SSLStream(stream, ssl_context or client_context(),
                                            server_hostname=parts.hostname,
                                            https_compatible=True)
                if trio.current_time() < send_by:  # the last look before the request leaves
                    await stream.send_all(conn.send(request) + conn.send(h11.Data(data=body))
                                          + conn.send(h11.EndOfMessage()))
                    sent = True
            if not sent:
                if stream is not None:
                    await trio.aclose_forcefully(stream)
                raise Fenced(f"not sent to {parts.netloc}: the right to send lapsed")
            assert stream is not None
            async with stream:
                while True:
                    event = conn.next_event()
                    if event is h11.NEED_DATA:
                        conn.receive_data(bytes(await stream.receive_some(65536)))
                        continue
                    if isinstance(event, h11.Response):
                        return event.status_code
                    if isinstance(event, h11.ConnectionClosed):
                        raise WebhookError("connection closed before a response")
    except trio.TooSlowError:
        raise WebhookError(f"no response within {timeout_s} s") from None
    except (OSError, trio.BrokenResourceError) as exc:
        cause = exc.__cause__ if isinstance(exc.__cause__, ssl.SSLError) else exc
        raise WebhookError(f"cannot reach {shown_url(url)}: {cause}") from None
    except h11.RemoteProtocolError as exc:
        raise WebhookError(f"malformed HTTP response: {exc}") from None


def webhook_contexts(configs: list[WebhookConfig]) -> dict[str, ssl.SSLContext]:
    """A verifying client context per ``https://`` webhook, its CA file read now: a
    ValueError naming the webhook and the file when one cannot be used."""
    contexts = {}
    for c in configs:
        if c.url.startswith("https://"):
            try:
                contexts[c.url] = client_context(c.ca_file)
            except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
                raise ValueError(f"webhook {shown_url(c.url)}: ca_file {c.ca_file!r} cannot "
                                 f"be used: {exc}") from exc
    return contexts


class _Queue:
    def __init__(self, config: WebhookConfig, max_queued: int) -> None:
        self.config = config
        self.items: deque[dict[str, Any]] = deque()
        self.max_queued = max_queued
        self.wakeup = trio.Event()
        self.scope = trio.CancelScope()  # its delivery loop's: cancelled when it is removed

    def wants(self, event: dict[str, Any]) -> bool:
        return (event.get("event") in self.config.events
                and event.get("alert", {}).get("priority") in self.config.priorities)


class WebhookSender:
    """``submit(event)`` from the Trio thread (never blocks); ``run()`` delivers."""

    def __init__(self, configs: list[WebhookConfig], *, metrics: Metrics | None = None,
                 max_queued: int = 1000, backoff_rng: Any = None,
                 fence: Callable[[], float | None] | None = None,
                 on_outcome: Outcome | None = None) -> None:
        """``fence``: until when (Trio clock) this sender may send, None: no longer (the
        cluster's alert feed: its ``alerts`` lease); asked before every attempt.  Without
        one it always may (a single hub).  ``on_outcome(url, event, outcome)``: an event is
        finished with (``OUTCOMES``), called in the Trio thread, never blocking; an event
        fenced off (``lease_lost``) or cut off by a stop is not finished."""
        self._fence = fence
        self._on_outcome = on_outcome
        self._max_queued = max_queued
        self._queues = [_Queue(c, max_queued) for c in configs]
        # one verifying context per https webhook, its CA file read once at start (and on
        # a reload that changes it)
        self._contexts = webhook_contexts(configs)
        self._nursery: trio.Nursery | None = None  # where the delivery loops run
        self._rng = backoff_rng
        metrics = self._metrics = metrics or Metrics()
        self.m_delivered = metrics.counter("hub_webhook_delivered_total",
                                           "alert events delivered to a webhook")
        self.m_attempts = metrics.counter("hub_webhook_attempts_total",
                                          "webhook POST attempts, by outcome")
        self.m_failed = metrics.counter("hub_webhook_failed_total",
                                        "alert events a webhook never accepted, by reason")
        self.m_dropped = metrics.counter("hub_webhook_dropped_total",
                                         "alert events dropped from a full webhook queue")

    def targets(self, event: dict[str, Any]) -> list[str]:
        """The URLs of the webhooks that want ``event``."""
        return [q.config.url for q in self._queues if q.wants(event)]

    def configs(self) -> dict[str, WebhookConfig]:
        return {q.config.url: q.config for q in self._queues}

    def submit(self, event: dict[str, Any], urls: Collection[str] | None = None) -> None:
        """Queue ``event`` for the webhooks that want it (of ``urls`` only, if given: an
        outbox's rows)."""
        for q in self._queues:
            if not q.wants(event) or (urls is not None and q.config.url not in urls):
                continue
            if len(q.items) >= q.max_queued:
                dropped = q.items.popleft()
                self.m_dropped.inc(url=shown_url(q.config.url))
                self._finished(q.config.url, dropped, "dropped")
            q.items.append(event)
            q.wakeup.set()

    def _finished(self, url: str, event: dict[str, Any], outcome: str) -> None:
        if self._on_outcome is None:
            return
        try:
            self._on_outcome(url, event, outcome)
        except Exception:  # a failure boundary: the mark is lost, the event sent again later
            report_internal_error(self._metrics, "webhook", log,
                                  "recording the outcome of alert event %s for %s",
                                  event_key(event), shown_url(url))

    def pending(self) -> int:
        return sum(len(q.items) for q in self._queues)

    def use(self, configs: list[WebhookConfig]) -> str:
        """Deliver to ``configs`` from now on (the hub's SIGHUP): a webhook added gets the
        events from now on; one removed gets nothing more -- its queued events are
        finished as ``unconfigured`` (an event being sent may still arrive); one changed
        (its filters, secret, headers, retries, CA file) keeps its queue and sends the
        next attempt by its new settings.  Raises ValueError before anything changes
        when a CA file cannot be used.  A line for the log."""
        contexts = webhook_contexts(configs)
        old = {q.config.url: q for q in self._queues}
        new = {c.url: c for c in configs}
        added = [url for url in new if url not in old]
        removed = [url for url in old if url not in new]
        changed = [url for url in new if url in old and old[url].config != new[url]]
        self._contexts = contexts
        queues = []
        for config in configs:
            q = old.get(config.url)
            if q is None:
                q = _Queue(config, self._max_queued)
                if self._nursery is not None:
                    self._nursery.start_soon(self._deliver_loop, q)
            q.config = config
            queues.append(q)
        self._queues = queues
        for url in removed:
            q = old[url]
            q.scope.cancel()
            while q.items:
                self._finished(url, q.items.popleft(), "unconfigured")
        parts = [f"{what} {', '.join(shown_url(u) for u in urls)}" for what, urls in (
            ("added", added), ("removed", removed), ("changed", changed)) if urls]
        return "; ".join(parts) if parts else "unchanged"

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            try:
                for q in self._queues:
                    nursery.start_soon(self._deliver_loop, q)
                task_status.started()
                await trio.sleep_forever()
            finally:
                self._nursery = None

    async def _deliver_loop(self, q: _Queue) -> None:
        with q.scope:
            await self._deliver_queue(q)

    async def _deliver_queue(self, q: _Queue) -> None:
        while True:
            while not q.items:
                await q.wakeup.wait()
                q.wakeup = trio.Event()
            event = q.items[0]
            try:
                outcome = await self._deliver(q.config, event)
            except Exception:
                # A failure boundary: a bug or an unexpected error while delivering one
                # event fails that delivery (counted), never the hub or the next events.
                report_internal_error(self._metrics, "webhook", log,
                                      "delivering alert %s event %s to %s",
                                      event.get("alert", {}).get("id"), event.get("event"),
                                      shown_url(q.config.url))
                self.m_failed.inc(url=shown_url(q.config.url), reason="internal_error")
                outcome = "internal_error"
            if outcome is not None:
                self._finished(q.config.url, event, outcome)
            if q.items and q.items[0] is event:  # unless dropped meanwhile by a full queue
                q.items.popleft()

    async def _deliver(self, config: WebhookConfig, event: dict[str, Any]) -> str | None:
        """The event's outcome (``OUTCOMES``), None when fenced off (not finished: the
        next holder of the lease sends it)."""
        headers = {**config.headers, EVENT_ID_HEADER: event_key(event)}
        backoff = Backoff(config.backoff_initial_s, config.backoff_max_s, rng=self._rng)
        alert_id = event.get("alert", {}).get("id")
        for attempt in range(1, config.max_attempts + 1):
            send_by = math.inf
            if self._fence is not None:
                until = self._fence()
                send_by = -math.inf if until is None else until
            try:
                status = await post_json(config.url, event, headers=headers,
                                         timeout_s=config.timeout_s,
                                         ssl_context=self._contexts.get(config.url),
                                         secret=config.secret, send_by=send_by)
            except Fenced:
                # another node holds the lease now: what this one has not sent is not its
                # to send (docs/cluster.md, "Alerts": webhooks across a takeover)
                log.warning("webhook %s: alert %s event %s not sent: the alerts lease "
                            "lapsed", shown_url(config.url), alert_id, event.get("event"))
                self.m_attempts.inc(outcome="fenced")
                self.m_failed.inc(url=shown_url(config.url), reason="lease_lost")
                return None
            except WebhookError as exc:
                outcome, retry, reason = "error", True, str(exc)
            else:
                if 200 <= status < 300:
                    self.m_attempts.inc(outcome="ok")
                    self.m_delivered.inc(url=shown_url(config.url))
                    return "delivered"
                retry = status >= 500 or status in RETRY_STATUSES
                outcome, reason = f"http_{status}", f"HTTP {status}"
            self.m_attempts.inc(outcome=outcome)
            if not retry:
                log.warning("webhook %s refused alert %s event %s: %s (not retried)",
                            shown_url(config.url), alert_id, event.get("event"), reason)
                self.m_failed.inc(url=shown_url(config.url), reason="refused")
                return "refused"
            if attempt < config.max_attempts:
                delay = backoff.next_delay()
                log.info("webhook %s: attempt %d for alert %s failed (%s); retry in %.2f s",
                         shown_url(config.url), attempt, alert_id, reason, delay)
                await trio.sleep(delay)
        log.warning("webhook %s: giving up on alert %s event %s after %d attempts",
                    shown_url(config.url), alert_id, event.get("event"), config.max_attempts)
        self.m_failed.inc(url=shown_url(config.url), reason="attempts")
        return "attempts"
