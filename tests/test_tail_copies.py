"""A finished tester file compressed where it lies (``gzip lot.stdf``: a new file,
``lot.stdf.gz``, the plain one removed) is not read again: the tail takes the gzip file
for a compressed copy of the file it read (docs/tail.md, "Compressed in place").  Before,
the whole lot went to the hub a second time.
"""

from __future__ import annotations

import dataclasses
import gzip
import os
import time
import zlib
from pathlib import Path

import pytest
import trio
from test_stdf_tail import expected
from test_tail_registry import (
    LaggingSink,
    Sink,
    append,
    crash,
    lot_bytes,
    lot_ids,
    of,
    read_and_fold,
    start,
)

from edgegw.sim import stdf_file_bytes
from edgegw.sim.tester import TesterProfile
from edgegw.sources import WAIT, Finished, Originals, TailSource, read_gzip_heads
from edgegw.stdf import StdfDecoder


def test_the_decision() -> None:
    data = lot_bytes(1)
    head = (1024, zlib.crc32(data[:1024]))
    known = Originals()
    known.add(Finished("lot1.stdf", head, len(data), len(data)))
    assert known.copy_of(data[:1024], ended=False) == Finished("lot1.stdf", head,
                                                                len(data), len(data))
    assert known.copy_of(data[:100], ended=False) == WAIT, "too few bytes to tell yet"
    assert known.copy_of(data[:100], ended=True) is None, "a small file of its own"
    other = lot_bytes(2)
    assert known.copy_of(other[:1024], ended=False) is None, "another lot"
    unfinished = Originals()
    unfinished.add_unfinished(head, "lot1.stdf")
    assert unfinished.copy_of(data[:1024], ended=False) == WAIT, "its original not finished"
    assert unfinished.unfinished_of(data[:1024]) == "lot1.stdf"
    assert unfinished.unfinished_of(other[:1024]) is None
    assert known.unfinished_of(data[:1024]) is None, "finished: not read on"
    # the longest fingerprint decides: an unfinished file the tail read 17 bytes of (a
    # FAR, part of a MIR) starts like any lot of that tester, a finished one's KiB does not
    short = Originals()
    short.add_unfinished((17, zlib.crc32(data[:17])), "lot1.stdf")
    assert other[:17] == data[:17]
    assert short.unfinished_of(other[:1024]) == "lot1.stdf"
    short.add(Finished("lot2.stdf", (1024, zlib.crc32(other[:1024])), 1, 1))
    assert short.unfinished_of(other[:1024]) is None, "a copy of finished lot2.stdf"


def test_the_decompressed_head_of_members_and_of_a_file_being_written(tmp_path: Path) -> None:
    data = lot_bytes(1)
    whole, members, cut = tmp_path / "a.gz", tmp_path / "b.gz", tmp_path / "c.gz"
    whole.write_bytes(gzip.compress(data))
    members.write_bytes(gzip.compress(data[:300]) + gzip.compress(data[300:]))
    cut.write_bytes(gzip.compress(data)[:12])
    heads = read_gzip_heads([(str(p), p.stat().st_ino) for p in (whole, members, cut)])
    assert heads[str(whole)].data == heads[str(members)].data == data[:1024]
    assert not heads[str(cut)].ended


async def lot1_read(tmp_path: Path, *, fold: bool = True
                    ) -> tuple[Path, Path, bytes, Sink, TailSource]:
    """A tail that has read the finished lot1.stdf (and folded it, with ``fold``): its
    directory, the file, its bytes, the sink and the source."""
    directory, state = tmp_path / "watched", tmp_path / "state"
    directory.mkdir()
    data = lot_bytes(1)
    path = directory / "lot1.stdf"
    path.write_bytes(data)
    sink = Sink(state)
    source = start(directory, state, None)
    if fold:
        await read_and_fold(source, sink)
    else:
        for _ in range(3):
            await source.poll_once(sink)
    assert of(sink.records, 1) == expected(data)
    return directory, path, data, sink, source


