#!/usr/bin/env python3
"""Crash-only fuzzing of the STDF decoder and the mapping to edgegw records.

Usage (from the repository, in its virtualenv; docs/stdf.md quotes a run)::

    .venv/bin/python scripts/fuzz_stdf.py --count 1000000 [--seed 1] [--crash-dir DIR]
        [--data DIR]

Each input is a window of a real tester file (``shared/data/stdf``, or ``--data``) or of the
writer's output, changed by a few random mutations -- structural ones on records (cut or
grow a body with REC_LEN kept consistent, REC_LEN set to anything, a header zeroed, a byte
set, records duplicated, dropped, or taken from a file of the other byte order) and raw
ones on bytes (flip, insert, delete, truncate) -- fed to ``StdfParser`` in random chunk
sizes, every record mapped by ``RecordMapper``.  ``FormatError`` is the documented outcome
for bad input; any other exception is a crash: the input is saved to the crash directory
with its traceback, and counted.  So is a parser holding back more than one record's worth
of bytes (memory must stay bounded whatever the input), and -- where the compiled record
loop is built (docs/stdf.md) -- an input the compiled and the pure-Python loop decode
differently (records, values to the float bits, position, skipped counts, the error and
its offset).

The last line printed is a JSON summary: inputs, clean, format_errors, crashes, seconds,
peak RSS.  Exit status 1 if anything crashed.
"""

from __future__ import annotations

import argparse
import gzip
import itertools
import json
import random
import resource
import struct
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from edgegw.formats import FormatError
from edgegw.stdf import RECORDS, StdfDecoder, StdfWriter
from edgegw.stdf.decoder import accelerator_active, accelerator_built, set_accelerator
from edgegw.stdf.format import StdfParser
from edgegw.stdf.mapping import RecordMapper

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "stdf"
#: a parser may hold back at most a header and the longest REC_LEN
HELD_BACK = 4 + 65535


def split_records(data: bytes) -> list[bytes]:
    dec = StdfDecoder()
    dec.feed(data)
    offsets = [r.offset for r in dec.records()] + [dec.position]
    return [data[a:b] for a, b in itertools.pairwise(offsets)]


def written_file(order: str, rnd: random.Random) -> list[bytes]:
    """A writer's file: a lot with a wafer, parts on four sites, results of each kind."""
    w = StdfWriter(order)
    out = [w.encode("FAR", {}), w.encode("MIR", {"LOT_ID": "FUZZ", "START_T": 1}),
           w.encode("SDR", {"HEAD_NUM": 1, "SITE_GRP": 1, "SITE_CNT": 4,
                            "SITE_NUM": [0, 1, 2, 3]}),
           w.encode("WIR", {"HEAD_NUM": 1, "START_T": 2, "WAFER_ID": "W1"})]
    for part in range(40):
        site = part % 4
        out.append(w.encode("PIR", {"HEAD_NUM": 1, "SITE_NUM": site}))
        for test in range(5):
            out.append(w.encode("PTR", {
                "TEST_NUM": test, "HEAD_NUM": 1, "SITE_NUM": site, "TEST_FLG": 0,
                "PARM_FLG": 0, "RESULT": rnd.random(), "TEST_TXT": f"T{test}",
                "ALARM_ID": "", "OPT_FLAG": 0x0E, "RES_SCAL": 0, "LLM_SCAL": 0,
                "HLM_SCAL": 0, "LO_LIMIT": 0.0, "HI_LIMIT": 1.0, "UNITS": "V"}))
        out.append(w.encode("MPR", {"TEST_NUM": 9, "HEAD_NUM": 1, "SITE_NUM": site,
                                    "TEST_FLG": 0, "PARM_FLG": 0, "RTN_ICNT": 2,
                                    "RSLT_CNT": 2, "RTN_STAT": [1, 2], "RTN_RSLT": [0.5, 0.25],
                                    "TEST_TXT": "M"}))
        out.append(w.encode("FTR", {"TEST_NUM": 10, "HEAD_NUM": 1, "SITE_NUM": site,
                                    "TEST_FLG": 0x80}))
        out.append(w.encode("PRR", {"HEAD_NUM": 1, "SITE_NUM": site, "PART_FLG": 0,
                                    "NUM_TEST": 7, "HARD_BIN": 1, "SOFT_BIN": 1,
                                    "X_COORD": part, "Y_COORD": 0, "PART_ID": str(part)}))
    out.append(w.encode("GDR", {"GEN_DATA": [(10, "x"), (0, None), (8, 1.5), (13, 3)]}))
    out.append(w.encode("WRR", {"HEAD_NUM": 1, "FINISH_T": 3, "PART_CNT": 40,
                                "WAFER_ID": "W1"}))
    for name, num, cnt in (("HBR", "HBIN_NUM", "HBIN_CNT"), ("SBR", "SBIN_NUM", "SBIN_CNT")):
        out.append(w.encode(name, {"HEAD_NUM": 255, "SITE_NUM": 0, num: 1, cnt: 40}))
    out.append(w.encode("PCR", {"HEAD_NUM": 255, "SITE_NUM": 0, "PART_CNT": 40}))
    out.append(w.encode("TSR", {"HEAD_NUM": 255, "SITE_NUM": 0, "TEST_NUM": 1,
                                "TEST_NAM": "T1"}))
    out.append(w.encode("MRR", {"FINISH_T": 4}))
    return out


