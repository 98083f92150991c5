"""The compiled decoders' fast paths on what FTR-, MPR- and PTR-heavy testers write: records
of random arrays, bit fields and optional tails cut anywhere round-trip through the writer
exactly (rows and dicts, tail memo on and off, both byte orders), and a record that ends
between two fixed-size fields (a PTR written up to OPT_FLAG) is decoded by the compiled
code itself, not through the field-by-field reference decoder.  Each type's decoders are
compiled at its first record here (``set_compile_after(0)``): by default the first
records of a type are the reference decoder's."""

from __future__ import annotations

import struct
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgegw.stdf import BY_NAME, Bits, StdfDecoder, StdfWriter, stdf_fields
from edgegw.stdf.decoder import (
    COMPILE_AFTER,
    MEMO_SIZE,
    decode_generic,
    decoder_table,
    set_compile_after,
    set_tail_memo,
)

#: these tests check the pure-Python record loop's own fast paths (tests/decoders.py)
pytestmark = pytest.mark.usefixtures("python_decoder")

_INTS = {"U1": (0, 255), "U2": (0, 65535), "U4": (0, 2**32 - 1), "I1": (-128, 127),
         "I2": (-32768, 32767), "I4": (-(2**31), 2**31 - 1), "B1": (0, 255), "N1": (0, 15)}
#: the types the compiled code reads in runs, one ``unpack_from`` per run
_FIXED = {"U1", "U2", "U4", "U8", "I1", "I2", "I4", "I8", "R4", "R8", "B1", "C1"}
_TEXT = st.text(st.characters(max_codepoint=255), max_size=12)


def _value(typ: str) -> st.SearchStrategy[Any]:
    if typ in _INTS:
        return st.integers(*_INTS[typ])
    if typ == "R4":
        return st.floats(width=32, allow_nan=False)
    if typ == "R8":
        return st.floats(allow_nan=False)
    if typ == "C1":
        return st.characters(max_codepoint=255)
    if typ == "Cn":
        return _TEXT
    if typ == "Bn":
        return st.binary(max_size=12)
    if typ == "Dn":
        return st.integers(0, 300).flatmap(
            lambda n: st.binary(min_size=(n + 7) // 8, max_size=(n + 7) // 8).map(
                lambda b: Bits(n, b)))
    raise AssertionError(typ)


@st.composite
def records(draw: st.DrawFn, name: str) -> dict[str, Any]:
    """A record's fields in spec order up to a random last one; arrays as long as their
    counts say."""
    spec = BY_NAME[name]
    counts = {f.count for f in spec.fields if f.count}
    out: dict[str, Any] = {}
    last = draw(st.integers(0, len(spec.fields) - 1))
    for f in spec.fields[:last + 1]:
        if f.count is not None:
            out[f.name] = draw(st.lists(_value(f.type), min_size=out[f.count],
                                        max_size=out[f.count]))
        elif f.name in counts:
            out[f.name] = draw(st.integers(0, 20))
        else:
            out[f.name] = draw(_value(f.type))
    return out


def _expected(name: str, written: dict[str, Any]) -> dict[str, Any]:
    """What a reader sees of a record written with ``written``: the writer's fields, and
    after them the arrays whose count is 0 (an empty array takes no bytes, so a record
    that ends before it still holds it)."""
    out = stdf_fields(name, written)
    for f in BY_NAME[name].fields[len(out):]:
        if f.count is None or out.get(f.count) != 0:
            break
        out[f.name] = []
    return out


def _decode(data: bytes, rows: bool) -> list[Any]:
    dec = StdfDecoder()
    dec.feed(data)
    got = list(dec.rows() if rows else dec.records())
    assert dec.buffered == 0
    return got


@pytest.fixture(autouse=True, scope="module")
def compiled_at_once() -> Iterator[None]:
    set_compile_after(0)
    yield
    set_compile_after(COMPILE_AFTER)


@pytest.fixture
def memo_restored() -> Iterator[None]:
    yield
    set_tail_memo(MEMO_SIZE)


@settings(max_examples=150, deadline=None)
@given(st.data(), st.sampled_from(["FTR", "MPR", "PTR", "PRR", "PIR"]),
       st.sampled_from("<>"), st.booleans())
