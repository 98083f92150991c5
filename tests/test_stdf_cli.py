"""`edgegw stdf dump` and `edgegw stdf stats`: JSON out, .gz .bz2 .xz in, clear errors."""

from __future__ import annotations

import contextlib
import gzip
import io
import itertools
import json
import math
import random
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from edgegw.cli import main
from edgegw.stdf import Bits, StdfDecoder, StdfWriter, StreamsReader, TrailingBytes


def write_lot(path: Path, order: str = "<") -> Path:
    """Two sites; the part at (1, 1) fails, is retested (PART_FLG bit 1: same X/Y) and
    passes; part "3" fails on site 1."""
    w = StdfWriter(order)
    recs: list[tuple[str, dict[str, Any]]] = [
        ("FAR", {}),
        ("MIR", {"LOT_ID": "L1"}),
        ("WIR", {"HEAD_NUM": 1, "SITE_GRP": 255, "START_T": 0, "WAFER_ID": "W1"}),
        ("PIR", {"HEAD_NUM": 1, "SITE_NUM": 0}),
        ("PIR", {"HEAD_NUM": 1, "SITE_NUM": 1}),
        ("PTR", {"TEST_NUM": 1, "HEAD_NUM": 1, "SITE_NUM": 0, "TEST_FLG": 0x80,
                 "PARM_FLG": 0, "RESULT": math.nan, "TEST_TXT": "t", "ALARM_ID": "",
                 "OPT_FLAG": 0, "RES_SCAL": 0, "LLM_SCAL": 0, "HLM_SCAL": 0,
                 "LO_LIMIT": -math.inf, "HI_LIMIT": 1.0}),
        ("FTR", {"TEST_NUM": 2, "HEAD_NUM": 1, "SITE_NUM": 1, "TEST_FLG": 0,
                 "OPT_FLAG": 0xFF, "CYCL_CNT": 0, "REL_VADR": 0, "REPT_CNT": 0,
                 "NUM_FAIL": 0, "XFAIL_AD": 0, "YFAIL_AD": 0, "VECT_OFF": 0, "RTN_ICNT": 0,
                 "PGM_ICNT": 0, "FAIL_PIN": Bits(4, b"\x05")}),
        ("PRR", {"HEAD_NUM": 1, "SITE_NUM": 0, "PART_FLG": 0x08, "NUM_TEST": 1,
                 "HARD_BIN": 5, "SOFT_BIN": 51, "X_COORD": 1, "Y_COORD": 1, "TEST_T": 0,
                 "PART_ID": "1", "PART_TXT": "", "PART_FIX": b"\xab"}),
        ("PRR", {"HEAD_NUM": 1, "SITE_NUM": 1, "PART_FLG": 0x08, "NUM_TEST": 1,
                 "HARD_BIN": 5, "SOFT_BIN": 52, "X_COORD": 2, "Y_COORD": 1, "TEST_T": 0,
                 "PART_ID": "3"}),
        ("PIR", {"HEAD_NUM": 1, "SITE_NUM": 0}),
        ("PRR", {"HEAD_NUM": 1, "SITE_NUM": 0, "PART_FLG": 0x02, "NUM_TEST": 1,
                 "HARD_BIN": 1, "SOFT_BIN": 1, "X_COORD": 1, "Y_COORD": 1, "TEST_T": 0,
                 "PART_ID": "2"}),
        ("GDR", {"GEN_DATA": [(10, "x"), (0, None), (11, b"\x01\x02")]}),
        ("WRR", {"HEAD_NUM": 1, "SITE_GRP": 255, "FINISH_T": 0, "PART_CNT": 3}),
        ("HBR", {"HEAD_NUM": 255, "SITE_NUM": 0, "HBIN_NUM": 1, "HBIN_CNT": 1,
                 "HBIN_PF": "P"}),
        ("MRR", {"FINISH_T": 0}),
    ]
    path.write_bytes(b"".join(w.encode(n, f) for n, f in recs))
    return path


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    status = main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


