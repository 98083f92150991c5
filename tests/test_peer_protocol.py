"""docs/protocol.md and docs/live-protocol.md, walked by an outside implementer's peers.

tests/peer_gateway.py and tests/peer_dashboard.py were written from the documents alone
(cbor2 + wsproto, no edgegw import): every test here is one normative statement of the
documents checked against a real in-process hub over loopback sockets.  What the hub did
is read from the wire and from the documented HTTP API (/api/stats), never from its
internals.  A section number in a test's docstring is docs/protocol.md's unless it says
otherwise.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import struct
import zlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import cbor2
import pytest
import trio
from hubtools import http_get
from peer_dashboard import CBOR, JSON, PeerDashboard, Topic
from peer_gateway import (
    ACK,
    INT64_MAX,
    PING,
    PONG,
    REFUSE,
    SENSOR_READING,
    UPGRADE,
    WELCOME,
    PeerGateway,
    columns,
    data,
    http_request,
    positions,
    rows,
    sensor,
    sensor_table,
    typed,
    zlib_data,
)
from wsclient import Closed, WsClient
from wsproto.extensions import PerMessageDeflate

from edgegw.config import build
from edgegw.hub import Hub, HubConfig

TOKEN = "s3cret"
GW = "ate-01"


#: one alert rule (docs/alerts.md), for the `ack` request and the alert topics
ALERTS = {"rules": [{"name": "wafer-yield", "kind": "wafer_yield", "priority": "P0",
                     "threshold": 0.8, "min_parts": 4}]}


def settings(tmp: Path, live: dict[str, Any] | None = None, **hub: Any) -> HubConfig:
    # a heartbeat below the loader's 1 s floor keeps the PING test fast: set on the built
    # config, as tests/test_conformance.py does
    fast = {k: hub.pop(k) for k in ("heartbeat_s",) if k in hub}
    cfg = build(HubConfig, {
        "hub": {"port": 0, "data_dir": str(tmp), "gc_freeze_s": 0, **hub},
        "gateways": {gw: {"token": TOKEN} for gw in (GW, "ate-02", "ate-03")},
        "live": live or {},
        "alerts": ALERTS,
    })
    return dataclasses.replace(cfg, hub=dataclasses.replace(cfg.hub, **fast))


@asynccontextmanager
async def running_hub(tmp: Path, live: dict[str, Any] | None = None,
                      **hub: Any) -> AsyncIterator[int]:
    app = Hub(settings(tmp, live, **hub))
    async with trio.open_nursery() as nursery:
        port = await nursery.start(app.run)
        with trio.fail_after(15):
            yield port
        nursery.cancel_scope.cancel()


async def gateway_stats(port: int, gw: str = GW) -> dict[str, Any]:
    status, stats = await http_get(port, "/api/stats")
    assert status == 200
    return stats["gateways"][gw]


def points(dash: PeerDashboard, name: str) -> list[Any]:
    """The history points a dashboard holds for a sensor topic (none yet: [])."""
    topic = dash.topics.get(name)
    return [] if topic is None else topic.view.get("history") or []


async def closed_with(peer: PeerGateway) -> tuple[int, str]:
    """The hub's close frame, whatever it still sends before it."""
    try:
        while True:
            await peer.next()
    except Closed as closed:
        return closed.code, closed.reason


def hello_bytes(gw: str = GW) -> bytes:
    """A valid HELLO, for a bare WsClient."""
    return cbor2.dumps([1, {"versions": [1, 2, 3], "gateway": gw, "token": TOKEN,
                            "epoch": "epoch-1", "next_seq": 1, "heartbeat": 5.0}])


class Feed:
    """The peer gateway as the live topics' source: each call one acknowledged frame of
    SensorReadings (live-topics.md, `sensor/<channel>`)."""

    def __init__(self, peer: PeerGateway) -> None:
        self.peer = peer
        self.seq = 0

    @classmethod
    async def open(cls, port: int, gw: str = GW) -> Feed:
        return cls(await PeerGateway.connect(port, gw, TOKEN))

    async def __call__(self, channel: str, *values: float, ts: float = 1764130000.0) -> None:
        self.seq += 1
        records = [sensor(channel, v, ts=ts + i) for i, v in enumerate(values)]
        await self.peer.send(data(self.seq, rows(self.seq * 1000, records)))
        await self.peer.until_acked(self.seq)


def part(x: int, y: int, hard_bin: int, passed: bool, site: int = 0,
         head: int = 1) -> list[Any]:
    """A PartResult row of lot L1, wafer W1 at (x, y), hard = soft bin."""
    return [5, 0, 1764130000.0 + x, "L1", "W1", head, site, f"p{x}.{y}", x, y, hard_bin,
            hard_bin, passed]


async def rejected_in_turn(peer: PeerGateway, bodies: dict[str, bytes],
                           seq: int = 0) -> int:
    """Send each body as the next frame: each must be REJECTed, the link staying up (a
    valid frame after it is applied).  The last seq used."""
    for case, body in bodies.items():
        await peer.send(data(seq + 1, body))
        reject = await peer.until_rejected(seq + 1)
        assert len(reject) == 3 and isinstance(reject[2], str) and reject[2], case
        await peer.send(data(seq + 2, rows(seq + 2, [sensor("t", 1.0)])))
        await peer.until_acked(seq + 1, seq + 2)
        seq += 2
    return seq


# ========== sections 1 and 2: transport, messages, limits of fields


async def test_floats_of_any_width(tmp_path: Path) -> None:
    """Section 1: floats are CBOR floats of any width -- here the shortest that holds each
    value (half and single precision), in HELLO, DATA and the records."""
    async with running_hub(tmp_path) as port:
        client = await WsClient.connect(port, "/ws/gateway")
        await client.send(cbor2.dumps([1, {"versions": [1, 2, 3], "gateway": GW,
                                           "token": TOKEN, "epoch": "e", "next_seq": 1,
                                           "heartbeat": 5.0}], canonical=True))
        assert cbor2.loads(await client.recv())[0] == WELCOME
        body = cbor2.dumps([1, ["s"], [[11, 0, 1.5, "t", 0.25, "C"]]], canonical=True)
        message = cbor2.dumps([4, 1, 2.0, body], canonical=True)
        assert b"\xf9" in message and b"\xf9" in body  # half-precision floats
        await client.send(message)
        assert cbor2.loads(await client.recv()) == [ACK, 1, []]


async def test_the_gateway_path_has_no_subprotocol_and_no_extensions(tmp_path: Path) -> None:
    """Section 1: "No subprotocol, no extensions" on /ws/gateway -- also on a hub whose
    /ws/live agrees permessage-deflate, and whatever the client offers."""
    async with running_hub(tmp_path, {"compression": "permessage-deflate"}) as port:
        live = await WsClient.connect(port, "/ws/live", extensions=[PerMessageDeflate()])
        assert live.extensions  # the live path does agree it
        client = await WsClient.connect(port, "/ws/gateway", subprotocols=["edgegw.x"],
                                        extensions=[PerMessageDeflate()])
        assert client.subprotocol is None and client.extensions == []
        await client.send(hello_bytes())
        assert cbor2.loads(await client.recv())[0] == WELCOME


MALFORMED_HELLO: dict[str, dict[str, Any]] = {
    "gateway_over_128": {"gateway": "g" * 129},
    "token_over_1024": {"token": "t" * 1025},
    "epoch_over_128": {"epoch": "e" * 129},
    "next_seq_0": {"next_seq": 0},
    "next_seq_past_int64": {"next_seq": INT64_MAX + 1},
    "versions_not_a_list": {"versions": 3},
    "no_epoch": {"epoch": None},
    "negative_next_seq": {"next_seq": -3},
    # section 5.1: at most 16 names of at most 32 characters
    "compression_17_names": {"compression": [f"x{i}" for i in range(17)]},
    "compression_name_33": {"compression": ["z" * 33]},
}


async def test_a_malformed_hello_closes_4004(tmp_path: Path) -> None:
    """Sections 2 and 8: fields over their limits or of the wrong type make HELLO
    malformed: a protocol error (4004), not a refusal."""
    async with running_hub(tmp_path) as port:
        for case, change in MALFORMED_HELLO.items():
            fields: dict[str, Any] = {"versions": [1, 2, 3], "gateway": GW, "token": TOKEN,
                                      "epoch": "e", "next_seq": 1, "heartbeat": 5.0,
                                      **change}
            client = await WsClient.connect(port, "/ws/gateway")
            await client.send(cbor2.dumps([1, {k: v for k, v in fields.items()
                                               if v is not None}]))
            assert (await client.close_reason())[0] == 4004, case


MALFORMED_DATA: dict[str, bytes] = {
    "seq_0": data(0, rows(1, [sensor("t", 1.0)])),
    "body_not_bytes": cbor2.dumps([4, 1, 1.0, "text"]),
    "too_few_items": cbor2.dumps([4, 1, 1.0]),
    "seq_past_int64": data(INT64_MAX + 1, rows(1, [sensor("t", 1.0)])),
    "negative_seq": data(-1, rows(1, [sensor("t", 1.0)])),
}


async def test_a_malformed_data_message_closes_4004(tmp_path: Path) -> None:
    """Section 2: DATA is `[4, seq >= 1, sent_at, body: bytes]`; an integer above
    2^63 - 1 or below 0 makes a message malformed (4004)."""
    async with running_hub(tmp_path) as port:
        for case, message in MALFORMED_DATA.items():
            peer = await PeerGateway.connect(port, GW, TOKEN)
            await peer.send(message)
            assert (await closed_with(peer))[0] == 4004, case


async def test_the_close_reason_is_the_first_123_bytes(tmp_path: Path) -> None:
    """Section 8: REFUSE carries the whole reason; the close frame its first 123 bytes."""
    async with running_hub(tmp_path) as port:
        stranger = "s" * 128
        peer = await PeerGateway.connect(port, stranger, TOKEN)
        assert peer.first == [REFUSE, 4001, f"unknown gateway id '{stranger}'"]
        assert await closed_with(peer) == (4001, peer.first[2][:123])


async def test_a_close_reason_is_cut_on_a_character_boundary(tmp_path: Path) -> None:
    """Section 8: the close frame carries the reason's first 123 bytes -- as UTF-8 text
    (RFC 6455: a close reason that is not UTF-8 is itself a protocol error), so a cut
    inside a character leaves that character out."""
    async with running_hub(tmp_path) as port:
        stranger = "é" * 60  # 120 bytes: the 123-byte cut falls inside one
        peer = await PeerGateway.connect(port, stranger, TOKEN)
        reason = peer.first[2]
        assert reason == f"unknown gateway id '{stranger}'"
        code, cut = await closed_with(peer)
        assert code == 4001 and reason.startswith(cut)
        assert 122 <= len(cut.encode()) <= 123


