"""What many finished files on disk cost the tail source (docs/tail.md, "The checkpoint's
size").

A directory (in /dev/shm where there is one) holds ``--files`` small finished STDF lots
when the tail starts.  Measured in one process per run: reading them all (wall seconds,
and the CPU seconds of the process), the CBOR size of the checkpoints handed over (the
largest, and the one handed with a new file's records afterwards), and the CPU per poll
of the idle directory.  ``--baseline DIR`` runs the same in another checkout's edgegw
(``git archive main | tar -x -C DIR``), the runs interleaved; the medians and the ratios
(this / baseline) are printed with the load average.  A baseline without ``fold_after``
runs with its defaults; this checkout runs with ``fold_after = 0`` (the lots are seconds
old, on a floor they are older than the default 60 s).  The tail is given a state directory
beside the lots (a gateway gives each source one): the registry of finished files is kept
there, where the tail keeps one.

    python bench/tail_files.py [--files 5000] [--runs 3] [--baseline DIR]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def scratch_dir() -> tempfile.TemporaryDirectory[str]:
    """A scratch directory in /dev/shm where there is one: the tail's reads are measured,
    not the disk's."""
    shm = Path("/dev/shm")
    root = shm if shm.is_dir() and os.access(shm, os.W_OK) else None
    return tempfile.TemporaryDirectory(dir=root, prefix="edgegw-bench-")


def child(files: int) -> dict[str, Any]:
    import cbor2
    import trio

    from edgegw.metrics import Metrics
    from edgegw.sim import stdf_file_bytes
    from edgegw.sim.tester import TesterProfile
    from edgegw.sources import SourceContext, TailConfig, TailSource

    data = stdf_file_bytes(TesterProfile(sites=4, wafer_diameter_dies=8, tests_per_part=4,
                                         seed=7))
    offsets = [0]
    while offsets[-1] < len(data):
        offsets.append(offsets[-1] + 4 + int.from_bytes(data[offsets[-1]:offsets[-1] + 2],
                                                        "little"))
    kinds = [(data[o + 2], data[o + 3]) for o in offsets[:-1]]
    lot = data[:offsets[kinds.index((1, 10)) + 1]] + data[offsets[-2]:]  # MIR ... MRR

    class Sink:
        def __init__(self) -> None:
            self.sizes: list[int] = []
            self.ended = 0

        async def put(self, records: Any, checkpoint: Any = None) -> None:
            self.sizes.append(len(cbor2.dumps(checkpoint)))
            self.ended += sum(type(r).__name__ == "LotEnd" for r in records)

    with scratch_dir() as d:
        directory = Path(d)
        (directory / "lots").mkdir()
        for i in range(files):
            (directory / "lots" / f"lot{i:05}.stdf").write_bytes(lot)
        keys = {f.name for f in dataclasses.fields(TailConfig)}
        extra: dict[str, Any] = {"fold_after": 0.0} if "fold_after" in keys else {}
        time.sleep(0.3)  # older than the watermark's slack (0.1 s) when the tail starts
        # a state directory (the registry of finished files, where the tail keeps one),
        # beside the lots: written as the lots finish, read at the start
        source = TailSource("bench", TailConfig(paths=[str(directory / "lots")], **extra),
                            SourceContext("gw", Metrics(), state_dir=str(directory / "state")))
        sink = Sink()
        out: dict[str, Any] = {}

        async def main() -> None:
            t0, c0 = time.perf_counter(), time.process_time()
            while sink.ended < files:
                await source.poll_once(sink)
            out["read_s"] = time.perf_counter() - t0
            out["read_cpu_s"] = time.process_time() - c0
            out["largest_checkpoint"] = max(sink.sizes)
            c0 = time.process_time()
            for _ in range(10):
                await source.poll_once(sink)
            out["idle_poll_cpu_ms"] = (time.process_time() - c0) / 10 * 1000
            (directory / "lots" / "new.stdf").write_bytes(lot)
            n = len(sink.sizes)
            while len(sink.sizes) == n:
                await source.poll_once(sink)
            out["checkpoint_after"] = sink.sizes[-1]

        trio.run(main)
        return out


def run_child(script: str, checkout: Path, args: list[str]) -> dict[str, Any]:
    """``script --child ARGS`` with ``checkout``'s edgegw: the figures its last line prints."""
    env = dict(os.environ, PYTHONPATH=str(checkout))
    proc = subprocess.run([sys.executable, script, "--child", *args], env=env,
                          capture_output=True, text=True, check=True, cwd=tempfile.gettempdir())
    return json.loads(proc.stdout.strip().splitlines()[-1])


def interleaved_medians(script: str, args: list[str], runs: int, baseline: Path | None,
                        title: str) -> None:
    """Run ``script``'s child with this checkout's edgegw (and ``baseline``'s), the runs
    interleaved; print each figure's medians and the ratio this / baseline."""
    here = Path(__file__).resolve().parents[1]
    variants = {"this": here} | ({"baseline": baseline} if baseline else {})
    results: dict[str, list[dict[str, Any]]] = {k: [] for k in variants}
    for _ in range(runs):
        for name, checkout in variants.items():
            results[name].append(run_child(script, checkout, args))
    print(f"{title}, {runs} runs each; load average "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"{'':22}" + "".join(f"{k:>14}" for k in variants)
          + ("         ratio" if baseline else ""))
    for key in results["this"][0]:
        med = {k: statistics.median(r[key] for r in rs) for k, rs in results.items()}
        row = f"{key:22}" + "".join(f"{med[k]:14.4g}" for k in variants)
        if baseline and med["baseline"]:
            row += f"{med['this'] / med['baseline']:14.3g}"
        print(row)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--files", type=int, default=5000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--baseline", metavar="DIR", type=Path)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.files)))
        return
    interleaved_medians(__file__, ["--files", str(args.files)], args.runs, args.baseline,
                        f"{args.files} finished files")

if __name__ == "__main__":
    main()
