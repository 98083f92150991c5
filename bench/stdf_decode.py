"""Benchmark: decode STDF files with edgegw and with pystdf, side by side in one run.

For every file -- the real tester files in ``shared/data/stdf`` and the synthetic shapes of
``bench/stdf_corpus.py`` (FTR-heavy, MPR-heavy, varied PTRs on 2 heads x 8 sites
big-endian, GDR-heavy with random and with repeating type-code layouts, a Catalyst-like
mix of FTRs, MPRs, GDRs and PTRs cut at varying fields), or the files named on the
command line -- it prints:

* full decode: both decoders decode every field of every record and the consumer sees
  each record once, as a streaming gateway does: pystdf into a value list per record,
  edgegw into a row per record (``StdfDecoder.rows()``: the values in a tuple, the
  equivalent of pystdf's list) in one feed, in 64 KiB chunks, and in one feed with the
  PTR and FTR tail memo and the GDR layouts off (``set_tail_memo(0)``: the figure must
  not rest on them), and into a field dict per
  record (``records()``), memo on and off;
* ``edgegw stdf stats FILE`` end to end, the command a user times, against pystdf reading
  the same file (gunzip included) and parsing it with a sink that only counts -- less
  than pystdf would need to do to compute the same figures: in this process, the
  command after its argument parsing (open, gunzip, decode, figures, JSON out) and the
  whole ``main`` (argument parsing included); and as processes, ``edgegw stdf stats
  FILE`` against ``python -c 'pystdf: read and parse FILE'``, their runs interleaved,
  with their start-up (interpreter and imports, each command on a file of a FAR and an
  MRR) included and subtracted, and with only the bare interpreter's (``python -c
  pass``) subtracted; the start-up line also gives edgegw's without its decoder cache;
* a memory check on the first file: a stream ten times the file's size, fed in 64 KiB
  chunks, must peak no higher than the file once.

The record loop is the compiled one where it was built (docs/stdf.md), the pure-Python
one with ``EDGEGW_STDF_ACCEL=0``; the first lines say which.

``--stats-ab DIR``: instead, ``edgegw stdf stats FILE`` as processes, this tree's and
DIR's and pystdf's read + parse, each also on a file of a FAR and an MRR (its start-up,
subtracted), all interleaved: the ratios to pystdf and this tree vs DIR.

``--ab DIR``: instead, an A/B of this tree's decoder against the edgegw source in DIR (a
checkout of main, e.g. ``git archive main | tar -x -C DIR``) and pystdf, each run in its
own process, the three interleaved run by run: rows in one feed, with the tail memo and
GDR layouts and without, per file and shape, medians and each side's ratio to pystdf;
and two files at once (``PAIRS``: one whose PTR tails or GDR layouts repeat beside one
whose do not, a decoder each, fed 64 KiB in turn, as a gateway tailing both does).

Times are medians of --runs runs of CPU time (the machine is shared: wall time would
charge other jobs' load to whichever decoder ran while it peaked; --wall for wall time);
a run repeats its decode for at least --min-sample-ms (20 ms; as timeit does) and counts
the time per decode, for both decoders.
The last lines are a markdown table of the medians (docs/stdf.md carries one).

    python bench/stdf_decode.py [FILE ...] [--runs N] [--no-shapes] [--no-cli] [--ab DIR]
                                [--stats-ab DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import io
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edgegw.stdf import StdfDecoder, StdfWriter
from edgegw.stdf.decoder import MEMO_SIZE, set_tail_memo

sys.path.insert(0, str(Path(__file__).resolve().parent))
from stdf_corpus import SHAPES

WALL = False
#: a timed run of a decode lasts at least this long (--min-sample-ms; 0: one decode)
MIN_SAMPLE_S = 0.02
CHUNK = 64 * 1024


def shared_data() -> Path:
    env = os.environ.get("EDGEGW_SHARED_DATA")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "shared" / "data" / "stdf"


def load(path: Path) -> bytes:
    data = path.read_bytes()
    return gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data


def edgegw_decode(data: bytes, chunk: int | None = None, rows: bool = True) -> int:
    dec = StdfDecoder()
    read = dec.rows if rows else dec.records
    count = 0
    if chunk is None:
        dec.feed(data)
        for _ in read():
            count += 1
        return count
    view = memoryview(data)
    for start in range(0, len(data), chunk):
        dec.feed(view[start:start + chunk])
        for _ in read():
            count += 1
    return count


class _CountingSink:
    """A pystdf sink that, like the edgegw loop, just sees every record."""

    def __init__(self) -> None:
        self.count = 0

    def after_send(self, source: object, data: object) -> None:
        self.count += 1

    def __getattr__(self, name: str) -> Callable[..., None]:  # before_begin, ...: no-ops
        return lambda *args: None


def pystdf_decode(data: bytes) -> int:
    from pystdf.IO import Parser

    parser = Parser(inp=io.BytesIO(data))
    sink = _CountingSink()
    parser.addSink(sink)
    parser.parse()
    return sink.count


def timed(fn: Callable[[], Any], runs: int) -> tuple[float, Any]:
    """Median seconds of ``runs`` runs (CPU time of this process unless --wall)."""
    clock = time.perf_counter if WALL else time.process_time
    times = []
    result = None
    for _ in range(runs):
        start = clock()
        result = fn()
        times.append(clock() - start)
    return statistics.median(times), result


def stats_seconds(path: Path, runs: int, parse: bool = False) -> float:
    """Median seconds of ``edgegw stdf stats path`` run in this process: the command end to
    end (open, gunzip, decode, figures, JSON out) without the interpreter's start-up,
    imports and argument parsing (building the ``edgegw`` parser of every command takes
    some ms), which a separate process measures too noisily on a loaded machine.
    ``parse``: with the argument parsing (the whole ``main``)."""
    import argparse

    from edgegw.cli import main as edgegw_main
    from edgegw.stdf.cli import run_stats

    def once() -> None:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            if parse:
                status = edgegw_main(["stdf", "stats", str(path)])
            else:
                status = run_stats(argparse.Namespace(file=path, partial=False,
                                                      any_version=False))
        assert status == 0 and out.getvalue().startswith("{"), status

    once()
    return timed(once, runs)[0]


#: the pystdf side of the process comparison: read (gunzip) and parse a file, count records
PYSTDF_CHILD = """
import gzip, io, sys
from pystdf.IO import Parser
data = open(sys.argv[1], 'rb').read()
data = gzip.decompress(data) if data[:2] == b'\\x1f\\x8b' else data
class Sink:
    count = 0
    def after_send(self, source, data):
        self.count += 1
    def __getattr__(self, name):
        return lambda *args: None
