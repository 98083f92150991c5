"""Hub bytes on disk per record, next to the tester's STDF bytes per record, same data.

The records are what a gateway tailing the file sends: STDF decoded and mapped to edgegw
records (``RecordMapper``), cut into frames of ``--per-frame`` records (a gateway at ~9k
records/s with the default 100 ms batch delay sends ~900) and committed to a real hub
store (SQLite, WAL, compressed bodies).  "On disk" is every file in the data directory
after the store is closed (the WAL checkpointed into the database).

    python bench/hub_bytes.py [--per-frame 900] [--lots 3]

Data: the simulated tester (``edgegw simulate``'s STDF, 4 sites, 8 tests per part) and the
real Teradyne file galaxy-a530-lot2 from the shared data.
"""

from __future__ import annotations

import argparse
import gzip
import os
import sys
import tempfile
from pathlib import Path

import trio

from edgegw.hub.store import FrameToApply, HubStore
from edgegw.protocol import encode_body
from edgegw.sim.stdf_tester import stdf_chunks
from edgegw.sim.tester import TesterProfile
from edgegw.stdf import StdfDecoder
from edgegw.stdf.mapping import RecordMapper


def shared_data() -> Path:
    env = os.environ.get("EDGEGW_SHARED_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data" / "stdf"


def records_of(chunks: list[bytes]) -> list:
    dec, mapper, out, now = StdfDecoder(), RecordMapper("tester"), [], 1.7e9
    for chunk in chunks:
        dec.feed(chunk)
        now += 0.05  # a read every 50 ms, as a tail does
        for rec in dec.records():
            out.extend(mapper.map(rec, now))
    return out


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.iterdir())


async def store_bytes(records: list, per_frame: int) -> int:
    with tempfile.TemporaryDirectory(dir="/var/tmp") as tmp:
        store = HubStore(Path(tmp) / "hub.sqlite3")
        await store.open()
        frames = [FrameToApply("ate-01", "e1", i // per_frame + 1, i + 1,
                               len(records[i:i + per_frame]),
                               encode_body(i + 1, records[i:i + per_frame]))
                  for i in range(0, len(records), per_frame)]
        for i in range(0, len(frames), 16):  # group commits, as under load
            await store.commit(frames[i:i + 16])
        await store.close()
        return dir_bytes(Path(tmp))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--per-frame", type=int, default=900)
    ap.add_argument("--lots", type=int, default=3)
    args = ap.parse_args()
    datasets = []
    sim = [c.data for c in stdf_chunks(TesterProfile(wafers=3, wafer_diameter_dies=40),
                                       lots=args.lots)]
    datasets.append((f"simulated tester, {args.lots} lots", sim))
    galaxy = shared_data() / "galaxy-a530-lot2.stdf.gz"
    if galaxy.exists():
        data = gzip.decompress(galaxy.read_bytes())
        datasets.append(("galaxy-a530-lot2 (real)", [data[i:i + 65536]
                                                     for i in range(0, len(data), 65536)]))
    print(f"{'data':32} {'records':>9} {'STDF B/rec':>11} {'hub B/rec':>10} {'hub/STDF':>9}")
    worse = False
    for name, chunks in datasets:
        records = records_of(chunks)
        stdf = sum(map(len, chunks))
        hub = trio.run(store_bytes, records, args.per_frame)
        print(f"{name:32} {len(records):9d} {stdf / len(records):11.1f} "
              f"{hub / len(records):10.1f} {hub / stdf:9.2f}")
        worse |= hub >= stdf
    print(f"(frames of {args.per_frame} records; hub = every file of its data directory)")
    return 1 if worse else 0


if __name__ == "__main__":
    sys.exit(main())
