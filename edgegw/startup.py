"""Start-up failures as one line and exit status 3 (docs/configuration.md, "Exit status").

A service that cannot start -- its port taken, its listen address unknown, a data directory
that is a file or cannot be written -- fails before it is ready.  Trio reports that as an
exception group with a traceback per task; an operator needs one line naming the config
key.  So the CLI first checks what it can check cheaply (``prepare_dir``, ``resolve``), and
turns whatever still fails before the service is ready into one line (``describe``).
A failure after the service was ready is not a start-up error: most are a bug, confined to
the task or connection they happened in.  One kind is neither: a fault outside the service
that it cannot work around, such as the gateway's spool disk failing (``ServiceFailed``).
The service stops with one line and exit status 4, and its service manager starts it
again; what it holds on disk is recovered then (docs/operations.md, "A failing disk").
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import trio

if TYPE_CHECKING:
    from .mounts import Mount

EXIT_CONFIG = 2  # the config is invalid: one line per problem
EXIT_CANNOT_START = 3  # the config is valid, but this machine cannot run it now
EXIT_FAILED = 4  # a running service stopped for a fault outside it (a failing disk)

#: errno values a failed bind() gives: the address or port is the problem
_BIND_ERRORS = {errno.EADDRINUSE, errno.EADDRNOTAVAIL, errno.EACCES, errno.EPERM}


class StartupError(Exception):
    """A service cannot start; ``str()`` is one line, naming the config key."""


class ServiceFailed(Exception):
    """A running service stopped for a fault outside it that it cannot work around (its
    disk failing); ``str()`` is one line, naming the config key and what to do."""


def service_failure(exc: BaseException) -> ServiceFailed | None:
    """The ``ServiceFailed`` that ended a service: ``exc`` itself, or the first one in
    Trio's exception groups around it; None when there is none."""
    if isinstance(exc, ServiceFailed):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = service_failure(inner)
            if found is not None:
                return found
    return None


def damaged_database(key: str, path: Path, exc: BaseException) -> StartupError | None:
    """The StartupError for an SQLite file at ``path`` (under config ``key``) that is
    damaged or no database at all; None for any other error.  Refusing to start is the
    only safe answer (the file holds what was applied: started afresh, the service would
    forget it); the operator decides, with the file kept."""
    import sqlite3

    name = getattr(exc, "sqlite_errorname", "") or ""
    if not (isinstance(exc, sqlite3.DatabaseError)
            and name.startswith(("SQLITE_CORRUPT", "SQLITE_NOTADB"))):
        return None
    return StartupError(f"{key}: {str(path)!r} is damaged ({exc}): stop, keep the file, and "
                        "restore it from a backup or recover it (docs/operations.md, "
                        "\"A damaged database\")")


def prepare_dir(key: str, path: str | Path) -> None:
    """Create the directory ``path`` (the value of config ``key``) if missing and prove it
    is a directory this process can write into; StartupError otherwise."""
    p = Path(path)
    try:
        p.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise StartupError(f"{key}: {str(p)!r} exists and is not a directory") from None
    except OSError as exc:
        raise StartupError(f"{key}: cannot create directory {str(p)!r}: "
                           f"{_reason(exc)}") from None
    # a real write, not os.access: it also sees read-only mounts, quotas and ACLs
    try:
        fd, probe = tempfile.mkstemp(prefix=".edgegw-probe-", dir=p)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise StartupError(f"{key}: cannot write in {str(p)!r}: {_reason(exc)}") from None


def network_warning(mount: Mount, dirs: dict[str, str]) -> str:
    """The warning for directories ``dirs`` (config key -> path) on the network file system
    ``mount``: one line for them all (a spool under the state directory is not news)."""
    named = ", ".join(f"{key}: {path!r}" for key, path in dirs.items())
    return (f"{named} {'is' if len(dirs) == 1 else 'are'} on a network file system "
            f"({mount.fstype} {mount.source} at {mount.point}): SQLite's WAL and the spool's "
            "fsync are not safe there -- a dropped link or a restart of the server can "
            "damage the data or lose what was acknowledged; use a local disk "
            "(docs/operations.md, \"Data directories on a network file system\")")


#: the gauge of the data directories on a network file system (by config key)
_NETWORK_FS_GAUGE = ("data_dir_on_network_fs", "1 for a data directory on a network file "
                     "system (NFS, SMB, ...: not safe for SQLite and the spool), 0 on a local disk")


class _Gauges(Protocol):  # edgegw.metrics.Metrics, which this layer cannot import
    def gauge(self, name: str, help: str = ...) -> Any: ...


async def check_data_dirs(dirs: dict[str, str], metrics: _Gauges) -> set[str]:
    """What a service does at every start, embedded or not: ``warn_network_filesystems``
    (in a thread: it reads the mount table) and the gauge ``edgegw_data_dir_on_network_fs``
    per directory of ``dirs``, 1 for those on a network file system (their keys returned)."""
    remote = await trio.to_thread.run_sync(warn_network_filesystems, dirs)
    gauge = metrics.gauge(*_NETWORK_FS_GAUGE)
    for key in dirs:
        gauge.set(int(key in remote), dir=key)
    return remote


def warn_network_filesystems(dirs: dict[str, str]) -> set[str]:
    """Warn, once per network file system, of the directories of ``dirs`` (config key ->
    path) on one (``mounts.network_dirs``): SQLite and the spool are not safe there.  The
    keys of those directories; blocking (it reads the mount table)."""
    from .mounts import network_dirs

    remote: set[str] = set()
    for mount, keys in network_dirs(dict(dirs)).items():
        logging.getLogger("edgegw").warning(
            "%s", network_warning(mount, {key: str(dirs[key]) for key in keys}))
        remote.update(keys)
    return remote


