"""A lot appended to a finished STDF file (docs/tail.md, "Appending to a finished file"):
a file complete at its MRR that grows, the bytes after that MRR beginning with a whole FAR
(either byte order), is read on from there as its next lot -- running or after a restart,
grown while the gateway ran, was stopped or crashed -- and each of its records is sent
exactly once.  Any other growth (zero fill, a text trailer), and the growth of a file
complete by ``idle_timeout``, is logged and not read, as before.

Before: every such lot was logged "grew after it was complete" and lost.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import pytest
from test_stdf_tail import expected, tail
from test_tail_registry import (
    FOLD,
    LaggingSink,
    Sink,
    append,
    crash,
    lot_ids,
    of,
    read_and_fold,
    read_and_fold_lagging,
)

from edgegw.records import RawRecord
from edgegw.sim import stdf_file_bytes
from edgegw.sim.tester import TesterProfile
from edgegw.sources import TailSource
from edgegw.stdf import StdfWriter


def lot(n: int, order: str = "<") -> bytes:
    return stdf_file_bytes(TesterProfile(lot_id=f"L{n:03}", sites=2, wafer_diameter_dies=4,
                                         tests_per_part=2, seed=n), byte_order=order)


def start(directory: Path, state: Path, checkpoint: Any, **config: Any) -> TailSource:
    config.setdefault("fold_after", 0)
    source = tail([directory], checkpoint=checkpoint, state_dir=state, idle_timeout=3600,
                  **config)
    source._restore(source.context.checkpoint)  # what ``run`` does first
    return source


async def polls(source: TailSource, sink: Sink, n: int = 3) -> None:
    for _ in range(n):
        await source.poll_once(sink)


def each_once(sink: Sink, lots: dict[int, bytes]) -> None:
    assert lot_ids(sink.records) == {f"L{n:03}": 1 for n in lots}
    for n, data in lots.items():
        assert of(sink.records, n) == expected(data), f"lot {n}: as a file of its own"


async def read_the_first_lot(directory: Path, state: Path, path: Path, sink: Sink, when: str,
                             first: bytes) -> Any:
    """A tail reads ``path``, its first lot whole: to its MRR's end (the file finished,
    still in the checkpoint) or, ``when`` ending "folded", past the watermark (the
    registry of finished files knows it).  -> the tail."""
    folded = when.endswith("folded")
    source = start(directory, state, None, fold_after=0 if folded else 3600)
    if folded:
        await read_and_fold(source, sink)
    else:
        await polls(source, sink)
        entry = sink.checkpoint["files"][str(path)]
        assert entry["done"] and entry["end"] == len(first)
    assert of(sink.records, 1) == expected(first)
    return source



@pytest.mark.parametrize("order", ["<", ">"], ids=["little-endian", "big-endian"])
@pytest.mark.parametrize("when", ["running, listed", "running, folded", "stopped, listed",
                                  "stopped, folded"])
async def test_a_lot_appended_to_a_finished_file_is_read_once(
        tmp_path: Path, when: str, order: str) -> None:
    """The first lot read to its MRR and complete; the second appended later, in either
    byte order: while the checkpoint still lists the file (finished) or after its watermark
    took it (the registry of finished files then knows where its MRR ended), while the tail
    runs or while it is stopped.  Both lots sent once, each as a file of its own; a
    restart after that reads nothing again."""
    directory, state = tmp_path / "watched", tmp_path / "state"
    directory.mkdir()
    first, second = lot(1), lot(2, order)
    path = directory / "retest.stdf"
    path.write_bytes(first)
    sink = Sink(state)
    source = await read_the_first_lot(directory, state, path, sink, when, first)
    if when.startswith("stopped"):
        await crash(source)
        append(path, second)
        source = start(directory, state, sink.checkpoint,
                       fold_after=0 if when.endswith("folded") else 3600)
    else:
        append(path, second)
    await polls(source, sink)
    each_once(sink, {1: first, 2: second})
    entry = sink.checkpoint["files"].get(str(path))
    assert entry is None or (entry["done"] and entry["end"] == len(first) + len(second))
    await crash(source)
    source = start(directory, state, sink.checkpoint)
    await read_and_fold(source, sink)
    await crash(source)
    each_once(sink, {1: first, 2: second})


def notes(what: str, order: str = "<") -> bytes:
    """What a merge tool or tester writes after a lot's MRR: a DTR (a comment), a GDR (an
    end-of-lot note), or both -- types the mapper does not read."""
    w = StdfWriter(order)
    dtr = w.encode("DTR", {"TEXT_DAT": "end of lot: merged by ate-merge 2.1"})
    gdr = w.encode("GDR", {"GEN_DATA": [(10, "LOT_END_NOTE"), (5, 3), (10, "retest next")]})
    return {"DTR": dtr, "GDR": gdr, "DTR, GDR": dtr + gdr}[what]


@pytest.mark.parametrize("what", ["DTR", "GDR", "DTR, GDR"])
@pytest.mark.parametrize("written", ["with the MRR", "with the next lot"])
@pytest.mark.parametrize("when", ["running", "stopped, folded"])
async def test_a_lot_appended_after_a_dtr_or_gdr_that_follows_the_mrr_is_read_once(
        tmp_path: Path, what: str, written: str, when: str,
        caplog: pytest.LogCaptureFixture) -> None:
    """A DTR or GDR between an MRR and the next lot's FAR is passed over within one read
    (docs/tail.md, "A file holding several lots"), and so it is when the lot is appended
    later: written right after the MRR (read with it) or with the next lot, running or
    after a restart (the registry's ``end``: the MRR's).  Both lots sent once, each as a
    file of its own (the notes are not the lots' data); nothing logged as lost growth.
    Before: the appended lot was lost ("grew after it was complete")."""
    directory, state = tmp_path / "watched", tmp_path / "state"
    directory.mkdir()
    first, second = lot(1), lot(2)
    path = directory / "retest.stdf"
    path.write_bytes(first + (notes(what) if written == "with the MRR" else b""))
    sink = Sink(state)
    source = await read_the_first_lot(directory, state, path, sink, when, first)
    appended = (notes(what) if written == "with the next lot" else b"") + second
    if when.startswith("stopped"):
        await crash(source)
        append(path, appended)
        source = start(directory, state, sink.checkpoint, fold_after=0)
    else:
        append(path, appended)
    await polls(source, sink)
    each_once(sink, {1: first, 2: second})
    assert not any("grew after it was complete" in r.getMessage() for r in caplog.records)
    entry = sink.checkpoint["files"].get(str(path))
    size = len(first) + len(notes(what)) + len(second)
    assert entry is None or (entry["done"] and entry["end"] == size)
    await crash(source)
    source = start(directory, state, sink.checkpoint)
    await read_and_fold(source, sink)
    await crash(source)
    each_once(sink, {1: first, 2: second})


async def appended_forwarding_raw(tmp_path: Path, first: bytes, later: bytes, when: str
                                  ) -> tuple[Path, Path, Sink, TailSource]:
    """A file holding ``first`` read with ``forward_raw`` (``when``: still listed by the
    checkpoint, or folded into the registry), then ``later`` appended to it while the tail
    runs or while it is stopped (a restart from the checkpoint), and read: the directory,
    the state directory, the sink and the running source."""
    directory, state = tmp_path / "watched", tmp_path / "state"
    directory.mkdir()
    path = directory / "retest.stdf"
    path.write_bytes(first)
    sink = Sink(state)
    fold_after = 0 if when.endswith("folded") else 3600
    source = start(directory, state, None, forward_raw=True, fold_after=fold_after)
    await (read_and_fold(source, sink) if fold_after == 0 else polls(source, sink))
    if when.startswith("stopped"):
        await crash(source)
        append(path, later)
        source = start(directory, state, sink.checkpoint, forward_raw=True,
                       fold_after=fold_after)
    else:
        append(path, later)
    await polls(source, sink)
    return directory, state, sink, source


@pytest.mark.parametrize("when", ["running", "stopped, folded"])
async def test_with_forward_raw_a_dtr_read_with_the_mrr_is_not_sent_again_with_the_lot(
        tmp_path: Path, when: str) -> None:
    """``forward_raw``: a read sends a DTR after an MRR as a raw record, as it met it; the
    lot appended after it later is read from its FAR, so the DTR is not sent twice."""
    _, _, sink, source = await appended_forwarding_raw(
        tmp_path, lot(1) + notes("DTR"), lot(2), when)
    await crash(source)
    assert lot_ids(sink.records) == {"L001": 1, "L002": 1}
    assert [r.fields["TEXT_DAT"] for r in sink.records
            if isinstance(r, RawRecord) and r.rec == "DTR"] == [
                "end of lot: merged by ate-merge 2.1"]


async def three_lots_restarted_inside_the_second(tmp_path: Path, lots: dict[int, bytes],
                                                before_second: bytes = b"",
                                                before_third: bytes = b"") -> None:
    """A file of ``lots[1]`` read and folded; ``before_second`` and half of ``lots[2]``
    appended and read; a crash and a restart from the checkpoint; the rest of ``lots[2]``,
    then ``before_third`` and ``lots[3]``, appended and read: each lot exactly once."""
    directory, state = tmp_path / "watched", tmp_path / "state"
    directory.mkdir()
    path = directory / "retest.stdf"
    path.write_bytes(lots[1])
    sink = Sink(state)
    source = start(directory, state, None, read_size=512)
    await read_and_fold(source, sink)
    half = len(lots[2]) // 2
    append(path, before_second + lots[2][:half])
    await polls(source, sink, 1)
    listed = sink.checkpoint["files"][str(path)]
    # the lot's parser starts at its FAR (``from``), past what came before it
    assert not listed["done"] and listed["from"] == len(lots[1]) + len(before_second)
    await crash(source)
    source = start(directory, state, sink.checkpoint, read_size=512)
    append(path, lots[2][half:])
    await read_and_fold(source, sink)
    append(path, before_third + lots[3])
    await read_and_fold(source, sink)
    await crash(source)
    each_once(sink, lots)


async def test_a_restart_inside_a_lot_appended_after_a_dtr_resumes_it_at_its_far(
        tmp_path: Path) -> None:
    """The appended lot's parser starts at its FAR, past the DTR (``from``), so a restart
    inside it re-reads it from there, and a DTR in the lot's own byte order (big-endian
    after a little-endian lot) is passed over as well."""
    await three_lots_restarted_inside_the_second(
        tmp_path, {1: lot(1), 2: lot(2, ">"), 3: lot(3, ">")},
        before_second=notes("DTR"), before_third=notes("DTR, GDR", ">"))


@pytest.mark.parametrize("cut", [2, 5], ids=["part of its header", "its header"])
async def test_a_lot_whose_far_was_cut_when_the_mrr_was_read_is_read_once(
        tmp_path: Path, cut: int) -> None:
    """Only part of the next lot's FAR was written when the tail read the MRR: the file is
    complete there (nothing whole follows); the rest written later, the lot is read."""
    directory, state = tmp_path / "watched", tmp_path / "state"
    directory.mkdir()
    first, second = lot(1), lot(2)
    path = directory / "retest.stdf"
    path.write_bytes(first + second[:cut])
    sink = Sink(state)
    source = start(directory, state, None, fold_after=3600)
    await polls(source, sink)
    assert sink.checkpoint["files"][str(path)]["done"]
    append(path, second[cut:7])  # the FAR whole, the ATR cut
    await polls(source, sink)
    append(path, second[7:])
    await polls(source, sink)
    each_once(sink, {1: first, 2: second})
    await crash(source)


async def test_three_lots_appended_one_after_another_and_a_restart_in_the_middle(
        tmp_path: Path) -> None:
    """Each appended lot is read from the end of the one before; a restart inside the
    second one resumes it where the checkpoint says (``from``: its parser starts at the
    lot's FAR), not from the file's start."""
    await three_lots_restarted_inside_the_second(
        tmp_path, {1: lot(1), 2: lot(2, ">"), 3: lot(3)})


@pytest.mark.parametrize("growth", ["zero fill", "text trailer", "junk"])
async def test_growth_that_is_not_a_lot_is_logged_once_and_not_read(
        tmp_path: Path, growth: str, caplog: pytest.LogCaptureFixture) -> None:
    """As before: what follows the MRR is not a FAR.  A lot appended after it is not read
    either (it does not follow the MRR); logged once per run, not per poll."""
    directory, state = tmp_path / "watched", tmp_path / "state"
    directory.mkdir()
    first = lot(1)
    path = directory / "lot.stdf"
    path.write_bytes(first)
    sink = Sink(state)
    source = start(directory, state, None)
    await read_and_fold(source, sink)
    append(path, {"zero fill": b"\0" * 4096, "text trailer": b"END OF LOT L001\n",
                  "junk": b"\x02\x00\x00\x0b" + b"x" * 60}[growth])
    await polls(source, sink)
    append(path, lot(2))
    await polls(source, sink)
    await crash(source)
    assert sum("grew after it was complete" in r.getMessage() for r in caplog.records) == 1
    source = start(directory, state, sink.checkpoint)
    await read_and_fold(source, sink)
    await crash(source)
    each_once(sink, {1: first})


async def test_a_file_complete_by_its_idle_timeout_is_not_read_on(tmp_path: Path) -> None:
    """No MRR (the tester crashed): complete when idle, as before; a lot appended to it
    afterwards is not read (it may be the same lot going on after a long pause)."""
    directory, state = tmp_path / "watched", tmp_path / "state"
    directory.mkdir()
    first = lot(1)
    mrr = first.rindex(b"\x01\x14")  # (the MRR's REC_TYP 1, REC_SUB 20: after its length)
    path = directory / "crashed.stdf"
    path.write_bytes(first[:mrr - 2])
    sink = Sink(state)
    source = tail([directory], state_dir=state, idle_timeout=0.05, fold_after=0)
    await source.poll_once(sink)
    time.sleep(0.1)
    await polls(source, sink)
    assert source.files[str(path)].done and source.files[str(path)].reason == "idle"
    append(path, lot(2))
    await polls(source, sink)
    await crash(source)
    assert lot_ids(sink.records) == {"L001": 1}


async def test_a_crash_at_any_put_reads_an_appended_lot_once(tmp_path: Path) -> None:
    """A lot appended while the tail runs, after the first was folded into the watermark
    (its registry entry written), read in two pieces and folded in turn (a new version of
    the entry): the crash after each put in turn -- the durable checkpoint and records
    those of the puts so far, while the tail went on and wrote entries ahead of them --
    and the file touched before the restart.  Each record once: the entry's version the
    durable checkpoint relies on says where that checkpoint's view of the file ends."""
    first, second = lot(1), lot(2, ">")

    async def history(directory: Path, sink: Sink) -> None:
        path = directory / "retest.stdf"
        source = start(directory, sink.state, None)
        path.write_bytes(first)
        await read_and_fold_lagging(source, sink)
        append(path, second[:len(second) // 2])
        await source.poll_once(sink)
        append(path, second[len(second) // 2:])
        await read_and_fold_lagging(source, sink)
        await crash(source)

    whole = Sink(tmp_path / "state")
    (tmp_path / "watched").mkdir()
    await history(tmp_path / "watched", whole)
    each_once(whole, {1: first, 2: second})
    for k in range(len(whole.puts) + 1):
        directory, state = tmp_path / f"w{k}", tmp_path / f"s{k}"
        directory.mkdir()
        sink = LaggingSink(state, directory, durable=k)
        await history(directory, sink)
        assert sink.taken == len(whole.puts)
        time.sleep(FOLD)
        os.utime(directory / "retest.stdf")
        source = start(directory, state, sink.checkpoint)
        sink.durable = 1 << 30
        await read_and_fold(source, sink)
        await crash(source)
        assert lot_ids(sink.records) == {"L001": 1, "L002": 1}, f"a crash after put {k}"
        each_once(sink, {1: first, 2: second})


async def test_upgrading_from_a_checkpoint_and_registry_without_the_end(
        tmp_path: Path) -> None:
    """An older tail's checkpoint has no ``end``: a file complete at its MRR has its
    offset there.  Its registry lines say nothing of the MRR: an entry is taken to end at
    its file's size.  Either way a lot appended while the gateway was stopped is read."""
    directory, state = tmp_path / "watched", tmp_path / "state"
    directory.mkdir()
    listed, folded = directory / "listed.stdf", directory / "folded.stdf"
    folded.write_bytes(lot(1))
    sink = Sink(state)
    source = start(directory, state, None)
    await read_and_fold(source, sink)
    listed.write_bytes(lot(2) + lot(3)[:3])  # (the next lot's FAR cut: its end is not its size)
    await polls(source, sink)
    await crash(source)
    old = json.loads(json.dumps(sink.checkpoint))
    for entry in old["files"].values():
        entry.pop("end", None)
        entry.pop("from", None)
    assert old["files"][str(listed)]["reason"] == "MRR"
    lines = (state / "finished.jsonl").read_text().splitlines()
    assert all(len(json.loads(line)) == 6 for line in lines), "as an older tail wrote them"
    append(listed, lot(3)[3:])
    append(folded, lot(4))
    sink.puts.append(([], old, b""))
    source = start(directory, state, old)
    await read_and_fold(source, sink)
    await crash(source)
    each_once(sink, {1: lot(1), 2: lot(2), 3: lot(3), 4: lot(4)})


async def test_through_the_gateway_a_crash_after_any_frame_of_an_appended_lot(
        tmp_path: Path) -> None:
    """A real gateway and spool: a tester's file complete at its MRR (a real tester's
    lot), then a retest lot in the other byte order appended to it while the gateway
    runs.  The crash image is taken after every frame; from each one taken after the
    first lot was done, the restart stores each record once -- between the parts of a
    split put included -- and both lots as files of their own are stored."""
    import trio
    from shared_data import METIS, stdf_bytes
    from test_exactly_once import (
        AFTER_KEY,
        Snapshots,
        records_of,
        stored_checkpoints,
        tail_cfg,
        tailed_records,
    )

    from edgegw.gateway import Gateway

    one = stdf_bytes(METIS)
    two = stdf_file_bytes(TesterProfile(lot_id="L002", sites=4, wafer_diameter_dies=10,
                                        tests_per_part=12, seed=2), byte_order=">")
    files = tmp_path / "stdf"
    files.mkdir()
    path = files / "retest.std"
    path.write_bytes(one)

    async def run(cfg: Any, store: Any = None, *, then: bytes = b"") -> None:
        """Tail until the file is done at its end -- the first lot's, then, ``then``
        appended, the whole file's."""
        gateway = Gateway(cfg, store=store)

        def done_at(end: int) -> bool:
            listed = ((gateway.store.checkpoints.get("tail") or {}).get("files") or {})
            entry = listed.get(str(path))
            return entry is not None and entry["done"] and entry["end"] == end

        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                await nursery.start(gateway.run)
                if then:
                    while not done_at(len(one)):
                        await trio.sleep(0.01)
                    append(path, then)
                while not done_at(len(one) + len(two)):
                    await trio.sleep(0.01)
                await gateway.flush()
                nursery.cancel_scope.cancel()

    cfg = tail_cfg(files, tmp_path / "gw", tmp_path / "spool")
    assert cfg.spool is not None
    images = tmp_path / "images"
    await run(cfg, Snapshots(cfg.spool, set(range(1, 400)), images), then=two)
    whole = await tailed_records(tmp_path / "spool")
    assert whole == (await records_of(tmp_path / "clean1", one)
                     + await records_of(tmp_path / "clean2", two))
    crashes, split = [], 0
    for image in sorted(images.iterdir(), key=lambda p: int(p.name)):
        checkpoints = await stored_checkpoints(image)
        entry = (checkpoints.get("tail") or {}).get("files", {}).get(str(path))
        if entry and entry["offset"] >= len(one) and entry["offset"] < len(one) + len(two):
            crashes.append(image)
            split += bool(checkpoints.get(AFTER_KEY, {}).get("tail"))
    assert len(crashes) >= 3 and split, "the test needs crashes inside the second lot"
    for image in crashes:
        await run(tail_cfg(files, tmp_path / f"gw{image.name}", image))
        assert await tailed_records(image) == whole, f"a crash after frame {image.name}"


def test_the_registry_keeps_the_versions_a_restart_may_rely_on(tmp_path: Path) -> None:
    """A file read on past its entry (a lot appended and read) gets a new version of it,
    relied on only from its own ``since``; the one before stays for a restart from a
    checkpoint that has not covered that lot.  On disk: six fields when the file ends at
    its last MRR and there is no older version (as an older tail wrote), eight otherwise."""
    from edgegw.sources import FinishedFiles, recognised

    path = tmp_path / "finished.jsonl"
    reg = FinishedFiles(str(path), 10)
    reg.add(7, "/d/a.stdf", (1024, 1), 5000, changed=100, end=5000)
    reg.add(8, "/d/b.stdf", (1024, 2), 3000, changed=100, end=None)  # complete when idle
    reg.flush()
    assert [len(json.loads(line)) for line in path.read_text().splitlines()] == [6, 8]
    reg.add(7, "/d/a.stdf", (1024, 1), 9000, changed=200, end=8990, read_on=True)
    e = reg.get(7)
    assert recognised(e, "/d/a.stdf", 9000, True, 200) == "unchanged"
    assert recognised(e, "/d/a.stdf", 9000, True, 150) == "grew", "the version before"
    assert recognised(e, "/d/a.stdf", 9000, True, 99) is None, "none durable yet"
    reg.add(7, "/d/c.stdf", (1024, 1), 9000, changed=300, end=8990)  # renamed: the same
    reg.flush()
    again = FinishedFiles(str(path), 10)
    again.load()
    assert again.entries == reg.entries
    assert again.entries[8].end is None and again.entries[7].older[0].end == 5000
    path.write_text('[9, "/d/old.stdf", 1024, 3, 4000, 50]\n')  # an older tail's line
    old = FinishedFiles(str(path), 10)
    old.load()
    assert old.entries[9].end == 4000, "taken to end at its size"


async def test_a_restart_from_a_checkpoint_older_than_many_appended_lots_sends_none_twice(
        tmp_path: Path) -> None:
    """The first lot read and folded (durable), then seven lots appended one after another,
    each read and folded in turn (a new version of the file's registry entry each) while
    no checkpoint became durable; the crash, and the restart from that old checkpoint.
    Each lot once: the version that checkpoint relies on is still known, so the restart
    reads on from its end.  Before: only the last four older versions were kept, none
    relied on, and the file was read whole again (its first lots sent twice)."""
    directory, state = tmp_path / "watched", tmp_path / "state"
    directory.mkdir()
    lots = {n: lot(n, "<" if n % 2 else ">") for n in range(1, 9)}
    path = directory / "retest.stdf"
    path.write_bytes(lots[1])
    sink = LaggingSink(state, directory, durable=1 << 30)
    source = start(directory, state, None)
    await read_and_fold(source, sink)
    sink.durable = sink.taken  # from here on nothing becomes durable
    for n in range(2, 9):
        append(path, lots[n])
        await read_and_fold_lagging(source, sink)
    await crash(source)
    source = start(directory, state, sink.checkpoint)
    sink.durable = 1 << 30
    await read_and_fold(source, sink)
    await crash(source)
    each_once(sink, lots)


def test_the_registry_forgets_only_the_versions_no_durable_checkpoint_can_rely_on(
        tmp_path: Path) -> None:
    """Every version of an entry stays while a restart may rely on it, however many lots
    were appended; told a checkpoint is durable (``settle``: the tail, by its sink's
    ``on_durable``, and at a restart), the registry forgets those before the version that
    checkpoint relies on -- a later one's watermark is at or past it."""
    from edgegw.sources import FinishedFiles, recognised

    path = tmp_path / "finished.jsonl"
    reg = FinishedFiles(str(path), 10)
    reg.add(7, "/d/a.stdf", (1024, 1), 1000, changed=100, end=1000)
    for k in range(1, 8):
        reg.add(7, "/d/a.stdf", (1024, 1), 1000 * (k + 1), changed=100 * (k + 1),
                end=1000 * (k + 1), read_on=True)
    e = reg.get(7)
    assert e is not None and len(e.older) == 7
    assert recognised(e, "/d/a.stdf", 8000, True, 150) == "grew", "the first version"
    reg.settle(99)  # relies on none yet: every version may still be needed
    assert len(reg.entries[7].older) == 7
    reg.settle(450)
    assert [o.since for o in reg.entries[7].older] == [700, 600, 500, 400]
    reg.settle(800)
    assert reg.entries[7].older == () and reg.entries[7].since == 800
    reg.add(7, "/d/a.stdf", (1024, 1), 9000, changed=900, end=9000, read_on=True)
    reg.flush()
    again = FinishedFiles(str(path), 10)
    again.load()
    assert [o.since for o in again.entries[7].older] == [800]


@pytest.mark.parametrize("when", ["running, listed", "running, folded", "stopped, listed",
                                  "stopped, folded"])
async def test_a_lot_appended_to_a_finished_gzip_file_is_read_once(
        tmp_path: Path, when: str) -> None:
    """A gzip file complete at its MRR, and a lot appended to it as a gzip member of its
    own (``gzip -c lot >> file.stdf.gz``), while the tail runs or while it is stopped:
    read once, as a file of its own; a restart after that reads nothing again.  Before:
    logged "grew after it was complete" and lost."""
    import gzip

    directory, state = tmp_path / "watched", tmp_path / "state"
    directory.mkdir()
    first, second = lot(1), lot(2, ">")
    path = directory / "retest.stdf.gz"
    path.write_bytes(gzip.compress(first))
    sink = Sink(state)
    source = await read_the_first_lot(directory, state, path, sink, when, first)
    if when.startswith("stopped"):
        await crash(source)
        append(path, gzip.compress(second))
        source = start(directory, state, sink.checkpoint,
                       fold_after=0 if when.endswith("folded") else 3600)
    else:
        append(path, gzip.compress(second))
    await polls(source, sink)
    each_once(sink, {1: first, 2: second})
    await crash(source)
    source = start(directory, state, sink.checkpoint)
    await read_and_fold(source, sink)
    await crash(source)
    each_once(sink, {1: first, 2: second})


async def test_a_restart_inside_a_lot_appended_to_a_gzip_file_resumes_it(
        tmp_path: Path) -> None:
    """The appended member written in pieces, a crash inside it: the restart re-reads the
    lot from its FAR (``from``, an offset in the decompressed stream) to the checkpoint's
    offset, sending nothing again; then a third lot appended, in a member of its own too."""
    import gzip

    directory, state = tmp_path / "watched", tmp_path / "state"
    directory.mkdir()
    lots = {1: lot(1), 2: lot(2), 3: lot(3, ">")}
    path = directory / "retest.stdf.gz"
    path.write_bytes(gzip.compress(lots[1]))
    sink = Sink(state)
    source = start(directory, state, None, read_size=512)
    await read_and_fold(source, sink)
    member = gzip.compress(lots[2])
    append(path, member[:len(member) // 2])
    await polls(source, sink, 1)
    listed = sink.checkpoint["files"][str(path)]
    assert not listed["done"] and listed["from"] == len(lots[1])
    await crash(source)
    source = start(directory, state, sink.checkpoint, read_size=512)
    append(path, member[len(member) // 2:])
    await read_and_fold(source, sink)
    append(path, gzip.compress(lots[3]))
    await read_and_fold(source, sink)
    await crash(source)
    each_once(sink, lots)


def test_a_gzip_file_of_members_larger_than_a_read_is_read(tmp_path: Path) -> None:
    """A writer that compresses each block of 800 bytes (``read_size`` 512) as a gzip member
    of its own: a member that ends in the input left over by a read that made
    ``read_size`` bytes leaves the next member both where the reader looked for input
    left over and where it looked for the next member -- and an ended member makes
    nothing more of the first.  Before: the tail spun for ever in the Trio thread (so the
    source runs in a thread of its own here, and the test waits for it a while)."""
    import gzip
    import threading

    import trio

    directory, state = tmp_path / "watched", tmp_path / "state"
    directory.mkdir()
    data = lot(1) + lot(2)
    blocks = [data[i:i + 800] for i in range(0, len(data), 800)]
    (directory / "blocks.stdf.gz").write_bytes(b"".join(gzip.compress(b) for b in blocks))
    sink = Sink(state)

    def read() -> None:
        source = start(directory, state, None, read_size=512)
        trio.run(polls, source, sink)
        trio.run(crash, source)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(60)
    assert not reader.is_alive(), "the tail is stuck reading the gzip file"
    each_once(sink, {1: lot(1), 2: lot(2)})


def dtr(text: str, order: str = "<") -> bytes:
    return StdfWriter(order).encode("DTR", {"TEXT_DAT": text})


@pytest.mark.parametrize("when", ["running", "stopped, listed", "stopped, folded"])
async def test_with_forward_raw_a_dtr_that_arrives_with_the_appended_lot_is_sent_once(
        tmp_path: Path, when: str) -> None:
    """``forward_raw``: a DTR written with the MRR is forwarded with the first lot (as a
    read meets it); a DTR and a GDR written later, with the appended lot, before its FAR,
    are forwarded with that lot -- each once, in file order, running or after a restart,
    and a restart after that forwards nothing again.  Before: the later ones were not
    forwarded at all."""
    directory, state, sink, source = await appended_forwarding_raw(
        tmp_path, lot(1) + dtr("first lot's end"),
        dtr("merged later") + notes("GDR") + lot(2), when)
    await crash(source)
    source = start(directory, state, sink.checkpoint, forward_raw=True)
    await read_and_fold(source, sink)
    await crash(source)
    assert lot_ids(sink.records) == {"L001": 1, "L002": 1}
    raw = [r for r in sink.records if isinstance(r, RawRecord)
           and (r.rec in ("DTR", "GDR") or r.fields.get("LOT_ID") == "L002")]
    assert [(r.rec, r.fields.get("TEXT_DAT")) for r in raw] == [
        ("DTR", "first lot's end"), ("DTR", "merged later"), ("GDR", None), ("MIR", None)]


@pytest.mark.parametrize("when", ["running, listed", "stopped, folded"])
async def test_growth_that_is_not_a_lot_is_logged_once_whatever_the_restarts(
        tmp_path: Path, when: str, caplog: pytest.LogCaptureFixture) -> None:
    """Zero fill after the MRR of a finished file, written while the tail runs (the
    checkpoint still lists the file: ``fold_after`` not passed) or while it is stopped
    (the registry of finished files has it): logged once for the file -- not again at
    each restart.  Before: logged again by every start of the tail."""
    directory, state = tmp_path / "watched", tmp_path / "state"
    directory.mkdir()
    path = directory / "lot.stdf"
    path.write_bytes(lot(1))
    sink = Sink(state)
    folded = when.endswith("folded")
    fold_after = 0 if folded else 3600

    async def run(source: TailSource) -> None:
        await (read_and_fold(source, sink) if folded else polls(source, sink))

    source = start(directory, state, None, fold_after=fold_after)
    await run(source)
    if folded:
        await crash(source)
        append(path, b"\0" * 4096)
        source = start(directory, state, sink.checkpoint, fold_after=fold_after)
    else:
        append(path, b"\0" * 4096)
    await run(source)
    for _ in range(3):
        await crash(source)
        source = start(directory, state, sink.checkpoint, fold_after=fold_after)
        await run(source)
    await crash(source)
    assert sum("grew after it was complete" in r.getMessage() for r in caplog.records) == 1
    each_once(sink, {1: lot(1)})


async def test_a_file_that_disappeared_before_it_was_complete_is_logged_once(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A lot deleted while being written: logged once, not again by each restart of a
    tail whose sink takes no origins (an embedded gateway's) and that has put nothing
    since.  Before: the checkpoint handed over still listed it, so every start met it
    missing and logged it again."""
    directory, state = tmp_path / "watched", tmp_path / "state"
    directory.mkdir()
    path = directory / "lot.stdf"
    data = lot(1)
    path.write_bytes(data[:len(data) // 2])
    sink = Sink(state)
    source = start(directory, state, None, fold_after=3600)
    await polls(source, sink)
    path.unlink()
    await polls(source, sink)
    for _ in range(3):
        await crash(source)
        source = start(directory, state, sink.checkpoint, fold_after=3600)
        await polls(source, sink)
    await crash(source)
    assert sum("disappeared before it was complete" in r.getMessage()
               for r in caplog.records) == 1


async def test_a_running_tail_forgets_the_versions_a_durable_checkpoint_no_longer_needs(
        tmp_path: Path) -> None:
    """The tail hears of each checkpoint that becomes durable (its sink's ``on_durable``,
    as the gateway's has): while none does, every version of a file's registry entry is
    kept, one per lot appended and read; once the last one handed over is durable, the
    versions before the one it relies on are forgotten -- the registry stays bounded by
    what a restart may need."""
    import trio

    class DurableSink(Sink):
        listener: Any = None

        def on_durable(self, listener: Any) -> None:
            self.listener = listener

    directory, state = tmp_path / "watched", tmp_path / "state"
    directory.mkdir()
    path = directory / "retest.stdf"
    path.write_bytes(lot(1))
    sink = DurableSink(state)
    source = tail([directory], state_dir=state, idle_timeout=3600, fold_after=0)

    async def registered(size: int) -> Any:
        while True:
            entry = source.finished.get(path.stat().st_ino)  # type: ignore[union-attr]
            if entry is not None and entry.size == size:
                return entry
            await trio.sleep(0.02)

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await nursery.start(source.run, sink)
            await registered(len(lot(1)))
            size = len(lot(1))
            for n in range(2, 8):
                append(path, lot(n))
                size += len(lot(n))
                entry = await registered(size)
            assert len(entry.older) == 6, "none durable yet: every version kept"
            await trio.sleep(0.2)  # (the watermark handed over passes the last version)
            sink.listener(sink.checkpoint)
            entry = source.finished.get(path.stat().st_ino)  # type: ignore[union-attr]
            assert entry is not None and len(entry.older) <= 1
            nursery.cancel_scope.cancel()
    each_once(sink, {n: lot(n) for n in range(1, 8)})


def gzip_lots(lots: list[bytes], how: str) -> list[bytes]:
    """The compressed pieces a tester appends, one per lot: a gzip member each
    (``gzip -c lot >> file``), or one gzip stream flushed with Z_SYNC_FLUSH after each."""
    import gzip
    import zlib

    if how == "members":
        return [gzip.compress(data) for data in lots]
    stream = zlib.compressobj(6, zlib.DEFLATED, 31)
    return [stream.compress(data) + stream.flush(zlib.Z_SYNC_FLUSH) for data in lots]


def bytes_read() -> int:
    """What this process has read from files so far (``rchar``: every read, by any code)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError("no rchar in /proc/self/io")


@pytest.mark.skipif(not Path("/proc/self/io").exists(), reason="needs /proc/self/io")
@pytest.mark.parametrize("how", ["members", "sync-flushed"])
async def test_lots_appended_to_a_gzip_file_are_decompressed_once_not_from_its_start_each(
        tmp_path: Path, how: str) -> None:
    """A tester appending 24 lots to one .stdf.gz, each complete at its MRR before the
    next: the tail reads on from where its reader was at the last lot's FAR (the same
    inode, the compressed bytes before it unchanged), so the compressed bytes it
    decompresses (``tail_gzip_bytes_total``) and reads from disk grow with the file,
    not with its square; each record once; a crash in the middle of the 13th lot's
    member, then the rest appended: each record once too, the restart decompressing the
    file once from its start.  Before: the whole file decompressed from its start at each
    growth, twice (to look after its end, and to reach the new lot's FAR)."""
    from edgegw.metrics import Metrics

    directory, state = tmp_path / "watched", tmp_path / "state"
    directory.mkdir()
    lots = {n: lot(n, ">" if n % 3 == 0 else "<") for n in range(1, 25)}
    pieces = gzip_lots(list(lots.values()), how)
    path = directory / "retest.stdf.gz"
    metrics = Metrics()
    sink = Sink(state)
    source = start(directory, state, None, metrics=metrics, read_size=4096)
    read_before = bytes_read()
    for piece in pieces[:12]:
        append(path, piece)
        await polls(source, sink, 2)
    size = path.stat().st_size
    decompressed = metrics.counter("tail_gzip_bytes_total").get(source="tester1")
    read = bytes_read() - read_before
    # (each lot decompressed about four times: to look after its end, to read it, and
    # both again for the next lot, from its FAR; and the registry's and heads' reads)
    assert size < decompressed <= 5 * size, (decompressed, size)
    assert read < 6 * size + 64 * 1024, (read, size)
    each_once(sink, {n: lots[n] for n in range(1, 13)})
    half = len(pieces[12]) // 2
    append(path, pieces[12][:half])
    await polls(source, sink, 1)
    await crash(source)
    source = start(directory, state, sink.checkpoint, metrics=metrics, read_size=4096)
    append(path, pieces[12][half:])
    for piece in pieces[13:]:
        await polls(source, sink, 2)
        append(path, piece)
    await polls(source, sink, 2)
    each_once(sink, lots)
    size = path.stat().st_size
    decompressed = metrics.counter("tail_gzip_bytes_total").get(source="tester1")
    assert decompressed <= 7 * size, (decompressed, size)  # (the restart: from its start)
    await crash(source)
