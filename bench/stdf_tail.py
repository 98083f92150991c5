"""How fast the live tail turns a tester's STDF file into edgegw records, before and after
the fast path, in one run.

For one simulated lot (``edgegw.sim.stdf_tester``, written to a temporary directory), each
real file in ``shared/data/stdf`` and the synthetic shapes of ``bench/stdf_corpus.py``
(or the files named on the command line) it measures, each as the median of ``--repeat``
runs, the two ways interleaved (so each sees the same mix of the machine's load):

- decode + map in memory (the sans-IO ceiling), 64 KiB chunks: **dicts** (what the tail
  did before: ``StdfDecoder.records()`` into ``RecordMapper.map``) against **rows**
  (``StdfDecoder(types=RecordMapper.TYPES).rows()`` into ``RecordMapper.map_row``, what
  it does now when ``forward_raw`` is off);
- the tail source reading the finished file from disk through Trio (file reads in
  worker threads, batches put into a sink that only counts), with its fast path off
  (dicts) and on (rows);
- a restart at the middle of the simulated lot: re-reading the first half without
  emitting it (what a gateway restart costs) and then the rest.

The mapped records of the two ways are checked equal first (floats bit for bit).  Prints
records/s and the ratio; the last lines are a markdown table (docs/stdf.md carries one).

    python bench/stdf_tail.py [FILE ...] [--diameter 60] [--wafers 4] [--repeat 3]
                              [--no-shapes] [--no-disk]
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import statistics
import struct
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import trio

from edgegw.metrics import Metrics
from edgegw.records import LotEnd
from edgegw.sim.stdf_tester import stdf_file_bytes
from edgegw.sim.tester import TesterProfile
from edgegw.sources import SourceContext
from edgegw.sources.tail import TailConfig, TailSource
from edgegw.stdf import StdfDecoder
from edgegw.stdf.mapping import RecordMapper

sys.path.insert(0, str(Path(__file__).resolve().parent))
from stdf_corpus import SHAPES
from stdf_decode import shared_data

CHUNK = 1 << 16


class CountingSink:
    def __init__(self) -> None:
        self.records = 0
        self.checkpoint: Any = None
        self.done = trio.Event()

    async def put(self, records: Any, checkpoint: Any = None) -> None:
        self.records += len(records)
        self.checkpoint = checkpoint
        if any(isinstance(r, LotEnd) for r in records):
            self.done.set()


def map_dicts(data: bytes) -> list[Any]:
    dec = StdfDecoder()
    mapper = RecordMapper("bench")
    out: list[Any] = []
    for i in range(0, len(data), CHUNK):
        dec.feed(data[i:i + CHUNK])
        for rec in dec.records():
            out += mapper.map(rec, 0.0)
    return out + mapper.close(0.0)


def map_rows(data: bytes) -> list[Any]:
    dec = StdfDecoder(types=RecordMapper.TYPES)
    mapper = RecordMapper("bench")
    out: list[Any] = []
    for i in range(0, len(data), CHUNK):
        dec.feed(data[i:i + CHUNK])
        for row in dec.rows():
            out += mapper.map_row(row, 0.0)
    return out + mapper.close(0.0)


def exact(records: list[Any]) -> list[Any]:
    """Records with every float as its bytes: -0.0 and 0.0, NaNs compared exactly."""
    def one(x: Any) -> Any:
        if isinstance(x, float):
            return struct.pack("<d", x)
        if isinstance(x, (list, tuple)):
            return (type(x).__name__, *map(one, x))
        if isinstance(x, dict):
            return sorted((k, one(v)) for k, v in x.items())
        return x
    return [one(r) for r in records]


@contextlib.contextmanager
def fast_path(on: bool) -> Iterator[None]:
    """The tail with its fast path on (as shipped) or off (the dict path it had before)."""
    if on:
        yield
        return
    saved = TailSource._fast
    TailSource._fast = lambda self, parser: False  # type: ignore[method-assign]
    try:
        yield
    finally:
        TailSource._fast = saved  # type: ignore[method-assign]


async def tail_once(directory: Path, checkpoint: Any = None) -> tuple[float, int, Any]:
    sink = CountingSink()
    source = TailSource("bench", TailConfig(paths=[str(directory)], poll_interval=0.001),
                        SourceContext("gw", Metrics(), checkpoint))
    t0 = time.perf_counter()
    async with trio.open_nursery() as nursery:
        await nursery.start(source.run, sink)
        await sink.done.wait()
        nursery.cancel_scope.cancel()
    return time.perf_counter() - t0, sink.records, sink.checkpoint


def interleaved(fns: dict[str, Callable[[], float]], runs: int) -> dict[str, float]:
    """Median seconds of each of ``fns`` (each returns its own seconds), runs interleaved."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(runs):
        for key, fn in fns.items():
            times[key].append(fn())
    return {k: statistics.median(v) for k, v in times.items()}


