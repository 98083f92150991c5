"""Files of DEC PDP-11/VAX testers (FAR CPU_TYPE 0): their floats are VAX F_floating
(R*4) and D_floating (R*8), read as the tester meant them (docs/stdf.md, "Files from
other testers"), against a reference conversion written here from the VAX
architecture's definition, independently of edgegw's."""

from __future__ import annotations

import math
import struct
from fractions import Fraction
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_stdf_writer import full_record

from edgegw.stdf import RECORDS, RecordSpec, StdfDecoder, StdfWriter, row_fields

FLOAT_RECORDS = [r for r in RECORDS if any(f.type in ("R4", "R8", "Vn") for f in r.fields)]


def vax_reference(data: bytes) -> float:
    """The value of a VAX F (4 bytes) or D (8 bytes) floating datum: 16-bit little-endian
    words, the most significant first; sign, 8-bit exponent of excess 128, and a
    fraction with a hidden leading bit just after the binary point (0.1f)."""
    words = struct.unpack(f"<{len(data) // 2}H", data)
    bits = 0
    for word in words:  # the words in significance order
        bits = bits << 16 | word
    nbits = 16 * len(words)
    sign = bits >> (nbits - 1)
    exponent = (bits >> (nbits - 9)) & 0xFF
    fraction = bits & ((1 << (nbits - 9)) - 1)
    if exponent == 0:
        return math.nan if sign else 0.0  # reserved operand / zero (any fraction)
    magnitude = Fraction((1 << (nbits - 9)) | fraction, 1 << (nbits - 8)) * Fraction(2) ** (
        exponent - 128)
    return float(-magnitude if sign else magnitude)  # correctly rounded


def same(a: Any, b: Any) -> bool:
    """Equal, NaN equal to NaN (in lists, tuples and dicts too)."""
    return repr(a) == repr(b)


def vax_file(*records: bytes) -> bytes:
    return struct.pack("<HBBBB", 2, 0, 10, 0, 4) + b"".join(records)  # FAR CPU_TYPE 0


def ptr_body(result: bytes, lo: bytes = b"", hi: bytes = b"") -> bytes:
    body = struct.pack("<IBBBB", 100, 1, 0, 0, 0) + result
    if lo:
        # TEST_TXT "VDD", ALARM_ID "", OPT_FLAG, RES/LLM/HLM_SCAL, then the limits
        body += b"\x03VDD\x00" + struct.pack("<Bbbb", 0x0E, 0, 0, 0) + lo + hi
    return body


def decoded(data: bytes, name: str) -> list[dict[str, Any]]:
    """The ``name`` records of ``data``, as records and as rows (which must agree), in
    one piece and byte by byte."""
    out = []
    for rows in (False, True):
        for chunk in (len(data), 1):
            dec = StdfDecoder()
            got = []
            for start in range(0, len(data), chunk):
                dec.feed(data[start:start + chunk])
                got += [row_fields(r) for r in dec.rows() if r[0] == name] if rows else [
                    r.fields for r in dec.records() if r.name == name]
            assert dec.buffered == 0
            out.append(got)
    assert all(same(o, out[0]) for o in out)
    return out[0]


# -- the known values ------------------------------------------------------------------------


@pytest.mark.parametrize(("data", "value"), [
    ("80400000", 1.0),            # exponent 129, fraction 0: 0.1b * 2**1
    ("80c00000", -1.0),
    ("00410000", 2.0),
    ("c0400000", 1.5),
    ("4941db0f", 3.1415927410125732),  # pi as F: words 0x4149 0x0FDB
    ("80000000", 2.0 ** -128),    # the smallest
    ("ff7fffff", (1 - 2.0 ** -24) * 2.0 ** 127),  # the largest
    ("00000000", 0.0),
    ("7f00ffff", 0.0),            # exponent 0, sign 0: zero whatever the fraction
    ("00800000", math.nan),       # the reserved operand (sign 1, exponent 0)
])
def test_known_f_floating_values_read_as_a_vax_meant_them(data: str, value: float) -> None:
    raw = bytes.fromhex(data)
    assert same(vax_reference(raw), value)
    (ptr,) = decoded(vax_file(struct.pack("<HBB", 12, 15, 10) + ptr_body(raw)), "PTR")
    assert same(ptr["RESULT"], value)


def test_a_vax_file_reads_its_floats_as_the_tester_wrote_them() -> None:
    # (was a strict xfail: every R*4 read as IEEE, 1.0 as 4.6e-41)
    vax_one = bytes([0x80, 0x40, 0x00, 0x00])
    body = ptr_body(vax_one, bytes([0x00, 0xC0, 0, 0]), bytes([0x20, 0x42, 0, 0]))
    (ptr,) = decoded(vax_file(struct.pack("<HBB", len(body), 15, 10) + body), "PTR")
    assert (ptr["RESULT"], ptr["LO_LIMIT"], ptr["HI_LIMIT"]) == (1.0, -0.5, 10.0)


# -- every bit pattern -----------------------------------------------------------------------


@settings(max_examples=400, deadline=None)
@given(st.binary(min_size=4, max_size=4), st.binary(min_size=4, max_size=4),
       st.binary(min_size=4, max_size=4), st.binary(min_size=8, max_size=8))
