"""The spool's STATE records stay bounded whatever the sources' checkpoints (docs/spool.md,
"Checkpoints in the STATE record").

Every segment's STATE record repeats every source's latest checkpoint.  Sixteen sources
with checkpoints near the per-source limit (``spool.max_bytes / 16``) made STATE records
bigger than the whole spool: the gateway stopped taking records for ever, acknowledged or
not.  The gateway now admits a checkpoint only while all sources' latest checkpoints
together fit the spool's ``max_checkpoint_bytes``; one that does not is refused like one too
large alone (the source's previous checkpoint stands).
"""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path
from typing import Any, ClassVar

import pytest
import trio
from hubtools import gateway_config

from edgegw.gateway import Gateway
from edgegw.protocol import decode_body
from edgegw.records import SensorReading, from_wire
from edgegw.spool import DiskSpool, SpoolConfig
from edgegw.spool.format import MAX_RECORD, Kind, Record, encode_frame, scan

MAX_BYTES, SEGMENT_BYTES = 16384, 4096


class BigCheckpointSource:
    """Puts ``puts`` records one at a time, each with a checkpoint of about ``pad`` bytes,
    and remembers the latest checkpoint the gateway took (``put`` returned True)."""

    replays: ClassVar[bool] = True

    def __init__(self, name: str, puts: int, pad: int) -> None:
        self.name, self.puts, self.pad = name, puts, pad
        self.taken: Any = None
        self.done = trio.Event()

    async def run(self, sink: Any, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        for i in range(self.puts):
            checkpoint = {"at": i + 1, "pad": "x" * self.pad}
            if await sink.put([SensorReading("tester", 1.0, f"{self.name}-{i}", float(i))],
                              checkpoint):
                self.taken = checkpoint
        self.done.set()
        await trio.sleep_forever()


class Images(DiskSpool):
    """The real spool; its directory copied after every durable frame (what a SIGKILL
    there leaves behind), with the checkpoints the spool said were durable then."""

    def __init__(self, config: SpoolConfig, images: Path) -> None:
        super().__init__(config)
        self.images = images
        self.durable: dict[int, dict[str, Any]] = {}
        self.sizes: dict[int, int] = {}  # seq -> the spool's bytes right after its append

    async def append(self, body: bytes, n_records: int, checkpoints: dict[str, Any],
                     **kwargs: Any) -> int:
        seq = await super().append(body, n_records, checkpoints, **kwargs)
        self.durable[seq] = dict(self.checkpoints)
        # the spool's size at this instant (the copy below takes time, while acknowledged
        # segments go: a file copied before its deletion beside one made after it would add
        # up to a size the spool never had)
        self.sizes[seq] = spool_bytes(self.directory)
        await trio.to_thread.run_sync(copy_spool, self.directory, self.images / str(seq))
        return seq


def copy_spool(src: Path, dst: Path) -> None:
    """Copy a running spool's files in order, as a crash would leave them: a segment
    deleted meanwhile (acknowledged, its ACK record durable first) is simply gone."""
    dst.mkdir(parents=True)
    for path in sorted(src.iterdir()):
        with contextlib.suppress(FileNotFoundError):
            shutil.copy2(path, dst / path.name)


def segments(spool_dir: Path) -> list[Path]:
    return sorted(spool_dir.glob("seg-*.spool"))


def state_records(spool_dir: Path) -> list[Record]:
    return [ev for path in segments(spool_dir) for ev in scan(path.read_bytes())
            if isinstance(ev, Record) and ev.kind is Kind.STATE]


def spool_bytes(spool_dir: Path) -> int:
    """The bytes of the spool's segment files; a file the committer's thread deletes meanwhile
    (acknowledged: its ACK record durable first) counts as gone."""
    total = 0
    for path in segments(spool_dir):
        with contextlib.suppress(FileNotFoundError):
            total += path.stat().st_size
    return total


async def run_gateway(tmp_path: Path, sources: list[BigCheckpointSource], *,
                      ack: bool) -> tuple[Gateway, Images, bool]:
    """Run a gateway (no hub) until every source has put everything, or 15 s; ``ack``:
    acknowledge every durable frame at once, as a hub keeping up would."""
    cfg = gateway_config(tmp_path / "gw", 1, batch={"max_records": 16, "max_delay_ms": 50},
                         spool={"dir": str(tmp_path / "spool"), "max_bytes": MAX_BYTES,
                                "segment_bytes": SEGMENT_BYTES})
    assert cfg.spool is not None
    spool = Images(cfg.spool, tmp_path / "images")
    gateway = Gateway(cfg, store=spool, extra_sources=[(s.name, s) for s in sources])
    finished = False
    async with trio.open_nursery() as nursery:
        await nursery.start(gateway.run)
        if ack:
            async def acker() -> None:
                while True:
                    spool.ack(spool.durable_seq)
                    await trio.sleep(0.01)
            nursery.start_soon(acker)
        with trio.move_on_after(15):
            for s in sources:
                await s.done.wait()
            await gateway.flush()
            finished = True
        nursery.cancel_scope.cancel()
    return gateway, spool, finished


async def test_sixteen_sources_near_the_checkpoint_limit_never_stop_the_gateway(
        tmp_path: Path) -> None:
    # 16 checkpoints of ~950 bytes (the per-source limit: 16 KiB / 16): together they are
    # as big as the whole spool.  Every frame is acknowledged at once, so the spool never
    # holds more than its active segment's worth of frames.
    sources = [BigCheckpointSource(f"s{i:02}", 3, 950) for i in range(16)]
    gateway, spool, finished = await run_gateway(tmp_path, sources, ack=True)

    assert finished, "every source's puts were taken (before: the gateway stopped)"
    spool_dir = tmp_path / "spool"
    budget = spool.max_checkpoint_bytes()
    assert budget is not None and budget <= MAX_BYTES // 8
    states = state_records(spool_dir)
    assert states and max(r.size for r in states) <= budget + 512, \
        "a STATE record holds at most the checkpoint budget (and the spool's own few fields)"
    refused = gateway.metrics.as_dict()["gateway_checkpoints_rejected_total"]
    assert sum(refused.values()) > 0, "checkpoints past the budget were refused"
    taken = {s.name: s.taken for s in sources if s.taken is not None}
    assert taken, "checkpoints within the budget were stored"

    # after a crash anywhere, every source's latest durable checkpoint is found
    images = sorted((tmp_path / "images").iterdir(), key=lambda p: int(p.name))
    assert len(images) >= 3
    for image in images:
        async with DiskSpool.open(SpoolConfig(dir=str(image), max_bytes=MAX_BYTES,
                                              segment_bytes=SEGMENT_BYTES)) as recovered:
            found = recovered.checkpoints
        durable = spool.durable[int(image.name)]  # (the copy starts once frame N is durable)
        for s in sources:
            if s.name in durable:
                assert found[s.name]["at"] >= durable[s.name]["at"], \
                    f"{s.name}'s checkpoint durable at frame {image.name} is found after a crash"
    async with DiskSpool.open(SpoolConfig(dir=str(spool_dir), max_bytes=MAX_BYTES,
                                          segment_bytes=SEGMENT_BYTES)) as recovered:
        assert {n: recovered.checkpoints.get(n) for n in taken} == taken


@pytest.mark.parametrize("body_bytes", [500, 900, 1500, 3000])
async def test_the_cap_counts_the_state_record_a_frame_rolls_over_to(
        tmp_path: Path, body_bytes: int) -> None:
    # Big checkpoints (~2 KB together), nothing acknowledged: the spool fills to its cap.
    # The frame that fills a segment also makes the commit open the next one with a STATE
    # record of every checkpoint; the cap check counts it (and the COMMIT and ACK records)
    # before taking the frame.  Before: 17,156 B on disk with 900-byte bodies.
    spool_dir = tmp_path / "spool"
    config = SpoolConfig(dir=str(spool_dir), max_bytes=MAX_BYTES, segment_bytes=SEGMENT_BYTES)
    big = {f"s{i:02}": {"at": 0, "pad": "x" * 110} for i in range(16)}
    async with DiskSpool.open(config) as spool:
        spool.ack(await spool.append(b"", 0, big))
    sizes = []
    async with DiskSpool.open(config) as spool:
        while True:
            with trio.move_on_after(0.3) as waited:
                await spool.append(b"b" * body_bytes, 1, {"s00": {"at": len(sizes) + 1,
                                                                   "pad": "x" * 110}})
            if waited.cancelled_caught:
                break  # the spool is full: append waits (policy block)
            sizes.append(spool_bytes(spool_dir))
            assert spool.total_bytes == sizes[-1]
    assert len(sizes) >= 2 and max(sizes) <= MAX_BYTES, sizes
    assert max(sizes) > MAX_BYTES - SEGMENT_BYTES, "the spool was filled close to its cap"


async def test_sources_near_the_checkpoint_limit_with_nothing_acknowledged_fill_no_spool(
        tmp_path: Path) -> None:
    # nothing acknowledged (no hub): sixteen sources' large checkpoints, one put each, must
    # not fill the spool with repeated STATE records
    sources = [BigCheckpointSource(f"s{i:02}", 1, 950) for i in range(16)]
    gateway, _, finished = await run_gateway(tmp_path, sources, ack=False)

    assert finished, "16 one-record puts fit a 16 KiB spool (before: it blocked)"
    assert spool_bytes(tmp_path / "spool") <= MAX_BYTES
    assert sum(gateway.metrics.as_dict()["gateway_checkpoints_rejected_total"].values()) > 0
    async with DiskSpool.open(SpoolConfig(dir=str(tmp_path / "spool"), max_bytes=MAX_BYTES,
                                          segment_bytes=SEGMENT_BYTES)) as recovered:
        channels = []
        for frame in recovered.frames_from(1, 1000):
            _, names, wire = decode_body(frame.body, 1 << 20)
            channels += [r.channel for r in (from_wire(w, names) for w in wire)
                         if isinstance(r, SensorReading)]
        assert sorted(channels) == [f"{s.name}-0" for s in sources], "every record stored"
        for s in sources:
            assert recovered.checkpoints.get(s.name) == s.taken, \
                "each source's checkpoint is its latest taken one (None: every one refused)"


async def spool_over_the_budget(spool_dir: Path) -> dict[str, Any]:
    """A spool written with larger segments (1 MiB, 256 KiB each), holding four checkpoints
    of ~1.5 KB: 6 KB, over the 2 KiB a 4 KiB-segment spool lets them take together.
    Returns them."""
    old = {f"s{i}": {"at": 1, "pad": "x" * 1500} for i in range(4)}
    async with DiskSpool.open(SpoolConfig(dir=str(spool_dir), max_bytes=1 << 20,
                                          segment_bytes=1 << 18)) as spool:
        spool.ack(await spool.append(b"", 0, old))
    return old


async def test_a_spool_recovered_over_the_budget_takes_checkpoints_that_do_not_grow_it(
        tmp_path: Path) -> None:
    # a spool written with larger segments holds four checkpoints of ~1.5 KB: 6 KB, over
    # the 2 KiB a 4 KiB-segment spool lets them take together
    spool_dir = tmp_path / "spool"
    old = await spool_over_the_budget(spool_dir)
    # restarted with the smaller spool: a source whose next checkpoint is smaller than its
    # own last one is taken (the sum shrinks); a new source's is refused (it would grow it)
    sources = [BigCheckpointSource("s0", 1, 900), BigCheckpointSource("new", 1, 900)]
    gateway, _, finished = await run_gateway(tmp_path, sources, ack=True)

    assert finished
    assert sources[0].taken is not None and sources[1].taken is None
    assert gateway.metrics.as_dict()["gateway_checkpoints_rejected_total"] == {"source=new": 1}
    async with DiskSpool.open(SpoolConfig(dir=str(spool_dir), max_bytes=MAX_BYTES,
                                          segment_bytes=SEGMENT_BYTES)) as recovered:
        assert recovered.checkpoints["s0"] == sources[0].taken
        assert recovered.checkpoints["s1"] == old["s1"] and "new" not in recovered.checkpoints


async def test_a_spool_recovered_over_the_budget_neither_waits_nor_rolls_over_at_every_commit(
        tmp_path: Path) -> None:
    # STATE records of ~6 KB (written with larger segments) in a spool of 4 KiB segments:
    # every segment is "full" at its STATE record alone.  Frames acknowledged at once must
    # go on (no ack can make more room) and the segments roll over at twice their STATE
    # record, not at every commit (before: a new segment, 6 KB written, per commit)
    spool_dir = tmp_path / "spool"
    await spool_over_the_budget(spool_dir)
    async with DiskSpool.open(SpoolConfig(dir=str(spool_dir), max_bytes=MAX_BYTES,
                                          segment_bytes=SEGMENT_BYTES)) as spool:
        with trio.fail_after(10):
            for i in range(12):
                spool.ack(await spool.append(b"x" * 1000, 1, {"s0": {"at": i + 2}}))
                await spool.flush()
        assert spool.counts["segments_deleted"] <= 6, spool.counts
        assert spool.total_bytes <= MAX_BYTES


def test_the_checkpoint_budget_is_half_a_segment_and_fits_a_record_recovery_reads() -> None:
    def budget(**config: int) -> int:
        return DiskSpool(SpoolConfig(dir="unused", **config)).max_checkpoint_bytes()

    assert budget() == 8 << 20  # the default spool: 16 MiB segments
    assert budget(max_bytes=MAX_BYTES, segment_bytes=SEGMENT_BYTES) == 2048
    # a STATE record over MAX_RECORD (64 MiB) would read as damage at recovery
    assert budget(max_bytes=4 << 30, segment_bytes=1 << 30) == MAX_RECORD // 4


def test_a_frame_record_never_outgrows_what_recovery_reads() -> None:
    # a big spool (a quarter of it over 64 MiB) with the largest checkpoints it allows: the
    # largest body the spool takes, with its header and metadata, is still a record that
    # recovery reads (a 64 MiB frame from uplink.max_frame_bytes would not have been)
    spool = DiskSpool(SpoolConfig(dir="unused", max_bytes=1 << 30, segment_bytes=1 << 28))
    checkpoints = {"s": "x" * (spool.max_checkpoint_bytes() - 16)}
    body = spool.max_body_bytes(8000, checkpoints)
    assert body > 32 << 20
    assert len(encode_frame(1, b"", 8000, checkpoints)) + body <= MAX_RECORD


async def test_sixteen_big_checkpoints_keep_the_spool_within_its_cap_after_every_frame(
        tmp_path: Path) -> None:
    sources = [BigCheckpointSource(f"s{i:02}", 3, 950) for i in range(16)]
    _, spool, _ = await run_gateway(tmp_path, sources, ack=True)
    for seq, size in sorted(spool.sizes.items()):
        assert size <= MAX_BYTES, f"spool within its cap after frame {seq}"
