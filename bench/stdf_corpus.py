"""Synthetic but realistic STDF files of the shapes the shared real files do not cover.

The two real files in ``shared/data/stdf`` are PTR-heavy (one A530 wafer, one two-site
D-10 lot).  Testers in the field write other shapes, and a decoder's speed depends on
them (issue 17: a Teradyne Catalyst file, FTR/GDR-heavy with varied PTRs, decoded at a
third of the speed of the A530 file).  Each function here builds one shape with
:class:`edgegw.stdf.StdfWriter`, seeded, so the same call gives the same bytes:

``ftr-heavy``   Teradyne-like, little-endian, 4 sites: functional tests (FTR) with varied
                fail pins (RTN_INDX/RTN_STAT arrays, FAIL_PIN bits, vector names),
                full PTRs with varied texts and per-site limits, GDRs and DTRs per part
``mpr-heavy``   2 sites: multi-pin parametric records, 8-64 pins each, with limits
``ptr-varied``  big-endian (CPU_TYPE 1), 2 heads x 8 sites: 1,200 distinct tests with
                their own texts, units and limits that differ per head, site and part
                (adaptive limits), every PTR written in full: no two PTR tails alike,
                so the decoder's tail memo never hits
``gdr-heavy``   GDRs of 4-40 mixed-type values (U1..R8, C*n, B*n, D*n, N*1) between PTRs,
                every GDR's type codes drawn anew (the worst case for the decoder)
``gdr-layouts`` the same mix as testers write per-part GDRs: each GDR's type codes
                the same in every part (30 layouts), only the values new
``catalyst``    the mix issue 17's Teradyne Catalyst file has, 2 sites: per part 48 FTRs
                (a quarter failing: RTN_INDX/RTN_STAT and PGM_INDX/PGM_STAT arrays,
                256-pin FAIL_PIN bits, vector names), 6 MPRs of 4-16 pins, 40 PTRs whose
                optional tail varies record to record (full with limits that drift per
                part, cut after TEST_TXT, cut after OPT_FLAG, limits flagged invalid), and
                GDRs holding every generic type

Values stay inside what pystdf reads (ASCII text, no GDR pad bytes), so the bench and the
fidelity test can hold both decoders to the same bytes.

    python bench/stdf_corpus.py DIR     # write the shapes as DIR/<shape>.stdf
"""

from __future__ import annotations

import random
import struct
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from edgegw.stdf import BY_NAME, Bits, StdfWriter

Record = tuple[str, dict[str, Any]]

_UNITS = ("V", "A", "mA", "uA", "nA", "Hz", "MHz", "s", "ns", "Ohm", "dB", "")
_BLOCKS = ("VDD", "VDDIO", "IDDQ", "LEAK", "PLL", "ADC", "DAC", "LDO", "BGAP", "SCAN")


def _r4(value: float) -> float:
    """``value`` rounded to float32 (R*4 fields then round-trip without change)."""
    return struct.unpack("<f", struct.pack("<f", value))[0]


def _f32(rnd: random.Random, lo: float, hi: float) -> float:
    return _r4(rnd.uniform(lo, hi))


def _head(order: str, sites: list[tuple[int, int]], job: str, tester: str) -> list[Record]:
    heads = sorted({h for h, _ in sites})
    out: list[Record] = [
        ("FAR", {"CPU_TYPE": 2 if order == "<" else 1, "STDF_VER": 4}),
        ("ATR", {"MOD_TIM": 1_700_000_000, "CMD_LINE": f"convert {job}.stdf"}),
        ("MIR", {"SETUP_T": 1_700_000_000, "START_T": 1_700_000_100, "STAT_NUM": 7,
                 "MODE_COD": "P", "RTST_COD": " ", "PROT_COD": " ", "BURN_TIM": 65535,
                 "CMOD_COD": " ", "LOT_ID": "LOT17A", "PART_TYP": "DEV-9000",
                 "NODE_NAM": "tester-07", "TSTR_TYP": tester, "JOB_NAM": job,
                 "JOB_REV": "r3", "SBLOT_ID": "S1", "OPER_NAM": "op", "EXEC_TYP": tester,
                 "EXEC_VER": "10.2", "TEST_COD": "FT", "TST_TEMP": "25C"}),
    ]
    for head in heads:
        nums = [s for h, s in sites if h == head]
        out.append(("SDR", {"HEAD_NUM": head, "SITE_GRP": 1, "SITE_CNT": len(nums),
                            "SITE_NUM": nums, "HAND_TYP": "handler", "HAND_ID": "H7",
                            "CARD_TYP": "probe", "CARD_ID": "PC12"}))
    for i in range(24):
        out.append(("PMR", {"PMR_INDX": i + 1, "CHAN_TYP": 0, "CHAN_NAM": f"ch{i}",
                            "PHY_NAM": f"P{i}", "LOG_NAM": f"DQ{i}", "HEAD_NUM": heads[0],
                            "SITE_NUM": 1}))
    return out


