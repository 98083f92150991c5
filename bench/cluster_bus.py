"""Cluster bus benchmark (Redis side of issue 14): what one live delta costs on its way from
a partition owner to a /ws/live client on another node.

    python bench/cluster_bus.py [--rate 30000] [--seconds 10] [--clients 20] [--test-interval 0.5]

A private ``redis-server`` is started on a free port (no persistence).  Three parts:

1. **publish** (in this process): a simulated tester's records (``--tests-per-part``
   parametric tests per part) go through a real ``LiveState`` into a ``TopicPublisher``,
   flushed every ``rate x flush_interval`` records as the owner does every 50 ms.  Printed:
   deltas and entries per record, the owner's CPU per delta and per entry (publisher only:
   the live state's own cost is measured apart and subtracted), Redis's CPU per entry
   (``INFO cpu`` before/after).
2. **mirror** (in this process): the entries just published, read back from the streams,
   applied by a node's ``Mirror`` into its ``LiveFanout`` core -- CPU per delta.
3. **end to end** (three processes: the owner, a node, and the clients here): the owner
   feeds ``--rate`` records/s; ``--clients`` clients on the *other* node follow
   ``lot/+``, ``lot/+/wafer/+``, ``test/+/+``.  Latency per lot and wafer item (test/
   topics wait ``--test-interval`` on purpose) = receipt time minus the
   owner's publish time of the item's oldest delta (the publisher is given the wall time
   as the delta's ts): the bus (<= one 50 ms flush), Redis, the node's mirror and one UI
   tick (<= 50 ms at 20/s).  p50/p99, and the CPU of each process per second.

Medians of ``--repeat`` runs of parts 1-2 are printed; the machine is shared, so compare
figures from one run only.
"""

from __future__ import annotations

