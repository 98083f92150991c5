"""A frame the hub rejects (REJECT, docs/protocol.md section 5) is kept in the gateway's
dead-letter file and told back to the hub as a ``frame_rejected`` error event, so that an
alert rule pages someone (docs/alerts.md, kind ``gateway_event``): the hub counts the
frame, but in a cluster the node that rejected it is not always the one raising the
gateway's alerts.  At most one such event per ``REJECTED_EVENT_EVERY_S``, those rejected
meanwhile counted in the next: a hub that rejects every frame rejects each event's frame
too, which must not beget a new event per round trip.  Against the independent peer hub
(tests/peer_hub.py); the real hub's alert is in tests/test_faults.py."""

from __future__ import annotations

import errno
from pathlib import Path
from typing import Any

import pytest
import trio
from hubtools import gateway_welcomed
from peer_hub import REJECT, PeerHub, welcome

from edgegw.metrics import internal_errors
from edgegw.protocol import decode_body
from edgegw.records import GatewayEvent, SensorReading, from_wire

INTERVAL_S = 1.0
WATCH_S = 4.0


async def test_a_hub_rejecting_every_frame_hears_of_it_once_an_interval_not_once_a_frame(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("edgegw.gateway.service.REJECTED_EVENT_EVERY_S", INTERVAL_S)
    rejected: list[int] = []  # in the order the REJECTs went
    told: list[GatewayEvent] = []
    async with trio.open_nursery() as nursery:
        gw, session = await gateway_welcomed(
            nursery, tmp_path / "gw", PeerHub(), welcome(heartbeat=30.0),
            uplink={"heartbeat_s": 30.0}, batch={"max_records": 1, "max_delay_ms": 10})

        async def tester() -> None:  # a reading every 50 ms: a frame each
            for i in range(1000):
                await gw.sink.put([SensorReading("s", float(i), "c", float(i))], source="s")
                await trio.sleep(0.05)
        nursery.start_soon(tester)
        with trio.move_on_after(WATCH_S):
            while True:
                message = await session.recv_data()
                seq, body = message[1], message[3]  # no encoding: off by default
                _, sources, wire = decode_body(body, 1 << 20)
                told += [r for r in (from_wire(w, sources) for w in wire)
                         if isinstance(r, GatewayEvent) and r.code == "frame_rejected"]
                await session.send([REJECT, seq, "refused by the test"])
                rejected.append(seq)
        await session.end()
        nursery.cancel_scope.cancel()

    # the first rejection at once, then about one event a second -- not one per frame
    # (the frames carrying the events were rejected too: ~20 frames a second)
    assert len(rejected) > 20
    assert 2 <= len(told) <= WATCH_S / INTERVAL_S + 1, [e.detail for e in told]
    first = told[0]
    assert first.level == "error" and first.source == "gateway"
    assert first.detail == {"frames": 1, "seqs": [rejected[0]], "reason": "refused by the test"}
    assert first.message == (f"the hub rejected frame {rejected[0]} as invalid: refused by "
                             f"the test (kept in the gateway's dead-letter file: edgegw "
                             f"dead-letters list)")
    # each later event counts the frames rejected since the one before, in order, naming
    # the first 20 of them: every rejection told once
    k = 0
    for event in told:
        detail: dict[str, Any] = event.detail or {}
        n = detail["frames"]
        assert n >= 1 and detail["seqs"] == rejected[k:k + n][:20], (k, detail)
        k += n
    assert k <= len(rejected)
    assert gw.metrics.as_dict()["uplink_frames_rejected_total"] == len(rejected)


def rejections_told(body: bytes) -> list[GatewayEvent]:
    _, sources, wire = decode_body(body, 1 << 20)
    return [r for r in (from_wire(w, sources) for w in wire)
            if isinstance(r, GatewayEvent) and r.code == "frame_rejected"]


async def test_an_event_that_cannot_be_stored_ends_that_event_not_the_gateway(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The event is stored by a task of the gateway's own: a store failing under it is a
    failure boundary (docs/reliability.md, ``gateway_event``) -- that event is not told,
    the gateway goes on and tells the next rejection."""
    monkeypatch.setattr("edgegw.gateway.service.REJECTED_EVENT_EVERY_S", 0.1)
    async with trio.open_nursery() as nursery:
        gw, session = await gateway_welcomed(
            nursery, tmp_path / "gw", PeerHub(), welcome(heartbeat=30.0),
            uplink={"heartbeat_s": 30.0}, batch={"max_records": 1, "max_delay_ms": 10})
        stored = gw.emit_event
        failed = 0

        async def emit_event(level: str, code: str, message: str,
                             detail: dict[str, Any] | None = None) -> None:
            nonlocal failed
            if code == "frame_rejected" and not failed:
                failed += 1
                raise OSError(errno.EIO, "Input/output error")
            await stored(level, code, message, detail)
        monkeypatch.setattr(gw, "emit_event", emit_event)

        told: list[GatewayEvent] = []
        with trio.fail_after(20):
            await gw.sink.put([SensorReading("s", 1.0, "c", 1.0)], source="s")
            first = (await session.recv_data())[1]
            await session.send([REJECT, first, "refused by the test"])  # its event fails
            while not failed:
                await trio.sleep(0.01)
            await trio.sleep(0.3)  # past the interval: the gateway still runs, and ...
            await gw.sink.put([SensorReading("s", 2.0, "c", 2.0)], source="s")
            second = (await session.recv_data())[1]
            await session.send([REJECT, second, "refused again"])
            while not told:  # ... the next rejection is told
                message = await session.recv_data()
                told = rejections_told(message[3])
        await session.end()
        nursery.cancel_scope.cancel()
    assert [e.detail for e in told] == [
        {"frames": 1, "seqs": [second], "reason": "refused again"}]
    assert internal_errors(gw.metrics).get(where="gateway_event") == 1


async def test_rejections_not_yet_told_when_the_gateway_stops_are_told_by_its_next_run(
        tmp_path: Path) -> None:
    """Rejections counted within the interval are stored with the final flush at a stop
    (not dropped with the task that would have told them), so the next run sends them."""
    sections: dict[str, Any] = {"uplink": {"heartbeat_s": 30.0}, "spool": {},
                                "batch": {"max_records": 1, "max_delay_ms": 10}}
    rejected: list[int] = []
    told: dict[int, list[GatewayEvent]] = {}  # by the seq of the frame that told them
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            gw, session = await gateway_welcomed(nursery, tmp_path / "gw", PeerHub(),
                                                 welcome(heartbeat=30.0), **sections)
            for i in range(3):  # the first told at once, the next two within the interval
                await gw.sink.put([SensorReading("s", float(i), "c", float(i))], source="s")
                while True:
                    _, seq, _, body, *_ = await session.recv_data()
                    if not (events := rejections_told(body)):
                        break  # the reading's frame, not an event's
                    told[seq] = events
                await session.send([REJECT, seq, f"refused {i}"])
                rejected.append(seq)
            while (gw.metrics.as_dict()["uplink_frames_rejected_total"] or 0) < 3:
                await trio.sleep(0.01)
            await session.end()
            nursery.cancel_scope.cancel()  # the gateway stops
        assert len(told) <= 1  # the first event, if its frame went before the stop

        async with trio.open_nursery() as nursery:  # the next run, same state directory
            gw, session = await gateway_welcomed(nursery, tmp_path / "gw", PeerHub(),
                                                 welcome(heartbeat=30.0), **sections)
            while sum(len(e) for e in told.values()) < 2:
                _, seq, _, body, *_ = await session.recv_data()
                if events := rejections_told(body):
                    told[seq] = events
            await session.end()
            nursery.cancel_scope.cancel()
    first, last = (e for _, events in sorted(told.items()) for e in events)
    assert first.detail == {"frames": 1, "seqs": rejected[:1], "reason": "refused 0"}
    assert last.detail == {"frames": 2, "seqs": rejected[1:], "reason": "refused 2"}
    assert last.message.startswith(f"the hub rejected 2 frames ({rejected[1]}, "
                                   f"{rejected[2]}) as invalid, the last for: refused 2")
