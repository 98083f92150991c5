"""A gzip file that is a compressed copy of a finished tester file the tail has read.

Test floors compress finished datalogs where they lie -- ``gzip lot.stdf`` at lot end or
from a nightly job -- and the tail watches ``.stdf.gz`` too.  The compressed file is a new
file (another inode, another name): before, the tail read it from its start and the whole
lot went to the hub a second time.  Its decompressed first bytes are those of the file it
was made from, and a tester file's first KiB (STDF: FAR, ATR, MIR -- lot id, start time) is
written once and tells one file from another (``fingerprint``).  So a gzip file nothing has
been read of yet whose decompressed first bytes start like a finished plain file the tail
knows (its fingerprint whole: ``HEAD_BYTES``, or all of a smaller file) is taken as that
file, finished where it was finished: not read, and a lot appended to it later is read from
that file's end (docs/tail.md, "Compressed in place").

While ``gzip`` writes it, the new file may hold less than a fingerprint's bytes; until it
decompresses to ``HEAD_BYTES`` (or its stream ends) nothing can be told, and it is not read
yet (``WAIT``).

A gzip file that starts like an *unfinished* file the tail knows, gone from disk (compressed
while the gateway was stopped before it read the file's end), is read on from where that
file was read to (``Originals.unfinished_of``; ``TailSource._read_on_in_copies``).

``Originals.copy_of`` is the decision, pure; ``read_gzip_heads`` does blocking I/O: call it in a
worker thread.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Iterable
from typing import BinaryIO, Literal, NamedTuple

from .fingerprint import HEAD_BYTES, Fingerprint
from .testerfile import open_shared

#: compressed bytes read at most to find a file's first ``HEAD_BYTES`` decompressed: a
#: deflate stream can hold its first output back this long only if its start is padding
MAX_RAW = 1 << 20
_CHUNK = 16 * 1024


class Finished(NamedTuple):
    """A finished plain file the tail knows, as a copy of it would be taken."""

    path: str
    #: the fingerprint of its first bytes (whole: ``HEAD_BYTES``, or its size)
    head: Fingerprint
    #: where it was read to (a copy's offset)
    at: int
    #: where its last MRR ends (None: not finished at an MRR)
    end: int | None


class GzipHead(NamedTuple):
    #: its first decompressed bytes, up to ``HEAD_BYTES``
    data: bytes
    #: its streams end there: it holds no more (as it is now)
    ended: bool


WAIT: Literal["wait"] = "wait"


class Originals:
    """The files a gzip file may be a copy of, by fingerprint: the finished ones, and the
    unfinished ones (a copy made of one of those is waited on: the tail may be reading it
    to its end yet)."""

    def __init__(self) -> None:
        self.finished: dict[Fingerprint, Finished] = {}
        #: fingerprint -> the unfinished file's path
        self.unfinished: dict[Fingerprint, str] = {}
        self._lengths: set[int] = set()

    def add(self, f: Finished) -> None:
        self.finished.setdefault(f.head, f)
        self._lengths.add(f.head[0])

    def add_unfinished(self, head: Fingerprint, path: str) -> None:
        self.unfinished.setdefault(head, path)
        self._lengths.add(head[0])

    def __bool__(self) -> bool:
        return bool(self._lengths)

    def copy_of(self, data: bytes, ended: bool) -> Finished | Literal["wait"] | None:
        """The finished file a gzip file decompressing to ``data`` first is a copy of;
        ``WAIT`` when it holds too few bytes yet to tell (fewer than a known fingerprint
        covers, and more may come), or starts like a file not finished yet; None: none,
        a file of its own."""
        waiting = False
        for n in sorted(self._lengths, reverse=True):
            if len(data) < n:
                waiting = waiting or not ended
                continue
            key = (n, zlib.crc32(data[:n]))
            if key in self.finished:
                return self.finished[key]
            waiting = waiting or key in self.unfinished
        return WAIT if waiting else None

    def unfinished_of(self, data: bytes) -> str | None:
        """The path of the unfinished file a gzip file decompressing to ``data`` first
        starts like, if any: the copy may be read on from where that file was read to,
        if it is gone (``TailSource``).  The longest fingerprint decides: a copy that
        starts like a finished file over more bytes is that file's (the start of a file
        the tail read little of -- a FAR, part of a MIR -- is the start of other lots of
        that tester too).  A fingerprint shorter than ``HEAD_BYTES`` covers every byte the
        tail read of its file, so a copy read on from it repeats exactly what was read."""
        for n in sorted(self._lengths, reverse=True):
            if len(data) < n:
                continue
            key = (n, zlib.crc32(data[:n]))
            if key in self.finished:
                return None
            if key in self.unfinished:
                return self.unfinished[key]
        return None


def read_gzip_heads(wanted: Iterable[tuple[str, int]]) -> dict[str, GzipHead]:
    """For each ``(path, inode)`` of a gzip file: its first decompressed bytes.  A file
    that cannot be read, whose inode is no longer ``inode``, or that is not a valid gzip
    stream up to there is left out.  Blocking."""
    out: dict[str, GzipHead] = {}
    for path, inode in wanted:
        try:
            with open_shared(path) as handle:
                if os.fstat(handle.fileno()).st_ino != inode:
                    continue
                head = _decompressed_head(handle)
        except (OSError, zlib.error):
            continue
        if head is not None:
            out[path] = head
    return out


def _decompressed_head(handle: BinaryIO) -> GzipHead | None:
    """The first ``HEAD_BYTES`` decompressed (fewer: all there is), member after member;
    None if ``MAX_RAW`` compressed bytes give fewer."""
    data = bytearray()
    d = zlib.decompressobj(31)
    raw, todo = 0, b""
    while len(data) < HEAD_BYTES:
        if not todo:
            if raw >= MAX_RAW:
                return None
            todo = handle.read(_CHUNK)
            raw += len(todo)
            if not todo:
                # ended only after a whole member: an empty file, or one cut inside a
                # member, is still being written
                return GzipHead(bytes(data), raw > 0 and d.eof)
        if d.eof:  # (a member ended: the next begins here)
            d = zlib.decompressobj(31)
        data += d.decompress(todo, HEAD_BYTES - len(data))
        todo = d.unconsumed_tail or (d.unused_data if d.eof else b"")
    return GzipHead(bytes(data), False)
