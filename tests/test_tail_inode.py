"""The tail tells a new file that got a deleted file's inode from that file renamed
(docs/tail.md, "Inodes are reused"): by the fingerprint of its first KiB.

A file system reuses a freed inode for the next file created (ext4 does at once; tmpfs
never does).  So these tests run on an ext4 of their own (``tmp_path`` below: a loop
device, where root can mount one; else the disk's ``tmp_path``): no other process takes
the freed inode there -- on the shared disk another worker's files did, now and then,
for longer than the tests wait (``create_at_inode``).  Each test deletes a file
the tail knows and creates a *different* tester file at its inode -- under another name, or
under the same one -- between two polls or while the source is stopped, and checks that
every record of the new file is emitted, once.  Genuine renames (the same content) still
emit nothing twice.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import pytest
from test_stdf_tail import CollectingSink, expected, no_ts, tail

from edgegw.sim import stdf_file_bytes
from edgegw.sim.tester import TesterProfile
from edgegw.sources import TailSource

PROFILE: dict[str, Any] = dict(sites=4, wafer_diameter_dies=8, tests_per_part=4, seed=7)
#: two lots of the very same size and record layout, different from byte 29 (the lot id)
LOT_A = stdf_file_bytes(TesterProfile(lot_id="LOTA", **PROFILE))
LOT_B = stdf_file_bytes(TesterProfile(lot_id="LOTB", **PROFILE))
#: a larger lot
LOT_C = stdf_file_bytes(TesterProfile(lot_id="LOTC", sites=4, wafer_diameter_dies=10,
                                      tests_per_part=4, seed=8))
REUSE_TRIES = 200
REUSE_WITHIN_S = 40.0


@pytest.fixture
def tmp_path(inode_fs: Path) -> Path:
    """This module's own ext4, where it can be had (the module's note)."""
    return inode_fs


def test_the_lots_differ_only_in_their_content() -> None:
    assert len(LOT_A) == len(LOT_B) and LOT_A != LOT_B and len(LOT_C) > len(LOT_A)


def create_at_inode(path: Path, data: bytes, inode: int, tries: int = REUSE_TRIES,
                    within_s: float = REUSE_WITHIN_S) -> bool:
    """Create ``path`` holding ``data``, at ``inode`` (freed just before) if it can be had
    within ``tries`` files a round, for ``within_s`` seconds; whether it was.  The file
    system gives a new file the lowest free inode near its directory's: the freed one,
    unless a lower one is free too (then a spare file takes that one, and the next try goes
    on) or another process took it first -- on a busy machine (the suite's other worker,
    other builds) a short-lived file of theirs: it is freed again soon, so the rounds go on
    a while before giving up."""
    deadline = time.monotonic() + within_s
    while True:
        spares = []
        try:
            for i in range(tries):
                candidate = path.with_name(f".new{i}.tmp")  # a name the tail does not match
                candidate.touch()
                if candidate.stat().st_ino == inode:
                    candidate.write_bytes(data)
                    candidate.rename(path)
                    return True
                spares.append(candidate)
        finally:
            for spare in spares:
                spare.unlink()
        if time.monotonic() >= deadline:
            path.write_bytes(data)
            return False
        time.sleep(0.005)


def wait_past_change_time(path: Path) -> None:
    """Until the file system's clock has passed ``path``'s change time.  It stamps times
    with a coarse clock: a file created within the same tick as another's last change
    carries the very same time (on a floor, the next lot comes later than that)."""
    changed = path.stat().st_ctime_ns
    probe = path.with_name(".probe.tmp")
    try:
        while True:
            probe.touch()
            if probe.stat().st_ctime_ns > changed:
                return
            time.sleep(0.001)
    finally:
        probe.unlink()


def replace_at_inode(old: Path, new: Path, data: bytes) -> None:
    """Delete ``old``; create ``new`` (perhaps the same path) holding ``data`` at its inode
    (failing, never skipping, if the file system does not give it: the test needs it)."""
    st = old.stat()
    wait_past_change_time(old)
    old.unlink()
    assert create_at_inode(new, data, st.st_ino), (
        f"no new file got inode {st.st_ino} back in {REUSE_WITHIN_S:g} s (file system of "
        f"{new.parent}: inodes not reused at once?)")


async def restarted(source: TailSource, directory: Path, **config: Any) -> TailSource:
    """``source`` stops (its files closed, as when ``run`` ends), and a new tail resumes
    from its checkpoint as a durable store gives it back (restored as ``run`` does first;
    the test then polls it itself, as the model test does)."""
    for f in source.files.values():
        await source._release(f)
    again = tail([directory], checkpoint=json.loads(json.dumps(source.checkpoint())),
                 **config)
    assert again._restore(again.context.checkpoint)
    return again


async def poll(source: TailSource, sink: CollectingSink, times: int = 2) -> None:
    for _ in range(times):
        await source.poll_once(sink)


async def test_a_new_file_of_the_same_size_at_a_finished_files_inode_is_read(
        tmp_path: Path) -> None:
    """A finished lot deleted, a new lot of the very same size created at its inode under
    another name between two polls: not that lot renamed (it was: the new one never read)."""
    a = tmp_path / "a.stdf"
    a.write_bytes(LOT_A)
    source, sink = tail([tmp_path]), CollectingSink()
    await poll(source, sink)
    assert no_ts(sink.records) == expected(LOT_A)
    replace_at_inode(a, tmp_path / "b.stdf", LOT_B)
    await poll(source, sink)
    assert no_ts(sink.records) == expected(LOT_A) + expected(LOT_B)
    assert list(source.checkpoint()["files"]) == [str(tmp_path / "b.stdf")]


async def test_a_fingerprint_taken_while_the_header_was_written_grows_with_the_file(
        tmp_path: Path) -> None:
    """The first look at a file saw only its first 20 bytes (the same in both lots): its
    fingerprint is taken again as it grows, so the finished file's covers its lot id."""
    a = tmp_path / "a.stdf"
    a.write_bytes(LOT_A[:20])
    source, sink = tail([tmp_path]), CollectingSink()
    await poll(source, sink)
    with a.open("ab") as f:
        f.write(LOT_A[20:])
    await poll(source, sink)
    assert no_ts(sink.records) == expected(LOT_A)
    replace_at_inode(a, tmp_path / "b.stdf", LOT_B)
    await poll(source, sink)
    assert no_ts(sink.records) == expected(LOT_A) + expected(LOT_B)


