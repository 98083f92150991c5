"""The disk spool with real files: durability, recovery, deletion order, cap, epoch."""

from __future__ import annotations

import os
import random
import shutil
import tracemalloc
from pathlib import Path

import cbor2
import pytest
import trio
from disktools import fill_to_the_last_byte

from edgegw.metrics import Metrics
from edgegw.spool import ACK_PERSIST_S, DiskSpool, DropEvent, SpoolConfig, recover
from edgegw.spool import list_segments as _list_segments
from edgegw.spool.format import Kind, Record, encode, scan
from edgegw.store import FrameStore


def body(seq: int, size: int = 200) -> bytes:
    return (f"frame-{seq:08d}-".encode() * (size // 15 + 1))[:size]


def cfg(path: Path, **kw: object) -> SpoolConfig:
    base = {"dir": str(path), "segment_bytes": 16 << 10, "max_bytes": 64 << 20}
    base.update(kw)
    return SpoolConfig(**base)  # type: ignore[arg-type]


async def fill(spool: DiskSpool, n: int, size: int = 200) -> list[int]:
    seqs = []
    for _ in range(n):
        seq = spool.next_seq
        seqs.append(await spool.append(body(seq, size), 3, {"src": {"offset": seq * 100}}))
    return seqs


def all_frames(spool: DiskSpool) -> list[int]:
    out: list[int] = []
    seq = 1
    while True:
        got = spool.frames_from(seq, 1000)
        if not got:
            return out
        for f in got:
            assert f.body == body(f.seq, len(f.body)), f"frame {f.seq} returned damaged"
        out.extend(f.seq for f in got)
        seq = got[-1].seq + 1


def segment_files(path: Path) -> list[Path]:
    return [p for _, p in _list_segments(path)]


async def test_disk_spool_satisfies_the_frame_store_protocol(tmp_path: Path) -> None:
    async with DiskSpool.open(cfg(tmp_path)) as spool:
        store: FrameStore = spool
        assert store.next_seq == 1 and store.first_unacked == 1
        assert await store.append(b"a", 1, {}) == 1


async def test_frames_append_in_order_and_are_durable_when_append_returns(tmp_path: Path) -> None:
    async with DiskSpool.open(cfg(tmp_path)) as spool:
        seqs = await fill(spool, 300)
        assert seqs == list(range(1, 301))
        assert spool.durable_seq == 300
        assert all_frames(spool) == seqs
        # every frame is on disk now, in committed form
        on_disk = [e.seq for p in segment_files(tmp_path) for e in scan(p.read_bytes())
                   if isinstance(e, Record) and e.kind is Kind.FRAME]
        assert on_disk == seqs


async def test_concurrent_appends_are_group_committed(tmp_path: Path) -> None:
    async with DiskSpool.open(cfg(tmp_path, commit_max_frames=64)) as spool:
        async with trio.open_nursery() as n:
            for _ in range(200):
                n.start_soon(spool.append, b"x" * 100, 1, {})
        assert spool.durable_seq == 200
        assert spool.stats()["commits"] < 50  # many frames per fsync


async def test_commit_delay_gathers_frames_into_one_fsync(tmp_path: Path) -> None:
    async with DiskSpool.open(cfg(tmp_path, commit_max_delay_ms=200)) as spool:
        t0 = trio.current_time()
        async with trio.open_nursery() as n:
            for _ in range(5):
                n.start_soon(spool.append, b"x", 1, {})
                await trio.sleep(0.01)
        assert spool.stats()["commits"] == 1
        assert trio.current_time() - t0 >= 0.15  # the first frame waited for company


async def test_restart_returns_unacked_frames_and_checkpoints_but_not_acked_ones(
        tmp_path: Path) -> None:
    async with DiskSpool.open(cfg(tmp_path)) as spool:
        await fill(spool, 500)
        spool.ack(200)
        spool.ack_set([(300, 310)])
        epoch = spool.epoch
    async with DiskSpool.open(cfg(tmp_path)) as spool:
        assert spool.epoch == epoch
        assert spool.first_unacked == 201
        assert all_frames(spool) == [*range(201, 300), *range(311, 501)]
        assert spool.checkpoints == {"src": {"offset": 500 * 100}}
        assert spool.next_seq == 501
        assert await spool.append(b"next", 1, {}) == 501


async def test_acks_are_persisted_shortly_even_without_a_clean_close(tmp_path: Path) -> None:
    with trio.CancelScope() as crash:
        async with DiskSpool.open(cfg(tmp_path)) as spool:
            await fill(spool, 100)
            spool.ack(60)
            await trio.sleep(ACK_PERSIST_S * 3)
            crash.cancel()  # leaves like a killed process: no flush
    async with DiskSpool.open(cfg(tmp_path)) as spool:
        assert all_frames(spool) == list(range(61, 101))


async def test_fully_acked_segments_are_deleted_after_the_ack_is_durable(tmp_path: Path) -> None:
    async with DiskSpool.open(cfg(tmp_path)) as spool:
        await fill(spool, 400, size=500)  # about 13 segments of 16 KiB
        before = segment_files(tmp_path)
        assert len(before) > 5
        spool.ack(400)
        await spool.flush()
        after = segment_files(tmp_path)
        assert len(after) == 1 and after[0] == before[-1]  # only the active segment is kept
        # the ACK record that allowed the deletion is in the surviving segment
        acks = [e.seq for e in scan(after[0].read_bytes())
                if isinstance(e, Record) and e.kind is Kind.ACK]
        assert acks and acks[-1] == 400


async def test_crash_between_ack_and_deletion_is_harmless(tmp_path: Path) -> None:
    """Simulate a crash after the ACK record was fsynced but before the unlinks: put the
    deleted segments back.  Recovery must delete them and not return their frames."""
    saved = tmp_path / "saved"
    saved.mkdir()
    data = tmp_path / "spool"
    async with DiskSpool.open(cfg(data)) as spool:
        await fill(spool, 300, size=500)
        for p in segment_files(data):
            shutil.copy(p, saved / p.name)
        spool.ack(250)
        await spool.flush()
    for p in saved.iterdir():
        if not (data / p.name).exists():
            shutil.copy(p, data / p.name)
    async with DiskSpool.open(cfg(data)) as spool:
        assert all_frames(spool) == list(range(251, 301))
        assert spool.stats()["segments_deleted"] > 0
        assert spool.checkpoints == {"src": {"offset": 300 * 100}}


async def test_checkpoints_survive_segment_deletion_and_restart(tmp_path: Path) -> None:
    async with DiskSpool.open(cfg(tmp_path)) as spool:
        await spool.append(b"a", 1, {"early": 1})
        await fill(spool, 200, size=500)
        spool.ack(spool.next_seq - 1)
        await spool.flush()
        assert len(segment_files(tmp_path)) == 1
    async with DiskSpool.open(cfg(tmp_path)) as spool:
        assert spool.checkpoints == {"early": 1, "src": {"offset": 201 * 100}}
        assert all_frames(spool) == []
        assert spool.first_unacked == spool.next_seq == 202


@pytest.mark.parametrize("seed", range(12))
async def test_torn_tail_at_random_offset_keeps_every_intact_frame(
        tmp_path: Path, seed: int) -> None:
    """A crash mid-write leaves the newest segment cut anywhere: recovery truncates the torn
    tail, returns every frame that is intact before the cut, and reports the cut bytes."""
    rng = random.Random(seed)
    async with DiskSpool.open(cfg(tmp_path, segment_bytes=1 << 20)) as spool:
        await fill(spool, 120, size=300)
    (last,) = segment_files(tmp_path)
    data = last.read_bytes()
    cut = rng.randrange(1, len(data))
    intact = [e.seq for e in scan(data[:cut]) if isinstance(e, Record) and e.kind is Kind.FRAME]
    os.truncate(last, cut)
    async with DiskSpool.open(cfg(tmp_path)) as spool:
        got = all_frames(spool)  # asserts every returned body is intact
        assert got == intact == list(range(1, len(intact) + 1))
        st = spool.stats()
        if cut < len(data) and scan(data[:cut])[-1:] and not isinstance(
                scan(data[:cut])[-1], Record):
            assert st["torn_bytes"] > 0  # reported, never silent
        assert st["lost_frames"] == 0  # a torn tail is not damage to durable data
        assert spool.checkpoints == ({"src": {"offset": intact[-1] * 100}} if intact else {})
        assert last.stat().st_size <= cut  # the torn bytes are gone
        new = await spool.append(b"after", 1, {})
        assert new == spool.next_seq - 1 and new not in got


async def test_damage_inside_a_sealed_segment_is_counted_as_lost(tmp_path: Path) -> None:
    """Cutting a segment that is not the newest destroys durable frames: counted as lost."""
    async with DiskSpool.open(cfg(tmp_path)) as spool:
        await fill(spool, 120, size=300)
    files = segment_files(tmp_path)
    victim = files[1]
    frames_in = [e.seq for e in scan(victim.read_bytes())
                 if isinstance(e, Record) and e.kind is Kind.FRAME]
    os.truncate(victim, victim.stat().st_size - 100)
    async with DiskSpool.open(cfg(tmp_path)) as spool:
        got = all_frames(spool)
        assert frames_in[-1] not in got
        assert spool.stats()["lost_frames"] == 120 - len(got) > 0
        assert spool.next_seq == 121


@pytest.mark.parametrize("seed", range(12))
async def test_random_flipped_byte_loses_only_the_damaged_frame_and_counts_it(
        tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    async with DiskSpool.open(cfg(tmp_path)) as spool:
        await fill(spool, 150, size=300)
    files = segment_files(tmp_path)
    victim = files[rng.randrange(len(files) - 1)]  # any segment holding frames
    data = bytearray(victim.read_bytes())
    pos = rng.randrange(len(data))
    data[pos] ^= 1 << rng.randrange(8)
    victim.write_bytes(bytes(data))
    events = scan(bytes(data))
    damaged_frames = {e.seq for e in scan(victim.read_bytes()) if not isinstance(e, Record)}
    async with DiskSpool.open(cfg(tmp_path)) as spool:
        got = all_frames(spool)  # asserts every returned body is intact
        missing = sorted(set(range(1, 151)) - set(got))
        st = spool.stats()
        assert len(missing) <= 1
        if missing:
            # the damaged frame is counted as lost, never silently skipped
            assert st["lost_frames"] == 1 and spool.lost_ranges == [(missing[0], missing[0])]
        if any(not isinstance(e, Record) for e in events):
            assert st["damaged_regions"] + st["torn_bytes"] > 0
        assert spool.next_seq == 151 or missing == [150]
        assert damaged_frames is not None


async def test_lost_frames_are_skipped_by_first_unacked_and_frames_from(tmp_path: Path) -> None:
    async with DiskSpool.open(cfg(tmp_path, segment_bytes=1 << 20)) as spool:
        await fill(spool, 10, size=300)
    (seg,) = [p for p in segment_files(tmp_path) if p.stat().st_size > 1000]
    data = bytearray(seg.read_bytes())
    third = next(e for e in scan(bytes(data)) if isinstance(e, Record) and e.seq == 1
                 and e.kind is Kind.FRAME)
    data[third.offset + third.size - 5] ^= 0xFF  # damage frame 1's body
    seg.write_bytes(bytes(data))
    async with DiskSpool.open(cfg(tmp_path)) as spool:
        assert spool.lost_ranges == [(1, 1)]
        assert spool.first_unacked == 2
        assert all_frames(spool) == list(range(2, 11))


async def test_cap_with_block_policy_waits_for_acks(tmp_path: Path) -> None:
    conf = cfg(tmp_path, segment_bytes=8 << 10, max_bytes=32 << 10, policy="block")
    async with DiskSpool.open(conf) as spool:
        await fill(spool, 40, size=500)
        with trio.move_on_after(0.5) as waited:
            await fill(spool, 40, size=500)
        assert waited.cancelled_caught  # intake stopped at the cap
        blocked_at = spool.next_seq
        assert spool.total_bytes <= conf.max_bytes
        spool.ack(blocked_at - 1)
        with trio.fail_after(5):
            await fill(spool, 10, size=500)  # room again once acked segments are deleted
        assert spool.stats()["dropped_frames"] == 0


async def test_cap_with_drop_oldest_drops_counts_and_reports(tmp_path: Path) -> None:
    conf = cfg(tmp_path, segment_bytes=8 << 10, max_bytes=32 << 10, policy="drop_oldest")
    events: list[DropEvent] = []
    metrics = Metrics()
    async with DiskSpool.open(conf, metrics=metrics, on_drop=events.append) as spool:
        with trio.fail_after(10):
            await fill(spool, 300, size=500)  # ~ 150 KB into a 32 KB cap: never blocks
        st = spool.stats()
        assert st["dropped_frames"] > 0
        assert st["dropped_frames"] == sum(e.frames for e in events)
        assert st["dropped_records"] == 3 * st["dropped_frames"]
        assert metrics.counter("spool_dropped_frames_total").total() == st["dropped_frames"]
        got = all_frames(spool)
        # what is left is the newest frames, gap-free; dropped + kept = appended
        assert got == list(range(301 - len(got), 301))
        assert len(got) + st["dropped_frames"] == 300
        assert spool.first_unacked == got[0]
        assert spool.total_bytes <= conf.max_bytes
    async with DiskSpool.open(conf) as spool:
        assert all_frames(spool) == got  # dropped frames stay dropped after a restart


async def test_the_frames_drop_oldest_dropped_unacknowledged_are_named_across_restarts(
        tmp_path: Path) -> None:
    """``dropped_ranges`` (told to the hub, which can then tell the frames this gateway
    dropped from frames it acknowledged and lost: docs/protocol.md section 4) names every
    frame dropped before it was acknowledged, not the ones acknowledged out of order
    before their segment went, and is kept with the acks across restarts."""
    conf = cfg(tmp_path, segment_bytes=8 << 10, max_bytes=32 << 10, policy="drop_oldest")
    async with DiskSpool.open(conf) as spool:
        await fill(spool, 20, size=500)
        spool.ack_set([(5, 7)])  # acknowledged out of order (the live lane)
        with trio.fail_after(10):
            await fill(spool, 280, size=500)
        kept = all_frames(spool)
        dropped = spool.dropped_ranges
        named = {s for lo, hi in dropped for s in range(lo, hi + 1)}
        assert named == set(range(1, kept[0])) - {5, 6, 7}
        assert len(named) == spool.stats()["dropped_frames"]
    async with DiskSpool.open(conf) as spool:
        assert spool.dropped_ranges == dropped
        spool.ack(spool.durable_seq)  # all acknowledged: nothing more to drop
        await fill(spool, 200, size=500)  # past the cap again: later runs join
        later = spool.dropped_ranges
        assert later[: len(dropped)] == dropped and len(later) > len(dropped)
        assert later[-1][0] > kept[-1]
        await spool.flush()
    async with DiskSpool.open(conf) as spool:  # the STATE record of a newer segment too
        assert spool.dropped_ranges == later


def append_to(path: Path, data: bytes) -> None:
    with open(path, "ab") as f:
        f.write(data)


async def test_dropped_ranges_that_do_not_read_are_left_out_never_a_failed_start(
        tmp_path: Path) -> None:
    """An ACK record's dropped ranges are only told to the hub: what does not read as
    ranges of seqs (a range past 2^63 - 1 would make every HELLO malformed) is left
    out; the spool starts with the rest."""
    conf = cfg(tmp_path)
    async with DiskSpool.open(conf) as spool:
        await fill(spool, 5)
    for junk, kept in ((7, []), ([[0, 5], [3, 2**70], "x", [[1]], [9, 8], [True, 2], [2, 4]],
                                 [(2, 4)])):
        append_to(segment_files(tmp_path)[-1],
                  encode(Kind.ACK, 0, cbor2.dumps({"r": [], "d": 0, "u": junk})))
        async with DiskSpool.open(conf) as spool:
            assert spool.dropped_ranges == kept
            assert all_frames(spool) == [1, 2, 3, 4, 5]


async def test_first_seq_since_names_the_frames_of_the_last_seconds(tmp_path: Path) -> None:
    async with DiskSpool.open(cfg(tmp_path)) as spool:
        await fill(spool, 10)
        await trio.sleep(0.3)
        await fill(spool, 5)
        assert spool.first_seq_since(0.2) == 11
        assert spool.first_seq_since(10) == 1
        assert spool.first_seq_since(0) == spool.next_seq == 16


async def test_health_reports_a_stall_only_while_there_is_work(tmp_path: Path) -> None:
    async with DiskSpool.open(cfg(tmp_path, stall_timeout_s=0.2)) as spool:
        assert spool.healthy() and spool.stalled_for() == 0
        await fill(spool, 5)
        await trio.sleep(0.3)
        assert not spool.healthy()
        spool.ack(5)
        assert spool.healthy() and spool.stalled_for() == 0


async def test_epoch_is_stable_across_restarts_and_new_when_started_afresh(
        tmp_path: Path) -> None:
    async with DiskSpool.open(cfg(tmp_path)) as spool:
        first = spool.epoch
        await fill(spool, 5)
    async with DiskSpool.open(cfg(tmp_path)) as spool:
        assert spool.epoch == first
    (tmp_path / "epoch").unlink()  # the STATE records still name it
    async with DiskSpool.open(cfg(tmp_path)) as spool:
        assert spool.epoch == first and all_frames(spool) == [1, 2, 3, 4, 5]
    shutil.rmtree(tmp_path)
    async with DiskSpool.open(cfg(tmp_path)) as spool:
        assert spool.epoch != first
        assert spool.next_seq == 1


async def test_unrecoverable_spool_is_moved_aside_counted_and_restarted(tmp_path: Path) -> None:
    async with DiskSpool.open(cfg(tmp_path)) as spool:
        first = spool.epoch
        await fill(spool, 5)
    (tmp_path / "epoch").unlink()
    for p in segment_files(tmp_path):
        p.write_bytes(b"\x00" * p.stat().st_size)  # every STATE record unreadable
    async with DiskSpool.open(cfg(tmp_path)) as spool:
        assert spool.epoch != first
        assert spool.stats()["unrecoverable_files"] > 0
        assert any(p.name.startswith("unrecoverable-") for p in os.scandir(tmp_path))


def test_recovery_memory_is_bounded_by_segments_not_backlog(tmp_path: Path) -> None:
    async def make() -> None:
        async with DiskSpool.open(cfg(tmp_path, segment_bytes=4 << 20,
                                      max_bytes=1 << 30, commit_max_frames=512)) as spool:
            async with trio.open_nursery() as n:
                for _ in range(8):
                    n.start_soon(fill_bulk, spool)

    async def fill_bulk(spool: DiskSpool) -> None:
        for _ in range(1000):
            await spool.append(os.urandom(8 << 10), 50, {"src": 1})

    trio.run(make)
    backlog = sum(p.stat().st_size for p in segment_files(tmp_path))
    assert backlog > 60 << 20
    tracemalloc.start()
    rec = recover(tmp_path)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert rec.next_seq == 8001
    assert peak < 6 << 20, f"recovery of {backlog >> 20} MiB peaked at {peak >> 10} KiB"


@pytest.mark.parametrize("policy", ["block", "drop_oldest"])
async def test_disk_full_is_handled_like_the_cap_never_a_crash(tiny_fs: Path,
                                                              policy: str) -> None:
    conf = cfg(tiny_fs, segment_bytes=64 << 10, max_bytes=64 << 20, policy=policy)
    async with DiskSpool.open(conf) as spool:

        def filled() -> bool:  # the disk filled up and the policy acted (however slow)
            st = spool.stats()
            return st["disk_full_events"] > 0 and (policy == "block" or st["dropped_frames"] > 0)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(fill, spool, 5000, 8000)  # ~ 40 MB into 2 MiB
            with trio.move_on_after(60):
                await trio.sleep(3)
                while not filled():
                    await trio.sleep(0.05)
            nursery.cancel_scope.cancel()
        st = spool.stats()
        assert st["disk_full_events"] > 0
        if policy == "block":
            assert st["dropped_frames"] == 0 and not spool.healthy()
            stuck = spool.next_seq
            spool.ack(spool.durable_seq)  # the hub catches up: segments freed
            with trio.fail_after(10):
                await fill(spool, 50, size=8000)
            assert spool.next_seq == stuck + 50 or spool.next_seq > stuck
        else:
            assert st["dropped_frames"] > 0
        await spool.flush()
        last = spool.durable_seq
    # and it restarts cleanly -- also when the fill left the file system full to the last
    # byte, with no room for the segment a restart opens (it then starts disk-full): make
    # sure it did, whatever the timing of the fill
    fill_to_the_last_byte(tiny_fs)
    async with DiskSpool.open(conf) as spool:
        got = all_frames(spool)
        assert got and got[-1] == last


@pytest.mark.parametrize("room", ["space_freed", "acked"])
@pytest.mark.parametrize("policy", ["block", "drop_oldest"])
async def test_a_spool_restarted_on_a_full_disk_starts_keeps_its_frames_and_goes_on(
        tiny_fs: Path, policy: str, room: str) -> None:
    """A restart on a full disk (no room for the new segment recovery opens) must not
    crash: the spool starts in its disk-full state, every spooled frame stays readable,
    the policy applies to new appends as in operation, and once there is room again (the
    operator frees space, or acks delete segments) it opens its new segment and goes on."""
    directory = tiny_fs / "spool"
    conf = cfg(directory, segment_bytes=64 << 10, max_bytes=64 << 20, policy=policy)
    async with DiskSpool.open(conf) as spool:
        await fill(spool, 60, size=8000)  # ~ 480 KB: 8 segments
        epoch, last = spool.epoch, spool.durable_seq
    before = segment_files(directory)
    filler = fill_to_the_last_byte(tiny_fs)

    spool = DiskSpool(conf)
    async with trio.open_nursery() as nursery:
        with trio.fail_after(30):
            await nursery.start(spool.run)  # it starts (the old code raised ENOSPC here)
        assert segment_files(directory) == before  # no half-made segment left behind
        assert spool.epoch == epoch
        assert all_frames(spool) == list(range(1, last + 1))
        st = spool.stats()
        assert st["disk_full"] and st["disk_full_events"] >= 1 and st["dropped_frames"] == 0
        assert not spool.healthy() and spool.problem() == "spool: disk full"
        assert spool.m_disk_full.get() >= 1

        if policy == "block":
            with trio.move_on_after(2) as waited:  # appends wait for room, nothing dropped
                await fill(spool, 1, size=8000)
            assert waited.cancelled_caught and spool.durable_seq == last
            assert all_frames(spool) == list(range(1, last + 1))
        else:
            with trio.fail_after(30):  # room is made by dropping the oldest segment
                await fill(spool, 1, size=8000)
            assert spool.stats()["dropped_frames"] > 0
        kept = all_frames(spool)

        if room == "space_freed":
            filler.unlink()
        else:
            spool.ack(last)  # the hub catches up: acknowledged segments are deleted
            kept = [s for s in kept if s > last]
        with trio.fail_after(30):
            new = await fill(spool, 20, size=8000)
        assert all_frames(spool) == kept + new
        assert not spool.stats()["disk_full"] and spool.healthy()
        # the new segment was opened once there was room (as a failed rollover is retried)
        assert segment_files(directory)[-1].name > before[-1].name
        await spool.flush()
        nursery.cancel_scope.cancel()

    async with DiskSpool.open(conf) as spool:  # and it restarts cleanly
        assert spool.epoch == epoch
        assert all_frames(spool) == kept + new


def half_made_segment(directory: Path) -> Path:
    """What a crash while the spool made its next segment leaves: the file, empty."""
    index = int(segment_files(directory)[-1].name[4:-6])
    half_made = directory / f"seg-{index + 1:010d}.spool"
    half_made.touch()
    return half_made


async def test_a_half_made_last_segment_found_on_a_full_disk_is_removed(tiny_fs: Path) -> None:
    """A crash while a segment was being made leaves it empty (its STATE record torn off);
    on a full disk the spool cannot start a new one after it, and appends must not go to a
    segment without its STATE (I3): the empty one goes, the one before stays active."""
    directory = tiny_fs / "spool"
    conf = cfg(directory, segment_bytes=64 << 10, max_bytes=64 << 20)
    async with DiskSpool.open(conf) as spool:
        await fill(spool, 20, size=8000)
        last = spool.durable_seq
    before = segment_files(directory)
    half_made_segment(directory)
    filler = fill_to_the_last_byte(tiny_fs)
    spool = DiskSpool(conf)
    async with trio.open_nursery() as nursery:
        with trio.fail_after(30):
            await nursery.start(spool.run)
        assert segment_files(directory) == before and spool.stats()["disk_full"]
        assert all_frames(spool) == list(range(1, last + 1))
        filler.unlink()
        with trio.fail_after(30):
            new = await fill(spool, 3, size=8000)
        await spool.flush()
        nursery.cancel_scope.cancel()
    async with DiskSpool.open(conf) as spool:
        assert all_frames(spool) == [*range(1, last + 1), *new]
        assert spool.checkpoints == {"src": {"offset": new[-1] * 100}}


@pytest.mark.parametrize("policy", ["block", "drop_oldest"])
async def test_a_fresh_spool_on_a_full_disk_starts_and_opens_its_segment_once_there_is_room(
        tiny_fs: Path, policy: str) -> None:
    filler = fill_to_the_last_byte(tiny_fs)
    directory = tiny_fs / "spool"
    conf = cfg(directory, segment_bytes=64 << 10, max_bytes=64 << 20, policy=policy)
    spool = DiskSpool(conf)
    async with trio.open_nursery() as nursery:
        with trio.fail_after(30):
            await nursery.start(spool.run)
        assert segment_files(directory) == [] and not (directory / "epoch.tmp").exists()
        assert spool.stats()["disk_full"] and not spool.healthy()
        epoch = spool.epoch
        done = trio.Event()

        async def append() -> None:
            await fill(spool, 5, size=8000)
            done.set()

        nursery.start_soon(append)
        with trio.move_on_after(1.5):
            await done.wait()
        assert not done.is_set() and spool.durable_seq == 0  # no room: it waits
        filler.unlink()
        with trio.fail_after(30):
            await done.wait()
        assert all_frames(spool) == [1, 2, 3, 4, 5] and spool.healthy()
        await spool.flush()
        nursery.cancel_scope.cancel()
    async with DiskSpool.open(conf) as spool:  # the epoch was kept in the segment
        assert spool.epoch == epoch and all_frames(spool) == [1, 2, 3, 4, 5]


@pytest.mark.parametrize("seed", range(5))
async def test_random_operations_against_a_model(tmp_path: Path, seed: int) -> None:
    """Random appends, cumulative and selective acks, clean restarts and crashes: the spool
    never loses an unacknowledged frame, never returns one acknowledged before a clean
    close, and its checkpoints are always those of the last durable frame."""
    rng = random.Random(seed)
    conf = cfg(tmp_path, segment_bytes=8 << 10)
    unacked: set[int] = set()
    acked_persisted: set[int] = set()
    last_cp = None
    next_seq = 1
    for _round in range(6):
        crash = rng.random() < 0.5
        with trio.CancelScope() as scope:
            async with DiskSpool.open(conf) as spool:
                got = set(all_frames(spool))
                assert unacked <= got  # nothing unacknowledged is lost
                assert not (got & acked_persisted)  # acked before a clean close: gone
                assert spool.checkpoints == ({"src": {"offset": last_cp}} if last_cp else {})
                assert spool.next_seq == next_seq
                for _ in range(rng.randrange(1, 60)):
                    op = rng.random()
                    if op < 0.7:
                        seq = spool.next_seq
                        await spool.append(body(seq, rng.randrange(10, 900)), 1,
                                           {"src": {"offset": seq}})
                        unacked.add(seq)
                        last_cp = seq
                        next_seq = seq + 1
                    elif op < 0.85 and unacked:
                        upto = rng.choice(sorted(unacked))
                        spool.ack(upto)
                        done = {s for s in unacked if s <= upto}
                    elif unacked:
                        lo = rng.choice(sorted(unacked))
                        hi = lo + rng.randrange(0, 4)
                        spool.ack_set([(lo, hi)])
                        done = {s for s in unacked if lo <= s <= hi}
                    else:
                        continue
                    if op >= 0.7:
                        unacked -= done
                        if not crash:
                            acked_persisted |= done
                if crash:
                    # leave like a killed process: acks of this round may not be persisted
                    # yet and may come back (the hub drops such resends)
                    scope.cancel()
