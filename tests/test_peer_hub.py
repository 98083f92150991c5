"""docs/protocol.md, the gateway's side: edgegw's gateway against an independent hub peer.

tests/peer_hub.py was written from the document alone (wsproto + cbor2); here it plays the
hub for a real ``Gateway`` with a simulated tester and checks what the document asks of a
gateway: the probe before the handshake, HELLO's fields, data frames numbered without
gaps with consecutive record ids, the layout for the version WELCOME named, answering
PING, what it resends after a reconnect, closing on a WELCOME it cannot accept, and its
going-away close.
"""

from __future__ import annotations

import time
import zlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import cbor2
import pytest
import trio
from hubtools import gateway_config
from peer_hub import (
    ACK,
    DATA,
    HELLO,
    PING,
    PONG,
    REJECT,
    PeerHub,
    Session,
    ack_of,
    records_in,
    tags_in,
    welcome,
)
from wsclient import Closed

from edgegw.gateway import Gateway

TESTER = {"name": "tester", "type": "simulated", "lots": 1, "wafers": 1, "sites": 1,
          "tests_per_part": 1, "wafer_diameter_dies": 12, "parts_per_second": 400.0,
          "max_parts": 60}


@asynccontextmanager
async def gateway_against_peer(tmp: Path, spool: dict[str, Any] | None = None,
                               **uplink: Any) -> AsyncIterator[PeerHub]:
    """A peer hub and a gateway with a simulated tester (``spool``: the [spool] table, a
    disk spool; else frames wait in memory)."""
    async with peer_and_gateway(tmp, spool, **uplink) as (hub, _):
        yield hub


@asynccontextmanager
async def peer_and_gateway(tmp: Path, spool: dict[str, Any] | None = None,
                           **uplink: Any) -> AsyncIterator[tuple[PeerHub, Gateway]]:
    """``gateway_against_peer``, the gateway too."""
    hub = PeerHub()
    async with trio.open_nursery() as nursery:
        port = await nursery.start(hub.run)
        sections: dict[str, Any] = {} if spool is None else {"spool": spool}
        cfg = gateway_config(tmp, port, sources=[TESTER], batch={"max_records": 20},
                             uplink={"heartbeat_s": 5.0, **uplink}, **sections)
        gateway = Gateway(cfg)
        await nursery.start(gateway.run)
        with trio.fail_after(15):
            yield hub, gateway
            for session in hub.open:
                await session.end()
        nursery.cancel_scope.cancel()


async def failures_counted(gateway: Gateway, reason: str) -> None:
    """Until the gateway's ``edgegw_uplink_failures_total{reason}`` has counted one: what
    an operator's alert tells a broken hub by from a lost link."""
    while not gateway.stats()["metrics"].get("uplink_failures_total", {}).get(
            f"reason={reason}"):
        await trio.sleep(0.01)


async def hello_of(hub: PeerHub) -> tuple[Session, dict[str, Any]]:
    session = await hub.sessions.receive()
    hello = await session.recv()
    assert hello[0] == HELLO and len(hello) == 2
    return session, hello[1]


async def until_closed(session: Session) -> tuple[int, str]:
    try:
        while True:
            message = await session.recv()
            if message[0] == PING:
                await session.send([PONG, message[1]])
    except Closed as closed:
        return closed.code, closed.reason


async def test_probe_then_hello_with_the_documented_fields(tmp_path: Path) -> None:
    """Sections 4.1 and 7.1: a plain GET probe first, then HELLO with versions [1, 2, 3],
    id, token, an epoch of at most 128 characters, next_seq 1 on a fresh store, the
    configured heartbeat as a float, and no `compression` key when it does not compress."""
    async with gateway_against_peer(tmp_path, heartbeat_s=3.0) as hub:
        _, hello = await hello_of(hub)
        assert hub.probes >= 1 and hub.probe_lines[0] == "GET /ws/gateway HTTP/1.1"
        assert hello["versions"] == [1, 2, 3]
        assert (hello["gateway"], hello["token"]) == ("ate-01", "s3cret")
        assert isinstance(hello["epoch"], str) and 0 < len(hello["epoch"]) <= 128
        assert hello["next_seq"] == 1
        assert hello["heartbeat"] == 3.0 and isinstance(hello["heartbeat"], float)
        assert "compression" not in hello


