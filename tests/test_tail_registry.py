"""The tail's registry of finished files (docs/tail.md, "Finished files changed while
stopped"): a finished file the checkpoint no longer lists (its watermark covers it) that is
touched, chmod-ed, renamed or appended to while the gateway is stopped is recognised after
the restart and not read again; the registry never lets a file go unread whose records
no durable checkpoint covers; it is bounded and pruned.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from test_stdf_tail import expected, no_ts, tail

from edgegw.records import LotStart
from edgegw.sim import stdf_file_bytes
from edgegw.sim.tester import TesterProfile
from edgegw.sources import FinishedFiles, TailSource, recognised

FOLD = 0.15  # past the watermark's reach with fold_after 0 (0.1 s of clock slack)
NUDGE = 900  # lot numbers from here on: lots begun only so that a put hands a checkpoint over


def lot_bytes(n: int) -> bytes:
    return stdf_file_bytes(TesterProfile(lot_id=f"L{n:03}", sites=2, wafer_diameter_dies=4,
                                         tests_per_part=2, seed=n))


class Sink:
    """Every put durable at once, through JSON (as a store gives the checkpoint back); and,
    per put, what the registry file held when the put was made."""

    def __init__(self, state: Path) -> None:
        self.state = state
        self.puts: list[tuple[list[Any], Any, bytes]] = []

    @property
    def records(self) -> list[Any]:
        return [r for records, _, _ in self.puts for r in records]

    @property
    def checkpoint(self) -> Any:
        return self.puts[-1][1] if self.puts else None

    async def put(self, records: Any, checkpoint: Any = None) -> None:
        registry = self.state / "finished.jsonl"
        held = registry.read_bytes() if registry.exists() else b""
        self.puts.append((list(records), json.loads(json.dumps(checkpoint)), held))


def start(directory: Path, state: Path, checkpoint: Any, **config: Any) -> TailSource:
    source = tail([directory], checkpoint=checkpoint, state_dir=state, fold_after=0,
                  idle_timeout=3600, **config)
    source._restore(source.context.checkpoint)  # what ``run`` does first
    return source


async def crash(source: TailSource) -> None:
    for f in source.files.values():
        await source._release(f)


async def read_and_fold(source: TailSource, sink: Sink) -> None:
    """Poll until every file is read and the checkpoint lists no finished file (the
    watermark covers them all), and the sink has taken such a checkpoint: the next put
    hands it over, here that of a lot the tester starts (``NUDGE``, not a finished file)."""
    await source.poll_once(sink)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        time.sleep(FOLD)
        await source.poll_once(sink)
        await source.poll_once(sink)
        if all(not e["done"] for e in source.checkpoint()["files"].values()):
            break
    else:
        raise AssertionError(f"not folded: {source.checkpoint()}")
    directory = Path(source.config.paths[0])
    n = sum(1 for name in os.listdir(directory) if name.startswith("zz"))
    data = lot_bytes(NUDGE + n)
    (directory / f"zz{n}.stdf").write_bytes(data[:len(data) // 2])
    await source.poll_once(sink)
    assert all(not e["done"] for e in sink.checkpoint["files"].values()), sink.checkpoint


def append(path: Path, data: bytes) -> None:
    with open(path, "ab") as f:
        f.write(data)


def lot_ids(records: list[Any]) -> Counter[str]:
    return Counter(r.lot_id for r in records
                   if isinstance(r, LotStart) and int(r.lot_id[1:]) < NUDGE)


def of(records: list[Any], n: int) -> list[Any]:
    return [r for r in no_ts(records) if r.lot_id == f"L{n:03}"]


def change(path: Path, how: str) -> Path:
    if how == "touch":
        os.utime(path)
    elif how == "chmod":
        path.chmod(0o600)
    elif how == "rename":
        new = path.with_name("renamed-" + path.name)
        path.rename(new)
        return new
    else:  # "append": after its MRR
        append(path, b"\0\0\0")
    return path


@pytest.mark.parametrize("when", ["stopped", "before its first poll"])
@pytest.mark.parametrize("how", ["touch", "chmod", "rename", "append"])
async def test_a_finished_file_changed_while_stopped_is_read_once(
        tmp_path: Path, how: str, when: str) -> None:
    """Before the registry: the restart took it for a new file (it changed after the
    watermark, the checkpoint does not list it) and sent its records again."""
    directory, state = tmp_path / "watched", tmp_path / "state"
    directory.mkdir()
    data = lot_bytes(1)
    path = directory / "lot1.stdf"
    path.write_bytes(data)
    sink = Sink(state)
    source = start(directory, state, None)
    await read_and_fold(source, sink)
    assert of(sink.records, 1) == expected(data)
    await crash(source)
    if when == "stopped":
        path = change(path, how)
    source = start(directory, state, sink.checkpoint)
    if when != "stopped":  # the gateway started, and has not looked yet
        path = change(path, how)
    for _ in range(3):
        await source.poll_once(sink)
    assert of(sink.records, 1) == expected(data), "read once"
    # handed over finished: listed again, or -- when the restart's first poll came more
    # than the clock slack after the change -- already under the watermark handed over
    st = path.stat()
    listed = sink.checkpoint["files"].get(str(path))
    assert (listed is not None and listed["done"]) or (
        sink.checkpoint["finished_before"] >= max(st.st_mtime_ns, st.st_ctime_ns)), (
        "listed again, finished, or under the watermark: handed over")
    # and once more: a restart from there reads nothing again either
    await crash(source)
    source = start(directory, state, sink.checkpoint)
    await read_and_fold(source, sink)
    assert of(sink.records, 1) == expected(data)
    await crash(source)


async def test_an_append_is_treated_as_by_the_running_tail(tmp_path: Path) -> None:
    """The running tail does not read a finished file that grows (it logs it), and reads a
    finished file renamed with another size from its start (its inode may hold a new
    file): a restart does the same for the same changes made while it was stopped."""
    directory, state = tmp_path / "watched", tmp_path / "state"
    directory.mkdir()
    grown, moved = directory / "grown.stdf", directory / "moved.stdf"
    grown.write_bytes(lot_bytes(1))
    moved.write_bytes(lot_bytes(2))
    sink = Sink(state)
    source = start(directory, state, None)
    await read_and_fold(source, sink)
    await crash(source)
    change(grown, "append")
    change(change(moved, "rename"), "append")
    source = start(directory, state, sink.checkpoint)
    await read_and_fold(source, sink)
    await crash(source)
    stopped = lot_ids(sink.records)
    assert stopped == {"L001": 1, "L002": 2}

    directory2, state2 = tmp_path / "watched2", tmp_path / "state2"  # the same, running
    directory2.mkdir()
    grown, moved = directory2 / "grown.stdf", directory2 / "moved.stdf"
    grown.write_bytes(lot_bytes(1))
    moved.write_bytes(lot_bytes(2))
    sink2 = Sink(state2)
    source = start(directory2, state2, None)
    await read_and_fold(source, sink2)
    change(grown, "append")
    change(change(moved, "rename"), "append")
    await read_and_fold(source, sink2)
    await crash(source)
    assert lot_ids(sink2.records) == stopped


def registry_holds(held: bytes, directory: Path, tmp: Path) -> dict[int, Any]:
    (tmp / "held.jsonl").write_bytes(held)
    entries = FinishedFiles(str(tmp / "held.jsonl"), 1000)
    entries.load()
    return dict(entries.entries)


class LaggingSink(Sink):
    """Puts after the first ``durable`` ones are taken but never become durable (the
    gateway crashes before their frames are on disk); and every durable put is checked:
    a finished file its checkpoint neither lists nor leaves to be read (it changed at or
    before its watermark) has its entry on disk already."""

    def __init__(self, state: Path, directory: Path, durable: int) -> None:
        super().__init__(state)
        self.directory = directory
        self.durable = durable
        self.taken = 0

    async def put(self, records: Any, checkpoint: Any = None) -> None:
        self.taken += 1
        if self.taken > self.durable:
            return
        await super().put(records, checkpoint)
        held = registry_holds(self.puts[-1][2], self.directory, self.state.parent)
        for path in self.directory.iterdir():
            st = path.stat()
            if (str(path) not in checkpoint["files"]
                    and max(st.st_mtime_ns, st.st_ctime_ns) <= checkpoint["finished_before"]):
                assert st.st_ino in held, f"{path.name} dropped before its entry was written"


async def history(directory: Path, sink: Sink, lots: dict[str, bytes]) -> TailSource:
    """Lots written in two pieces, each finished and folded into the watermark in turn."""
    source = start(directory, sink.state, None)
    for name, data in lots.items():
        (directory / name).write_bytes(data[:len(data) // 2])
        await source.poll_once(sink)
        append(directory / name, data[len(data) // 2:])
        await source.poll_once(sink)
        time.sleep(FOLD)
        await source.poll_once(sink)
        await source.poll_once(sink)
    return source


async def test_a_crash_at_any_put_neither_loses_nor_repeats(tmp_path: Path) -> None:
    """The history above, with the crash after each put in turn: the durable checkpoint
    and records are those of the puts so far, while the tail went on (and wrote registry
    entries, ahead of any durable checkpoint, for the files it read after it).  Every lot
    is then touched, and one renamed, while the gateway is stopped; the restart runs to the
    end.  Each lot's records: exactly once -- entries whose files' records no durable
    checkpoint covers are not relied on, and no durable checkpoint stops listing a file
    before its entry is on disk (checked at every put)."""
    lots = {f"lot{n}.stdf": lot_bytes(n) for n in range(3)}
    whole = Sink(tmp_path / "state")
    (tmp_path / "watched").mkdir()
    await crash(await history(tmp_path / "watched", whole, lots))
    for k in range(len(whole.puts) + 1):
        directory, state = tmp_path / f"w{k}", tmp_path / f"s{k}"
        directory.mkdir()
        sink = LaggingSink(state, directory, durable=k)
        await crash(await history(directory, sink, lots))
        assert sink.taken == len(whole.puts)
        for name in lots:
            os.utime(directory / name)
        change(directory / "lot0.stdf", "rename")
        source = start(directory, state, sink.checkpoint)
        sink.durable = 1 << 30
        await read_and_fold(source, sink)
        await crash(source)
        assert lot_ids(sink.records) == {f"L{n:03}": 1 for n in range(len(lots))}, k
        for n, data in enumerate(lots.values()):
            assert of(sink.records, n) == expected(data), (k, n)


def test_the_decision() -> None:
    """``recognised``: the registry's entry, the file as found (path, size), whether its
    first bytes match the entry's head, the durable checkpoint's watermark."""
    entry = FinishedFiles("/nonexistent/finished.jsonl", 10)
    entry.add(7, "/d/a.stdf", (1024, 99), 5000, changed=100)
    e = entry.get(7)
    assert recognised(e, "/d/a.stdf", 5000, True, 100) == "unchanged"  # touched, chmod-ed
    assert recognised(e, "/d/b.stdf", 5000, True, 100) == "unchanged"  # renamed
    assert recognised(e, "/d/a.stdf", 5001, True, 100) == "grew"  # appended to
    assert recognised(e, "/d/b.stdf", 5001, True, 100) is None  # renamed and grown
    assert recognised(e, "/d/a.stdf", 4999, True, 100) is None  # shorter
    assert recognised(e, "/d/a.stdf", 5000, False, 100) is None  # another file, its inode
    assert recognised(e, "/d/a.stdf", 5000, None, 100) is None  # first bytes not read
    assert recognised(e, "/d/a.stdf", 5000, True, 99) is None  # not durable yet
    assert recognised(None, "/d/a.stdf", 5000, True, 100) is None
    # the same file registered again (renamed, say) keeps the time it was finished since
    entry.add(7, "/d/b.stdf", (1024, 99), 5000, changed=200)
    assert entry.get(7) is not None and entry.get(7).since == 100  # type: ignore[union-attr]
    # ... also with an earlier change time (touched once the clock was set back): a
    # durable checkpoint whose watermark lies between the two need not cover its records
    # (test_clock_steps.py::test_a_finished_file_touched_after_the_clock_was_set_back_...)
    entry.add(7, "/d/c.stdf", (1024, 99), 5000, changed=50)
    assert entry.get(7).since == 100  # type: ignore[union-attr]
    entry.add(7, "/d/b.stdf", (1024, 11), 5000, changed=300)  # another file at the inode
    assert entry.get(7).since == 300  # type: ignore[union-attr]


def test_the_log_survives_a_torn_write_and_is_compacted(tmp_path: Path) -> None:
    path = tmp_path / "finished.jsonl"
    reg = FinishedFiles(str(path), 1000)
    for i in range(100):
        reg.add(i, f"/d/{i}", (1024, i), 10, changed=i)
    reg.flush()
    for i in range(90):
        reg.remove(i)
    reg.flush()
    assert len(path.read_text().splitlines()) == 10, "rewritten once mostly removals"
    with open(path, "ab") as f:
        f.write(b'[1000, "/d/x", 10')  # a crash in the middle of an append
    again = FinishedFiles(str(path), 1000)
    again.load()
    assert sorted(again.entries) == list(range(90, 100))
    again.add(5, "/d/5", (1024, 5), 10, changed=5)
    again.flush()  # rewritten: the torn line does not swallow the next append
    last = FinishedFiles(str(path), 1000)
    last.load()
    assert sorted(last.entries) == [5, *range(90, 100)]


async def test_bounded_and_pruned(tmp_path: Path) -> None:
    """At most ``finished_kept`` entries, the oldest forgotten (such a file changed while
    the gateway is stopped is read again, as before the registry); an entry goes with its
    file, deleted while the gateway runs or while it is stopped; a checkpoint lists at most
    a few finished files waiting for their entries while many files are read at once."""
    directory, state = tmp_path / "watched", tmp_path / "state"
    directory.mkdir()
    lots = [lot_bytes(n) for n in range(40)]
    for n, data in enumerate(lots):
        (directory / f"lot{n:02}.stdf").write_bytes(data)
    time.sleep(FOLD)
    sink = Sink(state)
    source = start(directory, state, None, finished_kept=30)
    await read_and_fold(source, sink)
    assert max(len(cp["files"]) for _, cp, _ in sink.puts) <= 20
    held = registry_holds((state / "finished.jsonl").read_bytes(), directory, tmp_path)
    assert 27 <= len(held) <= 30
    (directory / "lot39.stdf").unlink()  # while running
    await read_and_fold(source, sink)
    await crash(source)
    (directory / "lot38.stdf").unlink()  # while stopped
    held = registry_holds((state / "finished.jsonl").read_bytes(), directory, tmp_path)
    inodes = {}
    for n in range(38):
        path = directory / f"lot{n:02}.stdf"
        inodes[n] = path.stat().st_ino
        os.utime(path)
    source = start(directory, state, sink.checkpoint, finished_kept=30)
    await read_and_fold(source, sink)
    await crash(source)
    forgotten = {n for n in range(38) if inodes[n] not in held}
    assert forgotten and len(held) <= 30
    assert lot_ids(sink.records) == {f"L{n:03}": 2 if n in forgotten else 1
                                     for n in range(40)}, "forgotten ones read again"
    held = registry_holds((state / "finished.jsonl").read_bytes(), directory, tmp_path)
    assert set(held) <= set(inodes.values()), "the deleted files' entries are gone"


async def test_through_the_gateway_a_crash_after_any_frame_then_every_file_touched(
        tmp_path: Path) -> None:
    """The gateway gives the tail its state directory (``<state_dir>/sources/<name>``):
    finished files folded into the watermark at once (``fold_after = 0``), the crash image
    taken after every frame (the spool and the registry as they were then); every file is
    touched, and one appended to, while the gateway is stopped.  The restart stores each
    record once, whatever frame the crash followed (before the registry: every file the
    durable checkpoint had folded was stored again)."""
    import shutil

    import trio
    from hubtools import gateway_config
    from test_exactly_once import (
        Snapshots,
        stored_checkpoints,
        tail_source,
        tail_until_read,
        tailed_records,
    )

    files = tmp_path / "stdf"
    files.mkdir()
    paths = [files / f"lot{i:02}.stdf" for i in range(8)]
    for n, path in enumerate(paths):
        path.write_bytes(lot_bytes(n))
    time.sleep(FOLD)

    def cfg(state: Path, spool_dir: Path) -> Any:
        return gateway_config(state, 1, sources=[{"name": "tail", "type": "tail",
                                                  "paths": [str(files)], "fold_after": 0,
                                                  "poll_interval": 0.01, "read_size": 4096}],
                              batch={"max_records": 97, "max_delay_ms": 5},
                              spool={"dir": str(spool_dir)})

    class WithRegistry(Snapshots):
        """The spool image, and the tail's state directory beside it, after each frame."""

        async def append(self, body: bytes, n_records: int,
                         checkpoints: dict[str, Any]) -> int:
            seq = await super().append(body, n_records, checkpoints)
            state = tmp_path / "gw" / "sources" / "tail"
            if seq in self.at and state.exists():
                await trio.to_thread.run_sync(shutil.copytree, state,
                                              self.images / f"{seq}.state")
            return seq

    first = cfg(tmp_path / "gw", tmp_path / "spool")
    assert first.spool is not None
    images = tmp_path / "images"
    await tail_until_read(first, paths)  # (a clean run, for what is stored)
    whole = await tailed_records(tmp_path / "spool")
    shutil.rmtree(tmp_path / "spool")
    shutil.rmtree(tmp_path / "gw")
    # again, the images taken; and on until the folded checkpoint is stored: the first
    # file is ended, so a put of a new file hands it over
    from edgegw.gateway import Gateway

    gateway = Gateway(first, store=WithRegistry(first.spool, set(range(1, 200)), images))
    nudge = lot_bytes(NUDGE)
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(gateway.run)
            tail = tail_source(gateway)
            while not (len(tail.files) >= len(paths)
                       and all(f.done for f in tail.files.values())):
                await trio.sleep(0.01)
            time.sleep(FOLD)
            (files / "zz.stdf").write_bytes(nudge[:len(nudge) // 2])
            while True:
                stored = (gateway.store.checkpoints.get("tail") or {}).get("files") or {}
                if str(files / "zz.stdf") in stored and not any(
                        e["done"] for e in stored.values()):
                    break
                await trio.sleep(0.01)
            await gateway.flush()
            nursery.cancel_scope.cancel()
    (files / "zz.stdf").unlink()
    assert (tmp_path / "gw" / "sources" / "tail" / "finished.jsonl").exists()
    for path in paths:
        os.utime(path)
    append(paths[0], b"\0\0")
    crashes = sorted((p for p in images.iterdir() if p.name.isdigit()),
                     key=lambda p: int(p.name))
    assert len(crashes) >= 3
    folded = 0
    for image in crashes:
        listed = ((await stored_checkpoints(image)).get("tail") or {}).get("files") or {}
        folded += any(str(p) not in listed and f"{image.name}.state" in os.listdir(images)
                      for p in paths)
        state = tmp_path / f"gw{image.name}"
        if (images / f"{image.name}.state").exists():
            shutil.copytree(images / f"{image.name}.state", state / "sources" / "tail")
        await tail_until_read(cfg(state, image), paths)
        got = [r for r in await tailed_records(image) if int(r.lot_id[1:]) < NUDGE]
        assert got == whole, f"a crash after frame {image.name}"
    assert folded, "some crash follows a checkpoint that does not list some finished file"


async def test_a_directory_missing_at_the_restart_keeps_its_files_entries(
        tmp_path: Path) -> None:
    """A watched directory not there at the first poll after a restart (a file server
    mounted late) is not taken for its files deleted: their entries stay, and a file of it
    changed meanwhile is not read again when it is back.  A file deleted from a directory
    that is there loses its entry."""
    state = tmp_path / "state"
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir()
    two.mkdir()
    (one / "a.stdf").write_bytes(lot_bytes(1))
    (one / "b.stdf").write_bytes(lot_bytes(2))
    (two / "c.stdf").write_bytes(lot_bytes(3))
    sink = Sink(state)
    source = tail([one, two], state_dir=state, fold_after=0, idle_timeout=3600)
    source._restore(None)
    await read_and_fold(source, sink)
    await crash(source)
    inodes = {p.name: p.stat().st_ino for p in (one / "a.stdf", one / "b.stdf", two / "c.stdf")}
    (one / "b.stdf").unlink()
    two.rename(tmp_path / "unmounted")
    os.utime(tmp_path / "unmounted" / "c.stdf")
    source = tail([one, two], checkpoint=sink.checkpoint, state_dir=state, fold_after=0,
                  idle_timeout=3600)
    source._restore(source.context.checkpoint)
    await source.poll_once(sink)
    held = registry_holds((state / "finished.jsonl").read_bytes(), one, tmp_path)
    assert inodes["c.stdf"] in held and inodes["a.stdf"] in held
    assert inodes["b.stdf"] not in held
    (tmp_path / "unmounted").rename(two)
    await read_and_fold(source, sink)
    await crash(source)
    assert lot_ids(sink.records) == {"L001": 1, "L002": 1, "L003": 1}


async def read_and_fold_lagging(source: TailSource, sink: Sink) -> None:
    """``read_and_fold``, whatever the sink took."""
    for _ in range(2):
        await source.poll_once(sink)
        time.sleep(FOLD)
        await source.poll_once(sink)
    directory = Path(source.config.paths[0])
    n = sum(1 for name in os.listdir(directory) if name.startswith("zz"))
    (directory / f"zz{n}.stdf").write_bytes(lot_bytes(NUDGE + n)[:500])
    await source.poll_once(sink)


#: a whole lot (FAR to MRR) shorter than a KiB: its fingerprint covers all of it
SMALL = stdf_file_bytes(TesterProfile(lot_id="L000", sites=1, wafer_diameter_dies=1,
                                      tests_per_part=1, seed=1))


@pytest.mark.parametrize("grows_by", [100, 1000], ids=["to under a KiB", "past a KiB"])
async def test_a_small_finished_file_that_grows_is_read_once_whatever_put_a_crash_follows(
        tmp_path: Path, grows_by: int) -> None:
    """A finished lot of less than a KiB (its fingerprint covers all of it) appended to
    after its MRR while the gateway runs: logged, not read.  Its fingerprint was taken
    again over the grown start and its entry written anew, as a new file's -- relied on
    only by a checkpoint whose watermark passed the growth: a crash before such a
    checkpoint was durable read the lot again.  Now its fingerprint stays the one of what
    was read, and the lot is read once whatever put the crash follows (the lot touched
    while the gateway is stopped, too)."""
    assert len(SMALL) < 1024
    whole = Sink(tmp_path / "state")
    (tmp_path / "watched").mkdir()

    async def run(directory: Path, sink: Sink) -> None:
        source = start(directory, sink.state, None)
        (directory / "small.stdf").write_bytes(SMALL)
        await read_and_fold_lagging(source, sink)
        append(directory / "small.stdf", b"\0" * grows_by)
        await read_and_fold_lagging(source, sink)
        await crash(source)

    await run(tmp_path / "watched", whole)
    assert lot_ids(whole.records) == {"L000": 1}
    for k in range(len(whole.puts) + 1):
        directory, state = tmp_path / f"w{k}", tmp_path / f"s{k}"
        directory.mkdir()
        sink = LaggingSink(state, directory, durable=k)
        await run(directory, sink)
        os.utime(directory / "small.stdf")
        source = start(directory, state, sink.checkpoint)
        sink.durable = 1 << 30
        await read_and_fold(source, sink)
        await crash(source)
        assert lot_ids(sink.records) == {"L000": 1}, f"a crash after put {k}"


async def test_a_small_finished_file_grown_while_stopped_is_read_once_whatever_put_a_crash_follows(
        tmp_path: Path) -> None:
    """The same lot appended to while the gateway is stopped: the restart recognises it
    (grown since), and a crash after any of the restart's puts, the lot touched before the
    next start, does not read it again (its entry was written anew, as a new file's, once
    its fingerprint had been taken again over the grown start)."""
    directory, state = tmp_path / "watched", tmp_path / "state"
    directory.mkdir()
    first = Sink(state)
    source = start(directory, state, None)
    (directory / "small.stdf").write_bytes(SMALL)
    await read_and_fold(source, first)
    await crash(source)
    append(directory / "small.stdf", b"\0" * 100)
    registry = (state / "finished.jsonl").read_bytes()
    for k in range(6):
        (state / "finished.jsonl").write_bytes(registry)
        sink = LaggingSink(state, directory, durable=k)
        sink.puts = list(first.puts)
        source = start(directory, state, first.checkpoint)
        await read_and_fold_lagging(source, sink)
        await crash(source)
        os.utime(directory / "small.stdf")
        source = start(directory, state, sink.checkpoint)
        sink.durable = 1 << 30
        await read_and_fold_lagging(source, sink)
        await crash(source)
        assert lot_ids(sink.records) == {"L000": 1}, f"a crash after put {k}"
        for name in os.listdir(directory):
            if name.startswith("zz"):
                (directory / name).unlink()