@pytest.mark.parametrize("new", [LOT_B, LOT_C], ids=["same size", "larger"])
async def test_a_new_file_at_the_same_path_and_inode_as_a_finished_one_is_read(
        tmp_path: Path, new: bytes) -> None:
    """A finished lot deleted, a new one created under its name at its inode: read whole
    (it was "grew after it was complete", or a touch, and not read)."""
    a = tmp_path / "a.stdf"
    a.write_bytes(LOT_A)
    source, sink = tail([tmp_path]), CollectingSink()
    await poll(source, sink)
    replace_at_inode(a, a, new)
    await poll(source, sink)
    assert no_ts(sink.records) == expected(LOT_A) + expected(new)


@pytest.mark.parametrize("where", ["another name", "the same name"])
@pytest.mark.parametrize("finished", [True, False], ids=["finished", "unfinished"])
async def test_a_new_file_at_a_known_files_inode_while_stopped_is_read_whole(
        tmp_path: Path, where: str, finished: bool) -> None:
    """The same while the gateway is stopped: the checkpoint lists the old file (finished,
    or being read: a followed file holds its inode while the gateway runs, so only a stopped
    one can lose it).  The new lot is read whole, not followed from the old one's offset
    (its records before that offset were lost, or the offset failed as a record boundary)
    nor taken as the old one renamed or grown."""
    a = tmp_path / "a.stdf"
    a.write_bytes(LOT_A if finished else LOT_A[:len(LOT_A) // 2])
    source, sink = tail([tmp_path]), CollectingSink()
    await poll(source, sink)
    entry = source.checkpoint()["files"][str(a)]
    assert entry["done"] == finished and entry["offset"] > 1024
    again = await restarted(source, tmp_path)
    b = tmp_path / "b.stdf" if where == "another name" else a
    replace_at_inode(a, b, LOT_B)
    before = len(sink.records)
    await poll(again, sink)
    assert no_ts(sink.records[before:]) == expected(LOT_B)
    assert list(again.checkpoint()["files"]) == [str(b)]


@pytest.mark.parametrize("touch", [False, True], ids=["renamed", "touched and renamed"])
@pytest.mark.parametrize("stopped", [False, True], ids=["between polls", "while stopped"])
async def test_a_renamed_file_is_still_not_read_again(
        tmp_path: Path, touch: bool, stopped: bool) -> None:
    """A genuine rename (the same file, its content unchanged) of a finished lot, and of one
    being written, touched first or not, between two polls or while the gateway is stopped:
    nothing emitted twice, the unfinished one followed on to its end."""
    done, growing = tmp_path / "done.stdf", tmp_path / "growing.stdf"
    done.write_bytes(LOT_A)
    growing.write_bytes(LOT_B[:len(LOT_B) // 2])
    source, sink = tail([tmp_path]), CollectingSink()
    await poll(source, sink)
    if stopped:
        source = await restarted(source, tmp_path)
    for path in (done, growing):
        if touch:
            os.utime(path)
        path.rename(path.with_name("renamed-" + path.name))
    await poll(source, sink)
    with (tmp_path / "renamed-growing.stdf").open("ab") as f:
        f.write(LOT_B[len(LOT_B) // 2:])
    await poll(source, sink)
    assert no_ts(sink.records) == expected(LOT_A) + expected(LOT_B)
    assert sorted(Path(p).name for p in source.checkpoint()["files"]) == [
        "renamed-done.stdf", "renamed-growing.stdf"]


async def test_a_lot_at_the_inode_of_an_unfinished_file_that_vanished_is_read_once(
        tmp_path: Path) -> None:
    """Found by the model test.  An unfinished file missing at a restart is remembered by
    its inode alone (``gone``: read whole if it comes back).  A new lot that later gets
    that inode is read, and is not that file coming back after the next restart (it was:
    read whole again, once it had left the checkpoint's list)."""
    a = tmp_path / "a.stdf"
    a.write_bytes(LOT_A[:len(LOT_A) // 2])
    source, sink = tail([tmp_path], fold_after=0), CollectingSink()
    await poll(source, sink)
    source = await restarted(source, tmp_path, fold_after=0)
    inode = a.stat().st_ino
    a.unlink()  # while stopped: missing at the restart's first scan
    await poll(source, sink)
    assert create_at_inode(tmp_path / "b.stdf", LOT_B, inode), "the inode back"
    before = len(sink.records)
    await poll(source, sink)
    assert no_ts(sink.records[before:]) == expected(LOT_B)
    time.sleep(0.15)  # past the watermark's reach (fold_after 0, and 0.1 s of clock slack)
    await poll(source, sink)
    assert source.checkpoint()["files"] == {}, "b.stdf folded"
    source = await restarted(source, tmp_path, fold_after=0)
    await poll(source, sink)
    assert no_ts(sink.records[before:]) == expected(LOT_B)


@pytest.mark.parametrize("name", ["b.std", "a.std"])
async def test_a_new_file_at_the_inode_of_one_whose_first_put_a_crash_split_is_read_whole(
        tmp_path: Path, name: str) -> None:
    """The gateway crashes between the frames of the *first* put of a file: no durable
    checkpoint lists the file, frames hold some of its records (the gateway owes their
    skip to the replay of its stream from its start).  The file is deleted and a new lot
    created at its inode (under another name or its own) before the restart.  Before, the
    tail's stream was the inode alone, so the new lot's first records were skipped as the
    old file's replay -- lost; now it carries the inode's generation number, which the file
    system changes when it reuses an inode: the new lot is sent whole, once."""
    from test_exactly_once import (
        records_of,
        split_put_images,
        tail_cfg,
        tail_files_until_done,
        tailed_records,
        write_at,
    )

    files = tmp_path / "stdf"
    files.mkdir()
    # (its first read, 4 KiB, holds more records than a frame: its first put is split)
    old = stdf_file_bytes(TesterProfile(lot_id="OLD", sites=4, wafer_diameter_dies=10,
                                        tests_per_part=8, seed=5))
    write_at(files / "a.std", old, 1_000_000)
    images = [image for image, checkpoints in await split_put_images(
                  tmp_path / "first", files, files / "a.std", {"a.std"})
              if str(files / "a.std") not in ((checkpoints.get("tail") or {})
                                              .get("files") or {})]
    assert images, "the test needs a crash in the middle of the file's first put"
    image = images[0]
    new_content = await records_of(tmp_path / "clean", LOT_C)
    before = await tailed_records(image)
    replace_at_inode(files / "a.std", files / name, LOT_C)
    await tail_files_until_done(tail_cfg(files, tmp_path / "gw", image), {name})
    assert await tailed_records(image) == before + new_content, "the new lot whole, once"


@pytest.mark.parametrize("then", ["unchanged", "renamed", "a new lot at its inode"])
async def test_an_upgrade_after_a_crash_in_a_files_first_put_loses_nothing(
        tmp_path: Path, then: str) -> None:
    """A gateway from before generation numbers (its spool names a file's stream by the
    inode alone, its checkpoints carry no ``gen``) crashes between the frames of a file's
    *first* put; the upgraded gateway restarts from that spool, the file unchanged, renamed,
    or deleted and a new lot created at its inode meanwhile.  The upgraded tail names the
    file, which no checkpoint lists, ``[inode, gen]``: the old span, keyed by the inode
    alone, never meets it, so nothing is skipped -- the records the frames held of that
    first put are stored twice (known, docs/tail.md "Upgrading"), and a new lot at the
    inode is stored whole.  Taking the old span for the file would skip the new lot's first
    records instead: lost, which an older spool cannot tell from the same file."""
    import shutil

    from test_exactly_once import (
        Snapshots,
        records_of,
        tail_cfg,
        tail_files_until_done,
        tailed_records,
        write_at,
    )

    from edgegw.gateway import AFTER_KEY, ORIGINS_KEY
    from edgegw.spool import DiskSpool, SpoolConfig

    class OlderGateway(Snapshots):
        """The real spool, written as a gateway from before generation numbers wrote it."""

        async def append(self, body: bytes, n_records: int, checkpoints: dict[str, Any]
                         ) -> int:
            checkpoints = json.loads(json.dumps(checkpoints))
            for entry in ((checkpoints.get("tail") or {}).get("files") or {}).values():
                entry.pop("gen", None)
            for spans in ((checkpoints.get(AFTER_KEY) or {}).get(ORIGINS_KEY) or {}).values():
                for span in spans:
                    if isinstance(span[0], list) and span[0][0] != "io":
                        span[0] = span[0][0]
            return await super().append(body, n_records, checkpoints)

    files = tmp_path / "stdf"
    files.mkdir()
    a = files / "a.std"
    lot = stdf_file_bytes(TesterProfile(lot_id="OLD", sites=4, wafer_diameter_dies=10,
                                        tests_per_part=8, seed=5))
    write_at(a, lot, 1_000_000)
    cfg = tail_cfg(files, tmp_path / "gw", tmp_path / "spool")
    assert cfg.spool is not None
    images = tmp_path / "images"
    await tail_files_until_done(cfg, {"a.std"}, OlderGateway(cfg.spool, set(range(1, 30)),
                                                             images))
    image = None
    for candidate in sorted(images.iterdir(), key=lambda p: int(p.name)):
        async with DiskSpool.open(SpoolConfig(dir=str(candidate))) as spool:
            checkpoints = dict(spool.checkpoints)
        if (checkpoints.get(AFTER_KEY, {}).get("tail") and str(a) not in
                ((checkpoints.get("tail") or {}).get("files") or {})):
            image = candidate
            break
    assert image is not None, "the test needs a crash in the middle of the file's first put"
    held = await tailed_records(image)
    assert 0 < len(held) < len(await records_of(tmp_path / "clean", lot))
    name, content = "a.std", lot
    if then == "renamed":
        name = "b.std"
        a.rename(files / name)
    elif then != "unchanged":
        name, content = "c.std", LOT_C
        replace_at_inode(a, files / name, content)
    await tail_files_until_done(tail_cfg(files, tmp_path / "gw2", image), {name})
    assert await tailed_records(image) == held + await records_of(tmp_path / "new", content)
    shutil.rmtree(images)
