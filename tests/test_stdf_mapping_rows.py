"""The gateway's fast STDF path maps exactly what the dict path maps.

``StdfDecoder(types=RecordMapper.TYPES).rows()`` into ``RecordMapper.map_row`` (the tail's
path without ``forward_raw``) against ``StdfDecoder().records()`` into
``RecordMapper.map``: the same edgegw records, floats bit for bit (-0.0 is not 0.0, a NaN
limit stays a NaN), on every real file, every synthetic shape and generated files whose
PTRs repeat, drift, stop early and share their tests' defaults with other sites and MPRs.
"""

from __future__ import annotations

import math
import struct
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from shared_data import GALAXY, METIS, stdf_bytes
from test_stdf_shapes import SHAPES, shape

from edgegw.stdf import RecordMapper, StdfDecoder, StdfWriter, TestState


def by_dicts(data: bytes, chunk: int = 1 << 16) -> list[Any]:
    dec = StdfDecoder()
    mapper = RecordMapper("t")
    out: list[Any] = []
    for i in range(0, len(data), chunk):
        dec.feed(data[i:i + chunk])
        for rec in dec.records():
            out += mapper.map(rec, 0.0)
    return out + mapper.close(0.0)


def by_rows(data: bytes, chunk: int = 1 << 16) -> list[Any]:
    dec = StdfDecoder(types=RecordMapper.TYPES)
    mapper = RecordMapper("t")
    out: list[Any] = []
    for i in range(0, len(data), chunk):
        dec.feed(data[i:i + chunk])
        for row in dec.rows():
            out += mapper.map_row(row, 0.0)
    return out + mapper.close(0.0)


def exact(records: list[Any]) -> list[Any]:
    """Records with every float as its bytes (== would take -0.0 for 0.0)."""
    def one(x: Any) -> Any:
        if isinstance(x, float):
            return struct.pack("<d", x)
        if isinstance(x, (list, tuple)):
            return (type(x).__name__, *map(one, x))
        if isinstance(x, dict):
            return sorted((k, one(v)) for k, v in x.items())
        return x
    return [one(r) for r in records]


@pytest.mark.parametrize("name", [GALAXY, METIS, *SHAPES])
def test_rows_map_every_real_file_and_shape_as_dicts_do(name: str) -> None:
    data = shape(name) if name in SHAPES else stdf_bytes(name)
    want = by_dicts(data)
    assert want and exact(by_rows(data)) == exact(want)


W = StdfWriter()
LIMITS = st.sampled_from([0.0, -0.0, 1.5, -2.25, math.nan, math.inf])
PTR_TAIL = ("OPT_FLAG", "RES_SCAL", "LLM_SCAL", "HLM_SCAL", "LO_LIMIT", "HI_LIMIT",
            "UNITS", "C_RESFMT", "C_LLMFMT", "C_HLMFMT", "LO_SPEC", "HI_SPEC")


@st.composite
def ptr(draw: st.DrawFn) -> tuple[str, dict[str, Any]]:
    fields: dict[str, Any] = {
        "TEST_NUM": draw(st.integers(1, 3)), "HEAD_NUM": draw(st.integers(1, 2)),
        "SITE_NUM": draw(st.integers(0, 2)), "TEST_FLG": draw(st.sampled_from([0, 2, 0x80])),
        "PARM_FLG": 0, "RESULT": draw(st.sampled_from([1.0, -0.0, 2.5])),
        "TEST_TXT": draw(st.sampled_from(["", "IDD"])), "ALARM_ID": "",
        "OPT_FLAG": draw(st.sampled_from([0, 0x0E, 0x40, 0x80, 0x30, 0xCE, 0xFF])),
        "RES_SCAL": 0, "LLM_SCAL": 0, "HLM_SCAL": 0,
        "LO_LIMIT": draw(LIMITS), "HI_LIMIT": draw(LIMITS),
        "UNITS": draw(st.sampled_from(["", "mA", "V"])),
        "C_RESFMT": "", "C_LLMFMT": draw(st.sampled_from(["", "%7.3f"])), "C_HLMFMT": "",
        "LO_SPEC": draw(LIMITS), "HI_SPEC": 0.0,
    }
    # testers stop PTRs early after the first of a test (anywhere, down to TEST_NUM)
    keep = draw(st.integers(1, len(fields)))
    return "PTR", dict(list(fields.items())[:keep])


