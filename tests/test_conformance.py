"""Conformance: every close code the hub documents, each 20 times in a row.

One test per row of the close-code table in docs/protocol.md (section 8) and of the close
codes in docs/live-protocol.md, over real loopback sockets against a real in-process hub
(``Hub``: ingest, live state, alerts, fan-out).  The client is a bare wsproto client
(tests/wsclient.py), so each assertion is on the close frame exactly as the hub sent it:
its code and its reason.  Issue 10 found about half of these closing with 1000 and no
reason (a fault swallowed by a cancellation in the hub, see docs/reliability.md): a row
that passes 20 times in a row is not passing by luck.

Every test also checks that the hub still answers /healthz and counted no internal error:
invalid input is a protocol error, never an internal one.
"""

from __future__ import annotations

import dataclasses
import math
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import cbor2
import pytest
import trio
from hubtools import http_get
from wsclient import WsClient

from edgegw.config import build
from edgegw.hub import Hub, HubConfig
from edgegw.metrics import internal_errors
from edgegw.protocol import (
    Ack,
    Data,
    Hello,
    Ping,
    Positions,
    Refuse,
    Reject,
    Welcome,
    decode,
    encode,
    encode_body,
)
from edgegw.records import SensorReading

REPEAT = 20
TOKEN = "s3cret"
GATEWAYS = [f"ate-{i:02d}" for i in range(REPEAT)]


def hub_settings(tmp: Path, live: dict[str, Any] | None = None, **hub: Any) -> HubConfig:
    # heartbeats and HELLO timeouts below the config's 1 s floor keep 20 repetitions fast;
    # the loader refuses them (docs/configuration.md), so they are set on the built config
    fast = {k: hub.pop(k) for k in ("heartbeat_s", "hello_timeout_s") if k in hub}
    cfg = build(HubConfig, {
        # 20 clients x 2 refusals from one address in the 4001 test: above the default limit
        "hub": {"port": 0, "data_dir": str(tmp), "gc_freeze_s": 0,
                "gateway_failures_burst": 1000, **hub},
        "gateways": {gw: {"token": TOKEN} for gw in GATEWAYS},
        "live": live or {},
    })
    return dataclasses.replace(cfg, hub=dataclasses.replace(cfg.hub, **fast))


@asynccontextmanager
async def running_hub(tmp: Path, live: dict[str, Any] | None = None,
                      **hub: Any) -> AsyncIterator[tuple[Hub, int]]:
    app = Hub(hub_settings(tmp, live, **hub))
    async with trio.open_nursery() as nursery:
        port = await nursery.start(app.run)
        yield app, port
        nursery.cancel_scope.cancel()


async def still_healthy(app: Hub, port: int, internal: float = 0) -> None:
    status, health = await http_get(port, "/healthz")
    assert status == 200 and health["status"] == "ok"
    assert internal_errors(app.metrics).total() == internal


async def connect(port: int) -> WsClient:
    return await WsClient.connect(port, "/ws/gateway")


async def welcomed(port: int, gw: str) -> WsClient:
    client = await connect(port)
    await client.send(encode(Hello(gw, TOKEN, "epoch-1", 1)))
    assert isinstance(decode(await client.recv()), Welcome)
    return client


def data(seq: int, n_records: int = 1) -> bytes:
    body = encode_body(seq, [SensorReading("s", 1.0, "c", float(i)) for i in range(n_records)])
    return encode(Data(seq, 1.0, body))


async def repeat(check: Callable[[int], Awaitable[None]]) -> None:
    for i in range(REPEAT):
        await check(i)


# --------------------------------------------------------------------------- /ws/gateway


async def test_1000_a_gateway_closing_normally_gets_its_close_echoed(tmp_path: Path) -> None:
    async with running_hub(tmp_path) as (app, port):
        async def check(i: int) -> None:
            client = await welcomed(port, GATEWAYS[i])
            assert await client.close(1000, "bye") == (1000, "bye")

        await repeat(check)
        _, stats = await http_get(port, "/api/stats")
        assert not any(g["connected"] for g in stats["gateways"].values())
        await still_healthy(app, port)


