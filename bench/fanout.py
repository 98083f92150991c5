"""Fan-out benchmark: 1,000 /ws/live subscribers on one hub while a simulated tester feeds
10,000 records/s through a gateway.

    python bench/fanout.py [--clients 1000] [--rate 10000] [--seconds 30] [--ui-rate 20]
                           [--runs 3] [--compare] [--client-procs N] [--batch-ms 10] [--spool]

Separate processes, as in production: the hub (Ingest + LiveState + LiveFanout), the tester
(simulated tester -> Gateway -> uplink), and ``--client-procs`` subscriber processes (one
per 250 clients by default, at least 2): bare WebSocket clients on non-blocking sockets
under one epoll loop each (a Trio task per client would cost more than the hub), so the
clients' own reading is not what is measured.  This process only conducts and reports.
``--runs`` repeats the whole measurement with a fresh hub and prints the medians;
``--compare`` alternates runs (each side first in turn) of the hub as it is at
``--before`` (a git revision, main by default: its ``edgegw`` exported with git archive
and put first on the hub process's path) with the hub of this tree, and prints both side
by side; the tester and the subscribers
are this tree's in both.  Every client subscribes like
the dashboard (lot/+, lot/+/wafer/+, test/+/+, gateway/+) with CBOR.  ``--feed direct`` leaves the
gateway, uplink and store out: the hub process feeds the tester's records straight into its
live state, which measures the fan-out on its own.

The gateway batches with ``batch.max_delay_ms`` = ``--batch-ms`` (10 ms: what a
deployment that wants records on screen within the goal sets; the shipped default, 100 ms,
alone would use up twice the 50 ms) and its memory queue, or its disk spool (``--spool``);
both are printed.

Measured:
* latency from record creation to client receipt, per die: the tester logs each part's
  creation time (its record ts); a client's receipt time of a wafer delta minus the
  creation time of every die row in it.  Pooled over a 10 % sample of the clients (all of
  them would be ~30 M samples for pure Python);
* the update rate (batch frames per second) every client sees;
* the hub process's CPU (utime+stime from /proc) and memory (VmRSS, VmHWM).
The measured time is split in phases that alternate between without and with a
deliberately stalled client (a new connection that subscribes and never reads; the hub
closes it after --stall-timeout).  Figures are printed for both kinds: the stalled client
must not change them.
Goal: p99 under 50 ms plus one UI frame interval.
"""

from __future__ import annotations

import argparse
import base64
import bisect
import collections
import gc
import hashlib
import json
import os
import pickle
import resource
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

TOKEN = "bench-token"
TOPICS = ["lot/+", "lot/+/wafer/+", "test/+/+", "gateway/+"]
CLK_TCK = os.sysconf("SC_CLK_TCK")


def _raise_nofile() -> None:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 65536), hard))


# --------------------------------------------------------------------------- hub process


def run_hub(args: argparse.Namespace) -> None:
    import trio

    from edgegw.config import build
    from edgegw.hub.config import HubConfig
    from edgegw.hub.fanout import LiveConfig, LiveFanout
    from edgegw.hub.gcpacing import GcPacer
    from edgegw.hub.ingest import Ingest
    from edgegw.hub.live import LiveState

    async def main() -> None:
        hub_section: dict[str, Any] = {"port": 0, "data_dir": args.data}
        hub = Ingest(build(HubConfig, {"hub": hub_section,
                                       "http": {"max_connections_per_address": 0},
                                       "gateways": {"bench-gw": {"token": TOKEN}}}))
        fanout = LiveFanout(LiveConfig(ui_rate=args.ui_rate, stall_timeout=args.stall_timeout),
                            metrics=hub.metrics)
        clock.install(hub)
        if args.write_slice is not None and hasattr(fanout, "write_slice"):
            fanout.write_slice = args.write_slice / 1000  # this tree's hub only
        if hasattr(fanout, "ingest_lag") and hasattr(hub, "lag") and not args.no_hold:
            fanout.ingest_lag = hub.lag  # as edgegw.hub.Hub wires it
        if args.catch_up is not None and hasattr(fanout, "catch_up"):
            fanout.catch_up = args.catch_up  # this tree's hub only
        if args.writer_thread and hasattr(fanout, "write_in_thread"):
            fanout.write_in_thread = True  # this tree's hub only
        if args.writer_process and hasattr(fanout, "write_in_process"):
            fanout.write_in_process = True  # this tree's hub only
        tick_async = fanout.tick_async

        async def counted_tick() -> tuple[float, bool]:
            # Every tree's tick_async returns its own CPU seconds on the Trio thread (not
            # what ran while it waited): the counted cost, which load does not inflate.
            took, sent = await tick_async()
            if sent:
                tick_cpu.append((time.time(), took))
            return took, sent

        fanout.tick_async = counted_tick  # type: ignore[method-assign]

        def publish(topic: str, delta: dict[str, Any]) -> None:
            # For the latency breakdown: how old the newest record of a wafer delta is
            # when the live state publishes it (gateway batching, uplink, durable commit).
            now = time.time()
            if "/wafer/" in topic and delta.get("updated"):
                lags.append(now - delta["updated"])
            fanout.publish(topic, delta, now)  # items carry the publish times: fan-out latency

        state = LiveState(publish, metrics=hub.metrics)
        fanout.attach(state)
        hub.add_consumer(clock)  # first: notes when each frame reaches the live state
        hub.add_consumer(state)
        fanout.install(hub.http)
        async with trio.open_nursery() as nursery:
            port = await nursery.start(hub.run)
            await nursery.start(fanout.run)
            if args.gc_freeze > 0:  # as Hub does (config hub.gc_freeze_s)
                await nursery.start(GcPacer(args.gc_freeze, metrics=hub.metrics).run)
            print(f"PORT {port}", flush=True)

            async def ticker() -> None:  # what the hub service does about once a second
                while True:
                    await trio.sleep(1)
                    state.tick(time.time())

            nursery.start_soon(ticker)
            if args.feed == "direct":
                nursery.start_soon(feed_directly, args, state)
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for _ in signals:
                    nursery.cancel_scope.cancel()
                    break

    lags: list[float] = []
    tick_cpu: list[tuple[float, float]] = []  # (wall end, Trio thread CPU s) per tick that sent
    created: list[tuple[str, int | None, int | None, float]] = []
    long_steps = LongSteps(args.long_step_ms / 1000)
    clock = StageClock()

    async def feed_directly(args: argparse.Namespace, state: LiveState) -> None:
        """The simulated tester's records straight into the live state, every 10 ms, as
        the hub applies them (no gateway, no uplink, no store): the fan-out on its own."""
        from edgegw.records import PartResult
        from edgegw.sim.source import SimulatedConfig, SimulatedTesterSource
        from edgegw.sources import SourceContext

        go = Path(args.log).with_suffix(".go")
        while not go.exists():
            await trio.sleep(0.05)
        sim = SimulatedTesterSource("tester", SimulatedConfig(
            parts_per_second=args.rate / 9, sites=4, wafer_diameter_dies=30, tests_per_part=8,
            wafers=1000), SourceContext(gateway_id="bench-gw", metrics=None,  # type: ignore[arg-type]
                                        checkpoint=None, state_dir=args.data))
        records = sim.batches()
        rid = 1
        start = time.monotonic()
        sent = 0
        while time.monotonic() - start < args.seconds:
            await trio.sleep(0.01)
            due = int(args.rate * (time.monotonic() - start))
            batch: list[Any] = []
            while sent + len(batch) < due:
                batch.extend(next(records)[0])
            for rec in batch:
                if type(rec) is PartResult:
                    created.append((rec.wafer_id, rec.x, rec.y, rec.ts))
            state.on_records("bench-gw", rid, batch)
            rid += len(batch)
            sent += len(batch)
        await trio.Path(args.log).write_text(json.dumps({"created": created, "produced": sent}))

    _raise_nofile()
    gc.callbacks.append(long_steps.on_gc)
    trio.run(main, instruments=[long_steps])  # type: ignore[list-item]  # duck-typed hooks
    lags.sort()
    print("LAGS " + json.dumps({"n": len(lags), "p50": pct(lags, 50), "p99": pct(lags, 99)}),
          flush=True)
    print("STEPS " + json.dumps(long_steps.steps), flush=True)
    print("TICKCPU " + json.dumps(tick_cpu), flush=True)
    Path(args.log).with_name("stages.json").write_text(json.dumps(clock.summary()))
    import edgegw
    print("SOURCE " + json.dumps(os.path.dirname(os.path.dirname(edgegw.__file__))), flush=True)
    print("GC " + json.dumps(long_steps.collections), flush=True)