async def test_reject_reasons_stay_within_1024_characters(tmp_path: Path) -> None:
    """Section 2: reasons are at most 1024 characters, whatever the frame held."""
    bodies = {"huge_unknown_kind": rows(1, [[99, 0, 1.0, "x" * 5000]]),
              "huge_text_kind": rows(1, [["k" * 5000, 0, 1.0]]),
              "huge_not_cbor": cbor2.dumps([1, ["s" * 5000], [[11, 0, 1.0, "t"]]])}
    async with running_hub(tmp_path) as port:
        peer = await PeerGateway.connect(port, GW, TOKEN)
        await rejected_in_turn(peer, bodies)
        assert all(0 < len(reject[2]) <= 1024 for reject in peer.rejects), [
            len(reject[2]) for reject in peer.rejects]


# ========== section 4: handshake


async def test_welcome_carries_the_documented_fields(tmp_path: Path) -> None:
    """Section 2's WELCOME layout, with the hub's configured heartbeat and limits; no
    `compression` key when the gateway offered none."""
    async with running_hub(tmp_path, max_frame_bytes=100_000, max_records_per_frame=777,
                           heartbeat_s=3.0) as port:
        peer = await PeerGateway.connect(port, GW, TOKEN, heartbeat=9.0)
        assert peer.first[0] == WELCOME and len(peer.first) == 2
        welcome = peer.welcome
        assert welcome["version"] == 3 and welcome["applied"] == []
        assert welcome["heartbeat"] == 3.0 and isinstance(welcome["heartbeat"], float)
        assert welcome["max_frame_bytes"] == 100_000 and welcome["max_records"] == 777
        assert "compression" not in welcome
        assert await peer.client.close() == (1000, "")


async def test_welcome_chooses_the_highest_version_in_common(tmp_path: Path) -> None:
    async with running_hub(tmp_path) as port:
        for offered, chosen in [([1, 2, 3], 3), ([1, 2], 2), ([1], 1), ([3, 9], 3),
                                ([2, 1], 2)]:
            peer = await PeerGateway.connect(port, GW, TOKEN, versions=offered)
            assert peer.welcome["version"] == chosen, offered
            assert await peer.client.close() == (1000, "")


async def test_a_hub_pinned_to_v2_answers_2_to_a_v3_gateway(tmp_path: Path) -> None:
    async with running_hub(tmp_path, max_protocol_version=2) as port:
        peer = await PeerGateway.connect(port, GW, TOKEN, versions=[1, 2, 3])
        assert peer.welcome["version"] == 2


async def test_refuse_is_type_3_with_code_and_reason_then_that_close(tmp_path: Path) -> None:
    async with running_hub(tmp_path) as port:
        peer = await PeerGateway.connect(port, GW, "wrong")
        assert peer.first[0] == REFUSE and peer.first[1] == 4001
        assert await closed_with(peer) == (4001, peer.first[2])
        peer = await PeerGateway.connect(port, GW, TOKEN, versions=[7])
        assert peer.first[:2] == [REFUSE, 4002]
        assert await closed_with(peer) == (4002, peer.first[2])


async def test_4002_lists_what_a_pinned_hub_speaks(tmp_path: Path) -> None:
    """Section 4: REFUSE 4002 "the reason lists what the hub speaks"."""
    async with running_hub(tmp_path, max_protocol_version=2) as port:
        peer = await PeerGateway.connect(port, GW, TOKEN, versions=[3])
        assert peer.first[:2] == [REFUSE, 4002]
        assert peer.first[2].endswith("this hub speaks [1, 2]")


async def test_unknown_hello_keys_are_ignored(tmp_path: Path) -> None:
    """Section 1: unknown map keys are ignored (forward compatibility)."""
    async with running_hub(tmp_path) as port:
        peer = await PeerGateway.connect(port, GW, TOKEN, colour="blue", future={"x": [1]})
        assert peer.welcome["version"] == 3


async def test_next_seq_marks_frames_below_it_applied_and_counts_them_lost(
        tmp_path: Path) -> None:
    """Section 4.3: the hub adds [1, next_seq - 1] to the applied set and records the
    frames it lacked as lost (`frames_lost` in /api/stats)."""
    async with running_hub(tmp_path) as port:
        peer = await PeerGateway.connect(port, GW, TOKEN, next_seq=1)
        await peer.send(data(2, rows(2, [sensor("t", 1.0)])))
        await peer.until_acked(2)
        await peer.client.close()
        peer = await PeerGateway.connect(port, GW, TOKEN, next_seq=5)
        assert peer.welcome["applied"] == [[1, 4]]
        stats = await gateway_stats(port)
        assert stats["frames_lost"] == 3  # 1, 3 and 4: the hub never had them
        # and a new epoch starts with an applied set of its own
        await peer.client.close()
        peer = await PeerGateway.connect(port, GW, TOKEN, epoch="epoch-2", next_seq=1)
        assert peer.welcome["applied"] == []


async def test_each_epoch_keeps_its_own_applied_set(tmp_path: Path) -> None:
    """Section 3: one applied set per (gateway id, epoch)."""
    async with running_hub(tmp_path) as port:
        for epoch, seqs in [("epoch-1", (1, 2)), ("epoch-2", (1,)), ("epoch-1", (3,))]:
            peer = await PeerGateway.connect(port, GW, TOKEN, epoch=epoch,
                                             next_seq=seqs[0])
            for seq in seqs:
                await peer.send(data(seq, rows(seq, [sensor("t", 1.0)])))
            await peer.until_acked(*seqs)
            assert await peer.client.close() == (1000, "")
        for epoch, applied in [("epoch-1", [[1, 3]]), ("epoch-2", [[1, 1]])]:
            peer = await PeerGateway.connect(port, GW, TOKEN, epoch=epoch)
            assert peer.welcome["applied"] == applied, epoch
            assert await peer.client.close() == (1000, "")


async def test_two_connections_sending_the_same_frame_apply_it_once(tmp_path: Path) -> None:
    """Section 4: the newest connection wins (4008 to the old one) and exactly-once holds
    across the takeover whatever the timing."""
    async with running_hub(tmp_path) as port:
        old = await PeerGateway.connect(port, GW, TOKEN)
        await old.send(data(1, rows(1, [sensor("t", 1.0)] * 3)))
        new = await PeerGateway.connect(port, GW, TOKEN)
        code, _ = await closed_with(old)
        assert code == 4008
        # WELCOME lists what is durable: frame 1 if the old connection's commit finished,
        # else nothing (dropped, to be resent) -- either way it is applied once
        assert new.welcome["applied"] in ([], [[1, 1]])
        await new.send(data(1, rows(1, [sensor("t", 1.0)] * 3)))
        assert await new.until_acked(1) == [ACK, 1, []]
        assert (await gateway_stats(port))["records_applied"] == 3


async def test_positions_are_kept_once_their_frames_are_applied_and_handed_back(
        tmp_path: Path) -> None:
    """Section 4.1: WELCOME offers POSITIONS; the hub keeps positions only when every
    frame of their epoch up to theirs is applied, hands the last kept back to a HELLO that
    asks (whichever epoch told them), and a newer epoch's replace an older one's."""
    async with running_hub(tmp_path) as port:
        peer = await PeerGateway.connect(port, GW, TOKEN)
        assert peer.welcome["positions"] is True and "resume" not in peer.welcome
        await peer.send(data(1, rows(1, [sensor("t", 1.0)])))
        await peer.send(data(3, rows(3, [sensor("t", 3.0)])))  # frame 2 not sent: a hole
        await peer.send(positions(3, {"tail": "at 3"}))  # not kept: frame 2 is missing
        await peer.send(positions(1, {"tail": "at 1"}))
        await peer.send(data(4, rows(4, [sensor("t", 4.0)])))  # (after them in order)
        await peer.until_acked(1, 3, 4)
        assert await peer.client.close() == (1000, "")

        fresh = await PeerGateway.connect(port, GW, TOKEN, epoch="epoch-2", resume=True)
        assert fresh.welcome["resume"] == {"tail": "at 1"} and fresh.welcome["applied"] == []
        await fresh.send(data(1, rows(1, [])))
        await fresh.send(positions(1, {"tail": "at 1, epoch 2"}))
        await fresh.send(data(2, rows(1, [sensor("t", 5.0)])))
        await fresh.until_acked(2)
        assert await fresh.client.close() == (1000, "")

        again = await PeerGateway.connect(port, GW, TOKEN, epoch="epoch-3", resume=True)
        assert again.welcome["resume"] == {"tail": "at 1, epoch 2"}
        assert await again.client.close() == (1000, "")
        other = await PeerGateway.connect(port, "ate-02", TOKEN, resume=True)
        assert other.welcome["resume"] == {}  # none kept for it: an empty map


# ========== sections 3, 5 and 6: frames, acknowledgements, duplicates, order


async def test_a_v1_row_frame_is_applied_and_acked(tmp_path: Path) -> None:
    """Section 10's exchange: DATA 41 after next_seq 41 is acknowledged [5, 41, []]."""
    async with running_hub(tmp_path) as port:
        peer = await PeerGateway.connect(port, GW, TOKEN, next_seq=41, versions=[1])
        assert peer.welcome["applied"] == [[1, 40]] and peer.welcome["version"] == 1
        await peer.send(data(41, rows(40001, [sensor("t", 1.0), sensor("t", 2.0)])))
        assert await peer.next() == [ACK, 41, []]
        stats = await gateway_stats(port)
        assert stats["frames_applied"] == 1 and stats["records_applied"] == 2
        assert stats["last_seq"] == 41


async def test_acks_are_cumulative_with_ranges_above_the_watermark(tmp_path: Path) -> None:
    """Section 6: ACK [5, watermark, ranges]: 1..watermark applied, and every range, all
    above watermark + 1; a later ACK supersedes an earlier one."""
    async with running_hub(tmp_path) as port:
        peer = await PeerGateway.connect(port, GW, TOKEN)
        await peer.send(data(1, rows(1, [sensor("t", 1.0)])))
        assert await peer.until_acked(1) == [ACK, 1, []]
        await peer.send(data(3, rows(3, [sensor("t", 3.0)])))
        assert await peer.until_acked(3) == [ACK, 1, [[3, 3]]]
        await peer.send(data(5, rows(5, [sensor("t", 5.0)])))
        assert await peer.until_acked(5) == [ACK, 1, [[3, 3], [5, 5]]]
        await peer.send(data(2, rows(2, [sensor("t", 2.0)])))
        assert await peer.until_acked(2) == [ACK, 3, [[5, 5]]]
        await peer.send(data(4, rows(4, [sensor("t", 4.0)])))
        assert await peer.until_acked(4) == [ACK, 5, []]
        for _, watermark, ranges in peer.acks:
            assert all(watermark + 1 < lo <= hi for lo, hi in ranges)
        assert (await gateway_stats(port))["records_applied"] == 5


