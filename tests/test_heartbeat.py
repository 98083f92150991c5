"""The heartbeat loop both ends run (``edgegw.heartbeat``), in virtual time: the real
protocol state machines, connected by memory channels instead of a socket."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from edgegw.heartbeat import heartbeat
from edgegw.protocol import (
    CloseCode,
    GatewayConnection,
    HubConnection,
    IntervalSet,
    Ping,
    ProtocolError,
    decode,
    encode,
)


def open_pair(now: float, interval: float) -> tuple[GatewayConnection, HubConnection]:
    gw = GatewayConnection("ate-01", "s3cret", "e", 1, heartbeat=interval, now=now)
    hub = HubConnection(heartbeat=interval, now=now)
    hub.receive(gw.hello(now), now)
    gw.receive(hub.accept(IntervalSet(), now), now)
    return gw, hub


async def test_a_link_whose_ends_answer_stays_up_on_one_ping_per_interval_of_silence(
        autojump_clock: trio.testing.MockClock) -> None:
    gw, hub = open_pair(trio.current_time(), interval=5.0)
    to_hub, hub_inbox = trio.open_memory_channel[bytes](100)
    to_gw, gw_inbox = trio.open_memory_channel[bytes](100)
    pings = 0
    started = trio.current_time()

    async def deliver(inbox: trio.MemoryReceiveChannel[bytes], conn: GatewayConnection |
                      HubConnection, reply_to: trio.MemorySendChannel[bytes]) -> None:
        async for data in inbox:
            _, reply = conn.receive(data, trio.current_time())
            if reply is not None:  # a PONG
                await reply_to.send(reply)

    async def gateway_send(data: bytes) -> None:
        nonlocal pings
        pings += 1
        await to_hub.send(data)

    with trio.move_on_after(3600):  # an hour of a quiet link, in virtual time
        async with trio.open_nursery() as nursery:
            nursery.start_soon(deliver, hub_inbox, hub, to_gw)
            nursery.start_soon(deliver, gw_inbox, gw, to_hub)
            nursery.start_soon(heartbeat, gw, gateway_send)
            nursery.start_soon(heartbeat, hub, to_gw.send)
    assert trio.current_time() - started == pytest.approx(3600)
    assert 3600 / 5.0 - 2 <= pings <= 3600 / 5.0  # once per 5 s of the gateway's silence
    assert gw.rtt is not None


async def test_a_silent_peer_ends_the_link_after_two_intervals(
        autojump_clock: trio.testing.MockClock) -> None:
    gw, _hub = open_pair(trio.current_time(), interval=5.0)
    sent: list[bytes] = []

    async def send(data: bytes) -> None:
        sent.append(data)  # into the void: the hub never answers

    started = trio.current_time()
    with pytest.raises(ProtocolError) as silent:
        await heartbeat(gw, send)
    assert silent.value.code == CloseCode.HEARTBEAT_TIMEOUT
    assert trio.current_time() - started == pytest.approx(10.0, abs=0.01)
    assert len(sent) == 1  # one PING at 5 s, then silence for another 5 s


async def test_a_peer_that_reads_nothing_ends_the_link_after_two_intervals_while_a_send_waits(
        autojump_clock: trio.testing.MockClock) -> None:
    """A paused peer (SIGSTOP, a frozen VM) reads nothing: once the socket buffers are full
    a send waits as long as the pause lasts.  The silence still ends the link on time --
    before, the loop judged it only after the PING's send returned (tests/test_pause.py)."""
    gw, _hub = open_pair(trio.current_time(), interval=5.0)
    # no receiver and no buffer: the PING's send waits forever, as into full socket buffers
    to_hub, _never_read = trio.open_memory_channel[bytes](0)
    started = trio.current_time()
    with pytest.raises(ProtocolError) as silent, trio.fail_after(3600):
        await heartbeat(gw, to_hub.send)
    assert silent.value.code == CloseCode.HEARTBEAT_TIMEOUT
    assert trio.current_time() - started == pytest.approx(10.0, abs=0.01)


async def test_a_send_that_fails_raises_its_own_exception(
        autojump_clock: trio.testing.MockClock) -> None:
    """The link's own failure comes out as it was raised (the connection handlers look for
    its type), not wrapped in a group by the silence check running beside the send."""
    gw, _hub = open_pair(trio.current_time(), interval=5.0)
    to_hub, inbox = trio.open_memory_channel[bytes](0)
    await inbox.aclose()  # the peer went away
    with pytest.raises(trio.BrokenResourceError):
        await heartbeat(gw, to_hub.send)


# A paused end (SIGSTOP, a frozen VM) wakes with every deadline passed and what the peer
# sent meanwhile unread in its socket.  Its timer must not call that silence: before, the
# timer ran first and closed a live link with 4005 (docs/reliability.md, "Paused processes").

def test_a_look_at_the_silence_taken_late_only_schedules_another_a_quarter_interval_on() -> None:
    gw, _hub = open_pair(0.0, interval=5.0)
    ping = gw.on_timer(30.0)  # due at 10 s; the end slept through it
    assert ping is not None and isinstance(decode(ping), Ping)  # "I am back" to the peer
    assert gw.next_deadline() == pytest.approx(31.25)
    gw.receive(encode(Ping(4.0)), 30.01)  # the receive side reads what waited in the socket
    assert gw.on_timer(31.25) is None  # heard from: the link stays up
    assert gw.next_deadline() == pytest.approx(35.01)  # its next PING, then silence at 40.01