def test_dump_prints_one_valid_json_object_per_record(tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    path = write_lot(tmp_path / "lot.stdf")
    status, out, _ = run(capsys, "stdf", "dump", str(path))
    assert status == 0
    objs = [json.loads(line) for line in out.splitlines()]
    assert [o["rec"] for o in objs] == ["FAR", "MIR", "WIR", "PIR", "PIR", "PTR", "FTR",
                                        "PRR", "PRR", "PIR", "PRR", "GDR", "WRR", "HBR", "MRR"]
    ptr = objs[5]
    assert ptr["TEST_NUM"] == 1 and ptr["RESULT"] == "nan" and ptr["LO_LIMIT"] == "-inf"
    assert ptr["HI_LIMIT"] == 1.0
    assert objs[6]["FAIL_PIN"] == {"bits": 4, "hex": "05"}
    assert objs[7]["PART_FIX"] == "ab" and objs[7]["PART_ID"] == "1"
    assert objs[11]["GEN_DATA"] == [[10, "x"], [0, None], [11, "0102"]]
    # absent trailing fields are absent from the JSON too
    assert "PART_TXT" not in objs[8] and objs[8]["PART_ID"] == "3"


def test_dump_filters_by_record_type_and_reads_gzip(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    raw = write_lot(tmp_path / "lot.stdf", ">").read_bytes()
    gz = tmp_path / "lot.stdf.gz"
    gz.write_bytes(gzip.compress(raw))
    status, out, _ = run(capsys, "stdf", "dump", "--rec", "prr", "--offset", str(gz))
    assert status == 0
    objs = [json.loads(line) for line in out.splitlines()]
    assert [o["rec"] for o in objs] == ["PRR"] * 3
    assert all(raw[o["_offset"] + 2:o["_offset"] + 4] == b"\x05\x14" for o in objs)


def test_stats_counts_parts_bins_and_sites_with_retests_once(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_lot(tmp_path / "lot.stdf")
    status, out, _ = run(capsys, "stdf", "stats", str(path))
    assert status == 0
    stats = json.loads(out)
    assert stats["records"]["PRR"] == 3 and stats["records"]["PIR"] == 3
    assert stats["tested"] == 3 and stats["retests"] == 1
    assert stats["parts"] == 2 and stats["good"] == 1
    assert stats["hard_bins"] == {"1": 1, "5": 1}
    assert stats["soft_bins"] == {"1": 1, "52": 1}
    assert stats["sites"] == {
        "1/0": {"parts": 1, "good": 1, "hard_bins": {"1": 1}, "soft_bins": {"1": 1}},
        "1/1": {"parts": 1, "good": 0, "hard_bins": {"5": 1}, "soft_bins": {"52": 1}},
    }
    assert stats["file_summary"]["hbr"] == {"all": {"1": 1}}


def test_stats_matches_a_retest_within_its_own_lot_in_a_file_of_two_lots(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # wafer ids and part ids restart in every lot: a part of lot L2 flagged as a retest
    # (PART_FLG bit 0: same PART_ID; bit 1: same X/Y) replaces an earlier part of L2 only
    # (before: it replaced lot L1's part of that id or place, one part too few)
    w = StdfWriter("<")

    def prr(part_id: str, flags: int, hard: int, x: int) -> bytes:
        return w.encode("PIR", {"HEAD_NUM": 1, "SITE_NUM": 0}) + w.encode("PRR", {
            "HEAD_NUM": 1, "SITE_NUM": 0, "PART_FLG": flags, "NUM_TEST": 1,
            "HARD_BIN": hard, "SOFT_BIN": hard, "X_COORD": x, "Y_COORD": 1, "TEST_T": 0,
            "PART_ID": part_id})

    def lot(lot_id: str, parts: bytes) -> bytes:
        return (w.encode("FAR", {}) + w.encode("MIR", {"LOT_ID": lot_id})
                + w.encode("WIR", {"HEAD_NUM": 1, "SITE_GRP": 255, "START_T": 0,
                                   "WAFER_ID": "1"})
                + parts + w.encode("WRR", {"HEAD_NUM": 1, "SITE_GRP": 255, "FINISH_T": 0})
                + w.encode("MRR", {"FINISH_T": 0}))

    path = tmp_path / "two-lots.stdf"
    path.write_bytes(
        lot("L1", prr("1", 0x08, 5, 1) + prr("2", 0x08, 5, 2))
        # L2: its part "1" and the die at (2, 1) come flagged as retests of parts tested
        # before this file; then its part "3" is retested (same id) and passes
        + lot("L2", prr("1", 0x01, 1, 1) + prr("9", 0x02, 1, 2)
              + prr("3", 0x08, 5, 3) + prr("3", 0x01, 1, 3)))
    status, out, _ = run(capsys, "stdf", "stats", str(path))
    stats = json.loads(out)
    assert status == 0 and stats["records"]["MIR"] == 2
    assert (stats["tested"], stats["retests"], stats["parts"], stats["good"]) == (6, 1, 5, 3)
    assert stats["hard_bins"] == {"1": 3, "5": 2}
    # each lot's own figures, in the order the lots come
    assert stats["lots"] == [
        {"lot_id": "L1", "parts": 2, "good": 0, "hard_bins": {"5": 2}, "soft_bins": {"5": 2}},
        {"lot_id": "L2", "parts": 3, "good": 3, "hard_bins": {"1": 3}, "soft_bins": {"1": 3}}]


@pytest.mark.parametrize("content", [b"this is not an STDF file\n", b"", b"\x02\x00\x00"])
def test_a_non_stdf_file_is_a_one_line_error_and_exit_1(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], content: bytes) -> None:
    path = tmp_path / "notes.txt"
    path.write_bytes(content)
    for action in ("dump", "stats"):
        status, out, err = run(capsys, "stdf", action, str(path))
        assert status == 1 and out == ""
        assert "not STDF" in err and len(err.strip().splitlines()) == 1


def test_missing_file_and_bad_gzip_are_errors_not_tracebacks(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status, _, err = run(capsys, "stdf", "stats", str(tmp_path / "nope.stdf"))
    assert status == 1 and "nope.stdf" in err
    bad = tmp_path / "bad.stdf.gz"
    bad.write_bytes(b"\x1f\x8b" + b"garbage" * 10)
    status, _, err = run(capsys, "stdf", "dump", str(bad))
    assert status == 1 and "bad.stdf.gz" in err


def test_a_file_still_being_written_is_dumped_with_a_warning_under_partial(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    raw = write_lot(tmp_path / "lot.stdf").read_bytes()
    cut = tmp_path / "live.stdf"
    cut.write_bytes(raw[:-3])
    status, out, err = run(capsys, "stdf", "dump", "--partial", str(cut))
    assert status == 0 and len(out.splitlines()) == 14
    assert "ends inside the record at byte" in err and "warning" in err


def test_the_installed_command_exits_1_without_a_traceback(tmp_path: Path) -> None:
    path = tmp_path / "x.bin"
    path.write_bytes(b"\x00" * 100)
    proc = subprocess.run([sys.executable, "-m", "edgegw", "stdf", "dump", str(path)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr and "not STDF" in proc.stderr


def test_r4_values_print_as_the_shortest_decimal_of_the_same_float32(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    w = StdfWriter("<")
    path = tmp_path / "f.stdf"
    path.write_bytes(w.encode("FAR", {}) + w.encode("PTR", {
        "TEST_NUM": 1, "HEAD_NUM": 1, "SITE_NUM": 0, "TEST_FLG": 0, "PARM_FLG": 0,
        "RESULT": 0.1, "TEST_TXT": "", "ALARM_ID": "", "OPT_FLAG": 0, "RES_SCAL": 0,
        "LLM_SCAL": 0, "HLM_SCAL": 0, "LO_LIMIT": -0.9, "HI_LIMIT": 3.4e38}))
    status, out, _ = run(capsys, "stdf", "dump", "--rec", "PTR", str(path))
    ptr = json.loads(out)
    assert status == 0
    assert (ptr["RESULT"], ptr["LO_LIMIT"], ptr["HI_LIMIT"]) == (0.1, -0.9, 3.4e38)
    assert struct.pack("<f", ptr["RESULT"]) == struct.pack("<f", 0.1)


# ---- a complete file is read as complete: every defect is exit 1 with its offset ---------

def edgegw_stdf(*argv: str | Path) -> subprocess.CompletedProcess[str]:
    """The installed command, as a user runs it."""
    return subprocess.run([sys.executable, "-m", "edgegw", "stdf", *map(str, argv)],
                          capture_output=True, text=True, timeout=120)


def one_error_line(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    return lines[0]


def metis_records() -> tuple[bytes, list[Any]]:
    from shared_data import METIS, stdf_bytes

    raw = stdf_bytes(METIS)
    dec = StdfDecoder()
    dec.feed(raw)
    return raw, list(dec.records())


def test_corrupt_gzip_data_is_one_error_line_never_a_zlib_traceback(tmp_path: Path) -> None:
    raw, _ = metis_records()
    good = gzip.compress(raw, mtime=0)
    rnd = random.Random(5)
    messages = []
    for i in range(40):  # 8 random bytes somewhere after the gzip header
        bad = bytearray(good)
        at = rnd.randrange(30, len(bad) - 8)
        bad[at:at + 8] = rnd.randbytes(8)
        path = tmp_path / f"bad{i}.stdf.gz"
        path.write_bytes(bytes(bad))
        for action in ("dump", "stats"):
            out, err = io.StringIO(), io.StringIO()
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                status = main(["stdf", action, str(path)])
            assert status == 1 and len(err.getvalue().strip().splitlines()) == 1
            messages.append(err.getvalue())
    # the three ways it shows: zlib's own error, gzip's CRC check, or decoded garbage
    assert any("corrupt gzip data after" in m for m in messages)
    zlib_case = next(tmp_path / f"bad{i // 2}.stdf.gz" for i, m in enumerate(messages)
                     if "corrupt gzip data" in m)
    line = one_error_line(edgegw_stdf("dump", zlib_case))
    assert line.startswith(f"edgegw stdf: {zlib_case}: corrupt gzip data after ")


def _compress(kind: str, raw: bytes) -> bytes:
    import bz2
    import lzma

    return bz2.compress(raw) if kind == "bzip2" else lzma.compress(raw)


@pytest.mark.parametrize("kind", ["bzip2", "xz"])
def test_a_bzip2_or_xz_file_is_read_as_its_plain_file(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], kind: str) -> None:
    """Archived lots are often bzip2 or xz; the suffix does not matter, the magic does."""
    raw, _ = metis_records()
    plain = tmp_path / "metis.stdf"
    plain.write_bytes(raw)
    packed = tmp_path / f"metis.{kind}.stdf"
    packed.write_bytes(_compress(kind, raw))
    # several streams (a tester compressing as it writes; pxz), xz with the stream padding
    # its format allows: lzma.open dropped every stream after padding without a word
    streams = tmp_path / f"metis.streams.{kind}.stdf"
    streams.write_bytes(_streams(kind, raw, [1000, len(raw) // 2], padding=kind == "xz"))
    for action in ("stats", "dump"):
        want = run(capsys, "stdf", action, str(plain))
        assert want[0] == 0 and want[1]
        assert run(capsys, "stdf", action, str(packed)) == want
        assert run(capsys, "stdf", action, str(streams)) == want


@pytest.mark.parametrize("kind", ["bzip2", "xz"])
def test_corrupt_or_cut_bzip2_and_xz_data_is_one_error_line(tmp_path: Path, kind: str) -> None:
    raw, _ = metis_records()
    good = _compress(kind, raw)
    cut = tmp_path / "cut.stdf"
    cut.write_bytes(good[:len(good) // 2])
    assert f": {kind} file cut short after " in one_error_line(edgegw_stdf("stats", cut))
    rnd = random.Random(7)
    messages = []
    for i in range(20):  # 8 random bytes somewhere after the stream's header
        bad = bytearray(good)
        at = rnd.randrange(16, len(bad) - 8)
        bad[at:at + 8] = rnd.randbytes(8)
        path = tmp_path / f"bad{i}.stdf"
        path.write_bytes(bytes(bad))
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            status = main(["stdf", "stats", str(path)])
        assert status == 1 and len(err.getvalue().strip().splitlines()) == 1, err.getvalue()
        messages.append(err.getvalue())
    assert any(f"corrupt {kind} data after " in m for m in messages), messages


@pytest.mark.parametrize(("head", "named"), [
    (b"PK\x03\x04", "a zip archive"), (b"\x28\xb5\x2f\xfd", "zstd-compressed"),
    (b"7z\xbc\xaf\x27\x1c", "a 7-Zip archive")])
def test_an_archive_it_does_not_read_is_named_not_called_corrupt(
        tmp_path: Path, head: bytes, named: str) -> None:
    path = tmp_path / "lot.stdf.zip"
    path.write_bytes(head + bytes(64))
    assert one_error_line(edgegw_stdf("stats", path)) == (
        f"edgegw stdf: {path}: not STDF: {named}; extract or decompress the STDF file first "
        "(this reads plain, gzip, bzip2 and xz files)")


def test_a_record_header_zeroed_mid_file_is_exit_1_naming_where_the_damage_starts(
        tmp_path: Path) -> None:
    raw, records = metis_records()
    broken = records[416]  # the DTR at byte 23306: 416 of 918 records readable before it
    data = bytearray(raw)
    data[broken.offset:broken.offset + 4] = bytes(4)
    path = tmp_path / "zeroed.std"
    path.write_bytes(bytes(data))
    for action in ("dump", "stats"):
        line = one_error_line(edgegw_stdf(action, path))
        assert f"record of unknown type at byte {broken.offset}" in line
        assert "corrupt" in line


def test_a_complete_file_that_ends_short_is_exit_1_naming_the_cut_record(
        tmp_path: Path) -> None:
    raw, records = metis_records()
    cut = records[500]
    path = tmp_path / "short.std"
    path.write_bytes(raw[:cut.offset + 7])
    proc = edgegw_stdf("dump", path)
    line = one_error_line(proc)
    assert f"truncated: the file ends inside the record at byte {cut.offset}" in line
    assert len(proc.stdout.splitlines()) == 500  # what is readable is still printed
    assert edgegw_stdf("stats", "--partial", path).returncode == 0


def cut_before_first_field(w: StdfWriter, name: str, fields: dict[str, Any]) -> bytes:
    """The record with only HEAD_NUM and SITE_NUM (the HBR's) or nothing (the PTR's
    TEST_NUM is its first field) of its body, REC_LEN saying so."""
    whole = w.encode(name, fields)
    body = whole[4:6] if name == "HBR" else b""
    return struct.pack("<H", len(body)) + whole[2:4] + body


def test_a_record_cut_before_a_field_it_must_have_is_read_on_and_counted_as_the_gateway_does(
        tmp_path: Path) -> None:
    """A PTR cut before TEST_NUM and an HBR cut before HBIN_NUM: ``stats`` reads on to
    the MRR, its figures those of every other record, the cut ones counted in
    ``cut_records`` -- the counts the gateway's mapping skips (``cut_short``, the tail's
    ``edgegw_tail_cut_records_total``) -- with a warning on stderr, exit 0.  Before: the
    PTR went unsaid (stats does not decode PTRs) and the HBR was exit 1 at its offset,
    no figures."""
    from edgegw.stdf import RecordMapper

    w = StdfWriter("<")
    whole = write_lot(tmp_path / "whole.stdf").read_bytes()
    records = list(decode_all(whole))
    prr = next(r for r in records if r.name == "PRR")
    mrr = records[-1]
    ptr = cut_before_first_field(w, "PTR", {"TEST_NUM": 7})
    hbr = cut_before_first_field(w, "HBR", {"HEAD_NUM": 255, "SITE_NUM": 0, "HBIN_NUM": 2,
                                            "HBIN_CNT": 1})
    path = tmp_path / "cut.stdf"
    path.write_bytes(whole[:prr.offset] + ptr + whole[prr.offset:mrr.offset] + hbr
                     + whole[mrr.offset:])
    proc = edgegw_stdf("stats", path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"edgegw stdf: {path}: warning: records cut before a field they must have "
        "skipped: 1 HBR, 1 PTR"]
    figures = json.loads(proc.stdout)
    assert figures["cut_records"] == {"HBR": 1, "PTR": 1}
    expected = json.loads(edgegw_stdf("stats", tmp_path / "whole.stdf").stdout)
    assert "cut_records" not in expected
    expected["records"]["PTR"] += 1
    expected["records"]["HBR"] += 1
    del figures["cut_records"]
    assert figures == expected  # nothing else changed: no bin 2, the parts all there
    mapper = RecordMapper("s")
    mapper.map_all(decode_all(path.read_bytes()), 0.0)
    assert mapper.cut_short == {"HBR": 1, "PTR": 1}  # what the gateway skips and counts


def test_a_ptr_with_its_test_num_whole_is_not_counted_cut(tmp_path: Path) -> None:
    # the first field whole and nothing after it: a result of its test's defaults, sent
    w = StdfWriter("<")
    whole = write_lot(tmp_path / "whole.stdf").read_bytes()
    mrr = list(decode_all(whole))[-1]
    ptr = w.encode("PTR", {"TEST_NUM": 1})
    short = struct.pack("<H", 4) + ptr[2:4] + ptr[4:8]
    path = tmp_path / "short.stdf"
    path.write_bytes(whole[:mrr.offset] + short + whole[mrr.offset:])
    proc = edgegw_stdf("stats", path)
    assert proc.returncode == 0 and proc.stderr == ""
    assert "cut_records" not in json.loads(proc.stdout)


def decode_all(raw: bytes) -> list[Any]:
    decoder = StdfDecoder()
    decoder.feed(raw)
    return list(decoder.records())


def test_an_unknown_stdf_version_is_a_clear_error_unless_asked_for_best_effort(
        tmp_path: Path) -> None:
    raw, _ = metis_records()
    data = bytearray(raw)
    data[5] = 108  # FAR: REC_LEN, REC_TYP, REC_SUB, CPU_TYPE, STDF_VER
    path = tmp_path / "v108.std"
    path.write_bytes(bytes(data))
    line = one_error_line(edgegw_stdf("stats", path))
    assert "STDF_VER 108" in line and "V4" in line
    best_effort = edgegw_stdf("stats", "--any-version", path)
    assert best_effort.returncode == 0 and json.loads(best_effort.stdout)["parts"] == 22


def _stats_of_full_decode(data: bytes) -> dict[str, Any]:
    from edgegw.stdf import StdfStats

    stats = StdfStats()
    dec = StdfDecoder()
    dec.feed(data)
    for rec in dec.records():
        stats.add(rec.name, rec.fields)
    return json.loads(json.dumps(stats.as_dict()))


@pytest.mark.parametrize("name", ["metis-d10-2site.std", "galaxy-a530-lot2.stdf.gz",
                                  "ftr-heavy", "gdr-heavy"])
def test_stats_which_decodes_only_what_it_reads_equals_stats_of_every_record(
        name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    if name.startswith(("metis", "galaxy")):
        from shared_data import stdf_bytes, stdf_path

        path, data = stdf_path(name), stdf_bytes(name)
    else:
        from test_stdf_shapes import shape

        data = shape(name)
        path = tmp_path / "shape.stdf"
        path.write_bytes(data)
    status, out, _ = run(capsys, "stdf", "stats", str(path))
    assert status == 0
    assert json.loads(out) == _stats_of_full_decode(data)


def test_dump_of_some_types_equals_those_records_of_a_full_dump(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_lot(tmp_path / "lot.stdf")
    _, full, _ = run(capsys, "stdf", "dump", "--offset", str(path))
    status, some, _ = run(capsys, "stdf", "dump", "--offset", "--rec", "PRR", "--rec", "ftr",
                          str(path))
    assert status == 0
    assert some.splitlines() == [line for line in full.splitlines()
                                 if json.loads(line)["rec"] in ("PRR", "FTR")]


# ---- start-up: the compiled decoders are cached per user, and stats imports little ------

def stats_process(path: Path, cache: Path | str, *code: str) -> subprocess.CompletedProcess[str]:
    """``edgegw stdf stats path`` in a fresh interpreter with this decoder cache (``code``:
    Python run after it in the same interpreter), writing caches as an installed
    package's interpreter does (this suite may run with PYTHONDONTWRITEBYTECODE)."""
    import os

    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["EDGEGW_CACHE_DIR"] = str(cache)
    env["EDGEGW_STDF_ACCEL"] = "0"  # the decoder cache holds the pure-Python loop's code
    script = ("import sys\nfrom edgegw.cli import main\n"
              "status = main(['stdf', 'stats', sys.argv[1]])\n" + "\n".join(code) +
              "\nsys.exit(status)\n")
    return subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True,
                          text=True, timeout=120, env=env)


def test_the_decoder_cache_gives_the_same_figures_and_a_damaged_one_is_compiled_again(
        tmp_path: Path) -> None:
    lot = write_lot(tmp_path / "lot.stdf", ">")
    plain = stats_process(lot, "")  # no cache at all
    assert plain.returncode == 0, plain.stderr
    cache = tmp_path / "cache"
    first = stats_process(lot, cache)
    files = sorted((cache / "stdf-code").iterdir())
    assert files  # the decoders this command compiled
    again = stats_process(lot, cache)
    for f in files:  # damaged in every way a file can be: cut, garbage, another source
        f.write_bytes(f.read_bytes()[:len(f.read_bytes()) // 2])
    cut = stats_process(lot, cache)
    for f in files:
        f.write_bytes(b"\xff" * 64)
    garbage = stats_process(lot, cache)
    sources = [f.read_bytes() for f in sorted((cache / "stdf-code").iterdir())]
    for f in files:  # rewritten whole by the runs after the damage
        f.write_bytes(sources[-1])
    swapped = stats_process(lot, cache)
    for proc in (first, again, cut, garbage, swapped):
        assert proc.returncode == 0 and proc.stderr == "", proc.stderr
        assert json.loads(proc.stdout) == json.loads(plain.stdout)
    assert json.loads(plain.stdout)["records"]["PRR"] == 3


def test_stats_compiles_only_the_record_types_a_file_has_many_of(tmp_path: Path) -> None:
    """A type's decoders are generated and compiled once its records outnumber what that
    costs (COMPILE_AFTER of them); before, the reference decoder reads them.  A small
    file's MIR, WIR and HBRs are not worth compiling -- compiling them was most of a
    small file's ``stats`` after start-up -- while an SBR per site and bin on many sites
    is; the figures are the same either way."""
    import marshal

    from edgegw.stdf.decoder import COMPILE_AFTER

    w = StdfWriter("<")
    parts = COMPILE_AFTER + 1
    recs: list[tuple[str, dict[str, Any]]] = [("FAR", {}), ("MIR", {"LOT_ID": "L1"}),
                                              ("WIR", {"HEAD_NUM": 1, "WAFER_ID": "W1"})]
    for i in range(parts):
        recs += [("PIR", {"HEAD_NUM": 1, "SITE_NUM": i % 2}),
                 ("PRR", {"HEAD_NUM": 1, "SITE_NUM": i % 2, "PART_FLG": 0, "NUM_TEST": 1,
                          "HARD_BIN": 1 + i % 3, "SOFT_BIN": 1, "X_COORD": i, "Y_COORD": 0,
                          "TEST_T": 0, "PART_ID": str(i)})]
    recs += [("HBR", {"HEAD_NUM": 255, "SITE_NUM": 0, "HBIN_NUM": b, "HBIN_CNT": 1})
             for b in (1, 2, 3)]
    recs += [("SBR", {"HEAD_NUM": 1, "SITE_NUM": site, "SBIN_NUM": 1, "SBIN_CNT": 1})
             for site in range(parts)]
    recs.append(("MRR", {"FINISH_T": 0}))
    lot = tmp_path / "lot.stdf"
    lot.write_bytes(b"".join(w.encode(name, fields) for name, fields in recs))
    cache = tmp_path / "cache"
    proc = stats_process(lot, cache)
    assert proc.returncode == 0, proc.stderr
    compiled = set()
    for f in (cache / "stdf-code").iterdir():
        _tag, _source, code = marshal.loads(f.read_bytes())
        compiled.add(code.co_filename.split()[1])  # "<stdf PRR <>": its record type
    assert "SBR" in compiled
    assert compiled & {"MIR", "WIR", "HBR"} == set()
    assert json.loads(proc.stdout) == json.loads(stats_process(lot, "").stdout)
    figures = json.loads(proc.stdout)
    assert figures["parts"] == parts and figures["hard_bins"] == {"1": 22, "2": 22, "3": 21}
    assert proc.stdout == json.dumps(figures, indent=2) + "\n"  # json's own layout


def test_stats_starts_without_the_gateway_logging_or_config_machinery(tmp_path: Path) -> None:
    lot = write_lot(tmp_path / "lot.stdf")
    proc = stats_process(lot, tmp_path / "cache", "import json",
                         "print(json.dumps(sorted(sys.modules)), file=sys.stderr)")
    assert proc.returncode == 0, proc.stderr
    loaded = set(json.loads(proc.stderr))
    heavy = {"trio", "cbor2", "logging", "edgegw.config", "edgegw.startup", "tomllib",
             "dataclasses", "edgegw.stdf.mapping", "edgegw.stdf.writer", "shutil", "gzip",
             "bz2", "lzma"}
    assert loaded & heavy == set()
    assert json.loads(proc.stdout)["parts"] == 2


def test_junk_after_the_gzip_data_of_a_whole_file_is_a_warning_and_the_figures_are_printed(
        tmp_path: Path) -> None:
    # a transfer tool's trailer, or a second file appended that is not gzip: the lot is
    # whole (its MRR read), as with a text trailer after the MRR of a plain file
    raw, _ = metis_records()
    path = tmp_path / "junk.stdf.gz"
    path.write_bytes(gzip.compress(raw, mtime=0) + b"END OF TRANSFER\n")
    proc = edgegw_stdf("stats", path)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == _stats_of_full_decode(raw)
    (line,) = proc.stderr.strip().splitlines()
    assert "warning: after the MRR" in line and "not gzip" in line
    dump = edgegw_stdf("dump", path)
    assert dump.returncode == 0 and len(dump.stdout.splitlines()) == 918


def test_junk_after_the_gzip_data_of_a_file_without_mrr_is_exit_1_after_every_record(
        tmp_path: Path) -> None:
    raw, records = metis_records()
    no_mrr = raw[:records[-1].offset]
    path = tmp_path / "junk.stdf.gz"
    path.write_bytes(gzip.compress(no_mrr, mtime=0) + b"JUNK" * 4)
    proc = edgegw_stdf("dump", path)
    line = one_error_line(proc)
    assert f"not gzip data after {len(no_mrr)} bytes of STDF" in line
    assert len(proc.stdout.splitlines()) == 917  # every record before the junk printed


def test_stats_says_how_many_records_of_unknown_type_it_skipped(tmp_path: Path) -> None:
    # a PTR whose REC_LEN is 10 bytes short: its last 10 bytes read as record headers of
    # unknown types, one of which swallows the next 48 PTRs -- exit 0 (the file reads to
    # its MRR), but the figures are not silent about it
    raw, records = metis_records()
    ptr = next(r for r in records if r.name == "PTR")
    (rec_len,) = struct.unpack_from("<H", raw, ptr.offset)
    data = bytearray(raw)
    struct.pack_into("<H", data, ptr.offset, rec_len - 10)
    path = tmp_path / "short_ptr.std"
    path.write_bytes(bytes(data))
    proc = edgegw_stdf("stats", path)
    assert proc.returncode == 0, proc.stderr
    figures = json.loads(proc.stdout)
    assert figures["records"]["PTR"] == 572 - 48
    assert figures["unknown_records"] == {"0/0": 2, "10/0": 1, "49/0": 1}
    whole = edgegw_stdf("stats", stdf_path_of_metis())
    assert "unknown_records" not in json.loads(whole.stdout)


def stdf_path_of_metis() -> Path:
    from shared_data import METIS, stdf_path

    return stdf_path(METIS)


def test_dump_shows_the_records_of_unknown_type_stats_counts(tmp_path: Path) -> None:
    """A vendor's record (REC_TYP 180) and the headers a PTR's REC_LEN 10 bytes short
    makes of its rest: ``dump`` prints each where it lies, its REC_TYP, REC_SUB, length
    and first bytes in hex -- as many of each type as ``stats`` counts in
    ``unknown_records``, and the known records around them as before; ``--rec UNKNOWN``
    shows them alone.  Before: dump left them out without a word."""
    raw, records = metis_records()
    ptr = next(r for r in records if r.name == "PTR")
    (rec_len,) = struct.unpack_from("<H", raw, ptr.offset)
    data = bytearray(raw)
    struct.pack_into("<H", data, ptr.offset, rec_len - 10)
    vendor = struct.pack("<HBB", 40, 180, 3) + bytes(range(40))
    mir = next(r for r in records if r.name == "MIR")
    at = mir.offset + 4 + struct.unpack_from("<H", raw, mir.offset)[0]  # after the MIR
    path = tmp_path / "unknown.std"
    path.write_bytes(bytes(data[:at]) + vendor + bytes(data[at:]))
    proc = edgegw_stdf("dump", path, "--offset")
    assert proc.returncode == 0, proc.stderr
    objs = [json.loads(line) for line in proc.stdout.splitlines()]
    unknown = [o for o in objs if o["rec"] == "UNKNOWN"]
    assert unknown[0] == {"rec": "UNKNOWN", "_offset": at, "REC_TYP": 180, "REC_SUB": 3,
                          "REC_LEN": 40, "DATA": bytes(range(32)).hex()}
    counted: dict[str, int] = {}
    for o in unknown:
        key = f"{o['REC_TYP']}/{o['REC_SUB']}"
        counted[key] = counted.get(key, 0) + 1
    stats = edgegw_stdf("stats", path)
    assert json.loads(stats.stdout)["unknown_records"] == counted == {
        "0/0": 2, "10/0": 1, "49/0": 1, "180/3": 1}
    assert [o for o in objs if o["rec"] != "UNKNOWN"][-1]["rec"] == "MRR"
    assert sum(o["rec"] == "PTR" for o in objs) == 572 - 48
    alone = edgegw_stdf("dump", path, "--rec", "UNKNOWN")
    assert [json.loads(line) for line in alone.stdout.splitlines()] == [
        {k: v for k, v in o.items() if k != "_offset"} for o in unknown]


def test_a_lot_without_its_mrr_is_read_with_a_warning_that_says_so(tmp_path: Path) -> None:
    # a tester that stopped mid-lot, or a file copied while being written: cut at a
    # record's end, the file reads clean, so only the missing MRR tells that the figures
    # are part of a lot
    raw, records = metis_records()
    prrs = [r for r in records if r.name == "PRR"]
    cut = next(r.offset for r in records if r.offset > prrs[len(prrs) // 2].offset)
    path = tmp_path / "stopped.stdf"
    path.write_bytes(raw[:cut])
    proc = edgegw_stdf("stats", path)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == _stats_of_full_decode(raw[:cut])
    (line,) = proc.stderr.strip().splitlines()
    mir = next(r.offset for r in records if r.name == "MIR")
    assert f"warning: the lot of the MIR at byte {mir} has no MRR (the file ends at byte " \
           f"{cut})" in line
    # --partial: a file still being written, as the user says: no warning
    partial = edgegw_stdf("stats", "--partial", path)
    assert partial.returncode == 0 and partial.stderr == ""
    assert partial.stdout == proc.stdout
    # the whole file, and a file of no lot at all (a FAR alone), say nothing
    path.write_bytes(raw)
    assert edgegw_stdf("stats", path).stderr == ""
    path.write_bytes(raw[:records[1].offset])
    assert edgegw_stdf("dump", path).stderr == ""
    # a second lot appended after the first one's MRR and cut: that lot's MIR is named
    second = raw + raw[:cut]
    path.write_bytes(second)
    (line,) = edgegw_stdf("dump", path).stderr.strip().splitlines()
    assert f"the lot of the MIR at byte {len(raw) + mir} has no MRR" in line


def _streams(kind: str, raw: bytes, cuts: list[int], padding: bool = False) -> bytes:
    """``raw`` compressed as one stream per piece between ``cuts`` (xz: with the stream
    padding the format allows between and after them)."""
    pad = b"\0" * 8 if padding else b""
    bounds = [0, *cuts, len(raw)]
    return b"".join(_compress(kind, raw[a:b]) + pad for a, b in itertools.pairwise(bounds))


@pytest.mark.parametrize("kind", ["bzip2", "xz"])
def test_a_file_of_several_streams_reads_as_the_modules_read_it(tmp_path: Path,
                                                                kind: str) -> None:
    """... and with xz's stream padding (zero bytes, allowed between and after streams)
    as the xz tool reads it: lzma.open stops at padding between streams, and after the
    last one raises EOFError."""
    import bz2
    import lzma

    opener = bz2.open if kind == "bzip2" else lzma.open
    rnd = random.Random(kind)
    raw = bytes(rnd.getrandbits(8) for _ in range(200_000))
    for cuts in ([], [1], [70_000], sorted(rnd.sample(range(1, len(raw)), 5))):
        for padding in ((False, True) if kind == "xz" else (False,)):
            path = tmp_path / f"f.{kind}"
            path.write_bytes(_streams(kind, raw, cuts, padding))
            with StreamsReader(path, kind) as f:
                pieces = []
                while piece := f.read1(1 << 16):
                    assert len(piece) <= 1 << 16
                    pieces.append(piece)
            assert b"".join(pieces) == raw
            if not padding:
                with opener(path, "rb") as g:
                    assert g.read() == raw
    if kind == "xz":
        # where lzma.open loses data: the streams after padding between two (read as
        # trailing bytes, dropped without a word; the xz tool reads them)
        path.write_bytes(_streams(kind, raw, [1000], padding=True))
        with lzma.open(path, "rb") as g:
            assert g.read() == raw[:1000]


@pytest.mark.parametrize("kind", ["bzip2", "xz"])
def test_bytes_after_the_streams_are_told_where_the_modules_say_nothing(
        tmp_path: Path, kind: str) -> None:
    path = tmp_path / f"f.{kind}"
    path.write_bytes(_compress(kind, b"stdf" * 1000) + b"END OF TRANSFER\n")
    with StreamsReader(path, kind) as f:
        assert f.read1(1 << 20) == b"stdf" * 1000
        with pytest.raises(TrailingBytes, match=f"begin no {kind} stream: b'END OF TRANS"):
            f.read1(1 << 20)
    path.write_bytes(_compress(kind, b"stdf" * 1000)[:-10])  # cut short: as the modules
    with StreamsReader(path, kind) as f, pytest.raises(EOFError):
        while f.read1(1 << 20):
            pass


@pytest.mark.parametrize("kind", ["bzip2", "xz"])
def test_junk_after_the_bzip2_or_xz_data_is_a_warning_after_the_mrr_and_an_error_before(
        tmp_path: Path, kind: str) -> None:
    # as for a gzip file (the two tests above): bz2.open and lzma.open stopped at the junk
    # without a word, so half a lot read as a whole file
    raw, records = metis_records()
    path = tmp_path / "junk.stdf.x"
    path.write_bytes(_streams(kind, raw, [len(raw) // 3]) + b"END OF TRANSFER\n")
    proc = edgegw_stdf("stats", path)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == _stats_of_full_decode(raw)
    (line,) = proc.stderr.strip().splitlines()
    assert "warning: after the MRR" in line and f"begin no {kind} stream" in line
    no_mrr = raw[:records[-1].offset]
    path.write_bytes(_compress(kind, no_mrr) + b"JUNK" * 4)
    proc = edgegw_stdf("dump", path)
    line = one_error_line(proc)
    assert f"not {kind} data after {len(no_mrr)} bytes of STDF" in line
    assert len(proc.stdout.splitlines()) == 917  # every record before the junk printed