async def test_out_of_order_frames_newest_first_are_applied(tmp_path: Path) -> None:
    """Section 5: after an outage a gateway may send live frames before the backlog."""
    async with running_hub(tmp_path) as port:
        peer = await PeerGateway.connect(port, GW, TOKEN)
        for seq in (6, 7, 1, 2, 3, 4, 5):
            await peer.send(data(seq, rows(seq, [sensor("t", float(seq))])))
        assert await peer.until_acked(*range(1, 8)) == [ACK, 7, []]
        assert (await gateway_stats(port))["frames_applied"] == 7


async def test_a_frame_already_applied_is_acked_again_and_not_applied_twice(
        tmp_path: Path) -> None:
    """Section 3: a frame in the applied set, sent on a later connection, is a duplicate:
    dropped (counted), acknowledged again -- each time it comes."""
    async with running_hub(tmp_path) as port:
        peer = await PeerGateway.connect(port, GW, TOKEN)
        await peer.send(data(1, rows(1, [sensor("t", 1.0), sensor("t", 1.5)])))
        await peer.until_acked(1)
        assert await peer.client.close() == (1000, "")
        for again in range(1, 3):
            peer = await PeerGateway.connect(port, GW, TOKEN)
            assert peer.welcome["applied"] == [[1, 1]]
            await peer.send(data(1, rows(1, [sensor("t", 1.0), sensor("t", 1.5)])))
            assert await peer.next() == [ACK, 1, []]
            stats = await gateway_stats(port)
            assert stats["frames_applied"] == 1 and stats["records_applied"] == 2
            assert stats["duplicates_dropped"] == again
            assert await peer.client.close() == (1000, "")


async def test_a_frame_applied_before_the_connection_is_acked_each_time_it_comes(
        tmp_path: Path) -> None:
    """Section 5: a frame in WELCOME's `applied`, sent on the connection, is a duplicate
    "each time it comes" -- not "sent twice on one connection" (4004), which is for frames
    that came on this connection.  A rejected frame is in the applied set too."""
    async with running_hub(tmp_path) as port:
        peer = await PeerGateway.connect(port, GW, TOKEN)
        await peer.send(data(1, rows(1, [sensor("t", 1.0)])))
        await peer.send(data(2, b"\xff"))
        await peer.until_acked(1, 2)
        await peer.client.close()
        peer = await PeerGateway.connect(port, GW, TOKEN)
        assert peer.welcome["applied"] == [[1, 2]]
        for seq in (1, 1, 2, 2):
            await peer.send(data(seq, rows(seq, [sensor("t", 1.0)])))
            assert await peer.next() == [ACK, 2, []]
        stats = await gateway_stats(port)
        assert stats["duplicates_dropped"] == 4 and stats["records_applied"] == 1
        assert stats["frames_rejected"] == 1


async def test_a_rejected_frame_sent_again_on_its_connection_is_4004(tmp_path: Path) -> None:
    """Section 5: a frame that came on this connection, coming again: 4004 -- a rejected
    one too (it came; the gateway never retries an invalid frame)."""
    async with running_hub(tmp_path) as port:
        peer = await PeerGateway.connect(port, GW, TOKEN)
        await peer.send(data(1, b"\xff"))
        await peer.until_rejected(1)
        await peer.send(data(1, b"\xff"))
        assert await closed_with(peer) == (4004, "frame 1 sent twice on one connection")


async def test_max_holes_bounds_the_gaps(tmp_path: Path) -> None:
    """Section 5: any seq is accepted while applied-or-in-flight numbers have at most
    `max_holes` gaps; one more closes with 4004 "sequence gap"."""
    async with running_hub(tmp_path, max_holes=2) as port:
        peer = await PeerGateway.connect(port, GW, TOKEN)
        for seq in (1, 3, 5):  # two holes: 2 and 4
            await peer.send(data(seq, rows(seq, [sensor("t", 1.0)])))
        await peer.until_acked(1, 3, 5)
        await peer.send(data(7, rows(7, [sensor("t", 1.0)])))  # a third
        code, reason = await closed_with(peer)
        assert code == 4004 and reason.startswith("sequence gap")
        # filling a hole keeps the count: after 2, frame 7 leaves 2 holes (4, 6)
        peer = await PeerGateway.connect(port, GW, TOKEN)
        assert peer.welcome["applied"] == [[1, 1], [3, 3], [5, 5]]
        for seq in (2, 7):
            await peer.send(data(seq, rows(seq, [sensor("t", 1.0)])))
        assert await peer.until_acked(2, 7) == [ACK, 3, [[5, 5], [7, 7]]]


async def test_strict_order_with_max_holes_0_starts_at_next_seq(tmp_path: Path) -> None:
    """Section 5: "With `max_holes = 0` the hub requires strict order" -- the first frame
    of a connection included: next_seq, not one past it."""
    async with running_hub(tmp_path, max_holes=0) as port:
        peer = await PeerGateway.connect(port, GW, TOKEN, next_seq=1)
        await peer.send(data(2, rows(2, [sensor("t", 1.0)])))
        code, reason = await closed_with(peer)
        assert code == 4004 and reason.startswith("sequence gap")


# ========== section 5: invalid frames (REJECT) and the record table


ROW_INVALID = {
    "not_cbor": b"\xff\x00",
    "two_items": cbor2.dumps([1, ["s"]]),
    "unknown_kind": rows(1, [[99, 0, 1.0, "x"]]),
    "too_few_fields": rows(1, [[SENSOR_READING, 0, 1.0, "t"]]),  # no value
    "rid_past_int64": rows(INT64_MAX, [sensor("t", 1.0), sensor("t", 2.0)]),
}


async def test_an_invalid_body_is_rejected_applied_and_the_link_stays(tmp_path: Path) -> None:
    """Section 5: an invalid frame gets REJECT [6, seq, reason], its seq joins the applied
    set, and the frames behind it go on (never blocked, never retried).  Row rules:
    `first_rid: uint >= 1`, `source_index` indexes `sources`."""
    bodies = {**ROW_INVALID, "first_rid_0": rows(0, [sensor("t", 1.0)]),
              "row_source_out_of_range": rows(1, [sensor("t", 1.0, source=3)])}
    async with running_hub(tmp_path) as port:
        peer = await PeerGateway.connect(port, GW, TOKEN)
        last = await rejected_in_turn(peer, bodies)
        stats = await gateway_stats(port)
        assert stats["frames_rejected"] == len(bodies)
        assert stats["records_applied"] == len(bodies)
        assert await peer.client.close() == (1000, "")
        peer = await PeerGateway.connect(port, GW, TOKEN)
        assert peer.welcome["applied"] == [[1, last]]


async def test_the_largest_record_id_is_valid(tmp_path: Path) -> None:
    """Section 2: record ids up to 2^63 - 1 are within the bound."""
    async with running_hub(tmp_path) as port:
        peer = await PeerGateway.connect(port, GW, TOKEN)
        await peer.send(data(1, rows(INT64_MAX - 1, [sensor("t", 1.0), sensor("t", 2.0)])))
        assert await peer.next() == [ACK, 1, []]


async def test_extra_trailing_fields_and_omitted_defaults(tmp_path: Path) -> None:
    """Section 5: trailing fields with defaults may be omitted; more fields than the table
    lists are ignored."""
    async with running_hub(tmp_path) as port:
        peer = await PeerGateway.connect(port, GW, TOKEN, versions=[1])
        body = rows(1, [[SENSOR_READING, 0, 1.0, "t", 2.0],
                        [SENSOR_READING, 0, 1.0, "t", 2.0, "C", "future", {"x": 1}]])
        await peer.send(data(1, body))
        assert await peer.next() == [ACK, 1, []]
        assert (await gateway_stats(port))["records_applied"] == 2


#: per kind, its fields after `ts` up to the last one without a default (section 5's table)
REQUIRED: dict[int, list[Any]] = {
    1: ["L"],                                                   # LotStart
    2: ["L"],                                                   # LotEnd
    3: ["L", "W"],                                              # WaferStart
    4: ["L", "W"],                                              # WaferEnd
    5: ["L", "W", 1, 0, "p1", 3, 4, 1, 1, True],                # PartResult
    6: ["L", 1, 0, "p1", 100, "VDD", 1.0, 0.5, 1.5, "V", True],  # ParametricResult
    7: ["L", 1, 0, "p1", 200, "FUNC", True],                    # FunctionalResult
    8: ["L", 1, 0, "p1", 300, "MPR", [1.0, 2.0], 0.0, 3.0, "V", True],  # MultiPinResult
    9: ["L", "H", 255, 0, 1, 10, "P"],                          # BinSummary
    10: ["L", 255, 0, 10],                                      # PartCount
    11: ["t", 1.0],                                             # SensorReading
    12: ["w", 1.0, 0.5, 1.5, 1.0, 3, 10.0, 11.0],               # SensorWindow
    13: ["info", "c", "m"],                                     # GatewayEvent
    14: ["stdf", "PTR", {"TEST_NUM": 1}],                       # RawRecord
}


async def test_every_kind_with_its_required_fields_is_applied_and_one_fewer_rejected(
        tmp_path: Path) -> None:
    """Section 5's table, rows and columns: a record of each kind with exactly the fields
    up to its last one without a default is applied; without that field it is invalid
    (fewer fields than its kind requires), in either layout (section 5.2: "at least the
    columns up to the last field without a default")."""
    async with running_hub(tmp_path) as port:
        peer = await PeerGateway.connect(port, GW, TOKEN)
        seq = rid = 0
        invalid: set[int] = set()
        for kind, fields in REQUIRED.items():
            record = [kind, 0, 1764130000.0, *fields]
            # (each body its own record id: section 3, a record id is never reused)
            short = columns(rid + 4, [kind, 1], [[kind, [[v] for v in record[1:-1]]]])
            for body, valid in [
                (rows(rid + 1, [record]), True),
                (columns(rid + 2, [kind, 1], [[kind, [[v] for v in record[1:]]]]), True),
                (rows(rid + 3, [record[:-1]]), False),
                (short, False),
            ]:
                seq += 1
                await peer.send(data(seq, body))
                if valid:
                    await peer.until_acked(seq)
                else:
                    invalid.add(seq)
                    await peer.until_rejected(seq)
            rid += 4
        await peer.send(data(seq + 1, rows(rid + 1, [sensor("t", 1.0)])))
        await peer.until_acked(*range(1, seq + 2))
        assert {reject[1] for reject in peer.rejects} == invalid
        assert (await gateway_stats(port))["records_applied"] == 2 * len(REQUIRED) + 1