def cpu(fn: Callable[[], Any]) -> Callable[[], float]:
    def run() -> float:
        start = time.process_time()
        fn()
        return time.process_time() - start
    return run


def bench(label: str, data: bytes, repeat: int, disk: bool) -> dict[str, Any]:
    old, new = map_dicts(data), map_rows(data)
    if exact(old) != exact(new):
        raise SystemExit(f"{label}: the rows path mapped other records than the dict path")
    n = len(new)
    row: dict[str, Any] = {"file": label, "records": n}
    row.update(interleaved({"mem_dicts": cpu(lambda: map_dicts(data)),
                            "mem_rows": cpu(lambda: map_rows(data))}, repeat))
    print(f"{label}: {len(data) / 1e6:.1f} MB, {n:,} edgegw records")
    print(f"  decode+map in memory: dicts {n / row['mem_dicts']:>10,.0f} records/s, rows "
          f"{n / row['mem_rows']:>10,.0f} records/s -> {row['mem_dicts'] / row['mem_rows']:.2f}x")
    if disk:
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "LOT.stdf").write_bytes(data)

            def tail(on: bool) -> Callable[[], float]:
                def run() -> float:
                    with fast_path(on):
                        secs, sent, _ = trio.run(tail_once, Path(tmp))
                    assert sent == n, (sent, n)
                    return secs
                return run

            row.update(interleaved({"tail_dicts": tail(False), "tail_rows": tail(True)},
                                   repeat))
        print(f"  tail from disk (wall): dicts {n / row['tail_dicts']:>10,.0f} records/s, rows "
              f"{n / row['tail_rows']:>10,.0f} records/s -> "
              f"{row['tail_dicts'] / row['tail_rows']:.2f}x")
    return row


def restart(data: bytes, repeat: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "LOT0001.stdf"
        path.write_bytes(data)
        half = trio.run(tail_once, Path(tmp))[2]
        dec = StdfDecoder()
        dec.feed(data[: len(data) // 2])
        for _ in dec.records():
            pass
        half["files"][str(path)].update(offset=dec.position, done=False)

        def run(on: bool) -> Callable[[], float]:
            def once() -> float:
                with fast_path(on):
                    return trio.run(tail_once, Path(tmp), half)[0]
            return once

        t = interleaved({"dicts": run(False), "rows": run(True)}, repeat)
    print(f"  restart at mid-file (wall): re-read half and send the rest: dicts "
          f"{t['dicts']:.3f} s, rows {t['rows']:.3f} s -> {t['dicts'] / t['rows']:.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="*", type=Path)
    ap.add_argument("--diameter", type=int, default=60, help="dies across a wafer")
    ap.add_argument("--wafers", type=int, default=4)
    ap.add_argument("--sites", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--no-shapes", action="store_true")
    ap.add_argument("--no-disk", action="store_true", help="in memory only")
    args = ap.parse_args()
    profile = TesterProfile(sites=args.sites, wafer_diameter_dies=args.diameter,
                            wafers=args.wafers, tests_per_part=8)
    sim = stdf_file_bytes(profile)
    work: list[tuple[str, bytes]] = [
        (f"simulated lot ({args.wafers} wafers x {args.diameter} dies, {args.sites} sites)",
         sim)]
    files = args.files or sorted(p for p in shared_data().glob("*")
                                 if p.is_file() and not p.name.endswith(".md"))
    for p in files:
        raw = p.read_bytes()
        work.append((p.name, gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw))
    if not args.no_shapes and not args.files:
        work += [(f"{name} (synthetic)", build()) for name, build in SHAPES.items()]
    rows = []
    for i, (label, data) in enumerate(work):
        rows.append(bench(label, data, args.repeat, not args.no_disk))
        if i == 0 and not args.no_disk:
            restart(data, args.repeat)
    print()
    disk = not args.no_disk
    print("| file | edgegw records | in memory: dicts / rows (records/s) | rows vs dicts |"
          + (" tail from disk: dicts / rows (records/s) | rows vs dicts |" if disk else ""))
    print("|---|---:|---|---|" + ("---|---|" if disk else ""))
    for r in rows:
        n = r["records"]
        line = (f"| {r['file']} | {n:,} | {n / r['mem_dicts'] / 1e3:,.0f}k / "
                f"{n / r['mem_rows'] / 1e3:,.0f}k | **{r['mem_dicts'] / r['mem_rows']:.2f}x** |")
        if disk:
            line += (f" {n / r['tail_dicts'] / 1e3:,.0f}k / {n / r['tail_rows'] / 1e3:,.0f}k |"
                     f" **{r['tail_dicts'] / r['tail_rows']:.2f}x** |")
        print(line)


if __name__ == "__main__":
    main()
