"""The tail reads a tester's files without getting in its way (edgegw.sources.testerfile)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from edgegw.sources import open_shared, pread, pread_seek


@pytest.mark.parametrize("read", [pread, pread_seek], ids=["pread", "portable"])
def test_a_read_at_an_offset_leaves_the_files_position_where_it_was(
        tmp_path: Path, read: object) -> None:
    """The gzip reader checks the bytes behind its point on the descriptor it reads on
    from (``gzpoint.check_of``): that check must not move it.  ``pread_seek`` is what
    Windows, which has no ``os.pread``, uses; it is run here too."""
    path = tmp_path / "lot.stdf"
    path.write_bytes(bytes(range(256)) * 40)
    with open_shared(path) as handle:
        fd = handle.fileno()
        assert handle.read(100) == bytes(range(100))
        at = os.lseek(fd, 0, os.SEEK_CUR)
        assert read(fd, 10, 300) == bytes(range(44, 54))  # type: ignore[operator]
        assert read(fd, 50, 10_220) == bytes(range(236, 256))  # cut at the end
        assert read(fd, 5, 20_000) == b""  # past the end
        assert os.lseek(fd, 0, os.SEEK_CUR) == at
        assert handle.read(3) == bytes(range(100, 103))


def test_a_file_the_tail_holds_open_can_be_renamed_and_deleted(tmp_path: Path) -> None:
    """A tester's lot-end step moves or renames its datalog while the gateway may still
    hold it open.  On Windows that needs FILE_SHARE_DELETE (this runs the Windows code
    there); POSIX never refused it.  The open file still reads to its end."""
    path = tmp_path / "lot.stdf.tmp"
    path.write_bytes(b"FAR" * 100)
    with open_shared(path) as handle:
        assert handle.read(3) == b"FAR"
        moved = path.rename(tmp_path / "lot.stdf")
        assert handle.read(3) == b"FAR"
        moved.unlink()
        assert not moved.exists()
        assert len(handle.read()) == 294
    if sys.platform == "win32":  # the name is free again once the handle is closed
        path.write_bytes(b"again")


def test_a_missing_file_is_file_not_found_naming_it(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as caught:
        open_shared(tmp_path / "gone.stdf")
    assert caught.value.filename == str(tmp_path / "gone.stdf")
