"""docs/protocol.md and docs/live-protocol.md probed at their edges by an outside client.

The client here is trio-websocket and cbor2 and nothing of edgegw: messages are built by
hand from the documents, so what the hub is held to is the text, not its own encoder.  A
real in-process hub (``Hub``) serves it over loopback.  Each test is one hostile or
unusual input an implementer may send and what the documents say must follow; each ends
by checking the hub still serves and counted no internal error (``/metrics``): a peer's
input is a protocol error, never a hub failure.  (tests/test_conformance.py has every
close code, tests/test_peer_protocol.py the ordinary rules.)
"""

from __future__ import annotations

import json
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import cbor2
import trio
from hubtools import http_get
from trio_websocket import ConnectionClosed, WebSocketConnection, open_websocket_url

from edgegw.config import build
from edgegw.hub import Hub, HubConfig
from edgegw.hub.fanout import CBOR, LiveConfig, LiveHub
from edgegw.metrics import Metrics

TOKEN = "s3cret"
GW = "ate-01"
JSON = "edgegw.live.v1.json"


@asynccontextmanager
async def running_hub(tmp: Path) -> AsyncIterator[int]:
    cfg = build(HubConfig, {"hub": {"port": 0, "data_dir": str(tmp), "gc_freeze_s": 0},
                            "gateways": {GW: {"token": TOKEN}}})
    app = Hub(cfg)
    async with trio.open_nursery() as nursery:
        port = await nursery.start(app.run)
        with trio.fail_after(20):
            yield port
            await still_serving(port)
        nursery.cancel_scope.cancel()


async def still_serving(port: int) -> None:
    """/healthz answers and /metrics counts no internal error."""
    status, health = await http_get(port, "/healthz")
    assert status == 200 and health["status"] == "ok"
    async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
        await stream.send_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        text = b""
        while chunk := await stream.receive_some(1 << 16):
            text += chunk
    assert b"\nedgegw_internal_errors_total 0.0\n" in text


def hello(versions: list[Any], epoch: str = "e1") -> bytes:
    return cbor2.dumps([1, {"versions": versions, "gateway": GW, "token": TOKEN,
                            "epoch": epoch, "next_seq": 1, "heartbeat": 5.0}])


async def close_of(ws: WebSocketConnection) -> tuple[int, str]:
    """The hub's close (code, reason), whatever it sends before it."""
    try:
        while True:
            await ws.get_message()
    except ConnectionClosed as closed:
        return int(closed.reason.code), closed.reason.reason or ""


# --------------------------------------------------------------------------- /ws/gateway


async def test_hello_versions_are_integers_and_a_cbor_true_is_not_version_1(
        tmp_path: Path) -> None:
    """Sections 1 and 2: `versions` is `[uint...]`, and integers are CBOR major types 0/1.
    A HELLO offering `true` is malformed (4004); before, the hub read it as version 1 and
    answered WELCOME with `"version": true`, which no peer can take for a version."""
    async with running_hub(tmp_path) as port:
        url = f"ws://127.0.0.1:{port}/ws/gateway"
        async with open_websocket_url(url) as ws:
            await ws.send_message(hello([True]))
            assert await close_of(ws) == (4004, "HELLO versions must be a list of integers")
        async with open_websocket_url(url) as ws:  # the same gateway is welcomed after it
            await ws.send_message(hello([1, 2, 3]))
            welcome = cbor2.loads(await ws.get_message())
            assert welcome[0] == 2 and type(welcome[1]["version"]) is int
            assert welcome[1]["version"] == 3


#: row bodies (section 5) whose integers are not integers: (body, the REJECT's reason)
NOT_INTEGERS = {
    "kind true": ([1, ["s"], [[True, 0, 1.5, "LOT1"]]], "bad record: unknown record kind True"),
    "kind 1.0": ([1, ["s"], [[1.0, 0, 1.5, "LOT1"]]], "bad record: unknown record kind 1.0"),
    "source index false": ([1, ["s"], [[11, False, 1.5, "probe", 1.0]]],
                           "bad record: source index False out of range"),
    "first_rid true": ([True, ["s"], [[11, 0, 1.5, "probe", 1.0]]],
                       "first_rid must be an integer >= 1, got True"),
}


