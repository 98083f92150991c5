"""A place in a gzip file's decompressed stream that reading can go on from.

A gzip file's offsets, to the tail, are those of its decompressed stream (every member),
and gzip has no index: to reach an offset, the file is decompressed from its start.  A
tester that appends a lot to a finished ``.stdf.gz`` (a member of its own, or a stream
flushed with ``Z_SYNC_FLUSH`` and written on) made the tail decompress the whole file
again at each growth -- quadratic in the lots appended.  A ``GzPoint`` is where a reader
was: the compressed and decompressed offsets, and the decompressor's state there (None
where a member begins, as the next one does after a member ended: two integers).  Reading
goes on from it while the file only grew: the same inode (the caller opens it by inode),
and the compressed bytes just before it unchanged (``check``, the CRC32 of up to
``CHECK_BYTES`` of them); otherwise from the start, as before.

``checked`` does blocking I/O: call it in a worker thread.
"""

from __future__ import annotations

import dataclasses
import zlib
from typing import Any, BinaryIO

from .testerfile import pread

#: compressed bytes before a point whose CRC32 tells that they did not change
CHECK_BYTES = 1024


@dataclasses.dataclass(frozen=True)
class GzPoint:
    #: compressed bytes before it: where the file is read on from
    raw: int
    #: decompressed bytes before it (the stream's offset there)
    out: int
    #: the decompressor there, never used itself (``decompressor`` copies it), holding
    #: the compressed bytes before ``raw`` it has not taken yet (``unconsumed_tail``: a
    #: reader takes those first, then reads on from ``raw``); None: a gzip member begins
    #: there
    state: Any = None
    #: CRC32 of the compressed bytes [raw - CHECK_BYTES, raw)
    check: int = 0

    def decompressor(self) -> Any:
        """A decompressor that goes on from here."""
        return zlib.decompressobj(31) if self.state is None else self.state.copy()


#: the file's start
START = GzPoint(0, 0)


def check_of(fd: int, raw: int) -> int | None:
    """The ``check`` of a point at compressed offset ``raw`` of the open file ``fd``
    (blocking; ``pread``: the file's position is not moved).  None: unreadable."""
    lo = max(0, raw - CHECK_BYTES)
    try:
        before = pread(fd, raw - lo, lo)
    except OSError:
        return None
    return zlib.crc32(before) if len(before) == raw - lo else None


def checked(handle: BinaryIO, point: GzPoint) -> GzPoint:
    """``point`` if the compressed bytes before it are still those it was taken after
    (the file only grew since), else ``START``; ``handle`` positioned there.  Blocking."""
    if point.raw and check_of(handle.fileno(), point.raw) != point.check:
        point = START
    handle.seek(point.raw)
    return point
