"""Frames a gateway's ``drop_oldest`` queue drops while it is connected (docs/protocol.md
section 4, LOST): the hub hears of them at once, counts exactly the ones it never got, and
keeps no hole waiting for them -- before LOST only the next HELLO told it, and until then
each such run of frames was a hole (past ``max_holes`` the hub closed the link, 4004)."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import cbor2
import pytest
import trio
from hubtools import gateway_config, gateway_welcomed, hub_config, start_hub
from hypothesis import given, settings
from hypothesis import strategies as st
from peer_gateway import PeerGateway, sensor
from peer_gateway import data as peer_data
from peer_gateway import rows as peer_rows
from peer_hub import ACK, DATA, LOST, PING, PONG, PeerHub, Session, welcome
from trio_websocket import ConnectionClosed, open_websocket_url

from edgegw.config import build
from edgegw.gateway import Gateway
from edgegw.hub import HubConfig, Ingest
from edgegw.hub.cluster.pgstore import ClusterStore
from edgegw.protocol import (
    MAX_DROPPED_RANGES,
    Ack,
    CloseCode,
    Data,
    Declared,
    GatewayConnection,
    Hello,
    HubConnection,
    IntervalSet,
    Lost,
    ProtocolError,
    Welcome,
    decode,
    encode,
    encode_body,
)
from edgegw.records import SensorReading


def readings(n: int, i: int) -> list[SensorReading]:
    return [SensorReading("s", float(i), "c", float(j)) for j in range(n)]


# --- the two ends, sans-IO ------------------------------------------------------------


def open_hub(next_seq: int = 1, applied: list[tuple[int, int]] | None = None
             ) -> HubConnection:
    hub = HubConnection()
    hub.receive(encode(Hello("gw", "t", "e", next_seq)), 0.0)
    hub.accept(IntervalSet(applied or []), 0.0)
    return hub


def data(seq: int) -> bytes:
    return encode(Data(seq, 0.0, encode_body(seq, [])))


def test_lost_and_the_welcome_key_round_trip_and_a_bad_lost_is_malformed() -> None:
    assert decode(encode(Lost(41))) == Lost(41)
    assert cbor2.loads(encode(Lost(41))) == [LOST, 41]
    w = Welcome(3, [], 5.0, 1 << 20, 1000, None, True)
    assert cbor2.loads(encode(w))[1]["lost"] is True and decode(encode(w)).lost
    assert "lost" not in cbor2.loads(encode(Welcome(3, [], 5.0, 1 << 20, 1000)))[1]
    # any value but true: the hub does not take LOST (unknown keys are ignored anyway)
    plain = cbor2.loads(encode(Welcome(3, [], 5.0, 1 << 20, 1000)))
    plain[1]["lost"] = 1
    assert decode(cbor2.dumps(plain)).lost is False
    for bad in ([LOST, 0], [LOST, True], [LOST, 1.0], [LOST, 1, 2]):
        with pytest.raises(ProtocolError) as err:
            decode(cbor2.dumps(bad))
        assert err.value.code == CloseCode.PROTOCOL_ERROR


def test_the_hub_counts_as_lost_only_frames_neither_applied_nor_received() -> None:
    hub = open_hub(next_seq=3, applied=[(1, 2), (5, 5)])  # 5 applied by an earlier session
    for seq in (3, 7):
        hub.receive(data(seq), 0.0)  # received, being applied
    events, _ = hub.receive(encode(Lost(10)), 0.0)
    assert events == [Declared(10, 4)]  # 4, 6, 8 and 9
    ack = decode(hub.lost_recorded(events[0], 0.0))
    assert ack == Ack(9, [])
    # a LOST that declares nothing new counts nothing
    assert hub.receive(encode(Lost(8)), 0.0)[0] == [Declared(8, 0)]


def test_a_lost_fills_the_holes_a_hub_would_otherwise_close_the_link_for() -> None:
    # 20 frames with a run missing after each: past max_holes (8) the link is closed
    hub = open_hub()
    with pytest.raises(ProtocolError, match="sequence gap"):
        for seq in range(1, 40, 2):
            hub.receive(data(seq), 0.0)
    # the same frames with a LOST every fourth frame: the holes below it are filled
    hub = open_hub()
    for seq in range(1, 40, 2):
        if seq % 8 == 1 and seq > 1:
            hub.receive(encode(Lost(seq)), 0.0)
        hub.receive(data(seq), 0.0)


def test_a_frame_below_a_lost_is_a_protocol_error_and_a_hub_without_lost_refuses_it() -> None:
    hub = open_hub(applied=[(2, 2)])
    hub.receive(encode(Lost(5)), 0.0)
    # applied before this connection: a duplicate, as ever
    events, _ = hub.receive(data(2), 0.0)
    assert [type(e).__name__ for e in events] == ["Duplicate"]
    with pytest.raises(ProtocolError, match="frame 3 sent after a LOST") as err:
        hub.receive(data(3), 0.0)
    assert err.value.code == CloseCode.PROTOCOL_ERROR
    old = HubConnection()
    old.takes_lost = False
    old.receive(encode(Hello("gw", "t", "e", 1)), 0.0)
    assert decode(old.accept(IntervalSet(), 0.0)).lost is False
    with pytest.raises(ProtocolError, match="unexpected LOST"):
        old.receive(encode(Lost(2)), 0.0)


def open_gateway(next_seq: int, lost: bool, applied: list[tuple[int, int]] | None = None
                 ) -> GatewayConnection:
    gw = GatewayConnection("gw", "t", "e", next_seq)
    gw.hello(0.0)
    gw.receive(encode(Welcome(3, applied or [], 5.0, 1 << 20, 1000, None, lost)), 0.0)
    return gw


def test_the_gateway_declares_only_frames_the_hub_has_not_acknowledged() -> None:
    gw = open_gateway(next_seq=4, lost=True, applied=[(6, 6)])
    assert gw.lost(4, 0.0) is None  # below the HELLO's next_seq: the hub knows already
    gw.receive(encode(Ack(5, [])), 0.0)
    assert gw.lost(7, 0.0) is None  # 1..6 all acknowledged or applied: nothing to declare
    assert decode(gw.lost(9, 0.0) or b"") == Lost(9)  # 7 and 8 dropped unacknowledged
    assert gw.lost(9, 0.0) is None  # told once
    with pytest.raises(RuntimeError, match="below the LOST"):
        gw.data(8, encode_body(8, []), 0.0)
    gw.data(9, encode_body(9, []), 0.0)
    # to a hub that does not take LOST nothing is sent: its next HELLO tells it
    assert open_gateway(next_seq=1, lost=False).lost(9, 0.0) is None



# --- which frames the gateway dropped, which the hub lost --------------------------------


def test_hello_and_lost_name_the_frames_the_gateway_dropped_and_a_bad_list_is_malformed(
        ) -> None:
    hello = Hello("gw", "t", "e", 10, dropped=((4, 5),))
    assert cbor2.loads(encode(hello))[1]["dropped"] == [[4, 5]]
    assert decode(encode(hello)) == hello
    # a gateway from before it: no key, and the hub knows it does not say
    assert "dropped" not in cbor2.loads(encode(Hello("gw", "t", "e", 10)))[1]
    assert decode(encode(Hello("gw", "t", "e", 10))).dropped is None
    assert decode(encode(Hello("gw", "t", "e", 10, dropped=()))).dropped == ()
    assert cbor2.loads(encode(Lost(9, ((2, 3),)))) == [LOST, 9, [[2, 3]]]
    assert decode(encode(Lost(9, ((2, 3),)))) == Lost(9, ((2, 3),))
    assert cbor2.loads(encode(Lost(9))) == [LOST, 9]  # what a hub before it takes
    w = Welcome(3, [], 5.0, 1 << 20, 1000, None, True, dropped=True)
    assert cbor2.loads(encode(w))[1]["dropped"] is True and decode(encode(w)).dropped
    assert "dropped" not in cbor2.loads(encode(Welcome(3, [], 5.0, 1 << 20, 1000)))[1]
    hello_item = cbor2.loads(encode(hello))
    for bad in ([[1]], [[3, 2]], [[0, 1]], 7, [[1, True]], [[i, i] for i in range(1, 66)]):
        hello_item[1]["dropped"] = bad
        for message in (hello_item, [LOST, 9, bad]):
            with pytest.raises(ProtocolError, match="dropped") as err:
                decode(cbor2.dumps(message))
            assert err.value.code == CloseCode.PROTOCOL_ERROR


def test_the_hub_tells_frames_the_gateway_dropped_from_frames_it_acknowledged_and_lost(
        ) -> None:
    # the hub has 1..3 and 6..8; the gateway holds nothing below 10 and dropped 4 and 8
    # (8 was sent before it was dropped: the hub applied it)
    hub = HubConnection()
    hub.receive(encode(Hello("gw", "t", "e", 10, dropped=((4, 4), (8, 8)))), 0.0)
    hub.accept(IntervalSet([(1, 3), (6, 8)]), 0.0)
    # 4, 5 and 9 are lost: 4 dropped by the gateway, 5 and 9 acknowledged and lost since
    assert (hub.declared_lost, hub.declared_dropped) == (3, 1)
    # a LOST the same way, counting only the frames it declares
    hub.receive(data(12), 0.0)
    events, _ = hub.receive(encode(Lost(14, ((10, 11), (13, 13)))), 0.0)
    assert events == [Declared(14, 3, 3)]
    events, _ = hub.receive(encode(Lost(16, ((15, 15),))), 0.0)
    assert events == [Declared(16, 2, 1)]
    # a gateway that does not say: the hub does not know which
    old = open_hub(next_seq=10, applied=[(1, 3)])
    assert (old.declared_lost, old.declared_dropped) == (6, None)
    assert old.receive(encode(Lost(12)), 0.0)[0] == [Declared(12, 2, None)]


def test_the_gateway_names_its_drops_below_what_it_declares_to_a_hub_that_takes_them(
        ) -> None:
    gw = GatewayConnection("gw", "t", "e", 10, dropped=[(2, 3), (8, 12)])
    assert decode(gw.hello(0.0)).dropped == ((2, 3), (8, 9))
    # a store that kept more runs than a message holds: the oldest are merged
    many = GatewayConnection("gw", "t", "e", 1000, dropped=[(i, i) for i in range(1, 200, 2)])
    told = decode(many.hello(0.0)).dropped
    assert told is not None and len(told) == MAX_DROPPED_RANGES
    assert told[0] == (1, 73) and told[1:] == tuple((i, i) for i in range(75, 200, 2))
    gw.receive(encode(Welcome(3, [], 5.0, 1 << 20, 1000, None, True, dropped=True)), 0.0)
    assert decode(gw.lost(14, 0.0, [(8, 12), (20, 21)]) or b"") == Lost(14, ((8, 12),))
    # a hub that takes LOST but not its dropped ranges gets the LOST it knows
    old = open_gateway(next_seq=1, lost=True)
    assert decode(old.lost(5, 0.0, [(1, 4)]) or b"") == Lost(5)


@settings(max_examples=int(os.environ.get("EDGEGW_FUZZ_EXAMPLES", "300")), deadline=None,
          derandomize=not os.environ.get("EDGEGW_FUZZ_RANDOM"), database=None)
@given(ops=st.lists(st.sampled_from("aaassspl"), max_size=120), cap=st.integers(1, 6),
       window=st.integers(1, 4))
def test_the_two_ends_agree_on_every_frame_whatever_is_dropped_when(
        ops: list[str], cap: int, window: int) -> None:
    """The two sans-IO ends joined back to back, a drop_oldest queue of ``cap`` frames in
    between, steps in any order: ``a`` a frame appended (the oldest dropped when full,
    sent or not), ``s`` the lowest unsent frame sent (at most ``window`` unacknowledged),
    ``p`` the hub applies what it received, in order, and ACKs, ``l`` the gateway's LOST
    check (then the hub applies: nothing below the queue is left waiting).  No step is a
    protocol error; at the end every frame is applied or lost, once, and the hub's lost
    count is exactly the frames dropped before they were sent -- each one named by the
    gateway's dropped ranges, so none is taken for a frame the hub lost."""
    gw = GatewayConnection("gw", "t", "e", 1)
    hub = HubConnection()
    hub.receive(gw.hello(0.0), 0.0)
    gw.receive(hub.accept(IntervalSet(), 0.0), 0.0)
    queue: dict[int, bool] = {}  # seq -> sent (insertion order is seq order)
    next_seq, in_flight = 1, set[int]()
    received: list[Data | Declared] = []
    applied: set[int] = set()
    lost = dropped_unsent = 0
    dropped = IntervalSet()  # every frame dropped unacknowledged, sent or not

    def send(message: bytes) -> None:
        for ev in hub.receive(message, 0.0)[0]:
            assert isinstance(ev, (Data, Declared)), ev
            received.append(ev)

    def apply() -> None:
        nonlocal lost
        for ev in received:
            if isinstance(ev, Declared):
                assert ev.dropped == ev.count, ev
                lost += ev.count
                ack = hub.lost_recorded(ev, 0.0)
            else:
                assert ev.seq not in applied
                applied.add(ev.seq)
                ack = hub.applied(ev.seq, 0.0)
            got = gw.receive(ack, 0.0)[0][0]
            assert isinstance(got, Ack)
            done = set(range(1, got.watermark + 1)).union(
                *(range(lo, hi + 1) for lo, hi in got.ranges))
            for seq in done & set(queue):
                del queue[seq]
            in_flight.difference_update(done)
        received.clear()

    def declare() -> None:
        message = gw.lost(min(queue, default=next_seq), 0.0, dropped.ranges())
        if message is not None:
            send(message)

    for op in [*ops, "l", "p"]:
        if op == "a":
            if len(queue) >= cap:
                seq = next(iter(queue))
                dropped_unsent += not queue.pop(seq)
                dropped.add(seq)
                dropped.cap(MAX_DROPPED_RANGES)
                in_flight.discard(seq)  # its ACK may still come: nothing waits for it
            queue[next_seq] = False
            next_seq += 1
        elif op == "s":
            unsent = [q for q, sent in queue.items() if not sent]
            if unsent and len(in_flight) < window:
                queue[unsent[0]] = True
                in_flight.add(unsent[0])
                send(gw.data(unsent[0], encode_body(unsent[0], []), 0.0))
        elif op == "p":
            apply()
        else:  # a LOST check, then the hub applies: no hole is left below the queue
            declare()
            apply()
            assert hub.applied_set.watermark() >= min(queue, default=next_seq) - 1
    while queue:  # the rest goes out
        for seq in [q for q, sent in queue.items() if not sent]:
            queue[seq] = True
            send(gw.data(seq, encode_body(seq, []), 0.0))
        apply()
    declare()
    apply()
    assert lost == dropped_unsent
    assert len(applied) + lost == next_seq - 1
    assert decode(hub.ack(0.0)) == Ack(next_seq - 1, [])


