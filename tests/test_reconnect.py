"""Reconnection: the newest connection of a gateway wins, exactly-once holds across the
takeover, and a gateway notices a returned hub within about a second without hammering a
hub that is down or busy (docs/protocol.md sections 4 and 7)."""

from __future__ import annotations

import contextlib
import random
import socket
import sqlite3
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trio
from faultkit import Proxy
from hubtools import gateway_config, hub_config, start_hub
from ports import free_port
from trio_websocket import ConnectionClosed, open_websocket_url

from edgegw.backoff import Backoff, Reconnect
from edgegw.gateway import Gateway, ProbeTarget, probe_once, retry_after_seconds
from edgegw.hub import FrameToApply, HubStore, Ingest
from edgegw.protocol import (
    Ack,
    CloseCode,
    GatewayConnection,
    Welcome,
    decode,
    encode_body,
)
from edgegw.records import SensorReading

GW = "ate-01"


def body(first_rid: int, n: int) -> bytes:
    return encode_body(first_rid, [SensorReading("s", 1.0, "c", float(i)) for i in range(n)])


class RecordIds:
    """A hub consumer that notes every record id it is handed."""

    def __init__(self) -> None:
        self.rids: Counter[int] = Counter()

    def on_records(self, gateway_id: str, first_rid: int, records: list[Any]) -> None:
        self.rids.update(range(first_rid, first_rid + len(records)))

    def on_gateway(self, gateway_id: str, connected: bool, now: float) -> None:
        pass


@contextlib.asynccontextmanager
async def gateway_ws(port: int, next_seq: int = 1,
                     epoch: str = "e1") -> AsyncIterator[tuple[Any, GatewayConnection, Any]]:
    """A raw protocol client after its handshake: (ws, connection, WELCOME or REFUSE)."""
    conn = GatewayConnection(GW, "s3cret", epoch, next_seq, now=trio.current_time())
    async with open_websocket_url(f"ws://127.0.0.1:{port}/ws/gateway",
                                  message_queue_size=64) as ws:
        await ws.send_message(conn.hello(trio.current_time()))
        events, _ = conn.receive(await ws.get_message(), trio.current_time())
        yield ws, conn, events[0]


# --- the reconnection policy, sans-IO ----------------------------------------------------


def test_an_unreachable_hub_is_probed_on_a_short_jittered_cap_that_never_grows() -> None:
    policy = Reconnect(Backoff(0.5, 30.0, rng=random.Random(1)), probe_interval=1.0)
    delays = [policy.probe_delay() for _ in range(2000)]
    assert max(delays) <= 1.0 and min(delays) < 0.01  # full jitter, capped at 1 s
    assert sum(delays) / len(delays) == pytest.approx(0.5, abs=0.05)
    assert policy.backoff.attempt == 0  # probing an absent hub is not a failure at the hub


def test_failures_at_the_hub_back_off_exponentially_with_full_jitter() -> None:
    policy = Reconnect(Backoff(0.5, 30.0, rng=random.Random(2)), probe_interval=1.0)
    caps = []
    for _ in range(10):
        caps.append(policy.backoff.cap())
        assert 0 <= policy.failed() <= caps[-1]
    assert caps[:4] == [0.5, 1.0, 2.0, 4.0] and caps[-1] == 30.0


def test_a_busy_hubs_retry_after_is_never_cut_short() -> None:
    policy = Reconnect(Backoff(0.5, 30.0, rng=random.Random(3)), probe_interval=1.0)
    delays = [policy.busy(5.0) for _ in range(500)]
    assert min(delays) >= 5.0 and max(delays) <= 10.0
    assert max(delays) - min(delays) > 4.0  # spread: a floor of gateways is not in step


def test_a_retry_after_past_an_hour_is_honoured_for_an_hour() -> None:
    """A Retry-After of a billion seconds (a proxy misconfigured) would leave the gateway
    silent for 31 years after its hub was back: the wait is at most an hour (the most
    ``hub.busy_retry_after_s`` may say), plus as much again of jitter."""
    policy = Reconnect(Backoff(0.5, 30.0, rng=random.Random(5)), probe_interval=1.0)
    delays = [policy.busy(1e9) for _ in range(500)]
    assert min(delays) >= 3600.0 and max(delays) <= 7200.0
    assert policy.busy(3600.0) >= 3600.0  # the longest a hub may ask: honoured in full


