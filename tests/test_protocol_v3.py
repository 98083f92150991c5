"""Protocol v3 (typed float columns, docs/protocol.md sections 5.2 and 9): a column whose
every value is a float goes as an RFC 8746 typed array (tag 86, IEEE 754 binary64, little
endian); every bit of every float arrives (``-0.0``, infinities, NaN payloads); the
documented example is byte for byte what the encoder writes, and a decoder written from
the document alone (no edgegw) reads it; a v2 connection refuses typed columns and a v3
gateway's spooled bodies are converted for it.  Over real sockets: tests/test_protocol_v2.py
(every pair of versions through the spool) and tests/test_conformance.py (a hand-built v3
body against the hub)."""

from __future__ import annotations

import math
import struct
from typing import Any

import cbor2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgegw.protocol import (
    FrameError,
    check_frame,
    decode_frame,
    encode_columns,
    plain_floats,
)
from edgegw.records import ParametricResult, PartResult, Record, SensorReading


def bits(x: float) -> bytes:
    return struct.pack("<d", x)


def exact(records: list[Any]) -> list[tuple[Any, ...]]:
    """Records compared bit for bit: every float by its 8 bytes (NaN payloads, -0.0), every
    other value by its type and value."""
    return [(type(r).__name__, *((bits(v) if type(v) is float else (type(v), v)) for v in r))
            for r in records]


#: any 64 bits as a float: every NaN payload (quiet and signalling), both zeros,
#: infinities, subnormals
ANY_FLOAT = st.integers(0, 2**64 - 1).map(lambda b: struct.unpack("<d", b.to_bytes(8, "little"))[0])
SPECIAL = st.sampled_from([0.0, -0.0, math.inf, -math.inf, math.nan, 5e-324, 1.7e9])


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.one_of(ANY_FLOAT, SPECIAL), st.one_of(ANY_FLOAT, SPECIAL)),
                min_size=1, max_size=50),
       st.booleans())
def test_every_bit_of_every_float_round_trips_through_a_typed_column(
        values: list[tuple[float, float]], same_value: bool) -> None:
    # same_value: a column of one bit pattern travels as one value (8 bytes)
    recs = [SensorReading("s", ts, "ch", values[0][1] if same_value else v)
            for ts, v in values]
    body = encode_columns(7, recs, typed=True)
    table = cbor2.loads(body)[3][0][1]
    assert all(isinstance(c, cbor2.CBORTag) and c.tag == 86 for c in (table[1], table[3]))
    assert (len(table[3].value) == 8) == (len({bits(r.value) for r in recs}) == 1)
    rid, got = decode_frame(body, 1000)
    assert rid == 7 and exact(got) == exact(recs)
    # the hub's check reads the timestamps from the bytes, bit for bit
    _, checked = check_frame(body, 1000)
    assert [bits(t) for t in checked.timestamps()] == [bits(ts) for ts, _ in values]


def test_only_columns_of_floats_go_typed_and_mixed_columns_keep_every_type() -> None:
    # value: floats, an int and None; lo_limit: ints only; hi_limit: floats only
    recs = [ParametricResult("t", 1.5, "L", 1, 0, "1", 100, "T", v, 0, 2.0 + i, "V", True)
            for i, v in enumerate([1.0, 3, None, -0.0])]
    item = cbor2.loads(encode_columns(1, recs, typed=True))
    columns = item[3][0][1]
    assert isinstance(columns[1], cbor2.CBORTag) and columns[1].value == bits(1.5)  # ts
    assert columns[8] == [1.0, 3, None, -0.0] and columns[9] == [0]
    assert columns[10] == cbor2.CBORTag(86, b"".join(bits(2.0 + i) for i in range(4)))
    assert exact(decode_frame(encode_columns(1, recs, typed=True), 10)[1]) == exact(recs)


# --- the document's example, and a decoder written from it ----------------------------

#: docs/protocol.md section 5.2, "Typed float columns": the v2 example's three records
DOC_RECORDS: list[Record] = [
    ParametricResult("tester", 1764130000.5, "LOT1", 1, 0, "17", 100, "VDD", 1.25, 1.0, 2.0,
                     "V", True),
    ParametricResult("tester", 1764130000.5, "LOT1", 1, 0, "17", 101, "IDD", 0.5, None, 2.0,
                     "mA", True),
    PartResult("tester", 1764130000.75, "LOT1", "W01", 1, 0, "17", 3, 9, 1, 1, True, False,
               0, 120, 2),
]
DOC_BYTES = bytes.fromhex(
    "84 19 9c41 81 66 746573746572 84 06 02 05 01"
    " 82"
    " 82 06 8f"
    " 81 00"
    " d8 56 48 000020349f49da41"
    " 81 64 4c4f5431 81 01 81 00 81 62 3137"
    " 82 1864 1865"
    " 82 63 564444 63 494444"
    " d8 56 50 000000000000f43f 000000000000e03f"
    " 82 fb3ff0000000000000 f6"
    " d8 56 48 0000000000000040"
    " 82 61 56 62 6d41"
    " 81 f5 81 00 81 00"
    " 82 05 90"
    " 81 00 d8 56 48 000030349f49da41 81 64 4c4f5431 81 63 573031 81 01 81 00"
    " 81 62 3137 81 03 81 09 81 01 81 01 81 f5 81 f4 81 00 81 1878 81 02")


