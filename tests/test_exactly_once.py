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

import os
import shutil
import time
from pathlib import Path
from typing import Any, ClassVar

import pytest
import trio
from hubtools import gateway_config

from edgegw.gateway import AFTER_KEY, ORIGINS_KEY, Gateway
from edgegw.protocol import decode_body
from edgegw.records import GatewayEvent, SensorReading, from_wire
from edgegw.sim import stdf_file_bytes
from edgegw.sim.tester import TesterProfile
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
        out.extend((r.channel, r.value) for r in map(lambda w: from_wire(w, sources), wire)
                   if isinstance(r, SensorReading))  # not the gateway's events
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


async def test_a_replay_put_in_smaller_pieces_carries_the_span_along_its_stream(
        tmp_path: Path) -> None:
    """With origins: a replayed put smaller than what the frames hold is dropped whole and
    the rest of the span moves to where it ended -- stored so, should a second crash come."""
    sizes = [9, 1]
    live, image1, image2 = tmp_path / "spool", tmp_path / "img1", tmp_path / "img2"

    class WithOrigins(ScriptedSource):  # one stream "s"; put i follows position i
        async def run(self, sink: Any, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
            task_status.started()
            assert sink.takes_origin
            for i in range(self.resume, len(self.sizes)):
                await sink.put(self.records(i, self.sizes[i]), i + 1, origin=("s", i, i + 1))
                if i in self.after_put:
                    self.after_put[i].set()
            self.done.set()
            await trio.sleep_forever()

    crash1 = trio.Event()
    await run_until(config(tmp_path / "a", live), WithOrigins(sizes, None, {0: crash1}),
                    crash1, (live, image1))
    got, checkpoints = await stored_records(image1)
    assert len(got) == 8
    assert checkpoints[AFTER_KEY] == {"tester": 8, ORIGINS_KEY: {"tester": [["s", 0, 8]]}}

    class Rechunked(WithOrigins):  # put 0 replayed as 5 + 4 records, "half" between
        def __init__(self, checkpoint: Any) -> None:
            super().__init__(sizes, checkpoint, {})
            self.at_half = checkpoint == "half"

        async def run(self, sink: Any, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
            task_status.started()
            first = self.records(0, 9)
            if not self.at_half:
                await sink.put(first[:5], "half", origin=("s", 0, "half"))
                crash2.set()
            await sink.put(first[5:], 1, origin=("s", "half", 1))
            await sink.put(self.records(1, 1), 2, origin=("s", 1, 2))
            self.done.set()
            await trio.sleep_forever()

    crash2 = trio.Event()
    await run_until(config(tmp_path / "b", image1), Rechunked(checkpoints.get("tester")),
                    crash2, (image1, image2))
    got, checkpoints = await stored_records(image2)
    assert len(got) == 8, "nothing new was stored: the replay has not caught up"
    assert checkpoints["tester"] == "half"
    assert checkpoints[AFTER_KEY] == {"tester": 3, ORIGINS_KEY: {"tester": [["s", "half", 3]]}}

    source = Rechunked(checkpoints["tester"])  # resumes at "half"
    gateway = await run_until(config(tmp_path / "c", image2), source, source.done)
    got, checkpoints = await stored_records(image2)
    assert got == expected(sizes), "every record stored exactly once, in order"
    assert checkpoints["tester"] == 2 and checkpoints[AFTER_KEY] == {}
    assert gateway.metrics.as_dict()["gateway_replayed_records_skipped_total"] == {
        "source=tester": 3}, "the 3 still owed after half"


async def test_a_stream_that_ends_before_its_span_is_met_owes_nothing(tmp_path: Path) -> None:
    """With origins: the replaying source says the stream of the split put ended (its input
    is gone); the span is discarded, and another stream's records all pass."""
    sizes = [9, 1]
    live, image = tmp_path / "spool", tmp_path / "img"

    class TwoStreams(ScriptedSource):
        async def run(self, sink: Any, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
            task_status.started()
            if self.resume == 0 and not self.after_put:  # the restart: "s" is gone
                await sink.put([], None, origin=("s", 0, None))
                await sink.put(self.records(7, 6), "t", origin=("t", 0, 6))
            else:
                await sink.put(self.records(0, 9), 1, origin=("s", 0, 9))
                self.after_put[0].set()
            self.done.set()
            await trio.sleep_forever()

    crash = trio.Event()
    await run_until(config(tmp_path / "a", live), TwoStreams(sizes, None, {0: crash}), crash,
                    (live, image))
    got, checkpoints = await stored_records(image)
    assert len(got) == 8
    assert checkpoints[AFTER_KEY] == {"tester": 8, ORIGINS_KEY: {"tester": [["s", 0, 8]]}}

    source = TwoStreams(sizes, None, {})
    gateway = await run_until(config(tmp_path / "b", image), source, source.done)
    got, checkpoints = await stored_records(image)
    assert got[8:] == [(r.channel, r.value) for r in ScriptedSource.records(7, 6)]
    assert checkpoints["tester"] == "t" and checkpoints[AFTER_KEY] == {}
    metrics = gateway.metrics.as_dict()
    assert metrics["gateway_replay_skips_discarded_total"] == {"source=tester": 8}
    assert metrics.get("gateway_replayed_records_skipped_total", {}) == {}


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


async def test_a_batch_split_for_its_size_keeps_one_span_per_stream(tmp_path: Path) -> None:
    """A batch over the frame size limit holding one stream's put and the start of another's
    is stored as several frames (docs/spool.md, "Frame size"): the first part's spans name
    both streams (the first put gives no checkpoint, so both are counted after the durable
    one), so a restart where the first stream is gone still skips the second's exactly."""
    sizes = [[10], [1500, 1500, 1500, 10], [10]]  # the spool below takes bodies of 4 KiB
    streams, starts = ["a", "b", "b"], [0, 0, 1]

    class Source:
        replays: ClassVar[bool] = True

        def __init__(self, checkpoint: Any, gone: bool = False) -> None:
            self.resume = checkpoint if isinstance(checkpoint, int) else 0
            self.gone = gone
            self.done = trio.Event()

        @staticmethod
        def records(i: int) -> list[SensorReading]:
            return [SensorReading("tester", 1.0, f"put{i}-{j}", float(j), "u" * size)
                    for j, size in enumerate(sizes[i])]

        async def run(self, sink: Any, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
            task_status.started()
            if self.gone:
                await sink.put([], None, origin=("a", 0, None))
            for i in range(self.resume, len(sizes)):
                if not (self.gone and streams[i] == "a"):
                    await sink.put(self.records(i), i + 1 if i else None,
                                   origin=(streams[i], starts[i], starts[i] + 1))
            self.done.set()
            await trio.sleep_forever()

    def cfg(state: Path, spool_dir: Path) -> Any:
        return gateway_config(state, 1, batch={"max_records": 4, "max_delay_ms": 3_600_000},
                              spool={"dir": str(spool_dir), "max_bytes": 16384,
                                     "segment_bytes": 4096})

    async def run(config: Any, source: Source, store: DiskSpool | None = None) -> Gateway:
        gateway = Gateway(config, store=store, extra_sources=[("tester", source)])
        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                await nursery.start(gateway.run)
                await source.done.wait()
                nursery.cancel_scope.cancel()
        return gateway

    first = cfg(tmp_path / "a", tmp_path / "spool")
    assert first.spool is not None
    gateway = await run(first, Source(None), Snapshots(first.spool, {1}, tmp_path / "images"))
    assert gateway.metrics.as_dict()["gateway_batches_split_total"]
    image = tmp_path / "images" / "1"
    got, checkpoints = await stored_records(image)
    assert got == [("put0-0", 0.0), ("put1-0", 0.0)]
    assert checkpoints.get("tester") is None
    assert checkpoints[AFTER_KEY] == {"tester": 2,
                                      ORIGINS_KEY: {"tester": [["a", 0, 1], ["b", 0, 1]]}}

    source = Source(None, gone=True)
    gateway = await run(cfg(tmp_path / "b", image), source)
    got, checkpoints = await stored_records(image)
    assert got == [("put0-0", 0.0), ("put1-0", 0.0), ("put1-1", 1.0), ("put1-2", 2.0),
                   ("put1-3", 3.0), ("put2-0", 0.0)], "b's records once each, a's gone"
    metrics = gateway.metrics.as_dict()
    assert metrics["gateway_replayed_records_skipped_total"] == {"source=tester": 1}
    assert metrics["gateway_replay_skips_discarded_total"] == {"source=tester": 1}


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


# -- the files changed between the crash and the restart ------------------------------------
#
# The skip counted after a split put belongs to the records that followed the durable
# checkpoint *in that file, from that position*.  If the file is gone, replaced or truncated
# when the gateway restarts, or another file is met first, the replay does not start with
# those records: the skip must not eat another file's records (lost), and must still apply
# to the file's own replay when it comes (else repeated).


def tail_cfg(files: Path, state: Path, spool_dir: Path) -> Any:
    return gateway_config(state, 1, sources=[{"name": "tail", "type": "tail",
                                              "paths": [str(files)], "poll_interval": 0.01,
                                              "read_size": 4096}],
                          batch={"max_records": 97, "max_delay_ms": 5},
                          spool={"dir": str(spool_dir)})


async def tail_files_until_done(cfg: Any, names: set[str], store: DiskSpool | None = None,
                                owing_nothing: bool = False) -> Gateway:
    """Run a gateway tailing until its stored checkpoint has the files ``names`` done (and,
    with ``owing_nothing``, no replay span left owed: a span discarded for a file that
    vanished is stored with the put that discards it, which may come after the other files
    are read -- the tail reports a vanished file at the end of its poll)."""
    gateway = Gateway(cfg, store=store)
    files: dict[str, Any] = {}
    try:
        # (generous: a loaded machine fsyncs slowly; the wait ends on the files done)
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                await nursery.start(gateway.run)
                while True:
                    files = (gateway.store.checkpoints.get("tail") or {}).get("files") or {}
                    if (names <= {Path(p).name for p, f in files.items() if f["done"]}
                            and (not owing_nothing
                                 or gateway.store.checkpoints.get(AFTER_KEY) == {})):
                        break
                    await trio.sleep(0.01)
                nursery.cancel_scope.cancel()
    except trio.TooSlowError:
        owed = gateway.store.checkpoints.get(AFTER_KEY)
        raise AssertionError(f"the files never all done: {files}; owed {owed}") from None
    return gateway


async def tailed_records(spool_dir: Path) -> list[Any]:
    async with DiskSpool.open(SpoolConfig(dir=str(spool_dir))) as spool:
        frames = spool.frames_from(1, 100_000)
    out = []
    for f in frames:
        _, sources, wire = decode_body(f.body, 1 << 24)
        out.extend(from_wire(w, sources)._replace(ts=0.0) for w in wire)
    return out


async def stored_checkpoints(spool_dir: Path) -> dict[str, Any]:
    async with DiskSpool.open(SpoolConfig(dir=str(spool_dir))) as spool:
        return dict(spool.checkpoints)


async def records_of(tmp: Path, contents: bytes) -> list[Any]:
    """What a clean run sends for one file holding ``contents``."""
    files = tmp / "files"
    files.mkdir(parents=True)
    (files / "x.std").write_bytes(contents)
    await tail_files_until_done(tail_cfg(files, tmp / "gw", tmp / "spool"), {"x.std"})
    return await tailed_records(tmp / "spool")


def write_at(path: Path, data: bytes, mtime: float) -> None:
    path.write_bytes(data)
    os.utime(path, (mtime, mtime))


async def split_put_images(tmp: Path, files: Path, in_progress: Path, names: set[str]
                           ) -> list[tuple[Path, dict[str, Any]]]:
    """Tail ``files`` (holding ``names``) to the end, taking the spool image after every
    frame; the images (with their checkpoints) taken between the parts of a split put of
    ``in_progress``: frames hold records of it that its durable checkpoint does not cover
    yet."""
    cfg = tail_cfg(files, tmp / "gw", tmp / "spool")
    assert cfg.spool is not None
    images = tmp / "images"
    await tail_files_until_done(cfg, names, Snapshots(cfg.spool, set(range(1, 200)), images))
    out = []
    for image in sorted(images.iterdir(), key=lambda p: int(p.name)):
        async with DiskSpool.open(SpoolConfig(dir=str(image))) as spool:
            checkpoints = dict(spool.checkpoints)
        entry = ((checkpoints.get("tail") or {}).get("files") or {}).get(str(in_progress))
        if checkpoints.get(AFTER_KEY, {}).get("tail") and not (
                entry and entry["done"]):
            out.append((image, checkpoints))
    assert len(out) >= 3, "the test needs crashes between the parts of split puts"
    return out


def rewrite_in_place(path: Path, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.truncate(0)
        f.write(data)


def cut_short(data: bytes, limit: int) -> bytes:
    """An STDF file (little endian) shorter than ``limit``: ``data``'s records up to a
    record boundary, then its MRR."""
    offsets = [0]
    while offsets[-1] < len(data):
        offsets.append(offsets[-1] + 4 + int.from_bytes(data[offsets[-1]:offsets[-1] + 2],
                                                        "little"))
    mrr = data[offsets[-2]:]
    assert mrr[2:4] == bytes([1, 20]), "the file ends with its MRR"
    return data[:max(o for o in offsets if o + len(mrr) < limit)] + mrr



async def assert_span_discarded(gateway: Any, image: Path) -> None:
    """The restart skipped nothing, discarded the span it could not meet, owes nothing."""
    metrics = gateway.metrics.as_dict()
    assert metrics.get("gateway_replayed_records_skipped_total", {}) == {}
    assert sum(metrics["gateway_replay_skips_discarded_total"].values()) > 0
    assert (await stored_checkpoints(image))[AFTER_KEY] == {}, "nothing left owed"

async def test_the_file_of_a_split_put_deleted_before_the_restart_costs_no_other_files_records(
        tmp_path: Path) -> None:
    """(a) The file being read when the gateway crashed is gone at the restart: its replay
    never comes, and the next file's first records are not taken for it."""
    from shared_data import METIS, stdf_bytes

    data = stdf_bytes(METIS)
    files = tmp_path / "stdf"
    files.mkdir()
    write_at(files / "a.std", data, 1_000_000)
    write_at(files / "b.std", data, 1_000_100)  # read after a.std
    one_file = await records_of(tmp_path / "clean", data)
    images = await split_put_images(tmp_path / "first", files, files / "a.std",
                                    {"a.std", "b.std"})
    (files / "a.std").unlink()
    for image, _checkpoints in images:
        before = await tailed_records(image)
        gateway = await tail_files_until_done(
            tail_cfg(files, tmp_path / f"gw{image.name}", image), {"b.std"},
            owing_nothing=True)
        assert await tailed_records(image) == before + one_file, (
            f"after frame {image.name}: b.std whole, once")
        await assert_span_discarded(gateway, image)


async def test_a_new_file_met_before_the_replayed_one_is_sent_whole_and_the_replay_skipped(
        tmp_path: Path) -> None:
    """(b) A file that sorts before the one being read appears before the restart: it is
    read first and sent whole; the skip waits for the replayed file."""
    from shared_data import METIS, stdf_bytes

    data = stdf_bytes(METIS)
    files = tmp_path / "stdf"
    files.mkdir()
    write_at(files / "b.std", data, 1_000_100)
    whole = await records_of(tmp_path / "clean", data)
    for image, _checkpoints in await split_put_images(tmp_path / "first", files,
                                                      files / "b.std", {"b.std"}):
        before = await tailed_records(image)
        write_at(files / "a.std", data, 1_000_000)  # older: it sorts first
        gateway = await tail_files_until_done(
            tail_cfg(files, tmp_path / f"gw{image.name}", image), {"a.std", "b.std"})
        (files / "a.std").unlink()
        assert await tailed_records(image) == before + whole + whole[len(before):], (
            f"after frame {image.name}: a.std whole, then the rest of b.std, once")
        skipped = gateway.metrics.as_dict()["gateway_replayed_records_skipped_total"]
        assert sum(skipped.values()) > 0


async def test_a_file_truncated_replaced_or_rotated_before_the_restart_is_read_whole(
        tmp_path: Path) -> None:
    """(c) The file being read is truncated and rewritten, replaced (a new file under its
    name) or rotated (renamed out of the watched names, a new file under its name) before
    the restart: it is read from its start, and none of its new records is taken for the
    ones the frames hold."""
    from shared_data import METIS, stdf_bytes

    data = stdf_bytes(METIS)
    files = tmp_path / "stdf"
    files.mkdir()
    write_at(files / "a.std", data, 1_000_000)
    images = await split_put_images(tmp_path / "first", files, files / "a.std", {"a.std"})
    image, checkpoints = images[-1]
    offset = checkpoints["tail"]["files"][str(files / "a.std")]["offset"]
    assert offset > 1000
    shorter = cut_short(data, offset // 2)
    new_content = await records_of(tmp_path / "clean", shorter)
    assert new_content
    before = await tailed_records(image)
    for how in ("truncated", "replaced", "rotated"):
        img = tmp_path / f"image-{how}"
        shutil.copytree(image, img)
        if how == "truncated":  # the same inode, rewritten shorter than the checkpoint's offset
            rewrite_in_place(files / "a.std", shorter)
        elif how == "replaced":  # a new file (a new inode) under the same name
            (files / "new.tmp").write_bytes(shorter)
            os.replace(files / "new.tmp", files / "a.std")
        else:  # renamed out of the watched names, a new file under the old one
            (files / "a.std").rename(files / "a.std.1")
            (files / "a.std").write_bytes(shorter)
        gateway = await tail_files_until_done(
            tail_cfg(files, tmp_path / f"gw-{how}", img), {"a.std"}, owing_nothing=True)
        assert await tailed_records(img) == before + new_content, (
            f"{how}: the new content whole, once")
        await assert_span_discarded(gateway, img)


@pytest.mark.parametrize("name", ["b.std", "a.std"])
async def test_a_new_file_at_the_inode_of_the_one_read_before_the_restart_is_read_whole(
        tmp_path: Path, inode_fs: Path, name: str) -> None:
    """(d) The file being read is deleted before the restart and a new file (another lot,
    larger) gets its inode, under another name or under its own: it is read whole -- not
    taken for the old file renamed or grown and followed from its offset -- and the tail
    ends the old file before the new one's records come, so none of them is skipped for
    the span the frames hold of the old one (docs/tail.md, "Inodes are reused")."""
    from shared_data import METIS, stdf_bytes
    from test_tail_inode import replace_at_inode

    data = stdf_bytes(METIS)
    new = stdf_file_bytes(TesterProfile(lot_id="NEW", sites=2, wafer_diameter_dies=20,
                                        tests_per_part=8, seed=3))
    assert len(new) > len(data)
    files = inode_fs / "stdf"  # (where no other process takes the freed inode: disktools)
    files.mkdir()
    write_at(files / "a.std", data, 1_000_000)
    image, _checkpoints = (await split_put_images(tmp_path / "first", files,
                                                  files / "a.std", {"a.std"}))[-1]
    new_content = await records_of(tmp_path / "clean", new)
    before = await tailed_records(image)
    replace_at_inode(files / "a.std", files / name, new)
    gateway = await tail_files_until_done(tail_cfg(files, tmp_path / "gw", image), {name},
                                          owing_nothing=True)
    assert await tailed_records(image) == before + new_content, "the new lot whole, once"
    await assert_span_discarded(gateway, image)


async def test_a_file_renamed_before_the_restart_is_followed_and_its_skip_still_applies(
        tmp_path: Path) -> None:
    """A rename keeps the file (its inode): the replay under the new name starts where the
    skip was counted, so what the frames hold is skipped, and nothing is sent twice."""
    from shared_data import METIS, stdf_bytes

    data = stdf_bytes(METIS)
    files = tmp_path / "stdf"
    files.mkdir()
    write_at(files / "a.std", data, 1_000_000)
    whole = await records_of(tmp_path / "clean", data)
    for image, _checkpoints in await split_put_images(tmp_path / "first", files,
                                                      files / "a.std", {"a.std"}):
        (files / "a.std").rename(files / "a2.std")
        gateway = await tail_files_until_done(
            tail_cfg(files, tmp_path / f"gw{image.name}", image), {"a2.std"})
        (files / "a2.std").rename(files / "a.std")
        assert await tailed_records(image) == whole, f"after frame {image.name}"
        skipped = gateway.metrics.as_dict()["gateway_replayed_records_skipped_total"]
        assert sum(skipped.values()) > 0


async def test_a_second_crash_while_the_skip_waits_for_its_file_keeps_it(
        tmp_path: Path) -> None:
    """(b) again, with a second crash while the new file is read, before the replayed one
    is met: the frames stored meanwhile still carry the skip, with its origin."""
    from shared_data import METIS, stdf_bytes

    data = stdf_bytes(METIS)
    files = tmp_path / "stdf"
    files.mkdir()
    write_at(files / "b.std", data, 1_000_100)
    whole = await records_of(tmp_path / "clean", data)
    image, _checkpoints = (await split_put_images(tmp_path / "first", files,
                                                  files / "b.std", {"b.std"}))[1]
    before = await tailed_records(image)
    write_at(files / "a.std", data, 1_000_000)
    cfg = tail_cfg(files, tmp_path / "gw-second", image)
    assert cfg.spool is not None
    images = tmp_path / "second-crash"
    await tail_files_until_done(cfg, {"a.std", "b.std"},
                                Snapshots(cfg.spool, set(range(1, 400)), images))
    while_a = []  # images taken while a.std was read, b.std not yet met again
    for second in images.iterdir():
        async with DiskSpool.open(SpoolConfig(dir=str(second))) as spool:
            checkpoints = dict(spool.checkpoints)
        files_cp = (checkpoints.get("tail") or {}).get("files") or {}
        if str(files / "a.std") in files_cp and not files_cp[str(files / "a.std")]["done"]:
            while_a.append(second)
    assert len(while_a) >= 3
    for second in while_a:
        await tail_files_until_done(tail_cfg(files, tmp_path / f"gw3-{second.name}", second),
                                    {"a.std", "b.std"})
        assert await tailed_records(second) == before + whole + whole[len(before):], (
            f"second crash after frame {second.name}")


async def test_a_spool_written_before_origins_still_recovers_exactly(tmp_path: Path) -> None:
    """An older gateway stored the skip as a bare count: it still applies to the first
    records replayed, as it always did (the files unchanged)."""
    from shared_data import METIS, stdf_bytes

    data = stdf_bytes(METIS)
    files = tmp_path / "stdf"
    files.mkdir()
    write_at(files / "a.std", data, 1_000_000)
    whole = await records_of(tmp_path / "clean", data)
    for image, checkpoints in (await split_put_images(tmp_path / "first", files,
                                                      files / "a.std", {"a.std"}))[:5]:
        assert ORIGINS_KEY in checkpoints[AFTER_KEY], "stored with its origin"
        assert isinstance(checkpoints[AFTER_KEY]["tail"], int), "beside the count alone"
        old = tmp_path / f"old{image.name}"  # the same frames, the count as it was stored
        async with DiskSpool.open(SpoolConfig(dir=str(image))) as spool:
            frames = spool.frames_from(1, 100_000)
        async with DiskSpool.open(SpoolConfig(dir=str(old))) as spool:
            for frame in frames[:-1]:
                await spool.append(frame.body, frame.n_records, {})
            await spool.append(frames[-1].body, frames[-1].n_records, {
                **checkpoints, AFTER_KEY: {"tail": checkpoints[AFTER_KEY]["tail"]}})
        gateway = await tail_files_until_done(tail_cfg(files, tmp_path / f"gw{image.name}", old),
                                              {"a.std"})
        assert await tailed_records(old) == whole, f"after frame {image.name}"
        skipped = gateway.metrics.as_dict()["gateway_replayed_records_skipped_total"]
        assert skipped == {"source=tail": checkpoints[AFTER_KEY]["tail"]}


# -- a batch split for its size, a file read past the durable checkpoint ------------------
#
# The STDF tail moves a file's offset without emitting anything whenever what it read holds
# no record it forwards yet: the results of a part wait for its PRR, the PMRs of a header map
# to nothing.  The next put of *another* file then hands over a checkpoint with that file's
# new offset, and the file's next records follow that offset (their origin).  A batch holding
# both puts, split for its size, must not leave the second file's records in a part stored
# with an older checkpoint of the source: the restart resumes the file from there, not from
# where the frames say its records follow.


def stdf_offsets(data: bytes) -> list[int]:
    """Where each record of an STDF file (little endian) starts, and its end."""
    offsets = [0]
    while offsets[-1] < len(data):
        offsets.append(offsets[-1] + 4 + int.from_bytes(data[offsets[-1]:offsets[-1] + 2],
                                                        "little"))
    return offsets


def by_file(records: list[Any]) -> dict[Any, list[Any]]:
    """The records of each lot (here: of each file), in their order."""
    out: dict[Any, list[Any]] = {}
    for r in records:
        out.setdefault(getattr(r, "lot_id", None), []).append(r)
    return out


def append_at(path: Path, data: bytes, mtime: float) -> None:
    with open(path, "ab") as f:
        f.write(data)
    os.utime(path, (mtime, mtime))


@pytest.mark.parametrize("first", ["a.std", "b.std"])
async def test_a_split_batch_holding_a_file_read_past_the_durable_checkpoint_sends_it_once(
        tmp_path: Path, first: str) -> None:
    """Both files' puts in one batch, split for its size; ``first``: whose put comes first
    (each file's new bytes written only once the tail has read the other's, so the order is
    the same on a loaded machine: it was left to the tail's poll, and flipped under load).

    Each file's records are checked once each and in the file's order, not the order of
    the two files' records between them: the restart reads the files oldest first (a.std),
    as any scan does (docs/tail.md), so with b.std's put first a crash before b.std's last
    part replays a.std's rest before b.std's (docs/spool.md: a replay puts the same
    records "in whatever order its streams come").  The files differ in their lot only,
    so whose each record is shows (both the same: that reorder once read as b.std's end
    sent twice, and this param was an xfail)."""
    from shared_data import METIS, stdf_bytes

    data = stdf_bytes(METIS)
    lot = b"F6N910.1"  # the MIR's lot id, once in the file: b.std's is another, as long
    assert data.count(lot) == 1
    b_data = data.replace(lot, b"F6N910.2")
    offsets = stdf_offsets(data)
    rtype = {o: (data[o + 2], data[o + 3]) for o in offsets[:-1]}
    prr = [o for o in offsets[:-1] if rtype[o] == (5, 20)]
    a_cut = prr[1] + 4 + data[prr[1]]  # a.std: its first two parts, whole
    b_cut = prr[0]  # b.std: its header (MIR, then 8 KB of PMRs) and a part without its PRR
    assert 8000 < b_cut < a_cut < len(data) and b_cut in offsets and a_cut in offsets
    one_file = await records_of(tmp_path / "clean", data)

    files = tmp_path / "stdf"
    files.mkdir()
    append_at(files / "a.std", data[:a_cut], 1_000_000)  # a.std is read first
    append_at(files / "b.std", b_data[:b_cut], 1_000_100)
    cfg = gateway_config(tmp_path / "gw", 1,
                         sources=[{"name": "tail", "type": "tail", "paths": [str(files)],
                                   "poll_interval": 0.01, "read_size": 4096}],
                         batch={"max_records": 100_000, "max_delay_ms": 3_600_000},
                         uplink={"max_frame_bytes": 4096}, spool={"dir": str(tmp_path / "sp")})
    assert cfg.spool is not None
    images = tmp_path / "images"
    store = Snapshots(cfg.spool, set(range(1, 200)), images)
    gateway = Gateway(cfg, store=store)

    async def metric(name: str, value: int) -> None:
        while gateway.metrics.as_dict().get(name, {}).get("source=tail", 0) < value:
            await trio.sleep(0.01)

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(gateway.run)
            # every record of both files parsed: b.std's last put (its LotStart, from its
            # first read) is in the batcher, and b.std read on to its first PRR without a put
            await metric("tail_records_total", offsets.index(a_cut) + offsets.index(b_cut))
            await gateway.flush()  # durable: b.std at the end of its first read
            durable = store.checkpoints["tail"]["files"][str(files / "b.std")]["offset"]
            assert durable < b_cut
            first_run = store.next_seq - 1  # the frames of the first read
            rest = {"a.std": (data[a_cut:], 1_000_000), "b.std": (b_data[b_cut:], 1_000_100)}
            second = "b.std" if first == "a.std" else "a.std"
            append_at(files / first, *rest[first])
            await metric("tail_records_total", len(offsets) - 1 + offsets.index(
                b_cut if first == "a.std" else a_cut))  # the first file's put made
            append_at(files / second, *rest[second])
            await metric("gateway_records_in_total", 2 * len(one_file))
            await gateway.flush()  # both files' puts in one batch, split for its size
            nursery.cancel_scope.cancel()
    assert gateway.metrics.as_dict()["gateway_batches_split_total"]
    whole = await tailed_records(tmp_path / "sp")
    assert len(whole) == 2 * len(one_file)
    assert [len(v) for v in by_file(whole).values()] == [len(one_file)] * 2, "a lot each"

    # a crash between the parts, once they hold b.std's records past its LotStart (a.std's
    # records all come first): the checkpoint each part carries is where the restart resumes
    crashes = []
    for image in sorted(images.iterdir(), key=lambda p: int(p.name)):
        if first_run < int(image.name) < store.next_seq - 1 and len(
                await tailed_records(image)) > len(one_file) + 1:
            crashes.append(image)
    assert len(crashes) >= 3, "the test needs crashes after parts holding b.std's records"
    for image in crashes:
        gateway = await tail_files_until_done(
            tail_cfg(files, tmp_path / f"gw{image.name}", image), {"a.std", "b.std"})
        got = await tailed_records(image)
        assert by_file(got) == by_file(whole), f"after frame {image.name}: once each"
        if first == "a.std":  # the restart reads the files in the first run's order
            assert got == whole, f"after frame {image.name}"
        metrics = gateway.metrics.as_dict()
        assert metrics.get("gateway_replay_skips_discarded_total", {}) == {}


# -- a refused checkpoint ---------------------------------------------------------------
#
# A checkpoint over ``spool.max_bytes / 16`` is refused by the gateway: the source's
# previous checkpoint stays the durable one, and its records are counted after it.  A
# restart replays from that older checkpoint, so the spans those records are counted in
# must follow the positions *it* holds -- not those of the refused checkpoint, where the
# tail may have read a file on without a record (a header's PMRs) before the put.


def events_of(records: list[Any]) -> list[GatewayEvent]:
    return [r for r in records if isinstance(r, GatewayEvent)]


def tail_source(gateway: Gateway) -> Any:
    return next(source for name, source in gateway.sources if name == "tail")


async def tail_until_read(cfg: Any, paths: list[Path]) -> Gateway:
    """Run a gateway tailing until its tail has read the files ``paths`` to their end (its
    own state: its checkpoints may be refused), then stop it cleanly."""
    gateway = Gateway(cfg)

    def read() -> bool:
        files = tail_source(gateway).files
        return all(str(p) in files and (files[str(p)].done or
                                        files[str(p)].offset == p.stat().st_size)
                   for p in paths)

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            await nursery.start(gateway.run)
            while not read():
                await trio.sleep(0.01)
            # the tail marks a file read before it puts its last records: the next scan
            # begins once that put returned
            scan = tail_source(gateway)._scan_started
            while tail_source(gateway)._scan_started == scan:
                await trio.sleep(0.01)
            await gateway.flush()
            nursery.cancel_scope.cancel()
    return gateway


async def test_records_counted_after_a_refused_checkpoint_are_skipped_from_the_durable_one(
        tmp_path: Path) -> None:
    """a.std is read past its durable checkpoint without a record (its header's PMRs);
    then other files' puts hand over checkpoints that are refused (they name too many
    files), and a.std's next records are counted after its durable checkpoint.  A restart
    resumes a.std there and skips exactly what frames hold of it: nothing twice (before,
    the span followed a.std's offset in the refused checkpoint, the restart met it
    elsewhere and discarded it: a.std's records were stored twice)."""
    from shared_data import METIS, stdf_bytes

    data = stdf_bytes(METIS)
    offsets = stdf_offsets(data)
    prr = [o for o in offsets[:-1] if (data[o + 2], data[o + 3]) == (5, 20)]
    a_cut = prr[0]  # a.std: its header (MIR, then 8 KB of PMRs) and a part without its PRR
    mir = next(i for i, o in enumerate(offsets) if (data[o + 2], data[o + 3]) == (1, 10))
    before_mir, header = offsets[mir], offsets[mir + 1]  # FAR, ATR; then the MIR: a lot
    one_file = await records_of(tmp_path / "clean", data)

    files = tmp_path / "stdf"
    files.mkdir()
    a = files / "a.std"
    append_at(a, data[:a_cut], 1_000_000)

    def cfg(state: Path, spool_dir: Path) -> Any:
        # a checkpoint over 32 kB (512 KiB / 16) is refused; only full batches are cut
        return gateway_config(state, 1, sources=[{"name": "tail", "type": "tail",
                                                  "paths": [str(files)],
                                                  "poll_interval": 0.01, "read_size": 4096}],
                              batch={"max_records": 97, "max_delay_ms": 3_600_000},
                              spool={"dir": str(spool_dir), "max_bytes": 512 << 10,
                                     "segment_bytes": 16 << 10})

    spool_dir = tmp_path / "spool"
    gateway = Gateway(cfg(tmp_path / "gw", spool_dir))

    async def metric(name: str, value: int) -> None:
        while gateway.metrics.as_dict().get(name, {}).get("source=tail", 0) < value:
            await trio.sleep(0.01)

    # files with long names and no record yet, met before a.std is read on: a checkpoint
    # naming them all is over the limit; then b.std begins a lot
    others = [files / (f"{i:03}-" + "x" * 200 + ".std") for i in range(220)]
    b = files / "b.std"
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(gateway.run)
            # a.std's LotStart put, then its PMRs and a part read without a put
            await metric("tail_records_total", offsets.index(a_cut))
            await gateway.flush()
            durable = gateway.store.checkpoints["tail"]["files"][str(a)]["offset"]
            assert durable < a_cut
            for i, other in enumerate(others):
                append_at(other, data[:before_mir], 900_000 + i)
            while len(tail_source(gateway).files) < 1 + len(others):
                await trio.sleep(0.01)
            append_at(b, data[:header], 950_000)  # its put comes before a.std's
            append_at(a, data[a_cut:], 1_000_000)
            await metric("gateway_records_in_total", 1 + len(one_file))
            await gateway.flush()
            nursery.cancel_scope.cancel()
    metrics = gateway.metrics.as_dict()
    assert metrics["gateway_checkpoints_rejected_total"]["source=tail"] > 0
    whole = await tailed_records(spool_dir)
    assert len(whole) >= 1 + len(one_file)
    checkpoints = await stored_checkpoints(spool_dir)
    assert checkpoints["tail"]["files"][str(a)]["offset"] == durable, (
        "the durable checkpoint is the one from before the refused ones")

    # the spool as it is now is what a crash right after its last frame leaves: the
    # restart replays every file from the durable checkpoint and skips it all
    gateway = await tail_until_read(cfg(tmp_path / "gw2", spool_dir), [a, b, *others])
    records = await tailed_records(spool_dir)
    new = records[len(whole):]
    assert new == events_of(new), "nothing of the files stored twice"
    metrics = gateway.metrics.as_dict()
    assert metrics.get("gateway_replay_skips_discarded_total", {}) == {}
    assert metrics["gateway_replayed_records_skipped_total"] == {
        "source=tail": len(whole) - 1 - len(events_of(whole))}


# -- several large checkpoints in one frame ---------------------------------------------
#
# Each checkpoint may take up to a quarter of a frame (``spool.max_bytes / 16``); several
# sources' checkpoints near that limit, all given while one batch fills, would together
# leave the frame no room (or exceed it).  The gateway stores the pending batch first
# instead, so every frame's checkpoints stay within half of it.


class PaddedSource:
    """Puts ``puts`` records one at a time, each with a checkpoint of about ``pad`` bytes;
    resuming from checkpoint ``{"at": i}`` replays puts ``i, i+1, ...``."""

    replays: ClassVar[bool] = True

    def __init__(self, name: str, puts: int, pad: int, checkpoint: Any = None) -> None:
        self.name, self.puts, self.pad = name, puts, pad
        self.resume = checkpoint["at"] if checkpoint else 0
        self.done = trio.Event()

    def record(self, i: int) -> SensorReading:
        return SensorReading("tester", 1.0, f"{self.name}-{i}", float(i))

    async def run(self, sink: Any, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        for i in range(self.resume, self.puts):
            await sink.put([self.record(i)], {"at": i + 1, "pad": "x" * self.pad})
        self.done.set()
        await trio.sleep_forever()


async def test_several_sources_near_the_checkpoint_limit_share_no_frame_they_overflow(
        tmp_path: Path) -> None:
    # five checkpoints of 950 bytes (the limit for one: 16 KiB / 16), one put each: together
    # they are more than a 4 KiB frame holds, and more than the 2 KiB all sources'
    # checkpoints may take together (the spool repeats them in every segment's STATE
    # record: tests/test_spool_state.py): the first two are stored, the others refused
    names, puts, pad = ["s1", "s2", "s3", "s4", "s5"], 1, 950

    def cfg(state: Path, spool_dir: Path) -> Any:
        return gateway_config(state, 1, batch={"max_records": 16, "max_delay_ms": 3_600_000},
                              spool={"dir": str(spool_dir), "max_bytes": 16384,
                                     "segment_bytes": 4096})

    async def run(config: Any, checkpoints: dict[str, Any],
                  store: DiskSpool | None = None) -> Gateway:
        sources = [PaddedSource(n, puts, pad, checkpoints.get(n)) for n in names]
        gateway = Gateway(config, store=store, extra_sources=[(s.name, s) for s in sources])
        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                await nursery.start(gateway.run)
                for s in sources:
                    await s.done.wait()
                nursery.cancel_scope.cancel()  # the batcher's records stored at the stop
        return gateway

    def records_of(got: list[tuple[str, float]]) -> list[str]:
        return sorted(channel for channel, _ in got)

    want = sorted(f"{n}-{i}" for n in names for i in range(puts))
    first = cfg(tmp_path / "gw", tmp_path / "spool")
    assert first.spool is not None
    images = tmp_path / "images"
    gateway = await run(first, {}, Snapshots(first.spool, set(range(1, 50)), images))
    got, checkpoints = await stored_records(tmp_path / "spool")
    assert records_of(got) == want, "every record stored once"
    stored = {n for n in names if n in checkpoints}
    assert len(stored) == 2 and all(checkpoints[n]["at"] == puts for n in stored)
    metrics = gateway.metrics.as_dict()
    assert metrics["gateway_records_rejected_total"] == {}
    assert metrics["gateway_checkpoints_rejected_total"] == {
        f"source={n}": 1 for n in names if n not in stored}
    assert metrics["gateway_source_restarts_total"] == {}

    # a crash after any frame: each source resumes at its durable checkpoint, once each
    crashes = sorted(images.iterdir(), key=lambda p: int(p.name))
    assert len(crashes) >= 2
    for image in crashes:
        _, checkpoints = await stored_records(image)
        await run(cfg(tmp_path / f"gw{image.name}", image), checkpoints)
        got, _ = await stored_records(image)
        assert records_of(got) == want, f"after frame {image.name}"


async def test_a_crash_after_any_frame_with_finished_files_folded_stores_each_record_once(
        tmp_path: Path) -> None:
    """Finished files leave the tail's checkpoint at once (``fold_after = 0``): its
    watermark says they are finished.  Whatever frame the crash follows, the restart reads
    none of the files a durable checkpoint covers again and every other one to its end."""
    from shared_data import METIS, stdf_bytes

    data = stdf_bytes(METIS)
    offsets = stdf_offsets(data)
    mir = next(i for i, o in enumerate(offsets) if (data[o + 2], data[o + 3]) == (1, 10))
    lot = data[:offsets[mir + 1]] + data[offsets[-2]:]  # FAR, ATR, MIR, MRR: a whole lot
    files = tmp_path / "stdf"
    files.mkdir()
    paths = [files / f"lot{i:02}.std" for i in range(20)] + [files / "whole.std"]
    for i, path in enumerate(paths):
        write_at(path, lot if path.name != "whole.std" else data, 1_000_000 + i)
    time.sleep(0.2)  # older than the watermark's slack

    def cfg(state: Path, spool_dir: Path) -> Any:
        return gateway_config(state, 1, sources=[{"name": "tail", "type": "tail",
                                                  "paths": [str(files)], "fold_after": 0,
                                                  "poll_interval": 0.01, "read_size": 4096}],
                              batch={"max_records": 97, "max_delay_ms": 5},
                              spool={"dir": str(spool_dir)})

    first = cfg(tmp_path / "gw", tmp_path / "spool")
    assert first.spool is not None
    images = tmp_path / "images"
    gateway = Gateway(first, store=Snapshots(first.spool, set(range(1, 100)), images))
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(gateway.run)
            while not all(f.done for f in tail_source(gateway).files.values()) or len(
                    tail_source(gateway).files) < len(paths):
                await trio.sleep(0.01)
            scan = tail_source(gateway)._scan_started  # (see tail_until_read)
            while tail_source(gateway)._scan_started == scan:
                await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
    whole = await tailed_records(tmp_path / "spool")
    assert len(whole) > len(paths)
    checkpoint = (await stored_checkpoints(tmp_path / "spool"))["tail"]
    assert len(checkpoint["files"]) < len(paths), "finished files folded"
    crashes = sorted(images.iterdir(), key=lambda p: int(p.name))
    assert len(crashes) >= 5
    for image in crashes:
        await tail_until_read(cfg(tmp_path / f"gw{image.name}", image), paths)
        assert await tailed_records(image) == whole, f"a crash after frame {image.name}"


async def test_a_crash_in_the_second_lot_of_a_file_holding_two_stores_each_record_once(
        tmp_path: Path) -> None:
    """A file of two lots back to back (files concatenated, a retest lot appended): a crash
    after any frame of its second lot -- between the parts of a split put included -- and
    the restart's re-read through the first lot's MRR and the FAR after it neither skips
    nor repeats a record; the whole file is both lots, each as a file of its own sends."""
    from shared_data import METIS, stdf_bytes

    one = stdf_bytes(METIS)
    files = tmp_path / "stdf"
    files.mkdir()
    (files / "two.std").write_bytes(one + one)
    cfg = tail_cfg(files, tmp_path / "gw", tmp_path / "spool")
    assert cfg.spool is not None
    images = tmp_path / "images"
    await tail_files_until_done(cfg, {"two.std"},
                                Snapshots(cfg.spool, set(range(1, 200)), images))
    whole = await tailed_records(tmp_path / "spool")
    assert whole == 2 * await records_of(tmp_path / "clean", one)
    crashes, split = [], 0
    for image in sorted(images.iterdir(), key=lambda p: int(p.name)):
        checkpoints = await stored_checkpoints(image)
        entry = (checkpoints.get("tail") or {}).get("files", {}).get(str(files / "two.std"))
        if entry and not entry["done"] and entry["offset"] >= len(one):
            crashes.append(image)
            split += bool(checkpoints.get(AFTER_KEY, {}).get("tail"))
    assert len(crashes) >= 3 and split, "the test needs crashes inside the second lot"
    for image in crashes[::max(1, len(crashes) // 12)]:  # (a dozen restarts at most)
        await tail_files_until_done(tail_cfg(files, tmp_path / f"gw{image.name}", image),
                                    {"two.std"})
        assert await tailed_records(image) == whole, f"a crash after frame {image.name}"
