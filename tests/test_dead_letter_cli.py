"""``edgegw dead-letters list`` reads a gateway's dead-letter file (docs/spool.md, "The
dead-letter file") and says what each entry holds: when, which epoch and frame, which
records by id, kind and source, and why the hub could not take them -- a frame that does
not decode included, damage reported and read past, a torn end named, a missing file no
error.  The files here are written by the documented format (a 4-byte big-endian length,
then a CBOR map), as any gateway writes them; tests/test_faults.py lists one a real
gateway wrote."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from disktools import dead_letter_entry as entry

from edgegw.protocol import encode_body, encode_columns
from edgegw.records import ParametricResult, PartResult, SensorReading

EPOCH = "5f1c0a2e9b3d4c11"
AT = 1_796_000_000.5  # 2026-11-30T...Z


def ptr(i: int) -> ParametricResult:
    return ParametricResult("tester", AT, "LOT7", 1, i % 4, str(i), 1000 + i, "VDD leak",
                            1.5e-6 * i, 0.0, 1e-5, "A", True)


def prr(i: int) -> PartResult:
    return PartResult("tester", AT, "LOT7", "W3", 1, i % 4, str(i), i, -i, 1, 1, True)


def sensor(i: int) -> SensorReading:
    return SensorReading("handler", AT, "temp/chuck", 25.0 + i, "C")


FRAME = [ptr(1), ptr(2), prr(1), sensor(0)]  # a columnar body, rids 40001..40004
TOO_LARGE = [ptr(9)]  # a record refused before any frame held it (v1 body)


def dead_letter_file(path: Path, *, damage: bool = False, torn: bool = False) -> Path:
    parts = [
        entry(seq=17, epoch=EPOCH, reason="frame 17: 3000000 bytes, over the hub's "
              "max_frame_bytes", at=AT, body=encode_columns(40001, FRAME)),
        entry(seq=None, epoch=EPOCH, reason="too_large", at=AT + 1,
              body=encode_body(40005, TOO_LARGE), source="tester", rid=40005),
    ]
    if damage:
        parts.append(b"\x00\x00\x00\x09garbage!!")
    parts.append(entry(seq=21, epoch=EPOCH, reason="body is not valid CBOR", at=AT + 2,
                       body=b"\xff not cbor"))
    if torn:
        parts.append(entry(seq=22, epoch=EPOCH, reason="x", at=AT + 3, body=b"")[:9])
    path.write_bytes(b"".join(parts))
    return path


def dead_letters(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "edgegw", "dead-letters", "list", *args],
                          capture_output=True, text=True, timeout=60)


def test_each_entry_is_one_line_naming_its_frame_records_kinds_sources_and_reason(
        tmp_path: Path) -> None:
    path = dead_letter_file(tmp_path / "dead-letter.cborseq")
    run = dead_letters(str(path))
    assert run.returncode == 0, run.stderr
    frame, refused, undecodable = run.stdout.splitlines()
    assert frame.startswith("2026-") and f"epoch {EPOCH}" in frame
    assert ("frame 17: records 40001..40004 (2 ParametricResult, 1 PartResult, "
            "1 SensorReading) from handler, tester") in frame
    assert frame.endswith("reason: frame 17: 3000000 bytes, over the hub's max_frame_bytes")
    assert ("refused record of tester (next rid 40005): records 40005..40005 "
            "(1 ParametricResult)") in refused and refused.endswith("reason: too_large")
    assert "frame 21: 10 bytes that do not decode (body is not valid CBOR" in undecodable
    assert run.stderr.strip().endswith("3 entries, 5 records")


def test_records_prints_every_record_with_its_id_kind_and_fields(tmp_path: Path) -> None:
    path = dead_letter_file(tmp_path / "dead-letter.cborseq")
    run = dead_letters(str(path), "--records")
    assert run.returncode == 0, run.stderr
    records = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("  ")]
    assert [(r["rid"], r["kind"]) for r in records] == [
        (40001, "ParametricResult"), (40002, "ParametricResult"), (40003, "PartResult"),
        (40004, "SensorReading"), (40005, "ParametricResult")]
    assert records[1]["test_num"] == 1002 and records[1]["value"] == pytest.approx(3e-6)
    assert records[2]["x"] == 1 and records[2]["y"] == -1 and records[2]["wafer_id"] == "W3"
    assert records[3]["source"] == "handler"


def test_json_is_one_object_per_entry_for_scripts(tmp_path: Path) -> None:
    path = dead_letter_file(tmp_path / "dead-letter.cborseq")
    run = dead_letters(str(path), "--json", "--records")
    assert run.returncode == 0, run.stderr
    frame, refused, undecodable = (json.loads(line) for line in run.stdout.splitlines())
    assert frame["seq"] == 17 and frame["epoch"] == EPOCH and frame["offset"] == 0
    assert frame["first_rid"] == 40001 and frame["n"] == 4
    assert frame["kinds"] == {"ParametricResult": 2, "PartResult": 1, "SensorReading": 1}
    assert frame["sources"] == ["handler", "tester"] and len(frame["records"]) == 4
    assert frame["at"] == "2026-11-30T00:53:20Z"
    assert refused["seq"] is None and refused["source"] == "tester"
    assert refused["rid"] == 40005 and refused["n"] == 1
    assert undecodable["body_bytes"] == 10 and "CBOR" in undecodable["body_error"]
    assert "n" not in undecodable


def test_damage_is_reported_and_read_past_and_a_torn_end_is_named(tmp_path: Path) -> None:
    path = dead_letter_file(tmp_path / "dead-letter.cborseq", damage=True, torn=True)
    run = dead_letters(str(path), "--json")
    assert run.returncode == 1  # damage: a script can tell
    assert [json.loads(line)["seq"] for line in run.stdout.splitlines()] == [17, None, 21]
    assert "do not decode as entries (damage)" in run.stderr
    assert "is torn" in run.stderr


def test_the_file_is_found_from_a_state_directory_or_a_gateway_config(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    dead_letter_file(state / "dead-letter.cborseq")
    by_dir = dead_letters(str(state))
    assert by_dir.returncode == 0 and len(by_dir.stdout.splitlines()) == 3
    config = tmp_path / "gateway.toml"
    config.write_text('[gateway]\nid = "ate-01"\ntoken = "t"\nstate_dir = "elsewhere"\n')
    by_config = dead_letters("--config", str(config), "--set", f"gateway.state_dir={state}")
    assert by_config.returncode == 0, by_config.stderr
    assert by_config.stdout == by_dir.stdout
    both = dead_letters(str(state), "--config", str(config))
    assert both.returncode == 2 and "not both" in both.stderr


def test_no_file_means_no_dead_letters(tmp_path: Path) -> None:
    run = dead_letters(str(tmp_path))
    assert run.returncode == 0 and run.stdout == ""
    assert "no dead letters" in run.stderr
