"""Frame-body compression on /ws/gateway (docs/protocol.md section 5.1), over real sockets:
negotiated in HELLO/WELCOME, off unless both ends want it, a peer that does not offer it
sees exactly protocol v1, and a bad compressed body closes only its own connection."""

from __future__ import annotations

import zlib
from pathlib import Path
from typing import Any

import cbor2
import pytest
import trio
from hubtools import gateway_config, hub_config, start_hub
from trio_websocket import ConnectionClosed, open_websocket_url
from wsclient import Closed, WsClient
from wsproto.extensions import PerMessageDeflate

from edgegw.gateway import Gateway
from edgegw.hub.fanout import SUBPROTOCOL_CBOR, LiveConfig, LiveFanout
from edgegw.metrics import Metrics
from edgegw.protocol import (
    Ack,
    CloseCode,
    GatewayConnection,
    ProtocolError,
    Welcome,
    decode,
    decompress_body,
    encode_body,
)
from edgegw.records import SensorReading
from edgegw.web import HttpServer, accept_offer


def body(first_rid: int, n: int) -> bytes:
    return encode_body(first_rid, [SensorReading("oven", 1.0, "temp", 20.0 + (i % 7))
                                   for i in range(n)])


async def handshake(port: int, compression: tuple[str, ...] = (), min_bytes: int = 1024):
    conn = GatewayConnection("ate-01", "s3cret", "e1", 1, now=trio.current_time(),
                             compression=compression, compression_min_bytes=min_bytes)
    ws_cm = open_websocket_url(f"ws://127.0.0.1:{port}/ws/gateway", message_queue_size=16)
    ws = await ws_cm.__aenter__()
    await ws.send_message(conn.hello(trio.current_time()))
    events, _ = conn.receive(await ws.get_message(), trio.current_time())
    return ws_cm, ws, conn, events[0]


async def close_reason(ws) -> tuple[int, str]:
    with trio.fail_after(10):
        try:
            while True:
                await ws.get_message()
        except ConnectionClosed as exc:
            return exc.reason.code, exc.reason.reason or ""


async def deliver(tmp: Path, hub_compression: str, gw_compression: str) -> tuple[dict, Gateway]:
    """A real gateway sends 200 frames of 100 readings to a real hub."""
    async with trio.open_nursery() as nursery:
        hub, port = await start_hub(nursery, hub_config(tmp / "hub",
                                                        compression=hub_compression))
        gw = Gateway(gateway_config(tmp / "gw", port,
                                    uplink={"compression": gw_compression,
                                            "compression_min_bytes": 256}))
        await nursery.start(gw.run)
        for i in range(200):
            await gw.sink.put([SensorReading("oven", float(i), "temp", 20.0 + j % 7)
                               for j in range(100)], source="oven")
        assert await gw.drain(20), "the hub did not acknowledge everything"
        stats = hub.stats()["gateways"]["ate-01"]
        nursery.cancel_scope.cancel()
    await hub.store.close()
    return stats, gw


async def test_compressed_frames_arrive_whole_and_take_fewer_bytes(tmp_path: Path) -> None:
    stats, gw = await deliver(tmp_path, "zlib", "zlib")
    assert stats["records_applied"] == 20_000 and stats["frames_rejected"] == 0
    sent = gw.metrics.counter("uplink_bytes_sent_total").total()
    bodies = gw.metrics.counter("uplink_body_bytes_total").total()
    assert 0 < sent < bodies / 3, (sent, bodies)


async def test_a_hub_that_does_not_accept_compression_gets_plain_frames(
        tmp_path: Path) -> None:
    stats, gw = await deliver(tmp_path, "off", "zlib")
    assert stats["records_applied"] == 20_000
    sent = gw.metrics.counter("uplink_bytes_sent_total").total()
    bodies = gw.metrics.counter("uplink_body_bytes_total").total()
    assert sent > bodies  # each body whole, plus its DATA envelope


