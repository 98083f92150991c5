"""A tester writing STDF: ``edgegw simulate --out DIR``.

Two layers:

- ``stdf_chunks(...)`` is sans-IO and pure: for a seeded ``TesterProfile`` it yields the
  STDF bytes of every file, touchdown by touchdown (``FileChunk``), the way a tester writes
  them.  Same arguments, same bytes (timestamps come from ``start_time`` and the simulated
  rate, not the clock).  Tests and benchmarks use it directly; ``stdf_file_bytes`` joins one
  file.
- ``write_files(...)`` is the Trio layer: it writes the chunks into files in real time,
  flushing after every touchdown so that a tail sees a growing file, one file per lot (or
  per wafer), optionally gzipping each file once it is closed.

What a file holds, in order: FAR, MIR, SDR, WCR, then per wafer WIR, the touchdowns (PIR of
every site, PTRs interleaved across the sites test by test, PRR of every site; retests at the
end of the wafer flagged PART_FLG bit 1 "supersedes the part at the same X/Y"), WRR; then the
tester's summaries (HBR/SBR/PCR per site and for all sites with HEAD_NUM 255, TSR per test)
and MRR.  The first PTR of a test number in a file carries the test's defaults (text,
OPT_FLAG, limits, units); later PTRs of that test are truncated after RESULT, as real
testers do.  Summary counts count every PRR (a retest is a part tested again), so they
equal what a reader derives from the PRRs.
"""

from __future__ import annotations

import argparse
import sys
import time
import zlib
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import trio

from ..stdf import StdfWriter
from .tester import (
    HARD_OF_SOFT,
    MAX_TESTS,
    SOFT_BINS,
    Part,
    TesterModel,
    TesterProfile,
    lot_profiles,
    program_tests,
)

HEAD = 1
PASS_SOFT_BINS = frozenset(s for s in SOFT_BINS if SOFT_BINS[s].startswith("PASS"))


class FileChunk(NamedTuple):
    file_name: str  # the file these bytes belong to
    data: bytes
    parts: int  # parts completed in this chunk (for real-time pacing)
    end_of_file: bool  # the file is complete after this chunk


class _Summary:
    """Counts of what was written to one file, for its HBR/SBR/PCR/TSR."""

    def __init__(self) -> None:
        self.hard: Counter[tuple[int, int]] = Counter()  # (site, bin)
        self.soft: Counter[tuple[int, int]] = Counter()
        self.parts: Counter[int] = Counter()
        self.good: Counter[int] = Counter()
        self.retests: Counter[int] = Counter()
        self.test_exec: Counter[int] = Counter()
        self.test_fail: Counter[int] = Counter()
        self.test_min: dict[int, float] = {}
        self.test_max: dict[int, float] = {}
        self.test_sum: defaultdict[int, float] = defaultdict(float)
        self.test_sqr: defaultdict[int, float] = defaultdict(float)

    def add(self, part: Part) -> None:
        self.hard[part.site, part.hard_bin] += 1
        self.soft[part.site, part.soft_bin] += 1
        self.parts[part.site] += 1
        self.good[part.site] += part.passed
        self.retests[part.site] += part.retest
        for t in part.tests:
            self.test_exec[t.test_num] += 1
            self.test_fail[t.test_num] += not t.passed
            self.test_min[t.test_num] = min(self.test_min.get(t.test_num, t.value), t.value)
            self.test_max[t.test_num] = max(self.test_max.get(t.test_num, t.value), t.value)
            self.test_sum[t.test_num] += t.value
            self.test_sqr[t.test_num] += t.value * t.value


