"""Benchmark: decode an STDF file with edgegw and with pystdf, in one run.

Both decoders do the same work: every field of every record is decoded (pystdf into
a value list per record, edgegw into a field dict per record), and the consumer looks at
each record once and drops it, as a streaming gateway does.  Prints records/s and MB/s
for each (median of --runs runs) and the ratio, then checks memory stays flat: decoding
the file fed ten times over in 64 KiB chunks (a stream 10x the size) must not need more
memory than decoding it once.

    python bench/stdf_decode.py [FILE] [--runs N]

FILE defaults to galaxy-a530-lot2.stdf.gz from the shared data (decompressed in memory
first: the gzip cost is not the decoder's).
"""

from __future__ import annotations

import argparse
import gzip
import io
import os
import statistics
import sys
import time
import tracemalloc
from pathlib import Path

from edgegw.stdf import StdfDecoder
from edgegw.stdf.decoder import MEMO_SIZE, set_tail_memo

DEFAULT = "galaxy-a530-lot2.stdf.gz"
WALL = False
CHUNK = 64 * 1024


def shared_data() -> Path:
    env = os.environ.get("EDGEGW_SHARED_DATA")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "shared" / "data" / "stdf"


def load(path: Path) -> bytes:
    data = path.read_bytes()
    return gzip.decompress(data) if path.suffix == ".gz" else data


def edgegw_decode(data: bytes, chunk: int | None = None) -> int:
    dec = StdfDecoder()
    count = 0
    if chunk is None:
        dec.feed(data)
        for _ in dec.records():
            count += 1
        return count
    view = memoryview(data)
    for start in range(0, len(data), chunk):
        dec.feed(view[start:start + chunk])
        for _ in dec.records():
            count += 1
    return count


class _CountingSink:
    """A pystdf sink that, like the edgegw loop, just sees every record."""

    def __init__(self) -> None:
        self.count = 0

    def after_send(self, source: object, data: object) -> None:
        self.count += 1

    def __getattr__(self, name: str):  # before_begin, after_complete, ... : nothing to do
        return lambda *args: None


def pystdf_decode(data: bytes) -> int:
    from pystdf.IO import Parser

    parser = Parser(inp=io.BytesIO(data))
    sink = _CountingSink()
    parser.addSink(sink)
    parser.parse()
    return sink.count


def timed(fn, data: bytes, runs: int) -> tuple[float, int]:
    """Median seconds of ``runs`` runs.  CPU time of this process: the machine is shared
    with other jobs, and wall time would charge their load to whichever decoder ran
    while it peaked (on an idle machine the two agree; --wall uses wall time)."""
    clock = time.perf_counter if WALL else time.process_time
    times = []
    count = 0
    for _ in range(runs):
        start = clock()
        count = fn(data)
        times.append(clock() - start)
    return statistics.median(times), count


def peak_memory(fn) -> int:
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("file", nargs="?", type=Path, default=shared_data() / DEFAULT)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--wall", action="store_true", help="time with the wall clock")
    args = parser.parse_args()
    global WALL
    WALL = args.wall
    if not args.file.exists():
        print(f"no such file: {args.file}", file=sys.stderr)
        return 1
    data = load(args.file)
    mb = len(data) / 1e6
    print(f"file: {args.file.name} ({len(data):,} bytes decompressed)")

    ours, n_ours = timed(edgegw_decode, data, args.runs)
    theirs, n_theirs = timed(pystdf_decode, data, args.runs)
    if n_ours != n_theirs:
        print(f"record counts differ: edgegw {n_ours}, pystdf {n_theirs}", file=sys.stderr)
        return 1
    chunked, _ = timed(lambda d: edgegw_decode(d, CHUNK), data, args.runs)
    set_tail_memo(0)  # the same without the PTR tail memo (see edgegw/stdf/decoder.py)
    plain, _ = timed(edgegw_decode, data, args.runs)
    set_tail_memo(MEMO_SIZE)
    print(f"records: {n_ours:,}; median of {args.runs} runs "
          f"({'wall' if WALL else 'CPU'} time)")
    for label, secs in (("edgegw (one feed)", ours), ("edgegw (64 KiB chunks)", chunked),
                        ("edgegw (no tail memo)", plain), ("pystdf", theirs)):
        print(f"  {label:24} {n_ours / secs:>12,.0f} records/s {mb / secs:>8.1f} MB/s"
              f"  ({secs * 1e3:.1f} ms)")
    print(f"  ratio edgegw/pystdf: {theirs / ours:.1f}x (one feed), "
          f"{theirs / chunked:.1f}x (64 KiB chunks), {theirs / plain:.1f}x (no tail memo)")

    # memory: a stream 10x the file, fed in chunks, peaks no higher than the file once
    def stream(times: int) -> None:
        dec = StdfDecoder()
        count = 0
        view = memoryview(data)
        for _ in range(times):
            for start in range(0, len(data), CHUNK):
                dec.feed(view[start:start + CHUNK])
                for _rec in dec.records():
                    count += 1
            # the file again: the next copy's FAR starts right where the MRR ended
        assert count == n_ours * times, (count, n_ours * times)

    stream(1)  # compile the decoders first: their code is not per-stream memory
    once = peak_memory(lambda: stream(1))
    tenfold = peak_memory(lambda: stream(10))
    print(f"memory (tracemalloc peak, 64 KiB chunks): 1x {once / 1e6:.2f} MB, "
          f"10x ({10 * mb:.0f} MB stream) {tenfold / 1e6:.2f} MB "
          f"-> ratio {tenfold / once:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