class LongSteps:
    """A Trio instrument that notes every task step longer than ``threshold`` seconds:
    while one task runs, no other does -- no frame is applied, no tick runs.  This is
    what shows whether a stalled client costs the others time in the hub."""

    def __init__(self, threshold: float) -> None:
        self.threshold = threshold
        self.steps: list[tuple[float, float, str]] = []  # (wall end, seconds, task name)
        self._t0 = 0.0
        # The cyclic garbage collector's full collections: (wall end, seconds); what it
        # takes of a long step.
        self.collections: list[tuple[float, float]] = []
        self._gc0 = 0.0

    def on_gc(self, phase: str, info: dict[str, int]) -> None:
        if info["generation"] != 2:
            return
        if phase == "start":
            self._gc0 = time.perf_counter()
        else:
            self.collections.append((time.time(), time.perf_counter() - self._gc0))

    def before_task_step(self, task: Any) -> None:
        self._t0 = time.perf_counter()

    def after_task_step(self, task: Any) -> None:
        took = time.perf_counter() - self._t0
        if took > self.threshold:
            self.steps.append((time.time(), took, task.name))


class StageClock:
    """Where a record's time goes inside the hub, per frame and per part result: its
    arrival (the WebSocket message read), its durable commit, and its hand-over to the
    live state (which publishes its deltas synchronously).  Hooks only the hub's public
    consumer interface and two calls of the wire protocol's ``HubConnection`` (the same in
    every hub version this bench compares), nothing of the fan-out."""

    def __init__(self) -> None:
        self.arrived: dict[int, float] = {}  # seq -> wall time its DATA message was read
        # (seq, oldest part result, arrival, commit) of each frame
        self.frames: list[tuple[int, float, float, float]] = []
        # (wall time, age) of part results at their durable commit, and when the live
        # state got them (and published their deltas)
        self.at_commit: list[tuple[float, float]] = []
        self.at_feed: list[tuple[float, float]] = []
        self._last: tuple[float, list[float]] | None = None

    def install(self, hub: Any) -> None:
        from edgegw.protocol import Data, HubConnection

        receive, applied = HubConnection.receive, HubConnection.applied
        queue_feed = hub._queue_feed  # called for each frame right after its commit
        clock = self

        def receive_(conn: Any, data: Any, now: float) -> Any:
            events, reply = receive(conn, data, now)
            wall = time.time()
            for ev in events:
                if isinstance(ev, Data):
                    clock.arrived[ev.seq] = wall
            return events, reply

        def queue_feed_(gw: str, first_rid: int, records: Any, frame_id: int) -> None:
            wall = time.time()
            ts = part_timestamps(records)
            clock.at_commit.extend((wall, wall - t) for t in ts)
            clock._last = (wall, ts)
            queue_feed(gw, first_rid, records, frame_id)

        def applied_(conn: Any, seq: int, now: float) -> Any:
            arrival = clock.arrived.pop(seq, None)
            if arrival is not None and clock._last is not None and clock._last[1]:
                commit, ts = clock._last
                clock.frames.append((seq, min(ts), arrival, commit))
            clock._last = None
            return applied(conn, seq, now)

        HubConnection.receive = receive_  # type: ignore[method-assign, assignment]
        HubConnection.applied = applied_  # type: ignore[method-assign, assignment]
        hub._queue_feed = queue_feed_

    def on_records(self, gateway_id: str, first_rid: int, records: list[Any]) -> None:
        wall = time.time()
        self.at_feed.extend((wall, wall - t) for t in part_timestamps(records))

    def on_columns(self, gateway_id: str, first_rid: int, frame: Any) -> None:
        # A columnar frame (protocol v2): read from its columns, so that the hub does not
        # build its records for this clock (the live state does not either).
        wall = time.time()
        self.at_feed.extend((wall, wall - t) for t in part_timestamps(frame))

    def on_gateway(self, gateway_id: str, connected: bool, now: float) -> None:
        pass

    def summary(self) -> dict[str, Any]:
        """Everything, for the conductor to cut into phases: (wall, age) pairs."""
        return {"at_commit": self.at_commit, "at_feed": self.at_feed,
                "to_arrival": [(a, a - o) for _, o, a, _ in self.frames],
                "arrival_to_commit": [(c, c - a) for _, _, a, c in self.frames],
                "oldest": [(s, o, a) for s, o, a, _ in self.frames]}


