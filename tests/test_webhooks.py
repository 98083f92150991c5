"""Webhook delivery against a real HTTP server on a free port that fails the first requests."""

from __future__ import annotations

import functools
import itertools
import json
import math
import socket
import sqlite3
import ssl
from collections.abc import Callable
from typing import Any

import h11
import pytest
import trio
import trustme

from edgegw.hub.alerts import (
    SIGNATURE_HEADER,
    AlertEngine,
    AlertRuleConfig,
    AlertsConfig,
    AlertService,
    Fenced,
    WebhookConfig,
    WebhookSender,
    post_json,
    sign,
)
from edgegw.hub.live import LiveState
from edgegw.metrics import Metrics
from edgegw.records import PartResult


class HookServer:
    """A tiny real HTTP server: answers ``fail_first`` requests with ``fail_status``, then 204.
    Remembers every request (time, path, headers, decoded JSON body)."""

    def __init__(self, fail_first: int = 0, fail_status: int = 503,
                 tls: ssl.SSLContext | None = None) -> None:
        self.tls = tls  # set: an https receiver
        self.fail_first = fail_first
        self.fail_status = fail_status
        self.requests: list[dict[str, Any]] = []
        self.accepted: list[dict[str, Any]] = []
        self.port = 0

    async def handle(self, tcp: trio.SocketStream) -> None:
        stream: trio.abc.Stream = tcp
        if self.tls is not None:
            stream = trio.SSLStream(tcp, self.tls, server_side=True, https_compatible=True)
            try:
                await stream.do_handshake()
            except trio.BrokenResourceError:  # a client that did not trust us
                await tcp.aclose()
                return
        conn = h11.Connection(h11.SERVER)
        request: h11.Request | None = None
        body = b""
        async with stream:
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    conn.receive_data(await stream.receive_some(65536))
                elif isinstance(event, h11.Request):
                    request = event
                elif isinstance(event, h11.Data):
                    body += event.data
                elif isinstance(event, h11.EndOfMessage):
                    break
                else:
                    return
            assert request is not None
            entry = {"t": trio.current_time(), "path": request.target.decode(),
                     "headers": {k.decode(): v.decode() for k, v in request.headers},
                     "json": json.loads(body), "raw": body}
            self.requests.append(entry)
            status = self.fail_status if len(self.requests) <= self.fail_first else 204
            if status == 204:
                self.accepted.append(entry)
            await stream.send_all(conn.send(h11.Response(status_code=status, headers=[
                ("Content-Length", "0"), ("Connection", "close")])) + conn.send(h11.EndOfMessage()))

    async def serve(self, nursery: trio.Nursery) -> str:
        listeners = await nursery.start(
            functools.partial(trio.serve_tcp, self.handle, 0, host="127.0.0.1"))
        self.port = listeners[0].socket.getsockname()[1]
        scheme = "https" if self.tls is not None else "http"
        return f"{scheme}://127.0.0.1:{self.port}/hooks/alerts?src=hub"


class TopOfRange:
    """A random source whose draws are always the top of the range: full jitter's upper
    bound, so the backoff's growth is visible in the timings."""

    def uniform(self, a: float, b: float) -> float:
        return b


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def wait_for(cond: Callable[[], bool], limit_s: float = 10.0) -> None:
    # Polling is the honest way to wait on another component's counters from outside.
    with trio.fail_after(limit_s):
        while not cond():
            await trio.sleep(0.01)


def event(alert_id: str, priority: str = "P0", kind: str = "raised") -> dict[str, Any]:
    return {"event": kind, "ts": 1.0, "alert": {"id": alert_id, "priority": priority}}


async def test_post_json_returns_the_status_and_sends_json() -> None:
    server = HookServer()
    async with trio.open_nursery() as nursery:
        url = await server.serve(nursery)
        status = await post_json(url, {"a": 1}, headers={"X-Token": "s3cret"})
        assert status == 204
        (req,) = server.requests
        assert req["path"] == "/hooks/alerts?src=hub" and req["json"] == {"a": 1}
        assert req["headers"]["content-type"] == "application/json"
        assert req["headers"]["x-token"] == "s3cret"
        nursery.cancel_scope.cancel()