@pytest.mark.parametrize("path", ["/ws/gateway", "/ws/live"])
async def test_1001_the_hub_shutting_down_says_going_away(tmp_path: Path, path: str) -> None:
    for i in range(REPEAT):
        app = Hub(hub_settings(tmp_path / str(i)))
        async with trio.open_nursery() as nursery:
            port = await nursery.start(app.run)
            if path == "/ws/gateway":
                client = await welcomed(port, GATEWAYS[i])
            else:
                client = await WsClient.connect(port, path)
                assert cbor2.loads(await client.recv())["type"] == "hello"
            nursery.cancel_scope.cancel()
        # the hub has stopped; its close frame is waiting in the client's socket
        assert await client.close_reason() == (1001, "hub shutting down")


async def test_1009_a_message_over_max_frame_bytes(tmp_path: Path) -> None:
    async with running_hub(tmp_path, max_frame_bytes=4096) as (app, port):
        async def check(i: int) -> None:
            client = await welcomed(port, GATEWAYS[i])
            await client.send(encode(Data(1, 1.0, b"\x00" * 5000)))
            assert await client.close_reason() == (
                1009, "message exceeds the limit of 4096 bytes")

        await repeat(check)
        await still_healthy(app, port)


#: WebSocket-level faults (RFC 6455), the same on both endpoints: (frame, code, reason)
FRAMING_ERRORS = {
    "unmasked_frame": (0x2, b"\x00", False, 1002, "server received unexpected unmasked frame"),
    "text_not_utf8": (0x1, b"\xff", True, 1007,
                      "'utf-8' codec can't decode byte 0xff in position 0: invalid start byte"),
}


@pytest.mark.parametrize("path", ["/ws/gateway", "/ws/live"])
@pytest.mark.parametrize("fault", list(FRAMING_ERRORS))
async def test_1002_1007_a_websocket_frame_the_hub_cannot_read(tmp_path: Path, path: str,
                                                                fault: str) -> None:
    opcode, payload, masked, code, reason = FRAMING_ERRORS[fault]
    async with running_hub(tmp_path) as (app, port):
        async def check(i: int) -> None:
            if path == "/ws/gateway":
                client = await welcomed(port, GATEWAYS[i])
            else:
                client = await live_client(port, ["sensor/+"])
            await client.send_frame(opcode, payload, masked=masked)
            assert await client.close_reason() == (code, reason)

        await repeat(check)
        await still_healthy(app, port)


async def test_4001_an_unknown_gateway_or_a_wrong_token_is_refused(tmp_path: Path) -> None:
    async with running_hub(tmp_path) as (app, port):
        async def check(i: int) -> None:
            for gw, token, reason in [
                ("stranger", TOKEN, "unknown gateway id 'stranger'"),
                (GATEWAYS[i], "nope", f"wrong token for gateway '{GATEWAYS[i]}'"),
            ]:
                client = await connect(port)
                await client.send(encode(Hello(gw, token, "e", 1)))
                assert decode(await client.recv()) == Refuse(4001, reason)
                assert await client.close_reason() == (4001, reason)

        await repeat(check)
        await still_healthy(app, port)


async def test_4002_no_protocol_version_in_common(tmp_path: Path) -> None:
    async with running_hub(tmp_path) as (app, port):
        reason = "unsupported protocol version(s) [4, 5]; this hub speaks [1, 2, 3]"

        async def check(i: int) -> None:
            client = await connect(port)
            await client.send(encode(Hello(GATEWAYS[i], TOKEN, "e", 1, versions=(4, 5))))
            assert decode(await client.recv()) == Refuse(4002, reason)
            assert await client.close_reason() == (4002, reason)

        await repeat(check)
        await still_healthy(app, port)


async def test_4008_a_newer_connection_with_the_same_id_replaces_the_old_one(
        tmp_path: Path) -> None:
    """Newest wins (4003 is no longer sent): each new HELLO for a connected id is welcomed
    and the connection it replaces is closed with 4008."""
    async with running_hub(tmp_path) as (app, port):
        old = await welcomed(port, GATEWAYS[0])

        async def check(i: int) -> None:
            nonlocal old
            new = await welcomed(port, GATEWAYS[0])
            assert await old.close_reason() == (4008, "replaced by a newer connection")
            old = new

        await repeat(check)
        assert await old.close() == (1000, "")
        await still_healthy(app, port)