def _tail(parts: dict[tuple[int, int], list[int]], sites: list[tuple[int, int]],
          tests: list[int]) -> list[Record]:
    """HBR/SBR/PCR per site and for all sites, TSR per test, MRR."""
    out: list[Record] = []
    total: dict[int, int] = {}
    for (head, site), bins in sorted(parts.items()):
        counts: dict[int, int] = {}
        for b in bins:
            counts[b] = counts.get(b, 0) + 1
            total[b] = total.get(b, 0) + 1
        for b, n in sorted(counts.items()):
            out.append(("HBR", {"HEAD_NUM": head, "SITE_NUM": site, "HBIN_NUM": b,
                                "HBIN_CNT": n, "HBIN_PF": "P" if b == 1 else "F",
                                "HBIN_NAM": f"bin{b}"}))
            out.append(("SBR", {"HEAD_NUM": head, "SITE_NUM": site, "SBIN_NUM": b,
                                "SBIN_CNT": n, "SBIN_PF": "P" if b == 1 else "F",
                                "SBIN_NAM": f"bin{b}"}))
        out.append(("PCR", {"HEAD_NUM": head, "SITE_NUM": site, "PART_CNT": len(bins)}))
    for b, n in sorted(total.items()):
        out.append(("HBR", {"HEAD_NUM": 255, "SITE_NUM": 0, "HBIN_NUM": b, "HBIN_CNT": n,
                            "HBIN_PF": "P" if b == 1 else "F", "HBIN_NAM": f"bin{b}"}))
    out.append(("PCR", {"HEAD_NUM": 255, "SITE_NUM": 0,
                        "PART_CNT": sum(len(v) for v in parts.values())}))
    for t in tests:
        out.append(("TSR", {"HEAD_NUM": 255, "SITE_NUM": 0, "TEST_TYP": "P", "TEST_NUM": t,
                            "EXEC_CNT": 10, "FAIL_CNT": 1, "ALRM_CNT": 0,
                            "TEST_NAM": f"t{t}"}))
    out.append(("MRR", {"FINISH_T": 1_700_009_000, "DISP_COD": " ", "USR_DESC": "done"}))
    return out


class _Ptrs:
    """A test program's parametric tests: text, units and limits per test, varied per site."""

    def __init__(self, rnd: random.Random, count: int, first: int) -> None:
        self.rnd = rnd
        self.tests: list[dict[str, Any]] = []
        for i in range(count):
            block = rnd.choice(_BLOCKS)
            lo = _f32(rnd, -2.0, 0.5)
            self.tests.append({
                "TEST_NUM": first + i,
                "TEST_TXT": f"{block}_{rnd.choice(('HI', 'LO', 'NOM'))}_{i}"
                            f"{'_pin' + str(rnd.randrange(64)) if rnd.random() < 0.5 else ''}",
                "UNITS": rnd.choice(_UNITS), "lo": lo, "hi": _r4(lo + rnd.uniform(0.5, 3.0)),
                "scale": rnd.choice((0, 0, -3, -6, 3)),
            })

    def record(self, t: dict[str, Any], head: int, site: int, part: int,
               drift: bool = False) -> Record:
        rnd = self.rnd
        result = _f32(rnd, t["lo"] - 0.2, t["hi"] + 0.2)
        failed = not t["lo"] <= result <= t["hi"]
        # per-site trims (a real program trims per site): the tail differs site to site;
        # ``drift``: limits that move part to part too (adaptive limits), on every head
        trim = site * 0.001 + (head * 0.01 + part * 1e-5 if drift else 0.0)
        return ("PTR", {
            "TEST_NUM": t["TEST_NUM"], "HEAD_NUM": head, "SITE_NUM": site,
            "TEST_FLG": 0x80 if failed else 0, "PARM_FLG": 0xC0, "RESULT": result,
            "TEST_TXT": t["TEST_TXT"], "ALARM_ID": "", "OPT_FLAG": 0x0E,
            "RES_SCAL": t["scale"], "LLM_SCAL": t["scale"], "HLM_SCAL": t["scale"],
            "LO_LIMIT": _r4(t["lo"] - trim), "HI_LIMIT": _r4(t["hi"] + trim),
            "UNITS": t["UNITS"],
            "C_RESFMT": "%9.4f", "C_LLMFMT": "%9.4f", "C_HLMFMT": "%9.4f",
            "LO_SPEC": t["lo"], "HI_SPEC": t["hi"]})