async def test_a_row_body_whose_integers_are_booleans_or_floats_is_rejected(
        tmp_path: Path) -> None:
    """Sections 1 and 5: `kind`, `source_index` and `first_rid` are unsigned integers, so a
    row holding `true`, `false` or `1.0` there is invalid: REJECT, the link kept, as the
    columnar layout already had it.  Before, `true` and `1.0` were read as kind 1 -- a
    sensor-looking record applied as a LotStart -- and the frame was acknowledged."""
    async with running_hub(tmp_path) as port:
        async with open_websocket_url(f"ws://127.0.0.1:{port}/ws/gateway") as ws:
            await ws.send_message(hello([1]))
            assert cbor2.loads(await ws.get_message())[0] == 2
            for seq, (body, reason) in enumerate(NOT_INTEGERS.values(), start=1):
                await ws.send_message(cbor2.dumps([4, seq, 1.0, cbor2.dumps(body)]))
                assert cbor2.loads(await ws.get_message()) == [6, seq, reason]
                assert cbor2.loads(await ws.get_message()) == [5, seq, []]  # done with, too
            good = cbor2.dumps([1, ["s"], [[11, 0, 1.5, "probe", 1.0]]])
            await ws.send_message(cbor2.dumps([4, 5, 1.0, good]))
            assert cbor2.loads(await ws.get_message()) == [5, 5, []]
        _, stats = await http_get(port, "/api/stats")
        assert stats["gateways"][GW]["frames_rejected"] == 4, stats["gateways"][GW]


BIG = 2**20000  # a CBOR bignum of 2,500 bytes: past the 4,300 digits Python will print


async def test_integers_past_2_63_are_malformed_whatever_their_size(tmp_path: Path) -> None:
    """Section 2: an integer above 2^63 - 1 makes the message malformed (4004) -- in HELLO's
    `versions` too (it was 4002, and 1011 "internal error" for a bignum: quoting it in the
    reason raised).  A DATA `seq`, a message type or a record kind that large is as
    malformed (a REJECT for a body), never an internal error."""
    async with running_hub(tmp_path) as port:
        url = f"ws://127.0.0.1:{port}/ws/gateway"
        for versions in ([2**64], [BIG], [3, -1]):
            async with open_websocket_url(url) as ws:
                await ws.send_message(hello(versions))
                assert await close_of(ws) == (
                    4004, "HELLO versions must be integers from 0 to 2^63 - 1")
        for message, reason in [
            ([4, BIG, 1.0, b""], "DATA seq must be an integer from 1 to 2^63 - 1, got a "
                                 "value too large to show (int)"),
            ([BIG, 1], "unknown message type a value too large to show (int) with 2 items"),
            ([7, [BIG]], "PING t must be a finite number, got a value too large to show "
                         "(list)"),
        ]:
            async with open_websocket_url(url) as ws:
                await ws.send_message(hello([1, 2, 3]))
                assert cbor2.loads(await ws.get_message())[0] == 2
                await ws.send_message(cbor2.dumps(message))
                assert await close_of(ws) == (4004, reason[:123])
        async with open_websocket_url(url) as ws:
            await ws.send_message(hello([1], epoch="big-kind"))
            assert cbor2.loads(await ws.get_message())[0] == 2
            body = cbor2.dumps([1, ["s"], [[BIG, 0, 1.5, "probe", 1.0]]])
            await ws.send_message(cbor2.dumps([4, 1, 1.0, body]))
            reject = cbor2.loads(await ws.get_message())
            assert reject[:2] == [6, 1] and reject[2].startswith("bad record:"), reject


