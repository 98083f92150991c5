"""GDR layouts: a GDR whose type codes repeat an earlier GDR's is read by a reader compiled
for that sequence of codes, and gives exactly what the value-by-value reader and the
field-by-field reference decoder give -- every type code, any bit pattern (NaN payloads,
-0.0), both byte orders, pad bytes, a layout that changes mid-file, a type code flipped to
another of the same size, a record cut inside its values, an unknown type code, any
chunking; and on the real files.  The value-by-value reader is what ``set_tail_memo(0)``
leaves (the figure "without memos" of bench/stdf_decode.py)."""

from __future__ import annotations

import struct
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from shared_data import GALAXY, METIS, stdf_bytes

from edgegw.stdf import BY_NAME, StdfDecoder, StdfError, StdfWriter
from edgegw.stdf.decoder import MEMO_SIZE, decode_generic, decoder_table, set_tail_memo

#: these tests check the pure-Python record loop's own fast paths (tests/decoders.py)
pytestmark = pytest.mark.usefixtures("python_decoder")

#: GDR type code -> bytes of its fixed-size value (13, N*1, takes a whole byte)
FIXED = {1: 1, 2: 2, 3: 4, 4: 1, 5: 2, 6: 4, 7: 4, 8: 8, 13: 1}
CODES = [0, *FIXED, 10, 11, 12]
#: codes whose values take the same bytes: one flipped to another passes any size check
SAME_SIZE = [(1, 4, 13), (2, 5), (3, 6, 7), (10, 11)]
GDR = BY_NAME["GDR"]


def key(value: Any) -> Any:
    """A value with its floats as their bits: NaN == NaN, -0.0 != 0.0."""
    if isinstance(value, float):
        return ("float", struct.pack(">d", value))
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, [key(v) for v in value])
    return (type(value).__name__, value)


def gdr_value(draw: st.DrawFn, code: int, order: str) -> bytes:
    """The bytes of one value of type ``code`` after its type byte: any bit pattern."""
    if code == 0:
        return b""
    if code in FIXED:
        return draw(st.binary(min_size=FIXED[code], max_size=FIXED[code]))
    if code in (10, 11):
        n = draw(st.integers(0, 12))
        return bytes([n]) + draw(st.binary(min_size=n, max_size=n))
    nbits = draw(st.integers(0, 40))
    size = (nbits + 7) // 8
    return struct.pack(order + "H", nbits) + draw(st.binary(min_size=size, max_size=size))


def gdr(order: str, codes: list[int], values: list[bytes], cut: int | None = None) -> bytes:
    """A GDR record of these codes and value bytes; ``cut``: its body ends there."""
    body = struct.pack(order + "H", len(codes)) + b"".join(
        bytes([c]) + v for c, v in zip(codes, values, strict=True))
    if cut is not None:
        body = body[:cut]
    return struct.pack(order + "HBB", len(body), GDR.typ, GDR.sub) + body


def decode(data: bytes, rows: bool = True, chunk: int | None = None) -> list[Any]:
    dec = StdfDecoder()
    got: list[Any] = []
    for start in range(0, len(data), chunk or len(data)):
        dec.feed(data[start:start + (chunk or len(data))])
        got += dec.rows() if rows else dec.records()
    assert dec.buffered == 0
    return [key(r) for r in got]


def reference(data: bytes, order: str) -> list[tuple[str, int, tuple[Any, ...]]]:
    """Every GDR decoded by the field-by-field reference decoder, as rows."""
    readers = decoder_table(order).readers
    u2 = struct.Struct(order + "H").unpack_from
    out, pos = [], u2(data, 0)[0] + 4  # after the FAR
    while pos < len(data):
        end = pos + 4 + u2(data, pos)[0]
        fields = decode_generic(GDR, readers, data, pos + 4, end)
        out.append(("GDR", pos, tuple(fields.values())))
        pos = end
    return out


@pytest.fixture(autouse=True)
def memo_restored() -> Iterator[None]:
    yield
    set_tail_memo(MEMO_SIZE)


