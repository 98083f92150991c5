"""Bytes and CPU per record with and without frame-body compression, on real tester data.

Each STDF file of ``shared/data/stdf`` (or the files given) is decoded, mapped to edgegw
records as the gateway's tail does (a record's time advancing as if tested live), batched
into frames of ``--batch`` records (``batch.max_records``), each frame's body encoded in
each ``--layouts`` layout -- ``v1`` rows (docs/protocol.md section 5) and ``v2`` columns
(section 5.2, what a v2 connection sends) -- and framed as the DATA message the uplink
sends: plain, then zlib at each ``--levels`` level (section 5.1).  Printed per file,
layout and encoding:

  bytes/rec    DATA message bytes on the wire per record
  ratio        plain bytes (of the same layout) / these bytes
  gw us/rec    gateway CPU per record: encode the body, frame the DATA message, compress
  hub us/rec   hub CPU per record: read the DATA message, decompress, decode the body
               into records (``decode_frame``, the hub's decode)
  zlib us/rec  of which the compression at the gateway + the decompression at the hub
               (``compress_body``/``decompress_body`` of the same bodies, timed alone)

CPU is process time, the median of ``--runs`` passes over all frames.  With ``--live``,
the same for ``/ws/live`` batch frames (permessage-deflate, docs/live-protocol.md): a
frame of one UI tick's deltas as a dashboard receives them, per frame and per part.

    python bench/compression.py [--batch 2000] [--levels 1 6] [--runs 5] [--live] [FILE...]
"""

from __future__ import annotations

import argparse
import gzip
import os
import statistics
import time
from pathlib import Path

from edgegw.protocol import (
    GatewayConnection,
    Hello,
    HubConnection,
    IntervalSet,
    compress_body,
    decode_frame,
    decompress_body,
    encode,
    encode_body,
    encode_columns,
)
from edgegw.records import PartResult
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


LAYOUTS = {"v1": (1, encode_body), "v2": (2, encode_columns)}


def frames_of(records: list, batch: int) -> list[tuple[int, list]]:
    return [(1 + i, records[i:i + batch]) for i in range(0, len(records), batch)]


def connections(encoding: str | None, level: int,
                version: int) -> tuple[GatewayConnection, HubConnection]:
    offer = (encoding,) if encoding else ()
    versions = tuple(range(1, version + 1))
    gw = GatewayConnection("bench", "t", "e", 1, compression=offer, compression_level=level,
                           max_message_bytes=64 << 20, versions=versions)
    hub = HubConnection(compression=offer, max_message_bytes=64 << 20, max_holes=1 << 30)
    hub.receive(encode(Hello("bench", "t", "e", 1, versions, 5.0, offer)), 0.0)
    gw.hello(0.0)
    gw.receive(hub.accept(IntervalSet(), 0.0), 0.0)
    assert gw.version == version, (gw.version, version)
    return gw, hub


def zlib_seconds(frames: list[tuple[int, list]], layout: str, level: int,
                 runs: int) -> float:
    """Median seconds to compress every body (gateway) and decompress it (hub)."""
    encode_frame_body = LAYOUTS[layout][1]
    bodies = [encode_frame_body(rid, recs) for rid, recs in frames]
    times = []
    for _ in range(runs):
        started = time.process_time()
        for body in bodies:
            decompress_body(compress_body(body, level), 1 << 30)
        times.append(time.process_time() - started)
    return statistics.median(times)


def measure(frames: list[tuple[int, list]], layout: str, encoding: str | None, level: int,
            runs: int) -> tuple[int, float, float]:
    """(wire bytes, gateway seconds, hub seconds) for one pass over ``frames``: the
    gateway encodes each body and frames it, the hub reads the message and decodes the
    body into records, as on a connection of the layout's protocol version."""
    version, encode_frame_body = LAYOUTS[layout]
    gw_times, hub_times, wire = [], [], 0
    for _ in range(runs):
        gw, hub = connections(encoding, level, version)
        started = time.process_time()
        messages = [gw.data(seq, encode_frame_body(rid, recs), 0.0)
                    for seq, (rid, recs) in enumerate(frames, 1)]
        gw_times.append(time.process_time() - started)
        started = time.process_time()
        n = 0
        for m in messages:
            (data,), _ = hub.receive(m, 0.0)
            n += len(decode_frame(data.body, 1 << 30, columnar=version >= 2)[1])
        hub_times.append(time.process_time() - started)
        assert n == sum(len(recs) for _, recs in frames)
        wire = sum(len(m) for m in messages)
    return wire, statistics.median(gw_times), statistics.median(hub_times)


