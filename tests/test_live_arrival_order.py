"""The live state does not depend on the order frames arrive in (issue 14's flake 1).

A gateway does not always deliver its frames in sequence order: after an outage -- its
hub node killed before acknowledging anything, a first connection that came up late,
PostgreSQL away for seconds -- it sends the frames of the last 2 s first (the live lane)
and the older ones after them (the backlog lane, ``edgegw/gateway/scheduler.py``,
docs/spool.md).  Whoever applies them -- a single hub or a cluster partition's owner
rebuilding from its log -- must end with the state an uninterrupted hub has, which applied
them in order.  Before, a lot's ``wafers`` list (and a test's per-wafer rows) followed the
order wafers were first *seen*: a lot whose first wafer came in the backlog listed
``[W02, W03, W01]`` (seen once in ``test_sigkill_three_nodes_during_a_run`` and
``test_postgresql_restarted_mid_run``).  Now both are in the order the wafers started
(``started``, then wafer id), as docs/live-topics.md says.
"""

from __future__ import annotations

import itertools
from typing import Any

from edgegw.gateway import SendScheduler
from edgegw.hub import checkpoint as ckpt
from edgegw.hub.history import wafers as api_wafers
from edgegw.hub.live import LiveState
from edgegw.records import WaferStart
from edgegw.sim import SimulatedConfig, simulated_batches
from tests.cluster_reference import comparable, lot_topics

SOURCE = {"seed": 7, "sites": 4, "wafers": 3, "tests_per_part": 4, "lots": 1,
          "wafer_diameter_dies": 6, "lot_id": "L7"}


def frames_of_the_tester() -> list[tuple[int, list[Any]]]:
    """The simulated tester's batches as the gateway's frames (seq = index + 1):
    ``(first_rid, records)``, on a steady clock."""
    ticks = itertools.count()
    frames, rid = [], 1
    for batch, _ in simulated_batches(SimulatedConfig(**SOURCE), "tester",
                                      clock=lambda: 1.7e9 + next(ticks) * 0.01):
        frames.append((rid, batch))
        rid += len(batch)
    return frames


def send_order(n_frames: int, live_from: int, window: int = 64) -> list[int]:
    """The order the gateway's uplink sends frames 1..n on a new connection when none was
    acknowledged yet and frames from ``live_from`` on are live (made in the last 2 s):
    the real ``SendScheduler``, the hub acknowledging each round."""
    sched = SendScheduler(window)
    sched.start(first_unacked=1, live_from=live_from)
    order: list[int] = []
    while len(order) < n_frames:
        for want in sched.wants():
            stop = min(want.start + want.limit, want.below or n_frames + 1, n_frames + 1)
            seqs = list(range(want.start, stop))
            if seqs:
                sched.sent(want.lane, seqs)
                order.extend(seqs)
                break
            if want.lane == "backlog":
                sched.backlog_exhausted()
        else:
            sched.acked(0, [(s, s) for s in sorted(sched.in_flight)])
    return order


def applied(frames: list[tuple[int, list[Any]]], order: list[int]) -> LiveState:
    state = LiveState(lambda topic, delta: None)
    for seq in order:
        first_rid, records = frames[seq - 1]
        state.on_records("ate-07", first_rid, records, now=1.7e9)
    return state


def live_from_second_wafer(frames: list[tuple[int, list[Any]]]) -> int:
    """The seq of the frame that starts W02: everything before it (the lot's start and
    its whole first wafer) goes in the backlog, after W02's and W03's frames."""
    return next(i + 1 for i, (_, records) in enumerate(frames)
                if any(isinstance(r, WaferStart) and r.wafer_id.endswith("W02")
                       for r in records))


def test_the_scheduler_does_send_the_first_wafer_after_the_later_ones() -> None:
    frames = frames_of_the_tester()
    order = send_order(len(frames), live_from_second_wafer(frames))
    assert sorted(order) == list(range(1, len(frames) + 1))
    assert order[0] == live_from_second_wafer(frames) and order[-1] < order[0]


def test_a_lot_whose_first_wafer_arrives_last_equals_the_in_order_state() -> None:
    frames = frames_of_the_tester()
    in_order = applied(frames, list(range(1, len(frames) + 1)))
    reordered = applied(frames, send_order(len(frames), live_from_second_wafer(frames)))
    lot = in_order.snapshot("lot/L7")
    assert lot is not None and lot["wafers"] == ["L7-W01", "L7-W02", "L7-W03"]
    assert reordered.snapshot("lot/L7")["wafers"] == lot["wafers"]
    want = comparable(lot_topics(in_order), set())
    got = comparable(lot_topics(reordered), set())
    assert set(got) == set(want)
    for topic in want:
        assert got[topic] == want[topic], topic
    # a test's per-wafer rows: oldest wafer first in both
    some_test = next(t for t in want if t.startswith("test/"))
    assert [row[0] for row in reordered.snapshot(some_test)["wafers"]] == [
        "L7-W01", "L7-W02", "L7-W03"]
    # the history API lists the live wafers in the same order
    assert api_wafers(reordered, "L7", None)[1] == api_wafers(in_order, "L7", None)[1]


def test_a_wafer_start_arriving_after_its_parts_moves_the_wafer_into_place() -> None:
    """The backlog may hold a wafer's start record while its later parts came first:
    until the start arrives the wafer sorts as not started (first), then it moves."""
    frames = frames_of_the_tester()
    w01_start = next(i for i, (_, records) in enumerate(frames)
                     if any(isinstance(r, WaferStart) for r in records))
    order = [s for s in range(1, len(frames) + 1) if s != w01_start + 1] + [w01_start + 1]
    reordered = applied(frames, order)
    in_order = applied(frames, list(range(1, len(frames) + 1)))
    assert reordered.snapshot("lot/L7")["wafers"] == ["L7-W01", "L7-W02", "L7-W03"]
    assert comparable(lot_topics(reordered), set()) == comparable(lot_topics(in_order), set())


def test_the_order_survives_a_checkpoint() -> None:
    """A partition's new owner restores the last checkpoint and applies the rest of the
    log: the same lists as the owner before it (and as one uninterrupted hub)."""
    frames = frames_of_the_tester()
    order = send_order(len(frames), live_from_second_wafer(frames))
    half = len(order) // 2
    before = applied(frames, order[:half])
    restored = LiveState(lambda topic, delta: None)
    ckpt.restore(restored, ckpt.decode(ckpt.encode({}, ckpt.capture(before)))[1])
    for seq in order[half:]:
        first_rid, records = frames[seq - 1]
        restored.on_records("ate-07", first_rid, records, now=1.7e9)
    in_order = applied(frames, list(range(1, len(frames) + 1)))
    assert comparable(lot_topics(restored), set()) == comparable(lot_topics(in_order), set())