def part_timestamps(records: Any) -> list[float]:
    """The ``ts`` of every part result of a frame: a list of records, a v1 body (``Rows``)
    or a columnar v2 body (``Columns``: read from its columns, no record built)."""
    from edgegw.records import PartResult

    columns = getattr(records, "columns", None)
    if columns is not None:
        cols = columns(PartResult)
        if cols is None:
            return []
        ts = cols[1]
        if type(ts) is not tuple:
            return list(ts)
        return [ts[0]] * sum(c for cls, c in records.runs() if cls is PartResult)
    if hasattr(records, "records"):
        records = records.records()
    return [r.ts for r in records if type(r) is PartResult]


# --------------------------------------------------------------------------- tester process


def run_tester(args: argparse.Namespace) -> None:
    import trio

    from edgegw.config import build
    from edgegw.gateway.config import GatewayConfig
    from edgegw.gateway.service import Gateway
    from edgegw.records import PartResult
    from edgegw.sim.source import SimulatedConfig, SimulatedTesterSource
    from edgegw.sources import SourceContext

    created: list[tuple[str, int | None, int | None, float]] = []
    sent: dict[int, float] = {}  # seq -> wall time its DATA message was made (first send)

    from edgegw.protocol import GatewayConnection

    data = GatewayConnection.data

    def data_(conn: Any, seq: int, body: bytes, now: float,
              sent_at: float | None = None) -> bytes:
        sent.setdefault(seq, time.time())  # the uplink writes it right after
        return data(conn, seq, body, now, sent_at)

    GatewayConnection.data = data_  # type: ignore[method-assign, assignment]

    class LoggedTester(SimulatedTesterSource):
        """The built-in simulated tester, logging when each part record was created."""

        def batches(self) -> Any:
            for batch, n_parts in super().batches():
                for rec in batch:
                    if type(rec) is PartResult:
                        created.append((rec.wafer_id, rec.x, rec.y, rec.ts))
                yield batch, n_parts

    tests_per_part = 8
    parts_per_second = args.rate / (tests_per_part + 1)
    sim = LoggedTester("tester", SimulatedConfig(
        parts_per_second=parts_per_second, sites=4, wafer_diameter_dies=30,
        tests_per_part=tests_per_part, wafers=1000),
        SourceContext(gateway_id="bench-gw", metrics=None, checkpoint=None,  # type: ignore[arg-type]
                      state_dir=args.data))

    async def main() -> None:
        raw: dict[str, Any] = {
            "gateway": {"id": "bench-gw", "token": TOKEN, "state_dir": args.data,
                        "hub_url": f"ws://127.0.0.1:{args.port}/ws/gateway"},
            "batch": {"max_records": args.batch_records, "max_delay_ms": args.batch_ms},
        }
        if args.spool:
            raw["spool"] = {}  # defaults: <state_dir>/spool, a group commit (fsync) per frame
        gw = Gateway(build(GatewayConfig, raw), extra_sources=[("tester", sim)])
        async with trio.open_nursery() as nursery:
            await nursery.start(gw.run)
            await trio.sleep(args.seconds)
            sim.stop()
            await trio.sleep(0.2)
            await gw.flush()
            with trio.move_on_after(10):
                while gw.store.first_unacked < gw.store.next_seq:
                    await trio.sleep(0.05)
            nursery.cancel_scope.cancel()

    trio.run(main)
    Path(args.log).write_text(json.dumps({"created": created, "produced": sim.produced,
                                          "sent": sorted(sent.items())}))


# --------------------------------------------------------------------------- subscribers


def ws_connect(port: int, rcvbuf: int | None = None,
               topics: list[str] | None = None, number: int = 0) -> tuple[socket.socket, bytes]:
    """A subscribed client socket (non-blocking) and any bytes read past the handshake.

    Clients come from 64 loopback addresses, as dashboards come from many hosts (the
    bench's hub has no cap per remote address: 5,000 clients)."""
    sock = socket.socket()
    if rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.bind((f"127.0.0.{1 + number % 64}", 0))
    sock.connect(("127.0.0.1", port))
    key = base64.b64encode(os.urandom(16))
    sock.sendall(b"GET /ws/live HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
                 b"Connection: Upgrade\r\nSec-WebSocket-Key: " + key + b"\r\n"
                 b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: edgegw.live.v1.cbor"
                 b"\r\n\r\n")
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionError("hub closed during the handshake")
        head += chunk
    if b" 101 " not in head.split(b"\r\n", 1)[0]:
        raise ConnectionError(head.decode("latin-1"))
    import cbor2

    payload = cbor2.dumps({"type": "subscribe", "id": 1, "topics": topics or TOPICS})
    mask = os.urandom(4)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    n = len(payload)
    header = bytes((0x82, 0x80 | n)) if n < 126 else bytes((0x82, 0xFE)) + n.to_bytes(2, "big")
    sock.sendall(header + mask + masked)
    rest = head.partition(b"\r\n\r\n")[2]
    sock.setblocking(False)
    return sock, rest


