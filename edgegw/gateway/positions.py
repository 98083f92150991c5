"""Source positions told to the hub and taken back from it, sans-IO.

A gateway whose frame store starts afresh (a wiped disk, a deleted ``state_dir``, a spool
whose epoch could not be read) has lost where its sources were: read from their start,
its tester files would be applied by the hub a second time.  So the gateway tells the hub
where its sources are (POSITIONS, docs/protocol.md section 4.1) and a
gateway that starts afresh asks for them back in its first HELLO.

What is told is the part of the store's checkpoints that says where the sources are --
each source's own checkpoint and the records after it that frames hold (``AFTER_KEY``) --
never the gateway's own bookkeeping of its epoch (the next record id, the progress of a
split or a reissue), which means nothing to a new epoch.

Positions as of frame N are true only when every record they pass is in frames N and
below.  The gateway makes sure of that before it tells them (``Teller.may_tell``): every
frame below N is acknowledged or sent on this connection, and no frame up to N has parts
stored above N (a frame the uplink split for the hub: its checkpoints pass records that
later seqs carry).  The hub keeps them only once every frame up to N is applied.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Mapping
from typing import Any

import cbor2

from ..protocol import MAX_POSITIONS_BYTES, IntervalSet
from .config import RESERVED_NAME_PREFIX

#: the one key of the gateway's own among the checkpoints that a new epoch takes over
AFTER_KEY = "__after__"


def positions_of(checkpoints: Mapping[str, Any]) -> dict[str, Any]:
    """The sources' positions among a frame store's checkpoints."""
    return {k: v for k, v in checkpoints.items()
            if k == AFTER_KEY or not k.startswith(RESERVED_NAME_PREFIX)}


def taken_back(handed: Mapping[str, Any] | None) -> dict[str, Any]:
    """What a gateway starting afresh takes of the positions a hub handed back: the
    sources' keys (and ``AFTER_KEY`` when it is a map), nothing of the gateway's own."""
    if not handed:
        return {}
    out = positions_of(handed)
    if not isinstance(out.get(AFTER_KEY, {}), dict):
        del out[AFTER_KEY]  # not what this gateway writes: its skips are not trusted
    return out


class PositionLog:
    """Where the sources were as each frame was stored: ``note`` each stored frame's
    checkpoints in seq order, ``at(seq)`` gives the positions as of that frame.  Only the
    newest ``keep`` frames are remembered (older ones are backlog: their positions are
    passed by the newer ones' by the time they are sent)."""

    def __init__(self, base: Mapping[str, Any], keep: int = 64) -> None:
        self._merged = positions_of(base)
        self._at: OrderedDict[int, dict[str, Any]] = OrderedDict()
        self._keep = keep

    def note(self, seq: int, checkpoints: Mapping[str, Any]) -> None:
        self._merged.update(positions_of(checkpoints))
        self._at[seq] = dict(self._merged)
        while len(self._at) > self._keep:
            self._at.popitem(last=False)

    def at(self, seq: int) -> dict[str, Any] | None:
        return self._at.get(seq)


class Teller:
    """Whether positions may be told on one connection: only when they are true (see the
    module's doc), and not again when unchanged.  How often is the uplink's (a tick of
    ``uplink.positions_every_s``, telling the newest frame sent)."""

    def __init__(self, had: IntervalSet) -> None:
        #: the frames the hub has or will never need from this connection: acknowledged,
        #: below HELLO's ``next_seq``, in WELCOME's applied set, or sent on it
        self.had = had
        self._last: dict[str, Any] | None = None

    def sent(self, seq: int) -> None:
        self.had.add(seq)

    def may_tell(self, seq: int, positions: dict[str, Any], *, first_unacked: int,
                 parts: Iterable[tuple[int, Iterable[int]]]) -> bool:
        """Whether to tell ``positions`` as of frame ``seq`` (sent on this connection).
        ``parts``: per frame split for the hub, its seq and its parts' seqs."""
        if positions == self._last:
            return False  # nothing moved: the hub has these
        if first_unacked > 1:
            self.had.add_range(1, first_unacked - 1)
        if self.had.watermark() < seq:
            return False  # a frame below it may still come (and be split above it)
        if any(frame <= seq < max(seqs, default=0) for frame, seqs in parts):
            return False  # records they pass are in a part above ``seq``
        if len(cbor2.dumps(positions)) > MAX_POSITIONS_BYTES:
            return False  # too large for a message the hub keeps (protocol section 4.1)
        self._last = positions
        return True
