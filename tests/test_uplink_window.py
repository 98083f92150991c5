"""A gateway whose send window is full waits for the hub's ACK: it does not poll.

Against the independent peer hub (tests/peer_hub.py), which acknowledges only when told,
so the window stays full for as long as a test wants -- a hub slow to commit, seen from
the gateway.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest
import trio
from hubtools import gateway_welcomed
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from peer_hub import (
    ACK,
    DATA,
    LOST,
    PING,
    PONG,
    PeerHub,
    Session,
    ack_of,
    records_in,
    runs_of,
    welcome,
)

from edgegw.gateway import Gateway
from edgegw.records import SensorReading

STORES: dict[str, Any] = {
    "memory": lambda tmp: {"queue": {"max_frames": 1000}},
    "spool": lambda tmp: {"spool": {"dir": str(tmp / "spool")}},
}


def readings(i: int) -> list[SensorReading]:
    return [SensorReading("s", float(i), "c", float(j)) for j in range(10)]


async def connected(nursery: trio.Nursery, tmp_path: Path, lost: bool = False,
                    window: int = 2, peer: PeerHub | None = None,
                    max_records: int = 50_000, **store: Any) -> tuple[Gateway, Session]:
    """A gateway (frames of 10 readings, a window of ``window`` frames) welcomed by the
    peer hub (``peer``, or a new one), which acknowledges nothing until told and takes up
    to ``max_records`` records per frame (heartbeat 30 s: no PING in the way)."""
    answer = welcome(heartbeat=30.0, max_records=max_records,
                     **({"lost": True} if lost else {}))
    return await gateway_welcomed(nursery, tmp_path / "gw", peer or PeerHub(), answer,
                                  **store, batch={"max_records": 10, "max_delay_ms": 20},
                                  uplink={"window_frames": window, "heartbeat_s": 30.0})


async def sent(session: Session, n: int) -> list[int]:
    """The seqs of the next ``n`` DATA frames (PINGs answered on the way)."""
    return [(await session.recv_data())[1] for _ in range(n)]


async def answer_pings(session: Session, seen: list[list[Any]]) -> None:
    """Read on (PINGs answered), keeping what else comes in ``seen``."""
    while True:
        message = await session.recv()
        if message[0] == PING:
            await session.send([PONG, message[1]])
        else:
            seen.append(message[:2])


async def cpu_while_waiting(session: Session, seconds: float = 2.0
                            ) -> tuple[float, list[list[Any]]]:
    """The CPU this thread (the gateway's, and the peer hub's) used in ``seconds`` of
    answering PINGs, and what else the gateway sent meanwhile."""
    seen: list[list[Any]] = []
    async with trio.open_nursery() as reader:
        reader.start_soon(answer_pings, session, seen)
        cpu = time.thread_time()
        await trio.sleep(seconds)
        used = time.thread_time() - cpu
        reader.cancel_scope.cancel()
    return used, seen


@pytest.mark.parametrize("store", list(STORES))
async def test_a_gateway_whose_window_is_full_waits_for_an_ack_without_spinning(
        tmp_path: Path, store: str) -> None:
    """The window (2 frames) is full and four more frames wait, durable.  For the 2 s the
    hub takes to acknowledge, the gateway's thread is idle (under 0.3 s of CPU in all) and
    sends nothing; the ACK of the two frames sent lets two more go at once.  Before, its
    sender woke at once for the frames already waiting -- every time -- and took a whole
    core for as long as the hub was slow (seen: puts 10x slower beside it)."""
    async with trio.open_nursery() as nursery:
        gw, session = await connected(nursery, tmp_path, **STORES[store](tmp_path))
        for i in range(6):
            await gw.sink.put(readings(i), source="s")
        with trio.fail_after(20):
            first = await sent(session, 2)  # the window's two (live frames go first)
            await gw.store.wait_for_frame_after(5)  # the other four are durable
        used, seen = await cpu_while_waiting(session)
        assert used < 0.3, f"the gateway's thread used {used:.2f} s of CPU in 2 s, waiting"
        assert seen == []
        await session.send([ACK, 0, [[seq, seq] for seq in first]])
        with trio.fail_after(20):
            assert set(await sent(session, 2)).isdisjoint(first)
        await session.end()
        nursery.cancel_scope.cancel()


async def test_a_drop_while_the_window_is_full_is_still_declared_at_once(
        tmp_path: Path) -> None:
    """Waiting for an ACK with the window full, the gateway still wakes for each new
    frame its queue takes: one that pushes the oldest out is told to the hub by a LOST
    (docs/protocol.md section 4) then, not at the next ACK."""
    async with trio.open_nursery() as nursery:
        gw, session = await connected(nursery, tmp_path, lost=True,
                                      queue={"max_frames": 4, "policy": "drop_oldest"})
        for i in range(4):
            await gw.sink.put(readings(i), source="s")
        with trio.fail_after(20):
            await sent(session, 2)
            await gw.store.wait_for_frame_after(3)
        # two of 1-4 are sent and unacknowledged; 5, 6 and 7 push out 1, 2 and 3
        for i in range(4, 7):
            await gw.sink.put(readings(i), source="s")
        with trio.fail_after(20):
            while True:
                message = await session.recv()
                if message[0] == PING:
                    await session.send([PONG, message[1]])
                    continue
                assert message[0] != DATA, message  # the window is still full
                if message[0] == LOST and message[1] == gw.store.first_unacked:
                    break
        # (the store_overflow event's own frame may push out one more)
        assert gw.store.first_unacked >= 4
        await session.end()
        nursery.cancel_scope.cancel()


async def test_a_hub_that_acks_each_frame_at_once_gets_every_frame_however_the_acks_fall(
        tmp_path: Path) -> None:
    """The peer hub acknowledges each frame as it reads it, so ACKs keep coming while the
    sender fills its window and waits: 3,000 frames put at once all arrive, none twice,
    none left waiting for a frame that never comes.  (The sender takes the ACK event it
    waits on as it decides the window is full: one taken when its waiting task started
    could miss an ACK that came in between -- a window that stays full then, its frames
    unsent until another frame is put.  This run does not force that interleaving; it
    holds the whole exchange to its outcome.)"""
    async with trio.open_nursery() as nursery:
        gw, session = await connected(nursery, tmp_path, queue={"max_frames": 10_000})
        got: set[int] = set()

        async def ack_each() -> None:
            while True:
                message = await session.recv()
                if message[0] == PING:
                    await session.send([PONG, message[1]])
                elif message[0] == DATA:
                    assert message[1] not in got, message[1]
                    got.add(message[1])
                    await session.send(ack_of(got))

        nursery.start_soon(ack_each)
        for i in range(3000):
            await gw.sink.put(readings(i), source="s")
        with trio.fail_after(60):
            while len(got) < 3000:
                await trio.sleep(0.05)
        assert got == set(range(1, 3001))
        nursery.cancel_scope.cancel()


async def test_a_reconnected_gateway_whose_newest_frames_the_hub_has_waits_without_spinning(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Frames 1-3 went out; the link broke before any ACK; the hub's WELCOME says it has 2
    and 3 (a hole at 1).  The gateway sends 1 and then has nothing to send until a new
    frame is made: its thread idles (under 0.3 s of CPU in 2 s) -- before, its live lane
    found nothing at 2 and waited for "a frame after 1", which 2 and 3 already were, and
    it spun on a core until the tester made another frame."""
    # the three frames count as live on reconnection however slow this run is
    monkeypatch.setattr("edgegw.gateway.uplink.LIVE_S", 600.0)
    async with trio.open_nursery() as nursery:
        peer = PeerHub()
        gw, session = await connected(nursery, tmp_path, window=3, peer=peer,
                                      spool={"dir": str(tmp_path / "spool")})
        for i in range(3):
            await gw.sink.put(readings(i), source="s")
        with trio.fail_after(20):
            assert sorted(await sent(session, 3)) == [1, 2, 3]
        await session.close(1011)
        with trio.fail_after(20):
            session = await peer.sessions.receive()
            await session.recv()  # HELLO
            await session.send(welcome(applied=[[2, 3]], heartbeat=30.0))
            assert await sent(session, 1) == [1]
        used, seen = await cpu_while_waiting(session)
        assert used < 0.3, f"the gateway's thread used {used:.2f} s of CPU in 2 s, waiting"
        assert seen == []
        await gw.sink.put(readings(3), source="s")  # a new frame still goes at once
        with trio.fail_after(20):
            assert await sent(session, 1) == [4]
        await session.end()
        nursery.cancel_scope.cancel()