# ========== sections 1 and 5: the limits WELCOME announced


async def test_more_records_than_max_records_closes_4006_rows_and_columns(
        tmp_path: Path) -> None:
    """Section 5: more than `max_records` closes 4006; a columnar body's count is the sum
    of its runs (section 5.2); exactly `max_records` is fine."""
    async with running_hub(tmp_path, max_records_per_frame=4) as port:
        peer = await PeerGateway.connect(port, GW, TOKEN)
        assert peer.welcome["max_records"] == 4
        await peer.send(data(1, rows(1, [sensor("t", 1.0)] * 4)))
        await peer.until_acked(1)
        await peer.send(data(2, rows(5, [sensor("t", 1.0)] * 5)))
        assert (await closed_with(peer))[0] == 4006
        peer = await PeerGateway.connect(port, GW, TOKEN)
        body = columns(5, [SENSOR_READING, 3, SENSOR_READING, 2],
                       [sensor_table(["t"], [1.0])])
        await peer.send(data(2, body))
        assert (await closed_with(peer))[0] == 4006


async def test_a_message_over_max_frame_bytes_closes_1009(tmp_path: Path) -> None:
    async with running_hub(tmp_path, max_frame_bytes=2048) as port:
        peer = await PeerGateway.connect(port, GW, TOKEN)
        assert peer.welcome["max_frame_bytes"] == 2048
        await peer.send(data(1, rows(1, [sensor("t" * 3000, 1.0)])))
        assert (await closed_with(peer))[0] == 1009


# ========== section 5.2: columnar bodies (v2) and typed float columns (v3)


#: section 5.2's example body, byte for byte as the document prints it
EXAMPLE_V2 = bytes.fromhex(
    "84 19 9c41 81 66 746573746572 84 06 02 05 01 82"
    " 82 06 8f 81 00 82 fb41da499f34200000 fb41da499f34200000 81 64 4c4f5431 81 01 81 00"
    " 81 62 3137 82 1864 1865 82 63 564444 63 494444 82 fb3ff4000000000000"
    " fb3fe0000000000000 82 fb3ff0000000000000 f6 82 fb4000000000000000 fb4000000000000000"
    " 82 61 56 62 6d41 81 f5 81 00 81 00"
    " 82 05 90 81 00 81 fb41da499f34300000 81 64 4c4f5431 81 63 573031 81 01 81 00"
    " 81 62 3137 81 03 81 09 81 01 81 01 81 f5 81 f4 81 00 81 1878 81 02".replace(" ", ""))


EXAMPLE_V3 = bytes.fromhex(
    "84 19 9c41 81 66 746573746572 84 06 02 05 01 82"
    " 82 06 8f 81 00 d8 56 48 000020349f49da41 81 64 4c4f5431 81 01 81 00 81 62 3137"
    " 82 1864 1865 82 63 564444 63 494444 d8 56 50 000000000000f43f 000000000000e03f"
    " 82 fb3ff0000000000000 f6 d8 56 48 0000000000000040 82 61 56 62 6d41 81 f5 81 00 81 00"
    " 82 05 90 81 00 d8 56 48 000030349f49da41 81 64 4c4f5431 81 63 573031 81 01 81 00"
    " 81 62 3137 81 03 81 09 81 01 81 01 81 f5 81 f4 81 00 81 1878 81 02".replace(" ", ""))


async def test_the_documents_example_bodies_are_what_they_say(tmp_path: Path) -> None:
    """Section 5.2's two examples: their sizes as stated, and each applied by a hub on a
    connection of its version -- the PTRs' values reach the test's statistics."""
    assert len(EXAMPLE_V2) == 184 and len(EXAMPLE_V3) == 169
    assert cbor2.loads(EXAMPLE_V2)[3][0][1][8] == [1.25, 0.5]
    async with running_hub(tmp_path) as port:
        for gw, version, body in [(GW, 2, EXAMPLE_V2), ("ate-02", 3, EXAMPLE_V3)]:
            peer = await PeerGateway.connect(port, gw, TOKEN, versions=list(range(1, version + 1)))
            assert peer.welcome["version"] == version
            await peer.send(data(1, body))
            assert await peer.next() == [ACK, 1, []]
            assert (await gateway_stats(port, gw))["records_applied"] == 3
        with trio.fail_after(10):
            while (answer := await http_get(port, "/api/tests/LOT1/100"))[0] != 200 or \
                    answer[1]["executions"] < 2:
                await trio.sleep(0.02)
        test = answer[1]
        assert test["test_txt"] == "VDD" and test["executions"] == 2
        assert test["mean"] == 1.25 and test["lo_limit"] == 1.0 and test["hi_limit"] == 2.0


async def test_columns_fold_runs_repeat_and_extra_columns_are_ignored(tmp_path: Path) -> None:
    """Section 5.2: one value for every record, a kind in several runs, an indefinite-length
    top array, trailing default columns left out, unknown trailing columns ignored."""
    async with running_hub(tmp_path) as port:
        peer = await PeerGateway.connect(port, GW, TOKEN, versions=[1, 2])
        tables = [[SENSOR_READING, [[0], [1.0, 2.0, 3.0], ["a", "b", "a"], [1.0, 2.0, 3.0],
                                    ["C"], ["future column"]]]]
        body = columns(1, [SENSOR_READING, 2, SENSOR_READING, 1], tables)
        await peer.send(data(1, body))
        indefinite = (b"\x9f" + cbor2.dumps(7) + cbor2.dumps(["s"]) + cbor2.dumps([11, 1])
                      + cbor2.dumps([[11, [[0], [1.0], ["c"], [4.0]]]]) + b"\xff")
        await peer.send(data(2, indefinite))
        assert await peer.until_acked(1, 2) == [ACK, 2, []]
        assert (await gateway_stats(port))["records_applied"] == 4
        assert not peer.rejects


COLUMNAR_INVALID: dict[str, tuple[list[int], list[Any]]] = {
    "count_0": ([11, 0], [sensor_table(["t"], [1.0])]),
    "kind_without_table": ([11, 1, 5, 1], [sensor_table(["t"], [1.0])]),
    "table_without_run": ([11, 1], [sensor_table(["t"], [1.0]), [5, [[0]] * 13]]),
    "table_twice": ([11, 1], [sensor_table(["t"], [1.0]), sensor_table(["t"], [1.0])]),
    "unknown_kind": ([99, 1], [[99, [[0], [1.0]]]]),
    "column_of_another_length": ([11, 3], [sensor_table(["t"], [1.0, 2.0])]),
    "too_few_columns": ([11, 1], [[11, [[0], [1.0], ["t"]]]]),
    "source_index_out_of_range": ([11, 1], [[11, [[1], [1.0], ["t"], [1.0]]]]),
    "runs_of_odd_length": ([11, 1, 11], [sensor_table(["t"], [1.0])]),
    "rid_past_int64": ([11, 2], [sensor_table(["t"], [1.0, 2.0])]),
    "negative_count": ([11, -1], [sensor_table(["t"], [1.0])]),
    "count_not_an_integer": ([11, "1"], [sensor_table(["t"], [1.0])]),
    "column_not_an_array": ([11, 1], [[11, [[0], [1.0], "t", [1.0]]]]),
    "typed_bytes_without_tag_on_v2": ([11, 1], [[11, [[0], struct.pack("<d", 1.0), ["t"],
                                                      [1.0]]]]),
}


COLUMNAR_FIRST_RID = {"rid_past_int64": INT64_MAX}


async def test_a_columnar_body_breaking_a_rule_is_rejected(tmp_path: Path) -> None:
    """Section 5.2's list of what makes a columnar frame invalid (REJECT, link up)."""
    bodies = {case: columns(COLUMNAR_FIRST_RID.get(case, 1), runs, tables)
              for case, (runs, tables) in COLUMNAR_INVALID.items()}
    async with running_hub(tmp_path) as port:
        peer = await PeerGateway.connect(port, GW, TOKEN, versions=[1, 2])
        await rejected_in_turn(peer, bodies)


async def test_a_columnar_body_on_a_v1_connection_is_rejected(tmp_path: Path) -> None:
    async with running_hub(tmp_path) as port:
        peer = await PeerGateway.connect(port, GW, TOKEN, versions=[1])
        await peer.send(data(1, columns(1, [11, 1], [sensor_table(["t"], [1.0])])))
        await peer.until_rejected(1)


async def test_a_hub_pinned_to_v1_rejects_columns(tmp_path: Path) -> None:
    async with running_hub(tmp_path, max_protocol_version=1) as port:
        peer = await PeerGateway.connect(port, GW, TOKEN)
        assert peer.welcome["version"] == 1
        await peer.send(data(1, columns(1, [11, 1], [sensor_table(["t"], [1.0])])))
        await peer.until_rejected(1)
        await peer.send(data(2, rows(1, [sensor("t", 1.0)])))
        await peer.until_acked(2)


TYPED_INVALID: dict[str, Any] = {
    "float32_tag_85": cbor2.CBORTag(85, struct.pack("<2f", 1.0, 2.0)),
    "tag_86_around_text": cbor2.CBORTag(86, "abcdefghijklmnop"),
    "wrong_length": cbor2.CBORTag(86, b"\x00" * 12),
    "three_values_for_two": typed(1.0, 2.0, 3.0),
    "bytes_without_tag": struct.pack("<2d", 1.0, 2.0),
}


async def test_typed_float_columns_keep_every_bit(tmp_path: Path) -> None:
    """Typed columns of 8 x n bytes and of 8 bytes (one value for all); -0.0, infinities
    and NaN decode to exactly the binary64 sent.  Read back through /ws/live: the sensor
    topic's history holds each reading (live-topics.md)."""
    async with running_hub(tmp_path) as port:
        dash = await PeerDashboard.connect(port)
        await dash.subscribe(["sensor/+"])
        peer = await PeerGateway.connect(port, GW, TOKEN)
        assert peer.welcome["version"] == 3
        values = typed(-0.0, math.inf, -1.5, 2.5)
        body = columns(1, [11, 4], [sensor_table(["t"], values, ts=typed(5.0))])
        await peer.send(data(1, body))
        assert await peer.next() == [ACK, 1, []]
        await dash.until(lambda d: len(points(d, "sensor/t")) >= 4)
        history = dash.topics["sensor/t"].view["history"]
        lasts = [point[1] for point in history]
        assert math.copysign(1, lasts[0]) == -1 and lasts[1:] == [math.inf, -1.5, 2.5]
        assert all(point[0] == 5.0 for point in history)