async def test_a_4002_reason_names_what_the_hub_speaks_however_many_versions_are_offered(
        tmp_path: Path) -> None:
    """Section 4: REFUSE 4002's reason lists what the hub speaks.  A HELLO offering 6,000
    versions had them all quoted first, so the REFUSE (cut at 1024 characters) lost the
    hub's versions and the log line was 35 KB (megabytes for a HELLO of 8 MiB)."""
    async with running_hub(tmp_path) as port:
        async with open_websocket_url(f"ws://127.0.0.1:{port}/ws/gateway") as ws:
            await ws.send_message(hello(list(range(4, 6004))))
            refuse = cbor2.loads(await ws.get_message())
            assert refuse == [3, 4002, "unsupported protocol version(s) [4, 5, 6, 7, 8, 9, "
                                       "10, 11, ... 6000 in all]; this hub speaks [1, 2, 3]"]
            assert await close_of(ws) == (4002, refuse[2][:123])


# --------------------------------------------------------------------------- /ws/live


#: request ids CBOR can carry to the hub and cbor2 decodes, but cannot encode back:
#: a value that contains itself (tags 28/29, shared references) and a tag-36 MIME message
UNREPEATABLE_IDS = {
    # {"type": "ping", "id": 28([29(0)])}: an array holding itself
    "cyclic": bytes.fromhex("a2 64 74797065 64 70696e67 62 6964 d81c 81 d81d 00"),
    "mime": cbor2.dumps({"type": "ping", "id": cbor2.CBORTag(36, "not a MIME message")}),
}


async def test_live_an_id_cbor_cannot_repeat_is_answered_with_id_null(tmp_path: Path) -> None:
    """live-protocol.md, "error": a request whose `id` cannot be repeated in the
    connection's encoding is answered with `id` null -- in CBOR too, not with an
    `internal_error` (which is for the hub's bugs, and counted as one)."""
    async with running_hub(tmp_path) as port:
        async with open_websocket_url(f"ws://127.0.0.1:{port}/ws/live") as ws:
            assert cbor2.loads(await ws.get_message())["type"] == "hello"
            for name, request in UNREPEATABLE_IDS.items():
                await ws.send_message(request)
                assert cbor2.loads(await ws.get_message()) == {"type": "pong", "id": None}, name
            await ws.send_message(cbor2.dumps({"type": "ping", "id": 7}))
            assert cbor2.loads(await ws.get_message()) == {"type": "pong", "id": 7}


class ManyTopics:
    """A live state with ``n`` test topics, as a hub with a big lot has (up to 20,000
    tests a lot, 16 lots: live-topics.md, "Caps")."""

    def __init__(self, n: int) -> None:
        self.state = {f"test/LOT{i % 16}/{i}": {"test_num": i} for i in range(n)}

    def snapshot(self, topic: str) -> dict[str, Any] | None:
        return self.state.get(topic)

    def topics(self) -> list[str]:
        return list(self.state)


def python_calls_of(action: Any) -> int:
    """How many Python function calls ``action()`` makes: work counted, not timed."""
    calls = 0

    def count(frame: Any, event: str, arg: Any) -> None:
        nonlocal calls
        calls += event == "call"

    sys.setprofile(count)
    try:
        action()
    finally:
        sys.setprofile(None)
    return calls


def test_live_a_subscribe_with_max_patterns_costs_per_topic_not_per_topic_and_pattern(
        ) -> None:
    """"subscribe": a client may hold `max_patterns` (256) patterns and every request is
    answered on the hub's one event loop, so a subscribe's cost must not be topics x
    patterns.  It was: 256 patterns that match nothing on a hub with 20,000 topics took
    5 s of the loop (every gateway and dashboard waiting), and a client could repeat it
    (unsubscribe, subscribe), or send the same subscribe again and again, each a walk over
    every topic.  Counted in Python calls, not timed: 2,000 topics and 256 patterns made
    over 512,000 calls, one per pair; now a few per topic, and none for a repeat."""
    n = 2000
    hub = LiveHub(ManyTopics(n), LiveConfig(), epoch="E1", metrics=Metrics())
    client = hub.connect(CBOR, now=0.0, peer="audit")
    patterns = [f"nothing{i}/+" for i in range(255)] + ["test/LOT3/+"]
    subscribe = cbor2.dumps({"type": "subscribe", "id": 1, "topics": patterns})
    unsubscribe = cbor2.dumps({"type": "unsubscribe", "id": 2, "topics": patterns[:-1]})
    calls = python_calls_of(lambda: hub.receive(client, subscribe, 0.0))
    assert calls < 20 * n, calls
    assert len(client.positions) == n // 16  # what it asked for: LOT3's tests, no more
    # the same subscribe again changes nothing, and costs no walk over every topic either
    calls = python_calls_of(lambda: hub.receive(client, subscribe, 0.0))
    assert calls < 4 * len(patterns), calls  # its patterns checked (523); 4,275 before
    # a topic that appears later is matched against every client's patterns the same way
    calls = python_calls_of(lambda: hub.publish("test/LOT3/later", {"test_num": 1}))
    assert calls < 100, calls  # 266 one pattern at a time, 15 now
    assert len(client.positions) == n // 16 + 1
    calls = python_calls_of(lambda: hub.receive(client, unsubscribe, 0.0))
    assert calls < 20 * n, calls
    assert len(client.positions) == n // 16 + 1
    replies = [cbor2.loads(f) for f in iter(lambda: hub.take_frame(client), None)]
    assert [r["type"] for r in replies] == ["hello", "subscribed", "subscribed",
                                            "unsubscribed"]


