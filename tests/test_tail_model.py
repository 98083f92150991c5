"""A model-based test of the tail's bounded checkpoint (docs/tail.md, "The checkpoint's
size") under file-system churn and crashes.

A seeded random tester writes STDF lots into a real directory in pieces, finishes them,
renames, touches and deletes them, appends zeros or a whole lot (either byte order, its
FAR right after the MRR: docs/tail.md, "A lot appended to a finished file") to finished
ones, copies in finished lots with old modification times
(``cp -p``), compresses finished lots in place (``gzip``: docs/tail.md, "Compressed in
place" -- the tail perhaps behind on them, running or stopped), and deletes a lot to
create a new one at its inode, under another name or its
own (docs/tail.md, "Inodes are reused"; on ``tmp_path``, on disk: tmpfs never reuses an
inode); between its steps a real ``TailSource`` polls, time passes (``fold_after`` is
small, so finished files leave the checkpoint's list within the run), and the gateway
crashes: a fresh ``TailSource`` resumes from the last checkpoint the sink accepted (as a
durable store gives it back, through JSON).

The invariant: every record of every file the tester wrote, while the gateway ran or while
it was stopped, is emitted exactly once over all runs, in the file's order (each lot
appended to a file as a file of its own).  A file deleted
before the tail read it to its end is checked for "at most once" only (its rest is gone).
The documented exceptions are never generated: a finished file is not changed (touched,
renamed) while the gateway is stopped unless the checkpoint still lists it; no file vanishes
and comes back; no more than ``GONE_KEPT`` files vanish unfinished; ``idle_timeout`` is
long, so a file is complete only at its MRR.

``pytest -q tests/test_tail_model.py`` runs a few fixed seeds (seconds);
``EDGEGW_TAIL_MODEL_SEEDS=500 pytest -q -m slow tests/test_tail_model.py`` runs many more.
A failure names its seed and prints the steps that led to it.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import os
import random
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from test_stdf_tail import expected, no_ts, tail
from test_tail_inode import create_at_inode, wait_past_change_time

from edgegw.records import GatewayEvent, LotStart, PartResult
from edgegw.sim import stdf_file_bytes
from edgegw.sim.tester import TesterProfile
from edgegw.sources import TailSource


@dataclasses.dataclass
class Lot:
    """One tester file as the model knows it."""

    lot_id: str
    data: bytes
    path: Path
    written: int = 0
    deleted: bool = False
    #: bytes appended after its end (after the MRR): zero fill or a lot
    grown: bool = False
    #: zero fill appended after an MRR: not read, and neither is a lot appended after it
    zero_filled: bool = False
    renamed: bool = False
    #: its other names (hard links, in the same directory): one file, read once
    links: list[Path] = dataclasses.field(default_factory=list)
    #: compressed in place: ``path`` is the gzip file now, and it is not changed again
    compressed: bool = False
    #: the lots in the file, ``(lot_id, start)``: its first, then each lot appended after
    #: the MRR of the one before (docs/tail.md, "A lot appended to a finished file"), each
    #: read as a file of its own; ``data`` holds them all
    segments: list[tuple[str, int]] = dataclasses.field(default_factory=list)

    def lots(self) -> list[tuple[str, bytes]]:
        """Each lot in the file and its bytes."""
        ends = [start for _, start in self.segments[1:]] + [len(self.data)]
        return [(lot_id, self.data[start:end])
                for (lot_id, start), end in zip(self.segments, ends, strict=True)]

    @property
    def finished(self) -> bool:
        return self.written == len(self.data)


class Sink:
    """Accepts every put: its records and its checkpoint are durable together."""

    def __init__(self) -> None:
        self.records: list[Any] = []
        self.checkpoint: Any = None

    async def put(self, records: Any, checkpoint: Any = None) -> None:
        self.records.extend(records)
        self.checkpoint = json.loads(json.dumps(checkpoint))  # as a store gives it back


class Model:
    """The tester, the gateway (running or stopped) and what it emitted, driven by a seed."""

    def __init__(self, seed: int, directory: Path, fold_after: float,
                 registry: bool = True) -> None:
        self.rng = random.Random(seed)
        #: the tail keeps its registry of finished files (in ``state``, as the gateway
        #: gives it a directory): a finished file may change while the gateway is stopped
        self.registry = registry
        self.state = directory / "state"
        self.dir = directory / "watched"
        self.dir.mkdir()
        self.trash = directory / "deleted"
        self.trash.mkdir()
        self.fold_after = fold_after
        self.lots: list[Lot] = []
        self.sink = Sink()
        self.source: TailSource | None = None
        self.steps: list[str] = []
        self.names = 0
        self.lot_ids = 0
        #: a file was touched or renamed while the gateway runs and no poll has seen it
        #: yet: a crash now is a change made while it is stopped (docs/tail.md; allowed
        #: with the registry)
        self.unseen_change = False
        #: the running gateway has scanned the directory: it knows every finished file
        #: (a fresh one knows only what its checkpoint lists)
        self.scanned = False

    # -- the gateway --------------------------------------------------------------------------

    def start(self) -> None:
        self.source = tail([self.dir], checkpoint=self.sink.checkpoint,
                           fold_after=self.fold_after, idle_timeout=3600,
                           state_dir=self.state if self.registry else None)
        # what ``run`` does first; the model then calls ``poll_once`` itself, between steps
        self.source._restore(self.source.context.checkpoint)
        self.scanned = False

    async def crash(self) -> None:
        """The gateway stops at once: what it did after its last put is lost."""
        assert self.source is not None
        for f in self.source.files.values():  # (only to close its files)
            await self.source._release(f)
        self.source = None
        self.scanned = False

    async def poll(self) -> None:
        assert self.source is not None
        await self.source.poll_once(self.sink)
        self.scanned = True

    def listed(self, lot: Lot) -> bool:
        """The last durable checkpoint lists the file (so a restart knows it)."""
        cp = self.sink.checkpoint
        return cp is not None and str(lot.path) in cp["files"]

    # -- the tester ---------------------------------------------------------------------------

    def fresh_path(self) -> Path:
        self.names += 1
        return self.dir / f"f{self.names:03}.stdf"

    def lot_bytes(self, byte_order: str = "<") -> tuple[str, bytes]:
        """A new lot id and a whole lot of that id, as the tester writes it."""
        lot_id = f"L{self.lot_ids:03}"
        self.lot_ids += 1
        # (one in five a lot of less than a KiB: its fingerprint covers all of it)
        small = self.rng.random() < 0.2
        profile = TesterProfile(lot_id=lot_id, sites=1 if small else 2,
                                wafer_diameter_dies=1 if small else 4,
                                tests_per_part=1 if small else 2, seed=self.rng.randrange(1000))
        return lot_id, stdf_file_bytes(profile, byte_order=byte_order)

    def new_lot(self) -> Lot:
        lot_id, data = self.lot_bytes()
        lot = Lot(lot_id, data, self.fresh_path(), segments=[(lot_id, 0)])
        self.lots.append(lot)
        return lot

    def write(self, lot: Lot, end: int) -> None:
        with open(lot.path, "ab") as f:
            f.write(lot.data[lot.written:end])
        lot.written = end

    def compress(self, lot: Lot) -> None:
        """``gzip lot.stdf``: the gzip file written whole, given the file's times, and the
        file removed."""
        packed = lot.path.with_name(lot.path.name + ".gz")
        packed.write_bytes(gzip.compress(lot.path.read_bytes()))
        st = lot.path.stat()
        os.utime(packed, ns=(st.st_atime_ns, st.st_mtime_ns))
        lot.path.unlink()
        lot.path, lot.compressed = packed, True

    def grow(self, lot: Lot, n: int) -> None:
        with open(lot.path, "ab") as f:
            f.write(b"\0" * n)
        lot.grown = lot.zero_filled = True

    def alive(self) -> list[Lot]:
        return [lot for lot in self.lots if not lot.deleted]

    def may_change(self, lot: Lot) -> bool:
        """A file may be touched or renamed now without meeting a documented exception: a
        finished file changed while the gateway is stopped is read again unless the
        checkpoint still lists it; so is one changed after a restart before the gateway's
        first scan (it knows the file only from there) -- unless the tail keeps its registry
        of finished files.  A finished file that grew is not renamed: the tail, running or
        restarted, reads a finished file renamed with another size again."""
        return self.registry or self.scanned or not lot.finished or self.listed(lot)

    async def step(self) -> None:
        rng = self.rng
        alive = self.alive()
        unfinished = [lot for lot in alive if not lot.finished]
        changeable = [lot for lot in alive if self.may_change(lot) and not lot.compressed]
        renamable = [lot for lot in changeable if not lot.grown]
        # (removing the name the tail follows a lot by is a rename: not of a grown one)
        unlinkable = [lot for lot in renamable if lot.links]
        # (renamed and grown between two looks is a finished file with another size under
        # another name: read again, running or restarted; so one or the other per lot)
        growable = [lot for lot in alive if lot.finished and not lot.renamed and self.registry
                    and not lot.compressed]
        # (gzip leaves a file with other names alone; a grown one is not compressed)
        compressible = [lot for lot in alive if lot.finished and not lot.compressed
                        and not lot.grown and not lot.links and self.registry]
        # (a lot appended after zero fill no longer follows the MRR: not read, documented)
        extendable = [lot for lot in growable if not lot.zero_filled]
        choices = ["new", "copy_old", "sleep"]
        if unfinished:
            choices += ["append"] * 4
        if changeable:
            choices += ["touch"]
        if renamable:
            choices += ["rename", "rotate"]
        if changeable:
            choices += ["link"]
        if unlinkable:
            choices += ["unlink"]
        if growable:
            choices += ["grow"]
        if extendable:
            choices += ["append_lot"]
        if compressible:
            choices += ["compress"]
        if alive:
            choices += ["delete", "reuse"]
        if self.source is not None:
            choices += ["poll"] * 6 + ([] if self.unseen_change else ["crash"])
        else:
            choices += ["start"] * 2
        action = rng.choice(choices)
        if action == "new":
            lot = self.new_lot()
            end = rng.choice([rng.randrange(1, len(lot.data)), len(lot.data)])
            self.write(lot, end)
            self.steps.append(f"new {lot.path.name} ({lot.lot_id}) bytes 0..{end}"
                              f" of {len(lot.data)}")
        elif action == "copy_old":  # cp -p of a finished lot: its old modification time
            lot = self.new_lot()
            self.write(lot, len(lot.data))
            old = time.time() - rng.choice([1, 60, 86_400 * 30])
            os.utime(lot.path, (old, old))
            self.steps.append(f"copy_old {lot.path.name} ({lot.lot_id})")
        elif action == "append":
            lot = rng.choice(unfinished)
            end = rng.choice([rng.randrange(lot.written, len(lot.data)) + 1, len(lot.data)])
            self.steps.append(f"append {lot.path.name} bytes {lot.written}..{end}")
            self.write(lot, end)
        elif action == "rename":
            lot = rng.choice(renamable)
            new = self.fresh_path()
            self.steps.append(f"rename {lot.path.name} -> {new.name}")
            self.unseen_change = self.source is not None and not self.registry
            lot.path.rename(new)
            lot.path = new
            lot.renamed = True
        elif action == "rotate":  # renamed, and a new lot created under its old name
            lot = rng.choice(renamable)
            new = self.fresh_path()
            old = lot.path
            self.unseen_change = self.source is not None and not self.registry
            old.rename(new)
            lot.path = new
            lot.renamed = True
            rotated = self.new_lot()
            rotated.path = old
            end = rng.choice([rng.randrange(1, len(rotated.data)), len(rotated.data)])
            self.write(rotated, end)
            self.steps.append(f"rotate {old.name} -> {new.name}; new {old.name} "
                              f"({rotated.lot_id}) bytes 0..{end} of {len(rotated.data)}")
        elif action == "link":  # a second name (a hard link): one file still
            lot = rng.choice(changeable)
            new = self.fresh_path()
            self.steps.append(f"link {lot.path.name} -> {new.name}")
            self.unseen_change = self.source is not None and not self.registry
            os.link(lot.path, new)
            lot.links.append(new)
        elif action == "unlink":  # one of its names removed, another stays
            lot = rng.choice(unlinkable)
            names = [lot.path, *lot.links]
            gone = rng.choice(names)
            names.remove(gone)
            self.steps.append(f"unlink {gone.name} (stays: {names[0].name})")
            self.unseen_change = self.source is not None and not self.registry
            gone.unlink()
            lot.path, lot.links = names[0], names[1:]
            lot.renamed = True
        elif action == "grow":  # appended to after its MRR (touched, too, unless grown)
            lot = rng.choice(growable)
            self.steps.append(f"grow {lot.path.name}")
            self.unseen_change = self.source is not None and not self.registry
            self.grow(lot, rng.randrange(1, 9))
        elif action == "append_lot":  # a retest lot appended after its MRR, FAR first
            lot = rng.choice(extendable)
            order = rng.choice("<>")
            lot_id, data = self.lot_bytes(order)
            lot.segments.append((lot_id, len(lot.data)))
            lot.data += data
            # (mostly whole; else in pieces, the FAR perhaps cut: "append" goes on with it)
            end = rng.choice([len(lot.data)] * 2 + [lot.written + rng.randrange(1, len(data))])
            self.steps.append(f"append_lot {lot.path.name} ({lot_id}, byte order {order}) "
                              f"bytes {lot.written}..{end} of {len(lot.data)}")
            self.unseen_change = self.source is not None and not self.registry
            self.write(lot, end)
            lot.grown = True
        elif action == "compress":
            lot = rng.choice(compressible)
            self.steps.append(f"compress {lot.path.name}")
            self.compress(lot)
        elif action == "touch":
            lot = rng.choice(changeable)
            self.steps.append(f"touch {lot.path.name}")
            self.unseen_change = self.source is not None and not self.registry
            if rng.random() < 0.5:
                os.utime(lot.path)
            else:
                lot.path.chmod(0o600 if lot.path.stat().st_mode & 0o044 else 0o644)
        elif action == "delete":
            lot = rng.choice(alive)
            self.steps.append(f"delete {lot.path.name}")
            # (moved out of the directory: "reuse" unlinks)
            lot.path.rename(self.trash / f"{lot.lot_id}.stdf")
            for link in lot.links:
                link.unlink()
            lot.deleted = True
        elif action == "reuse":  # deleted, and a new lot created at its inode
            old = rng.choice(alive)
            lot = self.new_lot()
            if rng.random() < 0.5 and not old.compressed:
                lot.path = old.path
            end = rng.choice([rng.randrange(1, len(lot.data)), len(lot.data)])
            inode = old.path.stat().st_ino
            wait_past_change_time(old.path)
            for link in old.links:  # (its inode is free only once it has no name)
                link.unlink()
            old.path.unlink()
            old.deleted = True
            # (not had when the gateway holds the old file open: a deleted file's inode is
            # freed only once it is closed; then the new lot is just a new file -- after one
            # round of tries, not the rounds a busy machine's inode thieves get)
            held = self.source is not None and any(
                f.inode == inode and f.reader is not None for f in self.source.files.values())
            reused = create_at_inode(lot.path, lot.data[:end], inode, tries=20,
                                     **({"within_s": 0.0} if held else {}))
            lot.written = end
            self.steps.append(f"reuse {old.path.name} -> {lot.path.name} ({lot.lot_id}) bytes"
                              f" 0..{end} of {len(lot.data)}"
                              + (" at its inode" if reused else " (its inode not had)"))
        elif action == "sleep":
            seconds = rng.choice([0.01, 0.05, 0.2])
            self.steps.append(f"sleep {seconds}")
            time.sleep(seconds)
        elif action == "poll":
            self.steps.append("poll")
            await self.poll()
            self.unseen_change = False
        elif action == "crash":
            self.steps.append("crash")
            await self.crash()
        else:
            self.steps.append("start")
            self.start()

    async def finish(self) -> None:
        """The tester finishes every lot; the gateway runs until it has read them all (and,
        restarted once more, reads nothing again)."""
        self.steps.append("finish every lot; run to the end; crash; run again")
        for lot in self.alive():
            self.write(lot, len(lot.data))
        if self.source is None:
            self.start()
        await self.drain()
        await self.crash()
        self.start()
        await self.drain()

    async def drain(self) -> None:
        deadline = time.monotonic() + 10
        last = -1
        quiet = 0
        while quiet < 3 and time.monotonic() < deadline:
            await self.poll()
            quiet = quiet + 1 if len(self.sink.records) == last else 0
            last = len(self.sink.records)
            time.sleep(0.02)
        # past the watermark's reach too: every finished file folds, then one more look
        time.sleep(self.fold_after + 0.15)
        await self.poll()
        await self.poll()

    # -- the invariant ------------------------------------------------------------------------

    def check(self) -> None:
        events = [r for r in self.sink.records if isinstance(r, GatewayEvent)]
        assert not events, f"no file is corrupt: {events}"
        got: dict[str, list[Any]] = {}
        for r in no_ts(self.sink.records):
            got.setdefault(r.lot_id, []).append(r)
        assert set(got) <= {lot_id for lot in self.lots for lot_id, _ in lot.segments}
        for lot in self.lots:
            for lot_id, data in lot.lots():  # each lot in the file as a file of its own
                records = got.get(lot_id, [])
                if not lot.deleted:
                    want = expected(data)
                    assert records == want, (
                        f"{lot_id} ({lot.path.name}): {len(records)} records emitted, "
                        f"{len(want)} expected"
                        + (f"; first difference at {first_difference(records, want)}"))
                else:  # deleted, perhaps before it was read to its end: at most once
                    assert sum(isinstance(r, LotStart) for r in records) <= 1, lot_id
                    parts = Counter((r.head, r.site, r.part_id) for r in records
                                    if isinstance(r, PartResult) and r.part_id)
                    assert not parts or max(parts.values()) == 1, lot_id


def first_difference(a: list[Any], b: list[Any]) -> str:
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return f"{i}: {x!r} != {y!r}"
    return f"{min(len(a), len(b))} (one is a prefix of the other)"


async def run_model(seed: int, directory: Path, *, steps: int, fold_after: float) -> None:
    model = Model(seed, directory, fold_after)
    model.start()
    try:
        for _ in range(steps):
            await model.step()
        await model.finish()
        model.check()
    except BaseException as exc:
        exc.add_note(f"seed {seed}, fold_after {fold_after}, steps:\n  "
                     + "\n  ".join(model.steps))
        raise
    finally:
        if model.source is not None:
            await model.crash()


@pytest.mark.parametrize("change", ["touch", "chmod", "rename"])
async def test_a_finished_file_changed_while_running_is_not_read_again_after_a_crash(
        tmp_path: Path, change: str) -> None:
    """Found by the model below.  A finished file the checkpoint no longer lists (the
    watermark covers it: the last put, of another file, did not list it) is touched,
    chmod-ed or renamed while the gateway runs.  A poll sees the change; no other file has
    records to put then (the tester pauses); the gateway crashes.  The
    checkpoint the sink last took must say the file is finished, or the restart takes it as
    a new file and sends its records again: the poll hands the checkpoint over, without
    records, as soon as it lists such a file again.  (Without the registry of finished
    files, which would recognise it anyway.)"""
    model = Model(0, tmp_path, fold_after=0, registry=False)
    lot = model.new_lot()
    model.write(lot, len(lot.data))
    model.start()
    await model.poll()  # read whole
    time.sleep(0.15)  # past the watermark's reach (fold_after 0, and 0.1 s of clock slack)
    await model.poll()
    await model.poll()
    assert model.source is not None and model.source.checkpoint()["files"] == {}, "folded"
    other = model.new_lot()
    model.write(other, len(other.data) // 2)
    await model.poll()
    assert list(model.sink.checkpoint["files"]) == [str(other.path)]
    if change == "touch":
        os.utime(lot.path)
    elif change == "chmod":
        lot.path.chmod(0o600)
    else:
        new = model.fresh_path()
        lot.path.rename(new)
        lot.path = new
    await model.poll()  # sees the change
    await model.crash()
    model.start()
    await model.poll()
    model.write(other, len(other.data))
    await model.poll()
    model.check()


@pytest.mark.parametrize("seed", range(6))
async def test_every_record_is_emitted_once_under_churn_and_crashes(
        tmp_path: Path, seed: int) -> None:
    """Files written, finished, renamed, touched, deleted, copied in with old times and
    created at deleted ones' inodes, with polls, time passing and crashes between: each
    record once, over all runs."""
    await run_model(seed, tmp_path, steps=100, fold_after=(0.0, 0.05)[seed % 2])


@pytest.mark.slow
async def test_many_seeds(tmp_path: Path) -> None:
    """The long run: ``EDGEGW_TAIL_MODEL_SEEDS`` seeds (200 by default), longer histories."""
    for seed in range(100, 100 + int(os.environ.get("EDGEGW_TAIL_MODEL_SEEDS", "200"))):
        directory = tmp_path / str(seed)
        directory.mkdir()
        await run_model(seed, directory, steps=150, fold_after=(0.0, 0.05)[seed % 2])