async def test_failed_deliveries_are_retried_with_growing_backoff_until_accepted() -> None:
    server = HookServer(fail_first=4, fail_status=503)
    metrics = Metrics()
    async with trio.open_nursery() as nursery:
        url = await server.serve(nursery)
        sender = WebhookSender([WebhookConfig(url=url, max_attempts=8, backoff_initial_s=0.02,
                                              backoff_max_s=1.0)], metrics=metrics,
                               backoff_rng=TopOfRange())
        await nursery.start(sender.run)
        sender.submit(event("a1"))
        sender.submit(event("a2"))
        # the receiver has both, and the sender has read both answers
        await wait_for(lambda: len(server.accepted) == 2 and sender.m_delivered.total() == 2)
        # a1 failed four times, then was accepted; a2 only after a1 (in order)
        assert [r["json"]["alert"]["id"] for r in server.requests] == ["a1"] * 5 + ["a2"]
        assert sender.m_attempts.get(outcome="http_503") == 4
        assert sender.m_delivered.total() == 2 and sender.pending() == 0
        # exponential backoff: with the jitter pinned to the top of its range the waits
        # are 0.02, 0.04, 0.08, 0.16 s
        gaps = [b["t"] - a["t"] for a, b in itertools.pairwise(server.requests[:5])]
        for n, gap in enumerate(gaps):
            assert 0.02 * 2**n <= gap < 0.02 * 2**n + 1.0
        nursery.cancel_scope.cancel()


async def test_client_errors_are_not_retried_and_attempts_are_bounded() -> None:
    refusing = HookServer(fail_first=100, fail_status=400)
    flaky = HookServer(fail_first=100, fail_status=502)
    async with trio.open_nursery() as nursery:
        url_refusing = await refusing.serve(nursery)
        url_flaky = await flaky.serve(nursery)
        sender = WebhookSender([
            WebhookConfig(url=url_refusing, backoff_initial_s=0.01, backoff_max_s=0.02),
            WebhookConfig(url=url_flaky, max_attempts=3, backoff_initial_s=0.01,
                          backoff_max_s=0.02),
        ])
        await nursery.start(sender.run)
        sender.submit(event("b1"))
        await wait_for(lambda: sender.m_failed.total() == 2)
        assert len(refusing.requests) == 1  # 400: the receiver refused it; final
        assert len(flaky.requests) == 3  # 502 three times: given up, not forever
        assert sender.m_failed.get(url=url_refusing, reason="refused") == 1
        assert sender.m_failed.get(url=url_flaky, reason="attempts") == 1
        nursery.cancel_scope.cancel()


async def test_a_dead_webhook_does_not_hold_up_another_and_filters_apply() -> None:
    good = HookServer()
    async with trio.open_nursery() as nursery:
        url = await good.serve(nursery)
        dead = f"http://127.0.0.1:{free_port()}/nobody-listens"
        sender = WebhookSender([
            WebhookConfig(url=dead, max_attempts=50, backoff_initial_s=0.5, backoff_max_s=5),
            WebhookConfig(url=url, priorities=["P0", "P1"], events=["raised", "escalated"]),
        ])
        await nursery.start(sender.run)
        sender.submit(event("c1", "P0"))
        sender.submit(event("c2", "P3"))  # not for the second webhook
        sender.submit(event("c1", "P0", "acknowledged"))  # not for the second webhook
        sender.submit(event("c3", "P1", "escalated"))
        await wait_for(lambda: len(good.accepted) == 2, limit_s=5)
        assert [(r["json"]["alert"]["id"], r["json"]["event"]) for r in good.accepted] == [
            ("c1", "raised"), ("c3", "escalated")]
        assert sender.m_attempts.get(outcome="error") >= 1  # the dead one keeps trying
        nursery.cancel_scope.cancel()


async def test_a_full_queue_drops_the_oldest_and_counts_it() -> None:
    dead = f"http://127.0.0.1:{free_port()}/"
    sender = WebhookSender([WebhookConfig(url=dead)], max_queued=3)
    for i in range(5):
        sender.submit(event(f"d{i}"))
    assert sender.pending() == 3 and sender.m_dropped.total() == 2