def resolve(key: str, host: str, port: int) -> None:
    """StartupError unless ``host`` (config ``key``) resolves to an address to listen on."""
    try:
        socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as exc:
        raise StartupError(f"{key}: cannot resolve {host!r}: {_reason(exc)}") from None


def readable(key: str, path: str) -> None:
    """StartupError unless the file ``path`` (config ``key``) can be read."""
    try:
        with open(path, "rb"):
            pass
    except OSError as exc:
        raise StartupError(f"{key}: cannot read {path!r}: {exc.strerror or exc}") from None


class DirectoryInUse(StartupError):
    """Another process holds a data directory's lock (``DirLock``)."""


class DirLock:
    """One process per data directory: an exclusive lock on ``directory/lock``, held from
    ``acquire`` to ``release`` (docs/spool.md, "One gateway per spool").

    Two processes on one gateway spool or one hub data directory each keep their own
    picture of what is stored -- the spool's next sequence number, the hub's applied sets
    -- and act on it: frames numbered twice and dropped as duplicates, frames a hub
    applied recorded as lost by the other, records lost without an error.  So the second
    process must not start.  The lock is the kernel's (``flock``; ``msvcrt.locking`` on
    Windows), not the file's presence: it goes with the process however that ends --
    SIGKILL, a power cut -- so a ``lock`` file left behind means nothing."""

    NAME = "lock"

    def __init__(self, directory: Path, key: str, what: str) -> None:
        self.path = Path(directory) / self.NAME
        self.key = key  # the config key naming the directory, for the message
        self.what = what  # "gateway", "hub": who else may hold it
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock or raise DirectoryInUse at once (never waits: the other process
        may run for months).  Blocking file I/O: from a worker thread in a Trio task."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            _lock(fd)
        except OSError as exc:
            holder = _read_pid(fd)
            os.close(fd)
            if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise
            who = f" (pid {holder})" if holder else ""
            raise DirectoryInUse(
                f"{self.key}: {str(self.path.parent)!r} is in use by another {self.what} "
                f"process{who}; two processes on one directory would lose records -- give "
                f"each {self.what} its own {self.key}") from None
        # the holder's pid, for the message above (informative: the lock is the kernel's;
        # on a full disk the pid may not fit -- the process starts all the same)
        with contextlib.suppress(OSError):
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
        # a byte range lock past the pid, so reading the pid is not blocked
        os.lseek(fd, 64, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
else:
    import fcntl

    def _lock(fd: int) -> None:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)


class HeldLogs(logging.Handler):
    """Log lines written while a service starts are held back (``with HeldLogs() as
    held:``): if it fails to start, its one-line reason is all the operator sees (the lines
    follow with -v); once it is ready (``held.pass_on()``) -- or when the start-up has
    logged a lot -- they are written out, in order."""

    LIMIT = 1000

    def __init__(self) -> None:
        super().__init__()
        self.root = logging.getLogger()
        self.targets: list[logging.Handler] = []
        self.held: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.held.append(record)
        if len(self.held) >= self.LIMIT:
            self.pass_on()

    def __enter__(self) -> HeldLogs:
        self.targets = list(self.root.handlers)
        for h in self.targets:
            self.root.removeHandler(h)
        self.root.addHandler(self)
        return self

    def pass_on(self) -> None:
        if self not in self.root.handlers:
            return
        self.root.removeHandler(self)
        for h in self.targets:
            self.root.addHandler(h)
        for record in self.held:
            for h in self.targets:
                if record.levelno >= h.level:
                    h.handle(record)
        self.held.clear()

    def __exit__(self, kind: object, exc: object, tb: object) -> None:
        if exc is not None and self.root.getEffectiveLevel() >= logging.WARNING:
            self.held.clear()  # a failed start, not verbose: its one line says it
        self.pass_on()


def leaves(exc: BaseException) -> list[BaseException]:
    """The exceptions inside (nested) exception groups, in order."""
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for sub in exc.exceptions for leaf in leaves(sub)]
    return [exc]


def describe(exc: BaseException, listen: tuple[str, str, int] | None = None) -> str:
    """One line for an exception that stopped a service before it was ready.  ``listen``
    is (config keys, host, port) of the service's listening socket: a bind error names
    them."""
    import trio  # only needed here; keeps this module importable without an event loop

    found = [e for e in leaves(exc) if not isinstance(e, trio.Cancelled)] or [exc]
    first = found[0]
    if isinstance(first, StartupError):
        return str(first)
    if (listen is not None and isinstance(first, OSError)
            and first.errno in _BIND_ERRORS and first.filename is None):
        keys, host, port = listen
        return f"{keys}: cannot listen on {host}:{port}: {_reason(first)}"
    if isinstance(first, OSError):
        where = f"{first.filename}: " if first.filename is not None else ""
        return f"{where}{_reason(first)}"
    text = str(first).splitlines()[0] if str(first) else ""
    return f"{type(first).__name__}: {text}" if text else type(first).__name__


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror[0].lower() + exc.strerror[1:]
    return str(exc)


__all__ = [
    "EXIT_CANNOT_START", "EXIT_CONFIG", "EXIT_FAILED", "DirLock", "DirectoryInUse", "HeldLogs",
    "ServiceFailed", "StartupError", "check_data_dirs", "damaged_database", "describe", "leaves",
    "network_warning", "prepare_dir", "readable", "resolve", "service_failure",
    "warn_network_filesystems",
]
