"""A segment file the spool cannot delete or cut never stops it (docs/spool.md, "Files it
cannot delete").  The files are made immutable on a real tmpfs (``chattr +i``): unlink,
write and truncate fail with EPERM from the kernel, as they do on Windows for a file a
virus scanner or a backup tool holds open."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import trio
from disktools import fill_to_the_last_byte, immutable, release, small_filesystem
from test_spool import body, cfg, half_made_segment, segment_files
from test_spool import fill as fill_spool

from edgegw.metrics import Metrics
from edgegw.spool import DiskSpool
from edgegw.spool.format import Kind, Record, scan


@pytest.fixture
def fs(tmp_path: Path) -> Iterator[Path]:
    with small_filesystem(tmp_path / "fs", "64m") as mnt:
        yield mnt


async def fill(spool: DiskSpool, n: int) -> list[int]:
    return await fill_spool(spool, n, size=2000)  # 2 KB frames: several 16 KiB segments


def unacked(spool: DiskSpool) -> list[int]:
    """The seqs the spool would send, each checked whole."""
    out: list[int] = []
    seq = spool.first_unacked
    while got := spool.frames_from(seq, 1000):
        assert all(f.body == body(f.seq, len(f.body)) for f in got)
        out.extend(f.seq for f in got)
        seq = got[-1].seq + 1
    return out


def seqs_in(path: Path) -> list[int]:
    """The seqs of the frames in the segment file ``path``."""
    return [e.seq for e in scan(path.read_bytes())
            if isinstance(e, Record) and e.kind is Kind.FRAME]


async def wait_until(predicate: Callable[[], bool]) -> None:
    """The spool retries a failed delete every few seconds."""
    with trio.fail_after(30):
        while not predicate():
            await trio.sleep(0.05)


async def test_an_acknowledged_segment_that_cannot_be_deleted_never_stops_the_spool(
        fs: Path) -> None:
    """The ACK that makes a segment deletable is durable whether or not the delete works:
    appends and acks go on, the failure is counted once (not once per commit), nothing is
    lost or sent twice, and the file is deleted by a later retry once it can be."""
    directory = fs / "spool"
    metrics = Metrics()
    async with DiskSpool.open(cfg(directory), metrics=metrics) as spool:
        await fill(spool, 40)  # 2 KB frames, 16 KiB segments: several segments
        first = segment_files(directory)[0]
        in_first = seqs_in(first)
        with immutable(first):
            spool.ack(in_first[-1] + 2)  # the first segment, and two frames more
            await spool.flush()  # a commit whose delete fails: the old code raised here
            assert first.exists() and spool.first_unacked == in_first[-1] + 3
            more = await fill(spool, 40)  # the spool goes on
            for seq in range(in_first[-1] + 3, more[-1] + 1, 7):
                spool.ack(seq)
                await spool.flush()
            st = spool.stats()
            assert metrics.counter("spool_segment_delete_errors_total").total() == 1
            assert st["undeleted_segments"] == 1 and st["undeleted_bytes"] > 0
            assert first not in segment_files(directory)[1:]  # later segments do go
            assert unacked(spool) == list(range(spool.first_unacked, more[-1] + 1))
            assert spool.healthy()
        # the flag is cleared: the next retry deletes the file (counted once its worker
        # thread returns: the file is gone a moment before, so that is what is awaited)
        await wait_until(lambda: spool.stats()["undeleted_segments"] == 0)
        assert not first.exists()
        assert metrics.counter("spool_segment_delete_errors_total").total() == 1
        acked = spool.first_unacked - 1
    async with DiskSpool.open(cfg(directory)) as spool:  # nothing acknowledged comes back
        assert spool.first_unacked == acked + 1
        assert unacked(spool) == list(range(acked + 1, more[-1] + 1))


async def test_a_restart_with_an_acknowledged_segment_still_present_resends_nothing_of_it(
        fs: Path) -> None:
    directory = fs / "spool"
    async with DiskSpool.open(cfg(directory)) as spool:
        await fill(spool, 40)
        first = segment_files(directory)[0]
        in_first = seqs_in(first)
        last = spool.durable_seq
    with immutable(first):
        async with DiskSpool.open(cfg(directory)) as spool:
            spool.ack(in_first[-1])
            await spool.flush()
        assert first.exists()
        metrics = Metrics()
        async with DiskSpool.open(cfg(directory), metrics=metrics) as spool:
            # recovery deletes acknowledged segments: this one fails, and the spool starts
            assert first.exists()
            assert metrics.counter("spool_segment_delete_errors_total").total() == 1
            assert unacked(spool) == list(range(in_first[-1] + 1, last + 1))
            new = await fill(spool, 5)
            release(first)
            await wait_until(lambda: not first.exists())
            assert unacked(spool) == [*range(in_first[-1] + 1, last + 1), *new]


async def test_an_empty_segment_a_crash_left_is_never_appended_to_when_it_cannot_be_removed(
        fs: Path) -> None:
    """A crash while a segment was being made leaves it empty (no STATE record, I3).  On a
    full disk the spool cannot open a new segment after it and removes it; when even that
    fails, appends go to the segment before it, the next new segment takes the name after
    it, and it is deleted once it can be."""
    directory = fs / "spool"
    conf = cfg(directory, segment_bytes=64 << 10)
    async with DiskSpool.open(conf) as spool:
        await fill(spool, 20)
        last = spool.durable_seq
    half_made = half_made_segment(directory)
    filler = fill_to_the_last_byte(fs)
    metrics = Metrics()
    with immutable(half_made):
        spool = DiskSpool(conf, metrics=metrics)
        async with trio.open_nursery() as nursery:
            with trio.fail_after(30):
                await nursery.start(spool.run)  # the old code appended to it, then raised
            assert spool.stats()["disk_full"]
            assert unacked(spool) == list(range(1, last + 1))
            filler.unlink()
            with trio.fail_after(30):
                new = await fill(spool, 40)  # past a rollover: a new segment
            assert half_made.stat().st_size == 0  # never written to
            assert half_made in segment_files(directory)
            assert segment_files(directory)[-1].name > half_made.name
            assert metrics.counter("spool_segment_delete_errors_total").total() == 1
            release(half_made)
            await wait_until(lambda: not half_made.exists())
            await spool.flush()
            nursery.cancel_scope.cancel()
    async with DiskSpool.open(conf) as spool:
        assert unacked(spool) == [*range(1, last + 1), *new]
        assert spool.stats()["damaged_regions"] == 0


async def test_a_torn_tail_that_cannot_be_cut_is_never_appended_to(fs: Path) -> None:
    """A crash mid-write leaves a torn tail in the last segment; recovery cuts it.  When the
    file refuses the cut, it is read up to its valid end and new frames go to a new
    segment: the torn bytes never sit between two frames."""
    directory = fs / "spool"
    async with DiskSpool.open(cfg(directory)) as spool:
        await fill(spool, 20)
        last = spool.durable_seq
    torn = segment_files(directory)[-1]
    torn.write_bytes(torn.read_bytes() + b"\x00torn-by-a-crash" * 5)
    size = torn.stat().st_size
    with immutable(torn):
        async with DiskSpool.open(cfg(directory)) as spool:  # the old code raised EPERM
            assert unacked(spool) == list(range(1, last + 1))
            new = await fill(spool, 5)
            assert torn.stat().st_size == size
            assert segment_files(directory)[-1] != torn
            assert unacked(spool) == [*range(1, last + 1), *new]
    async with DiskSpool.open(cfg(directory)) as spool:
        assert unacked(spool) == [*range(1, last + 1), *new]


async def test_a_full_disk_does_not_drop_segment_after_segment_it_cannot_delete(
        fs: Path) -> None:
    """``drop_oldest`` on a full disk drops the oldest segment to make room.  When its file
    cannot be deleted the drop freed nothing: the spool then waits for room (as under
    ``block``, retrying the delete) instead of dropping the next segment, and the next --
    every unacknowledged frame lost for not a byte of room.  Once the file can go, room
    returns and appends go on; only the first segment's frames were dropped."""
    directory = fs / "spool"
    metrics = Metrics()
    conf = cfg(directory, policy="drop_oldest")
    async with DiskSpool.open(conf, metrics=metrics) as spool:
        written = await fill(spool, 60)  # 2 KB frames: 8 segments, none acknowledged
        sealed = segment_files(directory)[:-1]
        assert len(sealed) >= 5
        in_first = seqs_in(sealed[0])
        filler = fill_to_the_last_byte(fs)
        try:
            with immutable(*sealed):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(fill, spool, 20)
                    await wait_until(lambda: spool.stats()["dropped_frames"] > 0)
                    await trio.sleep(3)  # appends go on failing: nothing more is dropped
                    assert spool.stats()["dropped_frames"] == len(in_first)
                    assert spool.stats()["disk_full_events"] > 1
                    assert unacked(spool)[0] == in_first[-1] + 1
                    nursery.cancel_scope.cancel()
            # the file can go now: the retried delete makes the room the drop was for
            with trio.fail_after(30):
                await fill(spool, 4)
        finally:
            filler.unlink()
        await fill(spool, 10)
        assert spool.stats()["dropped_frames"] == len(in_first)
        assert written[0] == in_first[0]
        assert unacked(spool) == list(range(in_first[-1] + 1, spool.next_seq))
