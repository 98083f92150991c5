"""What a tailed file starts with: tells a file from another one that got its inode.

File systems reuse inodes: a file deleted and a new one created before the tail's next look
(or while the gateway is stopped) can carry the old one's inode, so an inode seen under a
new path, or at the same path after its file finished, is not proof that it is the same
file.  Its first bytes are: a tester file's first KiB is its header (STDF: FAR, ATR, MIR --
lot id, start time), written once at its start and never changed.  The tail keeps, for each
file it knows, the CRC32 of its first ``min(size, HEAD_BYTES)`` bytes and how many that is
(docs/tail.md, "Inodes are reused"); a suspected rename or replacement reads the candidate's
first bytes of that length and compares.

A file's inode *generation number* tells it too, where the file system keeps one (ext4,
xfs, btrfs: a new one, at random, whenever it reuses an inode; ``generation``): the tail
names the stream of a file's records by inode and generation, so that records the gateway
holds of a deleted file are never taken for a new file's at its inode (docs/tail.md).

``read_fingerprints`` and ``open_file`` do blocking I/O: call them in a worker thread.
"""

from __future__ import annotations

import os
import struct
import sys
import zlib
from collections.abc import Iterable
from typing import Any, BinaryIO

from .testerfile import open_shared, pread

try:
    import fcntl
except ImportError:  # (not on Windows: no generation numbers there)
    fcntl = None  # type: ignore[assignment]

#: a fingerprint covers at most this many bytes of a file's start
HEAD_BYTES = 1024

#: (how many of the file's first bytes it covers, their CRC32)
Fingerprint = tuple[int, int]


def fingerprint(data: bytes) -> Fingerprint:
    """The fingerprint of a file whose first bytes (up to ``HEAD_BYTES``) are ``data``."""
    head = data[:HEAD_BYTES]
    return len(head), zlib.crc32(head)


def starts_alike(known: Fingerprint, data: bytes) -> bool:
    """Whether a file starting with ``data`` (its first ``HEAD_BYTES``, or all of it) can be
    the file ``known`` was taken of: its first ``known[0]`` bytes are the same.  (A file
    appended to since keeps its start; one shorter than the known start is another file.)"""
    n, crc = known
    return len(data) >= n and zlib.crc32(data[:n]) == crc


def extended(known: Fingerprint, data: bytes, at: int) -> Fingerprint:
    """``known`` carried on over ``data``, the file's bytes from offset ``at`` read after it
    was taken, up to ``HEAD_BYTES``: what the tail reads of a file is then always covered
    (unchanged when ``data`` does not join up with it)."""
    n, crc = known
    if n >= HEAD_BYTES or not at <= n < at + len(data):
        return known
    end = min(HEAD_BYTES, at + len(data))
    return end, zlib.crc32(data[n - at:end - at], crc)


def complete(known: Fingerprint | None, size: int) -> bool:
    """Whether ``known`` covers as much of a file of ``size`` bytes as a fingerprint can: a
    shorter one, taken while the file was being written, is taken again as it grows."""
    return known is not None and known[0] >= min(size, HEAD_BYTES)


def from_checkpoint(value: Any) -> Fingerprint | None:
    """A fingerprint as ``to_checkpoint`` wrote it (None: an entry without one)."""
    if value is None:
        return None
    n, crc = value
    return int(n), int(crc)


def to_checkpoint(known: Fingerprint) -> list[int]:
    return [known[0], known[1]]


def read_fingerprints(
        wanted: Iterable[tuple[str, int, Fingerprint | None]],
) -> dict[str, tuple[Fingerprint, bool | None]]:
    """For each ``(path, inode, known)``: the file's fingerprint now, and whether it starts
    like ``known`` (None when no ``known`` is given).  A file that cannot be read, or whose
    inode is no longer ``inode`` (replaced since it was listed), is left out.  Blocking."""
    out: dict[str, tuple[Fingerprint, bool | None]] = {}
    for path, inode, known in wanted:
        try:
            with open_shared(path) as handle:
                if os.fstat(handle.fileno()).st_ino != inode:
                    continue
                data = handle.read(HEAD_BYTES)
        except OSError:
            continue
        out[path] = fingerprint(data), None if known is None else starts_alike(known, data)
    return out


def read_at(path: str, inode: int, at: int, n: int) -> bytes | None:
    """Up to ``n`` bytes of ``path`` from offset ``at`` (None: it cannot be read, or its
    inode is no longer ``inode``).  Blocking."""
    try:
        with open_shared(path) as handle:
            if os.fstat(handle.fileno()).st_ino != inode:
                return None
            return pread(handle.fileno(), n, at)
    except OSError:
        return None


#: FS_IOC_GETVERSION (Linux: ``_IOR('v', 1, long)``): the inode's generation number
_GETVERSION = (2 << 30) | (struct.calcsize("l") << 16) | (ord("v") << 8) | 1


def generation(fd: int) -> int | None:
    """The generation number of the inode open at ``fd`` (None where the file system, or
    the platform, has none: tmpfs, which never reuses an inode anyway; NFS).  Blocking (one
    system call)."""
    if fcntl is None or not sys.platform.startswith("linux"):
        return None
    try:
        raw = fcntl.ioctl(fd, _GETVERSION, bytes(8))
    except OSError:
        return None
    return int(struct.unpack("I", raw[:4])[0])  # (the kernel writes an int)


def open_file(path: str, inode: int, at: int = 0) -> tuple[BinaryIO, int | None]:
    """Open ``path`` for reading (at offset ``at``), and the generation number of its inode
    if it is still ``inode`` (None otherwise: replaced since the scan).  Blocking."""
    handle = open_shared(path)  # (handed to the caller, who closes it)
    try:
        fd = handle.fileno()
        gen = generation(fd) if os.fstat(fd).st_ino == inode else None
        if at:
            handle.seek(at)
    except BaseException:
        handle.close()
        raise
    return handle, gen