async def test_a_typed_column_breaking_a_rule_is_rejected(tmp_path: Path) -> None:
    bodies = {case: columns(1, [11, 2], [sensor_table(["t"], column)])
              for case, column in TYPED_INVALID.items()}
    bodies["column_0_typed"] = columns(1, [11, 2], [[11, [typed(0.0, 0.0), [1.0], ["t"],
                                                          [1.0, 2.0]]]])
    async with running_hub(tmp_path) as port:
        peer = await PeerGateway.connect(port, GW, TOKEN, versions=[1, 2, 3])
        await rejected_in_turn(peer, bodies)
        # a valid typed column, on a v2 connection
        peer = await PeerGateway.connect(port, "ate-02", TOKEN, versions=[1, 2])
        await rejected_in_turn(peer, {"on_v2": columns(1, [11, 2], [
            sensor_table(["t"], typed(1.0, 2.0))])})


# ========== section 5.1: compressed bodies


async def test_compression_is_negotiated_in_the_gateways_order(tmp_path: Path) -> None:
    async with running_hub(tmp_path, compression="zlib") as port:
        peer = await PeerGateway.connect(port, GW, TOKEN, compression=["lz4", "zlib"])
        assert peer.welcome["compression"] == "zlib"
        body = rows(1, [sensor("t", float(i)) for i in range(200)])
        await peer.send(zlib_data(1, body))
        await peer.send(data(2, rows(201, [sensor("t", 1.0)])))  # plain is still allowed
        assert await peer.until_acked(1, 2) == [ACK, 2, []]
        assert (await gateway_stats(port))["records_applied"] == 201
        peer = await PeerGateway.connect(port, "ate-02", TOKEN, compression=["lz4"])
        assert "compression" not in peer.welcome
        peer = await PeerGateway.connect(port, "ate-03", TOKEN)
        assert "compression" not in peer.welcome


async def test_a_hub_with_compression_off_accepts_none(tmp_path: Path) -> None:
    async with running_hub(tmp_path) as port:
        peer = await PeerGateway.connect(port, GW, TOKEN, compression=["zlib"])
        assert "compression" not in peer.welcome
        await peer.send(zlib_data(1, rows(1, [sensor("t", 1.0)])))
        assert (await closed_with(peer))[0] == 4004  # an encoding that was not agreed


async def test_a_bad_compressed_body_closes_4004(tmp_path: Path) -> None:
    body = zlib.compress(rows(1, [sensor("t", 1.0)] * 50))
    async with running_hub(tmp_path, compression="zlib") as port:
        for case, message in {"not_agreed_name": data(1, body, "gzip"),
                              "truncated_stream": data(1, body[:-6], "zlib"),
                              "two_streams": data(1, body + body, "zlib")}.items():
            peer = await PeerGateway.connect(port, GW, TOKEN, compression=["zlib"])
            await peer.send(message)
            assert (await closed_with(peer))[0] == 4004, case


async def test_a_body_decompressing_past_max_frame_bytes_closes_1009(tmp_path: Path) -> None:
    async with running_hub(tmp_path, compression="zlib", max_frame_bytes=4096) as port:
        peer = await PeerGateway.connect(port, GW, TOKEN, compression=["zlib"])
        bomb = zlib.compress(rows(1, [sensor("t" * 5000, 1.0)]))
        assert len(bomb) < 1000
        await peer.send(data(1, bomb, "zlib"))
        assert await closed_with(peer) == (
            1009, "DATA body decompresses to more than the limit of 4096 bytes")


async def test_compressed_frames_are_rejected_and_deduplicated_as_plain_ones(
        tmp_path: Path) -> None:
    """Section 5.1: acks, rejects and deduplication are the same compressed or not."""
    async with running_hub(tmp_path, compression="zlib") as port:
        peer = await PeerGateway.connect(port, GW, TOKEN, compression=["zlib"])
        await peer.send(data(1, zlib.compress(rows(1, [[99, 0, 1.0]])), "zlib"))
        await peer.until_rejected(1)
        await peer.send(zlib_data(2, rows(2, [sensor("t", 1.0)])))
        await peer.until_acked(1, 2)
        await peer.client.close()
        peer = await PeerGateway.connect(port, GW, TOKEN, compression=["zlib"])
        await peer.send(zlib_data(2, rows(2, [sensor("t", 1.0)])))
        assert await peer.next() == [ACK, 2, []]
        stats = await gateway_stats(port)
        assert (stats["frames_rejected"], stats["duplicates_dropped"]) == (1, 1)


# ========== section 7: heartbeats, the probe, load shedding, failed handshakes


async def test_ping_is_answered_with_the_same_t_and_an_idle_hub_pings(tmp_path: Path) -> None:
    async with running_hub(tmp_path, heartbeat_s=0.3) as port:
        peer = await PeerGateway.connect(port, GW, TOKEN)
        await peer.send(cbor2.dumps([PING, 12.25]))
        assert await peer.next() == [PONG, 12.25]
        with trio.fail_after(5):  # silent now: the hub PINGs after a heartbeat of nothing sent
            ping = await peer.next(pings=True)
        assert ping[0] == PING and isinstance(ping[1], float)
        # answered, so the link stays: the hub pings again instead of closing with 4005
        assert (await peer.next(pings=True))[0] == PING


async def test_readiness_probe_is_a_plain_get_of_the_gateway_path(tmp_path: Path) -> None:
    """Section 7.1."""
    async with running_hub(tmp_path) as port:
        assert await http_get(port, "/ws/gateway") == (200, {"status": "ready"})


async def test_a_busy_hub_answers_probe_and_upgrade_503_with_retry_after(
        tmp_path: Path) -> None:
    """Section 7, "Load shedding at the hub": with `max_pending_handshakes` handshakes
    under way (upgraded, no WELCOME yet) probes and upgrades get 503 + Retry-After; once
    the handshake ends the probe is 200 again."""
    async with running_hub(tmp_path, max_pending_handshakes=1,
                           busy_retry_after_s=7.0) as port:
        pending = await WsClient.connect(port, "/ws/gateway")  # upgraded, says nothing
        for head in ("GET /ws/gateway HTTP/1.1", UPGRADE):
            status, headers, _ = await http_request(port, head)
            assert status == 503 and headers["retry-after"] == "7"
        await pending.send(hello_bytes())
        assert cbor2.loads(await pending.recv())[0] == WELCOME
        status, _, body = await http_request(port, "GET /ws/gateway HTTP/1.1")
        assert (status, json.loads(body)) == (200, {"status": "ready"})
        assert (await http_request(port, UPGRADE))[0] == 101


async def test_refused_hellos_use_up_an_address_then_429_to_upgrades_only(
        tmp_path: Path) -> None:
    """Section 7, "Failed handshakes": each 4001 costs the address one of
    `gateway_failures_burst`; with none left its upgrades get 429 + Retry-After, its
    probes still 200."""
    async with running_hub(tmp_path, gateway_failures_burst=2,
                           gateway_failures_per_minute=0.01) as port:
        for _ in range(2):
            peer = await PeerGateway.connect(port, GW, "wrong")
            assert peer.first[:2] == [REFUSE, 4001]
        status, headers, _ = await http_request(port, UPGRADE)
        assert status == 429 and int(headers["retry-after"]) >= 1
        assert (await http_request(port, "GET /ws/gateway HTTP/1.1"))[0] == 200


# ========== live-protocol.md: connecting


async def test_live_hello_and_encodings(tmp_path: Path) -> None:
    """"Connecting": CBOR binary frames by default (no subprotocol asked), JSON text frames
    with `edgegw.live.v1.json`; either reads requests in both encodings; `hello` carries
    epoch, encoding, ui_rate, queue_frames, history and the merge rules."""
    async with running_hub(tmp_path, {"ui_rate": 10.0, "queue_frames": 32,
                                      "history": 99}) as port:
        dash = await PeerDashboard.connect(port)
        hello = dash.hello
        assert hello["type"] == "hello" and hello["encoding"] == "cbor"
        assert isinstance(hello["epoch"], str) and hello["epoch"]
        assert (hello["ui_rate"], hello["queue_frames"], hello["history"]) == (10.0, 32, 99)
        assert {(r["topics"], r["key"], r["op"]) for r in hello["merge"]} == {
            ("lot/+/wafer/+", "dies", "upsert"), ("sensor/#", "append", "append"),
            ("gateway/#", "event", "prepend"), ("alert/#", "alert", "upsert")}
        await dash.request({"type": "ping", "id": 4}, as_json=True)  # text to a CBOR client
        assert await dash.reply("pong") == {"type": "pong", "id": 4}
        assert dash.frame_kinds == {bytes}

        dash = await PeerDashboard.connect(port, JSON)
        assert dash.client.subprotocol == JSON and dash.hello["encoding"] == "json"
        assert dash.hello["epoch"] == hello["epoch"]  # one per hub run
        await dash.request({"type": "ping", "id": [1, "x"]})  # CBOR to a JSON client
        assert await dash.reply("pong") == {"type": "pong", "id": [1, "x"]}
        assert dash.frame_kinds == {str}


async def test_live_subprotocol_choice(tmp_path: Path) -> None:
    """"Connecting": the first subprotocol offered that the hub knows; CBOR (and none in
    the answer) when the client offers none it knows."""
    async with running_hub(tmp_path) as port:
        for offered, chosen, encoding in [
            ([CBOR], CBOR, "cbor"), (["x.unknown"], None, "cbor"),
            (["x.unknown", JSON], JSON, "json"), ([JSON, CBOR], JSON, "json"),
            ([CBOR, JSON], CBOR, "cbor"),
        ]:
            client = await WsClient.connect(port, "/ws/live", subprotocols=offered)
            raw = await client.recv()
            hello = json.loads(raw) if isinstance(raw, str) else cbor2.loads(raw)
            assert (client.subprotocol, hello["encoding"]) == (chosen, encoding), offered
            assert isinstance(raw, str) == (encoding == "json")
            await client.aclose()


LIVE_UPGRADE = ("GET /ws/live HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13")


