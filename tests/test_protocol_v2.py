"""Protocol v2 (columnar frame bodies, docs/protocol.md sections 5.2 and 9): the codec
round-trips every record type exactly, malformed bodies are rejected (the frame, not the
connection) and counted, v1 and v2 peers interoperate both ways over real sockets, and
frames spooled or stored in the v1 layout still replay."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import cbor2
import pytest
import trio
from hubtools import gateway_config, hub_config
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from ports import free_port
from trio_websocket import open_websocket_url

from edgegw.gateway import Gateway
from edgegw.hub import Ingest
from edgegw.hub.store import unpack_body
from edgegw.protocol import (
    Ack,
    CloseCode,
    FrameError,
    GatewayConnection,
    ProtocolError,
    Reject,
    check_frame,
    decode_body,
    decode_frame,
    encode_body,
    encode_columns,
)
from edgegw.records import (
    RECORD_TYPES,
    GatewayEvent,
    LotStart,
    MultiPinResult,
    ParametricResult,
    PartResult,
    RawRecord,
    Record,
    SensorReading,
    from_wire,
)


def key(records: list[Any]) -> list[tuple[str, bytes]]:
    """Records compared exactly: NaN equals NaN, but -0.0 is not 0.0, nor 1 True or 1.0."""
    return [(type(r).__name__, cbor2.dumps(tuple(r))) for r in records]


# --- the codec, property-tested ---------------------------------------------------------

ODD = st.one_of(
    st.sampled_from([None, 0, 1, True, False, "", "LOT1", 0.0, -0.0, 1.0, math.nan,
                     math.inf, 65535, -32768]),  # repeats, so columns often fold to one value
    st.integers(min_value=-(2**80), max_value=2**80),  # big ints: CBOR bignums
    st.floats(),  # NaN, infinities, subnormals
    st.text(max_size=6),  # unicode, surrogates excluded by hypothesis' default alphabet
    st.dictionaries(st.text(max_size=4), st.one_of(st.none(), st.integers(), st.floats(),
                                                   st.text(max_size=4)), max_size=3),
    st.lists(st.floats(), max_size=3),
)


@st.composite
def records(draw: st.DrawFn) -> Record:
    cls = draw(st.sampled_from(RECORD_TYPES))
    n_required = len(cls._fields) - len(cls._field_defaults)
    n = draw(st.integers(n_required, len(cls._fields)))
    source = draw(st.sampled_from(["tester", "sensors", "プローバ"]))
    ts = draw(st.one_of(st.floats(), st.just(1.7e9)))
    return cls(source, ts, *(draw(ODD) for _ in range(n - 2)))


@st.composite
def frames(draw: st.DrawFn) -> list[Record]:
    """A frame: random records, or runs of one kind that share values (folded columns)."""
    if draw(st.booleans()):
        return draw(st.lists(records(), min_size=1, max_size=40))
    base = draw(records())
    n = draw(st.integers(1, 30))
    fields = list(base)
    varying = draw(st.sets(st.integers(0, len(fields) - 1), max_size=3))
    out = []
    for _ in range(n):
        row = [draw(ODD) if j in varying and j > 1 else v for j, v in enumerate(fields)]
        out.append(type(base)(*row))
    return out


#: examples per round-trip property (400 and 200 took 10 s and 2 s of the suite);
#: EDGEGW_FUZZ_EXAMPLES=2000 for a longer run (README, "Longer runs")
EXAMPLES = int(os.environ.get("EDGEGW_FUZZ_EXAMPLES", "150"))


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(frames(), st.integers(1, 2**63 - 10_000))  # ids up to 2^63 - 1 (protocol.md 2)
def test_the_columnar_codec_round_trips_every_record_type_exactly(
        recs: list[Record], first_rid: int) -> None:
    body = encode_columns(first_rid, recs)
    got_rid, got = decode_frame(body, 10_000)
    assert got_rid == first_rid
    assert key(got) == key(recs)
    # the hub's check: the count and the timestamps without building a record, then the
    # same records, built once
    rid, checked = check_frame(body, 10_000)
    assert rid == first_rid and checked.n == len(recs)
    assert (sorted(map(cbor2.dumps, checked.timestamps()))
            == sorted(cbor2.dumps(r.ts) for r in recs))
    assert key(checked.records()) == key(recs) and checked.records() is checked.records()
    # read without building them all: the runs give the order of each kind's rows, and a
    # kind's columns (a 1-tuple: every record has that value) are its rows' fields
    rows = {cls: iter(checked.rows(cls)) for cls, _ in checked.runs()}
    assert key([next(rows[cls]) for cls, n in checked.runs() for _ in range(n)]) == key(recs)
    for cls in rows:
        columns = checked.columns(cls)
        assert columns is not None and len(columns) == len(cls._fields)
        kind_rows = checked.rows(cls)
        for j, col in enumerate(columns):
            values = [r[j] for r in kind_rows]
            assert key([tuple(values)]) == key([tuple(col * len(values) if type(col) is tuple
                                                      else col)])
    for cls in RECORD_TYPES:
        if cls not in rows:  # a kind the frame has none of
            assert checked.columns(cls) is None and checked.rows(cls) == []
    # the same records as the v1 layout gives, and the v1 body a v1 peer is sent
    assert key(decode_frame(encode_body(first_rid, recs), 10_000)[1]) == key(recs)
    rid, sources, wire = decode_body(body, 10_000)  # the rows a v1 hub is sent
    assert rid == first_rid
    assert key([from_wire(w, sources) for w in wire]) == key(recs)


@settings(max_examples=max(100, EXAMPLES // 2), deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(frames())
def test_the_v3_codec_round_trips_every_record_type_exactly(recs: list[Record]) -> None:
    """The same frames with typed float columns (v3, tests/test_protocol_v3.py): records,
    timestamps and columns as the v2 body gives them."""
    body = encode_columns(3, recs, typed=True)
    assert key(decode_frame(body, 10_000)[1]) == key(recs)
    _, checked = check_frame(body, 10_000)
    assert (sorted(map(cbor2.dumps, checked.timestamps()))
            == sorted(cbor2.dumps(r.ts) for r in recs))
    _, plain = check_frame(encode_columns(3, recs), 10_000)
    for cls, _ in plain.runs():
        n = len(plain.rows(cls))

        def whole(col: Any, n: int = n) -> tuple[Any, ...]:  # one value (1-tuple): n times
            return tuple(col * n if type(col) is tuple else col)

        assert key(list(map(whole, checked.columns(cls) or []))) == key(
            list(map(whole, plain.columns(cls) or [])))
    assert key(checked.records()) == key(recs)


def test_every_record_type_in_one_frame_keeps_its_order_and_folds_repeated_values() -> None:
    recs: list[Record] = []
    for i in range(30):
        recs.append(ParametricResult("tester", 1.0 + i, "LOT1", 1, i % 4, str(i // 3), 100,
                                     "T", math.nan if i == 5 else 0.5, None, 2.0, "V", None))
        if i % 3 == 2:
            recs.append(PartResult("tester", 1.0 + i, "LOT1", "W1", 1, i % 4, str(i // 3),
                                   i, -i, 1, 1, True))
    recs += [LotStart("tester", 2.0, "LOT1", extra={"operator": "ß", "n": 2**70}),
             MultiPinResult("tester", 3.0, "LOT1", 1, 0, "1", 7, "m", [1.0, -0.0], None,
                            None, "A", False),
             GatewayEvent("gateway", 4.0, "info", "x", "m", {"k": None}),
             RawRecord("tester", 5.0, "stdf", "GDR", {"GEN_DATA": [1, "a", 2.5]}),
             SensorReading("sensors", 6.0, "temp", 21.5)]
    body = encode_columns(9, recs)
    assert key(decode_frame(body, 1000)[1]) == key(recs)
    item = cbor2.loads(body)
    assert len(item) == 4 and item[0] == 9
    ptr_table = next(cols for kind, cols in item[3] if kind == ParametricResult.KIND)
    assert ptr_table[2] == ["LOT1"] and ptr_table[0] == [0]  # lot id, source: sent once
    assert len(encode_columns(9, recs)) < len(encode_body(9, recs))


# --- malformed columnar bodies ---------------------------------------------------------

READING = [[0], [1.0, 2.0], ["c"], [1.5, 2.5]]  # two SensorReadings

MALFORMED: list[tuple[Any, str]] = [
    ([0, ["s"], [11, 2], [[11, READING]]], "first_rid"),
    ([1, ["s", 7], [11, 2], [[11, READING]]], "sources"),
    ([1, ["s"], [11], [[11, READING]]], "kind, count pairs"),
    ([1, ["s"], [11, 0], [[11, READING]]], "count must be an integer >= 1"),
    ([1, ["s"], ["x", 2], [[11, READING]]], "kind must be an integer"),
    ([1, ["s"], [11, 2], {"11": READING}], "tables"),
    ([1, ["s"], [11, 2], []], "without a table"),
    ([1, ["s"], [11, 2], [[99, READING]]], "unknown record kind 99"),
    ([1, ["s"], [11, 2], [[11, READING], [11, READING]]], "two tables of kind 11"),
    ([1, ["s"], [11, 2], [[11, READING], [12, READING]]], "no run uses"),
    ([1, ["s"], [11, 2], [[11, [[0], [1.0, 2.0], ["c"]]]]], "needs 4 columns"),
    ([1, ["s"], [11, 2], [[11, [[0], [1.0, 2.0, 3.0], ["c"], [1.5]]]]], "3 values for 2"),
    ([1, ["s"], [11, 2], [[11, [[0], 1.0, ["c"], [1.5]]]]], "must be an array"),
    ([1, ["s"], [11, 2], [[11, [[1], [1.0, 2.0], ["c"], [1.5]]]]], "source index"),
    ([1, ["s"], [11, 2], [[11, [[0, -1], [1.0, 2.0], ["c"], [1.5]]]]], "source index"),
    ([1, ["s"], [11, 2], [[11]]], "[kind, [column...]]"),
]


@pytest.mark.parametrize(("item", "why"), MALFORMED)
def test_a_malformed_columnar_body_is_a_frame_error_that_says_what_is_wrong(
        item: Any, why: str) -> None:
    # found by the check alone (the hub commits what passes it, before any record is built)
    with pytest.raises(FrameError) as exc:
        check_frame(cbor2.dumps(item), 1000)
    assert why in str(exc.value)


def test_a_columnar_frame_over_the_record_limit_closes_with_4006_and_v1_refuses_columns() -> None:
    body = cbor2.dumps([1, ["s"], [11, 600, 11, 600], [[11, [[0], [1.0], ["c"], [1.5]]]]])
    with pytest.raises(ProtocolError) as exc:
        decode_frame(body, 1000)
    assert exc.value.code == CloseCode.TOO_MANY_RECORDS
    with pytest.raises(FrameError, match="needs protocol v2"):
        decode_frame(cbor2.dumps([1, ["s"], [11, 2], [[11, READING]]]), 1000, columnar=False)


async def test_malformed_columnar_frames_are_rejected_and_counted_and_the_link_carries_on(
        tmp_path: Path) -> None:
    """Over a real socket: each bad frame gets REJECT with its reason and is counted; the
    connection stays up and the good frames around them apply."""
    hub = Ingest(hub_config(tmp_path / "hub"))
    async with trio.open_nursery() as nursery:
        port = await nursery.start(hub.run)
        conn = GatewayConnection("ate-01", "s3cret", "e1", 1, now=trio.current_time())
        async with open_websocket_url(f"ws://127.0.0.1:{port}/ws/gateway") as ws:
            await ws.send_message(conn.hello(trio.current_time()))
            conn.receive(await ws.get_message(), trio.current_time())
            assert conn.version == 3  # the newest both speak: typed columns allowed
            good = encode_columns(1, [SensorReading("s", 1.0, "c", 2.0)])
            after = encode_columns(2, [SensorReading("s", 1.0, "c", 2.0)])  # ids never reused
            bodies = [good] + [cbor2.dumps(item) for item, _ in MALFORMED] + [after]
            for seq, body in enumerate(bodies, 1):
                await ws.send_message(conn.data(seq, body, trio.current_time()))
            rejected: dict[int, str] = {}
            acked = 0
            with trio.fail_after(20):
                while acked < len(bodies):
                    events, _ = conn.receive(await ws.get_message(), trio.current_time())
                    for ev in events:
                        if isinstance(ev, Reject):
                            rejected[ev.seq] = ev.reason
                        elif isinstance(ev, Ack):
                            acked = ev.watermark
            assert sorted(rejected) == list(range(2, len(bodies)))
            for (_, why), seq in zip(MALFORMED, range(2, len(bodies)), strict=True):
                assert "bad columnar body" in rejected[seq] and why in rejected[seq]
        st = hub.stats()["gateways"]["ate-01"]
        assert st["frames_rejected"] == len(MALFORMED) and st["frames_applied"] == 2
        assert hub.metrics.counter("hub_frames_rejected_total").total() == len(MALFORMED)
        assert hub.metrics.counter("hub_protocol_errors_total").total() == 0
        nursery.cancel_scope.cancel()


# --- v1 <-> v2 over real sockets -------------------------------------------------------


def mixed_records(tag: float) -> list[Record]:
    return [
        LotStart("tester", tag, "LOT1", "P", extra={"ü": [1, None]}),
        *(ParametricResult("tester", tag + i, "LOT1", 1, i % 2, str(i // 4), 100 + i % 4,
                           "T", math.nan if i == 3 else i / 7, -1.0, None, "V", None)
          for i in range(40)),
        PartResult("tester", tag, "LOT1", "W1", 1, 0, "0", 3, -4, 1, None, None),
        SensorReading("sensors", tag, "temp", -0.0, "C"),
        GatewayEvent("gateway", tag, "info", "x", "m", {"big": 2**70}),
    ]


class Collect:
    """A hub consumer: every applied (or replayed) frame's records."""

    def __init__(self) -> None:
        self.records: list[Record] = []

    def on_records(self, gateway_id: str, first_rid: int, records: list[Record]) -> None:
        self.records.extend(records)

    async def until(self, n: int) -> None:
        """Consumers are fed after the ACK, from the hub's live-state queue: wait for it."""
        with trio.fail_after(20):
            while len(self.records) < n:
                await trio.sleep(0.01)

    def on_gateway(self, gateway_id: str, connected: bool, now: float) -> None:
        pass


