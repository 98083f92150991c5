"""What one fan-out tick costs the hub's thread, per client: CPU time, not wall time, so
the figure holds on a machine shared with other work (bench/fanout.py measures latency,
which such a machine spoils).

    python bench/fanout_tick.py [--clients 1000] [--ticks 200] [--runs 3] [--compare]

A hub process serves ``/ws/live`` (the real HTTP layer and ``LiveFanout``, no ingest)
to ``--clients`` subscribers in other processes (``bench/fanout.py``'s bare WebSocket
clients, subscribed like the dashboard).  Before each tick it publishes what 10,000
records/s make in one UI interval: a delta of a few dies on each of 4 wafer maps, the
lot's counts and 8 test statistics.  Then it runs the tick itself (``LiveFanout.tick``:
the core's deciding and encoding, then one write per client) and notes its thread CPU
time; between ticks it sleeps the rest of the interval, so that the clients read and the
sockets drain as in service.  ``--compare`` alternates runs of the hub of ``--before`` (a
git revision: main) and of this tree, as ``bench/fanout.py --compare`` does.

The tick runs as the hub runs it (``LiveFanout.tick_async``): where the writes go to a
worker thread, the Trio thread's CPU per tick leaves them out, and the process's CPU per
tick (``time.process_time``: every thread) puts them back in; both are printed, with the
wall time from the tick's start to its last write.  ``--writer-thread``: this tree's
hub hands its writes to a writer thread (``LiveFanout.write_in_thread``, off by default).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def publisher(publish: Any) -> Any:
    """What 10,000 records/s publish in one UI interval (20/s): a delta of 6 dies on each
    of 4 wafer maps, the lot's counts, 8 test statistics -- 13 topics."""
    n = 0
    wafers = [f"lot/L1/wafer/{w}" for w in range(1, 5)]
    tests = [f"test/L1/{t}" for t in range(1000, 1008)]

    def publish_all() -> None:
        nonlocal n
        n += 1
        now = time.time()
        for w in wafers:
            publish(w, {"dies": [[n % 30, k, 1, 1, True] for k in range(6)],
                        "counts": {"tested": n * 6, "passed": n * 5}, "updated": now}, now)
        publish("lot/L1", {"parts": n * 24, "yield": 0.9, "updated": now}, now)
        for t in tests:
            publish(t, {"n": n * 24, "mean": 1.0 + n * 1e-6, "sd": 0.1, "min": 0.5,
                        "max": 1.5}, now)

    return publish_all


def core_alone(clients: int, ticks: int) -> float:
    """The sans-IO core's tick alone (deciding, encoding, queueing; no sockets): median
    thread CPU seconds per tick."""
    from edgegw.hub.fanout import CBOR, LiveHub

    class Source:
        def snapshot(self, topic: str) -> dict[str, Any]:
            return {"x": 1}

        def topics(self) -> list[str]:
            return list(hub.channels)

    hub = LiveHub(Source(), epoch="e")
    publish_all = publisher(hub.publish)
    publish_all()
    conns = [hub.connect(CBOR, now=0.0) for _ in range(clients)]
    sub = '{"type": "subscribe", "topics": ["lot/+", "lot/+/wafer/+", "test/+/+", "gateway/+"]}'
    for c in conns:
        hub.receive(c, sub, 0.0)
    cpu: list[float] = []
    for i in range(ticks + 10):
        publish_all()
        t0 = time.thread_time()
        hub.tick(float(i), time.time())
        took = time.thread_time() - t0
        if i >= 10:
            cpu.append(took)
        for c in conns:  # as the writes would: the queues drain
            while hub.take_frame(c) is not None:
                hub.frame_written(c, float(i))
    assert all(len(c.positions) == 13 for c in conns)
    return statistics.median(cpu)


def run_hub(args: argparse.Namespace) -> None:
    import trio

    from edgegw.hub.fanout import LiveConfig, LiveFanout
    from edgegw.metrics import Metrics
    from edgegw.web.server import HttpLimits, HttpServer

    async def main() -> None:
        fanout = LiveFanout(LiveConfig(ui_rate=args.ui_rate, stall_timeout=60.0),
                            metrics=Metrics())
        http = HttpServer(HttpLimits(max_connections_per_address=0), raise_fd_limit=True)
        fanout.install(http)
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(http.serve, "127.0.0.1", 0)
            port = listeners[0].socket.getsockname()[1]
            print(f"PORT {port}", flush=True)
            publish = publisher(fanout.publish)
            publish()  # the topics exist before the clients subscribe
            while True:  # until every client has subscribed and got its snapshots
                await trio.sleep(0.2)
                fanout.tick()
                if (len(fanout.core.clients) >= args.clients
                        and all(len(c.positions) >= 13 and not c.todo
                                for c in fanout.core.clients.values())):
                    break
            print("SUBSCRIBED", flush=True)
            fanout.core_seconds = 0.0
            fanout.ticks = 0
            interval = 1 / args.ui_rate
            if args.writer_thread:
                fanout.write_in_thread = True
            cpu: list[float] = []  # the Trio thread's CPU per tick
            proc: list[float] = []  # the process's (every thread's) CPU per tick
            wall: list[float] = []  # the tick's start to its last write
            for i in range(args.ticks + 20):
                publish()
                w0, p0 = time.perf_counter(), time.process_time()
                took, _sent = await fanout.tick_async()
                p1, w1 = time.process_time(), time.perf_counter()
                if i >= 20:  # warm-up ticks left out
                    cpu.append(took)
                    proc.append(p1 - p0)
                    wall.append(w1 - w0)
                await trio.sleep(max(0.0, interval - (w1 - w0)))
            core = fanout.core_seconds / max(1, fanout.ticks)
            sent = sum(c.frames_sent for c in fanout.core.clients.values())
            alone = core_alone(args.clients, 100)
            stats = fanout.stats()
            print("BATCH " + " ".join(f"{k}={stats.get(k)}" for k in (
                "write_batches", "write_batch_frames_mean", "write_batch_ms_mean",
                "write_batch_cpu_ms_mean", "write_batch_partial")), flush=True)
            print(f"RESULT {statistics.median(cpu)} {max(cpu)} {core} {sent} {alone} "
                  f"{statistics.median(proc)} {statistics.median(wall)}", flush=True)
            nursery.cancel_scope.cancel()

    import resource
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 65536), hard))
    trio.run(main)


