"""Benchmark: what LiveState costs per record, one record at a time (before) and batched.

Feeds record streams through ``LiveState.on_records`` in frames of --frame records, the
way the hub applies them, with a publish callback that only counts, both ways side by
side in one run (interleaved, so load drifts hit both):

* ``one at a time``: ``LiveState(batch_apply=False)``, every record through its handler
  (what the hub did before; the reference the batched apply is tested against);
* ``batched``: the default, a frame's parametric results kept per test and applied a test
  at a time (``LiveState._apply_batched``).

Streams: a simulated multi-site lot (parts with their parametric results), the same with
an alert engine holding one rule of every kind, and the real tester files in
``shared/data/stdf`` (decoded and mapped beforehand) when present.  For each: CPU µs per
record (``time.process_time``, median of --runs, a fresh state per run), the ratio, and
whether the two states are equal (``checkpoint.capture``).  ``--kinds`` adds each record
kind's marginal cost: the stream's CPU time minus the same stream's without that kind,
per record of the kind (a part result's includes assigning its part's values to wafer
and die).  ``--stages`` prints the hub's per-record stages for the tester mix (decode,
durable store commit, live apply, publish to the fan-out) in CPU time.

``--path`` measures instead the hub's live path as its feeder runs it (issue 17 item 4):
each stream in columnar frames of --frame records (8,000: the gateway's default under a
flood), each frame's body checked as the hub checks it on arrival (not counted), then
handed to a fresh state the way the feeder does (counted): ``LiveState.on_columns`` where
the state has it, else the frame's records built and ``on_records``.  ``--baseline DIR``
runs the same, alternately, with another checkout's ``edgegw`` (``PYTHONPATH=DIR``, e.g.
``git archive trial | tar -x -C DIR``), each run in a process of its own: before and
after in one run, medians and the ratio.

    python bench/live_state.py [--runs 5] [--frame 2000] [--wafers 4] [--kinds] [--stages]
``--order`` measures what frames out of record-id order cost (docs/live-topics.md,
"Frames out of order"): the simulated lot in frames of --frame records applied in order,
in the order a gateway sends them after an outage (``SendScheduler``: the second half
first, then the backlog) and every other frame first; CPU µs per record, medians of
--runs, interleaved; and whether each state equals the in-order one.

``--unwatched`` measures what a batch's updates cost when nobody follows their topics
(docs/live-topics.md, "Unwatched topics"): the simulated lot (with and without the 8 alert
rules) in frames of --frame records, a fresh state per run, every topic wanted (``all``:
what a state without ``wanted`` does) and none (``none``: ``wanted`` says no to every
topic), each in a process of its own, alternately; with ``--baseline DIR`` another
checkout's ``all`` too (``base``: e.g. ``git archive trial``).  CPU µs/record, medians.

``--alternating`` measures what a frame that follows no previous one of its gateway costs
when other gateways' values wait (issue: a switch of stretch once scanned every lot's
waiting lists): another gateway keeps a full set of waiting lists (4,096 sites of values,
no part result) in each of --pending-lots other lots, then the simulated lot goes in in
frames of --frame records, in order and pairwise swapped (2, 1, 4, 3, ...: every frame
starts or joins a stretch), the two states taking turns pair by pair; CPU µs per frame,
median over the pairs, then the median of --runs processes; and whether the swapped state
equals the in-order one.  ``--own``: the waiting lists are the alternating gateway's own
(its first frame, before the lot's).  ``--baseline DIR`` runs the same with another
checkout's ``edgegw`` alternately, as ``--path`` does.

    python bench/live_state.py [--runs 5] [--frame 2000] [--wafers 4] [--kinds] [--stages]
    python bench/live_state.py --path [--runs 5] [--frame 8000] [--baseline DIR]
    python bench/live_state.py --order [--runs 5] [--frame 2000]
    python bench/live_state.py --unwatched [--runs 5] [--frame 2000] [--baseline DIR]
    python bench/live_state.py --alternating [--runs 5] [--frame 100] [--pending-lots 4]
        [--own] [--baseline DIR]
"""

from __future__ import annotations

import argparse
import functools
import gc
import gzip
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edgegw.hub.alerts import AlertEngine, AlertRuleConfig, AlertsConfig
from edgegw.hub.checkpoint import capture
from edgegw.hub.live import LiveState
from edgegw.records import LotEnd, LotStart, ParametricResult, PartResult, WaferEnd, WaferStart
from edgegw.sim.tester import TesterModel, TesterProfile

