"""Webhook delivery against a real HTTP server on a free port that fails the first requests."""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import logging
import math
import sqlite3
import ssl
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import h11
import pytest
import trio
import trustme
from ports import free_port

from edgegw.hub.alerts import (
    MAX_HELD_ROWS,
    SIGNATURE_HEADER,
    AlertEngine,
    AlertRuleConfig,
    AlertsConfig,
    AlertService,
    Fenced,
    WebhookConfig,
    WebhookSender,
    post_json,
    shown_url,
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
        assert sender.m_failed.get(url=shown_url(url_refusing), reason="refused") == 1
        assert sender.m_failed.get(url=shown_url(url_flaky), reason="attempts") == 1
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


async def test_a_reload_adds_removes_and_changes_webhooks_while_they_deliver() -> None:
    """``use`` (the hub's SIGHUP): a webhook removed while it retries sends nothing more --
    what it had queued is finished ``unconfigured`` (its outbox rows are done with); one
    added gets the events from then on; one changed keeps its queue and filters by its
    new settings."""
    down, kept, added = HookServer(fail_first=10**6), HookServer(), HookServer()
    outcomes: list[tuple[str, str, str]] = []
    async with trio.open_nursery() as nursery:
        down_url, kept_url, added_url = [await h.serve(nursery) for h in (down, kept, added)]
        sender = WebhookSender([
            WebhookConfig(url=down_url, max_attempts=1000, backoff_initial_s=0.01,
                          backoff_max_s=0.05),
            WebhookConfig(url=kept_url, priorities=["P0"]),
        ], on_outcome=lambda url, ev, outcome: outcomes.append(
            (url, ev["alert"]["id"], outcome)))
        await nursery.start(sender.run)
        for i in range(3):
            sender.submit(event(f"a{i}", "P1"))
        await wait_for(lambda: len(down.requests) >= 3)  # retrying the first, the rest wait

        line = sender.use([WebhookConfig(url=kept_url, priorities=["P0", "P1"]),
                           WebhookConfig(url=added_url)])
        assert line == (f"added {shown_url(added_url)}; removed {shown_url(down_url)}; "
                        f"changed {shown_url(kept_url)}")
        assert sorted(outcomes) == [(down_url, f"a{i}", "unconfigured") for i in range(3)]
        # a try already on the wire when it was removed still reaches the server (counted
        # after the removal, once, in a suite run): the count is taken once it has landed
        await trio.sleep(0.2)
        tried = len(down.requests)
        sender.submit(event("b1", "P1"))  # the changed filter takes P1 now
        await wait_for(lambda: len(kept.accepted) == 1 and len(added.accepted) == 1)
        assert [r["json"]["alert"]["id"] for r in kept.accepted + added.accepted] == [
            "b1", "b1"]
        await trio.sleep(0.2)
        assert len(down.requests) == tried  # the removed one's loop is gone
        assert sender.pending() == 0
        nursery.cancel_scope.cancel()


async def test_a_reload_naming_a_ca_file_that_cannot_be_used_changes_nothing(
        tmp_path: Path) -> None:
    good = HookServer()
    async with trio.open_nursery() as nursery:
        url = await good.serve(nursery)
        sender = WebhookSender([WebhookConfig(url=url)])
        await nursery.start(sender.run)
        with pytest.raises(ValueError, match=r"no-such-ca\.pem"):
            sender.use([WebhookConfig(url="https://127.0.0.1:9/h",
                                      ca_file=str(tmp_path / "no-such-ca.pem"))])
        sender.submit(event("c1"))
        await wait_for(lambda: len(good.accepted) == 1)
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


async def test_a_webhook_url_s_secrets_are_in_no_metric_and_no_log_line(
        caplog: pytest.LogCaptureFixture) -> None:
    """Chat webhooks (Slack, Teams) keep the secret that lets anyone post in the URL's path,
    others in its query or user info.  /metrics (read by Prometheus with its own token)
    and the log show a webhook by scheme, host and port and a digest of the rest."""
    caplog.set_level(logging.DEBUG, logger="edgegw.hub.webhooks")
    server = HookServer()
    metrics = Metrics()
    async with trio.open_nursery() as nursery:
        base = await server.serve(nursery)
        ok = base.replace("/hooks/alerts?src=hub", "/services/T0/B0/SECRET-PATH?token=SECRET-Q")
        dead = f"http://bot:SECRET-PW@127.0.0.1:{free_port()}/services/T0/B1/SECRET-PATH2"
        sender = WebhookSender([
            WebhookConfig(url=ok),
            WebhookConfig(url=dead, max_attempts=2, backoff_initial_s=0.01,
                          backoff_max_s=0.02)], metrics=metrics)
        await nursery.start(sender.run)
        sender.submit(event("a-1"))
        await wait_for(lambda: sender.m_failed.get(url=shown_url(dead), reason="attempts") == 1
                       and sender.m_delivered.get(url=shown_url(ok)) == 1)
        nursery.cancel_scope.cancel()
    assert server.requests[0]["path"] == "/services/T0/B0/SECRET-PATH?token=SECRET-Q"
    assert shown_url(ok) != shown_url(dead) and shown_url(ok).startswith("http://127.0.0.1:")
    exposed = metrics.render_prometheus()
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "cannot reach" in logged and "giving up" in logged
    for text in (exposed, logged):
        assert "SECRET" not in text and "bot:" not in text


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
        await wait_for(lambda: sender.m_failed.get(url=shown_url(url), reason="lease_lost") == 2)
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
            assert service.webhooks.m_failed.get(url=shown_url(url), reason="expired") == 1

        await _run_hub(config, path, lambda: now[0], expired)
        await _run_hub(config, path, lambda: now[0], _no_pending)  # marked: not again
        assert server.accepted == []
        nursery.cancel_scope.cancel()


@pytest.mark.usefixtures("short_lock_wait")
async def test_an_event_sent_while_the_history_store_cannot_be_written_is_counted(
        tmp_path: Any) -> None:
    """``history.sqlite3`` cannot be written (here another process holds its write lock
    to the end).  The event is still sent at once, and its outbox row, kept in memory, is
    counted per webhook (``edgegw_hub_webhook_unrecorded_total``); delivered, it is not
    sent again after a restart."""
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
            # sent all the same, once the write failed (the lock wait: 1 s here)
            await wait_for(lambda: len(server.accepted) == 1, limit_s=60)
            await service.wait_persisted()
            counter = service.metrics.counter("hub_webhook_unrecorded_total")
            assert counter.get(url=shown_url(url)) == 1
            assert service.metrics.counter("hub_history_store_errors_total").total() == 1

        try:
            await _run_hub(config, path, lambda: 1000.0, unwritable)
        finally:
            other.execute("ROLLBACK")
            other.close()
        await _run_hub(config, path, lambda: 1000.0, _no_pending)  # nothing to send again
        assert len(server.accepted) == 1
        nursery.cancel_scope.cancel()


class StoreFault:
    """A running hub's ``history.sqlite3`` stops taking writes (``block``) and takes them
    again (``unblock``), for real: ``locked``, another process holds its write lock (the
    hub gives up after its lock wait, ``LOCK_WAIT_S``); ``disk_full``, the file system it
    is on (a tmpfs mounted for the test: root only, skipped otherwise) has no byte left."""

    def __init__(self, cause: str, directory: Path) -> None:
        self.cause = cause
        self.path = directory / "history.sqlite3"
        self._other: sqlite3.Connection | None = None

    def block(self) -> None:
        if self.cause == "locked":
            self._other = sqlite3.connect(self.path, isolation_level=None)
            self._other.execute("BEGIN EXCLUSIVE")  # writers get "database is locked"
            return
        with open(self.path.parent / "filler", "wb", buffering=0) as f:
            for size in (65536, 512, 1):  # to the last byte
                with contextlib.suppress(OSError):
                    while True:
                        f.write(b"\0" * size)

    def unblock(self) -> None:
        if self._other is not None:
            self._other.execute("ROLLBACK")
            self._other.close()
            self._other = None
        (self.path.parent / "filler").unlink(missing_ok=True)

    def rows(self) -> list[tuple[str, str | None]]:
        """The webhook outbox as stored: ``(event key, outcome)``."""
        with contextlib.closing(sqlite3.connect(self.path)) as db:
            return db.execute("SELECT event_key, outcome FROM webhook_outbox").fetchall()


@pytest.fixture
def short_lock_wait(monkeypatch: pytest.MonkeyPatch) -> None:
    """A write to a locked ``history.sqlite3`` gives up after 1 s, not SQLite's 5 s
    (``LOCK_WAIT_S``): what a test asserts of a failed write is the same, it waits less
    for it.  Not for a test that times the wait itself (a hub's stop)."""
    monkeypatch.setattr("edgegw.hub.history_store.LOCK_WAIT_S", 1.0)


@pytest.fixture(params=["locked", "disk_full"])
def store_fault(request: pytest.FixtureRequest, tmp_path: Path,
                short_lock_wait: None) -> Iterator[StoreFault]:
    if request.param == "locked":
        fault = StoreFault("locked", tmp_path)
        yield fault
        fault.unblock()
        return
    mnt = tmp_path / "small"
    mnt.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs (needs root): {done.stderr.strip()}")
    try:
        fault = StoreFault("disk_full", mnt)
        yield fault
        fault.unblock()
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


async def test_an_event_whose_outbox_row_could_not_be_written_is_still_sent_after_a_restart(
        store_fault: StoreFault) -> None:
    """The webhook outbox's promise holds while ``history.sqlite3`` cannot be written
    (docs/alerts.md, "Delivery across a restart or a takeover").  An alert is acknowledged
    while the store takes no writes and the receiver is down: the event is sent and
    retried all the same, its outbox row held in memory
    (``edgegw_hub_webhook_unrecorded_pending`` 1).  The store takes writes again: the row
    is written (the gauge 0).  The hub stops before the receiver is back; after its restart
    the event is delivered, once, under its ``X-Edgegw-Event-Id``.  Before, the row was
    never written and the event never sent again (an acknowledgement, unlike a raise, no
    replay of the frames brings back)."""
    server = HookServer(fail_first=10**9)  # down: 503 to everything
    async with trio.open_nursery() as nursery:
        url = await server.serve(nursery)
        config = AlertsConfig(
            rules=[AlertRuleConfig(name="run", kind="consecutive_fails", priority="P1", count=3)],
            # retried for minutes (not given up before the restart), a few times a second
            webhooks=[WebhookConfig(url=url, events=["acknowledged"], max_attempts=1000,
                                    backoff_initial_s=0.1, backoff_max_s=0.3)])
        alert_id = ""

        async def ack_while_unwritable(service: AlertService, state: LiveState) -> None:
            nonlocal alert_id
            state.on_records("ate-3", 1, _fails("L1"), now=20.0)
            await service.wait_persisted()  # stored (no webhook wants "raised")
            (alert_id,) = service.engine.alerts
            held = service.metrics.gauge("hub_webhook_unrecorded_pending")
            store_fault.block()
            service.engine.ack(alert_id, "alice", 30.0)
            await service.wait_persisted()
            assert service.metrics.counter("hub_history_store_errors_total").total() == 1
            await wait_for(lambda: len(server.requests) >= 2, limit_s=30)  # sent, retried
            assert held.get() == 1
            store_fault.unblock()
            await wait_for(lambda: held.get() == 0, limit_s=30)
            assert store_fault.rows() == [(f"{alert_id}:acknowledged", None)]

        await _run_hub(config, store_fault.path, lambda: 1000.0, ack_while_unwritable)
        assert server.accepted == []
        server.fail_first = 0  # the receiver is back

        async def delivered(service: AlertService, state: LiveState) -> None:
            await wait_for(lambda: len(server.accepted) == 1)
            await wait_for(lambda: service.webhooks.pending() == 0)

        await _run_hub(config, store_fault.path, lambda: 1000.0, delivered)
        await _run_hub(config, store_fault.path, lambda: 1000.0, _no_pending)  # not again
        (got,) = server.accepted
        assert (got["json"]["event"], got["json"]["alert"]["acked_by"]) == (
            "acknowledged", "alice")
        assert {r["headers"]["x-edgegw-event-id"] for r in server.requests} == {
            f"{alert_id}:acknowledged"}
        assert store_fault.rows() == [(f"{alert_id}:acknowledged", "delivered")]
        nursery.cancel_scope.cancel()


async def test_outbox_rows_held_in_memory_are_bounded_finished_ones_forgotten_first(
        tmp_path: Path) -> None:
    """Memory stays bounded however long the store cannot be written: beyond
    ``MAX_HELD_ROWS`` the oldest row whose event is finished is forgotten first (unwritten,
    it only kept a replayed event from being sent twice), the oldest unfinished one only
    when none is.  What is held is written when the store takes writes, the gauge back to
    0."""
    url = "http://127.0.0.1:9/hook"
    service = AlertService(AlertsConfig(webhooks=[WebhookConfig(url=url)]), lambda t, d: None,
                           tmp_path / "history.sqlite3")
    outbox = service.outbox
    pending = service.metrics.gauge("hub_webhook_unrecorded_pending")

    def rows(first: int, n: int) -> list[tuple[str, str, str, float]]:
        return [(url, f"a{i}:raised", json.dumps(event(f"a{i}")), float(i))
                for i in range(first, first + n)]

    assert len(outbox.hold(rows(0, MAX_HELD_ROWS))) == MAX_HELD_ROWS
    assert outbox.hold(rows(0, 1)) == set()  # held already: not queued twice
    outbox.record(url, event("a5"), "delivered")
    assert pending.get() == MAX_HELD_ROWS - 1
    outbox.hold(rows(MAX_HELD_ROWS, 1))  # a5, finished, makes room
    held = outbox.held_unfinished()
    assert len(held) == MAX_HELD_ROWS and (url, "a5:raised") not in held
    outbox.hold(rows(MAX_HELD_ROWS + 1, 1))  # none finished: the oldest goes
    assert outbox.held_unfinished()[0] == (url, "a1:raised")
    assert pending.get() == MAX_HELD_ROWS

    await service.open()
    try:
        await outbox.flush()
    finally:
        await service.aclose()
    assert outbox.held_unfinished() == [] and pending.get() == 0
    with contextlib.closing(sqlite3.connect(tmp_path / "history.sqlite3")) as db:
        stored = {k for (k,) in db.execute("SELECT event_key FROM webhook_outbox"
                                           " WHERE outcome IS NULL")}
    assert stored == {f"a{i}:raised" for i in range(1, MAX_HELD_ROWS + 2)} - {"a5:raised"}


@pytest.mark.usefixtures("short_lock_wait")
async def test_every_failed_write_of_the_outbox_rows_held_counts_as_a_history_store_error(
        tmp_path: Path) -> None:
    """The webhook outbox writes the rows it holds in memory again and again while
    ``history.sqlite3`` takes no writes (another process holds its write lock): each try
    that fails counts in ``edgegw_hub_history_store_errors_total``, as the alert service's
    retries do, so a store that stays unwritable does not look like one failure.  Before,
    the outbox's failed tries were not counted at all."""
    url = "http://127.0.0.1:9/hook"
    service = AlertService(AlertsConfig(webhooks=[WebhookConfig(url=url)]), lambda t, d: None,
                           tmp_path / "history.sqlite3")
    errors = service.metrics.counter("hub_history_store_errors_total")
    await service.open()
    fault = StoreFault("locked", tmp_path)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(service.outbox.run)  # the outbox alone: only its writes
            fault.block()
            service.outbox.hold([(url, "a1:raised", json.dumps(event("a1")), 1.0)])
            # each try waits out the lock wait (1 s here); tried again after 1 s, then 2 s
            await wait_for(lambda: errors.total() >= 2, limit_s=60)
            fault.unblock()
            await wait_for(lambda: service.outbox.held_unfinished() == [], limit_s=60)
            nursery.cancel_scope.cancel()
    finally:
        fault.unblock()
        await service.aclose()
    assert fault.rows() == [("a1:raised", None)]
