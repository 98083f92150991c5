"""Decoded STDF records -> edgegw records (edgegw.stdf.mapping), sans-IO."""

from __future__ import annotations

from collections import Counter
from typing import Any

from shared_data import stdf_bytes

from edgegw.records import (
    BinSummary,
    FunctionalResult,
    LotEnd,
    LotStart,
    MultiPinResult,
    ParametricResult,
    PartCount,
    PartResult,
    RawRecord,
    WaferEnd,
    WaferStart,
)
from edgegw.stdf import RecordMapper, StdfDecoder, StdfWriter

W = StdfWriter()


def ptr(num: int, site: int, result: float, flg: int = 0, **more: Any) -> tuple[str, dict]:
    return "PTR", {"TEST_NUM": num, "HEAD_NUM": 1, "SITE_NUM": site, "TEST_FLG": flg,
                   "PARM_FLG": 0, "RESULT": result, **more}


def prr(site: int, part_id: str, flg: int = 0, hard: int = 1, soft: int = 1, x: int = 0,
        y: int = 0, test_t: int = 0) -> tuple[str, dict]:
    return "PRR", {"HEAD_NUM": 1, "SITE_NUM": site, "PART_FLG": flg, "NUM_TEST": 1,
                   "HARD_BIN": hard, "SOFT_BIN": soft, "X_COORD": x, "Y_COORD": y,
                   "TEST_T": test_t, "PART_ID": part_id}


def pir(site: int) -> tuple[str, dict]:
    return "PIR", {"HEAD_NUM": 1, "SITE_NUM": site}


HEADER = [("FAR", {"CPU_TYPE": 2, "STDF_VER": 4}),
          ("MIR", {"SETUP_T": 10, "START_T": 11, "STAT_NUM": 3, "MODE_COD": "P",
                   "RTST_COD": " ", "PROT_COD": " ", "BURN_TIM": 65535, "CMOD_COD": " ",
                   "LOT_ID": "LOTA", "PART_TYP": "DEV", "NODE_NAM": "ate7", "TSTR_TYP": "93K",
                   "JOB_NAM": "prog", "JOB_REV": "", "SBLOT_ID": "S1"}),
          ("WIR", {"HEAD_NUM": 1, "SITE_GRP": 255, "START_T": 12, "WAFER_ID": "W7"})]
FIRST_DEFAULTS = {"TEST_TXT": "IDD", "ALARM_ID": "", "OPT_FLAG": 0x0E, "RES_SCAL": 0,
                  "LLM_SCAL": 0, "HLM_SCAL": 0, "LO_LIMIT": 1.0, "HI_LIMIT": 5.0, "UNITS": "mA"}


def mapped(recs: list[tuple[str, dict]], **kw: Any) -> list[Any]:
    data = b"".join(W.encode(name, fields) for name, fields in recs)
    dec = StdfDecoder()
    dec.feed(data)
    mapper = RecordMapper("ate7", **kw)
    out = []
    for rec in dec.records():
        out.extend(mapper.map(rec, 100.0))
    return out + mapper.close(100.0)


def of(records: list[Any], cls: type) -> list[Any]:
    return [r for r in records if isinstance(r, cls)]


def test_lot_and_wafer_start_and_end_carry_their_identifiers() -> None:
    out = mapped([*HEADER, ("WRR", {"HEAD_NUM": 1, "SITE_GRP": 255, "FINISH_T": 20,
                                    "PART_CNT": 3, "RTST_CNT": 4294967295, "ABRT_CNT": 0,
                                    "GOOD_CNT": 2, "FUNC_CNT": 4294967295, "WAFER_ID": "W7"}),
                  ("MRR", {"FINISH_T": 21, "DISP_COD": "Q", "USR_DESC": "done"})])
    assert out == [
        LotStart("ate7", 100.0, "LOTA", "DEV", "ate7", "93K", "prog", 11,
                 {"SETUP_T": 10, "STAT_NUM": 3, "MODE_COD": "P", "BURN_TIM": 65535,
                  "SBLOT_ID": "S1"}),
        WaferStart("ate7", 100.0, "LOTA", "W7", 1, 12),
        WaferEnd("ate7", 100.0, "LOTA", "W7", 1, 20, 3, 2),
        LotEnd("ate7", 100.0, "LOTA", 21, {"DISP_COD": "Q", "USR_DESC": "done"}),
    ]