async def test_live_permessage_deflate_negotiation(tmp_path: Path) -> None:
    """live-protocol.md, "Compression": the answer is exactly `permessage-deflate;
    server_no_context_takeover; client_no_context_takeover`; an offer with
    server_max_window_bits below 15 or an unknown parameter is declined (plain frames)."""
    async with running_hub(tmp_path, {"compression": "permessage-deflate"}) as port:
        for offer, agreed in [
            ("permessage-deflate; client_max_window_bits", True),
            ("permessage-deflate", True),
            ("permessage-deflate; server_max_window_bits=10", False),
            ("permessage-deflate; frobnicate=1", False),
            ("permessage-deflate; server_max_window_bits=10, permessage-deflate", True),
        ]:
            status, headers, _ = await http_request(
                port, f"{LIVE_UPGRADE}\r\nSec-WebSocket-Extensions: {offer}")
            assert status == 101
            assert headers.get("sec-websocket-extensions") == (
                "permessage-deflate; server_no_context_takeover; client_no_context_takeover"
                if agreed else None), offer


async def test_live_json_sends_nan_and_infinities_as_null(tmp_path: Path) -> None:
    async with running_hub(tmp_path) as port:
        feed = await Feed.open(port)
        dash = await PeerDashboard.connect(port, JSON)
        cbor = await PeerDashboard.connect(port)
        for client in (dash, cbor):
            await client.subscribe(["sensor/+"])
        await feed("odd", math.nan)
        await feed("odd", math.inf)
        await dash.until(lambda d: len(points(d, "sensor/odd")) == 2)
        assert [point[1] for point in dash.topics["sensor/odd"].view["history"]] == [None] * 2
        await cbor.until(lambda d: len(points(d, "sensor/odd")) == 2)
        lasts = [point[1] for point in cbor.topics["sensor/odd"].view["history"]]
        assert math.isnan(lasts[0]) and lasts[1] == math.inf


# ========== live-protocol.md: subscribe, snapshot then deltas, unsubscribe, ui_rate


async def test_live_snapshot_then_deltas_with_offsets(tmp_path: Path) -> None:
    """"subscribe": the reply, then a snapshot per matching topic, then delta items whose
    `from` is the offset held and whose `offset` is one more per delta (`n`); the view
    built from them equals a fresh snapshot (live-topics.md, "Applying a delta")."""
    async with running_hub(tmp_path) as port:
        feed = await Feed.open(port)
        dash = await PeerDashboard.connect(port)
        reply = await dash.subscribe(["sensor/+"], id="a")
        assert reply["type"] == "subscribed" and reply["id"] == "a"
        assert reply["topics"] == ["sensor/+"] and reply["epoch"] == dash.hello["epoch"]
        await feed("temp", 20.0)
        await dash.until(lambda d: "sensor/temp" in d.topics)
        first = dash.topics["sensor/temp"]
        assert first.snapshots == 1 and first.epoch == dash.hello["epoch"]
        first_offset = first.offset
        for i in range(5):
            await feed("temp", 21.0 + i, 30.0 + i, ts=1764130100.0 + 10 * i)
        await dash.until(lambda d: len(d.topics["sensor/temp"].view["history"]) == 11)
        items = [item for batch in dash.batches for item in batch["items"]
                 if item["topic"] == "sensor/temp"]
        assert items[0]["type"] == "snapshot" and items[0]["data"]["history"] == [
            [1764130000.0, 20.0, 20.0, 20.0, 20.0]]
        assert set(items[0]["data"]) >= {"channel", "unit", "source", "latest", "history"}
        assert items[0]["data"]["latest"] == {"ts": 1764130000.0, "t0": 1764130000.0,
                                              "t1": 1764130000.0, "last": 20.0, "min": 20.0,
                                              "max": 20.0, "mean": 20.0, "count": 1}
        items = items[1:]
        # one more per delta: the deltas' counts add up to the offsets travelled
        assert items[0]["from"] == first_offset
        assert sum(item["n"] for item in items) == first.offset - first_offset
        assert all(set(d) <= {"latest", "unit", "append"} for i in items for d in i["data"])
        for item in items:
            assert item["offset"] - item["from"] == item["n"] >= len(item["data"]) >= 1
            assert "ts" not in item or item["ts"][0] <= item["ts"][1]
        view = dash.topics["sensor/temp"].view
        assert view["latest"]["last"] == 34.0 and view["history"][-1][1] == 34.0
        fresh = await PeerDashboard.connect(port)
        await fresh.subscribe(["sensor/temp"])
        await fresh.until(lambda d: "sensor/temp" in d.topics)
        assert fresh.topics["sensor/temp"].offset == dash.topics["sensor/temp"].offset
        assert fresh.topics["sensor/temp"].view == view


async def test_live_topics_appearing_later_and_patterns(tmp_path: Path) -> None:
    """A topic that appears later and matches starts with a snapshot; `#` matches zero
    levels (`gateway/ate-01/#` matches `gateway/ate-01`); a pattern the client already
    has changes nothing; after `unsubscribe` nothing more comes for its topics."""
    async with running_hub(tmp_path) as port:
        dash = await PeerDashboard.connect(port)
        await dash.subscribe(["sensor/late", f"gateway/{GW}/#"])
        feed = await Feed.open(port)  # the gateway's topic appears on connect
        await dash.until(lambda d: f"gateway/{GW}" in d.topics)
        assert dash.topics[f"gateway/{GW}"].view["online"] is True
        assert "sensor/late" not in dash.topics
        await feed("late", 1.0)
        await dash.until(lambda d: "sensor/late" in d.topics)
        assert dash.topics["sensor/late"].snapshots == 1
        await dash.subscribe(["sensor/late"], id=2)  # again: no second snapshot
        await feed("late", 2.0)
        await dash.until(lambda d: d.topics["sensor/late"].view["latest"]["last"] == 2.0)
        assert dash.topics["sensor/late"].snapshots == 1
        await dash.request({"type": "unsubscribe", "id": 3, "topics": ["sensor/late"]})
        assert (await dash.reply("unsubscribed"))["id"] == 3
        await feed("late", 3.0)
        await feed("other", 3.0)
        # the gateway topic, still followed, counts both frames: anything of sensor/late's
        # would have come before that
        await dash.until(lambda d: d.topics[f"gateway/{GW}"].view["frames"] == feed.seq)
        assert dash.topics["sensor/late"].view["latest"]["last"] == 2.0


async def test_live_an_unknown_topic_is_subscribed_and_sends_nothing(tmp_path: Path) -> None:
    async with running_hub(tmp_path) as port:
        feed = await Feed.open(port)
        dash = await PeerDashboard.connect(port)
        await dash.subscribe(["no/such/topic", f"gateway/{GW}"])
        await feed("t", 1.0)
        await dash.until(lambda d: (d.topics.get(f"gateway/{GW}") or Topic("", 0, {})).view
                         .get("frames") == 1)
        assert set(dash.topics) == {f"gateway/{GW}"}


async def test_live_a_subscribe_is_taken_whole_or_not_at_all(tmp_path: Path) -> None:
    """"subscribe": the reply's `topics` are the request's patterns, `id` null without
    one; a request with a bad pattern, a bad resume entry or one pattern too many is an
    error and subscribes none of its patterns."""
    async with running_hub(tmp_path, {"max_patterns": 3}) as port:
        feed = await Feed.open(port)
        dash = await PeerDashboard.connect(port)
        for message in [
            {"type": "subscribe", "id": 1, "topics": ["sensor/a", "bad/#/x"]},
            {"type": "subscribe", "id": 2, "topics": ["sensor/+"], "resume": {"x": 5}},
            {"type": "subscribe", "id": 3, "topics": ["sensor/b", "q/1", "q/2", "q/3"]},
        ]:
            await dash.request(message)
            assert (await dash.reply("error"))["id"] == message["id"]
        await dash.request({"type": "subscribe", "topics": [f"gateway/{GW}", "q/1", "q/2"]})
        assert await dash.reply("subscribed") == {
            "type": "subscribed", "id": None, "topics": [f"gateway/{GW}", "q/1", "q/2"],
            "epoch": dash.hello["epoch"]}  # three patterns: none of the above was taken
        await feed("a", 1.0)
        await feed("b", 1.0)
        await dash.until(lambda d: (d.topics.get(f"gateway/{GW}") or Topic("", 0, {})).view
                         .get("frames") == 2)
        assert set(dash.topics) == {f"gateway/{GW}"}


async def test_live_resubscribing_at_max_patterns_changes_nothing(tmp_path: Path) -> None:
    """"Subscribing to a pattern the client already has changes nothing" -- also when the
    client is at `max_patterns`; a new one then is `too_many_topics`."""
    async with running_hub(tmp_path, {"max_patterns": 2}) as port:
        dash = await PeerDashboard.connect(port)
        await dash.subscribe(["sensor/a", "sensor/b"])
        assert (await dash.subscribe(["sensor/a"], id=2))["id"] == 2
        await dash.request({"type": "subscribe", "id": 3, "topics": ["sensor/c"]})
        error = await dash.reply("error")
        assert (error["code"], error["id"]) == ("too_many_topics", 3)


async def test_live_pattern_length_limit_is_256(tmp_path: Path) -> None:
    async with running_hub(tmp_path) as port:
        dash = await PeerDashboard.connect(port)
        reply = await dash.subscribe(["sensor/" + "x" * 249])
        assert reply["topics"] == ["sensor/" + "x" * 249]


async def test_live_unsubscribe_keeps_topics_another_pattern_matches(tmp_path: Path) -> None:
    async with running_hub(tmp_path) as port:
        feed = await Feed.open(port)
        dash = await PeerDashboard.connect(port)
        await dash.subscribe(["sensor/+", "sensor/a"])
        await feed("a", 1.0)
        await dash.until(lambda d: "sensor/a" in d.topics)
        await dash.request({"type": "unsubscribe", "id": 2, "topics": ["sensor/a"]})
        await dash.reply("unsubscribed")
        await feed("a", 2.0)
        await dash.until(lambda d: d.topics["sensor/a"].view["latest"]["last"] == 2.0)
        assert dash.topics["sensor/a"].snapshots == 1