RULES = AlertsConfig(rules=[
    AlertRuleConfig(name="wy", kind="wafer_yield", threshold=0.5, min_parts=100),
    AlertRuleConfig(name="ly", kind="lot_yield", threshold=0.5, min_parts=100),
    AlertRuleConfig(name="cf", kind="consecutive_fails", count=20),
    AlertRuleConfig(name="gap", kind="site_yield_gap", threshold=0.3, min_parts=50),
    AlertRuleConfig(name="sbl", kind="bin_share", min_parts=100),
    AlertRuleConfig(name="cpk", kind="test_cpk", threshold=0.1, min_samples=30),
    AlertRuleConfig(name="temp", kind="sensor_range", high=100.0),
    AlertRuleConfig(name="gw", kind="gateway_offline", offline_s=60),
])

MODES = {"one at a time": False, "batched": True}


def sim_records(wafers: int) -> list[Any]:
    profile = TesterProfile(lot_id="BENCH", sites=8, wafers=wafers, wafer_diameter_dies=40,
                            tests_per_part=8, seed=11)
    out: list[Any] = []
    ts = 1_000.0
    for ev in TesterModel(profile).events():
        ts += 0.01
        if ev.kind == "lot_start":
            out.append(LotStart("sim", ts, "BENCH", profile.part_type))
        elif ev.kind == "wafer_start":
            out.append(WaferStart("sim", ts, "BENCH", ev.data))
        elif ev.kind == "touchdown":
            for p in ev.data:
                out.extend(ParametricResult("sim", ts, "BENCH", 1, p.site, p.part_id,
                                            t.test_num, t.test_txt, t.value, t.lo, t.hi,
                                            t.units, t.passed) for t in p.tests)
                out.append(PartResult("sim", ts, "BENCH", p.wafer_id, 1, p.site, p.part_id,
                                      p.x, p.y, p.hard_bin, p.soft_bin, p.passed, p.retest,
                                      1 if p.retest else 0, p.test_time_ms, len(p.tests)))
        elif ev.kind == "wafer_end":
            d = ev.data
            out.append(WaferEnd("sim", ts, "BENCH", d["wafer_id"], 1, 0, d["parts"],
                                d["good"]))
        elif ev.kind == "lot_end":
            out.append(LotEnd("sim", ts, "BENCH"))
    return out


def file_records() -> list[tuple[str, list[Any]]]:
    """The real tester files of shared/data/stdf, decoded and mapped (name, records)."""
    root = os.environ.get("EDGEGW_SHARED_DATA")
    base = Path(root) if root else Path(__file__).resolve().parents[2] / "shared" / "data"
    from edgegw.stdf import StdfDecoder
    from edgegw.stdf.mapping import RecordMapper

    out = []
    for path in sorted((base / "stdf").glob("*.std*")):
        data = path.read_bytes()
        if path.suffix == ".gz":
            data = gzip.decompress(data)
        decoder = StdfDecoder()
        decoder.feed(data)
        mapper = RecordMapper("file")
        out.append((f"{path.name} (real file)",
                    mapper.map_all(decoder.records(), 1.0) + mapper.close(1.0)))
    return out


def run(records: list[Any], frame: int, alerts: bool, batch_apply: bool
        ) -> tuple[float, int, int, LiveState]:
    """CPU seconds to apply ``records`` to a fresh state, deltas published, frames."""
    published = 0

    def publish(topic: str, delta: dict[str, Any]) -> None:
        nonlocal published
        published += 1

    engine = AlertEngine(RULES, publish) if alerts else None
    state = LiveState(publish, alerts=engine, clock=lambda: 5_000.0, batch_apply=batch_apply)
    frames = [records[i : i + frame] for i in range(0, len(records), frame)]
    gc.collect()
    t0 = time.process_time()
    rid = 1
    for batch in frames:
        state.on_records("gw", rid, batch)
        rid += len(batch)
    return time.process_time() - t0, published, len(frames), state


def medians(records: list[Any], frame: int, alerts: bool, runs: int) -> dict[str, float]:
    """Median CPU seconds per mode, the modes' runs interleaved."""
    times: dict[str, list[float]] = {m: [] for m in MODES}
    for _ in range(runs):
        for mode, batched in MODES.items():
            times[mode].append(run(records, frame, alerts, batched)[0])
    return {m: statistics.median(t) for m, t in times.items()}


