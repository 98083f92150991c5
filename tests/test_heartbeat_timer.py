"""The heartbeat's timer rules, sans-IO: the real protocol state machines, times passed in
as numbers -- no sockets, no clocks.  The Trio loop that drives them is in
tests/test_heartbeat.py.

A PING's send can wait as long as a paused peer (SIGSTOP, a frozen VM) leaves the socket
buffers full.  The I/O layer says so (``ping_started`` ... ``ping_done``) and keeps calling
``on_timer`` at ``next_deadline`` meanwhile: the silence is judged by the same rule as ever,
and no second PING is handed out (docs/protocol.md section 7)."""

from __future__ import annotations

import pytest
from test_heartbeat import open_pair

from edgegw.protocol import (
    CloseCode,
    GatewayConnection,
    HubConnection,
    Ping,
    Pong,
    ProtocolError,
    decode,
    encode,
)


def ping_waiting_from(conn: GatewayConnection | HubConnection, now: float) -> None:
    """``conn``'s PING, due at ``now``, handed out and now waiting on the socket."""
    ping = conn.on_timer(now)
    assert ping is not None and isinstance(decode(ping), Ping)
    conn.ping_started()


def test_while_a_ping_waits_on_the_socket_a_silent_peer_is_still_closed_on_time() -> None:
    gw, _hub = open_pair(0.0, interval=5.0)
    ping_waiting_from(gw, 5.0)
    assert gw.next_deadline() == pytest.approx(10.0)  # the silence, as with no send waiting
    with pytest.raises(ProtocolError) as silent:
        gw.on_timer(10.0)
    assert silent.value.code == CloseCode.HEARTBEAT_TIMEOUT


def test_while_a_ping_waits_no_other_is_handed_out_and_the_looks_go_on_once_an_interval(
        ) -> None:
    _gw, hub = open_pair(0.0, interval=1.0)
    hub.reading_paused(0.5)  # no verdict due: only the PINGs' deadlines remain
    ping_waiting_from(hub, 1.0)
    for t in (2.0, 3.0, 4.0):
        assert hub.next_deadline() == pytest.approx(t)  # a look, never a busy loop
        assert hub.on_timer(t) is None  # due, but one is in flight: the peer reads it first
    hub.ping_done()
    assert hub.next_deadline() == pytest.approx(5.0)  # the interval since the last look
    assert hub.on_timer(5.0) is not None  # the send returned: PINGs go out again


def test_a_message_read_while_a_ping_waits_moves_the_verdict_on() -> None:
    """The peer is not paused, only slow to read: what it sends meanwhile is heard."""
    gw, _hub = open_pair(0.0, interval=5.0)
    ping_waiting_from(gw, 5.0)
    gw.receive(encode(Pong(1.0)), 9.0)  # an answer to an older PING, read while ours waits
    assert gw.on_timer(10.0) is None  # no verdict, and no second PING
    assert gw.next_deadline() == pytest.approx(15.0)
    assert gw.on_timer(15.0) is None
    assert gw.next_deadline() == pytest.approx(19.0)
    with pytest.raises(ProtocolError):
        gw.on_timer(19.0)  # 2 x heartbeat after the last message read


def test_a_late_look_while_a_ping_waits_is_no_verdict_either() -> None:
    """The end itself was paused with its PING waiting: it reads what waits for it first."""
    gw, _hub = open_pair(0.0, interval=5.0)
    ping_waiting_from(gw, 5.0)
    assert gw.on_timer(30.0) is None  # 20 s past the silence deadline: not on time
    assert gw.next_deadline() == pytest.approx(31.25)
    gw.receive(encode(Ping(29.0)), 30.5)  # the peer's PING, read after the wake
    assert gw.on_timer(31.25) is None  # heard from: the link stays up


def test_a_ping_whose_send_failed_does_not_hold_the_next_ones_back() -> None:
    _gw, hub = open_pair(0.0, interval=1.0)
    hub.reading_paused(0.0)
    ping_waiting_from(hub, 1.0)
    hub.ping_done()  # also what the I/O layer says when the send raised
    assert hub.on_timer(2.0) is not None
