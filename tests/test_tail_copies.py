"""A finished tester file compressed where it lies (``gzip lot.stdf``: a new file,
``lot.stdf.gz``, the plain one removed) is not read again: the tail takes the gzip file
for a compressed copy of the file it read (docs/tail.md, "Compressed in place").  Before,
the whole lot went to the hub a second time.
"""

from __future__ import annotations

import dataclasses
import gzip
import time
import zlib
from pathlib import Path

import pytest
import trio
from test_stdf_tail import expected
from test_tail_registry import Sink, append, crash, lot_bytes, lot_ids, of, read_and_fold, start

from edgegw.sources import WAIT, Finished, Originals, TailSource, read_gzip_heads


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
    unfinished.add_unfinished(head)
    assert unfinished.copy_of(data[:1024], ended=False) == WAIT, "its original not finished"


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


async def behind_on_lot1(tmp_path: Path) -> tuple[Path, Path, bytes, Sink, TailSource]:
    """A tail that has read half of lot1.stdf when the tester writes the rest, through
    its MRR: its directory, the file, the whole file's bytes, the sink and the source."""
    directory, state = tmp_path / "watched", tmp_path / "state"
    directory.mkdir()
    data = lot_bytes(1)
    path = directory / "lot1.stdf"
    path.write_bytes(data[:len(data) // 2])
    sink = Sink(state)
    source = start(directory, state, None)
    await source.poll_once(sink)
    assert 0 < source.files[str(path)].offset < len(data)
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
