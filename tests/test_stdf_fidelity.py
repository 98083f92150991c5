"""Fidelity: edgegw decodes the real tester files exactly as pystdf (the independent
reader) does, record for record and field for field, and the bin and part counts derived
from the PRRs agree with the tester's own HBR/SBR/PCR summaries."""

from __future__ import annotations

import struct
from collections import Counter
from typing import Any

import pytest
from shared_data import stdf_bytes

from edgegw.stdf import ALL_SITES, BY_NAME, Bits, StdfDecoder, StdfStats
from edgegw.stdf.decoder import FIELD_NAMES, MEMO_SIZE, set_tail_memo

#: a specification of decoding: it holds for the compiled record loop and the pure-Python
#: one alike (tests/decoders.py)
pytestmark = pytest.mark.usefixtures("each_decoder")

FILES = ("metis-d10-2site.std", "galaxy-a530-lot2.stdf.gz")


def decode_edgegw(data: bytes) -> list[tuple[str, dict[str, Any]]]:
    dec = StdfDecoder()
    dec.feed(data)
    records = [(r.name, r.fields) for r in dec.records()]
    assert dec.buffered == 0 and dec.unknown_count == 0
    return records


def decode_rows(data: bytes, chunk: int = 0) -> list[tuple[str, dict[str, Any]]]:
    """``StdfDecoder.rows()``, each row's values put under their field names."""
    dec = StdfDecoder()
    out = []
    for start in range(0, len(data), chunk or len(data)):
        dec.feed(data[start:start + chunk] if chunk else data)
        out.extend((name, dict(zip(FIELD_NAMES[name], values, strict=False)))
                   for name, _, values in dec.rows())
    assert dec.buffered == 0 and dec.unknown_count == 0
    return out


def decode_pystdf(data: bytes) -> list[tuple[str, list[Any]]]:
    import io

    from pystdf.IO import Parser

    out: list[tuple[str, list[Any]]] = []

    class Sink:
        def after_send(self, source: object, data: tuple[Any, list[Any]]) -> None:
            rec_type, fields = data
            out.append((type(rec_type).__name__.upper(), list(fields)))

        def __getattr__(self, name: str) -> Any:
            return lambda *args: None

    parser = Parser(inp=io.BytesIO(data))
    parser.addSink(Sink())
    parser.parse()
    return out


def as_pystdf(field_type: str, count: str | None, value: Any) -> Any:
    """Our representation of one value -> pystdf's (lists of byte values for B*n/D*n,
    packed bytes for kxN*1 arrays, GDR values without their type codes)."""
    if count is not None and field_type == "N1":
        padded = [*value, 0] if len(value) % 2 else value
        return [lo | hi << 4 for lo, hi in zip(padded[::2], padded[1::2], strict=True)]
    if isinstance(value, Bits):
        return list(value.data)
    if isinstance(value, bytes):
        return list(value)
    if field_type == "Vn":
        return [as_pystdf("", None, v) for code, v in value if code != 0]
    return value


def same(a: Any, b: Any) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        # R*4 values: equal once both are rounded to float32 (NaN equals NaN)
        return struct.pack("<f", a) == struct.pack("<f", b)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


@pytest.fixture(scope="module", params=FILES)
def decoded(request: pytest.FixtureRequest) -> tuple[str, list, list]:
    data = stdf_bytes(request.param)
    return request.param, decode_edgegw(data), decode_pystdf(data)


def test_record_counts_by_type_equal_pystdf(decoded: tuple[str, list, list]) -> None:
    _name, ours, theirs = decoded
    assert Counter(n for n, _ in ours) == Counter(n for n, _ in theirs)
    assert [n for n, _ in ours] == [n for n, _ in theirs]


def test_every_field_value_equals_pystdf(decoded: tuple[str, list, list]) -> None:
    name, ours, theirs = decoded
    compared = 0
    for index, ((rec, fields), (_, values)) in enumerate(zip(ours, theirs, strict=True)):
        spec = BY_NAME[rec]
        for f, theirs_value in zip(spec.fields, values, strict=True):
            if f.name not in fields:
                # a field pystdf reports as None is one the record's REC_LEN left out
                assert theirs_value is None, (name, index, rec, f.name)
                continue
            ours_value = as_pystdf(f.type, f.count, fields[f.name])
            assert same(ours_value, theirs_value), (
                f"{name} record {index} {rec}.{f.name}: edgegw {ours_value!r}, "
                f"pystdf {theirs_value!r}")
            compared += 1
    assert compared > 1000


@pytest.mark.parametrize("name", FILES)
def test_rows_hold_the_same_records_with_the_memo_on_and_off_in_any_chunking(
        name: str) -> None:
    data = stdf_bytes(name)
    records = repr(decode_edgegw(data))  # repr: NaN-safe
    try:
        for memo in (MEMO_SIZE, 0, 7):
            set_tail_memo(memo)
            assert repr(decode_rows(data)) == records, memo
            assert repr(decode_rows(data, 4093)) == records, memo
    finally:
        set_tail_memo(MEMO_SIZE)