async def test_alerts_from_live_state_reach_the_webhook() -> None:
    server = HookServer(fail_first=1)
    async with trio.open_nursery() as nursery:
        url = await server.serve(nursery)
        config = AlertsConfig(
            rules=[AlertRuleConfig(name="run", kind="consecutive_fails", priority="P0", count=3)],
            webhooks=[WebhookConfig(url=url, backoff_initial_s=0.01, backoff_max_s=0.05)],
        )
        sender = WebhookSender(config.webhooks)
        await nursery.start(sender.run)
        engine = AlertEngine(config, lambda t, d: None, sink=sender.submit)
        state = LiveState(lambda t, d: None, alerts=engine)
        state.on_records("ate-3", 1, [
            PartResult("t", 10.0 + i, "L", "W", 1, 4, str(i), i, 0, 6, 6, False)
            for i in range(3)], now=20.0)
        await wait_for(lambda: len(server.accepted) == 1)
        payload = server.accepted[0]["json"]
        assert payload["event"] == "raised"
        assert payload["alert"]["rule"] == "run" and payload["alert"]["context"]["site"] == 4
        assert len(server.requests) == 2  # the first attempt got a 503
        nursery.cancel_scope.cancel()


def https_receiver(tmp_path: Any) -> tuple[HookServer, str]:
    """An https receiver with a certificate from a fresh CA; (server, the CA's PEM file)."""
    ca = trustme.CA()
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(ctx)
    ca_file = str(tmp_path / "webhook-ca.pem")
    ca.cert_pem.write_to_path(ca_file)
    return HookServer(tls=ctx), ca_file


async def test_https_webhooks_are_verified_and_signed(tmp_path: Any) -> None:
    server, ca_file = https_receiver(tmp_path)
    secret = "webhook-secret-0123456789"
    async with trio.open_nursery() as nursery:
        url = await server.serve(nursery)
        sender = WebhookSender([WebhookConfig(url=url, ca_file=ca_file, secret=secret)])
        await nursery.start(sender.run)
        sender.submit(event("a-1"))
        await wait_for(lambda: len(server.accepted) == 1)
        (req,) = server.accepted
        assert req["json"]["alert"]["id"] == "a-1"
        # the receiver's check: HMAC-SHA256 of the exact body bytes with the shared secret
        signature = req["headers"][SIGNATURE_HEADER.lower()]
        assert signature == sign(secret, req["raw"])
        assert signature.startswith("sha256=") and len(signature) == 7 + 64
        assert signature != sign("another-secret-0123456", req["raw"])
        nursery.cancel_scope.cancel()


async def test_an_https_receiver_with_an_untrusted_certificate_gets_nothing(
        tmp_path: Any) -> None:
    server, _ = https_receiver(tmp_path)
    metrics = Metrics()
    async with trio.open_nursery() as nursery:
        url = await server.serve(nursery)
        # no ca_file: the system's CAs, which never signed the receiver's certificate
        sender = WebhookSender([WebhookConfig(url=url, max_attempts=1)], metrics=metrics)
        await nursery.start(sender.run)
        sender.submit(event("a-1"))
        await wait_for(lambda: metrics.as_dict().get("hub_webhook_failed_total"))
        assert server.requests == []
        assert metrics.as_dict()["hub_webhook_attempts_total"] == {"outcome=error": 1}
        nursery.cancel_scope.cancel()


async def test_a_request_that_cannot_leave_before_its_send_by_is_not_sent_at_all() -> None:
    server = HookServer()
    async with trio.open_nursery() as nursery:
        url = await server.serve(nursery)
        with pytest.raises(Fenced):
            await post_json(url, {"a": 1}, send_by=trio.current_time())
        assert await post_json(url, {"a": 2}, send_by=trio.current_time() + 60) == 204
        assert [r["json"] for r in server.requests] == [{"a": 2}]
        nursery.cancel_scope.cancel()


