"""The decoder on the file shapes the shared real files do not cover (``bench/stdf_corpus.py``:
FTR-heavy with varied fail pins, MPR-heavy, varied PTRs on 2 heads x 8 sites big-endian,
GDR-heavy with random and with repeating type-code layouts, a Catalyst-like mix with PTR
tails cut at varying fields): every field of every record equals what pystdf reads from
the same bytes, the fast paths equal the field-by-field reference decoder, and the PTR
tail memo (and GDR layouts) and the chunking change nothing."""

from __future__ import annotations

import sys
from functools import cache
from pathlib import Path

import pytest
from test_stdf_fidelity import as_pystdf, decode_edgegw, decode_pystdf, decode_rows, same

from edgegw.stdf import BY_NAME, StdfDecoder
from edgegw.stdf.decoder import MEMO_SIZE, decode_generic, decoder_table, set_tail_memo

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from stdf_corpus import catalyst, ftr_heavy, gdr_heavy, gdr_layouts, mpr_heavy, ptr_varied

#: a specification of decoding: it holds for the compiled record loop and the pure-Python
#: one alike (tests/decoders.py)
pytestmark = pytest.mark.usefixtures("each_decoder")

#: small versions of the bench's shapes (same generators, fewer parts)
SHAPES = {
    "ftr-heavy": lambda: ftr_heavy(parts=24),
    "ftr-heavy big-endian": lambda: ftr_heavy(">", parts=12),
    "mpr-heavy": lambda: mpr_heavy(parts=16),
    "ptr-varied": lambda: ptr_varied(parts=2),
    "gdr-heavy": lambda: gdr_heavy(parts=30),
    "gdr-heavy big-endian": lambda: gdr_heavy(">", parts=10),
    "gdr-layouts": lambda: gdr_layouts(parts=20),
    "gdr-layouts big-endian": lambda: gdr_layouts(">", parts=8),
    "catalyst": lambda: catalyst(parts=12),
    "catalyst big-endian": lambda: catalyst(">", parts=6),
}


@cache
def shape(name: str) -> bytes:
    return SHAPES[name]()


@pytest.mark.parametrize("name", SHAPES)
def test_every_field_of_every_shape_equals_pystdf(name: str) -> None:
    data = shape(name)
    ours, theirs = decode_edgegw(data), decode_pystdf(data)
    assert [n for n, _ in ours] == [n for n, _ in theirs]
    kinds = {n for n, _ in ours}
    assert kinds >= {"PIR", "PRR", "PTR"}
    for index, ((rec, fields), (_, values)) in enumerate(zip(ours, theirs, strict=True)):
        spec = BY_NAME[rec]
        for f, theirs_value in zip(spec.fields, values, strict=True):
            if f.name not in fields:
                assert theirs_value is None, (name, index, rec, f.name)
                continue
            ours_value = as_pystdf(f.type, f.count, fields[f.name])
            assert same(ours_value, theirs_value), (
                f"{name} record {index} {rec}.{f.name}: edgegw {ours_value!r}, "
                f"pystdf {theirs_value!r}")


@pytest.mark.parametrize("name", SHAPES)
def test_every_record_of_every_shape_equals_the_reference_decoder(name: str) -> None:
    data = shape(name)
    dec = StdfDecoder()
    dec.feed(data)
    records = list(dec.records())
    assert dec.byte_order is not None
    readers = decoder_table(dec.byte_order).readers
    for rec in records:
        end = rec.offset + 4 + int.from_bytes(
            data[rec.offset:rec.offset + 2], "little" if dec.byte_order == "<" else "big")
        assert rec.fields == decode_generic(BY_NAME[rec.name], readers, data,
                                            rec.offset + 4, end), (name, rec.offset)


@pytest.mark.parametrize("name", SHAPES)
def test_memo_and_chunking_change_nothing(name: str) -> None:
    data = shape(name)
    whole = decode_edgegw(data)
    try:
        set_tail_memo(0)
        assert decode_edgegw(data) == whole
        set_tail_memo(7)  # overflowing all the time
        assert decode_edgegw(data) == whole
    finally:
        set_tail_memo(MEMO_SIZE)
    dec = StdfDecoder()
    got = []
    for start in range(0, len(data), 997):
        dec.feed(data[start:start + 997])
        got.extend((r.name, r.fields) for r in dec.records())
    assert got == whole and dec.buffered == 0


@pytest.mark.parametrize("name", SHAPES)
def test_rows_hold_the_same_records_with_the_memo_on_and_off(name: str) -> None:
    data = shape(name)
    whole = decode_edgegw(data)
    try:
        for memo in (MEMO_SIZE, 0, 7):
            set_tail_memo(memo)
            assert decode_rows(data) == whole, memo
            assert decode_rows(data, 997) == whole, memo
    finally:
        set_tail_memo(MEMO_SIZE)
