"""``edgegw plugins check FORMAT FILE``: the plugin kit's checks on a real tester file, from
the command line, sampled so a file of megabytes takes seconds (docs/plugins.md,
"Checking a format on a real file")."""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

import pytest
from shared_data import GALAXY, METIS, stdf_path

from edgegw.cli import main


def check(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, dict[str, Any]]:
    code = main(["plugins", "check", *args, "--json"])
    return code, json.loads(capsys.readouterr().out)


def test_a_real_tester_file_passes_every_check(capsys: pytest.CaptureFixture[str]) -> None:
    code, report = check(capsys, "stdf", str(stdf_path(METIS)))
    assert code == 0 and report["ok"] and report["format"] == "stdf"
    checks = {c["name"]: c for c in report["checks"]}
    assert list(checks) == ["parse", "chunkings", "truncations", "resumes"]
    assert all(c["ok"] for c in checks.values()), checks
    # the counts the file's README gives (an independent reader's)
    assert checks["parse"]["detail"].startswith("918 records in 47,400 bytes (PTR 572, PMR 120")
    assert "resumed from 5 checkpoint(s) inside the file" in checks["resumes"]["detail"]
    # and as text, one line a check
    assert main(["plugins", "check", "stdf", str(stdf_path(METIS))]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].endswith("as stdf:") and [line.split()[:2] for line in lines[1:]] == [
        ["parse", "PASS"], ["chunkings", "PASS"], ["truncations", "PASS"], ["resumes", "PASS"]]


def test_a_gzip_file_is_checked_as_its_tester_wrote_it(
        capsys: pytest.CaptureFixture[str]) -> None:
    """The big-endian A530 file (4.4 MB unpacked): sampled, not cut at every byte."""
    code, report = check(capsys, "stdf", str(stdf_path(GALAXY)))
    assert code == 0, report
    detail = {c["name"]: c["detail"] for c in report["checks"]}
    assert detail["parse"].startswith("58,020 records in 4,418,001 bytes (PTR 52,403")
    assert detail["truncations"].startswith("4,1")  # 4,096 + 4 in each of 8 records


def test_a_file_cut_inside_a_record_fails_naming_the_byte_and_checks_no_further(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = stdf_path(METIS).read_bytes()
    cut = tmp_path / "cut.std"
    cut.write_bytes(data[:30001])
    code, report = check(capsys, "stdf", str(cut))
    assert code == 1 and not report["ok"]
    (parse,) = report["checks"]
    assert parse["name"] == "parse" and not parse["ok"]
    assert parse["detail"].startswith("FormatError at byte "), parse
    # the same bytes gzip-compressed: read through the gzip stream
    packed = tmp_path / "cut.std.gz"
    packed.write_bytes(gzip.compress(data[:30001]))
    assert check(capsys, "stdf", str(packed))[1]["checks"][0]["detail"] == parse["detail"]


def test_the_atdf_plugin_passes_on_its_own_format(tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    sample = tmp_path / "lot.txt"  # any name: the tail is handed a copy named as ATDF
    sample.write_text("FAR:A|4|2|U\n"
                      "MIR:LOT42|DEV-7|sort.prg|node1|J750|10:08:20 23-SEP-2024|"
                      "10:08:25 23-SEP-2024|joe|P|1\n"
                      "PIR:1|1\nPRR:1|1|P|1|1|1|1|1|3|4|\nMRR:10:20:00 23-SEP-2024\n")
    code, report = check(capsys, "atdf", str(sample))
    assert code == 0, report
    assert report["checks"][0]["detail"].startswith("5 records")


@pytest.mark.parametrize("args, message", [
    (["nosuch", "x.std"], "unknown tester format 'nosuch' (installed formats: "),
    (["stdf", "/nonexistent/x.std"], "No such file or directory"),
    (["stdf", "x.std", "--option", "noequals"], "expected dotted.key=value"),
    (["stdf", "x.std", "--option", "a=1"], "the stdf format takes no options (got a)"),
])
def test_a_bad_command_line_is_exit_status_2_with_the_reason(
        args: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plugins", "check", *args]) == 2
    assert message in capsys.readouterr().err


def test_a_format_option_is_checked_as_the_tail_checks_it(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    wat = tmp_path / "w07.wat.csv"
    wat.write_text("anything\n")
    assert main(["plugins", "check", "wat", str(wat), "--option", "timezone=Mars"]) == 2
    assert "timezone" in capsys.readouterr().err
