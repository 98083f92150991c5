"""Bytes and CPU per record with and without frame-body compression, on real tester data.

Each STDF file of ``shared/data/stdf`` (or the files given) is decoded, mapped to edgegw
records as the gateway's tail does (a record's time advancing as if tested live), batched
into frames of ``--batch`` records (``batch.max_records``), and each frame is framed as the
DATA message the uplink sends: plain (protocol v1), then zlib at each ``--levels`` level
(docs/protocol.md section 5.1).  Printed per file and encoding:

  bytes/rec   DATA message bytes on the wire per record
  ratio       plain bytes / these bytes
  gw us/rec   gateway CPU per record to frame the DATA message (compression included)
  hub us/rec  hub CPU per record to decode the DATA message (decompression included)

CPU is process time, the median of ``--runs`` passes over all frames.  With ``--live``,
the same for ``/ws/live`` batch frames (permessage-deflate, docs/live-protocol.md): a
frame of one UI tick's deltas as a dashboard receives them.

    python bench/compression.py [--batch 2000] [--levels 1 6] [--runs 5] [FILE...]
"""

from __future__ import annotations

import argparse
import gzip
import statistics
import time
from pathlib import Path

from edgegw.protocol import GatewayConnection, HubConnection, IntervalSet, encode_body
from edgegw.protocol.messages import Hello, encode
from edgegw.stdf import RecordMapper, StdfDecoder

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "stdf"


def load_records(path: Path) -> list:
    data = path.read_bytes()
    if path.suffix == ".gz":
        data = gzip.decompress(data)
    dec = StdfDecoder()
    dec.feed(data)
    mapper = RecordMapper(path.name.split(".")[0])
    now = 1_750_000_000.0
    out = []
    for rec in dec.records():
        now += 1e-4  # about 10k records/s, as a busy tester writes them
        out.extend(mapper.map(rec, now))
    return out + mapper.close(now)


def frame_bodies(records: list, batch: int) -> list[bytes]:
    return [encode_body(1 + i, records[i:i + batch]) for i in range(0, len(records), batch)]


def connections(encoding: str | None, level: int) -> tuple[GatewayConnection, HubConnection]:
    offer = (encoding,) if encoding else ()
    gw = GatewayConnection("bench", "t", "e", 1, compression=offer, compression_level=level,
                           max_message_bytes=64 << 20)
    hub = HubConnection(compression=offer, max_message_bytes=64 << 20, max_holes=1 << 30)
    hub.receive(encode(Hello("bench", "t", "e", 1, (1,), 5.0, offer)), 0.0)
    gw.hello(0.0)
    gw.receive(hub.accept(IntervalSet(), 0.0), 0.0)
    return gw, hub


def measure(bodies: list[bytes], encoding: str | None, level: int,
            runs: int) -> tuple[int, float, float]:
    """(wire bytes, gateway seconds, hub seconds) for one pass over ``bodies``."""
    gw_times, hub_times, wire = [], [], 0
    for _ in range(runs):
        gw, hub = connections(encoding, level)
        started = time.process_time()
        messages = [gw.data(seq, b, 0.0) for seq, b in enumerate(bodies, 1)]
        gw_times.append(time.process_time() - started)
        started = time.process_time()
        for m in messages:
            hub.receive(m, 0.0)
        hub_times.append(time.process_time() - started)
        wire = sum(len(m) for m in messages)
    return wire, statistics.median(gw_times), statistics.median(hub_times)


def live_frames(records: list, per_frame: int) -> list[bytes]:
    """CBOR batch frames as /ws/live sends them: per-part delta items for the parts of one
    UI tick (a wafer map's dies, bins, yields) -- built from the mapped parts."""
    from edgegw.hub.fanout.encoding import CBOR
    from edgegw.records import PartResult
    parts = [r for r in records if isinstance(r, PartResult)]
    frames = []
    for i in range(0, len(parts), per_frame):
        tick = parts[i:i + per_frame]
        items = [CBOR.encode({"type": "delta", "topic": f"lot/{p.lot_id}/wafer/{p.wafer_id}",
                              "epoch": "66a1b2c3-0f0f0f0f", "from": i + k, "offset": i + k + 1,
                              "data": [{"dies": [[p.x, p.y, p.hard_bin, p.soft_bin, p.passed,
                                                  p.site]],
                                        "bins": {str(p.hard_bin): 1}, "parts": 1}],
                              "n": 1, "ts": [p.ts, p.ts]})
                 for k, p in enumerate(tick)]
        frames.append(CBOR.batch(tick[-1].ts, items))  # type: ignore[arg-type]
    return frames


def measure_live(frames: list[bytes], level: int | None, runs: int,
                 min_bytes: int) -> tuple[int, float]:
    from edgegw.web import Deflater, prepare_message
    times, wire = [], 0
    for _ in range(runs):
        prepare = prepare_message if level is None else Deflater(level, min_bytes).prepare
        started = time.process_time()
        out = [prepare(f) for f in frames]
        times.append(time.process_time() - started)
        wire = sum(len(f) for f in out)
    return wire, statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("files", nargs="*", type=Path)
    ap.add_argument("--batch", type=int, default=2000, help="records per frame")
    ap.add_argument("--levels", type=int, nargs="+", default=[1, 6])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--live", action="store_true", help="also /ws/live frames")
    ap.add_argument("--parts-per-tick", type=int, default=25,
                    help="parts per /ws/live frame (500 parts/s at 20 ticks/s)")
    args = ap.parse_args()
    files = args.files or sorted(p for p in SHARED.iterdir() if p.name != "README.md")
    print(f"/ws/gateway DATA messages, {args.batch} records per frame, median of "
          f"{args.runs} runs (process time)")
    print(f"{'file':26} {'records':>8} {'encoding':10} {'bytes/rec':>9} {'ratio':>6} "
          f"{'gw us/rec':>9} {'hub us/rec':>10}")
    for path in files:
        records = load_records(path)
        bodies = frame_bodies(records, args.batch)
        n = len(records)
        plain = 0
        for encoding, level in [(None, 0), *(("zlib", lv) for lv in args.levels)]:
            wire, gw_s, hub_s = measure(bodies, encoding, level, args.runs)
            plain = plain or wire
            name = "plain" if encoding is None else f"{encoding}-{level}"
            print(f"{path.name:26} {n:8d} {name:10} {wire / n:9.1f} {plain / wire:6.2f} "
                  f"{1e6 * gw_s / n:9.2f} {1e6 * hub_s / n:10.2f}")
        if args.live:
            frames = live_frames(records, args.parts_per_tick)
            if not frames:
                continue
            parts = sum(1 for _ in range(0, len(frames)))
            plain = 0
            for level in [None, *args.levels]:
                wire, s = measure_live(frames, level, args.runs, 256)
                plain = plain or wire
                name = "plain" if level is None else f"deflate-{level}"
                print(f"{path.name + ' /ws/live':26} {parts:8d} {name:10} "
                      f"{wire / len(frames):9.1f} {plain / wire:6.2f} "
                      f"{1e6 * s / len(frames):9.2f} {'(per frame)':>10}")


if __name__ == "__main__":
    main()