class Subscribers:
    """Many bare WebSocket clients under one epoll: record (client, time, message)."""

    def __init__(self, sample_step: int, procs: int = 1) -> None:
        self.sample_step = sample_step  # every n-th client's messages are kept for latency
        self.procs = procs  # client numbers here are p, p + procs, p + 2 procs, ...
        self.ep = select.epoll()
        self.socks: dict[int, socket.socket] = {}
        self.index: dict[int, int] = {}  # fd -> client number
        self.bufs: dict[int, bytearray] = {}
        self.payloads: dict[bytes, int] = {}
        self.received: list[tuple[int, float, int]] = []  # (client, t, payload index)
        self.closed: dict[int, float] = {}

    def add(self, conn: tuple[socket.socket, bytes], number: int) -> None:
        sock, rest = conn
        fd = sock.fileno()
        self.socks[fd] = sock
        self.index[fd] = number
        self.bufs[fd] = bytearray(rest)
        self.ep.register(fd, select.EPOLLIN)

    def poll(self, until: float, stop_fd: int | None = None) -> None:
        """Read until ``until`` (monotonic), or until ``stop_fd`` is readable."""
        payloads = self.payloads
        received = self.received
        if stop_fd is not None:
            self.ep.register(stop_fd, select.EPOLLIN)
        while True:
            timeout = until - time.monotonic()
            if timeout <= 0:
                return
            ready: set[int] = set()
            for fd, _ in self.ep.poll(min(timeout, 0.05)):
                if fd == stop_fd:
                    ready.add(fd)
                    continue
                sock = self.socks[fd]
                try:
                    data = sock.recv(1 << 18)
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                now = time.time()
                if not data:
                    self.ep.unregister(fd)
                    self.closed[self.index[fd]] = now
                    continue
                buf = self.bufs[fd]
                buf += data
                client = self.index[fd]
                while len(buf) >= 2:
                    n = buf[1] & 0x7F
                    at = 2
                    if n == 126:
                        if len(buf) < 4:
                            break
                        n, at = int.from_bytes(buf[2:4], "big"), 4
                    elif n == 127:
                        if len(buf) < 10:
                            break
                        n, at = int.from_bytes(buf[2:10], "big"), 10
                    if len(buf) < at + n:
                        break
                    if buf[0] & 0x0F == 0x2:
                        if client // self.procs % self.sample_step:
                            idx = -1  # counted only: keeps this process light
                        else:
                            payload = bytes(buf[at:at + n])
                            known = payloads.get(payload)
                            if known is None:
                                known = payloads[payload] = len(payloads)
                            idx = known
                        received.append((client, now, idx))
                    del buf[:at + n]
            if stop_fd is not None and stop_fd in ready:
                self.ep.unregister(stop_fd)
                return


def run_subs(args: argparse.Namespace) -> None:
    """One subscriber process: clients ``index``, ``index + procs``, ...; prints READY when
    they are subscribed, reads until a line on stdin, then writes what it received."""
    _raise_nofile()
    subs = Subscribers(args.sample_step, args.procs)
    mine = range(args.index, args.clients, args.procs)
    for k, i in enumerate(mine):
        subs.add(ws_connect(args.port, number=i), i)
        if k % 100 == 99:
            subs.poll(time.monotonic() + 0.01)
    print("READY", flush=True)
    subs.poll(time.monotonic() + 1e9, stop_fd=sys.stdin.fileno())
    subs.poll(time.monotonic() + 0.2)  # what is on its way
    ordered = sorted(subs.payloads, key=subs.payloads.__getitem__)
    with open(args.log, "wb") as f:
        pickle.dump({"payloads": ordered, "received": subs.received, "closed": subs.closed}, f)
    print("DONE", flush=True)


class Merged:
    """What every subscriber process received, as one ``Subscribers`` would have."""

    def __init__(self, logs: list[dict[str, Any]], sample_step: int) -> None:
        self.sample_step = sample_step
        self.payloads: dict[bytes, int] = {}
        self.received: list[tuple[int, float, int]] = []
        self.closed: dict[int, float] = {}
        for log in logs:
            remap = [self.payloads.setdefault(p, len(self.payloads)) for p in log["payloads"]]
            self.received.extend((c, t, remap[i] if i >= 0 else -1)
                                 for c, t, i in log["received"])
            self.closed.update(log["closed"])
        self.sampled = len({c for c, _, i in self.received if i >= 0})


# --------------------------------------------------------------------------- the run


def proc_cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def hub_cpu_seconds(pid: int) -> float:
    """The hub process's CPU seconds and its children's (the fan-out's writer process,
    ``--writer-process``): the writes cost the same wherever they run."""
    total = proc_cpu_seconds(pid)
    kids: list[str] = []
    # per thread: the hub starts its writer from a worker thread (trio.lowlevel.open_process)
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            kids += (task / "children").read_text().split()
        except OSError:
            pass  # the thread ended meanwhile
    for kid in kids:
        try:
            total += proc_cpu_seconds(int(kid))
        except OSError:
            pass  # ended meanwhile
    return total


def proc_mem_mb(pid: int) -> tuple[float, float]:
    rss = hwm = 0.0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1]) / 1024
        elif line.startswith("VmHWM:"):
            hwm = int(line.split()[1]) / 1024
    return rss, hwm


