"""A file's new name made durable, on POSIX and where directories cannot be synced.

On POSIX the directory is synced (opened and fsync'ed).  On Windows ``os.open`` of a
directory raises ``PermissionError`` and there is no such call: the step is skipped, never
an error.  The Windows tests below stand that platform in: directories cannot be opened
(as there) and ``DIRECTORY_SYNC`` is off (as ``os.name == "nt"`` sets it); the spool and
the hub's checkpoint then work, because every directory sync goes through ``fsync_dir``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgegw import dirsync
from edgegw.dirsync import DIRECTORY_SYNC, fsync_dir
from edgegw.hub import checkpoint
from edgegw.spool import DiskSpool, SpoolConfig, list_segments


def test_on_posix_the_directory_is_opened_and_synced(tmp_path: Path) -> None:
    assert DIRECTORY_SYNC is (os.name == "posix")
    (tmp_path / "a.tmp").write_bytes(b"x")
    os.replace(tmp_path / "a.tmp", tmp_path / "a")
    fsync_dir(tmp_path)
    fsync_dir(str(tmp_path))
    # it does open the directory: a missing one is an error, not skipped
    with pytest.raises(FileNotFoundError):
        fsync_dir(tmp_path / "missing")


@pytest.fixture
def windows_directories(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Directories behave as on Windows: ``os.open`` refuses them; no directory sync.
    Yields the directories something tried to open."""
    tried: list[str] = []
    real_open = os.open

    def open_as_on_windows(path: object, flags: int, *args: object, **kw: object) -> int:
        if os.path.isdir(path):  # type: ignore[arg-type]
            tried.append(str(path))
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, flags, *args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "open", open_as_on_windows)
    monkeypatch.setattr(dirsync, "DIRECTORY_SYNC", False)
    yield tried


def test_where_directories_cannot_be_synced_the_step_is_skipped(
        tmp_path: Path, windows_directories: list[str]) -> None:
    fsync_dir(tmp_path)
    fsync_dir(tmp_path / "missing")
    assert windows_directories == []


async def test_the_spool_rolls_deletes_and_recovers_segments_without_a_directory_sync(
        tmp_path: Path, windows_directories: list[str]) -> None:
    conf = SpoolConfig(dir=str(tmp_path), segment_bytes=8 << 10, max_bytes=64 << 20)
    bodies = {}
    async with DiskSpool.open(conf) as spool:  # a new epoch: its file written
        for i in range(200):
            body = f"frame {i} ".encode() * 40
            seq = await spool.append(body, 1, {"src": {"offset": i}})
            bodies[seq] = body
        rolled = len(list_segments(tmp_path))
        assert rolled > 5
        spool.ack(100)
        await spool.flush()
        assert len(list_segments(tmp_path)) < rolled  # the oldest segments deleted
    async with DiskSpool.open(conf) as spool:  # recovered from the files
        got = spool.frames_from(1, 1000)
        assert [f.seq for f in got] == list(range(101, 201))
        assert all(f.body == bodies[f.seq] for f in got)
        assert spool.checkpoints["src"] == {"offset": 199}
    assert windows_directories == []


def test_the_hub_checkpoint_is_replaced_without_a_directory_sync(
        tmp_path: Path, windows_directories: list[str]) -> None:
    checkpoint.write_file_sync(tmp_path, b"first")
    checkpoint.write_file_sync(tmp_path, b"second")
    assert (tmp_path / checkpoint.FILE).read_bytes() == b"second"
    assert (tmp_path / checkpoint.PREVIOUS).read_bytes() == b"first"
    assert windows_directories == []
