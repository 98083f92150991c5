"""The compiled record loop (``edgegw/stdf/_accel.c``) decodes exactly as the pure-Python
decoder, its reference: the same records (every value, its type, the bits of every
float), the same positions, the same skipped and unknown counts and the same errors at
the same offsets -- on every real file and on any stream the writer makes, cut, mixed with
unknown records, switching byte order at a second FAR, corrupted, fed in any chunks.
"""

from __future__ import annotations

import os
import struct
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from decoders import require_compiled
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from shared_data import GALAXY, METIS, stdf_bytes
from test_stdf_writer import full_record

from edgegw.stdf import RECORDS, StdfDecoder, StdfError, StdfWriter
from edgegw.stdf.decoder import accelerator_active, accelerator_built, set_accelerator

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from stdf_corpus import (
    catalyst,
    ftr_heavy,
    gdr_heavy,
    gdr_layouts,
    mpr_heavy,
    ptr_varied,
)


@pytest.fixture(autouse=True)
def _restore() -> Iterator[None]:
    require_compiled()  # comparing the pure-Python loop with itself proves nothing
    was = accelerator_active()
    yield
    set_accelerator(was)


def test_the_compiled_loop_is_built_and_on_by_default() -> None:
    """The test command installs with a C compiler: the loop is built, and used unless
    EDGEGW_STDF_ACCEL=0; without it the pure-Python decoder is used (and cannot be
    turned "on")."""
    assert accelerator_built()
    assert accelerator_active() == (os.environ.get("EDGEGW_STDF_ACCEL", "1") != "0")
    assert set_accelerator(False) is False and not accelerator_active()
    assert set_accelerator(True) is True


def canon(value: Any) -> Any:
    """A value compared exactly: its type, and a float by its bits (NaN equals itself)."""
    if isinstance(value, float):
        return ("float", struct.pack("<d", value).hex())
    if isinstance(value, dict):
        return ("dict", tuple((k, canon(v)) for k, v in value.items()))
    if isinstance(value, tuple | list):
        return (type(value).__name__, tuple(canon(v) for v in value))
    return (type(value).__name__, value)


def outcome(data: bytes, compiled: bool, *, rows: bool, cuts: list[int] | None = None,
            **options: Any) -> tuple[Any, ...]:
    """Everything a consumer can see of decoding ``data`` fed in pieces ending at
    ``cuts``, up to the first error."""
    set_accelerator(compiled)
    dec = StdfDecoder(**options)
    got: list[Any] = []
    error = None
    start = 0
    try:
        for end in [*(cuts or []), len(data)]:
            dec.feed(data[start:end])
            start = end
            for record in dec.rows() if rows else dec.records():
                got.append((canon(record), dec.position))
    except StdfError as exc:
        error = (str(exc), exc.offset)
    return (got, error, dec.position, dec.buffered, dec.byte_order, dec.skipped,
            dec.skipped_short, dec.unknown_count, dec.unknown_types)


def assert_same(data: bytes, **kw: Any) -> tuple[Any, ...]:
    compiled = outcome(data, True, **kw)
    python = outcome(data, False, **kw)
    assert compiled == python
    return compiled


REAL = [GALAXY, METIS]
#: the bench's synthetic tester shapes (bench/stdf_corpus.py), a tenth of their size or less
SHAPES = {"ftr-heavy": lambda: ftr_heavy(parts=40), "mpr-heavy": lambda: mpr_heavy(parts=60),
          "ptr-varied": lambda: ptr_varied(parts=4), "gdr-heavy": lambda: gdr_heavy(parts=100),
          "gdr-layouts": lambda: gdr_layouts(">", parts=100),
          "catalyst": lambda: catalyst(">", parts=30)}


@pytest.mark.parametrize("name", REAL)
@pytest.mark.parametrize("rows", [True, False], ids=["rows", "records"])
def test_every_real_file_decodes_the_same(name: str, rows: bool) -> None:
    data = stdf_bytes(name)
    got = assert_same(data, rows=rows)
    assert got[1] is None and got[3] == 0 and len(got[0]) > 900
    # in 64 KiB chunks (records cut at every chunk's end), and a FAR, MIR and a few
    # bytes at a time at the start
    assert_same(data, rows=rows, cuts=[*range(1, 200, 7), *range(65536, len(data), 65536)])


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_every_tester_shape_decodes_the_same(shape: str) -> None:
    """FTR-, MPR- and GDR-heavy files, varied PTRs big-endian, a Catalyst-like mix."""
    data = SHAPES[shape]()
    assert_same(data, rows=True)
    assert_same(data, rows=False, cuts=list(range(4096, len(data), 4096)))


@pytest.mark.parametrize("name", REAL)
def test_skipping_counts_the_same(name: str) -> None:
    """``edgegw stdf stats`` reads a few types and counts the rest (short ones too)."""
    data = stdf_bytes(name)
    got = assert_same(data, rows=True, types=["PIR", "PRR", "HBR", "SBR", "PCR"], short=12)
    assert got[5]["PTR"] > 500


# ---------------------------------------------------------------- any stream


