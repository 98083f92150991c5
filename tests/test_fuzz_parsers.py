"""Hostile input to every parser the gateway runs: whatever the bytes, the documented error
and nothing else, and memory bounded.

* MQTT payload decoders (``edgegw.mqtt.payloads``): any bytes -> a reading or
  ``PayloadError`` (never OverflowError, RecursionError, ...: an exception escaping the
  MQTT callback stops the gateway).
* Tester formats: the STDF decoder and the mapping to edgegw records, and every installed
  format plugin (ATDF too), fed mutated real tester files, the writer's output and random
  bytes in random chunkings -> records or ``FormatError``; the same outcome whatever the
  chunking; never more than one record's worth of bytes held back.
* ``edgegw stdf dump|stats`` on fuzzed files: exit 0, or exit 1 with one line.

Hypothesis runs with a fixed seed and no example database, so every run checks the same
cases and none depends on an earlier one.  ``EDGEGW_FUZZ_EXAMPLES=20000`` runs more of them;
``scripts/fuzz_stdf.py`` is the long crash-only run of the decoder (docs/stdf.md).
"""

from __future__ import annotations

import contextlib
import gzip
import importlib.util
import io
import itertools
import json
import math
import os
import struct
import sys
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from shared_data import GALAXY, METIS, stdf_bytes, stdf_dir
from test_atdf_plugin import ATDF_TEXT
from test_stdf_writer import full_record

from edgegw.cli import main
from edgegw.formats import FormatError
from edgegw.mqtt import MAX_TIMESTAMP, PayloadError, decode_number, json_decoder
from edgegw.sources import installed_formats
from edgegw.stdf import RECORDS, RecordMapper, StdfDecoder, StdfWriter

#: examples per property; EDGEGW_FUZZ_EXAMPLES=20000 for a longer run (same seed)
EXAMPLES = int(os.environ.get("EDGEGW_FUZZ_EXAMPLES", "300"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.large_base_example])

# ---- MQTT payloads ------------------------------------------------------------------------

DECODERS = {
    "value+ts": json_decoder("value", "ts"),
    "nested": json_decoder("data.1.v", "data.1.t"),
    "document": json_decoder(""),
}


def reading_or_payload_error(decode: Any, payload: bytes) -> tuple[float, float | None] | None:
    """The decoder's reading (checked to be one), or None for a PayloadError."""
    try:
        value, ts = decode(payload)
    except PayloadError as exc:
        assert 0 < len(str(exc)) <= 200  # short enough for a log line
        return None
    assert isinstance(value, float) and math.isfinite(value)
    assert ts is None or (isinstance(ts, float) and 0 <= ts < MAX_TIMESTAMP)
    return value, ts


def refused(decode: Any, payload: bytes) -> str:
    with pytest.raises(PayloadError) as err:
        decode(payload)
    return str(err.value)


def test_a_401_digit_integer_as_value_or_time_is_a_bad_payload() -> None:
    huge = b"9" * 401
    decode = DECODERS["value+ts"]
    assert "value is an integer of 1333 bits, too large" in refused(
        decode, b'{"value": ' + huge + b"}")
    assert "ts is an integer of 1333 bits, too large" in refused(
        decode, b'{"value": 1, "ts": ' + huge + b"}")
    assert "not JSON" in refused(decode, b'{"value": ' + b"9" * 5000 + b"}")


def test_json_nested_100000_deep_is_a_bad_payload() -> None:
    for doc in (b"[" * 100_000 + b"]" * 100_000,
                b'{"value": ' + b'{"a": ' * 100_000 + b"1" + b"}" * 100_001):
        for decode in DECODERS.values():
            assert "nested too deep" in refused(decode, doc)


def test_times_that_are_not_seconds_since_1970_are_bad_payloads() -> None:
    decode = DECODERS["value+ts"]
    for ts in (b"1.7e12", b"-1", b'"0001-01-01T00:00:00"', b'"0001-01-01T00:30:00+01:00"',
               b"1e308"):
        assert "ts" in refused(decode, b'{"value": 1, "ts": ' + ts + b"}")
    assert decode(b'{"value": 1, "ts": "9999-12-31T23:59:59Z"}') == (1.0, 253402300799.0)


