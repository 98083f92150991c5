"""A data directory on a network file system is named at start (edgegw.mounts,
docs/operations.md "Data directories on a network file system").

The mount tables below are the format of Linux's /proc/self/mountinfo, lines as real
machines write them (an NFS 4 export, an SMB share, sshfs, a path with a space)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from edgegw.mounts import mount_of, network_filesystem
from edgegw.startup import prepare_dir

TABLE = r"""22 27 0:21 / /proc rw,relatime - proc proc rw
27 1 259:1 / / rw,relatime shared:1 - ext4 /dev/nvme0n1p2 rw,errors=remount-ro
30 27 259:2 / /var rw,relatime shared:5 - xfs /dev/nvme0n1p3 rw,attr2,inode64
41 30 0:45 / /var/lib/edgegw rw,relatime shared:27 - nfs4 filer01:/export/edgegw rw,vers=4.2,hard
42 27 0:46 / /mnt/test\040data rw,relatime shared:28 - cifs //nas/test\040data rw,vers=3.1.1
43 27 0:47 / /home/ate/remote rw,relatime shared:29 - fuse.sshfs ate@host:/data rw
44 30 0:48 / /var/lib/edgegw/cache rw,relatime shared:30 - tmpfs tmpfs rw,size=1024k
"""


def test_the_deepest_mount_holding_a_path_is_its_file_system() -> None:
    nfs = mount_of("/var/lib/edgegw/hub", TABLE)
    assert nfs is not None and (nfs.point, nfs.fstype, nfs.source) == (
        "/var/lib/edgegw", "nfs4", "filer01:/export/edgegw")
    assert nfs.remote
    assert mount_of("/var/lib/edgegw", TABLE) == nfs  # the mount point itself
    local = mount_of("/var/lib/edgegw/cache/x", TABLE)  # a local mount inside the export
    assert local is not None and local.fstype == "tmpfs" and not local.remote
    var = mount_of("/var/lib/edgegw-other", TABLE)  # a sibling name, not inside the export
    assert var is not None and (var.point, var.fstype, var.remote) == ("/var", "xfs", False)
    root = mount_of("/opt/edgegw", TABLE)
    assert root is not None and (root.point, root.fstype) == ("/", "ext4")


def test_smb_and_sshfs_are_network_file_systems_and_escaped_paths_are_read() -> None:
    smb = mount_of("/mnt/test data/spool", TABLE)  # the kernel writes the space as \040
    assert smb is not None and smb.remote
    assert (smb.point, smb.fstype, smb.source) == ("/mnt/test data", "cifs", "//nas/test data")
    assert mount_of("/mnt/test", TABLE) == mount_of("/", TABLE)
    sshfs = mount_of("/home/ate/remote/state", TABLE)
    assert sshfs is not None and sshfs.remote and sshfs.fstype == "fuse.sshfs"


def test_a_mount_over_another_at_the_same_point_is_the_one_in_effect() -> None:
    stacked = TABLE + "45 41 0:49 / /var/lib/edgegw rw - ext4 /dev/sdb1 rw\n"
    top = mount_of("/var/lib/edgegw/hub", stacked)
    assert top is not None and (top.fstype, top.remote) == ("ext4", False)


def test_lines_that_are_not_mounts_are_skipped() -> None:
    assert mount_of("/srv", "garbage\n\n1 2 3\n") is None
    odd = mount_of("/srv/x", "garbage\n50 1 0:1 / /srv rw - nfs srv:/ rw\n")
    assert odd is not None and odd.remote


def test_a_local_data_dir_starts_without_a_warning(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # this machine's own mount table: the test's directory is on a local disk (or tmpfs)
    assert network_filesystem(tmp_path) is None
    with caplog.at_level(logging.WARNING):
        prepare_dir("hub.data_dir", tmp_path / "hub")
    assert not [r for r in caplog.records if "network file system" in r.getMessage()]
