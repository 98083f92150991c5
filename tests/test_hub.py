"""The hub over real loopback sockets: handshake outcomes, dedup, limits, HTTP endpoints."""

from __future__ import annotations

import time
import tracemalloc
from pathlib import Path
from typing import Any

import cbor2
import pytest
import trio
import trio.testing
from hubtools import gateway_config, http_get, hub_config, start_hub
from ports import free_port
from trio_websocket import ConnectionClosed, open_websocket_url
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, BytesMessage, CloseConnection, Request

from edgegw.gateway import Gateway
from edgegw.hub import Ingest
from edgegw.hub.store import unpack_body
from edgegw.protocol import (
    Ack,
    CloseCode,
    GatewayConnection,
    Refuse,
    Welcome,
    decode,
    decode_body,
    encode_body,
    encode_columns,
)
from edgegw.records import ParametricResult, PartResult, SensorReading
from edgegw.store import MemoryFrameStore


async def handshake(port: int, gw_id: str = "ate-01", token: str = "s3cret",
                    epoch: str = "e1", next_seq: int = 1):
    conn = GatewayConnection(gw_id, token, epoch, next_seq, now=trio.current_time())
    ws_cm = open_websocket_url(f"ws://127.0.0.1:{port}/ws/gateway", message_queue_size=16)
    ws = await ws_cm.__aenter__()
    await ws.send_message(conn.hello(trio.current_time()))
    events, _ = conn.receive(await ws.get_message(), trio.current_time())
    return ws_cm, ws, conn, events[0]


def body(first_rid: int, n: int) -> bytes:
    return encode_body(first_rid, [SensorReading("s", 1.0, "c", float(i)) for i in range(n)])