#: cause -> (messages sent, the first before HELLO or not, hub settings, the close reason)
PROTOCOL_ERRORS: dict[str, tuple[list[bytes | str], bool, dict[str, Any], str]] = {
    "ping_before_hello": ([encode(Ping(1.0))], True, {}, "expected HELLO, got PING"),
    "data_before_hello": ([data(1)], True, {}, "expected HELLO, got DATA"),
    "text_message": (["hello"], False, {},
                     "text messages are not part of the protocol; send binary CBOR"),
    "cbor_map": ([cbor2.dumps({"type": 4})], False, {},
                 "message must be a non-empty CBOR array"),
    "garbage": ([b"\xff\xfe\xfd"], False, {},
                "message is not valid CBOR: break code encountered where a data item was "
                "expected"),
    "unknown_type": ([cbor2.dumps([99, 1])], False, {}, "unknown message type 99 with 2 items"),
    "second_hello": ([encode(Hello("x", TOKEN, "e", 1))], False, {},
                     "unexpected HELLO from gateway"),
    "hub_message_from_gateway": ([encode(Ack(1, []))], False, {}, "unexpected ACK from gateway"),
    "sequence_gap": ([data(1), data(3)], False, {"max_holes": 0},
                     "sequence gap: frame 3 leaves 1 holes in [(1, 1), (3, 3)], limit is 0"),
    "same_seq_twice": ([data(1), data(1)], False, {}, "frame 1 sent twice on one connection"),
    # section 4.1: positions of a frame the hub has not got, and malformed positions
    "positions_of_a_frame_not_sent": (
        [data(1), encode(Positions(2, {"tail": 1}))], False, {},
        "POSITIONS of frame 2, which this hub has neither applied nor received on this "
        "connection"),
    "positions_not_a_map": ([data(1), cbor2.dumps([10, 1, [1, 2]])], False, {},
                            "POSITIONS positions must be a map with text keys"),
    "positions_too_large": (
        [data(1), encode(Positions(1, {"tail": "x" * (512 * 1024)}))], False, {},
        "POSITIONS positions takes 524299 bytes, over the 524288 allowed"),
}


@pytest.mark.parametrize("cause", list(PROTOCOL_ERRORS))
async def test_4004_protocol_errors(tmp_path: Path, cause: str) -> None:
    messages, before_hello, settings, reason = PROTOCOL_ERRORS[cause]
    async with running_hub(tmp_path, **settings) as (app, port):
        async def check(i: int) -> None:
            client = await (connect(port) if before_hello else welcomed(port, GATEWAYS[i]))
            for message in messages:
                await client.send(message)
            assert await client.close_reason() == (4004, reason)

        await repeat(check)
        assert app.metrics.counter("hub_protocol_errors_total").get(
            reason="protocol_error") == REPEAT
        await still_healthy(app, port)


async def test_4004_a_frame_applied_on_this_connection_and_sent_again(tmp_path: Path) -> None:
    """Section 5: a duplicate from an earlier connection is acknowledged again, but the
    same seq twice on one connection is a gateway fault -- even once it is applied."""
    async with running_hub(tmp_path) as (app, port):
        async def check(i: int) -> None:
            client = await welcomed(port, GATEWAYS[i])
            await client.send(data(1))
            assert decode(await client.recv()) == Ack(1, [])
            await client.send(data(1))
            assert await client.close_reason() == (4004, "frame 1 sent twice on one connection")
            again = await connect(port)  # a new connection: a duplicate, acknowledged
            await again.send(encode(Hello(GATEWAYS[i], TOKEN, "epoch-1", 1)))
            assert decode(await again.recv()).applied == [(1, 1)]
            await again.send(data(1))
            assert decode(await again.recv()) == Ack(1, [])
            assert await again.close() == (1000, "")

        await repeat(check)
        assert app.metrics.counter("hub_duplicate_frames_total").total() == REPEAT
        await still_healthy(app, port)


