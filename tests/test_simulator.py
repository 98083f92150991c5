"""The STDF tester simulator: seeded, reproducible, realistic, written in real time."""

from __future__ import annotations

import gzip
from collections import Counter
from pathlib import Path
from typing import Any

import trio

from edgegw.cli import main
from edgegw.sim import stdf_chunks, stdf_file_bytes, write_files
from edgegw.sim.tester import TesterModel, TesterProfile
from edgegw.stdf import StdfDecoder

PROFILE = TesterProfile(sites=4, wafer_diameter_dies=24, tests_per_part=6, wafers=2, seed=11)


def decode(data: bytes) -> list[Any]:
    dec = StdfDecoder()
    dec.feed(data)
    recs = list(dec.records())
    assert dec.position == len(data)  # nothing left over: the file is complete
    return recs


def test_same_seed_same_bytes_other_seed_other_bytes() -> None:
    a = stdf_file_bytes(PROFILE, start_time=1_700_000_000)
    assert a == stdf_file_bytes(PROFILE, start_time=1_700_000_000)
    assert a != stdf_file_bytes(TesterProfile(**{**PROFILE.__dict__, "seed": 12}),
                                start_time=1_700_000_000)


def test_the_file_decodes_in_tester_order_with_the_configured_sites_parts_and_tests() -> None:
    for order in ("<", ">"):
        recs = decode(stdf_file_bytes(PROFILE, byte_order=order))
        names = [r.name for r in recs]
        assert names[:5] == ["FAR", "MIR", "SDR", "WCR", "WIR"] and names[-1] == "MRR"
        assert recs[0].fields["CPU_TYPE"] == (2 if order == "<" else 1)
        assert names.count("WIR") == names.count("WRR") == 2
        prrs = [r.fields for r in recs if r.name == "PRR"]
        dies = len(TesterModel(PROFILE).dies())
        retests = sum(1 for p in prrs if p["PART_FLG"] & 0x02)
        assert len(prrs) == names.count("PIR") == 2 * dies + retests
        assert 0 < retests < len(prrs) // 10
        assert {p["SITE_NUM"] for p in prrs} == {0, 1, 2, 3}
        assert names.count("PTR") == len(prrs) * PROFILE.tests_per_part
        assert recs[2].fields["SITE_NUM"] == [0, 1, 2, 3]


def test_sites_interleave_and_only_the_first_ptr_of_a_test_carries_its_defaults() -> None:
    recs = decode(stdf_file_bytes(PROFILE))
    first_pir = next(i for i, r in enumerate(recs) if r.name == "PIR")
    touchdown = [(r.name, r.fields.get("SITE_NUM"), r.fields.get("TEST_NUM"))
                 for r in recs[first_pir:first_pir + 4 + 4 * 6 + 4]]
    assert touchdown[:4] == [("PIR", s, None) for s in range(4)]
    assert touchdown[4:8] == [("PTR", s, 100) for s in range(4)]  # test by test, all sites
    assert touchdown[-4:] == [("PRR", s, None) for s in range(4)]
    ptrs = [r.fields for r in recs if r.name == "PTR"]
    with_defaults = [p for p in ptrs if "UNITS" in p]
    assert [p["TEST_NUM"] for p in with_defaults] == [100, 110, 120, 130, 140, 150]
    assert with_defaults[0]["LO_LIMIT"] == 5.0 and with_defaults[0]["UNITS"] == "uA"
    assert all(set(p) == {"TEST_NUM", "HEAD_NUM", "SITE_NUM", "TEST_FLG", "PARM_FLG",
                          "RESULT"} for p in ptrs if "UNITS" not in p)


def test_yield_edge_ring_weak_site_and_wander_are_in_the_data() -> None:
    profile = TesterProfile(sites=4, wafer_diameter_dies=40, tests_per_part=8, wafers=3,
                            seed=5)
    model = TesterModel(profile)
    recs = decode(stdf_file_bytes(profile))
    prrs = [r.fields for r in recs if r.name == "PRR" and not r.fields["PART_FLG"] & 0x02]
    good = [not p["PART_FLG"] & 0x08 for p in prrs]
    assert 0.86 < sum(good) / len(good) < 0.95
    edge = [g for p, g in zip(prrs, good, strict=True)
            if model._is_edge(p["X_COORD"], p["Y_COORD"])]
    inner = [g for p, g in zip(prrs, good, strict=True)
             if not model._is_edge(p["X_COORD"], p["Y_COORD"])]
    assert sum(edge) / len(edge) < sum(inner) / len(inner) - 0.04
    by_site = {s: [g for p, g in zip(prrs, good, strict=True) if p["SITE_NUM"] == s]
               for s in range(4)}
    weak = sum(by_site[1]) / len(by_site[1])
    assert all(weak < sum(v) / len(v) - 0.02 for s, v in by_site.items() if s != 1)
    # IDD_STATIC (test 100) wanders from wafer to wafer, near its nominal 25 uA (a
    # mean-reverting walk, never a ramp out of its limits)
    means = []
    for wafer in range(3):
        wir = [i for i, r in enumerate(recs) if r.name == "WIR"][wafer]
        wrr = [i for i, r in enumerate(recs) if r.name == "WRR"][wafer]
        vals = [r.fields["RESULT"] for r in recs[wir:wrr]
                if r.name == "PTR" and r.fields["TEST_NUM"] == 100 and not r.fields["TEST_FLG"]]
        means.append(sum(vals) / len(vals))
    assert len({round(m, 2) for m in means}) == 3
    assert all(20 < m < 30 for m in means)