@st.composite
def streams(draw: st.DrawFn) -> tuple[str, bytes]:
    """A file of GDRs of a few layouts in any order, their values any bit patterns, some
    with one type code flipped to another of the same size, some cut inside; the whole
    sequence three times."""
    order = draw(st.sampled_from("<>"))
    layouts = draw(st.lists(st.lists(st.sampled_from(CODES), max_size=10), min_size=1,
                            max_size=3))
    out = []
    for _ in range(draw(st.integers(1, 12))):
        codes = list(draw(st.sampled_from(layouts)))
        if codes and draw(st.integers(0, 4)) == 0:
            i = draw(st.integers(0, len(codes) - 1))
            group = next((g for g in SAME_SIZE if codes[i] in g), (codes[i],))
            codes[i] = draw(st.sampled_from(group))
        values = [gdr_value(draw, c, order) for c in codes]
        cut = None
        if draw(st.integers(0, 6)) == 0:
            cut = draw(st.integers(0, 2 + sum(1 + len(v) for v in values)))
        out.append(gdr(order, codes, values, cut))
    # three times over: a layout's reader is compiled the third time it is seen
    return order, StdfWriter(order).encode("FAR", {}) + b"".join(out) * 3


@settings(max_examples=200, deadline=None)
@given(streams())
def test_gdrs_of_any_layouts_equal_the_reference_decoder(stream: tuple[str, bytes]) -> None:
    order, data = stream
    want = key(reference(data, order))[1]
    for memo in (MEMO_SIZE, 0):
        set_tail_memo(memo)
        for _ in range(2):  # the second time through, the readers compiled are tried first
            assert decode(data)[1:] == want
        assert decode(data, chunk=7)[1:] == want
        dicts = decode(data, rows=False)[1:]
        assert [d[1][:2] for d in dicts] == [r[1][:2] for r in want]


@contextmanager
def layout_reads() -> Iterator[list[bool]]:
    """Each call of a compiled layout reader: whether it read the GDR (not None)."""
    got: list[bool] = []

    def hook(frame: FrameType, event: str, arg: Any) -> None:
        if event == "return" and frame.f_code.co_filename.startswith("<stdf GDR layout"):
            got.append(arg is not None)

    sys.setprofile(hook)
    try:
        yield got
    finally:
        sys.setprofile(None)


def every_code(order: str, n: int) -> tuple[bytes, list[int], list[bytes]]:
    """A file of ``n`` GDRs of one layout holding every type code, pads included, an
    R*4 -0.0 and an R*8 NaN with a payload; its codes and their values' bytes."""
    codes = [10, *FIXED, 0, 11, 12, 0, 10]
    values = [b"\x03abc", b"\x01", b"\x00\x02", b"\x00\x00\x80\x7f", b"\xff", b"\x00\x80",
              b"\x01\x00\x00\x80", b"\x00\x00\x00\x80",
              b"\x01\x00\x00\x00\x00\x00\xf0\x7f", b"\x0f", b"", b"\x02\xfe\xff",
              b"\x0a\x00\xff\x03", b"", b"\x00"]
    if order == ">":
        values = [v[::-1] if c in (2, 3, 5, 6, 7, 8) else v
                  for c, v in zip(codes, values, strict=True)]
        values[codes.index(12)] = b"\x00\x0a\xff\x03"
    data = StdfWriter(order).encode("FAR", {}) + gdr(order, codes, values) * n
    return data, codes, values


@pytest.mark.parametrize("order", "<>")
def test_a_repeated_layout_is_read_by_its_compiled_reader_and_gives_the_same_values(
        order: str) -> None:
    data, codes, raw = every_code(order, 50)
    ref = reference(data, order)
    want = key(ref)[1]
    (values,) = ref[0][2]
    assert [c for c, _ in values] == codes
    # -0.0 and the NaN's payload survive, as their bits
    assert struct.pack(order + "f", values[codes.index(7)][1]) == raw[codes.index(7)]
    assert struct.pack(order + "d", values[codes.index(8)][1]) == raw[codes.index(8)]
    decode(data)  # compiles the layout's reader (and the decoders) outside the count
    with layout_reads() as reads:
        got = decode(data)
    assert got[1:] == want
    # a new decoder learns for its own file: its first GDR is read value by value and
    # finds the reader compiled before, which reads the 49 others
    assert reads.count(True) == 49 and not reads.count(False)
    set_tail_memo(0)
    with layout_reads() as reads:
        assert decode(data)[1:] == want
    assert reads == []


