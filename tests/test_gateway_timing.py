"""The gateway's own clocks, in virtual time: the batch deadline and the backoff before a
failed source is started again.  The frame store is the memory one; the hub is not there
(the uplink keeps probing a closed port, which is not what these tests look at)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from hubtools import gateway_config
from ports import free_port

from edgegw.gateway import Gateway
from edgegw.records import SensorReading
from edgegw.store import MemoryFrameStore


def reading(i: int) -> SensorReading:
    return SensorReading("s", float(i), "c", 1.0)


async def test_a_part_batch_is_stored_when_its_oldest_record_is_max_delay_old(
        tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    cfg = gateway_config(tmp_path, free_port(),
                         batch={"max_records": 1000, "max_delay_ms": 250})
    gw = Gateway(cfg, store=MemoryFrameStore(100))
    async with trio.open_nursery() as nursery:
        await nursery.start(gw.run)
        first = trio.current_time()
        await gw.sink.put([reading(0)], source="s")
        await trio.sleep(0.2)
        await gw.sink.put([reading(1)], source="s")  # a newer record does not move it
        await gw.store.wait_for_frame_after(0)
        assert trio.current_time() - first == pytest.approx(0.25)
        assert [f.n_records for f in gw.store.frames_from(1, 10)] == [2]
        await gw.sink.put([reading(2)], source="s")
        again = trio.current_time()
        await gw.store.wait_for_frame_after(1)
        assert trio.current_time() - again == pytest.approx(0.25)
        nursery.cancel_scope.cancel()


async def test_a_batch_begun_as_a_full_one_was_cut_goes_out_at_its_own_deadline(
        tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    """The flusher waits for the pending batch's deadline and is not woken by puts that
    only make a later one: the batch begun by the rest of a put that filled a frame still
    goes out max_delay after its own first record."""
    cfg = gateway_config(tmp_path, free_port(), batch={"max_records": 3, "max_delay_ms": 250})
    gw = Gateway(cfg, store=MemoryFrameStore(100))
    async with trio.open_nursery() as nursery:
        await nursery.start(gw.run)
        await gw.sink.put([reading(0)], source="s")  # due in 0.25 s: the flusher waits
        await trio.sleep(0.1)
        await gw.sink.put([reading(i) for i in (1, 2, 3)], source="s")  # 0-2 full, 3 begins
        begun = trio.current_time()
        assert [f.n_records for f in gw.store.frames_from(1, 10)] == [3]
        with trio.fail_after(10):  # virtual seconds: a batch left waiting fails here
            await gw.store.wait_for_frame_after(1)
        assert trio.current_time() - begun == pytest.approx(0.25)
        assert [f.n_records for f in gw.store.frames_from(1, 10)] == [3, 1]
        nursery.cancel_scope.cancel()


class FailingSource:
    """Fails a moment after every start; remembers when it was started."""

    replays = False

    def __init__(self) -> None:
        self.starts: list[float] = []

    async def run(self, sink: Any, *, task_status: trio.TaskStatus[None]) -> None:
        self.starts.append(trio.current_time())
        task_status.started()
        await trio.sleep(0.001)
        raise OSError("the tester's share went away")


async def test_a_failing_source_is_restarted_after_an_exponential_backoff_with_jitter(
        tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    source = FailingSource()
    gw = Gateway(gateway_config(tmp_path, free_port()), store=MemoryFrameStore(1000),
                 extra_sources=[("flaky", source)])
    async with trio.open_nursery() as nursery:
        await nursery.start(gw.run)
        while len(source.starts) < 9:
            await trio.sleep(1)
        nursery.cancel_scope.cancel()
    initial, maximum = Gateway.source_backoff_s
    gaps = [b - a for a, b in zip(source.starts, source.starts[1:], strict=False)]
    for attempt, gap in enumerate(gaps):  # full jitter: anywhere up to the growing cap
        assert 0 < gap <= min(maximum, initial * 2 ** attempt) + 0.01, (attempt, gaps)
    assert max(gaps) > initial  # the cap grew
    assert gw.metrics.counter("gateway_source_restarts_total").get(source="flaky") >= 8


async def test_a_put_cancelled_before_it_begins_adds_nothing(tmp_path: Path) -> None:
    """A put is a cancel point before it takes anything: cancelled, its records are not
    in any frame (a put that stores no batch has no task switch of its own)."""
    cfg = gateway_config(tmp_path, free_port(), batch={"max_records": 1000,
                                                       "max_delay_ms": 60_000})
    gw = Gateway(cfg, store=MemoryFrameStore(100))
    async with trio.open_nursery() as nursery:
        await nursery.start(gw.run)
        with trio.CancelScope() as scope:
            scope.cancel()
            await gw.sink.put([reading(0)], source="s")
        assert scope.cancelled_caught
        await gw.sink.put([reading(1)], source="s")
        await gw.flush()
        frames = gw.store.frames_from(1, 10)
        assert [f.n_records for f in frames] == [1]
        nursery.cancel_scope.cancel()


async def test_a_source_that_only_puts_still_lets_the_other_tasks_run(
        tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    """A source may put as fast as it can, awaiting nothing else, without a batch filling:
    the other tasks (the uplink, the flusher) still get turns, every few puts -- under a
    virtual clock too, which stands still while the source runs."""
    cfg = gateway_config(tmp_path, free_port(), batch={"max_records": 10_000,
                                                       "max_delay_ms": 60_000})
    gw = Gateway(cfg, store=MemoryFrameStore(100))
    turns = 0

    async def other() -> None:
        nonlocal turns
        while True:
            turns += 1
            await trio.lowlevel.checkpoint()

    async with trio.open_nursery() as nursery:
        await nursery.start(gw.run)
        nursery.start_soon(other)
        await trio.lowlevel.checkpoint()
        before = turns
        for i in range(200):  # 200 records: no batch is full, none is due
            await gw.sink.put([reading(i)], source="s")
        assert turns - before >= 200 // 20
        nursery.cancel_scope.cancel()