async def data_rids(session: Session) -> tuple[int, set[int]]:
    """The next DATA's seq and record ids."""
    message = await session.recv_data()
    first_rid, n, _ = records_in(message[3])
    return message[1], set(range(first_rid, first_rid + n))


@settings(max_examples=int(os.environ.get("EDGEGW_FUZZ_EXAMPLES", "10")), deadline=None,
          derandomize=not os.environ.get("EDGEGW_FUZZ_RANDOM"), database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(store=st.sampled_from(list(STORES)), live=st.booleans(), n=st.integers(1, 8),
       window=st.integers(2, 6), has=st.lists(st.booleans(), min_size=24, max_size=24),
       limits=st.tuples(*[st.sampled_from([50_000, 7, 4])] * 2))
async def test_whatever_the_hub_says_it_has_the_gateway_sends_the_rest_once_then_idles(
        monkeypatch: pytest.MonkeyPatch, store: str, live: bool, n: int, window: int,
        has: list[bool], limits: tuple[int, int]) -> None:
    """``n`` frames of 10 records are made; what the window lets out goes and the link
    breaks before any ACK; the reconnect's WELCOME names any subset of what went as
    applied.  The gateway then sends every other record exactly once, no frame the hub has
    again (the peer hub acks each frame as it comes), after which its thread idles (under
    0.25 s of CPU in 1 s) and a new frame's records still go at once.  The frames count as
    live or as backlog on the reconnect (``LIVE_S``), in a memory queue or a disk spool,
    and either connection's hub may take fewer records per frame than they hold (7 or 4:
    the gateway cuts them, docs/protocol.md "Frames over the hub's limits").
    (``EDGEGW_FUZZ_EXAMPLES``/``EDGEGW_FUZZ_RANDOM`` for longer runs.)"""
    monkeypatch.setattr("edgegw.gateway.uplink.LIVE_S", 600.0 if live else 0.0)
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as tmp:
        async with trio.open_nursery() as nursery:
            peer = PeerHub()
            gw, session = await connected(nursery, Path(tmp), window=window, peer=peer,
                                          max_records=limits[0], **STORES[store](Path(tmp)))
            for i in range(n):
                await gw.sink.put(readings(i), source="s")
            first: dict[int, set[int]] = {}
            with trio.fail_after(20):
                seq, rids = await data_rids(session)
                first[seq] = rids
            while True:  # what else the window lets out (backlog keeps a slot for live)
                with trio.move_on_after(0.3) as quiet:
                    seq, rids = await data_rids(session)
                    first[seq] = rids
                if quiet.cancelled_caught:
                    break
            await session.close(1011)
            applied = {seq for seq, kept in zip(sorted(first), has[:len(first)], strict=True)
                       if kept}
            have = set().union(*(first[seq] for seq in applied))
            got: set[int] = set()
            with trio.fail_after(20):
                session = await peer.sessions.receive()
                await session.recv()  # HELLO
                await session.send(welcome(applied=runs_of(applied), heartbeat=30.0,
                                           max_records=limits[1]))
                while len(have) < 10 * n:
                    seq, rids = await data_rids(session)
                    assert seq not in applied | got, (seq, applied, got)
                    assert not rids & have, (seq, sorted(rids & have))
                    assert len(rids) <= limits[1]
                    got.add(seq)
                    have |= rids
                    await session.send(ack_of(applied | got))
            assert have == set(range(1, 10 * n + 1))
            used, seen = await cpu_while_waiting(session, 1.0)
            assert used < 0.25, f"the gateway's thread used {used:.2f} s of CPU in 1 s, idle"
            assert [m for m in seen if m[0] == DATA] == []
            await gw.sink.put(readings(n), source="s")
            with trio.fail_after(20):
                while len(have) < 10 * (n + 1):
                    seq, rids = await data_rids(session)
                    assert not rids & have
                    got.add(seq)
                    have |= rids
                    await session.send(ack_of(applied | got))
            await session.end()
            nursery.cancel_scope.cancel()
