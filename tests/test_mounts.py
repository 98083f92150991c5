"""A data directory on a network file system is named at start (edgegw.mounts,
docs/operations.md "Data directories on a network file system").

The mount tables below are the format of Linux's /proc/self/mountinfo, lines as real
machines write them (an NFS 4 export, an SMB share, sshfs, a path with a space)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import trio
from hubtools import gateway_config, hub_config

from edgegw.gateway import Gateway
from edgegw.hub import Hub
from edgegw.mounts import Mount, mount_of, network_filesystem, on_network
from edgegw.startup import network_warning, prepare_dir, warn_network_filesystems

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


def test_directories_on_one_network_file_system_are_named_together() -> None:
    """A gateway's spool under its state directory, both on the filer: one warning naming
    both, not two; a share elsewhere is its own; a local directory is not named."""
    dirs = {"gateway.state_dir": "/var/lib/edgegw", "spool.dir": "/var/lib/edgegw/spool",
            "archive": "/mnt/test data/archive", "local": "/var/tmp/x"}
    found = on_network(dirs, TABLE)
    nfs = Mount("/var/lib/edgegw", "nfs4", "filer01:/export/edgegw")
    assert found == {nfs: ["gateway.state_dir", "spool.dir"],
                     Mount("/mnt/test data", "cifs", "//nas/test data"): ["archive"]}
    line = network_warning(nfs, {k: dirs[k] for k in found[nfs]})
    assert line.startswith("gateway.state_dir: '/var/lib/edgegw', spool.dir: "
                           "'/var/lib/edgegw/spool' are on a network file system "
                           "(nfs4 filer01:/export/edgegw at /var/lib/edgegw): ")
    assert "\n" not in line and "use a local disk" in line
    # tmpfs under the filer's mount point is local again
    assert on_network({"cache": "/var/lib/edgegw/cache/x"}, TABLE) == {}


def test_a_local_data_dir_gives_no_warning(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # this machine's own mount table: the test's directory is on a local disk (or tmpfs)
    assert network_filesystem(tmp_path) is None
    prepare_dir("hub.data_dir", tmp_path / "hub")
    with caplog.at_level(logging.WARNING):
        assert warn_network_filesystems({"hub.data_dir": str(tmp_path / "hub")}) == set()
    assert not [r for r in caplog.records if "network file system" in r.getMessage()]


async def test_each_service_says_at_start_whether_its_data_dirs_are_local(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The gauge ``edgegw_data_dir_on_network_fs{dir}`` for every data directory a
    running service (the embedded gateway too: it is ``Gateway.run``) keeps data in: 0
    here, on a local disk, and no warning."""
    hub = Hub(hub_config(tmp_path / "hub"))
    cfg = gateway_config(tmp_path / "gw", 9, spool={"segment_bytes": 1 << 20})
    gateway = Gateway(cfg)
    with caplog.at_level(logging.WARNING):
        async with trio.open_nursery() as nursery:
            await nursery.start(hub.run)
            await nursery.start(gateway.run)
            nursery.cancel_scope.cancel()
    gauge = "edgegw_data_dir_on_network_fs"
    assert f'{gauge}{{dir="hub.data_dir"}} 0' in hub.metrics.render_prometheus()
    page = gateway.metrics.render_prometheus()
    assert f'{gauge}{{dir="gateway.state_dir"}} 0' in page
    assert f'{gauge}{{dir="spool.dir"}} 0' in page
    assert not [r for r in caplog.records if "network file system" in r.getMessage()]