import argparse
import json
import os
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

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
CLK_TCK = os.sysconf("SC_CLK_TCK")
TOPICS = ["lot/+", "lot/+/wafer/+", "test/+/+"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_of(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def start_redis(workdir: Path) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1",
                             "--save", "", "--appendonly", "no", "--dir", str(workdir)],
                            stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                if s.recv(16).startswith(b"+PONG"):
                    return proc, port
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("redis-server did not start")


def sim_batches(tests_per_part: int, lot: str = "LOT0001") -> Any:
    from edgegw.sim import SimulatedConfig, simulated_batches

    config = SimulatedConfig(wafer_diameter_dies=30, tests_per_part=tests_per_part,
                             wafers=25, lots=0, sites=8, lot_id=lot)
    return simulated_batches(config, "bench", clock=time.time)


# --------------------------------------------------------------------------- parts 1 and 2


def intervals(args: argparse.Namespace) -> dict[str, float]:
    return {"test/": args.test_interval} if args.test_interval > 0 else {}


async def publish_and_mirror(url: str, args: argparse.Namespace) -> dict[str, float]:
    import cbor2
    import trio

    from edgegw.hub.cluster import ClusterBus, Mirror, TopicPublisher
    from edgegw.hub.fanout import LiveFanout
    from edgegw.hub.live import LiveState

    prefix = f"bench{os.getpid()}{int(time.time() * 1000) % 100000}"
    bus = ClusterBus(url, prefix, "owner")
    out: dict[str, float] = {}
    async with trio.open_nursery() as nursery:
        await nursery.start(bus.run)
        # Part 1 runs as fast as it can: the publisher's clock is the records' time (one
        # flush interval per flush), so snapshots and intervals fall as at --rate.
        clock = [0.0]
        publisher = TopicPublisher(bus, snapshot_interval_s=0.5, clock=lambda: clock[0],
                                   intervals=intervals(args))
        deltas = 0

        def counting(topic: str, delta: dict[str, Any], ts: float | None = None) -> None:
            nonlocal deltas
            deltas += 1
            publisher.publish(topic, delta, ts)

        state = LiveState(counting)
        publisher.attach(state)
        per_flush = max(1, int(args.rate * publisher.flush_interval_s))
        batches = sim_batches(args.tests_per_part)
        records = 0
        rid = 1
        state_cpu = publish_cpu = 0.0
        await publisher.flush()
        info: dict[str, Any] = await bus._client.info("cpu")  # type: ignore[union-attr]
        redis_before = float(info["used_cpu_user"]) + float(info["used_cpu_sys"])
        entries_before = publisher.published
        started = time.perf_counter()
        while records < args.records:
            pending = 0
            t0 = time.process_time()
            while pending < per_flush:
                batch, _ = next(batches)
                state.on_records("ate-01", rid, batch)
                rid += len(batch)
                pending += len(batch)
            t1 = time.process_time()
            await publisher.flush()
            t2 = time.process_time()
            clock[0] += publisher.flush_interval_s
            state_cpu += t1 - t0
            publish_cpu += t2 - t1
            records += pending
        wall = time.perf_counter() - started
        info_after: dict[str, Any] = await bus._client.info("cpu")  # type: ignore[union-attr]
        redis_after = float(info_after["used_cpu_user"]) + float(info_after["used_cpu_sys"])
        entries = publisher.published - entries_before
        out.update(records=records, deltas=deltas, entries=entries,
                   deltas_per_record=deltas / records, entries_per_record=entries / records,
                   state_us_per_record=1e6 * state_cpu / records,
                   publish_us_per_delta=1e6 * publish_cpu / deltas,
                   publish_us_per_entry=1e6 * publish_cpu / entries,
                   redis_us_per_entry=1e6 * (redis_after - redis_before) / entries,
                   publish_wall_s=wall)

        # part 2: a node's mirror applies what was published (read back from the streams)
        heads = await bus.live_topics()
        loaded = await bus.load_topics(list(heads))
        fanout = LiveFanout(epoch=bus.epoch)
        mirror = Mirror(bus, fanout)
        stream = []
        for topic, (_off, _data, entries_, _head) in zip(heads, loaded, strict=True):
            for entry in entries_:
                if entry.kind == "d" and entry.n:
                    stream.append((topic, entry))
        n_deltas = sum(len(cbor2.loads(e.payload)[0]) for _, e in stream)
        t0 = time.process_time()
        for topic, entry in stream:
            offset = mirror.offsets.get(topic, entry.first - 1)
            mirror.offsets[topic] = mirror._apply(topic, entry, offset)
        mirror_cpu = time.process_time() - t0
        out.update(mirror_us_per_delta=1e6 * mirror_cpu / max(1, n_deltas),
                   mirror_us_per_entry=1e6 * mirror_cpu / max(1, len(stream)))
        nursery.cancel_scope.cancel()
    return out


# --------------------------------------------------------------------------- part 3


def owner_main(args: argparse.Namespace) -> None:
    import trio

    from edgegw.hub.cluster import ClusterBus, TopicPublisher
    from edgegw.hub.live import LiveState

    async def main() -> None:
        bus = ClusterBus(args.redis, args.prefix, "owner")
        async with trio.open_nursery() as nursery:
            await nursery.start(bus.run)
            publisher = TopicPublisher(bus, intervals=intervals(args))
            # the wall time of the live state's publish travels as the delta's ts
            def publish(topic: str, delta: Any, ts: float | None = None) -> None:
                publisher.publish(topic, delta, time.time())

            state = LiveState(publish)
            publisher.attach(state)
            await nursery.start(publisher.run)
            batches = sim_batches(args.tests_per_part)
            rid = 1
            interval = 0.01
            per_tick = args.rate * interval
            owed = 0.0
            print("ready", flush=True)
            next_at = trio.current_time()
            end = next_at + args.seconds + 3
            while trio.current_time() < end:
                owed += per_tick
                while owed > 0:
                    batch, _ = next(batches)
                    state.on_records("ate-01", rid, batch)
                    rid += len(batch)
                    owed -= len(batch)
                next_at += interval
                await trio.sleep_until(max(next_at, trio.current_time()))
            nursery.cancel_scope.cancel()

    trio.run(main)


def node_main(args: argparse.Namespace) -> None:
    import trio

    from edgegw.hub.cluster import ClusterBus, Mirror
    from edgegw.hub.fanout import LiveFanout
    from edgegw.web import HttpServer

    async def main() -> None:
        bus = ClusterBus(args.redis, args.prefix, "node")
        async with trio.open_nursery() as nursery:
            await nursery.start(bus.run)
            fanout = LiveFanout(epoch=bus.epoch)
            mirror = Mirror(bus, fanout)
            # how old each entry's oldest delta is when this node's mirror applies it
            arrived: list[float] = []
            publish = fanout.core.publish

            def timed(topic: str, delta: dict[str, Any], ts: float | None = None) -> None:
                if ts is not None and not topic.startswith("test/"):
                    arrived.append(time.time() - ts)
                publish(topic, delta, ts)

            fanout.core.publish = timed  # type: ignore[method-assign]
            http = HttpServer()
            fanout.install(http)
            listeners = await nursery.start(http.serve, "127.0.0.1", 0)
            await nursery.start(fanout.run)
            await nursery.start(mirror.run)
            print("port", listeners[0].socket.getsockname()[1], flush=True)
            with trio.open_signal_receiver(signal.SIGTERM) as signals:
                async for _ in signals:
                    break
            if arrived:
                tail = arrived[len(arrived) // 5:]  # past the start-up backlog
                print("arrival", pct(tail, 0.5), pct(tail, 0.99), len(tail), flush=True)
            nursery.cancel_scope.cancel()

    trio.run(main)


async def clients_main(port: int, n: int, seconds: float) -> tuple[list[float], int]:
    import cbor2
    import trio
    from trio_websocket import open_websocket_url

    latencies: list[float] = []
    frames = 0
    measuring = False

    async def client(task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        nonlocal frames
        async with open_websocket_url(f"ws://127.0.0.1:{port}/ws/live",
                                      subprotocols=["edgegw.live.v1.cbor"]) as ws:
            await ws.send_message(cbor2.dumps({"type": "subscribe", "topics": TOPICS}))
            task_status.started()
            while True:
                msg = cbor2.loads(await ws.get_message())  # type: ignore[arg-type]  # binary
                now = time.time()
                if msg.get("type") != "batch" or not measuring:
                    continue
                frames += 1
                for item in msg["items"]:
                    if (item["type"] == "delta" and item.get("ts")
                            and not item["topic"].startswith("test/")):
                        latencies.append(now - item["ts"][0])

    async with trio.open_nursery() as nursery:
        for _ in range(n):
            await nursery.start(client)
        await trio.sleep(2.0)  # snapshots first
        measuring = True
        await trio.sleep(seconds)
        measuring = False
        nursery.cancel_scope.cancel()
    return latencies, frames


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--role", choices=["bench", "owner", "node"], default="bench")
    parser.add_argument("--redis", default="")
    parser.add_argument("--prefix", default="bench")
    parser.add_argument("--rate", type=float, default=30_000, help="records/s (one tester)")
    parser.add_argument("--records", type=int, default=150_000, help="records in part 1")
    parser.add_argument("--tests-per-part", type=int, default=20)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--test-interval", type=float, default=0.5,
                        help="seconds between publications of a test/ topic (0: every flush)")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    if args.role == "owner":
        owner_main(args)
        return
    if args.role == "node":
        node_main(args)
        return
    if shutil.which("redis-server") is None:
        sys.exit("redis-server is needed")
    import trio

    workdir = Path(tempfile.mkdtemp(prefix="bench-redis-"))
    redis, port = start_redis(workdir)
    url = f"redis://127.0.0.1:{port}/0"
    try:
        runs = [trio.run(publish_and_mirror, url, args) for _ in range(args.repeat)]
        print(f"parts 1-2: {args.records} records per run, {args.tests_per_part} tests per "
              f"part, flush every {int(args.rate * 0.05)} records (50 ms at "
              f"{args.rate:.0f} records/s), test/ topics every {args.test_interval} s; "
              f"median of {args.repeat} runs (min..max)")
        for key in runs[0]:
            values = [r[key] for r in runs]
            print(f"  {key:24s} {statistics.median(values):12.3f}   "
                  f"({min(values):.3f} .. {max(values):.3f})")

        prefix = f"e2e{os.getpid()}"
        common = [sys.executable, __file__, "--redis", url, "--prefix", prefix,
                  "--rate", str(args.rate), "--seconds", str(args.seconds),
                  "--tests-per-part", str(args.tests_per_part),
                  "--test-interval", str(args.test_interval)]
        node = subprocess.Popen([*common, "--role", "node"], stdout=subprocess.PIPE, text=True)
        line = node.stdout.readline().split()  # type: ignore[union-attr]
        node_port = int(line[1])
        owner = subprocess.Popen([*common, "--role", "owner"], stdout=subprocess.PIPE,
                                 text=True)
        owner.stdout.readline()  # type: ignore[union-attr]
        cpu0 = {n: cpu_of(p.pid) for n, p in (("owner", owner), ("node", node),
                                              ("redis", redis))}
        t0 = time.monotonic()
        latencies, frames = trio.run(clients_main, node_port, args.clients, args.seconds)
        span = time.monotonic() - t0
        cpu1 = {n: cpu_of(p.pid) for n, p in (("owner", owner), ("node", node),
                                              ("redis", redis))}
        owner.wait(60)
        node.terminate()
        arrival = node.communicate(timeout=20)[0].split()
        if arrival[:1] == ["arrival"]:
            print(f"part 3: owner's publish -> applied by the other node's mirror: p50 "
                  f"{1000 * float(arrival[1]):.1f} ms, p99 {1000 * float(arrival[2]):.1f} ms "
                  f"({arrival[3]} entries; includes the <= 50 ms flush wait)")
        print(f"part 3: end to end, owner -> Redis -> other node -> {args.clients} clients, "
              f"{args.rate:.0f} records/s, {args.seconds:.0f} s")
        if latencies:
            print(f"  latency p50 {1000 * pct(latencies, 0.5):.1f} ms, "
                  f"p99 {1000 * pct(latencies, 0.99):.1f} ms, max "
                  f"{1000 * max(latencies):.1f} ms over {len(latencies)} items")
        print(f"  frames/s per client {frames / args.clients / args.seconds:.1f}")
        print("  CPU (share of one core): " + json.dumps(
            {n: round((cpu1[n] - cpu0[n]) / span, 3) for n in cpu0}))
    finally:
        redis.kill()
        redis.wait()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