def test_only_a_session_that_stayed_up_resets_the_backoff() -> None:
    policy = Reconnect(Backoff(0.5, 30.0, rng=random.Random(4)), probe_interval=1.0,
                       stable_after=10.0)
    for _ in range(5):
        policy.failed()
    policy.connected(100.0)
    assert policy.disconnected(101.0) <= 30.0 and policy.backoff.attempt == 6  # flapping
    policy.connected(200.0)
    assert policy.disconnected(260.0) == 0.0 and policy.backoff.attempt == 0  # stable


def test_a_short_session_lost_with_the_link_is_followed_by_probing_at_once() -> None:
    """Losing the link is not the hub's doing: a flapping link is probed, not backed off
    from, so the gateway is back within the probe interval after every return."""
    policy = Reconnect(Backoff(0.5, 30.0, rng=random.Random(6)), probe_interval=1.0)
    for _ in range(20):
        policy.connected(0.0)
        assert policy.disconnected(2.0, link_lost=True) == 0.0
    assert policy.backoff.attempt == 0


def test_a_configuration_problem_retries_at_the_cap() -> None:
    policy = Reconnect(Backoff(0.5, 30.0, rng=random.Random(5)))
    policy.config_problem()
    assert policy.backoff.cap() == 30.0


def test_retry_after_is_read_in_its_seconds_form() -> None:
    assert retry_after_seconds(b"5") == 5.0 and retry_after_seconds(b" 2.5 ") == 2.5
    assert retry_after_seconds(b"Wed, 21 Oct 2015 07:28:00 GMT") is None
    assert retry_after_seconds(b"-1") is None and retry_after_seconds(None) is None


# --- the probe, over real sockets -------------------------------------------------------


async def test_the_probe_tells_unreachable_ready_busy_and_silent_apart(tmp_path: Path) -> None:
    closed = free_port()
    result = await probe_once(ProbeTarget("127.0.0.1", closed, "/ws/gateway"), 2.0)
    assert result.outcome == "unreachable" and not result.reached

    # accepts connections (the kernel does), never answers
    with socket.create_server(("127.0.0.1", 0)) as mute:
        target = ProbeTarget("127.0.0.1", mute.getsockname()[1], "/ws/gateway")
        result = await probe_once(target, 0.3)
    assert result.outcome == "silent"

    async with trio.open_nursery() as nursery:
        _, port = await start_hub(nursery, hub_config(
            tmp_path, max_pending_handshakes=1, busy_retry_after_s=7, hello_timeout_s=30))
        target = ProbeTarget.from_url(f"ws://127.0.0.1:{port}/ws/gateway")
        assert (await probe_once(target, 2.0)).outcome == "ready"
        # one handshake under way (upgraded, no HELLO yet) fills the hub's one slot
        async with open_websocket_url(f"ws://127.0.0.1:{port}/ws/gateway"):
            result = await probe_once(target, 2.0)
            assert result.outcome == "busy" and result.retry_after == 7.0
        nursery.cancel_scope.cancel()


def test_a_probe_target_is_the_hub_url_over_http() -> None:
    t = ProbeTarget.from_url("wss://hub.example:9443/ws/gateway", ssl_context=None)
    assert (t.host, t.port, t.path, t.host_header) == ("hub.example", 9443, "/ws/gateway",
                                                      "hub.example:9443")
    t = ProbeTarget.from_url("ws://10.0.0.5/ws/gateway")
    assert (t.port, t.host_header, t.ssl_context) == (80, "10.0.0.5", None)


# --- newest connection wins -------------------------------------------------------------


