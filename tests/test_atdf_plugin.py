"""The ATDF example plugin (plugins/edgegw-atdf): a tester format installed as a package."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest
import trio

from edgegw.formats import FormatError
from edgegw.metrics import Metrics
from edgegw.records import (
    BinSummary,
    LotEnd,
    MultiPinResult,
    ParametricResult,
    PartCount,
    PartResult,
)
from edgegw.sources import SourceContext, TailConfig, TailSource, get_format
from edgegw.stdf import RecordMapper, StdfDecoder, StdfWriter
from edgegw.testing import check_chunkings, check_replays, check_truncations, run_tail

if importlib.util.find_spec("edgegw_atdf") is None:
    pytest.fail("the ATDF example plugin is not installed: pip install -e plugins/edgegw-atdf",
                pytrace=False)

# Two sites interleaved; the first PTR of test 100 carries its limits and units, the next
# does not; the part on site 2 has no X/Y and no soft bin; a retest by coordinates; a
# record continued on the next line; a multi-pin test (MPR) whose first record gives its
# limits, units and pin indexes and whose next inherits them.
ATDF_TEXT = """\
FAR:A|4|2|U
MIR:LOT42|DEV-7|sort.prg|node1|J750|10:08:20 23-SEP-2024|10:08:25 23-SEP-2024|joe|P|1
WIR:1|10:09:00 23-SEP-2024|255|LOT42-W01
PIR:1|1
PIR:1|2
PTR:100|1|1|1.25|P||VDD_IDD|||mA|1.0|2.0
PTR:100|1|2|2.5|F||
 VDD_IDD
