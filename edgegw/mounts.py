"""Which file system a directory is on, to warn when a data directory is on a network one.

SQLite's WAL mode needs shared memory and POSIX locks that NFS and SMB do not give
faithfully (sqlite.org/wal.html, "WAL does not work over a network filesystem"), and a
network file system may report a write as done before the server has it: the hub's store
and the gateway's spool can be damaged, or lose what they acknowledged, across a dropped
link or a server restart.  The services still start (a floor may have no other disk) but
say so at every start (docs/operations.md, "Data directories on a network file system").

``mount_of`` and ``on_network`` are pure (the mount table's text in, the mounts out);
``network_filesystem`` and ``network_dirs`` read the running system's table (Linux:
/proc/self/mountinfo; Windows: the drive type).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

#: file system types (as the Linux mount table names them) whose data lives on another
#: machine: network and cluster file systems, and FUSE mounts of remote storage
NETWORK_TYPES = frozenset({
    "nfs", "nfs4", "cifs", "smb3", "smbfs", "ncpfs", "afs", "9p", "ceph", "glusterfs",
    "lustre", "gpfs", "beegfs", "ocfs2", "gfs2", "davfs", "fuse.sshfs", "fuse.glusterfs",
    "fuse.s3fs", "fuse.rclone", "fuse.cephfs", "fuse.gcsfuse", "fuse.davfs2",
})


@dataclass(frozen=True, slots=True)
class Mount:
    point: str  # where it is mounted
    fstype: str  # e.g. "ext4", "nfs4"
    source: str  # e.g. "/dev/sda1", "filer:/export/edgegw"

    @property
    def remote(self) -> bool:
        return self.fstype in NETWORK_TYPES


def _unescape(field: str) -> str:
    # the kernel writes space, tab, newline and backslash in paths as octal escapes (\040)
    if "\\" not in field:
        return field
    out: list[str] = []
    i = 0
    while i < len(field):
        digits = field[i + 1:i + 4]
        if field[i] == "\\" and len(digits) == 3 and all(c in "01234567" for c in digits):
            out.append(chr(int(digits, 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def mount_of(path: str, mountinfo: str) -> Mount | None:
    """The mount holding the absolute, resolved ``path``, by the text of a Linux
    /proc/self/mountinfo (its last match, as the kernel stacks mounts; None: none)."""
    found: Mount | None = None
    for line in mountinfo.splitlines():
        fields = line.split(" ")
        try:
            sep = fields.index("-", 6)  # optional fields end with a lone "-"
            point = _unescape(fields[4])
            fstype, source = fields[sep + 1], _unescape(fields[sep + 2])
        except (ValueError, IndexError):
            continue  # not a mount line
        inside = path == point or path.startswith(point.rstrip("/") + "/")
        if inside and (found is None or len(point) >= len(found.point)):
            found = Mount(point, fstype, source)
    return found


def on_network(paths: dict[str, str], mountinfo: str) -> dict[Mount, list[str]]:
    """Of ``paths`` (a name -> an absolute, resolved path), those on a network file
    system, by their mount (the names in their order in ``paths``): a directory under
    another on the same mount is named with it, not told apart."""
    found: dict[Mount, list[str]] = {}
    for name, path in paths.items():
        mount = mount_of(path, mountinfo)
        if mount is not None and mount.remote:
            found.setdefault(mount, []).append(name)
    return found


def _mountinfo() -> str | None:
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return None  # not Linux, or no /proc: nothing to warn about


def network_dirs(paths: dict[str, str | os.PathLike[str]]) -> dict[Mount, list[str]]:
    """``on_network`` for this machine's directories ``paths`` (a name -> a path):
    blocking (it reads the mount table), so from a thread in a Trio program."""
    real = {name: os.path.realpath(path) for name, path in paths.items()}
    if sys.platform == "win32":
        found: dict[Mount, list[str]] = {}
        for name, path in real.items():
            mount = _windows_remote(path)
            if mount is not None:
                found.setdefault(mount, []).append(name)
        return found
    table = _mountinfo()
    return {} if table is None else on_network(real, table)


def network_filesystem(path: str | os.PathLike[str]) -> Mount | None:
    """The network mount ``path`` is on; None when it is local, or cannot be told."""
    return next(iter(network_dirs({"": path})), None)


def _windows_remote(real: str) -> Mount | None:
    if real.startswith("\\\\"):  # a UNC path: \\server\share\...
        share = "\\".join(real.split("\\")[:4])
        return Mount(share, "smb", share)
    import ctypes

    drive = os.path.splitdrive(real)[0] + "\\"
    drive_remote = 4  # GetDriveTypeW's DRIVE_REMOTE: a mapped network drive
    if ctypes.windll.kernel32.GetDriveTypeW(drive) == drive_remote:  # type: ignore[attr-defined]
        return Mount(drive, "smb", drive)
    return None


__all__ = ["NETWORK_TYPES", "Mount", "mount_of", "network_dirs", "network_filesystem",
           "on_network"]