def _lot(order: str, sites: list[tuple[int, int]], parts: int, seed: int, job: str,
         tester: str, body: Callable[[random.Random, int, int, int], Iterator[Record]],
         tests: list[int]) -> bytes:
    """FAR..SDR/PMR, then touchdowns (PIR of every site, ``body`` per site, PRR of every
    site), then the summaries; as bytes in ``order``."""
    rnd = random.Random(seed)
    w = StdfWriter(order)
    out = [w.encode(n, f) for n, f in _head(order, sites, job, tester)]
    bins: dict[tuple[int, int], list[int]] = {s: [] for s in sites}
    part = 0
    while part < parts:
        touchdown = sites[: min(len(sites), parts - part)]
        for head, site in touchdown:
            out.append(w.encode("PIR", {"HEAD_NUM": head, "SITE_NUM": site}))
        for head, site in touchdown:
            out.extend(w.encode(n, f) for n, f in body(rnd, head, site, part))
        for head, site in touchdown:
            part += 1
            good = rnd.random() < 0.85
            hard = 1 if good else rnd.choice((2, 3, 5, 7))
            bins[(head, site)].append(hard)
            out.append(w.encode("PRR", {
                "HEAD_NUM": head, "SITE_NUM": site, "PART_FLG": 0 if good else 0x08,
                "NUM_TEST": 100, "HARD_BIN": hard, "SOFT_BIN": hard,
                "X_COORD": part % 40, "Y_COORD": part // 40, "TEST_T": 1200 + part % 50,
                "PART_ID": str(part), "PART_TXT": "", "PART_FIX": b""}))
    out.extend(w.encode(n, f) for n, f in _tail(bins, sites, tests))
    return b"".join(out)


