"""Alerts in a hub cluster (docs/cluster.md, "Alerts"): the live ``alert/...`` topics have
one publisher cluster-wide (the node holding the ``alerts`` lease, alertfeed.py), webhooks
are sent by it only, ``gateway_offline`` runs on the owner of the gateway's ``gw:<id>``
partition from Redis presence.  End to end with real PostgreSQL, Redis, HAProxy, node and
gateway processes, a real webhook receiver; the feed's sans-IO view alone first."""

from __future__ import annotations

import json
import os
import urllib.request
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import pytest
import trio
from cluster_redis import fresh_prefix, redis_server  # noqa: F401  (the fixture)

from edgegw.hub.alerts import AlertsConfig, WebhookConfig
from edgegw.hub.cluster import TopicPublisher
from edgegw.hub.cluster.alertfeed import AlertFeed, AlertView, wanted_events
from edgegw.hub.cluster.bus import ClusterBus
from edgegw.hub.cluster.pgstore import ClusterStore
from edgegw.metrics import Metrics
from tests.cluster_haproxy import HAProxy, NodeSet, haproxy_binary, node_toml
from tests.cluster_live import LiveFollower
from tests.ports import free_port
from tests.processes import get_json, spawn, wait_for
from tests.shared_data import METIS, stdf_path

# ---------------------------------------------------------------- sans-IO


def _alert(i: int, **kw: Any) -> dict[str, Any]:
    return {"id": f"a{i}", "priority": "P0", "rule": "y", "key": f"k{i}", "raised_at": i,
            "acknowledged": False, "escalated": False, **kw}


def test_alert_view_announces_each_event_once_and_keeps_fifty_per_topic() -> None:
    view = AlertView()
    topic, events, fed = view.update(_alert(1), "", 10.0)
    assert topic == "alert/P0/y" and [e["event"] for e in events] == ["raised"] and fed == "r"
    # the same row again (an occurrence counted): nothing new to announce
    assert view.update(_alert(1, occurrences=2), fed, 11.0)[1:] == ([], "r")
    # escalated, then acknowledged on some node: one event each, in the single hub's order
    _, events, fed = view.update(_alert(1, escalated=True, acknowledged=True), fed, 12.0)
    assert [e["event"] for e in events] == ["escalated", "acknowledged"] and fed == "rea"
    assert events[1]["alert"]["acknowledged"] is True
    assert wanted_events(_alert(2, acknowledged=True)) == "ra"
    for i in range(2, 60):
        view.update(_alert(i), "", 13.0)
    snap = view.snapshot("alert/P0/y")
    assert snap is not None and snap["priority"] == "P0" and snap["rule"] == "y"
    assert [a["id"] for a in snap["alerts"]] == [f"a{i}" for i in range(59, 9, -1)]
    assert view.topics() == ["alert/P0/y"] and view.snapshot("alert/P1/y") is None


# ---------------------------------------------------------------- end to end

pytestmark_e2e = pytest.mark.skipif(
    haproxy_binary() is None and os.environ.get("CI") != "true",
    reason="haproxy not installed (scripts/test.sh installs it as root)")

ALERTS_TOML = """\
[alerts]
escalate_after_s = 600

[[alerts.rules]]
name = "wafer-yield"
kind = "wafer_yield"
priority = "P0"
threshold = 0.99
min_parts = 50

[[alerts.rules]]
name = "gw-offline"
kind = "gateway_offline"
priority = "P1"
offline_s = 2

[[alerts.rules]]
name = "gw-trouble"
kind = "gateway_event"
priority = "P2"

[[alerts.webhooks]]
url = "http://127.0.0.1:@HOOK@/hook"
max_attempts = 3
backoff_initial_s = 0.1

[gateways.ate-1]
token = "tok-ate-1"
"""

