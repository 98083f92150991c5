"""A file with two names is one file (docs/tail.md, "Hard links").

A hard link gives a tester file a second path -- in the same watched directory, or in
another one the tail watches -- with the same inode (and generation).  The tail reads it
once, whichever path(s) it has: it follows one of them and takes the others for that file.
Removing one link while the other stays is a rename: neither read again nor lost.  Before,
each path was a file of its own: every record sent twice, and two live streams named
``[inode, gen]`` alike, so the gateway's replay skips (docs/spool.md) could apply one
path's count to the other's records.

The links are made between polls, while a file is being written or after it finished, and
while the gateway is stopped (with the registry of finished files, as a gateway has it).
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

LOT = stdf_file_bytes(TesterProfile(lot_id="LINKED", sites=4, wafer_diameter_dies=8,
                                    tests_per_part=4, seed=3))
HALF = len(LOT) // 2


def make(directory: Path, **config: Any) -> TailSource:
    return tail([directory], fold_after=0, state_dir=directory.parent / "state", **config)


async def restarted(source: TailSource, directory: Path, **config: Any) -> TailSource:
    """``source`` stops (its files closed), and a new tail resumes from its checkpoint as a
    durable store gives it back, with the registry of finished files it wrote."""
    for f in source.files.values():
        await source._release(f)
    again = tail([directory], checkpoint=json.loads(json.dumps(source.checkpoint())),
                 fold_after=0, state_dir=directory.parent / "state", **config)
    assert again._restore(again.context.checkpoint)
    return again


async def poll(source: TailSource, sink: CollectingSink, times: int = 2) -> None:
    for _ in range(times):
        await source.poll_once(sink)


async def folded(source: TailSource, sink: CollectingSink) -> None:
    """Past the watermark's reach (fold_after 0, and 0.1 s of clock slack): every finished
    file leaves the checkpoint's list (its registry entry written)."""
    time.sleep(0.15)
    await poll(source, sink)
    assert source.checkpoint()["files"] == {}


def the_paths(source: TailSource) -> list[str]:
    return sorted(Path(p).name for p in source.files)


@pytest.fixture
def watched(tmp_path: Path) -> Path:
    d = tmp_path / "watched"
    d.mkdir()
    return d


async def test_both_links_there_at_the_start_read_once(watched: Path) -> None:
    (watched / "a.stdf").write_bytes(LOT)
    os.link(watched / "a.stdf", watched / "b.stdf")
    source, sink = make(watched), CollectingSink()
    await poll(source, sink)
    assert no_ts(sink.records) == expected(LOT)
    assert the_paths(source) == ["a.stdf"], "one file, followed under one name"


async def test_a_link_in_another_watched_directory_is_the_same_file(tmp_path: Path) -> None:
    """Two watched paths (a directory and a glob) that hold the same inode."""
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir()
    two.mkdir()
    (one / "a.stdf").write_bytes(LOT)
    os.link(one / "a.stdf", two / "lot.std")
    source, sink = tail([one, two / "*.std"]), CollectingSink()
    await poll(source, sink)
    assert no_ts(sink.records) == expected(LOT)


@pytest.mark.parametrize("removed", ["the first name", "the link"])
async def test_a_link_made_while_the_file_is_written(watched: Path, removed: str) -> None:
    """Linked half-way through the lot; then one of its names removed, and the lot
    finished under the other: each record once."""
    a, b = watched / "a.stdf", watched / "b.stdf"
    a.write_bytes(LOT[:HALF])
    source, sink = make(watched), CollectingSink()
    await poll(source, sink)
    os.link(a, b)
    await poll(source, sink)
    with a.open("ab") as f:
        f.write(LOT[HALF:HALF + 1000])
    await poll(source, sink)
    assert the_paths(source) == ["a.stdf"]
    (a if removed == "the first name" else b).unlink()
    stays = b if removed == "the first name" else a
    with stays.open("ab") as f:
        f.write(LOT[HALF + 1000:])
    await poll(source, sink)
    assert no_ts(sink.records) == expected(LOT)
    assert the_paths(source) == [stays.name]


@pytest.mark.parametrize("removed", ["none", "the first name", "the link"])
async def test_a_link_made_after_the_file_finished(watched: Path, removed: str) -> None:
    """Linked once read to its end (listed still, or folded): not read again, nor when one
    name goes, nor after a restart."""
    a, b = watched / "a.stdf", watched / "b.stdf"
    a.write_bytes(LOT)
    source, sink = make(watched), CollectingSink()
    await poll(source, sink)
    await folded(source, sink)
    os.link(a, b)
    await poll(source, sink)
    if removed != "none":
        (a if removed == "the first name" else b).unlink()
        await poll(source, sink)
    await folded(source, sink)
    source = await restarted(source, watched)
    await poll(source, sink)
    assert no_ts(sink.records) == expected(LOT)