def one_run(args: argparse.Namespace, before: Path | None) -> dict[str, Any] | None:
    env = dict(os.environ)
    if before is not None:
        env["PYTHONPATH"] = str(before)
    me = [sys.executable, __file__]
    hub = subprocess.Popen([*me, "--role", "hub", "--clients", str(args.clients),
                            "--ticks", str(args.ticks), "--ui-rate", str(args.ui_rate),
                            *(["--writer-thread"] if args.writer_thread and before is None
                              else [])],
                           stdout=subprocess.PIPE, text=True, env=env)
    subs: list[subprocess.Popen[str]] = []
    tmp = Path(tempfile.mkdtemp(prefix="edgegw-bench-tick-"))
    try:
        assert hub.stdout is not None
        port = int(hub.stdout.readline().split()[1])
        procs = max(2, -(-args.clients // 250))
        subs = [subprocess.Popen([sys.executable, str(HERE / "fanout.py"), "--role", "subs",
                                  "--port", str(port), "--clients", str(args.clients),
                                  "--procs", str(procs), "--index", str(p),
                                  "--sample-step", "1000000",
                                  "--log", str(tmp / f"subs{p}.pickle")],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
                for p in range(procs)]
        batch = ""
        for line in hub.stdout:
            if line.startswith("BATCH") and "write_batches=None" not in line \
                    and "write_batches=0 " not in line:
                batch = line[6:].strip()
            if line.startswith("RESULT"):
                median, longest, core, sent, alone, proc, wall = (
                    float(v) for v in line.split()[1:])
                return {"median_ms": 1000 * median, "max_ms": 1000 * longest,
                        "core_ms": 1000 * core, "alone_ms": 1000 * alone,
                        "us_per_client": 1e6 * median / args.clients, "frames": sent,
                        "proc_ms": 1000 * proc, "wall_ms": 1000 * wall,
                        "load": os.getloadavg()[0], "batch": batch}
        return None
    finally:
        for p in (hub, *subs):
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    p.kill()
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--role", choices=["main", "hub"], default="main")
    ap.add_argument("--clients", type=int, default=1000)
    ap.add_argument("--ticks", type=int, default=200)
    ap.add_argument("--ui-rate", type=float, default=20.0)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--compare", action="store_true")
    ap.add_argument("--before", default="main")
    ap.add_argument("--writer-thread", action="store_true",
                    help="this tree's hub hands its ticks' writes to a writer thread "
                         "(LiveFanout.write_in_thread)")
    args = ap.parse_args()
    if args.role == "hub":
        run_hub(args)
        return 0
    sys.path.insert(0, str(HERE))
    from fanout import export_tree

    before = export_tree(args.before) if args.compare else None
    try:
        return measure(args, before)
    finally:
        if before is not None:
            shutil.rmtree(before, ignore_errors=True)


def measure(args: argparse.Namespace, before: Path | None) -> int:
    variants = ["before", "after"] if args.compare else ["after"]
    results: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
    for run in range(args.runs):
        for v in variants if run % 2 == 0 else variants[::-1]:  # each side first in turn
            r = one_run(args, before if v == "before" else None)
            if r is None:
                print(f"run {run + 1} ({v}) failed", file=sys.stderr)
                return 1
            print(f"run {run + 1}, {v}: Trio thread CPU per tick, median {r['median_ms']:.2f} ms "
                  f"({r['us_per_client']:.1f} us per client; deciding and encoding "
                  f"{r['core_ms']:.2f} ms wall), longest {r['max_ms']:.1f} ms; process CPU "
                  f"per tick {r['proc_ms']:.2f} ms; tick wall {r['wall_ms']:.2f} ms; the core "
                  f"alone {r['alone_ms']:.2f} ms CPU; load average {r['load']:.1f}", flush=True)
            if r["batch"]:
                print(f"  its writer thread: {r['batch']}", flush=True)
            results[v].append(r)
    print(f"\nmedians of {args.runs} run(s), {args.clients} clients, {args.ticks} ticks each:")
    for key, label in (("median_ms", "tick, Trio thread CPU, ms"),
                       ("us_per_client", "  per client, us"),
                       ("proc_ms", "tick, process CPU (all threads), ms"),
                       ("wall_ms", "tick, start to last write, ms wall"),
                       ("core_ms", "deciding and encoding, ms (wall)"),
                       ("alone_ms", "the core alone, no sockets, ms CPU"),
                       ("load", "load average")):
        row = "  ".join(f"{v} {statistics.median(r[key] for r in results[v]):8.2f}"
                        for v in variants)
        print(f"  {label:38} {row}")
    if args.compare:
        for key, label in (("median_ms", "Trio thread CPU"), ("proc_ms", "process CPU"),
                           ("wall_ms", "tick wall"), ("alone_ms", "the core alone")):
            b = statistics.median(r[key] for r in results["before"])
            a = statistics.median(r[key] for r in results["after"])
            print(f"  after / before ({label}): {a / b:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