async def test_4005_a_silent_gateway_after_two_heartbeats(tmp_path: Path) -> None:
    async with running_hub(tmp_path, heartbeat_s=0.1) as (app, port):
        async def check(i: int) -> None:
            client = await welcomed(port, GATEWAYS[i])  # then silent: never answers PINGs
            assert await client.close_reason() == (
                4005, "nothing received for 0.2 s (heartbeat 0.1 s)")

        await repeat(check)
        await still_healthy(app, port)


async def test_4006_more_records_in_a_frame_than_max_records(tmp_path: Path) -> None:
    async with running_hub(tmp_path, max_records_per_frame=10) as (app, port):
        async def check(i: int) -> None:
            client = await welcomed(port, GATEWAYS[i])
            await client.send(data(1, n_records=11))
            assert await client.close_reason() == (4006, "frame has 11 records, limit is 10")

        await repeat(check)
        await still_healthy(app, port)


async def test_4007_no_hello_within_the_handshake_timeout(tmp_path: Path) -> None:
    async with running_hub(tmp_path, hello_timeout_s=0.1) as (app, port):
        async def check(i: int) -> None:
            client = await connect(port)
            assert await client.close_reason() == (4007, "no HELLO within the handshake timeout")

        await repeat(check)
        await still_healthy(app, port)


async def test_1011_a_failure_inside_the_hub_ends_only_that_connection(tmp_path: Path) -> None:
    """A real storage failure (the frames table is gone) while applying: the connection is
    closed with 1011, logged and counted; the hub keeps serving; the frame is not
    acknowledged, so the gateway sends it again later."""
    async with running_hub(tmp_path) as (app, port):
        await app.ingest.store.query("DROP TABLE frames")

        async def check(i: int) -> None:
            client = await welcomed(port, GATEWAYS[i])
            await client.send(data(1))
            assert await client.close_reason() == (1011, "internal error")

        await repeat(check)
        assert internal_errors(app.metrics).get(where="gateway_connection") == REPEAT
        await still_healthy(app, port, internal=REPEAT)


async def test_a_record_with_appended_fields_is_applied(tmp_path: Path) -> None:
    """Section 9 (new trailing record fields are ignored by older receivers) wins over a
    strict arity check: a SensorReading from a newer v1 gateway is applied, not rejected."""
    async with running_hub(tmp_path) as (app, port):
        client = await welcomed(port, GATEWAYS[0])
        newer = [11, 0, 1.5, "probe.temp", 25.5, "C", "a field from the future"]
        body = cbor2.dumps([1, ["sensors"], [newer]])
        await client.send(encode(Data(1, 1.0, body)))
        assert decode(await client.recv()) == Ack(1, [])
        assert app.metrics.counter("hub_frames_rejected_total").total() == 0
        snapshot = app.state.snapshot("sensor/probe.temp")
        assert snapshot is not None and snapshot["latest"]["last"] == 25.5
        assert await client.close() == (1000, "")
        await still_healthy(app, port)


async def test_v3_typed_float_columns_built_without_edgegw_are_applied_and_v2_refuses_them(
        tmp_path: Path) -> None:
    """Section 5.2 "Typed float columns", as an implementer would read it: a columnar body
    made with a generic CBOR library (no edgegw encoder) whose ts and value columns are
    RFC 8746 float64 little-endian typed arrays is applied on a v3 connection; the same
    body on a v2 connection is rejected (REJECT with the reason), the connection kept."""
    ts = cbor2.CBORTag(86, struct.pack("<2d", 1764130000.5, 1764130001.5))
    values = cbor2.CBORTag(86, struct.pack("<2d", 25.5, -0.0))
    body = cbor2.dumps([1, ["sensors"], [11, 2],
                        [[11, [[0], ts, ["probe.temp"], values, ["C"]]]]])
    async with running_hub(tmp_path) as (app, port):
        client = await connect(port)
        await client.send(encode(Hello(GATEWAYS[0], TOKEN, "epoch-1", 1, versions=(1, 2, 3))))
        welcome = decode(await client.recv())
        assert isinstance(welcome, Welcome) and welcome.version == 3
        await client.send(encode(Data(1, 1.0, body)))
        assert decode(await client.recv()) == Ack(1, [])
        with trio.fail_after(10):
            while (snapshot := app.state.snapshot("sensor/probe.temp")) is None:
                await trio.sleep(0.01)
        assert math.copysign(1, snapshot["latest"]["last"]) == -1  # -0.0, its sign kept
        assert await client.close() == (1000, "")

        old = await connect(port)
        await old.send(encode(Hello(GATEWAYS[1], TOKEN, "epoch-1", 1, versions=(1, 2))))
        welcome = decode(await old.recv())
        assert isinstance(welcome, Welcome) and welcome.version == 2
        await old.send(encode(Data(1, 1.0, body)))
        reply = decode(await old.recv())
        assert isinstance(reply, Reject) and reply.seq == 1
        assert "column 1 must be an array" in reply.reason
        assert await old.close() == (1000, "")
        await still_healthy(app, port)


