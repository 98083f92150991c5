"""One huge input never stops the gateway (docs/spool.md, "Frame size").

A batch whose body is larger than a frame may be -- a quarter of ``spool.max_bytes``, or
``uplink.max_frame_bytes`` (the hub's limit) -- is stored as several frames; a record that
alone exceeds the limit is refused, counted, kept in the dead-letter file and reported to
the hub, and everything else keeps flowing, exactly once, across a crash between the parts.

A stored frame over the *hub's* limits (a v1 hub's rows, its ``max_records_per_frame``, a
smaller ``max_frame_bytes``) reaches it as several frames, exactly once across a crash in
the middle of the split (docs/protocol.md, "Frames over the hub's limits"); a checkpoint
too large for a frame is refused, its records stored (docs/spool.md, "Frame size").
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, ClassVar

import cbor2
import trio
from disktools import DeadLetterFile, HeldCommits
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

    async def append(self, body: bytes, n_records: int, checkpoints: dict[str, Any],
                     **kwargs: Any) -> int:
        seq = await super().append(body, n_records, checkpoints, **kwargs)
        if seq == self.at:
            await trio.to_thread.run_sync(shutil.copytree, self.directory, self.image)
        return seq


def config(tmp: Path, spool_dir: Path, **sections: Any) -> Any:
    # no hub: every frame stays in the spool; only full batches are cut while running
    batch = {"max_records": 4, "max_delay_ms": 3_600_000, **sections.pop("batch", {})}
    return gateway_config(tmp, 1, batch=batch,
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
    assert metrics["gateway_dead_letter_bytes"] == len(raw)


async def test_a_crash_between_the_parts_of_a_split_batch_stores_each_record_once(
        tmp_path: Path) -> None:
    # put 0 (1 record) and put 1 (4 records) fill batch 1 = [s, B, B, B]: too large for one
    # frame, it goes as two; the crash comes right after the first part is durable.  That
    # part carries the checkpoint of put 0, which ends in it, and counts put 1's record
    # after it (docs/spool.md, "Frame size")
    puts = [[SMALL], [BIG, BIG, BIG, SMALL], [SMALL]]
    live, image = tmp_path / "spool", tmp_path / "image"
    cfg = config(tmp_path / "a", live)
    assert cfg.spool is not None
    await run(cfg, ScriptedSource(puts), SnapshotSpool(cfg.spool, 1, image))
    records, checkpoints, _ = await stored(image)
    assert names(records) == ["put0-0", "put1-0"]
    assert checkpoints["tester"] == 1 and checkpoints[AFTER_KEY] == {"tester": 1}

    source = ScriptedSource(puts, checkpoints.get("tester"))
    gateway = await run(config(tmp_path / "b", image), source)
    records, checkpoints, _ = await stored(image)
    expected = [r.channel for i in range(len(puts)) for r in source.records(i)]
    assert names(records) == expected, "every record stored exactly once, in order"
    assert checkpoints["tester"] == len(puts)
    assert gateway.metrics.as_dict()["gateway_replayed_records_skipped_total"] == {
        "source=tester": 1}


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


# -- the hub's own limits: frames stored before the gateway knew them ----------------------

async def hub_records(hub: Any) -> list[tuple[int, Any]]:
    """Every record the hub applied, with its record id, in record id order."""
    from edgegw.hub.store import unpack_body

    rows = await hub.store.query("SELECT codec, body FROM frames")
    got = []
    for codec, body in rows:
        first_rid, src, wire = decode_body(unpack_body(codec, body), 1 << 20)
        got += [(first_rid + i, from_wire(w, src)) for i, w in enumerate(wire)]
    return sorted(got, key=lambda x: x[0])


async def until_all_acked(gateway: Gateway, frames: int) -> None:
    with trio.fail_after(30):
        while not (gateway.store.next_seq > frames
                   and gateway.store.first_unacked >= gateway.store.next_seq):
            await gateway.flush()
            await trio.sleep(0.02)


def shared_unit_readings(n: int, unit: int = 400) -> list[SensorReading]:
    """Readings sharing one long unit: a column holds it once, each v1 row once per record,
    so the rows of a frame take many times its stored columnar body."""
    return [SensorReading("tester", 1.0, f"r{j}", float(j), "u" * unit) for j in range(n)]


async def test_a_columnar_frame_too_large_as_v1_rows_reaches_a_v1_hub_whole(
        tmp_path: Path) -> None:
    """A v2 gateway stores columns; a v1 hub gets rows, here 8x larger than the stored
    body and over the hub's limit.  The frame goes as several frames that each fit (the
    first under its own seq, the rest stored as new frames), every record once with its
    record id; nothing dead-lettered (before: the whole frame went to the dead-letter
    file and its records never reached the hub)."""
    from hubtools import hub_config, start_hub

    records = shared_unit_readings(40)
    async with trio.open_nursery() as nursery:
        hub, port = await start_hub(nursery, hub_config(
            tmp_path / "hub", max_frame_bytes=4096, max_protocol_version=1))
        cfg = gateway_config(tmp_path / "gw", port,
                             uplink={"max_frame_bytes": 4096, "probe_interval_s": 0.1},
                             batch={"max_records": 100, "max_delay_ms": 20})
        gateway = Gateway(cfg)
        await nursery.start(gateway.run)
        await gateway.sink.put(records, source="tester")
        await until_all_acked(gateway, 1)
        got = await hub_records(hub)
        assert [r.channel for _, r in got] == [r.channel for r in records]
        assert [rid for rid, _ in got] == list(range(1, len(records) + 1))
        assert gateway.metrics.counter("uplink_frames_rejected_total").total() == 0
        assert gateway.metrics.counter("uplink_frames_split_total").total() == 1
        assert hub.stats()["gateways"]["ate-01"]["frames_rejected"] == 0
        assert not (tmp_path / "gw" / "dead-letter.cborseq").exists()
        nursery.cancel_scope.cancel()


async def test_a_frame_over_the_hubs_max_records_reaches_it_as_several(tmp_path: Path) -> None:
    """``batch.max_records`` above the hub's ``max_records_per_frame`` (learned at WELCOME):
    each frame stored over it before the gateway knew it (the hub is started after the
    put) is sent as frames of at most the hub's limit, none lost.  The store is full (a
    queue of one frame, ``block``): the parts are stored past its cap, as the sender
    cannot wait for room that only its sending frees."""
    from hubtools import hub_config, start_hub
    from ports import free_port

    records = [reading(0, j, 5) for j in range(95)]
    port = free_port()
    async with trio.open_nursery() as nursery:
        cfg = gateway_config(tmp_path / "gw", port, uplink={"probe_interval_s": 0.1},
                             batch={"max_records": 50, "max_delay_ms": 20},
                             queue={"max_frames": 1})
        gateway = Gateway(cfg)
        await nursery.start(gateway.run)
        await gateway.sink.put(records, source="tester")
        hub, _ = await start_hub(nursery, hub_config(tmp_path / "hub", port=port,
                                                     max_records_per_frame=10))
        await until_all_acked(gateway, 1)
        assert gateway.metrics.counter("uplink_frames_split_total").total() >= 1
        got = await hub_records(hub)
        assert [r.channel for _, r in got] == [r.channel for r in records]
        assert [rid for rid, _ in got] == list(range(1, len(records) + 1))
        sizes = await hub.store.query("SELECT n_records FROM frames")
        assert max(n for (n,) in sizes) <= 10
        assert gateway.metrics.counter("uplink_frames_rejected_total").total() == 0
        assert hub.stats()["gateways"]["ate-01"]["frames_rejected"] == 0
        nursery.cancel_scope.cancel()


async def test_a_record_alone_over_a_smaller_hubs_limit_is_dead_lettered_the_rest_flow(
        tmp_path: Path) -> None:
    """``uplink.max_frame_bytes`` above the hub's: a frame the gateway stored whole is cut
    for the hub, and the one record that alone is over the hub's limit is kept in the
    dead-letter file with a stand-in event in its place; every other record arrives."""
    from hubtools import hub_config, start_hub

    records = ([reading(0, j, 500) for j in range(6)] + [reading(1, 0, GIANT)]
               + [reading(2, j, 500) for j in range(6)])
    async with trio.open_nursery() as nursery:
        hub, port = await start_hub(nursery, hub_config(tmp_path / "hub", max_frame_bytes=4096))
        cfg = gateway_config(tmp_path / "gw", port,
                             uplink={"max_frame_bytes": 65536, "probe_interval_s": 0.1},
                             batch={"max_records": 100, "max_delay_ms": 20})
        gateway = Gateway(cfg)
        await nursery.start(gateway.run)
        await gateway.sink.put(records, source="tester")
        await until_all_acked(gateway, 1)
        got = [r for _, r in await hub_records(hub)]
        assert names(got) == [r.channel for r in records if r.channel != "put1-0"]
        assert [e.code for e in got if isinstance(e, GatewayEvent)] == ["frame_dead_lettered"]
        assert gateway.metrics.counter("uplink_frames_rejected_total").total() == 1
        raw = (tmp_path / "gw" / "dead-letter.cborseq").read_bytes()
        entry = cbor2.loads(raw[4:4 + int.from_bytes(raw[:4], "big")])
        assert len(raw) == 4 + int.from_bytes(raw[:4], "big"), "one entry"
        _, src, wire = decode_body(entry["body"], 1 << 20)
        assert [from_wire(w, src).channel for w in wire] == ["put1-0"]
        nursery.cancel_scope.cancel()


async def test_a_crash_while_a_frame_is_split_for_the_hub_sends_each_record_once(
        tmp_path: Path) -> None:
    """The parts of a split frame are stored (durable) before the first part is sent under
    the frame's seq, each carrying how far the split got.  A crash after the first new
    part: the restarted gateway sends the frame's first part only, resumes the split
    where it stopped, and the hub applies each record once."""
    from hubtools import hub_config, start_hub

    records = shared_unit_readings(40)
    image = tmp_path / "image"

    def gw_config(tmp: Path, port: int, spool_dir: Path) -> Any:
        return gateway_config(tmp, port, uplink={"max_frame_bytes": 4096,
                                                 "probe_interval_s": 0.1},
                              batch={"max_records": 100, "max_delay_ms": 20},
                              spool={"dir": str(spool_dir)})

    async with trio.open_nursery() as nursery:
        _, port = await start_hub(nursery, hub_config(
            tmp_path / "hub-a", max_frame_bytes=4096, max_protocol_version=1))
        cfg = gw_config(tmp_path / "a", port, tmp_path / "spool")
        assert cfg.spool is not None
        gateway = Gateway(cfg, store=SnapshotSpool(cfg.spool, 2, image))
        await nursery.start(gateway.run)
        await gateway.sink.put(records, source="tester")
        await until_all_acked(gateway, 1)
        nursery.cancel_scope.cancel()
    assert image.exists(), "frame 1 was split: its second part is frame 2"

    async with trio.open_nursery() as nursery:  # a fresh hub: it gets all the image holds
        hub, port = await start_hub(nursery, hub_config(
            tmp_path / "hub-b", max_frame_bytes=4096, max_protocol_version=1))
        gateway = Gateway(gw_config(tmp_path / "b", port, image))
        await nursery.start(gateway.run)
        await until_all_acked(gateway, 1)
        got = await hub_records(hub)
        assert [rid for rid, _ in got] == list(range(1, len(records) + 1)), "each once"
        assert [r.channel for _, r in got] == [r.channel for r in records]
        assert gateway.metrics.counter("uplink_frames_rejected_total").total() == 0
        nursery.cancel_scope.cancel()


async def test_a_reject_of_a_split_frame_dead_letters_only_the_part_the_hub_got(
        tmp_path: Path) -> None:
    """A stored frame of 20 records whose first record the hub cannot take (a kind it
    does not know), cut for a hub of 7 records a frame: the hub rejects the frame's first
    part -- the 7 records sent under its seq -- and applies the other two parts.  The
    dead-letter file keeps those 7 records, not the 13 the hub applied (before, it kept
    the stored frame's whole body)."""
    from hubtools import hub_config, start_hub

    from edgegw.protocol import encode_body

    records = [reading(0, j, 5) for j in range(20)]
    first_rid, sources, rows = cbor2.loads(encode_body(1, records))
    rows[0] = [99, 0, 1.0]  # no such kind: the hub rejects the frame holding it
    spool_dir = tmp_path / "spool"
    async with DiskSpool.open(SpoolConfig(dir=str(spool_dir))) as spool:
        await spool.append(cbor2.dumps([first_rid, sources, rows]), len(rows), {})

    async with trio.open_nursery() as nursery:
        hub, port = await start_hub(nursery, hub_config(tmp_path / "hub",
                                                        max_records_per_frame=7))
        cfg = gateway_config(tmp_path / "gw", port, uplink={"probe_interval_s": 0.1},
                             spool={"dir": str(spool_dir)})
        gateway = Gateway(cfg)
        await nursery.start(gateway.run)
        await until_all_acked(gateway, 3)
        got = await hub_records(hub)
        assert [rid for rid, _ in got] == list(range(8, 21))
        assert [r.channel for _, r in got] == [r.channel for r in records[7:]]
        assert hub.stats()["gateways"]["ate-01"]["frames_rejected"] == 1
        assert gateway.metrics.counter("uplink_frames_rejected_total").total() == 1
        nursery.cancel_scope.cancel()
    raw = (tmp_path / "gw" / "dead-letter.cborseq").read_bytes()
    assert len(raw) == 4 + int.from_bytes(raw[:4], "big"), "one entry"
    entry = cbor2.loads(raw[4:])
    assert entry["seq"] == 1
    assert cbor2.loads(entry["body"]) == [1, sources, rows[:7]]


async def test_the_parts_of_a_split_batch_leave_room_for_the_checkpoints_they_carry(
        tmp_path: Path) -> None:
    """An earlier part carries the checkpoint of a put that ends in it, which may be larger
    than the batch's last: the parts are cut with room for it, so no frame is over what the
    spool takes (before the room was kept, the first part's frame was refused by the spool
    and the source restarted)."""

    class BigFirstCheckpoint(ScriptedSource):
        async def run(self, sink: Any, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
            task_status.started()
            for i in range(self.resume, len(self.puts)):
                # put 0's checkpoint: 900 bytes, under the quarter of a frame a checkpoint
                # may take (docs/spool.md, "Frame size")
                checkpoint = {"at": 1, "state": "x" * 900} if i == 0 else i + 1
                await sink.put(self.records(i), checkpoint=checkpoint)
            self.done.set()
            await trio.sleep_forever()

    # batch 1 = [put 0, put 1 x 3], halved: put 0 and put 1's first record fit a frame
    # beside a small checkpoint, not beside put 0's
    puts = [[1700], [1700, 1700, 1700], [SMALL]]
    source = BigFirstCheckpoint(puts)
    spool_dir = tmp_path / "spool"
    gateway = await run(config(tmp_path / "gw", spool_dir), source)
    records, checkpoints, _ = await stored(spool_dir)
    assert names(records) == [r.channel for i in range(len(puts)) for r in source.records(i)]
    assert checkpoints["tester"] == len(puts)
    metrics = gateway.metrics.as_dict()
    assert metrics["gateway_batches_split_total"]
    assert not metrics.get("gateway_source_restarts_total")


# -- a checkpoint larger than a frame may hold -------------------------------------------

class HugeCheckpointSource(ScriptedSource):
    """``ScriptedSource`` whose checkpoint after put ``huge`` carries a blob larger than
    a spool frame may hold (a plugin keeping state in its checkpoint).  It starts putting
    when ``go`` is set."""

    def __init__(self, puts: list[list[int]], huge: int, checkpoint: Any = None) -> None:
        super().__init__(puts, checkpoint)
        self.huge = huge
        self.go = trio.Event()
        self.go.set()

    async def run(self, sink: Any, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        await self.go.wait()
        for i in range(self.resume, len(self.puts)):
            checkpoint: Any = i + 1
            if i == self.huge:
                checkpoint = {"at": i + 1, "state": "x" * 20_000}
            await sink.put(self.records(i), checkpoint=checkpoint)
        self.done.set()
        await trio.sleep_forever()


async def test_a_checkpoint_too_large_for_a_frame_is_refused_and_counted_records_flow_on(
        tmp_path: Path) -> None:
    """A checkpoint over a quarter of what a frame may hold (here 20 kB, the spool's frames
    4 KiB) is refused: counted for its source, logged, told to the hub; the records of the
    put and of every other source (here in the same batch) are stored once, the gateway
    and the source run on, and the source's last storable checkpoint stays the durable
    one -- a restart replays from it and skips what frames already hold.  (Before: the
    batch's records were all refused as too large, the spool refused the frame carrying
    the checkpoint, and the source restarted and replayed the same put for ever.)"""
    puts = [[SMALL, SMALL], [SMALL], [SMALL, SMALL, SMALL]]
    spool_dir = tmp_path / "spool"
    source = HugeCheckpointSource(puts, huge=0)
    source.go = trio.Event()
    gateway = Gateway(config(tmp_path / "gw", spool_dir),
                      extra_sources=[("tester", source)])
    other = [reading(9, j, SMALL) for j in range(2)]
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            await nursery.start(gateway.run)
            await gateway.sink.put(other, source="other")  # the first batch: 2 + put 0
            source.go.set()
            await source.done.wait()
            nursery.cancel_scope.cancel()

    records, checkpoints, _ = await stored(spool_dir)
    expected = [r.channel for i in range(len(puts)) for r in source.records(i)]
    assert names(records) == [r.channel for r in other] + expected
    assert checkpoints["tester"] == len(puts), "later checkpoints are stored again"
    metrics = gateway.metrics.as_dict()
    assert metrics["gateway_checkpoints_rejected_total"] == {"source=tester": 1}
    assert metrics["gateway_records_rejected_total"] == {}
    assert metrics["gateway_source_restarts_total"] == {}
    events = [r for r in records if isinstance(r, GatewayEvent)]
    assert [e.code for e in events] == ["checkpoint_rejected"]
    assert events[0].detail["source"] == "tester"

    # a crash right after the frames of put 0: no checkpoint of the source is durable,
    # the frames say they hold 2 of its records -- the restart skips them
    image = tmp_path / "image"
    cfg = config(tmp_path / "c", tmp_path / "spool2", batch={"max_records": 1})
    assert cfg.spool is not None
    await run(cfg, HugeCheckpointSource(puts, huge=0), SnapshotSpool(cfg.spool, 2, image))
    _, checkpoints, _ = await stored(image)
    assert "tester" not in checkpoints and checkpoints[AFTER_KEY] == {"tester": 2}
    source = HugeCheckpointSource(puts, huge=0, checkpoint=checkpoints.get("tester"))
    gateway = await run(config(tmp_path / "d", image, batch={"max_records": 1}), source)
    records, checkpoints, _ = await stored(image)
    assert names(records) == expected, "every record stored exactly once, in order"
    assert checkpoints["tester"] == len(puts)
    assert gateway.metrics.as_dict()["gateway_replayed_records_skipped_total"] == {
        "source=tester": 2}


async def test_once_welcome_tells_the_hubs_max_records_new_batches_are_cut_to_it(
        tmp_path: Path) -> None:
    """``batch.max_records`` (50) above the hub's ``max_records_per_frame`` (10): once the
    gateway has the hub's WELCOME it cuts new batches to the hub's limit, so no new frame
    is split as it is sent.  What the batcher held over that limit when it learned it (30
    records, put while the hub was down) goes out as one frame first, split once; then
    ``edgegw_uplink_frames_split_total`` stays put while records flow, and the hub has
    every record once, in record id order."""
    from hubtools import hub_config, start_hub
    from ports import free_port

    port = free_port()
    cfg = gateway_config(tmp_path / "gw", port, uplink={"probe_interval_s": 0.1},
                         batch={"max_records": 50, "max_delay_ms": 3_600_000})
    gateway = Gateway(cfg)
    split = gateway.metrics.counter("uplink_frames_split_total")
    held = [reading(0, j, 5) for j in range(30)]
    flowing = [[reading(i, j, 5) for j in range(n)]
               for i, n in enumerate([7, 23, 50, 1, 64, 15, 40], start=1)]
    async with trio.open_nursery() as nursery:
        await nursery.start(gateway.run)
        await gateway.sink.put(held, source="tester")  # no hub yet: held in the batcher
        assert gateway.batcher.pending == 30
        hub, _ = await start_hub(nursery, hub_config(tmp_path / "hub", port=port,
                                                     max_records_per_frame=10))
        with trio.fail_after(15):
            while not gateway.uplink or not gateway.uplink.connected:
                await trio.sleep(0.02)
        await gateway.sink.put(flowing[0], source="tester")  # cuts the 30 held first
        await until_all_acked(gateway, 1)
        assert split.total() == 1  # the 30 held over the new limit: one frame, cut once
        for records in flowing[1:]:
            await gateway.sink.put(records, source="tester")
        await until_all_acked(gateway, 2)
        assert split.total() == 1  # nothing stored after WELCOME was split
        stored = await hub.store.query("SELECT n_records FROM frames")
        assert max(n for (n,) in stored) <= 10
        got = await hub_records(hub)
        sent = held + [r for records in flowing for r in records]
        assert [r.channel for _, r in got] == [r.channel for r in sent]
        assert [rid for rid, _ in got] == list(range(1, len(sent) + 1))
        assert gateway.metrics.counter("uplink_frames_rejected_total").total() == 0
        nursery.cancel_scope.cancel()


class WholeSource:
    """Puts each batch with ``put_whole`` (as the MQTT source does), once told to."""

    def __init__(self, puts: list[list[SensorReading]]) -> None:
        self.puts = puts
        self.go = trio.Event()
        self.done = trio.Event()

    async def run(self, sink: Any, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        await self.go.wait()
        for i, records in enumerate(self.puts):
            await sink.put_whole(records, checkpoint=i + 1)
        self.done.set()
        await trio.sleep_forever()


async def test_a_put_whole_over_the_hubs_max_records_stays_one_frame_with_its_checkpoint(
        tmp_path: Path) -> None:
    """``put_whole`` keeps a put in the frame that carries its checkpoint: under the hub's
    smaller ``max_records`` it is still stored as one frame (a crash never leaves part of
    it stored without the checkpoint), which is cut as it is sent; the puts around it are
    cut to the hub's limit as usual."""
    from hubtools import hub_config, start_hub

    puts = [[reading(i, j, 5) for j in range(n)] for i, n in enumerate([4, 25, 3])]
    source = WholeSource(puts)
    async with trio.open_nursery() as nursery:
        hub, port = await start_hub(nursery, hub_config(tmp_path / "hub",
                                                        max_records_per_frame=10))
        cfg = gateway_config(tmp_path / "gw", port, uplink={"probe_interval_s": 0.1},
                             batch={"max_records": 50, "max_delay_ms": 3_600_000})
        gateway = Gateway(cfg, extra_sources=[("mqttish", source)])
        await nursery.start(gateway.run)
        with trio.fail_after(15):
            while not gateway.uplink or not gateway.uplink.connected:
                await trio.sleep(0.02)
        source.go.set()
        with trio.fail_after(15):
            await source.done.wait()
        await until_all_acked(gateway, 1)
        # [4] cut when the 25 do not fit beside it under 10; [25] whole; [3] by the flush
        assert gateway.metrics.counter("gateway_frames_stored_total").total() == 3
        assert gateway.metrics.counter("uplink_frames_split_total").total() == 1
        assert gateway.store.checkpoints["mqttish"] == 3
        got = await hub_records(hub)
        assert [r.channel for _, r in got] == [r.channel for p in puts for r in p]
        nursery.cancel_scope.cancel()


async def test_a_later_hub_that_takes_more_records_gets_batches_of_the_gateways_own_limit(
        tmp_path: Path) -> None:
    """The limit follows the last WELCOME: back to ``batch.max_records`` (50) when the hub
    comes back taking more records per frame than before (10)."""
    from hubtools import hub_config, start_hub

    async def sizes(hub: Any) -> list[int]:
        return sorted(n for (n,) in await hub.store.query("SELECT n_records FROM frames"))

    async with trio.open_nursery() as nursery:
        async with trio.open_nursery() as first:
            hub, port = await start_hub(first, hub_config(tmp_path / "hub",
                                                          max_records_per_frame=10))
            cfg = gateway_config(tmp_path / "gw", port, uplink={"probe_interval_s": 0.1},
                                 batch={"max_records": 50, "max_delay_ms": 3_600_000})
            gateway = Gateway(cfg)
            await nursery.start(gateway.run)
            with trio.fail_after(15):
                while not gateway.uplink or not gateway.uplink.connected:
                    await trio.sleep(0.02)
            await gateway.sink.put([reading(0, j, 5) for j in range(45)], source="tester")
            await until_all_acked(gateway, 1)
            assert await sizes(hub) == [5, 10, 10, 10, 10]
            first.cancel_scope.cancel()
        with trio.fail_after(15):
            while gateway.uplink.connected:
                await trio.sleep(0.02)
        hub, _ = await start_hub(nursery, hub_config(tmp_path / "hub", port=port,
                                                     max_records_per_frame=1000))
        with trio.fail_after(15):
            while not gateway.uplink.connected:
                await trio.sleep(0.02)
        await gateway.sink.put([reading(1, j, 5) for j in range(45)], source="tester")
        await until_all_acked(gateway, 6)
        assert await sizes(hub) == [5, 10, 10, 10, 10, 45]
        assert gateway.metrics.counter("uplink_frames_split_total").total() == 0
        nursery.cancel_scope.cancel()



async def test_a_record_dead_lettered_while_the_link_goes_is_kept_once(
        tmp_path: Path) -> None:
    """The record alone over the hub's limit is kept in the dead-letter file as its
    stand-in part is stored; the link goes while that part waits for its commit, which
    comes only after the gateway reconnected.  The next session goes on from the split's
    progress once the part is durable: the dead-letter file holds the record once (not a
    second entry from storing the split's rest again), and every other record arrives
    once."""
    from hubtools import hub_config
    from ports import free_port

    from edgegw.hub import Ingest

    records = ([reading(0, j, 500) for j in range(6)] + [reading(1, 0, GIANT)]
               + [reading(2, j, 500) for j in range(6)])
    port = free_port()
    hub_cfg = hub_config(tmp_path / "hub", port=port, max_frame_bytes=4096)
    async with trio.open_nursery() as nursery:
        cfg = gateway_config(tmp_path / "gw", port,
                             uplink={"max_frame_bytes": 65536, "probe_interval_s": 0.1,
                                     "backoff_max_s": 0.1},
                             batch={"max_records": 100, "max_delay_ms": 20},
                             spool={"dir": str(tmp_path / "spool")})
        assert cfg.spool is not None

        def reconnected() -> bool:
            return gateway.metrics.counter("uplink_connects_total").total() >= 2

        # frame 1's stand-in part for the record: frame 2
        store = HeldCommits(cfg.spool, 2, reconnected, hold_to=2)
        gateway = Gateway(cfg, store=store)
        with trio.fail_after(20):
            async with trio.open_nursery() as first_run:
                await first_run.start(Ingest(hub_cfg).run)
                await nursery.start(gateway.run)
                await gateway.sink.put(records, source="tester")
                await store.holding.wait()
                first_run.cancel_scope.cancel()  # the hub goes: the link with it
        hub = Ingest(hub_cfg)
        await nursery.start(hub.run)
        await until_all_acked(gateway, 1)
        got = [r for _, r in await hub_records(hub)]
        assert names(got) == [r.channel for r in records if r.channel != "put1-0"]
        assert reconnected()
        raw = (tmp_path / "gw" / "dead-letter.cborseq").read_bytes()
        assert len(raw) == 4 + int.from_bytes(raw[:4], "big"), "one entry"
        nursery.cancel_scope.cancel()


#: one frame of records, all under a 4 KiB hub's limit except the one in the middle
SPLIT_AROUND_A_GIANT = ([reading(0, j, 500) for j in range(6)] + [reading(1, 0, GIANT)]
                        + [reading(2, j, 500) for j in range(6)])


def split_gateway(state_dir: Path, port: int) -> Gateway:
    """A gateway storing ``SPLIT_AROUND_A_GIANT`` as one frame, which a hub of 4 KiB frames
    gets cut: the giant record dead-lettered, a stand-in part in its place."""
    cfg = gateway_config(state_dir, port,
                         uplink={"max_frame_bytes": 65536, "probe_interval_s": 0.1,
                                 "backoff_max_s": 0.1},
                         batch={"max_records": 100, "max_delay_ms": 20},
                         spool={"dir": str(state_dir / "spool")})
    gateway = Gateway(cfg)
    gateway.dead_letter_path = DeadLetterFile(state_dir / "dead-letter.cborseq")  # type: ignore[assignment]
    return gateway


async def test_a_link_drop_during_the_dead_letter_write_keeps_the_record_once(
        tmp_path: Path) -> None:
    """The link goes exactly while the record alone over the hub's limit is written to the
    dead-letter file (its bytes in the file, the write not returned yet).  The entry and
    the stand-in part stored with the split's progress are one step, which the link drop
    does not cut: the next session goes on from that progress, and the file holds the
    record once (before: the drop ended the split between the two, and the next session
    dead-lettered the record again).  Every other record reaches the hub once."""
    from hubtools import hub_config
    from ports import free_port

    from edgegw.hub import Ingest

    port = free_port()
    hub_cfg = hub_config(tmp_path / "hub", port=port, max_frame_bytes=4096)
    gateway = split_gateway(tmp_path / "gw", port)
    dead_letters = gateway.dead_letter_path
    assert isinstance(dead_letters, DeadLetterFile)
    async with trio.open_nursery() as nursery:
        with trio.fail_after(30):
            async with trio.open_nursery() as first_run:
                async def the_link_goes() -> None:
                    dead_letters.written = None  # the first entry only
                    first_run.cancel_scope.cancel()  # the hub goes, and the link with it
                    # until the session is cancelled: the uplink task's own nursery
                    session = trio.lowlevel.current_task().parent_nursery
                    assert session is not None
                    while not session.cancel_scope.cancel_called:
                        await trio.sleep(0.01)

                dead_letters.written = the_link_goes
                await first_run.start(Ingest(hub_cfg).run)
                await nursery.start(gateway.run)
                await gateway.sink.put(SPLIT_AROUND_A_GIANT, source="tester")
                await trio.sleep_forever()  # until the link goes
        with trio.fail_after(30):
            while gateway.uplink.connected:  # until the session has ended
                await trio.sleep(0.01)
        # the stand-in part (frame 2) was stored in the entry's step, before the session
        # ended: the drop did not come between them
        assert gateway.store.next_seq == 3
        hub = Ingest(hub_cfg)
        await nursery.start(hub.run)
        await until_all_acked(gateway, 1)
        got = [r for _, r in await hub_records(hub)]
        assert names(got) == [r.channel for r in SPLIT_AROUND_A_GIANT if r.channel != "put1-0"]
        assert gateway.metrics.counter("uplink_connects_total").total() >= 2
        entries = dead_letters.entries()
        assert [(e["seq"], cbor2.loads(e["body"])[0]) for e in entries] == [(1, 7)], "once"
        nursery.cancel_scope.cancel()


async def test_a_crash_between_the_dead_letter_write_and_the_part_keeps_the_record_once(
        tmp_path: Path) -> None:
    """A crash right after the record's entry is written to the dead-letter file, before
    its stand-in part is durable with the split's progress: the gateway's state directory
    copied at that point is what a SIGKILL leaves.  The gateway started on that copy plans
    the split again from the older progress and finds the record in the dead-letter file:
    it is kept once (before: a second entry), and every other record reaches the hub
    once."""
    from hubtools import hub_config
    from ports import free_port

    from edgegw.hub import Ingest

    image = tmp_path / "image"
    port = free_port()
    gateway = split_gateway(tmp_path / "gw", port)
    dead_letters = gateway.dead_letter_path
    assert isinstance(dead_letters, DeadLetterFile)
    crashed = dead_letters.image_at_next_write(tmp_path / "gw", image)
    with trio.fail_after(30):
        async with trio.open_nursery() as first_run:
            await first_run.start(Ingest(hub_config(tmp_path / "hub-a", port=port,
                                                    max_frame_bytes=4096)).run)
            await first_run.start(gateway.run)
            await gateway.sink.put(SPLIT_AROUND_A_GIANT, source="tester")
            await crashed.wait()
            first_run.cancel_scope.cancel()
    assert len(DeadLetterFile(image / "dead-letter.cborseq").entries()) == 1

    port = free_port()
    async with trio.open_nursery() as nursery:
        hub = Ingest(hub_config(tmp_path / "hub-b", port=port, max_frame_bytes=4096))
        await nursery.start(hub.run)
        restarted = split_gateway(image, port)
        await nursery.start(restarted.run)
        await until_all_acked(restarted, 1)
        got = [r for _, r in await hub_records(hub)]
        assert names(got) == [r.channel for r in SPLIT_AROUND_A_GIANT if r.channel != "put1-0"]
        entries = DeadLetterFile(image / "dead-letter.cborseq").entries()
        assert [(e["seq"], cbor2.loads(e["body"])[0]) for e in entries] == [(1, 7)], "once"
        nursery.cancel_scope.cancel()
