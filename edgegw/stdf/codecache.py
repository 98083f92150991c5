"""A per-user disk cache of the decoder's compiled code objects.

The decoder generates Python source per record type and byte order (``decoder.py``) and
compiling it is most of a short command's start-up (``edgegw stdf stats`` on a small
file: some tens of ms against a few ms of decoding).  The code objects compiled from a
source text are kept here, marshalled, one file per source, the way the interpreter's own
``__pycache__`` keeps a module's: a later process loads them instead of compiling.

A file holds the interpreter's version, the source text and its code object; it is used
only when both match exactly (the file name, a CRC of the source, only finds it), so a
changed generator, another edgegw or another Python never runs stale code, and a damaged
or foreign file costs a compile, never a wrong decode.  Marshalled code is trusted
like a ``.pyc``: the directory is the user's own (made mode 0700; one owned by another
user is not used).

Where: ``$EDGEGW_CACHE_DIR`` if set (empty: no cache), else ``$XDG_CACHE_HOME/edgegw``,
``~/.cache/edgegw`` (``%LOCALAPPDATA%\\edgegw\\cache`` on Windows).  Anything that goes
wrong with the directory (read-only home, a full disk) means compiling, as without it.
Like ``.pyc`` files, none are written under ``PYTHONDONTWRITEBYTECODE`` (or ``-B``).
"""

from __future__ import annotations

import marshal
import os
import sys
import zlib
from types import CodeType

#: the interpreter a code object was compiled by (its bytecode format)
_TAG = f"{sys.implementation.cache_tag} {sys.version}"
_UNSET = object()
_dir: object = _UNSET


def cache_dir() -> str | None:
    """The directory used, made on first use; None when there is none (off, or unusable)."""
    global _dir
    if _dir is _UNSET:
        _dir = _find_dir()
    return _dir  # type: ignore[return-value]


def _find_dir() -> str | None:
    base = os.environ.get("EDGEGW_CACHE_DIR")
    if base is None:
        if sys.platform == "win32":
            root = os.environ.get("LOCALAPPDATA")
            base = os.path.join(root, "edgegw", "cache") if root else ""
        else:
            root = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
            base = os.path.join(root, "edgegw")
    if not base:
        return None
    path = os.path.join(base, "stdf-code")
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
        st = os.stat(path)
    except OSError:
        return None
    getuid = getattr(os, "getuid", None)
    if getuid is not None and st.st_uid != getuid():
        return None  # someone else's directory: its files could run anything
    return path


def reset() -> None:
    """Look the directory up again (after ``EDGEGW_CACHE_DIR`` changed)."""
    global _dir
    _dir = _UNSET


def compiled(source: str, filename: str) -> CodeType:
    """``compile(source, filename, "exec")``, from the cache when it holds this source."""
    where = cache_dir()
    if where is None:
        return compile(source, filename, "exec")
    path = os.path.join(where, f"{zlib.crc32(source.encode()):08x}-{len(source)}")
    try:
        with open(path, "rb") as f:
            tag, text, code = marshal.loads(f.read())
        if tag == _TAG and text == source and isinstance(code, CodeType):
            return code
    except Exception:  # missing, damaged or foreign: compile it
        pass
    code = compile(source, filename, "exec")
    if not sys.dont_write_bytecode:  # PYTHONDONTWRITEBYTECODE, -B: no .pyc, nor these
        _store(path, marshal.dumps((_TAG, source, code)))
        _prune(where)
    return code


#: files kept at most: a source per record type, byte order, rows or dicts, memo on or
#: off (about 240), and a record loop per set of skipped types a caller asked for
MAX_FILES = 1000


def _prune(where: str) -> None:
    """Past ``MAX_FILES``, remove the older half (by last write): bounded on disk."""
    try:
        names = os.listdir(where)
        if len(names) <= MAX_FILES:
            return
        aged = []
        for name in names:
            path = os.path.join(where, name)
            try:
                aged.append((os.stat(path).st_mtime, path))
            except OSError:
                continue
        aged.sort()
        for _, path in aged[:len(aged) // 2]:
            try:
                os.unlink(path)
            except OSError:
                pass
    except OSError:
        pass


def _store(path: str, data: bytes) -> None:
    """Write atomically (another process may read or write the same file meanwhile)."""
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError:
        try:
            os.unlink(tmp)
        except OSError:
            pass


__all__ = ["MAX_FILES", "cache_dir", "compiled", "reset"]