@st.composite
def record(draw: st.DrawFn) -> tuple[str, dict[str, Any]]:
    kind = draw(st.sampled_from(["PTR", "PTR", "PTR", "PTR", "PIR", "PRR", "MPR", "DTR",
                                 "FTR"]))
    if kind == "PTR":
        return draw(ptr())
    if kind == "FTR":  # stopped anywhere, NUM_FAIL valid or not, TEST_TXT or not
        fields = {"TEST_NUM": draw(st.integers(1, 3)), "HEAD_NUM": draw(st.integers(1, 2)),
                  "SITE_NUM": draw(st.integers(0, 2)), "TEST_FLG": draw(st.sampled_from(
                      [0, 0x80])), "OPT_FLAG": draw(st.sampled_from([0, 0x08, 0xFF])),
                  "CYCL_CNT": 1, "REL_VADR": 0, "REPT_CNT": 1, "NUM_FAIL": 3,
                  **({"TEST_TXT": draw(st.sampled_from(["", "func"]))}
                     if draw(st.booleans()) else {})}
        return "FTR", dict(list(fields.items())[:draw(st.integers(1, len(fields)))])
    head, site = draw(st.integers(1, 2)), draw(st.integers(0, 2))
    if kind == "PIR":
        return "PIR", {"HEAD_NUM": head, "SITE_NUM": site}
    if kind == "PRR":
        return "PRR", {"HEAD_NUM": head, "SITE_NUM": site, "PART_FLG": 0, "NUM_TEST": 1,
                       "HARD_BIN": 1, "SOFT_BIN": 1, "X_COORD": 1, "Y_COORD": 2}
    if kind == "DTR":
        return "DTR", {"TEXT_DAT": "not mapped"}
    # an MPR of the same tests: it teaches the tests' defaults too
    return "MPR", {"TEST_NUM": draw(st.integers(1, 3)), "HEAD_NUM": head, "SITE_NUM": site,
                   "TEST_FLG": 0, "PARM_FLG": 0, "RTN_ICNT": 0, "RSLT_CNT": 1,
                   "RTN_RSLT": [1.0], "TEST_TXT": "", "ALARM_ID": "",
                   "OPT_FLAG": draw(st.sampled_from([0x0E, 0xC0])), "RES_SCAL": 0,
                   "LLM_SCAL": 0, "HLM_SCAL": 0, "LO_LIMIT": draw(LIMITS),
                   "HI_LIMIT": draw(LIMITS), "UNITS": draw(st.sampled_from(["", "A"]))}


@settings(max_examples=300, deadline=None)
@given(st.lists(record(), max_size=60), st.integers(1, 200))
def test_rows_map_generated_files_as_dicts_do(recs: list[tuple[str, dict]],
                                              chunk: int) -> None:
    data = b"".join(W.encode(name, fields) for name, fields in
                    [("FAR", {}), ("MIR", {"LOT_ID": "L"}), *recs, ("MRR", {})])
    assert exact(by_rows(data, chunk)) == exact(by_dicts(data, chunk))


def test_the_limit_plans_turn_off_on_a_file_whose_limits_never_repeat(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Limits that drift per part: the plans would only cost, so they stop (bounded
    meanwhile); what is mapped is the same."""
    monkeypatch.setattr(TestState, "PTR_PLANS", 16)
    recs = [("PTR", {"TEST_NUM": 1, "HEAD_NUM": 1, "SITE_NUM": 1, "TEST_FLG": 0,
                     "PARM_FLG": 0, "RESULT": 1.0, "TEST_TXT": "", "ALARM_ID": "",
                     "OPT_FLAG": 0x0E, "RES_SCAL": 0, "LLM_SCAL": 0, "HLM_SCAL": 0,
                     "LO_LIMIT": float(i), "HI_LIMIT": 100.0 + i, "UNITS": "V"})
            for i in range(100)]
    data = b"".join(W.encode(n, f) for n, f in [("FAR", {}), *recs, ("MRR", {})])
    mapper = RecordMapper("t")
    dec = StdfDecoder(types=RecordMapper.TYPES)
    dec.feed(data)
    out = [r for row in dec.rows() for r in mapper.map_row(row, 0.0)]
    assert mapper.tests._ptr_plans is None
    assert exact(out + mapper.close(0.0)) == exact(by_dicts(data))
    assert [r.lo_limit for r in out[:3]] == [0.0, 1.0, 2.0]  # the first PTR's stays


def test_a_ptr_row_without_its_test_number_is_skipped_and_counted() -> None:
    """(It was a FormatError, the file abandoned: tests/test_stdf_cut_records.py.)"""
    mapper = RecordMapper("t")
    assert mapper.map_row(("PTR", 42, ()), 0.0) == []
    assert mapper.cut_short == {"PTR": 1}


def test_a_repeat_whose_limit_is_minus_zero_keeps_its_sign() -> None:
    """0.0 and -0.0 are equal keys of the limit plans: the repeat's own values still come
    from its own row."""
    fields = {"TEST_NUM": 1, "HEAD_NUM": 1, "SITE_NUM": 1, "TEST_FLG": 0, "PARM_FLG": 0,
              "RESULT": 1.0, "TEST_TXT": "", "ALARM_ID": "", "OPT_FLAG": 0x0E,
              "RES_SCAL": 0, "LLM_SCAL": 0, "HLM_SCAL": 0, "HI_LIMIT": 5.0, "UNITS": "V"}
    recs = [("PTR", {**fields, "LO_LIMIT": lo}) for lo in (0.0, -0.0, 0.0)]
    data = b"".join(W.encode(n, f) for n, f in [("FAR", {}), *recs, ("MRR", {})])
    out = by_rows(data)
    assert [math.copysign(1, r.lo_limit) for r in out[:3]] == [1, -1, 1]
    assert exact(out) == exact(by_dicts(data))
