"""The frames a gateway numbered under seqs the hub had applied from a lost state are stored
again under new ones before anything is acknowledged -- and a crash halfway resumes where it
stopped (``edgegw/gateway/rollback.py``).  The real disk spool, no hub: the hub's applied
set is what a WELCOME would carry."""

from __future__ import annotations

from pathlib import Path

from test_spool import body, cfg, fill

from edgegw.gateway import REISSUE_KEY, reissue, resume, rolled_back
from edgegw.spool import DiskSpool


def frames(spool: DiskSpool) -> list[tuple[int, bytes]]:
    out: list[tuple[int, bytes]] = []
    seq = spool.first_unacked
    while got := spool.frames_from(seq, 1000):
        out += [(f.seq, f.body) for f in got]
        seq = got[-1].seq + 1
    return out


async def restored(path: Path) -> None:
    """Frames 1..5: the state a snapshot kept (the lost run went on to send up to 20)."""
    async with DiskSpool.open(cfg(path)) as spool:
        await fill(spool, 5)


async def test_frames_under_seqs_the_hub_applied_are_stored_again_above_them(
        tmp_path: Path) -> None:
    await restored(tmp_path)
    async with DiskSpool.open(cfg(tmp_path)) as spool:
        assert spool.started_seq == 6
        await fill(spool, 4)  # 6..9, numbered before the first WELCOME (the hub away)
        got = await reissue(spool, [(1, 20)])  # the WELCOME: the lost run sent up to 20
        assert got is not None and (got.first, got.last, got.reissued) == (6, 20, 4)
        assert spool.next_seq == 25
        spool.ack(20)  # then the WELCOME's applied set acknowledges
        # the copies, in order, with the originals' bodies, and nothing else to send
        assert frames(spool) == [(21 + i, body(6 + i)) for i in range(4)]
        assert spool.checkpoints[REISSUE_KEY] == [6, 9, 9]
        await spool.flush()
    async with DiskSpool.open(cfg(tmp_path)) as spool:  # and so after a restart
        assert [s for s, _ in frames(spool)] == [21, 22, 23, 24]
        assert rolled_back(spool, [(1, 24)]) is None
        assert await resume(spool) == 0


async def test_a_crash_while_storing_again_resumes_with_the_rest_before_any_ack(
        tmp_path: Path) -> None:
    await restored(tmp_path)
    async with DiskSpool.open(cfg(tmp_path)) as spool:
        await fill(spool, 4)
        spool.skip_to(21)  # what reissue does first, then two copies, then the process dies
        for seq in (6, 7):
            await spool.append(body(seq), 3, {REISSUE_KEY: [6, 9, seq]})
    async with DiskSpool.open(cfg(tmp_path)) as spool:
        assert spool.started_seq == 23
        assert rolled_back(spool, [(1, 20)]) is None  # the copies numbered past it
        assert await resume(spool) == 2  # 8 and 9
        spool.ack(20)
        assert frames(spool) == [(21, body(6)), (22, body(7)), (23, body(8)), (24, body(9))]


async def test_a_start_that_numbered_nothing_yet_only_moves_past_the_hub(
        tmp_path: Path) -> None:
    await restored(tmp_path)
    async with DiskSpool.open(cfg(tmp_path)) as spool:
        got = await reissue(spool, [(1, 12)])
        assert got is not None and got.reissued == 0
        spool.ack(12)
        assert await spool.append(body(13), 3, {}) == 13
        assert frames(spool) == [(13, body(13))]


async def test_seqs_the_hello_gave_up_are_no_rollback(tmp_path: Path) -> None:
    """The hub counts every seq below the HELLO's ``next_seq`` done -- applied, or lost:
    frames this run dropped (``drop_oldest``) before it could send them.  Only seqs from
    there on that the hub has are another run's."""
    await restored(tmp_path)
    async with DiskSpool.open(cfg(tmp_path)) as spool:
        await fill(spool, 4)  # 6..9; say 6..8 were dropped: the HELLO says next_seq 9
        assert rolled_back(spool, [(1, 8)], hello_next=9) is None
        assert rolled_back(spool, [(1, 9)], hello_next=9) == (9, 9)
        assert rolled_back(spool, [(1, 8)]) == (6, 8)  # (without the HELLO's word)
