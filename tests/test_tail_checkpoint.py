"""The tail's checkpoint stays bounded however many finished files stay on disk
(docs/tail.md, "The checkpoint's size").

A finished file leaves the checkpoint's list once it has not changed for ``fold_after``
seconds: the watermark ``finished_before`` stands for it.  A restart does not read such a
file again, and reads every file that is new or unfinished exactly once.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
from test_stdf_tail import SMALL, CollectingSink, expected, no_ts, tail

from edgegw.metrics import Metrics
from edgegw.records import LotEnd, LotStart
from edgegw.sim import stdf_file_bytes
from edgegw.stdf import StdfDecoder


@pytest.fixture
def many_files_dir(tmp_path: Path) -> Iterator[Path]:
    """A directory for thousands of files: in memory (/dev/shm) where there is one, as
    creating them on a busy disk takes a millisecond each."""
    shm = Path("/dev/shm")
    if not (shm.is_dir() and os.access(shm, os.W_OK)):
        yield tmp_path
        return
    with tempfile.TemporaryDirectory(dir=shm, prefix="edgegw-test-") as d:
        yield Path(d)


def stdf_offsets(data: bytes) -> list[int]:
    """Where each record of an STDF file (little endian) starts, and its end."""
    offsets = [0]
    while offsets[-1] < len(data):
        offsets.append(offsets[-1] + 4 + int.from_bytes(data[offsets[-1]:offsets[-1] + 2],
                                                        "little"))
    return offsets


def tiny_lot(data: bytes) -> bytes:
    """A whole lot in a few hundred bytes: ``data``'s records up to its MIR, then its MRR."""
    offsets = stdf_offsets(data)
    kinds = [(data[o + 2], data[o + 3]) for o in offsets[:-1]]
    assert kinds[-1] == (1, 20), "the file ends with its MRR"
    return data[:offsets[kinds.index((1, 10)) + 1]] + data[offsets[-2]:]


def append(path: Path, data: bytes) -> None:
    with open(path, "ab") as f:
        f.write(data)


def n_records(data: bytes) -> int:
    decoder = StdfDecoder()
    decoder.feed(data)
    return sum(1 for _ in decoder.records())


class SizingSink(CollectingSink):
    """Records every checkpoint's size as the gateway would store it (JSON here), and
    counts the lots ended."""

    def __init__(self) -> None:
        super().__init__()
        self.sizes: list[int] = []
        self.lots_ended = 0

    async def put(self, records: Any, checkpoint: Any = None) -> None:
        self.sizes.append(len(json.dumps(checkpoint)))
        self.lots_ended += sum(isinstance(r, LotEnd) for r in records)
        await super().put(records, checkpoint)


