"""Files from testers edgegw has not seen: what a test-floor engineer brings from other
testers (docs/stdf.md, "Files from other testers") is decoded, mapped and shown as the file
itself says -- records sent, lots, parts, bins and yields on the hub, `edgegw stdf stats`.
"""

from __future__ import annotations

import gzip
import json
import math
import struct
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import trio

from edgegw.cli import main
from edgegw.hub.checkpoint import capture, decode, encode, restore
from edgegw.hub.live import LiveState, replay
from edgegw.metrics import Metrics
from edgegw.records import (
    FunctionalResult,
    LotEnd,
    LotStart,
    MultiPinResult,
    ParametricResult,
    PartResult,
)
from edgegw.sources import SourceContext, TailConfig, TailSource
from edgegw.stdf import (
    RecordMapper,
    StdfDecoder,
    StdfError,
    StdfRecord,
    StdfWriter,
    TestState,
    result_passed,
)

#: a specification of decoding: it holds for the compiled record loop and the pure-Python
#: one alike (tests/decoders.py)
pytestmark = pytest.mark.usefixtures("each_decoder")

Rec = tuple[str, dict[str, Any]]


def far(cpu: int = 2) -> Rec:
    return "FAR", {"CPU_TYPE": cpu, "STDF_VER": 4}


def mir(lot: str = "LOTA", tester: str = "J750") -> Rec:
    return "MIR", {"SETUP_T": 1, "START_T": 2, "STAT_NUM": 1, "MODE_COD": "P",
                   "RTST_COD": " ", "PROT_COD": " ", "BURN_TIM": 65535, "CMOD_COD": " ",
                   "LOT_ID": lot, "PART_TYP": "DEV", "NODE_NAM": "ate", "TSTR_TYP": tester,
                   "JOB_NAM": "prog"}


def pir(head: int, site: int) -> Rec:
    return "PIR", {"HEAD_NUM": head, "SITE_NUM": site}


def ptr(head: int, site: int, value: float, num: int = 100) -> Rec:
    return "PTR", {"TEST_NUM": num, "HEAD_NUM": head, "SITE_NUM": site, "TEST_FLG": 0,
                   "PARM_FLG": 0, "RESULT": value, "TEST_TXT": "VDD", "ALARM_ID": "",
                   "OPT_FLAG": 0x0E, "RES_SCAL": 0, "LLM_SCAL": 0, "HLM_SCAL": 0,
                   "LO_LIMIT": 0.0, "HI_LIMIT": 10.0, "UNITS": "V"}


def prr(head: int, site: int, part_id: str, hard: int = 1, failed: bool = False,
        x: int = -32768, y: int = -32768) -> Rec:
    return "PRR", {"HEAD_NUM": head, "SITE_NUM": site, "PART_FLG": 0x08 if failed else 0,
                   "NUM_TEST": 1, "HARD_BIN": hard, "SOFT_BIN": hard, "X_COORD": x,
                   "Y_COORD": y, "TEST_T": 7, "PART_ID": part_id}


def hbr(head: int, site: int, num: int, count: int) -> Rec:
    return "HBR", {"HEAD_NUM": head, "SITE_NUM": site, "HBIN_NUM": num, "HBIN_CNT": count,
                   "HBIN_PF": "P" if num == 1 else "F"}


def pcr(head: int, site: int, parts: int, good: int) -> Rec:
    return "PCR", {"HEAD_NUM": head, "SITE_NUM": site, "PART_CNT": parts, "RTST_CNT": 0,
                   "ABRT_CNT": 0, "GOOD_CNT": good}


MRR: Rec = ("MRR", {"FINISH_T": 9})


def stdf(records: list[Rec], order: str = "<") -> bytes:
    w = StdfWriter(order)
    return b"".join(w.encode(name, fields) for name, fields in records)


def raw(typ: int, sub: int, body: bytes, order: str = "<") -> bytes:
    """A record as a tester writes it, header and body by hand."""
    return struct.pack(order + "HBB", len(body), typ, sub) + body


def gateway(data: bytes, chunk: int = 4096) -> list[Any]:
    """What the gateway sends for a file: its path (rows of the mapped types into
    ``map_row``), in chunks, then ``close`` at the file's end."""
    dec = StdfDecoder(types=RecordMapper.TYPES)
    mapper = RecordMapper("ate")
    out: list[Any] = []
    for start in range(0, len(data), chunk):
        dec.feed(data[start:start + chunk])
        for row in dec.rows():
            out.extend(mapper.map_row(row, 1.0))
    assert dec.buffered == 0
    return out + mapper.close(1.0)


def hub(records: list[Any]) -> LiveState:
    state = LiveState(lambda topic, delta: None, clock=lambda: 1.0)
    state.on_records("gw", 1, records, now=1.0)
    return state


def stats(capsys: pytest.CaptureFixture[str], path: Path) -> tuple[int, dict[str, Any], str]:
    status = main(["stdf", "stats", str(path)])
    out, err = capsys.readouterr()
    return status, json.loads(out) if out else {}, err


# -- heads, sites, final test -------------------------------------------------------------


def dual_head_final_test(order: str) -> bytes:
    """A dual-head final-test handler (no WIR/WRR), 4 sites a head, sites interleaved, the
    tester's own summaries per head/site and for all (HEAD_NUM 255)."""
    recs: list[Rec] = [far(1 if order == ">" else 2), mir(tester="UltraFLEX")]
    n = 0
    for _ in range(3):
        for head in (1, 2):
            recs += [pir(head, site) for site in range(4)]
            recs += [ptr(head, site, 1.0 + site) for site in range(4)]
            for site in range(4):
                n += 1
                recs.append(prr(head, site, str(n), hard=1 if site else 2, failed=not site))
    for head in (1, 2):
        for site in range(4):
            recs += [hbr(head, site, 1 if site else 2, 3), pcr(head, site, 3, 3 if site else 0)]
    recs += [hbr(255, 0, 1, 18), hbr(255, 0, 2, 6), pcr(255, 0, 24, 18), MRR]
    return stdf(recs, order)