@pytest.mark.parametrize("order", "<>")
@pytest.mark.parametrize("group", SAME_SIZE)
def test_a_type_code_flipped_to_one_of_the_same_size_is_not_read_as_the_old_one(
        order: str, group: tuple[int, ...]) -> None:
    size = FIXED.get(group[0], 0)
    value = b"\x05hello" if not size else bytes(range(0xF1, 0xF1 + size))
    w = StdfWriter(order)
    codes = [3, group[0], 10]
    tail = [b"\x00\x00\x00\x01", value, b"\x01z"]
    data = w.encode("FAR", {}) + gdr(order, codes, tail) * 3
    for flipped in group[1:]:  # the same bytes under each code of the group, mid-file
        data += gdr(order, [3, flipped, 10], tail) + gdr(order, codes, tail)
    ref = reference(data, order)
    assert {row[2][0][1][0] for row in ref} == set(group)
    want = key(ref)[1]
    decode(data)
    with layout_reads() as reads:
        assert decode(data)[1:] == want
    assert reads.count(False) >= len(group) - 1  # each flip was tried and refused


@pytest.mark.parametrize("order", "<>")
def test_an_unknown_type_code_where_a_layout_has_a_known_one_is_the_same_error(
        order: str) -> None:
    w = StdfWriter(order)
    good = gdr(order, [1, 3], [b"\x07", b"\x00\x00\x00\x09"])
    bad = gdr(order, [1, 9], [b"\x07", b"\x00\x00\x00\x09"])
    data = w.encode("FAR", {}) + good * 3 + bad
    errors = []
    for memo in (MEMO_SIZE, 0):
        set_tail_memo(memo)
        with pytest.raises(StdfError) as exc:
            decode(data)
        errors.append((str(exc.value), exc.value.offset))
    assert errors[0] == errors[1]
    assert "unknown type code 9" in errors[0][0]


@pytest.mark.parametrize("name", [GALAXY, METIS])
def test_the_real_files_decode_the_same_with_and_without_layouts(name: str) -> None:
    data = stdf_bytes(name)
    with layout_reads() as reads:
        rows, dicts, chunked = decode(data), decode(data, rows=False), decode(data, chunk=997)
    set_tail_memo(0)
    assert decode(data) == rows == chunked
    assert decode(data, rows=False) == dicts
    if name == GALAXY:  # 784 GDRs of (C*n, I*4), a few learnt again after each feed
        assert reads.count(True) > 3 * 700


@contextmanager
def compiles() -> Iterator[list[int]]:
    """Each call of the built-in ``compile``."""
    got: list[int] = []

    def hook(frame: FrameType, event: str, arg: Any) -> None:
        if event == "c_call" and arg is compile:
            got.append(1)

    sys.setprofile(hook)
    try:
        yield got
    finally:
        sys.setprofile(None)


@pytest.mark.parametrize("repeats", [3, 4])
def test_layouts_that_barely_repeat_compile_few_readers(repeats: int) -> None:
    """A compile costs what a few hundred reads by a layout save: 300 layouts each seen
    three or four times are mostly left to the value-by-value reader."""
    w = StdfWriter("<")
    layouts = [[1 + i % 8, 1 + i // 8 % 8, 1 + i // 64 % 8, 13] for i in range(300)]
    data = w.encode("FAR", {}) + b"".join(
        gdr("<", codes, [bytes(FIXED[c]) for c in codes]) * repeats for codes in layouts)
    want = key(reference(data, "<"))[1]
    decode(w.encode("FAR", {}) + gdr("<", [1], [b"\x00"]))  # the decoders compile here
    for _ in range(2):
        with compiles() as made:
            assert decode(data)[1:] == want
        assert len(made) <= 8
