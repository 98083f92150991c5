"""A file's new name made durable: the directory that holds it synced.

Writing a file, syncing it and renaming it over the old one (the spool's segments and
state, the hub's checkpoint, a finished tester file's record, a requeued dead-letter
file) is durable only once the directory entry is: on POSIX that is ``fsync`` on the
directory itself.  Windows has no such call -- a directory opens only through
``CreateFile`` with backup semantics, which ``os.open`` does not use, so it raises
``PermissionError`` -- and NTFS journals its directory entries, so there the step is
skipped (as SQLite and LevelDB do), never an error that stops a gateway on its first
segment.
"""

from __future__ import annotations

import os
from pathlib import Path

#: whether a directory can be opened and synced here (POSIX)
DIRECTORY_SYNC = os.name == "posix"


def fsync_dir(directory: str | Path) -> None:
    """Make the names just written in ``directory`` durable (a no-op where there is no
    such call; see the module's note)."""
    if not DIRECTORY_SYNC:
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


__all__ = ["DIRECTORY_SYNC", "fsync_dir"]
