"""A gateway whose state went back in time, found at its first WELCOME.

A snapshot of the tester's workstation restored, a backup of the state directory copied
back, a segment file moved away: the spool starts from an older state, while the hub kept
what the lost run sent since.  The spool then numbers its frames from a ``seq`` the hub has
applied already, and the hub drops each such frame as a duplicate -- other records under
the same numbers, lost without a word.

At this process's first WELCOME it has sent nothing yet, so every seq the hub has applied
from the store's ``started_seq`` on (and from the HELLO's ``next_seq``: below it the hub
counts every seq done) was sent by the lost run.  Then (``reissue``):

1. the store's numbering moves past the hub's highest applied seq (``skip_to``), so no
   frame made from now on repeats one;
2. each frame this run stored under a repeated seq (before the WELCOME: the hub was away,
   say) is stored again, the same body, under a new seq; the copies go first, each with
   the progress among the checkpoints (``REISSUE_KEY``), so a crash halfway resumes
   (``resume``) rather than forgetting the rest;
3. only then does the WELCOME's applied set acknowledge the originals.

The copies keep their record ids, and records a source gives again from its older position
keep theirs (a source that replays reads the same records from the same position, and the
record ids come from the same checkpoint), so the hub's record-id check drops those it has
(docs/protocol.md, section 3) and applies the rest: every record once.  Records whose ids
the lost run gave to other records -- a source whose records interleave differently on the
second pass (a live MQTT feed beside a tail) -- cannot be told apart by any id: the hub
drops them, and counts them.  The gateway reports the rollback (an error, the metric
``edgegw_uplink_state_rollbacks_total``, an event to the hub) so it is never silent
(docs/operations.md, "A gateway's state restored from a copy").
"""

from __future__ import annotations

import logging
from typing import NamedTuple

from ..store import FrameStore

log = logging.getLogger("edgegw.uplink")

#: kept among the store's checkpoints: ``[first, last, done]``, the seqs of the frames being
#: stored again and the last one stored so far
REISSUE_KEY = "__reissue__"

#: frames read at a time while storing them again
READ_BATCH = 64


class Rollback(NamedTuple):
    """What the first WELCOME showed: the hub has applied ``first``..``last`` of
    ``epoch``, which this store never sent; ``reissued`` frames were stored again."""

    epoch: str
    first: int
    last: int
    reissued: int


def rolled_back(store: FrameStore, applied: list[tuple[int, int]], hello_next: int = 1
                ) -> tuple[int, int] | None:
    """At the process's first WELCOME: the seqs the hub applied that this store's run never
    sent (``(first, last)``), or None when there are none.  ``hello_next``: the HELLO's
    ``next_seq``, below which the hub counts every seq done (applied, or lost: frames this
    run dropped under ``drop_oldest`` before it could send them) -- no sign of a rollback."""
    last = max((hi for _, hi in applied), default=0)
    first = max(store.started_seq, hello_next)
    return (first, last) if last >= first else None


async def reissue(store: FrameStore, applied: list[tuple[int, int]], hello_next: int = 1
                  ) -> Rollback | None:
    """Before the first WELCOME's acknowledgements: find a rollback and store again the
    frames of this run under repeated seqs (see the module's note)."""
    found = rolled_back(store, applied, hello_next)
    if found is None:
        return None
    first, last = found
    made = store.next_seq  # frames first..made-1 were stored by this run
    store.skip_to(last + 1)
    log.error("the hub has applied frames %d..%d of epoch %s, which this gateway's spool "
              "never held: its state directory went back in time (a snapshot or backup "
              "restored, files moved away); %d frame(s) stored under those seqs since the "
              "start are stored again under new ones (docs/operations.md, \"A gateway's "
              "state restored from a copy\")", first, last, store.epoch,
              max(0, min(last, made - 1) - first + 1))
    if made - 1 >= first:  # (the copies are read from what is durable)
        await store.wait_for_frame_after(made - 2)
    # (interrupted before a copy is durable, this runs again at the next WELCOME: the
    # originals are acknowledged only after it returns)
    n = await _store_again(store, first, min(last, made - 1))
    return Rollback(store.epoch, first, last, n)


async def resume(store: FrameStore) -> int:
    """Finish storing again what a crash interrupted (before any acknowledgement)."""
    pending = store.checkpoints.get(REISSUE_KEY)
    if not (isinstance(pending, list) and len(pending) == 3):
        return 0
    first, last, done = (int(v) for v in pending)
    if done >= last:
        return 0
    log.warning("storing again frames %d..%d of a state that went back in time (stopped "
                "after %d)", first, last, done)
    return await _store_again(store, done + 1, last, first)


async def _store_again(store: FrameStore, start: int, last: int, first: int | None = None
                       ) -> int:
    """Store frames ``start``..``last`` again, in order, each copy durable before the next,
    with the progress among the checkpoints."""
    first = start if first is None else first
    n = 0
    seq = start
    while seq <= last:
        frames = [f for f in await store.read_frames(seq, READ_BATCH) if f.seq <= last]
        if not frames:
            break
        for f in frames:
            # over the cap: the originals it would wait for go only once all are copied
            await store.append(f.body, f.n_records, {REISSUE_KEY: [first, last, f.seq]},
                               over_cap=True)
            n += 1
        seq = frames[-1].seq + 1
    return n


__all__ = ["READ_BATCH", "REISSUE_KEY", "Rollback", "reissue", "resume", "rolled_back"]