parser = Parser(inp=io.BytesIO(data))
sink = Sink()
parser.addSink(sink)
parser.parse()
print(sink.count)
"""


def _commands(path: Path, startup: bool = False) -> dict[str, list[str]]:
    """The commands timed as processes; with ``startup``, also the bare interpreter
    (``python -c pass``: what both sides pay before their first import) and edgegw
    without its decoder cache (``EDGEGW_CACHE_DIR`` empty: compiling at every run)."""
    exe = Path(sys.executable).parent / "edgegw"
    edgegw = [str(exe)] if exe.exists() else [sys.executable, "-m", "edgegw"]
    out = {"edgegw": [*edgegw, "stdf", "stats", str(path)],
           "pystdf": [sys.executable, "-c", PYSTDF_CHILD, str(path)]}
    if startup:
        out["python"] = [sys.executable, "-c", "pass"]
        out["edgegw_nocache"] = out["edgegw"]  # run with EDGEGW_CACHE_DIR empty
    return out


def _child_env() -> dict[str, str]:
    """The children compile their modules once, as an installed package does (pip writes
    the .pyc files): PYTHONDONTWRITEBYTECODE would charge every start-up ~100 ms of
    compiling edgegw's source, and turn edgegw's decoder cache off.  Both caches go to
    a temporary directory (the untimed first run fills them, as a user's first run)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPYCACHEPREFIX"] = str(Path(tempfile.gettempdir()) / "stdf-bench-pycache")
    env["EDGEGW_CACHE_DIR"] = str(Path(tempfile.gettempdir()) / "stdf-bench-edgegw-cache")
    return env


def process_seconds(path: Path, runs: int, startup: bool = False) -> dict[str, float]:
    """Median seconds of an ``edgegw stdf stats path`` process and of a pystdf process
    reading and parsing it (CPU time of the child unless --wall), runs interleaved,
    after one run of each that is not timed (it fills the bytecode cache); ``startup``:
    the bare interpreter and edgegw without its decoder cache too."""
    commands = _commands(path, startup)
    times: dict[str, list[float]] = {k: [] for k in commands}
    env = _child_env()
    envs = {k: {**env, "EDGEGW_CACHE_DIR": ""} if k == "edgegw_nocache" else env
            for k in commands}
    for key, cmd in commands.items():
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env=envs[key])
    for _ in range(runs):
        for key, cmd in commands.items():
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            start = time.perf_counter()
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env=envs[key])
            wall = time.perf_counter() - start
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
            times[key].append(wall if WALL else cpu)
    return {k: statistics.median(v) for k, v in times.items()}