def _own_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def pct(sorted_values: list[float], p: float) -> float:
    if not sorted_values:
        return float("nan")
    k = min(len(sorted_values) - 1, max(0, round(p / 100 * (len(sorted_values) - 1))))
    return sorted_values[k]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--role", choices=["main", "hub", "tester", "subs"], default="main")
    ap.add_argument("--clients", type=int, default=1000)
    ap.add_argument("--rate", type=float, default=10_000, help="records per second")
    ap.add_argument("--seconds", type=float, default=30.0, help="measured seconds (two halves)")
    ap.add_argument("--ui-rate", type=float, default=20.0)
    ap.add_argument("--stall-timeout", type=float, default=5.0)
    ap.add_argument("--batch-records", type=int, default=2000)
    ap.add_argument("--batch-ms", type=float, default=10.0)
    ap.add_argument("--spool", action="store_true",
                    help="the gateway's crash-safe disk spool (an fsync per frame) instead of "
                         "its memory queue")
    ap.add_argument("--no-stalled", action="store_true")
    ap.add_argument("--stalled-topics", nargs="+", default=None,
                    help="what the stalled client subscribes to (default: as the others)")
    ap.add_argument("--phases", type=int, default=4,
                    help="measured phases, alternately without and with a stalled client")
    ap.add_argument("--feed", choices=["gateway", "direct"], default="gateway",
                    help="gateway: tester -> gateway -> uplink -> hub store -> live state "
                         "(end to end); direct: records straight into the hub's live state "
                         "(the fan-out on its own)")
    ap.add_argument("--long-step-ms", type=float, default=20.0,
                    help="hub Trio task steps longer than this are counted per phase")
    ap.add_argument("--gc-freeze", type=float, default=1.0,
                    help="the hub freezes surviving objects this often, seconds (0: off, "
                         "CPython's full collections pause the hub as they come)")
    ap.add_argument("--write-slice", type=float, default=None,
                    help="ms a tick writes before other tasks get a turn (this tree's hub "
                         "only, not --before's; default: LiveFanout's own, off)")
    ap.add_argument("--writer-thread", action="store_true",
                    help="this tree's hub hands its ticks' writes to a writer thread "
                         "(LiveFanout.write_in_thread; not --before's)")
    ap.add_argument("--client-nice", type=int, default=0,
                    help="run the subscriber processes at this nice level (10: they yield "
                         "the cores to the hub, as clients on other machines would; 0: "
                         "as the earlier figures were taken)")
    ap.add_argument("--writer-process", action="store_true",
                    help="this tree's hub hands its ticks' writes to a writer process "
                         "(LiveFanout.write_in_process; not --before's)")
    ap.add_argument("--no-hold", action="store_true",
                    help="this tree's hub ticks without looking at the ingest's lag "
                         "(LiveFanout.ingest_lag unset)")
    ap.add_argument("--catch-up", type=float, default=None,
                    help="share of the UI interval a due tick waits for the frames received "
                         "by then to reach the live state (LiveFanout.catch_up; this tree's "
                         "hub only; 0: off; default: LiveFanout's own)")
    ap.add_argument("--runs", type=int, default=3, help="whole measurements; medians printed")
    ap.add_argument("--compare", action="store_true",
                    help="alternate runs of the hub from --before (its source, exported "
                         "with git archive) and the hub of this tree; the tester and the "
                         "subscribers are this tree's in both")
    ap.add_argument("--before", default="main",
                    help="the git revision --compare measures as 'before' (default: main)")
    ap.add_argument("--client-procs", type=int, default=0,
                    help="subscriber processes (0: one per 250 clients, at least 2)")
    ap.add_argument("--procs", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--index", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--sample-step", type=int, default=10, help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--data", default="")
    ap.add_argument("--log", default="")
    args = ap.parse_args()
    if args.role == "hub":
        run_hub(args)
        return 0
    if args.role == "tester":
        run_tester(args)
        return 0
    if args.role == "subs":
        run_subs(args)
        return 0
    _raise_nofile()
    return run_main(args)


#: the figures this bench printed before issue 17's work (the issue's quote: 1,000 clients,
#: 10k records/s, ui_rate 20, --seconds 20, one subscriber process, load average 0.4-0.7)
ISSUE17 = {"p50": 67.0, "p99": 166.0, "fanout_p99": 103.0, "tick_ms": 22.5, "hub_cpu": 59.0}


def run_main(args: argparse.Namespace) -> int:
    before_tree = export_tree(args.before) if args.compare else None
    try:
        return measure(args, before_tree)
    finally:
        if before_tree is not None:
            shutil.rmtree(before_tree, ignore_errors=True)


def measure(args: argparse.Namespace, before_tree: Path | None) -> int:
    variants = ["before", "after"] if args.compare else ["after"]
    results: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
    for run in range(args.runs):
        # alternating, and in turn first (before, after, after, before ...): a machine
        # whose load drifts up or down through the runs would otherwise favour one side
        for variant in variants if run % 2 == 0 else variants[::-1]:
            print(f"\n=== run {run + 1}/{args.runs}, hub {variant} "
                  f"({args.before if variant == 'before' else 'this tree'})", flush=True)
            summary = one_run(args, before_tree if variant == "before" else None)
            if summary is None:
                return 1
            results[variant].append(summary)
    print(f"\nmedians of {args.runs} run(s): {args.clients} clients, "
          f"{args.rate:.0f} records/s, ui_rate {args.ui_rate:g} (one frame "
          f"{1000 / args.ui_rate:.0f} ms), goal p99 <= "
          f"{(50 if args.clients <= 1000 else 100) + 1000 / args.ui_rate:.0f} ms; "
          f"{os.cpu_count()} cores; gateway batch.max_delay_ms {args.batch_ms:g}")
    keys = [("p50", "creation -> receipt p50 ms"), ("p99", "creation -> receipt p99 ms"),
            ("p99_stalled", "  same, with a stalled client, p99 ms"),
            ("fanout_p99", "publish -> receipt p99 ms"), ("lag_p99", "creation -> publish p99 ms"),
            ("to_sent_p50", "age at gateway send p50 ms (oldest)"),
            ("to_sent_p99", "age at gateway send p99 ms (oldest)"),
            ("to_arrival_p50", "age at hub read p50 ms (oldest)"),
            ("to_arrival_p99", "age at hub read p99 ms (oldest)"),
            ("at_commit_p50", "age at durable commit p50 ms"),
            ("at_commit_p99", "age at durable commit p99 ms"),
            ("at_feed_p50", "age at live-state publish p50 ms"),
            ("at_feed_p99", "age at live-state publish p99 ms"),
            ("at_batch_p50", "age at batch made p50 ms"),
            ("at_batch_p99", "age at batch made p99 ms"),
            ("tick_ms", "hub tick mean ms"), ("tick_max_ms", "hub tick longest ms"),
            ("tick_cpu_ms", "Trio thread CPU per tick ms (median)"),
            ("tick_cpu_us_client", "  per client us"),
            ("rate", "frames/s per client (median)"),
            ("ticks_held", "ticks held for the ingest (whole run)"),
            ("ticks_caught_up", "ticks that waited for commits (whole run)"),
            ("hub_cpu", "hub CPU % of a core"), ("rss", "hub RSS MB"),
            ("subs_cpu", "subscriber processes CPU %"), ("load", "load average")]
    header = f"  {'':40}" + "".join(f"{v:>12}" for v in variants)
    if args.clients == 1000 and args.ui_rate == 20:
        header += f"{'issue 17':>12}"
    print(header)
    for key, label in keys:
        row = f"  {label:40}"
        for v in variants:
            values = [r[key] for r in results[v] if r.get(key) is not None]
            row += f"{statistics.median(values):12.1f}" if values else f"{'n/a':>12}"
        if args.clients == 1000 and args.ui_rate == 20:
            row += f"{ISSUE17[key]:12.1f}" if key in ISSUE17 else f"{'':12}"
        print(row)
    return 0


def export_tree(rev: str) -> Path:
    """The hub's source at ``rev`` (git archive), for the 'before' runs of --compare."""
    repo = Path(__file__).resolve().parent.parent
    out = Path(tempfile.mkdtemp(prefix="edgegw-bench-fanout-before-"))
    archive = subprocess.run(["git", "-C", str(repo), "archive", rev, "edgegw"],
                             check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(out)], input=archive, check=True)
    return out