async def test_live_snapshots_are_spread_over_ticks_by_rows(tmp_path: Path) -> None:
    """"subscribe": a tick starts a snapshot only while fewer than
    `snapshot_rows_per_tick` rows (a wafer map: one per die) were built in it, so many
    wafer maps come over a few batches."""
    async with running_hub(tmp_path, {"snapshot_rows_per_tick": 10}) as port:
        peer = await PeerGateway.connect(port, GW, TOKEN)
        records: list[Any] = [[1, 0, 1764130000.0, "L1"]]
        for wafer in ("W1", "W2", "W3"):
            records += [[*part(x, 1, 1, True)[:4], wafer, *part(x, 1, 1, True)[5:]]
                        for x in range(1, 9)]  # 8 dies a wafer
        await peer.send(data(1, rows(1, records, sources=["tester"])))
        await peer.until_acked(1)
        watcher = await PeerDashboard.connect(port)  # the state is built once followed
        await watcher.subscribe(["lot/+/wafer/+"])
        await watcher.until(lambda d: len(d.topics) == 3)
        dash = await PeerDashboard.connect(port)
        await dash.subscribe(["lot/+/wafer/+"])
        await dash.until(lambda d: len(d.topics) == 3)
        per_batch = [[len(item["data"]["dies"]) for item in batch["items"]]
                     for batch in dash.batches if batch["items"]]
        assert len(per_batch) >= 2, per_batch
        # whichever snapshot was built last, the rows before it were fewer than 10
        assert all(sum(dies) - max(dies) < 10 for dies in per_batch), per_batch
        assert all(len(t.view["dies"]) == 8 for t in dash.topics.values())


async def test_live_batches_never_closer_than_one_ui_interval(tmp_path: Path) -> None:
    """"At most one batch per client per 1/ui_rate seconds", by the batches' own `ts`
    (the hub's clock when it made them): what the client's receive times would blur."""
    async with running_hub(tmp_path, {"ui_rate": 8.0}) as port:
        feed = await Feed.open(port)
        dash = await PeerDashboard.connect(port)
        await dash.subscribe(["sensor/+"])
        async with trio.open_nursery() as nursery:
            async def reader() -> None:
                while True:
                    await dash.read()
            nursery.start_soon(reader)
            for i in range(24):  # a frame every ~25 ms: something new for every tick
                await feed("fast", float(i))
                await trio.sleep(0.025)
            with trio.fail_after(5):
                while dash.topics["sensor/fast"].view["latest"]["last"] != 23.0:
                    await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
        stamps = [batch["ts"] for batch in dash.batches]
        assert len(stamps) >= 3
        gaps = [b - a for a, b in itertools.pairwise(stamps)]
        assert min(gaps) >= 1 / 8.0 * 0.99, gaps


# ========== live-protocol.md: resume with (epoch, offset)


async def test_live_resume_gets_exactly_what_was_missed(tmp_path: Path) -> None:
    """"subscribe" with `resume`: one delta item from the offset held to the current one;
    nothing for a topic resumed at its current offset."""
    async with running_hub(tmp_path) as port:
        feed = await Feed.open(port)
        watcher = await PeerDashboard.connect(port)  # keeps the topics wanted meanwhile
        await watcher.subscribe(["sensor/+"])
        await feed("a", 1.0)
        await feed("b", 1.0)
        await watcher.until(lambda d: {"sensor/a", "sensor/b"} <= set(d.topics))
        epoch = watcher.hello["epoch"]
        held = {name: watcher.topics[name].offset for name in ("sensor/a", "sensor/b")}
        away = {name: dict(vars(watcher.topics[name])) for name in held}
        await feed("a", 2.0)
        await feed("a", 3.0)
        await watcher.until(lambda d: len(d.topics["sensor/a"].view["history"]) == 3)
        now_a = watcher.topics["sensor/a"].offset
        assert now_a > held["sensor/a"]

        back = await PeerDashboard.connect(port)
        for name, topic in away.items():  # the state it held before it went away
            back.topics[name] = Topic(**topic)
        await back.subscribe(["sensor/+"], resume={n: [epoch, o] for n, o in held.items()})
        await back.until(lambda d: d.topics["sensor/a"].offset == now_a)
        items = [i for b in back.batches for i in b["items"]]
        assert [(i["type"], i["topic"], i["from"]) for i in items] == [
            ("delta", "sensor/a", held["sensor/a"])]
        assert back.topics["sensor/a"].view == watcher.topics["sensor/a"].view
        await feed("b", 5.0)  # b was resumed at its offset: its next item is a delta
        await back.until(lambda d: d.topics["sensor/b"].deltas == 1)
        assert back.topics["sensor/b"].snapshots == 1  # the one it held, none sent


@pytest.mark.parametrize("case", ["epoch_changed", "offset_ahead", "history_truncated"])
async def test_live_resume_that_cannot_be_served_is_a_marked_snapshot(tmp_path: Path,
                                                                      case: str) -> None:
    """"otherwise a `snapshot` with `resync` set to the reason" -- never a silent gap."""
    async with running_hub(tmp_path, {"history": 2}) as port:
        feed = await Feed.open(port)
        watcher = await PeerDashboard.connect(port)
        await watcher.subscribe(["sensor/+"])
        await feed("a", 1.0)
        await watcher.until(lambda d: "sensor/a" in d.topics)
        epoch, offset = watcher.hello["epoch"], watcher.topics["sensor/a"].offset
        resume = {"epoch_changed": ["another-run", offset],
                  "offset_ahead": [epoch, offset + 100],
                  "history_truncated": [epoch, offset]}[case]
        if case == "history_truncated":  # more deltas than the history keeps
            for v in range(2, 7):
                await feed("a", float(v))
                await watcher.until(lambda d, v=v: d.topics["sensor/a"].view["latest"][
                    "last"] == float(v))
        back = await PeerDashboard.connect(port)
        await back.subscribe(["sensor/a"], resume={"sensor/a": resume})
        await back.until(lambda d: "sensor/a" in d.topics)
        topic = back.topics["sensor/a"]
        assert topic.snapshots == 1 and topic.resyncs == [case]
        assert topic.view == watcher.topics["sensor/a"].view


async def test_live_a_resumed_topic_the_hub_lacks_is_never_a_bare_snapshot(
        tmp_path: Path) -> None:
    """"subscribe": a topic the client resumed that the hub did not have at the time keeps
    its resume entry until it appears: then the missed deltas or a snapshot marked
    `resync`, never a bare snapshot over the view the client holds."""
    async with running_hub(tmp_path) as port:
        dash = await PeerDashboard.connect(port)
        await dash.subscribe(["sensor/+"], resume={"sensor/new": [dash.hello["epoch"], 7]})
        feed = await Feed.open(port)
        await feed("new", 1.0)
        await dash.until(lambda d: "sensor/new" in d.topics)
        topic = dash.topics["sensor/new"]
        assert topic.resyncs or topic.deltas, vars(topic)


@pytest.mark.parametrize("changed", [False, True])
async def test_live_resume_after_nobody_followed_the_topic(tmp_path: Path,
                                                           changed: bool) -> None:
    """live-topics.md, "Unwatched topics": a topic that changed while no client followed it
    resumes as a snapshot marked `history_truncated`, never deltas across the gap; one that
    did not change resumes as any other (nothing until its next delta)."""
    async with running_hub(tmp_path) as port:
        feed = await Feed.open(port)
        first = await PeerDashboard.connect(port)
        await first.subscribe(["sensor/a"])
        await feed("a", 1.0)
        await first.until(lambda d: "sensor/a" in d.topics)
        held = first.topics["sensor/a"]
        assert await first.close() == (1000, "")
        if changed:
            await feed("a", 2.0)
        back = await PeerDashboard.connect(port)
        back.topics["sensor/a"] = Topic(**vars(held))
        await back.subscribe(["sensor/a"], resume={"sensor/a": [held.epoch, held.offset]})
        await feed("a", 3.0)
        await back.until(lambda d: d.topics["sensor/a"].view["latest"]["last"] == 3.0)
        topic = back.topics["sensor/a"]
        if changed:
            assert topic.snapshots == 2 and topic.resyncs == ["history_truncated"]
        else:
            assert topic.snapshots == 1 and topic.deltas >= 1 and not topic.resyncs
        assert [p[1] for p in topic.view["history"]] == ([1.0, 2.0, 3.0] if changed
                                                         else [1.0, 3.0])


# ========== live-protocol.md: requests, errors, ack


LIVE_ERRORS: list[tuple[Any, str]] = [
    ({"type": "subscribe", "id": 1, "topics": ["lot/#/x"]}, "bad_topics"),
    ({"type": "subscribe", "id": 1, "topics": ["lot/a+"]}, "bad_topics"),
    ({"type": "subscribe", "id": 1, "topics": ["x" * 257]}, "bad_topics"),
    ({"type": "subscribe", "id": 1, "topics": ["a", "b", "c"]}, "too_many_topics"),
    ({"type": "subscribe", "id": 1, "topics": ["a"], "resume": {"a": "nope"}}, "bad_resume"),
    ({"type": "frobnicate", "id": 1}, "unknown_type"),
    ({"type": "ack", "id": 1}, "bad_ack"),
    ({"type": "ack", "id": 1, "alert": "0000", "by": "me"}, "ack_failed"),
    ([1, 2], "bad_message"),
]


async def test_live_errors_keep_the_connection(tmp_path: Path) -> None:
    """"error": each code named for its cause, the request's `id` repeated, the
    connection open; `not JSON/CBOR` too."""
    async with running_hub(tmp_path, {"max_patterns": 2}) as port:
        dash = await PeerDashboard.connect(port)
        for message, code in LIVE_ERRORS:
            await dash.request(message)
            error = await dash.reply("error")
            assert error["code"] == code, (message, error)
            assert isinstance(error["message"], str)
            if isinstance(message, dict):
                assert error["id"] == 1
        await dash.client.send("{not json")
        assert (await dash.reply("error"))["code"] == "bad_message"
        await dash.request({"type": "ping", "id": 9})
        assert await dash.reply("pong") == {"type": "pong", "id": 9}


async def test_live_an_id_json_cannot_repeat(tmp_path: Path) -> None:
    """"Client -> hub": an `id` JSON cannot carry (a map with an array key, sent in CBOR to
    a JSON client) is answered with its keys as text or with `id` null."""
    async with running_hub(tmp_path) as port:
        dash = await PeerDashboard.connect(port, JSON)
        await dash.request({"type": "ping", "id": {(1, 2): "array key"}})
        reply = await dash.read()
        assert reply["type"] == "pong", reply
        assert reply["id"] is None or list(reply["id"].values()) == ["array key"], reply


@pytest.mark.parametrize("subprotocol", [JSON, None])
async def test_live_a_message_nested_past_400_containers_is_a_bad_message(
        tmp_path: Path, subprotocol: str | None) -> None:
    """"error": `bad_message` for a message nested more than 400 containers deep (the
    request's map included); 400 is read, its `id` repeated whole in either encoding."""
    def nested(depth: int) -> Any:
        value: Any = 1
        for _ in range(depth):
            value = [value]
        return value

    async with running_hub(tmp_path) as port:
        dash = await PeerDashboard.connect(port, subprotocol)
        await dash.request({"type": "ping", "id": nested(399)})
        assert await dash.read() == {"type": "pong", "id": nested(399)}
        await dash.request({"type": "ping", "id": nested(400)})
        error = await dash.read()
        assert error["type"] == "error" and error["code"] == "bad_message", error
        assert error["id"] is None


