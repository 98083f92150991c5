"""Exactly once across a gateway crash at the worst point of a put: deterministic.

A source's put can be larger than the room left in the batch being filled.  The batcher then
cuts a full frame holding the *first part* of the put, while the put's checkpoint rides with
its last record, still pending.  A crash right after that frame is durable leaves the
source's durable checkpoint *before* records that a durable frame already holds.  The
source replays from that checkpoint; the gateway must skip exactly the replayed records the
frames hold (docs/spool.md, "Source positions and split puts").

The crash is taken as a disk image: the spool directory copied at the chosen point is what
a SIGKILL leaves behind (every write has reached the page cache; the batcher's pending
records are gone).  The whole-process version of the same interleaving, with a real STDF
tester and SIGKILL, is in ``test_faults.py``.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, ClassVar

import trio
from hubtools import gateway_config

from edgegw.gateway import AFTER_KEY, Gateway
from edgegw.protocol import decode_body
from edgegw.records import SensorReading, from_wire
from edgegw.spool import DiskSpool, SpoolConfig


class ScriptedSource:
    """Puts scripted batches, deterministically: resuming from checkpoint ``i`` replays puts
    ``i, i+1, ...`` exactly as before (the property of the STDF tail and the simulator)."""

    replays: ClassVar[bool] = True

    def __init__(self, sizes: list[int], checkpoint: Any, after_put: dict[int, trio.Event]
                 ) -> None:
        self.sizes = sizes
        self.resume = checkpoint if isinstance(checkpoint, int) else 0
        self.after_put = after_put
        self.done = trio.Event()

    @staticmethod
    def records(index: int, n: int) -> list[SensorReading]:
        return [SensorReading("tester", 1.0, f"put{index}", float(j)) for j in range(n)]

    async def run(self, sink: Any, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        for i in range(self.resume, len(self.sizes)):
            await sink.put(self.records(i, self.sizes[i]), checkpoint=i + 1)
            if i in self.after_put:
                self.after_put[i].set()
        self.done.set()
        await trio.sleep_forever()


def config(tmp: Path, spool_dir: Path) -> Any:
    # no hub: nothing is acknowledged, so every frame stays in the spool to be inspected;
    # the batch deadline is far away, so only full batches are cut while the test runs
    return gateway_config(tmp, 1, batch={"max_records": 4, "max_delay_ms": 3_600_000},
                          spool={"dir": str(spool_dir)})


async def run_until(cfg: Any, source: ScriptedSource, event: trio.Event,
                    crash_image: tuple[Path, Path] | None = None) -> Gateway:
    """Run a gateway until ``event``; then copy its spool (what a SIGKILL would leave) or,
    without ``crash_image``, stop it cleanly (which stores what the batcher holds)."""
    gateway = Gateway(cfg, extra_sources=[("tester", source)])
    async with trio.open_nursery() as nursery:
        await nursery.start(gateway.run)
        await event.wait()
        if crash_image is not None:
            await trio.to_thread.run_sync(shutil.copytree, *crash_image)
        nursery.cancel_scope.cancel()
    return gateway


async def stored_records(spool_dir: Path) -> tuple[list[tuple[str, float]], dict[str, Any]]:
    async with DiskSpool.open(SpoolConfig(dir=str(spool_dir))) as spool:
        frames = spool.frames_from(1, 1000)
        checkpoints = dict(spool.checkpoints)
    out = []
    for f in frames:
        _, sources, wire = decode_body(f.body, 1 << 20)
        out.extend((r.channel, r.value) for r in map(lambda w: from_wire(w, sources), wire))
    return out, checkpoints


def expected(sizes: list[int]) -> list[tuple[str, float]]:
    return [(r.channel, r.value) for i, n in enumerate(sizes)
            for r in ScriptedSource.records(i, n)]


async def test_a_crash_between_the_parts_of_a_split_put_stores_each_record_once(
        tmp_path: Path) -> None:
    sizes = [3, 6, 2]
    live, image = tmp_path / "spool", tmp_path / "spool-after-crash"
    # put 1 (6 records) fills frame 1 (3 + 1) and frame 2 (4): both durable when the put
    # returns, and put 1's last record is pending with its checkpoint: crash now
    crash_point = trio.Event()
    await run_until(config(tmp_path / "a", live), ScriptedSource(sizes, None, {1: crash_point}),
                    crash_point, (live, image))
    got, checkpoints = await stored_records(image)
    assert got == expected(sizes)[:8]  # what the crash left: two frames
    assert checkpoints["tester"] == 1 and checkpoints[AFTER_KEY] == {"tester": 5}

    # restart on the crash image: the source replays from checkpoint 1 (put 1 again)
    source = ScriptedSource(sizes, checkpoints["tester"], {})
    gateway = await run_until(config(tmp_path / "b", image), source, source.done)
    got, checkpoints = await stored_records(image)
    assert got == expected(sizes), "every record stored exactly once, in order"
    assert gateway.metrics.as_dict()["gateway_replayed_records_skipped_total"] == {
        "source=tester": 5}
    assert checkpoints["tester"] == 3 and checkpoints[AFTER_KEY] == {}


async def test_a_crash_while_replaying_keeps_the_remaining_skip(tmp_path: Path) -> None:
    """A second crash before the replay caught up: the frames stored meanwhile carry the
    checkpoint of the replayed put together with what is still to be skipped."""
    sizes = [9, 1]
    live, image1, image2 = tmp_path / "spool", tmp_path / "img1", tmp_path / "img2"
    crash1 = trio.Event()
    await run_until(config(tmp_path / "a", live), ScriptedSource(sizes, None, {0: crash1}),
                    crash1, (live, image1))
    got, checkpoints = await stored_records(image1)
    assert len(got) == 8 and checkpoints.get("tester") is None
    assert checkpoints[AFTER_KEY] == {"tester": 8}

    # the replaying source is now split differently: it puts 5 and 4 records with
    # checkpoints -- the first put is all skipped, its checkpoint stored with 3 still ahead
    class Rechunked(ScriptedSource):
        async def run(self, sink: Any, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
            task_status.started()
            first = self.records(0, 9)
            await sink.put(first[:5], checkpoint="half")
            crash2.set()
            await trio.sleep_forever()

    crash2 = trio.Event()
    await run_until(config(tmp_path / "b", image1), Rechunked(sizes, None, {}), crash2,
                    (image1, image2))
    got, checkpoints = await stored_records(image2)
    assert len(got) == 8, "nothing new was stored: the replay has not caught up"
    assert checkpoints["tester"] == "half" and checkpoints[AFTER_KEY] == {"tester": 3}


class Snapshots(DiskSpool):
    """The real spool; its directory copied right after each frame in ``at`` is durable
    (what a SIGKILL at that point leaves behind)."""

    def __init__(self, config: SpoolConfig, at: set[int], images: Path) -> None:
        super().__init__(config)
        self.at, self.images = at, images

    async def append(self, body: bytes, n_records: int, checkpoints: dict[str, Any]) -> int:
        seq = await super().append(body, n_records, checkpoints)
        if seq in self.at:
            await trio.to_thread.run_sync(shutil.copytree, self.directory,
                                          self.images / str(seq))
        return seq


async def tail_until_done(cfg: Any, store: DiskSpool | None = None) -> None:
    """Run a gateway tailing the test files until every file is done and stored."""
    gateway = Gateway(cfg, store=store)
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(gateway.run)
            while True:
                files = (gateway.store.checkpoints.get("tail") or {}).get("files") or {}
                if len(files) == 2 and all(f["done"] for f in files.values()):
                    break
                await trio.sleep(0.01)
            nursery.cancel_scope.cancel()


async def test_a_crash_after_any_frame_of_a_tailed_file_stores_each_record_once(
        tmp_path: Path) -> None:
    """The STDF tail's "file done" rides with the file's last records: whatever frame the
    crash follows, the restart neither skips the file's tail nor repeats a record."""
    from shared_data import METIS, stdf_bytes

    data = stdf_bytes(METIS)
    files = tmp_path / "stdf"
    files.mkdir()
    (files / "a.std").write_bytes(data)
    (files / "b.std").write_bytes(data)

    def cfg(state: Path, spool_dir: Path) -> Any:
        return gateway_config(state, 1, sources=[{"name": "tail", "type": "tail",
                                                  "paths": [str(files)], "poll_interval": 0.01,
                                                  "read_size": 4096}],
                              batch={"max_records": 97, "max_delay_ms": 5},
                              spool={"dir": str(spool_dir)})

    async def stored(spool_dir: Path) -> list[Any]:
        async with DiskSpool.open(SpoolConfig(dir=str(spool_dir))) as spool:
            frames = spool.frames_from(1, 100_000)
        out = []
        for f in frames:
            _, sources, wire = decode_body(f.body, 1 << 24)
            out.extend(from_wire(w, sources)._replace(ts=0.0) for w in wire)
        return out

    first = cfg(tmp_path / "gw", tmp_path / "spool")
    assert first.spool is not None
    images = tmp_path / "images"
    await tail_until_done(first, Snapshots(first.spool, set(range(1, 100)), images))
    whole = await stored(tmp_path / "spool")
    assert len(whole) > 1000
    crashes = sorted(images.iterdir(), key=lambda p: int(p.name))
    assert len(crashes) >= 10
    for image in crashes:
        await tail_until_done(cfg(tmp_path / f"gw{image.name}", image))
        assert await stored(image) == whole, f"a crash after frame {image.name}"