@pytest.mark.parametrize("keep", [False, True], ids=["gzip", "gzip -k"])
@pytest.mark.parametrize("when", ["running", "folded", "stopped"])
async def test_a_finished_file_compressed_in_place_is_not_read_again(
        tmp_path: Path, when: str, keep: bool) -> None:
    directory, path, _, sink, source = await lot1_read(tmp_path, fold=when != "running")
    state = tmp_path / "state"
    if when == "stopped":
        await crash(source)
    await trio.run_process(["gzip", *(["-k"] if keep else []), str(path)])
    if when == "stopped":
        source = start(directory, state, sink.checkpoint)
    for _ in range(3):
        time.sleep(0.05)
        await source.poll_once(sink)
    assert lot_ids(sink.records) == {"L001": 1}, "the lot once"
    assert source.copies.get(source="tester1") == 1
    # and a restart from there knows the copy: nothing read again
    await crash(source)
    source = start(directory, state, sink.checkpoint)
    await read_and_fold(source, sink)
    assert lot_ids(sink.records) == {"L001": 1}
    await crash(source)


async def test_a_copy_seen_while_gzip_writes_it_is_waited_on_then_not_read(
        tmp_path: Path) -> None:
    directory, path, data, sink, source = await lot1_read(tmp_path)
    packed = gzip.compress(data)
    copy = directory / "lot1.stdf.gz"
    copy.write_bytes(packed[:10])  # gzip's header: nothing decompresses yet
    await source.poll_once(sink)
    await source.poll_once(sink)
    append(copy, packed[10:])
    path.unlink()
    for _ in range(3):
        time.sleep(0.05)
        await source.poll_once(sink)
    assert lot_ids(sink.records) == {"L001": 1}
    # a lot appended to the compressed copy later is read, once
    more = lot_bytes(2)
    append(copy, gzip.compress(more))
    for _ in range(3):
        time.sleep(0.05)
        await source.poll_once(sink)
    assert lot_ids(sink.records) == {"L001": 1, "L002": 1}
    assert of(sink.records, 2) == expected(more)
    await crash(source)


async def test_a_gzip_file_of_its_own_is_read(tmp_path: Path) -> None:
    """Another lot, compressed, beside the finished plain one: read, whole."""
    directory, _, _, sink, source = await lot1_read(tmp_path)
    other = lot_bytes(2)
    (directory / "lot2.stdf.gz").write_bytes(gzip.compress(other))
    for _ in range(3):
        await source.poll_once(sink)
    assert of(sink.records, 2) == expected(other)
    assert source.copies.get(source="tester1") == 0
    await crash(source)


async def test_a_gzip_file_too_short_to_tell_is_read_after_idle_timeout(
        tmp_path: Path) -> None:
    directory, _, _, sink, source = await lot1_read(tmp_path)
    source.config = dataclasses.replace(source.config, idle_timeout=0.3)
    short = directory / "short.stdf.gz"
    short.write_bytes(gzip.compress(lot_bytes(3))[:12])  # cut inside its first member
    await source.poll_once(sink)
    assert source.files[str(short)].copy_wait is not None, "waited on"
    deadline = time.monotonic() + 10
    while source.files[str(short)].reason == "" and time.monotonic() < deadline:
        time.sleep(0.1)
        await source.poll_once(sink)
    assert source.files[str(short)].done, "then read as a file of its own: a truncated gzip"
    await crash(source)


def big_lot() -> bytes:
    """Lot L001, larger: many reads of a small ``read_size``."""
    return stdf_file_bytes(TesterProfile(lot_id="L001", sites=4, wafer_diameter_dies=10,
                                         tests_per_part=4, seed=1))