def live_frames(records: list, per_frame: int) -> list[bytes]:
    """CBOR batch frames as /ws/live sends them: per-part delta items for the parts of one
    UI tick (a wafer map's dies, bins, yields) -- built from the mapped parts."""
    from edgegw.hub.fanout.encoding import CBOR
    parts = [r for r in records if isinstance(r, PartResult)]
    frames: list[bytes] = []
    for i in range(0, len(parts), per_frame):
        tick = parts[i:i + per_frame]
        items: list[bytes | str] = [
            CBOR.encode({"type": "delta", "topic": f"lot/{p.lot_id}/wafer/{p.wafer_id}",
                         "epoch": "66a1b2c3-0f0f0f0f", "from": i + k, "offset": i + k + 1,
                         "data": [{"dies": [[p.x, p.y, p.hard_bin, p.soft_bin, p.passed,
                                             p.site]],
                                   "bins": {str(p.hard_bin): 1}, "parts": 1}],
                         "n": 1, "ts": [p.ts, p.ts]})
            for k, p in enumerate(tick)]
        batch = CBOR.batch(tick[-1].ts, items)
        assert isinstance(batch, bytes)  # CBOR's batches are bytes, JSON's text
        frames.append(batch)
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
    ap.add_argument("--layouts", nargs="+", choices=sorted(LAYOUTS), default=["v1", "v2"],
                    help="frame body layouts (protocol versions)")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--live", action="store_true", help="also /ws/live frames")
    ap.add_argument("--parts-per-tick", type=int, default=25,
                    help="parts per /ws/live frame (500 parts/s at 20 ticks/s)")
    args = ap.parse_args()
    files = args.files or sorted(p for p in SHARED.iterdir() if p.name != "README.md")
    print(f"load average {os.getloadavg()[0]:.1f} (1 minute; the machine is shared)")
    print(f"/ws/gateway DATA messages, {args.batch} records per frame, median of "
          f"{args.runs} runs (process time)")
    print(f"{'file':26} {'records':>8} {'layout':6} {'encoding':10} {'bytes/rec':>9} "
          f"{'ratio':>6} {'gw us/rec':>9} {'hub us/rec':>10} {'zlib us/rec':>11}")
    live: list[tuple[str, int, list[bytes]]] = []
    for path in files:
        records = load_records(path)
        # a small file's frames are sent again (new seq) until 50k records: timings of
        # a few ms drown in a loaded machine's noise
        frames = frames_of(records, args.batch) * max(1, 50_000 // max(len(records), 1))
        n = sum(len(recs) for _, recs in frames)
        for layout in args.layouts:
            plain = 0.0
            for encoding, level in [(None, 0), *(("zlib", lv) for lv in args.levels)]:
                wire, gw_s, hub_s = measure(frames, layout, encoding, level, args.runs)
                plain = plain or wire
                name = "plain" if encoding is None else f"{encoding}-{level}"
                extra = "" if encoding is None else \
                    f"{1e6 * zlib_seconds(frames, layout, level, args.runs) / n:11.2f}"
                print(f"{path.name:26} {len(records):8d} {layout:6} {name:10} {wire / n:9.1f} "
                      f"{plain / wire:6.2f} {1e6 * gw_s / n:9.2f} {1e6 * hub_s / n:10.2f} "
                      f"{extra:>11}")
        if args.live:
            live.append((path.name, len([r for r in records if isinstance(r, PartResult)]),
                         live_frames(records, args.parts_per_tick)))
    if not args.live:
        return
    print()
    print(f"/ws/live batch frames of {args.parts_per_tick} parts' deltas (one UI tick), "
          f"permessage-deflate without context takeover, median of {args.runs} runs; "
          "CPU: preparing the frame once for every client (the compression itself)")
    print(f"{'file':26} {'parts':>6} {'encoding':10} {'bytes/frame':>11} {'bytes/part':>10} "
          f"{'ratio':>6} {'us/frame':>9} {'us/part':>8}")
    for name, parts, messages in live:
        if not messages:
            continue
        plain = 0
        for level in [None, *args.levels]:
            wire, secs = measure_live(messages, level, args.runs, 1024)
            plain = plain or wire
            enc = "plain" if level is None else f"deflate-{level}"
            print(f"{name:26} {parts:6d} {enc:10} {wire / len(messages):11.1f} "
                  f"{wire / parts:10.1f} {plain / wire:6.2f} {1e6 * secs / len(messages):9.2f} "
                  f"{1e6 * secs / parts:8.2f}")


if __name__ == "__main__":
    main()
