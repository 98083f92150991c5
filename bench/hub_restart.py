"""Hub restart time for two history sizes, side by side: with checkpoints, and without
(a full replay of every retained frame).

For each size, a filler process runs the hub in-process (``Hub``: store, live state,
checkpointer, default settings) and applies the simulated tester's lots frame by frame
the way the hub applies a gateway's frames (commit, then feed), then is killed with
SIGKILL -- no final checkpoint, the worst case.  Then a real ``edgegw hub`` process is
started on that data directory, once with checkpoints off and once with them on, and the
time from spawning it to ``/healthz`` answering is printed, with what it replayed.

    python bench/hub_restart.py [--sizes 400000,1600000]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import trio
import trio.lowlevel


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(port: int, path: str) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=30) as r:
        return json.loads(r.read())


async def fill(data_dir: str, n_records: int) -> None:
    from edgegw.config import build
    from edgegw.hub import Hub
    from edgegw.hub.config import HubConfig
    from edgegw.hub.store import FrameToApply
    from edgegw.protocol import Rows, encode_body
    from edgegw.records import Record
    from edgegw.sim.stdf_tester import stdf_chunks
    from edgegw.sim.tester import TesterProfile
    from edgegw.stdf import StdfDecoder
    from edgegw.stdf.mapping import RecordMapper

    cfg = build(HubConfig, {"hub": {"port": 0, "data_dir": data_dir},
                            "gateways": {"ate-01": {"token": "t"}}})
    app = Hub(cfg)
    async with trio.open_nursery() as nursery:
        await nursery.start(app.run)
        hub = app.ingest
        profile = TesterProfile(wafers=5, wafer_diameter_dies=30)
        dec, mapper, rid, seq = StdfDecoder(), RecordMapper("tester"), 1, 1
        pending: list[Record] = []
        for chunk in stdf_chunks(profile, lots=10_000, parts_per_second=1e6):
            dec.feed(chunk.data)
            pending.extend(r for rec in dec.records() for r in mapper.map(rec, time.time()))
            if chunk.end_of_file:
                dec, mapper = StdfDecoder(), RecordMapper("tester")
            while len(pending) >= 900:
                records, pending = pending[:900], pending[900:]
                frame = FrameToApply("ate-01", "e1", seq, rid, len(records),
                                     encode_body(rid, records))
                await hub.store.commit([frame])
                hub._feed("ate-01", rid, Rows(records), frame.id)
                rid += len(records)
                seq += 1
                await trio.lowlevel.checkpoint()  # the checkpointer and alert writer run
            if rid > n_records:
                break
        await trio.sleep(1)  # a checkpoint that was due is written
        assert app.checkpointer is not None  # the bench's hub keeps checkpoints
        print(json.dumps({"records": rid - 1, "checkpoint_frame": app.checkpointer.position,
                          "last_frame": hub.fed_id}), flush=True)
        await trio.sleep_forever()  # killed here: no final checkpoint


def start_hub(data_dir: Path, *settings: str) -> dict:
    port = free_port()
    conf = data_dir.parent / "hub.toml"
    conf.write_text(f'[hub]\nport = {port}\ndata_dir = "{data_dir}"\n'
                    '[gateways.ate-01]\ntoken = "t"\n')
    args = [a for kv in settings for a in ("--set", kv)]
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "edgegw", "hub", "--config", str(conf),
                             *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while True:
            try:
                get(port, "/healthz")
                break
            except OSError:
                if proc.poll() is not None:
                    raise RuntimeError("hub exited") from None
                time.sleep(0.02)
        elapsed = time.perf_counter() - t0
        stats = get(port, "/api/stats")
        return {"seconds": elapsed, **stats["replay"]}
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()


def main() -> int:
    if len(sys.argv) == 4 and sys.argv[1] == "--fill":
        trio.run(fill, sys.argv[2], int(sys.argv[3]))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="400000,1600000")
    args = ap.parse_args()
    rows = []
    for size in map(int, args.sizes.split(",")):
        with tempfile.TemporaryDirectory(dir="/var/tmp") as tmp:
            data_dir = Path(tmp) / "hub"
            t0 = time.perf_counter()
            filler = subprocess.Popen([sys.executable, __file__, "--fill", str(data_dir),
                                       str(size)], stdout=subprocess.PIPE)
            assert filler.stdout is not None
            filled = json.loads(filler.stdout.readline())
            os.kill(filler.pid, signal.SIGKILL)
            filler.wait()
            fill_s = time.perf_counter() - t0
            full = start_hub(data_dir, "hub.checkpoint_interval_s=0")
            ckpt = start_hub(data_dir)
            disk = sum(p.stat().st_size for p in data_dir.iterdir())
            rows.append((filled["records"], full, ckpt, disk, fill_s))
            print(f"filled {filled['records']:,} records in {fill_s:.0f} s", flush=True)
    print(f"\n{'history':>12} | {'full replay: start':>18} {'replayed':>10} | "
          f"{'checkpoint: start':>17} {'replayed':>10} | {'data dir':>9}")
    for records, full, ckpt, disk, _ in rows:
        print(f"{records:>12,} | {full['seconds']:>16.2f} s {full['records']:>10,} | "
              f"{ckpt['seconds']:>15.2f} s {ckpt['records']:>10,} | {disk / 1e6:>6.1f} MB")
    print("(start = spawning `edgegw hub` to /healthz answering, Python start-up included;"
          " killed with SIGKILL before each restart)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