async def test_a_gateway_whose_old_link_half_died_is_let_in_at_once(tmp_path: Path) -> None:
    """The old connection goes through a proxy that then black-holes it: the hub never sees
    a FIN and, with a 30 s heartbeat, would hold the old connection for a minute."""
    async with trio.open_nursery() as nursery:
        hub, port = await start_hub(nursery, hub_config(tmp_path / "hub", heartbeat_s=30.0))
        proxy = Proxy(port)
        try:
            old_gw = Gateway(gateway_config(tmp_path / "old", proxy.port))
            old_scope = trio.CancelScope()

            async def run_old(*, task_status: trio.TaskStatus[None]) -> None:
                with old_scope:
                    await old_gw.run(task_status=task_status)

            await nursery.start(run_old)
            await old_gw.sink.put([SensorReading("s", 1.0, "c", 1.0)], source="s")
            assert await old_gw.drain(20)
            proxy.blackhole()
            old_scope.cancel()  # the old gateway is gone; its FIN is swallowed
            assert GW in hub.connected

            new_gw = Gateway(gateway_config(tmp_path / "new", port))
            await nursery.start(new_gw.run)
            await new_gw.sink.put([SensorReading("s", 2.0, "c", 2.0)], source="s")
            with trio.fail_after(20):  # far less than the 60 s the old link would be held
                assert await new_gw.drain(20)
            assert hub.metrics.counter("hub_connections_replaced_total").total() == 1
            assert hub.stats()["gateways"][GW]["refused"] == 0
            assert hub.stats()["gateways"][GW]["records_applied"] == 2
        finally:
            proxy.close()
        nursery.cancel_scope.cancel()


async def test_a_takeover_waits_for_the_old_connections_commit_so_welcome_includes_it(
        tmp_path: Path) -> None:
    """The old connection's frame is mid-commit (the database is held locked by the test)
    when the new connection says HELLO.  WELCOME may only list what is durable, and a
    commit in flight may still fail: so it comes only after that commit, and lists it."""
    async with trio.open_nursery() as nursery, contextlib.AsyncExitStack() as stack:
        # no pruner: on a busy machine its first prune could start after the database is
        # locked below and hold the store's worker slot in the old applier's place
        hub, port = await start_hub(nursery, hub_config(tmp_path, retain_frames_hours=0))
        ws, conn, welcome = await stack.enter_async_context(gateway_ws(port))
        assert welcome.applied == []
        locker = sqlite3.connect(tmp_path / "hub.sqlite3", check_same_thread=False)
        await trio.to_thread.run_sync(locker.execute, "BEGIN IMMEDIATE")
        new_welcome: list[Any] = []
        done = trio.Event()

        async def take_over() -> None:
            async with gateway_ws(port) as (_, _, event):
                new_welcome.append(event)
                await done.wait()

        try:
            await ws.send_message(conn.data(1, body(1, 5), trio.current_time()))
            with trio.fail_after(10):  # the old applier's commit is in its worker thread
                while not hub.store.busy:
                    await trio.sleep(0.01)
            nursery.start_soon(take_over)
            with trio.fail_after(10):  # the new session waits for the old one's commit
                while hub.connected.owner(GW).statistics().tasks_waiting == 0:
                    await trio.sleep(0.01)
            assert not new_welcome
        finally:
            await trio.to_thread.run_sync(locker.execute, "ROLLBACK")
            locker.close()
        with trio.fail_after(10):
            while not new_welcome:
                await trio.sleep(0.01)
        assert isinstance(new_welcome[0], Welcome) and new_welcome[0].applied == [(1, 1)]
        with pytest.raises(ConnectionClosed) as closed:
            while True:
                await ws.get_message()
        assert closed.value.reason.code == CloseCode.REPLACED
        assert hub.stats()["gateways"][GW]["records_applied"] == 5
        done.set()
        nursery.cancel_scope.cancel()


