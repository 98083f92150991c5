"""How fast the live tail turns a tester's STDF file into edgegw records.

Writes one simulated lot (``edgegw.sim.stdf_tester``) to a temporary directory, then in one
run measures, each as the median of ``--repeat`` runs:

- decode + map in memory (the sans-IO ceiling: ``StdfDecoder`` + ``RecordMapper``);
- the tail source reading the finished file from disk through Trio (file reads in
  worker threads, batches put into a sink that only counts);
- a restart at the middle of the file: re-reading the first half without emitting it
  (what a gateway restart costs) and then the rest.

Prints records/s and MB/s for each and the tail/in-memory ratio.

    python bench/stdf_tail.py [--diameter 60] [--wafers 4] [--repeat 3]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
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


def in_memory(data: bytes) -> tuple[float, int]:
    t0 = time.perf_counter()
    dec = StdfDecoder()
    mapper = RecordMapper("bench")
    n = 0
    for i in range(0, len(data), 1 << 16):
        dec.feed(data[i:i + (1 << 16)])
        for rec in dec.records():
            n += len(mapper.map(rec, 0.0))
    return time.perf_counter() - t0, n


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--diameter", type=int, default=60, help="dies across a wafer")
    ap.add_argument("--wafers", type=int, default=4)
    ap.add_argument("--sites", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    profile = TesterProfile(sites=args.sites, wafer_diameter_dies=args.diameter,
                            wafers=args.wafers, tests_per_part=8)
    data = stdf_file_bytes(profile)
    mb = len(data) / 1e6
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "LOT0001.stdf"
        path.write_bytes(data)
        mem = [in_memory(data) for _ in range(args.repeat)]
        tails = [trio.run(tail_once, Path(tmp)) for _ in range(args.repeat)]
        # a checkpoint at the middle of the file, as a restarted gateway would get it
        key = str(path)
        half = trio.run(tail_once, Path(tmp))[2]
        dec = StdfDecoder()
        dec.feed(data[: len(data) // 2])
        for _ in dec.records():
            pass
        half["files"][key].update(offset=dec.position, done=False)
        restarts = [trio.run(tail_once, Path(tmp), half) for _ in range(args.repeat)]

    n = mem[0][1]
    t_mem = statistics.median(t for t, _ in mem)
    t_tail = statistics.median(t for t, _, _ in tails)
    t_restart = statistics.median(t for t, _, _ in restarts)
    print(f"file: {mb:.1f} MB, {n} edgegw records "
          f"({args.wafers} wafers x {args.diameter} dies across, {args.sites} sites)")
    print(f"decode+map in memory : {n / t_mem:>10,.0f} records/s {mb / t_mem:7.1f} MB/s")
    print(f"tail from disk       : {n / t_tail:>10,.0f} records/s {mb / t_tail:7.1f} MB/s"
          f"  (ratio to in-memory {t_mem / t_tail:.2f})")
    print(f"restart at mid-file  : {t_restart:.3f} s to re-read half and send the rest "
          f"({restarts[0][1]} records sent, full read {t_tail:.3f} s)")


if __name__ == "__main__":
    main()