@pytest.mark.parametrize("order", ["<", ">"])
def test_a_dual_head_final_test_file_shows_the_figures_its_own_summaries_give(
        order: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = dual_head_final_test(order)
    sent = gateway(data)
    parts = [r for r in sent if isinstance(r, PartResult)]
    assert Counter((p.head, p.site) for p in parts) == {(h, s): 3 for h in (1, 2)
                                                        for s in range(4)}
    assert all(p.wafer_id == "" and p.x is None and p.lot_id == "LOTA" for p in parts)
    # each result is its own part's, not its neighbour head's
    by_part = {p.part_id: (p.head, p.site) for p in parts}
    results = [r for r in sent if isinstance(r, ParametricResult)]
    assert len(results) == 24
    assert all(by_part[r.part_id] == (r.head, r.site) and r.value == 1.0 + r.site
               for r in results)
    lot = hub(sent).snapshot("lot/LOTA")
    assert lot is not None
    assert (lot["die_count"], lot["good"], lot["hard_bins"]) == (24, 18, {"1": 18, "2": 6})
    assert lot["reported"]["hard_bins"] == lot["hard_bins"]
    assert lot["reported"]["part_count"] == 24 and lot["reported"]["good_count"] == 18
    path = tmp_path / "ft.stdf"
    path.write_bytes(data)
    status, got, _ = stats(capsys, path)
    assert status == 0 and got["parts"] == 24 and got["good"] == 18
    assert got["sites"]["2/3"] == {"parts": 3, "good": 3, "hard_bins": {"1": 3},
                                   "soft_bins": {"1": 3}}
    assert got["file_summary"]["hbr"]["all"] == {"1": 18, "2": 6}


def dual_head_parts_per_head(retest: bool = False) -> bytes:
    """A dual-head final-test handler that numbers each head's parts from 1 (PART_ID "1" on
    both heads), 4 sites a head, 3 touchdowns; head 1's site 0 and head 2's site 1 fail
    every part, and each head's site measures its own value (head 2: 10 higher).
    ``retest``: then head 2's part "1" again, on site 0, passing, flagged as a retest."""
    recs: list[Rec] = [far(), mir(tester="V93000")]
    for touchdown in range(3):
        for head in (1, 2):
            recs += [pir(head, site) for site in range(4)]
            recs += [ptr(head, site, site + 10.0 * (head - 1)) for site in range(4)]
            for site in range(4):
                failed = site == head - 1
                recs.append(prr(head, site, str(4 * touchdown + site + 1), hard=2 if failed
                                else 1, failed=failed))
    if retest:
        recs += [pir(2, 0), ptr(2, 0, 10.0),
                 ("PRR", {**prr(2, 0, "1")[1], "PART_FLG": 0x01})]
    return stdf([*recs, MRR])


def test_a_dual_head_lot_shows_each_heads_sites_and_parts_apart(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # before: head 1 site 0 and head 2 site 0 were one row "0" (their yields mixed: 50 %
    # where one head's site fails every part and the other's none), and head 2's part "1"
    # a retest of head 1's (12 dies, 12 retests)
    data = dual_head_parts_per_head()
    lot = hub(gateway(data)).snapshot("lot/LOTA")
    assert lot is not None
    assert (lot["die_count"], lot["parts"], lot["retests"], lot["good"]) == (24, 24, 0, 18)
    assert lot["sites"] == {
        f"{head}/{site}": {"dies": 3, "good": 0, "yield": 0.0} if site == head - 1
        else {"dies": 3, "good": 3, "yield": 1.0} for head in (1, 2) for site in range(4)}
    # the same rows, and counts, as the file's own figures per HEAD/SITE
    path = tmp_path / "ft.stdf"
    path.write_bytes(data)
    status, got, _ = stats(capsys, path)
    assert status == 0
    assert {name: [row["dies"], row["good"]] for name, row in lot["sites"].items()} == \
        {name: [row["parts"], row["good"]] for name, row in got["sites"].items()}
    test = hub(gateway(data)).snapshot("test/LOTA/100")
    assert test is not None
    assert test["sites"] == {f"{head}/{site}": [3, site + 10.0 * (head - 1), 0.0]
                             for head in (1, 2) for site in range(4)}


def applied_three_ways(records: list[Any], cut: int) -> tuple[LiveState, LiveState, LiveState]:
    """``records`` in two frames cut at ``cut``, applied (a) straight, (b) the second to
    a state restored from a checkpoint taken after the first, (c) both replayed."""
    full = LiveState(lambda topic, delta: None, clock=lambda: 1.0)
    full.on_records("gw", 1, records[:cut], now=1.0)
    full.on_records("gw", 1 + cut, records[cut:], now=1.0)
    first = LiveState(lambda topic, delta: None, clock=lambda: 1.0)
    first.on_records("gw", 1, records[:cut], now=1.0)
    _, data = decode(encode({"frame_id": 1}, capture(first)))
    restored = LiveState(lambda topic, delta: None, clock=lambda: 1.0)
    restore(restored, data)
    restored.on_records("gw", 1 + cut, records[cut:], now=1.0)
    replayed = LiveState(lambda topic, delta: None, clock=lambda: 1.0)
    replay(replayed, [("gw", 1, records[:cut]), ("gw", 1 + cut, records[cut:])], now=1.0)
    return full, restored, replayed


def test_a_single_head_lot_keeps_plain_site_numbers_whatever_its_head_number() -> None:
    # most files: one head, HEAD_NUM 1 (or 0: a Credence D-10); their rows stay "0", "1"
    for head in (0, 1, 2):
        recs: list[Rec] = [far(), mir()]
        for site in range(2):
            recs += [pir(head, site), ptr(head, site, float(site)),
                     prr(head, site, str(site + 1), failed=site == 1)]
        state = hub(gateway(stdf([*recs, MRR])))
        lot, test = state.snapshot("lot/LOTA"), state.snapshot("test/LOTA/100")
        assert lot is not None and test is not None
        assert lot["sites"] == {"0": {"dies": 1, "good": 1, "yield": 1.0},
                                "1": {"dies": 1, "good": 0, "yield": 0.0}}, head
        assert list(test["sites"]) == ["0", "1"]


@pytest.mark.parametrize("cut_at", [0.3, 0.7])
def test_a_dual_head_lot_is_the_same_after_a_restart_from_a_checkpoint_or_a_replay(
        cut_at: float) -> None:
    records = gateway(dual_head_parts_per_head(retest=True))
    cut = int(len(records) * cut_at)
    full, restored, replayed = applied_three_ways(records, cut)
    lot = full.snapshot("lot/LOTA")
    # head 2's part "1" retested: one die, its final result the retest's
    assert lot is not None and (lot["die_count"], lot["retests"]) == (24, 1)
    assert lot["sites"]["2/0"] == {"dies": 3, "good": 3, "yield": 1.0}
    for state in (restored, replayed):
        assert sorted(state.topics()) == sorted(full.topics())
        for topic in full.topics():
            assert state.snapshot(topic) == full.snapshot(topic), topic


def test_255_sites_each_keep_their_own_parts_limits_and_bins() -> None:
    recs: list[Rec] = [far(), mir(), ("WIR", {"HEAD_NUM": 1, "SITE_GRP": 255, "START_T": 3,
                                              "WAFER_ID": "W1"})]
    for touchdown in range(2):
        recs += [pir(1, site) for site in range(1, 256)]
        # the second touchdown's PTRs stop after RESULT: limits and units are the first's
        recs += [ptr(1, site, float(site)) if not touchdown else
                 ("PTR", {"TEST_NUM": 100, "HEAD_NUM": 1, "SITE_NUM": site, "TEST_FLG": 0,
                          "PARM_FLG": 0, "RESULT": float(site)}) for site in range(1, 256)]
        recs += [prr(1, site, f"{touchdown}-{site}", x=site, y=touchdown)
                 for site in range(1, 256)]
    recs += [("WRR", {"HEAD_NUM": 1, "SITE_GRP": 255, "FINISH_T": 4, "PART_CNT": 510,
                      "WAFER_ID": "W1"}), MRR]
    sent = gateway(stdf(recs))
    results = [r for r in sent if isinstance(r, ParametricResult)]
    assert len(results) == 510
    assert {(r.lo_limit, r.hi_limit, r.units) for r in results} == {(0.0, 10.0, "V")}
    assert all(r.value == r.site and r.part_id.endswith(f"-{r.site}") for r in results)
    wafer = hub(sent).snapshot("lot/LOTA/wafer/W1")
    assert wafer is not None and wafer["die_count"] == 510 and len(wafer["dies"]) == 510
    assert wafer["sites"]["255"] == {"dies": 2, "good": 2, "yield": 1.0}


@pytest.mark.parametrize(("order", "cpu"), [("<", 1), (">", 2), (">", 0), ("<", 3)])
def test_a_far_whose_cpu_type_contradicts_its_byte_order_is_read_in_the_order_written(
        order: str, cpu: int, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # a writer leaving CPU_TYPE at its default (a Sun's 1 on a PC); before the fix:
    # "impossible REC_LEN 512 for a FAR" at byte 0, nothing read.  (CPU_TYPE 0 with a
    # little-endian FAR is a VAX's file, its floats VAX F: tests/test_stdf_vax.py)
    data = stdf([far(cpu), mir(), pir(1, 0), ptr(1, 0, 1.5), prr(1, 0, "1"), MRR], order)
    sent = gateway(data)
    assert isinstance(sent[0], LotStart) and sent[0].lot_id == "LOTA"
    assert [r.value for r in sent if isinstance(r, ParametricResult)] == [1.5]
    path = tmp_path / "lot.stdf"
    path.write_bytes(data)
    status, got, _ = stats(capsys, path)
    assert status == 0 and got["parts"] == 1


def wafer_of(wir_id: str, wrr_id: str) -> bytes:
    return stdf([far(), mir(), ("WIR", {"HEAD_NUM": 1, "SITE_GRP": 255, "START_T": 3,
                                        "WAFER_ID": wir_id}),
                 pir(1, 0), prr(1, 0, "1", x=3, y=4),
                 ("WRR", {"HEAD_NUM": 1, "SITE_GRP": 255, "FINISH_T": 5, "PART_CNT": 1,
                          "RTST_CNT": 0, "ABRT_CNT": 0, "GOOD_CNT": 1, "FUNC_CNT": 0,
                          "WAFER_ID": wrr_id}), MRR])


def test_a_wrr_with_another_wafer_id_than_its_wir_closes_the_wafer_its_parts_are_on() -> None:
    # (before the fix: the WRR's id made a second, empty wafer, closed with the tester's
    # counts, and the wafer of the map stayed open for ever)
    state = hub(gateway(wafer_of("LOTA-01", "WX8842-07")))
    assert list(state.lots["LOTA"].wafers) == ["LOTA-01"]
    wafer = state.snapshot("lot/LOTA/wafer/LOTA-01")
    assert wafer is not None and wafer["status"] == "closed" and wafer["die_count"] == 1
    assert wafer["reported"] == {"part_count": 1, "good_count": 1}
    # a WIR without an id: the WRR's is the only one there is
    ends = [r for r in gateway(wafer_of("", "WX8842-07")) if type(r).__name__ == "WaferEnd"]
    assert [w.wafer_id for w in ends] == ["WX8842-07"]


# -- records in an order the spec does not give ------------------------------------------


def test_a_file_whose_mir_comes_after_its_first_parts_shows_them_in_its_lot() -> None:
    # (before the fix: the first part went to a lot without a name, open for ever, and
    # LOTA showed one part of the two its HBR counts)
    data = stdf([far(), ("ATR", {"MOD_TIM": 1, "CMD_LINE": "ate"}), pir(1, 0), ptr(1, 0, 1.0),
                 prr(1, 0, "1"), pir(1, 0), ptr(1, 0, 2.0), mir(), ptr(1, 0, 3.0, num=101),
                 prr(1, 0, "2"), hbr(255, 0, 1, 2), MRR])
    sent = gateway(data)
    assert isinstance(sent[0], LotStart) and sent[0].lot_id == "LOTA"
    assert {r.lot_id for r in sent} == {"LOTA"}
    assert [(r.part_id, r.value) for r in sent if isinstance(r, ParametricResult)] == [
        ("1", 1.0), ("2", 2.0), ("2", 3.0)]
    state = hub(sent)
    assert list(state.lots) == ["LOTA"]
    lot = state.snapshot("lot/LOTA")
    assert lot is not None and lot["parts"] == 2 and lot["status"] == "closed"
    assert lot["reported"]["hard_bins"] == lot["hard_bins_tested"] == {"1": 2}
    # a MIR late only by a part's first results: they are the lot's too
    sent = gateway(stdf([far(), pir(1, 0), ptr(1, 0, 1.0), mir(), prr(1, 0, "1"), MRR]))
    assert [(type(r).__name__, r.lot_id) for r in sent] == [
        ("LotStart", "LOTA"), ("ParametricResult", "LOTA"), ("PartResult", "LOTA"),
        ("LotEnd", "LOTA")]


def test_forward_raw_of_a_file_with_its_mir_in_place_keeps_the_order_records_came_in() -> None:
    data = stdf([far(), ("ATR", {"MOD_TIM": 1, "CMD_LINE": "ate"}), mir(), pir(1, 0),
                 prr(1, 0, "1"), MRR])
    dec = StdfDecoder()
    dec.feed(data)
    mapper = RecordMapper("ate", forward_raw=True)
    sent = [(type(r).__name__, getattr(r, "rec", "")) for rec in dec.records()
            for r in mapper.map(rec, 1.0)]
    assert sent == [("RawRecord", "FAR"), ("RawRecord", "ATR"), ("RawRecord", "MIR"),
                    ("LotStart", ""), ("RawRecord", "PIR"), ("RawRecord", "PRR"),
                    ("PartResult", ""), ("RawRecord", "MRR"), ("LotEnd", "")]


def test_a_file_without_a_mir_is_sent_without_a_lot_id_once_max_waiting_is_passed() -> None:
    parts = RecordMapper.MAX_WAITING // 2 + 1  # a PTR and a PRR each: just past it
    recs: list[Rec] = [far()]
    for n in range(parts):
        recs += [pir(1, 0), ptr(1, 0, 1.0), prr(1, 0, str(n))]
    dec = StdfDecoder(types=RecordMapper.TYPES)
    dec.feed(stdf(recs))
    mapper = RecordMapper("ate")
    sent_before_the_end: list[Any] = []
    for row in dec.rows():
        sent_before_the_end += mapper.map_row(row, 1.0)
    # nothing waits for ever: past MAX_WAITING records they went on, without a lot id
    assert len(sent_before_the_end) == 2 * parts
    assert {r.lot_id for r in sent_before_the_end} == {""}
    assert mapper.close(1.0) == []
    # a format plugin's records without a FAR (a format that has no MIR) never wait
    (part,) = RecordMapper("wat").map(StdfRecord("PRR", 0, prr(1, 0, "1")[1]), 1.0)
    assert isinstance(part, PartResult) and part.lot_id == ""


def test_a_prr_without_a_pir_gives_its_part_id_to_the_results_before_it() -> None:
    # a tester that writes no PIRs; and results of a site before its first PIR
    data = stdf([far(), mir(), ptr(1, 1, 0.5), pir(1, 1), ptr(1, 1, 1.0), prr(1, 1, "A"),
                 ptr(1, 0, 2.0), ptr(1, 1, 3.0), prr(1, 0, "B"), prr(1, 1, "C"), MRR])
    sent = gateway(data)
    assert [(r.part_id, r.site, r.value) for r in sent if isinstance(r, ParametricResult)] == [
        ("", 1, 0.5), ("A", 1, 1.0), ("B", 0, 2.0), ("C", 1, 3.0)]
    # every result comes before its part's PartResult, as the hub expects
    assert [type(r).__name__ for r in sent][1:-1] == [
        "ParametricResult", "ParametricResult", "PartResult", "ParametricResult",
        "PartResult", "ParametricResult", "PartResult"]


def test_results_no_prr_ever_claims_go_on_without_a_part_id_past_max_waiting() -> None:
    n = RecordMapper.MAX_WAITING + 1
    # results on head 0, PRRs on head 1: the PRRs never claim them
    data = stdf([far(), mir(), *[ptr(0, 0, 1.0) for _ in range(n)], prr(1, 0, "A"), MRR])
    dec = StdfDecoder(types=RecordMapper.TYPES)
    dec.feed(data)
    mapper = RecordMapper("ate")
    sent = []
    for row in dec.rows():
        got = mapper.map_row(row, 1.0)
        if row[0] == "PTR" and got:
            assert len(got) == n  # all at once, past the cap, not at the file's end
        sent += got
    results = [r for r in sent if isinstance(r, ParametricResult)]
    assert len(results) == n and {r.part_id for r in results} == {""}


def late_mir_without_pirs() -> tuple[bytes, list[int]]:
    """Parts without PIRs on two sites, the MIR after the first few; and the offsets of
    its records."""
    recs: list[Rec] = [far(), ("ATR", {"MOD_TIM": 1, "CMD_LINE": "ate"})]
    for n in range(12):
        if n == 4:
            recs.append(mir())
        recs += [ptr(1, n % 2, float(n)), ptr(1, n % 2, -float(n), num=101),
                 prr(1, n % 2, f"P{n}")]
    recs.append(MRR)
    w = StdfWriter()
    offsets, at = [], 0
    for name, fields in recs:
        offsets.append(at)
        at += len(w.encode(name, fields))
    return stdf(recs), offsets


@pytest.mark.parametrize("cut_record", [3, 12, 14, 25, 37])
async def test_a_restart_while_records_wait_for_a_late_mir_or_a_prr_loses_and_repeats_nothing(
        tmp_path: Path, cut_record: int) -> None:
    # what waits is not sent, and the checkpoint may be past it: the restart's re-read up
    # to the checkpoint makes it wait again, as the first run's records did
    data, offsets = late_mir_without_pirs()
    cut = offsets[cut_record] + 3  # inside a record
    path = tmp_path / "lot.stdf"
    path.write_bytes(data[:cut])

    class Sink:
        def __init__(self) -> None:
            self.records: list[Any] = []
            self.checkpoint: Any = None

        async def put(self, batch: Any, checkpoint: Any = None) -> None:
            self.records += batch
            self.checkpoint = checkpoint

    def source(checkpoint: Any) -> TailSource:
        return TailSource("ate", TailConfig(paths=[str(tmp_path)], idle_timeout=600),
                          SourceContext("gw", Metrics(), checkpoint))

    sinks = [Sink(), Sink()]
    checkpoint = None
    for run, sink in enumerate(sinks):
        tail = source(checkpoint)
        tail._restore(checkpoint)  # what ``run`` does first
        try:
            for _ in range(2):
                await tail.poll_once(sink)
        finally:
            for f in tail.files.values():
                await tail._release(f)
        if not run:  # the tester goes on while the gateway is down
            checkpoint = json.loads(json.dumps(sink.checkpoint))  # as a store gives it back
            # before the MIR (record 14) nothing is sent, so no checkpoint is handed over;
            # after it the first run stops in the middle of the file
            entry = checkpoint and checkpoint["files"][str(path)]
            assert (entry is None) == (cut_record <= 14)
            assert entry is None or (0 < entry["offset"] < cut and not entry["done"])
            with path.open("ab") as f:
                f.write(data[cut:])
    got = [r._replace(ts=0.0) for sink in sinks for r in sink.records]
    want = [r._replace(ts=0.0) for r in gateway(data)]
    assert got == want


def two_lots_parted_by(*between: bytes) -> tuple[bytes, list[Any]]:
    """LOTA, its second part open (no PRR), then ``between`` and LOTB's MIR, a part, the
    MRR -> (the file, what the gateway sends): LOTA ended by a ``LotEnd`` the mapping
    made, its open part's result sent as at a file's end, then LOTB."""
    data = stdf([far(), mir("LOTA"), pir(1, 0), prr(1, 0, "1"), pir(1, 1), ptr(1, 1, 2.0),
                 *between, mir("LOTB"), pir(1, 0), prr(1, 0, "1"), MRR])
    sent = gateway(data)
    assert [(type(r).__name__, r.lot_id) for r in sent] == [
        ("LotStart", "LOTA"), ("PartResult", "LOTA"), ("ParametricResult", "LOTA"),
        ("LotEnd", "LOTA"), ("LotStart", "LOTB"), ("PartResult", "LOTB"), ("LotEnd", "LOTB")]
    return data, sent


def test_a_second_mir_ends_the_first_lot_and_starts_a_second() -> None:
    # (before: the first lot had no LotEnd and stayed "in test" until evicted)
    _, sent = two_lots_parted_by()
    made = sent[3]
    assert made.extra == {"ended_by": "MIR"} and made.finish_t == 2  # the second's START_T
    assert sent[-1].extra is None  # (an MRR's LotEnd: no such mark)
    lots = hub(sent).lots
    assert {lot: lots[lot].status for lot in ("LOTA", "LOTB")} == {
        "LOTA": "closed", "LOTB": "closed"}
    # the same lot id again: that lot going on (a program restarted), not closed midway
    again = gateway(stdf([far(), mir("LOTA"), pir(1, 0), prr(1, 0, "1"), mir("LOTA"),
                          pir(1, 0), prr(1, 0, "2"), MRR]))
    assert [type(r).__name__ for r in again] == [
        "LotStart", "PartResult", "LotStart", "PartResult", "LotEnd"]


def test_a_far_inside_a_lot_ends_it_as_a_tester_restarted_appending_to_its_file() -> None:
    # a tester crashed and restarted, appending FAR, MIR, ... with no MRR before them
    # (before: the FAR was ignored; the first lot ended only at a MIR of another lot id,
    # and a MIR of the same one went on with the crashed run's test defaults and parts)
    data, sent = two_lots_parted_by(far())
    made = sent[3]
    assert made.extra == {"ended_by": "FAR"} and made.finish_t == 0  # a FAR has no time
    assert sent[2].part_id == "" and sent[-1].extra is None
    lots = hub(sent).lots
    assert {lot: (lots[lot].status, lots[lot].tally.parts) for lot in ("LOTA", "LOTB")} == {
        "LOTA": ("closed", 1), "LOTB": ("closed", 1)}
    # the same lot id after the restart: the lot tested on (a second pass on the hub)
    again = stdf([far(), mir("LOTA"), pir(1, 0), ptr(1, 0, 1.0), prr(1, 0, "1"),
                  far(), mir("LOTA"), pir(1, 0), ptr(1, 0, 2.0),
                  prr(1, 0, "2"), MRR])
    sent = gateway(again)
    assert [type(r).__name__ for r in sent] == [
        "LotStart", "ParametricResult", "PartResult", "LotEnd", "LotStart",
        "ParametricResult", "PartResult", "LotEnd"]
    assert [r.extra for r in sent if isinstance(r, LotEnd)] == [{"ended_by": "FAR"}, None]
    lot = hub(sent).lots["LOTA"]
    assert (lot.status, lot.tally.parts) == ("closed", 2)
    # with forward_raw the lot's end goes out at the FAR too, not with the next lot
    mapper = RecordMapper("ate", forward_raw=True)
    dec = StdfDecoder()
    dec.feed(data)
    out = [r for rec in dec.records() for r in mapper.map(rec, 1.0)]
    ends = [r for r in out if isinstance(r, LotEnd)]
    assert [(r.lot_id, r.extra) for r in ends] == [("LOTA", {"ended_by": "FAR"}),
                                                   ("LOTB", None)]
    assert out.index(ends[0]) < next(i for i, r in enumerate(out)
                                     if isinstance(r, LotStart) and r.lot_id == "LOTB")


# -- several lots in one file ----------------------------------------------------------------


def lot_of(lot: str, parts: int, hi: float, order: str = "<") -> bytes:
    """A whole file of one lot: its test's first PTR gives the limit ``hi``, the later
    ones leave it to that default (OPT_FLAG 0x30: "use the default limits")."""
    recs: list[Rec] = [far(1 if order == ">" else 2), mir(lot)]
    for n in range(parts):
        first = ptr(1, 0, 1.0 + n)
        first[1]["HI_LIMIT"] = hi
        if n:
            first[1].update(OPT_FLAG=0x30, LO_LIMIT=-99.0, HI_LIMIT=99.0)
        recs += [pir(1, 0), first, prr(1, 0, f"{lot}-{n}", hard=1 if n % 3 else 2,
                                       failed=not n % 3)]
    recs += [hbr(255, 0, 1, parts - (parts + 2) // 3), hbr(255, 0, 2, (parts + 2) // 3),
             pcr(255, 0, parts, parts - (parts + 2) // 3), MRR]
    return stdf(recs, order)


class Sink:
    def __init__(self) -> None:
        self.records: list[Any] = []
        self.checkpoint: Any = None

    async def put(self, batch: Any, checkpoint: Any = None) -> None:
        self.records += batch
        self.checkpoint = checkpoint


async def tailed(directory: Path, checkpoint: Any = None, read_size: int = 4096,
                 polls: int = 2) -> Sink:
    """What the tail sends for the files in ``directory``, polled by hand."""
    source = TailSource("ate", TailConfig(paths=[str(directory)], idle_timeout=600,
                                          read_size=read_size),
                        SourceContext("gw", Metrics(), checkpoint))
    source._restore(checkpoint)  # what ``run`` does first
    sink = Sink()
    try:
        for _ in range(polls):
            await source.poll_once(sink)
    finally:
        for f in source.files.values():
            await source._release(f)
    return sink


TRAILERS = {"nothing": b"", "zeros": bytes(4096), "text": b"END OF DATALOG\r\n",
            "ctrl-z": b"\x1a"}

def each_lot_sent_once(sink: Any, lots: list[bytes], path: Path, end: int) -> None:
    """LOTA (7 parts), LOTB (5), LOTC (4) tailed from ``path``: each lot sent as a file of
    its own, the file complete at its last MRR (``end``), each lot closed on the hub."""
    want = [r for lot in lots for r in gateway(lot)]
    assert [r._replace(ts=0.0) for r in sink.records] == [r._replace(ts=0.0) for r in want]
    # (a later lot's PTRs take its own first PTR's limit, not the first lot's)
    assert {(r.lot_id, r.hi_limit) for r in want if isinstance(r, ParametricResult)} == {
        ("LOTA", 10.0), ("LOTB", 5.0), ("LOTC", 2.0)}
    entry = sink.checkpoint["files"][str(path)]
    assert entry["done"] and entry["reason"] == "MRR" and entry["offset"] == end
    state = hub(sink.records)
    assert {lot: (state.lots[lot].status, state.lots[lot].tally.parts)
            for lot in ("LOTA", "LOTB", "LOTC")} == {
        "LOTA": ("closed", 7), "LOTB": ("closed", 5), "LOTC": ("closed", 4)}



@pytest.mark.parametrize("trailer", TRAILERS, ids=list(TRAILERS))
@pytest.mark.parametrize("read_size", [512, "first lot"])
async def test_every_lot_of_a_file_holding_several_is_sent_and_shown_once(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], read_size: Any,
        trailer: str) -> None:
    # files concatenated by a merge tool, or a retest lot appended by the tester: FAR..MRR
    # FAR..MRR (before: the gateway stopped at the first MRR; the second lot was lost)
    lots = [lot_of("LOTA", 7, 10.0), lot_of("LOTB", 5, 5.0), lot_of("LOTC", 4, 2.0)]
    data = b"".join(lots)
    path = tmp_path / "merged.stdf"
    path.write_bytes(data + TRAILERS[trailer])
    # "first lot": a read ends exactly at the first MRR, the next FAR comes with the next
    sink = await tailed(tmp_path, read_size=len(lots[0]) if read_size == "first lot"
                        else read_size)
    each_lot_sent_once(sink, lots, path, len(data))
    # ``stdf stats`` reads every lot too: parts and bins summed
    status, got, err = stats(capsys, path)
    assert (status, got["parts"], got["records"]["MRR"], got["hard_bins"]) == (
        0, 16, 3, {"1": 9, "2": 7})
    # and so are the lots' own summaries, the PCR's counts as the HBRs' (the PCR was the
    # last lot's alone: PART_CNT 4 beside 16 parts)
    assert got["file_summary"]["hbr"]["all"] == {"1": 9, "2": 7}
    assert got["file_summary"]["pcr"]["all"] == {
        "PART_CNT": 16, "RTST_CNT": 0, "ABRT_CNT": 0, "GOOD_CNT": 9}
    assert ("warning: after the MRR" in err) == (trailer != "nothing")


def test_a_pcr_count_one_lot_leaves_out_is_missing_in_the_file_summary() -> None:
    # two lots' PCRs summed: a count either lot leaves out -- the spec's missing value, or
    # a record that ends before it -- cannot be summed, so the file's is missing too
    from edgegw.stdf import StdfStats

    stats = StdfStats()
    for lot, counts in (("A", {"PART_CNT": 10, "RTST_CNT": 1, "ABRT_CNT": 0,
                               "GOOD_CNT": 4294967295, "FUNC_CNT": 6}),
                        ("B", {"PART_CNT": 5, "RTST_CNT": 2, "ABRT_CNT": 1, "GOOD_CNT": 3})):
        stats.add("MIR", {"LOT_ID": lot})
        stats.add("PCR", {"HEAD_NUM": 255, "SITE_NUM": 0, **counts})
    assert stats.as_dict()["file_summary"]["pcr"] == {"all": {
        "PART_CNT": 15, "RTST_CNT": 3, "ABRT_CNT": 1, "GOOD_CNT": 4294967295,
        "FUNC_CNT": 4294967295}}


@pytest.mark.parametrize("read_size", [512, "first lot"])
async def test_lots_of_two_testers_merged_are_each_read_in_their_own_byte_order(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], read_size: Any) -> None:
    # a PC's lot, then a Sun's (big-endian), then a PC's again, merged into one file
    # (before: the second FAR, read in the first's order, was "impossible REC_LEN 512",
    # which after an MRR ended the file there: the other tester's lots were lost)
    lots = [lot_of("LOTA", 7, 10.0), lot_of("LOTB", 5, 5.0, ">"), lot_of("LOTC", 4, 2.0)]
    path = tmp_path / "merged.stdf"
    path.write_bytes(b"".join(lots))
    sink = await tailed(tmp_path, read_size=len(lots[0]) if read_size == "first lot"
                        else read_size)
    each_lot_sent_once(sink, lots, path, path.stat().st_size)
    status, got, err = stats(capsys, path)
    assert (status, got["parts"], got["records"]["MRR"], got["hard_bins"], err) == (
        0, 16, 3, {"1": 9, "2": 7}, "")
    # the decoder: every FAR says the order of the records after it, in any chunking
    for chunk in (1, 5, 4096):
        dec = StdfDecoder()
        fars = []
        for start in range(0, len(b"".join(lots)), chunk):
            dec.feed(b"".join(lots)[start:start + chunk])
            fars += [(r.offset, r.fields["CPU_TYPE"]) for r in dec.records() if r.name == "FAR"]
        assert fars == [(0, 2), (len(lots[0]), 1), (len(lots[0]) + len(lots[1]), 2)]
        assert dec.buffered == 0 and dec.byte_order == "<"


async def test_every_lot_of_a_gzip_file_holding_several_is_sent_once(tmp_path: Path) -> None:
    lots = [lot_of("LOTA", 3, 10.0), lot_of("LOTB", 2, 5.0)]
    path = tmp_path / "merged.stdf.gz"
    path.write_bytes(gzip.compress(lots[0]) + gzip.compress(lots[1]))  # (cat a.gz b.gz)
    sink = await tailed(tmp_path, read_size=len(lots[0]))
    want = [r for lot in lots for r in gateway(lot)]
    assert [r._replace(ts=0.0) for r in sink.records] == [r._replace(ts=0.0) for r in want]
    assert sink.checkpoint["files"][str(path)]["done"]


async def test_a_lot_appended_after_the_tail_read_the_last_mrr_is_read_from_there(
        tmp_path: Path) -> None:
    # what follows an MRR when the tail reads it decides whether the file is complete
    # there; a lot appended later (a whole FAR right after that MRR) is read from there, as
    # a file of its own (docs/tail.md, "A lot appended to a finished file"; before, it was
    # "grew after it was complete" and lost; tests/test_tail_append.py)
    first, second = lot_of("LOTA", 3, 10.0), lot_of("LOTB", 2, 5.0)
    path = tmp_path / "lot.stdf"
    path.write_bytes(first)
    sink = await tailed(tmp_path)
    assert sink.checkpoint["files"][str(path)]["done"]
    assert sink.checkpoint["files"][str(path)]["end"] == len(first)
    with path.open("ab") as f:
        f.write(second)
    again = await tailed(tmp_path, json.loads(json.dumps(sink.checkpoint)))
    def zero(records: list[Any]) -> list[Any]:
        return [r._replace(ts=0.0) for r in records]

    assert zero(sink.records) == zero(gateway(first))
    assert zero(again.records) == zero(gateway(second)), "the second lot, as a file of its own"


def two_lots_and_offsets() -> tuple[bytes, list[int]]:
    """Two lots, a DTR between them (a merge tool's note): a type the mapper does not
    read, which the first run's fast path skips and the restart's re-read does not."""
    first = lot_of("LOTA", 6, 10.0) + stdf([("DTR", {"TEXT_DAT": "merged"})])
    second = lot_of("LOTB", 6, 5.0)
    dec = StdfDecoder()
    dec.feed(second)
    return first + second, [len(first) + r.offset for r in dec.records()]


@pytest.mark.parametrize("cut_record", [1, 2, 5, 12, 20])
async def test_a_restart_in_the_middle_of_the_second_lot_loses_and_repeats_nothing(
        tmp_path: Path, cut_record: int) -> None:
    # the checkpoint's offset is past the first lot's MRR: the restart's re-read up to it
    # goes through that MRR and the FAR after it, as the first run did
    data, offsets = two_lots_and_offsets()
    cut = offsets[cut_record] + 3  # inside a record of the second lot
    path = tmp_path / "lot.stdf"
    path.write_bytes(data[:cut])
    first = await tailed(tmp_path)
    checkpoint = json.loads(json.dumps(first.checkpoint))  # as a store gives it back
    entry = checkpoint["files"][str(path)]
    assert offsets[0] <= entry["offset"] < cut and not entry["done"]
    with path.open("ab") as f:  # the tester goes on while the gateway is down
        f.write(data[cut:])
    second = await tailed(tmp_path, checkpoint)
    got = [r._replace(ts=0.0) for r in first.records + second.records]
    want = [r._replace(ts=0.0) for r in gateway(data[:offsets[0]]) + gateway(data[offsets[0]:])]
    assert got == want
    assert second.checkpoint["files"][str(path)]["done"]


# -- what is not a tester's result ---------------------------------------------------------


def test_the_image_and_ig900_record_types_are_skipped_by_the_dozen_not_taken_for_garbage(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # REC_TYP 180 and 181 are the spec's, reserved for Image and IG900 software; a tester
    # running them writes their records as it likes (before the fix: "garbage" at the
    # eighth in a row, and the gateway gave the rest of the file up as corrupt)
    data = stdf([far(), mir()])
    for n in range(3):
        data += stdf([pir(1, 0), ptr(1, 0, 1.0)])
        data += b"".join(raw(180 + k % 2, k, b"image data") for k in range(12))
        data += stdf([prr(1, 0, str(n))])
    data += stdf([MRR])
    dec = StdfDecoder()
    dec.feed(data)
    assert [r.name for r in dec.records()].count("PRR") == 3
    assert dec.unknown_count == 36 and dec.position == len(data)
    assert len([r for r in gateway(data) if isinstance(r, PartResult)]) == 3
    path = tmp_path / "image.stdf"
    path.write_bytes(data)
    status, got, err = stats(capsys, path)
    assert (status, got["parts"], err) == (0, 3, "")
    # any other unknown type is still garbage at the eighth in a row
    dec = StdfDecoder()
    dec.feed(stdf([far()]) + b"".join(raw(200, k, b"") for k in range(8)))
    with pytest.raises(StdfError, match="garbage"):
        list(dec.records())


@pytest.mark.parametrize("trailer", [bytes(4096), b"END OF DATALOG\r\n", b"\x00\x00",
                                     b"\x1a"], ids=["zeros", "text", "two-bytes", "ctrl-z"])
def test_garbage_after_the_mrr_is_a_warning_and_the_figures_are_printed(
        trailer: bytes, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = stdf([far(), mir(), pir(1, 0), prr(1, 0, "1"), MRR])
    path = tmp_path / "lot.stdf"
    path.write_bytes(data + trailer)
    status, got, err = stats(capsys, path)
    assert status == 0 and got["parts"] == 1 and got["records"]["MRR"] == 1
    assert err.count("\n") == 1 and "warning: after the MRR at byte" in err
    assert main(["stdf", "dump", "--rec", "PRR", str(path)]) == 0
    out, err = capsys.readouterr()
    assert len(out.splitlines()) == 1 and "warning" in err
    # the gateway stops at the MRR: the file is complete, the trailer never read
    assert [type(r).__name__ for r in gateway(data)][-1] == "LotEnd"
    # without an MRR before it, the same bytes are still what is wrong with the file
    path.write_bytes(data[:-len(stdf([MRR]))] + trailer)
    status, _, err = stats(capsys, path)
    assert status == 1 and "warning" not in err


def test_a_file_of_only_far_and_atr_shows_nothing_and_is_no_error(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = stdf([far(), ("ATR", {"MOD_TIM": 5, "CMD_LINE": "ate start"})])
    assert gateway(data) == []
    path = tmp_path / "crashed.stdf"
    path.write_bytes(data)
    status, got, err = stats(capsys, path)
    assert (status, got["parts"], got["records"], err) == (0, 0, {"ATR": 1, "FAR": 1}, "")


async def test_the_gateway_completes_a_far_and_atr_file_at_its_idle_timeout_quietly(
        tmp_path: Path) -> None:
    path = tmp_path / "crashed.stdf"
    path.write_bytes(stdf([far(), ("ATR", {"MOD_TIM": 5, "CMD_LINE": "ate start"})]))
    records: list[Any] = []

    class Sink:
        async def put(self, batch: Any, checkpoint: Any = None) -> None:
            records.extend(batch)

    source = TailSource("ate", TailConfig(paths=[str(tmp_path)], poll_interval=0.01,
                                          idle_timeout=0.2),
                        SourceContext("gw", Metrics(), None))

    def entry() -> dict[str, Any]:
        return dict(source.checkpoint().get("files", {}).get(str(path), {}))

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            await nursery.start(source.run, Sink())
            while not entry().get("done"):  # (nothing is put: no records to carry it)
                await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
    assert entry()["reason"] == "idle"
    assert records == []  # no error event, nothing to show


@pytest.mark.parametrize("order", ["<", ">"])
def test_a_record_of_rec_len_65535_is_read_in_any_chunking(order: str) -> None:
    values: list[tuple[int, Any]] = [(10, "v" * 255)] * 254  # 2 + 254 * 257 bytes
    values.append((11, bytes(65535 - 2 - 254 * 257 - 2)))
    data = stdf([far(1 if order == ">" else 2), mir(), ("GDR", {"GEN_DATA": values}),
                 pir(1, 0), prr(1, 0, "1"), MRR], order)
    assert struct.pack(order + "HBB", 65535, 50, 10) in data
    for chunk in (1000, 65539, len(data)):
        dec = StdfDecoder()
        got = []
        for start in range(0, len(data), chunk):
            dec.feed(data[start:start + chunk])
            got += [r for r in dec.records() if r.name == "GDR"]
            assert dec.buffered <= 65539  # at most one record held back
        assert [r.fields["GEN_DATA"] for r in got] == [values]
    assert [type(r).__name__ for r in gateway(data, 1000)] == [
        "LotStart", "PartResult", "LotEnd"]


# -- V4-2007 records, by hand from the spec ------------------------------------------------


def test_v4_2007_records_written_by_hand_decode_as_the_spec_lays_them_out() -> None:
    le = "<"
    cn = (lambda s: bytes([len(s)]) + s.encode())  # noqa: E731
    sn = (lambda s: struct.pack(le + "H", len(s)) + s.encode())  # noqa: E731
    vur = raw(0, 30, bytes([1]) + cn("Scan:2007.1"))
    psr = raw(1, 90, bytes([0]) + struct.pack("<H", 7) + cn("seq") + bytes([0])
              + struct.pack("<HH", 1, 1) + struct.pack("<QQ", 10, 20) + cn("a.pat")
              + cn("lbl") + cn("uid") + cn("atpg") + cn("src"))
    nmr = raw(1, 91, bytes([0]) + struct.pack("<HHHH", 2, 2, 5, 6) + cn("n5") + cn("n6"))
    cnr = raw(1, 92, struct.pack("<HI", 3, 77) + sn("cell/x"))
    ssr = raw(1, 93, cn("ssr") + struct.pack("<HHH", 2, 3, 4))
    cdr = raw(1, 94, bytes([0]) + struct.pack("<H", 1) + cn("ch") + struct.pack("<IHH", 9, 1, 2)
              + bytes([1]) + struct.pack("<H", 11) + bytes([0]) + bytes([1])
              + struct.pack("<H", 2) + sn("c0") + sn("c1"))
    # an STR: sizes of the U*f arrays (CYC_SIZE 4, PMR_SIZE 2, ...) and C*f user text
    str_ = raw(15, 30, bytes([0]) + struct.pack("<IBBHB", 500, 1, 0, 7, 0x80) + cn("S")
               + cn("t") + cn("") + cn("") + cn("") + bytes([0, 0])
               + struct.pack("<H", 0) + struct.pack("<H", 0)  # MASK_MAP, FAL_MAP: no bits
               + struct.pack("<QIIQI", 100, 2, 2, 0, 0) + struct.pack("<HH", 0, 0)
               + bytes([4, 2, 1, 1, 1, 1, 1, 1, 3]) + struct.pack("<H", 0)
               + struct.pack("<HII", 2, 40, 41)  # CYCO_CNT, CYC_OFST (U*4)
               + struct.pack("<HHH", 2, 5, 6)  # PMR_CNT, PMR_INDX (U*2)
               + struct.pack("<H", 0) + struct.pack("<H", 0) + struct.pack("<H", 0)
               + struct.pack("<H", 0) + struct.pack("<H", 0) + struct.pack("<H", 0)
               + struct.pack("<H", 0) + struct.pack("<H", 0) + struct.pack("<H", 0)
               + struct.pack("<H", 2) + b"ab c  ")  # TXT_CNT 2, USER_TXT C*3
    data = (stdf([far()]) + vur + stdf([mir()]) + psr + nmr + cnr + ssr + cdr
            + stdf([pir(1, 0)]) + str_ + stdf([prr(1, 0, "1"), MRR]))
    dec = StdfDecoder()
    dec.feed(data)
    got = {r.name: r.fields for r in dec.records()}
    assert dec.unknown_count == 0 and dec.position == len(data)
    assert got["VUR"] == {"UPD_CNT": 1, "UPD_NAM": ["Scan:2007.1"]}
    assert (got["PSR"]["PAT_BGN"], got["PSR"]["PAT_END"], got["PSR"]["SRC_ID"]) == (
        [10], [20], ["src"])
    assert got["NMR"]["PMR_INDX"] == [5, 6] and got["NMR"]["ATPG_NAM"] == ["n5", "n6"]
    assert got["CNR"] == {"CHN_NUM": 3, "BIT_POS": 77, "CELL_NAM": "cell/x"}
    assert got["SSR"] == {"SSR_NAM": "ssr", "CHN_CNT": 2, "CHN_LIST": [3, 4]}
    assert got["CDR"]["M_CLKS"] == [11] and got["CDR"]["CELL_LST"] == ["c0", "c1"]
    assert (got["STR"]["TEST_NUM"], got["STR"]["CYC_OFST"], got["STR"]["PMR_INDX"],
            got["STR"]["USER_TXT"]) == (500, [40, 41], [5, 6], ["ab ", "c  "])
    # they are no results: the part and its lot are all the gateway sends
    assert [type(r).__name__ for r in gateway(data)] == ["LotStart", "PartResult", "LotEnd"]


# -- known problems ------------------------------------------------------------------------


def test_a_vax_file_is_dumped_and_mapped_with_its_floats_as_the_tester_wrote_them(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # (its F floats were read as IEEE: a strict xfail, and dump warned of wrong values)
    result = ptr(1, 0, -0.9)
    result[1]["HI_LIMIT"] = 1e30
    data = b"".join(StdfWriter("<", cpu_type=0).encode(name, fields) for name, fields in (
        far(0), mir(), pir(1, 0), result, prr(1, 0, "1"), MRR))
    assert data[4] == 0  # CPU_TYPE 0
    path = tmp_path / "vax.stdf"
    path.write_bytes(data)
    assert main(["stdf", "dump", "--rec", "PTR", str(path)]) == 0
    out, err = capsys.readouterr()
    dumped = json.loads(out)
    assert (dumped["RESULT"], dumped["LO_LIMIT"], dumped["HI_LIMIT"]) == (-0.9, 0.0, 1e30)
    assert err == ""
    (sent,) = [r for r in gateway(data) if isinstance(r, ParametricResult)]
    assert sent.value == struct.unpack("<f", struct.pack("<f", -0.9))[0]


async def test_a_gzip_file_appended_member_by_member_is_read_to_its_mrr(
        tmp_path: Path) -> None:
    data = dual_head_final_test("<")
    cut = len(data) // 2
    path = tmp_path / "lot.stdf.gz"
    path.write_bytes(gzip.compress(data[:cut]))  # a tester compressing each write
    records: list[Any] = []

    class Sink:
        async def put(self, batch: Any, checkpoint: Any = None) -> None:
            records.extend(batch)

    source = TailSource("ate", TailConfig(paths=[str(tmp_path)], idle_timeout=600),
                        SourceContext("gw", Metrics(), None))
    sink = Sink()
    try:
        # polled by hand: each poll reads all a file has; the second member comes after
        # the tail has read the first to its end, as from a tester between two writes
        for _ in range(2):
            await source.poll_once(sink)
        assert any(isinstance(r, PartResult) for r in records)
        with path.open("ab") as f:
            f.write(gzip.compress(data[cut:]))
        for _ in range(2):
            await source.poll_once(sink)
    finally:
        for f in source.files.values():
            await source._release(f)
    assert any(isinstance(r, LotEnd) for r in records)
    assert len([r for r in records if isinstance(r, PartResult)]) == 24


def test_nan_results_are_sent_and_left_out_of_the_statistics() -> None:
    # (an UltraFLEX writes NaN for a measurement that did not settle)
    sent = gateway(stdf([far(), mir(), pir(1, 0), ptr(1, 0, math.nan), ptr(1, 0, 2.0, num=101),
                         prr(1, 0, "1"), MRR]))
    values = [r.value for r in sent if isinstance(r, ParametricResult)]
    assert math.isnan(values[0]) and values[1] == 2.0
    state = hub(sent)
    test = state.snapshot("test/LOTA/100")
    assert test is not None and test["executions"] == 1 and test["count"] == 0


# -- what a result's flags make of it (STDF V4 TEST_FLG / PARM_FLG) ------------------------


def flagged_ptr(value: float, test_flg: int, parm_flg: int = 0, num: int = 100) -> Rec:
    name, fields = ptr(1, 0, value, num)
    return name, fields | {"TEST_FLG": test_flg, "PARM_FLG": parm_flg}


def flagged_parts(results: list[Rec]) -> bytes:
    """One part per result, each on site 0 (a final-test handler, no wafer)."""
    recs: list[Rec] = [far(), mir()]
    for i, result in enumerate(results):
        recs += [pir(1, 0), result, prr(1, 0, str(i + 1))]
    return stdf([*recs, MRR])


FLAGGED = [
    flagged_ptr(0.0, 0x10),          # not executed (a test the flow skipped): no figure but its own
    flagged_ptr(0.0, 0x10 | 0x80),   # not executed, its fail bit left set: still no fail
    flagged_ptr(5.0, 0),             # a value
    flagged_ptr(20.0, 0x80, 0x08),   # a value over the high limit: a fail, and a value
    flagged_ptr(0.0, 0x02 | 0x80),   # executed, no value taken, failed (bit 1: read bits 6/7)
    flagged_ptr(3.0, 0, 0x02),       # drift (an unstable measurement): executed, no value
    flagged_ptr(4.0, 0x01),          # alarm: executed, no value
    flagged_ptr(6.0, 0x04 | 0x40),   # unreliable, no pass/fail: executed, no value, no fail
]


@pytest.mark.parametrize("batched", [True, False])
def test_a_test_not_executed_is_no_execution_and_unusable_values_stay_out_of_the_figures(
        batched: bool) -> None:
    sent = gateway(flagged_parts(FLAGGED))
    # every result is sent, its flags as the tester wrote them (nothing lost)
    results = [r for r in sent if isinstance(r, ParametricResult)]
    assert [(r.test_flag, r.parm_flag) for r in results] == [
        (f["TEST_FLG"], f["PARM_FLG"]) for _, f in FLAGGED]
    state = LiveState(lambda topic, delta: None, clock=lambda: 1.0, batch_apply=batched)
    state.on_records("gw", 1, sent, now=1.0)
    test = state.snapshot("test/LOTA/100")
    assert test is not None
    assert (test["executions"], test["not_executed"], test["fails"]) == (6, 2, 2)
    # only the values the spec calls useful (TEST_FLG bits 0-5, PARM_FLG bits 0-2 clear)
    assert (test["count"], test["mean"], test["min"], test["max"]) == (2, 12.5, 5.0, 20.0)
    assert test["sites"] == {"0": [2, 12.5, test["sigma"]]}
    assert sum(test["histogram"]["counts"]) == 2
    # the limits of a result not executed still count (a first PTR of defaults only)
    assert (test["lo_limit"], test["hi_limit"], test["units"]) == (0.0, 10.0, "V")
    # and a restart from a checkpoint keeps the figure
    again = LiveState(lambda topic, delta: None, clock=lambda: 1.0)
    restore(again, decode(encode({"frame_id": 1}, capture(state)))[1])
    assert again.snapshot("test/LOTA/100") == test


def test_a_result_not_executed_has_no_pass_fail_on_the_gateway_whatever_its_fail_bit() -> None:
    # the spec: a test not executed (TEST_FLG bit 4) has no result and no pass/fail; the
    # gateway sent such a result with its fail bit left set as failed (passed False) and
    # counted it in its part's fails (the hub already ignored it)
    sent = gateway(flagged_parts(FLAGGED))
    assert [r.passed for r in sent if isinstance(r, ParametricResult)] == [
        None, None, True, False, False, True, True, None]
    mpr: Rec = ("MPR", {"TEST_NUM": 200, "HEAD_NUM": 1, "SITE_NUM": 0, "TEST_FLG": 0x90,
                        "PARM_FLG": 0, "RTN_ICNT": 0, "RSLT_CNT": 0})
    ftr: Rec = ("FTR", {"TEST_NUM": 300, "HEAD_NUM": 1, "SITE_NUM": 0, "TEST_FLG": 0x90})
    sent = gateway(stdf([far(), mir(), pir(1, 0), mpr, ftr, prr(1, 0, "1"), MRR]))
    assert [r.passed for r in sent if isinstance(r, (MultiPinResult, FunctionalResult))] == [
        None, None]
    assert result_passed(0x90) is None and result_passed(0x80) is False
    state = TestState()  # the per-part figures of a file's open parts
    part = state.open_part({"HEAD_NUM": 1, "SITE_NUM": 0})
    state.part_for({"HEAD_NUM": 1, "SITE_NUM": 0, "TEST_FLG": 0x90})
    state.part_for({"HEAD_NUM": 1, "SITE_NUM": 0, "TEST_FLG": 0x80})
    assert (part.results, part.failed) == (2, 1)


def test_a_multipin_or_functional_test_not_executed_is_no_execution() -> None:
    mpr: Rec = ("MPR", {"TEST_NUM": 200, "HEAD_NUM": 1, "SITE_NUM": 0, "TEST_FLG": 0x10 | 0x80,
                        "PARM_FLG": 0, "RTN_ICNT": 0, "RSLT_CNT": 2, "RTN_RSLT": [1.0, 2.0],
                        "TEST_TXT": "IIL", "OPT_FLAG": 0x0E, "LO_LIMIT": 0.0,
                        "HI_LIMIT": 5.0, "UNITS": "A"})
    ftr: Rec = ("FTR", {"TEST_NUM": 300, "HEAD_NUM": 1, "SITE_NUM": 0,
                        "TEST_FLG": 0x10 | 0x80, "OPT_FLAG": 0xFF, "TEST_TXT": "FUNC"})
    ran = [("MPR", mpr[1] | {"TEST_FLG": 0x80}), ("FTR", ftr[1] | {"TEST_FLG": 0x80})]
    state = hub(gateway(stdf([far(), mir(), pir(1, 0), mpr, ftr, prr(1, 0, "1"),
                              pir(1, 0), *ran, prr(1, 0, "2"), MRR])))
    for num in (200, 300):
        test = state.snapshot(f"test/LOTA/{num}")
        assert test is not None
        assert (test["executions"], test["not_executed"], test["fails"]) == (1, 1, 1)
    multipin = state.snapshot("test/LOTA/200")
    assert multipin is not None and multipin["count"] == 2  # the run one's two pins only


def test_a_final_test_lot_has_no_wafer_but_counts_its_parts() -> None:
    state = hub(gateway(dual_head_final_test("<")))
    lot = state.snapshot("lot/LOTA")
    assert lot is not None
    # no "" wafer (it plotted as a wafer named "" on the dashboard's yield trend)
    assert (lot["wafers"], lot["wafer_count"], lot["archived_wafers"]) == ([], 0, 0)
    assert (lot["die_count"], lot["good"]) == (24, 18)
    assert not [t for t in state.topics() if t.startswith("lot/LOTA/wafer/")]
    test = state.snapshot("test/LOTA/100")
    assert test is not None and test["wafers"] == [] and test["count"] == 24


def test_a_test_number_reused_for_another_test_is_detected_and_counted() -> None:
    metrics = Metrics()
    other = [("PTR", f | {"TEST_TXT": "IDDQ"}) for _, f in [ptr(1, 0, 7.0)]]
    for batched in (True, False):
        state = LiveState(lambda topic, delta: None, clock=lambda: 1.0, metrics=metrics,
                          batch_apply=batched)
        # two parts: test 100 is "VDD" and, on the same number, "IDDQ"; then VDD again
        state.on_records("gw", 1, gateway(stdf([
            far(), mir(), pir(1, 0), ptr(1, 0, 1.0), *other, prr(1, 0, "1"),
            pir(1, 0), ptr(1, 0, 2.0), *other, prr(1, 0, "2"), MRR])), now=1.0)
        test = state.snapshot("test/LOTA/100")
        assert test is not None
        # their figures are mixed (the hub keys a test by its number), and it says so
        assert test["count"] == 4 and test["test_txts"] == ["IDDQ", "VDD"]
    assert metrics.counter("hub_state_test_numbers_shared_total").total() == 2
    again = LiveState(lambda topic, delta: None, clock=lambda: 1.0)
    restore(again, decode(encode({"frame_id": 1}, capture(state)))[1])
    assert again.snapshot("test/LOTA/100") == test
    # a test of one name lists it alone
    single = hub(gateway(stdf([far(), mir(), pir(1, 0), ptr(1, 0, 1.0), prr(1, 0, "1"), MRR])))
    one = single.snapshot("test/LOTA/100")
    assert one is not None and one["test_txts"] == ["VDD"]


# -- a lot tested again under its lot id -----------------------------------------------------


def retest_of(lot: str, start: int, parts: list[tuple[str, bool]]) -> bytes:
    """A file testing ``lot`` from START_T ``start``: each part (PART_ID, passed) once,
    its MRR 10 s later.  A retest on the floor keeps the LOT_ID."""
    head = mir(lot)
    head[1]["START_T"] = start
    recs: list[Rec] = [far(), head]
    for part_id, passed in parts:
        recs += [pir(1, 0), ptr(1, 0, 1.0 if passed else 11.0),
                 prr(1, 0, part_id, hard=1 if passed else 2, failed=not passed)]
    return stdf([*recs, ("MRR", {"FINISH_T": start + 10})])


#: first pass: parts 1-4, 3 and 4 fail; the retest file tests the two failures again (one
#: now passes) and a part the first pass did not reach
FIRST = retest_of("LOTA", 100, [("1", True), ("2", True), ("3", False), ("4", False)])
AGAIN = retest_of("LOTA", 500, [("3", True), ("4", False), ("5", True)])


def test_a_lot_tested_again_under_its_lot_id_is_in_test_again_and_closes_at_its_next_mrr(
        ) -> None:
    first, again = gateway(FIRST), gateway(AGAIN)
    state = hub(first)
    lot = state.snapshot("lot/LOTA")
    assert lot is not None and lot["status"] == "closed"
    # the retest's MIR: in test again, saying which pass; the first pass's times stay
    state.on_records("gw", 1 + len(first), again[:1], now=2.0)
    lot = state.snapshot("lot/LOTA")
    assert lot is not None and lot["status"] == "open"
    assert (lot["starts"], lot["reopened_at"]) == (2, 500.0)  # (it was 1, None)
    assert (lot["started"], lot["ended"]) == (100.0, 110.0)
    # its parts go on: a PART_ID tested again is a retest of that part, the yield over
    # each part's final result
    state.on_records("gw", 2 + len(first), again[1:-1], now=2.0)
    lot = state.snapshot("lot/LOTA")
    assert lot is not None and lot["status"] == "open"
    assert (lot["die_count"], lot["parts"], lot["retests"], lot["good"]) == (5, 7, 2, 4)
    assert lot["yield"] == pytest.approx(4 / 5)
    # and it closes again at the retest's MRR
    state.on_records("gw", len(first) + len(again), again[-1:], now=2.0)
    lot = state.snapshot("lot/LOTA")
    assert lot is not None
    assert (lot["status"], lot["ended"], lot["starts"]) == ("closed", 510.0, 2)


def test_a_lot_tested_again_is_the_same_after_a_restart_a_replay_or_frames_out_of_order(
        ) -> None:
    records = gateway(FIRST) + gateway(AGAIN)
    for cut in range(1, len(records)):
        full, restored, replayed = applied_three_ways(records, cut)
        # after an outage the newest frame comes first (docs/spool.md): a late MRR of the
        # first pass does not close the retest, a late MIR does not reopen
        late = LiveState(lambda topic, delta: None, clock=lambda: 1.0)
        late.on_records("gw", 1 + cut, records[cut:], now=1.0)
        late.on_records("gw", 1, records[:cut], now=1.0)
        for state in (restored, replayed, late):
            assert sorted(state.topics()) == sorted(full.topics())
            for topic in full.topics():
                assert state.snapshot(topic) == full.snapshot(topic), (cut, topic)
    # mid retest, as well: open whatever order the two passes' frames came in
    mid = len(gateway(FIRST)) + 2
    late = LiveState(lambda topic, delta: None, clock=lambda: 1.0)
    late.on_records("gw", 1 + mid, records[mid:-1], now=1.0)
    late.on_records("gw", 1, records[:mid], now=1.0)
    lot = late.snapshot("lot/LOTA")
    assert lot is not None and (lot["status"], lot["starts"]) == ("open", 2)