def test_the_testers_summaries_agree_with_its_prrs() -> None:
    recs = decode(stdf_file_bytes(PROFILE))
    prrs = [r.fields for r in recs if r.name == "PRR"]
    hbr = {r.fields["HBIN_NUM"]: r.fields["HBIN_CNT"] for r in recs
           if r.name == "HBR" and r.fields["HEAD_NUM"] == 255}
    sbr = {r.fields["SBIN_NUM"]: r.fields["SBIN_CNT"] for r in recs
           if r.name == "SBR" and r.fields["HEAD_NUM"] == 255}
    assert hbr == Counter(p["HARD_BIN"] for p in prrs)
    assert sbr == Counter(p["SOFT_BIN"] for p in prrs)
    site_hbr = Counter()
    for r in recs:
        if r.name == "HBR" and r.fields["HEAD_NUM"] == 1:
            site_hbr[r.fields["SITE_NUM"], r.fields["HBIN_NUM"]] += r.fields["HBIN_CNT"]
    assert site_hbr == Counter((p["SITE_NUM"], p["HARD_BIN"]) for p in prrs)
    (pcr,) = [r.fields for r in recs if r.name == "PCR" and r.fields["HEAD_NUM"] == 255]
    assert pcr["PART_CNT"] == len(prrs)
    assert pcr["GOOD_CNT"] == sum(1 for p in prrs if not p["PART_FLG"] & 0x08)
    assert pcr["RTST_CNT"] == sum(1 for p in prrs if p["PART_FLG"] & 0x02)
    wrrs = [r.fields for r in recs if r.name == "WRR"]
    assert sum(w["PART_CNT"] for w in wrrs) == len(prrs)
    tsr = {r.fields["TEST_NUM"]: r.fields for r in recs if r.name == "TSR"}
    assert tsr[100]["EXEC_CNT"] == len(prrs) and tsr[100]["TEST_NAM"] == "IDD_STATIC"


def test_a_realistic_number_of_tests_per_part() -> None:
    profile = TesterProfile(sites=2, wafer_diameter_dies=8, tests_per_part=120, seed=2)
    recs = decode(stdf_file_bytes(profile))
    prrs = [r.fields for r in recs if r.name == "PRR"]
    ptrs = [r.fields for r in recs if r.name == "PTR"]
    assert len(ptrs) == 120 * len(prrs)
    assert {p["TEST_NUM"] for p in ptrs} == {100, 110, 120, 130, 140, 150, 160, 170} | set(
        range(1000, 1112))
    assert all(p["NUM_TEST"] == 120 for p in prrs)
    assert len([r for r in recs if r.name == "TSR"]) == 120


def test_lots_and_wafers_split_into_files() -> None:
    chunks = list(stdf_chunks(PROFILE, lots=2, per_wafer=True))
    ends = [c.file_name for c in chunks if c.end_of_file]
    assert ends == ["LOT0001_W01.stdf", "LOT0001_W02.stdf", "LOT0002_W01.stdf",
                    "LOT0002_W02.stdf"]
    for name in ends:
        recs = decode(b"".join(c.data for c in chunks if c.file_name == name))
        assert [r.name for r in recs].count("WIR") == 1 and recs[-1].name == "MRR"
    assert decode(b"".join(c.data for c in chunks if c.file_name == ends[2]))[1].fields[
        "LOT_ID"] == "LOT0002"


async def test_the_file_grows_while_the_tester_writes(tmp_path: Path) -> None:
    profile = TesterProfile(sites=2, wafer_diameter_dies=10, tests_per_part=4)
    sizes: list[int] = []
    path = tmp_path / "LOT0001.stdf"
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: write_files(
            tmp_path, stdf_chunks(profile, parts_per_second=400), parts_per_second=400))
        while not sizes or sizes[-1] < len(stdf_file_bytes(profile, parts_per_second=400)):
            await trio.sleep(0.02)
            if await trio.Path(path).exists():
                sizes.append((await trio.Path(path).stat()).st_size)
    assert len(set(sizes)) >= 4  # seen growing, flushed touchdown by touchdown
    assert sizes == sorted(sizes)
    assert path.read_bytes() == stdf_file_bytes(profile, parts_per_second=400)


def test_the_simulate_command_is_reproducible(tmp_path: Path) -> None:
    args = ["simulate", "--sites", "2", "--wafer-diameter", "8", "--tests-per-part", "3",
            "--parts-per-second", "20000", "--seed", "9", "--start-time", "1700000000",
            "--lots", "2", "--byte-order", "big"]
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    assert main([*args, "--out", str(tmp_path / "b"), "--gzip"]) == 0
    a = sorted((tmp_path / "a").iterdir())
    b = sorted((tmp_path / "b").iterdir())
    assert [p.name for p in a] == ["LOT0001.stdf", "LOT0002.stdf"]
    assert [p.name for p in b] == ["LOT0001.stdf.gz", "LOT0002.stdf.gz"]
    for plain, packed in zip(a, b, strict=True):
        assert gzip.decompress(packed.read_bytes()) == plain.read_bytes()
    profile = TesterProfile(sites=2, wafer_diameter_dies=8, tests_per_part=3, seed=9)
    assert a[0].read_bytes() == stdf_file_bytes(profile, byte_order=">",
                                                start_time=1_700_000_000,
                                                parts_per_second=20000)


def test_a_stopped_tester_leaves_an_unfinished_file(tmp_path: Path) -> None:
    assert main(["simulate", "--out", str(tmp_path), "--wafer-diameter", "30",
                 "--parts-per-second", "2000", "--duration", "0.1"]) == 0
    (path,) = tmp_path.iterdir()
    names = [r.name for r in decode(path.read_bytes())]
    assert names[0] == "FAR" and "PRR" in names and "MRR" not in names