class CollectColumns(Collect):
    """A consumer that reads columns (as the live state does): a columnar frame comes to
    ``on_columns`` as the hub checked it, a v1 frame's records to ``on_records``."""

    def __init__(self) -> None:
        super().__init__()
        self.columnar_frames = 0

    def on_columns(self, gateway_id: str, first_rid: int, columns: Any) -> None:
        self.columnar_frames += 1
        self.records.extend(columns.records())


async def stored_layouts(hub: Ingest) -> list[int]:
    """The layout of each stored frame body: 3 for v1 rows, 4 for v2 columns, 5 for
    columns with typed float columns (v3)."""
    rows = await hub.store.query("SELECT codec, body FROM frames ORDER BY id")
    out = []
    for codec, body in rows:
        item = cbor2.loads(unpack_body(codec, body))
        typed = len(item) == 4 and any(isinstance(c, cbor2.CBORTag) and c.tag == 86
                                       for _, columns in item[3] for c in columns)
        out.append(5 if typed else len(item))
    return out


@pytest.mark.parametrize(("gateway_v", "hub_v", "layout"), [
    (3, 3, 5),  # both newest: columns, floats as typed arrays
    (2, 3, 4),  # a v2 gateway, a v3 hub: columns
    (3, 2, 4),  # a v3 gateway, a v2 hub: its typed float columns are sent as arrays
    (2, 2, 4),  # both v2: columns
    (1, 2, 3),  # an old gateway, a new hub: rows
    (2, 1, 3),  # a new gateway, an old-protocol hub: the gateway sends its columns as rows
    (3, 1, 3),
    (1, 3, 3),
    (1, 1, 3),
])
async def test_v1_v2_and_v3_peers_interoperate_both_ways_through_the_spool(
        tmp_path: Path, gateway_v: int, hub_v: int, layout: int) -> None:
    hub = Ingest(hub_config(tmp_path / "hub", max_protocol_version=hub_v))
    seen, columns = Collect(), CollectColumns()
    hub.add_consumer(seen)
    hub.add_consumer(columns)
    async with trio.open_nursery() as nursery:
        port = await nursery.start(hub.run)
        gw = Gateway(gateway_config(tmp_path / "gw", port, spool={},
                                    uplink={"max_protocol_version": gateway_v}))
        await nursery.start(gw.run)
        sent: list[Record] = []
        for i in range(5):
            recs = mixed_records(float(i))
            sent += recs
            await gw.sink.put(recs, source="tester")
        assert await gw.drain(20), "the hub did not acknowledge everything"
        await seen.until(len(sent))
        await columns.until(len(sent))
        assert key(seen.records) == key(sent)
        # the same records whichever way a consumer reads them; columns for columnar frames only
        assert key(columns.records) == key(sent)
        assert (columns.columnar_frames > 0) == (layout >= 4)
        assert set(await stored_layouts(hub)) == {layout}
        nursery.cancel_scope.cancel()