async def test_a_finished_file_grown_then_its_first_name_removed(watched: Path) -> None:
    """A finished lot appended to (logged, not read), linked, and the name it was read by
    removed: the link is that file, not a finished file renamed with another size (which is
    read again): nothing sent twice."""
    a, b = watched / "a.stdf", watched / "b.stdf"
    a.write_bytes(LOT)
    source, sink = make(watched), CollectingSink()
    await poll(source, sink)
    with a.open("ab") as f:
        f.write(b"\0" * 8)
    await poll(source, sink)
    os.link(a, b)
    await poll(source, sink)
    a.unlink()
    await poll(source, sink)
    assert the_paths(source) == ["b.stdf"]
    assert no_ts(sink.records) == expected(LOT)


@pytest.mark.parametrize("removed", ["none", "the first name", "the link"])
@pytest.mark.parametrize("state", ["being written", "finished, listed", "finished, folded"])
async def test_a_link_made_while_the_gateway_is_stopped(
        watched: Path, state: str, removed: str) -> None:
    """Linked (and perhaps one name removed) while the gateway is stopped: the restart
    reads the file on from its checkpoint, once, or not at all when it was finished."""
    a, b = watched / "a.stdf", watched / "b.stdf"
    a.write_bytes(LOT[:HALF] if state == "being written" else LOT)
    source, sink = make(watched), CollectingSink()
    await poll(source, sink)
    if state == "finished, folded":
        await folded(source, sink)
    source = await restarted(source, watched)
    os.link(a, b)
    if removed != "none":
        (a if removed == "the first name" else b).unlink()
    stays = b if removed == "the first name" else a
    await poll(source, sink)
    if state == "being written":
        with stays.open("ab") as f:
            f.write(LOT[HALF:])
        await poll(source, sink)
    assert no_ts(sink.records) == expected(LOT)
    source = await restarted(source, watched)
    await poll(source, sink)
    assert no_ts(sink.records) == expected(LOT)


@pytest.mark.parametrize("removed", [False, True], ids=["both names stay", "one removed"])
async def test_a_crash_in_a_split_put_of_a_file_with_two_names_stores_each_record_once(
        tmp_path: Path, removed: bool) -> None:
    """Through the gateway and its spool: a lot with two names, the gateway crashed between
    the frames of a split put (frames hold records its durable checkpoint does not cover),
    restarted with both names, or with the name it read the lot by removed (the link is that
    file renamed: the replay resumes its stream, ``[inode, gen]``, where the skip was
    counted).  The lot is stored once.  Before, both names were read, each record stored
    twice, and the two names' puts shared one stream: a skip counted for one name's put was
    discarded by, or applied to, the other's."""
    from test_exactly_once import (
        records_of,
        split_put_images,
        tail_cfg,
        tail_files_until_done,
        tailed_records,
    )

    lot = stdf_file_bytes(TesterProfile(lot_id="TWO", sites=4, wafer_diameter_dies=10,
                                        tests_per_part=8, seed=5))
    files = tmp_path / "stdf"
    files.mkdir()
    a, b = files / "a.std", files / "b.std"
    a.write_bytes(lot)
    os.link(a, b)
    clean = await records_of(tmp_path / "clean", lot)
    images = await split_put_images(tmp_path / "first", files, a, {"a.std"})
    assert await tailed_records(tmp_path / "first" / "spool") == clean, "a run without crash"
    for image, _ in images[:4]:
        if removed:
            a.unlink()
        await tail_files_until_done(tail_cfg(files, tmp_path / f"gw{image.name}", image),
                                    {"b.std" if removed else "a.std"})
        assert await tailed_records(image) == clean, f"a crash after frame {image.name}"
        if removed:
            os.link(b, a)


OTHER = stdf_file_bytes(TesterProfile(lot_id="OTHER", sites=4, wafer_diameter_dies=8,
                                      tests_per_part=4, seed=4))


@pytest.mark.parametrize("how", ["renamed", "linked, then its name removed"])
@pytest.mark.parametrize("state", ["being written", "finished"])
async def test_a_new_file_at_the_name_a_file_was_read_by(
        watched: Path, how: str, state: str) -> None:
    """The file the tail reads by a name gets another (renamed, or a hard link and the first
    name removed) and a new lot is created at the first name, between two polls (a tester
    that rotates its file): the first lot is followed on under its new name, not read again;
    the new lot is read whole."""
    a, b = watched / "a.stdf", watched / "b.stdf"
    a.write_bytes(LOT[:HALF] if state == "being written" else LOT)
    source, sink = make(watched), CollectingSink()
    await poll(source, sink)
    if how == "renamed":
        a.rename(b)
    else:
        os.link(a, b)
        a.unlink()
    a.write_bytes(OTHER)
    if state == "being written":
        with b.open("ab") as f:
            f.write(LOT[HALF:])
    await poll(source, sink)
    got = no_ts(sink.records)
    assert [r for r in got if r.lot_id == "LINKED"] == expected(LOT)
    assert [r for r in got if r.lot_id == "OTHER"] == expected(OTHER)