@pytest.mark.parametrize("version,layouts", [(3, {"columns"}), (1, {"rows"})])
async def test_frames_are_numbered_without_gaps_with_consecutive_record_ids(
        tmp_path: Path, version: int, layouts: set[str]) -> None:
    """Sections 3 and 5: seq 1, 2, 3, ...; each body's first_rid follows the previous
    frame's records; DATA is [4, seq, sent_at (float), body (bytes)], sent_at the send time
    in seconds since the Unix epoch; a v1 hub gets rows only."""
    async with gateway_against_peer(tmp_path) as hub:
        session, _ = await hello_of(hub)
        await session.send(welcome(version=version))
        next_rid, seen = 1, set()
        for seq in range(1, 4):
            message = await session.recv_data()
            assert message[0] == DATA and len(message) == 4
            assert message[1] == seq and isinstance(message[2], float)
            assert abs(message[2] - time.time()) < 60, message[2]  # a date, this machine's
            assert isinstance(message[3], bytes)
            first_rid, n, layout = records_in(message[3])
            assert first_rid == next_rid and n >= 1
            next_rid += n
            seen.add(layout)
            await session.send([ACK, seq, []])
        if version == 3:
            seen.discard("rows")  # the gateway may send any frame as rows
            assert seen <= layouts
        else:
            assert seen == layouts


async def test_a_reconnect_resends_exactly_the_unacknowledged_frames(tmp_path: Path) -> None:
    """Sections 4 and 6: after a close, HELLO's next_seq is the lowest frame still
    unacknowledged; frames in WELCOME's `applied` are not sent again, the others are; an
    ACK's ranges count as acknowledged too."""
    async with gateway_against_peer(tmp_path) as hub:
        session, hello = await hello_of(hub)
        await session.send(welcome())
        frames = [await session.recv_data() for _ in range(4)]
        assert [f[1] for f in frames] == [1, 2, 3, 4]
        await session.send([ACK, 1, [[3, 3]]])  # 1 and 3 acknowledged, 2 and 4 not
        # the ACK is read before the close: a PING round trip after it
        await session.send([PING, 42.0])
        while (message := await session.recv())[0] != PONG:
            pass
        assert message == [PONG, 42.0]
        await session.close(1011, "peer hub restarts")
        session, again = await hello_of(hub)
        assert again["epoch"] == hello["epoch"] and again["next_seq"] == 2
        await session.send(welcome(applied=[[1, 1], [3, 4]]))  # 4 applied meanwhile
        resent = await session.recv_data()
        assert resent[1] == 2 and resent[3] == frames[1][3]  # the same body
        following = await session.recv_data()
        assert following[1] == 5  # not 3 or 4


async def test_a_rejected_frame_is_never_sent_again(tmp_path: Path) -> None:
    """Section 5: the gateway moves a REJECTed frame to its dead-letter file; it is never
    retried, and counts as done for next_seq."""
    async with gateway_against_peer(tmp_path) as hub:
        session, _ = await hello_of(hub)
        await session.send(welcome())
        await session.recv_data()
        await session.send([REJECT, 1, "peer hub does not like it"])
        await session.send([PING, 1.0])
        while (await session.recv())[0] != PONG:
            pass
        await session.close(1011, "peer hub restarts")
        session, hello = await hello_of(hub)
        assert hello["next_seq"] == 2
        await session.send(welcome(applied=[[1, 1]]))
        assert (await session.recv_data())[1] == 2


@pytest.mark.parametrize("bogus", [[ACK, 1_000_000, []], [ACK, 1, [[3, 1_000_000]]],
                                   [REJECT, 1_000_000, "no such frame"]],
                         ids=["ack", "ack_range", "reject"])
