"""Disk spool benchmark: durable append throughput, recovery time, backlog drain rate.

    python bench/spool.py [--dir DIR] [--recovery-gb 1.0] [--frame-records 500]

Prints:
- durable append throughput at the default commit policy (frames/s, records/s, MB/s and
  fsyncs per frame) for one appender (the gateway's pipeline) and for 8 concurrent ones;
- recovery time of a spool of ``--recovery-gb`` (generated, then deleted), and its
  recovery memory peak;
- backlog drain rate: reading the whole backlog through ``read_frames`` (MB/s, frames/s),
  as the uplink does after an outage, with acks releasing segments as it goes.
Each figure is the median of ``--repeat`` runs where cheap enough.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
import tracemalloc
from pathlib import Path

import trio

from edgegw.spool import DiskSpool, SpoolConfig, recover

# a frame body about the size the batcher makes: N positional CBOR records of ~60 B
RECORD_BYTES = 60


def conf(d: Path, **kw: object) -> SpoolConfig:
    base: dict[str, object] = {"dir": str(d), "max_bytes": 4 << 30}
    base.update(kw)
    return SpoolConfig(**base)  # type: ignore[arg-type]


async def append_throughput(d: Path, frames: int, records: int, appenders: int) -> dict:
    shutil.rmtree(d, ignore_errors=True)
    body = os.urandom(records * RECORD_BYTES)
    async with DiskSpool.open(conf(d)) as spool:
        per = frames // appenders
        t0 = time.perf_counter()

        async def worker() -> None:
            for i in range(per):
                await spool.append(body, records, {"src": i})

        async with trio.open_nursery() as n:
            for _ in range(appenders):
                n.start_soon(worker)
        dt = time.perf_counter() - t0
        commits = spool.stats()["commits"]
    total = per * appenders
    return {"frames_s": total / dt, "records_s": total * records / dt,
            "mb_s": total * len(body) / dt / 1e6, "frames_per_fsync": total / max(commits, 1)}


async def make_backlog(d: Path, gb: float, records: int) -> int:
    shutil.rmtree(d, ignore_errors=True)
    body = os.urandom(records * RECORD_BYTES)
    n = int(gb * 1e9 / len(body))
    async with DiskSpool.open(conf(d, commit_max_frames=1024)) as spool:
        async def worker(k: int) -> None:
            for i in range(k):
                await spool.append(body, records, {"src": i})

        async with trio.open_nursery() as nursery:
            for _ in range(16):
                nursery.start_soon(worker, n // 16)
    return (n // 16) * 16


async def drain(d: Path, window: int, in_thread: bool) -> dict:
    async with DiskSpool.open(conf(d)) as spool:
        t0 = time.perf_counter()
        seq = spool.first_unacked
        nbytes = nframes = 0
        while True:
            if in_thread:
                got = await spool.read_frames(seq, window)
            else:
                got = spool.frames_from(seq, window)
            if not got:
                break
            nframes += len(got)
            nbytes += sum(len(f.body) for f in got)
            seq = got[-1].seq + 1
            if in_thread:
                spool.ack(got[-1].seq)  # as the hub's cumulative acks would
        dt = time.perf_counter() - t0
    return {"mb_s": nbytes / dt / 1e6, "frames_s": nframes / dt, "frames": nframes}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default=None, help="where to put the spool (default: a temp dir)")
    ap.add_argument("--recovery-gb", type=float, default=1.0)
    ap.add_argument("--frame-records", type=int, default=500)
    ap.add_argument("--frames", type=int, default=3000)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    root = Path(args.dir or tempfile.mkdtemp(prefix="edgegw-bench-spool-"))
    d = root / "spool"
    recs = args.frame_records
    try:
        print(f"spool benchmark in {root}; frames of {recs} records x {RECORD_BYTES} B "
              f"= {recs * RECORD_BYTES / 1024:.0f} KiB; default commit policy "
              f"(commit_max_frames={SpoolConfig(dir='x').commit_max_frames}, "
              f"commit_max_delay_ms={SpoolConfig(dir='x').commit_max_delay_ms})")
        for appenders in (1, 8):
            runs = [trio.run(append_throughput, d, args.frames, recs, appenders)
                    for _ in range(args.repeat)]
            med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
            print(f"durable append, {appenders} appender(s): {med['frames_s']:,.0f} frames/s, "
                  f"{med['records_s']:,.0f} records/s, {med['mb_s']:.1f} MB/s, "
                  f"{med['frames_per_fsync']:.1f} frames per fsync (median of {args.repeat})")

        t0 = time.perf_counter()
        n = trio.run(make_backlog, d, args.recovery_gb, recs)
        size = sum(p.stat().st_size for p in d.glob("seg-*.spool"))
        print(f"generated backlog: {n:,} frames, {size / 1e9:.2f} GB "
              f"in {time.perf_counter() - t0:.1f} s")
        os.sync()
        t0 = time.perf_counter()
        tracemalloc.start()
        rec = recover(d)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        dt = time.perf_counter() - t0
        print(f"recovery of {size / 1e9:.2f} GB ({len(rec.segments)} segments, page cache "
              f"warm): {dt:.2f} s = {size / dt / 1e6:.0f} MB/s, Python memory peak "
              f"{peak / 1e6:.1f} MB (tracemalloc slows the scan; figure is an upper bound)")
        t0 = time.perf_counter()
        recover(d)
        dt = time.perf_counter() - t0
        print(f"recovery again without tracemalloc: {dt:.2f} s = {size / dt / 1e6:.0f} MB/s")
        res = trio.run(drain, d, 64, False)
        print(f"backlog read (frames_from windows of 64, no acks): "
              f"{res['mb_s']:.0f} MB/s, {res['frames_s']:,.0f} frames/s = "
              f"{res['frames_s'] * recs:,.0f} records/s over {res['frames']:,} frames")
        res = trio.run(drain, d, 64, True)
        print(f"backlog drain (read_frames windows of 64 in a thread, acking as it goes, "
              f"segments deleted): "
              f"{res['mb_s']:.0f} MB/s, {res['frames_s']:,.0f} frames/s = "
              f"{res['frames_s'] * recs:,.0f} records/s over {res['frames']:,} frames")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