def test_interleaved_sites_attach_results_to_the_open_part_of_their_site() -> None:
    out = mapped([*HEADER, pir(0), pir(1), pir(2),
                  ptr(10, 0, 1.5, **FIRST_DEFAULTS), ptr(10, 1, 2.5), ptr(10, 2, 9.0, 0x80),
                  ("FTR", {"TEST_NUM": 20, "HEAD_NUM": 1, "SITE_NUM": 1, "TEST_FLG": 0x80,
                           "OPT_FLAG": 0x37, "CYCL_CNT": 0, "REL_VADR": 0, "REPT_CNT": 0,
                           "NUM_FAIL": 3, "TEST_TXT": "FUNC"}),
                  prr(1, "B", flg=0x08, hard=3, soft=30),  # sites finish in any order
                  prr(2, "C", flg=0x08, hard=4, soft=40), prr(0, "A")])
    results = [(type(r).__name__, r.site, r.part_id) for r in out
               if isinstance(r, (ParametricResult, FunctionalResult, PartResult))]
    assert results == [("ParametricResult", 1, "B"), ("FunctionalResult", 1, "B"),
                       ("PartResult", 1, "B"),
                       ("ParametricResult", 2, "C"), ("PartResult", 2, "C"),
                       ("ParametricResult", 0, "A"), ("PartResult", 0, "A")]
    (ftr,) = of(out, FunctionalResult)
    assert (ftr.test_num, ftr.test_txt, ftr.passed, ftr.fail_count) == (20, "FUNC", False, 3)
    assert [p.wafer_id for p in of(out, PartResult)] == ["W7"] * 3


def test_ptr_limits_and_units_come_from_the_first_record_of_the_test() -> None:
    out = mapped([*HEADER, pir(1),
                  ptr(10, 1, 2.0, **FIRST_DEFAULTS),
                  ptr(10, 1, 0.5, 0x80),  # truncated after RESULT: the defaults apply
                  # OPT_FLAG bit 4: LO_LIMIT invalid, use the default; its own HI_LIMIT holds
                  ptr(10, 1, 6.0, 0x80, TEST_TXT="", ALARM_ID="", OPT_FLAG=0x12,
                      RES_SCAL=0, LLM_SCAL=0, HLM_SCAL=0, LO_LIMIT=-99.0, HI_LIMIT=5.5),
                  ptr(11, 1, 3.0, 0x40, TEST_TXT="VREF", ALARM_ID="", OPT_FLAG=0xCE),
                  ptr(12, 1, 7.0, 0x02),  # result invalid, no defaults ever given
                  prr(1, "P1")])
    got = [(r.test_num, r.test_txt, r.value, r.lo_limit, r.hi_limit, r.units, r.passed)
           for r in of(out, ParametricResult)]
    assert got == [
        (10, "IDD", 2.0, 1.0, 5.0, "mA", True),
        (10, "IDD", 0.5, 1.0, 5.0, "mA", False),
        (10, "IDD", 6.0, 1.0, 5.5, "mA", False),
        (11, "VREF", 3.0, None, None, "", None),  # OPT_FLAG bits 6/7: no limits at all
        (12, "", None, None, None, "", True),
    ]


def test_part_flags_missing_values_and_retests() -> None:
    out = mapped([*HEADER,
                  pir(1), prr(1, "1", flg=0x08, hard=5, soft=65535, x=-32768, y=-32768),
                  pir(1), prr(1, "", flg=0x02 | 0x08, hard=5, soft=50, x=3, y=4, test_t=250),
                  pir(1), prr(1, "1", flg=0x01, hard=1, soft=1, x=3, y=4),
                  pir(1), prr(1, "9", flg=0x10 | 0x04, hard=9, soft=9)])
    parts = of(out, PartResult)
    assert [(p.part_id, p.x, p.y, p.soft_bin, p.passed, p.supersedes, p.test_time_ms)
            for p in parts] == [
        ("1", None, None, None, False, False, None),
        ("2", 3, 4, 50, False, True, 250),  # no PART_ID: its ordinal in the file
        ("1", 3, 4, 1, True, True, None),
        ("9", 0, 0, 9, None, False, None),  # pass/fail invalid
    ]
    assert [p.part_flag for p in parts] == [0x08, 0x0A, 0x01, 0x14]