async def test_an_ack_or_reject_of_a_frame_not_made_yet_is_closed_4004_and_loses_nothing(
        tmp_path: Path, bogus: list[Any]) -> None:
    """Sections 6 and 8: a hub that acknowledges (or rejects) frame 1,000,000 of a gateway
    that has made a few is broken, and believing it would drop every frame up to it unsent
    as it is made.  The gateway closes with 4004 and applies none of it: its next HELLO
    still names frame 1 as the first unacknowledged, and frame 1 is sent again.  The
    failure is counted as the hub's (``reason="hub_protocol"``), not as a lost link."""
    async with peer_and_gateway(tmp_path) as (hub, gateway):
        session, _ = await hello_of(hub)
        await session.send(welcome())
        assert (await session.recv_data())[1] == 1
        await session.send(bogus)
        code, reason = await until_closed(session)
        assert code == 4004 and "frame 1000000, which this gateway has not sent" in reason
        await failures_counted(gateway, "hub_protocol")
        session, hello = await hello_of(hub)
        assert hello["next_seq"] == 1
        await session.send(welcome())
        assert (await session.recv_data())[1] == 1


@pytest.mark.parametrize("bad,code", [
    ({"version": 9}, 4002),           # section 4.3: a version the gateway did not offer
    ({"compression": "zlib"}, 4004),  # section 5.1: an encoding it did not offer
    # section 2: a heartbeat outside 0.1-3600 s (0 had the gateway PING 3,500 times a
    # second; hours, never find a silent hub)
    ({"heartbeat": 0.0}, 4004), ({"heartbeat": -1.0}, 4004), ({"heartbeat": 0.01}, 4004),
    ({"heartbeat": 1e12}, 4004),
])
async def test_a_welcome_the_gateway_cannot_accept_is_closed(tmp_path: Path,
                                                             bad: dict[str, Any],
                                                             code: int) -> None:
    async with peer_and_gateway(tmp_path) as (hub, gateway):
        session, _ = await hello_of(hub)
        await session.send(welcome(**bad))
        assert (await until_closed(session))[0] == code
        await failures_counted(gateway, "hub_protocol")


async def test_the_gateway_answers_ping_and_pings_when_idle(tmp_path: Path) -> None:
    """Section 7: PONG echoes the PING's t; an end that sent nothing for a heartbeat (the
    hub's, from WELCOME) sends PING."""
    async with gateway_against_peer(tmp_path) as hub:
        session, _ = await hello_of(hub)
        await session.send(welcome(heartbeat=0.5))
        await session.send([PING, 7.5])
        seqs = []
        while True:
            message = await session.recv()
            if message[0] == DATA:
                seqs.append(message[1])
                await session.send([ACK, message[1], []])
            elif message[0] == PONG:
                assert message == [PONG, 7.5]
            elif message[0] == PING:  # idle after the tester's parts: the gateway pings
                assert isinstance(message[1], float)
                break
        assert seqs == list(range(1, len(seqs) + 1))


async def test_a_stopping_gateway_says_going_away(tmp_path: Path) -> None:
    """Section 7: a gateway stopping sends 1001 "gateway shutting down"."""
    hub = PeerHub()
    async with trio.open_nursery() as outer:
        port = await outer.start(hub.run)
        cfg = gateway_config(tmp_path, port, sources=[TESTER])
        with trio.fail_after(15):
            async with trio.open_nursery() as nursery:
                await nursery.start(Gateway(cfg).run)
                session, _ = await hello_of(hub)
                await session.send(welcome())
                await session.recv_data()
                nursery.cancel_scope.cancel()
            assert await until_closed(session) == (1001, "gateway shutting down")
        outer.cancel_scope.cancel()


async def test_a_silent_hub_is_closed_with_4005(tmp_path: Path) -> None:
    """Section 7: an end that has received nothing for 2 x heartbeat (WELCOME's) closes
    with 4005 -- the gateway too (``reason="heartbeat_timeout"``)."""
    async with peer_and_gateway(tmp_path) as (hub, gateway):
        session, _ = await hello_of(hub)
        await session.send(welcome(heartbeat=0.2))
        try:
            while True:
                await session.recv()  # read, never answer: PINGs included
        except Closed as closed:
            assert closed.code == 4005, closed
        await failures_counted(gateway, "heartbeat_timeout")