def load_corpus(data_dir: Path, rnd: random.Random) -> list[tuple[str, list[bytes]]]:
    corpus: list[tuple[str, list[bytes]]] = []
    for path in sorted(data_dir.glob("*.std*")):
        raw = path.read_bytes()
        if path.suffix == ".gz":
            raw = gzip.decompress(raw)
        dec = StdfDecoder()
        dec.feed(raw[:6])
        list(dec.records())
        corpus.append((dec.byte_order or "<", split_records(raw)))
    corpus += [(order, written_file(order, rnd)) for order in "<>"]
    return corpus


class Mutator:
    def __init__(self, corpus: list[tuple[str, list[bytes]]], rnd: random.Random) -> None:
        self.corpus = corpus
        self.rnd = rnd
        self.specs = [r for r in RECORDS if r.name != "FAR"]

    def record(self, rec: bytes, order: str) -> bytes:
        rnd = self.rnd
        body = bytearray(rec[4:])
        op = rnd.randrange(7)
        if op == 0:
            del body[rnd.randint(0, len(body)):]
        elif op == 1:
            body += rnd.randbytes(rnd.randint(1, 40))
        elif op == 2 and body:
            for _ in range(rnd.randint(1, 4)):
                body[rnd.randrange(len(body))] = rnd.choice((0, 0xFF, rnd.randrange(256)))
        elif op == 3 and body:
            at = rnd.randrange(len(body))
            body[at:at + 2] = rnd.choice((b"\xff\xff", b"\x00\x00", b"\x80\x00", b"\x7f\xff"))
        elif op == 4:
            return bytes(4) + bytes(body)
        elif op == 5:
            return struct.pack(order + "H", rnd.randrange(65536)) + rec[2:4] + bytes(body)
        elif op == 6:  # another record type's header on this body
            spec = rnd.choice(self.specs)
            return struct.pack(order + "HBB", len(body), spec.typ, spec.sub) + bytes(body)
        return struct.pack(order + "H", min(len(body), 65535)) + rec[2:4] + bytes(body[:65535])

    def input(self) -> bytes:
        rnd = self.rnd
        k = rnd.randrange(len(self.corpus))
        order, recs = self.corpus[k]
        start = rnd.randrange(1, len(recs))
        picked = [recs[0], *recs[start:start + rnd.randint(0, 200)]]
        for _ in range(rnd.randint(1, 8)):
            i = rnd.randrange(len(picked))
            op = rnd.randrange(10)
            if op < 6:
                picked[i] = self.record(picked[i], order)
            elif op == 6:
                picked.insert(i, picked[rnd.randrange(len(picked))])
            elif op == 7 and i:
                del picked[i]
            elif op == 8:
                other = self.corpus[rnd.randrange(len(self.corpus))][1]
                picked.insert(i, other[rnd.randrange(len(other))])
            else:
                j = rnd.randrange(len(picked))
                picked[i], picked[j] = picked[j], picked[i]
        data = bytearray(b"".join(picked))
        for _ in range(rnd.choice((0, 0, 1, 2, 4))):
            at = rnd.randrange(len(data) + 1)
            op = rnd.randrange(4)
            if op == 0 and at < len(data):
                data[at] ^= rnd.randrange(1, 256)
            elif op == 1:
                data[at:at] = rnd.randbytes(rnd.randint(1, 16))
            elif op == 2:
                del data[at:at + rnd.randint(1, 16)]
            else:
                del data[at:]
        return bytes(data)


