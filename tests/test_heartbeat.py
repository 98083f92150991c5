"""The heartbeat loop both ends run (``edgegw.heartbeat``), in virtual time: the real
protocol state machines, connected by memory channels instead of a socket."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from edgegw.heartbeat import heartbeat
from edgegw.protocol import CloseCode, GatewayConnection, HubConnection, IntervalSet, ProtocolError


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