@pytest.mark.parametrize("limits", [{"max_records": 7}, {"max_frame_bytes": 1200},
                                    {"max_records": 7, "version": 1},
                                    {"max_frame_bytes": 1200, "compression": "zlib"}])
async def test_frames_keep_to_the_limits_welcome_announced(tmp_path: Path,
                                                           limits: dict[str, Any]) -> None:
    """Sections 1 and 5, "Frames over the hub's limits": no DATA above the hub's
    `max_records` or `max_frame_bytes`, nor a body decompressing to more (section 5.1);
    cut or not, every record id travels exactly once."""
    offer = {"compression": "zlib", "compression_min_bytes": 0} if "compression" in limits \
        else {}
    async with gateway_against_peer(tmp_path, **offer) as hub:
        session, _ = await hello_of(hub)
        await session.send(welcome(**limits))
        rids: list[int] = []
        received: set[int] = set()
        arrivals: list[tuple[int, int, int]] = []  # (seq, first_rid, n)
        # (until 100 records have come, and every record id below the highest)
        while len(rids) < 100 or rids != list(range(1, len(rids) + 1)):
            message = await session.recv_data()
            body = zlib.decompress(message[3]) if len(message) == 5 else message[3]
            first_rid, n, layout = records_in(body)
            assert n <= limits.get("max_records", 50_000)
            assert len(cbor2.dumps(message)) <= limits.get("max_frame_bytes", 8 << 20)
            assert len(body) <= limits.get("max_frame_bytes", 8 << 20)
            if limits.get("version") == 1:
                assert layout == "rows"
            rids = sorted([*rids, *range(first_rid, first_rid + n)])
            arrivals.append((message[1], first_rid, n))
            assert len(set(rids)) == len(rids), f"a record id twice: {arrivals}"
            received.add(message[1])
            # (a cut frame's parts take seqs after the frames stored meanwhile and go
            # right after it: out of seq order, section 5)
            await session.send(ack_of(received))


async def test_compressed_bodies_when_welcome_agrees(tmp_path: Path) -> None:
    """Section 5.1: HELLO offers ["zlib"]; after WELCOME agrees, a DATA body of at least
    `compression_min_bytes` goes as one zlib stream named in a fifth element, a smaller
    one plain."""
    async with gateway_against_peer(tmp_path, compression="zlib",
                                    compression_min_bytes=300) as hub:
        session, hello = await hello_of(hub)
        assert hello["compression"] == ["zlib"]
        await session.send(welcome(compression="zlib"))
        kinds = set()
        for _ in range(5):
            message = await session.recv_data()
            if len(message) == 5:
                assert message[4] == "zlib"
                body = zlib.decompress(message[3])
                assert len(body) >= 300
                kinds.add("zlib")
            else:
                body = message[3]
                kinds.add("plain" if len(body) < 300 else "plain-large")
            records_in(body)  # a section 5 body once inflated
            await session.send([ACK, message[1], []])
        assert "zlib" in kinds and "plain-large" not in kinds


async def test_at_most_window_frames_unacknowledged(tmp_path: Path) -> None:
    """Section 6: the gateway keeps at most `window_frames` frames unacknowledged in
    flight; an ACK frees room for as many more."""
    async with gateway_against_peer(tmp_path, window_frames=4) as hub:
        session, _ = await hello_of(hub)
        await session.send(welcome())
        seqs = [(await session.recv_data())[1] for _ in range(4)]
        with trio.move_on_after(0.3):  # no fifth while none is acknowledged
            seqs.append((await session.recv_data())[1])
        assert seqs == [1, 2, 3, 4]
        await session.send([ACK, 2, []])
        seqs += [(await session.recv_data())[1] for _ in range(2)]
        with trio.move_on_after(0.3):
            seqs.append((await session.recv_data())[1])
        assert seqs == [1, 2, 3, 4, 5, 6]


