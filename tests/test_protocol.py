"""Wire protocol v1: the two state machines wired together in memory."""

import cbor2
import pytest

from edgegw.protocol import (
    Ack,
    CloseCode,
    Data,
    Duplicate,
    GatewayConnection,
    Hello,
    HubConnection,
    IntervalSet,
    ProtocolError,
    Refuse,
    Reject,
    State,
    Welcome,
    decode,
    decode_body,
    encode,
    encode_body,
)
from edgegw.records import PartResult, SensorReading


def pair(next_seq: int = 1, applied: IntervalSet | None = None, **hub_kw: object
         ) -> tuple[GatewayConnection, HubConnection]:
    gw = GatewayConnection("ate-01", "secret", "epoch-a", next_seq, heartbeat=5.0, now=0.0)
    hub = HubConnection(now=0.0, **hub_kw)  # type: ignore[arg-type]
    events, _ = hub.receive(gw.hello(0.0), 0.0)
    assert isinstance(events[0], Hello) and events[0].token == "secret"
    events, _ = gw.receive(hub.accept(applied or IntervalSet(), 0.0), 0.0)
    assert isinstance(events[0], Welcome)
    return gw, hub


def test_handshake_opens_both_ends_and_tells_the_gateway_what_the_hub_has() -> None:
    gw, hub = pair(next_seq=4, applied=IntervalSet([(1, 3)]))
    assert gw.state is State.OPEN and hub.state is State.OPEN
    assert gw.welcome is not None and gw.welcome.applied == [(1, 3)]
    assert hub.declared_lost == 0


def test_frames_below_the_gateways_first_unacked_that_the_hub_lacks_are_declared_lost() -> None:
    _, hub = pair(next_seq=11, applied=IntervalSet([(1, 4)]))
    assert hub.declared_lost == 6  # frames 5..10 were dropped by the gateway
    assert hub.applied_set.ranges() == [(1, 10)]


def test_a_refusal_reaches_the_gateway_with_its_code_and_reason() -> None:
    gw = GatewayConnection("ate-01", "wrong", "e", 1, now=0.0)
    hub = HubConnection(now=0.0)
    hub.receive(gw.hello(0.0), 0.0)
    events, _ = gw.receive(hub.refuse(CloseCode.UNAUTHORIZED, "wrong token", 0.0), 0.0)
    assert events == [Refuse(CloseCode.UNAUTHORIZED, "wrong token")]
    assert gw.state is State.CLOSED and hub.state is State.CLOSED


@pytest.mark.parametrize(("offered", "chosen"), [((1, 2), 3), ((1,), 2), ((1, 2, 3), 4)])
def test_a_gateway_rejects_a_hub_that_picked_a_version_it_did_not_offer(
        offered: tuple[int, ...], chosen: int) -> None:
    gw = GatewayConnection("ate-01", "t", "e", 1, now=0.0, versions=offered)
    gw.hello(0.0)
    bad = encode(Welcome(chosen, [], 5.0, 1 << 20, 1000))
    with pytest.raises(ProtocolError) as exc:
        gw.receive(bad, 0.0)
    assert exc.value.code == CloseCode.UNSUPPORTED_VERSION


@pytest.mark.parametrize(("gateway", "hub", "chosen"), [
    ((1, 2), (1, 2), 2), ((1,), (1, 2), 1), ((1, 2), (1,), 1), ((1,), (1,), 1),
    ((1, 2, 3), (1, 2, 3), 3), ((1, 2, 3), (1, 2), 2), ((1, 2), (1, 2, 3), 2),
    ((1, 2, 3), (1,), 1)])
def test_welcome_names_the_highest_version_both_speak(
        gateway: tuple[int, ...], hub: tuple[int, ...], chosen: int) -> None:
    gw = GatewayConnection("ate-01", "t", "e", 1, now=0.0, versions=gateway)
    h = HubConnection(now=0.0, versions=hub)
    h.receive(gw.hello(0.0), 0.0)
    gw.receive(h.accept(IntervalSet(), 0.0), 0.0)
    assert h.version == gw.version == chosen


def test_data_is_applied_then_acknowledged_cumulatively() -> None:
    gw, hub = pair()
    for seq in (1, 2, 3):
        events, reply = hub.receive(gw.data(seq, b"body", 1.0), 1.0)
        assert isinstance(events[0], Data) and events[0].seq == seq and reply is None
    ack = hub.applied(1, 1.0)
    hub.applied(2, 1.0)
    events, _ = gw.receive(hub.applied(3, 1.0), 1.0)
    assert decode(ack) == Ack(1, [])
    assert events == [Ack(3, [])]


