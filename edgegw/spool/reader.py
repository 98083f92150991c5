"""Reading the disk spool: the tail cache of recent frames, and reads from segment files.

A connected uplink mostly asks for frames just committed: those come from ``TailCache``
(memory bounded by ``TAIL_CACHE_BYTES``).  Older ones (a backlog after an outage) are read
from the segments with ``read_sync``, starting at the sparse index entry before them and
bounded by ``READ_MAX_BYTES`` per call, in a worker thread (``DiskSpool.read_frames``).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

from ..store import StoredFrame
from .format import Kind, Record, Scanner
from .segments import READ_CHUNK, Segment, ev_past_segment

READ_MAX_BYTES = 8 << 20
TAIL_CACHE_BYTES = 16 << 20


class TailCache:
    """The most recently committed frames, oldest first, up to ``max_bytes`` of bodies."""

    def __init__(self, max_bytes: int = TAIL_CACHE_BYTES) -> None:
        self.max_bytes = max_bytes
        self._frames: OrderedDict[int, StoredFrame] = OrderedDict()
        self._bytes = 0

    def add(self, frame: StoredFrame) -> None:
        self._frames[frame.seq] = frame
        self._bytes += len(frame.body)
        while self._bytes > self.max_bytes and self._frames:
            _, old = self._frames.popitem(last=False)
            self._bytes -= len(old.body)

    def discard_through(self, seq: int) -> None:
        """Forget the frames up to ``seq`` (acknowledged or dropped)."""
        while self._frames and next(iter(self._frames)) <= seq:
            _, old = self._frames.popitem(last=False)
            self._bytes -= len(old.body)

    def run_from(self, start: int, limit: int, durable_seq: int,
                 skip: Callable[[int], bool]) -> list[StoredFrame] | None:
        """The cached frames from ``start`` on (``skip``: seqs not to return), up to
        ``limit``, as far as the cache holds them without a gap; None when it does not hold
        ``start`` (read from disk instead)."""
        if start not in self._frames:
            return None
        out: list[StoredFrame] = []
        s = start
        while len(out) < limit and s <= durable_seq:
            if skip(s):
                s += 1
                continue
            f = self._frames.get(s)
            if f is None:
                break
            out.append(f)
            s += 1
        return out


def read_sync(segments: list[Segment], start: int, limit: int, durable_seq: int,
              wanted: Callable[[int], bool]) -> list[StoredFrame]:
    """Up to ``limit`` durable frames from ``start`` on that are ``wanted``, read from the
    segment files (blocking), bounded by ``READ_MAX_BYTES`` of bodies."""
    out: list[StoredFrame] = []
    budget = READ_MAX_BYTES
    for seg in list(segments):  # few segments (1 GB / 16 MiB = 64): linear is fine
        if not seg.n_frames or seg.last_seq < start:
            continue
        offset = seg.offset_before(start)
        scanner = Scanner(offset)
        try:
            f = open(seg.path, "rb")
        except FileNotFoundError:
            continue  # deleted meanwhile (acked)
        with f:
            f.seek(offset)
            done = False
            while not done:
                chunk = f.read(min(READ_CHUNK, max(budget, 64 << 10)))
                if chunk:
                    scanner.feed(chunk)
                else:
                    scanner.end()
                for ev in scanner.events():
                    if not isinstance(ev, Record) or ev.kind is not Kind.FRAME:
                        continue
                    if ev.seq < start or ev.seq > durable_seq:
                        if ev.seq > durable_seq:
                            done = True
                            break
                        continue
                    if wanted(ev.seq):
                        meta = ev.meta_value()
                        cps = meta.get("c")
                        out.append(StoredFrame(ev.seq, ev.body, int(meta.get("n", 0)),
                                               cps if isinstance(cps, dict) else None))
                        budget -= len(ev.body)
                    if len(out) >= limit or budget <= 0:
                        done = True
                        break
                if not chunk or ev_past_segment(scanner, seg):
                    break
        if len(out) >= limit or budget <= 0:
            break
    return out
