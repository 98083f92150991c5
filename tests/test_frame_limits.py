"""One huge input never stops the gateway (docs/spool.md, "Frame size").

A batch whose body is larger than a frame may be -- a quarter of ``spool.max_bytes``, or
``uplink.max_frame_bytes`` (the hub's limit) -- is stored as several frames; a record that
alone exceeds the limit is refused, counted, kept in the dead-letter file and reported to
the hub, and everything else keeps flowing, exactly once, across a crash between the parts.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, ClassVar

import cbor2
import trio
from hubtools import gateway_config

from edgegw.gateway import AFTER_KEY, Gateway
from edgegw.protocol import decode_body
from edgegw.records import GatewayEvent, SensorReading, from_wire
from edgegw.spool import DiskSpool, SpoolConfig

SMALL, BIG, GIANT = 10, 1500, 5000  # unit lengths; the spool below takes frames of 4 KiB


def reading(put: int, j: int, size: int) -> SensorReading:
    # a unit of its own: columnar bodies store a value shared by many records once
    return SensorReading("tester", 1.0, f"put{put}-{j}", float(j),
                         (f"{put}.{j}." * size)[:size])


class ScriptedSource:
    """Puts scripted batches; resuming from checkpoint ``i`` replays puts ``i, i+1, ...``
    exactly as before (as the STDF tail does)."""

    replays: ClassVar[bool] = True

    def __init__(self, puts: list[list[int]], checkpoint: Any = None) -> None:
        self.puts = puts
        self.resume = checkpoint if isinstance(checkpoint, int) else 0
        self.done = trio.Event()

    def records(self, i: int) -> list[SensorReading]:
        return [reading(i, j, size) for j, size in enumerate(self.puts[i])]

    async def run(self, sink: Any, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        for i in range(self.resume, len(self.puts)):
            await sink.put(self.records(i), checkpoint=i + 1)
        self.done.set()
        await trio.sleep_forever()


class SnapshotSpool(DiskSpool):
    """The real spool; a copy of its directory right after frame ``at`` is durable is what
    a SIGKILL at that point leaves behind."""

    def __init__(self, config: SpoolConfig, at: int, image: Path) -> None:
        super().__init__(config)
        self.at, self.image = at, image

    async def append(self, body: bytes, n_records: int, checkpoints: dict[str, Any]) -> int:
        seq = await super().append(body, n_records, checkpoints)
        if seq == self.at:
            await trio.to_thread.run_sync(shutil.copytree, self.directory, self.image)
        return seq


def config(tmp: Path, spool_dir: Path, **sections: Any) -> Any:
    # no hub: every frame stays in the spool; only full batches are cut while running
    return gateway_config(tmp, 1, batch={"max_records": 4, "max_delay_ms": 3_600_000},
                          spool={"dir": str(spool_dir), "max_bytes": 16384,
                                 "segment_bytes": 4096}, **sections)


async def run(cfg: Any, source: ScriptedSource, store: DiskSpool | None = None) -> Gateway:
    """Run a gateway until its source is done, then stop it cleanly (which stores what the
    batcher holds)."""
    gateway = Gateway(cfg, store=store, extra_sources=[("tester", source)])
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            await nursery.start(gateway.run)
            await source.done.wait()
            nursery.cancel_scope.cancel()
    return gateway


async def stored(spool_dir: Path) -> tuple[list[Any], dict[str, Any], list[int]]:
    """The records in the spool, its checkpoints, and each frame's body size."""
    async with DiskSpool.open(SpoolConfig(dir=str(spool_dir))) as spool:
        frames = spool.frames_from(1, 1000)
        checkpoints = dict(spool.checkpoints)
    records = []
    for f in frames:
        _, sources, wire = decode_body(f.body, 1 << 20)
        records.extend(from_wire(w, sources) for w in wire)
    return records, checkpoints, [len(f.body) for f in frames]


def names(records: list[Any]) -> list[str]:
    return [r.channel for r in records if isinstance(r, SensorReading)]


