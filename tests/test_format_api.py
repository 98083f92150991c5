"""The format plugin API around the parser (issue 16): the field helper, named tests, the
test kit catching the bugs it exists for, parametric-only data at the hub, the tail source's
name and its example config."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import trio

from edgegw.cli import main
from edgegw.formats import FormatError
from edgegw.gateway import load_gateway_config
from edgegw.hub import topics
from edgegw.hub.live import LiveState
from edgegw.metrics import Metrics
from edgegw.records import LotStart, ParametricResult, PartResult, WaferStart
from edgegw.sources import SourceContext, TailConfig, TailSource
from edgegw.stdf import RecordMapper, StdfDecoder, StdfWriter, stdf_fields, test_number
from edgegw.testing import (
    EXHAUSTIVE_BYTES,
    check_chunkings,
    check_truncations,
    sampled_chunkings,
    sampled_cut_points,
)

REPO = Path(__file__).resolve().parents[1]


# -- stdf_fields and test_number ------------------------------------------------------------

def test_stdf_fields_fills_the_middle_with_missing_values_and_maps_like_stdf() -> None:
    prr = stdf_fields("PRR", {"HEAD_NUM": 1, "SITE_NUM": 2, "HARD_BIN": 3, "Y_COORD": 7})
    assert prr == {"HEAD_NUM": 1, "SITE_NUM": 2, "PART_FLG": 0, "NUM_TEST": 0,
                   "HARD_BIN": 3, "SOFT_BIN": 65535, "X_COORD": -32768, "Y_COORD": 7}
    # what a binary STDF reader sees for the same record is the same dict
    dec = StdfDecoder()
    dec.feed(StdfWriter().encode("FAR", {"CPU_TYPE": 2, "STDF_VER": 4})
             + StdfWriter().encode("PRR", prr))
    assert list(dec.records())[1].fields == prr
    (part,) = RecordMapper("s").map(Rec("PRR", 0, prr), 0.0)
    assert (part.x, part.y, part.soft_bin, part.hard_bin) == (None, 7, None, 3)


@pytest.mark.parametrize(("name", "present", "message"), [
    ("XYZ", {}, "'XYZ' is not an STDF record name"),
    ("PIR", {"HEAD": 1}, "PIR has no field 'HEAD'"),
    ("PIR", {"HEAD_NUM": 300}, "HEAD_NUM 300 is out of range (0 to 255)"),
    ("SDR", {"SITE_CNT": 2, "SITE_NUM": [1, 256]}, "SITE_NUM 256 is out of range"),
    ("PTR", {"TEST_NUM": 1.5}, "PTR.TEST_NUM must be an integer"),
])
def test_stdf_fields_refuses_what_an_stdf_file_could_not_hold(
        name: str, present: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        stdf_fields(name, present)


def test_a_named_test_gets_the_same_number_everywhere() -> None:
    # pinned: the number is part of every hub's topics, it must never change
    assert test_number("idds") == 3760818764
    assert test_number("vth_n") == test_number("vth_n") != test_number("vth_p")
    assert 0 <= test_number("ü" * 1000) <= 2**32 - 1


class Rec(NamedTuple):
    name: str
    offset: int
    fields: dict[str, Any]


# -- the kit catches the bugs it is for -----------------------------------------------------

class LineFormat:
    """A one-record-per-line format: ``PIR <site>`` / ``PTR <site> <value>``.  ``bug``
    plants one mistake a plugin author could make."""

    name = "lines"
    description = "test format"
    suffixes = (".lines",)

    def __init__(self, bug: str = "") -> None:
        self.bug = bug

    def new_parser(self) -> LineParser:
        return LineParser(self.bug)


class LineParser:
    def __init__(self, bug: str) -> None:
        self.bug = bug
        self.buf = b""
        self.base = 0
        self.fed = 0
        self.held = False  # the line at the head of buf was cut at the last records()

    @property
    def position(self) -> int:
        return self.fed if self.bug == "position" else self.base

    def feed(self, data: bytes) -> None:
        self.buf += data
        self.fed += len(data)

    def state(self) -> dict[str, Any]:
        return {}

    def records(self) -> Iterator[Rec]:
        while (nl := self.buf.find(b"\n")) >= 0:
            yield from self._line(nl)
        self.held = bool(self.buf)

    def close(self) -> Iterator[Rec]:
        yield from self.records()
        if self.buf:
            if self.bug == "release cut line":  # the ATDF example's old mistake
                yield from self._line(len(self.buf))
                return
            raise FormatError("ends inside a line", self.base)

    def _line(self, end: int) -> Iterator[Rec]:
        line, offset = self.buf[:end], self.base
        kind, *args = line.split() or [b""]
        try:
            if kind == b"PIR" and len(args) == 1:
                rec = Rec("PIR", offset, {"HEAD_NUM": 1, "SITE_NUM": int(args[0])})
            elif kind == b"PTR" and len(args) == 2:
                value = float(args[1])
                if self.bug == "value from pieces" and self.held:
                    value = round(value, 13)  # a value put together from two reads, wrongly
                rec = Rec("PTR", offset, {"TEST_NUM": 1, "HEAD_NUM": 1,
                                          "SITE_NUM": int(args[0]), "TEST_FLG": 0x40,
                                          "RESULT": value})
            else:
                raise ValueError(f"not a line of this format: {line!r}")
        except ValueError as exc:
            raise FormatError(str(exc), offset) from None
        self.buf = self.buf[end + 1:]
        self.base += end + 1
        self.held = False
        yield rec


LINES = b"PIR 1\nPTR 1 645.65e-12\nPIR 2\nPTR 2 612.5e-12\n"


def test_the_kit_passes_a_correct_parser() -> None:
    assert len(check_chunkings(LineFormat(), LINES)) == 4
    assert check_truncations(LineFormat(), LINES) == len(LINES)


def test_the_kit_catches_a_cut_last_line_released_as_a_record() -> None:
    with pytest.raises(AssertionError, match=r"cut at byte 7 of 17, inside the record at 0: "
                                             r"close\(\) must raise FormatError, it yielded "
                                             r"a cut record \('PTR', 0, .*'RESULT': 6.0"):
        check_truncations(LineFormat("release cut line"), b"PTR 1 645.65e-12\n")


def test_the_kit_catches_a_position_that_is_not_a_record_boundary() -> None:
    with pytest.raises(AssertionError, match="is not the offset of the next record"):
        check_chunkings(LineFormat("position"), LINES)


def test_the_kit_says_when_a_parser_raises_anything_but_format_error() -> None:
    class Crashing(LineFormat):
        def new_parser(self) -> LineParser:
            parser = LineParser("")
            parser.state = None  # type: ignore[assignment,method-assign]
            parser.feed = lambda data: {}[data]  # type: ignore[method-assign]
            return parser

    with pytest.raises(AssertionError, match=r"KeyError.*only FormatError"):
        check_truncations(Crashing(), LINES)
    with pytest.raises(AssertionError, match=r"KeyError.*only FormatError"):
        check_chunkings(Crashing(), LINES)


def test_the_kit_catches_records_that_depend_on_the_chunking() -> None:
    with pytest.raises(AssertionError, match="gives other records than feeding all at once"):
        check_chunkings(LineFormat("value from pieces"), LINES)


BIG = LINES * 200  # 8,800 bytes: past EXHAUSTIVE_BYTES, what the sampled checks are for


def test_the_sampled_checks_pass_a_correct_parser_and_catch_the_same_bugs() -> None:
    """``sampled_chunkings`` and ``sampled_cut_points`` (what ``edgegw plugins check`` runs
    on a tester file of megabytes) keep the checks' power on a bug, not their cost."""
    chunkings = sampled_chunkings(len(BIG))
    assert len(chunkings) == 7 and all(sum(c) >= len(BIG) for c in chunkings)
    assert {c[0] for c in chunkings[:3]} == {7, 61, 4093}
    records = check_chunkings(LineFormat(), BIG, pieces=chunkings)
    offsets = [r.offset for r in records]
    cuts = sampled_cut_points(BIG, offsets, records=10)
    assert check_truncations(LineFormat(), BIG, cuts=cuts) == len(cuts)
    assert set(range(EXHAUSTIVE_BYTES)) <= set(cuts) and max(cuts) == len(BIG) - 1
    assert len(cuts) <= EXHAUSTIVE_BYTES + 4 * 11
    assert sampled_cut_points(BIG, offsets, records=10) == cuts  # reproducible by seed
    assert sampled_cut_points(BIG, offsets, records=10, seed=1) != cuts
    with pytest.raises(AssertionError, match="is not the offset of the next record"):
        check_chunkings(LineFormat("position"), BIG, pieces=chunkings)
    with pytest.raises(AssertionError, match="gives other records than feeding all at once"):
        check_chunkings(LineFormat("value from pieces"), BIG, pieces=chunkings)
    with pytest.raises(AssertionError, match=r"close\(\) must raise FormatError"):
        check_truncations(LineFormat("release cut line"), BIG, cuts=cuts)