def per_kind(records: list[Any], frame: int, alerts: bool, runs: int,
             whole: dict[str, float]) -> None:
    counts = Counter(type(r) for r in records)
    for kind, n in counts.most_common():
        if n < 20:  # too few for a figure above the noise
            continue
        without = medians([r for r in records if type(r) is not kind], frame, alerts, runs)
        cost = {m: (whole[m] - without[m]) / n * 1e6 for m in MODES}
        ratio = (f"{cost['one at a time'] / cost['batched']:>6.2f}x"
                 if cost["batched"] > 0 else "")
        print(f"    {kind.__name__:22s} {n:>8d}  "
              + "  ".join(f"{cost[m]:>8.2f}" for m in MODES) + f"  {ratio}")


def stages(runs: int, frame: int) -> None:
    """The hub's stages per record, CPU time, the tester mix (bench/hub_floor.py)."""
    import trio
    from hub_floor import tester_mix

    from edgegw.config import build
    from edgegw.hub.app import Hub
    from edgegw.hub.config import HubConfig
    from edgegw.hub.store import FrameToApply, HubStore
    from edgegw.protocol import decode_frame, encode_columns

    records = tester_mix(20_000)
    n = len(records)
    frames = [records[i:i + frame] for i in range(0, n, frame)]
    bodies = [encode_columns(1 + i * frame, f) for i, f in enumerate(frames)]

    def cpu(fn: Callable[[], Any]) -> float:
        times = []
        for _ in range(runs):
            gc.collect()
            t = time.process_time()
            fn()
            times.append(time.process_time() - t)
        return statistics.median(times) / n * 1e6

    cost: dict[str, float] = {}
    cost["decode v2 body to records"] = cpu(lambda: [decode_frame(b, frame) for b in bodies])
    with tempfile.TemporaryDirectory() as tmp:
        seq = 0

        async def commit_all() -> None:
            nonlocal seq
            store = HubStore(Path(tmp) / f"hub{seq}.sqlite3")
            await store.open()
            try:
                for i in range(0, len(bodies), 8):  # group commit of 8 frames, as a busy hub
                    group = []
                    for j, b in enumerate(bodies[i:i + 8]):
                        seq += 1
                        group.append(FrameToApply("bench", "e", seq, 1 + (i + j) * frame,
                                                  frame, b, records=frames[i + j]))
                    await store.commit(group)
            finally:
                await store.close()

        cost["durable store commit (SQLite, pack_body)"] = cpu(lambda: trio.run(commit_all))
        def feed(state: LiveState) -> None:
            gw = state.gateways.get("bench")
            rid = gw.last_rid + 1 if gw is not None and gw.last_rid else 1
            for f in frames:  # rids go on: a warm state's dies are tested again, as retests
                state.on_records("bench", rid, f)
                rid += len(f)

        for batched in (False, True):
            label = "batched" if batched else "one at a time"
            quiet = functools.partial(LiveState, lambda t, d: None, clock=lambda: 5_000.0,
                                      batch_apply=batched)
            cost[f"live apply, {label}"] = cpu(lambda q=quiet: feed(q()))  # type: ignore[misc]
            hub = Hub(build(HubConfig, {"hub": {"port": 0, "data_dir": tmp}}))
            hub.state.batch_apply = batched
            feed(hub.state)  # warm: the lot, wafer and tests exist, as in a running hub
            cost[f"live apply + publish + alerts (hub), {label}"] = cpu(
                functools.partial(feed, hub.state))
    cost["hand-off of the bodies to another process (pipe)"] = cpu(
        functools.partial(pipe_out, bodies))
    print(f"hub stages, tester mix ({n:,} records, frames of {frame}), CPU µs/record, "
          f"median of {runs}:")
    for name, c in cost.items():
        print(f"  {name:52s} {c:8.2f}  ({1e6 / c:>10,.0f} records/s alone)")
    decode = cost["decode v2 body to records"]
    for mode in ("one at a time", "batched"):
        live = cost[f"live apply + publish + alerts (hub), {mode}"]
        print(f"  Trio thread (decode + live state), {mode}: {decode + live:.2f} µs/record = "
              f"{1e6 / (decode + live):,.0f} records/s")
    live = cost["live apply + publish + alerts (hub), batched"]
    hand_off = cost["hand-off of the bodies to another process (pipe)"]
    print(f"  live state in its own process (batched): hub Trio thread (decode + hand-off) "
          f"{decode + hand_off:.2f} µs/record; live process (decode again + apply) "
          f"{decode + live:.2f} µs/record = {1e6 / (decode + live):,.0f} records/s; both "
          f"{2 * decode + hand_off + live:.2f} µs/record of CPU against {decode + live:.2f} "
          "in one process")


