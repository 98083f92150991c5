"""One cluster node's ingest into PostgreSQL: records/s with durable commits, CPU per record,
and PostgreSQL bytes per record -- beside the single hub's SQLite store on the same load.

Two measurements, each a median over ``--runs``:

- ``store``: pre-built frames (tester parts: 8 parametric results + 1 part result, lots
  rotating per frame) committed straight into the store by ``--gateways`` concurrent
  committers (one gateway each, one frame of ``--batch`` records per commit, as the
  ingest does under load).  CPU per record in the node (this process) and in the
  PostgreSQL backends serving it (``/proc``: the server must be local), WAL bytes per
  record (``pg_current_wal_insert_lsn`` before and after: other users of the server add to it);
  then ``pg_total_relation_size`` of every table per record (indexes and TOAST included).
- ``bytes``: PostgreSQL bytes per record (every table, ``pg_total_relation_size``) for
  the tester data of ``bench/hub_bytes.py`` (the simulated tester's STDF and the real
  galaxy-a530-lot2 file, decoded and mapped as a gateway does), frames of 900 records,
  16 frames per commit -- beside the SQLite store's files on the same data.
- ``e2e``: a real gateway in this process sends to a node in its own process (``Ingest`` on
  a ``ClusterStore``, or on the SQLite ``HubStore``), records/s first put -> all applied.

    python bench/cluster_pg.py [--records 200000] [--runs 3] [--batch 2000] [--gateways 1 4]
        [--dsn "host=127.0.0.1 port=5432 user=postgres dbname=postgres"] [--skip-e2e]
        [--skip-bytes]

Each run uses a fresh database ``edgegw_bench_<random>`` on the server (dropped after).
``drive_store`` is the piece another bench (bench/cluster.py) may import to load a store.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import psycopg
import psycopg.conninfo
import trio

from edgegw.config import build
from edgegw.hub.cluster.pgstore import ClusterStore
from edgegw.hub.config import HubConfig
from edgegw.hub.ingest import Ingest
from edgegw.hub.store import FrameToApply, HubStore
from edgegw.protocol import encode_body
from edgegw.records import ParametricResult, PartResult, Record

DEFAULT_DSN = "host=127.0.0.1 port=5432 user=postgres dbname=postgres"


def make_part(i: int, lot: str) -> list[Record]:
    now = time.time()
    recs: list[Record] = [ParametricResult("tester", now, lot, 1, i % 8, str(i), 100 + t,
                                           f"TEST_{t}", 1.0 + t * 0.01, 0.0, 2.0, "V", True)
                          for t in range(8)]
    recs.append(PartResult("tester", now, lot, "W1", 1, i % 8, str(i), i % 50, i // 50,
                           1, 1, True, False, 0, 120, 8))
    return recs


def make_frames(gateway: str, n_records: int, batch: int) -> list[FrameToApply]:
    """Frames of ``batch`` records (whole parts), each of one lot, lots rotating."""
    frames = []
    rid = 1
    seq = 0
    part = 0
    while rid <= n_records:
        seq += 1
        lot = f"LOT-{gateway}-{seq % 16}"
        records: list[Record] = []
        while len(records) + 9 <= max(batch, 9):
            records.extend(make_part(part, lot))
            part += 1
        frames.append(FrameToApply(gateway, "e1", seq, rid, len(records),
                                   encode_body(rid, records), records=records))
        rid += len(records)
    return frames


async def drive_store(store: Any, frames_by_gateway: dict[str, list[FrameToApply]],
                      generations: dict[str, int] | None = None) -> float:
    """Commit every gateway's frames, one frame per commit, the gateways concurrently;
    seconds taken.  ``store``: a ClusterStore (``generations`` from ``claim_gateway``) or
    a HubStore."""
    async def one(gw: str, frames: list[FrameToApply]) -> None:
        for f in frames:
            if generations is None:
                await store.commit([f])
            else:
                await store.commit([f], {gw: generations[gw]})

    t0 = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for gw, frames in frames_by_gateway.items():
            nursery.start_soon(one, gw, frames)
    return time.perf_counter() - t0


def backend_cpu_s(pids: list[int]) -> float:
    """User + system CPU seconds of these (local) processes so far."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # not on this machine, or gone
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15)
    return total / tick


