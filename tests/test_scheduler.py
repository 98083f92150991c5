"""The live-first send scheduler, sans-IO: which frames go next after an outage."""

from __future__ import annotations

import pytest

from edgegw.gateway import SendScheduler, Want


def test_after_an_outage_live_frames_are_offered_before_the_backlog() -> None:
    s = SendScheduler(window=64)
    s.start(first_unacked=1, live_from=100_001)  # a 100k-frame backlog
    wants = s.wants()
    assert wants[0] == Want("live", 100_001, 64)
    assert wants[1] == Want("backlog", 1, 64 - 16, below=100_001)


def test_the_backlog_never_takes_the_slots_reserved_for_live_frames() -> None:
    s = SendScheduler(window=64, live_reserve=16)
    s.start(1, 10_000)
    s.sent("backlog", range(1, 49))  # a full backlog window on the wire
    assert [w.lane for w in s.wants()] == ["live"]
    assert s.wants()[0].limit == 16
    s.sent("live", [10_000])
    assert s.wants()[0] == Want("live", 10_001, 15)


def test_acks_free_room_and_move_the_backlog_cursor() -> None:
    s = SendScheduler(window=8, live_reserve=2)
    s.start(1, 1000)
    s.sent("backlog", range(1, 7))
    s.sent("live", [1000, 1001])
    assert s.wants() == []
    s.acked(4, [(1000, 1000)])
    assert s.room == 5
    assert s.wants() == [Want("live", 1002, 5), Want("backlog", 7, 3, below=1000)]


def test_backlog_drains_in_windows_not_one_frame_per_interval() -> None:
    """With acks arriving per round trip, the backlog moves a whole window per round trip
    even while live frames keep arriving: 48 backlog frames for every live one here."""
    s = SendScheduler(window=64)
    s.start(1, 10_001)
    rounds = 0
    live_seq = 10_001
    while s.backlog_pending:
        rounds += 1
        for w in s.wants():
            if w.lane == "live":
                s.sent("live", [live_seq])  # one new live frame per round trip
                live_seq += 1
            else:
                n = min(w.limit, w.below - w.start)
                s.sent("backlog", range(w.start, w.start + n))
        s.acked(max(s.backlog_next - 1, 0), [(10_001, live_seq - 1)])
    assert s.sent_backlog == 10_000
    assert rounds <= 10_000 // 47 + 2
    assert s.sent_backlog >= 5 * s.sent_live * 9


def test_exhausted_backlog_leaves_only_the_live_lane() -> None:
    s = SendScheduler(window=4, live_reserve=1)
    s.start(5, 9)
    s.backlog_exhausted()
    assert not s.backlog_pending
    assert [w.lane for w in s.wants()] == ["live"]


def test_a_window_too_small_to_reserve_live_room_is_refused() -> None:
    with pytest.raises(ValueError):
        SendScheduler(window=1)


def test_a_fragmented_applied_set_at_the_hub_sends_the_backlog_first() -> None:
    """Each outage during a drain leaves one more live range at the hub; before its holes
    limit is near, new live ranges stop until the backlog has filled the gaps."""
    s = SendScheduler(window=8, live_reserve=2, max_holes=4)
    s.start(10, 500, applied=[(1, 9), (100, 120), (200, 220), (300, 320)])
    assert [w.lane for w in s.wants()] == ["backlog"]
    assert s.wants()[0].limit == 8  # the whole window, nothing reserved
    s.backlog_exhausted()
    assert [w.lane for w in s.wants()] == ["live"]
    s.start(10, 500, applied=[(1, 9), (100, 120)])
    assert [w.lane for w in s.wants()] == ["live", "backlog"]


def test_for_a_hub_that_takes_no_gap_every_frame_goes_in_sequence_order() -> None:
    """A hub with ``max_holes = 0`` (it closed the link for a gap): on each connection the
    backlog goes first, with the whole window, and the live lane only after it, even with
    nothing applied above the backlog."""
    s = SendScheduler(window=8, live_reserve=2, in_order=True)
    s.start(2, 5, applied=[(1, 1)])
    assert s.wants() == [Want("backlog", 2, 8, below=5)]
    s.sent("backlog", [2, 3, 4])
    assert [w.lane for w in s.wants()] == ["live"]
    assert s.wants()[0].start == 5
    s.start(6, 9)  # the next connection: held again
    assert [w.lane for w in s.wants()] == ["backlog"]


def test_a_frame_sent_ahead_and_acknowledged_before_its_lane_reaches_it_is_still_passed() -> None:
    """The lane reads frames in batches and sends them one by one; a part sent ahead whose
    ack comes while the lane sends the frames before it, in the same batch, must still be
    passed, not sent a second time on the connection (a hub closes with 4004 for that).
    It is forgotten once its lane's cursor is past it."""
    s = SendScheduler(window=8, live_reserve=2)
    s.start(1, 1)
    s.sent("live", [1, 2])
    s.sent_ahead([5])  # frame 2's part, stored after 3 and 4
    batch = [3, 4, 5]  # the lane's next read, before the ack
    s.acked(2, [(5, 5)])
    sent = []
    for seq in batch:
        if seq in s.ahead:
            s.passed("live", [seq])
        else:
            s.sent("live", [seq])
            sent.append(seq)
    assert sent == [3, 4]
    assert s.ahead == set() and s.in_flight == {3, 4}


def test_a_frame_sent_ahead_is_in_flight_and_its_lane_passes_it_without_a_second_slot() -> None:
    """The parts of a frame split for the hub go right after it, ahead of their lane
    (docs/protocol.md section 5): they take window room until acknowledged, and the lane
    that reaches them moves on without putting them in flight again; a frame held back
    (passed) takes no room at all."""
    s = SendScheduler(window=8, live_reserve=2)
    s.start(1, 100)
    s.sent("backlog", [1])
    s.sent_ahead([100, 101])  # frame 1's parts, stored at the end
    assert s.room == 5 and s.ahead == {100, 101}
    s.passed("live", [100, 101])
    assert s.room == 5
    assert s.wants()[0] == Want("live", 102, 5)
    s.passed("backlog", [2])  # held back until the frame it was cut from goes
    assert s.room == 5 and s.backlog_next == 3
    s.acked(1, [(100, 101)])
    assert s.room == 8 and s.ahead == set()
