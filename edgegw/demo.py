"""``edgegw demo``: a hub, a gateway and a simulated tester in one process.

Embedded defaults only: no config file, no broker, data in a temporary directory.  By
default the simulated tester writes real STDF files, one per wafer, in real time, and the
gateway tails them as it would on a tester host (``--source records`` skips the files and
produces records directly).  On exit it stops the tester, waits for the hub to acknowledge
everything, and compares what the tester produced (for STDF: every record the written
files map to, decoded afresh) with what the hub applied, record id by record id.
"""

from __future__ import annotations

import argparse
import dataclasses
import secrets
import shutil
import signal
import tempfile
import time
from pathlib import Path
from typing import Any

import trio

from .config import ConfigError, apply_overrides, build
from .gateway.config import GatewayConfig, build_gateway_config
from .gateway.service import Gateway
from .hub.app import Hub
from .hub.config import HubConfig
from .protocol import IntervalSet
from .records import PartResult, Record, SensorWindow
from .sim.source import SimulatedTesterSource
from .sim.stdf_tester import stdf_chunks, write_files
from .sim.tester import TesterProfile
from .stdf import StdfDecoder
from .stdf.mapping import RecordMapper

GATEWAY_ID = "demo-gw"


class ReceiptCounter:
    """A hub consumer that counts distinct record ids and the duplicates among them; the
    sensor feed's windows are counted apart from the tester's records."""

    def __init__(self) -> None:
        self.rids: dict[str, IntervalSet] = {}
        self.duplicates = 0
        self.parts = 0
        self.good = 0
        self.sensor_windows = 0

    def on_records(self, gateway_id: str, first_rid: int, records: list[Record]) -> None:
        seen = self.rids.setdefault(gateway_id, IntervalSet())
        for i, r in enumerate(records):
            rid = first_rid + i
            if rid in seen:
                self.duplicates += 1
                continue
            seen.add(rid)
            if type(r) is SensorWindow:
                self.sensor_windows += 1
            elif type(r) is PartResult:
                self.parts += 1
                self.good += bool(r.passed)

    def on_gateway(self, gateway_id: str, connected: bool, now: float) -> None:
        pass

    def received(self, gateway_id: str) -> int:
        """The tester's records applied (sensor windows not counted)."""
        s = self.rids.get(gateway_id)
        return (s.count() if s else 0) - self.sensor_windows


class _StdfTester:
    """The STDF tester simulator writing one file per wafer into ``out`` in real time."""

    def __init__(self, out: Path, args: argparse.Namespace) -> None:
        self.out = out
        self.args = args
        self.scope = trio.CancelScope()
        self.done = trio.Event()

    async def run(self) -> None:
        # lot after lot, 25 wafers each, as a tester on a floor
        profile = TesterProfile(sites=self.args.sites, wafers=25, seed=1)
        chunks = stdf_chunks(profile, lots=0, per_wafer=True,
                             parts_per_second=self.args.parts_per_second)
        with self.scope:
            await write_files(self.out, chunks, parts_per_second=self.args.parts_per_second)
        self.done.set()

    async def stop(self) -> int:
        """Stop writing (the last file stays unfinished, as when a tester stops) and count
        the records the files written map to: what the hub must end up with."""
        self.scope.cancel()
        await self.done.wait()
        return await trio.to_thread.run_sync(expected_records, self.out)


def expected_records(directory: Path) -> int:
    """Records the STDF files in ``directory`` map to, decoded and mapped afresh."""
    total = 0
    for path in sorted(directory.glob("*.stdf")):
        decoder = StdfDecoder()
        decoder.feed(path.read_bytes())
        records = list(decoder.records())
        mapper = RecordMapper("tester")
        total += len(mapper.map_all(records, 0.0))
        if records and records[-1].name == "MRR":
            total += len(mapper.close(0.0))
    return total


#: the top-level tables of a hub config: a --set under one of them goes to the hub
_HUB_TABLES = tuple(f"{f.name}." for f in dataclasses.fields(HubConfig))


def _split_overrides(overrides: list[str]) -> tuple[list[str], list[str]]:
    hub = [o for o in overrides if o.startswith(_HUB_TABLES)]
    return hub, [o for o in overrides if o not in hub]


async def run_demo(args: argparse.Namespace) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="edgegw-demo-"))
    try:
        return await _run(args, tmp)
    finally:
        await trio.to_thread.run_sync(lambda: shutil.rmtree(tmp, ignore_errors=True))