# --------------------------------------------------------------------------- /ws/live


async def live_client(port: int, topics: list[str], **kw: Any) -> WsClient:
    """Connected and subscribed (the reply read); from here on it reads only when told."""
    client = await WsClient.connect(port, "/ws/live", **kw)
    assert cbor2.loads(await client.recv())["type"] == "hello"
    await client.send(cbor2.dumps({"type": "subscribe", "id": 1, "topics": topics}))
    while cbor2.loads(await client.recv())["type"] != "subscribed":
        pass
    return client


async def publish_until(app: Hub, topic: str, done: Callable[[], bool], *,
                        event: bool = False, topics: int = 1) -> None:
    """Publish ~8 KB deltas, as the live state would, until ``done()``; over ``topics``
    topics (``topic-0``, ...) when more than one, so that a tick writes that many frames,
    not one conflated delta: a socket fills in a few ticks even when ticks are rare."""
    pad = "x" * 8000
    n = 0
    with trio.fail_after(30):
        while not done():
            for _ in range(10):
                n += 1
                delta: dict[str, Any] = {"latest": {"n": n}, "pad": pad}
                if event:
                    delta["event"] = "raised"
                    delta["alert"] = {"id": f"a{n}"}
                app.fanout.publish(topic if topics == 1 else f"{topic}-{n % topics}", delta)
            await trio.sleep(0.005)  # let the ticker run; the condition is what we wait for


def slow_closed(app: Hub) -> float:
    return app.metrics.counter("live_slow_clients_total").get(action="closed")


async def test_live_1000_a_client_closing_normally_gets_its_close_echoed(
        tmp_path: Path) -> None:
    async with running_hub(tmp_path) as (app, port):
        async def check(i: int) -> None:
            client = await live_client(port, ["sensor/+"])
            assert await client.close(1000, "bye") == (1000, "bye")

        await repeat(check)
        await still_healthy(app, port)


async def test_live_1006_a_client_that_vanishes_is_counted_as_lost(tmp_path: Path) -> None:
    """A connection that ends with no close from either side -- here a reset; the same for
    the hub's kernel giving up on a vanished host -- is counted in
    ``edgegw_live_connections_lost_total``: neither the hub's verdict (4008, counted as a
    slow client) nor the client's own close is."""
    async with running_hub(tmp_path) as (app, port):
        lost = app.metrics.counter("live_connections_lost_total")

        async def check(i: int) -> None:
            client = await live_client(port, ["sensor/+"])
            assert await client.close(1000, "bye") == (1000, "bye")
            gone = await live_client(port, ["sensor/+"])
            sock = gone.stream.socket
            sock.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_LINGER,
                            struct.pack("ii", 1, 0))
            sock.close()  # an RST, no close frame
            with trio.fail_after(10):
                while app.fanout.core.clients:
                    await trio.sleep(0.01)
            assert lost.get() == i + 1

        await repeat(check)
        await still_healthy(app, port)