def test_any_f_and_d_datum_reads_as_the_reference_converts_it(
        result: bytes, lo: bytes, hi: bytes, r8: bytes) -> None:
    body = ptr_body(result, lo, hi)
    # an MPR's RTN_RSLT array, a GDR's R*4 and R*8 values
    mpr = (struct.pack("<IBBBBHH", 7, 1, 0, 0, 0, 0, 3) + result + lo + hi)
    gdr = struct.pack("<H", 3) + b"\x07" + result + b"\x08" + r8 + b"\x00"
    data = vax_file(struct.pack("<HBB", len(body), 15, 10) + body,
                    struct.pack("<HBB", len(mpr), 15, 15) + mpr,
                    struct.pack("<HBB", len(gdr), 50, 10) + gdr)
    (ptr,) = decoded(data, "PTR")
    want = [vax_reference(b) for b in (result, lo, hi)]
    assert same([ptr["RESULT"], ptr["LO_LIMIT"], ptr["HI_LIMIT"]], want)
    (got_mpr,) = decoded(data, "MPR")
    assert same(got_mpr["RTN_RSLT"], want)
    (got_gdr,) = decoded(data, "GDR")
    assert same(got_gdr["GEN_DATA"], [(7, want[0]), (8, vax_reference(r8)), (0, None)])


# -- the writer: CPU_TYPE 0 files ------------------------------------------------------------


def vax_r4() -> st.SearchStrategy[float]:
    """The values VAX F holds: float32 values from 2**-128 up to below 2**127, and 0."""
    return st.one_of(st.just(0.0), st.floats(
        width=32, min_value=2.0 ** -128, max_value=2.0 ** 127, exclude_max=True).flatmap(
        lambda x: st.sampled_from([x, -x])))


def vax_r8() -> st.SearchStrategy[float]:
    return st.one_of(st.just(0.0), st.floats(
        min_value=2.0 ** -128, max_value=2.0 ** 127, exclude_max=True).flatmap(
        lambda x: st.sampled_from([x, -x])))


@st.composite
def vax_record(draw: st.DrawFn, spec: RecordSpec) -> dict[str, Any]:
    """A whole record whose floats a VAX can hold."""
    full = draw(full_record(spec))
    for f in spec.fields:
        value = full[f.name]
        if f.type == "R4":
            full[f.name] = ([draw(vax_r4()) for _ in value] if f.count is not None
                            else draw(vax_r4()))
        elif f.type == "Vn":
            full[f.name] = [(code, draw(vax_r4() if code == 7 else vax_r8()))
                            if code in (7, 8) else (code, v) for code, v in value]
    return full


@pytest.mark.parametrize("spec", FLOAT_RECORDS, ids=lambda r: r.name)
def test_every_record_with_floats_round_trips_through_a_cpu_type_0_file(
        spec: RecordSpec) -> None:
    @settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(vax_record(spec))
    def check(full: dict[str, Any]) -> None:
        w = StdfWriter("<", cpu_type=0)
        data = w.encode("FAR", {}) + w.encode(spec.name, full)
        assert data[4] == 0  # the FAR says CPU_TYPE 0
        (got,) = decoded(data, spec.name)
        assert got == full

    check()


def test_the_writer_rounds_to_f_and_writes_what_a_vax_cannot_hold_as_the_spec_allows() -> None:
    w = StdfWriter("<", cpu_type=0)

    def result(value: float) -> Any:
        (ptr,) = decoded(w.encode("FAR", {}) + w.encode("PTR", {
            "TEST_NUM": 1, "HEAD_NUM": 1, "SITE_NUM": 0, "TEST_FLG": 0, "PARM_FLG": 0,
            "RESULT": value}), "PTR")
        return ptr["RESULT"]

    assert result(0.1) == struct.unpack("<f", struct.pack("<f", 0.1))[0]  # 24 bits, as R*4
    assert math.isnan(result(math.nan))  # the reserved operand
    assert same(result(-0.0), 0.0)  # a VAX has no -0
    assert result(2.0 ** -130) == 0.0  # below F's range: zero, as a VAX's underflow
    for value in (math.inf, -math.inf, 2.0 ** 127, 1e300):
        with pytest.raises(ValueError, match="VAX"):
            w.encode("PTR", {"TEST_NUM": 1, "HEAD_NUM": 1, "SITE_NUM": 0, "TEST_FLG": 0,
                             "PARM_FLG": 0, "RESULT": value})
    with pytest.raises(ValueError, match="little-endian"):
        StdfWriter(">", cpu_type=0)


def test_a_file_of_a_pc_and_a_vax_lot_reads_each_lots_floats_in_its_own_format() -> None:
    ptr = {"TEST_NUM": 1, "HEAD_NUM": 1, "SITE_NUM": 0, "TEST_FLG": 0, "PARM_FLG": 0,
           "RESULT": 2.5}
    vax, pc = StdfWriter("<", cpu_type=0), StdfWriter("<")
    data = b"".join(w.encode(name, fields) for w in (pc, vax, pc) for name, fields in
                    (("FAR", {}), ("PTR", ptr), ("MRR", {"FINISH_T": 1})))
    assert [p["RESULT"] for p in decoded(data, "PTR")] == [2.5, 2.5, 2.5]
    assert [f["CPU_TYPE"] for f in decoded(data, "FAR")] == [2, 0, 2]