async def test_live_a_bignum_anywhere_in_a_request_is_the_clients_error_not_the_hubs(
        tmp_path: Path) -> None:
    """"error": a request the hub cannot act on gets its documented code, and
    `internal_error` is only for the hub's own bugs.  A CBOR bignum as the `type`, as a
    `resume` topic or as the `alert` of an `ack` was answered `internal_error` (and
    counted as one): quoting or naming it raised."""
    async with running_hub(tmp_path) as port:
        async with open_websocket_url(f"ws://127.0.0.1:{port}/ws/live") as ws:
            hello_message = cbor2.loads(await ws.get_message())
            resume = {BIG: [hello_message["epoch"], 1]}
            for request, code in [
                ({"type": BIG, "id": 1}, "unknown_type"),
                ({"type": "subscribe", "id": 2, "topics": ["sensor/+"], "resume": resume},
                 "bad_resume"),
                ({"type": "ack", "id": 3, "alert": BIG}, "bad_ack"),
            ]:
                await ws.send_message(cbor2.dumps(request))
                reply = cbor2.loads(await ws.get_message())
                assert (reply["type"], reply["id"], reply["code"]) == (
                    "error", request["id"], code), reply
                assert "too large to show" in reply["message"] or code == "bad_ack"


async def test_a_bignum_in_a_record_is_a_bad_record_and_the_live_view_keeps_going(
        tmp_path: Path) -> None:
    """Section 2 bounds every integer at 2^63 - 1.  A part result whose hard bin is a
    CBOR bignum was acknowledged and counted; every later snapshot of its lot raised
    (Python prints no int past 4,300 digits), so the fan-out's tick failed, for every
    client, from then on.  Now the record is a bad record (not applied, counted) and
    the lot's other parts are shown."""
    def part(part_id: str, hard_bin: int) -> list[Any]:
        return [5, 0, 1.5, "L1", "W1", 1, 0, part_id, 1, 2, hard_bin, 1, True]

    async with running_hub(tmp_path) as port:
        async with open_websocket_url(f"ws://127.0.0.1:{port}/ws/gateway") as gw:
            await gw.send_message(hello([1]))
            assert cbor2.loads(await gw.get_message())[0] == 2
            for seq, record in [(1, part("p1", BIG)), (2, part("p2", 1))]:
                body = cbor2.dumps([seq, ["s"], [record]])
                await gw.send_message(cbor2.dumps([4, seq, 1.0, body]))
                assert cbor2.loads(await gw.get_message()) == [5, seq, []]
        url = f"ws://127.0.0.1:{port}/ws/live"
        async with open_websocket_url(url, subprotocols=[JSON]) as ws:
            await ws.send_message('{"type": "subscribe", "id": 1, "topics": ["lot/+"]}')
            while True:
                message = json.loads(await ws.get_message())
                lots = [i for i in message.get("items", []) if i["topic"] == "lot/L1"]
                if lots:
                    break
            assert lots[0]["type"] == "snapshot" and lots[0]["data"]["hard_bins"] == {"1": 1}