async def test_a_sender_whose_lease_lapsed_sends_nothing_more_not_even_a_retry() -> None:
    """The cluster's alert feed sends under its ``alerts`` lease (``fence``: until when it
    may).  A feed paused past its lease wakes with a retry due and events queued, while
    another node holds the lease and sends; the woken one sends none of them (before, it
    went on delivering its queue until its lease keeper noticed)."""
    server = HookServer(fail_first=1, fail_status=503)
    lease_until = [math.inf]
    async with trio.open_nursery() as nursery:
        url = await server.serve(nursery)
        sender = WebhookSender([WebhookConfig(url=url, max_attempts=5, backoff_initial_s=0.3,
                                              backoff_max_s=0.3)],
                               backoff_rng=TopOfRange(), fence=lambda: lease_until[0])
        await nursery.start(sender.run)
        sender.submit(event("f1"))
        await wait_for(lambda: sender.m_attempts.get(outcome="http_503") == 1)
        # slept through its renewals: the lease's validity, counted from the last renewal
        # sent, is over by the time the retry is due
        lease_until[0] = trio.current_time()
        sender.submit(event("f2"))
        await wait_for(lambda: sender.m_failed.get(url=url, reason="lease_lost") == 2)
        assert [r["json"]["alert"]["id"] for r in server.requests] == ["f1"]  # the 503 only
        assert sender.m_delivered.total() == 0 and sender.pending() == 0
        nursery.cancel_scope.cancel()


def _fails(lot: str, n: int = 3) -> list[PartResult]:
    """``n`` failed parts in a row on site 4: trips a ``consecutive_fails`` rule of ``n``
    (P1 in these tests: never escalated, one event per alert)."""
    return [PartResult("t", 10.0 + i, lot, "W", 1, 4, str(i), i, 0, 6, 6, False)
            for i in range(n)]


async def _run_hub(config: AlertsConfig, path: Any, clock: Callable[[], float],
                   body: Callable[[AlertService, LiveState], Any]) -> None:
    """A hub's alert service on ``path`` from open to a stop (cancelled: as at shutdown)."""
    service = AlertService(config, lambda t, d: None, path, clock=clock)
    await service.open()
    state = LiveState(lambda t, d: None, alerts=service.engine)
    async with trio.open_nursery() as nursery:
        await nursery.start(service.run, state)
        await body(service, state)
        nursery.cancel_scope.cancel()


async def _no_pending(service: AlertService, state: LiveState) -> None:
    assert service.webhooks.pending() == 0


async def test_an_event_undelivered_when_the_hub_stopped_is_delivered_after_its_restart(
        tmp_path: Any) -> None:
    """At least once across a restart (docs/alerts.md, "Delivery across a restart or a
    takeover"): the receiver is down while the hub raises an alert and retries it; the hub
    stops.  Before the webhook outbox the restarted hub restored the alert (not raised
    again) and nobody ever sent it; now it is sent after the restart, under the same
    ``X-Edgegw-Event-Id``, and once delivered not again at the next restart."""
    server = HookServer(fail_first=10**9)  # down: 503 to everything
    now = [1000.0]
    async with trio.open_nursery() as nursery:
        url = await server.serve(nursery)
        config = AlertsConfig(
            rules=[AlertRuleConfig(name="run", kind="consecutive_fails", priority="P1", count=3)],
            webhooks=[WebhookConfig(url=url, max_attempts=1000, backoff_initial_s=0.02,
                                    backoff_max_s=0.05)])
        path = tmp_path / "history.sqlite3"

        async def raise_and_fail(service: AlertService, state: LiveState) -> None:
            state.on_records("ate-3", 1, _fails("L1"), now=20.0)
            await wait_for(lambda: len(server.requests) >= 2)  # tried and retried

        await _run_hub(config, path, lambda: now[0], raise_and_fail)
        assert server.accepted == []
        server.fail_first = 0  # the receiver is back

        async def delivered(service: AlertService, state: LiveState) -> None:
            await wait_for(lambda: len(server.accepted) == 1)
            # the replay after a restart trips the same key again: restored, not re-sent
            state.on_records("ate-3", 1, _fails("L1"), now=20.0)
            await service.wait_persisted()
            await wait_for(lambda: service.webhooks.pending() == 0)

        await _run_hub(config, path, lambda: now[0], delivered)
        (got,) = server.accepted
        assert (got["json"]["event"], got["json"]["alert"]["rule"]) == ("raised", "run")
        alert_id = got["json"]["alert"]["id"]
        assert {r["headers"]["x-edgegw-event-id"] for r in server.requests} == {
            f"{alert_id}:raised"}

        await _run_hub(config, path, lambda: now[0], _no_pending)  # delivered: not again
        assert len(server.accepted) == 1
        nursery.cancel_scope.cancel()