def test_readme_record_counts() -> None:
    """The counts the data README states (as an independent reader counts them)."""
    metis = Counter(n for n, _ in decode_edgegw(stdf_bytes("metis-d10-2site.std")))
    assert metis == {"FAR": 1, "ATR": 1, "MIR": 1, "SDR": 1, "PMR": 120, "PIR": 22,
                     "DTR": 33, "PTR": 572, "PRR": 22, "TSR": 81, "HBR": 12, "SBR": 48,
                     "PCR": 3, "MRR": 1}
    galaxy = Counter(n for n, _ in decode_edgegw(stdf_bytes("galaxy-a530-lot2.stdf.gz")))
    assert sum(galaxy.values()) == 58020
    assert galaxy["PTR"] == 52403 and galaxy["GDR"] == 785 and galaxy["PRR"] == 1569


@pytest.mark.parametrize("name", FILES)
def test_bins_derived_from_prrs_agree_with_the_files_own_summaries(name: str) -> None:
    records = decode_edgegw(stdf_bytes(name))
    stats = StdfStats()
    for rec, fields in records:
        stats.add(rec, fields)
    derived = stats.derived()
    passing_hbins = {f["HBIN_NUM"] for r, f in records if r == "HBR" and f["HBIN_PF"] == "P"}

    # all-site summaries (HEAD_NUM 255): the tester's figures
    tester_hbr = {b: n for b, n in stats.file_hbr[(ALL_SITES, ALL_SITES)].items() if n}
    tester_sbr = {b: n for b, n in stats.file_sbr[(ALL_SITES, ALL_SITES)].items() if n}
    tester_parts = stats.file_pcr[(ALL_SITES, ALL_SITES)]["PART_CNT"]
    assert derived["hard_bins"] == tester_hbr, "tester's HBR differs from its PRRs"
    assert derived["soft_bins"] == tester_sbr, "tester's SBR differs from its PRRs"
    assert derived["parts"] == tester_parts, "tester's PCR PART_CNT differs from its PRRs"
    # good parts: PRR PART_FLG says pass exactly for the parts in bins the tester marks
    # "P"; a file that leaves HBIN_PF unset (galaxy: NUL) and GOOD_CNT missing states no
    # good count of its own, and the PRRs' figure is the only one there is
    marked = {f["HBIN_PF"] for r, f in records if r == "HBR"} & {"P", "F"}
    good_cnt = stats.file_pcr[(ALL_SITES, ALL_SITES)].get("GOOD_CNT", 4294967295)
    if marked:
        assert derived["good"] == sum(tester_hbr.get(b, 0) for b in passing_hbins)
    if good_cnt != 4294967295:
        assert derived["good"] == good_cnt, "tester's PCR GOOD_CNT differs from its PRRs"
    if not marked and good_cnt == 4294967295:
        assert name.startswith("galaxy")  # the one file known to state no good count
        assert derived["good"] == sum(1 for r, f in records
                                      if r == "PRR" and not f["PART_FLG"] & 0x18)

    # per-site summaries, where the file has them
    for (head, site), bins in stats.file_hbr.items():
        if head == ALL_SITES:
            continue
        assert derived["sites"][(head, site)]["hard_bins"] == {b: n for b, n in bins.items()
                                                               if n}
        assert derived["sites"][(head, site)]["parts"] == \
            stats.file_pcr[(head, site)]["PART_CNT"]
    for (head, site), bins in stats.file_sbr.items():
        if head != ALL_SITES:
            assert derived["sites"][(head, site)]["soft_bins"] == {
                b: n for b, n in bins.items() if n}


def test_metis_two_sites_interleave_and_results_attach_to_their_own_site() -> None:
    from edgegw.stdf import TestState

    records = decode_edgegw(stdf_bytes("metis-d10-2site.std"))
    state = TestState()
    per_part: dict[int, int] = {}
    closed = []
    for rec, fields in records:
        if rec == "PIR":
            state.open_part(fields)
        elif rec == "PTR":
            part = state.part_for(fields)
            assert part is not None and (part.head, part.site) == (
                fields["HEAD_NUM"], fields["SITE_NUM"])
            per_part[part.index] = per_part.get(part.index, 0) + 1
        elif rec == "PRR":
            part = state.close_part(fields)
            assert part is not None
            closed.append(part)
    assert len(closed) == 22 and state.orphan_results == 0 and state.unclosed_parts == 0
    assert {p.site for p in closed} == {0, 1}
    # two parts are open at once: site 1's PIR comes before site 0's PRR
    assert sum(per_part.values()) == 572