@st.composite
def streams(draw: st.DrawFn) -> tuple[bytes, list[int]]:
    """A FAR and records of any type, each whole or written up to any field, some cut
    inside a field (REC_LEN shortened), some of unknown or reserved types, a second FAR
    in the other byte order, a few bytes corrupted; and where the feeds end."""
    order = draw(st.sampled_from("<>"))
    writer = StdfWriter(order)
    parts = [writer.encode("FAR", {})]
    for _ in range(draw(st.integers(0, 12))):
        kind = draw(st.sampled_from(["record"] * 8 + ["cut", "unknown", "reserved", "far"]))
        if kind == "far":  # a second lot, possibly written by the other byte order's tester
            order = draw(st.sampled_from("<>"))
            writer = StdfWriter(order)
            parts.append(writer.encode("FAR", {}))
            continue
        if kind in ("unknown", "reserved"):
            typ = 180 if kind == "reserved" else draw(st.sampled_from([3, 99, 250]))
            body = draw(st.binary(max_size=20))
            parts.append(struct.pack(order + "HBB", len(body), typ, 7) + body)
            continue
        spec = draw(st.sampled_from([r for r in RECORDS if r.name != "FAR"]))
        full = draw(full_record(spec))
        keep = draw(st.integers(0, len(spec.fields)))
        record = writer.encode(spec.name, {f.name: full[f.name] for f in spec.fields[:keep]})
        if kind == "cut" and len(record) > 4:  # REC_LEN shortened: a field cut inside
            rec_len = draw(st.integers(0, len(record) - 5))
            record = struct.pack(order + "H", rec_len) + record[2:4 + rec_len]
        parts.append(record)
    data = bytearray(b"".join(parts))
    for _ in range(draw(st.integers(0, 2))):  # corruption: any byte, any value
        data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    cuts = sorted(draw(st.sets(st.integers(1, max(1, len(data) - 1)), max_size=4)))
    return bytes(data), cuts


@settings(max_examples=400, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(streams(), st.booleans(), st.booleans(),
       st.sampled_from([(), ("PTR",), ("GDR", "MPR"), ("PRR", "PIR", "FTR", "DTR")]))
def test_any_stream_decodes_the_same(stream: tuple[bytes, list[int]], rows: bool,
                                     keep_unknown: bool, skip: tuple[str, ...]) -> None:
    data, cuts = stream
    assert_same(data, rows=rows, cuts=cuts, keep_unknown=keep_unknown, skip=skip, short=9)


def test_an_unknown_gdr_type_code_is_the_same_error_at_the_same_offset() -> None:
    """The one error inside a record: the compiled loop leaves the record to Python."""
    w = StdfWriter("<")
    gdr = bytearray(w.encode("GDR", {"GEN_DATA": [(1, 5), (10, "ok")]}))
    gdr[4 + 2 + 2] = 9  # the second field's type code: 9 is no type
    data = w.encode("FAR", {}) + w.encode("PIR", {"HEAD_NUM": 1, "SITE_NUM": 1}) + bytes(gdr)
    for skip in ((), ("GDR",)):
        got = assert_same(data, rows=True, skip=skip)
        assert got[1] is not None and "type code 9" in got[1][0]
        assert len(got[0]) == 2  # the FAR and the PIR before it


#: one value of every GDR type code, as its bytes after the code (little-endian): the
#: widths a skipped GDR is walked by (a Dn of 9 bits takes 2 bytes)
GDR_VALUES = {0: b"", 1: b"\x05", 2: b"\x2c\x01", 3: b"\x70\x11\x01\x00", 4: b"\xfd",
              5: b"\xd4\xfe", 6: b"\x90\xee\xfe\xff", 7: struct.pack("<f", 1.5),
              8: struct.pack("<d", 2.5), 10: b"\x03abc", 11: b"\x02\x01\x02",
              12: b"\x09\x00\xff\x01", 13: b"\x07"}


def gdr(*values: tuple[int, bytes]) -> bytes:
    """A GDR built by hand, little-endian: (type code, the value's bytes) per field."""
    body = struct.pack("<H", len(values)) + b"".join(bytes([c]) + v for c, v in values)
    return struct.pack("<HBB", len(body), 50, 10) + body


@pytest.mark.parametrize("code", sorted(GDR_VALUES))
def test_a_skipped_gdr_is_walked_over_every_type_code_as_the_python_loop_reads_it(
        code: int) -> None:
    """Skipped or not, a GDR with a value of each type code before an unknown code is
    the same error at the same offset, and before a known one the same record (or the
    same skip): the compiled loop's walk of a skipped GDR steps over each value as
    reading it would."""
    w = StdfWriter("<")
    head = w.encode("FAR", {}) + w.encode("PIR", {"HEAD_NUM": 1, "SITE_NUM": 1})
    for skip in ((), ("GDR",)):
        bad = assert_same(head + gdr((code, GDR_VALUES[code]), (9, b"")), rows=True,
                          skip=skip)
        assert bad[1] is not None and "type code 9" in bad[1][0]
        good = assert_same(head + gdr((code, GDR_VALUES[code]), (1, b"\x05")), rows=True,
                           skip=skip)
        assert good[1] is None and len(good[0]) == (2 if skip else 3)