async def test_frames_a_v3_gateway_spooled_with_typed_columns_reach_a_v2_hub_as_arrays(
        tmp_path: Path) -> None:
    """A v3 gateway that has not met its hub yet spools typed float columns (v3 is what
    it offers); the hub, when it comes, speaks v2: every frame reaches it as v2 columns
    (no typed array on a v2 connection, none rejected), the records exact -- NaN aside,
    whose payload a v2 body does not carry."""
    port = free_port()  # no hub yet: everything stays in the spool
    cfg = gateway_config(tmp_path / "gw", port, spool={})  # offers [1, 2, 3]
    before = [r for i in range(3) for r in mixed_records(float(i))]
    async with trio.open_nursery() as nursery:
        gw = Gateway(cfg)
        await nursery.start(gw.run)
        await gw.sink.put(before, source="tester")
        await gw.flush()
        assert gw.store.next_seq > 1
        nursery.cancel_scope.cancel()

    hub = Ingest(hub_config(tmp_path / "hub", port=port, max_protocol_version=2))
    seen = Collect()
    hub.add_consumer(seen)
    async with trio.open_nursery() as nursery:
        await nursery.start(hub.run)
        gw = Gateway(cfg)
        await nursery.start(gw.run)
        assert await gw.drain(20), "the hub did not acknowledge everything"
        await seen.until(len(before))
        assert key(seen.records) == key(before)
        assert set(await stored_layouts(hub)) == {4}
        assert hub.stats()["gateways"]["ate-01"]["frames_rejected"] == 0
        nursery.cancel_scope.cancel()