def test_a_late_look_followed_by_an_on_time_look_that_finds_nothing_closes_with_4005() -> None:
    gw, _hub = open_pair(0.0, interval=5.0)
    gw.on_timer(30.0)
    with pytest.raises(ProtocolError) as silent:
        gw.on_timer(31.25)
    assert silent.value.code == CloseCode.HEARTBEAT_TIMEOUT


def test_a_look_again_that_also_runs_late_is_not_a_verdict_either() -> None:
    gw, _hub = open_pair(0.0, interval=5.0)
    gw.on_timer(30.0)
    gw.on_timer(40.0)  # paused again before its look again
    assert gw.next_deadline() == pytest.approx(41.25)
    with pytest.raises(ProtocolError):
        gw.on_timer(41.25)


def test_a_look_on_time_closes_at_once() -> None:
    gw, _hub = open_pair(0.0, interval=5.0)
    gw.on_timer(5.0)  # its PING
    with pytest.raises(ProtocolError):
        gw.on_timer(10.0 + 5.0 / 4)  # within a quarter interval of the deadline: on time


async def test_an_end_woken_from_a_pause_reads_the_pings_waiting_for_it_before_judging(
        autojump_clock: trio.testing.MockClock) -> None:
    """The receive side as trio-websocket builds it: a reader task moves what the socket
    holds into a channel, and the connection's receive loop takes it from there -- two
    scheduler turns after the process wakes, while the timer's task runs in the first."""
    gw, _hub = open_pair(trio.current_time(), interval=5.0)
    socket_in, socket_out = trio.open_memory_channel[bytes](100)
    messages_in, messages_out = trio.open_memory_channel[bytes](0)
    sent: list[bytes] = []
    started = trio.current_time()

    async def socket_reader() -> None:
        async for data in socket_out:
            await messages_in.send(data)

    async def receive_loop() -> None:
        async for data in messages_out:
            gw.receive(data, trio.current_time())

    async def send(data: bytes) -> None:
        sent.append(data)

    async def paused_with_the_peers_ping_waiting() -> None:
        await trio.sleep(4.0)
        socket_in.send_nowait(encode(Ping(trio.current_time())))  # the peer's PING arrives
        autojump_clock.jump(26.0)  # ... and the end sleeps for 26 s without reading it

    async with trio.open_nursery() as nursery:
        nursery.start_soon(socket_reader)
        nursery.start_soon(receive_loop)
        nursery.start_soon(paused_with_the_peers_ping_waiting)
        with pytest.raises(ProtocolError) as silent:
            await heartbeat(gw, send)
        nursery.cancel_scope.cancel()
    assert silent.value.code == CloseCode.HEARTBEAT_TIMEOUT
    # awake again at 30 s, it read the PING then, and the peer was silent from there on
    assert trio.current_time() - started == pytest.approx(40.0, abs=0.01)
    assert sent and isinstance(decode(sent[0]), Ping)


# Backpressure is not silence.  An end that holds its reads back for its own reasons (the
# hub's apply queue full behind a slow commit) leaves the peer's frames and PINGs unread in
# its socket: that time is not the peer's silence.  Before, the busy hub closed a gateway
# that was sending with 4005 (tests/test_backpressure.py; docs/protocol.md section 7).

def test_while_an_end_holds_its_reads_back_the_peer_is_never_judged_silent() -> None:
    _gw, hub = open_pair(0.0, interval=1.0)
    hub.reading_paused(0.5)
    assert hub.next_deadline() == pytest.approx(1.0)  # its PING still, no verdict due
    for t in (1.0, 2.0, 3.0, 10.0):
        ping = hub.on_timer(t)  # one PING per interval of its own silence, no 4005
        assert ping is not None and isinstance(decode(ping), Ping)


def test_silence_counts_on_from_where_it_stood_when_the_reads_were_held_back() -> None:
    """Heard from at 0, reads held from 1.5 to 10: 1.5 s of silence were counted then, the
    0.5 s left of the 2 s timeout run from 10 -- a peer that died meanwhile is still found."""
    _gw, hub = open_pair(0.0, interval=1.0)
    hub.reading_paused(1.5)
    hub.on_timer(9.5)  # its PING
    hub.reading_resumed(10.0)
    assert hub.next_deadline() == pytest.approx(10.5)
    with pytest.raises(ProtocolError) as silent:
        hub.on_timer(10.5)
    assert silent.value.code == CloseCode.HEARTBEAT_TIMEOUT


def test_a_message_read_after_the_reads_resume_keeps_the_link_up() -> None:
    gw, hub = open_pair(0.0, interval=1.0)
    hub.reading_paused(1.5)
    hub.reading_resumed(10.0)
    hub.receive(gw.data(1, b"\x00", 1.2), 10.01)  # what waited in the socket, read first
    hub.on_timer(11.5)  # its PING, no verdict: heard from at 10.01
    assert hub.next_deadline() == pytest.approx(12.01)
    with pytest.raises(ProtocolError):
        hub.on_timer(12.01)  # and then truly silent for 2 s of reading


async def test_a_hub_busy_for_ten_intervals_keeps_pinging_and_closes_nothing(
        autojump_clock: trio.testing.MockClock) -> None:
    """The heartbeat loop beside a receive side held back for 10 s: PINGs go out, so the
    gateway hears the hub; nothing is judged; reading again, the link is up."""
    _gw, hub = open_pair(trio.current_time(), interval=1.0)
    sent: list[bytes] = []

    async def send(data: bytes) -> None:
        sent.append(data)

    hub.reading_paused(trio.current_time())
    with trio.move_on_after(10.0) as busy:
        await heartbeat(hub, send)
    assert busy.cancelled_caught  # no 4005 in 10 s of held-back reads
    assert 9 <= len(sent) <= 10 and all(isinstance(decode(p), Ping) for p in sent)