def peak_memory(fn: Callable[[], None]) -> int:
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def memory_check(data: bytes, records: int) -> None:
    """A stream 10x the file, fed in chunks, peaks no higher than the file once."""
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
        assert count == records * times, (count, records * times)

    stream(1)  # compile the decoders first: their code is not per-stream memory
    once = peak_memory(lambda: stream(1))
    tenfold = peak_memory(lambda: stream(10))
    print(f"  memory (tracemalloc peak, 64 KiB chunks): 1x {once / 1e6:.2f} MB, "
          f"10x ({10 * len(data) / 1e6:.0f} MB stream) {tenfold / 1e6:.2f} MB "
          f"-> ratio {tenfold / once:.2f}")


def interleaved(fns: dict[str, Callable[[], Any]], runs: int) -> dict[str, float]:
    """Median seconds of each of ``fns``, their runs interleaved (A B C A B C ...): the
    machine's load varies, and this way each one sees the same mix of it."""
    clock = time.perf_counter if WALL else time.process_time
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(runs):
        for key, fn in fns.items():
            set_tail_memo(0 if "nomemo" in key else MEMO_SIZE)  # the figure without the memo
            try:
                # A run repeats the decode until MIN_SAMPLE_S has passed (as timeit's
                # autorange does), each decoder alike: one decode of a small file (1 ms)
                # right after another decoder's run measured that run's cache
                # evictions as much as the decode (metis: 1.3 ms a single cold decode,
                # 0.7 ms each of a run of them).
                calls = 0
                start = clock()
                while True:
                    fn()
                    calls += 1
                    if (took := clock() - start) >= MIN_SAMPLE_S:
                        break
                times[key].append(took / calls)
            finally:
                set_tail_memo(MEMO_SIZE)
    return {k: statistics.median(v) for k, v in times.items()}


#: one A/B run in a child process: argv = path, source dir ("" for this tree, "pystdf");
#: prints the CPU seconds of a decode of the file's rows, memo on then off (the least of
#: three: the machine is shared), after an untimed warm-up (the decoders compile)
AB_CHILD = """
import gzip, importlib.machinery, io, os, sys, time
paths, src = sys.argv[1].split(os.pathsep), sys.argv[2]
files = [open(path, 'rb').read() for path in paths]
files = [gzip.decompress(d) if d[:2] == b'\\x1f\\x8b' else d for d in files]
data = files[0]
if src == 'pystdf':
    from pystdf.IO import Parser
    class Sink:
        def after_send(self, source, data):
            pass
        def __getattr__(self, name):
            return lambda *args: None
    def once():
        for data in files:
            parser = Parser(inp=io.BytesIO(data))
            parser.addSink(Sink())
            parser.parse()
    once()
    best = []
    for _ in range(2):
        start = time.process_time()
        once()
        best.append(time.process_time() - start)
    print(min(best), 0.0)
    raise SystemExit
if src:  # that tree's edgegw, not the one installed (editable) in this venv
    sys.path.insert(0, src)
    sys.meta_path.insert(0, importlib.machinery.PathFinder)
from edgegw.stdf import StdfDecoder
from edgegw.stdf.decoder import MEMO_SIZE, set_tail_memo
assert src in __import__('edgegw').__file__, 'wrong edgegw imported'
def once():
    dec = StdfDecoder()
    dec.feed(data)
    for _ in dec.rows():
        pass
def together():
    # several files at once, as a gateway tails them: a decoder each, fed 64 KiB in
    # turn
    decs = [StdfDecoder() for _ in files]
    for start in range(0, max(map(len, files)), 65536):
        for dec, data in zip(decs, files):
            if start < len(data):
                dec.feed(data[start:start + 65536])
                for _ in dec.rows():
                    pass
if len(files) > 1:
    once = together
times = []
for size in (MEMO_SIZE, 0):
    set_tail_memo(size)
    once()
    best = []
    for _ in range(3):
        start = time.process_time()
        once()
        best.append(time.process_time() - start)
    times.append(min(best))
print(*times)
"""