# -- parametric-only data at the hub --------------------------------------------------------

def _part(x: int, passed: bool | None, hard_bin: int | None) -> PartResult:
    return PartResult("t", 1.0, "L", "W", 1, 1, "", x, 0, hard_bin, None, passed)


def test_yield_and_bins_are_not_applicable_only_when_no_die_has_them() -> None:
    state = LiveState(lambda topic, delta: None, clock=lambda: 0.0)
    state.on_records("gw", 1, [LotStart("t", 1.0, "L", "", "", "", "", 0),
                               WaferStart("t", 1.0, "L", "W", 1, 0),
                               _part(0, None, None), _part(1, None, None)], now=1.0)
    wafer = state.snapshot(topics.wafer("L", "W"))
    assert wafer is not None
    assert (wafer["die_count"], wafer["good"], wafer["yield"], wafer["hard_bins"]) == (
        2, None, None, {})
    assert wafer["not_applicable"] == ["yield", "bins"]
    assert sorted(wafer["dies"]) == [[0, 0, None, None, None, 1], [1, 0, None, None, None, 1]]
    # one die with a pass/fail and a bin: yield and bins apply again (the others not good)
    state.on_records("gw", 3, [_part(2, True, 1)], now=1.0)
    wafer = state.snapshot(topics.wafer("L", "W"))
    assert wafer is not None
    assert (wafer["good"], wafer["yield"], wafer["hard_bins"], wafer["not_applicable"]) == (
        1, pytest.approx(1 / 3), {"1": 1}, [])


