"""The source positions a gateway tells its hub (docs/protocol.md section 4.1), sans-IO:
what of the checkpoints is told, where the sources were as of each frame, and when
positions may be told -- only when every record they pass is in frames up to theirs."""

from __future__ import annotations

from typing import Any

from edgegw.gateway import AFTER_KEY, RID_KEY, PositionLog, Teller, positions_of, taken_back
from edgegw.hub import PositionsKeeper
from edgegw.protocol import MAX_POSITIONS_BYTES, IntervalSet, Positions


def test_the_sources_positions_are_told_not_the_epochs_bookkeeping() -> None:
    checkpoints = {"tail": {"files": {}}, "mqtt": 3, AFTER_KEY: {"tail": 2}, RID_KEY: 900,
                   "__split__": {"4": [1, 2, 3, []]}, "__reissue__": [1, 2, 3]}
    assert positions_of(checkpoints) == {"tail": {"files": {}}, "mqtt": 3,
                                         AFTER_KEY: {"tail": 2}}


def test_positions_handed_back_are_taken_without_bookkeeping_or_a_foreign_after() -> None:
    assert taken_back(None) == {} and taken_back({}) == {}
    assert taken_back({"tail": 1, RID_KEY: 5, AFTER_KEY: {"tail": 1}}) == {
        "tail": 1, AFTER_KEY: {"tail": 1}}
    assert taken_back({"tail": 1, AFTER_KEY: [1, 2]}) == {"tail": 1}


def test_the_log_gives_the_positions_as_of_each_frame() -> None:
    log = PositionLog({"tail": "a0", RID_KEY: 10}, keep=3)
    log.note(1, {RID_KEY: 20, AFTER_KEY: {}})  # another source's frame: tail unchanged
    log.note(2, {"tail": "a1", RID_KEY: 30, AFTER_KEY: {"tail": 4}})
    log.note(3, {"mqtt": 7, RID_KEY: 40, AFTER_KEY: {}})
    assert log.at(1) == {"tail": "a0", AFTER_KEY: {}}
    assert log.at(2) == {"tail": "a1", AFTER_KEY: {"tail": 4}}
    assert log.at(3) == {"tail": "a1", "mqtt": 7, AFTER_KEY: {}}  # the latest after wins
    log.note(4, {AFTER_KEY: {}})
    assert log.at(1) is None and log.at(4) is not None  # only the newest three are kept


def teller(*had: tuple[int, int]) -> Teller:
    return Teller(IntervalSet(had))


def may(t: Teller, seq: int, positions: Any, first_unacked: int = 1,
        parts: list[tuple[int, list[int]]] | None = None) -> bool:
    t.sent(seq)
    return t.may_tell(seq, positions, first_unacked=first_unacked, parts=parts or [])


def test_positions_are_told_once_every_frame_below_is_acknowledged_or_sent() -> None:
    t = teller()
    assert not may(t, 5, {"tail": 5})  # frames 1-4 neither acknowledged nor sent yet
    assert may(t, 5, {"tail": 5}, first_unacked=5)  # 1-4 acknowledged meanwhile
    t = teller((1, 3))  # WELCOME's applied set
    t.sent(4)
    assert may(t, 5, {"tail": 5})


def test_no_positions_while_a_split_frame_has_parts_above_them() -> None:
    """A stored frame split for the hub: its checkpoints pass records its parts carry,
    stored under later seqs.  Positions as of a frame between the two would pass records
    the hub may never get (a state lost before the parts arrive): not told."""
    t = teller((1, 9))
    assert not may(t, 10, {"tail": 10}, parts=[(8, [12, 13])])
    t.sent(11)
    t.sent(12)
    assert may(t, 13, {"tail": 13}, parts=[(8, [12, 13])])
    assert may(t, 14, {"tail": 14}, parts=[(15, [16])])  # a later frame's split


def test_positions_unchanged_are_not_told_again() -> None:
    t = teller((1, 9))
    assert may(t, 10, {"tail": 10})
    assert not may(t, 11, {"tail": 10})  # (a frame of another source's records)
    assert may(t, 12, {"tail": 12})


def test_positions_too_large_for_the_hub_are_not_told() -> None:
    t = teller((1, 9))
    assert not may(t, 10, {"tail": "x" * MAX_POSITIONS_BYTES})
    assert may(t, 11, {"tail": "x"})


def test_the_hub_writes_the_newest_positions_told_at_most_every_interval() -> None:
    """A gateway tells its positions several times a second; the hub writes the newest
    told, the first at once, then at most once per interval (and the last when the
    connection ends: whatever ``pending`` still holds)."""
    keeper = PositionsKeeper(1.0)
    assert keeper.pending is None and not keeper.due(0.0)
    keeper.told(Positions(1, {"tail": 1}))
    assert keeper.due(0.0)
    assert keeper.take(0.0) == Positions(1, {"tail": 1})
    keeper.told(Positions(2, {"tail": 2}))
    keeper.told(Positions(3, {"tail": 3}))
    assert not keeper.due(0.5) and keeper.due_at == 1.0
    assert keeper.take(1.0) == Positions(3, {"tail": 3})  # one write for both
    assert keeper.take(1.5) is None and not keeper.due(5.0)