def test_writer_to_decoder_round_trip_of_random_arrays_bits_and_cut_tails(
        data: st.DataObject, name: str, order: str, memo: bool) -> None:
    fields = [data.draw(records(name)) for _ in range(3)]
    w = StdfWriter(order)
    stream = w.encode("FAR", {}) + b"".join(w.encode(name, f) for f in fields)
    try:
        set_tail_memo(MEMO_SIZE if memo else 0)
        for _ in range(2):  # the second time through, the memo holds every tail
            dicts, rows = _decode(stream, False)[1:], _decode(stream, True)[1:]
            for want, rec, row in zip(fields, dicts, rows, strict=True):
                expected = _expected(name, want)
                assert rec.name == row[0] == name
                assert rec.fields == expected
                assert row[2] == tuple(expected.values())
    finally:
        set_tail_memo(MEMO_SIZE)


@contextmanager
def _calls_of(code: Any) -> Iterator[list[int]]:
    """Count the calls of the Python function whose code object is ``code``."""
    calls: list[int] = []

    def hook(frame: FrameType, event: str, arg: Any) -> None:
        if event == "call" and frame.f_code is code:
            calls.append(1)

    sys.setprofile(hook)
    try:
        yield calls
    finally:
        sys.setprofile(None)


def _full(name: str) -> dict[str, Any]:
    spec = BY_NAME[name]
    out: dict[str, Any] = {}
    for f in spec.fields:
        if f.count is not None:
            out[f.name] = [1] * out[f.count]
        elif f.type in ("R4", "R8"):
            out[f.name] = 0.5
        elif f.type == "Cn":
            out[f.name] = "x"
        elif f.type == "C1":
            out[f.name] = "P"
        elif f.type == "Dn":
            out[f.name] = Bits(9, b"\x01\x01")
        elif f.type == "Bn":
            out[f.name] = b"\x07"
        else:
            out[f.name] = 2
    return out


@pytest.mark.parametrize("name", ["PTR", "FTR", "MPR", "PRR", "PIR", "TSR", "HBR", "WRR"])
@pytest.mark.parametrize("rows", [False, True])
def test_a_record_cut_between_fixed_size_fields_is_not_left_to_the_generic_decoder(
        name: str, rows: bool, memo_restored: None) -> None:
    spec = BY_NAME[name]
    full = _full(name)
    w = StdfWriter("<")
    names = [f.name for f in spec.fields]
    # every cut where the last field written and the next one are both fixed-size
    # scalars (inside one struct run of the compiled code)
    cuts = [i for i in range(len(names) - 1)
            if all(f.count is None and f.type in _FIXED for f in spec.fields[i:i + 2])]
    assert cuts, name
    wanted = [{k: full[k] for k in names[:i + 1]} for i in cuts]
    stream = w.encode("FAR", {}) + b"".join(w.encode(name, f) for f in wanted)
    for size in (MEMO_SIZE, 0):
        set_tail_memo(size)
        _decode(stream, rows)  # compiles the decoders outside the count
        with _calls_of(decode_generic.__code__) as calls:
            got = _decode(stream, rows)[1:]
        expected = [stdf_fields(name, f) for f in wanted]
        if rows:
            assert [r[2] for r in got] == [tuple(e.values()) for e in expected]
        else:
            assert [r.fields for r in got] == expected
        assert not calls, f"{name}: {len(calls)} of {len(cuts)} cut records decoded generically"


@pytest.mark.parametrize("order", "<>")
@pytest.mark.parametrize("rows", [False, True])
def test_ftr_tails_that_repeat_or_differ_in_one_field_decode_as_the_reference(
        order: str, rows: bool, memo_restored: None) -> None:
    """The FTR tail memo (VECT_NAM on): passing results of one test repeat their tail's
    bytes; results that differ from it in one field of the tail, or only before it,
    are their own values, never a remembered tail's."""
    base = {**_full("FTR"), "RTN_ICNT": 0, "PGM_ICNT": 0, "RTN_INDX": [], "RTN_STAT": [],
            "PGM_INDX": [], "PGM_STAT": [], "FAIL_PIN": Bits(0, b""), "VECT_NAM": "",
            "TIME_SET": "ts1", "OP_CODE": "", "TEST_TXT": "func_1", "ALARM_ID": "",
            "PROG_TXT": "", "RSLT_TXT": "", "PATG_NUM": 255, "SPIN_MAP": Bits(0, b"")}
    variants = [base, {**base, "TEST_NUM": 9, "CYCL_CNT": 7, "RTN_ICNT": 2,
                       "RTN_INDX": [3, 4], "RTN_STAT": [1, 15]},
                {**base, "VECT_NAM": "v"}, {**base, "TIME_SET": "ts2"},
                {**base, "TEST_TXT": "func_2"}, {**base, "RSLT_TXT": "fail"},
                {**base, "PATG_NUM": 254}, {**base, "SPIN_MAP": Bits(3, b"\x05")},
                {**base, "SPIN_MAP": Bits(3, b"\x06")}]
    w = StdfWriter(order)
    wanted = [v for _ in range(3) for v in variants]
    stream = w.encode("FAR", {}) + b"".join(w.encode("FTR", f) for f in wanted)
    expected = [stdf_fields("FTR", f) for f in wanted]
    for size in (MEMO_SIZE, 0, 4):
        set_tail_memo(size)
        for _ in range(2):
            got = _decode(stream, rows)[1:]
            if rows:
                assert [r[2] for r in got] == [tuple(e.values()) for e in expected]
            else:
                assert [r.fields for r in got] == expected


