"""The batcher flushes at N records or T seconds, whichever comes first."""

from edgegw.batcher import Batcher
from edgegw.records import SensorReading


def recs(n: int, start: int = 0) -> list[SensorReading]:
    return [SensorReading("s", float(i), "c", float(i)) for i in range(start, start + n)]


def test_a_full_batch_goes_out_at_once() -> None:
    b = Batcher(max_records=3, max_delay=1.0)
    assert b.add(recs(2), now=0.0) == []
    out = b.add(recs(1, 2), now=0.1)
    assert len(out) == 1 and [r.value for r in out[0].records] == [0.0, 1.0, 2.0]
    assert b.pending == 0 and b.deadline is None


def test_a_big_add_is_cut_into_several_batches_in_order() -> None:
    b = Batcher(max_records=4, max_delay=1.0)
    out = b.add(recs(10), now=0.0)
    assert [len(x.records) for x in out] == [4, 4]
    assert b.pending == 2
    assert [r.value for x in out for r in x.records] == [float(i) for i in range(8)]


def test_pending_records_go_out_when_the_oldest_is_max_delay_old() -> None:
    b = Batcher(max_records=100, max_delay=0.5)
    b.add(recs(1), now=10.0)
    b.add(recs(1, 1), now=10.4)
    assert b.deadline == 10.5
    assert b.poll(10.49) is None
    batch = b.poll(10.5)
    assert batch is not None and len(batch.records) == 2
    assert b.poll(20.0) is None


def test_flush_returns_whatever_is_pending() -> None:
    b = Batcher(max_records=100, max_delay=5)
    assert b.flush() is None
    b.add(recs(3), now=0)
    batch = b.flush()
    assert batch is not None and len(batch.records) == 3


def test_a_checkpoint_travels_with_the_batch_holding_its_last_record() -> None:
    b = Batcher(max_records=4, max_delay=1.0)
    out = b.add(recs(6), now=0, source="tail", checkpoint={"offset": 600})
    # the first batch holds only part of the call: its checkpoint must not be there yet
    assert out[0].checkpoints == {}
    last = b.flush()
    assert last is not None and last.checkpoints == {"tail": {"offset": 600}}


def test_a_checkpoint_without_records_still_reaches_a_batch() -> None:
    b = Batcher(max_records=4, max_delay=1.0)
    out = b.add([], now=0, source="tail", checkpoint={"offset": 9})
    assert len(out) == 1 and out[0].records == [] and out[0].checkpoints == {"tail": {"offset": 9}}
