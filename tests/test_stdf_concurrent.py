"""Several decoders at once, as a gateway tailing several files runs them: each file's
records are what the file decodes to alone, whatever the other decoders read in
between, and what a decoder learns about its file (the PTR and FTR tail memos, the GDR
layouts) is its own -- a file whose tails never repeat turns the memo off for itself,
not for the file beside it, and a new decoder does not make the others learn afresh."""

from __future__ import annotations

import random
import struct
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from shared_data import GALAXY, METIS, stdf_bytes

from edgegw.stdf import StdfDecoder, StdfWriter
from edgegw.stdf.decoder import MEMO_SIZE, set_tail_memo, tail_memo_active

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from stdf_corpus import catalyst, ftr_heavy, gdr_heavy, gdr_layouts, ptr_varied

GDR_TYP, GDR_SUB = 50, 10


@pytest.fixture(autouse=True)
def memo_restored() -> Iterator[None]:
    yield
    set_tail_memo(MEMO_SIZE)


def alone(data: bytes, rows: bool) -> str:
    dec = StdfDecoder()
    dec.feed(data)
    got = list(dec.rows() if rows else dec.records())
    assert dec.buffered == 0
    return repr(got)  # repr: NaN == NaN


def interleaved(files: list[bytes], chunk: int, rows: bool) -> list[str]:
    """Each file fed to its own decoder ``chunk`` bytes at a time, the decoders taking
    turns, every record read as soon as it is complete."""
    decoders = [StdfDecoder() for _ in files]
    got: list[list[Any]] = [[] for _ in files]
    for start in range(0, max(map(len, files)), chunk):
        for dec, data, out in zip(decoders, files, got, strict=True):
            if start < len(data):
                dec.feed(data[start:start + chunk])
                out += dec.rows() if rows else dec.records()
    assert all(dec.buffered == 0 for dec in decoders)
    return [repr(out) for out in got]


@pytest.mark.parametrize("rows", [True, False], ids=["rows", "dicts"])
@pytest.mark.parametrize("memo", [MEMO_SIZE, 7, 0])
def test_interleaved_decoders_give_each_file_the_records_it_gives_alone(
        rows: bool, memo: int) -> None:
    set_tail_memo(memo)
    # both byte orders, repeating and varying PTR and FTR tails, repeating and random
    # GDR layouts; two of each order, so that decoders share compiled code
    files = [stdf_bytes(GALAXY), ptr_varied(parts=2), stdf_bytes(METIS),
             ftr_heavy(parts=12), gdr_layouts(parts=20), gdr_heavy(parts=20),
             catalyst(parts=6)]
    want = [alone(data, rows) for data in files]
    assert interleaved(files, 4093, rows) == want
    assert interleaved(files[3:], 311, rows) == want[3:]


def ptr(w: StdfWriter, lo: float) -> bytes:
    return w.encode("PTR", {"TEST_NUM": 1, "HEAD_NUM": 1, "SITE_NUM": 0, "TEST_FLG": 0,
                            "PARM_FLG": 0, "RESULT": 0.5, "TEST_TXT": "t", "ALARM_ID": "",
                            "OPT_FLAG": 0, "RES_SCAL": 0, "LLM_SCAL": 0, "HLM_SCAL": 0,
                            "LO_LIMIT": lo, "HI_LIMIT": 2.0, "UNITS": "V"})


def gdr(codes: list[int]) -> bytes:
    """A little-endian GDR of these type codes (U*1, U*2, I*4 values: zeros)."""
    size = {1: 1, 2: 2, 6: 4}
    body = struct.pack("<H", len(codes)) + b"".join(
        bytes([c]) + bytes(size[c]) for c in codes)
    return struct.pack("<HBB", len(body), GDR_TYP, GDR_SUB) + body


@pytest.mark.usefixtures("python_decoder")  # the Python loop's own memo
def test_a_file_whose_tails_never_repeat_turns_off_its_own_memo_not_the_other_files() -> None:
    """Interleaved: a file of PTRs whose tails repeat and GDRs of one layout, and a file
    of PTRs whose limits change every record and GDRs of random type codes.  The second
    file's memo and layouts turn themselves off (their misses cost speed); the first
    file's stay on, and a decoder made meanwhile (a third file) changes neither."""
    set_tail_memo(8)  # the memo decides after 8 distinct tails
    w = StdfWriter("<")
    rnd = random.Random(5)
    steady = w.encode("FAR", {}) + b"".join(ptr(w, 1.0) + gdr([2, 6, 1, 6]) for _ in range(700))
    varying = w.encode("FAR", {}) + b"".join(
        ptr(w, float(i)) + gdr([rnd.choice((1, 2, 6)) for _ in range(8)]) for i in range(700))
    a, b = StdfDecoder(), StdfDecoder()
    got_a: list[Any] = []
    got_b: list[Any] = []
    for start in range(0, max(len(steady), len(varying)), 1000):
        a.feed(steady[start:start + 1000])
        got_a += a.rows()
        b.feed(varying[start:start + 1000])
        got_b += b.rows()
        if start == 5000:
            StdfDecoder()  # a new file opened meanwhile: learns for itself only
    assert not tail_memo_active(b)
    assert tail_memo_active(a)
    assert tail_memo_active(StdfDecoder())  # nothing learnt yet: on
    assert [repr(got_a), repr(got_b)] == [alone(steady, True), alone(varying, True)]


@pytest.mark.usefixtures("python_decoder")  # the Python loop's own memo
def test_ptrs_cut_after_their_text_do_not_keep_the_memo_on_for_tails_that_never_repeat(
        ) -> None:
    """The catalyst shape's mix: full PTRs whose limits drift every record, between PTRs
    cut after TEST_TXT that repeat.  The short ones are never kept, so they do not count
    as hits that would keep the memo on while every full tail misses (and costs); the
    records are the same as without the memo."""
    set_tail_memo(8)
    w = StdfWriter("<")
    short = w.encode("PTR", {"TEST_NUM": 1, "HEAD_NUM": 1, "SITE_NUM": 0, "TEST_FLG": 0,
                             "PARM_FLG": 0, "RESULT": 0.5, "TEST_TXT": "t"})
    data = w.encode("FAR", {}) + b"".join(ptr(w, float(i)) + short for i in range(100))
    dec = StdfDecoder()
    dec.feed(data)
    got = repr(list(dec.rows()))
    assert not tail_memo_active(dec)
    set_tail_memo(0)
    assert got == alone(data, True)
