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


def test_a_split_put_counts_the_records_stored_before_its_checkpoint() -> None:
    # The bug behind duplicate records after a crash: the first part of a split put is
    # durable before the checkpoint that covers it.  Each batch says how many of a tracked
    # source's records lie after its last checkpoint, so a restart can skip them.
    b = Batcher(max_records=4, max_delay=1.0)
    b.track("tail")
    b.add(recs(2), now=0, source="tail", checkpoint={"offset": 200})
    out = b.add(recs(7, 2), now=0, source="tail", checkpoint={"offset": 900})
    assert [len(x.records) for x in out] == [4, 4]
    # 2 records of the first put (covered by offset 200) + 2 of the second (not covered)
    assert out[0].checkpoints == {"tail": {"offset": 200}} and out[0].after == {"tail": 2}
    assert out[1].checkpoints == {} and out[1].after == {"tail": 6}
    last = b.flush()
    assert last is not None and last.checkpoints == {"tail": {"offset": 900}}
    assert last.after == {}  # the second put's checkpoint now covers everything stored


def test_counts_run_on_across_several_full_batches_of_one_put() -> None:
    b = Batcher(max_records=3, max_delay=1.0)
    b.track("sim")
    out = b.add(recs(10), now=0, source="sim", checkpoint=1)
    assert [x.after for x in out] == [{"sim": 3}, {"sim": 6}, {"sim": 9}]
    assert [x.checkpoints for x in out] == [{}, {}, {}]
    last = b.flush()
    assert last is not None and last.checkpoints == {"sim": 1} and last.after == {}


def test_untracked_sources_are_not_counted() -> None:
    b = Batcher(max_records=2, max_delay=1.0)
    out = b.add(recs(3), now=0, source="mqtt", checkpoint={"digests": []})
    assert out[0].after == {}


def test_a_restored_count_rides_along_until_the_source_catches_up() -> None:
    b = Batcher(max_records=2, max_delay=1.0)
    b.track("tail", after=5)  # 5 records after the restored checkpoint are in frames
    (event_batch,) = b.add(recs(2), now=0, source="gateway")
    assert event_batch.after == {"tail": 5}
    # the replaying source has caught up with 3 of the 5 at a new checkpoint
    (cp_batch,) = b.add([], now=0, source="tail", checkpoint={"offset": 50}, stored_after=2)
    assert cp_batch.checkpoints == {"tail": {"offset": 50}} and cp_batch.after == {"tail": 2}


def test_spans_say_where_the_counted_records_follow() -> None:
    # the origin of a put: (stream, the position its records follow)
    b = Batcher(max_records=4, max_delay=1.0)
    b.track("tail")
    b.add(recs(2), now=0, source="tail", checkpoint={"a": 100}, origin=("a", 0))
    out = b.add(recs(7, 2), now=0, source="tail", checkpoint={"a": 900}, origin=("a", 100))
    assert [x.spans for x in out] == [{"tail": [(("a", 100), 2)]}, {"tail": [(("a", 100), 6)]}]
    assert out[1].after == {"tail": 6}
    last = b.flush()
    assert last is not None and last.spans == {}


def test_one_span_per_stream_from_where_its_first_counted_put_began() -> None:
    b = Batcher(max_records=10, max_delay=1.0)
    b.track("tail")
    b.add(recs(3), now=0, source="tail", origin=("a", 0))  # puts without a checkpoint
    b.add(recs(2), now=0, source="tail", origin=("b", 0))
    b.add(recs(4), now=0, source="tail", origin=("a", 300))
    batch = b.flush()
    assert batch is not None and batch.spans == {"tail": [(("a", 0), 7), (("b", 0), 2)]}


def test_a_span_owed_from_before_a_restart_rides_along_until_its_stream_is_met() -> None:
    b = Batcher(max_records=2, max_delay=1.0)
    owed = [(("b", 100), 5)]  # 5 records following b@100 are in frames
    b.track("tail", owed)
    # another file's records and checkpoint: the span is still owed
    (batch,) = b.add(recs(2), now=0, source="tail", checkpoint={"c": 10}, origin=("c", 0),
                     owed=owed)
    assert batch.spans == {"tail": [(("b", 100), 5)]}
    # b's replay: the gateway dropped its first 5 records and passes 3 more, owing nothing
    # once the checkpoint is in; until then the span grows by what is stored past it
    out = b.add(recs(3), now=0, source="tail", checkpoint={"b": 300}, origin=("b", 100),
                owed=[])
    assert out[0].checkpoints == {} and out[0].spans == {"tail": [(("b", 100), 7)]}
    last = b.flush()
    assert last is not None and last.checkpoints == {"tail": {"b": 300}} and last.spans == {}


def test_a_count_without_origin_is_one_span_of_unknown_origin() -> None:
    b = Batcher(max_records=2, max_delay=1.0)
    b.track("sim", after=4)
    (batch,) = b.add(recs(2), now=0, source="gateway")
    assert batch.spans == {"sim": [(None, 4)]} and batch.after == {"sim": 4}