async def test_two_connections_of_one_gateway_racing_with_the_same_frames_apply_each_once(
        tmp_path: Path) -> None:
    """Two clients with the same id keep taking the connection from each other, each
    sending every frame its WELCOME does not list, without waiting for acks."""
    n_frames, per_frame = 300, 4
    ids = RecordIds()
    hub = Ingest(hub_config(tmp_path, apply_queue_frames=8))
    hub.add_consumer(ids)
    async with trio.open_nursery() as nursery:
        port = await nursery.start(hub.run)

        async def client(rounds: int) -> None:
            for _ in range(rounds):
                with contextlib.suppress(ConnectionClosed):  # replaced: go round again
                    async with gateway_ws(port) as (ws, conn, welcome):
                        have = set()
                        for lo, hi in welcome.applied:
                            have.update(range(lo, hi + 1))
                        if len(have) == n_frames:
                            return
                        for seq in range(1, n_frames + 1):
                            if seq not in have:
                                await ws.send_message(conn.data(
                                    seq, body(1 + (seq - 1) * per_frame, per_frame),
                                    trio.current_time()))
                        while True:
                            msg = decode(await ws.get_message())
                            if isinstance(msg, Ack) and msg.watermark == n_frames:
                                return

        with trio.fail_after(120):
            async with trio.open_nursery() as clients:
                clients.start_soon(client, 8)
                clients.start_soon(client, 8)
            # whoever was last may have been replaced before the end: finish the job
            await client(1)
        with trio.fail_after(30):  # the consumers are fed behind the commit the ack follows
            while len(ids.rids) < n_frames * per_frame:
                await trio.sleep(0.01)
        st = hub.stats()["gateways"][GW]
        assert st["frames_applied"] == n_frames
        assert st["records_applied"] == n_frames * per_frame
        assert set(ids.rids) == set(range(1, n_frames * per_frame + 1))
        assert max(ids.rids.values()) == 1, "a record was handed to the consumers twice"
        rows = await hub.store.query("SELECT seq, COUNT(*) FROM frames GROUP BY seq")
        assert len(rows) == n_frames and all(n == 1 for _, n in rows)
        assert hub.metrics.counter("hub_connections_replaced_total").total() >= 1
        nursery.cancel_scope.cancel()


async def test_the_store_applies_a_frame_once_even_when_two_commits_race(
        tmp_path: Path) -> None:
    store = HubStore(tmp_path / "hub.sqlite3")
    await store.open()
    try:
        def frames(seqs: range) -> list[FrameToApply]:
            return [FrameToApply(GW, "e", s, s, 1, body(s, 1)) for s in seqs]

        results: list[set[tuple[str, str, int]]] = []

        async def commit(seqs: range) -> None:
            results.append(await store.commit(frames(seqs)))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(commit, range(1, 41))
            nursery.start_soon(commit, range(21, 61))
        skipped = results[0] | results[1]
        assert {s for _, _, s in skipped} == set(range(21, 41))
        assert store.applied_set(GW, "e").ranges() == [(1, 60)]
        assert store.stats[GW].frames_applied == 60
        # a resend after the frame rows were pruned is still skipped: the applied set rules
        await store.prune(older_than=float("inf"))
        again = await store.commit(frames(range(5, 8)), rejected=[
            (FrameToApply(GW, "e", 9, 0, 0, b"junk"), "bad")])
        assert again == {(GW, "e", 5), (GW, "e", 6), (GW, "e", 7), (GW, "e", 9)}
        assert store.stats[GW].frames_applied == 60 and store.stats[GW].frames_rejected == 0
        assert await store.query("SELECT COUNT(*) FROM rejected") == [(0,)]
    finally:
        await store.close()


async def test_two_gateways_configured_with_one_id_do_not_fight_in_a_tight_loop(
        tmp_path: Path) -> None:
    """Each takes the connection from the other (4008); a replaced gateway backs off
    exponentially, because only a session that stayed up resets its backoff."""
    async with trio.open_nursery() as nursery:
        hub, port = await start_hub(nursery, hub_config(tmp_path / "hub"))
        uplink = {"backoff_initial_s": 0.5, "backoff_max_s": 30.0}
        a = Gateway(gateway_config(tmp_path / "a", port, uplink=uplink))
        b = Gateway(gateway_config(tmp_path / "b", port, uplink=uplink))
        await nursery.start(a.run)
        await nursery.start(b.run)
        assert a.uplink is not None and b.uplink is not None
        # the backoff of a replaced gateway grows: reset at every WELCOME, no attempt would
        # ever pass 1 (waited for, up to 30 s, instead of watching a fixed 6 s window)
        start = trio.current_time()
        with trio.fail_after(30):
            while max(a.uplink.backoff.attempt, b.uplink.backoff.attempt) < 2:
                await trio.sleep(0.02)
        await trio.sleep(1.0)  # and a second more of what they do meanwhile
        replaced = hub.metrics.counter("hub_connections_replaced_total").total()
        # delays kept under 0.5 s would be about 7 takeovers a second
        assert 1 <= replaced <= 4 + 3 * (trio.current_time() - start)
        nursery.cancel_scope.cancel()


