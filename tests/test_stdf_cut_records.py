"""A record whose REC_LEN ends before its mandatory fields (STDF V4 lets a record end
early: the fields left out take their defaults, "missing").  The decoder gives the fields
present -- field by field what pystdf gives -- and the tail sends what the record still
says, skips (and counts) one cut before a field it cannot do without (a PTR before its
TEST_NUM, an HBR before HBIN_NUM), and reads every record after it: the file is never
corrupt for it.  Before: such a record abandoned the file as corrupt, every record after
it lost (docs/stdf.md, "Hostile input").
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import pytest
from test_stdf_fidelity import as_pystdf, decode_pystdf, same
from test_stdf_tail import expected, no_ts, tail

from edgegw.metrics import Metrics
from edgegw.records import BinSummary, GatewayEvent, LotEnd, PartCount, PartResult
from edgegw.stdf import BY_NAME, StdfDecoder, StdfWriter

#: a specification of decoding: it holds for the compiled record loop and the pure-Python
#: one alike (tests/decoders.py)
pytestmark = pytest.mark.usefixtures("each_decoder")

W = StdfWriter("<")

#: every type the mapping reads, each field given (the writer fills the rest)
FULL: dict[str, dict[str, Any]] = {
    "MIR": {"SETUP_T": 1, "START_T": 2, "STAT_NUM": 3, "LOT_ID": "L1", "PART_TYP": "P"},
    "WIR": {"HEAD_NUM": 1, "SITE_GRP": 255, "START_T": 3, "WAFER_ID": "W1"},
    "PIR": {"HEAD_NUM": 1, "SITE_NUM": 0},
    "PTR": {"TEST_NUM": 7, "HEAD_NUM": 1, "SITE_NUM": 0, "TEST_FLG": 0, "PARM_FLG": 0,
            "RESULT": 1.5, "TEST_TXT": "vdd", "ALARM_ID": "", "OPT_FLAG": 0, "RES_SCAL": 0,
            "LLM_SCAL": 0, "HLM_SCAL": 0, "LO_LIMIT": 0.5, "HI_LIMIT": 2.5, "UNITS": "V"},
    "MPR": {"TEST_NUM": 8, "HEAD_NUM": 1, "SITE_NUM": 0, "TEST_FLG": 0, "PARM_FLG": 0,
            "RTN_STAT": [1, 2], "RTN_RSLT": [0.25, 0.75], "TEST_TXT": "pins",
            "OPT_FLAG": 0, "LO_LIMIT": 0.0, "HI_LIMIT": 1.0, "UNITS": "A"},
    "FTR": {"TEST_NUM": 9, "HEAD_NUM": 1, "SITE_NUM": 0, "TEST_FLG": 0, "OPT_FLAG": 0,
            "NUM_FAIL": 2, "TEST_TXT": "func"},
    "PRR": {"HEAD_NUM": 1, "SITE_NUM": 0, "PART_FLG": 0, "NUM_TEST": 3, "HARD_BIN": 1,
            "SOFT_BIN": 11, "X_COORD": 4, "Y_COORD": 5, "TEST_T": 9, "PART_ID": "p1"},
    "WRR": {"HEAD_NUM": 1, "SITE_GRP": 255, "FINISH_T": 4, "PART_CNT": 1, "GOOD_CNT": 1},
    "HBR": {"HEAD_NUM": 255, "SITE_NUM": 0, "HBIN_NUM": 1, "HBIN_CNT": 3, "HBIN_PF": "P",
            "HBIN_NAM": "good"},
    "SBR": {"HEAD_NUM": 255, "SITE_NUM": 0, "SBIN_NUM": 11, "SBIN_CNT": 3, "SBIN_PF": "P",
            "SBIN_NAM": "good"},
    "PCR": {"HEAD_NUM": 255, "SITE_NUM": 0, "PART_CNT": 3, "RTST_CNT": 0, "ABRT_CNT": 0,
            "GOOD_CNT": 3, "FUNC_CNT": 3},
    "MRR": {"FINISH_T": 9, "DISP_COD": "A"},
}


def cut(name: str, keep: int) -> bytes:
    """The record with only the first ``keep`` bytes of its body, REC_LEN saying so."""
    whole = W.encode(name, FULL[name])
    body = whole[4:4 + keep]
    return struct.pack("<HBB", len(body), whole[2], whole[3]) + body


def body_len(name: str) -> int:
    return len(W.encode(name, FULL[name])) - 4


def lot(*middle: bytes) -> bytes:
    """A whole lot, one part before ``middle`` and one after it."""
    part = b"".join(W.encode(n, FULL[n]) for n in ("PIR", "PTR", "MPR", "FTR", "PRR"))
    return (W.encode("FAR", {}) + W.encode("MIR", FULL["MIR"]) + W.encode("WIR", FULL["WIR"])
            + part + b"".join(middle) + part + W.encode("WRR", FULL["WRR"])
            + b"".join(W.encode(n, FULL[n]) for n in ("HBR", "SBR", "PCR", "MRR")))


CASES = [(name, keep) for name in FULL for keep in range(body_len(name))]


@pytest.mark.parametrize(("name", "keep"), CASES, ids=[f"{n}-{k}" for n, k in CASES])
def test_the_fields_present_are_pystdfs_field_by_field(name: str, keep: int) -> None:
    """Each mapped type cut at every length: the decoder gives exactly the fields whose
    bytes are all there, each as the whole record has it, and equal to pystdf's (which
    gives None for the rest) -- where pystdf reads the record at all: an MPR or FTR cut
    inside or before an array whose count is there raises IndexError or TypeError in
    pystdf (50 of the 261 cuts)."""
    data = W.encode("FAR", {}) + cut(name, keep) + W.encode("MRR", {"FINISH_T": 0})
    dec = StdfDecoder()
    dec.feed(data)
    ours = list(dec.records())
    assert [r.name for r in ours] == ["FAR", name, "MRR"] and dec.buffered == 0
    fields = ours[1].fields
    whole = StdfDecoder()
    whole.feed(W.encode("FAR", {}) + W.encode(name, FULL[name]))
    full = list(whole.records())[1].fields
    assert list(fields) == list(full)[:len(fields)]
    assert repr(fields) == repr({k: full[k] for k in fields})
    try:
        (rec, values) = decode_pystdf(data)[1]
    except (IndexError, TypeError):  # (pystdf's own: an array's count read as a list)
        assert name in ("MPR", "FTR")
        return
    assert rec == name
    for f, theirs in zip(BY_NAME[name].fields, values, strict=False):
        if f.name not in fields:
            assert theirs is None, (f.name, theirs)
            continue
        assert same(as_pystdf(f.type, f.count, fields[f.name]), theirs), f.name
    assert len(fields) == sum(v is not None for v in values)


def test_the_tail_sends_what_each_cut_record_holds_and_reads_on(tmp_path: Path) -> None:
    """One file holding every mapped type cut at every length, between two whole parts
    of its lot: nothing is corrupt; what the cut records say is sent as mapping them whole
    would have given (their missing fields as their defaults); those cut before a field
    they must have are skipped, counted in ``tail_cut_records_total``; and every record
    after them is sent -- the file read to its MRR.  Before: the first such record (a PTR
    of 0 bytes) abandoned the file, an error event for it, the rest lost."""
    import trio

    middle = [cut(name, keep) for name, keep in CASES if name not in ("MIR", "MRR")]
    data = lot(*middle)
    (tmp_path / "cut.stdf").write_bytes(data)
    metrics = Metrics()
    source = tail([tmp_path], idle_timeout=3600, metrics=metrics)

    class Sink:
        records: list[Any] = []

        async def put(self, records: Any, checkpoint: Any = None) -> None:
            self.records.extend(records)

    sink = Sink()

    async def polls() -> None:
        for _ in range(3):
            await source.poll_once(sink)

    trio.run(polls)
    got = no_ts(sink.records)
    assert not [r for r in got if isinstance(r, GatewayEvent)]
    assert got == expected(data)  # the mapping of the whole file in one go
    assert isinstance(got[-1], LotEnd)
    assert len([r for r in got if isinstance(r, PartResult)]) == 2 + sum(
        1 for name, keep in CASES if name == "PRR")
    cut_before = {"PTR": 4, "MPR": 4, "FTR": 4, "HBR": 4 + 4, "SBR": 4 + 4, "PCR": 4 + 2}
    skipped = sum(cut_before.values())  # (each cut at every length before that field)
    assert metrics.counter("tail_cut_records_total").get(source="tester1") == skipped
    bins = [r for r in got if isinstance(r, BinSummary) and r.bin_num == 1 and r.bin_kind == "H"]
    assert bins[-1].count == 3  # the whole HBR after them
    assert [r for r in got if isinstance(r, PartCount)][-1].part_count == 3
    partial_prr = [r for r in got if isinstance(r, PartResult) and r.hard_bin == 1
                   and r.soft_bin is None]
    assert partial_prr and all(r.x is None and r.y is None for r in partial_prr)