def ftr_heavy(order: str = "<", parts: int = 400, seed: int = 17) -> bytes:
    rnd0 = random.Random(seed + 1)
    ptrs = _Ptrs(rnd0, 25, 1000)
    ftrs = [(5000 + i, f"func_{rnd0.choice(_BLOCKS).lower()}_{i}", f"pat_{i:03d}_x")
            for i in range(60)]

    def body(rnd: random.Random, head: int, site: int, part: int) -> Iterator[Record]:
        yield "DTR", {"TEXT_DAT": f"site {site} part {part} temp 25.{rnd.randrange(10)}C"}
        for num, text, pattern in ftrs:
            fails = rnd.random() < 0.2
            npins = rnd.randrange(1, 24) if fails else 0
            pins = sorted(rnd.sample(range(1, 129), npins))
            nbits = 128 if fails else 0
            bits = bytearray(nbits // 8)
            for p in pins:
                bits[(p - 1) // 8] |= 1 << ((p - 1) % 8)
            yield "FTR", {
                "TEST_NUM": num, "HEAD_NUM": head, "SITE_NUM": site,
                "TEST_FLG": 0x80 if fails else 0, "OPT_FLAG": 0x0E if fails else 0xFF,
                "CYCL_CNT": rnd.randrange(1 << 20) if fails else 0,
                "REL_VADR": rnd.randrange(4096) if fails else 0, "REPT_CNT": 1,
                "NUM_FAIL": npins, "XFAIL_AD": 0, "YFAIL_AD": 0, "VECT_OFF": 0,
                "RTN_ICNT": npins, "PGM_ICNT": 0, "RTN_INDX": pins,
                "RTN_STAT": [rnd.randrange(16) for _ in pins], "PGM_INDX": [],
                "PGM_STAT": [], "FAIL_PIN": Bits(nbits, bytes(bits)),
                "VECT_NAM": pattern if fails else "", "TIME_SET": "ts1",
                "OP_CODE": "", "TEST_TXT": text, "ALARM_ID": "", "PROG_TXT": "",
                "RSLT_TXT": "fail" if fails else "", "PATG_NUM": 255,
                "SPIN_MAP": Bits(0, b"")}
        for t in ptrs.tests:
            yield ptrs.record(t, head, site, part)
        yield "GDR", {"GEN_DATA": [(10, f"PART_{part}"), (3, part), (7, _f32(rnd, 0, 1)),
                                   (10, "flow=main")]}

    sites = [(1, s) for s in range(4)]
    tests = [n for n, _, _ in ftrs] + [t["TEST_NUM"] for t in ptrs.tests]
    return _lot(order, sites, parts, seed, "catalyst_job", "Catalyst", body, tests)


def _mpr(rnd: random.Random, head: int, site: int, num: int, text: str, pins: int,
         lo: float, hi: float) -> dict[str, Any]:
    """An MPR of ``pins`` results drawn around its limits, up to UNITS."""
    results = [_f32(rnd, lo - 0.1, hi + 0.1) for _ in range(pins)]
    failed = any(not lo <= r <= hi for r in results)
    return {
        "TEST_NUM": num, "HEAD_NUM": head, "SITE_NUM": site,
        "TEST_FLG": 0x80 if failed else 0, "PARM_FLG": 0xC0, "RTN_ICNT": pins,
        "RSLT_CNT": pins, "RTN_STAT": [rnd.randrange(16) for _ in range(pins)],
        "RTN_RSLT": results, "TEST_TXT": text, "ALARM_ID": "", "OPT_FLAG": 0x0E,
        "RES_SCAL": 0, "LLM_SCAL": 0, "HLM_SCAL": 0, "LO_LIMIT": lo,
        "HI_LIMIT": hi, "START_IN": 0.0, "INCR_IN": 0.0,
        "RTN_INDX": list(range(1, pins + 1)), "UNITS": "V"}


def mpr_heavy(order: str = "<", parts: int = 600, seed: int = 18) -> bytes:
    rnd0 = random.Random(seed + 1)
    mprs = [(7000 + i, f"MPR_{rnd0.choice(_BLOCKS)}_{i}", rnd0.choice((8, 16, 32, 64)),
             _f32(rnd0, -1, 0), _f32(rnd0, 1, 2)) for i in range(30)]
    ptrs = _Ptrs(rnd0, 10, 1000)

    def body(rnd: random.Random, head: int, site: int, part: int) -> Iterator[Record]:
        for num, text, pins, lo, hi in mprs:
            yield "MPR", {**_mpr(rnd, head, site, num, text, pins, lo, hi), "UNITS_IN": "",
                          "C_RESFMT": "%7.3f", "C_LLMFMT": "%7.3f", "C_HLMFMT": "%7.3f",
                          "LO_SPEC": lo, "HI_SPEC": hi}
        for t in ptrs.tests:
            yield ptrs.record(t, head, site, part)

    sites = [(1, 0), (1, 1)]
    tests = [m[0] for m in mprs] + [t["TEST_NUM"] for t in ptrs.tests]
    return _lot(order, sites, parts, seed, "mpr_job", "93000", body, tests)


def ptr_varied(order: str = ">", parts: int = 32, seed: int = 19) -> bytes:
    ptrs = _Ptrs(random.Random(seed + 1), 1200, 10_000)

    def body(rnd: random.Random, head: int, site: int, part: int) -> Iterator[Record]:
        for t in ptrs.tests:
            yield ptrs.record(t, head, site, part, drift=True)

    sites = [(h, s) for h in (1, 2) for s in range(8)]
    return _lot(order, sites, parts, seed, "ptr_job", "J750", body,
                [t["TEST_NUM"] for t in ptrs.tests])


_GDR_CODES = (1, 2, 3, 4, 5, 6, 7, 8, 10, 10, 11, 12, 13)


def gdr_heavy(order: str = "<", parts: int = 1500, seed: int = 20) -> bytes:
    ptrs = _Ptrs(random.Random(seed + 1), 10, 1000)

    def value(rnd: random.Random) -> tuple[int, Any]:
        code = rnd.choice(_GDR_CODES)
        return code, _gdr_value(rnd, code)

    def body(rnd: random.Random, head: int, site: int, part: int) -> Iterator[Record]:
        for t in ptrs.tests:
            yield ptrs.record(t, head, site, part)
            for _ in range(3):
                yield "GDR", {"GEN_DATA": [value(rnd) for _ in range(rnd.randrange(4, 40))]}

    return _lot(order, [(1, 0)], parts, seed, "gdr_job", "Catalyst", body,
                [t["TEST_NUM"] for t in ptrs.tests])


def gdr_layouts(order: str = "<", parts: int = 1500, seed: int = 22) -> bytes:
    """gdr-heavy's mix, but as per-part GDRs are written: each test's three GDRs have
    the same type codes in every part (30 layouts of 4-40 values), new values."""
    ptrs = _Ptrs(random.Random(seed + 1), 10, 1000)
    rnd0 = random.Random(seed + 2)
    layouts = [[rnd0.choice(_GDR_CODES) for _ in range(rnd0.randrange(4, 40))]
               for _ in range(3 * len(ptrs.tests))]

    def body(rnd: random.Random, head: int, site: int, part: int) -> Iterator[Record]:
        for i, t in enumerate(ptrs.tests):
            yield ptrs.record(t, head, site, part)
            for codes in layouts[3 * i:3 * i + 3]:
                yield "GDR", {"GEN_DATA": [(c, _gdr_value(rnd, c)) for c in codes]}

    return _lot(order, [(1, 0)], parts, seed, "gdr_job", "Catalyst", body,
                [t["TEST_NUM"] for t in ptrs.tests])


def _gdr_value(rnd: random.Random, code: int) -> Any:
    """A random value of GDR type ``code`` (pad bytes, code 0, are left out: pystdf
    cannot read them)."""
    return {
        1: lambda: rnd.randrange(256), 2: lambda: rnd.randrange(65536),
        3: lambda: rnd.randrange(1 << 32), 4: lambda: rnd.randrange(-128, 128),
        5: lambda: rnd.randrange(-32768, 32768),
        6: lambda: rnd.randrange(-(1 << 31), 1 << 31), 7: lambda: _f32(rnd, -1e3, 1e3),
        8: lambda: rnd.uniform(-1e6, 1e6),
        10: lambda: f"key{rnd.randrange(100)}=v{rnd.randrange(1000)}",
        11: lambda: bytes(rnd.randrange(256) for _ in range(rnd.randrange(8))),
        12: lambda: Bits(16, bytes((rnd.randrange(256), rnd.randrange(256)))),
        13: lambda: rnd.randrange(16),
    }[code]()


def catalyst(order: str = "<", parts: int = 300, seed: int = 21) -> bytes:
    rnd0 = random.Random(seed + 1)
    ptrs = _Ptrs(rnd0, 40, 2000)
    ftrs = [(6000 + i, f"func_{rnd0.choice(_BLOCKS).lower()}_{i}", f"pat_{i:03d}_{i % 7}")
            for i in range(48)]
    mprs = [(8000 + i, f"MPR_{rnd0.choice(_BLOCKS)}_{i}", rnd0.choice((4, 8, 16)),
             _f32(rnd0, -1, 0), _f32(rnd0, 1, 2)) for i in range(6)]
    ptr_names = [f.name for f in BY_NAME["PTR"].fields]

    def ptr(t: dict[str, Any], head: int, site: int, part: int) -> Record:
        name, fields = ptrs.record(t, head, site, part, drift=True)
        kind = rnd0.random()
        if kind < 0.35:  # Teradyne style: the limits only in the test's first PTR
            last = "TEST_TXT"
        elif kind < 0.5:
            last = "OPT_FLAG"
            fields["OPT_FLAG"] = rnd0.choice((0x0E, 0xCE, 0x3E))
        elif kind < 0.6:  # limits present but flagged invalid
            fields["OPT_FLAG"] = 0xFE
            last = "HI_LIMIT"
        else:
            last = "HI_SPEC"
        keep = ptr_names[: ptr_names.index(last) + 1]
        return name, {k: v for k, v in fields.items() if k in keep}

    def body(rnd: random.Random, head: int, site: int, part: int) -> Iterator[Record]:
        yield "DTR", {"TEXT_DAT": f"site {site} part {part} temp 25.{rnd.randrange(10)}C"}
        for num, text, pattern in ftrs:
            fails = rnd.random() < 0.25
            npins = rnd.randrange(1, 33) if fails else 0
            fail_pins = sorted(rnd.sample(range(1, 257), npins))
            npgm = rnd.randrange(0, 6) if fails else 0
            nbits = 256 if fails else 0
            bits = bytearray(nbits // 8)
            for p in fail_pins:
                bits[(p - 1) // 8] |= 1 << ((p - 1) % 8)
            yield "FTR", {
                "TEST_NUM": num, "HEAD_NUM": head, "SITE_NUM": site,
                "TEST_FLG": 0x80 if fails else 0, "OPT_FLAG": 0x0E if fails else 0xFF,
                "CYCL_CNT": rnd.randrange(1 << 24) if fails else 0,
                "REL_VADR": rnd.randrange(4096) if fails else 0,
                "REPT_CNT": rnd.randrange(1, 4), "NUM_FAIL": npins,
                "XFAIL_AD": rnd.randrange(-100, 100) if fails else 0,
                "YFAIL_AD": rnd.randrange(-100, 100) if fails else 0,
                "VECT_OFF": rnd.randrange(-50, 50) if fails else 0,
                "RTN_ICNT": npins, "PGM_ICNT": npgm, "RTN_INDX": fail_pins,
                "RTN_STAT": [rnd.randrange(16) for _ in fail_pins],
                "PGM_INDX": [rnd.randrange(1, 64) for _ in range(npgm)],
                "PGM_STAT": [rnd.randrange(16) for _ in range(npgm)],
                "FAIL_PIN": Bits(nbits, bytes(bits)),
                "VECT_NAM": pattern if fails else "", "TIME_SET": "ts1" if fails else "",
                "OP_CODE": "", "TEST_TXT": text, "ALARM_ID": "",
                "PROG_TXT": "", "RSLT_TXT": "fail" if fails else "", "PATG_NUM": 255,
                "SPIN_MAP": Bits(0, b"")}
        for num, text, pins, lo, hi in mprs:
            yield "MPR", _mpr(rnd, head, site, num, text, pins, lo, hi)  # cut after UNITS
        for t in ptrs.tests:
            yield ptr(t, head, site, part)
        for _ in range(2):
            codes = [1, 2, 3, 4, 5, 6, 7, 8, 10, 11, 12, 13]
            rnd.shuffle(codes)
            yield "GDR", {"GEN_DATA": [(c, _gdr_value(rnd, c)) for c in codes]}

    sites = [(1, 0), (1, 1)]
    tests = ([n for n, _, _ in ftrs] + [m[0] for m in mprs]
             + [t["TEST_NUM"] for t in ptrs.tests])
    return _lot(order, sites, parts, seed, "catalyst_mix", "Catalyst", body, tests)


SHAPES: dict[str, Callable[[], bytes]] = {
    "ftr-heavy": ftr_heavy,
    "mpr-heavy": mpr_heavy,
    "ptr-varied": ptr_varied,
    "gdr-heavy": gdr_heavy,
    "gdr-layouts": gdr_layouts,
    "catalyst": catalyst,
}


def main() -> int:
    if len(sys.argv) != 2:
        print(__doc__.strip().splitlines()[-1].strip(), file=sys.stderr)
        return 2
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    for name, build in SHAPES.items():
        data = build()
        (out / f"{name}.stdf").write_bytes(data)
        print(f"{out / (name + '.stdf')}: {len(data):,} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
