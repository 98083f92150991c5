"""Segment files of the disk spool: their names, the sparse seq -> offset index kept per
segment (I1), and the blocking file operations on them (run in worker threads)."""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
import errno
import os
import time
from pathlib import Path
from typing import Any

from ..dirsync import fsync_dir
from .format import Scanner, encode_state

SPARSE_STRIDE = 64
READ_CHUNK = 1 << 20
SEGMENT_PREFIX = "seg-"
SEGMENT_SUFFIX = ".spool"


def segment_path(directory: Path, index: int) -> Path:
    return directory / f"{SEGMENT_PREFIX}{index:010d}{SEGMENT_SUFFIX}"


@dataclasses.dataclass
class Segment:
    index: int
    path: Path
    size: int = 0
    first_seq: int = 0  # 0: no frames
    last_seq: int = 0
    n_frames: int = 0
    state_bytes: int = 0  # its opening STATE record (when this process wrote it)
    writable: bool = True  # False: never appended to (a torn tail that could not be cut)
    sparse_seqs: list[int] = dataclasses.field(default_factory=list)
    sparse_offsets: list[int] = dataclasses.field(default_factory=list)

    def add_frame(self, seq: int, offset: int) -> None:
        if self.n_frames % SPARSE_STRIDE == 0:
            self.sparse_seqs.append(seq)
            self.sparse_offsets.append(offset)
        if not self.first_seq:
            self.first_seq = seq
        self.last_seq = seq
        self.n_frames += 1

    def offset_before(self, seq: int) -> int:
        """An offset at or before the frame ``seq`` (a record boundary)."""
        i = bisect.bisect_right(self.sparse_seqs, seq) - 1
        return self.sparse_offsets[i] if i >= 0 else 0


def list_segments(directory: Path) -> list[tuple[int, Path]]:
    out = []
    for p in directory.glob(f"{SEGMENT_PREFIX}*{SEGMENT_SUFFIX}"):
        try:
            out.append((int(p.name[len(SEGMENT_PREFIX):-len(SEGMENT_SUFFIX)]), p))
        except ValueError:
            continue
    return sorted(out)


def write_epoch(directory: Path, epoch: str) -> None:
    tmp = directory / "epoch.tmp"
    with open(tmp, "wb") as f:
        f.write(epoch.encode() + b"\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, directory / "epoch")
    fsync_dir(directory)


def disk_full(exc: OSError) -> bool:
    """A write that failed for want of space (a full file system or quota): handled like
    the cap, never a crash; any other OSError is a fault."""
    return exc.errno in (errno.ENOSPC, errno.EDQUOT)


def open_segment_sync(directory: Path, index: int, state: dict[str, Any]) -> Segment:
    """Create segment ``index`` whose first record is a STATE snapshot (I3, I8), durably."""
    path = segment_path(directory, index)
    data = encode_state(state)
    try:
        with open(path, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        fsync_dir(directory)
    except OSError:
        # (disk full) leave no half-made segment behind: the rollover is retried later.
        # Should it stay (it cannot be deleted either), the caller finds it and never
        # appends to it nor makes the same name again.
        with contextlib.suppress(OSError):
            path.unlink()
        raise
    return Segment(index, path, size=len(data), state_bytes=len(data))


Undeleted = list[tuple[Segment, OSError]]


def write_sync(directory: Path, active: Segment, data: bytes, deletable: list[Segment]
               ) -> tuple[float, Undeleted]:
    """One group commit: append, fsync, then (I4) delete what the ACK just made safe.
    Returns the seconds the fsync took (``spool_fsync_seconds``) and the segments that
    could not be deleted (``unlink_sync``): the commit stands either way."""
    with open(active.path, "r+b") as f:
        f.seek(active.size)
        try:
            f.write(data)
            f.flush()
            t0 = time.perf_counter()
            os.fsync(f.fileno())
            fsync_s = time.perf_counter() - t0
        except OSError:
            # ENOSPC mid-write: cut the partial write so the file stays clean
            with contextlib.suppress(OSError):
                f.truncate(active.size)
            raise
    return fsync_s, unlink_sync(directory, deletable) if deletable else []


def unlink_sync(directory: Path, segments: list[Segment]) -> Undeleted:
    """Delete segments whose every frame is acknowledged or dropped.  A segment that
    cannot be deleted (an immutable or read-only file, one a virus scanner or backup holds
    open on Windows) is returned with why, never raised: its data is safe at the hub
    already, so it must not fail the commit that made it so (docs/spool.md)."""
    failed: Undeleted = []
    for seg in segments:
        try:
            seg.path.unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:
            failed.append((seg, exc))
    with contextlib.suppress(OSError):  # the deletes are redone at start-up if lost (I4)
        fsync_dir(directory)
    return failed


def ev_past_segment(scanner: Scanner, seg: Segment) -> bool:
    """True once the scanner has consumed the committed part of the segment."""
    return scanner.offset >= seg.size
