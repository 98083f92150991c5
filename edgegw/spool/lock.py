"""One process per spool directory: an exclusive lock on ``dir/lock`` (docs/spool.md, "One
gateway per spool").

Two gateways started on one spool (a second service unit, a copy-pasted config, a test run
beside the real one) would share its epoch and number their frames 1, 2, 3 ... each on its
own: the hub applies whichever frame ``n`` comes first and drops the other as a duplicate
(its records lost), and each process deletes segments the other still reads.  So the
spool takes an advisory lock before it reads anything, and a second process fails to
start with one line naming the key and the holder's pid.  The lock is the kernel's
(``flock``; ``msvcrt.locking`` on Windows), not the file's presence: it goes with the
process however that ends -- SIGKILL, power cut -- and a stale ``lock`` file means nothing.
"""

from __future__ import annotations

import contextlib
import errno
import os
import sys
from pathlib import Path

from ..startup import StartupError

LOCK_NAME = "lock"


class SpoolInUse(StartupError):
    """Another process holds the spool directory's lock."""


class SpoolLock:
    """The exclusive lock on one spool directory, held from ``acquire`` to ``release``."""

    def __init__(self, directory: Path, key: str = "spool.dir") -> None:
        self.path = directory / LOCK_NAME
        self.key = key
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock or raise SpoolInUse at once (never waits: the other process may
        run for months).  Blocking file I/O: call it from a worker thread."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            _lock(fd)
        except OSError as exc:
            holder = _read_pid(fd)
            os.close(fd)
            if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise
            who = f" (pid {holder})" if holder else ""
            raise SpoolInUse(
                f"{self.key}: {str(self.path.parent)!r} is in use by another gateway "
                f"process{who}; two processes on one spool would lose frames -- give "
                f"each gateway its own spool.dir") from None
        # the holder's pid, for the message above (informative: the lock is the kernel's)
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)  # closing the descriptor drops the lock
            self._fd = None


def _read_pid(fd: int) -> int | None:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        return int(os.read(fd, 32).decode().strip())
    except (OSError, ValueError, UnicodeDecodeError):
        return None


if sys.platform == "win32":  # pragma: no cover - exercised on Windows only
    import msvcrt

    def _lock(fd: int) -> None:
        # a byte range lock on a byte past the pid, so reading the pid is not blocked
        os.lseek(fd, 64, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
else:
    import fcntl

    def _lock(fd: int) -> None:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)


__all__ = ["LOCK_NAME", "SpoolInUse", "SpoolLock"]