async def test_live_1009_a_message_over_256_kib(tmp_path: Path) -> None:
    async with running_hub(tmp_path) as (app, port):
        async def check(i: int) -> None:
            client = await live_client(port, ["sensor/+"])
            await client.send("x" * (256 * 1024 + 1))
            assert await client.close_reason() == (
                1009, "message exceeds the limit of 262144 bytes")

        await repeat(check)
        await still_healthy(app, port)


async def test_live_4008_too_slow_on_an_event_channel(tmp_path: Path) -> None:
    live = {"queue_frames": 2, "close_grace": 10.0, "ui_rate": 50.0}
    async with running_hub(tmp_path, live) as (app, port):
        async def check(i: int) -> None:
            closed = slow_closed(app)
            client = await live_client(port, ["alert/#"], rcvbuf=4096)
            await publish_until(app, f"alert/P0/rule{i}", lambda: slow_closed(app) > closed,
                                event=True)
            # it reads now: the write in progress completes, then the close frame
            assert await client.close_reason() == (4008, "too slow")

        await repeat(check)
        await still_healthy(app, port)


async def test_live_4008_stalled(tmp_path: Path) -> None:
    live = {"stall_timeout": 0.2, "close_grace": 10.0, "ui_rate": 50.0}
    async with running_hub(tmp_path, live) as (app, port):
        async def check(i: int) -> None:
            closed = slow_closed(app)
            client = await live_client(port, ["sensor/+"], rcvbuf=4096)
            await publish_until(app, f"sensor/probe{i}", lambda: slow_closed(app) > closed,
                                topics=20)
            assert await client.close_reason() == (4008, "stalled")

        await repeat(check)
        await still_healthy(app, port)


async def test_live_4008_stalled_also_when_the_hub_was_stopped_meanwhile(
        tmp_path: Path) -> None:
    """The hub's kernel counts a client's zero window against ``TCP_USER_TIMEOUT`` while
    the hub itself is stopped; its stall clock does not (docs/live-protocol.md, "Slow
    clients").  With the kernel's bound at ``stall_timeout`` the kernel ended the
    connection during the pause -- a bare 1006, counted nowhere; at ``stall_timeout`` +
    ``close_grace`` the hub's own verdict comes first."""
    live = {"stall_timeout": 1.0, "close_grace": 5.0, "ui_rate": 50.0}
    async with running_hub(tmp_path, live) as (app, port):
        closed = slow_closed(app)
        client = await live_client(port, ["sensor/+"], rcvbuf=4096)
        (state,) = app.fanout.core.clients.values()
        since: list[float | None] = []

        def write_stuck() -> bool:  # the same frame in flight, its clock unmoved, 0.1 s
            since.append(state.busy_since if state.in_flight else None)
            return len(since) > 20 and since[-1] is not None and since[-20] == since[-1]

        await publish_until(app, "sensor/probe", write_stuck, topics=20)
        # The whole hub stops (the Trio thread blocked) for twice the stall timeout; the
        # kernel goes on probing the zero window.
        time.sleep(2.0)  # the stop is the point (a blocking call on purpose)
        await publish_until(app, "sensor/probe", lambda: slow_closed(app) > closed,
                            topics=20)
        assert await client.close_reason() == (4008, "stalled")
        await still_healthy(app, port)
        assert app.metrics.counter("live_connections_lost_total").get() == 0


async def test_live_4008_too_many_unread_replies(tmp_path: Path) -> None:
    live = {"queue_frames": 2, "close_grace": 10.0, "ui_rate": 50.0}
    async with running_hub(tmp_path, live) as (app, port):
        def conflated() -> float:
            return app.metrics.counter("live_slow_clients_total").get(action="conflated")

        async def check(i: int) -> None:
            closed, lagging = slow_closed(app), conflated()
            client = await live_client(port, ["sensor/+"], rcvbuf=4096)
            # its socket full and its updates conflated, it keeps asking without reading
            await publish_until(app, f"sensor/probe{i}", lambda: conflated() > lagging)
            with trio.fail_after(10):
                while slow_closed(app) == closed:
                    await client.send(cbor2.dumps({"type": "ping", "id": 1}))
                    await trio.sleep(0.005)
            assert await client.close_reason() == (4008, "too many unread replies")

        await repeat(check)
        await still_healthy(app, port)