@pytest.mark.parametrize("order", "<>")
@pytest.mark.parametrize("rows", [False, True])
def test_mpr_tails_that_repeat_or_differ_in_one_field_decode_as_the_reference(
        order: str, rows: bool, memo_restored: None) -> None:
    """The MPR tail memo (UNITS on, after RTN_INDX): the results of one test repeat their
    tail's bytes; results that differ in a field of it, or only before it (RTN_INDX
    too: its count is in the head), are their own values, never a remembered tail's, and
    no two records share a list."""
    base = {**_full("MPR"), "RTN_ICNT": 2, "RSLT_CNT": 2, "RTN_STAT": [1, 2],
            "RTN_RSLT": [0.5, 1.5], "RTN_INDX": [3, 4], "UNITS": "V", "UNITS_IN": "A",
            "C_RESFMT": "", "C_LLMFMT": "", "C_HLMFMT": "", "LO_SPEC": 0.0, "HI_SPEC": 1.0}
    variants = [base, {**base, "TEST_NUM": 9, "RTN_RSLT": [2.5, 3.5]},
                {**base, "RTN_INDX": [5, 6]},
                {**base, "RTN_ICNT": 1, "RTN_STAT": [1], "RTN_INDX": [3]},
                {**base, "UNITS": "mV"}, {**base, "C_HLMFMT": "%f"}, {**base, "HI_SPEC": 2.0},
                {**base, "RTN_ICNT": 0, "RTN_STAT": [], "RTN_INDX": []}]
    w = StdfWriter(order)
    wanted = [v for _ in range(3) for v in variants]
    stream = w.encode("FAR", {}) + b"".join(w.encode("MPR", f) for f in wanted)
    expected = [stdf_fields("MPR", f) for f in wanted]
    for size in (MEMO_SIZE, 0, 4):
        set_tail_memo(size)
        for _ in range(2):
            got = _decode(stream, rows)[1:]
            values = [r[2] for r in got] if rows else [tuple(r.fields.values()) for r in got]
            assert values == [tuple(e.values()) for e in expected]
            lists = [id(v) for r in values for v in r if isinstance(v, list)]
            assert len(set(lists)) == len(lists)


@pytest.mark.parametrize("rows", [False, True])
def test_a_ptr_and_an_ftr_whose_tails_are_the_same_bytes_keep_their_own_values(
        rows: bool, memo_restored: None) -> None:
    """Each type's tail memo is its own: an FTR whose bytes from VECT_NAM on are a PTR's
    from TEST_TXT on is an FTR (one memo shared by the record loop's inline PTR and FTR
    code gave the FTR the PTR's remembered fields)."""
    w = StdfWriter("<")
    ptr = w.encode("PTR", {"TEST_NUM": 1, "HEAD_NUM": 1, "SITE_NUM": 1, "TEST_FLG": 0,
                           "PARM_FLG": 0, "RESULT": 0.5, "TEST_TXT": "", "ALARM_ID": "",
                           "OPT_FLAG": 0, "RES_SCAL": 0, "LLM_SCAL": 0, "HLM_SCAL": 0,
                           "LO_LIMIT": 0.0, "HI_LIMIT": 0.0, "UNITS": "V"})
    tail = ptr[4 + 4 + 1 + 1 + 1 + 1 + 4:]  # from TEST_TXT on: the PTR memo's bytes
    head = w.encode("FTR", {**_full("FTR"), "RTN_ICNT": 0, "PGM_ICNT": 0, "RTN_INDX": [],
                            "RTN_STAT": [], "PGM_INDX": [], "PGM_STAT": [],
                            "FAIL_PIN": Bits(0, b"")})[4:]
    head = head[:38 + 2]  # the fixed-size fields, no array elements, an empty FAIL_PIN
    spec = BY_NAME["FTR"]
    ftr = struct.pack("<HBB", len(head) + len(tail), spec.typ, spec.sub) + head + tail
    stream = w.encode("FAR", {}) + (ptr + ftr) * 2 + (ftr + ptr) * 2
    readers = decoder_table("<").readers
    want, pos = [], 6
    for rec in [ptr, ftr] * 2 + [ftr, ptr] * 2:
        name = "PTR" if rec is ptr else "FTR"
        want.append(decode_generic(BY_NAME[name], readers, stream, pos + 4, pos + len(rec)))
        pos += len(rec)
    assert want[1]["VECT_NAM"] == "" and "UNITS" in want[0]
    for size in (MEMO_SIZE, 0):
        set_tail_memo(size)
        got = _decode(stream, rows)[1:]
        if rows:
            assert [r[2] for r in got] == [tuple(e.values()) for e in want]
        else:
            assert [r.fields for r in got] == want