# -- the tail source's name and its example config ------------------------------------------

def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "edgegw", *args], capture_output=True,
                          text=True, cwd=REPO, timeout=60)


def test_the_tail_example_config_passes_check_config_as_it_is() -> None:
    path = REPO / "conf" / "gateway-tail.example.toml"
    out = run_cli("check-config", str(path))
    assert (out.returncode, out.stdout.splitlines()[-1], out.stderr) == (0, "ok", "")
    (entry,) = load_gateway_config(str(path)).source_entries()
    assert (entry.type, entry.config.format, entry.config.options) == ("tail", "stdf", {})


def test_set_turns_the_simulated_source_into_a_tail_source() -> None:
    out = run_cli("check-config", str(REPO / "conf" / "gateway.toml"), "--set",
                  'sources.0={name = "ate", type = "tail", paths = ["/data/ate"], '
                  'format = "wat", options = {timezone = "+01:00"}}')
    assert (out.returncode, out.stdout.splitlines()[-1]) == (0, "ok")
    out = run_cli("check-config", str(REPO / "conf" / "gateway.toml"), "--set",
                  'sources.0={name = "ate", type = "tail", paths = ["/d"], format = "wat", '
                  'options = {timezone = "CET"}}')
    assert out.returncode == 2
    assert out.stdout.strip().endswith("sources[0].options.timezone: expected 'UTC' or an "
                                       "offset like '+01:00', got 'CET'")


def test_tail_is_the_source_type_and_stdf_its_alias(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plugins", "--json"]) == 0
    sources = {s["name"]: s for s in json.loads(capsys.readouterr().out)["sources"]}
    assert sources["tail"]["entry_point"] == sources["stdf"]["entry_point"] == (
        "edgegw.sources.tail:TailSource")
    assert sources["stdf"]["alias_of"] == "tail" and "alias_of" not in sources["tail"]


# -- "complete" from a parser that has a bug ------------------------------------------------

async def test_a_parser_whose_complete_fails_costs_only_the_early_end(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """``complete`` is a call into the plugin like any other: a failure there is counted
    as an internal error and the file simply ends at its idle timeout, records intact."""
    plugin = tmp_path / "plugin"
    plugin.mkdir()
    (plugin / "crashy_fmt.py").write_text(textwrap.dedent('''
        from test_format_api import LineParser

        class Parser(LineParser):
            @property
            def complete(self):
                raise RuntimeError("bug in complete")

        class CrashyFormat:
            name = "crashy"
            description = "complete raises"
            suffixes = (".crashy",)
            def new_parser(self):
                return Parser("")
        '''))
    info = plugin / "crashy_fmt-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: crashy_fmt\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[edgegw.formats]\ncrashy = crashy_fmt:CrashyFormat\n")
    monkeypatch.syspath_prepend(str(plugin))
    caplog.set_level(logging.INFO, logger="edgegw.sources.tail")
    files = tmp_path / "files"
    files.mkdir()
    (files / "a.crashy").write_bytes(LINES)
    got: list[Any] = []
    metrics = Metrics()
    source = TailSource("t", TailConfig(paths=[str(files)], format="crashy",
                                        poll_interval=0.01, idle_timeout=0.3),
                        SourceContext("gw", metrics))

    class Sink:
        async def put(self, records: Any, checkpoint: Any = None) -> None:
            got.extend(records)

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(source.run, Sink())
            # done is set just before the last batch is put: wait for both
            while (not (f := source.files.get(str(files / "a.crashy"))) or not f.done
                   or not any(isinstance(r, ParametricResult) for r in got)):
                await trio.sleep(0.02)
            nursery.cancel_scope.cancel()
    assert f.reason == "idle"
    # the log speaks of the format's end, not of STDF's MRR alone
    assert any(r.getMessage().endswith("idle for 0.3 s without its end (MRR, or the crashy "
                                       "parser saying complete): complete")
               for r in caplog.records), [r.getMessage() for r in caplog.records]
    assert [r.value for r in got if isinstance(r, ParametricResult)] == [645.65e-12, 612.5e-12]
    errors = metrics.counter("internal_errors_total", "").values
    assert sum(v for k, v in errors.items() if "format_parser" in str(k)) >= 1