def one_run(args: argparse.Namespace, before: Path | None) -> dict[str, Any] | None:
    tmp = Path(tempfile.mkdtemp(prefix="edgegw-bench-fanout-"))
    me = [sys.executable, os.path.abspath(__file__)]
    hub_env = dict(os.environ)
    if before is not None:  # that tree's edgegw comes first on the hub's path
        hub_env["PYTHONPATH"] = os.pathsep.join(
            [str(before), *filter(None, [os.environ.get("PYTHONPATH")])])
    hub = subprocess.Popen([*me, "--role", "hub", "--data", str(tmp / "hub"),
                            "--ui-rate", str(args.ui_rate), "--feed", args.feed,
                            "--rate", str(args.rate), "--log", str(tmp / "created.json"),
                            "--seconds", str(args.seconds + 4),
                            "--stall-timeout", str(args.stall_timeout),
                            "--long-step-ms", str(args.long_step_ms),
                            "--gc-freeze", str(args.gc_freeze),
                            *(["--no-hold"] if args.no_hold else []),
                            *(["--writer-thread"] if args.writer_thread and before is None
                              else []),
                            *(["--writer-process"] if args.writer_process and before is None
                              else []),
                            *(["--write-slice", str(args.write_slice)]
                              if args.write_slice is not None and before is None else []),
                            *(["--catch-up", str(args.catch_up)]
                              if args.catch_up is not None and before is None else []),
                            ],
                           stdout=subprocess.PIPE, text=True, env=hub_env)
    tester = None
    procs = args.client_procs or max(2, -(-args.clients // 250))
    sample_step = 10 if args.clients >= 10 else 1
    subs: list[subprocess.Popen[str]] = []
    try:
        line = hub.stdout.readline() if hub.stdout else ""
        if not line.startswith("PORT "):
            print("hub did not start", file=sys.stderr)
            return None
        port = int(line.split()[1])
        t0 = time.monotonic()
        nice = ["nice", "-n", str(args.client_nice)] if args.client_nice else []
        subs = [subprocess.Popen([*nice, *me, "--role", "subs", "--port", str(port),
                                  "--clients", str(args.clients), "--procs", str(procs),
                                  "--index", str(p), "--sample-step", str(sample_step),
                                  "--log", str(tmp / f"subs{p}.pickle")],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
                for p in range(procs)]
        for sub in subs:
            if not (sub.stdout and sub.stdout.readline().startswith("READY")):
                print("a subscriber process failed", file=sys.stderr)
                return None
        print(f"{args.clients} subscribers connected in {time.monotonic() - t0:.1f} s "
              f"from {procs} processes", flush=True)
        time.sleep(1.0)

        warmup = 3.0
        if args.feed == "gateway":
            tester = subprocess.Popen([*me, "--role", "tester", "--port", str(port),
                                       "--rate", str(args.rate),
                                       "--seconds", str(args.seconds + warmup + 1),
                                       "--batch-records", str(args.batch_records),
                                       "--batch-ms", str(args.batch_ms),
                                       "--data", str(tmp / "gw"),
                                       *(["--spool"] if args.spool else []),
                                       "--log", str(tmp / "created.json")])
        else:
            (tmp / "created.go").touch()
        time.sleep(warmup)
        # Phases alternate: without, with a stalled client, without, with ...  A stalled
        # client is a new connection each time that subscribes and never reads; the hub
        # closes it after stall_timeout.  Alternating keeps drifts of the machine's load
        # (other processes) out of the comparison.
        span = args.seconds / args.phases
        phases = []
        stalled: list[socket.socket] = []

        def subs_cpu() -> float:
            return sum(proc_cpu_seconds(sub.pid) for sub in subs)

        for i in range(args.phases):
            with_stalled = i % 2 == 1 and not args.no_stalled
            if with_stalled:
                stalled.append(ws_connect(port, rcvbuf=4096,  # never read from
                                          topics=args.stalled_topics, number=args.clients)[0])
            cpu0, w0, m0 = hub_cpu_seconds(hub.pid), time.time(), time.monotonic()
            own0 = subs_cpu()
            time.sleep(span)
            phases.append((with_stalled, w0, time.time(), hub_cpu_seconds(hub.pid) - cpu0,
                           time.monotonic() - m0, proc_mem_mb(hub.pid), subs_cpu() - own0,
                           os.getloadavg()[0]))
        stats = json.loads(_http_get(port, "/api/live/stats?clients=0"))
        hub_stats = json.loads(_http_get(port, "/api/stats"))
        if tester is not None:
            tester.wait(timeout=60)
        else:
            while not (tmp / "created.json").exists():
                time.sleep(0.2)
        time.sleep(0.5)
        logs = []
        for sub in subs:
            assert sub.stdin is not None
            sub.stdin.write("STOP\n")
            sub.stdin.flush()
        for p, sub in enumerate(subs):
            assert sub.stdout is not None
            sub.stdout.readline()
            sub.wait(timeout=60)
            with open(tmp / f"subs{p}.pickle", "rb") as f:
                logs.append(pickle.load(f))
        merged = Merged(logs, sample_step)
        log = json.loads((tmp / "created.json").read_text())
        hub.send_signal(signal.SIGTERM)
        out = hub.communicate(timeout=30)[0] or ""
        lags = next((json.loads(line[5:]) for line in out.splitlines()
                     if line.startswith("LAGS ")), None)
        steps: list[Any] = next((json.loads(line[6:]) for line in out.splitlines()
                      if line.startswith("STEPS ")), [])
        collections_: list[Any] = next((json.loads(line[3:]) for line in out.splitlines()
                             if line.startswith("GC ")), [])
        tick_cpu: list[Any] = next((json.loads(line[8:]) for line in out.splitlines()
                         if line.startswith("TICKCPU ")), [])
        stages_file = tmp / "stages.json"
        stages = json.loads(stages_file.read_text()) if stages_file.exists() else {}
        # the gateway's send of each frame (the tester's log), against the hub's arrival
        sent = dict(log.get("sent", []))
        frames = [(sent[seq], oldest, arrival) for seq, oldest, arrival
                  in stages.pop("oldest", []) if seq in sent]
        stages["to_sent"] = [(t, t - oldest) for t, oldest, _ in frames]
        stages["sent_to_arrival"] = [(a, a - t) for t, _, a in frames]
        source = next((json.loads(line[7:]) for line in out.splitlines()
                       if line.startswith("SOURCE ")), "?")
        print(f"hub source: {source}")
        summary = report(args, merged, phases, log, stats, hub_stats, bool(stalled), lags,
                         steps, collections_, stages, tick_cpu)
        for sock in stalled:
            sock.close()
        return summary
    finally:
        for proc in (tester, hub, *subs):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
        shutil.rmtree(tmp, ignore_errors=True)  # the hub's store, the logs: ~10 MB a run


def _http_get(port: int, path: str) -> bytes:
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return data.partition(b"\r\n\r\n")[2]


def report(args: argparse.Namespace, subs: Merged, phases: list[Any], log: dict[str, Any],
           stats: dict[str, Any], hub_stats: dict[str, Any], had_stalled: bool,
           lags: dict[str, Any] | None, steps: list[Any], full_gcs: list[Any],
           stages: dict[str, Any], tick_cpu: list[Any]) -> dict[str, Any]:
    """Print one run's figures; return its summary (for the medians)."""
    summary: dict[str, Any] = {"tick_ms": stats["tick_ms_mean"],
                               "tick_max_ms": stats.get("tick_ms_max"),
                               "ticks_held": stats.get("ticks_held"),
                               "ticks_caught_up": stats.get("ticks_caught_up"),
                               "lag_p99": 1000 * lags["p99"] if lags and lags["n"] else None}
    import cbor2

    # creation time of each die result, by (wafer, x, y), in order
    created: dict[tuple[str, int, int], list[float]] = collections.defaultdict(list)
    for wafer, x, y, ts in log["created"]:
        created[(wafer, x, y)].append(ts)
    # per distinct payload: its batch ts and the creation times of the dies in its deltas
    payload_info: list[tuple[float, list[float], list[float]]] = (
        [(0.0, [], [])] * len(subs.payloads))
    for payload, idx in subs.payloads.items():
        msg = cbor2.loads(payload)
        if msg.get("type") != "batch":
            continue
        dies: list[float] = []
        published: list[float] = []  # oldest publish time of each delta item
        for item in msg["items"]:
            if item["type"] == "delta" and "ts" in item:
                published.append(item["ts"][0])
            if item["type"] != "delta" or "/wafer/" not in item["topic"]:
                continue
            wafer = item["topic"].rsplit("/", 1)[1]
            for delta in item["data"]:
                for row in delta.get("dies", ()):
                    times = created.get((wafer, row[0], row[1]))
                    if times:
                        # the newest result of that die made before the batch
                        k = bisect.bisect_right(times, msg["ts"])
                        dies.append(times[max(0, k - 1)])
        payload_info[idx] = (msg["ts"], dies, published)

    print(f"\nfan-out bench ({args.feed} feed): {args.clients} subscribers, tester "
          f"{args.rate:.0f} records/s "
          f"(produced {log['produced']} records), ui_rate {args.ui_rate:g}/s, "
          f"goal p99 < {50 + 1000 / args.ui_rate:.0f} ms"
          + (f"; subscriber processes at nice {args.client_nice}" if args.client_nice else ""))
    if args.feed == "gateway":
        print(f"  gateway: batch.max_delay_ms {args.batch_ms:g} (the shipped default is 100: a "
              f"UI-latency deployment sets it low), batch.max_records {args.batch_records}, "
              f"{'disk spool' if args.spool else 'memory queue (no spool)'}")
    applied = hub_stats["gateways"].get("bench-gw", {}).get("records_applied", "n/a")
    print(f"  hub: {applied} records applied from the gateway; live: {stats['channels']} "
          f"channels, tick mean "
          f"{stats['tick_ms_mean']:.2f} ms (deciding and encoding "
          f"{stats['tick_core_ms_mean']:.2f} ms, the rest writing) over {stats['ticks']} ticks")
    if lags and lags["n"]:
        print(f"  breakdown: newest record of a wafer delta is {1000 * lags['p50']:.1f} ms old "
              f"(p50; p99 {1000 * lags['p99']:.1f} ms) when the hub's live state publishes it "
              f"(gateway batching, uplink, durable commit, apply)")
    def mean_ms(name: str) -> str:
        h = hub_stats["metrics"].get(name) or {}
        return f"{1000 * h['sum'] / h['count']:.1f} ms" if h.get("count") else "n/a"

    print(f"  hub side, means: a record's age at its durable commit "
          f"{mean_ms('hub_record_age_seconds')} (gateway batching and spool, uplink, hub "
          f"queue and commit); a frame's arrival -> ACK due {mean_ms('hub_frame_apply_seconds')};"
          f" commit -> live state {mean_ms('hub_live_apply_lag_seconds')}; ticks spaced "
          f"(over 80 % of the UI interval in CPU) {stats.get('ticks_spaced', 'n/a')}; "
          f"held back for the ingest's lag {stats.get('ticks_held', 'n/a')}; waited for "
          f"the frames received (catch-up) {stats.get('ticks_caught_up', 'n/a')}, mean "
          f"{stats.get('catch_up_ms_mean') or 0:.1f} ms, "
          f"{stats.get('catch_up_timeouts', 'n/a')} of them to the cap")

    def figures(parts: list[Any]) -> tuple[list[float], list[float], list[float], list[float],
                                           list[float]]:
        lat: list[float] = []
        at_batch: list[float] = []  # a die's age when the batch carrying it was made
        tick_lat: list[float] = []
        pub_lat: list[float] = []
        rates: list[float] = []
        for _, w0, w1, *_rest in parts:
            frames: collections.Counter[int] = collections.Counter()
            for client, t, idx in subs.received:
                if not (w0 <= t < w1) or client >= args.clients:
                    continue
                frames[client] += 1
                if idx < 0:  # not a sampled client
                    continue
                ts, dies, published = payload_info[idx]
                if ts:
                    tick_lat.append(t - ts)
                lat.extend(t - d for d in dies)
                at_batch.extend(ts - d for d in dies)
                pub_lat.extend(t - p for p in published)
            rates.extend(frames.get(c, 0) / (w1 - w0) for c in range(args.clients))
        lat.sort()
        at_batch.sort()
        tick_lat.sort()
        pub_lat.sort()
        rates.sort()
        return lat, tick_lat, pub_lat, rates, at_batch

    def show(title: str, parts: list[Any], stalled: bool) -> None:
        if not parts:
            return
        lat, tick_lat, pub_lat, rates, at_batch = figures(parts)
        secs = sum(p[4] for p in parts)
        cpu = sum(p[3] for p in parts)
        own = sum(p[6] for p in parts)
        rss = max(p[5][0] for p in parts)
        hwm = max(p[5][1] for p in parts)
        loads = ", ".join(f"{p[7]:.1f}" for p in parts)
        print(f"\n  {title}: {len(parts)} x {secs / len(parts):.1f} s")
        print(f"    record creation -> client receipt (dies, {len(lat)} samples from "
              f"{subs.sampled} clients): p50 {1000 * pct(lat, 50):.1f} ms, "
              f"p99 {1000 * pct(lat, 99):.1f} ms, max {1000 * pct(lat, 100):.1f} ms")
        print(f"    of which the fan-out, live-state publish -> client receipt (oldest delta "
              f"of each item): p50 {1000 * pct(pub_lat, 50):.1f} ms, "
              f"p99 {1000 * pct(pub_lat, 99):.1f} ms; hub batch made -> client receipt: "
              f"p50 {1000 * pct(tick_lat, 50):.1f} ms, p99 {1000 * pct(tick_lat, 99):.1f} ms")
        def age(values: list[float] | None) -> str:
            return (f"{1000 * values[0]:6.1f} {1000 * values[1]:6.1f}" if values
                    else f"{'n/a':>6} {'n/a':>6}")

        hub_ages: dict[str, list[float]] = {}
        for key, pairs in stages.items():
            ages = sorted(a for t, a in pairs if any(w0 <= t < w1 for _, w0, w1, *_r in parts))
            hub_ages[key] = [pct(ages, 50), pct(ages, 99)] if ages else []

        # Where a part result's time goes, as its age (p50, p99) at each step.
        print("    stage breakdown, a part result's age at each step (ms, p50 p99):")
        print(f"      gateway sends it        {age(hub_ages.get('to_sent'))}   (the "
              f"frame's oldest record: batching <= {args.batch_ms:g} ms "
              f"(batch.max_delay_ms){', the spool' if args.spool else ''})")
        print(f"      hub reads the frame     {age(hub_ages.get('to_arrival'))}   (its send "
              f"-> the hub's read: {age(hub_ages.get('sent_to_arrival'))}; the uplink, the "
              f"hub's receiver)")
        print(f"      durable commit          {age(hub_ages.get('at_commit'))}   (a frame's "
              f"arrival -> commit: {age(hub_ages.get('arrival_to_commit'))}; decode, queue, "
              f"SQLite)")
        print(f"      live state, publish     {age(hub_ages.get('at_feed'))}   (live-state "
              f"queue and apply)")
        print(f"      batch made (tick)       {age([pct(at_batch, 50), pct(at_batch, 99)])}"
              f"   (waiting for the tick, deciding)")
        print(f"      client receipt          {age([pct(lat, 50), pct(lat, 99)])}   (writes "
              f"to {args.clients} sockets, the subscribers' reading)")
        tick_max = stats.get("tick_ms_max")
        print(f"      hub ticks: mean {stats['tick_ms_mean']:.1f} ms wall (deciding and "
              f"encoding {stats['tick_core_ms_mean']:.1f} ms), longest "
              f"{f'{tick_max:.1f} ms' if tick_max is not None else 'n/a'}; a delta's wait for "
              f"its tick is at most one UI frame ({1000 / args.ui_rate:.0f} ms)")
        print(f"    update rate per client (frames/s): min {rates[0]:.1f}, "
              f"median {statistics.median(rates):.1f}, max {rates[-1]:.1f}")
        long = [(took, name) for t, took, name in steps
                if any(w0 <= t < w1 for _, w0, w1, *_r in parts)]
        by_task: collections.Counter[str] = collections.Counter()
        for took, name in long:
            by_task[".".join(name.rsplit(".", 2)[-2:])] += took  # Class.method
        top = ", ".join(f"{name} {1000 * s:.0f} ms" for name, s in by_task.most_common(3))
        gcs = [took for t, took in full_gcs if any(w0 <= t < w1 for _, w0, w1, *_r in parts)]
        print(f"    hub Trio task steps > {args.long_step_ms:g} ms: {len(long)}, "
              f"{1000 * sum(t for t, _ in long):.0f} ms in all, longest "
              f"{1000 * max((t for t, _ in long), default=0):.0f} ms ({top or 'none'}); "
              f"full garbage collections: {len(gcs)}, longest "
              f"{1000 * max(gcs, default=0):.0f} ms")
        cpus = sorted(took for t, took in tick_cpu
                      if any(w0 <= t < w1 for _, w0, w1, *_r in parts))
        tick_cpu_ms = 1000 * statistics.median(cpus) if cpus else float("nan")
        batch = ""
        if stats.get("write_batches"):
            batch = (f"; writer per tick: {stats['write_batch_cpu_ms_mean']:.1f} ms CPU, "
                     f"{stats['write_batch_ms_mean']:.1f} ms wall for "
                     f"{stats['write_batch_frames_mean']:.0f} frames (whole run)")
        print(f"    counted: Trio thread CPU per tick (median of {len(cpus)}) "
              f"{tick_cpu_ms:.1f} ms = {1000 * tick_cpu_ms / args.clients:.1f} us per client"
              f"{batch}")
        print(f"    hub CPU {100 * cpu / secs:.0f} % of one core; RSS {rss:.0f} MB "
              f"(peak {hwm:.0f} MB); the subscriber processes {100 * own / secs:.0f} %; "
              f"load average {loads} on {os.cpu_count()} cores")
        if stalled:
            summary["p99_stalled"] = 1000 * pct(lat, 99)
            return
        summary["tick_cpu_ms"] = tick_cpu_ms
        summary["tick_cpu_us_client"] = 1000 * tick_cpu_ms / args.clients
        for key in ("to_sent", "to_arrival", "at_commit", "at_feed"):
            if hub_ages.get(key):
                summary[f"{key}_p50"], summary[f"{key}_p99"] = (1000 * v for v in hub_ages[key])
        summary.update(p50=1000 * pct(lat, 50), p99=1000 * pct(lat, 99),
                       at_batch_p50=1000 * pct(at_batch, 50),
                       at_batch_p99=1000 * pct(at_batch, 99),
                       fanout_p99=1000 * pct(pub_lat, 99), rate=statistics.median(rates),
                       hub_cpu=100 * cpu / secs, rss=rss, subs_cpu=100 * own / secs,
                       load=statistics.mean(p[7] for p in parts))

    show("without a stalled client", [p for p in phases if not p[0]], False)
    show("with a stalled client", [p for p in phases if p[0]], True)
    if had_stalled:
        print(f"\n  stalled clients: hub slow-client metric "
              f"{hub_stats['metrics'].get('live_slow_clients_total', {})}; subscribers the "
              f"hub closed: {len(subs.closed)} (must be 0)")
    digest = hashlib.sha256(b"".join(sorted(subs.payloads))).hexdigest()[:8]
    print(f"  distinct frames received: {len(subs.payloads)} (digest {digest})")
    return summary


if __name__ == "__main__":
    sys.exit(main())