def test_multi_pin_results_and_the_testers_own_summaries() -> None:
    out = mapped([*HEADER, pir(0),
                  ("MPR", {"TEST_NUM": 30, "HEAD_NUM": 1, "SITE_NUM": 0, "TEST_FLG": 0,
                           "PARM_FLG": 0, "RTN_ICNT": 0, "RSLT_CNT": 3,
                           "RTN_RSLT": [0.5, 0.25, 0.75], "TEST_TXT": "LEAK", "ALARM_ID": "",
                           "OPT_FLAG": 0x8E, "RES_SCAL": 0, "LLM_SCAL": 0, "HLM_SCAL": 0,
                           "LO_LIMIT": 0.0, "HI_LIMIT": 0.0, "START_IN": 0.0,
                           "INCR_IN": 0.0, "UNITS": "uA"}),
                  prr(0, "A"),
                  ("HBR", {"HEAD_NUM": 255, "SITE_NUM": 0, "HBIN_NUM": 1, "HBIN_CNT": 1,
                           "HBIN_PF": "P", "HBIN_NAM": "GOOD"}),
                  ("SBR", {"HEAD_NUM": 1, "SITE_NUM": 0, "SBIN_NUM": 7, "SBIN_CNT": 0,
                           "SBIN_PF": "F"}),
                  ("PCR", {"HEAD_NUM": 255, "SITE_NUM": 0, "PART_CNT": 1,
                           "RTST_CNT": 4294967295, "ABRT_CNT": 0, "GOOD_CNT": 1})])
    (mpr,) = of(out, MultiPinResult)
    assert (mpr.part_id, mpr.values, mpr.lo_limit, mpr.hi_limit, mpr.units, mpr.passed) == (
        "A", [0.5, 0.25, 0.75], 0.0, None, "uA", True)
    assert of(out, BinSummary) == [
        BinSummary("ate7", 100.0, "LOTA", "H", 255, 0, 1, 1, "P", "GOOD"),
        BinSummary("ate7", 100.0, "LOTA", "S", 1, 0, 7, 0, "F", ""),
    ]
    assert of(out, PartCount) == [PartCount("ate7", 100.0, "LOTA", 255, 0, 1, None, 0, 1, None)]


def test_results_of_a_part_that_never_ends_are_not_lost() -> None:
    out = mapped([*HEADER, pir(0), ptr(10, 0, 2.0, **FIRST_DEFAULTS),
                  ptr(10, 3, 2.0)])  # site 3 has no PIR: it waits for a PRR all the same
    assert [(r.site, r.part_id) for r in of(out, ParametricResult)] == [(0, ""), (3, "")]


def test_forward_raw_emits_every_record_as_decoded() -> None:
    recs = [*HEADER, pir(0), ptr(10, 0, 2.0, **FIRST_DEFAULTS), prr(0, "A"),
            ("DTR", {"TEXT_DAT": "hello"}), ("MRR", {"FINISH_T": 3})]
    out = mapped(recs, forward_raw=True)
    raw = of(out, RawRecord)
    assert [r.rec for r in raw] == [name for name, _ in recs]
    assert raw[-2] == RawRecord("ate7", 100.0, "stdf", "DTR", {"TEXT_DAT": "hello"})
    assert len(out) - len(raw) == len(mapped(recs))


def map_file(data: bytes) -> list[Any]:
    dec = StdfDecoder()
    dec.feed(data)
    mapper = RecordMapper("real")
    out = []
    for rec in dec.records():
        out.extend(mapper.map(rec, 0.0))
    return out + mapper.close(0.0)


def test_the_real_wafer_sort_file_agrees_with_its_own_summaries() -> None:
    out = map_file(stdf_bytes("galaxy-a530-lot2.stdf.gz"))
    parts = of(out, PartResult)
    assert len(parts) == 1569 and not any(p.supersedes for p in parts)
    (pcr,) = of(out, PartCount)
    assert pcr.head == 255 and pcr.part_count == len(parts)
    for kind, attr in (("H", "hard_bin"), ("S", "soft_bin")):
        own = {b.bin_num: b.count for b in of(out, BinSummary)
               if b.bin_kind == kind and b.head == 255}
        assert Counter(getattr(p, attr) for p in parts) == own
    good = sum(p.passed for p in parts)
    assert good == 1389 == next(b.count for b in of(out, BinSummary) if b.bin_num == 1)
    (lot,) = of(out, LotStart)
    (wafer,) = of(out, WaferEnd)
    assert (lot.lot_id, lot.tester_type, wafer.wafer_id, wafer.part_count) == (
        "GAL-LOT", "A530", "GAL-LOT-02", 1569)
    assert {(p.x, p.y) for p in parts} and all(p.x is not None for p in parts)
    assert len(of(out, ParametricResult)) == 52403


def test_the_real_two_site_file_agrees_with_its_per_site_summaries() -> None:
    out = map_file(stdf_bytes("metis-d10-2site.std"))
    parts = of(out, PartResult)
    assert Counter(p.site for p in parts) == {0: 11, 1: 11}
    for kind, attr in (("H", "hard_bin"), ("S", "soft_bin")):
        for site in (0, 1):
            own = {b.bin_num: b.count for b in of(out, BinSummary)
                   if b.bin_kind == kind and b.head == 0 and b.site == site and b.count}
            assert Counter(getattr(p, attr) for p in parts if p.site == site) == own
    counts = {(c.head, c.site): c.part_count for c in of(out, PartCount)}
    assert counts == {(0, 0): 11, (0, 1): 11, (255, 0): 22}
    # every PTR landed on a part of its own site
    by_part = {(p.site, p.part_id) for p in parts}
    assert all((r.site, r.part_id) in by_part for r in of(out, ParametricResult))