def pipe_out(bodies: list[bytes]) -> None:
    """Each body, length-prefixed, into a pipe that another process drains (discards)."""
    r, w = os.pipe()
    child = subprocess.Popen([sys.executable, "-c", "import os, sys\n"
                              "while os.read(int(sys.argv[1]), 1 << 20): pass", str(r)],
                             pass_fds=(r,))
    os.close(r)
    try:
        for body in bodies:
            view = memoryview(len(body).to_bytes(4, "big") + body)
            while view:
                view = view[os.write(w, view):]
    finally:
        os.close(w)
        child.wait()


def flood_records(parts: int = 64, repeats: int = 300) -> list[Any]:
    """``bench/gateway_hub.py``'s stream: 8 parametric results and a part result per part,
    the same 64 parts (dies) over and over -- every part after the first 64 a retest."""
    from gateway_hub import make_part

    made = [make_part(i) for i in range(parts)]
    return [r for _ in range(repeats) for p in made for r in p]


def path_streams(wafers: int) -> dict[str, list[Any]]:
    streams = {"gateway_hub.py flood (retests)": flood_records(),
               "simulated lot (8 sites)": sim_records(wafers)}
    streams.update(file_records())
    return streams


def path_run(stream: str, frame: int, wafers: int) -> float:
    """CPU µs per record of the live path for ``stream``, one fresh state (see --path)."""
    from edgegw.protocol import check_frame, encode_columns

    records = path_streams(wafers)[stream]
    bodies = [encode_columns(1 + i, records[i:i + frame])
              for i in range(0, len(records), frame)]
    state = LiveState(lambda topic, delta: None, clock=lambda: 5_000.0)
    columns = getattr(state, "on_columns", None)
    gc.collect()
    cpu = 0.0
    rid = 1
    for body in bodies:
        decoded = check_frame(body, len(records))[1]  # on arrival: not counted
        t0 = time.process_time()
        if columns is not None:
            columns("bench", rid, decoded)
        else:
            state.on_records("bench", rid, decoded.records())
        cpu += time.process_time() - t0
        rid += decoded.n
        del decoded
    return cpu / len(records) * 1e6


def path_ab(runs: int, frame: int, wafers: int, baseline: str | None) -> None:
    """Each stream's live path, this checkout and (``baseline``) another, alternately."""
    codes: dict[str, str | None] = {"this": None}
    if baseline:
        codes = {"base": str(Path(baseline).resolve()), "this": None}
    print(f"live path (columnar frames of {frame}, checked; then the feeder's hand-off and "
          f"the live state), CPU µs/record, median of {runs}, alternating; load average "
          f"{os.getloadavg()[0]:.1f}")
    for stream in path_streams(wafers):
        us: dict[str, list[float]] = {c: [] for c in codes}
        for _ in range(runs):
            for label, code in codes.items():
                env = None if code is None else {**os.environ, "PYTHONPATH": code}
                out = subprocess.run(
                    [sys.executable, __file__, "--serve-path",
                     json.dumps({"stream": stream, "frame": frame, "wafers": wafers})],
                    env=env, check=True, capture_output=True, text=True).stdout
                us[label].append(float(out.split()[-1]))
        med = {c: statistics.median(v) for c, v in us.items()}
        line = f"  {stream:38s} " + "  ".join(f"{c} {m:6.2f}" for c, m in med.items())
        if baseline:
            line += (f"  ratio {med['base'] / med['this']:.2f}x  (runs: base "
                     + "/".join(f"{v:.2f}" for v in us["base"]) + ", this "
                     + "/".join(f"{v:.2f}" for v in us["this"]) + ")")
        print(line, flush=True)
    print(f"load average after: {os.getloadavg()[0]:.1f}")