async def test_a_busy_probe_answer_is_honoured(tmp_path: Path) -> None:
    """Section 7.5: a 503 with Retry-After: N makes the gateway wait at least N seconds
    (plus jitter) before it probes again -- never earlier than asked."""
    hub = PeerHub()
    hub.busy_probes, hub.busy_retry_after = 1, 1
    async with trio.open_nursery() as nursery:
        port = await nursery.start(hub.run)
        cfg = gateway_config(tmp_path, port, sources=[TESTER])
        with trio.fail_after(15):
            await nursery.start(Gateway(cfg).run)
            session, _ = await hello_of(hub)
            assert hub.probes == 2
            assert hub.probe_times[1] - hub.probe_times[0] >= 1.0
            await session.send(welcome())
            await session.recv_data()
            await session.end()
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("pinned,offered", [(2, [1, 2]), (1, [1])])
async def test_a_pinned_gateway_offers_only_its_versions(tmp_path: Path, pinned: int,
                                                         offered: list[int]) -> None:
    """Section 9: `uplink.max_protocol_version` pins the gateway: HELLO offers up to it."""
    async with gateway_against_peer(tmp_path, max_protocol_version=pinned) as hub:
        _, hello = await hello_of(hub)
        assert hello["versions"] == offered


@pytest.mark.parametrize("version", [3, 2])
async def test_typed_arrays_only_to_a_v3_hub(tmp_path: Path, version: int) -> None:
    """Sections 5.2 and 9: typed float columns (tag 86) go to a v3 hub; a v3 gateway
    answered `version` 2 sends none on that connection (frames it stored as v3 go with
    their typed columns made arrays)."""
    async with gateway_against_peer(tmp_path) as hub:
        session, _ = await hello_of(hub)
        await session.send(welcome(version=version))
        tags = set()
        for _ in range(3):
            message = await session.recv_data()
            tags |= tags_in(cbor2.loads(message[3]))
            await session.send([ACK, message[1], []])
        assert tags == ({86} if version == 3 else set())


async def test_a_restarted_gateway_keeps_its_epoch_and_resends_the_unacknowledged(
        tmp_path: Path) -> None:
    """Sections 3 and 4: with a disk spool a restart is not a fresh store: the same epoch,
    next_seq the lowest frame still unacknowledged, and those frames sent again as they
    were -- (epoch, seq) names one frame across restarts.  In whatever order: frames
    made in the last 2 s before the link came up go first, as live (docs/spool.md), so
    on a slow run a newer frame may come before 3 and 4; none below next_seq comes."""
    first: dict[int, bytes] = {}
    for run in range(2):
        async with gateway_against_peer(tmp_path, spool={}) as hub:
            session, hello = await hello_of(hub)
            if run == 0:
                epoch = hello["epoch"]
                await session.send(welcome())
                for _ in range(4):
                    message = await session.recv_data()
                    first[message[1]] = message[3]
                await session.send([ACK, 2, []])
                await session.send([PING, 1.0])  # the ACK is read before the stop
                while (await session.recv())[0] != PONG:
                    pass
            else:
                assert hello["epoch"] == epoch and hello["next_seq"] == 3
                await session.send(welcome(applied=[[1, 2]]))
                again: dict[int, bytes] = {}
                while not {3, 4} <= again.keys():
                    message = await session.recv_data()
                    assert message[1] >= 3, message[:2]
                    again[message[1]] = message[3]
                assert again[3] == first[3] and again[4] == first[4]


@pytest.mark.parametrize("message", [cbor2.dumps([99, 1]), "text", b"\xff\xfe",
                                     cbor2.dumps([5, -1, []])],
                         ids=["unknown_type", "text", "not_cbor", "negative_watermark"])
async def test_a_malformed_hub_message_is_closed_4004(tmp_path: Path,
                                                      message: bytes | str) -> None:
    """Sections 1 and 8: unknown message types, text messages, anything not CBOR and a
    malformed message are protocol errors at the gateway too (4004); unknown WELCOME keys
    are ignored."""
    async with gateway_against_peer(tmp_path) as hub:
        session, _ = await hello_of(hub)
        await session.send(welcome(future_key={"x": [1]}))
        await session.recv_data()  # welcomed: the unknown key was ignored
        await session.send_raw(message)
        assert (await until_closed(session))[0] == 4004