def fresh_db(server: str) -> tuple[str, str]:
    name = f"edgegw_bench_{secrets.token_hex(4)}"
    with psycopg.connect(server, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    params = psycopg.conninfo.conninfo_to_dict(server)
    params["dbname"] = name
    return name, psycopg.conninfo.make_conninfo(**params)  # type: ignore[arg-type]


def drop_db(server: str, name: str) -> None:
    with psycopg.connect(server, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


async def store_run(kind: str, server: str, n_records: int, batch: int, gateways: int,
                    tmp: Path) -> dict[str, float]:
    per = n_records // gateways
    frames = {f"gw{g}": make_frames(f"gw{g}", per, batch) for g in range(gateways)}
    total = sum(f.n_records for fs in frames.values() for f in fs)
    name = ""
    if kind == "pg":
        name, dsn = fresh_db(server)
        store: Any = ClusterStore(dsn, "bench", partitions=64, connections=max(4, gateways))
        await store.open()
        gens = {gw: await store.claim_gateway(gw) for gw in frames}
    else:
        store = HubStore(tmp / f"hub-{secrets.token_hex(4)}.sqlite3")
        await store.open()
        gens = None
    try:
        if kind == "pg":
            wal0 = (await store.query("SELECT pg_current_wal_insert_lsn()::text"))[0][0]
        cpu0 = time.process_time()
        elapsed = await drive_store(store, frames, gens)
        cpu = time.process_time() - cpu0
        out = {"rate": total / elapsed, "cpu_us": cpu / total * 1e6}
        if kind == "pg":
            out["wal_bytes"] = float((await store.query(
                "SELECT pg_current_wal_insert_lsn() - %s::pg_lsn", (wal0,)))[0][0]) / total
            # the CPU of this database's backends (they all started for this run); the
            # server's shared processes (WAL writer, checkpointer) are not in it
            pids = [r[0] for r in await store.query(
                "SELECT pid FROM pg_stat_activity WHERE datname = current_database()")]
            out["pg_cpu_us"] = backend_cpu_s(pids) / total * 1e6
            sizes = await store.table_bytes()
            out["bytes"] = sum(sizes.values()) / total
            out["log_bytes"] = sizes["partition_log"] / total
            out["frames_bytes"] = (sizes["frames"] + sizes["applied"]) / total
        else:
            await store.close()
            size = await trio.to_thread.run_sync(os.path.getsize, store.path)
            out["bytes"] = size / total
    finally:
        if kind == "pg":
            await store.close()
            drop_db(server, name)
    return out


# -- bytes per record on tester data ------------------------------------------------------
async def pg_bytes_of(server: str, records: list[Record], per_frame: int = 900,
                      ) -> tuple[float, float]:
    """(table bytes, WAL bytes) per record."""
    name, dsn = fresh_db(server)
    store = ClusterStore(dsn, "bench", partitions=64)
    try:
        await store.open()
        gen = await store.claim_gateway("ate-01")
        # the fixed part (partition heads, empty tables' and indexes' first pages) is not
        # per record: measured before, subtracted
        empty = sum((await store.table_bytes()).values())
        wal0 = (await store.query("SELECT pg_current_wal_insert_lsn()::text"))[0][0]
        frames = [FrameToApply("ate-01", "e1", i // per_frame + 1, i + 1,
                               len(records[i:i + per_frame]),
                               encode_body(i + 1, records[i:i + per_frame]),
                               records=records[i:i + per_frame])
                  for i in range(0, len(records), per_frame)]
        for i in range(0, len(frames), 16):  # group commits, as under load
            await store.commit(frames[i:i + 16], {"ate-01": gen})
        wal = (await store.query("SELECT pg_current_wal_insert_lsn() - %s::pg_lsn",
                                 (wal0,)))[0][0]
        sizes = await store.table_bytes()
        return (sum(sizes.values()) - empty) / len(records), float(wal) / len(records)
    finally:
        await store.close()
        drop_db(server, name)


def tester_bytes(server: str) -> None:
    import gzip

    sys.path.insert(0, str(Path(__file__).parent))
    import hub_bytes  # the same data and the same decoding as the SQLite figure

    from edgegw.sim.stdf_tester import stdf_chunks
    from edgegw.sim.tester import TesterProfile

    datasets = [("simulated tester, 3 lots",
                 [c.data for c in stdf_chunks(TesterProfile(wafers=3, wafer_diameter_dies=40),
                                              lots=3)])]
    galaxy = hub_bytes.shared_data() / "galaxy-a530-lot2.stdf.gz"
    if galaxy.exists():
        data = gzip.decompress(galaxy.read_bytes())
        datasets.append(("galaxy-a530-lot2 (real)",
                         [data[i:i + 65536] for i in range(0, len(data), 65536)]))
    print(f"{'data':28} {'records':>9} {'STDF B/rec':>11} {'PG B/rec':>9} {'PG WAL B/rec':>13}"
          f" {'SQLite B/rec':>13}")
    for name, chunks in datasets:
        records = hub_bytes.records_of(chunks)
        stdf = sum(map(len, chunks))
        pg, wal = trio.run(pg_bytes_of, server, records)
        sq = trio.run(hub_bytes.store_bytes, records, 900) / len(records)
        print(f"{name:28} {len(records):9d} {stdf / len(records):11.1f} {pg:9.1f} {wal:13.1f}"
              f" {sq:13.1f}")


# -- end to end: a node in its own process --------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(kind: str, port: int, dsn: str, data_dir: str) -> None:
    """The node process: ``Ingest`` on a ClusterStore (``pg``) or the SQLite store."""
    cfg = build(HubConfig, {"hub": {"port": port, "data_dir": data_dir,
                                    "retain_frames_hours": 0},
                            "gateways": {"bench": {"token": "bench"}}})

    async def main() -> None:
        store = ClusterStore(dsn, "bench-node", partitions=64) if kind == "pg" else None
        await Ingest(cfg, store=store).run()

    trio.run(main)


def applied(port: int) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/stats", timeout=5) as r:
        return json.loads(r.read())["gateways"].get("bench", {}).get("records_applied", 0)


async def e2e_once(port: int, n_records: int, batch: int, tmp: Path) -> tuple[float, int]:
    from edgegw.gateway.config import GatewayConfig
    from edgegw.gateway.service import Gateway

    cfg = build(GatewayConfig, {
        "gateway": {"id": "bench", "token": "bench", "state_dir": str(tmp),
                    "hub_url": f"ws://127.0.0.1:{port}/ws/gateway"},
        "batch": {"max_records": batch, "max_delay_ms": 50},
        "queue": {"max_frames": 256},
    })
    # one lot, as a tester streams: each frame is one partition's (no split)
    parts = [make_part(i, "LOT1") for i in range(64)]
    base = await trio.to_thread.run_sync(applied, port)
    async with trio.open_nursery() as nursery:
        gw = Gateway(cfg)
        await nursery.start(gw.run)
        t0 = time.perf_counter()
        sent = i = 0
        while sent < n_records:
            group = [r for p in parts[i % 8 * 8: i % 8 * 8 + 8] for r in p]  # 72 records
            await gw.sink.put(group, source="tester")
            sent += len(group)
            i += 1
        await gw.flush()
        while await trio.to_thread.run_sync(applied, port) - base < sent:
            await trio.sleep(0.01)
        elapsed = time.perf_counter() - t0
        nursery.cancel_scope.cancel()
    return elapsed, sent


def e2e(kind: str, server: str, n_records: int, batch: int, runs: int) -> list[float]:
    port = free_port()
    name, dsn = fresh_db(server) if kind == "pg" else ("", "")
    with tempfile.TemporaryDirectory(dir="/var/tmp") as tmp:
        node = subprocess.Popen([sys.executable, __file__, "serve", kind, str(port), dsn,
                                 str(Path(tmp) / "hub")],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            for _ in range(200):
                try:
                    applied(port)
                    break
                except OSError:
                    time.sleep(0.1)
            rates = []
            for run in range(runs):
                elapsed, sent = trio.run(e2e_once, port, n_records, batch,
                                         Path(tmp) / f"gw{run}")
                rates.append(sent / elapsed)
            return rates
        finally:
            node.terminate()
            node.wait()
            if name:
                drop_db(server, name)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "serve":
        serve(sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5])
        return
    ap = argparse.ArgumentParser()
    ap.add_argument("--records", type=int, default=200_000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--batch", type=int, default=2000)
    ap.add_argument("--gateways", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--dsn", default=DEFAULT_DSN)
    ap.add_argument("--skip-e2e", action="store_true")
    ap.add_argument("--skip-bytes", action="store_true")
    args = ap.parse_args()
    with psycopg.connect(args.dsn) as conn:
        settings = {k: conn.execute(f"SHOW {k}").fetchone()[0]  # type: ignore[index]
                    for k in ("server_version", "synchronous_commit", "fsync")}
    print(f"PostgreSQL {settings['server_version']}, synchronous_commit="
          f"{settings['synchronous_commit']}, fsync={settings['fsync']}; "
          f"{args.records} records, frames of {args.batch}, median of {args.runs} runs")
    with tempfile.TemporaryDirectory(dir="/var/tmp") as tmp:
        for g in args.gateways:
            res: dict[str, list[dict[str, float]]] = {"pg": [], "sqlite": []}
            for _ in range(args.runs):
                for kind in ("pg", "sqlite"):  # interleaved: both see the same machine load
                    res[kind].append(trio.run(store_run, kind, args.dsn, args.records,
                                              args.batch, g, Path(tmp)))
            med = {k: {m: statistics.median(r[m] for r in v) for m in v[0]}
                   for k, v in res.items()}
            pg, sq = med["pg"], med["sqlite"]
            print(f"store, {g} gateway(s): PostgreSQL {pg['rate']:,.0f} records/s "
                  f"({pg['cpu_us']:.1f} us CPU/record in the node, {pg['pg_cpu_us']:.1f} us "
                  f"in PostgreSQL backends, {pg['wal_bytes']:.1f} WAL bytes/record) | SQLite "
                  f"{sq['rate']:,.0f} records/s ({sq['cpu_us']:.1f} us) | PG/SQLite "
                  f"{pg['rate'] / sq['rate']:.2f}")
            runs = {k: ", ".join(f"{r['rate']:,.0f}" for r in v) for k, v in res.items()}
            print(f"    runs PG: {runs['pg']}; SQLite: {runs['sqlite']}")
            print(f"    bytes/record: PostgreSQL {pg['bytes']:.1f} (partition log "
                  f"{pg['log_bytes']:.1f}, frames + applied {pg['frames_bytes']:.1f}) | "
                  f"SQLite {sq['bytes']:.1f}")
    if not args.skip_bytes:
        tester_bytes(args.dsn)
    if not args.skip_e2e:
        pg_rates = e2e("pg", args.dsn, args.records, args.batch, args.runs)
        sq_rates = e2e("sqlite", args.dsn, args.records, args.batch, args.runs)
        print(f"end to end, gateway -> node process: PostgreSQL median "
              f"{statistics.median(pg_rates):,.0f} records/s "
              f"({', '.join(f'{r:,.0f}' for r in pg_rates)}) | SQLite median "
              f"{statistics.median(sq_rates):,.0f} "
              f"({', '.join(f'{r:,.0f}' for r in sq_rates)}) | PG/SQLite "
              f"{statistics.median(pg_rates) / statistics.median(sq_rates):.2f}")


if __name__ == "__main__":
    main()