@pytest.mark.parametrize("order", "<>")
@pytest.mark.parametrize("rows", [False, True])
def test_ptrs_whose_limits_move_but_whose_units_on_repeat_decode_as_the_reference(
        order: str, rows: bool, memo_restored: None) -> None:
    """The PTR's second memo (UNITS on: units, formats, spec limits), for adaptive limits
    that make every whole tail new: results that repeat those bytes use it (counted as
    its hits), results that differ from them in one field of it, or only before it, or
    that end before HI_SPEC, are their own values, never a remembered tail's; rows and
    dicts as the writer wrote them, with the memo, without it, and with a tiny one."""
    base = {**_full("PTR"), "OPT_FLAG": 0x0E, "UNITS": "V", "C_RESFMT": "%9.4f",
            "C_LLMFMT": "%9.4f", "C_HLMFMT": "", "LO_SPEC": -1.0, "HI_SPEC": 1.0}
    variants = [base, {**base, "UNITS": "mV"}, {**base, "C_RESFMT": "%9.3f"},
                {**base, "C_HLMFMT": "%f"}, {**base, "LO_SPEC": -2.0},
                {**base, "HI_SPEC": 2.0}, {**base, "OPT_FLAG": 0xCE, "RES_SCAL": -3},
                {**base, "TEST_TXT": "other"},
                {k: v for k, v in base.items() if k != "HI_SPEC"}]
    # the limits move every record: the first memo (TEST_TXT on) never hits
    wanted = [{**v, "LO_LIMIT": -0.5 - i / 64, "HI_LIMIT": 0.5 + i / 64}
              for i, v in enumerate(v for _ in range(3) for v in variants)]
    w = StdfWriter(order)
    stream = w.encode("FAR", {}) + b"".join(w.encode("PTR", f) for f in wanted)
    expected = [tuple(stdf_fields("PTR", f).items()) for f in wanted]
    for size in (MEMO_SIZE, 0, 4):
        set_tail_memo(size)
        for _ in range(2):
            dec = StdfDecoder()
            dec.feed(stream)
            got = list(dec.rows() if rows else dec.records())[1:]
            if rows:
                assert [r[2] for r in got] == [tuple(v for _, v in e) for e in expected]
            else:
                assert [tuple(r.fields.items()) for r in got] == expected
            if size == MEMO_SIZE:
                # 24 whole PTRs, 6 distinct tails from UNITS on (the base's is the
                # OPT_FLAG and TEST_TXT variants' too): each tail's first one misses
                assert dec._learnt[("PTR2", True)][2][1] == 24 - 6


def test_the_tail_memo_turns_itself_off_for_tails_that_do_not_repeat() -> None:
    """Tails that never repeat: the memo stops being consulted (its misses cost speed)
    for the rest of the file, and the records are the same all along."""
    from edgegw.stdf.decoder import MEMO_SIZE, set_tail_memo, tail_memo_active

    def decode(data: bytes) -> list[Any]:
        dec = StdfDecoder()
        dec.feed(data)
        return list(dec.records())

    w = StdfWriter("<")
    data = w.encode("FAR", {}) + b"".join(
        w.encode("PTR", {"TEST_NUM": 1, "HEAD_NUM": 1, "SITE_NUM": 0, "TEST_FLG": 0,
                         "PARM_FLG": 0, "RESULT": 0.5, "TEST_TXT": "t", "ALARM_ID": "",
                         "OPT_FLAG": 0, "RES_SCAL": 0, "LLM_SCAL": 0, "HLM_SCAL": 0,
                         "LO_LIMIT": float(i), "HI_LIMIT": 2.0, "UNITS": "V"})
        for i in range(100))
    try:
        set_tail_memo(0)
        plain = decode(data)
        set_tail_memo(8)
        dec = StdfDecoder()
        dec.feed(data)
        first = list(dec.records())
        assert not tail_memo_active(dec)  # off after the misses
        assert tail_memo_active(StdfDecoder())  # a new decoder (a new file): on
        assert decode(data) == first == plain
    finally:
        set_tail_memo(MEMO_SIZE)