async def test_a_wrong_token_is_refused_with_its_reason_and_counted(tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        _hub, port = await start_hub(nursery, hub_config(tmp_path))
        ws_cm, ws, _, event = await handshake(port, token="nope")
        assert event == Refuse(CloseCode.UNAUTHORIZED, "wrong token for gateway 'ate-01'")
        try:
            await ws.get_message()
        except ConnectionClosed as exc:
            assert exc.reason.code == CloseCode.UNAUTHORIZED
        await ws_cm.__aexit__(None, None, None)
        _, stats = await http_get(port, "/api/stats")
        assert stats["gateways"]["ate-01"]["refused"] == 1
        nursery.cancel_scope.cancel()


async def test_unknown_gateway_and_unsupported_version_are_refused(tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        _, port = await start_hub(nursery, hub_config(tmp_path))
        ws_cm, _, _, event = await handshake(port, gw_id="stranger")
        assert event.code == CloseCode.UNAUTHORIZED and "unknown gateway" in event.reason
        await ws_cm.__aexit__(None, None, None)
        # a hello offering only versions this hub does not speak
        async with open_websocket_url(f"ws://127.0.0.1:{port}/ws/gateway") as ws:
            await ws.send_message(cbor2.dumps([1, {
                "versions": [4], "gateway": "ate-01", "token": "s3cret", "epoch": "e",
                "next_seq": 1, "heartbeat": 5.0}]))
            reply = decode(await ws.get_message())
            assert reply.code == CloseCode.UNSUPPORTED_VERSION
        nursery.cancel_scope.cancel()


async def refuse(port: int, gw_id: str, token: str = "nope") -> None:
    ws_cm, _, _, event = await handshake(port, gw_id=gw_id, token=token)
    assert event.code == CloseCode.UNAUTHORIZED
    await ws_cm.__aexit__(None, None, None)


async def test_a_scan_of_100000_refused_ids_keeps_the_refusal_counts_bounded_and_the_total_exact(
        tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        hub, port = await start_hub(nursery, hub_config(tmp_path))
        for _ in range(3):
            await refuse(port, "ate-01")  # a configured gateway with a wrong token
        for _ in range(2):
            await refuse(port, "ate-O1")  # a typo in a gateway's id, retrying
        # A scan: 100,000 distinct ids, counted as each refused HELLO is (so many real
        # handshakes would take minutes, and the per-address limit answers them 429).
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            for i in range(100_000):
                hub.refused.add(f"scan-{i:06d}")
            grown = tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()
        assert grown < 100_000, f"{grown} bytes kept for 100,000 refused ids"
        await refuse(port, "ate-02")  # refused after the scan: the newest is listed

        _, stats = await http_get(port, "/api/stats")
        gateways = stats["gateways"]
        limit = hub.refused.limit
        assert len(gateways) <= limit + 1  # the ids not configured, and ate-01
        assert gateways["ate-01"]["refused"] == 3  # configured: always counted exactly
        assert gateways["ate-O1"]["refused"] == 2  # retried: not pushed out by the scan
        assert gateways["ate-02"]["refused"] == 1
        assert sum(1 for gw in gateways if gw.startswith("scan-")) == limit - 2
        total = 3 + 2 + 100_000 + 1
        refused = stats["refused"]
        assert refused == {"total": total, "ids": len(gateways),
                           "unlisted": total - sum(g["refused"] for g in gateways.values())}
        assert refused["unlisted"] == 100_000 - (limit - 2)
        assert hub.metrics.counter("hub_refused_total").total() == 3 + 2 + 1
        nursery.cancel_scope.cancel()


async def test_refused_hellos_are_logged_once_per_address_id_and_reason_then_summed_up(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A gateway retrying forever with a wrong token must not fill the log: the first
    refusal of each (address, gateway id, reason) is logged, then at most one summary a
    minute; the metric counts every refusal."""
    async with trio.open_nursery() as nursery:
        hub, port = await start_hub(nursery, hub_config(tmp_path, gateway_failures_burst=1000))
        for _ in range(40):
            await refuse(port, "ate-01")  # a wrong token, over and over
        for _ in range(5):
            await refuse(port, "stranger")  # an id the hub does not know
        for _ in range(5):  # a version this hub does not speak
            async with open_websocket_url(f"ws://127.0.0.1:{port}/ws/gateway") as ws:
                await ws.send_message(cbor2.dumps([1, {
                    "versions": [99], "gateway": "ate-01", "token": "s3cret", "epoch": "e",
                    "next_seq": 1, "heartbeat": 5.0}]))
                assert decode(await ws.get_message()).code == CloseCode.UNSUPPORTED_VERSION
        refused = hub.metrics.counter("hub_refused_total")
        assert refused.get(reason="unauthorized") == 45
        assert refused.get(reason="unsupported_version") == 5
        lines = [r.getMessage() for r in caplog.records
                 if r.getMessage().startswith("refused ")]
        assert len(lines) == 3, lines
        assert lines[0].startswith("refused gateway 'ate-01' from 127.0.0.1:")
        assert "wrong token for gateway 'ate-01'" in lines[0]
        assert "unknown gateway id 'stranger'" in lines[1]
        assert "unsupported protocol version(s) [99]" in lines[2]
        # the minute is up (made so here): the next refusal of the wrong token sums up
        # the ones not logged since its first line, this one included
        hub.refusal_log.interval_s = 0.0
        caplog.clear()
        await refuse(port, "ate-01")
        [summary] = [r for r in caplog.records if r.getMessage().startswith("refused ")]
        assert summary.levelname == "WARNING"
        assert summary.getMessage().startswith(
            "refused gateway 'ate-01' from 127.0.0.1 40 times in the last ")
        assert refused.get(reason="unauthorized") == 46
        nursery.cancel_scope.cancel()


async def test_a_gateway_that_stops_retrying_still_gets_its_summary_line(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The refusals after a key's first line are summed up when the interval passes, even
    if no later refusal comes to carry the line (before: never logged)."""
    async with trio.open_nursery() as nursery:
        hub, port = await start_hub(nursery, hub_config(tmp_path, gateway_failures_burst=1000))
        hub.refusal_log.interval_s = 0.5
        for _ in range(4):
            await refuse(port, "ate-01")  # a wrong token, then the gateway gives up

        def summaries() -> list[str]:
            return [r.getMessage() for r in caplog.records
                    if r.getMessage().startswith("refused gateway 'ate-01' from 127.0.0.1 ")]

        with trio.fail_after(10):
            while not summaries():
                await trio.sleep(0.05)
        [summary] = summaries()
        assert " 3 times in the last " in summary and "wrong token for gateway 'ate-01'" in summary
        await trio.sleep(1.2)  # nothing more to say: no second line
        assert len(summaries()) == 1
        nursery.cancel_scope.cancel()


def test_refusal_summaries_come_due_with_no_new_refusal(tmp_path: Path) -> None:
    log = refusal_log(tmp_path, interval_s=60)
    key = ("10.0.0.7", "ate-01", "unauthorized")
    assert line(log, key, 0.0) == ("first",)
    assert line(log, key, 1.0) is None and line(log, key, 2.0) is None
    assert log.due(59.0) == []
    [(due_key, due, _, _)] = log.due(60.0)
    assert due_key == key and (due.first, due.count, due.seconds) == (False, 2, 60.0)
    assert log.due(200.0) == []  # said once
    assert line(log, key, 201.0) == ("summary", 1, 141.0)  # a later refusal, as before
    assert log.due(400.0) == []


def refusal_log(tmp: Path, **limits: float) -> Any:
    """The hub's refused-HELLO log limiter (``Ingest.refusal_log``), sans-IO, with
    ``limits`` (``interval_s``, ``max_keys``, ``new_per_interval``) set."""
    log = Ingest(hub_config(tmp)).refusal_log
    for name, value in limits.items():
        setattr(log, name, value)
    return log


def line(log: Any, key: tuple[str, str, str], now: float) -> tuple[Any, ...] | None:
    """What is logged for one refusal of ``key``: ("first",) or ("summary", count,
    seconds), None for nothing."""
    out = log.note(key, now)
    return None if out is None else ("first",) if out.first else (
        "summary", out.count, out.seconds)


KEY = ("10.0.0.7", "ate-01", "unauthorized")


def test_a_refusal_is_logged_first_then_summed_up_once_per_interval(tmp_path: Path) -> None:
    log = refusal_log(tmp_path, interval_s=60.0)
    assert line(log, KEY, 0.0) == ("first",)
    assert [line(log, KEY, t) for t in range(1, 60)] == [None] * 59  # within the minute
    # the minute is up: the refusals since the first line, this one included
    assert line(log, KEY, 60.0) == ("summary", 60, 60.0)
    assert line(log, KEY, 61.0) is None
    assert line(log, KEY, 200.0) == ("summary", 2, 140.0)
    # another address, gateway id or reason has a first line of its own
    others = [("10.0.0.8", "ate-01", "unauthorized"), ("10.0.0.7", "ate-02", "unauthorized"),
              ("10.0.0.7", "ate-01", "unsupported_version")]
    assert [line(log, k, 201.0) for k in others] == [("first",)] * 3


def test_refusals_of_new_keys_over_the_budget_are_summed_up_together(tmp_path: Path) -> None:
    log = refusal_log(tmp_path, interval_s=60.0, new_per_interval=3)
    scan = [("10.0.0.9", f"scan-{i}", "unauthorized") for i in range(10)]
    assert [line(log, k, 1.0) for k in scan] == [("first",)] * 3 + [None] * 7
    assert log.others_due(1.0) == 7  # one line about them
    assert line(log, ("10.0.0.9", "more", "unauthorized"), 2.0) is None
    assert log.others_due(2.0) == 0  # at most one line per interval
    # the next interval: new keys get first lines again
    assert line(log, ("10.0.0.9", "later", "unauthorized"), 61.0) == ("first",)
    assert log.others_due(61.0) == 1


def test_the_refusal_log_remembers_a_bounded_number_of_keys(tmp_path: Path) -> None:
    log = refusal_log(tmp_path, max_keys=50, new_per_interval=10**9)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(100_000):
            log.note(("10.0.0.9", f"scan-{i:06d}", "unauthorized"), float(i))
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert grown < 100_000, f"{grown} bytes kept for 100,000 refused keys"
    # the recently refused are remembered (within its minute: nothing to log), the least
    # recently refused are forgotten: such a key is logged as a first one again
    assert line(log, ("10.0.0.9", "scan-099999", "unauthorized"), 100_000.0) is None
    assert line(log, ("10.0.0.9", "scan-000000", "unauthorized"), 100_000.0) == ("first",)


async def test_a_second_connection_of_a_gateway_replaces_the_first_which_is_closed_4008(
        tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        hub, port = await start_hub(nursery, hub_config(tmp_path))
        first = await handshake(port)
        second = await handshake(port)
        assert isinstance(second[3], Welcome), "the newest connection is let in at once"
        try:
            await first[1].get_message()
            raise AssertionError("the replaced connection should have been closed")
        except ConnectionClosed as exc:
            assert exc.reason.code == CloseCode.REPLACED
        st = hub.stats()["gateways"]["ate-01"]
        assert st["connected"] and st["refused"] == 0
        assert hub.metrics.counter("hub_connections_replaced_total").total() == 1
        # the new connection works
        await second[1].send_message(second[2].data(1, body(1, 3), trio.current_time()))
        assert decode(await second[1].get_message()) == Ack(1, [])
        await second[0].__aexit__(None, None, None)
        await first[0].__aexit__(None, None, None)
        nursery.cancel_scope.cancel()


async def test_frames_are_applied_acked_and_duplicates_dropped_across_reconnects(
        tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        _hub, port = await start_hub(nursery, hub_config(tmp_path))
        ws_cm, ws, conn, welcome = await handshake(port)
        assert welcome.applied == []
        await ws.send_message(conn.data(1, body(1, 10), trio.current_time()))
        await ws.send_message(conn.data(2, body(11, 5), trio.current_time()))
        acks = [decode(await ws.get_message()) for _ in range(1)]
        while acks[-1] != Ack(2, []):
            acks.append(decode(await ws.get_message()))
        await ws_cm.__aexit__(None, None, None)
        await trio.sleep(0.05)
        # the gateway reconnects without having seen the acks: it resends frame 2
        ws_cm, ws, conn, welcome = await handshake(port, next_seq=2)
        assert welcome.applied == [(1, 2)]
        await ws.send_message(conn.data(2, body(11, 5), trio.current_time()))
        assert decode(await ws.get_message()) == Ack(2, [])
        await ws_cm.__aexit__(None, None, None)
        _, stats = await http_get(port, "/api/stats")
        gw = stats["gateways"]["ate-01"]
        assert gw["frames_applied"] == 2 and gw["records_applied"] == 15
        assert gw["duplicates_dropped"] == 1 and gw["last_seq"] == 2
        nursery.cancel_scope.cancel()


async def test_an_oversized_frame_closes_the_link_with_1009(tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        _, port = await start_hub(nursery, hub_config(tmp_path, max_frame_bytes=4096))
        ws_cm, ws, conn, _ = await handshake(port)
        await ws.send_message(conn.data(1, b"\x00" * 20000, trio.current_time()))
        try:
            await ws.get_message()
            raise AssertionError("the hub should have closed the connection")
        except ConnectionClosed as exc:
            assert exc.reason.code == CloseCode.TOO_BIG
        await ws_cm.__aexit__(None, None, None)
        nursery.cancel_scope.cancel()


async def test_an_invalid_frame_is_rejected_and_the_frames_behind_it_still_apply(
        tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        hub, port = await start_hub(nursery, hub_config(tmp_path))
        ws_cm, ws, conn, _ = await handshake(port)
        await ws.send_message(conn.data(1, cbor2.dumps([1, ["s"], [[999, 0, 1.0]]]),
                                        trio.current_time()))
        await ws.send_message(conn.data(2, body(2, 3), trio.current_time()))
        seen = []
        while not seen or seen[-1] != Ack(2, []):
            seen.append(decode(await ws.get_message()))
        assert seen[0].seq == 1 and "unknown record kind 999" in seen[0].reason
        await ws_cm.__aexit__(None, None, None)
        st = hub.stats()["gateways"]["ate-01"]
        assert st["frames_rejected"] == 1 and st["records_applied"] == 3
        rows = await hub.store.query("SELECT seq, reason FROM rejected")
        assert rows[0][0] == 1
        nursery.cancel_scope.cancel()


async def test_a_record_whose_time_is_not_a_number_is_applied_without_an_internal_error(
        tmp_path: Path) -> None:
    """A record decodes with any value in its fields (the live state judges them): a ts of
    null or text once broke the applier's record-age histogram after the commit, closing
    the link with 1011 and counting an internal error (the long socket fuzz found it)."""
    async with trio.open_nursery() as nursery:
        hub, port = await start_hub(nursery, hub_config(tmp_path))
        ws_cm, ws, conn, _ = await handshake(port)
        bad = cbor2.dumps([1, ["s"], [[11, 0, None, "ch", 1.0], [11, 0, "soon", "ch", 2.0],
                                      [11, 0, 2 ** 1100, "ch", 3.0], [11, 0, 5.0, "ch", 4.0]]])
        await ws.send_message(conn.data(1, bad, trio.current_time()))
        # (ids after frame 1's four records: never reused, docs/protocol.md section 3)
        await ws.send_message(conn.data(2, body(5, 3), trio.current_time()))
        seen = []
        with trio.fail_after(10):
            while not seen or seen[-1] != Ack(2, []):
                seen.append(decode(await ws.get_message()))
        await ws_cm.__aexit__(None, None, None)
        assert hub.metrics.as_dict()["internal_errors_total"] == {}
        assert hub.stats()["gateways"]["ate-01"]["records_applied"] == 7
        assert hub.metrics.histogram("hub_record_age_seconds").count() == 4
        nursery.cancel_scope.cancel()


async def test_each_record_of_a_columnar_frame_counts_once_in_the_bucket_of_its_age(
        tmp_path: Path) -> None:
    """The record-age histogram is fed from a frame's ts columns, no record built: every
    record counts once, in the bucket of its age (the hub's wall clock at the commit minus
    its ts), for each kind's table, with stamps that rise and repeat as a tester's do."""
    ages = [5_000.0, 5_000.0, 1_000.0, 100.0, 100.0, 100.0, 20.0, 20.0]  # oldest first
    now = time.time()
    records: list[Any] = []
    for i, age in enumerate(ages):
        records.append(ParametricResult("s", now - age, "L", 1, 0, str(i), 1, "T", 1.0, 0.0,
                                        2.0, "V", True))
        if i % 2:
            records.append(PartResult("s", now - age, "L", "W", 1, 0, str(i), 0, 0, 1, 1,
                                      True, False))
    async with trio.open_nursery() as nursery:
        hub, port = await start_hub(nursery, hub_config(tmp_path))
        ws_cm, ws, conn, welcome = await handshake(port)
        frame = encode_columns(1, records, typed=welcome.version >= 3)
        await ws.send_message(conn.data(1, frame, trio.current_time()))
        with trio.fail_after(10):
            while decode(await ws.get_message()) != Ack(1, []):
                pass
        await ws_cm.__aexit__(None, None, None)
        histogram = hub.metrics.histogram("hub_record_age_seconds")
        counts, (total,) = histogram.series[()]
        by_bound = {bound: n for bound, n in zip([*histogram.buckets, "+Inf"], counts,
                                                 strict=True) if n}
        # ParametricResults 2 + 1 + 3 + 2, PartResults of the odd ones 1 + 0 + 2 + 1
        assert by_bound == {30.0: 3, 300.0: 5, 3600.0: 1, "+Inf": 3}
        assert total >= sum(ages) + sum(ages[1::2])
        nursery.cancel_scope.cancel()


async def test_ids_past_what_a_64_bit_column_holds_are_refused_not_an_internal_error(
        tmp_path: Path) -> None:
    """A first_rid past 2^63 - 1 once reached the SQLite insert (OverflowError, 1011, and
    the frame sent again for ever); it is an invalid frame now.  A seq past it is a
    malformed message (4004)."""
    async with trio.open_nursery() as nursery:
        hub, port = await start_hub(nursery, hub_config(tmp_path))
        ws_cm, ws, conn, _ = await handshake(port)
        await ws.send_message(conn.data(1, cbor2.dumps([2 ** 70, ["s"], [[11, 0, 1.0, "c", 1.0]]]),
                                        trio.current_time()))
        await ws.send_message(conn.data(2, body(2, 3), trio.current_time()))
        seen = []
        with trio.fail_after(10):
            while not seen or seen[-1] != Ack(2, []):
                seen.append(decode(await ws.get_message()))
        assert seen[0].seq == 1 and "pass 2^63 - 1" in seen[0].reason
        await ws.send_message(cbor2.dumps([4, 2 ** 63, 1.0, body(9, 1)]))
        with pytest.raises(ConnectionClosed) as closed:
            await ws.get_message()
        assert closed.value.reason.code == CloseCode.PROTOCOL_ERROR
        await ws_cm.__aexit__(None, None, None)
        assert hub.metrics.as_dict()["internal_errors_total"] == {}
        nursery.cancel_scope.cancel()


async def test_health_stats_metrics_and_errors_over_plain_http(tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        hub, port = await start_hub(nursery, hub_config(tmp_path))
        status, health = await http_get(port, "/healthz")
        assert status == 200 and health["status"] == "ok"
        status, _ = await http_get(port, "/nope")
        assert status == 404
        status, text = await http_get(port, "/metrics")
        assert status == 200 and b"edgegw_hub_frames_applied_total" in text
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        await stream.send_all(b"THIS IS NOT HTTP\r\n\r\n")
        assert (await stream.receive_some(1000)).startswith(b"HTTP/1.1 400")
        await stream.aclose()
        assert hub.metrics.counter("hub_bad_http_requests_total").total() == 1
        nursery.cancel_scope.cancel()


async def test_a_silent_gateway_is_dropped_after_two_heartbeats(
        tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    """The hub's heartbeat, in virtual time, over an in-memory stream."""
    cfg = hub_config(tmp_path, heartbeat_s=3.0)
    from edgegw.hub import Ingest

    hub = Ingest(cfg)
    await hub.store.open()
    # its applied set read in now: the HELLO's claim would read it in a worker thread,
    # through which the autojump clock jumps by any amount
    await hub.store.claim("ate-01", "e")
    client_stream, server_stream = trio.testing.memory_stream_pair()
    client = WSConnection(ConnectionType.CLIENT)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(hub.http.handle_stream, server_stream)
        await client_stream.send_all(client.send(Request(host="x", target="/ws/gateway")))
        conn = GatewayConnection("ate-01", "s3cret", "e", 1, now=trio.current_time())
        events: list[object] = []

        async def pump() -> None:
            while True:
                data = await client_stream.receive_some(65536)
                if not data:
                    return
                client.receive_data(data)
                events.extend(client.events())

        nursery.start_soon(pump)
        while not any(isinstance(e, AcceptConnection) for e in events):
            await trio.sleep(0.01)
        await client_stream.send_all(client.send(BytesMessage(data=conn.hello(0))))
        start = trio.current_time()
        while not any(isinstance(e, CloseConnection) for e in events):
            await trio.sleep(0.1)  # silent: never answers the hub's pings
        close = next(e for e in events if isinstance(e, CloseConnection))
        assert close.code == CloseCode.HEARTBEAT_TIMEOUT
        assert 6.0 <= trio.current_time() - start <= 6.5
        nursery.cancel_scope.cancel()
    await hub.store.close()


async def test_a_gateway_delivers_everything_a_source_puts(tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        hub, port = await start_hub(nursery, hub_config(tmp_path / "hub"))
        gw = Gateway(gateway_config(tmp_path / "gw", port))
        await nursery.start(gw.run)
        for i in range(50):
            await gw.sink.put([SensorReading("embedded", float(i), "c", float(j))
                               for j in range(37)], source="embedded")
        assert await gw.drain(10), "the hub did not acknowledge everything"
        assert hub.stats()["gateways"]["ate-01"]["records_applied"] == 1850
        nursery.cancel_scope.cancel()


async def test_overflow_under_drop_oldest_is_counted_and_reported_to_the_hub(
        tmp_path: Path) -> None:
    port = free_port()  # the hub is not there yet
    cfg = gateway_config(tmp_path / "gw", port, queue={"max_frames": 5, "policy": "drop_oldest"},
                         batch={"max_records": 10, "max_delay_ms": 1000})
    async with trio.open_nursery() as nursery:
        gw = Gateway(cfg)
        await nursery.start(gw.run)
        for i in range(20):  # 20 frames into a queue of 5
            await gw.sink.put([SensorReading("s", float(i), "c", float(j)) for j in range(10)],
                              source="s")
        st = gw.store.stats()
        assert st["dropped_frames"] >= 15 and st["dropped_records"] >= 150
        assert gw.metrics.counter("gateway_records_dropped_total").total() == st["dropped_records"]
        hub, _ = await start_hub(nursery, hub_config(tmp_path / "hub", port=port))
        await gw.flush()
        with trio.fail_after(10):
            while gw.store.first_unacked < gw.store.next_seq:
                await trio.sleep(0.02)
        # the hub learns which frames will never come: those dropped before it was there
        # from the HELLO, one the flush's event pushes out meanwhile from a LOST (unless
        # it was sent before it was dropped: then it is applied, not lost); every frame
        # ends up applied or lost, and an event says why
        with trio.fail_after(10):
            while True:
                st = hub.stats()["gateways"]["ate-01"]
                if st["frames_applied"] + st["frames_lost"] == gw.store.next_seq - 1:
                    break
                await trio.sleep(0.02)
        assert 15 <= st["frames_lost"] <= gw.store.stats()["dropped_frames"]
        rows = await hub.store.query("SELECT codec, body FROM frames")
        events = [r for c, b in rows for r in decode_body(unpack_body(c, b), 1 << 30)[2]
                  if r[0] == 13]
        assert any(e[4] == "store_overflow" for e in events)
        nursery.cancel_scope.cancel()


async def test_an_overflow_event_that_fills_a_frame_by_itself_still_reaches_the_hub(
        tmp_path: Path) -> None:
    """With ``batch.max_records = 1`` the store_overflow event is a full batch on its own:
    it is stored like any other (it was once dropped on the floor), and what its own frame
    pushes out of the full store is counted at once and told by the next event."""
    port = free_port()  # the hub is not there yet
    cfg = gateway_config(tmp_path / "gw", port, batch={"max_records": 1, "max_delay_ms": 1000})
    async with trio.open_nursery() as nursery:
        gw = Gateway(cfg, store=MemoryFrameStore(2, "drop_oldest"))
        await nursery.start(gw.run)
        for i in range(3):  # the third frame drops the first, its event's frame the second
            await gw.sink.put([SensorReading("s", float(i), "c", 1.0)], source="s")
        st = gw.store.stats()
        assert (st["dropped_frames"], st["dropped_records"]) == (2, 2)
        assert gw.metrics.counter("gateway_records_dropped_total").total() == 2
        await gw.sink.put([SensorReading("s", 3.0, "c", 1.0)], source="s")  # drops 2 more
        hub, _ = await start_hub(nursery, hub_config(tmp_path / "hub", port=port))
        assert await gw.drain(10), "the hub did not acknowledge everything"
        rows = await hub.store.query("SELECT codec, body FROM frames")
        events = [r for (c, b) in rows for r in decode_body(unpack_body(c, b), 1 << 30)[2]
                  if r[0] == 13]
        overflow = [e for e in events if e[4] == "store_overflow"]
        # the store holds the last data frame and the newest event: it counts every drop
        # up to the frame before its own (1 by the data, 1 by the first event, 1 by data)
        assert [e[6] for e in overflow] == [{"dropped_frames": 3, "dropped_records": 3}]
        assert hub.stats()["gateways"]["ate-01"]["frames_lost"] == 4
        # seqs the HELLO gave up (dropped before any connection) are no state gone back
        assert gw.metrics.counter("uplink_state_rollbacks_total").total() == 0
        nursery.cancel_scope.cancel()


async def test_old_frames_are_pruned_but_their_resend_is_still_a_duplicate(
        tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        hub, port = await start_hub(nursery, hub_config(tmp_path, retain_frames_hours=1.0,
                                                        prune_interval_s=0.05))
        ws_cm, ws, conn, _ = await handshake(port)
        for seq in (1, 2, 3):
            await ws.send_message(conn.data(seq, body(seq * 10, 4), trio.current_time()))
        while decode(await ws.get_message()) != Ack(3, []):
            pass
        await ws_cm.__aexit__(None, None, None)
        # frames 1 and 2 were applied two hours ago
        await hub.store.query("UPDATE frames SET applied_at = applied_at - 7200 WHERE seq < 3")
        pruned = hub.metrics.counter("hub_frames_pruned_total")
        with trio.fail_after(5):
            # the rows go in the store's worker thread; the count follows when it returns
            while (await hub.store.query("SELECT seq FROM frames") != [(3,)]
                   or pruned.total() < 2):
                await trio.sleep(0.02)
        assert pruned.total() == 2
        # the gateway never saw the acks and resends frame 1: it is still known as applied
        ws_cm, ws, conn, welcome = await handshake(port, next_seq=1)
        assert welcome.applied == [(1, 3)]
        await ws.send_message(conn.data(1, body(10, 4), trio.current_time()))
        assert decode(await ws.get_message()) == Ack(3, [])
        await ws_cm.__aexit__(None, None, None)
        assert hub.stats()["gateways"]["ate-01"]["duplicates_dropped"] == 1
        nursery.cancel_scope.cancel()