MPR:300|1|1|0,1|0.5,0.75|P||IDDQ_PINS|||uA|0.125|1|||||1,2
MPR:300|1|2|0,f|0.25,1.5|F|H|IDDQ_PINS
FTR:200|1|1|P||pat1
PRR:1|1|P1|2|P|1|1|3|4|||120
PRR:1|2|P2|1|F|5||||C
WRR:1|10:10:00 23-SEP-2024|2|LOT42-W01|255||0|1
HBR:255|0|1|1|P|GOOD
SBR:255|0|1|1|P|GOOD
PCR:255|0|2|1|0|1
MRR:10:11:00 23-SEP-2024
"""


def stdf_equivalent() -> bytes:
    """The same content as ATDF_TEXT, written as STDF (fields in STDF order)."""
    w = StdfWriter()
    start = 1727086105
    recs: list[tuple[str, dict[str, Any]]] = [
        ("FAR", {"CPU_TYPE": 2, "STDF_VER": 4}),
        ("MIR", {"SETUP_T": start - 5, "START_T": start, "STAT_NUM": 1, "MODE_COD": "P",
                 "RTST_COD": " ", "PROT_COD": " ", "BURN_TIM": 65535, "CMOD_COD": " ",
                 "LOT_ID": "LOT42", "PART_TYP": "DEV-7", "NODE_NAM": "node1",
                 "TSTR_TYP": "J750", "JOB_NAM": "sort.prg", "JOB_REV": "", "SBLOT_ID": "",
                 "OPER_NAM": "joe"}),
        ("WIR", {"HEAD_NUM": 1, "SITE_GRP": 255, "START_T": start + 35,
                 "WAFER_ID": "LOT42-W01"}),
        ("PIR", {"HEAD_NUM": 1, "SITE_NUM": 1}),
        ("PIR", {"HEAD_NUM": 1, "SITE_NUM": 2}),
        ("PTR", {"TEST_NUM": 100, "HEAD_NUM": 1, "SITE_NUM": 1, "TEST_FLG": 0,
                 "PARM_FLG": 0, "RESULT": 1.25, "TEST_TXT": "VDD_IDD", "ALARM_ID": "",
                 "OPT_FLAG": 0x02 | 0x01 | 0x04 | 0x08, "RES_SCAL": 0, "LLM_SCAL": 0,
                 "HLM_SCAL": 0, "LO_LIMIT": 1.0, "HI_LIMIT": 2.0, "UNITS": "mA"}),
        ("PTR", {"TEST_NUM": 100, "HEAD_NUM": 1, "SITE_NUM": 2, "TEST_FLG": 0x80,
                 "PARM_FLG": 0, "RESULT": 2.5, "TEST_TXT": "VDD_IDD"}),
        ("MPR", {"TEST_NUM": 300, "HEAD_NUM": 1, "SITE_NUM": 1, "TEST_FLG": 0,
                 "PARM_FLG": 0, "RTN_ICNT": 2, "RSLT_CNT": 2, "RTN_STAT": [0, 1],
                 "RTN_RSLT": [0.5, 0.75], "TEST_TXT": "IDDQ_PINS", "ALARM_ID": "",
                 "OPT_FLAG": 0x02 | 0x01 | 0x04 | 0x08, "RES_SCAL": 0, "LLM_SCAL": 0,
                 "HLM_SCAL": 0, "LO_LIMIT": 0.125, "HI_LIMIT": 1.0, "START_IN": 0.0,
                 "INCR_IN": 0.0, "RTN_INDX": [1, 2], "UNITS": "uA"}),
        ("MPR", {"TEST_NUM": 300, "HEAD_NUM": 1, "SITE_NUM": 2, "TEST_FLG": 0x80,
                 "PARM_FLG": 0x08, "RTN_ICNT": 2, "RSLT_CNT": 2, "RTN_STAT": [0, 15],
                 "RTN_RSLT": [0.25, 1.5], "TEST_TXT": "IDDQ_PINS"}),
        ("FTR", {"TEST_NUM": 200, "HEAD_NUM": 1, "SITE_NUM": 1, "TEST_FLG": 0,
                 "OPT_FLAG": 0x3F}),
        ("PRR", {"HEAD_NUM": 1, "SITE_NUM": 1, "PART_FLG": 0, "NUM_TEST": 2, "HARD_BIN": 1,
                 "SOFT_BIN": 1, "X_COORD": 3, "Y_COORD": 4, "TEST_T": 120, "PART_ID": "P1"}),
        ("PRR", {"HEAD_NUM": 1, "SITE_NUM": 2, "PART_FLG": 0x0A, "NUM_TEST": 1,
                 "HARD_BIN": 5, "SOFT_BIN": 65535, "X_COORD": -32768, "Y_COORD": -32768,
                 "TEST_T": 0, "PART_ID": "P2"}),
        ("WRR", {"HEAD_NUM": 1, "SITE_GRP": 255, "FINISH_T": start + 95, "PART_CNT": 2,
                 "RTST_CNT": 4294967295, "ABRT_CNT": 0, "GOOD_CNT": 1,
                 "FUNC_CNT": 4294967295, "WAFER_ID": "LOT42-W01"}),
        ("HBR", {"HEAD_NUM": 255, "SITE_NUM": 0, "HBIN_NUM": 1, "HBIN_CNT": 1, "HBIN_PF": "P",
                 "HBIN_NAM": "GOOD"}),
        ("SBR", {"HEAD_NUM": 255, "SITE_NUM": 0, "SBIN_NUM": 1, "SBIN_CNT": 1, "SBIN_PF": "P",
                 "SBIN_NAM": "GOOD"}),
        ("PCR", {"HEAD_NUM": 255, "SITE_NUM": 0, "PART_CNT": 2, "RTST_CNT": 1, "ABRT_CNT": 0,
                 "GOOD_CNT": 1}),
        ("MRR", {"FINISH_T": start + 155}),
    ]
    return b"".join(w.encode(name, fields) for name, fields in recs)


def map_all(records: Any) -> list[Any]:
    mapper = RecordMapper("t")
    out = []
    for rec in records:
        out.extend(mapper.map(rec, 0.0))
    return out + mapper.close(0.0)


def parse_atdf(data: bytes, chunk: int | None = None) -> list[Any]:
    parser = get_format("atdf").new_parser()
    out: list[Any] = []
    step = chunk or len(data)
    for i in range(0, len(data), step):
        parser.feed(data[i:i + step])
        out.extend(parser.records())
    out.extend(parser.close())
    assert parser.position == len(data)
    return out


def test_atdf_maps_to_the_same_edgegw_records_as_the_equivalent_stdf() -> None:
    dec = StdfDecoder()
    dec.feed(stdf_equivalent())
    from_stdf = map_all(dec.records())
    from_atdf = map_all(parse_atdf(ATDF_TEXT.encode()))
    assert from_atdf == from_stdf
    ptr1, ptr2 = [r for r in from_atdf if isinstance(r, ParametricResult)]
    assert (ptr1.part_id, ptr1.value, ptr1.passed) == ("P1", 1.25, True)
    assert (ptr2.part_id, ptr2.lo_limit, ptr2.hi_limit, ptr2.units, ptr2.passed) == (
        "P2", 1.0, 2.0, "mA", False)  # defaults from the first PTR of test 100
    mpr1, mpr2 = [r for r in from_atdf if isinstance(r, MultiPinResult)]
    assert (mpr1.part_id, mpr1.values, mpr1.passed) == ("P1", [0.5, 0.75], True)
    assert (mpr2.part_id, mpr2.values, mpr2.lo_limit, mpr2.hi_limit, mpr2.units,
            mpr2.passed, mpr2.parm_flag) == ("P2", [0.25, 1.5], 0.125, 1.0, "uA", False, 0x08)
    p1, p2 = [r for r in from_atdf if isinstance(r, PartResult)]
    assert (p1.x, p1.y, p1.test_time_ms, p1.passed, p1.supersedes) == (3, 4, 120, True, False)
    assert (p2.x, p2.y, p2.soft_bin, p2.passed, p2.supersedes) == (None, None, None, False, True)


def after_a_newline(data: bytes, cut: int) -> bool:
    """ATDF: a cut just after a newline leaves whole lines (the record may or may not
    have had continuation lines after them)."""
    return data[cut - 1:cut] == b"\n"


def test_any_chunking_gives_the_same_records_with_their_offsets() -> None:
    data = ATDF_TEXT.encode()
    whole = check_chunkings(get_format("atdf"), data)
    lines = data.split(b"\n")
    starts = [sum(len(x) + 1 for x in lines[:i]) for i in range(len(lines))
              if lines[i] and not lines[i].startswith(b" ")]
    assert [r.offset for r in whole] == starts
    assert [r.name for r in whole][:6] == ["FAR", "MIR", "WIR", "PIR", "PIR", "PTR"]


def test_a_file_cut_anywhere_inside_a_line_is_a_format_error_never_a_cut_value() -> None:
    data = ATDF_TEXT.encode()
    assert check_truncations(get_format("atdf"), data, may_end=after_a_newline) == len(data)
    # the case that put a wrong value on the hub: a last line cut inside its number
    text = b"FAR:A|4|2|U\nPIR:1|1\nPTR:7|1|1|645.65e-12|P||idds\n"
    cut = text[:text.index(b"645.6") + len(b"645.6")]
    parser = get_format("atdf").new_parser()
    parser.feed(cut)
    got = list(parser.records())
    with pytest.raises(FormatError, match="ends inside a record") as err:
        got.extend(parser.close())
    assert [r.name for r in got] == ["FAR", "PIR"]
    assert err.value.offset == text.index(b"PTR:")
    assert parser.position == err.value.offset  # the tail's checkpoint stays before it


def test_an_mrr_ends_at_its_line_however_the_bytes_arrive() -> None:
    """MRR is complete at the end of its line (a tail ends the lot there, without waiting
    for a next line that never comes); a line after it that starts with a space is an
    error, not its continuation -- fed at once or a byte at a time (found by the fuzz test:
    fed at once the MRR took the line as its continuation and was never yielded)."""
    data = b"FAR:A|4|2|U\nMRR:\n 10:11:00 23-SEP-2024\n"
    for chunk in (None, 1):
        with pytest.raises(FormatError, match="no 'XXX:' name") as err:
            parse_atdf(data, chunk)
        assert err.value.offset == data.index(b" 10:")
    parser = get_format("atdf").new_parser()
    parser.feed(data[:data.index(b" 10:")])
    assert [r.name for r in parser.records()] == ["FAR", "MRR"]


def test_a_record_is_held_until_it_cannot_be_continued() -> None:
    parser = get_format("atdf").new_parser()
    parser.feed(b"FAR:A|4|2|U\nPTR:100|1|1|1.5|P||VDD\n")
    assert [r.name for r in parser.records()] == ["FAR"]  # the PTR may still continue
    assert parser.position == len(b"FAR:A|4|2|U\n")
    parser.feed(b" _A\nPIR:1|1\n")
    (ptr,) = parser.records()
    assert ptr.fields["TEST_TXT"] == "VDD_A" and ptr.fields["TEST_FLG"] == 0


def test_flag_letters_and_times_become_the_stdf_values() -> None:
    parser = get_format("atdf").new_parser()
    parser.feed(b"FAR:A|4|2|U\n"
                b"WIR:1|9:5:7 3-feb-2025|255|W2\n"
                b"PTR:7|1|2|3.5|A|AUTNX SDOHL|VDD||LH|V|1|4\n"
                b"PTR:7|1|2||||\n"
                b"FTR:9|1|2|F|T|pat|ts1|100|2|1|5\n"
                b"PRR:1|2|P7|3||5|5|1|2|I|Y|40\n")
    _far, wir, ptr, empty, ftr, prr = parser.close()
    assert wir.fields["START_T"] == 1738573507 and wir.fields["WAFER_ID"] == "W2"
    assert ptr.fields["TEST_FLG"] == 0x01 | 0x04 | 0x08 | 0x10 | 0x20
    assert ptr.fields["PARM_FLG"] == 0x1F | 0x20 | 0x40 | 0x80  # alarms, alternate, L/H
    assert ptr.fields["OPT_FLAG"] == 0x02 | 0x01 | 0x04 | 0x08  # no scale, no spec limits
    assert (ptr.fields["LO_LIMIT"], ptr.fields["HI_LIMIT"], ptr.fields["UNITS"]) == (1, 4, "V")
    assert empty.fields["TEST_FLG"] == 0x40 | 0x02  # no pass/fail indication, no result
    assert (ftr.fields["TEST_FLG"], ftr.fields["NUM_FAIL"], ftr.fields["VECT_NAM"]) == (
        0x80 | 0x08, 5, "pat")
    assert ftr.fields["OPT_FLAG"] == 0x10 | 0x20  # no X/Y fail address, no vector offset
    assert prr.fields["PART_FLG"] == 0x10 | 0x01 | 0x04  # no P/F, supersedes by id, abort
    assert (prr.fields["TEST_T"], prr.fields["SOFT_BIN"]) == (40, 5)


# The ATDF specification's own sample record of each type the plugin converts (its
# "Sample:" lines; the MIR's second line a continuation), as a file.
SPEC_SAMPLES = """\
FAR:A|4|2|U
ATR:0:03:00 3-SEP-1992|bin_filter 7,9-12
MIR:A3002B|80386|80386HOT|akbar|J971|8:14:59 23-JUL-1992|8:23:02 23-JUL-1992|Sandy|P|1|2B|\
HOT|N|3.1.2|IG900|2.4|||300|100||
 386_data.txt|ceramic|386|wk23||MPU2||||||386HOT|3S|||A42136S|JOAN_S