def unwatched_run(frame: int, wafers: int, alerts: bool, mode: str) -> float:
    """CPU µs per record of the simulated lot applied with every topic wanted (``all``) or
    none (``none``)."""
    records = sim_records(wafers)
    published = 0

    def publish(topic: str, delta: dict[str, Any]) -> None:
        nonlocal published
        published += 1

    engine = AlertEngine(RULES, publish) if alerts else None
    extra: dict[str, Any] = {} if mode == "all" else {"wanted": lambda topic: False}
    state = LiveState(publish, alerts=engine, clock=lambda: 5_000.0, **extra)
    frames = [records[i : i + frame] for i in range(0, len(records), frame)]
    gc.collect()
    t0 = time.process_time()
    rid = 1
    for batch in frames:
        state.on_records("gw", rid, batch)
        rid += len(batch)
    return (time.process_time() - t0) / len(records) * 1e6


def unwatched_ab(runs: int, frame: int, wafers: int, baseline: str | None) -> None:
    """The simulated lot with every topic wanted and with none (see --unwatched)."""
    codes: dict[str, tuple[str | None, str]] = {"all": (None, "all"), "none": (None, "none")}
    if baseline:
        codes = {"base": (str(Path(baseline).resolve()), "all"), **codes}
    print(f"live state apply, frames of {frame}, CPU µs/record, median of {runs}, "
          f"alternating; load average {os.getloadavg()[0]:.1f}")
    for alerts in (False, True):
        us: dict[str, list[float]] = {c: [] for c in codes}
        for _ in range(runs):
            for label, (code, mode) in codes.items():
                env = None if code is None else {**os.environ, "PYTHONPATH": code}
                out = subprocess.run(
                    [sys.executable, __file__, "--serve-unwatched",
                     json.dumps({"frame": frame, "wafers": wafers, "alerts": alerts,
                                 "mode": mode})],
                    env=env, check=True, capture_output=True, text=True).stdout
                us[label].append(float(out.split()[-1]))
        med = {c: statistics.median(v) for c, v in us.items()}
        name = "simulated lot" + (" + 8 alert rules" if alerts else "")
        print(f"  {name:30s} " + "  ".join(f"{c} {m:6.2f}" for c, m in med.items())
              + f"  all/none {med['all'] / med['none']:.2f}x  (runs: "
              + "; ".join(f"{c} " + "/".join(f"{v:.2f}" for v in vs) for c, vs in us.items())
              + ")", flush=True)
    print(f"load average after: {os.getloadavg()[0]:.1f}")