def test_a_batch_marks_where_each_tracked_checkpoint_falls_and_what_it_left_owed() -> None:
    # a batch the gateway must store as several frames gives each frame the checkpoints of
    # the puts that end in it: the batcher says where they fell (after how many records)
    b = Batcher(max_records=10, max_delay=1.0)
    b.track("tail", [(("b", 100), 5)])
    b.track("sim")
    b.add(recs(2), now=0, source="tail", checkpoint={"a": 1}, origin=("a", 0),
          owed=[(("b", 100), 5)])
    b.add(recs(3), now=0, source="sim", checkpoint=7)
    b.add([], now=0, source="tail", checkpoint={"a": 2}, owed=[])  # the span met, say
    b.add(recs(1), now=0, source="other", checkpoint="x")  # untracked: not marked
    batch = b.flush()
    assert batch is not None
    assert batch.marks == [(2, "tail", {"a": 1}, [(("b", 100), 5)]), (5, "sim", 7, []),
                           (5, "tail", {"a": 2}, [])]
    assert batch.checkpoints == {"tail": {"a": 2}, "sim": 7, "other": "x"}
    b.add(recs(1), now=0, source="sim")
    later = b.flush()
    assert later is not None and later.marks == [], "each batch its own"


# -- a limit lowered (or raised) while records are held: the hub's max_records -------------

def test_a_lowered_limit_cuts_new_batches_to_it() -> None:
    b = Batcher(max_records=8, max_delay=1.0)
    assert b.set_max_records(3) is None  # nothing held: nothing to cut
    out = b.add(recs(7), now=0.0)
    assert [len(x.records) for x in out] == [3, 3]
    assert b.pending == 1


def test_lowering_the_limit_under_what_is_held_cuts_what_is_held_whole() -> None:
    """The records held were within the old limit; they go out as one batch (its
    checkpoints with them), and every later batch is within the new limit: no batch is
    ever built from a negative room."""
    b = Batcher(max_records=10, max_delay=1.0)
    b.add(recs(6), now=0.0, source="tail", checkpoint=6)
    held = b.set_max_records(4)
    assert held is not None and len(held.records) == 6 and held.checkpoints == {"tail": 6}
    assert b.pending == 0 and b.deadline is None
    out = b.add(recs(9, 6), now=0.5)
    assert [len(x.records) for x in out] == [4, 4]
    assert [r.value for x in out for r in x.records] == [float(i) for i in range(6, 14)]
    assert b.pending == 1


def test_lowering_the_limit_to_what_is_held_cuts_it_and_below_it_keeps_it() -> None:
    b = Batcher(max_records=10, max_delay=1.0)
    b.add(recs(4), now=0.0)
    assert b.set_max_records(5) is None and b.pending == 4
    held = b.set_max_records(4)
    assert held is not None and len(held.records) == 4


def test_records_held_over_a_limit_set_directly_go_out_before_new_ones() -> None:
    b = Batcher(max_records=10, max_delay=1.0)
    b.add(recs(6), now=0.0)
    b.max_records = 4  # not through set_max_records: the next add cuts what is held
    out = b.add(recs(5, 6), now=0.1)
    assert [len(x.records) for x in out] == [6, 4]
    assert [r.value for x in out for r in x.records] == [float(i) for i in range(10)]
    assert b.pending == 1


def test_a_raised_limit_lets_batches_grow_again() -> None:
    b = Batcher(max_records=3, max_delay=1.0)
    b.add(recs(2), now=0.0)
    assert b.set_max_records(6) is None
    assert b.add(recs(3, 2), now=0.1) == []
    out = b.add(recs(1, 5), now=0.2)
    assert [len(x.records) for x in out] == [6]


def test_a_whole_add_stays_in_one_batch_with_its_checkpoint_over_the_limit() -> None:
    """``whole`` (a source's ``put_whole``): the records that do not fit beside what is
    pending go in a batch of their own, with their checkpoint, even over the limit."""
    b = Batcher(max_records=4, max_delay=1.0)
    b.add(recs(2), now=0.0)
    out = b.add(recs(6, 2), now=0.1, source="mqtt", checkpoint="c6", whole=True)
    assert [len(x.records) for x in out] == [2, 6]
    assert out[0].checkpoints == {} and out[1].checkpoints == {"mqtt": "c6"}
    assert b.pending == 0
    # a whole add that fits beside what is pending waits with it, as any add
    b.add(recs(1), now=0.2)
    assert b.add(recs(2), now=0.2, source="mqtt", checkpoint="c8", whole=True) == []
    assert b.pending == 3


def test_the_limit_must_stay_positive() -> None:
    import pytest

    with pytest.raises(ValueError):
        Batcher(max_records=4, max_delay=1.0).set_max_records(0)
