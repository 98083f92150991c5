"""The hub's de-duplication never loses a record without a word (docs/protocol.md section 3).

Whatever a gateway sends -- frames in any order, sent again, records sent again under new
seqs, seqs reused for other records -- each record (a record id, the same record each
time) is applied at most once unless counted as applied twice, and a record that is
never applied was in a frame counted as reusing a seq.  Checked on the real store (SQLite
in a temporary directory) over hypothesis-generated frame streams."""

from __future__ import annotations

import collections
import sqlite3
import tempfile
from pathlib import Path

import pytest
import trio
from hypothesis import example, given, settings
from hypothesis import strategies as st

from edgegw.hub.store import FrameToApply, HubStore
from edgegw.protocol import encode_body
from edgegw.records import PartResult, Record

GW, EPOCH = "ate-01", "epoch-1"

#: (seq, first record id, record count): a few seqs and ids, so that they meet often
frames_sent = st.lists(st.tuples(st.integers(1, 10), st.integers(1, 40), st.integers(1, 8)),
                       max_size=40)


def records(first_rid: int, n: int) -> list[Record]:
    """The records with ids ``first_rid..``: the same ids, the same records."""
    return [PartResult("tester", 1.0 + r, "L1", "", 1, r % 4, f"p{r}", None, None, 1, 1, True)
            for r in range(first_rid, first_rid + n)]


def stored_rids(db_path: Path) -> collections.Counter[int]:
    """How many times each record id is in a stored frame (as stored: cut ones cut)."""
    with sqlite3.connect(db_path) as db:
        rows = db.execute("SELECT first_rid, n_records FROM frames").fetchall()
    return collections.Counter(r for lo, n in rows for r in range(lo, lo + n))


@settings(max_examples=150, deadline=None, derandomize=True)
@given(frames_sent)
@example([(1, 1, 5), (2, 1, 5), (1, 6, 3), (3, 4, 6), (2, 20, 2)])
async def test_every_record_sent_is_applied_once_or_its_loss_and_repeats_are_counted(
        sent: list[tuple[int, int, int]]) -> None:
    with tempfile.TemporaryDirectory() as tmp:  # one per example: no tmp_path in @given
        db_path = Path(tmp) / "hub.sqlite3"
        store = HubStore(db_path)
        await store.open()
        reused: set[int] = set()  # record ids of the frames counted as reusing a seq
        reused_count = twice = 0
        applied_model: set[int] = set()  # record ids applied so far (by the test's count)
        try:
            for seq, first_rid, n in sent:
                f = FrameToApply(GW, EPOCH, seq, first_rid, n,
                                 encode_body(first_rid, records(first_rid, n)),
                                 records=records(first_rid, n))
                ids = set(range(first_rid, first_rid + n))
                skipped = await store.commit([f])
                if (GW, EPOCH, seq) in skipped:
                    # a duplicate seq (or every record applied already): what it drops
                    # that was never applied is exactly what it counts
                    assert f.seq_reused == len(ids - applied_model) if not f.all_seen \
                        else f.seq_reused == 0
                    if f.seq_reused:
                        reused |= ids - applied_model
                        reused_count += f.seq_reused
                else:
                    assert f.seq_reused == 0
                    if not f.cut:
                        twice += f.records_seen
                    applied_model |= set(range(f.first_rid, f.first_rid + f.n_records))
        finally:
            await store.close()
        stored = stored_rids(db_path)
        all_sent = {r for _, lo, n in sent for r in range(lo, lo + n)}
        assert set(stored) == applied_model
        # nothing lost silently: a record never applied was counted in a reused seq
        assert all_sent - set(stored) <= reused
        assert reused_count >= len(all_sent - set(stored))
        # nothing twice silently: every repeat is counted as applied twice
        assert sum(c - 1 for c in stored.values()) == twice


async def test_the_counters_move_once_a_commit_stands_and_not_while_it_is_written(
        tmp_path: Path) -> None:
    """``/api/stats`` reads the store's counters while a commit is being written: they say
    what the disk has -- not the records being written (a failing disk's commits are tried
    again and again: a read then saw counts come and go) -- and a duplicate counted
    meanwhile stays counted once the commit stands."""
    seen: list[tuple[int, int]] = []

    class Watched(HubStore):
        """The real store; its next write fails (SQLite's disk I/O error) if ``fail``."""
        fail = False

        def _apply_sync(self, *args: object) -> list[int]:
            # a reader's view, in the Trio thread, while the write runs in this one
            st = trio.from_thread.run_sync(self.gateway_stats, GW)
            seen.append((st.records_applied, st.frames_applied))
            trio.from_thread.run_sync(self.count_duplicate, GW)
            if self.fail:
                raise sqlite3.OperationalError("disk I/O error")
            return super()._apply_sync(*args)  # type: ignore[arg-type]

    store = Watched(tmp_path / "hub.sqlite3")
    await store.open()
    try:
        await store.claim(GW, EPOCH)
        frame = FrameToApply(GW, EPOCH, 1, 1, 5, encode_body(1, records(1, 5)))
        assert await store.commit([frame]) == set()
        assert seen == [(0, 0)]
        st = store.gateway_stats(GW)
        assert (st.records_applied, st.frames_applied, st.duplicates_dropped) == (5, 1, 1)
        store.fail = True
        with pytest.raises(sqlite3.OperationalError):
            await store.commit([FrameToApply(GW, EPOCH, 2, 6, 3, encode_body(6, records(6, 3)))])
        assert seen[-1] == (5, 1)
        st = store.gateway_stats(GW)
        assert (st.records_applied, st.frames_applied, st.duplicates_dropped) == (5, 1, 2)
    finally:
        await store.close()
    with sqlite3.connect(tmp_path / "hub.sqlite3") as db:  # what was written: the first
        assert db.execute("SELECT records_applied, frames_applied, duplicates_dropped"
                          " FROM gateway_stats").fetchall() == [(5, 1, 0)]