#: files decoded at once, interleaved (a decoder each, 64 KiB in turn): one whose tails
#: and GDR layouts repeat beside one whose do not, of the same byte order (what each
#: decoder learns must be its own)
PAIRS = (("galaxy-a530-lot2.stdf.gz", "ptr-varied (synthetic)"),
         ("gdr-layouts (synthetic)", "gdr-heavy (synthetic)"))


def _pairs(work: list[tuple[str, Path]]) -> list[tuple[str, Path]]:
    """The PAIRS among ``work``, each as one workload (its paths joined by os.pathsep)."""
    paths = dict(work)
    return [(f"{a} + {b} (interleaved)", Path(f"{paths[a]}{os.pathsep}{paths[b]}"))
            for a, b in PAIRS if a in paths and b in paths]


#: ``edgegw stdf stats`` of the tree in argv[1] as a process (argv[2:]: the command line),
#: started the same way for both trees of an A/B
STATS_CHILD = """
import importlib.machinery, sys
sys.path.insert(0, sys.argv[1])
sys.meta_path.insert(0, importlib.machinery.PathFinder)
from edgegw.cli import main
sys.exit(main(sys.argv[2:]))
"""


def stats_ab(files: list[Path], ref: Path, runs: int, tmp: Path) -> None:
    """``edgegw stdf stats FILE`` of this tree and of ``ref`` and pystdf's read + parse, as
    processes (CPU time of the child), each on FILE and on a file of a FAR and an MRR
    (the start-up, subtracted), all runs interleaved; medians, and each tree's ratio to
    pystdf with the start-up subtracted (and included)."""
    w = StdfWriter("<")
    tiny = tmp / "tiny.stdf"
    tiny.write_bytes(w.encode("FAR", {}) + w.encode("MRR", {"FINISH_T": 0}))
    here = Path(__file__).resolve().parents[1]
    sides = {"main": [sys.executable, "-c", STATS_CHILD, str(ref.resolve()), "stdf", "stats"],
             "this": [sys.executable, "-c", STATS_CHILD, str(here), "stdf", "stats"],
             "pystdf": [sys.executable, "-c", PYSTDF_CHILD]}
    env = _child_env()
    print(f"stats A/B: `edgegw stdf stats` processes of this tree and {ref}, pystdf's read + "
          f"parse; CPU medians of {runs} interleaved runs; start-up: the same on a file of "
          f"a FAR and an MRR; load average {os.getloadavg()[0]:.1f}")
    print("| file | start-up: main / this / pystdf | process: main / this / pystdf | start-up "
          "subtracted: main / this / pystdf | main vs pystdf (subtracted / whole) | this vs "
          "pystdf (subtracted / whole) | this vs main (subtracted / whole) |")
    print("|---|---|---|---|---|---|---|")
    for path in files:
        cmds = {(k, f): [*cmd, str(f)] for k, cmd in sides.items() for f in (tiny, path)}
        times: dict[tuple[str, Path], list[float]] = {k: [] for k in cmds}
        for cmd in cmds.values():  # untimed: fills the bytecode and decoder caches
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env=env)
        for _ in range(runs):
            for key, cmd in cmds.items():
                before = resource.getrusage(resource.RUSAGE_CHILDREN)
                subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env=env)
                after = resource.getrusage(resource.RUSAGE_CHILDREN)
                times[key].append(after.ru_utime - before.ru_utime
                                  + after.ru_stime - before.ru_stime)
        start = {k: statistics.median(times[k, tiny]) for k in sides}
        whole = {k: statistics.median(times[k, path]) for k in sides}
        # floored at 0.1 ms: on a small file it is within the noise
        net = {k: max(whole[k] - start[k], 1e-4) for k in sides}

        def ms(d: dict[str, float]) -> str:
            return " / ".join(f"{d[k] * 1e3:.1f}" for k in sides) + " ms"

        p, pw = net["pystdf"], whole["pystdf"]
        print(f"| {path.name} | {ms(start)} | {ms(whole)} | {ms(net)} | "
              f"{p / net['main']:.1f}x / {pw / whole['main']:.2f}x | "
              f"**{p / net['this']:.1f}x** / {pw / whole['this']:.2f}x | "
              f"{net['main'] / net['this']:.2f}x / {whole['main'] / whole['this']:.2f}x |",
              flush=True)
    print(f"load average at the end {os.getloadavg()[0]:.1f}")


