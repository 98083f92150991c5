"""Does data an fsync acknowledged survive ``EXT4_IOC_SHUTDOWN`` and a remount here?

No edgegw code: a thread appends (4 KiB with ``fdatasync``, or a SQLite WAL commit with
``synchronous=FULL``) and notes each acknowledged one; the file system is shut down at a
random moment, unmounted and mounted again (its journal replayed); the last acknowledged
one must be there.  Why ``tests/disktools.shut_down`` syncs before it stops the file system:
with ``EXT4_GOING_FLAGS_NOLOGFLUSH`` (2) this kernel lost the last acknowledged append or
commit in some runs; with the default (0) in none.

    sudo .venv/bin/python scripts/ext4-shutdown-race.py [sqlite|file] [runs] [flag]

Needs root and loop devices.  Prints one line a run and ``lost N of RUNS``.
"""

from __future__ import annotations

import os
import random
import shutil
import sqlite3
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import disktools


def appender(path: Path, mode: str, acked: list[int], stop: threading.Event) -> None:
    """Append until ``stop`` or the first error; ``acked[0]``: the last one acknowledged."""
    i = 0
    if mode == "sqlite":
        db = sqlite3.connect(path / "t.sqlite3", isolation_level=None, check_same_thread=False)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, body BLOB)")
            while not stop.is_set():
                i += 1
                body = os.urandom(random.randint(100, 20000))
                db.execute("INSERT INTO t VALUES (?, ?)", (i, body))
                acked[0] = i
        except sqlite3.Error:
            pass
        finally:
            db.close()
        return
    fd = os.open(path / "f", os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        while not stop.is_set():
            i += 1
            os.write(fd, i.to_bytes(8, "big") * 512)
            os.fdatasync(fd)
            acked[0] = i
    except OSError:
        pass
    finally:
        os.close(fd)


def there(path: Path, mode: str) -> int:
    """How many appends the remounted file system holds."""
    if mode == "sqlite":
        with sqlite3.connect(path / "t.sqlite3") as db:
            return int(db.execute("SELECT COALESCE(MAX(id), 0) FROM t").fetchone()[0])
    return (path / "f").stat().st_size // 4096


def main() -> None:
    mode = sys.argv[1] if len(sys.argv) > 1 else "file"
    runs = int(sys.argv[2]) if len(sys.argv) > 2 else 20
    if len(sys.argv) > 3:
        disktools.GOING_DEFAULT = int(sys.argv[3])  # the flag shut_down passes
    lost = 0
    for run in range(runs):
        base = Path(tempfile.mkdtemp(dir="/var/tmp"))
        try:
            with disktools.ext4_filesystem(base / "fs") as fs:
                acked, stop = [0], threading.Event()
                writer = threading.Thread(target=appender, args=(fs, mode, acked, stop))
                writer.start()
                time.sleep(random.uniform(0.3, 1.5))
                disktools.shut_down(fs)
                time.sleep(0.3)
                stop.set()
                writer.join()
                disktools.remount(fs)
                have = there(fs, mode)
        finally:
            shutil.rmtree(base, ignore_errors=True)
        lost += have < acked[0]
        print(f"{run}: acknowledged {acked[0]}, there {have}"
              f"{'  LOST' if have < acked[0] else ''}", flush=True)
    print(f"lost {lost} of {runs}")


if __name__ == "__main__":
    main()