@pytest.mark.parametrize("registry", [False, True])
@pytest.mark.parametrize("start, n", [("new_only", 10_000), ("beginning", 500)])
async def test_finished_files_leave_the_checkpoint_small_and_are_not_read_again(
        many_files_dir: Path, start: str, n: int, registry: bool) -> None:
    """``n`` finished files on disk: ignored at the very first start (``new_only``: 10,000)
    or read to their end (500).  No checkpoint lists them; a restart reads none of them,
    and reads a file still growing and a new one exactly once.  With the registry of
    finished files (a state directory) too: a checkpoint then lists at most the few
    finished files whose entries wait to be written."""
    state = many_files_dir / "state" if registry else None
    lot = tiny_lot(stdf_file_bytes(SMALL))
    files = many_files_dir / "stdf"
    files.mkdir()
    for i in range(n):
        path = files / f"lot{i:05}.stdf"
        path.write_bytes(lot)
        os.utime(path, (1_000_000 + i, 1_000_000 + i))  # oldest first, in name order
    growing = stdf_file_bytes(SMALL, start_time=1_800_000_000)
    cut = len(growing) // 2
    time.sleep(0.5)  # every file unchanged for fold_after (and 0.1 s) before the start

    first = SizingSink()
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await nursery.start(tail([files], start=start, fold_after=0.2,
                                     state_dir=state).run, first)
            if start == "beginning":
                await first.wait_until(lambda: first.lots_ended == n, within=60)
            (files / "growing.stdf").write_bytes(growing[:cut])  # the tester writes it
            await first.wait_until(lambda: any(
                isinstance(r, LotStart) and r.start_t == 1_800_000_000
                for r in first.records))
            nursery.cancel_scope.cancel()
    got = no_ts(first.records)
    read = n * len(expected(lot)) if start == "beginning" else 0
    assert got[:read] == expected(lot) * (read // len(expected(lot)))
    begun = got[read:]  # the growing file's records so far
    assert begun == expected(growing)[:len(begun)]
    assert max(first.sizes) < (4_000 if registry else 2_000), (
        "no checkpoint lists the finished files")
    saved = json.loads(json.dumps(first.checkpoint))  # what a durable store gives back
    assert list(saved["files"]) == [str(files / "growing.stdf")]

    # restart: the finished files are not read again (not a record of them parsed); the
    # growing file goes on where it was, a new one is read whole
    metrics = Metrics()
    second = SizingSink()
    new = stdf_file_bytes(SMALL, start_time=1_900_000_000)
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await nursery.start(tail([files], checkpoint=saved, metrics=metrics,
                                     start=start, fold_after=0.2, state_dir=state).run,
                                second)
            (files / "new.stdf").write_bytes(new)
            await second.wait_until(lambda: second.lots_ended == 1)
            append(files / "growing.stdf", growing[cut:])  # the tester goes on
            await second.wait_until(lambda: second.lots_ended == 2)
            nursery.cancel_scope.cancel()
    parsed = metrics.as_dict()["tail_records_total"]["source=tester1"]
    assert parsed == n_records(growing) + n_records(new), (
        "only the growing file (again to its offset, then on) and the new one are parsed")
    assert no_ts(second.records) == expected(new) + expected(growing)[len(begun):]
    assert max(second.sizes) < 2_000


async def run_tail(source: Any, sink: CollectingSink, until: Any) -> None:
    """Run ``source`` until ``until()`` holds after one of its polls."""
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            await nursery.start(source.run, sink)
            while not until():
                await trio.sleep(0.01)
            nursery.cancel_scope.cancel()


def restarted(source: Any, paths: list[Path], **config: Any) -> Any:
    """A new tail resuming at ``source``'s checkpoint as a durable store gives it back."""
    saved = json.loads(json.dumps(source.checkpoint()))
    return tail(paths, checkpoint=saved, **config)


async def test_a_finished_file_changed_after_it_left_the_list_is_listed_again(
        tmp_path: Path) -> None:
    """A finished file whose status changes while the gateway runs (chmod, touch, an append)
    changes after the watermark: it is listed again, so a restart still knows it is
    finished and does not read it."""
    lot = tiny_lot(stdf_file_bytes(SMALL))
    path = tmp_path / "a.stdf"
    path.write_bytes(lot)
    source = tail([tmp_path], fold_after=0.5)
    sink = CollectingSink()
    async with trio.open_nursery() as nursery:
        await nursery.start(source.run, sink)
        await sink.wait_until(lambda: bool(sink.of(LotEnd)))
        with trio.fail_after(10):
            while source.checkpoint()["files"]:  # folded: the watermark passed it
                await trio.sleep(0.01)
            before = source.files[str(path)].changed
            path.chmod(0o600)
            while source.files[str(path)].changed == before:  # a poll saw the change
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    assert no_ts(sink.records) == expected(lot)
    # (listed again until the watermark passes its new change time, fold_after later)
    assert str(path) in source.checkpoint()["files"] or (
        source.watermark >= source.files[str(path)].changed)

    metrics = Metrics()
    again = CollectingSink()
    second = restarted(source, [tmp_path], metrics=metrics, fold_after=0.5)
    await run_tail(second, again, lambda: str(path) in second.files)
    assert again.records == [] and not metrics.as_dict()["tail_records_total"]


@pytest.mark.parametrize("restart", [False, True])
async def test_an_unfinished_file_that_vanished_and_comes_back_unchanged_is_read_whole(
        tmp_path: Path, restart: bool) -> None:
    """Its directory moved away and back (a remount): the file's change time is the same,
    at or before the watermark by then, but it was not finished: it is read from its start,
    as a file that vanished always was -- never taken as finished (its rest lost).  After a
    restart too (the checkpoint's ``gone``)."""
    data = stdf_file_bytes(SMALL)
    cut = len(data) // 2
    watch, away = tmp_path / "watch", tmp_path / "away"
    watch.mkdir()
    (watch / "a.stdf").write_bytes(data[:cut])
    st = (watch / "a.stdf").stat()
    source = tail([watch], fold_after=0)
    sink = CollectingSink()
    async with trio.open_nursery() as nursery:
        await nursery.start(source.run, sink)
        await sink.wait_until(lambda: bool(sink.of(LotStart)))
        watch.rename(away)
        with trio.fail_after(10):
            while source.files or source.watermark < st.st_ctime_ns:
                await trio.sleep(0.01)
        assert source.checkpoint()["gone"] == [[st.st_ino, st.st_ctime_ns]]
        away.rename(watch)
        if restart:
            nursery.cancel_scope.cancel()
        else:
            await sink.wait_until(lambda: len(sink.of(LotStart)) == 2)
            append(watch / "a.stdf", data[cut:])
            await sink.wait_until(lambda: bool(sink.of(LotEnd)))
            nursery.cancel_scope.cancel()
    if restart:
        source, sink = restarted(source, [watch], fold_after=0), CollectingSink()
        async with trio.open_nursery() as nursery:
            await nursery.start(source.run, sink)
            await sink.wait_until(lambda: bool(sink.of(LotStart)))
            append(watch / "a.stdf", data[cut:])
            await sink.wait_until(lambda: bool(sink.of(LotEnd)))
            nursery.cancel_scope.cancel()
    again = no_ts(sink.records)
    again = again[max(i for i, r in enumerate(again) if isinstance(r, LotStart)):]
    assert again == expected(data), "read again from its start, to its end"
    assert "gone" not in source.checkpoint()


async def test_an_unfinished_file_missing_at_a_restart_and_back_later_is_read_whole(
        tmp_path: Path) -> None:
    """The checkpoint lists a file being written; at the restart its directory is not
    there (not mounted yet), and it comes back once the watermark has passed it: it is read
    from its start, never taken as finished."""
    data = stdf_file_bytes(SMALL)
    cut = len(data) // 2
    watch, away = tmp_path / "watch", tmp_path / "away"
    watch.mkdir()
    (watch / "a.stdf").write_bytes(data[:cut])
    changed = (watch / "a.stdf").stat().st_ctime_ns
    source, sink = tail([watch], fold_after=0), CollectingSink()
    await run_tail(source, sink, lambda: bool(sink.of(LotStart)))
    watch.rename(away)
    source, sink = restarted(source, [watch], fold_after=0), CollectingSink()
    async with trio.open_nursery() as nursery:
        await nursery.start(source.run, sink)
        with trio.fail_after(10):
            while source.files or source.watermark < changed:
                await trio.sleep(0.01)
        away.rename(watch)
        await sink.wait_until(lambda: bool(sink.of(LotStart)))  # unchanged, read again
        append(watch / "a.stdf", data[cut:])
        await sink.wait_until(lambda: bool(sink.of(LotEnd)))
        nursery.cancel_scope.cancel()
    assert no_ts(sink.records) == expected(data), "read again from its start, to its end"


async def test_a_checkpoint_of_version_1_listing_every_file_is_resumed(tmp_path: Path) -> None:
    """A gateway upgraded from a tail whose checkpoint listed every file: its finished
    files are not read again, and leave the list at the first poll past ``fold_after``."""
    lot = tiny_lot(stdf_file_bytes(SMALL))
    paths = [tmp_path / f"lot{i}.stdf" for i in range(3)]
    for path in paths:
        path.write_bytes(lot)
    v1 = {"version": 1, "files": {
        str(p): {"offset": len(lot), "done": True, "reason": "MRR",
                 "inode": p.stat().st_ino, "size": len(lot), "state": {"byte_order": "<"}}
        for p in paths}}
    metrics = Metrics()
    source = tail([tmp_path], checkpoint=v1, metrics=metrics, fold_after=0)
    sink = CollectingSink()
    await run_tail(source, sink, lambda: not source.checkpoint()["files"])
    assert sink.records == [] and not metrics.as_dict()["tail_records_total"]
    assert source.checkpoint()["version"] == 2