# --- a real gateway and a real hub ------------------------------------------------------


async def test_frames_dropped_while_connected_are_declared_at_once_and_leave_no_hole(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Twelve bursts, each far more than the 3-frame queue holds, each while the gateway is
    connected and its uplink cannot run: each leaves a run of frames the hub never got.
    The hub counts each run at once, on the same connection (one handshake), closes
    nothing for the holes (12 runs, max_holes is 8), and in the end every frame is applied
    or lost, exactly once -- each lost one named as dropped by the gateway, none taken for
    a frame the hub acknowledged and lost."""
    async with trio.open_nursery() as nursery:
        hub, port = await start_hub(nursery, hub_config(tmp_path / "hub"))
        cfg = gateway_config(tmp_path / "gw", port,
                             queue={"max_frames": 3, "policy": "drop_oldest"},
                             batch={"max_records": 10, "max_delay_ms": 1000},
                             uplink={"window_frames": 2})
        gw = Gateway(cfg)
        await nursery.start(gw.run)
        connects = gw.metrics.counter("uplink_connects_total")
        with trio.fail_after(10):
            while connects.total() < 1:
                await trio.sleep(0.01)
        i = 0
        for _burst in range(12):
            # read before the burst: its LOST may be recorded before the puts return
            lost_before = hub.stats()["gateways"]["ate-01"]["frames_lost"]
            for _ in range(20):  # no checkpoint between them: the uplink sends nothing
                await gw.sink.put(readings(10, i), source="s")
                i += 1
            with trio.fail_after(10):  # told on this connection, not at a reconnect
                while hub.stats()["gateways"]["ate-01"]["frames_lost"] == lost_before:
                    await trio.sleep(0.01)
        assert await gw.drain(10), "the hub did not acknowledge everything"
        st = hub.stats()["gateways"]["ate-01"]
        last = gw.store.next_seq - 1
        assert st["frames_applied"] + st["frames_lost"] == last
        assert st["frames_lost"] <= gw.store.stats()["dropped_frames"]
        assert connects.total() == 1
        assert hub.metrics.counter("hub_protocol_errors_total").total() == 0
        told = [int(m.group(1)) for r in caplog.records if (m := re.match(
            r"gateway ate-01: (\d+) frame\(s\) below seq \d+ \(told by a LOST while "
            r"connected\) were dropped by the gateway", r.getMessage()))]
        assert len(told) >= 12 and sum(told) == st["frames_lost"], caplog.text[-2000:]
        assert hub.metrics.counter("hub_acknowledged_frames_lost_total").total() == 0
        assert "acknowledged are no longer" not in caplog.text
        nursery.cancel_scope.cancel()


def hello_by_hand(next_seq: int = 1) -> bytes:
    """HELLO as docs/protocol.md section 2 lays it out, built without edgegw."""
    return cbor2.dumps([1, {"versions": [3], "gateway": "ate-01", "token": "s3cret",
                            "epoch": "e", "next_seq": next_seq, "heartbeat": 5.0}])

async def test_a_real_hub_acknowledges_a_lost_and_keeps_the_count_from_a_hand_built_client(
        tmp_path: Path) -> None:
    """docs/protocol.md, from CBOR built by hand: frames 1, 3, 5, ... 21 (10 holes would
    pass max_holes 8), with a LOST 19 before the ninth hole would close the link: the ACK
    after the LOST says every frame below it is done, and /api/stats counts the 9 never
    sent as lost."""
    async with trio.open_nursery() as nursery:
        hub, port = await start_hub(nursery, hub_config(tmp_path))
        async with open_websocket_url(f"ws://127.0.0.1:{port}/ws/gateway") as ws:
            await ws.send_message(hello_by_hand())
            w = cbor2.loads(await ws.get_message())
            assert w[0] == 2 and w[1]["lost"] is True
            acks: list[list[object]] = []

            async def sent(message: list[object]) -> None:
                await ws.send_message(cbor2.dumps(message))

            for seq in range(1, 18, 2):
                await sent([DATA, seq, 0.0, cbor2.dumps([seq, ["s"], []])])
            await sent([LOST, 19])
            for seq in (19, 21):
                await sent([DATA, seq, 0.0, cbor2.dumps([seq, ["s"], []])])
            with trio.fail_after(10):
                while not acks or acks[-1][1] != 19 or acks[-1][2] != [[21, 21]]:
                    message = cbor2.loads(await ws.get_message())
                    if message[0] == PING:
                        await sent([PONG, message[1]])
                    elif message[0] == ACK:
                        acks.append(message)
            assert [18, []] in [a[1:] for a in acks]  # the LOST's own ACK
        st = hub.stats()["gateways"]["ate-01"]
        assert (st["frames_applied"], st["frames_lost"]) == (11, 9)
        assert hub.metrics.counter("hub_protocol_errors_total").total() == 0
        nursery.cancel_scope.cancel()


async def test_a_real_hub_tells_named_drops_from_its_own_losses_for_a_hand_built_client(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """docs/protocol.md section 4, from CBOR built by hand: a HELLO whose ``next_seq`` is 10
    names 1-2 and 5-6 as dropped, to a hub that has none of 1-9 (its store lost them):
    4 dropped by the gateway, 5 acknowledged and lost by the hub.  Its WELCOME takes
    LOST's ``dropped``: a three-item LOST 14 naming 13, after frames 10 and 12, declares
    13 dropped and 11 lost by the hub."""
    async with trio.open_nursery() as nursery:
        hub, port = await start_hub(nursery, hub_config(tmp_path))
        async with open_websocket_url(f"ws://127.0.0.1:{port}/ws/gateway") as ws:
            hello = cbor2.loads(hello_by_hand(next_seq=10))
            hello[1]["dropped"] = [[5, 6], [1, 2]]  # any order
            await ws.send_message(cbor2.dumps(hello))
            w = cbor2.loads(await ws.get_message())
            assert w[0] == 2 and w[1]["lost"] is True and w[1]["dropped"] is True
            assert w[1]["applied"] == [[1, 9]]
            for seq in (10, 12):
                await ws.send_message(cbor2.dumps([DATA, seq, 0.0, cbor2.dumps([seq, ["s"], []])]))
            await ws.send_message(cbor2.dumps([LOST, 14, [[13, 13]]]))
            with trio.fail_after(10):
                while True:
                    message = cbor2.loads(await ws.get_message())
                    if message[0] == PING:
                        await ws.send_message(cbor2.dumps([PONG, message[1]]))
                    elif message[0] == ACK and message[1] == 13:
                        break
        st = hub.stats()["gateways"]["ate-01"]
        assert (st["frames_applied"], st["frames_lost"]) == (2, 11)
        assert hub.metrics.counter("hub_acknowledged_frames_lost_total").total() == 6
        assert hub.metrics.counter("hub_protocol_errors_total").total() == 0
        said = [r.getMessage() for r in caplog.records
                if r.getMessage().startswith("gateway ate-01: ")]
        assert said == [
            "gateway ate-01: 4 frame(s) below seq 10 were dropped by the gateway before the "
            "hub had them (its queue full under drop_oldest): counted in frames_lost",
            "gateway ate-01: 5 frame(s) below seq 10 that this hub acknowledged are no longer "
            "in its store (its data directory restored from an older copy, or its disk lost "
            "what it had written): their records are lost; counted in frames_lost",
            "gateway ate-01: 1 frame(s) below seq 14 (told by a LOST while connected) were "
            "dropped by the gateway before the hub had them (its queue full under "
            "drop_oldest): counted in frames_lost",
            "gateway ate-01: 1 frame(s) below seq 14 (told by a LOST while connected) that this "
            "hub acknowledged are no longer in its store (its data directory restored from an "
            "older copy, or its disk lost what it had written): their records are lost; "
            "counted in frames_lost"], said
        nursery.cancel_scope.cancel()


async def test_a_real_hub_closes_a_frame_sent_below_a_lost_with_4004(tmp_path: Path) -> None:
    """After ``LOST 5`` a DATA 3 (never sent before) is a gateway fault: the hub closes the
    connection with 4004 naming it, counts it, and serves on; frames 1-4 are counted lost
    once, by the LOST or by the next HELLO."""
    async with trio.open_nursery() as nursery:
        hub, port = await start_hub(nursery, hub_config(tmp_path))
        async with open_websocket_url(f"ws://127.0.0.1:{port}/ws/gateway") as ws:
            await ws.send_message(hello_by_hand())
            assert cbor2.loads(await ws.get_message())[0] == 2
            await ws.send_message(cbor2.dumps([LOST, 5]))
            await ws.send_message(cbor2.dumps([DATA, 3, 0.0, cbor2.dumps([3, ["s"], []])]))
            with trio.fail_after(10), pytest.raises(ConnectionClosed) as closed:
                while True:
                    await ws.get_message()
        assert closed.value.reason.code == CloseCode.PROTOCOL_ERROR
        assert closed.value.reason.reason == (
            "frame 3 sent after a LOST said that frames below 5 are no longer held")
        assert hub.metrics.counter("hub_protocol_errors_total").total() == 1
        # the LOST may not have been recorded before the fault ended the connection: the
        # gateway's next HELLO says the same (next_seq 5), and it is counted once
        async with open_websocket_url(f"ws://127.0.0.1:{port}/ws/gateway") as ws:
            await ws.send_message(hello_by_hand(next_seq=5))
            assert cbor2.loads(await ws.get_message())[1]["applied"] == [[1, 4]]
        assert hub.stats()["gateways"]["ate-01"]["frames_lost"] == 4
        nursery.cancel_scope.cancel()

async def collect_until_lost_names_first_held(session: Session, gw: Gateway,
                                              messages: list[list[Any]],
                                              losts: list[int],
                                              puts_done: trio.Event | None = None) -> None:
    """Into ``messages`` the gateway's DATA and LOST messages (PINGs answered), into
    ``losts`` the LOSTs' ``next_seq``, until a LOST names the first frame its store still
    holds (once ``puts_done`` is set, if given) -- for ever if none does (the caller
    bounds it; what came is in the lists)."""
    while not ((puts_done is None or puts_done.is_set())
               and losts and losts[-1] == gw.store.first_unacked):
        message = await session.recv()
        if message[0] == PING:
            await session.send([PONG, message[1]])
        elif message[0] in (DATA, LOST):
            messages.append(message[:2])
            if message[0] == LOST:
                losts.append(message[1])


def assert_no_data_below_a_lost(messages: list[list[Any]], losts: list[int]) -> None:
    """LOSTs rise, and no DATA below the last LOST before it follows one (section 4)."""
    assert losts == sorted(set(losts)), messages
    below = 0
    for kind, seq in messages:
        if kind == LOST:
            below = seq
        assert kind != DATA or seq >= below, messages


async def test_the_gateway_sends_lost_only_to_a_hub_whose_welcome_takes_it(
        tmp_path: Path) -> None:
    """Against the independent peer hub (tests/peer_hub.py), which acknowledges nothing:
    with a 2-frame window (one slot kept for live frames) and a 3-frame queue, the
    gateway sends frame 1, then drops 1, 2 and 3 (or more) for the frames put after; a
    WELCOME with ``lost: true`` gets LOSTs up to the first frame still held, and no DATA
    below a LOST follows it; a WELCOME without it gets no LOST (that hub learns of them
    from the next HELLO)."""
    for takes_lost in (True, False):
        async with trio.open_nursery() as nursery:
            gw, session = await gateway_welcomed(
                nursery, tmp_path / f"gw-{takes_lost}", PeerHub(),
                welcome(**({"lost": True} if takes_lost else {})),
                queue={"max_frames": 3, "policy": "drop_oldest"},
                batch={"max_records": 10, "max_delay_ms": 50},
                uplink={"window_frames": 2, "heartbeat_s": 5.0})
            for i in range(2):
                await gw.sink.put(readings(10, i), source="s")
            assert (await session.recv_data())[1] == 1  # one in flight: the window is full
            for i in range(2, 6):  # 6 frames into a queue of 3: 1, 2 and 3 dropped
                await gw.sink.put(readings(10, i), source="s")
            messages: list[list[Any]] = []
            losts: list[int] = []
            # with LOST: until one names the first frame still held; without: for 1 s
            with trio.fail_after(10) if takes_lost else trio.move_on_after(1.0):
                await collect_until_lost_names_first_held(session, gw, messages, losts)
            if takes_lost:
                # told as the drops came (one LOST, or several), rising, up to the first
                # frame still held (the store_overflow event's own frame may push out more)
                assert gw.store.first_unacked >= 4, messages
                assert_no_data_below_a_lost(messages, losts)
            else:
                assert not losts, messages
            await session.end()
            nursery.cancel_scope.cancel()


async def test_segments_the_spool_drops_while_connected_are_declared_too(
        tmp_path: Path) -> None:
    """The disk spool drops a whole segment at a time (docs/spool.md, Overflow): against
    the peer hub, which acknowledges nothing, 400 frames of ~1 kB overflow its 128 kB cap
    while connected; LOSTs follow the drops up to the first frame still held, and no
    DATA below a LOST follows it.  The peer answers the gateway's PINGs while the frames
    are put: 400 spool commits (an fsync each) took 10 s on a slow disk, and a peer that
    read nothing meanwhile was a silent hub to the gateway (4005 after two heartbeats)."""
    async with trio.open_nursery() as nursery:
        gw, session = await gateway_welcomed(
            nursery, tmp_path / "gw", PeerHub(), welcome(lost=True),
            spool={"dir": str(tmp_path / "spool"), "segment_bytes": 32768,
                   "max_bytes": 131072, "policy": "drop_oldest"},
            batch={"max_records": 100, "max_delay_ms": 50},
            uplink={"window_frames": 2, "heartbeat_s": 5.0})
        puts_done = trio.Event()

        async def put_all() -> None:
            for i in range(400):
                await gw.sink.put(readings(100, i), source="s")
            puts_done.set()

        nursery.start_soon(put_all)
        messages: list[list[Any]] = []
        losts: list[int] = []
        with trio.fail_after(60):
            await collect_until_lost_names_first_held(session, gw, messages, losts, puts_done)
        assert gw.store.stats()["dropped_frames"] > 0
        assert_no_data_below_a_lost(messages, losts)
        await session.end()
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("store", ["sqlite", "postgresql"])
async def test_frames_declared_lost_past_what_a_64_bit_counter_holds_saturate_it(
        tmp_path: Path, request: pytest.FixtureRequest, store: str) -> None:
    """A HELLO or a LOST may name any seq below 2^63 (docs/protocol.md section 2), so two
    epochs of one gateway may declare more frames lost than the store's 64-bit counter
    holds.  The count stops at 2^63 - 1; before, the third handshake's write failed
    (SQLite: "Python int too large", PostgreSQL: "bigint out of range") and every
    connection of that epoch ended with 1011, its frames never acknowledged."""
    big = (1 << 63) - 1
    cfg = hub_config(tmp_path)
    ingest = (Ingest(cfg) if store == "sqlite" else Ingest(cfg, store=ClusterStore(
        request.getfixturevalue("pg_dsn"), "node-a", partitions=4, connect_timeout_s=1)))
    async with trio.open_nursery() as nursery:
        port = await nursery.start(ingest.run)
        for epoch in ("e1", "e2", "e3"):
            gw = await PeerGateway.connect(port, "ate-01", "s3cret", epoch=epoch,
                                           next_seq=big)
            assert gw.first[0] == 2, gw.first  # WELCOME
            await gw.send(peer_data(big, peer_rows(1, [sensor("chuck", 25.0)])))
            with trio.fail_after(10):
                await gw.until_acked(big)
            await gw.client.close()
        stats = (await ingest.store.all_gateway_stats() if store == "postgresql"
                 else ingest.store.stats)["ate-01"]
        assert (stats.frames_applied, stats.frames_lost) == (3, big)
        assert ingest.metrics.counter("internal_errors_total").total() == 0
        nursery.cancel_scope.cancel()


async def test_a_cluster_node_records_a_lost_in_postgresql_under_the_connections_fence(
        tmp_path: Path, pg_dsn: str) -> None:
    """A cluster node (docs/cluster.md) records what a LOST declares through its store's
    fenced commit, as it does a HELLO's: four bursts while connected, then PostgreSQL's
    counters hold every frame applied or lost, once, with no second handshake."""
    cfg = build(HubConfig, {
        "hub": {"port": 0, "data_dir": str(tmp_path / "hub"), "heartbeat_s": 1.0,
                "cluster": {"node_id": "node-a", "postgres_dsn": "(given to the store)",
                            "partitions": 4}},
        "gateways": {"ate-01": {"token": "s3cret"}},
    })
    store = ClusterStore(pg_dsn, "node-a", partitions=4, connect_timeout_s=1)

    async def counts() -> tuple[int, int]:
        st = (await store.all_gateway_stats()).get("ate-01")
        return (st.frames_applied, st.frames_lost) if st else (0, 0)

    async with trio.open_nursery() as nursery:
        port = await nursery.start(Ingest(cfg, store=store).run)
        gw = Gateway(gateway_config(tmp_path / "gw", port,
                                    queue={"max_frames": 3, "policy": "drop_oldest"},
                                    batch={"max_records": 10, "max_delay_ms": 1000},
                                    uplink={"window_frames": 2}))
        await nursery.start(gw.run)
        connects = gw.metrics.counter("uplink_connects_total")
        with trio.fail_after(20):
            while connects.total() < 1:
                await trio.sleep(0.01)
        for burst in range(4):
            # read before the burst: its LOST may be recorded before the puts return
            lost_before = (await counts())[1]
            for i in range(20):  # no checkpoint between them: the uplink sends nothing
                await gw.sink.put(readings(10, burst * 20 + i), source="s")
            with trio.fail_after(20):
                while (await counts())[1] == lost_before:
                    await trio.sleep(0.05)
        assert await gw.drain(20), "the node did not acknowledge everything"
        with trio.fail_after(20):
            while sum(await counts()) != gw.store.next_seq - 1:
                await trio.sleep(0.05)
        lost = (await counts())[1]
        assert 0 < lost <= gw.store.stats()["dropped_frames"]
        assert connects.total() == 1
        nursery.cancel_scope.cancel()