async def behind_on_lot1(tmp_path: Path) -> tuple[Path, Path, bytes, Sink, TailSource]:
    """A tail that has read half of lot1.stdf when the tester writes the rest, through
    its MRR: its directory, the file, the whole file's bytes, the sink and the source."""
    directory, state = tmp_path / "watched", tmp_path / "state"
    directory.mkdir()
    data = big_lot()
    path = directory / "lot1.stdf"
    path.write_bytes(data[:len(data) // 2])
    sink = Sink(state)
    source = start(directory, state, None)
    await source.poll_once(sink)
    assert 1024 < source.files[str(path)].offset < len(data)
    append(path, data[len(data) // 2:])
    return directory, path, data, sink, source


@pytest.mark.parametrize("how", ["gzip", "rm", "rm, and the next lot at its name"])
async def test_a_file_removed_before_the_tail_read_its_end_is_read_to_its_end(
        tmp_path: Path, how: str) -> None:
    """A lot-end script compresses the datalog, or moves it away (to another file system:
    a copy, then ``rm``), before the next poll: what the tail had not read yet is read
    through the file it holds open -- once, and a compressed copy is not read again."""
    _, path, data, sink, source = await behind_on_lot1(tmp_path)
    if how == "gzip":
        await trio.run_process(["gzip", str(path)])
    else:
        path.unlink()
    if how.endswith("name"):
        path.write_bytes(lot_bytes(2))
    for _ in range(3):
        time.sleep(0.05)
        await source.poll_once(sink)
    assert of(sink.records, 1) == expected(data), "every record, once"
    if how.endswith("name"):
        assert of(sink.records, 2) == expected(lot_bytes(2))
    assert source.copies.get(source="tester1") == (how == "gzip")
    assert source.removed_read.get(source="tester1") == 1
    await crash(source)


async def test_a_file_compressed_while_the_gateway_was_stopped_behind_on_it_is_read_on_in_the_copy(
        tmp_path: Path) -> None:
    """Stopped half-way through a lot; the lot ends and is compressed in place before the
    gateway starts again: the copy is read on from where the checkpoint left the original
    -- the rest of the lot once, none of it twice."""
    directory, path, data, sink, source = await behind_on_lot1(tmp_path)
    await crash(source)
    await trio.run_process(["gzip", str(path)])
    source = start(directory, tmp_path / "state", sink.checkpoint)
    for _ in range(3):
        await source.poll_once(sink)
    assert of(sink.records, 1) == expected(data)
    assert source.copies.get(source="tester1") == 1
    copy = source.files[str(path) + ".gz"]
    assert copy.done and copy.reason == "MRR"
    # its records are named by the original's stream, in a restart's checkpoint too
    await crash(source)
    source = start(directory, tmp_path / "state", sink.checkpoint)
    assert source.files[str(copy.path)].stream == copy.stream != copy.inode
    await read_and_fold(source, sink)
    assert of(sink.records, 1) == expected(data)
    await crash(source)


async def test_a_crash_at_any_put_then_the_file_compressed_neither_loses_nor_repeats(
        tmp_path: Path) -> None:
    """The lot read in small steps; the gateway crashes after each put in turn (the
    checkpoints and records of the later puts never durable), the file is compressed in
    place, and the gateway starts again: each record of the lot once."""
    data = big_lot()
    pieces = [data[i:i + len(data) // 5] for i in range(0, len(data), len(data) // 5)]

    async def tail(directory: Path, sink: Sink) -> TailSource:
        source = start(directory, sink.state, None, read_size=2048)
        for piece in pieces:
            append(directory / "lot1.stdf", piece)
            await source.poll_once(sink)
        return source

    whole = Sink(tmp_path / "state")
    (tmp_path / "watched").mkdir()
    await crash(await tail(tmp_path / "watched", whole))
    assert len(whole.puts) > 5
    for k in range(len(whole.puts) + 1):
        directory, state = tmp_path / f"w{k}", tmp_path / f"s{k}"
        directory.mkdir()
        sink = LaggingSink(state, directory, durable=k)
        await crash(await tail(directory, sink))
        await trio.run_process(["gzip", str(directory / "lot1.stdf")])
        source = start(directory, state, sink.checkpoint, read_size=2048)
        sink.durable = 1 << 30
        for _ in range(3):
            await source.poll_once(sink)
        await crash(source)
        assert of(sink.records, 1) == expected(data), k


async def test_a_file_without_its_end_removed_and_compressed_is_read_on_in_the_copy(
        tmp_path: Path) -> None:
    """The tester stopped without an MRR, and a script compressed the file while the tail
    was behind: read to where the open file ended, then followed in the copy (idle there
    until ``idle_timeout``, as the file would have been): each record once."""
    directory, state = tmp_path / "watched", tmp_path / "state"
    directory.mkdir()
    dec = StdfDecoder()
    dec.feed(big_lot())
    last_prr = [r.offset for r in dec.records() if r.name == "PRR"][-1]
    data = big_lot()[:last_prr]  # (no MRR, the last part without its PRR)
    path = directory / "lot1.stdf"
    path.write_bytes(data[:len(data) // 2])
    sink = Sink(state)
    source = start(directory, state, None)
    source.config = dataclasses.replace(source.config, idle_timeout=0.3)
    await source.poll_once(sink)
    append(path, data[len(data) // 2:])
    await trio.run_process(["gzip", str(path)])
    deadline = time.monotonic() + 10
    copy = str(path) + ".gz"
    while copy not in source.files or not source.files[copy].done:
        assert time.monotonic() < deadline
        time.sleep(0.05)
        await source.poll_once(sink)
    assert of(sink.records, 1) == expected(data)
    assert source.removed_read.get(source="tester1") == 1
    assert source.copies.get(source="tester1") == 1
    await crash(source)


async def test_through_the_gateway_a_crash_after_any_frame_then_the_file_compressed(
        tmp_path: Path) -> None:
    """A real tester file tailed by a gateway with its spool, the crash image taken after
    every frame; the file is then compressed in place (``gzip``: the plain file gone) and
    the gateway restarted from each image.  The records stored: those of a clean run,
    each once -- the copy is read on from the durable checkpoint, its records named by the
    original's stream, so the gateway's replay skip still applies to them (between the
    parts of a split put too)."""
    from shared_data import METIS, stdf_bytes
    from test_exactly_once import (
        Snapshots,
        stored_checkpoints,
        tail_cfg,
        tail_files_until_done,
        tailed_records,
    )

    from edgegw.gateway import AFTER_KEY

    data = stdf_bytes(METIS)
    files = tmp_path / "stdf"
    files.mkdir()
    (files / "a.std").write_bytes(data)
    cfg = tail_cfg(files, tmp_path / "gw", tmp_path / "spool")
    assert cfg.spool is not None
    images = tmp_path / "images"
    await tail_files_until_done(cfg, {"a.std"}, Snapshots(cfg.spool, set(range(1, 200)),
                                                         images))
    whole = await tailed_records(tmp_path / "spool")
    await trio.run_process(["gzip", str(files / "a.std")])
    crashes, split = [], 0
    for image in sorted(images.iterdir(), key=lambda p: int(p.name)):
        checkpoints = await stored_checkpoints(image)
        entry = (checkpoints.get("tail") or {}).get("files", {}).get(str(files / "a.std"))
        if entry and not entry["done"]:
            crashes.append(image)
            split += bool(checkpoints.get(AFTER_KEY, {}).get("tail"))
    assert len(crashes) >= 3 and split, "the test needs crashes inside the file"
    for image in crashes[::max(1, len(crashes) // 12)]:  # (a dozen restarts at most)
        await tail_files_until_done(tail_cfg(files, tmp_path / f"gw{image.name}", image),
                                    {"a.std.gz"})
        assert await tailed_records(image) == whole, f"a crash after frame {image.name}"


async def test_the_copy_is_read_on_when_a_new_file_met_first_has_the_original_inode(
        inode_fs: Path) -> None:
    """Found by the model test (seed 119 of its long run).  Stopped behind on a lot, which
    is then compressed; the next lot is created at the plain file's freed inode, and the
    tail meets it before the copy.  The new lot is a new file, and the copy is still read
    on from where the original was read to: each lot once."""
    from test_tail_inode import create_at_inode, wait_past_change_time

    directory, path, data, sink, source = await behind_on_lot1(inode_fs)
    await crash(source)
    inode = path.stat().st_ino
    await trio.run_process(["gzip", str(path)])
    wait_past_change_time(directory / "lot1.stdf.gz")
    nxt = directory / "lot2.stdf"
    assert create_at_inode(nxt, lot_bytes(2), inode), "the inode back"
    os.utime(nxt, (1e9, 1e9))  # (older: met first)
    source = start(directory, inode_fs / "state", sink.checkpoint)
    for _ in range(3):
        await source.poll_once(sink)
    assert of(sink.records, 1) == expected(data)
    assert of(sink.records, 2) == expected(lot_bytes(2))
    await crash(source)


async def test_the_copy_is_read_on_when_it_has_the_inode_of_another_file_gone(
        inode_fs: Path) -> None:
    """Found by the model test (seed 107 of its long run).  The copy is made at the inode
    of another file the checkpoint lists, deleted while the gateway was stopped: compared
    with that file it is not it -- which says nothing of the copy read on."""
    from test_tail_inode import create_at_inode

    directory, state = inode_fs / "watched", inode_fs / "state"
    directory.mkdir()
    data = big_lot()
    path, other = directory / "lot1.stdf", directory / "lot2.stdf"
    path.write_bytes(data[:len(data) // 2])
    other.write_bytes(lot_bytes(2)[:700])
    sink = Sink(state)
    source = start(directory, state, None)
    await source.poll_once(sink)
    await crash(source)
    append(path, data[len(data) // 2:])
    inode = other.stat().st_ino
    other.unlink()
    assert create_at_inode(directory / "lot1.stdf.gz", gzip.compress(path.read_bytes()),
                           inode), "the inode back"
    path.unlink()
    source = start(directory, state, sink.checkpoint)
    for _ in range(3):
        await source.poll_once(sink)
    assert of(sink.records, 1) == expected(data)
    await crash(source)


async def test_a_copy_of_a_finished_lot_is_not_taken_for_a_lot_begun_like_it(
        tmp_path: Path) -> None:
    """Found by the model test (seed 110 of its long run).  Stopped when the tail had read
    one lot's first bytes only (its FAR: the start of every lot of that tester) and
    another lot whole; the first is deleted, the second compressed in place.  The copy is
    the finished lot's (its whole first KiB matches), not the rest of the first: not read
    again.  Before, it was read on as the first lot's rest: the second lot twice."""
    directory, state = tmp_path / "watched", tmp_path / "state"
    directory.mkdir()
    first, second = lot_bytes(1), lot_bytes(2)
    assert first[:17] == second[:17]
    (directory / "lot1.stdf").write_bytes(first[:17])
    (directory / "lot2.stdf").write_bytes(second)
    sink = Sink(state)
    source = start(directory, state, None)
    await source.poll_once(sink)
    await crash(source)
    assert sink.checkpoint["files"][str(directory / "lot1.stdf")]["offset"] < 17
    (directory / "lot1.stdf").unlink()
    await trio.run_process(["gzip", str(directory / "lot2.stdf")])
    source = start(directory, state, sink.checkpoint)
    for _ in range(3):
        await source.poll_once(sink)
    assert lot_ids(sink.records) == {"L002": 1}
    assert of(sink.records, 2) == expected(second)
    assert source.copies.get(source="tester1") == 1
    await crash(source)


async def test_a_copy_taken_as_finished_and_folded_is_not_read_on_as_a_lot_begun_like_it(
        tmp_path: Path) -> None:
    """Found by the model test (seed 110 of its long run, later in it).  A lot compressed
    in place while the gateway ran, its copy taken as finished and folded into the
    watermark; another lot, of which the tail read only the first bytes (a FAR), is
    deleted while the gateway is stopped.  At the restart the copy is a file finished
    before the checkpoint -- not the other lot's rest read on."""
    directory, state = tmp_path / "watched", tmp_path / "state"
    directory.mkdir()
    first, second = lot_bytes(1), lot_bytes(2)
    (directory / "lot1.stdf").write_bytes(first[:17])
    (directory / "lot2.stdf").write_bytes(second)
    sink = Sink(state)
    source = start(directory, state, None)
    await source.poll_once(sink)
    await trio.run_process(["gzip", str(directory / "lot2.stdf")])
    await read_and_fold(source, sink)
    assert source.copies.get(source="tester1") == 1
    assert str(directory / "lot2.stdf.gz") not in sink.checkpoint["files"], "folded"
    await crash(source)
    (directory / "lot1.stdf").unlink()
    source = start(directory, state, sink.checkpoint)
    for _ in range(3):
        await source.poll_once(sink)
    assert lot_ids(sink.records) == {"L002": 1}
    await crash(source)


async def test_the_copy_is_read_on_when_the_original_was_rotated_and_its_inode_reused(
        inode_fs: Path) -> None:
    """Found by the model test (seed 186 of its long run).  While the gateway is stopped,
    behind on a lot: the tester rotates it (renamed, a new lot at its name), it is
    compressed under its new name, and a third lot is created at its freed inode.  The
    file at the old inode is not the lot (its first bytes differ): the copy is read on
    from where the lot was read to, and the other two lots are read as new."""
    from test_tail_inode import create_at_inode

    directory, path, data, sink, source = await behind_on_lot1(inode_fs)
    await crash(source)
    inode = path.stat().st_ino
    aside = directory / "lot1b.stdf"
    path.rename(aside)
    path.write_bytes(lot_bytes(2))
    await trio.run_process(["gzip", str(aside)])
    assert create_at_inode(directory / "lot3.stdf", lot_bytes(3), inode), "the inode back"
    source = start(directory, inode_fs / "state", sink.checkpoint)
    for _ in range(3):
        await source.poll_once(sink)
    assert of(sink.records, 1) == expected(data)
    assert of(sink.records, 2) == expected(lot_bytes(2))
    assert of(sink.records, 3) == expected(lot_bytes(3))
    await crash(source)
