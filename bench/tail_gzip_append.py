"""What lots appended one after another to one ``.stdf.gz`` cost the tail source
(docs/tail.md, "A lot appended to a finished file").

A tester appends ``--lots`` lots to one gzip file, each complete at its MRR before the
next: each a gzip member of its own (``gzip -c lot >> file``), or one gzip stream flushed
with ``Z_SYNC_FLUSH`` after each (``--how``).  The tail polls after each append until it
has sent that lot's ``LotEnd``.  Measured in one process per run: the CPU seconds of the
process and the bytes it read from files (``rchar`` of ``/proc/self/io``), per file size.
``--baseline DIR`` runs the same in another checkout's edgegw, the runs interleaved; the
medians and the ratios (this / baseline) are printed with the load average.

    python bench/tail_gzip_append.py [--lots 200] [--how members] [--runs 5] [--baseline DIR]
"""

from __future__ import annotations

import argparse
import json
import time
import zlib
from pathlib import Path
from typing import Any

from tail_files import interleaved_medians, scratch_dir  # (bench/ is on the path of a bench script)


def rchar() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    return 0


def append(path: Path, piece: bytes) -> None:
    with open(path, "ab") as f:
        f.write(piece)


def child(lots: int, how: str) -> dict[str, Any]:
    import gzip

    import trio

    from edgegw.metrics import Metrics
    from edgegw.sim import stdf_file_bytes
    from edgegw.sim.tester import TesterProfile
    from edgegw.sources import SourceContext, TailConfig, TailSource

    data = [stdf_file_bytes(TesterProfile(lot_id=f"L{n:04}", sites=4, wafer_diameter_dies=8,
                                          tests_per_part=4, seed=n)) for n in range(lots)]
    if how == "members":
        pieces = [gzip.compress(d) for d in data]
    else:
        stream = zlib.compressobj(6, zlib.DEFLATED, 31)
        pieces = [stream.compress(d) + stream.flush(zlib.Z_SYNC_FLUSH) for d in data]

    class Sink:
        ended = 0

        async def put(self, records: Any, checkpoint: Any = None) -> None:
            self.ended += sum(type(r).__name__ == "LotEnd" for r in records)

    with scratch_dir() as d:
        directory = Path(d)
        (directory / "lots").mkdir()
        path = directory / "lots" / "retest.stdf.gz"
        source = TailSource("bench", TailConfig(paths=[str(directory / "lots")],
                                                idle_timeout=3600),
                            SourceContext("gw", Metrics(), state_dir=str(directory / "state")))
        sink = Sink()

        async def main() -> dict[str, Any]:
            c0, r0 = time.process_time(), rchar()
            for n, piece in enumerate(pieces, 1):
                append(path, piece)
                while sink.ended < n:
                    await source.poll_once(sink)
            size = path.stat().st_size
            return {"cpu_s": time.process_time() - c0,
                    "read_per_file_size": (rchar() - r0) / size, "file_kB": size / 1000}

        return trio.run(main)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lots", type=int, default=200)
    ap.add_argument("--how", choices=["members", "sync-flushed"], default="members")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--baseline", metavar="DIR", type=Path)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.lots, args.how)))
        return
    interleaved_medians(__file__, ["--lots", str(args.lots), "--how", args.how], args.runs,
                        args.baseline, f"{args.lots} lots appended ({args.how})")

if __name__ == "__main__":
    main()
