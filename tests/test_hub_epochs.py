"""The single hub's store holds in memory the applied sets of the epochs its gateways use
now, not of every epoch it ever saw: a gateway with frames in memory (an embedded test
program) starts a new epoch at each start, and reading every (gateway, epoch) row at the
hub's start made its memory and start-up grow for good (bench/hub_epochs.py).  What is on
disk still rules: an epoch not in memory is read in when a claim or a commit needs it, so
a duplicate of it is still known (docs/protocol.md section 3: nothing applied twice)."""

from __future__ import annotations

from pathlib import Path

from edgegw.hub.store import FrameToApply, HubStore
from edgegw.protocol import encode_body
from edgegw.records import PartResult

GW = "ate-01"


def frame(epoch: str, seq: int, first_rid: int, n: int = 2) -> FrameToApply:
    records = [PartResult("tester", 1.0 + r, "L1", "", 1, r % 4, f"p{r}", None, None, 1, 1,
                          True) for r in range(first_rid, first_rid + n)]
    return FrameToApply(GW, epoch, seq, first_rid, n, encode_body(first_rid, records))


async def test_each_start_of_a_gateway_with_a_new_epoch_leaves_memory_as_it_was(
        tmp_path: Path) -> None:
    store = HubStore(tmp_path / "hub.sqlite3")
    await store.open()
    try:
        for run in range(200):  # 200 program runs, each its own epoch, 3 frames each
            epoch = f"run-{run}"
            await store.claim(GW, epoch)
            assert await store.commit([frame(epoch, s, 2 * s - 1) for s in (1, 2, 3)]) == set()
        assert list(store.applied) == [(GW, "run-199")]
        assert list(store.rids) == [(GW, "run-199")]
    finally:
        await store.close()
    store = HubStore(tmp_path / "hub.sqlite3")
    await store.open()  # reads no applied set at its start
    try:
        assert store.applied == {}
        # every epoch's set is on disk, read in by its claim
        claim = await store.claim(GW, "run-17")
        assert claim.applied.ranges() == [(1, 3)] and claim.rids.ranges() == [(1, 6)]
    finally:
        await store.close()


async def test_a_frame_of_an_epoch_no_longer_in_memory_is_still_a_duplicate(
        tmp_path: Path) -> None:
    """An old connection of the gateway's previous epoch that commits after the new
    epoch's claim (a takeover) is checked against that epoch's set, read in again."""
    store = HubStore(tmp_path / "hub.sqlite3")
    await store.open()
    try:
        await store.claim(GW, "old")
        assert await store.commit([frame("old", s, 2 * s - 1) for s in range(1, 6)]) == set()
        await store.claim(GW, "new")  # the old epoch leaves memory
        assert (GW, "old") not in store.applied
        skipped = await store.commit([frame("old", 3, 5), frame("old", 6, 11)])
        assert skipped == {(GW, "old", 3)}  # applied before: a duplicate, not applied again
        # records under other seqs but applied ids: dropped by their ids, as before
        assert await store.commit([frame("old", 7, 1)]) == {(GW, "old", 7)}
        await store.declare_lost(GW, "old", 8, 1)  # seqs up to 8: none held any more
        claim = await store.claim(GW, "old")
        assert claim.applied.ranges() == [(1, 8)]
        assert claim.rids.ranges() == [(1, 12)]
        rows = await store.query("SELECT seq FROM frames WHERE epoch = 'old' ORDER BY seq")
        assert [seq for (seq,) in rows] == [1, 2, 3, 4, 5, 6]
    finally:
        await store.close()