async def test_live_ack_of_an_alert_reaches_every_client_as_an_event(tmp_path: Path) -> None:
    """"`ack`": the reply `acked` repeats id, alert and by; every client following the
    alert's topic gets an `acknowledged` event delta (live-topics.md, `alert/...`), each
    event its own delta, never composed with the `raised` one."""
    async with running_hub(tmp_path) as port:
        dash = await PeerDashboard.connect(port)
        other = await PeerDashboard.connect(port, JSON)
        for client in (dash, other):
            await client.subscribe(["alert/#"])
        peer = await PeerGateway.connect(port, GW, TOKEN)
        dies = [part(x, 1, 5, False) for x in range(1, 7)]  # yield 0 after 6 dies
        await peer.send(data(1, rows(1, [[1, 0, 1764130000.0, "L1"], *dies],
                                     sources=["tester"])))
        await peer.until_acked(1)
        topic = "alert/P0/wafer-yield"
        await dash.until(lambda d: bool((d.topics.get(topic) or Topic("", 0, {})).view
                                        .get("alerts")))
        alert = dash.topics[topic].view["alerts"][0]
        assert alert["rule"] == "wafer-yield" and alert["acknowledged"] is False
        await dash.request({"type": "ack", "id": 3, "alert": alert["id"], "by": "maria"})
        assert await dash.reply("acked") == {"type": "acked", "id": 3, "alert": alert["id"],
                                             "by": "maria"}
        for client in (dash, other):
            await client.until(lambda d: any(a["acknowledged"] for a in (
                d.topics.get(topic) or Topic("", 0, {})).view.get("alerts", [])))
            items = [item for batch in client.batches for item in batch["items"]
                     if item["topic"] == topic and item["type"] == "delta"]
            assert all(item["n"] == len(item["data"]) for item in items)  # uncomposed
            assert items[-1]["data"][-1]["event"] == "acknowledged"
            assert client.topics[topic].view["alerts"][0]["acked_by"] == "maria"


# ========== live-topics.md: shapes and applying a delta


async def test_live_merge_rules_are_the_documented_ones(tmp_path: Path) -> None:
    """live-topics.md, "Applying a delta": `hello`'s `merge` is the printed list."""
    async with running_hub(tmp_path) as port:
        dash = await PeerDashboard.connect(port)
        assert dash.hello["merge"] == [
            {"topics": "lot/+/wafer/+", "key": "dies", "op": "upsert", "into": "dies",
             "by": [0, 1], "order": "oldest_first"},
            {"topics": "sensor/#", "key": "append", "op": "append", "into": "history",
             "keep": 120},
            {"topics": "gateway/#", "key": "event", "op": "prepend", "into": "events",
             "keep": 20},
            {"topics": "alert/#", "key": "alert", "op": "upsert", "into": "alerts",
             "by": "id", "order": "newest_first"}]


#: live-topics.md's snapshot examples: the keys each topic's snapshot has
SNAPSHOT_KEYS = {
    "lot/L1": {"lot_id", "part_type", "node_name", "tester_type", "job_name", "status",
               "started", "ended", "starts", "reopened_at", "gateways", "wafers", "tests",
               "wafer_count",
               "archived_wafers", "die_count", "good", "yield", "not_applicable", "parts",
               "retests", "hard_bins", "soft_bins", "hard_bins_tested", "soft_bins_tested",
               "sites", "units_per_hour", "test_time_ms", "reported", "updated"},
    "lot/L1/wafer/W1": {"lot_id", "wafer_id", "status", "started", "ended", "starts",
                        "reopened_at", "dies",
                        "die_count", "good", "yield", "not_applicable", "parts", "retests",
                        "hard_bins", "soft_bins", "hard_bins_tested", "soft_bins_tested",
                        "sites", "reported", "updated"},
    "test/L1/100": {"lot_id", "test_num", "kind", "test_txt", "test_txts", "named", "units",
                    "lo_limit", "hi_limit", "executions", "not_executed", "fails", "count",
                    "mean", "sigma", "min", "max", "cp", "cpk", "histogram", "sites",
                    "wafers"},
    "sensor/temp": {"channel", "unit", "source", "latest", "history"},
    f"gateway/{GW}": {"gateway_id", "online", "last_seen", "connected_at", "disconnected_at",
                      "records", "frames", "last_rid", "records_per_s", "events"},
    "hub/state": {"not_applied", "reasons"},
}


async def test_live_topic_shapes_are_the_documented_ones(tmp_path: Path) -> None:
    """live-topics.md: each topic's snapshot has the example's keys; the lot's `reported`
    holds what the tester sent (bin maps always, PCR fields once sent and not null); a
    wafer's `reported` its WRR's counts; a gateway event's fields."""
    async with running_hub(tmp_path) as port:
        dash = await PeerDashboard.connect(port)
        await dash.subscribe(["#"])
        peer = await PeerGateway.connect(port, GW, TOKEN)
        records = [
            [1, 0, 1764130000.0, "L1", "PT", "node", "tt", "job", 1764130000],
            [3, 0, 1764130000.0, "L1", "W1", 1, 1764130000],
            [6, 0, 1764130000.1, "L1", 1, 0, "p1", 100, "VDD", 1.2, 1.0, 2.0, "V", True],
            part(1, 1, 1, True),
            sensor("temp", 20.0),
            [13, 0, 1764130000.0, "warning", "spool_full", "the spool is full"],
            [4, 0, 1764130000.5, "L1", "W1", 1, 1764130001, 1, None],
            [9, 0, 1764130000.5, "L1", "H", 255, 0, 1, 1, "P", "good"],
            [10, 0, 1764130000.5, "L1", 255, 0, 1, None, 0],
        ]
        await peer.send(data(1, rows(1, records, sources=["tester"])))
        await peer.until_acked(1)
        await dash.until(lambda d: set(SNAPSHOT_KEYS) <= set(d.topics)
                         and d.topics["lot/L1"].view["reported"].get("part_count") == 1)
        for name, keys in SNAPSHOT_KEYS.items():
            assert set(dash.topics[name].view) == keys, name
        lot = dash.topics["lot/L1"].view
        assert lot["reported"] == {"hard_bins": {"1": 1}, "soft_bins": {}, "part_count": 1,
                                   "abort_count": 0}
        assert dash.topics["lot/L1/wafer/W1"].view["reported"] == {"part_count": 1}
        assert dash.topics[f"gateway/{GW}"].view["events"] == [
            {"ts": 1764130000.0, "level": "warning", "code": "spool_full",
             "message": "the spool is full"}]
        assert dash.topics["sensor/temp"].view["source"] == "tester"


async def test_live_wafer_map_deltas_upsert_dies_to_the_snapshot(tmp_path: Path) -> None:
    """live-topics.md: a wafer's `dies` rows are upserted by [x, y] (a retest replaces its
    die); counts are sent whole; bin maps have string keys; the view a client builds from
    snapshot and deltas is the hub's snapshot."""
    async with running_hub(tmp_path) as port:
        peer = await PeerGateway.connect(port, GW, TOKEN)
        dash = await PeerDashboard.connect(port)
        await dash.subscribe(["lot/+", "lot/+/wafer/+"])
        batches = [
            [[1, 0, 1764130000.0, "L1"], [3, 0, 1764130000.0, "L1", "W1"],
             part(1, 1, 1, True), part(2, 1, 5, False)],
            [part(3, 1, 1, True, site=1), part(2, 1, 1, True)],  # (2, 1) retested
            [part(1, 2, 7, False), part(1, 1, 1, True)],
            [part(4, 1, 1, True, head=2)],  # the other head's site 0: its head trails
        ]
        rid = 1
        for seq, records in enumerate(batches, 1):
            await peer.send(data(seq, rows(rid, records, sources=["tester"])))
            await peer.until_acked(seq)
            rid += len(records)
            await dash.until(lambda d: "lot/L1/wafer/W1" in d.topics)
        wafer = "lot/L1/wafer/W1"
        await dash.until(lambda d: d.topics[wafer].view["parts"] == 7)
        view = dash.topics[wafer].view
        assert sorted(view["dies"]) == sorted([[1, 1, 1, 1, True, 0], [2, 1, 1, 1, True, 0],
                                               [3, 1, 1, 1, True, 1], [1, 2, 7, 7, False, 0],
                                               [4, 1, 1, 1, True, 0, 2]])
        assert view["die_count"] == 5 and view["retests"] == 2 and view["good"] == 4
        assert view["hard_bins"] == {"1": 4, "7": 1}
        assert list(view["sites"]) == ["1/0", "1/1", "2/0"]
        fresh = await PeerDashboard.connect(port)
        await fresh.subscribe(["lot/+", "lot/+/wafer/+"])
        await fresh.until(lambda d: {wafer, "lot/L1"} <= set(d.topics))
        assert fresh.topics[wafer].view == view
        assert fresh.topics["lot/L1"].view == dash.topics["lot/L1"].view


async def test_live_gateway_events_each_reach_the_view(tmp_path: Path) -> None:
    """live-topics.md, `gateway/<id>`: each GatewayEvent record is a delta `{"event"}`
    (prepended to `events`, the newest 20); deltas carrying an event are never composed
    (live-protocol.md), so a client's view holds every event, as a fresh snapshot does --
    several in one frame included."""
    async with running_hub(tmp_path) as port:
        dash = await PeerDashboard.connect(port)
        await dash.subscribe([f"gateway/{GW}"])
        peer = await PeerGateway.connect(port, GW, TOKEN)
        await dash.until(lambda d: f"gateway/{GW}" in d.topics)
        events = [[13, 0, 1764130000.0 + i, "info", f"code{i}", f"message {i}"]
                  for i in range(3)]
        await peer.send(data(1, rows(1, events)))
        await peer.until_acked(1)
        await peer.send(data(2, rows(4, [[*events[0][:4], "code3", "message 3"]])))
        await peer.until_acked(2)
        await dash.until(lambda d: d.topics[f"gateway/{GW}"].view.get("frames") == 2)
        view = dash.topics[f"gateway/{GW}"].view
        assert [e["code"] for e in view["events"]] == ["code3", "code2", "code1", "code0"]
        fresh = await PeerDashboard.connect(port)
        await fresh.subscribe([f"gateway/{GW}"])
        await fresh.until(lambda d: f"gateway/{GW}" in d.topics)
        assert fresh.topics[f"gateway/{GW}"].view["events"] == view["events"]
