"""The FrameStore seam: both stores carry everything the gateway and the uplink use."""

from __future__ import annotations

import inspect
import time
from pathlib import Path

import trio

from edgegw.protocol import MAX_DROPPED_RANGES
from edgegw.spool import DiskSpool, SpoolConfig
from edgegw.store import FrameStore, MemoryFrameStore


def protocol_members() -> set[str]:
    own = set(vars(FrameStore)) | set(FrameStore.__annotations__)
    return {name for name in own if not name.startswith("_")}


def test_the_protocol_names_what_the_uplink_and_the_gateway_use() -> None:
    assert {"read_frames", "first_seq_since", "lost_ranges", "dropped_ranges", "problem",
            "damage", "run",
            "flush", "append", "ack", "ack_set", "frames_from",
            "max_body_bytes"} <= protocol_members()


def test_both_stores_implement_every_member_of_the_protocol() -> None:
    for cls in (MemoryFrameStore, DiskSpool):
        for name in protocol_members() - {"epoch"}:  # epoch: an attribute set in __init__
            member = getattr(cls, name, None)
            assert member is not None, f"{cls.__name__} lacks {name}"
            wanted = inspect.iscoroutinefunction(getattr(FrameStore, name, None))
            assert inspect.iscoroutinefunction(member) == wanted, f"{cls.__name__}.{name}"


async def test_the_memory_store_counts_every_frame_as_backlog_and_runs_nothing() -> None:
    store = MemoryFrameStore(4)
    for i in range(3):
        await store.append(b"x%d" % i, 1, {})
    assert store.first_seq_since(3600) == store.next_seq == 4
    assert [f.seq for f in await store.read_frames(2, 10)] == [2, 3]
    assert store.lost_ranges == [] and store.problem() is None and store.damage() is None
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            await nursery.start(store.run)  # returns: no background work
        await store.flush()


async def test_the_memory_store_names_the_frames_it_dropped_unacknowledged_in_64_runs(
        ) -> None:
    """Each drop_oldest drop is a frame never acknowledged (acknowledged ones are gone
    from the queue); a hundred runs of them, told to the hub in a HELLO or a LOST, keep
    the newest runs apart and merge the oldest (a message holds 64)."""
    store = MemoryFrameStore(2, "drop_oldest")
    for _ in range(100):  # two frames held, a third drops the first; then all acked
        for i in range(3):
            await store.append(b"x%d" % i, 1, {})
        store.ack(store.next_seq - 1)
    runs = store.dropped_ranges
    assert len(runs) == MAX_DROPPED_RANGES
    assert runs[0] == (1, 3 * 36 + 1) and runs[1:] == [(3 * i + 1, 3 * i + 1)
                                                       for i in range(37, 100)]


async def test_a_spool_its_owner_runs_already_is_not_run_twice(tmp_path: Path) -> None:
    async with DiskSpool.open(SpoolConfig(dir=str(tmp_path))) as spool:
        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                await nursery.start(spool.run)  # returns at once
        seq = await spool.append(b"body", 1, {})
        assert [f.seq for f in await spool.read_frames(seq, 1)] == [seq]
        assert spool.problem() is None and spool.damage() is None


async def test_the_memory_store_reports_a_stall_only_while_frames_wait() -> None:
    """The disk spool's rule: the stall clock starts when frames appear in an empty store
    and again at each ack; nothing waiting is never a stall, however long since an ack."""
    store = MemoryFrameStore(8, stall_timeout_s=0.05)
    assert store.stalled_for(time.monotonic() + 3600) == 0 and store.problem() is None
    before = time.monotonic()
    await store.append(b"a", 1, {})
    assert store.stalled_for(before) == 0  # the clock started at the append, not earlier
    with trio.fail_after(10):
        while store.problem() is None:
            await trio.sleep(0.01)
    assert "1 frame(s) waiting" in (store.problem() or "")
    now = time.monotonic()
    store.ack(1)
    assert store.stalled_for(now + 3600) == 0 and store.problem() is None
    # an hour idle after the last ack: a new frame starts a fresh stall clock
    await store.append(b"b", 1, {})
    assert store.stalled_for(now) == 0