def ab(work: list[tuple[str, Path]], ref: Path, runs: int) -> None:
    """This tree's rows decode against ``ref``'s and pystdf's, each in its own process,
    interleaved run by run (CPU time), medians."""
    sides = {"main": str(ref.resolve()), "branch": "", "pystdf": "pystdf"}
    print(f"A/B: this tree vs {ref} and pystdf, medians of {runs} interleaved runs, each "
          f"the least CPU time of 3 decodes (pystdf 2), load average "
          f"{os.getloadavg()[0]:.1f}")
    print("| workload | records | main: memo / no memo | this: memo / no memo | pystdf | "
          "main vs pystdf (memo / no memo) | this vs pystdf (memo / no memo) | this vs main |")
    print("|---|---:|---:|---:|---:|---|---|---|")
    for label, path in [*work, *_pairs(work)]:
        times: dict[str, list[list[float]]] = {k: [] for k in sides}
        for _ in range(runs):
            for key, src in sides.items():
                out = subprocess.run([sys.executable, "-c", AB_CHILD, str(path), src],
                                     check=True, capture_output=True, text=True).stdout
                times[key].append([float(x) for x in out.split()])
        med = {k: [statistics.median(r[i] for r in v) for i in range(2)]
               for k, v in times.items()}
        (m, mn), (b, bn), (p, _) = med["main"], med["branch"], med["pystdf"]
        records = sum(edgegw_decode(load(Path(p))) for p in str(path).split(os.pathsep))
        print(f"| {label} | {records:,} | {m * 1e3:.0f} / {mn * 1e3:.0f} ms "
              f"| {b * 1e3:.0f} / {bn * 1e3:.0f} ms | {p * 1e3:.0f} ms | {p / m:.1f}x / "
              f"{p / mn:.1f}x | **{p / b:.1f}x** / **{p / bn:.1f}x** | {m / b:.2f}x / "
              f"{mn / bn:.2f}x |", flush=True)
    print(f"load average at the end {os.getloadavg()[0]:.1f}")


def bench_file(label: str, path: Path, runs: int, cli: bool, startup: dict[str, float],
               fixed: float, memory: bool) -> dict[str, Any]:
    data = load(path)
    mb = len(data) / 1e6
    print(f"{label} ({len(data):,} bytes)")
    # one run of each first: compiles the decoders, warms the caches for both sides
    n_ours = edgegw_decode(data)
    n_dict = edgegw_decode(data, rows=False)
    set_tail_memo(0)
    edgegw_decode(data)
    edgegw_decode(data, rows=False)
    set_tail_memo(MEMO_SIZE)
    n_theirs = pystdf_decode(data)
    if not n_ours == n_dict == n_theirs:
        raise SystemExit(f"{label}: record counts differ: edgegw {n_ours}, pystdf {n_theirs}")
    t = interleaved({
        "rows": lambda: edgegw_decode(data),
        "chunks": lambda: edgegw_decode(data, CHUNK),
        "nomemo": lambda: edgegw_decode(data),
        "dict": lambda: edgegw_decode(data, rows=False),
        "dict_nomemo": lambda: edgegw_decode(data, rows=False),
        "pystdf": lambda: pystdf_decode(data),
    }, runs)
    theirs = t["pystdf"]
    print(f"  records: {n_ours:,}; median of {runs} interleaved runs "
          f"({'wall' if WALL else 'CPU'} time; a run repeats its decode for at least "
          f"{MIN_SAMPLE_S * 1000:g} ms and counts the time per decode)")
    for name, key in (("edgegw rows (one feed)", "rows"),
                      ("edgegw rows (64 KiB chunks)", "chunks"),
                      ("edgegw rows (no tail memo)", "nomemo"),
                      ("edgegw dicts (one feed)", "dict"),
                      ("edgegw dicts (no tail memo)", "dict_nomemo"), ("pystdf", "pystdf")):
        secs = t[key]
        ratio = "" if key == "pystdf" else f"  {theirs / secs:5.1f}x pystdf"
        print(f"    {name:28} {n_ours / secs:>12,.0f} records/s {mb / secs:>8.1f} MB/s"
              f"  ({secs * 1e3:7.1f} ms){ratio}")
    row = {"file": label, "records": n_ours, **t}
    if cli:
        read, _ = timed(lambda: load(path), runs)
        stats = stats_seconds(path, runs)
        whole = stats_seconds(path, runs, parse=True)
        pystdf_stats = read + theirs
        procs = process_seconds(path, runs)
        # start-up subtracted; floored at 0.1 ms (on a small file it is within the noise)
        net = {k: max(procs[k] - startup[k], 1e-4) for k in procs}
        # the interpreter subtracted: each side's own imports and start-up included
        own = {k: max(procs[k] - startup["python"], 1e-4) for k in procs}
        row.update(stats=stats, whole=whole, pystdf_stats=pystdf_stats, procs=procs, net=net,
                   own=own)
        print(f"  edgegw stdf stats: {stats * 1e3:.1f} ms without start-up, "
              f"{whole * 1e3:.1f} ms with the argument parsing (the whole `main`; a FAR and "
              f"an MRR take {fixed * 1e3:.1f} ms); pystdf read + parse "
              f"{pystdf_stats * 1e3:.1f} ms -> {pystdf_stats / stats:.1f}x "
              f"({pystdf_stats / whole:.1f}x the whole `main`)")
        print(f"  as processes: edgegw {procs['edgegw'] * 1e3:.0f} ms, pystdf "
              f"{procs['pystdf'] * 1e3:.0f} ms -> {procs['pystdf'] / procs['edgegw']:.1f}x; "
              f"start-up subtracted (edgegw {startup['edgegw'] * 1e3:.0f} ms, pystdf "
              f"{startup['pystdf'] * 1e3:.0f} ms): {net['edgegw'] * 1e3:.1f} ms vs "
              f"{net['pystdf'] * 1e3:.1f} ms -> {net['pystdf'] / net['edgegw']:.1f}x; the "
              f"interpreter ({startup['python'] * 1e3:.0f} ms) subtracted: "
              f"{own['edgegw'] * 1e3:.1f} ms vs {own['pystdf'] * 1e3:.1f} ms -> "
              f"{own['pystdf'] / own['edgegw']:.1f}x")
    if memory:
        memory_check(data, n_ours)
    return row


