"""The WAT CSV example plugin (plugins/edgegw-wat): a parametric-only format with named
tests, no end-of-file line and options, tested with the plugin kit (edgegw.testing)."""

from __future__ import annotations

import importlib.util
import statistics
from pathlib import Path

import pytest
import trio

from edgegw.config import ConfigError, build
from edgegw.formats import FormatError
from edgegw.records import LotEnd, PartResult
from edgegw.sources import TailConfig, TailSource, get_format, new_parser
from edgegw.stdf import test_number
from edgegw.testing import (
    EXHAUSTIVE_BYTES,
    check_chunkings,
    check_replays,
    check_truncations,
    cut_points,
    parse,
    run_tail,
)

if importlib.util.find_spec("edgegw_wat") is None:
    pytest.fail("the WAT example plugin is not installed: pip install -e plugins/edgegw-wat",
                pytrace=False)

WAT_TEXT = """\
WATCSV,1,LOT42,DEV-7,ET-3,wat.prg,2024-09-23 10:08:20,2
WAFER,LOT42-W01,3
SITE,X,Y,vth_n[V],idds[A],rs_poly[ohm/sq]
1,0,3,0.452,645.65e-12,12.1
2,3,0,0.448,,12.4
3,-3,0,0.455,612.5e-12,11.9
WAFER,LOT42-W02,2
SITE,X,Y,vth_n[V],idds[A],rs_poly[ohm/sq]
1,0,3,0.461,701.25e-12,12.0
2,3,0,0.439,598.0e-12,12.6
"""
DATA = WAT_TEXT.encode()
WAT = get_format("wat")


def column(name: str) -> list[float]:
    """The values of one parameter as the file has them (empty cells left out)."""
    rows = [line.split(",") for line in WAT_TEXT.splitlines()
            if line[:1].isdigit()]
    index = {"vth_n": 3, "idds": 4, "rs_poly": 5}[name]
    return [float(r[index]) for r in rows if r[index]]


def test_any_chunking_gives_the_same_records_each_line_at_its_first_byte() -> None:
    records = check_chunkings(WAT, DATA)
    line_starts = {0} | {i + 1 for i, b in enumerate(DATA) if b == ord("\n")}
    assert {r.offset for r in records} <= line_starts
    names = [r.name for r in records]
    assert names[:6] == ["FAR", "MIR", "WIR", "TSR", "TSR", "TSR"]
    assert names[-1] == "MRR" and names.count("PRR") == 5 and names.count("WRR") == 2
    ptr = next(r for r in records if r.name == "PTR" and r.fields["TEST_TXT"] == "idds")
    assert (ptr.fields["TEST_NUM"], ptr.fields["RESULT"], ptr.fields["UNITS"]) == (
        test_number("idds"), 645.65e-12, "A")


def test_a_file_cut_inside_a_line_is_a_format_error_never_a_cut_value() -> None:
    assert check_truncations(WAT, DATA) == len(DATA)
    cut = DATA[:DATA.index(b"645.6") + len(b"645.6")]
    with pytest.raises(FormatError, match="ends inside a line") as err:
        parse(WAT, cut)
    assert err.value.offset == DATA.index(b"1,0,3,0.452")


def test_the_parser_says_complete_after_the_declared_wafers_and_sites() -> None:
    parser = new_parser(WAT)
    last_row = DATA.rindex(b"2,3,0,0.439")
    parser.feed(DATA[:last_row])
    list(parser.records())
    assert not parser.complete
    parser.feed(DATA[last_row:])
    assert [r.name for r in parser.records()][-2:] == ["PRR", "WRR"]
    assert parser.complete
    (mrr,) = parser.close()
    assert (mrr.name, mrr.offset) == ("MRR", len(DATA))


@pytest.mark.parametrize(("text", "offset", "message"), [
    (b"FAR:A|4|2|U\n", 0, "not WAT CSV"),
    (b"WATCSV,1,L,P,T,J,2024-09-23 10:08:20,1\n1,0,0,1.0\n", 39, "outside a wafer"),
    (WAT_TEXT.replace("12.4", "12,4").encode(), DATA.index(b"2,3,0"), "row of 7 cells"),
    (WAT_TEXT.replace("0.448", "abc").encode(), DATA.index(b"2,3,0"), "abc"),
    (WAT_TEXT.replace("-3,0,", "-40000,0,").encode(), DATA.index(b"3,-3"), "out of range"),
    (DATA + b"1,0,0,1,2,3\n", len(DATA), "after the last declared wafer"),
])
def test_malformed_input_is_a_format_error_at_its_line(text: bytes, offset: int,
                                                       message: str) -> None:
    with pytest.raises(FormatError, match=message) as err:
        parse(WAT, text)
    assert err.value.offset == offset