def test_a_duplicate_frame_is_reported_and_acked_not_applied_again() -> None:
    gw, hub = pair(next_seq=1, applied=IntervalSet([(1, 2)]))
    events, reply = hub.receive(gw.data(2, b"again", 1.0), 1.0)
    assert [type(e) for e in events] == [Duplicate]
    assert reply is not None and decode(reply) == Ack(2, [])


def test_a_connection_keeps_nothing_per_frame_however_the_duplicates_come() -> None:
    """The hub's per-connection state is bounded by holes, never by frames: a gateway that
    sends every other frame the hub already has, for months, leaks nothing (exactly once
    rests on the applied set, which the hole limit bounds)."""
    import tracemalloc

    gw, hub = pair(next_seq=1, applied=IntervalSet([(1, 200_000)]), max_holes=4)
    messages = [gw.data(seq, b"", 1.0) for seq in range(1, 16_001, 2)]
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for m in messages:
            events, _ = hub.receive(m, 1.0)
            assert type(events[0]) is Duplicate
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert grown < 50_000, f"{grown} bytes kept for 8,000 duplicate frames"
    # a frame this connection applied and sent again is still the gateway's fault
    hub.receive(gw.data(200_001, b"new", 1.0), 1.0)
    with pytest.raises(ProtocolError, match="frame 200001 sent twice on one connection"):
        hub.receive(gw.data(200_001, b"new", 1.0), 1.0)


def test_frames_may_arrive_out_of_order_within_the_hole_limit() -> None:
    gw, hub = pair(max_holes=1)
    hub.receive(gw.data(10, b"live", 1.0), 1.0)  # live ahead of a backlog 1..9
    hub.applied(10, 1.0)
    events, _ = gw.receive(hub.applied(10, 1.0), 1.0)
    assert events == [Ack(0, [(10, 10)])]
    for seq in range(1, 10):
        hub.receive(gw.data(seq, b"old", 1.0), 1.0)
        reply = hub.applied(seq, 1.0)
    assert decode(reply) == Ack(10, [])


def test_a_sequence_gap_beyond_the_hole_limit_closes_the_connection() -> None:
    gw, hub = pair(max_holes=0)
    hub.receive(gw.data(1, b"a", 1.0), 1.0)
    hub.receive(gw.data(2, b"b", 1.0), 1.0)
    with pytest.raises(ProtocolError) as exc:
        hub.receive(gw.data(4, b"d", 1.0), 1.0)
    assert exc.value.code == CloseCode.PROTOCOL_ERROR
    assert "sequence gap" in exc.value.reason
    assert hub.state is State.CLOSED


def test_an_oversized_message_is_refused_with_1009_and_the_sizes() -> None:
    gw, hub = pair(max_message_bytes=1000)
    with pytest.raises(ProtocolError) as exc:
        hub.receive(gw.data(1, b"x" * 2000, 1.0), 1.0)
    assert exc.value.code == CloseCode.TOO_BIG
    assert "exceeds the limit of 1000 bytes" in exc.value.reason


def test_too_many_records_in_a_frame_is_a_protocol_fault() -> None:
    body = encode_body(1, [SensorReading("s", 0.0, "c", 1.0)] * 5)
    with pytest.raises(ProtocolError) as exc:
        decode_body(body, max_records=4)
    assert exc.value.code == CloseCode.TOO_MANY_RECORDS


@pytest.mark.parametrize("junk", [b"", b"\xff\xff", cbor2.dumps({"a": 1}), cbor2.dumps([99]),
                                  cbor2.dumps([4, "one", 0.0, b""]), "text"])
def test_malformed_messages_are_protocol_errors(junk: bytes | str) -> None:
    _, hub = pair()
    with pytest.raises(ProtocolError) as exc:
        hub.receive(junk, 1.0)
    assert exc.value.code == CloseCode.PROTOCOL_ERROR


def test_a_rejected_frame_is_reported_and_counts_as_done() -> None:
    gw, hub = pair()
    hub.receive(gw.data(1, b"poison", 1.0), 1.0)
    events, _ = gw.receive(hub.rejected(1, "bad record", 1.0), 1.0)
    assert events == [Reject(1, "bad record")]
    assert hub.applied_set.watermark() == 1