# --- the gateway's reconnection -----------------------------------------------------------


async def test_a_hub_that_appears_after_a_long_absence_is_reached_without_a_long_backoff(
        tmp_path: Path) -> None:
    port = free_port()
    # backoff up to 5 minutes: only the probing can bring the gateway back quickly
    gw = Gateway(gateway_config(tmp_path / "gw", port, uplink={
        "backoff_initial_s": 0.5, "backoff_max_s": 300.0, "probe_interval_s": 0.5}))
    async with trio.open_nursery() as nursery:
        await nursery.start(gw.run)
        up = gw.uplink
        assert up is not None
        with trio.fail_after(30):
            while up.m_probes.total() < 12:  # about 3 s of an absent hub
                await trio.sleep(0.05)
        assert up.backoff.attempt == 0 and up.m_failures.total() == 0
        assert "unreachable" in (up.last_error or "")
        await start_hub(nursery, hub_config(tmp_path / "hub", port=port))
        await gw.sink.put([SensorReading("s", 1.0, "c", 1.0)], source="s")
        with trio.fail_after(15):  # the probe cadence (0.5 s) plus a busy machine's slack
            assert await gw.drain(15)
        nursery.cancel_scope.cancel()


async def test_a_busy_hub_is_left_alone_for_its_retry_after(tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        hub, port = await start_hub(nursery, hub_config(
            tmp_path / "hub", max_pending_handshakes=1, busy_retry_after_s=1.5,
            hello_timeout_s=60))
        async with open_websocket_url(f"ws://127.0.0.1:{port}/ws/gateway"):
            # this upgraded connection never says HELLO: it fills the hub's one slot
            gw = Gateway(gateway_config(tmp_path / "gw", port, uplink={"probe_interval_s": 0.2}))
            await nursery.start(gw.run)
            busy = hub.metrics.counter("hub_busy_total")
            with trio.fail_after(10):
                while busy.total() == 0:
                    await trio.sleep(0.01)
            first = trio.current_time()
            await trio.sleep(4.0)  # the window observed
            # every next try waits 1.5-3 s; probing at its own cadence would be ~20 tries
            allowed = 1 + int((trio.current_time() - first + 0.2) / 1.5)
            assert busy.total() <= allowed
            assert gw.uplink is not None and "busy" in (gw.uplink.last_error or "")
        await gw.sink.put([SensorReading("s", 1.0, "c", 1.0)], source="s")
        with trio.fail_after(20):
            assert await gw.drain(20)
        nursery.cancel_scope.cancel()


async def test_a_newer_connection_of_another_epoch_is_let_in_and_reported_as_an_error(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Two gateway processes configured with one id, each on its own spool: they take the
    connection from each other.  Each epoch keeps its own applied set (nothing merged,
    nothing lost), and the hub says it is two epochs -- not only "replaced", as for a
    gateway reconnecting over a half-dead link (before, the same warning for both)."""
    async with trio.open_nursery() as nursery:
        hub, port = await start_hub(nursery, hub_config(tmp_path / "hub"))
        other = hub.metrics.counter("hub_connections_replaced_other_epoch_total")
        async with gateway_ws(port, epoch="e1") as (_, _, welcome):
            assert isinstance(welcome, Welcome)
            async with gateway_ws(port, epoch="e1") as (_, _, welcome):  # a reconnect
                assert isinstance(welcome, Welcome)
                assert other.total() == 0
                async with gateway_ws(port, epoch="e2") as (_, _, welcome):
                    assert isinstance(welcome, Welcome) and welcome.applied == []
                    assert other.total() == 1
        assert hub.metrics.counter("hub_connections_replaced_total").total() == 2
        errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
        assert len(errors) == 1
        assert "(spool epoch e1) replaced by one from" in errors[0]
        assert "of another spool epoch, e2: two gateways configured with this id" in errors[0]
        nursery.cancel_scope.cancel()
