"""TestState: PTR/MPR default state (the first record of a test number carries limits,
scales and units; OPT_FLAG says which of a later record's own values are valid) and the
open part per head/site that results attach to."""

from __future__ import annotations

from typing import Any

from edgegw.stdf import TestState, part_passed, part_supersedes, result_passed


def ptr(test: int, site: int = 0, result: float = 1.0, **tail: Any) -> dict[str, Any]:
    return {"TEST_NUM": test, "HEAD_NUM": 1, "SITE_NUM": site, "TEST_FLG": 0,
            "PARM_FLG": 0, "RESULT": result, "TEST_TXT": "", "ALARM_ID": "", **tail}


FIRST = {"OPT_FLAG": 0x02, "RES_SCAL": -3, "LLM_SCAL": -3, "HLM_SCAL": -3,
         "LO_LIMIT": 0.5, "HI_LIMIT": 1.5, "UNITS": "V", "C_RESFMT": "%7.3f",
         "C_LLMFMT": "", "C_HLMFMT": "", "LO_SPEC": 0.0, "HI_SPEC": 2.0}


def test_a_truncated_ptr_takes_limits_scales_and_units_from_the_first_of_its_test() -> None:
    state = TestState()
    first = state.resolve_ptr(ptr(10, **FIRST))
    assert (first["LO_LIMIT"], first["HI_LIMIT"], first["UNITS"]) == (0.5, 1.5, "V")
    later = state.resolve_ptr(ptr(10, result=0.7))
    assert later["RESULT"] == 0.7
    assert (later["LO_LIMIT"], later["HI_LIMIT"], later["UNITS"], later["RES_SCAL"],
            later["C_RESFMT"], later["LO_SPEC"], later["HI_SPEC"]) == (
        0.5, 1.5, "V", -3, "%7.3f", 0.0, 2.0)
    # another test number has its own (here: none yet)
    other = state.resolve_ptr(ptr(11))
    assert other["LO_LIMIT"] is None and other["UNITS"] is None


def test_opt_flag_invalid_bits_fall_back_to_the_default_and_no_limit_bits_mean_none() -> None:
    state = TestState()
    state.resolve_ptr(ptr(10, **FIRST))
    # bits 4/5: this record's LO/HI limits are invalid -> use the default
    r = state.resolve_ptr(ptr(10, OPT_FLAG=0x30 | 0x01, RES_SCAL=9, LLM_SCAL=9, HLM_SCAL=9,
                              LO_LIMIT=99.0, HI_LIMIT=99.0))
    assert (r["LO_LIMIT"], r["HI_LIMIT"], r["RES_SCAL"]) == (0.5, 1.5, -3)
    # valid own limits win for this record and do not change the default
    r = state.resolve_ptr(ptr(10, OPT_FLAG=0x00, RES_SCAL=0, LLM_SCAL=0, HLM_SCAL=0,
                              LO_LIMIT=0.9, HI_LIMIT=1.1))
    assert (r["LO_LIMIT"], r["HI_LIMIT"]) == (0.9, 1.1)
    assert state.resolve_ptr(ptr(10))["LO_LIMIT"] == 0.5
    # bits 6/7: no low / no high limit at all; bits 2/3: no spec limits
    r = state.resolve_ptr(ptr(10, OPT_FLAG=0xC0 | 0x0C, RES_SCAL=0, LLM_SCAL=0,
                              HLM_SCAL=0, LO_LIMIT=0.0, HI_LIMIT=0.0))
    assert r["LO_LIMIT"] is None and r["HI_LIMIT"] is None
    assert r["LO_SPEC"] is None and r["HI_SPEC"] is None


def test_per_site_first_records_give_per_site_defaults() -> None:
    state = TestState()
    state.resolve_ptr(ptr(10, site=0, **FIRST))
    state.resolve_ptr(ptr(10, site=1, **{**FIRST, "LO_LIMIT": 0.6, "HI_LIMIT": 1.6}))
    assert state.resolve_ptr(ptr(10, site=0))["LO_LIMIT"] == 0.5
    assert state.resolve_ptr(ptr(10, site=1))["HI_LIMIT"] == 1.6
    # a site that never carried its own falls back to the test's first record
    assert state.resolve_ptr(ptr(10, site=2))["LO_LIMIT"] == 0.5


def test_mpr_defaults_include_its_input_conditions() -> None:
    state = TestState()
    mpr = {"TEST_NUM": 5, "HEAD_NUM": 1, "SITE_NUM": 0, "TEST_FLG": 0, "PARM_FLG": 0,
           "RTN_ICNT": 2, "RSLT_CNT": 2, "RTN_STAT": [0, 0], "RTN_RSLT": [1.0, 2.0],
           "TEST_TXT": "", "ALARM_ID": ""}
    state.resolve_mpr({**mpr, **{k: v for k, v in FIRST.items() if "SPEC" not in k},
                       "START_IN": 0.1, "INCR_IN": 0.2, "RTN_INDX": [3, 4],
                       "UNITS_IN": "mA"})
    r = state.resolve_mpr(mpr)
    assert (r["START_IN"], r["INCR_IN"], r["RTN_INDX"], r["UNITS_IN"], r["HI_LIMIT"]) == (
        0.1, 0.2, [3, 4], "mA", 1.5)


def test_results_attach_to_the_open_part_of_their_head_and_site() -> None:
    state = TestState()
    a = state.open_part({"HEAD_NUM": 1, "SITE_NUM": 0}, offset=100)
    b = state.open_part({"HEAD_NUM": 1, "SITE_NUM": 1}, offset=104)
    assert state.part_for(ptr(1, site=1)) is b
    assert state.part_for({**ptr(1, site=0), "TEST_FLG": 0x80}) is a
    assert state.part_for(ptr(2, site=0)) is a
    assert (a.results, a.failed, b.results, b.failed) == (2, 1, 1, 0)
    assert state.part_for(ptr(3, site=7)) is None and state.orphan_results == 1
    assert state.close_part({"HEAD_NUM": 1, "SITE_NUM": 0}) is a
    assert state.part_for(ptr(4, site=0)) is None
    assert list(state.open_parts) == [(1, 1)]
    state.open_part({"HEAD_NUM": 1, "SITE_NUM": 1})
    assert state.unclosed_parts == 1


def test_observe_feeds_both_kinds_of_state() -> None:
    state = TestState()
    state.observe("PIR", {"HEAD_NUM": 1, "SITE_NUM": 0}, 10)
    resolved = state.observe("PTR", ptr(10, **FIRST))
    assert resolved["UNITS"] == "V"
    assert state.observe("PTR", ptr(10))["UNITS"] == "V"
    state.observe("PRR", {"HEAD_NUM": 1, "SITE_NUM": 0})
    assert state.open_parts == {} and state.parts_started == 1


def test_flag_meanings() -> None:
    assert result_passed(0) is True and result_passed(0x80) is False
    assert result_passed(0x40 | 0x80) is None
    assert part_passed(0) is True and part_passed(0x08) is False and part_passed(0x10) is None
    assert part_supersedes(0x01) and part_supersedes(0x02) and not part_supersedes(0x0C)