@pytest.mark.parametrize("message", [Ack(4, []), Ack(1, [(3, 4)]), Reject(4, "bad")],
                         ids=["watermark", "range", "reject"])
def test_an_ack_or_reject_of_a_frame_never_sent_is_a_protocol_error_and_not_applied(
        message: Ack | Reject) -> None:
    """The hub may only acknowledge or reject what it can have: frames below HELLO's
    next_seq (here 2), in WELCOME's applied set (2), or sent as DATA (3).  An ACK or a
    REJECT of frame 4 -- not made yet -- would have the gateway drop it unsent when it
    is: it closes the connection (4004) instead, the message unapplied."""
    gw, _ = pair(next_seq=2, applied=IntervalSet([(1, 2)]))
    gw.data(3, b"body", 1.0)
    for fine in (Ack(2, [(3, 3)]), Reject(3, "bad")):
        assert gw.receive(encode(fine), 1.0)[0] == [fine]
    with pytest.raises(ProtocolError) as exc:
        gw.receive(encode(message), 1.0)
    assert exc.value.code == CloseCode.PROTOCOL_ERROR
    assert "frame 4, which this gateway has not sent" in exc.value.reason
    assert gw.state is State.CLOSED


def test_frames_a_lost_declared_may_be_acknowledged() -> None:
    """A LOST tells the hub of frames never sent (dropped): its ACK may cover them."""
    gw, hub = pair(next_seq=1)
    hub.receive(gw.data(1, b"body", 1.0), 1.0)
    lost = gw.lost(5, 1.0)  # 2..4 dropped unsent; 5 is the first still held
    assert lost is not None
    hub.receive(lost, 1.0)
    assert gw.receive(encode(Ack(4, [])), 1.0)[0] == [Ack(4, [])]


def test_a_lost_is_pending_exactly_while_lost_would_send_one() -> None:
    """``lost_pending`` says beforehand what ``lost`` would do (a sender about to wait for
    work checks it, so a drop made while it was busy is told at once): pending while the
    hub lacks frames below the first held, no longer once the LOST is made, and never
    towards a hub that does not take LOST."""
    gw, hub = pair(next_seq=1)
    hub.receive(gw.data(1, b"body", 1.0), 1.0)
    assert gw.lost_pending(2)  # frame 1 sent, not acknowledged: the hub lacks it
    gw.receive(encode(Ack(1, [])), 1.0)
    assert not gw.lost_pending(2)  # the hub has frame 1: nothing below 2 is missing
    assert gw.lost_pending(5)  # 2..4 were dropped unsent
    assert gw.lost(5, 1.0) is not None
    assert not gw.lost_pending(5) and gw.lost(5, 1.0) is None
    assert gw.lost_pending(7) and gw.lost(7, 1.0) is not None  # 5, 6 dropped since
    old = GatewayConnection("ate-01", "t", "e", 1, now=0.0)
    old.hello(0.0)
    old.receive(encode(Welcome(1, [], 5.0, 1 << 20, 1000)), 0.0)  # no "lost" in it
    assert not old.lost_pending(5) and old.lost(5, 1.0) is None


def test_heartbeat_sends_pings_and_declares_a_silent_peer_dead_after_two_intervals() -> None:
    gw, hub = pair()  # heartbeat 5 s
    assert gw.next_deadline() == 5.0
    ping = gw.on_timer(5.0)
    assert ping is not None
    _, pong = hub.receive(ping, 5.0)
    assert pong is not None
    gw.receive(pong, 5.0)
    assert gw.rtt == 0.0
    assert gw.on_timer(9.0) is None  # heard from the hub at 5.0
    with pytest.raises(ProtocolError) as exc:
        gw.on_timer(15.0)
    assert exc.value.code == CloseCode.HEARTBEAT_TIMEOUT


def test_a_message_arriving_after_a_heartbeat_close_is_told_the_heartbeat_reason() -> None:
    """The timer closed the connection while the peer's message was on its way: the
    connection ends for the heartbeat, as logged, not for "message after close"."""
    gw, hub = pair()  # heartbeat 5 s
    with pytest.raises(ProtocolError) as timed_out:
        gw.on_timer(11.0)
    late = hub.applied(1, 11.0)
    with pytest.raises(ProtocolError) as exc:
        gw.receive(late, 11.0)
    assert (exc.value.code, exc.value.reason) == (CloseCode.HEARTBEAT_TIMEOUT,
                                                  timed_out.value.reason)