async def test_a_batch_over_the_spool_frame_limit_is_split_a_giant_record_refused(
        tmp_path: Path) -> None:
    puts = [[SMALL], [BIG, BIG, BIG], [GIANT], [SMALL, SMALL]]
    source = ScriptedSource(puts)
    spool_dir = tmp_path / "spool"
    gateway = await run(config(tmp_path / "gw", spool_dir), source)

    records, checkpoints, sizes = await stored(spool_dir)
    expected = [r.channel for i in range(len(puts)) for r in source.records(i)]
    assert names(records) == [n for n in expected if n != "put2-0"], "the rest, once, in order"
    assert checkpoints["tester"] == len(puts)
    assert max(sizes) <= 16384 // 4
    metrics = gateway.metrics.as_dict()
    assert metrics["gateway_records_rejected_total"] == {"reason=too_large,source=tester": 1}
    events = [r for r in records if isinstance(r, GatewayEvent)]
    assert [e.code for e in events] == ["records_rejected"]
    assert events[0].detail["records"] == 1
    raw = (tmp_path / "gw" / "dead-letter.cborseq").read_bytes()
    entry = cbor2.loads(raw[4:4 + int.from_bytes(raw[:4], "big")])
    assert entry["seq"] is None and "too large" in entry["reason"]
    _, src, wire = decode_body(entry["body"], 1 << 20)
    assert [from_wire(w, src).channel for w in wire] == ["put2-0"]


async def test_a_crash_between_the_parts_of_a_split_batch_stores_each_record_once(
        tmp_path: Path) -> None:
    # put 0 (1 record) and put 1 (4 records) fill batch 1 = [s, B, B, B]: too large for one
    # frame, it goes as two; the crash comes right after the first part is durable
    puts = [[SMALL], [BIG, BIG, BIG, SMALL], [SMALL]]
    live, image = tmp_path / "spool", tmp_path / "image"
    cfg = config(tmp_path / "a", live)
    assert cfg.spool is not None
    await run(cfg, ScriptedSource(puts), SnapshotSpool(cfg.spool, 1, image))
    records, checkpoints, _ = await stored(image)
    assert names(records) == ["put0-0", "put1-0"]
    assert checkpoints.get("tester") is None and checkpoints[AFTER_KEY] == {"tester": 2}

    source = ScriptedSource(puts, checkpoints.get("tester"))
    gateway = await run(config(tmp_path / "b", image), source)
    records, checkpoints, _ = await stored(image)
    expected = [r.channel for i in range(len(puts)) for r in source.records(i)]
    assert names(records) == expected, "every record stored exactly once, in order"
    assert checkpoints["tester"] == len(puts)
    assert gateway.metrics.as_dict()["gateway_replayed_records_skipped_total"] == {
        "source=tester": 2}


async def test_frames_stay_under_uplink_max_frame_bytes_so_the_hub_takes_them_all(
        tmp_path: Path) -> None:
    """``uplink.max_frame_bytes`` set to the hub's limit: a batch over it reaches the hub
    as several frames, none dead-lettered (before, such a frame was kept in the dead-letter
    file and its records never reached the hub)."""
    from hubtools import hub_config, start_hub

    from edgegw.hub.store import unpack_body

    records = [reading(0, j, 500) for j in range(30)] + [reading(1, 0, GIANT)]
    async with trio.open_nursery() as nursery:
        hub, port = await start_hub(nursery, hub_config(tmp_path / "hub", max_frame_bytes=4096))
        cfg = gateway_config(tmp_path / "gw", port,
                             uplink={"max_frame_bytes": 4096, "probe_interval_s": 0.1},
                             batch={"max_records": 100, "max_delay_ms": 20})
        gateway = Gateway(cfg)
        await nursery.start(gateway.run)
        await gateway.sink.put(records, source="tester")
        with trio.fail_after(15):
            while True:
                await gateway.flush()
                if gateway.store.first_unacked >= gateway.store.next_seq > 4:
                    break
                await trio.sleep(0.02)
        rows = await hub.store.query("SELECT codec, body FROM frames")
        got = [from_wire(w, src) for c, b in rows
               for _, src, wire in [decode_body(unpack_body(c, b), 1 << 20)] for w in wire]
        assert names(got) == [r.channel for r in records[:-1]]
        assert [e.code for e in got if isinstance(e, GatewayEvent)] == ["records_rejected"]
        assert gateway.metrics.counter("uplink_frames_rejected_total").total() == 0
        assert hub.stats()["gateways"]["ate-01"]["frames_rejected"] == 0
        nursery.cancel_scope.cancel()