def test_the_documented_v3_example_is_byte_for_byte_what_the_encoder_writes() -> None:
    assert len(DOC_BYTES) == 169
    assert encode_columns(40001, DOC_RECORDS, typed=True) == DOC_BYTES
    assert decode_frame(DOC_BYTES, 10) == (40001, DOC_RECORDS)


def independent_decode(body: bytes) -> list[tuple[int, list[list[Any]]]]:
    """Section 5.2 read by someone without edgegw: a generic CBOR decoder (tag 86 left as
    a tag) and the document.  Returns [(kind, columns)] with every column a list of its
    table's n values."""
    _first_rid, sources, runs, tables = cbor2.loads(body)
    n_of: dict[int, int] = {}
    for kind, count in zip(runs[0::2], runs[1::2], strict=True):
        n_of[kind] = n_of.get(kind, 0) + count
    out = []
    for kind, columns in tables:
        n = n_of[kind]
        cols = []
        for col in columns:
            if isinstance(col, cbor2.CBORTag):
                assert col.tag == 86  # float64, little endian
                data = col.value
                values = [struct.unpack_from("<d", data, 8 * i)[0] for i in range(len(data) // 8)]
            else:
                values = list(col)
            cols.append(values * n if len(values) == 1 else values)
        cols[0] = [sources[i] for i in cols[0]]
        out.append((kind, cols))
    return out


def test_a_decoder_written_from_the_document_alone_reads_the_encoders_v3_bodies() -> None:
    tables = dict(independent_decode(DOC_BYTES))
    assert tables[6][1] == [1764130000.5, 1764130000.5]  # ts, one value for both
    assert tables[6][8] == [1.25, 0.5] and tables[6][9] == [1.0, None]
    assert tables[6][10] == [2.0, 2.0]
    assert tables[5][1] == [1764130000.75]
    # and a bigger frame: each table's rows are its records' fields
    recs = [SensorReading("oven", 1.7e9 + i / 8, "temp", -0.0 if i == 3 else 20 + i / 3)
            for i in range(100)]
    ((kind, cols),) = independent_decode(encode_columns(5, recs, typed=True))
    assert kind == SensorReading.KIND
    assert exact([SensorReading(*row) for row in zip(*cols, strict=False)]) == exact(recs)


# --- what a receiver refuses, and what a v2 hub is sent --------------------------------

TS2 = cbor2.CBORTag(86, bits(1.0) + bits(2.0))
TYPED_MALFORMED: list[tuple[Any, str]] = [
    ([1, ["s"], [11, 2], [[11, [[0], cbor2.CBORTag(86, bits(1.0) * 3), ["c"], [1.5]]]]],
     "must hold 16 or 8 bytes for 2 records, got 24"),
    ([1, ["s"], [11, 2], [[11, [[0], cbor2.CBORTag(86, "not bytes"), ["c"], [1.5]]]]],
     "not a byte string"),
    ([1, ["s"], [11, 2], [[11, [[0], cbor2.CBORTag(85, bits(1.0)), ["c"], [1.5]]]]],
     "must be an array or a float64 typed array"),  # float32: not a v3 column
    ([1, ["s"], [11, 2], [[11, [cbor2.CBORTag(86, bits(0.0)), TS2, ["c"], [1.5]]]]],
     "column 0 must be an array"),  # source indexes are integers
]


@pytest.mark.parametrize(("item", "why"), TYPED_MALFORMED)
def test_a_malformed_typed_column_is_a_frame_error_that_says_what_is_wrong(
        item: Any, why: str) -> None:
    with pytest.raises(FrameError) as exc:
        check_frame(cbor2.dumps(item), 1000)
    assert why in str(exc.value)


def test_a_v2_connection_refuses_typed_columns_and_is_sent_them_as_arrays_of_floats() -> None:
    body = encode_columns(40001, DOC_RECORDS, typed=True)
    with pytest.raises(FrameError, match="column 1 must be an array"):
        check_frame(body, 10, typed=False)  # what the hub does on a v2 connection
    v2 = plain_floats(body)  # what a v3 gateway sends a v2 hub (uplink)
    assert b"\xd8\x56" not in v2
    assert decode_frame(v2, 10, typed=False) == (40001, DOC_RECORDS)
    plain = encode_columns(40001, DOC_RECORDS)
    assert plain_floats(plain) is plain  # nothing typed: the body as it is


def test_a_v2_body_whose_float_bytes_look_like_the_tag_is_sent_to_a_v2_hub_as_it_is() -> None:
    # 0x40d8564800000000: a float whose CBOR bytes (fb 40 d8 56 48 ...) hold tag 86's head
    # and a byte string's after it
    lookalike = struct.unpack(">d", bytes.fromhex("40d8564800000000"))[0]
    recs = [SensorReading("s", 1.0 + i, "c", lookalike) for i in range(3)]
    body = encode_columns(1, recs)
    assert b"\xd8\x56\x48" in body
    assert plain_floats(body) == body
    assert decode_frame(plain_floats(body), 10, typed=False) == (1, recs)