def test_frame_bodies_round_trip_records_with_a_source_table() -> None:
    recs = [PartResult("tester", 1.5, "L1", "W1", 1, s, str(s), s, 2 * s, 1, 1, True)
            for s in range(3)] + [SensorReading("mqtt", 2.0, "handler.temp", 25.5, "C")]
    first_rid, sources, wire = decode_body(encode_body(42, recs), 100)
    assert first_rid == 42 and sources == ["tester", "mqtt"]
    from edgegw.records import from_wire

    assert [from_wire(w, sources) for w in wire] == recs


def test_a_record_short_of_fields_is_named_in_the_terms_of_the_protocol_table() -> None:
    """docs/protocol.md lists a record's fields after ts: the error counts the same way."""
    from edgegw.records import RecordError, from_wire

    with pytest.raises(RecordError) as exc:
        from_wire([5, 0, 1.5, "L1", "W1", 1, 0, "p1"], ["tester"])
    assert str(exc.value) == (
        "PartResult (kind 5) needs at least 10 fields after ts (lot_id, wafer_id, head, site, "
        "part_id, x, y, hard_bin, soft_bin, passed), got 5")
    assert from_wire([11, 0, 1.5, "ch", 2.0], ["tester"]).value == 2.0  # unit defaults


# -- source positions (docs/protocol.md section 4.1) -----------------------------------------


def test_a_gateway_starting_afresh_asks_and_the_hub_hands_back_what_it_keeps() -> None:
    gw = GatewayConnection("ate-01", "secret", "epoch-b", 1, now=0.0, resume=True)
    hub = HubConnection(now=0.0)
    (hello,), _ = hub.receive(gw.hello(0.0), 0.0)
    assert hello.resume
    (welcome,), _ = gw.receive(hub.accept(IntervalSet(), 0.0, {"tail": {"files": {}}}), 0.0)
    assert welcome.positions and welcome.resume == {"tail": {"files": {}}}
    # a hub that keeps none answers an empty map: "nothing", not "I do not keep them"
    gw = GatewayConnection("ate-01", "secret", "epoch-c", 1, now=0.0, resume=True)
    hub = HubConnection(now=0.0)
    hub.receive(gw.hello(0.0), 0.0)
    (welcome,), _ = gw.receive(hub.accept(IntervalSet(), 0.0, None), 0.0)
    assert welcome.resume == {}


def test_a_gateway_that_does_not_ask_is_handed_nothing_back() -> None:
    gw, _ = pair()
    assert gw.welcome is not None and gw.welcome.positions and gw.welcome.resume is None
    assert b"resume" not in gw.hello(0.0)


def test_positions_of_a_frame_sent_reach_the_hub_and_an_unsent_one_is_a_fault() -> None:
    gw, hub = pair()
    hub.receive(gw.data(1, encode_body(1, []), 0.0), 0.0)
    message = gw.positions(1, {"tail": 7}, 0.0)
    assert message is not None
    (told,), _ = hub.receive(message, 0.0)
    assert (told.seq, told.positions) == (1, {"tail": 7})
    with pytest.raises(RuntimeError):
        gw.positions(2, {"tail": 8}, 0.0)  # the gateway's own rule: after DATA 2 only
    with pytest.raises(ProtocolError, match="POSITIONS of frame 2, which this hub has neither"):
        hub.receive(cbor2.dumps([10, 2, {"tail": 8}]), 0.0)


def test_no_positions_go_to_a_hub_that_does_not_take_them() -> None:
    _, hub = pair()
    hub.takes_positions = False  # (as a hub that predates them: no "positions" key)
    gw2 = GatewayConnection("ate-01", "secret", "epoch-a", 1, now=0.0, resume=True)
    hub2 = HubConnection(now=0.0)
    hub2.takes_positions = False
    hub2.receive(gw2.hello(0.0), 0.0)
    (welcome,), _ = gw2.receive(hub2.accept(IntervalSet(), 0.0, {"tail": 1}), 0.0)
    assert not welcome.positions and welcome.resume is None
    gw2.data(1, encode_body(1, []), 0.0)
    assert gw2.positions(1, {"tail": 1}, 0.0) is None
    with pytest.raises(ProtocolError, match="unexpected POSITIONS from gateway"):
        hub.receive(cbor2.dumps([10, 1, {"tail": 1}]), 0.0)
