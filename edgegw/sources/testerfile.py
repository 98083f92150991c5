"""Reading a tester's files without getting in its way.

On Windows a file opened by Python's ``open()`` cannot be renamed or deleted by anyone
until it is closed (the C runtime leaves FILE_SHARE_DELETE out of the share mode).  The
tail keeps a growing file open between its looks, so a tester, or its lot-end script,
that moves a finished datalog to the archive share or renames ``lot.stdf.tmp`` to
``lot.stdf`` would fail with a sharing violation while the gateway read it.
``open_shared`` opens with every share mode (read, write, delete), as log shippers do
there; elsewhere it is ``open()``, which never stood in the way.

``pread`` reads at an offset without moving the descriptor's position: ``os.pread``, and
on Windows (which has no ``os.pread``) a seek, a read and a seek back.  Both block: call
them in a worker thread.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any, BinaryIO

log = logging.getLogger(__name__)


def pread_seek(fd: int, n: int, at: int) -> bytes:
    """Up to ``n`` bytes of ``fd`` from offset ``at``; its position is put back (the
    portable ``os.pread``: the descriptor must not be read by another thread meanwhile)."""
    was = os.lseek(fd, 0, os.SEEK_CUR)
    try:
        os.lseek(fd, at, os.SEEK_SET)
        parts: list[bytes] = []
        while n > 0:
            part = os.read(fd, n)
            if not part:
                break
            parts.append(part)
            n -= len(part)
        return b"".join(parts)
    finally:
        os.lseek(fd, was, os.SEEK_SET)


pread = getattr(os, "pread", None) or pread_seek


if sys.platform == "win32":  # pragma: no cover - exercised on Windows only
    import ctypes
    import msvcrt
    from ctypes import wintypes

    _GENERIC_READ = 0x80000000
    _SHARE_ALL = 0x1 | 0x2 | 0x4  # FILE_SHARE_READ | FILE_SHARE_WRITE | FILE_SHARE_DELETE
    _OPEN_EXISTING = 3
    _FILE_ATTRIBUTE_NORMAL = 0x80
    _INVALID = wintypes.HANDLE(-1).value
    _fallback_logged = False

    def _create_file() -> tuple[Any, Any]:
        kernel32 = ctypes.WinDLL("kernel32", use_last_error=True)
        create = kernel32.CreateFileW
        create.argtypes = [wintypes.LPCWSTR, wintypes.DWORD, wintypes.DWORD, wintypes.LPVOID,
                           wintypes.DWORD, wintypes.DWORD, wintypes.HANDLE]
        create.restype = wintypes.HANDLE
        close = kernel32.CloseHandle
        close.argtypes = [wintypes.HANDLE]
        return create, close

    _CREATE, _CLOSE = _create_file()

    def open_shared(path: str | os.PathLike[str]) -> BinaryIO:
        """``open(path, "rb")`` that leaves the file free to be renamed or deleted."""
        global _fallback_logged
        name = os.fspath(path)
        handle = _CREATE(name, _GENERIC_READ, _SHARE_ALL, None, _OPEN_EXISTING,
                         _FILE_ATTRIBUTE_NORMAL, None)
        if handle is None or handle == _INVALID:
            err = ctypes.get_last_error()
            # errno 0 and winerror: OSError maps it to FileNotFoundError, PermissionError...
            raise OSError(0, ctypes.FormatError(err), name, err)
        try:
            fd = msvcrt.open_osfhandle(handle, os.O_RDONLY)  # (binary: no O_TEXT)
        except Exception as exc:
            _CLOSE(handle)
            if not _fallback_logged:  # not expected; the file is still read, as before
                _fallback_logged = True
                log.warning("cannot open tester files with FILE_SHARE_DELETE (%s); they "
                            "cannot be renamed or deleted while the gateway reads them", exc)
            return open(name, "rb")
        return os.fdopen(fd, "rb")
else:
    def open_shared(path: str | os.PathLike[str]) -> BinaryIO:
        """``open(path, "rb")``: POSIX never stops a rename or an unlink of an open file."""
        return open(path, "rb")


__all__ = ["open_shared", "pread", "pread_seek"]
