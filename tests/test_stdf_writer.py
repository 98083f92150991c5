"""The STDF writer: what it writes, the decoder reads back exactly (both byte orders,
every record type, truncated trailing fields), proven over generated records."""

from __future__ import annotations

import math
import struct
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgegw.stdf import RECORDS, Bits, Field, RecordSpec, StdfDecoder, StdfWriter, row_fields

INT_RANGES = {"U1": (0, 2**8 - 1), "U2": (0, 2**16 - 1), "U4": (0, 2**32 - 1),
              "U8": (0, 2**64 - 1), "I1": (-(2**7), 2**7 - 1), "I2": (-(2**15), 2**15 - 1),
              "I4": (-(2**31), 2**31 - 1), "B1": (0, 255), "N1": (0, 15)}
latin1 = st.characters(max_codepoint=255)


def r4() -> st.SearchStrategy[float]:
    return st.floats(width=32, allow_nan=False)


def value_of(typ: str, size: int = 0) -> st.SearchStrategy[Any]:
    if typ in INT_RANGES:
        return st.integers(*INT_RANGES[typ])
    if typ == "R4":
        return r4()
    if typ == "R8":
        return st.floats(allow_nan=False)
    if typ == "C1":
        return st.text(latin1, min_size=1, max_size=1)
    if typ == "Cn":
        return st.text(latin1, max_size=255)
    if typ == "Sn":
        return st.text(latin1, max_size=300)
    if typ == "Cf":
        return st.text(latin1, min_size=size, max_size=size)
    if typ == "Uf":
        return st.integers(0, 2 ** (8 * size) - 1)
    if typ == "Bn":
        return st.binary(max_size=255)
    if typ == "Dn":
        return st.integers(0, 200).flatmap(
            lambda n: st.binary(min_size=(n + 7) // 8, max_size=(n + 7) // 8).map(
                lambda data: Bits(n, data)))
    if typ == "Vn":
        item = st.one_of(
            st.just((0, None)),  # pad byte
            *(st.tuples(st.just(code), value_of(t)) for code, t in
              ((1, "U1"), (2, "U2"), (3, "U4"), (4, "I1"), (5, "I2"), (6, "I4"),
               (7, "R4"), (8, "R8"), (10, "Cn"), (11, "Bn"), (12, "Dn"))),
            st.tuples(st.just(13), st.integers(0, 255)),
        )
        return st.lists(item, max_size=12)
    raise AssertionError(typ)


@st.composite
def full_record(draw: st.DrawFn, spec: RecordSpec) -> dict[str, Any]:
    """Every field of the record, consistent: arrays as long as their count field,
    Uf/Cf elements as wide as their size field."""
    counts = {f.count for f in spec.fields if f.count}
    sizes = {f.size for f in spec.fields if f.size}
    out: dict[str, Any] = {}
    for f in spec.fields:
        if f.name in counts:
            out[f.name] = draw(st.integers(0, 6))
        elif f.name in sizes:
            uf = any(g.size == f.name and g.type == "Uf" for g in spec.fields)
            out[f.name] = draw(st.sampled_from([1, 2, 4, 8]) if uf else st.integers(0, 12))
        elif f.count is not None:
            size = out[f.size] if f.size else 0
            n = out[f.count]
            out[f.name] = draw(st.lists(value_of(f.type, size), min_size=n, max_size=n))
        else:
            out[f.name] = draw(value_of(f.type))
    return out


def read_back(fields_present: list[Field], full: dict[str, Any], keep: int) -> dict[str, Any]:
    """What a reader sees of a record written with its first ``keep`` fields: those,
    plus arrays right after them that take no bytes: a count of zero, or C*f elements
    of width zero (``n`` empty strings)."""
    expected = {f.name: full[f.name] for f in fields_present[:keep]}
    for f in fields_present[keep:]:
        if f.count is not None and expected.get(f.count) == 0:
            expected[f.name] = []
            continue
        if f.type == "Cf" and f.count in expected and expected.get(f.size) == 0:
            expected[f.name] = [""] * expected[f.count]
            continue
        break
    return expected


def decode_one(order: str, record: bytes) -> tuple[str, dict[str, Any]]:
    """Decode a record as the last of a stream and followed by another record (the
    decoder must stop at REC_LEN either way, never read the next record's bytes)."""
    w = StdfWriter(order)
    results = []
    for tail in (b"", w.encode("EPS", {}), w.encode("PIR", {"HEAD_NUM": 255, "SITE_NUM": 9})):
        dec = StdfDecoder()
        dec.feed(w.encode("FAR", {}) + record + tail)
        recs = list(dec.records())
        assert dec.buffered == 0 and len(recs) == (3 if tail else 2)
        results.append((recs[1].name, recs[1].fields))
        rows = StdfDecoder()  # the same record as a row: its values in spec order
        rows.feed(w.encode("FAR", {}) + record + tail)
        row = list(rows.rows())[1]
        results.append((row[0], row_fields(row)))
    assert all(repr(r) == repr(results[0]) for r in results)  # NaN-safe
    return results[0]