def demo_configs(args: argparse.Namespace, tmp: Path, token: str,
                 port: int) -> tuple[HubConfig, GatewayConfig]:
    """The demo's hub and gateway configs, ``--set`` overrides applied (a key under a hub
    config's tables to the hub, the rest to the gateway); one ConfigError lists every
    problem of both."""
    hub_over, gw_over = _split_overrides(list(args.overrides))
    errors: list[str] = []
    hub_cfg = gw_cfg = None
    try:
        hub_cfg = build(HubConfig, apply_overrides({
            "hub": {"port": args.port, "data_dir": str(tmp / "hub")},
            "gateways": {GATEWAY_ID: {"token": token}},
        }, hub_over), "<demo>")
    except ConfigError as exc:
        errors.extend(exc.errors)
    stdf_dir = tmp / "stdf"
    if args.source == "stdf":
        source_cfg = {"name": "tester", "type": "stdf", "paths": [str(stdf_dir)],
                      "poll_interval": 0.1}
    else:
        source_cfg = {"name": "tester", "type": "simulated",
                      "parts_per_second": args.parts_per_second, "sites": args.sites}
    try:
        gw_cfg = build_gateway_config(apply_overrides({
            "gateway": {"id": GATEWAY_ID, "token": token, "state_dir": str(tmp / "gateway"),
                        "hub_url": f"ws://127.0.0.1:{port}/ws/gateway"},
            "sources": [source_cfg, {"name": "sensors", "type": "simulated-sensors",
                                     "tester": "demo-ate"}],
        }, gw_over), "<demo>")
    except ConfigError as exc:
        errors.extend(exc.errors)
    if errors:
        raise ConfigError(errors)
    assert hub_cfg is not None and gw_cfg is not None
    return hub_cfg, gw_cfg


async def _run(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    token = secrets.token_hex(16)
    # every config problem stops the demo before anything starts
    hub_cfg, _ = demo_configs(args, tmp, token, args.port or 8765)
    app = Hub(hub_cfg)
    hub = app.ingest
    counter = ReceiptCounter()
    hub.add_consumer(counter)
    started = time.monotonic()
    async with trio.open_nursery() as nursery:
        port = await nursery.start(app.run)
        print(f"edgegw demo: dashboard at http://127.0.0.1:{port}/  (stats: /api/stats)",
              flush=True)
        stdf_dir = tmp / "stdf"
        _, gw_cfg = demo_configs(args, tmp, token, port)
        gateway = Gateway(gw_cfg)
        await nursery.start(gateway.run)
        tester = _StdfTester(stdf_dir, args) if args.source == "stdf" else None
        if tester is not None:
            nursery.start_soon(tester.run)
        source = gateway.sources[0][1]
        print(f"edgegw demo: simulated {args.sites}-site tester running"
              + (f", writing STDF into {stdf_dir}" if tester else "")
              + (f" for {args.duration:g} s" if args.duration else "; Ctrl-C to stop"),
              flush=True)

        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async def wait_signal() -> None:
                async for _ in signals:
                    stop_scope.cancel()
                    return

            with trio.CancelScope() as stop_scope:
                nursery.start_soon(wait_signal)
                if args.duration:
                    stop_scope.deadline = trio.current_time() + args.duration
                while True:
                    await trio.sleep(2)
                    print(f"  parts tested {counter.parts:>6}  records applied by the hub "
                          f"{counter.received(GATEWAY_ID):>8}", flush=True)

            # a clean stop: the tester stops, the gateway catches up, the hub acks everything
            if tester is not None:
                produced = await tester.stop()
                with trio.move_on_after(15):
                    while counter.received(GATEWAY_ID) < produced:  # noqa: ASYNC110
                        await trio.sleep(0.05)
            else:
                assert isinstance(source, SimulatedTesterSource)
                source.stop()
                await trio.sleep(0.05)
                produced = source.produced
            await gateway.drain(15)
            nursery.cancel_scope.cancel()

    elapsed = time.monotonic() - started
    received = counter.received(GATEWAY_ID)
    stats = hub.stats()["gateways"].get(GATEWAY_ID, {})
    summary = {
        "produced": produced,
        "received": received,
        "lost": max(0, produced - received),
        "duplicates": counter.duplicates,
        "duplicate_frames_dropped": stats.get("duplicates_dropped", 0),
        "frames": stats.get("frames_applied", 0),
        "parts": counter.parts,
        "sensor_windows": counter.sensor_windows,
        "yield": round(counter.good / counter.parts, 4) if counter.parts else None,
        "seconds": round(elapsed, 2),
    }
    print(f"\nedgegw demo summary: the simulated tester produced {produced} records; the hub "
          f"applied {received} in {summary['frames']} frames over {elapsed:.1f} s.")
    print(f"  parts tested: {counter.parts}, yield {summary['yield']}; lost {summary['lost']}, "
          f"duplicates {summary['duplicates']}; sensor windows {counter.sensor_windows}")
    return summary


__all__ = ["demo_configs", "expected_records", "run_demo"]