def check(data: bytes, rnd: random.Random) -> bool:
    """Parse and map ``data`` in random chunks.  True: clean; False: FormatError.  Any other
    exception propagates (a crash)."""
    parser = StdfParser()
    mapper = RecordMapper("fuzz", forward_raw=rnd.random() < 0.3)
    small = rnd.random() < 0.5
    fed = 0
    try:
        while fed < len(data):
            n = rnd.randint(1, 64) if small else rnd.randint(1, 1 << 16)
            parser.feed(data[fed:fed + n])
            fed += len(data[fed:fed + n])
            for rec in parser.records():
                mapper.map(rec, 0.0)
            if fed - parser.position > HELD_BACK + n:
                raise AssertionError(f"{fed - parser.position} bytes held back")
        for rec in parser.close():
            mapper.map(rec, 0.0)
        mapper.close(0.0)
    except FormatError:
        return False
    return True


def canon(value: Any) -> Any:
    """A decoded value compared exactly: its type, a float by its bits."""
    if isinstance(value, float):
        return struct.pack("<d", value)
    if isinstance(value, tuple | list):
        return (type(value).__name__, tuple(canon(v) for v in value))
    if isinstance(value, dict):
        return tuple((k, canon(v)) for k, v in value.items())
    return (type(value).__name__, value)


#: the types a differential run skips (skipped GDRs are walked for their type codes)
SKIPS: list[tuple[str, ...]] = [(), (), ("GDR",), ("PTR", "GDR", "FTR"), ("PRR", "MPR")]


def outcome(data: bytes, cuts: list[int], compiled: bool, rows: bool,
            skip: tuple[str, ...] = ()) -> Any:
    """What a consumer sees of ``data`` fed in pieces ending at ``cuts`` by one loop."""
    was = accelerator_active()
    set_accelerator(compiled)
    dec = StdfDecoder(keep_unknown=True, skip=skip, short=9)
    got: list[Any] = []
    error = None
    try:
        start = 0
        for end in cuts:
            dec.feed(data[start:end])
            start = end
            got.extend(canon(r) for r in (dec.rows() if rows else dec.records()))
    except FormatError as exc:
        error = (str(exc), getattr(exc, "offset", None))
    finally:
        set_accelerator(was)
    return got, error, dec.position, dec.unknown_count, dec.skipped, dec.skipped_short


def differential(data: bytes, rnd: random.Random) -> None:
    """The compiled record loop decodes ``data`` exactly as the pure-Python one."""
    cuts = sorted({rnd.randint(1, max(1, len(data))) for _ in range(rnd.randint(0, 4))}
                  | {len(data)})
    rows = rnd.random() < 0.5
    skip = rnd.choice(SKIPS)
    if outcome(data, cuts, True, rows, skip) != outcome(data, cuts, False, rows, skip):
        raise AssertionError("the compiled and the pure-Python record loop differ")


def run(count: int, seed: int = 1, crash_dir: Path | None = None, data_dir: Path = DATA,
        progress: bool = False) -> dict[str, Any]:
    rnd = random.Random(seed)
    mutator = Mutator(load_corpus(data_dir, rnd), rnd)
    crash_dir = crash_dir or Path("fuzz-crashes")
    clean = errors = crashes = 0
    kinds: dict[str, int] = {}
    started = time.perf_counter()
    for n in range(count):
        data = mutator.input()
        try:
            if accelerator_built():
                differential(data, rnd)
            if check(data, rnd):
                clean += 1
            else:
                errors += 1
        except Exception as exc:  # a crash: anything but FormatError
            crashes += 1
            where = traceback.extract_tb(exc.__traceback__)[-1]
            kind = f"{type(exc).__name__} at {Path(where.filename).name}:{where.lineno}"
            kinds[kind] = kinds.get(kind, 0) + 1
            crash_dir.mkdir(parents=True, exist_ok=True)
            (crash_dir / f"crash-{n}.stdf").write_bytes(data)
            (crash_dir / f"crash-{n}.txt").write_text(traceback.format_exc())
        if progress and n and n % 100_000 == 0:
            print(f"{n} inputs, {crashes} crashes, {time.perf_counter() - started:.0f} s",
                  file=sys.stderr, flush=True)
    return {"inputs": count, "clean": clean, "format_errors": errors, "crashes": crashes,
            "crash_kinds": kinds, "seconds": round(time.perf_counter() - started, 1),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "seed": seed}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--count", type=int, default=1_000_000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--crash-dir", type=Path, default=Path("fuzz-crashes"))
    ap.add_argument("--data", type=Path, default=DATA, help="directory of seed STDF files")
    args = ap.parse_args()
    result = run(args.count, args.seed, args.crash_dir, args.data, progress=True)
    print(json.dumps(result))
    return 1 if result["crashes"] else 0


if __name__ == "__main__":
    sys.exit(main())