@st.composite
def truncated_record(draw: st.DrawFn) -> tuple[RecordSpec, dict[str, Any], int, str]:
    spec = draw(st.sampled_from([r for r in RECORDS if r.fields and r.name != "FAR"]))
    full = draw(full_record(spec))
    keep = draw(st.integers(0, len(spec.fields)))
    return spec, full, keep, draw(st.sampled_from("<>"))


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(truncated_record())
def test_round_trip_is_exact_for_every_record_type_truncated_or_not(
        case: tuple[RecordSpec, dict[str, Any], int, str]) -> None:
    spec, full, keep, order = case
    written = {f.name: full[f.name] for f in spec.fields[:keep]}
    name, fields = decode_one(order, StdfWriter(order).encode(spec.name, written))
    assert name == spec.name
    assert fields == read_back(list(spec.fields), full, keep)


@pytest.mark.parametrize("spec", [r for r in RECORDS if r.name != "FAR"], ids=lambda r: r.name)
def test_every_record_type_round_trips_with_all_fields(spec: RecordSpec) -> None:
    @settings(max_examples=25, deadline=None)
    @given(full_record(spec), st.sampled_from("<>"))
    def check(full: dict[str, Any], order: str) -> None:
        assert decode_one(order, StdfWriter(order).encode(spec.name, full)) == (spec.name, full)

    check()


def test_absent_middle_fields_get_the_specs_missing_values() -> None:
    w = StdfWriter("<")
    _, prr = decode_one("<", w.encode("PRR", {"HEAD_NUM": 1, "SITE_NUM": 3, "PART_ID": "17"}))
    assert prr == {"HEAD_NUM": 1, "SITE_NUM": 3, "PART_FLG": 0, "NUM_TEST": 0, "HARD_BIN": 0,
                   "SOFT_BIN": 65535, "X_COORD": -32768, "Y_COORD": -32768, "TEST_T": 0,
                   "PART_ID": "17"}
    _, mir = decode_one("<", w.encode("MIR", {"LOT_ID": "L1"}))
    assert mir["BURN_TIM"] == 65535 and mir["MODE_COD"] == " " and mir["LOT_ID"] == "L1"


def test_absent_trailing_fields_make_the_record_shorter() -> None:
    w = StdfWriter(">")
    short = w.encode("PTR", {"TEST_NUM": 7, "HEAD_NUM": 1, "SITE_NUM": 0, "TEST_FLG": 0,
                             "PARM_FLG": 0, "RESULT": 1.5})
    assert short[:4] == struct.pack(">HBB", 12, 15, 10) and len(short) == 16


def test_array_count_comes_from_the_array_when_absent() -> None:
    w = StdfWriter("<")
    _, sdr = decode_one("<", w.encode("SDR", {"HEAD_NUM": 1, "SITE_GRP": 0,
                                              "SITE_NUM": [0, 1, 2, 3]}))
    assert sdr["SITE_CNT"] == 4 and sdr["SITE_NUM"] == [0, 1, 2, 3]


def test_far_defaults_to_the_writers_byte_order() -> None:
    assert StdfWriter("<").encode("FAR", {}) == b"\x02\x00\x00\x0a\x02\x04"
    assert StdfWriter(">").encode("FAR", {}) == b"\x00\x02\x00\x0a\x01\x04"


def test_nan_and_infinities_survive_a_round_trip() -> None:
    w = StdfWriter("<")
    _, ptr = decode_one("<", w.encode("PTR", {"TEST_NUM": 1, "RESULT": math.nan,
                                              "TEST_TXT": "", "ALARM_ID": "", "OPT_FLAG": 0,
                                              "RES_SCAL": 0, "LLM_SCAL": 0, "HLM_SCAL": 0,
                                              "LO_LIMIT": -math.inf, "HI_LIMIT": math.inf}))
    assert math.isnan(ptr["RESULT"]) and ptr["LO_LIMIT"] == -math.inf


@pytest.mark.parametrize(("name", "fields", "message"), [
    ("XYZ", {}, "unknown STDF record type"),
    ("PIR", {"HEAD": 1}, "has no field"),
    ("PIR", {"HEAD_NUM": 256}, "HEAD_NUM"),
    ("DTR", {"TEXT_DAT": "x" * 256}, "longer than 255"),
    ("SDR", {"SITE_CNT": 2, "SITE_NUM": [1]}, "1 elements but SITE_CNT = 2"),
])
def test_invalid_records_are_refused_with_a_reason(name: str, fields: dict[str, Any],
                                                   message: str) -> None:
    with pytest.raises(ValueError, match=message):
        StdfWriter().encode(name, fields)