def test_a_huge_value_is_named_briefly() -> None:
    reason = refused(DECODERS["value+ts"], b'{"value": "' + b"x" * 1_000_000 + b'"}')
    assert len(reason) < 100 and "the string 'xxx" in reason
    reason = refused(DECODERS["value+ts"], b'{"value": [' + b"[1]," * 100_000 + b"1]}")
    assert len(reason) < 100 and "an array" in reason


@FUZZ
@given(st.binary(max_size=300))
def test_any_bytes_are_a_reading_or_a_payload_error(payload: bytes) -> None:
    for decode in (*DECODERS.values(), decode_number):
        reading_or_payload_error(decode, payload)


json_scalars = st.one_of(
    st.none(), st.booleans(), st.floats(), st.text(max_size=30),
    st.integers(), st.integers(min_value=10**300, max_value=10**2000).map(lambda n: -n),
    st.integers(min_value=10**300, max_value=10**2000),
    st.sampled_from(["2024-01-02T03:04:05Z", "0001-01-01T00:00:00", "9999-12-31T23:59:59",
                     "2024-13-45", "1700000000", ""]),
)
json_values = st.recursive(json_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.sampled_from(["v", "t", "1", "x"]), inner,
                                                 max_size=4)), max_leaves=20)


@settings(FUZZ, max_examples=max(100, EXAMPLES // 3))  # ~25 ms each: deep documents
@given(value=json_values, ts=json_values, depth=st.integers(0, 3000),
       shape=st.sampled_from(["flat", "nested", "bare"]))
def test_any_json_document_is_a_reading_or_a_payload_error(value: Any, ts: Any, depth: int,
                                                           shape: str) -> None:
    if shape == "flat":
        doc: Any = {"value": value, "ts": ts}
    elif shape == "nested":
        doc = {"data": [0, {"v": value, "t": ts}]}
    else:
        doc = value
    text = json.dumps(doc)  # NaN and Infinity as JSON's extension spells them
    if depth:  # wrapped in arrays deeper than json's recursion limit, sometimes
        text = "[" * depth + text + "]" * depth
    for decode in (*DECODERS.values(), decode_number):
        reading_or_payload_error(decode, text.encode())


# ---- tester formats: the parsers and the mapping ------------------------------------------

#: every installed tester format (entry points are slow to scan: once)
FORMATS = installed_formats()
#: the most bytes a parser may hold back (a record cut at the end of what was fed)
HELD_BACK = {"stdf": 4 + 65535, "atdf": 1 << 20}


def split_records(data: bytes) -> list[bytes]:
    dec = StdfDecoder()
    dec.feed(data)
    offsets = [r.offset for r in dec.records()] + [dec.position]
    return [data[a:b] for a, b in itertools.pairwise(offsets)]


def _seeds() -> list[tuple[str, list[bytes]]]:
    return [("<", split_records(stdf_bytes(METIS))),
            (">", split_records(stdf_bytes(GALAXY))[:3000])]


_SEEDS: list[tuple[str, list[bytes]]] = []


def seeds() -> list[tuple[str, list[bytes]]]:
    if not _SEEDS:
        _SEEDS.extend(_seeds())
    return _SEEDS


def mutate_record(record: bytes, order: str, op: str, at: int, value: int, n: int) -> bytes:
    """One structural change to one record; REC_LEN kept consistent unless ``op`` is "len"."""
    head, body = record[:4], bytearray(record[4:])
    if op == "cut":
        body = body[:n % (len(body) + 1)]
    elif op == "grow":
        body += bytes([value]) * (n % 40 + 1)
    elif op == "byte" and body:
        body[at % len(body)] = value
    elif op == "ones" and body:
        body[at % len(body):at % len(body) + 2] = b"\xff\xff"
    elif op == "zero":
        return bytes(4) + bytes(body)
    elif op == "len":
        return struct.pack(order + "H", (value << 8 | n) & 0xFFFF) + head[2:] + bytes(body)
    return struct.pack(order + "H", len(body) & 0xFFFF) + head[2:] + bytes(body[:65535])


RECORD_OPS = ["cut", "grow", "byte", "ones", "zero", "len", "dup", "drop", "foreign"]


@st.composite
def mutated_stdf(draw: st.DrawFn) -> bytes:
    """A window of a real tester file (its FAR first), changed record by record and byte
    by byte."""
    which = draw(st.integers(0, 1))
    order, records = seeds()[which]
    start = draw(st.integers(1, len(records) - 1))
    picked = [records[0], *records[start:start + draw(st.integers(0, 150))]]
    for _ in range(draw(st.integers(0, 6))):
        op = draw(st.sampled_from(RECORD_OPS))
        i = draw(st.integers(0, len(picked) - 1))
        at, value, n = draw(st.integers(0, 1000)), draw(st.integers(0, 255)), \
            draw(st.integers(0, 300))
        if op == "dup":
            picked.insert(i, picked[at % len(picked)])
        elif op == "drop":
            if i:
                del picked[i]
        elif op == "foreign":  # a record of the other file, in the other byte order
            other = seeds()[1 - which][1]
            picked.insert(i, other[at % len(other)])
        else:
            picked[i] = mutate_record(picked[i], order, op, at, value, n)
    data = bytearray(b"".join(picked))
    for _ in range(draw(st.integers(0, 3))):
        at = draw(st.integers(0, max(0, len(data) - 1)))
        kind = draw(st.sampled_from(["flip", "insert", "delete", "truncate"]))
        if kind == "flip" and data:
            data[at] ^= draw(st.integers(1, 255))
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif kind == "delete":
            del data[at:at + draw(st.integers(1, 16))]
        else:
            del data[at:]
    return bytes(data)


@st.composite
def written_stdf(draw: st.DrawFn, truncated: bool) -> bytes:
    """Valid STDF from the writer: random records of every type, random field values,
    with all their fields or (``truncated``) only the first few."""
    order = draw(st.sampled_from("<>"))
    w = StdfWriter(order)
    specs = [r for r in RECORDS if r.name != "FAR"]
    out = [w.encode("FAR", {})]
    for spec in draw(st.lists(st.sampled_from(specs), max_size=8)):
        fields = draw(full_record(spec))
        keep = draw(st.integers(0, len(spec.fields))) if truncated else len(spec.fields)
        out.append(w.encode(spec.name, {f.name: fields[f.name] for f in spec.fields[:keep]}))
    return b"".join(out)


chunkings = st.lists(st.integers(1, 5000), min_size=1, max_size=30)


def canonical(records: Iterable[Any]) -> list[str]:
    return [repr(r) for r in records]  # repr: NaN-safe equality


def parse(format_name: str, data: bytes, chunks: list[int] | None) -> tuple[list[str], Any]:
    """Parse and map ``data`` fed in ``chunks`` (sizes, cycled; None: in one piece).
    Returns the records parsed and mapped (canonical), and the FormatError's (message,
    offset) or None.  Any other exception fails the test; so does holding back more than
    one record's worth of bytes."""
    parser = FORMATS[format_name].new_parser()
    mapper = RecordMapper("fuzz", format=format_name, forward_raw=True)
    out: list[Any] = []
    sizes = chunks or [max(1, len(data))]
    fed = 0
    try:
        i = 0
        while fed < len(data):
            piece = data[fed:fed + sizes[i % len(sizes)]]
            i += 1
            parser.feed(piece)
            fed += len(piece)
            for rec in parser.records():
                out.append(rec)
                out.extend(mapper.map(rec, 0.0))
            assert fed - parser.position <= HELD_BACK.get(format_name, 1 << 20) + len(piece)
        for rec in parser.close():
            out.append(rec)
            out.extend(mapper.map(rec, 0.0))
        out.extend(mapper.close(0.0))
    except FormatError as exc:
        assert isinstance(exc.offset, int) and 0 <= exc.offset <= len(data)
        assert exc.message and len(str(exc)) < 400
        return canonical(out), (exc.message, exc.offset)
    return canonical(out), None


def same_outcome_in_any_chunking(format_name: str, data: bytes, chunks: list[int]) -> Any:
    whole = parse(format_name, data, None)
    assert parse(format_name, data, chunks) == whole
    return whole


@FUZZ
@given(mutated_stdf(), chunkings)
def test_mutated_tester_files_are_records_or_a_format_error_in_any_chunking(
        data: bytes, chunks: list[int]) -> None:
    same_outcome_in_any_chunking("stdf", data, chunks)


@settings(FUZZ, max_examples=max(100, EXAMPLES // 3))
@given(written_stdf(truncated=False), chunkings)
def test_whatever_the_writer_writes_is_read_and_mapped_without_error(
        data: bytes, chunks: list[int]) -> None:
    records, error = same_outcome_in_any_chunking("stdf", data, chunks)
    assert error is None and records


@settings(FUZZ, max_examples=max(100, EXAMPLES // 3))
@given(written_stdf(truncated=True), chunkings)
def test_records_written_short_are_read_and_mapped_unless_cut_before_a_field_they_need(
        data: bytes, chunks: list[int]) -> None:
    _, error = same_outcome_in_any_chunking("stdf", data, chunks)
    assert error is None or "record without its" in error[0]


@FUZZ
@given(st.one_of(st.binary(max_size=3000),
                 st.binary(max_size=3000).map(lambda b: StdfWriter("<").encode("FAR", {}) + b),
                 st.binary(max_size=3000).map(lambda b: b"FAR:A|4|2|U\n" + b)),
       chunkings)
def test_random_bytes_to_every_installed_format_are_records_or_a_format_error(
        data: bytes, chunks: list[int]) -> None:
    assert {"stdf", "atdf"} <= set(FORMATS)
    for name in FORMATS:
        same_outcome_in_any_chunking(name, data, chunks)


# ATDF: the example text of the plugin's tests, and a real file's records written as ATDF.

def _atdf_text(records: Iterable[Any]) -> bytes:
    from edgegw_atdf import _LAYOUT

    lines = []
    for rec in records:
        layout = _LAYOUT.get(rec.name)
        if layout is None:
            continue
        f = rec.fields
        values = []
        for name, kind in layout:
            if name == "_PASS_FAIL":
                flg = f.get("TEST_FLG", f.get("PART_FLG", 0))
                values.append("F" if flg & 0x88 else "P")
            elif name == "_FILE_TYP":
                values.append("A")
            elif name.startswith("_") or name not in f:
                values.append("")
            elif kind in ("ints", "floats"):  # lists (an MPR's RTN_INDX and RTN_RSLT)
                values.append(",".join(map(str, f[name])))
            elif kind == "nibbles":  # an MPR's RTN_STAT: one hexadecimal digit each
                values.append(",".join(f"{v:X}" for v in f[name]))
            elif kind == "hex":  # B*n (PRR's PART_FIX)
                values.append(f[name].hex().upper())
            else:
                values.append(str(f[name]).replace("|", "/").replace("\n", " ")
                              .replace("\r", " "))
        lines.append(f"{rec.name}:{'|'.join(values)}".rstrip("|"))
    return ("\n".join(lines) + "\n").encode("latin-1")


_ATDF: list[bytes] = []


def atdf_seeds() -> list[bytes]:
    if not _ATDF:
        dec = StdfDecoder()
        dec.feed(stdf_bytes(METIS))
        _ATDF.extend([ATDF_TEXT.encode(), _atdf_text(dec.records())])
    return _ATDF


def test_the_atdf_seed_from_a_real_file_parses() -> None:
    records, error = parse("atdf", atdf_seeds()[1], None)
    assert error is None and len(records) > 900


ATDF_PIECES = [b"|", b":", b",", b"\n", b"\n ", b"\r\n", b"", b"-1", b"256", b"99999999999",
               b"1e999", b"nan", b"x", b"PTR:", b"PRR:1|1|", b"99:99:99 31-FEB-2024", b"\xff",
               b"1_0", b"\x00", b"MRR:"]


@st.composite
def mutated_atdf(draw: st.DrawFn) -> bytes:
    text = draw(st.sampled_from(atdf_seeds()))
    lines = text.split(b"\n")
    start = draw(st.integers(1, max(1, len(lines) - 1)))
    lines = [lines[0], *lines[start:start + draw(st.integers(0, 60))]]
    for _ in range(draw(st.integers(0, 8))):
        i = draw(st.integers(0, len(lines) - 1))
        line = lines[i]
        at = draw(st.integers(0, len(line)))
        kind = draw(st.sampled_from(["insert", "replace", "delete", "dup", "drop"]))
        if kind == "insert":
            lines[i] = line[:at] + draw(st.sampled_from(ATDF_PIECES)) + line[at:]
        elif kind == "replace":
            lines[i] = line[:at] + draw(st.sampled_from(ATDF_PIECES)) + line[at + 1:]
        elif kind == "delete":
            lines[i] = line[:at] + line[at + draw(st.integers(1, 10)):]
        elif kind == "dup":
            lines.insert(i, lines[draw(st.integers(0, len(lines) - 1))])
        elif i:
            del lines[i]
    return b"\n".join(lines)


@FUZZ
@given(mutated_atdf(), chunkings)
def test_mutated_atdf_is_records_or_a_format_error_in_any_chunking(
        data: bytes, chunks: list[int]) -> None:
    same_outcome_in_any_chunking("atdf", data, chunks)


def test_an_atdf_record_that_never_ends_is_an_error_not_unbounded_memory() -> None:
    parser = FORMATS["atdf"].new_parser()
    parser.feed(b"FAR:A|4|2|U\nDTR:")
    assert [r.name for r in parser.records()] == ["FAR"]
    with pytest.raises(FormatError) as err:
        for _ in range(100):  # 6.4 MB of one line, or one record continued forever
            parser.feed(b"x" * 32768 + b"\n " + b"y" * 32766)
            list(parser.records())
    assert "longer than 1048576 bytes" in err.value.message and err.value.offset == 12


def test_atdf_integers_outside_their_stdf_type_are_errors() -> None:
    for line, field in ((b"PIR:300|1", "HEAD_NUM"), (b"PRR:1|1|p|1|P|70000", "HARD_BIN"),
                        (b"WIR:1|99999999999", "START_T"), (b"SDR:1|1|1,2,256", "SITE_NUM"),
                        (b"PIR:1|" + b"9" * 401, "SITE_NUM")):
        _, error = parse("atdf", b"FAR:A|4|2|U\n" + line + b"\n", None)
        assert error is not None and field in error[0] and error[1] == 12


@pytest.mark.parametrize("name", ["PTR", "MPR", "FTR", "HBR", "SBR", "PCR"])
def test_a_record_cut_before_a_field_it_must_have_is_skipped_and_counted(name: str) -> None:
    """Mapped to nothing but its RawRecord, counted (``cut_short``), the records after it
    mapped (before: a FormatError, the file abandoned; tests/test_stdf_cut_records.py)."""
    w = StdfWriter("<")
    far = w.encode("FAR", {})
    header = w.encode(name, {})[2:4]
    mrr = w.encode("MRR", {"FINISH_T": 0})
    out, error = parse("stdf", far + b"\x00\x00" + header + mrr, None)
    assert error is None
    assert sum(f"rec='{name}'" in r for r in out) == 1  # its RawRecord
    assert "LotEnd(" in out[-1]
    mapper = RecordMapper("t")
    dec = StdfDecoder()
    dec.feed(far + b"\x00\x00" + header)
    assert [r for rec in dec.records() for r in mapper.map(rec, 0.0)] == []
    assert mapper.cut_short == {name: 1}


# ---- the STDF command line on fuzzed files --------------------------------------------------

@settings(FUZZ, max_examples=max(60, EXAMPLES // 5))
@given(mutated_stdf(), st.booleans(), st.sampled_from(["dump", "stats"]))
def test_the_stdf_command_exits_0_or_1_with_one_line_on_any_file(
        data: bytes, gz: bool, action: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / ("f.stdf.gz" if gz else "f.stdf")
        path.write_bytes(gzip.compress(data, mtime=0) if gz else data)
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            status = main(["stdf", action, str(path)])
    assert status in (0, 1)
    lines = err.getvalue().strip().splitlines()
    if status == 1:  # one line, the reason
        assert len(lines) == 1 and ": warning: " not in lines[0]
    else:  # read to its end: warnings only (records cut, trailing garbage after the MRR)
        assert all(": warning: " in line for line in lines)


# ---- the long run's harness stays working ---------------------------------------------------

def test_the_long_fuzz_script_runs_and_finds_nothing(tmp_path: Path) -> None:
    script = Path(__file__).resolve().parents[1] / "scripts" / "fuzz_stdf.py"
    spec = importlib.util.spec_from_file_location("fuzz_stdf", script)
    assert spec is not None and spec.loader is not None
    fuzz = importlib.util.module_from_spec(spec)
    sys.modules["fuzz_stdf"] = fuzz
    spec.loader.exec_module(fuzz)
    result = fuzz.run(count=3000, seed=1, crash_dir=tmp_path, data_dir=stdf_dir())
    assert result["inputs"] == 3000 and result["crashes"] == 0
    assert result["format_errors"] > 0 and result["clean"] > 0