async def test_frames_spooled_as_v1_rows_replay_to_a_v2_hub_and_the_hub_replays_both(
        tmp_path: Path) -> None:
    """A gateway upgraded with frames still in its spool from before (v1 rows): they go to
    the v2 hub as they are, beside the new columnar frames; a hub restarted over frames of
    both layouts feeds them all to its consumers again."""
    port = free_port()  # no hub yet: everything stays in the spool
    old = gateway_config(tmp_path / "gw", port, spool={}, uplink={"max_protocol_version": 1})
    before = [r for i in range(3) for r in mixed_records(float(i))]
    async with trio.open_nursery() as nursery:
        gw = Gateway(old)
        await nursery.start(gw.run)
        await gw.sink.put(before, source="tester")
        await gw.flush()
        assert gw.store.next_seq > 1
        nursery.cancel_scope.cancel()
    spool = tmp_path / "gw" / "spool"
    assert any(spool.iterdir())

    hub_dir = tmp_path / "hub"
    after = [r for i in range(3, 5) for r in mixed_records(float(i))]
    hub = Ingest(hub_config(hub_dir, port=port))
    seen = Collect()
    hub.add_consumer(seen)
    async with trio.open_nursery() as nursery:
        await nursery.start(hub.run)
        gw = Gateway(gateway_config(tmp_path / "gw", port, spool={}))  # v3 now
        await nursery.start(gw.run)
        await gw.sink.put(after, source="tester")
        assert await gw.drain(20), "the hub did not acknowledge everything"
        await seen.until(len(before + after))
        # each record once; across frames the order is the hub's commit order, which puts
        # frames younger than the uplink's live window before the older backlog
        assert sorted(key(seen.records)) == sorted(key(before + after))
        layouts = await stored_layouts(hub)
        assert 3 in layouts and 5 in layouts, layouts  # rows and typed columns
        nursery.cancel_scope.cancel()

    hub = Ingest(hub_config(hub_dir, port=0))
    replayed = Collect()
    hub.add_consumer(replayed)
    async with trio.open_nursery() as nursery:
        await nursery.start(hub.run)
        assert key(replayed.records) == key(seen.records)  # the replay keeps commit order
        nursery.cancel_scope.cancel()