async def test_an_undelivered_event_older_than_max_age_is_not_sent_after_a_restart(
        tmp_path: Any) -> None:
    """The resend is bounded: an event queued more than the webhook's ``max_age_s`` before
    the restart is given up (``reason="expired"``), not sent hours late to a pager."""
    server = HookServer(fail_first=10**9)
    now = [1000.0]
    async with trio.open_nursery() as nursery:
        url = await server.serve(nursery)
        config = AlertsConfig(
            rules=[AlertRuleConfig(name="run", kind="consecutive_fails", priority="P1", count=3)],
            webhooks=[WebhookConfig(url=url, max_attempts=1000, backoff_initial_s=0.02,
                                    backoff_max_s=0.05, max_age_s=600.0)])
        path = tmp_path / "history.sqlite3"

        async def raise_and_fail(service: AlertService, state: LiveState) -> None:
            state.on_records("ate-3", 1, _fails("L1"), now=20.0)
            await wait_for(lambda: len(server.requests) >= 1)

        await _run_hub(config, path, lambda: now[0], raise_and_fail)
        server.fail_first = 0
        now[0] += 601.0

        async def expired(service: AlertService, state: LiveState) -> None:
            assert service.webhooks.pending() == 0
            assert service.webhooks.m_failed.get(url=url, reason="expired") == 1

        await _run_hub(config, path, lambda: now[0], expired)
        await _run_hub(config, path, lambda: now[0], _no_pending)  # marked: not again
        assert server.accepted == []
        nursery.cancel_scope.cancel()


async def test_an_event_sent_while_the_history_store_cannot_be_written_is_counted(
        tmp_path: Any) -> None:
    """The one gap of a single hub (docs/alerts.md): ``history.sqlite3`` cannot be written
    (here another process holds its write lock; a full disk alike).  The event is still
    sent at once, and the missing outbox row is counted per webhook
    (``edgegw_hub_webhook_unrecorded_total``) and logged with its event id -- a restart
    then has nothing to send again."""
    server = HookServer()
    async with trio.open_nursery() as nursery:
        url = await server.serve(nursery)
        config = AlertsConfig(
            rules=[AlertRuleConfig(name="run", kind="consecutive_fails", priority="P1", count=3)],
            webhooks=[WebhookConfig(url=url)])
        path = tmp_path / "history.sqlite3"
        await _run_hub(config, path, lambda: 1000.0, _no_pending)  # (the store exists)
        other = sqlite3.connect(path, isolation_level=None)
        other.execute("BEGIN EXCLUSIVE")  # writers get "database is locked"

        async def unwritable(service: AlertService, state: LiveState) -> None:
            state.on_records("ate-3", 1, _fails("L1"), now=20.0)
            # sent all the same, once the write failed (SQLite's lock wait: 5 s)
            await wait_for(lambda: len(server.accepted) == 1, limit_s=60)
            await service.wait_persisted()
            counter = service.metrics.counter("hub_webhook_unrecorded_total")
            assert counter.get(url=url) == 1
            assert service.metrics.counter("hub_history_store_errors_total").total() == 1

        try:
            await _run_hub(config, path, lambda: 1000.0, unwritable)
        finally:
            other.execute("ROLLBACK")
            other.close()
        await _run_hub(config, path, lambda: 1000.0, _no_pending)  # nothing to send again
        assert len(server.accepted) == 1
        nursery.cancel_scope.cancel()