async def test_a_gateway_that_does_not_offer_sees_exactly_v1(tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        _, port = await start_hub(nursery, hub_config(tmp_path, compression="zlib"))
        # a HELLO as a v1 implementation writes it: no "compression" key
        async with open_websocket_url(f"ws://127.0.0.1:{port}/ws/gateway") as ws:
            await ws.send_message(cbor2.dumps([1, {
                "versions": [1], "gateway": "ate-01", "token": "s3cret", "epoch": "e",
                "next_seq": 1, "heartbeat": 5.0}]))
            kind, welcome = cbor2.loads(await ws.get_message())
            assert kind == 2 and "compression" not in welcome
            await ws.send_message(cbor2.dumps([4, 1, 0.0, body(1, 50)]))
            assert decode(await ws.get_message()) == Ack(1, [])
        nursery.cancel_scope.cancel()


async def test_the_hub_chooses_zlib_when_offered_and_accepted(tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        _, port = await start_hub(nursery, hub_config(tmp_path, compression="zlib"))
        ws_cm, ws, conn, welcome = await handshake(port, ("zlib",), min_bytes=100)
        assert isinstance(welcome, Welcome) and welcome.compression == "zlib"
        small, big = body(1, 1), body(2, 500)
        assert len(small) < 100
        plain = cbor2.loads(conn.data(1, small, trio.current_time()))
        packed = cbor2.loads(conn.data(2, big, trio.current_time()))
        assert len(plain) == 4  # below the minimum size: sent as v1 sends it
        assert packed[4] == "zlib" and zlib.decompress(packed[3]) == big
        await ws.send_message(cbor2.dumps(plain))
        await ws.send_message(cbor2.dumps(packed))
        while (msg := decode(await ws.get_message())) != Ack(2, []):
            assert isinstance(msg, Ack)
        await ws_cm.__aexit__(None, None, None)
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize(("hub_accepts", "data", "code", "reason"), [
    ("off", zlib.compress(body(1, 10)), CloseCode.PROTOCOL_ERROR, "was not agreed"),
    ("zlib", b"\x78\x9c not zlib at all", CloseCode.PROTOCOL_ERROR, "not valid zlib"),
    ("zlib", zlib.compress(body(1, 10))[:-3], CloseCode.PROTOCOL_ERROR, "not one complete"),
    # 4 KiB of zeros per byte sent: bounded by the frame limit, never inflated whole
    ("zlib", zlib.compress(b"\0" * (64 << 20), 9), CloseCode.TOO_BIG, "more than the limit"),
])
async def test_a_bad_compressed_body_closes_only_its_connection_with_a_clear_reason(
        tmp_path: Path, hub_accepts: str, data: bytes, code: int, reason: str) -> None:
    async with trio.open_nursery() as nursery:
        hub, port = await start_hub(nursery, hub_config(tmp_path, compression=hub_accepts,
                                                        max_frame_bytes=1 << 20))
        ws_cm, ws, _, _ = await handshake(port, ("zlib",))
        await ws.send_message(cbor2.dumps([4, 1, 0.0, data, "zlib"]))
        got_code, got_reason = await close_reason(ws)
        assert got_code == code and reason in got_reason, (got_code, got_reason)
        await ws_cm.__aexit__(None, None, None)
        assert hub.metrics.counter("hub_protocol_errors_total").total() == 1
        # the hub keeps serving: the next connection applies frames
        ws_cm, ws, conn, _ = await handshake(port)
        await ws.send_message(conn.data(1, body(1, 3), trio.current_time()))
        assert decode(await ws.get_message()) == Ack(1, [])
        await ws_cm.__aexit__(None, None, None)
        nursery.cancel_scope.cancel()


def test_a_body_at_exactly_the_limit_is_accepted() -> None:
    data = bytes(range(256)) * 16
    assert decompress_body(zlib.compress(data), len(data)) == data
    with pytest.raises(ProtocolError, match="more than the limit"):
        decompress_body(zlib.compress(data), len(data) - 1)


def test_a_hub_choosing_an_encoding_not_offered_is_a_protocol_error() -> None:
    from edgegw.protocol import encode
    conn = GatewayConnection("g", "t", "e", 1)
    conn.hello(0.0)
    with pytest.raises(ProtocolError, match="not offered"):
        conn.receive(encode(Welcome(1, [], 5.0, 1 << 20, 1000, "zlib")), 0.0)


# --- /ws/live: permessage-deflate (docs/live-protocol.md, "Compression") ---------------


async def serve_live(nursery: trio.Nursery, **config: Any) -> tuple[LiveFanout, int]:
    fanout = LiveFanout(LiveConfig(**config), metrics=Metrics())
    http = HttpServer()
    fanout.install(http)
    listeners = await nursery.start(http.serve, "127.0.0.1", 0)
    await nursery.start(fanout.run)
    return fanout, listeners[0].socket.getsockname()[1]


def wafer_delta(i: int) -> dict[str, Any]:
    return {"dies": [[x, i, 1 + (x * i) % 4, 1 + (x * i) % 9, (x * i) % 4 == 0, x % 2]
                     for x in range(60)], "parts": 60 * (i + 1), "yield": 0.75}


async def live_client(port: int, deflate: bool) -> WsClient:
    client = await WsClient.connect(port, "/ws/live", subprotocols=[SUBPROTOCOL_CBOR],
                                    extensions=[PerMessageDeflate()] if deflate else None)
    await client.send(cbor2.dumps({"type": "subscribe", "id": 1, "topics": ["lot/#"]}))
    return client


async def read_until_offset(client: WsClient, offset: int) -> list[dict[str, Any]]:
    """Decoded messages up to the batch carrying ``offset`` of the wafer topic."""
    got: list[dict[str, Any]] = []
    with trio.fail_after(20):
        while True:
            msg = cbor2.loads(await client.recv())
            got.append(msg)
            items = msg.get("items", []) if msg["type"] == "batch" else []
            if any(item.get("offset", 0) >= offset for item in items):
                return got


async def test_live_frames_are_deflated_for_clients_that_offer_it_and_plain_for_others(
        ) -> None:
    async with trio.open_nursery() as nursery:
        fanout, port = await serve_live(nursery, compression="permessage-deflate",
                                        compression_min_bytes=256)
        fanout.publish("lot/L1/wafer/W1", wafer_delta(0))
        plain = await live_client(port, deflate=False)
        packed = [await live_client(port, deflate=True) for _ in range(3)]
        assert plain.extensions == []
        assert [str(c.extensions[0]).count("no_context_takeover") for c in packed] == [2] * 3
        await read_until_offset(plain, 1)
        for c in packed:
            await read_until_offset(c, 1)
        plain_before = plain.bytes_received
        packed_before = [c.bytes_received for c in packed]
        encodes = fanout.core.metrics.counter("live_encodes_total")
        frames_before = encodes.get(kind="frame")
        for i in range(1, 21):
            fanout.publish("lot/L1/wafer/W1", wafer_delta(i))
            await trio.sleep(0.06)  # about one delta per tick: one frame each
        seen = [await read_until_offset(c, 21) for c in (plain, *packed)]
        # every client decodes the same updates, compressed or not
        dies = [[d for m in msgs for item in m["items"] for x in item["data"]
                 for d in x["dies"]] for msgs in seen]
        assert dies[0] == dies[1] == dies[2] == dies[3] and len(dies[0]) == 20 * 60
        plain_bytes = plain.bytes_received - plain_before
        for c, before in zip(packed, packed_before, strict=True):
            assert c.bytes_received - before < 0.8 * plain_bytes, (c.bytes_received, plain_bytes)
        # one compressed frame per tick shared by all three (plus one plain): never per client
        ticks_with_frames = len([m for m in seen[0] if m["type"] == "batch"])
        assert encodes.get(kind="frame") - frames_before <= 2 * ticks_with_frames + 2
        nursery.cancel_scope.cancel()


async def test_live_compression_is_off_by_default_and_an_offer_is_then_declined() -> None:
    async with trio.open_nursery() as nursery:
        fanout, port = await serve_live(nursery)
        fanout.publish("lot/L1/wafer/W1", wafer_delta(0))
        client = await live_client(port, deflate=True)
        assert client.extensions == []
        msgs = await read_until_offset(client, 1)
        assert msgs[0]["type"] == "hello"
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("offer", [
    "permessage-deflate; server_max_window_bits=10",  # our shared frames need 15 bits
    "permessage-deflate; x-unknown-param",
    "x-webkit-deflate-frame",
])
async def test_offers_the_hub_cannot_honour_are_declined_and_the_client_gets_plain_frames(
        offer: str) -> None:
    async with trio.open_nursery() as nursery:
        fanout, port = await serve_live(nursery, compression="permessage-deflate",
                                        compression_min_bytes=0)
        fanout.publish("lot/L1/wafer/W1", wafer_delta(0))
        client = await WsClient.connect(port, "/ws/live", subprotocols=[SUBPROTOCOL_CBOR],
                                        extra_headers=[(b"sec-websocket-extensions",
                                                        offer.encode())])
        await client.send(cbor2.dumps({"type": "subscribe", "id": 1, "topics": ["lot/#"]}))
        # wsproto without the extension fails on any RSV1 frame: plain frames arrive whole
        assert (await read_until_offset(client, 1))[0]["type"] == "hello"
        nursery.cancel_scope.cancel()


def test_offer_parsing_follows_rfc_7692() -> None:
    assert accept_offer("permessage-deflate")
    assert accept_offer("permessage-deflate; client_max_window_bits")  # what browsers send
    assert accept_offer("x-webkit-deflate-frame, permessage-deflate; server_max_window_bits=15")
    assert accept_offer("permessage-deflate; server_max_window_bits=9, permessage-deflate")
    assert not accept_offer("permessage-deflate; server_max_window_bits=9")
    assert not accept_offer("permessage-deflate; client_max_window_bits=99")
    assert not accept_offer("")


async def test_a_compressed_client_message_that_inflates_past_the_limit_is_closed(
        ) -> None:
    async with trio.open_nursery() as nursery:
        fanout, port = await serve_live(nursery, compression="permessage-deflate")
        client = await live_client(port, deflate=True)
        # 4 MiB of zeros deflates to ~4 KiB (read whole, so the close frame is not lost
        # to a reset): it would inflate to 16 times the 256 KiB client message limit
        await client.send(b"\0" * (4 << 20))
        with trio.fail_after(10):
            with pytest.raises(Closed) as closed:
                while True:
                    await client.recv()
        # 1009, as docs/live-protocol.md says: the hub's close frame is never cut off by
        # the fan-out's sender, nor lost to a reset (it was 1006 every time before: the
        # close frame's write was cancelled)
        assert closed.value.code == 1009, closed.value
        # the hub serves the next client
        fanout.publish("lot/L1/wafer/W1", wafer_delta(0))
        other = await live_client(port, deflate=True)
        assert (await read_until_offset(other, 1))[0]["type"] == "hello"
        nursery.cancel_scope.cancel()


def test_v2_columnar_bodies_go_compressed_above_the_minimum_and_plain_below_it() -> None:
    """Protocol v2 (columnar bodies) with zlib negotiated, sans-IO: a body above the
    minimum size travels compressed and the hub decodes exactly the records sent; one
    below it goes plain.  Every end's default is off, with a 1 KiB minimum."""
    import dataclasses

    from edgegw.gateway import GatewayConfig
    from edgegw.hub import HubConfig
    from edgegw.protocol import HubConnection, IntervalSet, decode_frame, encode_columns

    uplink = next(f for f in dataclasses.fields(GatewayConfig) if f.name == "uplink")
    defaults = uplink.default_factory()  # type: ignore[misc]
    assert (defaults.compression, defaults.compression_min_bytes) == ("off", 1024)
    assert HubConfig().hub.compression == "off"
    assert (LiveConfig().compression, LiveConfig().compression_min_bytes) == ("off", 1024)

    gw = GatewayConnection("ate-01", "s3cret", "e", 1, compression=("zlib",),
                           compression_min_bytes=1024)
    hub = HubConnection(compression=("zlib",))
    hub.receive(gw.hello(0.0), 0.0)
    gw.receive(hub.accept(IntervalSet(), 0.0), 0.0)
    assert gw.version == 3 and hub.version == 3
    records = [SensorReading("oven", float(i), "temp", 20.0 + i % 7) for i in range(500)]
    big, small = encode_columns(1, records), encode_columns(501, records[:2])
    assert len(small) < 1024 <= len(big)
    packed, plain = gw.data(1, big, 0.0), gw.data(2, small, 0.0)
    assert cbor2.loads(packed)[4] == "zlib" and len(cbor2.loads(packed)[3]) < len(big) / 3
    assert len(cbor2.loads(plain)) == 4
    for message, first, sent in ((packed, 1, records), (plain, 501, records[:2])):
        (data,), _ = hub.receive(message, 0.0)
        assert decode_frame(data.body, 10_000) == (first, sent)


def test_live_frames_below_the_minimum_go_plain_even_to_compressing_clients() -> None:
    from edgegw.web import Deflater, prepare_message

    deflater = Deflater(1, 1024)
    small, big = b"x" * 1023, bytes(range(256)) * 8
    assert deflater.prepare(small) == prepare_message(small)  # RSV1 clear: not compressed
    packed = deflater.prepare(big)
    assert packed[0] & 0x40 and len(packed) < len(prepare_message(big)) / 4