def interpreter() -> str:
    """The interpreter these figures belong to: its version, compiler and whether its
    libpython is a shared library.  Both decoders' speed depends on the build as much as on
    the version (docs/performance.md, "The decoder and the interpreter's build"): a shared
    libpython on 3.12+ reaches its thread state through ``__tls_get_addr`` at every
    allocation; a distribution's static, profile-optimised build does not."""
    impl = f"{sys.implementation.name} {sys.version.split()[0]}"
    compiler = sys.version.split("[")[-1].rstrip("]")
    try:
        with open("/proc/self/maps") as maps:
            shared = sorted({line.split()[-1] for line in maps if "/libpython" in line})
    except OSError:  # not Linux: the build is not looked at
        return f"{impl} [{compiler}]"
    build = f"libpython shared ({shared[0]})" if shared else "libpython linked in (static)"
    return f"{impl} at {sys.executable}, {build}, [{compiler}]"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="*", type=Path)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--wall", action="store_true", help="time with the wall clock")
    parser.add_argument("--min-sample-ms", type=float, default=20.0,
                        help="each timed run repeats a decode for at least this long and "
                             "counts the time per decode (0: one decode a run, cold caches "
                             "on small files)")
    parser.add_argument("--no-shapes", action="store_true",
                        help="without the synthetic shapes of bench/stdf_corpus.py")
    parser.add_argument("--no-cli", action="store_true", help="without `edgegw stdf stats`")
    parser.add_argument("--ab", type=Path, metavar="DIR",
                        help="A/B against the edgegw source in DIR (and pystdf) only")
    parser.add_argument("--stats-ab", type=Path, metavar="DIR",
                        help="A/B of `edgegw stdf stats` processes against the edgegw "
                             "source in DIR (and pystdf) on the real files only")
    args = parser.parse_args()
    global WALL, MIN_SAMPLE_S
    WALL = args.wall
    MIN_SAMPLE_S = args.min_sample_ms / 1000
    files = args.files or sorted(p for p in shared_data().glob("*")
                                 if p.is_file() and not p.name.endswith(".md"))
    for f in files:
        if not f.exists():
            print(f"no such file: {f}", file=sys.stderr)
            return 1
    print(f"interpreter: {interpreter()}")
    from edgegw.stdf.decoder import accelerator_active

    # the `stats` processes inherit EDGEGW_STDF_ACCEL, so they use the same loop
    print("STDF record loop: " + ("compiled (edgegw/stdf/_accel.c)" if accelerator_active()
                                  else "pure Python (EDGEGW_STDF_ACCEL=0, or not built)"))
    with tempfile.TemporaryDirectory(prefix="stdf-bench-") as tmp:
        work = [(f.name, f) for f in files]
        if not args.no_shapes and not args.files:
            for name, build in SHAPES.items():
                path = Path(tmp) / f"{name}.stdf"
                path.write_bytes(build())
                work.append((f"{name} (synthetic)", path))
        if args.ab:
            ab(work, args.ab, args.runs)
            return 0
        if args.stats_ab:
            stats_ab(files, args.stats_ab, args.runs, Path(tmp))
            return 0
        startup: dict[str, float] = {}
        fixed = 0.0
        if not args.no_cli:
            w = StdfWriter("<")
            tiny = Path(tmp) / "tiny.stdf"
            tiny.write_bytes(w.encode("FAR", {}) + w.encode("MRR", {"FINISH_T": 0}))
            # more runs: every file's process figure has this subtracted
            startup = process_seconds(tiny, 2 * args.runs + 1, startup=True)
            fixed = stats_seconds(tiny, args.runs, parse=True)
            print(f"start-up (a file of a FAR and an MRR): an edgegw stdf stats process "
                  f"{startup['edgegw'] * 1e3:.0f} ms ({startup['edgegw_nocache'] * 1e3:.0f} "
                  f"ms without its decoder cache), a pystdf process "
                  f"{startup['pystdf'] * 1e3:.0f} ms, the bare interpreter (python -c pass) "
                  f"{startup['python'] * 1e3:.0f} ms; the whole `main` in this process "
                  f"{fixed * 1e3:.1f} ms")
        print(f"load average at the start {os.getloadavg()[0]:.1f}")
        rows = [bench_file(label, path, args.runs, not args.no_cli, startup, fixed, i == 0)
                for i, (label, path) in enumerate(work)]
    print()
    print(f"load average at the end {os.getloadavg()[0]:.1f} (1-minute; the machine is shared)")
    print("| file | records | rows: one feed | 64 KiB chunks | no tail memo | dicts | "
          "dicts, no memo | pystdf | rows vs pystdf (feed / chunks / no memo) | "
          "dicts vs pystdf (memo / no memo) |" +
          (" `stats` vs pystdf: command / whole `main` | `stats` process vs pystdf's: "
           "start-up subtracted / interpreter subtracted / included |"
           if not args.no_cli else ""))
    print("|---|---:|---:|---:|---:|---:|---:|---:|---|---|" +
          ("---|---|" if not args.no_cli else ""))
    for r in rows:
        p = r["pystdf"]
        line = (f"| {r['file']} | {r['records']:,} | {r['rows'] * 1e3:.0f} ms | "
                f"{r['chunks'] * 1e3:.0f} ms | {r['nomemo'] * 1e3:.0f} ms | "
                f"{r['dict'] * 1e3:.0f} ms | {r['dict_nomemo'] * 1e3:.0f} ms | {p * 1e3:.0f} ms"
                f" | **{p / r['rows']:.1f}x** / {p / r['chunks']:.1f}x / "
                f"**{p / r['nomemo']:.1f}x** | {p / r['dict']:.1f}x / "
                f"{p / r['dict_nomemo']:.1f}x |")
        if "stats" in r:
            ps, procs, net, own = r["pystdf_stats"], r["procs"], r["net"], r["own"]
            line += (f" {r['stats'] * 1e3:.1f} / {r['whole'] * 1e3:.1f} ms vs "
                     f"{ps * 1e3:.0f} ms: {ps / r['stats']:.1f}x / **{ps / r['whole']:.1f}x** |"
                     f" {net['edgegw'] * 1e3:.0f} vs {net['pystdf'] * 1e3:.0f} ms: "
                     f"**{net['pystdf'] / net['edgegw']:.1f}x** / {own['edgegw'] * 1e3:.0f} vs "
                     f"{own['pystdf'] * 1e3:.0f} ms: {own['pystdf'] / own['edgegw']:.1f}x / "
                     f"{procs['edgegw'] * 1e3:.0f} "
                     f"vs {procs['pystdf'] * 1e3:.0f} ms: {procs['pystdf'] / procs['edgegw']:.1f}x"
                     " |")
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