SDR:2|4|5,6,7,8|Delta Flex|D511||B101|17
WCR:D|R|D|5|.3|.25|1|23|19
WIR:1|8:23:02 23-JUL-1992|2
PIR:2|1
PTR:23|2|1|997.3|F|AOH|Check 2nd layer|||A|-1.7|45.2| %9.4f|%7.2f|%7.2f|-1.75|45.25|3|3|4
MPR:143|2|4||001.3,0009.6,001.5|F|D|||LH|mA|001.0|002.0| 4.5|.1|V|3,4,5|%6.1f|%6.1f|%6.1f|\
0009.75|002.25
FTR:27|2|1|P||CHECKERBOARD|A1|5|16|2|3|6|3|0|10,2,8,12|0,1,1,4|4,5,6,7|0,0,0,0|8|DRV|\
Check Driver||||2|2,3,4,6
PRR:2|1|13|78|F|0|17|-2|7|||644|Device at edge of wafer|F13C20
WRR:1|11:02:42 23-JUL-1992|492|W01|3|102|214|2|131|MOS-4|F54|S3-1|Glass buildup on \
prober|Yield alarm on wafer W01
TSR:2|2|600|Leakage|P|413|92|3||DC_TESTS|0.005|0.1|7.2|1280.3|4329.5
HBR:2|1|6|212|F|SHORT
HBR:||1|1346|P|PASSED
SBR:1|2|74|14|F|NOTIFY PRODUCT ENG
SBR:||1|1346|P|PASSED
PCR:2|1|497|5|11|212|481
PCR:||3976|54|76|2311|3809
MRR:12:17:12 23-JUL-1992|H|Handler problems|Yield Alarm
"""


def test_the_specifications_own_sample_records_are_read() -> None:
    # the PRR's last field, PART_FIX (repair data, B*n in hexadecimal), made the spec's
    # own PRR "PRR has 14 fields, ATDF defines 13": a file whose PRRs carry it was
    # abandoned at its first part
    records = check_chunkings(get_format("atdf"), SPEC_SAMPLES.encode())
    by_name = {r.name: r.fields for r in records}
    assert list(by_name) == ["FAR", "ATR", "MIR", "SDR", "WCR", "WIR", "PIR", "PTR", "MPR",
                             "FTR", "PRR", "WRR", "TSR", "HBR", "SBR", "PCR", "MRR"]
    prr = by_name["PRR"]
    assert prr["PART_FIX"] == bytes([0xF1, 0x3C, 0x20])
    assert (prr["PART_ID"], prr["NUM_TEST"], prr["HARD_BIN"], prr["SOFT_BIN"], prr["X_COORD"],
            prr["Y_COORD"], prr["TEST_T"], prr["PART_TXT"], prr["PART_FLG"]) == (
        "13", 78, 0, 17, -2, 7, 644, "Device at edge of wafer", 0x08)
    assert (by_name["MIR"]["LOT_ID"], by_name["MIR"]["SUPR_NAM"]) == ("A3002B", "JOAN_S")
    assert by_name["SDR"]["SITE_NUM"] == [5, 6, 7, 8]
    assert (by_name["WRR"]["WAFER_ID"], by_name["WRR"]["GOOD_CNT"]) == ("W01", 2)
    assert (by_name["FTR"]["REL_VADR"], by_name["FTR"]["PATG_NUM"]) == (16, 2)
    assert (by_name["PTR"]["RESULT"], by_name["PTR"]["PARM_FLG"]) == (997.3, 0x04 | 0x08)
    # the multi-pin sample: pin indexes 3, 4, 5 and no returned states (so RTN_ICNT is the
    # indexes' count and no state is invented), shmoo input 4.5 V by .1, pass/fail F,
    # alarm D (drift), limit compare L and H
    mpr = by_name["MPR"]
    assert (mpr["TEST_NUM"], mpr["HEAD_NUM"], mpr["SITE_NUM"], mpr["RTN_RSLT"],
            mpr["RTN_INDX"], mpr["RTN_STAT"], mpr["RTN_ICNT"], mpr["RSLT_CNT"]) == (
        143, 2, 4, [1.3, 9.6, 1.5], [3, 4, 5], [], 3, 3)
    assert (mpr["TEST_FLG"], mpr["PARM_FLG"], mpr["OPT_FLAG"]) == (0x80, 0x02 | 0x40 | 0x80,
                                                                   0x01)
    assert (mpr["UNITS"], mpr["LO_LIMIT"], mpr["HI_LIMIT"], mpr["START_IN"], mpr["INCR_IN"],
            mpr["UNITS_IN"], mpr["C_HLMFMT"], mpr["LO_SPEC"], mpr["HI_SPEC"]) == (
        "mA", 1.0, 2.0, 4.5, 0.1, "V", "%6.1f", 9.75, 2.25)
    # the summaries "for all test sites" have an empty HEAD_NUM: STDF's 255, which the hub
    # takes as the lot's own figures (they were head 0, a site's, and ignored)
    mapped = map_all(records)
    summaries = [(type(r).__name__, r.head, r.site) for r in mapped
                 if isinstance(r, BinSummary | PartCount)]
    assert summaries == [("BinSummary", 2, 1), ("BinSummary", 255, 255),
                         ("BinSummary", 1, 2), ("BinSummary", 255, 255),
                         ("PartCount", 2, 1), ("PartCount", 255, 255)]
    assert (by_name["TSR"]["HEAD_NUM"], by_name["PCR"]["PART_CNT"]) == (2, 3976)
    part = [r for r in mapped if isinstance(r, PartResult)]
    assert [(p.part_id, p.x, p.y, p.soft_bin) for p in part] == [("13", -2, 7, 17)]
    # repair data that is not bytes in hexadecimal is a FormatError at its record
    bad = SPEC_SAMPLES.replace("F13C20", "F13C2").encode()
    with pytest.raises(FormatError, match=r"PRR.*hexadecimal") as err:
        parse_atdf(bad)
    assert err.value.offset == bad.index(b"PRR:")


def test_corrupt_atdf_is_a_format_error_with_the_offset() -> None:
    parser = get_format("atdf").new_parser()
    parser.feed(b"FAR:A|4|2|U\nPIR:1|1\nPTR:1|1|1|abc|P\nPIR:1|1\n")
    with pytest.raises(FormatError) as err:
        list(parser.records())
    assert err.value.offset == len(b"FAR:A|4|2|U\nPIR:1|1\n")
    assert "PTR" in err.value.message and "abc" in err.value.message
    binary = get_format("atdf").new_parser()
    binary.feed(stdf_equivalent())
    with pytest.raises(FormatError, match="not ATDF"):
        list(binary.close())


async def test_the_tail_source_follows_an_atdf_file(tmp_path: Path) -> None:
    """The tail knows no format by name: the config picks the installed plugin."""
    data = ATDF_TEXT.encode()
    path = tmp_path / "lot42.atd"
    path.write_bytes(data[:200])
    got: list[Any] = []
    done = trio.Event()

    class Sink:
        async def put(self, records: Any, checkpoint: Any = None) -> None:
            got.extend(records)
            if any(isinstance(r, LotEnd) for r in records):
                done.set()

    source = TailSource("t", TailConfig(paths=[str(tmp_path)], format="atdf",
                                        poll_interval=0.01), SourceContext("gw", Metrics()))
    async with trio.open_nursery() as nursery:
        await nursery.start(source.run, Sink())
        await trio.sleep(0.05)
        with path.open("ab") as f:
            f.write(data[200:])
        with trio.fail_after(10):
            await done.wait()
        nursery.cancel_scope.cancel()
    assert [r._replace(ts=0.0) for r in got] == map_all(parse_atdf(data))


async def test_an_atdf_file_reaches_the_hub_through_a_real_gateway(tmp_path: Path) -> None:
    holds = await run_tail(tmp_path, "atdf", ATDF_TEXT.encode())
    assert holds.file_end == "MRR" and holds.events == []
    lot = holds.lots["LOT42"]
    assert (lot["part_type"], lot["status"], lot["die_count"], lot["good"]) == (
        "DEV-7", "closed", 2, 1)
    assert holds.wafers[("LOT42", "LOT42-W01")]["dies"] == [[3, 4, 1, 1, True, 1]]
    idd = holds.test("LOT42", "VDD_IDD")
    assert (idd["count"], idd["min"], idd["max"], idd["lo_limit"], idd["units"]) == (
        2, 1.25, 2.5, 1.0, "mA")


async def test_a_restart_at_a_skipped_record_resumes_exactly(tmp_path: Path) -> None:
    """A checkpoint can fall where ATDF holds a record type it skips (PMR): the parser's
    position is that record's start, the next record it yields starts later.  The tail
    accepts that boundary on a restart and emits exactly what an uninterrupted run would."""
    data = ATDF_TEXT.replace("PIR:1|1\n", "PMR:1|2|pin1\nPIR:1|1\n", 1).encode()
    pmr = data.index(b"PMR:")
    assert len(check_chunkings(get_format("atdf"), data)) == len(parse_atdf(ATDF_TEXT.encode()))
    path = tmp_path / "lot42.atd"
    path.write_bytes(data[:pmr + len(b"PMR:1|2|pin1\n")])  # the PMR may still continue
    got: list[Any] = []
    done = trio.Event()

    class Sink:
        async def put(self, records: Any, checkpoint: Any = None) -> None:
            got.extend(records)
            if any(isinstance(r, LotEnd) for r in records):
                done.set()

    config = TailConfig(paths=[str(tmp_path)], format="atdf", poll_interval=0.01)
    first = TailSource("t", config, SourceContext("gw", Metrics()))
    async with trio.open_nursery() as nursery:
        await nursery.start(first.run, Sink())
        with trio.fail_after(10):
            while (f := first.files.get(str(path))) is None or f.fed < path.stat().st_size:
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    checkpoint = first.checkpoint()
    assert checkpoint["files"][str(path)]["offset"] == pmr
    with path.open("ab") as out:
        out.write(data[pmr + len(b"PMR:1|2|pin1\n"):])
    second = TailSource("t", config, SourceContext("gw", Metrics(), checkpoint=checkpoint))
    async with trio.open_nursery() as nursery:
        await nursery.start(second.run, Sink())
        with trio.fail_after(10):
            await done.wait()
        nursery.cancel_scope.cancel()
    assert second.files[str(path)].reason == "MRR"
    assert [r._replace(ts=0.0) for r in got] == map_all(parse_atdf(data))


def test_an_mpr_that_does_not_add_up_is_a_format_error_at_its_record() -> None:
    head = b"FAR:A|4|2|U\nPIR:1|1\n"
    for line, why in ((b"MPR:5|1|1|0,1,1|1,2,3|P||t|||V|0|9||||1,2", "3 returned states but 2"),
                      (b"MPR:5|1|1|0,G|1,2|P", "'G' is not one hexadecimal digit"),
                      (b"MPR:5|1|1|0,16|1,2|P", "'16' is not one hexadecimal digit"),
                      (b"MPR:5|1|1|0,|1,2|P", "'' is not one hexadecimal digit"),
                      (b"MPR:5|1|1|0,1|1,x|P", "MPR")):
        with pytest.raises(FormatError) as err:
            parse_atdf(head + line + b"\n")
        assert why in err.value.message and err.value.offset == len(head)
    # later MPRs of a test give states without the indexes (default data): no error
    (mpr,) = [r for r in parse_atdf(head + b"MPR:5|1|1|0,1|1,2|P\n") if r.name == "MPR"]
    assert (mpr.fields["RTN_ICNT"], mpr.fields["RTN_STAT"], "OPT_FLAG" in mpr.fields) == (
        2, [0, 1], False)
    # Semi-ATE STDF's ATDF output: states 10-15 in decimal, "passed alternate" as "PA"
    (mpr,) = [r for r in parse_atdf(head + b"MPR:5|1|1|10,F,15|1,2,3|PA\n") if r.name == "MPR"]
    assert (mpr.fields["RTN_STAT"], mpr.fields["TEST_FLG"], mpr.fields["PARM_FLG"]) == (
        [10, 15, 15], 0, 0x20)
    # a word that is no pass/fail code is no indication, not letters read one by one
    (mpr,) = [r for r in parse_atdf(head + b"MPR:5|1|1|0|1|PASS\n") if r.name == "MPR"]
    assert (mpr.fields["TEST_FLG"], mpr.fields["PARM_FLG"]) == (0x40, 0)


async def test_the_tail_resumes_an_atdf_file_exactly_from_any_checkpoint(tmp_path: Path
                                                                           ) -> None:
    """A format's ``position`` is where the tail resumes: the kit's source check
    (``check_replays``) on the tail reading ATDF, resumed from checkpoints inside the file
    -- inside continuation lines too -- gives exactly the records that followed each."""
    head, rest = ATDF_TEXT.split("PIR:1|1\n", 1)
    parts, tail = rest.split("WRR:", 1)
    touchdown = "PIR:1|1\n" + parts
    body = "".join(touchdown.replace("|P1|", f"|P{2 * n + 1}|").replace("|P2|", f"|P{2 * n + 2}|")
                   for n in range(60))
    (tmp_path / "lot42.atd").write_text(head + body + "WRR:" + tail)
    config = TailConfig(paths=[str(tmp_path)], format="atdf", poll_interval=0.01,
                        read_size=512)
    first = await check_replays(TailSource, config, restarts=8, idle_s=3.0)
    put = [r for p in first for r in p.records]
    assert len(first) > 20 and isinstance(put[-1], LotEnd)
    assert sum(isinstance(r, PartResult) for r in put) == 120