def outage_order(n_frames: int, live_from: int) -> list[int]:
    """The order the gateway's uplink sends frames 1..n on a new connection, none
    acknowledged yet, frames from ``live_from`` on live: the tests' own
    (``tests/test_live_arrival_order.send_order``, the real ``SendScheduler``)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from tests.test_live_arrival_order import send_order

    return send_order(n_frames, live_from)


def order_costs(runs: int, frame: int, wafers: int) -> None:
    """The simulated lot's frames applied in order and out of it (see --order)."""
    records = sim_records(wafers)
    frames = [(i + 1, records[i:i + frame]) for i in range(0, len(records), frame)]
    n = len(frames)
    orders = {"in order": list(range(1, n + 1)),
              "after an outage (2nd half first)": outage_order(n, n // 2 + 1),
              "every other frame first": list(range(1, n + 1, 2)) + list(range(2, n + 1, 2))}
    print(f"{len(records)} records in {n} frames of {frame}, CPU µs/record, median of {runs}, "
          f"interleaved; load average {os.getloadavg()[0]:.1f}")
    us: dict[str, list[float]] = {k: [] for k in orders}
    states: dict[str, LiveState] = {}
    for _ in range(runs):
        for name, order in orders.items():
            state = LiveState(lambda topic, delta: None, clock=lambda: 5_000.0,
                              max_waiting_runs=n)
            gc.collect()
            t0 = time.process_time()
            for seq in order:
                state.on_records("bench", *frames[seq - 1])
            us[name].append((time.process_time() - t0) / len(records) * 1e6)
            states[name] = state

    want = figures(states["in order"])
    base = statistics.median(us["in order"])
    for name, got in us.items():
        med = statistics.median(got)
        print(f"  {name:34s} {med:6.2f}  {med / base:5.2f}x of in order  "
              f"{'equal' if figures(states[name]) == want else 'DIFFERENT'}")
    print(f"load average after: {os.getloadavg()[0]:.1f}")


def figures(state: LiveState) -> Any:
    """The lots' and tests' snapshots: counts exact, running statistics to 9 significant
    digits (docs/live-topics.md; the die values are checked by
    tests/test_live_part_order.py)."""
    def rounded(v: Any) -> Any:
        if isinstance(v, dict):  # (a wafer's die rows follow arrival: by X/Y)
            return {k: sorted(rounded(x), key=repr)
                    if k == "dies" and isinstance(x, list) else rounded(x)
                    for k, x in v.items()}
        if isinstance(v, list):
            return [rounded(x) for x in v]
        return float(f"{v:.9g}") if isinstance(v, float) else v
    return rounded({t: state.snapshot(t) for t in state.topics()
                    if t.startswith(("lot/", "test/"))})


#: (gateway, head, site) lists of waiting values a lot keeps (models.PENDING_SITES_PER_LOT)
FULL_PENDING = 4_096


def alternating_run(frame: int, wafers: int, pending_lots: int, own: bool
                    ) -> dict[str, Any]:
    """One process's figures for --alternating: per-frame CPU µs, in order and swapped."""
    records = sim_records(wafers)
    # values waiting in other lots, every site without its part result: another
    # gateway's, or (own) the bench gateway's, its rids before the lot's
    full = [ParametricResult("other", 1.0, f"FULL{k}", 1, site, "", 1, "T1", 0.5, 0.0, 1.0,
                             "V", True)
            for k in range(pending_lots) for site in range(FULL_PENDING)]
    first = len(full) + 1 if own else 1
    frames = [(first + i, records[i:i + frame]) for i in range(0, len(records), frame)]
    n = len(frames) - len(frames) % 2
    states = {}
    for name in ("in order", "alternating"):
        state = states[name] = LiveState(lambda topic, delta: None, clock=lambda: 5_000.0,
                                         max_lots=pending_lots + 1)
        state.on_records("bench" if own else "other", 1, full)
    us: dict[str, list[float]] = {name: [] for name in states}
    clock = time.process_time
    gc.collect()
    for k in range(0, n, 2):
        for name, pair in (("in order", (k, k + 1)), ("alternating", (k + 1, k))):
            state = states[name]
            t0 = clock()
            for i in pair:
                state.on_records("bench", *frames[i])
            us[name].append((clock() - t0) / 2 * 1e6)
    return {"frames": n, "records": sum(len(frames[i][1]) for i in range(n)),
            **{name: statistics.median(v) for name, v in us.items()},
            "equal": figures(states["alternating"]) == figures(states["in order"])}


def alternating_ab(runs: int, frame: int, wafers: int, pending_lots: int, own: bool,
                   baseline: str | None) -> None:
    """--alternating, this checkout and (``baseline``) another, alternately."""
    codes: dict[str, str | None] = {"this": None}
    if baseline:
        codes = {"base": str(Path(baseline).resolve()), "this": None}
    whose = "its own" if own else "another gateway's"
    print(f"the simulated lot in frames of {frame}, in order and pairwise swapped, {whose} "
          f"{FULL_PENDING} waiting lists in each of {pending_lots} other lots; CPU "
          f"µs per frame, median over the pairs, median of {runs} processes, alternating; "
          f"load average {os.getloadavg()[0]:.1f}")
    got: dict[str, list[dict[str, Any]]] = {c: [] for c in codes}
    for _ in range(runs):
        for label, code in codes.items():
            env = None if code is None else {**os.environ, "PYTHONPATH": code}
            out = subprocess.run(
                [sys.executable, __file__, "--serve-alternating",
                 json.dumps({"frame": frame, "wafers": wafers, "lots": pending_lots,
                             "own": own})],
                env=env, check=True, capture_output=True, text=True).stdout
            got[label].append(json.loads(out.splitlines()[-1]))
    for label, rows in got.items():
        med = {k: statistics.median(r[k] for r in rows) for k in ("in order", "alternating")}
        print(f"  {label:5s} {rows[0]['frames']} frames: in order {med['in order']:8.1f}  "
              f"alternating {med['alternating']:8.1f}  "
              f"({med['alternating'] / med['in order']:.2f}x of in order)  "
              f"{'equal' if all(r['equal'] for r in rows) else 'DIFFERENT'}  (runs: "
              + ", ".join(f"{r['in order']:.0f}/{r['alternating']:.0f}" for r in rows) + ")")
    print(f"load average after: {os.getloadavg()[0]:.1f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--frame", type=int, default=None,
                    help="records per frame (default 2000; with --path 8000)")
    ap.add_argument("--wafers", type=int, default=4)
    ap.add_argument("--kinds", action="store_true", help="each record kind's marginal cost")
    ap.add_argument("--stages", action="store_true", help="the hub's stages per record")
    ap.add_argument("--path", action="store_true",
                    help="the hub's live path (feeder hand-off + live state), see above")
    ap.add_argument("--baseline", metavar="DIR",
                    help="with --path or --alternating: also another checkout's")
    ap.add_argument("--order", action="store_true",
                    help="what frames out of record-id order cost, see above")
    ap.add_argument("--alternating", action="store_true",
                    help="what frames swapped pairwise cost beside waiting values, see above")
    ap.add_argument("--pending-lots", type=int, default=4,
                    help="with --alternating: lots with another gateway's full waiting set")
    ap.add_argument("--own", action="store_true",
                    help="with --alternating: the waiting lists are the gateway's own")
    ap.add_argument("--unwatched", action="store_true",
                    help="updates nobody follows skipped vs all built (see the docstring)")
    ap.add_argument("--serve-unwatched", metavar="JSON", help=argparse.SUPPRESS)
    ap.add_argument("--serve-path", metavar="JSON", help=argparse.SUPPRESS)
    ap.add_argument("--serve-alternating", metavar="JSON", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve_unwatched:
        job = json.loads(args.serve_unwatched)
        print(f"{unwatched_run(job['frame'], job['wafers'], job['alerts'], job['mode']):.4f}")
        return
    if args.unwatched:
        unwatched_ab(args.runs, args.frame or 2000, args.wafers, args.baseline)
        return
    if args.serve_alternating:
        job = json.loads(args.serve_alternating)
        print(json.dumps(alternating_run(job["frame"], job["wafers"], job["lots"],
                                         job["own"])))
        return
    if args.alternating:
        alternating_ab(args.runs, args.frame or 100, args.wafers, args.pending_lots,
                       args.own, args.baseline)
        return
    if args.serve_path:
        job = json.loads(args.serve_path)
        print(f"{path_run(job['stream'], job['frame'], job['wafers']):.4f}")
        return
    if args.path:
        path_ab(args.runs, args.frame or 8000, args.wafers, args.baseline)
        return
    if args.order:
        order_costs(args.runs, args.frame or 2000, args.wafers)
        return
    args.frame = args.frame or 2000

    simulated = sim_records(args.wafers)
    cases = [("simulated lot", simulated, False),
             ("simulated lot + 8 alert rules", simulated, True)]
    cases += [(name, records, False) for name, records in file_records()]
    print(f"frame = {args.frame} records, CPU µs/record, median of {args.runs} runs each, "
          f"interleaved; load average {os.getloadavg()[0]:.1f}")
    print(f"{'stream':34s} {'records':>8s}  {'one at a time':>13s} {'batched':>8s} "
          f"{'ratio':>6s}  equal  deltas/frame")
    for name, records, alerts in cases:
        whole = medians(records, args.frame, alerts, args.runs)
        _, published, n_frames, before = run(records, args.frame, alerts, False)
        _, _, _, after = run(records, args.frame, alerts, True)
        equal = capture(before) == capture(after)
        us = {m: whole[m] / len(records) * 1e6 for m in MODES}
        print(f"{name:34s} {len(records):>8d}  {us['one at a time']:>13.2f} "
              f"{us['batched']:>8.2f} {whole['one at a time'] / whole['batched']:>5.2f}x  "
              f"{'yes' if equal else 'NO':5s}  {published / n_frames:5.1f}", flush=True)
        if args.kinds:
            print(f"    {'kind (marginal)':22s} {'records':>8s}  {'before':>8s}  "
                  f"{'batched':>8s}  {'ratio':>6s}")
            per_kind(records, args.frame, alerts, args.runs, whole)

    tracemalloc.start()
    run(simulated, args.frame, False, True)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    print(f"peak traced memory applying the simulated lot: {peak / 2**20:.1f} MiB "
          f"({len(simulated)} records)")
    if args.stages:
        stages(args.runs, args.frame)


if __name__ == "__main__":
    main()