def test_options_reach_the_parser_and_bad_ones_are_config_errors() -> None:
    utc = parse(WAT, DATA)[1].fields["START_T"]
    plus_one = parse(WAT, DATA, options={"timezone": "+01:00"})[1].fields["START_T"]
    assert utc == 1727086100 and plus_one == utc - 3600
    by_column = parse(WAT, DATA, options={"test_numbers": "column"})
    assert {r.fields["TEST_NUM"] for r in by_column if r.name == "PTR"} == {1, 2, 3}

    with pytest.raises(ConfigError) as err:
        build(TailConfig, {"paths": ["/d"], "format": "wat",
                           "options": {"timezone": "CET", "tz": 1}}, "gw.toml")
    assert err.value.errors == [
        "gw.toml: options.tz: unknown key (allowed here: test_numbers, timezone)"]
    with pytest.raises(ConfigError) as err:
        build(TailConfig, {"paths": ["/d"], "format": "wat",
                           "options": {"timezone": "CET"}}, "gw.toml")
    assert err.value.errors == [
        "gw.toml: options.timezone: expected 'UTC' or an offset like '+01:00', got 'CET'"]
    with pytest.raises(ConfigError) as err:
        build(TailConfig, {"paths": ["/d"], "format": "atdf", "options": {"x": 1}}, "gw.toml")
    assert err.value.errors == [
        "gw.toml: options: the atdf format takes no options (got x)"]


async def test_a_wat_file_reaches_the_hub_exactly_with_yield_and_bins_not_applicable(
        tmp_path: Path) -> None:
    # idle_timeout 600 s: only the parser's "complete" can end the file within the deadline
    with trio.fail_after(60):
        holds = await run_tail(tmp_path, "wat", DATA, options={"timezone": "+02:00"},
                               pieces=4)
    assert holds.file_end == "complete" and holds.events == []
    lot = holds.lots["LOT42"]
    assert (lot["status"], lot["die_count"], lot["wafer_count"], lot["started"]) == (
        "closed", 5, 2, 1727086100 - 7200)
    assert (lot["yield"], lot["good"], lot["not_applicable"]) == (None, None,
                                                                 ["yield", "bins"])
    assert lot["hard_bins"] == {}
    wafer = holds.wafers[("LOT42", "LOT42-W01")]
    assert sorted(wafer["dies"]) == [[-3, 0, None, None, None, 1], [0, 3, None, None, None, 1],
                                     [3, 0, None, None, None, 1]]
    assert wafer["not_applicable"] == ["yield", "bins"]
    assert (wafer["started"], wafer["status"]) == (1727086100 - 7200, "closed")
    for name in ("vth_n", "idds", "rs_poly"):
        values = column(name)
        test = holds.test("LOT42", name)
        assert test["test_num"] == test_number(name) and test["named"] is True
        assert (test["count"], test["min"], test["max"]) == (len(values), min(values),
                                                             max(values))
        assert test["mean"] == pytest.approx(statistics.fmean(values), rel=1e-12)
        assert test["sigma"] == pytest.approx(statistics.stdev(values), rel=1e-9)
        assert (test["lo_limit"], test["hi_limit"], test["fails"]) == (None, None, 0)
    assert holds.test("LOT42", "idds")["units"] == "A"


def test_a_file_beyond_the_exhaustive_size_is_cut_around_every_line() -> None:
    """Past EXHAUSTIVE_BYTES the kit cuts each record's first bytes, middle and last byte:
    for a line format, every line is cut at its start and inside it."""
    lines = ["WATCSV,1,BIG,DEV,ET-3,wat.prg,2024-09-23 10:08:20,3"]
    for w in (1, 2, 3):
        lines += [f"WAFER,BIG-W{w},60", "SITE,X,Y,vth_n[V],idds[A],rs_poly[ohm/sq]"]
        lines += [f"{s},{s % 8},{s // 8},0.45{s % 10},6{s:02d}.5e-12,12.{s % 7}"
                  for s in range(1, 61)]
    data = ("\n".join(lines) + "\n").encode()
    assert len(data) > EXHAUSTIVE_BYTES
    records = check_chunkings(WAT, data)
    starts = sorted({r.offset for r in records} - {len(data)})
    cuts = cut_points(data, [r.offset for r in records])
    assert len(starts) == len(lines) and set(starts) <= set(cuts)
    assert all(any(s < c < e for c in cuts)
               for s, e in zip(starts, [*starts[1:], len(data)], strict=True))
    assert check_truncations(WAT, data) == len(cuts)


async def test_the_tail_resumes_a_wat_file_exactly_from_any_checkpoint(tmp_path: Path
                                                                         ) -> None:
    """Resumed inside a WAT file, past the header a site row needs (given again in the
    middle of a wafer here), the tail gives exactly the records that followed: the kit's
    source check (``check_replays``) on the tail reading WAT."""
    lines = ["WATCSV,1,LOT42,DEV-7,ET-3,wat.prg,2024-09-23 10:08:20,6"]
    for wafer in range(6):
        lines += [f"WAFER,LOT42-W{wafer:02d},9", "SITE,X,Y,vth_n[V],idds[A],rs_poly[ohm/sq]"]
        for site in range(1, 10):
            if site == 6:
                lines.append("SITE,X,Y,idds[A],vth_n[V],rs_poly[ohm/sq]")
            lines.append(f"{site},{site},{wafer},0.45{site},6{site}5.6e-12,12.{site}")
    (tmp_path / "lot.wat.csv").write_text("\n".join(lines) + "\n")
    config = TailConfig(paths=[str(tmp_path)], format="wat", poll_interval=0.01,
                        read_size=512)
    first = await check_replays(TailSource, config, restarts=10, idle_s=3.0)
    put = [r for p in first for r in p.records]
    assert len(first) >= 4 and isinstance(put[-1], LotEnd)
    assert sum(isinstance(r, PartResult) for r in put) == 54