def first_kind(body: bytes) -> int | None:
    """The record kind of a DATA body's first record (None: no records)."""
    item = cbor2.loads(body)
    if len(item) == 3:
        return item[2][0][0] if item[2] else None
    return item[2][0] if item[2] else None


async def test_a_fresh_store_asks_for_positions_and_goes_on_from_those_handed_back(
        tmp_path: Path) -> None:
    """Section 4.1: a gateway whose store started afresh asks in its first HELLO; it
    stores the positions handed back with a frame of no records, its tester goes on from
    there (here: after its third batch, so its first record is no LotStart), and it tells
    where its sources are only after the DATA of the frame they are as of."""
    async with gateway_against_peer(tmp_path, positions_every_s=0.1) as hub:
        session, hello = await hello_of(hub)
        assert hello["resume"] is True
        await session.send(welcome(positions=True, resume={"tester": 3, "__after__": {}}))
        sent: set[int] = set()
        told: list[list[Any]] = []
        first: list[Any] = []
        while not told or not first:
            message = await session.recv()
            if message[0] == PING:
                await session.send([PONG, message[1]])
            elif message[0] == DATA:
                sent.add(message[1])
                await session.send([ACK, message[1], []])  # (they come in order)
                kind = first_kind(message[3])
                if message[1] == 1:
                    assert kind is None  # the positions taken back, stored alone
                elif kind is not None and not first:
                    first.append(kind)
            elif message[0] == 10:
                assert message[1] in sent  # after its DATA
                told.append(message)
        assert first[0] != 1  # LOT_START: the tester did not start over
        assert told[0][2]["tester"] >= 3 and "__rid__" not in told[0][2]


async def test_a_hub_that_keeps_no_positions_is_told_none(tmp_path: Path) -> None:
    """Section 4.1: no POSITIONS to a hub whose WELCOME lacks "positions"; a fresh store
    then starts its sources from their beginning (the first record: the LotStart)."""
    async with peer_and_gateway(tmp_path, positions_every_s=0.1) as (hub, gateway):
        session, hello = await hello_of(hub)
        assert hello["resume"] is True
        await session.send(welcome())
        kinds = []
        deadline = trio.current_time() + 1.0  # several intervals of positions_every_s
        while trio.current_time() < deadline:
            with trio.move_on_at(deadline):
                message = await session.recv()
                assert message[0] in (DATA, PING), message
                if message[0] == PING:
                    await session.send([PONG, message[1]])
                    continue
                await session.send([ACK, message[1], []])
                kind = first_kind(message[3])
                if kind is not None:
                    kinds.append(kind)
        assert kinds[0] == 1
        assert gateway.metrics.as_dict()["gateway_fresh_starts_total"] == {
            "outcome=not_offered": 1}


async def test_positions_are_told_as_soon_as_all_there_is_has_been_sent(
        tmp_path: Path) -> None:
    """Section 4.1: the reference gateway tells its positions once it has sent all there
    is, as of the newest frame -- not at the next tick of ``uplink.positions_every_s``
    (here a minute, longer than the test): a state lost meanwhile would have the records
    of the frames sent since applied twice (docs/operations.md, "A gateway's state
    lost").  The tick is for a flood, when the sender is never done."""
    async with gateway_against_peer(tmp_path, positions_every_s=60.0) as hub:
        session, _ = await hello_of(hub)
        await session.send(welcome(positions=True, resume={}))
        sent: list[int] = []
        told: list[int] = []
        while True:
            with trio.move_on_after(1.0) as quiet:  # the tester's 60 parts take 0.15 s
                message = await session.recv()
            if quiet.cancelled_caught:
                break
            if message[0] == PING:
                await session.send([PONG, message[1]])
            elif message[0] == DATA:
                sent.append(message[1])
                await session.send([ACK, message[1], []])
            elif message[0] == 10:
                assert message[1] == sent[-1]  # as of the newest frame sent
                told.append(message[1])
    assert len(sent) >= 5 and told[-1] == sent[-1], (sent, told)
    assert len(told) >= 2  # along the way too, not only at the end