class _FileWriter:
    """Encodes the records of one STDF file."""

    def __init__(self, writer: StdfWriter, profile: TesterProfile, sites: int) -> None:
        self.w = writer
        self.profile = profile
        self.sites = sites
        self.defaults_written: set[int] = set()
        self.summary = _Summary()

    def header(self, start_t: int) -> bytes:
        p = self.profile
        enc = self.w.encode
        return b"".join((
            enc("FAR", {"CPU_TYPE": 2 if self.w.byte_order == "<" else 1, "STDF_VER": 4}),
            enc("MIR", {"SETUP_T": start_t, "START_T": start_t, "STAT_NUM": 1,
                        "MODE_COD": "P", "RTST_COD": " ", "PROT_COD": " ", "BURN_TIM": 65535,
                        "CMOD_COD": " ", "LOT_ID": p.lot_id, "PART_TYP": p.part_type,
                        "NODE_NAM": p.node_name, "TSTR_TYP": p.tester_type,
                        "JOB_NAM": p.job_name, "JOB_REV": "1.0", "SBLOT_ID": "",
                        "OPER_NAM": "sim", "EXEC_TYP": "edgegw-sim", "EXEC_VER": "1",
                        "TEST_COD": "WS1", "TST_TEMP": "25"}),
            enc("SDR", {"HEAD_NUM": HEAD, "SITE_GRP": 1, "SITE_CNT": self.sites,
                        "SITE_NUM": list(range(self.sites)), "HAND_TYP": "prober",
                        "HAND_ID": "PRB-01", "CARD_TYP": "cantilever", "CARD_ID": "PC-0042"}),
            enc("WCR", {"WAFR_SIZ": 200.0, "DIE_HT": 5.0, "DIE_WID": 5.0, "WF_UNITS": 3,
                        "WF_FLAT": "D", "CENTER_X": p.wafer_diameter_dies // 2,
                        "CENTER_Y": p.wafer_diameter_dies // 2, "POS_X": "R", "POS_Y": "D"}),
        ))

    def touchdown(self, parts: list[Part]) -> bytes:
        enc = self.w.encode
        out = [enc("PIR", {"HEAD_NUM": HEAD, "SITE_NUM": part.site}) for part in parts]
        # sites are tested in parallel: the PTRs of one test interleave across the sites
        for i in range(len(parts[0].tests) if parts else 0):
            for part in parts:
                t = part.tests[i]
                parm = 0xC0  # a result equal to a limit passes
                if t.value > t.hi:
                    parm |= 0x08
                elif t.value < t.lo:
                    parm |= 0x10
                fields: dict[str, Any] = {
                    "TEST_NUM": t.test_num, "HEAD_NUM": HEAD, "SITE_NUM": part.site,
                    "TEST_FLG": 0 if t.passed else 0x80, "PARM_FLG": parm, "RESULT": t.value}
                if t.test_num not in self.defaults_written:
                    self.defaults_written.add(t.test_num)
                    # OPT_FLAG 0x0E: bit 1 reserved (set), no low/high spec limit
                    fields.update(TEST_TXT=t.test_txt, ALARM_ID="", OPT_FLAG=0x0E,
                                  RES_SCAL=0, LLM_SCAL=0, HLM_SCAL=0, LO_LIMIT=t.lo,
                                  HI_LIMIT=t.hi, UNITS=t.units)
                out.append(enc("PTR", fields))
        for part in parts:
            self.summary.add(part)
            out.append(enc("PRR", {
                "HEAD_NUM": HEAD, "SITE_NUM": part.site,
                "PART_FLG": (0 if part.passed else 0x08) | (0x02 if part.retest else 0),
                "NUM_TEST": len(part.tests), "HARD_BIN": part.hard_bin,
                "SOFT_BIN": part.soft_bin, "X_COORD": part.x, "Y_COORD": part.y,
                "TEST_T": part.test_time_ms, "PART_ID": part.part_id}))
        return b"".join(out)

    def wafer_start(self, wafer_id: str, t: int) -> bytes:
        self._wafer_parts_before = sum(self.summary.parts.values())
        self._wafer_good_before = sum(self.summary.good.values())
        self._wafer_rtst_before = sum(self.summary.retests.values())
        return self.w.encode("WIR", {"HEAD_NUM": HEAD, "SITE_GRP": 255, "START_T": t,
                                     "WAFER_ID": wafer_id})

    def wafer_end(self, wafer_id: str, t: int) -> bytes:
        s = self.summary
        return self.w.encode("WRR", {
            "HEAD_NUM": HEAD, "SITE_GRP": 255, "FINISH_T": t,
            "PART_CNT": sum(s.parts.values()) - self._wafer_parts_before,
            "RTST_CNT": sum(s.retests.values()) - self._wafer_rtst_before, "ABRT_CNT": 0,
            "GOOD_CNT": sum(s.good.values()) - self._wafer_good_before,
            "FUNC_CNT": 4294967295, "WAFER_ID": wafer_id})

    def trailer(self, finish_t: int) -> bytes:
        enc = self.w.encode
        s = self.summary
        out = []
        for kind, counts in (("H", s.hard), ("S", s.soft)):
            rec = "HBR" if kind == "H" else "SBR"
            total: Counter[int] = Counter()
            for (site, b), n in sorted(counts.items()):
                total[b] += n
                out.append(enc(rec, self._bin(kind, site, b, n)))
            for b, n in sorted(total.items()):
                out.append(enc(rec, self._bin(kind, 255, b, n, head=255)))
        for site in sorted(s.parts):
            out.append(enc("PCR", {"HEAD_NUM": HEAD, "SITE_NUM": site,
                                   "PART_CNT": s.parts[site], "RTST_CNT": s.retests[site],
                                   "ABRT_CNT": 0, "GOOD_CNT": s.good[site],
                                   "FUNC_CNT": 4294967295}))
        out.append(enc("PCR", {"HEAD_NUM": 255, "SITE_NUM": 0,
                               "PART_CNT": sum(s.parts.values()),
                               "RTST_CNT": sum(s.retests.values()), "ABRT_CNT": 0,
                               "GOOD_CNT": sum(s.good.values()), "FUNC_CNT": 4294967295}))
        names = {num: txt for num, txt, *_ in program_tests(self.profile.tests_per_part)}
        for num in sorted(s.test_exec):
            out.append(enc("TSR", {
                "HEAD_NUM": 255, "SITE_NUM": 0, "TEST_TYP": "P", "TEST_NUM": num,
                "EXEC_CNT": s.test_exec[num], "FAIL_CNT": s.test_fail[num], "ALRM_CNT": 0,
                "TEST_NAM": names.get(num, ""), "SEQ_NAME": "", "TEST_LBL": "",
                "OPT_FLAG": 0x04,  # TEST_TIM invalid; min/max/sums/squares valid
                "TEST_TIM": 0.0, "TEST_MIN": s.test_min[num], "TEST_MAX": s.test_max[num],
                "TST_SUMS": s.test_sum[num], "TST_SQRS": s.test_sqr[num]}))
        out.append(enc("MRR", {"FINISH_T": finish_t, "DISP_COD": " ", "USR_DESC": "",
                               "EXC_DESC": ""}))
        return b"".join(out)

    @staticmethod
    def _bin(kind: str, site: int, b: int, n: int, head: int = HEAD) -> dict[str, Any]:
        if kind == "H":
            names = {h: SOFT_BINS[s] for s, h in sorted(HARD_OF_SOFT.items(), reverse=True)}
            name, passed = names.get(b, f"BIN{b}"), b == 1
        else:
            name, passed = SOFT_BINS.get(b, f"BIN{b}"), b in PASS_SOFT_BINS
        p = kind.replace("H", "HBIN").replace("S", "SBIN")
        return {"HEAD_NUM": head, "SITE_NUM": 0 if head == 255 else site, f"{p}_NUM": b,
                f"{p}_CNT": n, f"{p}_PF": "P" if passed else "F", f"{p}_NAM": name}


def stdf_chunks(profile: TesterProfile, *, lots: int = 1, per_wafer: bool = False,
                byte_order: str = "<", start_time: int = 1_700_000_000,
                parts_per_second: float = 50.0) -> Iterator[FileChunk]:
    """Every file of ``lots`` lots (0: without end), touchdown by touchdown; the lots are
    ``lot_profiles(profile, lots)``."""
    writer = StdfWriter(byte_order=byte_order)
    parts_done = 0

    def now() -> int:
        return start_time + int(parts_done / parts_per_second)

    for lot in lot_profiles(profile, lots):
        model = TesterModel(lot)
        fw: _FileWriter | None = None
        name = ""
        wafer_no = 0
        for ev in model.events():
            if (ev.kind == "lot_start") != per_wafer and ev.kind in ("lot_start", "wafer_start"):
                wafer_no += ev.kind == "wafer_start"
                name = f"{lot.lot_id}_W{wafer_no:02d}.stdf" if per_wafer else f"{lot.lot_id}.stdf"
                fw = _FileWriter(writer, lot, lot.sites)
                yield FileChunk(name, fw.header(now()), 0, False)
            if fw is None:
                continue
            if ev.kind == "wafer_start":
                yield FileChunk(name, fw.wafer_start(ev.data, now()), 0, False)
            elif ev.kind == "touchdown":
                parts_done += len(ev.data)
                yield FileChunk(name, fw.touchdown(ev.data), len(ev.data), False)
            elif ev.kind == "wafer_end":
                data = fw.wafer_end(ev.data["wafer_id"], now())
                if per_wafer:
                    yield FileChunk(name, data + fw.trailer(now()), 0, True)
                    fw = None
                else:
                    yield FileChunk(name, data, 0, False)
            elif ev.kind == "lot_end":
                yield FileChunk(name, fw.trailer(now()), 0, True)
                fw = None


def stdf_file_bytes(profile: TesterProfile, **kwargs: Any) -> bytes:
    """The bytes of the first file ``stdf_chunks`` writes (the whole lot by default)."""
    out = []
    for chunk in stdf_chunks(profile, **kwargs):
        out.append(chunk.data)
        if chunk.end_of_file:
            break
    return b"".join(out)


async def write_files(out_dir: str | Path, chunks: Iterator[FileChunk], *,
                      parts_per_second: float = 50.0, duration: float = 0.0,
                      gzip_closed: bool = False) -> list[Path]:
    """Write ``chunks`` into ``out_dir`` in real time (``parts_per_second``), flushing
    after every touchdown.  With ``gzip_closed`` a file is written as ``NAME.tmp`` and
    appears as ``NAME.gz`` once complete (so a watcher never sees a half gzip stream).
    Stops after ``duration`` seconds when > 0, leaving the current file unfinished like a
    tester that was stopped.  Returns the paths of the files written."""
    out = trio.Path(out_dir)
    await out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    f: Any = None
    path: trio.Path | None = None
    deadline = trio.current_time() + duration if duration > 0 else float("inf")
    next_t = trio.current_time()
    try:
        for chunk in chunks:
            if f is None:
                path = out / (chunk.file_name + (".tmp" if gzip_closed else ""))
                f = await trio.open_file(path, "wb")
            await f.write(chunk.data)
            await f.flush()
            if chunk.end_of_file:
                await f.aclose()
                f = None
                assert path is not None
                if gzip_closed:
                    final = out / (chunk.file_name + ".gz")
                    await trio.to_thread.run_sync(_gzip_file, Path(path), Path(final))
                    written.append(Path(final))
                else:
                    written.append(Path(path))
            if chunk.parts:
                next_t += chunk.parts / parts_per_second
                if next_t >= deadline:
                    break
                await trio.sleep_until(next_t)
    finally:
        if f is not None:
            await f.aclose()
            assert path is not None
            written.append(Path(path))
    return written


def _gzip_file(src: Path, dst: Path) -> None:
    tmp = dst.with_name(dst.name + ".part")
    comp = zlib.compressobj(6, zlib.DEFLATED, 31)
    with src.open("rb") as fin, tmp.open("wb") as fout:
        while block := fin.read(1 << 20):
            fout.write(comp.compress(block))
        fout.write(comp.flush())
    tmp.replace(dst)  # appears complete, never half-written
    src.unlink()


def profile_from_args(args: argparse.Namespace) -> TesterProfile:
    kw: dict[str, Any] = dict(
        lot_id=args.lot, sites=args.sites, wafers=args.wafers,
        wafer_diameter_dies=args.wafer_diameter, tests_per_part=args.tests_per_part,
        seed=args.seed)
    if getattr(args, "yield_", None) is not None:
        kw["base_yield"] = args.yield_
    return TesterProfile(**kw)


def main(args: argparse.Namespace) -> int:
    if not args.out:
        print("edgegw simulate: --out DIR is required for the STDF tester", file=sys.stderr)
        return 2
    if not 1 <= args.sites <= 255:
        print("edgegw simulate: --sites must be between 1 and 255", file=sys.stderr)
        return 2
    if not 1 <= args.tests_per_part <= MAX_TESTS:
        print(f"edgegw simulate: --tests-per-part must be between 1 and {MAX_TESTS}",
              file=sys.stderr)
        return 2
    start = args.start_time if getattr(args, "start_time", None) is not None else int(time.time())
    chunks = stdf_chunks(
        profile_from_args(args), lots=getattr(args, "lots", 1),
        per_wafer=getattr(args, "per_wafer", False),
        byte_order="<" if args.byte_order == "little" else ">", start_time=start,
        parts_per_second=args.parts_per_second)
    files = trio.run(lambda: write_files(
        args.out, chunks, parts_per_second=args.parts_per_second, duration=args.duration,
        gzip_closed=getattr(args, "gzip", False)))
    for path in files:
        print(path)
    return 0