GATEWAY_TOML = """\
[gateway]
id = "ate-1"
token = "tok-ate-1"
hub_url = "ws://127.0.0.1:@LB@/ws/gateway"
state_dir = "@STATE@"

[batch]
max_records = 300
max_delay_ms = 50

[uplink]
heartbeat_s = 1.0
backoff_initial_s = 0.1
backoff_max_s = 1.0

[[sources]]
name = "tester"
type = "simulated"
parts_per_second = 200
max_parts = 400
seed = 5
sites = 4
wafers = 1
tests_per_part = 4
lots = 1
lot_id = "LA00"
"""


class WebhookReceiver:
    """A real HTTP server taking the hub's POSTs (``status`` to each: 200, or a 503 while
    "down"), keeping the events it accepted and every request's headers."""

    def __init__(self) -> None:
        self.port = free_port()
        self.status = 200
        self.events: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        listeners = await trio.open_tcp_listeners(self.port, host="127.0.0.1")
        task_status.started()
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, stream: trio.SocketStream) -> None:
        async with stream:
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = await stream.receive_some(65536)
                if not chunk:
                    return
                data += chunk
            head, _, body = data.partition(b"\r\n\r\n")
            length = next(int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length:"))
            while len(body) < length:
                chunk = await stream.receive_some(65536)
                if not chunk:
                    return
                body += chunk
            self.headers.append({
                k.strip().lower(): v.strip() for k, _, v in
                (line.decode().partition(":") for line in head.split(b"\r\n")[1:])})
            status = self.status
            if status == 200:
                self.events.append(json.loads(body))
            await stream.send_all(f"HTTP/1.1 {status} X\r\nContent-Length: 0\r\n"
                                  "Connection: close\r\n\r\n".encode())

    def count(self) -> Counter[tuple[str, str]]:
        return Counter((e["event"], e["alert"]["id"]) for e in self.events)


def _alerts_in(view: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {a["id"]: a for topic, snap in view.items() if topic.startswith("alert/")
            for a in (snap or {}).get("alerts", [])}


def _ack(port: int, alert_id: str) -> None:
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/api/alerts/{alert_id}/ack",
        data=json.dumps({"user": "maria"}).encode(), method="POST",
        headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=5) as r:
        assert json.loads(r.read())["alert"]["acknowledged"] is True


def _feed_holders(nodes: NodeSet) -> list[int]:
    return [i for i in nodes.alive()
            if get_json(f"http://127.0.0.1:{nodes.ports[i]}/api/stats")
            ["cluster"]["alert_feed"]["holding"]]


async def _until(predicate: Any, within_s: float, what: str) -> None:
    """Until ``predicate()`` (evaluated in the Trio thread: it reads the followers)."""
    with trio.move_on_after(within_s):
        while not predicate():
            await trio.sleep(0.2)
        return
    raise AssertionError(f"not within {within_s} s: {what}")

@dataclass
class FeedHolders:
    """Two nodes' alert feeds over one Redis prefix and one PostgreSQL (the webhook
    receiver running beside them); ``start_first`` runs the first under ``first``."""

    nursery: trio.Nursery
    stores: list[ClusterStore]
    feeds: list[AlertFeed]
    first: trio.CancelScope = field(default_factory=trio.CancelScope)

    def start_first(self) -> None:
        async def run_first() -> None:
            with self.first:
                await self.feeds[0].run()
        self.nursery.start_soon(run_first)


@asynccontextmanager
async def two_feed_holders(dsn: str, redis_url: str, hook: WebhookReceiver,
                           config: AlertsConfig, partitions: int = 4,
                           metrics: list[Metrics] | None = None
                           ) -> AsyncIterator[FeedHolders]:
    prefix = fresh_prefix()
    stores = [ClusterStore(dsn, f"n{i}", partitions=partitions) for i in range(2)]
    for store in stores:
        await store.open()
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(hook.run)
            feeds = []
            for i, store in enumerate(stores):
                bus = ClusterBus(redis_url, prefix, f"n{i}", partitions=partitions)
                await nursery.start(bus.run)
                feeds.append(AlertFeed(bus, store, config,
                                       lambda src, bus=bus: TopicPublisher(bus, src),
                                       lease_ttl_s=2.0, poll_s=0.05,
                                       metrics=metrics[i] if metrics else None))
            yield FeedHolders(nursery, stores, feeds)
            nursery.cancel_scope.cancel()
    finally:
        for store in stores:
            await store.close()



async def test_an_event_announced_but_not_delivered_is_delivered_by_the_next_feed_holder(
        pg_dsn: str, redis_server: Any) -> None:  # noqa: F811
    """At-least-once across a takeover of the alert feed (docs/cluster.md, "Webhooks
    across a takeover"): the holder announces a raised alert and marks it ``fed`` while
    the webhook is down, and is stopped before it delivers; the next holder finds the
    event fed, so before the outbox nobody ever sent it.  Now the next holder sends it,
    under the same ``X-Edgegw-Event-Id``."""
    hook = WebhookReceiver()
    hook.status = 503  # down: every attempt is retried
    config = AlertsConfig(webhooks=[WebhookConfig(
        url=f"http://127.0.0.1:{hook.port}/hook", max_attempts=1000,
        backoff_initial_s=0.05, backoff_max_s=0.1)])
    async with two_feed_holders(pg_dsn, redis_server.url, hook, config) as held:
        nursery, stores, feeds, first = held.nursery, held.stores, held.feeds, held.first
        held.start_first()
        await _until(lambda: feeds[0].holding, 20, "the first node holds the feed")
        await stores[0].save_alerts(1, 1, [{
            "id": "w1", "priority": "P0", "rule": "y", "raised_at": 100.0,
            "acknowledged": False}])
        await _until(lambda: feeds[0].announced == 1 and len(hook.headers) >= 2, 20,
                     "announced, and refused by the receiver (retried)")
        with trio.fail_after(20):  # marked fed (written after the announcement)
            while await stores[1].pending_alerts():
                await trio.sleep(0.05)
        first.cancel()  # stopped before delivering: gives the lease back
        await _until(lambda: not feeds[0].holding, 20, "the first node stopped")
        hook.status = 200
        nursery.start_soon(feeds[1].run)
        await _until(lambda: len(hook.events) == 1, 20, "the next holder delivers it")
        (got,) = hook.events
        assert (got["event"], got["alert"]["id"]) == ("raised", "w1")
        assert {h["x-edgegw-event-id"] for h in hook.headers} == {"w1:raised"}
        assert feeds[1].announced == 0  # fed: sent again from the outbox, not announced


def _outcomes(dsn: str) -> dict[str, str | None]:
    with psycopg.connect(dsn) as conn:
        return dict(conn.execute(  # type: ignore[arg-type]
            "SELECT event_key, outcome FROM edgegw_webhook_outbox").fetchall())


async def test_an_event_re_announced_after_being_delivered_is_not_sent_again(
        pg_dsn: str, redis_server: Any) -> None:  # noqa: F811
    """docs/alerts.md, "Delivery across a restart or a takeover": the holder delivers a
    raised alert's webhook and stops before its ``fed`` is written (the mark undone in
    PostgreSQL here, as a lost write leaves it).  The next holder announces the event
    again on the alert topic -- ``fed`` says it was not -- but does not send it again:
    its outbox row is there, with an outcome.  A later event is sent (the queue is not
    stuck), and each event reached the receiver once."""
    hook = WebhookReceiver()
    config = AlertsConfig(webhooks=[WebhookConfig(
        url=f"http://127.0.0.1:{hook.port}/hook", max_attempts=3, backoff_initial_s=0.05)])
    async with two_feed_holders(pg_dsn, redis_server.url, hook, config) as held:
        nursery, stores, feeds, first = held.nursery, held.stores, held.feeds, held.first
        held.start_first()
        await _until(lambda: feeds[0].holding, 20, "the first node holds the feed")
        alert = {"id": "w1", "priority": "P0", "rule": "y", "raised_at": 100.0,
                 "acknowledged": False}
        await stores[0].save_alerts(1, 1, [alert])
        await _until(lambda: len(hook.events) == 1, 20, "delivered")
        with trio.fail_after(20):  # its outcome and its fed written
            while (_outcomes(pg_dsn).get("w1:raised") != "delivered"
                   or await stores[1].pending_alerts()):
                await trio.sleep(0.05)
        first.cancel()
        await _until(lambda: not feeds[0].holding, 20, "the first node stopped")
        with psycopg.connect(pg_dsn) as conn:  # the fed mark lost
            conn.execute("UPDATE edgegw_alerts SET fed = '', pending = true")
        nursery.start_soon(feeds[1].run)
        await _until(lambda: feeds[1].announced == 1, 20, "announced again")
        await stores[0].save_alerts(1, 1, [{**alert, "id": "w2"}])
        await _until(lambda: len(hook.events) == 2, 20, "the next event delivered")
        # (one queue per webhook, in order: w1 queued again would have come first)
        assert [e["alert"]["id"] for e in hook.events] == ["w1", "w2"]
        assert [h["x-edgegw-event-id"] for h in hook.headers] == ["w1:raised",
                                                                  "w2:raised"]


@pytestmark_e2e
async def test_alert_topics_webhooks_and_gateway_offline_once_cluster_wide(
        tmp_path: Path, pg_dsn: str, redis_server: Any) -> None:  # noqa: F811
    hook = WebhookReceiver()
    text = node_toml(tmp_path / "data", pg_dsn, redis_server.url,
                     f"alerts{os.getpid()}x{trio.current_time():.0f}",
                     cluster="snapshot_interval_s = 0.5",
                     rest=ALERTS_TOML.replace("@HOOK@", str(hook.port)))
    async with trio.open_nursery() as nursery:
        await nursery.start(hook.run)
        with NodeSet(tmp_path / "nodes", 2, lambda i: text) as nodes:
            await trio.to_thread.run_sync(lambda: nodes.start_all(timeout=90))
            with HAProxy(tmp_path / "lb", nodes.backends) as lb:
                await trio.to_thread.run_sync(lb.wait_states, {"n0": "UP", "n1": "UP"})
                # a dashboard client on each node, directly: each node serves the topics
                followers = [LiveFollower(port, ["alert/#"], f"c{i}")
                             for i, port in enumerate(nodes.ports)]
                for f in followers:
                    nursery.start_soon(f.run)
                gw_dir = tmp_path / "gw"
                gw_dir.mkdir()
                cfg = gw_dir / "gateway.toml"
                # beside the tester, a directory holding a file no decoder takes (STDF V3):
                # the gateway abandons it and says so in a source_corrupt GatewayEvent
                inbox = gw_dir / "inbox"
                inbox.mkdir()
                v3 = bytearray(stdf_path(METIS).read_bytes())
                v3[5] = 3  # the FAR's STDF_VER
                (inbox / "old.stdf").write_bytes(bytes(v3))
                cfg.write_text(GATEWAY_TOML.replace("@LB@", str(lb.port))
                               .replace("@STATE@", str(gw_dir / "state"))
                               + f'\n[[sources]]\nname = "old"\ntype = "stdf"\n'
                                 f'paths = ["{inbox}"]\n')
                gateway = spawn("gateway", "--config", str(cfg), log=gw_dir / "gateway.log")
                try:
                    # 1. a record-driven alert: raised once, live on both nodes
                    def yield_alert() -> str | None:
                        ids = [set(a for a, v in _alerts_in(f.views).items()
                                   if v["rule"] == "wafer-yield") for f in followers]
                        common = ids[0] & ids[1]
                        return min(common) if common else None
                    await _until(yield_alert, 60, "a wafer-yield alert on both nodes")
                    alert_id = yield_alert()
                    assert alert_id is not None
                    # one publisher, one sender
                    assert len(await trio.to_thread.run_sync(_feed_holders, nodes)) == 1
                    # 2. acknowledged on node 1: live on both nodes, one webhook event
                    t_ack = trio.current_time()
                    await trio.to_thread.run_sync(_ack, nodes.ports[1], alert_id)
                    await _until(lambda: all(_alerts_in(f.views)[alert_id]["acknowledged"]
                                             for f in followers), 20, "ack seen live")
                    # (a measurement, printed with -s; the bound above is the test)
                    print(f"ack on node-1 -> seen live on both nodes: "
                          f"{trio.current_time() - t_ack:.2f} s")
                    await _until(lambda: hook.count()[("acknowledged", alert_id)] >= 1, 20,
                                 "the ack's webhook")
                    # 3. what the gateway reports of itself (kind gateway_event): raised by
                    # the owner of its gw:<id> partition, once, live on both nodes
                    def trouble(f: LiveFollower) -> list[dict[str, Any]]:
                        return [a for a in _alerts_in(f.views).values()
                                if a["rule"] == "gw-trouble"]
                    await _until(lambda: all(trouble(f) for f in followers), 40,
                                 "a gateway_event alert on both nodes")
                    (corrupt,) = trouble(followers[1])
                    assert corrupt["context"]["code"] == "source_corrupt"
                    assert corrupt["context"]["gateway_id"] == "ate-1"
                    assert "STDF_VER 3" in corrupt["message"]
                finally:
                    gateway.terminate()
                    gateway.wait(15)
                # 4. the gateway went away: gateway_offline, raised once cluster-wide
                def offline_alerts(f: LiveFollower) -> list[dict[str, Any]]:
                    return [a for a in _alerts_in(f.views).values()
                            if a["rule"] == "gw-offline"]
                await _until(lambda: all(offline_alerts(f) for f in followers), 40,
                             "gateway_offline on both nodes")
                offline = offline_alerts(followers[0])
                assert len(offline) == 1 and offline[0]["context"]["gateway_id"] == "ate-1"
                offline_id = offline[0]["id"]
                await _until(lambda: hook.count()[("raised", offline_id)] >= 1, 20,
                             "gateway_offline's webhook")
                # 5. the node announcing alerts dies: the other takes the feed over,
                # announces nothing twice, and goes on (an ack there, seen live)
                holder = (await trio.to_thread.run_sync(_feed_holders, nodes))[0]
                await trio.to_thread.run_sync(nodes.kill, holder)
                other = 1 - holder
                await trio.to_thread.run_sync(lambda: wait_for(
                    lambda: _feed_holders(nodes) == [other], timeout=30))
                await trio.to_thread.run_sync(_ack, nodes.ports[other], offline_id)
                await _until(lambda: _alerts_in(followers[other].views)[offline_id]
                             ["acknowledged"], 20, "ack seen live after the takeover")
                await _until(lambda: hook.count()[("acknowledged", offline_id)] >= 1, 20,
                             "the second ack's webhook")
                await trio.sleep(3)  # anything announced twice would arrive by now
                counts = hook.count()
                assert counts[("raised", alert_id)] == 1
                assert counts[("raised", offline_id)] == 1
                assert all(n == 1 for n in counts.values()), counts
                # and /api/alerts on the surviving node lists each alert once
                listed = get_json(f"http://127.0.0.1:{nodes.ports[other]}/api/alerts"
                                  "?limit=1000")["alerts"]
                assert len([a for a in listed if a["rule"] == "gw-offline"]) == 1
                for f in followers:
                    assert f.silent_gaps == [], (f.name, f.silent_gaps[:5])
        nursery.cancel_scope.cancel()
